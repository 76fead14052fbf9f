//! Predictive-coding settling as XLA FFI handlers, over `fep_settle_infer` and
//! `fep_settle_learn`.
//!
//! Arguments, in order: x0 [B, n_0] f32; (learn) target [B, n_L] f32; W_1 … W_L ([n_l, n_{l-1}],
//! f32, f16 or bf16, one dtype); the biases of the layers listed by the `bias_layers` attribute
//! ([n_l], the weights' dtype); the precision tensors of the layers listed by
//! `precision_layers` (f32, [n_l] a diagonal or [B, n_l] one per sample); with `init` = 1 the
//! start of every free layer (x_1 … x_L when inferring, x_1 … x_{L-1} when learning, f32
//! [B, n_l]), which the Python side aliases to the x results (XLA gives them the same buffers),
//! since the library starts from what x_out holds.
//!
//! Results: energy [B] f32, steps [B] u32, x_1 … x_L and eps_1 … eps_L [B, n_l] f32; learning
//! adds grad_w_l [n_l, n_{l-1}], grad_b_l [n_l] and grad_pi_l ([1] for a scalar precision, [n_l]
//! a diagonal, [B, n_l] per sample), f32, for every layer.
//!
//! Attributes: activations (L FEP_ACT_* codes), alphas (L leaky slopes, or none), precisions (L
//! scalars), bias_layers, precision_layers (increasing 0-based layer indices), eta, momentum,
//! steps, tol, init, log_det, allow_tf32, skip_input_checks.

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use super::{Buf, DT_F32, DT_U32, Frame, Res, check_status, expect, float_code, handlers, invalid};
use crate::ffi::{
    FEP_SETTLE_INIT_FEEDFORWARD, FEP_SETTLE_INIT_GIVEN, FepSettleNet, FepSettleParams,
    fep_settle_infer, fep_settle_learn,
};

/// A list of layer indices from an array attribute: increasing, each below `depth`.
fn layers(f: &Frame<'_>, name: &str, depth: usize) -> Res<Vec<usize>> {
    let v = f.array(name)?;
    let mut out = Vec::with_capacity(v.len());
    for x in v {
        let l = x as usize;
        if x.fract() != 0.0 || x < 0.0 || l >= depth || out.last().is_some_and(|&p| p >= l) {
            return Err(invalid(format!(
                "{name}: expected increasing layer indices in 0..{depth}, got {x}"
            )));
        }
        out.push(l);
    }
    Ok(out)
}

