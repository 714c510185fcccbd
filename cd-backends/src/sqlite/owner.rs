//! Who owns a lease, as a process: enough to prove, from another process on
//! the same machine, that the owner is gone (killed, crashed, rebooted).
//!
//! The owner is `host` (the kernel's hostname) plus `process`:
//! `<boot id>:<pid namespace>:<pid>:<start time in clock ticks>` (Linux
//! `/proc`). Another process judges a lease only when it runs on the same
//! host and in the same PID namespace; the owner is gone when the machine
//! rebooted since (another boot id), or no process has that pid, or the
//! process with that pid started at another time (the pid was reused).
//! Anywhere else (another host, another namespace, no `/proc`) nothing is
//! proven and the lease lapses at its ttl as before.

/// This process's identity: `(host, process)`, or `None` where `/proc` does
/// not tell.
pub(crate) fn this_process() -> Option<(String, String)> {
    let host = read_trimmed("/proc/sys/kernel/hostname")?;
    let pid = std::process::id();
    let start = start_ticks(pid)?;
    Some((
        host,
        format!("{}:{}:{pid}:{start}", boot_id()?, pid_namespace()?),
    ))
}

/// Whether the process `process` recorded on `host` is provably gone, as
/// seen from this process.
pub(crate) fn is_gone(host: &str, process: &str) -> bool {
    let Some((my_host, _)) = this_process() else {
        return false;
    };
    if host != my_host {
        return false;
    }
    let mut parts = process.split(':');
    let (Some(boot), Some(ns), Some(pid), Some(start), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Some(my_boot), Some(my_ns)) = (boot_id(), pid_namespace()) else {
        return false;
    };
    if boot != my_boot {
        return true; // rebooted since
    }
    if ns != my_ns {
        return false; // another namespace: its pids are not ours to judge
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    match start_ticks(pid) {
        None => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        Some(now) => now.to_string() != start,
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn boot_id() -> Option<String> {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

/// The inode of this process's PID namespace (`pid:[4026531836]` → the
/// digits).
fn pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let digits: String = link
        .display()
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then_some(digits)
}

/// Field 22 of `/proc/<pid>/stat` (after the command in parentheses, which
/// may itself hold spaces and parentheses). `None` for no such process or a
/// zombie (it has exited).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is the state (field 3); the start time is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_gone() {
        let Some((host, me)) = this_process() else {
            return; // no /proc here
        };
        assert!(!is_gone(&host, &me));
        // Another host is never judged.
        assert!(!is_gone("elsewhere.invalid", &me));
        // The same pid started at another time: reused, so gone.
        let mut parts: Vec<&str> = me.split(':').collect();
        parts[3] = "1";
        assert!(is_gone(&host, &parts.join(":")));
        // Another boot: gone.
        let rebooted = format!("other-boot:{}", me.split_once(':').unwrap().1);
        assert!(is_gone(&host, &rebooted));
        // A child that exited and was reaped: gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_ticks(pid);
        child.wait().unwrap();
        if let Some(start) = start {
            let dead = format!("{}:{}:{pid}:{start}", parts[0], parts[1]);
            assert!(is_gone(&host, &dead));
        }
        // Garbage is not proof.
        assert!(!is_gone(&host, "nonsense"));
    }
}
