/* fep_kernels.h: the C ABI of fep-kernels.
 *
 * Kept in step with the files of src/ffi/ by tests/ffi_header.rs: every function and constant declared
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

/* how VMP observations are given */
#define FEP_VMP_OBS_INDEX 0 /* int32_t indices, one per modality: o_m in 0 .. O_m - 1 */
#define FEP_VMP_OBS_DIST 1  /* float distributions, O_m per modality, modalities concatenated */

/* sequence update rules (pymdp's `vmp` and `mmp`) */
#define FEP_VMP_METHOD_VMP 0
#define FEP_VMP_METHOD_MMP 1

/* which Dirichlet counts fep_vmp_model_counts reads */
#define FEP_VMP_COUNTS_A 0
#define FEP_VMP_COUNTS_B 1
#define FEP_VMP_COUNTS_D 2

/* attention score families (DESIGN.md 4.1; d2 = |q_i - k_j|^2, pi = pi_h pi_j, tau the scale) */
#define FEP_SCORE_DOT 0       /* s = tau pi q.k */
#define FEP_SCORE_GAUSSIAN 1  /* s = -1/2 tau pi d2 */
#define FEP_SCORE_STUDENT_T 2 /* s = -((nu + D)/2) ln(1 + tau pi d2 / nu) */
#define FEP_SCORE_LAPLACE 3   /* s = -sqrt(tau pi d2) */

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

/* ---- Variational message passing for discrete active inference (DESIGN.md section 4.4) ----
 *
 * Conventions are pymdp 1.0.4's (tests/fixtures/VMP-CONVENTIONS.md). F hidden-state factors
 * with S_f states and U_f controls; M modalities with O_m outcomes, modality m depending on the
 * factors deps(m). N agents share one model; each has its own observations, prior and beliefs.
 * Beliefs are float [N, sum S]: factor f at offset S_0 + ... + S_{f-1} of an agent's row.
 * Every log is ln max(x, 2.22e-16), as pymdp's.
 *
 * Tensors of the calls below live on the model's device (host memory for FEP_DEVICE_CPU); their
 * lengths follow from n, steps and the model (fep_vmp_model_info). Outputs must not overlap
 * each other or the inputs. */

/* A validated generative model stored on one device. */
typedef struct FepVmpModel FepVmpModel;

/* A generative model in pymdp's layouts, all row-major, all in HOST memory whatever the device
 * (fep_vmp_model_new copies it). */
typedef struct FepVmpModelDesc {
    uint64_t num_factors;       /* F >= 1 */
    uint64_t num_modalities;    /* M >= 1 */
    const uint64_t *num_states; /* F: S_f >= 1 */
    const uint64_t *num_controls; /* F: U_f >= 1, or NULL: every factor uncontrolled (U_f = 1) */
    const uint64_t *num_obs;    /* M: O_m >= 1 */
    const uint64_t *a_num_deps; /* M: |deps(m)| >= 1 */
    const uint64_t *a_deps;     /* sum_m |deps(m)|: deps(0), then deps(1), ...; each in A_m's
                                 * axis order (any order, no repeats) */
    const double *const *a;     /* M: A_m [O_m, S_deps(m)[0], S_deps(m)[1], ...], p(o | s): every
                                 * column sums to 1 */
    const double *const *b;     /* F: B_f [S_f, S_f, U_f], B_f[s', s, u] = p(s' | s, u): columns
                                 * sum to 1 */
    const double *const *c;     /* M: C_m [O_m] log-preferences, used as given; or NULL (an entry
                                 * may be NULL): zeros */
    const double *const *d;     /* F: D_f [S_f], the prior over initial states; or NULL (an entry
                                 * may be NULL): uniform */
    const int32_t *policies;    /* [num_policies, policy_len, F] actions, each in 0 .. U_f - 1;
                                 * or NULL (num_policies 0): no policy inference */
    uint64_t num_policies;      /* P */
    uint64_t policy_len;        /* H >= 1 with a policy table */
    const double *e;            /* [P] prior over policies, or NULL: uniform */
    const double *const *pa;    /* M: Dirichlet counts shaped like A_m (>= 0), or NULL: none */
    const double *const *pb;    /* F: counts shaped like B_f, or NULL: none */
    const double *const *pd;    /* F: counts shaped like D_f, or NULL: none */
} FepVmpModelDesc;

