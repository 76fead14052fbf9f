//! Attention backward on the GPU (or the emulated device) with the optional score inputs (issue
//! 23) against the f64 reference (`reference::backward`): d_lse (alone and with dO and d_e), an
//! additive bias of every broadcast shape with dβ (some entries −∞), a boolean mask with a fully
//! masked row, Student-t's ν per head with dν `[Hq]`, and packed variable-length sequences (one
//! empty) with causal and window masks and GQA; f32 and bf16, every family. o, lse and e come
//! from the f64 reference forward (rounded to the dtype and f32), so the test does not depend on
//! the GPU forward's support of these inputs. Bounds as in tests/attention_backward_gpu.rs:
//! ‖out − ref‖ / ‖ref‖ < 1e-4 (f32) / 3e-2 (bf16) for dq, dk, dv; the f32 sums dπ, dν and dβ
//! < 2e-4 (f32) / 1e-3 (bf16) relative to their norm. Outputs are poisoned with NaN, and every
//! case runs twice: every output, dβ included, must be bitwise equal (no atomics).

mod common;

use common::gpu::gpu;
use common::{rel_err, rng};
use fep_kernels::attention::{
    self, AttentionSpec, BackwardInputs, Gradients, Precisions, Score, ScoreBias, Tensor4,
    Tensor4Mut, Varlen,
    reference::{self, RefBroadcast, RefGradInputs, RefInputs, RefVarlen},
};
use fep_kernels::{Device, DeviceBuffer, Element, bf16};
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
    /// dO is zero and there is no d_e: the gradient flows through lse alone.
    lse_only: bool,
    d_lse: bool,
    d_e: bool,
    /// The bias's [B | 1, Hq | 1, Lq | 1] (Lk full).
    bias: Option<[usize; 3]>,
    /// A mask [B, 1, Lq, Lk] with row 1 of batch 0 fully masked.
    mask: bool,
    nu_head: bool,
    /// Key lengths [Lk − 6, 0] (B = 2: the second batch sees nothing).
    kv_len: bool,
    /// Packed sequences: (query length, key length) each.
    varlen: Option<Vec<(usize, usize)>>,
    seed: u64,
}

impl Case {
    fn new(score: Score, seed: u64) -> Self {
        Case {
            score,
            b: 2,
            hq: 2,
            hkv: 2,
            lq: 19,
            lk: 23,
            d: 32,
            dv: 32,
            causal: false,
            window: None,
            lse_only: false,
            d_lse: false,
            d_e: true,
            bias: None,
            mask: false,
            nu_head: false,
            kv_len: false,
            varlen: None,
            seed,
        }
    }

    fn spec(&self) -> AttentionSpec {
        let mut s = AttentionSpec::new(self.score).causal(self.causal);
        if let Some(w) = self.window {
            s = s.window(w);
        }
        s
    }
}

/// Everything read back, in f64.
struct Got {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dpi_head: Vec<f32>,
    dpi_key: Vec<f32>,
    dnu: Vec<f32>,
    dbias: Vec<f32>,
}

