// persistent.cu: all T steps of a settling in one launch, for networks whose state fits in
// shared memory for a tile of 16 samples.
//
// One block per tile of SETTLE_TILE_ROWS samples (grid-stride over tiles). x_l, eps_l, the
// compensation c_l of the state's updates and the momentum v_l of every layer l >= 1 stay in
// shared memory (16 bytes per unit and sample, 12 without momentum) for the whole settling; x_0 and the weights are read from global memory (L2) each step. A step is
// two phases separated by barriers:
//   update:   every free layer, from this step's errors (the backward products)
//   evaluate: every layer's error and the energy (the forward products)
// Within a phase no layer reads what another writes, so warps take column chunks of all layers
// without barriers in between. Samples stop one by one (their rows freeze); the block leaves
// when all of its samples have stopped.
#include "settle.cuh"

// Columns per warp task: two 16-wide tensor-core tiles.
#define SETTLE_P_NT 2
#define SETTLE_P_COLS (16 * SETTLE_P_NT)

struct SettleSmem {
    float* base;  // per layer l: x, eps, c and (when has_v) v, each [16][n_l], at off[l - 1]
    // In shared memory too: a register array indexed by the layer would live on the stack.
    const int32_t* off;
    bool has_v;  // momentum > 0 (without momentum v is g itself and is not kept)
    FEP_DEVICE float* x(int l) const { return base + off[l - 1]; }
    FEP_DEVICE float* eps(int l, int n) const { return base + off[l - 1] + SETTLE_TILE_ROWS * n; }
    FEP_DEVICE float* c(int l, int n) const { return base + off[l - 1] + 2 * SETTLE_TILE_ROWS * n; }
    FEP_DEVICE float* v(int l, int n) const { return base + off[l - 1] + 3 * SETTLE_TILE_ROWS * n; }
};

// The layer below l: x_0 rows in global memory, or x_{l-1} in shared memory.
FEP_DEVICE const float* settle_below(const SettleArgs& p, const SettleLayer* lay, const SettleSmem& s, int l, int64_t row0,
                                     int64_t* ld) {
    if (l == 1) {
        *ld = lay[0].n_in;
        return p.x0 + row0 * lay[0].n_in;
    }
    *ld = lay[l - 2].n;
    return s.x(l - 1);
}

// The forward products of layers [l_begin, l_end]: eps_l = x_l - mu_l (or, with init, x_l = mu_l).
template <typename T>
FEP_DEVICE void settle_p_forward(const SettleArgs& p, const SettleLayer* lay, const SettleSmem& s, int64_t row0, int rows, int l,
                                 bool init) {
    const SettleLayer& L = lay[l - 1];
    int64_t ld_in;
    const float* xin = settle_below(p, lay, s, l, row0, &ld_in);
    float* x = s.x(l);
    float* eps = s.eps(l, L.n);
    const float* comp = s.c(l, L.n);
    const int chunks = (L.n + SETTLE_P_COLS - 1) / SETTLE_P_COLS;
    for (int c = (int)fep_warp_id(); c < chunks; c += SETTLE_WARPS) {
        settle_forward_tile<T, SETTLE_P_NT>(L, xin, ld_in, rows, c * SETTLE_P_COLS, p.tf32 != 0, [&](int r, int j, float mu) {
            const int i = r * L.n + j;
            if (init) {
                x[i] = mu;
            } else {
                eps[i] = settle_eps(x[i], comp[i], mu);
            }
        });
    }
}

