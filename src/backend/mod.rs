//! Devices, streams and memory: the runtime every op launches through.
#![cfg_attr(not(any(feature = "cuda", feature = "rocm")), allow(unused_variables))]
//!
//! A [`Device`] is the CPU or one GPU (CUDA or HIP). A GPU device owns its context (the
//! primary one, shared with other libraries in the process), a default stream, and the kernel
//! modules, loaded from the embedded binaries on first use with their functions cached.
//! Memory is either owned ([`DeviceBuffer`]) or borrowed from someone else ([`View`],
//! [`ViewMut`]); ops take views, so a framework's tensors are used in place.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "emulate")]
pub(crate) mod emulate;
#[cfg(feature = "rocm")]
pub(crate) mod hip;
pub(crate) mod registry;

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use bytemuck::Pod;

use crate::error::{Error, Result};

/// Which kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The host, through the CPU reference backend.
    Cpu,
    /// An NVIDIA GPU (feature `cuda`).
    Cuda,
    /// An AMD GPU (feature `rocm`).
    Hip,
    /// The kernels run on host threads (feature `emulate`, for tests).
    #[cfg(feature = "emulate")]
    #[cfg_attr(docsrs, doc(cfg(feature = "emulate")))]
    Emulated,
}

impl DeviceKind {
    /// "cpu", "cuda", "hip" (or "emulated"): the backend part of benchmark group names.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Hip => "hip",
            #[cfg(feature = "emulate")]
            DeviceKind::Emulated => "emulated",
        }
    }
}

pub(crate) enum Backend {
    /// The fast CPU path: f32 accumulation, blocked and vectorised, threaded (`crate::threads`).
    Cpu,
    /// The f64 reference: the oracle every backend is tested against.
    Reference,
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaDevice),
    #[cfg(feature = "rocm")]
    Hip(hip::HipDevice),
    #[cfg(feature = "emulate")]
    Emulated(emulate::EmuDevice),
}

/// A device: the CPU or one GPU. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct Device {
    pub(crate) backend: Arc<Backend>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Device({:?} {}: {})",
            self.kind(),
            self.ordinal(),
            self.name()
        )
    }
}

/// Devices are equal when they hold the same memory: [`Device::cpu`] and [`Device::reference`]
/// are equal (both are host memory), so a buffer of one passes the other's same-device checks.
impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.ordinal() == other.ordinal()
    }
}

impl Device {
    /// The CPU backend (always available): the fast path, f32 accumulation over f32/f16/bf16
    /// inputs (the GPU's contract), threaded as [`crate::set_num_threads`] says.
    /// [`Device::reference`] is the f64 oracle.
    pub fn cpu() -> Device {
        static CPU: OnceLock<Device> = OnceLock::new();
        CPU.get_or_init(|| Device {
            backend: Arc::new(Backend::Cpu),
        })
        .clone()
    }

    /// The f64 reference on the host: the straightforward code, f64 accumulation, that every
    /// backend (the fast CPU path included) is tested against. Slower than [`Device::cpu`] by
    /// design; its host memory is the CPU's, so a buffer or view of either may be used with
    /// the other (see [`View::host_on`]).
    pub fn reference() -> Device {
        static REFERENCE: OnceLock<Device> = OnceLock::new();
        REFERENCE
            .get_or_init(|| Device {
                backend: Arc::new(Backend::Reference),
            })
            .clone()
    }

    /// Whether this is [`Device::reference`], the f64 oracle.
    pub fn is_reference(&self) -> bool {
        matches!(&*self.backend, Backend::Reference)
    }

