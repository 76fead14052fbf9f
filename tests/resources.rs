//! The compilers' resource report (`fep_kernels::RESOURCE_REPORT`, written by build.rs) must show
//! no spill in any kernel (DESIGN.md §2, §5), and must cover every kernel the build promises.
//!
//! The report has one section per vendor and module, `== cuda lca/solve` or `== hip lca/solve`:
//! - CUDA (build.rs `summarise_ptxas`), one line per kernel and arch:
//!   `lca_gemm_f32 sm_90a: Used 38 registers, ...; 0 bytes stack frame, 0 bytes spill stores,
//!   0 bytes spill loads`
//! - HIP (build.rs `summarise_clang_resources`), one line per remark, each offload arch
//!   repeating the block: `lca_gemm_f32: VGPRs Spill: 0`, `lca_gemm_f32: ScratchSize
//!   [bytes/lane]: 0`, ...
//!
//! Failures: a CUDA kernel with spill stores, spill loads or a stack frame (local memory: either
//! spilled registers or a local array, both banned by §5); a HIP kernel with VGPR spills, scratch
//! memory or a dynamic stack (both mean per-lane memory traffic). SGPR spills on AMD are a
//! warning only: the compiler parks scalar registers in lanes of a VGPR with v_writelane /
//! v_readlane, which costs an instruction each but no memory access (a VGPR spill or scratch use
//! would show up in the fields that fail).

use std::collections::BTreeMap;

/// Kernels the report must list for every target of each vendor (besides the attention
/// kernels of [`required`]).
const REQUIRED: [&str; 12] = [
    "lca_solve_persistent",
    "lca_solve_stepped",
    "lca_gemm_f32",
    "lca_gemm_f16",
    "lca_gemm_bf16",
    "vmp_fpi",
    "vmp_sequence",
    "vmp_policies",
    "vmp_wnorm",
    "vmp_learn_partial",
    "vmp_learn_apply",
    "attn_check",
];

/// REQUIRED, the attention forward kernel of every dtype and (D, Dv) pair the API accepts
/// (kernels/attention/traits.cuh instantiates the same list), the backward kernels of every
/// dtype and head-dim bucket, and the merge and the probabilities of every dtype.
fn required() -> Vec<String> {
    let mut all: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    all.push("attn_bwd_reduce".to_string());
    for dtype in ["f32", "f16", "bf16"] {
        all.push(format!("attn_merge_{dtype}"));
        // probabilities.cu: the probabilities, and the forward of a bias or mask varying over Lq.
        all.push(format!("attn_probs_{dtype}"));
        all.push(format!("attn_rows_{dtype}"));
        // dβ of the backward (backward_dbias.cu): one kernel per dtype, no head-dim template.
        all.push(format!("attn_bwd_dbias_{dtype}"));
        // The backward kernels' head-dim buckets (kernels/attention/backward_params.cuh).
        for d in [64, 128, 256] {
            for dv in [64, 128, 256] {
                all.push(format!("attn_bwd_dq_{dtype}_d{d}_v{dv}"));
                all.push(format!("attn_bwd_kv_{dtype}_d{d}_v{dv}"));
                all.push(format!("attn_bwd_dk_{dtype}_d{d}_v{dv}"));
            }
        }
        for d in fep_kernels::attention::HEAD_DIMS {
            for dv in fep_kernels::attention::HEAD_DIMS {
                all.push(format!("attn_fwd_{dtype}_d{d}_v{dv}"));
            }
        }
    }
    all
}

