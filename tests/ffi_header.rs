//! include/fep_kernels.h and src/ffi.rs describe the same C ABI (DESIGN.md §1): every
//! `#define FEP_*` constant is a `pub const FEP_*: i32` of the same value, every function of the
//! header is a `#[no_mangle] pub (unsafe) extern "C" fn` with the same parameters (count, names
//! and types) and return type, and `FepLcaParams` has the same fields in the same order with the
//! same types and layout; all both ways round. The header also compiles as C and as C++.
//!
//! Both files are embedded at compile time, so the test binary checks them on a machine without
//! the source tree (the GPU suite's), and the header is compiled from a temporary copy.

use std::collections::BTreeMap;
use std::process::Command;

const HEADER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/include/fep_kernels.h"
));
const FFI_RS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi.rs"));

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A function signature in Rust spelling: (parameter name, type) pairs and the return type
/// (`()` for none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sig {
    params: Vec<(String, String)>,
    ret: String,
}

/// Removes `/* */` and `//` comments, keeping line breaks.
fn strip_c_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.is_none_or(|l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..]
                    .find("*/")
                    .expect("unterminated /* comment in the header");
                out.extend(rest[b..b + 2 + end + 2].chars().filter(|&c| c == '\n'));
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            _ => unreachable!(),
        }
    }
}

/// Splits at top-level commas (outside (), <>, []).
fn split_top(s: &str) -> Vec<String> {
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
    for c in s.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The text between the parenthesis at `open` and its match, and the index after the match.
fn parens(s: &str, open: usize) -> (&str, usize) {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (&s[open + 1..open + i], open + i + 1);
                }
            }
            _ => {}
        }
    }
    panic!(
        "unbalanced parentheses after {:?}",
        &s[open..(open + 40).min(s.len())]
    );
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A C type (`const float *`, `FepLcaDict **`, `int32_t`) in Rust spelling (`*const f32`,
/// `*mut *mut FepLcaDict`, `i32`).
fn c_type_to_rust(ty: &str) -> Result<String, String> {
    let ty = ty.replace('*', " * ");
    let tokens: Vec<&str> = ty.split_whitespace().collect();
    let stars = tokens.iter().filter(|&&t| t == "*").count();
    let first_star = tokens
        .iter()
        .position(|&t| t == "*")
        .unwrap_or(tokens.len());
    if tokens[first_star..].iter().any(|&t| t != "*") {
        return Err(format!("unsupported qualifier after `*` in `{ty}`"));
    }
    let base: Vec<&str> = tokens[..first_star]
        .iter()
        .copied()
        .filter(|&t| t != "const")
        .collect();
    let pointee_const = tokens[..first_star].contains(&"const");
    let base = match base.as_slice() {
        ["void"] if stars == 0 => "()",
        ["void"] => "c_void",
        ["char"] => "c_char",
        ["int8_t"] => "i8",
        ["uint8_t"] => "u8",
        ["int32_t"] => "i32",
        ["uint32_t"] => "u32",
        ["int64_t"] => "i64",
        ["uint64_t"] => "u64",
        ["float"] => "f32",
        ["double"] => "f64",
        [name] if name.starts_with("Fep") => name,
        _ => {
            return Err(format!(
                "no Rust equivalent known for the C type `{}`",
                base.join(" ")
            ));
        }
    };
    let mut out = base.to_string();
    for level in 0..stars {
        let qual = if level == 0 && pointee_const {
            "*const "
        } else {
            "*mut "
        };
        out = format!("{qual}{out}");
    }
    Ok(out)
}

/// Rust type text in one canonical spelling: single spaces, no paths (`std::ffi::c_void` →
/// `c_void`), `*mut *mut T`.
fn rust_type(ty: &str) -> String {
    let spaced = ty.replace('*', " * ");
    let toks: Vec<&str> = spaced
        .split_whitespace()
        .map(|w| w.rsplit("::").next().unwrap())
        .collect();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < toks.len() {
        if toks[i] == "*" && i + 1 < toks.len() {
            out.push(format!("*{}", toks[i + 1]));
            i += 2;
        } else {
            out.push(toks[i].to_string());
            i += 1;
        }
    }
    out.join(" ")
}

#[derive(Debug, Default)]
struct Header {
    defines: BTreeMap<String, i64>,
    functions: BTreeMap<String, Sig>,
    params_fields: Vec<(String, String)>,
    problems: Vec<String>,
}

fn parse_int(v: &str) -> Option<i64> {
    let v = v
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    let v = v.trim_end_matches(['u', 'U', 'l', 'L']);
    let (neg, v) = v.strip_prefix('-').map_or((false, v), |r| (true, r));
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => v.parse::<i64>().ok()?,
    };
    Some(if neg { -n } else { n })
}

