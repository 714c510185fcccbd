//! The scheduler: runs a pipeline for a release in an environment.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorInfo, ErrorKind, Result};
use crate::event::{Emitter, Event, EventKind, EventSink, RunStatus};
use crate::pipeline::{NodeKind, Pipeline};
use crate::secret::{Redactor, Secret};
use crate::stage::{Outputs, StageContext, StageOutput, Verdict};
use crate::store::{LockAttempt, LockRequest, NodeRecord, NodeStatus, RunRecord, Store};
use crate::types::Release;

/// How failed attempts are retried. Only errors marked retryable
/// ([`Error::is_retryable`]) are retried; the delay doubles (by `multiplier`)
/// from `initial_backoff` up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0 = no retry).
    pub retries: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Longest delay.
    pub max_backoff: Duration,
    /// Growth factor between retries.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        RetryPolicy {
            retries: 0,
            ..Self::default()
        }
    }

    /// `retries` extra attempts starting at `initial_backoff`.
    pub fn exponential(retries: u32, initial_backoff: Duration) -> Self {
        RetryPolicy {
            retries,
            initial_backoff,
            ..Self::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1) as i32);
        let d = self.initial_backoff.as_secs_f64() * factor;
        Duration::from_secs_f64(d.min(self.max_backoff.as_secs_f64()))
    }
}

/// Environment lock settings: one run per environment at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSettings {
    /// Lease duration; a heartbeat renews it every `ttl / 3`. A killed
    /// process's lease lapses after at most this long.
    pub ttl: Duration,
    /// How long to wait for a held lock before giving up.
    pub wait_timeout: Duration,
    /// How often a waiter asks again.
    pub poll_interval: Duration,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            ttl: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// How one node went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// What it is (the stage's or gate's `kind()`).
    pub kind: String,
    /// How it ended.
    pub status: NodeStatus,
    /// Attempts made.
    pub attempts: u32,
    /// Wall time from first start to end.
    pub duration: Option<Duration>,
    /// Why it failed, if it did.
    pub error: Option<ErrorInfo>,
    /// What it produced.
    pub output: Option<serde_json::Value>,
    /// Whether it is a `finally` node.
    pub finally: bool,
}

/// How a run went. `Display` prints a table of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run's id (for `cdctl run show` and `Runner::resume`).
    pub run_id: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The release version.
    pub release: String,
    /// The environment.
    pub environment: String,
    /// How the run ended.
    pub status: RunStatus,
    /// Every node, in topological order.
    pub nodes: Vec<NodeReport>,
    /// Wall time.
    pub duration: Duration,
}

impl RunReport {
    /// A node's report by name.
    pub fn node(&self, name: &str) -> Option<&NodeReport> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A node's output by name.
    pub fn output(&self, name: &str) -> Option<&serde_json::Value> {
        self.node(name).and_then(|n| n.output.as_ref())
    }

    /// `Ok(self)` when the run succeeded, else an error naming the failed node.
    pub fn into_result(self) -> Result<RunReport> {
        if self.status == RunStatus::Succeeded {
            return Ok(self);
        }
        let failed = self
            .nodes
            .iter()
            .find(|n| n.status == NodeStatus::Failed)
            .map(|n| {
                format!(
                    "node `{}` failed: {}",
                    n.name,
                    n.error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("unknown")
                )
            })
            .unwrap_or_else(|| format!("run {}", self.status));
        let kind = if self.status == RunStatus::Cancelled {
            ErrorKind::Cancelled
        } else {
            ErrorKind::Failed
        };
        Err(Error::new(kind, failed).with("run", &self.run_id))
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.as_secs() >= 60 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else if d.as_millis() >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {} · pipeline {} · release {} · env {} · {} in {}",
            self.run_id,
            self.pipeline,
            self.release,
            self.environment,
            self.status,
            fmt_duration(self.duration)
        )?;
        let w_name = self
            .nodes
            .iter()
            .map(|n| n.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w_kind = self
            .nodes
            .iter()
            .map(|n| n.kind.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "  {:<w_name$}  {:<w_kind$}  {:<15}  {:>3}  {:>8}  DETAIL",
            "NODE", "KIND", "STATUS", "TRY", "TIME"
        )?;
        for n in &self.nodes {
            let detail = match (&n.error, n.status) {
                (Some(e), _) => e.message.clone(),
                _ => String::new(),
            };
            let mut detail: String = detail.chars().take(100).collect();
            if detail.len() == 100 {
                detail.push('…');
            }
            writeln!(
                f,
                "  {:<w_name$}  {:<w_kind$}  {:<15}  {:>3}  {:>8}  {}",
                n.name,
                n.kind,
                n.status.as_str(),
                n.attempts,
                n.duration.map(fmt_duration).unwrap_or_else(|| "-".into()),
                detail
            )?;
        }
        Ok(())
    }
}

