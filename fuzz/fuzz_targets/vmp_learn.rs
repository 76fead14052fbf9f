//! fep_vmp_learn on a valid model with Dirichlet counts: fuzzed handle, learning rates, steps,
//! observation kind and buffer, n, posteriors and actions. On any error the counts are
//! unchanged; on success they are finite and >= 0.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::vmp::{
    Model, ModelShape, ObsKind, fill_actions, fill_beliefs, fill_obs, obs_buf, pass_work,
};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Params {
    lr_a: Real,
    lr_b: Real,
    lr_d: Real,
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
    qs: Ptr,
    actions: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let model = Model::new(&input.model);
    let s = &model.sizes;
    let params = input.params.as_ref().map(|p| ffi::FepVmpLearnParams {
        lr_a: p.lr_a.get_f32(0.0, 2.0),
        lr_b: p.lr_b.get_f32(0.0, 2.0),
        lr_d: p.lr_d.get_f32(0.0, 2.0),
        skip_input_checks: p.skip_input_checks.get(),
    });
    let steps = input.steps.get(3);
    let n = input.n.get(3);
    let mut c = Call::new("fep_vmp_learn", input.values);
    let obs = obs_buf(&mut c, s, input.obs_kind, n, steps, input.obs);
    let qs = c.buf(
        "qs",
        Ty::F32,
        Role::In,
        elems(&[n, steps, s.belief_len()]),
        input.qs,
        Fill::Target,
    );
    let actions = c.buf(
        "actions",
        Ty::I32,
        Role::In,
        elems(&[n, steps.saturating_sub(1), s.f]),
        input.actions,
        Fill::Target,
    );
    c.work(mul(pass_work(s), elems(&[n.max(1), steps.max(1), 4])));
    if !c.alloc() {
        return;
    }
    fill_obs(&mut c, s, input.obs_kind, obs);
    fill_beliefs(&mut c, s, qs);
    fill_actions(&mut c, s, actions);
    let before = model.counts();
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
        ffi::fep_vmp_learn(
            h,
            std::ptr::null_mut(),
            pp,
            steps,
            input.obs_kind.code(),
            c.ptr(obs),
            n,
            c.ptr(qs),
            c.ptr(actions),
        )
    };
    c.check(status);
    done();
    let after = model.counts();
    if status != ffi::FEP_OK {
        assert!(
            after == before,
            "fep_vmp_learn failed (status {status}) but changed the counts"
        );
    } else {
        for (which, i, v) in &after {
            if let Some(k) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                panic!(
                    "fep_vmp_learn returned FEP_OK and left counts {which}[{i}][{k}] = {}",
                    v[k]
                );
            }
        }
    }
});
