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
    // One pass (accurate = false): the check is of the fragment layout.
    fep_mma_tile<In, MMA_CHECK_NT>(K, fa, fb, false, [&](int r, int col, float v) { c[r * kCols + col] = v; });
}

#define MMA_CHECK_KERNEL(suffix, T)                                                                 \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(64) fep_mma_check_##suffix(const float* a, const float* b, float* c, \
                                                                 int32_t k) {                        \
        mma_check<T>(a, b, c, k);                                                                   \
    }
FEP_FOR_EACH_DTYPE(MMA_CHECK_KERNEL)

// The register-operand path of fragment.cuh (ldmatrix / ds_read_b64, the score tile re-used as
// P): S = Q Kᵀ for Q [16][32] and K [32][32], then O = P V with P = S rounded to the input type
// and V [32][32], all row-major f32 in, S and O [16][32] f32 out. The operands pass through
// shared memory rows padded by 16 bytes, as the attention kernel's. With small integer inputs
// every step is exact, so any difference from the host is a layout error.
#include "fragment.cuh"

#define FRAG_CHECK_N 32
#define FRAG_CHECK_STRIDE 40

template <typename In>
FEP_DEVICE void frag_check(const float* q, const float* k, const float* v, float* s_out, float* o_out) {
    using T = FepTile<In>;
    alignas(16) __shared__ In sq[16 * FRAG_CHECK_STRIDE];
    alignas(16) __shared__ In sk[FRAG_CHECK_N * FRAG_CHECK_STRIDE];
    alignas(16) __shared__ In sv[FRAG_CHECK_N * FRAG_CHECK_STRIDE];
    for (int i = threadIdx.x; i < 16 * FRAG_CHECK_N; i += blockDim.x)
        sq[(i / FRAG_CHECK_N) * FRAG_CHECK_STRIDE + i % FRAG_CHECK_N] = fep_from_f32<In>(q[i]);
    for (int i = threadIdx.x; i < FRAG_CHECK_N * FRAG_CHECK_N; i += blockDim.x) {
        sk[(i / FRAG_CHECK_N) * FRAG_CHECK_STRIDE + i % FRAG_CHECK_N] = fep_from_f32<In>(k[i]);
        sv[(i / FRAG_CHECK_N) * FRAG_CHECK_STRIDE + i % FRAG_CHECK_N] = fep_from_f32<In>(v[i]);
    }
    __syncthreads();
    const int lane = (int)fep_lane();
    float s[2][FEP_MMA_ACC] = {}, o[2][FEP_MMA_ACC] = {};
    for (int kd = 0; kd < 2; ++kd) {
        typename T::Frag qf, kf[2];
        T::load_q(qf, sq + 16 * kd, FRAG_CHECK_STRIDE);
        for (int n = 0; n < 2; ++n) T::load_k(kf[n], sk + 16 * n * FRAG_CHECK_STRIDE + 16 * kd, FRAG_CHECK_STRIDE);
        T::template qk<2>(s, qf, kf);
    }
    for (int kk = 0; kk < 2; ++kk) {
        const typename T::Frag pf = T::p_frag(s[kk]);
        typename T::Frag vf[2];
        for (int n = 0; n < 2; ++n) T::load_v(vf[n], sv + 16 * kk * FRAG_CHECK_STRIDE + 16 * n, FRAG_CHECK_STRIDE);
        T::template pv<2>(o, pf, vf);
    }
    for (int n = 0; n < 2; ++n)
        for (int i = 0; i < FEP_MMA_ACC; ++i) {
            const int r = T::row(lane, i), c = 16 * n + T::col(lane, i);
            s_out[r * FRAG_CHECK_N + c] = s[n][i];
            o_out[r * FRAG_CHECK_N + c] = o[n][i];
        }
}

#define FRAG_CHECK_KERNEL(suffix, T)                                                                       \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(64) fep_frag_check_##suffix(const float* q, const float* k, const float* v, \
                                                                  float* s, float* o) {                     \
        frag_check<T>(q, k, v, s, o);                                                                      \
    }
FRAG_CHECK_KERNEL(f16, fep_f16)
FRAG_CHECK_KERNEL(bf16, fep_bf16)
