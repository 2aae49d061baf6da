//! The XMPP driver: ejabberd over WebSocket (RFC 7395 framing, one stanza per WebSocket
//! message). Users register in band (XEP-0077), log in with SASL PLAIN and bind a resource;
//! messages are `<message type="chat">` stanzas to the receiver's full JID whose 256-character
//! body carries the sequence number and send time in hex. `finish` is an XMPP ping (XEP-0199)
//! behind the last message. String matching, no XML parser: the driver only needs to find its
//! own stanzas.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::load::{Flow, Inbox, Outbox, PAYLOAD};
use super::ws::{self, Ws};

/// The XMPP domain of the benchmark server.
pub const DOMAIN: &str = "localhost";
const PASSWORD: &str = "bench-password";

pub struct XmppConn {
    ws: Ws,
    next_id: u64,
}

/// `seq` and send time from the first 16 payload bytes, as a 256-character body.
fn body_of(payload: &[u8]) -> String {
    let mut body = hex::encode(payload.get(..16).unwrap_or_default());
    body.extend(std::iter::repeat_n('x', PAYLOAD.saturating_sub(body.len())));
    body
}

/// The payload back from a received stanza (`None`: not one of ours).
fn payload_of(stanza: &str) -> Option<Vec<u8>> {
    let start = stanza.find("<body>")? + "<body>".len();
    let head = hex::decode(stanza.get(start..start + 32)?).ok()?;
    let mut payload = vec![0u8; PAYLOAD];
    payload[..16].copy_from_slice(&head);
    Some(payload)
}