/// The scheduler. Configure with builder methods, then [`Runner::run`].
///
/// - at most `concurrency` nodes run at once (waiting gates don't count);
/// - each attempt has a timeout (per node, or the runner's default);
/// - retryable errors are retried with exponential backoff ([`RetryPolicy`]);
/// - the cancellation token stops running nodes; `finally` nodes still run;
/// - fail-fast (default on): the first failure cancels running nodes;
/// - compensation: after a failure, completed nodes whose stage can roll
///   back do so, in reverse topological order;
/// - an environment lock (a lease in the store) keeps one run per
///   environment at a time;
/// - every state change is persisted to the [`Store`]; events too.
#[derive(Clone)]
pub struct Runner {
    store: Arc<dyn Store>,
    concurrency: usize,
    default_timeout: Option<Duration>,
    retry: RetryPolicy,
    fail_fast: bool,
    compensate_on_cancel: bool,
    cancel: CancellationToken,
    sinks: Vec<Arc<dyn EventSink>>,
    redactor: Redactor,
    environment: String,
    actor: String,
    lock: Option<LockSettings>,
    spawn_stages: bool,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("concurrency", &self.concurrency)
            .field("default_timeout", &self.default_timeout)
            .field("retry", &self.retry)
            .field("fail_fast", &self.fail_fast)
            .field("environment", &self.environment)
            .field("actor", &self.actor)
            .field("lock", &self.lock)
            .finish()
    }
}

type AttemptFuture = Pin<Box<dyn Future<Output = (usize, Result<Attempt>, Duration)> + Send>>;

enum Attempt {
    Output(StageOutput),
    Verdict(Verdict),
}

#[derive(Clone)]
struct NodeState {
    status: NodeStatus,
    attempts: u32,
    output: Option<StageOutput>,
    error: Option<ErrorInfo>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    recheck_at: Option<DateTime<Utc>>,
}

impl NodeState {
    fn fresh() -> Self {
        NodeState {
            status: NodeStatus::Pending,
            attempts: 0,
            output: None,
            error: None,
            started_at: None,
            finished_at: None,
            recheck_at: None,
        }
    }
}

/// Persists events through the store in batches: events are buffered as they
/// are emitted (no wake-up per event) and written by a background task every
/// 100 ms or every 256 events, and at every [`StoreSink::flush`].
struct StoreSink {
    buf: std::sync::Mutex<Vec<Event>>,
    notify: tokio::sync::Notify,
    store: Arc<dyn Store>,
    // Serialises writes, so batches reach the store in sequence order.
    append: tokio::sync::Mutex<()>,
}

impl EventSink for StoreSink {
    fn emit(&self, event: &Event) {
        let n = {
            let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            buf.push(event.clone());
            buf.len()
        };
        if n == 256 {
            self.notify.notify_one();
        }
    }
}

fn spawn_store_writer(store: Arc<dyn Store>) -> (Arc<StoreSink>, tokio::task::JoinHandle<()>) {
    let sink = Arc::new(StoreSink {
        buf: std::sync::Mutex::new(Vec::new()),
        notify: tokio::sync::Notify::new(),
        store,
        append: tokio::sync::Mutex::new(()),
    });
    let writer = sink.clone();
    let handle = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = writer.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            writer.flush().await;
        }
    });
    (sink, handle)
}

impl StoreSink {
    /// Writes every buffered event.
    async fn flush(&self) {
        let _order = self.append.lock().await;
        let batch = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.append_events(&batch).await {
            tracing::warn!(target: "cd::runner", "could not persist {} events: {e}", batch.len());
        }
    }
}

fn holder_name(actor: &str, run_id: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("{actor}@{host} pid {} run {run_id}", std::process::id())
}

/// What a run starts from: fresh, or restored from the store.
struct Start {
    run: RunRecord,
    states: Vec<NodeState>,
    next_seq: u64,
    resumed: bool,
}

