//! VMP test helpers: the pymdp fixture (tests/fixtures/vmp_pymdp.json) as [`ModelSpec`]s, and
//! random models and inputs (for the CPU reference tests and the GPU tests alike).
//!
//! Layouts follow the library's: beliefs `[rows, ΣS]` (factor f at Σ_{g<f} S_g), index
//! observations `[rows, M]`, distributions `[rows, ΣO]`, actions `[rows, F]`, where a row is an
//! agent (or an agent's step, for windows).

use fep_kernels::vmp::{ModelSpec, construct_policies};
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp1, StandardNormal};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------------------------

/// One decoded tensor of the fixture: its shape and row-major data. Handles both encodings of
/// `tensor_encoding`: `{shape, data}` (dense) and `{shape, fill, index, data}` (every element is
/// `fill` except the flat positions `index`, which hold `data`).
pub fn tensor(v: &Value) -> (Vec<usize>, Vec<f64>) {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("not a tensor (no shape): {v}"))
        .iter()
        .map(|x| x.as_u64().expect("shape entries are integers") as usize)
        .collect();
    let len: usize = shape.iter().product();
    let data = flat_f64(&v["data"]);
    let out = if v.get("fill").is_some() {
        let fill = v["fill"].as_f64().expect("fill is a number");
        let mut out = vec![fill; len];
        let index = v["index"].as_array().expect("a sparse tensor has an index");
        assert_eq!(index.len(), data.len(), "index and data differ in length");
        for (i, x) in index.iter().zip(data) {
            out[i.as_u64().expect("index entries are integers") as usize] = x;
        }
        out
    } else {
        data
    };
    assert_eq!(
        out.len(),
        len,
        "tensor data does not match its shape {shape:?}"
    );
    (shape, out)
}

/// The data of a fixture tensor.
pub fn tensor_data(v: &Value) -> Vec<f64> {
    tensor(v).1
}

/// Every number of a nested JSON array, depth first (row-major for the fixture's
/// `[agent][t][factor][state]` lists).
pub fn flat_f64(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(xs) => xs.iter().for_each(|x| walk(x, out)),
            Value::Number(x) => out.push(x.as_f64().expect("a finite number")),
            other => panic!("expected numbers, found {other}"),
        }
    }
    walk(v, &mut out);
    out
}

/// Every integer of a nested JSON array, depth first.
pub fn flat_i32(v: &Value) -> Vec<i32> {
    flat_f64(v)
        .into_iter()
        .map(|x| {
            assert_eq!(x, x.trunc(), "expected an integer, found {x}");
            x as i32
        })
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    flat_i32(v).into_iter().map(|x| x as usize).collect()
}

/// A fixture model: the full `ModelSpec` (A, B, C, D, E, policies, pA, pB, pD), γ, and the raw
/// JSON record for the recorded outputs (`fpi`, `sequence`, `policy`, `learning`, …).
pub struct FixtureModel {
    /// "tmaze", "two_factor", "five_factor", "grid7x7".
    pub name: String,
    /// The model with every optional part the fixture records.
    pub spec: ModelSpec,
    /// The model's policy precision.
    pub gamma: f64,
    /// The model's record.
    pub json: Value,
}

impl FixtureModel {
    /// The spec without Dirichlet counts.
    pub fn without_counts(&self) -> ModelSpec {
        self.with_counts(false, false, false)
    }

    /// The spec keeping only the chosen counts (to isolate the novelty terms).
    pub fn with_counts(&self, pa: bool, pb: bool, pd: bool) -> ModelSpec {
        let mut s = self.spec.clone();
        if !pa {
            s.pa.clear();
        }
        if !pb {
            s.pb.clear();
        }
        if !pd {
            s.pd.clear();
        }
        s
    }

    /// ΣS.
    pub fn belief_len(&self) -> usize {
        self.spec.num_states.iter().sum()
    }
}

