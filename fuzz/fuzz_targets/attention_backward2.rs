//! fep_attention_backward2 (C ABI v3) on the CPU: as attention_backward (fuzzed params, dtype,
//! shapes, strides and pointers of the inputs and gradients), plus a fuzzed FepAttnScoreInputs
//! (see fuzz/src/score_inputs.rs), d_lse, dnu (`[Hq]` when nu_head reaches the library, else
//! `[1]`) and dbias (the bias shape's element count; given without a bias it must be refused).
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::score_inputs::*;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    params: Nullable<AttnParams>,
    dtype: DType,
    shape: AttnShape,
    inputs_at: StructPtr,
    inputs: ScoreInputs,
    /// None (NULL) first: dbias needs a bias. (Early in the input: the last fields of a short
    /// input decode from exhausted data, which gives None.)
    dbias: Option<Ptr>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    d_o: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    pi_head: Ptr,
    pi_key: Ptr,
    /// None (NULL) first: packed sequences refuse a kv_len.
    kv_len: Option<Ptr>,
    lse: Ptr,
    e: Ptr,
    d_e: Ptr,
    d_lse: Ptr,
    dpi_head: Ptr,
    dpi_key: Ptr,
    dnu: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let mut s = input.shape.get();
    if let Some((tq, tk)) = input.inputs.packed.and_then(|p| p.totals()) {
        (s.b, s.lq, s.lk) = (1, tq, tk);
    }
    let ty = input.dtype.ty();
    let mut c = Call::new("fep_attention_backward2", input.values);
    let unit = Fill::Range(-1.0, 1.0);
    let (qs, ks, vs, os) = (
        [s.b, s.hq, s.lq, s.d],
        [s.b, s.hkv, s.lk, s.d],
        [s.b, s.hkv, s.lk, s.dv],
        [s.b, s.hq, s.lq, s.dv],
    );
    let mut ts = [
        AttnArg::new(&mut c, "q", &input.q, qs, ty, Role::In, unit),
        AttnArg::new(&mut c, "k", &input.k, ks, ty, Role::In, unit),
        AttnArg::new(&mut c, "v", &input.v, vs, ty, Role::In, unit),
        AttnArg::new(&mut c, "o", &input.o, os, ty, Role::In, unit),
        AttnArg::new(&mut c, "d_o", &input.d_o, os, ty, Role::In, unit),
        AttnArg::new(&mut c, "dq", &input.dq, qs, ty, Role::Out, SENTINEL),
        AttnArg::new(&mut c, "dk", &input.dk, ks, ty, Role::Out, SENTINEL),
        AttnArg::new(&mut c, "dv", &input.dv, vs, ty, Role::Out, SENTINEL),
    ];
    // The other lengths follow from q's and k's shapes, as the C ABI documents.
    let [qb, qh, ql, _] = ts[0].shape();
    let [kb, kh, kl, _] = ts[1].shape();
    let rows = elems(&[qb, qh, ql]);
    let keys = elems(&[kb, kh, kl]);
    let heads = elems(&[qh]);
    let pos = Fill::Range(0.25, 2.0);
    let pi_head = c.buf("pi_head", Ty::F32, Role::In, heads, input.pi_head, pos);
    let pi_key = c.buf("pi_key", Ty::F32, Role::In, keys, input.pi_key, pos);
    let lk = s.lk.min(1 << 20) as f64;
    let kv_len = c.buf(
        "kv_len",
        Ty::I32,
        Role::In,
        elems(&[qb]),
        input.kv_len.unwrap_or(Ptr::Null),
        Fill::Range(0.0, lk),
    );
    let mut sc = ScoreArg::new(
        &mut c,
        &input.inputs,
        input.inputs_at,
        ScoreDims {
            full: [qb, qh, ql, kl],
        },
    );
    let lse = c.buf(
        "lse",
        Ty::F32,
        Role::In,
        rows,
        input.lse,
        Fill::Range(-2.0, 2.0),
    );
    let e = c.buf("e", Ty::F32, Role::In, rows, input.e, pos);
    let d_e = c.buf("d_e", Ty::F32, Role::In, rows, input.d_e, unit);
    let d_lse = c.buf("d_lse", Ty::F32, Role::In, rows, input.d_lse, unit);
    let dpi_head = c.buf(
        "dpi_head",
        Ty::F32,
        Role::Out,
        heads,
        input.dpi_head,
        SENTINEL,
    );
    let dpi_key = c.buf("dpi_key", Ty::F32, Role::Out, keys, input.dpi_key, SENTINEL);
    // dnu: [Hq] when the library sees nu_head (a non-NULL pointer in a given struct), else [1].
    // Where the harness cannot know yet (nu_head's claim too large: NULL), dnu's claim is as
    // large, so it is NULL too.
    let nu_given = !matches!(input.inputs_at, StructPtr::Null)
        && input.inputs.nu_head.is_some_and(|(p, _)| p != Ptr::Null);
    let dnu_len = if nu_given { heads } else { Some(1) };
    let dnu = c.buf("dnu", Ty::F32, Role::Out, dnu_len, input.dnu, SENTINEL);
    // dbias: the bias shape's element count (row-major); without a bias a few floats, which the
    // library must refuse to touch.
    let dbias_len = match &input.inputs.bias {
        Some(_) => elems(&sc.desc.bias_shape),
        None => Some(4),
    };
    let dbias = c.buf(
        "dbias",
        Ty::F32,
        Role::Out,
        dbias_len,
        input.dbias.unwrap_or(Ptr::Null),
        SENTINEL,
    );
    // Work: the forward and the backward, every (row, key) pair over the largest dims claimed.
    let dims = ts.each_ref().map(|t| t.shape());
    let max = |i: usize| dims.iter().map(|d| d[i]).max().unwrap();
    let (b, h, l, d) = (max(0), max(1), max(2), max(3));
    c.work(elems(&[b, h, l, l, d.max(1), 6]));
    if !c.alloc() {
        return;
    }
    for t in ts.iter_mut() {
        t.bind(&c);
    }
    sc.bind(&mut c);
    let params = input.params.as_ref().map(AttnParams::get);
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, dtype {}, params {params:?}",
        input.dtype.code()
    ));
    for (n, t) in ["q", "k", "v", "o", "d_o", "dq", "dk", "dv"]
        .iter()
        .zip(&ts)
    {
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
    c.note(sc.note());
    let inputs = sc.as_ptr();
    c.ready();
    let [q, k, v, o, d_o, dq, dk, dv] = ts.each_ref().map(|t| t.as_ptr());
    let status = unsafe {
        ffi::fep_attention_backward2(
            kind,
            ordinal,
            std::ptr::null_mut(),
            pp,
            input.dtype.code(),
            q,
            k,
            v,
            c.ptr(pi_head),
            c.ptr(pi_key),
            c.ptr(kv_len),
            inputs,
            o,
            c.ptr(lse),
            d_o,
            c.ptr(e),
            c.ptr(d_e),
            c.ptr(d_lse),
            dq,
            dk,
            dv,
            c.ptr(dpi_head),
            c.ptr(dpi_key),
            c.ptr(dnu),
            c.ptr(dbias),
        )
    };
    c.check(status);
});
