//! `cargo xtask bench-wasm [--runs N]`: chat-core natively against chat-core in wasm, one run.
//!
//! Runs the criterion bench `client-web/core/benches/crypto.rs` (native medians from
//! `target/criterion/*/new/estimates.json`), builds the wasm with [`crate::wasm::build`], runs
//! `client-web/wasm/bench/bench.mjs` under Node.js on the same operations, and rewrites the
//! `bench-wasm` section of docs/BENCHMARKS.md: medians, wasm/native ratio, messages per second
//! per core for the symmetric ratchet, and the size of both wasm files.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench_sign::rewrite_section;
use crate::{cargo, status, wasm, workspace_root};

const START: &str = "<!-- bench-wasm:start -->";
const END: &str = "<!-- bench-wasm:end -->";
/// (criterion id = bench.mjs key, table label)
const OPERATIONS: &[(&str, &str)] = &[
    ("x25519_dh", "X25519 agreement"),
    (
        "x3dh_initiator_and_responder",
        "X3DH, initiator + responder",
    ),
    (
        "ratchet_encrypt_decrypt_256B",
        "ratchet encrypt + decrypt, 256 B",
    ),
    (
        "group_encrypt_decrypt_256B",
        "sender-key group encrypt + decrypt, 256 B",
    ),
];
const RATCHET: &str = "ratchet_encrypt_decrypt_256B";
/// bench.mjs key of the ratchet through the JS API (glue, copies and allocations included).
const RATCHET_JS: &str = "ratchet_js_api_256B";

pub fn run(args: &[String]) -> Result<()> {
    let mut runs: usize = 7;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other}; usage: cargo xtask bench-wasm [--runs N]"),
        }
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| root.join("target"));

    status(cargo().args([
        "bench",
        "--package",
        "chat-core",
        "--bench",
        "crypto",
        "--",
        "--noplot",
        "--warm-up-time",
        "2",
        "--measurement-time",
        "4",
    ]))?;
    let native: Vec<f64> = OPERATIONS
        .iter()
        .map(|(id, _)| criterion_median_us(&target.join("criterion").join(id)))
        .collect::<Result<_>>()?;

    // Sizes of what ships; timings from the same app plus the benchmark hook.
    let built = wasm::build(&target.join("bench-wasm-shipped"))?;
    let pkg = target.join("bench-wasm-pkg");
    std::fs::create_dir_all(&pkg)?;
    wasm::build_artifact(wasm::APP_WITH_BENCH_HOOK, &pkg)?;
    let output = Command::new("node")
        .arg(root.join("client-web/wasm/bench/bench.mjs"))
        .arg(&pkg)
        .arg(runs.to_string())
        .output()
        .context("cannot run node (Node.js 18 or later is needed)")?;
    if !output.status.success() {
        bail!(
            "bench.mjs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report = String::from_utf8(output.stdout)?;
    let in_wasm: Vec<f64> = OPERATIONS
        .iter()
        .map(|(id, _)| json_number(&report, id))
        .collect::<Result<_>>()?;
    let ratchet_js = json_number(&report, RATCHET_JS)?;
    let node_version = json_string(&report, "node").unwrap_or_default();

    let mut table = format!(
        "{START}\nCommand: `cargo xtask bench-wasm --runs {runs}` (native: criterion medians of \
         `client-web/core/benches/crypto.rs`; wasm: `client-web/wasm/bench/bench.mjs` under Node.js \
         {node_version}, median of {runs} runs after warm-up; same machine, one run).\n\n\
         | operation | native | wasm | wasm / native |\n|---|---|---|---|\n"
    );
    for (((_, label), n), w) in OPERATIONS.iter().zip(&native).zip(&in_wasm) {
        table.push_str(&format!(
            "| {label} | {} | {} | {:.2}x |\n",
            fmt_us(*n),
            fmt_us(*w),
            w / n
        ));
    }
    let ratchet = OPERATIONS
        .iter()
        .position(|(id, _)| *id == RATCHET)
        .unwrap_or(0);
    table.push_str(&format!(
        "| ratchet encrypt + decrypt, 256 B, through the JS API (`chat_core.js`) | {} | {} | {:.2}x |\n",
        fmt_us(native[ratchet]),
        fmt_us(ratchet_js),
        ratchet_js / native[ratchet]
    ));
    table.push_str(&format!(
        "\nSymmetric ratchet steps (one 256-byte message encrypted and decrypted, on one core): \
         **{:.0} messages/s natively** (target ≥ 200k), **{:.0} messages/s in wasm** ({:.0} \
         through the JS API).\n\nSizes (target for the app: < 300 KiB uncompressed):\n",
        1e6 / native[ratchet],
        1e6 / in_wasm[ratchet],
        1e6 / ratchet_js,
    ));
    for file in &built {
        table.push_str(&format!(
            "- `{}.wasm`: **{}** ({})\n",
            file.artifact.name,
            file.describe(),
            file.wasm_opt_note()
        ));
    }
    table.push_str(END);
    println!("{table}");
    rewrite_section(&root.join("docs/BENCHMARKS.md"), START, END, &table)
}

fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// The median point estimate criterion stored for one benchmark, in microseconds.
fn criterion_median_us(dir: &Path) -> Result<f64> {
    let path = dir.join("new/estimates.json");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}; did the bench run?", path.display()))?;
    let median = text
        .find("\"median\"")
        .with_context(|| format!("no median in {}", path.display()))?;
    Ok(json_number(&text[median..], "point_estimate")? / 1000.0)
}

/// The number after the first `"key":` in `json` (flat lookups on output we produce).
fn json_number(json: &str, key: &str) -> Result<f64> {
    let needle = format!("\"{key}\":");
    let start = json
        .find(&needle)
        .with_context(|| format!("no {key} in {json}"))?
        + needle.len();
    let rest = &json[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("{key} is not a number in {json}"))
}

fn json_string(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let start = json.find(&needle)? + needle.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
}