/// The four fixture models, in the file's order.
pub fn fixture_models() -> Vec<FixtureModel> {
    let doc = super::load_fixture("vmp_pymdp.json");
    assert_eq!(doc["pymdp_version"], "1.0.4");
    doc["models"]
        .as_array()
        .expect("models is an array")
        .iter()
        .map(fixture_model)
        .collect()
}

fn tensors(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("a list of tensors")
        .iter()
        .map(tensor_data)
        .collect()
}

fn fixture_model(m: &Value) -> FixtureModel {
    let name = m["name"].as_str().expect("name").to_string();
    let num_states = usizes(&m["num_states"]);
    let num_controls = usizes(&m["num_controls"]);
    let a_deps: Vec<Vec<usize>> = m["A_dependencies"]
        .as_array()
        .expect("A_dependencies")
        .iter()
        .map(usizes)
        .collect();
    for (f, deps) in m["B_dependencies"]
        .as_array()
        .expect("B_dependencies")
        .iter()
        .enumerate()
    {
        assert_eq!(
            usizes(deps),
            vec![f],
            "{name}: only trivial B dependencies are supported"
        );
    }
    let pol_shape = usizes(&m["policies"]["shape"]);
    let policies = flat_i32(&m["policies"]["data"]);
    let policy_len = m["policy_len"].as_u64().expect("policy_len") as usize;
    assert_eq!(pol_shape[1], policy_len);
    assert_eq!(
        policies,
        construct_policies(&num_controls, policy_len).unwrap(),
        "{name}: the fixture's policy table is pymdp's order"
    );
    let spec = ModelSpec {
        num_states,
        num_controls,
        num_obs: usizes(&m["num_obs"]),
        a_deps,
        a: tensors(&m["A"]),
        b: tensors(&m["B"]),
        c: tensors(&m["C"]),
        d: tensors(&m["D"]),
        policies,
        policy_len,
        e: tensor_data(&m["E"]),
        pa: tensors(&m["pA"]),
        pb: tensors(&m["pB"]),
        pd: tensors(&m["pD"]),
    };
    FixtureModel {
        name,
        spec,
        gamma: m["gamma"].as_f64().expect("gamma"),
        json: m.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Random models and inputs
// ---------------------------------------------------------------------------------------------

/// A random distribution over `n` outcomes (Dirichlet(1)); each entry is zero with
/// probability `p_zero`, keeping at least one positive entry (so some logs hit the eps clip).
pub fn random_distribution(rng: &mut StdRng, n: usize, p_zero: f64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let x: f64 = Exp1.sample(rng);
            x + 1e-3
        })
        .collect();
    let keep = rng.random_range(0..n);
    for (i, x) in v.iter_mut().enumerate() {
        if i != keep && rng.random_bool(p_zero) {
            *x = 0.0;
        }
    }
    let sum: f64 = v.iter().sum();
    v.iter_mut().for_each(|x| *x /= sum);
    v
}

/// A `[rows, cols]` row-major table whose every column is [`random_distribution`].
fn random_columns(rng: &mut StdRng, rows: usize, cols: usize, p_zero: f64) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for c in 0..cols {
        for (r, x) in random_distribution(rng, rows, p_zero)
            .into_iter()
            .enumerate()
        {
            out[r * cols + c] = x;
        }
    }
    out
}

