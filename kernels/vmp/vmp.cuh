// vmp.cuh: what the VMP kernels share: the model descriptor, each thread's working memory, and
// the two contractions every op is built from.
//
// The model lives in two device buffers made once by src/vmp/gpu.rs: `tab`, every f32 table
// (A, ln A, H[A(.|s)], C, B, ln B, B row-normalised, ln D, ln E) at the offsets the descriptor
// gives, and the descriptor itself (VmpModel, int32 words, mirrored by src/vmp/gpu.rs). Each
// block copies the descriptor into shared memory: its per-factor and per-modality arrays are
// indexed by run-time numbers, and indexing a kernel parameter block that way makes the
// compilers copy it to scratch (seen in the settle kernels on gfx9).
//
// State inference keeps one agent per thread: the factor counts and sizes vary per model, the
// work per agent is small (tens to thousands of multiply-adds per iteration), and one thread per
// agent needs no reductions, so it reads the same for wave32 and wave64. Each thread's beliefs
// live in shared memory across all iterations, laid out slot-major ([slot][thread]) so the
// threads of a warp hit distinct banks; when they do not fit, the same code runs on a global
// workspace (VmpWork's stride is then the launch's thread count).
#pragma once
#include "../port/reduce.cuh"
#include "../port/types.cuh"

#define VMP_MAX_FACTORS 16
#define VMP_MAX_MODALITIES 16
// Factors one modality may depend on: the odometer of vmp_contract keeps one register per
// dependency in fully unrolled loops (no run-time-indexed local arrays).
#define VMP_MAX_DEPS 8
#define VMP_THREADS 128
// pymdp's clipping floor for every log: the float64 epsilon, in f32 too (2.22e-16 is a normal
// f32), and ln of it.
#define VMP_EPS 2.220446049250313e-16f
#define VMP_LN_EPS (-36.04365338911715f)

struct VmpFactor {
    int32_t s, u, off;           // S_f, U_f, offset in a belief row
    int32_t b, ln_b, bn, ln_d;   // tab offsets: B [S, S, U], ln B, B row-normalised, ln D [S]
    int32_t cb, cd;              // counts offsets of pB, pD (-1: none)
    int32_t pad;
};

struct VmpModality {
    int32_t o, nd, size, o_off;  // O_m, |deps|, P_m, offset in a distributional observation
    int32_t a, ln_a, h_a, c;     // tab offsets: A [O, P], ln A, H[A(.|s)] [P], C [O]
    int32_t ca;                  // counts offset of pA (-1: none)
    int32_t p_off;               // offset of this modality's P_m columns among all sum_p
    int32_t deps[VMP_MAX_DEPS];  // factor of each axis of A after the first, in A's order
};

struct VmpModel {
    int32_t nf, nm, sum_s, sum_o;
    int32_t num_policies, horizon, ln_e, sum_p;  // sum_p: sum over modalities of P_m
    VmpFactor f[VMP_MAX_FACTORS];
    VmpModality m[VMP_MAX_MODALITIES];
};

// The descriptor in shared memory (every thread calls this first).
FEP_DEVICE const VmpModel& vmp_model(const int32_t* desc) {
    __shared__ VmpModel model;
    int32_t* words = reinterpret_cast<int32_t*>(&model);
    for (int i = threadIdx.x; i < (int)(sizeof(VmpModel) / 4); i += blockDim.x) words[i] = desc[i];
    __syncthreads();
    return model;
}

// One thread's working memory: element i at base[i * stride].
struct VmpWork {
    float* base;
    int64_t stride;
    FEP_DEVICE float& operator[](int i) const { return base[(int64_t)i * stride]; }
};

FEP_DEVICE float vmp_ln(float x) { return logf(fmaxf(x, VMP_EPS)); }
// x ln x with 0 ln 0 = 0 (pymdp's xlogy form).
FEP_DEVICE float vmp_xlnx(float x) { return x == 0.0f ? 0.0f : x * vmp_ln(x); }

// q[off .. off+n) = softmax(x[off .. off+n)); x and q may be the same slots.
FEP_DEVICE void vmp_softmax(const VmpWork& x, const VmpWork& q, int off, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; ++i) mx = fmaxf(mx, x[off + i]);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float e = expf(x[off + i] - mx);
        q[off + i] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; ++i) q[off + i] *= inv;
}

