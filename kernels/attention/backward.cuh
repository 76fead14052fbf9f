// backward.cuh: precision-weighted attention, backward (v1), in two kernels that recompute the
// scores from q, k and the forward's lse (FlashAttention-2's scheme) and never sum an output
// with atomics, so two runs give the same bits. The maths (every family's partial derivatives)
// is in src/attention/backward.rs; the notation here follows it:
//
//   ∂L/∂w_ij = dO_i·v_j + dE_i π d²,   Δ_i = dO_i·o_i + dE_i e_i,   dS = w (∂L/∂w − Δ)
//   g = dS ∂s/∂d² + dE w π,   M = dS ∂s/∂x − 2g,   P = dS π∂s/∂π + dE w π d²
//   dq_i = Σ_j M k_j + 2 (Σ_j g) q_i,   dk_j = Σ_i M q_i + 2 (Σ_i g) k_j,   dv_j = Σ_i w dO_i
//
// attn_bwd_dq: one block per (batch, query head, 16 w query rows), a loop over key tiles: Δ for
//   its rows, S = Q Kᵀ and dP = dO Vᵀ on the tensor cores, the
//   element-wise terms, M through shared memory, dq += M K; per block one partial sum of
//   dπ_h (Σ P / π_h) and of dν, summed in a fixed order by attn_bwd_reduce, and Δ corrected
//   for the forward's rounding (Δ' below) for the other kernel.
// attn_bwd_kv: one block per (batch, kv head, 16 w keys), a loop over the group's query heads and
//   their query tiles in order: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, Pᵀ and Mᵀ through shared memory,
//   dv += Pᵀ dO, dk += Mᵀ Q; dπ_j = Σ P / π_j in registers. Each block owns its keys, so the
//   GQA sum is a loop, not an atomic. With D + Dv > 256, attn_bwd_kv does dv and dπ_j and
//   attn_bwd_dk then does dk (the accumulators of both would not fit).
// Both read their operands from shared memory through port/mma.cuh's element functors (v1: the
// fragment path of the forward's v2 is the next step, NOTES.md). Head dims run in buckets
// (64, 128, 256) with zero columns past the real D and Dv.
//
// wave64: the warp's rows, the accumulators' rows and columns, and which lanes share a row come
// from FepMma; reductions take FEP_WARP_SIZE; nothing assumes 32 lanes.
#pragma once
#include "../port/mma.cuh"
#include "../port/reduce.cuh"
#include "backward_params.cuh"
#include "score.cuh"

template <typename In, int kD, int kDv>
struct AttnBwdTraits {
    static constexpr AttnBwdTile kTile = attn_bwd_tile((int)sizeof(In), kD, kDv);
    static_assert(kTile.warps > 0 || sizeof(In) == 4, "every 16-bit head-dim pair has a backward tile");
    static constexpr int kWarps = kTile.warps > 0 ? kTile.warps : 1, kBt = kTile.warps > 0 ? kTile.bt : 16;
    static constexpr int kSmem = kTile.smem;  // 0: no shape fits (f32, D = Dv = 256): never launched
    static constexpr int kRows = 16 * kWarps, kThreads = kWarps * FEP_WARP_SIZE;
    static constexpr int kPad = 16 / (int)sizeof(In);
    static constexpr int kDs = kD + kPad, kDvs = kDv + kPad, kBs = kBt + kPad;
    static constexpr int kMost = kRows > kBt ? kRows : kBt;
};

// `rows` rows (row r at src + r * stride) into shared rows of kLd elements, kCols of them:
// columns at or past `cols` and rows at or past `valid` become zeros. vec: 16-byte loads (every
// head dim is a multiple of 16 bytes' worth of elements, so a chunk never straddles `cols`).
template <typename In, int kCols, int kLd, int kThreads>
FEP_DEVICE void attn_bwd_load(In* dst, const In* src, long long stride, int rows, int valid, int cols, bool vec) {
    if (vec) {
        constexpr int kChunk = 16 / (int)sizeof(In), kChunks = kCols / kChunk;
        // Kept rolled: unrolled, the loads in flight cost the two-pass dk/dv kernels 20 bytes of
        // scratch per lane on gfx942.
#pragma unroll 1
        for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
            const int r = idx / kChunks, c = (idx % kChunks) * kChunk;
            uint4* d = (uint4*)(dst + r * kLd + c);
            if (r < valid && c < cols) {
                *d = *(const uint4*)(src + (long long)r * stride + c);
            } else {
                d->x = 0, d->y = 0, d->z = 0, d->w = 0;
            }
        }
        return;
    }