impl Runner {
    /// A runner persisting to `store`, with defaults: concurrency 4, no
    /// default timeout, 2 retries from 500 ms, fail-fast, environment
    /// `default`, environment lock with a 60 s lease.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Runner {
            store,
            concurrency: 4,
            default_timeout: None,
            retry: RetryPolicy::default(),
            fail_fast: true,
            compensate_on_cancel: false,
            cancel: CancellationToken::new(),
            sinks: Vec::new(),
            redactor: Redactor::default(),
            environment: "default".into(),
            actor: std::env::var("USER").unwrap_or_else(|_| "cd".into()),
            lock: Some(LockSettings::default()),
            spawn_stages: true,
        }
    }

    /// Whether each node attempt runs as its own tokio task (default: yes).
    ///
    /// With `false`, attempts are polled by the scheduler's own task: several
    /// times cheaper per node (no spawn, no cross-thread wake-up), but nodes
    /// then share one thread, so a stage that blocks the thread (synchronous
    /// I/O, heavy CPU without `spawn_blocking`) stalls every other node and
    /// the timeouts with it. Use it for pipelines of many small, well-behaved
    /// async stages.
    pub fn spawn_stages(mut self, yes: bool) -> Self {
        self.spawn_stages = yes;
        self
    }

    /// At most `n` nodes run at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Default per-attempt timeout for nodes without their own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = Some(timeout);
        self
    }

    /// Default retry policy for nodes without their own `retries`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Whether the first failure cancels the nodes still running (default
    /// true). Without it, independent branches run to the end.
    pub fn fail_fast(mut self, yes: bool) -> Self {
        self.fail_fast = yes;
        self
    }

    /// Whether a cancelled run compensates its completed nodes (default
    /// false: cancel means stop, not undo).
    pub fn compensate_on_cancel(mut self, yes: bool) -> Self {
        self.compensate_on_cancel = yes;
        self
    }

    /// The token that cancels runs (wire it to Ctrl-C).
    pub fn cancel_token(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// Adds an event sink.
    pub fn sink(mut self, sink: impl EventSink + 'static) -> Self {
        self.sinks.push(Arc::new(sink));
        self
    }

    /// Adds a shared event sink.
    pub fn sink_arc(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Registers a secret: its value is scrubbed from every event, log line,
    /// stored output and error.
    pub fn secret(self, secret: &Secret<String>) -> Self {
        self.redactor.register(secret.expose().clone());
        self
    }

    /// The redactor shared by runs of this runner.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The environment runs deploy to (and lock).
    pub fn environment(mut self, env: impl Into<String>) -> Self {
        self.environment = env.into();
        self
    }

    /// Who starts runs (recorded in the store and in lock holders).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Environment lock settings.
    pub fn lock(mut self, settings: LockSettings) -> Self {
        self.lock = Some(settings);
        self
    }

    /// Runs without taking the environment lock.
    pub fn without_lock(mut self) -> Self {
        self.lock = None;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs `pipeline` for `release`. Returns the report whether the run
    /// succeeded or not; returns `Err` only when the run could not be carried
    /// out (the store failed, the environment lock was not obtained).
    pub async fn run(&self, pipeline: &Pipeline, release: Release) -> Result<RunReport> {
        let run_id = uuid::Uuid::new_v4().to_string();
        let run = RunRecord {
            id: run_id,
            pipeline: pipeline.name().to_string(),
            definition_hash: pipeline.definition_hash().to_string(),
            release,
            environment: self.environment.clone(),
            status: RunStatus::Running,
            started_by: self.actor.clone(),
            started_at: Utc::now(),
            finished_at: None,
        };
        let start = Start {
            run,
            states: vec![NodeState::fresh(); pipeline.len()],
            next_seq: 1,
            resumed: false,
        };
        self.spawn_execution(pipeline, start).await
    }

    /// Resumes a run that was interrupted (its process died): completed
    /// nodes are not run again (their outputs are restored), interrupted
    /// nodes run again, waiting gates keep waiting. The pipeline must have
    /// the same definition hash as the one the run started with.
    ///
    /// The environment lease the dead process held for this run is taken
    /// over at once. Resume a run from one process at a time: stages and
    /// deployers must keep the idempotency contract ([`crate::Stage`]), as an
    /// interrupted node runs again.
    pub async fn resume(&self, run_id: &str, pipeline: &Pipeline) -> Result<RunReport> {
        let run = self.store.get_run(run_id).await?.ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no run with id {run_id}")).with("run", run_id)
        })?;
        if run.definition_hash != pipeline.definition_hash() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "pipeline `{}` changed since run {run_id} started (definition hash {} != {}); \
                     refusing to resume",
                    pipeline.name(),
                    &pipeline.definition_hash()[..12],
                    &run.definition_hash[..run.definition_hash.len().min(12)]
                ),
            )
            .with("run", run_id));
        }
        if run.status != RunStatus::Running {
            return Err(Error::invalid(format!(
                "run {run_id} already finished ({}); nothing to resume",
                run.status
            ))
            .with("run", run_id));
        }
        let mut states = vec![NodeState::fresh(); pipeline.len()];
        for rec in self.store.nodes(run_id).await? {
            let Some(i) = pipeline.index_of(&rec.node) else {
                continue;
            };
            let st = &mut states[i];
            st.attempts = rec.attempts;
            st.started_at = rec.started_at;
            st.status = match rec.status {
                // Interrupted mid-attempt: run again.
                NodeStatus::Running => NodeStatus::Pending,
                s => s,
            };
            if st.status.completed() {
                st.output = Some(StageOutput(rec.output.clone().unwrap_or_default()));
                st.finished_at = rec.finished_at;
            }
            st.error = rec.error;
            st.recheck_at = rec.recheck_at;
        }
        let next_seq = self.store.last_event_seq(run_id).await? + 1;
        // The dead process's lease on this run's environment is this run's
        // own: take it over instead of waiting for it to expire.
        if self.lock.is_some() {
            let ours =
                self.store.locks().await?.into_iter().any(|l| {
                    l.environment == run.environment && l.run_id.as_deref() == Some(run_id)
                });
            if ours {
                self.store
                    .force_unlock_as(
                        &run.environment,
                        &self.actor,
                        &format!("resume of run {run_id}"),
                    )
                    .await?;
            }
        }
        let start = Start {
            run,
            states,
            next_seq,
            resumed: true,
        };
        self.spawn_execution(pipeline, start).await
    }

    /// Runs the execution as its own task, so the scheduler loop and the
    /// stages it spawns share a worker thread (no cross-thread wake-up per
    /// node), wherever the caller's future is polled. Dropping the returned
    /// future aborts the run (its stages are cancelled).
    async fn spawn_execution(&self, pipeline: &Pipeline, start: Start) -> Result<RunReport> {
        let runner = self.clone();
        let pipeline = pipeline.clone();
        let handle = AbortOnDrop(tokio::spawn(async move {
            runner.execute(&pipeline, start).await
        }));
        match handle.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::cancelled().with("reason", e)),
        }
    }

    async fn acquire_lock(
        &self,
        env: &str,
        holder: &str,
        run_id: &str,
        emitter: &Emitter,
    ) -> Result<()> {
        let Some(settings) = &self.lock else {
            return Ok(());
        };
        let req = LockRequest {
            environment: env.to_string(),
            holder: holder.to_string(),
            run_id: Some(run_id.to_string()),
            message: format!("run {run_id}"),
            ttl: settings.ttl,
        };
        let deadline = Instant::now() + settings.wait_timeout;
        let mut announced = false;
        loop {
            match self.store.try_acquire_lock(&req).await? {
                LockAttempt::Acquired(_) => {
                    emitter.emit(EventKind::Lock {
                        environment: env.into(),
                        status: "acquired".into(),
                        message: holder.into(),
                    });
                    return Ok(());
                }
                LockAttempt::Busy(lease) => {
                    let who = lease
                        .as_ref()
                        .map(|l| {
                            format!(
                                "{} since {} ({})",
                                l.holder,
                                l.acquired_at.format("%Y-%m-%d %H:%M:%S UTC"),
                                l.message
                            )
                        })
                        .unwrap_or_else(|| "an earlier waiter".into());
                    if !announced {
                        emitter.emit(EventKind::Lock {
                            environment: env.into(),
                            status: "waiting".into(),
                            message: who.clone(),
                        });
                        announced = true;
                    }
                    if Instant::now() >= deadline {
                        let _ = self.store.release_lock(env, holder).await;
                        return Err(Error::new(
                            ErrorKind::Locked,
                            format!(
                                "environment `{env}` is locked by {who}; gave up after {}",
                                fmt_duration(settings.wait_timeout)
                            ),
                        )
                        .with("environment", env));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(settings.poll_interval) => {}
                        _ = self.cancel.cancelled() => {
                            let _ = self.store.release_lock(env, holder).await;
                            return Err(Error::cancelled().with("environment", env));
                        }
                    }
                }
            }
        }
    }

    async fn execute(&self, pipeline: &Pipeline, start: Start) -> Result<RunReport> {
        let Start {
            mut run,
            mut states,
            next_seq,
            resumed,
        } = start;
        let t0 = Instant::now();
        let (store_sink, writer) = spawn_store_writer(self.store.clone());
        let mut sinks = self.sinks.clone();
        sinks.push(store_sink.clone());
        let emitter = Emitter::new(run.id.clone(), next_seq, sinks, self.redactor.clone());
        let env = run.environment.clone();
        let holder = holder_name(&self.actor, &run.id);

        // The run's own token: cancelled by the user's token, by fail-fast,
        // by a lost lock, or when this future is dropped.
        let run_cancel = self.cancel.child_token();
        let _guard = run_cancel.clone().drop_guard();

        self.acquire_lock(&env, &holder, &run.id, &emitter).await?;
        let heartbeat = self.lock.as_ref().map(|settings| {
            let store = self.store.clone();
            let (env, holder, ttl) = (env.clone(), holder.clone(), settings.ttl);
            let emitter = emitter.clone();
            let run_cancel = run_cancel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if let Err(e) = store.renew_lock(&env, &holder, ttl).await {
                        emitter.emit(EventKind::Lock {
                            environment: env.clone(),
                            status: "lost".into(),
                            message: e.to_string(),
                        });
                        run_cancel.cancel();
                        break;
                    }
                }
            })
        });

        let result = async {
            if resumed {
                emitter.emit(EventKind::RunResumed);
            } else {
                self.store.create_run(&run).await?;
                emitter.emit(EventKind::RunStarted {
                    pipeline: run.pipeline.clone(),
                    release: run.release.version.clone(),
                    environment: env.clone(),
                });
            }
            let mut exec = Execution {
                runner: self,
                pipeline,
                states: &mut states,
                emitter: emitter.clone(),
                outputs: Outputs::default(),
                release: Arc::new(run.release.clone()),
                run_cancel: run_cancel.clone(),
                dirty: Vec::new(),
                records: Vec::new(),
                names: pipeline
                    .nodes()
                    .iter()
                    .map(|n| Arc::from(n.name.as_str()))
                    .collect(),
                ids: (
                    Arc::from(run.id.as_str()),
                    Arc::from(run.pipeline.as_str()),
                    Arc::from(run.environment.as_str()),
                ),
            };
            exec.restore_outputs();
            let status = exec.main_loop().await?;
            exec.compensate(status).await?;
            exec.run_finally(status).await?;
            Ok::<RunStatus, Error>(status)
        }
        .await;

        if let Some(h) = heartbeat {
            h.abort();
        }
        let status = match result {
            Ok(status) => status,
            Err(e) => {
                run_cancel.cancel();
                if self.lock.is_some() {
                    let _ = self.store.release_lock(&env, &holder).await;
                }
                store_sink.flush().await;
                writer.abort();
                return Err(e);
            }
        };
        run.status = status;
        run.finished_at = Some(Utc::now());
        self.store
            .set_run_status(&run.id, status, run.finished_at)
            .await?;
        emitter.emit(EventKind::RunFinished { status });
        if self.lock.is_some() {
            self.store.release_lock(&env, &holder).await?;
            emitter.emit(EventKind::Lock {
                environment: env.clone(),
                status: "released".into(),
                message: holder.clone(),
            });
        }
        store_sink.flush().await;
        writer.abort();

        let nodes = pipeline
            .topological_order()
            .iter()
            .map(|&i| {
                let spec = &pipeline.nodes()[i];
                let st = &states[i];
                let duration = match (st.started_at, st.finished_at) {
                    (Some(a), Some(b)) => (b - a).to_std().ok(),
                    _ => None,
                };
                NodeReport {
                    name: spec.name.clone(),
                    kind: spec.kind.describe(),
                    status: st.status,
                    attempts: st.attempts,
                    duration,
                    error: st.error.clone(),
                    output: st.output.as_ref().map(|o| o.0.clone()),
                    finally: spec.finally,
                }
            })
            .collect();
        Ok(RunReport {
            run_id: run.id.clone(),
            pipeline: run.pipeline.clone(),
            release: run.release.version.clone(),
            environment: env,
            status,
            nodes,
            duration: t0.elapsed(),
        })
    }
}

