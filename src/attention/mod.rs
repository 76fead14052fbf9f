//! Precision-weighted attention: the forward pass ([`forward`]), its gradients ([`backward`]:
//! deterministic, with respect to q, k, v, both precisions and Student-t's ν) and decode against
//! a long KV cache with the lse merge ([`merge()`]). The conventions are those of the
//! repository's tests/fixtures/ATTENTION-CONVENTIONS.md (PyTorch float64 fixtures).
//!
//! # Inputs
//!
//! q `[B, Hq, Lq, D]`, k `[B, Hkv, Lk, D]`, v `[B, Hkv, Lk, Dv]` with Hq % Hkv == 0 (query head h
//! reads kv head h / (Hq / Hkv): GQA/MQA without copies), each a [`Tensor4`] with the last
//! dimension contiguous and free strides otherwise (BHLD and BLHD alike). Inputs are f32, f16 or
//! bf16. The precision of query i for key j is π_ij = π_h · π_j, from an optional per-query-head
//! `[Hq]` and an optional per-kv-head-and-key `[B, Hkv, Lk]` tensor ([`Precisions`]; absent means
//! 1, every entry > 0): it scales how sharply query i discriminates key j.
//!
//! # Scores, softmax, lse and energy
//!
//! With d² = ‖q_i − k_j‖² and the scale τ (default 1/√D for Dot, 1 for the distance families),
//! the score families ([`Score`]), each a log-density of q_i under a kernel centred on k_j:
//!
//! ```text
//! Dot          s = τ π q·k
//! Gaussian     s = −½ τ π d²                       (+ (D/2) ln π with the normaliser)
//! StudentT(ν)  s = −((ν + D)/2) ln(1 + τ π d²/ν)   (+ (D/2) ln π)
//! Laplace      s = −√(τ π) d                       (+ (D/2) ln π)
//! ```
//!
//! The normaliser (D/2) ln π (on by default, [`AttentionSpec::normalizer`]; Dot has none) is
//! constant over keys unless π varies per key, so it matters only with a per-key precision.
//! Then, over the visible keys j of row i:
//!
//! ```text
//! lse_i = ln Σ_j e^{s_ij},   w_ij = e^{s_ij − lse_i} = softmax_j(s_ij)
//! o_i = Σ_j w_ij v_j,        e_i = Σ_j w_ij π_ij d²_ij
//! ```
//!
//! e_i is the expected precision-weighted squared error of the query under its attention
//! weights: the head's predictive-coding energy. lse serves the backward pass and the merge of
//! partial results. The visible keys: all, or with `causal` those j ≤ i + Lk − Lq (bottom-right
//! aligned, for a KV cache), with a `window` W also j > i + Lk − Lq − W, and with per-batch key
//! lengths only j < kv_len\[b\]. A row with no visible key gives o = 0, lse = −∞, e = 0 (no NaN).
//!
//! # Score inputs: bias, mask, ν per head, packed sequences
//!
//! [`Precisions`] also carries, each optional:
//!
//! ```text
//! s_ij ← s_ij + β[b, h, i, j]      bias ([`ScoreBias`] f32, broadcast over any of B, Hq, Lq;
//!                                   −∞ masks the score)
//! j visible only if m[b, h, i, j]  mask (u8, nonzero = keep: SDPA's boolean attn_mask)
//! ν → ν_h                          Student-t's ν per query head [Hq]
//! ```
//!
//! and packed variable-length sequences ([`Varlen`]): q `[1, Hq, total_q, D]`, k and v
//! `[1, Hkv, total_k, ·]` with sequence s on rows cu_q\[s\]..cu_q\[s+1\] and cu_k\[s\]..cu_k\[s+1\];
//! row i of sequence s sees only that sequence's keys, with the causal diagonal and the window
//! taken on the sequence's own lengths (local row i − cu_q\[s\] sees local keys
//! j ≤ i − cu_q\[s\] + Lk_s − Lq_s). [`probabilities()`] materialises w_ij for inspection.
//!
//! # Backward
//!
//! [`backward`] returns the gradients of a loss L(o, e, lse) given dO = ∂L/∂o and, when the loss
//! uses them, dE = ∂L/∂e and dlse = ∂L/∂lse ([`BackwardInputs::d_lse`]). Per row i and visible,
//! unmasked key j, with x = q_i·k_j, π = π_ij, s_ij the family's score plus the bias β_ij, and
//! w, o, e as above:
//!
//! ```text
//! ∂L/∂w_ij = dO_i·v_j + dE_i π d²,   Δ_i = Σ_j w_ij ∂L/∂w_ij − dlse_i = dO_i·o_i + dE_i e_i − dlse_i
//! dS_ij    = w_ij (∂L/∂w_ij − Δ_i) = ∂L/∂s_ij           (through the softmax and lse)
//! dv_j     = Σ_i w_ij dO_i
//! g_ij     = dS_ij ∂s/∂d² + dE_i w_ij π                 (the coefficient of d²)
//! M_ij     = dS_ij ∂s/∂x − 2 g_ij
//! dq_i     = Σ_j M_ij k_j + 2 (Σ_j g_ij) q_i            (∂d²/∂q = 2(q − k))
//! dk_j     = Σ_i M_ij q_i + 2 (Σ_i g_ij) k_j
//! P_ij     = dS_ij π ∂s/∂π + dE_i w_ij π d²             (π ∂L/∂π_ij)
//! dπ_h     = Σ_{b,i,j} P_ij / π_h,   dπ_j = Σ_{h in the group, i} P_ij / π_j
//! dν       = Σ dS_ij ∂s/∂ν            (per head with a per-head ν: dν_h = Σ_{b,i,j} dS_ij ∂s/∂ν)
//! dβ_ij    = dS_ij                    (summed over the dimensions the bias broadcasts)
//! ```
//!
//! with each family's partial derivatives (a = τπd²/ν, κ = (ν + D)/2, c = D/2 with the
//! normaliser, else 0):
//!
//! ```text
//!            ∂s/∂x   ∂s/∂d²               π ∂s/∂π              ∂s/∂ν
//! Dot        τπ      0                    τπx                  0
//! Gaussian   0       −½τπ                 −½τπd² + c           0
//! Student-t  0       −κ (τπ/ν) / (1 + a)  −κ a / (1 + a) + c   −½ ln(1 + a) + κ (a/ν) / (1 + a)
//! Laplace    0       −√(τπ) / (2d)        −½ √(τπ) d + c       0
//! ```
//!
//! Laplace's d is not differentiable at q = k: there the gradient through d is taken as 0 (its
//! minimum-norm subgradient). A row with no visible key contributes nothing. GQA sums dk, dv and
//! dπ_j over the query heads of each group. Without a per-head (per-key) precision, dπ_h (dπ_j)
//! is the gradient at π_h = 1 (π_j = 1). No output is summed with floating-point atomics, so two
//! runs give the same bits (on a GPU, dβ has a kernel of its own that walks the broadcast
//! dimensions in order: kernels/attention/backward_dbias.cu).
//!
//! d_lse: lse_i = ln Σ_j e^{s_ij} gives ∂lse_i/∂s_ij = w_ij, so a loss that reads lse adds
//! dlse_i w_ij to ∂L/∂s_ij, which is the −dlse_i in Δ_i; then Σ_j dS_ij = dlse_i (0 without it).
//! Rows with no visible key ignore their dlse_i. dβ: s_ij = score_ij + β_{b'h'i'j} with
//! (b', h', i') = (b, h, i) except 0 where the bias has size 1, so ∂L/∂β_{b'h'i'j} = Σ dS_bhij
//! over every (b, h, i) mapped to (b', h', i') — in a fixed order (batch, then head, then row),
//! in the bias's shape, row-major. A masked score (mask 0, or β = −∞) has w = 0 and dS = 0 (its
//! dβ is 0). With packed sequences (varlen) every sum runs within a sequence; dπ_h and dν sum over
//! the sequences as over a batch.
//!
//! # Decode: key splits and the lse merge
//!
//! Attention over the keys in S chunks c, each giving per row its normalised o_c, lse_c and e_c
//! (o_c = 0, lse_c = −∞, e_c = 0 for a chunk with no visible key), recovers the whole row as
//!
//! ```text
//! lse = ln Σ_c e^{lse_c}        (computed shifted by max_c lse_c)
//! o   = Σ_c e^{lse_c − lse} o_c
//! e   = Σ_c e^{lse_c − lse} e_c
//! ```
//!
//! and a row whose every lse_c is −∞ gives o = 0, lse = −∞, e = 0. [`merge()`] and
//! [`merge_into`] run this on parts laid out as [`MergeParts`]: it joins the key splits of a
//! decode, or shards of a sequence spread over devices. A decode (Lq ≤ 16 against a long KV
//! cache) on a GPU with few (batch, head, row tile) blocks for the device splits the keys into S
//! chunks run by S blocks each (each writing its o, lse and e to a workspace) and merges them
//! the same way; [`AttentionSpec::key_splits`] overrides the choice of S.
//!
//! # Where it runs
//!
//! On the CPU device: the f64 reference ([`mod@reference`]), unsplit whatever `key_splits` says;
//! the backward recomputes the forward (o and lse are checked but not read). On a GPU the forward
//! is one fused kernel (kernels/attention/): q·k on the tensor cores (kernels/port/mma.cuh; f32
//! inputs through three tf32 products on NVIDIA, f32 MFMA on AMD), the score in registers, an
//! online base-2 softmax, P·V on the tensor cores; no Lq × Lk matrix in memory. GPU head dims:
//! [`HEAD_DIMS`] for D and Dv (any pair); o is accumulated in f32 and written in the input type,
//! lse and e in f32. Asking for e costs a second q·k product per tile. The GPU backward runs three
//! kernels (Δ_i and dq query-major, dk, dv and dπ_j key-major, then an ordered sum of the
//! per-tile partials of dπ_h and dν), each recomputing the scores from q, k and lse as
//! FlashAttention-2 does, without its dq atomics; the merge runs one warp per row in f32.
//!
//! ```
//! use fep_kernels::{Device, attention::{self, AttentionSpec, Precisions, Score, Tensor4}};
//! let dev = Device::cpu();
//! // One batch, one head, two queries and three keys of dimension 2 (BHLD).
//! let q = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
//! let k = dev.upload(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0])?;
//! let v = dev.upload(&[1.0f32, 2.0, 3.0])?; // Dv = 1
//! let (q, k, v) = (
//!     Tensor4::bhld(q.view(), [1, 1, 2, 2]),
//!     Tensor4::bhld(k.view(), [1, 1, 3, 2]),
//!     Tensor4::bhld(v.view(), [1, 1, 3, 1]),
//! );
//! let spec = AttentionSpec::new(Score::StudentT(1.0)).causal(true);
//! let out = attention::forward(&spec, &q, &k, &v, &Precisions::default(), None)?;
//! let o = out.o.to_vec()?;
//! // Bottom-right causal: query 0 sees keys 0 and 1, query 1 all three.
//! assert!(o[0] > 1.0 && o[0] < 2.0);
//! # Ok::<(), fep_kernels::Error>(())
//! ```

