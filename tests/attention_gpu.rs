//! Attention on the GPU (or the emulated device) against the f64 reference, on fresh random
//! inputs rounded to the dtype (the reference sees the same rounded values).
//!
//! Tolerances (DESIGN.md §6), by ‖out − ref‖ / ‖ref‖ per output: f32 1e-5 (the f32 path: three
//! tf32 products per tile on NVIDIA, f32 MFMA on AMD), f16 and bf16 1e-2 (p is rounded to the
//! input type before P·V, as FlashAttention does). lse is compared per row, |Δ| ≤ tol·max(1,
//! |lse|), and must be −∞ exactly where the reference's is. Outputs are poisoned with NaN before
//! each launch, so an unwritten element fails; NaN never passes.
//!
//! The case list covers every family × dtype, both precision kinds and both together, every
//! mask (causal bottom-right with Lq < Lk and Lq > Lk, window, per-batch key lengths incl. 0),
//! GQA 1/4/8, every head dim and D ≠ Dv, BHLD and BLHD, lengths 1, 17, 129 and 1000 (the long
//! ones only on a real GPU: the emulator runs each lane as a host thread).

mod common;

use common::attention::relayout;
use common::gpu::{gpu, is_emulated};
use common::{rel_err, rng};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, Tensor4, Tensor4Mut,
    reference::{self, RefInputs},
};
use fep_kernels::{Device, DeviceBuffer, Element, Error, bf16, f16};
use rand::Rng;

#[derive(Clone, Debug)]
struct Case {
    score: Score,
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    window: Option<u32>,
    kv_len: bool,
    pi_head: bool,
    pi_key: bool,
    blhd: bool,
    want_e: bool,
    normalizer: bool,
    /// Input scale (large d²) and precision range (log10 of the extremes).
    scale: f64,
    pi_log10: f64,
    seed: u64,
}

impl Case {
    fn new(score: Score, d: usize, dv: usize, lq: usize, lk: usize) -> Self {
        Case {
            score,
            b: 2,
            hq: 2,
            hkv: 2,
            lq,
            lk,
            d,
            dv,
            causal: false,
            window: None,
            kv_len: false,
            pi_head: false,
            pi_key: false,
            blhd: false,
            want_e: true,
            normalizer: true,
            scale: 1.0,
            pi_log10: 0.3,
            seed: 1,
        }
    }
}

/// Host inputs of a case, already rounded to T.
struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    pi_head: Option<Vec<f32>>,
    pi_key: Option<Vec<f32>>,
    kv_len: Option<Vec<i32>>,
}

fn shape_len(s: [usize; 4]) -> usize {
    s.iter().product()
}

fn inputs<T: Element>(c: &Case) -> Inputs<T> {
    let mut r = rng(c.seed);
    let mut vals = |n: usize, s: f64| -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(s * r.random_range(-1.0..1.0)))
            .collect()
    };
    let q = vals(c.b * c.hq * c.lq * c.d, c.scale);
    let k = vals(c.b * c.hkv * c.lk * c.d, c.scale);
    let v = vals(c.b * c.hkv * c.lk * c.dv, 1.0);
    let mut r = rng(c.seed ^ 0x5eed);
    let mut pis = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| 10f64.powf(r.random_range(-c.pi_log10..=c.pi_log10)) as f32)
            .collect()
    };
    let pi_head = c.pi_head.then(|| pis(c.hq));
    let pi_key = c.pi_key.then(|| pis(c.b * c.hkv * c.lk));
    // Key lengths: 0 for the first batch (every row fully masked), Lk for the last, random else.
    let kv_len = c.kv_len.then(|| {
        (0..c.b)
            .map(|i| match i {
                0 => 0,
                _ if i == c.b - 1 => c.lk as i32,
                _ => r.random_range(1..=c.lk as i32),
            })
            .collect()
    });
    Inputs {
        q,
        k,
        v,
        pi_head,
        pi_key,
        kv_len,
    }
}

fn spec(c: &Case) -> AttentionSpec {
    let mut s = AttentionSpec::new(c.score)
        .causal(c.causal)
        .normalizer(c.normalizer);
    if let Some(w) = c.window {
        s = s.window(w);
    }
    s
}

