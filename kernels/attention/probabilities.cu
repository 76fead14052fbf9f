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
    const void* v;          // [B, Hkv, Lk, Dv] at v_stride (the row kernel)
    void* o;                // [B, Hq, Lq, Dv] at o_stride (the row kernel)
    float* lse;             // [B, Hq, Lq] or null (the row kernel)
    float* e;               // [B, Hq, Lq] or null (the row kernel)
    const float* pi_head;   // [Hq] or null
    const float* pi_key;    // [B, Hkv, Lk] or null
    const int* kv_len;      // [B] or null
    float* w;               // [B, Hq, Lq, Lk] row-major
    AttnScoreInputs x;      // bias, mask, ν per head, packed offsets
    long long q_stride[3];
    long long k_stride[3];
    long long v_stride[3];
    long long o_stride[3];
    int b, hq, hkv, lq, lk, d;
    int family;
    float tau, nu;
    int causal, window, normalizer;
    int seqs;  // packed sequences S (cu_q has S + 1 offsets), 0 unpacked
    int dv;
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

// One row's place: its batch in memory, head, sequence, visible keys [lo, hi) in the sequence's
// key indices (src/attention/cpu.rs `visible`), and where its q, k, π_j start.
template <typename In>
struct AttnRow {
    int b, h, i, k0, lo, hi;
    const In *q, *k;
    const float* pik;
    float pi_h, nu;

    FEP_DEVICE AttnRow(const AttnProbsParams& p) {
        h = blockIdx.y, i = blockIdx.x;  // the row (packed: in total_q)
        const int hk = h / (p.hq / p.hkv);
        const int seq = p.x.cu_q ? attn_probs_seq(p, i) : (int)blockIdx.z;
        b = p.x.cu_q ? 0 : seq;
        const AttnSeq sq = attn_seq(p.x, seq, p.lq, p.lk);
        k0 = sq.k0;
        const int diag = i - sq.q0 + sq.lk - sq.lq;
        hi = sq.lk;
        if (p.causal) hi = min(hi, diag + 1);
        if (p.kv_len) hi = min(hi, p.kv_len[b]);
        hi = max(hi, 0);
        lo = min(p.window > 0 ? max(diag - p.window + 1, 0) : 0, hi);
        q = (const In*)p.q + b * p.q_stride[0] + h * p.q_stride[1] + (long long)i * p.q_stride[2];
        k = (const In*)p.k + b * p.k_stride[0] + hk * p.k_stride[1];
        pik = p.pi_key ? p.pi_key + ((long long)b * p.hkv + hk) * p.lk : nullptr;
        pi_h = p.pi_head ? p.pi_head[h] : 1.0f;
        nu = attn_nu_of(p.x, h, p.nu);
    }

    // The score of key j (packed index) with its π d² in pd2, or −∞ where not visible, masked
    // or biased to −∞.
    FEP_DEVICE float score(const AttnProbsParams& p, int j, float& pd2) const {
        const int jl = j - k0;
        pd2 = 0.0f;
        if (jl < lo || jl >= hi || !attn_keep_at(p.x, b, h, i, j)) return -__uint_as_float(0x7f800000u);
        const In* kj = k + (long long)j * p.k_stride[2];
        float x = 0.0f, d2 = 0.0f;
        for (int d = 0; d < p.d; ++d) {
            const float a = fep_to_f32(q[d]), c = fep_to_f32(kj[d]);
            x = fmaf(a, c, x);
            d2 = fmaf(a - c, a - c, d2);
        }
        const float pi = pi_h * (pik ? pik[j] : 1.0f);
        pd2 = pi * d2;
        return attn_probs_score(p, nu, x, d2, pi) + attn_bias_at(p.x, b, h, i, j);
    }
};

