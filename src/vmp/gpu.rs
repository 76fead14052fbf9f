//! VMP on a GPU: the model's tables in device memory, the input scans, and the launches of
//! kernels/vmp/{states,sequence,policies,learn}.cu.
//!
//! The model becomes two buffers (built once in [`DeviceModel::upload`]): `tab`, every f32
//! table at an offset, and `desc`, the int32 descriptor `VmpModel` of kernels/vmp/vmp.cuh
//! (mirrored word for word by [`desc_words`]) followed by the observation and action limits the
//! scans check against. The counts (pA | pB | pD) are a third buffer that learning updates in
//! place.
//!
//! State and sequence inference run one agent per thread with its beliefs in shared memory
//! when 128 threads' working sets fit (`work` = 0), else in a global workspace of the same
//! layout; policy inference runs one block per agent over chunks of policies sized to fit.

use std::ffi::c_void;

use super::model::{CountKind, Counts, Model, Tables};
use super::{
    FpiSpec, LearnSpec, Method, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec,
    StatesOutputs,
};
use crate::backend::{Device, DeviceBuffer, LaunchConfig, Scratch, Stream, View};
use crate::error::{Error, Result};

const STATES: &str = "vmp/states";
const SEQUENCE: &str = "vmp/sequence";
const POLICIES: &str = "vmp/policies";
const LEARN: &str = "vmp/learn";
/// VMP_THREADS, VMP_MAX_FACTORS, VMP_MAX_MODALITIES, VMP_MAX_DEPS of vmp.cuh.
const THREADS: u32 = 128;
const MAX_FACTORS: usize = 16;
const MAX_MODALITIES: usize = 16;
const MAX_DEPS: usize = 8;
/// Words of VmpModel: the header, then VmpFactor[16] and VmpModality[16].
const HEADER_WORDS: usize = 8;
const FACTOR_WORDS: usize = 10;
const MODALITY_WORDS: usize = 10 + MAX_DEPS;
const DESC_WORDS: usize =
    HEADER_WORDS + MAX_FACTORS * FACTOR_WORDS + MAX_MODALITIES * MODALITY_WORDS;
/// Shared memory kept for the kernels' static arrays (the descriptor copy, reductions).
const STATIC_SMEM: usize = 4 * DESC_WORDS + 2048;
/// A global workspace is capped at this many bytes (the grid shrinks to fit; kernels loop).
const MAX_WORK_BYTES: usize = 256 << 20;
const MAX_GRID: usize = 1 << 20;
/// Blocks of one input scan (one i64 each comes back).
const SCAN_BLOCKS: usize = 128;
/// Policies per block pass when their slots live in a global workspace.
const POLICY_CHUNK: usize = 64;
/// Agents per block of the learning pass, at most this many blocks.
const LEARN_CHUNKS: usize = 256;

fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn blocks(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).clamp(1, MAX_GRID) as u32
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "{name} = {v} exceeds the GPU kernels' 32-bit offsets"
        ))
    })
}

/// The model on a device.
pub(crate) struct DeviceModel {
    desc: DeviceBuffer<i32>,
    tab: DeviceBuffer<f32>,
    policies: Option<DeviceBuffer<i32>>,
    counts: Option<DeviceBuffer<f32>>,
    /// Offsets in `counts` per kind and tensor (None: the model has no such counts).
    count_off: [Option<Vec<usize>>; 3],
    /// Where pB's and pD's entries start in `counts`, and the total.
    b_start: usize,
    d_start: usize,
    entries: usize,
    sum_p: usize,
    /// Elements of each count tensor, per kind.
    count_len: [Vec<usize>; 3],
}

/// Appends `v` (as f32) to `tab` and returns its offset.
fn push(tab: &mut Vec<f32>, v: &[f64]) -> usize {
    let at = tab.len();
    tab.extend(v.iter().map(|&x| x as f32));
    at
}

/// Writes `fields` into the first descriptor words of `w` (each must fit an int32).
fn put(w: &mut [i32], fields: impl IntoIterator<Item = usize>) -> Result<()> {
    for (dst, v) in w.iter_mut().zip(fields) {
        *dst = to_i32("a model size or table offset", v)?;
    }
    Ok(())
}

