// mma.cuh: one warp multiplies 16 x 16 tiles on the tensor cores (matrix cores on AMD).
//
//   C[16][16] (f32) += A[16][kK] * B[kK][16]
//
// A and B are read element by element through functors: a(row, k) and b(col, k) return f32
// values (the caller applies bounds, activations and precisions there), rounded to the input type
// In on load, or values of type In, used as they are. In = float (tf32 on NVIDIA, full f32 on AMD), fep_f16 or fep_bf16;
// accumulation is f32 everywhere.
//
//   NVIDIA (warp 32): two mma.sync.m16n8k8 (tf32) or m16n8k16 (f16/bf16) per 16 x 16 tile;
//                     8 accumulators per lane.
//   AMD CDNA (wave64): v_mfma_f32_16x16x4f32 or v_mfma_f32_16x16x16{f16,bf16_1k};
//                     4 accumulators per lane.
//
// Which element of C each accumulator holds is given by acc_row/acc_col; callers never assume
// a layout. The emulator (warp 32: the NVIDIA layout, warp 64: the AMD one) computes the same
// products from the same functors and the same rounding, so a caller that mixes up rows and
// columns or leaves an element unowned fails its tests without a GPU. What it cannot check is
// the hardware's own operand layout (the coordinate tables below come from the PTX ISA and
// AMD's matrix instruction tables).
#pragma once
#include "types.cuh"

#if defined(FEP_HIP) && defined(__HIP_DEVICE_COMPILE__) && !defined(__GFX9__)
#error "mma.cuh: only CDNA (gfx9, wave64) matrix cores are supported on AMD"
#endif

#if (defined(FEP_EMULATE) && FEP_EMU_WARP == 64) || defined(FEP_HIP)
#define FEP_MMA_AMD 1
#else
#define FEP_MMA_NV 1
#endif

// Accumulators per lane for one 16 x 16 tile.
#define FEP_MMA_ACC (256 / FEP_WARP_SIZE)

// ---- rounding to the input type, as the hardware sees it ---------------------------------------
template <typename In>
FEP_DEVICE float fep_mma_round(float v);
template <>
FEP_DEVICE float fep_mma_round<float>(float v) {
#if defined(FEP_MMA_NV)
    // tf32: round to nearest (ties away) at 10 mantissa bits, as cvt.rna.tf32.f32.
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    return __uint_as_float(u);
#else
    return v;  // MFMA f32 multiplies in full precision
#endif
}
template <>
FEP_DEVICE float fep_mma_round<fep_f16>(float v) { return fep_to_f32(fep_from_f32<fep_f16>(v)); }
template <>
FEP_DEVICE float fep_mma_round<fep_bf16>(float v) { return fep_to_f32(fep_from_f32<fep_bf16>(v)); }

// An operand as the input type: functors may return f32 (rounded here) or In itself (taken as
// is: no conversion in the inner loop when the caller already holds In, e.g. in shared memory).
template <typename A, typename B>
struct fep_same_type {
    static constexpr bool value = false;
};
template <typename A>
struct fep_same_type<A, A> {
    static constexpr bool value = true;
};
template <typename In, typename V>
FEP_DEVICE In fep_mma_in(V v) {
    if constexpr (fep_same_type<V, In>::value) {
        return v;
    } else {
        return fep_from_f32<In>(v);
    }
}
// The value the hardware multiplies (the emulator's operand).
template <typename In, typename V>
FEP_DEVICE float fep_mma_operand(V v) {
    return fep_mma_round<In>(fep_to_f32(fep_mma_in<In>(v)));
}

template <typename In>
struct FepMma {
#if defined(FEP_MMA_NV)
    static constexpr int kK = sizeof(In) == 4 ? 8 : 16;
#else
    static constexpr int kK = sizeof(In) == 4 ? 4 : 16;
#endif
    // Row and column of C held by accumulator i of `lane`.
    static FEP_DEVICE int acc_row(int lane, int i) {
#if defined(FEP_MMA_NV)
        return (lane >> 2) + 8 * ((i >> 1) & 1);
#else
        return 4 * (lane >> 4) + i;
#endif
    }
    static FEP_DEVICE int acc_col(int lane, int i) {
#if defined(FEP_MMA_NV)
        return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
#else
        return lane & 15;
#endif
    }

