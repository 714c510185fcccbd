//! Podman serving the Docker-compatible API on a unix socket of its own
//! (`podman system service`), and test images built locally with
//! `podman import` from a busybox-static rootfs (never pulled).
//!
//! Podman reads `CONTAINERS_CONF` (written by `scripts/setup.sh`: runtime
//! `runc`, cgroup manager `cgroupfs`, explicit ulimits).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `podman system service`, stopped on drop. Starting one first
/// removes the containers earlier test runs left ([`remove_test_apps`]):
/// tests using Podman run one at a time.
pub struct PodmanService {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PodmanService {
    /// Starts the service on a fresh socket and waits (up to 30 s) until it
    /// answers `/_ping`. `None` when podman is missing and tools are not
    /// required (see [`crate::require_tool`]).
    pub fn start() -> Option<Self> {
        let podman = crate::require_tool("podman")?;
        // Leftovers of a killed run break every listing: clear them first.
        remove_test_apps();
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("podman.sock");
        let child = Command::new(podman)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start podman system service");
        let svc = PodmanService {
            child,
            socket,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if ping(&svc.socket) {
                return Some(svc);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "podman system service never answered on {}",
            svc.socket.display()
        );
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn ping(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut out = String::new();
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.0 200")
}

/// Builds `localhost/<name>:<tag>` with `podman import`: busybox-static,
/// the given files (path inside the image, content; files under a
/// `cgi-bin/` directory are made executable) and `cmd`. Replaces an
/// image of that name. Panics when podman or busybox fails.
pub fn build_image(name: &str, tag: &str, files: &[(&str, &str)], cmd: &[&str]) -> String {
    let podman = crate::require_tool("podman").expect("podman");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static (scripts/setup.sh installs it)");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "wget", "sleep", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for (path, content) in files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        if path.contains("cgi-bin/") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let tar = dir.path().join("rootfs.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of the test rootfs failed");
    let image = format!("localhost/{name}:{tag}");
    let cmd_json = format!(
        "CMD [{}]",
        cmd.iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let out = Command::new(podman)
        .args(["import", "--change", &cmd_json])
        .arg(&tar)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman import {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// Removes `localhost/<name>:<tag>` if present.
pub fn remove_image(name: &str, tag: &str) {
    if let Some(podman) = crate::find_tool("podman") {
        let _ = Command::new(podman)
            .args(["rmi", "-f", &format!("localhost/{name}:{tag}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The application names the tests, examples and benchmarks use.
pub const TEST_APPS: &[&str] = &[
    "roll", "fail", "err", "busy", "conf", "zero", "bad", "pool", "hc", "demo", "bench", "cli",
];

/// Removes every container labelled `cd.app=<app>` with the podman CLI
/// (`rm --filter`), including those a killed test run left behind: their
/// network namespace went with that run's mount namespace, after which
/// `podman ps` and the API's container list fail for every container
/// until they are removed.
pub fn remove_app(app: &str) {
    let Some(podman) = crate::find_tool("podman") else {
        return;
    };
    let _ = Command::new(&podman)
        .args(["rm", "-f", "--filter", &format!("label=cd.app={app}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// [`remove_app`] for every name of [`TEST_APPS`]: what a test run (they
/// run one at a time) leaves behind when it is killed.
pub fn remove_test_apps() {
    for app in TEST_APPS {
        remove_app(app);
    }
}
