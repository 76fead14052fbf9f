//! The C ABI of variational message passing: the `FEP_VMP_*` codes, the `FepVmpModelDesc`
//! description and the `FepVmp*Params`, the opaque `FepVmpModel` handle and the `fep_vmp_*`
//! entry points.

use std::ffi::c_void;

use super::{
    Tagged, aligned, free_handle, guard, handle_mut, handle_ref, new_handle, non_null, open_device,
    product, raw_stream, raw_view, raw_view_mut, read_arg, slice_of, usize_of, write_out,
};
use crate::backend::{Stream, View, ViewMut};
use crate::error::{Error, Result};
use crate::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec,
    SequenceOutputs, SequenceSpec, StatesOutputs,
};

/// How VMP observations are given (`obs_kind`): int32_t indices, one per modality: o_m in
/// 0 .. O_m - 1.
pub const FEP_VMP_OBS_INDEX: i32 = 0;
/// How VMP observations are given: float distributions, O_m per modality, modalities
/// concatenated.
pub const FEP_VMP_OBS_DIST: i32 = 1;

/// Sequence update rule (`FepVmpSequenceParams.method`): pymdp's `vmp`.
pub const FEP_VMP_METHOD_VMP: i32 = 0;
/// Sequence update rule: pymdp's `mmp` (marginal message passing).
pub const FEP_VMP_METHOD_MMP: i32 = 1;

/// Which Dirichlet counts fep_vmp_model_counts reads: pA_m (`index` a modality).
pub const FEP_VMP_COUNTS_A: i32 = 0;
/// Which Dirichlet counts fep_vmp_model_counts reads: pB_f (`index` a factor).
pub const FEP_VMP_COUNTS_B: i32 = 1;
/// Which Dirichlet counts fep_vmp_model_counts reads: pD_f (`index` a factor).
pub const FEP_VMP_COUNTS_D: i32 = 2;

/// Variational message passing for discrete active inference (the maths: the Rust crate's `vmp`
/// module docs): a validated generative model stored on one device. Made by fep_vmp_model_new, freed by
/// fep_vmp_model_free.
///
/// Conventions are pymdp 1.0.4's (tests/fixtures/VMP-CONVENTIONS.md). F hidden-state factors
/// with S_f states and U_f controls; M modalities with O_m outcomes, modality m depending on the
/// factors deps(m). N agents share one model; each has its own observations, prior and
/// beliefs. Beliefs are float [N, sum S]: factor f at offset S_0 + ... + S_{f-1} of an
/// agent's row. Every log is ln max(x, 2.22e-16), as pymdp's.
///
/// Tensors of the fep_vmp_* calls live on the model's device (host memory for FEP_DEVICE_CPU);
/// their lengths follow from n, steps and the model (fep_vmp_model_info). Outputs must not
/// overlap each other or the inputs.
pub struct FepVmpModel {
    magic: u64,
    model: Model,
}

impl Tagged for FepVmpModel {
    const MAGIC: u64 = u64::from_le_bytes(*b"fepVMPm1");
    fn magic(handle: *mut Self) -> *mut u64 {
        unsafe { &raw mut (*handle).magic }
    }
}

