//! The supervisor of a Docker project: observe (engine state, health events, container stats,
//! per-server counters through the gateway, host resources), decide ([`policy::decide`], a pure
//! function), act (heal what died or turned unhealthy, scale up, drain then remove on scale
//! down). Runs in the foreground of `chatctl up` or as the detached `chatctl supervise`.

pub mod observe;
pub mod policy;
pub mod run;
pub mod status;

pub use run::{SupervisorOptions, run};
