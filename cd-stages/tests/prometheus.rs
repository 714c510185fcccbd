//! `PrometheusMonitor` against a real Prometheus (the Debian package, which
//! `scripts/setup.sh` installs), scraping a test app every second. A missing
//! prometheus fails the test when `CI` or the set-up script ran, and skips
//! it loudly otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cd_core::{
    Analysis, AnalysisOutcome, Emitter, ErrorKind, Monitor, MonitorContext, Release, SampleStatus,
    Target,
};
use cd_stages::prometheus::{PrometheusMonitor, Threshold};
use cd_testkit::prometheus::{PrometheusServer, ScrapeTarget};
use tokio_util::sync::CancellationToken;

/// A test app exposing `app_error_ratio{version="v2"}` (set by the test).
async fn app(ratio: Arc<AtomicU64>) -> u16 {
    cd_testkit::prometheus::metrics_app(move || {
        format!(
            "# TYPE app_error_ratio gauge\napp_error_ratio{{version=\"v2\"}} {}\n",
            f64::from_bits(ratio.load(Ordering::SeqCst))
        )
    })
    .await
}

fn start_prometheus(app_port: u16) -> Option<PrometheusServer> {
    PrometheusServer::start(&[ScrapeTarget::new(format!("127.0.0.1:{app_port}"))])
}

fn cx() -> MonitorContext {
    MonitorContext::new(
        vec![Target::new("canary")],
        Release::new("v2"),
        Emitter::noop(),
        CancellationToken::new(),
    )
}

/// Samples `m` until `done` holds (up to a minute: Prometheus starts, then
/// scrapes every second).
async fn sample_until(
    m: &PrometheusMonitor,
    done: impl Fn(&cd_core::Result<cd_core::Sample>) -> bool,
) -> cd_core::Result<cd_core::Sample> {
    let sample = || async {
        let s = m.sample(&cx()).await;
        done(&s).then_some(s)
    };
    match cd_testkit::eventually(Duration::from_secs(60), sample).await {
        Ok(s) => s,
        Err(()) => panic!("never reached: last {:?}", m.sample(&cx()).await),
    }
}

#[tokio::test]
async fn prometheus_monitor_sees_a_rise_no_data_bad_queries_and_a_dead_prometheus() {
    let ratio = Arc::new(AtomicU64::new(0.01f64.to_bits()));
    let app_port = app(ratio.clone()).await;
    let Some(prom) = start_prometheus(app_port) else {
        return;
    };
    let errors = PrometheusMonitor::new(
        prom.url(),
        r#"max(app_error_ratio{version="{{version}}"})"#,
        Threshold::Below(0.05),
    )
    .label("error ratio");

    // Healthy once Prometheus has scraped the app.
    let s = sample_until(
        &errors,
        |s| matches!(s, Ok(s) if s.status == SampleStatus::Ok),
    )
    .await
    .unwrap();
    assert_eq!(s.value, Some(0.01));

    // The error ratio rises: the samples fail, and so does the analysis.
    ratio.store(0.3f64.to_bits(), Ordering::SeqCst);
    let s = sample_until(
        &errors,
        |s| matches!(s, Ok(s) if s.status == SampleStatus::Failing),
    )
    .await
    .unwrap();
    assert!(
        s.detail.contains("error ratio = 0.3 (healthy < 0.05)"),
        "{}",
        s.detail
    );
    let outcome = Analysis::new()
        .interval(Duration::from_millis(100))
        .count(3)
        .failure_limit(0)
        .run(&errors, &cx())
        .await
        .unwrap();
    assert!(matches!(outcome, AnalysisOutcome::Fail(_)), "{outcome:?}");

    // An empty result is no data: inconclusive, never a pass.
    let nothing = PrometheusMonitor::new(
        prom.url(),
        r#"app_error_ratio{version="not-deployed"}"#,
        Threshold::Below(0.05),
    );
    let s = nothing.sample(&cx()).await.unwrap();
    assert_eq!(s.status, SampleStatus::NoData, "{s:?}");
    let outcome = Analysis::new()
        .interval(Duration::from_millis(50))
        .count(2)
        .run(&nothing, &cx())
        .await
        .unwrap();
    assert!(
        matches!(outcome, AnalysisOutcome::Inconclusive(_)),
        "{outcome:?}"
    );

    // NaN (0/0) is no data too.
    let nan = PrometheusMonitor::new(prom.url(), "0/0", Threshold::Below(1.0));
    assert_eq!(
        nan.sample(&cx()).await.unwrap().status,
        SampleStatus::NoData
    );

    // A syntax error: a typed error quoting Prometheus.
    let bad = PrometheusMonitor::new(prom.url(), "sum(app_error_ratio", Threshold::Below(1.0));
    let err = bad.sample(&cx()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("bad_data"), "{err}");
    assert!(err.to_string().contains("parse error"), "{err}");

    // Prometheus gone: errors, then the consecutive-error limit fails it.
    drop(prom);
    let outcome = Analysis::new()
        .interval(Duration::from_millis(50))
        .count(5)
        .consecutive_error_limit(2)
        .run(&errors, &cx())
        .await
        .unwrap();
    match outcome {
        AnalysisOutcome::Fail(why) => assert!(why.contains("3 errors in a row"), "{why}"),
        other => panic!("{other:?}"),
    }
}
