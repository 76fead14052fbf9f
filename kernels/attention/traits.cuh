// traits.cuh: the tile shape of each (input type, D, Dv) instantiation, and the list of them.
//
// A block holds kBr = 16 * kWarps query rows (each warp, of 32 or 64 lanes, owns one 16-row
// strip: one m16 / 16x16 MMA row of tiles) and walks the keys kBc at a time. Q, K, V and each
// warp's probabilities P live in shared memory as the input type, rows padded by 16 bytes (row
// strides of 4 mod 32 banks: the fragment loads of mma.cuh, 8 rows x 4 k-steps per
// instruction, hit 32 distinct banks). The first shape from the candidate list whose shared
// memory fits 64 KiB is taken: that is every AMD CDNA GPU's LDS, and leaves room for three
// blocks per SM on an H100 (227 KiB).
//
// src/attention/gpu.rs mirrors `attn_tile` (kernels check the smem size they are given against
// their own and write nothing on a mismatch, so a drift fails every GPU test).
#pragma once

#define ATTN_SMEM_BUDGET 65536

struct AttnTile {
    int warps, bc, smem;
};

// Shared memory of a shape: Q [kBr][D+pad], K [kBc][D+pad], V [kBc][Dv+pad], P [warps*16][kBc+pad]
// of `size`-byte elements, then four per-key float arrays of kBc.
constexpr int attn_smem(int size, int d, int dv, int warps, int bc) {
    const int pad = 16 / size;
    return size * (16 * warps * (d + pad) + bc * (d + pad) + bc * (dv + pad) + 16 * warps * (bc + pad)) + 4 * 4 * bc;
}

constexpr AttnTile attn_tile(int size, int d, int dv) {
    constexpr int kCandidates[7][2] = {{4, 64}, {4, 32}, {2, 64}, {2, 32}, {2, 16}, {1, 32}, {1, 16}};
    for (int i = 0; i < 7; ++i) {
        const int w = kCandidates[i][0], bc = kCandidates[i][1];
        if (attn_smem(size, d, dv, w, bc) <= ATTN_SMEM_BUDGET) return AttnTile{w, bc, attn_smem(size, d, dv, w, bc)};
    }
    return AttnTile{0, 0, 0};
}

template <typename In, int kD, int kDv>
struct AttnTraits {
    static constexpr AttnTile kTile = attn_tile((int)sizeof(In), kD, kDv);
    static_assert(kTile.warps > 0, "no tile shape fits the shared-memory budget");
    static constexpr int kWarps = kTile.warps;
    static constexpr int kBr = 16 * kWarps;
    static constexpr int kBc = kTile.bc;
    static constexpr int kSmem = kTile.smem;
    static constexpr int kPad = 16 / (int)sizeof(In);
    // Row strides in shared memory, in elements.
    static constexpr int kQs = kD + kPad, kKs = kD + kPad, kVs = kDv + kPad, kPs = kBc + kPad;
    static constexpr int kThreads = kWarps * FEP_WARP_SIZE;
};

// The head dims the kernels are built for (src/attention/mod.rs HEAD_DIMS), every (D, Dv) pair:
// X(D, Dv). Each forward_<dtype>.cu instantiates the list once.
#define ATTN_FOR_EACH_DV(X, D) X(D, 32) X(D, 64) X(D, 96) X(D, 128) X(D, 256)
#define ATTN_FOR_EACH_HEAD_DIMS(X) \
    ATTN_FOR_EACH_DV(X, 32) ATTN_FOR_EACH_DV(X, 64) ATTN_FOR_EACH_DV(X, 96) ATTN_FOR_EACH_DV(X, 128) ATTN_FOR_EACH_DV(X, 256)
