//! Incidents and notifications.
//!
//! An [`IncidentRecord`] is what a failed bake (or any stage) leaves for a
//! person: opened, acknowledged, resolved, with its severity, the run, node,
//! release and environment it came from, and links. Incidents live in the
//! [`Store`], so `cdctl incidents` and every process sharing the store see
//! them.
//!
//! A [`Notifier`] sends a [`Notification`] somewhere (a webhook, Slack,
//! PagerDuty: see `cd_stages::webhook`). [`Notifications`] routes each kind
//! of notification to the notifiers that want it, retries failed deliveries
//! with exponential backoff, records every attempt as a [`DeliveryRecord`]
//! in the store and scrubs secrets from everything it sends or records. A
//! [`Runner`](crate::Runner) given notifications
//! ([`Runner::notify`](crate::Runner::notify)) sends them for a failed run,
//! a rollback, an approval waiting and an incident opened; deliveries run in
//! the background, so a receiver that is down never holds up a rollback.
//!
//! ```
//! use cd_core::incident::{IncidentRecord, IncidentStatus, Severity};
//! let mut incident = IncidentRecord::open(
//!     "v2 is not healthy after deployment",
//!     "error rate 7.5% > 1%",
//!     Severity::Critical,
//! )
//! .environment("production")
//! .release("v2");
//! assert_eq!(incident.status, IncidentStatus::Open);
//! incident.acknowledge("alice").unwrap();
//! incident.resolve("alice").unwrap();
//! assert!(incident.resolve("bob").is_err()); // already resolved
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, EventKind, EventSink, RunStatus};
use crate::secret::Redactor;
use crate::store::Store;

/// How bad an incident is. The four severities of PagerDuty's Events API v2
/// (`critical`, `error`, `warning`, `info`), which Slack and generic
/// webhooks receive as the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Production is hurt now (a failed bake that was rolled back).
    Critical,
    /// Something failed (a run failed).
    Error,
    /// Something needs attention (a rollback that worked).
    Warning,
    /// For information (an approval is waiting).
    Info,
}

impl Severity {
    /// The lower-case name (`critical`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "critical" => Severity::Critical,
            "error" => Severity::Error,
            "warning" => Severity::Warning,
            "info" => Severity::Info,
            _ => return None,
        })
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incident stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    /// Opened, nobody has taken it yet.
    Open,
    /// Someone is on it.
    Acknowledged,
    /// Over.
    Resolved,
}

impl IncidentStatus {
    /// The lower-case name (`open`, `acknowledged`, `resolved`).
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::Open => "open",
            IncidentStatus::Acknowledged => "acknowledged",
            IncidentStatus::Resolved => "resolved",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => IncidentStatus::Open,
            "acknowledged" => IncidentStatus::Acknowledged,
            "resolved" => IncidentStatus::Resolved,
            _ => return None,
        })
    }

    /// Whether it is still open or acknowledged (not resolved).
    pub fn is_active(self) -> bool {
        self != IncidentStatus::Resolved
    }
}

impl fmt::Display for IncidentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One incident, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentRecord {
    /// Its id (`inc-` and 12 hex digits), what `cdctl incident ack` takes.
    pub id: String,
    /// Where it stands.
    pub status: IncidentStatus,
    /// How bad it is.
    pub severity: Severity,
    /// One line for a person (`v2 is not healthy after deployment`).
    pub title: String,
    /// Why it was opened, in detail (the analysis verdict, per metric).
    pub reason: String,
    /// The run that opened it.
    pub run_id: Option<String>,
    /// The node of that run.
    pub node: Option<String>,
    /// The pipeline.
    pub pipeline: Option<String>,
    /// The release version.
    pub release: Option<String>,
    /// The environment.
    pub environment: Option<String>,
    /// Links for a person (dashboards, the run's log).
    pub links: Vec<String>,
    /// The key a paging system deduplicates on: the same for the trigger
    /// and the resolve of one incident (PagerDuty's `dedup_key`).
    pub dedup_key: String,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// When it was acknowledged.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// When it was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Who resolved it.
    pub resolved_by: Option<String>,
}

