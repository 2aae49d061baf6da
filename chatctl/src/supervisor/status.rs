//! What the supervisor shows: a [`SupervisorStatus`] written atomically to
//! `STATE_DIR/PROJECT.json` after every tick (read by `chatctl status` and `chatctl top`), its
//! [`Event`]s (every action and why), and the table both commands print.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::policy::{HostResources, Policy, ScaleDecision};

/// Default directory of the state, pid and log files (relative to where `chatctl` runs).
pub const DEFAULT_STATE_DIR: &str = ".chatctl/supervisor";
/// Events kept in the status file.
pub const EVENTS_KEPT: usize = 50;
/// Decisions that changed something, kept in the status file.
pub const DECISIONS_KEPT: usize = 20;

/// One instance (container) of the project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub service: String,
    pub instance: u32,
    pub container_id: String,
    pub state: String,
    pub health: String,
    /// The gateway routes new connections to it.
    pub routed: Option<bool>,
    /// `closed`, `open` (ejected) or `half-open`.
    pub breaker: Option<String>,
    pub connections: Option<i64>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    /// Envelopes stored per second by this server.
    pub msgs_per_sec: Option<f64>,
    pub draining: bool,
    pub restarts: i64,
}

/// Something the supervisor did or saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub time: u64,
    /// `heal`, `scale`, `drain`, `remove`, `engine`, `gateway`, `error`.
    pub kind: String,
    pub container: Option<String>,
    pub message: String,
}

/// A decision that changed (or was held back from changing) the replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub time: u64,
    pub current: u32,
    pub desired: u32,
    pub reason: String,
}

/// The supervisor's whole view, as `chatctl status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    pub project: String,
    pub pid: u32,
    /// Unix seconds of the last tick.
    pub updated: u64,
    pub interval_secs: f64,
    pub current_replicas: u32,
    pub desired_replicas: u32,
    /// Host limits bound the last decision.
    pub host_limited: bool,
    pub host: Option<HostResources>,
    pub policy: Policy,
    pub instances: Vec<InstanceStatus>,
    pub last_decision: Option<ScaleDecision>,
    /// Recent decisions that asked for a change, oldest first.
    pub decisions: VecDeque<DecisionRecord>,
    /// Recent events, oldest first.
    pub events: VecDeque<Event>,
    /// Why the gateway could not be read at the last tick.
    pub gateway_error: Option<String>,
}

pub fn state_file(dir: &Path, project: &str) -> PathBuf {
    dir.join(format!("{project}.json"))
}

pub fn pid_file(dir: &Path, project: &str) -> PathBuf {
    dir.join(format!("{project}.pid"))
}

pub fn log_file(dir: &Path, project: &str) -> PathBuf {
    dir.join(format!("{project}.log"))
}

