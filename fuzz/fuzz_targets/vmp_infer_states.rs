//! fep_vmp_infer_states on a valid model: fuzzed handle, params, observation kind and buffer,
//! n, prior and outputs.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::vmp::{
    Model, ModelShape, ObsKind, fill_beliefs, fill_obs, obs_buf, pass_work,
};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Params {
    num_iter: Count,
    tol: Real,
    skip_input_checks: Flag,
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: ModelShape,
    handle: Handle,
    params: Nullable<Params>,
    obs_kind: ObsKind,
    obs: Ptr,
    n: Dim,
    prior: Ptr,
    qs: Ptr,
    vfe: Ptr,
    iterations: Ptr,
    vfe_trace: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let model = Model::new(&input.model);
    let s = &model.sizes;
    let params = input.params.as_ref().map(|p| ffi::FepVmpFpiParams {
        num_iter: p.num_iter.get(16),
        tol: p.tol.get_f32(0.0, 0.01),
        skip_input_checks: p.skip_input_checks.get(),
    });
    let iters = params.map_or(1, |p| p.num_iter) as u64;
    let n = input.n.get(3);
    let bl = s.belief_len();
    let mut c = Call::new("fep_vmp_infer_states", input.values);
    let obs = obs_buf(&mut c, s, input.obs_kind, n, 1, input.obs);
    let prior = c.buf(
        "prior",
        Ty::F32,
        Role::In,
        elems(&[n, bl]),
        input.prior,
        Fill::Target,
    );
    let qs = c.buf(
        "qs",
        Ty::F32,
        Role::Out,
        elems(&[n, bl]),
        input.qs,
        SENTINEL,
    );
    let vfe = c.buf("vfe", Ty::F32, Role::Out, elems(&[n]), input.vfe, SENTINEL);
    let it = c.buf(
        "iterations",
        Ty::I32,
        Role::Out,
        elems(&[n]),
        input.iterations,
        SENTINEL,
    );
    let trace = c.buf(
        "vfe_trace",
        Ty::F32,
        Role::Out,
        elems(&[n, iters]),
        input.vfe_trace,
        SENTINEL,
    );
    c.work(mul(pass_work(s), elems(&[n.max(1), iters.max(1)])));
    if !c.alloc() {
        return;
    }
    fill_obs(&mut c, s, input.obs_kind, obs);
    fill_beliefs(&mut c, s, prior);
    let mut mem = HandleMem::default();
    let h = mem.ptr(input.handle, model.ptr, shared_dict());
    c.note(format!(
        "model {h:p} ({:?}: {s:?}), params {params:?}, obs_kind {}, n {n}",
        input.handle,
        input.obs_kind.code()
    ));
    c.ready();
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let status = unsafe {
        ffi::fep_vmp_infer_states(
            h,
            std::ptr::null_mut(),
            pp,
            input.obs_kind.code(),
            c.ptr(obs),
            n,
            c.ptr(prior),
            c.ptr(qs),
            c.ptr(vfe),
            c.ptr(it),
            c.ptr(trace),
        )
    };
    c.check(status);
    done();
});
