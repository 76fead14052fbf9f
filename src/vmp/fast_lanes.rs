//! State inference (fpi without early stop) across agents: 16 agents side by side in the lanes
//! of `[f32; 16]` vectors (structure of arrays), so that models with 2–5 states per factor
//! (the T-maze) still fill AVX-512 / AVX2 registers. Each lane runs exactly the per-agent
//! algorithm of [`super::fast`] (the same Jacobi iterations, F from the next pass's
//! contraction); a lane's arithmetic never depends on the other lanes, and a ragged last block
//! repeats its last agent in the spare lanes (computed, never written).

use super::FpiSpec;
use super::fast::{Base, FpiTask, ObsRef, fill_ll};
use super::fast_math::{exp, ln_clip};

const L: usize = 16;
type V = [f32; L];

#[inline(always)]
fn splat(x: f32) -> V {
    [x; L]
}

/// acc += a · b per lane.
#[inline(always)]
fn fma_into(acc: &mut V, a: &V, b: &V) {
    for l in 0..L {
        acc[l] = a[l].mul_add(b[l], acc[l]);
    }
}

#[inline(always)]
fn factor(b: &Base, q: &[V], f: usize) -> std::ops::Range<usize> {
    let _ = q;
    b.s_off[f]..b.s_off[f] + b.s[f]
}

/// Outer product of the factors `gs` of q (first slowest) into w; returns its length.
#[inline(always)]
fn outer(b: &Base, q: &[V], gs: &[usize], w: &mut [V]) -> usize {
    w[0] = splat(1.0);
    let mut len = 1;
    for &g in gs {
        let r = factor(b, q, g);
        let s = r.len();
        for i in (0..len).rev() {
            let wi = w[i];
            for (si, qi) in r.clone().enumerate() {
                let mut o = [0.0; L];
                for l in 0..L {
                    o[l] = wi[l] * q[qi][l];
                }
                w[i * s + si] = o;
            }
        }
        len *= s;
    }
    len
}

struct Scratch {
    wl: Vec<V>,
    wr: Vec<V>,
    tmp: Vec<V>,
}

/// As `fast::evidence`, per lane.
#[inline(always)]
fn evidence(b: &Base, ll: &[V], q: &[V], all: bool, ev: &mut [V], sc: &mut Scratch) -> V {
    if all {
        ev.iter_mut().for_each(|v| *v = splat(0.0));
    }
    let mut acc = splat(0.0);
    for m in 0..b.o.len() {
        let ll_m = &ll[b.p_off[m]..b.p_off[m] + b.size[m]];
        let deps = &b.deps[m];
        let axes = if all { deps.len() } else { 1 };
        for (j, &g) in deps.iter().enumerate().take(axes) {
            let s = b.s[g];
            let l_len = outer(b, q, &deps[..j], &mut sc.wl);
            let r_len = outer(b, q, &deps[j + 1..], &mut sc.wr);
            let out = &mut sc.tmp[..s];
            out.iter_mut().for_each(|v| *v = splat(0.0));
            for l in 0..l_len {
                let wl = sc.wl[l];
                for (si, o) in out.iter_mut().enumerate() {
                    let base = (l * s + si) * r_len;
                    let mut inner = splat(0.0);
                    for r in 0..r_len {
                        fma_into(&mut inner, &ll_m[base + r], &sc.wr[r]);
                    }
                    fma_into(o, &wl, &inner);
                }
            }
            if j == 0 {
                let mut a = splat(0.0);
                for (o, qi) in out.iter().zip(factor(b, q, g)) {
                    fma_into(&mut a, o, &q[qi]);
                }
                for l in 0..L {
                    acc[l] += a[l];
                }
            }
            if all {
                for (o, e) in out.iter().zip(&mut ev[b.s_off[g]..b.s_off[g] + s]) {
                    for l in 0..L {
                        e[l] += o[l];
                    }
                }
            }
        }
    }
    acc
}