/// A generative model in pymdp's layouts, all row-major, all in HOST memory whatever the device
/// (fep_vmp_model_new copies it; the Rust API's `ModelSpec`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpModelDesc {
    /// F >= 1.
    pub num_factors: u64,
    /// M >= 1.
    pub num_modalities: u64,
    /// F: S_f >= 1.
    pub num_states: *const u64,
    /// F: U_f >= 1, or NULL: every factor uncontrolled (U_f = 1).
    pub num_controls: *const u64,
    /// M: O_m >= 1.
    pub num_obs: *const u64,
    /// M: |deps(m)| >= 1.
    pub a_num_deps: *const u64,
    /// sum_m |deps(m)|: deps(0), then deps(1), ...; each in A_m's axis order (any order, no
    /// repeats).
    pub a_deps: *const u64,
    /// M: A_m `[O_m, S_deps(m)[0], S_deps(m)[1], ...]`, p(o | s): every column sums to 1.
    pub a: *const *const f64,
    /// F: B_f [S_f, S_f, U_f], B_f[s', s, u] = p(s' | s, u): columns sum to 1. Or NULL: a
    /// model without transitions, for state inference (fep_vmp_infer_states) only; sequence
    /// and policy inference, counts pb and learning with lr_b > 0 then fail with
    /// FEP_ERR_INVALID_ARGUMENT naming B.
    pub b: *const *const f64,
    /// M: C_m `[O_m]` log-preferences, used as given; or NULL (an entry may be NULL): zeros.
    pub c: *const *const f64,
    /// F: D_f `[S_f]`, the prior over initial states; or NULL (an entry may be NULL): uniform.
    pub d: *const *const f64,
    /// [num_policies, policy_len, F] actions, each in 0 .. U_f - 1; or NULL (num_policies 0):
    /// no policy inference.
    pub policies: *const i32,
    /// P.
    pub num_policies: u64,
    /// H >= 1 with a policy table.
    pub policy_len: u64,
    /// `[P]` prior over policies, or NULL: uniform.
    pub e: *const f64,
    /// M: Dirichlet counts shaped like A_m (>= 0), or NULL: none.
    pub pa: *const *const f64,
    /// F: counts shaped like B_f, or NULL: none.
    pub pb: *const *const f64,
    /// F: counts shaped like D_f, or NULL: none.
    pub pd: *const *const f64,
}

/// State inference (pymdp's `fpi`): the parameters of fep_vmp_infer_states.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpFpiParams {
    /// K >= 1 Jacobi iterations (pymdp: 16); one exact pass when F = 1.
    pub num_iter: u32,
    /// tol >= 0: an agent stops after iteration k >= 2 once |F_k - F_{k-1}| <= tol (0: always K,
    /// as pymdp).
    pub tol: f32,
    /// 0: on a GPU, scan the observations and priors first (indices in range, values finite
    /// and >= 0), which reads back one word (the call waits for the stream); 1: skip the scan
    /// (bad indices are clamped) and return without synchronising.
    pub skip_input_checks: i32,
}

/// Sequence inference over a window of T steps: the parameters of fep_vmp_infer_sequence.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpSequenceParams {
    /// FEP_VMP_METHOD_VMP or _MMP.
    pub method: i32,
    /// K >= 1 (pymdp: 16).
    pub num_iter: u32,
    /// Step size in (0, 1] (pymdp's Agent: 1).
    pub tau: f32,
    /// As in FepVmpFpiParams.
    pub skip_input_checks: i32,
}

/// Policy inference: q(pi) = softmax(-gamma G + ln max(E, eps)) with G = -(pymdp's neg_efe).
/// The parameters of fep_vmp_infer_policies.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpPolicyParams {
    /// gamma >= 0.
    pub gamma: f32,
    /// != 0: add q(o) . C_m.
    pub utility: i32,
    /// != 0: add H[q(o_m)] - E_q[H[A_m(.|s)]].
    pub state_info_gain: i32,
    /// != 0: add the novelty of pA and pB (the model must have one).
    pub param_info_gain: i32,
    /// As in FepVmpFpiParams (the beliefs: finite and >= 0).
    pub skip_input_checks: i32,
}

/// Dirichlet learning rates (fep_vmp_learn); 0 leaves those counts as they are, > 0 needs the
/// model to have them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpLearnParams {
    /// pA_m += lr_a sum_{agents, t} o_m (x) q_t(s_deps(m)).
    pub lr_a: f32,
    /// pB_f[:, :, u] += lr_b sum_{agents, t} [a_t = u] q_{t+1} (x) q_t.
    pub lr_b: f32,
    /// pD_f += lr_d sum_agents q_0, where pD_f > 0.
    pub lr_d: f32,
    /// As in FepVmpFpiParams.
    pub skip_input_checks: i32,
}

/// The most factors or modalities a description may name (a guard against a garbage count
/// making the library read far past the caller's arrays).
const VMP_MAX_LIST: u64 = 1 << 16;

