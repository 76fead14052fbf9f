//! The VMP reference (DESIGN.md §4.4, §6) against pymdp 1.0.4 (tests/fixtures/vmp_pymdp.json,
//! conventions in tests/fixtures/VMP-CONVENTIONS.md): fpi with its per-iteration trace and
//! distributional observations, vmp/mmp sequences at τ = 1 and ½, every term of the expected
//! free energy and q(π), and the Dirichlet updates; then the View API on `Device::reference()` (f32 in
//! and out), properties (batch independence, normalisation, the free-energy bound, early stop,
//! the single-factor pass) and bad input.

// `!(err <= tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use std::collections::BTreeMap;

use common::rng;
use common::vmp::{
    fixture_models, flat_f64, flat_i32, random_actions, random_beliefs, random_dist_obs,
    random_index_obs, random_model, random_prior, tensor_data, to_f32, to_f64,
};
use fep_kernels::vmp::reference::{self, HostObs};
use fep_kernels::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec,
    SequenceOutputs, SequenceSpec, StatesOutputs, dirichlet_mean,
};
use fep_kernels::{Device, Error, View};
use rand::rngs::StdRng;

// ---------------------------------------------------------------------------------------------
// Comparing with pymdp
// ---------------------------------------------------------------------------------------------

/// Against pymdp: |ours − pymdp| ≤ TOL · max(1, |pymdp|), i.e. 1e-6 absolute for values of
/// magnitude ≤ 1 (beliefs, q(π), most terms) and 1e-6 relative above. The relative part is for
/// the quantities that are large in absolute terms: F reaches 36 (an impossible observation
/// costs −ln eps = 36.04), G and the counts reach tens, and the learning rates reach the library
/// as f32 (0.7 and 1.3 are not exact there: a 1.7e-8 relative change of every increment). The
/// f64 maths themselves agree with pymdp to ~1e-14 (see the deviations printed by each test).
const TOL: f64 = 1e-6;

fn scaled_dev(got: f64, want: f64) -> f64 {
    let d = (got - want).abs() / want.abs().max(1.0);
    if d.is_nan() { f64::INFINITY } else { d }
}

/// The largest deviation per quantity over everything checked, for the report.
#[derive(Default)]
struct Deviations(BTreeMap<String, f64>);

impl Deviations {
    /// Asserts `got` ≈ `want` elementwise (see [`TOL`]) and records the largest absolute
    /// difference under `what`.
    fn check(&mut self, what: &str, context: &str, got: &[f64], want: &[f64]) {
        assert_eq!(
            got.len(),
            want.len(),
            "{context} {what}: {} values, pymdp has {}",
            got.len(),
            want.len()
        );
        let mut worst_abs = 0.0f64;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let dev = scaled_dev(g, w);
            assert!(
                dev <= TOL,
                "{context} {what}[{i}]: ours {g:e}, pymdp {w:e} (scaled deviation {dev:e})"
            );
            worst_abs = worst_abs.max((g - w).abs());
        }
        let e = self.0.entry(what.to_string()).or_insert(0.0);
        *e = e.max(worst_abs);
    }

    fn print(&self, test: &str) {
        for (k, v) in &self.0 {
            eprintln!("[{test}] max |ours - pymdp| {k}: {v:.3e}");
        }
    }
}

fn cpu_model(spec: &ModelSpec) -> Model {
    Model::new(&Device::reference(), spec).expect("a valid model")
}

