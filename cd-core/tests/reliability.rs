//! Runner reliability: timeouts and cancellation that let nodes clean up,
//! a dropped run future that frees its lease, waits of any length, gate
//! rechecks that are not attempts, environment names checked at the door.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cd_core::*;
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<String>>>;

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Waits (polling, with a deadline) until `cond` holds.
async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Case 3: a caller's own timeout drops the run future. The run is
/// cancelled, recorded as such, and its lease released (not renewed on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_future_cancels_the_run_and_frees_the_lease() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let log = Log::default();
    let l = log.clone();
    let p = Pipeline::builder("dropped")
        .stage(
            "long",
            stage_fn(move |cx| {
                let l = l.clone();
                async move {
                    l.lock().unwrap().push("start".into());
                    let r = cx.sleep(Duration::from_secs(30)).await;
                    l.lock().unwrap().push("stopped".into());
                    r.map(|_| StageOutput::empty())
                }
            }),
        )
        .build()
        .unwrap();
    let runner = Runner::new(store.clone())
        .environment("production")
        .lock(LockSettings {
            ttl: Duration::from_secs(2),
            wait_timeout: Duration::from_millis(100),
            poll_interval: Duration::from_millis(20),
        });
    let dropped = tokio::time::timeout(
        Duration::from_millis(800),
        runner.run(&p, Release::new("v1")),
    )
    .await;
    assert!(dropped.is_err(), "the run must still be going when dropped");
    wait_for("lease released", Duration::from_secs(10), || async {
        store.locks().await.unwrap().is_empty()
    })
    .await;
    wait_for(
        "run recorded as cancelled",
        Duration::from_secs(10),
        || async { store.list_runs(1).await.unwrap()[0].status == RunStatus::Cancelled },
    )
    .await;
    assert!(entries(&log).contains(&"stopped".to_string()));
    // The next run gets the environment at once (wait_timeout is 100 ms,
    // far below the 2 s ttl).
    let quick = Pipeline::builder("next")
        .stage("noop", stage_fn(|_| async { Ok(StageOutput::empty()) }))
        .build()
        .unwrap();
    let report = runner.run(&quick, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    // Released at the end, as any run's: nothing of the dropped run holds it.
    assert!(store.locks().await.unwrap().is_empty());
}

/// A stage that ignores its token is abandoned after its grace period, and
/// the report says so.
#[tokio::test(start_paused = true)]
async fn a_stage_that_ignores_cancellation_is_abandoned_after_its_grace() {
    let p = Pipeline::builder("stubborn")
        .stage(
            "stubborn",
            stage_fn(|_| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(StageOutput::empty())
            }),
        )
        .timeout(Duration::from_secs(1))
        .grace(Duration::from_secs(2))
        .build()
        .unwrap();
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    let n = report.node("stubborn").unwrap();
    assert_eq!(n.status, NodeStatus::Failed);
    let e = n.error.as_ref().unwrap();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("timed out after 1.0s"), "{}", e.message);
    assert!(e.message.contains("abandoned"), "{}", e.message);
    // Timeout 1 s + grace 2 s, not the stage's hour.
    assert!(
        report.duration < Duration::from_secs(60),
        "{:?}",
        report.duration
    );
}