#pragma unroll 1
    for (int idx = threadIdx.x; idx < rows * kCols; idx += kThreads) {
        const int r = idx / kCols, c = idx % kCols;
        dst[r * kLd + c] = (r < valid && c < cols) ? src[(long long)r * stride + c] : fep_from_f32<In>(0.0f);
    }
}

// The family's constants.
struct AttnBwdScore {
    int family;
    float tau, nu, c, kappa;  // c: the normaliser's D/2 (0 when off or Dot); kappa = (ν + D)/2
};

// One visible (i, j): the softmax weight w and the terms of the gradients (module comment).
struct AttnBwdTerms {
    float w, ds, g, m, pg, dnu;
    float w_nu, w_lnpi;  // w ∂s/∂ν and w π∂s/∂π: the dq kernel's correction of Δ (attn_bwd_dq)
};

// beta: the additive bias β_ij (0 without one), added to the family's score.
FEP_DEVICE AttnBwdTerms attn_bwd_terms(const AttnBwdScore& sc, float x, float d2, float pi, float lse, float dp,
                                       float de, float delta, float beta) {
    float s, s_x = 0.0f, s_d2 = 0.0f, s_lnpi, s_nu = 0.0f;
    const float tp = sc.tau * pi, nl = sc.c != 0.0f ? sc.c * logf(pi) : 0.0f;
    switch (sc.family) {
        case ATTN_DOT:
            s = tp * x, s_x = tp, s_lnpi = s;
            break;
        case ATTN_GAUSSIAN:
            s = -0.5f * tp * d2 + nl, s_d2 = -0.5f * tp, s_lnpi = -0.5f * tp * d2 + sc.c;
            break;
        case ATTN_STUDENT_T: {
            const float a = tp * d2 / sc.nu, l1 = log1pf(a), r = 1.0f / (1.0f + a);
            s = -sc.kappa * l1 + nl;
            s_d2 = -sc.kappa * (tp / sc.nu) * r;
            s_lnpi = -sc.kappa * a * r + sc.c;
            s_nu = -0.5f * l1 + sc.kappa * (a / sc.nu) * r;
            break;
        }
        default: {  // Laplace; d is not differentiable at 0: the subgradient 0 there
            const float rt = sqrtf(tp), dd = sqrtf(d2);
            s = -rt * dd + nl;
            s_d2 = dd > 0.0f ? -0.5f * rt / dd : 0.0f;
            s_lnpi = -0.5f * rt * dd + sc.c;
            break;
        }
    }
    AttnBwdTerms t;
    t.w = expf(s + beta - lse);
    const float ds = t.w * (fmaf(de * pi, d2, dp) - delta);
    t.g = fmaf(ds, s_d2, de * t.w * pi);
    t.m = fmaf(ds, s_x, -2.0f * t.g);
    t.pg = fmaf(ds, s_lnpi, de * t.w * pi * d2);
    t.dnu = ds * s_nu;
    t.ds = ds;
    t.w_nu = t.w * s_nu;
    t.w_lnpi = t.w * s_lnpi;
    return t;
}

// The constants of query head h (Student-t's ν may be per head).
FEP_DEVICE AttnBwdScore attn_bwd_score(const AttnBwdParams& p, int h) {
    AttnBwdScore sc;
    sc.family = p.family;
    sc.tau = p.tau;
    sc.nu = attn_nu_of(p.in, h, p.nu);
    sc.c = p.normalizer && p.family != ATTN_DOT ? 0.5f * (float)p.dim_d : 0.0f;
    sc.kappa = 0.5f * (sc.nu + (float)p.dim_d);
    return sc;
}

// The optional score inputs of (b, h, i, j): β into `beta` (0 without a bias), and whether the
// mask and the bias keep the score (a −∞ bias masks it). Without them only two uniform branches
// on null pointers: the hot loops call this behind a per-kernel flag (`extra`).
FEP_DEVICE bool attn_bwd_extra(const AttnBwdParams& p, int b, int h, int i, int j, float& beta) {
    beta = attn_bias_at(p.in, b, h, i, j);
    return beta != ATTN_NEG_INF && attn_keep_at(p.in, b, h, i, j);
}

// The batch index of the tensors: 0 for packed sequences (B = 1, sequence b at rows offset by
// attn_seq), else the grid's b.
FEP_DEVICE int attn_bwd_tensor_b(const AttnBwdParams& p, int b) { return p.in.cu_q ? 0 : b; }

// Whether query i sees key j (besides the key length and lse): the causal diagonal and the window.
FEP_DEVICE bool attn_bwd_visible(const AttnBwdParams& p, int i, int j, int off) {
    if (p.causal && j > i + off) return false;
    return !(p.window > 0 && j <= i + off - p.window);
}

