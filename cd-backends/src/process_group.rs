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

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

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
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pg) = self.0.take() {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}