fn method_of(name: &str) -> Method {
    match name {
        "vmp" => Method::Vmp,
        "mmp" => Method::Mmp,
        other => panic!("unknown method {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures through the reference (f64)
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_fpi_matches_pymdp() {
    let mut dev = Deviations::default();
    for fm in fixture_models() {
        let model = cpu_model(&fm.without_counts());
        let j = &fm.json["fpi"];
        let ctx = format!("{} fpi", fm.name);
        let obs = flat_i32(&j["obs"]);
        let prior = flat_f64(&j["prior"]);
        let k_max = j["num_iter"].as_u64().unwrap() as u32;
        let spec = FpiSpec::new().iters(k_max);
        let r = reference::fpi(&model, &spec, HostObs::Index(&obs), Some(&prior)).unwrap();
        let n = r.vfe.len();
        dev.check("fpi.qs", &ctx, &r.qs, &flat_f64(&j["qs"]));
        dev.check("fpi.vfe", &ctx, &r.vfe, &flat_f64(&j["vfe"]));
        let terms = [
            ("neg_entropy", &r.neg_entropy),
            ("prior_cross_entropy", &r.prior_cross_entropy),
            ("accuracy", &r.accuracy),
        ];
        for (key, got) in terms {
            dev.check(&format!("fpi.{key}"), &ctx, got, &flat_f64(&j[key]));
        }
        assert_eq!(r.iterations, flat_i32(&j["iterations_run"]), "{ctx}");

        // Per iteration: pymdp's trace is run_factorized_fpi with num_iter = k, k = 1…kmax (kmax
        // = 1 for one factor, where our trace repeats the one-pass F for all K entries).
        let per_v = &j["per_iteration"]["vfe"];
        let per_q = &j["per_iteration"]["qs"];
        for i in 0..n {
            let want_v = flat_f64(&per_v[i]);
            let trace = &r.vfe_trace[i * k_max as usize..(i + 1) * k_max as usize];
            let mut want_trace = want_v.clone();
            want_trace.resize(k_max as usize, *want_v.last().unwrap());
            dev.check("fpi.per_iteration.vfe", &ctx, trace, &want_trace);
        }
        let kmax = per_v[0].as_array().unwrap().len();
        let s = fm.belief_len();
        for k in 1..=kmax {
            let rk = reference::fpi(
                &model,
                &FpiSpec::new().iters(k as u32),
                HostObs::Index(&obs),
                Some(&prior),
            )
            .unwrap();
            for i in 0..n {
                let ctx = format!("{ctx} agent {i} iteration {k}");
                let want = flat_f64(&per_q[i][k - 1]);
                dev.check(
                    "fpi.per_iteration.qs",
                    &ctx,
                    &rk.qs[i * s..(i + 1) * s],
                    &want,
                );
                dev.check(
                    "fpi.per_iteration.vfe",
                    &ctx,
                    &rk.vfe[i..i + 1],
                    &[per_v[i][k - 1].as_f64().unwrap()],
                );
            }
        }
    }
    dev.print("fpi");
}

#[test]
fn fixture_fpi_categorical_obs_matches_pymdp() {
    let mut dev = Deviations::default();
    for fm in fixture_models() {
        let model = cpu_model(&fm.without_counts());
        let j = &fm.json["fpi_categorical_obs"];
        let ctx = format!("{} fpi_categorical_obs", fm.name);
        let obs = flat_f64(&j["obs_dist"]);
        let prior = flat_f64(&j["prior"]);
        let spec = FpiSpec::new().iters(j["num_iter"].as_u64().unwrap() as u32);
        let r = reference::fpi(&model, &spec, HostObs::Dist(&obs), Some(&prior)).unwrap();
        dev.check("fpi_categorical_obs.qs", &ctx, &r.qs, &flat_f64(&j["qs"]));
        dev.check(
            "fpi_categorical_obs.vfe",
            &ctx,
            &r.vfe,
            &flat_f64(&j["vfe"]),
        );
        dev.check(
            "fpi_categorical_obs.accuracy",
            &ctx,
            &r.accuracy,
            &flat_f64(&j["accuracy"]),
        );
    }
    dev.print("fpi_categorical_obs");
}

#[test]
fn fixture_sequences_match_pymdp() {
    let mut dev = Deviations::default();
    for fm in fixture_models() {
        let model = cpu_model(&fm.without_counts());
        let j = &fm.json["sequence"];
        assert_eq!(j["prior"], "D");
        let steps = j["T"].as_u64().unwrap() as usize;
        let obs = flat_i32(&j["obs"]);
        let actions = flat_i32(&j["actions"]);
        let runs = j["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 4, "vmp and mmp at tau 1 and 0.5");
        for run in runs {
            let method = run["method"].as_str().unwrap();
            let tau = run["tau"].as_f64().unwrap();
            let ctx = format!("{} sequence {method} tau {tau}", fm.name);
            let spec = SequenceSpec::new(method_of(method))
                .iters(run["num_iter"].as_u64().unwrap() as u32)
                .tau(tau as f32);
            let r = reference::sequence(
                &model,
                &spec,
                steps,
                HostObs::Index(&obs),
                Some(&actions),
                None,
            )
            .unwrap();
            let q = |k: &str| format!("sequence.{method}.{k}");
            dev.check(&q("qs"), &ctx, &r.qs, &flat_f64(&run["qs"]));
            dev.check(&q("vfe"), &ctx, &r.vfe, &flat_f64(&run["vfe"]));
            dev.check(&q("vfe_t"), &ctx, &r.vfe_t, &flat_f64(&run["vfe_t"]));
            if run.get("neg_entropy_t").is_some() {
                for (key, ours) in [
                    ("neg_entropy_t", &r.neg_entropy_t),
                    ("prior_cross_entropy_t", &r.prior_cross_entropy_t),
                    ("transition_cross_entropy_t", &r.transition_cross_entropy_t),
                    ("accuracy_t", &r.accuracy_t),
                ] {
                    dev.check(&q(key), &ctx, ours, &flat_f64(&run[key]));
                }
            }
        }
    }
    dev.print("sequence");
}

#[test]
fn fixture_policies_match_pymdp() {
    let mut dev = Deviations::default();
    for fm in fixture_models() {
        let j = &fm.json["policy"];
        assert_eq!(j["qs_init"], "fpi.qs");
        let qs = flat_f64(&fm.json["fpi"]["qs"]);
        let gamma = fm.gamma as f32;
        assert_eq!(gamma as f64, fm.gamma, "gamma is exact in f32");
        let ctx = format!("{} policy", fm.name);
        let neg = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| -x).collect() };

        // Both counts: every term separately, G = −neg_efe and q(π) with and without novelty.
        let model = cpu_model(&fm.spec);
        let r = reference::policies(&model, &PolicySpec::new().gamma(gamma), &qs).unwrap();
        dev.check("policy.utility", &ctx, &r.utility, &flat_f64(&j["utility"]));
        dev.check(
            "policy.state_info_gain",
            &ctx,
            &r.state_info_gain,
            &flat_f64(&j["state_info_gain"]),
        );
        dev.check(
            "policy.novelty_pA",
            &ctx,
            &r.novelty_a,
            &flat_f64(&j["novelty_pA"]),
        );
        dev.check(
            "policy.novelty_pB",
            &ctx,
            &r.novelty_b,
            &flat_f64(&j["novelty_pB"]),
        );
        dev.check(
            "policy.g (= -neg_efe)",
            &ctx,
            &r.g,
            &neg(flat_f64(&j["neg_efe"])),
        );
        dev.check("policy.q_pi", &ctx, &r.q_pi, &flat_f64(&j["q_pi"]));
        let with_novelty = PolicySpec::new().gamma(gamma).terms(true, true, true);
        let r = reference::policies(&model, &with_novelty, &qs).unwrap();
        dev.check(
            "policy.g with novelty (= -neg_efe_with_novelty)",
            &ctx,
            &r.g,
            &neg(flat_f64(&j["neg_efe_with_novelty"])),
        );
        dev.check(
            "policy.q_pi_with_novelty",
            &ctx,
            &r.q_pi,
            &flat_f64(&j["q_pi_with_novelty"]),
        );

        // One term at a time through G, with models carrying only pA or only pB.
        let only = |u, s, p| PolicySpec::new().gamma(gamma).terms(u, s, p);
        let cases = [
            ("utility", fm.without_counts(), only(true, false, false)),
            (
                "state_info_gain",
                fm.without_counts(),
                only(false, true, false),
            ),
            (
                "novelty_pA",
                fm.with_counts(true, false, false),
                only(false, false, true),
            ),
            (
                "novelty_pB",
                fm.with_counts(false, true, false),
                only(false, false, true),
            ),
        ];
        for (key, spec, pspec) in cases {
            let r = reference::policies(&cpu_model(&spec), &pspec, &qs).unwrap();
            dev.check(
                &format!("policy.g ({key} only)"),
                &ctx,
                &r.g,
                &neg(flat_f64(&j[key])),
            );
        }

        // Without counts the novelty terms are zero.
        let r =
            reference::policies(&cpu_model(&fm.without_counts()), &PolicySpec::new(), &qs).unwrap();
        assert!(r.novelty_a.iter().chain(&r.novelty_b).all(|&x| x == 0.0));
    }
    dev.print("policy");
}

#[test]
fn fixture_learning_matches_pymdp() {
    let mut dev = Deviations::default();
    for fm in fixture_models() {
        let j = &fm.json["learning"];
        let ctx = format!("{} learning", fm.name);
        let model = cpu_model(&fm.spec);
        let lr = |k: &str| j[k].as_f64().unwrap();
        let spec = LearnSpec::new(lr("lr_pA") as f32, lr("lr_pB") as f32, lr("lr_pD") as f32);
        // LearnSpec's rates are f32 (0.7 and 1.3 are not exact there). pymdp's update rescaled
        // to the f32 rate, p + (q − p)·(η₃₂/η), shows the f64 maths agree to rounding.
        let at_f32_rate = |want: Vec<f64>, prior: &[f64], k: &str| -> Vec<f64> {
            let ratio = (lr(k) as f32) as f64 / lr(k);
            want.iter()
                .zip(prior)
                .map(|(q, p)| p + (q - p) * ratio)
                .collect()
        };
        let agents = j["obs"].as_array().unwrap().len();
        let steps = j["obs"][0].as_array().unwrap().len();
        let (num_obs, num_states) = (&fm.spec.num_obs, &fm.spec.num_states);
        // pymdp's learning is per agent: one window (N = 1) each.
        let mut per_agent = Vec::new();
        for i in 0..agents {
            let ctx = format!("{ctx} agent {i}");
            let obs = flat_i32(&j["obs"][i]);
            let qs = flat_f64(&j["beliefs"][i]);
            let acts = flat_i32(&j["actions"][i]);
            let r = reference::learn(&model, &spec, steps, HostObs::Index(&obs), &qs, Some(&acts))
                .unwrap();
            let (qa, qb, qd) = (
                r.a.clone().unwrap(),
                r.b.clone().unwrap(),
                r.d.clone().unwrap(),
            );
            // qA (rows O_m) and qB (rows S_f): the counts, the same at the f32 rate, and E[·].
            let parts = [
                ("A", &qa, &num_obs, &fm.spec.pa),
                ("B", &qb, &num_states, &fm.spec.pb),
            ];
            for (x, counts, rows, prior) in parts {
                for (t, got) in counts.iter().enumerate() {
                    let want = tensor_data(&j[format!("q{x}")][i][t]);
                    let rescaled = at_f32_rate(want.clone(), &prior[t], &format!("lr_p{x}"));
                    dev.check(&format!("learning.q{x}"), &ctx, got, &want);
                    let what = format!("learning.q{x} (at the f32 rate)");
                    dev.check(&what, &ctx, got, &rescaled);
                    let e = &j[format!("E_q{x}")][i][t];
                    if !e.is_null() {
                        let mean = dirichlet_mean(got, rows[t]);
                        dev.check(&format!("learning.E_q{x}"), &ctx, &mean, &tensor_data(e));
                    }
                }
            }
            for (f, qd_f) in qd.iter().enumerate() {
                dev.check("learning.qD", &ctx, qd_f, &flat_f64(&j["qD"][i][f]));
            }
            per_agent.push(r);
        }

        // The batch of all agents at once sums their increments.
        let obs = flat_i32(&j["obs"]);
        let qs = flat_f64(&j["beliefs"]);
        let acts = flat_i32(&j["actions"]);
        let r =
            reference::learn(&model, &spec, steps, HostObs::Index(&obs), &qs, Some(&acts)).unwrap();
        let summed = |pick: fn(&reference::LearnOut) -> &Option<Vec<Vec<f64>>>,
                      prior: &Vec<Vec<f64>>| {
            let mut total = prior.clone();
            for a in &per_agent {
                for (t, (x, p)) in total
                    .iter_mut()
                    .zip(pick(a).as_ref().unwrap().iter().zip(prior))
                {
                    for (t, (x, p)) in t.iter_mut().zip(x.iter().zip(p)) {
                        *t += x - p;
                    }
                }
            }
            total
        };
        for (got, want) in [
            (r.a.as_ref().unwrap(), summed(|r| &r.a, &fm.spec.pa)),
            (r.b.as_ref().unwrap(), summed(|r| &r.b, &fm.spec.pb)),
            (r.d.as_ref().unwrap(), summed(|r| &r.d, &fm.spec.pd)),
        ] {
            for (g, w) in got.iter().zip(&want) {
                for (g, w) in g.iter().zip(w) {
                    assert!(
                        (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                        "{ctx} batch: {g} vs {w}"
                    );
                }
            }
        }
    }
    dev.print("learning");
}

// ---------------------------------------------------------------------------------------------
// The View API on Device::reference(): f32 in and out
// ---------------------------------------------------------------------------------------------

/// The CPU device runs the f64 reference on the f32 inputs widened exactly and rounds each
/// output once to f32, so |out − ref(f32 inputs)| ≤ 2⁻²⁴·|ref| (round to nearest), plus the
/// subnormal spacing 2⁻¹⁴⁹ for results below f32's normal range.
fn assert_f32_rounding(what: &str, got: &[f32], reference: &[f64]) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        let bound = r.abs() * 2f64.powi(-24) + 2f64.powi(-149);
        assert!(
            (g as f64 - r).abs() <= bound,
            "{what}[{i}]: {g:e} is not the f32 rounding of {r:e}"
        );
    }
}

/// The f32 outputs against pymdp, scaled as [`TOL`]. With u = 2⁻²⁴ ≈ 6e-8: every output is
/// rounded once (≤ u relative), and the inputs that reach the device in f32 carry ≤ u relative
/// rounding: priors move ln prior by ≤ u, beliefs move q by ≤ u·q, distributions move ll by
/// ≤ u·|ln eps|·Σo. The sixteen fixed-point iterations, the rollout and the softmaxes pass that
/// on with a modest gain: the largest deviation measured over all fixtures is 1.5u (G: 8.6e-8
/// scaled; F 5.7e-8, q 4.4e-8). 16u ≈ 9.5e-7 leaves a margin of ten over that and still fails
/// on any error of a convention (those are ≥ 1e-3 here).
const F32_TOL: f64 = 16.0 / (1u64 << 24) as f64;

fn assert_f32_close(dev: &mut Deviations, what: &str, ctx: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{ctx} {what}: length");
    let (mut worst, mut worst_scaled) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = scaled_dev(g as f64, w);
        assert!(
            d <= F32_TOL,
            "{ctx} {what}[{i}]: {g:e} vs pymdp {w:e} ({d:e})"
        );
        worst = worst.max((g as f64 - w).abs());
        worst_scaled = worst_scaled.max(d);
    }
    let e = dev.0.entry(what.to_string()).or_insert(0.0);
    *e = e.max(worst);
    let e = dev.0.entry(format!("{what} (scaled)")).or_insert(0.0);
    *e = e.max(worst_scaled);
}