// acc = 0.
template <int NT>
FEP_DEVICE void attn_bwd_zero(float (&acc)[NT][FEP_MMA_ACC]) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < FEP_MMA_ACC; ++i) acc[t][i] = 0.0f;
}

// One tile's x = A Bᵀ over kD and dp = C Eᵀ over kDv (S and dP, or Sᵀ and dPᵀ), from zero.
template <typename In, int kD, int kDv, int NT, typename FA, typename FB, typename FC, typename FE>
FEP_DEVICE void attn_bwd_products(float (&x)[NT][FEP_MMA_ACC], float (&dp)[NT][FEP_MMA_ACC], const FA& a,
                                  const FB& b, const FC& c, const FE& e) {
    attn_bwd_zero(x);
    attn_bwd_zero(dp);
#pragma unroll 1
    for (int k0 = 0; k0 < kD; k0 += FepMma<In>::kK) fep_mma_run_accurate<In, NT>(x, a, b, k0);
#pragma unroll 1
    for (int k0 = 0; k0 < kDv; k0 += FepMma<In>::kK) fep_mma_run_accurate<In, NT>(dp, c, e, k0);
}

template <typename In, int kD, int kDv>
FEP_DEVICE void attn_bwd_dq(const AttnBwdParams& p) {
    using Tr = AttnBwdTraits<In, kD, kDv>;
    using Mma = FepMma<In>;
    constexpr int kNT = Tr::kBt / 16, kND = kD / 16, kAcc = FEP_MMA_ACC, kSlots = Mma::kRowSlots;
    FEP_DYNAMIC_SMEM(uint4, smem);
    if (Tr::kSmem == 0 || p.smem != Tr::kSmem || (int)blockDim.x != Tr::kThreads) return;
    In* sq = (In*)smem;
    In* sdo = sq + Tr::kRows * Tr::kDs;
    In* sk = sdo + Tr::kRows * Tr::kDvs;
    In* sv = sk + Tr::kBt * Tr::kDs;
    In* sm = sv + Tr::kBt * Tr::kDvs;  // M [kRows][kBs]
    float* f = (float*)(sm + 2 * Tr::kRows * Tr::kBs);
    float *r_lse = f, *r_delta = f + Tr::kMost, *r_de = f + 2 * Tr::kMost, *r_qn = f + 3 * Tr::kMost;
    float *k_n = f + 4 * Tr::kMost, *k_pi = f + 5 * Tr::kMost;
    __shared__ float red[2 * FEP_MAX_WARPS];

    // b: the batch, or with packed sequences the sequence (bt = 0 then indexes the tensors, and
    // rows and keys start at the sequence's q0 and k0; sq_.lq and sq_.lk are its lengths).
    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * Tr::kRows, bt = attn_bwd_tensor_b(p, b);
    const AttnSeq sq_ = attn_seq(p.in, b, p.lq, p.lk);
    const int hk = h / (p.hq / p.hkv), off = sq_.lk - sq_.lq;
    const int kv_end = p.kv_len ? min(max(p.kv_len[b], 0), sq_.lk) : sq_.lk;
    const int i_last = min(i0 + Tr::kRows, sq_.lq) - 1;
    // A block past its sequence's rows (packed sequences) visits no key tile; it still runs to
    // the end, which writes its zero partials (an early return cost gfx942 scratch).
    const int j_end = i_last < i0 ? 0 : (p.causal ? min(kv_end, i_last + off + 1) : kv_end);
    const int j_begin = p.window > 0 ? max(0, i0 + off - p.window + 1) : 0;
    const long long qr = (long long)sq_.q0 + i0, kr0 = sq_.k0;  // the first packed query row and key
    const In* qg = (const In*)p.q + bt * p.q_stride[0] + h * p.q_stride[1] + qr * p.q_stride[2];
    const In* dog = (const In*)p.d_o + bt * p.do_stride[0] + h * p.do_stride[1] + qr * p.do_stride[2];
    const In* og = (const In*)p.o + bt * p.o_stride[0] + h * p.o_stride[1] + qr * p.o_stride[2];
    const In* kg = (const In*)p.k + bt * p.k_stride[0] + hk * p.k_stride[1] + kr0 * p.k_stride[2];
    const In* vg = (const In*)p.v + bt * p.v_stride[0] + hk * p.v_stride[1] + kr0 * p.v_stride[2];
    const float* pik = p.pi_key ? p.pi_key + ((long long)bt * p.hkv + hk) * p.lk + kr0 : nullptr;
    const float pi_h = p.pi_head ? p.pi_head[h] : 1.0f;
    const long long row0 = ((long long)bt * p.hq + h) * p.lq + qr;
    const int warp = (int)fep_warp_id(), lane = (int)fep_lane();
    const AttnBwdScore sc = attn_bwd_score(p, h);
    const bool vec = p.vec_loads != 0, extra = p.in.bias || p.in.mask;

    attn_bwd_load<In, kD, Tr::kDs, Tr::kThreads>(sq, qg, p.q_stride[2], Tr::kRows, sq_.lq - i0, p.dim_d, vec);
    attn_bwd_load<In, kDv, Tr::kDvs, Tr::kThreads>(sdo, dog, p.do_stride[2], Tr::kRows, sq_.lq - i0, p.dim_dv, vec);
    __syncthreads();
    // Per row: Δ = dO·o + dE e − dlse (also for the dk/dv kernel), ‖q‖², lse, dE.
    for (int r = threadIdx.x; r < Tr::kRows; r += Tr::kThreads) {
        float delta = 0.0f, qn = 0.0f, lse = ATTN_NEG_INF, de = 0.0f;
        if (i0 + r < sq_.lq) {
            const In* orow = og + (long long)r * p.o_stride[2];
            for (int c = 0; c < p.dim_dv; ++c) delta = fmaf(fep_to_f32(sdo[r * Tr::kDvs + c]), fep_to_f32(orow[c]), delta);
            if (p.d_e) de = p.d_e[row0 + r], delta = fmaf(de, p.e[row0 + r], delta);
            if (p.d_lse) delta -= p.d_lse[row0 + r];
            for (int c = 0; c < p.dim_d; ++c) qn = fmaf(fep_to_f32(sq[r * Tr::kDs + c]), fep_to_f32(sq[r * Tr::kDs + c]), qn);
            lse = p.lse[row0 + r];
        }
        r_delta[r] = delta, r_qn[r] = qn, r_lse[r] = lse, r_de[r] = de;
    }
    __syncthreads();  // the row terms are read by other lanes, also when no key tile follows

    const In* qs = sq + warp * 16 * Tr::kDs;  // this warp's 16 rows
    const In* dos = sdo + warp * 16 * Tr::kDvs;
    In* ms = sm + warp * 16 * Tr::kBs;
    float dq[kND][kAcc];
    attn_bwd_zero(dq);
    // Per row (slot): Σ g; Σ P and Σ dS ∂s/∂ν (the scalar gradients' terms); and for the
    // correction of Δ: Σ dS, Σ w, Σ w ∂s/∂ν, Σ w π∂s/∂π. Δ from dO·o carries the forward's
    // rounding, so Σ_j dS_ij is not exactly 0; Δ' = Δ + Σ dS / Σ w is Δ as the weights used here
    // see it. dq and dk barely notice, but dπ_h and dν sum rows whose terms cancel (Σ_j dS_ij = 0)
    // and would keep every row's error: their rows are corrected to Δ', and the dk/dv kernel reads Δ'.
    float gsum[kSlots], hsum[kSlots], nsum[kSlots], asum[kSlots], wsum[kSlots], bsum[kSlots], csum[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
        gsum[s] = 0.0f, hsum[s] = 0.0f, nsum[s] = 0.0f, asum[s] = 0.0f, wsum[s] = 0.0f, bsum[s] = 0.0f, csum[s] = 0.0f;

    auto aq = [&](int r, int k) { return qs[r * Tr::kDs + k]; };
    auto bk = [&](int c, int k) { return sk[c * Tr::kDs + k]; };
    auto ado = [&](int r, int k) { return dos[r * Tr::kDvs + k]; };
    auto bv = [&](int c, int k) { return sv[c * Tr::kDvs + k]; };
    auto am = [&](int r, int k) { return ms[r * Tr::kBs + k]; };
    auto bkt = [&](int c, int k) { return sk[k * Tr::kDs + c]; };

    for (int j0 = (j_begin / Tr::kBt) * Tr::kBt; j0 < j_end; j0 += Tr::kBt) {
        __syncthreads();  // the previous tile's K, V, M and key terms are consumed
        attn_bwd_load<In, kD, Tr::kDs, Tr::kThreads>(sk, kg + (long long)j0 * p.k_stride[2], p.k_stride[2], Tr::kBt,
                                                     kv_end - j0, p.dim_d, vec);
        attn_bwd_load<In, kDv, Tr::kDvs, Tr::kThreads>(sv, vg + (long long)j0 * p.v_stride[2], p.v_stride[2],
                                                       Tr::kBt, kv_end - j0, p.dim_dv, vec);
        __syncthreads();
        for (int c = threadIdx.x; c < Tr::kBt; c += Tr::kThreads) {
            float n = 0.0f;
            for (int d = 0; d < p.dim_d; ++d) n = fmaf(fep_to_f32(sk[c * Tr::kDs + d]), fep_to_f32(sk[c * Tr::kDs + d]), n);
            k_n[c] = n;
            k_pi[c] = pi_h * (pik && j0 + c < kv_end ? pik[j0 + c] : 1.0f);
        }
        __syncthreads();

        float x[kNT][kAcc], dp[kNT][kAcc];
        attn_bwd_products<In, kD, kDv>(x, dp, aq, bk, ado, bv);

#pragma unroll
        for (int t = 0; t < kNT; ++t) {
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), sl = Mma::row_slot(i);
                const int rr = warp * 16 + r, row = i0 + rr, j = j0 + c;
                const float lse = r_lse[rr];
                float m = 0.0f, beta = 0.0f;
                if (row < sq_.lq && j < kv_end && j >= j_begin && lse != ATTN_NEG_INF && attn_bwd_visible(p, row, j, off) &&
                    (!extra || attn_bwd_extra(p, b, h, row, j, beta))) {
                    const float d2 = fmaxf(fmaf(-2.0f, x[t][i], r_qn[rr] + k_n[c]), 0.0f);
                    const AttnBwdTerms tm =
                        attn_bwd_terms(sc, x[t][i], d2, k_pi[c], lse, dp[t][i], r_de[rr], r_delta[rr], beta);
                    m = tm.m;
                    gsum[sl] += tm.g;
                    hsum[sl] += tm.pg;
                    nsum[sl] += tm.dnu;
                    asum[sl] += tm.ds;
                    wsum[sl] += tm.w;
                    bsum[sl] += tm.w_nu;
                    csum[sl] += tm.w_lnpi;
                }
                ms[r * Tr::kBs + c] = fep_from_f32<In>(m);
            }
        }
        __syncthreads();  // M rows are read by other lanes of the warp
#pragma unroll 1
        for (int k0 = 0; k0 < Tr::kBt; k0 += Mma::kK) fep_mma_run_accurate<In, kND>(dq, am, bkt, k0);
    }

    // dq = Σ M k + 2 (Σ g) q.
    float head_part = 0.0f, nu_part = 0.0f;  // this lane's share of the block's partial sums
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
        gsum[s] = Mma::row_allreduce(gsum[s], FepSum());
        const float a = Mma::row_allreduce(asum[s], FepSum()), w = Mma::row_allreduce(wsum[s], FepSum());
        const float h = Mma::row_allreduce(hsum[s], FepSum()), n = Mma::row_allreduce(nsum[s], FepSum());
        const float b = Mma::row_allreduce(bsum[s], FepSum()), c = Mma::row_allreduce(csum[s], FepSum());
        // Δ' − Δ: with d_lse, Σ_j dS_ij = dlse_i Σ_j w_ij, so the rounding is what exceeds that.
        const int srow = i0 + warp * 16 + Mma::slot_row(lane, s);
        const float dl = p.d_lse && srow < sq_.lq ? p.d_lse[row0 - i0 + srow] : 0.0f;
        const float shift = w > 0.0f ? a / w - dl : 0.0f;
        // One lane per row adds the row's corrected sums (the row's lanes differ in the low bits).
        if (lane % Mma::kRowLanes == 0) {
            head_part += (h - shift * c) / pi_h;
            nu_part += n - shift * b;
            if (srow < sq_.lq) p.delta[row0 - i0 + srow] = r_delta[srow - i0] + shift;
        }
    }
    In* dqg = (In*)p.dq + bt * p.dq_stride[0] + h * p.dq_stride[1] + (long long)sq_.q0 * p.dq_stride[2];