/* State inference (pymdp's `fpi`). */
typedef struct FepVmpFpiParams {
    uint32_t num_iter; /* K >= 1 Jacobi iterations (pymdp: 16); one exact pass when F = 1 */
    float tol;         /* >= 0: an agent stops after iteration k >= 2 once |F_k - F_{k-1}| <= tol
                        * (0: always K, as pymdp) */
    int32_t skip_input_checks; /* 0: on a GPU, scan the observations and priors first (indices
                                * in range, values finite and >= 0), which reads back one word
                                * (the call waits for the stream); 1: skip the scan (bad indices
                                * are clamped) and return without synchronising */
} FepVmpFpiParams;

/* Sequence inference over a window of T steps. */
typedef struct FepVmpSequenceParams {
    int32_t method;    /* FEP_VMP_METHOD_VMP or _MMP */
    uint32_t num_iter; /* K >= 1 (pymdp: 16) */
    float tau;         /* step size in (0, 1] (pymdp's Agent: 1) */
    int32_t skip_input_checks; /* as in FepVmpFpiParams */
} FepVmpSequenceParams;

/* Policy inference: q(pi) = softmax(-gamma G + ln max(E, eps)) with G = -(pymdp's neg_efe). */
typedef struct FepVmpPolicyParams {
    float gamma;             /* >= 0 */
    int32_t utility;         /* != 0: add q(o) . C_m */
    int32_t state_info_gain; /* != 0: add H[q(o_m)] - E_q[H[A_m(.|s)]] */
    int32_t param_info_gain; /* != 0: add the novelty of pA and pB (the model must have one) */
    int32_t skip_input_checks; /* as in FepVmpFpiParams (the beliefs: finite and >= 0) */
} FepVmpPolicyParams;

/* Dirichlet learning rates; 0 leaves those counts as they are, > 0 needs the model to have them. */
typedef struct FepVmpLearnParams {
    float lr_a; /* pA_m += lr_a sum_{agents, t} o_m (x) q_t(s_deps(m)) */
    float lr_b; /* pB_f[:, :, u] += lr_b sum_{agents, t} [a_t = u] q_{t+1} (x) q_t */
    float lr_d; /* pD_f += lr_d sum_agents q_0, where pD_f > 0 */
    int32_t skip_input_checks; /* as in FepVmpFpiParams */
} FepVmpLearnParams;

/* Validates `desc` (shapes, normalised columns of A, B and D, non-negative counts, dependencies
 * and policy actions in range) and stores the model on the device (kind, ordinal). */
int32_t fep_vmp_model_new(int32_t kind, int32_t ordinal, const FepVmpModelDesc *desc,
                          FepVmpModel **out);

/* Frees a model (NULL is a no-op). Work already enqueued must not still use it. */
void fep_vmp_model_free(FepVmpModel *model);

/* The model's sizes; any pointer may be NULL. belief_len = sum S_f, obs_len = sum O_m (the
 * width of a distributional observation), num_policies = P (0 without a table), policy_len = H. */
int32_t fep_vmp_model_info(const FepVmpModel *model, uint64_t *num_factors,
                           uint64_t *num_modalities, uint64_t *belief_len, uint64_t *obs_len,
                           uint64_t *num_policies, uint64_t *policy_len);

/* Copies the current Dirichlet counts `which` (FEP_VMP_COUNTS_A, _B, _D) of modality or factor
 * `index` into `out`, HOST memory of exactly `len` doubles (the size of A_m, B_f or D_f), after
 * the work enqueued on `stream` (the stream fep_vmp_learn ran on) is done: the call waits.
 * FEP_ERR_INVALID_ARGUMENT when the model has no such counts. */
int32_t fep_vmp_model_counts(const FepVmpModel *model, void *stream, int32_t which,
                             uint64_t index, double *out, uint64_t len);

/* State inference for n agents. obs: [n, M] int32 indices (obs_kind FEP_VMP_OBS_INDEX) or
 * [n, sum O] float distributions (FEP_VMP_OBS_DIST; non-negative, used as sum_o o ln A).
 * prior: [n, sum S], or NULL: every agent starts from D. Writes qs [n, sum S]; optional (NULL to
 * skip): vfe [n] (the free energy F), iterations [n] (iterations run), vfe_trace
 * [n, num_iter] (F after each iteration; repeated after an early stop). */
int32_t fep_vmp_infer_states(const FepVmpModel *model, void *stream,
                             const FepVmpFpiParams *params, int32_t obs_kind, const void *obs,
                             uint64_t n, const float *prior, float *qs, float *vfe,
                             int32_t *iterations, float *vfe_trace);

