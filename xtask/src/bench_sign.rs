//! `cargo xtask bench-sign [--size-mb N] [--runs N]`: release signing against the minisign CLI.
//!
//! Builds `chatctl` in release mode, writes a tree of N MB (100 files) and one file of the same
//! size, then times, interleaved in one run: `chatctl sign` + `chatctl verify` of the tree
//! against `minisign -S` + `minisign -V` of the single file. Prints medians and per-byte ratios
//! and rewrites the `bench-sign` section of docs/BENCHMARKS.md.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{status, workspace_root};

const START: &str = "<!-- bench-sign:start -->";
const END: &str = "<!-- bench-sign:end -->";

pub fn run(args: &[String]) -> Result<()> {
    let mut size_mb: u64 = 200;
    let mut runs: usize = 5;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--size-mb" => size_mb = it.next().context("--size-mb N")?.parse()?,
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let root = workspace_root();
    status(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "--package", "chatctl"]),
    )?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| root.join("target"));
    let chatctl = target.join("release/chatctl");

    let work = std::env::temp_dir().join(format!("chatapp-bench-sign-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("tree"))?;
    let file_count = 100u64;
    let per_file = size_mb * 1024 * 1024 / file_count;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut single = fs::File::create(work.join("single.bin"))?;
    for i in 0..file_count {
        let data = pseudo_random(per_file as usize, &mut seed);
        fs::write(work.join("tree").join(format!("f{i:03}.bin")), &data)?;
        std::io::Write::write_all(&mut single, &data)?;
    }
    drop(single);
    let bytes = per_file * file_count;

    quiet(Command::new(&chatctl).current_dir(&work).args([
        "keys",
        "init",
        "--dir",
        "keys",
        "--unencrypted",
    ]))?;
    quiet(
        Command::new("minisign")
            .current_dir(&work)
            .args(["-G", "-W", "-p", "mini.pub", "-s", "mini.key"]),
    )?;

    let mut samples: [Vec<Duration>; 4] = Default::default();
    for _ in 0..runs {
        samples[0].push(time(Command::new(&chatctl).current_dir(&work).args([
            "sign",
            "--key",
            "keys/release.key",
            "--version",
            "1.0.0",
            "tree",
        ]))?);
        samples[1].push(time(Command::new(&chatctl).current_dir(&work).args([
            "verify",
            "--pubkey",
            "keys/release.pub",
            "tree",
        ]))?);
        samples[2].push(time(Command::new("minisign").current_dir(&work).args([
            "-S",
            "-s",
            "mini.key",
            "-m",
            "single.bin",
        ]))?);
        samples[3].push(time(Command::new("minisign").current_dir(&work).args([
            "-Vq",
            "-p",
            "mini.pub",
            "-m",
            "single.bin",
        ]))?);
    }
    let _ = fs::remove_dir_all(&work);
    let med: Vec<f64> = samples
        .iter_mut()
        .map(|s| median(s).as_secs_f64() * 1000.0)
        .collect();
    let mb = bytes as f64 / (1024.0 * 1024.0);
    let minisign_version = Command::new("minisign")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let table = format!(
        "{START}\nCommand: `cargo xtask bench-sign --size-mb {size_mb} --runs {runs}` \
         ({file_count} files of {per} KiB for chatctl, one {mb:.0} MiB file for {minisign_version}; \
         medians of {runs} interleaved runs, page cache warm).\n\n\
         | operation | chatctl (tree) | minisign CLI (one file) | time ratio chatctl / minisign (below 1 = chatctl faster) |\n\
         |---|---|---|---|\n\
         | sign | {:.0} ms ({:.0} MiB/s) | {:.0} ms ({:.0} MiB/s) | {:.2}x |\n\
         | verify | {:.0} ms ({:.0} MiB/s) | {:.0} ms ({:.0} MiB/s) | {:.2}x |\n\
         | sign + verify | {:.0} ms | {:.0} ms | {:.2}x |\n{END}",
        med[0],
        mb / med[0] * 1000.0,
        med[2],
        mb / med[2] * 1000.0,
        med[0] / med[2],
        med[1],
        mb / med[1] * 1000.0,
        med[3],
        mb / med[3] * 1000.0,
        med[1] / med[3],
        med[0] + med[1],
        med[2] + med[3],
        (med[0] + med[1]) / (med[2] + med[3]),
        per = per_file / 1024,
    );
    println!("{table}");
    rewrite_section(&root.join("docs/BENCHMARKS.md"), START, END, &table)?;
    Ok(())
}

/// Replaces the text between the markers `start` and `end` (inclusive) or appends it.
pub fn rewrite_section(path: &Path, start: &str, end: &str, section: &str) -> Result<()> {
    let doc = fs::read_to_string(path).unwrap_or_default();
    let updated = match (doc.find(start), doc.find(end)) {
        (Some(s), Some(e)) if e > s => format!("{}{section}{}", &doc[..s], &doc[e + end.len()..]),
        _ => format!("{doc}\n{section}\n"),
    };
    fs::write(path, updated).with_context(|| format!("cannot write {}", path.display()))
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    quiet(cmd)?;
    Ok(start.elapsed())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Incompressible filler (xorshift64*), not for cryptography.
fn pseudo_random(len: usize, state: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
