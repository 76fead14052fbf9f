//! Attention on a GPU: the input scan (kernels/attention/check.cu) and the one dispatch point of
//! the forward kernels (`kernels/attention/forward_<dtype>.cu`, `attn_fwd_<dtype>_d<D>_v<Dv>`).
//!
//! The tile shape of each instantiation is chosen at compile time by `attn_tile` in
//! kernels/attention/traits.cuh; [`tile`] mirrors it to size the launch (a kernel handed a
//! different shared-memory size or block writes nothing, so a drift fails every GPU test).
//!
//! Decode: with a key split ([`key_split`]) the grid's x is row tiles × S, the kernels write S
//! normalised parts to a workspace, and kernels/attention/merge.cu merges them by lse into the
//! caller's outputs (NOTES.md, "Decode").
//!
//! Score inputs (issue 23): ν per head and packed sequences run in the fused kernels, and so does
//! a bias or mask broadcast over Lq (folded into the per-key terms); a bias or mask that varies
//! over Lq runs the row kernel of kernels/attention/probabilities.cu instead (correct, scalar:
//! NOTES.md, "Forward with bias/mask ..."), which also materialises the probabilities.

use std::ffi::c_void;

use super::gpu_inputs::AttnScoreInputs;
use super::gpu_merge::{self, MergeArgs};
use super::{AttentionOutputs, Dims, HEAD_DIMS, Problem, Score, check_cu_seqlens};
use crate::backend::{Device, LaunchConfig, Scratch, Stream, View};
use crate::element::Element;
use crate::error::{Error, Result};

const CHECK: &str = "attention/check";
const PROBS: &str = "attention/probabilities";
/// ATTN_PROBS_THREADS of probabilities.cu.
const PROBS_THREADS: u32 = 256;
/// ATTN_CHECK_ARRAYS of check.cu: π per head, π per key, key lengths, ν per head, the bias.
const CHECK_ARRAYS: usize = 5;
/// ATTN_SMEM_BUDGET of traits.cuh (the f32 kernel's budget).
const SMEM_BUDGET: usize = 65536;
/// ATTN_CHECK_THREADS of check.cu, and at most this many scan blocks.
const CHECK_THREADS: usize = 256;
const CHECK_BLOCKS: usize = 128;
/// CUDA's and HIP's limit on gridDim.y and gridDim.z.
const GRID_YZ: usize = 65535;
/// The longest query a split is chosen for automatically (a decode step).
const DECODE_MAX_LQ: usize = 16;
/// The fewest keys an automatic split gives a chunk (rounded up to the key tile): below this the
/// workspace traffic and the merge cost more than the parallelism gains.
const DECODE_MIN_CHUNK: usize = 256;

/// `AttnParams` of kernels/attention/params.cuh, field for field.
#[repr(C)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    pi_head: u64,
    pi_key: u64,
    kv_len: u64,
    lse: u64,
    e: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    split_o: i64,
    split_row: i64,
    x: AttnScoreInputs,
    b: i32,
    hq: i32,
    hkv: i32,
    lq: i32,
    lk: i32,
    family: i32,
    tau: f32,
    nu: f32,
    causal: i32,
    window: i32,
    normalizer: i32,
    vec_loads: i32,
    smem: i32,
    split: i32,
    tiles: i32,
    key_extra: i32,
    row_extra: i32,
    pad_: i32,
}

/// `attn_smem` of traits.cuh (the f32 kernel): Q, K, V and P tiles of `size`-byte elements with
/// rows padded by 16 bytes, then four per-key float arrays.
fn smem(size: usize, d: usize, dv: usize, warps: usize, bc: usize) -> usize {
    let pad = 16 / size;
    size * (16 * warps * (d + pad) + bc * (d + pad) + bc * (dv + pad) + 16 * warps * (bc + pad))
        + 16 * bc
}

/// `attn_smem16` of traits.cuh (the f16/bf16 kernel): Q, two stages of K and V, rows padded by
/// 16 bytes, then five per-key float arrays.
fn smem16(d: usize, dv: usize, warps: usize, mt: usize, bc: usize) -> usize {
    2 * (16 * mt * warps * (d + 8) + 2 * bc * (d + 8) + 2 * bc * (dv + 8)) + 20 * bc
}

