//! Attention decode (the keys split across blocks, merged by lse) and the public merge primitive.
//!
//! - The merge against the unsplit f64 reference: every row's visible keys cut into chunks (some
//!   empty), each chunk attended by the reference alone, the parts merged (f64 reference and the
//!   CPU device), then on the GPU against the CPU device on the same parts.
//! - Decode on the GPU (or the emulated device): Lq 1, 4, 16 against Lk 1, 300, 2000, every family
//!   and dtype, precision none/head/key/both, causal, window, per-batch key lengths incl. 0 and 1,
//!   GQA 4, automatic and forced splits (incl. more splits than key tiles), against the reference
//!   at DESIGN.md §6's bounds (f32 1e-5, f16/bf16 1e-2 relative; lse −∞ exactly where the
//!   reference's is). Outputs are poisoned with NaN first.
//! - Bad input: S = 0, wrong lengths, an e output without e parts, overlaps, key_splits = 0.
//!
//! The emulator runs each lane as a host thread: its cases are a subset (long caches of 1000 keys
//! for two families, none of the many-block ones), chosen to keep the file near a minute there.

mod common;

use common::gpu::{gpu, is_emulated};
use common::{rel_err, rng};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, MergeParts, Precisions, Score, Tensor4, Tensor4Mut,
    reference::{self, RefInputs},
};
use fep_kernels::{DType, Device, DeviceBuffer, Element, Error, bf16, f16};
use rand::Rng;

fn tol<T: Element>() -> f64 {
    match T::DTYPE {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// lse per row: −∞ exactly where the reference's is, else |Δ| ≤ tol·max(1, |ref|).
fn check_lse(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lse length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w == f64::NEG_INFINITY {
            g == f32::NEG_INFINITY
        } else {
            (g as f64 - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(ok, "{what}: lse[{i}] = {g}, reference {w}");
    }
}

/// A problem on the host in f64 (BHLD).
#[derive(Clone, Debug)]
struct Problem {
    spec: AttentionSpec,
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pi_head: Option<Vec<f64>>,
    pi_key: Option<Vec<f64>>,
    kv_len: Option<Vec<i32>>,
}

impl Problem {
    fn inputs(&self) -> RefInputs<'_> {
        RefInputs {
            b: self.b,
            hq: self.hq,
            hkv: self.hkv,
            lq: self.lq,
            lk: self.lk,
            d: self.d,
            dv: self.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            pi_head: self.pi_head.as_deref(),
            pi_key: self.pi_key.as_deref(),
            kv_len: self.kv_len.as_deref(),
            ..Default::default()
        }
    }
}

/// Options of a generated problem.
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
    /// Key lengths per batch (clamped to Lk), or none.
    kv_len: Option<Vec<i32>>,
    pi_head: bool,
    pi_key: bool,
    want_e: bool,
    key_splits: Option<u32>,
    seed: u64,
}

impl Case {
    fn new(score: Score, lq: usize, lk: usize) -> Case {
        Case {
            score,
            b: 2,
            hq: 4,
            hkv: 1,
            lq,
            lk,
            d: 64,
            dv: 64,
            causal: false,
            window: None,
            kv_len: None,
            pi_head: false,
            pi_key: false,
            want_e: true,
            key_splits: None,
            seed: 1,
        }
    }

    fn spec(&self) -> AttentionSpec {
        let mut s = AttentionSpec::new(self.score).causal(self.causal);
        if let Some(w) = self.window {
            s = s.window(w);
        }
        if let Some(n) = self.key_splits {
            s = s.key_splits(n);
        }
        s
    }

    /// Random inputs rounded to T (the reference sees the rounded values).
    fn problem<T: Element>(&self) -> Problem {
        let mut r = rng(self.seed);
        let mut vals = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| T::from_f64(r.random_range(-1.0..1.0)).to_f64())
                .collect()
        };
        let q = vals(self.b * self.hq * self.lq * self.d);
        let k = vals(self.b * self.hkv * self.lk * self.d);
        let v = vals(self.b * self.hkv * self.lk * self.dv);
        let mut pis = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| 10f64.powf(r.random_range(-0.3..0.3)) as f32 as f64)
                .collect()
        };
        let pi_head = self.pi_head.then(|| pis(self.hq));
        let pi_key = self.pi_key.then(|| pis(self.b * self.hkv * self.lk));
        Problem {
            spec: self.spec(),
            b: self.b,
            hq: self.hq,
            hkv: self.hkv,
            lq: self.lq,
            lk: self.lk,
            d: self.d,
            dv: self.dv,
            q,
            k,
            v,
            pi_head,
            pi_key,
            kv_len: self
                .kv_len
                .as_ref()
                .map(|l| l.iter().map(|&x| x.min(self.lk as i32)).collect::<Vec<_>>()),
        }
    }
}

