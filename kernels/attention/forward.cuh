// forward.cuh: precision-weighted attention, forward, one (batch, query head, kBr query rows)
// block at a time (DESIGN.md §4.1; the maths and its reference: src/attention/{mod,cpu}.rs).
//
// Per key tile of kBc keys:
//   1. K and V rows into shared memory (rows past the batch's key length are zeros), then one
//      thread per key computes the per-key terms: ‖k_j‖², π_ij = π_h π_j, and the score's
//      multiplier a_j and bias b_j in base-2 units (b_j = −∞ for a key past the key length, so
//      the length mask costs nothing per score).
//   2. x = q·k on the tensor cores (port/mma.cuh), then per score, with d² = ‖q‖² + ‖k‖² − 2x
//      clamped at 0 (rounding can push it below):
//        Dot        s = a_j x + b_j                    a = τπ log2(e)
//        Gaussian   s = a_j (x − ½‖q‖²) + b_j          b = −½ a ‖k_j‖² + N_j; with one
//                                                      precision per row the ‖q‖² term is a
//                                                      constant of the row: dropped here and
//                                                      added to lse (Dot plus a per-key bias)
//        Student-t  s = −((ν + D)/2) log2(1 + a_j d²) + b_j     a = τπ/ν,  b = N_j
//        Laplace    s = −a_j √d² + b_j                 a = √(τπ) log2(e),  b = N_j
//      with N_j = (D/2) log2 π_ij when the normaliser is on; causal and window masks per score
//      only in tiles that cross the diagonal or the window's edge.
//   3. Online softmax in base 2: row max over the lanes holding the row, rescale of o, l and e
//      by 2^(m_old − m_new); p = 2^(s − m) into the warp's P rows in shared memory.
//   4. o += P V on the tensor cores.
// A row that saw no visible key keeps l = 0 and ends with o = 0, lse = −∞, e = 0.
//
// wave64: nothing here depends on the warp size; the accumulator layout (which rows and columns
// a lane holds, which lanes share a row) comes from FepMma.
#pragma once
#include "../port/mma.cuh"
#include "../port/reduce.cuh"
#include "score.cuh"
#include "traits.cuh"

// `rows` rows of kCols elements (row r at src + r * stride) into shared memory rows of kDs
// elements; rows at or past `valid` become zeros (never read: a masked key's v must be 0, not
// whatever padding holds, since its weight 0 times NaN is NaN).
template <typename In, int kCols, int kDs, int kThreads>
FEP_DEVICE void attn_load_rows(In* dst, const In* src, long long stride, int rows, int valid, bool vec) {
    if (vec) {
        constexpr int kChunk = 16 / (int)sizeof(In), kChunks = kCols / kChunk;
        for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
            const int r = idx / kChunks, c = (idx % kChunks) * kChunk;
            uint4 w;
            w.x = 0, w.y = 0, w.z = 0, w.w = 0;
            if (r < valid) w = *(const uint4*)(src + r * stride + c);
            *(uint4*)(dst + r * kDs + c) = w;
        }
    } else {
        // Kept rolled: the fallback for unaligned strides stays out of the way of hot code.
#pragma unroll 1
        for (int idx = threadIdx.x; idx < rows * kCols; idx += kThreads) {
            const int r = idx / kCols, c = idx % kCols;
            dst[r * kDs + c] = r < valid ? src[r * stride + c] : fep_from_f32<In>(0.0f);
        }
    }
}

