//! The candle integration against the crate's own API, bitwise on the CPU.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, WithDType};
use fep_kernels::attention::{self, AttentionSpec, Precisions, Score, Tensor4};
use fep_kernels::{Element, View, bf16, f16};

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const LQ: usize = 5;
const LK: usize = 7;
const D: usize = 8;
const DV: usize = 4;

fn randn(shape: &[usize], dtype: DType, seed: f64) -> Tensor {
    // Deterministic values (no RNG state shared between tests).
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.7548776662 + seed).sin() * 1.3) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn precision(seed: f64) -> Tensor {
    let n = B * HKV * LK;
    let v: Vec<f32> = (0..n)
        .map(|i| (0.5 + ((i as f64 + seed).cos() + 1.0) * 0.75) as f32)
        .collect();
    Tensor::from_vec(v, (B, HKV, LK), &Device::Cpu).unwrap()
}

fn host<T: WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// fep_kernels::attention::forward on contiguous copies of the candle tensors (BHLD).
fn expected<T: Element + WithDType>(
    spec: &AttentionSpec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: Option<&Tensor>,
) -> Vec<T> {
    let (qh, kh, vh) = (host::<T>(q), host::<T>(k), host::<T>(v));
    let ph = p.map(host::<f32>);
    let dims = |t: &Tensor| <[usize; 4]>::try_from(t.dims()).unwrap();
    let precision = Precisions {
        head: None,
        key: ph.as_deref().map(View::host),
    };
    let out = attention::forward(
        spec,
        &Tensor4::bhld(View::host(&qh), dims(q)),
        &Tensor4::bhld(View::host(&kh), dims(k)),
        &Tensor4::bhld(View::host(&vh), dims(v)),
        &precision,
        None,
    )
    .unwrap();
    out.o.to_vec().unwrap()
}

fn specs() -> Vec<AttentionSpec> {
    let mut out = Vec::new();
    for score in [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(3.0),
        Score::Laplace,
    ] {
        out.push(AttentionSpec::new(score));
        out.push(AttentionSpec::new(score).causal(true).scale(0.37));
    }
    out
}

fn check_dtype<T: Element + WithDType>(dtype: DType) {
    let q = randn(&[B, HQ, LQ, D], dtype, 0.1);
    let k = randn(&[B, HKV, LK, D], dtype, 1.2);
    let v = randn(&[B, HKV, LK, DV], dtype, 2.3);
    let p = precision(0.4);
    for spec in specs() {
        for pk in [None, Some(&p)] {
            let o = fep_kernels::candle::attention(&q, &k, &v, &spec, pk).unwrap();
            assert_eq!(o.dims(), &[B, HQ, LQ, DV]);
            assert_eq!(o.dtype(), dtype);
            let want = expected::<T>(&spec, &q, &k, &v, pk);
            assert_eq!(
                bits(&host::<T>(&o)),
                bits(&want),
                "{dtype:?} {spec:?} precision {}",
                pk.is_some()
            );
        }
    }
}

#[test]
fn f32_matches_forward_bitwise() {
    check_dtype::<f32>(DType::F32);
}

#[test]
fn f16_matches_forward_bitwise() {
    check_dtype::<f16>(DType::F16);
}

#[test]
fn bf16_matches_forward_bitwise() {
    check_dtype::<bf16>(DType::BF16);
}

