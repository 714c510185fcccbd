//! Stages and gates: the nodes of a pipeline.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::event::{Emitter, LogLevel};
use crate::secret::Redactor;
use crate::store::Store;
use crate::types::Release;

/// What a node produced: a JSON value that downstream nodes read by the
/// producing node's name ([`StageContext::output`]).
///
/// ```
/// use cd_core::StageOutput;
/// let out = StageOutput::json(serde_json::json!({"url": "http://127.0.0.1:8080"}));
/// assert_eq!(out.get_str("url"), Some("http://127.0.0.1:8080"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageOutput(pub serde_json::Value);

impl StageOutput {
    /// No output.
    pub fn empty() -> Self {
        StageOutput(serde_json::Value::Null)
    }

    /// An output from a JSON value.
    pub fn json(value: serde_json::Value) -> Self {
        StageOutput(value)
    }

    /// An output from any serializable value.
    pub fn from_serialize<T: Serialize>(value: &T) -> Result<Self> {
        Ok(StageOutput(serde_json::to_value(value)?))
    }

    /// Deserializes the output into `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_value(self.0.clone())?)
    }

    /// A field of an object output.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)
    }

    /// A string field of an object output.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }

    /// The JSON value.
    pub fn value(&self) -> &serde_json::Value {
        &self.0
    }
}

/// Outputs of completed nodes, shared by every node of a run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outputs(Arc<RwLock<HashMap<Arc<str>, StageOutput>>>);

impl Outputs {
    pub(crate) fn from_map(map: BTreeMap<String, StageOutput>) -> Self {
        let map = map.into_iter().map(|(k, v)| (Arc::from(k), v)).collect();
        Outputs(Arc::new(RwLock::new(map)))
    }
    pub(crate) fn get(&self, node: &str) -> Option<StageOutput> {
        self.0.read().ok().and_then(|m| m.get(node).cloned())
    }
    pub(crate) fn insert(&self, node: Arc<str>, output: StageOutput) {
        if let Ok(mut m) = self.0.write() {
            m.insert(node, output);
        }
    }
    pub(crate) fn snapshot(&self) -> BTreeMap<String, StageOutput> {
        self.0
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// What a stage can do beyond running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// [`Stage::rollback`] undoes the stage; the runner compensates with it.
    pub rollback: bool,
    /// Running the stage twice has the effect of running it once (safe to
    /// re-run after a crash or a retry).
    pub idempotent: bool,
}

impl Capabilities {
    /// A check: safe to run again, nothing to undo (tests, probes,
    /// analyses, plans).
    pub const CHECK: Capabilities = Capabilities {
        rollback: false,
        idempotent: true,
    };
}

/// Everything a node sees while it runs.
#[derive(Clone)]
pub struct StageContext {
    pub(crate) run_id: Arc<str>,
    pub(crate) pipeline: Arc<str>,
    pub(crate) node: Arc<str>,
    pub(crate) attempt: u32,
    pub(crate) release: Arc<Release>,
    pub(crate) environment: Arc<str>,
    pub(crate) outputs: Outputs,
    pub(crate) outcome: Option<crate::event::RunStatus>,
    pub(crate) emitter: Emitter,
    pub(crate) cancel: CancellationToken,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) actor: Arc<str>,
    pub(crate) definition_hash: Arc<str>,
}

impl fmt::Debug for StageContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageContext")
            .field("run_id", &self.run_id)
            .field("pipeline", &self.pipeline)
            .field("node", &self.node)
            .field("attempt", &self.attempt)
            .field("release", &self.release.version)
            .field("environment", &self.environment)
            .finish()
    }
}

impl StageContext {
    /// Builds a context by hand: for unit tests of a stage, or for running a
    /// stage outside a [`crate::Runner`].
    pub fn detached(node: &str, release: Release, store: Arc<dyn Store>) -> Self {
        StageContext {
            run_id: Arc::from("detached"),
            pipeline: Arc::from("detached"),
            node: Arc::from(node),
            attempt: 1,
            release: Arc::new(release),
            environment: Arc::from("default"),
            outputs: Outputs::default(),
            outcome: None,
            emitter: Emitter::noop().for_node(node),
            cancel: CancellationToken::new(),
            store,
            actor: Arc::from(""),
            definition_hash: Arc::from(""),
        }
    }

