//! Helpers shared by the integration tests (each test crate uses a subset).
#![allow(dead_code)]

pub mod attention;
pub mod gpu;
pub mod vmp;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded generator, so every test input is reproducible.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `len` draws from N(0, 1), in f64.
pub fn randn_f64(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len).map(|_| StandardNormal.sample(rng)).collect()
}

/// `len` draws from N(0, scale²), in f32.
pub fn randn(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v: f32 = StandardNormal.sample(rng);
            v * scale
        })
        .collect()
}

/// A random dictionary Φ `[n, m]` (row-major) with unit-norm columns, normalised in f64 and
/// rounded to f32 (column norms are 1 to within f32 roundoff).
pub fn unit_dictionary(rng: &mut StdRng, n: usize, m: usize) -> Vec<f32> {
    let mut phi = randn_f64(rng, n * m);
    normalize_columns(&mut phi, n, m);
    phi.iter().map(|&v| v as f32).collect()
}

/// Scales every column of `phi` (`[n, m]`, row-major) to unit norm, in place.
pub fn normalize_columns(phi: &mut [f64], n: usize, m: usize) {
    for j in 0..m {
        let norm = (0..n).map(|i| phi[i * m + j].powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "column {j} is zero");
        (0..n).for_each(|i| phi[i * m + j] /= norm);
    }
}

/// The Euclidean norms of the columns of `phi` (`[n, m]`, row-major), in f64.
pub fn column_norms<T: Copy + Into<f64>>(phi: &[T], n: usize, m: usize) -> Vec<f64> {
    (0..m)
        .map(|j| {
            (0..n)
                .map(|i| phi[i * m + j].into().powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// A sparse code per sample: `k` random atoms with magnitudes in [0.5, 1.5] and random signs
/// (all positive when `nonneg`), and x = Φa + noise·N(0, 1). Returns (x `[batch, n]`,
/// a `[batch, m]`), both f32.
#[allow(clippy::too_many_arguments)]
pub fn sparse_signals(
    rng: &mut StdRng,
    phi: &[f32],
    n: usize,
    m: usize,
    batch: usize,
    k: usize,
    noise: f32,
    nonneg: bool,
) -> (Vec<f32>, Vec<f32>) {
    use rand::Rng;
    let mut x = vec![0f32; batch * n];
    let mut a = vec![0f32; batch * m];
    for b in 0..batch {
        let idx = rand::seq::index::sample(rng, m, k.min(m));
        for j in idx.iter() {
            let mag: f32 = rng.random_range(0.5..1.5);
            let sign = if nonneg || rng.random::<bool>() {
                1.0
            } else {
                -1.0
            };
            a[b * m + j] = sign * mag;
        }
        for i in 0..n {
            let clean: f64 = (0..m)
                .map(|j| phi[i * m + j] as f64 * a[b * m + j] as f64)
                .sum();
            let e: f32 = StandardNormal.sample(rng);
            x[b * n + i] = clean as f32 + noise * e;
        }
    }
    (x, a)
}

/// ‖out − ref‖ / ‖ref‖ in f64 (‖out − ref‖ when ref is 0); INFINITY when either holds a NaN
/// or an infinity, or the lengths differ, so a NaN never passes.
pub fn rel_err<A: Copy + Into<f64>, B: Copy + Into<f64>>(out: &[A], reference: &[B]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let (o, r): (f64, f64) = (o.into(), r.into());
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The largest |out − ref|; INFINITY on NaN/Inf or a length mismatch.
pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(out: &[A], reference: &[B]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        let d = (o.into() - r.into()).abs();
        if !d.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(d);
    }
    worst
}

/// Path of a file under tests/fixtures/.
pub fn fixture_path(name: &str) -> std::path::PathBuf {
    let built_here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // On the GPU machine the test binaries run from the repository root of a copy of the tree
    // at another path than the one they were built in.
    let root = if built_here.join("tests").is_dir() {
        built_here.to_path_buf()
    } else {
        std::path::PathBuf::from(".")
    };
    root.join("tests").join("fixtures").join(name)
}

/// Parses the JSON fixture tests/fixtures/`name`.
pub fn load_fixture(name: &str) -> serde_json::Value {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (the fixtures are in the repository, not in the crates.io \
                 package: run the tests from a clone)",
            path.display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// A JSON array of numbers as f64.
pub fn json_f64s(v: &serde_json::Value, field: &str) -> Vec<f64> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("field `{field}` is not an array"))
        .iter()
        .map(|x| {
            x.as_f64()
                .unwrap_or_else(|| panic!("field `{field}` holds a non-number"))
        })
        .collect()
}

/// A JSON unsigned integer field as usize.
pub fn json_usize(v: &serde_json::Value, field: &str) -> usize {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field `{field}` is not an unsigned integer")) as usize
}

/// A view of host memory on the f64 reference device ([`Device::reference`]): what the `*_cpu`
/// suites run, the oracle held against the peer fixtures.
pub fn host<T: bytemuck::Pod>(data: &[T]) -> fep_kernels::View<'_, T> {
    fep_kernels::View::host_on(&fep_kernels::Device::reference(), data).unwrap()
}

/// As [`host`], writable.
pub fn host_mut<T: bytemuck::Pod>(data: &mut [T]) -> fep_kernels::ViewMut<'_, T> {
    fep_kernels::ViewMut::host_on(&fep_kernels::Device::reference(), data).unwrap()
}
