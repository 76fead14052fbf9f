//! The generative model of discrete active inference: what the user describes ([`ModelSpec`],
//! pymdp's layouts), its validation, and the derived tables every backend reads ([`Tables`]:
//! the clipped logs, the entropies of A's columns, MMP's row-normalised B), computed once here
//! in f64 so the CPU reference and the GPU kernels start from the same numbers.

use crate::alloc::product;
use crate::backend::Device;
use crate::error::{Error, Result};

/// pymdp's clipping floor for every log: the float64 machine epsilon (also in float32 mode).
pub const EPS: f64 = f64::EPSILON;

/// ln max(x, eps), pymdp's `log_stable`.
pub fn ln_clip(x: f64) -> f64 {
    x.max(EPS).ln()
}

/// x ln x with 0 ln 0 = 0 and ln clipped at eps (pymdp's `xlogx`).
pub fn x_ln_x(x: f64) -> f64 {
    if x == 0.0 { 0.0 } else { x * ln_clip(x) }
}

/// Largest column-sum error accepted in A and B (and sum error of D); pymdp normalises in
/// float64 and users often in float32.
pub const NORM_TOL: f64 = 1e-5;

/// The generative model as the user describes it, in pymdp's layouts (all row-major, f64):
///
/// * `a[m]`: A_m `[O_m, S_{d0}, S_{d1}, …]` with `a_deps[m] = [d0, d1, …]` (any order, no
///   repeats); p(o | s), every column (fixed s) sums to 1.
/// * `b[f]`: B_f `[S_f, S_f, U_f]`, B_f[s′, s, u] = p(s′ | s, u); columns sum to 1. Empty:
///   a model without transitions, enough for state inference ([`super::infer_states`]);
///   sequence and policy inference, and Dirichlet counts `pb`, need B.
/// * `c[m]`: C_m `[O_m]`, log-preferences used as given (empty: zeros).
/// * `d[f]`: D_f `[S_f]`, the prior over initial states (empty: uniform).
/// * `policies`: `[P, H, F]` actions (`policy_len` = H), e.g. [`construct_policies`]; needed
///   only for policy inference. `e`: E `[P]`, the prior over policies (empty: uniform).
/// * `pa`, `pb`, `pd`: Dirichlet counts shaped like A, B, D (empty: none). Learning updates
///   them; with `pa`/`pb` present policy inference can add the novelty terms.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// S_f per factor.
    pub num_states: Vec<usize>,
    /// U_f per factor (1 for an uncontrolled factor).
    pub num_controls: Vec<usize>,
    /// O_m per modality.
    pub num_obs: Vec<usize>,
    /// deps(m) per modality: the factors A_m depends on, in A_m's axis order.
    pub a_deps: Vec<Vec<usize>>,
    /// A_m per modality.
    pub a: Vec<Vec<f64>>,
    /// B_f per factor, or empty (no transitions: state inference only).
    pub b: Vec<Vec<f64>>,
    /// C_m per modality, or empty.
    pub c: Vec<Vec<f64>>,
    /// D_f per factor, or empty.
    pub d: Vec<Vec<f64>>,
    /// The policy table `[P, H, F]`, or empty.
    pub policies: Vec<i32>,
    /// H, the number of steps of each policy (0 without policies).
    pub policy_len: usize,
    /// E `[P]`, or empty.
    pub e: Vec<f64>,
    /// Dirichlet counts over A (per modality, A's shape), or empty.
    pub pa: Vec<Vec<f64>>,
    /// Dirichlet counts over B (per factor, B's shape), or empty.
    pub pb: Vec<Vec<f64>>,
    /// Dirichlet counts over D (per factor), or empty.
    pub pd: Vec<Vec<f64>>,
}

