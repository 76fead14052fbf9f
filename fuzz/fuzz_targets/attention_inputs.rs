//! fep_attention_forward2 and fep_attention_probabilities (C ABI v3) on the CPU: as
//! attention_forward (fuzzed params, dtype, shapes, strides and pointers), plus a fuzzed
//! FepAttnScoreInputs (see fuzz/src/score_inputs.rs: the struct NULL / misaligned, nu_head, bias
//! and mask shapes, strides and values, packed sequences) and, for the probabilities, w and
//! w_len. With packed sequences q, k and v mostly take B = 1 and L = the packed totals.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::score_inputs::*;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Which {
    Forward,
    Probabilities,
}

/// w_len of fep_attention_probabilities.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum WLen {
    /// B Hq Lq Lk of q's and k's shapes.
    Exact,
    Less(u8),
    More(u8),
    Zero,
    Edge(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    which: Which,
    device: Device,
    params: Nullable<AttnParams>,
    dtype: DType,
    shape: AttnShape,
    inputs_at: StructPtr,
    inputs: ScoreInputs,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    pi_head: Ptr,
    pi_key: Ptr,
    /// None (NULL) first: packed sequences refuse a kv_len.
    kv_len: Option<Ptr>,
    lse: Ptr,
    e: Ptr,
    w: Ptr,
    w_len: WLen,
    values: Values,
}

fuzz_target!(|input: Input| {
    let mut s = input.shape.get();
    if let Some((tq, tk)) = input.inputs.packed.and_then(|p| p.totals()) {
        (s.b, s.lq, s.lk) = (1, tq, tk);
    }
    let ty = input.dtype.ty();
    let forward = matches!(input.which, Which::Forward);
    let what = if forward {
        "fep_attention_forward2"
    } else {
        "fep_attention_probabilities"
    };
    let mut c = Call::new(what, input.values);
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
    // o only reaches the forward (probabilities has no o).
    let mut o = forward.then(|| {
        AttnArg::new(
            &mut c,
            "o",
            &input.o,
            [s.b, s.hq, s.lq, s.dv],
            ty,
            Role::Out,
            SENTINEL,
        )
    });
    // The other lengths follow from q's and k's shapes, as the C ABI documents.
    let [qb, qh, ql, _] = q.shape();
    let [kb, kh, kl, _] = k.shape();
    let rows = elems(&[qb, qh, ql]);
    let keys = elems(&[kb, kh, kl]);
    let pos = Fill::Range(0.25, 2.0);
    let pi_head = c.buf("pi_head", Ty::F32, Role::In, elems(&[qh]), input.pi_head, pos);
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
    let (lse, e, w, w_len) = if forward {
        let lse = c.buf("lse", Ty::F32, Role::Out, rows, input.lse, SENTINEL);
        let e = c.buf("e", Ty::F32, Role::Out, rows, input.e, SENTINEL);
        (Some(lse), Some(e), None, 0)
    } else {
        let exact = elems(&[qb, qh, ql, kl]).map_or(u64::MAX, |x| x.min(u64::MAX as u128) as u64);
        let w_len = match input.w_len {
            WLen::Exact => exact,
            WLen::Less(x) => exact.saturating_sub(1 + x as u64 % 4),
            WLen::More(x) => exact.saturating_add(1 + x as u64 % 4),
            WLen::Zero => 0,
            WLen::Edge(i) => EDGES[i as usize % EDGES.len()],
        };
        // The caller's buffer holds w_len floats: what the library may write.
        let w = c.buf("w", Ty::F32, Role::Out, Some(w_len as u128), input.w, SENTINEL);
        (None, None, Some(w), w_len)
    };
    // Work: every (row, key) pair over the largest head dims any tensor claims.
    let mut dims = vec![q.shape(), k.shape(), v.shape()];
    if let Some(o) = &o {
        dims.push(o.shape());
    }
    let max = |i: usize| dims.iter().map(|d| d[i]).max().unwrap();
    let (b, h, l, d) = (max(0), max(1), max(2), max(3));
    c.work(elems(&[b, h, l, l, d.max(1), 2]));
    if !c.alloc() {
        return;
    }
    for t in [&mut q, &mut k, &mut v] {
        t.bind(&c);
    }
    if let Some(o) = &mut o {
        o.bind(&c);
    }
    sc.bind(&mut c);
    let params = input.params.as_ref().map(AttnParams::get);
    let pp = params.as_ref().map_or(std::ptr::null(), |p| p as *const _);
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, dtype {}, params {params:?}",
        input.dtype.code()
    ));
    let mut named = vec![("q", &q), ("k", &k), ("v", &v)];
    if let Some(o) = &o {
        named.push(("o", o));
    }
    for (n, t) in named {
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
    if !forward {
        c.note(format!("w_len {w_len}"));
    }
    let inputs = sc.as_ptr();
    c.ready();
    let status = unsafe {
        if let Some(o) = &o {
            ffi::fep_attention_forward2(
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
                inputs,
                o.as_ptr(),
                c.ptr(lse.unwrap()),
                c.ptr(e.unwrap()),
            )
        } else {
            ffi::fep_attention_probabilities(
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
                inputs,
                c.ptr(w.unwrap()),
                w_len,
            )
        }
    };
    c.check(status);
});
