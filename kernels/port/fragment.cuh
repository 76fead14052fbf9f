// fragment.cuh: 16-bit tensor-core tiles with their operands in registers, for kernels of the
// shape O = softmax(Q Kᵀ) V (attention): one instruction loads a 16 x 16 operand tile from
// shared memory, and the score tile is re-used as the operand of the second product without
// leaving registers.
//
//   FepTile<In>::Frag     one 16 x 16 operand tile of In = fep_f16 / fep_bf16, per lane
//   load_q / load_k       from a [16 rows][16 k] block stored row-major (rows `stride` apart)
//   load_v                from a [16 k][16 cols] block stored row-major (V: [key][dv])
//   qk<N>(s, q, k)        s[n] += Q Kᵀ for the 16 rows of q and the 16 keys of k[n]
//   pv<N>(o, p, v)        o[n] += P V for the 16 rows of p and the 16 columns of v[n]
//   p_frag(s)             a score tile (16 rows x 16 keys, f32) as the P operand
//
// Score and output tiles share one accumulator layout, the "row tile": accumulator i of `lane`
// holds (row(lane, i), col(lane, i)); the lanes holding one row differ in the bits of
// kRowMask0/1, so a row reduction is a butterfly over them (row_allreduce).
//
//   NVIDIA: mma.sync m16n8k16, two per 16 x 16 tile. load_* are one ldmatrix.x4 each (.trans for
//           V); each lane gives the address of one 16-byte row: rows 16 bytes apart in 8
//           distinct 4-bank groups (see the callers' padding) load without bank conflicts. The
//           row tile is the m16n8 accumulator layout: rows g and g + 8 (g = lane / 4), columns
//           2 (lane % 4) + {0, 1} (+ 8): 2 row slots, 4 lanes per row. That layout is also the
//           m16n8k16 A operand's, so p_frag only packs pairs of accumulators.
//   AMD CDNA (wave64): v_mfma_f32_16x16x16{f16,bf16_1k}, computed transposed: S^T = K Q^T and
//           O^T = V^T P^T. Then lane l holds row l % 16 and columns 4 (l / 16) + i (1 row slot,
//           4 lanes per row: lane bits 4 and 5), which is the B operand's layout, so the
//           probabilities feed the second product as they are. load_q / load_k are one 8-byte
//           read per lane (ds_read_b64: row l % 16, k 4 (l / 16)); load_v reads V^T's operand,
//           four 2-byte reads per lane (a V stored transposed would make it one ds_read_b64).
//   emulator: fragments hold the emulated vendor's registers; loads follow the hardware rules
//           (ldmatrix's row addresses per lane, its distribution of elements), and the products
//           rebuild the operands from every lane's registers through the instruction's operand
//           tables. A kernel or a port layout that puts an element in the wrong lane fails.
#pragma once
#include "mma.cuh"

template <typename In>
struct FepTile {
    static_assert(sizeof(In) == 2, "FepTile is for the 16-bit input types");
    static constexpr int kAcc = FEP_MMA_ACC;
#if defined(FEP_MMA_NV)
    static constexpr int kRegs = 4;  // 8 elements
    static constexpr int kRowSlots = 2;
    static constexpr int kRowMask0 = 1, kRowMask1 = 2;
    static FEP_DEVICE int row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
    static FEP_DEVICE int col(int lane, int i) { return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1); }
    static FEP_DEVICE int slot(int i) { return (i >> 1) & 1; }
    static FEP_DEVICE int slot_row(int lane, int s) { return (lane >> 2) + 8 * s; }
    static FEP_DEVICE int row_part(int lane) { return lane & 3; }  // which of a row's 4 lanes
#else
    static constexpr int kRegs = 2;  // 4 elements
    static constexpr int kRowSlots = 1;
    static constexpr int kRowMask0 = 16, kRowMask1 = 32;
    static FEP_DEVICE int row(int lane, int) { return lane & 15; }
    static FEP_DEVICE int col(int lane, int i) { return 4 * (lane >> 4) + i; }
    static FEP_DEVICE int slot(int) { return 0; }
    static FEP_DEVICE int slot_row(int lane, int) { return lane & 15; }
    static FEP_DEVICE int row_part(int lane) { return lane >> 4; }
