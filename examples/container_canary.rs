//! Containers behind the embedded HTTP router: a blue-green release, then
//! canaries by traffic share judged on the router's own samples.
//!
//! ```text
//! scripts/setup.sh                      # installs podman, busybox-static (once)
//! cargo run --example container_canary --features container,router
//! ```
//!
//! It starts `podman system service` on a socket of its own (or uses
//! `DOCKER_HOST=unix://...` if set), builds small demo images locally with
//! `podman import` (busybox httpd; never pulled), and runs a service in two
//! slots, `blue` and `green`, behind an `HttpRouter` while a client sends
//! it about 100 requests a second:
//!
//! 1. `v1` goes live on blue (blue-green);
//! 2. `v2` goes to green and gets 10%, 50%, then 100% of the traffic, each
//!    step judged by the router's error rate for green: promoted;
//! 3. `v3-bad` (answers 500) goes to blue and gets 10%: the router sees the
//!    errors, all traffic goes back to green at once, blue is rolled back.
//!
//! The client's failures are counted per phase: none while a good release
//! rolls out, a few 500s from the bad canary's 10% before it is pulled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cd::backends::container::ContainerDeployer;
use cd::backends::router::{HttpRouter, RouterMonitor};
use cd::core::{
    Analysis, BlueGreen, Event, EventKind, FnSink, MemoryStore, Pipeline, Release, RunStatus,
    Runner, TrafficCanary,
};
use cd::stages::{Deploy, HttpClient};
use cd_testkit::podman::{build_image, PodmanService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    // The engine: DOCKER_HOST, else a podman service of our own.
    let (_podman, socket) = match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => (None, h),
        _ => {
            let svc = PodmanService::start()
                .context("podman is not installed: run scripts/setup.sh first")?;
            let s = svc.socket().display().to_string();
            (Some(svc), s)
        }
    };
    for v in ["v1", "v2", "v3-bad"] {
        demo_image(v);
    }
    cd_testkit::podman::remove_app("demo");
    let service = ContainerDeployer::builder("demo")
        .socket(&socket)
        .image("localhost/cd-demo:{version}")
        .container_port(8080)
        .replica("blue", 18401)
        .replica("green", 18402)
        .memory_bytes(64 << 20)
        .health_http("/health")
        .health_timeout(Duration::from_secs(15))
        .stop_timeout(Duration::from_secs(2))
        .build()?;
    let router = HttpRouter::builder("127.0.0.1:18400")
        .upstreams_of(&cd::core::Deployer::targets(&service))
        .drain_timeout(Duration::from_secs(10))
        .start()
        .await?;
    println!("router at {} in front of blue and green", router.url());

    let judge = || {
        (
            RouterMonitor::new(&router, 1.0).min_requests(5),
            Analysis::new()
                .initial_delay(Duration::from_secs(1))
                .interval(Duration::from_millis(500))
                .count(3),
        )
    };
    let (m, a) = judge();
    let canary = TrafficCanary::new(router.clone(), [10, 50, 100]).analysis(m, a);
    let blue_green = Pipeline::builder("demo")
        .stage(
            "deploy",
            Deploy::new(service.clone())
                .env("production")
                .strategy(BlueGreen::new(router.clone())),
        )
        .build()?;
    let canary_pipeline = Pipeline::builder("demo")
        .stage(
            "deploy",
            Deploy::new(service.clone())
                .env("production")
                .strategy(canary),
        )
        .build()?;
    let runner = Runner::new(Arc::new(MemoryStore::new()))
        .environment("production")
        .sink(FnSink(print_event));

    println!("== v1: blue-green ==");
    let r = runner.run(&blue_green, Release::new("v1")).await?;
    println!("{r}");
    let load = Load::start(format!("{}/cgi-bin/app", router.url()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("== v2: canary by traffic [10, 50, 100] ==");
    let before = load.failed();
    let r = runner.run(&canary_pipeline, Release::new("v2")).await?;
    println!("{r}");
    let v2_failures = load.failed() - before;
    if r.status != RunStatus::Succeeded {
        bail!("v2 should have been promoted");
    }

    println!("== v3-bad: canary by traffic [10, 50, 100] ==");
    let before = load.failed();
    let r = runner.run(&canary_pipeline, Release::new("v3-bad")).await?;
    println!("{r}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bad_failures = load.failed() - before;
    let (ok, failed) = load.stop().await;
    for s in router.stats() {
        println!(
            "  upstream {:<6} weight {:>3}%  requests {:>6}  errors {:>4}  p50 {:.2} ms  p99 {:.2} ms",
            s.name, s.weight, s.requests, s.errors, s.p50_ms, s.p99_ms
        );
    }
    let live = HttpClient::new()
        .get(&format!("{}/cgi-bin/app", router.url()))
        .await
        .map(|r| r.text().trim().to_string())
        .unwrap_or_default();
    service.remove_all().await.ok();
    println!(
        "client: {ok} answered, {failed} failed; during v2's canary: {v2_failures} failed; during v3-bad's: {bad_failures} (its 10% before it was pulled)"
    );
    if r.status != RunStatus::Failed || live != "v2" || v2_failures != 0 {
        bail!("expected v3-bad aborted, v2 serving and no failure during v2's rollout; got {} / {live} / {v2_failures}", r.status);
    }
    println!(
        "OK: v2 promoted with no failed request, v3-bad pulled at 10% by the router's own error rate (took {:.0} s).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo_image(version: &str) {
    let app = if version.contains("bad") {
        "#!/bin/sh\nprintf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nbroken\\n'\n".to_string()
    } else {
        format!("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n{version}\\n'\n")
    };
    build_image(
        "cd-demo",
        version,
        &[("/www/health", "ok\n"), ("/www/cgi-bin/app", &app)],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
}

fn print_event(e: &Event) {
    match &e.kind {
        EventKind::Rollout { message, .. } => println!("  {message}"),
        EventKind::AnalysisSample { status, detail, .. } => {
            println!("    sample {status}: {detail}")
        }
        _ => {}
    }
}

/// About 100 requests a second, failures counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let client = HttpClient::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let tasks = (0..2)
            .map(|_| {
                let (stop, ok, failed, client, url) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    client.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        match client.get(&url).await {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                            _ => failed.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}