impl Got {
    fn bits(&self) -> Vec<u64> {
        let mut v: Vec<u64> = [&self.dq, &self.dk, &self.dv]
            .iter()
            .flat_map(|x| x.iter().map(|a| a.to_bits()))
            .collect();
        for x in [&self.dpi_head, &self.dpi_key, &self.dnu, &self.dbias] {
            v.extend(x.iter().map(|a| a.to_bits() as u64));
        }
        v
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

fn check_case<T: Element>(dev: &Device, c: &Case) {
    let mut r = rng(c.seed);
    // Packed: B = 1, Lq and Lk the totals.
    let (b, lq, lk) = match &c.varlen {
        Some(seqs) => (
            1,
            seqs.iter().map(|s| s.0).sum(),
            seqs.iter().map(|s| s.1).sum(),
        ),
        None => (c.b, c.lq, c.lk),
    };
    let (qs, ks, vs, os) = (
        [b, c.hq, lq, c.d],
        [b, c.hkv, lk, c.d],
        [b, c.hkv, lk, c.dv],
        [b, c.hq, lq, c.dv],
    );
    let mut vals = |n: usize, s: f64| -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(s * r.random_range(-1.0..1.0)))
            .collect()
    };
    let q = vals(qs.iter().product(), 1.0);
    let k = vals(ks.iter().product(), 1.0);
    let v = vals(vs.iter().product(), 1.0);
    let d_o = if c.lse_only {
        vec![T::from_f64(0.0); os.iter().product()]
    } else {
        vals(os.iter().product(), 1.0)
    };
    let rows = b * c.hq * lq;
    let d_e: Vec<f32> = (0..rows).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let d_lse: Vec<f32> = (0..rows).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let pi_head: Vec<f32> = (0..c.hq)
        .map(|_| 10f64.powf(r.random_range(-0.3..=0.3)) as f32)
        .collect();
    let pi_key: Vec<f32> = (0..b * c.hkv * lk)
        .map(|_| 10f64.powf(r.random_range(-0.3..=0.3)) as f32)
        .collect();
    let nu: Vec<f32> = (0..c.hq).map(|_| r.random_range(1.5f32..6.0)).collect();
    let bias_shape = c.bias.map(|[x, y, z]| [x, y, z, lk]);
    let bias: Option<Vec<f32>> = bias_shape.map(|s| {
        (0..s.iter().product::<usize>())
            .map(|i| {
                if i % 17 == 5 {
                    f32::NEG_INFINITY
                } else {
                    r.random_range(-2.0f32..2.0)
                }
            })
            .collect()
    });
    let mask_shape = [b, 1, lq, lk];
    let mask: Option<Vec<u8>> = c.mask.then(|| {
        (0..mask_shape.iter().product::<usize>())
            .map(|i| {
                let row = i / lk;
                u8::from(row != 1 && r.random_range(0..4) != 0)
            })
            .collect()
    });
    let (cu_q, cu_k): (Vec<i32>, Vec<i32>) = match &c.varlen {
        Some(seqs) => {
            let mut cq = vec![0i32];
            let mut ck = vec![0i32];
            for s in seqs {
                cq.push(cq.last().unwrap() + s.0 as i32);
                ck.push(ck.last().unwrap() + s.1 as i32);
            }
            (cq, ck)
        }
        None => (Vec::new(), Vec::new()),
    };

    let kv_len: Option<Vec<i32>> = c.kv_len.then(|| {
        (0..b)
            .map(|i| if i == 0 { lk as i32 - 6 } else { 0 })
            .collect()
    });
    // The reference on the same rounded values.
    let f64s = |v: &[T]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let f64f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (qf, kf, vf, dof) = (f64s(&q), f64s(&k), f64s(&v), f64s(&d_o));
    let (phf, pkf, nuf, def, dlf) = (
        f64f(&pi_head),
        f64f(&pi_key),
        f64f(&nu),
        f64f(&d_e),
        f64f(&d_lse),
    );
    let biasf = bias.as_deref().map(f64f);
    let maskb: Option<Vec<bool>> = mask.as_ref().map(|m| m.iter().map(|&x| x != 0).collect());
    let spec = c.spec();
    let rin = RefInputs {
        b,
        hq: c.hq,
        hkv: c.hkv,
        lq,
        lk,
        d: c.d,
        dv: c.dv,
        q: &qf,
        k: &kf,
        v: &vf,
        pi_head: Some(&phf),
        pi_key: Some(&pkf),
        kv_len: kv_len.as_deref(),
        nu_head: c.nu_head.then_some(&nuf[..]),
        bias: biasf.as_deref().map(|values| RefBroadcast {
            values,
            shape: bias_shape.unwrap(),
        }),
        mask: maskb.as_deref().map(|values| RefBroadcast {
            values,
            shape: mask_shape,
        }),
        varlen: c.varlen.as_ref().map(|_| RefVarlen {
            cu_q: &cu_q,
            cu_k: &cu_k,
        }),
    };
    let fwd = reference::forward(&spec, &rin).unwrap();
    let use_de = c.d_e && !c.lse_only;
    let use_dl = c.d_lse || c.lse_only;
    let want = reference::backward(
        &spec,
        &rin,
        &RefGradInputs {
            d_o: &dof,
            d_e: use_de.then_some(&def[..]),
            d_lse: use_dl.then_some(&dlf[..]),
        },
    )
    .unwrap();

