// vendor.cuh: the whole CUDA <-> HIP difference, in one place.
//
// Every kernel includes this (through types.cuh / reduce.cuh) and is then written once, in the
// FEP_* vocabulary below. No other file under kernels/ may test for a vendor.
#pragma once

#if defined(FEP_EMULATE)
// Host threads standing in for a GPU, for tests (emulate.cuh); the warp size is FEP_EMU_WARP.
#include "emulate.cuh"
#elif defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define FEP_HIP 1
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#else
#define FEP_CUDA 1
#include <cuda_fp16.h>
#endif

#include <stdint.h>

// ---- warp (NVIDIA) / wavefront (AMD) size, as a compile-time constant -------------------------
// CDNA (gfx9: gfx90a, gfx942) runs wave64; RDNA (gfx10+, gfx11) defaults to wave32. warpSize is
// not a constant expression on recent ROCm, so it is derived from the target macros of the
// device pass. The host pass never runs device code; any value works there.
#if defined(FEP_EMULATE)
#define FEP_WARP_SIZE FEP_EMU_WARP
#elif defined(FEP_HIP)
#if defined(__GFX9__)
#define FEP_WARP_SIZE 64
#else
#define FEP_WARP_SIZE 32
#endif
#else
#define FEP_WARP_SIZE 32
#endif

// ---- launch bounds ---------------------------------------------------------------------------
// Only the first argument (max threads per block) means the same on both: HIP's second is
// "min waves per EU", CUDA's "min blocks per SM". On CUDA we pass 1 block per SM: no register
// cap beyond the block size, and ptxas 13.0 then stops spilling uniform registers to local
// memory in kernels with many uniform values (seen at 40 registers in the LCA stepped kernels).
#if defined(FEP_HIP) || defined(FEP_EMULATE)
#define FEP_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads)
#else
#define FEP_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads, 1)
#endif

#if defined(FEP_EMU_SCAN)
// build.rs preprocesses each source with this to list its kernels.
#define FEP_KERNEL fep_emu_kernel_marker
#elif defined(FEP_EMULATE)
// A plain C++ function: build.rs wraps each emulated source in a namespace per warp size.
#define FEP_KERNEL __global__
#else
#define FEP_KERNEL extern "C" __global__
#endif
#define FEP_DEVICE __device__ __forceinline__

// ---- warp-level primitives -----------------------------------------------------------------
// The lane mask is the full warp: every caller in this library has all lanes of the warp
// active (reductions and scans are called with uniform control flow).
#if defined(FEP_EMULATE)
template <typename T>
FEP_DEVICE T fep_emu_shfl(T v, int src_lane, bool keep_if_out_of_range) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = fep_emu_exchange(bits, src_lane, keep_if_out_of_range);
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}
template <typename T>
FEP_DEVICE T fep_shfl_xor(T v, int lane_mask) {
    return fep_emu_shfl(v, (int)(threadIdx.x % FEP_WARP_SIZE) ^ lane_mask, false);
}
template <typename T>
FEP_DEVICE T fep_shfl_up(T v, int delta) {
    return fep_emu_shfl(v, (int)(threadIdx.x % FEP_WARP_SIZE) - delta, true);
}
template <typename T>
FEP_DEVICE T fep_shfl(T v, int src_lane) {
    return fep_emu_shfl(v, src_lane, false);
}
#elif defined(FEP_HIP)
template <typename T>
FEP_DEVICE T fep_shfl_xor(T v, int lane_mask) {
    return __shfl_xor(v, lane_mask, FEP_WARP_SIZE);
}
template <typename T>
FEP_DEVICE T fep_shfl_up(T v, int delta) {
    return __shfl_up(v, delta, FEP_WARP_SIZE);
}
template <typename T>
FEP_DEVICE T fep_shfl(T v, int src_lane) {
    return __shfl(v, src_lane, FEP_WARP_SIZE);
}
#else
#define FEP_FULL_MASK 0xffffffffu
template <typename T>
FEP_DEVICE T fep_shfl_xor(T v, int lane_mask) {
    return __shfl_xor_sync(FEP_FULL_MASK, v, lane_mask, FEP_WARP_SIZE);
}
template <typename T>
FEP_DEVICE T fep_shfl_up(T v, int delta) {
    return __shfl_up_sync(FEP_FULL_MASK, v, delta, FEP_WARP_SIZE);
}
template <typename T>
FEP_DEVICE T fep_shfl(T v, int src_lane) {
    return __shfl_sync(FEP_FULL_MASK, v, src_lane, FEP_WARP_SIZE);
}
#endif

