//! Typed events, delivered to sinks while a run goes on.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ErrorInfo;
use crate::secret::Redactor;

/// Severity of a [`EventKind::Log`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Detail for debugging.
    Debug,
    /// Normal progress.
    Info,
    /// Something to look at.
    Warn,
    /// Something failed.
    Error,
}

/// The outcome of a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still going (or interrupted by a crash; see `Runner::resume`).
    Running,
    /// Every node succeeded.
    Succeeded,
    /// A node failed; compensation ran.
    Failed,
    /// Cancelled by its token; compensation ran.
    Cancelled,
    /// Its process died and the run was given up (`Runner::abandon`, `cdctl
    /// run abandon`, or a new run on the environment found the owner gone);
    /// nothing ran after the crash. Not resumable.
    Abandoned,
}

impl RunStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Abandoned => "abandoned",
        }
    }

    /// Parses [`RunStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "abandoned" => RunStatus::Abandoned,
            _ => return None,
        })
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A run began.
    RunStarted {
        /// Pipeline name.
        pipeline: String,
        /// Release version.
        release: String,
        /// Environment.
        environment: String,
    },
    /// A run was resumed after an interruption.
    RunResumed,
    /// A run ended.
    RunFinished {
        /// How it ended.
        status: RunStatus,
    },
    /// A run whose process died was given up.
    RunAbandoned {
        /// Who gave it up.
        actor: String,
        /// Why.
        reason: String,
    },
    /// A node began an attempt.
    NodeStarted {
        /// 1-based attempt number.
        attempt: u32,
    },
    /// A node succeeded.
    NodeSucceeded {
        /// Wall time of the successful attempt.
        duration_ms: u64,
    },
    /// A node failed for good.
    NodeFailed {
        /// Why.
        error: ErrorInfo,
    },
    /// A node failed with a retryable error and will run again.
    NodeRetrying {
        /// The attempt that failed.
        attempt: u32,
        /// Wait before the next attempt.
        delay_ms: u64,
        /// Why it failed.
        error: ErrorInfo,
    },
    /// A node ran past its timeout.
    NodeTimedOut {
        /// The timeout.
        timeout_ms: u64,
    },
    /// A node did not run.
    NodeSkipped {
        /// Why (an upstream failure, cancellation, already done).
        reason: String,
    },
    /// A node's run was cancelled.
    NodeCancelled,
    /// Compensation began for a completed node.
    RollbackStarted,
    /// Compensation finished for a node.
    RolledBack {
        /// Wall time.
        duration_ms: u64,
    },
    /// Compensation failed for a node.
    RollbackFailed {
        /// Why.
        error: ErrorInfo,
    },
    /// A gate said wait.
    GateWaiting {
        /// Why it waits.
        reason: String,
        /// When it is asked again.
        recheck_after_ms: u64,
    },
    /// A gate passed.
    GatePassed,
    /// A gate failed.
    GateFailed {
        /// Why.
        reason: String,
    },
    /// One step on one target (upload to a host, a health check, a batch).
    Progress {
        /// The target, if any.
        target: Option<String>,
        /// The step (`upload`, `switch`, `restart`, `health`, `batch 2/3`).
        step: String,
        /// `started`, `ok`, `failed`, `skipped`, ...
        status: String,
        /// Wall time of the step when it ended.
        duration_ms: Option<u64>,
        /// Extra information.
        message: Option<String>,
    },
    /// A rollout strategy moved on (a canary step, a slot switch).
    Rollout {
        /// The strategy (`rolling`, `blue_green`, `canary`).
        strategy: String,
        /// What happened, for a person.
        message: String,
    },
    /// One analysis sample.
    AnalysisSample {
        /// The monitor's name.
        monitor: String,
        /// `ok`, `failing`, `no_data` or `error`.
        status: String,
        /// The measured value, if any.
        value: Option<f64>,
        /// Explanation.
        detail: String,
    },
    /// A line of log from a node or a tool it runs.
    Log {
        /// Severity.
        level: LogLevel,
        /// The line.
        message: String,
    },
    /// An environment lock was taken or released.
    Lock {
        /// Environment.
        environment: String,
        /// `acquired`, `waiting`, `released`, `renewed`, `lost`.
        status: String,
        /// Holder or waiting reason.
        message: String,
    },
    /// Anything else a stage wants recorded.
    Custom {
        /// The event's name.
        name: String,
        /// Its data.
        data: serde_json::Value,
    },
}