#[test]
fn view_api_on_cpu_matches_reference_and_pymdp() {
    let dev = Device::reference();
    let mut devs = Deviations::default();
    for fm in fixture_models() {
        let mut model = Model::new(&dev, &fm.spec).unwrap();
        // fpi: index obs, f32 priors.
        let j = &fm.json["fpi"];
        let obs = flat_i32(&j["obs"]);
        let prior32 = to_f32(&flat_f64(&j["prior"]));
        let spec = FpiSpec::new();
        let (ob, pb) = (dev.upload(&obs).unwrap(), dev.upload(&prior32).unwrap());
        let out =
            vmp::infer_states(&model, &spec, &Obs::Index(ob.view()), Some(&pb.view())).unwrap();
        let r =
            reference::fpi(&model, &spec, HostObs::Index(&obs), Some(&to_f64(&prior32))).unwrap();
        let ctx = format!("{} view fpi", fm.name);
        let qs = out.qs.to_vec().unwrap();
        let vfe = out.vfe.to_vec().unwrap();
        assert_f32_rounding(&format!("{ctx} qs"), &qs, &r.qs);
        assert_f32_rounding(&format!("{ctx} vfe"), &vfe, &r.vfe);
        assert_f32_rounding(
            &format!("{ctx} vfe_trace"),
            &out.vfe_trace.to_vec().unwrap(),
            &r.vfe_trace,
        );
        assert_eq!(out.iterations.to_vec().unwrap(), r.iterations, "{ctx}");
        assert_f32_close(&mut devs, "f32 fpi.qs", &ctx, &qs, &flat_f64(&j["qs"]));
        assert_f32_close(&mut devs, "f32 fpi.vfe", &ctx, &vfe, &flat_f64(&j["vfe"]));

        // fpi: f32 distributions.
        let j = &fm.json["fpi_categorical_obs"];
        let od32 = to_f32(&flat_f64(&j["obs_dist"]));
        let pr32 = to_f32(&flat_f64(&j["prior"]));
        let (ob, pb) = (dev.upload(&od32).unwrap(), dev.upload(&pr32).unwrap());
        let out =
            vmp::infer_states(&model, &spec, &Obs::Dist(ob.view()), Some(&pb.view())).unwrap();
        let r = reference::fpi(
            &model,
            &spec,
            HostObs::Dist(&to_f64(&od32)),
            Some(&to_f64(&pr32)),
        )
        .unwrap();
        let ctx = format!("{} view fpi_categorical_obs", fm.name);
        let qs = out.qs.to_vec().unwrap();
        assert_f32_rounding(&format!("{ctx} qs"), &qs, &r.qs);
        assert_f32_close(
            &mut devs,
            "f32 fpi_categorical_obs.qs",
            &ctx,
            &qs,
            &flat_f64(&j["qs"]),
        );

        // Sequences: the inputs are integers, so only the output rounding remains.
        let j = &fm.json["sequence"];
        let steps = j["T"].as_u64().unwrap() as usize;
        let obs = flat_i32(&j["obs"]);
        let acts = flat_i32(&j["actions"]);
        let (ob, ab) = (dev.upload(&obs).unwrap(), dev.upload(&acts).unwrap());
        for run in j["runs"].as_array().unwrap() {
            let method = run["method"].as_str().unwrap();
            let sspec =
                SequenceSpec::new(method_of(method)).tau(run["tau"].as_f64().unwrap() as f32);
            let out = vmp::infer_sequence(
                &model,
                &sspec,
                steps,
                &Obs::Index(ob.view()),
                Some(&ab.view()),
                None,
            )
            .unwrap();
            let r = reference::sequence(
                &model,
                &sspec,
                steps,
                HostObs::Index(&obs),
                Some(&acts),
                None,
            )
            .unwrap();
            let ctx = format!("{} view sequence {method} tau {}", fm.name, sspec.tau);
            let qs = out.qs.to_vec().unwrap();
            let vfe_t = out.vfe_t.to_vec().unwrap();
            assert_f32_rounding(&format!("{ctx} qs"), &qs, &r.qs);
            assert_f32_rounding(&format!("{ctx} vfe"), &out.vfe.to_vec().unwrap(), &r.vfe);
            assert_f32_rounding(&format!("{ctx} vfe_t"), &vfe_t, &r.vfe_t);
            assert_f32_close(
                &mut devs,
                "f32 sequence.qs",
                &ctx,
                &qs,
                &flat_f64(&run["qs"]),
            );
            assert_f32_close(
                &mut devs,
                "f32 sequence.vfe_t",
                &ctx,
                &vfe_t,
                &flat_f64(&run["vfe_t"]),
            );
        }

        // Policies from f32 beliefs, with novelty (the model has pA and pB).
        let j = &fm.json["policy"];
        let q32 = to_f32(&flat_f64(&fm.json["fpi"]["qs"]));
        let qb = dev.upload(&q32).unwrap();
        let pspec = PolicySpec::new()
            .gamma(fm.gamma as f32)
            .terms(true, true, true);
        let out = vmp::infer_policies(&model, &pspec, &qb.view()).unwrap();
        let r = reference::policies(&model, &pspec, &to_f64(&q32)).unwrap();
        let ctx = format!("{} view policy", fm.name);
        let g = out.g.to_vec().unwrap();
        let q_pi = out.q_pi.to_vec().unwrap();
        assert_f32_rounding(&format!("{ctx} g"), &g, &r.g);
        assert_f32_rounding(&format!("{ctx} q_pi"), &q_pi, &r.q_pi);
        let neg_efe: Vec<f64> = flat_f64(&j["neg_efe_with_novelty"])
            .iter()
            .map(|x| -x)
            .collect();
        assert_f32_close(&mut devs, "f32 policy.g", &ctx, &g, &neg_efe);
        assert_f32_close(
            &mut devs,
            "f32 policy.q_pi",
            &ctx,
            &q_pi,
            &flat_f64(&j["q_pi_with_novelty"]),
        );

        // Learning from f32 beliefs: the CPU model keeps f64 counts, so they equal the
        // reference's on the widened beliefs exactly.
        let j = &fm.json["learning"];
        let lspec = LearnSpec::new(0.7, 1.3, 0.5);
        let obs = flat_i32(&j["obs"]);
        let acts = flat_i32(&j["actions"]);
        let steps = j["obs"][0].as_array().unwrap().len();
        let q32 = to_f32(&flat_f64(&j["beliefs"]));
        let r = reference::learn(
            &model,
            &lspec,
            steps,
            HostObs::Index(&obs),
            &to_f64(&q32),
            Some(&acts),
        )
        .unwrap();
        let (ob, qb, ab) = (
            dev.upload(&obs).unwrap(),
            dev.upload(&q32).unwrap(),
            dev.upload(&acts).unwrap(),
        );
        vmp::learn(
            &mut model,
            &lspec,
            steps,
            &Obs::Index(ob.view()),
            &qb.view(),
            Some(&ab.view()),
            dev.default_stream(),
        )
        .unwrap();
        for m in 0..fm.spec.num_obs.len() {
            assert_eq!(
                model.counts_a(m).unwrap(),
                Some(r.a.as_ref().unwrap()[m].clone())
            );
        }
        for f in 0..fm.spec.num_states.len() {
            assert_eq!(
                model.counts_b(f).unwrap(),
                Some(r.b.as_ref().unwrap()[f].clone())
            );
            assert_eq!(
                model.counts_d(f).unwrap(),
                Some(r.d.as_ref().unwrap()[f].clone())
            );
        }
    }
    devs.print("view api f32");
}

