//! Balancing: the pool of upstream endpoints and least-connections choice among the eligible
//! ones. A [`Lease`] counts one proxied connection until dropped. Eligibility is `ready` (set by
//! the health layer) and not ejected: [`Pool::report`] is the seam where outlier ejection and the
//! circuit breaker (issue #7) plug in; today a failed connect only marks the endpoint not ready
//! until the next successful probe.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};

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
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            active: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn eligible(&self) -> bool {
        self.ready.load(Relaxed)
    }
}

/// What happened when the gateway used an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    ConnectFailed,
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
}

impl Pool {
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

    /// Records how a use of `endpoint` went (the outlier-ejection seam).
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        if outcome == Outcome::ConnectFailed {
            endpoint.failures.fetch_add(1, Relaxed);
            endpoint.ready.store(false, Relaxed);
        }
    }

    /// Whether any endpoint can take a connection.
    pub fn any_ready(&self) -> bool {
        self.snapshot().iter().any(|e| e.eligible())
    }

    /// Prometheus text: per-upstream active connections, totals, failures and readiness.
    pub fn render_metrics(&self) -> String {
        let mut out = String::from(
            "# TYPE chat_gateway_upstream_active gauge\n\
             # TYPE chat_gateway_upstream_connections_total counter\n\
             # TYPE chat_gateway_upstream_connect_failures_total counter\n\
             # TYPE chat_gateway_upstream_ready gauge\n",
        );
        for e in self.snapshot() {
            let a = e.addr;
            out.push_str(&format!(
                "chat_gateway_upstream_active{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_connections_total{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_connect_failures_total{{upstream=\"{a}\"}} {}\n\
                 chat_gateway_upstream_ready{{upstream=\"{a}\"}} {}\n",
                e.active.load(Relaxed),
                e.total.load(Relaxed),
                e.failures.load(Relaxed),
                u8::from(e.eligible())
            ));
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
}