/// One event of one run, numbered and timestamped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The run (shared: cloning an event copies no strings).
    pub run_id: Arc<str>,
    /// Sequence number within the run, from 1, without gaps.
    pub seq: u64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The node it concerns, if any.
    pub node: Option<Arc<str>>,
    /// What happened.
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = self.node.as_deref().unwrap_or("-");
        write!(
            f,
            "#{} {} [{}] ",
            self.seq,
            self.at.format("%H:%M:%S%.3f"),
            node
        )?;
        match &self.kind {
            EventKind::RunStarted {
                pipeline,
                release,
                environment,
            } => {
                write!(
                    f,
                    "run started: pipeline {pipeline}, release {release}, env {environment}"
                )
            }
            EventKind::RunResumed => write!(f, "run resumed"),
            EventKind::RunFinished { status } => write!(f, "run finished: {status}"),
            EventKind::RunAbandoned { actor, reason } => {
                write!(f, "run abandoned by {actor}: {reason}")
            }
            EventKind::NodeStarted { attempt } => write!(f, "started (attempt {attempt})"),
            EventKind::NodeSucceeded { duration_ms } => write!(f, "succeeded in {duration_ms} ms"),
            EventKind::NodeFailed { error } => write!(f, "failed: {error}"),
            EventKind::NodeRetrying {
                attempt,
                delay_ms,
                error,
            } => {
                write!(
                    f,
                    "attempt {attempt} failed ({error}); retrying in {delay_ms} ms"
                )
            }
            EventKind::NodeTimedOut { timeout_ms } => write!(f, "timed out after {timeout_ms} ms"),
            EventKind::NodeSkipped { reason } => write!(f, "skipped: {reason}"),
            EventKind::NodeCancelled => write!(f, "cancelled"),
            EventKind::RollbackStarted => write!(f, "rolling back"),
            EventKind::RolledBack { duration_ms } => write!(f, "rolled back in {duration_ms} ms"),
            EventKind::RollbackFailed { error } => write!(f, "rollback failed: {error}"),
            EventKind::GateWaiting {
                reason,
                recheck_after_ms,
            } => {
                write!(f, "waiting: {reason} (recheck in {recheck_after_ms} ms)")
            }
            EventKind::GatePassed => write!(f, "gate passed"),
            EventKind::GateFailed { reason } => write!(f, "gate failed: {reason}"),
            EventKind::Progress {
                target,
                step,
                status,
                duration_ms,
                message,
            } => {
                if let Some(t) = target {
                    write!(f, "{t}: ")?;
                }
                write!(f, "{step} {status}")?;
                if let Some(ms) = duration_ms {
                    write!(f, " ({ms} ms)")?;
                }
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            EventKind::Rollout { strategy, message } => write!(f, "{strategy}: {message}"),
            EventKind::AnalysisSample {
                monitor,
                status,
                value,
                detail,
            } => {
                write!(f, "analysis {monitor}: {status}")?;
                if let Some(v) = value {
                    write!(f, " value={v}")?;
                }
                write!(f, " {detail}")
            }
            EventKind::Log { level, message } => write!(f, "{level:?}: {message}"),
            EventKind::Lock {
                environment,
                status,
                message,
            } => {
                write!(f, "lock {environment} {status}: {message}")
            }
            EventKind::Custom { name, data } => write!(f, "{name}: {data}"),
        }
    }
}

/// Receives events. Sinks must not block: hand slow work to a task.
pub trait EventSink: Send + Sync {
    /// Called once per event, in sequence order within a run.
    fn emit(&self, event: &Event);
}

/// A sink that forwards events to `tracing` (target `cd::event`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingSink;

impl EventSink for TracingSink {
    fn emit(&self, event: &Event) {
        match &event.kind {
            EventKind::NodeFailed { .. }
            | EventKind::RollbackFailed { .. }
            | EventKind::GateFailed { .. }
            | EventKind::Log {
                level: LogLevel::Error,
                ..
            } => {
                tracing::error!(target: "cd::event", run = %event.run_id, "{event}")
            }
            EventKind::NodeRetrying { .. }
            | EventKind::NodeTimedOut { .. }
            | EventKind::Log {
                level: LogLevel::Warn,
                ..
            } => {
                tracing::warn!(target: "cd::event", run = %event.run_id, "{event}")
            }
            EventKind::Log {
                level: LogLevel::Debug,
                ..
            } => {
                tracing::debug!(target: "cd::event", run = %event.run_id, "{event}")
            }
            _ => tracing::info!(target: "cd::event", run = %event.run_id, "{event}"),
        }
    }
}

/// A sink that keeps every event in memory (handy in tests).
#[derive(Debug, Default, Clone)]
pub struct CollectingSink {
    events: Arc<Mutex<Vec<Event>>>,
}

