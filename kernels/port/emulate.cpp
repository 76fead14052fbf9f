// emulate.cpp: runs kernels compiled with FEP_EMULATE (see emulate.cuh) on the host.
//
// A block's threads are fibres on the launching OS thread, not OS threads: a barrier is a few
// user-space context switches instead of hundreds of futex sleeps and wake-ups, which on a
// 2-core machine cost more system time than the kernels' arithmetic. A fibre runs until it
// reaches a barrier (block or warp) or its end. The scheduler (run_block) runs one warp at a
// time as far as it can go, warps and lanes in pseudo-random orders, so a read of another
// thread's shared-memory write that lacks its barrier sees stale data for about half of such
// pairs, whichever way they point, and a warp that overwrites what a slower warp still has to
// read (a missing barrier before a buffer's reuse) is caught too. The orders' seeds are fixed, so
// a failure repeats every run, where OS threads made it a race. Blocks run one after the other;
// a launch owns its OS thread, so launches from several test threads run at once (__shared__
// variables are thread_local statics: one copy per launching thread). A barrier that not every
// thread of the block reaches (divergent __syncthreads) is reported as an error instead of a
// hang. fep_emu_self_check tests these promises on kernels that break them on purpose. Kernels
// are found by (warp size, module, name) in tables that build.rs generates.
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "emulate.cuh"

thread_local fep_dim3 threadIdx;
thread_local fep_dim3 blockIdx;
thread_local fep_dim3 blockDim;
thread_local fep_dim3 gridDim;

extern "C" void fep_emu_fiber_main();

namespace {

// Switching fibres. On x86-64, a dozen instructions save the callee-saved registers (and the
// SSE/x87 control words) on the old stack and restore them from the new one; elsewhere glibc's
// swapcontext, which is correct everywhere but makes a system call (the signal mask) per switch,
// a third of the emulator's time on x86-64. FEP_EMU_UCONTEXT forces it for comparison.
#if defined(__x86_64__) && defined(__linux__) && !defined(FEP_EMU_UCONTEXT)
extern "C" void fep_emu_switch(void** save_sp, void* load_sp);
extern "C" void fep_emu_fiber_start();
asm(R"(
    .text
    .globl fep_emu_switch
    .type fep_emu_switch, @function
fep_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fep_emu_switch, .-fep_emu_switch

    .globl fep_emu_fiber_start
    .type fep_emu_fiber_start, @function
fep_emu_fiber_start:
    andq $-16, %rsp
    call fep_emu_fiber_main
    ud2
    .size fep_emu_fiber_start, .-fep_emu_fiber_start
    .section .note.GNU-stack, "", @progbits
    .text
)");
struct Context {
    void* sp = nullptr;
};
void context_switch(Context& from, Context& to) { fep_emu_switch(&from.sp, to.sp); }
// A frame that fep_emu_switch "returns" from into fep_emu_fiber_start: the control words, six
// registers, the return address.
void context_make(Context& c, unsigned char* stack, size_t bytes) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
    uint64_t* sp = top - 10;
    std::memset(sp, 0, 10 * sizeof(uint64_t));
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    std::memcpy(reinterpret_cast<unsigned char*>(sp) + 8, &mxcsr, 4);
    std::memcpy(reinterpret_cast<unsigned char*>(sp), &fpcw, 2);
    sp[8] = reinterpret_cast<uint64_t>(&fep_emu_fiber_start);  // after 2 + 6 slots
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void context_make(Context& c, unsigned char* stack, size_t bytes) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;  // fep_emu_fiber_main never returns
    makecontext(&c.uc, fep_emu_fiber_main, 0);
}
#endif

// Asynchronous copies (port/copy.cuh) in flight, per thread: the source is read when the copy
// is issued (global memory does not change during a launch), the destination written only when
// a wait retires its group, so a kernel that reads a buffer before waiting for it reads stale
// data and fails its tests.
struct PendingCopy {
    void* dst;
    unsigned char data[16];
    int group;
};

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned generation = 0;
};

