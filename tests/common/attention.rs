//! The attention fixtures (tests/fixtures/attention_torch.json): the SplitMix64 input generator of
//! ATTENTION-CONVENTIONS.md §2 ported bit for bit, and a loader that turns a case into reference
//! inputs, an `AttentionSpec` and the expected outputs.

use fep_kernels::attention::reference::RefInputs;
use fep_kernels::attention::{AttentionSpec, Score};
use serde_json::Value;

pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
const MUL1: u64 = 0xbf58_476d_1ce4_e5b9;
const MUL2: u64 = 0x94d0_49bb_1331_11eb;

/// Tensor ids of the generator.
pub const TID_Q: u64 = 1;
pub const TID_K: u64 = 2;
pub const TID_V: u64 = 3;
pub const TID_PI_HEAD: u64 = 4;
pub const TID_PI_KEY: u64 = 5;
pub const TID_KV_LEN: u64 = 6;
/// ∂L/∂o of the backward fixture (ATTENTION-CONVENTIONS.md §11).
pub const TID_D_O: u64 = 7;
/// ∂L/∂e of the backward fixture.
pub const TID_D_E: u64 = 8;

pub fn mix64(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(MUL1);
    z ^= z >> 27;
    z = z.wrapping_mul(MUL2);
    z ^ (z >> 31)
}

pub fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(GAMMA))
}

pub fn stream_base(seed: u64, tid: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ tid)
}

/// The first `n` outputs of SplitMix64 seeded with `stream_base(seed, tid)`.
pub fn raw_bits(seed: u64, tid: u64, n: usize) -> Vec<u64> {
    let mut z = stream_base(seed, tid);
    (0..n)
        .map(|_| {
            z = z.wrapping_add(GAMMA);
            mix64(z)
        })
        .collect()
}

/// [−1, 1), exact.
pub fn uniform_pm1(bits: u64) -> f64 {
    ((bits >> 11) as i64 - (1i64 << 52)) as f64 * 2f64.powi(-52)
}

/// [0.25, 4), log-uniform by octave, exact.
pub fn precision(bits: u64) -> f64 {
    let n = bits >> 11;
    let e = (n >> 51) as i32;
    let m = n & ((1u64 << 51) - 1);
    ((1u64 << 51) + m) as f64 * 2f64.powi(e - 53)
}

/// kv_len before overrides.
pub fn kv_len_raw(bits: u64, lk: usize) -> i32 {
    ((bits >> 11) % (lk as u64 + 1)) as i32
}

/// One fixture case, loaded.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub seed: u64,
    pub spec: AttentionSpec,
    /// τ as stored.
    pub tau: f64,
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub pi_head: Option<Vec<f64>>,
    pub pi_key: Option<Vec<f64>>,
    pub kv_len: Option<Vec<i32>>,
    /// The stored query rows of o (same for every (b, h)).
    pub o_rows: Vec<usize>,
    /// `[B, Hq, o_rows.len(), Dv]`.
    pub o: Vec<f64>,
    /// `[B, Hq, Lq]`, −∞ on fully masked rows.
    pub lse: Vec<f64>,
    /// `[B, Hq, Lq]`.
    pub e: Vec<f64>,
    pub fully_masked_rows: usize,
}

impl Case {
    pub fn inputs(&self) -> RefInputs<'_> {
        RefInputs {
            b: self.b,
            hq: self.hq,
            hkv: self.hkv,
            lq: self.lq,
            lk: self.lk,
            d: self.d,
            dv: self.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            pi_head: self.pi_head.as_deref(),
            pi_key: self.pi_key.as_deref(),
            kv_len: self.kv_len.as_deref(),
            ..Default::default()
        }
    }

    /// Picks the stored rows out of a full o `[B, Hq, Lq, Dv]`.
    pub fn sample_o(&self, o: &[f64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.b * self.hq * self.o_rows.len() * self.dv);
        for bh in 0..self.b * self.hq {
            for &i in &self.o_rows {
                out.extend_from_slice(&o[(bh * self.lq + i) * self.dv..][..self.dv]);
            }
        }
        out
    }
}

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// A `{shape, data}` tensor's data (with "-inf").
pub fn tensor_data(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .expect("tensor data")
        .iter()
        .map(num)
        .collect()
}

