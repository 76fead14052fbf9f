//! include/fep_kernels.h and src/ffi/*.rs describe the same C ABI (DESIGN.md §1): every
//! `#define FEP_*` constant is a `pub const FEP_*: i32` of the same value, every function of the
//! header is a `#[no_mangle] pub (unsafe) extern "C" fn` with the same parameters (count, names
//! and types) and return type, and every struct (`FepLcaParams`, `FepSettleNet`, the `FepVmp*`
//! descriptions and parameters) has the same fields in the same order with the same types and
//! layout; all both ways round. The header also compiles as C and as C++.
//!
//! Both files are embedded at compile time, so the test binary checks them on a machine without
//! the source tree (the GPU suite's), and the header is compiled from a temporary copy.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const HEADER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/include/fep_kernels.h"
));
/// The files of src/ffi/ (file name, text); every `.rs` file there must be listed (checked by
/// `ffi_rs_lists_every_file_of_src_ffi` where the source tree is at hand).
const FFI_FILES: &[(&str, &str)] = &[
    (
        "mod.rs",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi/mod.rs")),
    ),
    (
        "lca.rs",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi/lca.rs")),
    ),
    (
        "settle.rs",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi/settle.rs")),
    ),
    (
        "vmp.rs",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi/vmp.rs")),
    ),
    (
        "attention.rs",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi/attention.rs")),
    ),
];

/// The Rust side of the C ABI: the files of src/ffi/ one after the other.
fn ffi_rs() -> String {
    FFI_FILES
        .iter()
        .map(|(_, text)| *text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A new file under src/ffi/ that the list above missed would hide its functions from the
/// header check.
#[test]
fn ffi_rs_lists_every_file_of_src_ffi() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("{} is not here: nothing to compare", dir.display());
        return;
    };
    let on_disk: BTreeSet<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".rs"))
        .collect();
    let listed: BTreeSet<String> = FFI_FILES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, listed, "FFI_FILES against {}", dir.display());
}

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

/// A C type (`const float *`, `FepLcaDict **`, `float *const *`, `int32_t`) in Rust spelling
/// (`*const f32`, `*mut *mut FepLcaDict`, `*const *mut f32`, `i32`).
///
/// C qualifies each level separately: a `const` before the first `*` (`const float`, `float
/// const`) makes the base type const, and a `const` after a `*` makes that pointer itself const.
/// Rust spells the constness of the pointee instead, so each pointer becomes `*const` when what
/// it points to is const (the base for the innermost pointer, the pointer one level in for the
/// others): `float *const *p` is `*const *mut f32`, `const float *const *p` is
/// `*const *const f32`. A `const` on the outermost pointer (a const parameter or field,
/// `float *const p`) does not change the type and so is `*mut f32`.
fn c_type_to_rust(ty: &str) -> Result<String, String> {
    let spaced = ty.replace('*', " * ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let first_star = tokens
        .iter()
        .position(|&t| t == "*")
        .unwrap_or(tokens.len());
    let (base_tokens, declarator) = tokens.split_at(first_star);
    let base_const = base_tokens.contains(&"const");
    let base: Vec<&str> = base_tokens
        .iter()
        .copied()
        .filter(|&t| t != "const")
        .collect();
    // One entry per `*`, innermost first: whether that pointer itself is const.
    let mut levels: Vec<bool> = Vec::new();
    for &t in declarator {
        match (t, levels.last_mut()) {
            ("*", _) => levels.push(false),
            ("const", Some(c)) if !*c => *c = true,
            ("const", _) => return Err(format!("`const` twice on one pointer in `{}`", ty.trim())),
            (other, _) => {
                return Err(format!(
                    "unsupported qualifier `{other}` after `*` in `{}`",
                    ty.trim()
                ));
            }
        }
    }
    let base = match base.as_slice() {
        ["void"] if levels.is_empty() && !base_const => "()",
        ["void"] if !levels.is_empty() => "c_void",
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
                base_tokens.join(" ")
            ));
        }
    };
    let mut out = base.to_string();
    let mut pointee_const = base_const;
    for &self_const in &levels {
        let qual = if pointee_const { "*const" } else { "*mut" };
        out = format!("{qual} {out}");
        pointee_const = self_const;
    }
    // `pointee_const` now says whether the outermost pointer is itself const: no Rust spelling,
    // and no difference to the ABI.
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

