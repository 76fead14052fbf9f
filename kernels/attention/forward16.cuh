// forward16.cuh: precision-weighted attention, forward, for f16 and bf16 inputs (v2; the f32
// accuracy path is forward.cuh). One block = kWarps warps × kMT 16-row strips of queries of one
// (batch, head); DESIGN.md §4.1 for the maths, score.cuh for the score of each family.
//
// Per key tile of kBc keys (NOTES.md has the reasoning and the census):
//   1. K and V of the next tile are copied into the other of two shared-memory stages
//      (port/copy.cuh: cp.async on NVIDIA) while this tile is computed; one barrier per tile
//      (two when the family needs per-key terms: then one thread per key computes ‖k_j‖², π,
//      the score's multiplier and bias once, for every warp).
//   2. S = Q Kᵀ on the tensor cores with operands in registers (port/fragment.cuh: one ldmatrix
//      or ds_read_b64 per 16 × 16 operand tile); the K fragments of a k-step serve all kMT strips.
//   3. Scores per family (one copy of the loop per family: the family is a template parameter of
//      the whole key loop, so the hot loop holds one family's code), masks only in tiles that
//      cross the causal diagonal, the window's edge or the key length.
//   4. Online softmax in base 2; p = 2^(s − m), through the special-function unit or, for one in
//      four 16-key blocks of Student-t and Laplace (two special functions per score), through a
//      polynomial on the FMA units (NOTES.md: the MUFU/FMA budget).
//   5. o += P V with P straight from the score registers (FepTile::p_frag).
// A row that saw no visible key keeps l = 0 and ends with o = 0, lse = −∞, e = 0.
//
// wave64: nothing here depends on the warp size; which rows and columns a lane holds, and which
// lanes share a row, come from FepTile.
#pragma once
#include "../port/copy.cuh"
#include "../port/fragment.cuh"
#include "../port/reduce.cuh"
#include "forward.cuh"
#include "score.cuh"
#include "traits.cuh"

// `rows` rows of kCols elements (row r at src + r * stride) into shared rows of kDs elements;
// rows at or past `valid` become zeros (a masked key's v must be 0, not whatever padding holds:
// its weight 0 times NaN is NaN). vec: 16-byte copies that may complete later (port/copy.cuh);
// otherwise element by element, complete on return.
template <int kRows, int kCols, int kThreads>
struct Attn16Copy {
    static constexpr int kChunks = kCols / 8, kTotal = kRows * kChunks;
    static constexpr int kIters = (kTotal + kThreads - 1) / kThreads;  // 16-byte copies per thread
};

// kLand: the same walk after the group's wait, landing each copy (port/copy.cuh).
template <typename In, int kRows, int kCols, int kDs, int kThreads, int kSlot, bool kLand = false, typename G>
FEP_DEVICE void attn16_copy_rows(G& g, In* dst, const In* src, long long stride, int valid, bool vec) {
    using C = Attn16Copy<kRows, kCols, kThreads>;
    if (vec) {
#pragma unroll
        for (int it = 0; it < C::kIters; ++it) {
            const int idx = threadIdx.x + it * kThreads;
            if (C::kTotal % kThreads != 0 && idx >= C::kTotal) break;
            const int r = idx / C::kChunks, c = (idx % C::kChunks) * 8;
            if constexpr (kLand) {
                g.land(kSlot + it, dst + r * kDs + c);
            } else {
                const bool live = r < valid;
                g.copy16(kSlot + it, dst + r * kDs + c, live ? src + r * stride + c : src, live);
            }
        }
    } else if (!kLand) {
        // Strides or addresses that forbid 16-byte copies: v1's element copy, complete on return.
        attn_load_rows<In, kCols, kDs, kThreads>(dst, src, stride, kRows, valid, false);
    }
}

// 2^x through the special-function unit, or (kPoly) the FMA units.
template <bool kPoly>
FEP_DEVICE float attn_exp2(float x) {
    if constexpr (kPoly) {
        return fep_exp2_poly(x);
    } else {
        return fep_exp2(x);
    }
}