/// `attn_regs16` of traits.cuh: the register estimate that bounds the f16/bf16 tile shape.
fn regs16(d: usize, dv: usize, mt: usize, bc: usize, acc: usize, threads: usize) -> usize {
    let staged = if acc == 4 {
        4 * (bc * (d + dv) / 8).div_ceil(threads)
    } else {
        0
    };
    acc * mt * (bc + dv) / 16 + (acc / 2) * (bc / 16) + 48 + staged
}

/// A tile shape: warps per block, keys per tile, shared memory bytes, 16-row strips per warp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tile {
    pub warps: usize,
    pub bc: usize,
    pub smem: usize,
    pub mt: usize,
}

/// `attn_tile` of traits.cuh for a device of `warp` lanes (32: NVIDIA; 64: CDNA).
#[allow(clippy::expect_used)] // an invariant of the tile tables, not of user input
pub(crate) fn tile(size: usize, d: usize, dv: usize, warp: usize) -> Tile {
    if size == 4 || dv == 256 {
        // f32, and Dv = 256 in every dtype: the v1 kernel (forward.cuh).
        const CANDIDATES: [(usize, usize); 7] = [
            (4, 64),
            (4, 32),
            (2, 64),
            (2, 32),
            (2, 16),
            (1, 32),
            (1, 16),
        ];
        return CANDIDATES
            .iter()
            .map(|&(warps, bc)| Tile {
                warps,
                bc,
                smem: smem(size, d, dv, warps, bc),
                mt: 1,
            })
            .find(|t| t.smem <= SMEM_BUDGET)
            // An invariant of the tables above for every pair of HEAD_DIMS, which the callers
            // check first (tests/census.rs builds every pair).
            .expect("every supported head-dim pair has a tile shape");
    }
    const CANDIDATES16: [(usize, usize, usize); 9] = [
        (4, 2, 64),
        (4, 2, 32),
        (4, 1, 64),
        (4, 1, 32),
        (4, 1, 16),
        (2, 1, 64),
        (2, 1, 32),
        (1, 1, 32),
        (1, 1, 16),
    ];
    let (budget, acc, regs) = if warp == 64 {
        (65536, 4, 110)
    } else {
        (98304, 8, 180)
    };
    CANDIDATES16
        .iter()
        .map(|&(warps, mt, bc)| Tile {
            warps,
            bc,
            smem: smem16(d, dv, warps, mt, bc),
            mt,
        })
        .find(|t| {
            // traits.cuh: on NVIDIA, D >= 128 takes one strip per warp (two spilled).
            let fits_mt = t.mt == 1 || warp == 64 || d < 128;
            fits_mt && t.smem <= budget && regs16(d, dv, t.mt, t.bc, acc, t.warps * warp) <= regs
        })
        .expect("every supported head-dim pair has a tile shape")
}

pub(crate) fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

pub(crate) fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "{name} = {v} exceeds the attention kernels' 32-bit sizes"
        ))
    })
}

pub(crate) fn strides(s: [usize; 3]) -> [i64; 3] {
    s.map(|x| x as i64)
}

/// `AttnCheckParams` of kernels/attention/check.cu, field for field.
#[repr(C)]
struct CheckParams {
    pi_head: u64,
    pi_key: u64,
    kv_len: u64,
    nu: u64,
    bias: u64,
    first: u64,
    n: [i64; CHECK_ARRAYS],
    bias_shape: [i64; 4],
    bias_stride: [i64; 3],
    lk: i64,
}

