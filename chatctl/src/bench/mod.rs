//! `chatctl bench` internals: the shared load generator ([`load`]) and one driver per system
//! measured by it: chat-server ([`chat`]), NATS core ([`nats`]), ejabberd ([`xmpp`]) and the
//! bare relay that is the limit ([`relay`]), all over WebSocket, and Matrix Synapse
//! ([`matrix`]) over its HTTP client-server API (`PUT` to send, `/sync` long-polling to receive).

pub mod chat;
pub mod cpu;
pub mod load;
pub mod matrix;
pub mod nats;
pub mod relay;
pub mod ws;
pub mod xmpp;
