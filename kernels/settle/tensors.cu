// tensors.cu: elementwise helpers around the settling: the SGD apply, fills, and the input scan
// that lets the host reject NaN/Inf and non-positive precisions before anything is written.
#include "settle.cuh"

// p <- p - lr g, rounded once to T; nothing when *skip != 0 (a non-finite update was found by
// settle_check_update earlier on the stream: the parameters are left whole, with no host sync).
template <typename T>
FEP_DEVICE void settle_sgd(T* param, const float* grad, int64_t n, float lr, const unsigned* skip) {
    if (*skip != 0u) return;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        param[i] = fep_from_f32<T>(fmaf(-lr, grad[i], fep_to_f32(param[i])));
}

// *flag = 1 when any p - lr g (rounded to T, as settle_sgd writes it) is NaN or infinite. Every
// writer stores the same value, so the race is benign and the result deterministic.
template <typename T>
FEP_DEVICE void settle_check_update(const T* param, const float* grad, int64_t n, float lr, unsigned* flag) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = fep_to_f32(fep_from_f32<T>(fmaf(-lr, grad[i], fep_to_f32(param[i]))));
        if (!(x - x == 0.0f)) *flag = 1u;  // NaN and Inf give NaN
    }
}

// out[2 block] = number of non-finite elements of the block's share, out[2 block + 1] = their
// minimum (of the finite ones; +inf if none). The host reduces over blocks.
template <typename T>
FEP_DEVICE void settle_scan(const T* v, int64_t n, float* out) {
    __shared__ float scratch[FEP_MAX_WARPS];
    float bad = 0.0f, lo = INFINITY;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = fep_to_f32(v[i]);
        if (x - x == 0.0f) {  // finite (NaN and Inf give NaN); no isfinite in every vendor's headers
            lo = fminf(lo, x);
        } else {
            bad += 1.0f;
        }
    }
    bad = block_allreduce<FEP_WARP_SIZE>(bad, FepSum(), 0.0f, scratch);
    lo = -block_allreduce<FEP_WARP_SIZE>(-lo, FepMax(), -INFINITY, scratch);
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = bad;
        out[2 * blockIdx.x + 1] = lo;
    }
}

#define SETTLE_TENSOR_KERNELS(suffix, T)                                                              \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_sgd_##suffix(T* param, const float* grad, int64_t n, \
                                                               float lr, const unsigned* skip) {    \
        settle_sgd<T>(param, grad, n, lr, skip);                                                  \
    }                                                                                             \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_check_update_##suffix(                          \
        const T* param, const float* grad, int64_t n, float lr, unsigned* flag) {                 \
        settle_check_update<T>(param, grad, n, lr, flag);                                         \
    }                                                                                             \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_scan_##suffix(const T* v, int64_t n, float* out) { \
        settle_scan<T>(v, n, out);                                                                \
    }
FEP_FOR_EACH_DTYPE(SETTLE_TENSOR_KERNELS)

// SGD in log space on positive f32 parameters (precisions): p <- p exp(-lr p g), skipped when
// *skip != 0; settle_check_log_update flags a new value that is not finite or not > 0 (the
// rule of settle::sgd_log_all).
FEP_DEVICE float settle_log_step(float p, float g, float lr) { return p * expf(-lr * p * g); }

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_sgd_log_f32(float* param, const float* grad, int64_t n, float lr,
                                                          const unsigned* skip) {
    if (*skip != 0u) return;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        param[i] = settle_log_step(param[i], grad[i], lr);
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_check_log_update_f32(const float* param, const float* grad, int64_t n,
                                                                  float lr, unsigned* flag) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = settle_log_step(param[i], grad[i], lr);
        if (!(x - x == 0.0f) || !(x > 0.0f) || !(grad[i] - grad[i] == 0.0f)) *flag = 1u;
    }
}

// p[i] = value (f32 or, with value 0, any 4-byte type).
FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) settle_fill(float* p, int64_t n, float value) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = value;
}