    // The device inputs: packed tensors are [total, H, D] in memory (BLHD with B = 1).
    let packed = c.varlen.is_some();
    let lay = |data: &[T], s: [usize; 4]| -> Vec<T> {
        if packed {
            common::attention::relayout(data, s, true)
        } else {
            data.to_vec()
        }
    };
    let t4 = |buf, s| t4(buf, s, packed);
    let up = |x: &[T], s| dev.upload(&lay(x, s)).unwrap();
    let (qb, kb, vb, dob) = (up(&q, qs), up(&k, ks), up(&v, vs), up(&d_o, os));
    let o: Vec<T> = fwd.o.iter().map(|&x| T::from_f64(x)).collect();
    let ob = up(&o, os);
    let lseb = dev
        .upload(&fwd.lse.iter().map(|&x| x as f32).collect::<Vec<_>>())
        .unwrap();
    let eb = dev
        .upload(&fwd.e.iter().map(|&x| x as f32).collect::<Vec<_>>())
        .unwrap();
    let deb = dev.upload(&d_e).unwrap();
    let dlb = dev.upload(&d_lse).unwrap();
    let phb = dev.upload(&pi_head).unwrap();
    let pkb = dev.upload(&pi_key).unwrap();
    let nub = dev.upload(&nu).unwrap();
    let biasb = bias.as_ref().map(|x| dev.upload(x).unwrap());
    let maskbuf = mask.as_ref().map(|x| dev.upload(x).unwrap());
    let cuqb = packed.then(|| dev.upload(&cu_q).unwrap());
    let cukb = packed.then(|| dev.upload(&cu_k).unwrap());
    let klb = kv_len.as_ref().map(|x| dev.upload(x).unwrap());
    let kvv = klb.as_ref().map(|x| x.view());
    let (tq, tk, tv) = (t4(&qb, qs), t4(&kb, ks), t4(&vb, vs));
    let precision = Precisions {
        head: Some(phb.view()),
        key: Some(pkb.view()),
        nu: c.nu_head.then(|| nub.view()),
        bias: biasb
            .as_ref()
            .map(|x| ScoreBias::contiguous(x.view(), bias_shape.unwrap())),
        mask: maskbuf
            .as_ref()
            .map(|x| ScoreBias::contiguous(x.view(), mask_shape)),
        varlen: c.varlen.as_ref().map(|seqs| Varlen {
            cu_q: cuqb.as_ref().unwrap().view(),
            cu_k: cukb.as_ref().unwrap().view(),
            max_q: seqs.iter().map(|s| s.0).max().unwrap().max(1),
            max_k: seqs.iter().map(|s| s.1).max().unwrap().max(1),
        }),
    };
    let inputs = BackwardInputs {
        o: t4(&ob, os),
        lse: lseb.view(),
        d_o: t4(&dob, os),
        e: use_de.then(|| eb.view()),
        d_e: use_de.then(|| deb.view()),
        d_lse: use_dl.then(|| dlb.view()),
    };
    let nu_len = if c.nu_head { c.hq } else { 1 };
    let bias_len = bias.as_ref().map_or(0, |x| x.len());

    let run = || -> Got {
        let nan = T::from_f64(f64::NAN);
        let mut dq = dev.upload(&vec![nan; rows * c.d]).unwrap();
        let mut dk = dev.upload(&vec![nan; b * c.hkv * lk * c.d]).unwrap();
        let mut dvb = dev.upload(&vec![nan; b * c.hkv * lk * c.dv]).unwrap();
        let mut dph = dev.upload(&vec![f32::NAN; c.hq]).unwrap();
        let mut dpk = dev.upload(&vec![f32::NAN; b * c.hkv * lk]).unwrap();
        let mut dnu = dev.upload(&vec![f32::NAN; nu_len]).unwrap();
        let mut dbias = dev.upload(&vec![f32::NAN; bias_len.max(1)]).unwrap();
        let tm = |buf, s| t4m(buf, s, packed);
        attention::backward_into(
            &spec,
            &tq,
            &tk,
            &tv,
            &precision,
            kvv.as_ref(),
            &inputs,
            Gradients {
                dq: tm(&mut dq, qs),
                dk: tm(&mut dk, ks),
                dv: tm(&mut dvb, vs),
                dpi_head: Some(dph.view_mut()),
                dpi_key: Some(dpk.view_mut()),
                dnu: Some(dnu.view_mut()),
                dbias: (bias_len > 0).then(|| dbias.view_mut()),
            },
            dev.default_stream(),
        )
        .unwrap_or_else(|e| panic!("{c:?}: backward: {e}"));
        let back = |buf: &DeviceBuffer<T>, s| -> Vec<f64> {
            let h = buf.to_vec().unwrap();
            let h = if packed {
                common::attention::relayout(&h, s, false)
            } else {
                h
            };
            h.iter().map(|a| a.to_f64()).collect()
        };
        let mut db = dbias.to_vec().unwrap();
        db.truncate(bias_len);
        Got {
            dq: back(&dq, qs),
            dk: back(&dk, ks),
            dv: back(&dvb, vs),
            dpi_head: dph.to_vec().unwrap(),
            dpi_key: dpk.to_vec().unwrap(),
            dnu: dnu.to_vec().unwrap(),
            dbias: db,
        }
    };
    let g = run();
    let f32_dtype = T::DTYPE == fep_kernels::DType::F32;
    let (tol, sum_tol) = if f32_dtype {
        (1e-4, 2e-4)
    } else {
        (3e-2, 1e-3)
    };
    let name = T::DTYPE.suffix();
    let want_dnu = if c.nu_head {
        want.dnu_head.clone()
    } else {
        vec![want.dnu]
    };
    let checks: [(&str, f64, f64); 7] = [
        ("dq", rel_err(&g.dq, &want.dq), tol),
        ("dk", rel_err(&g.dk, &want.dk), tol),
        ("dv", rel_err(&g.dv, &want.dv), tol),
        ("dpi_head", rel_err(&g.dpi_head, &want.dpi_head), sum_tol),
        ("dpi_key", rel_err(&g.dpi_key, &want.dpi_key), sum_tol),
        ("dnu", abs_rel(&g.dnu, &want_dnu), sum_tol.max(1e-3)),
        ("dbias", abs_rel(&g.dbias, &want.dbias), sum_tol),
    ];
    for (what, err, bound) in checks {
        eprintln!("{name} {:?} {}: {what} rel {err:.2e}", c.score, c.seed);
        assert!(
            err < bound,
            "{name} {c:?}: {what} rel err {err:e} ≥ {bound:e}"
        );
    }
    // Determinism: a second run gives the same bits in every output.
    let g2 = run();
    assert!(g.bits() == g2.bits(), "{name} {c:?}: two runs differ");
}

