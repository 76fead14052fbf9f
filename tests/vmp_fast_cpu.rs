//! The fast CPU VMP (`Device::cpu()`) beyond what tests/vmp_gpu.rs (run with
//! `FEP_TEST_DEVICE=cpu`) holds it to: results independent of the thread count (bitwise), the
//! reference's errors for bad data with nothing written, learning (which stays on the f64
//! reference) equal to the reference's, and the fast path against the reference on the pymdp
//! fixture models. `timings` (ignored) prints rough per-agent times.

mod common;

use common::rng;
use common::vmp::*;
use fep_kernels::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec,
    SequenceOutputs, SequenceSpec, StatesOutputs,
};
use fep_kernels::{Device, DeviceBuffer, Error, set_num_threads};
use std::sync::Mutex;

/// set_num_threads is process-wide: the tests that change it run one at a time.
static THREADS: Mutex<()> = Mutex::new(());

struct Outs {
    states: Vec<Vec<f32>>,
    iters: Vec<i32>,
    seq: Vec<Vec<f32>>,
    pol: Vec<Vec<f32>>,
}

/// Everything the fast path computes for one model and batch, with the current thread count.
fn run_all(spec: &ModelSpec, gamma: f32, n: usize, seed: u64) -> Outs {
    let dev = Device::cpu();
    let model = Model::new(&dev, spec).unwrap();
    let mut r = rng(seed);
    let idx = dev
        .upload(&random_index_obs(&mut r, &spec.num_obs, n))
        .unwrap();
    let dist = dev
        .upload(&to_f32(&random_dist_obs(&mut r, &spec.num_obs, n)))
        .unwrap();
    let prior = dev
        .upload(&to_f32(&random_prior(&mut r, &spec.num_states, n)))
        .unwrap();
    let mut states = Vec::new();
    let mut iters = Vec::new();
    for (obs, p, fspec) in [
        (Obs::Index(idx.view()), None, FpiSpec::new()),
        (Obs::Dist(dist.view()), Some(prior.view()), FpiSpec::new()),
        (
            Obs::Index(idx.view()),
            None,
            FpiSpec::new().iters(30).tol(1e-3),
        ),
    ] {
        let out = vmp::infer_states(&model, &fspec, &obs, p.as_ref()).unwrap();
        states.push(out.qs.to_vec().unwrap());
        states.push(out.vfe.to_vec().unwrap());
        states.push(out.vfe_trace.to_vec().unwrap());
        iters.extend(out.iterations.to_vec().unwrap());
    }
    let steps = 3;
    let sidx = dev
        .upload(&random_index_obs(&mut r, &spec.num_obs, n * steps))
        .unwrap();
    let controls = if spec.num_controls.is_empty() {
        vec![1; spec.num_states.len()]
    } else {
        spec.num_controls.clone()
    };
    let acts = dev
        .upload(&random_actions(&mut r, &controls, n * (steps - 1)))
        .unwrap();
    let mut seq = Vec::new();
    for (method, tau) in [(Method::Vmp, 1.0), (Method::Mmp, 1.0), (Method::Vmp, 0.5)] {
        let out = vmp::infer_sequence(
            &model,
            &SequenceSpec::new(method).tau(tau),
            steps,
            &Obs::Index(sidx.view()),
            Some(&acts.view()),
            None,
        )
        .unwrap();
        seq.push(out.qs.to_vec().unwrap());
        seq.push(out.vfe.to_vec().unwrap());
        seq.push(out.vfe_t.to_vec().unwrap());
    }
    let mut pol = Vec::new();
    if model.num_policies() > 0 {
        let qs = dev
            .upload(&to_f32(&random_beliefs(&mut r, &spec.num_states, n)))
            .unwrap();
        let novelty = !spec.pa.is_empty() || !spec.pb.is_empty();
        for terms in [
            (true, true, false),
            (true, true, novelty),
            (false, true, false),
        ] {
            let ps = PolicySpec::new()
                .gamma(gamma)
                .terms(terms.0, terms.1, terms.2);
            let out = vmp::infer_policies(&model, &ps, &qs.view()).unwrap();
            pol.push(out.g.to_vec().unwrap());
            pol.push(out.q_pi.to_vec().unwrap());
        }
    }
    Outs {
        states,
        iters,
        seq,
        pol,
    }
}

