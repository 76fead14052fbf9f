//! LCA sparse coding ([`crate::lca`]) over candle tensors.

use candle_core::Tensor;

use super::{Input, crate_err, dims, output, with_float_type};
use crate::ViewMut;
use crate::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec};

const OP: &str = "lca";

/// The outputs of [`lca_solve_with`]: new contiguous candle CPU tensors.
#[derive(Debug)]
pub struct LcaTensors {
    /// u after the last step, `[batch, m]` f32.
    pub u: Tensor,
    /// a = θ(u), `[batch, m]` f32.
    pub a: Tensor,
    /// Steps each sample ran, `[batch]` u32.
    pub steps: Tensor,
    /// ½‖x − Φa‖² + λ‖a‖₁ after each step, `[batch, steps]` f32, when the spec asks for a trace.
    pub energy: Option<Tensor>,
    /// Nonzero a after each step, `[batch, steps]` u32, when the spec asks for a trace.
    pub active: Option<Tensor>,
}

/// A prepared [`Dictionary`] (on the crate's CPU device) from Φ `[n, m]` (f32, f16 or bf16,
/// contiguous, read in place; the dictionary keeps its own f64 copy and G = ΦᵀΦ − I). Errors:
/// rank, dtype, layout, a tensor not in CPU storage, and everything [`Dictionary::new`] rejects
/// (NaN/Inf, columns not of unit norm with `check_unit_norm`).
pub fn dictionary(phi: &Tensor, opts: DictionaryOptions) -> candle_core::Result<Dictionary> {
    let [n, m] = dims::<2>(OP, "phi", phi, "[n, m]")?;
    let p = Input::new(OP, "phi", phi)?;
    with_float_type!(OP, "phi", p.dtype(), |T| {
        Dictionary::new(&p.view::<T>()?, n, m, opts).map_err(crate_err(OP))
    })
}

/// Codes x `[batch, n]` with the dictionary Φ `[n, m]` and returns (u, a), each `[batch, m]`
/// f32. Prepares the dictionary on every call (unit-norm columns are checked): to code many
/// batches with one Φ, make it once with [`dictionary`] and call [`lca_solve_with`].
pub fn lca_solve(
    phi: &Tensor,
    x: &Tensor,
    spec: &LcaSpec,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dict = dictionary(phi, DictionaryOptions::default())?;
    let out = lca_solve_with(&dict, x, spec, None)?;
    Ok((out.u, out.a))
}