#endif
    struct Frag {
        uint32_t r[kRegs];
    };

    template <typename Op>
    static FEP_DEVICE float row_allreduce(float v, Op op) {
        v = op(v, fep_shfl_xor(v, kRowMask0));
        return op(v, fep_shfl_xor(v, kRowMask1));
    }

    // Two f32 as one register of In (round to nearest even): one cvt on NVIDIA (sm_80+), the
    // software rounding of types.cuh elsewhere (gfx942 has no packed bf16 conversion).
    static FEP_DEVICE uint32_t pack(float lo, float hi) {
#if defined(FEP_CUDA)
        uint32_t r;
        if constexpr (fep_same_type<In, fep_f16>::value) {
            asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        } else {
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        }
        return r;
#else
        const In a = fep_from_f32<In>(lo), b = fep_from_f32<In>(hi);
        uint16_t ua, ub;
        __builtin_memcpy(&ua, &a, 2);
        __builtin_memcpy(&ub, &b, 2);
        return (uint32_t)ua | ((uint32_t)ub << 16);
#endif
    }
    // v as the P operand holds it (rounded to In), back in f32.
    static FEP_DEVICE float as_operand(float v) {
        const uint32_t r = pack(v, 0.0f);
        In x;
        __builtin_memcpy(&x, &r, 2);  // the low half (little-endian on every target)
        return fep_to_f32(x);
    }

    static FEP_DEVICE Frag p_frag(const float (&s)[kAcc]) {
        Frag f;
#pragma unroll
        for (int j = 0; j < kRegs; ++j) f.r[j] = pack(s[2 * j], s[2 * j + 1]);
        return f;
    }

    static FEP_DEVICE void load_q(Frag& f, const In* tile, int stride);
    static FEP_DEVICE void load_k(Frag& f, const In* tile, int stride);
    static FEP_DEVICE void load_v(Frag& f, const In* tile, int stride);
    template <int N>
    static FEP_DEVICE void qk(float (&s)[N][kAcc], const Frag& q, const Frag (&k)[N]);
    template <int N>
    static FEP_DEVICE void pv(float (&o)[N][kAcc], const Frag& p, const Frag (&v)[N]);
};

#if defined(FEP_EMULATE)
// Element h (0: low half) of a register of two In, as f32: the emulated products read operands so.
template <typename In>
FEP_DEVICE float fep_emu_half(uint32_t r, int h) {
    const uint16_t bits = (uint16_t)(r >> (16 * h));
    In v;
    std::memcpy(&v, &bits, 2);
    return fep_to_f32(v);
}
#endif

// ---- NVIDIA: ldmatrix and mma.sync (and the emulator at warp 32) -----------------------------
#if defined(FEP_MMA_NV)
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8 x 8 matrix j; register j of lane L
// receives row L / 4, elements 2 (L % 4) and 2 (L % 4) + 1 of matrix j (.trans: of its
// transpose, i.e. rows 2 (L % 4) and 2 (L % 4) + 1, element L / 4).
// Which 8 x 8 block of the 16 x 16 tile matrix j is, per operand, as (row block, column block):
//   A (Q): (0,0) (1,0) (0,1) (1,1): a0..a3 of m16n8k16 (rows g / g + 8, k 2t / 2t + 8)
//   B (K, stored [n][k]): (0,0) (0,1) (1,0) (1,1): b0, b1 of keys 0-7, then of keys 8-15
//   B (V, stored [k][n], .trans): (0,0) (1,0) (0,1) (1,1): b0, b1 of columns 0-7, then 8-15
FEP_DEVICE int fep_ldsm_block_row(int kind, int j) { return kind == 1 ? j >> 1 : j & 1; }
FEP_DEVICE int fep_ldsm_block_col(int kind, int j) { return kind == 1 ? j & 1 : j >> 1; }
// The row this lane gives the address of: matrix lane / 8, its row lane % 8.
template <typename In>
FEP_DEVICE const In* fep_ldsm_row(int kind, const In* tile, int stride, int lane) {
    const int j = lane >> 3;
    return tile + (8 * fep_ldsm_block_row(kind, j) + (lane & 7)) * stride + 8 * fep_ldsm_block_col(kind, j);
}

#if defined(FEP_EMULATE)
template <typename In>
FEP_DEVICE uint32_t fep_emu_bits2(const In* a, const In* b) {
    uint16_t x, y;
    std::memcpy(&x, a, 2);
    std::memcpy(&y, b, 2);
    return (uint32_t)x | ((uint32_t)y << 16);
}
template <typename In>
FEP_DEVICE void fep_ldsm_x4(uint32_t (&r)[4], int kind, bool trans, const In* tile, int stride) {
    const int lane = (int)fep_lane();
    for (int j = 0; j < 4; ++j) {
        if (!trans) {
            const In* row = fep_ldsm_row(kind, tile, stride, 8 * j + (lane >> 2));
            r[j] = fep_emu_bits2(row + 2 * (lane & 3), row + 2 * (lane & 3) + 1);
        } else {
            const In* r0 = fep_ldsm_row(kind, tile, stride, 8 * j + 2 * (lane & 3));
            const In* r1 = fep_ldsm_row(kind, tile, stride, 8 * j + 2 * (lane & 3) + 1);
            r[j] = fep_emu_bits2(r0 + (lane >> 2), r1 + (lane >> 2));
        }
    }
}
#else
template <typename In>
FEP_DEVICE void fep_ldsm_x4(uint32_t (&r)[4], int kind, bool trans, const In* tile, int stride) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(fep_ldsm_row(kind, tile, stride, (int)fep_lane()));
    if (trans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
}
#endif