impl XmppConn {
    /// Connects, registers `user` when asked (an existing account is fine), logs in and binds
    /// `resource`.
    pub async fn login(url: &str, user: &str, resource: &str, register: bool) -> Result<Self> {
        let mut conn = Self {
            ws: ws::connect(url, Some("xmpp")).await?,
            next_id: 1,
        };
        conn.open().await?;
        if register {
            let iq = format!(
                "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{PASSWORD}</password></query></iq>"
            );
            conn.write(iq).await?;
            let answer = conn
                .until(|s| s.contains("id='reg'") || s.contains("id=\"reg\""))
                .await
                .context("registering")?;
            let refused = answer.contains("type='error'") || answer.contains("type=\"error\"");
            // An existing account (conflict) is fine: the password is the driver's.
            if refused && !answer.contains("conflict") {
                bail!("ejabberd refused to register {user}: {answer}");
            }
        }
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"));
        conn.write(format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{credentials}</auth>"
        ))
        .await?;
        let answer = conn
            .until(|s| s.contains("<success") || s.contains("<failure"))
            .await
            .context("logging in (SASL)")?;
        if answer.contains("<failure") {
            bail!("ejabberd refused the login of {user}: {answer}");
        }
        conn.open().await.context("after SASL")?;
        conn.write(format!(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
        .await?;
        let answer = conn
            .until(|s| s.contains("id='bind'") || s.contains("id=\"bind\""))
            .await
            .context("binding a resource")?;
        if !(answer.contains("type='result'") || answer.contains("type=\"result\"")) {
            bail!("ejabberd refused to bind {user}/{resource}: {answer}");
        }
        Ok(conn)
    }

    async fn open(&mut self) -> Result<()> {
        self.write(format!(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{DOMAIN}' version='1.0'/>"
        ))
        .await?;
        self.until(|s| s.contains("features"))
            .await
            .map(drop)
            .context("opening the stream")
    }

    async fn write(&mut self, stanza: String) -> Result<()> {
        self.feed(stanza).await?;
        self.flush().await
    }

    /// Queues `stanza` without writing it out (see [`XmppConn::flush`]).
    async fn feed(&mut self, stanza: String) -> Result<()> {
        self.ws
            .feed(Message::Text(stanza.into()))
            .await
            .context("cannot send to ejabberd")
    }

    async fn flush(&mut self) -> Result<()> {
        self.ws.flush().await.context("cannot send to ejabberd")
    }

    async fn next_stanza(&mut self, timeout: Duration) -> Result<Option<String>> {
        loop {
            let message = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("ejabberd closed the connection"),
                Ok(Some(m)) => m.context("XMPP connection error")?,
            };
            match message {
                Message::Text(t) => return Ok(Some(t.to_string())),
                Message::Binary(b) => return Ok(Some(String::from_utf8_lossy(&b).into_owned())),
                Message::Close(frame) => bail!("ejabberd closed the connection: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Reads stanzas until one satisfies `wanted`; a stream error ends the wait.
    async fn until(&mut self, wanted: impl Fn(&str) -> bool) -> Result<String> {
        loop {
            let stanza = self
                .next_stanza(Duration::from_secs(15))
                .await?
                .ok_or_else(|| anyhow!("no answer from ejabberd within 15 s"))?;
            if wanted(&stanza) {
                return Ok(stanza);
            }
            if stanza.contains("stream:error") || stanza.contains("<close") {
                bail!("ejabberd ended the stream: {stanza}");
            }
        }
    }
}

pub struct XmppOutbox {
    conn: XmppConn,
    to: Vec<String>,
    sent: u64,
}

pub struct XmppInbox(XmppConn);

impl Outbox for XmppOutbox {
    async fn send(&mut self, payload: Vec<u8>) -> Result<()> {
        let body = body_of(&payload);
        for to in &self.to {
            let id = self.conn.next_id;
            self.conn.next_id += 1;
            let stanza =
                format!("<message to='{to}' id='m{id}' type='chat'><body>{body}</body></message>");
            self.conn.feed(stanza).await?;
            self.sent += 1;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.conn.flush().await
    }

    async fn finish(&mut self) -> Result<u64> {
        self.conn
            .write(format!(
                "<iq type='get' id='fin' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
            ))
            .await?;
        self.conn
            .until(|s| s.contains("id='fin'") || s.contains("id=\"fin\""))
            .await?;
        Ok(self.sent)
    }
}

impl Inbox for XmppInbox {
    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        loop {
            let Some(stanza) = self.0.next_stanza(timeout).await? else {
                return Ok(None);
            };
            if !stanza.starts_with("<message") {
                continue;
            }
            if stanza.contains("type='error'") || stanza.contains("type=\"error\"") {
                bail!("ejabberd bounced a message: {stanza}");
            }
            if let Some(payload) = payload_of(&stanza) {
                return Ok(Some(payload));
            }
        }
    }
}

/// A fresh user name (the server keeps accounts between runs).
pub fn user_name(tag: &str, role: &str) -> String {
    format!("bench{tag}{role}")
}

/// `senders` senders with `fanout` receivers each, all registered in band.
pub async fn flows(
    url: &str,
    senders: usize,
    fanout: usize,
) -> Result<Vec<Flow<XmppOutbox, XmppInbox>>> {
    let tag = super::load::run_tag();
    let mut out = Vec::new();
    for s in 0..senders {
        let mut to = Vec::new();
        let mut inboxes = Vec::new();
        for r in 0..fanout {
            let user = user_name(&tag, &format!("s{s}r{r}"));
            inboxes.push(XmppInbox(XmppConn::login(url, &user, "bench", true).await?));
            to.push(format!("{user}@{DOMAIN}/bench"));
        }
        let sender = user_name(&tag, &format!("s{s}"));
        out.push(Flow {
            outbox: XmppOutbox {
                conn: XmppConn::login(url, &sender, "bench", true).await?,
                to,
                sent: 0,
            },
            inboxes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_sequence_and_send_time_in_256_characters() {
        let payload = super::super::load::payload(9, 77);
        let body = body_of(&payload);
        assert_eq!(body.len(), PAYLOAD);
        let stanza =
            format!("<message from='a@localhost/x' type='chat'><body>{body}</body></message>");
        assert_eq!(payload_of(&stanza), Some(payload));
        assert_eq!(payload_of("<message><body>zz</body></message>"), None);
    }
}
