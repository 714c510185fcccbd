//! Child processes run in their own process group (terraform re-execs
//! itself under panicwrap and starts provisioners, ansible-playbook forks
//! workers and ssh clients): signals go to the whole group.
//!
//! The life of such a group is bounded on every path:
//! - cancellation: [`interrupt`] sends SIGINT to the group (as a terminal's
//!   Ctrl-C would), the caller waits its grace period, then SIGKILLs the
//!   group;
//! - the caller's future is dropped (the runner's grace period ran out, the
//!   task was aborted): [`GroupGuard`] SIGKILLs the group from `Drop`, so no
//!   tool, worker or provisioner outlives the node that started it.

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio_util::sync::CancellationToken;

fn group_of(child: &tokio::process::Child) -> Option<Pid> {
    child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw)
}

/// Sends SIGINT to the child's group so the tool stops cleanly (terraform
/// releases its state lock, ansible stops its workers); kills the child alone
/// when the group cannot be signalled.
pub(crate) fn interrupt(child: &mut tokio::process::Child) {
    if signal_group(child, Signal::SIGINT) {
        return;
    }
    let _ = child.start_kill();
}

/// Sends `signal` to the child's process group (the child leads it).
/// Returns whether the signal was sent.
pub(crate) fn signal_group(child: &tokio::process::Child, signal: Signal) -> bool {
    match group_of(child) {
        Some(pg) => killpg(pg, signal).is_ok(),
        None => false,
    }
}

/// SIGKILLs a child's process group when dropped, unless disarmed once the
/// child has been waited for. Create it right after spawning a child with
/// `process_group(0)`.
pub(crate) struct GroupGuard(Option<Pid>);

impl GroupGuard {
    /// Guards `child`'s group.
    pub(crate) fn new(child: &tokio::process::Child) -> Self {
        GroupGuard(group_of(child))
    }

    /// The child exited and was reaped: nothing to kill on drop (its group
    /// id may be reused).
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }

    /// SIGKILLs the whole group now, by the group id recorded at spawn (the
    /// child's own id is gone once it was reaped, while members it left in
    /// the group keep the id in use).
    pub(crate) fn kill(&self) {
        if let Some(pg) = self.0 {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}

/// How a driven child ended.
pub(crate) struct Driven {
    /// Its exit status; `None` when it was killed after its grace period.
    pub(crate) status: Option<ExitStatus>,
    /// Whether it was interrupted (the token fired).
    pub(crate) interrupted: bool,
}

/// Drives a child spawned with `process_group(0)`: hands each stdout line to
/// `on_line` until the end of its output, then waits for it. When `cancel`
/// fires, the group gets SIGINT; `grace` later (counted from the interrupt,
/// whether or not the tool still holds its output open) the group gets
/// SIGKILL. After an interrupt, whatever the tool left in its group
/// (provisioners, workers) is killed too. Errors only on reading or
/// waiting.
pub(crate) async fn drive(
    child: &mut Child,
    guard: &mut GroupGuard,
    stdout: ChildStdout,
    cancel: &CancellationToken,
    grace: Duration,
    mut on_line: impl FnMut(String),
) -> std::io::Result<Driven> {
    let mut lines = BufReader::new(stdout).lines();
    let mut eof = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            line = lines.next_line(), if !eof => match line? {
                Some(l) => on_line(l),
                None => eof = true,
            },
            _ = cancel.cancelled(), if deadline.is_none() => {
                interrupt(child);
                deadline = Some(tokio::time::Instant::now() + cd_core::clock::clamp(grace));
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                guard.kill();
                let _ = child.kill().await;
                break None;
            }
            s = child.wait(), if eof => break Some(s?),
        }
    };
    if deadline.is_some() {
        guard.kill();
    }
    guard.disarm();
    Ok(Driven {
        status,
        interrupted: deadline.is_some(),
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pg) = self.0.take() {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}
