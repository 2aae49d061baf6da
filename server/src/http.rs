//! HTTP routing: `/healthz`, `/readyz`, `/metrics`, the WebSocket upgrade at `/v1/ws`, the
//! loopback-only admin trigger `/admin/drain`, and the static bundle for everything else (when
//! `--bundle` is given).
//!
//! `GET /admin/drain[?batch=N&every_ms=M&delay_ms=D]` starts a gradual drain
//! ([`Node::start_gradual_drain`]); it is answered only to peers on the loopback address (inside
//! a container that is `docker exec CONTAINER /chat-server healthcheck --url
//! https://localhost:8443/admin/drain --ca /keys/tls/ca.pem`, which is how the supervisor drains
//! a server before removing it), and is 404 to everyone else. It is a GET so that the
//! image's only client, `chat-server healthcheck`, can send it; it is idempotent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::node::{DrainPlan, Node};

pub type Body = Full<Bytes>;

/// A connection's place under `limits.max_connections`, held by the connection and, once it
/// upgrades, by its WebSocket session.
pub type Slot = Arc<tokio::sync::OwnedSemaphorePermit>;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Routes one request.
pub async fn route(
    node: Arc<Node>,
    peer: SocketAddr,
    slot: Slot,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if node.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut body = node.metrics.render(!node.is_draining());
            node.store.render_metrics(&mut body);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/v1/ws" => upgrade(node, peer, slot, req),
        "/admin/drain" if peer.ip().is_loopback() => {
            let plan = drain_plan(req.uri().query().unwrap_or_default());
            let open = node.start_gradual_drain(plan);
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "draining: {open} sessions, {} per {} ms\n",
                plan.batch,
                plan.every.as_millis()
            ))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        }
        path => match &node.bundle {
            Some(bundle) => bundle.serve(path).await,
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// Reads `batch`, `every_ms` and `delay_ms` from a query string; the rest stays default.
fn drain_plan(query: &str) -> DrainPlan {
    let mut plan = DrainPlan::default();
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let Ok(n) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "batch" => plan.batch = usize::try_from(n.clamp(1, 100_000)).unwrap_or(1),
            "every_ms" => plan.every = Duration::from_millis(n.min(60_000)),
            "delay_ms" => plan.delay = Duration::from_millis(n.min(60_000)),
            _ => {}
        }
    }
    plan
}

/// Answers a WebSocket handshake (RFC 6455) and hands the upgraded connection to `ws::serve`.
fn upgrade(
    node: Arc<Node>,
    peer: SocketAddr,
    slot: Slot,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if node.is_draining() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: reconnect to another server\n",
        );
    }
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    let upgrade_ok =
        has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket");
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    };
    if !upgrade_ok || !version_ok {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _slot = slot;
        match on_upgrade.await {
            Ok(upgraded) => crate::ws::serve(node, upgraded, peer).await,
            Err(e) => tracing::debug!(%peer, error = %e, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_plans_are_read_from_the_query_and_bounded() {
        let plan = drain_plan("batch=5&every_ms=100&delay_ms=0&x=1");
        assert_eq!(plan.batch, 5);
        assert_eq!(plan.every, Duration::from_millis(100));
        assert_eq!(plan.delay, Duration::ZERO);
        assert_eq!(drain_plan("batch=0").batch, 1);
        assert_eq!(drain_plan("batch=nope"), DrainPlan::default());
    }
}
