//! One module per `chatctl` subcommand.

pub mod audit;
pub mod bench;
pub mod bundle;
pub mod chat;
pub mod down;
pub mod keys;
pub mod logs;
pub mod ps;
pub mod release;
pub mod scale;
pub mod status;
pub mod supervise;
pub mod top;
pub mod up;
pub mod verify_site;
