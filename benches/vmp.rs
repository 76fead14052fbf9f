//! Variational message passing (discrete active inference, DESIGN.md §4.4): criterion
//! benchmarks at the configurations of issue 4, on the models of tests/fixtures/vmp_pymdp.json
//! (the same A, B, C, D, E and policy tables pymdp is run with in benches/peers/vmp.py).
//!
//! Groups are named `{backend}_vmp_{variant}_f32`; the benchmark id gives the batch N and K
//! (state inference) or P and H (policy inference). One iteration is one `*_into` call on the
//! whole batch, synchronised, inputs not re-checked (`check_inputs(false)`); input sets are
//! rotated (4 of them) so a batch is not always hot in L2.
//! - `tmaze_states`: the T-maze (F = 2, S = [5, 2]; M = 3, O = [5, 3, 3]; deps [0], [0, 1],
//!   [0, 1]); `infer_states_into`, fpi, K = 16 iterations, no early stop (tol = 0, as pymdp),
//!   index observations, prior D (no prior tensor), writing qs, vfe and iterations (no trace).
//!   N = 1, 1k, 100k.
//! - `five_factor_states`: the F = M = 5 model (S = [4, 5, 6, 5, 4], O = [5, 4, 6, 4, 5], deps
//!   [0, 2], [1], [3, 2, 4], [0, 1, 3], [4, 2]); as above, N = 1k, 100k.
//! - `grid_policies`: the 7×7 grid world (F = M = 1, S = O = 49, U = 4), P = 64 policies of
//!   H = 3 steps, γ = 3; `infer_policies_into` (utility + state information gain, no novelty,
//!   as pymdp's Agent), writing G and q(π), from beliefs that are random normalised vectors.
//!   N = 10k.
//!
//! Throughput: state inference counts agent-iterations (Elements = N·K, so criterion's
//! "elem/s" is agent-iterations/s; agents/s = that / K is printed after each benchmark);
//! policy inference counts agent-policies (Elements = N·P).
//!
//! Floors (f32; C = Σ_m P_m·|deps(m)| with P_m = Π_{f∈deps(m)} S_f, ΣS = Σ_f S_f), printed with
//! each configuration:
//! - state inference, per agent-iteration: C multiply-adds of the contraction
//!   Σ_{s∖f} ll_m[s] Π_{g≠f} q_g(s_g) (for every modality and each of its factors) and ΣS exps
//!   of the softmax; FLOPs per call = N·K·2C (the ΣS·N·K exps counted apart; the final free
//!   energy, about one more contraction per agent, is not counted). Minimal DRAM bytes per
//!   call: read the observations (4·N·M) and the prior when one is given (4·N·ΣS; none here),
//!   write qs (4·N·ΣS), vfe (4·N) and iterations (4·N), and the model's tables once (ln A:
//!   4·Σ_m O_m·P_m, ln D: 4·ΣS).
//!   - T-maze: C = 5 + 2·10 + 2·10 = 45 (90 FLOP) and 7 exps per agent-iteration; tables 368 B.
//!     N = 1: 416 B; N = 1k: 48.4 kB, 1.44 MFLOP; N = 100k: 4.80 MB (1.43 µs at 3.35 TB/s),
//!     144 MFLOP + 11.2 M exps.
//!   - five-factor: C = 2·24 + 5 + 3·120 + 3·100 + 2·24 = 761 (1522 FLOP) and 24 exps per
//!     agent-iteration; tables 5.6 kB. N = 1k: 130 kB, 24.4 MFLOP; N = 100k: 12.4 MB (3.70 µs
//!     at 3.35 TB/s), 2.44 GFLOP + 38.4 M exps.
//! - policy inference, per agent-policy and step τ: Σ_f S_f² (q_τ = B_f[:, :, u] q_{τ−1}) +
//!   Σ_m O_m·P_m (q(o_m) = A_m ⊗ q_τ) + Σ_m P_m (E_q H[A_m]) + Σ_m O_m (q(o_m)·C_m)
//!   multiply-adds and Σ_m O_m logs (H[q(o_m)]); P exps of the softmax per agent. That is the
//!   dense count, as pymdp evaluates it; policies sharing a prefix share its rollout, so the
//!   distinct (prefix, step) pairs (84 of the 192 for 64 = 4³ policies) bound what a kernel
//!   must compute, and the nonzeros of B and A (for the grid B has at most 2 per column and A
//!   217 of 2401) bound it further. Minimal DRAM bytes: read qs (4·N·ΣS), write G and q(π)
//!   (8·N·P), the tables once (A, H[A], C, B, ln E, the policy table).
//!   - grid, N = 10k: 4900 multiply-adds and 49 logs per agent-policy-step: 29.4 kFLOP per
//!     agent-policy, 18.8 GFLOP per call dense (8.2 GFLOP with shared prefixes, 0.68 GFLOP
//!     also skipping the zeros of A and B), 94 M logs; DRAM floor 7.13 MB (2.1 µs at
//!     3.35 TB/s): compute-bound unless the structure is used.
//!
//! The CPU backend (the f64 reference) runs small batches only (T-maze N = 1 and 1k,
//! five-factor N = 100, grid policies N = 32), so `cargo bench --bench vmp` stays short on a
//! machine without a GPU. `FEP_BENCH_QUICK=1` shortens the runs.

