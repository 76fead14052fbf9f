//! Precision-weighted attention (DESIGN.md §4.1; forward: issue 5): criterion benchmarks of the
//! forward, the backward, decode and the score inputs. `FEP_BENCH_OPS` (forward, backward, decode,
//! inputs; default all)
//! picks the parts, `FEP_BENCH_DTYPES` (bf16, f16, f32) the dtypes, `FEP_BENCH_QUICK=1` the
//! GPU suite's subsets (benches/common).
//!
//! # Forward
//!
//! Groups are named `{backend}_attention_{family}_{causal|full}_{dtype}` (family: dot,
//! gaussian, studentt, laplace); the benchmark id gives D, L (= Lq = Lk), B and Hq
//! (`D64_L4096_B4_H32`). One iteration is one `forward_into` call, synchronised, inputs not
//! re-checked (`check_inputs(false)`), writing o (BHLD, the input dtype) and lse (f32), not e.
//!
//! GPU configurations (every combination, 192 in all): dtype bf16 and f16; D = Dv = 64 and 128;
//! Hq = Hkv = 2048 / D (32 or 16 heads, Hq·D = 2048); B·L = 16k tokens (B = 16384 / L);
//! L ∈ {512, 1k, 2k, 4k, 8k, 16k}; causal (bottom-right aligned; Lq = Lk so also top-left) and
//! full; families
//! - Dot (τ = 1/√D, no precision),
//! - Gaussian with per-head precision π_h `[Hq]` (τ = 1),
//! - StudentT(ν = 5) with per-key precision π_j `[B, Hkv, Lk]` (τ = 1, normaliser on),
//! - Laplace with per-key precision (τ = 1, normaliser on).
//!
//! Inputs: q, k, v uniform in (−1, 1), precisions uniform in (0.5, 2) (fixed seeds). Since
//! B·L·Hq·D = 16k·2048 for every configuration, one q, k, v (64 MiB each in bf16/f16, more than
//! L2) per dtype serves every D and L; they are not rotated.
//!
//! FLOP convention (FlashAttention's, DESIGN §7): forward FLOPs = 4·B·Hq·Lq·Lk·D (the two
//! matrix products, 2 FLOP per multiply-add), halved when causal; the score's own arithmetic
//! (norms, log/exp/sqrt) is not counted. Criterion's throughput is set to these FLOPs, so its
//! "elem/s" is FLOP/s; TFLOP/s is printed after each benchmark. Here 4·B·Hq·L²·D = 4·16384·2048·L
//! = 1.342e8·L: 68.7 GFLOP at L = 512, 550 GFLOP at 4k, 2.20 TFLOP at 16k (half when causal).
//!
//! Byte floor (minimal DRAM traffic): read q, k and v once and write o and lse:
//! el·(B·Hq·Lq·D + 2·B·Hkv·Lk·D + B·Hq·Lq·Dv) + 4·B·Hq·Lq, plus the precisions read once (4·Hq,
//! or 4·B·Hkv·Lk). For every configuration here that is 4·33.55 M·el = 268.4 MB (bf16/f16) plus
//! lse 2.10 MB (D = 64) or 1.05 MB (D = 128), plus 2.10 / 1.05 MB of per-key precision for
//! Student-t and Laplace: about 80 µs at 3.35 TB/s. The arithmetic intensity is ≈ L/2 FLOP
//! per byte (L/4 causal), so every configuration is compute-bound on an H100 (dense bf16 ridge
//! ≈ 989 TFLOP/s / 3.35 TB/s ≈ 295 FLOP/B) except L = 512 (causal: L ≤ 1k), which sits near
//! the ridge.
//!
//! Special-function floor (printed with each configuration): one exp per visible score for Dot
//! and Gaussian, a log and an exp for Student-t, a sqrt and an exp for Laplace; visible scores =
//! FLOPs / (4·D). On an H100 SXM the MUFU units give 16 results/clk/SM (132 SMs, 1.83 GHz:
//! ≈ 3.9e12/s), which bounds the rate at 4·D·3.9e12 / (transcendentals per score) FLOP/s:
//! ≈ 1000 (D = 64) / 2000 (D = 128) TFLOP/s for one per score, half that for two, unless part
//! of them run as polynomials on the FMA units.
//!
//! Issue 5's targets on an H100 (printed, not checked): Dot ≥ 350 TFLOP/s non-causal at L ≥ 4k;
//! Gaussian (per-head π) within 10% of Dot; Student-t ≥ 60% of Dot; every family at least as
//! fast as FlexAttention with the same score (benches/peers/attention.py).
//!
//! # Backward
//!
//! Groups `{backend}_attention_bwd_{family}_{causal|full}[_{learnpi|fixedpi}]_{dtype}`, ids as
//! the forward's. One iteration is one `backward_into` call, synchronised: dq, dk, dv (and with
//! `learnpi` the family's precision gradient: dπ_h `[Hq]` for Gaussian, dπ_j `[B, Hkv, Lk]` for
//! Student-t and Laplace; `fixedpi` asks for none of them; Dot has no precision, so no suffix)
//! from q, k, v, the forward's o and lse (computed once per family and mask, not timed) and
//! dO uniform in (−1, 1); no e, dE or dν. Note that dπ_j is always computed: the key-major kernel
//! accumulates it for every key whether or not it is asked for, and only its store (4 bytes per
//! key) is skipped, so `fixedpi` and `learnpi` should time alike for Student-t and Laplace; dπ_h
//! (Gaussian `learnpi`) adds the ordered reduction of the query-major kernel's partial sums.
//!
//! Shapes as the forward's: bf16 and f16, D = 64 and 128, Hq = Hkv = 2048 / D, B·L = 16k tokens,
//! L ∈ {1k, 4k, 16k}, causal and full, the four families with the forward's precisions: 168
//! configurations (2 dtypes × 2 D × 3 L × 2 masks × 7 family variants). Quick (the GPU suite):
//! D = 128, L = 4k, both masks (14 per dtype).
//!
//! FLOPs (FlashAttention's convention, DESIGN §7): 2.5 × the forward's 4·B·Hq·Lq·Lk·D, halved
//! when causal (the five L×L×D products dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·dO, dP = dO·vᵀ and the
//! recomputed s = q·kᵀ); the throughput is set to these. The kernels (src/attention/
//! gpu_backward.rs) run two passes without atomics, a query-major one (q·kᵀ, dO·vᵀ, dS·k) and a
//! key-major one (q·kᵀ, dO·vᵀ, Pᵀ·dO, dSᵀ·q): 3.5 × the forward's FLOPs executed, printed beside
//! the convention's. Byte floor: q, k, v, o, dO read and dq, dk, dv written once,
//! 8·el·B·H·L·D, plus lse (4·B·Hq·Lq), the precision read and (learnpi) its gradient written:
//! 537 MB for every configuration here in bf16/f16, ≈ 160 µs at 3.35 TB/s; the arithmetic
//! intensity is ≈ 1.25·L/2 FLOP/B (half causal), compute-bound at every L here. Special
//! functions per visible score and pass (the formulas' minimum): one exp (Dot, Gaussian), exp,
//! log1p and a reciprocal (Student-t), exp, sqrt and a reciprocal (Laplace), two passes.
//! No issue sets a backward target; the peer is FlexAttention's backward with the same
//! score_mod (benches/peers/attention.py --op backward).
//!
//! # Decode
//!
//! Groups `{backend}_attention_decode_{family}_{dtype}`, and (full runs on a GPU) Dot with the
//! keys unsplit, `{backend}_attention_decode_dot_nosplit_{dtype}` (`key_splits(1)`), to show what
//! the split gains; ids `Lq1_Lk65536_B4_Hq32_Hkv8_D128`. One iteration is one `forward_into`
//! call, synchronised, writing o only: Lq query rows per head against a KV cache of Lk keys with
//! per-batch cache lengths (`kv_len`: Lk, 7/8·Lk, 6/8·Lk, 5/8·Lk for batches 0-3), causal
//! (bottom-right), the families' precisions as above; the automatic key split (None), which the
//! GPU takes for Lq ≤ 16 when (batch, head, row tile) blocks cannot fill the device.
//!
//! Shapes: Hq = 32 over Hkv = 8 (GQA 4), D = Dv = 128, Lq = 1 and 16, Lk = 4k, 64k, 256k with
//! B = 1 and 4, and Lk = 1M with B = 1 (B·Lk ≤ 1M tokens: 2 GiB of bf16 keys and as much of
//! values); bf16 and f16. Quick (the GPU suite): Lk = 64k (B 1, 4) and 1M, Lq 1 and 16.
//!
//! Throughput in bytes: the KV cache read, Hkv·Σ_b len_b·(D + Dv)·sizeof (= B·Hkv·Lk·(D + Dv)·
//! sizeof where every batch holds Lk keys), reported as GB/s against the HBM floors
//! `HBM_H100_BYTES_PER_S` (3.35 TB/s) and `HBM_H200_BYTES_PER_S` (4.8 TB/s). q, o and the
//! precisions add < 1% (printed). FLOPs 4·Hq·Lq·Σ len·D: 2·(Hq/Hkv)·Lq/sizeof FLOP/B (D = Dv),
//! 4 (Lq = 1) to 64 (Lq = 16) in bf16 at GQA 4, under the ≈ 295 FLOP/B ridge of an H100 (≈ 206
//! on an H200): decode is bound by the cache read. Caches under
//! 256 MB (Lk = 4k) are rotated over copies, one per call, so no call is served from L2.
//!
//! # Score inputs (issue 23): bias, mask, packed sequences
//!
//! `FEP_BENCH_OPS=inputs`. Groups `{backend}_attention_inputs_{family}_{variant}_{dtype}`, per
//! family, full (non-causal) unless said, the family's precision as the forward's, no precision
//! gradient asked:
//! - `fwd`: the plain forward (o and lse), the baseline of the ratios below;
//! - `fwd_keybias`: with a per-key bias β `[B, H, 1, L]` (f32, uniform in (−1, 1));
//! - `fwd_padmask`: with a boolean padding mask `[B, 1, 1, L]` (u8; batch b keeps its first
//!   L·(7 − b mod 4)/8 keys; FLOPs counted as the unmasked call's);
//! - `bwd`: the plain backward (dq, dk, dv from the plain forward's o and lse);
//! - `bwd_fullbias`: with a full bias `[1, H, L, L]` (f32) and its gradient dβ written;
//! - `fwd_varlen_causal`, `bwd_varlen_causal`: the B·L tokens packed as 8 sequences of random
//!   lengths (fixed seed; q, k, v `[1, H, B·L, D]`), causal per sequence; id
//!   `D{D}_T{tokens}_S8_H{H}`, FLOPs by the convention per sequence (4·H·L_s²·D, halved).
//!
//! After `fwd_keybias` the ratio per-key-bias forward / plain forward is printed, after
//! `bwd_fullbias` full-bias backward / plain backward (and after `fwd_padmask` its own): issue
//! 23's targets on an H100/H200 are ≤ 1.05 and ≤ 1.5, and every variant faster than
//! FlexAttention with the same score (benches/peers/attention.py --op inputs); printed as
//! reminders, never checked. Byte floors add the bias read (4·B·H·L for the per-key bias), the
//! mask read (B·L) and, for the full bias, its read and dβ's write (2·4·H·L² bytes: 2.15 GB at
//! H = 16, L = 4k, 0.64 ms at 3.35 TB/s).
//!
//! Shapes (GPU, bf16): D = 128 and 64, Hq = Hkv = 2048 / D, B·L = 16k tokens, L 1k and 4k (a full
//! bias at L = 16k would be 17 GB), all four families; quick (the GPU suite): D = 128, L = 4k,
//! Dot and Student-t (14 groups). CPU smoke: the forward's shape (B = 1, H = 2, L = 64, D = 32,
//! f32), Dot only (7 groups). Until the GPU kernels take these inputs a GPU call returns
//! `Error::Unsupported` and the group prints SKIPPED.
//!
//! # Everywhere
//!
//! A GPU backend whose call returns an error (an `Error::Unsupported` limit, or kernels not built)
//! prints `SKIPPED` with the reason, once per group, and goes on. The CPU backend (the fast path,
//! issue 24) runs f32: forward and backward of every family at B = 16, H = 2, L = 128, D = 32
//! (issue 24's shape) and, unless quick, B = 2, H = 4, L = 512, D = 64 and B = 1, H = 4,
//! L = 1024, D = 64; decode at B = 2, Hq = 4, Hkv = 2, Lq = 1 and 16, Lk = 256, D = 32; the
//! score inputs at B = 1, H = 2, L = 64, D = 32, Dot only. The peers on the same shapes and
//! thread counts: benches/peers/*.py --device cpu.
//! `FEP_BENCH_QUICK=1` shortens the runs and, on a GPU, measures the quick subsets (forward:
//! L ∈ {1k, 4k, 16k}).
mod common;

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, BackwardInputs, Gradients, Precisions, Score, Tensor4,
    Tensor4Mut,
};
use fep_kernels::{Device, DeviceBuffer, Element, bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// H100 SXM5 (80 GB HBM3) peak DRAM bandwidth, NVIDIA's datasheet figure: the floor of the
/// "time at the DRAM floor" figures and of the decode group's "% of HBM".
const HBM_H100_BYTES_PER_S: f64 = 3.35e12;
/// H200 SXM (141 GB HBM3e) peak DRAM bandwidth, NVIDIA's datasheet figure (the suite's GPU).
const HBM_H200_BYTES_PER_S: f64 = 4.8e12;
/// The floor the forward and backward groups print (an H100's, as issue 5's targets are).
const HBM_BYTES_PER_S: f64 = HBM_H100_BYTES_PER_S;
/// H100 SXM special-function results per second (16/clk/SM, 132 SMs, 1.83 GHz).
const MUFU_PER_S: f64 = 16.0 * 132.0 * 1.83e9;
/// B·L, and Hq·D, of every GPU configuration.
const TOKENS: usize = 16 * 1024;
const MODEL_DIM: usize = 2048;
const GPU_DIMS: [usize; 2] = [64, 128];
const GPU_LENGTHS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];
const QUICK_LENGTHS: [usize; 3] = [1024, 4096, 16384];
/// Backward: D 64 and 128 (GPU_DIMS), L 1k, 4k, 16k; quick (the GPU suite): D = 128, L = 4k.
const BWD_LENGTHS: [usize; 3] = [1024, 4096, 16384];
const BWD_QUICK_DIMS: [usize; 1] = [128];
const BWD_QUICK_LENGTHS: [usize; 1] = [4096];
/// Score inputs (bias, mask, packed sequences): D 64 and 128 (GPU_DIMS), L 1k and 4k; quick:
/// D = 128, L = 4k.
const INPUTS_LENGTHS: [usize; 2] = [1024, 4096];
const INPUTS_QUICK_DIMS: [usize; 1] = [128];
const INPUTS_QUICK_LENGTHS: [usize; 1] = [4096];
/// Decode (see `decode_shapes`).
const DECODE_HQ: usize = 32;
const DECODE_HKV: usize = 8;
const DECODE_D: usize = 128;
const DECODE_LQ: [usize; 2] = [1, 16];
const DECODE_LK: [usize; 4] = [4096, 65536, 262144, 1 << 20];
const DECODE_QUICK_LK: [usize; 2] = [65536, 1 << 20];
/// B·Lk of the largest decode cache.
const DECODE_MAX_TOKENS: usize = 1 << 20;
/// A decode cache (k and v) smaller than this is rotated over copies, one per call, so that
/// calls read DRAM rather than the 50 MB L2 of an H100/H200.
const L2_ROTATE_BYTES: f64 = 256e6;