impl IncidentRecord {
    /// A new open incident with a fresh id (also its dedup key).
    pub fn open(title: impl Into<String>, reason: impl Into<String>, severity: Severity) -> Self {
        let id = format!("inc-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        IncidentRecord {
            dedup_key: format!("cd/{id}"),
            id,
            status: IncidentStatus::Open,
            severity,
            title: title.into(),
            reason: reason.into(),
            run_id: None,
            node: None,
            pipeline: None,
            release: None,
            environment: None,
            links: Vec::new(),
            opened_at: Utc::now(),
            acknowledged_at: None,
            acknowledged_by: None,
            resolved_at: None,
            resolved_by: None,
        }
    }

    /// Sets the run and node it came from.
    pub fn run(mut self, run_id: impl Into<String>, node: impl Into<String>) -> Self {
        self.run_id = Some(run_id.into());
        self.node = Some(node.into());
        self
    }

    /// Sets the pipeline.
    pub fn pipeline(mut self, pipeline: impl Into<String>) -> Self {
        self.pipeline = Some(pipeline.into());
        self
    }

    /// Sets the release version.
    pub fn release(mut self, version: impl Into<String>) -> Self {
        self.release = Some(version.into());
        self
    }

    /// Sets the environment.
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = Some(environment.into());
        self
    }

    /// Adds a link.
    pub fn link(mut self, url: impl Into<String>) -> Self {
        self.links.push(url.into());
        self
    }

    /// Marks it acknowledged by `actor`. Errors: [`ErrorKind::Conflict`]
    /// when it is already resolved. Acknowledging twice keeps the first.
    pub fn acknowledge(&mut self, actor: &str) -> Result<()> {
        if self.status == IncidentStatus::Resolved {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("incident {} is already resolved", self.id),
            )
            .with("incident", &self.id));
        }
        if self.status == IncidentStatus::Open {
            self.status = IncidentStatus::Acknowledged;
            self.acknowledged_at = Some(Utc::now());
            self.acknowledged_by = Some(actor.to_string());
        }
        Ok(())
    }

    /// Marks it resolved by `actor`. Errors: [`ErrorKind::Conflict`] when it
    /// is already resolved.
    pub fn resolve(&mut self, actor: &str) -> Result<()> {
        if self.status == IncidentStatus::Resolved {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "incident {} was already resolved by {}",
                    self.id,
                    self.resolved_by.as_deref().unwrap_or("someone")
                ),
            )
            .with("incident", &self.id));
        }
        self.status = IncidentStatus::Resolved;
        self.resolved_at = Some(Utc::now());
        self.resolved_by = Some(actor.to_string());
        Ok(())
    }
}

/// Acknowledges incident `id` in `store` as `actor`, notifies
/// ([`NotificationKind::IncidentAcknowledged`]) and returns the record.
///
/// Errors: [`ErrorKind::NotFound`] for an unknown id,
/// [`ErrorKind::Conflict`] for a resolved incident, store errors.
pub async fn acknowledge_incident(
    store: &Arc<dyn Store>,
    id: &str,
    actor: &str,
    notifications: Option<&Notifications>,
) -> Result<IncidentRecord> {
    change_incident(store, id, actor, notifications, false).await
}

/// Resolves incident `id` in `store` as `actor`, notifies
/// ([`NotificationKind::IncidentResolved`]: PagerDuty gets a `resolve` with
/// the incident's dedup key) and returns the record.
///
/// Errors: [`ErrorKind::NotFound`] for an unknown id,
/// [`ErrorKind::Conflict`] for an incident already resolved, store errors.
pub async fn resolve_incident(
    store: &Arc<dyn Store>,
    id: &str,
    actor: &str,
    notifications: Option<&Notifications>,
) -> Result<IncidentRecord> {
    change_incident(store, id, actor, notifications, true).await
}