/// Copies of the `F` or `M` host tensors of a `double *const *` list, tensor `i` having
/// `lens[i]` elements. A NULL list is `None`; a NULL entry is an error unless `fill` gives its
/// value (C's zeros, D's uniform).
unsafe fn host_tensors(
    name: &str,
    list: *const *const f64,
    lens: &[usize],
    fill: Option<&dyn Fn(usize) -> f64>,
) -> Result<Option<Vec<Vec<f64>>>> {
    if list.is_null() {
        return Ok(None);
    }
    let ptrs = unsafe { slice_of(name, list, lens.len())? };
    let mut out = Vec::with_capacity(lens.len());
    for (i, (&p, &len)) in ptrs.iter().zip(lens).enumerate() {
        out.push(match (p.is_null(), fill) {
            // A missing tensor is filled here: sized by a count, so fallibly.
            (true, Some(fill)) => crate::alloc::filled(len, fill(len), || {
                format!("the default {name}[{i}] of {len} entries")
            })?,
            _ => unsafe { slice_of(&format!("{name}[{i}]"), p, len)? }.to_vec(),
        });
    }
    Ok(Some(out))
}

/// `len` sizes from a `uint64_t` array, each in 1..=2^31-1 (the model's limit, checked here
/// before any table is sized by them).
unsafe fn host_sizes(name: &str, p: *const u64, len: usize) -> Result<Vec<usize>> {
    let v = unsafe { slice_of(name, p, len)? };
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if x == 0 || x > i32::MAX as u64 {
                return Err(Error::invalid(
                    name,
                    format!("entry {i} is {x} (must be in 1..=2^31-1)"),
                ));
            }
            Ok(x as usize)
        })
        .collect()
}

/// The product of `dims`, or an error naming `name` when it overflows.
fn dims_product(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| product(name, acc, d))
}

