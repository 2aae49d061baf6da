//! The chat-server driver: real `chatctl` clients (registered, directory-checked, sessions set
//! up by a first real message), then the measured traffic on the same sockets with real Double
//! Ratchet encryption (`--raw`: the payload as the envelope, the relay alone).
//!
//! Fan-out is pairwise: one ratchet session and one envelope per member, as the native client
//! sends to several devices.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chat_core::identity::DeviceKeys;
use chat_core::ratchet::Session;
use chat_core::wire::{ClientFrame, Envelope, ServerFrame};
use chatctl::client::conn::{Closed, Connection};
use chatctl::client::{Client, ClientOptions, DEVICE_ID};
use rand_core::{OsRng, RngCore};

use super::load::{Flow, Inbox, Outbox};

/// Receivers acknowledge (let the server delete) every this many deliveries.
const ACK_EVERY: u64 = 32;

/// The sending client of a flow, with a session per receiver (`None` when raw).
pub struct ChatOutbox {
    client: Client,
    to: Vec<(String, Option<Session>)>,
    unacked: u64,
    acked: u64,
    ids: MessageIds,
}

/// Message ids of one sender: a random 8-byte prefix and a counter. An id only has to be unique
/// (the server deduplicates by it); drawing 16 bytes from the OS for each message cost the
/// load generator a `getrandom` call per message, which no other driver makes.
struct MessageIds {
    prefix: [u8; 8],
    next: u64,
}

impl MessageIds {
    fn new() -> Self {
        let mut prefix = [0u8; 8];
        OsRng.fill_bytes(&mut prefix);
        Self { prefix, next: 0 }
    }

    fn next(&mut self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.prefix);
        id[8..].copy_from_slice(&self.next.to_be_bytes());
        self.next += 1;
        id
    }
}

pub struct ChatInbox {
    client: Client,
    session: Option<Session>,
    last_acked: u64,
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Closed>().is_none() && e.to_string().starts_with("no answer")
}

impl ChatOutbox {
    fn count(&mut self, frame: &ServerFrame) -> Result<()> {
        match frame {
            ServerFrame::SendAck { .. } => {
                self.unacked = self.unacked.saturating_sub(1);
                self.acked += 1;
                Ok(())
            }
            ServerFrame::Error { code, message, .. } => bail!("server error {code}: {message}"),
            _ => Ok(()),
        }
    }
}

impl Outbox for ChatOutbox {
    async fn send(&mut self, body: Vec<u8>) -> Result<()> {
        for (name, session) in &mut self.to {
            let message = match session {
                Some(s) => s.encrypt(&body, &mut OsRng)?,
                None => body.clone(),
            };
            let message_id = self.ids.next();
            self.client
                .conn
                .feed(&ClientFrame::Send {
                    message_id,
                    to_user: name.clone(),
                    to_device: DEVICE_ID,
                    envelope: Envelope::RatchetMessage { message }.encode(),
                })
                .await?;
            self.unacked += 1;
        }
        // Collect the acks that already arrived, without waiting.
        while let Some(frame) = self.client.conn.try_next_frame()? {
            self.count(&frame)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.client.conn.flush().await
    }

    async fn finish(&mut self) -> Result<u64> {
        while self.unacked > 0 {
            let frame = self
                .client
                .conn
                .next_frame(Duration::from_secs(15))
                .await
                .context("waiting for the last SendAcks")?;
            self.count(&frame)?;
        }
        Ok(self.acked)
    }
}

impl Inbox for ChatInbox {
    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        loop {
            let frame = match self.client.conn.next_frame(timeout).await {
                Ok(f) => f,
                Err(e) if is_timeout(&e) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let ServerFrame::Deliver { seq, envelope, .. } = frame else {
                continue;
            };
            let Ok(Envelope::RatchetMessage { message }) = Envelope::decode(&envelope) else {
                bail!("unexpected envelope kind");
            };
            let body = match &mut self.session {
                Some(s) => s.decrypt(&message)?,
                None => message,
            };
            if seq >= self.last_acked + ACK_EVERY {
                self.client
                    .conn
                    .send(&ClientFrame::Ack { up_to_seq: seq })
                    .await?;
                self.last_acked = seq;
            }
            return Ok(Some(body));
        }
    }
}

async fn register_all(opts: &ClientOptions, names: Vec<String>) -> Result<Vec<Client>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.into_iter().enumerate() {
        let opts = opts.clone();
        tasks.spawn(async move {
            let c = Client::register(&opts, &name)
                .await
                .with_context(|| format!("cannot register {name}"));
            (i, c)
        });
    }
    let mut out: Vec<Option<Client>> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, client) = done.context("a registration panicked")?;
        if out.len() <= i {
            out.resize_with(i + 1, || None);
        }
        out[i] = Some(client?);
    }
    out.into_iter()
        .map(|c| c.ok_or_else(|| anyhow!("a registration is missing")))
        .collect()
}

