// solve.cu: the LCA iterations, one block per sample.
//
//   u <- u + eta (b - u - G a),  a = theta(u),  G = Phi^T Phi - I
//
// Per step and sample the work is the inhibition c = G a. G is symmetric, so c is a sum of the
// rows of G of the active units: the block compacts the active units into a list (a block scan)
// and gathers only those rows, reading each row with consecutive threads on consecutive columns.
// When more than 1/LCA_DENSE_DIV of the units are active the compaction is skipped and every row
// is swept (same loop, dense index). The choice is made per sample and per step.
//
// Two kernels share one body (lca_steps):
// - lca_solve_persistent: all steps in one launch; u, c and the active list live in shared
//   memory (LCA_SMEM_BYTES_PER_UNIT * m bytes) for as long as the sample runs.
// - lca_solve_stepped: the same state in global memory, one launch per range of steps, for m too
//   large for shared memory.
//
// Early stop is per sample: a sample whose max |du| falls below tol stops (its trace repeats its
// last values), so a sample's result never depends on the rest of the batch. The batch is done
// when every sample is.
#include "lca.cuh"

// Where one sample's state lives: shared memory (persistent) or global memory (stepped).
struct LcaState {
    float* u;
    float* c;
    float* val;
    int32_t* idx;
    int32_t* meta;  // active count, dense flag, done flag
};

struct LcaScratch {
    float* f;    // FEP_MAX_WARPS floats
    int32_t* i;  // FEP_MAX_WARPS ints
};

// Compact theta(u) into (idx, val); or, when too many are active, write theta(u) densely.
template <int kWarp>
FEP_DEVICE void lca_compact(const LcaSolveArgs& p, LcaState st, LcaScratch sc) {
    const int m = (int)p.m;
    int mine = 0;
    for (int j = threadIdx.x; j < m; j += blockDim.x) mine += lca_theta(st.u[j], p.lambda, p.threshold) != 0.0f;
    int total = 0;
    int offset = block_exclusive_scan<kWarp>(mine, sc.i, &total);
    const bool dense = (int64_t)total * LCA_DENSE_DIV > m;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const float a = lca_theta(st.u[j], p.lambda, p.threshold);
        if (dense) {
            st.val[j] = a;
        } else if (a != 0.0f) {
            st.idx[offset] = j;
            st.val[offset] = a;
            ++offset;
        }
    }
    __syncthreads();  // every thread has read the old meta (through the scan) and written its part
    if (threadIdx.x == 0) {
        st.meta[0] = total;
        st.meta[1] = dense;
    }
    __syncthreads();
}

// c = G a over the compacted list; returns this thread's share of (a.b, a.c, a.a, |a|_1) when
// `stats` is set. Each thread owns columns j = tid + r * blockDim, four at a time for ILP.
template <int kWarp>
FEP_DEVICE void lca_inhibit(const LcaSolveArgs& p, LcaState st, const float* b, bool stats, float* s4) {
    const int m = (int)p.m;
    const int nact = st.meta[0];
    const bool dense = st.meta[1] != 0;
    const int len = dense ? m : nact;
    const int stride = blockDim.x;
    for (int j0 = threadIdx.x; j0 < m; j0 += 4 * stride) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int q = 0; q < len; ++q) {
            const int k = dense ? q : st.idx[q];
            const float v = st.val[q];
            if (v == 0.0f) continue;  // uniform across the block: same q for every thread
            const float* row = p.g + (size_t)k * m;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                // Clamped rather than branched: no divergence in the hot loop; the extra
                // columns of the last chunk are computed and dropped.
                const int j = min(j0 + r * stride, m - 1);
                acc[r] = fmaf(row[j], v, acc[r]);
            }
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int j = j0 + r * stride;
            if (j < m) {
                st.c[j] = acc[r];
                if (stats) {
                    const float a = lca_theta(st.u[j], p.lambda, p.threshold);
                    s4[0] = fmaf(a, b[j], s4[0]);
                    s4[1] = fmaf(a, acc[r], s4[1]);
                    s4[2] = fmaf(a, a, s4[2]);
                    s4[3] += fabsf(a);
                }
            }
        }
    }
    __syncthreads();
}

// Energy 0.5|x - Phi a|^2 + lambda |a|_1 = 0.5|x|^2 - a.b + 0.5 a.(G a) + 0.5 a.a + lambda |a|_1.
template <int kWarp>
FEP_DEVICE float lca_energy(const LcaSolveArgs& p, float xsq, const float* s4, LcaScratch sc) {
    const float ab = block_allreduce<kWarp>(s4[0], FepSum(), 0.0f, sc.f);
    const float ac = block_allreduce<kWarp>(s4[1], FepSum(), 0.0f, sc.f);
    const float aa = block_allreduce<kWarp>(s4[2], FepSum(), 0.0f, sc.f);
    const float l1 = block_allreduce<kWarp>(s4[3], FepSum(), 0.0f, sc.f);
    return 0.5f * xsq - ab + 0.5f * ac + 0.5f * aa + p.lambda * l1;
}

