//! VMP: a fuzzed `FepVmpModelDesc` (sizes, dependencies, tensors, optional parts, pointers),
//! a valid model for the targets that fuzz what comes after fep_vmp_model_new, and the
//! observation, action and belief buffers of the calls, sized as the C ABI documents.

use arbitrary::Arbitrary;

use crate::*;

/// The most factors, modalities, states, outcomes and controls a model gets.
const MAX: u64 = 3;

/// An optional per-factor or per-modality list of tensors.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Absent,
    Given,
    /// Given, with entry `i % len` NULL.
    NullEntry(u8),
}

/// Where the pointers of a description point (all valid by default).
#[derive(Arbitrary, Debug, Clone, Copy, Default)]
pub struct DescPtrs {
    pub num_states: Ptr,
    pub num_controls: Ptr,
    pub num_obs: Ptr,
    pub a_num_deps: Ptr,
    pub a_deps: Ptr,
    pub a: Ptr,
    pub b: Ptr,
    pub c: Ptr,
    pub d: Ptr,
    pub policies: Ptr,
    pub e: Ptr,
    pub pa: Ptr,
    pub pb: Ptr,
    pub pd: Ptr,
    /// One tensor of the lists (`which % 7`: A, B, C, D, pA, pB, pD; entry `at`).
    pub tensor: Option<(u8, u8, Ptr)>,
}

impl Default for Ptr {
    fn default() -> Ptr {
        Ptr::Valid
    }
}

/// A fuzzed model description.
#[derive(Arbitrary, Debug, Clone)]
pub struct ModelFuzz {
    pub factors: Dim,
    pub modalities: Dim,
    pub states: [Dim; 3],
    pub controls: Option<[Dim; 3]>,
    pub obs: [Dim; 3],
    /// deps(m): the factors of bit set `deps[m]` (none set: factor m % F), rotated by the low bits
    /// of `order` so that the axis order varies.
    pub deps: [u8; 3],
    pub order: u8,
    /// One dependency entry overwritten: (modality, value: an index out of range or a repeat).
    pub bad_dep: Option<(u8, Dim)>,
    /// One count of a_num_deps overwritten.
    pub bad_dep_count: Option<(u8, Dim)>,
    pub c: List,
    pub d: List,
    /// (P, H) of a policy table.
    pub policies: Option<(Dim, Dim)>,
    pub e: bool,
    pub pa: List,
    pub pb: List,
    pub pd: List,
    /// Tensors whose columns are left as drawn (not normalised): a bit per list.
    pub raw_columns: u8,
    pub ptrs: DescPtrs,
}

/// A valid model's sizes (small), for the targets past fep_vmp_model_new.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ModelShape {
    pub factors: u8,
    pub modalities: u8,
    pub states: [u8; 3],
    pub controls: [u8; 3],
    pub obs: [u8; 3],
    pub deps: [u8; 3],
    pub order: u8,
    pub policy_len: u8,
    pub counts: u8,
    pub seed: u64,
}

impl ModelShape {
    /// As a description with every part valid; policies (all of them, up to 8) and Dirichlet
    /// counts (`counts` bits: pA, pB, pD; all three when 0) included.
    pub fn fuzz(&self) -> ModelFuzz {
        // Exact sizes: F, M, U in 1..=2, S, O in 1..=3.
        let n = |x: u8, max: u8| Dim::Raw(1 + (x % max) as u64);
        let bits = if self.counts & 7 == 0 { 7 } else { self.counts };
        let list = |bit: u8| {
            if bits & bit != 0 {
                List::Given
            } else {
                List::Absent
            }
        };
        ModelFuzz {
            factors: n(self.factors, 2),
            modalities: n(self.modalities, 2),
            states: self.states.map(|x| n(x, 3)),
            controls: Some(self.controls.map(|x| n(x, 2))),
            obs: self.obs.map(|x| n(x, 3)),
            deps: self.deps,
            order: self.order,
            bad_dep: None,
            bad_dep_count: None,
            c: List::Given,
            d: List::Given,
            policies: Some((Dim::Small(254), n(self.policy_len, 2))),
            e: true,
            pa: list(1),
            pb: list(2),
            pd: list(4),
            raw_columns: 0,
            ptrs: DescPtrs::default(),
        }
    }
}

