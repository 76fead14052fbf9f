//! What every fuzz target of the C ABI shares: fuzzed codes, sizes and parameters, a call's
//! buffers (tiny host allocations whose sizes are the ones the C ABI documents for the fuzzed
//! shapes) and the oracle.
//!
//! # How a target builds a call
//! Each pointer argument is a [`Buf`]: its element type, its role (input, output, parameter
//! updated in place, host description array), the number of elements the C ABI says it must
//! hold for the fuzzed sizes (its *claim*, exact in `u128`), and where the fuzzer wants it to
//! point ([`Ptr`]: valid, NULL, misaligned inside the buffer, or at another buffer). The harness
//! never hands the library a pointer outside memory it allocated for that claim:
//! - a claim of at most [`CAP_BYTES`]: a buffer of exactly that size (ASan sees its exact end);
//! - a claim that cannot exist (more than `isize::MAX` bytes, or overflowing): a small buffer,
//!   which the library must reject before touching (its sizes are checked arithmetic);
//! - anything in between (a real but large claim, say 1 << 32 floats): NULL, since the library
//!   cannot know a C buffer's length and would be right to read that much.
//! A target also estimates the work of a call ([`Call::work`]); an input whose work is beyond
//! [`WORK_CAP`] is skipped unless a claim cannot exist (then the call must fail at validation),
//! so every input runs in milliseconds (CI also passes `-timeout`).
//!
//! # The oracle ([`Call::check`])
//! - no crash, no out-of-bounds access (ASan), no panic (libfuzzer-sys's panic hook aborts even
//!   on a panic the entry point would catch), status never `FEP_ERR_INTERNAL`;
//! - the status is a documented code, and a failure leaves a non-empty `fep_last_error()`;
//! - on failure, nothing the call could write changed (for `FEP_ERR_DIVERGED`: no input and no
//!   parameter updated in place; the other outputs may hold partial results);
//! - on success, inputs are unchanged, and no output overlapped another buffer (outputs must
//!   be distinct from each other and from the inputs: such a call must be rejected);
//! - bytes before a misaligned pointer are never written.
//!
//! Set `FEP_FUZZ_TRACE=1` to print every call as the library sees it (shapes, claims, where
//! each pointer points) before it is made: run a crash artifact with it to see the call.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ffi::CStr;
use std::sync::Once;

use arbitrary::Arbitrary;

pub use fep_kernels::ffi;

pub mod lca;
pub mod score_inputs;
pub mod settle;
pub mod vmp;

/// The largest buffer (bytes) a call allocates for a claim.
pub const CAP_BYTES: u128 = 2048;
/// The most work (multiply-adds, roughly) an input may ask for when it can pass validation.
pub const WORK_CAP: u128 = 1 << 18;
/// The size of the buffer passed for a claim that cannot exist.
const SMALL_BYTES: usize = 64;

// ---- fuzzed codes, sizes and parameters ------------------------------------------------------

/// Sizes at the edges of `u64`, `usize`, `u32` and the library's own limits.
pub const EDGES: [u64; 16] = [
    u64::MAX,
    u64::MAX - 1,
    1 << 63,
    (1 << 63) - 1,
    1 << 62,
    1 << 61,
    (1 << 61) + 1,
    1 << 32,
    (1 << 32) + 1,
    u32::MAX as u64,
    1 << 31,
    (1 << 31) - 2,
    65536,
    65537,
    4096,
    4097,
];

/// A pointer to a struct argument, or NULL.
///
/// Every fuzzed type decodes an exhausted input (all zeros) to a valid choice: `Given` here,
/// `Valid` pointers, small sizes, the middle of a parameter's range, the first code. An empty
/// input is a valid call, and the fuzzer mutates from there.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Nullable<T> {
    Given(T),
    Null,
}

impl<T> Nullable<T> {
    pub fn as_ref(&self) -> Option<&T> {
        match self {
            Nullable::Given(t) => Some(t),
            Nullable::Null => None,
        }
    }
}

/// A size argument: mostly small, sometimes zero or extreme.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Dim {
    Small(u8),
    Zero,
    Edge(u8),
    Raw(u64),
}

impl Dim {
    /// Small(x) is 1 ..= max.
    pub fn get(self, max: u64) -> u64 {
        match self {
            Dim::Small(x) => 1 + (x as u64 + 1) % max.max(1),
            Dim::Zero => 0,
            Dim::Edge(i) => EDGES[i as usize % EDGES.len()],
            Dim::Raw(v) => v,
        }
    }
}

/// A step or iteration count (`uint32_t`).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Count {
    Small(u8),
    Zero,
    Edge(u8),
}

impl Count {
    pub fn get(self, max: u32) -> u32 {
        const E: [u32; 6] = [u32::MAX, 1 << 31, (1 << 31) - 2, 1 << 16, 4097, 65];
        match self {
            Count::Small(x) => 1 + (x as u32 + 1) % max.max(1),
            Count::Zero => 0,
            Count::Edge(i) => E[i as usize % E.len()],
        }
    }
}

/// An enumeration code: one of the `n` valid ones, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Code {
    Valid(u8),
    Raw(i32),
}