fn same_bits(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "{what} #{i}: lengths");
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            assert_eq!(u.to_bits(), v.to_bits(), "{what} #{i}[{j}]: {u} vs {v}");
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let _g = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    for m in fixture_models() {
        // 101 agents: several chunks of 32 and a ragged last one.
        let one = {
            set_num_threads(1).unwrap();
            run_all(&m.spec, m.gamma as f32, 101, 5)
        };
        for threads in [2, 3] {
            set_num_threads(threads).unwrap();
            let many = run_all(&m.spec, m.gamma as f32, 101, 5);
            let what = format!("{} with {threads} threads", m.name);
            same_bits(&format!("{what}: states"), &one.states, &many.states);
            assert_eq!(one.iters, many.iters, "{what}: iterations");
            same_bits(&format!("{what}: sequences"), &one.seq, &many.seq);
            same_bits(&format!("{what}: policies"), &one.pol, &many.pol);
        }
    }
    set_num_threads(0).unwrap();
}

/// Largest |a − b| over two runs of the same outputs (fast f32 vs reference).
fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(u, v)| (*u as f64 - *v as f64).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn the_fixture_models_match_the_reference() {
    // The pymdp fixture models at N = 64: the fast path against Device::reference() (f64,
    // rounded to f32 on output). Beliefs and q(π) within 1e-4 (the bound against pymdp),
    // free energies and G within 1e-4 relative to max(1, |value|).
    for m in fixture_models() {
        let fast = run_all(&m.spec, m.gamma as f32, 64, 9);
        let reference = {
            // The same calls on the reference device.
            let dev = Device::reference();
            let model = Model::new(&dev, &m.spec).unwrap();
            let mut r = rng(9);
            let n = 64;
            let idx = dev
                .upload(&random_index_obs(&mut r, &m.spec.num_obs, n))
                .unwrap();
            let out =
                vmp::infer_states(&model, &FpiSpec::new(), &Obs::Index(idx.view()), None).unwrap();
            out.qs.to_vec().unwrap()
        };
        let e = max_abs(&fast.states[..1], &[reference]);
        assert!(e <= 1e-4, "{}: states qs error {e:.3e}", m.name);
        for (i, (g, q)) in fast.pol.chunks(2).map(|c| (&c[0], &c[1])).enumerate() {
            assert!(g.iter().all(|v| v.is_finite()), "{}: G #{i}", m.name);
            let sums: Vec<f32> = q
                .chunks(m.spec.policies.len() / (m.spec.policy_len * m.spec.num_states.len()))
                .map(|c| c.iter().sum())
                .collect();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "{}: q(pi) #{i} sums",
                m.name
            );
        }
    }
}

fn poisoned(dev: &Device, len: usize) -> DeviceBuffer<f32> {
    dev.upload(&vec![f32::NAN; len]).unwrap()
}

fn untouched(buf: &DeviceBuffer<f32>) {
    assert!(buf.to_vec().unwrap().iter().all(|v| v.is_nan()));
}

/// The same error (variant, argument and message) from the fast path and the reference.
fn same_error(fast: Result<(), Error>, reference: Result<(), Error>, name: &str) {
    let (f, r) = (fast.unwrap_err(), reference.unwrap_err());
    assert_eq!(format!("{f:?}"), format!("{r:?}"));
    match f {
        Error::InvalidArgument { name: got, .. } => assert_eq!(got, name),
        other => panic!("expected InvalidArgument naming {name}, got {other:?}"),
    }
}

