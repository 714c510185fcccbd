//! The deployer conformance suite catches a deployer that breaks the contract.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use cd_core::conformance::check_deployer;
use cd_core::*;

/// `honest = false` makes `plan` report a change even for the live version.
struct MemDeployer {
    honest: bool,
    live: Mutex<BTreeMap<String, Revision>>,
    history: Mutex<Vec<Revision>>,
}

#[async_trait]
impl Deployer for MemDeployer {
    fn name(&self) -> &str {
        "memory"
    }
    fn targets(&self) -> Vec<Target> {
        vec![Target::new("t")]
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
    async fn apply(&self, plan: &Plan, _cx: &DeployContext) -> Result<Revision> {
        let rev = Revision::new(&plan.target.name, &plan.release.version, "x");
        if let Some(prev) = self
            .live
            .lock()
            .unwrap()
            .insert(plan.target.name.clone(), rev.clone())
        {
            self.history.lock().unwrap().push(prev);
        }
        Ok(rev)
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        _cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let to = to.cloned().or_else(|| self.history.lock().unwrap().pop());
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
    assert_eq!(r.passed.len(), 5);
    assert_eq!(
        d.current(&Target::new("t")).await.unwrap().unwrap().version,
        "v1"
    );
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