// Each fibre's stack: mapped lazily, with a guard page below it so an overflow faults instead of
// corrupting a neighbour. Kernels keep at most a few KiB of locals (their registers).
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Fiber {
    Context context;
    unsigned char* stack = nullptr;  // kGuardBytes of guard, then kStackBytes
    fep_dim3 thread;
    bool done = false;
    Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation then
    unsigned waiting_generation = 0;
    std::vector<PendingCopy> pending_copies;
    int open_group = 0;

    Fiber() = default;
    Fiber(const Fiber&) = delete;
    Fiber& operator=(const Fiber&) = delete;
    ~Fiber() {
        if (stack) munmap(stack, kGuardBytes + kStackBytes);
    }
    bool map_stack() {
        void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return false;
        stack = static_cast<unsigned char*>(p);
        mprotect(stack, kGuardBytes, PROT_NONE);
        return true;
    }
    bool runnable() const { return !done && (!waiting || waiting->generation != waiting_generation); }
};

struct Launch {
    int warp = 0;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<uint64_t> slots;
    std::vector<unsigned char> shared_frags;  // fep_emu_warp_share: FEP_EMU_SHARE_BYTES per lane
    std::vector<unsigned char> dynamic_smem;
    void (*entry)(void**) = nullptr;
    void** params = nullptr;
};

// The launching OS thread's state: its fibres (kept, with their stacks, for the next launch),
// the scheduler's context, the launch and the fibre that runs now.
thread_local std::vector<std::unique_ptr<Fiber>> fibers;
thread_local Context scheduler;
thread_local Launch* current = nullptr;
thread_local Fiber* running = nullptr;
thread_local std::vector<unsigned> warp_order, lane_order;  // run_block's orders

// Back to the scheduler; returns when the scheduler runs this fibre again.
void yield_to_scheduler() { context_switch(running->context, scheduler); }

void arrive_and_wait(Barrier& b) {
    running->waiting = &b;
    running->waiting_generation = b.generation;
    if (++b.arrived == b.expected) {  // the last one releases the others
        b.arrived = 0;
        ++b.generation;
    }
    yield_to_scheduler();
    running->waiting = nullptr;
}

// xorshift64: the scheduler's pseudo-random orders, from a fixed seed per block.
struct Shuffler {
    uint64_t state;
    void shuffle(std::vector<unsigned>& v) {  // Fisher-Yates
        for (size_t i = v.size(); i > 1; --i) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            std::swap(v[i - 1], v[state % i]);
        }
    }
};

// Runs one fibre until it waits at a barrier or ends.
void run_fiber(Fiber& f) {
    running = &f;
    threadIdx = f.thread;
    context_switch(scheduler, f.context);
    running = nullptr;
}

// Runs the block blockIdx with `threads` fibres to completion; false if they deadlocked (some
// wait at a barrier that the others never reach). The schedule is one a GPU may take, and the
// one that shows races: each round takes the warps in a pseudo-random order and runs each as
// far as it can go (its lanes in a pseudo-random order, again and again through its warp-level
// exchanges) before the next warp starts, so one warp gets ahead of the others by everything
// up to the next block-wide barrier. The seed is fixed per block: a failure repeats every run.
bool run_block(unsigned threads, unsigned warp) {
    std::vector<unsigned>& warps = warp_order;
    std::vector<unsigned>& lanes = lane_order;
    warps.resize(threads / warp);
    lanes.resize(warp);
    for (unsigned w = 0; w < threads / warp; ++w) warps[w] = w;
    for (unsigned l = 0; l < warp; ++l) lanes[l] = l;
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = *fibers[t];
        f.thread = {t, 0, 0};
        f.done = false;
        f.waiting = nullptr;
        f.pending_copies.clear();
        f.open_group = 0;
        context_make(f.context, f.stack + kGuardBytes, kStackBytes);
    }
    Shuffler rng{0x9e3779b97f4a7c15ull ^ ((uint64_t)blockIdx.x << 32 | blockIdx.y << 16 | blockIdx.z)};
    for (;;) {
        bool progress = false;
        rng.shuffle(warps);
        for (unsigned w : warps) {
            for (bool again = true; again;) {
                again = false;
                rng.shuffle(lanes);
                for (unsigned l : lanes) {
                    Fiber& f = *fibers[w * warp + l];
                    if (f.runnable()) {
                        run_fiber(f);
                        again = progress = true;
                    }
                }
            }
        }
        bool all_done = true;
        for (unsigned t = 0; t < threads; ++t) all_done = all_done && fibers[t]->done;
        if (all_done) return true;
        if (!progress) return false;
    }
}

}  // namespace

// A fibre's life: the kernel for its thread, then back to the scheduler for good.
extern "C" void fep_emu_fiber_main() {
    current->entry(current->params);
    fep_emu_copy_wait(0);  // a kernel may end with copies in flight
    running->done = true;
    yield_to_scheduler();
}

