//! One module per `chatctl` subcommand.

pub mod keys;
pub mod release;
