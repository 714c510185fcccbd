//! The durable record of runs: the `Store` trait and `MemoryStore`.
//!
//! A store keeps runs, node states and outputs, append-only events,
//! approvals, environment locks (leases) and release history per
//! environment. [`MemoryStore`] lives here; SQLite (embedded default) and
//! Postgres live in `cd-backends`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorInfo, Result};
use crate::event::{Event, RunStatus};
use crate::incident::{DeliveryRecord, IncidentRecord};
use crate::types::{Release, Revision};

/// One run of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique id.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Hash of the pipeline's definition (nodes, edges, kinds, settings).
    pub definition_hash: String,
    /// What is delivered.
    pub release: Release,
    /// The environment.
    pub environment: String,
    /// How it stands.
    pub status: RunStatus,
    /// Who started it.
    pub started_by: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Not started.
    Pending,
    /// Running now (or interrupted by a crash).
    Running,
    /// A gate that said wait.
    Waiting,
    /// Done.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Not run (upstream failure, cancellation).
    Skipped,
    /// Cancelled while running.
    Cancelled,
    /// Succeeded, then compensated.
    RolledBack,
    /// Succeeded, then compensation failed.
    RollbackFailed,
}

impl NodeStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Pending => "pending",
            NodeStatus::Running => "running",
            NodeStatus::Waiting => "waiting",
            NodeStatus::Succeeded => "succeeded",
            NodeStatus::Failed => "failed",
            NodeStatus::Skipped => "skipped",
            NodeStatus::Cancelled => "cancelled",
            NodeStatus::RolledBack => "rolled_back",
            NodeStatus::RollbackFailed => "rollback_failed",
        }
    }

    /// Parses [`NodeStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => NodeStatus::Pending,
            "running" => NodeStatus::Running,
            "waiting" => NodeStatus::Waiting,
            "succeeded" => NodeStatus::Succeeded,
            "failed" => NodeStatus::Failed,
            "skipped" => NodeStatus::Skipped,
            "cancelled" => NodeStatus::Cancelled,
            "rolled_back" => NodeStatus::RolledBack,
            "rollback_failed" => NodeStatus::RollbackFailed,
            _ => return None,
        })
    }

    /// Whether the node completed its work (and its output is valid).
    pub fn completed(self) -> bool {
        matches!(
            self,
            NodeStatus::Succeeded | NodeStatus::RolledBack | NodeStatus::RollbackFailed
        )
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The run (shared, like the node's name: records are written often).
    pub run_id: Arc<str>,
    /// The node's name.
    pub node: Arc<str>,
    /// Where it stands.
    pub status: NodeStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// What it produced (secrets scrubbed).
    pub output: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<ErrorInfo>,
    /// When its first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// For a waiting gate: when to ask again.
    pub recheck_at: Option<DateTime<Utc>>,
}

impl NodeRecord {
    /// A pending record.
    pub fn pending(run_id: &str, node: &str) -> Self {
        NodeRecord {
            run_id: run_id.into(),
            node: node.into(),
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

/// A person's decision on an approval gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Go.
    Approve,
    /// Stop.
    Reject,
}

/// One approval or rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// The run.
    pub run_id: String,
    /// The gate node.
    pub node: String,
    /// Who.
    pub approver: String,
    /// What.
    pub decision: Decision,
    /// Why.
    pub comment: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
    /// The decision's unique id (a replay of it is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// From where: `cli user@host`, `http 10.0.0.7:53122`, `auto-approve`,
    /// `trusted: ...` (see [`crate::approval::Actor`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The token that proved the approver's identity, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The release version decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The pipeline's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The pipeline definition hash the decision is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<String>,
}

impl ApprovalRecord {
    /// A decision with only the essentials; the audit fields (`via`,
    /// `decision_id`, `definition_hash`, ...) empty. Records without a
    /// `definition_hash` never count for an approval gate: use
    /// [`crate::approval::record_decision`] to record decisions.
    pub fn new(
        run_id: impl Into<String>,
        node: impl Into<String>,
        approver: impl Into<String>,
        decision: Decision,
    ) -> Self {
        ApprovalRecord {
            run_id: run_id.into(),
            node: node.into(),
            approver: approver.into(),
            decision,
            comment: None,
            at: Utc::now(),
            decision_id: None,
            via: None,
            token_id: None,
            release: None,
            pipeline: None,
            definition_hash: None,
        }
    }
}

/// A document kept with a release version: its SBOM, a provenance
/// statement, a compliance report. The latest document of a kind for a
/// version is what readers get ([`Store::release_document`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseDocument {
    /// The release version it describes.
    pub version: String,
    /// What it is: `sbom` for a CycloneDX SBOM.
    pub kind: String,
    /// Its media type (`application/vnd.cyclonedx+json; version=1.5`).
    pub media_type: String,
    /// SHA-256 of `content`, lowercase hex.
    pub sha256: String,
    /// Length of `content` in bytes.
    pub bytes: u64,
    /// The run that made it, if a run did.
    pub run_id: Option<String>,
    /// The environment that run deployed to.
    pub environment: Option<String>,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// The document itself.
    pub content: String,
}

impl ReleaseDocument {
    /// A document of `kind` for `version`, stored now; the hash and length
    /// are computed from `content`.
    pub fn new(
        version: impl Into<String>,
        kind: impl Into<String>,
        media_type: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        let content = content.into();
        ReleaseDocument {
            version: version.into(),
            kind: kind.into(),
            media_type: media_type.into(),
            sha256: hex::encode(Sha256::digest(content.as_bytes())),
            bytes: content.len() as u64,
            run_id: None,
            environment: None,
            created_at: Utc::now(),
            content,
        }
    }
}

/// A held environment lock: a lease that expires unless renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The environment locked.
    pub environment: String,
    /// Who holds it (host:pid or a person).
    pub holder: String,
    /// The run holding it.
    pub run_id: Option<String>,
    /// Why (shown to waiters).
    pub message: String,
    /// When it was taken.
    pub acquired_at: DateTime<Utc>,
    /// When it was last renewed.
    pub renewed_at: DateTime<Utc>,
    /// When it lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// A request for an environment lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    /// The environment.
    pub environment: String,
    /// Who asks.
    pub holder: String,
    /// For which run.
    pub run_id: Option<String>,
    /// Why.
    pub message: String,
    /// Lease duration.
    pub ttl: Duration,
}