/// The family's name in group names, and its transcendentals per score.
fn family(score: Score) -> (&'static str, f64) {
    match score {
        Score::Dot => ("dot", 1.0),
        Score::Gaussian => ("gaussian", 1.0),
        Score::StudentT(_) => ("studentt", 2.0),
        Score::Laplace => ("laplace", 2.0),
    }
}

/// Which precision a family is benchmarked with.
#[derive(Clone, Copy, PartialEq)]
enum Prec {
    None,
    Head,
    Key,
}

fn precision_kind(score: Score) -> Prec {
    match score {
        Score::Dot => Prec::None,
        Score::Gaussian => Prec::Head,
        Score::StudentT(_) | Score::Laplace => Prec::Key,
    }
}

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    l: usize,
    d: usize,
}

impl Shape {
    fn id(&self) -> String {
        format!("D{}_L{}_B{}_H{}", self.d, self.l, self.b, self.h)
    }
}

struct Floor {
    flops: f64,
    bytes: f64,
    transcendentals: f64,
    text: String,
}

fn human_secs(t: f64) -> String {
    if t >= 1e-3 {
        format!("{:.3} ms", t * 1e3)
    } else if t >= 1e-6 {
        format!("{:.3} us", t * 1e6)
    } else {
        format!("{:.1} ns", t * 1e9)
    }
}

