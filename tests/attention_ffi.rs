//! The attention C ABI (`fep_attention_forward`, include/fep_kernels.h) on the CPU device against
//! the Rust API (`attention::forward_into`) bit for bit: fixture cases (GQA, causal with key
//! lengths, windows, every score family, every precision kind) in f32, BHLD and BLHD strides,
//! f16 and bf16 inputs, NULL optional inputs and outputs; and every bad argument rejected with
//! FEP_ERR_INVALID_ARGUMENT and a message naming it, before anything is written. The same for
//! `fep_attention_backward` (against `attention::reference::backward`, bit for bit once rounded)
//! and `fep_attention_merge` (a key-split forward merged against the unsplit forward).

mod common;

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;

use common::attention::{Case, load_case};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, Tensor4, Tensor4Mut,
};
use fep_kernels::ffi::*;
use fep_kernels::{Device, DeviceKind, Element, View, ViewMut};
use half::{bf16, f16};

fn cases() -> &'static [Case] {
    static C: OnceLock<Vec<Case>> = OnceLock::new();
    C.get_or_init(|| {
        common::load_fixture("attention_torch.json")["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(load_case)
            .collect()
    })
}

fn case(name: &str) -> &'static Case {
    cases()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The C parameters of a spec.
fn params_of(spec: &AttentionSpec) -> FepAttentionParams {
    FepAttentionParams {
        score: spec.score.code(),
        nu: match spec.score {
            Score::StudentT(nu) => nu,
            _ => 0.0,
        },
        scale: spec.scale.unwrap_or(0.0),
        causal: spec.causal as i32,
        window: spec.window.map_or(0, |w| w as i32),
        normalizer: spec.normalizer as i32,
        skip_input_checks: (!spec.check_inputs) as i32,
    }
}

fn strides(shape: [usize; 4], blhd: bool) -> [usize; 3] {
    let [_, h, l, d] = shape;
    if blhd {
        [l * h * d, d, h * d]
    } else {
        [h * l * d, l * d, d]
    }
}

/// A row-major BHLD tensor's values laid out with `strides` (BLHD when `blhd`).
fn layout<T: Copy + Default>(x: &[T], shape: [usize; 4], blhd: bool) -> Vec<T> {
    let [b, h, l, d] = shape;
    let s = strides(shape, blhd);
    let mut out = vec![T::default(); b * h * l * d];
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                let src = ((bi * h + hi) * l + li) * d;
                let dst = bi * s[0] + hi * s[1] + li * s[2];
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

fn desc<T>(data: *const T, shape: [usize; 4], blhd: bool) -> FepAttnTensor {
    let s = strides(shape, blhd);
    FepAttnTensor {
        data: data as *mut c_void,
        shape: shape.map(|v| v as u64),
        strides: s.map(|v| v as u64),
    }
}

/// A problem's host inputs in element type T and the given layout.
struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    pi_head: Option<Vec<f32>>,
    pi_key: Option<Vec<f32>>,
    kv_len: Option<Vec<i32>>,
    qs: [usize; 4],
    ks: [usize; 4],
    vs: [usize; 4],
    os: [usize; 4],
    blhd: bool,
}

fn inputs<T: Element + Default>(c: &Case, blhd: bool) -> Inputs<T> {
    let conv = |x: &[f64]| x.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>();
    let qs = [c.b, c.hq, c.lq, c.d];
    let ks = [c.b, c.hkv, c.lk, c.d];
    let vs = [c.b, c.hkv, c.lk, c.dv];
    Inputs {
        q: layout(&conv(&c.q), qs, blhd),
        k: layout(&conv(&c.k), ks, blhd),
        v: layout(&conv(&c.v), vs, blhd),
        pi_head: c
            .pi_head
            .as_ref()
            .map(|x| x.iter().map(|&v| v as f32).collect()),
        pi_key: c
            .pi_key
            .as_ref()
            .map(|x| x.iter().map(|&v| v as f32).collect()),
        kv_len: c.kv_len.clone(),
        qs,
        ks,
        vs,
        os: [c.b, c.hq, c.lq, c.dv],
        blhd,
    }
}

/// (o in the inputs' layout, lse, e).
type Out<T> = (Vec<T>, Vec<f32>, Vec<f32>);

fn rows(x: &Inputs<impl Sized>) -> usize {
    x.os[0] * x.os[1] * x.os[2]
}

/// Through the Rust API.
fn run_rust<T: Element + Default>(spec: &AttentionSpec, x: &Inputs<T>) -> Out<T> {
    let dev = Device::cpu();
    fn t4<T: Element>(d: &[T], s: [usize; 4], blhd: bool) -> Tensor4<'_, T> {
        Tensor4 {
            data: View::host(d),
            shape: s,
            strides: strides(s, blhd),
        }
    }
    let (q, k, v) = (
        t4(&x.q, x.qs, x.blhd),
        t4(&x.k, x.ks, x.blhd),
        t4(&x.v, x.vs, x.blhd),
    );
    let precision = Precisions {
        head: x.pi_head.as_deref().map(View::host),
        key: x.pi_key.as_deref().map(View::host),
        ..Default::default()
    };
    let kv_len = x.kv_len.as_deref().map(View::host);
    let mut o = vec![T::from_f64(f64::NAN); x.os.iter().product()];
    let mut lse = vec![f32::NAN; rows(x)];
    let mut e = vec![f32::NAN; rows(x)];
    let out = AttentionOutputs {
        o: Tensor4Mut {
            data: ViewMut::host(&mut o),
            shape: x.os,
            strides: strides(x.os, x.blhd),
        },
        lse: Some(ViewMut::host(&mut lse)),
        e: Some(ViewMut::host(&mut e)),
    };
    attention::forward_into(
        spec,
        &q,
        &k,
        &v,
        &precision,
        kv_len.as_ref(),
        out,
        dev.default_stream(),
    )
    .unwrap();
    (o, lse, e)
}

fn opt_ptr<T>(x: &Option<Vec<T>>) -> *const T {
    x.as_ref().map_or(std::ptr::null(), |v| v.as_ptr())
}

