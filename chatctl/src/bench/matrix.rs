//! The Matrix driver: a homeserver (Synapse) through its client-server API over plain HTTP/1.1
//! (Matrix has no WebSocket transport). Every client is one keep-alive TCP connection.
//!
//! - Accounts: open registration (`POST /register` with the `m.login.dummy` stage; the server
//!   needs `enable_registration: true` and `enable_registration_without_verification: true`),
//!   then `POST /login` with the password for the access token. Open registration rather than
//!   the shared-secret admin API because it is the client API alone, like ejabberd's in-band
//!   registration: no admin secret to hand to the load generator and no HMAC-SHA1 code here.
//! - A flow is one room: the sender creates a private room inviting its receivers, each
//!   receiver joins it. A group message is one event in the room (the homeserver fans out).
//! - Send: `PUT /rooms/{room}/send/m.room.message/{txn}` with an `m.text` body of 256
//!   characters carrying the sequence number and send time in hex (as the XMPP driver does).
//!   The PUT returns once the event is persisted, so each sender has one request in flight on
//!   its connection (HTTP/1.1 does not multiplex); `finish` has nothing left to wait for.
//! - Receipt: `GET /sync` long-polling with the `since` token of the previous answer and a
//!   filter that keeps only `m.room.message` events of the flow's room (no state, presence,
//!   receipts, account data), so an answer comes as soon as a message is there. A message is
//!   delivered when it appears in the receiver's `/sync` timeline; when a sync is `limited`
//!   (more new events than the timeline limit) the gap is fetched with `GET /messages` back to
//!   the previous token, so nothing is skipped.
//! - Idle: one pending `/sync?timeout=30000` per connection, re-issued when it returns, as an
//!   idle client does. Each idle connection is its own user (registered with a login): many
//!   devices of one user would wake each other's syncs with device-list changes at every login.
//! - Connect: a new TCP connection and `POST /login` (a new device) for one user, then closed.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::load::{Flow, Inbox, Outbox, PAYLOAD};

const PASSWORD: &str = "bench-password";
const API: &str = "/_matrix/client/v3";
/// No request may take longer (a sync long-poll asks for at most 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BODY: usize = 64 << 20;
/// Timeline events per sync answer asked for (Synapse caps it at `filter_timeline_limit`,
/// 100 by default; a `limited` answer is completed with `/messages`).
const TIMELINE_LIMIT: u64 = 1000;
/// The long-poll of an idle connection, in milliseconds.
const IDLE_POLL_MS: u64 = 30_000;
/// The events a receiver wants from a room.
const MESSAGES_ONLY: &str = r#"{"types":["m.room.message"]}"#;

/// The homeserver's answer to a request it refused.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status} {errcode}: {error}")]
pub struct Refused {
    pub status: u16,
    pub errcode: String,
    pub error: String,
}

/// Aborts a spawned task (the connection driver, an idle long-poll) when dropped, which
/// closes its socket.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Percent-encodes everything but the unreserved characters (room ids, user ids, tokens and
/// JSON filters in paths and query strings).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `host:port` of an `http://` homeserver URL.
fn authority(url: &str) -> Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "Matrix homeserver URL {url:?} must start with http:// (peers are measured on loopback, \
             without TLS)"
        );
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("Matrix homeserver URL {url:?} has no host:port");
    }
    Ok(authority.to_owned())
}

/// `seq` and send time from the first 16 payload bytes, as a 256-character body.
fn body_of(payload: &[u8]) -> String {
    let mut body = hex::encode(payload.get(..16).unwrap_or_default());
    body.extend(std::iter::repeat_n('x', PAYLOAD.saturating_sub(body.len())));
    body
}

/// The payload back from a message body (`None`: not one of ours).
fn payload_of(body: &str) -> Option<Vec<u8>> {
    let head = hex::decode(body.get(..32)?).ok()?;
    let mut payload = vec![0u8; PAYLOAD];
    payload[..16].copy_from_slice(&head);
    Some(payload)
}

/// The payload of a timeline event, if it is one of ours.
fn event_payload(event: &Value) -> Option<Vec<u8>> {
    if event["type"].as_str() != Some("m.room.message") {
        return None;
    }
    payload_of(event["content"]["body"].as_str()?)
}

/// The sync filter of a receiver: the timeline of `room` (messages only) and nothing else.
fn sync_filter(room: Option<&str>) -> Value {
    let rooms: Vec<&str> = room.into_iter().collect();
    json!({
        "event_fields": ["type", "content.body"],
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "rooms": rooms,
            "timeline": {"types": ["m.room.message"], "limit": TIMELINE_LIMIT},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
            "include_leave": false
        }
    })
}