async fn change_incident(
    store: &Arc<dyn Store>,
    id: &str,
    actor: &str,
    notifications: Option<&Notifications>,
    resolve: bool,
) -> Result<IncidentRecord> {
    let mut incident = store.get_incident(id).await?.ok_or_else(|| {
        Error::new(ErrorKind::NotFound, format!("no incident with id {id}")).with("incident", id)
    })?;
    let kind = if resolve {
        incident.resolve(actor)?;
        NotificationKind::IncidentResolved
    } else {
        incident.acknowledge(actor)?;
        NotificationKind::IncidentAcknowledged
    };
    store.put_incident(&incident).await?;
    if let Some(n) = notifications {
        n.notify(
            Notification::for_incident(kind, &incident),
            store.clone(),
            &Redactor::default(),
        );
    }
    Ok(incident)
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// A run ended failed.
    RunFailed,
    /// Compensation rolled back one or more nodes of a run.
    RolledBack,
    /// An approval gate is waiting for a person.
    ApprovalWaiting,
    /// An incident was opened.
    IncidentOpened,
    /// An incident was acknowledged.
    IncidentAcknowledged,
    /// An incident was resolved.
    IncidentResolved,
}

impl NotificationKind {
    /// Every kind.
    pub const ALL: [NotificationKind; 6] = [
        NotificationKind::RunFailed,
        NotificationKind::RolledBack,
        NotificationKind::ApprovalWaiting,
        NotificationKind::IncidentOpened,
        NotificationKind::IncidentAcknowledged,
        NotificationKind::IncidentResolved,
    ];

    /// The snake-case name (`run_failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::RunFailed => "run_failed",
            NotificationKind::RolledBack => "rolled_back",
            NotificationKind::ApprovalWaiting => "approval_waiting",
            NotificationKind::IncidentOpened => "incident_opened",
            NotificationKind::IncidentAcknowledged => "incident_acknowledged",
            NotificationKind::IncidentResolved => "incident_resolved",
        }
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message for people: what happened, where, how bad.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// What it is about.
    pub kind: NotificationKind,
    /// One line (`incident opened: v2 is not healthy after deployment`).
    pub title: String,
    /// Details for a person.
    pub summary: String,
    /// How bad.
    pub severity: Severity,
    /// The run.
    pub run_id: Option<String>,
    /// The pipeline.
    pub pipeline: Option<String>,
    /// The release version.
    pub release: Option<String>,
    /// The environment.
    pub environment: Option<String>,
    /// The node, if one.
    pub node: Option<String>,
    /// The incident, for incident notifications.
    pub incident: Option<IncidentRecord>,
    /// What a paging system deduplicates on: an incident's dedup key, or
    /// `cd/<run id>/<kind>` (`/<node>` for an approval).
    pub dedup_key: String,
    /// Links for a person.
    pub links: Vec<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

impl Notification {
    /// A notification about `incident`.
    pub fn for_incident(kind: NotificationKind, incident: &IncidentRecord) -> Self {
        let verb = match kind {
            NotificationKind::IncidentResolved => "resolved",
            NotificationKind::IncidentAcknowledged => "acknowledged",
            _ => "opened",
        };
        Notification {
            kind,
            title: format!("incident {} {verb}: {}", incident.id, incident.title),
            summary: incident.reason.clone(),
            severity: incident.severity,
            run_id: incident.run_id.clone(),
            pipeline: incident.pipeline.clone(),
            release: incident.release.clone(),
            environment: incident.environment.clone(),
            node: incident.node.clone(),
            incident: Some(incident.clone()),
            dedup_key: incident.dedup_key.clone(),
            links: incident.links.clone(),
            at: Utc::now(),
        }
    }

    /// What its delivery records are filed under: the incident id, else the
    /// run id.
    pub fn subject(&self) -> String {
        self.incident
            .as_ref()
            .map(|i| i.id.clone())
            .or_else(|| self.run_id.clone())
            .unwrap_or_else(|| self.dedup_key.clone())
    }

    fn scrub(&mut self, redactor: &Redactor) {
        if redactor.is_empty() {
            return;
        }
        self.title = redactor.scrub(&self.title);
        self.summary = redactor.scrub(&self.summary);
        for l in &mut self.links {
            *l = redactor.scrub(l);
        }
        if let Some(i) = &mut self.incident {
            i.title = redactor.scrub(&i.title);
            i.reason = redactor.scrub(&i.reason);
            for l in &mut i.links {
                *l = redactor.scrub(l);
            }
        }
    }
}

