//! fep_attention_forward on the CPU: fuzzed params, dtype, shapes, strides and pointers.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    params: Nullable<AttnParams>,
    dtype: DType,
    shape: AttnShape,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    pi_head: Ptr,
    pi_key: Ptr,
    kv_len: Ptr,
    lse: Ptr,
    e: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let s = input.shape.get();
    let ty = input.dtype.ty();
    let mut c = Call::new("fep_attention_forward", input.values);
    let unit = Fill::Range(-1.0, 1.0);
    let mut q = AttnArg::new(
        &mut c,
        "q",
        &input.q,
        [s.b, s.hq, s.lq, s.d],
        ty,
        Role::In,
        unit,
    );
    let mut k = AttnArg::new(
        &mut c,
        "k",
        &input.k,
        [s.b, s.hkv, s.lk, s.d],
        ty,
        Role::In,
        unit,
    );
    let mut v = AttnArg::new(
        &mut c,
        "v",
        &input.v,
        [s.b, s.hkv, s.lk, s.dv],
        ty,
        Role::In,
        unit,
    );
    let mut o = AttnArg::new(
        &mut c,
        "o",
        &input.o,
        [s.b, s.hq, s.lq, s.dv],
        ty,
        Role::Out,
        SENTINEL,
    );
    // The other lengths follow from q's and k's shapes, as the C ABI documents.
    let [qb, qh, ql, _] = q.shape();
    let [kb, kh, kl, _] = k.shape();
    let rows = elems(&[qb, qh, ql]);
    let keys = elems(&[kb, kh, kl]);
    let pi_head = c.buf(
        "pi_head",
        Ty::F32,
        Role::In,
        elems(&[qh]),
        input.pi_head,
        Fill::Range(0.25, 2.0),
    );
    let pi_key = c.buf(
        "pi_key",
        Ty::F32,
        Role::In,
        keys,
        input.pi_key,
        Fill::Range(0.25, 2.0),
    );
    let lk = s.lk.min(1 << 20) as f64;
    let kv_len = c.buf(
        "kv_len",
        Ty::I32,
        Role::In,
        elems(&[qb]),
        input.kv_len,
        Fill::Range(0.0, lk),
    );
    let lse = c.buf("lse", Ty::F32, Role::Out, rows, input.lse, SENTINEL);
    let e = c.buf("e", Ty::F32, Role::Out, rows, input.e, SENTINEL);
    // Work: every (row, key) pair over the largest head dims any tensor claims.
    let dims = [&q, &k, &v, &o].map(|t| t.shape());
    let max = |i: usize| dims.iter().map(|d| d[i]).max().unwrap();
    let (b, h, l, d) = (max(0), max(1), max(2), max(3));
    c.work(elems(&[b, h, l, l, d, 2]));
    if !c.alloc() {
        return;
    }
    for t in [&mut q, &mut k, &mut v, &mut o] {
        t.bind(&c);
    }
    let params = input.params.as_ref().map(AttnParams::get);
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, dtype {}, params {params:?}",
        input.dtype.code()
    ));
    for (n, t) in [("q", &q), ("k", &k), ("v", &v), ("o", &o)] {
        c.note(format!(
            "{n}: {:?}{}",
            t.desc,
            if t.null {
                " (the description is NULL)"
            } else {
                ""
            }
        ));
    }
    c.ready();
    let status = unsafe {
        ffi::fep_attention_forward(
            kind,
            ordinal,
            std::ptr::null_mut(),
            pp,
            input.dtype.code(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            c.ptr(pi_head),
            c.ptr(pi_key),
            c.ptr(kv_len),
            o.as_ptr(),
            c.ptr(lse),
            c.ptr(e),
        )
    };
    c.check(status);
});
