//! A fuzzed `FepAttnScoreInputs` (C ABI v3: fep_attention_forward2 / _backward2 /
//! _probabilities): the struct NULL, given or misaligned; nu_head `[Hq]` with values ≤ 0, NaN or
//! ±inf; a bias and a mask broadcast to the scores `[B, Hq, Lq, Lk]` (each dimension full, 1,
//! wrong, 0 or huge; strides row-major, 0, padded, full-size or raw, overflow included; bias
//! values NaN, +inf, −inf, whole rows −inf; mask bytes random, all 0 or one 0); packed sequences
//! (cu_seqlens_q/k valid, decreasing, not starting at 0, not ending at the total, lengths over the
//! max; num_seqs right or off; max_seqlen exact, loose, short, 0 or huge; either pointer NULL).
//!
//! Every buffer is a [`Buf`](crate::Call::buf) of the call, so the oracle covers them: the bias
//! claims the extent its shape and strides address, the mask as many bytes, nu_head Hq floats (q's
//! Hq) and each cu_seqlens num_seqs + 1 int32 (the passed num_seqs, right or wrong).

use arbitrary::Arbitrary;

use crate::*;

/// One dimension of a bias's or mask's shape.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum BDim {
    /// The scores' size of that dimension.
    Full,
    /// 1 (broadcast; wrong for Lk unless Lk = 1).
    One,
    /// The full size + 1 ..= + 3.
    Wrong(u8),
    Zero,
    Edge(u8),
}

impl BDim {
    fn get(self, full: u64) -> u64 {
        match self {
            BDim::Full => full,
            BDim::One => 1,
            BDim::Wrong(x) => full.saturating_add(1 + x as u64 % 3),
            BDim::Zero => 0,
            BDim::Edge(i) => EDGES[i as usize % EDGES.len()],
        }
    }
}

/// The strides of a bias or mask.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum BStrides {
    /// Row-major in its own shape.
    Own,
    /// All 0 (every row the same memory, as an expanded tensor).
    Zero,
    /// Row-major in its own shape with rows `pad` elements longer.
    Padded(u8),
    /// Row-major in the full score shape (a broadcast view of a full tensor).
    Full,
    /// Anything, overflowing included.
    Raw([Dim; 3]),
}

/// Values planted in a bias.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum BiasValues {
    Plain,
    /// One element NaN, +inf or −inf.
    Special { at: u16, which: u8 },
    /// Row `row` (Lk elements) all −inf: a fully masked row.
    RowNegInf(u16),
    /// Everything −inf.
    AllNegInf,
}

/// Bytes of a mask.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum MaskValues {
    /// All 1 (keep).
    Keep,
    /// From the call's seed: each byte 0 (masked), 1 or 255.
    Random,
    /// One byte 0.
    One(u16),
    /// All 0: every row fully masked.
    None,
}

/// A bias or mask.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Broadcast<V> {
    pub shape: [BDim; 4],
    pub strides: BStrides,
    pub ptr: Ptr,
    pub values: V,
}

impl<V> Broadcast<V> {
    fn dims(&self, full: [u64; 4]) -> ([u64; 4], [u64; 3]) {
        let s = [0, 1, 2, 3].map(|i| self.shape[i].get(full[i]));
        let m = |a: u64, b: u64| a.saturating_mul(b);
        let row_major = |s: [u64; 4], pad: u64| {
            let row = s[3].saturating_add(pad);
            [m(m(s[1], s[2]), row), m(s[2], row), row]
        };
        let st = match self.strides {
            BStrides::Own => row_major(s, 0),
            BStrides::Zero => [0; 3],
            BStrides::Padded(p) => row_major(s, p as u64 % 4),
            BStrides::Full => row_major(full, 0),
            BStrides::Raw(r) => r.map(|x| x.get(64)),
        };
        (s, st)
    }
}

/// The number of packed sequences passed.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum NumSeqs {
    Right,
    /// S + x (x in -2 ..= 2, at least 0).
    Off(i8),
    Zero,
    Edge(u8),
}

/// A max_seqlen.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum MaxLen {
    /// The longest sequence.
    Exact,
    /// The longest + 1 ..= + 3 (may pass the packed total: refused then).
    Loose(u8),
    /// The longest - 1 (a length over the max).
    Short,
    Zero,
    Edge(u8),
}