mod backward;
mod cpu;
mod cpu_backward;
mod fast;
mod fast_backward;
mod fast_math;
#[cfg(fep_gpu)]
mod gpu;
#[cfg(fep_gpu)]
mod gpu_backward;
#[cfg(fep_gpu)]
mod gpu_inputs;
#[cfg(fep_gpu)]
mod gpu_merge;
mod merge;

pub use backward::{BackwardInputs, GradientResult, Gradients, backward, backward_into};

pub use merge::{MergeParts, merge, merge_into};

use crate::alloc::product;
use crate::backend::{Device, DeviceBuffer, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::tensor::{check_len, check_no_overlap, same_device};

/// The score family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Score {
    /// s = τ π q·k.
    Dot,
    /// s = −½ τ π d².
    Gaussian,
    /// s = −((ν + D)/2) ln(1 + τ π d²/ν), ν > 0.
    StudentT(f32),
    /// s = −√(τ π d²).
    Laplace,
}

impl Score {
    /// Every family (Student-t with ν = 5); for tests and benches.
    pub const ALL: [Score; 4] = [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(5.0),
        Score::Laplace,
    ];

    /// The C ABI code (`FEP_SCORE_*`).
    pub fn code(self) -> i32 {
        match self {
            Score::Dot => 0,
            Score::Gaussian => 1,
            Score::StudentT(_) => 2,
            Score::Laplace => 3,
        }
    }