void fep_emu_syncthreads() { arrive_and_wait(current->block_barrier); }

void* fep_emu_dynamic_smem() { return current->dynamic_smem.data(); }

// Every lane of the warp publishes its value, then reads lane `src_lane`'s.
uint64_t fep_emu_exchange(uint64_t bits, int src_lane, bool keep_if_out_of_range) {
    const int t = (int)threadIdx.x, w = current->warp;
    const int base = t / w * w;
    Barrier& bar = current->warp_barriers[t / w];
    current->slots[t] = bits;
    arrive_and_wait(bar);
    uint64_t r = bits;
    if (src_lane >= 0 && src_lane < w) {
        r = current->slots[base + src_lane];
    } else if (!keep_if_out_of_range) {
        r = current->slots[base + ((src_lane % w) + w) % w];
    }
    arrive_and_wait(bar);  // nobody overwrites a slot before everyone has read
    return r;
}

// Every lane of the warp publishes `bytes` of its registers; returns the warp's table (lane i's
// at i * FEP_EMU_SHARE_BYTES), valid until fep_emu_warp_release().
const unsigned char* fep_emu_warp_share(const void* mine, size_t bytes) {
    const int t = (int)threadIdx.x, w = current->warp;
    std::memcpy(current->shared_frags.data() + (size_t)t * FEP_EMU_SHARE_BYTES, mine, bytes);
    arrive_and_wait(current->warp_barriers[t / w]);
    return current->shared_frags.data() + (size_t)(t / w * w) * FEP_EMU_SHARE_BYTES;
}
void fep_emu_warp_release() { arrive_and_wait(current->warp_barriers[threadIdx.x / current->warp]); }

void fep_emu_copy16(void* dst, const void* src, bool valid) {
    PendingCopy c{dst, {}, running->open_group};
    if (valid) std::memcpy(c.data, src, 16);
    running->pending_copies.push_back(c);
}
void fep_emu_copy_commit() { ++running->open_group; }
void fep_emu_copy_wait(int pending_groups) {
    std::vector<PendingCopy>& pending = running->pending_copies;
    size_t kept = 0;
    for (const PendingCopy& c : pending) {
        if (c.group < running->open_group - pending_groups) {
            std::memcpy(c.dst, c.data, 16);
        } else {
            pending[kept++] = c;
        }
    }
    pending.resize(kept);
}

struct FepEmuKernel {
    const char* module;
    const char* name;
    void (*entry)(void** params);
};

// Generated by build.rs: the kernels of source file number `part`, for a warp size; null past
// the last file.
extern "C" const FepEmuKernel* fep_emu_kernel_part(int warp, size_t part, size_t* count);

namespace {

// Runs `entry` over the grid; the status codes of fep_emu_launch.
int launch_entry(void (*entry)(void**), int warp, unsigned gx, unsigned gy, unsigned gz, unsigned block,
                 unsigned smem, void** params) {
    if (block == 0 || block % (unsigned)warp != 0 || block > 1024) return 2;
    while (fibers.size() < block) {
        auto f = std::make_unique<Fiber>();
        if (!f->map_stack()) return 4;
        fibers.push_back(std::move(f));
    }
    Launch launch;
    launch.warp = warp;
    launch.block_barrier.expected = (int)block;
    launch.warp_barriers.resize(block / warp);
    for (Barrier& b : launch.warp_barriers) b.expected = warp;
    launch.slots.resize(block);
    launch.shared_frags.resize((size_t)block * FEP_EMU_SHARE_BYTES);
    launch.dynamic_smem.resize(smem + 16);
    launch.entry = entry;
    launch.params = params;
    current = &launch;
    blockDim = {block, 1, 1};
    gridDim = {gx, gy, gz};
    int status = 0;
    for (unsigned z = 0; z < gz && status == 0; ++z)
        for (unsigned y = 0; y < gy && status == 0; ++y)
            for (unsigned x = 0; x < gx && status == 0; ++x) {
                blockIdx = {x, y, z};
                if (!run_block(block, (unsigned)warp)) status = 3;
            }
    current = nullptr;
    return status;
}

}  // namespace

