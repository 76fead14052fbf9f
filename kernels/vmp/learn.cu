// learn.cu: Dirichlet learning from a batch of windows, and the input scans.
//
// The counts of a model are one f32 buffer: pA_m at md.m[m].ca, pB_f at md.f[f].cb, pD_f at
// md.f[f].cd. Learning adds, summed over agents a and steps t,
//   pA_m[o, s]     += lr_a  o_{a,t,m}[o] prod_{g in deps(m)} q_{a,t,g}(s_g)
//   pB_f[s', s, u] += lr_b  [u_{a,t,f} = u] q_{a,t+1,f}(s') q_{a,t,f}(s)       (t < T-1)
//   pD_f[s]        += lr_d  q_{a,0,f}(s)    where pD_f[s] > 0
// in two deterministic passes: vmp_learn_partial gives each block a chunk of agents and each
// thread count entries (no atomics, so the sums do not depend on scheduling), vmp_learn_apply
// sums the chunks in order and updates the counts.
#include "vmp.cuh"

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256)
    vmp_learn_partial(const int32_t* desc, const int32_t* obs_idx, const float* obs_dist, const float* qs,
                      const int32_t* actions, int64_t n, int32_t steps, int64_t per_chunk, int64_t entries,
                      int32_t b_start, int32_t d_start, int32_t kinds, float* partial) {
    const VmpModel& md = vmp_model(desc);
    const int S = md.sum_s, T = steps;
    const int64_t a0 = (int64_t)blockIdx.x * per_chunk;
    const int64_t a1 = a0 + per_chunk < n ? a0 + per_chunk : n;
    for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
        float acc = 0.0f;
        if (e < b_start) {  // pA
            if (kinds & 1) {
                int m = 0;
                while (m + 1 < md.nm && md.m[m + 1].ca <= e) ++m;
                const VmpModality& mm = md.m[m];
                const int r = (int)((e - mm.ca) / mm.size);
                int rem = (int)((e - mm.ca) % mm.size), off[VMP_MAX_DEPS];
#pragma unroll
                for (int j = VMP_MAX_DEPS - 1; j >= 0; --j) {
                    off[j] = 0;
                    if (j < mm.nd) {
                        const VmpFactor& fa = md.f[mm.deps[j]];
                        off[j] = fa.off + rem % fa.s;
                        rem /= fa.s;
                    }
                }
                for (int64_t a = a0; a < a1; ++a)
                    for (int t = 0; t < T; ++t) {
                        const int64_t at = a * T + t;
                        const float wt = obs_dist ? obs_dist[at * md.sum_o + mm.o_off + r]
                                                  : (obs_idx[at * md.nm + m] == r ? 1.0f : 0.0f);
                        if (wt == 0.0f) continue;
                        float joint = wt;
#pragma unroll
                        for (int j = 0; j < VMP_MAX_DEPS; ++j)
                            if (j < mm.nd) joint *= qs[at * S + off[j]];
                        acc += joint;
                    }
            }
        } else if (e < d_start) {  // pB
            if (kinds & 2) {
                int f = 0;
                while (f + 1 < md.nf && md.f[f + 1].cb <= e) ++f;
                const VmpFactor& fa = md.f[f];
                const int64_t k = e - fa.cb;
                const int u = (int)(k % fa.u), s = (int)((k / fa.u) % fa.s), sp = (int)(k / ((int64_t)fa.u * fa.s));
                for (int64_t a = a0; a < a1; ++a)
                    for (int t = 0; t + 1 < T; ++t)
                        if (actions[(a * (T - 1) + t) * md.nf + f] == u)
                            acc += qs[(a * T + t + 1) * S + fa.off + sp] * qs[(a * T + t) * S + fa.off + s];
            }
        } else if (kinds & 4) {  // pD
            int f = 0;
            while (f + 1 < md.nf && md.f[f + 1].cd <= e) ++f;
            const VmpFactor& fa = md.f[f];
            for (int64_t a = a0; a < a1; ++a) acc += qs[a * T * S + fa.off + (e - fa.cd)];
        }
        partial[(int64_t)blockIdx.x * entries + e] = acc;
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256)
    vmp_learn_apply(float* counts, const float* partial, int32_t chunks, int64_t entries, int32_t b_start,
                    int32_t d_start, float lr_a, float lr_b, float lr_d) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < entries; e += (int64_t)gridDim.x * blockDim.x) {
        const float lr = e < b_start ? lr_a : (e < d_start ? lr_b : lr_d);
        if (lr == 0.0f || (e >= d_start && !(counts[e] > 0.0f))) continue;
        float sum = 0.0f;
        for (int c = 0; c < chunks; ++c) sum += partial[(int64_t)c * entries + e];
        counts[e] += lr * sum;
    }
}

// The input scans: out[block] = the smallest index of a bad element in the block's share, or
// -1. Integer indices are bad outside [0, limits[i % period]); probabilities when negative or
// not finite.
FEP_DEVICE void vmp_first_bad(int64_t bad, int64_t* out) {
    __shared__ int64_t first[256];
    first[threadIdx.x] = bad;
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t r = -1;
        for (unsigned i = 0; i < blockDim.x; ++i)
            if (first[i] >= 0 && (r < 0 || first[i] < r)) r = first[i];
        out[blockIdx.x] = r;
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256)
    vmp_check_index(const int32_t* v, int64_t n, int32_t period, const int32_t* limits, int64_t* out) {
    int64_t bad = -1;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n && bad < 0; i += (int64_t)gridDim.x * blockDim.x)
        if (v[i] < 0 || v[i] >= limits[i % period]) bad = i;
    vmp_first_bad(bad, out);
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) vmp_check_prob(const float* v, int64_t n, int64_t* out) {
    int64_t bad = -1;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n && bad < 0; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = v[i];
        if (!(x >= 0.0f) || x - x != 0.0f) bad = i;
    }
    vmp_first_bad(bad, out);
}
