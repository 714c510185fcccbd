//! Starting, watching and stopping local processes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How to start one process.
#[derive(Debug, Clone)]
pub(crate) struct Launch<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub log_file: &'a Path,
}

/// Processes started by this deployer value, kept so they can be reaped.
/// Processes started by an earlier host program are known by pid only.
#[derive(Debug, Default)]
pub(crate) struct Children {
    children: Mutex<HashMap<u32, Child>>,
}

impl Children {
    /// Starts a process in its own process group, output appended to the log
    /// file. Returns its pid.
    pub fn spawn(&self, launch: &Launch<'_>) -> std::io::Result<u32> {
        if let Some(dir) = launch.log_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(launch.log_file)?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new(launch.program);
        cmd.args(launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("process exited before its pid was read"))?;
        self.lock().insert(pid, child);
        Ok(pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Child>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a child of ours: its exit status if it has exited.
    pub fn exited(&self, pid: u32) -> Option<std::process::ExitStatus> {
        let mut children = self.lock();
        let child = children.get_mut(&pid)?;
        match child.try_wait() {
            Ok(Some(status)) => {
                children.remove(&pid);
                Some(status)
            }
            _ => None,
        }
    }

    /// Stops a process (its whole process group): SIGTERM, then SIGKILL
    /// after `grace`. Waits until it is gone.
    pub async fn stop(&self, pid: u32, start_time: Option<u64>, grace: Duration) {
        let child = self.lock().remove(&pid);
        if let Some(mut child) = child {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            send(pid, Signal::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                send(pid, Signal::SIGKILL);
                let _ = child.wait().await;
            }
            return;
        }
        if !is_alive(pid, start_time) {
            return;
        }
        send(pid, Signal::SIGTERM);
        let deadline = cd_core::clock::instant_after(grace);
        while is_alive(pid, start_time) {
            if Instant::now() >= deadline {
                send(pid, Signal::SIGKILL);
                let hard = Instant::now() + Duration::from_secs(5);
                while is_alive(pid, start_time) && Instant::now() < hard {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Signals the process group `pid` leads (we start every process as a group
/// leader), falling back to the process alone.
fn send(pid: u32, sig: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if signal::killpg(Pid::from_raw(raw), sig).is_err() {
        let _ = signal::kill(Pid::from_raw(raw), sig);
    }
}

/// The kernel's start time of a process (clock ticks since boot), which
/// tells a live process from a later one that reused its pid. Linux only.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    // Fields after the name start at field 3 (state); start time is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a running (not zombie) process, and the same one that
/// was started at `expected_start` when that is known.
pub(crate) fn is_alive(pid: u32, expected_start: Option<u64>) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if Path::new("/proc/self/stat").exists() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        if state == "Z" || state == "X" {
            return false;
        }
        return match (expected_start, start_time(pid)) {
            (Some(expected), Some(actual)) => expected == actual,
            _ => true,
        };
    }
    signal::kill(Pid::from_raw(raw), None).is_ok()
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Live processes whose environment carries `key=value` (Linux `/proc`;
/// elsewhere none are found). Used to find processes a killed host program
/// started but never recorded.
pub(crate) fn pids_with_env(key: &str, value: &str) -> Vec<u32> {
    let wanted = format!("{key}={value}");
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|&pid| is_alive(pid, None))
        .collect()
}