template <typename In>
FEP_DEVICE void FepTile<In>::load_q(Frag& f, const In* tile, int stride) {
    fep_ldsm_x4(f.r, 0, false, tile, stride);
}
template <typename In>
FEP_DEVICE void FepTile<In>::load_k(Frag& f, const In* tile, int stride) {
    fep_ldsm_x4(f.r, 1, false, tile, stride);
}
template <typename In>
FEP_DEVICE void FepTile<In>::load_v(Frag& f, const In* tile, int stride) {
    fep_ldsm_x4(f.r, 0, true, tile, stride);
}

#if defined(FEP_EMULATE)
// m16n8k16 from the registers of the whole warp, through the PTX operand tables:
//   A: lane L register j element h holds A[g + 8 (j & 1)][2t + h + 8 (j >> 1)]
//   B (two n8 tiles side by side, as load_k / load_v leave them): register j element h holds
//      B[k = 2t + h + 8 (j & 1)][n = g + 8 (j >> 1)]
//   C: row tile (row, col) above. g = L / 4, t = L % 4.
template <typename In, int N>
FEP_DEVICE void fep_emu_mma_nv(float (&c)[N][FEP_MMA_ACC], const typename FepTile<In>::Frag& a,
                               const typename FepTile<In>::Frag (&b)[N]) {
    using Frag = typename FepTile<In>::Frag;
    struct All {
        Frag a, b[N];
    } mine;
    mine.a = a;
    for (int n = 0; n < N; ++n) mine.b[n] = b[n];
    static_assert(sizeof(All) <= FEP_EMU_SHARE_BYTES, "fragments too large to share");
    const unsigned char* table = fep_emu_warp_share(&mine, sizeof(All));
    float A[16][16], B[N][16][16];  // B[n][col][k]
    for (int L = 0; L < 32; ++L) {
        All other;
        std::memcpy(&other, table + L * FEP_EMU_SHARE_BYTES, sizeof(All));
        const int g = L >> 2, t = L & 3;
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
                A[g + 8 * (j & 1)][2 * t + h + 8 * (j >> 1)] = fep_emu_half<In>(other.a.r[j], h);
                for (int n = 0; n < N; ++n)
                    B[n][g + 8 * (j >> 1)][2 * t + h + 8 * (j & 1)] = fep_emu_half<In>(other.b[n].r[j], h);
            }
    }
    fep_emu_warp_release();
    const int lane = (int)fep_lane();
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < FEP_MMA_ACC; ++i) {
            const int r = FepTile<In>::row(lane, i), col = FepTile<In>::col(lane, i);
            float s = c[n][i];
            for (int k = 0; k < 16; ++k) s = fmaf(A[r][k], B[n][col][k], s);
            c[n][i] = s;
        }
}
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::qk(float (&s)[N][kAcc], const Frag& q, const Frag (&k)[N]) {
    fep_emu_mma_nv<In, N>(s, q, k);
}
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::pv(float (&o)[N][kAcc], const Frag& p, const Frag (&v)[N]) {
    fep_emu_mma_nv<In, N>(o, p, v);
}
#else
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::qk(float (&s)[N][kAcc], const Frag& q, const Frag (&k)[N]) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
        fep_mma_m16n8k16(s[n], q.r[0], q.r[1], q.r[2], q.r[3], k[n].r[0], k[n].r[1], In());
        fep_mma_m16n8k16(s[n] + 4, q.r[0], q.r[1], q.r[2], q.r[3], k[n].r[2], k[n].r[3], In());
    }
}
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::pv(float (&o)[N][kAcc], const Frag& p, const Frag (&v)[N]) {
    qk<N>(o, p, v);  // the same instruction: A rows times B given as (n, k) pairs per lane
}
#endif