/// Scans the precisions and ν (finite, > 0), key lengths (0..=Lk) and the bias (no NaN, no +∞)
/// on the device: one launch, one read-back; the first bad element of the first failing array
/// becomes the error. Packed-sequence offsets are read back and checked on the host (a few
/// integers; the CPU's checks and messages).
pub(crate) fn scan_inputs<T: Element>(
    p: &Problem<'_, '_, T>,
    dev: &Device,
    stream: Stream,
) -> Result<()> {
    if let Some(vl) = &p.precision.varlen {
        let cu_q = vl.cu_q.to_vec_on(stream)?;
        let cu_k = vl.cu_k.to_vec_on(stream)?;
        check_cu_seqlens("cu_seqlens_q", &cu_q, p.dims.lq, vl.max_q)?;
        check_cu_seqlens("cu_seqlens_k", &cu_k, p.dims.lk, vl.max_k)?;
    }
    let pr = p.precision;
    let bias = pr.bias.as_ref();
    // (name, address, elements) in check.cu's order.
    let arrays: [(&str, Option<u64>, usize); CHECK_ARRAYS] = [
        (
            "precision.head",
            pr.head.as_ref().map(|v| v.addr()),
            p.dims.hq,
        ),
        (
            "precision.key",
            pr.key.as_ref().map(|v| v.addr()),
            p.dims.b * p.dims.hkv * p.dims.lk,
        ),
        ("kv_len", p.kv_len.map(|v| v.addr()), p.dims.b),
        ("nu", pr.nu.as_ref().map(|v| v.addr()), p.dims.hq),
        (
            "bias",
            bias.map(|b| b.data.addr()),
            bias.map_or(0, |b| b.shape.iter().product()),
        ),
    ];
    let lens: [usize; CHECK_ARRAYS] = std::array::from_fn(|a| {
        if arrays[a].1.is_some() {
            arrays[a].2
        } else {
            0
        }
    });
    let most = lens.iter().copied().max().unwrap_or(0);
    if most == 0 {
        return Ok(());
    }
    let grid = most.div_ceil(CHECK_THREADS).clamp(1, CHECK_BLOCKS);
    let out = Scratch::new(dev, 8 * CHECK_ARRAYS * grid, stream)?;
    // Broadcast strides (0 where a dimension has size 1: its index is always 0 there).
    let bias_stride = AttnScoreInputs::new(pr).bias_stride;
    let mut params = CheckParams {
        pi_head: arrays[0].1.unwrap_or(0),
        pi_key: arrays[1].1.unwrap_or(0),
        kv_len: arrays[2].1.unwrap_or(0),
        nu: arrays[3].1.unwrap_or(0),
        bias: arrays[4].1.unwrap_or(0),
        first: out.addr,
        n: lens.map(|n| n as i64),
        bias_shape: bias.map_or([1; 4], |b| b.shape.map(|x| x as i64)),
        bias_stride,
        lk: p.dims.lk as i64,
    };
    let cfg = LaunchConfig {
        grid: (grid as u32, 1, 1),
        block: CHECK_THREADS as u32,
        smem: 0,
    };
    dev.launch(CHECK, "attn_check", cfg, &mut [arg(&mut params)], stream)?;
    let firsts =
        unsafe { View::<i64>::from_raw(dev, out.addr, CHECK_ARRAYS * grid) }.to_vec_on(stream)?;
    for (a, (name, addr, _)) in arrays.iter().enumerate() {
        let n = lens[a];
        let Some(i) = (0..grid)
            .map(|g| firsts[CHECK_ARRAYS * g + a] as usize)
            .filter(|&i| i < n)
            .min()
        else {
            continue;
        };
        return Err(Error::invalid(
            *name,
            scan_reason(p, dev, stream, a, addr.unwrap_or(0), i)?,
        ));
    }
    Ok(())
}

