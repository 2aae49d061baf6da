//! Balancing: the pool of upstream endpoints and least-connections choice among the eligible
//! ones. A [`Lease`] counts one proxied connection until dropped.
//!
//! Eligibility is `ready` (the last probe said the server takes new work) and the endpoint's
//! circuit breaker closed. [`Pool::report`] feeds the breaker (outlier ejection): consecutive
//! failures (connect errors, timeouts, probes that get no answer) past a threshold eject the
//! endpoint for a time that doubles with each ejection (capped), and every connection proxied
//! to it is cut so its clients reconnect elsewhere; after the ejection time the breaker is
//! half-open and the next probe decides: an answer restores it, another failure ejects it again.
//! A server that answers "draining" is not ready but is not a failure: its connections run on.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Counters of the server behind an endpoint, from its `/metrics` (scraped by each probe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    pub connections: i64,
    pub frames_in: u64,
    pub envelopes_stored: u64,
    pub envelopes_delivered: u64,
    /// `chatapp_ready`: 0 while the server drains.
    pub ready: bool,
}

impl ServerCounters {
    /// Reads the counters from a Prometheus text exposition; `None` when `chatapp_ready` is
    /// missing (not a chat-server's `/metrics`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut out = Self::default();
        let mut saw_ready = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.split_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let whole = v.max(0.0) as u64;
            match name {
                "chatapp_connections" => out.connections = v as i64,
                "chatapp_frames_in_total" => out.frames_in = whole,
                "chatapp_envelopes_stored_total" => out.envelopes_stored = whole,
                "chatapp_envelopes_delivered_total" => out.envelopes_delivered = whole,
                "chatapp_ready" => {
                    out.ready = v >= 1.0;
                    saw_ready = true;
                }
                _ => {}
            }
        }
        saw_ready.then_some(out)
    }
}

/// State of an endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal: the endpoint gets connections when ready.
    Closed,
    /// Ejected until the time runs out.
    Open,
    /// Ejection time over: the next probe decides.
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 open, 2 half-open (the `chat_gateway_upstream_breaker` gauge).
    pub fn gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// When the breaker ejects and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that eject an endpoint.
    pub failures_to_eject: u32,
    /// First ejection time; doubled by each ejection in a row.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_eject: 2,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
    /// Ejections since the endpoint last answered (for the doubling).
    ejections_in_row: u32,
    open_until: Option<Instant>,
    /// Since when the endpoint has been out (first ejection of the current streak).
    ejected_since: Option<Instant>,
}

/// One upstream chat-server.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Connections proxied to it right now.
    pub active: AtomicUsize,
    /// Passed its last readiness probe.
    pub ready: AtomicBool,
    /// Connections ever proxied, and connect failures.
    pub total: AtomicU64,
    pub failures: AtomicU64,
    /// Times the breaker ejected it.
    pub ejections: AtomicU64,
    breaker: Mutex<Breaker>,
    /// Bumped on every ejection: proxied connections watch it and end.
    evictions: watch::Sender<u64>,
    /// The server's own counters from the last probe that got them.
    server: Mutex<Option<ServerCounters>>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            active: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                ejections_in_row: 0,
                open_until: None,
                ejected_since: None,
            }),
            evictions: watch::channel(0).0,
            server: Mutex::new(None),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker
            .lock()
            .map(|b| b.state)
            .unwrap_or(BreakerState::Open)
    }

    /// How long the endpoint has been out of rotation by the breaker (zero when closed).
    pub fn ejected_for(&self, now: Instant) -> Duration {
        self.breaker
            .lock()
            .ok()
            .and_then(|b| b.ejected_since)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    pub fn eligible(&self) -> bool {
        self.ready.load(Relaxed) && self.breaker_state() == BreakerState::Closed
    }

    /// Resolves when the breaker ejects this endpoint (for proxied connections to end).
    pub fn evictions(&self) -> watch::Receiver<u64> {
        self.evictions.subscribe()
    }

    pub fn server_counters(&self) -> Option<ServerCounters> {
        self.server.lock().ok().and_then(|s| *s)
    }
}

/// What happened when the gateway used or probed an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A client connection reached it (TCP and TLS).
    Connected,
    /// A client connection could not (refused, reset, timed out).
    ConnectFailed,
    /// A probe got its counters: it answers, and `ready` says whether it takes new work.
    Probed(ServerCounters),
    /// A probe got an answer that is not a success (503 and the like): alive, not ready.
    ProbeRefused,
    /// A probe got no answer in time, or no connection.
    ProbeFailed,
}