/// The resolved sizes of a model.
#[derive(Debug, Clone, Default)]
pub struct Sizes {
    pub f: u64,
    pub m: u64,
    pub s: Vec<u64>,
    pub u: Vec<u64>,
    pub o: Vec<u64>,
    pub deps: Vec<Vec<u64>>,
    pub p: u64,
    pub h: u64,
}

impl Sizes {
    pub fn belief_len(&self) -> u64 {
        self.s.iter().sum()
    }
    pub fn obs_len(&self) -> u64 {
        self.o.iter().sum()
    }
    /// Elements of A_m (None: overflows).
    pub fn a_len(&self, m: usize) -> Option<u128> {
        let mut dims = vec![self.o[m]];
        for &d in &self.deps[m] {
            dims.push(*self.s.get(d as usize).unwrap_or(&1));
        }
        elems(&dims)
    }
    pub fn b_len(&self, f: usize) -> Option<u128> {
        elems(&[self.s[f], self.s[f], self.u[f]])
    }
}

/// A description built in a [`Call`].
pub struct Desc {
    pub desc: Box<ffi::FepVmpModelDesc>,
    pub sizes: Sizes,
}

/// Registers the buffers of `m`'s description in `c` and allocates them; None: skip.
pub fn build(c: &mut Call, m: &ModelFuzz) -> Option<Desc> {
    let f = m.factors.get(MAX);
    let nm = m.modalities.get(MAX);
    let p = &m.ptrs;
    // Lists are built for at most MAX entries; a larger count gets its arrays only when they
    // cannot exist (a tiny buffer the library must reject) or NULL.
    let (fb, mb) = (f.min(MAX) as usize, nm.min(MAX) as usize);
    if (f > MAX && elems(&[f, 8]).is_some_and(|b| b <= CAP_BYTES))
        || (nm > MAX && elems(&[nm, 8]).is_some_and(|b| b <= CAP_BYTES))
    {
        return None;
    }
    let mut sz = Sizes {
        f,
        m: nm,
        s: (0..fb).map(|i| m.states[i].get(MAX)).collect(),
        u: (0..fb)
            .map(|i| m.controls.map_or(1, |u| u[i].get(MAX)))
            .collect(),
        o: (0..mb).map(|i| m.obs[i].get(MAX)).collect(),
        deps: Vec::new(),
        p: 0,
        h: 0,
    };
    for j in 0..mb {
        let mut deps: Vec<u64> = (0..fb as u64)
            .filter(|&g| m.deps[j] >> g & 1 == 1)
            .collect();
        if deps.is_empty() && fb > 0 {
            deps.push(j as u64 % fb as u64);
        }
        if !deps.is_empty() {
            let r = m.order as usize % deps.len();
            deps.rotate_left(r);
        }
        sz.deps.push(deps);
    }
    if let Some((j, v)) = m.bad_dep {
        // One more entry: a repeat of an existing one, or any value.
        if let Some(d) = sz.deps.get_mut(j as usize % mb.max(1)) {
            let v = match (v, d.is_empty()) {
                (Dim::Small(x), false) => d[x as usize % d.len()],
                (other, _) => other.get(MAX),
            };
            d.push(v);
        }
    }
    let mut dep_counts: Vec<u64> = sz.deps.iter().map(|d| d.len() as u64).collect();
    if let Some((j, v)) = m.bad_dep_count {
        let j = j as usize % mb.max(1);
        if j < dep_counts.len() {
            dep_counts[j] = v.get(MAX);
            // The library splits a_deps by the counts: modality j's list as it will read it
            // (padded with factor 0) when it is short enough to write.
            let d = &mut sz.deps[j];
            if dep_counts[j] <= (CAP_BYTES / 8) as u64 {
                d.resize(dep_counts[j] as usize, 0);
            }
        }
    }
    // A NULL num_controls means one control per factor to the library, whatever was drawn.
    if m.controls.is_some() && p.num_controls == Ptr::Null {
        sz.u = vec![1; sz.u.len()];
    }
    if let Some((pp, h)) = m.policies {
        sz.p = match pp {
            // All combinations, up to 8.
            Dim::Small(254) => sz.u.iter().product::<u64>().clamp(1, 8),
            other => other.get(4),
        };
        sz.h = h.get(2);
    }
    let f128 = Some(f as u128);
    let m128 = Some(nm as u128);
    let dep_total = dep_counts
        .iter()
        .try_fold(0u128, |a, &x| a.checked_add(x as u128));
    let ptr_of = |l: List, p: Ptr| if l == List::Absent { Ptr::Null } else { p };
    let num_states = c.buf(
        "desc.num_states",
        Ty::U64,
        Role::Desc,
        f128,
        p.num_states,
        Fill::Target,
    );
    let num_controls = c.buf(
        "desc.num_controls",
        Ty::U64,
        Role::Desc,
        f128,
        if m.controls.is_some() {
            p.num_controls
        } else {
            Ptr::Null
        },
        Fill::Target,
    );
    let num_obs = c.buf(
        "desc.num_obs",
        Ty::U64,
        Role::Desc,
        m128,
        p.num_obs,
        Fill::Target,
    );
    let a_num_deps = c.buf(
        "desc.a_num_deps",
        Ty::U64,
        Role::Desc,
        m128,
        p.a_num_deps,
        Fill::Target,
    );
    let a_deps = c.buf(
        "desc.a_deps",
        Ty::U64,
        Role::Desc,
        dep_total,
        p.a_deps,
        Fill::Target,
    );
    let a_list = c.buf("desc.a", Ty::Ptr, Role::Desc, m128, p.a, Fill::Target);
    let b_list = c.buf("desc.b", Ty::Ptr, Role::Desc, f128, p.b, Fill::Target);
    let c_list = c.buf(
        "desc.c",
        Ty::Ptr,
        Role::Desc,
        m128,
        ptr_of(m.c, p.c),
        Fill::Target,
    );
    let d_list = c.buf(
        "desc.d",
        Ty::Ptr,
        Role::Desc,
        f128,
        ptr_of(m.d, p.d),
        Fill::Target,
    );
    let pa_list = c.buf(
        "desc.pa",
        Ty::Ptr,
        Role::Desc,
        m128,
        ptr_of(m.pa, p.pa),
        Fill::Target,
    );
    let pb_list = c.buf(
        "desc.pb",
        Ty::Ptr,
        Role::Desc,
        f128,
        ptr_of(m.pb, p.pb),
        Fill::Target,
    );
    let pd_list = c.buf(
        "desc.pd",
        Ty::Ptr,
        Role::Desc,
        f128,
        ptr_of(m.pd, p.pd),
        Fill::Target,
    );
    let policies = c.buf(
        "desc.policies",
        Ty::I32,
        Role::Desc,
        elems(&[sz.p, sz.h, f]),
        if m.policies.is_some() {
            p.policies
        } else {
            Ptr::Null
        },
        Fill::Target,
    );
    let e = c.buf(
        "desc.e",
        Ty::F64,
        Role::In,
        elems(&[sz.p]),
        if m.e && m.policies.is_some() {
            p.e
        } else {
            Ptr::Null
        },
        Fill::Range(0.1, 1.0),
    );
    // The tensors: (list, kind index, entry, id).
    let tensor_ptr = |which: usize, at: usize| match p.tensor {
        Some((w, i, ptr)) if w as usize % 7 == which && i as usize % 3 == at => ptr,
        _ => Ptr::Valid,
    };
    let mut tensors = Vec::new();
    for j in 0..mb {
        let a_len = sz.a_len(j);
        tensors.push((
            a_list,
            0,
            j,
            c.buf(
                format!("A[{j}]"),
                Ty::F64,
                Role::In,
                a_len,
                tensor_ptr(0, j),
                Fill::Range(0.05, 1.0),
            ),
        ));
        tensors.push((
            c_list,
            2,
            j,
            c.buf(
                format!("C[{j}]"),
                Ty::F64,
                Role::In,
                elems(&[sz.o[j]]),
                tensor_ptr(2, j),
                Fill::Range(-2.0, 2.0),
            ),
        ));
        tensors.push((
            pa_list,
            4,
            j,
            c.buf(
                format!("pA[{j}]"),
                Ty::F64,
                Role::In,
                a_len,
                tensor_ptr(4, j),
                Fill::Range(0.1, 2.0),
            ),
        ));
    }
    for g in 0..fb {
        let b_len = sz.b_len(g);
        let s = elems(&[sz.s[g]]);
        tensors.push((
            b_list,
            1,
            g,
            c.buf(
                format!("B[{g}]"),
                Ty::F64,
                Role::In,
                b_len,
                tensor_ptr(1, g),
                Fill::Range(0.05, 1.0),
            ),
        ));
        tensors.push((
            d_list,
            3,
            g,
            c.buf(
                format!("D[{g}]"),
                Ty::F64,
                Role::In,
                s,
                tensor_ptr(3, g),
                Fill::Range(0.05, 1.0),
            ),
        ));
        tensors.push((
            pb_list,
            5,
            g,
            c.buf(
                format!("pB[{g}]"),
                Ty::F64,
                Role::In,
                b_len,
                tensor_ptr(5, g),
                Fill::Range(0.1, 2.0),
            ),
        ));
        tensors.push((
            pd_list,
            6,
            g,
            c.buf(
                format!("pD[{g}]"),
                Ty::F64,
                Role::In,
                s,
                tensor_ptr(6, g),
                Fill::Range(0.1, 2.0),
            ),
        ));
    }
    c.work(pass_work(&sz));
    if !c.alloc() {
        return None;
    }
    // Sizes and dependencies.
    for (id, vals) in [
        (num_states, &sz.s),
        (num_controls, &sz.u),
        (num_obs, &sz.o),
        (a_num_deps, &dep_counts),
    ] {
        for (k, &v) in vals.iter().enumerate() {
            if c.len(id).is_some_and(|n| k < n) {
                c.set(id, k, v as f64);
            }
        }
    }
    let flat: Vec<u64> = sz.deps.iter().flatten().copied().collect();
    for (k, &v) in flat.iter().enumerate() {
        if c.len(a_deps).is_some_and(|n| k < n) {
            c.set_u64(a_deps, k, v);
        }
    }
    // Policies: actions in range, drawn.
    if let Some(n) = c.len(policies) {
        for k in 0..n {
            let u = sz.u.get(k % fb.max(1)).copied().unwrap_or(1);
            let a = (c.next_u64() % u.max(1)) as f64;
            c.set(policies, k, a);
        }
    }
    // Tensor pointers into their lists, a NULL entry where asked for; columns normalised.
    let null_entry = |l: List, at: usize, len: usize| matches!(l, List::NullEntry(i) if i as usize % len.max(1) == at);
    for &(list, which, at, id) in &tensors {
        let l = match which {
            2 => m.c,
            3 => m.d,
            4 => m.pa,
            5 => m.pb,
            6 => m.pd,
            _ => List::Given,
        };
        let count = if matches!(which, 0 | 2 | 4) { mb } else { fb };
        let ptr = if null_entry(l, at, count) {
            std::ptr::null_mut()
        } else {
            c.ptr::<u8>(id)
        };
        if ptr.is_null() || !c.has(list) || l == List::Absent {
            c.unused(id);
        }
        c.set_ptr(list, at, ptr);
        // A, B and D: distributions over their first axis.
        if which <= 3 && which != 2 && m.raw_columns >> which & 1 == 0 {
            if let Some(n) = c.len(id) {
                let rows = match which {
                    0 => sz.o[at] as usize,
                    1 => sz.s[at] as usize,
                    _ => n,
                };
                normalise_columns(c, id, n, rows);
            }
        }
    }
    if let Some(n) = c.len(e) {
        normalise_columns(c, e, n, n);
    }
    let desc = ffi::FepVmpModelDesc {
        num_factors: f,
        num_modalities: nm,
        num_states: c.ptr(num_states),
        num_controls: c.ptr(num_controls),
        num_obs: c.ptr(num_obs),
        a_num_deps: c.ptr(a_num_deps),
        a_deps: c.ptr(a_deps),
        a: c.ptr(a_list),
        b: c.ptr(b_list),
        c: c.ptr(c_list),
        d: c.ptr(d_list),
        policies: c.ptr(policies),
        num_policies: sz.p,
        policy_len: sz.h,
        e: c.ptr(e),
        pa: c.ptr(pa_list),
        pb: c.ptr(pb_list),
        pd: c.ptr(pd_list),
    };
    c.note(format!("{desc:?}"));
    c.note(format!("sizes {sz:?}, a_num_deps {dep_counts:?}"));
    Some(Desc {
        desc: Box::new(desc),
        sizes: sz,
    })
}