/// The visible keys [lo, hi) of row i in batch b (the module docs' masks).
fn visible(p: &Problem, b: usize, i: usize) -> (usize, usize) {
    let diag = i as i64 + p.lk as i64 - p.lq as i64;
    let lo = p.spec.window.map_or(0, |w| (diag - w as i64 + 1).max(0));
    let mut hi = p.lk as i64;
    if p.spec.is_causal() {
        hi = hi.min(diag + 1);
    }
    if let Some(l) = &p.kv_len {
        hi = hi.min(l[b] as i64);
    }
    let hi = hi.max(0);
    (lo.min(hi) as usize, hi as usize)
}

/// The parts of `p` over the key chunks [bounds[c], bounds[c + 1]): each row's visible keys in
/// the chunk attended by the reference alone (one query, no mask); o `[S, rows, Dv]`, lse and e
/// `[S, rows]`.
fn chunk_parts(p: &Problem, bounds: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let s = bounds.len() - 1;
    let rows = p.b * p.hq * p.lq;
    let mut o = vec![0.0; s * rows * p.dv];
    let mut lse = vec![f64::NEG_INFINITY; s * rows];
    let mut e = vec![0.0; s * rows];
    let spec = AttentionSpec {
        causal: false,
        window: None,
        ..p.spec
    };
    let group = p.hq / p.hkv;
    for c in 0..s {
        for row in 0..rows {
            let (b, h, i) = (row / (p.hq * p.lq), row / p.lq % p.hq, row % p.lq);
            let (lo, hi) = visible(p, b, i);
            let (lo, hi) = (lo.max(bounds[c]), hi.min(bounds[c + 1]));
            if lo >= hi {
                continue;
            }
            let kv0 = (b * p.hkv + h / group) * p.lk;
            let n = hi - lo;
            let r = reference::forward(
                &spec,
                &RefInputs {
                    b: 1,
                    hq: 1,
                    hkv: 1,
                    lq: 1,
                    lk: n,
                    d: p.d,
                    dv: p.dv,
                    q: &p.q[row * p.d..][..p.d],
                    k: &p.k[(kv0 + lo) * p.d..][..n * p.d],
                    v: &p.v[(kv0 + lo) * p.dv..][..n * p.dv],
                    pi_head: p.pi_head.as_ref().map(|x| &x[h..h + 1]),
                    pi_key: p.pi_key.as_ref().map(|x| &x[kv0 + lo..kv0 + hi]),
                    kv_len: None,
                    ..Default::default()
                },
            )
            .unwrap();
            o[(c * rows + row) * p.dv..][..p.dv].copy_from_slice(&r.o);
            lse[c * rows + row] = r.lse[0];
            e[c * rows + row] = r.e[0];
        }
    }
    (o, lse, e)
}

fn merge_cases() -> Vec<(Case, Vec<usize>)> {
    let mut out = Vec::new();
    let mut c = Case::new(Score::Gaussian, 5, 37);
    (c.d, c.dv, c.hq, c.hkv, c.pi_key) = (8, 6, 4, 2, true);
    out.push((c.clone(), vec![0, 10, 10, 37, 37])); // empty chunks inside and at the end
    c.causal = true;
    c.kv_len = Some(vec![0, 20]); // batch 0: every row fully masked
    c.score = Score::StudentT(3.0);
    c.seed = 2;
    out.push((c.clone(), vec![0, 16, 32, 37]));
    c.window = Some(7);
    c.kv_len = Some(vec![1, 37]);
    c.score = Score::Dot;
    c.pi_head = true;
    c.seed = 3;
    out.push((c.clone(), vec![0, 1, 2, 30, 37]));
    let mut c = Case::new(Score::Laplace, 1, 9);
    (c.d, c.dv, c.b, c.hq, c.hkv) = (4, 3, 1, 1, 1);
    c.seed = 4;
    out.push((c, vec![0, 9])); // one part: the merge is the identity
    out
}

