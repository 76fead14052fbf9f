//! fep_attention_merge on the CPU: fuzzed dtype, splits, shapes, strides and pointers.
#![no_main]

use arbitrary::Arbitrary;
use fep_kernels_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    dtype: DType,
    splits: Dim,
    shape: AttnShape,
    o: Tensor,
    o_parts: Ptr,
    lse_parts: Ptr,
    e_parts: Ptr,
    lse: Ptr,
    e: Ptr,
    values: Values,
}

fuzz_target!(|input: Input| {
    let s = input.shape.get();
    let ty = input.dtype.ty();
    let splits = input.splits.get(3);
    let mut c = Call::new("fep_attention_merge", input.values);
    let mut o = AttnArg::new(
        &mut c,
        "o",
        &input.o,
        [s.b, s.hq, s.lq, s.dv],
        ty,
        Role::Out,
        SENTINEL,
    );
    // Every length follows from splits and o's shape, as the C ABI documents.
    let [b, h, l, dv] = o.shape();
    let rows = elems(&[b, h, l]);
    let part_rows = elems(&[splits, b, h, l]);
    let o_parts = c.buf(
        "o_parts",
        ty,
        Role::In,
        elems(&[splits, b, h, l, dv]),
        input.o_parts,
        Fill::Range(-1.0, 1.0),
    );
    let lse_parts = c.buf(
        "lse_parts",
        Ty::F32,
        Role::In,
        part_rows,
        input.lse_parts,
        Fill::Range(-3.0, 3.0),
    );
    let e_parts = c.buf(
        "e_parts",
        Ty::F32,
        Role::In,
        part_rows,
        input.e_parts,
        Fill::Range(0.0, 2.0),
    );
    let lse = c.buf("lse", Ty::F32, Role::Out, rows, input.lse, SENTINEL);
    let e = c.buf("e", Ty::F32, Role::Out, rows, input.e, SENTINEL);
    c.work(elems(&[splits, b, h, l, dv.max(1)]));
    if !c.alloc() {
        return;
    }
    o.bind(&c);
    let (kind, ordinal) = input.device.get();
    c.note(format!(
        "kind {kind}, ordinal {ordinal}, dtype {}, splits {splits}",
        input.dtype.code()
    ));
    c.note(format!(
        "o: {:?}{}",
        o.desc,
        if o.null {
            " (the description is NULL)"
        } else {
            ""
        }
    ));
    c.ready();
    let status = unsafe {
        ffi::fep_attention_merge(
            kind,
            ordinal,
            std::ptr::null_mut(),
            input.dtype.code(),
            splits,
            c.ptr(o_parts),
            c.ptr(lse_parts),
            c.ptr(e_parts),
            o.as_ptr(),
            c.ptr(lse),
            c.ptr(e),
        )
    };
    c.check(status);
});