/// Scales every column of a row-major [rows, len / rows] tensor to sum 1.
fn normalise_columns(c: &mut Call, id: Id, len: usize, rows: usize) {
    if rows == 0 || len % rows != 0 {
        return;
    }
    let cols = len / rows;
    for j in 0..cols {
        let sum: f64 = (0..rows).map(|i| c.get(id, i * cols + j)).sum();
        for i in 0..rows {
            let v = c.get(id, i * cols + j);
            c.set(id, i * cols + j, v / sum);
        }
    }
}

/// A live model, freed on drop.
pub struct Model {
    pub ptr: *mut ffi::FepVmpModel,
    pub sizes: Sizes,
}

impl Drop for Model {
    fn drop(&mut self) {
        unsafe { ffi::fep_vmp_model_free(self.ptr) }
    }
}

impl Model {
    /// A valid model of `shape`; panics when the library rejects it.
    pub fn new(shape: &ModelShape) -> Model {
        let mut c = Call::new(
            "fep_vmp_model_new (a valid model for the call)",
            Values {
                seed: shape.seed,
                poison: None,
            },
        );
        let d = build(&mut c, &shape.fuzz()).expect("a small valid model is never skipped");
        c.ready();
        let mut out = std::ptr::null_mut();
        let st = unsafe { ffi::fep_vmp_model_new(0, 0, &*d.desc, &mut out) };
        if st != ffi::FEP_OK {
            panic!(
                "a valid model was rejected: {}\n{}",
                last_error(),
                c.describe()
            );
        }
        done();
        Model {
            ptr: out,
            sizes: d.sizes,
        }
    }

