//! One module per `chatctl` subcommand.

pub mod bench;
pub mod chat;
pub mod keys;
pub mod release;
pub mod up;
