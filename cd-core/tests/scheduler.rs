//! Scheduler semantics: order, concurrency, timeouts, retries, cancellation,
//! finally, compensation, gates, outputs, redaction.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::*;
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<String>>>;

fn runner() -> Runner {
    Runner::new(Arc::new(MemoryStore::new())).retry(RetryPolicy::none())
}

/// A stage that records its start and end, sleeps, optionally fails, and can
/// roll back (recording that too).
#[derive(Clone)]
struct Probe {
    name: &'static str,
    log: Log,
    sleep: Duration,
    fail: Option<ErrorKind>,
    rollback: bool,
}

impl Probe {
    fn new(name: &'static str, log: &Log) -> Self {
        Probe {
            name,
            log: log.clone(),
            sleep: Duration::ZERO,
            fail: None,
            rollback: false,
        }
    }
    fn sleep(mut self, ms: u64) -> Self {
        self.sleep = Duration::from_millis(ms);
        self
    }
    fn fail(mut self, kind: ErrorKind) -> Self {
        self.fail = Some(kind);
        self
    }
    fn rollback(mut self) -> Self {
        self.rollback = true;
        self
    }
}

#[async_trait]
impl Stage for Probe {
    fn kind(&self) -> String {
        "probe".into()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            rollback: self.rollback,
            idempotent: true,
        }
    }
    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        self.log
            .lock()
            .unwrap()
            .push(format!("start {}", self.name));
        if !self.sleep.is_zero() {
            cx.sleep(self.sleep).await?;
        }
        if let Some(kind) = self.fail {
            self.log.lock().unwrap().push(format!("fail {}", self.name));
            return Err(Error::new(kind, format!("{} broke", self.name)));
        }
        self.log.lock().unwrap().push(format!("end {}", self.name));
        Ok(StageOutput::json(serde_json::json!({ "by": self.name })))
    }
    async fn rollback(&self, _cx: &StageContext, _out: &StageOutput) -> Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("rollback {}", self.name));
        Ok(())
    }
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

