//! A tour of fep-kernels: LCA sparse coding on the best device available (CUDA, then HIP, then
//! the fast CPU path), a few steps of dictionary learning, then predictive-coding settling and a
//! learning step of an MNIST-sized network, then discrete active inference (VMP) for a batch of
//! agents in a T-maze, then precision-weighted (Student-t) attention with a per-key precision.
//!
//!     cargo run --release --example tour                 # CPU
//!     cargo run --release --features cuda --example tour # NVIDIA GPU if present
//!     cargo run --release --example tour -- --reference  # the f64 reference (the CPU device
//!                                                        # before issue 24), for comparison
//!
//! Prints what it ran, where, the energy and sparsity reached, and how long each part took.

use std::time::Instant;

use fep_kernels::attention::{self, AttentionSpec, Precisions, Score, Tensor4};
use fep_kernels::lca::{Dictionary, LcaSpec, Threshold};
use fep_kernels::settle::{self, Activation, Layer, Network, Precision, SettleSpec};
use fep_kernels::vmp::{self, FpiSpec, Model, ModelSpec, Obs, PolicySpec};
use fep_kernels::{Device, Result};

/// A small deterministic generator, so the tour needs no dependency.
struct Lcg(u64);
impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

fn main() -> Result<()> {
    let dev = match std::env::args().nth(1).as_deref() {
        None => Device::best(),
        Some("--reference") => Device::reference(),
        Some(other) => {
            eprintln!("usage: tour [--reference] (unknown argument {other:?})");
            std::process::exit(2)
        }
    };
    let (batch, n, m, steps) = (256usize, 64usize, 256usize, 200u32);
    println!(
        "fep-kernels {} — LCA sparse coding on {:?}",
        fep_kernels::VERSION,
        dev
    );

    // A random dictionary with unit-norm columns, and signals made of 5 atoms each plus noise.
    let mut rng = Lcg(42);
    let mut phi: Vec<f32> = (0..n * m).map(|_| rng.normal()).collect();
    for j in 0..m {
        let norm = (0..n).map(|i| phi[i * m + j].powi(2)).sum::<f32>().sqrt();
        (0..n).for_each(|i| phi[i * m + j] /= norm);
    }
    let mut x = vec![0f32; batch * n];
    for s in 0..batch {
        for _ in 0..5 {
            let k = (rng.uniform() * m as f32) as usize % m;
            let v = 0.5 + rng.uniform();
            (0..n).for_each(|i| x[s * n + i] += v * phi[i * m + k]);
        }
        (0..n).for_each(|i| x[s * n + i] += 0.05 * rng.normal());
    }

    let t0 = Instant::now();
    let phi_dev = dev.upload(&phi)?;
    let mut dict = Dictionary::new(&phi_dev.view(), n, m, Default::default())?;
    let x_dev = dev.upload(&x)?;
    println!(
        "prepared Φ [{n} x {m}] and G = ΦᵀΦ − I in {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    let spec = LcaSpec::new(0.1)
        .eta(0.1)
        .steps(steps)
        .threshold(Threshold::Soft)
        .tol(1e-4)
        .trace(true);
    let out = dict.solve(&spec, &x_dev.view(), None)?; // warm-up: loads the kernels on a GPU
    let t1 = Instant::now();
    let reps = if dev.is_gpu() { 20 } else { 3 };
    for _ in 0..reps {
        let _ = dict.solve(&spec, &x_dev.view(), None)?;
    }
    let per_solve = t1.elapsed().as_secs_f64() / reps as f64;

    let a = out.a.to_vec()?;
    let taken = out.steps.to_vec()?;
    let energy = out.energy.as_ref().unwrap().to_vec()?;
    let active = a.iter().filter(|v| **v != 0.0).count();
    let mean = |f: &dyn Fn(usize) -> f32| (0..batch).map(f).sum::<f32>() / batch as f32;
    let first = mean(&|s| energy[s * steps as usize]);
    let last = mean(&|s| energy[s * steps as usize + steps as usize - 1]);
    println!(
        "coded {batch} samples (λ = {}, η = {}, up to {steps} steps, tol {}): mean energy {first:.4} after step 1 → {last:.4}, \
         {:.1}% of units active, {:.0} steps on average",
        spec.lambda,
        spec.eta,
        spec.tol,
        100.0 * active as f64 / a.len() as f64,
        taken.iter().map(|&t| t as f64).sum::<f64>() / batch as f64,
    );
    println!(
        "one solve of the batch: {:.3} ms ({:.2} µs per sample)",
        per_solve * 1e3,
        per_solve * 1e6 / batch as f64
    );

    // Dictionary learning: code, then move Φ toward the residuals, a few times.
    let t2 = Instant::now();
    let learn_spec = LcaSpec::new(0.1).eta(0.1).steps(100).trace(true);
    for epoch in 0..5 {
        let coded = dict.solve(&learn_spec, &x_dev.view(), None)?;
        let e = coded.energy.as_ref().unwrap().to_vec()?;
        let mean_e = (0..batch).map(|s| e[(s + 1) * 100 - 1]).sum::<f32>() / batch as f32;
        println!("learning epoch {epoch}: mean energy {mean_e:.4}");
        dict.learn(&x_dev.view(), &coded.a.view(), 0.5, dev.default_stream())?;
    }
    dev.synchronize(dev.default_stream())?;
    println!(
        "5 learning epochs in {:.2} ms",
        t2.elapsed().as_secs_f64() * 1e3
    );
    settle_tour(&dev, &mut rng)?;
    vmp_tour(&dev, &mut rng)?;
    attention_tour(&dev, &mut rng)
}

/// Student-t attention (ν = 4) in bf16 over 8 heads of 1024 tokens, with one precision per key
/// (keys 0..16 trusted 10×, the rest 1×) and causal masking; compared with the f64 reference on
/// the first head's last query row.
fn attention_tour(dev: &Device, rng: &mut Lcg) -> Result<()> {
    use fep_kernels::bf16;
    let (b, h, l, d) = (1usize, 8usize, 1024usize, 64usize);
    let n = b * h * l * d;
    let mut draw = |scale: f32| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(scale * rng.normal()))
            .collect()
    };
    let (qh, kh, vh) = (draw(0.3), draw(0.3), draw(1.0));
    let pk: Vec<f32> = (0..b * h * l)
        .map(|i| if i % l < 16 { 10.0 } else { 1.0 })
        .collect();
    let (q, k, v, pk_dev) = (
        dev.upload(&qh)?,
        dev.upload(&kh)?,
        dev.upload(&vh)?,
        dev.upload(&pk)?,
    );
    let shape = [b, h, l, d];
    let spec = AttentionSpec::new(Score::StudentT(4.0)).causal(true);
    let precision = Precisions {
        head: None,
        key: Some(pk_dev.view()),
        ..Default::default()
    };
    let run = || {
        attention::forward(
            &spec,
            &Tensor4::bhld(q.view(), shape),
            &Tensor4::bhld(k.view(), shape),
            &Tensor4::bhld(v.view(), shape),
            &precision,
            None,
        )
    };
    run()?; // warm-up (module load)
    let t = Instant::now();
    let out = run()?;
    dev.synchronize(dev.default_stream())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (o, e) = (out.o.to_vec()?, out.e.to_vec()?);
    // The reference on head 0's last row (it sees every key).
    let f = |x: &[bf16]| x[..l * d].iter().map(|a| a.to_f64()).collect::<Vec<_>>();
    let (q0, k0, v0) = (f(&qh), f(&kh), f(&vh));
    let pk0: Vec<f64> = pk[..l].iter().map(|&p| p as f64).collect();
    let want = attention::reference::forward(
        &spec,
        &attention::reference::RefInputs {
            b: 1,
            hq: 1,
            hkv: 1,
            lq: l,
            lk: l,
            d,
            dv: d,
            q: &q0,
            k: &k0,
            v: &v0,
            pi_head: None,
            pi_key: Some(&pk0),
            kv_len: None,
            ..Default::default()
        },
    )?;
    let row = (l - 1) * d;
    let diff = (0..d)
        .map(|c| (o[row + c].to_f64() - want.o[row + c]).abs())
        .fold(0.0, f64::max);
    println!(
        "Student-t attention (bf16, {h} heads × {l} tokens, D = {d}, per-key precision, causal): \
         {ms:.2} ms; head 0, last row: e = {:.3} (reference {:.3}), max |o − reference| = {diff:.1e}",
        e[l - 1],
        want.e[l - 1]
    );
    Ok(())
}

