//! LCA sparse coding as XLA FFI handlers. XLA calls are functional: each call prepares a
//! dictionary from the Φ it is given (`fep_lca_dict_new`: a copy and G = ΦᵀΦ − I, O(n m²), the
//! work a JAX user's own code would repeat inside jit too), runs the op and frees it.
//!
//! `fep_lca_solve`: arguments phi [n, m] (f32, f16 or bf16), x [B, n] (phi's dtype), with
//! `warm` = 1 also u0 [B, m] f32. Results u, a [B, m] f32 and steps [B] u32. Attributes:
//! threshold (FEP_LCA_*), lam, eta (0: automatic, 1/λ_max), steps, tol, tol_mode,
//! check_unit_norm, warm.
//!
//! `fep_lca_learn`: arguments phi [n, m], x [B, n] (phi's dtype), a [B, m] f32; result the
//! updated Φ [n, m] f32 (one step Φ += (lr / B) Σ_b (x_b − Φ a_b) a_bᵀ, columns renormalised).
//! Attributes: lr, check_unit_norm.

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use super::{DT_F32, DT_U32, Frame, Res, check_status, expect, float_code, handlers, invalid};
use crate::ffi::{
    FepLcaDict, FepLcaParams, fep_lca_dict_free, fep_lca_dict_learn, fep_lca_dict_new,
    fep_lca_dict_phi, fep_lca_solve,
};

/// A dictionary handle freed on drop.
struct Dict(*mut FepLcaDict);

impl Drop for Dict {
    fn drop(&mut self) {
        // Safety: a handle fep_lca_dict_new returned (or null: a no-op).
        unsafe { fep_lca_dict_free(self.0) }
    }
}

/// (dict, dtype code, n, m) prepared from the phi argument.
fn dict(f: &Frame<'_>, phi: &super::Buf<'_>) -> Res<(Dict, i32, i64, i64)> {
    let dtype = float_code(phi, "phi")?;
    let (n, m) = match phi.dims {
        [n, m] => (*n, *m),
        d => return Err(invalid(format!("phi: expected [n, m], got dims {d:?}"))),
    };
    let (kind, ordinal, stream) = f.device()?;
    let mut out: *mut FepLcaDict = null_mut();
    let check = f.int("check_unit_norm", Some(1))?;
    // Safety: phi is an XLA buffer of n·m elements of its dtype.
    let status = unsafe {
        fep_lca_dict_new(
            kind,
            ordinal,
            stream,
            dtype,
            phi.data as *const c_void,
            n as u64,
            m as u64,
            check,
            &mut out,
        )
    };
    check_status(status, "lca dictionary")?;
    Ok((Dict(out), dtype, n, m))
}

fn solve(f: &Frame<'_>) -> Res<()> {
    let args = f.args()?;
    let rets = f.rets()?;
    let warm = f.int("warm", Some(0))? != 0;
    if args.len() != 2 + usize::from(warm) || rets.len() != 3 {
        return Err(invalid(format!(
            "fep_lca_solve: expected phi, x{} and 3 results, got {} arguments and {} results",
            if warm { ", u0" } else { "" },
            args.len(),
            rets.len()
        )));
    }
    let (d, dtype, n, m) = dict(f, &args[0])?;
    let x = &args[1];
    let batch = match x.dims {
        [b, k] if *k == n => *b,
        dims => return Err(invalid(format!("x: expected [B, {n}], got dims {dims:?}"))),
    };
    if x.dtype != args[0].dtype {
        return Err(invalid("x: a dtype other than phi's"));
    }
    let u0 = if warm {
        expect(&args[2], "u0", DT_F32, &[batch, m])?;
        args[2].data as *const f32
    } else {
        null()
    };
    expect(&rets[0], "u", DT_F32, &[batch, m])?;
    expect(&rets[1], "a", DT_F32, &[batch, m])?;
    expect(&rets[2], "steps", DT_U32, &[batch])?;
    let steps = f.int("steps", None)?;
    let params = FepLcaParams {
        threshold: f.int("threshold", Some(0))?,
        lambda: f.req("lam")? as f32,
        eta: f.attr("eta")?.unwrap_or(0.0) as f32,
        steps: u32::try_from(steps).map_err(|_| invalid(format!("steps: {steps} < 0")))?,
        tol: f.attr("tol")?.unwrap_or(0.0) as f32,
        tol_mode: f.int("tol_mode", Some(0))?,
        allow_tf32: 0,
    };
    let (_, _, stream) = f.device()?;
    // Safety: XLA buffers whose dims were checked; the handle is live.
    let status = unsafe {
        fep_lca_solve(
            d.0,
            stream,
            dtype,
            x.data as *const c_void,
            batch as u64,
            &params,
            u0,
            rets[0].data as *mut f32,
            rets[1].data as *mut f32,
            null_mut(),
            null_mut(),
            rets[2].data as *mut u32,
        )
    };
    check_status(status, "lca solve")
}

fn learn(f: &Frame<'_>) -> Res<()> {
    let args = f.args()?;
    let rets = f.rets()?;
    if args.len() != 3 || rets.len() != 1 {
        return Err(invalid(format!(
            "fep_lca_learn: expected phi, x, a and 1 result, got {} arguments and {} results",
            args.len(),
            rets.len()
        )));
    }
    let (d, dtype, n, m) = dict(f, &args[0])?;
    let (x, a) = (&args[1], &args[2]);
    let batch = match x.dims {
        [b, k] if *k == n => *b,
        dims => return Err(invalid(format!("x: expected [B, {n}], got dims {dims:?}"))),
    };
    if x.dtype != args[0].dtype {
        return Err(invalid("x: a dtype other than phi's"));
    }
    expect(a, "a", DT_F32, &[batch, m])?;
    expect(&rets[0], "phi_out", DT_F32, &[n, m])?;
    let lr = f.req("lr")? as f32;
    let (_, _, stream) = f.device()?;
    // Safety: as for solve; phi_out holds n·m f32.
    unsafe {
        check_status(
            fep_lca_dict_learn(
                d.0,
                stream,
                dtype,
                x.data as *const c_void,
                a.data as *const f32,
                batch as u64,
                lr,
            ),
            "lca learn",
        )?;
        check_status(
            fep_lca_dict_phi(d.0, stream, rets[0].data as *mut f32),
            "lca learn",
        )
    }
}

handlers!(
    fep_xla_cpu_lca_solve,
    fep_xla_cuda_lca_solve,
    "fep_lca_solve",
    solve
);
handlers!(
    fep_xla_cpu_lca_learn,
    fep_xla_cuda_lca_learn,
    "fep_lca_learn",
    learn
);