// ---- AMD CDNA: 8-byte reads and the transposed MFMA (and the emulator at warp 64) -------------
#else
template <typename In>
FEP_DEVICE void FepTile<In>::load_q(Frag& f, const In* tile, int stride) {
    const int lane = (int)fep_lane();
    const uint2 w = *(const uint2*)(tile + (lane & 15) * stride + 4 * (lane >> 4));
    f.r[0] = w.x, f.r[1] = w.y;
}
template <typename In>
FEP_DEVICE void FepTile<In>::load_k(Frag& f, const In* tile, int stride) {
    load_q(f, tile, stride);
}
template <typename In>
FEP_DEVICE void FepTile<In>::load_v(Frag& f, const In* tile, int stride) {
    // V^T's operand: lane l holds V[4 (l / 16) + i][l % 16], i < 4.
    const int lane = (int)fep_lane();
    const In* c = tile + 4 * (lane >> 4) * stride + (lane & 15);
    uint16_t e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) __builtin_memcpy(&e[i], c + i * stride, 2);
    f.r[0] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    f.r[1] = (uint32_t)e[2] | ((uint32_t)e[3] << 16);
}

#if defined(FEP_EMULATE)
// v_mfma_f32_16x16x16: lane l holds A[l % 16][4 (l / 16) + i], B[4 (l / 16) + i][l % 16] and
// C[4 (l / 16) + i][l % 16], element i = 2 (register) + half.
template <typename In, int N>
FEP_DEVICE void fep_emu_mfma(float (&c)[N][FEP_MMA_ACC], const typename FepTile<In>::Frag (&a)[N],
                             const typename FepTile<In>::Frag& b) {
    using Frag = typename FepTile<In>::Frag;
    struct All {
        Frag a[N], b;
    } mine;
    for (int n = 0; n < N; ++n) mine.a[n] = a[n];
    mine.b = b;
    static_assert(sizeof(All) <= FEP_EMU_SHARE_BYTES, "fragments too large to share");
    const unsigned char* table = fep_emu_warp_share(&mine, sizeof(All));
    float A[N][16][16], B[16][16];  // A[n][m][k], B[k][col]
    for (int L = 0; L < 64; ++L) {
        All other;
        std::memcpy(&other, table + L * FEP_EMU_SHARE_BYTES, sizeof(All));
        for (int e = 0; e < 4; ++e) {
            for (int n = 0; n < N; ++n) A[n][L & 15][4 * (L >> 4) + e] = fep_emu_half<In>(other.a[n].r[e >> 1], e & 1);
            B[4 * (L >> 4) + e][L & 15] = fep_emu_half<In>(other.b.r[e >> 1], e & 1);
        }
    }
    fep_emu_warp_release();
    const int lane = (int)fep_lane();
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < 4; ++i) {
            const int r = 4 * (lane >> 4) + i, col = lane & 15;
            float s = c[n][i];
            for (int k = 0; k < 16; ++k) s = fmaf(A[n][r][k], B[k][col], s);
            c[n][i] = s;
        }
}
template <typename In, int N>
FEP_DEVICE void fep_tile_mfma(float (&c)[N][FEP_MMA_ACC], const typename FepTile<In>::Frag (&a)[N],
                              const typename FepTile<In>::Frag& b) {
    fep_emu_mfma<In, N>(c, a, b);
}
#else
template <typename In, int N>
FEP_DEVICE void fep_tile_mfma(float (&c)[N][FEP_MMA_ACC], const typename FepTile<In>::Frag (&a)[N],
                              const typename FepTile<In>::Frag& b) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
        fep_f32x4 acc = {c[n][0], c[n][1], c[n][2], c[n][3]};
        if constexpr (fep_same_type<In, fep_f16>::value) {
            acc = __builtin_amdgcn_mfma_f32_16x16x16f16(__builtin_bit_cast(fep_h16x4, a[n]),
                                                       __builtin_bit_cast(fep_h16x4, b), acc, 0, 0, 0);
        } else {
            acc = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(__builtin_bit_cast(fep_s16x4, a[n]),
                                                           __builtin_bit_cast(fep_s16x4, b), acc, 0, 0, 0);
        }
        c[n][0] = acc[0], c[n][1] = acc[1], c[n][2] = acc[2], c[n][3] = acc[3];
    }
}
#endif

// S^T = K Q^T: A = the keys' rows, B = Q^T (q's rows, read the same way).
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::qk(float (&s)[N][kAcc], const Frag& q, const Frag (&k)[N]) {
    fep_tile_mfma<In, N>(s, k, q);
}
// O^T = V^T P^T: A = V^T (load_v), B = P^T, which is the score tile's layout.
template <typename In>
template <int N>
FEP_DEVICE void FepTile<In>::pv(float (&o)[N][kAcc], const Frag& p, const Frag (&v)[N]) {
    fep_tile_mfma<In, N>(o, v, p);
}
#endif
