//! Precision-weighted attention, the f64 CPU reference (DESIGN.md §4.1) against the PyTorch f64
//! fixtures (tests/fixtures/attention_torch.json, conventions in
//! tests/fixtures/ATTENTION-CONVENTIONS.md): the input generator bit for bit, every case at 1e-11,
//! the View API on `Device::reference()` in f32 and BLHD layout, and bad input.

// `!(err <= tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use std::sync::OnceLock;

use common::attention::{
    Case, TID_K, TID_KV_LEN, TID_PI_HEAD, TID_PI_KEY, TID_Q, TID_V, kv_len_raw, load_case,
    precision, raw_bits, stream_base, uniform_pm1,
};
use fep_kernels::attention::reference::{self, RefInputs};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, Tensor4, Tensor4Mut,
};
use fep_kernels::{Device, Error, View};
use serde_json::Value;

/// |x − ref| / max(1, |ref|), the conventions' metric (§7); −∞ must match exactly.
const TOL: f64 = 1e-11;

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| common::load_fixture("attention_torch.json"))
}

fn cases() -> &'static [Case] {
    static C: OnceLock<Vec<Case>> = OnceLock::new();
    C.get_or_init(|| {
        fixture()["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(load_case)
            .collect()
    })
}

fn case(name: &str) -> &'static Case {
    cases()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The worst scaled deviation; INFINITY on a length mismatch, a NaN, or a −∞ on one side only.
fn worst(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut w = 0.0f64;
    for (&g, &r) in got.iter().zip(want) {
        if r == f64::NEG_INFINITY || g == f64::NEG_INFINITY {
            if g != r {
                return f64::INFINITY;
            }
            continue;
        }
        let dev = (g - r).abs() / r.abs().max(1.0);
        if !(dev.is_finite()) {
            return f64::INFINITY;
        }
        w = w.max(dev);
    }
    w
}

fn hex(v: &Value) -> u64 {
    let s = v.as_str().expect("hex string");
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex")
}

/// The `values` of tensor `name` in `input_generator.check`, parsed from the JSON text with
/// `str::parse` (correctly rounded; serde_json's default float parser may be 1 ulp off, which a
/// bit-exact check must not depend on).
fn check_values_exact(name: &str) -> Vec<f64> {
    let path = common::fixture_path("attention_torch.json");
    let text = std::fs::read_to_string(path).unwrap();
    let check = text
        .find("\"check\":{\"case\"")
        .expect("input_generator.check");
    let key = format!("\"{name}\":{{\"tid\"");
    let at = check + text[check..].find(&key).expect("check tensor");
    let vals = at + text[at..].find("\"values\":[").unwrap() + "\"values\":[".len();
    let end = vals + text[vals..].find(']').unwrap();
    text[vals..end]
        .split(',')
        .map(|x| x.trim().parse::<f64>().expect("number"))
        .collect()
}

#[test]
fn generator_matches_the_fixture_check() {
    let check = &fixture()["input_generator"]["check"];
    let seed = check["seed"].as_u64().unwrap();
    let first = case(check["case"].as_str().unwrap());
    assert_eq!(first.seed, seed);
    let lk = first.lk;
    for (name, t) in check["tensors"].as_object().unwrap() {
        let tid = t["tid"].as_u64().unwrap();
        let want_tid = match name.as_str() {
            "q" => TID_Q,
            "k" => TID_K,
            "v" => TID_V,
            "pi_head" => TID_PI_HEAD,
            "pi_key" => TID_PI_KEY,
            "kv_len" => TID_KV_LEN,
            other => panic!("unknown tensor {other}"),
        };
        assert_eq!(tid, want_tid, "{name}: tid");
        assert_eq!(
            stream_base(seed, tid),
            hex(&t["stream_base"]),
            "{name}: stream_base"
        );
        let raw: Vec<u64> = t["raw_u64"].as_array().unwrap().iter().map(hex).collect();
        let ours = raw_bits(seed, tid, raw.len());
        assert_eq!(ours, raw, "{name}: raw outputs");
        let values = check_values_exact(name);
        assert_eq!(values.len(), t["values"].as_array().unwrap().len());
        for (i, (&bits, &want)) in ours.iter().zip(&values).enumerate() {
            match name.as_str() {
                "kv_len" => assert_eq!(kv_len_raw(bits, lk) as f64, want, "{name}[{i}]"),
                "pi_head" | "pi_key" => {
                    assert_eq!(precision(bits).to_bits(), want.to_bits(), "{name}[{i}]")
                }
                _ => assert_eq!(uniform_pm1(bits).to_bits(), want.to_bits(), "{name}[{i}]"),
            }
        }
        // The loaded case used the same streams (first elements, qk_scale = 1 there).
        let loaded = match name.as_str() {
            "q" => Some(&first.q),
            "k" => Some(&first.k),
            "v" => Some(&first.v),
            "pi_head" => first.pi_head.as_ref(),
            "pi_key" => first.pi_key.as_ref(),
            _ => None,
        };
        if let Some(l) = loaded {
            let n = values.len().min(l.len());
            for i in 0..n {
                assert_eq!(l[i].to_bits(), values[i].to_bits(), "{name}[{i}] as loaded");
            }
        }
    }
}

