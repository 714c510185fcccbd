//! The deployer conformance suite catches a deployer that breaks the contract.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use cd_core::conformance::{check_deployer, Conformance};
use cd_core::*;

/// `honest = false` makes `plan` report a change even for the live version.
struct MemDeployer {
    honest: bool,
    live: Mutex<BTreeMap<String, Revision>>,
    history: Mutex<BTreeMap<String, Vec<Revision>>>,
}

#[async_trait]
impl Deployer for MemDeployer {
    fn name(&self) -> &str {
        "memory"
    }
    fn targets(&self) -> Vec<Target> {
        vec![Target::new("t"), Target::new("u")]
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        Ok(self.live.lock().unwrap().get(&target.name).cloned())
    }
    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        let cur = self.current(target).await?;
        let action = match &cur {
            Some(c) if c.version == release.version && self.honest => ChangeAction::NoOp,
            _ => ChangeAction::Update,
        };
        Ok(Plan::new(release.clone(), target.clone(), cur).change(Change::new(action, "current")))
    }
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        if plan.release.version.ends_with("-slow") {
            // Stops at the cancellation, leaving the target as it was.
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                _ = cx.cancel.cancelled() => return Err(Error::cancelled()),
            }
        }
        let rev = Revision::new(&plan.target.name, &plan.release.version, "x");
        if let Some(prev) = self
            .live
            .lock()
            .unwrap()
            .insert(plan.target.name.clone(), rev.clone())
        {
            self.history
                .lock()
                .unwrap()
                .entry(plan.target.name.clone())
                .or_default()
                .push(prev);
        }
        Ok(rev)
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        _cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let to = to.cloned().or_else(|| {
            self.history
                .lock()
                .unwrap()
                .get_mut(&target.name)
                .and_then(|h| h.pop())
        });
        let mut live = self.live.lock().unwrap();
        match to {
            Some(r) => {
                live.insert(target.name.clone(), r.clone());
                Ok(Some(r))
            }
            None => Ok(live.remove(&target.name).and(None)),
        }
    }
}

fn deployer(honest: bool) -> MemDeployer {
    MemDeployer {
        honest,
        live: Mutex::default(),
        history: Mutex::default(),
    }
}

#[tokio::test]
async fn a_conforming_deployer_passes() {
    let d = deployer(true);
    let cx = DeployContext::detached("t");
    let r = check_deployer(
        &d,
        &Target::new("t"),
        &Release::new("v1"),
        &Release::new("v2"),
        &cx,
    )
    .await
    .unwrap();
    assert_eq!(r.passed.len(), 6, "{r:?}");
    assert_eq!(r.skipped.len(), 4, "{r:?}");
    assert_eq!(
        d.current(&Target::new("t")).await.unwrap().unwrap().version,
        "v1"
    );
}

#[tokio::test(start_paused = true)]
async fn the_full_suite_runs_every_check_a_deployer_declares() {
    let d = deployer(true);
    let r = Conformance::new(&d, Release::new("v1"), Release::new("v2"))
        .cancel_mid_apply(
            Release::new("v3-slow"),
            std::time::Duration::from_millis(50),
        )
        .crash_after_each_step(true)
        .run()
        .await
        .unwrap();
    assert!(r.is_complete(), "{r:?}");
    assert_eq!(r.passed.len(), 11, "{r:?}");
    assert_eq!(
        d.current(&Target::new("t")).await.unwrap().unwrap().version,
        "v1"
    );
}

/// A deployer whose cancelled apply leaves nothing live (it removed the old
/// release before putting the new one) is caught.
struct Careless(MemDeployer);

#[async_trait]
impl Deployer for Careless {
    fn name(&self) -> &str {
        "careless"
    }
    fn targets(&self) -> Vec<Target> {
        vec![Target::new("t")]
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        self.0.current(target).await
    }
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        self.0.plan(release, target, cx).await
    }
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        if plan.release.version.ends_with("-slow") {
            self.0.live.lock().unwrap().remove(&plan.target.name);
        }
        self.0.apply(plan, cx).await
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.0.rollback(target, to, cx).await
    }
}

#[tokio::test]
async fn a_deployer_whose_cancelled_apply_leaves_nothing_live_fails() {
    let d = Careless(deployer(true));
    let err = Conformance::new(&d, Release::new("v1"), Release::new("v2"))
        .cancel_mid_apply(
            Release::new("v3-slow"),
            std::time::Duration::from_millis(50),
        )
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.context("step"), Some("cancel mid-apply"), "{err}");
}

#[tokio::test]
async fn a_deployer_whose_redeploy_is_not_a_noop_fails_naming_the_step() {
    let d = deployer(false);
    let cx = DeployContext::detached("t");
    let err = check_deployer(
        &d,
        &Target::new("t"),
        &Release::new("v1"),
        &Release::new("v2"),
        &cx,
    )
    .await
    .unwrap_err();
    assert_eq!(err.context("step"), Some("redeploy"));
    assert_eq!(err.context("target"), Some("t"));
}

#[tokio::test(start_paused = true)]
async fn the_memory_deployer_passes_the_full_suite() {
    let d = MemoryDeployer::new(["a", "b"]).apply_delay(std::time::Duration::from_millis(100));
    let r = Conformance::new(&d, Release::new("v1"), Release::new("v2"))
        .cancel_mid_apply(Release::new("v3"), std::time::Duration::from_millis(50))
        .crash_after_each_step(true)
        .run()
        .await
        .unwrap();
    assert!(r.is_complete(), "{r:?}");
    assert_eq!(d.versions(), ["v1", "v2"]);
}