fn floor(s: Shape, score: Score, causal: bool, el: usize) -> Floor {
    let (b, h, l, d) = (s.b as f64, s.h as f64, s.l as f64, s.d as f64);
    let full = 4.0 * b * h * l * l * d;
    let flops = if causal { full / 2.0 } else { full };
    let (_, per_score) = family(score);
    let scores = flops / (4.0 * d);
    let transcendentals = scores * per_score;
    let prec = match precision_kind(score) {
        Prec::None => 0.0,
        Prec::Head => 4.0 * h,
        Prec::Key => 4.0 * b * h * l,
    };
    // q, k, v read once, o written (Dv = D), lse written (f32), precisions read
    let bytes = el as f64 * 4.0 * b * h * l * d + 4.0 * b * h * l + prec;
    let mufu_bound = flops / (transcendentals / MUFU_PER_S);
    let text = format!(
        "{}: {:.4} GFLOP (FlashAttention convention{}), {:.4e} transcendentals ({per_score} per score), DRAM floor {:.2} MB = {} at 3.35 TB/s, special-function bound {:.0} TFLOP/s on an H100",
        s.id(),
        flops / 1e9,
        if causal { ", halved: causal" } else { "" },
        transcendentals,
        bytes / 1e6,
        human_secs(bytes / HBM_BYTES_PER_S),
        mufu_bound / 1e12
    );
    Floor {
        flops,
        bytes,
        transcendentals,
        text,
    }
}

fn uniform<T: Element>(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| T::from_f64(rng.random_range(lo..hi)))
        .collect()
}

/// Issue 5's target for this group, as a line to print (never checked).
fn target(score: Score, causal: bool) -> &'static str {
    match (score, causal) {
        (Score::Dot, false) => "target (H100): >= 350 TFLOP/s at L >= 4k",
        (Score::Dot, true) => "target (H100): as fast as FlexAttention/SDPA (no absolute figure)",
        (Score::Gaussian, _) => "target (H100): within 10% of Dot at the same shape",
        (Score::StudentT(_), _) => "target (H100): >= 60% of Dot at the same shape",
        (Score::Laplace, _) => "target (H100): at least as fast as FlexAttention",
    }
}

struct Run<'a> {
    dev: &'a Device,
    quick: bool,
    /// Groups already reported as skipped.
    skipped: HashSet<String>,
}

/// Every family and mask on one shape, the inputs shared.
fn bench_shape<T: Element>(
    cr: &mut Criterion,
    run: &mut Run<'_>,
    s: Shape,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    o: &mut DeviceBuffer<T>,
) {
    let dev = run.dev;
    let backend = dev.kind().name();
    let dtype = T::DTYPE.suffix();
    let shape = [s.b, s.h, s.l, s.d];
    let rows = s.b * s.h * s.l;
    let seed = 5_000 + s.d as u64;
    let pi_head = dev.upload(&uniform::<f32>(s.h, 0.5, 2.0, seed)).unwrap();
    let pi_key = dev
        .upload(&uniform::<f32>(rows, 0.5, 2.0, seed + 1))
        .unwrap();
    let mut lse: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
    let stream = dev.default_stream();
    let samples = 10;
    for score in Score::ALL {
        for causal in [false, true] {
            let (fam, _) = family(score);
            let mask = if causal { "causal" } else { "full" };
            let group_name = format!("{backend}_attention_{fam}_{mask}_{dtype}");
            let spec = AttentionSpec::new(score).causal(causal).check_inputs(false);
            let prec = match precision_kind(score) {
                Prec::None => Precisions::default(),
                Prec::Head => Precisions {
                    head: Some(pi_head.view()),
                    key: None,
                    ..Default::default()
                },
                Prec::Key => Precisions {
                    head: None,
                    key: Some(pi_key.view()),
                    ..Default::default()
                },
            };
            let (qt, kt, vt) = (
                Tensor4::bhld(q.view(), shape),
                Tensor4::bhld(k.view(), shape),
                Tensor4::bhld(v.view(), shape),
            );
            let call = |o: &mut DeviceBuffer<T>, lse: &mut DeviceBuffer<f32>| {
                let out = AttentionOutputs {
                    o: Tensor4Mut::bhld(o.view_mut(), shape),
                    lse: Some(lse.view_mut()),
                    e: None,
                };
                attention::forward_into(&spec, &qt, &kt, &vt, &prec, None, out, stream)
                    .and_then(|()| dev.synchronize(stream))
            };
            // The first call doubles as the probe: a backend without kernels says so here.
            if let Err(e) = call(o, &mut lse) {
                if run.skipped.insert(format!("{group_name}: {e}")) {
                    println!("attention {group_name} on {}: SKIPPED ({e})", dev.name());
                }
                continue;
            }
            let fl = floor(s, score, causal, std::mem::size_of::<T>());
            println!("attention {group_name} {} on {}", fl.text, dev.name());
            let mut group = cr.benchmark_group(&group_name);
            group.sample_size(samples);
            group.warm_up_time(Duration::from_millis(if run.quick { 100 } else { 300 }));
            group.measurement_time(Duration::from_millis(if run.quick { 300 } else { 800 }));
            group.throughput(Throughput::Elements(fl.flops as u64));
            let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
            group.bench_function(BenchmarkId::from_parameter(s.id()), |bch| {
                bch.iter_custom(|reps| {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        call(o, &mut lse).unwrap();
                        black_box(&*o);
                    }
                    let elapsed = t0.elapsed();
                    record.lock().unwrap().push((reps, elapsed));
                    elapsed
                })
            });
            group.finish();
            if let Some(t) = common::median_per_iter(&record.lock().unwrap(), samples) {
                println!(
                    "{group_name}/{}: {} per call, {:.2} TFLOP/s ({:.4e} FLOP/s), {:.3} G transcendentals/s, {:.1} GB/s of the DRAM floor ({:.2}% of 3.35 TB/s); {}",
                    s.id(),
                    human_secs(t),
                    fl.flops / t / 1e12,
                    fl.flops / t,
                    fl.transcendentals / t / 1e9,
                    fl.bytes / t / 1e9,
                    fl.bytes / t / HBM_BYTES_PER_S * 100.0,
                    target(score, causal)
                );
            }
        }
    }
}

/// Every GPU shape of one dtype: one q, k, v, o of B·L·Hq·D = 16k·2048 elements serves all.
fn bench_gpu_dtype<T: Element>(cr: &mut Criterion, run: &mut Run<'_>, seed: u64) {
    let dev = run.dev;
    let n = TOKENS * MODEL_DIM;
    let upload = |s| dev.upload(&uniform::<T>(n, -1.0, 1.0, s));
    let (q, k, v) = match (upload(seed), upload(seed + 1), upload(seed + 2)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            println!(
                "attention {} on {}: SKIPPED ({e})",
                T::DTYPE.suffix(),
                dev.name()
            );
            return;
        }
    };
    let mut o: DeviceBuffer<T> = dev.alloc(n).unwrap();
    let lengths: &[usize] = if run.quick {
        &QUICK_LENGTHS
    } else {
        &GPU_LENGTHS
    };
    for d in GPU_DIMS {
        for &l in lengths {
            let s = Shape {
                b: TOKENS / l,
                h: MODEL_DIM / d,
                l,
                d,
            };
            bench_shape(cr, run, s, &q, &k, &v, &mut o);
        }
    }
}

// ---- backward ----

/// The backward variants of a family: with a precision, the gradient of that precision written
/// (`learnpi`, first) or not (`fixedpi`); Dot has no precision, so one variant.
fn bwd_variants(score: Score) -> &'static [bool] {
    match precision_kind(score) {
        Prec::None => &[false],
        Prec::Head | Prec::Key => &[true, false],
    }
}

fn bwd_group(backend: &str, score: Score, causal: bool, learn: bool, dtype: &str) -> String {
    let (fam, _) = family(score);
    let mask = if causal { "causal" } else { "full" };
    match precision_kind(score) {
        Prec::None => format!("{backend}_attention_bwd_{fam}_{mask}_{dtype}"),
        _ => {
            let v = if learn { "learnpi" } else { "fixedpi" };
            format!("{backend}_attention_bwd_{fam}_{mask}_{v}_{dtype}")
        }
    }
}

/// Special functions per visible score in one backward pass, the formulas' minimum: the
/// recomputed weight's exp, and for Student-t the log1p and the 1/(1 + a) of ∂s/∂d², for Laplace
/// the sqrt and the 1/d of ∂s/∂d².
fn bwd_transcendentals(score: Score) -> f64 {
    match score {
        Score::Dot | Score::Gaussian => 1.0,
        Score::StudentT(_) | Score::Laplace => 3.0,
    }
}

fn bwd_floor(s: Shape, score: Score, causal: bool, learn: bool, el: usize) -> Floor {
    let (b, h, l, d) = (s.b as f64, s.h as f64, s.l as f64, s.d as f64);
    let full = 4.0 * b * h * l * l * d;
    let fwd = if causal { full / 2.0 } else { full };
    let flops = 2.5 * fwd;
    let scores = fwd / (4.0 * d);
    let per_score = bwd_transcendentals(score);
    let transcendentals = 2.0 * scores * per_score;
    let prec = match precision_kind(score) {
        Prec::None => 0.0,
        Prec::Head => 4.0 * h,
        Prec::Key => 4.0 * b * h * l,
    };
    // q, k, v, o, dO read once, dq, dk, dv written, lse read, the precision read and (learned)
    // its gradient written
    let bytes =
        el as f64 * 8.0 * b * h * l * d + 4.0 * b * h * l + prec + if learn { prec } else { 0.0 };
    let mufu_bound = flops / (transcendentals / MUFU_PER_S);
    let text = format!(
        "{}: {:.4} GFLOP (FlashAttention convention: 2.5 x the forward's{}; the two-pass kernel executes 3.5 x on the tensor cores = {:.4} GFLOP), {:.4e} transcendentals ({per_score} per score per pass, 2 passes), DRAM floor {:.2} MB = {} at 3.35 TB/s, special-function bound {:.0} TFLOP/s (convention) on an H100",
        s.id(),
        flops / 1e9,
        if causal { ", halved: causal" } else { "" },
        3.5 * fwd / 1e9,
        transcendentals,
        bytes / 1e6,
        human_secs(bytes / HBM_BYTES_PER_S),
        mufu_bound / 1e12
    );
    Floor {
        flops,
        bytes,
        transcendentals,
        text,
    }
}

