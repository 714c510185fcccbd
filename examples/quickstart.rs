//! Quickstart: every step of continuous delivery in one pipeline, on this
//! machine, with no server to run.
//!
//! ```text
//! cargo run --example quickstart -- --auto-approve
//! ```
//!
//! It delivers a small demo HTTP service (this executable started with
//! `serve`) twice through the same pipeline:
//!
//! 1. deploy to staging (a local process);
//! 2. regression checks against staging: HTTP smoke tests, and a test suite
//!    (this executable started with `test-suite`, writing a JUnit report)
//!    whose result is compared with the previous release's; a short
//!    performance check (500 requests, p95 threshold, compared with the
//!    previous release);
//! 3. compliance: a check (version present, artifact checksum matches);
//!    the SBOM of this workspace (CycloneDX 1.5, stored with the release:
//!    `cdctl sbom production v1`); a secret scan of its sources; an
//!    advisory check of the SBOM's components against the demonstration
//!    OSV advisories in `examples/quickstart-osv/`; and the Rego policies
//!    in `policies/` deciding over those results;
//! 4. an approval gate: `--auto-approve`, or approve it with `cdctl` or in
//!    the web console (<http://127.0.0.1:18088/>) with the token the
//!    quickstart creates for the approver `you` in `.cd/you.token` (both
//!    are printed while the run waits);
//! 5. a blue-green production deploy behind a local TCP router;
//! 6. a bake period watching two monitors (health, and latency under
//!    500 ms), with a verdict per monitor; a failed bake opens an incident.
//!
//! Release `v1` goes live. Release `v2-broken` passes staging, goes live on
//! the idle slot, and then its health degrades during the bake: the runner
//! rolls it back automatically (traffic switches back to `v1`, staging goes
//! back to `v1`, release history says so). State is kept in `.cd/state.db`:
//! `cargo run --bin cdctl -- runs` and `cargo run --bin cdctl -- history
//! production` show it afterwards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cd::backends::local::LocalProcessDeployer;
use cd::backends::router::HttpRouter;
use cd::backends::sqlite::SqliteStore;
use cd::core::{
    Analysis, Event, EventKind, FnSink, NodeStatus, Pipeline, Release, RunReport, RunStatus,
    Runner, Store,
};
use cd::stages::compliance::advisories::{AdvisoryCheck, Level};
use cd::stages::compliance::policy::{Policy, PolicyGate};
use cd::stages::compliance::sbom::SbomStage;
use cd::stages::compliance::secrets::SecretScan;
use cd::stages::{
    ApprovalGate, Bake, ComplianceCheck, Deploy, HttpCheck, HttpMonitor, LoadTest, TestSuite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const STAGING_PORT: u16 = 18090;
const BLUE_PORT: u16 = 18091;
const GREEN_PORT: u16 = 18092;
const ROUTER_PORT: u16 = 18080;
const CONSOLE_PORT: u16 = 18088;

/// The state directory, for the commands the event printer suggests.
static STATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]).await;
    }
    if args.first().map(String::as_str) == Some("test-suite") {
        return test_suite(&args[1..]).await;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: quickstart [--auto-approve] [--state-dir DIR]\n       quickstart serve --port PORT --version VERSION");
        return Ok(());
    }
    let auto_approve = args.iter().any(|a| a == "--auto-approve");
    let state_dir = flag(&args, "--state-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cd"));
    run_demo(auto_approve, &state_dir).await
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn run_demo(auto_approve: bool, state_dir: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(state_dir.join("state.db")).await?);
    let exe = std::env::current_exe().context("locating the quickstart executable")?;
    let sha = sha256_hex(&exe)?;

    let service = |name: &str| {
        LocalProcessDeployer::builder()
            .name(name)
            .program(exe.to_string_lossy())
            .args(["serve", "--port", "{port}", "--version", "{version}"])
            .health_path("/health")
            .health_timeout(Duration::from_secs(10))
            .state_dir(state_dir.join("local"))
    };
    let staging = service("staging").target("staging", STAGING_PORT).build()?;
    let production = service("production")
        .target("blue", BLUE_PORT)
        .target("green", GREEN_PORT)
        .build()?;
    // The HTTP router in front of the two slots: a switch drains the
    // requests in flight on the old slot, so blue-green drops none.
    let router = HttpRouter::builder(format!("127.0.0.1:{ROUTER_PORT}"))
        .upstreams_of(&cd::core::Deployer::targets(&production))
        .state_file(state_dir.join("router.json"))
        .drain_timeout(Duration::from_secs(10))
        .start()
        .await?;
    let staging_url = format!("http://127.0.0.1:{STAGING_PORT}");
    let production_url = router.url();

    // Compliance runs over this workspace (the demo service is built from
    // it) with the example policies, except the production-approvals one:
    // the quickstart has a single approver.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut policy = Policy::new();
    for file in [
        "no_secrets.rego",
        "no_critical_vulnerabilities.rego",
        "images_by_digest.rego",
        "terraform_protected.rego",
    ] {
        policy = policy.file(workspace.join("policies").join(file))?;
    }

    // The web console over the same store: runs, their DAG, approvals.
    let console_listener = tokio::net::TcpListener::bind(("127.0.0.1", CONSOLE_PORT))
        .await
        .with_context(|| format!("the console's port {CONSOLE_PORT}"))?;
    tokio::spawn(cd::web::serve(
        console_listener,
        cd::web::Console::new(store.clone()),
    ));
    println!(
        "== web console: http://127.0.0.1:{CONSOLE_PORT}/ (sign in with an approver's token) =="
    );

    // The approver's token: made once, kept in the state directory (0600).
    let _ = STATE_DIR.set(state_dir.to_path_buf());
    let token_file = state_dir.join("you.token");
    if !auto_approve && !token_file.exists() {
        let (record, token) = cd::core::approval::issue_token("you", None, "quickstart")?;
        store.put_token(&record).await?;
        cd::cli::write_secret_file(&token_file, token.expose())?;
        println!(
            "== approver token for `you` written to {} (token {}) ==",
            token_file.display(),
            record.id
        );
    }

    let pipeline = Pipeline::builder("quickstart")
        .stage("staging", Deploy::new(staging.clone()).env("staging"))
        .timeout(Duration::from_secs(30))
        .stage(
            "smoke-tests",
            HttpCheck::base_url(&staging_url)
                .expect("/health", 200)
                .expect_body("/", 200, "hello from")
                .expect("/missing", 404),
        )
        .needs(["staging"])
        .stage(
            "regression-tests",
            TestSuite::new(exe.display().to_string())
                .args(["test-suite", "--url", &staging_url, "--report", "junit.xml"])
                .cwd(state_dir)
                .report("junit.xml")
                .timeout(Duration::from_secs(60)),
        )
        .needs(["staging"])
        .stage(
            "load-test",
            LoadTest::get(format!("{staging_url}/"))
                .requests(500)
                .concurrency(8)
                .p95_below_ms(200)
                .compare_with_previous(200.0),
        )
        .needs(["staging"])
        .stage(
            "compliance",
            ComplianceCheck::new()
                .version_pattern("v*")
                .require_artifact(),
        )
        .stage("sbom", SbomStage::cargo(workspace).name("quickstart"))
        .stage(
            "secret-scan",
            SecretScan::paths(
                [
                    "src",
                    "examples",
                    "cd-core/src",
                    "cd-stages/src",
                    "cd-backends/src",
                ]
                .map(|d| workspace.join(d)),
            )
            .report_only(),
        )
        .stage(
            "advisories",
            AdvisoryCheck::sbom_from(workspace.join("examples/quickstart-osv"), "sbom")
                .fail_at(Level::Critical)
                .report_only(),
        )
        .needs(["sbom"])
        .stage("policy", PolicyGate::new(policy))
        .needs(["compliance", "sbom", "secret-scan", "advisories"])
        .gate(
            "approval",
            ApprovalGate::any_of(["you"])
                .recheck_every(Duration::from_secs(2))
                .auto_approve_if(auto_approve.then_some("you")),
        )
        .needs(["smoke-tests", "regression-tests", "load-test", "policy"])
        .stage(
            "production",
            Deploy::new(production.clone())
                .env("production")
                .blue_green(router.clone()),
        )
        .needs(["approval"])
        .timeout(Duration::from_secs(30))
        .stage(
            "bake",
            // Two signals, judged together: health answers, and answers fast.
            Bake::new(HttpMonitor::get(format!("{production_url}/health")).label("health"))
                .monitor(
                    HttpMonitor::get(format!("{production_url}/"))
                        .label("latency")
                        .latency_below(Duration::from_millis(500)),
                )
                .analysis(
                    Analysis::new()
                        .interval(Duration::from_millis(400))
                        .count(6)
                        .failure_limit(0),
                ),
        )
        .needs(["production"])
        .build()?;

    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nCtrl-C: stopping the run (finally nodes still run)…");
            c2.cancel();
        }
    });
    let runner = Runner::new(store.clone())
        .environment("production")
        .concurrency(4)
        .cancel_token(cancel)
        .sink(FnSink(print_event));

    println!("== pipeline ==\n{}", pipeline.to_mermaid());
    let mut outcome = Ok(());
    let mut reports = Vec::new();
    for version in ["v1", "v2-broken"] {
        println!("== delivering {version} ==");
        let release = Release::new(version).artifact_with_sha256(&exe, &sha);
        let report = runner.run(&pipeline, release).await?;
        println!("{report}");
        if version == "v1" {
            print_compliance(&report);
        }
        reports.push(report);
    }

    // What is live now?
    let client = cd::stages::HttpClient::new();
    let live = client
        .get(&format!("{production_url}/"))
        .await
        .map(|r| r.text().into_owned());
    let history = store.release_history("production", 10).await?;
    println!("== production release history (newest first) ==");
    for r in &history {
        println!(
            "  {:<10} {:<12} {}",
            r.version,
            r.status.as_str(),
            r.at.format("%H:%M:%S")
        );
    }
    let incidents: Vec<_> = store
        .incidents(true, 50)
        .await?
        .into_iter()
        .filter(|i| i.run_id.as_deref() == Some(reports[1].run_id.as_str()))
        .collect();
    for i in &incidents {
        println!(
            "== incident {} ({}, {}) ==\n  {}\n  {}",
            i.id, i.severity, i.status, i.title, i.reason
        );
    }
    if incidents.is_empty() {
        outcome = Err(anyhow::anyhow!(
            "the failed bake should have opened an incident"
        ));
    }
    match check(&reports[0], &reports[1], live.as_deref().ok()) {
        Ok(()) => println!(
            "OK: v1 is live at {production_url}; v2-broken failed its bake and was rolled back automatically (took {:.1}s).",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => outcome = Err(e),
    }
    println!(
        "State: {} (try `cargo run --bin cdctl -- history production` and `cargo run --bin cdctl -- incidents`).",
        state_dir.join("state.db").display()
    );
    // The demo cleans up its processes; a real deploy leaves them running.
    staging.stop_all().await.ok();
    production.stop_all().await.ok();
    outcome
}

