//! XLA FFI handlers: the ops as `jax.ffi` custom calls (`fep_kernels.jax` registers them).
//!
//! Why Rust against XLA's FFI C API rather than C++ against `jax.ffi.include_dir()`'s headers:
//! the handlers are then part of the cdylib every install already builds (no C++ compiler or
//! jaxlib headers at install or import time, one library for PyTorch, JAX and C), and they call
//! the C ABI's own entry points, so validation, errors and devices are those of every other
//! front end. The C API is XLA's stable FFI boundary: structs carry their size and the API its
//! version (this file follows `xla/ffi/api/c_api.h` version 0.3; jaxlib 0.4.3x–0.10 speak it).
//!
//! A handler is `extern "C" fn(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error` (null: success).
//! XLA calls it (1) with a metadata extension when it is registered (we report the API version
//! and no traits), (2) once per stage at run time; only the execute stage does work. One symbol
//! per op and platform: `fep_xla_<platform>_<op>` (platform `cpu` or `cuda`); the CUDA ones take
//! the stream and device ordinal from the execution context.
//!
//! Arguments arrive as buffers (dtype, data, dims; row-major, dense), attributes by name (sorted)
//! with a type tag. [`Frame`] decodes both, checking every count, dtype and rank, so a malformed
//! call is an error message, never a wild read.

#![allow(non_camel_case_types, clippy::missing_safety_doc)]

mod attention;
mod lca;
mod settle;
mod vmp;

use std::ffi::{CStr, CString, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::ffi::{FEP_DEVICE_CPU, FEP_DEVICE_CUDA, FEP_OK, fep_last_error};

// ---- the C API's structs (c_api.h, version 0.3) -------------------------------------------

const API_MAJOR: i32 = 0;
const API_MINOR: i32 = 3;

const EXTENSION_METADATA: i32 = 1;
const STAGE_EXECUTE: i32 = 3;
const ARG_BUFFER: i32 = 1;
const ATTR_ARRAY: i32 = 1;
const ATTR_SCALAR: i32 = 3;
const ERR_INVALID_ARGUMENT: i32 = 3;
const ERR_INTERNAL: i32 = 13;
const ERR_UNIMPLEMENTED: i32 = 12;

/// XLA's element types used here.
pub(crate) const DT_PRED: i32 = 1;
pub(crate) const DT_S32: i32 = 4;
pub(crate) const DT_S64: i32 = 5;
pub(crate) const DT_U8: i32 = 6;
pub(crate) const DT_U32: i32 = 8;
pub(crate) const DT_F16: i32 = 10;
pub(crate) const DT_F32: i32 = 11;
pub(crate) const DT_F64: i32 = 12;
pub(crate) const DT_BF16: i32 = 16;

#[repr(C)]
struct ExtensionBase {
    struct_size: usize,
    kind: i32,
    next: *mut ExtensionBase,
}

#[repr(C)]
struct ApiVersion {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    major: i32,
    minor: i32,
}

#[repr(C)]
struct Metadata {
    struct_size: usize,
    api_version: ApiVersion,
    traits: u32,
    state_type_id: i64,
}

#[repr(C)]
struct MetadataExtension {
    base: ExtensionBase,
    metadata: *mut Metadata,
}

#[repr(C)]
pub(crate) struct Buffer {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    dtype: i32,
    data: *mut c_void,
    rank: i64,
    dims: *const i64,
}

#[repr(C)]
struct List {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *const i32,
    items: *const *mut c_void,
}

#[repr(C)]
struct ByteSpan {
    ptr: *const u8,
    len: usize,
}

#[repr(C)]
struct Attrs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *const i32,
    names: *const *const ByteSpan,
    attrs: *const *mut c_void,
}

#[repr(C)]
struct Scalar {
    dtype: i32,
    value: *const c_void,
}

#[repr(C)]
struct Array {
    dtype: i32,
    size: usize,
    data: *const c_void,
}

#[repr(C)]
pub struct CallFrame {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api: *const Api,
    ctx: *mut c_void,
    stage: i32,
    args: List,
    rets: List,
    attrs: Attrs,
    future: *mut c_void,
}

#[repr(C)]
struct ErrorCreateArgs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    message: *const std::ffi::c_char,
    errc: i32,
}

#[repr(C)]
struct StreamGetArgs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    ctx: *mut c_void,
    stream: *mut c_void,
}

