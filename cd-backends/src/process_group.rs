//! Child processes run in their own process group (terraform re-execs
//! itself under panicwrap, ansible-playbook forks workers): signals go to the
//! whole group.

/// Sends SIGINT to the child's group so the tool stops cleanly (terraform
/// releases its state lock, ansible stops its workers); kills the child alone
/// when the group cannot be signalled.
pub(crate) async fn interrupt(child: &mut tokio::process::Child) {
    if signal_group(child, "INT").await {
        return;
    }
    let _ = child.start_kill();
}

/// Sends `signal` to the child's process group (the child leads it). The
/// `--` matters: procps 4.0.2's `kill -INT -123` without it signals pid -1.
pub(crate) async fn signal_group(child: &tokio::process::Child, signal: &str) -> bool {
    let Some(pid) = child.id() else {
        return false;
    };
    tokio::process::Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg("--")
        .arg(format!("-{pid}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}