/// The compliance results of a run, from its nodes' outputs.
fn print_compliance(r: &RunReport) {
    let out = |n: &str| r.output(n).cloned().unwrap_or_default();
    let (sbom, scan, adv, policy) = (
        out("sbom"),
        out("secret-scan"),
        out("advisories"),
        out("policy"),
    );
    println!("== compliance of {} ==", r.release);
    println!(
        "  SBOM        CycloneDX 1.5, {} components, {} bytes, sha256 {}…{}",
        sbom["components"],
        sbom["bytes"],
        sbom["sha256"]
            .as_str()
            .unwrap_or("")
            .get(..12)
            .unwrap_or(""),
        if sbom["stored"] == true {
            format!(" (stored: cdctl sbom production {})", r.release)
        } else {
            String::new()
        }
    );
    let rep = &scan["report"];
    println!(
        "  secrets     {} finding(s) in {} files ({} bytes), {} skipped",
        rep["findings"].as_array().map_or(0, Vec::len),
        rep["files"],
        rep["bytes"],
        rep["skipped"].as_array().map_or(0, Vec::len)
    );
    let count = |k: &str| adv[k].as_array().map_or(0, Vec::len);
    println!(
        "  advisories  {} components checked: {} at or above critical, {} below, {} ignored",
        adv["components"],
        count("failing"),
        count("below_threshold"),
        count("ignored")
    );
    for m in adv["below_threshold"].as_array().into_iter().flatten() {
        println!(
            "              {} {}@{} ({}, {}): {}",
            m["id"].as_str().unwrap_or(""),
            m["component"]["name"].as_str().unwrap_or(""),
            m["component"]["version"].as_str().unwrap_or(""),
            m["level"].as_str().unwrap_or(""),
            m["score"],
            m["summary"].as_str().unwrap_or("")
        );
    }
    println!(
        "  policy      {} by {} package(s) in {:.1} ms: {} deny, {} warn",
        if policy["allowed"] == true {
            "allowed"
        } else {
            "denied"
        },
        policy["packages"].as_array().map_or(0, Vec::len),
        policy["eval_ms"].as_f64().unwrap_or(0.0),
        policy["deny"].as_array().map_or(0, Vec::len),
        policy["warn"].as_array().map_or(0, Vec::len)
    );
    for m in policy["warn"].as_array().into_iter().flatten() {
        println!(
            "              warn {}: {}",
            m["package"].as_str().unwrap_or(""),
            m["message"].as_str().unwrap_or("")
        );
    }
}