/// [`Dictionary::solve`] on candle tensors: codes x `[batch, n]` (f32, f16 or bf16, contiguous,
/// read in place) starting from u₀ `[batch, m]` (f32, contiguous) or 0. Bitwise the crate's
/// result. Errors: ranks, dtypes, layouts, tensors not in CPU storage, a dictionary on a GPU
/// device, and everything [`Dictionary::solve_into`] rejects.
pub fn lca_solve_with(
    dict: &Dictionary,
    x: &Tensor,
    spec: &LcaSpec,
    u0: Option<&Tensor>,
) -> candle_core::Result<LcaTensors> {
    cpu_dictionary(dict)?;
    let [batch, n] = dims::<2>(OP, "x", x, "[batch, n]")?;
    let m = dict.m();
    if n != dict.n() {
        candle_core::bail!(
            "fep_kernels {OP}: x is [{batch}, {n}], the dictionary codes samples of length {}",
            dict.n()
        );
    }
    if let Some(u0) = u0 {
        let d = dims::<2>(OP, "u0", u0, "[batch, m]")?;
        if d != [batch, m] {
            candle_core::bail!("fep_kernels {OP}: u0 is {d:?}, expected [{batch}, {m}]");
        }
    }
    // Reject before allocating [batch, steps] trace buffers (the crate checks the rest).
    if spec.steps == 0 || spec.steps > i32::MAX as u32 {
        candle_core::bail!(
            "fep_kernels {OP}: steps must be in 1..=2^31-1, got {}",
            spec.steps
        );
    }
    let xi = Input::new(OP, "x", x)?;
    let u0i = u0.map(|t| Input::new(OP, "u0", t)).transpose()?;
    let u0v = u0i.as_ref().map(|i| i.view::<f32>()).transpose()?;
    let (bm, bt) = (batch * m, batch * spec.steps as usize);
    // The trace is batch x T: sized by a parameter, so allocated fallibly.
    let err = crate_err(OP);
    let what = || format!("an LCA trace of {batch} x {} steps", spec.steps);
    let mut u = vec![0f32; bm];
    let mut a = vec![0f32; bm];
    let mut steps = vec![0u32; batch];
    let mut energy = if spec.trace {
        Some(crate::alloc::zeroed::<f32>(bt, what).map_err(&err)?)
    } else {
        None
    };
    let mut active = if spec.trace {
        Some(crate::alloc::zeroed::<u32>(bt, what).map_err(&err)?)
    } else {
        None
    };
    let stream = dict.device().default_stream();
    with_float_type!(OP, "x", xi.dtype(), |T| {
        let out = LcaOutputs {
            u: ViewMut::host(&mut u),
            a: ViewMut::host(&mut a),
            energy: energy.as_deref_mut().map(ViewMut::host),
            active: active.as_deref_mut().map(ViewMut::host),
            steps: Some(ViewMut::host(&mut steps)),
        };
        dict.solve_into(spec, &xi.view::<T>()?, u0v.as_ref(), out, stream)
            .map_err(crate_err(OP))?
    });
    let trace = [batch, spec.steps as usize];
    Ok(LcaTensors {
        u: output(u, &[batch, m])?,
        a: output(a, &[batch, m])?,
        steps: output(steps, &[batch])?,
        energy: energy.map(|e| output(e, &trace)).transpose()?,
        active: active.map(|c| output(c, &trace)).transpose()?,
    })
}

/// [`Dictionary::learn`] on candle tensors: one dictionary-learning step on x `[batch, n]`
/// (f32, f16 or bf16) with its codes a `[batch, m]` (f32), both contiguous and read in place.
/// The dictionary is updated in place; [`dictionary_phi`] returns the new Φ.
pub fn lca_learn(
    dict: &mut Dictionary,
    x: &Tensor,
    a: &Tensor,
    lr: f32,
) -> candle_core::Result<()> {
    cpu_dictionary(dict)?;
    let [batch, n] = dims::<2>(OP, "x", x, "[batch, n]")?;
    let da = dims::<2>(OP, "a", a, "[batch, m]")?;
    if n != dict.n() || da != [batch, dict.m()] {
        candle_core::bail!(
            "fep_kernels {OP}: x {:?} and a {da:?} must be [batch, {}] and [batch, {}]",
            [batch, n],
            dict.n(),
            dict.m()
        );
    }
    let xi = Input::new(OP, "x", x)?;
    let ai = Input::new(OP, "a", a)?;
    let av = ai.view::<f32>()?;
    let stream = dict.device().default_stream();
    with_float_type!(OP, "x", xi.dtype(), |T| {
        dict.learn(&xi.view::<T>()?, &av, lr, stream)
            .map_err(crate_err(OP))
    })
}

/// The dictionary's Φ `[n, m]` as a new f32 candle CPU tensor.
pub fn dictionary_phi(dict: &Dictionary) -> candle_core::Result<Tensor> {
    let phi = dict.phi().map_err(crate_err(OP))?;
    output(phi, &[dict.n(), dict.m()])
}

fn cpu_dictionary(dict: &Dictionary) -> candle_core::Result<()> {
    if dict.device().is_gpu() {
        candle_core::bail!(
            "fep_kernels {OP}: the dictionary is on {:?}; the candle ops need one on the CPU \
             device (make it with fep_kernels::candle::dictionary)",
            dict.device()
        );
    }
    Ok(())
}
