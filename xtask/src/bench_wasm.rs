//! `cargo xtask bench-wasm [--runs N] [--rounds R]`: chat-core natively against chat-core in
//! wasm, one run.
//!
//! Builds the wasm with [`crate::wasm::build`] first (so that nothing compiles between
//! measurements), then R rounds (default 1) of: the criterion bench
//! `client-web/core/benches/crypto.rs` (native medians from
//! `target/criterion/*/new/estimates.json`), then `client-web/wasm/bench/bench.mjs` under Node.js
//! on the same operations. Interleaving matters on a shared machine: a load change between a
//! native phase and a wasm phase moves the ratio, so each ratio is taken within a round and the
//! table gives the median over rounds (and their range). Rewrites the `bench-wasm` section of
//! docs/BENCHMARKS.md: medians, wasm/native ratio, messages per second per core for the
//! symmetric ratchet, and the size of both wasm files.

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
/// The same operations through the JS API (glue, copies and allocations included): (criterion
/// id of the native operation, bench.mjs key, table label).
const THROUGH_JS: &[(&str, &str, &str)] = &[
    (
        RATCHET,
        "ratchet_js_api_256B",
        "ratchet encrypt + decrypt, 256 B, through the JS API (`chat_core.js`)",
    ),
    (
        "group_encrypt_decrypt_256B",
        "group_js_api_256B",
        "sender-key group encrypt + decrypt, 256 B, through the JS API",
    ),
];

/// One round's medians: native and wasm (in `OPERATIONS` order), then the `THROUGH_JS` rows.
type Round = (Vec<f64>, Vec<f64>, Vec<f64>);

pub fn run(args: &[String]) -> Result<()> {
    let mut runs: usize = 7;
    let mut rounds: usize = 1;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--rounds" => rounds = it.next().context("--rounds R")?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: cargo xtask bench-wasm [--runs N] [--rounds R]"
            ),
        }
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| root.join("target"));

    // Sizes of what ships; timings from the same app plus the benchmark hook.
    let built = wasm::build(&target.join("bench-wasm-shipped"))?;
    let pkg = target.join("bench-wasm-pkg");
    std::fs::create_dir_all(&pkg)?;
    wasm::build_artifact(wasm::APP_WITH_BENCH_HOOK, &pkg)?;

    // Per round: native medians, wasm medians (OPERATIONS order), the ratchet through the JS API.
    let mut measured: Vec<Round> = Vec::new();
    let mut node_version = String::new();
    for round in 1..=rounds {
        eprintln!("xtask: bench-wasm round {round} of {rounds}");
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
        let through_js: Vec<f64> = THROUGH_JS
            .iter()
            .map(|(_, key, _)| json_number(&report, key))
            .collect::<Result<_>>()?;
        node_version = json_string(&report, "node").unwrap_or_default();
        measured.push((native, in_wasm, through_js));
    }
    let column = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { measured.iter().map(f).collect() };
    let native: Vec<f64> = (0..OPERATIONS.len())
        .map(|i| median(column(&|m| m.0[i])))
        .collect();
    let in_wasm: Vec<f64> = (0..OPERATIONS.len())
        .map(|i| median(column(&|m| m.1[i])))
        .collect();
    let ratios: Vec<Vec<f64>> = (0..OPERATIONS.len())
        .map(|i| column(&|m| m.1[i] / m.0[i]))
        .collect();
    let position = |op: &str| OPERATIONS.iter().position(|(id, _)| *id == op).unwrap_or(0);
    let ratchet = position(RATCHET);
    let through_js: Vec<f64> = (0..THROUGH_JS.len())
        .map(|j| median(column(&|m| m.2[j])))
        .collect();

    let mut table = format!(
        "{START}\nCommand: `cargo xtask bench-wasm --runs {runs} --rounds {rounds}` (native: \
         criterion medians of `client-web/core/benches/crypto.rs`; wasm: \
         `client-web/wasm/bench/bench.mjs` under Node.js {node_version}, median of {runs} runs \
         after warm-up; same machine, one run of {rounds} interleaved native-then-wasm round(s); \
         times are medians over rounds, each ratio is the median of the per-round ratios, range \
         in brackets).\n\n\
         | operation | native | wasm | wasm / native |\n|---|---|---|---|\n"
    );
    for ((((_, label), n), w), r) in OPERATIONS.iter().zip(&native).zip(&in_wasm).zip(&ratios) {
        table.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            fmt_us(*n),
            fmt_us(*w),
            fmt_ratio(r)
        ));
    }
    for (j, (op, _, label)) in THROUGH_JS.iter().enumerate() {
        let i = position(op);
        table.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            fmt_us(native[i]),
            fmt_us(through_js[j]),
            fmt_ratio(&column(&|m| m.2[j] / m.0[i]))
        ));
    }
    table.push_str(&format!(
        "\nSymmetric ratchet steps (one 256-byte message encrypted and decrypted, on one core): \
         **{:.0} messages/s natively** (target ≥ 200k), **{:.0} messages/s in wasm** ({:.0} \
         through the JS API).\n\nSizes (target for the app: < 300 KiB uncompressed):\n",
        1e6 / native[ratchet],
        1e6 / in_wasm[ratchet],
        1e6 / through_js[0],
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

/// Median of a non-empty list (mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `2.85x` for one round, `2.85x (2.71–2.98)` for several: median and range of the ratios.
fn fmt_ratio(ratios: &[f64]) -> String {
    let m = median(ratios.to_vec());
    if ratios.len() < 2 {
        return format!("{m:.2}x");
    }
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.2}x ({lo:.2}–{hi:.2})")
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