template <typename In, int kD, int kDv, int F>
FEP_DEVICE void attn_forward16_family(const AttnParams& p) {
    using Tr = AttnTraits<In, kD, kDv>;
    using T = FepTile<In>;
    using Frag = typename T::Frag;
    constexpr int kMT = Tr::kMT, kBc = Tr::kBc, kBr = Tr::kBr, kNK = kBc / 16, kND = kD / 16, kNV = kDv / 16;
    constexpr int kS = T::kRowSlots, kAcc = T::kAcc;
    constexpr int kVChunk = kNV <= 4 ? kNV : 2;  // V fragments in registers at once (more spilled)
    static_assert(kNV % kVChunk == 0, "Dv must be a multiple of the V chunk");
    // The distance families (d² from ‖q‖², ‖k‖² and q·k) take two special functions per score:
    // one 16-key block in four takes its exponentials on the FMA units instead (NOTES.md).
    constexpr bool kDist = F == ATTN_STUDENT_T || F == ATTN_LAPLACE;

    FEP_DYNAMIC_SMEM(uint4, smem);
    In* sq = (In*)smem;
    In* sk = sq + kBr * Tr::kQs;
    In* sv = sk + 2 * kBc * Tr::kKs;
    float* kta = (float*)(sv + 2 * kBc * Tr::kVs);  // per key: the score's a and b, ‖k‖², π, 1/a
    float* ktb = kta + kBc;
    float* ktn = ktb + kBc;
    float* ktp = ktn + kBc;
    float* kti = ktp + kBc;

    const AttnBlock<In> blk(p, kBr);
    const int b = blk.b, h = blk.h, i0 = blk.i0, off = blk.off, kv_end = blk.kv_end, i_last = blk.i_last;
    const int j_begin = blk.j_begin, j_end = blk.j_end, lq = blk.lq;
    const In *qg = blk.q, *kg = blk.k, *vg = blk.v;
    const float* pik = blk.pi_key;
    const float pi_h = blk.pi_h;
    const int warp = (int)fep_warp_id(), lane = (int)fep_lane();
    const int rw = warp * 16 * kMT;  // the warp's first row in the block
    const bool vec = p.vec_loads != 0;
    const bool want_e = p.e != nullptr;
    // Dot with no per-key precision (nor a bias or mask broadcast over Lq) needs no per-key
    // terms: a = τ π_h log2(e) for every key.
    const bool terms = F != ATTN_DOT || pik != nullptr || want_e || p.key_extra;
    const float a_u = p.tau * pi_h * ATTN_LOG2E;
    // Gaussian with one precision per row: −½τπ‖q_i‖² is a constant of the row (score.cuh).
    const bool gauss_bias = F == ATTN_GAUSSIAN && !pik;
    const bool norm = p.normalizer && F != ATTN_DOT;
    const float nu = blk.nu, kappa = 0.5f * (nu + (float)kD), inv_kappa = 1.0f / kappa;

    // K and V of a tile in one group of copies; Q in its own, landed before the key loop.
    using CK = Attn16Copy<kBc, kD, Tr::kThreads>;
    using CV = Attn16Copy<kBc, kDv, Tr::kThreads>;
    FepCopies<CK::kIters + CV::kIters> kv;
    auto load_kv = [&](auto land, int j0, int stage) {
        constexpr bool kLand = decltype(land)::value;
        attn16_copy_rows<In, kBc, kD, Tr::kKs, Tr::kThreads, 0, kLand>(kv, sk + stage * kBc * Tr::kKs,
                                                                      kg + (long long)j0 * p.k_stride[2],
                                                                      p.k_stride[2], kv_end - j0, vec);
        attn16_copy_rows<In, kBc, kDv, Tr::kVs, Tr::kThreads, CK::kIters, kLand>(
            kv, sv + stage * kBc * Tr::kVs, vg + (long long)j0 * p.v_stride[2], p.v_stride[2], kv_end - j0, vec);
    };
    const int j_first = (j_begin / kBc) * kBc;
    {
        FepCopies<Attn16Copy<kBr, kD, Tr::kThreads>::kIters> qc;
        const In* q0 = qg + (long long)i0 * p.q_stride[2];
        attn16_copy_rows<In, kBr, kD, Tr::kQs, Tr::kThreads, 0>(qc, sq, q0, p.q_stride[2], lq - i0, vec);
        fep_copy_commit();
        if (j_first < j_end) load_kv(AttnBool<false>(), j_first, 0);
        fep_copy_commit();
        fep_copy_wait<1>();  // Q (the older group)
        attn16_copy_rows<In, kBr, kD, Tr::kQs, Tr::kThreads, 0, true>(qc, sq, q0, p.q_stride[2], lq - i0, vec);
    }

    float m[kMT][kS], l[kMT][kS], ep[kMT][kS], qn[kMT][kS], hq[kMT][kS];
    float o[kMT][kNV][kAcc];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int s = 0; s < kS; ++s) m[mt][s] = ATTN_NEG_INF, l[mt][s] = 0.0f, ep[mt][s] = 0.0f, qn[mt][s] = 0.0f;
