//! A valid LCA dictionary for the targets that fuzz what comes after fep_lca_dict_new.

use arbitrary::Arbitrary;

use crate::*;

/// The shape of a dictionary made before the fuzzed call (always valid: unit-norm columns).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct DictShape {
    pub n: u8,
    pub m: u8,
    pub seed: u64,
}

/// A live dictionary, freed on drop.
pub struct Dict {
    pub ptr: *mut ffi::FepLcaDict,
    pub n: u64,
    pub m: u64,
}

impl Drop for Dict {
    fn drop(&mut self) {
        unsafe { ffi::fep_lca_dict_free(self.ptr) }
    }
}

impl Dict {
    /// n in 1..=4, m in 1..=6; panics when the library rejects this valid dictionary.
    pub fn new(s: &DictShape) -> Dict {
        let (n, m) = (1 + (s.n as u64 + 1) % 4, 1 + (s.m as u64 + 2) % 6);
        let mut state = s.seed;
        let mut phi: Vec<f32> = (0..n * m)
            .map(|_| (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        for j in 0..m as usize {
            let norm = (0..n as usize)
                .map(|i| (phi[i * m as usize + j] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            for i in 0..n as usize {
                let x = &mut phi[i * m as usize + j];
                *x = if norm > 1e-3 {
                    (*x as f64 / norm) as f32
                } else if i == 0 {
                    1.0
                } else {
                    0.0
                };
            }
        }
        let mut out = std::ptr::null_mut();
        let st = unsafe {
            ffi::fep_lca_dict_new(
                0,
                0,
                std::ptr::null_mut(),
                0,
                phi.as_ptr().cast(),
                n,
                m,
                1,
                &mut out,
            )
        };
        assert_eq!(
            st,
            ffi::FEP_OK,
            "a valid {n} x {m} dictionary was rejected: {}",
            last_error()
        );
        Dict { ptr: out, n, m }
    }

    /// Phi as the library holds it.
    pub fn phi(&self) -> Vec<f32> {
        let mut v = vec![0f32; (self.n * self.m) as usize];
        let st = unsafe { ffi::fep_lca_dict_phi(self.ptr, std::ptr::null_mut(), v.as_mut_ptr()) };
        assert_eq!(st, ffi::FEP_OK, "fep_lca_dict_phi: {}", last_error());
        v
    }
}