impl Code {
    pub fn get(self, n: i32) -> i32 {
        match self {
            Code::Valid(x) => x as i32 % n,
            Code::Raw(v) => v,
        }
    }
}

/// An `int32_t` flag.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Flag {
    Off,
    On,
    Raw(i32),
}

impl Flag {
    pub fn get(self) -> i32 {
        match self {
            Flag::Off => 0,
            Flag::On => 1,
            Flag::Raw(v) => v,
        }
    }
}

/// `FEP_DEVICE_*` and an ordinal: the CPU mostly (CUDA and HIP report no device in this
/// build), sometimes garbage.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Device {
    Cpu,
    Cuda(u8),
    Hip(u8),
    CpuOrdinal(i32),
    Raw(i32, i32),
}

impl Device {
    /// (kind, ordinal)
    pub fn get(self) -> (i32, i32) {
        match self {
            Device::Cpu => (ffi::FEP_DEVICE_CPU, 0),
            Device::Cuda(o) => (ffi::FEP_DEVICE_CUDA, o as i32),
            Device::Hip(o) => (ffi::FEP_DEVICE_HIP, o as i32),
            Device::CpuOrdinal(o) => (ffi::FEP_DEVICE_CPU, o),
            Device::Raw(k, o) => (k, o),
        }
    }
}

/// `FEP_DTYPE_*`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum DType {
    F32,
    F16,
    BF16,
    Raw(i32),
}

impl DType {
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => ffi::FEP_DTYPE_F32,
            DType::F16 => ffi::FEP_DTYPE_F16,
            DType::BF16 => ffi::FEP_DTYPE_BF16,
            DType::Raw(v) => v,
        }
    }

    /// The element type of the tensors; an invalid code gets f32-sized buffers.
    pub fn ty(self) -> Ty {
        match self {
            DType::F16 => Ty::F16,
            DType::BF16 => Ty::BF16,
            _ => Ty::F32,
        }
    }
}

/// Floating-point values at the edges.
pub const SPECIAL_F64: [f64; 14] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    0.0,
    -0.0,
    -1.0,
    1e-45,
    1e-300,
    1e30,
    3.4e38,
    1e300,
    f64::MAX,
    f64::MIN_POSITIVE,
    1.0,
];

/// A float parameter: mostly in the range the target names, sometimes at an edge.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Real {
    In(u8),
    Special(u8),
    Raw(u64),
}

impl Real {
    pub fn get(self, lo: f64, hi: f64) -> f64 {
        match self {
            // In(0), what an exhausted input decodes to, is the middle of the range.
            Real::In(x) => lo + (hi - lo) * ((x as u32 + 128) % 256) as f64 / 255.0,
            Real::Special(i) => SPECIAL_F64[i as usize % SPECIAL_F64.len()],
            Real::Raw(bits) => f64::from_bits(bits),
        }
    }

    pub fn get_f32(self, lo: f64, hi: f64) -> f32 {
        match self {
            Real::Raw(bits) => f32::from_bits(bits as u32),
            other => other.get(lo, hi) as f32,
        }
    }
}

/// Where a pointer argument points.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ptr {
    /// At its own buffer, aligned for its element type.
    Valid,
    Null,
    /// 1 .. align - 1 bytes into its (enlarged) buffer.
    Misaligned(u8),
    /// At another buffer of the call (index modulo the number of buffers).
    Alias(u8),
}

/// A value planted in one element of one buffer after the fill.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Poison {
    pub buf: u8,
    pub at: u16,
    pub value: u8,
}

/// The contents of a call's buffers: a seed, and optionally one poisoned element.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Values {
    pub seed: u64,
    pub poison: Option<Poison>,
}

// ---- buffers ---------------------------------------------------------------------------------

/// Element types of buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    F32,
    F16,
    BF16,
    F64,
    I32,
    U32,
    U64,
    /// Host pointers (`void *const *`): the target fills them.
    Ptr,
    U8,
}

impl Ty {
    pub fn size(self) -> usize {
        match self {
            Ty::F16 | Ty::BF16 => 2,
            Ty::F32 | Ty::I32 | Ty::U32 => 4,
            Ty::F64 | Ty::U64 | Ty::Ptr => 8,
            Ty::U8 => 1,
        }
    }
}

/// What a call does with a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A tensor the call reads.
    In,
    /// A tensor the call writes (or reads and writes, like x_out with FEP_SETTLE_INIT_GIVEN).
    Out,
    /// Parameters updated in place on success (weights with lr > 0): untouched on any error.
    Param,
    /// A host description array (widths, codes, pointer lists): read only, never aliased.
    Desc,
    /// A scalar written on success (a new handle, a size): not a tensor, so exempt from the
    /// overlap rule; untouched on failure.
    Slot,
}

/// How a buffer is filled before the call.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Uniform in [lo, hi) (floats), or integers lo ..= hi.
    Range(f64, f64),
    /// A byte pattern (outputs: a sentinel).
    Byte(u8),
    /// Left zeroed: the target writes it.
    Target,
}

/// Sentinel for outputs.
pub const SENTINEL: Fill = Fill::Byte(0xA5);