#[test]
fn strided_blhd_and_offset_inputs() {
    let spec = AttentionSpec::new(Score::StudentT(2.0)).causal(true);
    // [B, L, H, D] memory seen as [B, H, L, D] through candle's transpose: no copy.
    let q_blhd = randn(&[B, LQ, HQ, D], DType::F32, 0.3);
    let k_blhd = randn(&[B, LK, HKV, D], DType::F32, 0.9);
    let v_blhd = randn(&[B, LK, HKV, DV], DType::F32, 1.7);
    let (q, k, v) = (
        q_blhd.transpose(1, 2).unwrap(),
        k_blhd.transpose(1, 2).unwrap(),
        v_blhd.transpose(1, 2).unwrap(),
    );
    assert!(!q.is_contiguous());
    let o = fep_kernels::candle::attention(&q, &k, &v, &spec, None).unwrap();
    // The crate's own BLHD view of the same memory.
    let (qh, kh, vh) = (
        host::<f32>(&q_blhd),
        host::<f32>(&k_blhd),
        host::<f32>(&v_blhd),
    );
    let want = attention::forward(
        &spec,
        &Tensor4::blhd(View::host(&qh), [B, HQ, LQ, D]),
        &Tensor4::blhd(View::host(&kh), [B, HKV, LK, D]),
        &Tensor4::blhd(View::host(&vh), [B, HKV, LK, DV]),
        &Precisions::default(),
        None,
    )
    .unwrap()
    .o
    .to_vec()
    .unwrap();
    assert_eq!(bits(&host::<f32>(&o)), bits(&want));
    // And against contiguous copies.
    let want2 = expected::<f32>(
        &spec,
        &q.contiguous().unwrap(),
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        None,
    );
    assert_eq!(bits(&host::<f32>(&o)), bits(&want2));

    // A start offset and a strided L (narrowing a larger tensor along L and D's neighbour).
    let big = randn(&[B, HKV, LK + 3, D], DType::F32, 4.4);
    let k2 = big.narrow(2, 2, LK).unwrap();
    assert!(!k2.is_contiguous());
    let q2 = randn(&[B, HQ, LQ, D], DType::F32, 5.5);
    let v2 = randn(&[B, HKV, LK, DV], DType::F32, 6.6);
    let p = precision(1.0);
    let o2 = fep_kernels::candle::attention(&q2, &k2, &v2, &spec, Some(&p)).unwrap();
    let want3 = expected::<f32>(&spec, &q2, &k2.contiguous().unwrap(), &v2, Some(&p));
    assert_eq!(bits(&host::<f32>(&o2)), bits(&want3));
}

#[test]
fn bad_inputs_are_candle_errors() {
    let spec = AttentionSpec::new(Score::Gaussian);
    let q = randn(&[B, HQ, LQ, D], DType::F32, 0.1);
    let k = randn(&[B, HKV, LK, D], DType::F32, 1.2);
    let v = randn(&[B, HKV, LK, DV], DType::F32, 2.3);
    let att = |q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec, p: Option<&Tensor>| {
        fep_kernels::candle::attention(q, k, v, spec, p)
            .unwrap_err()
            .to_string()
    };
    // Rank.
    let e = att(&q.flatten(0, 1).unwrap(), &k, &v, &spec, None);
    assert!(e.contains("rank 4"), "{e}");
    // Mixed dtypes.
    let e = att(&q, &k.to_dtype(DType::F16).unwrap(), &v, &spec, None);
    assert!(e.contains("dtype"), "{e}");
    // Unsupported dtype.
    let e = att(
        &q.to_dtype(DType::F64).unwrap(),
        &k.to_dtype(DType::F64).unwrap(),
        &v.to_dtype(DType::F64).unwrap(),
        &spec,
        None,
    );
    assert!(e.contains("dtype"), "{e}");
    // Last dimension not contiguous.
    let kt = randn(&[B, HKV, D, LK], DType::F32, 0.5)
        .transpose(2, 3)
        .unwrap();
    let e = att(&q, &kt, &v, &spec, None);
    assert!(e.contains("contiguous last dimension"), "{e}");
    // Head dims that differ, heads that do not divide, ν ≤ 0: the crate's own errors.
    let e = att(
        &randn(&[B, HQ, LQ, D + 1], DType::F32, 0.0),
        &k,
        &v,
        &spec,
        None,
    );
    assert!(!e.is_empty());
    let e = att(&randn(&[B, 3, LQ, D], DType::F32, 0.0), &k, &v, &spec, None);
    assert!(!e.is_empty());
    let e = att(&q, &k, &v, &AttentionSpec::new(Score::StudentT(-1.0)), None);
    assert!(e.contains("nu"), "{e}");
    // Precision: wrong dtype, wrong length, a non-positive entry.
    let p = precision(0.0);
    let e = att(&q, &k, &v, &spec, Some(&p.to_dtype(DType::F64).unwrap()));
    assert!(e.contains("f32"), "{e}");
    let e = att(&q, &k, &v, &spec, Some(&p.narrow(2, 0, LK - 1).unwrap()));
    assert!(!e.is_empty());
    let e = att(&q, &k, &v, &spec, Some(&(p.zeros_like().unwrap())));
    assert!(!e.is_empty());
}
