//! chat-signing: the roots of trust that both the operator tools and the browser verify.
//!
//! - [`release`]: minisign-compatible keys and signatures (read and written the way minisign 0.11 does);
//! - [`manifest`]: the canonical `manifest.json` of a release bundle and its verification;
//! - [`merkle`]: RFC 9162 Merkle tree hashing, inclusion and consistency proofs;
//! - [`tree_head`]: the key directory's Ed25519 key and its signed tree heads.
//!
//! No tokio, no clocks: the caller passes the time. Builds for `wasm32-unknown-unknown`.
#![forbid(unsafe_code)]

pub mod manifest;
pub mod merkle;
pub mod release;
pub mod tree_head;