fn parse_header(src: &str) -> Header {
    let mut h = Header::default();
    let code = strip_c_comments(src);
    // Preprocessor lines: the FEP_* integer constants (the include guard has no value).
    for line in code.lines().map(str::trim).filter(|l| l.starts_with('#')) {
        let words: Vec<&str> = line.trim_start_matches('#').split_whitespace().collect();
        if let ["define", name, value @ ..] = words.as_slice()
            && name.starts_with("FEP_")
        {
            if value.is_empty() {
                continue; // FEP_KERNELS_H
            }
            match parse_int(&value.join(" ")) {
                Some(v) => {
                    if h.defines.insert(name.to_string(), v).is_some() {
                        h.problems.push(format!("header: {name} defined twice"));
                    }
                }
                None => h.problems.push(format!(
                    "header: {name} is not an integer constant: {value:?}"
                )),
            }
        }
    }
    let body: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");

    // typedef struct FepLcaParams { <type> <name>; ... } FepLcaParams;
    match body.find("typedef struct FepLcaParams") {
        None => h
            .problems
            .push("header: no `typedef struct FepLcaParams`".into()),
        Some(at) => {
            let open = at + body[at..].find('{').unwrap();
            let close = open + body[open..].find('}').unwrap();
            for decl in body[open + 1..close]
                .split(';')
                .map(str::trim)
                .filter(|d| !d.is_empty())
            {
                let name_at = decl.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
                let (ty, name) = (&decl[..name_at], &decl[name_at..]);
                match c_type_to_rust(ty) {
                    Ok(t) => h.params_fields.push((name.to_string(), t)),
                    Err(e) => h.problems.push(format!("header: FepLcaParams.{name}: {e}")),
                }
            }
        }
    }

    // Function declarations: an identifier fep_* followed by `(`, its return type being the
    // text back to the previous `;`, `{` or `}`.
    let bytes = body.as_bytes();
    let mut i = 0;
    while let Some(off) = body[i..].find("fep_") {
        let start = i + off;
        i = start + 4;
        if start > 0 && is_ident(bytes[start - 1] as char) {
            continue;
        }
        let end = start
            + body[start..]
                .find(|c: char| !is_ident(c))
                .unwrap_or(body.len() - start);
        let name = &body[start..end];
        let after = body[end..].trim_start();
        if !after.starts_with('(') {
            continue;
        }
        let open = body.len() - after.len();
        let (params, next) = parens(&body, open);
        i = next;
        let ret_from = body[..start].rfind([';', '{', '}']).map_or(0, |p| p + 1);
        let ret = body[ret_from..start].trim();
        let mut sig = Sig {
            params: Vec::new(),
            ret: String::new(),
        };
        match c_type_to_rust(ret) {
            Ok(r) => sig.ret = r,
            Err(e) => h
                .problems
                .push(format!("header: {name} returns {ret:?}: {e}")),
        }
        let list = split_top(params);
        if list != ["void"] {
            for p in list {
                let name_at = p.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
                let (ty, pname) = (&p[..name_at], &p[name_at..]);
                if pname.is_empty() || ty.trim().is_empty() {
                    h.problems.push(format!(
                        "header: {name}: parameter `{p}` has no name or no type"
                    ));
                    continue;
                }
                match c_type_to_rust(ty) {
                    Ok(t) => sig.params.push((pname.to_string(), t)),
                    Err(e) => h.problems.push(format!("header: {name}({p}): {e}")),
                }
            }
        }
        if h.functions.insert(name.to_string(), sig).is_some() {
            h.problems.push(format!("header: {name} declared twice"));
        }
    }
    h
}

