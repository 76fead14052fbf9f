// mma_check.cu: one warp's tensor-core product on its own, for checking port/mma.cuh on a new
// GPU (tests/mma_gpu.rs): C[16][32] = A[16][K] B[K][32], A and B row-major f32, rounded to the
// input type on load. With small integer inputs every input type is exact, so any difference
// from the host product is a wrong fragment layout, not rounding.
//
// Every warp of the block computes the same tile and writes the same values (the host does not
// need to know the warp size).
#include "mma.cuh"

#define MMA_CHECK_NT 2

template <typename In>
FEP_DEVICE void mma_check(const float* a, const float* b, float* c, int K) {
    constexpr int kCols = 16 * MMA_CHECK_NT;
    auto fa = [&](int r, int k) { return k < K ? a[r * K + k] : 0.0f; };
    auto fb = [&](int col, int k) { return k < K ? b[k * kCols + col] : 0.0f; };
    fep_mma_tile<In, MMA_CHECK_NT>(K, fa, fb, [&](int r, int col, float v) { c[r * kCols + col] = v; });
}

#define MMA_CHECK_KERNEL(suffix, T)                                                                 \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(64) fep_mma_check_##suffix(const float* a, const float* b, float* c, \
                                                                 int32_t k) {                        \
        mma_check<T>(a, b, c, k);                                                                   \
    }
FEP_FOR_EACH_DTYPE(MMA_CHECK_KERNEL)