/// What became of a buffer's pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    Null,
    /// Own allocation `alloc`, `offset` bytes in.
    Own {
        alloc: usize,
        offset: usize,
    },
    /// A claim no memory can hold: a small buffer the call must not touch.
    Impossible {
        alloc: usize,
    },
    /// A real claim too large for a fuzz input: NULL instead.
    TooLarge,
    /// At another buffer's memory.
    Aliased {
        of: usize,
        alloc: usize,
        offset: usize,
    },
}

#[derive(Debug)]
struct Buf {
    name: String,
    ty: Ty,
    role: Role,
    claim: Option<u128>,
    choice: Ptr,
    fill: Fill,
    res: Resolved,
    /// Never handed to the library (its pointer list is NULL): exempt from the overlap rule.
    unused: bool,
}

struct Alloc {
    ptr: *mut u8,
    layout: Layout,
    /// Bytes before the pointer given out (misalignment): never written.
    prefix: usize,
}

impl Drop for Alloc {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl Alloc {
    fn new(bytes: usize) -> Alloc {
        let layout = Layout::from_size_align(bytes.max(1), 16).unwrap();
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Alloc {
            ptr,
            layout,
            prefix: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

/// A buffer of a [`Call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(usize);

/// The exact element count of a shape (None: beyond `u128`).
pub fn elems(dims: &[u64]) -> Option<u128> {
    dims.iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
}

/// `a * b` on claims.
pub fn mul(a: Option<u128>, b: Option<u128>) -> Option<u128> {
    a?.checked_mul(b?)
}

/// `a + b` on claims.
pub fn add(a: Option<u128>, b: Option<u128>) -> Option<u128> {
    a?.checked_add(b?)
}

/// A call's buffers; see the crate docs.
pub struct Call {
    bufs: Vec<Buf>,
    allocs: Vec<Alloc>,
    snapshot: Vec<Vec<u8>>,
    work: Option<u128>,
    rng: u64,
    poison: Option<Poison>,
    allocated: bool,
    what: String,
    notes: Vec<String>,
    /// Pairs that may be the very same memory (an input updated in place, as LCA's u0 = u).
    same_ok: Vec<(usize, usize)>,
}

thread_local! {
    static CURRENT: RefCell<String> = const { RefCell::new(String::new()) };
}

static HOOK: Once = Once::new();

/// On a panic (the library's or the oracle's), print the call being made first.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            CURRENT.with(|c| {
                if let Ok(c) = c.try_borrow() {
                    if !c.is_empty() {
                        eprintln!("==== the call being made:\n{c}");
                    }
                }
            });
            previous(info)
        }));
    });
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Call {
    /// A call of the entry point `what`, its buffers filled from `values`.
    pub fn new(what: &str, values: Values) -> Call {
        install_hook();
        Call {
            bufs: Vec::new(),
            allocs: Vec::new(),
            snapshot: Vec::new(),
            work: Some(0),
            rng: values.seed,
            poison: values.poison,
            allocated: false,
            what: what.to_string(),
            notes: Vec::new(),
            same_ok: Vec::new(),
        }
    }

    /// A pseudo-random number from the input's seed.
    pub fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.rng)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A buffer of `claim` elements of `ty` (None: the claim overflows).
    pub fn buf(
        &mut self,
        name: impl Into<String>,
        ty: Ty,
        role: Role,
        claim: Option<u128>,
        choice: Ptr,
        fill: Fill,
    ) -> Id {
        assert!(!self.allocated);
        self.bufs.push(Buf {
            name: name.into(),
            ty,
            role,
            claim,
            choice,
            fill,
            res: Resolved::Null,
            unused: false,
        });
        Id(self.bufs.len() - 1)
    }

    /// Records a scalar argument (or anything else) for the call's description.
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Adds to the work estimate of the call (None: beyond counting).
    pub fn work(&mut self, w: Option<u128>) {
        self.work = add(self.work, w);
    }

    fn bytes_of(&self, i: usize) -> Option<u128> {
        let b = &self.bufs[i];
        b.claim?.checked_mul(b.ty.size() as u128)
    }

    /// Decides where every pointer goes and allocates and fills the buffers; `false`: skip this
    /// input (a real claim or work too large for a fuzz input, with nothing that must fail).
    pub fn alloc(&mut self) -> bool {
        assert!(!self.allocated);
        self.allocated = true;
        let n = self.bufs.len();
        let mut sizes = vec![0usize; n];
        // First every buffer's own memory.
        for i in 0..n {
            let bytes = self.bytes_of(i);
            let b = &self.bufs[i];
            if b.choice == Ptr::Null {
                continue;
            }
            let choice = match b.choice {
                Ptr::Misaligned(_) if skip("misaligned") => Ptr::Valid,
                other => other,
            };
            let res = match bytes {
                Some(x) if x <= CAP_BYTES => {
                    let align = b.ty.size();
                    let offset = match choice {
                        Ptr::Misaligned(m) if align > 1 => 1 + m as usize % (align - 1),
                        _ => 0,
                    };
                    sizes[i] = x as usize;
                    self.allocs.push(Alloc::new(offset + x as usize));
                    self.allocs.last_mut().unwrap().prefix = offset;
                    Resolved::Own {
                        alloc: self.allocs.len() - 1,
                        offset,
                    }
                }
                Some(x) if x <= isize::MAX as u128 => Resolved::TooLarge,
                _ => {
                    self.allocs.push(Alloc::new(SMALL_BYTES));
                    Resolved::Impossible {
                        alloc: self.allocs.len() - 1,
                    }
                }
            };
            self.bufs[i].res = res;
        }
        // Then the aliases: a tensor at another tensor's memory, that memory grown to hold both.
        for i in 0..n {
            let Ptr::Alias(t) = self.bufs[i].choice else {
                continue;
            };
            if skip("alias") {
                continue;
            }
            let j = t as usize % n;
            let (a, b) = (&self.bufs[i], &self.bufs[j]);
            // No chains: the target is a buffer with memory of its own.
            if i == j
                || a.role == Role::Desc
                || b.role == Role::Desc
                || matches!(b.choice, Ptr::Alias(_))
            {
                continue;
            }
            let (Resolved::Own { .. }, Resolved::Own { alloc, offset }) = (a.res, b.res) else {
                continue;
            };
            let need = offset + sizes[i].max(sizes[j]);
            if self.allocs[alloc].layout.size() < need {
                let mut grown = Alloc::new(need);
                grown.prefix = self.allocs[alloc].prefix;
                self.allocs[alloc] = grown;
            }
            // The alias's own allocation stays (unused) so indices remain valid.
            self.bufs[i].res = Resolved::Aliased {
                of: j,
                alloc,
                offset,
            };
        }
        // Work beyond the cap is skipped unless the call must fail on a claim no memory holds.
        let impossible = self
            .bufs
            .iter()
            .any(|b| matches!(b.res, Resolved::Impossible { .. }));
        if !impossible && !matches!(self.work, Some(w) if w <= WORK_CAP) {
            return false;
        }
        // Fill: each buffer's own memory per its fill.
        for i in 0..n {
            let Resolved::Own { alloc, offset } = self.bufs[i].res else {
                continue;
            };
            let (ty, fill) = (self.bufs[i].ty, self.bufs[i].fill);
            let len = sizes[i] / ty.size();
            let mut vals = Vec::with_capacity(len);
            for _ in 0..len {
                vals.push(match fill {
                    Fill::Range(lo, hi) => match ty {
                        Ty::I32 | Ty::U32 | Ty::U64 => {
                            let span = (hi - lo) as u64 + 1;
                            lo + (self.next_u64() % span.max(1)) as f64
                        }
                        _ => self.uniform(lo, hi),
                    },
                    _ => 0.0,
                });
            }
            let mem = &mut self.allocs[alloc].bytes_mut()[offset..];
            match fill {
                Fill::Byte(x) => mem.fill(x),
                Fill::Target => {}
                Fill::Range(..) => {
                    for (k, v) in vals.into_iter().enumerate() {
                        write_value(mem, ty, k, v);
                    }
                }
            }
        }
        true
    }

    /// Lets `a` and `b` be the very same memory (same address, same length): the library
    /// documents that case as allowed.
    pub fn may_be_same(&mut self, a: Id, b: Id) {
        self.same_ok.push((a.0, b.0));
        self.same_ok.push((b.0, a.0));
    }

    /// Marks `id` as not handed to the library (its entry is in a pointer list that is NULL).
    pub fn unused(&mut self, id: Id) {
        self.bufs[id.0].unused = true;
    }

    /// Whether the pointer list `list` reaches the library (has memory of its own).
    pub fn has(&self, list: Id) -> bool {
        self.len(list).is_some()
    }

    /// The pointer the library gets for `id`.
    pub fn ptr<T>(&self, id: Id) -> *mut T {
        match self.bufs[id.0].res {
            Resolved::Null | Resolved::TooLarge => std::ptr::null_mut(),
            Resolved::Own { alloc, offset } | Resolved::Aliased { alloc, offset, .. } => unsafe {
                self.allocs[alloc].ptr.add(offset).cast()
            },
            Resolved::Impossible { alloc } => self.allocs[alloc].ptr.cast(),
        }
    }

    /// The elements of `id` that the harness may write before the call (None: no memory of its
    /// own that fits the claim).
    pub fn len(&self, id: Id) -> Option<usize> {
        match self.bufs[id.0].res {
            Resolved::Own { .. } | Resolved::Aliased { .. } => {
                Some(self.bytes_of(id.0).unwrap() as usize / self.bufs[id.0].ty.size())
            }
            _ => None,
        }
    }

    /// Element `k` of `id` as f64 (floats) or integer value.
    pub fn get(&self, id: Id, k: usize) -> f64 {
        let ty = self.bufs[id.0].ty;
        let p = self.ptr::<u8>(id);
        assert!(!p.is_null() && k < self.len(id).unwrap());
        unsafe {
            let mem = std::slice::from_raw_parts(p, (k + 1) * ty.size());
            read_value(mem, ty, k)
        }
    }

    /// Writes element `k` of `id` (before the call).
    pub fn set(&mut self, id: Id, k: usize, v: f64) {
        let ty = self.bufs[id.0].ty;
        let p = self.ptr::<u8>(id);
        assert!(!p.is_null() && k < self.len(id).unwrap());
        unsafe {
            let mem = std::slice::from_raw_parts_mut(p, (k + 1) * ty.size());
            write_value(mem, ty, k, v)
        }
    }

    /// Writes element `k` of the `uint64_t` buffer `id` exactly (before the call).
    pub fn set_u64(&mut self, id: Id, k: usize, v: u64) {
        assert_eq!(self.bufs[id.0].ty, Ty::U64);
        assert!(self.len(id).is_some_and(|n| k < n));
        unsafe { self.ptr::<u64>(id).add(k).write_unaligned(v) };
    }

    /// Writes pointer `k` of the pointer list `list` (before the call; ignored when the list has
    /// no memory).
    pub fn set_ptr<T>(&mut self, list: Id, k: usize, p: *mut T) {
        if self.len(list).is_some_and(|n| k < n) {
            let base = self.ptr::<u8>(list);
            unsafe { base.add(k * 8).cast::<*mut T>().write_unaligned(p) };
        }
    }

    /// Plants the input's poison value, records what the call looks like, and snapshots every
    /// buffer. Call right before the entry point.
    pub fn ready(&mut self) {
        if let Some(p) = self.poison {
            let cand: Vec<usize> = (0..self.bufs.len())
                .filter(|&i| {
                    let b = &self.bufs[i];
                    b.role != Role::Desc
                        && !matches!(b.ty, Ty::Ptr | Ty::U8)
                        && self.len(Id(i)).is_some_and(|n| n > 0)
                })
                .collect();
            if !cand.is_empty() {
                let id = Id(cand[p.buf as usize % cand.len()]);
                let k = p.at as usize % self.len(id).unwrap();
                let v = poison_value(self.bufs[id.0].ty, p.value);
                self.set(id, k, v);
            }
        }
        self.snapshot = self.allocs.iter().map(|a| a.bytes().to_vec()).collect();
        let text = self.describe();
        if std::env::var_os("FEP_FUZZ_TRACE").is_some() {
            eprintln!("{text}");
        }
        CURRENT.with(|c| *c.borrow_mut() = text);
    }

    /// The call as the library sees it.
    pub fn describe(&self) -> String {
        let mut s = format!("{}:\n", self.what);
        for n in &self.notes {
            s += &format!("  {n}\n");
        }
        for (i, b) in self.bufs.iter().enumerate() {
            let claim = match b.claim {
                Some(c) => c.to_string(),
                None => "overflow".into(),
            };
            let at = match b.res {
                Resolved::Null => "NULL".to_string(),
                Resolved::TooLarge => "NULL (claim too large for a fuzz input)".into(),
                Resolved::Own { offset, .. } => {
                    format!("{:p}{}", self.ptr::<u8>(Id(i)), misaligned(offset))
                }
                Resolved::Impossible { .. } => format!(
                    "{:p} ({SMALL_BYTES} bytes: the claim cannot exist)",
                    self.ptr::<u8>(Id(i))
                ),
                Resolved::Aliased { of, offset, .. } => format!(
                    "{:p} = {}{}",
                    self.ptr::<u8>(Id(i)),
                    self.bufs[of].name,
                    misaligned(offset)
                ),
            };
            let passed = if b.unused {
                " (not passed: its list, or its entry in it, is NULL)"
            } else {
                ""
            };
            s += &format!(
                "  {:<16} {:?} {:?} claim {} elements at {}{}\n",
                b.name, b.ty, b.role, claim, at, passed
            );
        }
        s
    }

    /// The oracle (see the crate docs) for a call that returned `status`.
    pub fn check(&self, status: i32) {
        let fail = |why: String| -> ! {
            panic!(
                "{why}\nstatus {status}, fep_last_error: {:?}\n{}",
                last_error(),
                self.describe()
            )
        };
        check_status(status);
        stats(status);
        if std::env::var_os("FEP_FUZZ_TRACE").is_some() {
            let msg = if status == ffi::FEP_OK {
                String::new()
            } else {
                last_error()
            };
            eprintln!("  -> status {status} {msg}");
        }
        if status != ffi::FEP_OK && last_error().is_empty() {
            fail("a failure without a message".into());
        }
        if status == ffi::FEP_OK {
            for (i, b) in self.bufs.iter().enumerate() {
                let Resolved::Aliased { of, .. } = b.res else {
                    continue;
                };
                let other = &self.bufs[of];
                if self.same_ok.contains(&(i, of))
                    && self.bytes_of(i) == self.bytes_of(of)
                    && self.ptr::<u8>(Id(i)) == self.ptr::<u8>(Id(of))
                {
                    continue;
                }
                let written = |r: Role| matches!(r, Role::Out | Role::Param);
                if (written(b.role) || written(other.role))
                    && !b.unused
                    && !other.unused
                    && self.bytes_of(i).unwrap() > 0
                    && self.bytes_of(of).unwrap() > 0
                {
                    fail(format!(
                        "FEP_OK although {} ({:?}) overlaps {} ({:?})",
                        b.name, b.role, other.name, other.role
                    ));
                }
            }
        }
        for (a, alloc) in self.allocs.iter().enumerate() {
            let (before, after) = (&self.snapshot[a], alloc.bytes());
            if before[..alloc.prefix] != after[..alloc.prefix] {
                fail(format!(
                    "bytes before a misaligned pointer were written (allocation {a})"
                ));
            }
            if before == after {
                continue;
            }
            // Which buffers live here, and may they change with this status?
            let users: Vec<&Buf> = self
                .bufs
                .iter()
                .filter(|b| {
                    matches!(b.res,
                        Resolved::Own { alloc, .. } | Resolved::Aliased { alloc, .. }
                        | Resolved::Impossible { alloc } if alloc == a)
                })
                .collect();
            let may = |b: &&Buf| match (status, b.role) {
                (ffi::FEP_OK, Role::Out | Role::Param | Role::Slot) => {
                    !matches!(b.res, Resolved::Impossible { .. })
                }
                (ffi::FEP_ERR_DIVERGED, Role::Out) => true,
                _ => false,
            };
            if !users.iter().any(may) {
                let k = before.iter().zip(after).position(|(x, y)| x != y).unwrap();
                let names: Vec<String> = users
                    .iter()
                    .map(|b| format!("{} ({:?})", b.name, b.role))
                    .collect();
                fail(format!(
                    "{} changed (first at byte {k}) although the call may not write it with \
                     this status",
                    names.join(" = ")
                ));
            }
        }
    }
}

