//! fep_vmp_infer_sequence on a valid model: fuzzed handle, params, steps, observation kind and
//! buffer, n, actions, prior and outputs.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::vmp::{
    Model, ModelShape, ObsKind, fill_actions, fill_beliefs, fill_obs, obs_buf, pass_work,
};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Params {
    method: Code,
    num_iter: Count,
    tau: Real,
    skip_input_checks: Flag,
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: ModelShape,
    handle: Handle,
    params: Nullable<Params>,
    steps: Dim,
    obs_kind: ObsKind,
    obs: Ptr,
    n: Dim,
    actions: Ptr,
    prior: Ptr,
    qs: Ptr,
    vfe: Ptr,
    vfe_t: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let model = Model::new(&input.model);
    let s = &model.sizes;
    let params = input.params.as_ref().map(|p| ffi::FepVmpSequenceParams {
        method: p.method.get(2),
        num_iter: p.num_iter.get(16),
        tau: p.tau.get_f32(0.0, 1.0),
        skip_input_checks: p.skip_input_checks.get(),
    });
    let iters = params.map_or(1, |p| p.num_iter) as u64;
    let steps = input.steps.get(3);
    let n = input.n.get(3);
    let bl = s.belief_len();
    let mut c = Call::new("fep_vmp_infer_sequence", input.values);
    let obs = obs_buf(&mut c, s, input.obs_kind, n, steps, input.obs);
    let actions = c.buf(
        "actions",
        Ty::I32,
        Role::In,
        elems(&[n, steps.saturating_sub(1), s.f]),
        input.actions,
        Fill::Target,
    );
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
        elems(&[n, steps, bl]),
        input.qs,
        SENTINEL,
    );
    let vfe = c.buf("vfe", Ty::F32, Role::Out, elems(&[n]), input.vfe, SENTINEL);
    let vfe_t = c.buf(
        "vfe_t",
        Ty::F32,
        Role::Out,
        elems(&[n, steps]),
        input.vfe_t,
        SENTINEL,
    );
    c.work(mul(
        pass_work(s),
        elems(&[n.max(1), iters.max(1), steps.max(1), 2]),
    ));
    if !c.alloc() {
        return;
    }
    fill_obs(&mut c, s, input.obs_kind, obs);
    fill_actions(&mut c, s, actions);
    fill_beliefs(&mut c, s, prior);
    let mut mem = HandleMem::default();
    let h = mem.ptr(input.handle, model.ptr, shared_dict());
    c.note(format!(
        "model {h:p} ({:?}: {s:?}), params {params:?}, steps {steps}, obs_kind {}, n {n}",
        input.handle,
        input.obs_kind.code()
    ));
    c.ready();
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let status = unsafe {
        ffi::fep_vmp_infer_sequence(
            h,
            std::ptr::null_mut(),
            pp,
            steps,
            input.obs_kind.code(),
            c.ptr(obs),
            n,
            c.ptr(actions),
            c.ptr(prior),
            c.ptr(qs),
            c.ptr(vfe),
            c.ptr(vfe_t),
        )
    };
    c.check(status);
    done();
});