/// The offset of counts tensor `i` of `kind` (0 pA, 1 pB, 2 pD), or -1 when the model has none.
fn count_at(count_off: &[Option<Vec<usize>>; 3], kind: usize, i: usize) -> i32 {
    count_off[kind].as_ref().map_or(-1, |o| o[i] as i32)
}

/// The descriptor words (VmpModel of vmp.cuh) and the f32 tables.
fn desc_words(
    t: &Tables,
    count_off: &[Option<Vec<usize>>; 3],
) -> Result<(Vec<i32>, Vec<f32>, usize)> {
    let (nf, nm) = (t.factors(), t.modalities());
    let mut tab = Vec::new();
    let mut words = vec![0i32; DESC_WORDS];
    let mut sum_p = 0;
    for f in 0..nf {
        let w = &mut words[HEADER_WORDS + f * FACTOR_WORDS..][..FACTOR_WORDS];
        let fields = [
            t.s[f],
            t.u[f],
            t.s_off[f],
            push(&mut tab, &t.b[f]),
            push(&mut tab, &t.ln_b[f]),
            push(&mut tab, &t.bn[f]),
            push(&mut tab, &t.ln_d[f]),
        ];
        put(w, fields)?;
        w[7] = count_at(count_off, 1, f);
        w[8] = count_at(count_off, 2, f);
    }
    for m in 0..nm {
        let base = HEADER_WORDS + MAX_FACTORS * FACTOR_WORDS + m * MODALITY_WORDS;
        let w = &mut words[base..][..MODALITY_WORDS];
        let fields = [
            t.o[m],
            t.deps[m].len(),
            t.size[m],
            t.o_off[m],
            push(&mut tab, &t.a[m]),
            push(&mut tab, &t.ln_a[m]),
            push(&mut tab, &t.h_a[m]),
            push(&mut tab, &t.c[m]),
        ];
        put(w, fields)?;
        w[8] = count_at(count_off, 0, m);
        w[9] = to_i32("sum of P_m", sum_p)?;
        for (j, &d) in t.deps[m].iter().enumerate() {
            w[10 + j] = d as i32;
        }
        sum_p += t.size[m];
    }
    let ln_e = push(&mut tab, &t.ln_e);
    let header = [
        nf,
        nm,
        t.sum_s,
        t.sum_o,
        t.num_policies,
        t.horizon,
        ln_e,
        sum_p,
    ];
    put(&mut words, header)?;
    to_i32("the model's table size", tab.len())?;
    // The limits the scans check indices against: O_m, then U_f.
    words.extend(t.o.iter().map(|&o| o as i32));
    words.extend(t.u.iter().map(|&u| u as i32));
    Ok((words, tab, sum_p))
}

