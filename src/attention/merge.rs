//! Partial attention results merged by their lse: the step that joins the key splits of a
//! decode, or the shards of a sequence spread over devices. The maths is in the module docs of
//! [`crate::attention`], section "Decode: key splits and the lse merge". On the CPU device the
//! merge runs in f64 ([`super::reference::merge`]); on a GPU one warp per row
//! (kernels/attention/merge.cu), accumulating in f32.

use super::cpu::RefOutputs;
use super::{AttentionOutputs, AttentionResult, Tensor4Mut, check_tensor, extent};
use crate::alloc::product;
use crate::backend::{Device, Stream, View};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::tensor::{check_len, check_no_overlap, same_device};

/// S partial results of the same rows, each over a subset of the keys (the maths is in the
/// module docs of [`crate::attention`], section "Decode: key splits and the lse merge").
#[derive(Clone, Debug)]
pub struct MergeParts<'a, T: Element> {
    /// `[S, B, Hq, Lq, Dv]` row-major: each part's normalised output.
    pub o: View<'a, T>,
    /// `[S, B, Hq, Lq]` row-major: each part's ln Σ e^s (−∞ for a part with no visible key).
    pub lse: View<'a, f32>,
    /// `[S, B, Hq, Lq]` row-major: each part's Σ w π d², optional (needed for an e output).
    pub e: Option<View<'a, f32>>,
    /// S ≥ 1.
    pub splits: usize,
    /// B, Hq, Lq, Dv.
    pub shape: [usize; 4],
}

/// The f64 merge on host slices: `o_parts` `[S, rows, dv]`, `lse_parts` and `e_parts`
/// `[S, rows]` (row-major). The result's o is `[rows, dv]`, lse `[rows]`, e `[rows]` (empty when
/// no `e_parts` is given).
pub fn merge_reference(
    splits: usize,
    rows: usize,
    dv: usize,
    o_parts: &[f64],
    lse_parts: &[f64],
    e_parts: Option<&[f64]>,
) -> Result<RefOutputs> {
    if splits == 0 {
        return Err(Error::invalid("splits", "must be >= 1"));
    }
    check_len("o", o_parts.len(), product("o", &[splits, rows, dv])?)?;
    check_len("lse", lse_parts.len(), product("lse", &[splits, rows])?)?;
    if let Some(e) = e_parts {
        check_len("e", e.len(), splits * rows)?;
    }
    // A part's lse is finite, or −∞ for a part that saw no key; +∞ (an overflowed forward) or
    // NaN would turn the whole row into NaN.
    if let Some(i) = lse_parts
        .iter()
        .position(|&x| x.is_nan() || x == f64::INFINITY)
    {
        return Err(Error::invalid(
            "lse parts",
            format!(
                "element {i} (part {}, row {}) is {}: each part's lse must be finite or -inf",
                i / rows,
                i % rows,
                lse_parts[i]
            ),
        ));
    }
    let what = || format!("the merged rows [{rows}, {dv}]");
    let mut out = RefOutputs {
        o: crate::alloc::zeroed(rows * dv, what)?,
        lse: crate::alloc::filled(rows, f64::NEG_INFINITY, what)?,
        e: crate::alloc::zeroed(if e_parts.is_some() { rows } else { 0 }, what)?,
    };
    for r in 0..rows {
        let lse_c = |c: usize| lse_parts[c * rows + r];
        let m = (0..splits).map(lse_c).fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue; // no part saw a key: o = 0, lse = −∞, e = 0
        }
        let lse = m + (0..splits).map(|c| (lse_c(c) - m).exp()).sum::<f64>().ln();
        out.lse[r] = lse;
        for c in (0..splits).filter(|&c| lse_c(c) != f64::NEG_INFINITY) {
            let w = (lse_c(c) - lse).exp();
            let src = &o_parts[(c * rows + r) * dv..][..dv];
            out.o[r * dv..][..dv]
                .iter_mut()
                .zip(src)
                .for_each(|(a, &x)| *a += w * x);
            if let Some(e) = e_parts {
                out.e[r] += w * e[c * rows + r];
            }
        }
    }
    Ok(out)
}

