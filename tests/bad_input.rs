//! Bad input through the safe Rust API and the C ABI (issue 21, DESIGN §3, §6): every
//! reproduction of the issue as a regression test, then property tests (proptest) over the
//! constructors and every op's validation with random and extreme shapes, strides, sizes and
//! parameters. The property: `Ok` or `Err`, never a panic or an abort, and outputs untouched on
//! `Err`. The matrix of input class x op -> error in README.md ("Bad input") is what these
//! tests enumerate.

use std::ptr::{null, null_mut};

use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, MergeParts, Precisions, Score,
};
use fep_kernels::attention::{Tensor4, Tensor4Mut};
use fep_kernels::ffi;
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec};
use fep_kernels::settle::{self, Activation, Layer, Network, Precision, SettleSpec};
use fep_kernels::{Device, Error, View, ViewMut};
use proptest::prelude::*;

const SENTINEL: f32 = -12345.0;

fn oom(r: Result<impl std::fmt::Debug, Error>) -> (String, u128) {
    match r {
        Err(Error::OutOfMemory { what, bytes, .. }) => (what, bytes),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

fn invalid_name<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

// ---- 2. allocation never aborts --------------------------------------------------------------

#[test]
fn impossible_allocations_are_out_of_memory_errors() {
    let dev = Device::cpu();
    let (what, bytes) = oom(dev.alloc::<f32>(1 << 40 << 20));
    assert!(what.contains("f32"), "{what}");
    assert_eq!(bytes, (1u128 << 60) * 4);
    let (_, bytes) = oom(dev.alloc::<f32>(usize::MAX / 4));
    assert_eq!(bytes, (usize::MAX / 4) as u128 * 4);
    let (_, bytes) = oom(dev.alloc::<f64>(usize::MAX));
    assert_eq!(bytes, usize::MAX as u128 * 8);
}

#[test]
fn a_gram_matrix_too_large_is_an_error_not_an_abort() {
    // 1 x 2^20: Φ is 4 MiB, G = ΦᵀΦ − I would be 2^40 f64 (8 TiB).
    let m = 1usize << 20;
    let phi = vec![1.0f32; m];
    let opts = DictionaryOptions {
        check_unit_norm: false,
    };
    // Device::cpu() (the fast path) keeps G in f32, Device::reference() in f64.
    let (what, bytes) = oom(Dictionary::new(&View::host(&phi), 1, m, opts));
    assert!(what.contains("Gram"), "{what}");
    assert_eq!(bytes, (m as u128) * (m as u128) * 4);
    let reference = View::host_on(&Device::reference(), &phi).unwrap();
    let (what, bytes) = oom(Dictionary::new(&reference, 1, m, opts));
    assert!(what.contains("Gram"), "{what}");
    assert_eq!(bytes, (m as u128) * (m as u128) * 8);
    // Through the C ABI: FEP_ERR_OUT_OF_MEMORY with the message, no handle.
    let (status, handle) = c_dict_new(phi.as_ptr(), 1, m as u64, 0);
    assert_eq!(status, ffi::FEP_ERR_OUT_OF_MEMORY, "{}", last_error());
    assert!(handle.is_null());
    assert!(last_error().contains("Gram"), "{}", last_error());
}

/// fep_lca_dict_new of an f32 `n` x `m` Φ on the CPU: (status, handle).
fn c_dict_new(
    phi: *const f32,
    n: u64,
    m: u64,
    check_unit_norm: i32,
) -> (i32, *mut ffi::FepLcaDict) {
    let mut handle = null_mut();
    let status = unsafe {
        ffi::fep_lca_dict_new(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            phi.cast(),
            n,
            m,
            check_unit_norm,
            &mut handle,
        )
    };
    (status, handle)
}

fn last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(ffi::fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn tiny_net<'a>(w1: &'a [f32], w2: &'a [f32]) -> Network<'a, f32> {
    Network::new(
        &[1, 1, 1],
        vec![
            Layer::new(View::host(w1), Activation::Tanh, Precision::Scalar(1.0)),
            Layer::new(View::host(w2), Activation::Tanh, Precision::Scalar(1.0)),
        ],
    )
    .unwrap()
}

#[test]
fn a_trace_too_large_is_an_error_not_an_abort() {
    let (w1, w2) = ([0.5f32], [0.5f32]);
    let net = tiny_net(&w1, &w2);
    // 4096 samples x 2^31 - 1 steps + 1: a 32 TiB trace.
    let x0 = vec![0.1f32; 4096];
    let spec = SettleSpec::new(0.1).steps((1 << 31) - 2);
    let (what, _) = oom(settle::infer(&net, &spec, &View::host(&x0), None));
    assert!(what.contains("f32"), "{what}");
}

// ---- 3. overflowing shapes and strides in the safe API ---------------------------------------

#[test]
fn overflowing_strides_and_shapes_are_rejected() {
    let data = [1f32; 8];
    let small = [1f32; 4];
    let wild = Tensor4 {
        data: View::host(&data),
        shape: [2, 1, 1, 4],
        strides: [usize::MAX - 2, 4, 4],
    };
    let ok = Tensor4::bhld(View::host(&small), [1, 1, 1, 4]);
    let spec = AttentionSpec::new(Score::Dot);
    let p = Precisions::default();
    assert_eq!(
        invalid_name(attention::forward(&spec, &wild, &ok, &ok, &p, None)),
        "q"
    );
    assert_eq!(
        invalid_name(attention::forward(&spec, &ok, &wild, &ok, &p, None)),
        "k"
    );
    let huge = Tensor4::bhld(View::host(&small), [1, 1 << 32, 1 << 32, 1]);
    assert_eq!(
        invalid_name(attention::forward(&spec, &huge, &ok, &ok, &p, None)),
        "q"
    );
    let huge = Tensor4::blhd(View::host(&small), [1 << 33, 1 << 31, 1 << 31, 1]);
    assert!(attention::forward(&spec, &ok, &huge, &huge, &p, None).is_err());
    // Strides that alias every row (0 is below D only when D > 1): counts must still be checked.
    let alias = Tensor4 {
        data: View::host(&small),
        shape: [1 << 32, 1 << 32, 1, 1],
        strides: [1, 1, 1],
    };
    assert!(attention::forward(&spec, &alias, &alias, &alias, &p, None).is_err());
}

// ---- 5. LCA outputs that overlap --------------------------------------------------------------

#[test]
fn lca_rejects_overlapping_outputs() {
    let phi = [1.0f32, 0.0, 0.0, 1.0];
    let dict = Dictionary::new(&View::host(&phi), 2, 2, Default::default()).unwrap();
    let spec = LcaSpec::new(0.1).steps(5).trace(true);
    let x = [0.5f32, -0.3];
    let mut buf = [SENTINEL; 16];
    let (u, rest) = buf.split_at_mut(2);
    let (a, rest) = rest.split_at_mut(2);
    let (energy, _) = rest.split_at_mut(5);
    let mut ab = [SENTINEL; 2];
    // u and a the same memory.
    let ptr = u.as_mut_ptr() as u64;
    let alias = || unsafe { ViewMut::<f32>::from_raw(&Device::cpu(), ptr, 2) };
    let out = LcaOutputs {
        u: alias(),
        a: alias(),
        energy: None,
        active: None,
        steps: None,
    };
    let s = Device::cpu().default_stream();
    assert_eq!(
        invalid_name(dict.solve_into(&spec, &View::host(&x), None, out, s)),
        "a"
    );
    // energy == a.
    let aptr = ab.as_mut_ptr() as u64;
    let out = LcaOutputs {
        u: ViewMut::host(a),
        a: unsafe { ViewMut::from_raw(&Device::cpu(), aptr, 2) },
        energy: Some(unsafe { ViewMut::from_raw(&Device::cpu(), aptr, 2) }),
        active: None,
        steps: None,
    };
    let spec2 = LcaSpec::new(0.1).steps(2).trace(true);
    assert_eq!(
        invalid_name(dict.solve_into(&spec2, &View::host(&x), None, out, s)),
        "energy"
    );
    // x overlapping u (u written while x is read).
    let mut xb = [0.5f32, -0.3];
    let xp = xb.as_mut_ptr() as u64;
    let out = LcaOutputs {
        u: unsafe { ViewMut::from_raw(&Device::cpu(), xp, 2) },
        a: ViewMut::host(&mut ab),
        energy: None,
        active: None,
        steps: None,
    };
    let xv = unsafe { View::<f32>::from_raw(&Device::cpu(), xp, 2) };
    let spec3 = LcaSpec::new(0.1).steps(2);
    assert_eq!(
        invalid_name(dict.solve_into(&spec3, &xv, None, out, s)),
        "u"
    );
    assert_eq!(xb, [0.5, -0.3]);
    // Distinct memory is fine, and u0 may be u itself.
    let out = LcaOutputs {
        u: ViewMut::host(&mut energy[..2]),
        a: ViewMut::host(&mut ab),
        energy: None,
        active: None,
        steps: None,
    };
    assert!(
        dict.solve_into(&spec3, &View::host(&x), None, out, s)
            .is_ok()
    );
    assert!(buf[..4].iter().all(|&v| v == SENTINEL));
    // The same through the C ABI: u_out == a_out.
    let (st, handle) = c_dict_new(phi.as_ptr(), 2, 2, 1);
    assert_eq!(st, ffi::FEP_OK);
    let params = ffi::FepLcaParams {
        threshold: 0,
        lambda: 0.1,
        eta: 0.1,
        steps: 3,
        tol: 0.0,
        ..unsafe { std::mem::zeroed() }
    };
    let mut ua = [SENTINEL; 2];
    let st = unsafe {
        ffi::fep_lca_solve(
            handle,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            x.as_ptr().cast(),
            1,
            &params,
            null(),
            ua.as_mut_ptr(),
            ua.as_mut_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT, "{}", last_error());
    assert_eq!(ua, [SENTINEL; 2]);
    unsafe { ffi::fep_lca_dict_free(handle) };
}

// ---- 6. divergence never reaches the caller's parameters -------------------------------------

#[test]
fn a_diverging_settle_is_reported_and_writes_nothing() {
    let w1 = [2.0f32, -1.5, 1.0, 0.5, 1.5, -2.0];
    let w2 = [1.0f32, -1.0, 2.0, 1.5, 0.5, -0.5];
    let net = Network::new(
        &[2, 3, 2],
        vec![
            Layer::new(
                View::host(&w1),
                Activation::Identity,
                Precision::Scalar(1.0),
            ),
            Layer::new(
                View::host(&w2),
                Activation::Identity,
                Precision::Scalar(1.0),
            ),
        ],
    )
    .unwrap();
    let x0 = [1.0f32, -1.0, 0.5, 2.0];
    let target = [3.0f32, 8.0, -5.0, 6.0];
    let spec = SettleSpec::new(10.0).steps(50);
    match settle::learn_step(&net, &spec, &View::host(&x0), &View::host(&target), None) {
        Err(Error::Diverged(msg)) => assert!(msg.contains("eta = 10"), "{msg}"),
        other => panic!("expected Diverged, got {other:?}"),
    }
    // A stable step size settles.
    assert!(
        settle::learn_step(
            &net,
            &SettleSpec::new(0.05),
            &View::host(&x0),
            &View::host(&target),
            None
        )
        .is_ok()
    );

    // sgd_all: all or nothing.
    let (mut p1, mut p2) = ([1.0f32, 2.0], [3.0f32]);
    let (g1, g2) = ([1.0f32, 1.0], [f32::MAX]);
    let mut status = [7u32];
    let r = settle::sgd_all(
        &mut [ViewMut::host(&mut p1), ViewMut::host(&mut p2)],
        &[View::host(&g1), View::host(&g2)],
        1e10,
        Some(&mut ViewMut::host(&mut status)),
        Device::cpu().default_stream(),
    );
    assert!(matches!(r, Err(Error::Diverged(_))), "{r:?}");
    assert_eq!((p1, p2, status), ([1.0, 2.0], [3.0], [1]));
    let r = settle::sgd_all(
        &mut [ViewMut::host(&mut p1), ViewMut::host(&mut p2)],
        &[View::host(&g1), View::host(&[1.0f32])],
        0.5,
        Some(&mut ViewMut::host(&mut status)),
        Device::cpu().default_stream(),
    );
    assert!(r.is_ok());
    assert_eq!((p1, p2, status), ([0.5, 1.5], [2.5], [0]));
}

// ---- 7. smaller ones ---------------------------------------------------------------------------

#[test]
fn merge_rejects_non_finite_lse_parts_and_forward_reports_overflow() {
    let o = [1.0f32, 2.0];
    let out_o = || [SENTINEL; 1];
    for bad in [f32::INFINITY, f32::NAN] {
        let lse = [0.5f32, bad];
        let parts = MergeParts {
            o: View::host(&o),
            lse: View::host(&lse),
            e: None,
            splits: 2,
            shape: [1, 1, 1, 1],
        };
        let mut oo = out_o();
        let out = AttentionOutputs {
            o: Tensor4Mut::bhld(ViewMut::host(&mut oo), [1, 1, 1, 1]),
            lse: None,
            e: None,
        };
        let r = attention::merge_into(&parts, out, Device::cpu().default_stream());
        assert_eq!(invalid_name(r), "lse parts");
        assert_eq!(oo, out_o());
    }
    // −∞ parts are fine (a part that saw no key).
    let lse = [0.5f32, f32::NEG_INFINITY];
    let parts = MergeParts {
        o: View::host(&o),
        lse: View::host(&lse),
        e: None,
        splits: 2,
        shape: [1, 1, 1, 1],
    };
    assert_eq!(attention::merge(&parts).unwrap().o.to_vec().unwrap(), [1.0]);

    // τ that is not a finite f32, and scores that overflow f32.
    let q = [1.0f32, 1.0];
    let t = Tensor4::bhld(View::host(&q), [1, 1, 1, 2]);
    let p = Precisions::default();
    let spec = AttentionSpec::new(Score::Dot).scale(1e300);
    assert_eq!(
        invalid_name(attention::forward(&spec, &t, &t, &t, &p, None)),
        "scale"
    );
    let big = [1e30f32, 1e30];
    let tb = Tensor4::bhld(View::host(&big), [1, 1, 1, 2]);
    let spec = AttentionSpec::new(Score::Dot).scale(1.0);
    let mut oo = [SENTINEL; 2];
    let mut lse = [SENTINEL; 1];
    let out = AttentionOutputs {
        o: Tensor4Mut::bhld(ViewMut::host(&mut oo), [1, 1, 1, 2]),
        lse: Some(ViewMut::host(&mut lse)),
        e: None,
    };
    let r = attention::forward_into(
        &spec,
        &tb,
        &tb,
        &tb,
        &p,
        None,
        out,
        Device::cpu().default_stream(),
    );
    assert_eq!(invalid_name(r), "scale");
    assert_eq!((oo, lse), ([SENTINEL; 2], [SENTINEL]));
}

#[test]
fn construct_policies_rejects_impossible_tables() {
    use fep_kernels::vmp::construct_policies;
    assert_eq!(construct_policies(&[2, 3], 1).unwrap().len(), 12);
    assert!(construct_policies(&[0], 1).is_err());
    assert!(construct_policies(&[1 << 40], 1).is_err());
    assert!(construct_policies(&[1 << 20, 1 << 20, 1 << 20], 2).is_err());
    assert!(construct_policies(&[2], usize::MAX).is_err());
}

// ---- property tests ---------------------------------------------------------------------------
//
// Each case draws a small valid problem and then, half the time, breaks one field with an
// extreme value (a size of 0, 2^32 or usize::MAX, a wild stride, NaN/Inf/0/huge parameters), so
// that both the ops and their validation run: valid cases must succeed, broken ones may fail,
// none may panic, and outputs are untouched on error.

/// An extreme replacement for a size or stride.
fn extreme() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(usize::MAX),
        Just(usize::MAX - 2),
        Just(1usize << 32),
        (0u32..64).prop_map(|s| 1usize << s),
        any::<usize>(),
    ]
}

fn param() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => 0.05f32..0.5,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(0.0f32),
        1 => Just(-1.0f32),
        1 => Just(f32::MAX),
        1 => any::<f32>(),
    ]
}