fn run(f: &Frame<'_>, learn: bool) -> Res<()> {
    let op = if learn {
        "fep_settle_learn"
    } else {
        "fep_settle_infer"
    };
    let args = f.args()?;
    let rets = f.rets()?;
    let acts: Vec<i32> = f.array("activations")?.iter().map(|&a| a as i32).collect();
    let depth = acts.len();
    if depth == 0 {
        return Err(invalid(format!(
            "{op}: the activations attribute names no layer"
        )));
    }
    let alphas: Vec<f32> = f.array("alphas")?.iter().map(|&a| a as f32).collect();
    if !alphas.is_empty() && alphas.len() != depth {
        return Err(invalid(format!(
            "alphas: {} values for {depth} layers",
            alphas.len()
        )));
    }
    let scalars: Vec<f32> = f.array("precisions")?.iter().map(|&a| a as f32).collect();
    if !scalars.is_empty() && scalars.len() != depth {
        return Err(invalid(format!(
            "precisions: {} values for {depth} layers",
            scalars.len()
        )));
    }
    let bias_layers = layers(f, "bias_layers", depth)?;
    let pi_layers = layers(f, "precision_layers", depth)?;
    let init = f.int("init", Some(0))? != 0;
    let free = if learn { depth - 1 } else { depth };
    let want = 1
        + usize::from(learn)
        + depth
        + bias_layers.len()
        + pi_layers.len()
        + if init { free } else { 0 };
    if args.len() != want {
        return Err(invalid(format!(
            "{op}: {} arguments, the attributes name {want}",
            args.len()
        )));
    }
    let x0 = args[0];
    let batch = match x0.dims {
        [b, _] => *b,
        d => return Err(invalid(format!("x0: expected [B, n_0], got dims {d:?}"))),
    };
    let mut next = 1;
    let target = if learn {
        next += 1;
        Some(args[1])
    } else {
        None
    };
    let weights: Vec<Buf<'_>> = args[next..next + depth].to_vec();
    next += depth;
    let dtype = float_code(&weights[0], "weights[0]")?;
    let mut widths = vec![x0.dims[1]];
    for (l, w) in weights.iter().enumerate() {
        if float_code(w, "weights")? != dtype {
            return Err(invalid(format!(
                "weights[{l}]: a dtype other than weights[0]'s"
            )));
        }
        match w.dims {
            [n, m] if *m == widths[l] => widths.push(*n),
            d => {
                return Err(invalid(format!(
                    "weights[{l}]: expected [n_{}, {}], got dims {d:?}",
                    l + 1,
                    widths[l]
                )));
            }
        }
    }
    expect(&x0, "x0", DT_F32, &[batch, widths[0]])?;
    if let Some(t) = &target {
        expect(t, "target", DT_F32, &[batch, widths[depth]])?;
    }
    let mut biases: Vec<*mut c_void> = vec![null_mut(); depth];
    for &l in &bias_layers {
        let b = &args[next];
        next += 1;
        if b.dtype != weights[0].dtype || b.dims != [widths[l + 1]] {
            return Err(invalid(format!(
                "biases[{l}]: expected [{}] in the weights' dtype, got dtype {} dims {:?}",
                widths[l + 1],
                b.dtype,
                b.dims
            )));
        }
        biases[l] = b.data;
    }
    let mut diag: Vec<*const f32> = vec![null(); depth];
    let mut per_sample = vec![0i32; depth];
    for &l in &pi_layers {
        let p = &args[next];
        next += 1;
        let n = widths[l + 1];
        if p.dtype != DT_F32 || !(p.dims == [n] || p.dims == [batch, n]) {
            return Err(invalid(format!(
                "precisions[{l}]: expected float32 [{n}] or [{batch}, {n}], got dtype {} dims \
                 {:?}",
                p.dtype, p.dims
            )));
        }
        diag[l] = p.data as *const f32;
        per_sample[l] = i32::from(p.dims.len() == 2);
    }
    // The init arguments were aliased to the x results: nothing to copy (checked below).
    let init_args: Vec<Buf<'_>> = args[next..].to_vec();

    let n_rets = 2 + 2 * depth + if learn { 3 * depth } else { 0 };
    if rets.len() != n_rets {
        return Err(invalid(format!(
            "{op}: {} results, expected {n_rets}",
            rets.len()
        )));
    }
    expect(&rets[0], "energy", DT_F32, &[batch])?;
    if rets[1].dims != [batch] || rets[1].dtype != DT_U32 {
        return Err(invalid("steps: expected uint32 [B]"));
    }
    let mut xs = Vec::with_capacity(depth);
    let mut es = Vec::with_capacity(depth);
    for l in 0..depth {
        let (x, e) = (&rets[2 + l], &rets[2 + depth + l]);
        expect(x, "x", DT_F32, &[batch, widths[l + 1]])?;
        expect(e, "eps", DT_F32, &[batch, widths[l + 1]])?;
        xs.push(x.data as *mut f32);
        es.push(e.data as *mut f32);
    }
    for (l, a) in init_args.iter().enumerate() {
        expect(a, "init", DT_F32, &[batch, widths[l + 1]])?;
        if a.data as *mut f32 != xs[l] {
            return Err(invalid(format!(
                "init[{l}]: must be aliased to the x result {l} (input_output_aliases)"
            )));
        }
    }
    let w_ptrs: Vec<*mut c_void> = weights.iter().map(|w| w.data).collect();
    let widths_u: Vec<u64> = widths.iter().map(|&n| n as u64).collect();
    let net = FepSettleNet {
        layers: depth as u32,
        widths: widths_u.as_ptr(),
        activations: acts.as_ptr(),
        leaky_alpha: if alphas.is_empty() {
            null()
        } else {
            alphas.as_ptr()
        },
        dtype,
        weights: w_ptrs.as_ptr(),
        biases: biases.as_ptr(),
        precision: if scalars.is_empty() {
            null()
        } else {
            scalars.as_ptr()
        },
        precision_diag: diag.as_ptr(),
        precision_per_sample: per_sample.as_ptr(),
    };
    let steps = f.int("steps", None)?;
    let params = FepSettleParams {
        eta: f.req("eta")? as f32,
        momentum: f.attr("momentum")?.unwrap_or(0.0) as f32,
        steps: u32::try_from(steps).map_err(|_| invalid(format!("steps: {steps} < 0")))?,
        tol: f.attr("tol")?.unwrap_or(0.0) as f32,
        init: if init {
            FEP_SETTLE_INIT_GIVEN
        } else {
            FEP_SETTLE_INIT_FEEDFORWARD
        },
        skip_input_checks: f.int("skip_input_checks", Some(0))?,
        log_det: f.int("log_det", Some(0))?,
        allow_tf32: f.int("allow_tf32", Some(0))?,
    };
    let (kind, ordinal, stream) = f.device()?;
    let energy = rets[0].data as *mut f32;
    let steps_out = rets[1].data as *mut u32;
    let status = if learn {
        let mut gw = Vec::with_capacity(depth);
        let mut gb = Vec::with_capacity(depth);
        let mut gp = Vec::with_capacity(depth);
        for l in 0..depth {
            let n = widths[l + 1] as i64;
            let (w, b, p) = (
                &rets[2 + 2 * depth + l],
                &rets[2 + 3 * depth + l],
                &rets[2 + 4 * depth + l],
            );
            expect(w, "grad_w", DT_F32, &[n, widths[l]])?;
            expect(b, "grad_b", DT_F32, &[n])?;
            let pdims: Vec<i64> = if diag[l].is_null() {
                vec![1]
            } else if per_sample[l] != 0 {
                vec![batch, n]
            } else {
                vec![n]
            };
            expect(p, "grad_pi", DT_F32, &pdims)?;
            gw.push(w.data as *mut f32);
            gb.push(b.data as *mut f32);
            gp.push(p.data as *mut f32);
        }
        // Safety: every pointer is an XLA buffer whose dims were checked above.
        unsafe {
            fep_settle_learn(
                kind,
                ordinal,
                stream,
                &net,
                &params,
                batch as u64,
                x0.data as *const f32,
                target.map_or(null(), |t| t.data as *const f32),
                xs.as_ptr(),
                es.as_ptr(),
                energy,
                null_mut(),
                steps_out,
                gw.as_ptr(),
                gb.as_ptr(),
                gp.as_ptr(),
                0.0,
            )
        }
    } else {
        // Safety: as above.
        unsafe {
            fep_settle_infer(
                kind,
                ordinal,
                stream,
                &net,
                &params,
                batch as u64,
                x0.data as *const f32,
                xs.as_ptr(),
                es.as_ptr(),
                energy,
                null_mut(),
                steps_out,
            )
        }
    };
    check_status(
        status,
        if learn {
            "settle learn"
        } else {
            "settle infer"
        },
    )
}

fn infer(f: &Frame<'_>) -> Res<()> {
    run(f, false)
}

fn learn(f: &Frame<'_>) -> Res<()> {
    run(f, true)
}

handlers!(
    fep_xla_cpu_settle_infer,
    fep_xla_cuda_settle_infer,
    "fep_settle_infer",
    infer
);
handlers!(
    fep_xla_cpu_settle_learn,
    fep_xla_cuda_settle_learn,
    "fep_settle_learn",
    learn
);
