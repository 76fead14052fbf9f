//! Settling on a GPU: launches of kernels/settle/{persistent,stepped,tensors}.cu.
//!
//! The choice of kernel is automatic: the persistent kernel (all T steps in one launch, the
//! state of a 16-sample tile in shared memory) when 12 bytes (8 without momentum) × 16 samples ×
//! Σ_{l≥1} n_l fit in the device's shared memory per block; otherwise the stepped kernels (the
//! state in global memory; per step one launch per free layer, one per layer, one for the
//! energies). Both take networks of up to 16 layers (the kernels' layer table).
//! [`SettleArgs`] mirrors `SettleArgs` of kernels/settle/settle.cuh field for field.

// Layer numbers l = 1 … L index several per-layer arrays at once, as in the maths.
#![allow(clippy::needless_range_loop)]

use std::ffi::c_void;

use super::{Gradients, Init, Precision, Problem, Rule, SettleOutputs};
use crate::backend::{Device, LaunchConfig, Scratch, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};

const PERSISTENT: &str = "settle/persistent";
const STEPPED: &str = "settle/stepped";
const TENSORS: &str = "settle/tensors";
/// SETTLE_THREADS, SETTLE_MAX_LAYERS, SETTLE_TILE_ROWS, SETTLE_BLOCK_ROWS/COLS.
const THREADS: u32 = 128;
const MAX_LAYERS: usize = 16;
const TILE_ROWS: usize = 16;
const BLOCK: usize = 64;
/// Shared memory per unit and sample of the persistent kernel: x, eps, the compensation c and
/// (with momentum) v, in f32.
const SMEM_PER_UNIT: usize = 16;
const SMEM_PER_UNIT_NO_MOMENTUM: usize = 12;
/// Room kept for the kernels' static shared memory.
const STATIC_SMEM_MARGIN: usize = 1024;
/// Grid limits below every vendor's; kernels loop past them.
const MAX_GRID_X: usize = 1 << 20;
const MAX_GRID_Y: usize = 65535;
/// Blocks of the scan kernel (its output is read back: 2 floats per block).
const SCAN_BLOCKS: usize = 256;
/// SETTLE_EVAL / SETTLE_INIT.
const MODE_EVAL: i32 = 0;
const MODE_INIT: i32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LayerArgs {
    w: u64,
    b: u64,
    pi: u64,
    x: u64,
    eps: u64,
    v: u64,
    c: u64,
    pi_s: f32,
    alpha: f32,
    act: i32,
    n: i32,
    n_in: i32,
    ep_col: i32,
    pi_ld: i32,
    pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SettleArgs {
    layers: [LayerArgs; MAX_LAYERS],
    x0: u64,
    trace: u64,
    energy: u64,
    steps: u64,
    done: u64,
    prev: u64,
    start: u64,
    epart: u64,
    grad: u64,
    depth: i32,
    batch: i32,
    total_steps: i32,
    t: i32,
    layer: i32,
    mode: i32,
    clamped: i32,
    ep_cols: i32,
    eta: f32,
    beta: f32,
    tol: f32,
    tf32: i32,
}

fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn kernel<T: Element>(name: &str) -> String {
    format!("{name}_{}", T::DTYPE.suffix())
}

fn blocks(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).clamp(1, MAX_GRID_X) as u32
}

/// p[0..n] = value (f32 words; value 0 also zeroes i32/u32 memory).
fn fill(dev: &Device, addr: u64, n: usize, value: f32, stream: Stream) -> Result<()> {
    let (mut p, mut n_, mut v) = (addr, n as i64, value);
    let cfg = LaunchConfig {
        grid: (blocks(n, 256 * 4), 1, 1),
        block: 256,
        smem: 0,
    };
    dev.launch(
        TENSORS,
        "settle_fill",
        cfg,
        &mut [arg(&mut p), arg(&mut n_), arg(&mut v)],
        stream,
    )
}

