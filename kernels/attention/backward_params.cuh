// backward_params.cuh: the one argument of the backward kernels, mirrored field for field by
// `AttnBwdParams` in src/attention/gpu_backward.rs (#[repr(C)]; pointers, then 64-bit strides,
// then the embedded AttnScoreInputs (8-byte fields), then 4-byte fields, an even number of them: no padding for either side to disagree about), and
// the tile shape both backward kernels share.
#pragma once
#include "params.cuh"
#include "score_inputs.cuh"

struct AttnBwdParams {
    const void* q;          // [B, Hq, Lq, D]
    const void* k;          // [B, Hkv, Lk, D]
    const void* v;          // [B, Hkv, Lk, Dv]
    const void* o;          // [B, Hq, Lq, Dv], the forward's output
    const void* d_o;        // [B, Hq, Lq, Dv]
    void* dq;               // [B, Hq, Lq, D]
    void* dk;               // [B, Hkv, Lk, D]
    void* dv;               // [B, Hkv, Lk, Dv]
    const float* pi_head;   // [Hq] or null (1)
    const float* pi_key;    // [B, Hkv, Lk] or null (1)
    const int* kv_len;      // [B] or null (Lk)
    const float* lse;       // [B, Hq, Lq], the forward's
    const float* e;         // [B, Hq, Lq] or null (needed with d_e)
    const float* d_e;       // [B, Hq, Lq] or null
    float* delta;           // [B, Hq, Lq] workspace: Δ_i, written by the dq kernel
    float* part_head;       // [B, Hq, n_qtiles] workspace: per query tile Σ P_ij / π_h
    float* part_nu;         // [B, Hq, n_qtiles] workspace: per query tile Σ dS_ij ∂s/∂ν
    float* head_nu;         // [Hq] workspace of the reduce kernel
    float* dpi_head;        // [Hq] or null
    float* dpi_key;         // [B, Hkv, Lk] or null
    float* dnu;             // [1], or [Hq] with a per-head ν (in.nu_head), or null
    const float* d_lse;     // [B, Hq, Lq] or null: ∂L/∂lse (Δ_i ← Δ_i − dlse_i)
    float* dbias;           // the bias's shape [bias_n[0], bias_n[1], bias_n[2], Lk] row-major, or null
    long long q_stride[3];  // element strides of B, H, L (the last dimension is contiguous)
    long long k_stride[3];
    long long v_stride[3];
    long long o_stride[3];
    long long do_stride[3];
    long long dq_stride[3];
    long long dk_stride[3];
    long long dv_stride[3];
    AttnScoreInputs in;     // bias, mask, per-head ν, packed sequences (score_inputs.cuh)
    int b, hq, hkv, lq, lk;  // packed sequences: b = 1, lq and lk the packed totals
    int dim_d, dim_dv;      // the real head dims (<= the kernel's kD, kDv: columns past them are 0)
    int family;             // ATTN_*
    float tau;
    float nu;
    int causal;             // bottom-right aligned
    int window;             // 0: none; W >= 1 (causal is set too)
    int normalizer;         // (D/2) ln π in the distance families' scores
    int n_qtiles;           // query tiles of the dq kernel (the partials' last dimension)
    int smem;               // the dynamic shared memory the launch gave (checked)
    int vec_loads;          // q, k, v and dO allow 16-byte loads (base addresses and strides)
    int bias_n[3];          // the bias's B, Hq, Lq sizes (1: broadcast), for dβ
    int seqs;               // packed sequences S (the grids' z), or B
};

// What one pass of the dk/dv kernels accumulates (backward.cuh).
#define ATTN_BWD_BOTH 0
#define ATTN_BWD_DV 1
#define ATTN_BWD_DK 2

// Head dims are compiled in three buckets (64, 128, 256; a smaller dim runs in the next bucket
// with zero columns): nine (D, Dv) pairs per dtype instead of 25, so the build stays short.
#define ATTN_BWD_FOR_EACH_DV(X, D) X(D, 64) X(D, 128) X(D, 256)
#define ATTN_BWD_FOR_EACH_HEAD_DIMS(X) ATTN_BWD_FOR_EACH_DV(X, 64) ATTN_BWD_FOR_EACH_DV(X, 128) ATTN_BWD_FOR_EACH_DV(X, 256)

struct AttnBwdTile {
    int warps, bt, smem;  // warps (16 owned rows each), rows of the streamed tile, shared bytes
};

// Output columns one dk/dv pass accumulates: dk and dv together while they fit (D + Dv <= 256),
// else the larger of the two (two passes, one for dv and dπ_j, one for dk).
constexpr int attn_bwd_cols(int d, int dv) { return d + dv <= 256 ? d + dv : (d > dv ? d : dv); }

// Owned rows A [16 w][D + pad] and Av [16 w][Dv + pad] (q and dO in the dq kernel, k and v in the
// dk/dv kernel), the streamed tile B [bt][D + pad] and Bv [bt][Dv + pad], two coefficient tiles
// [16 w][bt + pad] (the dk/dv kernel's Pᵀ and Mᵀ; the dq kernel uses one, M), rows padded by 16
// bytes; then six float arrays of max(16 w, bt) (per-row and per-key terms).
constexpr int attn_bwd_smem(int size, int d, int dv, int warps, int bt) {
    const int pad = 16 / size, rows = 16 * warps, most = rows > bt ? rows : bt;
    return size * ((rows + bt) * (d + pad + dv + pad) + 2 * rows * (bt + pad)) + 24 * most;
}

// The first candidate within 64 KiB of shared memory (every CDNA LDS) whose score and output
// accumulators stay near 160 registers on NVIDIA (8 per 16 x 16 tile: 2 bt/16 score tiles and
// attn_bwd_cols/16 output tiles; CDNA holds half as many). None for f32 with D = Dv = 256.
constexpr AttnBwdTile attn_bwd_tile(int size, int d, int dv) {
    constexpr int kCandidates[5][2] = {{4, 64}, {4, 32}, {2, 32}, {2, 16}, {1, 16}};
    for (int i = 0; i < 5; ++i) {
        const int w = kCandidates[i][0], bt = kCandidates[i][1];
        const int smem = attn_bwd_smem(size, d, dv, w, bt);
        if (smem <= 65536 && 2 * bt + attn_bwd_cols(d, dv) <= 320) return AttnBwdTile{w, bt, smem};
    }
    return AttnBwdTile{0, 0, 0};
}
