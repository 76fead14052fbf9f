//! The VMP C ABI (`fep_vmp_*`) against the Rust API on the same device: bitwise equal outputs
//! for state inference (indices and distributions, early stop), sequence inference (vmp and
//! mmp), policy inference and learning (the counts read back through `fep_vmp_model_counts`);
//! optional outputs skipped with NULL; a clear status and a message naming the argument for each
//! bad one, with the outputs left untouched. On the CPU always; on a real GPU too when there is
//! one (the C ABI names CUDA/HIP devices, not the emulator).
//!
//! The model is small and written out here: factor 0 with 3 states and 2 controls, factor 1 with
//! 2 states and 2 controls; modality 0 (4 outcomes) depends on both factors, modality 1
//! (3 outcomes) on factor 1 only.

mod common;

use std::ffi::{CStr, c_void};
use std::ptr::{null, null_mut};

use common::gpu::{is_emulated, probe};
use fep_kernels::ffi::{
    self, FepVmpFpiParams, FepVmpLearnParams, FepVmpModel, FepVmpModelDesc, FepVmpPolicyParams,
    FepVmpSequenceParams,
};
use fep_kernels::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicySpec, SequenceSpec,
    construct_policies,
};
use fep_kernels::{Device, DeviceBuffer, DeviceKind};

const N: usize = 5;
const T: usize = 3;
const S: [usize; 2] = [3, 2];
const U: [usize; 2] = [2, 2];
const O: [usize; 2] = [4, 3];
const SUM_S: usize = 5;
const SUM_O: usize = 7;
const H: usize = 2;

