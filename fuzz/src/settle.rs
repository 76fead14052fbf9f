//! The arguments of fep_settle_infer and fep_settle_learn: a fuzzed `FepSettleNet`, params and
//! the per-layer outputs, every array sized as the C ABI documents for the fuzzed widths.

use arbitrary::Arbitrary;

use crate::*;

/// One layer's choices (layers beyond the fourth reuse them cyclically).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct LayerSpec {
    pub act: Code,
    pub alpha: Real,
    pub w: Ptr,
    pub bias: Option<Ptr>,
    pub precision: Real,
    pub diag: Option<Ptr>,
    pub x_out: Ptr,
    pub eps_out: Ptr,
    pub grad_w: Ptr,
    pub grad_b: Ptr,
}

/// A fuzzed `FepSettleNet`.
#[derive(Arbitrary, Debug, Clone)]
pub struct NetSpec {
    pub layers: Count,
    pub widths: [Dim; 4],
    pub dtype: DType,
    pub widths_ptr: Ptr,
    pub activations_ptr: Ptr,
    pub leaky_alpha: Option<Ptr>,
    pub weights_ptr: Ptr,
    pub biases: Option<Ptr>,
    pub precision: Option<Ptr>,
    pub precision_diag: Option<Ptr>,
    pub layer: [LayerSpec; 4],
}

/// Fuzzed `FepSettleParams`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ParamsSpec {
    pub eta: Real,
    pub momentum: Real,
    pub steps: Count,
    pub tol: Real,
    pub init: Code,
    pub skip_input_checks: Flag,
    pub log_det: Flag,
    pub allow_tf32: Flag,
}

impl ParamsSpec {
    pub fn get(&self) -> ffi::FepSettleParams {
        ffi::FepSettleParams {
            eta: self.eta.get_f32(0.0, 0.4),
            momentum: self.momentum.get_f32(0.0, 0.99),
            steps: self.steps.get(12),
            tol: self.tol.get_f32(0.0, 0.01),
            init: self.init.get(2),
            skip_input_checks: self.skip_input_checks.get(),
            log_det: self.log_det.get(),
            allow_tf32: self.allow_tf32.get(),
        }
    }
}

/// The common arguments of both calls.
#[derive(Arbitrary, Debug, Clone)]
pub struct SettleArgs {
    pub device: Device,
    pub net: Nullable<NetSpec>,
    pub params: Nullable<ParamsSpec>,
    pub batch: Dim,
    pub x0: Ptr,
    pub x_out: Ptr,
    pub eps_out: Ptr,
    pub energy: Ptr,
    pub trace: Ptr,
    pub steps_out: Ptr,
    pub values: Values,
}

/// Which call: learn has the target, gradients and lr.
pub struct Learn {
    pub target: Ptr,
    pub grad_w: Ptr,
    pub grad_b: Ptr,
    pub lr: f32,
}

/// A built call: the C structs (pointing into the [`Call`]'s buffers) and the buffer ids.
pub struct Built {
    pub net: Option<Box<ffi::FepSettleNet>>,
    pub params: Option<Box<ffi::FepSettleParams>>,
    pub batch: u64,
    pub x0: Id,
    pub target: Option<Id>,
    pub x_out: Id,
    pub eps_out: Id,
    pub energy: Id,
    pub trace: Id,
    pub steps_out: Id,
    pub grad_w: Option<Id>,
    pub grad_b: Option<Id>,
}

impl Built {
    pub fn net_ptr(&self) -> *const ffi::FepSettleNet {
        self.net
            .as_deref()
            .map_or(std::ptr::null(), |n| n as *const _)
    }

    pub fn params_ptr(&self) -> *const ffi::FepSettleParams {
        self.params
            .as_deref()
            .map_or(std::ptr::null(), |p| p as *const _)
    }
}

/// The most layers a fuzz input builds buffers for (a larger count gets arrays sized for it
/// only when they fit [`CAP_BYTES`]).
const MAX_LAYERS: u64 = (CAP_BYTES / 8) as u64;