/// The input scans of one call: every tensor is scanned into its own slots of one scratch
/// buffer (2 floats per block: non-finite count, minimum), and all results come back in a
/// single read: one wait for the stream, not one per tensor.
struct Scans<'d> {
    dev: &'d Device,
    stream: Stream,
    out: Scratch,
    /// Room in `out`, in blocks.
    capacity: usize,
    /// (name, whether the values must be > 0, blocks) per tensor, in slot order.
    entries: Vec<(String, bool, usize)>,
    /// Blocks used so far.
    used: usize,
}

impl<'d> Scans<'d> {
    /// Room for `tensors` scans.
    fn new(dev: &'d Device, tensors: usize, stream: Stream) -> Result<Self> {
        let capacity = tensors * SCAN_BLOCKS;
        Ok(Scans {
            dev,
            stream,
            out: Scratch::new(dev, capacity * 8, stream)?,
            capacity,
            entries: Vec::new(),
            used: 0,
        })
    }

    /// Enqueues the scan of `len` values of dtype E at `addr`; `positive` also requires > 0.
    fn add<E: Element>(
        &mut self,
        name: String,
        addr: u64,
        len: usize,
        positive: bool,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let grid = blocks(len, 256).min(SCAN_BLOCKS as u32);
        debug_assert!(self.used + grid as usize <= self.capacity);
        let (mut v, mut n, mut o) = (addr, len as i64, self.out.addr + 8 * self.used as u64);
        let cfg = LaunchConfig {
            grid: (grid, 1, 1),
            block: 256,
            smem: 0,
        };
        self.dev.launch(
            TENSORS,
            &kernel::<E>("settle_scan"),
            cfg,
            &mut [arg(&mut v), arg(&mut n), arg(&mut o)],
            self.stream,
        )?;
        self.entries.push((name, positive, grid as usize));
        self.used += grid as usize;
        Ok(())
    }

    /// Waits once, then the first failing tensor as an error.
    fn finish(self) -> Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let vals = unsafe { View::<f32>::from_raw(self.dev, self.out.addr, 2 * self.used) }
            .to_vec_on(self.stream)?;
        let mut slots = vals.chunks(2);
        for (name, positive, blocks) in &self.entries {
            let (mut bad, mut lo) = (0usize, f32::INFINITY);
            for slot in slots.by_ref().take(*blocks) {
                bad += slot[0] as usize;
                lo = lo.min(slot[1]);
            }
            if *positive && (bad > 0 || lo <= 0.0) {
                return Err(Error::invalid(
                    name.clone(),
                    format!(
                        "precisions must be finite and > 0; found {bad} NaN/Inf and a minimum of {lo}"
                    ),
                ));
            }
            if bad > 0 {
                return Err(Error::invalid(
                    name.clone(),
                    format!("holds {bad} NaN or Inf values"),
                ));
            }
        }
        Ok(())
    }
}

/// Everything the kernels read, checked before anything is written.
fn check_inputs<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    out: &SettleOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    if !p.spec.check_finite {
        return Ok(());
    }
    // At most: per layer precision, weight, bias; x0, target; the start of every layer.
    let mut scans = Scans::new(p.net.device(), 4 * p.net.depth() + 2, stream)?;
    for (i, layer) in p.net.layers().iter().enumerate() {
        if let Precision::Diagonal(v) | Precision::PerSample(v) = &layer.precision {
            scans.add::<f32>(format!("layers[{i}].precision"), v.addr(), v.len(), true)?;
        }
        let w = &layer.weight;
        scans.add::<T>(format!("layers[{i}].weight"), w.addr(), w.len(), false)?;
        if let Some(b) = &layer.bias {
            scans.add::<T>(format!("layers[{i}].bias"), b.addr(), b.len(), false)?;
        }
    }
    scans.add::<f32>("x0".into(), x0.addr(), x0.len(), false)?;
    if let Some(t) = target {
        scans.add::<f32>("target".into(), t.addr(), t.len(), false)?;
    }
    if p.spec.init == Init::FromOutputs {
        let top_free = p.net.depth() - p.clamped as usize;
        for (l, x) in out.x.iter().take(top_free).enumerate() {
            scans.add::<f32>(format!("x[{l}] (the start)"), x.addr, x.len(), false)?;
        }
    }
    scans.finish()
}

