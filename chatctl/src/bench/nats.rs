//! The NATS driver: core NATS (no JetStream, nothing stored) over nats-server's WebSocket
//! listener. A flow is one subject; the sender publishes, every receiver subscribes, so a group
//! fans out in the broker. `finish` is a PING/PONG behind the last publish.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::load::{Flow, Inbox, Outbox};
use super::ws::{self, Ws};

/// What arrived from the server.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Msg(Vec<u8>),
    Pong,
}

/// One connection: the socket, the protocol bytes received, and how far they are parsed.
pub struct NatsConn {
    ws: Ws,
    buf: Vec<u8>,
    parsed: usize,
}

/// Parses the next complete protocol message of `buf[*at..]` and moves `at` past it: `Ok(None)`
/// when more bytes are needed; `PING` is answered by the caller through `ping`.
///
/// Parsed bytes stay in `buf` until the next read drops them all at once
/// ([`NatsConn::next_event`]). Dropping each message off the front moved the rest of the buffer
/// once per message: a receiver that fell behind, to which nats-server writes everything pending
/// in one frame, then spent half its CPU in `memmove` and fell further behind (docs/BENCHMARKS.md,
/// session 24).
fn parse(buf: &[u8], at: &mut usize, ping: &mut bool) -> Result<Option<Event>> {
    loop {
        let rest = &buf[*at..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..eol]);
        let mut words = line.split_whitespace();
        match words.next() {
            Some("MSG") => {
                let size: usize = line
                    .split_whitespace()
                    .last()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow!("bad MSG line {line:?}"))?;
                let end = eol + 2 + size + 2;
                if rest.len() < end {
                    return Ok(None);
                }
                let body = rest[eol + 2..eol + 2 + size].to_vec();
                *at += end;
                return Ok(Some(Event::Msg(body)));
            }
            Some("PONG") => {
                *at += eol + 2;
                return Ok(Some(Event::Pong));
            }
            Some("PING") => *ping = true,
            Some("-ERR") => bail!("nats-server: {line}"),
            _ => {} // INFO, +OK
        }
        *at += eol + 2;
    }
}

impl NatsConn {
    pub async fn connect(url: &str) -> Result<Self> {
        let mut conn = Self {
            ws: ws::connect(url, None).await?,
            buf: Vec::new(),
            parsed: 0,
        };
        conn.write(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"name\":\"chatctl-bench\"}\r\nPING\r\n".to_vec())
            .await?;
        conn.pong().await.context("NATS handshake")?;
        Ok(conn)
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.feed(bytes).await?;
        self.flush().await
    }

    /// Queues `bytes` without writing them out (see [`NatsConn::flush`]).
    async fn feed(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws
            .feed(Message::Binary(bytes.into()))
            .await
            .context("cannot send to nats-server")
    }

    async fn flush(&mut self) -> Result<()> {
        self.ws.flush().await.context("cannot send to nats-server")
    }

    async fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut ping = false;
            let event = parse(&self.buf, &mut self.parsed, &mut ping)?;
            if ping {
                self.write(b"PONG\r\n".to_vec()).await?;
            }
            if event.is_some() {
                return Ok(event);
            }
            let message = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("nats-server closed the connection"),
                Ok(Some(m)) => m.context("NATS connection error")?,
            };
            // What is left unparsed is one cut message at most: the move is short.
            self.buf.drain(..self.parsed);
            self.parsed = 0;
            match message {
                Message::Binary(b) => self.buf.extend_from_slice(&b),
                Message::Text(t) => self.buf.extend_from_slice(t.as_bytes()),
                Message::Close(_) => bail!("nats-server closed the connection"),
                _ => {}
            }
        }
    }

    /// Waits for the PONG of a PING already sent.
    async fn pong(&mut self) -> Result<()> {
        loop {
            match self.next_event(Duration::from_secs(15)).await? {
                Some(Event::Pong) => return Ok(()),
                Some(Event::Msg(_)) => {}
                None => bail!("no PONG from nats-server within 15 s"),
            }
        }
    }

    async fn subscribe(&mut self, subject: &str) -> Result<()> {
        self.write(format!("SUB {subject} 1\r\nPING\r\n").into_bytes())
            .await?;
        self.pong().await
    }
}

