//! What a playbook run did, per host and task, read from the JSON lines of
//! the shipped callback plugin (`cd_jsonl`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{AnsibleError, HostFailure};

/// One line printed by the `cd_jsonl` callback plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackLine {
    /// `playbook_start`, `play_start`, `task_start`, `runner_start`,
    /// `runner_ok`, `runner_failed`, `runner_skipped`, `runner_unreachable`,
    /// `item_ok`, `item_failed`, `item_skipped`, `diff`, `stats`, ...
    pub event: String,
    /// The host, for runner, item and diff lines.
    #[serde(default)]
    pub host: Option<String>,
    /// The task name.
    #[serde(default)]
    pub task: Option<String>,
    /// The module (`copy`, `command`).
    #[serde(default)]
    pub action: Option<String>,
    /// Ansible's id of the task (marks the task's processes on the hosts).
    #[serde(default)]
    pub task_uuid: Option<String>,
    /// The play name, for `play_start`.
    #[serde(default)]
    pub play: Option<String>,
    /// Whether the task changed something.
    #[serde(default)]
    pub changed: bool,
    /// The module's message.
    #[serde(default)]
    pub msg: Option<String>,
    /// Exit code of command-like modules.
    #[serde(default)]
    pub rc: Option<i64>,
    /// How long the task took on the host.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// The diff (`--diff`).
    #[serde(default)]
    pub diff: Option<Value>,
    /// stdout of a failed command.
    #[serde(default)]
    pub stdout: Option<String>,
    /// stderr of a failed command.
    #[serde(default)]
    pub stderr: Option<String>,
    /// The failure was ignored (`ignore_errors`).
    #[serde(default)]
    pub ignore_errors: bool,
    /// The loop item, for item lines.
    #[serde(default)]
    pub item: Option<String>,
    /// The recap, for `stats`.
    #[serde(default)]
    pub hosts: Option<BTreeMap<String, HostStats>>,
}

impl CallbackLine {
    /// Parses a stdout line; `None` when it is not one of ours.
    pub fn parse(line: &str) -> Option<CallbackLine> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        serde_json::from_str(line).ok()
    }
}

/// How a task ended on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Ran, changed nothing.
    Ok,
    /// Ran and changed something (in check mode: would change).
    Changed,
    /// Failed.
    Failed,
    /// Failed, but the playbook ignores the error.
    Ignored,
    /// Skipped (a `when` condition, check mode).
    Skipped,
    /// The host could not be reached.
    Unreachable,
}

impl TaskStatus {
    /// Lower-case name, as used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Ok => "ok",
            TaskStatus::Changed => "changed",
            TaskStatus::Failed => "failed",
            TaskStatus::Ignored => "ignored",
            TaskStatus::Skipped => "skipped",
            TaskStatus::Unreachable => "unreachable",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task's result on one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The inventory host name.
    pub host: String,
    /// The task name.
    pub task: String,
    /// The module.
    #[serde(default)]
    pub action: Option<String>,
    /// How it ended.
    pub status: TaskStatus,
    /// The module's message.
    #[serde(default)]
    pub message: Option<String>,
    /// Exit code of command-like modules.
    #[serde(default)]
    pub rc: Option<i64>,
    /// Seconds the task took on the host.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// The diff, with `--diff`.
    #[serde(default)]
    pub diff: Option<Value>,
}

/// Ansible's recap for one host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStats {
    /// Tasks ok.
    #[serde(default)]
    pub ok: u64,
    /// Tasks that changed something.
    #[serde(default)]
    pub changed: u64,
    /// 1 when the host was unreachable.
    #[serde(default)]
    pub unreachable: u64,
    /// Failed tasks.
    #[serde(default)]
    pub failed: u64,
    /// Skipped tasks.
    #[serde(default)]
    pub skipped: u64,
    /// Rescued tasks.
    #[serde(default)]
    pub rescued: u64,
    /// Ignored failures.
    #[serde(default)]
    pub ignored: u64,
}

/// Everything one ansible-playbook run reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlaybookReport {
    /// The playbook file.
    pub playbook: String,
    /// Whether it ran with `--check --diff`.
    pub check: bool,
    /// Every task result on every host, in order.
    pub results: Vec<TaskResult>,
    /// The recap per host.
    pub stats: BTreeMap<String, HostStats>,
    /// ansible-playbook's exit code.
    pub exit_code: Option<i32>,
    /// Wall time in seconds.
    pub duration_s: f64,
}

impl PlaybookReport {
    /// Failed tasks (ignored failures not included).
    pub fn failures(&self) -> Vec<&TaskResult> {
        self.results
            .iter()
            .filter(|r| r.status == TaskStatus::Failed)
            .collect()
    }

    /// Results for unreachable hosts.
    pub fn unreachable(&self) -> Vec<&TaskResult> {
        self.results
            .iter()
            .filter(|r| r.status == TaskStatus::Unreachable)
            .collect()
    }

    /// Results that changed (or, in check mode, would change) something.
    pub fn changed(&self) -> Vec<&TaskResult> {
        self.results
            .iter()
            .filter(|r| r.status == TaskStatus::Changed)
            .collect()
    }

