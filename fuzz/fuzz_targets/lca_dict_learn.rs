//! fep_lca_dict_learn on a valid dictionary: fuzzed handle, dtype, x, a, batch and lr. On any
//! error the dictionary is unchanged; on success it holds finite values.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::lca::{Dict, DictShape};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    dict: DictShape,
    handle: Handle,
    dtype: DType,
    x: Ptr,
    a: Ptr,
    batch: Dim,
    lr: Real,
    values: Values,
}

fuzz_target!(|input: Input| {
    let d = Dict::new(&input.dict);
    let batch = input.batch.get(3);
    let lr = input.lr.get_f32(0.0, 1.0);
    let ty = input.dtype.ty();
    let mut c = Call::new("fep_lca_dict_learn", input.values);
    let x = c.buf(
        "x",
        ty,
        Role::In,
        elems(&[batch, d.n]),
        input.x,
        Fill::Range(-1.0, 1.0),
    );
    let a = c.buf(
        "a",
        Ty::F32,
        Role::In,
        elems(&[batch, d.m]),
        input.a,
        Fill::Range(-1.0, 1.0),
    );
    c.work(mul(elems(&[batch.max(1), d.n, d.m]), Some(4)));
    if !c.alloc() {
        return;
    }
    let before = d.phi();
    let mut mem = HandleMem::default();
    let h = mem.ptr(input.handle, d.ptr, shared_model());
    c.note(format!(
        "dict {h:p} ({:?}: {} x {}), dtype {}, batch {batch}, lr {lr}",
        input.handle,
        d.n,
        d.m,
        input.dtype.code()
    ));
    c.ready();
    let status = unsafe {
        ffi::fep_lca_dict_learn(
            h,
            std::ptr::null_mut(),
            input.dtype.code(),
            c.ptr(x),
            c.ptr(a),
            batch,
            lr,
        )
    };
    c.check(status);
    done();
    let after = d.phi();
    if status != ffi::FEP_OK {
        assert!(
            after == before,
            "fep_lca_dict_learn failed (status {status}) but changed the dictionary"
        );
    } else if let Some(k) = after.iter().position(|v| !v.is_finite()) {
        panic!(
            "fep_lca_dict_learn returned FEP_OK and left a non-finite Phi[{k}] = {}",
            after[k]
        );
    }
});
