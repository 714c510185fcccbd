//! Strategies against an in-memory deployer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cd_core::*;

/// `web1` … `webN`, nothing live.
fn fleet(n: usize) -> MemoryDeployer {
    MemoryDeployer::new((1..=n).map(|i| format!("web{i}")))
}

/// How many targets run a release.
fn live_count(d: &MemoryDeployer) -> usize {
    d.versions().iter().filter(|v| *v != "-").count()
}

fn cx() -> DeployContext {
    DeployContext::detached("test")
}

async fn deploy_all(d: &MemoryDeployer, version: &str) {
    Rolling::new()
        .batch_size(10)
        .deploy(d, &Release::new(version), &d.targets(), &cx())
        .await
        .unwrap();
}

#[tokio::test]
async fn rolling_deploys_every_target_in_batches() {
    let d = fleet(5);
    let r = Rolling::new()
        .batch_size(2)
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.deployed.len(), 5);
    assert!(d.versions().iter().all(|v| v == "v1"));
}

#[tokio::test]
async fn rolling_with_a_failing_target_rolls_back_exactly_the_switched_targets() {
    let d = fleet(6);
    deploy_all(&d, "v1").await;
    d.clear_logs();
    d.fail_on("web4");
    let err = Rolling::new()
        .batch_size(2)
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("web4"), "{err}");
    // Batches: [web1, web2] ok, [web3, web4]: web3 ok, web4 failed. Stop.
    let mut rolled: Vec<String> = d.rolled_back();
    rolled.sort();
    assert_eq!(rolled, ["web1", "web2", "web3"]);
    assert!(d.versions().iter().all(|v| v == "v1"), "{:?}", d.versions());
    assert!(!d.applied().contains(&"web5".to_string()));
}

#[tokio::test]
async fn rolling_tolerates_max_failures_and_reports_them() {
    let d = fleet(4);
    d.fail_on("web2");
    let r = Rolling::new()
        .max_failures(1)
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, "web2");
    assert_eq!(live_count(&d), 3);
}

#[tokio::test]
async fn redeploying_the_live_version_is_a_noop() {
    let d = fleet(3);
    deploy_all(&d, "v1").await;
    d.clear_logs();
    let r = Rolling::new()
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert!(r.noop);
    assert!(d.applied().is_empty());
}

struct Scripted(Mutex<Vec<SampleStatus>>);

#[async_trait]
impl Monitor for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    async fn sample(&self, _cx: &MonitorContext) -> Result<Sample> {
        let s = self.0.lock().unwrap().remove(0);
        Ok(Sample {
            status: s,
            value: None,
            detail: format!("{s:?}"),
        })
    }
}

fn fast(count: u32) -> Analysis {
    Analysis::new()
        .count(count)
        .interval(Duration::from_millis(1))
}

#[tokio::test]
async fn canary_aborts_on_failing_analysis_and_rolls_back() {
    let d = fleet(10);
    deploy_all(&d, "v1").await;
    d.clear_logs();
    let monitor = Scripted(Mutex::new(vec![SampleStatus::Ok, SampleStatus::Failing]));
    let err = Canary::new([10, 50, 100])
        .analysis(monitor, fast(2))
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("canary aborted at step 1"),
        "{err}"
    );
    assert_eq!(d.applied(), ["web1"], "only the canary got v2");
    assert_eq!(d.rolled_back(), ["web1"]);
    assert!(d.versions().iter().all(|v| v == "v1"));
}

#[tokio::test]
async fn canary_treats_no_data_as_inconclusive_and_aborts() {
    let d = fleet(4);
    let monitor = Scripted(Mutex::new(vec![SampleStatus::NoData]));
    let err = Canary::new([25])
        .analysis(monitor, fast(1))
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inconclusive"), "{err}");
    assert_eq!(live_count(&d), 0, "first release removed again");
}

#[tokio::test]
async fn canary_promotes_when_analysis_passes() {
    let d = fleet(10);
    // Judged after each of the three steps (10%, 50%, 100%): 3 × 2 samples.
    let monitor = Scripted(Mutex::new(vec![SampleStatus::Ok; 6]));
    let r = Canary::new([10, 50])
        .analysis(monitor, fast(2))
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.deployed.len(), 10);
    assert!(d.versions().iter().all(|v| v == "v1"));
}

#[derive(Default)]
struct MemRouter(Mutex<Option<String>>);

#[async_trait]
impl Router for MemRouter {
    async fn active(&self) -> Result<Option<String>> {
        Ok(self.0.lock().unwrap().clone())
    }
    async fn switch(&self, slot: &str, _cx: &DeployContext) -> Result<()> {
        *self.0.lock().unwrap() = Some(slot.to_string());
        Ok(())
    }
}

#[tokio::test]
async fn blue_green_deploys_the_idle_slot_switches_and_switches_back() {
    let d = MemoryDeployer::new(["blue", "green"]);
    let router = Arc::new(MemRouter::default());
    let bg = BlueGreen::with_router(router.clone());
    let r1 = bg
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r1.active_slot.as_deref(), Some("blue"));
    let r2 = bg
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r2.active_slot.as_deref(), Some("green"));
    assert_eq!(router.active().await.unwrap().as_deref(), Some("green"));
    assert_eq!(d.versions()[0], "v1", "old slot kept for rollback");
    bg.rollback(&d, &r2, &cx()).await.unwrap();
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
}