/// Case 2 (core part): a timed-out attempt is not retried by default; with
/// `retry_on_timeout` it is, but only after the previous attempt finished
/// cleaning up.
#[tokio::test(start_paused = true)]
async fn timeouts_are_not_retried_by_default_and_retries_wait_for_cleanup() {
    let log = Log::default();
    let calls = Arc::new(AtomicU32::new(0));
    let stage = |log: Log, calls: Arc<AtomicU32>| {
        stage_fn(move |cx| {
            let (log, calls) = (log.clone(), calls.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                log.lock().unwrap().push(format!("start {n}"));
                if cx.sleep(Duration::from_secs(10)).await.is_err() {
                    // Cleaning up takes a while (a tool being interrupted).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    log.lock().unwrap().push(format!("cleaned {n}"));
                    return Err(Error::cancelled());
                }
                Ok(StageOutput::empty())
            }
        })
    };
    let p = Pipeline::builder("t")
        .stage("slow", stage(log.clone(), calls.clone()))
        .timeout(Duration::from_secs(1))
        .retries(2)
        .build()
        .unwrap();
    let runner = Runner::new(Arc::new(MemoryStore::new()));
    let report = runner.run(&p, Release::new("v1")).await.unwrap();
    let n = report.node("slow").unwrap();
    assert_eq!(n.attempts, 1, "a timeout is not retried by default");
    assert_eq!(n.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    assert!(n.error.as_ref().unwrap().message.contains("stopped"));
    assert_eq!(entries(&log), ["start 1", "cleaned 1"]);

    log.lock().unwrap().clear();
    calls.store(0, Ordering::SeqCst);
    let p = Pipeline::builder("t")
        .stage("slow", stage(log.clone(), calls.clone()))
        .timeout(Duration::from_secs(1))
        .retries(1)
        .retry_on_timeout(true)
        .build()
        .unwrap();
    let report = runner.run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(report.node("slow").unwrap().attempts, 2);
    assert_eq!(
        entries(&log),
        ["start 1", "cleaned 1", "start 2", "cleaned 2"],
        "the retry starts only after the first attempt cleaned up"
    );
}

/// A stage that finishes its work only during the grace period fails with
/// the timeout, keeps its output, and is compensated.
#[tokio::test(start_paused = true)]
async fn late_success_fails_the_node_and_is_compensated() {
    struct Late(Log);
    #[async_trait::async_trait]
    impl Stage for Late {
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                rollback: true,
                idempotent: true,
            }
        }
        async fn run(&self, _cx: &StageContext) -> Result<StageOutput> {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            self.0.lock().unwrap().push("done".into());
            Ok(StageOutput::json(serde_json::json!({"did": "it"})))
        }
        async fn rollback(&self, _cx: &StageContext, out: &StageOutput) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("undo {}", out.get_str("did").unwrap_or("?")));
            Ok(())
        }
    }
    let log = Log::default();
    let p = Pipeline::builder("late")
        .stage("late", Late(log.clone()))
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let n = report.node("late").unwrap();
    assert_eq!(n.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    assert!(n.output.is_some());
    assert_eq!(entries(&log), ["done", "undo it"]);
}