/// A random model: A_m `[O_m, S_deps…]` and B_f `[S_f, S_f, U_f]` with Dirichlet(1) columns
/// and about 20% exact zeros (the eps clipping matters), C ~ N(0, 1), D (with some zeros) and E
/// random distributions, every policy of `policy_len` steps (none when 0), and, with `counts`,
/// Dirichlet counts pA = κ·A, pB = κ·B (zeros kept, so the novelty mask matters) and
/// pD = κ·D + ½ where D > 0, κ ∈ [1, 5).
pub fn random_model(
    rng: &mut StdRng,
    num_states: &[usize],
    num_obs: &[usize],
    a_deps: &[Vec<usize>],
    num_controls: &[usize],
    policy_len: usize,
    counts: bool,
) -> ModelSpec {
    let a: Vec<Vec<f64>> = num_obs
        .iter()
        .zip(a_deps)
        .map(|(&o, deps)| {
            let cols: usize = deps.iter().map(|&g| num_states[g]).product();
            random_columns(rng, o, cols, 0.2)
        })
        .collect();
    let b: Vec<Vec<f64>> = num_states
        .iter()
        .zip(num_controls)
        .map(|(&s, &u)| random_columns(rng, s, s * u, 0.2))
        .collect();
    let c = num_obs
        .iter()
        .map(|&o| (0..o).map(|_| StandardNormal.sample(rng)).collect())
        .collect();
    let d: Vec<Vec<f64>> = num_states
        .iter()
        .map(|&s| random_distribution(rng, s, 0.15))
        .collect();
    let policies = if policy_len > 0 {
        construct_policies(num_controls, policy_len).unwrap()
    } else {
        Vec::new()
    };
    let p = policies.len() / (policy_len * num_states.len()).max(1);
    let e = if policy_len > 0 {
        random_distribution(rng, p, 0.0)
    } else {
        Vec::new()
    };
    let mut scaled = |t: &[Vec<f64>], shift: f64| -> Vec<Vec<f64>> {
        t.iter()
            .map(|x| {
                let k = rng.random_range(1.0..5.0);
                x.iter()
                    .map(|&v| if v > 0.0 { k * v + shift } else { 0.0 })
                    .collect()
            })
            .collect()
    };
    let (pa, pb, pd) = if counts {
        (scaled(&a, 0.0), scaled(&b, 0.0), scaled(&d, 0.5))
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    ModelSpec {
        num_states: num_states.to_vec(),
        num_controls: num_controls.to_vec(),
        num_obs: num_obs.to_vec(),
        a_deps: a_deps.to_vec(),
        a,
        b,
        c,
        d,
        policies,
        policy_len,
        e,
        pa,
        pb,
        pd,
    }
}

/// `rows` random observation indices per modality, `[rows, M]`.
pub fn random_index_obs(rng: &mut StdRng, num_obs: &[usize], rows: usize) -> Vec<i32> {
    (0..rows)
        .flat_map(|_| {
            num_obs
                .iter()
                .map(|&o| rng.random_range(0..o) as i32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `rows` random observation distributions, `[rows, ΣO]`, each modality's normalised (some
/// entries exactly zero).
pub fn random_dist_obs(rng: &mut StdRng, num_obs: &[usize], rows: usize) -> Vec<f64> {
    per_factor(rng, num_obs, rows, 0.2)
}

/// `rows` random belief vectors `[rows, ΣS]`, normalised per factor (some zeros).
pub fn random_beliefs(rng: &mut StdRng, num_states: &[usize], rows: usize) -> Vec<f64> {
    per_factor(rng, num_states, rows, 0.1)
}

/// `rows` random priors `[rows, ΣS]`, normalised per factor (some zeros).
pub fn random_prior(rng: &mut StdRng, num_states: &[usize], rows: usize) -> Vec<f64> {
    per_factor(rng, num_states, rows, 0.1)
}

fn per_factor(rng: &mut StdRng, sizes: &[usize], rows: usize, p_zero: f64) -> Vec<f64> {
    (0..rows)
        .flat_map(|_| {
            sizes
                .iter()
                .flat_map(|&n| random_distribution(rng, n, p_zero))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `rows` random actions `[rows, F]`, each in 0..U_f.
pub fn random_actions(rng: &mut StdRng, num_controls: &[usize], rows: usize) -> Vec<i32> {
    random_index_obs(rng, num_controls, rows)
}

/// f64 → f32 (what a device gets).
pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// f32 → f64 (the exact values a device got, for the reference).
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