template <typename In>
FEP_DEVICE void attn_probabilities(const AttnProbsParams& p) {
    __shared__ float scratch[FEP_MAX_WARPS];
    const float neg_inf = -__uint_as_float(0x7f800000u);
    const AttnRow<In> r(p);
    float* w = p.w + (((long long)r.b * p.hq + r.h) * p.lq + r.i) * p.lk;
    float m = neg_inf, pd2;
    for (int j = threadIdx.x; j < p.lk; j += blockDim.x) {
        const float s = r.score(p, j, pd2);
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

// The row kernel: the whole forward of one row (o, lse, e), for calls whose bias or mask varies
// over Lq. The fused kernels take a bias or mask broadcast over Lq as a per-key term, but one
// that varies per score would cost every call registers and hot-loop instructions (NOTES.md,
// issue 23); this kernel serves those calls, correct but not fast: per row, one pass for the
// max and sum (each thread an online pair over its keys), then chunks of ATTN_PROBS_THREADS keys:
// one thread per key computes w = e^{s − lse} into shared memory, then one thread per output
// column sums w v over the chunk; e = Σ w π d² per key thread, reduced at the end.
template <typename In>
FEP_DEVICE void attn_rows(const AttnProbsParams& p) {
    __shared__ float scratch[FEP_MAX_WARPS];
    __shared__ float sw[ATTN_PROBS_THREADS];
    const float neg_inf = -__uint_as_float(0x7f800000u);
    const AttnRow<In> r(p);
    float m = neg_inf, l = 0.0f, pd2;
    for (int j = threadIdx.x; j < p.lk; j += blockDim.x) {
        const float s = r.score(p, j, pd2);
        if (s == neg_inf) continue;
        const float mn = fmaxf(m, s);
        l = l * expf(m - mn) + expf(s - mn);  // m = −∞ at first: e^{−∞} = 0
        m = mn;
    }
    const float mb = block_allreduce<FEP_WARP_SIZE>(m, FepMax(), neg_inf, scratch);
    l = block_allreduce<FEP_WARP_SIZE>(m == neg_inf ? 0.0f : l * expf(m - mb), FepSum(), 0.0f, scratch);
    const float lse = mb == neg_inf ? neg_inf : mb + logf(l);
    const int hk = r.h / (p.hq / p.hkv);
    const In* v = (const In*)p.v + r.b * p.v_stride[0] + hk * p.v_stride[1];
    In* o = (In*)p.o + r.b * p.o_stride[0] + r.h * p.o_stride[1] + (long long)r.i * p.o_stride[2];
    float e = 0.0f;
    for (int c0 = 0; c0 < p.dv; c0 += ATTN_PROBS_THREADS) {  // Dv <= 256: one pass
        const int c = c0 + (int)threadIdx.x;
        float acc = 0.0f;
        for (int j0 = 0; j0 < p.lk && lse != neg_inf; j0 += ATTN_PROBS_THREADS) {
            __syncthreads();  // the last chunk's weights are read
            const int j = j0 + (int)threadIdx.x;
            float wj = 0.0f;
            if (j < p.lk) {
                const float s = r.score(p, j, pd2);
                wj = s == neg_inf ? 0.0f : expf(s - lse);
                if (c0 == 0) e = fmaf(wj, pd2, e);
            }
            sw[threadIdx.x] = wj;
            __syncthreads();
            const int n = min(ATTN_PROBS_THREADS, p.lk - j0);
            if (c < p.dv)
                for (int u = 0; u < n; ++u)
                    if (sw[u] != 0.0f) acc = fmaf(sw[u], fep_to_f32(v[(long long)(j0 + u) * p.v_stride[2] + c]), acc);
        }
        if (c < p.dv) o[c] = fep_from_f32<In>(acc);
    }
    e = block_allreduce<FEP_WARP_SIZE>(e, FepSum(), 0.0f, scratch);
    const long long row = ((long long)r.b * p.hq + r.h) * p.lq + r.i;
    if (threadIdx.x == 0) {
        if (p.lse) p.lse[row] = lse;
        if (p.e) p.e[row] = e;
    }
}

#define ATTN_PROBS(SUFFIX, TYPE)                                                                 \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_PROBS_THREADS) attn_probs_##SUFFIX(AttnProbsParams p) { \
        attn_probabilities<TYPE>(p);                                                              \
    }                                                                                             \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_PROBS_THREADS) attn_rows_##SUFFIX(AttnProbsParams p) {  \
        attn_rows<TYPE>(p);                                                                       \
    }
FEP_FOR_EACH_DTYPE(ATTN_PROBS)
