//! The kernel binaries build.rs embedded: one per `kernels/**/*.cu` file and vendor, by module
//! name (`lca/solve` for kernels/lca/solve.cu).

#![allow(dead_code)]

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The per-kernel resource report of the compilers (registers, shared memory, spills).
pub const RESOURCE_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/resources.txt"));

fn find(list: &'static [(&'static str, &'static [u8])], module: &str) -> Option<&'static [u8]> {
    list.iter()
        .find(|(name, _)| *name == module)
        .map(|(_, image)| *image)
}

/// The CUDA fatbin of `module`, if this build embedded one.
pub(crate) fn cuda_image(module: &str) -> Option<&'static [u8]> {
    find(CUDA_MODULES, module)
}

/// The HIP code-object bundle of `module`, if this build embedded one.
pub(crate) fn hip_image(module: &str) -> Option<&'static [u8]> {
    find(HIP_MODULES, module)
}