/// The backward's inputs, shared by every shape of a dtype (B·L·Hq·D the same for all).
struct BwdInputs<T: Element> {
    q: DeviceBuffer<T>,
    k: DeviceBuffer<T>,
    v: DeviceBuffer<T>,
    d_o: DeviceBuffer<T>,
    /// The forward's output, recomputed for each family and mask before its backward.
    o: DeviceBuffer<T>,
}

/// What the backward writes.
struct BwdGrads<T: Element> {
    dq: DeviceBuffer<T>,
    dk: DeviceBuffer<T>,
    dv: DeviceBuffer<T>,
}

/// Every family, mask and variant of the backward on one shape.
fn bench_bwd_shape<T: Element>(
    cr: &mut Criterion,
    run: &mut Run<'_>,
    s: Shape,
    inp: &mut BwdInputs<T>,
    g: &mut BwdGrads<T>,
) {
    let dev = run.dev;
    let backend = dev.kind().name();
    let dtype = T::DTYPE.suffix();
    let shape = [s.b, s.h, s.l, s.d];
    let rows = s.b * s.h * s.l;
    let seed = 6_000 + s.d as u64;
    let pi_head = dev.upload(&uniform::<f32>(s.h, 0.5, 2.0, seed)).unwrap();
    let pi_key = dev
        .upload(&uniform::<f32>(rows, 0.5, 2.0, seed + 1))
        .unwrap();
    let mut lse: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
    let mut dpi_head: DeviceBuffer<f32> = dev.alloc(s.h).unwrap();
    let mut dpi_key: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
    let stream = dev.default_stream();
    let samples = 10;
    for score in Score::ALL {
        for causal in [false, true] {
            let spec = AttentionSpec::new(score).causal(causal).check_inputs(false);
            let kind = precision_kind(score);
            let prec = match kind {
                Prec::None => Precisions::default(),
                Prec::Head => Precisions {
                    head: Some(pi_head.view()),
                    key: None,
                    ..Default::default()
                },
                Prec::Key => Precisions {
                    head: None,
                    key: Some(pi_key.view()),
                    ..Default::default()
                },
            };
            let (qt, kt, vt) = (
                Tensor4::bhld(inp.q.view(), shape),
                Tensor4::bhld(inp.k.view(), shape),
                Tensor4::bhld(inp.v.view(), shape),
            );
            // The forward's o and lse, which the backward reads (not timed).
            let fwd = attention::forward_into(
                &spec,
                &qt,
                &kt,
                &vt,
                &prec,
                None,
                AttentionOutputs {
                    o: Tensor4Mut::bhld(inp.o.view_mut(), shape),
                    lse: Some(lse.view_mut()),
                    e: None,
                },
                stream,
            )
            .and_then(|()| dev.synchronize(stream));
            let inputs = BackwardInputs {
                o: Tensor4::bhld(inp.o.view(), shape),
                lse: lse.view(),
                d_o: Tensor4::bhld(inp.d_o.view(), shape),
                e: None,
                d_e: None,
                d_lse: None,
            };
            for &learn in bwd_variants(score) {
                let group_name = bwd_group(backend, score, causal, learn, dtype);
                if let Err(e) = &fwd {
                    if run.skipped.insert(format!("{group_name}: fwd {e}")) {
                        println!(
                            "attention {group_name} on {}: SKIPPED (the forward it needs: {e})",
                            dev.name()
                        );
                    }
                    continue;
                }
                let call = |g: &mut BwdGrads<T>,
                            dph: &mut DeviceBuffer<f32>,
                            dpk: &mut DeviceBuffer<f32>| {
                    let out = Gradients {
                        dq: Tensor4Mut::bhld(g.dq.view_mut(), shape),
                        dk: Tensor4Mut::bhld(g.dk.view_mut(), shape),
                        dv: Tensor4Mut::bhld(g.dv.view_mut(), shape),
                        dpi_head: (learn && kind == Prec::Head).then(|| dph.view_mut()),
                        dpi_key: (learn && kind == Prec::Key).then(|| dpk.view_mut()),
                        dnu: None,
                        dbias: None,
                    };
                    attention::backward_into(
                        &spec, &qt, &kt, &vt, &prec, None, &inputs, out, stream,
                    )
                    .and_then(|()| dev.synchronize(stream))
                };
                // The first call doubles as the probe.
                if let Err(e) = call(g, &mut dpi_head, &mut dpi_key) {
                    if run.skipped.insert(format!("{group_name}: {e}")) {
                        println!("attention {group_name} on {}: SKIPPED ({e})", dev.name());
                    }
                    continue;
                }
                let fl = bwd_floor(s, score, causal, learn, std::mem::size_of::<T>());
                println!("attention {group_name} {} on {}", fl.text, dev.name());
                let mut group = cr.benchmark_group(&group_name);
                group.sample_size(samples);
                group.warm_up_time(Duration::from_millis(if run.quick { 100 } else { 300 }));
                group.measurement_time(Duration::from_millis(if run.quick { 300 } else { 800 }));
                group.throughput(Throughput::Elements(fl.flops as u64));
                let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
                group.bench_function(BenchmarkId::from_parameter(s.id()), |bch| {
                    bch.iter_custom(|reps| {
                        let t0 = Instant::now();
                        for _ in 0..reps {
                            call(g, &mut dpi_head, &mut dpi_key).unwrap();
                            black_box(&*g);
                        }
                        let elapsed = t0.elapsed();
                        record.lock().unwrap().push((reps, elapsed));
                        elapsed
                    })
                });
                group.finish();
                if let Some(t) = common::median_per_iter(&record.lock().unwrap(), samples) {
                    println!(
                        "{group_name}/{}: {} per call, {:.2} TFLOP/s ({:.4e} FLOP/s, FlashAttention's 2.5 x forward), {:.3} G transcendentals/s, {:.1} GB/s of the DRAM floor ({:.2}% of 3.35 TB/s); peer: FlexAttention's backward with the same score_mod (benches/peers/attention.py --op backward)",
                        s.id(),
                        human_secs(t),
                        fl.flops / t / 1e12,
                        fl.flops / t,
                        fl.transcendentals / t / 1e9,
                        fl.bytes / t / 1e9,
                        fl.bytes / t / HBM_BYTES_PER_S * 100.0,
                    );
                }
            }
        }
    }
}

/// Every GPU backward shape of one dtype (q, k, v, dO, o, dq, dk, dv of 16k·2048 elements each).
fn bench_bwd_gpu_dtype<T: Element>(cr: &mut Criterion, run: &mut Run<'_>, seed: u64) {
    let dev = run.dev;
    let n = TOKENS * MODEL_DIM;
    let upload = |s| dev.upload(&uniform::<T>(n, -1.0, 1.0, s));
    let alloc = || dev.alloc::<T>(n);
    let bufs = (|| {
        let inp = BwdInputs {
            q: upload(seed)?,
            k: upload(seed + 1)?,
            v: upload(seed + 2)?,
            d_o: upload(seed + 3)?,
            o: alloc()?,
        };
        let g = BwdGrads {
            dq: alloc()?,
            dk: alloc()?,
            dv: alloc()?,
        };
        Ok::<_, fep_kernels::Error>((inp, g))
    })();
    let (mut inp, mut g) = match bufs {
        Ok(x) => x,
        Err(e) => {
            println!(
                "attention backward {} on {}: SKIPPED ({e})",
                T::DTYPE.suffix(),
                dev.name()
            );
            return;
        }
    };
    let (dims, lengths): (&[usize], &[usize]) = if run.quick {
        (&BWD_QUICK_DIMS, &BWD_QUICK_LENGTHS)
    } else {
        (&GPU_DIMS, &BWD_LENGTHS)
    };
    for &d in dims {
        for &l in lengths {
            let s = Shape {
                b: TOKENS / l,
                h: MODEL_DIM / d,
                l,
                d,
            };
            bench_bwd_shape(cr, run, s, &mut inp, &mut g);
        }
    }
}

// ---- decode ----

