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

// Sums N values at once over the block, in place (one pair of barriers for all N).
// `scratch` holds N * FEP_MAX_WARPS floats.
template <int kWarp, int N>
FEP_DEVICE void block_allreduce_n(float* v, float* scratch) {
    const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_allreduce<kWarp>(v[i], FepSum());
    __syncthreads();
    if (fep_lane() == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) scratch[i * FEP_MAX_WARPS + fep_warp_id()] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float r = 0.0f;
        for (int w = 0; w < nwarps; ++w) r += scratch[i * FEP_MAX_WARPS + w];
        v[i] = r;
    }
}

// Exclusive prefix sum over a block of kThreads threads, in thread order; `*total` gets the
// block's sum. Through shared memory in chunks of 16, without shuffles: a shuffle scan needs a
// lane mask per level, which on wave64 GPUs pins 2 scalar registers each for the whole kernel.
// `scratch` holds kThreads + kThreads / 16 ints. Deterministic (no atomics).
#define FEP_SCAN_CHUNK 16
template <int kThreads>
FEP_DEVICE int block_exclusive_scan(int v, int* scratch, int* total) {
    static_assert(kThreads % FEP_SCAN_CHUNK == 0, "block size must be a multiple of 16");
    constexpr int kChunks = kThreads / FEP_SCAN_CHUNK;
    int* chunk_sum = scratch + kThreads;
    const int t = threadIdx.x;
    __syncthreads();  // scratch may still be read by a previous call
    scratch[t] = v;
    __syncthreads();
    if (t < kChunks) {
        int s = 0;
        for (int i = 0; i < FEP_SCAN_CHUNK; ++i) s += scratch[t * FEP_SCAN_CHUNK + i];
        chunk_sum[t] = s;
    }
    __syncthreads();
    // Loop bounds that depend on the thread, not compares inside unrolled loops: a compare per
    // unrolled iteration would again pin a lane mask each.
    const int chunk = t / FEP_SCAN_CHUNK;
    int before = 0, all = 0;
    for (int c = 0; c < chunk; ++c) before += chunk_sum[c];
    for (int i = chunk * FEP_SCAN_CHUNK; i < t; ++i) before += scratch[i];
#pragma unroll 1
    for (int c = 0; c < kChunks; ++c) all += chunk_sum[c];
    *total = all;
    return before;
}