/// The [`ModelSpec`] of a C description: its arrays copied, their lengths derived from the
/// sizes (checked against overflow and the factor count before anything is read).
unsafe fn model_spec(d: &FepVmpModelDesc) -> Result<ModelSpec> {
    let list_len = |name: &str, v: u64| -> Result<usize> {
        if v == 0 || v > VMP_MAX_LIST {
            return Err(Error::invalid(
                name,
                format!("must be in 1..={VMP_MAX_LIST}, got {v}"),
            ));
        }
        Ok(v as usize)
    };
    let f_count = list_len("desc.num_factors", d.num_factors)?;
    let m_count = list_len("desc.num_modalities", d.num_modalities)?;
    let num_states = unsafe { host_sizes("desc.num_states", d.num_states, f_count)? };
    let num_controls = if d.num_controls.is_null() {
        Vec::new()
    } else {
        unsafe { host_sizes("desc.num_controls", d.num_controls, f_count)? }
    };
    let num_obs = unsafe { host_sizes("desc.num_obs", d.num_obs, m_count)? };
    let dep_counts = unsafe { host_sizes("desc.a_num_deps", d.a_num_deps, m_count)? };
    if let Some(m) = dep_counts.iter().position(|&c| c > f_count) {
        return Err(Error::invalid(
            "desc.a_num_deps",
            format!(
                "entry {m} is {}, more than the {f_count} factors",
                dep_counts[m]
            ),
        ));
    }
    // Factor indices (0-based; range-checked against F below), not sizes.
    let flat = unsafe { slice_of("desc.a_deps", d.a_deps, dep_counts.iter().sum())? };
    let flat = flat
        .iter()
        .map(|&x| usize_of("desc.a_deps", x))
        .collect::<Result<Vec<_>>>()?;
    let mut a_deps = Vec::with_capacity(m_count);
    let mut a_lens = Vec::with_capacity(m_count);
    let mut rest = flat.as_slice();
    for (m, &count) in dep_counts.iter().enumerate() {
        let (deps, tail) = rest.split_at(count);
        rest = tail;
        let name = format!("desc.a_deps[{m}]");
        let mut dims = vec![num_obs[m]];
        for &dep in deps {
            let s = num_states.get(dep).ok_or_else(|| {
                Error::invalid(
                    &name,
                    format!("factor {dep} is out of range (there are {f_count} factors)"),
                )
            })?;
            dims.push(*s);
        }
        a_lens.push(dims_product(&name, &dims)?);
        a_deps.push(deps.to_vec());
    }
    let b_lens = (0..f_count)
        .map(|f| {
            let u = num_controls.get(f).copied().unwrap_or(1);
            dims_product("desc.num_states", &[num_states[f], num_states[f], u])
        })
        .collect::<Result<Vec<_>>>()?;
    let zeros = |_: usize| 0.0;
    let uniform = |len: usize| 1.0 / len as f64;
    let required = |name: &str, list, lens: &[usize]| -> Result<Vec<Vec<f64>>> {
        non_null(name, list)?;
        Ok(unsafe { host_tensors(name, list, lens, None)? }.unwrap_or_default())
    };
    let optional = |name: &str, list, lens: &[usize], fill: Option<&dyn Fn(usize) -> f64>| {
        Ok::<_, Error>(unsafe { host_tensors(name, list, lens, fill)? }.unwrap_or_default())
    };
    let (num_policies, policy_len) = (
        usize_of("desc.num_policies", d.num_policies)?,
        usize_of("desc.policy_len", d.policy_len)?,
    );
    let policies = match (d.policies.is_null(), num_policies) {
        (true, 0) => Vec::new(),
        (true, p) => {
            return Err(Error::invalid(
                "desc.policies",
                format!("is NULL but desc.num_policies is {p}"),
            ));
        }
        (false, 0) => {
            return Err(Error::invalid(
                "desc.num_policies",
                "is 0 with a policy table given",
            ));
        }
        (false, _) if policy_len == 0 => {
            return Err(Error::invalid(
                "desc.policy_len",
                "is 0 with a policy table given",
            ));
        }
        (false, p) => {
            let len = dims_product("desc.num_policies", &[p, policy_len, f_count])?;
            unsafe { slice_of("desc.policies", d.policies, len)? }.to_vec()
        }
    };
    let e = if d.e.is_null() {
        Vec::new()
    } else if policies.is_empty() {
        return Err(Error::invalid("desc.e", "given without policies"));
    } else {
        unsafe { slice_of("desc.e", d.e, num_policies)? }.to_vec()
    };
    Ok(ModelSpec {
        a: required("desc.a", d.a, &a_lens)?,
        b: optional("desc.b", d.b, &b_lens, None)?,
        c: optional("desc.c", d.c, &num_obs, Some(&zeros))?,
        d: optional("desc.d", d.d, &num_states, Some(&uniform))?,
        pa: optional("desc.pa", d.pa, &a_lens, None)?,
        pb: optional("desc.pb", d.pb, &b_lens, None)?,
        pd: optional("desc.pd", d.pd, &num_states, None)?,
        num_states,
        num_controls,
        num_obs,
        a_deps,
        policies,
        policy_len: if num_policies == 0 { 0 } else { policy_len },
        e,
    })
}

/// Validates `desc` (shapes, normalised columns of A, B and D, non-negative counts,
/// dependencies and policy actions in range) and stores the model on the device (kind,
/// ordinal) at `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_new(
    kind: i32,
    ordinal: i32,
    desc: *const FepVmpModelDesc,
    out: *mut *mut FepVmpModel,
) -> i32 {
    guard(|| {
        non_null("out", out)?;
        aligned::<*mut u8>("out", out as u64)?;
        let spec = unsafe { model_spec(&read_arg("desc", desc)?)? };
        let device = open_device(kind, ordinal)?;
        // The model's own checks name ModelSpec's fields: the C caller knows them as desc.*.
        let model = Model::new(&device, &spec).map_err(|e| match e {
            Error::InvalidArgument { name, reason } => Error::InvalidArgument {
                name: format!("desc.{name}"),
                reason,
            },
            other => other,
        })?;
        unsafe {
            new_handle(
                out,
                FepVmpModel {
                    magic: FepVmpModel::MAGIC,
                    model,
                },
            )
        }
    })
}

/// Frees a model (NULL is a no-op). Work already enqueued must not still use it. A pointer that
/// is not a live model (freed already, or garbage pointing at readable memory) is detected
/// where cheap by a tag in the handle, left alone, and reported by fep_last_error; every call
/// taking a handle checks the same tag and returns FEP_ERR_INVALID_ARGUMENT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_free(model: *mut FepVmpModel) {
    unsafe { free_handle("model", model) }
}

