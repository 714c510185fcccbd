//! Deploy-stage reliability: a timed-out or cancelled rollout reverts its
//! fleet, a canary is always judged, restore respects the environment lock
//! and labels history truthfully.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cd_core::*;
use cd_stages::{Deploy, Restore};
use tokio_util::sync::CancellationToken;

/// `t1` … `tN`, whose applies take `apply_ms` each and ignore cancellation
/// (the worst case: the apply finishes anyway). Its rollback fails under a
/// fired token, as a real tool would: the strategy must hand it a fresh one.
fn slow_fleet(n: usize, apply_ms: u64) -> Arc<MemoryDeployer> {
    Arc::new(
        MemoryDeployer::new((1..=n).map(|i| format!("t{i}")))
            .apply_delay(Duration::from_millis(apply_ms))
            .ignore_cancellation(),
    )
}

async fn history(store: &Arc<dyn Store>, env: &str) -> Vec<(String, ReleaseStatus)> {
    store
        .release_history(env, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.version, r.status))
        .collect()
}

fn rolling_pipeline(fleet: &Arc<MemoryDeployer>) -> Pipeline {
    Pipeline::builder("web")
        .stage(
            "deploy",
            Deploy::shared(fleet.clone()).env("prod").rolling(1, 0),
        )
        .timeout(Duration::from_secs(1))
        .retries(0)
        .build()
        .unwrap()
}

/// Case 1, timeout: rolling 1 at a time over 4 targets, 400 ms per apply,
/// node timeout 1 s. The strategy's own revert runs: every target back on
/// v1, history says v2 failed, the report names what was reverted.
#[tokio::test(start_paused = true)]
async fn a_timed_out_rolling_deploy_reverts_the_whole_fleet() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = slow_fleet(4, 400);
    let runner = Runner::new(store.clone()).environment("prod");
    let p = Pipeline::builder("web")
        .stage(
            "deploy",
            Deploy::shared(fleet.clone()).env("prod").rolling(1, 0),
        )
        .build()
        .unwrap();
    let r1 = runner.run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(r1.status, RunStatus::Succeeded);
    assert_eq!(fleet.versions(), ["v1"; 4]);

    let report = runner
        .run(&rolling_pipeline(&fleet), Release::new("v2"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(fleet.versions(), ["v1"; 4], "no mixed fleet");
    let n = report.node("deploy").unwrap();
    assert_eq!(n.attempts, 1);
    let e = n.error.as_ref().unwrap();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("timed out after 1.0s"), "{}", e.message);
    assert!(
        e.message.contains("rolled back (t1, t2, t3)"),
        "the report names what was reverted: {}",
        e.message
    );
    assert_eq!(
        history(&store, "prod").await,
        [
            ("v2".into(), ReleaseStatus::Failed),
            ("v1".into(), ReleaseStatus::Live)
        ]
    );
}

/// Case 1, cancel: the same with a cancel at 1 s and
/// `compensate_on_cancel(true)`.
#[tokio::test(start_paused = true)]
async fn a_cancelled_rolling_deploy_reverts_the_whole_fleet() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = slow_fleet(4, 400);
    let p = Pipeline::builder("web")
        .stage(
            "deploy",
            Deploy::shared(fleet.clone()).env("prod").rolling(1, 0),
        )
        .build()
        .unwrap();
    Runner::new(store.clone())
        .environment("prod")
        .run(&p, Release::new("v1"))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let runner = Runner::new(store.clone())
        .environment("prod")
        .cancel_token(cancel.clone())
        .compensate_on_cancel(true);
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.cancel();
    });
    let report = runner.run(&p, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Cancelled, "{report}");
    assert_eq!(fleet.versions(), ["v1"; 4], "no mixed fleet");
    let e = report.node("deploy").unwrap().error.clone().unwrap();
    assert_eq!(e.kind, ErrorKind::Cancelled);
    assert!(
        e.message.contains("rolled back (t1, t2, t3)"),
        "{}",
        e.message
    );
    assert_eq!(
        history(&store, "prod").await,
        [
            ("v2".into(), ReleaseStatus::Failed),
            ("v1".into(), ReleaseStatus::Live)
        ]
    );
}

/// A monitor that always fails, counting its samples.
struct AlwaysFailing(Arc<AtomicU32>);

#[async_trait]
impl Monitor for AlwaysFailing {
    fn name(&self) -> String {
        "always-failing".into()
    }
    async fn sample(&self, _cx: &MonitorContext) -> Result<Sample> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Sample::failing(Some(1.0), "error rate 100%"))
    }
}

