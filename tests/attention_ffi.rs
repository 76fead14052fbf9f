//! The attention C ABI (`fep_attention_forward`, include/fep_kernels.h) on the CPU device against
//! the Rust API (`attention::forward_into`) bit for bit: fixture cases (GQA, causal with key
//! lengths, windows, every score family, every precision kind) in f32, BHLD and BLHD strides,
//! f16 and bf16 inputs, NULL optional inputs and outputs; and every bad argument rejected with
//! FEP_ERR_INVALID_ARGUMENT and a message naming it, before anything is written.

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
