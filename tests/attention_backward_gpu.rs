//! Attention backward on the GPU (or the emulated device) against the f64 reference
//! (`reference::backward`), on fresh random inputs rounded to the dtype: the GPU's own forward
//! gives o, lse and e, the reference recomputes them in f64. Gradients are compared by
//! ‖out − ref‖ / ‖ref‖ per output (DESIGN.md §6): f32 1e-4 (the scores' d² = ‖q‖² + ‖k‖² − 2q·k
//! and Δ = dO·o lose a few bits to cancellation before they are multiplied into every
//! gradient), f16/bf16 3e-2 (P and the coefficients M are rounded to the input type before the
//! products, as FlashAttention's backward does). Outputs are poisoned with NaN before each
//! launch (an unwritten element fails), and every case runs twice: the results must be bitwise
//! equal (determinism: no atomics).

mod common;

use common::attention::relayout;
use common::gpu::gpu;
use common::{rel_err, rng};
use fep_kernels::attention::{
    self, AttentionSpec, BackwardInputs, Gradients, Precisions, Score, Tensor4, Tensor4Mut,
    reference::{self, RefGradInputs, RefInputs},
};
use fep_kernels::{Device, DeviceBuffer, Element, bf16, f16};
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
    d_e: bool,
    normalizer: bool,
    /// q's rows D + 1 elements apart: no 16-byte loads (the kernels' element path).
    odd_stride: bool,
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
            d_e: true,
            normalizer: true,
            odd_stride: false,
            seed: 1,
        }
    }

    fn spec(&self) -> AttentionSpec {
        let mut s = AttentionSpec::new(self.score)
            .causal(self.causal)
            .normalizer(self.normalizer);
        if let Some(w) = self.window {
            s = s.window(w);
        }
        s
    }
}

fn tol<T: Element>() -> f64 {
    match T::DTYPE {
        fep_kernels::DType::F32 => 1e-4,
        _ => 3e-2,
    }
}

fn t4<T: Element>(buf: &DeviceBuffer<T>, s: [usize; 4], blhd: bool) -> Tensor4<'_, T> {
    if blhd {
        Tensor4::blhd(buf.view(), s)
    } else {
        Tensor4::bhld(buf.view(), s)
    }
}

fn t4m<T: Element>(buf: &mut DeviceBuffer<T>, s: [usize; 4], blhd: bool) -> Tensor4Mut<'_, T> {
    if blhd {
        Tensor4Mut::blhd(buf.view_mut(), s)
    } else {
        Tensor4Mut::bhld(buf.view_mut(), s)
    }
}

/// The gradients read back (BHLD, f64).
struct Got {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dpi_head: Vec<f32>,
    dpi_key: Vec<f32>,
    dnu: f32,
}

