//! Attention backward on a GPU: the one dispatch point of `kernels/attention/backward_<dtype>.cu`
//! (`attn_bwd_dq_*`, `attn_bwd_kv_*`, `attn_bwd_dk_*`) and backward_reduce.cu.
//!
//! Order on the stream: the dq kernel (writes Δ and the per-tile partials of dπ_h and dν), the
//! dk/dv kernel (reads Δ; with D + Dv > 256 it does dv and dπ_j, and `attn_bwd_dk_*` then dk),
//! then the dβ kernel (backward_dbias.cu, reads Δ) when dβ is asked for, then the reduce kernel
//! when dπ_h or dν is asked for. The workspace is stream-ordered scratch.
//!
//! The optional score inputs (bias, mask, per-head ν, packed sequences) travel in the embedded
//! `AttnScoreInputs` (src/attention/gpu_inputs.rs); with packed sequences the grids' z runs over
//! the S sequences (`seqs`) and their x over the longest one's tiles (`max_q`, `max_k`).

use super::Score;
use super::backward::{BackwardProblem, Gradients};
use super::gpu::{aligned, arg, check_dims, scan_inputs, strides, to_i32};
use super::gpu_inputs::AttnScoreInputs;
use crate::backend::{LaunchConfig, Scratch, Stream};
use crate::element::Element;
use crate::error::{Error, Result};

/// `AttnBwdParams` of kernels/attention/backward_params.cuh, field for field.
#[repr(C)]
struct AttnBwdParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    d_o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    pi_head: u64,
    pi_key: u64,
    kv_len: u64,
    lse: u64,
    e: u64,
    d_e: u64,
    delta: u64,
    part_head: u64,
    part_nu: u64,
    head_nu: u64,
    dpi_head: u64,
    dpi_key: u64,
    dnu: u64,
    d_lse: u64,
    dbias: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    do_stride: [i64; 3],
    dq_stride: [i64; 3],
    dk_stride: [i64; 3],
    dv_stride: [i64; 3],
    inputs: AttnScoreInputs,
    b: i32,
    hq: i32,
    hkv: i32,
    lq: i32,
    lk: i32,
    dim_d: i32,
    dim_dv: i32,
    family: i32,
    tau: f32,
    nu: f32,
    causal: i32,
    window: i32,
    normalizer: i32,
    n_qtiles: i32,
    smem: i32,
    vec_loads: i32,
    bias_n: [i32; 3],
    seqs: i32,
}

/// ATTN_BWD_REDUCE_THREADS of backward_reduce.cu.
const REDUCE_THREADS: u32 = 256;

/// ATTN_BWD_DBIAS_THREADS of backward_dbias.cu: keys per dβ block.
const DBIAS_THREADS: usize = 64;

