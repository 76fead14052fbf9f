// merge.cu: partial attention results merged by their lse (DESIGN.md §4.1; src/attention/merge.rs
// for the maths and its f64 reference). S parts of the same rows, each over a subset of the keys:
//   lse = ln Σ_c e^{lse_c}  (shifted by max_c lse_c),  w_c = e^{lse_c − lse},
//   o = Σ_c w_c o_c,  e = Σ_c w_c e_c;
// parts with lse_c = −∞ (no visible key) are skipped (their o_c is never read), and a row whose
// every part is −∞ gives o = 0, lse = −∞, e = 0.
//
// One warp per row: every lane reads the S lse (S is small: a decode's splits), then the lanes
// stride over Dv, so the parts' rows are read coalesced. Nothing depends on the warp size.
// attn_merge_<dtype>: o and its parts in the input type, lse and e in f32; accumulation in f32.
#include "../port/types.cuh"

#define ATTN_MERGE_THREADS 256
#define ATTN_MERGE_NEG_INF (-__uint_as_float(0x7f800000u))

// Mirrored field for field by `MergeParams` in src/attention/gpu_merge.rs (#[repr(C)]; 8-byte
// fields first, no padding).
struct AttnMergeParams {
    const void* o_parts;      // [S, rows, Dv] row-major, input type
    const float* lse_parts;   // [S, rows]
    const float* e_parts;     // [S, rows] or null
    void* o;                  // [B, Hq, Lq, Dv] at o_stride
    float* lse;               // [rows] or null
    float* e;                 // [rows] or null (then e_parts is ignored)
    long long o_stride[3];    // element strides of B, H, L (Dv contiguous)
    long long rows;           // B Hq Lq
    int hq, lq, dv, splits;
};

template <typename T>
FEP_DEVICE void attn_merge(const AttnMergeParams& p) {
    constexpr int kWarps = ATTN_MERGE_THREADS / FEP_WARP_SIZE;
    const long long row = (long long)blockIdx.x * kWarps + fep_warp_id();
    if (row >= p.rows) return;
    const int lane = (int)fep_lane();
    const float* lse_c = p.lse_parts + row;
    float m = ATTN_MERGE_NEG_INF;
    for (int c = 0; c < p.splits; ++c) m = fmaxf(m, lse_c[c * p.rows]);
    float lse = ATTN_MERGE_NEG_INF;
    if (m != ATTN_MERGE_NEG_INF) {
        float z = 0.0f;
        for (int c = 0; c < p.splits; ++c) z += expf(lse_c[c * p.rows] - m);  // −∞ parts add 0
        lse = m + logf(z);
    }
    const bool seen = lse != ATTN_MERGE_NEG_INF;
    if (lane == 0) {
        if (p.lse) p.lse[row] = lse;
        if (p.e) {
            float e = 0.0f;
            for (int c = 0; c < p.splits && seen; ++c) {
                const float l = lse_c[c * p.rows];
                if (l != ATTN_MERGE_NEG_INF) e = fmaf(expf(l - lse), p.e_parts[c * p.rows + row], e);
            }
            p.e[row] = e;
        }
    }
    const long long b = row / ((long long)p.hq * p.lq), h = row / p.lq % p.hq, i = row % p.lq;
    T* out = (T*)p.o + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
    const T* parts = (const T*)p.o_parts + row * p.dv;
    const long long part = p.rows * p.dv;  // elements between two parts' rows
    for (int d = lane; d < p.dv; d += FEP_WARP_SIZE) {
        float acc = 0.0f;
        for (int c = 0; c < p.splits && seen; ++c) {
            const float l = lse_c[c * p.rows];
            if (l != ATTN_MERGE_NEG_INF) acc = fmaf(expf(l - lse), fep_to_f32(parts[c * part + d]), acc);
        }
        out[d] = fep_from_f32<T>(acc);
    }
}

FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_MERGE_THREADS) attn_merge_f32(AttnMergeParams p) { attn_merge<float>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_MERGE_THREADS) attn_merge_f16(AttnMergeParams p) { attn_merge<fep_f16>(p); }
FEP_KERNEL void FEP_LAUNCH_BOUNDS(ATTN_MERGE_THREADS) attn_merge_bf16(AttnMergeParams p) { attn_merge<fep_bf16>(p); }