/// Whether `FEP_FUZZ_SKIP` (a comma-separated list) names `what`: `misaligned` (misaligned
/// pointers become aligned ones), `alias` (aliased pointers point at their own buffers). For
/// exploring past a known finding; CI sets neither.
pub fn skip(what: &str) -> bool {
    static SKIP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SKIP.get_or_init(|| {
        std::env::var("FEP_FUZZ_SKIP")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    })
    .iter()
    .any(|s| s == what)
}

fn misaligned(offset: usize) -> String {
    if offset == 0 {
        String::new()
    } else {
        format!(" (misaligned by {offset} bytes)")
    }
}

fn write_value(mem: &mut [u8], ty: Ty, k: usize, v: f64) {
    let s = ty.size();
    let dst = &mut mem[k * s..(k + 1) * s];
    match ty {
        Ty::F32 => dst.copy_from_slice(&(v as f32).to_ne_bytes()),
        Ty::F16 => dst.copy_from_slice(&half::f16::from_f64(v).to_ne_bytes()),
        Ty::BF16 => dst.copy_from_slice(&half::bf16::from_f64(v).to_ne_bytes()),
        Ty::F64 => dst.copy_from_slice(&v.to_ne_bytes()),
        Ty::I32 => dst.copy_from_slice(&(v as i64 as i32).to_ne_bytes()),
        Ty::U32 => dst.copy_from_slice(&(v as i64 as u32).to_ne_bytes()),
        Ty::U64 => dst.copy_from_slice(&(v as u64).to_ne_bytes()),
        Ty::Ptr | Ty::U8 => {}
    }
}

