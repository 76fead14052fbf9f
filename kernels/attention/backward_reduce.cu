// backward_reduce.cu: the backward's scalar gradients from the dq kernel's per-tile partials, in a
// fixed order (no atomics): dπ_h = Σ_b Σ_tiles (b: the batch or the packed sequence), then
// dν = Σ_h, or dν_h per head with a per-head ν. One block of
// ATTN_BWD_REDUCE_THREADS threads.
#include "../port/vendor.cuh"
#include "backward_params.cuh"

#define ATTN_BWD_REDUCE_THREADS 256

FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_BWD_REDUCE_THREADS) attn_bwd_reduce(AttnBwdParams p) {
    for (int h = threadIdx.x; h < p.hq; h += blockDim.x) {
        float sh = 0.0f, sn = 0.0f;
        for (int b = 0; b < p.seqs; ++b) {
            const float* ph = p.part_head + ((long long)b * p.hq + h) * p.n_qtiles;
            const float* pn = p.part_nu + ((long long)b * p.hq + h) * p.n_qtiles;
            for (int t = 0; t < p.n_qtiles; ++t) sh += ph[t], sn += pn[t];
        }
        if (p.dpi_head) p.dpi_head[h] = sh;
        p.head_nu[h] = sn;
        // A per-head ν has a per-head gradient (only with Student-t: the API checks it).
        if (p.in.nu_head && p.dnu) p.dnu[h] = p.family == ATTN_STUDENT_T ? sn : 0.0f;
    }
    if (p.in.nu_head) return;
    __syncthreads();  // head_nu is written by every thread of the block
    if (threadIdx.x == 0 && p.dnu) {
        float s = 0.0f;
        for (int h = 0; h < p.hq; ++h) s += p.head_nu[h];
        *p.dnu = p.family == ATTN_STUDENT_T ? s : 0.0f;
    }
}
