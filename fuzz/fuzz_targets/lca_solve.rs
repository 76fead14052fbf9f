//! fep_lca_solve on a valid dictionary: fuzzed handle, dtype, x, batch, params, u0 and outputs.
//! The dictionary must be unchanged afterwards.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::lca::{Dict, DictShape};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Params {
    threshold: Code,
    lambda: Real,
    eta: Real,
    steps: Count,
    tol: Real,
    tol_mode: Code,
    allow_tf32: Flag,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dict: DictShape,
    handle: Handle,
    dtype: DType,
    x: Ptr,
    batch: Dim,
    params: Nullable<Params>,
    u0: Ptr,
    u_out: Ptr,
    a_out: Ptr,
    energy_out: Ptr,
    active_out: Ptr,
    steps_out: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let d = Dict::new(&input.dict);
    let params = input.params.as_ref().map(|p| ffi::FepLcaParams {
        threshold: p.threshold.get(4),
        lambda: p.lambda.get_f32(0.0, 0.4),
        eta: p.eta.get_f32(0.0, 1.0),
        steps: p.steps.get(12),
        tol: p.tol.get_f32(0.0, 0.01),
        tol_mode: p.tol_mode.get(2),
        allow_tf32: p.allow_tf32.get(),
    });
    let steps = params.map_or(1, |p| p.steps) as u64;
    let batch = input.batch.get(3);
    let ty = input.dtype.ty();
    let mut c = Call::new("fep_lca_solve", input.values);
    let bm = elems(&[batch, d.m]);
    let bt = elems(&[batch, steps]);
    let x = c.buf(
        "x",
        ty,
        Role::In,
        elems(&[batch, d.n]),
        input.x,
        Fill::Range(-1.0, 1.0),
    );
    let u0 = c.buf(
        "u0",
        Ty::F32,
        Role::In,
        bm,
        input.u0,
        Fill::Range(-0.5, 0.5),
    );
    let u = c.buf("u_out", Ty::F32, Role::Out, bm, input.u_out, SENTINEL);
    let a = c.buf("a_out", Ty::F32, Role::Out, bm, input.a_out, SENTINEL);
    let energy = c.buf(
        "energy_out",
        Ty::F32,
        Role::Out,
        bt,
        input.energy_out,
        SENTINEL,
    );
    let active = c.buf(
        "active_out",
        Ty::U32,
        Role::Out,
        bt,
        input.active_out,
        SENTINEL,
    );
    let steps_out = c.buf(
        "steps_out",
        Ty::U32,
        Role::Out,
        elems(&[batch]),
        input.steps_out,
        SENTINEL,
    );
    // u0 may be u_out itself (the library's documented in-place start).
    c.may_be_same(u0, u);
    c.work(mul(
        elems(&[batch.max(1), steps.max(1), d.m, d.m + d.n]),
        Some(2),
    ));
    if !c.alloc() {
        return;
    }
    let before = d.phi();
    let mut mem = HandleMem::default();
    let h = mem.ptr(input.handle, d.ptr, shared_model());
    c.note(format!(
        "dict {h:p} ({:?}: {} x {}), dtype {}, batch {batch}, params {params:?}",
        input.handle,
        d.n,
        d.m,
        input.dtype.code()
    ));
    c.ready();
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let status = unsafe {
        ffi::fep_lca_solve(
            h,
            std::ptr::null_mut(),
            input.dtype.code(),
            c.ptr(x),
            batch,
            pp,
            c.ptr(u0),
            c.ptr(u),
            c.ptr(a),
            c.ptr(energy),
            c.ptr(active),
            c.ptr(steps_out),
        )
    };
    c.check(status);
    done();
    assert!(d.phi() == before, "fep_lca_solve changed the dictionary");
});