/// One run in progress.
struct Execution<'a> {
    runner: &'a Runner,
    pipeline: &'a Pipeline,
    states: &'a mut Vec<NodeState>,
    emitter: Emitter,
    outputs: Outputs,
    release: Arc<Release>,
    run_cancel: CancellationToken,
    dirty: Vec<usize>,
    /// Reused buffer for [`Execution::flush`].
    records: Vec<NodeRecord>,
    /// Node names, shared with every context and event.
    names: Vec<Arc<str>>,
    /// Run id, pipeline name, environment.
    ids: (Arc<str>, Arc<str>, Arc<str>),
}

impl Execution<'_> {
    fn restore_outputs(&mut self) {
        for (i, st) in self.states.iter().enumerate() {
            if st.status.completed() {
                if let Some(o) = &st.output {
                    self.outputs.insert(self.names[i].clone(), o.clone());
                }
            }
        }
    }

    fn context(
        &self,
        i: usize,
        cancel: CancellationToken,
        outcome: Option<RunStatus>,
    ) -> StageContext {
        let name = &self.names[i];
        StageContext {
            run_id: self.ids.0.clone(),
            pipeline: self.ids.1.clone(),
            node: name.clone(),
            attempt: self.states[i].attempts,
            release: self.release.clone(),
            environment: self.ids.2.clone(),
            outputs: self.outputs.clone(),
            outcome,
            emitter: self.emitter.for_node_arc(name.clone()),
            cancel,
            store: self.runner.store.clone(),
        }
    }

    /// Writes node `i` now.
    async fn persist(&self, i: usize) -> Result<()> {
        self.runner.store.put_node(&self.record(i)).await
    }

    /// Marks node `i` to be written by the next [`Execution::flush`]: the
    /// hot path batches writes, and flushes before any dependent starts.
    fn mark_dirty(&mut self, i: usize) {
        self.dirty.push(i);
    }

    /// Writes every node marked dirty, in one store call.
    async fn flush(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let mut records = std::mem::take(&mut self.records);
        records.extend(dirty.iter().map(|&i| self.record(i)));
        dirty.clear();
        self.dirty = dirty;
        let result = self.runner.store.put_nodes(&records).await;
        records.clear();
        self.records = records;
        result
    }

    fn record(&self, i: usize) -> NodeRecord {
        let st = &self.states[i];
        let redactor = self.emitter.redactor();
        let output = st.output.as_ref().map(|o| {
            let mut v = o.0.clone();
            redactor.scrub_json(&mut v);
            v
        });
        let error = st.error.clone().map(|mut e| {
            if !redactor.is_empty() {
                e.message = redactor.scrub(&e.message);
            }
            e
        });
        NodeRecord {
            run_id: self.ids.0.clone(),
            node: self.names[i].clone(),
            status: st.status,
            attempts: st.attempts,
            output,
            error,
            started_at: st.started_at,
            finished_at: st.finished_at,
            recheck_at: st.recheck_at,
        }
    }

    /// Marks node `i` running (a new attempt), to be written by the next
    /// flush; [`Execution::launch`] then starts the attempt.
    fn begin(&mut self, i: usize) {
        let st = &mut self.states[i];
        st.attempts += 1;
        st.status = NodeStatus::Running;
        st.recheck_at = None;
        if st.started_at.is_none() {
            st.started_at = Some(Utc::now());
        }
        self.mark_dirty(i);
    }

    /// Starts the attempt [`Execution::begin`] recorded.
    fn launch(
        &mut self,
        i: usize,
        cancel: CancellationToken,
        outcome: Option<RunStatus>,
    ) -> AttemptFuture {
        let attempt = self.states[i].attempts;
        let spec = &self.pipeline.nodes()[i];
        let kind = spec.kind.clone();
        let timeout = spec.timeout.or(self.runner.default_timeout);
        let cx = self.context(i, cancel, outcome);
        cx.emitter.emit(EventKind::NodeStarted { attempt });
        let attempt_fut = async move {
            let t = Instant::now();
            let work = async {
                match &kind {
                    NodeKind::Stage(s) => s.run(&cx).await.map(Attempt::Output),
                    NodeKind::Gate(g) => g.evaluate(&cx).await.map(Attempt::Verdict),
                }
            };
            let timed = async {
                match timeout {
                    Some(d) => match tokio::time::timeout(d, work).await {
                        Ok(r) => r,
                        Err(_) => {
                            cx.emitter.emit(EventKind::NodeTimedOut {
                                timeout_ms: d.as_millis() as u64,
                            });
                            Err(Error::new(
                                ErrorKind::Timeout,
                                format!("timed out after {}", fmt_duration(d)),
                            ))
                        }
                    },
                    None => work.await,
                }
            };
            let result = tokio::select! {
                biased;
                _ = cx.cancel.cancelled() => Err(Error::cancelled()),
                r = timed => r,
            };
            (result, t.elapsed())
        };
        if !self.runner.spawn_stages {
            // Polled by the scheduler's own task: no spawn, no wake-up of
            // another worker. A panic is caught and reported as a failure.
            return Box::pin(async move {
                match std::panic::AssertUnwindSafe(attempt_fut)
                    .catch_unwind()
                    .await
                {
                    Ok((r, d)) => (i, r, d),
                    Err(_) => (
                        i,
                        Err(Error::failed("stage panicked").retryable(false)),
                        Duration::ZERO,
                    ),
                }
            });
        }
        let handle = tokio::spawn(attempt_fut);
        Box::pin(async move {
            match handle.await {
                Ok((r, d)) => (i, r, d),
                Err(join) => (
                    i,
                    Err(Error::failed(format!("stage panicked: {join}")).retryable(false)),
                    Duration::ZERO,
                ),
            }
        })
    }

    fn mark_skipped(&mut self, i: usize, reason: &str) -> bool {
        let st = &mut self.states[i];
        if matches!(st.status, NodeStatus::Pending | NodeStatus::Waiting) {
            st.status = NodeStatus::Skipped;
            st.recheck_at = None;
            self.emitter.emit_for(
                Some(&self.pipeline.nodes()[i].name),
                EventKind::NodeSkipped {
                    reason: reason.to_string(),
                },
            );
            return true;
        }
        false
    }

    async fn main_loop(&mut self) -> Result<RunStatus> {
        let n = self.pipeline.len();
        let mut remaining = vec![0usize; n];
        let mut ready: VecDeque<usize> = VecDeque::new();
        let mut timers: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
        let mut running: FuturesUnordered<AttemptFuture> = FuturesUnordered::new();
        let mut starting: Vec<usize> = Vec::new();
        let mut done = Vec::new();
        let mut failed = false;
        let mut stopping = false;
        let mut cancelled = false;

        for &i in self.pipeline.topological_order() {
            if self.pipeline.nodes()[i].finally {
                continue;
            }
            remaining[i] = self
                .pipeline
                .deps_of(i)
                .iter()
                .filter(|&&d| !self.states[d].status.completed())
                .count();
            let st = &self.states[i];
            match st.status {
                NodeStatus::Pending if remaining[i] == 0 => ready.push_back(i),
                NodeStatus::Waiting => {
                    let wait = st
                        .recheck_at
                        .and_then(|t| (t - Utc::now()).to_std().ok())
                        .unwrap_or_default();
                    timers.push(Reverse((Instant::now() + wait, i)));
                }
                NodeStatus::Failed | NodeStatus::Cancelled => failed = true,
                _ => {}
            }
        }
        if failed {
            // Resumed after a failure: go straight to compensation.
            stopping = true;
            ready.clear();
            timers.clear();
        }

        let cancel_token = self.run_cancel.clone();
        let cancelled_fut = cancel_token.cancelled();
        tokio::pin!(cancelled_fut);
        loop {
            // Completions and starts are written in one batch, before any
            // of the starting attempts (which may depend on them) runs.
            while !stopping && running.len() + starting.len() < self.runner.concurrency {
                let Some(i) = ready.pop_front() else { break };
                self.begin(i);
                starting.push(i);
            }
            self.flush().await?;
            for i in starting.drain(..) {
                running.push(self.launch(i, self.run_cancel.clone(), None));
            }
            if running.is_empty() && (timers.is_empty() || stopping) {
                break;
            }
            let next_timer = timers.peek().map(|Reverse((t, _))| *t);
            tokio::select! {
                Some(first) = running.next() => {
                    // Take every attempt that is already done, then persist them together.
                    done.push(first);
                    while let Some(Some(more)) = running.next().now_or_never() {
                        done.push(more);
                    }
                    for (i, result, elapsed) in done.drain(..) {
                        self.finish_attempt(i, result, elapsed, &mut ready, &mut timers, &mut remaining, &mut failed).await?;
                        if failed && !stopping && self.runner.fail_fast {
                            stopping = true;
                            self.run_cancel.cancel();
                        }
                    }
                }
                _ = sleep_until_opt(next_timer), if next_timer.is_some() => {
                    let now = Instant::now();
                    while let Some(Reverse((t, i))) = timers.peek().copied() {
                        if t > now { break; }
                        timers.pop();
                        ready.push_front(i);
                    }
                }
                _ = &mut cancelled_fut, if !stopping => {
                    stopping = true;
                    if !failed {
                        cancelled = true;
                    }
                }
            }
        }

        self.flush().await?;
        // Whatever did not run.
        let reason = if cancelled {
            "run cancelled".to_string()
        } else {
            "run stopped after a failure".to_string()
        };
        for i in 0..n {
            if !self.pipeline.nodes()[i].finally && self.mark_skipped(i, &reason) {
                self.persist(i).await?;
            }
        }
        Ok(if failed {
            RunStatus::Failed
        } else if cancelled || self.runner.cancel.is_cancelled() {
            RunStatus::Cancelled
        } else {
            RunStatus::Succeeded
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish_attempt(
        &mut self,
        i: usize,
        result: Result<Attempt>,
        elapsed: Duration,
        ready: &mut VecDeque<usize>,
        timers: &mut BinaryHeap<Reverse<(Instant, usize)>>,
        remaining: &mut [usize],
        failed: &mut bool,
    ) -> Result<()> {
        let spec = &self.pipeline.nodes()[i];
        let retries = spec.retries.unwrap_or(self.runner.retry.retries);
        let name = self.names[i].clone();
        let ev = self.emitter.for_node_arc(name.clone());
        match result {
            Ok(Attempt::Output(out)) => self.succeed(i, out, elapsed, remaining, ready).await,
            Ok(Attempt::Verdict(Verdict::Pass)) => {
                ev.emit(EventKind::GatePassed);
                self.succeed(i, StageOutput::empty(), elapsed, remaining, ready)
                    .await
            }
            Ok(Attempt::Verdict(Verdict::Wait {
                recheck_after,
                reason,
            })) => {
                let st = &mut self.states[i];
                st.status = NodeStatus::Waiting;
                st.recheck_at = Some(
                    Utc::now()
                        + chrono::Duration::from_std(recheck_after)
                            .unwrap_or(chrono::Duration::zero()),
                );
                ev.emit(EventKind::GateWaiting {
                    reason,
                    recheck_after_ms: recheck_after.as_millis() as u64,
                });
                timers.push(Reverse((Instant::now() + recheck_after, i)));
                self.persist(i).await
            }
            Ok(Attempt::Verdict(Verdict::Fail(reason))) => {
                ev.emit(EventKind::GateFailed {
                    reason: reason.clone(),
                });
                let err = Error::failed(format!("gate failed: {reason}")).with("node", &name);
                self.fail(i, err, failed).await
            }
            Err(e) if e.kind() == ErrorKind::Cancelled && self.run_cancel.is_cancelled() => {
                let st = &mut self.states[i];
                st.status = NodeStatus::Cancelled;
                st.finished_at = Some(Utc::now());
                ev.emit(EventKind::NodeCancelled);
                self.persist(i).await
            }
            Err(e) => {
                let e = e.with("node", &name);
                let attempts = self.states[i].attempts;
                if e.is_retryable() && attempts <= retries && !self.run_cancel.is_cancelled() {
                    let delay = self.runner.retry.delay(attempts);
                    ev.emit(EventKind::NodeRetrying {
                        attempt: attempts,
                        delay_ms: delay.as_millis() as u64,
                        error: e.to_info(),
                    });
                    let st = &mut self.states[i];
                    st.status = NodeStatus::Pending;
                    st.error = Some(e.to_info());
                    timers.push(Reverse((Instant::now() + delay, i)));
                    self.persist(i).await
                } else {
                    self.fail(i, e, failed).await
                }
            }
        }
    }

    async fn succeed(
        &mut self,
        i: usize,
        out: StageOutput,
        elapsed: Duration,
        remaining: &mut [usize],
        ready: &mut VecDeque<usize>,
    ) -> Result<()> {
        let name = self.names[i].clone();
        self.outputs.insert(name.clone(), out.clone());
        let st = &mut self.states[i];
        st.status = NodeStatus::Succeeded;
        st.finished_at = Some(Utc::now());
        st.error = None;
        st.output = Some(out);
        self.mark_dirty(i);
        self.emitter
            .for_node_arc(name)
            .emit(EventKind::NodeSucceeded {
                duration_ms: elapsed.as_millis() as u64,
            });
        for &j in self.pipeline.dependents_of(i) {
            remaining[j] = remaining[j].saturating_sub(1);
            if remaining[j] == 0 && self.states[j].status == NodeStatus::Pending {
                ready.push_back(j);
            }
        }
        Ok(())
    }

    async fn fail(&mut self, i: usize, err: Error, failed: &mut bool) -> Result<()> {
        let name = self.pipeline.nodes()[i].name.clone();
        let st = &mut self.states[i];
        st.status = NodeStatus::Failed;
        st.finished_at = Some(Utc::now());
        st.error = Some(err.to_info());
        self.persist(i).await?;
        self.emitter.emit_for(
            Some(&name),
            EventKind::NodeFailed {
                error: err.to_info(),
            },
        );
        if self.pipeline.nodes()[i].finally {
            return Ok(());
        }
        *failed = true;
        // Descendants never run.
        let reason = format!("needs `{name}`, which failed");
        let mut stack: Vec<usize> = self.pipeline.dependents_of(i).to_vec();
        while let Some(j) = stack.pop() {
            if self.mark_skipped(j, &reason) {
                self.persist(j).await?;
                stack.extend_from_slice(self.pipeline.dependents_of(j));
            }
        }
        Ok(())
    }

    async fn compensate(&mut self, status: RunStatus) -> Result<()> {
        let wanted = status == RunStatus::Failed
            || (status == RunStatus::Cancelled && self.runner.compensate_on_cancel);
        if !wanted {
            return Ok(());
        }
        let order: Vec<usize> = self
            .pipeline
            .topological_order()
            .iter()
            .rev()
            .copied()
            .filter(|&i| !self.pipeline.nodes()[i].finally)
            .collect();
        for i in order {
            if self.states[i].status != NodeStatus::Succeeded {
                continue;
            }
            let spec = &self.pipeline.nodes()[i];
            let NodeKind::Stage(stage) = spec.kind.clone() else {
                continue;
            };
            if !stage.capabilities().rollback {
                continue;
            }
            let timeout = spec.timeout.or(self.runner.default_timeout);
            let cx = self.context(i, CancellationToken::new(), Some(status));
            cx.emitter.emit(EventKind::RollbackStarted);
            let output = self.states[i].output.clone().unwrap_or_default();
            let t = Instant::now();
            let res = match timeout {
                Some(d) => tokio::time::timeout(d, stage.rollback(&cx, &output))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::new(
                            ErrorKind::Timeout,
                            format!("rollback timed out after {}", fmt_duration(d)),
                        ))
                    }),
                None => stage.rollback(&cx, &output).await,
            };
            match res {
                Ok(()) => {
                    self.states[i].status = NodeStatus::RolledBack;
                    cx.emitter.emit(EventKind::RolledBack {
                        duration_ms: t.elapsed().as_millis() as u64,
                    });
                }
                Err(e) => {
                    let e = e.with("node", &spec.name);
                    self.states[i].status = NodeStatus::RollbackFailed;
                    self.states[i].error = Some(e.to_info());
                    cx.emitter
                        .emit(EventKind::RollbackFailed { error: e.to_info() });
                }
            }
            self.persist(i).await?;
        }
        Ok(())
    }

    async fn run_finally(&mut self, status: RunStatus) -> Result<()> {
        let finals: Vec<usize> = self
            .pipeline
            .topological_order()
            .iter()
            .copied()
            .filter(|&i| self.pipeline.nodes()[i].finally)
            .collect();
        for i in finals {
            if self.states[i].status.completed() {
                continue;
            }
            loop {
                // Finally nodes run even after cancellation: a fresh token.
                self.begin(i);
                self.flush().await?;
                let fut = self.launch(i, CancellationToken::new(), Some(status));
                let (_, result, elapsed) = fut.await;
                let mut ready = VecDeque::new();
                let mut timers = BinaryHeap::new();
                let mut remaining = vec![0usize; self.pipeline.len()];
                let mut failed = false;
                self.finish_attempt(
                    i,
                    result,
                    elapsed,
                    &mut ready,
                    &mut timers,
                    &mut remaining,
                    &mut failed,
                )
                .await?;
                self.flush().await?;
                match timers.pop() {
                    Some(Reverse((t, _))) => tokio::time::sleep_until(t.into()).await,
                    None => break,
                }
            }
        }
        Ok(())
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => futures::future::pending().await,
    }
}