#pragma unroll
    for (int t = 0; t < kND; ++t) {
#pragma unroll
        for (int i = 0; i < kAcc; ++i) {
            const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), row = i0 + warp * 16 + r;
            if (row < sq_.lq && c < p.dim_d) {
                const float v = fmaf(2.0f * gsum[Mma::row_slot(i)], fep_to_f32(qs[r * Tr::kDs + c]), dq[t][i]);
                dqg[(long long)row * p.dq_stride[2] + c] = fep_from_f32<In>(v);
            }
        }
    }
    // The block's partial sums, in a fixed order (butterfly per warp, then warps in order).
    head_part = warp_allreduce<FEP_WARP_SIZE>(head_part, FepSum());
    nu_part = warp_allreduce<FEP_WARP_SIZE>(nu_part, FepSum());
    if (lane == 0) red[warp] = head_part, red[FEP_MAX_WARPS + warp] = nu_part;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sh = 0.0f, sn = 0.0f;
        for (int w = 0; w < Tr::kWarps; ++w) sh += red[w], sn += red[FEP_MAX_WARPS + w];
        const long long at = ((long long)b * p.hq + h) * p.n_qtiles + blockIdx.x;
        p.part_head[at] = sh;
        p.part_nu[at] = sn;
    }
}

// One pass of the dk/dv kernel: kPass says which of dv (and dπ_j) and dk it accumulates.
template <typename In, int kD, int kDv, int kPass>
FEP_DEVICE void attn_bwd_kv_pass(const AttnBwdParams& p) {
    using Tr = AttnBwdTraits<In, kD, kDv>;
    using Mma = FepMma<In>;
    constexpr bool kDV = kPass != ATTN_BWD_DK, kDK = kPass != ATTN_BWD_DV;
    constexpr int kNT = Tr::kBt / 16, kAcc = FEP_MMA_ACC, kSlots = Mma::kRowSlots;
    constexpr int kNK = kDK ? kD / 16 : 1, kNV = kDV ? kDv / 16 : 1;  // 1: an unused tile
    FEP_DYNAMIC_SMEM(uint4, smem);
    In* sk = (In*)smem;
    In* sv = sk + Tr::kRows * Tr::kDs;
    In* sq = sv + Tr::kRows * Tr::kDvs;
    In* sdo = sq + Tr::kBt * Tr::kDs;
    In* spt = sdo + Tr::kBt * Tr::kDvs;   // Pᵀ [kRows][kBs]
    In* smt = spt + Tr::kRows * Tr::kBs;  // Mᵀ [kRows][kBs]
    float* f = (float*)(smt + Tr::kRows * Tr::kBs);
    float *q_lse = f, *q_delta = f + Tr::kMost, *q_de = f + 2 * Tr::kMost, *q_n = f + 3 * Tr::kMost;
    float *k_n = f + 4 * Tr::kMost, *k_pi = f + 5 * Tr::kMost;

    // b: the batch or the packed sequence (as in attn_bwd_dq); a block past the sequence's keys
    // has nothing to write (those key rows belong to the next sequence).
    const int b = blockIdx.z, hk = blockIdx.y, j0 = blockIdx.x * Tr::kRows, bt = attn_bwd_tensor_b(p, b);
    const AttnSeq sq_ = attn_seq(p.in, b, p.lq, p.lk);
    if (j0 >= sq_.lk) return;
    const int group = p.hq / p.hkv, off = sq_.lk - sq_.lq;
    const int kv_end = p.kv_len ? min(max(p.kv_len[b], 0), sq_.lk) : sq_.lk;
    const int j_last = min(j0 + Tr::kRows, kv_end) - 1;  // the block's last live key
    // The queries that see one of the block's keys: i >= j - off (causal), i < j + W - off (window).
    const int i_begin = p.causal ? max(0, j0 - off) : 0;
    const int i_end = j_last < j0 ? 0 : (p.window > 0 ? min(sq_.lq, j_last - off + p.window) : sq_.lq);
    const long long krow = (long long)sq_.k0 + j0;  // the block's first packed key row
    const In* kg = (const In*)p.k + bt * p.k_stride[0] + hk * p.k_stride[1] + krow * p.k_stride[2];
    const In* vg = (const In*)p.v + bt * p.v_stride[0] + hk * p.v_stride[1] + krow * p.v_stride[2];
    const float* pik = p.pi_key ? p.pi_key + ((long long)bt * p.hkv + hk) * p.lk + sq_.k0 : nullptr;
    const int warp = (int)fep_warp_id(), lane = (int)fep_lane();
    const bool vec = p.vec_loads != 0, extra = p.in.bias || p.in.mask;

    attn_bwd_load<In, kD, Tr::kDs, Tr::kThreads>(sk, kg, p.k_stride[2], Tr::kRows, kv_end - j0, p.dim_d, vec);
    attn_bwd_load<In, kDv, Tr::kDvs, Tr::kThreads>(sv, vg, p.v_stride[2], Tr::kRows, kv_end - j0, p.dim_dv, vec);
    __syncthreads();
    for (int r = threadIdx.x; r < Tr::kRows; r += Tr::kThreads) {
        float n = 0.0f;
        for (int d = 0; d < p.dim_d; ++d) n = fmaf(fep_to_f32(sk[r * Tr::kDs + d]), fep_to_f32(sk[r * Tr::kDs + d]), n);
        k_n[r] = n;
        k_pi[r] = pik && j0 + r < kv_end ? pik[j0 + r] : 1.0f;
    }
    __syncthreads();  // the key terms are read by other lanes, also when no query tile follows

    const In* ks = sk + warp * 16 * Tr::kDs;  // this warp's 16 keys
    const In* vs = sv + warp * 16 * Tr::kDvs;
    In* pts = spt + warp * 16 * Tr::kBs;
    In* mts = smt + warp * 16 * Tr::kBs;
    float dk[kNK][kAcc], dv[kNV][kAcc], gsum[kSlots], psum[kSlots];
    attn_bwd_zero(dk);
    attn_bwd_zero(dv);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) gsum[s] = 0.0f, psum[s] = 0.0f;

    auto ak = [&](int r, int k) { return ks[r * Tr::kDs + k]; };
    auto bq = [&](int c, int k) { return sq[c * Tr::kDs + k]; };
    auto av = [&](int r, int k) { return vs[r * Tr::kDvs + k]; };
    auto bdo = [&](int c, int k) { return sdo[c * Tr::kDvs + k]; };
    auto apt = [&](int r, int k) { return pts[r * Tr::kBs + k]; };
    auto amt = [&](int r, int k) { return mts[r * Tr::kBs + k]; };
    auto bdot = [&](int c, int k) { return sdo[k * Tr::kDvs + c]; };
    auto bqt = [&](int c, int k) { return sq[k * Tr::kDs + c]; };

    // The group's query heads in order, each over its query tiles in order: a fixed summation order.
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const float pi_h = p.pi_head ? p.pi_head[h] : 1.0f;
        const AttnBwdScore sc = attn_bwd_score(p, h);
        const long long qr = sq_.q0;  // the sequence's first packed query row
        const In* qg = (const In*)p.q + bt * p.q_stride[0] + h * p.q_stride[1] + qr * p.q_stride[2];
        const In* dog = (const In*)p.d_o + bt * p.do_stride[0] + h * p.do_stride[1] + qr * p.do_stride[2];
        const long long rows0 = ((long long)bt * p.hq + h) * p.lq + qr;
        for (int i0 = (i_begin / Tr::kBt) * Tr::kBt; i0 < i_end; i0 += Tr::kBt) {
            __syncthreads();  // the previous tile's Q, dO, Pᵀ, Mᵀ and row terms are consumed
            attn_bwd_load<In, kD, Tr::kDs, Tr::kThreads>(sq, qg + (long long)i0 * p.q_stride[2], p.q_stride[2],
                                                         Tr::kBt, sq_.lq - i0, p.dim_d, vec);
            attn_bwd_load<In, kDv, Tr::kDvs, Tr::kThreads>(sdo, dog + (long long)i0 * p.do_stride[2],
                                                           p.do_stride[2], Tr::kBt, sq_.lq - i0, p.dim_dv, vec);
            __syncthreads();
            for (int c = threadIdx.x; c < Tr::kBt; c += Tr::kThreads) {
                const bool live = i0 + c < sq_.lq;
                float n = 0.0f;
                for (int d = 0; d < p.dim_d; ++d) n = fmaf(fep_to_f32(sq[c * Tr::kDs + d]), fep_to_f32(sq[c * Tr::kDs + d]), n);
                q_n[c] = n;
                q_lse[c] = live ? p.lse[rows0 + i0 + c] : ATTN_NEG_INF;
                q_delta[c] = live ? p.delta[rows0 + i0 + c] : 0.0f;
                q_de[c] = live && p.d_e ? p.d_e[rows0 + i0 + c] : 0.0f;
            }
            __syncthreads();

            float x[kNT][kAcc], dp[kNT][kAcc];
            attn_bwd_products<In, kD, kDv>(x, dp, ak, bq, av, bdo);

#pragma unroll
            for (int t = 0; t < kNT; ++t) {
#pragma unroll
                for (int i = 0; i < kAcc; ++i) {
                    const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), sl = Mma::row_slot(i);
                    const int kr = warp * 16 + r, j = j0 + kr, row = i0 + c;
                    const float lse = q_lse[c];
                    float w = 0.0f, m = 0.0f, beta = 0.0f;
                    if (j < kv_end && lse != ATTN_NEG_INF && attn_bwd_visible(p, row, j, off) &&
                        (!extra || attn_bwd_extra(p, b, h, row, j, beta))) {
                        const float d2 = fmaxf(fmaf(-2.0f, x[t][i], q_n[c] + k_n[kr]), 0.0f);
                        const AttnBwdTerms tm = attn_bwd_terms(sc, x[t][i], d2, pi_h * k_pi[kr], lse, dp[t][i], q_de[c],
                                                               q_delta[c], beta);
                        w = tm.w, m = tm.m;
                        gsum[sl] += tm.g;
                        psum[sl] += tm.pg;
                    }
                    if constexpr (kDV) pts[r * Tr::kBs + c] = fep_from_f32<In>(w);
                    if constexpr (kDK) mts[r * Tr::kBs + c] = fep_from_f32<In>(m);
                }
            }
            __syncthreads();  // Pᵀ and Mᵀ rows are read by other lanes of the warp
            if constexpr (kDV) {
#pragma unroll 1
                for (int k0 = 0; k0 < Tr::kBt; k0 += Mma::kK) fep_mma_run_accurate<In, kNV>(dv, apt, bdot, k0);
            }
            if constexpr (kDK) {
#pragma unroll 1
                for (int k0 = 0; k0 < Tr::kBt; k0 += Mma::kK) fep_mma_run_accurate<In, kNK>(dk, amt, bqt, k0);
            }
        }
    }