#[inline(always)]
fn softmax(x: &mut [V]) {
    let mut max = splat(f32::NEG_INFINITY);
    for v in x.iter() {
        for l in 0..L {
            max[l] = max[l].max(v[l]);
        }
    }
    let mut sum = splat(0.0);
    for v in x.iter_mut() {
        for l in 0..L {
            v[l] = exp(v[l] - max[l]);
            sum[l] += v[l];
        }
    }
    let mut inv = splat(0.0);
    for l in 0..L {
        inv[l] = 1.0 / sum[l];
    }
    for v in x.iter_mut() {
        for l in 0..L {
            v[l] *= inv[l];
        }
    }
}

simd_fn! {
/// fpi (tol = 0) for one chunk, 16 agents at a time.
pub(super) fn fpi_chunk_lanes<'a, 'o>(
    b: &Base,
    spec: &FpiSpec,
    obs: ObsRef<'o>,
    prior: Option<&[f32]>,
    task: &mut FpiTask<'a>,
) {
    let ss = b.sum_s;
    let cn = task.qs.len() / ss;
    let k_max = spec.num_iter as usize;
    let passes = if b.fc == 1 { 1 } else { k_max };
    let mut ll_rows = vec![0.0f32; cn * b.sum_p];
    fill_ll(b, obs, task.first, cn, &mut ll_rows);
    let mut ll = vec![splat(0.0); b.sum_p];
    let (mut q, mut ev, mut lnp) = (
        vec![splat(0.0); ss],
        vec![splat(0.0); ss],
        vec![splat(0.0); ss],
    );
    let mut sc = Scratch {
        wl: vec![splat(0.0); b.max_p.max(1)],
        wr: vec![splat(0.0); b.max_p.max(1)],
        tmp: vec![splat(0.0); b.max_s],
    };
    let mut trace = vec![splat(0.0); k_max];
    for start in (0..cn).step_by(L) {
        let lanes = L.min(cn - start);
        for l in 0..L {
            let i = start + l.min(lanes - 1);
            for (c, v) in ll.iter_mut().enumerate() {
                v[l] = ll_rows[i * b.sum_p + c];
            }
            let agent = task.first + i;
            for (j, v) in lnp.iter_mut().enumerate() {
                v[l] = match prior {
                    Some(p) => ln_clip(p[agent * ss + j]),
                    None => b.ln_d[j],
                };
            }
        }
        for f in 0..b.fc {
            let r = factor(b, &q, f);
            let u = 1.0 / r.len() as f32;
            q[r].iter_mut().for_each(|v| *v = splat(u));
        }
        evidence(b, &ll, &q, true, &mut ev, &mut sc);
        let mut f_k = splat(0.0);
        for k in 1..=passes {
            for ((q, e), p) in q.iter_mut().zip(&ev).zip(&lnp) {
                for l in 0..L {
                    q[l] = e[l] + p[l];
                }
            }
            for f in 0..b.fc {
                let r = factor(b, &q, f);
                softmax(&mut q[r]);
            }
            let acc = evidence(b, &ll, &q, k < passes, &mut ev, &mut sc);
            let (mut ne, mut pc) = (splat(0.0), splat(0.0));
            for (qv, p) in q.iter().zip(&lnp) {
                for l in 0..L {
                    ne[l] = qv[l].mul_add(ln_clip(qv[l]), ne[l]);
                    pc[l] = qv[l].mul_add(p[l], pc[l]);
                }
            }
            for l in 0..L {
                f_k[l] = ne[l] + -pc[l] - acc[l];
            }
            trace[k - 1] = f_k;
        }
        for t in trace[passes..].iter_mut() {
            *t = f_k;
        }
        for l in 0..lanes {
            let i = start + l;
            for (j, v) in q.iter().enumerate() {
                task.qs[i * ss + j] = v[l];
            }
            if let Some(v) = task.vfe.as_deref_mut() {
                v[i] = f_k[l];
            }
            if let Some(v) = task.its.as_deref_mut() {
                v[i] = passes as i32;
            }
            if let Some(v) = task.trace.as_deref_mut() {
                for (k, t) in trace.iter().enumerate() {
                    v[i * k_max + k] = t[l];
                }
            }
        }
    }
}
}
