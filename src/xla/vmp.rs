//! Active inference (VMP) as XLA FFI handlers, over `fep_vmp_infer_states`,
//! `fep_vmp_infer_sequence` and `fep_vmp_infer_policies`.
//!
//! The generative model is a handle made once on the host side (`fep_vmp_model_new`, from
//! pymdp-layout arrays) and named by the `model` attribute (its address, int64): the Python
//! object that owns it must outlive every computation that uses it. The handle's tag is
//! checked on every call (a freed or foreign pointer is an error where the check can see it).
//!
//! - `fep_vmp_infer_states`: obs [n, M] s32 indices or [n, ΣO] f32 distributions, with
//!   `prior` = 1 also prior [n, ΣS] f32; results qs [n, ΣS] f32, vfe [n] f32, iterations [n]
//!   s32. Attributes: model, num_iter, tol, prior.
//! - `fep_vmp_infer_sequence`: obs [n, T, M] s32 or [n, T, ΣO] f32, with T > 1 actions
//!   [n, T − 1, F] s32, with `prior` = 1 prior [n, ΣS]; results qs [n, T, ΣS], vfe [n],
//!   vfe_t [n, T]. Attributes: model, method (0 VMP, 1 MMP), num_iter, tau, prior.
//! - `fep_vmp_infer_policies`: qs [n, ΣS] f32; results q_pi [n, P] and G [n, P] f32.
//!   Attributes: model, gamma, utility, state_info_gain, param_info_gain.

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use super::{Buf, DT_F32, DT_S32, Frame, Platform, Res, check_status, expect, handlers, invalid};
use crate::ffi::{
    FEP_VMP_OBS_DIST, FEP_VMP_OBS_INDEX, FepVmpFpiParams, FepVmpModel, FepVmpPolicyParams,
    FepVmpSequenceParams, fep_vmp_infer_policies, fep_vmp_infer_sequence, fep_vmp_infer_states,
    fep_vmp_model_info,
};

/// The model of the call and its sizes.
struct Model {
    ptr: *const FepVmpModel,
    factors: i64,
    modalities: i64,
    belief_len: i64,
    obs_len: i64,
    policies: i64,
}

fn model(f: &Frame<'_>) -> Res<Model> {
    let addr = f.int64("model")?;
    let ptr = addr as usize as *const FepVmpModel;
    let mut v = [0u64; 5];
    // Safety: the C ABI checks the handle (null, tag) before reading it.
    let status = unsafe {
        fep_vmp_model_info(
            ptr,
            &mut v[0],
            &mut v[1],
            &mut v[2],
            &mut v[3],
            &mut v[4],
            null_mut(),
        )
    };
    check_status(status, "vmp model")?;
    let [factors, modalities, belief_len, obs_len, policies] = v.map(|x| x as i64);
    Ok(Model {
        ptr,
        factors,
        modalities,
        belief_len,
        obs_len,
        policies,
    })
}

/// (obs kind, n) of an observation buffer with `steps` steps (None: no step dim).
fn obs_kind(m: &Model, obs: &Buf<'_>, steps: Option<i64>) -> Res<(i32, i64)> {
    let (kind, width) = match obs.dtype {
        DT_S32 => (FEP_VMP_OBS_INDEX, m.modalities),
        DT_F32 => (FEP_VMP_OBS_DIST, m.obs_len),
        d => {
            return Err(invalid(format!(
                "obs: XLA dtype {d} is not int32 or float32"
            )));
        }
    };
    let n = obs.dims.first().copied().unwrap_or(0);
    let want: Vec<i64> = match steps {
        None => vec![n, width],
        Some(t) => vec![n, t, width],
    };
    if obs.dims != want.as_slice() {
        return Err(invalid(format!(
            "obs: expected dims {want:?}, got {:?}",
            obs.dims
        )));
    }
    Ok((kind, n))
}

fn stream(f: &Frame<'_>) -> Res<*mut c_void> {
    if f.platform() != Platform::Cpu {
        return Err(invalid(
            "the VMP handlers serve host models only: run them on the CPU device (e.g. inside \
             `with jax.default_device(jax.devices(\"cpu\")[0]):`)",
        ));
    }
    Ok(f.device()?.2)
}

