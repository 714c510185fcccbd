//! The local backend against real child processes: a small Python HTTP
//! server whose behaviour depends on the version it is started as
//! (`*-broken` answers 500 on /health, `*-crash` exits at once).
#![cfg(feature = "local")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cd_backends::local::{LocalProcessDeployer, LocalRouter};
use cd_core::{
    ChangeAction, CollectingSink, DeployContext, Deployer, Emitter, ErrorKind, EventKind, Release,
    Router, Target,
};
use cd_stages::http::HttpClient;

const SERVER: &str = r#"
import http.server, os, sys
port = int(os.environ["PORT"])
version = os.environ["CD_VERSION"]
if version.endswith("-crash"):
    print("crashing on purpose: " + version, file=sys.stderr, flush=True)
    sys.exit(3)
if version.endswith("-slow"):
    import time
    time.sleep(1.5)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 500 if (self.path == "/health" and version.endswith("-broken")) else 200
        body = (version + " " + os.environ.get("GREETING", "")).strip().encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("serving " + version + " on " + str(port), flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// Kills whatever the state files name when a test ends, pass or fail.
struct Fixture {
    dir: tempfile::TempDir,
    python: String,
    script: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER).unwrap();
        // The interpreter itself, not a version-manager shim that wraps it.
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed for the local backend tests");
        let python = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Fixture {
            dir,
            python,
            script,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn deployer(&self, slots: &[(&str, u16)]) -> LocalProcessDeployer {
        let mut b = LocalProcessDeployer::builder()
            .program(&self.python)
            .args([self.script.display().to_string()])
            .env("GREETING", "hello-from-{target}")
            .health_timeout(Duration::from_secs(5))
            .stop_timeout(Duration::from_secs(2))
            .state_dir(self.state_dir());
        for (name, port) in slots {
            b = b.target(*name, *port);
        }
        b.build().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        kill_recorded(&self.state_dir());
    }
}

/// Kills the live process named in each state file under `dir` (recursively).
fn kill_recorded(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            kill_recorded(&path);
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        // Only the live one: a previous process was stopped already and its
        // pid may belong to someone else by now.
        if let Some(pid) = v.pointer("/current/pid").and_then(|p| p.as_u64()) {
            // The same process, not a later one that reused the pid (pids
            // wrap at 32768 here): compare the kernel start time.
            let recorded = v.pointer("/current/start_time").and_then(|t| t.as_u64());
            if alive(pid) && recorded.is_some() && recorded == start_time(pid) {
                let _ = std::process::Command::new("kill")
                    // `--` is required: procps 4.0.2's kill reads `-9 -133`
                    // as kill(-1, SIGKILL), i.e. every process.
                    .args(["-9", "--", &format!("-{pid}")])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

fn start_time(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn alive(pid: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .next()
        .unwrap_or("");
    state != "Z" && state != "X"
}

async fn body(url: &str) -> String {
    let client = HttpClient::builder().keep_alive(false).build().unwrap();
    let resp = client.get(url).await.unwrap();
    resp.text().into_owned()
}

async fn deploy(
    d: &LocalProcessDeployer,
    version: &str,
    target: &str,
) -> cd_core::Result<cd_core::Revision> {
    let cx = DeployContext::detached("test");
    let plan = d
        .plan(
            &Release::new(version),
            &Target::new(target),
            &cd_core::DeployContext::detached("test"),
        )
        .await?;
    d.apply(&plan, &cx).await
}

fn pid_of(rev: &cd_core::Revision) -> u64 {
    rev.detail["pid"].as_u64().unwrap()
}

#[tokio::test]
async fn deploy_redeploy_upgrade_rollback_and_restart() {
    let fx = Fixture::new();
    let port = cd_testkit::held_port();
    let d = fx.deployer(&[("blue", port)]);
    let blue = Target::new("blue");
    let url = format!("http://127.0.0.1:{port}/");

    assert_eq!(d.current(&blue).await.unwrap(), None);
    let plan = d
        .plan(
            &Release::new("v1"),
            &blue,
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert_eq!(plan.changes[0].action, ChangeAction::Create);

    let v1 = deploy(&d, "v1", "blue").await.unwrap();
    assert_eq!(v1.version, "v1");
    assert_eq!(body(&url).await, "v1 hello-from-blue");
    assert_eq!(d.current(&blue).await.unwrap().unwrap().version, "v1");

    // The same version again is a no-op: same process.
    let plan = d
        .plan(
            &Release::new("v1"),
            &blue,
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert!(plan.is_noop());
    let again = deploy(&d, "v1", "blue").await.unwrap();
    assert_eq!(pid_of(&again), pid_of(&v1));

    let plan = d
        .plan(
            &Release::new("v2"),
            &blue,
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert_eq!(plan.changes[0].action, ChangeAction::Replace);
    let v2 = deploy(&d, "v2", "blue").await.unwrap();
    assert_eq!(body(&url).await, "v2 hello-from-blue");
    assert!(!alive(pid_of(&v1)), "v1's process was stopped");

    // Roll back to what was there before the last apply.
    let cx = DeployContext::detached("test");
    let back = d.rollback(&blue, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert_eq!(body(&url).await, "v1 hello-from-blue");
    assert!(!alive(pid_of(&v2)));

    // A new deployer value over the same state dir (a restarted host
    // program) sees the same live process.
    let restarted = fx.deployer(&[("blue", port)]);
    let seen = restarted.current(&blue).await.unwrap().unwrap();
    assert_eq!(
        (seen.version.as_str(), pid_of(&seen)),
        ("v1", pid_of(&back))
    );

    // Roll forward to an explicit revision (from its recorded release).
    let fwd = restarted
        .rollback(&blue, Some(&v2), &cx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fwd.version, "v2");
    assert_eq!(body(&url).await, "v2 hello-from-blue");

    restarted.stop_all().await.unwrap();
    assert_eq!(restarted.current(&blue).await.unwrap(), None);
    assert!(!alive(pid_of(&fwd)));
}

#[tokio::test]
async fn unhealthy_release_is_a_typed_error_and_the_previous_stays_live() {
    let fx = Fixture::new();
    let port = cd_testkit::held_port();
    let d = LocalProcessDeployer::builder()
        .program(&fx.python)
        .args([fx.script.display().to_string()])
        .target("blue", port)
        .health_timeout(Duration::from_millis(800))
        .state_dir(fx.state_dir())
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    deploy(&d, "v1", "blue").await.unwrap();

    let sink = CollectingSink::new();
    let cx = DeployContext::new(
        Emitter::new(
            "run",
            1,
            vec![std::sync::Arc::new(sink.clone())],
            Default::default(),
        ),
        Default::default(),
        "test",
    );
    let plan = d
        .plan(
            &Release::new("v2-broken"),
            &Target::new("blue"),
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = d.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    assert_eq!(err.context("target"), Some("blue"));
    assert_eq!(err.context("step"), Some("health"));
    assert_eq!(err.context("restored"), Some("v1"));
    assert!(err.to_string().contains("answered 500"), "{err}");

    let cur = d.current(&Target::new("blue")).await.unwrap().unwrap();
    assert_eq!(cur.version, "v1");
    assert_eq!(body(&url).await, "v1");
    let failed_health = sink.events().iter().any(|e| {
        matches!(&e.kind, EventKind::Progress { step, status, .. } if step == "health" && status == "failed")
    });
    assert!(failed_health, "a failed health step was reported");

    // Rolling back after the failed apply still goes to v1's predecessor:
    // there is none, so the slot is emptied.
    let none = d
        .rollback(&Target::new("blue"), None, &DeployContext::detached("test"))
        .await
        .unwrap();
    assert_eq!(none, None);
    assert_eq!(d.current(&Target::new("blue")).await.unwrap(), None);
}

#[tokio::test]
async fn process_that_exits_reports_its_log() {
    let fx = Fixture::new();
    let d = fx.deployer(&[("blue", cd_testkit::held_port())]);
    let err = deploy(&d, "v1-crash", "blue").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    assert_eq!(err.context("step"), Some("health"));
    let msg = err.to_string();
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains("crashing on purpose: v1-crash"), "{msg}");
    assert_eq!(d.current(&Target::new("blue")).await.unwrap(), None);
}

#[tokio::test]
async fn busy_port_and_bad_config_are_reported() {
    let fx = Fixture::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let d = LocalProcessDeployer::builder()
        .program(&fx.python)
        .args([fx.script.display().to_string()])
        .target("blue", port)
        .stop_timeout(Duration::from_millis(200))
        .state_dir(fx.state_dir())
        .build()
        .unwrap();
    let err = deploy(&d, "v1", "blue").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        (err.context("target"), err.context("step")),
        (Some("blue"), Some("start"))
    );
    assert!(
        err.to_string().contains(&format!("port {port} is in use")),
        "{err}"
    );

    // No program and no artifact.
    let d = LocalProcessDeployer::builder()
        .target("blue", cd_testkit::held_port())
        .state_dir(fx.state_dir())
        .build()
        .unwrap();
    let err = d
        .plan(
            &Release::new("v1"),
            &Target::new("blue"),
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let err = d
        .plan(
            &Release::new("v1"),
            &Target::new("purple"),
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // Invalid builders.
    assert!(LocalProcessDeployer::builder().build().is_err());
    let err = LocalProcessDeployer::builder()
        .target("a", 1)
        .target("b", 1)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("both use port 1"), "{err}");
}

#[tokio::test]
async fn artifact_is_the_default_program() {
    let fx = Fixture::new();
    let port = cd_testkit::held_port();
    let launcher = fx.dir.path().join("app.sh");
    std::fs::write(
        &launcher,
        format!(
            "#!/bin/sh\nexec {} {} \"$@\"\n",
            fx.python,
            fx.script.display()
        ),
    )
    .unwrap();
    make_executable(&launcher);
    let d = LocalProcessDeployer::builder()
        .target("blue", port)
        .state_dir(fx.state_dir())
        .build()
        .unwrap();
    let release = Release::new("v7").artifact(&launcher);
    let plan = d
        .plan(
            &release,
            &Target::new("blue"),
            &cd_core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let rev = d.apply(&plan, &DeployContext::detached("t")).await.unwrap();
    assert_eq!(rev.version, "v7");
    assert_eq!(body(&format!("http://127.0.0.1:{port}/")).await, "v7");
    d.stop_all().await.unwrap();
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).unwrap();
}

#[tokio::test]
async fn router_switches_new_connections_between_slots() {
    let fx = Fixture::new();
    let (blue_port, green_port) = (cd_testkit::held_port(), cd_testkit::held_port());
    let d = fx.deployer(&[("blue", blue_port), ("green", green_port)]);
    deploy(&d, "v1", "blue").await.unwrap();
    deploy(&d, "v2", "green").await.unwrap();

    let router = LocalRouter::for_deployer(&d, 0).start().await.unwrap();
    let cx = DeployContext::detached("test");
    assert_eq!(router.active().await.unwrap(), None);
    router.switch("blue", &cx).await.unwrap();
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
    assert_eq!(
        body(&format!("{}/", router.url())).await,
        "v1 hello-from-blue"
    );
    router.switch("green", &cx).await.unwrap();
    assert_eq!(
        body(&format!("{}/", router.url())).await,
        "v2 hello-from-green"
    );

    let err = router.switch("purple", &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // A slot where nothing listens is refused; traffic stays where it was.
    d.stop("blue").await.unwrap();
    let err = router.switch("blue", &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(router.active().await.unwrap().as_deref(), Some("green"));

    // The active slot is remembered across a restart of the router.
    // (Same configured port, 0, so the same state file.)
    drop(router);
    let router = LocalRouter::for_deployer(&d, 0).start().await.unwrap();
    assert_eq!(router.active().await.unwrap().as_deref(), Some("green"));
    assert_eq!(
        body(&format!("{}/", router.url())).await,
        "v2 hello-from-green"
    );
    d.stop_all().await.unwrap();
}

/// The quickstart's shape end to end: staging, smoke checks, a load test,
/// compliance, approval, blue-green production behind the router, bake.
/// `v2-broken` passes its deploy-time health check (on `/`) but fails the
/// bake (on `/health`), and the runner's compensation switches traffic back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_deploys_then_rolls_back_a_broken_release() {
    use cd_core::{MemoryStore, NodeStatus, Pipeline, RunStatus, Runner};
    use cd_stages::{
        ApprovalGate, Bake, ComplianceCheck, Deploy, HttpCheck, HttpMonitor, LoadTest,
    };

    let fx = Fixture::new();
    let build = |slots: &[(&str, u16)], dir: &str| {
        let mut b = LocalProcessDeployer::builder()
            .program(&fx.python)
            .args([fx.script.display().to_string()])
            .health_path("/")
            .state_dir(fx.state_dir().join(dir));
        for (name, port) in slots {
            b = b.target(*name, *port);
        }
        b.build().unwrap()
    };
    let staging = build(&[("staging", cd_testkit::held_port())], "staging");
    let production = build(
        &[
            ("blue", cd_testkit::held_port()),
            ("green", cd_testkit::held_port()),
        ],
        "production",
    );
    let router = LocalRouter::for_deployer(&production, 0)
        .start()
        .await
        .unwrap();
    let staging_url = "url";

    let pipeline = Pipeline::builder("web")
        .stage("staging", Deploy::new(staging.clone()).env("staging"))
        .stage(
            "smoke",
            HttpCheck::base_url_from("staging", staging_url)
                .get("/")
                .get("/version"),
        )
        .needs(["staging"])
        .stage(
            "load",
            LoadTest::get_from("staging", staging_url)
                .requests(100)
                .concurrency(4)
                .p95_below_ms(1000),
        )
        .needs(["staging"])
        .stage("compliance", ComplianceCheck::new().version_pattern("v*"))
        .gate(
            "approval",
            ApprovalGate::any_of(["alice", "bob"]).auto_approve_as("test"),
        )
        .needs(["smoke", "load", "compliance"])
        .stage(
            "production",
            Deploy::new(production.clone())
                .env("production")
                .blue_green(router.clone()),
        )
        .needs(["approval"])
        .stage(
            "bake",
            Bake::new(HttpMonitor::get(format!("{}/health", router.url())))
                .for_duration(Duration::from_millis(300), Duration::from_millis(50)),
        )
        .needs(["production"])
        .build()
        .unwrap();
    let runner = Runner::new(std::sync::Arc::new(MemoryStore::new())).environment("production");

    let report = runner.run(&pipeline, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
    assert_eq!(body(&format!("{}/", router.url())).await, "v1");
    let load = report.output("load").unwrap();
    assert_eq!(load["requests"], 100);

    let report = runner
        .run(&pipeline, Release::new("v2-broken"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(
        report.node("bake").unwrap().status,
        NodeStatus::Failed,
        "{report}"
    );
    assert_eq!(
        report.node("production").unwrap().status,
        NodeStatus::RolledBack,
        "{report}"
    );
    let bake_error = report
        .node("bake")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .clone();
    assert!(
        bake_error.contains("v2-broken is not healthy"),
        "{bake_error}"
    );
    // Traffic is back on v1, on the blue slot.
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
    assert_eq!(body(&format!("{}/", router.url())).await, "v1");
    // Staging was compensated too: v1 again.
    let staging_now = staging
        .current(&Target::new("staging"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(staging_now.version, "v1");

    staging.stop_all().await.unwrap();
    production.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_deployer_passes_the_conformance_suite() {
    let fx = Fixture::new();
    let d = fx.deployer(&[
        ("solo", cd_testkit::held_port()),
        ("duo", cd_testkit::held_port()),
    ]);
    // `-slow` starts serving 1.5 s late: the cancel lands in the health wait.
    let report = cd_core::conformance::Conformance::new(
        &d,
        cd_core::Release::new("v1"),
        cd_core::Release::new("v2"),
    )
    .cancel_mid_apply(cd_core::Release::new("v3-slow"), Duration::from_millis(300))
    .crash_after_each_step(true)
    .run()
    .await
    .unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.passed.len(), 11, "{report:?}");
}