/// The f64 merge of chunked reference forwards is the unsplit reference, and so is the CPU
/// device's merge of f32 parts (into a BLHD output), with and without lse and e outputs.
#[test]
fn merge_matches_unsplit_reference() {
    let dev = Device::cpu();
    for (c, bounds) in merge_cases() {
        let p = c.problem::<f32>();
        let want = reference::forward(&p.spec, &p.inputs()).unwrap();
        let (o, lse, e) = chunk_parts(&p, &bounds);
        let s = bounds.len() - 1;
        let rows = p.b * p.hq * p.lq;
        let got = reference::merge(s, rows, p.dv, &o, &lse, Some(&e)).unwrap();
        assert!(rel_err(&got.o, &want.o) < 1e-12, "{c:?}: o");
        assert!(rel_err(&got.e, &want.e) < 1e-12, "{c:?}: e");
        check_lse(&format!("{c:?}"), &f32s(&got.lse), &want.lse, 1e-7);
        // Without e parts: e comes back empty.
        assert!(
            reference::merge(s, rows, p.dv, &o, &lse, None)
                .unwrap()
                .e
                .is_empty()
        );

        // The CPU device, f32 parts, o strided (BLHD), then lse and e left out.
        let (od, ld, ed) = (
            dev.upload(&f32s(&o)).unwrap(),
            dev.upload(&f32s(&lse)).unwrap(),
            dev.upload(&f32s(&e)).unwrap(),
        );
        let shape = [p.b, p.hq, p.lq, p.dv];
        let parts = MergeParts {
            o: od.view(),
            lse: ld.view(),
            e: Some(ed.view()),
            splits: s,
            shape,
        };
        let mut out = dev.upload(&vec![f32::NAN; rows * p.dv]).unwrap();
        let mut lse_out = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let mut e_out = dev.upload(&vec![f32::NAN; rows]).unwrap();
        attention::merge_into(
            &parts,
            AttentionOutputs {
                o: Tensor4Mut::blhd(out.view_mut(), shape),
                lse: Some(lse_out.view_mut()),
                e: Some(e_out.view_mut()),
            },
            dev.default_stream(),
        )
        .unwrap();
        let o_bhld = blhd_to_bhld(&out.to_vec().unwrap(), shape);
        assert!(rel_err(&o_bhld, &want.o) < 1e-6, "{c:?}: device o");
        assert!(rel_err(&e_out.to_vec().unwrap(), &want.e) < 1e-6);
        check_lse("cpu device", &lse_out.to_vec().unwrap(), &want.lse, 1e-6);
        let r = attention::merge(&MergeParts {
            e: None,
            ..parts.clone()
        })
        .unwrap();
        assert!(r.e.is_empty());
        assert!(rel_err(&r.o.to_vec().unwrap(), &want.o) < 1e-6);
    }
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&a| a as f32).collect()
}

fn blhd_to_bhld<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = x.to_vec();
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                let src = ((bi * l + li) * h + hi) * d;
                let dst = ((bi * h + hi) * l + li) * d;
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

/// Parts in T on `dev`, merged there, as host f64 (o, lse, e).
fn merge_on<T: Element>(
    dev: &Device,
    o: &[f64],
    lse: &[f64],
    e: &[f64],
    splits: usize,
    shape: [usize; 4],
) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
    let o: Vec<T> = o.iter().map(|&a| T::from_f64(a)).collect();
    let (od, ld, ed) = (
        dev.upload(&o).unwrap(),
        dev.upload(&f32s(lse)).unwrap(),
        dev.upload(&f32s(e)).unwrap(),
    );
    let rows = shape[0] * shape[1] * shape[2];
    let mut out: DeviceBuffer<T> = dev
        .upload(&vec![T::from_f64(f64::NAN); rows * shape[3]])
        .unwrap();
    let mut lo = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let mut eo = dev.upload(&vec![f32::NAN; rows]).unwrap();
    attention::merge_into(
        &MergeParts {
            o: od.view(),
            lse: ld.view(),
            e: Some(ed.view()),
            splits,
            shape,
        },
        AttentionOutputs {
            o: Tensor4Mut::bhld(out.view_mut(), shape),
            lse: Some(lo.view_mut()),
            e: Some(eo.view_mut()),
        },
        dev.default_stream(),
    )
    .unwrap();
    (
        out.to_vec().unwrap().iter().map(|a| a.to_f64()).collect(),
        lo.to_vec().unwrap(),
        eo.to_vec().unwrap(),
    )
}

