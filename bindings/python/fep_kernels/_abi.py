"""The C ABI of include/fep_kernels.h in ctypes: its constants, FepError, the structs and
the function signatures (declared on a loaded ``ctypes.CDLL`` by :func:`_declare`)."""

import ctypes


# ---- constants of include/fep_kernels.h ----
FEP_ABI_VERSION = 4

FEP_OK = 0
FEP_ERR_INVALID_ARGUMENT = 1
FEP_ERR_NO_DEVICE = 2
FEP_ERR_DRIVER = 3
FEP_ERR_OUT_OF_MEMORY = 4
FEP_ERR_UNSUPPORTED = 5
FEP_ERR_INTERNAL = 6
FEP_ERR_DIVERGED = 7

FEP_DEVICE_CPU = 0
FEP_DEVICE_CUDA = 1
FEP_DEVICE_HIP = 2
FEP_DEVICE_CPU_REFERENCE = 3

FEP_DTYPE_F32 = 0
FEP_DTYPE_F16 = 1
FEP_DTYPE_BF16 = 2

FEP_LCA_SOFT = 0
FEP_LCA_SOFT_NONNEG = 1
FEP_LCA_HARD = 2
FEP_LCA_HARD_NONNEG = 3
FEP_LCA_TOL_ABSOLUTE = 0
FEP_LCA_TOL_RELATIVE = 1

FEP_ACT_IDENTITY = 0
FEP_ACT_TANH = 1
FEP_ACT_RELU = 2
FEP_ACT_LEAKY_RELU = 3
FEP_ACT_SIGMOID = 4
FEP_ACT_GELU = 5

FEP_SETTLE_INIT_FEEDFORWARD = 0
FEP_SETTLE_INIT_GIVEN = 1

FEP_VMP_OBS_INDEX = 0
FEP_VMP_OBS_DIST = 1

FEP_VMP_METHOD_VMP = 0
FEP_VMP_METHOD_MMP = 1

FEP_VMP_COUNTS_A = 0
FEP_VMP_COUNTS_B = 1
FEP_VMP_COUNTS_D = 2

_STATUS_NAMES = {
    FEP_OK: "FEP_OK",
    FEP_ERR_INVALID_ARGUMENT: "FEP_ERR_INVALID_ARGUMENT",
    FEP_ERR_NO_DEVICE: "FEP_ERR_NO_DEVICE",
    FEP_ERR_DRIVER: "FEP_ERR_DRIVER",
    FEP_ERR_OUT_OF_MEMORY: "FEP_ERR_OUT_OF_MEMORY",
    FEP_ERR_UNSUPPORTED: "FEP_ERR_UNSUPPORTED",
    FEP_ERR_INTERNAL: "FEP_ERR_INTERNAL",
    FEP_ERR_DIVERGED: "FEP_ERR_DIVERGED",
}

_DEVICE_KINDS = {"cpu": FEP_DEVICE_CPU, "cuda": FEP_DEVICE_CUDA, "hip": FEP_DEVICE_HIP,
                 "cpu_reference": FEP_DEVICE_CPU_REFERENCE}

_THRESHOLDS = {
    "soft": FEP_LCA_SOFT,
    "soft_nonneg": FEP_LCA_SOFT_NONNEG,
    "hard": FEP_LCA_HARD,
    "hard_nonneg": FEP_LCA_HARD_NONNEG,
}

_ACTIVATIONS = {
    "identity": FEP_ACT_IDENTITY,
    "tanh": FEP_ACT_TANH,
    "relu": FEP_ACT_RELU,
    "leaky_relu": FEP_ACT_LEAKY_RELU,
    "sigmoid": FEP_ACT_SIGMOID,
    "gelu": FEP_ACT_GELU,
}
# The slope of a bare "leaky_relu" (the C ABI's default for a NULL leaky_alpha, and PyTorch's).
_LEAKY_DEFAULT = 0.01

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


class FepError(RuntimeError):
    """A call into the library returned a nonzero status.

    Attributes: ``status`` (the FEP_ERR_* code), ``name`` (its symbolic name) and ``message``
    (``fep_last_error()`` right after the failing call, with the library's names of arguments
    translated to the Python ones where the binding knows them). ``FEP_ERR_DIVERGED`` (7): the
    computation diverged (an energy, state or update became NaN or infinite); parameters the
    call would have updated are untouched.
    """

    def __init__(self, status, message):
        self.status = int(status)
        self.name = _STATUS_NAMES.get(self.status, f"unknown status {self.status}")
        self.message = message
        super().__init__(f"{self.name} ({self.status}): {message}")


class DivergedError(FepError):
    """A settling or an update diverged (status ``FEP_ERR_DIVERGED``, 7): an energy, state,
    gradient or updated parameter became NaN or infinite, usually because the step size ``eta``
    (or the learning rate) is too large for the network's curvature. Nothing the call would have
    updated in place was written. A :class:`FepError` (and so a RuntimeError)."""


