// score.cuh: what both forward kernels share: the block's place in the problem (AttnBlock), the
// score of each family in base 2 (from q·k and per-key and per-row terms), and the per-key terms.
#pragma once
#include "params.cuh"

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f
#define ATTN_NEG_INF (-__uint_as_float(0x7f800000u))

// One block's rows [i0, i0 + kBr) of head h in batch b, the keys they may see and where its
// tensors start. With a key split (decode) grid.x is row tiles × splits: split
// s = blockIdx.x / row tiles sees only keys [s split, (s + 1) split), a whole number of key tiles,
// so every key tile lies in one split and the tile-level mask logic (causal, window, key length,
// all in the sequence's key indices) holds as it is; the split writes its normalised o, lse and e
// to part s of the outputs (merged by lse afterwards, merge.cu).
// Packed sequences (p.x.cu_q): grid.z is the sequence, whose rows start at q0 and keys at k0 of
// batch 0; i0, the masks and the key length are the sequence's own (bottom-right aligned to its
// lengths), and a block whose rows start past the sequence's length has nothing to do (`idle`:
// it visits no key tile and writes nothing).
template <typename In>
struct AttnBlock {
    int b, h, hk, i0;
    int lq;        // the rows of the block's sequence (the problem's Lq when unpacked)
    int off;       // row i sees keys j <= i + off (bottom-right aligned)
    int kv_end;    // the batch's key length
    int i_last;    // the block's last real row
    int j_begin;   // the first key a row of the block may see (window), and one past the last
    int j_end;
    const In *q, *k, *v;  // this head's rows
    const float* pi_key;  // this KV head's per-key precisions, or null
    float pi_h;
    float nu;   // Student-t's ν of this head (the per-head one when given)
    int split;  // the block's split (0 without one)

    FEP_DEVICE bool idle() const { return i0 >= lq; }

    // The rows of the block's sequence again, for after the key loop (reloaded rather than held
    // across it: a register the v2 kernels at Dv = 32 do not have).
    static FEP_DEVICE int rows(const AttnParams& p) {
        return p.x.cu_q ? attn_seq(p.x, (int)blockIdx.z, p.lq, p.lk).lq : p.lq;
    }

    // The sequence's first row in batch 0 (0 unpacked): reloaded after the key loop rather than
    // held across it (registers; see out()).
    static FEP_DEVICE int q_first(const AttnParams& p) {
        return p.x.cu_q ? attn_seq(p.x, (int)blockIdx.z, p.lq, p.lk).q0 : 0;
    }
    // Where the block writes, computed after the key loop (pointers to its part held across the
    // loop cost registers: d96_v32 spilled): this head's output rows and first row of lse and e,
    // both at the sequence's first row.
    FEP_DEVICE In* out(const AttnParams& p) const {
        return (In*)p.o + split * p.split_o + b * p.o_stride[0] + h * p.o_stride[1] + q_first(p) * p.o_stride[2];
    }
    FEP_DEVICE long long row0(const AttnParams& p) const {
        return split * p.split_row + ((long long)b * p.hq + h) * p.lq + q_first(p);
    }

    FEP_DEVICE AttnBlock(const AttnParams& p, int kBr) {
        split = (int)blockIdx.x / p.tiles;
        h = blockIdx.y, i0 = ((int)blockIdx.x - split * p.tiles) * kBr;
        hk = h / (p.hq / p.hkv);
        const AttnSeq seq = attn_seq(p.x, (int)blockIdx.z, p.lq, p.lk);
        b = p.x.cu_q ? 0 : (int)blockIdx.z;  // packed sequences all live in batch 0
        lq = seq.lq;
        off = seq.lk - seq.lq;
        kv_end = p.kv_len ? min(max(p.kv_len[b], 0), seq.lk) : seq.lk;
        i_last = min(i0 + kBr, lq) - 1;
        j_end = p.causal ? min(kv_end, i_last + off + 1) : kv_end;
        j_begin = p.window > 0 ? max(0, i0 + off - p.window + 1) : 0;
        // Unsplit, the host passes one split covering every key (no branch here: with one, clang
        // duplicated the key loop). It keeps S split within int.
        j_begin = max(j_begin, split * p.split);
        j_end = min(j_end, (split + 1) * p.split);
        // Rows past a packed sequence's length: no key tile, and the epilogue writes no row. Not
        // an early return: on gfx942 a second exit changed the loop layout (the census then read
        // all four family copies as one loop) — the backward's dq kernel found scratch with one.
        j_end = idle() ? 0 : j_end;
        q = (const In*)p.q + b * p.q_stride[0] + h * p.q_stride[1] + seq.q0 * p.q_stride[2];
        k = (const In*)p.k + b * p.k_stride[0] + hk * p.k_stride[1] + seq.k0 * p.k_stride[2];
        v = (const In*)p.v + b * p.v_stride[0] + hk * p.v_stride[1] + seq.k0 * p.v_stride[2];
        pi_key = p.pi_key ? p.pi_key + ((long long)b * p.hkv + hk) * p.lk + seq.k0 : nullptr;
        pi_h = p.pi_head ? p.pi_head[h] : 1.0f;
        nu = attn_nu_of(p.x, h, p.nu);
    }
};