/// Every combination of actions over `policy_len` steps, in pymdp's order
/// (`control.construct_policies`): policy p is the mixed-radix number
/// a₀,₀ a₀,₁ … a_{H−1,F−1}, the last factor of the last step varying fastest. `[P, H, F]`.
/// Errors: a control count of 0 or above 2^31−1, or a table (P = Π u^H rows) too large to
/// allocate.
pub fn construct_policies(num_controls: &[usize], policy_len: usize) -> Result<Vec<i32>> {
    if let Some(i) = num_controls
        .iter()
        .position(|&u| u == 0 || u > i32::MAX as usize)
    {
        return Err(Error::invalid(
            "num_controls",
            format!("entry {i} is {} (must be in 1..=2^31-1)", num_controls[i]),
        ));
    }
    let width = product("policy_len", &[policy_len, num_controls.len()])?;
    let mut digits = crate::alloc::with_capacity(width, || "the policy digits".into())?;
    (0..policy_len).for_each(|_| digits.extend_from_slice(num_controls));
    let count = product("num_controls", &digits)?;
    let what = || format!("a policy table of {count} x {width} actions");
    let mut out = crate::alloc::with_capacity(product("policies", &[count, width])?, what)?;
    let mut row = vec![0i32; width];
    for p in 0..count {
        let mut rest = p;
        for (i, &u) in digits.iter().enumerate().rev() {
            row[i] = (rest % u) as i32;
            rest /= u;
        }
        out.extend_from_slice(&row);
    }
    Ok(out)
}

/// The validated model in f64 plus what every backend derives from it.
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    /// S_f, U_f, and the offset of factor f in a belief vector of ΣS entries.
    pub s: Vec<usize>,
    pub u: Vec<usize>,
    pub s_off: Vec<usize>,
    pub sum_s: usize,
    /// O_m, deps(m), P_m = Π_{d ∈ deps(m)} S_d, the offset of modality m in ΣO.
    pub o: Vec<usize>,
    pub deps: Vec<Vec<usize>>,
    pub size: Vec<usize>,
    pub o_off: Vec<usize>,
    pub sum_o: usize,
    /// A_m `[O, P]`, ln max(A_m, eps), and H[A_m(·|s)] = −Σ_o A ln max(A, eps) `[P]`.
    pub a: Vec<Vec<f64>>,
    pub ln_a: Vec<Vec<f64>>,
    pub h_a: Vec<Vec<f64>>,
    /// C_m `[O]`.
    pub c: Vec<Vec<f64>>,
    /// B_f `[S, S, U]`, ln max(B, eps), and MMP's B_n: B row-normalised over the previous
    /// state, B[s′, s, u] / max(Σ_s B[s′, s, u], eps).
    pub b: Vec<Vec<f64>>,
    pub ln_b: Vec<Vec<f64>>,
    pub bn: Vec<Vec<f64>>,
    /// Whether the model has B (without it b, ln_b and bn hold an empty vector per factor).
    pub has_b: bool,
    /// ln max(D_f, eps).
    pub ln_d: Vec<Vec<f64>>,
    /// `[P, H, F]`, P, H, and ln max(E, eps) `[P]`.
    pub policies: Vec<i32>,
    pub num_policies: usize,
    pub horizon: usize,
    pub ln_e: Vec<f64>,
}

impl Tables {
    pub fn factors(&self) -> usize {
        self.s.len()
    }

    pub fn modalities(&self) -> usize {
        self.o.len()
    }
}

/// The Dirichlet counts (f64, the CPU reference's copy; a GPU model keeps its own f32 copy).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts {
    pub a: Option<Vec<Vec<f64>>>,
    pub b: Option<Vec<Vec<f64>>>,
    pub d: Option<Vec<Vec<f64>>>,
}

fn finite_nonneg(name: &str, v: &[f64]) -> Result<()> {
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && **x >= 0.0))
    {
        return Err(Error::invalid(
            name,
            format!("element {i} is {x} (must be finite and >= 0)"),
        ));
    }
    Ok(())
}

