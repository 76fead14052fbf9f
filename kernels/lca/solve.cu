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
// - lca_solve_stepped: the same state in global memory, one launch per step (after one
//   lca_solve_stepped_init launch), for m too large for shared memory.
//
// Early stop is per sample: a sample whose max |du| falls below tol (LCA_TOL_RELATIVE: below
// tol * max_j |b_j| of that sample) stops (its trace repeats its last values), so a sample's
// result never depends on the rest of the batch. The batch is done when every sample is.
//
// Registers: every value the block agrees on (pointers, sizes, loop bounds, and on AMD each
// lane-mask of a branch on the thread index) sits in scalar/uniform registers for the whole
// loop, and wave64 GPUs have about 100 of them. So each block serves exactly one sample (the host
// launches in chunks), row pointers are formed once, and trace and init are template parameters.
#include "lca.cuh"

// One sample's rows of the arguments, formed once per block.
struct LcaRow {
    const float* b;     // [m]
    float* u;           // [m] u0 in (when has_u0), u out
    float* a;           // [m]
    float* energy;      // [steps] or null
    uint32_t* active;   // [steps] or null
    uint32_t* steps_done;
};

// Where the sample's state lives: shared memory (persistent) or global memory (stepped).
// c, val, idx and meta are at fixed offsets from one base (fewer live pointers: see above).
struct LcaState {
    float* u;     // [m]
    float* base;  // c [m], val [m], idx [m] (int), meta [4] (int: active count, dense, done)
    int m;
    FEP_DEVICE float* c() const { return base; }
    FEP_DEVICE float* val() const { return base + m; }
    FEP_DEVICE int32_t* idx() const { return (int32_t*)(base + 2 * m); }
    FEP_DEVICE int32_t* meta() const { return (int32_t*)(base + 3 * m); }
};

struct LcaScratch {
    float* f;    // 4 * FEP_MAX_WARPS floats
    int32_t* i;  // LCA_THREADS + LCA_THREADS / FEP_SCAN_CHUNK ints
};

// Compact theta(u) into (idx, val); or, when too many are active, write theta(u) densely.
FEP_DEVICE void lca_compact(const LcaSolveArgs& p, LcaState st, LcaScratch sc) {
    const int m = p.m;
    int mine = 0;
    for (int j = threadIdx.x; j < m; j += LCA_THREADS) mine += lca_theta(st.u[j], p.lambda, p.threshold) != 0.0f;
    int total = 0;
    int offset = block_exclusive_scan<LCA_THREADS>(mine, sc.i, &total);
    const bool dense = (int64_t)total * LCA_DENSE_DIV > m;
    for (int j = threadIdx.x; j < m; j += LCA_THREADS) {
        const float a = lca_theta(st.u[j], p.lambda, p.threshold);
        if (dense) {
            st.val()[j] = a;
        } else if (a != 0.0f) {
            st.idx()[offset] = j;
            st.val()[offset] = a;
            ++offset;
        }
    }
    __syncthreads();  // every thread has read the old meta (through the scan) and written its part
    if (threadIdx.x == 0) {
        st.meta()[0] = total;
        st.meta()[1] = dense;
    }
    __syncthreads();
}

