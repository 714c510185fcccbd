//! Human approval that cannot be bypassed: identities, API tokens, the
//! request an approval gate records when it waits, and the one function
//! every tool uses to record a decision ([`record_decision`]).
//!
//! The model, as GitLab protected environments and Spinnaker manual
//! judgments do it:
//!
//! - **Identities** are normalised names ([`identity`]): lower case,
//!   `a-z 0-9 . _ @ -`, 1 to 64 characters. `"alice "`, `"Alice"` and
//!   `""` are not three more people: the first and last are refused, the
//!   second is `alice`.
//! - **Tokens** ([`issue_token`], [`authenticate`]) prove an identity:
//!   `cdt_<id>_<secret>`, 12 hex digits of id and 64 of secret (256 random
//!   bits), shown once; the store keeps HMAC-SHA256(key = id, secret) and
//!   compares in constant time. Tokens can expire and be revoked.
//! - An approval gate, when it first waits, stores an [`ApprovalRequest`]:
//!   who may decide (approvers, groups with their own counts, how many in
//!   all), who may not (the run's actor and the release's author: four
//!   eyes), when it expires, whether a comment is required, and for which
//!   run, node, release and pipeline definition hash.
//! - [`record_decision`] checks a decision against that request before
//!   anything is written: the run is running, the gate is waiting, the
//!   request is for this run's definition, it has not expired, the person
//!   may decide, the comment is there when required, the person has not
//!   decided already, the decision id has not been seen (a replay). Every
//!   refusal is a typed error naming who may decide; nothing is recorded.
//! - The gate counts only records that pass the same checks again (a
//!   record without its audit fields, for another definition, or after
//!   expiry counts for nothing). The store itself is trusted: whoever can
//!   write it can create tokens and records (see the README's security
//!   model); keep it writable by the deploy identity only.
//!
//! ```
//! use cd_core::approval::{identity, issue_token, authenticate_record};
//! assert_eq!(identity("Alice").unwrap(), "alice");
//! assert!(identity("alice ").is_err());
//! assert!(identity("").is_err());
//!
//! let (record, token) = issue_token("alice", None, "admin").unwrap();
//! let now = chrono::Utc::now();
//! assert_eq!(authenticate_record(&record, token.expose(), now).unwrap(), "alice");
//! let wrong = format!("cdt_{}_{}", record.id, "0".repeat(64));
//! assert!(authenticate_record(&record, &wrong, now).is_err());
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, ErrorKind, Result};
use crate::event::RunStatus;
use crate::store::{ApprovalRecord, Decision, NodeStatus, Store};
use crate::Secret;

/// The longest identity, in characters.
pub const MAX_IDENTITY_LEN: usize = 64;

/// The normalised form of a person's name: lower case; only `a-z`, `0-9`,
/// `.`, `_`, `@` and `-`; 1 to [`MAX_IDENTITY_LEN`] characters.
///
/// Errors: [`ErrorKind::Invalid`] naming the name (escaped) and the
/// character at fault. Surrounding spaces are an error, not trimmed: a
/// name is typed once, when its token is created.
pub fn identity(name: &str) -> Result<String> {
    if name.is_empty() {
        return Err(Error::invalid("an identity cannot be empty"));
    }
    if name.chars().count() > MAX_IDENTITY_LEN {
        return Err(Error::invalid(format!(
            "identity {name:?} is longer than {MAX_IDENTITY_LEN} characters"
        )));
    }
    let lower = name.to_lowercase();
    if let Some(bad) = lower
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_@".contains(*c)))
    {
        return Err(Error::invalid(format!(
            "identity {name:?} has {bad:?}: use a-z, 0-9, '.', '_', '@' and '-'"
        )));
    }
    Ok(lower)
}

/// A stored API token: who it proves, its hash, its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its public id (12 hex digits), also inside the token.
    pub id: String,
    /// The identity it proves.
    pub identity: String,
    /// HMAC-SHA256 of the secret part, keyed with the id, hex.
    pub hash: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

