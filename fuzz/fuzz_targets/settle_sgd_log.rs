//! fep_settle_sgd_log on the CPU: up to three fuzzed precision tensors and their gradients
//! (lengths, pointers that may be NULL, misaligned or aliased), the pointer lists, the lengths
//! array and lr. On any error no precision changes; on success every one is finite and > 0.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    count: Count,
    lens: [Dim; 3],
    params: [Ptr; 3],
    grads: [Ptr; 3],
    params_list: Ptr,
    grads_list: Ptr,
    lens_list: Ptr,
    lr: Real,
    values: Values,
}

fuzz_target!(|input: Input| {
    let count = input.count.get(3);
    let n = count as usize;
    let lens: Vec<u64> = input.lens.iter().map(|d| d.get(64)).collect();
    let lr = input.lr.get_f32(0.0, 2.0);
    let mut c = Call::new("fep_settle_sgd_log", input.values);
    let mut pairs = Vec::new();
    for i in 0..n.min(3) {
        let len = elems(&[lens[i]]);
        let p = c.buf(
            format!("params[{i}]"),
            Ty::F32,
            Role::Param,
            len,
            input.params[i],
            Fill::Range(0.1, 4.0),
        );
        let g = c.buf(
            format!("grads[{i}]"),
            Ty::F32,
            Role::In,
            len,
            input.grads[i],
            Fill::Range(-2.0, 2.0),
        );
        pairs.push((p, g));
    }
    let count_claim = Some(n as u128);
    let plist = c.buf(
        "params",
        Ty::Ptr,
        Role::Desc,
        count_claim,
        input.params_list,
        Fill::Target,
    );
    let glist = c.buf(
        "grads",
        Ty::Ptr,
        Role::Desc,
        count_claim,
        input.grads_list,
        Fill::Target,
    );
    let llist = c.buf(
        "lens",
        Ty::U64,
        Role::Desc,
        count_claim,
        input.lens_list,
        Fill::Target,
    );
    c.work(Some(lens.iter().map(|&l| l as u128).sum::<u128>() * 4));
    if !c.alloc() {
        return;
    }
    for (i, &(p, g)) in pairs.iter().enumerate() {
        if c.len(plist).is_some_and(|k| i < k) {
            let ptr = c.ptr::<u8>(p);
            c.set_ptr(plist, i, ptr);
        }
        if c.len(glist).is_some_and(|k| i < k) {
            let ptr = c.ptr::<u8>(g);
            c.set_ptr(glist, i, ptr);
        }
        if c.len(llist).is_some_and(|k| i < k) {
            c.set_u64(llist, i, lens[i]);
        }
    }
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, count {count}, lens {lens:?}, lr {lr}"
    ));
    c.ready();
    let status = unsafe {
        ffi::fep_settle_sgd_log(
            kind,
            ordinal,
            std::ptr::null_mut(),
            count,
            c.ptr(plist),
            c.ptr(glist),
            c.ptr(llist),
            lr,
            std::ptr::null_mut(),
        )
    };
    c.check(status);
    if status == ffi::FEP_OK {
        for (i, &(p, _)) in pairs.iter().enumerate() {
            for k in 0..c.len(p).unwrap_or(0).min(lens[i] as usize) {
                let v = c.get(p, k);
                assert!(
                    v.is_finite() && v > 0.0,
                    "params[{i}][{k}] = {v} after FEP_OK"
                );
            }
        }
    }
});
