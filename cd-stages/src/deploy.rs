//! The `Deploy` stage: a rollout strategy over a deployer, recorded in the
//! environment's release history, undone by the runner's compensation.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use cd_core::lease::holder_name;
use cd_core::strategy::RolloutReport;
use cd_core::types::validate_environment;
use cd_core::{
    Analysis, BlueGreen, Canary, Capabilities, DeployContext, Deployer, EnvironmentLease, Error,
    ErrorKind, LockRequest, LockSettings, Monitor, ReleaseRecord, ReleaseStatus, Result, Revision,
    Rolling, Router, Stage, StageContext, StageOutput, Store, Strategy, Target,
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
    /// After a compensation that could not roll every target back: asks
    /// each target what it runs and records that in the history (the
    /// release keeps only the targets still on it, `partially_rolled_back`;
    /// the release before it is `live` again where targets went back), then
    /// returns an error naming which target is on which release.
    async fn record_partial_rollback(
        &self,
        store: &dyn Store,
        out: &DeployOutput,
        cause: Error,
    ) -> Error {
        let version = out.rollout.version.clone();
        let known: std::collections::BTreeMap<String, Target> = self
            .target_list()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let (mut still, mut back, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for rev in &out.rollout.deployed {
            let target = known
                .get(&rev.target)
                .cloned()
                .unwrap_or_else(|| Target::new(rev.target.clone()));
            match self.deployer.current(&target).await {
                Ok(Some(cur)) if cur.version == version => still.push(cur),
                Ok(cur) => back.push((rev.target.clone(), cur)),
                // Cannot tell: count it as still on the release.
                Err(_) => {
                    unknown.push(rev.target.clone());
                    still.push(rev.clone());
                }
            }
        }
        let history = store
            .release_history(&out.environment, HISTORY_LIMIT)
            .await
            .unwrap_or_default();
        let now = Utc::now();
        let me = history.iter().position(|r| r.id == out.release_id);
        if let Some(p) = me {
            let mut r = history[p].clone();
            r.status = if still.is_empty() {
                ReleaseStatus::RolledBack
            } else {
                ReleaseStatus::PartiallyRolledBack
            };
            r.revisions = still.clone();
            r.updated_at = now;
            let _ = store.put_release(&r).await;
            if !back.is_empty() {
                if let Some(prev) = history[p + 1..]
                    .iter()
                    .find(|r| r.status == ReleaseStatus::Superseded)
                {
                    let mut prev = prev.clone();
                    prev.status = ReleaseStatus::Live;
                    prev.revisions = back.iter().filter_map(|(_, cur)| cur.clone()).collect();
                    prev.updated_at = now;
                    let _ = store.put_release(&prev).await;
                }
            }
        }
        let names = |v: &[Revision]| {
            v.iter()
                .map(|r| r.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let back_text = back
            .iter()
            .map(|(t, cur)| {
                format!(
                    "{t} on {}",
                    cur.as_ref()
                        .map(|c| c.version.as_str())
                        .unwrap_or("nothing")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Error::new(
            cause.kind(),
            format!(
                "rollback of {version} incomplete: still on {version}: {}{}; rolled back: {}; first error: {cause}",
                if still.is_empty() { "none".to_string() } else { names(&still) },
                if unknown.is_empty() {
                    String::new()
                } else {
                    format!(" (unreachable: {})", unknown.join(", "))
                },
                if back_text.is_empty() { "none".to_string() } else { back_text },
            ),
        )
        .with("environment", &out.environment)
        .retryable(false)
    }

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

    /// Redeploys a release from the history of `request`'s environment, under
    /// that environment's lock (waiting for it like a run, at most the lock's
    /// `wait_timeout`): the named version, or (with none named) the newest
    /// release that went live *before* the live one. When the live release
    /// was itself restored, "before" means before the release it restored, so
    /// restoring twice from v2 (history v0, v1, v2) goes to v1, then to v0,
    /// then fails with "nothing older".
    ///
    /// History afterwards: the release that was live is `superseded` (it was
    /// replaced, not rolled back); a new record for the restored release is
    /// `live`, names the record it restored (`restored_from`) and the actor
    /// the caller gave. A restore that fails leaves a `failed` record (the
    /// rollout's own revert has run) and changes no other record.
    ///
    /// Secrets: the history keeps a release's secret *names* only
    /// ([`cd_core::Release::secret`]); a restored release that had secrets
    /// gets their values from the deployer (`TerraformDeployer::secret_var`,
    /// `AnsibleDeployer::secret_var`), else the deployer fails with
    /// [`ErrorKind::Invalid`] naming the secret.
    ///
    /// Errors: [`ErrorKind::Invalid`] for a bad environment name;
    /// [`ErrorKind::NotFound`] when the version never went live there or
    /// nothing older exists; [`ErrorKind::Locked`] when a run (or another
    /// restore) holds the environment past the wait; the rollout's error.
    pub async fn restore(
        &self,
        store: &Arc<dyn Store>,
        request: &Restore,
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        let environment = request.environment.as_str();
        validate_environment(environment)?;
        let restore_id = uuid_like("restore");
        let lease = match &request.lock {
            None => None,
            Some(settings) => Some(
                EnvironmentLease::acquire(
                    store.clone(),
                    LockRequest {
                        environment: environment.to_string(),
                        holder: holder_name(&request.actor, &restore_id),
                        run_id: None,
                        message: format!(
                            "restore of {} by {}",
                            request.version.as_deref().unwrap_or("the previous release"),
                            request.actor
                        ),
                        ttl: settings.ttl,
                    },
                    settings,
                    &cx.cancel,
                    &cx.events,
                )
                .await?,
            ),
        };
        let result = self.restore_locked(store.as_ref(), request, cx).await;
        if let Some(lease) = lease {
            if let Err(e) = lease.release().await {
                // The lease lapses at its ttl; the restore's outcome stands.
                tracing::warn!(target: "cd::deploy", "could not release the lease after a restore: {e}");
            }
        }
        result
    }

    async fn restore_locked(
        &self,
        store: &dyn Store,
        request: &Restore,
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        let environment = request.environment.as_str();
        // Newest first.
        let history = store.release_history(environment, HISTORY_LIMIT).await?;
        let went_live =
            |r: &ReleaseRecord| matches!(r.status, ReleaseStatus::Live | ReleaseStatus::Superseded);
        let live = history.iter().position(|r| r.status == ReleaseStatus::Live);
        let record = match request.version.as_deref() {
            Some(v) => history
                .iter()
                .find(|r| r.version == v && went_live(r))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("version {v} never went live in environment `{environment}`"),
                    )
                })?,
            None => {
                let live = live.ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "environment `{environment}` has no live release to restore from; name a version"
                        ),
                    )
                })?;
                let live_rec = &history[live];
                // A restored release counts from the record it restored.
                let anchor = live_rec
                    .restored_from
                    .as_ref()
                    .and_then(|id| history.iter().position(|r| &r.id == id))
                    .unwrap_or(live)
                    .max(live);
                history[anchor + 1..]
                    .iter()
                    .find(|r| r.status == ReleaseStatus::Superseded && r.version != live_rec.version)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "environment `{environment}` has nothing older than {} to restore",
                                live_rec.version
                            ),
                        )
                    })?
            }
        }
        .clone();
        let strategy = self.strategy_value();
        let started = Utc::now();
        let mut restored = ReleaseRecord {
            id: uuid_like(&record.version),
            environment: environment.to_string(),
            version: record.version.clone(),
            release: record.release.clone(),
            revisions: Vec::new(),
            status: ReleaseStatus::Deploying,
            run_id: None,
            actor: request.actor.clone(),
            at: started,
            updated_at: started,
            restored_from: Some(record.id.clone()),
        };
        store.put_release(&restored).await?;
        let result = strategy
            .deploy(
                self.deployer.as_ref(),
                &record.release,
                &self.target_list(),
                cx,
            )
            .await;
        let now = Utc::now();
        match result {
            Ok(report) => {
                for mut r in history
                    .into_iter()
                    .filter(|r| r.status == ReleaseStatus::Live)
                {
                    r.status = ReleaseStatus::Superseded;
                    r.updated_at = now;
                    store.put_release(&r).await?;
                }
                restored.status = ReleaseStatus::Live;
                restored.revisions = report.deployed.clone();
                restored.updated_at = now;
                store.put_release(&restored).await?;
                Ok(report)
            }
            Err(e) => {
                restored.status = ReleaseStatus::Failed;
                restored.updated_at = now;
                store.put_release(&restored).await?;
                Err(e.with("environment", environment))
            }
        }
    }
}