impl DeviceModel {
    pub(crate) fn upload(dev: &Device, t: &Tables, counts: &Counts) -> Result<DeviceModel> {
        if t.factors() > MAX_FACTORS || t.modalities() > MAX_MODALITIES {
            return Err(Error::Unsupported(format!(
                "{} factors and {} modalities: the GPU kernels take at most {MAX_FACTORS} of each",
                t.factors(),
                t.modalities()
            )));
        }
        if let Some(m) = t.deps.iter().position(|d| d.len() > MAX_DEPS) {
            return Err(Error::Unsupported(format!(
                "modality {m} depends on {} factors: the GPU kernels take at most {MAX_DEPS}",
                t.deps[m].len()
            )));
        }
        // The counts: pA | pB | pD, each tensor at its offset.
        let mut flat: Vec<f32> = Vec::new();
        let mut count_off: [Option<Vec<usize>>; 3] = [None, None, None];
        let mut count_len: [Vec<usize>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut starts = [0usize; 3];
        for (k, list) in [&counts.a, &counts.b, &counts.d].into_iter().enumerate() {
            starts[k] = flat.len();
            if let Some(list) = list {
                count_off[k] = Some(list.iter().map(|c| push(&mut flat, c)).collect());
                count_len[k] = list.iter().map(|c| c.len()).collect();
            }
        }
        let entries = flat.len();
        to_i32("the number of Dirichlet counts", entries)?;
        let (words, tab, sum_p) = desc_words(t, &count_off)?;
        Ok(DeviceModel {
            desc: dev.upload(&words)?,
            tab: dev.upload(&tab)?,
            policies: if t.policies.is_empty() {
                None
            } else {
                Some(dev.upload(&t.policies)?)
            },
            counts: if entries == 0 {
                None
            } else {
                Some(dev.upload(&flat)?)
            },
            count_off,
            b_start: starts[1],
            d_start: starts[2],
            entries,
            sum_p,
            count_len,
        })
    }

    pub(crate) fn read_counts(&self, dev: &Device, kind: CountKind, i: usize) -> Result<Vec<f64>> {
        let k = kind as usize;
        let (Some(off), Some(counts)) = (&self.count_off[k], &self.counts) else {
            return Err(Error::invalid("counts", "the model has none of this kind"));
        };
        let len = self.count_len[k][i];
        let view = unsafe { View::<f32>::from_raw(dev, counts.addr() + 4 * off[i] as u64, len) };
        Ok(view.to_vec()?.into_iter().map(f64::from).collect())
    }

    fn desc_addr(&self) -> u64 {
        self.desc.addr()
    }

    /// Address of the O_m limits (then the U_f limits) behind the descriptor.
    fn limits_addr(&self, actions: bool, modalities: usize) -> u64 {
        self.desc.addr() + 4 * (DESC_WORDS + if actions { modalities } else { 0 }) as u64
    }
}

/// One tensor to scan before launching.
struct ScanEntry {
    name: &'static str,
    addr: u64,
    /// Index tensors: the limits of each column (period = its length); else a probability one.
    limits: Option<Vec<i32>>,
    /// Columns per row, for the message.
    period: usize,
    /// What a column is, for the message ("modality", "factor", "entry").
    column: &'static str,
    blocks: usize,
}

/// The input scans of one call, read back with one wait (as settle's).
struct Scans<'d> {
    dev: &'d Device,
    dm: &'d DeviceModel,
    modalities: usize,
    stream: Stream,
    out: Scratch,
    entries: Vec<ScanEntry>,
    used: usize,
}

impl<'d> Scans<'d> {
    fn new(model: &'d Model, dm: &'d DeviceModel, count: usize, stream: Stream) -> Result<Self> {
        Ok(Scans {
            dev: &model.device,
            dm,
            modalities: model.t.modalities(),
            stream,
            out: Scratch::new(&model.device, 8 * count * SCAN_BLOCKS, stream)?,
            entries: Vec::new(),
            used: 0,
        })
    }

    /// Indices at `addr` (`len` of them, rows of `period`) checked against O_m (`actions`
    /// false) or U_f.
    fn index(
        &mut self,
        name: &'static str,
        addr: u64,
        len: usize,
        actions: bool,
        limits: Vec<i32>,
    ) -> Result<()> {
        let period = limits.len();
        let (mut v, mut n, mut p, mut lim) = (
            addr,
            len as i64,
            period as i32,
            self.dm.limits_addr(actions, self.modalities),
        );
        let grid = blocks(len, 256).min(SCAN_BLOCKS as u32);
        let mut o = self.out.addr + 8 * self.used as u64;
        let cfg = LaunchConfig {
            grid: (grid, 1, 1),
            block: 256,
            smem: 0,
        };
        self.dev.launch(
            LEARN,
            "vmp_check_index",
            cfg,
            &mut [
                arg(&mut v),
                arg(&mut n),
                arg(&mut p),
                arg(&mut lim),
                arg(&mut o),
            ],
            self.stream,
        )?;
        let column = if actions { "factor" } else { "modality" };
        self.push(name, addr, Some(limits), period, column, grid as usize);
        Ok(())
    }