#[derive(Debug, Default)]
struct RustFfi {
    consts: BTreeMap<String, i64>,
    functions: BTreeMap<String, Sig>,
    params_fields: Vec<(String, String)>,
    params_repr_c: bool,
    problems: Vec<String>,
}

fn parse_ffi_rs(src: &str) -> RustFfi {
    let mut r = RustFfi::default();
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    for line in code.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub const FEP_") {
            let parsed = rest.split_once(':').and_then(|(name, rest)| {
                let (ty, value) = rest.split_once('=')?;
                Some((
                    format!("FEP_{}", name.trim()),
                    ty.trim().to_string(),
                    value.trim().trim_end_matches(';').to_string(),
                ))
            });
            match parsed {
                Some((name, ty, value)) if ty == "i32" => match parse_int(&value) {
                    Some(v) => {
                        r.consts.insert(name, v);
                    }
                    None => r.problems.push(format!(
                        "ffi.rs: {name} = {value} is not an integer literal"
                    )),
                },
                Some((name, ty, _)) => r
                    .problems
                    .push(format!("ffi.rs: {name} has type {ty}, not i32")),
                None => r.problems.push(format!("ffi.rs: cannot parse `{line}`")),
            }
        }
    }
    // pub [unsafe] extern "C" fn fep_*(...) [-> T] {
    let mut i = 0;
    while let Some(off) = code[i..].find("extern \"C\" fn ") {
        let at = i + off;
        let name_from = at + "extern \"C\" fn ".len();
        let open = name_from + code[name_from..].find('(').unwrap();
        let name = code[name_from..open].trim().to_string();
        let (params, next) = parens(&code, open);
        i = next;
        let item_from = code[..at].rfind(['}', ';']).map_or(0, |p| p + 1);
        let prefix = &code[item_from..at];
        let visibility = prefix
            .split_whitespace()
            .filter(|w| !w.starts_with("#["))
            .collect::<Vec<_>>();
        if !name.starts_with("fep_") {
            continue;
        }
        if !matches!(visibility.last().copied(), Some("pub") | Some("unsafe"))
            || !visibility.contains(&"pub")
        {
            r.problems.push(format!("ffi.rs: {name} is not `pub`"));
        }
        if !prefix.contains("no_mangle") {
            r.problems.push(format!(
                "ffi.rs: {name} has no #[no_mangle] (its symbol would be mangled)"
            ));
        }
        let tail = code[next..].trim_start();
        let ret = match tail.strip_prefix("->") {
            Some(t) => rust_type(t[..t.find(['{', ';']).unwrap()].trim()),
            None => "()".to_string(),
        };
        let mut sig = Sig {
            params: Vec::new(),
            ret,
        };
        for p in split_top(params) {
            match p.split_once(':') {
                Some((pname, ty)) => sig.params.push((
                    pname.trim().trim_start_matches("mut ").to_string(),
                    rust_type(ty),
                )),
                None => r
                    .problems
                    .push(format!("ffi.rs: {name}: cannot parse parameter `{p}`")),
            }
        }
        if r.functions.insert(name.clone(), sig).is_some() {
            r.problems.push(format!("ffi.rs: {name} defined twice"));
        }
    }
    // #[repr(C)] ... pub struct FepLcaParams { pub name: type, ... }
    match code.find("pub struct FepLcaParams") {
        None => r
            .problems
            .push("ffi.rs: no `pub struct FepLcaParams`".into()),
        Some(at) => {
            let item_from = code[..at].rfind(['}', ';']).map_or(0, |p| p + 1);
            r.params_repr_c = code[item_from..at].contains("#[repr(C)]");
            let open = at + code[at..].find('{').unwrap();
            let close = open + code[open..].find('}').unwrap();
            for f in split_top(&code[open + 1..close]) {
                match f.trim_start_matches("pub ").split_once(':') {
                    Some((name, ty)) => r
                        .params_fields
                        .push((name.trim().to_string(), rust_type(ty))),
                    None => r.problems.push(format!("ffi.rs: FepLcaParams field `{f}`")),
                }
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

fn compare(h: &Header, r: &RustFfi) -> Vec<String> {
    let mut errs: Vec<String> = h.problems.iter().chain(&r.problems).cloned().collect();
    for (name, v) in &h.defines {
        match r.consts.get(name) {
            Some(rv) if rv == v => {}
            Some(rv) => errs.push(format!("{name}: header {v}, ffi.rs {rv}")),
            None => errs.push(format!(
                "{name} = {v} is in the header but not a `pub const {name}: i32` in ffi.rs"
            )),
        }
    }
    for name in r.consts.keys().filter(|n| !h.defines.contains_key(*n)) {
        errs.push(format!(
            "{name} is in ffi.rs but not #defined in the header"
        ));
    }
    for (name, hs) in &h.functions {
        let Some(rs) = r.functions.get(name) else {
            errs.push(format!(
                "{name} is declared in the header but not a pub extern \"C\" fn in ffi.rs"
            ));
            continue;
        };
        if hs.params.len() != rs.params.len() {
            errs.push(format!(
                "{name}: {} parameters in the header, {} in ffi.rs",
                hs.params.len(),
                rs.params.len()
            ));
        }
        for (k, (hp, rp)) in hs.params.iter().zip(&rs.params).enumerate() {
            if hp.1 != rp.1 {
                errs.push(format!(
                    "{name} parameter {k} (`{}`): header type {} , ffi.rs type {}",
                    hp.0, hp.1, rp.1
                ));
            }
            if hp.0 != rp.0 {
                errs.push(format!(
                    "{name} parameter {k}: named `{}` in the header, `{}` in ffi.rs (swapped?)",
                    hp.0, rp.0
                ));
            }
        }
        if hs.ret != rs.ret {
            errs.push(format!(
                "{name} returns {} in the header, {} in ffi.rs",
                hs.ret, rs.ret
            ));
        }
    }
    for name in r.functions.keys().filter(|n| !h.functions.contains_key(*n)) {
        errs.push(format!(
            "{name} is exported by ffi.rs but not declared in the header"
        ));
    }
    if h.params_fields != r.params_fields {
        errs.push(format!(
            "FepLcaParams fields differ:\n  header  {:?}\n  ffi.rs  {:?}",
            h.params_fields, r.params_fields
        ));
    }
    if !r.params_repr_c {
        errs.push("ffi.rs: FepLcaParams is not #[repr(C)]".into());
    }
    errs
}

#[test]
fn header_and_ffi_rs_declare_the_same_abi() {
    let h = parse_header(HEADER);
    let r = parse_ffi_rs(FFI_RS);
    println!(
        "header: {} constants, {} functions, FepLcaParams {:?}",
        h.defines.len(),
        h.functions.len(),
        h.params_fields
    );
    for (name, sig) in &h.functions {
        println!(
            "  {} {name}({})",
            sig.ret,
            sig.params
                .iter()
                .map(|(n, t)| format!("{n}: {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Guards against a parser that finds nothing and so passes.
    assert!(
        h.defines.len() >= 10 && h.defines.contains_key("FEP_OK"),
        "too few #defines parsed: {:?}",
        h.defines
    );
    assert!(
        h.functions.len() >= 10 && h.functions.contains_key("fep_lca_solve"),
        "too few functions parsed: {:?}",
        h.functions.keys()
    );
    assert!(!h.params_fields.is_empty());
    let errs = compare(&h, &r);
    assert!(
        errs.is_empty(),
        "include/fep_kernels.h and src/ffi.rs disagree:\n{}",
        errs.join("\n")
    );
}

/// The constants' values as compiled, not only as written.
#[test]
fn constants_match_the_compiled_values() {
    use fep_kernels::ffi::*;
    let h = parse_header(HEADER);
    let compiled = [
        ("FEP_ABI_VERSION", FEP_ABI_VERSION),
        ("FEP_OK", FEP_OK),
        ("FEP_ERR_INVALID_ARGUMENT", FEP_ERR_INVALID_ARGUMENT),
        ("FEP_ERR_NO_DEVICE", FEP_ERR_NO_DEVICE),
        ("FEP_ERR_DRIVER", FEP_ERR_DRIVER),
        ("FEP_ERR_OUT_OF_MEMORY", FEP_ERR_OUT_OF_MEMORY),
        ("FEP_ERR_UNSUPPORTED", FEP_ERR_UNSUPPORTED),
        ("FEP_ERR_INTERNAL", FEP_ERR_INTERNAL),
        ("FEP_DEVICE_CPU", FEP_DEVICE_CPU),
        ("FEP_DEVICE_CUDA", FEP_DEVICE_CUDA),
        ("FEP_DEVICE_HIP", FEP_DEVICE_HIP),
        ("FEP_DTYPE_F32", FEP_DTYPE_F32),
        ("FEP_DTYPE_F16", FEP_DTYPE_F16),
        ("FEP_DTYPE_BF16", FEP_DTYPE_BF16),
        ("FEP_LCA_SOFT", FEP_LCA_SOFT),
        ("FEP_LCA_SOFT_NONNEG", FEP_LCA_SOFT_NONNEG),
        ("FEP_LCA_HARD", FEP_LCA_HARD),
        ("FEP_LCA_HARD_NONNEG", FEP_LCA_HARD_NONNEG),
    ];
    for (name, v) in compiled {
        assert_eq!(h.defines.get(name), Some(&(v as i64)), "{name}");
    }
    assert_eq!(fep_abi_version(), FEP_ABI_VERSION);
    // The codes the Rust types report are the header's.
    use fep_kernels::lca::Threshold;
    for t in Threshold::ALL {
        let name = match t {
            Threshold::Soft => "FEP_LCA_SOFT",
            Threshold::SoftNonNeg => "FEP_LCA_SOFT_NONNEG",
            Threshold::Hard => "FEP_LCA_HARD",
            Threshold::HardNonNeg => "FEP_LCA_HARD_NONNEG",
        };
        assert_eq!(Some(&(t as i64)), h.defines.get(name), "{t:?}");
    }
    for (d, name) in [
        (fep_kernels::DType::F32, "FEP_DTYPE_F32"),
        (fep_kernels::DType::F16, "FEP_DTYPE_F16"),
        (fep_kernels::DType::BF16, "FEP_DTYPE_BF16"),
    ] {
        assert_eq!(Some(&(d.code() as i64)), h.defines.get(name), "{d:?}");
    }
}

/// The parser on a small header and Rust file, including what it must reject.
#[test]
fn parser_self_check() {
    let header = "/* c */ #define FEP_A 3\n#define FEP_B (-0x10)\n// x\n\
                  typedef struct FepLcaParams { int32_t a; float b; } FepLcaParams;\n\
                  const char *fep_f(void);\nvoid fep_g(const FepLcaDict *d, void *s,\n  uint64_t **n);";
    let h = parse_header(header);
    assert!(h.problems.is_empty(), "{:?}", h.problems);
    assert_eq!(h.defines["FEP_B"], -16);
    assert_eq!(
        h.functions["fep_f"],
        Sig {
            params: vec![],
            ret: "*const c_char".into()
        }
    );
    assert_eq!(
        h.functions["fep_g"].params,
        [
            ("d".to_string(), "*const FepLcaDict".to_string()),
            ("s".into(), "*mut c_void".into()),
            ("n".into(), "*mut *mut u64".into())
        ]
    );
    assert_eq!(h.functions["fep_g"].ret, "()");
    let rust = "pub const FEP_A: i32 = 3;\npub const FEP_B: i32 = -16;\n#[repr(C)]\npub struct FepLcaParams {\n    pub a: i32,\n    pub b: f32,\n}\n\
                #[unsafe(no_mangle)]\npub extern \"C\" fn fep_f() -> *const c_char { x }\n\
                #[unsafe(no_mangle)]\npub unsafe extern \"C\" fn fep_g(\n    d: *const FepLcaDict,\n    s: *mut std::ffi::c_void,\n    n: *mut *mut u64,\n) {\n}\n";
    let r = parse_ffi_rs(rust);
    assert!(compare(&h, &r).is_empty(), "{:?}", compare(&h, &r));
    // Swapped names, a changed value, a missing no_mangle, a missing function: all caught.
    let bad = rust
        .replace("d: *const", "dd: *const")
        .replace("= -16", "= 16")
        .replacen("#[unsafe(no_mangle)]\npub extern", "pub extern", 1);
    let errs = compare(&h, &parse_ffi_rs(&bad));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let errs = compare(
        &parse_header(&header.replace("const char *fep_f(void);", "")),
        &r,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(c_type_to_rust("float * const").is_err());
}

// ---------------------------------------------------------------------------------------------
// The header compiles, and its struct layout is Rust's
// ---------------------------------------------------------------------------------------------

/// Size and alignment of the Rust spelling of a C field type.
fn size_align(ty: &str) -> (usize, usize) {
    match ty {
        "i8" | "u8" => (1, 1),
        "i32" | "u32" | "f32" => (4, 4),
        "i64" | "u64" | "f64" => (8, 8),
        t if t.starts_with('*') => (size_of::<usize>(), align_of::<usize>()),
        t => panic!("no layout known for {t}"),
    }
}

#[test]
fn header_compiles_as_c_and_cxx_with_rust_layout() {
    let dir = std::env::temp_dir().join(format!("fep-ffi-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = dir.join("fep_kernels.h");
    std::fs::write(&header, HEADER).unwrap();

    // The repr(C) offsets of FepLcaParams from its Rust field types, checked against Rust's own
    // size, then asserted in C and C++ against the header's struct.
    let fields = parse_ffi_rs(FFI_RS).params_fields;
    let (mut offset, mut align) = (0usize, 1usize);
    let mut asserts = String::new();
    for (name, ty) in &fields {
        let (s, a) = size_align(ty);
        offset = offset.next_multiple_of(a);
        asserts += &format!(
            "STATIC_ASSERT(offsetof(FepLcaParams, {name}) == {offset}, \"offset of {name}\");\n"
        );
        offset += s;
        align = align.max(a);
    }
    let size = offset.next_multiple_of(align);
    assert_eq!(
        size,
        size_of::<fep_kernels::ffi::FepLcaParams>(),
        "layout computed from the fields"
    );
    asserts +=
        &format!("STATIC_ASSERT(sizeof(FepLcaParams) == {size}, \"size of FepLcaParams\");\n");
    let unit = format!(
        "#include \"fep_kernels.h\"\n#include <stddef.h>\n#ifdef __cplusplus\n#define STATIC_ASSERT static_assert\n\
         #else\n#define STATIC_ASSERT _Static_assert\n#endif\n{asserts}\
         int fep_header_check(const FepLcaParams *p) {{ return (int)p->steps + FEP_OK; }}\n"
    );
    let unit_path = dir.join("check.c");
    std::fs::write(&unit_path, unit).unwrap();

    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let runs: [(&str, Vec<&str>, &std::path::Path); 4] = [
        ("C, header alone", vec!["-x", "c", "-std=c99"], &header),
        (
            "C++, header alone",
            vec!["-x", "c++", "-std=c++11"],
            &header,
        ),
        ("C, layout", vec!["-x", "c", "-std=c11"], &unit_path),
        ("C++, layout", vec!["-x", "c++", "-std=c++11"], &unit_path),
    ];
    for (what, lang, file) in runs {
        let mut cmd = Command::new(&cc);
        cmd.arg("-fsyntax-only")
            .args(&lang)
            .args(["-Wall", "-Wextra", "-Wpedantic", "-Werror"])
            .arg("-I")
            .arg(&dir)
            .arg(file);
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let msg = format!(
                    "SKIPPED header_compiles_as_c_and_cxx_with_rust_layout: no C compiler `{cc}` ({e})"
                );
                println!("{msg}");
                eprintln!("{msg}");
                return;
            }
            Err(e) => panic!("running {cc}: {e}"),
        };
        assert!(
            out.status.success(),
            "{what}: {cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{what}: {cc} -fsyntax-only {} ok", lang.join(" "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