/// A connection counted against an endpoint until dropped.
#[derive(Debug)]
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Relaxed);
    }
}

/// The current upstream set.
#[derive(Debug, Default)]
pub struct Pool {
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    breaker: BreakerConfig,
}

impl Pool {
    /// A pool whose breaker follows `breaker`.
    pub fn with_breaker(breaker: BreakerConfig) -> Self {
        Self {
            endpoints: RwLock::default(),
            breaker,
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Makes the set exactly `addrs`: new endpoints start not ready, known ones keep their
    /// counters, vanished ones leave (their open connections run on).
    pub fn set_addresses(&self, addrs: &[SocketAddr]) {
        if let Ok(mut endpoints) = self.endpoints.write() {
            endpoints.retain(|e| addrs.contains(&e.addr));
            for addr in addrs {
                if !endpoints.iter().any(|e| e.addr == *addr) {
                    endpoints.push(Arc::new(Endpoint::new(*addr)));
                }
            }
            endpoints.sort_by_key(|e| e.addr);
        }
    }

    /// The eligible endpoint with the fewest active connections (ties: the one after the last
    /// pick, so equal servers share the load), excluding `skip`; counts the new connection.
    pub fn pick(&self, skip: &[SocketAddr]) -> Option<Lease> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let endpoints = self.snapshot();
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = NEXT.fetch_add(1, Relaxed) % n;
        let chosen = (0..n)
            .map(|i| &endpoints[(start + i) % n])
            .filter(|e| e.eligible() && !skip.contains(&e.addr))
            .min_by_key(|e| e.active.load(Relaxed))?
            .clone();
        chosen.active.fetch_add(1, Relaxed);
        chosen.total.fetch_add(1, Relaxed);
        Some(Lease { endpoint: chosen })
    }

    /// Records how a use or probe of `endpoint` went: readiness, counters and the breaker.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        self.report_at(endpoint, outcome, Instant::now());
    }

    /// [`Pool::report`] at a given time (tests).
    pub fn report_at(&self, endpoint: &Endpoint, outcome: Outcome, now: Instant) {
        let failed = matches!(outcome, Outcome::ConnectFailed | Outcome::ProbeFailed);
        match outcome {
            Outcome::ConnectFailed => {
                endpoint.failures.fetch_add(1, Relaxed);
                endpoint.ready.store(false, Relaxed);
            }
            Outcome::ProbeFailed | Outcome::ProbeRefused => {
                endpoint.ready.store(false, Relaxed);
            }
            Outcome::Probed(counters) => {
                endpoint.ready.store(counters.ready, Relaxed);
                if let Ok(mut s) = endpoint.server.lock() {
                    *s = Some(counters);
                }
            }
            Outcome::Connected => {}
        }
        let Ok(mut b) = endpoint.breaker.lock() else {
            return;
        };
        let is_probe = !matches!(outcome, Outcome::Connected | Outcome::ConnectFailed);
        if b.state == BreakerState::Open && b.open_until.is_some_and(|t| now >= t) && is_probe {
            b.state = BreakerState::HalfOpen;
        }
        if failed {
            b.consecutive_failures = b.consecutive_failures.saturating_add(1);
            let eject = match b.state {
                BreakerState::Closed => b.consecutive_failures >= self.breaker.failures_to_eject,
                BreakerState::HalfOpen => true,
                BreakerState::Open => false,
            };
            if eject {
                b.ejections_in_row = b.ejections_in_row.saturating_add(1);
                let factor = 1u32 << b.ejections_in_row.saturating_sub(1).min(16);
                let time = self
                    .breaker
                    .base_ejection
                    .saturating_mul(factor)
                    .min(self.breaker.max_ejection);
                b.state = BreakerState::Open;
                b.open_until = Some(now + time);
                b.ejected_since.get_or_insert(now);
                endpoint.ejections.fetch_add(1, Relaxed);
                endpoint.evictions.send_modify(|g| *g = g.wrapping_add(1));
                tracing::warn!(upstream = %endpoint.addr, ejection = ?time, "upstream ejected");
            }
        } else {
            // Any answer resets the failure count; an open breaker waits out its time first.
            b.consecutive_failures = 0;
            if b.state == BreakerState::HalfOpen
                || (b.state == BreakerState::Closed && b.ejected_since.is_some())
            {
                b.state = BreakerState::Closed;
                b.open_until = None;
                b.ejected_since = None;
                b.ejections_in_row = 0;
                tracing::info!(upstream = %endpoint.addr, "upstream restored");
            }
        }
    }

    /// Whether any endpoint can take a connection.
    pub fn any_ready(&self) -> bool {
        self.snapshot().iter().any(|e| e.eligible())
    }