template <int F>
struct AttnFamily {
    static constexpr int value = F;
};
template <bool B>
struct AttnBool {
    static constexpr bool value = B;
};

// One score in base 2 from x = q·k and the per-key terms (a, b, ‖k‖²) and per-row terms
// (‖q‖², Gaussian's ½‖q‖² or 0); kappa = (ν + D)/2. kExact: Student-t's log2 from the libm
// routine rather than the special-function unit, whose 2^-22 error is multiplied by kappa (up to
// ~140) in the score: fine for 16-bit inputs, not for the f32 path's bound. kFastSqrt: Laplace's
// square root without IEEE rounding (the 16-bit v2 kernel; in v1 it cost a spill at Dv = 256).
template <int F, bool kExact, bool kFastSqrt = false>
FEP_DEVICE float attn_score(float x, float a, float b, float qn, float hq, float kn, float kappa) {
    if constexpr (F == ATTN_DOT) {
        return fmaf(x, a, b);
    } else if constexpr (F == ATTN_GAUSSIAN) {
        return fmaf(a, x - hq, b);
    } else {
        const float d2 = fmaxf(fmaf(-2.0f, x, qn + kn), 0.0f);  // rounding can make it < 0
        if constexpr (F == ATTN_STUDENT_T) {
            const float u = fmaf(a, d2, 1.0f);
            return fmaf(-kappa, kExact ? log2f(u) : fep_log2(u), b);
        } else {
            return fmaf(-a, kFastSqrt ? fep_sqrt_approx(d2) : sqrtf(d2), b);
        }
    }
}

// d² back from a visible score s (the inverse of attn_score, for e = Σ p π d² without keeping q·k):
// Dot and Gaussian through x = q·k, Student-t and Laplace directly; inv_a = 1/a, inv_kappa =
// 1/kappa (no division per score). Rounding makes it approximate (a few ulps of s, relative to d²
// where d² is small), well within the 16-bit paths' bound.
template <int F>
FEP_DEVICE float attn_d2_from_score(float s, float inv_a, float b, float qn, float hq, float kn, float inv_kappa) {
    if constexpr (F == ATTN_DOT || F == ATTN_GAUSSIAN) {
        const float x = fmaf(s - b, inv_a, F == ATTN_GAUSSIAN ? hq : 0.0f);
        return fmaxf(fmaf(-2.0f, x, qn + kn), 0.0f);
    } else if constexpr (F == ATTN_STUDENT_T) {
        return fmaxf((fep_exp2((b - s) * inv_kappa) - 1.0f) * inv_a, 0.0f);
    } else {
        const float r = (b - s) * inv_a;
        return r * r;
    }
}

// The per-key multiplier a and bias b of a score (before the key-length mask), from π_ij = π_h π_j,
// the scale τ, ‖k_j‖² (n) and the normaliser's (D/2) log2 π when `norm`.
FEP_DEVICE void attn_key_terms(int family, float tau, float nu, float pi, float n, bool norm, float d, float& a,
                               float& b) {
    const float tp = tau * pi;
    const float nj = norm ? 0.5f * d * log2f(pi) : 0.0f;
    switch (family) {
        case ATTN_DOT: a = tp * ATTN_LOG2E, b = 0.0f; break;
        case ATTN_GAUSSIAN: a = tp * ATTN_LOG2E, b = fmaf(-0.5f * a, n, nj); break;
        case ATTN_STUDENT_T: a = tp / nu, b = nj; break;
        default: a = sqrtf(tp) * ATTN_LOG2E, b = nj; break;  // Laplace
    }
}