/// The architecture list build.rs used: the same variable, read when this test was compiled
/// (cargo compiles the test and runs build.rs with the same environment, and rebuilds both when
/// it changes), split and defaulted the way build.rs does.
fn archs(var: Option<&str>, default: &str) -> Vec<String> {
    var.unwrap_or(default)
        .split([';', ','])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `sm_90a` for `90a`, `sm_90a` or `compute_90a`, as build.rs names the targets.
fn cuda_target(arch: &str) -> String {
    let num = arch
        .trim_start_matches("sm_")
        .trim_start_matches("compute_");
    format!("sm_{num}")
}

/// The number just before `what` in `text` (`"0 bytes spill stores"` → 0).
fn number_before(text: &str, what: &str) -> Option<u64> {
    let at = text.find(what)?;
    text[..at].split_whitespace().last()?.parse().ok()
}

#[derive(Debug, Default)]
struct Report {
    /// (kernel, arch) → the line's details, for CUDA.
    cuda: Vec<(String, String, String)>,
    /// kernel → one map of fields per compiled target, for HIP.
    hip: BTreeMap<String, Vec<BTreeMap<String, String>>>,
    /// Lines that fit no format.
    unparsed: Vec<String>,
}

fn parse(report: &str) -> Report {
    let mut r = Report::default();
    let mut vendor = "";
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(section) = line.strip_prefix("== ") {
            vendor = match section.split_whitespace().next() {
                Some("cuda") => "cuda",
                Some("hip") => "hip",
                _ => {
                    r.unparsed.push(line.to_string());
                    ""
                }
            };
            continue;
        }
        match vendor {
            "cuda" => {
                let parsed = line.split_once(": ").and_then(|(head, rest)| {
                    let (kernel, arch) = head.rsplit_once(' ')?;
                    Some((kernel.to_string(), arch.to_string(), rest.to_string()))
                });
                match parsed {
                    Some(entry) => r.cuda.push(entry),
                    None => r.unparsed.push(line.to_string()),
                }
            }
            "hip" => {
                let parsed = line.split_once(": ").and_then(|(kernel, rest)| {
                    let (key, value) = rest.split_once(": ")?;
                    Some((
                        kernel.to_string(),
                        key.trim().to_string(),
                        value.trim().to_string(),
                    ))
                });
                let Some((kernel, key, value)) = parsed else {
                    r.unparsed.push(line.to_string());
                    continue;
                };
                let blocks = r.hip.entry(kernel).or_default();
                // Each compiled target starts its block with the SGPR count.
                if key == "SGPRs" || blocks.is_empty() || blocks.last().unwrap().contains_key(&key)
                {
                    blocks.push(BTreeMap::new());
                }
                blocks.last_mut().unwrap().insert(key, value);
            }
            _ => r.unparsed.push(line.to_string()),
        }
    }
    r
}

/// The CUDA failures of a parsed report.
fn cuda_failures(r: &Report) -> Vec<String> {
    let mut fails = Vec::new();
    for (kernel, arch, rest) in &r.cuda {
        for what in [
            "bytes stack frame",
            "bytes spill stores",
            "bytes spill loads",
        ] {
            match number_before(rest, what) {
                Some(0) => {}
                Some(v) => fails.push(format!("CUDA {kernel} ({arch}): {v} {what}")),
                None => fails.push(format!("CUDA {kernel} ({arch}): no `{what}` in `{rest}`")),
            }
        }
    }
    fails
}

/// The HIP failures and warnings of a parsed report.
fn hip_failures(r: &Report) -> (Vec<String>, Vec<String>) {
    let (mut fails, mut warns) = (Vec::new(), Vec::new());
    for (kernel, blocks) in &r.hip {
        for (i, b) in blocks.iter().enumerate() {
            let num = |key: &str| b.get(key).map(|v| v.parse::<u64>().map_err(|_| v.clone()));
            for key in ["VGPRs Spill", "ScratchSize [bytes/lane]"] {
                match num(key) {
                    Some(Ok(0)) => {}
                    Some(Ok(v)) => {
                        fails.push(format!("HIP {kernel} (target {}): {key} = {v}", i + 1))
                    }
                    Some(Err(v)) => {
                        fails.push(format!("HIP {kernel} (target {}): {key} = {v:?}", i + 1))
                    }
                    None => {
                        fails.push(format!("HIP {kernel} (target {}): no `{key}` field", i + 1))
                    }
                }
            }
            if b.get("Dynamic Stack").is_some_and(|v| v != "False") {
                fails.push(format!(
                    "HIP {kernel} (target {}): Dynamic Stack = {}",
                    i + 1,
                    b["Dynamic Stack"]
                ));
            }
            match num("SGPRs Spill") {
                Some(Ok(0)) | None => {}
                Some(Ok(v)) => warns.push(format!(
                    "{kernel} (target {}): {v} SGPRs spilled to VGPR lanes",
                    i + 1
                )),
                Some(Err(v)) => fails.push(format!(
                    "HIP {kernel} (target {}): SGPRs Spill = {v:?}",
                    i + 1
                )),
            }
        }
    }
    (fails, warns)
}

