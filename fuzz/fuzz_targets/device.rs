//! The library and device queries: fep_version, fep_abi_version, fep_last_error,
//! fep_device_count, fep_device_name.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::{Call, Device, Dim, Fill, Id, Ptr, Role, Ty, Values, check_status, ffi};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    count_kind: i32,
    device: Device,
    len: Dim,
    buf: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let version = unsafe { std::ffi::CStr::from_ptr(ffi::fep_version()) };
    assert!(!version.to_bytes().is_empty());
    assert_eq!(ffi::fep_abi_version(), ffi::FEP_ABI_VERSION);

    let count = ffi::fep_device_count(input.count_kind);
    if count < 0 {
        check_status(-count);
        assert_ne!(-count, ffi::FEP_OK);
    } else if input.count_kind == ffi::FEP_DEVICE_CPU {
        assert_eq!(count, 1, "one CPU device");
    }

    // A name buffer of `len` bytes (the claim is what the library may write).
    let (kind, ordinal) = input.device.get();
    let len = input.len.get(64);
    let mut c = Call::new("fep_device_name", input.values);
    let buf: Id = c.buf(
        "buf",
        Ty::U8,
        Role::Out,
        Some(len as u128),
        input.buf,
        Fill::Byte(0xA5),
    );
    if !c.alloc() {
        return;
    }
    c.ready();
    let status = unsafe { ffi::fep_device_name(kind, ordinal, c.ptr(buf), len) };
    c.check(status);
    if status == ffi::FEP_OK {
        // NUL-terminated within len bytes.
        let p = c.ptr::<u8>(buf);
        let n = (0..len as usize).position(|i| unsafe { *p.add(i) } == 0);
        assert!(n.is_some(), "fep_device_name: no NUL within {len} bytes");
    }
});
