//! The `Deploy` stage: a rollout strategy over a deployer, recorded in the
//! environment's release history, undone by the runner's compensation.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use cd_core::strategy::RolloutReport;
use cd_core::{
    Analysis, BlueGreen, Canary, Capabilities, DeployContext, Deployer, Error, ErrorKind, Monitor,
    ReleaseRecord, ReleaseStatus, Result, Rolling, Router, Stage, StageContext, StageOutput, Store,
    Strategy, Target,
};

#[derive(Clone)]
enum Choice {
    Rolling { batch: usize, max_failures: usize },
    Canary(Vec<u32>),
    BlueGreen(Arc<dyn Router>),
    Custom(Arc<dyn Strategy>),
}

/// Deploys the run's release with a strategy (rolling by default) and keeps
/// the environment's release history: the new release is `live`, the one it
/// replaced `superseded`; when the runner compensates, the rollout is undone,
/// the new release marked `rolled_back` and the previous one `live` again.
///
/// ```
/// use cd_core::{Analysis, Deployer};
/// use cd_stages::Deploy;
/// # fn demo(web: impl Deployer) {
/// let stage = Deploy::new(web).env("production").canary([10, 50, 100]);
/// # let _ = stage;
/// # }
/// ```
#[derive(Clone)]
pub struct Deploy {
    deployer: Arc<dyn Deployer>,
    choice: Choice,
    judge: Option<(Arc<dyn Monitor>, Analysis)>,
    environment: Option<String>,
    targets: Option<Vec<Target>>,
}

/// What a `Deploy` stage outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployOutput {
    /// The environment whose history records the release.
    pub environment: String,
    /// The release history record's id.
    pub release_id: String,
    /// What the rollout did.
    pub rollout: RolloutReport,
}

impl Deploy {
    /// Deploys with `deployer` to all its targets, one at a time.
    pub fn new(deployer: impl Deployer) -> Self {
        Self::shared(Arc::new(deployer))
    }

    /// Deploys with a shared deployer.
    pub fn shared(deployer: Arc<dyn Deployer>) -> Self {
        Deploy {
            deployer,
            choice: Choice::Rolling {
                batch: 1,
                max_failures: 0,
            },
            judge: None,
            environment: None,
            targets: None,
        }
    }

    /// The environment recorded in release history (default: the run's).
    pub fn env(mut self, environment: impl Into<String>) -> Self {
        self.environment = Some(environment.into());
        self
    }

    /// Deploys to these targets instead of all the deployer's.
    pub fn targets(mut self, targets: impl IntoIterator<Item = Target>) -> Self {
        self.targets = Some(targets.into_iter().collect());
        self
    }

    /// Rolling update in batches, tolerating `max_failures` failed targets.
    pub fn rolling(mut self, batch: usize, max_failures: usize) -> Self {
        self.choice = Choice::Rolling {
            batch,
            max_failures,
        };
        self
    }

    /// Canary over a growing share of targets (percent).
    pub fn canary(mut self, steps: impl IntoIterator<Item = u32>) -> Self {
        self.choice = Choice::Canary(steps.into_iter().collect());
        self
    }

    /// Blue-green over the deployer's two slots, switching `router`.
    pub fn blue_green(mut self, router: impl Router) -> Self {
        self.choice = Choice::BlueGreen(Arc::new(router));
        self
    }

    /// Blue-green with a shared router.
    pub fn blue_green_arc(mut self, router: Arc<dyn Router>) -> Self {
        self.choice = Choice::BlueGreen(router);
        self
    }

    /// Any strategy.
    pub fn strategy(mut self, strategy: impl Strategy) -> Self {
        self.choice = Choice::Custom(Arc::new(strategy));
        self
    }

    /// Judges the rollout with `monitor`: after each rolling batch, between
    /// canary steps, or on the idle slot before a blue-green switch.
    pub fn judge(mut self, monitor: impl Monitor, analysis: Analysis) -> Self {
        self.judge = Some((Arc::new(monitor), analysis));
        self
    }

    fn strategy_value(&self) -> Arc<dyn Strategy> {
        match (&self.choice, &self.judge) {
            (
                Choice::Rolling {
                    batch,
                    max_failures,
                },
                judge,
            ) => {
                let mut r = Rolling::new()
                    .batch_size(*batch)
                    .max_failures(*max_failures);
                if let Some((m, a)) = judge {
                    r = r.analysis(m.clone(), *a);
                }
                Arc::new(r)
            }
            (Choice::Canary(steps), judge) => {
                let mut c = Canary::new(steps.clone());
                if let Some((m, a)) = judge {
                    c = c.analysis_arc(m.clone(), *a);
                }
                Arc::new(c)
            }
            (Choice::BlueGreen(router), judge) => {
                let mut b = BlueGreen::with_router(router.clone());
                if let Some((m, a)) = judge {
                    b = b.verify_arc(m.clone(), *a);
                }
                Arc::new(b)
            }
            (Choice::Custom(s), _) => s.clone(),
        }
    }

    fn environment_for(&self, cx: &StageContext) -> String {
        self.environment
            .clone()
            .unwrap_or_else(|| cx.environment().to_string())
    }

    fn context_for(&self, cx: &StageContext) -> DeployContext {
        let mut dcx = cx.deploy_context();
        dcx.environment = self.environment_for(cx);
        dcx
    }

    fn target_list(&self) -> Vec<Target> {
        self.targets
            .clone()
            .unwrap_or_else(|| self.deployer.targets())
    }