/// The model behind a handle, or an error naming `model` when it is NULL.
unsafe fn vmp_model<'m>(model: *const FepVmpModel) -> Result<&'m Model> {
    Ok(unsafe { &handle_ref("model", model)?.model })
}

/// The model's sizes; any pointer may be NULL. belief_len = sum S_f, obs_len = sum O_m (the
/// width of a distributional observation), num_policies = P (0 without a table), policy_len =
/// H.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_info(
    model: *const FepVmpModel,
    num_factors: *mut u64,
    num_modalities: *mut u64,
    belief_len: *mut u64,
    obs_len: *mut u64,
    num_policies: *mut u64,
    policy_len: *mut u64,
) -> i32 {
    guard(|| {
        let m = unsafe { vmp_model(model)? };
        let outs = [
            ("num_factors", num_factors, m.num_states().len()),
            ("num_modalities", num_modalities, m.num_obs().len()),
            ("belief_len", belief_len, m.belief_len()),
            ("obs_len", obs_len, m.obs_len()),
            ("num_policies", num_policies, m.num_policies()),
            ("policy_len", policy_len, m.policy_len()),
        ];
        // Every pointer checked before any is written.
        for (name, p, _) in outs {
            aligned::<u64>(name, p as u64)?;
        }
        for (name, p, v) in outs {
            unsafe { write_out(name, p, v as u64)? };
        }
        Ok(())
    })
}

/// Copies the current Dirichlet counts `which` (FEP_VMP_COUNTS_A, _B, _D) of modality or factor
/// `index` into `out`, HOST memory of exactly `len` doubles (the size of A_m, B_f or D_f), after
/// the work enqueued on `stream` (the stream fep_vmp_learn ran on) is done: the call waits.
/// FEP_ERR_INVALID_ARGUMENT when the model has no such counts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_counts(
    model: *const FepVmpModel,
    stream: *mut c_void,
    which: i32,
    index: u64,
    out: *mut f64,
    len: u64,
) -> i32 {
    guard(|| {
        let m = unsafe { vmp_model(model)? };
        non_null("out", out)?;
        let i = usize_of("index", index)?;
        // The counts are read on the device's own stream: first let a learning step enqueued
        // on the caller's stream finish.
        m.device().synchronize(raw_stream(stream))?;
        let (counts, field) = match which {
            FEP_VMP_COUNTS_A => (m.counts_a(i)?, "pa"),
            FEP_VMP_COUNTS_B => (m.counts_b(i)?, "pb"),
            FEP_VMP_COUNTS_D => (m.counts_d(i)?, "pd"),
            other => {
                return Err(Error::invalid(
                    "which",
                    format!("{other} is not FEP_VMP_COUNTS_A, _B or _D"),
                ));
            }
        };
        let counts = counts.ok_or_else(|| {
            Error::invalid(
                "which",
                format!("the model has no Dirichlet counts {field} (desc.{field} was NULL)"),
            )
        })?;
        if usize_of("len", len)? != counts.len() {
            return Err(Error::invalid(
                "len",
                format!("is {len}, but {field}[{i}] has {} elements", counts.len()),
            ));
        }
        unsafe { std::ptr::copy_nonoverlapping(counts.as_ptr(), out, counts.len()) };
        Ok(())
    })
}

/// What every VMP call reads first, every pointer checked: the model, the params, the batch
/// size n (>= 1) and the caller's stream. Its methods make views of the caller's memory on the
/// model's device, `n` times a per-agent length each.
struct VmpCall<'m, P> {
    model: &'m Model,
    params: P,
    n: usize,
    stream: Stream,
}

unsafe fn vmp_call<'m, P: Copy>(
    model: *const FepVmpModel,
    params: *const P,
    n: u64,
    stream: *mut c_void,
) -> Result<VmpCall<'m, P>> {
    let model = unsafe { vmp_model(model)? };
    let params = unsafe { read_arg("params", params)? };
    let n = usize_of("n", n)?;
    if n == 0 {
        return Err(Error::invalid("n", "is 0 (a batch has at least one agent)"));
    }
    Ok(VmpCall {
        model,
        params,
        n,
        stream: raw_stream(stream),
    })
}