// 0: done; 1: no such kernel; 2: a block size the emulator cannot run; 3: the block's threads
// deadlocked at a barrier (one that not all of them reach); 4: no memory for the fibres' stacks.
extern "C" int fep_emu_launch(int warp, const char* module, const char* name, unsigned gx, unsigned gy, unsigned gz,
                              unsigned block, unsigned smem, void** params) {
    void (*entry)(void**) = nullptr;
    size_t count = 0;
    for (size_t part = 0; const FepEmuKernel* table = fep_emu_kernel_part(warp, part, &count); ++part) {
        for (size_t i = 0; i < count; ++i) {
            if (std::string(table[i].module) == module && std::string(table[i].name) == name) entry = table[i].entry;
        }
    }
    if (!entry) return 1;
    return launch_entry(entry, warp, gx, gy, gz, block, smem, params);
}

// The emulator's own promises, checked on kernels that break them on purpose (for
// diagnostics::emulator_self_check): a read of another thread's shared-memory write without a
// barrier between them reads stale data, in either direction (thread t reading t + 1's or
// t - 1's slot); a barrier that not every thread reaches is reported (status 3), not a hang; a
// buffer read before its asynchronous copy's wait holds the old bytes, after it the new ones; a
// buffer that a warp refills while a slower warp still reads the old contents (no barrier
// between the reads and the reuse) is caught. Returns 0, or a bit per promise broken: 1, 2, 4,
// 8, 16.
namespace {
constexpr unsigned kCheckThreads = 128;
int check_stale[2];  // per phase: how many threads read a stale slot
void check_missing_barrier(void**) {
    __shared__ int slot[kCheckThreads];
    const unsigned t = threadIdx.x, n = blockDim.x;
    slot[t] = 0;
    __syncthreads();
    // phase 0 reads the next thread's slot, phase 1 the previous one's; each writes, then reads
    // with no barrier between (the bug), then a barrier
    for (int phase = 0; phase < 2; ++phase) {
        slot[t] = phase + 1;
        const bool wraps = phase == 0 ? t + 1 == n : t == 0;  // reads across the round's ends
        const int seen = slot[phase == 0 ? (t + 1) % n : (t + n - 1) % n];
        if (seen != phase + 1 && !wraps) check_stale[phase] += 1;  // fibres of one thread: no race
        __syncthreads();
    }
}
void check_divergent_barrier(void**) {
    if (threadIdx.x == 0) __syncthreads();
}
int check_reuse_seen = 0;  // threads whose sum saw another warp's next write
void check_missing_reuse_barrier(void**) {
    __shared__ int partial[kCheckThreads];
    const int w = (int)threadIdx.x / current->warp, nw = (int)blockDim.x / current->warp;
    const bool leader = threadIdx.x % current->warp == 0;
    if (leader) partial[w] = 1;
    __syncthreads();
    int sum = 0;
    for (int i = 0; i < nw; ++i) sum += partial[i];
    fep_emu_exchange(0, 0, false);  // a warp-level step, as a shuffle reduction has
    if (leader) partial[w] = 2;     // the bug: reused with no barrier after the reads above
    __syncthreads();
    if (sum != nw) check_reuse_seen += 1;
}
int check_copy_early = 0, check_copy_late = 0;
void check_copy_wait(void**) {
    alignas(16) __shared__ int dst[4 * kCheckThreads];
    alignas(16) static const int src[4] = {7, 7, 7, 7};
    int* mine = dst + 4 * threadIdx.x;
    mine[0] = 0;
    fep_emu_copy16(mine, src, true);
    fep_emu_copy_commit();
    if (mine[0] == 7) check_copy_early += 1;  // read before the wait: must be the old value
    fep_emu_copy_wait(0);
    if (mine[0] == 7) check_copy_late += 1;
}
}  // namespace

extern "C" int fep_emu_self_check(int warp) {
    int broken = 0;
    check_stale[0] = check_stale[1] = 0;
    if (launch_entry(check_missing_barrier, warp, 1, 1, 1, kCheckThreads, 0, nullptr) != 0 || check_stale[0] == 0)
        broken |= 1;
    if (check_stale[1] == 0) broken |= 2;
    if (launch_entry(check_divergent_barrier, warp, 1, 1, 1, kCheckThreads, 0, nullptr) != 3) broken |= 4;
    check_reuse_seen = 0;
    if (launch_entry(check_missing_reuse_barrier, warp, 1, 1, 1, kCheckThreads, 0, nullptr) != 0 || check_reuse_seen == 0)
        broken |= 16;
    check_copy_early = check_copy_late = 0;
    if (launch_entry(check_copy_wait, warp, 1, 1, 1, kCheckThreads, 0, nullptr) != 0 || check_copy_early != 0 ||
        check_copy_late != (int)kCheckThreads)
        broken |= 8;
    return broken;
}