    /// CUDA device `ordinal`. `Err(Error::NoDevice)` without the `cuda` feature, without a
    /// driver, or without such a device.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            cuda::CudaDevice::open(ordinal).map(|d| Device {
                backend: Arc::new(Backend::Cuda(d)),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NoDevice {
                vendor: "CUDA",
                reason: "this build has no `cuda` feature".into(),
            })
        }
    }

    /// HIP device `ordinal`. `Err(Error::NoDevice)` without the `rocm` feature, without a
    /// runtime, or without such a device.
    pub fn hip(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "rocm")]
        {
            hip::HipDevice::open(ordinal).map(|d| Device {
                backend: Arc::new(Backend::Hip(d)),
            })
        }
        #[cfg(not(feature = "rocm"))]
        {
            let _ = ordinal;
            Err(Error::NoDevice {
                vendor: "HIP",
                reason: "this build has no `rocm` feature".into(),
            })
        }
    }

    /// The emulated GPU (feature `emulate`, for tests): the kernels on the host (a block's
    /// threads as fibres) with warp size `warp` (32 or 64) and `shared_bytes` of shared memory
    /// per block.
    #[cfg(feature = "emulate")]
    #[cfg_attr(docsrs, doc(cfg(feature = "emulate")))]
    pub fn emulated(warp: usize, shared_bytes: usize) -> Result<Device> {
        emulate::EmuDevice::open(warp, shared_bytes).map(|d| Device {
            backend: Arc::new(Backend::Emulated(d)),
        })
    }

    /// The first CUDA device, else the first HIP device, else the CPU.
    pub fn best() -> Device {
        Device::cuda(0)
            .or_else(|_| Device::hip(0))
            .unwrap_or_else(|_| Device::cpu())
    }

    /// Opens device `ordinal` of `kind` (the CPU has only ordinal 0).
    pub fn open(kind: DeviceKind, ordinal: usize) -> Result<Device> {
        match kind {
            DeviceKind::Cpu if ordinal == 0 => Ok(Device::cpu()),
            DeviceKind::Cpu => Err(Error::invalid(
                "ordinal",
                format!("the CPU device has ordinal 0, not {ordinal}"),
            )),
            DeviceKind::Cuda => Device::cuda(ordinal),
            DeviceKind::Hip => Device::hip(ordinal),
            #[cfg(feature = "emulate")]
            DeviceKind::Emulated => Device::emulated(ordinal, 64 * 1024),
        }
    }

    /// How many devices of `kind` this build and machine have (0 when none, or no driver).
    pub fn count(kind: DeviceKind) -> usize {
        match kind {
            DeviceKind::Cpu => 1,
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => cuda::device_count(),
            #[cfg(feature = "rocm")]
            DeviceKind::Hip => hip::device_count(),
            #[allow(unreachable_patterns)]
            _ => 0,
        }
    }

    /// CPU, CUDA or HIP.
    pub fn kind(&self) -> DeviceKind {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => DeviceKind::Cuda,
            #[cfg(feature = "rocm")]
            Backend::Hip(_) => DeviceKind::Hip,
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => DeviceKind::Emulated,
        }
    }

    /// The ordinal among devices of its kind.
    pub fn ordinal(&self) -> usize {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => 0,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.ordinal,
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.ordinal,
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.warp,
        }
    }

    /// The device's name ("NVIDIA H100 80GB HBM3", "cpu (8 threads)").
    pub fn name(&self) -> String {
        match &*self.backend {
            Backend::Cpu => format!("cpu ({} threads)", crate::threads::num_threads()),
            Backend::Reference => "cpu reference (f64)".to_string(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.name.clone(),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.name.clone(),
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.name.clone(),
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        self.kind() != DeviceKind::Cpu
    }

    /// The stream the library uses when none is given: a stream of its own, created with the
    /// device (never the legacy default stream).
    pub fn default_stream(&self) -> Stream {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => Stream(std::ptr::null_mut()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Stream(d.stream as *mut c_void),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => Stream(d.stream as *mut c_void),
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => Stream(std::ptr::null_mut()),
        }
    }

    /// Waits for `stream`; an asynchronous kernel fault surfaces here as an error.
    pub fn synchronize(&self, stream: Stream) -> Result<()> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.synchronize(stream.0),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.synchronize(stream.0),
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// Allocates `len` elements (contents unspecified).
    pub fn alloc<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::new(self, len)
    }

    /// Copies `data` to a new buffer on this device (synchronously).
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = DeviceBuffer::new(self, data.len())?;
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    pub(crate) fn alloc_bytes(&self, bytes: usize, stream: Stream) -> Result<u64> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => unreachable!("host buffers are Vecs"),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.alloc(bytes, stream.0),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.alloc(bytes, stream.0),
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.alloc(bytes),
        }
    }

    pub(crate) fn free_bytes(&self, addr: u64, stream: Stream) {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => {}
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.free(addr, stream.0),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.free(addr, stream.0),
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.free(addr),
        }
        let _ = (addr, stream);
    }

    /// Host to device (or host to host) copy of `bytes` bytes, enqueued on `stream`.
    ///
    /// # Safety
    /// `src` and `dst` must be valid for `bytes` bytes until the stream reaches the copy.
    pub(crate) unsafe fn copy_htod(
        &self,
        dst: u64,
        src: *const u8,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => {
                unsafe { std::ptr::copy(src, dst as *mut u8, bytes) };
                Ok(())
            }
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => {
                unsafe { std::ptr::copy(src, dst as *mut u8, bytes) };
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => unsafe { d.copy_htod(dst, src, bytes, stream.0) },
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => unsafe { d.copy_htod(dst, src, bytes, stream.0) },
        }
    }

    /// Device to host copy, enqueued on `stream`.
    ///
    /// # Safety
    /// As [`Device::copy_htod`].
    pub(crate) unsafe fn copy_dtoh(
        &self,
        dst: *mut u8,
        src: u64,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => {
                unsafe { std::ptr::copy(src as *const u8, dst, bytes) };
                Ok(())
            }
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => {
                unsafe { std::ptr::copy(src as *const u8, dst, bytes) };
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => unsafe { d.copy_dtoh(dst, src, bytes, stream.0) },
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => unsafe { d.copy_dtoh(dst, src, bytes, stream.0) },
        }
    }

    /// Device to device copy, enqueued on `stream`.
    ///
    /// # Safety
    /// As [`Device::copy_htod`].
    pub(crate) unsafe fn copy_dtod(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => {
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => {
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => unsafe { d.copy_dtod(dst, src, bytes, stream.0) },
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => unsafe { d.copy_dtod(dst, src, bytes, stream.0) },
        }
    }

    /// Launches `kernel` of the embedded module `module`. `params` points at each argument.
    #[allow(unused_variables)]
    pub(crate) fn launch(
        &self,
        module: &'static str,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        stream: Stream,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => Err(Error::Unsupported(format!(
                "kernel {kernel} launched on the CPU device"
            ))),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.launch(module, kernel, cfg, params, stream.0),
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.launch(module, kernel, cfg, params, stream.0),
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.launch(module, kernel, cfg, params),
        }
    }

    /// Lanes per warp (NVIDIA, 32) or wavefront (AMD CDNA, 64); 1 on the CPU.
    pub(crate) fn warp_size(&self) -> usize {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => 1,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => 32,
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.warp,
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.warp,
        }
    }

    /// Streaming multiprocessors (NVIDIA) or compute units (AMD): what launch heuristics size
    /// grids by. The emulated device reports `EMULATED_SMS`; the CPU 1.
    pub(crate) fn multiprocessor_count(&self) -> usize {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => 1,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.sms,
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.sms,
            #[cfg(feature = "emulate")]
            Backend::Emulated(_) => EMULATED_SMS,
        }
    }

    /// The most dynamic shared memory one block may use (after opting in), in bytes.
    pub(crate) fn max_shared_per_block(&self) -> usize {
        match &*self.backend {
            Backend::Cpu | Backend::Reference => 0,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.smem_optin,
            #[cfg(feature = "rocm")]
            Backend::Hip(d) => d.smem_optin,
            #[cfg(feature = "emulate")]
            Backend::Emulated(d) => d.smem_optin,
        }
    }
}

