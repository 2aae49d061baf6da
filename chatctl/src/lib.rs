//! chatctl as a library: the native chat client, the file helpers and the runtimes (Docker,
//! local processes) that run clusters, shared by the `chatctl` binary, the end-to-end tests
//! (`chat-tests`) and the benchmarks.
#![forbid(unsafe_code)]

pub mod client;
pub mod files;
pub mod passphrase;
pub mod progress;
pub mod runtime;
pub mod supervisor;