    /// Every Dirichlet count array of the model (which, index, values), read back.
    pub fn counts(&self) -> Vec<(i32, u64, Vec<f64>)> {
        let s = &self.sizes;
        let mut out = Vec::new();
        let lens = [
            (
                ffi::FEP_VMP_COUNTS_A,
                (0..s.m)
                    .map(|j| s.a_len(j as usize).unwrap() as u64)
                    .collect::<Vec<_>>(),
            ),
            (
                ffi::FEP_VMP_COUNTS_B,
                (0..s.f)
                    .map(|g| s.b_len(g as usize).unwrap() as u64)
                    .collect(),
            ),
            (ffi::FEP_VMP_COUNTS_D, s.s.clone()),
        ];
        for (which, ls) in lens {
            for (i, &len) in ls.iter().enumerate() {
                let mut v = vec![0f64; len as usize];
                let st = unsafe {
                    ffi::fep_vmp_model_counts(
                        self.ptr,
                        std::ptr::null_mut(),
                        which,
                        i as u64,
                        v.as_mut_ptr(),
                        len,
                    )
                };
                if st == ffi::FEP_OK {
                    out.push((which, i as u64, v));
                }
            }
        }
        out
    }
}

/// How a call gives its observations.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ObsKind {
    Index,
    Dist,
    Raw(i32),
}

