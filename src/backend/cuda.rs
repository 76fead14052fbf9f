//! The CUDA backend, over cudarc's driver API with the driver loaded at run time: a build with
//! the `cuda` feature starts on a machine without libcuda and reports `NoDevice`.
//!
//! Launches go through cudarc's low-level `result` API so that a raw stream handle from a
//! framework can be used as is (cudarc's safe stream type only wraps streams it created).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, PoisonError};

use cudarc::driver::{result, sys};

use super::LaunchConfig;
use crate::error::{Error, Result, Vendor};

pub(crate) struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    pub stream: sys::CUstream,
    pub smem_optin: usize,
    /// Streaming multiprocessors.
    pub sms: usize,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    functions: Mutex<HashMap<(&'static str, String), sys::CUfunction>>,
}

// The handles are driver objects usable from any thread once the context is made current there,
// which every entry point below does first.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

fn driver_err(call: &'static str, e: result::DriverError) -> Error {
    let message = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown error".into());
    Error::Driver {
        vendor: Vendor::Cuda,
        call,
        code: e.0 as i32,
        message,
    }
}

fn no_device(reason: impl Into<String>) -> Error {
    Error::NoDevice {
        vendor: "CUDA",
        reason: reason.into(),
    }
}

/// Loads the driver library and initialises it, once; the error says why not.
fn init() -> Result<()> {
    static INIT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "the CUDA driver library (libcuda.so) is not installed on this machine".into(),
            );
        }
        result::init().map_err(|e| format!("cuInit failed: {}", driver_err("cuInit", e)))
    })
    .clone()
    .map_err(no_device)
}

pub(crate) fn device_count() -> usize {
    init()
        .ok()
        .and_then(|_| result::device::get_count().ok())
        .map_or(0, |n| n.max(0) as usize)
}

impl CudaDevice {
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        init()?;
        let count =
            result::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))? as usize;
        if ordinal >= count {
            return Err(no_device(format!(
                "ordinal {ordinal} asked for, {count} CUDA device(s) present"
            )));
        }
        let device =
            result::device::get(ordinal as i32).map_err(|e| driver_err("cuDeviceGet", e))?;
        let name =
            result::device::get_name(device).map_err(|e| driver_err("cuDeviceGetName", e))?;
        let smem_optin = unsafe {
            result::device::get_attribute(
                device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
        }
        .map_err(|e| driver_err("cuDeviceGetAttribute", e))? as usize;
        let sms = unsafe {
            result::device::get_attribute(
                device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
        }
        .map_err(|e| driver_err("cuDeviceGetAttribute", e))?
        .max(1) as usize;
        // The primary context: the one the CUDA runtime (and so PyTorch, JAX, CuPy) uses, so
        // pointers and streams from those frameworks are valid here.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        Ok(CudaDevice {
            ordinal,
            name,
            stream,
            smem_optin,
            sms,
            device,
            ctx,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    fn bind(&self) -> Result<()> {
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))
    }

    pub fn synchronize(&self, stream: *mut c_void) -> Result<()> {
        self.bind()?;
        unsafe { result::stream::synchronize(stream as sys::CUstream) }
            .map_err(|e| driver_err("cuStreamSynchronize", e))
    }

    /// Stream-ordered on a real stream, plain cuMemAlloc on the null stream.
    pub fn alloc(&self, bytes: usize, stream: *mut c_void) -> Result<u64> {
        self.bind()?;
        let r = unsafe {
            if stream.is_null() {
                result::malloc_sync(bytes)
            } else {
                result::malloc_async(stream as sys::CUstream, bytes)
            }
        };
        r.map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory {
                    device: self.name.clone(),
                    what: "device memory".into(),
                    bytes: bytes as u128,
                }
            } else {
                driver_err("cuMemAlloc", e)
            }
        })
    }

    /// The counterpart of `alloc` (same stream). Errors here have nowhere to go: a failed free
    /// means the context is already broken, which the next call reports.
    pub fn free(&self, addr: u64, stream: *mut c_void) {
        if self.bind().is_err() {
            return;
        }
        unsafe {
            let _ = if stream.is_null() {
                result::free_sync(addr)
            } else {
                result::free_async(addr, stream as sys::CUstream)
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
        let src = unsafe { std::slice::from_raw_parts(src, bytes) };
        unsafe { result::memcpy_htod_async(dst, src, stream as sys::CUstream) }
            .map_err(|e| driver_err("cuMemcpyHtoDAsync", e))
    }

    pub unsafe fn copy_dtoh(
        &self,
        dst: *mut u8,
        src: u64,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, bytes) };
        unsafe { result::memcpy_dtoh_async(dst, src, stream as sys::CUstream) }
            .map_err(|e| driver_err("cuMemcpyDtoHAsync", e))
    }

    pub unsafe fn copy_dtod(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.bind()?;
        unsafe { result::memcpy_dtod_async(dst, src, bytes, stream as sys::CUstream) }
            .map_err(|e| driver_err("cuMemcpyDtoDAsync", e))
    }

    fn function(&self, module: &'static str, kernel: &str) -> Result<sys::CUfunction> {
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
                let image = super::registry::cuda_image(module).ok_or_else(|| {
                    Error::Unsupported(format!("kernel module {module} was not built for CUDA"))
                })?;
                let m = unsafe { result::module::load_data(image.as_ptr().cast()) }
                    .map_err(|e| driver_err("cuModuleLoadData", e))?;
                modules.insert(module, m);
                m
            }
        };
        let cname = std::ffi::CString::new(kernel).map_err(|_| Error::invalid("kernel", kernel))?;
        let f = unsafe { result::module::get_function(m, cname) }
            .map_err(|e| driver_err("cuModuleGetFunction", e))?;
        // Let every kernel use all of the opt-in shared memory; the launch asks for what it needs.
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let static_smem = unsafe {
            result::function::get_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            )
        }
        .map_err(|e| driver_err("cuFuncGetAttribute", e))?;
        unsafe {
            result::function::set_function_attribute(f, attr, self.smem_optin as i32 - static_smem)
        }
        .map_err(|e| driver_err("cuFuncSetAttribute", e))?;
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
        unsafe {
            result::launch_kernel(
                f,
                cfg.grid,
                (cfg.block, 1, 1),
                cfg.smem,
                stream as sys::CUstream,
                params,
            )
        }
        .map_err(|e| driver_err("cuLaunchKernel", e))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        unsafe {
            let _ = result::stream::synchronize(self.stream);
            for m in self
                .modules
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                let _ = result::module::unload(*m);
            }
            let _ = result::stream::destroy(self.stream);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}