// Runs steps [t_begin, t_end) of sample s. `init` first loads u0 (or 0) and computes the first
// c, as a step -1 without update (one copy of the loop body keeps the code, and the registers
// it holds, small). Returns true when the sample finished (last step, or stopped early).
template <int kWarp>
FEP_DEVICE bool lca_steps(const LcaSolveArgs& p, int64_t s, LcaState st, LcaScratch sc, bool init) {
    const int m = (int)p.m;
    const float* b = p.b + s * m;
    const bool trace = p.energy != nullptr || p.active != nullptr;
    if (init) {
        const float* u0 = p.u0 ? p.u0 + s * m : nullptr;
        for (int j = threadIdx.x; j < m; j += blockDim.x) st.u[j] = u0 ? u0[j] : 0.0f;
        if (threadIdx.x == 0) st.meta[2] = 0;
        __syncthreads();
    }
    if (st.meta[2]) return false;  // finished in an earlier launch (stepped kernel)
    for (int t = init ? p.t_begin - 1 : p.t_begin; t < p.t_end; ++t) {
        const bool update = t >= p.t_begin;
        float maxdu = 0.0f;
        if (update) {
            for (int j = threadIdx.x; j < m; j += blockDim.x) {
                const float du = p.eta * (b[j] - st.u[j] - st.c[j]);
                st.u[j] += du;
                const float ad = fabsf(du);
                maxdu = fmaxf(maxdu, ad == ad ? ad : INFINITY);  // NaN never counts as converged
            }
            __syncthreads();
        }
        lca_compact<kWarp>(p, st, sc);
        float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        lca_inhibit<kWarp>(p, st, b, trace && update, s4);
        if (!update) continue;
        bool stop = false;
        if (p.tol > 0.0f) stop = block_allreduce<kWarp>(maxdu, FepMax(), 0.0f, sc.f) < p.tol;
        if (trace) {
            const float e = p.energy ? lca_energy<kWarp>(p, p.xsq[s], s4, sc) : 0.0f;
            if (threadIdx.x == 0) {
                const int last = stop ? p.steps : t + 1;  // a stopped sample repeats its values
                const uint32_t count = (uint32_t)st.meta[0];
                for (int tt = t; tt < last; ++tt) {
                    if (p.energy) p.energy[s * p.steps + tt] = e;
                    if (p.active) p.active[s * p.steps + tt] = count;
                }
            }
        }
        if (stop || t + 1 == p.steps) {
            if (threadIdx.x == 0) {
                p.steps_done[s] = (uint32_t)(t + 1);
                st.meta[2] = 1;
            }
            __syncthreads();
            return true;
        }
    }
    return false;
}

template <int kWarp>
FEP_DEVICE void lca_write_out(const LcaSolveArgs& p, int64_t s, const LcaState& st) {
    float* u_out = p.u + s * p.m;
    float* a_out = p.a + s * p.m;
    for (int j = threadIdx.x; j < (int)p.m; j += blockDim.x) {
        const float u = st.u[j];
        u_out[j] = u;
        a_out[j] = lca_theta(u, p.lambda, p.threshold);
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_persistent(LcaSolveArgs p) {
    FEP_DYNAMIC_SMEM(float, smem);
    __shared__ float fscratch[FEP_MAX_WARPS];
    __shared__ int32_t iscratch[FEP_MAX_WARPS];
    __shared__ int32_t meta[4];
    const int64_t m = p.m;
    LcaState st{smem, smem + m, smem + 2 * m, (int32_t*)(smem + 3 * m), meta};
    LcaScratch sc{fscratch, iscratch};
    for (int64_t s = blockIdx.x; s < p.batch; s += gridDim.x) {
        lca_steps<FEP_WARP_SIZE>(p, s, st, sc, true);
        lca_write_out<FEP_WARP_SIZE>(p, s, st);
        __syncthreads();  // the next sample reuses the shared state
    }
}

// Launched with t_begin == 0 first (init), then over later ranges; the last launch writes out.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_stepped(LcaSolveArgs p) {
    __shared__ float fscratch[FEP_MAX_WARPS];
    __shared__ int32_t iscratch[FEP_MAX_WARPS];
    LcaScratch sc{fscratch, iscratch};
    for (int64_t s = blockIdx.x; s < p.batch; s += gridDim.x) {
        const int64_t off = s * p.m;
        LcaState st{p.u + off, p.c_state + off, p.val_state + off, p.idx_state + off, p.meta_state + 4 * s};
        if (lca_steps<FEP_WARP_SIZE>(p, s, st, sc, p.t_begin == 0)) {
            // Finished now (last step, or stopped early): a = theta(u); u is already in place.
            for (int j = threadIdx.x; j < (int)p.m; j += blockDim.x) p.a[off + j] = lca_theta(st.u[j], p.lambda, p.threshold);
        }
        __syncthreads();
    }
}
