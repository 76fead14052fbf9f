// copy.cuh: 16-byte copies from global to shared memory that complete later, so a kernel can
// load the next tile while it computes on the current one (double buffering).
//
//   FepCopies<kN> c;            a group of at most kN copies per thread
//   c.copy16(i, dst, src, ok)   slot i (< kN, from a fully unrolled loop): 16 bytes, zeros when
//                               !ok (src is not read then); dst and src 16-byte aligned
//   fep_copy_commit()           closes this thread's group of copies issued since the last one
//   fep_copy_wait<N>()          waits until at most N of this thread's groups are in flight
//   c.land(i, dst)              after the wait that retires c's group, for each slot issued:
//                               its data is in shared memory (for this thread); a barrier then
//                               makes every thread's copies visible, as with ordinary stores
//
//   NVIDIA (sm_80+): cp.async.cg (L2 only, bypassing L1: each tile is read once per block) with
//                    src-size 0 for the zero fill; commit_group / wait_group; land() is empty.
//   AMD CDNA:        a register-staged prefetch: copy16 issues the global load into registers
//                    (4 VGPRs per copy), land stores them to LDS; the loads' latency is hidden
//                    behind whatever the kernel does between the two (gfx942's loads straight to
//                    LDS move 4 bytes per lane, and are not used).
//   emulator:        the store is deferred to the wait that retires its group, so a kernel that
//                    reads a buffer before waiting for it fails its tests.
#pragma once
#include "vendor.cuh"

template <int kN>
struct FepCopies {
#if defined(FEP_HIP)
    uint4 data[kN];
#endif
    // Copy i of the group (i from a fully unrolled loop, so the staging registers stay registers).
    FEP_DEVICE void copy16(int i, void* dst, const void* src, bool valid) {
#if defined(FEP_EMULATE)
        (void)i;
        fep_emu_copy16(dst, src, valid);
#elif defined(FEP_CUDA)
        (void)i;
        const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
#else
        (void)dst;
        data[i] = valid ? *(const uint4*)src : uint4{0u, 0u, 0u, 0u};
#endif
    }
    // After the wait that retires the group: copy i's data to dst, the address it was issued
    // with (recomputed by the caller rather than held in registers). Nothing to do on NVIDIA
    // and in the emulator, where the copy itself writes shared memory.
    FEP_DEVICE void land(int i, void* dst) {
#if defined(FEP_HIP)
        *(uint4*)dst = data[i];
#else
        (void)i, (void)dst;
#endif
    }
};

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