#[test]
fn every_case_matches_torch() {
    let all = cases();
    assert_eq!(all.len(), 145);
    let mut masked = 0;
    let (mut wo, mut wl, mut we) = (0.0f64, 0.0f64, 0.0f64);
    let mut worst_case = String::new();
    let mut failures = Vec::new();
    for c in all {
        let r =
            reference::forward(&c.spec, &c.inputs()).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let rows = c.b * c.hq * c.lq;
        assert_eq!(r.o.len(), rows * c.dv, "{}", c.name);
        assert_eq!(c.o.len(), c.b * c.hq * c.o_rows.len() * c.dv, "{}", c.name);
        let o = worst(&c.sample_o(&r.o), &c.o);
        let lse = worst(&r.lse, &c.lse);
        let e = worst(&r.e, &c.e);
        masked += r.lse.iter().filter(|x| **x == f64::NEG_INFINITY).count();
        let n_masked = r.lse.iter().filter(|x| **x == f64::NEG_INFINITY).count();
        if n_masked != c.fully_masked_rows {
            failures.push(format!(
                "{}: {n_masked} fully masked rows, expected {}",
                c.name, c.fully_masked_rows
            ));
        }
        assert!(r.o.iter().chain(&r.e).all(|x| x.is_finite()), "{}", c.name);
        let tol = TOL;
        let m = o.max(lse).max(e);
        if m > wo.max(wl).max(we) {
            worst_case = c.name.clone();
        }
        (wo, wl, we) = (wo.max(o), wl.max(lse), we.max(e));
        if !(m <= tol) {
            failures.push(format!("{}: o {o:.3e} lse {lse:.3e} e {e:.3e}", c.name));
        }
    }
    println!("worst over all cases: o {wo:.2e} lse {wl:.2e} e {we:.2e} ({worst_case})");
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
    assert_eq!(masked, 974, "fully masked rows over all cases");
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// BHLD `[B, H, L, D]` → BLHD memory.
fn to_blhd<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for li in 0..l {
            for hi in 0..h {
                out.extend_from_slice(&x[((bi * h + hi) * l + li) * d..][..d]);
            }
        }
    }
    out
}

fn from_blhd<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                out.extend_from_slice(&x[((bi * l + li) * h + hi) * d..][..d]);
            }
        }
    }
    out
}

/// One case through `forward_into` on `Device::reference()` in f32 (BLHD or BHLD); returns (o BHLD,
/// lse, e) widened.
fn run_views(c: &Case, blhd: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let qs = [c.b, c.hq, c.lq, c.d];
    let ks = [c.b, c.hkv, c.lk, c.d];
    let vs = [c.b, c.hkv, c.lk, c.dv];
    let os = [c.b, c.hq, c.lq, c.dv];
    let lay = |x: &[f64], s| {
        let x = f32s(x);
        if blhd { to_blhd(&x, s) } else { x }
    };
    let (q, k, v) = (lay(&c.q, qs), lay(&c.k, ks), lay(&c.v, vs));
    let ph = c.pi_head.as_deref().map(f32s);
    let pk = c.pi_key.as_deref().map(f32s);
    let rows = c.b * c.hq * c.lq;
    let mut o = vec![f32::NAN; rows * c.dv];
    let mut lse = vec![f32::NAN; rows];
    let mut e = vec![f32::NAN; rows];
    fn t4(x: &[f32], s: [usize; 4], blhd: bool) -> Tensor4<'_, f32> {
        if blhd {
            Tensor4::blhd(common::host(x), s)
        } else {
            Tensor4::bhld(common::host(x), s)
        }
    }
    let (tq, tk, tv) = (t4(&q, qs, blhd), t4(&k, ks, blhd), t4(&v, vs, blhd));
    let prec = Precisions {
        head: ph.as_deref().map(View::host),
        key: pk.as_deref().map(View::host),
        ..Default::default()
    };
    let kl = c.kv_len.as_deref().map(View::host);
    let to = if blhd {
        Tensor4Mut::blhd(common::host_mut(&mut o), os)
    } else {
        Tensor4Mut::bhld(common::host_mut(&mut o), os)
    };
    let out = AttentionOutputs {
        o: to,
        lse: Some(common::host_mut(&mut lse)),
        e: Some(common::host_mut(&mut e)),
    };
    let dev = Device::reference();
    attention::forward_into(
        &c.spec,
        &tq,
        &tk,
        &tv,
        &prec,
        kl.as_ref(),
        out,
        dev.default_stream(),
    )
    .unwrap_or_else(|err| panic!("{}: {err}", c.name));
    let o = if blhd { from_blhd(&o, os) } else { o };
    (widen(&o), widen(&lse), widen(&e))
}