/// Predictive coding on PCX's MNIST network shape, 784-128-128-10 with tanh, random weights and
/// inputs: one learning step (output clamped) and its timing per settling step.
fn settle_tour(dev: &Device, rng: &mut Lcg) -> Result<()> {
    let widths = [784usize, 128, 128, 10];
    let batch = if dev.is_gpu() { 256 } else { 32 }; // the CPU reference is f64 and plain
    let steps = 20u32;
    println!("\npredictive-coding settling, {widths:?}, batch {batch}, T = {steps}");
    let mut bufs = Vec::new();
    for l in 1..widths.len() {
        let scale = 1.0 / (widths[l - 1] as f32).sqrt();
        let w: Vec<f32> = (0..widths[l] * widths[l - 1])
            .map(|_| scale * rng.normal())
            .collect();
        bufs.push(dev.upload(&w)?);
    }
    let acts = [Activation::Identity, Activation::Tanh, Activation::Tanh];
    let layers = bufs
        .iter()
        .zip(acts)
        .map(|(w, f)| Layer::new(w.view(), f, Precision::Scalar(1.0)))
        .collect();
    let net = Network::new(&widths, layers)?;
    let x0: Vec<f32> = (0..batch * widths[0]).map(|_| rng.uniform()).collect();
    let y: Vec<f32> = (0..batch * widths[3]).map(|_| rng.normal()).collect();
    let (x0, y) = (dev.upload(&x0)?, dev.upload(&y)?);
    let spec = SettleSpec::new(0.1).steps(steps).check_finite(false);
    let out = settle::learn_step(&net, &spec, &x0.view(), &y.view(), None)?; // warm-up
    let t = Instant::now();
    let reps = if dev.is_gpu() { 20 } else { 2 };
    for _ in 0..reps {
        let _ = settle::learn_step(&net, &spec, &x0.view(), &y.view(), None)?;
    }
    dev.synchronize(dev.default_stream())?;
    let per = t.elapsed().as_secs_f64() / reps as f64;
    let trace = out.state.trace.as_ref().unwrap().to_vec()?;
    let t1 = steps as usize + 1;
    let mean = |k: usize| (0..batch).map(|b| trace[b * t1 + k]).sum::<f32>() / batch as f32;
    let gw = out.grad_w[0].to_vec()?;
    println!(
        "learning step: mean energy {:.4} at the start → {:.4} settled; |dE/dW1| = {:.4}",
        mean(0),
        mean(steps as usize),
        gw.iter().map(|v| v * v).sum::<f32>().sqrt()
    );
    println!(
        "one learning step: {:.3} ms ({:.2} µs per settling step)",
        per * 1e3,
        per * 1e6 / steps as f64
    );
    Ok(())
}