    /// Whether s depends on q and k through d² (all but Dot).
    pub fn is_distance(self) -> bool {
        self != Score::Dot
    }
}

/// Element strides of B, H and L for row-major `[B, H, L, D]` memory. Saturating: a shape whose
/// strides overflow gets `usize::MAX`, which the checks of every op then reject (a constructor
/// cannot fail, and wrapped strides would pass them).
fn bhld_strides([_, h, l, d]: [usize; 4]) -> [usize; 3] {
    let ld = l.saturating_mul(d);
    [h.saturating_mul(ld), ld, d]
}

/// Element strides of B, H and L for row-major `[B, L, H, D]` memory seen as `[B, H, L, D]`
/// (saturating, as [`bhld_strides`]).
fn blhd_strides([_, h, l, d]: [usize; 4]) -> [usize; 3] {
    let hd = h.saturating_mul(d);
    [l.saturating_mul(hd), d, hd]
}

/// A `[B, H, L, D]` tensor over borrowed memory: element strides for B, H and L, the last
/// dimension contiguous.
#[derive(Clone, Debug)]
pub struct Tensor4<'a, T: Element> {
    /// The elements (the view must cover every addressed element).
    pub data: View<'a, T>,
    /// [B, H, L, D].
    pub shape: [usize; 4],
    /// Element strides of B, H and L.
    pub strides: [usize; 3],
}

impl<'a, T: Element> Tensor4<'a, T> {
    /// Row-major `[B, H, L, D]` (PyTorch's usual attention layout).
    pub fn bhld(data: View<'a, T>, shape: [usize; 4]) -> Self {
        Tensor4 {
            data,
            shape,
            strides: bhld_strides(shape),
        }
    }

    /// Row-major `[B, L, H, D]` memory (FlashAttention's layout), seen as `[B, H, L, D]`;
    /// `shape` is given in BHLD order.
    pub fn blhd(data: View<'a, T>, shape: [usize; 4]) -> Self {
        Tensor4 {
            data,
            shape,
            strides: blhd_strides(shape),
        }
    }
}

/// A `[B, H, L, D]` output tensor (as [`Tensor4`]).
#[derive(Debug)]
pub struct Tensor4Mut<'a, T: Element> {
    /// The elements.
    pub data: ViewMut<'a, T>,
    /// [B, H, L, D].
    pub shape: [usize; 4],
    /// Element strides of B, H and L.
    pub strides: [usize; 3],
}

impl<'a, T: Element> Tensor4Mut<'a, T> {
    /// Row-major `[B, H, L, D]`.
    pub fn bhld(data: ViewMut<'a, T>, shape: [usize; 4]) -> Self {
        Tensor4Mut {
            data,
            shape,
            strides: bhld_strides(shape),
        }
    }

    /// Row-major `[B, L, H, D]` memory seen as `[B, H, L, D]`.
    pub fn blhd(data: ViewMut<'a, T>, shape: [usize; 4]) -> Self {
        Tensor4Mut {
            data,
            shape,
            strides: blhd_strides(shape),
        }
    }
}