// ---------------------------------------------------------------------------------------------
// Properties on random models
// ---------------------------------------------------------------------------------------------

/// Three factors (3, 4, 2 states; 2, 1, 3 controls), four modalities, one dependency list
/// unsorted, policies of two steps (36).
fn random_three_factor(rng: &mut StdRng, counts: bool) -> ModelSpec {
    random_model(
        rng,
        &[3, 4, 2],
        &[4, 3, 5, 2],
        &[vec![0], vec![2, 0], vec![1, 2, 0], vec![1]],
        &[2, 1, 3],
        2,
        counts,
    )
}

/// −ln p(o) by enumerating the joint of a small model: p(o) = Σ_s Π_f prior_f(s_f)
/// Π_m max(A_m[o_m, s_deps], eps) with the priors clipped at eps as well, so that it bounds
/// the clipped F from below.
fn exact_surprise(spec: &ModelSpec, obs: &[i32], prior: &[f64]) -> f64 {
    let eps = f64::EPSILON;
    let s = &spec.num_states;
    let offs: Vec<usize> = s
        .iter()
        .scan(0, |o, &n| {
            let r = *o;
            *o += n;
            Some(r)
        })
        .collect();
    let total: usize = s.iter().product();
    let mut z = 0.0;
    for joint in 0..total {
        let mut idx = vec![0; s.len()];
        let mut rest = joint;
        for f in (0..s.len()).rev() {
            idx[f] = rest % s[f];
            rest /= s[f];
        }
        let mut p: f64 = (0..s.len())
            .map(|f| prior[offs[f] + idx[f]].max(eps))
            .product();
        for (m, deps) in spec.a_deps.iter().enumerate() {
            let mut col = 0;
            for &g in deps {
                col = col * s[g] + idx[g];
            }
            let cols: usize = deps.iter().map(|&g| s[g]).product();
            p *= spec.a[m][obs[m] as usize * cols + col].max(eps);
        }
        z += p;
    }
    -z.ln()
}

#[test]
fn fpi_batch_independence_normalisation_and_bound() {
    let mut r = rng(11);
    let spec = random_three_factor(&mut r, false);
    let model = cpu_model(&spec);
    let n = 7;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let (s, m) = (model.belief_len(), spec.num_obs.len());
    // An early stop makes the agents run different iteration counts in one batch.
    let fspec = FpiSpec::new().iters(40).tol(1e-7);
    let all = reference::fpi(&model, &fspec, HostObs::Index(&obs), Some(&prior)).unwrap();
    for i in 0..n {
        let one = reference::fpi(
            &model,
            &fspec,
            HostObs::Index(&obs[i * m..(i + 1) * m]),
            Some(&prior[i * s..(i + 1) * s]),
        )
        .unwrap();
        assert_eq!(one.qs, all.qs[i * s..(i + 1) * s], "agent {i} qs");
        assert_eq!(one.vfe[0], all.vfe[i], "agent {i} vfe");
        assert_eq!(one.iterations[0], all.iterations[i], "agent {i} iterations");
        assert_eq!(
            one.vfe_trace,
            all.vfe_trace[i * 40..(i + 1) * 40],
            "agent {i} trace"
        );
        // Each factor's q sums to 1.
        let mut off = 0;
        for &sf in &spec.num_states {
            let sum: f64 = one.qs[off..off + sf].iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-12,
                "agent {i}: a factor sums to {sum}"
            );
            off += sf;
        }
        // F = terms; the mean-field F bounds −ln p(o) from above (and so is ≥ ~0).
        let terms = one.neg_entropy[0] + one.prior_cross_entropy[0] - one.accuracy[0];
        assert!((terms - one.vfe[0]).abs() < 1e-12);
        let surprise = exact_surprise(&spec, &obs[i * m..(i + 1) * m], &prior[i * s..(i + 1) * s]);
        assert!(
            one.vfe[0] >= surprise - 1e-9,
            "agent {i}: F = {} below -ln p(o) = {surprise}",
            one.vfe[0]
        );
        assert!(surprise > -1e-12, "-ln p(o) = {surprise}");
    }
}