fn token_hash(id: &str, secret: &str) -> String {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(id.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(secret.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `bytes` random bytes from the operating system's generator, as
/// lowercase hex (`2 * bytes` characters): token secrets, session ids,
/// CSRF tokens.
pub fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    while out.len() < bytes * 2 {
        // uuid v4 draws from the OS generator (getrandom): 122 random bits
        // per uuid, of which we take the 15 fully random bytes.
        let u = uuid::Uuid::new_v4();
        let b = u.as_bytes();
        for (i, x) in b.iter().enumerate() {
            // Bytes 6 and 8 carry version and variant bits.
            if i == 6 || i == 8 {
                continue;
            }
            if out.len() < bytes * 2 {
                out.push_str(&format!("{x:02x}"));
            }
        }
    }
    out
}

/// Creates a token for `identity` (normalised with [`identity`]), valid
/// for `expires_in` (forever when `None`). Returns the record to store and
/// the token, which exists nowhere else: show it once.
///
/// Errors: [`ErrorKind::Invalid`] for a bad identity.
pub fn issue_token(
    name: &str,
    expires_in: Option<Duration>,
    created_by: &str,
) -> Result<(TokenRecord, Secret<String>)> {
    let who = identity(name)?;
    let id = random_hex(6);
    let secret = random_hex(32);
    let now = Utc::now();
    let record = TokenRecord {
        hash: token_hash(&id, &secret),
        id: id.clone(),
        identity: who,
        created_at: now,
        created_by: created_by.to_string(),
        expires_at: expires_in.map(|d| now + crate::clock::chrono_duration(d)),
        revoked_at: None,
    };
    Ok((record, Secret::new(format!("cdt_{id}_{secret}"))))
}

/// Splits `cdt_<id>_<secret>`; the id alone is safe to show.
///
/// Errors: [`ErrorKind::Auth`] when it is not of that form.
pub fn token_id(token: &str) -> Result<&str> {
    let token = token.trim();
    let rest = token.strip_prefix("cdt_").ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, 12) || !hex(secret, 64) {
        return Err(malformed());
    }
    Ok(id)
}

fn malformed() -> Error {
    Error::new(
        ErrorKind::Auth,
        "not a cd token (expected cdt_<12 hex>_<64 hex>, as `cdctl token create` prints)",
    )
}

/// Checks `token` against its stored record at `now`; returns the
/// identity it proves.
///
/// Errors ([`ErrorKind::Auth`], the secret never in the message): a
/// malformed token, a token of another record, a wrong secret, a revoked
/// or an expired token.
pub fn authenticate_record(
    record: &TokenRecord,
    token: &str,
    now: DateTime<Utc>,
) -> Result<String> {
    let id = token_id(token)?;
    if id != record.id {
        return Err(Error::new(ErrorKind::Auth, format!("unknown token {id}")));
    }
    let secret = &token.trim()[4 + 12 + 1..];
    let want = token_hash(id, secret);
    let equal: bool = subtle::ConstantTimeEq::ct_eq(want.as_bytes(), record.hash.as_bytes()).into();
    if !equal {
        return Err(Error::new(
            ErrorKind::Auth,
            format!("token {id} does not match (wrong secret)"),
        ));
    }
    if let Some(at) = record.revoked_at {
        return Err(Error::new(
            ErrorKind::Auth,
            format!(
                "token {id} of {} was revoked at {}",
                record.identity,
                at.to_rfc3339()
            ),
        ));
    }
    if let Some(at) = record.expires_at.filter(|at| *at <= now) {
        return Err(Error::new(
            ErrorKind::Auth,
            format!(
                "token {id} of {} expired at {}",
                record.identity,
                at.to_rfc3339()
            ),
        ));
    }
    Ok(record.identity.clone())
}

/// Someone deciding, and how they proved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The normalised identity.
    pub identity: String,
    /// The token that proved it, if a token did.
    pub token_id: Option<String>,
    /// From where: `cli user@host`, `http 10.0.0.7:53122`, `in-process`.
    pub via: String,
}

impl Actor {
    /// Trusts `name` without a token: for code that authenticated the
    /// person by its own means (an SSO proxy in front of the console, a
    /// deploy binary run by a CI system that vouches for its user).
    /// Choosing this is explicit and recorded: `via` says `trusted: ...`.
    ///
    /// Errors: [`ErrorKind::Invalid`] for a bad identity.
    pub fn trusted(name: &str, via: &str) -> Result<Actor> {
        Ok(Actor {
            identity: identity(name)?,
            token_id: None,
            via: format!("trusted: {via}"),
        })
    }
}

/// Authenticates `token` against the store.
///
/// Errors: [`ErrorKind::Auth`] for no token, a malformed, unknown, wrong,
/// revoked or expired one; store errors.
pub async fn authenticate(store: &dyn Store, token: Option<&str>, via: &str) -> Result<Actor> {
    let token = token.filter(|t| !t.trim().is_empty()).ok_or_else(|| {
        Error::new(
            ErrorKind::Auth,
            "no token given: a decision needs an approver's token (`cdctl token create <name>`)",
        )
    })?;
    let id = token_id(token)?;
    let record = store
        .token(id)
        .await?
        .ok_or_else(|| Error::new(ErrorKind::Auth, format!("unknown token {id}")))?;
    let identity = authenticate_record(&record, token, Utc::now())?;
    Ok(Actor {
        identity,
        token_id: Some(record.id),
        via: via.to_string(),
    })
}

