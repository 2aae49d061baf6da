//! The autoscaling decision: a pure function from what was observed to a [`ScaleDecision`],
//! with no clock, engine or socket of its own, so it is tested with tables like the Kubernetes
//! Horizontal Pod Autoscaler it follows:
//!
//! - per metric (connections per instance, CPU% per instance): `desired = ceil(current ×
//!   observed / target)`, unless `observed / target` is within the tolerance of 1; the largest
//!   recommendation wins;
//! - clamped to `[min_replicas, max_replicas]`;
//! - scale-up happens at once, at most `max_step_up` instances per decision;
//! - scale-down only to the highest recommendation of the stabilisation window, and only once
//!   the supervisor has watched for a whole window (so every recommendation in it was lower);
//! - never above what the host's free memory and CPU allow; the decision says when that binds.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[autoscale]` table of `chatctl.toml`; every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Whether the supervisor changes the number of servers at all (healing is always on).
    pub enabled: bool,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Target open WebSocket connections per server; `0` disables this metric.
    pub target_connections: f64,
    /// Target CPU% per server container (100 = one core); `0` disables this metric.
    pub target_cpu_percent: f64,
    /// Ratios within `1 ± tolerance` change nothing.
    pub tolerance: f64,
    /// Most servers added by one decision.
    pub max_step_up: u32,
    /// Seconds every recommendation must have been lower before scaling down.
    pub stabilization_secs: u64,
    /// Memory kept free on the host for everything else (MiB).
    pub host_memory_reserve_mib: u64,
    /// Memory assumed per new server when none is measured yet (MiB).
    pub server_memory_estimate_mib: u64,
    /// No scale-up while the host's CPU use is above this (percent of all cores).
    pub host_cpu_ceiling_percent: f64,
    /// Seconds between observations.
    pub interval_secs: f64,
    /// Seconds a draining server gets before it is removed anyway.
    pub drain_deadline_secs: u64,
    /// Seconds an upstream may stay ejected by the gateway before its container is replaced.
    pub ejected_replace_secs: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            enabled: true,
            min_replicas: 1,
            max_replicas: 8,
            target_connections: 500.0,
            target_cpu_percent: 70.0,
            tolerance: 0.1,
            max_step_up: 4,
            stabilization_secs: 300,
            host_memory_reserve_mib: 512,
            server_memory_estimate_mib: 64,
            host_cpu_ceiling_percent: 90.0,
            interval_secs: 2.0,
            drain_deadline_secs: 30,
            ejected_replace_secs: 15,
        }
    }
}

impl Policy {
    /// Refuses settings the loop cannot work with, naming the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_replicas == 0 {
            return Err("[autoscale] min_replicas must be at least 1".into());
        }
        if self.max_replicas < self.min_replicas {
            return Err("[autoscale] max_replicas must be at least min_replicas".into());
        }
        if self.tolerance.is_nan() || self.tolerance < 0.0 || self.tolerance >= 1.0 {
            return Err("[autoscale] tolerance must be in [0, 1)".into());
        }
        if self.target_connections < 0.0 || self.target_cpu_percent < 0.0 {
            return Err("[autoscale] targets must not be negative".into());
        }
        if self.interval_secs.is_nan() || self.interval_secs < 0.1 {
            return Err("[autoscale] interval_secs must be at least 0.1".into());
        }
        if self.max_step_up == 0 {
            return Err("[autoscale] max_step_up must be at least 1".into());
        }
        Ok(())
    }

    pub fn stabilization(&self) -> Duration {
        Duration::from_secs(self.stabilization_secs)
    }
}

/// What the host has left (sysinfo).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct HostResources {
    pub available_memory_bytes: u64,
    /// CPU use of the whole host, percent of all cores (0..=100).
    pub cpu_percent: f64,
    pub cpus: u32,
    pub load_average_1m: f64,
}

/// One observation of the servers that count (running, not draining).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observations {
    /// Milliseconds on the supervisor's monotonic clock.
    pub now_ms: u64,
    /// Servers that count as current replicas.
    pub current: u32,
    /// Open connections of each server that reported them.
    pub connections: Vec<f64>,
    /// CPU% of each server that reported it (100 = one core).
    pub cpu_percent: Vec<f64>,
    /// Memory of each server that reported it.
    pub memory_bytes: Vec<u64>,
    pub host: Option<HostResources>,
}

