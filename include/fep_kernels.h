/* fep_kernels.h: the C ABI of fep-kernels.
 *
 * Kept in step with src/ffi.rs by tests/ffi_header.rs: every function and constant declared
 * here exists there with the same value, and the other way round.
 *
 * Conventions
 * - Every function that can fail returns an int32_t status (FEP_OK = 0). On failure,
 *   fep_last_error() returns a message for the calling thread that names what was wrong.
 * - Pointers to tensors live on the device the call names: host memory for FEP_DEVICE_CPU,
 *   device memory (CUdeviceptr / hipDeviceptr_t) for CUDA and HIP. Nothing the library did not
 *   allocate is freed by it.
 * - `stream` is a raw CUstream / hipStream_t (NULL: the legacy default stream). Work is enqueued
 *   on it and the call returns without synchronising; results are ready when the stream is.
 *   The CPU device ignores it and returns when the work is done.
 */
#ifndef FEP_KERNELS_H
#define FEP_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FEP_ABI_VERSION 1

/* status codes */
#define FEP_OK 0
#define FEP_ERR_INVALID_ARGUMENT 1
#define FEP_ERR_NO_DEVICE 2
#define FEP_ERR_DRIVER 3
#define FEP_ERR_OUT_OF_MEMORY 4
#define FEP_ERR_UNSUPPORTED 5
#define FEP_ERR_INTERNAL 6

/* device kinds */
#define FEP_DEVICE_CPU 0
#define FEP_DEVICE_CUDA 1
#define FEP_DEVICE_HIP 2

/* element types of inputs */
#define FEP_DTYPE_F32 0
#define FEP_DTYPE_F16 1
#define FEP_DTYPE_BF16 2

/* LCA thresholds */
#define FEP_LCA_SOFT 0
#define FEP_LCA_SOFT_NONNEG 1
#define FEP_LCA_HARD 2
#define FEP_LCA_HARD_NONNEG 3

/* activations f_l of predictive-coding layers */
#define FEP_ACT_IDENTITY 0
#define FEP_ACT_TANH 1
#define FEP_ACT_RELU 2
#define FEP_ACT_LEAKY_RELU 3
#define FEP_ACT_SIGMOID 4
#define FEP_ACT_GELU 5

/* where the free layers of a settling start */
#define FEP_SETTLE_INIT_FEEDFORWARD 0
#define FEP_SETTLE_INIT_GIVEN 1

/* The library version, e.g. "0.1.0". Static storage, never NULL. */
const char *fep_version(void);

/* The ABI version this library implements (FEP_ABI_VERSION of its header). */
int32_t fep_abi_version(void);

/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
const char *fep_last_error(void);

/* Number of devices of `kind` (>= 0); on error a negative status (-FEP_ERR_...). A build without
 * that vendor's feature, or a machine without its driver, has 0 devices of that kind. */
int32_t fep_device_count(int32_t kind);

/* The device's name, NUL-terminated, truncated to fit `len` bytes. */
int32_t fep_device_name(int32_t kind, int32_t ordinal, char *buf, uint64_t len);

/* ---- LCA sparse coding (DESIGN.md section 4.3) ---- */

/* A prepared dictionary: Phi (n x m, row-major, unit-norm columns) in f32 and G = Phi^T Phi - I,
 * stored on one device. */
typedef struct FepLcaDict FepLcaDict;

typedef struct FepLcaParams {
    int32_t threshold; /* FEP_LCA_* */
    float lambda;      /* > 0 */
    float eta;         /* dt / tau, in (0, 1] */
    uint32_t steps;    /* T >= 1 */
    float tol;         /* early stop when max |du| < tol for a sample; 0 disables */
} FepLcaParams;

/* Copies `phi` (dtype, n x m row-major, on the device) into a new prepared dictionary.
 * check_unit_norm != 0 rejects columns whose norm differs from 1 by more than the dtype allows. */
int32_t fep_lca_dict_new(int32_t kind, int32_t ordinal, void *stream, int32_t dtype,
                         const void *phi, uint64_t n, uint64_t m, int32_t check_unit_norm,
                         FepLcaDict **out);

/* Frees a dictionary (NULL is a no-op). */
void fep_lca_dict_free(FepLcaDict *dict);

/* Writes the dictionary's shape. */
int32_t fep_lca_dict_shape(const FepLcaDict *dict, uint64_t *n, uint64_t *m);

/* Copies Phi (f32, n x m) into `phi_out` on the dictionary's device. */
int32_t fep_lca_dict_phi(const FepLcaDict *dict, void *stream, float *phi_out);