/// Which field to break (index into the op's list), and with what; None: leave it valid.
fn breakage() -> impl Strategy<Value = Option<(usize, usize)>> {
    prop_oneof![1 => Just(None), 1 => (0usize..32, extreme()).prop_map(Some)]
}

fn score() -> impl Strategy<Value = Score> {
    prop_oneof![
        Just(Score::Dot),
        Just(Score::Gaussian),
        param().prop_map(Score::StudentT),
        Just(Score::Laplace),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn attention_forward_never_panics(
        dims in [1usize..3, 1usize..3, 1usize..3, 1usize..4, 1usize..4, 1usize..4, 1usize..4],
        sc in score(), causal in any::<bool>(), window in prop::option::of(0u32..4),
        tau in prop::option::of(prop_oneof![Just(1e300f64), Just(-1.0), 0.05f64..2.0]),
        with_pk in any::<bool>(), with_lse in any::<bool>(), broken in breakage(),
    ) {
        let [b, g, hkv, lq, lk, d, dv] = dims;
        let hq = g * hkv;
        let (mut qs, mut ks, mut vs) = ([b, hq, lq, d], [b, hkv, lk, d], [b, hkv, lk, dv]);
        let (mut qst, mut kst) = ([hq * lq * d, lq * d, d], [hkv * lk * d, lk * d, d]);
        let mut os = [b, hq, lq, dv];
        let mut pk_len = b * hkv * lk;
        let mut lse_len = b * hq * lq;
        if let Some((field, x)) = broken {
            match field % 12 {
                f @ 0..=3 => qs[f] = x,
                f @ 4..=6 => qst[f - 4] = x,
                f @ 7..=8 => ks[f - 5] = x,
                9 => { kst[0] = x; vs[0] = x }
                10 => { pk_len = x % 97; os[3] = x }
                _ => lse_len = x % 89,
            }
        }
        let buf: Vec<f32> = (0..2048).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Tensor4 { data: View::host(&buf), shape: qs, strides: qst };
        let k = Tensor4 { data: View::host(&buf[..1024]), shape: ks, strides: kst };
        let v = Tensor4::bhld(View::host(&buf[..512]), vs);
        let mut spec = AttentionSpec::new(sc).causal(causal);
        spec.window = window;
        spec.scale = tau;
        let pk = vec![1.5f32; 128];
        let p = Precisions { head: None, key: with_pk.then(|| View::host(&pk[..pk_len.min(128)])), ..Default::default() };
        let mut o = vec![SENTINEL; 512];
        let mut lse = vec![SENTINEL; 128];
        let out = AttentionOutputs {
            o: Tensor4Mut::bhld(ViewMut::host(&mut o), os),
            lse: with_lse.then(|| ViewMut::host(&mut lse[..lse_len.min(128)])),
            e: None,
        };
        let r = attention::forward_into(&spec, &q, &k, &v, &p, None, out, Device::cpu().default_stream());
        let valid_params = match sc { Score::StudentT(nu) => nu.is_finite() && nu > 0.0, _ => true }
            && window != Some(0) && tau.is_none_or(|t| t > 0.0 && t < 1e30);
        if broken.is_none() && valid_params {
            prop_assert!(r.is_ok(), "{r:?}");
        }
        if r.is_err() {
            prop_assert!(o.iter().all(|&x| x == SENTINEL));
            prop_assert!(lse.iter().all(|&x| x == SENTINEL));
        }
        let _ = attention::forward(&spec, &q, &k, &v, &p, None);
    }

    #[test]
    fn lca_never_panics(
        n in 1usize..4, m in 1usize..5, batch in 1usize..4, steps in 1u32..6,
        lam in param(), eta in param(), tol in param(), trace in any::<bool>(), broken in breakage(),
        relative in any::<bool>(),
    ) {
        let (mut n_, mut m_, mut xlen, mut steps_) = (n, m, batch * n, steps);
        let mut phi_len = n * m;
        if let Some((field, x)) = broken {
            match field % 5 {
                0 => n_ = x,
                1 => m_ = x,
                2 => xlen = x % 97,
                3 => steps_ = [0, u32::MAX, 1 << 31][x % 3], // invalid only: a valid huge T would run
                _ => phi_len = x % 61,
            }
        }
        let phi: Vec<f32> = (0..64).map(|i| (i as f32 * 0.61).cos()).collect();
        let opts = DictionaryOptions { check_unit_norm: false };
        let dict = Dictionary::new(&View::host(&phi[..phi_len.min(64)]), n_, m_, opts);
        if broken.is_none() {
            prop_assert!(dict.is_ok(), "{dict:?}");
        }
        let Ok(dict) = dict else { return Ok(()) };
        let x = vec![0.25f32; xlen];
        // eta = 0 is the automatic step 1/lambda_max (power iteration on the dictionary)
        let mut spec = LcaSpec::new(lam).eta(eta).tol(tol).trace(trace).allow_tf32(relative);
        if relative {
            spec = spec.relative_tol(tol);
        }
        spec.steps = steps_;
        let r = dict.solve(&spec, &View::host(&x), None);
        let eta_ok = eta == 0.0 || (eta.is_finite() && eta > 0.0 && eta <= 1.0);
        let valid = lam.is_finite() && lam > 0.0 && lam < 1e3 && eta_ok && tol.is_finite() && tol >= 0.0;
        if broken.is_none() && valid {
            prop_assert!(r.is_ok(), "{r:?}");
        }
        let mut u = vec![SENTINEL; 64];
        let mut a = vec![SENTINEL; 64];
        let bm = (xlen / n_.max(1)).saturating_mul(m_).min(64);
        let out = LcaOutputs { u: ViewMut::host(&mut u[..bm]), a: ViewMut::host(&mut a[..bm]), energy: None, active: None, steps: None };
        if dict.solve_into(&spec, &View::host(&x), None, out, Device::cpu().default_stream()).is_err() {
            prop_assert!(u.iter().chain(&a).all(|&v| v == SENTINEL));
        }
    }

    #[test]
    fn settle_never_panics(
        widths in prop::collection::vec(1usize..4, 2..5), batch in 1usize..4, steps in 1u32..8,
        eta in param(), beta in prop_oneof![Just(0.0f32), param()], tol in prop_oneof![Just(0.0f32), param()],
        lr in param(), broken in breakage(),
    ) {
        let mut widths = widths;
        let top = *widths.last().unwrap();
        let (mut xlen, mut tlen, mut steps_) = (batch * widths[0], batch * top, steps);
        let mut wlen: Vec<usize> = widths.windows(2).map(|p| p[0] * p[1]).collect();
        if let Some((field, x)) = broken {
            match field % 5 {
                0 => { let i = x % widths.len(); widths[i] = x }
                1 => xlen = x % 37,
                2 => tlen = x % 37,
                3 => steps_ = [0, u32::MAX, 1 << 31][x % 3], // invalid only: a valid huge T would run
                _ => { let i = x % wlen.len(); wlen[i] = x % 17 }
            }
        }
        let w: Vec<f32> = (0..64).map(|i| 0.5 * (i as f32 * 0.29).sin()).collect();
        let layers: Vec<Layer<'_, f32>> = wlen.iter()
            .map(|&n| Layer::new(View::host(&w[..n.min(64)]), Activation::Tanh, Precision::Scalar(1.0)))
            .collect();
        let net = Network::new(&widths, layers);
        if broken.is_none() {
            prop_assert!(net.is_ok(), "{net:?}");
        }
        let Ok(net) = net else { return Ok(()) };
        let x0 = vec![0.5f32; xlen];
        let target = vec![0.8f32; tlen];
        let spec = SettleSpec::new(eta).momentum(beta).tol(tol).steps(steps_);
        let r = settle::infer(&net, &spec, &View::host(&x0), None);
        if broken.is_none() && eta.is_finite() && eta > 0.0 && eta < 0.5 && beta == 0.0 && tol == 0.0 {
            prop_assert!(r.is_ok(), "{r:?}");
        }
        if let Ok(r) = settle::learn_step(&net, &spec, &View::host(&x0), &View::host(&target), None) {
            // Applying the gradients never writes a non-finite weight, and an error writes none.
            let mut wc = w.clone();
            let n = r.grad_w[0].len().min(64);
            let g = r.grad_w[0].to_vec().unwrap();
            let before = wc.clone();
            match settle::sgd(&mut ViewMut::host(&mut wc[..n]), &View::host(&g[..n]), lr, Device::cpu().default_stream()) {
                Ok(()) => prop_assert!(wc.iter().all(|v| v.is_finite())),
                Err(_) => prop_assert_eq!(wc, before),
            }
        }
    }

    #[test]
    fn merge_never_panics(
        shape in [1usize..3, 1usize..3, 1usize..3, 1usize..3], splits in 1usize..4,
        lse_a in param(), lse_b in param(), broken in breakage(),
    ) {
        let (mut shape, mut splits) = (shape, splits);
        let rows = shape[0] * shape[1] * shape[2];
        let (mut olen, mut llen) = (splits * rows * shape[3], splits * rows);
        if let Some((field, x)) = broken {
            match field % 4 {
                f @ 0..=1 => shape[f] = x,
                2 => splits = x,
                _ => { olen = x % 200; llen = x % 100 }
            }
        }
        let o = vec![0.5f32; 256];
        let lse: Vec<f32> = (0..128).map(|i| if i % 3 == 0 { lse_a } else if i % 3 == 1 { lse_b } else { 0.25 }).collect();
        let parts = MergeParts { o: View::host(&o[..olen.min(256)]), lse: View::host(&lse[..llen.min(128)]), e: None, splits, shape };
        let r = attention::merge(&parts);
        let finite = |v: f32| !v.is_nan() && v != f32::INFINITY;
        if broken.is_none() && finite(lse_a) && finite(lse_b) {
            prop_assert!(r.is_ok(), "{r:?}");
        }
    }
}

// ---- the C ABI: misaligned pointers and garbage handles ----------------------------------------

#[test]
fn misaligned_pointers_and_garbage_handles_are_errors() {
    let words = [0u32; 9];
    let odd = unsafe { words.as_ptr().cast::<u8>().add(1) };
    let (status, handle) = c_dict_new(odd.cast(), 2, 2, 0);
    assert_eq!(status, ffi::FEP_ERR_INVALID_ARGUMENT, "{}", last_error());
    assert!(
        last_error().contains("`phi`") && last_error().contains("aligned"),
        "{}",
        last_error()
    );
    assert!(handle.is_null());
    // A handle that was never made: zeroed, readable memory of ample size.
    let garbage = [0u64; 64];
    let fake = garbage.as_ptr() as *mut ffi::FepLcaDict;
    let (mut n, mut m) = (0u64, 0u64);
    let status = unsafe { ffi::fep_lca_dict_shape(fake, &mut n, &mut m) };
    assert_eq!(status, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("not a live handle"),
        "{}",
        last_error()
    );
    unsafe { ffi::fep_lca_dict_free(fake) }; // left alone, no crash
    // A misaligned out-pointer (found by the lca_dict fuzz target) and a misaligned struct.
    let phi = [1.0f32, 0.0, 0.0, 1.0];
    let (s, h) = c_dict_new(phi.as_ptr(), 2, 2, 1);
    assert_eq!(s, ffi::FEP_OK);
    let mut words = [0u64; 2];
    let odd = unsafe { words.as_mut_ptr().cast::<u8>().add(3) }.cast::<u64>();
    let s = unsafe { ffi::fep_lca_dict_shape(h, odd, null_mut()) };
    assert_eq!(s, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("`n`"), "{}", last_error());
    assert_eq!(words, [0, 0]);
    let params = [0u8; 64];
    let x = [0.5f32, 0.5];
    let mut u = [0f32; 2];
    let mut a = [0f32; 2];
    let s = unsafe {
        ffi::fep_lca_solve(
            h,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            x.as_ptr().cast(),
            1,
            params.as_ptr().add(1).cast(),
            null(),
            u.as_mut_ptr(),
            a.as_mut_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(s, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("`params`"), "{}", last_error());
    unsafe { ffi::fep_lca_dict_free(h) };
    assert_eq!(garbage, [0u64; 64]);
    let fake = garbage.as_ptr() as *mut ffi::FepVmpModel;
    unsafe { ffi::fep_vmp_model_free(fake) };
    assert!(
        last_error().contains("not a live handle"),
        "{}",
        last_error()
    );
}

/// A two-layer FepSettleNet over the caller's arrays: f32 weights, no biases, precision 1.
fn c_identity_net(
    widths: &[u64; 3],
    acts: &[i32; 2],
    weights: &[*mut std::ffi::c_void; 2],
) -> ffi::FepSettleNet {
    ffi::FepSettleNet {
        layers: 2,
        widths: widths.as_ptr(),
        activations: acts.as_ptr(),
        leaky_alpha: null(),
        dtype: ffi::FEP_DTYPE_F32,
        weights: weights.as_ptr(),
        biases: null(),
        precision: null(),
        precision_diag: null(),
        precision_per_sample: null(),
    }
}

/// fep_settle_learn of a [2, 3, 2] identity network (batch 2), returning the status; the
/// weights are the caller's, updated in place with lr > 0.
fn c_learn(widths: [u64; 3], w1: &mut [f32; 6], w2: &mut [f32; 6], eta: f32, lr: f32) -> i32 {
    let acts = [ffi::FEP_ACT_IDENTITY; 2];
    let weights = [w1.as_mut_ptr().cast(), w2.as_mut_ptr().cast()];
    let net = c_identity_net(&widths, &acts, &weights);
    let params = ffi::FepSettleParams {
        eta,
        momentum: 0.0,
        steps: 50,
        tol: 0.0,
        init: 0,
        skip_input_checks: 0,
        log_det: 0,
        allow_tf32: 0,
    };
    let x0 = [1.0f32, -1.0, 0.5, 2.0];
    let target = [3.0f32, 8.0, -5.0, 6.0];
    let (mut x1, mut x2, mut e1, mut e2) = ([0f32; 6], [0f32; 4], [0f32; 6], [0f32; 4]);
    let xs = [x1.as_mut_ptr(), x2.as_mut_ptr()];
    let es = [e1.as_mut_ptr(), e2.as_mut_ptr()];
    let (mut gw1, mut gw2, mut gb1, mut gb2) = ([0f32; 6], [0f32; 6], [0f32; 3], [0f32; 2]);
    let gw = [gw1.as_mut_ptr(), gw2.as_mut_ptr()];
    let gb = [gb1.as_mut_ptr(), gb2.as_mut_ptr()];
    unsafe {
        ffi::fep_settle_learn(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            &net,
            &params,
            2,
            x0.as_ptr(),
            target.as_ptr(),
            xs.as_ptr(),
            es.as_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
            gw.as_ptr(),
            gb.as_ptr(),
            std::ptr::null(),
            lr,
        )
    }
}

#[test]
fn c_abi_settle_learn_never_writes_diverged_weights_and_names_a_huge_width() {
    let (w1, w2) = (
        [2.0f32, -1.5, 1.0, 0.5, 1.5, -2.0],
        [1.0f32, -1.0, 2.0, 1.5, 0.5, -0.5],
    );
    let (mut a, mut b) = (w1, w2);
    let status = c_learn([2, 3, 2], &mut a, &mut b, 10.0, 0.5);
    assert_eq!(status, ffi::FEP_ERR_DIVERGED, "{}", last_error());
    assert!(last_error().contains("diverged"), "{}", last_error());
    assert_eq!((a, b), (w1, w2));
    // A stable step size learns: the weights move, and stay finite.
    let status = c_learn([2, 3, 2], &mut a, &mut b, 0.05, 0.01);
    assert_eq!(status, ffi::FEP_OK, "{}", last_error());
    assert!(a != w1 && a.iter().chain(&b).all(|v| v.is_finite()));
    // A width of UINT64_MAX is named as such (not as an overflowing batch).
    let status = c_learn([2, u64::MAX, 2], &mut a, &mut b, 0.05, 0.01);
    assert_eq!(status, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("`net.widths[1]`"), "{}", last_error());
}

/// The precision-learning entry points: fep_settle_sgd_log and fep_settle_max_stable_eta with
/// NULL, misaligned or impossible arguments are errors naming the argument (nothing written);
/// an update that would make a precision non-finite or 0 writes nothing; a per-sample
/// precision or precision gradient of the wrong length is InvalidArgument before any write.
#[test]
fn precision_learning_entry_points_reject_bad_input() {
    let cpu = ffi::FEP_DEVICE_CPU;
    let mut pi = [1.0f32, 2.0];
    let g = [0.5f32, -0.25];
    let lens = [2u64];
    let (pp, gp) = ([pi.as_mut_ptr()], [g.as_ptr()]);
    let sgd = |params: *const *mut f32, grads: *const *const f32, lens: *const u64, lr: f32| unsafe {
        ffi::fep_settle_sgd_log(cpu, 0, null_mut(), 1, params, grads, lens, lr, null_mut())
    };
    let lens_max = [u64::MAX];
    let cases: [(&str, &dyn Fn() -> i32, &str); 6] = [
        (
            "NULL params",
            &|| sgd(null(), gp.as_ptr(), lens.as_ptr(), 0.1),
            "params",
        ),
        (
            "NULL grads",
            &|| sgd(pp.as_ptr(), null(), lens.as_ptr(), 0.1),
            "grads",
        ),
        (
            "NULL lens",
            &|| sgd(pp.as_ptr(), gp.as_ptr(), null(), 0.1),
            "lens",
        ),
        (
            "lr NaN",
            &|| sgd(pp.as_ptr(), gp.as_ptr(), lens.as_ptr(), f32::NAN),
            "lr",
        ),
        (
            "lr < 0",
            &|| sgd(pp.as_ptr(), gp.as_ptr(), lens.as_ptr(), -1.0),
            "lr",
        ),
        (
            "a length past the address space",
            &|| sgd(pp.as_ptr(), gp.as_ptr(), lens_max.as_ptr(), 0.1),
            "params[0]",
        ),
    ];
    for (what, call, name) in cases {
        assert_eq!(call(), ffi::FEP_ERR_INVALID_ARGUMENT, "{what}");
        assert!(last_error().contains(name), "{what}: {}", last_error());
    }
    let bytes = [0u8; 16];
    let misaligned = [bytes.as_ptr().wrapping_add(1) as *mut f32];
    assert_eq!(
        sgd(misaligned.as_ptr(), gp.as_ptr(), lens.as_ptr(), 0.1),
        ffi::FEP_ERR_INVALID_ARGUMENT
    );
    assert_eq!(pi, [1.0, 2.0], "nothing written");
    // A step that would overflow one element writes neither.
    let huge = [0.0f32, -1e30];
    let s = sgd(pp.as_ptr(), [huge.as_ptr()].as_ptr(), lens.as_ptr(), 1.0);
    assert_eq!(s, ffi::FEP_ERR_DIVERGED, "{}", last_error());
    assert_eq!(pi, [1.0, 2.0]);
    // A valid step: pi * exp(-lr pi g).
    assert_eq!(
        sgd(pp.as_ptr(), gp.as_ptr(), lens.as_ptr(), 0.1),
        ffi::FEP_OK
    );
    assert!((pi[0] - (-0.05f32).exp()).abs() < 1e-6 && (pi[1] - 2.0 * 0.05f32.exp()).abs() < 1e-6);

    // fep_settle_max_stable_eta
    let widths = [2u64, 3, 2];
    let acts = [ffi::FEP_ACT_IDENTITY; 2];
    let (w1, w2) = ([0.5f32; 6], [0.5f32; 6]);
    let weights = [w1.as_ptr() as *mut std::ffi::c_void, w2.as_ptr() as *mut _];
    let net = c_identity_net(&widths, &acts, &weights);
    let mut eta = -1.0f32;
    let mse = |net: *const ffi::FepSettleNet, batch: u64, m: f32, clamped: i32, out: *mut f32| unsafe {
        ffi::fep_settle_max_stable_eta(cpu, 0, net, batch, m, clamped, out)
    };
    let cases: [(&str, &dyn Fn(*mut f32) -> i32, &str); 5] = [
        ("NULL net", &|o| mse(null(), 1, 0.0, 1, o), "net"),
        ("NULL out", &|_| mse(&net, 1, 0.0, 1, null_mut()), "eta_out"),
        ("batch 0", &|o| mse(&net, 0, 0.0, 1, o), "batch"),
        ("clamped 2", &|o| mse(&net, 1, 0.0, 2, o), "clamped"),
        ("momentum 1", &|o| mse(&net, 1, 1.0, 1, o), "momentum"),
    ];
    for (what, call, name) in cases {
        assert_eq!(call(&mut eta), ffi::FEP_ERR_INVALID_ARGUMENT, "{what}");
        assert!(last_error().contains(name), "{what}: {}", last_error());
    }
    assert_eq!(eta, -1.0, "nothing written");
    // A per-sample flag without its diagonal is named.
    let flags = [1i32, 0];
    let s = mse(
        &ffi::FepSettleNet {
            precision_per_sample: flags.as_ptr(),
            ..net
        },
        1,
        0.0,
        1,
        &mut eta,
    );
    assert_eq!(s, ffi::FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("precision_diag"), "{}", last_error());
    assert_eq!(mse(&net, 1, 0.0, 1, &mut eta), ffi::FEP_OK);
    assert!(eta > 0.0 && eta.is_finite());

    // Rust: a precision gradient of the wrong length, a per-sample precision of the wrong batch.
    let (w1, w2) = ([0.5f32; 6], [0.5f32; 6]);
    let per_sample = [1.0f32; 3 * 3]; // batch 3, but the call's batch is 2
    let net = Network::new(
        &[2, 3, 2],
        vec![
            Layer::new(
                View::host(&w1),
                Activation::Tanh,
                Precision::PerSample(View::host(&per_sample)),
            ),
            Layer::new(View::host(&w2), Activation::Tanh, Precision::Scalar(1.0)),
        ],
    )
    .unwrap();
    let (x0, y) = ([0.1f32; 4], [0.2f32; 4]);
    let r = settle::learn_step(
        &net,
        &SettleSpec::new(0.1),
        &View::host(&x0),
        &View::host(&y),
        None,
    );
    assert_eq!(invalid_name(r), "layers[0].precision");
    let tiny = Network::new(
        &[2, 3, 2],
        vec![
            Layer::new(View::host(&w1), Activation::Tanh, Precision::Scalar(1.0)),
            Layer::new(View::host(&w2), Activation::Tanh, Precision::Scalar(1.0)),
        ],
    )
    .unwrap();
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; 6], vec![0.0; 4], vec![0.0; 6], vec![0.0; 4]];
    let mut gws = vec![vec![0.0f32; 6], vec![0.0f32; 6]];
    let mut gbs = vec![vec![0.0f32; 3], vec![0.0f32; 2]];
    let mut gp = vec![0.0f32; 2]; // a scalar precision's gradient has 1 value
    let (xs, es) = outs.split_at_mut(2);
    let (g0, g1) = gws.split_at_mut(1);
    let (b0, b1) = gbs.split_at_mut(1);
    let r = settle::learn_step_into(
        &tiny,
        &SettleSpec::new(0.1),
        &View::host(&x0),
        &View::host(&y),
        settle::SettleOutputs {
            x: xs.iter_mut().map(|v| ViewMut::host(v)).collect(),
            eps: es.iter_mut().map(|v| ViewMut::host(v)).collect(),
            energy: None,
            trace: None,
            steps: None,
        },
        settle::Gradients {
            weights: vec![ViewMut::host(&mut g0[0]), ViewMut::host(&mut g1[0])],
            biases: vec![ViewMut::host(&mut b0[0]), ViewMut::host(&mut b1[0])],
            precisions: vec![Some(ViewMut::host(&mut gp)), None],
        },
        Device::cpu().default_stream(),
    );
    assert_eq!(invalid_name(r), "grad precisions[0]");
    assert!(outs.iter().flatten().all(|&v| v == 0.0), "nothing written");
}