/// The message for element `i` (logical index) of scanned array `a` at `addr`: its value read
/// back, and the rule it breaks (the CPU's words).
fn scan_reason<T: Element>(
    p: &Problem<'_, '_, T>,
    dev: &Device,
    stream: Stream,
    a: usize,
    addr: u64,
    i: usize,
) -> Result<String> {
    let read_f32 = |elem: usize| -> Result<f32> {
        Ok(unsafe { View::<f32>::from_raw(dev, addr + 4 * elem as u64, 1) }.to_vec_on(stream)?[0])
    };
    Ok(match a {
        2 => {
            let v =
                unsafe { View::<i32>::from_raw(dev, addr + 4 * i as u64, 1) }.to_vec_on(stream)?[0];
            format!(
                "element {i} is {v}; key lengths must be in 0..={}",
                p.dims.lk
            )
        }
        3 => format!(
            "nu[{i}] is {}; every nu must be finite and > 0",
            read_f32(i)?
        ),
        4 => {
            // The logical index in [B|1, Hq|1, Lq|1, Lk] to the element's memory offset.
            let b = p.precision.bias.as_ref().map_or([1; 4], |b| b.shape);
            let (j, r) = (i % b[3], i / b[3]);
            let (l, h, bb) = (r % b[2], r / b[2] % b[1], r / b[2] / b[1]);
            let at = p
                .precision
                .bias
                .as_ref()
                .map_or(0, |x| x.offset(bb, h, l, j));
            format!("element {i} is {}; a bias is finite or -inf", read_f32(at)?)
        }
        _ => format!(
            "element {i} is {}; every precision must be finite and > 0",
            read_f32(i)?
        ),
    })
}

/// The key split of a call: (S, keys per split), S = 1 (and 0 keys) for none. `forced`: the
/// spec's count (S chunks of equal whole key tiles, some empty when S exceeds them); None: split
/// when Lq ≤ 16 and the `blocks` (batch × head × row tile) are fewer than two per multiprocessor:
/// S = min(⌈Lk / chunk_min⌉, ⌈2 SMs / blocks⌉) with chunk_min = 256 keys rounded up to the tile
/// `bc`, then the chunk ⌈Lk / S⌉ rounded up to the tile and S = the chunks that hold keys.
pub(crate) fn key_split(
    forced: Option<u32>,
    lq: usize,
    lk: usize,
    blocks: usize,
    sms: usize,
    bc: usize,
) -> (usize, usize) {
    let s = match forced {
        Some(n) => n as usize,
        None if lq <= DECODE_MAX_LQ => {
            let chunk_min = DECODE_MIN_CHUNK.next_multiple_of(bc);
            lk.div_ceil(chunk_min)
                .min((2 * sms).div_ceil(blocks.max(1)))
        }
        None => 1,
    };
    if s <= 1 {
        return (1, 0);
    }
    let chunk = lk.div_ceil(s).next_multiple_of(bc);
    let s = if forced.is_some() {
        s
    } else {
        lk.div_ceil(chunk)
    };
    if s <= 1 { (1, 0) } else { (s, chunk) }
}

/// Whether every tensor's base address and strides allow 16-byte loads and stores.
pub(crate) fn aligned<T: Element>(ts: &[(u64, [usize; 3])]) -> bool {
    let size = std::mem::size_of::<T>();
    ts.iter()
        .all(|(addr, s)| addr % 16 == 0 && s.iter().all(|x| (x * size).is_multiple_of(16)))
}

/// What every attention kernel limits: the head dims (HEAD_DIMS) and B, Hq within gridDim.y/z.
pub(crate) fn check_dims(d: &Dims) -> Result<()> {
    for (name, v) in [("D", d.d), ("Dv", d.dv)] {
        if !HEAD_DIMS.contains(&v) {
            return Err(Error::Unsupported(format!(
                "head dim {name} = {v}: the GPU kernels take {HEAD_DIMS:?} (the CPU device takes any)"
            )));
        }
    }
    if d.hq > GRID_YZ || d.b > GRID_YZ {
        return Err(Error::Unsupported(format!(
            "B = {} and Hq = {} must each be at most {GRID_YZ} on a GPU",
            d.b, d.hq
        )));
    }
    Ok(())
}