/* Runs LCA on `batch` samples x (dtype, batch x n). u0 (batch x m f32) may be NULL (u starts at 0).
 * Writes u and a (batch x m f32). Optional outputs (NULL to skip): energy and active
 * (batch x steps, f32 and uint32: per sample per step, after the step's update; a sample that
 * stopped early repeats its last values), steps_done (batch, uint32). */
int32_t fep_lca_solve(const FepLcaDict *dict, void *stream, int32_t dtype, const void *x,
                      uint64_t batch, const FepLcaParams *params, const float *u0, float *u_out,
                      float *a_out, float *energy_out, uint32_t *active_out,
                      uint32_t *steps_out);

/* One dictionary-learning step: Phi += (lr / batch) * sum_b (x_b - Phi a_b) a_b^T, then every
 * column renormalised to unit norm and G recomputed. x: dtype, batch x n; a: f32, batch x m. */
int32_t fep_lca_dict_learn(FepLcaDict *dict, void *stream, int32_t dtype, const void *x,
                           const float *a, uint64_t batch, float lr);

/* ---- Predictive-coding settling (DESIGN.md section 4.2) ---- */

/* A network of L layers above the input, described per call (nothing is copied or kept):
 *   mu_l = W_l f_l(x_{l-1}) + b_l,  eps_l = x_l - mu_l,  E = 1/2 sum_l eps_l^T Pi_l eps_l.
 * All tensors on the device of the call. */
typedef struct FepSettleNet {
    uint32_t layers;                    /* L >= 1 */
    const uint64_t *widths;             /* L + 1: n_0 ... n_L */
    const int32_t *activations;         /* L: FEP_ACT_*, entry l-1 is f_l (applied to x_{l-1}) */
    const float *leaky_alpha;           /* L slopes for FEP_ACT_LEAKY_RELU, or NULL (0.01) */
    int32_t dtype;                      /* FEP_DTYPE_* of the weights and biases */
    void *const *weights;               /* L: W_l, n_l x n_{l-1} row-major (written only by
                                         * fep_settle_learn with lr > 0) */
    void *const *biases;                /* L: b_l [n_l] (an entry may be NULL: no bias), or NULL */
    const float *precision;             /* L scalar precisions (> 0), or NULL: all 1 */
    const float *const *precision_diag; /* L: [n_l] diagonal precisions (> 0) overriding the
                                         * scalar where an entry is not NULL; or NULL */
} FepSettleNet;

typedef struct FepSettleParams {
    float eta;      /* > 0: step size of the state update */
    float momentum; /* in [0, 1) */
    uint32_t steps; /* T >= 1 */
    float tol;      /* a sample stops when |E_t - E_{t-1}| <= tol * E_{t-1} or E_t <= tol * E_0;
                     * 0 runs all T steps */
    int32_t init;   /* FEP_SETTLE_INIT_FEEDFORWARD, or _GIVEN: the free layers start from x_out */
    int32_t skip_input_checks; /* 0: reject NaN/Inf inputs, weights, biases and non-positive
                                * diagonal precisions first, which on a GPU reads back a few
                                * floats (the call waits for the stream); 1: skip the checks and
                                * return without synchronising */
} FepSettleParams;

/* Settles `batch` samples x0 (f32, batch x n_0) with x_L free. Writes x_out[l-1] and
 * eps_out[l-1] (f32, batch x n_l, l = 1..L; required). Optional (NULL to skip): energy_out
 * (batch: the settled energy), trace_out (batch x (steps + 1): the energy at the start and after
 * each step; a sample that stopped early repeats its last value), steps_out (batch). */
int32_t fep_settle_infer(int32_t kind, int32_t ordinal, void *stream, const FepSettleNet *net,
                         const FepSettleParams *params, uint64_t batch, const float *x0,
                         float *const *x_out, float *const *eps_out, float *energy_out,
                         float *trace_out, uint32_t *steps_out);

/* One learning step: settles with x_L clamped to target (f32, batch x n_L), then writes the
 * gradients of the settled energy, grad_w[l-1] = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T
 * (f32, n_l x n_{l-1}) and grad_b[l-1] (f32, n_l), both required. lr > 0 then applies
 * W_l -= lr grad_w, b_l -= lr grad_b in place (lr = 0: gradients only). Outputs as for
 * fep_settle_infer (x_out[L-1] receives the target). */
int32_t fep_settle_learn(int32_t kind, int32_t ordinal, void *stream, const FepSettleNet *net,
                         const FepSettleParams *params, uint64_t batch, const float *x0,
                         const float *target, float *const *x_out, float *const *eps_out,
                         float *energy_out, float *trace_out, uint32_t *steps_out,
                         float *const *grad_w, float *const *grad_b, float lr);

#ifdef __cplusplus
}
#endif

#endif /* FEP_KERNELS_H */
