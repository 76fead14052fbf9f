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
    let (what, bytes) = oom(Dictionary::new(&View::host(&phi), 1, m, opts));
    assert!(what.contains("Gram"), "{what}");
    assert_eq!(bytes, (m as u128) * (m as u128) * 8);
    // Through the C ABI: FEP_ERR_OUT_OF_MEMORY with the message, no handle.
    let mut handle = null_mut();
    let status = unsafe {
        ffi::fep_lca_dict_new(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            phi.as_ptr().cast(),
            1,
            m as u64,
            0,
            &mut handle,
        )
    };
    assert_eq!(status, ffi::FEP_ERR_OUT_OF_MEMORY, "{}", last_error());
    assert!(handle.is_null());
    assert!(last_error().contains("Gram"), "{}", last_error());
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
    let mut handle = null_mut();
    let st = unsafe {
        ffi::fep_lca_dict_new(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            phi.as_ptr().cast(),
            2,
            2,
            1,
            &mut handle,
        )
    };
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
    match settle::learn_step(&net, &spec, &View::host(&x0), &View::host(&target)) {
        Err(Error::Diverged(msg)) => assert!(msg.contains("eta = 10"), "{msg}"),
        other => panic!("expected Diverged, got {other:?}"),
    }
    // A stable step size settles.
    assert!(
        settle::learn_step(
            &net,
            &SettleSpec::new(0.05),
            &View::host(&x0),
            &View::host(&target)
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

/// Sizes from tiny to extreme: most draws small (the op runs), some huge (must be rejected).
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..4,
        1 => Just(0usize),
        1 => Just(usize::MAX),
        1 => Just(1usize << 32),
        1 => (0u32..64).prop_map(|s| 1usize << s),
        1 => any::<usize>(),
    ]
}

fn stride() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0usize..40, 1 => Just(usize::MAX - 2), 1 => any::<usize>()]
}