/// Checks what only the GPU path limits, scans the inputs if asked, and launches.
pub(crate) fn forward<T: Element>(
    p: &Problem<'_, '_, T>,
    out: AttentionOutputs<'_, T>,
    stream: Stream,
) -> Result<()> {
    let d = p.dims;
    let dev = p.q.data.device();
    check_dims(&d)?;
    let size = std::mem::size_of::<T>();
    let Tile {
        warps,
        smem,
        mt,
        bc,
    } = tile(size, d.d, d.dv, dev.warp_size());
    if smem > dev.max_shared_per_block() {
        return Err(Error::Unsupported(format!(
            "the attention kernel for D = {}, Dv = {} needs {smem} bytes of shared memory per block; \
             the device allows {}",
            d.d,
            d.dv,
            dev.max_shared_per_block()
        )));
    }
    // The grid's batches (z), rows and keys per batch: with packed sequences, S sequences of at
    // most max_q rows and max_k keys (the blocks past a sequence's own length exit at once).
    let (batches, lq, lk) = match &p.precision.varlen {
        Some(vl) => (vl.sequences(), vl.max_q, vl.max_k),
        None => (d.b, d.lq, d.lk),
    };
    if batches > GRID_YZ {
        return Err(Error::Unsupported(format!(
            "{batches} packed sequences: at most {GRID_YZ} on a GPU"
        )));
    }
    let rows = 16 * mt * warps;
    let tiles = lq.div_ceil(rows);
    let (splits, chunk) = key_split(
        p.spec.key_splits,
        lq,
        lk,
        batches * d.hq * tiles,
        dev.multiprocessor_count(),
        bc,
    );
    // Unsplit: one split over every key (the kernels clamp to it without a branch).
    let chunk = if splits > 1 {
        chunk
    } else {
        lk.next_multiple_of(bc)
    };
    let grid_x = tiles
        .checked_mul(splits)
        .filter(|&g| g <= i32::MAX as usize && splits.saturating_mul(chunk) <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{splits} key splits of {chunk} keys over {tiles} row tiles exceed the grid's 32-bit sizes"
            ))
        })?;
    if p.spec.check_inputs {
        scan_inputs(p, dev, stream)?;
    }
    let x = AttnScoreInputs::new(p.precision);
    if x.row_extra() {
        // A bias or mask varying over Lq: not in the fused kernels' hot loop (NOTES.md, issue 23).
        return forward_rows(p, &out, stream);
    }
    let tau = p.spec.tau(d.d) as f32;
    let (q, k, v) = (p.q, p.k, p.v);
    let n_rows = d.b * d.hq * d.lq;
    // With a split: the parts [S, B, Hq, Lq, Dv] (T), then lse and e parts [S, B, Hq, Lq] (f32),
    // freed (stream-ordered) after the merge.
    let workspace = if splits > 1 {
        let o_bytes = splits * n_rows * d.dv * size;
        Some((
            Scratch::new(dev, o_bytes + 8 * splits * n_rows, stream)?,
            o_bytes,
        ))
    } else {
        None
    };
    let (o_addr, o_stride, lse_addr, e_addr) = match &workspace {
        Some((ws, o_bytes)) => {
            let lse = ws.addr + *o_bytes as u64;
            (
                ws.addr,
                [d.hq * d.lq * d.dv, d.lq * d.dv, d.dv],
                lse,
                if out.e.is_some() {
                    lse + 4 * (splits * n_rows) as u64
                } else {
                    0
                },
            )
        }
        None => (
            out.o.data.addr,
            out.o.strides,
            out.lse.as_ref().map_or(0, |v| v.addr),
            out.e.as_ref().map_or(0, |v| v.addr),
        ),
    };
    let vec_loads = aligned::<T>(&[
        (q.data.addr(), q.strides),
        (k.data.addr(), k.strides),
        (v.data.addr(), v.strides),
        (o_addr, o_stride),
    ]);
    let mut params = AttnParams {
        q: q.data.addr(),
        k: k.data.addr(),
        v: v.data.addr(),
        o: o_addr,
        pi_head: p.precision.head.as_ref().map_or(0, |v| v.addr()),
        pi_key: p.precision.key.as_ref().map_or(0, |v| v.addr()),
        kv_len: p.kv_len.map_or(0, |v| v.addr()),
        lse: lse_addr,
        e: e_addr,
        q_stride: strides(q.strides),
        k_stride: strides(k.strides),
        v_stride: strides(v.strides),
        o_stride: strides(o_stride),
        split_o: (n_rows * d.dv) as i64,
        split_row: n_rows as i64,
        x,
        b: to_i32("B", batches)?,
        hq: to_i32("Hq", d.hq)?,
        hkv: to_i32("Hkv", d.hkv)?,
        lq: to_i32("Lq", d.lq)?,
        lk: to_i32("Lk", d.lk)?,
        family: p.spec.score.code(),
        tau,
        nu: match p.spec.score {
            Score::StudentT(nu) => nu,
            _ => 1.0,
        },
        causal: p.spec.is_causal() as i32,
        window: p.spec.window.map_or(0, |w| w.min(i32::MAX as u32) as i32),
        normalizer: p.spec.normalizer as i32,
        vec_loads: vec_loads as i32,
        smem: smem as i32,
        split: chunk as i32,
        tiles: to_i32("row tiles", tiles)?,
        key_extra: x.key_extra() as i32,
        row_extra: 0,
        pad_: 0,
    };
    let cfg = LaunchConfig {
        grid: (grid_x as u32, d.hq as u32, batches as u32),
        block: (warps * dev.warp_size()) as u32,
        smem: smem as u32,
    };
    let module = match T::DTYPE.suffix() {
        "f32" => "attention/forward_f32",
        "f16" => "attention/forward_f16",
        _ => "attention/forward_bf16",
    };
    let kernel = format!("attn_fwd_{}_d{}_v{}", T::DTYPE.suffix(), d.d, d.dv);
    dev.launch(module, &kernel, cfg, &mut [arg(&mut params)], stream)?;
    if workspace.is_none() {
        return Ok(());
    }
    gpu_merge::launch::<T>(
        dev,
        &MergeArgs {
            o_parts: o_addr,
            lse_parts: lse_addr,
            e_parts: e_addr,
            o: out.o.data.addr,
            o_stride: out.o.strides,
            lse: out.lse.as_ref().map_or(0, |v| v.addr),
            e: out.e.as_ref().map_or(0, |v| v.addr),
            shape: [d.b, d.hq, d.lq, d.dv],
            splits,
        },
        stream,
    )
}