/// Sends notifications somewhere: a webhook, Slack, PagerDuty.
///
/// `send` returns an error the notifier marks retryable (a 5xx, a 429, a
/// refused connection, a timeout) or not (a 4xx: the payload or the key is
/// wrong); [`Notifications`] retries the first kind. Errors must not hold
/// the notifier's secrets (a webhook URL with a token, a routing key).
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// A name for records and logs, without secrets (`slack hooks.slack.com`).
    fn name(&self) -> String;

    /// Delivers one notification, once.
    async fn send(&self, notification: &Notification) -> Result<()>;
}

#[async_trait]
impl<N: Notifier + ?Sized> Notifier for Arc<N> {
    fn name(&self) -> String {
        (**self).name()
    }
    async fn send(&self, notification: &Notification) -> Result<()> {
        (**self).send(notification).await
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The receiver took it.
    Delivered,
    /// It failed and will be tried again.
    Retrying,
    /// It failed for good (not retryable, or the last attempt).
    GaveUp,
}

impl DeliveryOutcome {
    /// The snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retrying => "retrying",
            DeliveryOutcome::GaveUp => "gave_up",
        }
    }
}

/// One attempt to deliver one notification to one notifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// The store's sequence number (larger is newer).
    pub seq: u64,
    /// The incident id or run id ([`Notification::subject`]).
    pub subject: String,
    /// The notification's kind.
    pub kind: NotificationKind,
    /// The notifier's name (no secrets).
    pub notifier: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// How it ended.
    pub outcome: DeliveryOutcome,
    /// Why it failed (scrubbed of secrets).
    pub error: Option<String>,
    /// Wall time of the attempt, in milliseconds.
    pub duration_ms: u64,
    /// When the attempt ended.
    pub at: DateTime<Utc>,
}

struct Route {
    notifier: Arc<dyn Notifier>,
    kinds: HashSet<NotificationKind>,
}

struct Inner {
    routes: Vec<Route>,
    attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    flush_timeout: Duration,
    pending: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Routes notifications to notifiers, delivers them in the background with
/// retries, and records every attempt.
///
/// Defaults: 5 attempts per delivery, backoff from 250 ms doubling up to
/// 5 s (so a receiver down for good is given up after about 4 s, plus the
/// notifier's own timeouts), and a run waits at most 10 s at its end for
/// deliveries still under way ([`Notifications::flush_timeout`]).
///
/// ```
/// use std::time::Duration;
/// use cd_core::incident::{Notifications, NotificationKind};
/// # struct Log;
/// # #[async_trait::async_trait]
/// # impl cd_core::incident::Notifier for Log {
/// #     fn name(&self) -> String { "log".into() }
/// #     async fn send(&self, _: &cd_core::incident::Notification) -> cd_core::Result<()> { Ok(()) }
/// # }
/// let n = Notifications::new()
///     .to_on(Log, [NotificationKind::IncidentOpened, NotificationKind::IncidentResolved])
///     .retry(3, Duration::from_millis(100));
/// assert_eq!(n.notifiers(), vec!["log".to_string()]);
/// ```
#[derive(Clone)]
pub struct Notifications {
    inner: Arc<Inner>,
}

impl fmt::Debug for Notifications {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifications")
            .field("notifiers", &self.notifiers())
            .field("attempts", &self.inner.attempts)
            .field("backoff", &self.inner.backoff)
            .finish()
    }
}

