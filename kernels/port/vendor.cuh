// vendor.cuh: the whole CUDA <-> HIP difference, in one place.
//
// Every kernel includes this (through types.cuh / reduce.cuh) and is then written once, in the
// FEP_* vocabulary below. No other file under kernels/ may test for a vendor.
#pragma once

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
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
#if defined(FEP_HIP)
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
#if defined(FEP_HIP)
#define FEP_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads)
#else
#define FEP_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads, 1)
#endif

#define FEP_KERNEL extern "C" __global__
#define FEP_DEVICE __device__ __forceinline__

// ---- warp-level primitives -----------------------------------------------------------------
// The lane mask is the full warp: every caller in this library has all lanes of the warp
// active (reductions and scans are called with uniform control flow).
#if defined(FEP_HIP)
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
#define FEP_DYNAMIC_SMEM(type, name) extern __shared__ type name[]

FEP_DEVICE unsigned fep_lane() { return threadIdx.x % FEP_WARP_SIZE; }
FEP_DEVICE unsigned fep_warp_id() { return threadIdx.x / FEP_WARP_SIZE; }