/// The answer to a lock request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockAttempt {
    /// The lease is yours.
    Acquired(Lease),
    /// Someone else holds it (or an older waiter is ahead of you); here is
    /// the current holder's lease, if there is one.
    Busy(Option<Lease>),
}

/// The state of a release in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Being deployed.
    Deploying,
    /// Live now.
    Live,
    /// Was live; a newer release replaced it.
    Superseded,
    /// Deployed, then rolled back.
    RolledBack,
    /// Deployed, then rolled back on some targets only (others could not be
    /// reached): its revisions list the targets still on it.
    PartiallyRolledBack,
    /// Failed to deploy (and was rolled back where possible).
    Failed,
}

impl ReleaseStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Deploying => "deploying",
            ReleaseStatus::Live => "live",
            ReleaseStatus::Superseded => "superseded",
            ReleaseStatus::RolledBack => "rolled_back",
            ReleaseStatus::PartiallyRolledBack => "partially_rolled_back",
            ReleaseStatus::Failed => "failed",
        }
    }

    /// Parses [`ReleaseStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "deploying" => ReleaseStatus::Deploying,
            "live" => ReleaseStatus::Live,
            "superseded" => ReleaseStatus::Superseded,
            "partially_rolled_back" => ReleaseStatus::PartiallyRolledBack,
            "rolled_back" => ReleaseStatus::RolledBack,
            "failed" => ReleaseStatus::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One release in one environment's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// Unique id.
    pub id: String,
    /// The environment.
    pub environment: String,
    /// The version.
    pub version: String,
    /// The full release (artifact, config), for redeploying it later.
    pub release: Release,
    /// What went live on each target.
    pub revisions: Vec<Revision>,
    /// How it stands.
    pub status: ReleaseStatus,
    /// The run that deployed it.
    pub run_id: Option<String>,
    /// Who deployed it.
    pub actor: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// When its status last changed.
    pub updated_at: DateTime<Utc>,
    /// For a record made by a restore (`Deploy::restore`): the id of the
    /// record whose release was redeployed.
    #[serde(default)]
    pub restored_from: Option<String>,
}