#[test]
fn view_api_f32_bhld_and_blhd() {
    // f32 rounds each output once: 2 unit roundoffs of the f64 reference on the same f32 inputs.
    let tol32 = 2.0 * f32::EPSILON as f64 / 2.0 * 1.01;
    for name in [
        "first/gaussian/both/norm/causal_varlen",
        "mask/studentt/window_varlen",
        "mask/laplace/causal_lq_gt_lk",
        "gqa/dot/8x1",
        "headdim/laplace/256x32",
    ] {
        let Some(c) = cases().iter().find(|c| c.name.starts_with(name)) else {
            panic!("no case {name}");
        };
        // The reference on the f32-rounded inputs.
        let r32 = |x: &[f64]| widen(&f32s(x));
        let (q, k, v) = (r32(&c.q), r32(&c.k), r32(&c.v));
        let ph = c.pi_head.as_deref().map(r32);
        let pk = c.pi_key.as_deref().map(r32);
        let want = reference::forward(
            &c.spec,
            &RefInputs {
                q: &q,
                k: &k,
                v: &v,
                pi_head: ph.as_deref(),
                pi_key: pk.as_deref(),
                ..c.inputs()
            },
        )
        .unwrap();
        for blhd in [false, true] {
            let (o, lse, e) = run_views(c, blhd);
            let (wo, wl, we) = (
                worst(&o, &want.o),
                worst(&lse, &want.lse),
                worst(&e, &want.e),
            );
            // And against torch on the f64 inputs, loosely (f32 inputs move the scores).
            let (to, tl, te) = (
                worst(&c.sample_o(&o), &c.o),
                worst(&lse, &c.lse),
                worst(&e, &c.e),
            );
            println!(
                "{} {}: vs reference o {wo:.2e} lse {wl:.2e} e {we:.2e}; vs torch o {to:.2e} \
                 lse {tl:.2e} e {te:.2e}",
                c.name,
                if blhd { "BLHD" } else { "BHLD" }
            );
            assert!(wo <= tol32 && wl <= tol32 && we <= tol32, "{}", c.name);
            assert!(to <= 1e-4 && tl <= 1e-4 && te <= 1e-4, "{}", c.name);
        }
    }
}

/// A small valid problem for the error tests: B 2, Hq 4, Hkv 2, Lq 5, Lk 7, D 8, Dv 4.
struct Small {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ph: Vec<f32>,
    pk: Vec<f32>,
    kl: Vec<i32>,
}

const SB: usize = 2;
const SHQ: usize = 4;
const SHKV: usize = 2;
const SLQ: usize = 5;
const SLK: usize = 7;
const SD: usize = 8;
const SDV: usize = 4;

fn small() -> Small {
    let g = |tid, n| -> Vec<f32> {
        raw_bits(99, tid, n)
            .into_iter()
            .map(|x| uniform_pm1(x) as f32)
            .collect()
    };
    Small {
        q: g(1, SB * SHQ * SLQ * SD),
        k: g(2, SB * SHKV * SLK * SD),
        v: g(3, SB * SHKV * SLK * SDV),
        ph: vec![1.5; SHQ],
        pk: vec![0.5; SB * SHKV * SLK],
        kl: vec![7, 3],
    }
}

