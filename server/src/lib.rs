//! chat-server: one node of ChatApp. It relays and stores only ciphertext, keeps the key
//! directory as a transparency log, and seals everything it stores with the data-at-rest key.
//!
//! Layers, outside in: [`server`] (accept, TLS, hyper, graceful shutdown) -> [`http`] (routes)
//! -> [`ws`] (one WebSocket session) -> [`node`] (frame handling, shared state) -> [`directory`]
//! (transparency log) and [`store`] (durable, sealed storage); [`backplane`] wakes delivery
//! loops across instances that share a NATS store.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod backplane;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod directory;
pub mod gateway;
pub mod healthcheck;
#[cfg(feature = "hostile")]
pub mod hostile;
pub mod http;
pub mod metrics;
pub mod node;
pub mod read_ahead;
pub mod server;
pub mod store;
pub mod tls;
pub mod ws;
