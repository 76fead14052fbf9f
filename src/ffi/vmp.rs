//! The C ABI of variational message passing: the `FEP_VMP_*` codes, the `FepVmpModelDesc`
//! description and the `FepVmp*Params`, the opaque `FepVmpModel` handle and the `fep_vmp_*`
//! entry points.

use std::ffi::c_void;

use super::{
    free_handle, guard, handle_ref, new_handle, non_null, open_device, product, raw_stream,
    slice_of, usize_of,
};
use crate::backend::{Stream, View, ViewMut};
use crate::error::{Error, Result};
use crate::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec,
    SequenceOutputs, SequenceSpec, StatesOutputs,
};

pub const FEP_VMP_OBS_INDEX: i32 = 0;
pub const FEP_VMP_OBS_DIST: i32 = 1;

pub const FEP_VMP_METHOD_VMP: i32 = 0;
pub const FEP_VMP_METHOD_MMP: i32 = 1;

pub const FEP_VMP_COUNTS_A: i32 = 0;
pub const FEP_VMP_COUNTS_B: i32 = 1;
pub const FEP_VMP_COUNTS_D: i32 = 2;

/// The opaque `FepVmpModel` of the header: a validated model on one device.
pub struct FepVmpModel {
    model: Model,
}

/// A generative model in pymdp's layouts (see [`ModelSpec`]), every array in host memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpModelDesc {
    pub num_factors: u64,
    pub num_modalities: u64,
    pub num_states: *const u64,
    pub num_controls: *const u64,
    pub num_obs: *const u64,
    pub a_num_deps: *const u64,
    pub a_deps: *const u64,
    pub a: *const *const f64,
    pub b: *const *const f64,
    pub c: *const *const f64,
    pub d: *const *const f64,
    pub policies: *const i32,
    pub num_policies: u64,
    pub policy_len: u64,
    pub e: *const f64,
    pub pa: *const *const f64,
    pub pb: *const *const f64,
    pub pd: *const *const f64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpFpiParams {
    pub num_iter: u32,
    pub tol: f32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpSequenceParams {
    pub method: i32,
    pub num_iter: u32,
    pub tau: f32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpPolicyParams {
    pub gamma: f32,
    pub utility: i32,
    pub state_info_gain: i32,
    pub param_info_gain: i32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpLearnParams {
    pub lr_a: f32,
    pub lr_b: f32,
    pub lr_d: f32,
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
            (true, Some(fill)) => vec![fill(len); len],
            _ => unsafe { slice_of(&format!("{name}[{i}]"), p, len)? }.to_vec(),
        });
    }
    Ok(Some(out))
}

/// `len` sizes from a `uint64_t` array.
unsafe fn host_sizes(name: &str, p: *const u64, len: usize) -> Result<Vec<usize>> {
    let v = unsafe { slice_of(name, p, len)? };
    v.iter().map(|&x| usize_of(name, x)).collect()
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
    let flat = unsafe { host_sizes("desc.a_deps", d.a_deps, dep_counts.iter().sum())? };
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
        b: required("desc.b", d.b, &b_lens)?,
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

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_new(
    kind: i32,
    ordinal: i32,
    desc: *const FepVmpModelDesc,
    out: *mut *mut FepVmpModel,
) -> i32 {
    guard(|| {
        non_null("out", out)?;
        non_null("desc", desc)?;
        let spec = unsafe { model_spec(&*desc)? };
        let device = open_device(kind, ordinal)?;
        // The model's own checks name ModelSpec's fields: the C caller knows them as desc.*.
        let model = Model::new(&device, &spec).map_err(|e| match e {
            Error::InvalidArgument { name, reason } => Error::InvalidArgument {
                name: format!("desc.{name}"),
                reason,
            },
            other => other,
        })?;
        unsafe { new_handle(out, FepVmpModel { model }) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_free(model: *mut FepVmpModel) {
    unsafe { free_handle(model) }
}

/// The model behind a handle, or an error naming `model` when it is NULL.
unsafe fn vmp_model<'m>(model: *const FepVmpModel) -> Result<&'m Model> {
    Ok(unsafe { &handle_ref("model", model)?.model })
}

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
        for (p, v) in [
            (num_factors, m.num_states().len()),
            (num_modalities, m.num_obs().len()),
            (belief_len, m.belief_len()),
            (obs_len, m.obs_len()),
            (num_policies, m.num_policies()),
            (policy_len, m.policy_len()),
        ] {
            if !p.is_null() {
                unsafe { *p = v as u64 };
            }
        }
        Ok(())
    })
}

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
    non_null("params", params)?;
    let n = usize_of("n", n)?;
    if n == 0 {
        return Err(Error::invalid("n", "is 0 (a batch has at least one agent)"));
    }
    Ok(VmpCall {
        model,
        params: unsafe { *params },
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
        Ok(unsafe { View::from_raw(self.model.device(), p as u64, len) })
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
        Ok(unsafe { ViewMut::from_raw(self.model.device(), p as u64, len) })
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
        let model = &mut (*model).model;
        vmp::learn(model, &spec, steps, &obs, &qs, actions.as_ref(), stream)
    })
}