/// `AttnProbsParams` of kernels/attention/probabilities.cu, field for field.
#[repr(C)]
struct ProbsParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    e: u64,
    pi_head: u64,
    pi_key: u64,
    kv_len: u64,
    w: u64,
    x: AttnScoreInputs,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    b: i32,
    hq: i32,
    hkv: i32,
    lq: i32,
    lk: i32,
    d: i32,
    family: i32,
    tau: f32,
    nu: f32,
    causal: i32,
    window: i32,
    normalizer: i32,
    seqs: i32,
    dv: i32,
}

/// The limits of the row kernels (probabilities.cu: one block per (row, head, batch)).
fn check_row_grid(d: &Dims) -> Result<()> {
    if d.hq > GRID_YZ || d.b > GRID_YZ {
        return Err(Error::Unsupported(format!(
            "B = {} and Hq = {} must each be at most {GRID_YZ} on a GPU",
            d.b, d.hq
        )));
    }
    Ok(())
}

/// The parameters of probabilities.cu's kernels for `p` (outputs 0: the caller sets them).
fn probs_params<T: Element>(p: &Problem<'_, '_, T>) -> Result<ProbsParams> {
    let d = p.dims;
    let vl = p.precision.varlen.as_ref();
    Ok(ProbsParams {
        q: p.q.data.addr(),
        k: p.k.data.addr(),
        v: p.v.data.addr(),
        o: 0,
        lse: 0,
        e: 0,
        pi_head: p.precision.head.as_ref().map_or(0, |v| v.addr()),
        pi_key: p.precision.key.as_ref().map_or(0, |v| v.addr()),
        kv_len: p.kv_len.map_or(0, |v| v.addr()),
        w: 0,
        x: AttnScoreInputs::new(p.precision),
        q_stride: strides(p.q.strides),
        k_stride: strides(p.k.strides),
        v_stride: strides(p.v.strides),
        o_stride: [0; 3],
        b: to_i32("B", d.b)?,
        hq: to_i32("Hq", d.hq)?,
        hkv: to_i32("Hkv", d.hkv)?,
        lq: to_i32("Lq", d.lq)?,
        lk: to_i32("Lk", d.lk)?,
        d: to_i32("D", d.d)?,
        family: p.spec.score.code(),
        tau: p.spec.tau(d.d) as f32,
        nu: match p.spec.score {
            Score::StudentT(nu) => nu,
            _ => 1.0,
        },
        causal: p.spec.is_causal() as i32,
        window: p.spec.window.map_or(0, |w| w.min(i32::MAX as u32) as i32),
        normalizer: (p.spec.normalizer && p.spec.score.is_distance()) as i32,
        seqs: to_i32("sequences", vl.map_or(0, |v| v.sequences()))?,
        dv: to_i32("Dv", d.dv)?,
    })
}