fn pos(log: &[String], entry: &str) -> usize {
    log.iter()
        .position(|e| e == entry)
        .unwrap_or_else(|| panic!("`{entry}` not in {log:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_run_in_order() {
    let log = Log::default();
    let p = Pipeline::builder("order")
        .stage("c", Probe::new("c", &log))
        .needs(["a", "b"])
        .stage("a", Probe::new("a", &log).sleep(20))
        .stage("b", Probe::new("b", &log))
        .needs(["a"])
        .build()
        .unwrap();
    let report = runner().run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    let l = entries(&log);
    assert!(pos(&l, "end a") < pos(&l, "start b"));
    assert!(pos(&l, "end b") < pos(&l, "start c"));
    // Report lists nodes in topological order.
    let names: Vec<_> = report.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_stages_run_concurrently() {
    let log = Log::default();
    let p = Pipeline::builder("par")
        .stage("x", Probe::new("x", &log).sleep(300))
        .stage("y", Probe::new("y", &log).sleep(300))
        .build()
        .unwrap();
    let report = runner()
        .concurrency(4)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    // Logical, not timed: both started before either ended.
    let l = entries(&log);
    let last_start = pos(&l, "start x").max(pos(&l, "start y"));
    let first_end = pos(&l, "end x").min(pos(&l, "end y"));
    assert!(last_start < first_end, "{l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bound_is_respected() {
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let mut b = Pipeline::builder("bound");
    for i in 0..8 {
        let (running, peak) = (running.clone(), peak.clone());
        b = b.stage(
            format!("n{i}"),
            stage_fn(move |_| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(StageOutput::empty())
                }
            }),
        );
    }
    let p = b.build().unwrap();
    runner()
        .concurrency(2)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_the_node() {
    let log = Log::default();
    let p = Pipeline::builder("slow")
        .stage("slow", Probe::new("slow", &log).sleep(5_000))
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let report = runner().run(&p, Release::new("v1")).await.unwrap();
    // Tokio's clock (paused): the stage stopped at its timeout, not its 5 s.
    assert!(
        report.duration < Duration::from_secs(1),
        "{:?}",
        report.duration
    );
    assert!(!entries(&log).contains(&"end slow".to_string()));
    assert_eq!(report.status, RunStatus::Failed);
    let n = report.node("slow").unwrap();
    assert_eq!(n.status, NodeStatus::Failed);
    assert_eq!(n.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    assert!(n.error.as_ref().unwrap().message.contains("timed out"));
}

fn flaky(kind: ErrorKind, fail_times: u32, calls: Arc<AtomicU32>) -> impl Stage {
    stage_fn(move |_| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= fail_times {
                Err(Error::new(kind, format!("failure {n}")))
            } else {
                Ok(StageOutput::empty())
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_until_success() {
    let calls = Arc::new(AtomicU32::new(0));
    let p = Pipeline::builder("retry")
        .stage("flaky", flaky(ErrorKind::Unavailable, 2, calls.clone()))
        .build()
        .unwrap();
    let sink = CollectingSink::new();
    let report = runner()
        .retry(RetryPolicy::exponential(3, Duration::from_millis(10)))
        .sink(sink.clone())
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(report.node("flaky").unwrap().attempts, 3);
    let retries: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::NodeRetrying { delay_ms, .. } => Some(delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(retries, vec![10, 20], "exponential backoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_after_max_attempts() {
    let calls = Arc::new(AtomicU32::new(0));
    let p = Pipeline::builder("retry")
        .stage("flaky", flaky(ErrorKind::Unavailable, 100, calls.clone()))
        .retries(2)
        .build()
        .unwrap();
    let report = runner()
        .retry(RetryPolicy::exponential(9, Duration::from_millis(5)))
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "1 attempt + 2 retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_errors_are_not_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let p = Pipeline::builder("retry")
        .stage("broken", flaky(ErrorKind::Invalid, 100, calls.clone()))
        .build()
        .unwrap();
    let report = runner()
        .retry(RetryPolicy::exponential(5, Duration::from_millis(5)))
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let err = report.node("broken").unwrap().error.clone().unwrap();
    assert!(err.message.contains("node=broken"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_running_stages_and_runs_finally() {
    let log = Log::default();
    let token = CancellationToken::new();
    let p = Pipeline::builder("cancel")
        .stage("long", Probe::new("long", &log).sleep(10_000))
        .stage("after", Probe::new("after", &log))
        .needs(["long"])
        .finally("notify", Probe::new("notify", &log))
        .build()
        .unwrap();
    let t2 = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        t2.cancel();
    });
    let report = runner()
        .cancel_token(token)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    // Tokio's clock (paused): stopped at the cancel, not after the 10 s.
    assert!(
        report.duration < Duration::from_secs(1),
        "took {:?}",
        report.duration
    );
    assert_eq!(report.status, RunStatus::Cancelled);
    assert_eq!(report.node("long").unwrap().status, NodeStatus::Cancelled);
    assert_eq!(report.node("after").unwrap().status, NodeStatus::Skipped);
    assert_eq!(report.node("notify").unwrap().status, NodeStatus::Succeeded);
    let l = entries(&log);
    assert!(!l.contains(&"end long".to_string()));
    assert!(l.contains(&"end notify".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finally_sees_the_outcome_and_runs_after_failure() {
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let log = Log::default();
    let p = Pipeline::builder("fin")
        .stage("bad", Probe::new("bad", &log).fail(ErrorKind::Failed))
        .finally(
            "notify",
            stage_fn(move |cx| {
                let s2 = s2.clone();
                async move {
                    *s2.lock().unwrap() = cx.run_outcome();
                    Ok(StageOutput::empty())
                }
            }),
        )
        .build()
        .unwrap();
    let report = runner().run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(*seen.lock().unwrap(), Some(RunStatus::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_runs_in_reverse_topological_order_for_completed_rollbackable_nodes() {
    let log = Log::default();
    // a -> b -> d(fails); a -> c(no rollback); e independent, slow, cancelled by fail-fast.
    let p = Pipeline::builder("comp")
        .stage("a", Probe::new("a", &log).rollback())
        .stage("b", Probe::new("b", &log).rollback())
        .needs(["a"])
        .stage("c", Probe::new("c", &log))
        .needs(["a"])
        .stage(
            "d",
            Probe::new("d", &log).rollback().fail(ErrorKind::Failed),
        )
        .needs(["b", "c"])
        .stage("e", Probe::new("e", &log).rollback().sleep(5_000))
        .stage("f", Probe::new("f", &log).rollback())
        .needs(["d"])
        .build()
        .unwrap();
    let report = runner()
        .concurrency(4)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let rollbacks: Vec<String> = entries(&log)
        .into_iter()
        .filter(|e| e.starts_with("rollback"))
        .collect();
    assert_eq!(rollbacks, ["rollback b", "rollback a"]);
    assert_eq!(report.node("a").unwrap().status, NodeStatus::RolledBack);
    assert_eq!(report.node("b").unwrap().status, NodeStatus::RolledBack);
    assert_eq!(report.node("c").unwrap().status, NodeStatus::Succeeded);
    assert_eq!(report.node("d").unwrap().status, NodeStatus::Failed);
    assert_eq!(report.node("e").unwrap().status, NodeStatus::Cancelled);
    assert_eq!(report.node("f").unwrap().status, NodeStatus::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fail_fast_independent_branches_finish() {
    let log = Log::default();
    let p = Pipeline::builder("nff")
        .stage("bad", Probe::new("bad", &log).fail(ErrorKind::Failed))
        .stage("slow", Probe::new("slow", &log).sleep(100))
        .build()
        .unwrap();
    let report = runner()
        .fail_fast(false)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(report.node("slow").unwrap().status, NodeStatus::Succeeded);
}

struct CountdownGate {
    calls: AtomicU32,
    waits: u32,
}

#[async_trait]
impl Gate for CountdownGate {
    async fn evaluate(&self, _cx: &StageContext) -> Result<Verdict> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.waits {
            Ok(Verdict::wait(Duration::from_millis(50), "not yet"))
        } else {
            Ok(Verdict::Pass)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_gate_is_rechecked_then_passes_without_holding_a_slot() {
    let log = Log::default();
    let p = Pipeline::builder("gate")
        .gate(
            "approval",
            CountdownGate {
                calls: AtomicU32::new(0),
                waits: 3,
            },
        )
        .stage("deploy", Probe::new("deploy", &log))
        .needs(["approval"])
        .stage("other", Probe::new("other", &log).sleep(50))
        .build()
        .unwrap();
    let sink = CollectingSink::new();
    // Concurrency 1: `other` can only run while the gate waits if waiting
    // holds no slot.
    let report = runner()
        .concurrency(1)
        .sink(sink.clone())
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    let waits = sink
        .events()
        .iter()
        .filter(|e| matches!(e.kind, EventKind::GateWaiting { .. }))
        .count();
    assert_eq!(waits, 3);
    let l = entries(&log);
    assert!(pos(&l, "end other") < pos(&l, "start deploy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_fails_the_run() {
    let p = Pipeline::builder("gate")
        .gate(
            "policy",
            gate_fn(|_| async { Ok(Verdict::fail("no deploys on Fridays")) }),
        )
        .build()
        .unwrap();
    let report = runner().run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert!(report
        .node("policy")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("Fridays"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_reach_dependents() {
    let p = Pipeline::builder("outputs")
        .stage(
            "build",
            stage_fn(|_| async { Ok(StageOutput::json(serde_json::json!({"image": "app:v7"}))) }),
        )
        .stage(
            "deploy",
            stage_fn(|cx| async move {
                let image = cx
                    .require_output("build")?
                    .get_str("image")
                    .unwrap()
                    .to_string();
                Ok(StageOutput::json(serde_json::json!({ "deployed": image })))
            }),
        )
        .needs(["build"])
        .build()
        .unwrap();
    let report = runner().run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(report.output("deploy").unwrap()["deployed"], "app:v7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_redacted_from_events_and_store() {
    let token = Secret::new("tok-93f8a2".to_string());
    let store = Arc::new(MemoryStore::new());
    let p = Pipeline::builder("secret")
        .stage(
            "leaky",
            stage_fn(|cx| async move {
                cx.log("calling api with tok-93f8a2");
                Ok(StageOutput::json(
                    serde_json::json!({"header": "Bearer tok-93f8a2"}),
                ))
            }),
        )
        .stage(
            "failing",
            stage_fn(|_| async { Err(Error::failed("401 for token tok-93f8a2")) }),
        )
        .needs(["leaky"])
        .build()
        .unwrap();
    let sink = CollectingSink::new();
    let report = Runner::new(store.clone())
        .retry(RetryPolicy::none())
        .secret(&token)
        .sink(sink.clone())
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    let events = serde_json::to_string(&sink.events()).unwrap();
    assert!(!events.contains("tok-93f8a2"), "{events}");
    assert!(events.contains("calling api with ***"));
    let stored_events =
        serde_json::to_string(&store.events(&report.run_id, 0, 1000).await.unwrap()).unwrap();
    assert!(!stored_events.contains("tok-93f8a2"));
    let nodes = serde_json::to_string(&store.nodes(&report.run_id).await.unwrap()).unwrap();
    assert!(!nodes.contains("tok-93f8a2"), "{nodes}");
    assert!(nodes.contains("Bearer ***"));
    assert_eq!(format!("{token:?}"), "Secret(***)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_numbered_without_gaps_and_persisted() {
    let log = Log::default();
    let store = Arc::new(MemoryStore::new());
    let p = Pipeline::builder("ev")
        .stage("a", Probe::new("a", &log))
        .stage("b", Probe::new("b", &log))
        .needs(["a"])
        .build()
        .unwrap();
    let report = Runner::new(store.clone())
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    let events = store.events(&report.run_id, 0, 1000).await.unwrap();
    assert!(events.len() >= 6);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    assert!(matches!(
        events[0].kind,
        EventKind::Lock { .. } | EventKind::RunStarted { .. }
    ));
    let run = store.get_run(&report.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_lock_serialises_runs_and_names_the_holder() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let log = Log::default();
    let p = Pipeline::builder("lock")
        .stage("slow", Probe::new("slow", &log).sleep(300))
        .build()
        .unwrap();
    let r1 = Runner::new(store.clone())
        .environment("prod")
        .actor("alice");
    let r2 = Runner::new(store.clone())
        .environment("prod")
        .actor("bob")
        .lock(LockSettings {
            wait_timeout: Duration::from_millis(100),
            poll_interval: Duration::from_millis(20),
            ..LockSettings::default()
        });
    let (a, b) = tokio::join!(r1.run(&p, Release::new("v1")), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        r2.run(&p, Release::new("v2")).await
    });
    assert_eq!(a.unwrap().status, RunStatus::Succeeded);
    let err = b.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(err.to_string().contains("alice@"), "{err}");
    // Released at the end: a third run gets it at once.
    assert!(store.locks().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_skips_completed_nodes_and_refuses_a_changed_pipeline() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let log = Log::default();
    let build = |fail_b: bool| {
        let b = if fail_b {
            Probe::new("b", &log).sleep(10_000)
        } else {
            Probe::new("b", &log)
        };
        Pipeline::builder("resume")
            .stage("a", Probe::new("a", &log))
            .stage("b", b)
            .needs(["a"])
            .build()
            .unwrap()
    };
    // First process: dies while b runs. Its runtime is torn down, so
    // nothing of the run executes after that point (as after a SIGKILL;
    // dropping the run future would cancel the run instead).
    let p = build(true);
    {
        let (store, log) = (store.clone(), log.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let runner = Runner::new(store).without_lock();
            rt.spawn(async move { runner.run(&p, Release::new("v1")).await });
            let deadline = Instant::now() + Duration::from_secs(30);
            while !entries(&log).contains(&"start b".to_string()) {
                assert!(Instant::now() < deadline, "b never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            rt.shutdown_background();
        })
        .join()
        .unwrap();
    }
    let runner = Runner::new(store.clone()).without_lock();
    let run_id = store.list_runs(1).await.unwrap()[0].id.clone();
    assert_eq!(entries(&log).iter().filter(|e| *e == "end a").count(), 1);

    // A changed pipeline is refused.
    let changed = Pipeline::builder("resume")
        .stage("a", Probe::new("a", &log))
        .build()
        .unwrap();
    let err = runner.resume(&run_id, &changed).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);

    // Resume with the same definition: a is not run again, b is.
    let p2 = build(true);
    let log2_before = entries(&log).len();
    let runner2 = Runner::new(store.clone())
        .without_lock()
        .retry(RetryPolicy::none())
        .timeout(Duration::from_millis(200));
    let report = runner2.resume(&run_id, &p2).await.unwrap();
    let after: Vec<String> = entries(&log)[log2_before..].to_vec();
    assert!(!after.contains(&"start a".to_string()), "{after:?}");
    assert!(after.contains(&"start b".to_string()));
    assert_eq!(report.node("a").unwrap().status, NodeStatus::Succeeded);
    assert_eq!(report.node("b").unwrap().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_attempts_keep_the_same_semantics() {
    let log = Log::default();
    let p = Pipeline::builder("inline")
        .stage("a", Probe::new("a", &log).rollback())
        .stage("b", Probe::new("b", &log).sleep(5_000))
        .needs(["a"])
        .timeout(Duration::from_millis(100))
        .stage(
            "panics",
            stage_fn(|_| async {
                if true {
                    panic!("boom");
                }
                Ok(StageOutput::empty())
            }),
        )
        .needs(["a"])
        .build()
        .unwrap();
    let report = runner()
        .spawn_stages(false)
        .fail_fast(false)
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(
        report.node("b").unwrap().error.as_ref().unwrap().kind,
        ErrorKind::Timeout
    );
    assert!(report
        .node("panics")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("panicked"));
    assert_eq!(report.node("a").unwrap().status, NodeStatus::RolledBack);
}