mod common;

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fep_kernels::vmp::{
    self, FpiSpec, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec, StatesOutputs,
};
use fep_kernels::{Device, DeviceBuffer};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

/// The pymdp fixture (embedded, so the bench binary runs from any directory on a GPU machine).
const FIXTURE: &str = include_str!("../tests/fixtures/vmp_pymdp.json");
/// H100 SXM HBM3 bandwidth, for the "time at the DRAM floor" figures.
const HBM_BYTES_PER_S: f64 = 3.35e12;
/// Distinct input sets cycled through, so small inputs are not always hot in L2.
const ROTATE: usize = 4;
/// pymdp's default number of fpi iterations.
const K: u32 = 16;

#[derive(Clone, Copy, PartialEq)]
enum Op {
    States,
    Policies,
}

struct Variant {
    name: &'static str,
    /// The model's name in the fixture.
    model: &'static str,
    op: Op,
    gpu_batches: &'static [usize],
    cpu_batches: &'static [usize],
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "tmaze_states",
        model: "tmaze",
        op: Op::States,
        gpu_batches: &[1, 1_000, 100_000],
        // issue 24: N = 1k and 10k agents against pymdp's jitted, vmapped agent on the CPU
        cpu_batches: &[1, 1_000, 10_000],
    },
    Variant {
        name: "five_factor_states",
        model: "five_factor",
        op: Op::States,
        gpu_batches: &[1_000, 100_000],
        cpu_batches: &[1_000, 10_000],
    },
    Variant {
        name: "grid_policies",
        model: "grid7x7",
        op: Op::Policies,
        gpu_batches: &[10_000],
        cpu_batches: &[1_000],
    },
];

// ---- the fixture's models ----

