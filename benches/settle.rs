//! Predictive-coding settling: criterion benchmarks at the configurations of DESIGN.md §7.
//!
//! Groups are named `{backend}_settle_{config}_{mode}_{dtype}` (mode `infer`: x_L free, or
//! `learn`: x_L clamped to a one-hot target, then the weight and bias gradients); the benchmark
//! id inside a group gives the batch, widths and T. One iteration is one whole settle of T steps
//! (`infer_into` / `learn_step_into`, feedforward start, tol = 0 so every sample runs T steps,
//! no trace, inputs not re-checked), synchronised. The throughput is in sample-steps (B · T).
//! After each benchmark the median time per settle from criterion's own samples is printed as
//! time per step, with the FLOP rate against the floor below.
//!
//! Configurations (activations identity on the input, tanh above: f₁ = id, f₂…f_L = tanh):
//! - `pcx`:  PCX's MNIST network 784-128-128-128-10, B = 256, T = 8 and 32;
//! - `wide`: 784-4096-4096-4096-10, B = 1024, T = 20;
//! - `smoke`: 64-32-32-32-10, B = 32, T = 8: the only one run on the CPU backend (the f64
//!   reference needs seconds per settle at the others), so `cargo bench --bench settle` stays
//!   short on a machine without a GPU.
//!
//! Floors, printed with each configuration (P = Σ_{l≥1} n_l n_{l−1}, P₂ = Σ_{l≥2} n_l n_{l−1}):
//! - FLOPs per step: 2·B·P for the forward products μ_l = W_l f(x_{l−1}) and 2·B·P₂ for the
//!   backward products W_{l+1}ᵀ(Π ε) (layer 1's is not needed: x₀ is clamped); learning adds
//!   2·B·P once for the weight gradients. The feedforward start (2·B·P once) is not counted.
//! - minimal DRAM bytes per settle: the weights once (P elements of the dtype), x₀ (4·B·n₀) and
//!   the target (4·B·n_L, learning) read, x and ε written (8·B·Σ_{l≥1} n_l), plus the gradients
//!   written when learning (4·(P + Σ n_l)).
//!
//! f32, bf16 and f16 weights on a GPU; f32 and bf16 on the CPU. `FEP_BENCH_QUICK=1` shortens
//! the runs.

mod common;

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fep_kernels::settle::{
    self, Activation, Gradients, Layer, Network, Precision, SettleOutputs, SettleSpec,
};
use fep_kernels::{Device, DeviceBuffer, Element, bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

struct Config {
    name: &'static str,
    widths: &'static [usize],
    batch: usize,
    steps: &'static [u32],
    /// Whether the CPU runs it.
    cpu: bool,
    /// Whether GPUs run it.
    gpu: bool,
}

const CONFIGS: [Config; 6] = [
    Config {
        name: "smoke",
        widths: &[64, 32, 32, 32, 10],
        batch: 32,
        steps: &[8],
        cpu: true,
        gpu: false,
    },
    // issue 24's CPU shapes: a PC learning step 64-64-10, T 20 (plain PyTorch eager: 1.13 ms at
    // B 64, 2.6 ms at B 256 on one thread of the 2-core machine)
    Config {
        name: "pc64_b64",
        widths: &[64, 64, 10],
        batch: 64,
        steps: &[20],
        cpu: true,
        gpu: false,
    },
    Config {
        name: "pc64_b256",
        widths: &[64, 64, 10],
        batch: 256,
        steps: &[20],
        cpu: true,
        gpu: false,
    },
    Config {
        name: "pcx",
        widths: &[784, 128, 128, 128, 10],
        batch: 256,
        steps: &[8, 32],
        cpu: true,
        gpu: true,
    },
    Config {
        name: "wide",
        widths: &[784, 4096, 4096, 4096, 10],
        batch: 1024,
        steps: &[20],
        cpu: false,
        gpu: true,
    },
    Config {
        name: "wide_cpu",
        widths: &[784, 1024, 1024, 10],
        batch: 256,
        steps: &[20],
        cpu: true,
        gpu: false,
    },
];
const ETA: f32 = 0.1;
/// Distinct input batches cycled through, so small inputs are not always hot in L2.
const ROTATE: usize = 4;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Infer,
    Learn,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Infer => "infer",
            Mode::Learn => "learn",
        }
    }
}

/// f₁ = identity on the input, tanh on every hidden layer (PCX's MNIST setting).
fn activation(l: usize) -> Activation {
    if l == 0 {
        Activation::Identity
    } else {
        Activation::Tanh
    }
}