#[repr(C)]
struct DeviceOrdinalGetArgs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    ctx: *mut c_void,
    ordinal: i32,
}

type Fn<A> = Option<unsafe extern "C" fn(*mut A) -> *mut c_void>;
type Opaque = Option<unsafe extern "C" fn()>;

/// XLA_FFI_Api: the function table, in c_api.h's order.
#[repr(C)]
struct Api {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api_version: ApiVersion,
    internal_api: *const c_void,
    error_create: Fn<ErrorCreateArgs>,
    error_get_message: Opaque,
    error_destroy: Opaque,
    handler_register: Opaque,
    stream_get: Fn<StreamGetArgs>,
    type_register: Opaque,
    execution_context_get: Opaque,
    state_set: Opaque,
    state_get: Opaque,
    device_memory_allocate: Opaque,
    device_memory_free: Opaque,
    thread_pool_schedule: Opaque,
    thread_pool_num_threads: Opaque,
    future_create: Opaque,
    future_set_available: Opaque,
    future_set_error: Opaque,
    run_id_get: Opaque,
    device_ordinal_get: Fn<DeviceOrdinalGetArgs>,
}

// ---- decoding a call ------------------------------------------------------------------------

/// The platform a handler symbol serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Platform {
    Cpu,
    Cuda,
}

/// An error of a handler: XLA's code and our message.
pub(crate) struct Fail {
    code: i32,
    msg: String,
}

pub(crate) type Res<T> = std::result::Result<T, Fail>;

pub(crate) fn invalid(msg: impl Into<String>) -> Fail {
    Fail {
        code: ERR_INVALID_ARGUMENT,
        msg: msg.into(),
    }
}

/// [`check_status`] with the library's argument names (`` `pi_key` ``) replaced by the front
/// end's (`` `precision_key` ``), so the message names what the caller passed.
pub(crate) fn check_status_as(status: i32, what: &str, names: &[(&str, &str)]) -> Res<()> {
    check_status(status, what).map_err(|mut f| {
        for (from, to) in names {
            f.msg = f.msg.replace(&format!("`{from}`"), &format!("`{to}`"));
        }
        f
    })
}

/// A C ABI status turned into a handler error carrying `fep_last_error()`'s message.
pub(crate) fn check_status(status: i32, what: &str) -> Res<()> {
    if status == FEP_OK {
        return Ok(());
    }
    // Safety: the library's own thread-local message, valid until the next call here.
    let msg = unsafe { CStr::from_ptr(fep_last_error()) }
        .to_string_lossy()
        .into_owned();
    let code = if status == crate::ffi::FEP_ERR_INVALID_ARGUMENT {
        ERR_INVALID_ARGUMENT
    } else if status == crate::ffi::FEP_ERR_UNSUPPORTED {
        ERR_UNIMPLEMENTED
    } else {
        ERR_INTERNAL
    };
    Err(Fail {
        code,
        msg: format!("fep_kernels {what}: {msg}"),
    })
}

/// A decoded buffer: dtype, data and dims.
#[derive(Clone, Copy)]
pub(crate) struct Buf<'a> {
    pub dtype: i32,
    pub data: *mut c_void,
    pub dims: &'a [i64],
}

const NUMERIC: &str = "expected bool, int32, int64, float32 or float64 values";

/// Element `i` of `data` (XLA dtype `dtype`) as f64; None for another dtype.
unsafe fn number(dtype: i32, data: *const c_void, i: usize) -> Option<f64> {
    // Safety (the caller's): `data` holds at least i + 1 elements of `dtype`.
    unsafe {
        Some(match dtype {
            DT_PRED | DT_U8 => *(data as *const u8).add(i) as f64,
            DT_S32 => *(data as *const i32).add(i) as f64,
            DT_S64 => *(data as *const i64).add(i) as f64,
            DT_F32 => *(data as *const f32).add(i) as f64,
            DT_F64 => *(data as *const f64).add(i),
            _ => return None,
        })
    }
}

/// The execute stage's view of a call frame.
pub(crate) struct Frame<'a> {
    op: &'static str,
    platform: Platform,
    frame: &'a CallFrame,
}