#pragma unroll
        for (int t = 0; t < kNV; ++t)
#pragma unroll
            for (int i = 0; i < kAcc; ++i) o[mt][t][i] = 0.0f;
    }
    if (kDist || F == ATTN_GAUSSIAN || want_e) {
        __syncthreads();  // Q visible to the block
        // ‖q‖² of this lane's rows: the 4 lanes of a row each sum a quarter of the row.
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int s = 0; s < kS; ++s) {
                const In* row = sq + (rw + 16 * mt + T::slot_row(lane, s)) * Tr::kQs;
                float a = 0.0f;
                for (int d = T::row_part(lane); d < kD; d += 4) a = fmaf(fep_to_f32(row[d]), fep_to_f32(row[d]), a);
                qn[mt][s] = T::row_allreduce(a, FepSum());
            }
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int s = 0; s < kS; ++s) hq[mt][s] = gauss_bias ? 0.0f : 0.5f * qn[mt][s];

    int stage = 0;
    for (int j0 = j_first; j0 < j_end; j0 += kBc, stage ^= 1) {
        fep_copy_wait<0>();
        load_kv(AttnBool<true>(), j0, stage);  // CDNA: the registers staged last iteration to LDS
        __syncthreads();  // this tile (and Q) landed for every thread; the last tile is consumed
        if (j0 + kBc < j_end) load_kv(AttnBool<false>(), j0 + kBc, stage ^ 1);  // overlaps this tile
        fep_copy_commit();
        const In* skt = sk + stage * kBc * Tr::kKs;
        const In* svt = sv + stage * kBc * Tr::kVs;
        if (terms) {
            // kTPK threads per key sum ‖k‖² over 16-byte chunks, then the first computes the terms.
            constexpr int kTPK = Tr::kThreads / kBc;
            static_assert(kTPK >= 1 && kTPK * kBc == Tr::kThreads && kTPK <= FEP_WARP_SIZE, "threads per key");
            const int c = threadIdx.x / kTPK, part = threadIdx.x % kTPK;
            float n = 0.0f;
#pragma unroll
            for (int ch = part; ch < kD / 8; ch += kTPK) {
                const uint4 w = *(const uint4*)(skt + c * Tr::kKs + 8 * ch);
                In e[8];
                __builtin_memcpy(e, &w, 16);  // not a cast: In may not alias uint4 (g++ drops such reads)
#pragma unroll
                for (int u = 0; u < 8; ++u) n = fmaf(fep_to_f32(e[u]), fep_to_f32(e[u]), n);
            }
#pragma unroll
            for (int msk = 1; msk < kTPK; msk <<= 1) n += fep_shfl_xor(n, msk);
            if (part == 0) {
                const bool live = j0 + c < kv_end;
                const float pi = pi_h * (pik && live ? pik[j0 + c] : 1.0f);
                float a, bias;
                attn_key_terms(F, p.tau, nu, pi, n, norm, (float)kD, a, bias);
                // A bias or mask broadcast over Lq is a per-key term of the block (score_inputs.cuh).
                if (live && p.key_extra) bias += attn_extra_log2<false>(p.x, (int)blockIdx.z, (int)blockIdx.y, 0, j0 + c);
                kta[c] = a, ktb[c] = live ? bias : ATTN_NEG_INF, ktn[c] = n, ktp[c] = pi, kti[c] = 1.0f / a;
            }
            __syncthreads();
        }

        // S = Q Kᵀ: per k-step, the K fragments of the tile's kNK key blocks serve every strip.
        float s[kMT][kNK][kAcc];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int n = 0; n < kNK; ++n)
