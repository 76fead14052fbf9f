// params.cuh: the one argument of the forward kernels, mirrored field for field by
// `AttnParams` in src/attention/gpu.rs (#[repr(C)]; pointers and 64-bit strides first, so
// neither side has padding to disagree about).
#pragma once
#include "../port/types.cuh"
#include "score_inputs.cuh"

// Score families (src/attention/mod.rs Score::code).
#define ATTN_DOT 0
#define ATTN_GAUSSIAN 1
#define ATTN_STUDENT_T 2
#define ATTN_LAPLACE 3

struct AttnParams {
    const void* q;          // [B, Hq, Lq, D] at q_stride
    const void* k;          // [B, Hkv, Lk, D]
    const void* v;          // [B, Hkv, Lk, Dv]
    void* o;                // [B, Hq, Lq, Dv]; split: the parts [S, B, Hq, Lq, Dv] (input type)
    const float* pi_head;   // [Hq] or null (1)
    const float* pi_key;    // [B, Hkv, Lk] row-major, or null (1)
    const int* kv_len;      // [B] or null (Lk); clamped to [0, Lk]
    float* lse;             // [B, Hq, Lq] or null; split: [S, B, Hq, Lq]
    float* e;               // [B, Hq, Lq] or null; split: [S, B, Hq, Lq]
    long long q_stride[3];  // element strides of B, H, L (D is contiguous)
    long long k_stride[3];
    long long v_stride[3];
    long long o_stride[3];
    long long split_o;      // split s writes o at o + s split_o (elements)
    long long split_row;    // ... and lse, e at + s split_row
    AttnScoreInputs x;      // bias, mask, ν per head, packed-sequence offsets (score_inputs.cuh)
    int b, hq, hkv, lq, lk; // packed sequences: b = S (grid z), lq, lk = total_q, total_k
    int family;             // ATTN_*
    float tau;              // the scale
    float nu;               // Student-t's ν
    int causal;             // bottom-right aligned
    int window;             // 0: none; W >= 1 (then causal is set too)
    int normalizer;         // add (D/2) ln π to the distance families
    int vec_loads;          // every base address and stride allows 16-byte loads
    int smem;               // the dynamic shared memory the launch gave (checked)
    int split;              // keys per split, a multiple of the key tile (checked; unsplit: one
                            // split of Lk rounded up). Split s = blockIdx.x / row tiles sees keys
                            // [s split, (s + 1) split) and writes part s of o, lse, e
    int tiles;              // row tiles per split (grid x = tiles × splits): ⌈Lq / kBr⌉, or
                            // ⌈max_q / kBr⌉ with packed sequences
    int key_extra;          // a bias or mask broadcast over Lq: folded into the per-key terms
    int row_extra;          // unused by these kernels (a bias or mask varying over Lq runs the
                            // row kernel of probabilities.cu instead; NOTES.md, issue 23)
    int pad_;               // (8-byte multiple: the Rust mirror has no trailing padding)
};