fn list<'a>(l: &'a List, what: &str) -> Res<(&'a [i32], &'a [*mut c_void])> {
    let n = usize::try_from(l.size).map_err(|_| invalid(format!("negative {what} count")))?;
    if n == 0 {
        return Ok((&[], &[]));
    }
    if l.types.is_null() || l.items.is_null() {
        return Err(invalid(format!("null {what} list")));
    }
    // Safety: XLA's lists hold `size` entries.
    Ok(unsafe {
        (
            std::slice::from_raw_parts(l.types, n),
            std::slice::from_raw_parts(l.items, n),
        )
    })
}

impl<'a> Frame<'a> {
    /// The buffers of the arguments (`rets = false`) or results, checked to be buffers.
    fn buffers(&self, rets: bool) -> Res<Vec<Buf<'a>>> {
        let what = if rets { "result" } else { "argument" };
        let (types, items) = list(
            if rets {
                &self.frame.rets
            } else {
                &self.frame.args
            },
            what,
        )?;
        let mut out = Vec::with_capacity(items.len());
        for (i, (&t, &p)) in types.iter().zip(items).enumerate() {
            if t != ARG_BUFFER || p.is_null() {
                return Err(invalid(format!("{}: {what} {i} is not a buffer", self.op)));
            }
            // Safety: XLA passes XLA_FFI_Buffer pointers for buffer arguments.
            let b = unsafe { &*(p as *const Buffer) };
            let rank = usize::try_from(b.rank)
                .map_err(|_| invalid(format!("{}: {what} {i} has rank {}", self.op, b.rank)))?;
            let dims = if rank == 0 {
                &[][..]
            } else if b.dims.is_null() {
                return Err(invalid(format!("{}: {what} {i} has no dims", self.op)));
            } else {
                // Safety: `rank` dims.
                unsafe { std::slice::from_raw_parts(b.dims, rank) }
            };
            if dims.iter().any(|&d| d < 0) {
                return Err(invalid(format!(
                    "{}: {what} {i} has dims {dims:?}",
                    self.op
                )));
            }
            out.push(Buf {
                dtype: b.dtype,
                data: b.data,
                dims,
            });
        }
        Ok(out)
    }

    pub fn platform(&self) -> Platform {
        self.platform
    }

    pub fn args(&self) -> Res<Vec<Buf<'a>>> {
        self.buffers(false)
    }

    pub fn rets(&self) -> Res<Vec<Buf<'a>>> {
        self.buffers(true)
    }

    /// The (type tag, value pointer) of the attribute `name`, None when absent.
    fn find(&self, name: &str) -> Res<Option<(i32, *mut c_void)>> {
        let a = &self.frame.attrs;
        let n = usize::try_from(a.size).map_err(|_| invalid("negative attribute count"))?;
        if n == 0 {
            return Ok(None);
        }
        if a.types.is_null() || a.names.is_null() || a.attrs.is_null() {
            return Err(invalid("null attribute list"));
        }
        for i in 0..n {
            // Safety: `size` entries each.
            let (t, span, value) = unsafe { (*a.types.add(i), *a.names.add(i), *a.attrs.add(i)) };
            if span.is_null() {
                continue;
            }
            // Safety: a name span XLA owns for the call.
            let span = unsafe { &*span };
            if span.ptr.is_null() {
                continue;
            }
            let key = unsafe { std::slice::from_raw_parts(span.ptr, span.len) };
            if key == name.as_bytes() {
                if value.is_null() {
                    return Err(invalid(format!(
                        "{}: attribute {name} has no value",
                        self.op
                    )));
                }
                return Ok(Some((t, value)));
            }
        }
        Ok(None)
    }

    /// A scalar attribute as f64 (any integer, bool or float type), None when absent.
    pub fn attr(&self, name: &str) -> Res<Option<f64>> {
        let Some((t, value)) = self.find(name)? else {
            return Ok(None);
        };
        if t != ATTR_SCALAR {
            return Err(invalid(format!(
                "{}: attribute {name} is not a scalar",
                self.op
            )));
        }
        // Safety: a scalar attribute is an XLA_FFI_Scalar whose value has its dtype.
        let s = unsafe { &*(value as *const Scalar) };
        if s.value.is_null() {
            return Err(invalid(format!(
                "{}: attribute {name} has no value",
                self.op
            )));
        }
        // Safety: the value has the dtype the scalar names.
        unsafe { number(s.dtype, s.value, 0) }
            .map(Some)
            .ok_or_else(|| invalid(format!("{}: attribute {name}: {NUMERIC}", self.op)))
    }

    /// An int64 scalar attribute, exactly (a handle's address).
    pub fn int64(&self, name: &str) -> Res<i64> {
        let (t, value) = self
            .find(name)?
            .ok_or_else(|| invalid(format!("{}: attribute {name} is missing", self.op)))?;
        // Safety: a scalar attribute is an XLA_FFI_Scalar whose value has its dtype.
        let s = unsafe { &*(value as *const Scalar) };
        if t != ATTR_SCALAR || s.dtype != DT_S64 || s.value.is_null() {
            return Err(invalid(format!(
                "{}: attribute {name} is not an int64",
                self.op
            )));
        }
        // Safety: an int64 value.
        Ok(unsafe { *(s.value as *const i64) })
    }

    /// A 1-d array attribute as f64s (any integer, bool or float type); empty when absent.
    pub fn array(&self, name: &str) -> Res<Vec<f64>> {
        let Some((t, value)) = self.find(name)? else {
            return Ok(Vec::new());
        };
        if t != ATTR_ARRAY {
            return Err(invalid(format!(
                "{}: attribute {name} is not an array",
                self.op
            )));
        }
        // Safety: an array attribute is an XLA_FFI_Array of `size` elements of its dtype.
        let a = unsafe { &*(value as *const Array) };
        if a.size > 0 && a.data.is_null() {
            return Err(invalid(format!(
                "{}: attribute {name} has no data",
                self.op
            )));
        }
        // Safety: `size` elements of `dtype`.
        (0..a.size)
            .map(|i| unsafe { number(a.dtype, a.data, i) })
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| invalid(format!("{}: attribute {name}: {NUMERIC}", self.op)))
    }
    /// A required scalar attribute.
    pub fn req(&self, name: &str) -> Res<f64> {
        self.attr(name)?
            .ok_or_else(|| invalid(format!("{}: attribute {name} is missing", self.op)))
    }

    /// An integer attribute within i32.
    pub fn int(&self, name: &str, default: Option<i32>) -> Res<i32> {
        match (self.attr(name)?, default) {
            (Some(v), _) if v.fract() == 0.0 && v.abs() <= i32::MAX as f64 => Ok(v as i32),
            (Some(v), _) => Err(invalid(format!(
                "{}: attribute {name} = {v} is not an int32",
                self.op
            ))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(invalid(format!("{}: attribute {name} is missing", self.op))),
        }
    }

    /// (device kind, ordinal, stream) of the call: the host, or the CUDA device and stream of
    /// the execution context.
    pub fn device(&self) -> Res<(i32, i32, *mut c_void)> {
        match self.platform {
            Platform::Cpu => Ok((FEP_DEVICE_CPU, 0, std::ptr::null_mut())),
            Platform::Cuda => {
                // Safety: XLA's API table for this call.
                let api = unsafe { &*self.frame.api };
                let get = api
                    .stream_get
                    .ok_or_else(|| invalid("XLA has no XLA_FFI_Stream_Get"))?;
                let mut s = StreamGetArgs {
                    struct_size: std::mem::size_of::<StreamGetArgs>(),
                    extension_start: std::ptr::null_mut(),
                    ctx: self.frame.ctx,
                    stream: std::ptr::null_mut(),
                };
                // Safety: a valid args struct; an error is returned as a pointer we must not leak.
                if !unsafe { get(&mut s) }.is_null() {
                    return Err(invalid("XLA_FFI_Stream_Get failed"));
                }
                // The ordinal: XLA_FFI_DeviceOrdinal_Get where the table has it (API ≥ 0.2),
                // else the current device.
                let has_ordinal = api.struct_size >= std::mem::size_of::<Api>();
                let mut ordinal = 0;
                if let (true, Some(f)) = (has_ordinal, api.device_ordinal_get) {
                    let mut o = DeviceOrdinalGetArgs {
                        struct_size: std::mem::size_of::<DeviceOrdinalGetArgs>(),
                        extension_start: std::ptr::null_mut(),
                        ctx: self.frame.ctx,
                        ordinal: 0,
                    };
                    // Safety: as above.
                    if unsafe { f(&mut o) }.is_null() {
                        ordinal = o.ordinal;
                    }
                }
                Ok((FEP_DEVICE_CUDA, ordinal, s.stream))
            }
        }
    }
}