/// What to compute besides the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// The score family.
    pub score: Score,
    /// τ; None: 1/√D for Dot, 1 for the distance families. f64 so the reference takes any τ
    /// exactly (the kernels round it once to f32).
    pub scale: Option<f64>,
    /// Keys after the (bottom-right aligned) diagonal are masked.
    pub causal: bool,
    /// Sliding window W ≥ 1: only the W keys ending at the diagonal are visible (implies causal).
    pub window: Option<u32>,
    /// Add (D/2) ln π to the distance families' scores (ignored for Dot).
    pub normalizer: bool,
    /// On a GPU, scan the precisions (> 0, finite) and key lengths (in 0..=Lk) before the
    /// launch (one read-back, so the call waits); off: fully asynchronous.
    pub check_inputs: bool,
    /// On a GPU, how many chunks the keys are split into (each attended by its own blocks, then
    /// merged by lse): None chooses (a split only when Lq ≤ 16 and the problem has too few
    /// blocks to fill the device; chunks of at least 256 keys), Some(1) never splits, Some(n)
    /// splits into n chunks of equal whole key tiles (some empty when n exceeds them), whatever
    /// Lq. No effect on the CPU device (the f64 reference runs unsplit); ≥ 1.
    pub key_splits: Option<u32>,
}

impl AttentionSpec {
    /// `score` with the default scale, no mask, the normaliser on, inputs checked.
    pub fn new(score: Score) -> Self {
        AttentionSpec {
            score,
            scale: None,
            causal: false,
            window: None,
            normalizer: true,
            check_inputs: true,
            key_splits: None,
        }
    }

    /// τ.
    pub fn scale(mut self, tau: f64) -> Self {
        self.scale = Some(tau);
        self
    }

    /// Causal (bottom-right aligned) masking.
    pub fn causal(mut self, on: bool) -> Self {
        self.causal = on;
        self
    }

    /// A sliding window of `w` keys ending at the diagonal (implies causal).
    pub fn window(mut self, w: u32) -> Self {
        self.window = Some(w);
        self
    }

    /// The (D/2) ln π normaliser of the distance families.
    pub fn normalizer(mut self, on: bool) -> Self {
        self.normalizer = on;
        self
    }

    /// Whether to scan the inputs on a GPU.
    pub fn check_inputs(mut self, on: bool) -> Self {
        self.check_inputs = on;
        self
    }

    /// Split the keys into `n` chunks on a GPU (1: never split; see [`Self::key_splits`]).
    pub fn key_splits(mut self, n: u32) -> Self {
        self.key_splits = Some(n);
        self
    }

    /// τ for head dim `d`.
    pub fn tau(&self, d: usize) -> f64 {
        match self.scale {
            Some(t) => t,
            None if self.score == Score::Dot => 1.0 / (d as f64).sqrt(),
            None => 1.0,
        }
    }

    /// Whether keys past the diagonal are masked (causal, or a window).
    pub fn is_causal(&self) -> bool {
        self.causal || self.window.is_some()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Score::StudentT(nu) = self.score
            && !(nu.is_finite() && nu > 0.0)
        {
            return Err(Error::invalid(
                "nu",
                format!("must be finite and > 0, got {nu}"),
            ));
        }
        // The kernels round τ once to f32: it must be a finite, non-zero f32 too.
        if let Some(t) = self.scale
            && !(t.is_finite() && t > 0.0 && (t as f32).is_finite() && t as f32 > 0.0)
        {
            return Err(Error::invalid(
                "scale",
                format!("must be finite and > 0 (also as an f32), got {t}"),
            ));
        }
        if self.window == Some(0) {
            return Err(Error::invalid("window", "must be >= 1"));
        }
        if self.key_splits == Some(0) {
            return Err(Error::invalid("key_splits", "must be >= 1"));
        }
        Ok(())
    }
}

/// What the score reads besides q, k and v, each optional: the precisions π_h `[Hq]` and π_j
/// `[B, Hkv, Lk]` (row-major, every entry finite and > 0), Student-t's ν per query head, an
/// additive bias and a boolean mask broadcastable to the scores, and the offsets of packed
/// variable-length sequences. Build it with struct update syntax:
/// `Precisions { key: Some(pk.view()), ..Default::default() }`.
#[derive(Clone, Debug, Default)]
pub struct Precisions<'a> {
    /// Per query head.
    pub head: Option<View<'a, f32>>,
    /// Per kv head and key.
    pub key: Option<View<'a, f32>>,
    /// Student-t's ν per query head `[Hq]` (finite, > 0), replacing the one in
    /// [`Score::StudentT`]; only with that family. Its gradient is `[Hq]`.
    pub nu: Option<View<'a, f32>>,
    /// β added to every score after the family's (finite; see [`ScoreBias`]).
    pub bias: Option<ScoreBias<'a, f32>>,
    /// Which scores to keep (nonzero) or mask (0), as SDPA's boolean `attn_mask`.
    pub mask: Option<ScoreBias<'a, u8>>,
    /// Packed variable-length sequences (see [`Varlen`]).
    pub varlen: Option<Varlen<'a>>,
}

/// A tensor broadcastable to the scores `[B, Hq, Lq, Lk]`: `shape` is `[B or 1, Hq or 1, Lq or 1,
/// Lk]` (a size-1 dimension is broadcast), with element strides for its first three dimensions
/// (free, 0 allowed) and Lk contiguous. E.g. a per-key bias `[B, Hq, 1, Lk]`, a relative-position
/// bias shared by the batch `[1, Hq, Lq, Lk]`, a padding mask `[B, 1, 1, Lk]`.
#[derive(Clone, Debug)]
pub struct ScoreBias<'a, T: bytemuck::Pod> {
    /// The elements.
    pub data: View<'a, T>,
    /// `[B | 1, Hq | 1, Lq | 1, Lk]`.
    pub shape: [usize; 4],
    /// Element strides of the first three dimensions.
    pub strides: [usize; 3],
}