    /// The results of one host.
    pub fn host(&self, host: &str) -> Vec<&TaskResult> {
        self.results.iter().filter(|r| r.host == host).collect()
    }

    /// The result of one task on one host.
    pub fn result(&self, host: &str, task: &str) -> Option<&TaskResult> {
        self.results
            .iter()
            .find(|r| r.host == host && r.task == task)
    }

    /// Whether every host finished without failure and was reachable.
    pub fn succeeded(&self) -> bool {
        self.failures().is_empty() && self.unreachable().is_empty() && self.exit_code == Some(0)
    }

    /// The failure summary as an error (host, task and message), or `None`
    /// when the run succeeded. Failed tasks come before unreachable hosts.
    pub fn error(&self, stderr: &str) -> Option<AnsibleError> {
        let to_failure = |r: &TaskResult| HostFailure {
            host: r.host.clone(),
            task: r.task.clone(),
            message: r.message.clone().unwrap_or_else(|| r.status.to_string()),
        };
        let failed: Vec<HostFailure> = self.failures().into_iter().map(to_failure).collect();
        let unreachable: Vec<HostFailure> =
            self.unreachable().into_iter().map(to_failure).collect();
        if let Some((first, rest)) = failed.split_first() {
            let mut others = rest.to_vec();
            others.extend(unreachable);
            return Some(AnsibleError::TaskFailed {
                first: first.clone(),
                others,
            });
        }
        if let Some((first, rest)) = unreachable.split_first() {
            return Some(AnsibleError::Unreachable {
                first: first.clone(),
                others: rest.to_vec(),
            });
        }
        // No task result to blame, but the recap may still name a host.
        if let Some((host, _)) = self.stats.iter().find(|(_, s)| s.unreachable > 0) {
            return Some(AnsibleError::Unreachable {
                first: HostFailure {
                    host: host.clone(),
                    task: String::new(),
                    message: "unreachable".into(),
                },
                others: Vec::new(),
            });
        }
        if self.exit_code != Some(0) {
            return Some(AnsibleError::Command {
                code: self.exit_code,
                stderr: tail(stderr),
            });
        }
        None
    }

    pub(crate) fn absorb(&mut self, line: &CallbackLine) {
        let status = match line.event.as_str() {
            "runner_ok" if line.changed => TaskStatus::Changed,
            "runner_ok" => TaskStatus::Ok,
            "runner_failed" if line.ignore_errors => TaskStatus::Ignored,
            "runner_failed" => TaskStatus::Failed,
            "runner_skipped" => TaskStatus::Skipped,
            "runner_unreachable" => TaskStatus::Unreachable,
            "stats" => {
                if let Some(h) = &line.hosts {
                    self.stats = h.clone();
                }
                return;
            }
            "diff" => {
                // Attach diffs reported separately to the matching result.
                if let (Some(host), Some(task)) = (&line.host, &line.task) {
                    if let Some(r) = self
                        .results
                        .iter_mut()
                        .rev()
                        .find(|r| &r.host == host && &r.task == task)
                    {
                        if r.diff.is_none() {
                            r.diff = line.diff.clone();
                        }
                    }
                }
                return;
            }
            _ => return,
        };
        let mut message = line.msg.clone();
        if status == TaskStatus::Failed && message.is_none() {
            message = line.stderr.clone().or_else(|| line.stdout.clone());
        }
        self.results.push(TaskResult {
            host: line.host.clone().unwrap_or_default(),
            task: line.task.clone().unwrap_or_default(),
            action: line.action.clone(),
            status,
            message,
            rc: line.rc,
            duration_s: line.duration_s,
            diff: line.diff.clone(),
        });
    }
}

fn tail(s: &str) -> String {
    const MAX: usize = 4000;
    if s.len() <= MAX {
        return s.trim().to_string();
    }
    let mut start = s.len() - MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", s[start..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_summary_names_host_and_task() {
        let mut r = PlaybookReport {
            exit_code: Some(2),
            ..Default::default()
        };
        for line in [
            r#"{"event":"runner_ok","host":"h1","task":"copy","changed":true}"#,
            r#"{"event":"runner_failed","host":"h2","task":"restart","msg":"boom"}"#,
            r#"{"event":"runner_unreachable","host":"h3","task":"copy","msg":"timed out"}"#,
        ] {
            r.absorb(&CallbackLine::parse(line).unwrap());
        }
        let err = r.error("").unwrap();
        assert_eq!(
            err.to_string(),
            "task `restart` failed on host h2: boom (and 1 more failure(s))"
        );
        let e: cd_core::Error = err.into();
        assert_eq!(e.context("host"), Some("h2"));
        assert_eq!(e.context("task"), Some("restart"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any line the callback plugin (or anything else on stdout) prints:
        /// parsed or ignored, and absorbing it into a report never panics.
        #[test]
        fn callback_lines_never_panic(lines in prop::collection::vec(crate::fuzz::line(), 0..20)) {
            let mut report = PlaybookReport::default();
            for line in &lines {
                if let Some(l) = CallbackLine::parse(line) {
                    report.absorb(&l);
                }
            }
            let _ = report.error("");
            let _ = report.succeeded();
        }
    }
}
