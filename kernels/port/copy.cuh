// copy.cuh: 16-byte copies from global to shared memory that may complete later, so a kernel
// can load the next tile while it computes on the current one (double buffering).
//
//   fep_copy16(dst, src, valid)  one 16-byte chunk (zeros when !valid: src is not read);
//                                dst and src 16-byte aligned
//   fep_copy_commit()            closes this thread's group of copies issued since the last one
//   fep_copy_wait<N>()           waits until at most N of this thread's groups are in flight
// Then a barrier makes every thread's copies visible to the block, as with ordinary stores.
//
//   NVIDIA (sm_80+): cp.async.cg (L2 only, bypassing L1: each tile is read once per block) with
//                    src-size 0 for the zero fill; commit_group / wait_group.
//   AMD CDNA:        a plain load and store (no overlap: gfx942's loads straight to LDS move 4
//                    bytes per lane and are not used yet; the next step is a register-staged
//                    prefetch, see kernels/attention/NOTES.md).
//   emulator:        the store is deferred to the wait that retires its group, so a kernel that
//                    reads a buffer before waiting for it fails its tests.
#pragma once
#include "vendor.cuh"

FEP_DEVICE void fep_copy16(void* dst, const void* src, bool valid) {
#if defined(FEP_EMULATE)
    fep_emu_copy16(dst, src, valid);
#elif defined(FEP_CUDA)
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
#else
    uint4 w = {0u, 0u, 0u, 0u};
    if (valid) w = *(const uint4*)src;
    *(uint4*)dst = w;
#endif
}

FEP_DEVICE void fep_copy_commit() {
#if defined(FEP_EMULATE)
    fep_emu_copy_commit();
#elif defined(FEP_CUDA)
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
FEP_DEVICE void fep_copy_wait() {
#if defined(FEP_EMULATE)
    fep_emu_copy_wait(N);
#elif defined(FEP_CUDA)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