fn read_value(mem: &[u8], ty: Ty, k: usize) -> f64 {
    let s = ty.size();
    let b = &mem[k * s..(k + 1) * s];
    match ty {
        Ty::F32 => f32::from_ne_bytes(b.try_into().unwrap()) as f64,
        Ty::F16 => half::f16::from_ne_bytes(b.try_into().unwrap()).to_f64(),
        Ty::BF16 => half::bf16::from_ne_bytes(b.try_into().unwrap()).to_f64(),
        Ty::F64 => f64::from_ne_bytes(b.try_into().unwrap()),
        Ty::I32 => i32::from_ne_bytes(b.try_into().unwrap()) as f64,
        Ty::U32 => u32::from_ne_bytes(b.try_into().unwrap()) as f64,
        Ty::U64 => u64::from_ne_bytes(b.try_into().unwrap()) as f64,
        Ty::Ptr | Ty::U8 => 0.0,
    }
}

fn poison_value(ty: Ty, v: u8) -> f64 {
    match ty {
        Ty::I32 | Ty::U32 => {
            const I: [f64; 8] = [
                -1.0,
                2147483647.0,
                -2147483648.0,
                1e6,
                3.0,
                0.0,
                7.0,
                65536.0,
            ];
            I[v as usize % I.len()]
        }
        Ty::U64 => EDGES[v as usize % EDGES.len()] as f64,
        _ => SPECIAL_F64[v as usize % SPECIAL_F64.len()],
    }
}