// ---- dynamic shared memory -------------------------------------------------------------------
// One declaration per kernel: `FEP_DYNAMIC_SMEM(float, smem);`
#if defined(FEP_EMULATE)
#define FEP_DYNAMIC_SMEM(type, name) type* name = (type*)fep_emu_dynamic_smem()
#else
#define FEP_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

FEP_DEVICE unsigned fep_lane() { return threadIdx.x % FEP_WARP_SIZE; }
FEP_DEVICE unsigned fep_warp_id() { return threadIdx.x / FEP_WARP_SIZE; }

// ---- fast base-2 exponential and logarithm (the special-function units) ------------------------
// ex2.approx / lg2.approx on NVIDIA (MUFU, 2^-22 relative), v_exp_f32 / v_log_f32 on AMD (1 ULP);
// exp2(-inf) = 0 on both. The emulator uses the exact library functions.
#if defined(FEP_EMULATE)
FEP_DEVICE float fep_exp2(float x) { return std::exp2(x); }
FEP_DEVICE float fep_log2(float x) { return std::log2(x); }
#elif defined(FEP_HIP)
FEP_DEVICE float fep_exp2(float x) { return __builtin_amdgcn_exp2f(x); }
FEP_DEVICE float fep_log2(float x) { return __builtin_amdgcn_logf(x); }
#else
FEP_DEVICE float fep_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
FEP_DEVICE float fep_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// ---- 2^x on the FMA units (FlashAttention-4's trick), for x <= 0 ------------------------------
// Moves part of a kernel's exponentials off the special-function unit when that unit is the
// bottleneck (Student-t and Laplace take two special functions per score). x is split as j + f
// with j = round(x) (adding 1.5 * 2^23 rounds in the FADD unit; no conversion instruction) and
// f in [-0.5, 0.5]; 2^f is a degree-3 polynomial (weighted minimax, relative error 7.5e-5: below
// half an f16 ulp, far below bf16's), and j goes straight into the exponent bits. x < -126
// (including -inf) gives 0. About 10 FMA-pipe instructions against one MUFU.EX2.
FEP_DEVICE float fep_exp2_poly(float x) {
    const float xc = fmaxf(x, -126.0f);
    const float magic = 12582912.0f;  // 1.5 * 2^23
    const float t = xc + magic;
    const float f = xc - (t - magic);
    float p = fmaf(0.05517113208770752f, f, 0.24261008203029633f);
    p = fmaf(p, f, 0.6932609677314758f);
    p = fmaf(p, f, 0.9999281167984009f);
    const int j = (int)(__float_as_uint(t) - __float_as_uint(magic));
    const float r = __uint_as_float(__float_as_uint(p) + ((uint32_t)j << 23));
    return x < -126.0f ? 0.0f : r;
}

// Square root without IEEE rounding (the 16-bit paths' Laplace distance): MUFU.SQRT on NVIDIA,
// v_sqrt_f32 on AMD, exact in the emulator.
#if defined(FEP_EMULATE)
FEP_DEVICE float fep_sqrt_approx(float x) { return std::sqrt(x); }
#elif defined(FEP_HIP)
FEP_DEVICE float fep_sqrt_approx(float x) { return __builtin_amdgcn_sqrtf(x); }
#else
FEP_DEVICE float fep_sqrt_approx(float x) {
    float y;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif
