//! Static performance census of the attention forward kernels (`ci/sass-census`, issue 11): the
//! hottest loop of the bf16/f16 kernels with D = Dv = 64 and D = Dv = 128, read from this build's
//! machine code, must
//! - CUDA sm_90a: load its MMA fragments with LDSM (ldmatrix), stage K/V with LDGSTS (cp.async),
//!   and spend at most [`budget`] other instructions per MMA;
//! - HIP gfx942: read shared memory 8 or 16 bytes at a time (ds_read_b64 / ds_read_b128, or the
//!   ds_load_ names), and spend at most [`budget`] other instructions per MFMA.
//!
//! The census runs on this build's own kernels (`OUT_DIR`, where build.rs put them), with
//! cuobjdump/nvdisasm from ci/setup-cuda.sh and LLVM 19 from ci/setup-rocm.sh; a missing tool
//! fails the test. Without the `cuda` / `rocm` feature there is nothing to read and the test
//! says it was skipped; so does a test binary run away from its build (the GPU suite's copies).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Non-MMA instructions per MMA (HMMA m16n8k16 on sm_90a, MFMA 16x16x16 on gfx942) allowed in
/// the hottest loop, counted statically (each instruction once, so the loop's cold paths count
/// too: e, per-key terms, mask edges). kernels/attention/NOTES.md, "The census and its budget",
/// derives the issue-rate budget of the executed Dot path (≤ 10 per HMMA for the 350 TFLOP/s
/// target; ≤ 15 per MFMA at full rate) and records v2's figures; these static bounds are v2's
/// measured static figures plus ~8%, a guard against regressions in what the GPU must issue.
fn budget(vendor: &str, kernel: &str) -> f64 {
    let d64 = kernel.contains("_d64_");
    match (vendor, d64) {
        ("cuda", true) => 22.0,
        ("cuda", false) => 14.5,
        (_, true) => 41.0,
        (_, false) => 32.0,
    }
}
/// The kernels held to the budget.
const KERNELS: [&str; 4] = [
    "attn_fwd_bf16_d64_v64",
    "attn_fwd_bf16_d128_v128",
    "attn_fwd_f16_d64_v64",
    "attn_fwd_f16_d128_v128",
];