template <typename In, int kD, int kDv>
FEP_DEVICE void attn_forward(const AttnParams& p) {
    using Tr = AttnTraits<In, kD, kDv>;
    using Mma = FepMma<In>;
    constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kNT = kBc / 16, kNV = kDv / 16;
    constexpr int kSlots = Mma::kRowSlots, kAcc = FEP_MMA_ACC;
    // f32 takes three products per MMA step (port/mma.cuh): unrolled, their fragments do not
    // fit in registers beside o and the scores (spills at Dv = 256 and at D = Dv = 32), so its
    // k-loops stay rolled. f32 is the accuracy path, not a speed target.
    constexpr int kUnrollQK = sizeof(In) == 4 ? 1 : kD / Mma::kK;
    constexpr int kUnrollPV = sizeof(In) == 4 ? 1 : kBc / Mma::kK;
    FEP_DYNAMIC_SMEM(uint4, smem);
    // The host mirrors the tile shape (and keeps a key split a whole number of key tiles); on a
    // mismatch write nothing (poisoned outputs then fail).
    if (p.smem != Tr::kSmem || (int)blockDim.x != Tr::kThreads || p.split <= 0 || p.split % Tr::kBc != 0)
        return;
    In* sq = (In*)smem;
    In* sk = sq + kBr * Tr::kQs;
    In* sv = sk + kBc * Tr::kKs;
    In* sp = sv + kBc * Tr::kVs;
    float* ka = (float*)(sp + Tr::kWarps * 16 * Tr::kPs);
    float* kb = ka + kBc;
    float* kn = kb + kBc;
    float* kp = kn + kBc;

    const AttnBlock<In> blk(p, kBr);
    const int b = blk.b, h = blk.h, i0 = blk.i0, off = blk.off, kv_end = blk.kv_end, i_last = blk.i_last;
    const int j_begin = blk.j_begin, j_end = blk.j_end, lq = blk.lq;
    const In *qg = blk.q, *kg = blk.k, *vg = blk.v;
    const float* pik = blk.pi_key;
    const int warp = (int)fep_warp_id(), lane = (int)fep_lane();
    const bool vec = p.vec_loads != 0;
    attn_load_rows<In, kD, Tr::kQs, Tr::kThreads>(sq, qg + (long long)i0 * p.q_stride[2], p.q_stride[2], kBr,
                                                  lq - i0, vec);

    const int family = p.family;
    const float pi_h = blk.pi_h;
    const bool want_e = p.e != nullptr;
    // Gaussian with one precision per row: −½τπ‖q_i‖² is a constant of the row (see above).
    const bool gauss_bias = family == ATTN_GAUSSIAN && !p.pi_key;
    const bool norm = p.normalizer && family != ATTN_DOT;
    const float nu = blk.nu, kappa = 0.5f * (nu + (float)kD);
    __syncthreads();

    const In* qs = sq + warp * 16 * Tr::kQs;  // this warp's 16 rows
    In* ps = sp + warp * 16 * Tr::kPs;
    float qn[kSlots];  // ‖q‖² of this lane's rows
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
        const In* row = qs + Mma::slot_row(lane, s) * Tr::kQs;
        float a = 0.0f;
        for (int d = 0; d < kD; ++d) a = fmaf(fep_to_f32(row[d]), fep_to_f32(row[d]), a);
        qn[s] = a;
    }
    // Gaussian's ½‖q‖² per row: 0 when it is a constant of the row (gauss_bias).
    float hq[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) hq[s] = gauss_bias ? 0.0f : 0.5f * qn[s];
    float m[kSlots], l[kSlots], ep[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) m[s] = ATTN_NEG_INF, l[s] = 0.0f, ep[s] = 0.0f;
    float o[kNV][kAcc];
#pragma unroll
    for (int t = 0; t < kNV; ++t)
