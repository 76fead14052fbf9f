//! fep_vmp_infer_policies on a valid model with a policy table: fuzzed handle, params, beliefs,
//! n and outputs.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::vmp::{Model, ModelShape, fill_beliefs, pass_work};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Params {
    gamma: Real,
    utility: Flag,
    state_info_gain: Flag,
    param_info_gain: Flag,
    skip_input_checks: Flag,
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: ModelShape,
    handle: Handle,
    params: Nullable<Params>,
    qs: Ptr,
    n: Dim,
    g: Ptr,
    q_pi: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let model = Model::new(&input.model);
    let s = &model.sizes;
    let params = input.params.as_ref().map(|p| ffi::FepVmpPolicyParams {
        gamma: p.gamma.get_f32(0.0, 32.0),
        utility: p.utility.get(),
        state_info_gain: p.state_info_gain.get(),
        param_info_gain: p.param_info_gain.get(),
        skip_input_checks: p.skip_input_checks.get(),
    });
    let n = input.n.get(3);
    let mut c = Call::new("fep_vmp_infer_policies", input.values);
    let qs = c.buf(
        "qs",
        Ty::F32,
        Role::In,
        elems(&[n, s.belief_len()]),
        input.qs,
        Fill::Target,
    );
    let g = c.buf("g", Ty::F32, Role::Out, elems(&[n, s.p]), input.g, SENTINEL);
    let q_pi = c.buf(
        "q_pi",
        Ty::F32,
        Role::Out,
        elems(&[n, s.p]),
        input.q_pi,
        SENTINEL,
    );
    c.work(mul(
        pass_work(s),
        elems(&[n.max(1), s.p.max(1), s.h.max(1), 4]),
    ));
    if !c.alloc() {
        return;
    }
    fill_beliefs(&mut c, s, qs);
    let mut mem = HandleMem::default();
    let h = mem.ptr(input.handle, model.ptr, shared_dict());
    c.note(format!(
        "model {h:p} ({:?}: {s:?}), params {params:?}, n {n}",
        input.handle
    ));
    c.ready();
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let status = unsafe {
        ffi::fep_vmp_infer_policies(
            h,
            std::ptr::null_mut(),
            pp,
            c.ptr(qs),
            n,
            c.ptr(g),
            c.ptr(q_pi),
        )
    };
    c.check(status);
    done();
});