/// Whether the persistent kernel takes this network on `dev`, and its dynamic shared memory.
fn persistent_smem(dev: &Device, widths: &[usize], momentum: bool) -> Option<u32> {
    if widths.len() - 1 > MAX_LAYERS {
        return None;
    }
    let units: usize = widths[1..].iter().sum();
    let per_unit = if momentum {
        SMEM_PER_UNIT
    } else {
        SMEM_PER_UNIT_NO_MOMENTUM
    };
    let bytes = per_unit * TILE_ROWS * units;
    (bytes + STATIC_SMEM_MARGIN <= dev.max_shared_per_block()).then_some(bytes as u32)
}

pub(super) fn run<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    out: SettleOutputs<'_>,
    grads: Option<Gradients<'_>>,
    stream: Stream,
) -> Result<()> {
    let dev = p.net.device();
    let widths = p.net.widths();
    let depth = p.net.depth();
    let batch = p.batch;
    if depth > MAX_LAYERS {
        return Err(Error::Unsupported(format!(
            "settling networks of more than {MAX_LAYERS} layers on a GPU ({depth} given)"
        )));
    }
    check_inputs(p, x0, target, &out, stream)?;
    // Everything is valid: from here on the outputs are written.
    if let Some(t) = target {
        unsafe { dev.copy_dtod(out.x[depth - 1].addr, t.addr(), 4 * t.len(), stream)? };
    }
    let steps_scratch;
    let steps = match &out.steps {
        Some(s) => s.addr,
        None => {
            steps_scratch = Scratch::new(dev, batch * 4, stream)?;
            steps_scratch.addr
        }
    };
    let mut args = SettleArgs {
        layers: [LayerArgs::default(); MAX_LAYERS],
        x0: x0.addr(),
        trace: out.trace.as_ref().map_or(0, |v| v.addr),
        energy: out.energy.as_ref().map_or(0, |v| v.addr),
        steps,
        done: 0,
        prev: 0,
        start: 0,
        epart: 0,
        grad: 0,
        depth: depth as i32,
        batch: batch as i32,
        total_steps: p.spec.steps as i32,
        t: 0,
        layer: 0,
        mode: MODE_EVAL,
        clamped: p.clamped as i32,
        ep_cols: 0,
        eta: p.spec.eta,
        beta: p.spec.momentum,
        tol: p.spec.tol,
        tf32: p.spec.allow_tf32 as i32,
    };
    let mut ep_cols = 0;
    for (i, layer) in p.net.layers().iter().enumerate() {
        let (pi, pi_s, pi_ld) = match &layer.precision {
            Precision::Scalar(s) => (0, *s, 0),
            Precision::Diagonal(v) => (v.addr(), 1.0, 0),
            Precision::PerSample(v) => (v.addr(), 1.0, widths[i + 1] as i32),
        };
        args.layers[i] = LayerArgs {
            w: layer.weight.addr(),
            b: layer.bias.as_ref().map_or(0, |b| b.addr()),
            pi,
            x: out.x[i].addr,
            eps: out.eps[i].addr,
            v: 0,
            c: 0,
            pi_s,
            alpha: layer.activation.alpha(),
            act: layer.activation.code(),
            n: widths[i + 1] as i32,
            n_in: widths[i] as i32,
            ep_col: ep_cols as i32,
            pi_ld,
            pad: 0,
        };
        ep_cols += widths[i + 1].div_ceil(BLOCK);
    }
    args.ep_cols = ep_cols as i32;
    let init = match p.spec.init {
        Init::Feedforward => MODE_INIT,
        Init::FromOutputs => MODE_EVAL,
    };
    if let Some(smem) = persistent_smem(dev, widths, p.spec.momentum != 0.0) {
        let mut a = SettleArgs { mode: init, ..args };
        let cfg = LaunchConfig {
            grid: (batch.div_ceil(TILE_ROWS).clamp(1, MAX_GRID_X) as u32, 1, 1),
            block: THREADS,
            smem,
        };
        dev.launch(
            PERSISTENT,
            &kernel::<T>("settle_persistent"),
            cfg,
            &mut [arg(&mut a)],
            stream,
        )?;
    } else {
        stepped::<T>(dev, p, args, init, stream)?;
    }
    if p.spec.log_det && (args.energy != 0 || args.trace != 0) {
        let mut a = args;
        let cfg = LaunchConfig {
            grid: (blocks(batch, THREADS as usize), 1, 1),
            block: THREADS,
            smem: 0,
        };
        dev.launch(
            STEPPED,
            "settle_add_log_det",
            cfg,
            &mut [arg(&mut a)],
            stream,
        )?;
    }
    if let Some(g) = grads {
        gradients::<T>(dev, p, args, g, stream)?;
    }
    Ok(())
}

