// emulate.cuh: the device vocabulary on the host, for testing kernels without a GPU.
//
// With the cargo feature `emulate`, build.rs compiles every kernel source a second time as plain
// C++ with FEP_EMULATE and FEP_EMU_WARP (32 and 64), and kernels/port/emulate.cpp runs each
// block's threads as fibres on the launching thread: __syncthreads is a barrier over the block,
// shuffles exchange through memory with a barrier over the warp, __shared__ memory is shared by
// the threads of the block. So a kernel's logic, its indexing, its barriers and its use of the
// warp size are tested against the CPU reference on any machine, for both warp sizes. What it
// does not model: timing, memory ordering weaker than sequential consistency, hardware limits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstddef>

struct fep_dim3 {
    unsigned x, y, z;
};

extern thread_local fep_dim3 threadIdx;
extern thread_local fep_dim3 blockIdx;
extern thread_local fep_dim3 blockDim;
extern thread_local fep_dim3 gridDim;

void fep_emu_syncthreads();
uint64_t fep_emu_exchange(uint64_t bits, int src_lane, bool keep_if_out_of_range);
void* fep_emu_dynamic_smem();
// Register fragments exchanged within a warp (port/fragment.cuh), and asynchronous copies
// (port/copy.cuh): see emulate.cpp.
#define FEP_EMU_SHARE_BYTES 512
const unsigned char* fep_emu_warp_share(const void* mine, size_t bytes);
void fep_emu_warp_release();
void fep_emu_copy16(void* dst, const void* src, bool valid);
void fep_emu_copy_commit();
void fep_emu_copy_wait(int pending_groups);

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A __shared__ variable in a function is one object for all threads of the running block: the
// block's fibres share their OS thread, and two launches on two OS threads have a copy each.
#define __shared__ static thread_local
#define __syncthreads() fep_emu_syncthreads()

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// CUDA's 16-byte vector type (tile loads move 16 bytes at a time).
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

struct alignas(8) uint2 {
    unsigned x, y;
};

// IEEE binary16, converted in software (round to nearest even).
struct __half {
    uint16_t bits;
};
inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1fu;
    const uint32_t man = h.bits & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        const float v = std::ldexp((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline __half __float2half_rn(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const float a = std::fabs(f);
    __half h;
    if (std::isnan(f)) {
        h.bits = sign | 0x7e00u;
    } else if (a >= 65520.0f) {  // rounds to infinity
        h.bits = sign | 0x7c00u;
    } else if (a < 6.103515625e-05f) {  // subnormal range: multiples of 2^-24
        h.bits = sign | (uint16_t)std::nearbyint(std::ldexp(a, 24));
    } else {
        const uint32_t ax = x & 0x7fffffffu;
        const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // to nearest even at bit 13
        h.bits = sign | (uint16_t)(((rounded >> 13) - (112u << 10)) & 0x7fffu);
    }
    return h;
}