/// Registers `senders` senders with `fanout` receivers each, sets up every session with one
/// real (directory-checked) message and a reply, and hands out the flows. Flows are set up
/// concurrently: each waits out the receive timeouts of its own warm-ups.
pub async fn flows(
    opts: &ClientOptions,
    senders: usize,
    fanout: usize,
    raw: bool,
) -> Result<Vec<Flow<ChatOutbox, ChatInbox>>> {
    let tag = super::load::run_tag();
    let bar = chatctl::progress::spinner(format!("registering {} clients", senders * (1 + fanout)));
    let mut names = Vec::new();
    for s in 0..senders {
        names.push(format!("bench{tag}s{s}"));
        for r in 0..fanout {
            names.push(format!("bench{tag}s{s}r{r}"));
        }
    }
    let mut clients = register_all(opts, names).await?.into_iter();
    bar.set_message(format!("setting up the sessions of {senders} senders"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..senders {
        let sender = clients.next().ok_or_else(|| anyhow!("missing sender"))?;
        let receivers: Vec<Client> = clients.by_ref().take(fanout).collect();
        tasks.spawn(async move { (i, set_up_flow(sender, receivers, raw).await) });
    }
    let mut out: Vec<Option<Flow<ChatOutbox, ChatInbox>>> = (0..senders).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, flow) = done.context("setting up a flow panicked")?;
        out[i] = Some(flow?);
    }
    bar.finish_and_clear();
    out.into_iter()
        .map(|f| f.ok_or_else(|| anyhow!("a flow is missing")))
        .collect()
}

/// One flow: a warm-up message from the sender to each receiver and a reply back, then the
/// sessions both ends hold (none when `raw`).
async fn set_up_flow(
    mut sender: Client,
    mut receivers: Vec<Client>,
    raw: bool,
) -> Result<Flow<ChatOutbox, ChatInbox>> {
    let mut to = Vec::new();
    let mut inboxes = Vec::new();
    for receiver in &mut receivers {
        sender.send_text(&receiver.name, "warm-up").await?;
        let got = receiver.receive(Duration::from_millis(300)).await?;
        if got.len() != 1 {
            bail!("the warm-up message to {} did not arrive", receiver.name);
        }
        // A reply completes the handshake, as in any conversation: until the sender has heard
        // back, each of its messages carries the X3DH header (about 170 bytes).
        receiver.send_text(&sender.name, "warm-up reply").await?;
        let got = sender.receive(Duration::from_millis(300)).await?;
        if got.len() != 1 {
            bail!("the warm-up reply from {} did not arrive", receiver.name);
        }
        let session = session_with(&sender, &receiver.name, raw)?;
        to.push((receiver.name.clone(), session));
    }
    for receiver in receivers {
        let session = session_with(&receiver, &sender.name, raw)?;
        inboxes.push(ChatInbox {
            client: receiver,
            session,
            last_acked: 0,
        });
    }
    Ok(Flow {
        outbox: ChatOutbox {
            client: sender,
            to,
            unacked: 0,
            acked: 0,
            ids: MessageIds::new(),
        },
        inboxes,
    })
}

/// The session `client` holds with `peer` after the warm-up (`None` when `raw`).
fn session_with(client: &Client, peer: &str, raw: bool) -> Result<Option<Session>> {
    if raw {
        return Ok(None);
    }
    client
        .load_session(peer, DEVICE_ID)?
        .map(Some)
        .ok_or_else(|| anyhow!("no session with {peer} after the warm-up"))
}

/// A registered user whose keys can log in on any number of sockets.
pub struct LoginIdentity {
    pub name: String,
    keys: DeviceKeys,
}

impl LoginIdentity {
    /// Registers a fresh user (its state goes under `opts.home`).
    pub async fn register(opts: &ClientOptions) -> Result<Self> {
        let name = format!("bench{}idle", super::load::run_tag());
        let client = Client::register(opts, &name).await?;
        client.conn.close().await;
        let path = opts.home.join(&name).join("device.key");
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let keys = DeviceKeys::decode(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self { name, keys })
    }

    /// A new socket (TLS when the URL is https), logged in as this device.
    pub async fn login(&self, server: &str, ca: &Path) -> Result<Connection> {
        let mut conn = Connection::connect(server, ca).await?;
        conn.login(&self.name, DEVICE_ID, self.keys.identity())
            .await?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::MessageIds;

    #[test]
    fn message_ids_of_a_sender_and_of_two_senders_never_repeat() {
        let (mut a, mut b) = (MessageIds::new(), MessageIds::new());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(a.next()), "a sender repeated an id");
            assert!(seen.insert(b.next()), "two senders share an id");
        }
    }
}
