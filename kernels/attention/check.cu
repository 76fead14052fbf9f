// check.cu: the input scan of attention on a GPU (AttentionSpec::check_inputs): the first bad
// element of each checked array, so the host can name it with one read-back.
//   array 0: π per head, array 1: π per key (bad: not finite or <= 0)
//   array 2: key lengths (bad: outside [0, lk])
// Block b writes first[3 b + a], the smallest bad index of array a it saw (n_a if none); the
// host takes the minimum over blocks.
#include "../port/reduce.cuh"

#define ATTN_CHECK_THREADS 256

struct FepMinI64 {
    FEP_DEVICE long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_CHECK_THREADS)
    attn_check(const float* pi_head, long long n_head, const float* pi_key, long long n_key, const int* kv_len,
               long long n_len, int lk, long long* first) {
    __shared__ long long scratch[FEP_MAX_WARPS];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long f0 = n_head, f1 = n_key, f2 = n_len;
    for (long long i = start; i < n_head; i += stride) {
        const float v = pi_head[i];
        if (!(v > 0.0f && v <= 3.4028235e38f) && i < f0) f0 = i;
    }
    for (long long i = start; i < n_key; i += stride) {
        const float v = pi_key[i];
        if (!(v > 0.0f && v <= 3.4028235e38f) && i < f1) f1 = i;
    }
    for (long long i = start; i < n_len; i += stride) {
        const int v = kv_len[i];
        if ((v < 0 || v > lk) && i < f2) f2 = i;
    }
    f0 = block_allreduce<FEP_WARP_SIZE>(f0, FepMinI64(), n_head, scratch);
    f1 = block_allreduce<FEP_WARP_SIZE>(f1, FepMinI64(), n_key, scratch);
    f2 = block_allreduce<FEP_WARP_SIZE>(f2, FepMinI64(), n_len, scratch);
    if (threadIdx.x == 0) {
        first[3 * blockIdx.x] = f0;
        first[3 * blockIdx.x + 1] = f1;
        first[3 * blockIdx.x + 2] = f2;
    }
}