impl Default for Notifications {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifications {
    /// No notifiers yet.
    pub fn new() -> Self {
        Notifications {
            inner: Arc::new(Inner {
                routes: Vec::new(),
                attempts: 5,
                backoff: Duration::from_millis(250),
                max_backoff: Duration::from_secs(5),
                flush_timeout: Duration::from_secs(10),
                pending: Mutex::new(Vec::new()),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                let old = &self.inner;
                let mut inner = Inner {
                    routes: old
                        .routes
                        .iter()
                        .map(|r| Route {
                            notifier: r.notifier.clone(),
                            kinds: r.kinds.clone(),
                        })
                        .collect(),
                    attempts: old.attempts,
                    backoff: old.backoff,
                    max_backoff: old.max_backoff,
                    flush_timeout: old.flush_timeout,
                    pending: Mutex::new(Vec::new()),
                };
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// Sends every kind of notification to `notifier`.
    pub fn to(self, notifier: impl Notifier) -> Self {
        self.to_on(notifier, NotificationKind::ALL)
    }

    /// Sends the given kinds to `notifier`.
    pub fn to_on(
        self,
        notifier: impl Notifier,
        kinds: impl IntoIterator<Item = NotificationKind>,
    ) -> Self {
        let kinds = kinds.into_iter().collect();
        self.edit(|i| {
            i.routes.push(Route {
                notifier: Arc::new(notifier),
                kinds,
            })
        })
    }

    /// Attempts per delivery (at least 1) and the first backoff (doubled
    /// after each failure, at most 5 s).
    pub fn retry(self, attempts: u32, initial_backoff: Duration) -> Self {
        self.edit(|i| {
            i.attempts = attempts.max(1);
            i.backoff = initial_backoff;
        })
    }

    /// How long a run waits at its end for deliveries still under way
    /// (default 10 s); after it they go on in the background.
    pub fn flush_timeout(self, d: Duration) -> Self {
        self.edit(|i| i.flush_timeout = d)
    }

    /// The notifiers' names.
    pub fn notifiers(&self) -> Vec<String> {
        self.inner
            .routes
            .iter()
            .map(|r| r.notifier.name())
            .collect()
    }

    /// Whether any notifier wants `kind`.
    pub fn wants(&self, kind: NotificationKind) -> bool {
        self.inner.routes.iter().any(|r| r.kinds.contains(&kind))
    }

    /// Delivers `notification` to every notifier that wants its kind, in
    /// background tasks (needs a Tokio runtime; without one it is dropped
    /// with a warning). Secrets `redactor` knows are scrubbed first; every
    /// attempt is recorded in `store`.
    pub fn notify(
        &self,
        mut notification: Notification,
        store: Arc<dyn Store>,
        redactor: &Redactor,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: "cd::notify", "no runtime: {} notification dropped", notification.kind);
            return;
        };
        notification.scrub(redactor);
        let notification = Arc::new(notification);
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|h| !h.is_finished());
        for route in &self.inner.routes {
            if !route.kinds.contains(&notification.kind) {
                continue;
            }
            let task = deliver(
                route.notifier.clone(),
                notification.clone(),
                store.clone(),
                redactor.clone(),
                (
                    self.inner.attempts,
                    self.inner.backoff,
                    self.inner.max_backoff,
                ),
            );
            pending.push(handle.spawn(task));
        }
    }

    /// Waits until every delivery under way has ended, or `timeout` has
    /// passed; returns how many are still under way (they go on).
    pub async fn flush(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = {
                let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.retain(|h| !h.is_finished());
                if pending.is_empty() {
                    return 0;
                }
                pending.len()
            };
            if tokio::time::Instant::now() >= deadline {
                return next;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The runner's sink: turns a run's events into notifications.
    pub(crate) fn sink(
        &self,
        store: Arc<dyn Store>,
        redactor: Redactor,
        approvals: HashSet<String>,
        run: RunInfo,
    ) -> NotifySink {
        NotifySink {
            hub: self.clone(),
            store,
            redactor,
            approvals,
            state: Mutex::new(SinkState {
                run,
                rolled_back: Vec::new(),
                rollback_failed: Vec::new(),
                waiting: HashSet::new(),
                failures: Vec::new(),
            }),
        }
    }

    pub(crate) fn default_flush(&self) -> Duration {
        self.inner.flush_timeout
    }
}

async fn deliver(
    notifier: Arc<dyn Notifier>,
    notification: Arc<Notification>,
    store: Arc<dyn Store>,
    redactor: Redactor,
    (attempts, backoff, max_backoff): (u32, Duration, Duration),
) {
    let name = notifier.name();
    let mut delay = backoff;
    for attempt in 1..=attempts {
        let started = std::time::Instant::now();
        let result = notifier.send(&notification).await;
        let (outcome, error) = match &result {
            Ok(()) => (DeliveryOutcome::Delivered, None),
            Err(e) if e.is_retryable() && attempt < attempts => (
                DeliveryOutcome::Retrying,
                Some(redactor.scrub(&e.to_string())),
            ),
            Err(e) => (
                DeliveryOutcome::GaveUp,
                Some(redactor.scrub(&e.to_string())),
            ),
        };
        let record = DeliveryRecord {
            seq: 0,
            subject: notification.subject(),
            kind: notification.kind,
            notifier: name.clone(),
            attempt,
            outcome,
            error: error.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            at: Utc::now(),
        };
        if let Err(e) = store.append_delivery(&record).await {
            tracing::warn!(target: "cd::notify", "could not record a delivery to {name}: {e}");
        }
        match outcome {
            DeliveryOutcome::Delivered => return,
            DeliveryOutcome::GaveUp => {
                tracing::warn!(
                    target: "cd::notify",
                    "{} notification to {name} given up after {attempt} attempt(s): {}",
                    notification.kind,
                    error.unwrap_or_default()
                );
                return;
            }
            DeliveryOutcome::Retrying => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_backoff);
            }
        }
    }
}

/// What the sink knows of its run.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunInfo {
    pub run_id: String,
    pub pipeline: String,
    pub release: String,
    pub environment: String,
}

struct SinkState {
    run: RunInfo,
    rolled_back: Vec<String>,
    rollback_failed: Vec<String>,
    waiting: HashSet<String>,
    failures: Vec<String>,
}

/// Turns a run's events into notifications: a failed node's error, a
/// rollback, an approval waiting (once per node), an incident opened, the
/// run failed.
pub(crate) struct NotifySink {
    hub: Notifications,
    store: Arc<dyn Store>,
    redactor: Redactor,
    /// Nodes that are approval gates.
    approvals: HashSet<String>,
    state: Mutex<SinkState>,
}

impl NotifySink {
    fn base(&self, run: &RunInfo, kind: NotificationKind, severity: Severity) -> Notification {
        Notification {
            kind,
            title: String::new(),
            summary: String::new(),
            severity,
            run_id: Some(run.run_id.clone()),
            pipeline: Some(run.pipeline.clone()),
            release: Some(run.release.clone()),
            environment: Some(run.environment.clone()),
            node: None,
            incident: None,
            dedup_key: format!("cd/{}/{}", run.run_id, kind.as_str()),
            links: Vec::new(),
            at: Utc::now(),
        }
    }

