//! Strategies against an in-memory deployer.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cd_core::*;

/// Keeps what is live per target in memory; can be told to fail a target.
#[derive(Default)]
struct MemDeployer {
    targets: Vec<Target>,
    live: Mutex<BTreeMap<String, Revision>>,
    fail_on: Mutex<HashSet<String>>,
    applied: Mutex<Vec<String>>,
    rolled_back: Mutex<Vec<String>>,
}

impl MemDeployer {
    fn new(n: usize) -> Self {
        MemDeployer {
            targets: (1..=n).map(|i| Target::new(format!("web{i}"))).collect(),
            ..Default::default()
        }
    }
    fn versions(&self) -> BTreeMap<String, String> {
        self.live
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.version.clone()))
            .collect()
    }
}

#[async_trait]
impl Deployer for MemDeployer {
    fn name(&self) -> &str {
        "memory"
    }
    fn targets(&self) -> Vec<Target> {
        self.targets.clone()
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        Ok(self.live.lock().unwrap().get(&target.name).cloned())
    }
    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        let cur = self.current(target).await?;
        Ok(Plan::new(release.clone(), target.clone(), cur)
            .change(Change::new(ChangeAction::Update, "current")))
    }
    async fn apply(&self, plan: &Plan, _cx: &DeployContext) -> Result<Revision> {
        if self.fail_on.lock().unwrap().contains(&plan.target.name) {
            return Err(Error::failed("disk full").with("target", &plan.target.name));
        }
        let rev = Revision::new(
            &plan.target.name,
            &plan.release.version,
            format!("{}@{}", plan.target.name, plan.release.version),
        );
        self.live
            .lock()
            .unwrap()
            .insert(plan.target.name.clone(), rev.clone());
        self.applied.lock().unwrap().push(plan.target.name.clone());
        Ok(rev)
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        _cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.rolled_back.lock().unwrap().push(target.name.clone());
        let mut live = self.live.lock().unwrap();
        match to {
            Some(r) => {
                live.insert(target.name.clone(), r.clone());
                Ok(Some(r.clone()))
            }
            None => {
                live.remove(&target.name);
                Ok(None)
            }
        }
    }
}

fn cx() -> DeployContext {
    DeployContext::detached("test")
}

async fn deploy_all(d: &MemDeployer, version: &str) {
    Rolling::new()
        .batch_size(10)
        .deploy(d, &Release::new(version), &d.targets(), &cx())
        .await
        .unwrap();
}

#[tokio::test]
async fn rolling_deploys_every_target_in_batches() {
    let d = MemDeployer::new(5);
    let r = Rolling::new()
        .batch_size(2)
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.deployed.len(), 5);
    assert!(d.versions().values().all(|v| v == "v1"));
}

#[tokio::test]
async fn rolling_with_a_failing_target_rolls_back_exactly_the_switched_targets() {
    let d = MemDeployer::new(6);
    deploy_all(&d, "v1").await;
    d.applied.lock().unwrap().clear();
    d.fail_on.lock().unwrap().insert("web4".into());
    let err = Rolling::new()
        .batch_size(2)
        .deploy(&d, &Release::new("v2"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("web4"), "{err}");
    // Batches: [web1, web2] ok, [web3, web4]: web3 ok, web4 failed. Stop.
    let mut rolled: Vec<String> = d.rolled_back.lock().unwrap().clone();
    rolled.sort();
    assert_eq!(rolled, ["web1", "web2", "web3"]);
    assert!(
        d.versions().values().all(|v| v == "v1"),
        "{:?}",
        d.versions()
    );
    assert!(!d.applied.lock().unwrap().contains(&"web5".to_string()));
}

#[tokio::test]
async fn rolling_tolerates_max_failures_and_reports_them() {
    let d = MemDeployer::new(4);
    d.fail_on.lock().unwrap().insert("web2".into());
    let r = Rolling::new()
        .max_failures(1)
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, "web2");
    assert_eq!(d.versions().len(), 3);
}

#[tokio::test]
async fn redeploying_the_live_version_is_a_noop() {
    let d = MemDeployer::new(3);
    deploy_all(&d, "v1").await;
    d.applied.lock().unwrap().clear();
    let r = Rolling::new()
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert!(r.noop);
    assert!(d.applied.lock().unwrap().is_empty());
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
    let d = MemDeployer::new(10);
    deploy_all(&d, "v1").await;
    d.applied.lock().unwrap().clear();
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
    assert_eq!(
        *d.applied.lock().unwrap(),
        ["web1"],
        "only the canary got v2"
    );
    assert_eq!(*d.rolled_back.lock().unwrap(), ["web1"]);
    assert!(d.versions().values().all(|v| v == "v1"));
}

#[tokio::test]
async fn canary_treats_no_data_as_inconclusive_and_aborts() {
    let d = MemDeployer::new(4);
    let monitor = Scripted(Mutex::new(vec![SampleStatus::NoData]));
    let err = Canary::new([25])
        .analysis(monitor, fast(1))
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inconclusive"), "{err}");
    assert!(d.versions().is_empty(), "first release removed again");
}

#[tokio::test]
async fn canary_promotes_when_analysis_passes() {
    let d = MemDeployer::new(10);
    // Judged after each of the three steps (10%, 50%, 100%): 3 × 2 samples.
    let monitor = Scripted(Mutex::new(vec![SampleStatus::Ok; 6]));
    let r = Canary::new([10, 50])
        .analysis(monitor, fast(2))
        .deploy(&d, &Release::new("v1"), &d.targets(), &cx())
        .await
        .unwrap();
    assert_eq!(r.deployed.len(), 10);
    assert!(d.versions().values().all(|v| v == "v1"));
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
    let d = MemDeployer {
        targets: vec![Target::new("blue"), Target::new("green")],
        ..Default::default()
    };
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
    assert_eq!(d.versions()["blue"], "v1", "old slot kept for rollback");
    bg.rollback(&d, &r2, &cx()).await.unwrap();
    assert_eq!(router.active().await.unwrap().as_deref(), Some("blue"));
}

#[tokio::test]
async fn blue_green_does_not_switch_when_verification_fails() {
    let d = MemDeployer {
        targets: vec![Target::new("blue"), Target::new("green")],
        ..Default::default()
    };
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