impl<'a, T: bytemuck::Pod> ScoreBias<'a, T> {
    /// Row-major memory of `shape`.
    pub fn contiguous(data: View<'a, T>, shape: [usize; 4]) -> Self {
        ScoreBias {
            data,
            shape,
            strides: bhld_strides(shape),
        }
    }

    /// The element offset of score (b, h, i, j), broadcasting size-1 dimensions.
    pub(crate) fn offset(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        let [nb, nh, nl, _] = self.shape;
        let [sb, sh, sl] = self.strides;
        (if nb == 1 { 0 } else { b * sb })
            + (if nh == 1 { 0 } else { h * sh })
            + (if nl == 1 { 0 } else { i * sl })
            + j
    }
}

/// Packed variable-length sequences (FlashAttention's varlen convention): sequence s holds the
/// query rows `cu_q[s]..cu_q[s + 1]` and the key rows `cu_k[s]..cu_k[s + 1]` of q `[1, Hq,
/// total_q, D]`, k and v `[1, Hkv, total_k, ·]` (memory `[total, H, D]`: [`Tensor4::blhd`] with
/// B = 1), and attends only within itself; causal and window masks apply per sequence (bottom-right
/// aligned to its own lengths). lse, e and the per-key precision are `[Hq, total_q]`, `[Hq,
/// total_q]` and `[Hkv, total_k]`. Not with `kv_len`, a bias or a mask.
#[derive(Clone, Debug)]
pub struct Varlen<'a> {
    /// `[S + 1]` int32: 0, then nondecreasing, ending at total_q.
    pub cu_q: View<'a, i32>,
    /// `[S + 1]` int32: 0, then nondecreasing, ending at total_k.
    pub cu_k: View<'a, i32>,
    /// An upper bound of every query length (sizes the GPU grid).
    pub max_q: usize,
    /// An upper bound of every key length.
    pub max_k: usize,
}

impl Varlen<'_> {
    /// The number of sequences S.
    pub fn sequences(&self) -> usize {
        self.cu_q.len().saturating_sub(1)
    }
}

/// Where [`forward_into`] writes: o `[B, Hq, Lq, Dv]` in the input dtype, lse and e
/// `[B, Hq, Lq]` f32 (row-major), both optional.
#[derive(Debug)]
pub struct AttentionOutputs<'a, T: Element> {
    /// The output.
    pub o: Tensor4Mut<'a, T>,
    /// ln Σ_j e^{s_ij}.
    pub lse: Option<ViewMut<'a, f32>>,
    /// Σ_j w_ij π_ij d²_ij.
    pub e: Option<ViewMut<'a, f32>>,
}

/// What [`forward`] returns (o in BHLD).
#[derive(Debug)]
pub struct AttentionResult<T: Element> {
    /// `[B, Hq, Lq, Dv]`.
    pub o: DeviceBuffer<T>,
    /// `[B, Hq, Lq]`.
    pub lse: DeviceBuffer<f32>,
    /// `[B, Hq, Lq]`.
    pub e: DeviceBuffer<f32>,
}

/// The checked sizes of a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// The largest element offset a tensor addresses, +1 (0 for an empty tensor); `usize::MAX` when
/// that overflows (no view is that long, so [`check_tensor`] rejects it).
pub(crate) fn extent(shape: [usize; 4], strides: [usize; 3]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    (0..3)
        .try_fold(shape[3], |acc, i| {
            (shape[i] - 1)
                .checked_mul(strides[i])
                .and_then(|x| acc.checked_add(x))
        })
        .unwrap_or(usize::MAX)
}

pub(crate) fn check_tensor(
    name: &str,
    shape: [usize; 4],
    strides: [usize; 3],
    len: usize,
) -> Result<()> {
    if shape.contains(&0) {
        return Err(Error::invalid(
            name,
            format!("shape {shape:?} has a zero dimension"),
        ));
    }
    let need = extent(shape, strides);
    if need == usize::MAX {
        return Err(Error::invalid(
            name,
            format!("shape {shape:?} with strides {strides:?} overflows the address space"),
        ));
    }
    if need > len {
        return Err(Error::invalid(
            name,
            format!(
                "shape {shape:?} with strides {strides:?} addresses {need} elements; the view has {len}"
            ),
        ));
    }
    // Rows of length D must not overlap each other (a stride below D in any dimension of size
    // > 1 would make rows alias).
    if let Some(i) = (0..3).find(|&i| shape[i] > 1 && strides[i] < shape[3]) {
        return Err(Error::invalid(
            name,
            format!(
                "stride {} of dimension {i} is below the row length {}",
                strides[i], shape[3]
            ),
        ));
    }
    Ok(())
}

/// Head dims the GPU kernels take (the CPU reference takes any).
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