/// Recommendations of earlier decisions (for the scale-down window).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    /// When the supervisor started watching (ms, same clock as `now_ms`).
    pub started_ms: u64,
    /// `(now_ms, recommendation)`, oldest first.
    pub recommendations: VecDeque<(u64, u32)>,
}

impl History {
    pub fn new(started_ms: u64) -> Self {
        Self {
            started_ms,
            recommendations: VecDeque::new(),
        }
    }

    /// Remembers a decision's recommendation and forgets what fell out of the window.
    pub fn record(&mut self, decision: &ScaleDecision, window: Duration) {
        self.recommendations
            .push_back((decision.now_ms, decision.recommended));
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        while let Some(&(t, _)) = self.recommendations.front() {
            if decision.now_ms.saturating_sub(t) > window_ms {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }
}

/// What one metric recommends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecommendation {
    /// `connections` or `cpu`.
    pub metric: String,
    /// Average per server.
    pub observed: f64,
    pub target: f64,
    pub ratio: f64,
    pub desired: u32,
    /// Within the tolerance: no change on this metric.
    pub within_tolerance: bool,
}

/// What bounded the desired number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    MinReplicas,
    MaxReplicas,
    StepUp,
    Stabilization,
    HostMemory,
    HostCpu,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleDecision {
    pub now_ms: u64,
    pub current: u32,
    /// The number to run now.
    pub desired: u32,
    /// What the metrics asked for, clamped to min/max, before the window and host limits
    /// (what the scale-down window remembers).
    pub recommended: u32,
    pub metrics: Vec<MetricRecommendation>,
    /// Every bound that changed the number, in the order applied.
    pub limits: Vec<Limit>,
    /// One sentence for `chatctl status`.
    pub reason: String,
}

impl ScaleDecision {
    pub fn is_change(&self) -> bool {
        self.desired != self.current
    }

