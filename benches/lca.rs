//! LCA sparse coding: criterion benchmarks at the two configurations of the foundation issue.
//!
//! Groups are named `{backend}_lca_{config}_{dtype}`; one iteration is one `solve_into` of the
//! whole batch (b = Φᵀx, T steps, outputs), synchronised. λ is calibrated first so that about
//! 5% of the units are active at the end, as in benches/peers/lca.py.
//!
//! Floors (f32, soft threshold, ρ = active fraction ≈ 0.05), printed with each run:
//! - dense FLOPs (what a dense implementation does): T · 2·B·m² + 2·B·n·m
//! - sparse FLOPs (what the gather does):            T · 2·B·ρm·m + 2·B·n·m
//! - minimal DRAM bytes: read x (4Bn), Φ (4nm), G (4m²) once; write u and a (8Bm)
//! - on-chip traffic of the gather: T · B · ρm · m · 4 bytes of G rows (served from L2 when G
//!   fits, 4 MB at m = 1024)
//!
//! The CPU reference is benchmarked at the small configuration only (the large one takes
//! minutes per solve in f64). `FEP_BENCH_QUICK=1` shortens the runs.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fep_kernels::lca::{Dictionary, LcaOutputs, LcaSpec, Threshold};
use fep_kernels::{Device, DeviceBuffer};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

struct Config {
    name: &'static str,
    batch: usize,
    n: usize,
    m: usize,
    steps: u32,
    /// Whether the CPU runs it (the large one is for GPUs only).
    cpu: bool,
}

const CONFIGS: [Config; 3] = [
    Config {
        name: "small",
        batch: 256,
        n: 64,
        m: 256,
        steps: 100,
        cpu: true,
    },
    // issue 24's CPU shape (plain PyTorch eager: 26.4 ms on one thread of the 2-core machine)
    Config {
        name: "issue24",
        batch: 256,
        n: 64,
        m: 128,
        steps: 200,
        cpu: true,
    },
    Config {
        name: "large",
        batch: 4096,
        n: 256,
        m: 1024,
        steps: 200,
        cpu: false,
    },
];
const ETA: f32 = 0.1;
const TARGET_ACTIVE: f64 = 0.05;
/// Distinct input batches cycled through, so small inputs are not always hot in L2.
const ROTATE: usize = 4;

/// Φ with unit-norm columns; x = Φ a_true + noise with 5% of a_true nonzero.
fn problem(c: &Config, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut phi: Vec<f32> = (0..c.n * c.m)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    for j in 0..c.m {
        let norm = (0..c.n)
            .map(|i| (phi[i * c.m + j] as f64).powi(2))
            .sum::<f64>()
            .sqrt() as f32;
        (0..c.n).for_each(|i| phi[i * c.m + j] /= norm);
    }
    let xs = (0..ROTATE)
        .map(|_| {
            let mut x = vec![0f32; c.batch * c.n];
            for s in 0..c.batch {
                for _ in 0..(c.m / 20).max(1) {
                    let k = rng.random_range(0..c.m);
                    let v: f32 =
                        rng.random_range(0.5..1.5) * if rng.random::<bool>() { 1.0 } else { -1.0 };
                    (0..c.n).for_each(|i| x[s * c.n + i] += v * phi[i * c.m + k]);
                }
                (0..c.n)
                    .for_each(|i| x[s * c.n + i] += 0.05 * rng.sample::<f32, _>(StandardNormal));
            }
            x
        })
        .collect();
    (phi, xs)
}

struct Outputs {
    u: DeviceBuffer<f32>,
    a: DeviceBuffer<f32>,
    steps: DeviceBuffer<u32>,
}

impl Outputs {
    fn new(dev: &Device, c: &Config) -> Outputs {
        Outputs {
            u: dev.alloc(c.batch * c.m).unwrap(),
            a: dev.alloc(c.batch * c.m).unwrap(),
            steps: dev.alloc(c.batch).unwrap(),
        }
    }
    fn views(&mut self) -> LcaOutputs<'_> {
        LcaOutputs {
            u: self.u.view_mut(),
            a: self.a.view_mut(),
            energy: None,
            active: None,
            steps: Some(self.steps.view_mut()),
        }
    }
}

