//! Delivery notifications: wakes the delivery loop of a device when its mailbox receives an
//! envelope, on this instance or, through NATS, on any instance sharing the store.
//!
//! In-process ([`Backplane::in_process`], the embedded store): a `Notify` per mailbox with a
//! connected session. NATS ([`Backplane::nats`]): the same, plus core NATS pub/sub on
//! `chatapp.mail.<hex username>.<device>` (see [`crate::store::nats::notify_subject`]); an
//! instance subscribes to a mailbox's subject while a session of that device is connected to it,
//! and a store append publishes on it. Notifications carry nothing but "look again": the store
//! is the truth, so a lost notification only delays delivery until the next one or the
//! resync interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::store::MailboxId;
use crate::store::nats::notify_subject;

/// With NATS, delivery loops also look at the store this often, in case a notification was lost
/// (core NATS is at-most-once, e.g. across a reconnect).
pub const NATS_RESYNC_INTERVAL: Duration = Duration::from_secs(10);

struct Waiter {
    notify: Arc<Notify>,
    /// Forwards NATS notifications of this mailbox to `notify`; aborted on release.
    forward: Option<JoinHandle<()>>,
}

/// Where delivery notifications go; one per server process.
pub struct Backplane {
    waiters: Mutex<HashMap<MailboxId, Waiter>>,
    nats: Option<async_nats::Client>,
}

impl std::fmt::Debug for Backplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backplane")
            .field("nats", &self.nats.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Backplane {
    fn default() -> Self {
        Self::in_process()
    }
}

impl Backplane {
    /// Notifications within this process only (one instance, embedded store).
    pub fn in_process() -> Self {
        Self {
            waiters: Mutex::new(HashMap::new()),
            nats: None,
        }
    }

    /// Notifications across every instance connected to the NATS server at `url`.
    pub async fn nats(url: &str) -> Result<Self, async_nats::ConnectError> {
        // no_echo: this instance wakes its own sessions directly, not through the server.
        let client = async_nats::ConnectOptions::new()
            .name("chat-server backplane")
            .no_echo()
            .connect(url)
            .await?;
        Ok(Self {
            waiters: Mutex::new(HashMap::new()),
            nats: Some(client),
        })
    }

    /// How often a delivery loop should look at the store without being notified.
    pub fn resync_interval(&self) -> Option<Duration> {
        self.nats.as_ref().map(|_| NATS_RESYNC_INTERVAL)
    }

    /// The notifier of a mailbox (created on first use). With NATS, returns once the server
    /// has the subscription, so no notification published after this returns is missed.
    pub async fn subscribe(&self, mailbox: &MailboxId) -> Arc<Notify> {
        let (notify, fresh) = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            match waiters.get(mailbox) {
                Some(w) => (w.notify.clone(), false),
                None => {
                    let notify = Arc::new(Notify::new());
                    waiters.insert(
                        mailbox.clone(),
                        Waiter {
                            notify: notify.clone(),
                            forward: None,
                        },
                    );
                    (notify, true)
                }
            }
        };
        let Some(client) = self.nats.as_ref().filter(|_| fresh) else {
            return notify;
        };
        let subject = notify_subject(mailbox);
        let subscriber = match client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %subject, "cannot subscribe to deliveries");
                return notify;
            }
        };
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, %subject, "cannot confirm a delivery subscription");
        }
        let forward = {
            let notify = Arc::downgrade(&notify);
            tokio::spawn(async move {
                let mut subscriber = subscriber;
                while subscriber.next().await.is_some() {
                    match notify.upgrade() {
                        Some(n) => n.notify_one(),
                        None => break,
                    }
                }
            })
        };
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        match waiters.get_mut(mailbox) {
            Some(w) if Arc::ptr_eq(&w.notify, &notify) => w.forward = Some(forward),
            // Released meanwhile.
            _ => forward.abort(),
        }
        notify
    }

    /// Drops the notifier (and the NATS subscription) when no session holds it any more.
    pub fn release(&self, mailbox: &MailboxId) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters
            .get(mailbox)
            .is_some_and(|w| Arc::strong_count(&w.notify) <= 1)
        {
            if let Some(Waiter {
                forward: Some(task),
                ..
            }) = waiters.remove(mailbox)
            {
                task.abort();
            }
        }
    }

    /// A message was stored in `mailbox`: wake its sessions here and on every other instance.
    pub async fn notify(&self, mailbox: &MailboxId) {
        {
            let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = waiters.get(mailbox) {
                w.notify.notify_one();
            }
        }
        if let Some(client) = &self.nats {
            let subject = notify_subject(mailbox);
            if let Err(e) = client.publish(subject.clone(), Default::default()).await {
                tracing::warn!(error = %e, %subject, "cannot publish a delivery notification");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_notify_wakes_a_subscribed_mailbox_only() {
        let backplane = Backplane::in_process();
        let bob = MailboxId::new("bob", 1);
        let notify = backplane.subscribe(&bob).await;
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        backplane.notify(&MailboxId::new("bob", 2)).await;
        backplane.notify(&bob).await;
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn released_mailbox_is_forgotten_when_no_session_holds_it() {
        let backplane = Backplane::in_process();
        let bob = MailboxId::new("bob", 1);
        let notify = backplane.subscribe(&bob).await;
        backplane.release(&bob);
        assert_eq!(
            backplane.waiters.lock().expect("lock").len(),
            1,
            "still held"
        );
        drop(notify);
        backplane.release(&bob);
        assert!(backplane.waiters.lock().expect("lock").is_empty());
    }
}
