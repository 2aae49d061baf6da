//! chat-core: the sans-IO end-to-end protocol core shared by the native client and the browser.
//!
//! Bytes and events in, bytes and events out: no sockets, no clocks, no threads. Randomness is
//! passed in by the caller (`rand_core::CryptoRngCore`), time as Unix seconds, so the same code
//! runs under tokio, in wasm32 and in deterministic tests.
#![forbid(unsafe_code)]

pub mod codec;
pub mod directory;
pub mod group;
pub mod identity;
pub mod padding;
pub mod ratchet;
pub mod safety;
pub mod wire;
pub mod x3dh;
