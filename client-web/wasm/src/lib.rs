//! chat-core-wasm: chat-core and release verification for the browser, as two `.wasm` files with
//! a small hand-written byte ABI (no wasm-bindgen, no JS build step, nothing to install): the
//! app's `chat_core.wasm` (feature `app`) and the loader's `chat_verify.wasm` (feature `verify`).
//!
//! - [`api`]: the operations in safe Rust: byte slices in, bytes or a coded error out, live
//!   objects (device keys, sessions, directory verifiers, groups, verified releases) behind
//!   `u32` handles;
//! - `abi`: the `extern "C"` exports over [`api`], `alloc`/`dealloc`, and the imported
//!   `env.random_fill`; the project's only `unsafe` code, confined to that module.
//!
//! Every export returns a result buffer `[length u32 BE][status u8][payload]` (status 0: the
//! payload is the value; 1: the payload is `code length (u8) || code || message`).
//! `js/chat_core.js` and `js/chat_verify.js` are the ES modules that wrap them; README.md lists
//! every export and layout.
#![deny(unsafe_code)]

mod abi;
pub mod api;