/// `fep_last_error()` as a string.
pub fn last_error() -> String {
    let p = ffi::fep_last_error();
    assert!(!p.is_null(), "fep_last_error returned NULL");
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Panics unless `status` is a documented status other than `FEP_ERR_INTERNAL`.
pub fn check_status(status: i32) {
    match status {
        ffi::FEP_ERR_INTERNAL => panic!(
            "FEP_ERR_INTERNAL (a panic caught at the boundary): {}",
            last_error()
        ),
        ffi::FEP_OK
        | ffi::FEP_ERR_INVALID_ARGUMENT
        | ffi::FEP_ERR_NO_DEVICE
        | ffi::FEP_ERR_DRIVER
        | ffi::FEP_ERR_OUT_OF_MEMORY
        | ffi::FEP_ERR_UNSUPPORTED
        | ffi::FEP_ERR_DIVERGED => {}
        other => panic!("undocumented status {other}: {}", last_error()),
    }
}

/// With `FEP_FUZZ_STATS` set, prints how many calls returned each status (every 20000 calls)
/// and the messages of the errors seen so far, counted by their first words.
pub fn stats(status: i32) {
    use std::sync::Mutex;
    static COUNTS: Mutex<Option<(u64, [u64; 8], std::collections::BTreeMap<String, u64>)>> =
        Mutex::new(None);
    if std::env::var_os("FEP_FUZZ_STATS").is_none() {
        return;
    }
    let mut g = COUNTS.lock().unwrap();
    let (n, counts, msgs) = g.get_or_insert_with(Default::default);
    *n += 1;
    counts[status.clamp(0, 7) as usize] += 1;
    if status != ffi::FEP_OK {
        let m: String = last_error()
            .split(':')
            .next()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        *msgs.entry(m).or_default() += 1;
    }
    if *n % 20000 == 0 {
        eprintln!("statuses after {n} calls: {counts:?}");
        for (m, k) in msgs.iter() {
            eprintln!("  {k:>8} {m}");
        }
    }
}

/// Clears the thread's record of the call (after a handle helper's own calls).
pub fn done() {
    CURRENT.with(|c| c.borrow_mut().clear());
}

// ---- attention tensors -----------------------------------------------------------------------

/// Strides of a fuzzed `FepAttnTensor`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Strides {
    /// Row-major BHLD.
    Bhld,
    /// Row-major BLHD seen as BHLD.
    Blhd,
    /// BHLD with rows `pad` elements longer than D.
    Padded(u8),
    Raw([Dim; 3]),
}