#[test]
fn fpi_early_stop_records_iterations_and_freezes_the_trace() {
    let mut r = rng(12);
    let spec = random_three_factor(&mut r, false);
    let model = cpu_model(&spec);
    let n = 24;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let (k_max, tol) = (60usize, 1e-6f32);
    let s = model.belief_len();
    let full = reference::fpi(
        &model,
        &FpiSpec::new().iters(k_max as u32),
        HostObs::Index(&obs),
        Some(&prior),
    )
    .unwrap();
    assert!(
        full.iterations.iter().all(|&k| k as usize == k_max),
        "tol 0 runs all K"
    );
    let stop = reference::fpi(
        &model,
        &FpiSpec::new().iters(k_max as u32).tol(tol),
        HostObs::Index(&obs),
        Some(&prior),
    )
    .unwrap();
    let mut stopped_early = 0;
    for i in 0..n {
        let it = stop.iterations[i] as usize;
        assert!((2..=k_max).contains(&it), "agent {i}: {it} iterations");
        let trace = &stop.vfe_trace[i * k_max..(i + 1) * k_max];
        // The trace up to the stop is the full run's; no earlier step met the criterion.
        assert_eq!(trace[..it], full.vfe_trace[i * k_max..i * k_max + it]);
        for k in 2..it {
            assert!(
                (trace[k - 1] - trace[k - 2]).abs() > tol as f64,
                "agent {i} step {k}"
            );
        }
        if it < k_max {
            stopped_early += 1;
            assert!((trace[it - 1] - trace[it - 2]).abs() <= tol as f64);
        }
        assert!(
            trace[it..].iter().all(|&v| v == trace[it - 1]),
            "agent {i}: frozen trace"
        );
        assert_eq!(stop.vfe[i], trace[it - 1]);
        // The result is what K = iterations gives without a tolerance.
        let again = reference::fpi(
            &model,
            &FpiSpec::new().iters(it as u32),
            HostObs::Index(&obs[i * 4..(i + 1) * 4]),
            Some(&prior[i * s..(i + 1) * s]),
        )
        .unwrap();
        assert_eq!(again.qs, stop.qs[i * s..(i + 1) * s]);
        assert_eq!(again.vfe[0], stop.vfe[i]);
    }
    assert!(
        stopped_early > n / 2,
        "only {stopped_early} of {n} agents stopped early"
    );

    // Each modality on one factor: the first Jacobi iteration is already the fixed point, so
    // F_2 = F_1 and every agent stops at the first chance, k = 2.
    let spec = random_model(
        &mut r,
        &[3, 4, 2],
        &[4, 3, 5],
        &[vec![0], vec![1], vec![2]],
        &[1, 1, 1],
        0,
        false,
    );
    let model = cpu_model(&spec);
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let out = reference::fpi(
        &model,
        &FpiSpec::new().tol(1e-9),
        HostObs::Index(&obs),
        Some(&prior),
    )
    .unwrap();
    assert!(
        out.iterations.iter().all(|&k| k == 2),
        "{:?}",
        out.iterations
    );
}