/// The multiprocessor count the emulated device reports: small, like a slice of a GPU, so
/// heuristics that scale grids by it (attention's decode split) stay cheap on host threads.
#[cfg(feature = "emulate")]
pub(crate) const EMULATED_SMS: usize = 8;

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

/// A raw stream handle (`CUstream` / `hipStream_t`); null is the legacy default stream.
/// The library never destroys a stream it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(pub(crate) *mut c_void);

// A stream handle is an opaque token the driver accepts from any thread.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// Wraps a framework's stream (e.g. `torch.cuda.current_stream().cuda_stream`).
    ///
    /// # Safety
    /// `handle` must be a live stream of the device it is used with, or null.
    pub unsafe fn from_raw(handle: *mut c_void) -> Stream {
        Stream(handle)
    }

    /// The raw handle.
    pub fn as_raw(self) -> *mut c_void {
        self.0
    }
}

/// Memory owned by the library on one device: `len` elements of `T`.
pub struct DeviceBuffer<T: Pod> {
    device: Device,
    addr: u64,
    len: usize,
    host: Option<Vec<T>>,
}

impl<T: Pod> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceBuffer<{}>[{}] on {:?}",
            std::any::type_name::<T>(),
            self.len,
            self.device
        )
    }
}

impl<T: Pod> DeviceBuffer<T> {
    fn new(device: &Device, len: usize) -> Result<Self> {
        let what = || format!("a buffer of {len} {}", std::any::type_name::<T>());
        if !device.is_gpu() {
            let mut host = crate::alloc::zeroed::<T>(len, what)?;
            return Ok(DeviceBuffer {
                device: device.clone(),
                addr: host.as_mut_ptr() as u64,
                len,
                host: Some(host),
            });
        }
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| crate::alloc::oom::<T>(&device.name(), what, len))?;
        let addr = if bytes == 0 {
            0
        } else {
            device
                .alloc_bytes(bytes, Stream(std::ptr::null_mut()))
                .map_err(|e| e.for_what(what))?
        };
        Ok(DeviceBuffer {
            device: device.clone(),
            addr,
            len,
            host: None,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The raw address (a device pointer, or a host pointer on the CPU device).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Overwrites the buffer with `data` (same length), synchronously.
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<()> {
        crate::tensor::check_len("data", data.len(), self.len)?;
        let s = self.device.default_stream();
        unsafe {
            self.device
                .copy_htod(self.addr, data.as_ptr().cast(), size_of_val(data), s)?
        };
        self.device.synchronize(s)
    }

    /// Copies the buffer to the host, after everything enqueued on the device's default stream.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.view().to_vec()
    }

    /// Borrows the whole buffer.
    pub fn view(&self) -> View<'_, T> {
        View {
            device: self.device.clone(),
            addr: self.addr,
            len: self.len,
            _data: PhantomData,
        }
    }

