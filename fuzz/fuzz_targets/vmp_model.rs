//! The VMP model handle: fep_vmp_model_new (a fuzzed description: sizes, dependencies, tensors,
//! optional parts, pointers; device; out pointer), then on success fep_vmp_model_info and
//! fep_vmp_model_counts (fuzzed handle, which, index, len and output pointers) and
//! fep_vmp_model_free; free of NULL and of garbage handles.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::vmp::{ModelFuzz, build};
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Len {
    Exact,
    Given(Dim),
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    model: Nullable<ModelFuzz>,
    out: Ptr,
    info_handle: Handle,
    info: [Ptr; 6],
    counts_handle: Handle,
    which: Code,
    index: Dim,
    len: Len,
    counts_out: Ptr,
    free_handle: Handle,
    values: Values,
}

fuzz_target!(|input: Input| {
    let mut c = Call::new("fep_vmp_model_new", input.values);
    let desc = match input.model.as_ref() {
        Some(m) => match build(&mut c, m) {
            Some(d) => Some(d),
            None => return,
        },
        None => {
            assert!(c.alloc());
            None
        }
    };
    let mut c2 = Call::new("fep_vmp_model_new: out", input.values);
    let out = c2.buf("out", Ty::Ptr, Role::Slot, Some(1), input.out, SENTINEL);
    assert!(c2.alloc());
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, out {:p}",
        c2.ptr::<u8>(out)
    ));
    c2.ready();
    c.ready();
    let dp = desc
        .as_ref()
        .map_or(std::ptr::null(), |d| &*d.desc as *const _);
    let status = unsafe { ffi::fep_vmp_model_new(kind, ordinal, dp, c2.ptr(out)) };
    c.check(status);
    c2.check(status);
    let mut mem = HandleMem::default();
    let other = shared_dict();
    if status != ffi::FEP_OK {
        let h = mem.ptr(
            input.free_handle,
            std::ptr::null_mut::<ffi::FepVmpModel>(),
            other,
        );
        unsafe { ffi::fep_vmp_model_free(h) };
        return;
    }
    let model = unsafe { c2.ptr::<*mut ffi::FepVmpModel>(out).read_unaligned() };
    assert!(!model.is_null(), "FEP_OK with a NULL model");
    let sz = &desc.as_ref().unwrap().sizes;

    // fep_vmp_model_info
    let mut i = Call::new("fep_vmp_model_info", input.values);
    let names = [
        "num_factors",
        "num_modalities",
        "belief_len",
        "obs_len",
        "num_policies",
        "policy_len",
    ];
    let ids: Vec<Id> = names
        .iter()
        .zip(input.info)
        .map(|(n, p)| i.buf(*n, Ty::U64, Role::Slot, Some(1), p, SENTINEL))
        .collect();
    assert!(i.alloc());
    let h = mem.ptr(input.info_handle, model, other);
    i.note(format!("model {h:p} ({:?})", input.info_handle));
    i.ready();
    let st = unsafe {
        ffi::fep_vmp_model_info(
            h,
            i.ptr(ids[0]),
            i.ptr(ids[1]),
            i.ptr(ids[2]),
            i.ptr(ids[3]),
            i.ptr(ids[4]),
            i.ptr(ids[5]),
        )
    };
    i.check(st);
    if st == ffi::FEP_OK {
        let want = [
            sz.f,
            sz.m,
            sz.belief_len(),
            sz.obs_len(),
            sz.p,
            if sz.p == 0 { 0 } else { sz.h },
        ];
        for k in 0..6 {
            // An output that is the same memory as a later one holds the later value.
            let shared = (k + 1..6).any(|j| i.ptr::<u8>(ids[j]) == i.ptr::<u8>(ids[k]));
            if !i.ptr::<u8>(ids[k]).is_null() && !shared {
                let got = unsafe { i.ptr::<u64>(ids[k]).read_unaligned() };
                assert_eq!(got, want[k], "fep_vmp_model_info: {}", names[k]);
            }
        }
    }

    // fep_vmp_model_counts
    let which = input.which.get(3);
    let index = input.index.get(3);
    let exact = match which {
        ffi::FEP_VMP_COUNTS_A if index < sz.m => sz.a_len(index as usize),
        ffi::FEP_VMP_COUNTS_B if index < sz.f => sz.b_len(index as usize),
        ffi::FEP_VMP_COUNTS_D if index < sz.f => Some(sz.s[index as usize] as u128),
        _ => Some(1),
    };
    let len = match input.len {
        Len::Exact => exact.unwrap_or(1) as u64,
        Len::Given(d) => d.get(8),
    };
    let mut k = Call::new("fep_vmp_model_counts", input.values);
    let co = k.buf(
        "out",
        Ty::F64,
        Role::Out,
        Some(len as u128),
        input.counts_out,
        SENTINEL,
    );
    if k.alloc() {
        let h = mem.ptr(input.counts_handle, model, other);
        k.note(format!(
            "model {h:p} ({:?}), which {which}, index {index}, len {len}",
            input.counts_handle
        ));
        k.ready();
        let st = unsafe {
            ffi::fep_vmp_model_counts(h, std::ptr::null_mut(), which, index, k.ptr(co), len)
        };
        k.check(st);
    }

    let h = mem.ptr(input.free_handle, model, other);
    unsafe { ffi::fep_vmp_model_free(h) };
    if h != model {
        unsafe { ffi::fep_vmp_model_free(model) };
    }
    unsafe { ffi::fep_vmp_model_free(std::ptr::null_mut()) };
    done();
});