/// A decode problem: Lq ≤ 16 queries per head against a KV cache of Lk keys per (batch, kv head),
/// batch b's cache holding `lens()[b]` of them.
#[derive(Clone, Copy)]
struct DecShape {
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

impl DecShape {
    fn id(&self) -> String {
        format!(
            "Lq{}_Lk{}_B{}_Hq{}_Hkv{}_D{}",
            self.lq, self.lk, self.b, self.hq, self.hkv, self.d
        )
    }

    /// Per-batch cache lengths: Lk, 7/8 Lk, 6/8 Lk, 5/8 Lk, ... (batch 0 the whole cache).
    fn lens(&self) -> Vec<i32> {
        (0..self.b)
            .map(|i| (self.lk - i * self.lk / 8) as i32)
            .collect()
    }

    /// Keys held, summed over the batch (Σ_b len_b).
    fn keys(&self) -> usize {
        self.lens().iter().map(|&l| l as usize).sum()
    }

    /// Elements of one of k, v at Lk per batch (what is allocated).
    fn cache_elems(&self) -> usize {
        self.b * self.hkv * self.lk * self.d
    }
}

/// The decode shapes: Hq = 32 query heads over Hkv = 8 kv heads (GQA 4), D = Dv = 128; Lq = 1
/// (one token) and 16 (a speculative or chunked step); Lk 4k, 64k, 256k with B = 1 and 4, and
/// 1M with B = 1 (a million-token cache is a batch of one: at most 1M cached tokens per batch,
/// 2 GiB of bf16 keys and as much of values). Quick: Lk 64k (B 1 and 4) and 1M.
fn decode_shapes(quick: bool) -> Vec<DecShape> {
    let lks: &[usize] = if quick { &DECODE_QUICK_LK } else { &DECODE_LK };
    let mut v = vec![];
    for lq in DECODE_LQ {
        for &lk in lks {
            for b in [1, 4] {
                if b * lk <= DECODE_MAX_TOKENS {
                    v.push(DecShape {
                        b,
                        hq: DECODE_HQ,
                        hkv: DECODE_HKV,
                        lq,
                        lk,
                        d: DECODE_D,
                    });
                }
            }
        }
    }
    v
}

struct DecFloor {
    /// The KV cache read: Hkv·Σ_b len_b·(D + Dv)·sizeof (the throughput).
    kv_bytes: f64,
    text: String,
}

fn decode_floor(s: DecShape, score: Score, el: usize) -> DecFloor {
    let (hq, hkv, lq, d) = (s.hq as f64, s.hkv as f64, s.lq as f64, s.d as f64);
    let keys = s.keys() as f64;
    let kv_bytes = hkv * keys * 2.0 * d * el as f64;
    let prec = match precision_kind(score) {
        Prec::None => 0.0,
        Prec::Head => 4.0 * hq,
        Prec::Key => 4.0 * hkv * keys,
    };
    // q read and o written; π read
    let other = 2.0 * el as f64 * s.b as f64 * hq * lq * d + prec;
    let flops = 4.0 * hq * lq * keys * d;
    let text = format!(
        "{}: KV cache read {:.2} MB (Hkv·Σ_b len_b·(D + Dv)·{el} B; lens {:?}) = {} at the H100's {:.2} TB/s, {} at the H200's {:.1} TB/s; plus {:.3} MB of q, o and precisions; {:.3} GFLOP ({:.1} FLOP/B: memory-bound)",
        s.id(),
        kv_bytes / 1e6,
        s.lens(),
        human_secs(kv_bytes / HBM_H100_BYTES_PER_S),
        HBM_H100_BYTES_PER_S / 1e12,
        human_secs(kv_bytes / HBM_H200_BYTES_PER_S),
        HBM_H200_BYTES_PER_S / 1e12,
        other / 1e6,
        flops / 1e9,
        flops / (kv_bytes + other)
    );
    DecFloor { kv_bytes, text }
}

/// Every decode shape of one dtype. One k and one v sized for the largest shape (filled by
/// repeating a random block: the values do not change the work) serve every shape whose cache
/// does not fit in L2 (as its leading B·Hkv·Lk·D elements); a smaller cache is rotated over
/// copies totalling at least [`L2_ROTATE_BYTES`], one per call.
fn bench_decode<T: Element>(cr: &mut Criterion, run: &mut Run<'_>, shapes: &[DecShape], seed: u64) {
    let dev = run.dev;
    let backend = dev.kind().name();
    let dtype = T::DTYPE.suffix();
    let el = std::mem::size_of::<T>();
    let Some(max) = shapes.iter().map(DecShape::cache_elems).max() else {
        return;
    };
    let block_k = uniform::<T>((1 << 22).min(max), -1.0, 1.0, seed);
    let block_v = uniform::<T>((1 << 22).min(max), -1.0, 1.0, seed + 1);
    let tiled =
        |block: &[T], n: usize| -> Vec<T> { block.iter().copied().cycle().take(n).collect() };
    let big = (|| {
        Ok::<_, fep_kernels::Error>((
            dev.upload(&tiled(&block_k, max))?,
            dev.upload(&tiled(&block_v, max))?,
        ))
    })();
    let (k_big, v_big) = match big {
        Ok(x) => x,
        Err(e) => {
            println!("attention decode {dtype} on {}: SKIPPED ({e})", dev.name());
            return;
        }
    };
    let stream = dev.default_stream();
    let samples = 10;
    for (si, &s) in shapes.iter().enumerate() {
        let sseed = seed + 10 * (si as u64 + 1);
        let n = s.cache_elems();
        let cache_bytes = (2 * n * el) as f64;
        let copies = if dev.is_gpu() && cache_bytes < L2_ROTATE_BYTES {
            ((L2_ROTATE_BYTES / cache_bytes).ceil() as usize).min(16)
        } else {
            1
        };
        let mut small = vec![];
        for _ in 1..copies {
            match (
                dev.upload(&tiled(&block_k, n)),
                dev.upload(&tiled(&block_v, n)),
            ) {
                (Ok(k), Ok(v)) => small.push((k, v)),
                (Err(e), _) | (_, Err(e)) => {
                    println!(
                        "attention decode {dtype} {} on {}: SKIPPED ({e})",
                        s.id(),
                        dev.name()
                    );
                    return;
                }
            }
        }
        let kshape = [s.b, s.hkv, s.lk, s.d];
        let mut sets = vec![(
            Tensor4::bhld(k_big.view(), kshape),
            Tensor4::bhld(v_big.view(), kshape),
        )];
        for (k, v) in &small {
            sets.push((
                Tensor4::bhld(k.view(), kshape),
                Tensor4::bhld(v.view(), kshape),
            ));
        }
        let qshape = [s.b, s.hq, s.lq, s.d];
        let nq = s.b * s.hq * s.lq * s.d;
        let q = dev.upload(&uniform::<T>(nq, -1.0, 1.0, sseed)).unwrap();
        let qt = Tensor4::bhld(q.view(), qshape);
        let mut o: DeviceBuffer<T> = dev.alloc(nq).unwrap();
        let kv_len = dev.upload(&s.lens()).unwrap();
        let pi_head = dev
            .upload(&uniform::<f32>(s.hq, 0.5, 2.0, sseed + 1))
            .unwrap();
        let pi_key = dev
            .upload(&uniform::<f32>(s.b * s.hkv * s.lk, 0.5, 2.0, sseed + 2))
            .unwrap();
        let mut variants: Vec<(Score, bool)> = Score::ALL.iter().map(|&sc| (sc, false)).collect();
        if dev.is_gpu() && !run.quick {
            variants.push((Score::Dot, true));
        }
        for (score, nosplit) in variants {
            let (fam, _) = family(score);
            let group_name = if nosplit {
                format!("{backend}_attention_decode_{fam}_nosplit_{dtype}")
            } else {
                format!("{backend}_attention_decode_{fam}_{dtype}")
            };
            let mut spec = AttentionSpec::new(score).causal(true).check_inputs(false);
            if nosplit {
                spec = spec.key_splits(1);
            }
            let prec = match precision_kind(score) {
                Prec::None => Precisions::default(),
                Prec::Head => Precisions {
                    head: Some(pi_head.view()),
                    key: None,
                    ..Default::default()
                },
                Prec::Key => Precisions {
                    head: None,
                    key: Some(pi_key.view()),
                    ..Default::default()
                },
            };
            let lens = kv_len.view();
            let call = |o: &mut DeviceBuffer<T>, i: usize| {
                let (kt, vt) = &sets[i % sets.len()];
                let out = AttentionOutputs {
                    o: Tensor4Mut::bhld(o.view_mut(), qshape),
                    lse: None,
                    e: None,
                };
                attention::forward_into(&spec, &qt, kt, vt, &prec, Some(&lens), out, stream)
                    .and_then(|()| dev.synchronize(stream))
            };
            if let Err(e) = call(&mut o, 0) {
                if run.skipped.insert(format!("{group_name}: {e}")) {
                    println!("attention {group_name} on {}: SKIPPED ({e})", dev.name());
                }
                continue;
            }
            let fl = decode_floor(s, score, el);
            println!(
                "attention {group_name} {}{} on {}",
                fl.text,
                if copies > 1 {
                    format!("; rotated over {copies} caches (one fits in L2)")
                } else {
                    String::new()
                },
                dev.name()
            );
            let mut group = cr.benchmark_group(&group_name);
            group.sample_size(samples);
            group.warm_up_time(Duration::from_millis(if run.quick { 100 } else { 300 }));
            group.measurement_time(Duration::from_millis(if run.quick { 300 } else { 800 }));
            group.throughput(Throughput::Bytes(fl.kv_bytes as u64));
            let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
            let mut it = 0usize;
            group.bench_function(BenchmarkId::from_parameter(s.id()), |bch| {
                bch.iter_custom(|reps| {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        it += 1;
                        call(&mut o, it).unwrap();
                        black_box(&o);
                    }
                    let elapsed = t0.elapsed();
                    record.lock().unwrap().push((reps, elapsed));
                    elapsed
                })
            });
            group.finish();
            if let Some(t) = common::median_per_iter(&record.lock().unwrap(), samples) {
                let gbs = fl.kv_bytes / t;
                println!(
                    "{group_name}/{}: {} per call, {:.1} GB/s of KV cache ({:.1}% of the H100's 3.35 TB/s HBM floor, {:.1}% of the H200's 4.8 TB/s){}",
                    s.id(),
                    human_secs(t),
                    gbs / 1e9,
                    gbs / HBM_H100_BYTES_PER_S * 100.0,
                    gbs / HBM_H200_BYTES_PER_S * 100.0,
                    if nosplit {
                        "; keys not split (key_splits(1)): compare with the automatic split"
                    } else {
                        ""
                    }
                );
            }
        }
    }
}