    /// Borrows the whole buffer mutably.
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            device: self.device.clone(),
            addr: self.addr,
            len: self.len,
            _data: PhantomData,
        }
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if self.host.is_none() && self.addr != 0 {
            self.device
                .free_bytes(self.addr, Stream(std::ptr::null_mut()));
        }
    }
}

/// Read-only memory on a device that someone else owns: `len` elements of `T` at `addr`.
#[derive(Clone)]
pub struct View<'a, T: Pod> {
    pub(crate) device: Device,
    pub(crate) addr: u64,
    pub(crate) len: usize,
    _data: PhantomData<&'a [T]>,
}

/// `Err` unless `device` is a host device (the CPU or the reference).
fn host_device(device: &Device) -> Result<()> {
    if device.is_gpu() {
        return Err(Error::invalid(
            "device",
            format!("{device:?} is not a host device (expected the CPU or the reference)"),
        ));
    }
    Ok(())
}

/// Writable memory on a device that someone else owns.
pub struct ViewMut<'a, T: Pod> {
    pub(crate) device: Device,
    pub(crate) addr: u64,
    pub(crate) len: usize,
    _data: PhantomData<&'a mut [T]>,
}

impl<T: Pod> fmt::Debug for View<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "View[{} x {}] on {:?}",
            self.len,
            std::any::type_name::<T>(),
            self.device
        )
    }
}

impl<T: Pod> fmt::Debug for ViewMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ViewMut[{} x {}] on {:?}",
            self.len,
            std::any::type_name::<T>(),
            self.device
        )
    }
}