/// A fuzzed `FepAttnTensor`: the call's consistent shape unless `shape` overrides it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Tensor {
    pub shape: Option<[Dim; 4]>,
    pub strides: Strides,
    pub ptr: Ptr,
    /// The description itself NULL.
    pub null: bool,
}

/// The sizes of an attention call: B, Hkv, the group Hq / Hkv, Lq, Lk, D, Dv.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct AttnShape {
    pub b: Dim,
    pub hkv: Dim,
    pub group: Dim,
    pub lq: Dim,
    pub lk: Dim,
    pub d: Dim,
    pub dv: Dim,
}

/// The resolved sizes of an [`AttnShape`].
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub b: u64,
    pub hq: u64,
    pub hkv: u64,
    pub lq: u64,
    pub lk: u64,
    pub d: u64,
    pub dv: u64,
}

impl AttnShape {
    pub fn get(&self) -> AttnDims {
        let hkv = self.hkv.get(2);
        AttnDims {
            b: self.b.get(2),
            hkv,
            hq: sat(hkv as u128 * self.group.get(2) as u128),
            lq: self.lq.get(4),
            lk: self.lk.get(5),
            d: self.d.get(8),
            dv: self.dv.get(8),
        }
    }
}

fn sat(v: u128) -> u64 {
    v.min(u64::MAX as u128) as u64
}

impl Tensor {
    /// (shape, strides) as the C struct holds them, `base` the call's shape for this tensor.
    pub fn dims(&self, base: [u64; 4]) -> ([u64; 4], [u64; 3]) {
        let s = match self.shape {
            None => base,
            Some(o) => [o[0].get(2), o[1].get(3), o[2].get(4), o[3].get(8)],
        };
        let [_, h, l, d] = s.map(|x| x as u128);
        let m = |a: u128, b: u128| a.saturating_mul(b);
        let st = match self.strides {
            Strides::Bhld => [m(m(h, l), d), m(l, d), d],
            Strides::Blhd => [m(m(l, h), d), d, m(h, d)],
            Strides::Padded(p) => {
                let row = d + (p % 4) as u128;
                [m(m(h, l), row), m(l, row), row]
            }
            Strides::Raw(r) => return (s, r.map(|x| x.get(64))),
        };
        (s, st.map(sat))
    }
}

/// The elements a description addresses: the largest offset + 1 (0 when a dimension is 0).
pub fn extent(s: [u64; 4], st: [u64; 3]) -> Option<u128> {
    if s.contains(&0) {
        return Some(0);
    }
    let mut e = Some(s[3] as u128);
    for i in 0..3 {
        e = add(e, mul(Some(s[i] as u128 - 1), Some(st[i] as u128)));
    }
    e
}

/// A `FepAttnTensor` the library reads, with its buffer in a [`Call`].
pub struct AttnArg {
    pub desc: ffi::FepAttnTensor,
    pub id: Id,
    pub null: bool,
}

impl AttnArg {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: &mut Call,
        name: &str,
        t: &Tensor,
        base: [u64; 4],
        ty: Ty,
        role: Role,
        fill: Fill,
    ) -> AttnArg {
        let (shape, strides) = t.dims(base);
        let id = c.buf(name, ty, role, extent(shape, strides), t.ptr, fill);
        AttnArg {
            desc: ffi::FepAttnTensor {
                data: std::ptr::null_mut(),
                shape,
                strides,
            },
            id,
            null: t.null,
        }
    }

    /// After [`Call::alloc`]: the description's data pointer.
    pub fn bind(&mut self, c: &Call) {
        self.desc.data = c.ptr(self.id);
    }

    pub fn as_ptr(&self) -> *const ffi::FepAttnTensor {
        if self.null {
            std::ptr::null()
        } else {
            &self.desc
        }
    }

    pub fn shape(&self) -> [u64; 4] {
        self.desc.shape
    }
}