/// Case 5: waits of any length never panic the runner: the gate waits (its
/// recheck far in the future), the run can still be cancelled, and the lock
/// is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_waits_and_backoffs_do_not_panic() {
    let million_years = Duration::from_secs(1_000_000 * 365 * 24 * 3600);
    for wait in [Duration::MAX, million_years] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cancel = CancellationToken::new();
        let p = Pipeline::builder("wait")
            .gate(
                "forever",
                gate_fn(move |_| async move { Ok(Verdict::wait(wait, "a very long wait")) }),
            )
            .build()
            .unwrap();
        let runner = Runner::new(store.clone())
            .cancel_token(cancel.clone())
            .lock(LockSettings {
                ttl: Duration::MAX,
                wait_timeout: Duration::MAX,
                poll_interval: Duration::from_millis(10),
            });
        let run = tokio::spawn(async move { runner.run(&p, Release::new("v1")).await });
        wait_for("the gate waits", Duration::from_secs(10), || async {
            let runs = store.list_runs(1).await.unwrap();
            let Some(run) = runs.first() else {
                return false;
            };
            store
                .nodes(&run.id)
                .await
                .unwrap()
                .iter()
                .any(|n| n.status == NodeStatus::Waiting)
        })
        .await;
        let run_id = store.list_runs(1).await.unwrap()[0].id.clone();
        let node = store.nodes(&run_id).await.unwrap().remove(0);
        let recheck = node.recheck_at.unwrap();
        assert!(
            recheck > chrono::Utc::now() + chrono::Duration::days(50 * 365),
            "{recheck}"
        );
        let lease = store.locks().await.unwrap().remove(0);
        assert!(lease.expires_at > chrono::Utc::now() + chrono::Duration::days(50 * 365));
        cancel.cancel();
        let report = run.await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Cancelled);
        assert!(store.locks().await.unwrap().is_empty());
    }

    // A retry policy whose backoff is as long as a Duration gets: the retry
    // waits (cancelled here), nothing panics, the lock is released.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cancel = CancellationToken::new();
    let p = Pipeline::builder("backoff")
        .stage(
            "flaky",
            stage_fn(|_| async { Err(Error::unavailable("connection refused")) }),
        )
        .build()
        .unwrap();
    let runner = Runner::new(store.clone())
        .cancel_token(cancel.clone())
        .retry(RetryPolicy {
            retries: 3,
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            multiplier: f64::INFINITY,
        });
    let run = tokio::spawn(async move { runner.run(&p, Release::new("v1")).await });
    wait_for(
        "the retry is scheduled",
        Duration::from_secs(10),
        || async {
            let runs = store.list_runs(1).await.unwrap();
            let Some(run) = runs.first() else {
                return false;
            };
            store
                .events(&run.id, 0, 100)
                .await
                .unwrap()
                .iter()
                .any(|e| matches!(e.kind, EventKind::NodeRetrying { .. }))
        },
    )
    .await;
    cancel.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Cancelled);
    assert!(store.locks().await.unwrap().is_empty());

    for policy in [
        RetryPolicy {
            retries: 1,
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            multiplier: f64::NAN,
        },
        RetryPolicy {
            retries: 1,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::MAX,
            multiplier: 1e300,
        },
    ] {
        for attempt in [0, 1, 2, 64, u32::MAX] {
            let _ = policy.delay(attempt);
        }
    }
    assert_eq!(
        RetryPolicy::exponential(3, Duration::from_millis(100)).delay(3),
        Duration::from_millis(400)
    );
    let a = Analysis::new().interval(Duration::MAX).count(u32::MAX);
    assert_eq!(a.total_duration(), Duration::MAX);
}

/// Case 8: gate rechecks are not attempts; the report shows the time waited.
#[tokio::test(start_paused = true)]
async fn gate_rechecks_are_not_attempts_and_the_report_shows_the_wait() {
    let checks = Arc::new(AtomicU32::new(0));
    let c = checks.clone();
    let p = Pipeline::builder("approval")
        .gate(
            "approval",
            gate_fn(move |_| {
                let c = c.clone();
                async move {
                    Ok(if c.fetch_add(1, Ordering::SeqCst) < 10 {
                        Verdict::wait(Duration::from_secs(6), "waiting for approval by alice")
                    } else {
                        Verdict::Pass
                    })
                }
            }),
        )
        .build()
        .unwrap();
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    let n = report.node("approval").unwrap();
    assert_eq!(n.status, NodeStatus::Succeeded);
    assert_eq!(n.attempts, 1, "rechecks are not attempts");
    assert_eq!(n.checks, 11);
    assert!(n.waited >= Duration::from_secs(60), "{:?}", n.waited);
    let table = report.to_string();
    let line = table.lines().find(|l| l.contains("approval  ")).unwrap();
    assert!(line.contains("waited 1m00s (11 checks)"), "{table}");
}

/// Case 9: environment names are checked where they enter the API.
#[tokio::test]
async fn environment_names_are_validated_before_anything_happens() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let p = Pipeline::builder("p")
        .stage("noop", stage_fn(|_| async { Ok(StageOutput::empty()) }))
        .build()
        .unwrap();
    for bad in [
        "production ",
        " production",
        "",
        "prod\nuction",
        "prod\u{7}",
    ] {
        let err = Runner::new(store.clone())
            .environment(bad)
            .run(&p, Release::new("v1"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}: {err}");
        assert!(err.to_string().contains("environment name"), "{err}");
    }
    let long = "x".repeat(129);
    assert!(types::validate_environment(&long).is_err());
    assert!(
        store.list_runs(10).await.unwrap().is_empty(),
        "nothing recorded"
    );
    assert!(store.locks().await.unwrap().is_empty(), "nothing locked");
    let ok = Runner::new(store.clone())
        .environment("production")
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(ok.status, RunStatus::Succeeded);
}
