// types.cuh: the three input element types and their conversions to and from f32.
//
// f16 uses the vendor's half type (identical 16-bit layout on both). bf16 is carried as raw bits
// and converted by hand: the vendor bf16 types differ between CUDA, HIP 5.x (hip_bfloat16) and
// HIP 6.x (__hip_bfloat16), but the bit layout (the top half of an IEEE f32) does not.
#pragma once
#include "vendor.cuh"

struct fep_bf16 {
    uint16_t bits;
};
typedef __half fep_f16;

FEP_DEVICE float fep_to_f32(float v) { return v; }
FEP_DEVICE float fep_to_f32(fep_f16 v) { return __half2float(v); }
FEP_DEVICE float fep_to_f32(fep_bf16 v) { return __uint_as_float(((uint32_t)v.bits) << 16); }

template <typename T>
FEP_DEVICE T fep_from_f32(float v);
template <>
FEP_DEVICE float fep_from_f32<float>(float v) { return v; }
template <>
FEP_DEVICE fep_f16 fep_from_f32<fep_f16>(float v) { return __float2half_rn(v); }
template <>
FEP_DEVICE fep_bf16 fep_from_f32<fep_bf16>(float v) {
    // Round to nearest even; NaN stays NaN (quiet bit forced so truncation cannot make it Inf).
    uint32_t x = __float_as_uint(v);
    fep_bf16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (uint16_t)((x >> 16) | 0x0040u);
    } else {
        r.bits = (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    }
    return r;
}

// The list every op instantiates its dtype-generic kernels from: X(suffix, type).
// Kernel names are `<name>_<suffix>`; src/element.rs has the same suffixes.
#define FEP_FOR_EACH_DTYPE(X) X(f32, float) X(f16, fep_f16) X(bf16, fep_bf16)
