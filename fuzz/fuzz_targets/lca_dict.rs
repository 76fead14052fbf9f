//! The LCA dictionary handle: fep_lca_dict_new (fuzzed dtype, phi, n, m, unit-norm check, out
//! pointer), then on success fep_lca_dict_shape, fep_lca_dict_phi and fep_lca_dict_lambda_max
//! (fuzzed handle and output pointers) and fep_lca_dict_free; free of NULL and of garbage
//! handles.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    dtype: DType,
    n: Dim,
    m: Dim,
    phi: Ptr,
    /// Columns scaled to unit norm (else as drawn).
    unit_columns: Flag,
    check_unit_norm: Flag,
    out: Ptr,
    shape_handle: Handle,
    shape_n: Ptr,
    shape_m: Ptr,
    phi_handle: Handle,
    phi_out: Ptr,
    free_handle: Handle,
    values: Values,
    lmax_handle: Handle,
    lmax_out: Ptr,
}

fuzz_target!(|input: Input| {
    let (n, m) = (input.n.get(4), input.m.get(6));
    let ty = input.dtype.ty();
    let mut c = Call::new("fep_lca_dict_new", input.values);
    let phi = c.buf(
        "phi",
        ty,
        Role::In,
        elems(&[n, m]),
        input.phi,
        Fill::Range(-1.0, 1.0),
    );
    let out = c.buf("out", Ty::Ptr, Role::Slot, Some(1), input.out, SENTINEL);
    c.work(elems(&[n, m, m]));
    if !c.alloc() {
        return;
    }
    if input.unit_columns.get() == 0 {
        if let Some(len) = c.len(phi) {
            let (n, m) = (n as usize, m as usize);
            if len == n * m {
                for j in 0..m {
                    let norm = (0..n)
                        .map(|i| c.get(phi, i * m + j).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    for i in 0..n {
                        let x = c.get(phi, i * m + j);
                        c.set(phi, i * m + j, if norm > 0.0 { x / norm } else { 1.0 });
                    }
                }
            }
        }
    }
    let (kind, ordinal) = input.device.get();
    let check = input.check_unit_norm.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, dtype {}, n {n}, m {m}, check_unit_norm {check}",
        input.dtype.code()
    ));
    c.ready();
    let status = unsafe {
        ffi::fep_lca_dict_new(
            kind,
            ordinal,
            std::ptr::null_mut(),
            input.dtype.code(),
            c.ptr(phi),
            n,
            m,
            check,
            c.ptr(out),
        )
    };
    c.check(status);
    let mut mem = HandleMem::default();
    let other = shared_model();
    if status != ffi::FEP_OK {
        // Garbage handles are refused by every entry point; free leaves them alone.
        let h = mem.ptr(
            input.free_handle,
            std::ptr::null_mut::<ffi::FepLcaDict>(),
            other,
        );
        unsafe { ffi::fep_lca_dict_free(h) };
        return;
    }
    let dict = unsafe { c.ptr::<*mut ffi::FepLcaDict>(out).read_unaligned() };
    assert!(!dict.is_null(), "FEP_OK with a NULL dictionary");

    // fep_lca_dict_shape
    let mut s = Call::new("fep_lca_dict_shape", input.values);
    let sn = s.buf("n", Ty::U64, Role::Slot, Some(1), input.shape_n, SENTINEL);
    let sm = s.buf("m", Ty::U64, Role::Slot, Some(1), input.shape_m, SENTINEL);
    assert!(s.alloc());
    let h = mem.ptr(input.shape_handle, dict, other);
    s.note(format!("dict {h:p} ({:?})", input.shape_handle));
    s.ready();
    let st = unsafe { ffi::fep_lca_dict_shape(h, s.ptr(sn), s.ptr(sm)) };
    s.check(st);
    // (n and m may be the same memory: then it holds m.)
    let same = s.ptr::<u64>(sn) == s.ptr::<u64>(sm);
    if st == ffi::FEP_OK && !s.ptr::<u64>(sn).is_null() && !same {
        assert_eq!(
            unsafe { s.ptr::<u64>(sn).read_unaligned() },
            n,
            "fep_lca_dict_shape: n"
        );
    }
    if st == ffi::FEP_OK && !s.ptr::<u64>(sm).is_null() {
        assert_eq!(
            unsafe { s.ptr::<u64>(sm).read_unaligned() },
            m,
            "fep_lca_dict_shape: m"
        );
    }

    // fep_lca_dict_phi
    let mut p = Call::new("fep_lca_dict_phi", input.values);
    let po = p.buf(
        "phi_out",
        Ty::F32,
        Role::Out,
        elems(&[n, m]),
        input.phi_out,
        SENTINEL,
    );
    assert!(p.alloc());
    let h = mem.ptr(input.phi_handle, dict, other);
    p.note(format!("dict {h:p} ({:?})", input.phi_handle));
    p.ready();
    let st = unsafe { ffi::fep_lca_dict_phi(h, std::ptr::null_mut(), p.ptr(po)) };
    p.check(st);
    if st == ffi::FEP_OK {
        for k in 0..(n * m) as usize {
            assert!(
                p.get(po, k).is_finite(),
                "fep_lca_dict_phi: element {k} is not finite"
            );
        }
    }

    // fep_lca_dict_lambda_max
    let mut l = Call::new("fep_lca_dict_lambda_max", input.values);
    let lo = l.buf(
        "out",
        Ty::F64,
        Role::Slot,
        Some(1),
        input.lmax_out,
        SENTINEL,
    );
    assert!(l.alloc());
    let h = mem.ptr(input.lmax_handle, dict, other);
    l.note(format!("dict {h:p} ({:?})", input.lmax_handle));
    l.ready();
    let st = unsafe { ffi::fep_lca_dict_lambda_max(h, l.ptr(lo)) };
    l.check(st);
    if st == ffi::FEP_OK {
        let v = unsafe { l.ptr::<f64>(lo).read_unaligned() };
        assert!(v.is_finite() && v >= 0.0, "fep_lca_dict_lambda_max: {v}");
    }

    // fep_lca_dict_free: the live handle, or garbage (left alone) and then the live one.
    let h = mem.ptr(input.free_handle, dict, other);
    unsafe { ffi::fep_lca_dict_free(h) };
    if h != dict {
        unsafe { ffi::fep_lca_dict_free(dict) };
    }
    unsafe { ffi::fep_lca_dict_free(std::ptr::null_mut()) };
    done();
});