/// One client: a keep-alive HTTP/1.1 connection and, once logged in, its access token.
pub struct MatrixConn {
    authority: String,
    sender: SendRequest<Full<Bytes>>,
    _driver: AbortOnDrop,
    token: Option<String>,
    user_id: String,
}

async fn open(authority: &str) -> Result<(SendRequest<Full<Bytes>>, AbortOnDrop)> {
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}: is the homeserver running?"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .with_context(|| format!("HTTP/1.1 handshake with {authority} failed"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, AbortOnDrop(driver)))
}

impl MatrixConn {
    /// A new connection, not logged in.
    pub async fn connect(url: &str) -> Result<Self> {
        let authority = authority(url)?;
        let (sender, driver) = open(&authority).await?;
        Ok(Self {
            authority,
            sender,
            _driver: driver,
            token: None,
            user_id: String::new(),
        })
    }

    /// Registers `user` (an existing account is fine: the password is the driver's).
    pub async fn register(&mut self, user: &str) -> Result<()> {
        let request = json!({
            "username": user,
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy"},
            "inhibit_login": true,
        });
        match self.call(Method::POST, "/register", Some(&request)).await {
            Ok(_) => Ok(()),
            Err(e)
                if e.downcast_ref::<Refused>()
                    .is_some_and(|r| r.errcode == "M_USER_IN_USE") =>
            {
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "cannot register {user} (does the homeserver allow open registration, \
                 enable_registration_without_verification?)"
            ))),
        }
    }

    /// Registers `user` and keeps the access token of the registration (one request).
    async fn register_session(&mut self, user: &str) -> Result<()> {
        let request = json!({
            "username": user,
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy"},
            "initial_device_display_name": "chatctl-bench",
        });
        let answer = self
            .call(Method::POST, "/register", Some(&request))
            .await
            .with_context(|| format!("cannot register {user}"))?;
        self.take_session(&answer)
    }

    /// Logs in as `user` with the driver's password: a new device and access token.
    pub async fn login(&mut self, user: &str) -> Result<()> {
        let request = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD,
            "initial_device_display_name": "chatctl-bench",
        });
        let answer = self
            .call(Method::POST, "/login", Some(&request))
            .await
            .with_context(|| format!("cannot log in as {user}"))?;
        self.take_session(&answer)
    }

    fn take_session(&mut self, answer: &Value) -> Result<()> {
        let token = answer["access_token"]
            .as_str()
            .with_context(|| format!("the homeserver gave no access_token: {answer}"))?;
        let user_id = answer["user_id"]
            .as_str()
            .with_context(|| format!("the homeserver gave no user_id: {answer}"))?;
        self.token = Some(token.to_owned());
        self.user_id = user_id.to_owned();
        Ok(())
    }

    /// A new connection registering and logging in `user`.
    pub async fn register_and_login(url: &str, user: &str) -> Result<Self> {
        let mut conn = Self::connect(url).await?;
        conn.register(user).await?;
        conn.login(user).await?;
        Ok(conn)
    }

    /// `method API path` with a JSON body; the JSON answer of a 2xx, else a [`Refused`].
    async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let what = format!("{method} {API}{}", path.split('?').next().unwrap_or(path));
        match tokio::time::timeout(REQUEST_TIMEOUT, self.call_inner(method, path, body)).await {
            Ok(answer) => answer.with_context(|| format!("homeserver: {what}")),
            Err(_) => bail!("homeserver: {what}: no answer within {REQUEST_TIMEOUT:?}"),
        }
    }

    async fn call_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        if self.sender.is_closed() {
            // The server closed the keep-alive connection between requests: open another.
            let (sender, driver) = open(&self.authority).await?;
            self.sender = sender;
            self._driver = driver;
        }
        self.sender
            .ready()
            .await
            .context("the connection to the homeserver failed")?;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "chatctl-bench");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(serde_json::to_vec(json)?))
            }
            None => Full::new(Bytes::new()),
        };
        let response = self
            .sender
            .send_request(request.body(body)?)
            .await
            .context("the connection to the homeserver failed")?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer (HTTP {status}): {e}"))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "HTTP {status} with a body that is not JSON: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })?;
        if !status.is_success() {
            let refused = Refused {
                status: status.as_u16(),
                errcode: answer["errcode"].as_str().unwrap_or("?").to_owned(),
                error: answer["error"].as_str().unwrap_or_default().to_owned(),
            };
            if refused.errcode == "M_LIMIT_EXCEEDED" {
                return Err(anyhow::Error::new(refused).context(
                    "rate-limited: raise the homeserver's rc_* limits (cargo xtask bench-peers \
                     sets them very high)",
                ));
            }
            return Err(refused.into());
        }
        Ok(answer)
    }

    /// Creates a private room inviting `invite`; its id.
    async fn create_room(&mut self, invite: &[String]) -> Result<String> {
        let request = json!({"preset": "private_chat", "invite": invite});
        let answer = self
            .call(Method::POST, "/createRoom", Some(&request))
            .await?;
        answer["room_id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("createRoom gave no room_id: {answer}"))
    }

    async fn join(&mut self, room: &str) -> Result<()> {
        self.call(
            Method::POST,
            &format!("/join/{}", enc(room)),
            Some(&json!({})),
        )
        .await
        .with_context(|| format!("{} cannot join {room}", self.user_id))
        .map(drop)
    }

    /// Uploads a sync filter; its id.
    async fn filter(&mut self, filter: &Value) -> Result<String> {
        let path = format!("/user/{}/filter", enc(&self.user_id));
        let answer = self.call(Method::POST, &path, Some(filter)).await?;
        answer["filter_id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the filter upload gave no filter_id: {answer}"))
    }

    /// One `/sync` (`filter` is an id or inline JSON); the whole answer.
    async fn sync(&mut self, filter: &str, since: Option<&str>, timeout_ms: u64) -> Result<Value> {
        let mut path = format!("/sync?filter={}&timeout={timeout_ms}", enc(filter));
        if let Some(since) = since {
            let _ = write!(path, "&since={}", enc(since));
        }
        self.call(Method::GET, &path, None).await
    }
}