/* Sequence inference over windows of `steps` = T >= 1 steps. obs: [n, T, M] indices or
 * [n, T, sum O] distributions; actions: [n, T - 1, F] int32 (action t moves the state from step
 * t to t + 1; may be NULL only when T = 1); prior: [n, sum S] for step 0, or NULL: D. Writes qs
 * [n, T, sum S]; optional: vfe [n] (the window's free energy), vfe_t [n, T] (its per-step
 * terms). */
int32_t fep_vmp_infer_sequence(const FepVmpModel *model, void *stream,
                               const FepVmpSequenceParams *params, uint64_t steps,
                               int32_t obs_kind, const void *obs, uint64_t n,
                               const int32_t *actions, const float *prior, float *qs, float *vfe,
                               float *vfe_t);

/* Policy inference for n agents with beliefs qs [n, sum S] (needs a policy table). Writes q_pi
 * [n, P]; optional: g [n, P], the expected free energy G (lower is better). */
int32_t fep_vmp_infer_policies(const FepVmpModel *model, void *stream,
                               const FepVmpPolicyParams *params, const float *qs, uint64_t n,
                               float *g, float *q_pi);

/* Dirichlet learning from n windows of `steps` = T steps: obs as for fep_vmp_infer_sequence,
 * qs [n, T, sum S] the posteriors, actions [n, T - 1, F] (needed when lr_b > 0 and T > 1, else
 * may be NULL). Updates the model's counts in place, summed over agents and steps; read them
 * with fep_vmp_model_counts. */
int32_t fep_vmp_learn(FepVmpModel *model, void *stream, const FepVmpLearnParams *params,
                      uint64_t steps, int32_t obs_kind, const void *obs, uint64_t n,
                      const float *qs, const int32_t *actions);

/* ---- precision-weighted attention (DESIGN.md 4.1) ---- */

/* A [B, H, L, D] tensor on the call's device: element (b, h, l, x) is at
 * data + b strides[0] + h strides[1] + l strides[2] + x elements (the last dimension is
 * contiguous). Row-major BHLD: strides {H L D, L D, D}; row-major BLHD memory (FlashAttention's
 * layout) seen as BHLD: {L H D, D, H D}. Rows of D elements may not overlap. */
typedef struct FepAttnTensor {
    void *data;
    uint64_t shape[4];   /* B, H, L, D (in this order whatever the memory layout) */
    uint64_t strides[3]; /* element strides of B, H and L */
} FepAttnTensor;

typedef struct FepAttentionParams {
    int32_t score;     /* FEP_SCORE_DOT, _GAUSSIAN, _STUDENT_T or _LAPLACE */
    float nu;          /* FEP_SCORE_STUDENT_T: degrees of freedom, finite and > 0 (else unused) */
    double scale;      /* tau; <= 0 or NaN: the default (1/sqrt(D) for DOT, 1 otherwise) */
    int32_t causal;    /* != 0: keys j > i + Lk - Lq are masked (bottom-right aligned) */
    int32_t window;    /* W >= 1: only keys i + Lk - Lq - W < j <= i + Lk - Lq are visible
                        * (implies causal); 0: no window */
    int32_t normalizer; /* != 0: add (D/2) ln pi to the distance families' scores (not DOT) */
    int32_t skip_input_checks; /* 0: on a GPU, scan pi_head, pi_key (finite, > 0) and kv_len (in
                                * 0 .. Lk) first, which reads back one word (the call waits for
                                * the stream); 1: skip the scan and return without synchronising.
                                * The CPU always checks. */
} FepAttentionParams;

/* o_i = sum_j softmax_j(s_ij) v_j over the visible keys, with q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
 * v [B, Hkv, Lk, Dv] (Hq % Hkv == 0: query head h reads kv head h / (Hq / Hkv)), all of `dtype`
 * (FEP_DTYPE_F32, _F16 or _BF16), o [B, Hq, Lq, Dv] of `dtype` (any strides, as the inputs).
 * Optional (NULL: none): pi_head [Hq] and pi_key [B, Hkv, Lk] float precisions (pi = 1 where
 * absent), kv_len [B] int32 key lengths (keys j >= kv_len[b] are padding); outputs lse
 * [B, Hq, Lq] = ln sum_j e^{s_ij} and e [B, Hq, Lq] = sum_j w_ij pi_ij d2_ij, float, row-major.
 * A row with no visible key gets o = 0, lse = -inf, e = 0. Outputs may not alias any input or each
 * other. On the CPU the computation is the float64 reference; on a GPU the fused kernels,
 * enqueued on `stream`, for D and Dv each one of 32, 64, 96, 128, 256 (others:
 * FEP_ERR_UNSUPPORTED). */