/// Who may not decide on a release: the run's actor (`started this run`)
/// and the release's author (release configuration key `author`: `authored
/// release v42`). Fails closed: an actor or author that is given but is
/// not an identity is an error, not silently no exclusion. An empty actor
/// (a detached context) excludes nobody.
///
/// Errors: [`ErrorKind::Invalid`] naming the value at fault.
pub fn exclusions(actor: &str, release: &crate::Release) -> Result<Vec<Excluded>> {
    let mut out = Vec::new();
    if !actor.is_empty() {
        let who = identity(actor).map_err(|e| {
            Error::invalid(format!(
                "the run's actor {actor:?} is not an identity ({}): set Runner::actor to the person's identity so four eyes can exclude them",
                e.message()
            ))
        })?;
        out.push(Excluded {
            identity: who,
            why: "started this run".into(),
        });
    }
    if let Some(author) = release.config.get("author") {
        let name = author.as_str().ok_or_else(|| {
            Error::invalid(format!(
                "release {}: `author` must be an identity string, not {author}",
                release.version
            ))
        })?;
        let who = identity(name).map_err(|e| {
            Error::invalid(format!(
                "release {}: author {name:?} is not an identity ({})",
                release.version,
                e.message()
            ))
        })?;
        if !out.iter().any(|e| e.identity == who) {
            out.push(Excluded {
                identity: who,
                why: format!("authored release {}", release.version),
            });
        }
    }
    Ok(out)
}

/// A group of approvers with its own required count (`2 of sre`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverGroup {
    /// Its name (`sre`).
    pub name: String,
    /// Its members, normalised.
    pub members: Vec<String>,
    /// How many distinct members must approve.
    pub required: usize,
}

/// Someone who may not decide, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    /// The identity.
    pub identity: String,
    /// Why (`started this run`, `authored release v42`).
    pub why: String,
}

/// What an approval gate requires, stored when it first waits; tools read
/// it to refuse a decision the gate would not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// The run.
    pub run_id: String,
    /// The gate's node.
    pub node: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's definition hash: decisions for another never count.
    pub definition_hash: String,
    /// The release version.
    pub release: String,
    /// The environment.
    pub environment: String,
    /// Listed approvers (any of them counts towards `required`).
    pub approvers: Vec<String>,
    /// Anyone may approve (chosen explicitly with `ApprovalGate::anyone`).
    pub anyone: bool,
    /// Groups, each with its own count.
    pub groups: Vec<ApproverGroup>,
    /// Distinct approvals needed from `approvers` (or anyone).
    pub required: usize,
    /// Who may not decide.
    pub excluded: Vec<Excluded>,
    /// A comment is required with every decision.
    pub comment_required: bool,
    /// When the request was first made.
    pub created_at: DateTime<Utc>,
    /// After this, no decision is taken and the gate fails.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where an [`ApprovalRequest`] stands given the decisions on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tally {
    /// Enough approvals.
    Approved(Vec<String>),
    /// Someone who may decide rejected it.
    Rejected {
        /// Who.
        by: String,
        /// Their comment.
        comment: Option<String>,
    },
    /// Not yet: what is missing.
    Waiting {
        /// Who approved so far.
        approved: Vec<String>,
        /// What is still needed, in words.
        missing: String,
    },
}

fn list(names: &[String]) -> String {
    match names.len() {
        0 => "nobody".into(),
        1 => names[0].clone(),
        n => format!("{} or {}", names[..n - 1].join(", "), names[n - 1]),
    }
}

impl ApprovalRequest {
    /// Everyone named as an approver (listed and group members), in order,
    /// without repeats or excluded people.
    pub fn eligible_people(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.approvers
            .iter()
            .chain(self.groups.iter().flat_map(|g| g.members.iter()))
            .filter(|p| !self.excluded.iter().any(|e| &e.identity == *p))
            .filter(|p| seen.insert(p.to_string()))
            .cloned()
            .collect()
    }