fn check_case<T: Element>(dev: &Device, c: &Case) {
    let mut r = rng(c.seed);
    let mut vals = |n: usize, s: f64| -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(s * r.random_range(-1.0..1.0)))
            .collect()
    };
    let (qs, ks, vs, os) = (
        [c.b, c.hq, c.lq, c.d],
        [c.b, c.hkv, c.lk, c.d],
        [c.b, c.hkv, c.lk, c.dv],
        [c.b, c.hq, c.lq, c.dv],
    );
    let q = vals(qs.iter().product(), 1.0);
    let k = vals(ks.iter().product(), 1.0);
    let v = vals(vs.iter().product(), 1.0);
    let d_o = vals(os.iter().product(), 1.0);
    let rows = c.b * c.hq * c.lq;
    let d_e: Vec<f32> = (0..rows).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let mut pis = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| 10f64.powf(r.random_range(-0.3..=0.3)) as f32)
            .collect()
    };
    let pi_head = c.pi_head.then(|| pis(c.hq));
    let pi_key = c.pi_key.then(|| pis(c.b * c.hkv * c.lk));
    let kv_len: Option<Vec<i32>> = c.kv_len.then(|| {
        (0..c.b)
            .map(|i| match i {
                0 => 0,
                _ if i == c.b - 1 => c.lk as i32,
                _ => 1 + (c.seed as i32 % c.lk as i32),
            })
            .collect()
    });

    // The reference on the same rounded values.
    let f64s = |v: &[T]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let f64f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (qf, kf, vf, dof) = (f64s(&q), f64s(&k), f64s(&v), f64s(&d_o));
    let ph = pi_head.as_deref().map(f64f);
    let pk = pi_key.as_deref().map(f64f);
    let def = f64f(&d_e);
    let spec = c.spec();
    let want = reference::backward(
        &spec,
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
            kv_len: kv_len.as_deref(),
            ..Default::default()
        },
        &RefGradInputs {
            d_o: &dof,
            d_e: c.d_e.then_some(&def[..]),
            ..Default::default()
        },
    )
    .unwrap();

    let lay = |data: &[T], s| {
        if c.blhd {
            relayout(data, s, true)
        } else {
            data.to_vec()
        }
    };
    // With odd_stride, q's BHLD rows sit D + 1 elements apart (the padding element is NaN).
    let qb = if c.odd_stride {
        let mut padded = vec![T::from_f64(f64::NAN); rows * (c.d + 1)];
        for (r, row) in q.chunks(c.d).enumerate() {
            padded[r * (c.d + 1)..][..c.d].copy_from_slice(row);
        }
        dev.upload(&padded).unwrap()
    } else {
        dev.upload(&lay(&q, qs)).unwrap()
    };
    let kb = dev.upload(&lay(&k, ks)).unwrap();
    let vb = dev.upload(&lay(&v, vs)).unwrap();
    let dob = dev.upload(&lay(&d_o, os)).unwrap();
    let deb = dev.upload(&d_e).unwrap();
    let phb = pi_head.as_ref().map(|p| dev.upload(p).unwrap());
    let pkb = pi_key.as_ref().map(|p| dev.upload(p).unwrap());
    let klb = kv_len.as_ref().map(|p| dev.upload(p).unwrap());
    let tq = if c.odd_stride {
        let row = c.d + 1;
        Tensor4 {
            data: qb.view(),
            shape: qs,
            strides: [c.hq * c.lq * row, c.lq * row, row],
        }
    } else {
        t4(&qb, qs, c.blhd)
    };
    let (tk, tv) = (t4(&kb, ks, c.blhd), t4(&vb, vs, c.blhd));
    let precision = Precisions {
        head: phb.as_ref().map(|p| p.view()),
        key: pkb.as_ref().map(|p| p.view()),
        ..Default::default()
    };
    let kvv = klb.as_ref().map(|p| p.view());
    let fwd = attention::forward(&spec, &tq, &tk, &tv, &precision, kvv.as_ref())
        .unwrap_or_else(|e| panic!("{c:?}: forward: {e}"));
    let inputs = BackwardInputs {
        o: Tensor4::bhld(fwd.o.view(), os),
        lse: fwd.lse.view(),
        d_o: t4(&dob, os, c.blhd),
        e: c.d_e.then(|| fwd.e.view()),
        d_e: c.d_e.then(|| deb.view()),
        d_lse: None,
    };

    let run = || -> Got {
        let nan = T::from_f64(f64::NAN);
        let mut dq = dev.upload(&vec![nan; rows * c.d]).unwrap();
        let mut dk = dev.upload(&vec![nan; c.b * c.hkv * c.lk * c.d]).unwrap();
        let mut dvb = dev.upload(&vec![nan; c.b * c.hkv * c.lk * c.dv]).unwrap();
        let mut dph = dev.upload(&vec![f32::NAN; c.hq]).unwrap();
        let mut dpk = dev.upload(&vec![f32::NAN; c.b * c.hkv * c.lk]).unwrap();
        let mut dnu = dev.upload(&[f32::NAN]).unwrap();
        attention::backward_into(
            &spec,
            &tq,
            &tk,
            &tv,
            &precision,
            kvv.as_ref(),
            &inputs,
            Gradients {
                dq: t4m(&mut dq, qs, c.blhd),
                dk: t4m(&mut dk, ks, c.blhd),
                dv: t4m(&mut dvb, vs, c.blhd),
                dpi_head: Some(dph.view_mut()),
                dpi_key: Some(dpk.view_mut()),
                dnu: Some(dnu.view_mut()),
                dbias: None,
            },
            dev.default_stream(),
        )
        .unwrap_or_else(|e| panic!("{c:?}: backward: {e}"));
        let back = |b: &DeviceBuffer<T>, s| -> Vec<f64> {
            let h = b.to_vec().unwrap();
            let h = if c.blhd { relayout(&h, s, false) } else { h };
            h.iter().map(|a| a.to_f64()).collect()
        };
        Got {
            dq: back(&dq, qs),
            dk: back(&dk, ks),
            dv: back(&dvb, vs),
            dpi_head: dph.to_vec().unwrap(),
            dpi_key: dpk.to_vec().unwrap(),
            dnu: dnu.to_vec().unwrap()[0],
        }
    };
    let g = run();
    let tol = tol::<T>();
    let name = T::DTYPE.suffix();
    for (what, got, want) in [
        ("dq", &g.dq, &want.dq),
        ("dk", &g.dk, &want.dk),
        ("dv", &g.dv, &want.dv),
    ] {
        let err = rel_err(got, want);
        eprintln!(
            "{name} {:?} d{} dv{}: {what} rel {err:.2e}",
            c.score, c.d, c.dv
        );
        assert!(err < tol, "{name} {c:?}: {what} rel err {err:e} ≥ {tol:e}");
    }
    // The precision gradients and dν are f32 sums in every dtype (no product rounds them to the
    // input type), so their bound does not follow the dtype's: 2e-4 and 1e-3 (f32 dq, dk, dv
    // reach 2e-5; dν sums every (i, j), and its rows' terms cancel: Σ_j dS_ij = 0).
    let pi_tol = if tol < 1e-3 { 2e-4 } else { 1e-3 };
    for (what, got, want) in [
        ("dpi_head", &g.dpi_head, &want.dpi_head),
        ("dpi_key", &g.dpi_key, &want.dpi_key),
    ] {
        let err = rel_err(got, want);
        eprintln!(
            "{name} {:?} d{} dv{}: {what} rel {err:.2e}",
            c.score, c.d, c.dv
        );
        assert!(
            err < pi_tol,
            "{name} {c:?}: {what} rel err {err:e} ≥ {pi_tol:e}"
        );
    }
    let nu_err = (g.dnu as f64 - want.dnu).abs() / want.dnu.abs().max(1e-3);
    eprintln!(
        "{name} {:?} d{} dv{}: dnu rel {nu_err:.2e}",
        c.score, c.d, c.dv
    );
    assert!(
        nu_err < 1e-3,
        "{name} {c:?}: dnu {} vs {} (rel {nu_err:e})",
        g.dnu,
        want.dnu
    );
    // Determinism: a second run gives the same bits.
    let g2 = run();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&g.dq) == bits(&g2.dq)
            && bits(&g.dk) == bits(&g2.dk)
            && bits(&g.dv) == bits(&g2.dv)
            && bits32(&g.dpi_head) == bits32(&g2.dpi_head)
            && bits32(&g.dpi_key) == bits32(&g2.dpi_key)
            && g.dnu.to_bits() == g2.dnu.to_bits(),
        "{name} {c:?}: two runs differ"
    );
}