impl ObsKind {
    /// Distributions (by the code: `Raw(1)` is FEP_VMP_OBS_DIST too).
    pub fn is_dist(self) -> bool {
        self.code() == ffi::FEP_VMP_OBS_DIST
    }

    pub fn code(self) -> i32 {
        match self {
            ObsKind::Index => ffi::FEP_VMP_OBS_INDEX,
            ObsKind::Dist => ffi::FEP_VMP_OBS_DIST,
            ObsKind::Raw(v) => v,
        }
    }
}

/// The observations of n agents over `steps` steps: [n, steps, M] indices or [n, steps, sum O]
/// distributions (valid, drawn after allocation by [`fill_obs`]).
pub fn obs_buf(c: &mut Call, s: &Sizes, kind: ObsKind, n: u64, steps: u64, ptr: Ptr) -> Id {
    match kind.is_dist() {
        true => c.buf(
            "obs",
            Ty::F32,
            Role::In,
            elems(&[n, steps, s.obs_len()]),
            ptr,
            Fill::Target,
        ),
        _ => c.buf(
            "obs",
            Ty::I32,
            Role::In,
            elems(&[n, steps, s.m]),
            ptr,
            Fill::Target,
        ),
    }
}

/// Valid observations in `obs` (see [`obs_buf`]).
pub fn fill_obs(c: &mut Call, s: &Sizes, kind: ObsKind, obs: Id) {
    let Some(len) = c.len(obs) else { return };
    match kind.is_dist() {
        true => {
            let width = s.obs_len() as usize;
            for k in 0..len {
                let v = c.uniform(0.0, 1.0);
                c.set(obs, k, v);
            }
            // Each modality's block a distribution.
            for row in 0..len / width.max(1) {
                let mut at = row * width;
                for &o in &s.o {
                    let sum: f64 = (at..at + o as usize).map(|k| c.get(obs, k)).sum();
                    for k in at..at + o as usize {
                        let v = c.get(obs, k) / sum;
                        c.set(obs, k, v);
                    }
                    at += o as usize;
                }
            }
        }
        _ => {
            for k in 0..len {
                let o = s.o[k % s.o.len().max(1)];
                let v = (c.next_u64() % o.max(1)) as f64;
                c.set(obs, k, v);
            }
        }
    }
}

