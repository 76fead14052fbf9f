//! The device under test for the GPU suites (`tests/*_gpu.rs`): the first CUDA device, else the
//! first HIP device, or the device named by `FEP_TEST_DEVICE` (`cpu`: the fast CPU path, tested
//! against the f64 reference like a GPU backend; `emulated32`/`emulated64`: the emulated GPU); a
//! missing GPU skips with a printed line, or fails under `FEP_REQUIRE_GPU=1`.

use std::sync::OnceLock;

use fep_kernels::{Device, DeviceKind, Error};

/// The first CUDA device, else the first HIP device, opened once; or why there is none.
pub fn probe() -> &'static Result<Device, String> {
    static PROBE: OnceLock<Result<Device, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        if let Some(emulated) = emulated_device() {
            return emulated;
        }
        let cuda = match Device::cuda(0) {
            Ok(d) => return Ok(d),
            Err(e) => reason(&e),
        };
        let hip = match Device::hip(0) {
            Ok(d) => return Ok(d),
            Err(e) => reason(&e),
        };
        Err(format!("CUDA: {cuda}; HIP: {hip}"))
    })
}

/// With the `emulate` feature, `FEP_TEST_DEVICE=emulated32|emulated64` puts the emulated GPU
/// (the kernel sources on host threads, warp 32 or 64) under test instead, with
/// `FEP_TEST_EMU_SHARED` bytes of shared memory per block (default 64 KiB; a small value sends
/// every wide case through the stepped kernel). CI runs the suite so on both warp sizes.
fn emulated_device() -> Option<Result<Device, String>> {
    let spec = std::env::var("FEP_TEST_DEVICE").ok()?;
    let warp = match spec.as_str() {
        "cpu" => return Some(Ok(Device::cpu())),
        "emulated32" => 32,
        "emulated64" => 64,
        other => {
            return Some(Err(format!(
                "FEP_TEST_DEVICE={other}: expected cpu, emulated32 or emulated64"
            )));
        }
    };
    let shared = std::env::var("FEP_TEST_EMU_SHARED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 * 1024);
    #[cfg(feature = "emulate")]
    return Some(Device::emulated(warp, shared).map_err(|e| e.to_string()));
    #[cfg(not(feature = "emulate"))]
    Some(Err(format!(
        "FEP_TEST_DEVICE={spec} (warp {warp}, {shared} B) needs the `emulate` feature"
    )))
}

/// Whether the device under test is the emulator, which skips what it cannot serve: m = 16000
/// (hours on host threads) and the C ABI (which names only real devices).
pub fn is_emulated(dev: &Device) -> bool {
    !matches!(
        dev.kind(),
        DeviceKind::Cpu | DeviceKind::Cuda | DeviceKind::Hip
    )
}

fn reason(e: &Error) -> String {
    match e {
        Error::NoDevice { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

pub fn gpu_required() -> bool {
    std::env::var("FEP_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1")
}

/// The GPU to test on, or `None` after printing that `test` was skipped and why. Panics instead
/// when `FEP_REQUIRE_GPU=1`.
pub fn gpu(test: &str) -> Option<Device> {
    match probe() {
        Ok(d) => {
            println!("{test}: on {d:?}");
            Some(d.clone())
        }
        Err(why) => {
            let msg = format!("SKIPPED {test}: no GPU ({why})");
            if gpu_required() {
                panic!("{msg}; FEP_REQUIRE_GPU=1 says this machine must have one");
            }
            println!("{msg}");
            eprintln!("{msg}");
            None
        }
    }
}