    // Rows of C per lane ("slots"): accumulator i holds row slot_row(lane, row_slot(i)). The
    // lanes holding one row differ only in their low log2(kRowLanes) lane bits, so a row
    // reduction is a butterfly over those bits (row_allreduce).
#if defined(FEP_MMA_NV)
    static constexpr int kRowSlots = 2, kRowLanes = 4;
    static FEP_DEVICE int row_slot(int i) { return (i >> 1) & 1; }
    static FEP_DEVICE int slot_row(int lane, int s) { return (lane >> 2) + 8 * s; }
#else
    static constexpr int kRowSlots = 4, kRowLanes = 16;
    static FEP_DEVICE int row_slot(int i) { return i; }
    static FEP_DEVICE int slot_row(int lane, int s) { return 4 * (lane >> 4) + s; }
#endif
    // `op` over the kRowLanes lanes that hold the same rows; every lane gets the result.
    template <typename Op>
    static FEP_DEVICE float row_allreduce(float v, Op op) {
#pragma unroll
        for (int m = 1; m < kRowLanes; m <<= 1) v = op(v, fep_shfl_xor(v, m));
        return v;
    }

    // For NT tiles side by side: acc[j] += A[0:16][k0:k0+kK] B[k0:k0+kK][16j:16j+16], with the
    // A fragment loaded once. Every lane of the warp calls it, with the same k0.
    template <int NT, typename FA, typename FB>
    static FEP_DEVICE void run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0);
};

#if defined(FEP_EMULATE)
// The emulator: each lane computes the accumulators it owns, from the functors, with the same
// rounding of the inputs (f32 accumulation in k order).
template <typename In>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<In>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane();
    for (int j = 0; j < NT; ++j) {
        for (int i = 0; i < FEP_MMA_ACC; ++i) {
            const int r = acc_row(lane, i), c = 16 * j + acc_col(lane, i);
            float s = acc[j][i];
            for (int k = 0; k < kK; ++k)
                s = fmaf(fep_mma_operand<In>(a(r, k0 + k)), fep_mma_operand<In>(b(c, k0 + k)), s);
            acc[j][i] = s;
        }
    }
}
#elif defined(FEP_CUDA)
FEP_DEVICE uint32_t fep_tf32(float v) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}
FEP_DEVICE uint32_t fep_pack2(fep_f16 lo, fep_f16 hi) {
    return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}
FEP_DEVICE uint32_t fep_pack2(fep_bf16 lo, fep_bf16 hi) { return (uint32_t)lo.bits | ((uint32_t)hi.bits << 16); }

template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<float>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane(), g = lane >> 2, t = lane & 3;
    const uint32_t a0 = fep_tf32(a(g, k0 + t)), a1 = fep_tf32(a(g + 8, k0 + t));
    const uint32_t a2 = fep_tf32(a(g, k0 + t + 4)), a3 = fep_tf32(a(g + 8, k0 + t + 4));