    fn send(&self, n: Notification) {
        if self.hub.wants(n.kind) {
            self.hub.notify(n, self.store.clone(), &self.redactor);
        }
    }
}

impl EventSink for NotifySink {
    fn emit(&self, event: &Event) {
        let node = event.node.as_deref().map(str::to_string);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &event.kind {
            EventKind::RunStarted {
                pipeline,
                release,
                environment,
            } => {
                st.run.pipeline = pipeline.clone();
                st.run.release = release.clone();
                st.run.environment = environment.clone();
            }
            EventKind::NodeFailed { error } => {
                if let Some(node) = &node {
                    st.failures.push(format!("{node}: {}", error.message));
                }
            }
            EventKind::RolledBack { .. } => st.rolled_back.extend(node),
            EventKind::RollbackFailed { error } => {
                if let Some(node) = &node {
                    st.rollback_failed
                        .push(format!("{node}: {}", error.message));
                }
            }
            EventKind::GateWaiting { reason, .. } => {
                let Some(node) = node else { return };
                if self.approvals.contains(&node) && st.waiting.insert(node.clone()) {
                    let mut n =
                        self.base(&st.run, NotificationKind::ApprovalWaiting, Severity::Info);
                    n.title = format!(
                        "approval waiting: {} of {} to {} ({node})",
                        st.run.pipeline, st.run.release, st.run.environment
                    );
                    n.summary = reason.clone();
                    n.dedup_key = format!("cd/{}/approval_waiting/{node}", st.run.run_id);
                    n.node = Some(node);
                    drop(st);
                    self.send(n);
                }
            }
            EventKind::Custom { name, data } if name == INCIDENT_EVENT => {
                let Ok(incident) = serde_json::from_value::<IncidentRecord>(data.clone()) else {
                    return;
                };
                drop(st);
                self.send(Notification::for_incident(
                    NotificationKind::IncidentOpened,
                    &incident,
                ));
            }
            EventKind::RunFinished { status } => {
                let mut out = Vec::new();
                if !st.rolled_back.is_empty() || !st.rollback_failed.is_empty() {
                    let mut n = self.base(&st.run, NotificationKind::RolledBack, Severity::Warning);
                    n.title = format!(
                        "rolled back: {} of {} to {}",
                        st.run.pipeline, st.run.release, st.run.environment
                    );
                    let mut summary = format!("rolled back: {}", st.rolled_back.join(", "));
                    if !st.rollback_failed.is_empty() {
                        n.severity = Severity::Critical;
                        summary.push_str(&format!(
                            "; rollback FAILED: {}",
                            st.rollback_failed.join("; ")
                        ));
                    }
                    if !st.failures.is_empty() {
                        summary.push_str(&format!("; because {}", st.failures.join("; ")));
                    }
                    n.summary = summary;
                    out.push(n);
                }
                if *status == RunStatus::Failed {
                    let mut n = self.base(&st.run, NotificationKind::RunFailed, Severity::Error);
                    n.title = format!(
                        "run failed: {} of {} to {}",
                        st.run.pipeline, st.run.release, st.run.environment
                    );
                    n.summary = if st.failures.is_empty() {
                        "the run failed".into()
                    } else {
                        st.failures.join("; ")
                    };
                    out.push(n);
                }
                drop(st);
                for n in out {
                    self.send(n);
                }
            }
            _ => {}
        }
    }
}

/// The name of the [`EventKind::Custom`] event a stage emits when it opens
/// an incident (its data: the [`IncidentRecord`]); a runner with
/// notifications sends [`NotificationKind::IncidentOpened`] for it.
pub const INCIDENT_EVENT: &str = "incident_opened";

/// Opens `incident` for a stage: stores it and emits the
/// [`INCIDENT_EVENT`] event (so the runner's notifications send it). Fills
/// in the run, node, pipeline... from the context when unset.
pub async fn open_incident(
    cx: &crate::stage::StageContext,
    incident: IncidentRecord,
) -> Result<IncidentRecord> {
    let mut incident = incident;
    if incident.run_id.is_none() {
        incident.run_id = Some(cx.run_id().to_string());
        incident.node = Some(cx.node().to_string());
    }
    if incident.pipeline.is_none() && !cx.pipeline().is_empty() {
        incident.pipeline = Some(cx.pipeline().to_string());
    }
    if incident.environment.is_none() && !cx.environment().is_empty() {
        incident.environment = Some(cx.environment().to_string());
    }
    if incident.release.is_none() {
        incident.release = Some(cx.release().version.clone());
    }
    let redactor = cx.events().redactor();
    incident.title = redactor.scrub(&incident.title);
    incident.reason = redactor.scrub(&incident.reason);
    cx.store().put_incident(&incident).await?;
    let data = serde_json::to_value(&incident)
        .map_err(|e| Error::invalid(format!("incident {}: {e}", incident.id)))?;
    cx.events().emit(EventKind::Custom {
        name: INCIDENT_EVENT.into(),
        data,
    });
    Ok(incident)
}

/// Counts of delivery outcomes by notifier (for tests and reports).
pub fn delivery_summary(records: &[DeliveryRecord]) -> HashMap<String, (u32, u32, u32)> {
    let mut m: HashMap<String, (u32, u32, u32)> = HashMap::new();
    for r in records {
        let e = m.entry(r.notifier.clone()).or_default();
        match r.outcome {
            DeliveryOutcome::Delivered => e.0 += 1,
            DeliveryOutcome::Retrying => e.1 += 1,
            DeliveryOutcome::GaveUp => e.2 += 1,
        }
    }
    m
}
