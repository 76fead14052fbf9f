// backward_f32.cu: the f32 backward kernels, attn_bwd_{dq,kv}_f32_d<D>_v<Dv> for the head-dim
// buckets of backward_params.cuh. One file per input type, so the build compiles them in parallel.
#include "backward.cuh"

#define ATTN_BWD_f32(D, DV) ATTN_BWD_KERNELS(float, f32, D, DV)
ATTN_BWD_FOR_EACH_HEAD_DIMS(ATTN_BWD_f32)