// The update of free layer l for the rows that have not stopped.
template <typename T>
FEP_DEVICE void settle_p_update(const SettleArgs& p, const SettleLayer* lay, const SettleSmem& s, int64_t row0, int rows, int l,
                                const int32_t* done) {
    const SettleLayer& L = lay[l - 1];
    float* x = s.x(l);
    float* eps = s.eps(l, L.n);
    float* v = s.has_v ? s.v(l, L.n) : nullptr;
    float* comp = s.c(l, L.n);
    const bool top = l == p.depth;
    const int act_above = top ? -1 : lay[l].act;
    const float alpha_above = top ? 0.0f : lay[l].alpha;
    const int chunks = (L.n + SETTLE_P_COLS - 1) / SETTLE_P_COLS;
    for (int c = (int)fep_warp_id(); c < chunks; c += SETTLE_WARPS) {
        auto epi = [&](int r, int j, float back) {
            if (done[r]) return;
            const int i = r * L.n + j;
            float vi = v ? v[i] : 0.0f;
            settle_update(x[i], vi, comp[i], eps[i], settle_pi(L, row0 + r, j), back, act_above, alpha_above, p.eta,
                          p.beta);
            if (v) v[i] = vi;
        };
        // The top layer has no layer above: K = 0 gives back = 0 with the same element ownership.
        const SettleLayer& A = lay[top ? l - 1 : l];
        settle_backward_tile<T, SETTLE_P_NT>(A, top ? 0 : A.n, s.eps(top ? l : l + 1, A.n), A.n, row0, rows, L.n,
                                             c * SETTLE_P_COLS, p.tf32 != 0, epi);
    }
}

// Energy of each row from the errors in shared memory: thread t sums units t / 16, t / 16 + 8, ...
// of row t % 16 over all layers; then 16 threads add the 8 partial sums in order.
FEP_DEVICE void settle_p_energy(const SettleArgs& p, const SettleLayer* lay, const SettleSmem& s, int64_t row0, int rows,
                                float* part, float* energy) {
    constexpr int kParts = SETTLE_THREADS / SETTLE_TILE_ROWS;
    const int r = threadIdx.x % SETTLE_TILE_ROWS, q = threadIdx.x / SETTLE_TILE_ROWS;
    float sum = 0.0f;
    for (int l = 1; l <= p.depth; ++l) {
        const SettleLayer& L = lay[l - 1];
        const float* eps = s.eps(l, L.n) + r * L.n;
        // Rows past the batch hold eps = 0 and read no per-sample precision.
        if (r < rows)
            for (int j = q; j < L.n; j += kParts) sum = fmaf(settle_pi(L, row0 + r, j) * eps[j], eps[j], sum);
    }
    part[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < SETTLE_TILE_ROWS) {
        float e = 0.0f;
        for (int i = 0; i < kParts; ++i) e += part[i * SETTLE_TILE_ROWS + threadIdx.x];
        energy[threadIdx.x] = 0.5f * e;
    }
    __syncthreads();
}