/// Runs `ci/sass-census --json` for one vendor on this build's out dir and returns its records,
/// or `None` (after saying why) when this binary runs away from the build that made it.
fn census(test: &str, vendor: &str, setup: &str) -> Option<Vec<Value>> {
    let out = Path::new(env!("OUT_DIR"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("ci/sass-census");
    if !out.is_dir() || !script.is_file() {
        let msg = format!(
            "SKIPPED {test}: not on the machine that built this binary ({} or {} is missing); \
             the census reads the build's kernels with the build's tools",
            out.display(),
            script.display()
        );
        println!("{msg}");
        eprintln!("{msg}");
        return None;
    }
    let regex = format!("^({})$", KERNELS.join("|"));
    let output = Command::new("python3")
        .arg(&script)
        .args(["--vendor", vendor, "--json"])
        .args(["--kernels", &regex])
        .arg("--out-dir")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("could not run python3 {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ci/sass-census --vendor {vendor} failed ({}); its tools come from `eval \"$(bash {setup})\"`:\n{stderr}",
        output.status
    );
    let records: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "ci/sass-census printed no JSON list ({e}):\n{}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    Some(records)
}

fn count(c: &Value, key: &str) -> u64 {
    c.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The failures of one vendor's records: a missing kernel, a missing instruction, the budget.
fn failures(records: &[Value], vendor: &str) -> Vec<String> {
    let mut fails = Vec::new();
    for kernel in KERNELS {
        let Some(r) = records.iter().find(|r| r["kernel"] == kernel) else {
            fails.push(format!("{vendor} {kernel}: not in the census"));
            continue;
        };
        let c = &r["counts"];
        let range: Vec<String> = (r["loop"].as_array().into_iter().flatten())
            .map(|a| format!("{:#x}", a.as_u64().unwrap_or(0)))
            .collect();
        let at = format!("{vendor} {kernel} (hottest loop {})", range.join("-"));
        let (needs, budget): (Vec<(&str, bool)>, f64) = if vendor == "cuda" {
            (
                vec![
                    ("LDSM (ldmatrix fragment loads)", count(c, "LDSM") > 0),
                    ("LDGSTS (cp.async global->shared)", count(c, "LDGSTS") > 0),
                ],
                budget(vendor, kernel),
            )
        } else {
            let reads = &c["ds_read"];
            (
                vec![(
                    "ds_read_b64 / ds_read_b128 (8- or 16-byte LDS reads)",
                    count(reads, "b64") + count(reads, "b128") > 0,
                )],
                budget(vendor, kernel),
            )
        };
        for (what, found) in needs {
            if !found {
                fails.push(format!("{at}: no {what}"));
            }
        }
        match r["non_mma_per_mma"].as_f64() {
            Some(x) if x <= budget => {}
            Some(x) => fails.push(format!(
                "{at}: {x:.2} non-MMA instructions per MMA > budget {budget} ({} instructions, {} MMA)",
                count(c, "instructions"),
                count(c, "mma")
            )),
            None => fails.push(format!("{at}: no loop with an MMA")),
        }
    }
    fails
}

fn check(test: &str, vendor: &str, setup: &str) {
    let Some(records) = census(test, vendor, setup) else {
        return;
    };
    for r in &records {
        println!("{r}");
    }
    let fails = failures(&records, vendor);
    assert!(
        fails.is_empty(),
        "{} problem(s) in the {vendor} census (ci/sass-census --vendor {vendor} --kernels attn_fwd shows the table):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

fn skipped(test: &str, feature: &str) {
    let msg = format!("SKIPPED {test}: this build has no `{feature}` feature, so no kernels");
    println!("{msg}");
    eprintln!("{msg}");
}

#[test]
fn cuda_attention_hot_loop() {
    let test = "cuda_attention_hot_loop";
    if !cfg!(feature = "cuda") || option_env!("DOCS_RS").is_some() {
        return skipped(test, "cuda");
    }
    check(test, "cuda", "ci/setup-cuda.sh");
}

#[test]
fn hip_attention_hot_loop() {
    let test = "hip_attention_hot_loop";
    if !cfg!(feature = "rocm") || option_env!("DOCS_RS").is_some() {
        return skipped(test, "rocm");
    }
    check(test, "hip", "ci/setup-rocm.sh");
}

/// The checks themselves on records in the script's format (a v1-like loop fails every check,
/// a good one passes), so a change of format cannot make them pass silently.
#[test]
fn checks_catch_a_slow_loop() {
    let rec = |kernel: &str, counts: Value, ratio: Value| {
        serde_json::json!({"kernel": kernel, "loop": [16, 4096], "counts": counts,
                           "non_mma_per_mma": ratio})
    };
    let all = |counts: Value, ratio: Value| -> Vec<Value> {
        KERNELS
            .iter()
            .map(|k| rec(k, counts.clone(), ratio.clone()))
            .collect()
    };
    let v1 = serde_json::json!({"instructions": 3856, "mma": 96, "LDS": 449, "LDSM": 0,
                                "LDGSTS": 0, "ds_read": {"b32": 34, "u16": 77}});
    assert_eq!(failures(&all(v1.clone(), 39.17.into()), "cuda").len(), 12);
    // gfx942 v1: no 8-byte reads anywhere; over the D = 128 budget only.
    assert_eq!(failures(&all(v1, 39.56.into()), "hip").len(), 6);
    let good = serde_json::json!({"instructions": 400, "mma": 96, "LDSM": 24, "LDGSTS": 8,
                                  "ds_read": {"b128": 16}});
    assert!(failures(&all(good.clone(), 3.2.into()), "cuda").is_empty());
    assert!(failures(&all(good.clone(), 3.2.into()), "hip").is_empty());
    assert_eq!(failures(&all(good, Value::Null), "cuda").len(), 4);
    assert_eq!(failures(&[], "hip").len(), 4);
}
