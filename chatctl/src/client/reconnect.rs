//! Reconnecting: when the server closes with the reconnect code (a drain, a shutdown), or the
//! connection is lost or hangs, a client waits a full-jitter backoff (a random time between 0
//! and `min(cap, base × 2^attempt)`, so clients cut off together do not come back together),
//! connects again and logs in. The server then delivers the mailbox again from the first
//! envelope not acknowledged: the client resumes from its last acknowledged sequence, and its
//! record of seen message ids keeps what it shows exactly-once.

use std::time::Duration;

use anyhow::{Result, anyhow};
use chat_core::wire::CloseCode;
use rand_core::{OsRng, RngCore};

use super::Client;
use super::conn::{Closed, Connection};

/// Full-jitter exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts before giving up.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_attempts: 30,
        }
    }
}

impl Backoff {
    /// The longest wait before attempt `attempt` (from 0): `min(cap, base × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_micros()).unwrap_or(u64::MAX);
        if ceiling == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(OsRng.next_u64() % (ceiling + 1))
    }
}

/// Whether an error of a connection means "connect again" (closed with the reconnect or
/// overloaded code, closed without a code, lost, timed out) rather than a refusal to report.
pub fn is_transient(err: &anyhow::Error) -> bool {
    if let Some(closed) = err.downcast_ref::<Closed>() {
        return closed.code.is_none_or(CloseCode::should_reconnect);
    }
    if err.downcast_ref::<super::conn::ServerError>().is_some() {
        return false;
    }
    // Connection errors, timeouts and failed handshakes are all worth another try.
    true
}

impl Client {
    /// Connects again with full-jitter backoff and logs in; returns the attempts it took.
    /// Deliveries start again from the first envelope not acknowledged.
    pub async fn reconnect(&mut self, backoff: &Backoff) -> Result<u32> {
        let mut last = None;
        for attempt in 0..backoff.max_attempts.max(1) {
            tokio::time::sleep(backoff.delay(attempt)).await;
            match Connection::connect(&self.options.server, &self.options.ca).await {
                Ok(conn) => {
                    self.conn = conn;
                    match self.login().await {
                        Ok(()) => return Ok(attempt + 1),
                        Err(e) => last = Some(e),
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow!(
            "{} could not reconnect to {} after {} attempts: {:#}; is the server (or the gateway) up? (`chatctl ps`)",
            self.name,
            self.options.server,
            backoff.max_attempts,
            last.unwrap_or_else(|| anyhow!("no attempt made"))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_attempts: 5,
        };
        let ceilings: Vec<u128> = (0..6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_ceiling() {
        let b = Backoff::default();
        for attempt in 0..10 {
            for _ in 0..50 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
        let spread: std::collections::BTreeSet<Duration> = (0..20).map(|_| b.delay(6)).collect();
        assert!(spread.len() > 10, "jitter spreads the waits");
    }

    #[test]
    fn reconnect_codes_and_lost_connections_are_transient_refusals_are_not() {
        let reconnect = anyhow::Error::from(Closed {
            code: Some(CloseCode::Reconnect),
            reason: "draining".into(),
        });
        assert!(is_transient(&reconnect));
        let lost = anyhow::Error::from(Closed {
            code: None,
            reason: "connection lost".into(),
        });
        assert!(is_transient(&lost));
        let auth = anyhow::Error::from(Closed {
            code: Some(CloseCode::AuthFailed),
            reason: "no".into(),
        });
        assert!(!is_transient(&auth));
        assert!(is_transient(&anyhow!(
            "no answer from the server within 5s"
        )));
    }
}