fn len_is(name: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            name,
            format!("has {got} elements, expected {want} ({shape})"),
        ));
    }
    Ok(())
}

/// `Err` unless every column of the `[rows, cols]` matrix `v` sums to 1 (within [`NORM_TOL`]).
fn columns_normalised(name: &str, v: &[f64], rows: usize, cols: usize) -> Result<()> {
    for col in 0..cols {
        let sum: f64 = (0..rows).map(|r| v[r * cols + col]).sum();
        if (sum - 1.0).abs() > NORM_TOL {
            return Err(Error::invalid(
                name,
                format!("column {col} sums to {sum}, not 1 (a distribution over axis 0)"),
            ));
        }
    }
    Ok(())
}

fn shape_str(lead: usize, dims: &[usize]) -> String {
    let mut all = vec![lead];
    all.extend_from_slice(dims);
    format!("{all:?}")
}

impl ModelSpec {
    /// Checks everything and derives the tables. Errors name the field and the offending value.
    pub(crate) fn validate(&self) -> Result<(Tables, Counts)> {
        let f_count = self.num_states.len();
        let m_count = self.num_obs.len();
        if f_count == 0 {
            return Err(Error::invalid("num_states", "no hidden-state factors"));
        }
        if m_count == 0 {
            return Err(Error::invalid("num_obs", "no modalities"));
        }
        for (name, list) in [("num_states", &self.num_states), ("num_obs", &self.num_obs)] {
            if let Some(i) = list.iter().position(|&v| v == 0 || v > i32::MAX as usize) {
                return Err(Error::invalid(
                    name,
                    format!("entry {i} is {} (must be >= 1)", list[i]),
                ));
            }
        }
        let u: Vec<usize> = if self.num_controls.is_empty() {
            vec![1; f_count]
        } else {
            len_is(
                "num_controls",
                self.num_controls.len(),
                f_count,
                "one per factor",
            )?;
            if let Some(i) = self
                .num_controls
                .iter()
                .position(|&v| v == 0 || v > i32::MAX as usize)
            {
                return Err(Error::invalid(
                    "num_controls",
                    format!(
                        "entry {i} is {} (must be in 1..=2^31-1)",
                        self.num_controls[i]
                    ),
                ));
            }
            self.num_controls.clone()
        };
        let s = self.num_states.clone();
        let mut s_off = vec![0; f_count];
        for f in 1..f_count {
            s_off[f] = s_off[f - 1] + s[f - 1];
        }
        let sum_s = s.iter().sum();

        len_is(
            "a_deps",
            self.a_deps.len(),
            m_count,
            "one list per modality",
        )?;
        len_is("a", self.a.len(), m_count, "one tensor per modality")?;
        let mut size = Vec::with_capacity(m_count);
        for (m, deps) in self.a_deps.iter().enumerate() {
            let name = format!("a_deps[{m}]");
            if deps.is_empty() {
                return Err(Error::invalid(
                    name,
                    "is empty (a modality depends on >= 1 factor)",
                ));
            }
            for (i, &d) in deps.iter().enumerate() {
                if d >= f_count {
                    return Err(Error::invalid(
                        &name,
                        format!("factor {d} is out of range (there are {f_count} factors)"),
                    ));
                }
                if deps[..i].contains(&d) {
                    return Err(Error::invalid(&name, format!("factor {d} appears twice")));
                }
            }
            let dims: Vec<usize> = deps.iter().map(|&d| s[d]).collect();
            let aname = format!("a[{m}]");
            let p = product(&aname, &dims)?;
            let o = self.num_obs[m];
            len_is(
                &aname,
                self.a[m].len(),
                product(&aname, &[o, p])?,
                &shape_str(o, &dims),
            )?;
            finite_nonneg(&aname, &self.a[m])?;
            columns_normalised(&aname, &self.a[m], o, p)?;
            size.push(p);
        }
        let mut o_off = vec![0; m_count];
        for m in 1..m_count {
            o_off[m] = o_off[m - 1] + self.num_obs[m - 1];
        }
        let sum_o = self.num_obs.iter().sum();

        let has_b = !self.b.is_empty();
        if has_b {
            len_is("b", self.b.len(), f_count, "one tensor per factor")?;
        } else if !self.pb.is_empty() {
            return Err(Error::invalid(
                "pb",
                "given without B (ModelSpec::b is empty): Dirichlet counts over B need B",
            ));
        }
        for f in (0..f_count).filter(|_| has_b) {
            let name = format!("b[{f}]");
            len_is(
                &name,
                self.b[f].len(),
                product(&name, &[s[f], s[f], u[f]])?,
                &format!("[{}, {}, {}]", s[f], s[f], u[f]),
            )?;
            finite_nonneg(&name, &self.b[f])?;
            columns_normalised(&name, &self.b[f], s[f], s[f] * u[f])?;
        }

        let c = if self.c.is_empty() {
            self.num_obs.iter().map(|&o| vec![0.0; o]).collect()
        } else {
            len_is("c", self.c.len(), m_count, "one vector per modality")?;
            for m in 0..m_count {
                let name = format!("c[{m}]");
                len_is(&name, self.c[m].len(), self.num_obs[m], "[O_m]")?;
                if let Some(i) = self.c[m].iter().position(|x| !x.is_finite()) {
                    return Err(Error::invalid(
                        name,
                        format!("element {i} is {}", self.c[m][i]),
                    ));
                }
            }
            self.c.clone()
        };

        let d = if self.d.is_empty() {
            s.iter().map(|&n| vec![1.0 / n as f64; n]).collect()
        } else {
            len_is("d", self.d.len(), f_count, "one vector per factor")?;
            for (f, (d, &n)) in self.d.iter().zip(&s).enumerate() {
                let name = format!("d[{f}]");
                len_is(&name, d.len(), n, "[S_f]")?;
                finite_nonneg(&name, d)?;
                columns_normalised(&name, d, n, 1)?;
            }
            self.d.clone()
        };

        let (num_policies, horizon) = if self.policies.is_empty() {
            if !self.e.is_empty() {
                return Err(Error::invalid("e", "given without policies"));
            }
            (0, 0)
        } else {
            let h = self.policy_len;
            if h == 0 {
                return Err(Error::invalid(
                    "policy_len",
                    "is 0 with a policy table given",
                ));
            }
            if !self.policies.len().is_multiple_of(h * f_count) {
                return Err(Error::invalid(
                    "policies",
                    format!(
                        "has {} elements, not a multiple of policy_len x factors = {}",
                        self.policies.len(),
                        h * f_count
                    ),
                ));
            }
            for (i, &a) in self.policies.iter().enumerate() {
                let f = i % f_count;
                if a < 0 || a as usize >= u[f] {
                    let (p, t) = (i / (h * f_count), (i / f_count) % h);
                    return Err(Error::invalid(
                        "policies",
                        format!(
                            "policy {p}, step {t}, factor {f}: action {a} is out of range (factor {f} has {} controls)",
                            u[f]
                        ),
                    ));
                }
            }
            (self.policies.len() / (h * f_count), h)
        };
        let ln_e = if self.e.is_empty() {
            vec![ln_clip(1.0 / num_policies.max(1) as f64); num_policies]
        } else {
            len_is("e", self.e.len(), num_policies, "[P]")?;
            finite_nonneg("e", &self.e)?;
            self.e.iter().map(|&x| ln_clip(x)).collect()
        };

        let counts = Counts {
            a: self.counts("pa", &self.pa, &self.a)?,
            b: self.counts("pb", &self.pb, &self.b)?,
            d: self.counts("pd", &self.pd, &d)?,
        };

        let ln_a: Vec<Vec<f64>> = self
            .a
            .iter()
            .map(|a| a.iter().map(|&x| ln_clip(x)).collect())
            .collect();
        let h_a = (0..m_count)
            .map(|m| {
                (0..size[m])
                    .map(|col| {
                        -(0..self.num_obs[m])
                            .map(|o| x_ln_x(self.a[m][o * size[m] + col]))
                            .sum::<f64>()
                    })
                    .collect()
            })
            .collect();
        let b_tables: Vec<Vec<f64>> = if has_b {
            self.b.clone()
        } else {
            vec![Vec::new(); f_count]
        };
        let ln_b = b_tables
            .iter()
            .map(|b| b.iter().map(|&x| ln_clip(x)).collect())
            .collect();
        let bn = (0..f_count)
            .map(|f| {
                let (n, uf) = (s[f], u[f]);
                let b = &b_tables[f];
                if b.is_empty() {
                    return Vec::new();
                }
                let mut out = vec![0.0; b.len()];
                for sp in 0..n {
                    for a in 0..uf {
                        let row: f64 = (0..n).map(|sv| b[(sp * n + sv) * uf + a]).sum();
                        for sv in 0..n {
                            out[(sp * n + sv) * uf + a] = b[(sp * n + sv) * uf + a] / row.max(EPS);
                        }
                    }
                }
                out
            })
            .collect();
        let ln_d = d
            .iter()
            .map(|v| v.iter().map(|&x| ln_clip(x)).collect())
            .collect();
        let tables = Tables {
            s,
            u,
            s_off,
            sum_s,
            o: self.num_obs.clone(),
            deps: self.a_deps.clone(),
            size,
            o_off,
            sum_o,
            a: self.a.clone(),
            ln_a,
            h_a,
            c,
            b: b_tables,
            ln_b,
            bn,
            has_b,
            ln_d,
            policies: self.policies.clone(),
            num_policies,
            horizon,
            ln_e,
        };
        Ok((tables, counts))
    }