fn check(v1: &RunReport, v2: &RunReport, live: Option<&str>) -> anyhow::Result<()> {
    if v1.status != RunStatus::Succeeded {
        bail!("v1 should have gone live, but the run {}", v1.status);
    }
    if v2.status != RunStatus::Failed {
        bail!(
            "v2-broken should have failed its bake, but the run {}",
            v2.status
        );
    }
    let policy = v1.output("policy").cloned().unwrap_or_default();
    let components = v1.output("sbom").and_then(|o| o["components"].as_u64());
    if policy["allowed"] != true || components.unwrap_or(0) == 0 {
        bail!("v1's compliance should pass with an SBOM, got policy {policy} and {components:?} components");
    }
    let bake = v2.node("bake").map(|n| n.status);
    let prod = v2.node("production").map(|n| n.status);
    if bake != Some(NodeStatus::Failed) || prod != Some(NodeStatus::RolledBack) {
        bail!("expected bake failed and production rolled back, got {bake:?} / {prod:?}");
    }
    match live {
        Some(body) if body.contains("v1") => Ok(()),
        other => bail!("production should serve v1 after the rollback, got {other:?}"),
    }
}

fn print_event(e: &Event) {
    let node = e.node.as_deref().unwrap_or("");
    let line = match &e.kind {
        EventKind::NodeStarted { attempt } if *attempt > 1 => format!("retry #{attempt}"),
        EventKind::NodeSucceeded { duration_ms } => format!("done in {duration_ms} ms"),
        EventKind::NodeFailed { error } => format!("FAILED: {}", error.message),
        EventKind::NodeSkipped { reason } => format!("skipped: {reason}"),
        EventKind::GateWaiting { reason, .. } => {
            // Once, and again only when it changes (not every recheck).
            static LAST: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
            let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
            if *last == *reason {
                return;
            }
            last.clone_from(reason);
            format!(
                "waiting: {reason}\n    e.g. cargo run --bin cdctl -- --db {dir}/state.db approve {} {node} --token-file {dir}/you.token\n    or open http://127.0.0.1:{CONSOLE_PORT}/approvals and sign in with the token in {dir}/you.token",
                e.run_id,
                dir = STATE_DIR.get().map(|d| d.display().to_string()).unwrap_or_else(|| ".cd".into())
            )
        }
        EventKind::GatePassed if node == "approval" => "approved".into(),
        EventKind::GatePassed => "passed".into(),
        EventKind::RollbackStarted => "rolling back…".into(),
        EventKind::RolledBack { duration_ms } => format!("ROLLED BACK in {duration_ms} ms"),
        EventKind::RollbackFailed { error } => format!("ROLLBACK FAILED: {}", error.message),
        EventKind::Rollout { message, .. } => message.clone(),
        EventKind::AnalysisSample {
            monitor,
            status,
            detail,
            ..
        } => {
            format!("{monitor} sample: {status} {detail}")
        }
        EventKind::Lock {
            status,
            environment,
            ..
        } if status == "waiting" => {
            format!("waiting for the {environment} lock")
        }
        // The regression and load tables, the bake's verdict per monitor.
        EventKind::Log { message, .. }
            if node == "bake"
                && (message.starts_with("bake verdict") || message.starts_with("  ")) =>
        {
            message.clone()
        }
        EventKind::Log { message, .. }
            if matches!(node, "sbom" | "secret-scan" | "advisories" | "policy") =>
        {
            message.clone()
        }
        EventKind::Log { message, .. }
            if matches!(node, "regression-tests" | "load-test")
                && !message.starts_with("running tests")
                && !message.starts_with("load: GET") =>
        {
            message.clone()
        }
        _ => return,
    };
    eprintln!("  [{node:>16}] {line}");
}

fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    let (hex, _) = cd::stages::compliance::sha256_file(path)
        .with_context(|| format!("hashing {}", path.display()))?;
    Ok(hex)
}

/// The demo service: `GET /` says hello with the version, `GET /health` is
/// 200 — except in a `*-broken` version, whose health degrades from its 4th
/// check on (a simulated leak that only shows under monitoring).
async fn serve(args: &[String]) -> anyhow::Result<()> {
    let port: u16 = flag(args, "--port")
        .context("--port is required")?
        .parse()?;
    let version = flag(args, "--version").unwrap_or_else(|| "dev".into());
    let broken = version.contains("broken");
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let health_checks = Arc::new(AtomicU64::new(0));
    loop {
        let (mut sock, _) = listener.accept().await?;
        let version = version.clone();
        let health_checks = health_checks.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            loop {
                // Read one request head (the demo ignores request bodies).
                let end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let close = head.to_ascii_lowercase().contains("connection: close");
                let (status, body) = match path.as_str() {
                    "/" => ("200 OK", format!("hello from {version}\n")),
                    "/version" => ("200 OK", format!("{version}\n")),
                    "/health" => {
                        let n = health_checks.fetch_add(1, Ordering::SeqCst) + 1;
                        if broken && n > 3 {
                            (
                                "503 Service Unavailable",
                                "unhealthy: out of memory\n".to_string(),
                            )
                        } else {
                            ("200 OK", "ok\n".to_string())
                        }
                    }
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
                    body.len(),
                    if close { "connection: close\r\n" } else { "" }
                );
                if sock.write_all(resp.as_bytes()).await.is_err() || close {
                    return;
                }
            }
        });
    }
}