#pragma unroll
    for (int h = 0; h < 2 * NT; ++h) {
        const uint32_t b0 = fep_tf32(b(8 * h + g, k0 + t)), b1 = fep_tf32(b(8 * h + g, k0 + t + 4));
        float* c = acc[h >> 1] + 4 * (h & 1);
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// One m16n8k16, the input type picked by the tag argument.
FEP_DEVICE void fep_mma_m16n8k16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                 uint32_t b1, fep_f16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
FEP_DEVICE void fep_mma_m16n8k16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                 uint32_t b1, fep_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// f16 and bf16: m16n8k16, two consecutive k per 32-bit register (the lower k in the low half).
template <typename In, int NT, typename FA, typename FB>
FEP_DEVICE void fep_mma_nv16(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane(), g = lane >> 2, t = lane & 3;
    auto pa = [&](int r, int k) { return fep_pack2(fep_mma_in<In>(a(r, k)), fep_mma_in<In>(a(r, k + 1))); };
    auto pb = [&](int c, int k) { return fep_pack2(fep_mma_in<In>(b(c, k)), fep_mma_in<In>(b(c, k + 1))); };
    const uint32_t a0 = pa(g, k0 + 2 * t), a1 = pa(g + 8, k0 + 2 * t);
    const uint32_t a2 = pa(g, k0 + 2 * t + 8), a3 = pa(g + 8, k0 + 2 * t + 8);
#pragma unroll
    for (int h = 0; h < 2 * NT; ++h) {
        const uint32_t b0 = pb(8 * h + g, k0 + 2 * t), b1 = pb(8 * h + g, k0 + 2 * t + 8);
        fep_mma_m16n8k16(acc[h >> 1] + 4 * (h & 1), a0, a1, a2, a3, b0, b1, In());
    }
}

template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<fep_f16>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    fep_mma_nv16<fep_f16, NT>(acc, a, b, k0);
}
template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<fep_bf16>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    fep_mma_nv16<fep_bf16, NT>(acc, a, b, k0);
}
#else  // FEP_HIP, CDNA
typedef float fep_f32x4 __attribute__((ext_vector_type(4)));
typedef _Float16 fep_h16x4 __attribute__((ext_vector_type(4)));
typedef short fep_s16x4 __attribute__((ext_vector_type(4)));

// Lane l holds A[l % 16][kq + i] and B[kq + i][l % 16] for kq = k0 + 4 (l / 16) (i < 4 for the
// 16-bit types, i = 0 with kq = k0 + l / 16 for f32), and C[4 (l / 16) + i][l % 16].
template <int NT>
FEP_DEVICE void fep_mfma(float (&acc)[NT][FEP_MMA_ACC], int j, fep_f32x4 c) {
    acc[j][0] = c[0], acc[j][1] = c[1], acc[j][2] = c[2], acc[j][3] = c[3];
}
template <int NT>
FEP_DEVICE fep_f32x4 fep_mfma_acc(float (&acc)[NT][FEP_MMA_ACC], int j) {
    fep_f32x4 c = {acc[j][0], acc[j][1], acc[j][2], acc[j][3]};
    return c;
}

template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<float>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane(), r = lane & 15, k = k0 + (lane >> 4);
    const float av = a(r, k);
#pragma unroll
    for (int j = 0; j < NT; ++j)
        fep_mfma(acc, j, __builtin_amdgcn_mfma_f32_16x16x4f32(av, b(16 * j + r, k), fep_mfma_acc(acc, j), 0, 0, 0));
}
template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<fep_f16>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane(), r = lane & 15, k = k0 + 4 * (lane >> 4);
    fep_h16x4 av;
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = __builtin_bit_cast(_Float16, fep_mma_in<fep_f16>(a(r, k + i)));
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        fep_h16x4 bv;
#pragma unroll
        for (int i = 0; i < 4; ++i) bv[i] = __builtin_bit_cast(_Float16, fep_mma_in<fep_f16>(b(16 * j + r, k + i)));
        fep_mfma(acc, j, __builtin_amdgcn_mfma_f32_16x16x16f16(av, bv, fep_mfma_acc(acc, j), 0, 0, 0));
    }
}
template <>
template <int NT, typename FA, typename FB>
FEP_DEVICE void FepMma<fep_bf16>::run(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    const int lane = (int)fep_lane(), r = lane & 15, k = k0 + 4 * (lane >> 4);
    fep_s16x4 av;
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = (short)fep_mma_in<fep_bf16>(a(r, k + i)).bits;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        fep_s16x4 bv;
#pragma unroll
        for (int i = 0; i < 4; ++i) bv[i] = (short)fep_mma_in<fep_bf16>(b(16 * j + r, k + i)).bits;
        fep_mfma(acc, j, __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(av, bv, fep_mfma_acc(acc, j), 0, 0, 0));
    }
}
#endif