impl<P> VmpCall<'_, P> {
    /// A view of `per_agent` elements per agent at `p` (required).
    unsafe fn input<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *const T,
        per_agent: usize,
    ) -> Result<View<'a, T>> {
        non_null(name, p)?;
        let len = product(name, self.n, per_agent)?;
        Ok(unsafe { raw_view(self.model.device(), p as u64, len, name) })
    }

    /// As [`Self::input`], `None` for NULL.
    unsafe fn opt_input<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *const T,
        per_agent: usize,
    ) -> Result<Option<View<'a, T>>> {
        if p.is_null() {
            return Ok(None);
        }
        unsafe { self.input(name, p, per_agent).map(Some) }
    }

    /// A writable view of `per_agent` elements per agent at `p` (required).
    unsafe fn output<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *mut T,
        per_agent: usize,
    ) -> Result<ViewMut<'a, T>> {
        non_null(name, p)?;
        let len = product(name, self.n, per_agent)?;
        Ok(unsafe { raw_view_mut(self.model.device(), p as u64, len, name) })
    }

    /// As [`Self::output`], `None` for NULL (the output is skipped).
    unsafe fn opt_output<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *mut T,
        per_agent: usize,
    ) -> Result<Option<ViewMut<'a, T>>> {
        if p.is_null() {
            return Ok(None);
        }
        unsafe { self.output(name, p, per_agent).map(Some) }
    }

    /// The observations of `steps` steps per agent: `[n, steps, M]` int32 indices or
    /// `[n, steps, ΣO]` f32 distributions, as `kind` says.
    unsafe fn obs<'a>(&self, kind: i32, p: *const c_void, steps: usize) -> Result<Obs<'a>> {
        let width = match kind {
            FEP_VMP_OBS_INDEX => self.model.num_obs().len(),
            FEP_VMP_OBS_DIST => self.model.obs_len(),
            other => {
                return Err(Error::invalid(
                    "obs_kind",
                    format!("{other} is not FEP_VMP_OBS_INDEX or FEP_VMP_OBS_DIST"),
                ));
            }
        };
        let per_agent = product("steps", steps, width)?;
        Ok(unsafe {
            if kind == FEP_VMP_OBS_INDEX {
                Obs::Index(self.input("obs", p.cast::<i32>(), per_agent)?)
            } else {
                Obs::Dist(self.input("obs", p.cast::<f32>(), per_agent)?)
            }
        })
    }

    /// The past actions of windows of `steps` steps, `[n, steps - 1, F]`, or `None` for NULL.
    unsafe fn actions<'a>(&self, p: *const i32, steps: usize) -> Result<Option<View<'a, i32>>> {
        let per_agent = product(
            "steps",
            steps.saturating_sub(1),
            self.model.num_states().len(),
        )?;
        unsafe { self.opt_input("actions", p, per_agent) }
    }
}

/// State inference for n agents. obs: [n, M] int32 indices (obs_kind FEP_VMP_OBS_INDEX) or
/// [n, sum O] float distributions (FEP_VMP_OBS_DIST; non-negative, used as sum_o o ln A).
/// prior: [n, sum S], or NULL: every agent starts from D. Writes qs [n, sum S]; optional
/// (NULL to skip): vfe `[n]` (the free energy F), iterations `[n]` (iterations run), vfe_trace
/// [n, num_iter] (F after each iteration; repeated after an early stop).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_states(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpFpiParams,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    prior: *const f32,
    qs: *mut f32,
    vfe: *mut f32,
    iterations: *mut i32,
    vfe_trace: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = FpiSpec {
            num_iter: p.num_iter,
            tol: p.tol,
            check_inputs: p.skip_input_checks == 0,
        };
        let s = c.model.belief_len();
        let obs = c.obs(obs_kind, obs, 1)?;
        let prior = c.opt_input("prior", prior, s)?;
        let out = StatesOutputs {
            qs: c.output("qs", qs, s)?,
            vfe: c.opt_output("vfe", vfe, 1)?,
            iterations: c.opt_output("iterations", iterations, 1)?,
            vfe_trace: c.opt_output("vfe_trace", vfe_trace, p.num_iter as usize)?,
        };
        vmp::infer_states_into(c.model, &spec, &obs, prior.as_ref(), out, c.stream)
    })
}