fn fast(count: u32) -> Analysis {
    Analysis::new()
        .count(count)
        .interval(Duration::from_millis(10))
}

/// Case 4: a canary is never promoted unjudged — over one target, and with
/// a single 100% step over four.
#[tokio::test(start_paused = true)]
async fn a_canary_is_judged_after_its_last_step() {
    for (targets, steps) in [(1usize, vec![10u32, 50, 100]), (4, vec![100])] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let fleet = slow_fleet(targets, 10);
        let samples = Arc::new(AtomicU32::new(0));
        let p = Pipeline::builder("web")
            .stage(
                "deploy",
                Deploy::shared(fleet.clone())
                    .env("prod")
                    .canary(steps.clone())
                    .judge(AlwaysFailing(samples.clone()), fast(2)),
            )
            .build()
            .unwrap();
        let report = Runner::new(store.clone())
            .environment("prod")
            .run(&p, Release::new("v2-broken"))
            .await
            .unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{steps:?} over {targets}");
        assert!(
            samples.load(Ordering::SeqCst) >= 1,
            "the monitor was sampled"
        );
        assert_eq!(
            fleet.versions(),
            vec!["-"; targets],
            "nothing stays on the broken release"
        );
        let e = report.node("deploy").unwrap().error.clone().unwrap();
        assert!(e.message.contains("canary aborted"), "{}", e.message);
    }
}