/// Through the C ABI; `with_stats`: pass lse and e (else NULL, returned empty).
fn run_c<T: Element + Default>(
    params: &FepAttentionParams,
    dtype: i32,
    x: &Inputs<T>,
    with_stats: bool,
) -> Out<T> {
    let mut o = vec![T::from_f64(f64::NAN); x.os.iter().product()];
    let mut lse = vec![f32::NAN; if with_stats { rows(x) } else { 0 }];
    let mut e = lse.clone();
    let (q, k, v) = (
        desc(x.q.as_ptr(), x.qs, x.blhd),
        desc(x.k.as_ptr(), x.ks, x.blhd),
        desc(x.v.as_ptr(), x.vs, x.blhd),
    );
    let od = desc(o.as_mut_ptr(), x.os, x.blhd);
    let (lp, ep) = if with_stats {
        (lse.as_mut_ptr(), e.as_mut_ptr())
    } else {
        (std::ptr::null_mut(), std::ptr::null_mut())
    };
    let st = unsafe {
        fep_attention_forward(
            FEP_DEVICE_CPU,
            0,
            std::ptr::null_mut(),
            params,
            dtype,
            &q,
            &k,
            &v,
            opt_ptr(&x.pi_head),
            opt_ptr(&x.pi_key),
            opt_ptr(&x.kv_len),
            &od,
            lp,
            ep,
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    (o, lse, e)
}

fn bits32(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bits<T: Element>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

fn same<T: Element>(what: &str, got: &Out<T>, want: &Out<T>) {
    assert_eq!(bits(&got.0), bits(&want.0), "{what}: o");
    if !got.1.is_empty() {
        assert_eq!(bits32(&got.1), bits32(&want.1), "{what}: lse");
        assert_eq!(bits32(&got.2), bits32(&want.2), "{what}: e");
    }
}

const CASES: [&str; 7] = [
    "first/gaussian/both/norm/causal_varlen", // GQA 4:2, causal, kv_len with an empty batch
    "gqa/laplace/8x2",
    "mask/studentt/window_varlen",
    "mask/dot/varlen",
    "matrix/gaussian/head/norm",
    "headdim/studentt/32x256",
    "tau/dot/0.5",
];

fn check_case<T: Element + Default>(name: &str, dtype: i32) {
    let c = case(name);
    let params = params_of(&c.spec);
    let mut bhld = None;
    for blhd in [false, true] {
        let x = inputs::<T>(c, blhd);
        let want = run_rust(&c.spec, &x);
        let got = run_c(&params, dtype, &x, true);
        same(&format!("{name} dtype {dtype} blhd {blhd}"), &got, &want);
        // lse and e NULL: o unchanged.
        let got = run_c(&params, dtype, &x, false);
        assert_eq!(bits(&got.0), bits(&want.0), "{name}: o without lse and e");
        // The layout is only strides: the BLHD result is the BHLD one rearranged.
        match &bhld {
            None => bhld = Some(want),
            Some(b) => {
                assert_eq!(
                    bits(&layout(&b.0, x.os, true)),
                    bits(&want.0),
                    "{name}: BLHD o vs BHLD o"
                );
                assert_eq!(bits32(&b.1), bits32(&want.1), "{name}: BLHD lse");
            }
        }
    }
}

#[test]
fn fixture_cases_match_the_rust_api_bitwise_f32() {
    for name in CASES {
        check_case::<f32>(name, FEP_DTYPE_F32);
    }
}

#[test]
fn fixture_cases_match_the_rust_api_bitwise_f16_bf16() {
    for name in &CASES[..3] {
        check_case::<f16>(name, FEP_DTYPE_F16);
        check_case::<bf16>(name, FEP_DTYPE_BF16);
    }
}

/// The C ABI's f32 result is the fixture's (plumbing sanity: not only equal to the Rust API).
#[test]
fn c_abi_matches_the_fixture_loosely() {
    let c = case(CASES[0]);
    let x = inputs::<f32>(c, false);
    let (o, lse, e) = run_c(&params_of(&c.spec), FEP_DTYPE_F32, &x, true);
    let o64: Vec<f64> = o.iter().map(|&v| v as f64).collect();
    let so = c.sample_o(&o64);
    let close = |g: f64, w: f64| (g == w) || (g - w).abs() <= 1e-4 * w.abs().max(1.0);
    for (g, w) in so.iter().zip(&c.o) {
        assert!(close(*g, *w), "o {g} vs {w}");
    }
    for (g, w) in lse.iter().zip(&c.lse) {
        assert!(close(*g as f64, *w), "lse {g} vs {w}");
    }
    for (g, w) in e.iter().zip(&c.e) {
        assert!(close(*g as f64, *w), "e {g} vs {w}");
    }
    assert!(c.fully_masked_rows > 0);
    assert!(lse.contains(&f32::NEG_INFINITY));
}

/// The default scale (params.scale <= 0 or NaN) is the spec's None.
#[test]
fn default_scale_and_nan_scale() {
    let c = case("matrix/gaussian/head/norm");
    let x = inputs::<f32>(c, false);
    let mut spec = c.spec;
    spec.scale = None;
    let want = run_rust(
        &AttentionSpec {
            score: Score::Dot,
            ..spec
        },
        &x,
    );
    for s in [0.0, -1.0, f64::NAN] {
        let mut p = params_of(&AttentionSpec {
            score: Score::Dot,
            ..spec
        });
        p.scale = s;
        same(
            &format!("scale {s}"),
            &run_c(&p, FEP_DTYPE_F32, &x, true),
            &want,
        );
    }
    let explicit = run_rust(
        &AttentionSpec {
            score: Score::Dot,
            scale: Some(1.0 / (c.d as f64).sqrt()),
            ..spec
        },
        &x,
    );
    same("explicit 1/sqrt(D)", &want, &explicit);
}

/// One call with everything valid except what `f` changes: (status, message), and o untouched.
struct Bad {
    params: FepAttentionParams,
    dtype: i32,
    kind: i32,
    ordinal: i32,
    q: FepAttnTensor,
    k: FepAttnTensor,
    v: FepAttnTensor,
    o: FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    lse: *mut f32,
    e: *mut f32,
    null: &'static str,
}

fn bad(f: impl FnOnce(&mut Bad), needle: &str, status: i32) {
    let (b, hq, hkv, lq, lk, d, dv) = (2usize, 4usize, 2usize, 3usize, 5usize, 4usize, 3usize);
    let q = vec![0.5f32; b * hq * lq * d];
    let k = vec![0.25f32; b * hkv * lk * d];
    let v = vec![1.0f32; b * hkv * lk * dv];
    let ph = vec![1.0f32; hq];
    let pk = vec![2.0f32; b * hkv * lk];
    let kl = [lk as i32, 1];
    let mut o = vec![7.0f32; b * hq * lq * dv];
    let mut lse = vec![7.0f32; b * hq * lq];
    let mut e = vec![7.0f32; b * hq * lq];
    let mut c = Bad {
        params: params_of(&AttentionSpec::new(Score::StudentT(3.0)).causal(true)),
        dtype: FEP_DTYPE_F32,
        kind: FEP_DEVICE_CPU,
        ordinal: 0,
        q: desc(q.as_ptr(), [b, hq, lq, d], false),
        k: desc(k.as_ptr(), [b, hkv, lk, d], false),
        v: desc(v.as_ptr(), [b, hkv, lk, dv], false),
        o: desc(o.as_mut_ptr(), [b, hq, lq, dv], false),
        pi_head: ph.as_ptr(),
        pi_key: pk.as_ptr(),
        kv_len: kl.as_ptr(),
        lse: lse.as_mut_ptr(),
        e: e.as_mut_ptr(),
        null: "",
    };
    f(&mut c);
    let p = |name: &str| c.null == name;
    let st = unsafe {
        fep_attention_forward(
            c.kind,
            c.ordinal,
            std::ptr::null_mut(),
            if p("params") {
                std::ptr::null()
            } else {
                &c.params
            },
            c.dtype,
            if p("q") { std::ptr::null() } else { &c.q },
            if p("k") { std::ptr::null() } else { &c.k },
            if p("v") { std::ptr::null() } else { &c.v },
            c.pi_head,
            c.pi_key,
            c.kv_len,
            if p("o") { std::ptr::null() } else { &c.o },
            c.lse,
            c.e,
        )
    };
    let msg = last_error();
    if status == FEP_OK {
        assert_eq!(st, FEP_OK, "the valid call failed: {msg}");
        assert!(o.iter().all(|&x| x != 7.0));
        return;
    }
    assert_eq!(st, status, "{needle}: status {st}, message {msg}");
    assert!(
        msg.contains(needle),
        "message {msg:?} does not name {needle:?}"
    );
    assert!(
        o.iter().chain(&lse).chain(&e).all(|&x| x == 7.0),
        "{needle}: an output was written"
    );
}

#[test]
fn bad_arguments_are_named() {
    let inv = FEP_ERR_INVALID_ARGUMENT;
    bad(|_| {}, "", FEP_OK);
    bad(|c| c.null = "params", "`params`", inv);
    bad(|c| c.null = "q", "`q`", inv);
    bad(|c| c.null = "k", "`k`", inv);
    bad(|c| c.null = "v", "`v`", inv);
    bad(|c| c.null = "o", "`o`", inv);
    bad(|c| c.q.data = std::ptr::null_mut(), "`q.data`", inv);
    bad(|c| c.k.data = std::ptr::null_mut(), "`k.data`", inv);
    bad(|c| c.v.data = std::ptr::null_mut(), "`v.data`", inv);
    bad(|c| c.o.data = std::ptr::null_mut(), "`o.data`", inv);
    bad(|c| c.dtype = 7, "`dtype`", inv);
    bad(|c| c.kind = 9, "`kind`", inv);
    bad(|c| c.ordinal = -1, "`ordinal`", inv);
    bad(|c| c.params.score = 4, "`params.score`", inv);
    bad(|c| c.params.nu = 0.0, "`params.nu`", inv);
    bad(|c| c.params.nu = f32::NAN, "`params.nu`", inv);
    bad(|c| c.params.scale = f64::INFINITY, "`params.scale`", inv);
    bad(|c| c.params.window = -2, "`params.window`", inv);
    bad(|c| c.q.shape[0] = 0, "`q`", inv);
    bad(|c| c.q.strides[2] = 1, "`q`", inv); // rows overlap
    bad(|c| c.q.strides[0] = u64::MAX / 2, "`q.strides`", inv); // overflow
    bad(|c| c.k.shape[3] = 5, "`k`", inv); // head dim differs from q's
    bad(|c| c.q.shape[1] = 3, "`k`", inv); // 2 kv heads do not divide 3 query heads
    bad(|c| c.v.shape[2] = 4, "`v`", inv);
    bad(|c| c.o.shape[3] = 2, "`o`", inv);
    bad(|c| c.o.data = c.q.data, "`o`", inv); // aliases q
    bad(|c| c.lse = c.e, "`e`: overlaps lse", inv);
    bad(
        |c| c.pi_head = [1.0f32, 0.0, 1.0, 1.0].as_ptr(),
        "`precision.head`",
        inv,
    );
    bad(
        |c| c.pi_key = [f32::NAN; 20].as_ptr(),
        "`precision.key`",
        inv,
    );
    bad(|c| c.kv_len = [6i32, 1].as_ptr(), "`kv_len`", inv);
    bad(|c| c.kv_len = [-1i32, 1].as_ptr(), "`kv_len`", inv);
}

/// A GPU device through the C ABI: device pointers and a raw stream give bit for bit what the
/// Rust API gives on the same device (f16, GQA, causal with key lengths, both precisions). With
/// no such device: FEP_ERR_NO_DEVICE before anything is read (host pointers are passed).
#[test]
fn gpu_device_through_the_c_abi() {
    for (code, kind) in [
        (FEP_DEVICE_CUDA, DeviceKind::Cuda),
        (FEP_DEVICE_HIP, DeviceKind::Hip),
    ] {
        if Device::count(kind) == 0 {
            bad(|c| c.kind = code, "", FEP_ERR_NO_DEVICE);
            continue;
        }
        let dev = Device::open(kind, 0).unwrap();
        let (b, hq, hkv, lq, lk, d, dv) =
            (2usize, 4usize, 2usize, 33usize, 70usize, 64usize, 32usize);
        let vals = |n: usize, salt: usize| -> Vec<f16> {
            (0..n)
                .map(|i| f16::from_f64((((i * 7919 + salt) % 1009) as f64 / 504.5) - 1.0))
                .collect()
        };
        let q = dev.upload(&vals(b * hq * lq * d, 1)).unwrap();
        let k = dev.upload(&vals(b * hkv * lk * d, 2)).unwrap();
        let v = dev.upload(&vals(b * hkv * lk * dv, 3)).unwrap();
        let ph = dev.upload(&[0.5f32, 1.0, 2.0, 1.5]).unwrap();
        let pk = dev
            .upload(
                &(0..b * hkv * lk)
                    .map(|i| 0.5 + (i % 5) as f32 * 0.25)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let kl = dev.upload(&[lk as i32, 41]).unwrap();
        let spec = AttentionSpec::new(Score::StudentT(4.0)).causal(true);
        let (qs, ks, vs, os) = (
            [b, hq, lq, d],
            [b, hkv, lk, d],
            [b, hkv, lk, dv],
            [b, hq, lq, dv],
        );
        let rows = b * hq * lq;
        let mut o_rust = dev.upload(&vec![f16::NAN; b * hq * lq * dv]).unwrap();
        let mut lse_rust = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let mut e_rust = dev.upload(&vec![f32::NAN; rows]).unwrap();
        attention::forward_into(
            &spec,
            &Tensor4::bhld(q.view(), qs),
            &Tensor4::bhld(k.view(), ks),
            &Tensor4::bhld(v.view(), vs),
            &Precisions {
                head: Some(ph.view()),
                key: Some(pk.view()),
                ..Default::default()
            },
            Some(&kl.view()),
            AttentionOutputs {
                o: Tensor4Mut::bhld(o_rust.view_mut(), os),
                lse: Some(lse_rust.view_mut()),
                e: Some(e_rust.view_mut()),
            },
            dev.default_stream(),
        )
        .unwrap();
        let o_c = dev.upload(&vec![f16::NAN; b * hq * lq * dv]).unwrap();
        let lse_c = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let e_c = dev.upload(&vec![f32::NAN; rows]).unwrap();
        let t = |addr: u64, s: [usize; 4]| FepAttnTensor {
            data: addr as *mut c_void,
            shape: s.map(|x| x as u64),
            strides: strides(s, false).map(|x| x as u64),
        };
        let st = unsafe {
            fep_attention_forward(
                code,
                0,
                dev.default_stream().as_raw(),
                &params_of(&spec),
                FEP_DTYPE_F16,
                &t(q.addr(), qs),
                &t(k.addr(), ks),
                &t(v.addr(), vs),
                ph.addr() as *const f32,
                pk.addr() as *const f32,
                kl.addr() as *const i32,
                &t(o_c.addr(), os),
                lse_c.addr() as *mut f32,
                e_c.addr() as *mut f32,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let o16 = |x: &fep_kernels::DeviceBuffer<f16>| {
            x.to_vec()
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(o16(&o_c), o16(&o_rust), "o differs");
        assert!(o_c.to_vec().unwrap().iter().all(|x| x.is_finite()));
        assert_eq!(
            bits32(&lse_c.to_vec().unwrap()),
            bits32(&lse_rust.to_vec().unwrap())
        );
        assert_eq!(
            bits32(&e_c.to_vec().unwrap()),
            bits32(&e_rust.to_vec().unwrap())
        );
    }
}

// ---- backward (fep_attention_backward) and the lse merge (fep_attention_merge) ----------------

/// Deterministic upstream gradients in [-1, 1].
fn upstream(n: usize, salt: u64) -> Vec<f32> {
    common::attention::raw_bits(0xbac4 + salt, common::attention::TID_D_O, n)
        .into_iter()
        .map(|b| common::attention::uniform_pm1(b) as f32)
        .collect()
}

/// The backward's host buffers in T (dq, dk, dv in the inputs' layout) and f32.
struct Grads<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    dpi_head: Vec<f32>,
    dpi_key: Vec<f32>,
    dnu: Vec<f32>,
}

fn nan_grads<T: Element>(x: &Inputs<T>) -> Grads<T> {
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    Grads {
        dq: vec![T::from_f64(f64::NAN); n(x.qs)],
        dk: vec![T::from_f64(f64::NAN); n(x.ks)],
        dv: vec![T::from_f64(f64::NAN); n(x.vs)],
        dpi_head: vec![f32::NAN; x.qs[1]],
        dpi_key: vec![f32::NAN; x.ks[0] * x.ks[1] * x.ks[2]],
        dnu: vec![f32::NAN],
    }
}

/// The upstream gradient d_o (in T, in the inputs' layout) and d_e of a problem.
fn d_o_of<T: Element + Default>(x: &Inputs<T>) -> Vec<T> {
    let raw: Vec<T> = upstream(x.os.iter().product(), 1)
        .iter()
        .map(|&v| T::from_f64(v as f64))
        .collect();
    layout(&raw, x.os, x.blhd)
}

/// fep_attention_backward on the CPU with the forward's (o, lse, e) through the C ABI;
/// `with_e`: pass e and d_e; `all`: ask for every optional gradient (else NULL, left NaN);
/// `kind`: FEP_DEVICE_CPU (the fast path) or FEP_DEVICE_CPU_REFERENCE (the f64 reference).
fn run_c_backward<T: Element + Default>(
    kind: i32,
    params: &FepAttentionParams,
    dtype: i32,
    x: &Inputs<T>,
    d_e: &[f32],
    with_e: bool,
    all: bool,
) -> Grads<T> {
    let (o, lse, e) = run_c(params, dtype, x, true);
    let d_o = d_o_of(x);
    let mut g = nan_grads(x);
    let opt_mut = |v: &mut Vec<f32>| {
        if all {
            v.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        }
    };
    let (ph, pk, pn) = (
        opt_mut(&mut g.dpi_head),
        opt_mut(&mut g.dpi_key),
        opt_mut(&mut g.dnu),
    );
    let st = unsafe {
        fep_attention_backward(
            kind,
            0,
            std::ptr::null_mut(),
            params,
            dtype,
            &desc(x.q.as_ptr(), x.qs, x.blhd),
            &desc(x.k.as_ptr(), x.ks, x.blhd),
            &desc(x.v.as_ptr(), x.vs, x.blhd),
            opt_ptr(&x.pi_head),
            opt_ptr(&x.pi_key),
            opt_ptr(&x.kv_len),
            &desc(o.as_ptr(), x.os, x.blhd),
            lse.as_ptr(),
            &desc(d_o.as_ptr(), x.os, x.blhd),
            if with_e { e.as_ptr() } else { std::ptr::null() },
            if with_e {
                d_e.as_ptr()
            } else {
                std::ptr::null()
            },
            &desc(g.dq.as_mut_ptr(), x.qs, x.blhd),
            &desc(g.dk.as_mut_ptr(), x.ks, x.blhd),
            &desc(g.dv.as_mut_ptr(), x.vs, x.blhd),
            ph,
            pk,
            pn,
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    g
}

/// `attention::reference::backward` on the T-rounded inputs, rounded as the C ABI writes.
fn reference_backward<T: Element + Default>(
    c: &Case,
    x: &Inputs<T>,
    d_e: Option<&[f32]>,
) -> Grads<T> {
    let r = |v: &[f64]| -> Vec<f64> { v.iter().map(|&a| T::from_f64(a).to_f64()).collect() };
    let r32 = |v: &Option<Vec<f64>>| {
        v.as_ref()
            .map(|v| v.iter().map(|&a| a as f32 as f64).collect::<Vec<_>>())
    };
    let (q, k, v) = (r(&c.q), r(&c.k), r(&c.v));
    let (ph, pk) = (r32(&c.pi_head), r32(&c.pi_key));
    let inp = attention::reference::RefInputs {
        b: c.b,
        hq: c.hq,
        hkv: c.hkv,
        lq: c.lq,
        lk: c.lk,
        d: c.d,
        dv: c.dv,
        q: &q,
        k: &k,
        v: &v,
        pi_head: ph.as_deref(),
        pi_key: pk.as_deref(),
        kv_len: c.kv_len.as_deref(),
        ..Default::default()
    };
    let d_o: Vec<f64> = upstream(x.os.iter().product(), 1)
        .iter()
        .map(|&a| T::from_f64(a as f64).to_f64())
        .collect();
    let d_e: Option<Vec<f64>> = d_e.map(|v| v.iter().map(|&a| a as f64).collect());
    let g = attention::reference::backward(
        &c.spec,
        &inp,
        &attention::reference::RefGradInputs {
            d_o: &d_o,
            d_e: d_e.as_deref(),
            ..Default::default()
        },
    )
    .unwrap();
    let t = |v: &[f64], s: [usize; 4]| {
        layout(
            &v.iter().map(|&a| T::from_f64(a)).collect::<Vec<T>>(),
            s,
            x.blhd,
        )
    };
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    Grads {
        dq: t(&g.dq, x.qs),
        dk: t(&g.dk, x.ks),
        dv: t(&g.dv, x.vs),
        dpi_head: f(&g.dpi_head),
        dpi_key: f(&g.dpi_key),
        dnu: vec![g.dnu as f32],
    }
}

fn same_grads<T: Element>(what: &str, got: &Grads<T>, want: &Grads<T>, all: bool) {
    assert_eq!(bits(&got.dq), bits(&want.dq), "{what}: dq");
    assert_eq!(bits(&got.dk), bits(&want.dk), "{what}: dk");
    assert_eq!(bits(&got.dv), bits(&want.dv), "{what}: dv");
    if all {
        assert_eq!(
            bits32(&got.dpi_head),
            bits32(&want.dpi_head),
            "{what}: dpi_head"
        );
        assert_eq!(
            bits32(&got.dpi_key),
            bits32(&want.dpi_key),
            "{what}: dpi_key"
        );
        assert_eq!(bits32(&got.dnu), bits32(&want.dnu), "{what}: dnu");
    } else {
        // Not asked for: left as they were.
        for v in [&got.dpi_head, &got.dpi_key, &got.dnu] {
            assert!(
                v.iter().all(|a| a.is_nan()),
                "{what}: an unwanted gradient was written"
            );
        }
    }
    assert!(
        got.dq
            .iter()
            .chain(&got.dk)
            .chain(&got.dv)
            .all(|a| a.to_f64().is_finite()),
        "{what}: a gradient is not finite"
    );
}

fn check_backward_case<T: Element + Default>(name: &str, dtype: i32) {
    let c = case(name);
    let params = params_of(&c.spec);
    for blhd in [false, true] {
        let x = inputs::<T>(c, blhd);
        let d_e = upstream(rows(&x), 2);
        let what = format!("{name} dtype {dtype} blhd {blhd}");
        // With the energy's gradient and every optional output.
        // The f64 reference behind the C ABI, compared bitwise with `reference::backward`
        // (FEP_DEVICE_CPU is the fast f32 path since issue 24).
        let kind = FEP_DEVICE_CPU_REFERENCE;
        let got = run_c_backward(kind, &params, dtype, &x, &d_e, true, true);
        let want = reference_backward(c, &x, Some(&d_e));
        same_grads(&format!("{what} with d_e"), &got, &want, true);
        // e and d_e NULL (L depends on o only), the optional gradients not wanted.
        let got = run_c_backward(kind, &params, dtype, &x, &d_e, false, false);
        let want = reference_backward(c, &x, None);
        same_grads(&format!("{what} without d_e"), &got, &want, false);
    }
}

/// fep_attention_backward on the CPU gives `attention::reference::backward` rounded to the
/// output types, bit for bit, in BHLD and BLHD strides, with and without d_e.
#[test]
fn backward_matches_the_reference_bitwise_f32() {
    for name in CASES {
        check_backward_case::<f32>(name, FEP_DTYPE_F32);
    }
}

#[test]
fn backward_matches_the_reference_bitwise_f16_bf16() {
    for name in &CASES[..3] {
        check_backward_case::<f16>(name, FEP_DTYPE_F16);
        check_backward_case::<bf16>(name, FEP_DTYPE_BF16);
    }
}

/// The C ABI's backward is the Rust API's `attention::backward` (plumbing: the same numbers).
#[test]
fn backward_matches_the_rust_api() {
    let c = case(CASES[0]);
    let x = inputs::<f32>(c, false);
    let params = params_of(&c.spec);
    let d_e = upstream(rows(&x), 2);
    let got = run_c_backward(FEP_DEVICE_CPU, &params, FEP_DTYPE_F32, &x, &d_e, true, true);
    let (o, lse, e) = run_c(&params, FEP_DTYPE_F32, &x, true);
    let d_o = d_o_of(&x);
    fn t4(d: &[f32], s: [usize; 4]) -> Tensor4<'_, f32> {
        Tensor4::bhld(View::host(d), s)
    }
    let precision = Precisions {
        head: x.pi_head.as_deref().map(View::host),
        key: x.pi_key.as_deref().map(View::host),
        ..Default::default()
    };
    let kv_len = x.kv_len.as_deref().map(View::host);
    let g = attention::backward(
        &c.spec,
        &t4(&x.q, x.qs),
        &t4(&x.k, x.ks),
        &t4(&x.v, x.vs),
        &precision,
        kv_len.as_ref(),
        &attention::BackwardInputs {
            o: t4(&o, x.os),
            lse: View::host(&lse),
            d_o: t4(&d_o, x.os),
            e: Some(View::host(&e)),
            d_e: Some(View::host(&d_e)),
            d_lse: None,
        },
    )
    .unwrap();
    assert_eq!(bits32(&got.dq), bits32(&g.dq.to_vec().unwrap()), "dq");
    assert_eq!(bits32(&got.dk), bits32(&g.dk.to_vec().unwrap()), "dk");
    assert_eq!(bits32(&got.dv), bits32(&g.dv.to_vec().unwrap()), "dv");
    assert_eq!(bits32(&got.dpi_head), bits32(&g.dpi_head.to_vec().unwrap()));
    assert_eq!(bits32(&got.dpi_key), bits32(&g.dpi_key.to_vec().unwrap()));
    assert_eq!(bits32(&got.dnu), bits32(&g.dnu.to_vec().unwrap()));
}

/// One backward call with everything valid except what `f` changes: (status, message), and
/// every output untouched.
struct BadBwd {
    params: FepAttentionParams,
    dtype: i32,
    kind: i32,
    q: FepAttnTensor,
    k: FepAttnTensor,
    v: FepAttnTensor,
    o: FepAttnTensor,
    d_o: FepAttnTensor,
    dq: FepAttnTensor,
    dk: FepAttnTensor,
    dv: FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    lse: *const f32,
    e: *const f32,
    d_e: *const f32,
    dpi_head: *mut f32,
    dpi_key: *mut f32,
    dnu: *mut f32,
    null: &'static str,
}

fn bad_backward(f: impl FnOnce(&mut BadBwd), needle: &str, status: i32) {
    let (b, hq, hkv, lq, lk, d, dv) = (2usize, 4usize, 2usize, 3usize, 5usize, 4usize, 3usize);
    let rows = b * hq * lq;
    let q: Vec<f32> = upstream(b * hq * lq * d, 3);
    let k: Vec<f32> = upstream(b * hkv * lk * d, 4);
    let v = vec![1.0f32; b * hkv * lk * dv];
    let o = vec![1.0f32; rows * dv];
    let d_o = vec![0.5f32; rows * dv];
    let (lse, e, d_e) = (vec![0.0f32; rows], vec![1.0f32; rows], vec![0.25f32; rows]);
    let ph = vec![1.0f32; hq];
    let pk = vec![2.0f32; b * hkv * lk];
    let kl = [lk as i32, 1];
    let mut dq = vec![7.0f32; b * hq * lq * d];
    let mut dk = vec![7.0f32; b * hkv * lk * d];
    let mut dvv = vec![7.0f32; b * hkv * lk * dv];
    let mut dph = vec![7.0f32; hq];
    let mut dpk = vec![7.0f32; b * hkv * lk];
    let mut dnu = [7.0f32];
    let mut c = BadBwd {
        params: params_of(&AttentionSpec::new(Score::StudentT(3.0)).causal(true)),
        dtype: FEP_DTYPE_F32,
        kind: FEP_DEVICE_CPU,
        q: desc(q.as_ptr(), [b, hq, lq, d], false),
        k: desc(k.as_ptr(), [b, hkv, lk, d], false),
        v: desc(v.as_ptr(), [b, hkv, lk, dv], false),
        o: desc(o.as_ptr(), [b, hq, lq, dv], false),
        d_o: desc(d_o.as_ptr(), [b, hq, lq, dv], false),
        dq: desc(dq.as_mut_ptr(), [b, hq, lq, d], false),
        dk: desc(dk.as_mut_ptr(), [b, hkv, lk, d], false),
        dv: desc(dvv.as_mut_ptr(), [b, hkv, lk, dv], false),
        pi_head: ph.as_ptr(),
        pi_key: pk.as_ptr(),
        kv_len: kl.as_ptr(),
        lse: lse.as_ptr(),
        e: e.as_ptr(),
        d_e: d_e.as_ptr(),
        dpi_head: dph.as_mut_ptr(),
        dpi_key: dpk.as_mut_ptr(),
        dnu: dnu.as_mut_ptr(),
        null: "",
    };
    f(&mut c);
    let p = |name: &str| c.null == name;
    let t = |name: &str, t: &FepAttnTensor| -> *const FepAttnTensor {
        if p(name) { std::ptr::null() } else { t }
    };
    let st = unsafe {
        fep_attention_backward(
            c.kind,
            0,
            std::ptr::null_mut(),
            if p("params") {
                std::ptr::null()
            } else {
                &c.params
            },
            c.dtype,
            t("q", &c.q),
            t("k", &c.k),
            t("v", &c.v),
            c.pi_head,
            c.pi_key,
            c.kv_len,
            t("o", &c.o),
            c.lse,
            t("d_o", &c.d_o),
            c.e,
            c.d_e,
            t("dq", &c.dq),
            t("dk", &c.dk),
            t("dv", &c.dv),
            c.dpi_head,
            c.dpi_key,
            c.dnu,
        )
    };
    let msg = last_error();
    let outputs = || {
        dq.iter()
            .chain(&dk)
            .chain(&dvv)
            .chain(&dph)
            .chain(&dpk)
            .chain(&dnu)
    };
    if status == FEP_OK {
        assert_eq!(st, FEP_OK, "the valid call failed: {msg}");
        assert!(outputs().all(|&x| x != 7.0 && x.is_finite()));
        return;
    }
    assert_eq!(st, status, "{needle}: status {st}, message {msg}");
    assert!(
        msg.contains(needle),
        "message {msg:?} does not name {needle:?}"
    );
    assert!(
        outputs().all(|&x| x == 7.0),
        "{needle}: an output was written"
    );
}

#[test]
fn backward_bad_arguments_are_named() {
    let inv = FEP_ERR_INVALID_ARGUMENT;
    let null = std::ptr::null_mut::<c_void>();
    bad_backward(|_| {}, "", FEP_OK);
    for name in ["params", "q", "k", "v", "o", "d_o", "dq", "dk", "dv"] {
        bad_backward(|c| c.null = name, &format!("`{name}`"), inv);
    }
    bad_backward(|c| c.lse = std::ptr::null(), "`lse`", inv);
    bad_backward(|c| c.q.data = null, "`q.data`", inv);
    bad_backward(|c| c.d_o.data = null, "`d_o.data`", inv);
    bad_backward(|c| c.dq.data = null, "`dq.data`", inv);
    bad_backward(|c| c.dv.data = null, "`dv.data`", inv);
    bad_backward(|c| c.dtype = 7, "`dtype`", inv);
    bad_backward(|c| c.dtype = -1, "`dtype`", inv);
    bad_backward(|c| c.kind = 9, "`kind`", inv);
    bad_backward(|c| c.params.score = 4, "`params.score`", inv);
    bad_backward(|c| c.params.nu = -1.0, "`params.nu`", inv);
    bad_backward(|c| c.params.window = -1, "`params.window`", inv);
    // d_e without the forward's e.
    bad_backward(|c| c.e = std::ptr::null(), "`e`", inv);
    bad_backward(|c| c.d_o.shape[3] = 2, "`d_o`", inv);
    bad_backward(|c| c.o.shape[2] = 2, "`o`", inv);
    bad_backward(|c| c.dq.shape[3] = 3, "`dq`", inv);
    bad_backward(|c| c.dk.shape[1] = 4, "`dk`", inv);
    bad_backward(|c| c.dv.shape[3] = 4, "`dv`", inv);
    bad_backward(|c| c.dq.strides[2] = 1, "`dq`", inv); // rows overlap
    bad_backward(|c| c.q.strides[0] = u64::MAX / 2, "`q.strides`", inv);
    bad_backward(|c| c.dk.data = c.k.data, "`dk`: overlaps k", inv);
    bad_backward(|c| c.dq.data = c.q.data, "`dq`: overlaps q", inv);
    bad_backward(|c| c.dnu = c.dpi_head, "`dnu`: overlaps dpi_head", inv);
    bad_backward(
        |c| c.pi_head = [1.0f32, 0.0, 1.0, 1.0].as_ptr(),
        "`precision.head`",
        inv,
    );
    bad_backward(|c| c.kv_len = [6i32, 1].as_ptr(), "`kv_len`", inv);
    // Without e and d_e, and without the optional outputs: valid.
    bad_backward(
        |c| {
            c.e = std::ptr::null();
            c.d_e = std::ptr::null();
        },
        "",
        FEP_OK,
    );
}

/// The parts of a problem whose keys are split at `cuts`: each chunk attended through the C ABI
/// (with its slice of pi_key and its clamped key lengths), o `[S, B, Hq, Lq, Dv]`, lse and e
/// `[S, B, Hq, Lq]`.
fn split_parts(
    params: &FepAttentionParams,
    x: &Inputs<f32>,
    cuts: &[usize],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(!x.blhd);
    let [b, hkv, lk, d] = x.ks;
    let dv = x.vs[3];
    let bounds: Vec<usize> = [0].iter().chain(cuts).chain([lk].iter()).copied().collect();
    let (mut o, mut lse, mut e) = (vec![], vec![], vec![]);
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let n = hi - lo;
        let slice = |src: &[f32], width: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(b * hkv * n * width);
            for bh in 0..b * hkv {
                out.extend_from_slice(&src[(bh * lk + lo) * width..(bh * lk + hi) * width]);
            }
            out
        };
        let part = Inputs {
            q: x.q.clone(),
            k: slice(&x.k, d),
            v: slice(&x.v, dv),
            pi_head: x.pi_head.clone(),
            pi_key: x.pi_key.as_ref().map(|p| slice(p, 1)),
            kv_len: x.kv_len.as_ref().map(|l| {
                l.iter()
                    .map(|&v| (v - lo as i32).clamp(0, n as i32))
                    .collect()
            }),
            qs: x.qs,
            ks: [b, hkv, n, d],
            vs: [b, hkv, n, dv],
            os: x.os,
            blhd: false,
        };
        let (po, pl, pe) = run_c(params, FEP_DTYPE_F32, &part, true);
        o.extend(po);
        lse.extend(pl);
        e.extend(pe);
    }
    (o, lse, e)
}

/// A Gaussian problem with both precisions and key lengths (batch 1 sees only 3 of 10 keys, so
/// the later chunks of its rows are empty: lse = -inf parts).
fn merge_problem() -> (FepAttentionParams, Inputs<f32>) {
    let (b, hq, hkv, lq, lk, d, dv) = (2usize, 4usize, 2usize, 3usize, 10usize, 8usize, 6usize);
    let x = Inputs {
        q: upstream(b * hq * lq * d, 5),
        k: upstream(b * hkv * lk * d, 6),
        v: upstream(b * hkv * lk * dv, 7),
        pi_head: Some(vec![0.5, 1.0, 1.5, 2.0]),
        pi_key: Some(
            (0..b * hkv * lk)
                .map(|i| 0.5 + (i % 7) as f32 * 0.25)
                .collect(),
        ),
        kv_len: Some(vec![lk as i32, 3]),
        qs: [b, hq, lq, d],
        ks: [b, hkv, lk, d],
        vs: [b, hkv, lk, dv],
        os: [b, hq, lq, dv],
        blhd: false,
    };
    (params_of(&AttentionSpec::new(Score::Gaussian)), x)
}

/// fep_attention_merge of a key-split forward gives the unsplit forward (o in BLHD strides,
/// lse and e), and equals the Rust API's merge_into bit for bit; lse and e may be NULL.
#[test]
fn merge_matches_an_unsplit_forward() {
    let (params, x) = merge_problem();
    let (whole_o, whole_lse, whole_e) = run_c(&params, FEP_DTYPE_F32, &x, true);
    let cuts = [4usize, 7];
    let s = cuts.len() + 1;
    let (po, pl, pe) = split_parts(&params, &x, &cuts);
    assert!(pl.contains(&f32::NEG_INFINITY), "no empty part was tested");
    let n = rows(&x);
    let mut o = vec![f32::NAN; po.len() / s];
    let (mut lse, mut e) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    let st = unsafe {
        fep_attention_merge(
            FEP_DEVICE_CPU,
            0,
            std::ptr::null_mut(),
            FEP_DTYPE_F32,
            s as u64,
            po.as_ptr().cast(),
            pl.as_ptr(),
            pe.as_ptr(),
            &desc(o.as_mut_ptr(), x.os, true),
            lse.as_mut_ptr(),
            e.as_mut_ptr(),
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    let close = |what: &str, g: &[f32], w: &[f32]| {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                a == b || (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                "{what}[{i}]: merged {a} vs unsplit {b}"
            );
        }
    };
    close("o", &o, &layout(&whole_o, x.os, true));
    close("lse", &lse, &whole_lse);
    close("e", &e, &whole_e);
    // The Rust API on the same parts: the same bits.
    let mut o2 = vec![f32::NAN; o.len()];
    let (mut lse2, mut e2) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    attention::merge_into(
        &attention::MergeParts {
            o: View::host(&po),
            lse: View::host(&pl),
            e: Some(View::host(&pe)),
            splits: s,
            shape: x.os,
        },
        AttentionOutputs {
            o: Tensor4Mut {
                data: ViewMut::host(&mut o2),
                shape: x.os,
                strides: strides(x.os, true),
            },
            lse: Some(ViewMut::host(&mut lse2)),
            e: Some(ViewMut::host(&mut e2)),
        },
        Device::cpu().default_stream(),
    )
    .unwrap();
    assert_eq!(bits32(&o), bits32(&o2));
    assert_eq!(bits32(&lse), bits32(&lse2));
    assert_eq!(bits32(&e), bits32(&e2));
    // No e parts, lse and e NULL: o alone, unchanged.
    let mut o3 = vec![f32::NAN; o.len()];
    let st = unsafe {
        fep_attention_merge(
            FEP_DEVICE_CPU,
            0,
            std::ptr::null_mut(),
            FEP_DTYPE_F32,
            s as u64,
            po.as_ptr().cast(),
            pl.as_ptr(),
            std::ptr::null(),
            &desc(o3.as_mut_ptr(), x.os, true),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    assert_eq!(bits32(&o3), bits32(&o));
}

/// The merge in f16 and bf16: the f64 merge of the parts, rounded once.
#[test]
fn merge_half_precision() {
    let (b, hq, lq, dv, s) = (1usize, 2usize, 3usize, 4usize, 2usize);
    let rows = b * hq * lq;
    let po64: Vec<f64> = upstream(s * rows * dv, 8)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let pl: Vec<f32> = upstream(s * rows, 9).iter().map(|v| 2.0 * v).collect();
    fn go<T: Element + Default>(dtype: i32, po64: &[f64], pl: &[f32], s: usize, os: [usize; 4]) {
        let rows = os[0] * os[1] * os[2];
        let po: Vec<T> = po64.iter().map(|&v| T::from_f64(v)).collect();
        let mut o = vec![T::from_f64(f64::NAN); rows * os[3]];
        let st = unsafe {
            fep_attention_merge(
                FEP_DEVICE_CPU,
                0,
                std::ptr::null_mut(),
                dtype,
                s as u64,
                po.as_ptr().cast(),
                pl.as_ptr(),
                std::ptr::null(),
                &desc(o.as_mut_ptr(), os, false),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let po_r: Vec<f64> = po.iter().map(|v| v.to_f64()).collect();
        let pl64: Vec<f64> = pl.iter().map(|&v| v as f64).collect();
        let r = attention::reference::merge(s, rows, os[3], &po_r, &pl64, None).unwrap();
        let want: Vec<T> = r.o.iter().map(|&v| T::from_f64(v)).collect();
        assert_eq!(bits(&o), bits(&want), "dtype {dtype}");
    }
    go::<f16>(FEP_DTYPE_F16, &po64, &pl, s, [b, hq, lq, dv]);
    go::<bf16>(FEP_DTYPE_BF16, &po64, &pl, s, [b, hq, lq, dv]);
}

/// One merge call with everything valid except what `f` changes.
struct BadMerge {
    kind: i32,
    dtype: i32,
    splits: u64,
    o_parts: *const f32,
    lse_parts: *const f32,
    e_parts: *const f32,
    o: FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
    null_o: bool,
}

fn bad_merge(f: impl FnOnce(&mut BadMerge), needle: &str, status: i32) {
    let (b, hq, lq, dv, s) = (2usize, 2usize, 3usize, 4usize, 3usize);
    let rows = b * hq * lq;
    let po = upstream(s * rows * dv, 10);
    let pl = upstream(s * rows, 11);
    let pe = vec![0.5f32; s * rows];
    let mut o = vec![7.0f32; rows * dv];
    let mut lse = vec![7.0f32; rows];
    let mut e = vec![7.0f32; rows];
    let mut c = BadMerge {
        kind: FEP_DEVICE_CPU,
        dtype: FEP_DTYPE_F32,
        splits: s as u64,
        o_parts: po.as_ptr(),
        lse_parts: pl.as_ptr(),
        e_parts: pe.as_ptr(),
        o: desc(o.as_mut_ptr(), [b, hq, lq, dv], false),
        lse: lse.as_mut_ptr(),
        e: e.as_mut_ptr(),
        null_o: false,
    };
    f(&mut c);
    let st = unsafe {
        fep_attention_merge(
            c.kind,
            0,
            std::ptr::null_mut(),
            c.dtype,
            c.splits,
            c.o_parts.cast(),
            c.lse_parts,
            c.e_parts,
            if c.null_o { std::ptr::null() } else { &c.o },
            c.lse,
            c.e,
        )
    };
    let msg = last_error();
    if status == FEP_OK {
        assert_eq!(st, FEP_OK, "the valid call failed: {msg}");
        assert!(o.iter().chain(&lse).all(|&x| x != 7.0));
        // e is written when asked for, else left as it was.
        let e_asked = !c.e.is_null();
        assert!(e.iter().all(|&x| (x != 7.0) == e_asked));
        return;
    }
    assert_eq!(st, status, "{needle}: status {st}, message {msg}");
    assert!(
        msg.contains(needle),
        "message {msg:?} does not name {needle:?}"
    );
    assert!(
        o.iter().chain(&lse).chain(&e).all(|&x| x == 7.0),
        "{needle}: an output was written"
    );
}

#[test]
fn merge_bad_arguments_are_named() {
    let inv = FEP_ERR_INVALID_ARGUMENT;
    bad_merge(|_| {}, "", FEP_OK);
    bad_merge(|c| c.null_o = true, "`o`", inv);
    bad_merge(|c| c.o.data = std::ptr::null_mut(), "`o.data`", inv);
    bad_merge(|c| c.o_parts = std::ptr::null(), "`o_parts`", inv);
    bad_merge(|c| c.lse_parts = std::ptr::null(), "`lse_parts`", inv);
    bad_merge(|c| c.e_parts = std::ptr::null(), "`e`", inv); // an e output without e parts
    bad_merge(|c| c.splits = 0, "`splits`", inv);
    bad_merge(|c| c.o.shape[2] = 0, "`o.shape`", inv);
    bad_merge(|c| c.dtype = 3, "`dtype`", inv);
    bad_merge(|c| c.kind = -1, "`kind`", inv);
    bad_merge(|c| c.o.strides[2] = 2, "`o`", inv); // rows of 4 overlap
    bad_merge(
        |c| c.o.data = c.o_parts as *mut c_void,
        "`o`: overlaps o_parts",
        inv,
    );
    bad_merge(
        |c| c.lse = c.lse_parts as *mut f32,
        "`lse`: overlaps lse_parts",
        inv,
    );
    bad_merge(|c| c.e = c.lse, "`e`: overlaps lse", inv);
    // No e anywhere, or no lse: valid.
    bad_merge(
        |c| {
            c.e_parts = std::ptr::null();
            c.e = std::ptr::null_mut();
        },
        "",
        FEP_OK,
    );
}

/// The backward and the merge on a GPU device through the C ABI: device pointers and a raw
/// stream give bit for bit what the Rust API gives on the same device (f16, GQA, causal with key
/// lengths, both precisions, d_e). With no such device: FEP_ERR_NO_DEVICE before anything is
/// read (host pointers are passed).
#[test]
fn gpu_backward_and_merge_through_the_c_abi() {
    for (code, kind) in [
        (FEP_DEVICE_CUDA, DeviceKind::Cuda),
        (FEP_DEVICE_HIP, DeviceKind::Hip),
    ] {
        if Device::count(kind) == 0 {
            bad_backward(|c| c.kind = code, "", FEP_ERR_NO_DEVICE);
            bad_merge(|c| c.kind = code, "", FEP_ERR_NO_DEVICE);
            continue;
        }
        let dev = Device::open(kind, 0).unwrap();
        let (b, hq, hkv, lq, lk, d, dv) =
            (2usize, 4usize, 2usize, 33usize, 70usize, 64usize, 32usize);
        let vals = |n: usize, salt: usize| -> Vec<f16> {
            (0..n)
                .map(|i| f16::from_f64((((i * 7919 + salt) % 1009) as f64 / 504.5) - 1.0))
                .collect()
        };
        let (qs, ks, vs, os) = (
            [b, hq, lq, d],
            [b, hkv, lk, d],
            [b, hkv, lk, dv],
            [b, hq, lq, dv],
        );
        let rows = b * hq * lq;
        let q = dev.upload(&vals(b * hq * lq * d, 1)).unwrap();
        let k = dev.upload(&vals(b * hkv * lk * d, 2)).unwrap();
        let v = dev.upload(&vals(b * hkv * lk * dv, 3)).unwrap();
        let d_o = dev.upload(&vals(rows * dv, 4)).unwrap();
        let d_e = dev.upload(&upstream(rows, 5)).unwrap();
        let ph = dev.upload(&[0.5f32, 1.0, 2.0, 1.5]).unwrap();
        let pk = dev
            .upload(
                &(0..b * hkv * lk)
                    .map(|i| 0.5 + (i % 5) as f32 * 0.25)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let kl = dev.upload(&[lk as i32, 41]).unwrap();
        let spec = AttentionSpec::new(Score::StudentT(4.0)).causal(true);
        let precision = Precisions {
            head: Some(ph.view()),
            key: Some(pk.view()),
            ..Default::default()
        };
        let fwd = attention::forward(
            &spec,
            &Tensor4::bhld(q.view(), qs),
            &Tensor4::bhld(k.view(), ks),
            &Tensor4::bhld(v.view(), vs),
            &precision,
            Some(&kl.view()),
        )
        .unwrap();
        let want = attention::backward(
            &spec,
            &Tensor4::bhld(q.view(), qs),
            &Tensor4::bhld(k.view(), ks),
            &Tensor4::bhld(v.view(), vs),
            &precision,
            Some(&kl.view()),
            &attention::BackwardInputs {
                o: Tensor4::bhld(fwd.o.view(), os),
                lse: fwd.lse.view(),
                d_o: Tensor4::bhld(d_o.view(), os),
                e: Some(fwd.e.view()),
                d_e: Some(d_e.view()),
                d_lse: None,
            },
        )
        .unwrap();
        let t = |addr: u64, s: [usize; 4]| FepAttnTensor {
            data: addr as *mut c_void,
            shape: s.map(|x| x as u64),
            strides: strides(s, false).map(|x| x as u64),
        };
        let nan16 = |n: usize| dev.upload(&vec![f16::NAN; n]).unwrap();
        let (dq, dk, dvv) = (
            nan16(b * hq * lq * d),
            nan16(b * hkv * lk * d),
            nan16(b * hkv * lk * dv),
        );
        let nan32 = |n: usize| dev.upload(&vec![f32::NAN; n]).unwrap();
        let (dph, dpk, dnu) = (nan32(hq), nan32(b * hkv * lk), nan32(1));
        let stream = dev.default_stream();
        let st = unsafe {
            fep_attention_backward(
                code,
                0,
                stream.as_raw(),
                &params_of(&spec),
                FEP_DTYPE_F16,
                &t(q.addr(), qs),
                &t(k.addr(), ks),
                &t(v.addr(), vs),
                ph.addr() as *const f32,
                pk.addr() as *const f32,
                kl.addr() as *const i32,
                &t(fwd.o.addr(), os),
                fwd.lse.addr() as *const f32,
                &t(d_o.addr(), os),
                fwd.e.addr() as *const f32,
                d_e.addr() as *const f32,
                &t(dq.addr(), qs),
                &t(dk.addr(), ks),
                &t(dvv.addr(), vs),
                dph.addr() as *mut f32,
                dpk.addr() as *mut f32,
                dnu.addr() as *mut f32,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let h16 = |x: &fep_kernels::DeviceBuffer<f16>| {
            x.to_vec()
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect::<Vec<_>>()
        };
        let b32 = |x: &fep_kernels::DeviceBuffer<f32>| bits32(&x.to_vec().unwrap());
        assert_eq!(h16(&dq), h16(&want.dq), "dq differs");
        assert_eq!(h16(&dk), h16(&want.dk), "dk differs");
        assert_eq!(h16(&dvv), h16(&want.dv), "dv differs");
        assert!(dq.to_vec().unwrap().iter().all(|x| x.is_finite()));
        assert_eq!(b32(&dph), b32(&want.dpi_head), "dpi_head differs");
        assert_eq!(b32(&dpk), b32(&want.dpi_key), "dpi_key differs");
        assert_eq!(b32(&dnu), b32(&want.dnu), "dnu differs");

        // The merge of two parts (the forward's result twice with shifted lse), C vs Rust.
        let o_h = fwd.o.to_vec().unwrap();
        let lse_h = fwd.lse.to_vec().unwrap();
        let e_h = fwd.e.to_vec().unwrap();
        let po = dev.upload(&[o_h.clone(), o_h].concat()).unwrap();
        let pl = dev
            .upload(&[lse_h.clone(), lse_h.iter().map(|x| x - 0.5).collect()].concat())
            .unwrap();
        let pe = dev.upload(&[e_h.clone(), e_h].concat()).unwrap();
        let parts = attention::MergeParts {
            o: po.view(),
            lse: pl.view(),
            e: Some(pe.view()),
            splits: 2,
            shape: os,
        };
        let want = attention::merge(&parts).unwrap();
        let (mo, ml, me) = (nan16(rows * dv), nan32(rows), nan32(rows));
        let st = unsafe {
            fep_attention_merge(
                code,
                0,
                stream.as_raw(),
                FEP_DTYPE_F16,
                2,
                po.addr() as *const c_void,
                pl.addr() as *const f32,
                pe.addr() as *const f32,
                &t(mo.addr(), os),
                ml.addr() as *mut f32,
                me.addr() as *mut f32,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        assert_eq!(h16(&mo), h16(&want.o), "merged o differs");
        assert_eq!(b32(&ml), b32(&want.lse), "merged lse differs");
        assert_eq!(b32(&me), b32(&want.e), "merged e differs");
    }
}