fn merge_device_vs_cpu<T: Element>(dev: &Device) {
    for (c, bounds) in merge_cases() {
        let p = c.problem::<T>();
        let (mut o, lse, e) = chunk_parts(&p, &bounds);
        // A part with no visible key is never read: NaN there must not leak.
        let rows = p.b * p.hq * p.lq;
        for (i, &l) in lse.iter().enumerate() {
            if l == f64::NEG_INFINITY {
                o[i * p.dv..][..p.dv].fill(f64::NAN);
            }
        }
        let s = bounds.len() - 1;
        let shape = [p.b, p.hq, p.lq, p.dv];
        let want = merge_on::<T>(&Device::cpu(), &o, &lse, &e, s, shape);
        let got = merge_on::<T>(dev, &o, &lse, &e, s, shape);
        let what = format!("{} {c:?}", T::DTYPE.suffix());
        // The device accumulates in f32 and rounds once to T, as the CPU device does from f64.
        let t = if T::DTYPE == DType::F32 { 1e-6 } else { 1e-2 };
        assert!(rel_err(&got.0, &want.0) < t, "{what}: o");
        assert!(rel_err(&got.2, &want.2) < 1e-6, "{what}: e");
        let want_lse: Vec<f64> = want.1.iter().map(|&a| a as f64).collect();
        check_lse(&what, &got.1, &want_lse, 1e-6);
        assert_eq!(got.1.len(), rows);
    }
}

/// The merge kernel against the CPU device on the same parts, every dtype.
#[test]
fn merge_on_device_matches_cpu() {
    let Some(dev) = gpu("merge_on_device_matches_cpu") else {
        return;
    };
    merge_device_vs_cpu::<f32>(&dev);
    merge_device_vs_cpu::<f16>(&dev);
    merge_device_vs_cpu::<bf16>(&dev);
}

/// Runs `c` on `dev` in T with poisoned outputs and holds o, lse and e against the reference.
fn check_decode<T: Element>(dev: &Device, c: &Case) {
    let p = c.problem::<T>();
    let want = reference::forward(&p.spec, &p.inputs()).unwrap();
    let up_t = |x: &[f64]| {
        dev.upload(&x.iter().map(|&a| T::from_f64(a)).collect::<Vec<T>>())
            .unwrap()
    };
    let (q, k, v) = (up_t(&p.q), up_t(&p.k), up_t(&p.v));
    let ph = p.pi_head.as_ref().map(|x| dev.upload(&f32s(x)).unwrap());
    let pk = p.pi_key.as_ref().map(|x| dev.upload(&f32s(x)).unwrap());
    let kl = p.kv_len.as_ref().map(|x| dev.upload(x).unwrap());
    let rows = c.b * c.hq * c.lq;
    let os = [c.b, c.hq, c.lq, c.dv];
    let mut o: DeviceBuffer<T> = dev
        .upload(&vec![T::from_f64(f64::NAN); rows * c.dv])
        .unwrap();
    let mut lse = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let mut e = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let kv = kl.as_ref().map(|x| x.view());
    attention::forward_into(
        &p.spec,
        &Tensor4::bhld(q.view(), [c.b, c.hq, c.lq, c.d]),
        &Tensor4::bhld(k.view(), [c.b, c.hkv, c.lk, c.d]),
        &Tensor4::bhld(v.view(), [c.b, c.hkv, c.lk, c.dv]),
        &Precisions {
            head: ph.as_ref().map(|x| x.view()),
            key: pk.as_ref().map(|x| x.view()),
            ..Default::default()
        },
        kv.as_ref(),
        AttentionOutputs {
            o: Tensor4Mut::bhld(o.view_mut(), os),
            lse: Some(lse.view_mut()),
            e: c.want_e.then(|| e.view_mut()),
        },
        dev.default_stream(),
    )
    .unwrap_or_else(|err| panic!("{c:?}: {err}"));
    let what = format!("{} {c:?}", T::DTYPE.suffix());
    let tol = tol::<T>();
    let o_h: Vec<f64> = o.to_vec().unwrap().iter().map(|a| a.to_f64()).collect();
    let err = rel_err(&o_h, &want.o);
    assert!(err < tol, "{what}: o rel err {err:e}");
    check_lse(&what, &lse.to_vec().unwrap(), &want.lse, tol);
    let e_h = e.to_vec().unwrap();
    if c.want_e {
        let err = rel_err(&e_h, &want.e);
        assert!(err < tol, "{what}: e rel err {err:e}");
    } else {
        assert!(e_h.iter().all(|x| x.is_nan()), "{what}: e written unasked");
    }
}

