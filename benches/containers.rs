//! A rolling replace of 5 containers with health checks: `ContainerDeployer`
//! (Docker API on Podman's service, a `Rolling` update one replica at a
//! time) against a shell script doing the same with the `podman` CLI, in
//! one run, on the same images and ports.
//!
//! Per replica both do: create the new container, stop the old one (1 s
//! grace; the image's shell exits on SIGTERM at once), start the new one,
//! poll `GET /health` every 50 ms until it answers 200.
//!
//! ```text
//! cargo bench --bench containers --features container
//! ```
//!
//! Last line: `bench containers: cd_s=<x> podman_cli_s=<y> ratio=<x/y>`.

use std::time::{Duration, Instant};

use cd::backends::container::ContainerDeployer;
use cd::core::{DeployContext, Deployer, Release, Rolling, Strategy};
use cd_testkit::podman::{build_image, remove_app, PodmanService};

const REPLICAS: usize = 5;

fn image(version: &str) -> String {
    build_image(
        "cd-bench",
        version,
        &[("/www/health", "ok\n"), ("/www/index.html", version)],
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; /bin/httpd -f -p 8080 -h /www & wait",
        ],
    )
}

/// The same rolling replace with the podman CLI, as a shell script.
fn cli_script(ports: &[u16]) -> String {
    let mut s = String::from("set -e\n");
    for (i, p) in ports.iter().enumerate() {
        let n = i + 1;
        s.push_str(&format!(
            "podman create -q --name cli-{n}-v2 --label cd.app=cli -p 127.0.0.1:{p}:8080 localhost/cd-bench:v2 >/dev/null\n\
             podman stop -t 1 cli-{n}-v1 >/dev/null\n\
             podman start cli-{n}-v2 >/dev/null\n\
             until curl -sf -o /dev/null http://127.0.0.1:{p}/health; do sleep 0.05; done\n"
        ));
    }
    s
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    remove_app("bench");
    remove_app("cli");
    let Some(svc) = PodmanService::start() else {
        println!("podman not installed (scripts/setup.sh installs it)");
        return;
    };
    image("v1");
    image("v2");
    let ports: Vec<u16> = (0..REPLICAS).map(|_| cd_testkit::held_port()).collect();

    // cd: v1 everywhere (not timed), then the timed rolling replace to v2.
    let mut b = ContainerDeployer::builder("bench")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-bench:{version}")
        .health_http("/health")
        .stop_timeout(Duration::from_secs(1))
        .keep(1);
    for (i, p) in ports.iter().enumerate() {
        b = b.replica(format!("r{}", i + 1), *p);
    }
    let d = b.build().unwrap();
    let cx = DeployContext::detached("bench");
    let targets = d.targets();
    let cd_s = rt.block_on(async {
        Rolling::new()
            .batch_size(REPLICAS)
            .deploy(&d, &Release::new("v1"), &targets, &cx)
            .await
            .unwrap();
        let t = Instant::now();
        Rolling::new()
            .batch_size(1)
            .deploy(&d, &Release::new("v2"), &targets, &cx)
            .await
            .unwrap();
        let s = t.elapsed().as_secs_f64();
        d.remove_all().await.unwrap();
        s
    });
    println!("cd (Docker API, rolling 1 at a time): {cd_s:.3} s for {REPLICAS} replicas");

    // The CLI: v1 everywhere (not timed), then the timed script.
    for (i, p) in ports.iter().enumerate() {
        let ok = std::process::Command::new("podman")
            .args([
                "run",
                "-d",
                "-q",
                "--name",
                &format!("cli-{}-v1", i + 1),
                "--label",
                "cd.app=cli",
                "-p",
                &format!("127.0.0.1:{p}:8080"),
                "localhost/cd-bench:v1",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "podman run");
    }
    let script = cli_script(&ports);
    let t = Instant::now();
    let ok = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap()
        .success();
    let cli_s = t.elapsed().as_secs_f64();
    assert!(ok, "the podman CLI script failed");
    remove_app("cli");
    println!("podman CLI script:                    {cli_s:.3} s for {REPLICAS} replicas");
    println!(
        "bench containers: cd_s={cd_s:.3} podman_cli_s={cli_s:.3} ratio={:.2}",
        cd_s / cli_s
    );
}