pub(crate) fn dims<T: Element>(
    q: &Tensor4<'_, T>,
    k: &Tensor4<'_, T>,
    v: &Tensor4<'_, T>,
) -> Result<Dims> {
    check_tensor("q", q.shape, q.strides, q.data.len())?;
    check_tensor("k", k.shape, k.strides, k.data.len())?;
    check_tensor("v", v.shape, v.strides, v.data.len())?;
    let [b, hq, lq, d] = q.shape;
    let [kb, hkv, lk, kd] = k.shape;
    let [vb, vh, vl, dv] = v.shape;
    if kb != b || vb != b {
        return Err(Error::invalid(
            "k",
            format!("batch {kb} (v: {vb}) differs from q's {b}"),
        ));
    }
    if kd != d {
        return Err(Error::invalid(
            "k",
            format!("head dim {kd} differs from q's {d}"),
        ));
    }
    if vh != hkv || vl != lk {
        return Err(Error::invalid(
            "v",
            format!("heads {vh} and length {vl} differ from k's {hkv} and {lk}"),
        ));
    }
    if hq % hkv != 0 {
        return Err(Error::invalid(
            "k",
            format!("{hkv} kv heads do not divide the {hq} query heads"),
        ));
    }
    // Element counts (strides may alias rows across B and H, so the extents above do not bound
    // them): once these fit, every product of the dims that an op forms fits too.
    product("q", &[b, hq, lq, d.max(dv)])?;
    product("k", &[b, hkv, lk, d.max(dv)])?;
    product("scores", &[b, hq, lq, lk])?;
    Ok(Dims {
        b,
        hq,
        hkv,
        lq,
        lk,
        d,
        dv,
    })
}

/// The checks every entry point makes on the forward's arguments: the spec, shapes, strides,
/// heads, and that everything lives on q's device with the right lengths.
pub(crate) fn check_problem<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
) -> Result<Dims> {
    spec.validate()?;
    let dims = dims(q, k, v)?;
    let dev = q.data.device();
    same_device("k", k.data.device(), dev)?;
    same_device("v", v.data.device(), dev)?;
    if let Some(h) = &precision.head {
        same_device("precision.head", h.device(), dev)?;
        check_len("precision.head", h.len(), dims.hq)?;
    }
    if let Some(p) = &precision.key {
        same_device("precision.key", p.device(), dev)?;
        check_len("precision.key", p.len(), dims.b * dims.hkv * dims.lk)?;
    }
    if let Some(l) = kv_len {
        same_device("kv_len", l.device(), dev)?;
        check_len("kv_len", l.len(), dims.b)?;
    }
    check_score_inputs(spec, &dims, precision, kv_len.is_some(), dev)?;
    Ok(dims)
}

/// The shape, device and length checks of ν, the bias, the mask and the varlen offsets (their
/// values are checked by the reference, or on a GPU by the input scan).
fn check_score_inputs(
    spec: &AttentionSpec,
    dims: &Dims,
    precision: &Precisions<'_>,
    has_kv_len: bool,
    dev: &Device,
) -> Result<()> {
    if let Some(nu) = &precision.nu {
        if !matches!(spec.score, Score::StudentT(_)) {
            return Err(Error::invalid(
                "nu",
                "a per-head nu needs the Student-t score",
            ));
        }
        same_device("nu", nu.device(), dev)?;
        check_len("nu", nu.len(), dims.hq)?;
    }
    let want = |name: &str, shape: [usize; 4]| -> Result<()> {
        let full = [dims.b, dims.hq, dims.lq, dims.lk];
        let ok = (0..3).all(|i| shape[i] == 1 || shape[i] == full[i]) && shape[3] == full[3];
        if !ok {
            return Err(Error::invalid(
                name,
                format!(
                    "shape {shape:?} does not broadcast to the scores {full:?} (each of B, Hq, Lq \
                     full or 1, Lk full)"
                ),
            ));
        }
        Ok(())
    };
    if let Some(bias) = &precision.bias {
        want("bias", bias.shape)?;
        same_device("bias", bias.data.device(), dev)?;
        check_read_only("bias", bias.shape, bias.strides, bias.data.len())?;
    }
    if let Some(mask) = &precision.mask {
        want("mask", mask.shape)?;
        same_device("mask", mask.data.device(), dev)?;
        check_read_only("mask", mask.shape, mask.strides, mask.data.len())?;
    }
    if let Some(vl) = &precision.varlen {
        if dims.b != 1 {
            return Err(Error::invalid(
                "q",
                format!(
                    "packed sequences take q, k and v with B = 1 ([1, H, total, D]); got B = {}",
                    dims.b
                ),
            ));
        }
        for (name, other) in [
            ("kv_len", has_kv_len),
            ("bias", precision.bias.is_some()),
            ("mask", precision.mask.is_some()),
        ] {
            if other {
                return Err(Error::invalid(
                    name,
                    "not available with packed sequences (varlen): they carry their own lengths",
                ));
            }
        }
        same_device("cu_seqlens_q", vl.cu_q.device(), dev)?;
        same_device("cu_seqlens_k", vl.cu_k.device(), dev)?;
        if vl.cu_q.len() < 2 {
            return Err(Error::invalid(
                "cu_seqlens_q",
                format!("needs S + 1 >= 2 offsets, got {}", vl.cu_q.len()),
            ));
        }
        check_len("cu_seqlens_k", vl.cu_k.len(), vl.cu_q.len())?;
        for (name, m, total) in [
            ("max_seqlen_q", vl.max_q, dims.lq),
            ("max_seqlen_k", vl.max_k, dims.lk),
        ] {
            if m == 0 || m > total {
                return Err(Error::invalid(
                    name,
                    format!("must be in 1..={total} (the packed length), got {m}"),
                ));
            }
        }
        if i32::try_from(dims.lq.max(dims.lk)).is_err() {
            return Err(Error::invalid(
                "q",
                "packed sequences index rows with int32",
            ));
        }
    }
    Ok(())
}