/// Sequence inference over windows of `steps` = T >= 1 steps. obs: [n, T, M] indices or
/// [n, T, sum O] distributions; actions: [n, T - 1, F] int32 (action t moves the state from
/// step t to t + 1; may be NULL only when T = 1); prior: [n, sum S] for step 0, or NULL: D.
/// Writes qs [n, T, sum S]; optional: vfe `[n]` (the window's free energy), vfe_t [n, T]
/// (its per-step terms).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_sequence(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpSequenceParams,
    steps: u64,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    actions: *const i32,
    prior: *const f32,
    qs: *mut f32,
    vfe: *mut f32,
    vfe_t: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = SequenceSpec {
            method: Method::from_code(p.method)?,
            num_iter: p.num_iter,
            tau: p.tau,
            check_inputs: p.skip_input_checks == 0,
        };
        let steps = usize_of("steps", steps)?;
        let s = c.model.belief_len();
        let obs = c.obs(obs_kind, obs, steps)?;
        let actions = c.actions(actions, steps)?;
        let prior = c.opt_input("prior", prior, s)?;
        let out = SequenceOutputs {
            qs: c.output("qs", qs, product("steps", steps, s)?)?,
            vfe: c.opt_output("vfe", vfe, 1)?,
            vfe_t: c.opt_output("vfe_t", vfe_t, steps)?,
        };
        vmp::infer_sequence_into(
            c.model,
            &spec,
            steps,
            &obs,
            actions.as_ref(),
            prior.as_ref(),
            out,
            c.stream,
        )
    })
}

/// Policy inference for n agents with beliefs qs [n, sum S] (needs a policy table). Writes
/// q_pi [n, P]; optional: g [n, P], the expected free energy G (lower is better).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_policies(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpPolicyParams,
    qs: *const f32,
    n: u64,
    g: *mut f32,
    q_pi: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = PolicySpec {
            gamma: p.gamma,
            utility: p.utility != 0,
            state_info_gain: p.state_info_gain != 0,
            param_info_gain: p.param_info_gain != 0,
            check_inputs: p.skip_input_checks == 0,
        };
        let num_policies = c.model.num_policies();
        if num_policies == 0 {
            // Before the outputs: with no policies there is nothing to allocate for them.
            return Err(Error::invalid(
                "model",
                "has no policy table (desc.policies was NULL)",
            ));
        }
        let qs = c.input("qs", qs, c.model.belief_len())?;
        let out = PolicyOutputs {
            g: c.opt_output("g", g, num_policies)?,
            q_pi: c.output("q_pi", q_pi, num_policies)?,
        };
        vmp::infer_policies_into(c.model, &spec, &qs, out, c.stream)
    })
}

/// Dirichlet learning from n windows of `steps` = T steps: obs as for fep_vmp_infer_sequence,
/// qs [n, T, sum S] the posteriors, actions [n, T - 1, F] (needed when lr_b > 0 and T > 1,
/// else may be NULL). Updates the model's counts in place, summed over agents and steps; read
/// them with fep_vmp_model_counts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_learn(
    model: *mut FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpLearnParams,
    steps: u64,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    qs: *const f32,
    actions: *const i32,
) -> i32 {
    guard(|| unsafe {
        let (spec, steps, obs, qs, actions, stream) = {
            let c = vmp_call(model, params, n, stream)?;
            let p = c.params;
            let spec = LearnSpec {
                lr_a: p.lr_a,
                lr_b: p.lr_b,
                lr_d: p.lr_d,
                check_inputs: p.skip_input_checks == 0,
            };
            let steps = usize_of("steps", steps)?;
            let per_agent = product("steps", steps, c.model.belief_len())?;
            (
                spec,
                steps,
                c.obs(obs_kind, obs, steps)?,
                c.input("qs", qs, per_agent)?,
                c.actions(actions, steps)?,
                c.stream,
            )
        };
        // The views own no borrow of the model: learning may now take it mutably.
        let model = &mut handle_mut("model", model)?.model;
        vmp::learn(model, &spec, steps, &obs, &qs, actions.as_ref(), stream)
    })
}
