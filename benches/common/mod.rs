//! What every bench shares: the devices to measure (`FEP_BENCH_DEVICES`), the quick switch
//! (`FEP_BENCH_QUICK`), the parts of a bench and the dtypes to measure (`FEP_BENCH_OPS`,
//! `FEP_BENCH_DTYPES`), and the median of criterion's own measurements. The GPU suite
//! (ci/gpu-run.sh) picks configurations with criterion's own filter (the bench binary's first
//! free argument, a regex over `group/id`).

#![allow(dead_code)] // each bench uses its own subset

use std::time::Duration;

use fep_kernels::{Device, DeviceKind};

/// `FEP_BENCH_QUICK=1`: shorter runs (and fewer sizes where a bench says so).
pub fn quick() -> bool {
    std::env::var("FEP_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Whether the comma-separated list in the environment variable `var` (unset, empty or `all`:
/// everything) names `what`.
fn listed(var: &str, what: &str) -> bool {
    let Ok(list) = std::env::var(var) else {
        return true;
    };
    list.split(',')
        .map(str::trim)
        .any(|w| w.is_empty() || w == "all" || w == what)
}

/// `FEP_BENCH_OPS` (comma-separated; unset or `all`: every one): which parts of a bench with
/// several (attention: `forward`, `backward`, `decode`) run. Criterion's filter selects groups
/// but not the setup around them (inputs uploaded, a probe call per group), so the GPU suite
/// names the part an item measures.
pub fn op_wanted(op: &str) -> bool {
    listed("FEP_BENCH_OPS", op)
}

/// `FEP_BENCH_DTYPES` (comma-separated from `f32`, `f16`, `bf16`; unset or `all`: every one)
/// asks for the dtype with this suffix (for the benches that honour it: attention).
pub fn dtype_wanted(suffix: &str) -> bool {
    listed("FEP_BENCH_DTYPES", suffix)
}

/// Whether `FEP_BENCH_DEVICES` (comma-separated from `cuda`, `hip`, `cpu`, or `gpu` for both
/// GPU kinds; unset or `all`: every kind) asks for `kind`.
fn wanted(kind: DeviceKind) -> bool {
    let Ok(list) = std::env::var("FEP_BENCH_DEVICES") else {
        return true;
    };
    list.split(',').map(str::trim).any(|w| match w {
        "all" | "" => true,
        "gpu" => kind != DeviceKind::Cpu,
        "cuda" => kind == DeviceKind::Cuda,
        "hip" => kind == DeviceKind::Hip,
        "cpu" => kind == DeviceKind::Cpu,
        _ => false,
    })
}

/// The first CUDA and the first HIP device that open, then the CPU, each where
/// `FEP_BENCH_DEVICES` asks for it (the GPU suite sets `gpu`; the CPU figures are the CPU
/// machine's, benches/results/cpu-*.md); `bench` names the bench in the line printed for a
/// missing or unwanted device.
pub fn devices(bench: &str) -> Vec<Device> {
    let mut devices = vec![];
    for kind in [DeviceKind::Cuda, DeviceKind::Hip] {
        if !wanted(kind) {
            continue;
        }
        match Device::open(kind, 0) {
            Ok(d) => devices.push(d),
            Err(e) => eprintln!("{bench} bench: no {kind:?} device ({e})"),
        }
    }
    if wanted(DeviceKind::Cpu) {
        devices.push(Device::cpu());
    } else {
        eprintln!("{bench} bench: the CPU not measured (FEP_BENCH_DEVICES)");
    }
    devices
}

/// Median of the per-iteration times of criterion's last `samples` measurements.
pub fn median_per_iter(record: &[(u64, Duration)], samples: usize) -> Option<f64> {
    let from = record.len().saturating_sub(samples);
    let mut v: Vec<f64> = record[from..]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, d)| d.as_secs_f64() / *n as f64)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}
