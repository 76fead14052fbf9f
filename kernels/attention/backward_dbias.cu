// backward_dbias.cu: dβ, the gradient of the additive bias (DESIGN.md §4.1), deterministic and
// without atomics. A bias element (b', h', i', j) is broadcast to every (b, h, i) whose
// broadcast dimensions it covers (all B when its B is 1, and so on); its gradient is the sum of
//   dS_bhij = w_ij (dO_i·v_j + dE_i π_ij d²_ij − Δ'_i)
// over them, with Δ' the dq kernel's corrected Δ from the workspace (it includes −dlse_i).
//
// attn_bwd_dbias_<dtype>: one block per (bias row i' and tile of ATTN_BWD_DBIAS_THREADS keys,
// bias head h', bias batch b'), one thread per key. The block walks the (b, h, i) mapped onto
// its bias row in a fixed order (b, then h, then i), stages q_i and dO_i in shared memory as f32,
// recomputes s, w and dS for its keys, accumulates in a register, and writes each dβ element
// once: the same bits on every run. Launched after attn_bwd_dq (which writes Δ').
// v1 computes q·k, d² and dO·v with scalar FMAs; the cost is counted in NOTES.md ("Backward
// with bias/mask, dβ, d_lse, per-head ν, varlen").
//
// wave64: the block is 64 threads (one CDNA wave, two NVIDIA warps); nothing depends on how
// they split into warps (no warp-level operation at all).
#include "backward.cuh"

#define ATTN_BWD_DBIAS_THREADS 64
#define ATTN_BWD_DBIAS_MAX_DIM 256  // the largest head dim (HEAD_DIMS)

// x = q·k, d² = ‖q − k‖² and dp = dO·v of one key against the staged row.
template <typename In>
FEP_DEVICE void attn_bwd_dbias_dots(const AttnBwdParams& p, const float* sq, const float* sdo, const In* kj,
                                    const In* vj, float& x, float& d2, float& dp) {
    x = 0.0f, d2 = 0.0f, dp = 0.0f;
    for (int c = 0; c < p.dim_d; ++c) {
        const float kc = fep_to_f32(kj[c]), dd = sq[c] - kc;
        x = fmaf(sq[c], kc, x);
        d2 = fmaf(dd, dd, d2);
    }
    for (int c = 0; c < p.dim_dv; ++c) dp = fmaf(sdo[c], fep_to_f32(vj[c]), dp);
}

// dS of key j against the rows i_lo..i_hi of (b, h), summed in row order.
template <typename In>
FEP_DEVICE float attn_bwd_dbias_rows(const AttnBwdParams& p, int b, int h, int i_lo, int i_hi, int j, float* sq,
                                     float* sdo) {
    const int hk = h / (p.hq / p.hkv), off = p.lk - p.lq;
    const int kv_end = p.kv_len ? min(max(p.kv_len[b], 0), p.lk) : p.lk;
    const bool live = j < kv_end;
    const AttnBwdScore sc = attn_bwd_score(p, h);
    const float pi_h = p.pi_head ? p.pi_head[h] : 1.0f;
    const float pi = live && p.pi_key ? pi_h * p.pi_key[((long long)b * p.hkv + hk) * p.lk + j] : pi_h;
    const In* kj = (const In*)p.k + b * p.k_stride[0] + hk * p.k_stride[1] + (long long)(live ? j : 0) * p.k_stride[2];
    const In* vj = (const In*)p.v + b * p.v_stride[0] + hk * p.v_stride[1] + (long long)(live ? j : 0) * p.v_stride[2];
    const In* qg = (const In*)p.q + b * p.q_stride[0] + h * p.q_stride[1];
    const In* dog = (const In*)p.d_o + b * p.do_stride[0] + h * p.do_stride[1];
    float acc = 0.0f;
    for (int i = i_lo; i < i_hi; ++i) {
        const long long row = ((long long)b * p.hq + h) * p.lq + i;
        const float lse = p.lse[row];
        if (lse == ATTN_NEG_INF) continue;  // the same for every thread: no key visible
        __syncthreads();                    // the previous row is consumed
        for (int c = threadIdx.x; c < p.dim_d; c += blockDim.x) sq[c] = fep_to_f32(qg[(long long)i * p.q_stride[2] + c]);
        for (int c = threadIdx.x; c < p.dim_dv; c += blockDim.x) sdo[c] = fep_to_f32(dog[(long long)i * p.do_stride[2] + c]);
        __syncthreads();
        float beta = 0.0f;
        if (!live || !attn_bwd_visible(p, i, j, off) || !attn_bwd_extra(p, b, h, i, j, beta)) continue;
        float x, d2, dp;
        attn_bwd_dbias_dots<In>(p, sq, sdo, kj, vj, x, d2, dp);
        const float de = p.d_e ? p.d_e[row] : 0.0f;
        acc += attn_bwd_terms(sc, x, d2, pi, lse, dp, de, p.delta[row], beta).ds;
    }
    return acc;
}

template <typename In>
FEP_DEVICE void attn_bwd_dbias(const AttnBwdParams& p) {
    __shared__ float sq[ATTN_BWD_DBIAS_MAX_DIM], sdo[ATTN_BWD_DBIAS_MAX_DIM];
    if ((int)blockDim.x != ATTN_BWD_DBIAS_THREADS) return;
    const int tiles = (p.lk + ATTN_BWD_DBIAS_THREADS - 1) / ATTN_BWD_DBIAS_THREADS;
    const int ip = blockIdx.x / tiles, hp = blockIdx.y, bp = blockIdx.z;
    const int j = (blockIdx.x % tiles) * ATTN_BWD_DBIAS_THREADS + threadIdx.x;
    // The batches, heads and rows this bias row stands for (all of a broadcast dimension).
    const int b_lo = p.bias_n[0] == 1 ? 0 : bp, b_hi = p.bias_n[0] == 1 ? p.b : bp + 1;
    const int h_lo = p.bias_n[1] == 1 ? 0 : hp, h_hi = p.bias_n[1] == 1 ? p.hq : hp + 1;
    const int i_lo = p.bias_n[2] == 1 ? 0 : ip, i_hi = p.bias_n[2] == 1 ? p.lq : ip + 1;
    float acc = 0.0f;
    for (int b = b_lo; b < b_hi; ++b)
        for (int h = h_lo; h < h_hi; ++h) acc += attn_bwd_dbias_rows<In>(p, b, h, i_lo, i_hi, j, sq, sdo);
    if (j < p.lk) p.dbias[(((long long)bp * p.bias_n[1] + hp) * p.bias_n[2] + ip) * p.lk + j] = acc;
}

#define ATTN_BWD_DBIAS(TYPE, NAME) \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_BWD_DBIAS_THREADS) attn_bwd_dbias_##NAME(AttnBwdParams p) { attn_bwd_dbias<TYPE>(p); }
ATTN_BWD_DBIAS(float, f32)
ATTN_BWD_DBIAS(fep_f16, f16)
ATTN_BWD_DBIAS(fep_bf16, bf16)
