//! The pipeline's own metrics, served by the Prometheus exporter and
//! scraped by a real Prometheus: runs by status, node durations, rollbacks,
//! gate and lock waits, targets switched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd::core::{
    gate_fn, stage_fn, Error, MemoryDeployer, MemoryStore, Pipeline, Release, RunStatus, Runner,
    StageOutput, Verdict,
};
use cd::stages::prometheus::Prometheus;
use cd::stages::Deploy;
use cd_testkit::prometheus::{PrometheusServer, ScrapeTarget};

/// The value of each series of an instant query, with its labels.
async fn series(p: &Prometheus, q: &str) -> Vec<(serde_json::Value, f64)> {
    let data = p.query(q).await.unwrap();
    data["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let v = s["value"][1]
                .as_str()
                .unwrap_or("NaN")
                .parse()
                .unwrap_or(f64::NAN);
            (s["metric"].clone(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_exporter_shows_the_run_metrics_to_a_real_prometheus() {
    let port = cd_testkit::reserve_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", port.port).parse().unwrap();
    cd::telemetry::serve_prometheus(addr).unwrap();
    let err = cd::telemetry::serve_prometheus(addr).unwrap_err();
    assert_eq!(err.kind(), cd::core::ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");

    // A good run: two targets switched, a gate that waits once.
    let deployer = Arc::new(MemoryDeployer::new(["web1", "web2"]));
    let waited = Arc::new(AtomicBool::new(false));
    let w = waited.clone();
    let good = Pipeline::builder("tele")
        .gate(
            "approval",
            gate_fn(move |_cx| {
                let w = w.clone();
                async move {
                    Ok(if w.swap(true, Ordering::SeqCst) {
                        Verdict::Pass
                    } else {
                        Verdict::wait(Duration::from_millis(60), "once")
                    })
                }
            }),
        )
        .stage("deploy", Deploy::new(deployer.clone()).env("production"))
        .needs(["approval"])
        .build()
        .unwrap();
    let runner = Runner::new(Arc::new(MemoryStore::new())).environment("production");
    let report = runner.run(&good, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");

    // A bad run: the deploy is rolled back after a failing check.
    let bad = Pipeline::builder("tele")
        .stage("deploy", Deploy::new(deployer.clone()).env("production"))
        .stage(
            "check",
            stage_fn(|_cx| async move {
                Err::<StageOutput, _>(Error::failed("smoke test failed").retryable(false))
            }),
        )
        .needs(["deploy"])
        .build()
        .unwrap();
    let report = runner.run(&bad, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");

    let Some(prom) = PrometheusServer::start(&[ScrapeTarget::new(addr.to_string())]) else {
        return;
    };
    assert!(prom.wait_ready(Duration::from_secs(60)));
    let p = Prometheus::new(prom.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let r = series(&p, "cd_runs_total").await;
        if r.len() >= 2 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let status = |m: &serde_json::Value| m["status"].as_str().unwrap_or("").to_string();
    let mut statuses: Vec<(String, f64)> = runs.iter().map(|(m, v)| (status(m), *v)).collect();
    statuses.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        statuses,
        [("failed".to_string(), 1.0), ("succeeded".to_string(), 1.0)],
        "{runs:?}"
    );
    assert!(runs
        .iter()
        .all(|(m, _)| m["pipeline"] == "tele" && m["environment"] == "production"));

    let rollbacks = series(&p, "cd_rollbacks_total").await;
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert_eq!(rollbacks[0].0["node"], "deploy");
    assert_eq!(rollbacks[0].0["status"], "ok");
    assert_eq!(rollbacks[0].1, 1.0);

    // v1 to two targets, v2 to two targets.
    let switched = series(&p, "cd_targets_switched_total").await;
    assert_eq!(switched.len(), 1, "{switched:?}");
    assert_eq!(switched[0].1, 4.0);

    let nodes = series(&p, "cd_node_duration_seconds_count").await;
    let names: Vec<String> = nodes
        .iter()
        .map(|(m, _)| {
            format!(
                "{}:{}",
                m["node"].as_str().unwrap(),
                m["status"].as_str().unwrap()
            )
        })
        .collect();
    for want in ["deploy:succeeded", "check:failed", "approval:succeeded"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let gate = series(&p, "cd_gate_wait_seconds_sum").await;
    assert_eq!(gate.len(), 1, "{gate:?}");
    assert_eq!(gate[0].0["outcome"], "passed");
    assert!(
        gate[0].1 >= 0.06,
        "the gate waited at least 60 ms: {gate:?}"
    );
    let buckets = series(&p, r#"cd_gate_wait_seconds_bucket{le="0.005"}"#).await;
    assert_eq!(
        buckets.len(),
        1,
        "histograms are real Prometheus histograms"
    );
    let lock = series(&p, "cd_lock_wait_seconds_count").await;
    assert_eq!(lock.iter().map(|(_, v)| *v).sum::<f64>(), 2.0, "{lock:?}");
}
