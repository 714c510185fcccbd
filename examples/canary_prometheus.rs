//! A canary judged by the Mann-Whitney judge on metrics a real Prometheus
//! scrapes.
//!
//! ```text
//! scripts/setup.sh                      # installs prometheus (once)
//! cargo run --example canary_prometheus
//! ```
//!
//! Four instances of a demo service (this executable started with `serve`)
//! run on local ports and record the latency of every request they answer
//! in a Prometheus histogram (`demo_request_duration_seconds`, labelled by
//! target). The example starts Prometheus scraping them every second and
//! sends each a steady trickle of requests. Then:
//!
//! 1. `v1` goes out with a rolling update;
//! 2. `v2` goes out as a canary `[25, 50, 100]`: after each step the judge
//!    compares the mean latency of the canary targets with the targets
//!    still on `v1` (on the last step, with the fleet before the rollout)
//!    and the canary is promoted;
//! 3. `v3-slow` (40 ms slower per request) goes out the same way: the judge
//!    sees the canary's latency shift at step 1, names the metric, and the
//!    canary is rolled back to `v2`.
//!
//! Each judgement is printed metric by metric: classification, p-value
//! (two-sided Mann-Whitney U, as scipy computes it), the Hodges-Lehmann
//! shift with its 98% interval, medians and sample counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cd::backends::local::LocalProcessDeployer;
use cd::core::{
    Analysis, Canary, Event, EventKind, FnSink, MemoryStore, NodeStatus, Pipeline, Release,
    RunReport, RunStatus, Runner,
};
use cd::stages::canary::{CanaryAnalysis, JUDGEMENT_EVENT};
use cd::stages::judge::{Direction, JudgeReport, Metric};
use cd::stages::prometheus::Prometheus;
use cd::stages::{Deploy, HttpClient};
use cd_testkit::prometheus::{PrometheusServer, ScrapeTarget};

const PORTS: [u16; 4] = [18201, 18202, 18203, 18204];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]).await;
    }
    let started = Instant::now();
    let state = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut builder = LocalProcessDeployer::builder()
        .name("demo")
        .program(exe.to_string_lossy())
        .args([
            "serve",
            "--port",
            "{port}",
            "--version",
            "{version}",
            "--target",
            "{target}",
        ])
        .health_path("/health")
        .health_timeout(Duration::from_secs(10))
        .state_dir(state.path().join("local"));
    for (i, port) in PORTS.iter().enumerate() {
        builder = builder.target(format!("web{}", i + 1), *port);
    }
    let fleet = builder.build()?;

    let scrape: Vec<ScrapeTarget> = PORTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            ScrapeTarget::new(format!("127.0.0.1:{p}")).label("target", format!("web{}", i + 1))
        })
        .collect();
    let Some(prometheus) = PrometheusServer::start(&scrape) else {
        bail!("prometheus is not installed: run scripts/setup.sh first");
    };
    if !prometheus.wait_ready(Duration::from_secs(60)) {
        bail!("prometheus did not become ready at {}", prometheus.url());
    }
    println!(
        "prometheus at {} scraping {} targets every 1 s",
        prometheus.url(),
        PORTS.len()
    );
    tokio::spawn(traffic());

    // Mean latency per target over 3 s windows, in seconds.
    let latency = r#"rate(demo_request_duration_seconds_sum{target=~"{{targets}}"}[3s])
        / rate(demo_request_duration_seconds_count{target=~"{{targets}}"}[3s])"#;
    let errors = r#"rate(demo_request_errors_total{target=~"{{targets}}"}[3s])"#;
    let judge = CanaryAnalysis::new(Prometheus::new(prometheus.url()))
        .metric(
            Metric::new("latency")
                .direction(Direction::Increase)
                .effect_size(1.2, 0.8)
                .critical(true),
            latency,
        )
        .metric(Metric::new("errors").direction(Direction::Increase), errors)
        .window(Duration::from_secs(10), Duration::from_secs(1));
    let canary = Canary::new([25, 50, 100]).analysis(
        judge,
        Analysis::new()
            .initial_delay(Duration::from_secs(8))
            .interval(Duration::from_secs(2))
            .count(2),
    );
    let store = Arc::new(MemoryStore::new());
    let runner = Runner::new(store)
        .environment("production")
        .sink(FnSink(print_event));
    let rolling = Pipeline::builder("demo")
        .stage("deploy", Deploy::new(fleet.clone()).env("production"))
        .build()?;
    let canary = Pipeline::builder("demo")
        .stage(
            "deploy",
            Deploy::new(fleet.clone())
                .env("production")
                .strategy(canary),
        )
        .build()?;

    println!("== v1: rolling update ==");
    expect(
        runner.run(&rolling, Release::new("v1")).await?,
        RunStatus::Succeeded,
    )?;
    // Let Prometheus see v1 for a while: the baseline of v2's last step.
    tokio::time::sleep(Duration::from_secs(12)).await;
    println!("== v2: canary [25, 50, 100] ==");
    expect(
        runner.run(&canary, Release::new("v2")).await?,
        RunStatus::Succeeded,
    )?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    println!("== v3-slow: canary [25, 50, 100] ==");
    let report = runner.run(&canary, Release::new("v3-slow")).await?;
    expect(report.clone(), RunStatus::Failed)?;
    if report.node("deploy").map(|n| n.status) != Some(NodeStatus::Failed) {
        bail!("v3-slow's canary should have been aborted");
    }
    let live = fleet_versions(&fleet).await;
    println!("live now: {live:?}");
    fleet.stop_all().await.ok();
    if live.iter().any(|v| v != "v2") {
        bail!("every target should serve v2 after the canary rolled back, got {live:?}");
    }
    println!(
        "OK: v2 promoted by the judge; v3-slow's canary judged slower at step 1 and rolled back (took {:.0} s).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn expect(report: RunReport, status: RunStatus) -> anyhow::Result<()> {
    println!("{report}");
    if report.status != status {
        bail!("expected the run {status}, it {}", report.status);
    }
    Ok(())
}