#[tokio::test]
async fn blue_green_does_not_switch_when_verification_fails() {
    let d = MemoryDeployer::new(["blue", "green"]);
    let router = Arc::new(MemRouter::default());
    BlueGreen::with_router(router.clone())
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    let err = BlueGreen::with_router(router.clone())
        .verify(Scripted(Mutex::new(vec![SampleStatus::Failing])), fast(1))
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
}

/// A deployer that switches a target first and then waits for its restart
/// (one second): a cancellation during the wait leaves the target on the new
/// release (as an SSH switch or a half-done Terraform apply can). Switching
/// `cancel_on` cancels `token`, so the cancellation lands in that wait.
struct SwitchesFirst {
    inner: MemoryDeployer,
    cancel_on: &'static str,
    token: tokio_util::sync::CancellationToken,
}

#[async_trait]
impl Deployer for SwitchesFirst {
    fn name(&self) -> &str {
        "switches-first"
    }
    fn targets(&self) -> Vec<Target> {
        self.inner.targets()
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        self.inner.current(target).await
    }
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        self.inner.plan(release, target, cx).await
    }
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        let rev = self
            .inner
            .apply(plan, &DeployContext::detached("x"))
            .await?;
        if plan.target.name == self.cancel_on {
            self.token.cancel();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => Ok(rev),
            _ = cx.cancel.cancelled() => Err(Error::cancelled()),
        }
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.inner.rollback(target, to, cx).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_left_switched_by_a_cancelled_apply_is_restored() {
    // Cancelled while web2 (switched) waits for its restart.
    let cancel = tokio_util::sync::CancellationToken::new();
    let d = SwitchesFirst {
        inner: fleet(3),
        cancel_on: "web2",
        token: cancel.clone(),
    };
    deploy_all(&d.inner, "v1").await;
    let cx = DeployContext::new(Emitter::noop(), cancel.clone(), "test");
    let err = Rolling::new()
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(
        err.to_string()
            .contains("interrupted mid-apply and restored: web2"),
        "{err}"
    );
    assert_eq!(
        d.inner.versions(),
        ["v1", "v1", "v1"],
        "no target left on v2"
    );
}

#[tokio::test]
async fn a_rolling_deploy_where_every_target_fails_is_an_error_whatever_the_tolerance() {
    let d = fleet(2);
    d.fail_on("web1");
    d.fail_on("web2");
    let err = Rolling::new()
        .max_failures(5)
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("web1, web2"), "{err}");
}

/// One analysis: its targets, its baseline, and whether the rollout began
/// no later than the step.
type Seen = (Vec<String>, Vec<String>, bool);

/// Records who each analysis compared with whom.
#[derive(Clone, Default)]
struct Scopes(Arc<Mutex<Vec<Seen>>>);

#[async_trait]
impl Monitor for Scopes {
    fn name(&self) -> String {
        "scopes".into()
    }
    async fn sample(&self, cx: &MonitorContext) -> Result<Sample> {
        let names = |t: &[Target]| t.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let ordered = match (cx.rollout_started, cx.since) {
            (Some(r), Some(s)) => r <= s,
            _ => false,
        };
        self.0
            .lock()
            .unwrap()
            .push((names(&cx.targets), names(&cx.baseline), ordered));
        Ok(Sample::ok(None, "ok"))
    }
}

#[tokio::test]
async fn analyses_see_the_targets_still_on_the_previous_release_as_baseline() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let d = fleet(4);
    let scopes = Scopes::default();
    Canary::new([25, 50, 100])
        .analysis(scopes.clone(), fast(1))
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(
        scopes.0.lock().unwrap().clone(),
        [
            (s(&["web1"]), s(&["web2", "web3", "web4"]), true),
            (s(&["web1", "web2"]), s(&["web3", "web4"]), true),
            (s(&["web1", "web2", "web3", "web4"]), s(&[]), true),
        ]
    );

    let scopes = Scopes::default();
    Rolling::new()
        .batch_size(3)
        .analysis(scopes.clone(), fast(1))
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(
        scopes.0.lock().unwrap().clone(),
        [
            (s(&["web1", "web2", "web3"]), s(&["web4"]), true),
            (s(&["web4"]), s(&[]), true),
        ]
    );
}

#[tokio::test]
async fn the_no_data_policy_decides_what_a_sample_without_data_does() {
    use SampleStatus::{NoData, Ok as Good};
    let cx = MonitorContext::new(
        vec![],
        Release::new("v1"),
        Emitter::noop(),
        Default::default(),
    );
    let run = |policy: NoDataPolicy, limit: u32| {
        let cx = cx.clone();
        async move {
            let m = Scripted(Mutex::new(vec![Good, NoData, Good]));
            fast(3)
                .no_data(policy)
                .failure_limit(limit)
                .run(&m, &cx)
                .await
                .unwrap()
        }
    };
    // Default: one no-data sample over the (zero) limit is inconclusive.
    assert!(matches!(
        run(NoDataPolicy::Inconclusive, 0).await,
        AnalysisOutcome::Inconclusive(_)
    ));
    // As a failure: over a failure limit of 0 it fails, within 1 it passes.
    let o = run(NoDataPolicy::CountAsFailure, 0).await;
    assert!(
        matches!(&o, AnalysisOutcome::Fail(r) if r.contains("no data")),
        "{o:?}"
    );
    assert_eq!(
        run(NoDataPolicy::CountAsFailure, 1).await,
        AnalysisOutcome::Pass
    );
    // Fail: at once, whatever the limit.
    let o = run(NoDataPolicy::Fail, 5).await;
    assert!(
        matches!(&o, AnalysisOutcome::Fail(r) if r.contains("no-data policy: fail")),
        "{o:?}"
    );
}