/// Launches `attn_<name>_<dtype>` of probabilities.cu: one block per (row, head, batch); packed,
/// every row of batch 0 finds its own sequence (grid z = 1).
fn launch_rows<T: Element>(
    p: &Problem<'_, '_, T>,
    name: &str,
    params: &mut ProbsParams,
    stream: Stream,
) -> Result<()> {
    let d = p.dims;
    let cfg = LaunchConfig {
        grid: (d.lq as u32, d.hq as u32, d.b as u32),
        block: PROBS_THREADS,
        smem: 0,
    };
    let kernel = format!("attn_{name}_{}", T::DTYPE.suffix());
    p.q.data
        .device()
        .launch(PROBS, &kernel, cfg, &mut [arg(params)], stream)
}

/// The attention weights `[B, Hq, Lq, Lk]` f32 into the device memory at `w` (checked by the
/// caller): scans the inputs if asked, then one block per (row, head, batch) of
/// kernels/attention/probabilities.cu. Any head dim (the kernel loops over D).
pub(crate) fn probabilities<T: Element>(
    p: &Problem<'_, '_, T>,
    w: u64,
    stream: Stream,
) -> Result<()> {
    check_row_grid(&p.dims)?;
    if p.spec.check_inputs {
        scan_inputs(p, p.q.data.device(), stream)?;
    }
    let mut params = probs_params(p)?;
    params.w = w;
    launch_rows(p, "probs", &mut params, stream)
}

/// The forward of a call whose bias or mask varies over Lq: the row kernel of probabilities.cu
/// (o, lse and e of one row per block, unsplit), inputs scanned by the caller.
fn forward_rows<T: Element>(
    p: &Problem<'_, '_, T>,
    out: &AttentionOutputs<'_, T>,
    stream: Stream,
) -> Result<()> {
    check_row_grid(&p.dims)?;
    let mut params = probs_params(p)?;
    params.o = out.o.data.addr;
    params.o_stride = strides(out.o.strides);
    params.lse = out.lse.as_ref().map_or(0, |v| v.addr);
    params.e = out.e.as_ref().map_or(0, |v| v.addr);
    launch_rows(p, "rows", &mut params, stream)
}

#[cfg(test)]
mod tests {
    use super::key_split;

    #[test]
    fn key_split_rule() {
        // Decode, few blocks: min(⌈Lk / 256⌉, ⌈2 SMs / blocks⌉) chunks of whole tiles.
        assert_eq!(key_split(None, 1, 2000, 4, 132, 64), (8, 256));
        assert_eq!(key_split(None, 16, 300, 4, 8, 64), (2, 192));
        assert_eq!(key_split(None, 1, 5000, 100, 132, 64), (3, 1728));
        // Enough blocks, a short cache, or too many rows: no split.
        assert_eq!(key_split(None, 1, 2000, 264, 132, 64), (1, 0));
        assert_eq!(key_split(None, 1, 256, 4, 132, 64), (1, 0));
        assert_eq!(key_split(None, 17, 2000, 4, 132, 64), (1, 0));
        // Forced: n chunks whatever Lq, empty ones kept; 1 never splits.
        assert_eq!(key_split(Some(8), 1, 70, 4, 132, 64), (8, 64));
        assert_eq!(key_split(Some(3), 100, 1, 4, 132, 32), (3, 32));
        assert_eq!(key_split(Some(1), 1, 2000, 1, 132, 64), (1, 0));
    }
}