// The core contraction for one modality m at beliefs q (factor f at q[f.off ...]):
//   returns  sum_s ll[s] prod_{g in deps} q_g(s_g)                     (the expected ll)
//   and, with kMessages, adds  sum_{s\f} ll[s] prod_{g != f} q_g(s_g)  into msg[f.off + s_f]
// for every f in deps(m). It walks A_m's own P_m columns (never the joint over all factors) with
// an odometer over the dependency axes (the last fastest, A's row-major order), and forms the
// leave-one-out products from prefix and suffix products: P_m * |deps| multiply-adds.
// `ll(s)` gives ll_m at column s.
template <bool kMessages, typename LL>
FEP_DEVICE float vmp_contract(const VmpModel& md, const VmpModality& mm, const VmpWork& q, const VmpWork& msg,
                              LL ll) {
    int off[VMP_MAX_DEPS], dim[VMP_MAX_DEPS], idx[VMP_MAX_DEPS];
    float w[VMP_MAX_DEPS];
    const int nd = mm.nd;
#pragma unroll
    for (int j = 0; j < VMP_MAX_DEPS; ++j) {
        const bool on = j < nd;
        off[j] = on ? md.f[mm.deps[j]].off : 0;
        dim[j] = on ? md.f[mm.deps[j]].s : 1;
        idx[j] = 0;
        w[j] = on ? q[off[j]] : 1.0f;
    }
    float acc = 0.0f;
    for (int s = 0; s < mm.size; ++s) {
        const float l = ll(s);
        float pre[VMP_MAX_DEPS];
        float run = 1.0f;
#pragma unroll
        for (int j = 0; j < VMP_MAX_DEPS; ++j) {
            pre[j] = run;
            run *= w[j];
        }
        acc += l * run;
        if (kMessages) {
            float suf = 1.0f;
#pragma unroll
            for (int j = VMP_MAX_DEPS - 1; j >= 0; --j) {
                if (j < nd) msg[off[j] + idx[j]] += l * pre[j] * suf;
                suf *= w[j];
            }
        }
        // Advance the odometer: the last axis fastest; `carry` instead of a break keeps the loop
        // unrolled (and idx/w in registers).
        bool carry = true;
#pragma unroll
        for (int j = VMP_MAX_DEPS - 1; j >= 0; --j) {
            if (carry && j < nd) {
                idx[j] += 1;
                carry = idx[j] == dim[j];
                if (carry) idx[j] = 0;
                w[j] = q[off[j] + idx[j]];
            }
        }
    }
    return acc;
}

// The forward prediction of a [rows, P_m] table T under beliefs q: out[r] = sum_s T[r, s] prod q.
// Used for q(o) = A q, the expected ambiguity (one row: H[A(.|s)]) and pA's novelty. Walks the
// columns once and updates every row per column (rows are few: O_m).
template <typename Out>
FEP_DEVICE void vmp_predict(const VmpModel& md, const VmpModality& mm, const VmpWork& q, const float* table, int rows,
                            Out out) {
    int off[VMP_MAX_DEPS], dim[VMP_MAX_DEPS], idx[VMP_MAX_DEPS];
    float w[VMP_MAX_DEPS];
    const int nd = mm.nd;
#pragma unroll
    for (int j = 0; j < VMP_MAX_DEPS; ++j) {
        const bool on = j < nd;
        off[j] = on ? md.f[mm.deps[j]].off : 0;
        dim[j] = on ? md.f[mm.deps[j]].s : 1;
        idx[j] = 0;
        w[j] = on ? q[off[j]] : 1.0f;
    }
    for (int s = 0; s < mm.size; ++s) {
        float joint = 1.0f;
#pragma unroll
        for (int j = 0; j < VMP_MAX_DEPS; ++j) joint *= w[j];
        for (int r = 0; r < rows; ++r) out(r, joint * table[(int64_t)r * mm.size + s]);
        bool carry = true;
#pragma unroll
        for (int j = VMP_MAX_DEPS - 1; j >= 0; --j) {
            if (carry && j < nd) {
                idx[j] += 1;
                carry = idx[j] == dim[j];
                if (carry) idx[j] = 0;
                w[j] = q[off[j] + idx[j]];
            }
        }
    }
}

// An observation index, clamped into range: with the input checks on, out-of-range indices are
// rejected before launch; with them off, a bad index must still not read out of bounds.
FEP_DEVICE int vmp_clamp(int v, int n) { return v < 0 ? 0 : (v >= n ? n - 1 : v); }

// Digamma for x >= 1 (the only arguments pymdp's novelty uses): recurrence up to x >= 6, then
// the asymptotic series; about 1e-7 relative in f32.
FEP_DEVICE float vmp_digamma(float x) {
    float r = 0.0f;
    while (x < 6.0f) {
        r -= 1.0f / x;
        x += 1.0f;
    }
    const float f = 1.0f / (x * x);
    return r + logf(x) - 0.5f / x - f * (1.0f / 12.0f - f * (1.0f / 120.0f - f * (1.0f / 252.0f)));
}