/// (field name, type in Rust spelling), in declaration order.
type Fields = Vec<(String, String)>;

#[derive(Debug, Default)]
struct Header {
    defines: BTreeMap<String, i64>,
    functions: BTreeMap<String, Sig>,
    /// Every `typedef struct Fep… { … } Fep…;`: its fields.
    structs: BTreeMap<String, Fields>,
    /// Every `typedef struct Fep… Fep…;` (opaque handles).
    opaque: BTreeSet<String>,
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

/// The identifier at the start of `s` (after whitespace) and the rest after it.
fn leading_ident(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Every `typedef struct Tag { <type> <name>; … } Name;` and `typedef struct Tag Name;` of the
/// (comment- and preprocessor-free) header text.
fn parse_header_structs(body: &str, h: &mut Header) {
    let mut rest = body;
    while let Some(at) = rest.find("typedef struct") {
        rest = &rest[at + "typedef struct".len()..];
        let (tag, after) = leading_ident(rest);
        if tag.is_empty() {
            h.problems.push(
                "header: `typedef struct` without a tag (use `typedef struct FepX {…} FepX;`)"
                    .into(),
            );
            continue;
        }
        let after = after.trim_start();
        if let Some(inner) = after.strip_prefix('{') {
            let Some(close) = inner.find('}') else {
                h.problems
                    .push(format!("header: struct {tag}: no closing brace"));
                return;
            };
            let fields_text = &inner[..close];
            let (name, tail) = leading_ident(&inner[close + 1..]);
            rest = tail;
            if name != tag {
                h.problems.push(format!(
                    "header: `typedef struct {tag} {{…}} {name};`: the typedef name must be the tag"
                ));
            }
            if !tail.trim_start().starts_with(';') {
                h.problems.push(format!(
                    "header: struct {tag}: expected `;` after `}} {name}`"
                ));
            }
            if fields_text.contains('{') {
                h.problems.push(format!(
                    "header: struct {tag}: nested braces (nested struct/union) are not supported"
                ));
                continue;
            }
            let mut fields = Fields::new();
            for decl in fields_text
                .split(';')
                .map(str::trim)
                .filter(|d| !d.is_empty())
            {
                // One fixed-size array dimension, `T name[N]`, is `[T; N]` in Rust.
                let (decl, array) = match decl.split_once('[') {
                    Some((head, tail)) => match tail
                        .strip_suffix(']')
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .filter(|&n| n > 0)
                    {
                        Some(n) => (head.trim_end(), Some(n)),
                        None => {
                            h.problems.push(format!(
                                "header: {tag}: field `{decl}`: arrays need one constant size \
                                 `name[N]`, N >= 1"
                            ));
                            continue;
                        }
                    },
                    None => (decl, None),
                };
                if decl.contains([',', '[', ':', '(']) {
                    h.problems.push(format!(
                        "header: {tag}: field `{decl}`: one plain declarator per field only \
                         (no bit-fields, function pointers or `a, b` lists)"
                    ));
                    continue;
                }
                let name_at = decl.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
                let (ty, fname) = (&decl[..name_at], &decl[name_at..]);
                if fname.is_empty() || ty.trim().is_empty() {
                    h.problems.push(format!(
                        "header: {tag}: field `{decl}` has no name or no type"
                    ));
                    continue;
                }
                match c_type_to_rust(ty) {
                    Ok(t) => fields.push((
                        fname.to_string(),
                        match array {
                            Some(n) => format!("[{t}; {n}]"),
                            None => t,
                        },
                    )),
                    Err(e) => h.problems.push(format!("header: {tag}.{fname}: {e}")),
                }
            }
            if h.structs.insert(tag.to_string(), fields).is_some() {
                h.problems
                    .push(format!("header: struct {tag} defined twice"));
            }
        } else {
            let (name, tail) = leading_ident(after);
            rest = tail;
            if name != tag || !tail.trim_start().starts_with(';') {
                h.problems.push(format!(
                    "header: `typedef struct {tag} {name}…`: expected `typedef struct {tag} {tag};`"
                ));
                continue;
            }
            if !h.opaque.insert(tag.to_string()) {
                h.problems
                    .push(format!("header: opaque {tag} declared twice"));
            }
        }
    }
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

    parse_header_structs(&body, &mut h);

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

/// A `pub struct Fep…` of ffi.rs.
#[derive(Debug, Default, Clone, PartialEq)]
struct RustStruct {
    /// Its fields (none for a unit or tuple struct).
    fields: Fields,
    /// Whether it is `#[repr(C)]` (possibly with more hints, `#[repr(C, align(8))]`).
    repr_c: bool,
}

#[derive(Debug, Default)]
struct RustFfi {
    consts: BTreeMap<String, i64>,
    functions: BTreeMap<String, Sig>,
    structs: BTreeMap<String, RustStruct>,
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
    parse_rust_structs(&code, &mut r);
    r
}

/// Every `pub struct Fep…` of the (comment-free) Rust text: `#[repr(C)]` or not, and its fields.
fn parse_rust_structs(code: &str, r: &mut RustFfi) {
    let mut i = 0;
    while let Some(off) = code[i..].find("pub struct ") {
        let at = i + off;
        i = at + "pub struct ".len();
        let (name, after) = leading_ident(&code[i..]);
        if !name.starts_with("Fep") {
            continue;
        }
        let item_from = code[..at].rfind(['}', ';']).map_or(0, |p| p + 1);
        let attrs = &code[item_from..at];
        let repr_c = attrs.match_indices("#[repr(").any(|(p, m)| {
            let list = &attrs[p + m.len()..];
            list[..list.find(')').unwrap_or(list.len())]
                .split(',')
                .any(|h| h.trim() == "C")
        });
        let after = after.trim_start();
        let mut st = RustStruct {
            fields: Fields::new(),
            repr_c,
        };
        if let Some(inner) = after.strip_prefix('{') {
            let Some(close) = inner.find('}') else {
                r.problems
                    .push(format!("ffi.rs: struct {name}: no closing brace"));
                return;
            };
            for f in split_top(&inner[..close]) {
                // Visibility (`pub`, `pub(crate)`) and the field's attributes are not its name.
                let f = f
                    .split_whitespace()
                    .filter(|w| !w.starts_with("#["))
                    .collect::<Vec<_>>()
                    .join(" ");
                let f = f
                    .strip_prefix("pub(crate) ")
                    .or_else(|| f.strip_prefix("pub "))
                    .unwrap_or(&f);
                match f.split_once(':') {
                    Some((fname, ty)) => st.fields.push((fname.trim().to_string(), rust_type(ty))),
                    None => r
                        .problems
                        .push(format!("ffi.rs: {name}: cannot parse field `{f}`")),
                }
            }
        } else if !after.starts_with([';', '(']) {
            r.problems.push(format!(
                "ffi.rs: struct {name}: generics or where clauses are not supported here"
            ));
        }
        if r.structs.insert(name.to_string(), st).is_some() {
            r.problems
                .push(format!("ffi.rs: struct {name} defined twice"));
        }
    }
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
    errs.extend(compare_structs(h, r));
    errs
}

/// Every struct of the header against ffi.rs's struct of the same name, both ways round.
fn compare_structs(h: &Header, r: &RustFfi) -> Vec<String> {
    let mut errs = Vec::new();
    for (name, hf) in &h.structs {
        let Some(rs) = r.structs.get(name) else {
            errs.push(format!(
                "struct {name} is defined in the header but is not a `#[repr(C)] pub struct {name}` in ffi.rs"
            ));
            continue;
        };
        if !rs.repr_c {
            errs.push(format!(
                "ffi.rs: {name} is not #[repr(C)] (its layout would not be C's)"
            ));
        }
        if hf.len() != rs.fields.len() {
            errs.push(format!(
                "{name}: {} fields in the header, {} in ffi.rs",
                hf.len(),
                rs.fields.len()
            ));
        }
        for (k, (hfld, rfld)) in hf.iter().zip(&rs.fields).enumerate() {
            if hfld.0 != rfld.0 {
                errs.push(format!(
                    "{name} field {k}: named `{}` in the header, `{}` in ffi.rs (order differs?)",
                    hfld.0, rfld.0
                ));
            }
            if hfld.1 != rfld.1 {
                errs.push(format!(
                    "{name}.{} (field {k}): header type {}, ffi.rs type {}",
                    hfld.0, hfld.1, rfld.1
                ));
            }
        }
        if hf.len() != rs.fields.len() {
            errs.push(format!(
                "{name} fields:\n  header  {hf:?}\n  ffi.rs  {:?}",
                rs.fields
            ));
        }
    }
    for name in &h.opaque {
        if !r.structs.contains_key(name) {
            errs.push(format!(
                "opaque {name} is declared in the header but there is no `pub struct {name}` in ffi.rs"
            ));
        }
    }
    for (name, rs) in &r.structs {
        if h.structs.contains_key(name) || h.opaque.contains(name) {
            continue;
        }
        errs.push(if rs.repr_c {
            format!("#[repr(C)] struct {name} is in ffi.rs but not defined in the header")
        } else {
            format!("pub struct {name} is in ffi.rs but not declared (even opaque) in the header")
        });
    }
    errs
}

#[test]
fn header_and_ffi_rs_declare_the_same_abi() {
    let h = parse_header(HEADER);
    let r = parse_ffi_rs(&ffi_rs());
    println!(
        "header: {} constants, {} functions, {} structs, opaque {:?}",
        h.defines.len(),
        h.functions.len(),
        h.structs.len(),
        h.opaque
    );
    for (name, fields) in &h.structs {
        println!(
            "  struct {name} {{ {} }}",
            fields
                .iter()
                .map(|(n, t)| format!("{n}: {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
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
    for name in [
        "FepLcaParams",
        "FepSettleNet",
        "FepSettleParams",
        "FepVmpModelDesc",
        "FepVmpFpiParams",
        "FepVmpSequenceParams",
        "FepVmpPolicyParams",
        "FepVmpLearnParams",
        "FepAttnTensor",
        "FepAttentionParams",
    ] {
        assert!(
            h.structs.get(name).is_some_and(|f| f.len() >= 3),
            "struct {name} not parsed from the header (or too few fields): {:?}",
            h.structs
        );
        assert!(
            r.structs.get(name).is_some_and(|s| s.fields.len() >= 3),
            "struct {name} not parsed from ffi.rs (or too few fields): {:?}",
            r.structs
        );
    }
    for name in ["FepLcaDict", "FepVmpModel"] {
        assert!(
            h.opaque.contains(name),
            "opaque {name} not parsed: {:?}",
            h.opaque
        );
    }
    for name in [
        "fep_settle_infer",
        "fep_settle_learn",
        "fep_vmp_model_new",
        "fep_vmp_model_free",
        "fep_vmp_model_info",
        "fep_vmp_model_counts",
        "fep_vmp_infer_states",
        "fep_vmp_infer_sequence",
        "fep_vmp_infer_policies",
        "fep_vmp_learn",
        "fep_attention_forward",
        "fep_attention_backward",
        "fep_attention_merge",
    ] {
        assert!(
            h.functions.contains_key(name),
            "{name} was not parsed from the header: {:?}",
            h.functions.keys()
        );
    }
    let errs = compare(&h, &r);
    assert!(
        errs.is_empty(),
        "include/fep_kernels.h and src/ffi/ disagree:\n{}",
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
        ("FEP_ACT_IDENTITY", FEP_ACT_IDENTITY),
        ("FEP_ACT_TANH", FEP_ACT_TANH),
        ("FEP_ACT_RELU", FEP_ACT_RELU),
        ("FEP_ACT_LEAKY_RELU", FEP_ACT_LEAKY_RELU),
        ("FEP_ACT_SIGMOID", FEP_ACT_SIGMOID),
        ("FEP_ACT_GELU", FEP_ACT_GELU),
        ("FEP_SETTLE_INIT_FEEDFORWARD", FEP_SETTLE_INIT_FEEDFORWARD),
        ("FEP_SETTLE_INIT_GIVEN", FEP_SETTLE_INIT_GIVEN),
        ("FEP_VMP_OBS_INDEX", FEP_VMP_OBS_INDEX),
        ("FEP_VMP_OBS_DIST", FEP_VMP_OBS_DIST),
        ("FEP_VMP_METHOD_VMP", FEP_VMP_METHOD_VMP),
        ("FEP_VMP_METHOD_MMP", FEP_VMP_METHOD_MMP),
        ("FEP_VMP_COUNTS_A", FEP_VMP_COUNTS_A),
        ("FEP_VMP_COUNTS_B", FEP_VMP_COUNTS_B),
        ("FEP_VMP_COUNTS_D", FEP_VMP_COUNTS_D),
        ("FEP_SCORE_DOT", FEP_SCORE_DOT),
        ("FEP_SCORE_GAUSSIAN", FEP_SCORE_GAUSSIAN),
        ("FEP_SCORE_STUDENT_T", FEP_SCORE_STUDENT_T),
        ("FEP_SCORE_LAPLACE", FEP_SCORE_LAPLACE),
    ];
    // Every constant of the header is in the list above (so none is compared only as text).
    for name in h.defines.keys() {
        assert!(
            compiled.iter().any(|(n, _)| n == name),
            "{name}: add it to the list in constants_match_the_compiled_values"
        );
    }
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
    use fep_kernels::settle::Activation;
    for a in Activation::ALL {
        let name = match a {
            Activation::Identity => "FEP_ACT_IDENTITY",
            Activation::Tanh => "FEP_ACT_TANH",
            Activation::Relu => "FEP_ACT_RELU",
            Activation::LeakyRelu(_) => "FEP_ACT_LEAKY_RELU",
            Activation::Sigmoid => "FEP_ACT_SIGMOID",
            Activation::Gelu => "FEP_ACT_GELU",
        };
        assert_eq!(Some(&(a.code() as i64)), h.defines.get(name), "{a:?}");
        assert_eq!(
            Activation::from_code(a.code(), a.alpha()).unwrap(),
            a,
            "{a:?} round trip"
        );
    }
    use fep_kernels::vmp::Method;
    for (m, name) in [
        (Method::Vmp, "FEP_VMP_METHOD_VMP"),
        (Method::Mmp, "FEP_VMP_METHOD_MMP"),
    ] {
        assert_eq!(Some(&(m.code() as i64)), h.defines.get(name), "{m:?}");
        assert_eq!(Method::from_code(m.code()).unwrap(), m, "{m:?} round trip");
    }
    use fep_kernels::attention::Score;
    for s in Score::ALL {
        let name = match s {
            Score::Dot => "FEP_SCORE_DOT",
            Score::Gaussian => "FEP_SCORE_GAUSSIAN",
            Score::StudentT(_) => "FEP_SCORE_STUDENT_T",
            Score::Laplace => "FEP_SCORE_LAPLACE",
        };
        assert_eq!(Some(&(s.code() as i64)), h.defines.get(name), "{s:?}");
    }
}

/// The parser on a small header and Rust file, including what it must reject.
#[test]
fn parser_self_check() {
    let header = "/* c */ #define FEP_A 3\n#define FEP_B (-0x10)\n// x\n\
                  typedef struct FepLcaParams { int32_t a; float b; } FepLcaParams;\n\
                  typedef struct FepNet {\n    const uint64_t *w; /* c */\n    void *const *p;\n    \
                  const float *const *d;\n} FepNet;\ntypedef struct FepH FepH;\n\
                  const char *fep_f(void);\nvoid fep_g(const FepLcaDict *d, void *s,\n  uint64_t **n);\n\
                  int32_t fep_h(const FepNet *net, float *const *x, float const *y, FepH **out);";
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
    assert_eq!(
        h.functions["fep_h"].params,
        [
            ("net".to_string(), "*const FepNet".to_string()),
            ("x".into(), "*const *mut f32".into()),
            ("y".into(), "*const f32".into()),
            ("out".into(), "*mut *mut FepH".into())
        ]
    );
    assert_eq!(
        h.structs["FepNet"],
        [
            ("w".to_string(), "*const u64".to_string()),
            ("p".into(), "*const *mut c_void".into()),
            ("d".into(), "*const *const f32".into())
        ]
    );
    assert_eq!(h.structs["FepLcaParams"].len(), 2);
    assert!(h.opaque.contains("FepH") && h.opaque.len() == 1);
    let rust = "pub const FEP_A: i32 = 3;\npub const FEP_B: i32 = -16;\n#[repr(C)]\npub struct FepLcaParams {\n    pub a: i32,\n    pub b: f32,\n}\n\
                /// Doc.\n#[repr(C)]\n#[derive(Clone, Copy, Debug)]\npub struct FepNet {\n    pub w: *const u64,\n    \
                pub p: *const *mut std::ffi::c_void,\n    pub d: *const *const f32,\n}\n\
                pub struct FepH {\n    inner: Vec<u8>,\n}\n\
                #[unsafe(no_mangle)]\npub extern \"C\" fn fep_f() -> *const c_char { x }\n\
                #[unsafe(no_mangle)]\npub unsafe extern \"C\" fn fep_g(\n    d: *const FepLcaDict,\n    s: *mut std::ffi::c_void,\n    n: *mut *mut u64,\n) {\n}\n\
                #[unsafe(no_mangle)]\npub unsafe extern \"C\" fn fep_h(net: *const FepNet, x: *const *mut f32, y: *const f32, out: *mut *mut FepH) -> i32 {\n}\n";
    let r = parse_ffi_rs(rust);
    assert!(r.structs["FepNet"].repr_c && !r.structs["FepH"].repr_c);
    assert!(compare(&h, &r).is_empty(), "{:?}", compare(&h, &r));
    // Swapped names, a changed value, a missing no_mangle, a missing function: all caught.
    let bad = rust
        .replace("d: *const FepLcaDict", "dd: *const FepLcaDict")
        .replace("= -16", "= 16")
        .replacen("#[unsafe(no_mangle)]\npub extern", "pub extern", 1);
    let errs = compare(&h, &parse_ffi_rs(&bad));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let errs = compare(
        &parse_header(&header.replace("const char *fep_f(void);", "")),
        &r,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    // Struct mismatches, each alone: the const level of a field, its name, the order of two
    // fields, a missing repr(C), a missing field, a struct missing on either side.
    let one_error = |rust: &str, what: &str| {
        let errs = compare(&h, &parse_ffi_rs(rust));
        assert!(!errs.is_empty(), "{what}: not caught");
        assert!(
            errs.iter()
                .all(|e| e.contains("FepNet") || e.contains("FepLcaParams")),
            "{what}: {errs:#?}"
        );
        errs
    };
    assert_eq!(
        one_error(
            &rust.replace("pub p: *const *mut", "pub p: *mut *mut"),
            "pointer level"
        )
        .len(),
        1
    );
    assert_eq!(
        one_error(
            &rust.replace("pub d: *const *const", "pub d: *const *mut"),
            "inner const"
        )
        .len(),
        1
    );
    assert_eq!(
        one_error(&rust.replace("pub w:", "pub widths:"), "field name").len(),
        1
    );
    one_error(
        &rust.replace(
            "pub a: i32,\n    pub b: f32,",
            "pub b: f32,\n    pub a: i32,",
        ),
        "field order",
    );
    assert_eq!(
        one_error(
            &rust.replacen(
                "#[repr(C)]\npub struct FepLcaParams",
                "pub struct FepLcaParams",
                1
            ),
            "repr(C)"
        ),
        ["ffi.rs: FepLcaParams is not #[repr(C)] (its layout would not be C's)"]
    );
    one_error(
        &rust.replace("    pub d: *const *const f32,\n", ""),
        "missing field",
    );
    one_error(
        &rust.replace("pub struct FepNet", "pub struct Net"),
        "struct missing in ffi.rs",
    );
    let errs = compare(
        &parse_header(&header.replace("typedef struct FepH FepH;", "")),
        &r,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].contains("FepH"), "{errs:#?}");
    // The C types, const at every level.
    let cases = [
        ("float *const *", "*const *mut f32"),
        ("const float *const *", "*const *const f32"),
        ("float const *const *", "*const *const f32"),
        ("void *const *", "*const *mut c_void"),
        ("const void *", "*const c_void"),
        ("const uint64_t *", "*const u64"),
        ("FepLcaDict **", "*mut *mut FepLcaDict"),
        ("float **const *", "*const *mut *mut f32"),
        ("const float **", "*mut *const f32"),
        ("float * const", "*mut f32"),
        ("const int32_t", "i32"),
        ("void", "()"),
    ];
    for (c, rust) in cases {
        assert_eq!(c_type_to_rust(c).as_deref(), Ok(rust), "{c}");
    }
    for bad in [
        "float * restrict",
        "float * const const",
        "unsigned int",
        "const void",
        "",
        "float volatile *",
    ] {
        assert!(c_type_to_rust(bad).is_err(), "{bad:?} accepted");
    }
    // Unsupported field declarators are reported, not skipped.
    let h = parse_header("typedef struct FepX { uint64_t s[3]; void *p; } FepX;");
    assert!(h.problems.is_empty(), "{:?}", h.problems);
    assert_eq!(
        h.structs["FepX"],
        vec![
            ("s".to_string(), "[u64; 3]".to_string()),
            ("p".to_string(), "*mut c_void".to_string())
        ]
    );
    assert_eq!(rust_type("[u64;  3]"), "[u64; 3]");
    assert_eq!(size_align("[u64; 3]"), Ok((24, 8)));
    for bad in [
        "float a[];",
        "float a[0];",
        "float a[2][3];",
        "uint32_t a : 3;",
        "float a, b;",
        "void (*f)(int32_t x);",
    ] {
        let h = parse_header(&format!("typedef struct FepX {{ {bad} }} FepX;"));
        assert_eq!(h.problems.len(), 1, "{bad}: {:?}", h.problems);
    }
    assert_eq!(
        parse_header("typedef struct FepX { int32_t a; } FepY;")
            .problems
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// The header compiles, and its struct layout is Rust's
// ---------------------------------------------------------------------------------------------

/// Size and alignment of the Rust spelling of a C field type.
fn size_align(ty: &str) -> Result<(usize, usize), String> {
    Ok(match ty {
        "i8" | "u8" => (1, 1),
        "i32" | "u32" | "f32" => (4, 4),
        "i64" | "u64" | "f64" => (8, 8),
        t if t.starts_with('*') => (size_of::<usize>(), align_of::<usize>()),
        t if t.starts_with('[') && t.ends_with(']') => {
            let (elem, n) = t[1..t.len() - 1]
                .rsplit_once(';')
                .ok_or_else(|| format!("bad array type {t}"))?;
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| format!("bad array length in {t}"))?;
            let (s, a) = size_align(elem.trim())?;
            (s * n, a)
        }
        t => return Err(format!("no layout known for the field type {t}")),
    })
}

/// The repr(C) layout that a list of field types gives: (offset per field, size, alignment).
fn c_layout(fields: &Fields) -> Result<(Vec<usize>, usize, usize), String> {
    let (mut offset, mut align, mut offsets) = (0usize, 1usize, Vec::new());
    for (_, ty) in fields {
        let (s, a) = size_align(ty)?;
        offset = offset.next_multiple_of(a);
        offsets.push(offset);
        offset += s;
        align = align.max(a);
    }
    Ok((offsets, offset.next_multiple_of(align), align))
}

/// The compiled layout of a struct of fep_kernels::ffi: size, alignment and each field's offset.
struct Compiled {
    size: usize,
    align: usize,
    offsets: Vec<(&'static str, usize)>,
}

macro_rules! compiled {
    ($t:ident: $($f:ident),* $(,)?) => {
        Compiled {
            size: size_of::<fep_kernels::ffi::$t>(),
            align: align_of::<fep_kernels::ffi::$t>(),
            offsets: vec![$((stringify!($f), std::mem::offset_of!(fep_kernels::ffi::$t, $f))),*],
        }
    };
}

/// The structs of the header as compiled. A new struct in the header fails the layout test
/// until it is listed here (with its fields, so a renamed field fails to compile).
fn compiled_layout(name: &str) -> Option<Compiled> {
    Some(match name {
        "FepLcaParams" => compiled!(FepLcaParams: threshold, lambda, eta, steps, tol),
        "FepSettleNet" => compiled!(
            FepSettleNet: layers,
            widths,
            activations,
            leaky_alpha,
            dtype,
            weights,
            biases,
            precision,
            precision_diag
        ),
        "FepSettleParams" => {
            compiled!(FepSettleParams: eta, momentum, steps, tol, init, skip_input_checks)
        }
        "FepVmpModelDesc" => compiled!(
            FepVmpModelDesc: num_factors,
            num_modalities,
            num_states,
            num_controls,
            num_obs,
            a_num_deps,
            a_deps,
            a,
            b,
            c,
            d,
            policies,
            num_policies,
            policy_len,
            e,
            pa,
            pb,
            pd
        ),
        "FepVmpFpiParams" => compiled!(FepVmpFpiParams: num_iter, tol, skip_input_checks),
        "FepVmpSequenceParams" => {
            compiled!(FepVmpSequenceParams: method, num_iter, tau, skip_input_checks)
        }
        "FepVmpPolicyParams" => compiled!(
            FepVmpPolicyParams: gamma,
            utility,
            state_info_gain,
            param_info_gain,
            skip_input_checks
        ),
        "FepVmpLearnParams" => compiled!(FepVmpLearnParams: lr_a, lr_b, lr_d, skip_input_checks),
        "FepAttnTensor" => compiled!(FepAttnTensor: data, shape, strides),
        "FepAttentionParams" => compiled!(
            FepAttentionParams: score,
            nu,
            scale,
            causal,
            window,
            normalizer,
            skip_input_checks
        ),
        _ => return None,
    })
}

#[test]
fn header_compiles_as_c_and_cxx_with_rust_layout() {
    let dir = std::env::temp_dir().join(format!("fep-ffi-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = dir.join("fep_kernels.h");
    std::fs::write(&header, HEADER).unwrap();

    // For every struct of the header: the repr(C) offsets from its Rust field types, checked
    // against the compiled Rust struct (size, alignment and every field's offset), then asserted
    // in C and C++ against the header's struct.
    let h = parse_header(HEADER);
    let r = parse_ffi_rs(&ffi_rs());
    assert!(
        h.structs.len() >= 3,
        "structs parsed: {:?}",
        h.structs.keys()
    );
    let mut asserts = String::new();
    let mut uses = Vec::new();
    for name in h.structs.keys() {
        let fields = &r
            .structs
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in ffi.rs"))
            .fields;
        let (offsets, size, align) = c_layout(fields).unwrap_or_else(|e| panic!("{name}: {e}"));
        let compiled = compiled_layout(name).unwrap_or_else(|| {
            panic!("{name}: add it to compiled_layout() in tests/ffi_header.rs")
        });
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        let compiled_names: Vec<&str> = compiled.offsets.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names, compiled_names,
            "{name}: the fields in ffi.rs differ from compiled_layout()'s list: update the list"
        );
        for ((field, off), (_, c_off)) in names.iter().zip(&offsets).zip(&compiled.offsets) {
            assert_eq!(
                off, c_off,
                "{name}.{field}: offset from the field types vs compiled"
            );
            asserts += &format!(
                "STATIC_ASSERT(offsetof({name}, {field}) == {off}, \"offset of {name}.{field}\");\n"
            );
        }
        assert_eq!(
            (size, align),
            (compiled.size, compiled.align),
            "{name}: (size, alignment) from the field types vs compiled"
        );
        asserts += &format!(
            "STATIC_ASSERT(sizeof({name}) == {size}, \"size of {name}\");\n\
             STATIC_ASSERT(_Alignof({name}) == {align}, \"alignment of {name}\");\n"
        );
        uses.push(format!("sizeof(*(const {name} *)0)"));
        println!("{name}: size {size}, align {align}, offsets {offsets:?}");
    }
    let unit = format!(
        "#include \"fep_kernels.h\"\n#include <stddef.h>\n#ifdef __cplusplus\n#define STATIC_ASSERT static_assert\n\
         #define _Alignof alignof\n#else\n#define STATIC_ASSERT _Static_assert\n#endif\n{asserts}\
         int fep_header_check(const FepLcaParams *p) {{ return (int)p->steps + FEP_OK; }}\n\
         unsigned long fep_header_sizes(void) {{ return (unsigned long)({}); }}\n",
        uses.join(" + ")
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