#[test]
fn bad_data_gives_the_references_errors_and_writes_nothing() {
    let m = &fixture_models()[2]; // five_factor
    let spec = &m.spec;
    let n = 40;
    let mut r = rng(3);
    let idx_ok = random_index_obs(&mut r, &spec.num_obs, n);
    let dist_ok = to_f32(&random_dist_obs(&mut r, &spec.num_obs, n));
    let prior_ok = to_f32(&random_prior(&mut r, &spec.num_states, n));
    let s: usize = spec.num_states.iter().sum();
    let states = |dev: &Device, obs: &[i32], dist: Option<&[f32]>, prior: Option<&[f32]>| {
        let model = Model::new(dev, spec).unwrap();
        let (iv, dv) = (
            dev.upload(obs).unwrap(),
            dist.map(|d| dev.upload(d).unwrap()),
        );
        let pv = prior.map(|p| dev.upload(p).unwrap());
        let o = match &dv {
            Some(d) => Obs::Dist(d.view()),
            None => Obs::Index(iv.view()),
        };
        let mut qs = poisoned(dev, n * s);
        let mut vfe = poisoned(dev, n);
        let p = pv.as_ref().map(|p| p.view());
        let res = vmp::infer_states_into(
            &model,
            &FpiSpec::new(),
            &o,
            p.as_ref(),
            StatesOutputs {
                qs: qs.view_mut(),
                vfe: Some(vfe.view_mut()),
                iterations: None,
                vfe_trace: None,
            },
            dev.default_stream(),
        );
        if res.is_err() {
            untouched(&qs);
            untouched(&vfe);
        }
        res
    };
    let (cpu, refd) = (Device::cpu(), Device::reference());
    let mut bad_idx = idx_ok.clone();
    bad_idx[7] = spec.num_obs[7 % spec.num_obs.len()] as i32;
    same_error(
        states(&cpu, &bad_idx, None, None),
        states(&refd, &bad_idx, None, None),
        "obs",
    );
    let mut bad_dist = dist_ok.clone();
    bad_dist[11] = -0.5;
    same_error(
        states(&cpu, &idx_ok, Some(&bad_dist), None),
        states(&refd, &idx_ok, Some(&bad_dist), None),
        "obs",
    );
    bad_dist[11] = f32::INFINITY;
    same_error(
        states(&cpu, &idx_ok, Some(&bad_dist), None),
        states(&refd, &idx_ok, Some(&bad_dist), None),
        "obs",
    );
    let mut bad_prior = prior_ok.clone();
    bad_prior[5] = f32::NAN;
    same_error(
        states(&cpu, &idx_ok, None, Some(&bad_prior)),
        states(&refd, &idx_ok, None, Some(&bad_prior)),
        "prior",
    );
    assert!(states(&cpu, &idx_ok, Some(&dist_ok), Some(&prior_ok)).is_ok());

    // Sequences: an action out of range; policies: negative beliefs.
    let steps = 3;
    let sobs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let mut acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
    acts[9] = 7;
    let seq = |dev: &Device| {
        let model = Model::new(dev, spec).unwrap();
        let (o, a) = (dev.upload(&sobs).unwrap(), dev.upload(&acts).unwrap());
        let mut qs = poisoned(dev, n * steps * s);
        let res = vmp::infer_sequence_into(
            &model,
            &SequenceSpec::new(Method::Mmp),
            steps,
            &Obs::Index(o.view()),
            Some(&a.view()),
            None,
            SequenceOutputs {
                qs: qs.view_mut(),
                vfe: None,
                vfe_t: None,
            },
            dev.default_stream(),
        );
        untouched(&qs);
        res
    };
    same_error(seq(&cpu), seq(&refd), "actions");
    let mut beliefs = to_f32(&random_beliefs(&mut r, &spec.num_states, n));
    beliefs[3] = -1e-3;
    let pol = |dev: &Device| {
        let model = Model::new(dev, spec).unwrap();
        let q = dev.upload(&beliefs).unwrap();
        let p = model.num_policies();
        let (mut g, mut q_pi) = (poisoned(dev, n * p), poisoned(dev, n * p));
        let res = vmp::infer_policies_into(
            &model,
            &PolicySpec::new(),
            &q.view(),
            PolicyOutputs {
                g: Some(g.view_mut()),
                q_pi: q_pi.view_mut(),
            },
            dev.default_stream(),
        );
        untouched(&g);
        untouched(&q_pi);
        res
    };
    same_error(pol(&cpu), pol(&refd), "qs");
}

