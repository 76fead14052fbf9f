//! Precision-weighted attention, forward (DESIGN.md §4.1, issue 5): criterion benchmarks at the
//! configurations of issue 5.
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
//! A GPU backend whose `forward_into` returns an error (an `Error::Unsupported` limit, say)
//! prints `SKIPPED` with the reason, once per group, and goes on. The
//! CPU backend (the f64 reference) runs one tiny smoke configuration per group (f32, B = 1,
//! H = 2, L = 64, D = 32), so `cargo bench --bench attention` stays short on a machine without
//! a GPU. `FEP_BENCH_QUICK=1` shortens the runs and, on a GPU, measures L ∈ {1k, 4k, 16k} only.

mod common;

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, Tensor4, Tensor4Mut,
};
use fep_kernels::{Device, DeviceBuffer, Element, bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// H100 SXM HBM3 bandwidth, for the "time at the DRAM floor" figures.
const HBM_BYTES_PER_S: f64 = 3.35e12;
/// H100 SXM special-function results per second (16/clk/SM, 132 SMs, 1.83 GHz).
const MUFU_PER_S: f64 = 16.0 * 132.0 * 1.83e9;
/// B·L, and Hq·D, of every GPU configuration.
const TOKENS: usize = 16 * 1024;
const MODEL_DIM: usize = 2048;
const GPU_DIMS: [usize; 2] = [64, 128];
const GPU_LENGTHS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];
const QUICK_LENGTHS: [usize; 3] = [1024, 4096, 16384];

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
                },
                Prec::Key => Precisions {
                    head: None,
                    key: Some(pi_key.view()),
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

fn bench(cr: &mut Criterion) {
    let quick = common::quick();
    let devices = common::devices("attention");
    for dev in &devices {
        let mut run = Run {
            dev,
            quick,
            skipped: HashSet::new(),
        };
        if dev.is_gpu() {
            bench_gpu_dtype::<bf16>(cr, &mut run, 51_000);
            bench_gpu_dtype::<f16>(cr, &mut run, 52_000);
        } else {
            // the f64 reference: one tiny smoke shape, f32
            let s = Shape {
                b: 1,
                h: 2,
                l: 64,
                d: 32,
            };
            let n = s.b * s.h * s.l * s.d;
            let up = |seed| dev.upload(&uniform::<f32>(n, -1.0, 1.0, seed)).unwrap();
            let (q, k, v) = (up(53_000), up(53_001), up(53_002));
            let mut o: DeviceBuffer<f32> = dev.alloc(n).unwrap();
            bench_shape(cr, &mut run, s, &q, &k, &v, &mut o);
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