#pragma unroll
        for (int i = 0; i < kAcc; ++i) o[t][i] = 0.0f;

    // The operands as stored (type In): no conversion in the MMA loops.
    auto aq = [&](int r, int k) { return qs[r * Tr::kQs + k]; };
    auto bk = [&](int c, int k) { return sk[c * Tr::kKs + k]; };
    auto ap = [&](int r, int k) { return ps[r * Tr::kPs + k]; };
    auto bv = [&](int c, int k) { return sv[k * Tr::kVs + c]; };
    // x = q·k for this warp's 16 rows and the tile's kBc keys.
    auto qk = [&](float (&x)[kNT][kAcc]) {
#pragma unroll
        for (int t = 0; t < kNT; ++t)
#pragma unroll
            for (int i = 0; i < kAcc; ++i) x[t][i] = 0.0f;
#pragma unroll(kUnrollQK)
        for (int k0 = 0; k0 < kD; k0 += Mma::kK) fep_mma_run_accurate<In, kNT>(x, aq, bk, k0);
    };

    for (int j0 = (j_begin / kBc) * kBc; j0 < j_end; j0 += kBc) {
        __syncthreads();  // the previous tile's K, V, P and per-key terms are consumed
        attn_load_rows<In, kD, Tr::kKs, Tr::kThreads>(sk, kg + (long long)j0 * p.k_stride[2], p.k_stride[2], kBc,
                                                      kv_end - j0, vec);
        attn_load_rows<In, kDv, Tr::kVs, Tr::kThreads>(sv, vg + (long long)j0 * p.v_stride[2], p.v_stride[2], kBc,
                                                       kv_end - j0, vec);
        __syncthreads();
        for (int c = threadIdx.x; c < kBc; c += Tr::kThreads) {
            const bool live = j0 + c < kv_end;
            float n = 0.0f;
            for (int d = 0; d < kD; ++d) n = fmaf(fep_to_f32(sk[c * Tr::kKs + d]), fep_to_f32(sk[c * Tr::kKs + d]), n);
            const float pi = pi_h * (pik && live ? pik[j0 + c] : 1.0f);
            float a, bias;
            attn_key_terms(family, p.tau, nu, pi, n, norm, (float)kD, a, bias);
            // A bias or mask broadcast over Lq is a per-key term of the block (score_inputs.cuh).
            if (live && p.key_extra) bias += attn_extra_log2<false>(p.x, (int)blockIdx.z, (int)blockIdx.y, 0, j0 + c);
            ka[c] = a;
            kb[c] = live ? bias : ATTN_NEG_INF;
            kn[c] = n;
            kp[c] = pi;
        }
        __syncthreads();

        float x[kNT][kAcc];
        qk(x);

        // Scores (base 2), in place of x, and the tile's row maxima; one loop per family, so
        // the per-score code has no branch on it.
        const bool edge = (p.causal && j0 + kBc - 1 > i0 + off) || (p.window > 0 && j0 <= i_last + off - p.window);
        float mx[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) mx[s] = ATTN_NEG_INF;
        auto scores = [&](auto family_tag) {
            constexpr int kFamily = decltype(family_tag)::value;
#pragma unroll
            for (int t = 0; t < kNT; ++t) {
#pragma unroll
                for (int i = 0; i < kAcc; ++i) {
                    const int c = 16 * t + Mma::acc_col(lane, i), sl = Mma::row_slot(i);
                    float v = attn_score<kFamily, sizeof(In) == 4>(x[t][i], ka[c], kb[c], qn[sl], hq[sl], kn[c], kappa);
                    if (edge) {
                        const int i_row = i0 + warp * 16 + Mma::acc_row(lane, i), j = j0 + c;
                        if (j > i_row + off || (p.window > 0 && j <= i_row + off - p.window)) v = ATTN_NEG_INF;
                    }
                    x[t][i] = v;
                    mx[sl] = fmaxf(mx[sl], v);
                }
            }
        };
        switch (family) {
            case ATTN_DOT: scores(AttnFamily<ATTN_DOT>()); break;
            case ATTN_GAUSSIAN: scores(AttnFamily<ATTN_GAUSSIAN>()); break;
            case ATTN_STUDENT_T: scores(AttnFamily<ATTN_STUDENT_T>()); break;
            default: scores(AttnFamily<ATTN_LAPLACE>()); break;
        }

        // Online softmax: new maxima, rescale what was accumulated.
        float mu[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
            const float mn = fmaxf(m[s], Mma::row_allreduce(mx[s], FepMax()));
            mu[s] = mn == ATTN_NEG_INF ? 0.0f : mn;  // nothing visible yet: keep everything 0
            const float alpha = fep_exp2(m[s] - mu[s]);
            m[s] = mn;
            l[s] *= alpha;
            ep[s] *= alpha;
            mx[s] = alpha;
        }
#pragma unroll
        for (int t = 0; t < kNV; ++t)
#pragma unroll
            for (int i = 0; i < kAcc; ++i) o[t][i] *= mx[Mma::row_slot(i)];

        // p = 2^(s − m) into this warp's P rows; l accumulates per lane (reduced at the end).
#pragma unroll
        for (int t = 0; t < kNT; ++t) {
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), sl = Mma::row_slot(i);
                const float pv = fep_exp2(x[t][i] - mu[sl]);
                l[sl] += pv;
                ps[r * Tr::kPs + c] = fep_from_f32<In>(pv);
            }
        }
        // e needs d² again: q·k is recomputed rather than kept beside the scores (the registers
        // of a second score tile would cost every call; this costs only calls that ask for e).
        // Each lane reads back its own p (as rounded for P V).
        if (want_e) {
            qk(x);
#pragma unroll
            for (int t = 0; t < kNT; ++t) {
#pragma unroll
                for (int i = 0; i < kAcc; ++i) {
                    const int r = Mma::acc_row(lane, i), c = 16 * t + Mma::acc_col(lane, i), sl = Mma::row_slot(i);
                    const float d2 = fmaxf(fmaf(-2.0f, x[t][i], qn[sl] + kn[c]), 0.0f);
                    ep[sl] = fmaf(fep_to_f32(ps[r * Tr::kPs + c]) * kp[c], d2, ep[sl]);
                }
            }
        }
        __syncthreads();  // P rows are read by other lanes of the warp