impl MaxLen {
    fn get(self, exact: u64) -> u64 {
        match self {
            MaxLen::Exact => exact,
            MaxLen::Loose(x) => exact + 1 + x as u64 % 3,
            MaxLen::Short => exact.saturating_sub(1),
            MaxLen::Zero => 0,
            MaxLen::Edge(i) => EDGES[i as usize % EDGES.len()],
        }
    }
}

/// What becomes of valid offsets.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum CuValues {
    Valid,
    /// Entry `at` (not the first) set below its predecessor.
    Decreasing(u8),
    /// The first entry not 0.
    Start(i8),
    /// The last entry off the total by x (not 0).
    End(i8),
    /// One entry i32::MAX, i32::MIN or -1.
    Extreme { at: u8, which: u8 },
}

/// Packed sequences: up to 3 sequences of small lengths.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Packed {
    /// (query, key) length of each sequence (the first at least 1 each).
    pub lens: [(u8, u8); 3],
    pub seqs: u8,
    /// Whether q, k and v take B = 1 and L = the totals (else the call's own shape).
    pub reshape: Reshape,
    pub num_seqs: NumSeqs,
    pub max_q: MaxLen,
    pub max_k: MaxLen,
    pub cu_q: CuValues,
    pub cu_k: CuValues,
    pub ptr_q: Ptr,
    pub ptr_k: Ptr,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reshape {
    Packed,
    AsIs,
}

impl Packed {
    /// Query and key lengths of the sequences.
    pub fn lengths(&self) -> Vec<(u64, u64)> {
        let n = 1 + self.seqs as usize % 3;
        (0..n)
            .map(|s| {
                let (q, k) = self.lens[s];
                let min = if s == 0 { 1 } else { 0 };
                ((q % 4).max(min) as u64, (k % 5).max(min) as u64)
            })
            .collect()
    }

    /// (total_q, total_k) when q, k, v are reshaped to the packed lengths.
    pub fn totals(&self) -> Option<(u64, u64)> {
        if self.reshape != Reshape::Packed {
            return None;
        }
        let l = self.lengths();
        Some((l.iter().map(|x| x.0).sum(), l.iter().map(|x| x.1).sum()))
    }
}

/// Values planted in nu_head.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum NuValues {
    Plain,
    /// One element 0, -0, -1, NaN, +inf, -inf or the smallest subnormal.
    Special { at: u8, which: u8 },
}

/// A fuzzed `FepAttnScoreInputs` (as a whole: [`StructPtr`]).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ScoreInputs {
    pub nu_head: Option<(Ptr, NuValues)>,
    pub bias: Option<Broadcast<BiasValues>>,
    pub mask: Option<Broadcast<MaskValues>>,
    pub packed: Option<Packed>,
}

/// Where the `inputs` pointer points.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum StructPtr {
    Given,
    Null,
    /// 1 ..= 7 bytes past an aligned copy (read_arg must refuse it).
    Misaligned(u8),
}

/// The inputs argument of a call: the buffers are in the [`Call`]; [`ScoreArg::bind`] after
/// [`Call::alloc`] fills them and the struct.
pub struct ScoreArg {
    pub desc: ffi::FepAttnScoreInputs,
    fuzz: ScoreInputs,
    at: StructPtr,
    nu: Option<Id>,
    bias: Option<Id>,
    mask: Option<Id>,
    cu: Option<(Id, Id, u64)>,
    /// Storage of a misaligned copy.
    bytes: Vec<u8>,
}

/// Sizes of the call the score inputs are for.
#[derive(Debug, Clone, Copy)]
pub struct ScoreDims {
    /// [B, Hq, Lq, Lk] of q's and k's shapes.
    pub full: [u64; 4],
}

