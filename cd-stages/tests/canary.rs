//! The canary judge on metrics scraped by a real Prometheus: a canary whose
//! latency is clearly higher fails with that metric named (and the rollout
//! rolls back), identical distributions pass, no data is inconclusive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cd_core::{
    Analysis, Canary, Emitter, MemoryDeployer, MemoryStore, MonitorContext, NodeStatus, Pipeline,
    Release, RunStatus, Runner, Target,
};
use cd_stages::canary::CanaryAnalysis;
use cd_stages::judge::{Classification, Direction, Metric, Verdict};
use cd_stages::prometheus::Prometheus;
use cd_stages::Deploy;
use cd_testkit::prometheus::{metrics_app, PrometheusServer, ScrapeTarget};
use tokio_util::sync::CancellationToken;

/// `app_latency_ms{target=...}` for web1 (slow: 160 ms ± 10), web2 and web3
/// (100 ms ± 10), different at every scrape (a xorshift sequence).
async fn app() -> u16 {
    let state = Arc::new(AtomicU64::new(0x9E37_79B9_7F4A_7C15));
    metrics_app(move || {
        let next = || {
            let mut x = state.load(Ordering::SeqCst);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            state.store(x, Ordering::SeqCst);
            (x % 2001) as f64 / 100.0 - 10.0
        };
        let mut body = String::from("# TYPE app_latency_ms gauge\n");
        for (t, base) in [("web1", 160.0), ("web2", 100.0), ("web3", 100.0)] {
            body.push_str(&format!(
                "app_latency_ms{{target=\"{t}\"}} {:.2}\n",
                base + next()
            ));
        }
        body
    })
    .await
}

fn judge(prom: &PrometheusServer) -> CanaryAnalysis {
    CanaryAnalysis::new(Prometheus::new(prom.url()))
        .metric(
            Metric::new("latency")
                .direction(Direction::Increase)
                .effect_size(1.2, 0.8)
                .critical(true),
            r#"app_latency_ms{target=~"{{targets}}"}"#,
        )
        .window(Duration::from_secs(20), Duration::from_secs(1))
}

fn cx(targets: &[&str], baseline: &[&str]) -> MonitorContext {
    let mut cx = MonitorContext::new(
        targets.iter().map(|t| Target::new(*t)).collect(),
        Release::new("v2"),
        Emitter::noop(),
        CancellationToken::new(),
    );
    cx.baseline = baseline.iter().map(|t| Target::new(*t)).collect();
    cx
}

#[tokio::test]
async fn the_canary_judge_on_prometheus_metrics() {
    let port = app().await;
    let Some(prom) = PrometheusServer::start(&[ScrapeTarget::new(format!("127.0.0.1:{port}"))])
    else {
        return;
    };
    assert!(
        prom.wait_ready(Duration::from_secs(60)),
        "prometheus never got ready"
    );
    let judge = judge(&prom);

    // Wait until Prometheus holds enough points for both sides.
    let same = cd_testkit::eventually(Duration::from_secs(90), || async {
        let r = judge.judge_now(&cx(&["web2"], &["web3"])).await.unwrap();
        (r.metrics[0].baseline_count >= 10 && r.metrics[0].canary_count >= 10).then_some(r)
    })
    .await
    .expect("no data after 90 s");
    // Identical distributions pass.
    assert_eq!(same.verdict, Verdict::Pass, "{same:?}");
    assert_eq!(same.score, 100.0);
    let m = &same.metrics[0];
    assert_eq!(m.classification, Classification::Pass);
    assert!(m.p_value.is_some() && m.baseline_median.is_some(), "{m:?}");

    // A clearly slower canary fails, the metric named, with its figures.
    let slow = judge.judge_now(&cx(&["web1"], &["web2"])).await.unwrap();
    assert_eq!(slow.verdict, Verdict::Fail, "{slow:?}");
    let m = &slow.metrics[0];
    assert_eq!(m.classification, Classification::High);
    assert!(m.critical_failure);
    assert!(m.p_value.unwrap() < 0.01, "{m:?}");
    assert!(
        m.canary_median.unwrap() > m.baseline_median.unwrap() + 40.0,
        "{m:?}"
    );
    assert!(
        slow.reasons().starts_with("latency: "),
        "{}",
        slow.reasons()
    );

    // No series for the canary: no data, inconclusive, never a pass.
    let none = judge.judge_now(&cx(&["web9"], &["web2"])).await.unwrap();
    assert_eq!(none.verdict, Verdict::Inconclusive, "{none:?}");
    assert_eq!(none.metrics[0].classification, Classification::NoData);

    // As the judge of a real canary rollout: step 1 puts web1 on v2 (the
    // slow one) against web2; the judge fails it and the rollout reverts.
    let deployer = Arc::new(MemoryDeployer::new(["web1", "web2"]));
    let strategy = Canary::new([50, 100]).analysis(
        judge.clone(),
        Analysis::new()
            .initial_delay(Duration::from_secs(5))
            .interval(Duration::from_secs(1))
            .count(2),
    );
    let pipeline = Pipeline::builder("canary")
        .stage("deploy", Deploy::new(deployer.clone()).strategy(strategy))
        .build()
        .unwrap();
    let runner = Runner::new(Arc::new(MemoryStore::new()));
    let report = runner.run(&pipeline, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let node = report.node("deploy").unwrap();
    assert_eq!(node.status, NodeStatus::Failed);
    let err = node.error.as_ref().unwrap().to_string();
    assert!(err.contains("canary aborted at step 1 (50%)"), "{err}");
    assert!(err.contains("latency"), "{err}");
    assert_eq!(
        deployer.versions(),
        ["-", "-"],
        "web1 reverted, web2 untouched"
    );
}