    /// Optional counts shaped like `like` (per tensor), finite and >= 0.
    fn counts(
        &self,
        name: &str,
        given: &[Vec<f64>],
        like: &[Vec<f64>],
    ) -> Result<Option<Vec<Vec<f64>>>> {
        if given.is_empty() {
            return Ok(None);
        }
        len_is(
            name,
            given.len(),
            like.len(),
            "one tensor per modality/factor",
        )?;
        for (i, (g, l)) in given.iter().zip(like).enumerate() {
            let n = format!("{name}[{i}]");
            len_is(&n, g.len(), l.len(), "the shape of the tensor it counts")?;
            finite_nonneg(&n, g)?;
        }
        Ok(Some(given.to_vec()))
    }
}

/// A validated generative model, stored on its device (the tables in f32 on a GPU, f64 on the
/// CPU). Built once with [`Model::new`]; every op takes it by reference, learning by `&mut`.
pub struct Model {
    pub(crate) device: Device,
    pub(crate) t: Tables,
    /// The counts (the CPU device's truth; on a GPU the device copy is the truth).
    pub(crate) counts: Counts,
    #[cfg(fep_gpu)]
    pub(crate) gpu: Option<super::gpu::DeviceModel>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("device", &self.device)
            .field("num_states", &self.t.s)
            .field("num_obs", &self.t.o)
            .field("a_deps", &self.t.deps)
            .field("num_controls", &self.t.u)
            .field("num_policies", &self.t.num_policies)
            .field("policy_len", &self.t.horizon)
            .finish()
    }
}

