//! How steadily this machine's cores run: one thread per core does fixed work in a loop and
//! counts how much it got done in every 10 ms slice.
//!
//! On a quiet machine of its own, every slice gets about as much done as a fast one. On a
//! shared host (a virtual machine whose cores the host also gives to others, or slows down),
//! stretches of slices get far less done, on every core at once. A system kept 70-80% busy
//! falls behind in such a stretch, whatever the system is, and its p99 grows: session 24's
//! machine ran its cores at 8-77% of their speed for 20-310 ms, a stretch every 0.9-1.5 s, and
//! NATS and the bare relay missed 5 ms at half their maximum there as chat-server did
//! (docs/BENCHMARKS.md).
//! `cargo xtask bench-peers` probes before and after its runs and prints what it found under
//! the tables; `cargo xtask steadiness` probes alone.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The length of a slice.
const SLICE: Duration = Duration::from_millis(10);
/// A slice that got less than this share of a fast slice's work done is slow (see
/// [`summarize`]).
const SLOW: f64 = 0.8;

/// What a probe found, over every core's slices.
#[derive(Debug, Clone, PartialEq)]
pub struct Steadiness {
    pub threads: usize,
    pub seconds: f64,
    /// Slices counted, over all threads.
    pub slices: usize,
    /// Slices that got less than [`SLOW`] of a fast slice's work done.
    pub slow: usize,
    /// The work the slices fell short of a fast slice by, on average (%).
    pub lost_pct: f64,
    /// Runs of consecutive slow slices in one thread.
    pub stretches: usize,
    /// The longest such run.
    pub longest_ms: f64,
}

/// Spins one thread per core for `duration`.
pub fn probe(threads: usize, duration: Duration) -> Steadiness {
    let spinners: Vec<_> = (0..threads.max(1))
        .map(|_| thread::spawn(move || spin(duration)))
        .collect();
    // A spinner does arithmetic and reads the clock; should one panic all the same, its
    // slices are missing and the others still count.
    let rates: Vec<Vec<f64>> = spinners
        .into_iter()
        .map(|s| s.join().unwrap_or_default())
        .collect();
    summarize(&rates, SLICE, duration)
}

/// Work done per second in each full slice of one thread's run.
fn spin(duration: Duration) -> Vec<f64> {
    let start = Instant::now();
    let mut slice_start = start;
    let mut units = 0u64;
    let mut x = 1u64;
    let mut rates = Vec::with_capacity((duration.as_millis() / SLICE.as_millis()) as usize + 1);
    loop {
        // One unit: a chain of dependent multiply-adds, a fraction of a microsecond.
        for _ in 0..256 {
            x = black_box(
                x.wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407),
            );
        }
        units += 1;
        let now = Instant::now();
        let length = now - slice_start;
        if length >= SLICE {
            rates.push(units as f64 / length.as_secs_f64());
            units = 0;
            slice_start = now;
            if now - start >= duration {
                return rates;
            }
        }
    }
}

/// Compares every slice of every thread with a fast slice: the 90th percentile of all of them.
/// Not the fastest: one slice in which the host ran a core faster than it ever does again would
/// make every other slice look slow.
fn summarize(rates: &[Vec<f64>], slice: Duration, duration: Duration) -> Steadiness {
    let mut sorted: Vec<f64> = rates.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let fast = sorted
        .get(sorted.len().saturating_sub(1) * 9 / 10)
        .copied()
        .unwrap_or(0.0);
    let slice_ms = slice.as_secs_f64() * 1000.0;
    let mut out = Steadiness {
        threads: rates.len(),
        seconds: duration.as_secs_f64(),
        slices: 0,
        slow: 0,
        lost_pct: 0.0,
        stretches: 0,
        longest_ms: 0.0,
    };
    if fast <= 0.0 {
        return out;
    }
    let mut shortfall = 0.0;
    for thread in rates {
        let mut run = 0usize;
        for &rate in thread {
            out.slices += 1;
            shortfall += (1.0 - rate / fast).max(0.0);
            if rate < SLOW * fast {
                out.slow += 1;
                if run == 0 {
                    out.stretches += 1;
                }
                run += 1;
                out.longest_ms = out.longest_ms.max(run as f64 * slice_ms);
            } else {
                run = 0;
            }
        }
    }
    if out.slices > 0 {
        out.lost_pct = 100.0 * shortfall / out.slices as f64;
    }
    out
}

