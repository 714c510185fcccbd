//! The pipeline's own telemetry, through the [`metrics`] facade: nothing is
//! recorded until the program installs a recorder (for example the
//! Prometheus exporter of the `cd` crate, feature `prometheus-exporter`),
//! and then every [`Runner`](crate::Runner) reports:
//!
//! | metric | kind | labels | unit |
//! |---|---|---|---|
//! | `cd_runs_total` | counter | `pipeline`, `environment`, `status` | runs |
//! | `cd_run_duration_seconds` | histogram | `pipeline`, `environment`, `status` | seconds |
//! | `cd_node_duration_seconds` | histogram | `pipeline`, `node`, `status` (`succeeded`, `failed`) | seconds |
//! | `cd_rollbacks_total` | counter | `pipeline`, `environment`, `node`, `status` (`ok`, `failed`) | rollbacks |
//! | `cd_gate_wait_seconds` | histogram | `pipeline`, `node`, `outcome` (`passed`, `failed`) | seconds |
//! | `cd_lock_wait_seconds` | histogram | `environment` | seconds |
//! | `cd_targets_switched_total` | counter | `environment` | targets |
//!
//! Durations are wall time in seconds, as Prometheus' conventions ask.
//! [`describe`] registers the descriptions and units with the recorder.
//!
//! The runner also opens `tracing` spans: `run` (fields `run_id`,
//! `pipeline`, `release`, `environment`) around a run and `node` (`node`,
//! `attempt`) inside it around each stage attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::{counter, histogram, SharedString, Unit};

use crate::event::{Event, EventKind, EventSink};

/// `cd_runs_total`.
pub const RUNS_TOTAL: &str = "cd_runs_total";
/// `cd_run_duration_seconds`.
pub const RUN_DURATION: &str = "cd_run_duration_seconds";
/// `cd_node_duration_seconds`.
pub const NODE_DURATION: &str = "cd_node_duration_seconds";
/// `cd_rollbacks_total`.
pub const ROLLBACKS_TOTAL: &str = "cd_rollbacks_total";
/// `cd_gate_wait_seconds`.
pub const GATE_WAIT: &str = "cd_gate_wait_seconds";
/// `cd_lock_wait_seconds`.
pub const LOCK_WAIT: &str = "cd_lock_wait_seconds";
/// `cd_targets_switched_total`.
pub const TARGETS_SWITCHED: &str = "cd_targets_switched_total";

/// Registers every metric's description and unit with the installed
/// recorder (call it once after installing one).
pub fn describe() {
    metrics::describe_counter!(RUNS_TOTAL, Unit::Count, "Runs finished, by status.");
    metrics::describe_histogram!(RUN_DURATION, Unit::Seconds, "Wall time of a run.");
    metrics::describe_histogram!(
        NODE_DURATION,
        Unit::Seconds,
        "Wall time of a node's last attempt."
    );
    metrics::describe_counter!(
        ROLLBACKS_TOTAL,
        Unit::Count,
        "Nodes compensated (rolled back), by outcome."
    );
    metrics::describe_histogram!(
        GATE_WAIT,
        Unit::Seconds,
        "Time a gate spent waiting before it passed or failed."
    );
    metrics::describe_histogram!(
        LOCK_WAIT,
        Unit::Seconds,
        "Time a run waited for its environment lock."
    );
    metrics::describe_counter!(
        TARGETS_SWITCHED,
        Unit::Count,
        "Deploy targets switched to a new release."
    );
}

/// Counts one target switched in `environment` (called by the strategies).
pub(crate) fn target_switched(environment: &str) {
    counter!(TARGETS_SWITCHED, "environment" => environment.to_string()).increment(1);
}

#[derive(Default)]
struct State {
    started: Option<Instant>,
    nodes: HashMap<Arc<str>, Instant>,
    gates: HashMap<Arc<str>, Instant>,
    lock_waiting: Option<Instant>,
}

/// Turns one run's events into metrics.
pub(crate) struct MetricsSink {
    pipeline: Arc<str>,
    environment: Arc<str>,
    state: Mutex<State>,
}

impl MetricsSink {
    pub(crate) fn new(pipeline: &str, environment: &str) -> Self {
        MetricsSink {
            pipeline: Arc::from(pipeline),
            environment: Arc::from(environment),
            state: Mutex::new(State {
                started: Some(Instant::now()),
                ..Default::default()
            }),
        }
    }

    fn since(t: Option<Instant>) -> f64 {
        t.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0)
    }
}

impl EventSink for MetricsSink {
    fn emit(&self, event: &Event) {
        let interesting = matches!(
            event.kind,
            EventKind::RunFinished { .. }
                | EventKind::NodeStarted { .. }
                | EventKind::NodeSucceeded { .. }
                | EventKind::NodeFailed { .. }
                | EventKind::RolledBack { .. }
                | EventKind::RollbackFailed { .. }
                | EventKind::GateWaiting { .. }
                | EventKind::GatePassed
                | EventKind::GateFailed { .. }
                | EventKind::Lock { .. }
        );
        if !interesting {
            return;
        }
        // Labels share the run's strings: no allocation per event.
        let node_arc: Arc<str> = event.node.clone().unwrap_or_else(|| Arc::from("-"));
        let node = SharedString::from_shared(node_arc.clone());
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let p = SharedString::from_shared(self.pipeline.clone());
        let e = SharedString::from_shared(self.environment.clone());
        match &event.kind {
            EventKind::RunFinished { status } => {
                let status = status.as_str();
                counter!(RUNS_TOTAL, "pipeline" => p.clone(), "environment" => e.clone(), "status" => status)
                    .increment(1);
                histogram!(RUN_DURATION, "pipeline" => p, "environment" => e, "status" => status)
                    .record(Self::since(st.started));
            }
            EventKind::NodeStarted { .. } => {
                st.nodes.insert(node_arc, Instant::now());
            }
            EventKind::NodeSucceeded { duration_ms } => {
                st.nodes.remove(&node_arc);
                histogram!(NODE_DURATION, "pipeline" => p, "node" => node, "status" => "succeeded")
                    .record(*duration_ms as f64 / 1000.0);
            }
            EventKind::NodeFailed { .. } => {
                let t = st.nodes.remove(&node_arc);
                histogram!(NODE_DURATION, "pipeline" => p, "node" => node, "status" => "failed")
                    .record(Self::since(t));
            }
            EventKind::RolledBack { .. } | EventKind::RollbackFailed { .. } => {
                let status = if matches!(event.kind, EventKind::RolledBack { .. }) {
                    "ok"
                } else {
                    "failed"
                };
                counter!(ROLLBACKS_TOTAL, "pipeline" => p, "environment" => e, "node" => node, "status" => status)
                    .increment(1);
            }
            EventKind::GateWaiting { .. } => {
                st.gates.entry(node_arc).or_insert_with(Instant::now);
            }
            EventKind::GatePassed | EventKind::GateFailed { .. } => {
                let outcome = if matches!(event.kind, EventKind::GatePassed) {
                    "passed"
                } else {
                    "failed"
                };
                let t = st.gates.remove(&node_arc);
                histogram!(GATE_WAIT, "pipeline" => p, "node" => node, "outcome" => outcome)
                    .record(Self::since(t));
            }
            EventKind::Lock { status, .. } if status == "waiting" => {
                st.lock_waiting.get_or_insert_with(Instant::now);
            }
            EventKind::Lock { status, .. } if status == "acquired" => {
                let t = st.lock_waiting.take();
                histogram!(LOCK_WAIT, "environment" => e).record(Self::since(t));
            }
            _ => {}
        }
    }
}