    /// Prometheus text: per upstream, the gateway's view (active connections, totals,
    /// failures, readiness, breaker state and ejections) and the server's own counters from
    /// its `/metrics` (connections, frames, envelopes, ready), so one scrape of the gateway
    /// shows the whole cluster.
    pub fn render_metrics(&self) -> String {
        let mut out = String::from(
            "# TYPE chat_gateway_upstream_active gauge\n\
             # TYPE chat_gateway_upstream_connections_total counter\n\
             # TYPE chat_gateway_upstream_connect_failures_total counter\n\
             # TYPE chat_gateway_upstream_ready gauge\n\
             # TYPE chat_gateway_upstream_breaker gauge\n\
             # TYPE chat_gateway_upstream_ejected_seconds gauge\n\
             # TYPE chat_gateway_upstream_ejections_total counter\n\
             # TYPE chat_gateway_upstream_server_connections gauge\n\
             # TYPE chat_gateway_upstream_server_ready gauge\n\
             # TYPE chat_gateway_upstream_server_frames_in_total counter\n\
             # TYPE chat_gateway_upstream_server_envelopes_stored_total counter\n\
             # TYPE chat_gateway_upstream_server_envelopes_delivered_total counter\n",
        );
        let now = Instant::now();
        for e in self.snapshot() {
            let a = e.addr;
            out.push_str(&format!(
                "chat_gateway_upstream_active{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_connections_total{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_connect_failures_total{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_ready{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_breaker{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_ejected_seconds{{upstream=\"{a}\"}} {:.1}\n\
                 chat_gateway_upstream_ejections_total{{upstream=\"{a}\"}} {}\n",
                e.active.load(Relaxed),
                e.total.load(Relaxed),
                e.failures.load(Relaxed),
                u8::from(e.eligible()),
                e.breaker_state().gauge(),
                e.ejected_for(now).as_secs_f64(),
                e.ejections.load(Relaxed),
            ));
            if let Some(c) = e.server_counters() {
                out.push_str(&format!(
                    "chat_gateway_upstream_server_connections{{upstream=\"{a}\"}} {}\n\
                     chat_gateway_upstream_server_ready{{upstream=\"{a}\"}} {}\n\
                     chat_gateway_upstream_server_frames_in_total{{upstream=\"{a}\"}} {}\n\
                     chat_gateway_upstream_server_envelopes_stored_total{{upstream=\"{a}\"}} {}\n\
                     chat_gateway_upstream_server_envelopes_delivered_total{{upstream=\"{a}\"}} {}\n",
                    c.connections,
                    u8::from(c.ready),
                    c.frames_in,
                    c.envelopes_stored,
                    c.envelopes_delivered,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn pool(ports: &[u16]) -> Pool {
        let pool = Pool::default();
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| addr(*p)).collect();
        pool.set_addresses(&addrs);
        for e in pool.snapshot() {
            e.ready.store(true, Relaxed);
        }
        pool
    }

    #[test]
    fn least_connections_spreads_new_connections_evenly() {
        let pool = pool(&[1, 2, 3]);
        let leases: Vec<Lease> = (0..6).map(|_| pool.pick(&[]).expect("lease")).collect();
        for e in pool.snapshot() {
            assert_eq!(e.active.load(Relaxed), 2, "{}", e.addr);
        }
        drop(leases);
        assert!(pool.snapshot().iter().all(|e| e.active.load(Relaxed) == 0));
    }

    #[test]
    fn the_least_loaded_endpoint_wins() {
        let pool = pool(&[1, 2]);
        let busy = pool.snapshot()[0].clone();
        busy.active.store(5, Relaxed);
        for _ in 0..4 {
            let lease = pool.pick(&[]).expect("lease");
            assert_eq!(lease.endpoint.addr, addr(2));
        }
    }

    #[test]
    fn endpoints_that_are_not_ready_or_skipped_get_nothing() {
        let pool = pool(&[1, 2]);
        pool.snapshot()[0].ready.store(false, Relaxed);
        assert_eq!(pool.pick(&[]).expect("lease").endpoint.addr, addr(2));
        assert!(pool.pick(&[addr(2)]).is_none());
    }

    #[test]
    fn a_connect_failure_makes_the_endpoint_ineligible_until_probed() {
        let pool = pool(&[1]);
        let e = pool.snapshot()[0].clone();
        pool.report(&e, Outcome::ConnectFailed);
        assert!(pool.pick(&[]).is_none());
        assert!(!pool.any_ready());
    }

    #[test]
    fn new_addresses_join_unready_and_known_ones_keep_their_counters() {
        let pool = pool(&[1, 2]);
        let _lease = pool.pick(&[addr(2)]).expect("lease");
        pool.set_addresses(&[addr(1), addr(3)]);
        let snap = pool.snapshot();
        assert_eq!(
            snap.iter().map(|e| e.addr).collect::<Vec<_>>(),
            [addr(1), addr(3)]
        );
        assert_eq!(snap[0].active.load(Relaxed), 1);
        assert!(!snap[1].eligible());
    }

    fn failed(pool: &Pool, e: &Endpoint, at: Instant) {
        pool.report_at(e, Outcome::ProbeFailed, at);
    }

    fn answered(pool: &Pool, e: &Endpoint, at: Instant) {
        let counters = ServerCounters {
            ready: true,
            ..ServerCounters::default()
        };
        pool.report_at(e, Outcome::Probed(counters), at);
    }

    #[test]
    fn consecutive_failures_eject_and_cut_proxied_connections() {
        let pool = pool(&[1, 2]);
        let e = pool.snapshot()[0].clone();
        let cut = e.evictions();
        let t0 = Instant::now();
        failed(&pool, &e, t0);
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        failed(&pool, &e, t0 + Duration::from_millis(300));
        assert_eq!(e.breaker_state(), BreakerState::Open);
        assert!(cut.has_changed().unwrap_or(false));
        assert_eq!(e.ejections.load(Relaxed), 1);
        // An answer during the ejection time does not restore it yet.
        answered(&pool, &e, t0 + Duration::from_secs(1));
        assert!(!e.eligible());
    }

    #[test]
    fn half_open_probe_restores_on_an_answer() {
        let pool = pool(&[1]);
        let e = pool.snapshot()[0].clone();
        let t0 = Instant::now();
        failed(&pool, &e, t0);
        failed(&pool, &e, t0);
        answered(&pool, &e, t0 + Duration::from_secs(3));
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        assert!(e.eligible());
        assert_eq!(e.ejected_for(t0 + Duration::from_secs(4)), Duration::ZERO);
    }

    #[test]
    fn half_open_failure_ejects_again_for_twice_as_long() {
        let pool = pool(&[1]);
        let e = pool.snapshot()[0].clone();
        let t0 = Instant::now();
        failed(&pool, &e, t0);
        failed(&pool, &e, t0);
        failed(&pool, &e, t0 + Duration::from_secs(2)); // half-open trial fails
        assert_eq!(e.breaker_state(), BreakerState::Open);
        answered(&pool, &e, t0 + Duration::from_secs(5)); // 4 s ejection not over
        assert_eq!(e.breaker_state(), BreakerState::Open);
        answered(&pool, &e, t0 + Duration::from_secs(6));
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        assert_eq!(e.ejections.load(Relaxed), 2);
    }

    #[test]
    fn a_draining_server_is_not_ready_but_not_ejected() {
        let pool = pool(&[1]);
        let e = pool.snapshot()[0].clone();
        let draining = ServerCounters {
            connections: 7,
            ready: false,
            ..ServerCounters::default()
        };
        pool.report(&e, Outcome::Probed(draining));
        pool.report(&e, Outcome::ProbeRefused);
        pool.report(&e, Outcome::ProbeRefused);
        assert!(!e.eligible());
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        assert_eq!(e.server_counters().map(|c| c.connections), Some(7));
    }

    #[test]
    fn server_counters_are_read_from_metrics_text() {
        let text = "# HELP chatapp_connections x\n# TYPE chatapp_connections gauge\n\
                    chatapp_connections 12\nchatapp_ready 1\nchatapp_frames_in_total 40\n\
                    chatapp_envelopes_stored_total 9\nchatapp_envelopes_delivered_total 8\n";
        let c = ServerCounters::parse(text).expect("counters");
        assert_eq!(
            c,
            ServerCounters {
                connections: 12,
                frames_in: 40,
                envelopes_stored: 9,
                envelopes_delivered: 8,
                ready: true
            }
        );
        assert_eq!(ServerCounters::parse("not metrics"), None);
    }

    #[test]
    fn metrics_show_the_breaker_and_the_server_counters() {
        let pool = pool(&[1]);
        let e = pool.snapshot()[0].clone();
        answered(&pool, &e, Instant::now());
        let text = pool.render_metrics();
        assert!(text.contains("chat_gateway_upstream_breaker{upstream=\"10.0.0.1:1\"} 0"));
        assert!(text.contains("chat_gateway_upstream_server_ready{upstream=\"10.0.0.1:1\"} 1"));
    }
}
