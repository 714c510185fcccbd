//! Run reports: how a run and each of its nodes went. `Display` prints a
//! table of nodes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorInfo, ErrorKind, Result};
use crate::event::RunStatus;
use crate::store::NodeStatus;

/// How one node went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// What it is (the stage's or gate's `kind()`).
    pub kind: String,
    /// How it ended.
    pub status: NodeStatus,
    /// Attempts made: the first run and each retry. A gate's rechecks after
    /// `Wait` are not attempts (see `checks`).
    pub attempts: u32,
    /// For a gate: how many times it was evaluated in all (first evaluation
    /// and rechecks after `Wait`).
    #[serde(default)]
    pub checks: u32,
    /// For a gate: time spent waiting between a `Wait` verdict and the
    /// recheck, summed (in this process; a resumed run counts from resume).
    #[serde(default)]
    pub waited: Duration,
    /// Wall time from first start to end.
    pub duration: Option<Duration>,
    /// Why it failed, if it did.
    pub error: Option<ErrorInfo>,
    /// What it produced.
    pub output: Option<serde_json::Value>,
    /// Whether it is a `finally` node.
    pub finally: bool,
}

/// How a run went. `Display` prints a table of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run's id (for `cdctl run show` and `Runner::resume`).
    pub run_id: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The release version.
    pub release: String,
    /// The environment.
    pub environment: String,
    /// How the run ended.
    pub status: RunStatus,
    /// Every node, in topological order.
    pub nodes: Vec<NodeReport>,
    /// Wall time.
    pub duration: Duration,
}

impl RunReport {
    /// A node's report by name.
    pub fn node(&self, name: &str) -> Option<&NodeReport> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A node's output by name.
    pub fn output(&self, name: &str) -> Option<&serde_json::Value> {
        self.node(name).and_then(|n| n.output.as_ref())
    }

    /// `Ok(self)` when the run succeeded, else an error naming the failed node.
    pub fn into_result(self) -> Result<RunReport> {
        if self.status == RunStatus::Succeeded {
            return Ok(self);
        }
        let failed = self
            .nodes
            .iter()
            .find(|n| n.status == NodeStatus::Failed)
            .map(|n| {
                format!(
                    "node `{}` failed: {}",
                    n.name,
                    n.error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("unknown")
                )
            })
            .unwrap_or_else(|| format!("run {}", self.status));
        let kind = if self.status == RunStatus::Cancelled {
            ErrorKind::Cancelled
        } else {
            ErrorKind::Failed
        };
        Err(Error::new(kind, failed).with("run", &self.run_id))
    }
}

/// `850ms`, `3.2s`, `2m05s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_secs() >= 60 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else if d.as_millis() >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {} · pipeline {} · release {} · env {} · {} in {}",
            self.run_id,
            self.pipeline,
            self.release,
            self.environment,
            self.status,
            fmt_duration(self.duration)
        )?;
        let w_name = self
            .nodes
            .iter()
            .map(|n| n.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w_kind = self
            .nodes
            .iter()
            .map(|n| n.kind.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "  {:<w_name$}  {:<w_kind$}  {:<15}  {:>3}  {:>8}  DETAIL",
            "NODE", "KIND", "STATUS", "TRY", "TIME"
        )?;
        for n in &self.nodes {
            let mut detail = match (&n.error, n.status) {
                (Some(e), _) => e.message.clone(),
                _ => String::new(),
            };
            if !n.waited.is_zero() {
                let waited = format!("waited {} ({} checks)", fmt_duration(n.waited), n.checks);
                detail = if detail.is_empty() {
                    waited
                } else {
                    format!("{waited}; {detail}")
                };
            }
            let mut detail: String = detail.chars().take(100).collect();
            if detail.len() == 100 {
                detail.push('…');
            }
            writeln!(
                f,
                "  {:<w_name$}  {:<w_kind$}  {:<15}  {:>3}  {:>8}  {}",
                n.name,
                n.kind,
                n.status.as_str(),
                n.attempts,
                n.duration.map(fmt_duration).unwrap_or_else(|| "-".into()),
                detail
            )?;
        }
        Ok(())
    }
}