fn uz(v: &Value) -> usize {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}")) as usize
}

/// A case of the fixture, inputs regenerated.
pub fn load_case(c: &Value) -> Case {
    let mut case = load_inputs(c);
    case.o_rows = c["o_rows"].as_array().unwrap().iter().map(uz).collect();
    case.o = tensor_data(&c["o"]);
    case.lse = tensor_data(&c["lse"]);
    case.e = tensor_data(&c["e"]);
    case.fully_masked_rows = uz(&c["fully_masked_rows"]);
    case
}

/// The inputs of a case (of either fixture) regenerated, with its spec; the stored outputs
/// (`o_rows`, `o`, `lse`, `e`, `fully_masked_rows`) are left empty.
pub fn load_inputs(c: &Value) -> Case {
    let seed = c["seed"].as_u64().unwrap();
    let sh = &c["shape"];
    let (b, hq, hkv, lq, lk, d, dv) = (
        uz(&sh["B"]),
        uz(&sh["Hq"]),
        uz(&sh["Hkv"]),
        uz(&sh["Lq"]),
        uz(&sh["Lk"]),
        uz(&sh["D"]),
        uz(&sh["Dv"]),
    );
    assert_eq!(c["layout"], "BHLD");
    let qk_scale = c["qk_scale"].as_f64().unwrap();
    let uni = |tid, n, scale: f64| -> Vec<f64> {
        raw_bits(seed, tid, n)
            .into_iter()
            .map(|x| {
                let u = uniform_pm1(x);
                if scale == 1.0 { u } else { u * scale }
            })
            .collect()
    };
    let q = uni(TID_Q, b * hq * lq * d, qk_scale);
    let k = uni(TID_K, b * hkv * lk * d, qk_scale);
    let v = uni(TID_V, b * hkv * lk * dv, 1.0);
    let pr = &c["precision"];
    let kind = pr["kind"].as_str().unwrap();
    let head_mul = pr["head_mul"].as_f64().unwrap();
    let key_mul: Vec<f64> = pr["key_mul"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let pi_head = matches!(kind, "head" | "both").then(|| {
        raw_bits(seed, TID_PI_HEAD, hq)
            .into_iter()
            .map(|x| {
                let p = precision(x);
                if head_mul == 1.0 { p } else { p * head_mul }
            })
            .collect::<Vec<f64>>()
    });
    let pi_key = matches!(kind, "key" | "both").then(|| {
        raw_bits(seed, TID_PI_KEY, b * hkv * lk)
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                let p = precision(x);
                let m = key_mul[(i % lk) % 2];
                if m == 1.0 { p } else { p * m }
            })
            .collect::<Vec<f64>>()
    });
    let mask = &c["mask"];
    let kv_len = mask["kv_len"].as_array().map(|stored| {
        let mut l: Vec<i32> = raw_bits(seed, TID_KV_LEN, b)
            .into_iter()
            .map(|x| kv_len_raw(x, lk))
            .collect();
        if let Some(ov) = mask["kv_len_override"].as_object() {
            for (bi, n) in ov {
                l[bi.parse::<usize>().unwrap()] = n.as_i64().unwrap() as i32;
            }
        }
        let stored: Vec<i32> = stored.iter().map(|x| x.as_i64().unwrap() as i32).collect();
        assert_eq!(l, stored, "regenerated kv_len differs from mask.kv_len");
        l
    });
    let score = match c["family"].as_str().unwrap() {
        "dot" => Score::Dot,
        "gaussian" => Score::Gaussian,
        "studentt" => {
            let nu = c["nu"].as_f64().unwrap();
            assert_eq!(nu as f32 as f64, nu, "nu is not exact in f32");
            Score::StudentT(nu as f32)
        }
        "laplace" => Score::Laplace,
        f => panic!("unknown family {f}"),
    };
    let tau = c["tau"].as_f64().unwrap();
    let tau_default = c["tau_default"].as_bool().unwrap();
    let mut spec = AttentionSpec::new(score)
        .causal(mask["causal"].as_bool().unwrap())
        .normalizer(c["normalizer"].as_bool().unwrap());
    if let Some(w) = mask["window"].as_u64() {
        spec = spec.window(w as u32);
    }
    if !tau_default {
        spec = spec.scale(tau);
    }
    Case {
        name: c["name"].as_str().unwrap().to_string(),
        seed,
        spec,
        tau,
        b,
        hq,
        hkv,
        lq,
        lk,
        d,
        dv,
        q,
        k,
        v,
        pi_head,
        pi_key,
        kv_len,
        o_rows: Vec::new(),
        o: Vec::new(),
        lse: Vec::new(),
        e: Vec::new(),
        fully_masked_rows: 0,
    }
}