/// [`check_tensor`] for a tensor that is only read: rows may alias (a stride of 0, or below the
/// row length, repeats rows, as an expanded PyTorch tensor does), so only the extent is checked.
fn check_read_only(name: &str, shape: [usize; 4], strides: [usize; 3], len: usize) -> Result<()> {
    let need = extent(shape, strides);
    if need == usize::MAX || need > len {
        return Err(Error::invalid(
            name,
            format!(
                "shape {shape:?} with strides {strides:?} addresses {need} elements; the view has {len}"
            ),
        ));
    }
    Ok(())
}

/// The checks of varlen offsets' values (host memory): `cu[0] = 0`, nondecreasing, `cu[S] =
/// total`, every length ≤ `max`.
pub(crate) fn check_cu_seqlens(name: &str, cu: &[i32], total: usize, max: usize) -> Result<()> {
    if cu[0] != 0 {
        return Err(Error::invalid(
            name,
            format!("must start at 0, got {}", cu[0]),
        ));
    }
    for s in 1..cu.len() {
        let len = cu[s] as i64 - cu[s - 1] as i64;
        if len < 0 {
            return Err(Error::invalid(
                name,
                format!(
                    "must be nondecreasing: {name}[{s}] = {} < {}",
                    cu[s],
                    cu[s - 1]
                ),
            ));
        }
        if len as usize > max {
            return Err(Error::invalid(
                name,
                format!("sequence {} has length {len} > the max length {max}", s - 1),
            ));
        }
    }
    let last = *cu.last().unwrap_or(&0);
    if last as i64 != total as i64 {
        return Err(Error::invalid(
            name,
            format!("must end at the packed length {total}, got {last}"),
        ));
    }
    Ok(())
}

/// Byte spans (name, address, bytes) of the forward's inputs, for the overlap check.
pub(crate) fn input_spans<'a, T: Element>(
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
) -> Vec<(&'static str, u64, usize)> {
    let el = std::mem::size_of::<T>();
    let t4 = |name, t: &Tensor4<'_, T>| {
        (
            name,
            t.data.addr(),
            extent(t.shape, t.strides).saturating_mul(el),
        )
    };
    let mut ins = vec![t4("q", q), t4("k", k), t4("v", v)];
    for (name, p) in [
        ("precision.head", &precision.head),
        ("precision.key", &precision.key),
    ] {
        if let Some(p) = p {
            ins.push((name, p.addr(), p.len().saturating_mul(4)));
        }
    }
    if let Some(l) = kv_len {
        ins.push(("kv_len", l.addr(), l.len().saturating_mul(4)));
    }
    if let Some(nu) = &precision.nu {
        ins.push(("nu", nu.addr(), nu.len().saturating_mul(4)));
    }
    if let Some(b) = &precision.bias {
        ins.push((
            "bias",
            b.data.addr(),
            extent(b.shape, b.strides).saturating_mul(4),
        ));
    }
    if let Some(m) = &precision.mask {
        ins.push(("mask", m.data.addr(), extent(m.shape, m.strides)));
    }
    if let Some(vl) = &precision.varlen {
        ins.push((
            "cu_seqlens_q",
            vl.cu_q.addr(),
            vl.cu_q.len().saturating_mul(4),
        ));
        ins.push((
            "cu_seqlens_k",
            vl.cu_k.addr(),
            vl.cu_k.len().saturating_mul(4),
        ));
    }
    ins
}

/// Everything a backend needs, checked.
pub(crate) struct Problem<'p, 'a, T: Element> {
    pub spec: AttentionSpec,
    pub dims: Dims,
    pub q: &'p Tensor4<'a, T>,
    pub k: &'p Tensor4<'a, T>,
    pub v: &'p Tensor4<'a, T>,
    pub precision: &'p Precisions<'a>,
    pub kv_len: Option<&'p View<'a, i32>>,
}

/// Precision-weighted attention, forward, into `out`, enqueued on `stream`. `kv_len`: per-batch
/// key lengths `[B]` (keys j ≥ kv_len\[b\] are padding). Everything is checked before anything is
/// written: shapes, strides, heads, devices, ν, τ, the window, outputs that alias an input or
/// each other, and (on the CPU, or on a GPU with `check_inputs`) every precision > 0 and every
/// key length in 0..=Lk.
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
    out: AttentionOutputs<'_, T>,
    stream: Stream,
) -> Result<()> {
    let dims = check_problem(spec, q, k, v, precision, kv_len)?;
    let dev = q.data.device();
    let want = [dims.b, dims.hq, dims.lq, dims.dv];
    if out.o.shape != want {
        return Err(Error::invalid(
            "o",
            format!("shape {:?}, expected {want:?}", out.o.shape),
        ));
    }
    same_device("o", out.o.data.device(), dev)?;
    check_tensor("o", out.o.shape, out.o.strides, out.o.data.len())?;
    let rows = dims.b * dims.hq * dims.lq;
    for (name, v) in [("lse", &out.lse), ("e", &out.e)] {
        if let Some(v) = v {
            same_device(name, v.device(), dev)?;
            check_len(name, v.len(), rows)?;
        }
    }
    // Byte spans of everything read and written: an output may alias nothing.
    let span = |name, addr: u64, elems: usize, size: usize| (name, addr, elems * size);
    let el = std::mem::size_of::<T>();
    let ins = input_spans(q, k, v, precision, kv_len);
    let mut outs = vec![span(
        "o",
        out.o.data.addr,
        extent(out.o.shape, out.o.strides),
        el,
    )];
    for (name, v) in [("lse", &out.lse), ("e", &out.e)] {
        if let Some(v) = v {
            outs.push(span(name, v.addr, v.len(), 4));
        }
    }
    check_no_overlap(&ins, &outs)?;
    let p = Problem {
        spec: *spec,
        dims,
        q,
        k,
        v,
        precision,
        kv_len,
    };
    if dev.is_reference() {
        return cpu::forward_views(&p, out);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| fast::forward(&p, out));
    }
    gpu_supports(precision)?;
    #[cfg(fep_gpu)]
    {
        gpu::forward(&p, out, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device in a build without GPU backends")
    }
}