/// ‖out − ref‖ / max(‖ref‖, 1e-3): NaN fails; an all-zero reference (dν of a non-Student-t
/// score, an empty output) must be met by zeros up to that floor.
fn abs_rel(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    num.sqrt() / den.sqrt().max(1e-3)
}

/// Per family: d_lse alone and with dO and d_e; each bias shape with dβ; a mask with a fully
/// masked row (with key lengths in half the families); per-head ν (Student-t); packed sequences (one empty) with causal and window, GQA.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let families = [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(3.0),
        Score::Laplace,
    ];
    for (fi, score) in families.into_iter().enumerate() {
        let seed = 1000 * (fi as u64 + 1);
        let mut c = Case::new(score, seed + 1);
        c.lse_only = true;
        out.push(c);
        let mut c = Case::new(score, seed + 2);
        (c.d_lse, c.causal, c.hq, c.hkv) = (true, true, 4, 2);
        out.push(c);
        for (n, shape) in [[2, 2, 1], [1, 2, 19], [1, 1, 19], [2, 2, 19]]
            .into_iter()
            .enumerate()
        {
            let mut c = Case::new(score, seed + 10 + n as u64);
            c.bias = Some(shape);
            // GQA and a window on some: the broadcast sums cross the group and the masks.
            if n == 1 {
                (c.hq, c.hkv) = (2, 1);
            }
            if n == 2 {
                (c.window, c.d_lse) = (Some(7), true);
            }
            out.push(c);
        }
        let mut c = Case::new(score, seed + 20);
        (c.mask, c.d_lse, c.d, c.dv, c.kv_len) = (true, true, 64, 32, fi % 2 == 0);
        c.bias = Some([2, 1, 1]);
        out.push(c);
        if matches!(score, Score::StudentT(_)) {
            let mut c = Case::new(score, seed + 30);
            (c.nu_head, c.hq, c.hkv) = (true, 4, 2);
            out.push(c);
        }
        for (n, causal, window) in [(0, true, None), (1, false, Some(5))] {
            let mut c = Case::new(score, seed + 40 + n);
            (c.causal, c.window, c.hq, c.hkv, c.d_lse) = (causal, window, 4, 2, true);
            c.varlen = Some(vec![(9, 13), (0, 6), (21, 17)]);
            c.nu_head = matches!(score, Score::StudentT(_));
            out.push(c);
        }
    }
    out
}

#[test]
fn backward_with_score_inputs_matches_the_reference() {
    let Some(dev) = gpu("attention backward with score inputs") else {
        return;
    };
    for c in cases() {
        check_case::<f32>(&dev, &c);
        check_case::<bf16>(&dev, &c);
    }
}