fn check_all_dtypes(dev: &Device, c: &Case) {
    check_decode::<f32>(dev, c);
    check_decode::<f16>(dev, c);
    check_decode::<bf16>(dev, c);
}

/// Decode shapes: every family, Lq 1/4/16, the precision kinds in turn, masks in turn.
fn decode_cases(full: bool) -> Vec<Case> {
    let mut out = Vec::new();
    let families = [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(3.0),
        Score::Laplace,
    ];
    for (fi, &score) in families.iter().enumerate() {
        let seed = 10 * fi as u64;
        // Automatic split (few blocks: one batch, GQA 4), precision kind fi.
        let mut c = Case::new(score, [1, 4, 16, 1][fi], 300);
        (c.b, c.hq, c.hkv) = (1, 4, 1);
        (c.pi_head, c.pi_key) = (fi & 1 == 1, fi & 2 == 2);
        c.seed = seed + 1;
        out.push(c);
        // Causal KV cache with per-batch lengths 0, 1 and Lk, forced splits.
        let mut c = Case::new(score, [4, 16, 1, 4][fi], 300);
        (c.b, c.hq, c.hkv, c.causal) = (3, 2, 1, true);
        c.kv_len = Some(vec![0, 1, 300]);
        c.key_splits = Some(3);
        (c.pi_head, c.pi_key) = (fi & 2 == 2, fi & 1 == 1);
        c.seed = seed + 2;
        out.push(c);
        // A window whose edge falls inside a chunk, D ≠ Dv, no e.
        let mut c = Case::new(score, [16, 1, 4, 16][fi], 300);
        (c.d, c.dv, c.window, c.want_e) = (32, 96, Some(150), false);
        (c.b, c.hq, c.hkv) = (1, 2, 2);
        c.key_splits = Some(4);
        c.seed = seed + 3;
        out.push(c);
        // One key.
        let mut c = Case::new(score, 1, 1);
        (c.b, c.hq, c.hkv) = (1, 2, 1);
        c.seed = seed + 4;
        out.push(c);
    }
    // Long caches: every family with 2000 keys on a GPU, two with 1000 on the emulator.
    for (fi, &score) in families.iter().enumerate() {
        if !full && fi % 2 == 1 {
            continue;
        }
        let mut c = Case::new(score, [1, 16, 4, 1][fi], if full { 2000 } else { 1000 });
        (c.b, c.hq, c.hkv) = (1, 4, 1);
        (c.causal, c.pi_key) = (fi == 2, true);
        c.seed = 100 + fi as u64;
        out.push(c);
        if full {
            // Many blocks: the automatic rule may not split; Some(1) never does.
            let mut c = Case::new(score, 16, 2000);
            (c.b, c.hq, c.hkv, c.causal) = (4, 16, 4, true);
            c.kv_len = Some(vec![2000, 1, 1500, 0]);
            c.seed = 200 + fi as u64;
            out.push(c.clone());
            c.key_splits = Some(1);
            out.push(c);
        }
    }
    out
}

#[test]
fn decode_matches_reference() {
    let Some(dev) = gpu("decode_matches_reference") else {
        return;
    };
    let t = std::time::Instant::now();
    let cases = decode_cases(!is_emulated(&dev));
    for c in &cases {
        check_all_dtypes(&dev, c);
    }
    println!(
        "{} decode cases × 3 dtypes in {:?}",
        cases.len(),
        t.elapsed()
    );
}

