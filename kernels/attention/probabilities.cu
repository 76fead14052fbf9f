// probabilities.cu: the attention weights w_ij = softmax_j(s_ij) as a materialised [B, Hq, Lq,
// Lk] f32 matrix (src/attention/mod.rs `probabilities_into`): a debugging aid, written for
// correctness, not speed. One block per (row, head, batch): every thread takes keys j = tid,
// tid + threads, ... of the row, computes its score in f32 natural units straight from q and k
// (d² = Σ (q − k)², not from q·k), writes it to the output row as scratch, then the block's max
// and sum, then w = e^{s − max} / sum; 0 for a key that is not visible, masked, or whose bias is
// −∞, and for every key of a row that sees none. The visible keys are the reference's
// (src/attention/cpu.rs `visible`).
//
// Packed sequences: grid.x runs over the total_q packed rows and z is 1; a row finds its
// sequence by binary search over cu_q and sees only that sequence's keys, so the matrix [1, Hq,
// total_q, total_k] is zero across sequences.
//
// wave64: the block reductions take the warp size from the target (port/reduce.cuh); each thread
// reads back only the scores it wrote, so the passes need no barrier besides the reductions'.
#include "../port/reduce.cuh"
#include "params.cuh"

#define ATTN_PROBS_THREADS 256

// Mirrored field for field by `ProbsParams` in src/attention/gpu.rs (#[repr(C)], 8-byte fields
// first, no padding).
struct AttnProbsParams {
    const void* q;          // [B, Hq, Lq, D] at q_stride
    const void* k;          // [B, Hkv, Lk, D] at k_stride
    const float* pi_head;   // [Hq] or null
    const float* pi_key;    // [B, Hkv, Lk] or null
    const int* kv_len;      // [B] or null
    float* w;               // [B, Hq, Lq, Lk] row-major
    AttnScoreInputs x;      // bias, mask, ν per head, packed offsets
    long long q_stride[3];
    long long k_stride[3];
    int b, hq, hkv, lq, lk, d;
    int family;
    float tau, nu;
    int causal, window, normalizer;
    int seqs;  // packed sequences S (cu_q has S + 1 offsets), 0 unpacked
    int pad_;
};

// The sequence of packed row i: the last s in [0, S) with cu_q[s] <= i.
FEP_DEVICE int attn_probs_seq(const AttnProbsParams& p, int i) {
    int lo = 0, hi = p.seqs;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (p.x.cu_q[mid] <= i) lo = mid; else hi = mid;
    }
    return lo;
}

// One score in natural units (src/attention/cpu.rs `score_value`), from x = q·k and d².
FEP_DEVICE float attn_probs_score(const AttnProbsParams& p, float nu, float x, float d2, float pi) {
    const float tp = p.tau * pi;
    float s;
    switch (p.family) {
        case ATTN_DOT: return tp * x;
        case ATTN_GAUSSIAN: s = -0.5f * tp * d2; break;
        case ATTN_STUDENT_T: s = -0.5f * (nu + (float)p.d) * log1pf(tp * d2 / nu); break;
        default: s = -sqrtf(tp) * sqrtf(d2); break;
    }
    return p.normalizer ? s + 0.5f * (float)p.d * logf(pi) : s;
}

template <typename In>
FEP_DEVICE void attn_probabilities(const AttnProbsParams& p) {
    __shared__ float scratch[FEP_MAX_WARPS];
    const float neg_inf = -__uint_as_float(0x7f800000u);
    const int h = blockIdx.y, hk = h / (p.hq / p.hkv);
    const int i = blockIdx.x;  // the row (packed: in total_q)
    const int seq = p.x.cu_q ? attn_probs_seq(p, i) : (int)blockIdx.z;
    const int b = p.x.cu_q ? 0 : seq;
    const AttnSeq sq = attn_seq(p.x, seq, p.lq, p.lk);
    // The visible keys [lo, hi) of the row, in the sequence's key indices (cpu.rs `visible`).
    const int diag = i - sq.q0 + sq.lk - sq.lq;
    int hi = sq.lk;
    if (p.causal) hi = min(hi, diag + 1);
    if (p.kv_len) hi = min(hi, p.kv_len[b]);
    hi = max(hi, 0);
    const int lo = min(p.window > 0 ? max(diag - p.window + 1, 0) : 0, hi);
    const In* q = (const In*)p.q + b * p.q_stride[0] + h * p.q_stride[1] + (long long)i * p.q_stride[2];
    const In* k = (const In*)p.k + b * p.k_stride[0] + hk * p.k_stride[1];
    const float* pik = p.pi_key ? p.pi_key + ((long long)b * p.hkv + hk) * p.lk : nullptr;
    const float pi_h = p.pi_head ? p.pi_head[h] : 1.0f, nu = attn_nu_of(p.x, h, p.nu);
    float* w = p.w + (((long long)b * p.hq + h) * p.lq + i) * p.lk;

    float m = neg_inf;
    for (int j = threadIdx.x; j < p.lk; j += blockDim.x) {
        const int jl = j - sq.k0;  // in the sequence
        float s = neg_inf;
        if (jl >= lo && jl < hi && attn_keep_at(p.x, b, h, i, j)) {
            const In* kj = k + (long long)j * p.k_stride[2];
            float x = 0.0f, d2 = 0.0f;
            for (int d = 0; d < p.d; ++d) {
                const float a = fep_to_f32(q[d]), c = fep_to_f32(kj[d]);
                x = fmaf(a, c, x);
                d2 = fmaf(a - c, a - c, d2);
            }
            const float pi = pi_h * (pik ? pik[j] : 1.0f);
            s = attn_probs_score(p, nu, x, d2, pi) + attn_bias_at(p.x, b, h, i, j);
        }
        w[j] = s;
        m = fmaxf(m, s);
    }
    m = block_allreduce<FEP_WARP_SIZE>(m, FepMax(), neg_inf, scratch);
    float z = 0.0f;
    if (m != neg_inf)
        for (int j = threadIdx.x; j < p.lk; j += blockDim.x) z += expf(w[j] - m);  // −∞ adds 0
    z = block_allreduce<FEP_WARP_SIZE>(z, FepSum(), 0.0f, scratch);
    for (int j = threadIdx.x; j < p.lk; j += blockDim.x) w[j] = m == neg_inf ? 0.0f : expf(w[j] - m) / z;
}

#define ATTN_PROBS(SUFFIX, TYPE)                                                                 \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_PROBS_THREADS) attn_probs_##SUFFIX(AttnProbsParams p) { \
        attn_probabilities<TYPE>(p);                                                              \
    }
FEP_FOR_EACH_DTYPE(ATTN_PROBS)