/// One entry of a deployer's own history on one target: what it applied
/// there, as the deployer needs it to answer `current()` and to roll back
/// (Terraform's variables and configuration hash, Ansible's extra vars).
///
/// Kept in the [`Store`] so every machine sharing the store agrees on what is
/// live; a deployer's local files are caches. Entries are keyed by a *scope*
/// (the deployer and what it deploys, e.g. `terraform:infra/production`,
/// the same on every machine) and a target name, and ordered by a sequence
/// the store assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// The store's sequence number: larger is newer, unique per store.
    pub seq: u64,
    /// The deployer's scope.
    pub scope: String,
    /// The target.
    pub target: String,
    /// The deployer's entry (its own JSON shape; no secret values).
    pub entry: serde_json::Value,
    /// When it was appended.
    pub at: DateTime<Utc>,
}

/// Durable state of runs. Implementations must be safe to share between
/// tasks; a method that returns `Ok` has made its write durable.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a new run.
    async fn create_run(&self, run: &RunRecord) -> Result<()>;
    /// Sets a run's status (and its end time, for final statuses).
    async fn set_run_status(
        &self,
        run_id: &str,
        status: RunStatus,
        finished_at: Option<DateTime<Utc>>,
    ) -> Result<()>;
    /// A run by id.
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>>;
    /// The newest runs first.
    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>>;

    /// Creates or replaces a node's record.
    async fn put_node(&self, node: &NodeRecord) -> Result<()>;
    /// Creates or replaces several node records at once (one transaction
    /// where the store has them). The runner batches its writes through it.
    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()> {
        for n in nodes {
            self.put_node(n).await?;
        }
        Ok(())
    }
    /// All node records of a run.
    async fn nodes(&self, run_id: &str) -> Result<Vec<NodeRecord>>;

    /// Appends events (already numbered by the emitter). `(run_id, seq)` is
    /// unique: a store may refuse a batch that repeats one.
    async fn append_events(&self, events: &[Event]) -> Result<()>;
    /// The highest event sequence number of a run (0 when it has none).
    async fn last_event_seq(&self, run_id: &str) -> Result<u64> {
        Ok(self
            .events(run_id, 0, usize::MAX)
            .await?
            .last()
            .map(|e| e.seq)
            .unwrap_or(0))
    }
    /// Events of a run with `seq > after_seq`, in order, at most `limit`.
    async fn events(&self, run_id: &str, after_seq: u64, limit: usize) -> Result<Vec<Event>>;

    /// Records an approval or rejection.
    ///
    /// Errors: [`ErrorKind::Conflict`](crate::ErrorKind) when a record
    /// with the same `decision_id` exists (a replay), or an audited record
    /// (one with a `decision_id`) by the same person for the same run and
    /// node (one person counts once).
    async fn put_approval(&self, approval: &ApprovalRecord) -> Result<()>;
    /// Approvals of one gate of one run, oldest first.
    async fn approvals(&self, run_id: &str, node: &str) -> Result<Vec<ApprovalRecord>>;

    /// Takes the environment lock if it is free and no older live waiter is
    /// ahead; otherwise records the request as waiting and returns the
    /// holder. A lease is free when it expired, or when it is *stale*: it
    /// names a run that does not exist or has finished (runs are recorded
    /// before they take the lease, so such a lease was left by a crash).
    /// Stores that can tell may also free a lease whose owner process is
    /// provably gone (see `SqliteStore`).
    async fn try_acquire_lock(&self, req: &LockRequest) -> Result<LockAttempt>;
    /// Extends a held lease. Fails with [`crate::ErrorKind::Locked`] when the
    /// lease was lost (expired and taken, or force-unlocked).
    async fn renew_lock(&self, environment: &str, holder: &str, ttl: Duration) -> Result<Lease>;
    /// Releases a held lease (and any waiting request of `holder`). Returns
    /// whether `holder` held it.
    async fn release_lock(&self, environment: &str, holder: &str) -> Result<bool>;
    /// Breaks a lock whoever holds it; returns the broken lease.
    async fn force_unlock(&self, environment: &str) -> Result<Option<Lease>>;
    /// Breaks a lock, recording who did it and why where the store keeps an
    /// audit trail (the default just breaks it).
    async fn force_unlock_as(
        &self,
        environment: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Option<Lease>> {
        let _ = (actor, reason);
        self.force_unlock(environment).await
    }
    /// Live (unexpired) leases.
    async fn locks(&self) -> Result<Vec<Lease>>;

    /// Creates or replaces (by id) a release record.
    async fn put_release(&self, release: &ReleaseRecord) -> Result<()>;
    /// An environment's releases, newest first: in the reverse of the order
    /// their records were first put (a sequence, not the wall clock: two
    /// releases recorded in the same millisecond, or after the clock stepped
    /// back, still come back newest first). Replacing a record by id keeps
    /// its place.
    async fn release_history(&self, environment: &str, limit: usize) -> Result<Vec<ReleaseRecord>>;

    /// Appends an entry to a deployer's history of one target
    /// ([`TargetRecord`]); returns its sequence number.
    async fn append_target_record(
        &self,
        scope: &str,
        target: &str,
        entry: &serde_json::Value,
    ) -> Result<u64>;

    /// A deployer's history of one target, newest first (by sequence), at
    /// most `limit` entries.
    async fn target_records(
        &self,
        scope: &str,
        target: &str,
        limit: usize,
    ) -> Result<Vec<TargetRecord>>;

    /// Creates or replaces (by id) an incident.
    ///
    /// The default returns [`ErrorKind::Unsupported`](crate::ErrorKind):
    /// a store that keeps no incidents.
    async fn put_incident(&self, incident: &IncidentRecord) -> Result<()> {
        Err(Error::unsupported(format!(
            "this store keeps no incidents (incident {})",
            incident.id
        )))
    }

    /// An incident by id.
    async fn get_incident(&self, id: &str) -> Result<Option<IncidentRecord>> {
        let _ = id;
        Ok(None)
    }

    /// Incidents, newest opened first (in the order they were first put),
    /// only the unresolved ones if `active_only`; at most `limit`.
    async fn incidents(&self, active_only: bool, limit: usize) -> Result<Vec<IncidentRecord>> {
        let _ = (active_only, limit);
        Ok(Vec::new())
    }

    /// Appends a delivery attempt; returns its sequence number. The
    /// record's own `seq` is ignored.
    async fn append_delivery(&self, record: &DeliveryRecord) -> Result<u64> {
        Err(Error::unsupported(format!(
            "this store keeps no delivery records ({} to {})",
            record.kind, record.notifier
        )))
    }

    /// Delivery attempts for a subject (an incident or run id), oldest
    /// first, at most `limit`.
    async fn deliveries(&self, subject: &str, limit: usize) -> Result<Vec<DeliveryRecord>> {
        let _ = (subject, limit);
        Ok(Vec::new())
    }

    /// Stores the request an approval gate makes when it first waits. A
    /// request already stored for the run and node is kept as it is (its
    /// `created_at` and `expires_at` stand across restarts).
    ///
    /// The default returns [`ErrorKind::Unsupported`](crate::ErrorKind).
    async fn put_approval_request(
        &self,
        request: &crate::approval::ApprovalRequest,
    ) -> Result<crate::approval::ApprovalRequest> {
        Err(Error::unsupported(format!(
            "this store keeps no approval requests (run {} node {})",
            request.run_id, request.node
        )))
    }

    /// The approval request of a run's node.
    async fn approval_request(
        &self,
        run_id: &str,
        node: &str,
    ) -> Result<Option<crate::approval::ApprovalRequest>> {
        let _ = (run_id, node);
        Ok(None)
    }

    /// Approval requests, newest first, at most `limit`.
    async fn approval_requests(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::approval::ApprovalRequest>> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Creates or replaces (by id) an API token record.
    ///
    /// The default returns [`ErrorKind::Unsupported`](crate::ErrorKind).
    async fn put_token(&self, token: &crate::approval::TokenRecord) -> Result<()> {
        Err(Error::unsupported(format!(
            "this store keeps no tokens (token {})",
            token.id
        )))
    }

    /// A token record by id.
    async fn token(&self, id: &str) -> Result<Option<crate::approval::TokenRecord>> {
        let _ = id;
        Ok(None)
    }

    /// Every token record, newest first.
    async fn tokens(&self) -> Result<Vec<crate::approval::TokenRecord>> {
        Ok(Vec::new())
    }

    /// Keeps a document with a release version (an SBOM). Documents are
    /// appended: storing another of the same kind for the same version
    /// makes it the one [`Store::release_document`] returns, the older one
    /// stays.
    ///
    /// The default returns [`ErrorKind::Unsupported`](crate::ErrorKind).
    async fn put_release_document(&self, document: &ReleaseDocument) -> Result<()> {
        Err(Error::unsupported(format!(
            "this store keeps no release documents ({} of {})",
            document.kind, document.version
        )))
    }

    /// The latest document of `kind` stored for `version`.
    async fn release_document(&self, version: &str, kind: &str) -> Result<Option<ReleaseDocument>> {
        let _ = (version, kind);
        Ok(None)
    }
}

/// A store in memory: fast, shared between tasks, gone with the process.
///
/// ```
/// # tokio_test_block(async {
/// use cd_core::{MemoryStore, Store};
/// let store = MemoryStore::new();
/// assert!(store.list_runs(10).await.unwrap().is_empty());
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

/// A waiting holder: (holder, first asked, last asked).
type Waiter = (String, DateTime<Utc>, DateTime<Utc>);

#[derive(Default)]
struct MemoryInner {
    runs: BTreeMap<String, RunRecord>,
    nodes: HashMap<Arc<str>, HashMap<Arc<str>, NodeRecord>>,
    events: HashMap<Arc<str>, Vec<Event>>,
    approvals: Vec<ApprovalRecord>,
    locks: HashMap<String, Lease>,
    // environment -> waiting holders with the time they last asked
    waiters: HashMap<String, Vec<Waiter>>,
    releases: Vec<ReleaseRecord>,
    target_records: Vec<TargetRecord>,
    incidents: Vec<IncidentRecord>,
    deliveries: Vec<DeliveryRecord>,
    documents: Vec<ReleaseDocument>,
    requests: Vec<crate::approval::ApprovalRequest>,
    tokens: Vec<crate::approval::TokenRecord>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryStore")
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ttl_chrono(ttl: Duration) -> chrono::Duration {
    crate::clock::chrono_duration(ttl)
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, run: &RunRecord) -> Result<()> {
        self.lock().runs.insert(run.id.clone(), run.clone());
        Ok(())
    }

    async fn set_run_status(
        &self,
        run_id: &str,
        status: RunStatus,
        finished_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let mut g = self.lock();
        let run = g
            .runs
            .get_mut(run_id)
            .ok_or_else(|| Error::new(crate::ErrorKind::NotFound, format!("no run {run_id}")))?;
        run.status = status;
        run.finished_at = finished_at;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.lock().runs.get(run_id).cloned())
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let mut runs: Vec<_> = self.lock().runs.values().cloned().collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.started_at));
        runs.truncate(limit);
        Ok(runs)
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        self.put_nodes(std::slice::from_ref(node)).await
    }

    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()> {
        let mut g = self.lock();
        for node in nodes {
            let run = match g.nodes.get_mut(&*node.run_id) {
                Some(run) => run,
                None => g.nodes.entry(node.run_id.clone()).or_default(),
            };
            match run.get_mut(&*node.node) {
                Some(slot) => slot.clone_from(node),
                None => {
                    run.insert(node.node.clone(), node.clone());
                }
            }
        }
        Ok(())
    }

    async fn nodes(&self, run_id: &str) -> Result<Vec<NodeRecord>> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .nodes
            .get(run_id)
            .map(|run| run.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.node.cmp(&b.node)));
        Ok(v)
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        let mut g = self.lock();
        for e in events {
            match g.events.get_mut(&*e.run_id) {
                Some(run) => run.push(e.clone()),
                None => g
                    .events
                    .entry(e.run_id.clone())
                    .or_default()
                    .push(e.clone()),
            }
        }
        Ok(())
    }

    async fn events(&self, run_id: &str, after_seq: u64, limit: usize) -> Result<Vec<Event>> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .events
            .get(run_id)
            .map(|evs| evs.iter().filter(|e| e.seq > after_seq).cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|e| e.seq);
        v.truncate(limit);
        Ok(v)
    }

    async fn put_approval(&self, approval: &ApprovalRecord) -> Result<()> {
        let mut inner = self.lock();
        if let Some(id) = &approval.decision_id {
            if inner
                .approvals
                .iter()
                .any(|a| a.decision_id.as_ref() == Some(id))
            {
                return Err(Error::new(
                    crate::ErrorKind::Conflict,
                    format!("decision {id} was already recorded (a replay)"),
                ));
            }
        }
        if approval.decision_id.is_some()
            && inner.approvals.iter().any(|a| {
                a.decision_id.is_some()
                    && a.run_id == approval.run_id
                    && a.node == approval.node
                    && a.approver == approval.approver
            })
        {
            return Err(Error::new(
                crate::ErrorKind::Conflict,
                format!(
                    "{} already decided `{}` of run {}; one person counts once",
                    approval.approver, approval.node, approval.run_id
                ),
            ));
        }
        inner.approvals.push(approval.clone());
        Ok(())
    }

    async fn approvals(&self, run_id: &str, node: &str) -> Result<Vec<ApprovalRecord>> {
        Ok(self
            .lock()
            .approvals
            .iter()
            .filter(|a| a.run_id == run_id && a.node == node)
            .cloned()
            .collect())
    }

    async fn try_acquire_lock(&self, req: &LockRequest) -> Result<LockAttempt> {
        let now = Utc::now();
        let ttl = ttl_chrono(req.ttl);
        let mut g = self.lock();
        let g = &mut *g;
        if let Some(lease) = g.locks.get(&req.environment) {
            let stale = lease.run_id.as_ref().is_some_and(|id| {
                g.runs
                    .get(id)
                    .is_none_or(|r| r.status != crate::event::RunStatus::Running)
            });
            if lease.expires_at > now && lease.holder != req.holder && !stale {
                let holder = lease.clone();
                let w = g.waiters.entry(req.environment.clone()).or_default();
                match w.iter_mut().find(|(h, _, _)| *h == req.holder) {
                    Some(entry) => entry.2 = now,
                    None => w.push((req.holder.clone(), now, now)),
                }
                return Ok(LockAttempt::Busy(Some(holder)));
            }
        }
        // Free: the oldest waiter that asked recently goes first.
        let waiters = g.waiters.entry(req.environment.clone()).or_default();
        waiters.retain(|(_, _, last)| *last + ttl > now);
        if let Some((first, _, _)) = waiters.first() {
            if *first != req.holder {
                if !waiters.iter().any(|(h, _, _)| *h == req.holder) {
                    waiters.push((req.holder.clone(), now, now));
                } else if let Some(e) = waiters.iter_mut().find(|(h, _, _)| *h == req.holder) {
                    e.2 = now;
                }
                return Ok(LockAttempt::Busy(None));
            }
        }
        waiters.retain(|(h, _, _)| *h != req.holder);
        let lease = Lease {
            environment: req.environment.clone(),
            holder: req.holder.clone(),
            run_id: req.run_id.clone(),
            message: req.message.clone(),
            acquired_at: now,
            renewed_at: now,
            expires_at: now
                .checked_add_signed(ttl)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        };
        g.locks.insert(req.environment.clone(), lease.clone());
        Ok(LockAttempt::Acquired(lease))
    }

    async fn renew_lock(&self, environment: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        let now = Utc::now();
        let mut g = self.lock();
        match g.locks.get_mut(environment) {
            Some(l) if l.holder == holder => {
                l.renewed_at = now;
                l.expires_at = crate::clock::utc_add(now, ttl);
                Ok(l.clone())
            }
            _ => Err(Error::new(
                crate::ErrorKind::Locked,
                format!("lock on environment `{environment}` was lost by {holder}"),
            )),
        }
    }

    async fn release_lock(&self, environment: &str, holder: &str) -> Result<bool> {
        let mut g = self.lock();
        if let Some(w) = g.waiters.get_mut(environment) {
            w.retain(|(h, _, _)| h != holder);
        }
        if g.locks.get(environment).is_some_and(|l| l.holder == holder) {
            g.locks.remove(environment);
            return Ok(true);
        }
        Ok(false)
    }

    async fn force_unlock(&self, environment: &str) -> Result<Option<Lease>> {
        Ok(self.lock().locks.remove(environment))
    }

    async fn locks(&self) -> Result<Vec<Lease>> {
        let now = Utc::now();
        let mut v: Vec<_> = self
            .lock()
            .locks
            .values()
            .filter(|l| l.expires_at > now)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.environment.cmp(&b.environment));
        Ok(v)
    }

    async fn put_release(&self, release: &ReleaseRecord) -> Result<()> {
        let mut g = self.lock();
        match g.releases.iter_mut().find(|r| r.id == release.id) {
            Some(r) => *r = release.clone(),
            None => g.releases.push(release.clone()),
        }
        Ok(())
    }

    async fn release_history(&self, environment: &str, limit: usize) -> Result<Vec<ReleaseRecord>> {
        let g = self.lock();
        // `releases` is in the order records were first put.
        Ok(g.releases
            .iter()
            .rev()
            .filter(|r| r.environment == environment)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn append_target_record(
        &self,
        scope: &str,
        target: &str,
        entry: &serde_json::Value,
    ) -> Result<u64> {
        let mut g = self.lock();
        let seq = g.target_records.last().map(|r| r.seq + 1).unwrap_or(1);
        g.target_records.push(TargetRecord {
            seq,
            scope: scope.to_string(),
            target: target.to_string(),
            entry: entry.clone(),
            at: Utc::now(),
        });
        Ok(seq)
    }

    async fn target_records(
        &self,
        scope: &str,
        target: &str,
        limit: usize,
    ) -> Result<Vec<TargetRecord>> {
        Ok(self
            .lock()
            .target_records
            .iter()
            .rev()
            .filter(|r| r.scope == scope && r.target == target)
            .take(limit)
            .cloned()
            .collect())
    }
    async fn put_incident(&self, incident: &IncidentRecord) -> Result<()> {
        let mut inner = self.lock();
        match inner.incidents.iter_mut().find(|i| i.id == incident.id) {
            Some(i) => *i = incident.clone(),
            None => inner.incidents.push(incident.clone()),
        }
        Ok(())
    }

    async fn get_incident(&self, id: &str) -> Result<Option<IncidentRecord>> {
        Ok(self.lock().incidents.iter().find(|i| i.id == id).cloned())
    }

    async fn incidents(&self, active_only: bool, limit: usize) -> Result<Vec<IncidentRecord>> {
        Ok(self
            .lock()
            .incidents
            .iter()
            .rev()
            .filter(|i| !active_only || i.status.is_active())
            .take(limit)
            .cloned()
            .collect())
    }

    async fn append_delivery(&self, record: &DeliveryRecord) -> Result<u64> {
        let mut inner = self.lock();
        let seq = inner.deliveries.len() as u64 + 1;
        let mut r = record.clone();
        r.seq = seq;
        inner.deliveries.push(r);
        Ok(seq)
    }

    async fn deliveries(&self, subject: &str, limit: usize) -> Result<Vec<DeliveryRecord>> {
        Ok(self
            .lock()
            .deliveries
            .iter()
            .filter(|r| r.subject == subject)
            .take(limit)
            .cloned()
            .collect())
    }
    async fn put_approval_request(
        &self,
        request: &crate::approval::ApprovalRequest,
    ) -> Result<crate::approval::ApprovalRequest> {
        let mut inner = self.lock();
        if let Some(r) = inner
            .requests
            .iter()
            .find(|r| r.run_id == request.run_id && r.node == request.node)
        {
            return Ok(r.clone());
        }
        inner.requests.push(request.clone());
        Ok(request.clone())
    }

    async fn approval_request(
        &self,
        run_id: &str,
        node: &str,
    ) -> Result<Option<crate::approval::ApprovalRequest>> {
        Ok(self
            .lock()
            .requests
            .iter()
            .find(|r| r.run_id == run_id && r.node == node)
            .cloned())
    }

    async fn approval_requests(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::approval::ApprovalRequest>> {
        Ok(self
            .lock()
            .requests
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn put_token(&self, token: &crate::approval::TokenRecord) -> Result<()> {
        let mut inner = self.lock();
        match inner.tokens.iter_mut().find(|t| t.id == token.id) {
            Some(t) => *t = token.clone(),
            None => inner.tokens.push(token.clone()),
        }
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<crate::approval::TokenRecord>> {
        Ok(self.lock().tokens.iter().find(|t| t.id == id).cloned())
    }

    async fn tokens(&self) -> Result<Vec<crate::approval::TokenRecord>> {
        Ok(self.lock().tokens.iter().rev().cloned().collect())
    }

    async fn put_release_document(&self, document: &ReleaseDocument) -> Result<()> {
        self.lock().documents.push(document.clone());
        Ok(())
    }

    async fn release_document(&self, version: &str, kind: &str) -> Result<Option<ReleaseDocument>> {
        Ok(self
            .lock()
            .documents
            .iter()
            .rev()
            .find(|d| d.version == version && d.kind == kind)
            .cloned())
    }
}