class _FepLcaParams(ctypes.Structure):
    """struct FepLcaParams of the header."""

    _fields_ = [
        ("threshold", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("eta", ctypes.c_float),
        ("steps", ctypes.c_uint32),
        ("tol", ctypes.c_float),
        ("tol_mode", ctypes.c_int32),
        ("allow_tf32", ctypes.c_int32),
    ]


class _FepSettleNet(ctypes.Structure):
    """struct FepSettleNet of the header."""

    _fields_ = [
        ("layers", ctypes.c_uint32),
        ("widths", ctypes.POINTER(ctypes.c_uint64)),
        ("activations", ctypes.POINTER(ctypes.c_int32)),
        ("leaky_alpha", ctypes.POINTER(ctypes.c_float)),
        ("dtype", ctypes.c_int32),
        ("weights", ctypes.POINTER(ctypes.c_void_p)),
        ("biases", ctypes.POINTER(ctypes.c_void_p)),
        ("precision", ctypes.POINTER(ctypes.c_float)),
        ("precision_diag", ctypes.POINTER(ctypes.c_void_p)),
        ("precision_per_sample", ctypes.POINTER(ctypes.c_int32)),
    ]


class _FepSettleParams(ctypes.Structure):
    """struct FepSettleParams of the header."""

    _fields_ = [
        ("eta", ctypes.c_float),
        ("momentum", ctypes.c_float),
        ("steps", ctypes.c_uint32),
        ("tol", ctypes.c_float),
        ("init", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
        ("log_det", ctypes.c_int32),
        ("allow_tf32", ctypes.c_int32),
    ]


_P_U64 = ctypes.POINTER(ctypes.c_uint64)
_P_F64 = ctypes.POINTER(ctypes.c_double)
_P_P_F64 = ctypes.POINTER(_P_F64)


class _FepVmpModelDesc(ctypes.Structure):
    """struct FepVmpModelDesc of the header."""

    _fields_ = [
        ("num_factors", ctypes.c_uint64),
        ("num_modalities", ctypes.c_uint64),
        ("num_states", _P_U64),
        ("num_controls", _P_U64),
        ("num_obs", _P_U64),
        ("a_num_deps", _P_U64),
        ("a_deps", _P_U64),
        ("a", _P_P_F64),
        ("b", _P_P_F64),
        ("c", _P_P_F64),
        ("d", _P_P_F64),
        ("policies", ctypes.POINTER(ctypes.c_int32)),
        ("num_policies", ctypes.c_uint64),
        ("policy_len", ctypes.c_uint64),
        ("e", _P_F64),
        ("pa", _P_P_F64),
        ("pb", _P_P_F64),
        ("pd", _P_P_F64),
    ]


class _FepVmpFpiParams(ctypes.Structure):
    """struct FepVmpFpiParams of the header."""

    _fields_ = [
        ("num_iter", ctypes.c_uint32),
        ("tol", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpSequenceParams(ctypes.Structure):
    """struct FepVmpSequenceParams of the header."""

    _fields_ = [
        ("method", ctypes.c_int32),
        ("num_iter", ctypes.c_uint32),
        ("tau", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpPolicyParams(ctypes.Structure):
    """struct FepVmpPolicyParams of the header."""

    _fields_ = [
        ("gamma", ctypes.c_float),
        ("utility", ctypes.c_int32),
        ("state_info_gain", ctypes.c_int32),
        ("param_info_gain", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpLearnParams(ctypes.Structure):
    """struct FepVmpLearnParams of the header."""

    _fields_ = [
        ("lr_a", ctypes.c_float),
        ("lr_b", ctypes.c_float),
        ("lr_d", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


FEP_SCORE_DOT = 0
FEP_SCORE_GAUSSIAN = 1
FEP_SCORE_STUDENT_T = 2
FEP_SCORE_LAPLACE = 3


_SCORES = {
    "dot": FEP_SCORE_DOT,
    "gaussian": FEP_SCORE_GAUSSIAN,
    "student_t": FEP_SCORE_STUDENT_T,
    "laplace": FEP_SCORE_LAPLACE,
}


class _FepAttnTensor(ctypes.Structure):
    """struct FepAttnTensor of the header."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("shape", ctypes.c_uint64 * 4),
        ("strides", ctypes.c_uint64 * 3),
    ]


class _FepAttnScoreInputs(ctypes.Structure):
    """struct FepAttnScoreInputs of the header."""

    _fields_ = [
        ("nu_head", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("bias_shape", ctypes.c_uint64 * 4),
        ("bias_strides", ctypes.c_uint64 * 3),
        ("mask", ctypes.c_void_p),
        ("mask_shape", ctypes.c_uint64 * 4),
        ("mask_strides", ctypes.c_uint64 * 3),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        ("num_seqs", ctypes.c_uint64),
        ("max_seqlen_q", ctypes.c_uint64),
        ("max_seqlen_k", ctypes.c_uint64),
    ]


class _FepAttentionParams(ctypes.Structure):
    """struct FepAttentionParams of the header."""

    _fields_ = [
        ("score", ctypes.c_int32),
        ("nu", ctypes.c_float),
        ("scale", ctypes.c_double),
        ("causal", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("normalizer", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
    ]


def _declare(lib):
    i32, u64, vp, cp = ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p
    p_u64 = ctypes.POINTER(ctypes.c_uint64)
    p_vp = ctypes.POINTER(vp)
    sigs = {
        "fep_version": (cp, []),
        "fep_abi_version": (i32, []),
        "fep_last_error": (cp, []),
        "fep_device_count": (i32, [i32]),
        "fep_device_name": (i32, [i32, i32, cp, u64]),
        "fep_set_num_threads": (i32, [i32]),
        "fep_num_threads": (i32, []),
        # FepLcaDict* handles and every tensor pointer are passed as void*
        "fep_lca_dict_new": (i32, [i32, i32, vp, i32, vp, u64, u64, i32, ctypes.POINTER(vp)]),
        "fep_lca_dict_free": (None, [vp]),
        "fep_lca_dict_shape": (i32, [vp, p_u64, p_u64]),
        "fep_lca_dict_phi": (i32, [vp, vp, vp]),
        "fep_lca_dict_lambda_max": (i32, [vp, ctypes.POINTER(ctypes.c_double)]),
        "fep_lca_solve": (
            i32,
            [vp, vp, i32, vp, u64, ctypes.POINTER(_FepLcaParams), vp, vp, vp, vp, vp, vp],
        ),
        "fep_lca_dict_learn": (i32, [vp, vp, i32, vp, vp, u64, ctypes.c_float]),
        # float *const *x_out etc. are arrays of void* (tensor pointers)
        "fep_settle_infer": (
            i32,
            [i32, i32, vp, ctypes.POINTER(_FepSettleNet), ctypes.POINTER(_FepSettleParams), u64,
             vp, p_vp, p_vp, vp, vp, vp],
        ),
        "fep_settle_learn": (
            i32,
            [i32, i32, vp, ctypes.POINTER(_FepSettleNet), ctypes.POINTER(_FepSettleParams), u64,
             vp, vp, p_vp, p_vp, vp, vp, vp, p_vp, p_vp, p_vp, ctypes.c_float],
        ),
        "fep_settle_max_stable_eta": (
            i32, [i32, i32, ctypes.POINTER(_FepSettleNet), u64, ctypes.c_float, i32,
                  ctypes.POINTER(ctypes.c_float)],
        ),
        "fep_settle_sgd_log": (
            i32, [i32, i32, vp, ctypes.c_uint32, p_vp, p_vp, _P_U64, ctypes.c_float, vp],
        ),
        # FepVmpModel* handles are void*; tensor pointers too (device memory on a GPU)
        "fep_vmp_model_new": (i32, [i32, i32, ctypes.POINTER(_FepVmpModelDesc),
                                    ctypes.POINTER(vp)]),
        "fep_vmp_model_free": (None, [vp]),
        "fep_vmp_model_info": (i32, [vp, p_u64, p_u64, p_u64, p_u64, p_u64, p_u64]),
        "fep_vmp_model_counts": (i32, [vp, vp, i32, u64, _P_F64, u64]),
        "fep_vmp_infer_states": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpFpiParams), i32, vp, u64, vp, vp, vp, vp, vp],
        ),
        "fep_vmp_infer_sequence": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpSequenceParams), u64, i32, vp, u64, vp, vp, vp,
                  vp, vp],
        ),
        "fep_vmp_infer_policies": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpPolicyParams), vp, u64, vp, vp],
        ),
        "fep_vmp_learn": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpLearnParams), u64, i32, vp, u64, vp, vp],
        ),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes


def _declare_attention(lib):
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    p_t = ctypes.POINTER(_FepAttnTensor)
    f = lib.fep_attention_forward
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_t, vp, vp]
    f = lib.fep_attention_backward
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_t, vp, p_t, vp, vp, p_t, p_t, p_t, vp, vp, vp]
    p_in = ctypes.POINTER(_FepAttnScoreInputs)
    f = lib.fep_attention_forward2
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_in, p_t, vp, vp]
    f = lib.fep_attention_backward2
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_in, p_t, vp, p_t, vp, vp, vp, p_t, p_t, p_t, vp, vp, vp, vp]
    f = lib.fep_attention_probabilities
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_in, vp, ctypes.c_uint64]
    f = lib.fep_attention_merge
    f.restype = i32
    f.argtypes = [i32, i32, vp, i32, ctypes.c_uint64, vp, vp, vp, p_t, vp, vp]
