//! One module per `chatctl` subcommand.

pub mod chat;
pub mod keys;
pub mod release;
pub mod up;
