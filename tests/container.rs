//! `ContainerDeployer` against real Podman (its Docker-compatible API on a
//! socket of the test's own), with images built locally by `podman import`.
//! A missing podman fails the tests when `CI` or the set-up script ran.

use std::sync::Arc;
use std::time::Duration;

use cd::backends::container::ContainerDeployer;
use cd::core::conformance::Conformance;
use cd::core::{
    DeployContext, Deployer, ErrorKind, MemoryStore, Pipeline, Release, RunStatus, Runner, Secret,
    Target,
};
use cd::stages::Deploy;
use cd_testkit::podman::{build_image, remove_app, PodmanService};

/// `localhost/cd-test:<version>`: busybox httpd on 8080 serving the version
/// at `/` and `ok` at `/health`.
fn image(version: &str) -> String {
    build_image(
        "cd-test",
        version,
        &[
            ("/www/index.html", &format!("{version}\n")),
            ("/www/health", "ok\n"),
        ],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    )
}

/// The engine's own view of an app's containers: (name, state, release
/// label), by the Docker API on the socket (HTTP/1.0, no client library).
fn engine_view(svc: &PodmanService, app: &str) -> Vec<(String, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(svc.socket()).unwrap();
    let filters = format!(r#"{{"label":["cd.app={app}"]}}"#);
    let q: String = filters
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    write!(
        s,
        "GET /v1.41/containers/json?all=true&filters={q} HTTP/1.0\r\nHost: d\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
    let list: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut v: Vec<(String, String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["Names"][0]
                    .as_str()
                    .unwrap()
                    .trim_start_matches('/')
                    .to_string(),
                c["State"].as_str().unwrap().to_string(),
                c["Labels"]["cd.release"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn deployer(svc: &PodmanService, app: &str, ports: &[u16]) -> ContainerDeployer {
    let mut b = ContainerDeployer::builder(app)
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .container_port(8080)
        .env("GREETING", "hello")
        .secret_env("API_TOKEN", Secret::new("s3cr3t-container-token".into()))
        .health_http("/health")
        .health_timeout(Duration::from_secs(15))
        .stop_timeout(Duration::from_secs(1));
    for (i, p) in ports.iter().enumerate() {
        b = b.replica(format!("{app}-{}", i + 1), *p);
    }
    b.build().unwrap()
}

async fn body(port: u16) -> String {
    cd::stages::HttpClient::new()
        .get(&format!("http://127.0.0.1:{port}/"))
        .await
        .map(|r| r.text().trim().to_string())
        .unwrap_or_else(|e| format!("error: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_rolled_forward_and_back_as_the_engine_sees_them() {
    remove_app("roll");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    for v in ["v1", "v2"] {
        image(v);
    }
    let ports: Vec<u16> = (0..3).map(|_| cd_testkit::held_port()).collect();
    let d = Arc::new(deployer(&svc, "roll", &ports));
    let store = Arc::new(MemoryStore::new());
    let runner = Runner::new(store).environment("staging");
    let pipeline = Pipeline::builder("containers")
        .stage(
            "deploy",
            Deploy::new(d.clone()).env("staging").rolling(1, 0),
        )
        .build()
        .unwrap();

    let report = runner.run(&pipeline, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    for p in &ports {
        assert_eq!(body(*p).await, "v1");
    }
    let report = runner.run(&pipeline, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    for p in &ports {
        assert_eq!(body(*p).await, "v2");
    }
    // The engine: per replica, v2 running and v1 kept stopped for rollback.
    let view = engine_view(&svc, "roll");
    let expected: Vec<(String, String, String)> = (1..=3)
        .flat_map(|i| {
            [
                (
                    format!("roll-roll-{i}-v1"),
                    "exited".to_string(),
                    "v1".to_string(),
                ),
                (
                    format!("roll-roll-{i}-v2"),
                    "running".to_string(),
                    "v2".to_string(),
                ),
            ]
        })
        .collect();
    assert_eq!(view, expected);

    // A second deployer (another process, same engine) reads the same truth.
    let other = deployer(&svc, "roll", &ports);
    for t in other.targets() {
        assert_eq!(other.current(&t).await.unwrap().unwrap().version, "v2");
    }

    // Roll back every replica: the stopped v1 containers start again.
    let cx = DeployContext::detached("staging");
    for t in d.targets() {
        let back = d.rollback(&t, None, &cx).await.unwrap().unwrap();
        assert_eq!(back.version, "v1");
    }
    for p in &ports {
        assert_eq!(body(*p).await, "v1");
    }
    let running: Vec<String> = engine_view(&svc, "roll")
        .into_iter()
        .filter(|c| c.1 == "running")
        .map(|c| c.2)
        .collect();
    assert_eq!(running, ["v1", "v1", "v1"]);

    // The secret reached the container, and no label, name or revision.
    let rev = other
        .current(&Target::new("roll-1"))
        .await
        .unwrap()
        .unwrap();
    assert!(!format!("{rev:?}").contains("s3cr3t"));
    d.remove_all().await.unwrap();
    assert!(engine_view(&svc, "roll").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_fails_at_start_or_never_gets_healthy_switches_nothing() {
    remove_app("fail");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    image("v1");
    // No /health: the probe never passes.
    build_image(
        "cd-test",
        "noprobe",
        &[("/www/index.html", "noprobe\n")],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    build_image(
        "cd-test",
        "crash",
        &[],
        &[
            "/bin/sh",
            "-c",
            "echo starting up; echo fatal: config file missing >&2; exit 3",
        ],
    );
    let port = cd_testkit::held_port();
    let d = ContainerDeployer::builder("fail")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("fail-1", port)
        .health_http("/health")
        .health_timeout(Duration::from_secs(2))
        .stop_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let cx = DeployContext::detached("staging");
    let t = Target::new("fail-1");
    let apply = |v: &str| {
        let (d, t, cx) = (d.clone(), t.clone(), cx.clone());
        let v = v.to_string();
        async move {
            let plan = d.plan(&Release::new(v), &t, &cx).await?;
            d.apply(&plan, &cx).await
        }
    };
    apply("v1").await.unwrap();

    let err = apply("noprobe").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().contains("never passed its health probe"),
        "{err}"
    );
    assert!(err.to_string().contains("-> 404"), "{err}");
    assert_eq!(d.current(&t).await.unwrap().unwrap().version, "v1");
    assert_eq!(body(port).await, "v1", "nothing switched");

    let err = apply("crash").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("exited at start (exit code 3)"), "{msg}");
    assert!(msg.contains("fatal: config file missing"), "{msg}");
    assert_eq!(d.current(&t).await.unwrap().unwrap().version, "v1");
    assert_eq!(body(port).await, "v1");
    d.remove_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_unreachable_image_missing_and_port_taken_are_typed_errors() {
    remove_app("busy");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    image("v1");
    let cx = DeployContext::detached("staging");
    let t = Target::new("err-1");

    let dir = tempfile::tempdir().unwrap();
    let nowhere = ContainerDeployer::builder("err")
        .socket(dir.path().join("no.sock").display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("err-1", cd_testkit::held_port())
        .build()
        .unwrap();
    let err = nowhere.current(&t).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("no.sock"), "{err}");

    let d = ContainerDeployer::builder("err")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("err-1", cd_testkit::held_port())
        .build()
        .unwrap();
    let plan = d.plan(&Release::new("v404"), &t, &cx).await.unwrap();
    let err = d.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("localhost/cd-test:v404"), "{err}");
    assert!(err.to_string().contains("never pulls"), "{err}");

    // A port some other process listens on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = ContainerDeployer::builder("busy")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("busy-1", port)
        .build()
        .unwrap();
    let t = Target::new("busy-1");
    let plan = busy.plan(&Release::new("v1"), &t, &cx).await.unwrap();
    let err = busy.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(
        err.to_string().contains(&format!("host port {port}")),
        "{err}"
    );
    assert!(busy.current(&t).await.unwrap().is_none());
    busy.remove_all().await.unwrap();

    let err = ContainerDeployer::builder("bad")
        .image("x")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_deployer_passes_the_conformance_suite() {
    remove_app("conf");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    for v in ["v1", "v2"] {
        image(v);
    }
    // Starts serving 2 s after it starts: the cancel lands while the
    // deployer waits for its health.
    build_image(
        "cd-test",
        "v3-slow",
        &[("/www/index.html", "v3-slow\n"), ("/www/health", "ok\n")],
        &[
            "/bin/sh",
            "-c",
            "sleep 2; exec /bin/httpd -f -p 8080 -h /www",
        ],
    );
    let ports: Vec<u16> = (0..2).map(|_| cd_testkit::held_port()).collect();
    let d = deployer(&svc, "conf", &ports);
    let report = Conformance::new(&d, Release::new("v1"), Release::new("v2"))
        .targets(d.targets())
        .cancel_mid_apply(Release::new("v3-slow"), Duration::from_millis(800))
        .crash_after_each_step(true)
        .run()
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:?}");
    d.remove_all().await.unwrap();
}

/// The image's own healthcheck decides. Podman runs healthchecks from
/// systemd timers, which this sandbox has not: the test runs them itself
/// (`podman healthcheck run`), as the timer would, until the deploy ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_containers_own_healthcheck_can_decide() {
    remove_app("hc");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    image("v1");
    let d = ContainerDeployer::builder("hc")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("hc-1", cd_testkit::held_port())
        .healthcheck([
            "CMD",
            "/bin/wget",
            "-q",
            "-O",
            "/dev/null",
            "http://127.0.0.1:8080/health",
        ])
        .health_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let cx = DeployContext::detached("staging");
    let t = Target::new("hc-1");
    let plan = d.plan(&Release::new("v1"), &t, &cx).await.unwrap();
    let apply = tokio::spawn({
        let (d, cx) = (d.clone(), cx.clone());
        async move { d.apply(&plan, &cx).await }
    });
    let podman = cd_testkit::find_tool("podman").unwrap();
    // Podman runs healthchecks from systemd timers, absent here: run them
    // until the apply has seen the container healthy.
    cd_testkit::eventually(Duration::from_secs(60), || {
        let (podman, done) = (podman.clone(), apply.is_finished());
        async move {
            if done {
                return Some(());
            }
            let _ = tokio::process::Command::new(&podman)
                .args(["healthcheck", "run", "hc-hc-1-v1"])
                .output()
                .await;
            None
        }
    })
    .await
    .expect("the apply never finished");
    let rev = apply.await.unwrap().unwrap();
    assert_eq!(rev.version, "v1");
    assert_eq!(body(d.host_port("hc-1").unwrap()).await, "v1");
    d.remove_all().await.unwrap();
}