fn states(f: &Frame<'_>) -> Res<()> {
    let m = model(f)?;
    let (args, rets) = (f.args()?, f.rets()?);
    let with_prior = f.int("prior", Some(0))? != 0;
    if args.len() != 1 + usize::from(with_prior) || rets.len() != 3 {
        return Err(invalid(
            "fep_vmp_infer_states: expected obs[, prior] and 3 results",
        ));
    }
    let (kind, n) = obs_kind(&m, &args[0], None)?;
    let prior = if with_prior {
        expect(&args[1], "prior", DT_F32, &[n, m.belief_len])?;
        args[1].data as *const f32
    } else {
        null()
    };
    expect(&rets[0], "qs", DT_F32, &[n, m.belief_len])?;
    expect(&rets[1], "vfe", DT_F32, &[n])?;
    expect(&rets[2], "iterations", DT_S32, &[n])?;
    let p = FepVmpFpiParams {
        num_iter: u32::try_from(f.int("num_iter", Some(16))?)
            .map_err(|_| invalid("num_iter: negative"))?,
        tol: f.attr("tol")?.unwrap_or(0.0) as f32,
        skip_input_checks: 0,
    };
    let s = stream(f)?;
    // Safety: buffers checked against the model's sizes and n.
    let status = unsafe {
        fep_vmp_infer_states(
            m.ptr,
            s,
            &p,
            kind,
            args[0].data as *const c_void,
            n as u64,
            prior,
            rets[0].data as *mut f32,
            rets[1].data as *mut f32,
            rets[2].data as *mut i32,
            null_mut(),
        )
    };
    check_status(status, "vmp infer_states")
}

fn sequence(f: &Frame<'_>) -> Res<()> {
    let m = model(f)?;
    let (args, rets) = (f.args()?, f.rets()?);
    let with_prior = f.int("prior", Some(0))? != 0;
    let steps = match args.first().map(|a| a.dims) {
        Some([_, t, _]) => *t,
        _ => return Err(invalid("obs: expected [n, T, M] or [n, T, sum O]")),
    };
    let with_actions = steps > 1;
    if args.len() != 1 + usize::from(with_actions) + usize::from(with_prior) || rets.len() != 3 {
        return Err(invalid(
            "fep_vmp_infer_sequence: expected obs[, actions (T > 1)][, prior] and 3 results",
        ));
    }
    let (kind, n) = obs_kind(&m, &args[0], Some(steps))?;
    let mut next = 1;
    let actions = if with_actions {
        expect(&args[1], "actions", DT_S32, &[n, steps - 1, m.factors])?;
        next += 1;
        args[1].data as *const i32
    } else {
        null()
    };
    let prior = if with_prior {
        expect(&args[next], "prior", DT_F32, &[n, m.belief_len])?;
        args[next].data as *const f32
    } else {
        null()
    };
    expect(&rets[0], "qs", DT_F32, &[n, steps, m.belief_len])?;
    expect(&rets[1], "vfe", DT_F32, &[n])?;
    expect(&rets[2], "vfe_t", DT_F32, &[n, steps])?;
    let p = FepVmpSequenceParams {
        method: f.int("method", Some(0))?,
        num_iter: u32::try_from(f.int("num_iter", Some(16))?)
            .map_err(|_| invalid("num_iter: negative"))?,
        tau: f.attr("tau")?.unwrap_or(1.0) as f32,
        skip_input_checks: 0,
    };
    let s = stream(f)?;
    // Safety: as above.
    let status = unsafe {
        fep_vmp_infer_sequence(
            m.ptr,
            s,
            &p,
            steps as u64,
            kind,
            args[0].data as *const c_void,
            n as u64,
            actions,
            prior,
            rets[0].data as *mut f32,
            rets[1].data as *mut f32,
            rets[2].data as *mut f32,
        )
    };
    check_status(status, "vmp infer_sequence")
}

fn policies(f: &Frame<'_>) -> Res<()> {
    let m = model(f)?;
    let (args, rets) = (f.args()?, f.rets()?);
    if args.len() != 1 || rets.len() != 2 {
        return Err(invalid(
            "fep_vmp_infer_policies: expected qs and 2 results (q_pi, G)",
        ));
    }
    let n = args[0].dims.first().copied().unwrap_or(0);
    expect(&args[0], "qs", DT_F32, &[n, m.belief_len])?;
    expect(&rets[0], "q_pi", DT_F32, &[n, m.policies])?;
    expect(&rets[1], "G", DT_F32, &[n, m.policies])?;
    let p = FepVmpPolicyParams {
        gamma: f.attr("gamma")?.unwrap_or(16.0) as f32,
        utility: f.int("utility", Some(1))?,
        state_info_gain: f.int("state_info_gain", Some(1))?,
        param_info_gain: f.int("param_info_gain", Some(0))?,
        skip_input_checks: 0,
    };
    let s = stream(f)?;
    // Safety: as above.
    let status = unsafe {
        fep_vmp_infer_policies(
            m.ptr,
            s,
            &p,
            args[0].data as *const f32,
            n as u64,
            rets[1].data as *mut f32,
            rets[0].data as *mut f32,
        )
    };
    check_status(status, "vmp infer_policies")
}

handlers!(
    fep_xla_cpu_vmp_infer_states,
    fep_xla_cuda_vmp_infer_states,
    "fep_vmp_infer_states",
    states
);
handlers!(
    fep_xla_cpu_vmp_infer_sequence,
    fep_xla_cuda_vmp_infer_sequence,
    "fep_vmp_infer_sequence",
    sequence
);
handlers!(
    fep_xla_cpu_vmp_infer_policies,
    fep_xla_cuda_vmp_infer_policies,
    "fep_vmp_infer_policies",
    policies
);
