//! The HIP backend, over hip-sys (which links libamdhip64).
//!
//! Device properties come from `hipDeviceGetAttribute`, whose meaning is stable across ROCm 5, 6
//! and 7; `hipDeviceProp_t` changed layout in ROCm 6.0, so reading it through another version's
//! bindings gives garbage. HIP has no per-thread context to bind: `hipSetDevice` plays that part.

use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::sync::{Mutex, PoisonError};

use hip_sys::hiprt as hip;

use super::LaunchConfig;
use crate::error::{Error, Result, Vendor};

pub(crate) struct HipDevice {
    pub ordinal: usize,
    pub name: String,
    pub stream: hip::hipStream_t,
    pub smem_optin: usize,
    /// Lanes per wavefront (64 on the CDNA GPUs the kernels are built for).
    pub warp: usize,
    /// Compute units.
    pub sms: usize,
    modules: Mutex<HashMap<&'static str, hip::hipModule_t>>,
    functions: Mutex<HashMap<(&'static str, String), hip::hipFunction_t>>,
}

// Runtime handles, usable from any thread once the device is selected there.
unsafe impl Send for HipDevice {}
unsafe impl Sync for HipDevice {}

fn check(call: &'static str, code: hip::hipError_t) -> Result<()> {
    if code == hip::hipError_t::hipSuccess {
        return Ok(());
    }
    let message = unsafe { CStr::from_ptr(hip::hipGetErrorString(code)) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Driver {
        vendor: Vendor::Hip,
        call,
        code: code as i32,
        message,
    })
}

fn no_device(reason: impl Into<String>) -> Error {
    Error::NoDevice {
        vendor: "HIP",
        reason: reason.into(),
    }
}

fn count() -> Result<usize> {
    let mut n = 0;
    let code = unsafe { hip::hipGetDeviceCount(&mut n) };
    if code != hip::hipError_t::hipSuccess {
        return Err(no_device(format!(
            "hipGetDeviceCount: {}",
            check("hipGetDeviceCount", code).unwrap_err()
        )));
    }
    Ok(n.max(0) as usize)
}

pub(crate) fn device_count() -> usize {
    count().unwrap_or(0)
}

impl HipDevice {
    pub fn open(ordinal: usize) -> Result<HipDevice> {
        let n = count()?;
        if ordinal >= n {
            return Err(no_device(format!(
                "ordinal {ordinal} asked for, {n} HIP device(s) present"
            )));
        }
        let id = ordinal as i32;
        check("hipSetDevice", unsafe { hip::hipSetDevice(id) })?;
        let mut raw = [0 as std::ffi::c_char; 256];
        check("hipDeviceGetName", unsafe {
            hip::hipDeviceGetName(raw.as_mut_ptr(), raw.len() as i32, id)
        })?;
        let name = unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut smem = 0;
        let attr = hip::hipDeviceAttribute_t::hipDeviceAttributeSharedMemPerBlockOptin;
        check("hipDeviceGetAttribute", unsafe {
            hip::hipDeviceGetAttribute(&mut smem, attr, id)
        })?;
        if smem <= 0 {
            let attr = hip::hipDeviceAttribute_t::hipDeviceAttributeMaxSharedMemoryPerBlock;
            check("hipDeviceGetAttribute", unsafe {
                hip::hipDeviceGetAttribute(&mut smem, attr, id)
            })?;
        }
        let mut warp = 0;
        let attr = hip::hipDeviceAttribute_t::hipDeviceAttributeWarpSize;
        check("hipDeviceGetAttribute", unsafe {
            hip::hipDeviceGetAttribute(&mut warp, attr, id)
        })?;
        let mut sms = 0;
        let attr = hip::hipDeviceAttribute_t::hipDeviceAttributeMultiprocessorCount;
        check("hipDeviceGetAttribute", unsafe {
            hip::hipDeviceGetAttribute(&mut sms, attr, id)
        })?;
        let mut stream = std::ptr::null_mut();
        check("hipStreamCreateWithFlags", unsafe {
            hip::hipStreamCreateWithFlags(&mut stream, 1 /* hipStreamNonBlocking */)
        })?;
        Ok(HipDevice {
            ordinal,
            name,
            stream,
            smem_optin: smem.max(0) as usize,
            warp: warp.max(1) as usize,
            sms: sms.max(1) as usize,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    fn bind(&self) -> Result<()> {
        check("hipSetDevice", unsafe {
            hip::hipSetDevice(self.ordinal as i32)
        })
    }

    pub fn synchronize(&self, stream: *mut c_void) -> Result<()> {
        self.bind()?;
        check("hipStreamSynchronize", unsafe {
            hip::hipStreamSynchronize(stream.cast())
        })
    }

    pub fn alloc(&self, bytes: usize, stream: *mut c_void) -> Result<u64> {
        self.bind()?;
        let mut p = std::ptr::null_mut();
        let code = unsafe {
            if stream.is_null() {
                hip::hipMalloc(&mut p, bytes)
            } else {
                hip::hipMallocAsync(&mut p, bytes, stream.cast())
            }
        };
        if code == hip::hipError_t::hipErrorOutOfMemory {
            return Err(Error::OutOfMemory {
                device: self.name.clone(),
                what: "device memory".into(),
                bytes: bytes as u128,
            });
        }
        check("hipMalloc", code)?;
        Ok(p as u64)
    }

    pub fn free(&self, addr: u64, stream: *mut c_void) {
        if self.bind().is_err() {
            return;
        }
        unsafe {
            let _ = if stream.is_null() {
                hip::hipFree(addr as *mut c_void)
            } else {
                hip::hipFreeAsync(addr as *mut c_void, stream.cast())
            };
        }
    }

    pub unsafe fn copy_htod(
        &self,
        dst: u64,
        src: *const u8,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        check("hipMemcpyHtoDAsync", unsafe {
            hip::hipMemcpyHtoDAsync(dst as *mut c_void, src as *mut c_void, bytes, stream.cast())
        })
    }

    pub unsafe fn copy_dtoh(
        &self,
        dst: *mut u8,
        src: u64,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        check("hipMemcpyDtoHAsync", unsafe {
            hip::hipMemcpyDtoHAsync(dst.cast(), src as *mut c_void, bytes, stream.cast())
        })
    }

    pub unsafe fn copy_dtod(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        check("hipMemcpyDtoDAsync", unsafe {
            hip::hipMemcpyDtoDAsync(dst as *mut c_void, src as *mut c_void, bytes, stream.cast())
        })
    }

    fn function(&self, module: &'static str, kernel: &str) -> Result<hip::hipFunction_t> {
        let key = (module, kernel.to_string());
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(*f);
        }
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        let m = match modules.get(module) {
            Some(m) => *m,
            None => {
                let image = super::registry::hip_image(module).ok_or_else(|| {
                    Error::Unsupported(format!("kernel module {module} was not built for HIP"))
                })?;
                let mut m = std::ptr::null_mut();
                check("hipModuleLoadData", unsafe {
                    hip::hipModuleLoadData(&mut m, image.as_ptr().cast())
                })?;
                modules.insert(module, m);
                m
            }
        };
        let cname = std::ffi::CString::new(kernel).map_err(|_| Error::invalid("kernel", kernel))?;
        let mut f = std::ptr::null_mut();
        check("hipModuleGetFunction", unsafe {
            hip::hipModuleGetFunction(&mut f, m, cname.as_ptr())
        })?;
        self.functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, f);
        Ok(f)
    }

    pub fn launch(
        &self,
        module: &'static str,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(module, kernel)?;
        let (gx, gy, gz) = cfg.grid;
        check("hipModuleLaunchKernel", unsafe {
            hip::hipModuleLaunchKernel(
                f,
                gx,
                gy,
                gz,
                cfg.block,
                1,
                1,
                cfg.smem,
                stream.cast(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for HipDevice {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        unsafe {
            let _ = hip::hipStreamSynchronize(self.stream);
            for m in self
                .modules
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                let _ = hip::hipModuleUnload(*m);
            }
            let _ = hip::hipStreamDestroy(self.stream);
        }
    }
}