impl Model {
    /// Validates `spec` (shapes, normalised columns, non-negative counts, dependencies and
    /// policy actions in range) and stores the model on `device`.
    pub fn new(device: &Device, spec: &ModelSpec) -> Result<Model> {
        let (t, counts) = spec.validate()?;
        #[cfg(fep_gpu)]
        let gpu = if device.is_gpu() {
            Some(super::gpu::DeviceModel::upload(device, &t, &counts)?)
        } else {
            None
        };
        Ok(Model {
            device: device.clone(),
            t,
            counts,
            #[cfg(fep_gpu)]
            gpu,
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// S_f per factor.
    pub fn num_states(&self) -> &[usize] {
        &self.t.s
    }

    /// O_m per modality.
    pub fn num_obs(&self) -> &[usize] {
        &self.t.o
    }

    /// U_f per factor.
    pub fn num_controls(&self) -> &[usize] {
        &self.t.u
    }

    /// deps(m) per modality.
    pub fn a_deps(&self) -> &[Vec<usize>] {
        &self.t.deps
    }

    /// Whether the model has transition matrices B (a model without them does state
    /// inference only).
    pub fn has_b(&self) -> bool {
        self.t.has_b
    }

    /// `Err` naming B when the model has none: `what` needs it.
    pub(crate) fn require_b(&self, what: &str) -> Result<()> {
        if self.t.has_b {
            return Ok(());
        }
        Err(Error::invalid(
            "b",
            format!(
                "the model has no transition matrices B (ModelSpec::b is empty, or NULL in the C ABI): {what} needs B for every factor"
            ),
        ))
    }

    /// ΣS: the length of one agent's belief vector (factor f at offset Σ_{g<f} S_g).
    pub fn belief_len(&self) -> usize {
        self.t.sum_s
    }

    /// ΣO: the length of one agent's distributional observation (modality m at Σ_{n<m} O_n).
    pub fn obs_len(&self) -> usize {
        self.t.sum_o
    }

    /// P, the number of policies (0 without a policy table).
    pub fn num_policies(&self) -> usize {
        self.t.num_policies
    }

    /// H, the policy length.
    pub fn policy_len(&self) -> usize {
        self.t.horizon
    }

    /// The current Dirichlet counts over A_m (A_m's shape), if the model has them.
    pub fn counts_a(&self, m: usize) -> Result<Option<Vec<f64>>> {
        self.read_counts(CountKind::A, m)
    }

    /// The current Dirichlet counts over B_f, if the model has them.
    pub fn counts_b(&self, f: usize) -> Result<Option<Vec<f64>>> {
        self.read_counts(CountKind::B, f)
    }

    /// The current Dirichlet counts over D_f, if the model has them.
    pub fn counts_d(&self, f: usize) -> Result<Option<Vec<f64>>> {
        self.read_counts(CountKind::D, f)
    }

    fn read_counts(&self, kind: CountKind, i: usize) -> Result<Option<Vec<f64>>> {
        let (list, n) = match kind {
            CountKind::A => (&self.counts.a, self.t.o.len()),
            CountKind::B | CountKind::D => (
                if kind == CountKind::B {
                    &self.counts.b
                } else {
                    &self.counts.d
                },
                self.t.s.len(),
            ),
        };
        if i >= n {
            return Err(Error::invalid(
                "index",
                format!("{i} is out of range (there are {n})"),
            ));
        }
        if list.is_none() {
            return Ok(None);
        }
        #[cfg(fep_gpu)]
        if let Some(g) = &self.gpu {
            return g.read_counts(&self.device, kind, i).map(Some);
        }
        Ok(list.as_ref().map(|l| l[i].clone()))
    }
}

/// Which set of counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CountKind {
    A,
    B,
    D,
}

/// The Dirichlet mean of counts over axis 0 (pymdp's `dirichlet_expected_value`):
/// max(α, eps) / Σ_axis0 max(α, eps), for a tensor `[rows, …]` of `len / rows` columns.
pub fn dirichlet_mean(counts: &[f64], rows: usize) -> Vec<f64> {
    let cols = counts.len() / rows.max(1);
    let mut out: Vec<f64> = counts.iter().map(|&x| x.max(EPS)).collect();
    for col in 0..cols {
        let sum: f64 = (0..rows).map(|r| out[r * cols + col]).sum();
        for r in 0..rows {
            out[r * cols + col] /= sum;
        }
    }
    out
}