#[test]
fn fpi_single_factor_is_one_exact_pass() {
    let mut r = rng(13);
    let spec = random_model(&mut r, &[6], &[4, 5], &[vec![0], vec![0]], &[2], 0, false);
    let model = cpu_model(&spec);
    let n = 5;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let one = reference::fpi(
        &model,
        &FpiSpec::new().iters(1),
        HostObs::Index(&obs),
        Some(&prior),
    )
    .unwrap();
    let many = reference::fpi(
        &model,
        &FpiSpec::new().iters(16).tol(0.5),
        HostObs::Index(&obs),
        Some(&prior),
    )
    .unwrap();
    assert_eq!(one.qs, many.qs);
    assert_eq!(one.vfe, many.vfe);
    assert!(many.iterations.iter().all(|&k| k == 1));
    for i in 0..n {
        assert!(
            many.vfe_trace[i * 16..(i + 1) * 16]
                .iter()
                .all(|&v| v == many.vfe[i])
        );
        // Exact: F = −ln Σ_s max(prior, eps) Π_m max(A_m[o_m, s], eps).
        let surprise = exact_surprise(&spec, &obs[i * 2..(i + 1) * 2], &prior[i * 6..(i + 1) * 6]);
        assert!(
            (many.vfe[i] - surprise).abs() <= 1e-12 * surprise.abs().max(1.0),
            "agent {i}: F = {}, -ln p(o) = {surprise}",
            many.vfe[i]
        );
    }
    // A one-step window with one factor is the same exact posterior, for vmp and mmp.
    for method in [Method::Vmp, Method::Mmp] {
        let seq = reference::sequence(
            &model,
            &SequenceSpec::new(method).iters(3),
            1,
            HostObs::Index(&obs),
            None,
            Some(&prior),
        )
        .unwrap();
        for (a, b) in seq.qs.iter().zip(&one.qs) {
            assert!((a - b).abs() < 1e-12, "{method:?}: {a} vs {b}");
        }
        for (a, b) in seq.vfe.iter().zip(&one.vfe) {
            assert!(
                (a - b).abs() < 1e-12 * b.abs().max(1.0),
                "{method:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn fpi_distributions_equal_one_hot_indices() {
    let mut r = rng(14);
    let spec = random_three_factor(&mut r, false);
    let model = cpu_model(&spec);
    let n = 6;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let sum_o: usize = spec.num_obs.iter().sum();
    let mut dist = vec![0.0; n * sum_o];
    for i in 0..n {
        let mut off = 0;
        for (m, &o) in spec.num_obs.iter().enumerate() {
            dist[i * sum_o + off + obs[i * 4 + m] as usize] = 1.0;
            off += o;
        }
    }
    let a = reference::fpi(&model, &FpiSpec::new(), HostObs::Index(&obs), None).unwrap();
    let b = reference::fpi(&model, &FpiSpec::new(), HostObs::Dist(&dist), None).unwrap();
    assert_eq!(a.qs, b.qs);
    assert_eq!(a.vfe, b.vfe);
    // Random distributions give normalised beliefs and a finite F.
    let dist = random_dist_obs(&mut r, &spec.num_obs, n);
    let c = reference::fpi(&model, &FpiSpec::new(), HostObs::Dist(&dist), None).unwrap();
    assert!(c.vfe.iter().all(|v| v.is_finite()));
    for row in c.qs.chunks(model.belief_len()) {
        assert!(
            (row.iter().sum::<f64>() - 3.0).abs() < 1e-12,
            "three factors, each sums to 1"
        );
    }
}

#[test]
fn sequence_batch_independence_and_vfe_terms() {
    let mut r = rng(15);
    let spec = random_three_factor(&mut r, false);
    let model = cpu_model(&spec);
    let (n, steps) = (5, 3);
    let (m, f, s) = (4, 3, model.belief_len());
    let obs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
    let prior = random_prior(&mut r, &spec.num_states, n);
    for method in [Method::Vmp, Method::Mmp] {
        for tau in [1.0, 0.5, 0.25] {
            let sspec = SequenceSpec::new(method).tau(tau).iters(12);
            let all = reference::sequence(
                &model,
                &sspec,
                steps,
                HostObs::Index(&obs),
                Some(&acts),
                Some(&prior),
            )
            .unwrap();
            for i in 0..n {
                let one = reference::sequence(
                    &model,
                    &sspec,
                    steps,
                    HostObs::Index(&obs[i * steps * m..(i + 1) * steps * m]),
                    Some(&acts[i * (steps - 1) * f..(i + 1) * (steps - 1) * f]),
                    Some(&prior[i * s..(i + 1) * s]),
                )
                .unwrap();
                assert_eq!(one.qs, all.qs[i * steps * s..(i + 1) * steps * s]);
                assert_eq!(one.vfe_t, all.vfe_t[i * steps..(i + 1) * steps]);
                assert_eq!(one.vfe[0], all.vfe[i]);
                for row in one.qs.chunks(s) {
                    assert!((row.iter().sum::<f64>() - 3.0).abs() < 1e-12);
                }
                let sum: f64 = one.vfe_t.iter().sum();
                assert!((sum - one.vfe[0]).abs() < 1e-12 * sum.abs().max(1.0));
                for k in 0..steps {
                    let terms = one.neg_entropy_t[k]
                        + one.prior_cross_entropy_t[k]
                        + one.transition_cross_entropy_t[k]
                        - one.accuracy_t[k];
                    assert!((terms - one.vfe_t[k]).abs() < 1e-12 * terms.abs().max(1.0));
                    assert_eq!(one.prior_cross_entropy_t[k] == 0.0, k > 0);
                    assert_eq!(one.transition_cross_entropy_t[k] == 0.0, k == 0);
                }
            }
        }
    }
}

#[test]
fn policies_batch_independence_and_q_pi() {
    let mut r = rng(16);
    let spec = random_three_factor(&mut r, true);
    let model = cpu_model(&spec);
    let n = 5;
    let s = model.belief_len();
    let p = model.num_policies();
    assert_eq!(p, 36);
    let qs = random_beliefs(&mut r, &spec.num_states, n);
    let pspec = PolicySpec::new().gamma(2.5).terms(true, true, true);
    let all = reference::policies(&model, &pspec, &qs).unwrap();
    for i in 0..n {
        let one = reference::policies(&model, &pspec, &qs[i * s..(i + 1) * s]).unwrap();
        assert_eq!(one.g, all.g[i * p..(i + 1) * p]);
        assert_eq!(one.q_pi, all.q_pi[i * p..(i + 1) * p]);
        assert!((one.q_pi.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for k in 0..p {
            let neg_efe =
                one.utility[k] + one.state_info_gain[k] + one.novelty_a[k] + one.novelty_b[k];
            assert!((one.g[k] + neg_efe).abs() < 1e-12 * neg_efe.abs().max(1.0));
            // Novelty is non-negative (the counts can only gain information).
            assert!(one.novelty_a[k] >= -1e-12 && one.novelty_b[k] >= -1e-12);
        }
    }
    // With no term, or γ = 0, q(π) is E.
    let e = &spec.e;
    for pspec in [
        PolicySpec::new().terms(false, false, false),
        PolicySpec::new().gamma(0.0),
    ] {
        let r = reference::policies(&model, &pspec, &qs).unwrap();
        for row in r.q_pi.chunks(p) {
            for (a, b) in row.iter().zip(e) {
                assert!((a - b).abs() < 1e-12, "{a} vs E {b}");
            }
        }
    }
}

#[test]
fn learning_sums_batches_and_skips_what_is_not_learnt() {
    let mut r = rng(17);
    let mut spec = random_three_factor(&mut r, true);
    // Zero counts in pD that must stay zero (pymdp's legacy rule), under positive beliefs.
    spec.pd[1][0] = 0.0;
    spec.pd[2][1] = 0.0;
    let model = cpu_model(&spec);
    let (n, steps) = (5, 3);
    let (m, f, s) = (4, 3, model.belief_len());
    let obs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
    let qs = random_beliefs(&mut r, &spec.num_states, n * steps);
    let lspec = LearnSpec::new(0.5, 2.0, 1.5);
    let all = reference::learn(
        &model,
        &lspec,
        steps,
        HostObs::Index(&obs),
        &qs,
        Some(&acts),
    )
    .unwrap();
    let mut want_a = spec.pa.clone();
    let mut want_b = spec.pb.clone();
    let mut want_d = spec.pd.clone();
    for i in 0..n {
        let one = reference::learn(
            &model,
            &lspec,
            steps,
            HostObs::Index(&obs[i * steps * m..(i + 1) * steps * m]),
            &qs[i * steps * s..(i + 1) * steps * s],
            Some(&acts[i * (steps - 1) * f..(i + 1) * (steps - 1) * f]),
        )
        .unwrap();
        for (want, got, prior) in [
            (&mut want_a, one.a.unwrap(), &spec.pa),
            (&mut want_b, one.b.unwrap(), &spec.pb),
            (&mut want_d, one.d.unwrap(), &spec.pd),
        ] {
            for ((w, g), p) in want.iter_mut().zip(&got).zip(prior) {
                for ((w, g), p) in w.iter_mut().zip(g).zip(p) {
                    *w += g - p;
                }
            }
        }
    }
    let all_d = all.d.clone().unwrap();
    for (got, want) in [
        (all.a.unwrap(), want_a),
        (all.b.unwrap(), want_b),
        (all.d.unwrap(), want_d),
    ] {
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
    // pD moves only where pD > 0: pD + η Σ_agents q_{t=0} there, explicitly.
    let mut off = 0;
    for (fi, &sf) in spec.num_states.iter().enumerate() {
        for k in 0..sf {
            let p = spec.pd[fi][k];
            let q0: f64 = (0..n).map(|i| qs[i * steps * s + off + k]).sum();
            let want = if p > 0.0 { p + 1.5 * q0 } else { 0.0 };
            let got = all_d[fi][k];
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "pD[{fi}][{k}]: {got} vs {want}"
            );
        }
        off += sf;
    }
    for zero in [3, 8] {
        assert!(
            (0..n).any(|i| qs[i * steps * s + zero] > 0.0),
            "a zero count under a positive belief"
        );
    }
    // Rates of 0 leave the counts as they are, and pB needs no actions then.
    let none = reference::learn(
        &model,
        &LearnSpec::new(0.0, 0.0, 0.0),
        steps,
        HostObs::Index(&obs),
        &qs,
        None,
    )
    .unwrap();
    assert_eq!(none.a.unwrap(), spec.pa);
    assert_eq!(none.b.unwrap(), spec.pb);
    assert_eq!(none.d.unwrap(), spec.pd);
    // A model without counts reports None; distributions learn like one-hot indices.
    let bare = cpu_model(&random_three_factor(&mut rng(17), false));
    let out = reference::learn(
        &bare,
        &LearnSpec::new(0.0, 0.0, 0.0),
        steps,
        HostObs::Index(&obs),
        &qs,
        None,
    )
    .unwrap();
    assert!(out.a.is_none() && out.b.is_none() && out.d.is_none());
    let sum_o: usize = spec.num_obs.iter().sum();
    let mut dist = vec![0.0; n * steps * sum_o];
    for row in 0..n * steps {
        let mut off = 0;
        for (k, &o) in spec.num_obs.iter().enumerate() {
            dist[row * sum_o + off + obs[row * m + k] as usize] = 1.0;
            off += o;
        }
    }
    let from_dist = reference::learn(
        &model,
        &lspec,
        steps,
        HostObs::Dist(&dist),
        &qs,
        Some(&acts),
    )
    .unwrap();
    let all = reference::learn(
        &model,
        &lspec,
        steps,
        HostObs::Index(&obs),
        &qs,
        Some(&acts),
    )
    .unwrap();
    assert_eq!(from_dist.a, all.a);
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear error naming the argument, outputs untouched
// ---------------------------------------------------------------------------------------------

/// The reason of an `InvalidArgument` error for `name`; panics on anything else.
#[track_caller]
fn invalid<T: std::fmt::Debug>(r: fep_kernels::Result<T>, name: &str) -> String {
    match r {
        Err(Error::InvalidArgument { name: got, reason }) => {
            assert_eq!(got, name, "wrong argument named ({reason})");
            assert!(!reason.is_empty());
            reason
        }
        other => panic!("expected an invalid `{name}`, got {other:?}"),
    }
}

#[test]
fn bad_models_are_rejected() {
    let mut r = rng(21);
    let good = random_three_factor(&mut r, true);
    let dev = Device::reference();
    Model::new(&dev, &good).unwrap();
    let mut s = good.clone();
    s.a[1][0] += 0.1;
    assert!(invalid(Model::new(&dev, &s), "a[1]").contains("column 0"));
    let mut s = good.clone();
    s.b[2][3] += 0.1;
    assert!(invalid(Model::new(&dev, &s), "b[2]").contains("column"));
    let mut s = good.clone();
    s.a_deps[0] = vec![3];
    assert!(invalid(Model::new(&dev, &s), "a_deps[0]").contains("out of range"));
    let mut s = good.clone();
    s.a_deps[1] = vec![2, 2];
    assert!(invalid(Model::new(&dev, &s), "a_deps[1]").contains("twice"));
    let mut s = good.clone();
    s.a_deps[0] = vec![1]; // 4 states where A_0 has columns for 3
    invalid(Model::new(&dev, &s), "a[0]");
    let mut s = good.clone();
    s.policies[2] = 3; // factor 2 has 3 controls: 0..3
    assert!(invalid(Model::new(&dev, &s), "policies").contains("out of range"));
    let mut s = good.clone();
    s.pa[0][0] = -1.0;
    invalid(Model::new(&dev, &s), "pa[0]");
}

fn poisoned(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

#[test]
fn bad_inputs_leave_outputs_untouched() {
    let mut r = rng(22);
    let spec = random_three_factor(&mut r, false);
    let dev = Device::reference();
    let model = Model::new(&dev, &spec).unwrap();
    let (n, s, m) = (3, model.belief_len(), 4);
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = to_f32(&random_prior(&mut r, &spec.num_states, n));

    // infer_states_into: every output NaN before, still NaN after the error.
    let states = |obs: &Obs<'_>, prior: Option<&View<'_, f32>>, fspec: FpiSpec| {
        let (mut qs, mut vfe, mut tr) = (poisoned(n * s), poisoned(n), poisoned(n * 16));
        let mut it = vec![-7i32; n];
        let res = vmp::infer_states_into(
            &model,
            &fspec,
            obs,
            prior,
            StatesOutputs {
                qs: common::host_mut(&mut qs),
                vfe: Some(common::host_mut(&mut vfe)),
                iterations: Some(common::host_mut(&mut it)),
                vfe_trace: Some(common::host_mut(&mut tr)),
            },
            dev.default_stream(),
        );
        if res.is_err() {
            assert!(
                qs.iter().chain(&vfe).chain(&tr).all(|x| x.is_nan()),
                "outputs written"
            );
            assert!(it.iter().all(|&x| x == -7), "iterations written");
        }
        res
    };
    let mut bad = obs.clone();
    bad[m + 2] = spec.num_obs[2] as i32;
    let reason = invalid(
        states(&Obs::Index(common::host(&bad)), None, FpiSpec::new()),
        "obs",
    );
    assert!(
        reason.contains("agent 1") && reason.contains("modality 2"),
        "{reason}"
    );
    let mut bad = obs.clone();
    bad[0] = -1;
    invalid(
        states(&Obs::Index(common::host(&bad)), None, FpiSpec::new()),
        "obs",
    );
    let sum_o: usize = spec.num_obs.iter().sum();
    let mut dist = to_f32(&random_dist_obs(&mut r, &spec.num_obs, n));
    dist[sum_o + 1] = -0.25;
    invalid(
        states(&Obs::Dist(common::host(&dist)), None, FpiSpec::new()),
        "obs",
    );
    dist[sum_o + 1] = f32::NAN;
    invalid(
        states(&Obs::Dist(common::host(&dist)), None, FpiSpec::new()),
        "obs",
    );
    let good_obs = Obs::Index(common::host(&obs));
    invalid(
        states(&good_obs, Some(&common::host(&prior[1..])), FpiSpec::new()),
        "prior",
    );
    let mut neg = prior.clone();
    neg[4] = -0.5;
    invalid(
        states(&good_obs, Some(&common::host(&neg)), FpiSpec::new()),
        "prior",
    );
    invalid(states(&good_obs, None, FpiSpec::new().iters(0)), "num_iter");
    invalid(states(&good_obs, None, FpiSpec::new().tol(-1.0)), "tol");
    // A trace of K = 1 per agent does not fit the 16 given.
    invalid(
        states(
            &good_obs,
            Some(&common::host(&prior)),
            FpiSpec::new().iters(1),
        ),
        "vfe_trace",
    );

    // infer_sequence_into.
    let steps = 3;
    let sobs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
    let sequence = |acts: Option<&[i32]>, sspec: SequenceSpec| {
        let (mut qs, mut vfe, mut vfe_t) =
            (poisoned(n * steps * s), poisoned(n), poisoned(n * steps));
        let res = vmp::infer_sequence_into(
            &model,
            &sspec,
            steps,
            &Obs::Index(common::host(&sobs)),
            acts.map(View::host).as_ref(),
            None,
            SequenceOutputs {
                qs: common::host_mut(&mut qs),
                vfe: Some(common::host_mut(&mut vfe)),
                vfe_t: Some(common::host_mut(&mut vfe_t)),
            },
            dev.default_stream(),
        );
        let untouched = qs.iter().chain(&vfe).chain(&vfe_t).all(|x| x.is_nan());
        assert_eq!(
            untouched,
            res.is_err(),
            "outputs written on error, or not on success"
        );
        res
    };
    let mut bad = acts.clone();
    bad[3 * 2 + 2] = 3; // agent 1, transition 1, factor 2 (3 controls)
    let reason = invalid(
        sequence(Some(&bad), SequenceSpec::new(Method::Vmp)),
        "actions",
    );
    assert!(
        reason.contains("factor 2") && reason.contains("3 controls"),
        "{reason}"
    );
    invalid(
        sequence(Some(&acts[1..]), SequenceSpec::new(Method::Vmp)),
        "actions",
    );
    invalid(sequence(None, SequenceSpec::new(Method::Mmp)), "actions");
    invalid(
        sequence(Some(&acts), SequenceSpec::new(Method::Vmp).tau(0.0)),
        "tau",
    );
    invalid(
        sequence(Some(&acts), SequenceSpec::new(Method::Vmp).tau(1.5)),
        "tau",
    );
    invalid(
        sequence(Some(&acts), SequenceSpec::new(Method::Mmp).iters(0)),
        "num_iter",
    );
    sequence(Some(&acts), SequenceSpec::new(Method::Vmp).iters(2)).expect("the good call works");

    // infer_policies_into.
    let qs = to_f32(&random_beliefs(&mut r, &spec.num_states, n));
    let policies = |model: &Model, qs: &[f32], pspec: PolicySpec| {
        let p = model.num_policies().max(1);
        let (mut g, mut q_pi) = (poisoned(n * p), poisoned(n * p));
        let res = vmp::infer_policies_into(
            model,
            &pspec,
            &common::host(qs),
            PolicyOutputs {
                g: Some(common::host_mut(&mut g)),
                q_pi: common::host_mut(&mut q_pi),
            },
            dev.default_stream(),
        );
        if res.is_err() {
            assert!(g.iter().chain(&q_pi).all(|x| x.is_nan()), "outputs written");
        }
        res
    };
    invalid(
        policies(&model, &qs, PolicySpec::new().terms(true, true, true)),
        "param_info_gain",
    );
    let mut bad_q = qs.clone();
    bad_q[5] = f32::INFINITY;
    invalid(policies(&model, &bad_q, PolicySpec::new()), "qs");
    bad_q[5] = -0.1;
    invalid(policies(&model, &bad_q, PolicySpec::new()), "qs");
    invalid(
        policies(&model, &qs, PolicySpec::new().gamma(-1.0)),
        "gamma",
    );
    let mut no_table = spec.clone();
    no_table.policies.clear();
    no_table.e.clear();
    no_table.policy_len = 0;
    let no_table = Model::new(&dev, &no_table).unwrap();
    invalid(policies(&no_table, &qs, PolicySpec::new()), "model");

    // learn: counts untouched on error.
    let lobs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let lqs = to_f32(&random_beliefs(&mut r, &spec.num_states, n * steps));
    let mut bare = Model::new(&dev, &spec).unwrap();
    let learn =
        |model: &mut Model, lspec: LearnSpec, obs: &[i32], qs: &[f32], acts: Option<&[i32]>| {
            vmp::learn(
                model,
                &lspec,
                steps,
                &Obs::Index(common::host(obs)),
                &common::host(qs),
                acts.map(View::host).as_ref(),
                dev.default_stream(),
            )
        };
    assert!(
        invalid(
            learn(&mut bare, LearnSpec::new(0.5, 0.0, 0.0), &lobs, &lqs, None),
            "lr_a"
        )
        .contains("no counts")
    );
    invalid(
        learn(
            &mut bare,
            LearnSpec::new(0.0, 0.5, 0.0),
            &lobs,
            &lqs,
            Some(&acts),
        ),
        "lr_b",
    );
    let cspec = random_three_factor(&mut rng(23), true);
    let mut counted = Model::new(&dev, &cspec).unwrap();
    let lspec = LearnSpec::new(0.5, 0.5, 0.5);
    let mut bad = acts.clone();
    bad[0] = 2; // factor 0 has 2 controls
    invalid(
        learn(&mut counted, lspec, &lobs, &lqs, Some(&bad)),
        "actions",
    );
    invalid(learn(&mut counted, lspec, &lobs, &lqs, None), "actions");
    let mut bad_obs = lobs.clone();
    bad_obs[7] = 99;
    invalid(
        learn(&mut counted, lspec, &bad_obs, &lqs, Some(&acts)),
        "obs",
    );
    let mut bad_q = lqs.clone();
    bad_q[10] = f32::NAN;
    invalid(learn(&mut counted, lspec, &lobs, &bad_q, Some(&acts)), "qs");
    invalid(
        learn(
            &mut counted,
            LearnSpec::new(-0.5, 0.0, 0.0),
            &lobs,
            &lqs,
            Some(&acts),
        ),
        "lr_a",
    );
    for k in 0..4 {
        assert_eq!(
            counted.counts_a(k).unwrap(),
            Some(cspec.pa[k].clone()),
            "pA[{k}] changed"
        );
    }
    for f in 0..3 {
        assert_eq!(
            counted.counts_b(f).unwrap(),
            Some(cspec.pb[f].clone()),
            "pB[{f}] changed"
        );
        assert_eq!(
            counted.counts_d(f).unwrap(),
            Some(cspec.pd[f].clone()),
            "pD[{f}] changed"
        );
    }
    learn(&mut counted, lspec, &lobs, &lqs, Some(&acts)).expect("the good call works");
    assert_ne!(counted.counts_a(0).unwrap(), Some(cspec.pa[0].clone()));
}

#[test]
fn bad_host_inputs_to_the_reference() {
    let mut r = rng(24);
    let spec = random_three_factor(&mut r, true);
    let model = cpu_model(&spec);
    let n = 2;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let fspec = FpiSpec::new();
    invalid(
        reference::fpi(&model, &fspec, HostObs::Index(&obs[1..]), None),
        "obs",
    );
    invalid(
        reference::fpi(&model, &fspec, HostObs::Index(&[]), None),
        "obs",
    );
    let mut bad = obs.clone();
    bad[5] = 7; // modality 1 has 3 outcomes
    let reason = invalid(
        reference::fpi(&model, &fspec, HostObs::Index(&bad), None),
        "obs",
    );
    assert!(
        reason.contains("agent 1, step 0, modality 1") && reason.contains("0..3"),
        "{reason}"
    );
    invalid(
        reference::fpi(&model, &fspec, HostObs::Index(&obs), Some(&prior[..9])),
        "prior",
    );
    let mut bad = prior.clone();
    bad[0] = f64::NAN;
    invalid(
        reference::fpi(&model, &fspec, HostObs::Index(&obs), Some(&bad)),
        "prior",
    );
    invalid(
        reference::fpi(&model, &fspec.iters(0), HostObs::Index(&obs), None),
        "num_iter",
    );
    let sspec = SequenceSpec::new(Method::Vmp);
    invalid(
        reference::sequence(&model, &sspec, 0, HostObs::Index(&obs), None, None),
        "steps",
    );
    invalid(
        reference::sequence(&model, &sspec, 2, HostObs::Index(&obs), None, None),
        "actions",
    );
    invalid(
        reference::sequence(&model, &sspec, 2, HostObs::Index(&obs), Some(&[0, 0]), None),
        "actions",
    );
    reference::sequence(
        &model,
        &sspec,
        2,
        HostObs::Index(&obs),
        Some(&[0, 0, 2]),
        None,
    )
    .unwrap();
    invalid(
        reference::policies(&model, &PolicySpec::new(), &prior[1..]),
        "qs",
    );
    invalid(
        reference::learn(
            &model,
            &LearnSpec::new(1.0, 0.0, 0.0),
            1,
            HostObs::Index(&obs),
            &prior[1..],
            None,
        ),
        "qs",
    );
}

// ---------------------------------------------------------------------------------------------
// A model without B: state inference only
// ---------------------------------------------------------------------------------------------

/// `spec` without its transitions (and without what needs them: pB).
fn without_b(spec: &ModelSpec) -> ModelSpec {
    ModelSpec {
        b: Vec::new(),
        pb: Vec::new(),
        ..spec.clone()
    }
}

#[test]
fn state_inference_needs_no_b_and_the_rest_names_b() {
    let mut r = rng(31);
    let full = random_three_factor(&mut r, true);
    let dev = Device::reference();
    let with_b = Model::new(&dev, &full).unwrap();
    // The controls and the policy table stay: only the ops that read B refuse.
    let spec = without_b(&full);
    let model = Model::new(&dev, &spec).unwrap();
    assert!(with_b.has_b() && !model.has_b());
    let n = 5;
    let obs = random_index_obs(&mut r, &spec.num_obs, n);
    let prior = random_prior(&mut r, &spec.num_states, n);
    let fspec = FpiSpec::new().iters(12);
    // the reference and the view API: the same numbers as the model with B
    let want = reference::fpi(&with_b, &fspec, HostObs::Index(&obs), Some(&prior)).unwrap();
    let got = reference::fpi(&model, &fspec, HostObs::Index(&obs), Some(&prior)).unwrap();
    assert_eq!(got.qs, want.qs);
    assert_eq!(got.vfe, want.vfe);
    let prior32 = to_f32(&prior);
    let run = |m: &Model| {
        let r = vmp::infer_states(
            m,
            &fspec,
            &Obs::Index(common::host(&obs)),
            Some(&common::host(&prior32)),
        )
        .unwrap();
        (r.qs.to_vec().unwrap(), r.vfe.to_vec().unwrap())
    };
    assert_eq!(run(&model), run(&with_b));
    // without D too (uniform prior), and a model with no counts at all
    let bare = ModelSpec {
        d: Vec::new(),
        pa: Vec::new(),
        pd: Vec::new(),
        policies: Vec::new(),
        policy_len: 0,
        e: Vec::new(),
        num_controls: Vec::new(),
        ..spec.clone()
    };
    let bare = Model::new(&dev, &bare).unwrap();
    assert_eq!(bare.num_controls(), &[1, 1, 1]);
    vmp::infer_states(&bare, &fspec, &Obs::Index(common::host(&obs)), None).unwrap();

    // sequence inference (both APIs), policy inference and pB learning name B
    let steps = 2;
    let sobs = random_index_obs(&mut r, &spec.num_obs, n * steps);
    let acts = random_actions(&mut r, &spec.num_controls, n * (steps - 1));
    let seq = SequenceSpec::new(Method::Vmp);
    let reason = invalid(
        vmp::infer_sequence(
            &model,
            &seq,
            steps,
            &Obs::Index(common::host(&sobs)),
            Some(&common::host(&acts)),
            None,
        ),
        "b",
    );
    assert!(
        reason.contains("sequence inference") && reason.contains("B"),
        "{reason}"
    );
    invalid(
        reference::sequence(
            &model,
            &seq,
            steps,
            HostObs::Index(&sobs),
            Some(&acts),
            None,
        ),
        "b",
    );
    let qs = to_f32(&random_beliefs(&mut r, &spec.num_states, n));
    let reason = invalid(
        vmp::infer_policies(&model, &PolicySpec::new(), &common::host(&qs)),
        "b",
    );
    assert!(reason.contains("policy inference"), "{reason}");
    invalid(
        reference::policies(&model, &PolicySpec::new(), &to_f64(&qs)),
        "b",
    );
    let qs_seq = to_f32(&random_beliefs(&mut r, &spec.num_states, n * steps));
    let mut m2 = Model::new(&dev, &spec).unwrap();
    let s = dev.default_stream();
    let learn = |m: &mut Model, lr: LearnSpec| {
        vmp::learn(
            m,
            &lr,
            steps,
            &Obs::Index(common::host(&sobs)),
            &common::host(&qs_seq),
            Some(&common::host(&acts)),
            s,
        )
    };
    let reason = invalid(learn(&mut m2, LearnSpec::new(0.0, 1.0, 0.0)), "b");
    assert!(reason.contains("lr_b"), "{reason}");
    // learning what does not involve B works
    let before = m2.counts_a(0).unwrap().unwrap();
    learn(&mut m2, LearnSpec::new(1.0, 0.0, 1.0)).unwrap();
    assert_ne!(m2.counts_a(0).unwrap().unwrap(), before);
    // pB without B is refused when the model is made
    let reason = invalid(
        Model::new(
            &dev,
            &ModelSpec {
                b: Vec::new(),
                ..full.clone()
            },
        ),
        "pb",
    );
    assert!(reason.contains("B"), "{reason}");
}