    /// Who may decide, in words: `alice, bob or carol (2 distinct); group
    /// sre: 1 of dave or erin; not mallory (started this run)`.
    pub fn who(&self) -> String {
        let mut parts = Vec::new();
        let listed: Vec<String> = self
            .approvers
            .iter()
            .filter(|p| !self.excluded.iter().any(|e| &e.identity == *p))
            .cloned()
            .collect();
        if self.anyone {
            parts.push(if self.required > 1 {
                format!("anyone ({} distinct)", self.required)
            } else {
                "anyone".into()
            });
        } else if !listed.is_empty() {
            parts.push(if self.required > 1 {
                format!("{} ({} distinct)", list(&listed), self.required)
            } else {
                list(&listed)
            });
        }
        for g in &self.groups {
            let members: Vec<String> = g
                .members
                .iter()
                .filter(|p| !self.excluded.iter().any(|e| &e.identity == *p))
                .cloned()
                .collect();
            parts.push(format!(
                "group {}: {} of {}",
                g.name,
                g.required,
                list(&members)
            ));
        }
        let mut s = parts.join("; and ");
        if !self.excluded.is_empty() {
            let ex: Vec<String> = self
                .excluded
                .iter()
                .map(|e| format!("{} ({})", e.identity, e.why))
                .collect();
            s.push_str(&format!("; not {}", ex.join(", ")));
        }
        s
    }

    /// Whether `who` may decide; the refusal says why and who may.
    pub fn check_eligible(&self, who: &str) -> std::result::Result<(), String> {
        if let Some(e) = self.excluded.iter().find(|e| e.identity == who) {
            return Err(format!(
                "{who} may not decide `{}` of run {}: {} (four eyes); who may: {}",
                self.node,
                self.run_id,
                e.why,
                self.who()
            ));
        }
        let listed = self.anyone || self.approvers.iter().any(|a| a == who);
        let in_group = self
            .groups
            .iter()
            .any(|g| g.members.iter().any(|m| m == who));
        if listed || in_group {
            return Ok(());
        }
        Err(format!(
            "{who} may not decide `{}` of run {}; who may: {}",
            self.node,
            self.run_id,
            self.who()
        ))
    }

    /// Whether the request has expired at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether a stored record counts for this request: same run, node and
    /// definition, audited (a decision id and where it came from, as
    /// [`record_decision`] writes), an eligible person, made before expiry,
    /// with a comment when one is required.
    pub fn counts(&self, r: &ApprovalRecord) -> bool {
        r.run_id == self.run_id
            && r.node == self.node
            && r.decision_id.is_some()
            && r.via.is_some()
            && r.definition_hash.as_deref() == Some(self.definition_hash.as_str())
            && self.check_eligible(&r.approver).is_ok()
            && self.expires_at.is_none_or(|at| r.at < at)
            && (!self.comment_required
                || r.comment.as_deref().is_some_and(|c| !c.trim().is_empty()))
    }