/// `n` values uniform in [−1, 1) from tensor id `tid` (the upstream gradients d_o and d_e of the
/// backward fixture: never scaled).
pub fn uniform_tensor(seed: u64, tid: u64, n: usize) -> Vec<f64> {
    raw_bits(seed, tid, n)
        .into_iter()
        .map(uniform_pm1)
        .collect()
}

/// One case of tests/fixtures/attention_backward_torch.json: the inputs and upstream gradients
/// regenerated, the gradients as stored (torch float64 autograd).
#[derive(Clone, Debug)]
pub struct BackwardCase {
    /// Inputs and spec (no forward outputs).
    pub case: Case,
    /// ∂L/∂o `[B, Hq, Lq, Dv]` (tensor id 7).
    pub d_o: Vec<f64>,
    /// ∂L/∂e `[B, Hq, Lq]` (tensor id 8), None when the loss has no e term.
    pub d_e: Option<Vec<f64>>,
    /// `[B, Hq, Lq, D]`.
    pub dq: Vec<f64>,
    /// `[B, Hkv, Lk, D]`.
    pub dk: Vec<f64>,
    /// `[B, Hkv, Lk, Dv]`.
    pub dv: Vec<f64>,
    /// `[Hq]` (at π_h = 1 when the case has no per-head precision).
    pub dpi_head: Vec<f64>,
    /// `[B, Hkv, Lk]` (at π_j = 1 when the case has no per-key precision).
    pub dpi_key: Vec<f64>,
    /// ∂L/∂ν; None unless Student-t.
    pub dnu: Option<f64>,
    pub fully_masked_rows: usize,
}

/// A case of the backward fixture.
pub fn load_backward_case(c: &Value) -> BackwardCase {
    let case = load_inputs(c);
    let rows = case.b * case.hq * case.lq;
    let d_o = uniform_tensor(case.seed, TID_D_O, rows * case.dv);
    let d_e = c["loss_has_e"]
        .as_bool()
        .expect("loss_has_e")
        .then(|| uniform_tensor(case.seed, TID_D_E, rows));
    let g = &c["grad"];
    BackwardCase {
        d_o,
        d_e,
        dq: tensor_data(&g["q"]),
        dk: tensor_data(&g["k"]),
        dv: tensor_data(&g["v"]),
        dpi_head: tensor_data(&g["pi_head"]),
        dpi_key: tensor_data(&g["pi_key"]),
        dnu: g["nu"].as_f64(),
        fully_masked_rows: uz(&c["fully_masked_rows"]),
        case,
    }
}

/// BHLD data laid out as BLHD (`to_blhd`), or BLHD memory read back as BHLD; `[b, h, l, d]` is
/// the BHLD shape either way.
pub fn relayout<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4], to_blhd: bool) -> Vec<T> {
    let mut out = x.to_vec();
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                let bhld = ((bi * h + hi) * l + li) * d;
                let blhd = ((bi * l + li) * h + hi) * d;
                let (src, dst) = if to_blhd { (bhld, blhd) } else { (blhd, bhld) };
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}