// c = G a over the compacted list; with kStats also this thread's share of
// (a.b, a.c, a.a, |a|_1). Each thread owns columns j = tid + r * LCA_THREADS, four at a time.
template <bool kStats>
FEP_DEVICE void lca_inhibit(const LcaSolveArgs& p, LcaState st, const float* b, float* s4) {
    const int m = p.m;
    const int nact = st.meta()[0];
    const bool dense = st.meta()[1] != 0;
    const int len = dense ? m : nact;
    for (int j0 = threadIdx.x; j0 < m; j0 += 4 * LCA_THREADS) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int q = 0; q < len; ++q) {
            const int k = dense ? q : st.idx()[q];
            const float v = st.val()[q];
            if (v == 0.0f) continue;  // uniform across the block: same q for every thread
            const float* row = p.g + (size_t)k * m;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                // Clamped rather than branched: no divergence in the hot loop; the extra
                // columns of the last chunk are computed and dropped.
                const int j = min(j0 + r * LCA_THREADS, m - 1);
                acc[r] = fmaf(row[j], v, acc[r]);
            }
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int j = j0 + r * LCA_THREADS;
            if (j < m) {
                st.c()[j] = acc[r];
                if (kStats) {
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

// Runs steps [t_begin, t_end) of one sample. kInit first loads u0 (or 0) and computes the first
// c, as a step -1 without update (one copy of the loop body keeps the code, and the registers it
// holds, small). Returns true when the sample finished (last step, or stopped early) here.
template <bool kTrace, bool kInit>
FEP_DEVICE bool lca_steps(const LcaSolveArgs& p, const LcaRow& row, float xsq, LcaState st, LcaScratch sc) {
    const int m = p.m;
    if (kInit) {
        for (int j = threadIdx.x; j < m; j += LCA_THREADS) st.u[j] = p.has_u0 ? row.u[j] : 0.0f;
        if (threadIdx.x == 0) st.meta()[2] = 0;
        __syncthreads();
    }
    if (st.meta()[2]) return false;  // finished in an earlier launch (stepped kernel)
    // The early-stop limit on max |du|: tol, or tol * max_j |b_j| (relative to the input's
    // scale). Recomputed per launch (one pass over b: nothing next to a step's inhibition).
    float limit = p.tol;
    if (p.tol > 0.0f && p.tol_mode == LCA_TOL_RELATIVE) {
        float bmax = 0.0f;
        for (int j = threadIdx.x; j < m; j += LCA_THREADS) bmax = fmaxf(bmax, fabsf(row.b[j]));
        limit = p.tol * block_allreduce<FEP_WARP_SIZE>(bmax, FepMax(), 0.0f, sc.f);
    }
    for (int t = kInit ? p.t_begin - 1 : p.t_begin; t < p.t_end; ++t) {
        const bool update = t >= p.t_begin;
        float maxdu = 0.0f;
        if (update) {
            for (int j = threadIdx.x; j < m; j += LCA_THREADS) {
                const float du = p.eta * (row.b[j] - st.u[j] - st.c()[j]);
                st.u[j] += du;
                const float ad = fabsf(du);
                maxdu = fmaxf(maxdu, ad == ad ? ad : INFINITY);  // NaN never counts as converged
            }
            __syncthreads();
        }
        lca_compact(p, st, sc);
        float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        lca_inhibit<kTrace>(p, st, row.b, s4);
        if (!update) continue;
        bool stop = false;
        if (p.tol > 0.0f) {
            // Exactly 0 counts as converged too (a zero input with a relative tol has limit 0).
            const float all = block_allreduce<FEP_WARP_SIZE>(maxdu, FepMax(), 0.0f, sc.f);
            stop = all < limit || all == 0.0f;
        }
        if (kTrace) {
            // Energy 0.5|x - Phi a|^2 + lambda |a|_1
            //      = 0.5|x|^2 - a.b + 0.5 a.(G a) + 0.5 a.a + lambda |a|_1: one 4-sum reduction.
            block_allreduce_n<FEP_WARP_SIZE, 4>(s4, sc.f);
            const float e = 0.5f * xsq - s4[0] + 0.5f * s4[1] + 0.5f * s4[2] + p.lambda * s4[3];
            if (threadIdx.x == 0) {
                const int last = stop ? p.steps : t + 1;  // a stopped sample repeats its values
                const uint32_t count = (uint32_t)st.meta()[0];
                for (int tt = t; tt < last; ++tt) {
                    if (row.energy) row.energy[tt] = e;
                    if (row.active) row.active[tt] = count;
                }
            }
        }
        if (stop || t + 1 == p.steps) {
            if (threadIdx.x == 0) {
                *row.steps_done = (uint32_t)(t + 1);
                st.meta()[2] = 1;
            }
            __syncthreads();
            return true;
        }
    }
    return false;
}

FEP_DEVICE LcaRow lca_row(const LcaSolveArgs& p) {
    const int64_t s = blockIdx.x;
    const int64_t off = s * p.m;
    const int64_t toff = s * p.steps;
    return LcaRow{p.b + off,
                  p.u + off,
                  p.a + off,
                  p.energy ? p.energy + toff : nullptr,
                  p.active ? p.active + toff : nullptr,
                  p.steps_done + s};
}

template <bool kTrace>
FEP_DEVICE void lca_persistent_body(const LcaSolveArgs& p) {
    FEP_DYNAMIC_SMEM(float, smem);
    __shared__ float fscratch[4 * FEP_MAX_WARPS];
    __shared__ int32_t iscratch[LCA_THREADS + LCA_THREADS / FEP_SCAN_CHUNK];
    const int m = p.m;
    const LcaRow row = lca_row(p);
    LcaState st{smem, smem + m, m};
    lca_steps<kTrace, true>(p, row, kTrace ? (float)p.xsq[blockIdx.x] : 0.0f, st, LcaScratch{fscratch, iscratch});
    for (int j = threadIdx.x; j < m; j += LCA_THREADS) {
        const float u = st.u[j];
        row.u[j] = u;
        row.a[j] = lca_theta(u, p.lambda, p.threshold);
    }
}

// kInit: the launch before the steps (u0, first c); otherwise one launch per step.
template <bool kTrace, bool kInit>
FEP_DEVICE void lca_stepped_body(const LcaSolveArgs& p) {
    __shared__ float fscratch[4 * FEP_MAX_WARPS];
    __shared__ int32_t iscratch[LCA_THREADS + LCA_THREADS / FEP_SCAN_CHUNK];
    const int m = p.m;
    const LcaRow row = lca_row(p);
    // This sample's state: c, val [m] f32, idx [m] i32, meta [4] i32.
    LcaState st{row.u, p.state + (int64_t)blockIdx.x * (3 * (int64_t)m + 4), m};
    if (lca_steps<kTrace, kInit>(p, row, kTrace ? (float)p.xsq[blockIdx.x] : 0.0f, st, LcaScratch{fscratch, iscratch})) {
        // Finished now (last step, or stopped early): a = theta(u); u is already in place.
        for (int j = threadIdx.x; j < m; j += LCA_THREADS) row.a[j] = lca_theta(st.u[j], p.lambda, p.threshold);
    }
}

// The instantiations: {persistent, stepped} x {without, with the per-step trace}, and the
// stepped kernel's initialisation (u0, first c) as a launch of its own. Trace and init are
// template parameters: a variant carries none of the registers or reductions of what it does
// not do.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_persistent(LcaSolveArgs p) { lca_persistent_body<false>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_persistent_trace(LcaSolveArgs p) { lca_persistent_body<true>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_stepped_init(LcaSolveArgs p) { lca_stepped_body<false, true>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_stepped(LcaSolveArgs p) { lca_stepped_body<false, false>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(LCA_THREADS) lca_solve_stepped_trace(LcaSolveArgs p) { lca_stepped_body<true, false>(p); }
