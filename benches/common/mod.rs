//! What every bench shares: the devices to measure, the quick switch, and the median of
//! criterion's own measurements.

#![allow(dead_code)] // each bench uses its own subset

use std::time::Duration;

use fep_kernels::{Device, DeviceKind};

/// `FEP_BENCH_QUICK=1`: shorter runs (and fewer sizes where a bench says so).
pub fn quick() -> bool {
    std::env::var("FEP_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The first CUDA and the first HIP device that open, then the CPU; `bench` names the bench in
/// the line printed for a missing device.
pub fn devices(bench: &str) -> Vec<Device> {
    let mut devices = vec![];
    for kind in [DeviceKind::Cuda, DeviceKind::Hip] {
        match Device::open(kind, 0) {
            Ok(d) => devices.push(d),
            Err(e) => eprintln!("{bench} bench: no {kind:?} device ({e})"),
        }
    }
    devices.push(Device::cpu());
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