fn next_batch(answer: &Value) -> Result<String> {
    answer["next_batch"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("a /sync answer without next_batch: {answer}"))
}

pub struct MatrixOutbox {
    conn: MatrixConn,
    /// The room id, percent-encoded for the path.
    room: String,
    fanout: u64,
    sent: u64,
}

pub struct MatrixInbox {
    conn: MatrixConn,
    room: String,
    filter: String,
    since: String,
    queue: VecDeque<Vec<u8>>,
}

impl Outbox for MatrixOutbox {
    async fn send(&mut self, payload: Vec<u8>) -> Result<()> {
        // The transaction id only has to be unique per access token.
        let path = format!("/rooms/{}/send/m.room.message/b{}", self.room, self.sent);
        let content = json!({"msgtype": "m.text", "body": body_of(&payload)});
        let answer = self.conn.call(Method::PUT, &path, Some(&content)).await?;
        if answer["event_id"].as_str().is_none() {
            bail!("the homeserver accepted a message without an event_id: {answer}");
        }
        self.sent += 1;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        // Each send is a request answered before it returns: nothing waits here.
        Ok(())
    }

    async fn finish(&mut self) -> Result<u64> {
        // Every PUT was answered after the event was persisted: nothing is in flight.
        Ok(self.sent * self.fanout)
    }
}

impl MatrixInbox {
    /// Joins `room`, uploads the receiver's filter and takes the position to sync from.
    async fn new(mut conn: MatrixConn, room: String) -> Result<Self> {
        conn.join(&room).await?;
        let filter = conn.filter(&sync_filter(Some(&room))).await?;
        let first = conn.sync(&filter, None, 0).await?;
        Ok(Self {
            since: next_batch(&first)?,
            conn,
            room,
            filter,
            queue: VecDeque::new(),
        })
    }

    /// One long-poll of at most `timeout_ms`; what arrived goes to the queue.
    async fn poll(&mut self, timeout_ms: u64) -> Result<()> {
        let answer = self
            .conn
            .sync(&self.filter, Some(&self.since), timeout_ms)
            .await?;
        let next = next_batch(&answer)?;
        let timeline = &answer["rooms"]["join"][self.room.as_str()]["timeline"];
        if timeline["limited"].as_bool() == Some(true) {
            let prev = timeline["prev_batch"]
                .as_str()
                .with_context(|| "a limited /sync timeline without prev_batch")?
                .to_owned();
            self.backfill(&prev).await?;
        }
        if let Some(events) = timeline["events"].as_array() {
            self.queue.extend(events.iter().filter_map(event_payload));
        }
        self.since = next;
        Ok(())
    }

    /// The messages between the previous sync position and `from` (a limited timeline's
    /// `prev_batch`), oldest first, into the queue.
    async fn backfill(&mut self, from: &str) -> Result<()> {
        let mut from = from.to_owned();
        let mut older = Vec::new();
        loop {
            let path = format!(
                "/rooms/{}/messages?dir=b&limit={TIMELINE_LIMIT}&from={}&to={}&filter={}",
                enc(&self.room),
                enc(&from),
                enc(&self.since),
                enc(MESSAGES_ONLY)
            );
            let answer = self.conn.call(Method::GET, &path, None).await?;
            let chunk = answer["chunk"]
                .as_array()
                .with_context(|| format!("a /messages answer without chunk: {answer}"))?;
            if chunk.is_empty() {
                break;
            }
            older.extend(chunk.iter().filter_map(event_payload));
            match answer["end"].as_str() {
                Some(end) if end != from => from = end.to_owned(),
                _ => break,
            }
        }
        older.reverse();
        self.queue.extend(older);
        Ok(())
    }
}

