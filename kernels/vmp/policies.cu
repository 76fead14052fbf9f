// policies.cu: policy inference (pymdp's update_posterior_policies): for every agent and policy,
// roll the beliefs forward through B, predict the outcomes through A, and sum over the horizon
//   neg_efe = sum_tau sum_m [ q(o).C_m  +  H[q(o)] - E_q H[A_m(.|s)]  (+ novelty of pA, pB) ]
// then G = -neg_efe and q(pi) = softmax(gamma neg_efe + ln max(E, eps)).
//
// One block per agent; its threads share the policies of a chunk (as many as fit in shared
// memory, else a global workspace): per policy c the slots  qp [S] (before the step) | qn [S] (after) | qo [sum_o] |
// part [nm + nf] (each modality's and factor's term, summed in a fixed order: deterministic).
// neg_efe accumulates in the agent's q_pi row, which the block owns, and the softmax runs over
// that row at the end (block reductions, any warp size).
#include "vmp.cuh"

#define VMP_USE_UTILITY 1
#define VMP_USE_INFO_GAIN 2
#define VMP_USE_NOVELTY 4

// W(alpha) of pymdp's exact novelty for one Dirichlet tensor [rows, cols] (axis 0 = rows):
//   ln a0 - ln a + psi(a + 1) - psi(a0 + 1),  a = max(alpha, eps), a0 = max(sum_rows a, eps),
// zero where alpha == 0. One thread per column.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(256) vmp_wnorm(const float* counts, float* w, int32_t rows, int32_t cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int r = 0; r < rows; ++r) sum += fmaxf(counts[(int64_t)r * cols + c], VMP_EPS);
        const float a0 = fmaxf(sum, VMP_EPS);
        const float base = logf(a0) - vmp_digamma(a0 + 1.0f);
        for (int r = 0; r < rows; ++r) {
            const float alpha = counts[(int64_t)r * cols + c];
            const float a = fmaxf(alpha, VMP_EPS);
            w[(int64_t)r * cols + c] = alpha > 0.0f ? base - logf(a) + vmp_digamma(a + 1.0f) : 0.0f;
        }
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(VMP_THREADS)
    vmp_policies(const int32_t* desc, const float* tab, const int32_t* policies, const float* wtab, const float* qs,
                 int64_t n, float gamma, int32_t flags, int32_t chunk, float* work, float* g, float* q_pi) {
    __shared__ float red[FEP_MAX_WARPS];
    const VmpModel& md = vmp_model(desc);
    FEP_DYNAMIC_SMEM(float, shared);
    const int S = md.sum_s, F = md.nf, M = md.nm, P = md.num_policies, H = md.horizon;
    const int row = 2 * S + md.sum_o + M + F;  // slots per policy
    const int tid = threadIdx.x, nt = blockDim.x;
    const bool novelty = (flags & VMP_USE_NOVELTY) && wtab;
    // The chunk's slots: shared memory, or this block's share of a global workspace when one
    // policy's slots do not fit (huge models; tests with little shared memory).
    float* const smem = work ? work + (int64_t)blockIdx.x * chunk * row : shared;

    for (int64_t a = blockIdx.x; a < n; a += gridDim.x) {
        float* negefe = q_pi + a * P;
        for (int p0 = 0; p0 < P; p0 += chunk) {
            const int pc = min(chunk, P - p0);
            for (int i = tid; i < pc * S; i += nt) smem[(i / S) * row + i % S] = qs[a * S + i % S];
            for (int c = tid; c < pc; c += nt) negefe[p0 + c] = 0.0f;
            __syncthreads();
            int qp_at = 0, qn_at = S;  // which half of a row is "before" and which "after"
            for (int tau = 0; tau < H; ++tau) {
                // (1) qn_f = B_f[:, :, u] qp_f
                for (int it = tid; it < pc * S; it += nt) {
                    const int c = it / S, i = it % S;
                    int f = 0;
                    while (f + 1 < F && md.f[f + 1].off <= i) ++f;
                    const VmpFactor& fa = md.f[f];
                    const int sp = i - fa.off;
                    const int u = vmp_clamp(policies[((int64_t)(p0 + c) * H + tau) * F + f], fa.u);
                    const float* qp = smem + c * row + qp_at + fa.off;
                    float sum = 0.0f;
                    for (int s = 0; s < fa.s; ++s) sum += tab[fa.b + ((int64_t)sp * fa.s + s) * fa.u + u] * qp[s];
                    smem[c * row + qn_at + i] = sum;
                }
                __syncthreads();
                // (2) q(o_m) = A_m qn, and pB's novelty q_next . W(pB)[:, :, u] . q_prev per factor
                for (int it = tid; it < pc * md.sum_o; it += nt) {
                    const int c = it / md.sum_o, oi = it % md.sum_o;
                    int m = 0;
                    while (m + 1 < M && md.m[m + 1].o_off <= oi) ++m;
                    const VmpModality& mm = md.m[m];
                    const VmpWork qn{smem + c * row + qn_at, 1};
                    float acc = 0.0f;
                    vmp_predict(md, mm, qn, tab + mm.a + (int64_t)(oi - mm.o_off) * mm.size, 1,
                                [&](int, float v) { acc += v; });
                    smem[c * row + 2 * S + oi] = acc;
                }
                for (int it = tid; it < pc * F; it += nt) {
                    const int c = it / F, f = it % F;
                    const VmpFactor& fa = md.f[f];
                    float acc = 0.0f;
                    if (novelty && fa.cb >= 0) {
                        const int u = vmp_clamp(policies[((int64_t)(p0 + c) * H + tau) * F + f], fa.u);
                        const float* qp = smem + c * row + qp_at + fa.off;
                        const float* qn = smem + c * row + qn_at + fa.off;
                        for (int sp = 0; sp < fa.s; ++sp) {
                            float inner = 0.0f;
                            for (int s = 0; s < fa.s; ++s) inner += wtab[fa.cb + ((int64_t)sp * fa.s + s) * fa.u + u] * qp[s];
                            acc += qn[sp] * inner;
                        }
                    }
                    smem[c * row + 2 * S + md.sum_o + M + f] = acc;
                }
                __syncthreads();
                // (3) each modality's terms
                for (int it = tid; it < pc * M; it += nt) {
                    const int c = it / M, m = it % M;
                    const VmpModality& mm = md.m[m];
                    const float* qo = smem + c * row + 2 * S + mm.o_off;
                    const VmpWork qn{smem + c * row + qn_at, 1};
                    float term = 0.0f;
                    if (flags & VMP_USE_UTILITY) {
                        for (int o = 0; o < mm.o; ++o) term += qo[o] * tab[mm.c + o];
                    }
                    if (flags & VMP_USE_INFO_GAIN) {
                        float h = 0.0f, amb = 0.0f;
                        for (int o = 0; o < mm.o; ++o) h -= vmp_xlnx(qo[o]);
                        vmp_predict(md, mm, qn, tab + mm.h_a, 1, [&](int, float v) { amb += v; });
                        term += h - amb;
                    }
                    if (novelty && mm.ca >= 0) {
                        float nov = 0.0f;
                        vmp_predict(md, mm, qn, wtab + mm.ca, mm.o, [&](int r, float v) { nov += v * qo[r]; });
                        term += nov;
                    }
                    smem[c * row + 2 * S + md.sum_o + m] = term;
                }
                __syncthreads();
                // (4) sum the parts in a fixed order
                for (int c = tid; c < pc; c += nt) {
                    const float* part = smem + c * row + 2 * S + md.sum_o;
                    float s = 0.0f;
                    for (int i = 0; i < M + F; ++i) s += part[i];
                    negefe[p0 + c] += s;
                }
                const int t = qp_at;
                qp_at = qn_at;
                qn_at = t;
                __syncthreads();
            }
        }
        // q(pi) = softmax(gamma neg_efe + ln E) over the row; G = -neg_efe.
        float mx = -INFINITY;
        for (int p = tid; p < P; p += nt) mx = fmaxf(mx, gamma * negefe[p] + tab[md.ln_e + p]);
        mx = block_allreduce<FEP_WARP_SIZE>(mx, FepMax(), -INFINITY, red);
        float sum = 0.0f;
        for (int p = tid; p < P; p += nt) sum += expf(gamma * negefe[p] + tab[md.ln_e + p] - mx);
        sum = block_allreduce<FEP_WARP_SIZE>(sum, FepSum(), 0.0f, red);
        const float inv = 1.0f / sum;
        for (int p = tid; p < P; p += nt) {
            const float ne = negefe[p];
            if (g) g[a * P + p] = -ne;
            negefe[p] = expf(gamma * ne + tab[md.ln_e + p] - mx) * inv;
        }
        __syncthreads();
    }
}
