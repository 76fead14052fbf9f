//! LCA on a GPU: launches of kernels/lca/dictionary.cu and kernels/lca/solve.cu.
//!
//! The argument structs mirror those of kernels/lca/lca.cuh field for field.

use std::ffi::c_void;

use super::{LcaOutputs, LcaSpec, Store};
use crate::backend::{Device, DeviceBuffer, LaunchConfig, Scratch, Stream, View};
use crate::element::Element;
use crate::error::{Error, Result};

const DICTIONARY: &str = "lca/dictionary";
const SOLVE: &str = "lca/solve";
/// Threads per block of every LCA kernel (LCA_THREADS); a multiple of both warp sizes.
const THREADS: u32 = 256;
/// LCA_SMEM_BYTES_PER_UNIT and LCA_SMEM_BYTES_FIXED: u, c, val, idx per unit and 4 ints of meta,
/// the persistent kernel's dynamic shared memory.
const SMEM_PER_UNIT: usize = 16;
const SMEM_FIXED: usize = 16;
/// The stepped kernel's global state per sample: c, val, idx per unit (4-byte words), 4 of meta.
const STEPPED_STATE_PER_UNIT: usize = 3;
/// Samples per launch (one block each): within every vendor's grid limit.
const MAX_BLOCKS: usize = 1 << 20;
/// Room kept for the kernels' static shared memory.
const STATIC_SMEM_MARGIN: usize = 1024;
const GEMM_TILE: usize = 16;
/// Grid dimensions stay below every vendor's limit; kernels loop past them.
const MAX_GRID_X: usize = 1 << 20;

const MAX_GRID_Y: usize = 65535;

