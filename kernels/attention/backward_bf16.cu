// backward_bf16.cu: the bf16 backward kernels, attn_bwd_{dq,kv}_bf16_d<D>_v<Dv> for the head-dim
// buckets of backward_params.cuh. One file per input type, so the build compiles them in parallel.
#include "backward.cuh"

#define ATTN_BWD_bf16(D, DV) ATTN_BWD_KERNELS(fep_bf16, bf16, D, DV)
ATTN_BWD_FOR_EACH_HEAD_DIMS(ATTN_BWD_bf16)
