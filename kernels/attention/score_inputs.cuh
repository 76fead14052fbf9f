// score_inputs.cuh: the optional per-score inputs that the forward, the backward and the
// probabilities kernels all read (DESIGN.md §4.1): the additive bias β and the boolean mask,
// broadcast to [B, Hq, Lq, Lk], Student-t's ν per query head, and the offsets of packed
// variable-length sequences. Mirrored field for field by `AttnScoreInputs` in
// src/attention/gpu_inputs.rs (#[repr(C)], 8-byte fields only: no padding to disagree about).
#pragma once
#include "../port/types.cuh"

struct AttnScoreInputs {
    const float* bias;            // β in natural units, or null
    const unsigned char* mask;    // nonzero: keep; or null
    const float* nu_head;         // [Hq] or null (the params' ν)
    const int* cu_q;              // [S + 1] or null: packed sequences (then B is S)
    const int* cu_k;              // [S + 1] with cu_q
    long long bias_stride[3];     // element strides of B, Hq, Lq; 0 where broadcast (Lk: 1)
    long long mask_stride[3];
};

// The bias of score (b, h, i, j) (row i and key j within the batch's sequence), 0 without one.
FEP_DEVICE float attn_bias_at(const AttnScoreInputs& x, int b, int h, int i, int j) {
    if (!x.bias) return 0.0f;
    return x.bias[b * x.bias_stride[0] + h * x.bias_stride[1] + i * x.bias_stride[2] + j];
}

// Whether score (b, h, i, j) is kept by the mask (true without one).
FEP_DEVICE bool attn_keep_at(const AttnScoreInputs& x, int b, int h, int i, int j) {
    if (!x.mask) return true;
    return x.mask[b * x.mask_stride[0] + h * x.mask_stride[1] + i * x.mask_stride[2] + j] != 0;
}

// Student-t's ν of query head h.
FEP_DEVICE float attn_nu_of(const AttnScoreInputs& x, int h, float nu) { return x.nu_head ? x.nu_head[h] : nu; }

// Where sequence b lives: its first query and key rows in the packed tensors (0 when unpacked)
// and its lengths (the problem's Lq and Lk when unpacked). A block of a packed problem offsets
// every row index by q0 or k0 and uses lq, lk in place of the problem's for its masks.
struct AttnSeq {
    int q0, k0, lq, lk;
};

// Packed, the offsets are clamped to [0, total] and the lengths to >= 0: offsets that were not
// scanned (check_inputs off) can make a sequence wrong, never a read out of bounds.
FEP_DEVICE AttnSeq attn_seq(const AttnScoreInputs& x, int b, int lq, int lk) {
    AttnSeq s;
    if (x.cu_q) {
        s.q0 = min(max(x.cu_q[b], 0), lq), s.k0 = min(max(x.cu_k[b], 0), lk);
        s.lq = min(max(x.cu_q[b + 1], s.q0), lq) - s.q0, s.lk = min(max(x.cu_k[b + 1], s.k0), lk) - s.k0;
    } else {
        s.q0 = 0, s.k0 = 0, s.lq = lq, s.lk = lk;
    }
    return s;
}

// The bias (in base 2: β log2 e) and the mask of score (b, h, i, j) as one additive term (−∞:
// masked), from only the inputs that vary over Lq (kRows) or only those broadcast over it
// (!kRows): the forward kernels fold the latter into their per-key terms (once per key tile)
// and add the former per score, in the tiles they flag.
template <bool kRows>
FEP_DEVICE float attn_extra_log2(const AttnScoreInputs& x, int b, int h, int i, int j) {
    float t = 0.0f;
    if (x.bias && (x.bias_stride[2] != 0) == kRows) t = attn_bias_at(x, b, h, i, j) * 1.4426950408889634f;
    if (x.mask && (x.mask_stride[2] != 0) == kRows && !attn_keep_at(x, b, h, i, j)) t = -__uint_as_float(0x7f800000u);
    return t;
}