impl ScoreArg {
    /// Declares the buffers of `fuzz` in `c` for scores of `dims`.
    pub fn new(c: &mut Call, fuzz: &ScoreInputs, at: StructPtr, dims: ScoreDims) -> ScoreArg {
        let null = ffi::FepAttnScoreInputs {
            nu_head: std::ptr::null(),
            bias: std::ptr::null(),
            bias_shape: [0; 4],
            bias_strides: [0; 3],
            mask: std::ptr::null(),
            mask_shape: [0; 4],
            mask_strides: [0; 3],
            cu_seqlens_q: std::ptr::null(),
            cu_seqlens_k: std::ptr::null(),
            num_seqs: 0,
            max_seqlen_q: 0,
            max_seqlen_k: 0,
        };
        let mut a = ScoreArg {
            desc: null,
            fuzz: *fuzz,
            at,
            nu: None,
            bias: None,
            mask: None,
            cu: None,
            bytes: Vec::new(),
        };
        let full = dims.full;
        if let Some((ptr, _)) = fuzz.nu_head {
            a.nu = Some(c.buf(
                "inputs.nu_head",
                Ty::F32,
                Role::In,
                Some(full[1] as u128),
                ptr,
                Fill::Range(0.5, 10.0),
            ));
        }
        if let Some(b) = &fuzz.bias {
            let (s, st) = b.dims(full);
            a.desc.bias_shape = s;
            a.desc.bias_strides = st;
            a.bias = Some(c.buf(
                "inputs.bias",
                Ty::F32,
                Role::In,
                extent(s, st),
                b.ptr,
                Fill::Range(-2.0, 2.0),
            ));
        }
        if let Some(m) = &fuzz.mask {
            let (s, st) = m.dims(full);
            a.desc.mask_shape = s;
            a.desc.mask_strides = st;
            a.mask = Some(c.buf(
                "inputs.mask",
                Ty::U8,
                Role::In,
                extent(s, st),
                m.ptr,
                Fill::Byte(1),
            ));
        }
        if let Some(p) = &fuzz.packed {
            let real = p.lengths().len() as u64;
            let n = match p.num_seqs {
                NumSeqs::Right => real,
                NumSeqs::Off(x) => (real as i64 + (x % 3) as i64).max(0) as u64,
                NumSeqs::Zero => 0,
                NumSeqs::Edge(i) => EDGES[i as usize % EDGES.len()],
            };
            let claim = add(Some(n as u128), Some(1));
            let fill = Fill::Target;
            let q = c.buf("inputs.cu_seqlens_q", Ty::I32, Role::In, claim, p.ptr_q, fill);
            let k = c.buf("inputs.cu_seqlens_k", Ty::I32, Role::In, claim, p.ptr_k, fill);
            let l = p.lengths();
            a.desc.num_seqs = n;
            a.desc.max_seqlen_q = p.max_q.get(l.iter().map(|x| x.0).max().unwrap());
            a.desc.max_seqlen_k = p.max_k.get(l.iter().map(|x| x.1).max().unwrap());
            a.cu = Some((q, k, n));
        }
        // A NULL struct passes none of its pointers: exempt from the overlap rule.
        if matches!(at, StructPtr::Null) {
            let ids = [a.nu, a.bias, a.mask, a.cu.map(|x| x.0), a.cu.map(|x| x.1)];
            for id in ids.into_iter().flatten() {
                c.unused(id);
            }
        }
        a
    }

