//! fep_settle_learn on the CPU: as settle_infer, plus the target, the gradient outputs and the
//! learning rate (lr > 0 updates the weights and biases in place: on any error they must be
//! unchanged, FEP_ERR_DIVERGED included).
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::settle::{Learn, SettleArgs, build};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    args: SettleArgs,
    target: Ptr,
    grad_w: Ptr,
    grad_b: Ptr,
    lr: Real,
}

fuzz_target!(|input: Input| {
    let a = &input.args;
    let lr = input.lr.get_f32(0.0, 0.2);
    let learn = Learn {
        target: input.target,
        grad_w: input.grad_w,
        grad_b: input.grad_b,
        lr,
    };
    let mut c = Call::new("fep_settle_learn", a.values);
    let Some(b) = build(&mut c, a, Some(&learn)) else {
        return;
    };
    let (kind, ordinal) = a.device.get();
    c.note(format!("kind {kind}, ordinal {ordinal}, lr {lr}"));
    c.ready();
    let status = unsafe {
        ffi::fep_settle_learn(
            kind,
            ordinal,
            std::ptr::null_mut(),
            b.net_ptr(),
            b.params_ptr(),
            b.batch,
            c.ptr(b.x0),
            c.ptr(b.target.unwrap()),
            c.ptr(b.x_out),
            c.ptr(b.eps_out),
            c.ptr(b.energy),
            c.ptr(b.trace),
            c.ptr(b.steps_out),
            c.ptr(b.grad_w.unwrap()),
            c.ptr(b.grad_b.unwrap()),
            std::ptr::null(),
            lr,
        )
    };
    c.check(status);
});
