// check.cu: the input scan of attention on a GPU (AttentionSpec::check_inputs): the first bad
// element of each checked array, so the host can name it with one read-back.
//   array 0: π per head, array 1: π per key, array 3: ν per head (bad: not finite or <= 0)
//   array 2: key lengths (bad: outside [0, lk])
//   array 4: the bias, in its logical order [B|1, Hq|1, Lq|1, Lk] (bad: NaN or +∞; −∞ masks)
// Block b writes first[ATTN_CHECK_ARRAYS b + a], the smallest bad index of array a it saw (n_a
// if none); the host takes the minimum over blocks. (The packed-sequence offsets are a few
// integers: the host checks them in the same read-back, src/attention/gpu.rs.)
#include "../port/reduce.cuh"

#define ATTN_CHECK_THREADS 256
#define ATTN_CHECK_ARRAYS 5

// Mirrored field for field by `CheckParams` in src/attention/gpu.rs (#[repr(C)], 8-byte fields
// first, no padding).
struct AttnCheckParams {
    const float* pi_head;
    const float* pi_key;
    const int* kv_len;
    const float* nu;
    const float* bias;
    long long* first;         // [blocks, ATTN_CHECK_ARRAYS]
    long long n[ATTN_CHECK_ARRAYS];  // elements of each array (0: absent)
    long long bias_shape[4];  // [B|1, Hq|1, Lq|1, Lk]
    long long bias_stride[3];
    long long lk;
};

struct FepMinI64 {
    FEP_DEVICE long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

// Whether a precision or ν is bad: not finite, or <= 0 (NaN fails both comparisons).
FEP_DEVICE bool attn_check_bad_positive(float v) { return !(v > 0.0f && v <= 3.4028235e38f); }

// The bias element of logical index i (row-major over bias_shape) in memory.
FEP_DEVICE float attn_check_bias_at(const AttnCheckParams& p, long long i) {
    const long long j = i % p.bias_shape[3], r = i / p.bias_shape[3];
    const long long l = r % p.bias_shape[2], h = r / p.bias_shape[2] % p.bias_shape[1];
    const long long b = r / p.bias_shape[2] / p.bias_shape[1];
    return p.bias[b * p.bias_stride[0] + h * p.bias_stride[1] + l * p.bias_stride[2] + j];
}

FEP_DEVICE bool attn_check_bad(const AttnCheckParams& p, int a, long long i) {
    switch (a) {
        case 0: return attn_check_bad_positive(p.pi_head[i]);
        case 1: return attn_check_bad_positive(p.pi_key[i]);
        case 2: return p.kv_len[i] < 0 || p.kv_len[i] > p.lk;
        case 3: return attn_check_bad_positive(p.nu[i]);
        default: {
            const float v = attn_check_bias_at(p, i);
            return v != v || v > 3.4028235e38f;  // NaN or +∞
        }
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_CHECK_THREADS) attn_check(AttnCheckParams p) {
    __shared__ long long scratch[FEP_MAX_WARPS];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (int a = 0; a < ATTN_CHECK_ARRAYS; ++a) {
        long long f = p.n[a];
        // Ascending: a thread's first bad index is its smallest.
        for (long long i = start; i < p.n[a]; i += stride) {
            if (attn_check_bad(p, a, i)) {
                f = i;
                break;
            }
        }
        f = block_allreduce<FEP_WARP_SIZE>(f, FepMinI64(), p.n[a], scratch);
        if (threadIdx.x == 0) p.first[ATTN_CHECK_ARRAYS * blockIdx.x + a] = f;
    }
}