/// Forced splits beyond the key tiles (empty chunks), Dv = 256 (the v1 kernel in every dtype),
/// and a split with more query rows than a decode (Lq 130: several row tiles × splits).
#[test]
fn forced_splits_with_empty_chunks() {
    let Some(dev) = gpu("forced_splits_with_empty_chunks") else {
        return;
    };
    let mut c = Case::new(Score::Gaussian, 4, 70);
    c.key_splits = Some(8); // chunks of one key tile: only the first two hold keys
    c.pi_key = true;
    check_all_dtypes(&dev, &c);
    let mut c = Case::new(Score::StudentT(2.0), 1, 1);
    c.key_splits = Some(3);
    check_all_dtypes(&dev, &c);
    let mut c = Case::new(Score::Laplace, 2, 129);
    (c.d, c.dv, c.b, c.hq) = (128, 256, 1, 2);
    (c.key_splits, c.causal) = (Some(5), true);
    check_all_dtypes(&dev, &c);
    let mut c = Case::new(Score::Dot, 130, 200);
    (c.key_splits, c.causal, c.pi_head) = (Some(3), true, true);
    c.kv_len = Some(vec![0, 150]);
    check_all_dtypes(&dev, &c);
}

/// Bad merge input on `dev` is named, and the outputs stay poisoned.
fn bad_merge_input(dev: &Device) {
    let (s, shape) = (2usize, [1usize, 2, 3, 4]);
    let rows = 6;
    let o = dev.upload(&vec![0.5f32; s * rows * 4]).unwrap();
    let lse = dev.upload(&vec![0.0f32; s * rows]).unwrap();
    let short = dev.upload(&vec![0.0f32; s * rows - 1]).unwrap();
    let mut out = dev.upload(&vec![f32::NAN; rows * 4]).unwrap();
    let mut e_out = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let mut run = |parts: MergeParts<'_, f32>, with_e: bool, want: &str| {
        let r = attention::merge_into(
            &parts,
            AttentionOutputs {
                o: Tensor4Mut::bhld(out.view_mut(), shape),
                lse: None,
                e: with_e.then(|| e_out.view_mut()),
            },
            dev.default_stream(),
        );
        let msg = r.expect_err(want).to_string();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(out.to_vec().unwrap().iter().all(|x| x.is_nan()), "{want}");
    };
    let good = MergeParts {
        o: o.view(),
        lse: lse.view(),
        e: None,
        splits: s,
        shape,
    };
    run(
        MergeParts {
            splits: 0,
            ..good.clone()
        },
        false,
        "splits",
    );
    run(
        MergeParts {
            lse: short.view(),
            ..good.clone()
        },
        false,
        "lse parts",
    );
    run(
        MergeParts {
            splits: 3,
            ..good.clone()
        },
        false,
        "o parts",
    );
    run(
        MergeParts {
            e: Some(short.view()),
            ..good.clone()
        },
        false,
        "e parts",
    );
    run(good.clone(), true, "needs e parts");
    run(
        MergeParts {
            shape: [1, 2, 3, 5],
            ..good.clone()
        },
        false,
        "o parts",
    );
    // An output over the parts.
    let mut both = dev.upload(&vec![0.0f32; s * rows * 4]).unwrap();
    let parts_view =
        unsafe { fep_kernels::View::<f32>::from_raw(dev, both.view().addr(), s * rows * 4) };
    let r = attention::merge_into(
        &MergeParts {
            o: parts_view,
            ..good.clone()
        },
        AttentionOutputs {
            o: Tensor4Mut::bhld(both.view_mut(), shape),
            lse: None,
            e: None,
        },
        dev.default_stream(),
    );
    assert!(r.expect_err("overlap").to_string().contains("overlaps"));
    // key_splits = 0 is refused before anything runs.
    let q = dev.upload(&vec![0.1f32; 64]).unwrap();
    let t = Tensor4::bhld(q.view(), [1, 1, 1, 64]);
    let r = attention::forward(
        &AttentionSpec::new(Score::Dot).key_splits(0),
        &t,
        &t,
        &t,
        &Precisions::default(),
        None,
    );
    assert!(matches!(r, Err(Error::InvalidArgument { ref name, .. }) if name == "key_splits"));
}

#[test]
fn bad_input_is_rejected() {
    bad_merge_input(&Device::cpu());
    match gpu("bad_input_is_rejected (device half)") {
        Some(dev) => bad_merge_input(&dev),
        None => println!("bad_input_is_rejected: CPU device only"),
    }
}
