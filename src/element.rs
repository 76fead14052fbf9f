//! The element types of inputs and weights: f32, f16 and bf16. Statistics and state are f32 on
//! the GPU and f64 in the CPU reference whatever the input type.

use half::{bf16, f16};

/// The runtime tag of an [`Element`] type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The kernel-name suffix (`lca_gemm_f16`); the same list as FEP_FOR_EACH_DTYPE in
    /// kernels/port/types.cuh.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The unit roundoff (half the machine epsilon) of the type.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F16 => f16::EPSILON.to_f64() / 2.0,
            DType::BF16 => bf16::EPSILON.to_f64() / 2.0,
        }
    }
}

/// A type the kernels read: f32, [`half::f16`] or [`half::bf16`].
pub trait Element:
    bytemuck::Pod + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Its runtime tag.
    const DTYPE: DType;
    /// Exact widening.
    fn to_f64(self) -> f64;
    /// Rounding to nearest.
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}