fn last_error() -> String {
    unsafe { CStr::from_ptr(ffi::fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn kind_code(dev: &Device) -> i32 {
    match dev.kind() {
        DeviceKind::Cuda => ffi::FEP_DEVICE_CUDA,
        DeviceKind::Hip => ffi::FEP_DEVICE_HIP,
        _ => ffi::FEP_DEVICE_CPU,
    }
}

/// `raw` normalised over axis 0 of a `[rows, len / rows]` tensor.
fn columns(raw: Vec<f64>, rows: usize) -> Vec<f64> {
    let cols = raw.len() / rows;
    let mut out = raw.clone();
    for c in 0..cols {
        let sum: f64 = (0..rows).map(|r| raw[r * cols + c]).sum();
        (0..rows).for_each(|r| out[r * cols + c] /= sum);
    }
    out
}

/// A tensor of `len` positive, uneven values (a fixed pattern, no zeros).
fn pattern(len: usize, seed: usize) -> Vec<f64> {
    (0..len)
        .map(|i| 0.2 + ((i * 7 + seed * 3) % 11) as f64 + 0.37 * ((i + seed) % 3) as f64)
        .collect()
}

/// The model: A, B, C, D, a policy table of horizon 2, E and all three sets of counts.
fn spec() -> ModelSpec {
    let a = vec![
        columns(pattern(O[0] * S[0] * S[1], 1), O[0]),
        columns(pattern(O[1] * S[1], 2), O[1]),
    ];
    let b = vec![
        columns(pattern(S[0] * S[0] * U[0], 3), S[0]),
        columns(pattern(S[1] * S[1] * U[1], 4), S[1]),
    ];
    let d = vec![vec![0.5, 0.3, 0.2], vec![0.25, 0.75]];
    let policies = construct_policies(&U, H).unwrap();
    let p = policies.len() / (H * 2);
    ModelSpec {
        num_states: S.to_vec(),
        num_controls: U.to_vec(),
        num_obs: O.to_vec(),
        a_deps: vec![vec![0, 1], vec![1]],
        pa: a
            .iter()
            .map(|t| t.iter().map(|v| 4.0 * v + 0.5).collect())
            .collect(),
        pb: b
            .iter()
            .map(|t| t.iter().map(|v| 2.0 * v + 0.25).collect())
            .collect(),
        pd: d
            .iter()
            .map(|t| t.iter().map(|v| 3.0 * v).collect())
            .collect(),
        a,
        b,
        c: vec![vec![1.0, -0.5, 0.0, 2.0], vec![-1.0, 0.5, 0.25]],
        d,
        policies,
        policy_len: H,
        e: (0..p).map(|i| 1.0 + (i % 3) as f64).collect(),
    }
}

/// The C description of a [`ModelSpec`]; the arrays it points into live in the struct.
struct CDesc {
    spec: ModelSpec,
    sizes: [Vec<u64>; 5],
    ptrs: [Vec<*const f64>; 7],
}

const NUM_STATES: usize = 0;
const NUM_CONTROLS: usize = 1;
const NUM_OBS: usize = 2;
const NUM_DEPS: usize = 3;
const DEPS: usize = 4;

impl CDesc {
    fn new(spec: ModelSpec) -> CDesc {
        let u64s = |v: &[usize]| v.iter().map(|&x| x as u64).collect::<Vec<u64>>();
        let ptrs = |v: &[Vec<f64>]| v.iter().map(|t| t.as_ptr()).collect::<Vec<_>>();
        let flat: Vec<usize> = spec.a_deps.iter().flatten().copied().collect();
        let counts: Vec<usize> = spec.a_deps.iter().map(|d| d.len()).collect();
        CDesc {
            sizes: [
                u64s(&spec.num_states),
                u64s(&spec.num_controls),
                u64s(&spec.num_obs),
                u64s(&counts),
                u64s(&flat),
            ],
            ptrs: [
                ptrs(&spec.a),
                ptrs(&spec.b),
                ptrs(&spec.c),
                ptrs(&spec.d),
                ptrs(&spec.pa),
                ptrs(&spec.pb),
                ptrs(&spec.pd),
            ],
            spec,
        }
    }

    fn desc(&self) -> FepVmpModelDesc {
        let list = |i: usize| {
            if self.ptrs[i].is_empty() {
                null()
            } else {
                self.ptrs[i].as_ptr()
            }
        };
        let s = &self.spec;
        let f = s.num_states.len();
        FepVmpModelDesc {
            num_factors: f as u64,
            num_modalities: s.num_obs.len() as u64,
            num_states: self.sizes[NUM_STATES].as_ptr(),
            num_controls: if s.num_controls.is_empty() {
                null()
            } else {
                self.sizes[NUM_CONTROLS].as_ptr()
            },
            num_obs: self.sizes[NUM_OBS].as_ptr(),
            a_num_deps: self.sizes[NUM_DEPS].as_ptr(),
            a_deps: self.sizes[DEPS].as_ptr(),
            a: list(0),
            b: list(1),
            c: list(2),
            d: list(3),
            policies: if s.policies.is_empty() {
                null()
            } else {
                s.policies.as_ptr()
            },
            num_policies: (s.policies.len() / (s.policy_len * f).max(1)) as u64,
            policy_len: s.policy_len as u64,
            e: if s.e.is_empty() { null() } else { s.e.as_ptr() },
            pa: list(4),
            pb: list(5),
            pd: list(6),
        }
    }
}

/// A model made through the C ABI, freed on drop.
struct Handle(*mut FepVmpModel);

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe { ffi::fep_vmp_model_free(self.0) };
    }
}

fn c_model(dev: &Device, desc: &FepVmpModelDesc) -> Handle {
    let mut out = null_mut();
    let st = unsafe { ffi::fep_vmp_model_new(kind_code(dev), 0, desc, &mut out) };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    assert!(!out.is_null());
    Handle(out)
}

/// Index observations `[N, steps, M]` (every outcome visited), as i32.
fn index_obs(steps: usize) -> Vec<i32> {
    (0..N * steps)
        .flat_map(|i| [(i * 3 % O[0]) as i32, ((i * 2 + 1) % O[1]) as i32])
        .collect()
}

/// Distributional observations `[N, ΣO]`: uneven, positive, normalised per modality.
fn dist_obs() -> Vec<f32> {
    (0..N)
        .flat_map(|n| {
            let m0 = columns(pattern(O[0], n + 5), O[0]);
            let m1 = columns(pattern(O[1], n + 9), O[1]);
            m0.into_iter()
                .chain(m1)
                .map(|v| v as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Priors or beliefs `[rows, ΣS]`: normalised per factor, different per row.
fn beliefs(rows: usize, seed: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| {
            let mut out = Vec::new();
            for (f, &s) in S.iter().enumerate() {
                let raw = pattern(s, r * 5 + f + seed);
                let sum: f64 = raw.iter().sum();
                out.extend(raw.iter().map(|v| (v / sum) as f32));
            }
            out
        })
        .collect()
}

/// Actions `[N, T − 1, F]` in range.
fn actions() -> Vec<i32> {
    (0..N * (T - 1))
        .flat_map(|i| [(i % U[0]) as i32, ((i / 2) % U[1]) as i32])
        .collect()
}

fn nan(dev: &Device, len: usize) -> DeviceBuffer<f32> {
    dev.upload(&vec![f32::NAN; len]).unwrap()
}

fn host<T: bytemuck::Pod>(b: &DeviceBuffer<T>) -> Vec<T> {
    b.to_vec().unwrap()
}

fn fpi_params(num_iter: u32, tol: f32) -> FepVmpFpiParams {
    FepVmpFpiParams {
        num_iter,
        tol,
        skip_input_checks: 0,
    }
}

fn seq_params(method: Method, tau: f32) -> FepVmpSequenceParams {
    FepVmpSequenceParams {
        method: method.code(),
        num_iter: 12,
        tau,
        skip_input_checks: 0,
    }
}

fn policy_params(novelty: bool) -> FepVmpPolicyParams {
    FepVmpPolicyParams {
        gamma: 2.5,
        utility: 1,
        state_info_gain: 1,
        param_info_gain: novelty as i32,
        skip_input_checks: 0,
    }
}

fn learn_params() -> FepVmpLearnParams {
    FepVmpLearnParams {
        lr_a: 0.7,
        lr_b: 1.3,
        lr_d: 0.5,
        skip_input_checks: 0,
    }
}

/// State inference through the C ABI into NaN-poisoned buffers, against `vmp::infer_states`.
fn check_states(dev: &Device, rust: &Model, c: &Handle) {
    let obs = dev.upload(&index_obs(1)).unwrap();
    let dist = dev.upload(&dist_obs()).unwrap();
    let prior = dev.upload(&beliefs(N, 1)).unwrap();
    for (what, kind, addr, with_prior, iters, tol) in [
        (
            "index, prior",
            ffi::FEP_VMP_OBS_INDEX,
            obs.addr(),
            true,
            9,
            0.0,
        ),
        ("dist, D", ffi::FEP_VMP_OBS_DIST, dist.addr(), false, 7, 0.0),
        (
            "index, early stop",
            ffi::FEP_VMP_OBS_INDEX,
            obs.addr(),
            true,
            40,
            1e-4,
        ),
    ] {
        let spec = FpiSpec::new().iters(iters).tol(tol);
        let o = if kind == ffi::FEP_VMP_OBS_INDEX {
            Obs::Index(obs.view())
        } else {
            Obs::Dist(dist.view())
        };
        let pv = prior.view();
        let want = vmp::infer_states(rust, &spec, &o, with_prior.then_some(&pv)).unwrap();
        let (qs, vfe, trace) = (
            nan(dev, N * SUM_S),
            nan(dev, N),
            nan(dev, N * iters as usize),
        );
        let it = dev.upload(&[-1i32; N]).unwrap();
        let p = fpi_params(iters, tol);
        let prior_ptr = if with_prior {
            prior.addr() as *const f32
        } else {
            null()
        };
        let run = |qs: &DeviceBuffer<f32>, vfe: *mut f32, it: *mut i32, trace: *mut f32| unsafe {
            let st = ffi::fep_vmp_infer_states(
                c.0,
                null_mut(),
                &p,
                kind,
                addr as *const c_void,
                N as u64,
                prior_ptr,
                qs.addr() as *mut f32,
                vfe,
                it,
                trace,
            );
            assert_eq!(st, ffi::FEP_OK, "{what}: {}", last_error());
            dev.synchronize(dev.default_stream()).unwrap();
        };
        run(
            &qs,
            vfe.addr() as *mut f32,
            it.addr() as *mut i32,
            trace.addr() as *mut f32,
        );
        assert_eq!(host(&qs), host(&want.qs), "{what}: qs");
        assert_eq!(host(&vfe), host(&want.vfe), "{what}: vfe");
        assert_eq!(host(&it), host(&want.iterations), "{what}: iterations");
        assert_eq!(host(&trace), host(&want.vfe_trace), "{what}: vfe_trace");
        if tol > 0.0 {
            assert!(
                host(&it).iter().any(|&k| k < iters as i32),
                "{what}: no agent stopped early: {:?}",
                host(&it)
            );
        }
        // The optional outputs skipped: qs alone, the same values.
        let qs = nan(dev, N * SUM_S);
        run(&qs, null_mut(), null_mut(), null_mut());
        assert_eq!(host(&qs), host(&want.qs), "{what} (NULL outputs): qs");
    }
}

/// Sequence inference, vmp and mmp, with and without the optional outputs and the prior.
fn check_sequence(dev: &Device, rust: &Model, c: &Handle) {
    let obs = dev.upload(&index_obs(T)).unwrap();
    let acts = dev.upload(&actions()).unwrap();
    let prior = dev.upload(&beliefs(N, 2)).unwrap();
    for (method, tau, with_prior) in [
        (Method::Vmp, 1.0, false),
        (Method::Mmp, 1.0, true),
        (Method::Vmp, 0.5, true),
        (Method::Mmp, 0.5, false),
    ] {
        let what = format!("{method:?} tau {tau} prior {with_prior}");
        let spec = SequenceSpec::new(method).iters(12).tau(tau);
        let pv = prior.view();
        let want = vmp::infer_sequence(
            rust,
            &spec,
            T,
            &Obs::Index(obs.view()),
            Some(&acts.view()),
            with_prior.then_some(&pv),
        )
        .unwrap();
        let p = seq_params(method, tau);
        let prior_ptr = if with_prior {
            prior.addr() as *const f32
        } else {
            null()
        };
        let run = |qs: &DeviceBuffer<f32>, vfe: *mut f32, vfe_t: *mut f32| unsafe {
            ffi::fep_vmp_infer_sequence(
                c.0,
                null_mut(),
                &p,
                T as u64,
                ffi::FEP_VMP_OBS_INDEX,
                obs.addr() as *const c_void,
                N as u64,
                acts.addr() as *const i32,
                prior_ptr,
                qs.addr() as *mut f32,
                vfe,
                vfe_t,
            )
        };
        let (qs, vfe, vfe_t) = (nan(dev, N * T * SUM_S), nan(dev, N), nan(dev, N * T));
        let st = run(&qs, vfe.addr() as *mut f32, vfe_t.addr() as *mut f32);
        assert_eq!(st, ffi::FEP_OK, "{what}: {}", last_error());
        dev.synchronize(dev.default_stream()).unwrap();
        assert_eq!(host(&qs), host(&want.qs), "{what}: qs");
        assert_eq!(host(&vfe), host(&want.vfe), "{what}: vfe");
        assert_eq!(host(&vfe_t), host(&want.vfe_t), "{what}: vfe_t");
        let qs = nan(dev, N * T * SUM_S);
        let st = run(&qs, null_mut(), null_mut());
        assert_eq!(st, ffi::FEP_OK, "{what} (NULL outputs): {}", last_error());
        dev.synchronize(dev.default_stream()).unwrap();
        assert_eq!(host(&qs), host(&want.qs), "{what} (NULL outputs): qs");
    }
    // One step: no actions needed.
    let obs1 = dev.upload(&index_obs(1)).unwrap();
    let spec = SequenceSpec::new(Method::Mmp).iters(12);
    let want = vmp::infer_sequence(rust, &spec, 1, &Obs::Index(obs1.view()), None, None).unwrap();
    let qs = nan(dev, N * SUM_S);
    let st = unsafe {
        ffi::fep_vmp_infer_sequence(
            c.0,
            null_mut(),
            &seq_params(Method::Mmp, 1.0),
            1,
            ffi::FEP_VMP_OBS_INDEX,
            obs1.addr() as *const c_void,
            N as u64,
            null(),
            null(),
            qs.addr() as *mut f32,
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, ffi::FEP_OK, "T = 1: {}", last_error());
    dev.synchronize(dev.default_stream()).unwrap();
    assert_eq!(host(&qs), host(&want.qs), "T = 1: qs");
}

/// Policy inference with and without novelty, and without G.
fn check_policies(dev: &Device, rust: &Model, c: &Handle) {
    let p = rust.num_policies();
    let qs = dev.upload(&beliefs(N, 3)).unwrap();
    for novelty in [false, true] {
        let spec = PolicySpec::new().gamma(2.5).terms(true, true, novelty);
        let want = vmp::infer_policies(rust, &spec, &qs.view()).unwrap();
        let (g, q_pi) = (nan(dev, N * p), nan(dev, N * p));
        let params = policy_params(novelty);
        let st = unsafe {
            ffi::fep_vmp_infer_policies(
                c.0,
                null_mut(),
                &params,
                qs.addr() as *const f32,
                N as u64,
                g.addr() as *mut f32,
                q_pi.addr() as *mut f32,
            )
        };
        assert_eq!(st, ffi::FEP_OK, "novelty {novelty}: {}", last_error());
        dev.synchronize(dev.default_stream()).unwrap();
        assert_eq!(host(&g), host(&want.g), "novelty {novelty}: g");
        assert_eq!(host(&q_pi), host(&want.q_pi), "novelty {novelty}: q_pi");
        let q_pi = nan(dev, N * p);
        let st = unsafe {
            ffi::fep_vmp_infer_policies(
                c.0,
                null_mut(),
                &params,
                qs.addr() as *const f32,
                N as u64,
                null_mut(),
                q_pi.addr() as *mut f32,
            )
        };
        assert_eq!(
            st,
            ffi::FEP_OK,
            "novelty {novelty}, g NULL: {}",
            last_error()
        );
        dev.synchronize(dev.default_stream()).unwrap();
        assert_eq!(host(&q_pi), host(&want.q_pi), "novelty {novelty}, g NULL");
    }
}

/// Every count tensor of the C model read back, against the Rust model's.
fn assert_same_counts(rust: &Model, c: &Handle, what: &str) {
    let kinds = [
        (ffi::FEP_VMP_COUNTS_A, O.len()),
        (ffi::FEP_VMP_COUNTS_B, S.len()),
        (ffi::FEP_VMP_COUNTS_D, S.len()),
    ];
    for (which, count) in kinds {
        for i in 0..count {
            let want = match which {
                ffi::FEP_VMP_COUNTS_A => rust.counts_a(i),
                ffi::FEP_VMP_COUNTS_B => rust.counts_b(i),
                _ => rust.counts_d(i),
            }
            .unwrap()
            .unwrap();
            let mut got = vec![f64::NAN; want.len()];
            let st = unsafe {
                ffi::fep_vmp_model_counts(
                    c.0,
                    null_mut(),
                    which,
                    i as u64,
                    got.as_mut_ptr(),
                    got.len() as u64,
                )
            };
            assert_eq!(
                st,
                ffi::FEP_OK,
                "{what}: counts {which}[{i}]: {}",
                last_error()
            );
            assert_eq!(got, want, "{what}: counts {which}[{i}]");
        }
    }
}

/// Learning from windows of T steps (index and distributional observations), then from one step
/// without actions; the counts read back after each.
fn check_learn(dev: &Device, desc: &CDesc) {
    let mut rust = Model::new(dev, &desc.spec).unwrap();
    let c = c_model(dev, &desc.desc());
    assert_same_counts(&rust, &c, "before learning");
    let obs = dev.upload(&index_obs(T)).unwrap();
    let qs = dev.upload(&beliefs(N * T, 4)).unwrap();
    let acts = dev.upload(&actions()).unwrap();
    let p = learn_params();
    let spec = LearnSpec::new(p.lr_a, p.lr_b, p.lr_d);
    vmp::learn(
        &mut rust,
        &spec,
        T,
        &Obs::Index(obs.view()),
        &qs.view(),
        Some(&acts.view()),
        dev.default_stream(),
    )
    .unwrap();
    let st = unsafe {
        ffi::fep_vmp_learn(
            c.0,
            null_mut(),
            &p,
            T as u64,
            ffi::FEP_VMP_OBS_INDEX,
            obs.addr() as *const c_void,
            N as u64,
            qs.addr() as *const f32,
            acts.addr() as *const i32,
        )
    };
    assert_eq!(st, ffi::FEP_OK, "learn: {}", last_error());
    assert_same_counts(&rust, &c, "after a window");
    assert_ne!(
        rust.counts_a(0).unwrap(),
        Some(desc.spec.pa[0].clone()),
        "learning changed pA"
    );

    let dist = dev.upload(&dist_obs()).unwrap();
    let qs1 = dev.upload(&beliefs(N, 6)).unwrap();
    let spec = LearnSpec::new(0.3, 0.0, 0.2);
    vmp::learn(
        &mut rust,
        &spec,
        1,
        &Obs::Dist(dist.view()),
        &qs1.view(),
        None,
        dev.default_stream(),
    )
    .unwrap();
    let p = FepVmpLearnParams {
        lr_a: 0.3,
        lr_b: 0.0,
        lr_d: 0.2,
        skip_input_checks: 0,
    };
    let st = unsafe {
        ffi::fep_vmp_learn(
            c.0,
            null_mut(),
            &p,
            1,
            ffi::FEP_VMP_OBS_DIST,
            dist.addr() as *const c_void,
            N as u64,
            qs1.addr() as *const f32,
            null(),
        )
    };
    assert_eq!(st, ffi::FEP_OK, "learn, one step: {}", last_error());
    assert_same_counts(&rust, &c, "after one step");
}

fn c_abi_matches_rust(dev: &Device) {
    let desc = CDesc::new(spec());
    let rust = Model::new(dev, &desc.spec).unwrap();
    let c = c_model(dev, &desc.desc());
    let mut info = [u64::MAX; 6];
    let st = unsafe {
        let [a, b, c2, d, e, f] = &mut info;
        ffi::fep_vmp_model_info(c.0, a, b, c2, d, e, f)
    };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    let p = rust.num_policies();
    assert_eq!(p, 16);
    assert_eq!(info, [2, 2, SUM_S as u64, SUM_O as u64, p as u64, H as u64]);
    check_states(dev, &rust, &c);
    check_sequence(dev, &rust, &c);
    check_policies(dev, &rust, &c);
    check_learn(dev, &desc);
}

#[test]
fn c_abi_matches_the_rust_api_on_the_cpu() {
    c_abi_matches_rust(&Device::cpu());
}

#[test]
fn c_abi_matches_the_rust_api_on_a_gpu() {
    match probe() {
        Ok(dev) if !is_emulated(dev) => c_abi_matches_rust(dev),
        Ok(_) => println!(
            "SKIPPED c_abi_matches_the_rust_api_on_a_gpu: the C ABI names real devices only"
        ),
        Err(why) => println!("SKIPPED c_abi_matches_the_rust_api_on_a_gpu: no GPU ({why})"),
    }
}

/// A model without policies or counts, C and D left out (zeros, uniform): it builds, and the
/// calls that need what it lacks say so.
#[test]
fn a_minimal_description_builds_and_reports_what_it_lacks() {
    let full = spec();
    let bare = ModelSpec {
        num_states: full.num_states,
        num_controls: Vec::new(),
        num_obs: full.num_obs,
        a_deps: full.a_deps,
        a: full.a,
        b: vec![
            columns(pattern(S[0] * S[0], 7), S[0]),
            columns(pattern(S[1] * S[1], 8), S[1]),
        ],
        ..Default::default()
    };
    let dev = Device::cpu();
    let desc = CDesc::new(bare.clone());
    let d = desc.desc();
    assert!(d.num_controls.is_null() && d.pa.is_null() && d.c.is_null() && d.policies.is_null());
    let c = c_model(&dev, &d);
    let rust = Model::new(&dev, &bare).unwrap();
    let mut info = [u64::MAX; 6];
    let st = unsafe {
        let [a, b, c2, d, e, f] = &mut info;
        ffi::fep_vmp_model_info(c.0, a, b, c2, d, e, f)
    };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    assert_eq!(info, [2, 2, SUM_S as u64, SUM_O as u64, 0, 0]);
    // NULL entries of C and D are zeros and uniform: the same posteriors as the Rust model's.
    let zeros = [vec![0.0; O[0]], vec![0.0; O[1]]];
    let c_list = [zeros[0].as_ptr(), null()];
    let half = [0.5f64, 0.5];
    let d_list = [null(), half.as_ptr()];
    let with_lists = FepVmpModelDesc {
        c: c_list.as_ptr(),
        d: d_list.as_ptr(),
        ..d
    };
    let c2 = c_model(&dev, &with_lists);
    let obs = index_obs(1);
    let want = vmp::infer_states(
        &rust,
        &FpiSpec::new(),
        &Obs::Index(fep_kernels::View::host(&obs)),
        None,
    )
    .unwrap();
    for h in [&c, &c2] {
        let mut qs = vec![f32::NAN; N * SUM_S];
        let st = unsafe {
            ffi::fep_vmp_infer_states(
                h.0,
                null_mut(),
                &fpi_params(16, 0.0),
                ffi::FEP_VMP_OBS_INDEX,
                obs.as_ptr().cast(),
                N as u64,
                null(),
                qs.as_mut_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        assert_eq!(st, ffi::FEP_OK, "{}", last_error());
        assert_eq!(qs, want.qs.to_vec().unwrap());
    }
    let qs = beliefs(N, 0);
    let mut q_pi = vec![f32::NAN; N];
    let st = unsafe {
        ffi::fep_vmp_infer_policies(
            c.0,
            null_mut(),
            &policy_params(false),
            qs.as_ptr(),
            N as u64,
            null_mut(),
            q_pi.as_mut_ptr(),
        )
    };
    assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("policy"), "{}", last_error());
    // P = 0 leaves the caller nothing to allocate: a NULL q_pi still gets that message.
    let st = unsafe {
        ffi::fep_vmp_infer_policies(
            c.0,
            null_mut(),
            &policy_params(false),
            qs.as_ptr(),
            N as u64,
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("no policy table"), "{}", last_error());
    let mut out = [0f64; 24];
    for which in [
        ffi::FEP_VMP_COUNTS_A,
        ffi::FEP_VMP_COUNTS_B,
        ffi::FEP_VMP_COUNTS_D,
    ] {
        let st =
            unsafe { ffi::fep_vmp_model_counts(c.0, null_mut(), which, 0, out.as_mut_ptr(), 24) };
        assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT, "counts {which}");
        let msg = last_error();
        assert!(
            msg.contains("which") && msg.contains("no Dirichlet counts"),
            "{msg}"
        );
    }
}

fn expect_invalid(what: &str, st: i32, name: &str) {
    assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT, "{what}: status {st}");
    let msg = last_error();
    assert!(
        msg.contains(name),
        "{what}: message {msg:?} does not name {name}"
    );
}

#[test]
fn model_descriptions_are_checked() {
    let good = CDesc::new(spec());
    let new = |d: &FepVmpModelDesc| {
        let mut out = null_mut();
        let st = unsafe { ffi::fep_vmp_model_new(ffi::FEP_DEVICE_CPU, 0, d, &mut out) };
        if st == ffi::FEP_OK {
            unsafe { ffi::fep_vmp_model_free(out) };
        } else {
            assert!(out.is_null(), "out written on error");
        }
        st
    };
    assert_eq!(new(&good.desc()), ffi::FEP_OK, "{}", last_error());

    // Values the model's own checks reject, named as desc fields.
    let mut s = spec();
    s.a[0][3] += 0.25;
    expect_invalid("unnormalised A", new(&CDesc::new(s).desc()), "desc.a[0]");
    let mut s = spec();
    s.policies[5] = U[1] as i32;
    expect_invalid(
        "policy action out of range",
        new(&CDesc::new(s).desc()),
        "desc.policies",
    );
    let mut s = spec();
    s.pb[1][0] = -1.0;
    expect_invalid("negative counts", new(&CDesc::new(s).desc()), "desc.pb[1]");
    let mut s = spec();
    s.d[0] = vec![0.5, 0.5, 0.5];
    expect_invalid("unnormalised D", new(&CDesc::new(s).desc()), "desc.d[0]");
    let mut s = spec();
    s.a_deps[1] = vec![2];
    expect_invalid(
        "dependency out of range",
        new(&CDesc::new(s).desc()),
        "desc.a_deps[1]",
    );
    let mut s = spec();
    s.num_states[1] = 0;
    expect_invalid("zero states", new(&CDesc::new(s).desc()), "desc.num_states");

    // The description's pointers and counts.
    let d = good.desc();
    let a_with_null = [good.spec.a[0].as_ptr(), null()];
    let b_with_null = [good.spec.b[0].as_ptr(), null()];
    let too_many_deps = [2u64, 3];
    let cases: Vec<(&str, FepVmpModelDesc, &str)> = vec![
        ("NULL A", FepVmpModelDesc { a: null(), ..d }, "desc.a"),
        (
            "NULL A entry",
            FepVmpModelDesc {
                a: a_with_null.as_ptr(),
                ..d
            },
            "desc.a[1]",
        ),
        (
            "NULL B entry",
            FepVmpModelDesc {
                b: b_with_null.as_ptr(),
                ..d
            },
            "desc.b[1]",
        ),
        ("pB without B", FepVmpModelDesc { b: null(), ..d }, "pb"),
        (
            "NULL num_states",
            FepVmpModelDesc {
                num_states: null(),
                ..d
            },
            "desc.num_states",
        ),
        (
            "NULL a_deps",
            FepVmpModelDesc {
                a_deps: null(),
                ..d
            },
            "desc.a_deps",
        ),
        (
            "no factors",
            FepVmpModelDesc {
                num_factors: 0,
                ..d
            },
            "desc.num_factors",
        ),
        (
            "no modalities",
            FepVmpModelDesc {
                num_modalities: 0,
                ..d
            },
            "desc.num_modalities",
        ),
        (
            "more deps than factors",
            FepVmpModelDesc {
                a_num_deps: too_many_deps.as_ptr(),
                ..d
            },
            "desc.a_num_deps",
        ),
        (
            "policies NULL with a count",
            FepVmpModelDesc {
                policies: null(),
                e: null(),
                ..d
            },
            "desc.policies",
        ),
        (
            "a policy table of no policies",
            FepVmpModelDesc {
                num_policies: 0,
                ..d
            },
            "desc.num_policies",
        ),
        (
            "policy_len 0",
            FepVmpModelDesc { policy_len: 0, ..d },
            "desc.policy_len",
        ),
        (
            "E without policies",
            FepVmpModelDesc {
                policies: null(),
                num_policies: 0,
                ..d
            },
            "desc.e",
        ),
    ];
    for (what, desc, name) in cases {
        expect_invalid(what, new(&desc), name);
    }
    let mut out = null_mut();
    expect_invalid(
        "NULL desc",
        unsafe { ffi::fep_vmp_model_new(ffi::FEP_DEVICE_CPU, 0, null(), &mut out) },
        "desc",
    );
    expect_invalid(
        "NULL out",
        unsafe { ffi::fep_vmp_model_new(ffi::FEP_DEVICE_CPU, 0, &d, null_mut()) },
        "out",
    );
    expect_invalid(
        "device kind",
        unsafe { ffi::fep_vmp_model_new(9, 0, &d, &mut out) },
        "kind",
    );
    expect_invalid(
        "ordinal",
        unsafe { ffi::fep_vmp_model_new(ffi::FEP_DEVICE_CPU, -1, &d, &mut out) },
        "ordinal",
    );
    unsafe { ffi::fep_vmp_model_free(null_mut()) };
}

#[test]
fn c_abi_rejects_bad_arguments_with_a_message() {
    let dev = Device::cpu();
    let desc = CDesc::new(spec());
    let c = c_model(&dev, &desc.desc());
    let m = c.0 as *const FepVmpModel;
    let obs = index_obs(1);
    let mut qs = vec![f32::NAN; N * SUM_S];
    let states = |model: *const FepVmpModel,
                  p: *const FepVmpFpiParams,
                  kind: i32,
                  obs: *const i32,
                  n: u64,
                  qs: *mut f32| unsafe {
        ffi::fep_vmp_infer_states(
            model,
            null_mut(),
            p,
            kind,
            obs.cast(),
            n,
            null(),
            qs,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    let idx = ffi::FEP_VMP_OBS_INDEX;
    let p = fpi_params(16, 0.0);
    let q = qs.as_mut_ptr();
    let o = obs.as_ptr();
    expect_invalid(
        "NULL model",
        states(null(), &p, idx, o, N as u64, q),
        "model",
    );
    expect_invalid(
        "NULL params",
        states(m, null(), idx, o, N as u64, q),
        "params",
    );
    expect_invalid("NULL obs", states(m, &p, idx, null(), N as u64, q), "obs");
    expect_invalid("NULL qs", states(m, &p, idx, o, N as u64, null_mut()), "qs");
    expect_invalid("bad obs kind", states(m, &p, 7, o, N as u64, q), "obs_kind");
    expect_invalid("n = 0", states(m, &p, idx, o, 0, q), "n");
    expect_invalid(
        "num_iter = 0",
        states(m, &fpi_params(0, 0.0), idx, o, N as u64, q),
        "num_iter",
    );
    expect_invalid(
        "negative tol",
        states(m, &fpi_params(4, -1.0), idx, o, N as u64, q),
        "tol",
    );
    let mut bad_obs = obs.clone();
    bad_obs[2 * 2] = O[0] as i32; // agent 2, modality 0: one past the last outcome
    expect_invalid(
        "observation out of range",
        states(m, &p, idx, bad_obs.as_ptr(), N as u64, q),
        "obs",
    );
    bad_obs[2 * 2] = -1;
    expect_invalid(
        "negative observation",
        states(m, &p, idx, bad_obs.as_ptr(), N as u64, q),
        "obs",
    );
    assert!(qs.iter().all(|v| v.is_nan()), "qs written on error");

    // Sequences: the method, missing actions, tau.
    let obs_t = index_obs(T);
    let acts = actions();
    let mut qs_t = vec![f32::NAN; N * T * SUM_S];
    let seq = |p: &FepVmpSequenceParams, steps: u64, acts: *const i32, qs: *mut f32| unsafe {
        ffi::fep_vmp_infer_sequence(
            c.0,
            null_mut(),
            p,
            steps,
            idx,
            obs_t.as_ptr().cast(),
            N as u64,
            acts,
            null(),
            qs,
            null_mut(),
            null_mut(),
        )
    };
    let good = seq_params(Method::Vmp, 1.0);
    let q = qs_t.as_mut_ptr();
    let bad_method = FepVmpSequenceParams { method: 5, ..good };
    expect_invalid(
        "bad method",
        seq(&bad_method, T as u64, acts.as_ptr(), q),
        "method",
    );
    expect_invalid("NULL actions", seq(&good, T as u64, null(), q), "actions");
    expect_invalid(
        "tau 0",
        seq(&seq_params(Method::Mmp, 0.0), T as u64, acts.as_ptr(), q),
        "tau",
    );
    expect_invalid("steps 0", seq(&good, 0, acts.as_ptr(), q), "steps");
    let mut bad_acts = acts.clone();
    bad_acts[3] = U[1] as i32;
    expect_invalid(
        "action out of range",
        seq(&good, T as u64, bad_acts.as_ptr(), q),
        "actions",
    );
    assert!(qs_t.iter().all(|v| v.is_nan()), "qs written on error");

    // Policies: gamma, novelty without counts is covered by the minimal model; NULL q_pi.
    let qs_now = beliefs(N, 0);
    let p_count = desc.spec.policies.len() / (H * 2);
    let mut q_pi = vec![f32::NAN; N * p_count];
    let pol = |p: &FepVmpPolicyParams, qs: *const f32, q_pi: *mut f32| unsafe {
        ffi::fep_vmp_infer_policies(c.0, null_mut(), p, qs, N as u64, null_mut(), q_pi)
    };
    let bad_gamma = FepVmpPolicyParams {
        gamma: f32::NAN,
        ..policy_params(false)
    };
    expect_invalid(
        "gamma NaN",
        pol(&bad_gamma, qs_now.as_ptr(), q_pi.as_mut_ptr()),
        "gamma",
    );
    expect_invalid(
        "NULL q_pi",
        pol(&policy_params(false), qs_now.as_ptr(), null_mut()),
        "q_pi",
    );
    expect_invalid(
        "NULL qs",
        pol(&policy_params(false), null(), q_pi.as_mut_ptr()),
        "qs",
    );
    assert!(q_pi.iter().all(|v| v.is_nan()), "q_pi written on error");

    // Learning: a rate without counts, a negative rate, NULL qs; the counts stay as they were.
    let bare = ModelSpec {
        pa: Vec::new(),
        pb: Vec::new(),
        pd: Vec::new(),
        ..spec()
    };
    let bare_desc = CDesc::new(bare);
    let no_counts = c_model(&dev, &bare_desc.desc());
    let qs_learn = beliefs(N * T, 1);
    let learn = |model: *mut FepVmpModel, p: &FepVmpLearnParams, qs: *const f32| unsafe {
        ffi::fep_vmp_learn(
            model,
            null_mut(),
            p,
            T as u64,
            idx,
            obs_t.as_ptr().cast(),
            N as u64,
            qs,
            acts.as_ptr(),
        )
    };
    let lr_a_only = FepVmpLearnParams {
        lr_a: 0.5,
        lr_b: 0.0,
        lr_d: 0.0,
        skip_input_checks: 0,
    };
    expect_invalid(
        "lr > 0 without counts",
        learn(no_counts.0, &lr_a_only, qs_learn.as_ptr()),
        "lr_a",
    );
    let negative = FepVmpLearnParams {
        lr_b: -1.0,
        ..learn_params()
    };
    expect_invalid(
        "negative lr",
        learn(c.0, &negative, qs_learn.as_ptr()),
        "lr_b",
    );
    expect_invalid("NULL qs", learn(c.0, &learn_params(), null()), "qs");
    expect_invalid(
        "NULL model",
        learn(null_mut(), &learn_params(), qs_learn.as_ptr()),
        "model",
    );
    let mut pa0 = vec![f64::NAN; O[0] * S[0] * S[1]];
    let st = unsafe {
        ffi::fep_vmp_model_counts(
            c.0,
            null_mut(),
            ffi::FEP_VMP_COUNTS_A,
            0,
            pa0.as_mut_ptr(),
            pa0.len() as u64,
        )
    };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    assert_eq!(pa0, desc.spec.pa[0], "counts changed by a failed learn");

    // Counts: which, index, len, NULL out.
    let counts = |which: i32, index: u64, out: *mut f64, len: u64| unsafe {
        ffi::fep_vmp_model_counts(c.0, null_mut(), which, index, out, len)
    };
    let o = pa0.as_mut_ptr();
    let len = pa0.len() as u64;
    expect_invalid("bad which", counts(9, 0, o, len), "which");
    expect_invalid(
        "index out of range",
        counts(ffi::FEP_VMP_COUNTS_A, 2, o, len),
        "index",
    );
    expect_invalid(
        "wrong len",
        counts(ffi::FEP_VMP_COUNTS_A, 0, o, len - 1),
        "len",
    );
    expect_invalid(
        "NULL out",
        counts(ffi::FEP_VMP_COUNTS_B, 0, null_mut(), 18),
        "out",
    );
    expect_invalid(
        "NULL model",
        unsafe { ffi::fep_vmp_model_counts(null(), null_mut(), ffi::FEP_VMP_COUNTS_A, 0, o, len) },
        "model",
    );
    expect_invalid(
        "NULL model",
        unsafe {
            ffi::fep_vmp_model_info(
                null(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        },
        "model",
    );
}

/// A description with `b` NULL: a model for state inference only. fep_vmp_infer_states gives
/// the Rust API's numbers (those of the model with B); sequence and policy inference and
/// learning pB fail with FEP_ERR_INVALID_ARGUMENT naming B, their outputs untouched; learning
/// pA and pD works.
#[test]
fn a_description_without_b_does_state_inference_only() {
    let mut full = spec();
    full.pb = Vec::new();
    let no_b = ModelSpec {
        b: Vec::new(),
        ..full.clone()
    };
    let dev = Device::cpu();
    let desc = CDesc::new(no_b.clone());
    let d = desc.desc();
    assert!(d.b.is_null() && d.pb.is_null());
    let c = c_model(&dev, &d);
    let with_b = Model::new(&dev, &full).unwrap();
    check_states(&dev, &with_b, &c);
    let rust = Model::new(&dev, &no_b).unwrap();
    assert!(!rust.has_b());

    let obs = index_obs(T);
    let acts = actions();
    let mut qs = vec![f32::NAN; N * T * SUM_S];
    let st = unsafe {
        ffi::fep_vmp_infer_sequence(
            c.0,
            null_mut(),
            &seq_params(Method::Vmp, 1.0),
            T as u64,
            ffi::FEP_VMP_OBS_INDEX,
            obs.as_ptr().cast(),
            N as u64,
            acts.as_ptr(),
            null(),
            qs.as_mut_ptr(),
            null_mut(),
            null_mut(),
        )
    };
    expect_invalid("sequence without B", st, "transition matrices B");
    assert!(
        last_error().contains("sequence inference"),
        "{}",
        last_error()
    );
    assert!(qs.iter().all(|v| v.is_nan()));
    let beliefs_now = beliefs(N, 0);
    let mut q_pi = vec![f32::NAN; N * rust.num_policies()];
    let st = unsafe {
        ffi::fep_vmp_infer_policies(
            c.0,
            null_mut(),
            &policy_params(false),
            beliefs_now.as_ptr(),
            N as u64,
            null_mut(),
            q_pi.as_mut_ptr(),
        )
    };
    expect_invalid("policies without B", st, "transition matrices B");
    assert!(q_pi.iter().all(|v| v.is_nan()));
    let post = beliefs(N * T, 3);
    let learn = |p: &FepVmpLearnParams| unsafe {
        ffi::fep_vmp_learn(
            c.0,
            null_mut(),
            p,
            T as u64,
            ffi::FEP_VMP_OBS_INDEX,
            obs.as_ptr().cast(),
            N as u64,
            post.as_ptr(),
            acts.as_ptr(),
        )
    };
    expect_invalid("learning pB without B", learn(&learn_params()), "lr_b");
    let no_lr_b = FepVmpLearnParams {
        lr_b: 0.0,
        ..learn_params()
    };
    assert_eq!(learn(&no_lr_b), ffi::FEP_OK, "{}", last_error());
}