/// The grid of a stepped kernel over `rows` x `cols` in 64 x 64 tiles.
fn tile_cfg(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid: (
            blocks(cols, BLOCK),
            rows.div_ceil(BLOCK).clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block: THREADS,
        smem: 0,
    }
}

fn stepped<T: Element>(
    dev: &Device,
    p: &Problem<'_, '_, T>,
    mut args: SettleArgs,
    init: i32,
    stream: Stream,
) -> Result<()> {
    let widths = p.net.widths();
    let depth = p.net.depth();
    let batch = p.batch;
    let top_free = depth - p.clamped as usize;
    // Momentum per free layer, and the per-sample bookkeeping.
    // Momentum and the compensation of the state's updates per free layer, both zero.
    let mut momentum = Vec::with_capacity(2 * top_free);
    for l in 1..=top_free {
        for field in 0..2 {
            let buf = Scratch::new(dev, 4 * batch * widths[l], stream)?;
            fill(dev, buf.addr, batch * widths[l], 0.0, stream)?;
            if field == 0 {
                args.layers[l - 1].v = buf.addr;
            } else {
                args.layers[l - 1].c = buf.addr;
            }
            momentum.push(buf);
        }
    }
    let done = Scratch::new(dev, 4 * batch, stream)?;
    fill(dev, done.addr, batch, 0.0, stream)?;
    let prev = Scratch::new(dev, 4 * batch, stream)?;
    let start = Scratch::new(dev, 4 * batch, stream)?;
    let epart = Scratch::new(dev, 4 * batch * args.ep_cols as usize, stream)?;
    args.done = done.addr;
    args.prev = prev.addr;
    args.start = start.addr;
    args.epart = epart.addr;

    let forward = kernel::<T>("settle_forward");
    let backward = kernel::<T>("settle_backward");
    let launch = |name: &str, a: SettleArgs, cfg: LaunchConfig| {
        let mut a = a;
        dev.launch(STEPPED, name, cfg, &mut [arg(&mut a)], stream)
    };
    let end_cfg = LaunchConfig {
        grid: (blocks(batch, THREADS as usize), 1, 1),
        block: THREADS,
        smem: 0,
    };
    if init == MODE_INIT {
        for l in 1..=top_free {
            let a = SettleArgs {
                layer: l as i32,
                mode: MODE_INIT,
                ..args
            };
            launch(&forward, a, tile_cfg(batch, widths[l]))?;
        }
    }
    for t in 0..=p.spec.steps as i32 {
        if t > 0 {
            for l in 1..=top_free {
                let a = SettleArgs {
                    layer: l as i32,
                    t,
                    ..args
                };
                launch(&backward, a, tile_cfg(batch, widths[l]))?;
            }
        }
        for l in 1..=depth {
            let a = SettleArgs {
                layer: l as i32,
                t,
                mode: MODE_EVAL,
                ..args
            };
            launch(&forward, a, tile_cfg(batch, widths[l]))?;
        }
        launch("settle_step_end", SettleArgs { t, ..args }, end_cfg)?;
    }
    Ok(())
}