#pragma unroll
                for (int i = 0; i < kAcc; ++i) s[mt][n][i] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < kND; ++kd) {
            Frag kf[kNK];
#pragma unroll
            for (int n = 0; n < kNK; ++n) T::load_k(kf[n], skt + 16 * n * Tr::kKs + 16 * kd, Tr::kKs);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                Frag qf;
                T::load_q(qf, sq + (rw + 16 * mt) * Tr::kQs + 16 * kd, Tr::kQs);
                T::template qk<kNK>(s[mt], qf, kf);
            }
        }

        // Scores in place, and the tile's row maxima. In an edge tile a row's visible keys are
        // [lo, hi): the window's start, and the first key past the diagonal or the key length.
        const bool edge = j0 + kBc > kv_end || (p.causal && j0 + kBc - 1 > i0 + off) ||
                          (p.window > 0 && j0 <= i_last + off - p.window);
        int lo[kMT][kS], hi[kMT][kS];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int sl = 0; sl < kS; ++sl) {
                const int i_row = i0 + rw + 16 * mt + T::slot_row(lane, sl);
                hi[mt][sl] = p.causal ? min(kv_end, i_row + off + 1) : kv_end;
                lo[mt][sl] = p.window > 0 ? i_row + off - p.window + 1 : 0;
            }
        float mx[kMT][kS];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int sl = 0; sl < kS; ++sl) mx[mt][sl] = ATTN_NEG_INF;
#pragma unroll
        for (int n = 0; n < kNK; ++n) {  // key blocks outer: a block's per-key terms live briefly
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int c = 16 * n + T::col(lane, i), sl = T::slot(i);
                float ka = a_u, kb = 0.0f, kn = 0.0f;
                if (F != ATTN_DOT || terms) ka = kta[c], kb = ktb[c];
                if (kDist) kn = ktn[c];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    float v = F == ATTN_DOT && !terms ? s[mt][n][i] * a_u
                                                      : attn_score<F, false, true>(s[mt][n][i], ka, kb, qn[mt][sl], hq[mt][sl], kn, kappa);
                    if (edge) {
                        const int j = j0 + c;
                        v = (j < lo[mt][sl]) | (j >= hi[mt][sl]) ? ATTN_NEG_INF : v;
                    }
                    s[mt][n][i] = v;
                    mx[mt][sl] = fmaxf(mx[mt][sl], v);
                }
            }
        }

        // Online softmax: new maxima, rescale what was accumulated.
        float mu[kMT][kS];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
            float alpha[kS];
#pragma unroll
            for (int sl = 0; sl < kS; ++sl) {
                const float mn = fmaxf(m[mt][sl], T::row_allreduce(mx[mt][sl], FepMax()));
                mu[mt][sl] = mn == ATTN_NEG_INF ? 0.0f : mn;  // nothing visible yet: keep everything 0
                alpha[sl] = fep_exp2(m[mt][sl] - mu[mt][sl]);
                m[mt][sl] = mn;
                l[mt][sl] *= alpha[sl];
                ep[mt][sl] *= alpha[sl];
            }
#pragma unroll
            for (int t = 0; t < kNV; ++t)
#pragma unroll
                for (int i = 0; i < kAcc; ++i) o[mt][t][i] *= alpha[T::slot(i)];
        }
        // p = 2^(s − m) in place. e = Σ p π d² takes d² back from the score (score.cuh: no second
        // q·k product and no second score tile in registers), with p as rounded for P V; one
        // branch for the whole tile, so calls without e run the plain loop.
        auto probabilities = [&](auto with_e) {
            constexpr bool kE = decltype(with_e)::value;
#pragma unroll
            for (int n = 0; n < kNK; ++n) {
#pragma unroll
                for (int i = 0; i < kAcc; ++i) {
                    const int c = 16 * n + T::col(lane, i), sl = T::slot(i);
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        const float sc = s[mt][n][i], x = sc - mu[mt][sl];
                        const float pv =
                            (kDist && ((mt * kNK + n) & 3) == 3) ? attn_exp2<true>(x) : attn_exp2<false>(x);
                        l[mt][sl] += pv;
                        s[mt][n][i] = pv;
                        if constexpr (kE) {
                            // (a bias broadcast over Lq is in ktb, so s − b is still the family's score)
                            const float d2 =
                                attn_d2_from_score<F>(sc, kti[c], ktb[c], qn[mt][sl], hq[mt][sl], ktn[c], inv_kappa);
                            ep[mt][sl] = fmaf(T::as_operand(pv) * ktp[c], pv > 0.0f ? d2 : 0.0f, ep[mt][sl]);
                        }
                    }
                }
            }
        };
        if (want_e) {
            probabilities(AttnBool<true>());
        } else {
            probabilities(AttnBool<false>());
        }

        // o += P V, P from the score registers.