/// What [`Deploy::restore`] restores, as whom, under which lock.
///
/// ```
/// use cd_stages::Restore;
/// let r = Restore::new("production").version("v41").actor("alice");
/// # let _ = r;
/// ```
#[derive(Debug, Clone)]
pub struct Restore {
    environment: String,
    version: Option<String>,
    actor: String,
    lock: Option<LockSettings>,
}

impl Restore {
    /// Restores in `environment` the release before the live one, as the
    /// current `$USER`, waiting for the environment lock with the default
    /// [`LockSettings`].
    pub fn new(environment: impl Into<String>) -> Self {
        Restore {
            environment: environment.into(),
            version: None,
            actor: std::env::var("USER").unwrap_or_else(|_| "cd".into()),
            lock: Some(LockSettings::default()),
        }
    }

    /// Restores this version instead (it must have gone live there).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Who restores: recorded in history and in the lock holder.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Lock settings (how long to wait for a run holding the environment).
    pub fn lock(mut self, settings: LockSettings) -> Self {
        self.lock = Some(settings);
        self
    }

    /// Restores without taking the environment lock (for a store no run
    /// shares; a run in progress would deploy over the restore).
    pub fn without_lock(mut self) -> Self {
        self.lock = None;
        self
    }
}

/// What the environment ran before the release record `mine` (a run's own
/// deploy), per target, from its history (newest first): the live release other than `mine`; if there is
/// none (a crash between marking the old one superseded and `mine` live),
/// the newest superseded one.
fn baseline_revisions(
    history: &[ReleaseRecord],
    mine: &str,
) -> std::collections::BTreeMap<String, Revision> {
    let others = || history.iter().filter(|r| r.id != mine);
    let base = others()
        .find(|r| r.status == ReleaseStatus::Live)
        .or_else(|| others().find(|r| r.status == ReleaseStatus::Superseded));
    base.map(|r| {
        r.revisions
            .iter()
            .map(|rev| (rev.target.clone(), rev.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// How many history records restore and compensation read (newest first).
const HISTORY_LIMIT: usize = 100_000;

/// Marks a release record `failed` when dropped while armed.
struct RecordGuard {
    store: Option<Arc<dyn Store>>,
    record: ReleaseRecord,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let mut record = self.record.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                record.status = ReleaseStatus::Failed;
                record.updated_at = Utc::now();
                let _ = store.put_release(&record).await;
            });
        }
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
        .release_history(env, HISTORY_LIMIT)
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

    fn fingerprint(&self) -> String {
        let choice = match &self.choice {
            Choice::Rolling {
                batch,
                max_failures,
            } => format!("rolling batch={batch} max_failures={max_failures}"),
            Choice::Canary(steps) => format!("canary {steps:?}"),
            Choice::BlueGreen(_) => "blue-green".to_string(),
            Choice::Custom(s) => format!("strategy {}", s.name()),
        };
        let judge = self
            .judge
            .as_ref()
            .map(|(m, a)| format!("{} {a:?}", m.name()))
            .unwrap_or_default();
        let targets: Vec<String> = self.target_list().into_iter().map(|t| t.name).collect();
        format!(
            "deploy({}) {choice} judge={judge} env={:?} targets={targets:?}",
            self.deployer.name(),
            self.environment
        )
    }

    fn validate(&self) -> Result<()> {
        if let Some(env) = &self.environment {
            validate_environment(env)?;
        }
        self.strategy_value().validate(self.target_list().len())
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
        validate_environment(&env)?;
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
            restored_from: None,
        };
        // Deploying to another environment than the run's: hold that
        // environment's lease too, so a restore or another run cannot deploy
        // there at the same time.
        let lease = if env != cx.environment() {
            let settings = LockSettings::default();
            Some(
                EnvironmentLease::acquire(
                    store.clone(),
                    LockRequest {
                        environment: env.clone(),
                        holder: holder_name(
                            &record.actor,
                            &format!("{} node {}", cx.run_id(), cx.node()),
                        ),
                        run_id: Some(cx.run_id().to_string()),
                        message: format!("run {} deploys {}", cx.run_id(), cx.release().version),
                        ttl: settings.ttl,
                    },
                    &settings,
                    cx.cancel_token(),
                    cx.events(),
                )
                .await?,
            )
        } else {
            None
        };
        store.put_release(&record).await?;
        // Dropped before the outcome is recorded (the node's grace ran out):
        // the record says failed, not deploying.
        let mut guard = RecordGuard {
            store: Some(store.clone()),
            record: record.clone(),
        };
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
        guard.store = None;
        if let Some(lease) = lease {
            let _ = lease.release().await;
        }
        match result {
            Ok(mut report) => {
                // An attempt after a crash (or a retry) finds targets an
                // earlier attempt of this run already switched: what was live
                // before them is the environment's release before this run,
                // not the release they run now, or compensation would leave
                // them on it.
                let history = store.release_history(&env, HISTORY_LIMIT).await?;
                let baseline = baseline_revisions(&history, &record.id);
                for rev in &report.deployed {
                    let here = report.previous.get(&rev.target).cloned().flatten();
                    let already = here.as_ref().is_some_and(|p| p.version == rev.version);
                    if let (true, Some(base)) = (already, baseline.get(&rev.target)) {
                        if base.version != rev.version {
                            report
                                .previous
                                .insert(rev.target.clone(), Some(base.clone()));
                        }
                    }
                }
                report.noop = report.already_live_everywhere();
                let now = Utc::now();
                for mut r in history {
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
        // (see `record_partial_rollback` for a rollback that cannot reach
        // every target)
        let out: DeployOutput = output.parse()?;
        let store = cx.store().clone();
        let dcx = self.context_for(cx);
        if let Err(e) = self
            .strategy_value()
            .rollback(self.deployer.as_ref(), &out.rollout, &dcx)
            .await
        {
            return Err(self.record_partial_rollback(store.as_ref(), &out, e).await);
        }
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
        let history = store
            .release_history(&out.environment, HISTORY_LIMIT)
            .await?;
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
