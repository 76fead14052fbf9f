// states.cu: state inference for a batch of agents (pymdp's fpi), all K iterations in one
// launch, one agent per thread with its beliefs in shared memory (see vmp.cuh).
//
// Per agent, with the work slots  q [S] | lq [S] | lp [S] | ll [sum_p] (distributional obs):
//   lp = ln max(prior, eps);  lq = 0 (uniform q)
//   pass k = 1 .. K+1:  q = softmax(lq) (= q_{k-1});  lq = lp + sum_m messages_m(q);
//                       F_{k-1} = sum q ln q - q.lp - sum_m E_q[ll_m]  (from the same pass)
// so F after every iteration comes for free from the next pass's contraction, and the early
// stop (tol > 0: |F_k - F_{k-1}| <= tol, k >= 2) costs nothing extra. One factor: one exact pass.
#include "vmp.cuh"

FEP_KERNEL void FEP_LAUNCH_BOUNDS(VMP_THREADS)
    vmp_fpi(const int32_t* desc, const float* tab, const int32_t* obs_idx, const float* obs_dist, const float* prior,
            int64_t n, int32_t iters, float tol, float* work, float* qs, float* vfe, int32_t* iterations,
            float* trace) {
    const VmpModel& md = vmp_model(desc);
    FEP_DYNAMIC_SMEM(float, smem);
    const int64_t gtid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t total = (int64_t)gridDim.x * blockDim.x;
    const VmpWork w = work ? VmpWork{work + gtid, total} : VmpWork{smem + threadIdx.x, (int64_t)blockDim.x};
    const int S = md.sum_s;
    const VmpWork q = w;
    const VmpWork lq{w.base + S * w.stride, w.stride};
    const VmpWork lp{w.base + 2 * S * w.stride, w.stride};
    const VmpWork ll{w.base + 3 * S * w.stride, w.stride};
    const int K = md.nf == 1 ? 1 : iters;

    for (int64_t a = gtid; a < n; a += total) {
        for (int f = 0; f < md.nf; ++f) {
            const VmpFactor& fa = md.f[f];
            for (int i = 0; i < fa.s; ++i)
                lp[fa.off + i] = prior ? vmp_ln(prior[a * S + fa.off + i]) : tab[fa.ln_d + i];
        }
        if (obs_dist) {  // ll_m[s] = sum_o o[o] ln A[o, s], once per agent
            for (int m = 0; m < md.nm; ++m) {
                const VmpModality& mm = md.m[m];
                const float* o = obs_dist + a * md.sum_o + mm.o_off;
                for (int s = 0; s < mm.size; ++s) {
                    float acc = 0.0f;
                    for (int r = 0; r < mm.o; ++r) acc += o[r] * tab[mm.ln_a + (int64_t)r * mm.size + s];
                    ll[mm.p_off + s] = acc;
                }
            }
        }
        for (int i = 0; i < S; ++i) lq[i] = 0.0f;
        float f_prev = 0.0f, f_cur = 0.0f;
        int done = K;
        for (int k = 1; k <= K + 1; ++k) {
            float fe = 0.0f;
            for (int f = 0; f < md.nf; ++f) vmp_softmax(lq, q, md.f[f].off, md.f[f].s);
            for (int i = 0; i < S; ++i) {
                fe += vmp_xlnx(q[i]) - q[i] * lp[i];
                lq[i] = lp[i];
            }
            for (int m = 0; m < md.nm; ++m) {
                const VmpModality& mm = md.m[m];
                if (obs_dist) {
                    fe -= vmp_contract<true>(md, mm, q, lq, [&](int s) { return ll[mm.p_off + s]; });
                } else {
                    const float* row = tab + mm.ln_a + (int64_t)vmp_clamp(obs_idx[a * md.nm + m], mm.o) * mm.size;
                    fe -= vmp_contract<true>(md, mm, q, lq, [&](int s) { return row[s]; });
                }
            }
            if (k >= 2) {  // fe is F_{k-1}
                f_cur = fe;
                if (trace) trace[a * iters + k - 2] = fe;
                if (tol > 0.0f && k - 1 >= 2 && fabsf(f_cur - f_prev) <= tol) {
                    done = k - 1;
                    break;
                }
                f_prev = f_cur;
            }
        }
        // q holds the final posterior (q_K, or q_done after an early stop).
        for (int i = 0; i < S; ++i) qs[a * S + i] = q[i];
        if (vfe) vfe[a] = f_cur;
        if (iterations) iterations[a] = done;
        if (trace)
            for (int k = done + 1; k <= iters; ++k) trace[a * iters + k - 1] = f_cur;
    }
}
