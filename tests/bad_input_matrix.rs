//! The bad-input matrix of README.md ("Bad input"): one probe per cell (input class x op), run
//! here, and the table generated from what the probes return. The test fails when a probe
//! panics, when a cell's outcome is not the kind it is meant to be (`expect`), or when README's
//! table is not the generated one (`FEP_BLESS=1 cargo test --test bad_input_matrix` rewrites it).

use std::ptr::null_mut;

use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, Tensor4, Tensor4Mut,
};
use fep_kernels::ffi;
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec};
use fep_kernels::settle::{self, Activation, Layer, Network, Precision, SettleOutputs, SettleSpec};
use fep_kernels::vmp::{self, FpiSpec, Model, ModelSpec, Obs, StatesOutputs};
use fep_kernels::{Device, Error, View, ViewMut};

/// What a cell must be.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Invalid,
    Oom,
    Diverged,
    /// Accepted by design (documented in the cell).
    Accepted,
}

struct Cell {
    class: &'static str,
    op: &'static str,
    expect: Kind,
    probe: fn() -> Result<(), Error>,
}

const OPS: [&str; 4] = ["attention", "settling", "LCA", "VMP"];

fn cpu() -> Device {
    Device::cpu()
}

// ---- fixtures: tiny valid problems each probe breaks in one way --------------------------------

const Q: [f32; 8] = [0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, 0.8];

fn t4(data: &[f32], shape: [usize; 4]) -> Tensor4<'_, f32> {
    Tensor4::bhld(View::host(data), shape)
}

fn attn(q: &Tensor4<'_, f32>, p: &Precisions<'_>, spec: AttentionSpec) -> Result<(), Error> {
    let kv = t4(&Q, [1, 1, 2, 4]);
    attention::forward(&spec, q, &kv, &kv, p, None).map(drop)
}

fn dot() -> AttentionSpec {
    AttentionSpec::new(Score::Dot)
}

const W1: [f32; 6] = [0.5, -0.2, 0.1, 0.3, -0.4, 0.2];
const W2: [f32; 3] = [0.3, -0.1, 0.6];

fn net<'a>(w1: &'a [f32], p: Precision<'a>) -> Result<Network<'a, f32>, Error> {
    Network::new(
        &[2, 3, 1],
        vec![
            Layer::new(View::host(w1), Activation::Tanh, p),
            Layer::new(
                View::host(&W2),
                Activation::Identity,
                Precision::Scalar(1.0),
            ),
        ],
    )
}

fn infer(x0: &[f32], spec: SettleSpec) -> Result<(), Error> {
    settle::infer(
        &net(&W1, Precision::Scalar(1.0))?,
        &spec,
        &View::host(x0),
        None,
    )
    .map(drop)
}

const PHI: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

fn dict() -> Dictionary {
    Dictionary::new(&View::host(&PHI), 2, 2, DictionaryOptions::default()).unwrap()
}

fn solve(x: &[f32], spec: LcaSpec) -> Result<(), Error> {
    dict().solve(&spec, &View::host(x), None).map(drop)
}

fn model() -> Model {
    let spec = ModelSpec {
        num_states: vec![2],
        num_obs: vec![2],
        a_deps: vec![vec![0]],
        a: vec![vec![0.9, 0.1, 0.1, 0.9]],
        b: vec![vec![1.0, 0.0, 0.0, 1.0]],
        ..Default::default()
    };
    Model::new(&cpu(), &spec).unwrap()
}

fn states(obs: &Obs<'_>, prior: Option<&View<'_, f32>>, spec: FpiSpec) -> Result<(), Error> {
    vmp::infer_states(&model(), &spec, obs, prior).map(drop)
}