#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
        gsum[s] = Mma::row_allreduce(gsum[s], FepSum());
        psum[s] = Mma::row_allreduce(psum[s], FepSum());
    }
    // Every key of the block is written (keys past the key length get zeros).
    if constexpr (kDV) {
        In* dvg = (In*)p.dv + bt * p.dv_stride[0] + hk * p.dv_stride[1] + (long long)sq_.k0 * p.dv_stride[2];
#pragma unroll
        for (int t = 0; t < kNV; ++t) {
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), j = j0 + warp * 16 + r;
                if (j < sq_.lk && c < p.dim_dv) dvg[(long long)j * p.dv_stride[2] + c] = fep_from_f32<In>(dv[t][i]);
            }
        }
        if (p.dpi_key) {
            float* dpk = p.dpi_key + ((long long)bt * p.hkv + hk) * p.lk + sq_.k0;
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int r = Mma::acc_row(lane, i), kr = warp * 16 + r, j = j0 + kr;
                if (Mma::acc_col(lane, i) == 0 && j < sq_.lk) dpk[j] = psum[Mma::row_slot(i)] / k_pi[kr];
            }
        }
    }
    if constexpr (kDK) {
        In* dkg = (In*)p.dk + bt * p.dk_stride[0] + hk * p.dk_stride[1] + (long long)sq_.k0 * p.dk_stride[2];
#pragma unroll
        for (int t = 0; t < kNK; ++t) {
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), j = j0 + warp * 16 + r;
                if (j < sq_.lk && c < p.dim_d) {
                    const float v = fmaf(2.0f * gsum[Mma::row_slot(i)], fep_to_f32(ks[r * Tr::kDs + c]), dk[t][i]);
                    dkg[(long long)j * p.dk_stride[2] + c] = fep_from_f32<In>(v);
                }
            }
        }
    }
}