/// Merges `parts` into `out`, enqueued on `stream`. Everything is checked before anything is
/// written: S ≥ 1, no zero size, the parts' lengths, devices, o's shape and strides, lse and e
/// lengths, an e output only with e parts, and no output overlapping a part or another output.
pub fn merge_into<T: Element>(
    parts: &MergeParts<'_, T>,
    out: AttentionOutputs<'_, T>,
    stream: Stream,
) -> Result<()> {
    let [b, hq, lq, dv] = parts.shape;
    if parts.splits == 0 {
        return Err(Error::invalid("splits", "must be >= 1"));
    }
    if parts.shape.contains(&0) {
        return Err(Error::invalid(
            "shape",
            format!("{:?} has a zero dimension", parts.shape),
        ));
    }
    let rows = product("shape", &[b, hq, lq])?;
    let s = parts.splits;
    let dev: &Device = parts.o.device();
    check_len(
        "o parts",
        parts.o.len(),
        product("o parts", &[s, rows, dv])?,
    )?;
    check_len(
        "lse parts",
        parts.lse.len(),
        product("lse parts", &[s, rows])?,
    )?;
    same_device("lse parts", parts.lse.device(), dev)?;
    if let Some(e) = &parts.e {
        same_device("e parts", e.device(), dev)?;
        check_len("e parts", e.len(), product("e parts", &[s, rows])?)?;
    }
    if out.o.shape != parts.shape {
        return Err(Error::invalid(
            "o",
            format!("shape {:?}, expected {:?}", out.o.shape, parts.shape),
        ));
    }
    same_device("o", out.o.data.device(), dev)?;
    check_tensor("o", out.o.shape, out.o.strides, out.o.data.len())?;
    for (name, v) in [("lse", &out.lse), ("e", &out.e)] {
        if let Some(v) = v {
            same_device(name, v.device(), dev)?;
            check_len(name, v.len(), rows)?;
        }
    }
    if out.e.is_some() && parts.e.is_none() {
        return Err(Error::invalid(
            "e",
            "an e output needs e parts (MergeParts::e)",
        ));
    }
    let el = std::mem::size_of::<T>();
    let mut ins = vec![
        ("o parts", parts.o.addr(), parts.o.len().saturating_mul(el)),
        (
            "lse parts",
            parts.lse.addr(),
            parts.lse.len().saturating_mul(4),
        ),
    ];
    if let Some(e) = &parts.e {
        ins.push(("e parts", e.addr(), e.len().saturating_mul(4)));
    }
    let mut outs = vec![(
        "o",
        out.o.data.addr,
        extent(out.o.shape, out.o.strides).saturating_mul(el),
    )];
    for (name, v) in [("lse", &out.lse), ("e", &out.e)] {
        if let Some(v) = v {
            outs.push((name, v.addr, v.len().saturating_mul(4)));
        }
    }
    check_no_overlap(&ins, &outs)?;

    if !dev.is_gpu() {
        return merge_host(parts, out, rows);
    }
    #[cfg(fep_gpu)]
    {
        super::gpu_merge::launch::<T>(
            dev,
            &super::gpu_merge::MergeArgs {
                o_parts: parts.o.addr(),
                lse_parts: parts.lse.addr(),
                e_parts: parts.e.as_ref().map_or(0, |v| v.addr()),
                o: out.o.data.addr,
                o_stride: out.o.strides,
                lse: out.lse.as_ref().map_or(0, |v| v.addr),
                e: out.e.as_ref().map_or(0, |v| v.addr),
                shape: parts.shape,
                splits: s,
            },
            stream,
        )
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device in a build without GPU backends")
    }
}

/// The CPU device: the f64 reference, written to the (strided) outputs.
fn merge_host<T: Element>(
    parts: &MergeParts<'_, T>,
    mut out: AttentionOutputs<'_, T>,
    rows: usize,
) -> Result<()> {
    let [_, hq, lq, dv] = parts.shape;
    let o: Vec<f64> = parts.o.host_slice().iter().map(|x| x.to_f64()).collect();
    let lse: Vec<f64> = parts.lse.host_slice().iter().map(|&x| x as f64).collect();
    let e: Option<Vec<f64>> = parts
        .e
        .as_ref()
        .map(|e| e.host_slice().iter().map(|&x| x as f64).collect());
    let r = merge_reference(parts.splits, rows, dv, &o, &lse, e.as_deref())?;
    let Tensor4Mut { data, strides, .. } = &mut out.o;
    let [sb, sh, sl] = *strides;
    let dst = data.host_slice_mut();
    for row in 0..rows {
        let (b, h, i) = (row / (hq * lq), row / lq % hq, row % lq);
        dst[b * sb + h * sh + i * sl..][..dv]
            .iter_mut()
            .zip(&r.o[row * dv..][..dv])
            .for_each(|(a, &x)| *a = T::from_f64(x));
    }
    if let Some(l) = out.lse.as_mut() {
        l.host_slice_mut()
            .iter_mut()
            .zip(&r.lse)
            .for_each(|(a, &x)| *a = x as f32);
    }
    if let Some(e) = out.e.as_mut() {
        e.host_slice_mut()
            .iter_mut()
            .zip(&r.e)
            .for_each(|(a, &x)| *a = x as f32);
    }
    Ok(())
}