    /// After [`Call::alloc`]: fills the buffers (before [`Call::ready`]) and the struct.
    pub fn bind(&mut self, c: &mut Call) {
        let f = self.fuzz;
        if let (Some(id), Some((_, vals))) = (self.nu, f.nu_head) {
            self.desc.nu_head = c.ptr(id);
            if let (NuValues::Special { at, which }, Some(n)) = (vals, c.len(id)) {
                const V: [f64; 7] = [
                    0.0,
                    -0.0,
                    -1.0,
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    1e-45,
                ];
                if n > 0 {
                    c.set(id, at as usize % n, V[which as usize % V.len()]);
                }
            }
        }
        if let (Some(id), Some(b)) = (self.bias, f.bias) {
            self.desc.bias = c.ptr(id);
            if let Some(n) = c.len(id).filter(|&n| n > 0) {
                match b.values {
                    BiasValues::Plain => {}
                    BiasValues::Special { at, which } => {
                        const V: [f64; 3] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
                        c.set(id, at as usize % n, V[which as usize % 3]);
                    }
                    BiasValues::RowNegInf(row) => {
                        // The row's Lk elements from its start, as the strides place it.
                        let lk = (self.desc.bias_shape[3] as usize).max(1);
                        let start = (row as usize * lk) % n;
                        for k in start..(start + lk).min(n) {
                            c.set(id, k, f64::NEG_INFINITY);
                        }
                    }
                    BiasValues::AllNegInf => {
                        for k in 0..n {
                            c.set(id, k, f64::NEG_INFINITY);
                        }
                    }
                }
            }
        }
        if let (Some(id), Some(m)) = (self.mask, f.mask) {
            self.desc.mask = c.ptr(id);
            if let Some(n) = c.len(id).filter(|&n| n > 0) {
                let p = c.ptr::<u8>(id);
                for k in 0..n {
                    let v = match m.values {
                        MaskValues::Keep => 1,
                        MaskValues::Random => [0u8, 1, 255][(c.next_u64() % 3) as usize],
                        MaskValues::One(at) if k == at as usize % n => 0,
                        MaskValues::One(_) => 1,
                        MaskValues::None => 0,
                    };
                    // The harness's set() leaves u8 buffers alone: write the bytes here.
                    unsafe { p.add(k).write(v) };
                }
            }
        }
        if let (Some((q, k, n)), Some(p)) = (self.cu, f.packed) {
            self.desc.cu_seqlens_q = c.ptr(q);
            self.desc.cu_seqlens_k = c.ptr(k);
            let l = p.lengths();
            for (id, vals, which) in [(q, p.cu_q, 0), (k, p.cu_k, 1)] {
                let Some(len) = c.len(id) else { continue };
                // Offsets of the real sequences, then the total repeated (empty sequences)
                // when num_seqs passes more.
                let mut cu = vec![0i64];
                for s in &l {
                    let x = if which == 0 { s.0 } else { s.1 };
                    cu.push(cu.last().unwrap() + x as i64);
                }
                let total = *cu.last().unwrap();
                let mut v: Vec<i64> = (0..len).map(|i| *cu.get(i).unwrap_or(&total)).collect();
                if v.is_empty() {
                    continue;
                }
                let last = v.len() - 1;
                match vals {
                    CuValues::Valid => {}
                    CuValues::Decreasing(at) if last > 0 => {
                        let i = 1 + at as usize % last;
                        v[i] = v[i - 1] - 1;
                    }
                    CuValues::Decreasing(_) => {}
                    CuValues::Start(x) => v[0] = if x == 0 { 1 } else { x as i64 },
                    CuValues::End(x) => v[last] += if x == 0 { 1 } else { x as i64 },
                    CuValues::Extreme { at, which } => {
                        let i = at as usize % v.len();
                        v[i] = [i32::MAX as i64, i32::MIN as i64, -1][which as usize % 3];
                    }
                }
                for (i, x) in v.into_iter().enumerate() {
                    c.set(id, i, x as f64);
                }
            }
            let _ = n;
        }
    }

    /// The pointer the library gets (valid until `self` is dropped or moved).
    pub fn as_ptr(&mut self) -> *const ffi::FepAttnScoreInputs {
        match self.at {
            StructPtr::Given => &self.desc,
            StructPtr::Null => std::ptr::null(),
            StructPtr::Misaligned(m) => {
                let size = size_of::<ffi::FepAttnScoreInputs>();
                self.bytes = vec![0u8; size + 16];
                let base = self.bytes.as_ptr() as usize;
                let aligned = (base + 7) & !7;
                let off = aligned - base + 1 + m as usize % 7;
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (&self.desc as *const ffi::FepAttnScoreInputs).cast::<u8>(),
                        self.bytes.as_mut_ptr().add(off),
                        size,
                    );
                    self.bytes.as_ptr().add(off).cast()
                }
            }
        }
    }

    /// Whether a bias reaches the library (given and with memory or an impossible claim).
    pub fn has_bias(&self) -> bool {
        !self.desc.bias.is_null() && !matches!(self.at, StructPtr::Null)
    }

    /// Whether the struct's nu_head reaches the library.
    pub fn has_nu(&self) -> bool {
        !self.desc.nu_head.is_null() && !matches!(self.at, StructPtr::Null)
    }

    /// For the call's description.
    pub fn note(&self) -> String {
        format!(
            "inputs ({:?}): bias_shape {:?} bias_strides {:?} mask_shape {:?} mask_strides {:?} \
             num_seqs {} max_seqlen_q {} max_seqlen_k {}",
            self.at,
            self.desc.bias_shape,
            self.desc.bias_strides,
            self.desc.mask_shape,
            self.desc.mask_strides,
            self.desc.num_seqs,
            self.desc.max_seqlen_q,
            self.desc.max_seqlen_k
        )
    }
}