impl<'a, T: Pod> View<'a, T> {
    /// A view of host memory, for the CPU device.
    pub fn host(data: &'a [T]) -> Self {
        View {
            device: Device::cpu(),
            addr: data.as_ptr() as u64,
            len: data.len(),
            _data: PhantomData,
        }
    }

    /// A view of host memory for the host device `device`: [`Device::cpu`] (what
    /// [`View::host`] gives) or [`Device::reference`] (ops on it run the f64 reference).
    /// `Err(InvalidArgument)` for a GPU.
    pub fn host_on(device: &Device, data: &'a [T]) -> Result<Self> {
        host_device(device)?;
        Ok(View {
            device: device.clone(),
            ..View::host(data)
        })
    }

    /// A view of memory someone else allocated (a framework's tensor).
    ///
    /// # Safety
    /// `addr` must point at `len` readable elements of `T` on `device` (host memory for the CPU
    /// device) that stay valid and unwritten while the view and the work enqueued with it live.
    pub unsafe fn from_raw(device: &Device, addr: u64, len: usize) -> Self {
        View {
            device: device.clone(),
            addr,
            len,
            _data: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The raw address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The elements, when on the CPU device.
    pub(crate) fn host_slice(&self) -> &'a [T] {
        debug_assert!(!self.device.is_gpu());
        if self.len == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) }
    }

    /// Copies to the host after the device's default stream is idle.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.to_vec_on(self.device.default_stream())
    }

    /// Copies to the host after everything enqueued on `stream`.
    pub fn to_vec_on(&self, stream: Stream) -> Result<Vec<T>> {
        let mut out = crate::alloc::zeroed::<T>(self.len, || {
            format!("a host copy of {} {}", self.len, std::any::type_name::<T>())
        })?;
        if self.len > 0 {
            unsafe {
                self.device.copy_dtoh(
                    out.as_mut_ptr().cast(),
                    self.addr,
                    self.len * size_of::<T>(),
                    stream,
                )?
            };
        }
        self.device.synchronize(stream)?;
        Ok(out)
    }
}

impl<'a, T: Pod> ViewMut<'a, T> {
    /// A writable view of host memory, for the CPU device.
    pub fn host(data: &'a mut [T]) -> Self {
        ViewMut {
            device: Device::cpu(),
            addr: data.as_mut_ptr() as u64,
            len: data.len(),
            _data: PhantomData,
        }
    }

    /// As [`View::host_on`], writable.
    pub fn host_on(device: &Device, data: &'a mut [T]) -> Result<Self> {
        host_device(device)?;
        Ok(ViewMut {
            device: device.clone(),
            ..ViewMut::host(data)
        })
    }

    /// A writable view of memory someone else allocated.
    ///
    /// # Safety
    /// As [`View::from_raw`], and nothing else may read or write it while the view and the work
    /// enqueued with it live.
    pub unsafe fn from_raw(device: &Device, addr: u64, len: usize) -> Self {
        ViewMut {
            device: device.clone(),
            addr,
            len,
            _data: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> View<'_, T> {
        View {
            device: self.device.clone(),
            addr: self.addr,
            len: self.len,
            _data: PhantomData,
        }
    }

    /// The elements, when on the CPU device.
    pub(crate) fn host_slice_mut(&mut self) -> &mut [T] {
        debug_assert!(!self.device.is_gpu());
        if self.len == 0 {
            return &mut [];
        }
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut T, self.len) }
    }
}

/// Bytes as a device-side stream-ordered scratch allocation, freed on drop (stream-ordered).
pub(crate) struct Scratch {
    device: Device,
    stream: Stream,
    pub addr: u64,
}

impl Scratch {
    pub(crate) fn new(device: &Device, bytes: usize, stream: Stream) -> Result<Scratch> {
        let addr = if bytes == 0 {
            0
        } else {
            device
                .alloc_bytes(bytes, stream)
                .map_err(|e| e.for_what(|| format!("a workspace of {bytes} bytes")))?
        };
        Ok(Scratch {
            device: device.clone(),
            stream,
            addr,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.addr != 0 {
            self.device.free_bytes(self.addr, self.stream);
        }
    }
}