#pragma unroll(kUnrollPV)
        for (int k0 = 0; k0 < kBc; k0 += Mma::kK) fep_mma_run_accurate<In, kNV>(o, ap, bv, k0);
    }

    // Row totals over the lanes of each row, then o / l, lse and e.
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
        l[s] = Mma::row_allreduce(l[s], FepSum());
        ep[s] = Mma::row_allreduce(ep[s], FepSum());
    }
    const long long row0 = blk.row0(p);  // this split's part of the outputs (score.cuh)
    const int lq_end = AttnBlock<In>::rows(p);  // the sequence's rows (reloaded: see rows())
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
        // The lane holding column 0 of a row writes its lse and e.
        const int r = Mma::acc_row(lane, i), sl = Mma::row_slot(i), row = i0 + warp * 16 + r;
        if (Mma::acc_col(lane, i) != 0 || row >= lq_end) continue;
        const bool seen = l[sl] > 0.0f;
        if (p.lse) {
            const float shift = gauss_bias ? -0.5f * p.tau * pi_h * qn[sl] : 0.0f;
            p.lse[row0 + row] = seen ? fmaf(m[sl] + log2f(l[sl]), ATTN_LN2, shift) : ATTN_NEG_INF;
        }
        if (want_e) p.e[row0 + row] = seen ? ep[sl] / l[sl] : 0.0f;
    }
    In* og = blk.out(p);
    float inv[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) inv[s] = l[s] > 0.0f ? 1.0f / l[s] : 0.0f;
#pragma unroll
    for (int t = 0; t < kNV; ++t) {
#pragma unroll
        for (int i = 0; i < kAcc; ++i) {
            const int row = i0 + warp * 16 + Mma::acc_row(lane, i);
            if (row < lq_end)
                og[row * p.o_stride[2] + 16 * t + Mma::acc_col(lane, i)] = fep_from_f32<In>(o[t][i] * inv[Mma::row_slot(i)]);
        }
    }
}