/// Builds every buffer of the call in `c` and allocates them; None: skip the input.
pub fn build(c: &mut Call, a: &SettleArgs, learn: Option<&Learn>) -> Option<Built> {
    let params = a.params.as_ref().map(|p| p.get());
    let batch = a.batch.get(3);
    // Without a net there is nothing to size: L = 1, widths 1 (the call must fail on NULL).
    let spec = a.net.as_ref().cloned();
    let layers = spec.as_ref().map_or(1, |n| n.layers.get(3)) as u64;
    let widths: Vec<u64> = (0..=layers.min(MAX_LAYERS))
        .map(|l| spec.as_ref().map_or(1, |n| n.widths[l as usize % 4].get(4)))
        .collect();
    let depth = layers.min(MAX_LAYERS) as usize;
    let steps = params.map_or(1, |p| p.steps) as u64;
    let lr_param = learn.is_some_and(|l| l.lr != 0.0);
    let wrole = if lr_param { Role::Param } else { Role::In };
    let dtype = spec.as_ref().map_or(DType::F32, |n| n.dtype);
    let wty = dtype.ty();
    let unit = Fill::Range(-1.0, 1.0);
    let null_or = |p: Option<Ptr>| p.unwrap_or(Ptr::Null);
    let l128 = Some(layers as u128);

    // The net's host arrays.
    let n = spec.as_ref();
    let widths_id = c.buf(
        "net.widths",
        Ty::U64,
        Role::Desc,
        add(l128, Some(1)),
        n.map_or(Ptr::Null, |n| n.widths_ptr),
        Fill::Target,
    );
    let acts = c.buf(
        "net.activations",
        Ty::I32,
        Role::Desc,
        l128,
        n.map_or(Ptr::Null, |n| n.activations_ptr),
        Fill::Target,
    );
    let alpha = c.buf(
        "net.leaky_alpha",
        Ty::F32,
        Role::Desc,
        l128,
        null_or(n.and_then(|n| n.leaky_alpha)),
        Fill::Target,
    );
    let weights = c.buf(
        "net.weights",
        Ty::Ptr,
        Role::Desc,
        l128,
        n.map_or(Ptr::Null, |n| n.weights_ptr),
        Fill::Target,
    );
    let biases = c.buf(
        "net.biases",
        Ty::Ptr,
        Role::Desc,
        l128,
        null_or(n.and_then(|n| n.biases)),
        Fill::Target,
    );
    let precision = c.buf(
        "net.precision",
        Ty::F32,
        Role::Desc,
        l128,
        null_or(n.and_then(|n| n.precision)),
        Fill::Target,
    );
    let diags = c.buf(
        "net.precision_diag",
        Ty::Ptr,
        Role::Desc,
        l128,
        null_or(n.and_then(|n| n.precision_diag)),
        Fill::Target,
    );
    // The call's pointer lists.
    let x_out = c.buf("x_out", Ty::Ptr, Role::Desc, l128, a.x_out, Fill::Target);
    let eps_out = c.buf(
        "eps_out",
        Ty::Ptr,
        Role::Desc,
        l128,
        a.eps_out,
        Fill::Target,
    );
    let (grad_w, grad_b) = match learn {
        Some(l) => (
            Some(c.buf("grad_w", Ty::Ptr, Role::Desc, l128, l.grad_w, Fill::Target)),
            Some(c.buf("grad_b", Ty::Ptr, Role::Desc, l128, l.grad_b, Fill::Target)),
        ),
        None => (None, None),
    };
    // Per layer tensors.
    let mut per_layer = Vec::new();
    let mut work = Some(0u128);
    for l in 0..depth {
        let ls = n.map_or_else(|| default_layer(), |n| n.layer[l % 4]);
        let (nl, nin) = (widths[l + 1], widths[l]);
        let wl = elems(&[nl, nin]);
        let rows = elems(&[batch, nl]);
        work = add(work, wl);
        let scale = 1.0 / (nin.clamp(1, 1 << 20) as f64).sqrt();
        per_layer.push((
            c.buf(
                format!("W[{l}]"),
                wty,
                wrole,
                wl,
                ls.w,
                Fill::Range(-scale, scale),
            ),
            ls.bias
                .map(|p| c.buf(format!("b[{l}]"), wty, wrole, elems(&[nl]), p, unit)),
            ls.diag.map(|p| {
                c.buf(
                    format!("precision_diag[{l}]"),
                    Ty::F32,
                    Role::In,
                    elems(&[nl]),
                    p,
                    Fill::Range(0.25, 2.0),
                )
            }),
            c.buf(
                format!("x_out[{l}]"),
                Ty::F32,
                Role::Out,
                rows,
                ls.x_out,
                unit,
            ),
            c.buf(
                format!("eps_out[{l}]"),
                Ty::F32,
                Role::Out,
                rows,
                ls.eps_out,
                SENTINEL,
            ),
            learn.map(|_| {
                (
                    c.buf(
                        format!("grad_w[{l}]"),
                        Ty::F32,
                        Role::Out,
                        wl,
                        ls.grad_w,
                        SENTINEL,
                    ),
                    c.buf(
                        format!("grad_b[{l}]"),
                        Ty::F32,
                        Role::Out,
                        elems(&[nl]),
                        ls.grad_b,
                        SENTINEL,
                    ),
                )
            }),
            ls,
        ));
    }
    let x0 = c.buf(
        "x0",
        Ty::F32,
        Role::In,
        elems(&[batch, widths[0]]),
        a.x0,
        unit,
    );
    let target = learn.map(|l| {
        c.buf(
            "target",
            Ty::F32,
            Role::In,
            elems(&[batch, widths[depth.max(1).min(widths.len() - 1)]]),
            l.target,
            unit,
        )
    });
    let energy = c.buf(
        "energy_out",
        Ty::F32,
        Role::Out,
        elems(&[batch]),
        a.energy,
        SENTINEL,
    );
    let trace = c.buf(
        "trace_out",
        Ty::F32,
        Role::Out,
        mul(elems(&[batch]), add(Some(steps as u128), Some(1))),
        a.trace,
        SENTINEL,
    );
    let steps_out = c.buf(
        "steps_out",
        Ty::U32,
        Role::Out,
        elems(&[batch]),
        a.steps_out,
        SENTINEL,
    );
    // Work: every step a forward and a backward pass over every weight, per sample.
    c.work(mul(
        mul(
            work,
            mul(elems(&[batch.max(1)]), add(Some(steps as u128), Some(2))),
        ),
        Some(4),
    ));
    if !c.alloc() {
        return None;
    }
    // The host arrays' contents.
    for (l, &w) in widths.iter().enumerate() {
        if c.len(widths_id).is_some_and(|n| l < n) {
            c.set_u64(widths_id, l, w);
        }
    }
    let layer_at = |l: usize| n.map_or_else(default_layer, |n| n.layer[l % 4]);
    for l in 0..depth {
        let ls = layer_at(l);
        let (w, b, d, xo, eo, g, _) = &per_layer[l];
        if c.len(acts).is_some() {
            c.set(acts, l, ls.act.get(6) as f64);
        }
        if c.len(alpha).is_some() {
            c.set(alpha, l, ls.alpha.get(0.0, 0.5));
        }
        if c.len(precision).is_some() {
            c.set(precision, l, ls.precision.get(0.1, 3.0));
        }
        let p = c.ptr::<u8>(*w);
        c.set_ptr(weights, l, p);
        let p = b.map_or(std::ptr::null_mut(), |b| c.ptr::<u8>(b));
        c.set_ptr(biases, l, p);
        let p = d.map_or(std::ptr::null_mut(), |d| c.ptr::<u8>(d));
        c.set_ptr(diags, l, p);
        let p = c.ptr::<u8>(*xo);
        c.set_ptr(x_out, l, p);
        let p = c.ptr::<u8>(*eo);
        c.set_ptr(eps_out, l, p);
        if let (Some((gw, gb)), Some(lw), Some(lb)) = (g, grad_w, grad_b) {
            let p = c.ptr::<u8>(*gw);
            c.set_ptr(lw, l, p);
            let p = c.ptr::<u8>(*gb);
            c.set_ptr(lb, l, p);
        }
    }
    // Tensors in a list the library does not get are not handed to it.
    for (w, b, d, xo, eo, g, _) in &per_layer {
        for (id, list) in [
            (Some(*w), Some(weights)),
            (*b, Some(biases)),
            (*d, Some(diags)),
            (Some(*xo), Some(x_out)),
            (Some(*eo), Some(eps_out)),
            (g.map(|g| g.0), grad_w),
            (g.map(|g| g.1), grad_b),
        ] {
            if let (Some(id), Some(list)) = (id, list) {
                // (Without a net its lists are NULL too.)
                if !c.has(list) {
                    c.unused(id);
                }
            }
        }
    }
    let net = n.map(|n| {
        Box::new(ffi::FepSettleNet {
            layers: n.layers.get(3),
            widths: c.ptr(widths_id),
            activations: c.ptr(acts),
            leaky_alpha: c.ptr(alpha),
            dtype: dtype.code(),
            weights: c.ptr(weights),
            biases: c.ptr(biases),
            precision: c.ptr(precision),
            precision_diag: c.ptr(diags),
            precision_per_sample: std::ptr::null(),
        })
    });
    c.note(format!("net {:?}", net.as_deref()));
    c.note(format!(
        "widths {widths:?}, batch {batch}, params {params:?}"
    ));
    Some(Built {
        net,
        params: params.map(Box::new),
        batch,
        x0,
        target,
        x_out,
        eps_out,
        energy,
        trace,
        steps_out,
        grad_w,
        grad_b,
    })
}

fn default_layer() -> LayerSpec {
    LayerSpec {
        act: Code::Valid(0),
        alpha: Real::In(0),
        w: Ptr::Valid,
        bias: None,
        precision: Real::In(128),
        diag: None,
        x_out: Ptr::Valid,
        eps_out: Ptr::Valid,
        grad_w: Ptr::Valid,
        grad_b: Ptr::Valid,
    }
}
