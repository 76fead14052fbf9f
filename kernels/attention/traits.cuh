// traits.cuh: the tile shape of each (input type, D, Dv) instantiation, and the list of them.
//
// Two kernels (NOTES.md):
// - f32, and f16/bf16 with Dv = 256 (forward.cuh, v1; v2's 128 output accumulators per lane
//   left ptxas 8 bytes of stack there): each warp (32 or 64 lanes) owns one 16-row strip; Q, K, V and each
//   warp's P in shared memory, rows padded by 16 bytes; the first of kCandidates whose shared
//   memory fits 64 KiB (every CDNA LDS; three blocks per SM on an H100).
// - f16/bf16 (forward16.cuh, v2): each warp owns kMT 16-row strips (32 rows when registers
//   allow: K and V fragments are then loaded once for two strips), P stays in registers, K and V
//   are double-buffered (two stages) and Q stays in shared memory for the whole key loop. Rows
//   are padded by 16 bytes: a row stride of 16 mod 128 bytes puts the 8 rows of an ldmatrix (or
//   the 16 rows of a ds_read_b64) in distinct 4-bank groups (NOTES.md, bank analysis). The
//   first shape of kCandidates16 that fits the shared-memory budget (96 KiB on NVIDIA: two
//   blocks per SM; 64 KiB on CDNA) and an estimate of the registers per thread (the score and
//   output accumulators of kMT strips, the K fragments of one k-step, ~48 for addresses, row
//   statistics and the rest, within 180: ptxas 13.0 then needs 210-255 of its 255 without spilling, found by compiling; on CDNA a lane holds half as many accumulators) is taken.
//
// src/attention/gpu.rs mirrors `attn_tile` (kernels check the smem size they are given against
// their own and write nothing on a mismatch, so a drift fails every GPU test); ci/sass-census
// compiles this file on the host to size the kernels' dynamic shared memory.
#pragma once

#define ATTN_SMEM_BUDGET 65536

struct AttnTile {
    int warps, bc, smem, mt;  // warps per block, keys per tile, shared bytes, 16-row strips per warp
};

// v1 (f32): Q [kBr][D+pad], K [kBc][D+pad], V [kBc][Dv+pad], P [warps*16][kBc+pad] of `size`-byte
// elements, then four per-key float arrays of kBc.
constexpr int attn_smem(int size, int d, int dv, int warps, int bc) {
    const int pad = 16 / size;
    return size * (16 * warps * (d + pad) + bc * (d + pad) + bc * (dv + pad) + 16 * warps * (bc + pad)) + 4 * 4 * bc;
}

// v2 (16-bit): Q [16 mt warps][D+8], two stages of K [kBc][D+8] and V [kBc][Dv+8], then five
// per-key float arrays (a, b, ‖k‖², π, 1/a).
constexpr int attn_smem16(int d, int dv, int warps, int mt, int bc) {
    return 2 * (16 * mt * warps * (d + 8) + 2 * bc * (d + 8) + 2 * bc * (dv + 8)) + 20 * bc;
}

// Registers per thread the v2 kernel needs, roughly: acc f32 accumulators per lane and 16 x 16
// tile (8 on NVIDIA, 4 on CDNA); on CDNA also the next K/V tile staged in registers (4 per
// 16-byte copy of `threads`; port/copy.cuh).
constexpr int attn_regs16(int d, int dv, int mt, int bc, int acc, int threads) {
    const int staged = acc == 4 ? 4 * ((bc * (d + dv) / 8 + threads - 1) / threads) : 0;
    return acc * mt * (bc + dv) / 16 + (acc / 2) * (bc / 16) + 48 + staged;
}

constexpr AttnTile attn_tile(int size, int d, int dv, int warp) {
    if (size == 4 || dv == 256) {  // f32, and Dv = 256 (v2 spilled there): the v1 kernel
        constexpr int kCandidates[7][2] = {{4, 64}, {4, 32}, {2, 64}, {2, 32}, {2, 16}, {1, 32}, {1, 16}};
        for (int i = 0; i < 7; ++i) {
            const int w = kCandidates[i][0], bc = kCandidates[i][1];
            if (attn_smem(size, d, dv, w, bc) <= ATTN_SMEM_BUDGET)
                return AttnTile{w, bc, attn_smem(size, d, dv, w, bc), 1};
        }
        return AttnTile{0, 0, 0, 0};
    }
    constexpr int kCandidates16[9][3] = {{4, 2, 64}, {4, 2, 32}, {4, 1, 64}, {4, 1, 32}, {4, 1, 16},
                                         {2, 1, 64}, {2, 1, 32}, {1, 1, 32}, {1, 1, 16}};
    const int budget = warp == 64 ? 65536 : 98304, acc = 256 / warp;
    for (int i = 0; i < 9; ++i) {
        const int w = kCandidates16[i][0], mt = kCandidates16[i][1], bc = kCandidates16[i][2];
        const int smem = attn_smem16(d, dv, w, mt, bc);
        // NVIDIA, D >= 128: two strips spilled at every Dv (ptxas keeps the unrolled k-steps'
        // fragments live), so one.
        const bool fits_mt = mt == 1 || warp == 64 || d < 128;
        if (fits_mt && smem <= budget && attn_regs16(d, dv, mt, bc, acc, w * warp) <= (warp == 64 ? 110 : 180))
            return AttnTile{w, bc, smem, mt};
    }
    return AttnTile{0, 0, 0, 0};
}

template <typename In, int kD, int kDv>
struct AttnTraits {
    static constexpr AttnTile kTile = attn_tile((int)sizeof(In), kD, kDv, FEP_WARP_SIZE);
    static_assert(kTile.warps > 0, "no tile shape fits the shared-memory budget");
    static constexpr int kWarps = kTile.warps;
    static constexpr int kMT = kTile.mt;
    static constexpr int kBr = 16 * kMT * kWarps;
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
