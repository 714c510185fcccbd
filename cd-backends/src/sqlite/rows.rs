//! Converting records to and from rows.

use chrono::{DateTime, Utc};
use rusqlite::types::Type;
use rusqlite::Row;
use serde::de::DeserializeOwned;

use cd_core::{
    ApprovalRecord, Decision, Event, EventKind, Lease, NodeRecord, NodeStatus, ReleaseRecord,
    ReleaseStatus, RunRecord, RunStatus, TargetRecord,
};

use super::{LockAuditRecord, LockWaiter};

/// A timestamp as fixed-width RFC 3339 text (text order is time order).
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

/// An optional timestamp.
pub(crate) fn ts_opt(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

fn conversion(col: usize, ty: Type, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        ty,
        Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        )),
    )
}

fn time(row: &Row<'_>, col: usize) -> rusqlite::Result<DateTime<Utc>> {
    let s: String = row.get(col)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| conversion(col, Type::Text, e))
}

fn time_opt(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match row.get::<_, Option<String>>(col)? {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(&s)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|e| conversion(col, Type::Text, e)),
    }
}

fn json<T: DeserializeOwned>(row: &Row<'_>, col: usize) -> rusqlite::Result<T> {
    let s: String = row.get(col)?;
    serde_json::from_str(&s).map_err(|e| conversion(col, Type::Text, e))
}

fn json_opt<T: DeserializeOwned>(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<T>> {
    match row.get::<_, Option<String>>(col)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| conversion(col, Type::Text, e)),
    }
}

fn parsed<T>(row: &Row<'_>, col: usize, parse: impl Fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let s: String = row.get(col)?;
    parse(&s).ok_or_else(|| conversion(col, Type::Text, format!("unknown value `{s}`")))
}

/// Serializes to JSON text (the types here always serialize).
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> cd_core::Result<String> {
    serde_json::to_string(v)
        .map_err(|e| cd_core::Error::store(format!("cannot encode a record as JSON: {e}")))
}

/// Columns of `runs`, in the order [`run`] reads them.
pub(crate) const RUN_COLUMNS: &str =
    "id, pipeline, definition_hash, release, environment, status, started_by, started_at, finished_at";

pub(crate) fn run(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: row.get(0)?,
        pipeline: row.get(1)?,
        definition_hash: row.get(2)?,
        release: json(row, 3)?,
        environment: row.get(4)?,
        status: parsed(row, 5, RunStatus::parse)?,
        started_by: row.get(6)?,
        started_at: time(row, 7)?,
        finished_at: time_opt(row, 8)?,
    })
}

/// Columns of `nodes`, in the order [`node`] reads them.
pub(crate) const NODE_COLUMNS: &str =
    "run_id, node, status, attempts, output, error, started_at, finished_at, recheck_at";

pub(crate) fn node(row: &Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        run_id: row.get(0)?,
        node: row.get(1)?,
        status: parsed(row, 2, NodeStatus::parse)?,
        attempts: row.get(3)?,
        output: json_opt(row, 4)?,
        error: json_opt(row, 5)?,
        started_at: time_opt(row, 6)?,
        finished_at: time_opt(row, 7)?,
        recheck_at: time_opt(row, 8)?,
    })
}

/// The `type` tag of an event kind, kept in its own column for filtering.
pub(crate) fn event_kind_tag(kind: &EventKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::Object(map)) => map
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown")
            .to_string(),
        _ => "unknown".to_string(),
    }
}

/// Columns of `events`, in the order [`event`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "run_id, seq, at, node, body";

pub(crate) fn event(row: &Row<'_>) -> rusqlite::Result<Event> {
    let seq: i64 = row.get(1)?;
    Ok(Event {
        run_id: row.get(0)?,
        seq: seq as u64,
        at: time(row, 2)?,
        node: row.get(3)?,
        kind: json(row, 4)?,
    })
}

pub(crate) fn decision_str(d: Decision) -> &'static str {
    match d {
        Decision::Approve => "approve",
        Decision::Reject => "reject",
    }
}

fn decision_parse(s: &str) -> Option<Decision> {
    match s {
        "approve" => Some(Decision::Approve),
        "reject" => Some(Decision::Reject),
        _ => None,
    }
}

/// Columns of `approvals`, in the order [`approval`] reads them.
pub(crate) const APPROVAL_COLUMNS: &str =
    "run_id, node, approver, decision, comment, at, decision_id, audit";

/// The audit fields of an approval, kept as JSON in `approvals.audit`.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(crate) struct ApprovalAudit {
    #[serde(default)]
    pub via: Option<String>,
    #[serde(default)]
    pub token_id: Option<String>,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub pipeline: Option<String>,
    #[serde(default)]
    pub definition_hash: Option<String>,
}