// ---- handles ---------------------------------------------------------------------------------

/// A handle argument: the live one, NULL, garbage (readable memory that is no handle), a
/// misaligned pointer into garbage, or a live handle of the other kind (an LCA dictionary
/// passed as a VMP model and vice versa). Freed handles are not tried: the header's contract
/// is that a non-NULL handle points at readable memory, and freed memory is not.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Handle {
    Live,
    Null,
    Garbage(u64),
    Misaligned(u8),
    Other,
}

/// Memory behind garbage handles, kept until the call is done.
#[derive(Default)]
pub struct HandleMem(Vec<Box<[u64]>>);

impl HandleMem {
    /// The pointer `h` stands for, `live` the call's handle and `other` a live handle of the
    /// other kind.
    pub fn ptr<T, U>(&mut self, h: Handle, live: *mut T, other: *mut U) -> *mut T {
        let words = size_of::<T>().max(size_of::<U>()) / 8 + 4;
        let mut garbage = |seed: u64| -> *mut u8 {
            let mut s = seed;
            let mem: Box<[u64]> = (0..words).map(|_| splitmix(&mut s)).collect();
            self.0.push(mem);
            self.0.last_mut().unwrap().as_mut_ptr().cast()
        };
        match h {
            Handle::Live => live,
            Handle::Null => std::ptr::null_mut(),
            Handle::Garbage(seed) => garbage(seed).cast(),
            Handle::Misaligned(m) => unsafe { garbage(m as u64).add(1 + m as usize % 7).cast() },
            // A smaller object of the other kind could be read past its end: garbage instead.
            Handle::Other if size_of::<U>() < size_of::<T>() => garbage(7).cast(),
            Handle::Other => other.cast(),
        }
    }
}

struct SyncPtr(usize);

/// A 2 x 3 dictionary made once (the "other" handle of the VMP targets).
pub fn shared_dict() -> *mut ffi::FepLcaDict {
    static D: std::sync::OnceLock<SyncPtr> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let phi = [1.0f32, 0.0, 0.6, 0.0, 1.0, 0.8];
        let mut out = std::ptr::null_mut();
        let s = unsafe {
            ffi::fep_lca_dict_new(
                0,
                0,
                std::ptr::null_mut(),
                0,
                phi.as_ptr().cast(),
                2,
                3,
                1,
                &mut out,
            )
        };
        assert_eq!(s, ffi::FEP_OK, "shared dictionary: {}", last_error());
        SyncPtr(out as usize)
    })
    .0 as *mut _
}

/// A one-factor, one-modality model made once (the "other" handle of the LCA targets).
pub fn shared_model() -> *mut ffi::FepVmpModel {
    static M: std::sync::OnceLock<SyncPtr> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let (s, o, u, deps) = ([2u64], [2u64], [1u64], [1u64]);
        let dep = [0u64];
        let a = [0.9f64, 0.2, 0.1, 0.8];
        let b = [1.0f64, 0.0, 0.0, 1.0];
        let (ap, bp) = ([a.as_ptr()], [b.as_ptr()]);
        let desc = ffi::FepVmpModelDesc {
            num_factors: 1,
            num_modalities: 1,
            num_states: s.as_ptr(),
            num_controls: u.as_ptr(),
            num_obs: o.as_ptr(),
            a_num_deps: deps.as_ptr(),
            a_deps: dep.as_ptr(),
            a: ap.as_ptr(),
            b: bp.as_ptr(),
            c: std::ptr::null(),
            d: std::ptr::null(),
            policies: std::ptr::null(),
            num_policies: 0,
            policy_len: 0,
            e: std::ptr::null(),
            pa: std::ptr::null(),
            pb: std::ptr::null(),
            pd: std::ptr::null(),
        };
        let mut out = std::ptr::null_mut();
        let st = unsafe { ffi::fep_vmp_model_new(0, 0, &desc, &mut out) };
        assert_eq!(st, ffi::FEP_OK, "shared model: {}", last_error());
        SyncPtr(out as usize)
    })
    .0 as *mut _
}

/// The fuzzed FepAttentionParams of the attention targets (forward and backward).
#[derive(Arbitrary, Debug)]
pub struct AttnParams {
    score: Code,
    nu: Real,
    scale: Real,
    causal: Flag,
    window: Code,
    normalizer: Flag,
    skip_input_checks: Flag,
}

impl AttnParams {
    pub fn get(&self) -> ffi::FepAttentionParams {
        ffi::FepAttentionParams {
            score: self.score.get(4),
            nu: self.nu.get_f32(0.5, 10.0),
            scale: self.scale.get(-0.5, 2.0),
            causal: self.causal.get(),
            window: self.window.get(5),
            normalizer: self.normalizer.get(),
            skip_input_checks: self.skip_input_checks.get(),
        }
    }
}