/// P = Σ_{l≥1} n_l n_{l−1} and P₂ = Σ_{l≥2} n_l n_{l−1}.
fn weight_counts(widths: &[usize]) -> (f64, f64) {
    let per: Vec<f64> = widths.windows(2).map(|w| (w[0] * w[1]) as f64).collect();
    (per.iter().sum(), per[1..].iter().sum())
}

/// FLOPs of one step, and the extra FLOPs of the gradients.
fn flops(c: &Config) -> (f64, f64) {
    let b = c.batch as f64;
    let (p, p2) = weight_counts(c.widths);
    (2.0 * b * p + 2.0 * b * p2, 2.0 * b * p)
}

fn floors(c: &Config, mode: Mode, steps: u32, elem: usize) -> String {
    let (b, t) = (c.batch as f64, steps as f64);
    let (p, _) = weight_counts(c.widths);
    let (step, grad) = flops(c);
    let n_free: f64 = c.widths[1..].iter().sum::<usize>() as f64;
    let (n0, nl) = (c.widths[0] as f64, *c.widths.last().unwrap() as f64);
    let mut bytes = elem as f64 * p + 4.0 * b * n0 + 8.0 * b * n_free;
    let mut total = t * step;
    if mode == Mode::Learn {
        bytes += 4.0 * b * nl + 4.0 * (p + n_free);
        total += grad;
    }
    format!(
        "settle {} {}: B={} widths={:?} T={}: {:.4} GFLOP per step, {:.4} GFLOP per settle{}, DRAM floor {:.2} MB",
        c.name,
        mode.name(),
        c.batch,
        c.widths,
        steps,
        step / 1e9,
        total / 1e9,
        if mode == Mode::Learn {
            format!(" (incl. {:.4} GFLOP of gradients)", grad / 1e9)
        } else {
            String::new()
        },
        bytes / 1e6
    )
}

/// The random network and inputs of a configuration, as f32 (W ~ N(0, 1/n_{l−1}), small
/// biases, x₀ ~ N(0, 1), one-hot targets).
struct Problem {
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
    x0: Vec<Vec<f32>>,
    target: Vec<Vec<f32>>,
}

fn problem(c: &Config, seed: u64) -> Problem {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| scale * rng.sample::<f32, _>(StandardNormal))
            .collect()
    };
    let mut weights = Vec::new();
    let mut biases = Vec::new();
    for w in c.widths.windows(2) {
        weights.push(normal(w[0] * w[1], 1.0 / (w[0] as f32).sqrt()));
        biases.push(normal(w[1], 0.1));
    }
    let x0 = (0..ROTATE)
        .map(|_| normal(c.batch * c.widths[0], 1.0))
        .collect();
    let nl = *c.widths.last().unwrap();
    let target = (0..ROTATE)
        .map(|_| {
            let mut t = vec![0f32; c.batch * nl];
            for s in 0..c.batch {
                t[s * nl + rng.random_range(0..nl)] = 1.0;
            }
            t
        })
        .collect();
    Problem {
        weights,
        biases,
        x0,
        target,
    }
}

/// The output buffers of one configuration.
struct Outputs {
    x: Vec<DeviceBuffer<f32>>,
    eps: Vec<DeviceBuffer<f32>>,
    energy: DeviceBuffer<f32>,
    steps: DeviceBuffer<u32>,
    grad_w: Vec<DeviceBuffer<f32>>,
    grad_b: Vec<DeviceBuffer<f32>>,
}

impl Outputs {
    fn new(dev: &Device, c: &Config) -> Outputs {
        let per_layer = |n: &dyn Fn(&[usize]) -> usize| -> Vec<DeviceBuffer<f32>> {
            c.widths
                .windows(2)
                .map(|w| dev.alloc(n(w)).unwrap())
                .collect()
        };
        Outputs {
            x: per_layer(&|w| c.batch * w[1]),
            eps: per_layer(&|w| c.batch * w[1]),
            energy: dev.alloc(c.batch).unwrap(),
            steps: dev.alloc(c.batch).unwrap(),
            grad_w: per_layer(&|w| w[0] * w[1]),
            grad_b: per_layer(&|w| w[1]),
        }
    }
    fn state(&mut self) -> SettleOutputs<'_> {
        SettleOutputs {
            x: self.x.iter_mut().map(|b| b.view_mut()).collect(),
            eps: self.eps.iter_mut().map(|b| b.view_mut()).collect(),
            energy: Some(self.energy.view_mut()),
            trace: None,
            steps: Some(self.steps.view_mut()),
        }
    }
}