fn tol<T: Element>() -> f64 {
    match T::DTYPE {
        fep_kernels::DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Runs `c` on `dev` in T and holds o, lse and e against the reference.
fn check_case<T: Element>(dev: &Device, c: &Case) {
    let x = inputs::<T>(c);
    let f64s = |v: &[T]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let (qf, kf, vf) = (f64s(&x.q), f64s(&x.k), f64s(&x.v));
    let ph = x
        .pi_head
        .as_ref()
        .map(|p| p.iter().map(|&a| a as f64).collect::<Vec<_>>());
    let pk = x
        .pi_key
        .as_ref()
        .map(|p| p.iter().map(|&a| a as f64).collect::<Vec<_>>());
    let sp = spec(c);
    let want = reference::forward(
        &sp,
        &RefInputs {
            b: c.b,
            hq: c.hq,
            hkv: c.hkv,
            lq: c.lq,
            lk: c.lk,
            d: c.d,
            dv: c.dv,
            q: &qf,
            k: &kf,
            v: &vf,
            pi_head: ph.as_deref(),
            pi_key: pk.as_deref(),
            kv_len: x.kv_len.as_deref(),
            ..Default::default()
        },
    )
    .unwrap();

    let (qs, ks, vs, os) = (
        [c.b, c.hq, c.lq, c.d],
        [c.b, c.hkv, c.lk, c.d],
        [c.b, c.hkv, c.lk, c.dv],
        [c.b, c.hq, c.lq, c.dv],
    );
    let lay = |data: &[T], s| {
        if c.blhd {
            relayout(data, s, true)
        } else {
            data.to_vec()
        }
    };
    let q = dev.upload(&lay(&x.q, qs)).unwrap();
    let k = dev.upload(&lay(&x.k, ks)).unwrap();
    let v = dev.upload(&lay(&x.v, vs)).unwrap();
    let ph_d = x.pi_head.as_ref().map(|p| dev.upload(p).unwrap());
    let pk_d = x.pi_key.as_ref().map(|p| dev.upload(p).unwrap());
    let kl_d = x.kv_len.as_ref().map(|p| dev.upload(p).unwrap());
    let mut o: DeviceBuffer<T> = dev
        .upload(&vec![T::from_f64(f64::NAN); shape_len(os)])
        .unwrap();
    let rows = c.b * c.hq * c.lq;
    let mut lse = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let mut e = dev.upload(&vec![f32::NAN; rows]).unwrap();
    fn t4<'a, T: Element>(buf: &'a DeviceBuffer<T>, s: [usize; 4], blhd: bool) -> Tensor4<'a, T> {
        if blhd {
            Tensor4::blhd(buf.view(), s)
        } else {
            Tensor4::bhld(buf.view(), s)
        }
    }
    let (tq, tk, tv) = (t4(&q, qs, c.blhd), t4(&k, ks, c.blhd), t4(&v, vs, c.blhd));
    let precision = Precisions {
        head: ph_d.as_ref().map(|p| p.view()),
        key: pk_d.as_ref().map(|p| p.view()),
        ..Default::default()
    };
    let kv_view = kl_d.as_ref().map(|p| p.view());
    {
        let out = AttentionOutputs {
            o: if c.blhd {
                Tensor4Mut::blhd(o.view_mut(), os)
            } else {
                Tensor4Mut::bhld(o.view_mut(), os)
            },
            lse: Some(lse.view_mut()),
            e: if c.want_e { Some(e.view_mut()) } else { None },
        };
        attention::forward_into(
            &sp,
            &tq,
            &tk,
            &tv,
            &precision,
            kv_view.as_ref(),
            out,
            dev.default_stream(),
        )
        .unwrap_or_else(|err| panic!("{c:?}: {err}"));
    }
    let mut o_h = o.to_vec().unwrap();
    if c.blhd {
        o_h = relayout(&o_h, os, false);
    }
    let o_f: Vec<f64> = o_h.iter().map(|a| a.to_f64()).collect();
    let tol = tol::<T>();
    let err = rel_err(&o_f, &want.o);
    assert!(
        err < tol,
        "{} {c:?}: o rel err {err:e} ≥ {tol:e}",
        T::DTYPE.suffix()
    );

    let lse_h = lse.to_vec().unwrap();
    for (i, (&g, &w)) in lse_h.iter().zip(&want.lse).enumerate() {
        let ok = if w == f64::NEG_INFINITY {
            g == f32::NEG_INFINITY
        } else {
            (g as f64 - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(
            ok,
            "{} {c:?}: lse[{i}] = {g}, reference {w}",
            T::DTYPE.suffix()
        );
    }
    if c.want_e {
        let e_h = e.to_vec().unwrap();
        let err = rel_err(&e_h, &want.e);
        assert!(
            err < tol,
            "{} {c:?}: e rel err {err:e} ≥ {tol:e}",
            T::DTYPE.suffix()
        );
    }
}

fn check_all_dtypes(dev: &Device, c: &Case) {
    check_case::<f32>(dev, c);
    check_case::<f16>(dev, c);
    check_case::<bf16>(dev, c);
}

/// The case matrix: for every family, shapes that together cover the masks, precision kinds,
/// GQA ratios, head dims and layouts.
fn cases(full: bool) -> Vec<Case> {
    let mut out = Vec::new();
    for (fi, score) in [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(3.0),
        Score::Laplace,
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 * fi as u64;
        // No mask, square, one precision per head.
        let mut c = Case::new(score, 64, 64, 129, 129);
        c.pi_head = true;
        c.seed = seed + 1;
        out.push(c);
        // Causal with Lq < Lk (a KV cache), GQA 4, D ≠ Dv, BLHD, per-key precision.
        let mut c = Case::new(score, 128, 64, 17, 129);
        (c.hq, c.hkv, c.causal, c.pi_key, c.blhd) = (4, 1, true, true, true);
        c.seed = seed + 2;
        out.push(c);
        // Window, GQA 8, both precisions, key lengths (one batch fully masked).
        let mut c = Case::new(score, 32, 96, 129, 129);
        (c.hq, c.hkv, c.window, c.pi_head, c.pi_key, c.kv_len) = (8, 1, Some(33), true, true, true);
        c.b = 3;
        c.seed = seed + 3;
        out.push(c);
        // Causal with Lq > Lk (the first rows see nothing), D = Dv = 256, key lengths, no e.
        let mut c = Case::new(score, 256, 256, 33, 17);
        (c.causal, c.kv_len, c.want_e, c.hq, c.hkv) = (true, true, false, 1, 1);
        c.seed = seed + 4;
        out.push(c);
        // One query against many keys, D = 96, Dv = 32, normaliser off.
        let mut c = Case::new(score, 96, 32, 1, if full { 1000 } else { 200 });
        (c.pi_key, c.normalizer) = (true, false);
        c.seed = seed + 5;
        out.push(c);
        if full {
            let mut c = Case::new(score, 128, 128, 1000, 1000);
            (c.causal, c.pi_head, c.pi_key, c.kv_len) = (true, true, true, true);
            c.seed = seed + 6;
            out.push(c);
            let mut c = Case::new(score, 64, 128, 1000, 17);
            (c.hq, c.hkv) = (8, 2);
            c.seed = seed + 7;
            out.push(c);
        }
    }
    out
}

#[test]
fn forward_matches_reference() {
    let Some(dev) = gpu("forward_matches_reference") else {
        return;
    };
    for c in cases(!is_emulated(&dev)) {
        check_all_dtypes(&dev, &c);
    }
}

/// Precisions from 1e-6 to 1e6 and inputs scaled ×30 (d² in the tens of thousands): outputs
/// stay finite and match. With π up to 1e6 a score's f32 rounding is ~1e6 × 1e-7 × d², so the
/// softmax is decided by the largest score to within a few units: the bound is the 16-bit one.
#[test]
fn extreme_precisions_and_distances() {
    let Some(dev) = gpu("extreme_precisions_and_distances") else {
        return;
    };
    for score in Score::ALL {
        let mut c = Case::new(score, 64, 64, 33, 65);
        (c.pi_head, c.pi_key, c.pi_log10, c.seed) = (true, true, 3.0, 7);
        check_case::<f16>(&dev, &c);
        check_case::<bf16>(&dev, &c);
        let mut c = Case::new(score, 64, 64, 33, 65);
        (c.scale, c.seed) = (30.0, 8);
        check_case::<f16>(&dev, &c);
    }
}

fn upload<T: Element>(dev: &Device, n: usize) -> DeviceBuffer<T> {
    dev.upload(&vec![T::from_f64(0.25); n]).unwrap()
}

/// Bad input is named, and nothing is written (o stays poisoned).
#[test]
fn bad_input_is_rejected_on_the_device() {
    let Some(dev) = gpu("bad_input_is_rejected_on_the_device") else {
        return;
    };
    let (b, h, l, d) = (2, 2, 17, 64);
    let q = upload::<f16>(&dev, b * h * l * d);
    let k = upload::<f16>(&dev, b * h * l * d);
    let v = upload::<f16>(&dev, b * h * l * d);
    let s = [b, h, l, d];
    let run = |spec: &AttentionSpec,
               pk: Option<&DeviceBuffer<f32>>,
               kl: Option<&DeviceBuffer<i32>>,
               dsh: usize|
     -> (Result<(), Error>, Vec<f16>) {
        let shape = [b, h, l, dsh];
        let n = shape_len(shape);
        let (q2, k2, v2) = (
            upload::<f16>(&dev, n),
            upload::<f16>(&dev, n),
            upload::<f16>(&dev, n),
        );
        let (tq, tk, tv) = if dsh == d {
            (
                Tensor4::bhld(q.view(), s),
                Tensor4::bhld(k.view(), s),
                Tensor4::bhld(v.view(), s),
            )
        } else {
            (
                Tensor4::bhld(q2.view(), shape),
                Tensor4::bhld(k2.view(), shape),
                Tensor4::bhld(v2.view(), shape),
            )
        };
        let mut o = dev.upload(&vec![f16::NAN; n]).unwrap();
        let kv = kl.map(|x| x.view());
        let r = attention::forward_into(
            spec,
            &tq,
            &tk,
            &tv,
            &Precisions {
                head: None,
                key: pk.map(|x| x.view()),
                ..Default::default()
            },
            kv.as_ref(),
            AttentionOutputs {
                o: Tensor4Mut::bhld(o.view_mut(), shape),
                lse: None,
                e: None,
            },
            dev.default_stream(),
        );
        (r, o.to_vec().unwrap())
    };
    let untouched = |o: &[f16]| o.iter().all(|x| x.is_nan());
    let gauss = AttentionSpec::new(Score::Gaussian);

    // A non-positive precision, found by the device scan.
    let mut pk = vec![1.0f32; b * h * l];
    pk[29] = 0.0;
    let pk = dev.upload(&pk).unwrap();
    let (r, o) = run(&gauss, Some(&pk), None, d);
    let msg = r.expect_err("zero precision").to_string();
    assert!(
        msg.contains("precision.key") && msg.contains("element 29"),
        "{msg}"
    );
    assert!(untouched(&o));
    // A NaN precision.
    let mut pk = vec![1.0f32; b * h * l];
    pk[3] = f32::NAN;
    let pk = dev.upload(&pk).unwrap();
    let (r, o) = run(&gauss, Some(&pk), None, d);
    assert!(
        r.expect_err("NaN precision")
            .to_string()
            .contains("element 3")
    );
    assert!(untouched(&o));
    // A key length past Lk.
    let kl = dev.upload(&[3i32, l as i32 + 1]).unwrap();
    let (r, o) = run(&gauss, None, Some(&kl), d);
    let msg = r.expect_err("kv_len past Lk").to_string();
    // The CPU device (the fast path) names it as the reference does: kv_len[1].
    let cpu = dev.kind() == fep_kernels::DeviceKind::Cpu;
    assert!(
        msg.contains("kv_len") && (msg.contains("element 1") || cpu && msg.contains("kv_len[1]")),
        "{msg}"
    );
    assert!(untouched(&o));
    // Unchecked, the kernel clamps it (reads nothing out of bounds) and writes every output.
    // (GPU only: the CPU always checks the key lengths.)
    if !cpu {
        let (r, o) = run(&gauss.check_inputs(false), None, Some(&kl), d);
        r.unwrap();
        assert!(o.iter().all(|x| x.is_finite()));
    }
    // ν <= 0.
    let (r, o) = run(&AttentionSpec::new(Score::StudentT(0.0)), None, None, d);
    assert!(r.expect_err("nu = 0").to_string().contains("nu"));
    assert!(untouched(&o));
    // A head dim the kernels are not built for.
    // (GPU only: the CPU takes any head dim.)
    if !cpu {
        let (r, o) = run(&gauss, None, None, 48);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        assert!(untouched(&o));
    }
    // Mismatched heads.
    let q3 = upload::<f16>(&dev, b * 3 * l * d);
    let mut o = dev.upload(&vec![f16::NAN; b * 3 * l * d]).unwrap();
    let r = attention::forward_into(
        &gauss,
        &Tensor4::bhld(q3.view(), [b, 3, l, d]),
        &Tensor4::bhld(k.view(), s),
        &Tensor4::bhld(v.view(), s),
        &Precisions::default(),
        None,
        AttentionOutputs {
            o: Tensor4Mut::bhld(o.view_mut(), [b, 3, l, d]),
            lse: None,
            e: None,
        },
        dev.default_stream(),
    );
    assert!(r.expect_err("3 vs 2 heads").to_string().contains("divide"));
    assert!(untouched(&o.to_vec().unwrap()));
}

/// The PyTorch float64 fixtures (tests/fixtures/attention_torch.json) whose head dims the
/// kernels take, in f32 on the device: o (the stored rows), lse and e against PyTorch's values.
/// The inputs are rounded to f32 first, so the bound covers that rounding too: 1e-4 relative,
/// except for the `extreme` (π up to 1e6) and `large_d2` groups, whose scores move by π·d²·2^-24
/// per rounding; those are held to the f64 reference rerun on the rounded inputs instead, at the
/// same bound. (The emulator skips the 1000-key cases: minutes on host threads.)
#[test]
fn pytorch_fixtures_on_the_device() {
    let Some(dev) = gpu("pytorch_fixtures_on_the_device") else {
        return;
    };
    let fixture = common::load_fixture("attention_torch.json");
    let mut ran = 0;
    for c in fixture["cases"].as_array().unwrap() {
        let case = common::attention::load_case(c);
        if !attention::HEAD_DIMS.contains(&case.d) || !attention::HEAD_DIMS.contains(&case.dv) {
            continue;
        }
        if is_emulated(&dev) && case.lk.max(case.lq) > 200 {
            continue;
        }
        let group = c["group"].as_str().unwrap();
        let r32 = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (q, k, v) = (r32(&case.q), r32(&case.k), r32(&case.v));
        let ph = case.pi_head.as_deref().map(r32);
        let pk = case.pi_key.as_deref().map(r32);
        let up = |x: &[f32]| dev.upload(x).unwrap();
        let (qd, kd, vd) = (up(&q), up(&k), up(&v));
        let (phd, pkd) = (ph.as_deref().map(up), pk.as_deref().map(up));
        let kld = case.kv_len.as_ref().map(|x| dev.upload(x).unwrap());
        let os = [case.b, case.hq, case.lq, case.dv];
        let rows = case.b * case.hq * case.lq;
        let mut o = dev.upload(&vec![f32::NAN; shape_len(os)]).unwrap();
        let mut lse = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let mut e = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let kv = kld.as_ref().map(|x| x.view());
        attention::forward_into(
            &case.spec,
            &Tensor4::bhld(qd.view(), [case.b, case.hq, case.lq, case.d]),
            &Tensor4::bhld(kd.view(), [case.b, case.hkv, case.lk, case.d]),
            &Tensor4::bhld(vd.view(), [case.b, case.hkv, case.lk, case.dv]),
            &Precisions {
                head: phd.as_ref().map(|x| x.view()),
                key: pkd.as_ref().map(|x| x.view()),
                ..Default::default()
            },
            kv.as_ref(),
            AttentionOutputs {
                o: Tensor4Mut::bhld(o.view_mut(), os),
                lse: Some(lse.view_mut()),
                e: Some(e.view_mut()),
            },
            dev.default_stream(),
        )
        .unwrap_or_else(|err| panic!("{}: {err}", case.name));
        let (want_o, want_lse, want_e) = if matches!(group, "extreme" | "large_d2") {
            let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let (qf, kf, vf) = (f(&q), f(&k), f(&v));
            let (phf, pkf) = (ph.as_deref().map(f), pk.as_deref().map(f));
            let r = reference::forward(
                &case.spec,
                &RefInputs {
                    q: &qf,
                    k: &kf,
                    v: &vf,
                    pi_head: phf.as_deref(),
                    pi_key: pkf.as_deref(),
                    ..case.inputs()
                },
            )
            .unwrap();
            (case.sample_o(&r.o), r.lse, r.e)
        } else {
            (case.o.clone(), case.lse.clone(), case.e.clone())
        };
        let o_h: Vec<f64> = o.to_vec().unwrap().iter().map(|&x| x as f64).collect();
        let err_o = rel_err(&case.sample_o(&o_h), &want_o);
        let lse_h = lse.to_vec().unwrap();
        let lse_ok = lse_h.iter().zip(&want_lse).all(|(&g, &w)| {
            if w == f64::NEG_INFINITY {
                g == f32::NEG_INFINITY
            } else {
                (g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0)
            }
        });
        let err_e = rel_err(&e.to_vec().unwrap(), &want_e);
        assert!(
            err_o < 1e-4 && err_e < 1e-4 && lse_ok,
            "{} ({group}): o {err_o:e}, e {err_e:e}, lse within bound: {lse_ok}",
            case.name
        );
        ran += 1;
    }
    println!("{ran} fixture cases on {dev:?}");
    assert!(ran >= if is_emulated(&dev) { 40 } else { 96 }, "{ran}");
}