int32_t fep_attention_forward(int32_t kind, int32_t ordinal, void *stream,
                              const FepAttentionParams *params, int32_t dtype,
                              const FepAttnTensor *q, const FepAttnTensor *k,
                              const FepAttnTensor *v, const float *pi_head, const float *pi_key,
                              const int32_t *kv_len, const FepAttnTensor *o, float *lse,
                              float *e);

/* The gradients of a loss L(o, e) of a forward call (the same params, dtype, q, k, v, pi_head,
 * pi_key and kv_len as that call) with respect to q, k, v, the precisions and nu, given
 * d_o = dL/do and optionally d_e = dL/de. The maths is in src/attention/backward.rs.
 * Inputs, all on the call's device:
 *   q, k, v, pi_head, pi_key, kv_len   as for fep_attention_forward (pi_head, pi_key and kv_len
 *                                      may be NULL: pi = 1, every key visible)
 *   o     [B, Hq, Lq, Dv] of `dtype` (any strides): the forward's o
 *   lse   [B, Hq, Lq] float, row-major: the forward's lse (required)
 *   d_o   [B, Hq, Lq, Dv] of `dtype` (any strides): dL/do
 *   e     [B, Hq, Lq] float: the forward's e; required when d_e is given, else may be NULL
 *   d_e   [B, Hq, Lq] float: dL/de, or NULL when the loss does not use e
 * Outputs (written, not accumulated into):
 *   dq    [B, Hq, Lq, D], dk [B, Hkv, Lk, D], dv [B, Hkv, Lk, Dv], of `dtype`, any strides
 *         (required; dk and dv summed over the query heads of each kv head's group)
 *   dpi_head [Hq], dpi_key [B, Hkv, Lk], dnu [1]: float, each NULL when not wanted: dL/dpi_h,
 *         dL/dpi_j (at pi = 1 for a precision the call did not pass) and dL/dnu (0 unless the
 *         score is FEP_SCORE_STUDENT_T)
 * Rows with no visible key contribute nothing. No output may alias an input or another output.
 * Deterministic (no floating-point atomics): two calls give the same bits. On the CPU the
 * computation is the float64 reference (which recomputes the forward: o and lse are checked but
 * not read); on a GPU three kernels enqueued on `stream`, for D and Dv each one of 32, 64, 96,
 * 128, 256 and, in float32, D + Dv <= 384 (others: FEP_ERR_UNSUPPORTED). */
int32_t fep_attention_backward(int32_t kind, int32_t ordinal, void *stream,
                               const FepAttentionParams *params, int32_t dtype,
                               const FepAttnTensor *q, const FepAttnTensor *k,
                               const FepAttnTensor *v, const float *pi_head, const float *pi_key,
                               const int32_t *kv_len, const FepAttnTensor *o, const float *lse,
                               const FepAttnTensor *d_o, const float *e, const float *d_e,
                               const FepAttnTensor *dq, const FepAttnTensor *dk,
                               const FepAttnTensor *dv, float *dpi_head, float *dpi_key,
                               float *dnu);

/* Merges `splits` = S >= 1 partial attention results of the same rows, each over a subset of
 * the keys (a split decode, or shards of a sequence on several devices), by their lse:
 *   lse = ln sum_c e^{lse_c},  o = sum_c e^{lse_c - lse} o_c,  e = sum_c e^{lse_c - lse} e_c
 * (a row whose every lse_c is -inf gives o = 0, lse = -inf, e = 0). The shape B, Hq, Lq, Dv is
 * o's. Inputs, row-major on the call's device:
 *   o_parts   [S, B, Hq, Lq, Dv] of `dtype`: each part's normalised o
 *   lse_parts [S, B, Hq, Lq] float: each part's lse (-inf for a part with no visible key)
 *   e_parts   [S, B, Hq, Lq] float: each part's e, or NULL (then e must be NULL)
 * Outputs: o [B, Hq, Lq, Dv] of `dtype`, any strides (required); lse and e [B, Hq, Lq] float,
 * row-major, or NULL. No output may alias an input or another output. On the CPU the merge runs
 * in float64; on a GPU one kernel enqueued on `stream`, accumulating in float. */
int32_t fep_attention_merge(int32_t kind, int32_t ordinal, void *stream, int32_t dtype,
                            uint64_t splits, const void *o_parts, const float *lse_parts,
                            const float *e_parts, const FepAttnTensor *o, float *lse, float *e);

#ifdef __cplusplus
}
#endif

#endif /* FEP_KERNELS_H */