    /// Tallies the records that count (oldest first; a person's latest
    /// decision is theirs).
    pub fn tally(&self, records: &[ApprovalRecord]) -> Tally {
        let mut latest: std::collections::BTreeMap<&str, &ApprovalRecord> = Default::default();
        for r in records.iter().filter(|r| self.counts(r)) {
            latest.insert(r.approver.as_str(), r);
        }
        if let Some(r) = latest
            .values()
            .filter(|r| r.decision == Decision::Reject)
            .max_by_key(|r| r.at)
        {
            return Tally::Rejected {
                by: r.approver.clone(),
                comment: r.comment.clone(),
            };
        }
        let approved: Vec<String> = latest
            .values()
            .filter(|r| r.decision == Decision::Approve)
            .map(|r| r.approver.clone())
            .collect();
        let mut missing = Vec::new();
        // One approval counts once: group members fill their groups first
        // (up to each group's count), the rest count towards `anyone`.
        let mut used: BTreeSet<&str> = BTreeSet::new();
        for g in &self.groups {
            for a in approved
                .iter()
                .filter(|a| g.members.contains(a))
                .take(g.required)
            {
                used.insert(a.as_str());
            }
        }
        let listed_ok = if self.anyone {
            approved
                .iter()
                .filter(|a| !used.contains(a.as_str()))
                .count()
        } else {
            approved
                .iter()
                .filter(|a| self.approvers.contains(a))
                .count()
        };
        if (self.anyone || !self.approvers.is_empty()) && listed_ok < self.required {
            missing.push(format!(
                "{} more from {}",
                self.required - listed_ok,
                if self.anyone {
                    "anyone".to_string()
                } else {
                    list(
                        &self
                            .approvers
                            .iter()
                            .filter(|p| !self.excluded.iter().any(|e| &e.identity == *p))
                            .filter(|p| !approved.contains(p))
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                }
            ));
        }
        for g in &self.groups {
            let have = approved.iter().filter(|a| g.members.contains(a)).count();
            if have < g.required {
                missing.push(format!("{} more from group {}", g.required - have, g.name));
            }
        }
        if missing.is_empty() {
            Tally::Approved(approved)
        } else {
            Tally::Waiting {
                approved,
                missing: missing.join(" and "),
            }
        }
    }
}

/// A decision someone wants recorded.
#[derive(Debug, Clone)]
pub struct DecisionRequest {
    /// The run id (full).
    pub run_id: String,
    /// The gate's node.
    pub node: String,
    /// Approve or reject.
    pub decision: Decision,
    /// Why.
    pub comment: Option<String>,
    /// A unique id for this decision (a form's one-time nonce, a UUID);
    /// seen twice, the second is a replay and refused.
    pub decision_id: String,
}

/// Checks a decision against the gate's stored [`ApprovalRequest`] and
/// records it. Nothing is written when any check fails.
///
/// Errors: [`ErrorKind::NotFound`] (no such run; the node has not asked
/// for a decision); [`ErrorKind::Conflict`] (the run is not running, the
/// gate is not waiting, the request belongs to another definition, it
/// expired, this person already decided, the decision id was seen);
/// [`ErrorKind::Auth`] (the person may not decide: the message lists who
/// may); [`ErrorKind::Invalid`] (a comment is required).
pub async fn record_decision(
    store: &dyn Store,
    actor: &Actor,
    d: &DecisionRequest,
) -> Result<ApprovalRecord> {
    let run = store
        .get_run(&d.run_id)
        .await?
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no run {}", d.run_id)))?;
    if run.status != RunStatus::Running {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "run {} already finished ({}); nothing to decide",
                run.id, run.status
            ),
        ));
    }
    let request = store.approval_request(&run.id, &d.node).await?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "node `{}` of run {} has not asked for a decision (not an approval gate, or not reached yet)",
                d.node, run.id
            ),
        )
    })?;
    if request.definition_hash != run.definition_hash {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the approval request of `{}` was made for another definition of pipeline {} ({} ≠ {}): decide again on the current run",
                d.node,
                run.pipeline,
                short(&request.definition_hash),
                short(&run.definition_hash)
            ),
        ));
    }
    let waiting = store
        .nodes(&run.id)
        .await?
        .into_iter()
        .find(|n| *n.node == *d.node)
        .map(|n| n.status);
    // Running: the gate is being evaluated (a recheck) right now.
    if !matches!(waiting, Some(NodeStatus::Waiting | NodeStatus::Running)) {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "node `{}` of run {} is not waiting for a decision ({})",
                d.node,
                run.id,
                waiting.map(|s| s.as_str()).unwrap_or("not started")
            ),
        ));
    }
    let now = Utc::now();
    if request.expired(now) {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the approval of `{}` in run {} expired at {}",
                d.node,
                run.id,
                request
                    .expires_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
        ));
    }
    request
        .check_eligible(&actor.identity)
        .map_err(|why| Error::new(ErrorKind::Auth, why))?;
    let comment = d
        .comment
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty());
    if request.comment_required && comment.is_none() {
        return Err(Error::invalid(format!(
            "`{}` of run {} requires a comment with every decision",
            d.node, run.id
        )));
    }
    let existing = store.approvals(&run.id, &d.node).await?;
    if existing
        .iter()
        .any(|r| r.decision_id.as_deref() == Some(d.decision_id.as_str()))
    {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("decision {} was already recorded (a replay)", d.decision_id),
        ));
    }
    if let Some(prev) = existing
        .iter()
        .rev()
        .find(|r| request.counts(r) && r.approver == actor.identity)
    {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} already {} `{}` of run {} at {}; one person counts once",
                actor.identity,
                match prev.decision {
                    Decision::Approve => "approved",
                    Decision::Reject => "rejected",
                },
                d.node,
                run.id,
                prev.at.to_rfc3339()
            ),
        ));
    }
    let record = ApprovalRecord {
        run_id: run.id.clone(),
        node: d.node.clone(),
        approver: actor.identity.clone(),
        decision: d.decision,
        comment: comment.map(str::to_string),
        at: now,
        decision_id: Some(d.decision_id.clone()),
        via: Some(actor.via.clone()),
        token_id: actor.token_id.clone(),
        release: Some(run.release.version.clone()),
        pipeline: Some(run.pipeline.clone()),
        definition_hash: Some(run.definition_hash.clone()),
    };
    store.put_approval(&record).await?;
    Ok(record)
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}