pub struct NatsOutbox {
    conn: NatsConn,
    subject: String,
    fanout: u64,
    published: u64,
}

pub struct NatsInbox(NatsConn);

impl Outbox for NatsOutbox {
    async fn send(&mut self, body: Vec<u8>) -> Result<()> {
        let mut frame = format!("PUB {} {}\r\n", self.subject, body.len()).into_bytes();
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\r\n");
        self.conn.feed(frame).await?;
        self.published += 1;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.conn.flush().await
    }

    async fn finish(&mut self) -> Result<u64> {
        self.conn.write(b"PING\r\n".to_vec()).await?;
        self.conn.pong().await?;
        Ok(self.published * self.fanout)
    }
}

impl Inbox for NatsInbox {
    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        loop {
            match self.0.next_event(timeout).await? {
                Some(Event::Msg(body)) => return Ok(Some(body)),
                Some(Event::Pong) => {}
                None => return Ok(None),
            }
        }
    }
}

/// `senders` subjects with `fanout` subscribers each.
pub async fn flows(
    url: &str,
    senders: usize,
    fanout: usize,
) -> Result<Vec<Flow<NatsOutbox, NatsInbox>>> {
    let tag = super::load::run_tag();
    let mut out = Vec::new();
    for s in 0..senders {
        let subject = format!("bench.{tag}.{s}");
        let mut inboxes = Vec::new();
        for _ in 0..fanout {
            let mut conn = NatsConn::connect(url).await?;
            conn.subscribe(&subject).await?;
            inboxes.push(NatsInbox(conn));
        }
        out.push(Flow {
            outbox: NatsOutbox {
                conn: NatsConn::connect(url).await?,
                subject,
                fanout: fanout as u64,
                published: 0,
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
    fn parses_split_messages_and_answers_pings() {
        let mut buf = b"INFO {}\r\nPING\r\nMSG a.b 1 3\r\nab".to_vec();
        let (mut at, mut ping) = (0, false);
        assert_eq!(parse(&buf, &mut at, &mut ping).ok().flatten(), None);
        assert!(ping);
        // INFO and PING are consumed; the cut MSG waits for its bytes.
        assert_eq!(&buf[at..], b"MSG a.b 1 3\r\nab");
        buf.extend_from_slice(b"c\r\nPONG\r\n");
        assert_eq!(
            parse(&buf, &mut at, &mut ping).ok().flatten(),
            Some(Event::Msg(b"abc".to_vec()))
        );
        assert_eq!(
            parse(&buf, &mut at, &mut ping).ok().flatten(),
            Some(Event::Pong)
        );
        assert_eq!(at, buf.len());
        let err = b"-ERR 'Authorization Violation'\r\n".to_vec();
        assert!(parse(&err, &mut 0, &mut ping).is_err());
    }

    #[test]
    fn a_frame_of_many_messages_parses_in_order_and_keeps_a_cut_tail() {
        let mut buf = Vec::new();
        for i in 0..1000u32 {
            let body = i.to_string();
            buf.extend_from_slice(format!("MSG s 1 {}\r\n{body}\r\n", body.len()).as_bytes());
        }
        buf.extend_from_slice(b"MSG s 1 5\r\nab");
        let (mut at, mut ping) = (0, false);
        for i in 0..1000u32 {
            let got = parse(&buf, &mut at, &mut ping).ok().flatten();
            assert_eq!(got, Some(Event::Msg(i.to_string().into_bytes())));
        }
        assert_eq!(parse(&buf, &mut at, &mut ping).ok().flatten(), None);
        assert_eq!(&buf[at..], b"MSG s 1 5\r\nab");
        assert!(!ping);
    }
}