/// A tensor of the fixture: `{shape, data}` dense row-major, or `{shape, fill, index, data}`
/// (all elements `fill` except the flat positions `index`).
fn tensor(v: &Value) -> Vec<f64> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .expect("tensor without shape")
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let len: usize = shape.iter().product();
    let data: Vec<f64> = v["data"]
        .as_array()
        .expect("tensor without data")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    match v.get("index") {
        None => {
            assert_eq!(data.len(), len, "dense tensor of shape {shape:?}");
            data
        }
        Some(index) => {
            let mut out = vec![v["fill"].as_f64().unwrap(); len];
            for (i, x) in index.as_array().unwrap().iter().zip(data) {
                out[i.as_u64().unwrap() as usize] = x;
            }
            out
        }
    }
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The fixture's model `name` as a spec (A, B, C, D, E, policies; no Dirichlet counts), and γ.
fn fixture_model(name: &str) -> (ModelSpec, f32) {
    let doc: Value = serde_json::from_str(FIXTURE).expect("vmp_pymdp.json is not valid JSON");
    let m = doc["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("model {name} is not in vmp_pymdp.json"));
    let list =
        |key: &str| -> Vec<Vec<f64>> { m[key].as_array().unwrap().iter().map(tensor).collect() };
    let spec = ModelSpec {
        num_states: usizes(&m["num_states"]),
        num_controls: usizes(&m["num_controls"]),
        num_obs: usizes(&m["num_obs"]),
        a_deps: m["A_dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(usizes)
            .collect(),
        a: list("A"),
        b: list("B"),
        c: list("C"),
        d: list("D"),
        policies: m["policies"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect(),
        policy_len: m["policy_len"].as_u64().unwrap() as usize,
        e: if m["E"].is_null() {
            vec![]
        } else {
            tensor(&m["E"])
        },
        ..Default::default()
    };
    (spec, m["gamma"].as_f64().unwrap() as f32)
}

// ---- floors ----

fn human_bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.3} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.2} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
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

/// P_m = Π_{f ∈ deps(m)} S_f.
fn sizes(s: &ModelSpec) -> Vec<usize> {
    s.a_deps
        .iter()
        .map(|d| d.iter().map(|&f| s.num_states[f]).product())
        .collect()
}

struct Floor {
    /// Minimal DRAM bytes per call.
    bytes: f64,
    /// FLOPs per call (2 per multiply-add), and the transcendental calls (exp, log) apart.
    flops: f64,
    transcendentals: f64,
    /// Counted elements per call (agent-iterations or agent-policies).
    elements: f64,
    text: String,
}

fn states_floor(s: &ModelSpec, n: usize, k: u32) -> Floor {
    let p = sizes(s);
    let c: usize = p.iter().zip(&s.a_deps).map(|(p, d)| p * d.len()).sum();
    let sum_s: usize = s.num_states.iter().sum();
    let m = s.num_obs.len();
    // one exact pass when F = 1 (pymdp ignores num_iter then)
    let k_eff = if s.num_states.len() == 1 { 1 } else { k } as f64;
    let tables = 4.0 * (s.num_obs.iter().zip(&p).map(|(o, p)| o * p).sum::<usize>() + sum_s) as f64;
    let nf = n as f64;
    let bytes = 4.0 * nf * m as f64 + 4.0 * nf * sum_s as f64 + 8.0 * nf + tables;
    let flops = nf * k_eff * 2.0 * c as f64;
    let exps = nf * k_eff * sum_s as f64;
    let text = format!(
        "N={n} K={k}: {c} multiply-adds ({} FLOP) + {sum_s} exps per agent-iteration; per call {:.4} MFLOP + {:.4} M exps; DRAM floor {} (tables {tables} B) = {} at 3.35 TB/s",
        2 * c,
        flops / 1e6,
        exps / 1e6,
        human_bytes(bytes),
        human_secs(bytes / HBM_BYTES_PER_S)
    );
    Floor {
        bytes,
        flops,
        transcendentals: exps,
        elements: nf * k as f64,
        text,
    }
}

fn policies_floor(s: &ModelSpec, n: usize) -> Floor {
    let p_m = sizes(s);
    let f_count = s.num_states.len();
    let h = s.policy_len;
    let num_pol = s.policies.len() / (h * f_count);
    let sum_s: usize = s.num_states.iter().sum();
    let sum_o: usize = s.num_obs.iter().sum();
    let u: Vec<usize> = s.num_controls.clone();
    let a_size: usize = s.num_obs.iter().zip(&p_m).map(|(o, p)| o * p).sum();
    let b_step: usize = s.num_states.iter().map(|&x| x * x).sum();
    let step_macs = b_step + a_size + p_m.iter().sum::<usize>() + sum_o;
    let step_logs = sum_o;
    // nonzeros: per step one slice B_f[:, :, u] (the mean over u of its nonzeros) and A
    let b_nnz: f64 =
        s.b.iter()
            .zip(&u)
            .map(|(b, &uf)| b.iter().filter(|&&x| x != 0.0).count() as f64 / uf as f64)
            .sum();
    let a_nnz = s.a.iter().flatten().filter(|&&x| x != 0.0).count() as f64;
    let sparse_step = b_nnz + a_nnz + p_m.iter().sum::<usize>() as f64 + sum_o as f64;
    // distinct (prefix, step) pairs of the policy table
    let mut distinct = 0usize;
    for t in 1..=h {
        let mut prefixes: Vec<&[i32]> = (0..num_pol)
            .map(|p| &s.policies[p * h * f_count..p * h * f_count + t * f_count])
            .collect();
        prefixes.sort();
        prefixes.dedup();
        distinct += prefixes.len();
    }
    let nf = n as f64;
    let agent_policies = nf * num_pol as f64;
    let flops = agent_policies * h as f64 * 2.0 * step_macs as f64;
    let shared = nf * distinct as f64 * 2.0 * step_macs as f64;
    let sparse_shared = nf * distinct as f64 * 2.0 * sparse_step;
    let logs = agent_policies * h as f64 * step_logs as f64;
    let exps = agent_policies;
    let tables = 4.0
        * (a_size
            + p_m.iter().sum::<usize>()
            + sum_o
            + s.b.iter().map(|b| b.len()).sum::<usize>()
            + num_pol
            + s.policies.len()) as f64;
    let bytes = 4.0 * nf * sum_s as f64 + 8.0 * agent_policies + tables;
    let text = format!(
        "N={n} P={num_pol} H={h}: {step_macs} multiply-adds + {step_logs} logs per agent-policy-step ({:.1} kFLOP per agent-policy); per call {:.4} GFLOP dense, {:.4} GFLOP with shared prefixes ({distinct} of {} policy-steps), {:.4} GFLOP also skipping zeros of A and B; {:.3} M logs + {:.3} M exps; DRAM floor {} (tables {tables} B) = {} at 3.35 TB/s",
        2.0 * (h * step_macs) as f64 / 1e3,
        flops / 1e9,
        shared / 1e9,
        num_pol * h,
        sparse_shared / 1e9,
        logs / 1e6,
        exps / 1e6,
        human_bytes(bytes),
        human_secs(bytes / HBM_BYTES_PER_S)
    );
    Floor {
        bytes,
        flops,
        transcendentals: logs + exps,
        elements: agent_policies,
        text,
    }
}

// ---- inputs ----

/// ROTATE sets of `[N, M]` observation indices, uniform in 0..O_m.
fn observations(s: &ModelSpec, n: usize, seed: u64) -> Vec<Vec<i32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..ROTATE)
        .map(|_| {
            (0..n)
                .flat_map(|_| {
                    s.num_obs
                        .iter()
                        .map(|&o| rng.random_range(0..o as i32))
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect()
}

/// ROTATE sets of `[N, ΣS]` beliefs: per factor, uniform(0, 1) entries normalised to sum 1.
fn beliefs(s: &ModelSpec, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..ROTATE)
        .map(|_| {
            let mut q = Vec::with_capacity(n * s.num_states.iter().sum::<usize>());
            for _ in 0..n {
                for &sf in &s.num_states {
                    let v: Vec<f32> = (0..sf).map(|_| rng.random_range(1e-3f32..1.0)).collect();
                    let sum: f32 = v.iter().sum();
                    q.extend(v.iter().map(|x| x / sum));
                }
            }
            q
        })
        .collect()
}

fn bench_variant(cr: &mut Criterion, dev: &Device, v: &Variant, vi: usize, quick: bool) {
    let (spec, gamma) = fixture_model(v.model);
    let model = Model::new(dev, &spec).expect("the fixture model is valid");
    let backend = dev.kind().name();
    let group_name = format!("{backend}_vmp_{}_f32", v.name);
    let mut group = cr.benchmark_group(&group_name);
    let samples = if quick || !dev.is_gpu() { 10 } else { 20 };
    group.sample_size(samples);
    group.warm_up_time(Duration::from_millis(if quick { 200 } else { 500 }));
    group.measurement_time(Duration::from_secs(if quick { 1 } else { 2 }));
    let stream = dev.default_stream();
    let sum_s = model.belief_len();
    let batches = if dev.is_gpu() {
        v.gpu_batches
    } else {
        v.cpu_batches
    };
    for &n in batches {
        let seed = 4_000 + 97 * vi as u64 + n as u64;
        let floor = match v.op {
            Op::States => states_floor(&spec, n, K),
            Op::Policies => policies_floor(&spec, n),
        };
        println!("vmp {} {} on {}", v.name, floor.text, dev.name());
        group.throughput(Throughput::Elements(floor.elements as u64));
        let record: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
        let mut i = 0usize;
        let id = match v.op {
            Op::States => format!("N{n}_K{K}"),
            Op::Policies => format!("N{n}_P{}_H{}", model.num_policies(), model.policy_len()),
        };
        match v.op {
            Op::States => {
                let obs: Vec<DeviceBuffer<i32>> = observations(&spec, n, seed)
                    .iter()
                    .map(|o| dev.upload(o).unwrap())
                    .collect();
                let mut qs: DeviceBuffer<f32> = dev.alloc(n * sum_s).unwrap();
                let mut vfe: DeviceBuffer<f32> = dev.alloc(n).unwrap();
                let mut iters: DeviceBuffer<i32> = dev.alloc(n).unwrap();
                let fpi = FpiSpec::new().iters(K).tol(0.0).check_inputs(false);
                group.bench_function(BenchmarkId::from_parameter(&id), |bch| {
                    bch.iter_custom(|reps| {
                        let t0 = Instant::now();
                        for _ in 0..reps {
                            let o = &obs[i % ROTATE];
                            i += 1;
                            let out = StatesOutputs {
                                qs: qs.view_mut(),
                                vfe: Some(vfe.view_mut()),
                                iterations: Some(iters.view_mut()),
                                vfe_trace: None,
                            };
                            vmp::infer_states_into(
                                &model,
                                &fpi,
                                &Obs::Index(o.view()),
                                None,
                                out,
                                stream,
                            )
                            .unwrap();
                            dev.synchronize(stream).unwrap();
                            black_box(&qs);
                        }
                        let elapsed = t0.elapsed();
                        record.lock().unwrap().push((reps, elapsed));
                        elapsed
                    })
                });
            }
            Op::Policies => {
                let qs: Vec<DeviceBuffer<f32>> = beliefs(&spec, n, seed)
                    .iter()
                    .map(|q| dev.upload(q).unwrap())
                    .collect();
                let p = model.num_policies();
                let mut g: DeviceBuffer<f32> = dev.alloc(n * p).unwrap();
                let mut q_pi: DeviceBuffer<f32> = dev.alloc(n * p).unwrap();
                let pspec = PolicySpec::new()
                    .gamma(gamma)
                    .terms(true, true, false)
                    .check_inputs(false);
                group.bench_function(BenchmarkId::from_parameter(&id), |bch| {
                    bch.iter_custom(|reps| {
                        let t0 = Instant::now();
                        for _ in 0..reps {
                            let q = &qs[i % ROTATE];
                            i += 1;
                            let out = PolicyOutputs {
                                g: Some(g.view_mut()),
                                q_pi: q_pi.view_mut(),
                            };
                            vmp::infer_policies_into(&model, &pspec, &q.view(), out, stream)
                                .unwrap();
                            dev.synchronize(stream).unwrap();
                            black_box(&q_pi);
                        }
                        let elapsed = t0.elapsed();
                        record.lock().unwrap().push((reps, elapsed));
                        elapsed
                    })
                });
            }
        }
        if let Some(t) = common::median_per_iter(&record.lock().unwrap(), samples) {
            let rate = match v.op {
                Op::States => format!(
                    "{:.4e} agent-iterations/s, {:.4e} agents/s",
                    floor.elements / t,
                    n as f64 / t
                ),
                Op::Policies => format!(
                    "{:.4e} agent-policies/s, {:.4e} agents/s",
                    floor.elements / t,
                    n as f64 / t
                ),
            };
            println!(
                "{group_name}/{id}: {} per call, {rate}; {:.1} GFLOP/s and {:.3} G transcendentals/s at the floor, {:.1} GB/s of the DRAM floor ({:.2}% of 3.35 TB/s)",
                human_secs(t),
                floor.flops / t / 1e9,
                floor.transcendentals / t / 1e9,
                floor.bytes / t / 1e9,
                floor.bytes / t / HBM_BYTES_PER_S * 100.0
            );
        }
    }
    group.finish();
}

fn bench(cr: &mut Criterion) {
    let quick = common::quick();
    let devices = common::devices("vmp");
    for dev in &devices {
        for (vi, v) in VARIANTS.iter().enumerate() {
            bench_variant(cr, dev, v, vi, quick);
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