#[test]
fn no_kernel_spills_and_every_kernel_is_reported() {
    let text = fep_kernels::RESOURCE_REPORT;
    let (cuda, rocm) = (cfg!(feature = "cuda"), cfg!(feature = "rocm"));
    // build.rs compiles nothing for docs.rs.
    let docs = option_env!("DOCS_RS").is_some();
    if text.trim().is_empty() {
        assert!(
            docs || !(cuda || rocm),
            "the resource report is empty although this build has the {} feature",
            if cuda { "cuda" } else { "rocm" }
        );
        println!("resource report empty (no GPU feature in this build): nothing to check");
        return;
    }
    println!("{text}");
    let r = parse(text);
    let mut fails: Vec<String> = r
        .unparsed
        .iter()
        .map(|l| format!("unparsed report line: {l:?}"))
        .collect();

    // Spills.
    fails.extend(cuda_failures(&r));
    let (hip_fails, warns) = hip_failures(&r);
    fails.extend(hip_fails);
    if !warns.is_empty() {
        let msg = format!(
            "WARNING: SGPR spills (into VGPR lanes, no memory traffic): {}",
            warns.join("; ")
        );
        println!("{msg}");
        eprintln!("{msg}");
    }

    // Coverage: every required kernel for every target of each enabled vendor, and nothing
    // from a vendor that is not enabled.
    if cuda {
        let targets: Vec<String> = archs(option_env!("FEP_CUDA_ARCHS"), "80;90a")
            .iter()
            .map(|a| cuda_target(a))
            .collect();
        for kernel in &required() {
            for t in &targets {
                let n = r
                    .cuda
                    .iter()
                    .filter(|(k, a, _)| k == kernel && a == t)
                    .count();
                if n != 1 {
                    fails.push(format!(
                        "CUDA {kernel} for {t}: {n} report lines, expected 1"
                    ));
                }
            }
        }
        let found: std::collections::BTreeSet<&str> =
            r.cuda.iter().map(|(_, a, _)| a.as_str()).collect();
        println!(
            "CUDA targets {targets:?} (report: {found:?}), {} kernel lines",
            r.cuda.len()
        );
    } else if !r.cuda.is_empty() {
        fails.push("CUDA kernels reported in a build without the cuda feature".into());
    }
    if rocm {
        let targets = archs(option_env!("FEP_ROCM_ARCHS"), "gfx942;gfx90a");
        // HIP remarks do not name the target: each kernel has one block per target.
        for kernel in &required() {
            let n = r.hip.get(kernel.as_str()).map_or(0, |b| b.len());
            if n != targets.len() {
                fails.push(format!(
                    "HIP {kernel}: {n} resource blocks, expected one per target {targets:?}"
                ));
            }
        }
        println!("HIP targets {targets:?}, {} kernels", r.hip.len());
    } else if !r.hip.is_empty() {
        fails.push("HIP kernels reported in a build without the rocm feature".into());
    }
    assert!(
        fails.is_empty(),
        "{} problem(s) in the resource report:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// The checks themselves, on report text in both formats (so a change of format in build.rs
/// that made the parser miss spills would fail here, not pass silently).
#[test]
fn parser_finds_spills_in_both_formats() {
    let report = "\
== cuda lca/solve
k_ok sm_90a: Used 40 registers, used 1 barriers, 272 bytes smem; 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
k_bad sm_80: Used 48 registers, used 1 barriers; 8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
k_short sm_80: Used 48 registers, used 1 barriers;
== hip lca/solve
h_ok: SGPRs: 44
h_ok: VGPRs: 38
h_ok: ScratchSize [bytes/lane]: 0
h_ok: Dynamic Stack: False
h_ok: SGPRs Spill: 0
h_ok: VGPRs Spill: 0
h_ok: SGPRs: 46
h_ok: VGPRs: 40
h_ok: ScratchSize [bytes/lane]: 0
h_ok: Dynamic Stack: False
h_ok: SGPRs Spill: 12
h_ok: VGPRs Spill: 0
h_bad: SGPRs: 100
h_bad: ScratchSize [bytes/lane]: 16
h_bad: Dynamic Stack: True
h_bad: SGPRs Spill: 0
h_bad: VGPRs Spill: 3
";
    let r = parse(report);
    assert!(r.unparsed.is_empty(), "{:?}", r.unparsed);
    assert_eq!(r.cuda.len(), 3);
    assert_eq!(r.hip["h_ok"].len(), 2, "two targets");
    let cf = cuda_failures(&r);
    assert_eq!(cf.len(), 6, "{cf:#?}"); // k_bad: 3 nonzero; k_short: 3 missing
    assert!(
        cf.iter()
            .all(|f| f.contains("k_bad") || f.contains("k_short"))
    );
    let (hf, hw) = hip_failures(&r);
    assert_eq!(hf.len(), 3, "{hf:#?}"); // scratch, dynamic stack, VGPR spill
    assert!(hf.iter().all(|f| f.contains("h_bad")));
    assert_eq!(hw.len(), 1, "{hw:#?}");
    assert!(hw[0].contains("h_ok") && hw[0].contains("12"));
    assert_eq!(
        number_before("1 a, 22 bytes spill stores", "bytes spill stores"),
        Some(22)
    );
    assert_eq!(archs(Some(" 80; sm_90a ,"), "x"), ["80", "sm_90a"]);
    assert_eq!(cuda_target("compute_90a"), "sm_90a");
}