/// Every family with shapes that together cover the masks, precision kinds, GQA 1 and 4, the
/// head-dim buckets (incl. the two-pass dk/dv of D + Dv > 256) and D ≠ Dv, both layouts.
fn cases() -> Vec<Case> {
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
        // No mask, per-head precision, D = Dv = 64, an odd length.
        let mut c = Case::new(score, 64, 64, 37, 45);
        (c.pi_head, c.seed) = (true, seed + 1);
        // Dot and Student-t read q through the element path.
        c.odd_stride = fi % 2 == 0;
        out.push(c);
        // Causal with Lq < Lk (a KV cache), GQA 4, D ≠ Dv, BLHD, per-key precision.
        let mut c = Case::new(score, 32, 64, 17, 70);
        (c.hq, c.hkv, c.causal, c.pi_key, c.blhd) = (4, 1, true, true, true);
        c.seed = seed + 2;
        out.push(c);
        // Window, both precisions, key lengths (one batch fully masked), no normaliser.
        let mut c = Case::new(score, 96, 32, 40, 40);
        (c.window, c.pi_head, c.pi_key, c.kv_len, c.normalizer) =
            (Some(9), true, true, true, false);
        (c.b, c.seed) = (3, seed + 3);
        out.push(c);
        // Causal with Lq > Lk (the first rows see nothing), D + Dv > 256 (two dk/dv passes), no
        // d_e, GQA 2.
        let mut c = Case::new(score, 128, 256, 20, 13);
        (c.hq, c.hkv, c.causal, c.pi_key, c.d_e) = (4, 2, true, true, false);
        c.seed = seed + 4;
        out.push(c);
    }
    out
}

#[test]
fn backward_matches_the_reference() {
    let Some(dev) = gpu("attention backward") else {
        return;
    };
    for c in cases() {
        check_case::<f32>(&dev, &c);
        check_case::<f16>(&dev, &c);
        check_case::<bf16>(&dev, &c);
    }
}

#[test]
fn f32_with_two_head_dims_of_256_is_unsupported_not_wrong() {
    let Some(dev) = gpu("attention backward") else {
        return;
    };
    if dev.kind() == fep_kernels::DeviceKind::Cpu {
        eprintln!("skipped on the CPU device: a GPU kernel limit (the CPU takes any head dims)");
        return;
    }
    let c = Case::new(Score::Dot, 256, 256, 3, 3);
    let q = dev.upload(&vec![0.5f32; 3 * 256 * 4]).unwrap();
    let s = [2, 2, 3, 256];
    let t = Tensor4::bhld(q.view(), s);
    let fwd = attention::forward(&c.spec(), &t, &t, &t, &Precisions::default(), None).unwrap();
    let inputs = BackwardInputs {
        o: Tensor4::bhld(fwd.o.view(), s),
        lse: fwd.lse.view(),
        d_o: Tensor4::bhld(fwd.o.view(), s),
        e: None,
        d_e: None,
        d_lse: None,
    };
    let err = attention::backward(&c.spec(), &t, &t, &t, &Precisions::default(), None, &inputs)
        .unwrap_err();
    assert!(matches!(err, fep_kernels::Error::Unsupported(_)), "{err}");
}