#pragma unroll
        for (int kk = 0; kk < kNK; ++kk) {
            Frag pf[kMT];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) pf[mt] = T::p_frag(s[mt][kk]);
#pragma unroll
            for (int t0 = 0; t0 < kNV; t0 += kVChunk) {
                Frag vf[kVChunk];
#pragma unroll
                for (int c = 0; c < kVChunk; ++c) T::load_v(vf[c], svt + 16 * kk * Tr::kVs + 16 * (t0 + c), Tr::kVs);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
                    T::template pv<kVChunk>(*reinterpret_cast<float(*)[kVChunk][kAcc]>(&o[mt][t0][0]), pf[mt], vf);
            }
        }
    }

    // Row totals over the lanes of each row, then o / l, lse and e.
    const long long row0 = blk.row0(p);  // this split's part of the outputs (score.cuh)
    const int lq_end = AttnBlock<In>::rows(p);  // the sequence's rows (reloaded: see rows())
    In* og = blk.out(p);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
        float inv[kS];
#pragma unroll
        for (int sl = 0; sl < kS; ++sl) {
            l[mt][sl] = T::row_allreduce(l[mt][sl], FepSum());
            ep[mt][sl] = T::row_allreduce(ep[mt][sl], FepSum());
            inv[sl] = l[mt][sl] > 0.0f ? 1.0f / l[mt][sl] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kAcc; ++i) {
            // The lane holding column 0 of a row writes its lse and e.
            const int sl = T::slot(i), row = i0 + rw + 16 * mt + T::row(lane, i);
            if (T::col(lane, i) != 0 || row >= lq_end) continue;
            const bool seen = l[mt][sl] > 0.0f;
            if (p.lse) {
                const float shift = gauss_bias ? -0.5f * p.tau * pi_h * qn[mt][sl] : 0.0f;
                p.lse[row0 + row] = seen ? fmaf(m[mt][sl] + log2f(l[mt][sl]), ATTN_LN2, shift) : ATTN_NEG_INF;
            }
            if (want_e) p.e[row0 + row] = seen ? ep[mt][sl] / l[mt][sl] : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < kNV; ++t)
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                const int row = i0 + rw + 16 * mt + T::row(lane, i);
                if (row < lq_end)
                    og[row * p.o_stride[2] + 16 * t + T::col(lane, i)] = fep_from_f32<In>(o[mt][t][i] * inv[T::slot(i)]);
            }
    }
}

// The kernel body: the tile shape check, then one copy of the whole key loop per family.
template <typename In, int kD, int kDv>
FEP_DEVICE void attn_forward16(const AttnParams& p) {
    using Tr = AttnTraits<In, kD, kDv>;
    // The host mirrors the tile shape (and keeps a key split a whole number of key tiles); on a
    // mismatch write nothing (poisoned outputs then fail).
    if (p.smem != Tr::kSmem || (int)blockDim.x != Tr::kThreads || p.split <= 0 || p.split % Tr::kBc != 0)
        return;
    if constexpr (kDv == 256) {
        attn_forward<In, kD, kDv>(p);  // traits.cuh: v1's shape and kernel
    } else {
        switch (p.family) {
            case ATTN_DOT: attn_forward16_family<In, kD, kDv, ATTN_DOT>(p); break;
            case ATTN_GAUSSIAN: attn_forward16_family<In, kD, kDv, ATTN_GAUSSIAN>(p); break;
            case ATTN_STUDENT_T: attn_forward16_family<In, kD, kDv, ATTN_STUDENT_T>(p); break;
            default: attn_forward16_family<In, kD, kDv, ATTN_LAPLACE>(p); break;
        }
    }
}
