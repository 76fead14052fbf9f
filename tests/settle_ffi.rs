//! The settling C ABI (`fep_settle_infer`, `fep_settle_learn`) against the Rust API on the same
//! device: bitwise equal outputs, optional outputs skipped with NULL, the in-place SGD of
//! `lr > 0`, and a clear status and message for each bad argument. On the CPU always; on a
//! real GPU too when there is one (the C ABI names CUDA/HIP devices, not the emulator).

mod common;

use std::ffi::{CStr, c_void};
use std::ptr::{null, null_mut};

use common::gpu::{is_emulated, probe};
use common::{randn, rng};
use fep_kernels::ffi::{self, FepSettleNet, FepSettleParams};
use fep_kernels::settle::{self, Activation, Layer, Network, Precision, SettleSpec};
use fep_kernels::{Device, DeviceBuffer, DeviceKind};

const WIDTHS: [u64; 4] = [5, 9, 7, 3];
const BATCH: usize = 6;
const STEPS: u32 = 15;

fn last_error() -> String {
    unsafe { CStr::from_ptr(ffi::fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn kind_code(dev: &Device) -> i32 {
    match dev.kind() {
        DeviceKind::Cuda => ffi::FEP_DEVICE_CUDA,
        DeviceKind::Hip => ffi::FEP_DEVICE_HIP,
        _ => ffi::FEP_DEVICE_CPU,
    }
}

/// Weights, biases, diagonal precision of layer 2, inputs and target on `dev`.
struct Setup {
    w: Vec<DeviceBuffer<f32>>,
    b: Vec<DeviceBuffer<f32>>,
    pi2: DeviceBuffer<f32>,
    x0: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
}

const ACTS: [Activation; 3] = [
    Activation::Identity,
    Activation::Tanh,
    Activation::LeakyRelu(0.2),
];

fn setup(dev: &Device) -> Setup {
    let mut r = rng(77);
    let mut w = vec![];
    let mut b = vec![];
    for l in 1..WIDTHS.len() {
        let (n, n_in) = (WIDTHS[l] as usize, WIDTHS[l - 1] as usize);
        w.push(dev.upload(&randn(&mut r, n * n_in, 0.4)).unwrap());
        b.push(dev.upload(&randn(&mut r, n, 0.1)).unwrap());
    }
    let pi2: Vec<f32> = randn(&mut r, WIDTHS[2] as usize, 0.2)
        .iter()
        .map(|v| 1.0 + v.abs())
        .collect();
    Setup {
        w,
        b,
        pi2: dev.upload(&pi2).unwrap(),
        x0: dev
            .upload(&randn(&mut r, BATCH * WIDTHS[0] as usize, 1.0))
            .unwrap(),
        y: dev
            .upload(&randn(&mut r, BATCH * WIDTHS[3] as usize, 1.0))
            .unwrap(),
    }
}

fn network(s: &Setup) -> Network<'_, f32> {
    let layers = (0..3)
        .map(|l| {
            let p = if l == 1 {
                Precision::Diagonal(s.pi2.view())
            } else {
                Precision::Scalar(0.5 + l as f32)
            };
            Layer::new(s.w[l].view(), ACTS[l], p).bias(s.b[l].view())
        })
        .collect();
    Network::new(&WIDTHS.map(|v| v as usize), layers).unwrap()
}

/// The C description of `network(s)`; the arrays it points into live in `keep`.
struct CNet {
    acts: [i32; 3],
    alpha: [f32; 3],
    weights: [*mut c_void; 3],
    biases: [*mut c_void; 3],
    scalars: [f32; 3],
    diag: [*const f32; 3],
}

fn c_net(s: &Setup) -> CNet {
    CNet {
        acts: ACTS.map(|a| a.code()),
        alpha: ACTS.map(|a| a.alpha()),
        weights: [0, 1, 2].map(|l| s.w[l].addr() as *mut c_void),
        biases: [0, 1, 2].map(|l| s.b[l].addr() as *mut c_void),
        scalars: [0.5, 1.5, 2.5],
        diag: [null(), s.pi2.addr() as *const f32, null()],
    }
}

fn describe(c: &CNet) -> FepSettleNet {
    FepSettleNet {
        layers: 3,
        widths: WIDTHS.as_ptr(),
        activations: c.acts.as_ptr(),
        leaky_alpha: c.alpha.as_ptr(),
        dtype: ffi::FEP_DTYPE_F32,
        weights: c.weights.as_ptr(),
        biases: c.biases.as_ptr(),
        precision: c.scalars.as_ptr(),
        precision_diag: c.diag.as_ptr(),
        precision_per_sample: std::ptr::null(),
    }
}

fn params(skip: i32) -> FepSettleParams {
    FepSettleParams {
        eta: 0.1,
        momentum: 0.5,
        steps: STEPS,
        tol: 0.0,
        init: ffi::FEP_SETTLE_INIT_FEEDFORWARD,
        skip_input_checks: skip,
        log_det: 0,
        allow_tf32: 0,
    }
}

fn nan_buffers(dev: &Device) -> Vec<DeviceBuffer<f32>> {
    WIDTHS[1..]
        .iter()
        .map(|&n| dev.upload(&vec![f32::NAN; BATCH * n as usize]).unwrap())
        .collect()
}

/// Equal to within one unit in the last place: p − lr·g rounded once (an f32 fma on a GPU) or
/// through f64 (the CPU) may differ by that.
fn assert_ulps(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
        assert!(ulps <= 1, "{what}[{i}]: {g} vs {w}");
    }
}

fn host(v: &[DeviceBuffer<f32>]) -> Vec<Vec<f32>> {
    v.iter().map(|b| b.to_vec().unwrap()).collect()
}

/// The C ABI and the Rust API, learning with lr = 0.05 applied in place; then inference.
fn c_abi_matches_rust(dev: &Device) {
    let s = setup(dev);
    let spec = SettleSpec::new(0.1).momentum(0.5).steps(STEPS);
    let want = settle::learn_step(&network(&s), &spec, &s.x0.view(), &s.y.view(), None).unwrap();
    let mut xs = nan_buffers(dev);
    let mut es = nan_buffers(dev);
    let trace = dev
        .upload(&vec![f32::NAN; BATCH * (STEPS as usize + 1)])
        .unwrap();
    let mut gw: Vec<DeviceBuffer<f32>> = (1..4)
        .map(|l| {
            dev.upload(&vec![f32::NAN; (WIDTHS[l] * WIDTHS[l - 1]) as usize])
                .unwrap()
        })
        .collect();
    let mut gb: Vec<DeviceBuffer<f32>> = (1..4)
        .map(|l| dev.upload(&vec![f32::NAN; WIDTHS[l] as usize]).unwrap())
        .collect();
    let ptrs = |v: &mut Vec<DeviceBuffer<f32>>| -> Vec<*mut f32> {
        v.iter_mut().map(|b| b.addr() as *mut f32).collect()
    };
    let (xp, ep, gwp, gbp) = (ptrs(&mut xs), ptrs(&mut es), ptrs(&mut gw), ptrs(&mut gb));
    let c = c_net(&s);
    let net = describe(&c);
    let p = params(0);
    let st = unsafe {
        ffi::fep_settle_learn(
            kind_code(dev),
            0,
            null_mut(),
            &net,
            &p,
            BATCH as u64,
            s.x0.addr() as *const f32,
            s.y.addr() as *const f32,
            xp.as_ptr(),
            ep.as_ptr(),
            null_mut(),
            trace.addr() as *mut f32,
            null_mut(),
            gwp.as_ptr(),
            gbp.as_ptr(),
            std::ptr::null(),
            0.05,
        )
    };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    dev.synchronize(dev.default_stream()).unwrap();
    assert_eq!(host(&xs), host(&want.state.x), "x");
    assert_eq!(host(&es), host(&want.state.eps), "eps");
    assert_eq!(
        trace.to_vec().unwrap(),
        want.state.trace.as_ref().unwrap().to_vec().unwrap()
    );
    assert_eq!(host(&gw), host(&want.grad_w), "grad_w");
    assert_eq!(host(&gb), host(&want.grad_b), "grad_b");
    // lr > 0 applied W -= lr dW and b -= lr db in place, rounded once.
    let s0 = setup(dev);
    for l in 0..3 {
        let (w0, g) = (s0.w[l].to_vec().unwrap(), want.grad_w[l].to_vec().unwrap());
        let expect: Vec<f32> = w0
            .iter()
            .zip(&g)
            .map(|(w, g)| (*w as f64 - 0.05f32 as f64 * *g as f64) as f32)
            .collect();
        assert_ulps(
            &s.w[l].to_vec().unwrap(),
            &expect,
            &format!("W{} after sgd", l + 1),
        );
        let (b0, g) = (s0.b[l].to_vec().unwrap(), want.grad_b[l].to_vec().unwrap());
        let expect: Vec<f32> = b0
            .iter()
            .zip(&g)
            .map(|(b, g)| (*b as f64 - 0.05f32 as f64 * *g as f64) as f32)
            .collect();
        assert_ulps(
            &s.b[l].to_vec().unwrap(),
            &expect,
            &format!("b{} after sgd", l + 1),
        );
    }

    // Inference from a given start, with the checks skipped.
    let s = setup(dev);
    let start: Vec<Vec<f32>> = WIDTHS[1..]
        .iter()
        .map(|&n| randn(&mut rng(5), BATCH * n as usize, 1.0))
        .collect();
    let starts: Vec<DeviceBuffer<f32>> = start.iter().map(|v| dev.upload(v).unwrap()).collect();
    let views: Vec<_> = starts.iter().map(|b| b.view()).collect();
    let want = settle::infer(&network(&s), &spec, &s.x0.view(), Some(&views)).unwrap();
    let mut xs: Vec<DeviceBuffer<f32>> = start.iter().map(|v| dev.upload(v).unwrap()).collect();
    let mut es = nan_buffers(dev);
    let energy = dev.upload(&[f32::NAN; BATCH]).unwrap();
    let steps = dev.upload(&[u32::MAX; BATCH]).unwrap();
    let (xp, ep) = (ptrs(&mut xs), ptrs(&mut es));
    let c = c_net(&s);
    let net = describe(&c);
    let mut p = params(1);
    p.init = ffi::FEP_SETTLE_INIT_GIVEN;
    let st = unsafe {
        ffi::fep_settle_infer(
            kind_code(dev),
            0,
            null_mut(),
            &net,
            &p,
            BATCH as u64,
            s.x0.addr() as *const f32,
            xp.as_ptr(),
            ep.as_ptr(),
            energy.addr() as *mut f32,
            null_mut(),
            steps.addr() as *mut u32,
        )
    };
    assert_eq!(st, ffi::FEP_OK, "{}", last_error());
    dev.synchronize(dev.default_stream()).unwrap();
    assert_eq!(host(&xs), host(&want.x), "infer x");
    assert_eq!(host(&es), host(&want.eps), "infer eps");
    assert_eq!(energy.to_vec().unwrap(), want.energy.to_vec().unwrap());
    assert_eq!(steps.to_vec().unwrap(), want.steps.to_vec().unwrap());
}

#[test]
fn c_abi_matches_the_rust_api_on_the_cpu() {
    c_abi_matches_rust(&Device::cpu());
}

#[test]
fn c_abi_matches_the_rust_api_on_a_gpu() {
    match probe() {
        Ok(dev) if !is_emulated(dev) => c_abi_matches_rust(dev),
        Ok(_) => println!(
            "SKIPPED c_abi_matches_the_rust_api_on_a_gpu: the C ABI names real devices only"
        ),
        Err(why) => println!("SKIPPED c_abi_matches_the_rust_api_on_a_gpu: no GPU ({why})"),
    }
}

#[test]
fn c_abi_rejects_bad_arguments_with_a_message() {
    let dev = Device::cpu();
    let s = setup(&dev);
    let mut xs = nan_buffers(&dev);
    let mut es = nan_buffers(&dev);
    let xp: Vec<*mut f32> = xs.iter_mut().map(|b| b.addr() as *mut f32).collect();
    let ep: Vec<*mut f32> = es.iter_mut().map(|b| b.addr() as *mut f32).collect();
    let c = c_net(&s);
    let good = describe(&c);
    let x0 = s.x0.addr() as *const f32;
    let run = |net: &FepSettleNet, p: &FepSettleParams, x0: *const f32, xp: *const *mut f32| unsafe {
        ffi::fep_settle_infer(
            ffi::FEP_DEVICE_CPU,
            0,
            null_mut(),
            net,
            p,
            BATCH as u64,
            x0,
            xp,
            ep.as_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    let bad_act = [ffi::FEP_ACT_IDENTITY, 17, ffi::FEP_ACT_TANH];
    let bad_widths = [5u64, 9, 0, 3];
    let cases: Vec<(
        &str,
        FepSettleNet,
        FepSettleParams,
        *const f32,
        *const *mut f32,
        &str,
    )> = vec![
        (
            "eta 0",
            good,
            FepSettleParams {
                eta: 0.0,
                ..params(0)
            },
            x0,
            xp.as_ptr(),
            "eta",
        ),
        (
            "init code",
            good,
            FepSettleParams {
                init: 9,
                ..params(0)
            },
            x0,
            xp.as_ptr(),
            "params.init",
        ),
        (
            "dtype",
            FepSettleNet { dtype: 7, ..good },
            params(0),
            x0,
            xp.as_ptr(),
            "dtype",
        ),
        (
            "activation",
            FepSettleNet {
                activations: bad_act.as_ptr(),
                ..good
            },
            params(0),
            x0,
            xp.as_ptr(),
            "activation",
        ),
        (
            "zero width",
            FepSettleNet {
                widths: bad_widths.as_ptr(),
                ..good
            },
            params(0),
            x0,
            xp.as_ptr(),
            "widths[2]",
        ),
        (
            "no layers",
            FepSettleNet { layers: 0, ..good },
            params(0),
            x0,
            xp.as_ptr(),
            "net.layers",
        ),
        ("null x0", good, params(0), null(), xp.as_ptr(), "x0"),
        ("null x_out", good, params(0), x0, null(), "x_out"),
    ];
    for (what, net, p, x, out, name) in cases {
        let st = run(&net, &p, x, out);
        assert_eq!(st, ffi::FEP_ERR_INVALID_ARGUMENT, "{what}: status {st}");
        let msg = last_error();
        assert!(
            msg.contains(name),
            "{what}: message {msg:?} does not name {name}"
        );
    }
    assert!(
        host(&xs).iter().flatten().all(|v| v.is_nan()),
        "x written on error"
    );
}