fn param() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..4.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(0.0f32),
        1 => Just(f32::MAX),
        1 => any::<f32>(),
    ]
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
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// Attention forward on random shapes and strides over small real buffers.
    #[test]
    fn attention_forward_never_panics(
        qs in [size(), size(), size(), size()], qst in [stride(), stride(), stride()],
        ks in [size(), size(), size(), size()], kst in [stride(), stride(), stride()],
        vd in size(), sc in score(), causal in any::<bool>(), window in prop::option::of(0u32..4),
        tau in prop::option::of(prop_oneof![Just(1e300f64), Just(-1.0), 0.01f64..4.0]),
        with_pk in any::<bool>(), with_lse in any::<bool>(),
    ) {
        let buf: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Tensor4 { data: View::host(&buf), shape: qs, strides: qst };
        let k = Tensor4 { data: View::host(&buf[..48]), shape: ks, strides: kst };
        let v = Tensor4::bhld(View::host(&buf[..40]), [ks[0], ks[1], ks[2], vd]);
        let mut spec = AttentionSpec::new(sc).causal(causal);
        spec.window = window;
        spec.scale = tau;
        let pk = [1.5f32; 16];
        let p = Precisions { head: None, key: with_pk.then(|| View::host(&pk[..qs[0].min(16)])) };
        let mut o = vec![SENTINEL; 64];
        let mut lse = vec![SENTINEL; 16];
        let o_shape = [qs[0], qs[1], qs[2], vd];
        let out = AttentionOutputs {
            o: Tensor4Mut::bhld(ViewMut::host(&mut o), o_shape),
            lse: with_lse.then(|| ViewMut::host(&mut lse[..qs[0].min(16)])),
            e: None,
        };
        let r = attention::forward_into(&spec, &q, &k, &v, &p, None, out, Device::cpu().default_stream());
        if r.is_err() {
            prop_assert!(o.iter().all(|&x| x == SENTINEL));
            prop_assert!(lse.iter().all(|&x| x == SENTINEL));
        }
        // The allocating form too.
        let _ = attention::forward(&spec, &q, &k, &v, &p, None);
    }

    /// LCA: random dictionary sizes, batch lengths, steps and parameters.
    #[test]
    fn lca_never_panics(
        n in size(), m in size(), xlen in 0usize..12, steps in prop_oneof![0u32..6, Just(u32::MAX)],
        lam in param(), eta in param(), tol in param(), trace in any::<bool>(),
    ) {
        let phi: Vec<f32> = (0..64).map(|i| (i as f32 * 0.61).cos()).collect();
        let len = n.saturating_mul(m).min(64);
        let opts = DictionaryOptions { check_unit_norm: false };
        let Ok(dict) = Dictionary::new(&View::host(&phi[..len]), n, m, opts) else { return Ok(()) };
        let x = vec![0.25f32; xlen];
        let mut spec = LcaSpec::new(lam).eta(eta).tol(tol).trace(trace);
        spec.steps = steps;
        let _ = dict.solve(&spec, &View::host(&x), None);
        let mut u = vec![SENTINEL; 16];
        let mut a = vec![SENTINEL; 16];
        let bm = (xlen / n.max(1)).saturating_mul(m).min(16);
        let out = LcaOutputs { u: ViewMut::host(&mut u[..bm]), a: ViewMut::host(&mut a[..bm]), energy: None, active: None, steps: None };
        if dict.solve_into(&spec, &View::host(&x), None, out, Device::cpu().default_stream()).is_err() {
            prop_assert!(u.iter().chain(&a).all(|&v| v == SENTINEL));
        }
    }

    /// Settling: random widths, batch lengths, steps, step sizes (diverging ones included).
    #[test]
    fn settle_never_panics(
        widths in prop::collection::vec(size(), 0..4), xlen in 0usize..9,
        steps in prop_oneof![0u32..8, Just(u32::MAX), Just((1u32 << 31) - 2)],
        eta in param(), beta in param(), tol in param(), lr in param(),
    ) {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.29).sin()).collect();
        let layers: Vec<Layer<'_, f32>> = widths.windows(2)
            .map(|p| Layer::new(View::host(&w[..p[0].saturating_mul(p[1]).min(64)]), Activation::Tanh, Precision::Scalar(1.0)))
            .collect();
        let Ok(net) = Network::new(&widths, layers) else { return Ok(()) };
        let x0 = vec![0.5f32; xlen];
        let target = vec![2.0f32; 8];
        let spec = SettleSpec::new(eta).momentum(beta).tol(tol).steps(steps);
        let _ = settle::infer(&net, &spec, &View::host(&x0), None);
        let top = *widths.last().unwrap();
        let tl = (xlen / widths[0].max(1)).saturating_mul(top).min(8);
        if let Ok(r) = settle::learn_step(&net, &spec, &View::host(&x0), &View::host(&target[..tl])) {
            // Applying the gradients never writes a non-finite weight.
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

    /// The merge: random parts, shapes and lse values.
    #[test]
    fn merge_never_panics(
        shape in [size(), size(), size(), size()], splits in size(),
        lse0 in param(), lse1 in param(),
    ) {
        let o = vec![0.5f32; 32];
        let lse = [lse0, lse1, 0.0, -1.0];
        let parts = MergeParts { o: View::host(&o), lse: View::host(&lse), e: None, splits, shape };
        let _ = attention::merge(&parts);
    }
}

// ---- the C ABI: misaligned pointers and garbage handles ----------------------------------------

#[test]
fn misaligned_pointers_and_garbage_handles_are_errors() {
    let words = [0u32; 9];
    let odd = unsafe { words.as_ptr().cast::<u8>().add(1) };
    let mut handle = null_mut();
    let status = unsafe {
        ffi::fep_lca_dict_new(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            ffi::FEP_DTYPE_F32,
            odd.cast(),
            2,
            2,
            0,
            &mut handle,
        )
    };
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
    assert_eq!(garbage, [0u64; 64]);
    let fake = garbage.as_ptr() as *mut ffi::FepVmpModel;
    unsafe { ffi::fep_vmp_model_free(fake) };
    assert!(
        last_error().contains("not a live handle"),
        "{}",
        last_error()
    );
}

/// fep_settle_learn of a [2, 3, 2] identity network (batch 2), returning the status; the
/// weights are the caller's, updated in place with lr > 0.
fn c_learn(widths: [u64; 3], w1: &mut [f32; 6], w2: &mut [f32; 6], eta: f32, lr: f32) -> i32 {
    let acts = [ffi::FEP_ACT_IDENTITY; 2];
    let weights = [w1.as_mut_ptr().cast(), w2.as_mut_ptr().cast()];
    let net = ffi::FepSettleNet {
        layers: 2,
        widths: widths.as_ptr(),
        activations: acts.as_ptr(),
        leaky_alpha: null(),
        dtype: ffi::FEP_DTYPE_F32,
        weights: weights.as_ptr(),
        biases: null(),
        precision: null(),
        precision_diag: null(),
    };
    let params = ffi::FepSettleParams {
        eta,
        momentum: 0.0,
        steps: 50,
        tol: 0.0,
        init: 0,
        skip_input_checks: 0,
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