/// Valid actions [.., F] (each in 0 .. U_f).
pub fn fill_actions(c: &mut Call, s: &Sizes, id: Id) {
    let Some(len) = c.len(id) else { return };
    for k in 0..len {
        let u = s.u[k % s.u.len().max(1)];
        let v = (c.next_u64() % u.max(1)) as f64;
        c.set(id, k, v);
    }
}

/// Beliefs [.., sum S]: each factor's block a distribution.
pub fn fill_beliefs(c: &mut Call, s: &Sizes, id: Id) {
    let Some(len) = c.len(id) else { return };
    let width = s.belief_len() as usize;
    for k in 0..len {
        let v = c.uniform(0.05, 1.0);
        c.set(id, k, v);
    }
    for row in 0..len / width.max(1) {
        let mut at = row * width;
        for &n in &s.s {
            let sum: f64 = (at..at + n as usize).map(|k| c.get(id, k)).sum();
            for k in at..at + n as usize {
                let v = c.get(id, k) / sum;
                c.set(id, k, v);
            }
            at += n as usize;
        }
    }
}

/// The work of one pass over the model's tensors for one agent and step.
pub fn pass_work(s: &Sizes) -> Option<u128> {
    let mut w = Some(1u128);
    for j in 0..s.o.len() {
        w = add(w, s.a_len(j));
    }
    for g in 0..s.s.len() {
        w = add(w, s.b_len(g));
    }
    // (x 16: logs, exps and softmaxes per element, measured: ~250 ns per unit of this sum.)
    mul(w, Some((s.f.max(1) as u128 + 1) * 16))
}
