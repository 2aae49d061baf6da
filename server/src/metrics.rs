//! Prometheus metrics (`/metrics`), names prefixed `chatapp_`. Plain atomics and one fixed-bucket
//! histogram: nothing here allocates on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the store latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Writes one counter in Prometheus text.
pub(crate) fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        value.load(Relaxed)
    );
}

/// Every metric of one server process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub frames_in: AtomicU64,
    /// Batches the received frames were handled in (`frames_in / this` = frames per batch).
    pub frame_batches: AtomicU64,
    pub frames_out: AtomicU64,
    pub envelopes_stored: AtomicU64,
    pub envelopes_duplicate: AtomicU64,
    pub envelopes_delivered: AtomicU64,
    pub envelopes_acked: AtomicU64,
    pub registrations: AtomicU64,
    pub logins: AtomicU64,
    pub errors_sent: AtomicU64,
    pub store_latency: Histogram,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self, ready: bool) -> String {
        let mut out = String::with_capacity(2048);
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "chatapp_connections",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        gauge(
            &mut out,
            "chatapp_ready",
            "1 when the server accepts new work, 0 while draining.",
            i64::from(ready),
        );
        let stored = self.envelopes_stored.load(Relaxed);
        let acked = self.envelopes_acked.load(Relaxed);
        gauge(
            &mut out,
            "chatapp_mailbox_depth",
            "Envelopes stored by this process and not yet acknowledged.",
            i64::try_from(stored.saturating_sub(acked)).unwrap_or(i64::MAX),
        );
        counter(
            &mut out,
            "chatapp_connections_total",
            "WebSocket connections accepted.",
            &self.connections_total,
        );
        counter(
            &mut out,
            "chatapp_frames_in_total",
            "Frames received from clients.",
            &self.frames_in,
        );
        counter(
            &mut out,
            "chatapp_frame_batches_total",
            "Batches the received frames were handled in (frames that arrived together on one socket).",
            &self.frame_batches,
        );
        counter(
            &mut out,
            "chatapp_frames_out_total",
            "Frames sent to clients.",
            &self.frames_out,
        );
        counter(
            &mut out,
            "chatapp_envelopes_stored_total",
            "Envelopes durably stored.",
            &self.envelopes_stored,
        );
        counter(
            &mut out,
            "chatapp_envelopes_duplicate_total",
            "Resent envelopes recognised by message id and not stored again.",
            &self.envelopes_duplicate,
        );
        counter(
            &mut out,
            "chatapp_envelopes_delivered_total",
            "Envelopes pushed to devices.",
            &self.envelopes_delivered,
        );
        counter(
            &mut out,
            "chatapp_envelopes_acked_total",
            "Envelopes acknowledged and deleted.",
            &self.envelopes_acked,
        );
        counter(
            &mut out,
            "chatapp_registrations_total",
            "Devices registered.",
            &self.registrations,
        );
        counter(
            &mut out,
            "chatapp_logins_total",
            "Successful logins.",
            &self.logins,
        );
        counter(
            &mut out,
            "chatapp_errors_sent_total",
            "Error frames sent.",
            &self.errors_sent,
        );
        self.store_latency.render(
            &mut out,
            "chatapp_store_latency_seconds",
            "Latency of store operations.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_an_observation_in_every_bucket_at_or_above_it() {
        let m = Metrics::default();
        m.store_latency.observe(Duration::from_micros(700));
        let text = m.render(true);
        assert!(
            text.contains("chatapp_store_latency_seconds_bucket{le=\"0.0005\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("chatapp_store_latency_seconds_bucket{le=\"0.001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chatapp_store_latency_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn mailbox_depth_is_stored_minus_acked() {
        let m = Metrics::default();
        m.envelopes_stored.store(5, Relaxed);
        m.envelopes_acked.store(2, Relaxed);
        assert!(m.render(true).contains("chatapp_mailbox_depth 3"));
    }
}