fn last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(ffi::fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A C ABI status as the matching error (the message from fep_last_error).
fn from_status(status: i32) -> Result<(), Error> {
    match status {
        ffi::FEP_OK => Ok(()),
        ffi::FEP_ERR_INVALID_ARGUMENT => {
            let msg = last_error();
            let name = msg.split('`').nth(1).unwrap_or("?").to_string();
            Err(Error::invalid(name, msg))
        }
        other => panic!("status {other}: {}", last_error()),
    }
}

fn lca_dict_new(phi: *const f32, dtype: i32) -> Result<(), Error> {
    let mut h = null_mut();
    let s = unsafe {
        ffi::fep_lca_dict_new(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            dtype,
            phi.cast(),
            2,
            2,
            1,
            &mut h,
        )
    };
    unsafe { ffi::fep_lca_dict_free(h) };
    from_status(s)
}

/// fep_attention_forward on tiny host tensors, after `edit` breaks one argument.
fn c_attention(
    edit: fn(&mut ffi::FepAttentionParams, &mut [ffi::FepAttnTensor; 4]),
) -> Result<(), Error> {
    let mut buf = [0.25f32; 64];
    let base = buf.as_mut_ptr();
    let t = |off: usize| ffi::FepAttnTensor {
        data: unsafe { base.add(off) }.cast(),
        shape: [1, 1, 2, 4],
        strides: [8, 8, 4],
    };
    let mut ts = [t(0), t(8), t(16), t(32)];
    let mut params = ffi::FepAttentionParams {
        score: ffi::FEP_SCORE_DOT,
        nu: 1.0,
        scale: 0.0,
        causal: 0,
        window: 0,
        normalizer: 1,
        skip_input_checks: 0,
    };
    edit(&mut params, &mut ts);
    let [q, k, v, o] = ts;
    let q = if q.data.is_null() {
        std::ptr::null()
    } else {
        &q as *const _
    };
    let n = std::ptr::null::<f32>();
    from_status(unsafe {
        ffi::fep_attention_forward(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params,
            ffi::FEP_DTYPE_F32,
            q,
            &k,
            &v,
            n,
            n,
            std::ptr::null(),
            &o,
            null_mut(),
            null_mut(),
        )
    })
}

/// fep_settle_infer of a one-layer tanh network [2 -> 1], batch 1, after `edit`.
fn c_settle(edit: fn(&mut ffi::FepSettleNet, &mut *const f32)) -> Result<(), Error> {
    let widths = [2u64, 1];
    let acts = [ffi::FEP_ACT_TANH];
    let w = [0.5f32, -0.5];
    let weights = [w.as_ptr() as *mut std::ffi::c_void];
    let mut net = ffi::FepSettleNet {
        layers: 1,
        widths: widths.as_ptr(),
        activations: acts.as_ptr(),
        leaky_alpha: std::ptr::null(),
        dtype: ffi::FEP_DTYPE_F32,
        weights: weights.as_ptr(),
        biases: std::ptr::null(),
        precision: std::ptr::null(),
        precision_diag: std::ptr::null(),
        precision_per_sample: std::ptr::null(),
    };
    let params = ffi::FepSettleParams {
        eta: 0.1,
        momentum: 0.0,
        steps: 5,
        tol: 0.0,
        init: 0,
        skip_input_checks: 0,
        log_det: 0,
        allow_tf32: 0,
    };
    let x0buf = [0u32; 3];
    let mut x0 = x0buf.as_ptr().cast::<f32>();
    edit(&mut net, &mut x0);
    let (mut x1, mut e1) = ([0f32; 1], [0f32; 1]);
    let xs = [x1.as_mut_ptr()];
    let es = [e1.as_mut_ptr()];
    let n = null_mut();
    from_status(unsafe {
        ffi::fep_settle_infer(
            ffi::FEP_DEVICE_CPU,
            0,
            n,
            &net,
            &params,
            1,
            x0,
            xs.as_ptr(),
            es.as_ptr(),
            n.cast(),
            n.cast(),
            n.cast(),
        )
    })
}

// ---- the cells ---------------------------------------------------------------------------------

const EMPTY: &str = "empty: a zero dimension, no sample";
const LENGTH: &str = "a length that does not match the shape";
const OVERFLOW: &str = "sizes or strides whose product overflows";
const ALIAS: &str = "strides that make rows overlap";
const PARAM: &str = "NaN, Inf or out-of-range parameter (η, λ, τ, ν, steps)";
const DATA: &str = "NaN or Inf in tensor data";
const PRECISION: &str = "a precision <= 0";
const OVERLAP: &str = "an output overlapping an input or another output";
const MEMORY: &str = "a size too large to allocate";
const DIVERGE: &str = "a step size that diverges";
const NULL: &str = "C ABI: a NULL pointer";
const MISALIGNED: &str = "C ABI: a pointer misaligned for its dtype";
const CODE: &str = "C ABI: an unknown enum code (dtype, device, score, ...)";
const HANDLE: &str = "C ABI: a freed or garbage handle (the handles: LCA dictionary, VMP model)";

fn cells() -> Vec<Cell> {
    use Kind::*;
    let c = |class, op, expect, probe| Cell {
        class,
        op,
        expect,
        probe,
    };
    vec![
        c(EMPTY, "attention", Invalid, || {
            attn(&t4(&Q, [1, 1, 0, 4]), &Precisions::default(), dot())
        }),
        c(EMPTY, "settling", Invalid, || {
            infer(&[], SettleSpec::new(0.1))
        }),
        c(EMPTY, "LCA", Invalid, || solve(&[], LcaSpec::new(0.1))),
        c(EMPTY, "VMP", Invalid, || {
            states(&Obs::Index(View::host(&[])), None, FpiSpec::new())
        }),
        c(LENGTH, "attention", Invalid, || {
            attn(&t4(&Q[..7], [1, 1, 2, 4]), &Precisions::default(), dot())
        }),
        c(LENGTH, "settling", Invalid, || {
            settle::infer(
                &net(&W1[..5], Precision::Scalar(1.0))?,
                &SettleSpec::new(0.1),
                &View::host(&[1.0, 2.0]),
                None,
            )
            .map(drop)
        }),
        c(LENGTH, "LCA", Invalid, || {
            solve(&[1.0, 2.0, 3.0], LcaSpec::new(0.1))
        }),
        c(LENGTH, "VMP", Invalid, || {
            states(
                &Obs::Index(View::host(&[1])),
                Some(&View::host(&[0.5])),
                FpiSpec::new(),
            )
        }),
        c(OVERFLOW, "attention", Invalid, || {
            attn(
                &t4(&Q, [1, 1 << 32, 1 << 32, 1]),
                &Precisions::default(),
                dot(),
            )
        }),
        c(OVERFLOW, "settling", Invalid, || {
            let w = [0f32; 4];
            Network::new(
                &[1, usize::MAX],
                vec![Layer::new(
                    View::host(&w[..]),
                    Activation::Tanh,
                    Precision::Scalar(1.0),
                )],
            )
            .map(drop)
        }),
        c(OVERFLOW, "LCA", Invalid, || {
            Dictionary::new(&View::host(&PHI), 1 << 40, 1 << 40, Default::default()).map(drop)
        }),
        c(OVERFLOW, "VMP", Invalid, || {
            vmp::construct_policies(&[1 << 20, 1 << 20, 1 << 20], 2).map(drop)
        }),
        c(ALIAS, "attention", Invalid, || {
            let q = Tensor4 {
                data: View::host(&Q),
                shape: [1, 2, 1, 4],
                strides: [8, 2, 4],
            };
            attn(&q, &Precisions::default(), dot())
        }),
        c(PARAM, "attention", Invalid, || {
            attn(
                &t4(&Q[..4], [1, 1, 1, 4]),
                &Precisions::default(),
                AttentionSpec::new(Score::StudentT(f32::NAN)),
            )
        }),
        c(PARAM, "settling", Invalid, || {
            infer(&[1.0, 2.0], SettleSpec::new(f32::INFINITY))
        }),
        c(PARAM, "LCA", Invalid, || {
            solve(&[1.0, 2.0], LcaSpec::new(f32::NAN))
        }),
        c(PARAM, "VMP", Invalid, || {
            states(&Obs::Index(View::host(&[1])), None, FpiSpec::new().iters(0))
        }),
        c(DATA, "attention", Invalid, || {
            attn(
                &t4(&[f32::NAN, 0.0, 0.0, 0.0], [1, 1, 1, 4]),
                &Precisions::default(),
                dot(),
            )
        }),
        c(DATA, "settling", Invalid, || {
            infer(&[f32::NAN, 2.0], SettleSpec::new(0.1))
        }),
        c(DATA, "LCA", Invalid, || {
            solve(&[f32::INFINITY, 2.0], LcaSpec::new(0.1))
        }),
        c(DATA, "VMP", Invalid, || {
            states(
                &Obs::Dist(View::host(&[f32::NAN, 0.5])),
                None,
                FpiSpec::new(),
            )
        }),
        c(PRECISION, "attention", Invalid, || {
            let pk = [1.0f32, 0.0];
            attn(
                &t4(&Q[..4], [1, 1, 1, 4]),
                &Precisions {
                    head: None,
                    key: Some(View::host(&pk)),
                    ..Default::default()
                },
                dot(),
            )
        }),
        c(PRECISION, "settling", Invalid, || {
            net(&W1, Precision::Scalar(-1.0)).map(drop)
        }),
        c(OVERLAP, "attention", Invalid, || {
            let mut buf = Q;
            let p = buf.as_mut_ptr() as u64;
            let q = unsafe { View::<f32>::from_raw(&cpu(), p, 4) };
            let q = Tensor4::bhld(q, [1, 1, 1, 4]);
            let o = unsafe { ViewMut::<f32>::from_raw(&cpu(), p, 4) };
            let out = AttentionOutputs {
                o: Tensor4Mut::bhld(o, [1, 1, 1, 4]),
                lse: None,
                e: None,
            };
            let kv = t4(&Q, [1, 1, 2, 4]);
            attention::forward_into(
                &dot(),
                &q,
                &kv,
                &kv,
                &Precisions::default(),
                None,
                out,
                cpu().default_stream(),
            )
        }),
        c(OVERLAP, "settling", Invalid, || {
            let n = net(&W1, Precision::Scalar(1.0))?;
            let mut buf = [0f32; 8];
            let p = buf.as_mut_ptr() as u64;
            let out = SettleOutputs {
                x: vec![unsafe { ViewMut::from_raw(&cpu(), p, 3) }, unsafe {
                    ViewMut::from_raw(&cpu(), p + 8, 1)
                }],
                eps: vec![unsafe { ViewMut::from_raw(&cpu(), p + 16, 3) }, unsafe {
                    ViewMut::from_raw(&cpu(), p + 28, 1)
                }],
                energy: None,
                trace: None,
                steps: None,
            };
            settle::infer_into(
                &n,
                &SettleSpec::new(0.1),
                &View::host(&[1.0, 2.0]),
                out,
                cpu().default_stream(),
            )
        }),
        c(OVERLAP, "LCA", Invalid, || {
            let mut buf = [0f32; 2];
            let p = buf.as_mut_ptr() as u64;
            let out = LcaOutputs {
                u: unsafe { ViewMut::from_raw(&cpu(), p, 2) },
                a: unsafe { ViewMut::from_raw(&cpu(), p, 2) },
                energy: None,
                active: None,
                steps: None,
            };
            dict().solve_into(
                &LcaSpec::new(0.1),
                &View::host(&[1.0, 2.0]),
                None,
                out,
                cpu().default_stream(),
            )
        }),
        c(OVERLAP, "VMP", Invalid, || {
            let mut buf = [0f32; 2];
            let p = buf.as_mut_ptr() as u64;
            let out = StatesOutputs {
                qs: unsafe { ViewMut::from_raw(&cpu(), p, 2) },
                vfe: Some(unsafe { ViewMut::from_raw(&cpu(), p, 1) }),
                iterations: None,
                vfe_trace: None,
            };
            vmp::infer_states_into(
                &model(),
                &FpiSpec::new(),
                &Obs::Index(View::host(&[1])),
                None,
                out,
                cpu().default_stream(),
            )
        }),
        c(MEMORY, "attention", Oom, || {
            // Strides that let rows share memory across B and H: 2^40 rows of D = 1 over 2^21
            // elements, a 4 TiB output.
            let data = vec![0.5f32; 1 << 21];
            let t = Tensor4 {
                data: View::host(&data),
                shape: [1 << 20, 1 << 20, 1, 1],
                strides: [1, 1, 1],
            };
            let kv = Tensor4 {
                data: View::host(&data),
                shape: [1 << 20, 1, 1, 1],
                strides: [1, 1, 1],
            };
            attention::forward(&dot(), &t, &kv, &kv, &Precisions::default(), None).map(drop)
        }),
        c(MEMORY, "settling", Oom, || {
            infer(&vec![0.5; 8192], SettleSpec::new(0.1).steps((1 << 31) - 2))
        }),
        c(MEMORY, "LCA", Oom, || {
            let phi = vec![0.001f32; 1 << 20];
            Dictionary::new(
                &View::host(&phi),
                1,
                1 << 20,
                DictionaryOptions {
                    check_unit_norm: false,
                },
            )
            .map(drop)
        }),
        c(MEMORY, "VMP", Oom, || {
            vmp::construct_policies(&[1 << 15, 1 << 15], 2).map(drop)
        }),
        c(DIVERGE, "attention", Invalid, || {
            let big = [1e30f32; 4];
            attn(
                &t4(&big, [1, 1, 1, 4]),
                &Precisions::default(),
                dot().scale(1.0),
            )
        }),
        c(DIVERGE, "settling", Diverged, || {
            let x0 = [1.0f32, -1.0];
            settle::learn_step(
                &net(&W1, Precision::Scalar(1.0))?,
                &SettleSpec::new(50.0).steps(60),
                &View::host(&x0),
                &View::host(&[8.0]),
                None,
            )
            .map(drop)
        }),
        c(DIVERGE, "LCA", Invalid, || {
            let mut d = dict();
            d.learn(
                &View::host(&[3e38f32, -3e38]),
                &View::host(&[1e20f32, 1e20]),
                1e30,
                cpu().default_stream(),
            )
        }),
        c(NULL, "attention", Invalid, || {
            c_attention(|_, t| t[0].data = null_mut())
        }),
        c(NULL, "settling", Invalid, || {
            c_settle(|_, x0| *x0 = std::ptr::null())
        }),
        c(NULL, "LCA", Invalid, || {
            lca_dict_new(std::ptr::null(), ffi::FEP_DTYPE_F32)
        }),
        c(NULL, "VMP", Invalid, || {
            let mut h = null_mut();
            from_status(unsafe {
                ffi::fep_vmp_model_new(ffi::FEP_DEVICE_CPU, 0, std::ptr::null(), &mut h)
            })
        }),
        c(MISALIGNED, "attention", Invalid, || {
            c_attention(|_, t| t[1].data = unsafe { t[1].data.cast::<u8>().add(2) }.cast())
        }),
        c(MISALIGNED, "settling", Invalid, || {
            c_settle(|_, x0| *x0 = unsafe { x0.cast::<u8>().add(1) }.cast())
        }),
        c(MISALIGNED, "LCA", Invalid, || {
            let words = [0u32; 5];
            lca_dict_new(
                unsafe { words.as_ptr().cast::<u8>().add(2) }.cast(),
                ffi::FEP_DTYPE_F32,
            )
        }),
        c(CODE, "attention", Invalid, || {
            c_attention(|p, _| p.score = 9)
        }),
        c(CODE, "settling", Invalid, || c_settle(|n, _| n.dtype = -1)),
        c(CODE, "LCA", Invalid, || lca_dict_new(PHI.as_ptr(), 9)),
        c(HANDLE, "LCA", Invalid, || {
            let garbage = [0u64; 64];
            let (mut n, mut m) = (0, 0);
            from_status(unsafe { ffi::fep_lca_dict_shape(garbage.as_ptr().cast(), &mut n, &mut m) })
        }),
        c(HANDLE, "VMP", Invalid, || {
            let garbage = [0u64; 64];
            let n = null_mut();
            from_status(unsafe {
                ffi::fep_vmp_model_info(garbage.as_ptr().cast(), n, n, n, n, n, n)
            })
        }),
    ]
}

/// The text of a cell: the error kind and the argument it names.
fn outcome(cell: &Cell) -> String {
    let r = (cell.probe)();
    let kind = match &r {
        Ok(()) => Kind::Accepted,
        Err(Error::InvalidArgument { .. }) => Kind::Invalid,
        Err(Error::OutOfMemory { .. }) => Kind::Oom,
        Err(Error::Diverged(_)) => Kind::Diverged,
        Err(e) => panic!("{} / {}: {e}", cell.class, cell.op),
    };
    assert_eq!(kind, cell.expect, "{} / {}: {r:?}", cell.class, cell.op);
    match r {
        Ok(()) => "accepted: NaN in, NaN out (the scores propagate it)".into(),
        Err(Error::InvalidArgument { name, .. }) => format!("`InvalidArgument` (`{name}`)"),
        Err(Error::OutOfMemory { what, .. }) => format!("`OutOfMemory` ({what})"),
        Err(Error::Diverged(_)) => "`Diverged`, parameters untouched".into(),
        Err(_) => unreachable!(),
    }
}

fn table() -> String {
    let cells = cells();
    let mut classes: Vec<&str> = Vec::new();
    for c in &cells {
        if !classes.contains(&c.class) {
            classes.push(c.class);
        }
    }
    let mut t = format!(
        "| input | {} |\n|---|{}\n",
        OPS.join(" | "),
        "---|".repeat(OPS.len())
    );
    for class in classes {
        let row: Vec<String> = OPS
            .iter()
            .map(|op| {
                cells
                    .iter()
                    .find(|c| c.class == class && c.op == *op)
                    .map_or("—".into(), outcome)
            })
            .collect();
        t += &format!("| {class} | {} |\n", row.join(" | "));
    }
    t
}

#[test]
fn readme_bad_input_matrix_is_what_the_probes_return() {
    let table = table();
    // The repository's README, also when the binary runs elsewhere (the GPU suite runs staged
    // binaries from the root of a copy of the repository).
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let path = if std::path::Path::new(built).exists() {
        built
    } else {
        "README.md"
    };
    let Ok(readme) = std::fs::read_to_string(path) else {
        println!("skipped: no README.md at {built} or in the working directory");
        return;
    };
    let (begin, end) = (
        "<!-- bad-input-matrix: begin -->\n",
        "<!-- bad-input-matrix: end -->",
    );
    let (Some(i), Some(j)) = (readme.find(begin), readme.find(end)) else {
        panic!("README.md has no bad-input matrix markers");
    };
    let current = &readme[i + begin.len()..j];
    if current != table {
        if std::env::var_os("FEP_BLESS").is_some() {
            let new = format!("{}{table}{}", &readme[..i + begin.len()], &readme[j..]);
            std::fs::write(path, new).unwrap();
        } else {
            panic!(
                "README.md's bad-input matrix is stale; FEP_BLESS=1 rewrites it. Generated:\n{table}"
            );
        }
    }
}
