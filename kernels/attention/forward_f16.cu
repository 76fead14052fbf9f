// forward_f16.cu: the f16 forward kernels, one per (D, Dv) of traits.cuh's list:
// attn_fwd_f16_d<D>_v<Dv>. One file per input type, so the build compiles them in parallel.
#include "forward16.cuh"

#define ATTN_FWD(D, DV)                                                                         \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS((AttnTraits<fep_f16, D, DV>::kThreads)) attn_fwd_f16_d##D##_v##DV( \
        AttnParams p) {                                                                         \
        attn_forward16<fep_f16, D, DV>(p);                                                            \
    }
ATTN_FOR_EACH_HEAD_DIMS(ATTN_FWD)