template <typename T>
FEP_DEVICE void settle_persistent(const SettleArgs& p) {
    FEP_DYNAMIC_SMEM(float, smem);
    const SettleLayer* lay = settle_layers(p);
    __shared__ float part[SETTLE_THREADS];
    __shared__ float energy[SETTLE_TILE_ROWS], prev[SETTLE_TILE_ROWS], start[SETTLE_TILE_ROWS];
    __shared__ int32_t done[SETTLE_TILE_ROWS];
    __shared__ int32_t active;
    __shared__ int32_t offsets[SETTLE_MAX_LAYERS];
    if (threadIdx.x == 0) {
        int32_t off = 0;
        for (int l = 1; l <= p.depth; ++l) {
            offsets[l - 1] = off;
            off += (p.beta != 0.0f ? 4 : 3) * SETTLE_TILE_ROWS * lay[l - 1].n;
        }
    }
    __syncthreads();
    SettleSmem s;
    s.base = smem;
    s.off = offsets;
    s.has_v = p.beta != 0.0f;
    const int top_free = p.clamped ? p.depth - 1 : p.depth;
    const int64_t tiles = ((int64_t)p.batch + SETTLE_TILE_ROWS - 1) / SETTLE_TILE_ROWS;
    const int64_t t1 = p.total_steps + 1;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int64_t row0 = tile * SETTLE_TILE_ROWS;
        const int rows = (int)min((int64_t)SETTLE_TILE_ROWS, (int64_t)p.batch - row0);
        // Load: x_L is the target when clamped; free layers from the outputs when given (mode
        // SETTLE_EVAL), else from the feedforward pass below. v = 0.
        for (int l = 1; l <= p.depth; ++l) {
            const SettleLayer& L = lay[l - 1];
            const bool load = (l > top_free) || p.mode == SETTLE_EVAL;
            for (int i = threadIdx.x; i < SETTLE_TILE_ROWS * L.n; i += SETTLE_THREADS) {
                const int r = i / L.n;
                s.x(l)[i] = (load && r < rows) ? L.x[row0 * L.n + i] : 0.0f;
                s.eps(l, L.n)[i] = 0.0f;
                s.c(l, L.n)[i] = 0.0f;
                if (s.has_v) s.v(l, L.n)[i] = 0.0f;
            }
        }
        if (threadIdx.x < SETTLE_TILE_ROWS) done[threadIdx.x] = threadIdx.x >= (unsigned)rows;
        __syncthreads();
        if (p.mode == SETTLE_INIT) {
            for (int l = 1; l <= top_free; ++l) {
                settle_p_forward<T>(p, lay, s, row0, rows, l, true);
                __syncthreads();
            }
        }
        for (int l = 1; l <= p.depth; ++l) settle_p_forward<T>(p, lay, s, row0, rows, l, false);
        __syncthreads();
        settle_p_energy(p, lay, s, row0, rows, part, energy);
        if (threadIdx.x < (unsigned)rows) {
            prev[threadIdx.x] = energy[threadIdx.x];
            start[threadIdx.x] = energy[threadIdx.x];
            if (p.trace) p.trace[(row0 + threadIdx.x) * t1] = energy[threadIdx.x];
            p.steps[row0 + threadIdx.x] = 0;
        }
        for (int t = 1; t <= p.total_steps; ++t) {
            if (threadIdx.x == 0) {
                int a = 0;
                for (int r = 0; r < SETTLE_TILE_ROWS; ++r) a += !done[r];
                active = a;
            }
            __syncthreads();
            if (active == 0) {
                // Every sample of the tile stopped: its trace repeats the last energy.
                if (threadIdx.x < (unsigned)rows && p.trace)
                    for (int u = t; u <= p.total_steps; ++u) p.trace[(row0 + threadIdx.x) * t1 + u] = prev[threadIdx.x];
                break;
            }
            for (int l = 1; l <= top_free; ++l) settle_p_update<T>(p, lay, s, row0, rows, l, done);
            __syncthreads();
            for (int l = 1; l <= p.depth; ++l) settle_p_forward<T>(p, lay, s, row0, rows, l, false);
            __syncthreads();
            settle_p_energy(p, lay, s, row0, rows, part, energy);
            if (threadIdx.x < (unsigned)rows) {
                const int r = threadIdx.x;
                if (!done[r]) {
                    p.steps[row0 + r] = t;
                    if (settle_converged(energy[r], prev[r], start[r], p.tol)) done[r] = 1;
                    prev[r] = energy[r];
                }
                if (p.trace) p.trace[(row0 + r) * t1 + t] = prev[r];
            }
            __syncthreads();
        }
        // Write back the settled state of the valid rows.
        for (int l = 1; l <= p.depth; ++l) {
            const SettleLayer& L = lay[l - 1];
            for (int i = threadIdx.x; i < rows * L.n; i += SETTLE_THREADS) {
                L.x[row0 * L.n + i] = s.x(l)[i];
                L.eps[row0 * L.n + i] = s.eps(l, L.n)[i];
            }
        }
        if (threadIdx.x < (unsigned)rows && p.energy) p.energy[row0 + threadIdx.x] = prev[threadIdx.x];
        __syncthreads();  // shared memory is reused by the next tile
    }
}

#define SETTLE_PERSISTENT_KERNEL(suffix, T)                                                           \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_persistent_##suffix(SettleArgs p) { \
        settle_persistent<T>(p);                                                                  \
    }
FEP_FOR_EACH_DTYPE(SETTLE_PERSISTENT_KERNEL)