/// The compiled head-dim bucket of `d` (backward_params.cuh: 64, 128, 256).
fn bucket(d: usize) -> usize {
    match d {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// `attn_bwd_cols` of backward_params.cuh.
fn cols(d: usize, dv: usize) -> usize {
    if d + dv <= 256 { d + dv } else { d.max(dv) }
}

/// `attn_bwd_smem` of backward_params.cuh.
fn smem(size: usize, d: usize, dv: usize, warps: usize, bt: usize) -> usize {
    let pad = 16 / size;
    let rows = 16 * warps;
    size * ((rows + bt) * (d + pad + dv + pad) + 2 * rows * (bt + pad)) + 24 * rows.max(bt)
}

/// `attn_bwd_tile` of backward_params.cuh: (warps, streamed rows, shared bytes) for the buckets,
/// or None (f32 with D = Dv = 256).
pub(crate) fn tile(size: usize, d: usize, dv: usize) -> Option<(usize, usize, usize)> {
    const CANDIDATES: [(usize, usize); 5] = [(4, 64), (4, 32), (2, 32), (2, 16), (1, 16)];
    CANDIDATES.iter().find_map(|&(w, bt)| {
        let s = smem(size, d, dv, w, bt);
        (s <= 65536 && 2 * bt + cols(d, dv) <= 320).then_some((w, bt, s))
    })
}

/// Checks what only the GPU path limits, scans the inputs if asked, and launches.
pub(crate) fn backward<T: Element>(
    p: &BackwardProblem<'_, '_, T>,
    out: Gradients<'_, T>,
    stream: Stream,
) -> Result<()> {
    let f = &p.fwd;
    let dm = f.dims;
    let dev = f.q.data.device();
    check_dims(&dm)?;
    let size = std::mem::size_of::<T>();
    let (kd, kdv) = (bucket(dm.d), bucket(dm.dv));
    let Some((warps, _, smem)) = tile(size, kd, kdv) else {
        return Err(Error::Unsupported(format!(
            "attention backward in {} with D = {} and Dv = {}: no tile fits 64 KiB of shared memory \
             (f32 takes D + Dv <= 384 on a GPU; f16/bf16 take every pair)",
            T::DTYPE.suffix(),
            dm.d,
            dm.dv
        )));
    };
    if smem > dev.max_shared_per_block() {
        return Err(Error::Unsupported(format!(
            "the attention backward kernels for D = {}, Dv = {} need {smem} bytes of shared memory \
             per block; the device allows {}",
            dm.d,
            dm.dv,
            dev.max_shared_per_block()
        )));
    }
    if f.spec.check_inputs {
        scan_inputs(f, dev, stream)?;
    }
    let rows_per_block = 16 * warps;
    // Packed sequences: one grid slice per sequence, tiles for the longest.
    let varlen = f.precision.varlen.as_ref();
    let (seqs, max_q, max_k) = match varlen {
        Some(vl) => (vl.sequences(), vl.max_q, vl.max_k),
        None => (dm.b, dm.lq, dm.lk),
    };
    let n_qtiles = max_q.div_ceil(rows_per_block);
    let rows = dm.b * dm.hq * dm.lq;
    let parts = seqs * dm.hq * n_qtiles;
    // Δ [rows], the partials [2 parts] and the per-head dν sums [Hq], f32.
    let work = Scratch::new(dev, 4 * (rows + 2 * parts + dm.hq), stream)?;
    let delta = work.addr;
    let part_head = delta + 4 * rows as u64;
    let part_nu = part_head + 4 * parts as u64;
    let head_nu = part_nu + 4 * parts as u64;

    let inp = p.inputs;
    let mut params = AttnBwdParams {
        q: f.q.data.addr(),
        k: f.k.data.addr(),
        v: f.v.data.addr(),
        o: inp.o.data.addr(),
        d_o: inp.d_o.data.addr(),
        dq: out.dq.data.addr,
        dk: out.dk.data.addr,
        dv: out.dv.data.addr,
        pi_head: f.precision.head.as_ref().map_or(0, |v| v.addr()),
        pi_key: f.precision.key.as_ref().map_or(0, |v| v.addr()),
        kv_len: f.kv_len.map_or(0, |v| v.addr()),
        lse: inp.lse.addr(),
        e: inp.e.as_ref().map_or(0, |v| v.addr()),
        d_e: inp.d_e.as_ref().map_or(0, |v| v.addr()),
        delta,
        part_head,
        part_nu,
        head_nu,
        dpi_head: out.dpi_head.as_ref().map_or(0, |v| v.addr),
        dpi_key: out.dpi_key.as_ref().map_or(0, |v| v.addr),
        dnu: out.dnu.as_ref().map_or(0, |v| v.addr),
        d_lse: inp.d_lse.as_ref().map_or(0, |v| v.addr()),
        dbias: out.dbias.as_ref().map_or(0, |v| v.addr),
        q_stride: strides(f.q.strides),
        k_stride: strides(f.k.strides),
        v_stride: strides(f.v.strides),
        o_stride: strides(inp.o.strides),
        do_stride: strides(inp.d_o.strides),
        dq_stride: strides(out.dq.strides),
        dk_stride: strides(out.dk.strides),
        dv_stride: strides(out.dv.strides),
        inputs: AttnScoreInputs::new(f.precision),
        b: to_i32("B", dm.b)?,
        hq: to_i32("Hq", dm.hq)?,
        hkv: to_i32("Hkv", dm.hkv)?,
        lq: to_i32("Lq", dm.lq)?,
        lk: to_i32("Lk", dm.lk)?,
        dim_d: dm.d as i32,
        dim_dv: dm.dv as i32,
        family: f.spec.score.code(),
        tau: f.spec.tau(dm.d) as f32,
        nu: match f.spec.score {
            Score::StudentT(nu) => nu,
            _ => 1.0,
        },
        causal: f.spec.is_causal() as i32,
        window: f.spec.window.map_or(0, |w| w.min(i32::MAX as u32) as i32),
        normalizer: f.spec.normalizer as i32,
        n_qtiles: to_i32("Lq / rows per block", n_qtiles)?,
        smem: smem as i32,
        vec_loads: aligned::<T>(&[
            (f.q.data.addr(), f.q.strides),
            (f.k.data.addr(), f.k.strides),
            (f.v.data.addr(), f.v.strides),
            (inp.d_o.data.addr(), inp.d_o.strides),
        ]) as i32,
        bias_n: f.precision.bias.as_ref().map_or([1; 3], |b| {
            [b.shape[0] as i32, b.shape[1] as i32, b.shape[2] as i32]
        }),
        seqs: to_i32("sequences", seqs)?,
    };
    let module = match T::DTYPE.suffix() {
        "f32" => "attention/backward_f32",
        "f16" => "attention/backward_f16",
        _ => "attention/backward_bf16",
    };
    let name = |kind: &str| format!("attn_bwd_{kind}_{}_d{kd}_v{kdv}", T::DTYPE.suffix());
    let block = (warps * dev.warp_size()) as u32;
    let dq_cfg = LaunchConfig {
        grid: (n_qtiles as u32, dm.hq as u32, seqs as u32),
        block,
        smem: smem as u32,
    };
    dev.launch(module, &name("dq"), dq_cfg, &mut [arg(&mut params)], stream)?;
    let kv_cfg = LaunchConfig {
        grid: (
            max_k.div_ceil(rows_per_block) as u32,
            dm.hkv as u32,
            seqs as u32,
        ),
        block,
        smem: smem as u32,
    };
    dev.launch(module, &name("kv"), kv_cfg, &mut [arg(&mut params)], stream)?;
    if kd + kdv > 256 {
        // The dk pass (attn_bwd_kv then did dv and dπ_j only).
        dev.launch(module, &name("dk"), kv_cfg, &mut [arg(&mut params)], stream)?;
    }
    if params.dbias != 0 && dm.lk > 0 {
        // One block per (bias row, key tile), bias head, bias batch (backward_dbias.cu).
        let [nb, nh, nl] = params.bias_n.map(|x| x as usize);
        let x = nl
            .checked_mul(dm.lk.div_ceil(DBIAS_THREADS))
            .filter(|&x| x <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "dbias over {nl} rows of {} keys exceeds the grid",
                    dm.lk
                ))
            })?;
        let cfg = LaunchConfig {
            grid: (x as u32, nh as u32, nb as u32),
            block: DBIAS_THREADS as u32,
            smem: 0,
        };
        let module = match T::DTYPE.suffix() {
            "f32" => "f32",
            "f16" => "f16",
            _ => "bf16",
        };
        dev.launch(
            "attention/backward_dbias",
            &format!("attn_bwd_dbias_{module}"),
            cfg,
            &mut [arg(&mut params)],
            stream,
        )?;
    }
    if params.dpi_head != 0 || params.dnu != 0 {
        let cfg = LaunchConfig {
            grid: (1, 1, 1),
            block: REDUCE_THREADS,
            smem: 0,
        };
        dev.launch(
            "attention/backward_reduce",
            "attn_bwd_reduce",
            cfg,
            &mut [arg(&mut params)],
            stream,
        )?;
    }
    drop(work);
    Ok(())
}