impl Steadiness {
    /// One sentence for a reader: how many slices were slow, what was lost, the longest
    /// stretch.
    pub fn describe(&self) -> String {
        let slow_pct = if self.slices > 0 {
            100.0 * self.slow as f64 / self.slices as f64
        } else {
            0.0
        };
        format!(
            "{:.1}% of {} slices of {} ms got under {:.0}% of a fast slice's work done (the \
             90th percentile), {:.1}% of the work lost in all, {} slow stretches, the longest \
             {:.0} ms ({} spinning threads, {:.0} s)",
            slow_pct,
            self.slices,
            SLICE.as_millis(),
            SLOW * 100.0,
            self.lost_pct,
            self.stretches,
            self.longest_ms,
            self.threads,
            self.seconds
        )
    }
}

/// `cargo xtask steadiness [--seconds N] [--threads N]`.
pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = 10u64;
    let mut threads = thread::available_parallelism().map_or(1, |n| n.get());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => seconds = value()?.parse().context("--seconds: a whole number")?,
            "--threads" => threads = value()?.parse().context("--threads: a whole number")?,
            other => bail!("unknown argument {other} (--seconds N, --threads N)"),
        }
    }
    if seconds == 0 || threads == 0 {
        bail!("--seconds and --threads must be at least 1");
    }
    eprintln!("xtask: spinning {threads} threads for {seconds} s");
    println!(
        "{}",
        probe(threads, Duration::from_secs(seconds)).describe()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_millis(10);
    const D: Duration = Duration::from_secs(1);

    #[test]
    fn a_steady_machine_has_no_slow_slice() {
        let s = summarize(&[vec![100.0, 99.0, 100.0], vec![98.0, 100.0, 97.0]], S, D);
        assert_eq!((s.slices, s.slow, s.stretches), (6, 0, 0));
        assert_eq!(s.longest_ms, 0.0);
        assert!((s.lost_pct - 1.0).abs() < 1e-9, "{}", s.lost_pct);
    }

    #[test]
    fn slow_slices_are_counted_in_stretches_per_thread() {
        // Thread 0: a stretch of three slow slices and one of one; thread 1: one of two.
        let rates = [
            vec![100.0, 50.0, 10.0, 70.0, 100.0, 20.0],
            vec![90.0, 79.0, 60.0, 95.0],
        ];
        let s = summarize(&rates, S, D);
        assert_eq!((s.slices, s.slow, s.stretches), (10, 6, 3));
        assert_eq!(s.longest_ms, 30.0);
        // Shortfalls: 0 .5 .9 .3 0 .8 | .1 .21 .4 .05 = 3.26 over 10 slices.
        assert!((s.lost_pct - 32.6).abs() < 1e-9, "{}", s.lost_pct);
        assert!(
            s.describe().contains("60.0% of 10 slices"),
            "{}",
            s.describe()
        );
    }

    #[test]
    fn one_fast_slice_does_not_make_the_rest_slow() {
        let mut thread = vec![100.0; 19];
        thread.push(200.0);
        let s = summarize(&[thread], S, D);
        assert_eq!((s.slices, s.slow, s.stretches), (20, 0, 0));
        assert_eq!(s.lost_pct, 0.0);
    }

    #[test]
    fn no_slices_describe_without_dividing_by_zero() {
        let s = summarize(&[vec![], vec![]], S, D);
        assert_eq!((s.slices, s.slow), (0, 0));
        assert!(s.describe().starts_with("0.0% of 0 slices"));
    }

    #[test]
    fn a_short_probe_counts_a_slice_every_10_ms_on_each_thread() {
        let s = probe(2, Duration::from_millis(200));
        assert_eq!(s.threads, 2);
        // 20 slices per thread at most; a busy test machine may stretch a slice.
        assert!((2..=40).contains(&s.slices), "{} slices", s.slices);
    }
}