    /// Values that must be finite and >= 0 (distributions, priors, beliefs).
    fn prob(&mut self, name: &'static str, addr: u64, len: usize, period: usize) -> Result<()> {
        let (mut v, mut n) = (addr, len as i64);
        let grid = blocks(len, 256).min(SCAN_BLOCKS as u32);
        let mut o = self.out.addr + 8 * self.used as u64;
        let cfg = LaunchConfig {
            grid: (grid, 1, 1),
            block: 256,
            smem: 0,
        };
        self.dev.launch(
            LEARN,
            "vmp_check_prob",
            cfg,
            &mut [arg(&mut v), arg(&mut n), arg(&mut o)],
            self.stream,
        )?;
        self.push(name, addr, None, period, "entry", grid as usize);
        Ok(())
    }

    fn push(
        &mut self,
        name: &'static str,
        addr: u64,
        limits: Option<Vec<i32>>,
        period: usize,
        column: &'static str,
        blocks: usize,
    ) {
        self.entries.push(ScanEntry {
            name,
            addr,
            limits,
            period,
            column,
            blocks,
        });
        self.used += blocks;
    }

    /// Waits once; the first bad element of the first failing tensor as an error.
    fn finish(self) -> Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let firsts = unsafe { View::<i64>::from_raw(self.dev, self.out.addr, self.used) }
            .to_vec_on(self.stream)?;
        let mut at = 0;
        for e in &self.entries {
            let bad = firsts[at..at + e.blocks]
                .iter()
                .copied()
                .filter(|&i| i >= 0)
                .min();
            at += e.blocks;
            let Some(i) = bad else { continue };
            let i = i as usize;
            let (row, col) = (i / e.period, i % e.period);
            let reason = match &e.limits {
                Some(limits) => {
                    let v = unsafe { View::<i32>::from_raw(self.dev, e.addr + 4 * i as u64, 1) }
                        .to_vec_on(self.stream)?[0];
                    format!(
                        "element {i} (row {row}, {} {col}) is {v}, out of range 0..{}",
                        e.column, limits[col]
                    )
                }
                None => {
                    let v = unsafe { View::<f32>::from_raw(self.dev, e.addr + 4 * i as u64, 1) }
                        .to_vec_on(self.stream)?[0];
                    format!("element {i} (row {row}, entry {col}) is {v} (must be finite and >= 0)")
                }
            };
            return Err(Error::invalid(e.name, reason));
        }
        Ok(())
    }
}

#[allow(clippy::expect_used)] // Model::new makes the tables for every GPU model
fn device_model(model: &Model) -> &DeviceModel {
    model
        .gpu
        .as_ref()
        .expect("a model on a GPU device has its device tables")
}

/// Scans the observations (indices against O_m, distributions >= 0).
fn scan_obs(scans: &mut Scans<'_>, model: &Model, obs: &Obs<'_>) -> Result<()> {
    match obs {
        Obs::Index(v) => scans.index(
            "obs",
            v.addr(),
            v.len(),
            false,
            model.t.o.iter().map(|&o| o as i32).collect(),
        ),
        Obs::Dist(v) => scans.prob("obs", v.addr(), v.len(), model.t.sum_o),
    }
}

fn obs_ptrs(obs: &Obs<'_>) -> (u64, u64) {
    match obs {
        Obs::Index(v) => (v.addr(), 0),
        Obs::Dist(v) => (0, v.addr()),
    }
}

/// Where a one-agent-per-thread kernel keeps its `words` floats per agent: shared memory when
/// a block's fit (returns smem bytes, no workspace), else a global workspace.
struct Placement {
    grid: u32,
    smem: u32,
    work: Option<Scratch>,
}

fn place(dev: &Device, n: usize, words: usize, stream: Stream) -> Result<Placement> {
    let smem = THREADS as usize * words * 4;
    let avail = dev.max_shared_per_block().saturating_sub(STATIC_SMEM);
    let grid = blocks(n, THREADS as usize);
    if smem <= avail {
        return Ok(Placement {
            grid,
            smem: smem as u32,
            work: None,
        });
    }
    let per_block = THREADS as usize * words * 4;
    let grid = grid.min((MAX_WORK_BYTES / per_block).max(1) as u32);
    let work = Scratch::new(dev, grid as usize * per_block, stream)?;
    Ok(Placement {
        grid,
        smem: 0,
        work: Some(work),
    })
}