    pub fn limited_by(&self, limit: Limit) -> bool {
        self.limits.contains(&limit)
    }
}

fn average(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn recommend(
    metric: &str,
    values: &[f64],
    target: f64,
    current: u32,
    tolerance: f64,
) -> Option<MetricRecommendation> {
    if target <= 0.0 {
        return None;
    }
    let observed = average(values)?;
    let ratio = observed / target;
    let within = (ratio - 1.0).abs() <= tolerance;
    let desired = if within {
        current
    } else {
        let raw = (ratio * f64::from(current)).ceil();
        if raw.is_finite() && raw > 0.0 {
            raw.min(f64::from(u32::MAX)) as u32
        } else {
            0
        }
    };
    Some(MetricRecommendation {
        metric: metric.to_owned(),
        observed,
        target,
        ratio,
        desired,
        within_tolerance: within,
    })
}

const MIB: u64 = 1024 * 1024;

/// The HPA rule (see the module documentation). `history` is read, not changed: the caller
/// records the decision with [`History::record`].
pub fn decide(obs: &Observations, policy: &Policy, history: &History) -> ScaleDecision {
    let current = obs.current;
    let mut limits = Vec::new();
    let metrics: Vec<MetricRecommendation> = [
        recommend(
            "connections",
            &obs.connections,
            policy.target_connections,
            current,
            policy.tolerance,
        ),
        recommend(
            "cpu",
            &obs.cpu_percent,
            policy.target_cpu_percent,
            current,
            policy.tolerance,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    // No metric at all (nothing reported yet): keep what runs.
    let raw = metrics.iter().map(|m| m.desired).max().unwrap_or(current);
    let mut recommended = raw;
    if recommended < policy.min_replicas {
        recommended = policy.min_replicas;
        limits.push(Limit::MinReplicas);
    }
    if recommended > policy.max_replicas {
        recommended = policy.max_replicas;
        limits.push(Limit::MaxReplicas);
    }
    let mut desired = recommended;
    if desired < current {
        let window_ms = u64::try_from(policy.stabilization().as_millis()).unwrap_or(u64::MAX);
        let watched_long_enough = obs.now_ms.saturating_sub(history.started_ms) >= window_ms;
        let highest_in_window = history
            .recommendations
            .iter()
            .filter(|(t, _)| obs.now_ms.saturating_sub(*t) <= window_ms)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        let floor = if watched_long_enough {
            highest_in_window.max(recommended)
        } else {
            current
        };
        if floor > desired {
            desired = floor.min(current);
            limits.push(Limit::Stabilization);
        }
    }
    if desired > current {
        let stepped = current.saturating_add(policy.max_step_up);
        if desired > stepped {
            desired = stepped;
            limits.push(Limit::StepUp);
        }
        if let Some(host) = obs.host {
            let per_server = obs
                .memory_bytes
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .max(policy.server_memory_estimate_mib * MIB)
                .max(1);
            let spare = host
                .available_memory_bytes
                .saturating_sub(policy.host_memory_reserve_mib * MIB);
            let fit = u32::try_from(spare / per_server).unwrap_or(u32::MAX);
            let by_memory = current.saturating_add(fit);
            if desired > by_memory {
                desired = by_memory.max(current);
                limits.push(Limit::HostMemory);
            }
            if host.cpu_percent > policy.host_cpu_ceiling_percent && desired > current {
                desired = current;
                limits.push(Limit::HostCpu);
            }
        }
    }
    let reason = explain(
        current,
        desired,
        recommended,
        &metrics,
        &limits,
        obs,
        policy,
    );
    ScaleDecision {
        now_ms: obs.now_ms,
        current,
        desired,
        recommended,
        metrics,
        limits,
        reason,
    }
}

fn explain(
    current: u32,
    desired: u32,
    recommended: u32,
    metrics: &[MetricRecommendation],
    limits: &[Limit],
    obs: &Observations,
    policy: &Policy,
) -> String {
    let driving: Vec<String> = metrics
        .iter()
        .map(|m| {
            format!(
                "{} {:.1}/{:.0} per server ({}{:.2}) -> {}",
                m.metric,
                m.observed,
                m.target,
                if m.within_tolerance {
                    "within tolerance, ratio "
                } else {
                    "ratio "
                },
                m.ratio,
                m.desired
            )
        })
        .collect();
    let what = match desired.cmp(&current) {
        std::cmp::Ordering::Greater => format!("scale up {current} -> {desired}"),
        std::cmp::Ordering::Less => format!("scale down {current} -> {desired}"),
        std::cmp::Ordering::Equal => format!("keep {current}"),
    };
    let mut text = if driving.is_empty() {
        format!("{what}: no metrics reported yet")
    } else {
        format!("{what}: {}", driving.join("; "))
    };
    for limit in limits {
        let note = match limit {
            Limit::MinReplicas => format!("held at min_replicas {}", policy.min_replicas),
            Limit::MaxReplicas => format!("capped at max_replicas {}", policy.max_replicas),
            Limit::StepUp => format!("at most {} more per step", policy.max_step_up),
            Limit::Stabilization => format!(
                "scale-down to {recommended} waits for {} s of lower recommendations",
                policy.stabilization_secs
            ),
            Limit::HostMemory => format!(
                "HOST LIMIT: free memory {} MiB (keeping {} MiB) fits no more servers",
                obs.host.map_or(0, |h| h.available_memory_bytes / MIB),
                policy.host_memory_reserve_mib
            ),
            Limit::HostCpu => format!(
                "HOST LIMIT: host CPU {:.0}% is above {:.0}%",
                obs.host.map_or(0.0, |h| h.cpu_percent),
                policy.host_cpu_ceiling_percent
            ),
        };
        text.push_str("; ");
        text.push_str(&note);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * MIB;

    fn policy() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 10,
            target_connections: 100.0,
            target_cpu_percent: 50.0,
            stabilization_secs: 300,
            ..Policy::default()
        }
    }

    fn plenty() -> Option<HostResources> {
        Some(HostResources {
            available_memory_bytes: 64 * GIB,
            cpu_percent: 10.0,
            cpus: 16,
            load_average_1m: 0.5,
        })
    }

    /// One row of the table: what is observed, and what must be decided.
    struct Case {
        name: &'static str,
        current: u32,
        connections: &'static [f64],
        cpu: &'static [f64],
        desired: u32,
        limits: &'static [Limit],
    }

    /// A supervisor that has watched for longer than the window, with no earlier recommendation.
    fn settled() -> History {
        History::new(0)
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn hpa_rule_table() {
        let cases = [
            Case {
                name: "exactly at target: keep",
                current: 3,
                connections: &[100.0, 100.0, 100.0],
                cpu: &[],
                desired: 3,
                limits: &[],
            },
            Case {
                name: "ratio 1.08 is within tolerance 0.1: keep",
                current: 3,
                connections: &[108.0, 108.0, 108.0],
                cpu: &[],
                desired: 3,
                limits: &[],
            },
            Case {
                name: "ratio 1.5: ceil(3 x 1.5) = 5",
                current: 3,
                connections: &[150.0, 150.0, 150.0],
                cpu: &[],
                desired: 5,
                limits: &[],
            },
            Case {
                name: "averages over servers: mean 200 of 100 doubles",
                current: 2,
                connections: &[350.0, 50.0],
                cpu: &[],
                desired: 4,
                limits: &[],
            },
            Case {
                name: "largest metric wins: cpu asks more than connections",
                current: 2,
                connections: &[120.0, 120.0],
                cpu: &[150.0, 150.0],
                desired: 6,
                limits: &[],
            },
            Case {
                name: "step bound: 1 -> 10 asked, +4 allowed",
                current: 1,
                connections: &[1000.0],
                cpu: &[],
                desired: 5,
                limits: &[Limit::StepUp],
            },
            Case {
                name: "max replicas caps",
                current: 8,
                connections: &[200.0; 8],
                cpu: &[],
                desired: 10,
                limits: &[Limit::MaxReplicas],
            },
            Case {
                name: "below min is raised at once",
                current: 0,
                connections: &[],
                cpu: &[],
                desired: 1,
                limits: &[Limit::MinReplicas],
            },
            Case {
                name: "idle, settled window: scale down to min",
                current: 4,
                connections: &[0.0; 4],
                cpu: &[],
                desired: 1,
                limits: &[Limit::MinReplicas],
            },
            Case {
                name: "no metrics reported: keep",
                current: 3,
                connections: &[],
                cpu: &[],
                desired: 3,
                limits: &[],
            },
            Case {
                name: "half load: ceil(4 x 0.5) = 2",
                current: 4,
                connections: &[50.0; 4],
                cpu: &[],
                desired: 2,
                limits: &[],
            },
        ];
        for case in cases {
            let obs = Observations {
                now_ms: NOW,
                current: case.current,
                connections: case.connections.to_vec(),
                cpu_percent: case.cpu.to_vec(),
                memory_bytes: vec![],
                host: plenty(),
            };
            let d = decide(&obs, &policy(), &settled());
            assert_eq!(d.desired, case.desired, "{}: {}", case.name, d.reason);
            assert_eq!(d.limits, case.limits, "{}: {}", case.name, d.reason);
        }
    }

    fn idle(current: u32, now_ms: u64) -> Observations {
        Observations {
            now_ms,
            current,
            connections: vec![0.0; current as usize],
            cpu_percent: vec![],
            memory_bytes: vec![],
            host: plenty(),
        }
    }

    #[test]
    fn no_scale_down_before_a_whole_window_was_watched() {
        let history = History::new(NOW - 10_000);
        let d = decide(&idle(3, NOW), &policy(), &history);
        assert_eq!(d.desired, 3, "{}", d.reason);
        assert!(d.limited_by(Limit::Stabilization));
        assert_eq!(d.recommended, 1);
    }

    #[test]
    fn scale_down_waits_for_every_recommendation_in_the_window_to_be_lower() {
        let p = policy();
        let mut history = History::new(0);
        // 200 s ago the load asked for 3; now it asks for 1.
        history.recommendations.push_back((NOW - 200_000, 3));
        history.recommendations.push_back((NOW - 100_000, 1));
        let d = decide(&idle(3, NOW), &p, &history);
        assert_eq!(d.desired, 3, "{}", d.reason);
        // Once the high recommendation is older than the window, down to what remains.
        history.recommendations.push_back((NOW + 50_000, 2));
        let d = decide(&idle(3, NOW + 101_000), &p, &history);
        assert_eq!(d.desired, 2, "{}", d.reason);
        assert!(d.limited_by(Limit::Stabilization));
        let d = decide(&idle(3, NOW + 400_000), &p, &history);
        assert_eq!(d.desired, 1, "{}", d.reason);
    }

    #[test]
    fn scale_up_ignores_the_window() {
        let history = History::new(NOW);
        let mut obs = idle(2, NOW);
        obs.connections = vec![300.0, 300.0];
        let d = decide(&obs, &policy(), &history);
        assert_eq!(d.desired, 6);
        assert!(d.reason.starts_with("scale up 2 -> 6"), "{}", d.reason);
    }

    #[test]
    fn history_forgets_what_left_the_window() {
        let p = Policy {
            stabilization_secs: 5,
            ..policy()
        };
        let mut history = History::new(0);
        for (i, r) in [(0u64, 4u32), (3, 3), (7, 1)] {
            let mut d = decide(&idle(1, i * 1000), &p, &history);
            d.recommended = r;
            history.record(&d, p.stabilization());
        }
        assert_eq!(
            history.recommendations.iter().copied().collect::<Vec<_>>(),
            [(3000, 3), (7000, 1)]
        );
    }

    #[test]
    fn host_memory_caps_scale_up_and_says_so() {
        let mut obs = idle(2, NOW);
        obs.connections = vec![400.0, 400.0];
        obs.memory_bytes = vec![100 * MIB, 90 * MIB];
        obs.host = Some(HostResources {
            available_memory_bytes: 512 * MIB + 250 * MIB,
            cpu_percent: 20.0,
            cpus: 2,
            load_average_1m: 1.0,
        });
        let d = decide(&obs, &policy(), &settled());
        // 250 MiB spare fits two more servers of 100 MiB (the largest measured).
        assert_eq!(d.desired, 4, "{}", d.reason);
        assert!(d.limited_by(Limit::HostMemory));
        assert!(d.reason.contains("HOST LIMIT"), "{}", d.reason);
    }

    #[test]
    fn a_busy_host_gets_no_new_servers() {
        let mut obs = idle(2, NOW);
        obs.connections = vec![400.0, 400.0];
        obs.host = Some(HostResources {
            available_memory_bytes: 64 * GIB,
            cpu_percent: 97.0,
            cpus: 2,
            load_average_1m: 4.0,
        });
        let d = decide(&obs, &policy(), &settled());
        assert_eq!(d.desired, 2);
        assert!(d.limited_by(Limit::HostCpu), "{}", d.reason);
    }

    #[test]
    fn the_host_limit_never_scales_down() {
        let mut obs = idle(3, NOW);
        obs.connections = vec![100.0; 3];
        obs.host = Some(HostResources {
            available_memory_bytes: 0,
            cpu_percent: 100.0,
            cpus: 2,
            load_average_1m: 9.0,
        });
        assert_eq!(decide(&obs, &policy(), &settled()).desired, 3);
    }

    #[test]
    fn a_disabled_metric_recommends_nothing() {
        let p = Policy {
            target_cpu_percent: 0.0,
            ..policy()
        };
        let mut obs = idle(2, NOW);
        obs.connections = vec![100.0, 100.0];
        obs.cpu_percent = vec![500.0, 500.0];
        let d = decide(&obs, &p, &settled());
        assert_eq!(d.desired, 2);
        assert_eq!(d.metrics.len(), 1);
    }

    #[test]
    fn policies_that_cannot_work_are_refused_with_the_key_to_fix() {
        let bad = Policy {
            min_replicas: 3,
            max_replicas: 2,
            ..Policy::default()
        };
        assert!(
            bad.validate()
                .expect_err("refused")
                .contains("max_replicas")
        );
        assert!(Policy::default().validate().is_ok());
        let toml_text = "min_replicas = 2\nstabilization_secs = 5\n";
        let p: Policy = toml::from_str(toml_text).expect("toml");
        assert_eq!(
            (p.min_replicas, p.stabilization_secs, p.max_replicas),
            (2, 5, 8)
        );
        assert!(toml::from_str::<Policy>("min_replica = 2\n").is_err());
    }
}