    /// Sets who started the run (see [`StageContext::actor`]).
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Arc::from(actor.into());
        self
    }

    /// Sets the pipeline's definition hash (see
    /// [`StageContext::definition_hash`]).
    pub fn with_definition_hash(mut self, hash: impl Into<String>) -> Self {
        self.definition_hash = Arc::from(hash.into());
        self
    }

    /// Who started the run ([`crate::Runner::actor`]; empty in a detached
    /// context). Approval gates keep this person from approving their own
    /// run.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The hash of the pipeline definition the run executes
    /// ([`crate::Pipeline::definition_hash`]; empty in a detached context).
    /// A decision recorded for one definition never counts for another.
    pub fn definition_hash(&self) -> &str {
        &self.definition_hash
    }

    /// Replaces the emitter (for tests that collect events).
    pub fn with_emitter(mut self, emitter: Emitter) -> Self {
        self.emitter = emitter.for_node(&self.node);
        self
    }

    /// Replaces the outputs visible to the stage.
    pub fn with_outputs(mut self, outputs: BTreeMap<String, StageOutput>) -> Self {
        self.outputs = Outputs::from_map(outputs);
        self
    }

    /// Sets the environment.
    pub fn with_environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = Arc::from(environment.into());
        self
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The pipeline's name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The release being delivered.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// The run's environment.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// The output of a completed node, by name.
    pub fn output(&self, node: &str) -> Option<StageOutput> {
        self.outputs.get(node)
    }

    /// The output of a completed node, or an error naming it.
    pub fn require_output(&self, node: &str) -> Result<StageOutput> {
        self.output(node).ok_or_else(|| {
            Error::invalid(format!("no output from node `{node}`")).with("node", &self.node)
        })
    }

    /// All outputs of completed nodes.
    pub fn outputs(&self) -> BTreeMap<String, StageOutput> {
        self.outputs.snapshot()
    }

    /// For `finally` nodes: how the run went (before the finally nodes ran).
    pub fn run_outcome(&self) -> Option<crate::event::RunStatus> {
        self.outcome
    }

    /// Emits events attributed to this node.
    pub fn events(&self) -> &Emitter {
        &self.emitter
    }

    /// Emits an info log line.
    pub fn log(&self, message: impl Into<String>) {
        self.emitter.log(LogLevel::Info, message)
    }

    /// The run's cancellation token: long work should stop when it fires.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the run was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Sleeps, returning an error early if the run is cancelled.
    pub async fn sleep(&self, d: Duration) -> Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.cancel.cancelled() => Err(Error::cancelled().with("node", &self.node)),
        }
    }

    /// The run's store (approvals, release history).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The redactor: register secrets the stage learns while running.
    pub fn redactor(&self) -> &Redactor {
        self.emitter.redactor()
    }

    /// A [`crate::DeployContext`] for calling deployers from this stage.
    pub fn deploy_context(&self) -> crate::DeployContext {
        crate::DeployContext::new(self.emitter.clone(), self.cancel.clone(), &self.environment)
    }
}

/// A unit of work in a pipeline.
///
/// Implementations are values: build them, test them, wrap them. A stage that
/// can undo itself says so in [`Stage::capabilities`] and implements
/// [`Stage::rollback`]; the runner then compensates it when a later node fails.
///
/// **Idempotency contract**: after a crash the runner runs an interrupted
/// stage again. A stage must either be idempotent (say so in its
/// capabilities) or reconcile: look at the world first (a deployer reads
/// `current()`) and only do what is missing.
///
/// **Cancellation model** (cooperative first, then forced):
/// 1. When the node's timeout fires, or the run is cancelled (the user's
///    token, fail-fast after another node failed, a lost environment lock,
///    the run future being dropped), the token of
///    [`StageContext::cancel_token`] fires. Nothing is dropped yet.
/// 2. The stage then has the node's *grace period*
///    ([`crate::PipelineBuilder::grace`], default [`crate::Runner::grace`],
///    60 s) to stop: revert what it half did (a rollout strategy reverts the
///    targets it switched), interrupt its tools and wait for them. Clean-up
///    work must not itself stop at the fired token: use a fresh one
///    ([`crate::DeployContext::for_cleanup`]).
/// 3. Only when the grace period is over is the stage's future dropped.
///    Tools it started must not outlive that: backends kill their process
///    groups on drop.
///
/// The report says which happened: a timeout is [`crate::ErrorKind::Timeout`]
/// (not retried unless the node opts in with `retry_on_timeout`), a
/// cancellation [`crate::ErrorKind::Cancelled`]; the message carries what the
/// stage said while stopping ("3 switched target(s) rolled back: t1, t2,
/// t3") and whether it had to be abandoned after the grace period. A stage
/// that still returns `Ok` after its timeout has its output kept, but the
/// node fails, so the runner's compensation can undo its work.
#[async_trait]
pub trait Stage: Send + Sync + 'static {
    /// A short description of what the stage is (`deploy(local)`, `http-check`).
    fn kind(&self) -> String {
        "stage".to_string()
    }

    /// What the stage can do beyond running.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// What the stage does, for [`crate::Pipeline::definition_hash`]: every
    /// setting that changes its behaviour (URLs, thresholds, strategy steps,
    /// approvers), deterministic across processes. A run is resumed only
    /// with a pipeline of the same hash. Default: [`Stage::kind`].
    fn fingerprint(&self) -> String {
        self.kind()
    }

    /// Checks the stage's configuration; [`crate::Pipeline`]'s `build()`
    /// calls it and refuses the pipeline with
    /// [`crate::PipelineError::InvalidNode`] naming the node. Default: valid.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Does the work.
    async fn run(&self, cx: &StageContext) -> Result<StageOutput>;

    /// Undoes the work, given what [`Stage::run`] returned.
    async fn rollback(&self, cx: &StageContext, output: &StageOutput) -> Result<()> {
        let _ = output;
        Err(Error::unsupported("this stage cannot roll back").with("node", cx.node()))
    }
}

