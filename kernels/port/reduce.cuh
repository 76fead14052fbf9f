// reduce.cuh: warp and block reductions and scans, written for any warp size (32 or 64).
//
// Block-level helpers need `scratch`, shared memory of at least FEP_MAX_WARPS elements of the
// reduced type, and must be called by every thread of the block (they contain barriers).
#pragma once
#include "vendor.cuh"

// Enough for 1024 threads with 32-wide warps; a wave64 block needs half of it.
#define FEP_MAX_WARPS 32

struct FepSum {
    template <typename T>
    FEP_DEVICE T operator()(T a, T b) const { return a + b; }
};
struct FepMax {
    FEP_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <int kWarp, typename T, typename Op>
FEP_DEVICE T warp_allreduce(T v, Op op) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, fep_shfl_xor(v, offset));
    return v;
}

// Every thread gets the block-wide result.
template <int kWarp, typename T, typename Op>
FEP_DEVICE T block_allreduce(T v, Op op, T identity, T* scratch) {
    const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
    v = warp_allreduce<kWarp>(v, op);
    __syncthreads();  // scratch may still be read by a previous call
    if (fep_lane() == 0) scratch[fep_warp_id()] = v;
    __syncthreads();
    T r = identity;
    for (int w = 0; w < nwarps; ++w) r = op(r, scratch[w]);
    return r;
}

// Inclusive prefix sum within a warp (Hillis-Steele over shuffles).
template <int kWarp>
FEP_DEVICE int warp_inclusive_scan(int v) {
    const int lane = (int)fep_lane();
#pragma unroll
    for (int d = 1; d < kWarp; d *= 2) {
        int up = fep_shfl_up(v, d);
        if (lane >= d) v += up;
    }
    return v;
}

// Exclusive prefix sum over the block, in thread order; `*total` receives the block's sum.
template <int kWarp>
FEP_DEVICE int block_exclusive_scan(int v, int* scratch, int* total) {
    const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
    const int incl = warp_inclusive_scan<kWarp>(v);
    __syncthreads();
    if (fep_lane() == kWarp - 1 || threadIdx.x == blockDim.x - 1) scratch[fep_warp_id()] = incl;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nwarps; ++w) {
        const int s = scratch[w];
        if (w < (int)fep_warp_id()) before += s;
        all += s;
    }
    *total = all;
    return before + incl - v;
}
