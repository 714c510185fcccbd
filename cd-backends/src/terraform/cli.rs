//! Running the terraform CLI: arguments, environment, streaming stdout line
//! by line, interrupting on cancellation.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::error::TerraformError;
use super::ui::{parse_human_diagnostics, Diagnostic, UiMessage};
use crate::process_group::{drive, GroupGuard};

/// How much of stderr an error keeps.
const STDERR_TAIL: usize = 4000;

/// The terraform CLI as configured by the deployer.
#[derive(Debug, Clone)]
pub(crate) struct Cli {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub cli_config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// How long terraform gets to finish in-flight operations (and release
    /// its lock) after an interrupt before it is killed.
    pub grace: Duration,
}

/// What a finished terraform process left behind.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    pub code: Option<i32>,
    pub stderr: String,
    /// Diagnostics read from `-json` stdout.
    pub diagnostics: Vec<Diagnostic>,
    /// Non-JSON stdout (when the command had no `-json`) — kept for errors.
    pub text: String,
    /// The run was cancelled and terraform was interrupted.
    pub interrupted: bool,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Turns a failed run into the best error available: a lock error, the
    /// first error diagnostic, or the exit code with stderr.
    pub fn into_error(self, command: &str) -> TerraformError {
        let mut diags: Vec<Diagnostic> = self
            .diagnostics
            .into_iter()
            .filter(Diagnostic::is_error)
            .collect();
        if diags.is_empty() {
            diags = parse_human_diagnostics(&format!("{}\n{}", self.stderr, self.text))
                .into_iter()
                .filter(Diagnostic::is_error)
                .collect();
        }
        if let Some(lock) = diags
            .iter()
            .find(|d| d.summary.to_ascii_lowercase().contains("state lock"))
        {
            return TerraformError::Locked {
                command: command.into(),
                detail: format!("{} {}", lock.summary, lock.detail)
                    .trim()
                    .to_string(),
            };
        }
        let stderr = tail(&self.stderr);
        if diags.is_empty() {
            return TerraformError::Command {
                command: command.into(),
                code: self.code,
                stderr: if stderr.trim().is_empty() {
                    tail(&self.text)
                } else {
                    stderr
                },
            };
        }
        let first = diags.remove(0);
        TerraformError::Diagnostic {
            command: command.into(),
            diagnostic: Box::new(first),
            others: diags,
            stderr,
        }
    }
}

fn tail(s: &str) -> String {
    if s.len() <= STDERR_TAIL {
        return s.to_string();
    }
    let mut start = s.len() - STDERR_TAIL;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

impl Cli {
    /// Runs `terraform <args>` in the working directory with `workspace`
    /// selected through `TF_WORKSPACE`, calling `on_message` for each `-json`
    /// UI message and `on_line` for every other stdout line.
    pub async fn run(
        &self,
        args: &[OsString],
        workspace: Option<&str>,
        cancel: &CancellationToken,
        on_message: impl FnMut(UiMessage),
        on_line: impl FnMut(&str),
    ) -> Result<Finished, TerraformError> {
        let finished = self
            .run_raw(args, workspace, cancel, on_message, on_line)
            .await?;
        if finished.interrupted {
            return Err(TerraformError::Cancelled {
                command: args
                    .first()
                    .map(|a| a.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            });
        }
        Ok(finished)
    }

    /// Like [`Cli::run`], but an interrupted run still returns what
    /// terraform did ([`Finished::interrupted`]): after an interrupt,
    /// terraform finishes the operations in flight, and may even succeed.
    pub async fn run_raw(
        &self,
        args: &[OsString],
        workspace: Option<&str>,
        cancel: &CancellationToken,
        mut on_message: impl FnMut(UiMessage),
        mut on_line: impl FnMut(&str),
    ) -> Result<Finished, TerraformError> {
        let command = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C on the user's terminal reaches
            // the host program (which cancels the run), not the tool
            // directly; on cancellation the whole group gets SIGINT, as a
            // terminal would send it (terraform re-executes itself under
            // panicwrap, so signalling the parent alone does nothing).
            .process_group(0)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0");
        if let Some(cfg) = &self.cli_config {
            cmd.env("TF_CLI_CONFIG_FILE", cfg);
        }
        match workspace {
            Some(ws) => cmd.env("TF_WORKSPACE", ws),
            None => cmd.env_remove("TF_WORKSPACE"),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| spawn_error(&self.binary, e))?;
        // Dropped before terraform was reaped: its whole group is killed.
        let mut guard = GroupGuard::new(&child);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        let mut finished = Finished::default();
        let driven =
            drive(
                &mut child,
                &mut guard,
                stdout,
                cancel,
                self.grace,
                |line| match UiMessage::parse(&line) {
                    Some(msg) => {
                        if let Some(d) = &msg.diagnostic {
                            finished.diagnostics.push(d.clone());
                        }
                        on_message(msg);
                    }
                    None => {
                        on_line(&line);
                        finished.text.push_str(&line);
                        finished.text.push('\n');
                    }
                },
            )
            .await
            .map_err(|e| TerraformError::io(format!("running terraform {command}"), e))?;
        let (status, cancelled) = (driven.status, driven.interrupted);
        finished.stderr = stderr_task.await.unwrap_or_default();
        finished.interrupted = cancelled;
        finished.code = status.and_then(|s| s.code());
        Ok(finished)
    }

    /// Runs a command and returns its whole stdout (`show -json`, `output -json`).
    pub async fn capture(
        &self,
        args: &[OsString],
        workspace: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(Finished, String), TerraformError> {
        let mut out = String::new();
        let finished = self
            .run(
                args,
                workspace,
                cancel,
                |_| {},
                |l| {
                    out.push_str(l);
                    out.push('\n');
                },
            )
            .await?;
        Ok((finished, out))
    }
}

pub(crate) fn spawn_error(binary: &Path, e: std::io::Error) -> TerraformError {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            TerraformError::BinaryNotFound {
                binary: binary.to_path_buf(),
                reason: e.to_string(),
            }
        }
        _ => TerraformError::io(format!("starting {}", binary.display()), e),
    }
}