#[test]
fn learning_on_the_cpu_device_is_the_reference() {
    // Learning has no fast path: the CPU device runs the f64 reference (bitwise the same counts).
    for m in fixture_models() {
        let spec = m.with_counts(true, true, true);
        let (n, steps) = (50, 3);
        let mut r = rng(21);
        let obs = random_index_obs(&mut r, &spec.num_obs, n * steps);
        let qs = to_f32(&random_beliefs(&mut r, &spec.num_states, n * steps));
        let acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
        let counts = |dev: &Device| {
            let mut model = Model::new(dev, &spec).unwrap();
            let (o, q, a) = (
                dev.upload(&obs).unwrap(),
                dev.upload(&qs).unwrap(),
                dev.upload(&acts).unwrap(),
            );
            vmp::learn(
                &mut model,
                &LearnSpec::new(0.7, 0.3, 1.0),
                steps,
                &Obs::Index(o.view()),
                &q.view(),
                Some(&a.view()),
                dev.default_stream(),
            )
            .unwrap();
            (0..spec.num_obs.len())
                .map(|i| model.counts_a(i).unwrap().unwrap())
                .chain((0..spec.num_states.len()).map(|f| model.counts_b(f).unwrap().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            counts(&Device::cpu()),
            counts(&Device::reference()),
            "{}",
            m.name
        );
    }
}

/// Rough per-agent times, fast path vs reference (min of a few runs; the machine is shared).
/// `cargo test --release --test vmp_fast_cpu timings -- --ignored --nocapture`
#[test]
#[ignore]
fn timings() {
    let _g = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    let threads: usize = std::env::var("VMP_TIMING_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    set_num_threads(threads).unwrap();
    let best = |f: &mut dyn FnMut(), reps: usize| {
        (0..reps)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    for m in fixture_models() {
        for (dev, name) in [(Device::cpu(), "fast"), (Device::reference(), "reference")] {
            let model = Model::new(&dev, &m.without_counts()).unwrap();
            for n in [1000usize, 10000] {
                if name == "reference" && n > 1000 {
                    continue;
                }
                let mut r = rng(1);
                let idx = dev
                    .upload(&random_index_obs(&mut r, &m.spec.num_obs, n))
                    .unwrap();
                let s = model.belief_len();
                let mut qs = dev.alloc::<f32>(n * s).unwrap();
                let mut vfe = dev.alloc::<f32>(n).unwrap();
                let mut its = dev.alloc::<i32>(n).unwrap();
                let t = best(
                    &mut || {
                        vmp::infer_states_into(
                            &model,
                            &FpiSpec::new(),
                            &Obs::Index(idx.view()),
                            None,
                            StatesOutputs {
                                qs: qs.view_mut(),
                                vfe: Some(vfe.view_mut()),
                                iterations: Some(its.view_mut()),
                                vfe_trace: None,
                            },
                            dev.default_stream(),
                        )
                        .unwrap()
                    },
                    3,
                );
                println!(
                    "{} states {name} N={n} threads={threads}: {:.3} ms, {:.3} us/agent",
                    m.name,
                    t * 1e3,
                    t * 1e6 / n as f64
                );
                let beliefs = dev
                    .upload(&to_f32(&random_beliefs(&mut r, &m.spec.num_states, n)))
                    .unwrap();
                let p = model.num_policies();
                let mut g = dev.alloc::<f32>(n * p).unwrap();
                let mut q_pi = dev.alloc::<f32>(n * p).unwrap();
                let ps = PolicySpec::new().gamma(m.gamma as f32);
                let t = best(
                    &mut || {
                        vmp::infer_policies_into(
                            &model,
                            &ps,
                            &beliefs.view(),
                            PolicyOutputs {
                                g: Some(g.view_mut()),
                                q_pi: q_pi.view_mut(),
                            },
                            dev.default_stream(),
                        )
                        .unwrap()
                    },
                    3,
                );
                println!(
                    "{} policies (P={p}) {name} N={n} threads={threads}: {:.3} ms, {:.3} us/agent",
                    m.name,
                    t * 1e3,
                    t * 1e6 / n as f64
                );
            }
        }
    }
    set_num_threads(0).unwrap();
}