impl CollectingSink {
    /// A new, empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// All events received so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("sink lock").clone()
    }
}

impl EventSink for CollectingSink {
    fn emit(&self, event: &Event) {
        self.events.lock().expect("sink lock").push(event.clone());
    }
}

/// A sink built from a closure.
pub struct FnSink<F>(pub F);

impl<F: Fn(&Event) + Send + Sync> EventSink for FnSink<F> {
    fn emit(&self, event: &Event) {
        (self.0)(event)
    }
}

/// Numbers, redacts and delivers a run's events. Cloned into every node.
#[derive(Clone)]
pub struct Emitter {
    inner: Arc<EmitterInner>,
    node: Option<Arc<str>>,
}

struct EmitterInner {
    run_id: Arc<str>,
    seq: AtomicU64,
    sinks: Vec<Arc<dyn EventSink>>,
    redactor: Redactor,
    // Serialises numbering and delivery so sinks see events in order.
    order: Mutex<()>,
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emitter")
            .field("run_id", &self.inner.run_id)
            .field("node", &self.node)
            .finish()
    }
}

impl Emitter {
    /// An emitter for `run_id` whose next event gets sequence `next_seq`.
    pub fn new(
        run_id: impl Into<String>,
        next_seq: u64,
        sinks: Vec<Arc<dyn EventSink>>,
        redactor: Redactor,
    ) -> Self {
        Emitter {
            inner: Arc::new(EmitterInner {
                run_id: Arc::from(run_id.into()),
                seq: AtomicU64::new(next_seq.max(1)),
                sinks,
                redactor,
                order: Mutex::new(()),
            }),
            node: None,
        }
    }

    /// An emitter that drops everything (for calling deployers outside a run).
    pub fn noop() -> Self {
        Self::new("-", 1, Vec::new(), Redactor::default())
    }

    /// The same emitter, attributing events to `node`.
    pub fn for_node(&self, node: &str) -> Self {
        Emitter {
            inner: self.inner.clone(),
            node: Some(Arc::from(node)),
        }
    }

    /// The same emitter, attributing events to a shared node name.
    pub fn for_node_arc(&self, node: Arc<str>) -> Self {
        Emitter {
            inner: self.inner.clone(),
            node: Some(node),
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The node events are attributed to.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The redactor applied to every event.
    pub fn redactor(&self) -> &Redactor {
        &self.inner.redactor
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.seq.load(Ordering::SeqCst)
    }

    /// Emits an event attributed to this emitter's node.
    pub fn emit(&self, kind: EventKind) {
        self.emit_shared(self.node.clone(), kind)
    }

    /// Emits an event attributed to `node`.
    pub fn emit_for(&self, node: Option<&str>, kind: EventKind) {
        self.emit_shared(node.map(Arc::from), kind)
    }

    fn emit_shared(&self, node: Option<Arc<str>>, kind: EventKind) {
        let kind = self.redact(kind);
        let _order = self.inner.order.lock().expect("emitter lock");
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst);
        let event = Event {
            run_id: self.inner.run_id.clone(),
            seq,
            at: Utc::now(),
            node,
            kind,
        };
        for sink in &self.inner.sinks {
            sink.emit(&event);
        }
    }

    /// Emits a log line.
    pub fn log(&self, level: LogLevel, message: impl Into<String>) {
        self.emit(EventKind::Log {
            level,
            message: message.into(),
        })
    }

    /// Emits an info log line.
    pub fn info(&self, message: impl Into<String>) {
        self.log(LogLevel::Info, message)
    }

    /// Emits a warning log line.
    pub fn warn(&self, message: impl Into<String>) {
        self.log(LogLevel::Warn, message)
    }

    /// Emits a progress event for one step on one target.
    pub fn progress(
        &self,
        target: Option<&str>,
        step: &str,
        status: &str,
        duration: Option<std::time::Duration>,
        message: Option<String>,
    ) {
        self.emit(EventKind::Progress {
            target: target.map(str::to_string),
            step: step.to_string(),
            status: status.to_string(),
            duration_ms: duration.map(|d| d.as_millis() as u64),
            message,
        })
    }

    fn redact(&self, kind: EventKind) -> EventKind {
        if self.inner.redactor.is_empty() {
            return kind;
        }
        let mut value = match serde_json::to_value(&kind) {
            Ok(v) => v,
            Err(_) => return kind,
        };
        self.inner.redactor.scrub_json(&mut value);
        serde_json::from_value(value).unwrap_or(EventKind::Log {
            level: LogLevel::Warn,
            message: "event withheld: redaction failed".into(),
        })
    }
}
