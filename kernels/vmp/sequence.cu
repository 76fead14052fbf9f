// sequence.cu: inference over a window of T steps with past actions (pymdp's vmp and mmp), all
// K iterations in one launch, one agent per thread (see vmp.cuh).
//
// Per agent, work slots  qa [T*S] | qb [T*S] | x [S] | ll [T*sum_p] (distributional obs).
// Each iteration updates every step and factor from the previous iterate (Jacobi in t and f):
//   x = ln q + tau (lnA - ln q + fwd + bwd),  q = softmax(x)
// with lnA the expected log-likelihood at step t (vmp_contract), and the messages
//   vmp:  fwd_0 = ln D,  fwd_t = ln B_{t-1} . q_{t-1},  bwd_t = q_{t+1} . ln B_t
//   mmp:  fwd_0 = ln D (halved if T > 1),  fwd_t = ln(B_{t-1} q_{t-1}) (halved if t < T-1),
//         bwd_t = 1/2 ln(q_{t+1} . Bn_t)   (Bn: B row-normalised over the previous state)
// (every ln is ln max(., eps)). Then the mean-field sequence free energy per step.
#include "vmp.cuh"

// ln prior_f(i) at step 0: the agent's prior, or the model's D.
FEP_DEVICE float vmp_ln_prior(const float* tab, const VmpFactor& fa, const float* prior, int i) {
    return prior ? vmp_ln(prior[fa.off + i]) : tab[fa.ln_d + i];
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(VMP_THREADS)
    vmp_sequence(const int32_t* desc, const float* tab, const int32_t* obs_idx, const float* obs_dist,
                 const int32_t* actions, const float* prior, int64_t n, int32_t steps, int32_t iters, float tau,
                 int32_t mmp, float* work, float* qs, float* vfe, float* vfe_t) {
    const VmpModel& md = vmp_model(desc);
    FEP_DYNAMIC_SMEM(float, smem);
    const int64_t gtid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t total = (int64_t)gridDim.x * blockDim.x;
    const VmpWork w = work ? VmpWork{work + gtid, total} : VmpWork{smem + threadIdx.x, (int64_t)blockDim.x};
    const int S = md.sum_s, T = steps, F = md.nf;
    const int64_t st = w.stride;
    float* const base_a = w.base;
    float* const base_b = w.base + (int64_t)T * S * st;
    const VmpWork x{w.base + 2 * (int64_t)T * S * st, st};
    float* const ll_base = w.base + (2 * (int64_t)T * S + S) * st;
    auto at = [&](float* base, int t) { return VmpWork{base + (int64_t)t * S * st, st}; };
    auto ll_at = [&](int t) { return VmpWork{ll_base + (int64_t)t * md.sum_p * st, st}; };

    for (int64_t a = gtid; a < n; a += total) {
        const float* pr = prior ? prior + a * S : nullptr;
        auto act = [&](int t, int f) {  // the action that moved factor f from step t to t + 1
            return vmp_clamp(actions[(a * (T - 1) + t) * F + f], md.f[f].u);
        };
        // The expected log-likelihood of step t at beliefs q; with msg, also the messages.
        auto lnA = [&](int t, const VmpWork& q, const VmpWork& msg, bool messages) {
            float acc = 0.0f;
            for (int m = 0; m < md.nm; ++m) {
                const VmpModality& mm = md.m[m];
                if (obs_dist) {
                    const VmpWork l = ll_at(t);
                    auto get = [&](int s) { return l[mm.p_off + s]; };
                    acc += messages ? vmp_contract<true>(md, mm, q, msg, get) : vmp_contract<false>(md, mm, q, msg, get);
                } else {
                    const int o = vmp_clamp(obs_idx[(a * T + t) * md.nm + m], mm.o);
                    const float* row = tab + mm.ln_a + (int64_t)o * mm.size;
                    auto get = [&](int s) { return row[s]; };
                    acc += messages ? vmp_contract<true>(md, mm, q, msg, get) : vmp_contract<false>(md, mm, q, msg, get);
                }
            }
            return acc;
        };
        if (obs_dist) {
            for (int t = 0; t < T; ++t) {
                const VmpWork l = ll_at(t);
                for (int m = 0; m < md.nm; ++m) {
                    const VmpModality& mm = md.m[m];
                    const float* o = obs_dist + (a * T + t) * md.sum_o + mm.o_off;
                    for (int s = 0; s < mm.size; ++s) {
                        float acc = 0.0f;
                        for (int r = 0; r < mm.o; ++r) acc += o[r] * tab[mm.ln_a + (int64_t)r * mm.size + s];
                        l[mm.p_off + s] = acc;
                    }
                }
            }
        }
        float* cur = base_a;
        float* nxt = base_b;
        for (int t = 0; t < T; ++t)
            for (int f = 0; f < F; ++f)
                for (int i = 0; i < md.f[f].s; ++i) at(cur, t)[md.f[f].off + i] = 1.0f / md.f[f].s;

        for (int it = 0; it < iters; ++it) {
            for (int t = 0; t < T; ++t) {
                const VmpWork q = at(cur, t), qn = at(nxt, t);
                for (int i = 0; i < S; ++i) x[i] = 0.0f;
                lnA(t, q, x, true);
                for (int f = 0; f < F; ++f) {
                    const VmpFactor& fa = md.f[f];
                    const int ns = fa.s, nu = fa.u;
                    for (int i = 0; i < ns; ++i) {
                        float fwd, bwd = 0.0f;
                        if (t == 0) {
                            fwd = vmp_ln_prior(tab, fa, pr, i) * (mmp && T > 1 ? 0.5f : 1.0f);
                        } else {
                            const VmpWork qp = at(cur, t - 1);
                            const int u = act(t - 1, f);
                            float sum = 0.0f;
                            for (int s = 0; s < ns; ++s)
                                sum += tab[(mmp ? fa.b : fa.ln_b) + ((int64_t)i * ns + s) * nu + u] * qp[fa.off + s];
                            fwd = mmp ? vmp_ln(sum) * (t < T - 1 ? 0.5f : 1.0f) : sum;
                        }
                        if (t < T - 1) {
                            const VmpWork qf = at(cur, t + 1);
                            const int u = act(t, f);
                            float sum = 0.0f;
                            for (int s = 0; s < ns; ++s)
                                sum += qf[fa.off + s] * tab[(mmp ? fa.bn : fa.ln_b) + ((int64_t)s * ns + i) * nu + u];
                            bwd = mmp ? 0.5f * vmp_ln(sum) : sum;
                        }
                        const float lnq = vmp_ln(q[fa.off + i]);
                        qn[fa.off + i] = lnq + tau * (x[fa.off + i] - lnq + fwd + bwd);
                    }
                    vmp_softmax(qn, qn, fa.off, ns);
                }
            }
            float* tmp = cur;
            cur = nxt;
            nxt = tmp;
        }

        float total_fe = 0.0f;
        for (int t = 0; t < T; ++t) {
            const VmpWork q = at(cur, t);
            float fe = 0.0f;
            for (int i = 0; i < S; ++i) fe += vmp_xlnx(q[i]);
            for (int f = 0; f < F; ++f) {
                const VmpFactor& fa = md.f[f];
                if (t == 0) {
                    for (int i = 0; i < fa.s; ++i) fe -= q[fa.off + i] * vmp_ln_prior(tab, fa, pr, i);
                } else {
                    const VmpWork qp = at(cur, t - 1);
                    const int u = act(t - 1, f);
                    for (int i = 0; i < fa.s; ++i) {
                        float sum = 0.0f;
                        for (int s = 0; s < fa.s; ++s)
                            sum += tab[fa.ln_b + ((int64_t)i * fa.s + s) * fa.u + u] * qp[fa.off + s];
                        fe -= q[fa.off + i] * sum;
                    }
                }
            }
            fe -= lnA(t, q, x, false);
            if (vfe_t) vfe_t[a * T + t] = fe;
            total_fe += fe;
            for (int i = 0; i < S; ++i) qs[(a * T + t) * S + i] = q[i];
        }
        if (vfe) vfe[a] = total_fe;
    }
}