fn bench_dtype<T: Element>(cr: &mut Criterion, dev: &Device, c: &Config, ci: usize, quick: bool) {
    let dtype = T::DTYPE.suffix();
    let p = problem(c, 11 + ci as u64);
    let to_t = |v: &[f32]| -> Vec<T> { v.iter().map(|&x| T::from_f64(x as f64)).collect() };
    let weights: Vec<DeviceBuffer<T>> = p
        .weights
        .iter()
        .map(|w| dev.upload(&to_t(w)).unwrap())
        .collect();
    let biases: Vec<DeviceBuffer<T>> = p
        .biases
        .iter()
        .map(|b| dev.upload(&to_t(b)).unwrap())
        .collect();
    let x0: Vec<_> = p.x0.iter().map(|x| dev.upload(x).unwrap()).collect();
    let target: Vec<_> = p.target.iter().map(|t| dev.upload(t).unwrap()).collect();
    let layers = weights
        .iter()
        .zip(&biases)
        .enumerate()
        .map(|(l, (w, b))| {
            Layer::new(w.view(), activation(l), Precision::Scalar(1.0)).bias(b.view())
        })
        .collect();
    let net = Network::new(c.widths, layers).unwrap();
    let mut out = Outputs::new(dev, c);
    let stream = dev.default_stream();
    let backend = dev.kind().name();
    for mode in [Mode::Infer, Mode::Learn] {
        let mut group = cr.benchmark_group(format!(
            "{backend}_settle_{}_{}_{dtype}",
            c.name,
            mode.name()
        ));
        let samples = if quick || !dev.is_gpu() { 10 } else { 20 };
        group.sample_size(samples);
        group.warm_up_time(Duration::from_millis(if quick { 200 } else { 500 }));
        group.measurement_time(Duration::from_secs(if quick { 1 } else { 2 }));
        for &steps in c.steps {
            println!(
                "{} on {}",
                floors(c, mode, steps, T::DTYPE.size()),
                dev.name()
            );
            let spec = SettleSpec::new(ETA).steps(steps).check_finite(false);
            group.throughput(Throughput::Elements(c.batch as u64 * steps as u64));
            let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
            let mut i = 0;
            let id = format!(
                "B{}_{}_T{steps}",
                c.batch,
                c.widths
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("-")
            );
            group.bench_function(BenchmarkId::from_parameter(&id), |bch| {
                bch.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        let k = i % ROTATE;
                        i += 1;
                        match mode {
                            Mode::Infer => {
                                settle::infer_into(&net, &spec, &x0[k].view(), out.state(), stream)
                                    .unwrap();
                            }
                            Mode::Learn => {
                                let Outputs {
                                    x,
                                    eps,
                                    energy,
                                    steps,
                                    grad_w,
                                    grad_b,
                                } = &mut out;
                                let state = SettleOutputs {
                                    x: x.iter_mut().map(|b| b.view_mut()).collect(),
                                    eps: eps.iter_mut().map(|b| b.view_mut()).collect(),
                                    energy: Some(energy.view_mut()),
                                    trace: None,
                                    steps: Some(steps.view_mut()),
                                };
                                let grads = Gradients {
                                    weights: grad_w.iter_mut().map(|b| b.view_mut()).collect(),
                                    biases: grad_b.iter_mut().map(|b| b.view_mut()).collect(),
                                    precisions: Vec::new(),
                                };
                                settle::learn_step_into(
                                    &net,
                                    &spec,
                                    &x0[k].view(),
                                    &target[k].view(),
                                    state,
                                    grads,
                                    stream,
                                )
                                .unwrap();
                            }
                        }
                        dev.synchronize(stream).unwrap();
                        black_box(&out.x);
                    }
                    let elapsed = t0.elapsed();
                    record.lock().unwrap().push((iters, elapsed));
                    elapsed
                })
            });
            if let Some(per_settle) = common::median_per_iter(&record.lock().unwrap(), samples) {
                let (step_flops, grad_flops) = flops(c);
                let total =
                    steps as f64 * step_flops + if mode == Mode::Learn { grad_flops } else { 0.0 };
                println!(
                    "{backend}_settle_{}_{}_{dtype}/{id}: {:.4} ms per settle, {:.2} us per step, {:.1} GFLOP/s at the floor",
                    c.name,
                    mode.name(),
                    per_settle * 1e3,
                    per_settle / steps as f64 * 1e6,
                    total / per_settle / 1e9
                );
            }
        }
        group.finish();
    }
}

fn bench(cr: &mut Criterion) {
    let quick = common::quick();
    let devices = common::devices("settle");
    for dev in &devices {
        for (ci, c) in CONFIGS.iter().enumerate() {
            if !(if dev.is_gpu() { c.gpu } else { c.cpu }) {
                continue;
            }
            bench_dtype::<f32>(cr, dev, c, ci, quick);
            bench_dtype::<bf16>(cr, dev, c, ci, quick);
            if dev.is_gpu() {
                bench_dtype::<f16>(cr, dev, c, ci, quick);
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