/// The score inputs the GPU forward kernels do not take yet: an error naming the first one.
/// None since issue 23 (ν per head, bias, mask and packed sequences are all implemented); kept as
/// the one place to name an input the kernels lack.
pub(crate) fn gpu_supports(precision: &Precisions<'_>) -> Result<()> {
    let missing: [(&str, bool); 0] = [];
    let _ = precision;
    unsupported_on_gpu(&missing)
}

/// An `Unsupported` error naming the first input marked present in `missing`.
pub(crate) fn unsupported_on_gpu(missing: &[(&str, bool)]) -> Result<()> {
    match missing.iter().find(|m| m.1) {
        Some((name, _)) => Err(Error::Unsupported(format!(
            "`{name}` is not implemented by the GPU attention kernels yet (the CPU device has it)"
        ))),
        None => Ok(()),
    }
}

/// The attention weights w_ij = softmax_j(s_ij) `[B, Hq, Lq, Lk]` (row-major f32) into `out`,
/// enqueued on `stream`: a materialised score matrix, for inspection and visualisation only (it
/// costs B·Hq·Lq·Lk floats, which is what the fused forward never stores). Masked keys and fully
/// masked rows give 0. The arguments are the forward's (v is not read but sets Dv's checks);
/// with packed sequences the matrix is `[1, Hq, total_q, total_k]`, zero across sequences.
#[allow(clippy::too_many_arguments)]
pub fn probabilities_into<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
    mut out: ViewMut<'_, f32>,
    stream: Stream,
) -> Result<()> {
    let dims = check_problem(spec, q, k, v, precision, kv_len)?;
    let dev = q.data.device();
    let n = product("probabilities", &[dims.b, dims.hq, dims.lq, dims.lk])?;
    same_device("probabilities", out.device(), dev)?;
    check_len("probabilities", out.len(), n)?;
    let ins = input_spans(q, k, v, precision, kv_len);
    check_no_overlap(&ins, &[("probabilities", out.addr, n.saturating_mul(4))])?;
    let p = Problem {
        spec: *spec,
        dims,
        q,
        k,
        v,
        precision,
        kv_len,
    };
    if !dev.is_gpu() {
        let host = cpu::Gathered::new(&p)?;
        let w = cpu::probabilities(spec, &host.inputs(&p))?;
        out.host_slice_mut()
            .iter_mut()
            .zip(&w)
            .for_each(|(a, &c)| *a = c as f32);
        return Ok(());
    }
    gpu_supports(precision)?;
    #[cfg(fep_gpu)]
    {
        gpu::probabilities(&p, out.addr, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device in a build without GPU backends")
    }
}

/// [`probabilities_into`] on the default stream into a new buffer; refused (before allocating)
/// above `max_elements` elements, so a debugging call cannot take the device's memory by surprise.
pub fn probabilities<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
    max_elements: usize,
) -> Result<DeviceBuffer<f32>> {
    let d = check_problem(spec, q, k, v, precision, kv_len)?;
    let n = product("probabilities", &[d.b, d.hq, d.lq, d.lk])?;
    if n > max_elements {
        return Err(Error::invalid(
            "probabilities",
            format!(
                "[{}, {}, {}, {}] = {n} elements exceeds the limit of {max_elements} (raise it \
                 explicitly to materialise this matrix)",
                d.b, d.hq, d.lq, d.lk
            ),
        ));
    }
    let dev: &Device = q.data.device();
    let mut w = dev.alloc(n)?;
    probabilities_into(
        spec,
        q,
        k,
        v,
        precision,
        kv_len,
        w.view_mut(),
        dev.default_stream(),
    )?;
    Ok(w)
}

/// Forward on the default stream into new buffers (o in BHLD, lse and e).
pub fn forward<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
) -> Result<AttentionResult<T>> {
    spec.validate()?;
    let d = dims(q, k, v)?;
    let dev: &Device = q.data.device();
    let shape = [d.b, d.hq, d.lq, d.dv];
    let rows = d.b * d.hq * d.lq;
    let mut r = AttentionResult {
        o: dev.alloc(rows * d.dv)?,
        lse: dev.alloc(rows)?,
        e: dev.alloc(rows)?,
    };
    let out = AttentionOutputs {
        o: Tensor4Mut::bhld(r.o.view_mut(), shape),
        lse: Some(r.lse.view_mut()),
        e: Some(r.e.view_mut()),
    };
    forward_into(spec, q, k, v, precision, kv_len, out, dev.default_stream())?;
    Ok(r)
}

/// The f64 reference on host slices (what the CPU device runs; tests hold it against the
/// PyTorch fixtures at 1e-11).
pub mod reference {
    pub use super::cpu::{RefBroadcast, RefInputs, RefOutputs, RefVarlen, forward, probabilities};
    pub use super::cpu_backward::{RefGradInputs, RefGradients, backward};
    pub use super::merge::merge_reference as merge;
}