impl SupervisorStatus {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(self)?;
        crate::files::write_atomic(
            &state_file(dir, &self.project),
            &json,
            crate::files::Mode::Public,
        )
    }

    /// Reads the state of `project`; the error names the file and the next step.
    pub fn read(dir: &Path, project: &str) -> Result<Self> {
        let path = state_file(dir, project);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no supervisor state for project {project} in {}: is a supervisor running? \
                 (`chatctl up --project {project}` in the foreground, or `chatctl up --detach`, \
                 from this directory; or pass --state-dir)",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a supervisor state file", path.display()))
    }

    /// Seconds since the last tick, at `now` (Unix seconds).
    pub fn age(&self, now: u64) -> u64 {
        now.saturating_sub(self.updated)
    }

    /// The table of `chatctl status` and `chatctl top`.
    pub fn render(&self, now: u64) -> String {
        let mut out = String::new();
        let age = self.age(now);
        out.push_str(&format!(
            "project {}   supervisor pid {}   updated {}s ago{}\n",
            self.project,
            self.pid,
            age,
            if f64::from(u32::try_from(age).unwrap_or(u32::MAX)) > 5.0 * self.interval_secs {
                "   (STALE: is the supervisor still running?)"
            } else {
                ""
            }
        ));
        out.push_str(&format!(
            "servers: {} current, {} desired (min {}, max {}{}){}\n",
            self.current_replicas,
            self.desired_replicas,
            self.policy.min_replicas,
            self.policy.max_replicas,
            if self.policy.enabled {
                ""
            } else {
                ", autoscaling off"
            },
            if self.host_limited {
                "   HOST LIMIT binds"
            } else {
                ""
            }
        ));
        if let Some(h) = &self.host {
            out.push_str(&format!(
                "host: cpu {:.0}% of {} cores, load {:.2}, {} MiB memory available\n",
                h.cpu_percent,
                h.cpus,
                h.load_average_1m,
                h.available_memory_bytes / (1024 * 1024)
            ));
        }
        if let Some(e) = &self.gateway_error {
            out.push_str(&format!("gateway: {e}\n"));
        }
        let mut rows = vec![
            [
                "NAME", "STATE", "HEALTH", "ROUTED", "BREAKER", "CONNS", "CPU%", "MEM MiB", "MSG/S",
            ]
            .map(str::to_owned),
        ];
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        for i in &self.instances {
            rows.push([
                i.name.clone(),
                if i.draining {
                    format!("{} (draining)", i.state)
                } else {
                    i.state.clone()
                },
                i.health.clone(),
                opt(i.routed.map(|r| if r { "yes" } else { "no" }.to_owned())),
                opt(i.breaker.clone()),
                opt(i.connections.map(|c| c.to_string())),
                opt(i.cpu_percent.map(|c| format!("{c:.1}"))),
                opt(i
                    .memory_bytes
                    .map(|m| format!("{:.1}", m as f64 / 1048576.0))),
                opt(i.msgs_per_sec.map(|m| format!("{m:.0}"))),
            ]);
        }
        let mut widths = [0usize; 9];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        if let Some(d) = &self.last_decision {
            out.push_str(&format!("decision: {}\n", d.reason));
        }
        if !self.decisions.is_empty() {
            out.push_str("recent decisions:\n");
            for d in self.decisions.iter().rev().take(5) {
                out.push_str(&format!(
                    "  {}s ago  {}\n",
                    now.saturating_sub(d.time),
                    d.reason
                ));
            }
        }
        if !self.events.is_empty() {
            out.push_str("recent events:\n");
            for e in self.events.iter().rev().take(10) {
                out.push_str(&format!(
                    "  {}s ago  {:<7} {}{}\n",
                    now.saturating_sub(e.time),
                    e.kind,
                    e.container
                        .as_deref()
                        .map(|c| format!("{c}: "))
                        .unwrap_or_default(),
                    e.message
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_renders_a_row_per_instance() {
        let status = SupervisorStatus {
            project: "p".into(),
            pid: 7,
            updated: 100,
            interval_secs: 2.0,
            current_replicas: 1,
            desired_replicas: 2,
            host_limited: false,
            host: None,
            policy: Policy::default(),
            instances: vec![InstanceStatus {
                name: "p-server-1".into(),
                service: "server".into(),
                instance: 1,
                container_id: "abc".into(),
                state: "running".into(),
                health: "healthy".into(),
                routed: Some(true),
                breaker: Some("closed".into()),
                connections: Some(12),
                cpu_percent: Some(3.25),
                memory_bytes: Some(10 * 1048576),
                msgs_per_sec: Some(40.0),
                draining: false,
                restarts: 0,
            }],
            last_decision: None,
            decisions: VecDeque::new(),
            events: VecDeque::from([Event {
                time: 99,
                kind: "heal".into(),
                container: Some("p-server-1".into()),
                message: "started again: it had exited (137)".into(),
            }]),
            gateway_error: None,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        status.write(dir.path()).expect("write");
        let back = SupervisorStatus::read(dir.path(), "p").expect("read");
        assert_eq!(back, status);
        let text = status.render(101);
        assert!(text.contains("p-server-1  running"), "{text}");
        assert!(text.contains("heal"), "{text}");
        assert!(
            SupervisorStatus::read(dir.path(), "other")
                .expect_err("no state")
                .to_string()
                .contains("chatctl up")
        );
    }
}