pub(crate) fn approval(row: &Row<'_>) -> rusqlite::Result<ApprovalRecord> {
    let audit: Option<String> = row.get(7)?;
    let audit: ApprovalAudit = match audit {
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, Box::new(e))
        })?,
        None => ApprovalAudit::default(),
    };
    Ok(ApprovalRecord {
        run_id: row.get(0)?,
        node: row.get(1)?,
        approver: row.get(2)?,
        decision: parsed(row, 3, decision_parse)?,
        comment: row.get(4)?,
        at: time(row, 5)?,
        decision_id: row.get(6)?,
        via: audit.via,
        token_id: audit.token_id,
        release: audit.release,
        pipeline: audit.pipeline,
        definition_hash: audit.definition_hash,
    })
}

/// Columns of `locks`, in the order [`lease`] reads them.
pub(crate) const LEASE_COLUMNS: &str =
    "environment, holder, run_id, message, acquired_at, renewed_at, expires_at";

pub(crate) fn lease(row: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        environment: row.get(0)?,
        holder: row.get(1)?,
        run_id: row.get(2)?,
        message: row.get(3)?,
        acquired_at: time(row, 4)?,
        renewed_at: time(row, 5)?,
        expires_at: time(row, 6)?,
    })
}

/// Columns of `releases`, in the order [`release`] reads them.
pub(crate) const RELEASE_COLUMNS: &str =
    "id, environment, version, release, revisions, status, run_id, actor, at, updated_at, restored_from";

pub(crate) fn release(row: &Row<'_>) -> rusqlite::Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        id: row.get(0)?,
        environment: row.get(1)?,
        version: row.get(2)?,
        release: json(row, 3)?,
        revisions: json(row, 4)?,
        status: parsed(row, 5, ReleaseStatus::parse)?,
        run_id: row.get(6)?,
        actor: row.get(7)?,
        at: time(row, 8)?,
        updated_at: time(row, 9)?,
        restored_from: row.get(10)?,
    })
}

/// Columns of `lock_waiters`, in the order [`waiter`] reads them.
pub(crate) const WAITER_COLUMNS: &str = "environment, holder, first_at, last_at";

pub(crate) fn waiter(row: &Row<'_>) -> rusqlite::Result<LockWaiter> {
    Ok(LockWaiter {
        environment: row.get(0)?,
        holder: row.get(1)?,
        waiting_since: time(row, 2)?,
        last_asked: time(row, 3)?,
    })
}

/// Columns of `lock_audit`, in the order [`audit`] reads them.
pub(crate) const AUDIT_COLUMNS: &str =
    "environment, action, holder, run_id, message, actor, reason, at";

pub(crate) fn audit(row: &Row<'_>) -> rusqlite::Result<LockAuditRecord> {
    Ok(LockAuditRecord {
        environment: row.get(0)?,
        action: row.get(1)?,
        holder: row.get(2)?,
        run_id: row.get(3)?,
        message: row.get(4)?,
        actor: row.get(5)?,
        reason: row.get(6)?,
        at: time(row, 7)?,
    })
}

/// A `target_records` row (`seq, scope, target, entry, at`).
pub(crate) fn target_record(row: &Row<'_>) -> rusqlite::Result<TargetRecord> {
    let seq: i64 = row.get(0)?;
    Ok(TargetRecord {
        seq: seq.max(0) as u64,
        scope: row.get(1)?,
        target: row.get(2)?,
        entry: json(row, 3)?,
        at: time(row, 4)?,
    })
}

/// An `incidents` row's `record` column.
pub(crate) fn incident(row: &Row<'_>) -> rusqlite::Result<cd_core::IncidentRecord> {
    json(row, 0)
}

/// A `deliveries` row (`seq, record`).
pub(crate) fn delivery(row: &Row<'_>) -> rusqlite::Result<cd_core::incident::DeliveryRecord> {
    let seq: i64 = row.get(0)?;
    let mut r: cd_core::incident::DeliveryRecord = json(row, 1)?;
    r.seq = seq.max(0) as u64;
    Ok(r)
}

/// A `release_documents` row (`record, content`).
pub(crate) fn release_document(row: &Row<'_>) -> rusqlite::Result<cd_core::ReleaseDocument> {
    let mut d: cd_core::ReleaseDocument = json(row, 0)?;
    d.content = row.get(1)?;
    Ok(d)
}

/// An `approval_requests` row's `record` column.
pub(crate) fn approval_request(
    row: &Row<'_>,
) -> rusqlite::Result<cd_core::approval::ApprovalRequest> {
    json(row, 0)
}

/// A `tokens` row's `record` column.
pub(crate) fn token(row: &Row<'_>) -> rusqlite::Result<cd_core::approval::TokenRecord> {
    json(row, 0)
}
