//! The CPU device's thread control and the reference device, through the Rust API and the C ABI:
//! set/get, 0 back to rayon's global pool, bad counts refused with a named error, a caller's
//! rayon pool respected, and FEP_DEVICE_CPU_REFERENCE naming the f64 reference.

use std::ffi::CStr;

use fep_kernels::ffi::{
    FEP_DEVICE_CPU, FEP_DEVICE_CPU_REFERENCE, FEP_ERR_INVALID_ARGUMENT, FEP_OK, fep_device_name,
    fep_last_error, fep_num_threads, fep_set_num_threads,
};
use fep_kernels::{Device, DeviceKind, View, num_threads, set_num_threads};

fn last_error() -> String {
    unsafe { CStr::from_ptr(fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn name(kind: i32) -> String {
    let mut buf = [0 as std::ffi::c_char; 128];
    let s = unsafe { fep_device_name(kind, 0, buf.as_mut_ptr(), buf.len() as u64) };
    assert_eq!(s, FEP_OK, "{}", last_error());
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

// One test: the thread setting is process-wide, so its steps must not interleave with another
// test's.
#[test]
fn threads_and_reference_device() {
    // Rust API
    set_num_threads(3).unwrap();
    assert_eq!(num_threads(), 3);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    assert_eq!(pool.install(num_threads), 2, "a caller's pool wins");
    let e = set_num_threads(100_000).unwrap_err().to_string();
    assert!(e.contains("threads"), "{e}");
    assert_eq!(num_threads(), 3, "a refused count changes nothing");
    set_num_threads(0).unwrap();
    assert_eq!(num_threads(), rayon::current_num_threads());

    // C ABI
    assert_eq!(fep_set_num_threads(2), FEP_OK);
    assert_eq!(fep_num_threads(), 2);
    assert_eq!(fep_set_num_threads(-1), FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("threads"), "{}", last_error());
    assert_eq!(fep_num_threads(), 2);
    assert_eq!(fep_set_num_threads(0), FEP_OK);
    assert!(
        name(FEP_DEVICE_CPU).starts_with("cpu ("),
        "{}",
        name(FEP_DEVICE_CPU)
    );
    assert_eq!(name(FEP_DEVICE_CPU_REFERENCE), "cpu reference (f64)");

    // The two host devices: both CPU kind, equal as memory, told apart by is_reference.
    let (fast, reference) = (Device::cpu(), Device::reference());
    assert_eq!(fast.kind(), DeviceKind::Cpu);
    assert_eq!(reference.kind(), DeviceKind::Cpu);
    assert_eq!(fast, reference);
    assert!(reference.is_reference() && !fast.is_reference());
    assert!(!reference.is_gpu());
    let data = [1.0f32, 2.0];
    let v = View::host_on(&reference, &data).unwrap();
    assert!(v.device().is_reference());
    assert_eq!(v.to_vec().unwrap(), data);
    let buf = reference.upload(&data).unwrap();
    assert_eq!(buf.to_vec().unwrap(), data);
}