impl Inbox for MatrixInbox {
    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(payload) = self.queue.pop_front() {
                return Ok(Some(payload));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A sync may return early with nothing of ours (another stream changed).
            self.poll(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
                .await?;
        }
    }
}

/// A user name unique to this run (the homeserver keeps accounts between runs); Matrix user
/// ids are lower case.
pub fn user_name(tag: &str, role: &str) -> String {
    format!("bench{tag}{role}").to_lowercase()
}

/// `senders` rooms, each with its sender and `fanout` receivers.
pub async fn flows(
    url: &str,
    senders: usize,
    fanout: usize,
) -> Result<Vec<Flow<MatrixOutbox, MatrixInbox>>> {
    let tag = super::load::run_tag();
    let mut out = Vec::new();
    for s in 0..senders {
        let mut receivers = Vec::new();
        for r in 0..fanout {
            let user = user_name(&tag, &format!("s{s}r{r}"));
            receivers.push(MatrixConn::register_and_login(url, &user).await?);
        }
        let mut sender =
            MatrixConn::register_and_login(url, &user_name(&tag, &format!("s{s}"))).await?;
        let invite: Vec<String> = receivers.iter().map(|c| c.user_id.clone()).collect();
        let room = sender.create_room(&invite).await?;
        let mut inboxes = Vec::new();
        for conn in receivers {
            inboxes.push(MatrixInbox::new(conn, room.clone()).await?);
        }
        out.push(Flow {
            outbox: MatrixOutbox {
                conn: sender,
                room: enc(&room),
                fanout: fanout as u64,
                sent: 0,
            },
            inboxes,
        });
    }
    Ok(out)
}

/// An idle client: its connection with a pending `/sync` long-poll, re-issued when it returns.
/// Dropping it closes the connection.
pub struct MatrixIdle {
    _poll: AbortOnDrop,
}

/// Registers `user` on a new connection (its access token), syncs once and leaves a
/// `/sync?timeout=30000` pending.
pub async fn idle_client(url: &str, user: &str) -> Result<MatrixIdle> {
    let mut conn = MatrixConn::connect(url).await?;
    conn.register_session(user).await?;
    let filter = sync_filter(None).to_string();
    let mut since = next_batch(&conn.sync(&filter, None, 0).await?)?;
    let poll = tokio::spawn(async move {
        // Errors end the poll; the connection then counts as opened but no longer idle-polling,
        // which only happens if the homeserver fails.
        while let Ok(answer) = conn.sync(&filter, Some(&since), IDLE_POLL_MS).await {
            match next_batch(&answer) {
                Ok(next) => since = next,
                Err(_) => break,
            }
        }
    });
    Ok(MatrixIdle {
        _poll: AbortOnDrop(poll),
    })
}

/// One new connection and `POST /login` as `user` (registered before), closed again.
pub async fn connect_and_login(url: &str, user: &str) -> Result<()> {
    let mut conn = MatrixConn::connect(url).await?;
    conn.login(user).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_sequence_and_send_time_in_256_characters() {
        let payload = super::super::load::payload(9, 77);
        let body = body_of(&payload);
        assert_eq!(body.len(), PAYLOAD);
        assert_eq!(payload_of(&body), Some(payload.clone()));
        let event = json!({"type": "m.room.message", "content": {"body": body}});
        assert_eq!(event_payload(&event), Some(payload));
        assert_eq!(payload_of("zz"), None);
        assert_eq!(
            event_payload(&json!({"type": "m.room.member", "content": {}})),
            None
        );
        assert_eq!(event_payload(&json!("not an event")), None);
    }

    #[test]
    fn ids_are_percent_encoded_and_urls_checked() {
        assert_eq!(
            enc("!abc:localhost"),
            "%21abc%3Alocalhost",
            "room ids go into paths"
        );
        assert_eq!(enc("s14_1_0~x.y-z"), "s14_1_0~x.y-z");
        assert_eq!(
            authority("http://127.0.0.1:19808/").ok(),
            Some("127.0.0.1:19808".into())
        );
        assert!(authority("https://matrix.org").is_err());
        assert!(authority("http://").is_err());
    }
}