// The dk/dv kernel: both at once when D + Dv <= 256, else the dv pass (and dπ_j); attn_bwd_dk
// is then the dk pass. Two kernels rather than one with a run-time pass: one kernel holding both
// passes needed 20 bytes of scratch per lane on gfx942 (f16 D = 128, Dv = 256).
template <typename In, int kD, int kDv>
FEP_DEVICE void attn_bwd_kv(const AttnBwdParams& p) {
    using Tr = AttnBwdTraits<In, kD, kDv>;
    if (Tr::kSmem == 0 || p.smem != Tr::kSmem || (int)blockDim.x != Tr::kThreads) return;
    attn_bwd_kv_pass<In, kD, kDv, kD + kDv <= 256 ? ATTN_BWD_BOTH : ATTN_BWD_DV>(p);
}

template <typename In, int kD, int kDv>
FEP_DEVICE void attn_bwd_dk(const AttnBwdParams& p) {
    using Tr = AttnBwdTraits<In, kD, kDv>;
    if (Tr::kSmem == 0 || p.smem != Tr::kSmem || (int)blockDim.x != Tr::kThreads) return;
    if constexpr (kD + kDv > 256) attn_bwd_kv_pass<In, kD, kDv, ATTN_BWD_DK>(p);  // else never launched
}

// Instantiations: attn_bwd_{dq,kv,dk}_<dtype>_d<D>_v<Dv> for the head-dim buckets
// (backward_<dtype>.cu).
#define ATTN_BWD_KERNELS(TYPE, NAME, D, DV)                                                               \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS((AttnBwdTraits<TYPE, D, DV>::kThreads)) attn_bwd_dq_##NAME##_d##D##_v##DV( \
        AttnBwdParams p) {                                                                                \
        attn_bwd_dq<TYPE, D, DV>(p);                                                                      \
    }                                                                                                     \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS((AttnBwdTraits<TYPE, D, DV>::kThreads)) attn_bwd_kv_##NAME##_d##D##_v##DV( \
        AttnBwdParams p) {                                                                                \
        attn_bwd_kv<TYPE, D, DV>(p);                                                                      \
    }                                                                                                     \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS((AttnBwdTraits<TYPE, D, DV>::kThreads)) attn_bwd_dk_##NAME##_d##D##_v##DV( \
        AttnBwdParams p) {                                                                                \
        attn_bwd_dk<TYPE, D, DV>(p);                                                                      \
    }