// As FepMma<In>::run, accurate to f32 for In = float on NVIDIA: tf32 keeps 10 mantissa bits,
// so each operand is split into tf32 high and low parts and three products are summed
// (hi*hi + hi*lo + lo*hi, the lo*lo term is below f32 rounding). The two small products go to
// the accumulator `small`, which the caller adds to acc at the end (fep_mma_add): the big
// accumulator then takes one rounding per k-step, as an exact f32 product would, instead of
// three (the small terms are 2^-11 of the big ones, so their own roundings are negligible).
// `small` may be acc itself (fep_mma_run_accurate). AMD's f32 MFMA and the 16-bit types need
// one pass into acc; `small` is untouched.
template <typename In, int NT, typename FA, typename FB>
FEP_DEVICE void fep_mma_run_split(float (&acc)[NT][FEP_MMA_ACC], float (&small)[NT][FEP_MMA_ACC], const FA& a,
                                  const FB& b, int k0) {
#if defined(FEP_MMA_NV)
    if constexpr (sizeof(In) == 4) {
        auto a_hi = [&](int r, int k) { return fep_mma_round<float>(a(r, k)); };
        auto b_hi = [&](int c, int k) { return fep_mma_round<float>(b(c, k)); };
        auto a_lo = [&](int r, int k) { const float x = a(r, k); return x - fep_mma_round<float>(x); };
        auto b_lo = [&](int c, int k) { const float x = b(c, k); return x - fep_mma_round<float>(x); };
        FepMma<float>::template run<NT>(small, a_lo, b_hi, k0);
        FepMma<float>::template run<NT>(small, a_hi, b_lo, k0);
        FepMma<float>::template run<NT>(acc, a_hi, b_hi, k0);
        return;
    }
#endif
    FepMma<In>::template run<NT>(acc, a, b, k0);
}

// fep_mma_run_split with one accumulator for all three products (the attention kernels).
template <typename In, int NT, typename FA, typename FB>
FEP_DEVICE void fep_mma_run_accurate(float (&acc)[NT][FEP_MMA_ACC], const FA& a, const FB& b, int k0) {
    fep_mma_run_split<In, NT>(acc, acc, a, b, k0);
}

// acc += small after fep_mma_run_split (nothing where it ran one pass: small is still 0, and
// x + 0 is not folded away by an IEEE-strict compiler).
template <typename In, int NT>
FEP_DEVICE void fep_mma_add(float (&acc)[NT][FEP_MMA_ACC], const float (&small)[NT][FEP_MMA_ACC]) {
#if defined(FEP_MMA_NV)
    if constexpr (sizeof(In) == 4) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < FEP_MMA_ACC; ++i) acc[j][i] += small[j][i];
    }
#endif
}

template <typename In, int NT, typename FA, typename FB, typename Epi>
FEP_DEVICE void fep_mma_tile(int K, const FA& a, const FB& b, bool accurate, const Epi& epi) {
    float acc[NT][FEP_MMA_ACC], small[NT][FEP_MMA_ACC];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < FEP_MMA_ACC; ++i) acc[j][i] = small[j][i] = 0.0f;
    if (accurate) {
        for (int k0 = 0; k0 < K; k0 += FepMma<In>::kK) fep_mma_run_split<In, NT>(acc, small, a, b, k0);
        fep_mma_add<In, NT>(acc, small);
    } else {
        for (int k0 = 0; k0 < K; k0 += FepMma<In>::kK) FepMma<In>::template run<NT>(acc, a, b, k0);
    }
    const int lane = (int)fep_lane();
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < FEP_MMA_ACC; ++i)
            epi(FepMma<In>::acc_row(lane, i), 16 * j + FepMma<In>::acc_col(lane, i), acc[j][i]);
}