async fn fleet_versions(fleet: &LocalProcessDeployer) -> Vec<String> {
    let client = HttpClient::new();
    let mut out = Vec::new();
    for p in PORTS {
        let v = client
            .get(&format!("http://127.0.0.1:{p}/version"))
            .await
            .map(|r| r.text().trim().to_string())
            .unwrap_or_else(|e| format!("down: {e}"));
        out.push(v);
    }
    let _ = fleet;
    out
}

/// About 20 requests a second to every target, for the whole example.
async fn traffic() {
    let client = HttpClient::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        for p in PORTS {
            let c = client.clone();
            tokio::spawn(async move {
                let _ = c.get(&format!("http://127.0.0.1:{p}/")).await;
            });
        }
    }
}

fn print_event(e: &Event) {
    match &e.kind {
        EventKind::Rollout { message, .. } => println!("  {message}"),
        EventKind::Custom { name, data } if name == JUDGEMENT_EVENT => {
            if let Ok(r) = serde_json::from_value::<JudgeReport>(data.clone()) {
                print_judgement(&r);
            }
        }
        EventKind::RolledBack { .. } => println!("  rolled back"),
        _ => {}
    }
}

fn print_judgement(r: &JudgeReport) {
    println!("  judge: score {:.0}/100 -> {}", r.score, r.verdict);
    for m in &r.metrics {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let shift = m
            .shift
            .as_ref()
            .map(|s| format!("{:+.4} [{:+.4}, {:+.4}]", s.estimate, s.lower, s.upper))
            .unwrap_or_else(|| "-".into());
        println!(
            "    {:<8} {:<14} p={:<8} shift={shift} median baseline={} canary={} n={}/{}",
            m.name,
            format!("{:?}", m.classification),
            f(m.p_value),
            f(m.baseline_median),
            f(m.canary_median),
            m.baseline_count,
            m.canary_count,
        );
        if !m.reason.is_empty() {
            println!("             {}", m.reason);
        }
    }
}

/// Latency buckets of the demo's histogram, in seconds.
const BUCKETS: [f64; 8] = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25];

/// The demo's request statistics.
#[derive(Default)]
struct Stats {
    buckets: [AtomicU64; 8],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Stats {
    fn record(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// The Prometheus text format.
    fn render(&self) -> String {
        let mut m = String::from("# TYPE demo_request_duration_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            m.push_str(&format!(
                "demo_request_duration_seconds_bucket{{le=\"{b}\"}} {}\n",
                self.buckets[i].load(Ordering::Relaxed)
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        m.push_str(&format!(
            "demo_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             demo_request_duration_seconds_sum {}\n\
             demo_request_duration_seconds_count {count}\n\
             # TYPE demo_request_errors_total counter\n\
             demo_request_errors_total 0\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
        m
    }
}

/// The demo service (hyper): `GET /` answers after a little work (5-15 ms;
/// 40 ms more in a `*-slow` version) and records how long it took;
/// `GET /metrics` exposes the histogram `demo_request_duration_seconds` and
/// the counter `demo_request_errors_total`; `/health` and `/version` answer
/// at once.
async fn serve(args: &[String]) -> anyhow::Result<()> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let port: u16 = flag("--port").context("--port is required")?.parse()?;
    let version = flag("--version").unwrap_or_else(|| "dev".into());
    let slow = version.contains("slow");
    let stats = Arc::new(Stats::default());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    loop {
        let (sock, _) = listener.accept().await?;
        let (stats, version) = (stats.clone(), version.clone());
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (stats, version) = (stats.clone(), version.clone());
                async move {
                    let body = match req.uri().path() {
                        "/" => {
                            let t = Instant::now();
                            let work = 5 + rand::random::<u64>() % 11 + if slow { 40 } else { 0 };
                            tokio::time::sleep(Duration::from_millis(work)).await;
                            stats.record(t.elapsed().as_secs_f64());
                            format!("hello from {version}\n")
                        }
                        "/metrics" => stats.render(),
                        "/version" => format!("{version}\n"),
                        _ => "ok\n".to_string(),
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(hyper::body::Bytes::from(body)),
                    ))
                }
            });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service)
                .await;
        });
    }
}