    /// Redeploys a release from `environment`'s history: the named version,
    /// or (with `None`) the newest successful release before the live one.
    /// Use it from a host binary to roll back to known-good.
    pub async fn restore(
        &self,
        store: &dyn Store,
        environment: &str,
        version: Option<&str>,
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        let history = store.release_history(environment, 1000).await?;
        let pick = match version {
            Some(v) => history.iter().find(|r| r.version == v),
            None => {
                let live = history.iter().position(|r| r.status == ReleaseStatus::Live);
                let after = live.map(|p| p + 1).unwrap_or(0);
                history[after.min(history.len())..]
                    .iter()
                    .find(|r| r.status == ReleaseStatus::Superseded)
            }
        };
        let record = pick.cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                match version {
                    Some(v) => {
                        format!("version {v} is not in the history of environment `{environment}`")
                    }
                    None => {
                        format!("environment `{environment}` has no earlier successful release")
                    }
                },
            )
            .with("environment", environment)
        })?;
        let strategy = self.strategy_value();
        let report = strategy
            .deploy(
                self.deployer.as_ref(),
                &record.release,
                &self.target_list(),
                cx,
            )
            .await?;
        let now = Utc::now();
        for mut r in history
            .into_iter()
            .filter(|r| r.status == ReleaseStatus::Live)
        {
            r.status = ReleaseStatus::RolledBack;
            r.updated_at = now;
            store.put_release(&r).await?;
        }
        let mut restored = record.clone();
        let source_id = record.id.clone();
        restored.id = uuid_like(&record.version);
        restored.status = ReleaseStatus::Live;
        restored.revisions = report.deployed.clone();
        restored.at = now;
        restored.updated_at = now;
        restored.actor = format!("restore of {source_id}");
        store.put_release(&restored).await?;
        Ok(report)
    }
}

fn uuid_like(version: &str) -> String {
    format!(
        "{}-{}",
        version,
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
}

async fn set_status(store: &dyn Store, env: &str, id: &str, status: ReleaseStatus) -> Result<()> {
    if let Some(mut r) = store
        .release_history(env, 1000)
        .await?
        .into_iter()
        .find(|r| r.id == id)
    {
        r.status = status;
        r.updated_at = Utc::now();
        store.put_release(&r).await?;
    }
    Ok(())
}

#[async_trait]
impl Stage for Deploy {
    fn kind(&self) -> String {
        let s = match &self.choice {
            Choice::Rolling { .. } => "rolling",
            Choice::Canary(_) => "canary",
            Choice::BlueGreen(_) => "blue-green",
            Choice::Custom(s) => s.name(),
        };
        format!("deploy({} {s})", self.deployer.name())
    }

    fn capabilities(&self) -> Capabilities {
        let caps = self.deployer.capabilities();
        Capabilities {
            rollback: caps.rollback,
            idempotent: caps.idempotent,
        }
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let env = self.environment_for(cx);
        let store = cx.store().clone();
        let actor = match store.get_run(cx.run_id()).await {
            Ok(Some(run)) => run.started_by,
            _ => "cd".to_string(),
        };
        let now = Utc::now();
        let mut record = ReleaseRecord {
            id: format!("{}-{}", cx.run_id(), cx.node()),
            environment: env.clone(),
            version: cx.release().version.clone(),
            release: cx.release().clone(),
            revisions: Vec::new(),
            status: ReleaseStatus::Deploying,
            run_id: Some(cx.run_id().to_string()),
            actor,
            at: now,
            updated_at: now,
        };
        store.put_release(&record).await?;
        let strategy = self.strategy_value();
        let dcx = self.context_for(cx);
        let result = strategy
            .deploy(
                self.deployer.as_ref(),
                cx.release(),
                &self.target_list(),
                &dcx,
            )
            .await;
        match result {
            Ok(report) => {
                let now = Utc::now();
                for mut r in store.release_history(&env, 1000).await? {
                    if r.status == ReleaseStatus::Live && r.id != record.id {
                        r.status = ReleaseStatus::Superseded;
                        r.updated_at = now;
                        store.put_release(&r).await?;
                    }
                }
                record.status = ReleaseStatus::Live;
                record.revisions = report.deployed.clone();
                record.updated_at = now;
                store.put_release(&record).await?;
                StageOutput::from_serialize(&DeployOutput {
                    environment: env,
                    release_id: record.id,
                    rollout: report,
                })
            }
            Err(e) => {
                record.status = ReleaseStatus::Failed;
                record.updated_at = Utc::now();
                store.put_release(&record).await?;
                Err(e.with("environment", &env))
            }
        }
    }

    async fn rollback(&self, cx: &StageContext, output: &StageOutput) -> Result<()> {
        let out: DeployOutput = output.parse()?;
        let store = cx.store().clone();
        let dcx = self.context_for(cx);
        self.strategy_value()
            .rollback(self.deployer.as_ref(), &out.rollout, &dcx)
            .await?;
        if out.rollout.noop {
            return Ok(());
        }
        set_status(
            store.as_ref(),
            &out.environment,
            &out.release_id,
            ReleaseStatus::RolledBack,
        )
        .await?;
        // The release it replaced is live again.
        let history = store.release_history(&out.environment, 1000).await?;
        let me = history.iter().position(|r| r.id == out.release_id);
        if let Some(prev) = me.and_then(|p| {
            history[p + 1..]
                .iter()
                .find(|r| r.status == ReleaseStatus::Superseded)
        }) {
            set_status(
                store.as_ref(),
                &out.environment,
                &prev.id,
                ReleaseStatus::Live,
            )
            .await?;
        }
        Ok(())
    }
}