fn active_fraction(
    dict: &Dictionary,
    spec: &LcaSpec,
    x: &DeviceBuffer<f32>,
    out: &mut Outputs,
) -> f64 {
    let stream = dict.device().default_stream();
    dict.solve_into(spec, &x.view(), None, out.views(), stream)
        .unwrap();
    let a = out.a.to_vec().unwrap();
    a.iter().filter(|v| **v != 0.0).count() as f64 / a.len() as f64
}

/// Bisection on λ (in log space) for about 5% active units.
fn calibrate(
    dict: &Dictionary,
    c: &Config,
    x: &DeviceBuffer<f32>,
    out: &mut Outputs,
) -> (f32, f64) {
    let (mut lo, mut hi) = (1e-3f32, 10.0f32);
    let mut best = (1.0, 0.0);
    for _ in 0..12 {
        let mid = (lo * hi).sqrt();
        let frac = active_fraction(
            dict,
            &LcaSpec::new(mid)
                .eta(ETA)
                .steps(c.steps)
                .check_finite(false),
            x,
            out,
        );
        best = (mid, frac);
        if frac > TARGET_ACTIVE {
            lo = mid
        } else {
            hi = mid
        }
    }
    best
}

fn floors(c: &Config, rho: f64) -> String {
    let (b, n, m, t) = (c.batch as f64, c.n as f64, c.m as f64, c.steps as f64);
    let dense = t * 2.0 * b * m * m + 2.0 * b * n * m;
    let sparse = t * 2.0 * b * rho * m * m + 2.0 * b * n * m;
    let bytes = 4.0 * (b * n + n * m + m * m) + 8.0 * b * m;
    let gather = t * b * rho * m * m * 4.0;
    format!(
        "lca {}: B={} n={} m={} T={} active={:.3}: dense {:.3} GFLOP, sparse {:.3} GFLOP, DRAM floor {:.2} MB, gather {:.1} GB of G rows",
        c.name,
        c.batch,
        c.n,
        c.m,
        c.steps,
        rho,
        dense / 1e9,
        sparse / 1e9,
        bytes / 1e6,
        gather / 1e9
    )
}

fn bench(cr: &mut Criterion) {
    let quick = common::quick();
    let devices = common::devices("lca");
    for dev in &devices {
        let backend = dev.kind().name();
        for (ci, c) in CONFIGS.iter().enumerate() {
            if !dev.is_gpu() && !c.cpu {
                continue;
            }
            let (phi, xs) = problem(c, 7 + ci as u64);
            let phi = dev.upload(&phi).unwrap();
            let dict = Dictionary::new(&phi.view(), c.n, c.m, Default::default()).unwrap();
            let xs: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
            let mut out = Outputs::new(dev, c);
            let (lambda, rho) = calibrate(&dict, c, &xs[0], &mut out);
            println!("{} lambda={lambda:.4} on {}", floors(c, rho), dev.name());
            let spec = LcaSpec::new(lambda)
                .eta(ETA)
                .steps(c.steps)
                .threshold(Threshold::Soft)
                .check_finite(false);
            let mut group = cr.benchmark_group(format!("{backend}_lca_{}_f32", c.name));
            group.throughput(Throughput::Elements((c.batch as u64) * c.steps as u64));
            group.sample_size(if quick || !dev.is_gpu() { 10 } else { 30 });
            group.warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }));
            group.measurement_time(Duration::from_secs(if quick { 1 } else { 3 }));
            let stream = dev.default_stream();
            let mut i = 0;
            group.bench_function(
                BenchmarkId::from_parameter(format!("B{}_n{}_m{}_T{}", c.batch, c.n, c.m, c.steps)),
                |bch| {
                    bch.iter(|| {
                        let x = &xs[i % ROTATE];
                        i += 1;
                        dict.solve_into(&spec, &x.view(), None, out.views(), stream)
                            .unwrap();
                        dev.synchronize(stream).unwrap();
                        black_box(&out.a);
                    })
                },
            );
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