fn addr_or_null<T: bytemuck::Pod>(v: Option<&crate::backend::ViewMut<'_, T>>) -> u64 {
    v.map_or(0, |v| v.addr)
}

pub(crate) fn infer_states(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: StatesOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let dev = &model.device;
    let dm = device_model(model);
    if spec.check_inputs {
        let mut scans = Scans::new(model, dm, 2, stream)?;
        scan_obs(&mut scans, model, obs)?;
        if let Some(p) = prior {
            scans.prob("prior", p.addr(), p.len(), model.t.sum_s)?;
        }
        scans.finish()?;
    }
    let dist = matches!(obs, Obs::Dist(_));
    let words = 3 * model.t.sum_s + if dist { dm.sum_p } else { 0 };
    let pl = place(dev, n, words, stream)?;
    let (mut oi, mut od) = obs_ptrs(obs);
    let mut desc = dm.desc_addr();
    let mut tab = dm.tab.addr();
    let mut pr = prior.map_or(0, |p| p.addr());
    let mut n_ = n as i64;
    let mut iters = spec.num_iter as i32;
    let mut tol = spec.tol;
    let mut work = pl.work.as_ref().map_or(0, |w| w.addr);
    let mut qs = out.qs.addr;
    let mut vfe = addr_or_null(out.vfe.as_ref());
    let mut its = addr_or_null(out.iterations.as_ref());
    let mut trace = addr_or_null(out.vfe_trace.as_ref());
    let cfg = LaunchConfig {
        grid: (pl.grid, 1, 1),
        block: THREADS,
        smem: pl.smem,
    };
    dev.launch(
        STATES,
        "vmp_fpi",
        cfg,
        &mut [
            arg(&mut desc),
            arg(&mut tab),
            arg(&mut oi),
            arg(&mut od),
            arg(&mut pr),
            arg(&mut n_),
            arg(&mut iters),
            arg(&mut tol),
            arg(&mut work),
            arg(&mut qs),
            arg(&mut vfe),
            arg(&mut its),
            arg(&mut trace),
        ],
        stream,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn infer_sequence(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: SequenceOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let dev = &model.device;
    let dm = device_model(model);
    if spec.check_inputs {
        let mut scans = Scans::new(model, dm, 3, stream)?;
        scan_obs(&mut scans, model, obs)?;
        if let Some(a) = actions.filter(|_| steps > 1) {
            scans.index(
                "actions",
                a.addr(),
                a.len(),
                true,
                model.t.u.iter().map(|&u| u as i32).collect(),
            )?;
        }
        if let Some(p) = prior {
            scans.prob("prior", p.addr(), p.len(), model.t.sum_s)?;
        }
        scans.finish()?;
    }
    let dist = matches!(obs, Obs::Dist(_));
    let s = model.t.sum_s;
    let words = 2 * steps * s + s + if dist { steps * dm.sum_p } else { 0 };
    let pl = place(dev, n, words, stream)?;
    let (mut oi, mut od) = obs_ptrs(obs);
    let mut desc = dm.desc_addr();
    let mut tab = dm.tab.addr();
    let mut act = actions.filter(|_| steps > 1).map_or(0, |a| a.addr());
    let mut pr = prior.map_or(0, |p| p.addr());
    let mut n_ = n as i64;
    let mut t_ = to_i32("steps", steps)?;
    let mut iters = spec.num_iter as i32;
    let mut tau = spec.tau;
    let mut mmp = (spec.method == Method::Mmp) as i32;
    let mut work = pl.work.as_ref().map_or(0, |w| w.addr);
    let mut qs = out.qs.addr;
    let mut vfe = addr_or_null(out.vfe.as_ref());
    let mut vfe_t = addr_or_null(out.vfe_t.as_ref());
    let cfg = LaunchConfig {
        grid: (pl.grid, 1, 1),
        block: THREADS,
        smem: pl.smem,
    };
    dev.launch(
        SEQUENCE,
        "vmp_sequence",
        cfg,
        &mut [
            arg(&mut desc),
            arg(&mut tab),
            arg(&mut oi),
            arg(&mut od),
            arg(&mut act),
            arg(&mut pr),
            arg(&mut n_),
            arg(&mut t_),
            arg(&mut iters),
            arg(&mut tau),
            arg(&mut mmp),
            arg(&mut work),
            arg(&mut qs),
            arg(&mut vfe),
            arg(&mut vfe_t),
        ],
        stream,
    )
}

pub(crate) fn infer_policies(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    out: PolicyOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let dev = &model.device;
    let dm = device_model(model);
    let t = &model.t;
    if spec.check_inputs {
        let mut scans = Scans::new(model, dm, 1, stream)?;
        scans.prob("qs", qs.addr(), qs.len(), t.sum_s)?;
        scans.finish()?;
    }
    // A chunk of policies per block pass: as many as fit in shared memory, else a global
    // workspace of POLICY_CHUNK policies per block (the grid shrinks to cap its size).
    let row = 2 * t.sum_s + t.sum_o + t.modalities() + t.factors();
    let avail = dev.max_shared_per_block().saturating_sub(STATIC_SMEM) / 4;
    let mut grid = n.clamp(1, MAX_GRID);
    let (chunk, smem, work) = if avail >= row {
        (
            (avail / row).min(t.num_policies),
            4 * (avail / row).min(t.num_policies) * row,
            None,
        )
    } else {
        let chunk = POLICY_CHUNK.min(t.num_policies);
        grid = grid.min((MAX_WORK_BYTES / (4 * chunk * row)).max(1));
        (
            chunk,
            0,
            Some(Scratch::new(dev, 4 * grid * chunk * row, stream)?),
        )
    };
    // The novelty weights W(pA), W(pB), in the counts' layout.
    let novelty = spec.param_info_gain && dm.counts.is_some();
    let w = if novelty {
        let w = Scratch::new(dev, 4 * dm.entries, stream)?;
        let counts = dm.counts.as_ref().map_or(0, |c| c.addr());
        let launch = |off: usize, rows: usize, len: usize| -> Result<()> {
            let (mut c, mut o) = (counts + 4 * off as u64, w.addr + 4 * off as u64);
            let (mut r, mut cols) = (rows as i32, (len / rows) as i32);
            let cfg = LaunchConfig {
                grid: (blocks(len / rows, 256), 1, 1),
                block: 256,
                smem: 0,
            };
            dev.launch(
                POLICIES,
                "vmp_wnorm",
                cfg,
                &mut [arg(&mut c), arg(&mut o), arg(&mut r), arg(&mut cols)],
                stream,
            )
        };
        // pA_m has O_m rows; pB_f has S_f rows (axis 0 is the next state).
        for (kind, rows) in [(0, &t.o), (1, &t.s)] {
            if let Some(off) = &dm.count_off[kind] {
                for ((&at, &rows), &len) in off.iter().zip(rows).zip(&dm.count_len[kind]) {
                    launch(at, rows, len)?;
                }
            }
        }
        Some(w)
    } else {
        None
    };
    let mut desc = dm.desc_addr();
    let mut tab = dm.tab.addr();
    let mut pol = dm.policies.as_ref().map_or(0, |p| p.addr());
    let mut wt = w.as_ref().map_or(0, |w| w.addr);
    let mut q = qs.addr();
    let mut n_ = n as i64;
    let mut gamma = spec.gamma;
    let mut flags =
        spec.utility as i32 | (spec.state_info_gain as i32) << 1 | (novelty as i32) << 2;
    let mut chunk_ = chunk as i32;
    let mut wk = work.as_ref().map_or(0, |w| w.addr);
    let mut g = addr_or_null(out.g.as_ref());
    let mut qpi = out.q_pi.addr;
    let cfg = LaunchConfig {
        grid: (grid as u32, 1, 1),
        block: THREADS,
        smem: smem as u32,
    };
    dev.launch(
        POLICIES,
        "vmp_policies",
        cfg,
        &mut [
            arg(&mut desc),
            arg(&mut tab),
            arg(&mut pol),
            arg(&mut wt),
            arg(&mut q),
            arg(&mut n_),
            arg(&mut gamma),
            arg(&mut flags),
            arg(&mut chunk_),
            arg(&mut wk),
            arg(&mut g),
            arg(&mut qpi),
        ],
        stream,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn learn(
    model: &mut Model,
    spec: &LearnSpec,
    steps: usize,
    obs: &Obs<'_>,
    qs: &View<'_, f32>,
    actions: Option<&View<'_, i32>>,
    n: usize,
    stream: Stream,
) -> Result<()> {
    let model = &*model;
    let dev = &model.device;
    let dm = device_model(model);
    let Some(counts) = &dm.counts else {
        return Ok(()); // validated: every rate > 0 has its counts, so all rates are 0
    };
    let use_b = spec.lr_b > 0.0 && steps > 1;
    if spec.check_inputs {
        let mut scans = Scans::new(model, dm, 3, stream)?;
        scan_obs(&mut scans, model, obs)?;
        scans.prob("qs", qs.addr(), qs.len(), model.t.sum_s)?;
        if let Some(a) = actions.filter(|_| use_b) {
            scans.index(
                "actions",
                a.addr(),
                a.len(),
                true,
                model.t.u.iter().map(|&u| u as i32).collect(),
            )?;
        }
        scans.finish()?;
    }
    let kinds = (spec.lr_a > 0.0) as i32 | (use_b as i32) << 1 | ((spec.lr_d > 0.0) as i32) << 2;
    if kinds == 0 {
        return Ok(());
    }
    let chunks = n.div_ceil(256).clamp(1, LEARN_CHUNKS);
    let per_chunk = n.div_ceil(chunks);
    let partial = Scratch::new(dev, 4 * chunks * dm.entries, stream)?;
    let (mut oi, mut od) = obs_ptrs(obs);
    let mut desc = dm.desc_addr();
    let mut q = qs.addr();
    let mut act = actions.filter(|_| use_b).map_or(0, |a| a.addr());
    let mut n_ = n as i64;
    let mut t_ = to_i32("steps", steps)?;
    let mut per = per_chunk as i64;
    let mut entries = dm.entries as i64;
    let mut b_start = dm.b_start as i32;
    let mut d_start = dm.d_start as i32;
    let mut kinds_ = kinds;
    let mut part = partial.addr;
    dev.launch(
        LEARN,
        "vmp_learn_partial",
        LaunchConfig {
            grid: (chunks as u32, 1, 1),
            block: 256,
            smem: 0,
        },
        &mut [
            arg(&mut desc),
            arg(&mut oi),
            arg(&mut od),
            arg(&mut q),
            arg(&mut act),
            arg(&mut n_),
            arg(&mut t_),
            arg(&mut per),
            arg(&mut entries),
            arg(&mut b_start),
            arg(&mut d_start),
            arg(&mut kinds_),
            arg(&mut part),
        ],
        stream,
    )?;
    let mut c = counts.addr();
    let mut chunks_ = chunks as i32;
    let (mut la, mut lb, mut ld) = (
        if kinds & 1 != 0 { spec.lr_a } else { 0.0 },
        if use_b { spec.lr_b } else { 0.0 },
        if kinds & 4 != 0 { spec.lr_d } else { 0.0 },
    );
    dev.launch(
        LEARN,
        "vmp_learn_apply",
        LaunchConfig {
            grid: (blocks(dm.entries, 256), 1, 1),
            block: 256,
            smem: 0,
        },
        &mut [
            arg(&mut c),
            arg(&mut part),
            arg(&mut chunks_),
            arg(&mut entries),
            arg(&mut b_start),
            arg(&mut d_start),
            arg(&mut la),
            arg(&mut lb),
            arg(&mut ld),
        ],
        stream,
    )
}
