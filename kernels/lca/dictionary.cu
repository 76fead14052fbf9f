// dictionary.cu: the dense products around the LCA loop, run once per call or per dictionary:
// conversion to f32, G = Phi^T Phi - I, b = Phi^T x, the learning update, column norms.
//
// These are small next to the iterations (G: m*m*n once per dictionary; b: B*m*n once per solve)
// and use a plain shared-memory tiled FMA product. The hot loop is in solve.cu.
#include "lca.cuh"

#define GEMM_TILE 16

template <typename T>
FEP_DEVICE void lca_gemm(const LcaGemmArgs& p) {
    __shared__ float as[GEMM_TILE][GEMM_TILE + 1];
    __shared__ float bs[GEMM_TILE][GEMM_TILE + 1];
    const T* a = (const T*)p.a;
    const int tx = threadIdx.x % GEMM_TILE, ty = threadIdx.x / GEMM_TILE;
    const int64_t row_tiles = (p.rows + GEMM_TILE - 1) / GEMM_TILE;
    const int64_t j = (int64_t)blockIdx.x * GEMM_TILE + tx;
    // Grid-stride over row tiles: gridDim.y is capped at 65535, the batch is not.
    for (int64_t ti = blockIdx.y; ti < row_tiles; ti += gridDim.y) {
        const int64_t i0 = ti * GEMM_TILE;
        const int64_t i = i0 + ty;
        float acc = 0.0f;
        for (int64_t k0 = 0; k0 < p.inner; k0 += GEMM_TILE) {
            const int64_t ka = k0 + tx, kb = k0 + ty;
            as[ty][tx] = (i < p.rows && ka < p.inner) ? fep_to_f32(a[i * p.sa_row + ka * p.sa_col]) : 0.0f;
            bs[ty][tx] = (kb < p.inner && j < p.cols) ? p.b[kb * p.sb_row + j * p.sb_col] : 0.0f;
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < GEMM_TILE; ++kk) acc = fmaf(as[ty][kk], bs[kk][tx], acc);
            __syncthreads();
        }
        if (i < p.rows && j < p.cols) {
            float v = p.alpha * acc;
            if (p.d) v = fmaf(p.beta, p.d[i * p.ldd + j], v);
            if (i == j) v += p.diag;
            p.c[i * p.ldc + j] = v;
        }
    }
}

// out[i] = f32(in[i])
template <typename T>
FEP_DEVICE void lca_convert(const T* in, float* out, int64_t len) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = fep_to_f32(in[i]);
}

// out[r] = |x[r, :]|^2 in f64, one block per row (grid-stride over rows). f64 so that no finite
// f32 input overflows: the host tells a non-finite input from a large one by this sum alone.
template <typename T>
FEP_DEVICE void lca_row_sqnorm(const T* x, double* out, int64_t rows, int64_t cols) {
    __shared__ double scratch[FEP_MAX_WARPS];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        double s = 0.0;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            const double v = fep_to_f32(x[r * cols + c]);
            s = fma(v, v, s);
        }
        s = block_allreduce<FEP_WARP_SIZE>(s, FepSum(), 0.0, scratch);
        if (threadIdx.x == 0) out[r] = s;
    }
}

#define LCA_DTYPE_KERNELS(suffix, T)                                                              \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) lca_gemm_##suffix(LcaGemmArgs p) { lca_gemm<T>(p); } \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) lca_convert_##suffix(const T* in, float* out, int64_t len) { \
        lca_convert<T>(in, out, len);                                                             \
    }                                                                                             \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) lca_row_sqnorm_##suffix(const T* x, double* out, int64_t rows, \
                                                                   int64_t cols) {                \
        lca_row_sqnorm<T>(x, out, rows, cols);                                                    \
    }
FEP_FOR_EACH_DTYPE(LCA_DTYPE_KERNELS)

// norms[j] = |phi[:, j]|; with `normalize`, also phi[:, j] /= norms[j] (columns of norm 0 are
// left as they are). Sums in f64, so a column of large finite entries still normalises. One
// thread per column: consecutive threads read consecutive columns.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) lca_col_norms(float* phi, float* norms, int64_t n, int64_t m, int32_t normalize) {
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < m; j += (int64_t)gridDim.x * blockDim.x) {
        double s = 0.0;
        for (int64_t r = 0; r < n; ++r) s = fma((double)phi[r * m + j], (double)phi[r * m + j], s);
        const double norm = sqrt(s);
        norms[j] = (float)norm;
        if (normalize && norm > 0.0) {
            const double inv = 1.0 / norm;
            for (int64_t r = 0; r < n; ++r) phi[r * m + j] = (float)(phi[r * m + j] * inv);
        }
    }
}