/// What a gate decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Go on.
    Pass,
    /// Stop the run.
    Fail(String),
    /// Ask again later. The runner holds no thread meanwhile, and a waiting
    /// gate survives a restart.
    Wait {
        /// When to ask again. Any value is accepted: waits longer than
        /// [`crate::clock::MAX_HORIZON`] (100 years) are clamped to it.
        #[serde(with = "duration_ms")]
        recheck_after: Duration,
        /// Why it waits (shown to people: "waiting for approval by alice or bob").
        reason: String,
    },
}

impl Verdict {
    /// A `Wait` verdict.
    pub fn wait(recheck_after: Duration, reason: impl Into<String>) -> Self {
        Verdict::Wait {
            recheck_after,
            reason: reason.into(),
        }
    }

    /// A `Fail` verdict.
    pub fn fail(reason: impl Into<String>) -> Self {
        Verdict::Fail(reason.into())
    }
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::clock::millis(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// A check that decides whether the run may go on: approvals, freeze windows,
/// policies, metric thresholds.
#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// A short description of what the gate is (`approval`, `policy`).
    fn kind(&self) -> String {
        "gate".to_string()
    }

    /// What the gate does, for the definition hash (see
    /// [`Stage::fingerprint`]). Default: [`Gate::kind`].
    fn fingerprint(&self) -> String {
        self.kind()
    }

    /// Checks the gate's configuration at pipeline build time (see
    /// [`Stage::validate`]). Default: valid.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Decides. Called again after `recheck_after` while it says `Wait`.
    /// Rechecks are not attempts: the report counts them apart and shows the
    /// time waited. The gate sees the same cancellation model as a stage
    /// ([`Stage`]).
    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict>;
}

/// A stage made from an async closure.
///
/// ```
/// use cd_core::{stage_fn, StageOutput};
/// let hello = stage_fn(|cx| async move {
///     cx.log("hello");
///     Ok(StageOutput::json(serde_json::json!({"greeted": true})))
/// });
/// # let _ = hello;
/// ```
pub fn stage_fn<F, Fut>(f: F) -> FnStage<F>
where
    F: Fn(StageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StageOutput>> + Send + 'static,
{
    FnStage(f)
}

/// A stage made from an async closure; see [`stage_fn`].
pub struct FnStage<F>(F);

#[async_trait]
impl<F, Fut> Stage for FnStage<F>
where
    F: Fn(StageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StageOutput>> + Send + 'static,
{
    fn kind(&self) -> String {
        "fn".into()
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        (self.0)(cx.clone()).await
    }
}

/// A gate made from an async closure.
pub fn gate_fn<F, Fut>(f: F) -> FnGate<F>
where
    F: Fn(StageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Verdict>> + Send + 'static,
{
    FnGate(f)
}

/// A gate made from an async closure; see [`gate_fn`].
pub struct FnGate<F>(F);

#[async_trait]
impl<F, Fut> Gate for FnGate<F>
where
    F: Fn(StageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Verdict>> + Send + 'static,
{
    fn kind(&self) -> String {
        "fn-gate".into()
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        (self.0)(cx.clone()).await
    }
}