/// The demo's own regression suite (what `pytest --junitxml` would be in a
/// real project): checks the service at `--url` and writes a JUnit XML
/// report to `--report`. Exits 1 when a check fails.
async fn test_suite(args: &[String]) -> anyhow::Result<()> {
    let url = flag(args, "--url").context("--url is required")?;
    let report = flag(args, "--report").context("--report is required")?;
    let client = cd::stages::HttpClient::new();
    let mut cases = Vec::new();
    let checks: [(&str, &str, u16, Option<&str>); 4] = [
        ("home_says_hello", "/", 200, Some("hello from")),
        ("health_is_ok", "/health", 200, None),
        ("unknown_path_is_404", "/missing", 404, None),
        ("version_endpoint_answers", "/version", 200, Some("v")),
    ];
    for (name, path, status, body) in checks {
        let started = std::time::Instant::now();
        let failure = match client.get(&format!("{url}{path}")).await {
            Ok(r) if r.status != status => {
                Some(format!("GET {path}: {} instead of {status}", r.status))
            }
            Ok(r) => body
                .filter(|b| !r.text().contains(b))
                .map(|b| format!("GET {path}: the body lacks `{b}`")),
            Err(e) => Some(e.to_string()),
        };
        println!(
            "{name}: {}",
            if failure.is_some() { "FAILED" } else { "ok" }
        );
        cases.push((name, started.elapsed().as_secs_f64(), failure));
    }
    let failures = cases.iter().filter(|c| c.2.is_some()).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"demo\" tests=\"{}\" failures=\"{failures}\">\n",
        cases.len()
    );
    for (name, secs, failure) in &cases {
        match failure {
            None => xml.push_str(&format!(
                "<testcase classname=\"demo::http\" name=\"{name}\" time=\"{secs:.3}\"/>\n"
            )),
            Some(f) => xml.push_str(&format!(
                "<testcase classname=\"demo::http\" name=\"{name}\" time=\"{secs:.3}\"><failure message=\"{}\"/></testcase>\n",
                f.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;")
            )),
        }
    }
    xml.push_str("</testsuite>\n</testsuites>\n");
    std::fs::write(&report, xml).with_context(|| format!("writing {report}"))?;
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
