//! The emulated device (feature `emulate`, for tests): the kernel sources compiled as C++ and run
//! on host fibres (one per GPU thread of a block) by kernels/port/emulate.cpp, for a warp size of 32 or 64. Device memory is
//! host memory; streams are ignored and every launch returns when it is done. It checks the
//! kernels' logic (indexing, barriers, warp-size independence) and the launch code against the
//! CPU reference on machines without a GPU; it says nothing about speed.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::sync::{Mutex, PoisonError};

use super::LaunchConfig;
use crate::error::{Error, Result};

unsafe extern "C" {
    fn fep_emu_launch(
        warp: i32,
        module: *const c_char,
        name: *const c_char,
        gx: u32,
        gy: u32,
        gz: u32,
        block: u32,
        smem: u32,
        params: *mut *mut c_void,
    ) -> i32;
    fn fep_emu_self_check(warp: i32) -> i32;
}

/// The emulator's promises, on kernels that break them on purpose (kernels/port/emulate.cpp):
/// a shared-memory read without the barrier it needs sees stale data, whichever thread comes
/// first; a barrier that not every thread reaches is an error; a buffer read before its
/// asynchronous copy's wait holds the old bytes; a warp that refills a buffer another warp still
/// reads is caught. The broken promises in words, if any.
pub(crate) fn self_check(warp: usize) -> Vec<&'static str> {
    const PROMISES: [&str; 5] = [
        "a read of the next thread's shared-memory slot without a barrier was never stale",
        "a read of the previous thread's shared-memory slot without a barrier was never stale",
        "a barrier reached by one thread of the block was not reported as a deadlock",
        "a buffer read before its asynchronous copy's wait already held the new bytes (or after it not)",
        "a buffer refilled by one warp while another still read it (no barrier) went unnoticed",
    ];
    let broken = unsafe { fep_emu_self_check(warp as i32) };
    (0..PROMISES.len())
        .filter(|i| broken & (1 << i) != 0)
        .map(|i| PROMISES[i])
        .collect()
}

pub(crate) struct EmuDevice {
    pub warp: usize,
    pub name: String,
    pub smem_optin: usize,
    allocations: Mutex<HashMap<u64, Layout>>,
}

impl EmuDevice {
    pub fn open(warp: usize, shared_bytes: usize) -> Result<EmuDevice> {
        if warp != 32 && warp != 64 {
            return Err(Error::invalid(
                "warp",
                format!("the emulator has warp sizes 32 and 64, not {warp}"),
            ));
        }
        Ok(EmuDevice {
            warp,
            name: format!("emulated GPU (warp {warp}, {shared_bytes} B shared memory per block)"),
            smem_optin: shared_bytes,
            allocations: Mutex::new(HashMap::new()),
        })
    }

    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        let layout =
            Layout::from_size_align(bytes.max(1), 256).map_err(|_| Error::OutOfMemory {
                device: self.name.clone(),
                what: "device memory".into(),
                bytes: bytes as u128,
            })?;
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::OutOfMemory {
                device: self.name.clone(),
                what: "device memory".into(),
                bytes: bytes as u128,
            });
        }
        self.allocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(p as u64, layout);
        Ok(p as u64)
    }

    pub fn free(&self, addr: u64) {
        if let Some(layout) = self
            .allocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr)
        {
            unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
        }
    }

    pub fn launch(
        &self,
        module: &'static str,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        if cfg.smem as usize > self.smem_optin {
            return Err(Error::Unsupported(format!(
                "{kernel}: {} B of shared memory asked, {} B available",
                cfg.smem, self.smem_optin
            )));
        }
        let m = CString::new(module).map_err(|_| Error::invalid("module", module))?;
        let k = CString::new(kernel).map_err(|_| Error::invalid("kernel", kernel))?;
        let (gx, gy, gz) = cfg.grid;
        let code = unsafe {
            fep_emu_launch(
                self.warp as i32,
                m.as_ptr(),
                k.as_ptr(),
                gx,
                gy,
                gz,
                cfg.block,
                cfg.smem,
                params.as_mut_ptr(),
            )
        };
        match code {
            0 => Ok(()),
            1 => Err(Error::Unsupported(format!(
                "kernel {module}/{kernel} is not in the emulated build"
            ))),
            2 => Err(Error::Unsupported(format!(
                "{kernel}: block of {} threads cannot be emulated with warp {}",
                cfg.block, self.warp
            ))),
            3 => Err(Error::Unsupported(format!(
                "{module}/{kernel}: the block's threads deadlocked at a barrier that not all of \
                 them reach (a __syncthreads or warp collective in divergent code); a GPU would \
                 hang or give undefined results"
            ))),
            _ => Err(Error::OutOfMemory {
                device: self.name.clone(),
                what: format!("the fibre stacks of a {}-thread block", cfg.block),
                bytes: cfg.block as u128 * 260 * 1024,
            }),
        }
    }
}