/// Case 4: a canary that cannot be judged is refused when the pipeline is
/// built, naming the node.
#[test]
fn an_unjudged_or_malformed_canary_is_a_build_error() {
    let fleet = slow_fleet(4, 10);
    let err = Pipeline::builder("web")
        .stage("prod", Deploy::shared(fleet.clone()).canary([10, 50, 100]))
        .build()
        .unwrap_err();
    assert!(matches!(err, PipelineError::InvalidNode { ref node, .. } if node == "prod"));
    assert!(err.to_string().contains("never promoted unjudged"), "{err}");
    for bad in [vec![50, 10], vec![0, 100], vec![10, 150]] {
        let err = Pipeline::builder("web")
            .stage(
                "prod",
                Deploy::shared(fleet.clone())
                    .canary(bad.clone())
                    .judge(AlwaysFailing(Default::default()), fast(1)),
            )
            .build()
            .unwrap_err();
        assert!(
            matches!(err, PipelineError::InvalidNode { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = Pipeline::builder("web")
        .stage("prod", Deploy::shared(fleet).env("prod "))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("whitespace"), "{err}");
}

/// A gate that waits until told to pass.
struct Hold(Arc<std::sync::atomic::AtomicBool>);

#[async_trait]
impl Gate for Hold {
    async fn evaluate(&self, _cx: &StageContext) -> Result<Verdict> {
        Ok(if self.0.load(Ordering::SeqCst) {
            Verdict::Pass
        } else {
            Verdict::wait(Duration::from_millis(20), "held")
        })
    }
}

/// Case 6: restore takes the environment lock; restoring twice goes further
/// back each time; labels are truthful; the caller names the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_takes_the_lock_and_walks_back_through_history() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = slow_fleet(2, 1);
    let deploy = Deploy::shared(fleet.clone()).env("prod").rolling(2, 0);
    let plain = Pipeline::builder("web")
        .stage("deploy", deploy.clone())
        .build()
        .unwrap();
    let runner = Runner::new(store.clone()).environment("prod");
    for v in ["v0", "v1", "v2"] {
        let r = runner.run(&plain, Release::new(v)).await.unwrap();
        assert_eq!(r.status, RunStatus::Succeeded);
    }

    // A run holds production, waiting at its approval gate.
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gated = Pipeline::builder("web")
        .gate("approval", Hold(open.clone()))
        .stage("deploy", deploy.clone())
        .needs(["approval"])
        .build()
        .unwrap();
    let r = runner.clone();
    let held = tokio::spawn(async move { r.run(&gated, Release::new("v3")).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.locks().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cx = DeployContext::detached("prod");
    let busy = LockSettings {
        ttl: Duration::from_secs(10),
        wait_timeout: Duration::from_millis(200),
        poll_interval: Duration::from_millis(20),
    };
    let err = deploy
        .restore(&store, &Restore::new("prod").actor("alice").lock(busy), &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert_eq!(
        fleet.versions(),
        ["v2", "v2"],
        "the restore changed nothing"
    );
    open.store(true, Ordering::SeqCst);
    assert_eq!(held.await.unwrap().unwrap().status, RunStatus::Succeeded);
    assert_eq!(fleet.versions(), ["v3", "v3"]);

    // History v0, v1, v2, v3: restore goes to v2, then v1, then v0, then
    // says there is nothing older.
    let restore = Restore::new("prod").actor("alice");
    for expected in ["v2", "v1", "v0"] {
        let report = deploy.restore(&store, &restore, &cx).await.unwrap();
        assert!(!report.noop, "restore to {expected} changed something");
        assert_eq!(fleet.versions(), [expected; 2]);
    }
    let err = deploy.restore(&store, &restore, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("nothing older than v0"), "{err}");

    let h = store.release_history("prod", 100).await.unwrap();
    let rows: Vec<(String, ReleaseStatus, bool)> = h
        .iter()
        .map(|r| (r.version.clone(), r.status, r.restored_from.is_some()))
        .collect();
    assert_eq!(
        rows,
        [
            ("v0".into(), ReleaseStatus::Live, true),
            ("v1".into(), ReleaseStatus::Superseded, true),
            ("v2".into(), ReleaseStatus::Superseded, true),
            ("v3".into(), ReleaseStatus::Superseded, false),
            ("v2".into(), ReleaseStatus::Superseded, false),
            ("v1".into(), ReleaseStatus::Superseded, false),
            ("v0".into(), ReleaseStatus::Superseded, false),
        ],
        "a replaced release is superseded, not rolled back"
    );
    assert!(h
        .iter()
        .filter(|r| r.restored_from.is_some())
        .all(|r| r.actor == "alice"));
    assert!(
        store.locks().await.unwrap().is_empty(),
        "restore released the lock"
    );

    let err = deploy
        .restore(&store, &Restore::new("prod ").actor("alice"), &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

/// Issue 9, case 4: compensation that cannot reach a target records what
/// each target really runs, and says which target is on which release.
#[tokio::test]
async fn a_partial_rollback_is_recorded_as_partial() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = Arc::new(MemoryDeployer::new(["t1", "t2", "t3"]));
    let runner = Runner::new(store.clone())
        .environment("prod")
        .retry(RetryPolicy::none());
    let plain = Pipeline::builder("web")
        .stage("deploy", Deploy::shared(fleet.clone()).env("prod"))
        .build()
        .unwrap();
    runner.run(&plain, Release::new("v1")).await.unwrap();
    let f = fleet.clone();
    let broken = Pipeline::builder("web")
        .stage("deploy", Deploy::shared(fleet.clone()).env("prod"))
        .stage(
            "check",
            stage_fn(move |_| {
                let f = f.clone();
                async move {
                    // t3's sshd stops; the check fails.
                    f.unreachable("t3");
                    Err(Error::failed("check failed"))
                }
            }),
        )
        .needs(["deploy"])
        .build()
        .unwrap();
    let report = runner.run(&broken, Release::new("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let node = report.node("deploy").unwrap();
    assert_eq!(node.status, NodeStatus::RollbackFailed);
    let message = &node.error.as_ref().unwrap().message;
    assert!(message.contains("still on v2: t3"), "{message}");
    assert!(message.contains("t1 on v1, t2 on v1"), "{message}");
    let h = store.release_history("prod", 10).await.unwrap();
    assert_eq!(h[0].version, "v2");
    assert_eq!(h[0].status, ReleaseStatus::PartiallyRolledBack);
    assert_eq!(
        h[0].revisions
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        ["t3"]
    );
    assert_eq!(h[1].version, "v1");
    assert_eq!(h[1].status, ReleaseStatus::Live);
    assert_eq!(
        h[1].revisions
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        ["t1", "t2"]
    );
}

/// Issue 10: the definition hash covers what a node does, so resume refuses
/// a pipeline whose canary steps or approvers changed.
#[test]
fn the_definition_hash_covers_behaviour_changing_settings() {
    let fleet = Arc::new(MemoryDeployer::new(["t1", "t2"]));
    let hash = |steps: Vec<u32>, approvers: Vec<&str>| {
        Pipeline::builder("web")
            .stage(
                "deploy",
                Deploy::shared(fleet.clone())
                    .canary(steps)
                    .judge(AlwaysFailing(Default::default()), fast(2)),
            )
            .gate("approval", cd_stages::ApprovalGate::any_of(approvers))
            .build()
            .unwrap()
            .definition_hash()
            .to_string()
    };
    let base = hash(vec![10, 50, 100], vec!["alice"]);
    assert_eq!(
        base,
        hash(vec![10, 50, 100], vec!["alice"]),
        "deterministic"
    );
    assert_ne!(base, hash(vec![25, 100], vec!["alice"]), "canary steps");
    assert_ne!(base, hash(vec![10, 50, 100], vec!["mallory"]), "approvers");
}