/// Merges `parts` on the device's default stream into new buffers: o in BHLD, lse, and e (empty
/// when the parts carry no e).
///
/// The parts are row-major `[S, B, Hq, Lq, Dv]` (o, in the input dtype) and `[S, B, Hq, Lq]`
/// (lse and e, f32), as [`MergeParts`]; the module docs of [`crate::attention`] give the maths.
///
/// ```
/// use fep_kernels::{Device, attention::{self, AttentionSpec, MergeParts, Precisions, Score, Tensor4}};
/// let dev = Device::cpu();
/// // One head, two queries, six keys of dimension 4 (BHLD), Dv = 4.
/// let (lq, lk, d) = (2, 6, 4);
/// let q: Vec<f32> = (0..lq * d).map(|i| (i as f32 * 0.37).sin()).collect();
/// let k: Vec<f32> = (0..lk * d).map(|i| (i as f32 * 0.91).cos()).collect();
/// let v: Vec<f32> = (0..lk * d).map(|i| (i as f32 * 0.53).sin()).collect();
/// let spec = AttentionSpec::new(Score::Gaussian);
/// let run = |k: &[f32], v: &[f32]| {
///     let n = k.len() / d;
///     let (qb, kb, vb) = (dev.upload(&q)?, dev.upload(k)?, dev.upload(v)?);
///     attention::forward(
///         &spec,
///         &Tensor4::bhld(qb.view(), [1, 1, lq, d]),
///         &Tensor4::bhld(kb.view(), [1, 1, n, d]),
///         &Tensor4::bhld(vb.view(), [1, 1, n, d]),
///         &Precisions::default(),
///         None,
///     )
/// };
/// let whole = run(&k, &v)?;
/// // The keys in two chunks (0..4 and 4..6), each attended separately, then merged.
/// let (a, b) = (run(&k[..4 * d], &v[..4 * d])?, run(&k[4 * d..], &v[4 * d..])?);
/// let cat = |x: Vec<f32>, y: Vec<f32>| [x, y].concat();
/// let o = dev.upload(&cat(a.o.to_vec()?, b.o.to_vec()?))?;
/// let lse = dev.upload(&cat(a.lse.to_vec()?, b.lse.to_vec()?))?;
/// let e = dev.upload(&cat(a.e.to_vec()?, b.e.to_vec()?))?;
/// let parts = MergeParts { o: o.view(), lse: lse.view(), e: Some(e.view()), splits: 2, shape: [1, 1, lq, d] };
/// let merged = attention::merge(&parts)?;
/// for (x, y) in merged.o.to_vec()?.iter().zip(whole.o.to_vec()?) {
///     assert!((x - y).abs() < 1e-6);
/// }
/// for (x, y) in merged.lse.to_vec()?.iter().zip(whole.lse.to_vec()?) {
///     assert!((x - y).abs() < 1e-5);
/// }
/// # Ok::<(), fep_kernels::Error>(())
/// ```
pub fn merge<T: Element>(parts: &MergeParts<'_, T>) -> Result<AttentionResult<T>> {
    let [b, hq, lq, dv] = parts.shape;
    let dev = parts.o.device();
    let rows = product("shape", &[b, hq, lq])?;
    let mut r = AttentionResult {
        o: dev.alloc(product("shape", &[rows, dv])?)?,
        lse: dev.alloc(rows)?,
        e: dev.alloc(if parts.e.is_some() { rows } else { 0 })?,
    };
    let out = AttentionOutputs {
        o: Tensor4Mut::bhld(r.o.view_mut(), parts.shape),
        lse: Some(r.lse.view_mut()),
        e: parts.e.as_ref().map(|_| r.e.view_mut()),
    };
    merge_into(parts, out, dev.default_stream())?;
    Ok(r)
}
