//! fep_settle_infer on the CPU: a fuzzed network description (layers, widths, codes, weights,
//! biases, precisions), params, batch and outputs.
#![no_main]

use fep_kernels_fuzz::settle::{SettleArgs, build};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|a: SettleArgs| {
    let mut c = Call::new("fep_settle_infer", a.values);
    let Some(b) = build(&mut c, &a, None) else {
        return;
    };
    let (kind, ordinal) = a.device.get();
    c.note(format!("kind {kind}, ordinal {ordinal}"));
    c.ready();
    let status = unsafe {
        ffi::fep_settle_infer(
            kind,
            ordinal,
            std::ptr::null_mut(),
            b.net_ptr(),
            b.params_ptr(),
            b.batch,
            c.ptr(b.x0),
            c.ptr(b.x_out),
            c.ptr(b.eps_out),
            c.ptr(b.energy),
            c.ptr(b.trace),
            c.ptr(b.steps_out),
        )
    };
    c.check(status);
});