/// A T-maze in pymdp's layout: where the agent is (centre, left arm, right arm, cue; four
/// actions, each moving there) and which arm is rewarded (two contexts, uncontrolled). It sees
/// its location, the reward (none, reward, punishment: 98% right in an arm) and, at the cue, the
/// context. A batch of agents at the centre infers its state, then scores the 16 two-step
/// policies (utility + information gain) and picks a first move.
fn vmp_tour(dev: &Device, rng: &mut Lcg) -> Result<()> {
    let (loc, ctx) = (4usize, 2usize);
    let mut a_reward = vec![0.0; 3 * loc * ctx]; // [o, location, context]
    let mut a_cue = vec![0.0; 2 * loc * ctx]; // [o, location, context]
    for c in 0..ctx {
        for l in 0..loc {
            let at = |o: usize| (o * loc + l) * ctx + c;
            match l {
                1 | 2 => {
                    let good = (l == 1) == (c == 0); // the left arm pays in context 0
                    a_reward[at(1)] = if good { 0.98 } else { 0.02 };
                    a_reward[at(2)] = if good { 0.02 } else { 0.98 };
                }
                _ => a_reward[at(0)] = 1.0,
            }
            for o in 0..2 {
                a_cue[at(o)] = if l == 3 { (o == c) as u8 as f64 } else { 0.5 };
            }
        }
    }
    let identity =
        |n: usize| -> Vec<f64> { (0..n * n).map(|i| (i / n == i % n) as u8 as f64).collect() };
    // B_location[s', s, u] = [s' = u]: each action moves to its location.
    let b_loc = (0..loc * loc * loc)
        .map(|i| (i / (loc * loc) == i % loc) as u8 as f64)
        .collect();
    let spec = ModelSpec {
        num_states: vec![loc, ctx],
        num_controls: vec![loc, 1],
        num_obs: vec![loc, 3, 2],
        a_deps: vec![vec![0], vec![0, 1], vec![0, 1]],
        a: vec![identity(loc), a_reward, a_cue],
        b: vec![b_loc, identity(ctx)],
        c: vec![vec![0.0; loc], vec![0.0, 3.0, -3.0], vec![0.0; 2]],
        d: vec![vec![1.0, 0.0, 0.0, 0.0], vec![0.5, 0.5]],
        policies: vmp::construct_policies(&[loc, 1], 2)?,
        policy_len: 2,
        ..Default::default()
    };
    let model = Model::new(dev, &spec)?;
    let n = if dev.is_gpu() { 100_000 } else { 1000 };
    println!("\ndiscrete active inference (VMP): T-maze, {n} agents, 16 iterations, 16 policies");
    // Every agent is at the centre, sees no reward, and an uninformative cue signal.
    let obs: Vec<i32> = (0..n)
        .flat_map(|_| [0, 0, (rng.uniform() < 0.5) as i32])
        .collect();
    let obs = dev.upload(&obs)?;
    let fpi = FpiSpec::new().check_inputs(false);
    let post = vmp::infer_states(&model, &fpi, &Obs::Index(obs.view()), None)?; // warm-up
    let t = Instant::now();
    let reps = if dev.is_gpu() { 20 } else { 2 };
    for _ in 0..reps {
        let _ = vmp::infer_states(&model, &fpi, &Obs::Index(obs.view()), None)?;
    }
    dev.synchronize(dev.default_stream())?;
    let per = t.elapsed().as_secs_f64() / reps as f64;
    let vfe = post.vfe.to_vec()?;
    println!(
        "state inference: mean F {:.4}, {:.3} ms per call ({:.2e} agent-iterations/s)",
        vfe.iter().sum::<f32>() / n as f32,
        per * 1e3,
        (n * 16) as f64 / per
    );
    let pol = vmp::infer_policies(&model, &PolicySpec::new().gamma(4.0), &post.qs.view())?;
    let q_pi = pol.q_pi.to_vec()?;
    let p = model.num_policies();
    let mut first = [0.0f64; 4]; // q(first move), averaged over the agents
    for (i, q) in q_pi.iter().enumerate() {
        first[(i % p) / loc] += *q as f64 / n as f64; // policy i = (move 1) · 4 + move 2
    }
    println!(
        "q(first move): centre {:.3}, left {:.3}, right {:.3}, cue {:.3}",
        first[0], first[1], first[2], first[3]
    );
    Ok(())
}