// ---- score inputs: bias, mask, packed sequences (issue 23) ----

/// The families of the inputs groups: all four in full GPU runs, Dot and Student-t in quick GPU
/// runs; on the CPU (a small shape: every code path of the bench, kept short) Dot.
fn inputs_families(run: &Run<'_>) -> Vec<Score> {
    match (run.dev.is_gpu(), run.quick) {
        (true, false) => Score::ALL.to_vec(),
        (true, true) => vec![Score::Dot, Score::StudentT(5.0)],
        (false, _) => vec![Score::Dot],
    }
}

/// A family's precision as the other groups take it, from the buffers given.
fn family_precisions<'a>(
    score: Score,
    pi_head: &'a DeviceBuffer<f32>,
    pi_key: &'a DeviceBuffer<f32>,
) -> Precisions<'a> {
    match precision_kind(score) {
        Prec::None => Precisions::default(),
        Prec::Head => Precisions {
            head: Some(pi_head.view()),
            ..Default::default()
        },
        Prec::Key => Precisions {
            key: Some(pi_key.view()),
            ..Default::default()
        },
    }
}

/// The floor with `extra` bytes of `what` added to its DRAM traffic (said in its text).
fn with_extra_bytes(mut fl: Floor, extra: f64, what: &str) -> Floor {
    fl.bytes += extra;
    fl.text = format!(
        "{}; plus {what} {:.3} MB: DRAM floor {:.2} MB = {} at 3.35 TB/s",
        fl.text,
        extra / 1e6,
        fl.bytes / 1e6,
        human_secs(fl.bytes / HBM_BYTES_PER_S)
    );
    fl
}

/// Packed sequences' lengths: `s` random lengths (fixed seed) summing to `total`, each >= 1.
fn varlen_lengths(total: usize, s: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f64> = (0..s).map(|_| rng.random_range(0.25..1.75)).collect();
    let sum: f64 = w.iter().sum();
    let mut lens: Vec<usize> = w
        .iter()
        .map(|x| ((x / sum * total as f64) as usize).max(1))
        .collect();
    let head: usize = lens[..s - 1].iter().sum();
    lens[s - 1] = total - head;
    lens
}

/// The floor of a causal forward (bwd: backward) over packed sequences of lengths `lens`, H heads
/// (Hq = Hkv), head dim D: FLOPs by the convention per sequence (4·H·L_s²·D, halved: causal;
/// 2.5 x for the backward), bytes as the dense call's over the packed tokens plus the offsets.
fn varlen_floor(lens: &[usize], h: usize, d: usize, score: Score, bwd: bool, el: usize) -> Floor {
    let (hf, df) = (h as f64, d as f64);
    let total: usize = lens.iter().sum();
    let t = total as f64;
    let fwd: f64 = lens
        .iter()
        .map(|&l| 4.0 * hf * (l * l) as f64 * df / 2.0)
        .sum();
    let flops = if bwd { 2.5 * fwd } else { fwd };
    let scores = fwd / (4.0 * df);
    let transcendentals = if bwd {
        2.0 * scores * bwd_transcendentals(score)
    } else {
        scores * family(score).1
    };
    let prec = match precision_kind(score) {
        Prec::None => 0.0,
        Prec::Head => 4.0 * hf,
        Prec::Key => 4.0 * hf * t,
    };
    let tensors = if bwd { 8.0 } else { 4.0 };
    let bytes =
        el as f64 * tensors * hf * t * df + 4.0 * hf * t + prec + 8.0 * (lens.len() + 1) as f64;
    let text = format!(
        "{} sequences of lengths {:?} ({} tokens, max {}), H {h}, D {d}, causal per sequence: {:.4} GFLOP (FlashAttention convention per sequence, halved: causal{}), {:.4e} transcendentals, DRAM floor {:.2} MB = {} at 3.35 TB/s",
        lens.len(),
        lens,
        total,
        lens.iter().max().copied().unwrap_or(0),
        flops / 1e9,
        if bwd { "; 2.5 x the forward's" } else { "" },
        transcendentals,
        bytes / 1e6,
        human_secs(bytes / HBM_BYTES_PER_S),
    );
    Floor {
        flops,
        bytes,
        transcendentals,
        text,
    }
}

/// `num / den` as the line issue 23's targets speak of (a reminder, never a check).
fn ratio_note(what: &str, num: f64, den: Option<f64>, target: &str) -> String {
    match den {
        Some(d) if d > 0.0 => format!(
            "; {what} = {:.3} ({target}; a reminder, not a check)",
            num / d
        ),
        _ => format!("; {what}: the plain call was not measured ({target})"),
    }
}

/// One benchmark of the inputs groups: the first call probes (an error: SKIPPED, once per
/// group), then the floor line, criterion, and the figures with `note(median)` after them.
/// Returns the median seconds per call.
fn time_inputs(
    cr: &mut Criterion,
    run: &mut Run<'_>,
    group_name: &str,
    id: &str,
    fl: &Floor,
    note: &dyn Fn(f64) -> String,
    mut call: impl FnMut() -> Result<(), fep_kernels::Error>,
) -> Option<f64> {
    let dev = run.dev;
    if let Err(e) = call() {
        if run.skipped.insert(format!("{group_name}: {e}")) {
            println!("attention {group_name} on {}: SKIPPED ({e})", dev.name());
        }
        return None;
    }
    println!("attention {group_name} {} on {}", fl.text, dev.name());
    let samples = 10;
    let mut group = cr.benchmark_group(group_name);
    group.sample_size(samples);
    group.warm_up_time(Duration::from_millis(if run.quick { 100 } else { 300 }));
    group.measurement_time(Duration::from_millis(if run.quick { 300 } else { 800 }));
    if !dev.is_gpu() {
        // the CPU smoke: criterion's analysis, not the call, would dominate its time
        group.nresamples(10_000);
    }
    group.throughput(Throughput::Elements(fl.flops as u64));
    let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
    group.bench_function(BenchmarkId::from_parameter(id), |bch| {
        bch.iter_custom(|reps| {
            let t0 = Instant::now();
            for _ in 0..reps {
                black_box(call()).unwrap();
            }
            let elapsed = t0.elapsed();
            record.lock().unwrap().push((reps, elapsed));
            elapsed
        })
    });
    group.finish();
    let t = common::median_per_iter(&record.lock().unwrap(), samples)?;
    println!(
        "{group_name}/{id}: {} per call, {:.2} TFLOP/s ({:.4e} FLOP/s), {:.3} G transcendentals/s, {:.1} GB/s of the DRAM floor ({:.2}% of 3.35 TB/s){}",
        human_secs(t),
        fl.flops / t / 1e12,
        fl.flops / t,
        fl.transcendentals / t / 1e9,
        fl.bytes / t / 1e9,
        fl.bytes / t / HBM_BYTES_PER_S * 100.0,
        note(t)
    );
    Some(t)
}