/// Runs forward_into with overrides; returns the error name (or None) and whether the poisoned
/// outputs stayed untouched.
#[allow(clippy::too_many_arguments)]
fn try_small(
    spec: AttentionSpec,
    s: &Small,
    qshape: [usize; 4],
    kshape: [usize; 4],
    vshape: [usize; 4],
    q_len: usize,
) -> (Option<String>, bool) {
    let os = [qshape[0], qshape[1], qshape[2], vshape[3]];
    let rows = os[0] * os[1] * os[2];
    let mut o = vec![f32::NAN; rows * os[3]];
    let mut lse = vec![f32::NAN; rows];
    let mut e = vec![f32::NAN; rows];
    let q = Tensor4::bhld(common::host(&s.q[..q_len]), qshape);
    let k = Tensor4::bhld(common::host(&s.k), kshape);
    let v = Tensor4::bhld(common::host(&s.v), vshape);
    let prec = Precisions {
        head: Some(common::host(&s.ph[..qshape[1].min(s.ph.len())])),
        key: Some(common::host(&s.pk)),
        ..Default::default()
    };
    let kl = common::host(&s.kl);
    let out = AttentionOutputs {
        o: Tensor4Mut::bhld(common::host_mut(&mut o), os),
        lse: Some(common::host_mut(&mut lse)),
        e: Some(common::host_mut(&mut e)),
    };
    let r = attention::forward_into(
        &spec,
        &q,
        &k,
        &v,
        &prec,
        Some(&kl),
        out,
        Device::reference().default_stream(),
    );
    let untouched = o.iter().chain(&lse).chain(&e).all(|x| x.is_nan());
    match r {
        Ok(()) => (None, untouched),
        Err(Error::InvalidArgument { name, reason }) => {
            println!("{name}: {reason}");
            (Some(name), untouched)
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn bad_input_is_rejected_before_any_write() {
    let s = small();
    let qs = [SB, SHQ, SLQ, SD];
    let ks = [SB, SHKV, SLK, SD];
    let vs = [SB, SHKV, SLK, SDV];
    let ql = s.q.len();
    let gauss = AttentionSpec::new(Score::Gaussian).causal(true);

    // The valid problem runs and writes everything.
    let (err, untouched) = try_small(gauss, &s, qs, ks, vs, ql);
    assert_eq!(err, None);
    assert!(!untouched);

    let expect = |got: (Option<String>, bool), name: &str| {
        assert_eq!(got.0.as_deref(), Some(name));
        assert!(got.1, "{name}: outputs were written");
    };
    // Hq % Hkv != 0: 3 query heads over 2 kv heads.
    let q3 = [SB, 3, SLQ, SD];
    expect(try_small(gauss, &s, q3, ks, vs, SB * 3 * SLQ * SD), "k");
    // k's head dim differs from q's.
    let k_short = [SB, SHKV, SLK, SD - 2];
    expect(try_small(gauss, &s, qs, k_short, vs, ql), "k");
    // A view too short for its shape and strides.
    expect(try_small(gauss, &s, qs, ks, vs, ql - 1), "q");
    // ν ≤ 0, window 0.
    expect(
        try_small(AttentionSpec::new(Score::StudentT(0.0)), &s, qs, ks, vs, ql),
        "nu",
    );
    expect(
        try_small(
            AttentionSpec::new(Score::StudentT(-1.0)),
            &s,
            qs,
            ks,
            vs,
            ql,
        ),
        "nu",
    );
    expect(try_small(gauss.window(0), &s, qs, ks, vs, ql), "window");

    // Non-positive or non-finite precisions.
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let mut t = small();
        t.ph[2] = bad;
        expect(try_small(gauss, &t, qs, ks, vs, ql), "precision.head");
        let mut t = small();
        t.pk[5] = bad;
        expect(try_small(gauss, &t, qs, ks, vs, ql), "precision.key");
    }
    // kv_len outside 0..=Lk.
    for bad in [SLK as i32 + 1, -1] {
        let mut t = small();
        t.kl[1] = bad;
        expect(try_small(gauss, &t, qs, ks, vs, ql), "kv_len");
    }

    // The reference on slices validates the same things.
    let c = case("first/gaussian/both/norm/causal_varlen");
    let name = |r: fep_kernels::Result<_>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let inp = c.inputs();
    assert_eq!(
        name(reference::forward(&c.spec, &RefInputs { hkv: 3, ..inp })),
        "k"
    );
    assert_eq!(
        name(reference::forward(
            &c.spec,
            &RefInputs {
                q: &c.q[1..],
                ..inp
            }
        )),
        "q"
    );
    let mut pk = c.pi_key.clone().unwrap();
    pk[3] = -0.5;
    assert_eq!(
        name(reference::forward(
            &c.spec,
            &RefInputs {
                pi_key: Some(&pk),
                ..inp
            }
        )),
        "precision.key"
    );
    let kl = [20, 24, 21];
    assert_eq!(
        name(reference::forward(
            &c.spec,
            &RefInputs {
                kv_len: Some(&kl),
                ..inp
            }
        )),
        "kv_len"
    );
}