#[repr(C)]
struct GemmArgs {
    a: u64,
    b: u64,
    d: u64,
    c: u64,
    rows: i64,
    cols: i64,
    inner: i64,
    sa_row: i64,
    sa_col: i64,
    sb_row: i64,
    sb_col: i64,
    ldc: i64,
    ldd: i64,
    alpha: f32,
    beta: f32,
    diag: f32,
    pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SolveArgs {
    b: u64,
    xsq: u64,
    g: u64,
    u: u64,
    a: u64,
    energy: u64,
    active: u64,
    steps_done: u64,
    state: u64,
    m: i32,
    steps: i32,
    t_begin: i32,
    t_end: i32,
    threshold: i32,
    has_u0: i32,
    lambda: f32,
    eta: f32,
    tol: f32,
    tol_mode: i32,
}

impl SolveArgs {
    /// The same arguments for samples [first, first + count) of the batch.
    fn chunk(&self, first: usize, m: usize, steps: usize) -> SolveArgs {
        let f = first as u64;
        let row = |addr: u64, width: usize| {
            if addr == 0 {
                0
            } else {
                addr + f * width as u64 * 4
            }
        };
        SolveArgs {
            b: row(self.b, m),
            xsq: row(self.xsq, 1),
            u: row(self.u, m),
            a: row(self.a, m),
            energy: row(self.energy, steps),
            active: row(self.active, steps),
            steps_done: row(self.steps_done, 1),
            state: row(self.state, STEPPED_STATE_PER_UNIT * m + 4),
            ..*self
        }
    }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn blocks(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).clamp(1, MAX_GRID_X) as u32
}

fn kernel<T: Element>(name: &str) -> String {
    format!("{name}_{}", T::DTYPE.suffix())
}

/// C = alpha A B + beta D + diag I (see LcaGemmArgs).
fn gemm(dev: &Device, suffix_kernel: &str, mut args: GemmArgs, stream: Stream) -> Result<()> {
    let grid_x = (args.cols as usize).div_ceil(GEMM_TILE) as u32;
    let grid_y = (args.rows as usize)
        .div_ceil(GEMM_TILE)
        .clamp(1, MAX_GRID_Y) as u32;
    let cfg = LaunchConfig {
        grid: (grid_x, grid_y, 1),
        block: THREADS,
        smem: 0,
    };
    dev.launch(
        DICTIONARY,
        suffix_kernel,
        cfg,
        &mut [arg(&mut args)],
        stream,
    )
}

/// dst[i] = f32(src[i]) for `len` elements.
fn convert<T: Element>(dev: &Device, src: u64, dst: u64, len: usize, stream: Stream) -> Result<()> {
    let (mut src, mut dst, mut len_) = (src, dst, len as i64);
    let cfg = LaunchConfig {
        grid: (blocks(len, THREADS as usize * 4), 1, 1),
        block: THREADS,
        smem: 0,
    };
    let params = &mut [arg(&mut src), arg(&mut dst), arg(&mut len_)];
    dev.launch(DICTIONARY, &kernel::<T>("lca_convert"), cfg, params, stream)
}

/// out[r] = |x[r, :]|^2 (f64) for `rows` rows of `cols`.
fn row_sqnorm<T: Element>(
    dev: &Device,
    x: u64,
    out: u64,
    rows: usize,
    cols: usize,
    stream: Stream,
) -> Result<()> {
    let (mut x, mut out, mut rows_, mut cols_) = (x, out, rows as i64, cols as i64);
    let cfg = LaunchConfig {
        grid: (rows.clamp(1, MAX_GRID_X) as u32, 1, 1),
        block: THREADS,
        smem: 0,
    };
    let name = kernel::<T>("lca_row_sqnorm");
    dev.launch(
        DICTIONARY,
        &name,
        cfg,
        &mut [arg(&mut x), arg(&mut out), arg(&mut rows_), arg(&mut cols_)],
        stream,
    )
}

/// Column norms of Φ (f32 `[n, m]`), normalising the columns in place when asked.
fn col_norms(
    dev: &Device,
    phi: u64,
    norms: u64,
    n: usize,
    m: usize,
    normalize: bool,
    stream: Stream,
) -> Result<()> {
    let (mut phi, mut norms, mut n_, mut m_, mut norm) =
        (phi, norms, n as i64, m as i64, normalize as i32);
    let cfg = LaunchConfig {
        grid: (blocks(m, THREADS as usize), 1, 1),
        block: THREADS,
        smem: 0,
    };
    dev.launch(
        DICTIONARY,
        "lca_col_norms",
        cfg,
        &mut [
            arg(&mut phi),
            arg(&mut norms),
            arg(&mut n_),
            arg(&mut m_),
            arg(&mut norm),
        ],
        stream,
    )
}

/// G = ΦᵀΦ − I.
fn gram(dev: &Device, phi: u64, gram: u64, n: usize, m: usize, stream: Stream) -> Result<()> {
    let (n, m) = (n as i64, m as i64);
    let args = GemmArgs {
        a: phi,
        b: phi,
        d: 0,
        c: gram,
        rows: m,
        cols: m,
        inner: n,
        sa_row: 1,
        sa_col: m,
        sb_row: m,
        sb_col: 1,
        ldc: m,
        ldd: 0,
        alpha: 1.0,
        beta: 0.0,
        diag: -1.0,
        pad: 0,
    };
    gemm(dev, "lca_gemm_f32", args, stream)
}

/// `len` f32 values on the device, widened, after `stream`.
fn download_f32(dev: &Device, addr: u64, len: usize, stream: Stream) -> Result<Vec<f64>> {
    let view = unsafe { View::<f32>::from_raw(dev, addr, len) };
    Ok(view
        .to_vec_on(stream)?
        .into_iter()
        .map(|v| v as f64)
        .collect())
}

/// Converts Φ to f32 on the device, computes G and the column norms.
pub(super) fn prepare<T: Element>(
    phi: &View<'_, T>,
    n: usize,
    m: usize,
    stream: Stream,
) -> Result<(Store, Vec<f64>)> {
    let dev = phi.device();
    let mut phi32 = dev.alloc::<f32>(n * m)?;
    let mut g = dev.alloc::<f32>(m * m)?;
    let norms = Scratch::new(dev, m * 4, stream)?;
    convert::<T>(dev, phi.addr(), phi32.view_mut().addr, n * m, stream)?;
    col_norms(dev, phi32.addr(), norms.addr, n, m, false, stream)?;
    gram(dev, phi32.addr(), g.view_mut().addr, n, m, stream)?;
    let norms = download_f32(dev, norms.addr, m, stream)?;
    Ok((
        Store::Gpu {
            phi: phi32,
            gram: g,
        },
        norms,
    ))
}

/// Rows whose f64 sum of squares (lca_row_sqnorm) is not finite hold NaN or Inf: no finite f32
/// row overflows it.
fn check_rows_finite(dev: &Device, name: &str, sq: u64, rows: usize, stream: Stream) -> Result<()> {
    let sums = unsafe { View::<f64>::from_raw(dev, sq, rows) }.to_vec_on(stream)?;
    for (r, v) in sums.into_iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::invalid(name, format!("row {r} holds NaN or Inf")));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn solve<T: Element>(
    dev: &Device,
    phi: &DeviceBuffer<f32>,
    g: &DeviceBuffer<f32>,
    n: usize,
    m: usize,
    batch: usize,
    spec: &LcaSpec,
    x: &View<'_, T>,
    u0: Option<&View<'_, f32>>,
    out: LcaOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let xsq = Scratch::new(dev, batch * 8, stream)?;
    row_sqnorm::<T>(dev, x.addr(), xsq.addr, batch, n, stream)?;
    if spec.check_finite {
        check_rows_finite(dev, "x", xsq.addr, batch, stream)?;
        if let Some(u0) = u0 {
            let sq = Scratch::new(dev, batch * 8, stream)?;
            row_sqnorm::<f32>(dev, u0.addr(), sq.addr, batch, m, stream)?;
            check_rows_finite(dev, "u0", sq.addr, batch, stream)?;
        }
    }
    // Everything is valid: from here on the outputs are written.
    let b = Scratch::new(dev, batch * m * 4, stream)?;
    let args = GemmArgs {
        a: x.addr(),
        b: phi.addr(),
        d: 0,
        c: b.addr,
        rows: batch as i64,
        cols: m as i64,
        inner: n as i64,
        sa_row: n as i64,
        sa_col: 1,
        sb_row: m as i64,
        sb_col: 1,
        ldc: m as i64,
        ldd: 0,
        alpha: 1.0,
        beta: 0.0,
        diag: 0.0,
        pad: 0,
    };
    gemm(dev, &kernel::<T>("lca_gemm"), args, stream)?;

    let steps_scratch;
    let steps_done = match &out.steps {
        Some(s) => s.addr,
        None => {
            steps_scratch = Scratch::new(dev, batch * 4, stream)?;
            steps_scratch.addr
        }
    };
    // The kernels read u0 from the output u, so the caller's u0 is never written.
    if let Some(u0) = u0
        && u0.addr() != out.u.addr
    {
        unsafe { dev.copy_dtod(out.u.addr, u0.addr(), batch * m * 4, stream)? };
    }
    let trace = out.energy.is_some() || out.active.is_some();
    let args = SolveArgs {
        b: b.addr,
        xsq: xsq.addr,
        g: g.addr(),
        u: out.u.addr,
        a: out.a.addr,
        energy: out.energy.as_ref().map_or(0, |v| v.addr),
        active: out.active.as_ref().map_or(0, |v| v.addr),
        steps_done,
        state: 0,
        m: m as i32,
        steps: spec.steps as i32,
        t_begin: 0,
        t_end: spec.steps as i32,
        threshold: spec.threshold as i32,
        has_u0: u0.is_some() as i32,
        lambda: spec.lambda,
        eta: spec.eta,
        tol: spec.tol,
        tol_mode: spec.tol_mode as i32,
    };
    let steps = spec.steps as usize;
    let suffix = if trace { "_trace" } else { "" };
    if fits_on_chip(dev, m) {
        // All T steps in one launch, the state in shared memory.
        let smem = (SMEM_PER_UNIT * m + SMEM_FIXED) as u32;
        for first in (0..batch).step_by(MAX_BLOCKS) {
            let count = (batch - first).min(MAX_BLOCKS);
            let cfg = LaunchConfig {
                grid: (count as u32, 1, 1),
                block: THREADS,
                smem,
            };
            let mut chunk = args.chunk(first, m, steps);
            dev.launch(
                SOLVE,
                &format!("lca_solve_persistent{suffix}"),
                cfg,
                &mut [arg(&mut chunk)],
                stream,
            )?;
        }
        return Ok(());
    }
    // Too wide for shared memory: the state in global memory, one launch per step.
    let state = Scratch::new(dev, batch * (STEPPED_STATE_PER_UNIT * m + 4) * 4, stream)?;
    let args = SolveArgs {
        state: state.addr,
        ..args
    };
    let step_kernel = format!("lca_solve_stepped{suffix}");
    for first in (0..batch).step_by(MAX_BLOCKS) {
        let count = (batch - first).min(MAX_BLOCKS);
        let cfg = LaunchConfig {
            grid: (count as u32, 1, 1),
            block: THREADS,
            smem: 0,
        };
        let chunk = args.chunk(first, m, steps);
        let mut init = SolveArgs {
            t_begin: 0,
            t_end: 0,
            ..chunk
        };
        dev.launch(
            SOLVE,
            "lca_solve_stepped_init",
            cfg,
            &mut [arg(&mut init)],
            stream,
        )?;
        for t in 0..spec.steps as i32 {
            let mut step = SolveArgs {
                t_begin: t,
                t_end: t + 1,
                ..chunk
            };
            dev.launch(SOLVE, &step_kernel, cfg, &mut [arg(&mut step)], stream)?;
        }
    }
    Ok(())
}

/// Whether codes of width m run in the persistent kernel on `dev` (state in shared memory).
fn fits_on_chip(dev: &Device, m: usize) -> bool {
    SMEM_PER_UNIT * m + SMEM_FIXED + STATIC_SMEM_MARGIN <= dev.max_shared_per_block()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn learn<T: Element>(
    dev: &Device,
    phi: &mut DeviceBuffer<f32>,
    g: &mut DeviceBuffer<f32>,
    n: usize,
    m: usize,
    batch: usize,
    x: &View<'_, T>,
    a: &View<'_, f32>,
    lr: f32,
    stream: Stream,
) -> Result<()> {
    // Non-finite inputs would poison Φ for good: check first (reads back one float per sample).
    let sq = Scratch::new(dev, batch * 8, stream)?;
    row_sqnorm::<T>(dev, x.addr(), sq.addr, batch, n, stream)?;
    check_rows_finite(dev, "x", sq.addr, batch, stream)?;
    row_sqnorm::<f32>(dev, a.addr(), sq.addr, batch, m, stream)?;
    check_rows_finite(dev, "a", sq.addr, batch, stream)?;

    // R = x − a Φᵀ  [batch, n], with x converted to f32 first.
    let r = Scratch::new(dev, batch * n * 4, stream)?;
    convert::<T>(dev, x.addr(), r.addr, batch * n, stream)?;
    let (b_, n_, m_) = (batch as i64, n as i64, m as i64);
    let residual = GemmArgs {
        a: a.addr(),
        b: phi.addr(),
        d: r.addr,
        c: r.addr,
        rows: b_,
        cols: n_,
        inner: m_,
        sa_row: m_,
        sa_col: 1,
        sb_row: 1,
        sb_col: m_,
        ldc: n_,
        ldd: n_,
        alpha: -1.0,
        beta: 1.0,
        diag: 0.0,
        pad: 0,
    };
    gemm(dev, "lca_gemm_f32", residual, stream)?;
    // Φ' = Φ + (lr/B) Rᵀ a  [n, m], into a new buffer: Φ stays as it was if Φ' overflows.
    let mut next = dev.alloc::<f32>(n * m)?;
    let update = GemmArgs {
        a: r.addr,
        b: a.addr(),
        d: phi.addr(),
        c: next.view_mut().addr,
        rows: n_,
        cols: m_,
        inner: b_,
        sa_row: 1,
        sa_col: n_,
        sb_row: m_,
        sb_col: 1,
        ldc: m_,
        ldd: m_,
        alpha: lr / batch as f32,
        beta: 1.0,
        diag: 0.0,
        pad: 0,
    };
    gemm(dev, "lca_gemm_f32", update, stream)?;
    let norms = Scratch::new(dev, m * 4, stream)?;
    col_norms(dev, next.addr(), norms.addr, n, m, true, stream)?;
    if let Some(j) = download_f32(dev, norms.addr, m, stream)?
        .iter()
        .position(|v| !v.is_finite())
    {
        return Err(Error::invalid(
            "lr",
            format!(
                "the learning step overflowed f32 in column {j} of the dictionary (lower lr, or check the codes a); the dictionary is unchanged"
            ),
        ));
    }
    *phi = next;
    gram(dev, phi.addr(), g.view_mut().addr, n, m, stream)
}