/// The inputs groups of one dense shape (B, H = Hq = Hkv, L = Lq = Lk, D), every family of
/// [`inputs_families`]: forward plain, with a per-key bias, with a padding mask; backward plain
/// and with a full bias (dβ written); forward and backward over B·L tokens packed as 8 causal
/// sequences. The buffers hold at least B·H·L·D elements.
fn bench_inputs_shape<T: Element>(
    cr: &mut Criterion,
    run: &mut Run<'_>,
    s: Shape,
    inp: &mut BwdInputs<T>,
    g: &mut BwdGrads<T>,
) {
    let dev = run.dev;
    let backend = dev.kind().name();
    let dtype = T::DTYPE.suffix();
    let el = std::mem::size_of::<T>();
    let shape = [s.b, s.h, s.l, s.d];
    let rows = s.b * s.h * s.l;
    let seed = 8_000 + s.d as u64 + s.l as u64;
    let stream = dev.default_stream();
    let pi_head = dev.upload(&uniform::<f32>(s.h, 0.5, 2.0, seed)).unwrap();
    let pi_key = dev
        .upload(&uniform::<f32>(rows, 0.5, 2.0, seed + 1))
        .unwrap();
    let mut lse: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
    // per-key bias [B, H, 1, L], uniform in (-1, 1)
    let key_bias_shape = [s.b, s.h, 1, s.l];
    let key_bias = dev
        .upload(&uniform::<f32>(rows, -1.0, 1.0, seed + 2))
        .unwrap();
    // padding mask [B, 1, 1, L]: batch b keeps its first L·(7 − b mod 4)/8 keys
    let mask_shape = [s.b, 1, 1, s.l];
    let keep = |b: usize| s.l - (b % 4 + 1) * s.l / 8;
    let mask_host: Vec<u8> = (0..s.b)
        .flat_map(|b| (0..s.l).map(move |j| u8::from(j < keep(b))))
        .collect();
    let kept = mask_host.iter().filter(|&&m| m != 0).count() as f64 / mask_host.len() as f64;
    let mask = dev.upload(&mask_host).unwrap();
    // full bias [1, H, L, L] (a random block repeated: the values do not change the work) and
    // its gradient
    let full_shape = [1, s.h, s.l, s.l];
    let nfull = s.h * s.l * s.l;
    let block = uniform::<f32>((1 << 22).min(nfull), -1.0, 1.0, seed + 3);
    let full = (|| {
        let bias = dev.upload(
            &block
                .iter()
                .copied()
                .cycle()
                .take(nfull)
                .collect::<Vec<_>>(),
        )?;
        let dbias: DeviceBuffer<f32> = dev.alloc(nfull)?;
        Ok::<_, fep_kernels::Error>((bias, dbias))
    })();
    drop(block);
    let mut full = match full {
        Ok(x) => Some(x),
        Err(e) => {
            println!(
                "attention inputs {dtype} {}: full bias [1, {}, {}, {}] SKIPPED ({e})",
                s.id(),
                s.h,
                s.l,
                s.l
            );
            None
        }
    };
    // packed sequences: the B·L tokens as 8 sequences of random lengths
    let lens = varlen_lengths(s.b * s.l, 8, seed + 4);
    let mut cu = vec![0i32];
    for &l in &lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let max_len = lens.iter().copied().max().unwrap_or(1);
    let (cu_q, cu_k) = (dev.upload(&cu).unwrap(), dev.upload(&cu).unwrap());
    let vshape = [1, s.h, s.b * s.l, s.d];
    let vid = format!("D{}_T{}_S{}_H{}", s.d, s.b * s.l, lens.len(), s.h);
    let id = s.id();
    let (qt, kt, vt) = (
        Tensor4::bhld(inp.q.view(), shape),
        Tensor4::bhld(inp.k.view(), shape),
        Tensor4::bhld(inp.v.view(), shape),
    );
    let (qv, kv, vv) = (
        Tensor4::bhld(inp.q.view(), vshape),
        Tensor4::bhld(inp.k.view(), vshape),
        Tensor4::bhld(inp.v.view(), vshape),
    );
    for score in inputs_families(run) {
        let (fam, _) = family(score);
        let base = family_precisions(score, &pi_head, &pi_key);
        let spec = AttentionSpec::new(score).check_inputs(false);

        // -- forward: plain, per-key bias, padding mask (full, non-causal)
        let with_key_bias = Precisions {
            bias: Some(attention::ScoreBias::contiguous(
                key_bias.view(),
                key_bias_shape,
            )),
            ..base.clone()
        };
        let with_mask = Precisions {
            mask: Some(attention::ScoreBias::contiguous(mask.view(), mask_shape)),
            ..base.clone()
        };
        let mut t_plain = None;
        for (variant, prec) in [
            ("", &base),
            ("_keybias", &with_key_bias),
            ("_padmask", &with_mask),
        ] {
            let group_name = format!("{backend}_attention_inputs_{fam}_fwd{variant}_{dtype}");
            let fl = match variant {
                "" => floor(s, score, false, el),
                "_keybias" => with_extra_bytes(
                    floor(s, score, false, el),
                    4.0 * rows as f64,
                    "the per-key bias [B, H, 1, L] read",
                ),
                _ => {
                    let mut fl = with_extra_bytes(
                        floor(s, score, false, el),
                        (s.b * s.l) as f64,
                        "the padding mask [B, 1, 1, L] (u8) read",
                    );
                    fl.text += &format!(
                        "; FLOPs those of the unmasked call (the mask keeps {:.1}% of the keys)",
                        kept * 100.0
                    );
                    fl
                }
            };
            let note = |t: f64| match variant {
                "" => String::new(),
                "_keybias" => ratio_note(
                    "per-key-bias forward / plain forward",
                    t,
                    t_plain,
                    "issue 23's target on an H100/H200: <= 1.05",
                ),
                _ => ratio_note(
                    "padding-mask forward / plain forward",
                    t,
                    t_plain,
                    "no target; the peer: FlexAttention with the same mask_mod",
                ),
            };
            let got = time_inputs(cr, run, &group_name, &id, &fl, &note, || {
                let out = AttentionOutputs {
                    o: Tensor4Mut::bhld(inp.o.view_mut(), shape),
                    lse: Some(lse.view_mut()),
                    e: None,
                };
                attention::forward_into(&spec, &qt, &kt, &vt, prec, None, out, stream)
                    .and_then(|()| dev.synchronize(stream))
            });
            if variant.is_empty() {
                t_plain = got;
            }
        }

        // -- backward: plain, full bias [1, H, L, L] with dβ (full, non-causal; no precision
        //    gradient asked)
        let mut t_bwd_plain = None;
        for with_bias in [false, true] {
            let variant = if with_bias { "_fullbias" } else { "" };
            let group_name = format!("{backend}_attention_inputs_{fam}_bwd{variant}_{dtype}");
            let (prec, dbias) = match (with_bias, full.as_mut()) {
                (false, _) => (base.clone(), None),
                (true, Some((bias, dbias))) => (
                    Precisions {
                        bias: Some(attention::ScoreBias::contiguous(bias.view(), full_shape)),
                        ..base.clone()
                    },
                    Some(dbias),
                ),
                (true, None) => continue,
            };
            let fwd = attention::forward_into(
                &spec,
                &qt,
                &kt,
                &vt,
                &prec,
                None,
                AttentionOutputs {
                    o: Tensor4Mut::bhld(inp.o.view_mut(), shape),
                    lse: Some(lse.view_mut()),
                    e: None,
                },
                stream,
            )
            .and_then(|()| dev.synchronize(stream));
            if let Err(e) = fwd {
                if run.skipped.insert(format!("{group_name}: fwd {e}")) {
                    println!(
                        "attention {group_name} on {}: SKIPPED (the forward it needs: {e})",
                        dev.name()
                    );
                }
                continue;
            }
            let binp = BackwardInputs {
                o: Tensor4::bhld(inp.o.view(), shape),
                lse: lse.view(),
                d_o: Tensor4::bhld(inp.d_o.view(), shape),
                e: None,
                d_e: None,
                d_lse: None,
            };
            let fl = bwd_floor(s, score, false, false, el);
            let fl = if with_bias {
                with_extra_bytes(
                    fl,
                    2.0 * 4.0 * nfull as f64,
                    "the full bias [1, H, L, L] read and dbias written (f32)",
                )
            } else {
                fl
            };
            let note = |t: f64| {
                if with_bias {
                    ratio_note(
                        "full-bias backward (with dbias) / plain backward",
                        t,
                        t_bwd_plain,
                        "issue 23's target on an H100/H200: <= 1.5",
                    )
                } else {
                    String::new()
                }
            };
            let mut dbias = dbias;
            let got = time_inputs(cr, run, &group_name, &id, &fl, &note, || {
                let out = Gradients {
                    dq: Tensor4Mut::bhld(g.dq.view_mut(), shape),
                    dk: Tensor4Mut::bhld(g.dk.view_mut(), shape),
                    dv: Tensor4Mut::bhld(g.dv.view_mut(), shape),
                    dpi_head: None,
                    dpi_key: None,
                    dnu: None,
                    dbias: dbias.as_mut().map(|d| d.view_mut()),
                };
                attention::backward_into(&spec, &qt, &kt, &vt, &prec, None, &binp, out, stream)
                    .and_then(|()| dev.synchronize(stream))
            });
            if !with_bias {
                t_bwd_plain = got;
            }
        }

        // -- packed sequences, causal: forward, then backward from its o and lse
        let vspec = AttentionSpec::new(score).causal(true).check_inputs(false);
        let vprec = Precisions {
            varlen: Some(attention::Varlen {
                cu_q: cu_q.view(),
                cu_k: cu_k.view(),
                max_q: max_len,
                max_k: max_len,
            }),
            ..base.clone()
        };
        let group_name = format!("{backend}_attention_inputs_{fam}_fwd_varlen_causal_{dtype}");
        let fl = varlen_floor(&lens, s.h, s.d, score, false, el);
        let fwd_ok = time_inputs(cr, run, &group_name, &vid, &fl, &|_| String::new(), || {
            let out = AttentionOutputs {
                o: Tensor4Mut::bhld(inp.o.view_mut(), vshape),
                lse: Some(lse.view_mut()),
                e: None,
            };
            attention::forward_into(&vspec, &qv, &kv, &vv, &vprec, None, out, stream)
                .and_then(|()| dev.synchronize(stream))
        });
        let group_name = format!("{backend}_attention_inputs_{fam}_bwd_varlen_causal_{dtype}");
        if fwd_ok.is_none() {
            if run.skipped.insert(format!("{group_name}: fwd")) {
                println!(
                    "attention {group_name} on {}: SKIPPED (the forward it needs was not measured)",
                    dev.name()
                );
            }
            continue;
        }
        // the forward's o and lse are those of its last timed call
        let binp = BackwardInputs {
            o: Tensor4::bhld(inp.o.view(), vshape),
            lse: lse.view(),
            d_o: Tensor4::bhld(inp.d_o.view(), vshape),
            e: None,
            d_e: None,
            d_lse: None,
        };
        let fl = varlen_floor(&lens, s.h, s.d, score, true, el);
        time_inputs(cr, run, &group_name, &vid, &fl, &|_| String::new(), || {
            let out = Gradients {
                dq: Tensor4Mut::bhld(g.dq.view_mut(), vshape),
                dk: Tensor4Mut::bhld(g.dk.view_mut(), vshape),
                dv: Tensor4Mut::bhld(g.dv.view_mut(), vshape),
                dpi_head: None,
                dpi_key: None,
                dnu: None,
                dbias: None,
            };
            attention::backward_into(&vspec, &qv, &kv, &vv, &vprec, None, &binp, out, stream)
                .and_then(|()| dev.synchronize(stream))
        });
    }
}