/// Runs a handler: answers the metadata query, skips the stages before execute, decodes the
/// frame, runs `body` under a panic guard and turns a failure into an XLA_FFI_Error.
pub(crate) unsafe fn handle(
    op: &'static str,
    platform: Platform,
    frame: *mut CallFrame,
    body: impl FnOnce(&Frame<'_>) -> Res<()>,
) -> *mut c_void {
    if frame.is_null() {
        return std::ptr::null_mut();
    }
    // Safety: XLA passes a valid call frame; its extensions are a linked list of valid structs.
    let f = unsafe { &*frame };
    let mut ext = f.extension_start;
    while !ext.is_null() {
        let e = unsafe { &*ext };
        if e.kind == EXTENSION_METADATA {
            let m = unsafe { (*(ext as *mut MetadataExtension)).metadata };
            if !m.is_null() {
                unsafe {
                    (*m).api_version.major = API_MAJOR;
                    (*m).api_version.minor = API_MINOR;
                    (*m).traits = 0;
                }
            }
            return std::ptr::null_mut();
        }
        ext = e.next;
    }
    if f.stage != STAGE_EXECUTE {
        return std::ptr::null_mut();
    }
    let frame_view = Frame {
        op,
        platform,
        frame: f,
    };
    let result = match catch_unwind(AssertUnwindSafe(|| body(&frame_view))) {
        Ok(r) => r,
        Err(_) => Err(Fail {
            code: ERR_INTERNAL,
            msg: format!("{op}: internal error (a panic)"),
        }),
    };
    match result {
        Ok(()) => std::ptr::null_mut(),
        Err(fail) => unsafe { error(f.api, fail) },
    }
}

unsafe fn error(api: *const Api, fail: Fail) -> *mut c_void {
    if api.is_null() {
        return std::ptr::null_mut();
    }
    let api = unsafe { &*api };
    let Some(create) = api.error_create else {
        return std::ptr::null_mut();
    };
    let msg = CString::new(fail.msg.replace('\0', " ")).unwrap_or_default();
    let mut a = ErrorCreateArgs {
        struct_size: std::mem::size_of::<ErrorCreateArgs>(),
        extension_start: std::ptr::null_mut(),
        message: msg.as_ptr(),
        errc: fail.code,
    };
    // Safety: XLA copies the message into the error it returns.
    unsafe { create(&mut a) }
}

/// Defines `fep_xla_cpu_<op>` and `fep_xla_cuda_<op>` from one body `fn(&Frame) -> Res<()>`.
macro_rules! handlers {
    ($cpu:ident, $cuda:ident, $name:literal, $body:path) => {
        #[doc = concat!("XLA FFI handler of `", $name, "` on the host (jax.ffi, platform \"cpu\").")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $cpu(frame: *mut $crate::xla::CallFrame) -> *mut std::ffi::c_void {
            unsafe { $crate::xla::handle($name, $crate::xla::Platform::Cpu, frame, $body) }
        }
        #[doc = concat!("XLA FFI handler of `", $name, "` on CUDA (jax.ffi, platform \"CUDA\").")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $cuda(
            frame: *mut $crate::xla::CallFrame,
        ) -> *mut std::ffi::c_void {
            unsafe { $crate::xla::handle($name, $crate::xla::Platform::Cuda, frame, $body) }
        }
    };
}
pub(crate) use handlers;

/// The library's dtype code of a float buffer (f32, f16, bf16).
pub(crate) fn float_code(b: &Buf<'_>, what: &str) -> Res<i32> {
    match b.dtype {
        DT_F32 => Ok(crate::ffi::FEP_DTYPE_F32),
        DT_F16 => Ok(crate::ffi::FEP_DTYPE_F16),
        DT_BF16 => Ok(crate::ffi::FEP_DTYPE_BF16),
        d => Err(invalid(format!(
            "{what}: XLA dtype {d} is not float32, float16 or bfloat16"
        ))),
    }
}

/// Checks a buffer's dtype and dims.
pub(crate) fn expect(b: &Buf<'_>, what: &str, dtype: i32, dims: &[i64]) -> Res<()> {
    if b.dtype != dtype || b.dims != dims {
        return Err(invalid(format!(
            "{what}: expected XLA dtype {dtype} with dims {dims:?}, got dtype {} with dims {:?}",
            b.dtype, b.dims
        )));
    }
    Ok(())
}