fn gradients<T: Element>(
    dev: &Device,
    p: &Problem<'_, '_, T>,
    args: SettleArgs,
    g: Gradients<'_>,
    stream: Stream,
) -> Result<()> {
    let widths = p.net.widths();
    for l in 1..=p.net.depth() {
        let mut a = SettleArgs {
            layer: l as i32,
            grad: g.weights[l - 1].addr,
            ..args
        };
        dev.launch(
            STEPPED,
            &kernel::<T>("settle_grad_w"),
            tile_cfg(widths[l], widths[l - 1]),
            &mut [arg(&mut a)],
            stream,
        )?;
        let mut a = SettleArgs {
            layer: l as i32,
            grad: g.biases[l - 1].addr,
            ..args
        };
        let cfg = LaunchConfig {
            grid: (blocks(widths[l], THREADS as usize), 1, 1),
            block: THREADS,
            smem: 0,
        };
        dev.launch(STEPPED, "settle_grad_b", cfg, &mut [arg(&mut a)], stream)?;
        let Some(Some(gp)) = g.precisions.get(l - 1) else {
            continue;
        };
        let mut a = SettleArgs {
            layer: l as i32,
            grad: gp.addr,
            ..args
        };
        // A scalar precision's gradient is one block's reduction; the others one thread per
        // unit (per element for per-sample precisions).
        let work = match &p.net.layers()[l - 1].precision {
            Precision::Scalar(_) => 1,
            Precision::Diagonal(_) => widths[l],
            Precision::PerSample(_) => p.batch.saturating_mul(widths[l]),
        };
        let cfg = LaunchConfig {
            grid: (blocks(work, THREADS as usize), 1, 1),
            block: THREADS,
            smem: 0,
        };
        dev.launch(STEPPED, "settle_grad_pi", cfg, &mut [arg(&mut a)], stream)?;
    }
    Ok(())
}

/// All or nothing on the device, with no host wait: one pass flags (into `status`, or a scratch
/// word) any update that would be non-finite, then every SGD launch reads the flag and writes
/// nothing when it is set.
pub(super) fn sgd_all<T: Element>(
    params: &mut [ViewMut<'_, T>],
    grads: &[View<'_, f32>],
    lr: f32,
    status: Option<&mut ViewMut<'_, u32>>,
    stream: Stream,
    rule: Rule,
) -> Result<()> {
    let Some(first) = params.first() else {
        return Ok(());
    };
    let dev = first.device().clone();
    let scratch;
    let flag = match status {
        Some(s) => s.addr,
        None => {
            scratch = Scratch::new(&dev, 4, stream)?;
            scratch.addr
        }
    };
    fill(&dev, flag, 1, 0.0, stream)?;
    let passes = match rule {
        Rule::Plain => ["settle_check_update", "settle_sgd"],
        Rule::Log => ["settle_check_log_update", "settle_sgd_log"],
    };
    for pass in passes {
        for (param, grad) in params.iter().zip(grads) {
            let n = param.len();
            let (mut pp, mut g, mut n_, mut lr, mut f) =
                (param.addr, grad.addr(), n as i64, lr, flag);
            let cfg = LaunchConfig {
                grid: (blocks(n, 256 * 4), 1, 1),
                block: 256,
                smem: 0,
            };
            dev.launch(
                TENSORS,
                &kernel::<T>(pass),
                cfg,
                &mut [
                    arg(&mut pp),
                    arg(&mut g),
                    arg(&mut n_),
                    arg(&mut lr),
                    arg(&mut f),
                ],
                stream,
            )?;
        }
    }
    Ok(())
}