/// The inputs groups on the GPU, one dtype: D = 128, L = 4k (B = 4, H = 16) in quick runs;
/// D 128 and 64, L 1k and 4k otherwise (a full bias [1, H, L, L] at 16k would be 17 GB).
fn bench_inputs_gpu_dtype<T: Element>(cr: &mut Criterion, run: &mut Run<'_>, seed: u64) {
    let dev = run.dev;
    let n = TOKENS * MODEL_DIM;
    let upload = |s| dev.upload(&uniform::<T>(n, -1.0, 1.0, s));
    let alloc = || dev.alloc::<T>(n);
    let bufs = (|| {
        let inp = BwdInputs {
            q: upload(seed)?,
            k: upload(seed + 1)?,
            v: upload(seed + 2)?,
            d_o: upload(seed + 3)?,
            o: alloc()?,
        };
        let g = BwdGrads {
            dq: alloc()?,
            dk: alloc()?,
            dv: alloc()?,
        };
        Ok::<_, fep_kernels::Error>((inp, g))
    })();
    let (mut inp, mut g) = match bufs {
        Ok(x) => x,
        Err(e) => {
            println!(
                "attention inputs {} on {}: SKIPPED ({e})",
                T::DTYPE.suffix(),
                dev.name()
            );
            return;
        }
    };
    let (dims, lengths): (&[usize], &[usize]) = if run.quick {
        (&INPUTS_QUICK_DIMS, &INPUTS_QUICK_LENGTHS)
    } else {
        (&GPU_DIMS, &INPUTS_LENGTHS)
    };
    for &d in dims {
        for &l in lengths {
            let s = Shape {
                b: TOKENS / l,
                h: MODEL_DIM / d,
                l,
                d,
            };
            bench_inputs_shape(cr, run, s, &mut inp, &mut g);
        }
    }
}

fn bench(cr: &mut Criterion) {
    let quick = common::quick();
    let devices = common::devices("attention");
    let (fwd, bwd, dec, inputs) = (
        common::op_wanted("forward"),
        common::op_wanted("backward"),
        common::op_wanted("decode"),
        common::op_wanted("inputs"),
    );
    for dev in &devices {
        let mut run = Run {
            dev,
            quick,
            skipped: HashSet::new(),
        };
        let (bf, hf) = (common::dtype_wanted("bf16"), common::dtype_wanted("f16"));
        if dev.is_gpu() {
            if fwd && bf {
                bench_gpu_dtype::<bf16>(cr, &mut run, 51_000);
            }
            if fwd && hf {
                bench_gpu_dtype::<f16>(cr, &mut run, 52_000);
            }
            if bwd && bf {
                bench_bwd_gpu_dtype::<bf16>(cr, &mut run, 61_000);
            }
            if bwd && hf {
                bench_bwd_gpu_dtype::<f16>(cr, &mut run, 62_000);
            }
            let shapes = decode_shapes(quick);
            if dec && bf {
                bench_decode::<bf16>(cr, &mut run, &shapes, 71_000);
            }
            if dec && hf {
                bench_decode::<f16>(cr, &mut run, &shapes, 72_000);
            }
            if inputs && bf {
                bench_inputs_gpu_dtype::<bf16>(cr, &mut run, 81_000);
            }
        } else if common::dtype_wanted("f32") {
            // the fast CPU path, f32: issue 24's shape (B 16, H 2, L 128, D 32; plain PyTorch
            // eager Student-t forward + backward 10.5 ms on one thread of the 2-core machine)
            // and, unless quick, L 512 and 1024 (the ≥ 2x-plain-PyTorch targets)
            let mut cpu_shapes = vec![Shape {
                b: 16,
                h: 2,
                l: 128,
                d: 32,
            }];
            if !quick {
                cpu_shapes.push(Shape {
                    b: 2,
                    h: 4,
                    l: 512,
                    d: 64,
                });
                cpu_shapes.push(Shape {
                    b: 1,
                    h: 4,
                    l: 1024,
                    d: 64,
                });
            }
            for &s in &cpu_shapes {
                let n = s.b * s.h * s.l * s.d;
                let up = |seed| dev.upload(&uniform::<f32>(n, -1.0, 1.0, seed)).unwrap();
                if fwd {
                    let (q, k, v) = (up(53_000), up(53_001), up(53_002));
                    let mut o: DeviceBuffer<f32> = dev.alloc(n).unwrap();
                    bench_shape(cr, &mut run, s, &q, &k, &v, &mut o);
                }
                if bwd {
                    let mut inp = BwdInputs {
                        q: up(63_000),
                        k: up(63_001),
                        v: up(63_002),
                        d_o: up(63_003),
                        o: dev.alloc(n).unwrap(),
                    };
                    let mut g = BwdGrads {
                        dq: dev.alloc(n).unwrap(),
                        dk: dev.alloc(n).unwrap(),
                        dv: dev.alloc(n).unwrap(),
                    };
                    bench_bwd_shape(cr, &mut run, s, &mut inp, &mut g);
                }
            }
            // decode and the score inputs: one small shape
            let s = Shape {
                b: 1,
                h: 2,
                l: 64,
                d: 32,
            };
            let n = s.b * s.h * s.l * s.d;
            let up = |seed| dev.upload(&uniform::<f32>(n, -1.0, 1.0, seed)).unwrap();
            if dec {
                let shapes: Vec<DecShape> = [1, 16]
                    .into_iter()
                    .map(|lq| DecShape {
                        b: 2,
                        hq: 4,
                        hkv: 2,
                        lq,
                        lk: 256,
                        d: 32,
                    })
                    .collect();
                bench_decode::<f32>(cr, &mut run, &shapes, 73_000);
            }
            if inputs {
                let mut inp = BwdInputs {
                    q: up(83_000),
                    k: up(83_001),
                    v: up(83_002),
                    d_o: up(83_003),
                    o: dev.alloc(n).unwrap(),
                };
                let mut g = BwdGrads {
                    dq: dev.alloc(n).unwrap(),
                    dk: dev.alloc(n).unwrap(),
                    dv: dev.alloc(n).unwrap(),
                };
                bench_inputs_shape(cr, &mut run, s, &mut inp, &mut g);
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
