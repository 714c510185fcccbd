//! `ApprovalGate`: people must approve before the run goes on, and only
//! the people who may.

use std::time::Duration;

use async_trait::async_trait;
use cd_core::approval::{identity, ApprovalRequest, ApproverGroup, Tally};
use cd_core::{ApprovalRecord, Decision, Error, ErrorKind, Gate, Result, StageContext, Verdict};
use chrono::Utc;

/// Human approval, durable and authenticated (see [`cd_core::approval`]).
///
/// When it first waits, the gate stores an [`ApprovalRequest`]: who may
/// decide, how many must, who may not (the run's actor and the release's
/// author, taken from the release configuration key `author`: four eyes),
/// when it expires, whether a comment is required. Decisions are recorded
/// through [`cd_core::approval::record_decision`] (`cdctl approve` with an
/// approver's token, the web console), which refuses anyone the request
/// does not allow. The gate itself counts only records that pass the same
/// checks for this run, node and pipeline definition:
/// - a rejection by someone who may decide fails the gate, naming who and
///   why;
/// - enough distinct approvals pass it: `required` from the listed
///   approvers (one by default, two with [`ApprovalGate::four_eyes`]) and
///   each group's own count;
/// - past its expiry it fails;
/// - otherwise it waits, and its reason says who may approve and how.
///
/// A person's latest decision is theirs. While the gate waits the runner
/// holds no thread and re-evaluates it every [`ApprovalGate::recheck_every`];
/// the wait survives a restart.
///
/// Building a pipeline with a gate that names nobody is an error:
/// [`ApprovalGate::anyone`] must be chosen explicitly. Names are
/// identities ([`cd_core::approval::identity`]).
///
/// ```
/// use std::sync::Arc;
/// use cd_core::{Gate, MemoryStore, Release, StageContext, Verdict};
/// use cd_stages::ApprovalGate;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let gate = ApprovalGate::any_of(["alice", "bob"]).four_eyes();
/// let cx = StageContext::detached("approval", Release::new("v42"), Arc::new(MemoryStore::new()));
/// match gate.evaluate(&cx).await.unwrap() {
///     Verdict::Wait { reason, .. } => assert!(reason.contains("alice or bob (2 distinct)")),
///     other => panic!("{other:?}"),
/// }
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct ApprovalGate {
    approvers: Vec<String>,
    anyone: bool,
    groups: Vec<ApproverGroup>,
    required: usize,
    recheck: Duration,
    auto_approve: Option<String>,
    expires_after: Option<Duration>,
    comment_required: bool,
    self_approval: bool,
}

impl ApprovalGate {
    /// Approval by any one of these people (see [`ApprovalGate::required`]).
    /// An empty list is refused when the pipeline is built.
    pub fn any_of<I, S>(approvers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ApprovalGate {
            approvers: approvers.into_iter().map(Into::into).collect(),
            anyone: false,
            groups: Vec::new(),
            required: 1,
            recheck: Duration::from_secs(5),
            auto_approve: None,
            expires_after: None,
            comment_required: false,
            self_approval: false,
        }
    }

    /// Approval by anyone who holds a token (still not the run's actor or
    /// the release's author).
    pub fn anyone() -> Self {
        let mut g = Self::any_of(Vec::<String>::new());
        g.anyone = true;
        g
    }

    /// Also requires `required` distinct approvals from the members of
    /// group `name` (N of M), on top of the listed approvers' count. A
    /// gate with only groups: `ApprovalGate::any_of(Vec::<String>::new())
    /// .group(...)`.
    pub fn group<I, S>(mut self, name: impl Into<String>, members: I, required: usize) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.groups.push(ApproverGroup {
            name: name.into(),
            members: members.into_iter().map(Into::into).collect(),
            required: required.max(1),
        });
        self
    }

    /// Requires two distinct approvers (the four-eyes principle; the run's
    /// actor and the release's author are never among them).
    pub fn four_eyes(self) -> Self {
        self.required(2)
    }

    /// Requires `n` distinct approvers (at least 1).
    pub fn required(mut self, n: usize) -> Self {
        self.required = n.max(1);
        self
    }

    /// The request expires `after` its first wait: no decision is taken
    /// then, and the gate fails.
    pub fn expires_after(mut self, after: Duration) -> Self {
        self.expires_after = Some(after);
        self
    }

    /// Every decision needs a comment.
    pub fn require_comment(mut self) -> Self {
        self.comment_required = true;
        self
    }

    /// Lets the run's actor and the release's author decide too (off by
    /// default; for one-person teams and demos).
    pub fn allow_self_approval(mut self) -> Self {
        self.self_approval = true;
        self
    }

    /// How often the runner asks again while waiting (default 5 s).
    pub fn recheck_every(mut self, d: Duration) -> Self {
        self.recheck = d;
        self
    }

    /// For demos and tests: when nobody has decided yet, the gate records
    /// an approval by `name` itself (comment `auto-approved`, via
    /// `auto-approve`) and passes. This is trust chosen in code, like
    /// [`cd_core::approval::Actor::trusted`]. A recorded rejection still
    /// fails the gate.
    pub fn auto_approve_as(mut self, name: impl Into<String>) -> Self {
        self.auto_approve = Some(name.into());
        self
    }

    /// Like [`ApprovalGate::auto_approve_as`] when `name` is `Some`; does
    /// nothing otherwise (handy with a `--auto-approve` flag).
    pub fn auto_approve_if(self, name: Option<impl Into<String>>) -> Self {
        match name {
            Some(n) => self.auto_approve_as(n),
            None => self,
        }
    }

    fn normalised(names: &[String]) -> Result<Vec<String>> {
        names.iter().map(|n| identity(n)).collect()
    }

    /// The request this gate makes in `cx` (normalised names, exclusions,
    /// expiry from now).
    pub fn request(&self, cx: &StageContext) -> Result<ApprovalRequest> {
        let now = Utc::now();
        let excluded = if self.self_approval {
            Vec::new()
        } else {
            cd_core::approval::exclusions(cx.actor(), cx.release())
                .map_err(|e| e.with("node", cx.node()))?
        };
        Ok(ApprovalRequest {
            run_id: cx.run_id().to_string(),
            node: cx.node().to_string(),
            pipeline: cx.pipeline().to_string(),
            definition_hash: cx.definition_hash().to_string(),
            release: cx.release().version.clone(),
            environment: cx.environment().to_string(),
            approvers: Self::normalised(&self.approvers)?,
            anyone: self.anyone,
            groups: self
                .groups
                .iter()
                .map(|g| {
                    Ok(ApproverGroup {
                        name: g.name.clone(),
                        members: Self::normalised(&g.members)?,
                        required: g.required,
                    })
                })
                .collect::<Result<_>>()?,
            required: self.required,
            excluded,
            comment_required: self.comment_required,
            created_at: now,
            expires_at: self
                .expires_after
                .map(|d| now + cd_core::clock::chrono_duration(d)),
        })
    }

    /// Decides from a request and the records of its gate (oldest first).
    pub fn decide(&self, request: &ApprovalRequest, records: &[ApprovalRecord]) -> Verdict {
        match request.tally(records) {
            Tally::Approved(_) => Verdict::Pass,
            Tally::Rejected { by, comment } => {
                let why = comment
                    .as_deref()
                    .filter(|c| !c.trim().is_empty())
                    .unwrap_or("no reason given");
                Verdict::fail(format!("rejected by {by}: {why}"))
            }
            Tally::Waiting { approved, missing } => {
                let so_far = if approved.is_empty() {
                    String::new()
                } else {
                    format!("; approved so far by {}", approved.join(", "))
                };
                let now = Utc::now();
                if let Some(at) = request.expires_at.filter(|at| *at <= now) {
                    return Verdict::fail(format!(
                        "approval expired at {} ({missing} still needed{so_far})",
                        at.to_rfc3339()
                    ));
                }
                let recheck = match request.expires_at {
                    Some(at) => self.recheck.min((at - now).to_std().unwrap_or_default()),
                    None => self.recheck,
                };
                Verdict::wait(
                    recheck,
                    format!(
                        "waiting for approval of `{}` ({missing}{so_far}); who may decide: {}. Approve with `cdctl approve {} {}` and an approver's token (or reject with `cdctl reject ... --comment <why>`)",
                        request.node, request.who(), request.run_id, request.node
                    ),
                )
            }
        }
    }
}

#[async_trait]
impl Gate for ApprovalGate {
    fn kind(&self) -> String {
        "approval".into()
    }

    fn fingerprint(&self) -> String {
        format!(
            "approval:{:?}:{}:{:?}:{}:{:?}:{:?}:{}:{}",
            self.approvers,
            self.anyone,
            self.groups,
            self.required,
            self.auto_approve,
            self.expires_after,
            self.comment_required,
            self.self_approval
        )
    }

    fn validate(&self) -> Result<()> {
        if !self.anyone && self.approvers.is_empty() && self.groups.is_empty() {
            return Err(Error::invalid(
                "the approval gate names no approver: list them (ApprovalGate::any_of, ::group) or choose ApprovalGate::anyone() explicitly",
            ));
        }
        for name in self
            .approvers
            .iter()
            .chain(self.groups.iter().flat_map(|g| g.members.iter()))
            .chain(self.auto_approve.iter())
        {
            identity(name)?;
        }
        for g in &self.groups {
            if g.members.len() < g.required {
                return Err(Error::invalid(format!(
                    "approval group {} needs {} approvals but has {} member(s)",
                    g.name,
                    g.required,
                    g.members.len()
                )));
            }
        }
        let mut seen: std::collections::BTreeMap<String, String> = Default::default();
        for (who, place) in self
            .approvers
            .iter()
            .map(|a| (a, "the listed approvers".to_string()))
            .chain(self.groups.iter().flat_map(|g| {
                g.members
                    .iter()
                    .map(move |m| (m, format!("group {}", g.name)))
            }))
        {
            let id = identity(who)?;
            if let Some(other) = seen.insert(id.clone(), place.clone()) {
                if other != place {
                    return Err(Error::invalid(format!(
                        "{id} is in {other} and in {place}: one approval would count twice; list each person once"
                    )));
                }
            }
        }
        if self.auto_approve.is_some() && (self.required > 1 || !self.groups.is_empty()) {
            return Err(Error::invalid(
                "auto-approve would satisfy several distinct approvals (four eyes, groups) on its own: use it only with one required approval",
            ));
        }
        if !self.anyone && !self.approvers.is_empty() && self.approvers.len() < self.required {
            return Err(Error::invalid(format!(
                "the approval gate needs {} distinct approvals but lists {} approver(s)",
                self.required,
                self.approvers.len()
            )));
        }
        Ok(())
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        self.validate().map_err(|e| e.with("node", cx.node()))?;
        let mine = self.request(cx)?;
        // The first request stands (its expiry too), across restarts.
        let request = match cx.store().put_approval_request(&mine).await {
            Ok(stored) => stored,
            Err(e) if e.kind() == ErrorKind::Unsupported => mine,
            Err(e) => return Err(e),
        };
        let records = cx.store().approvals(cx.run_id(), cx.node()).await?;
        let verdict = self.decide(&request, &records);
        if let (Verdict::Wait { .. }, Some(name)) = (&verdict, &self.auto_approve) {
            let name = identity(name)?;
            if let Some(e) = request.excluded.iter().find(|e| e.identity == name) {
                cx.log(format!(
                    "not auto-approving as {name}: {} (four eyes)",
                    e.why
                ));
                return Ok(verdict);
            }
            cx.store()
                .put_approval(&ApprovalRecord {
                    comment: Some("auto-approved".into()),
                    decision_id: Some(uuid::Uuid::new_v4().to_string()),
                    via: Some("auto-approve".into()),
                    release: Some(cx.release().version.clone()),
                    pipeline: Some(cx.pipeline().to_string()),
                    definition_hash: Some(cx.definition_hash().to_string()),
                    ..ApprovalRecord::new(cx.run_id(), cx.node(), &name, Decision::Approve)
                })
                .await?;
            cx.log(format!("auto-approved as {name}"));
            return Ok(Verdict::Pass);
        }
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cd_core::{MemoryStore, Release, Store};

    use super::*;

    fn cx(store: &Arc<MemoryStore>) -> StageContext {
        StageContext::detached(
            "approval",
            Release::new("v1").config("author", "dana"),
            store.clone(),
        )
        .with_actor("carl")
        .with_definition_hash("def1")
    }

    async fn try_decide(
        store: &Arc<MemoryStore>,
        who: &str,
        decision: Decision,
        comment: Option<&str>,
    ) -> Result<()> {
        store
            .put_approval(&ApprovalRecord {
                comment: comment.map(str::to_string),
                definition_hash: Some("def1".into()),
                via: Some("test".into()),
                decision_id: Some(uuid::Uuid::new_v4().to_string()),
                ..ApprovalRecord::new("detached", "approval", who, decision)
            })
            .await
    }

    async fn decide(
        store: &Arc<MemoryStore>,
        who: &str,
        decision: Decision,
        comment: Option<&str>,
    ) {
        try_decide(store, who, decision, comment).await.unwrap()
    }

    async fn wait_reason(gate: &ApprovalGate, store: &Arc<MemoryStore>) -> String {
        match gate.evaluate(&cx(store)).await.unwrap() {
            Verdict::Wait { reason, .. } => reason,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn waits_then_passes_on_a_listed_approval() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob"]).recheck_every(Duration::from_millis(10));
        let v = gate.evaluate(&cx(&store)).await.unwrap();
        let Verdict::Wait {
            reason,
            recheck_after,
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!(recheck_after, Duration::from_millis(10));
        assert!(reason.contains("who may decide: alice or bob; not carl (started this run), dana (authored release v1)"), "{reason}");
        assert!(
            reason.contains("cdctl approve detached approval"),
            "{reason}"
        );

        // The request is stored for tools to check decisions against.
        let req = store
            .approval_request("detached", "approval")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(req.approvers, ["alice", "bob"]);
        assert_eq!(req.definition_hash, "def1");

        // Someone who is not listed does not count.
        decide(&store, "mallory", Decision::Approve, None).await;
        decide(&store, "oscar", Decision::Reject, Some("mischief")).await;
        wait_reason(&gate, &store).await;

        decide(&store, "bob", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }

    #[tokio::test]
    async fn records_for_another_definition_or_unaudited_do_not_count() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice"]);
        store
            .put_approval(&ApprovalRecord {
                definition_hash: Some("def0".into()),
                ..ApprovalRecord::new("detached", "approval", "alice", Decision::Approve)
            })
            .await
            .unwrap();
        store
            .put_approval(&ApprovalRecord::new(
                "detached",
                "approval",
                "alice",
                Decision::Approve,
            ))
            .await
            .unwrap();
        wait_reason(&gate, &store).await;
    }

    #[tokio::test]
    async fn four_eyes_needs_two_distinct_people_neither_actor_nor_author() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob", "carl", "dana"]).four_eyes();
        decide(&store, "alice", Decision::Approve, None).await;
        // A second decision by the same person is refused by the store.
        let again = try_decide(&store, "alice", Decision::Approve, Some("really")).await;
        assert_eq!(again.unwrap_err().kind(), ErrorKind::Conflict);
        decide(&store, "carl", Decision::Approve, None).await;
        decide(&store, "dana", Decision::Approve, None).await;
        let reason = wait_reason(&gate, &store).await;
        assert!(
            reason.contains("1 more from bob; approved so far by alice"),
            "{reason}"
        );
        decide(&store, "bob", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }

    #[tokio::test]
    async fn groups_need_their_own_count() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob"]).group("sre", ["erin", "frank", "gus"], 2);
        decide(&store, "alice", Decision::Approve, None).await;
        decide(&store, "erin", Decision::Approve, None).await;
        let reason = wait_reason(&gate, &store).await;
        assert!(reason.contains("1 more from group sre"), "{reason}");
        assert!(
            reason.contains("group sre: 2 of erin, frank or gus"),
            "{reason}"
        );
        decide(&store, "gus", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }

    #[tokio::test]
    async fn rejection_fails_naming_who_and_why() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob"]).four_eyes();
        decide(&store, "alice", Decision::Approve, None).await;
        decide(
            &store,
            "bob",
            Decision::Reject,
            Some("error budget exhausted"),
        )
        .await;
        assert_eq!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail("rejected by bob: error budget exhausted".into())
        );
    }

    #[tokio::test]
    async fn a_person_decides_once() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice"]);
        decide(&store, "alice", Decision::Reject, None).await;
        assert_eq!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail("rejected by alice: no reason given".into())
        );
        let e = try_decide(&store, "alice", Decision::Approve, Some("fixed"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("one person counts once"), "{e}");
        assert!(matches!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail(_)
        ));
    }

    #[tokio::test]
    async fn auto_approve_records_and_passes() {
        let store = Arc::new(MemoryStore::new());
        // Auto-approve cannot stand in for four eyes.
        assert!(ApprovalGate::any_of(["alice", "bob"])
            .four_eyes()
            .auto_approve_as("quickstart")
            .validate()
            .is_err());
        let gate = ApprovalGate::any_of(["alice", "bob"]).auto_approve_as("quickstart");
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
        let records = store.approvals("detached", "approval").await.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].approver, "quickstart");
        assert_eq!(records[0].comment.as_deref(), Some("auto-approved"));
        assert_eq!(records[0].via.as_deref(), Some("auto-approve"));

        // A recorded rejection still wins over auto-approval.
        let store = Arc::new(MemoryStore::new());
        decide(&store, "alice", Decision::Reject, Some("no")).await;
        assert!(matches!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail(_)
        ));
    }

    #[tokio::test]
    async fn overlapping_lists_and_bad_names_fail_closed() {
        let e = ApprovalGate::any_of(["alice"])
            .group("sre", ["alice", "erin"], 1)
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("alice is in the listed approvers and in group sre"),
            "{e}"
        );
        // anyone() plus a group: one approval by a group member fills the
        // group only; anyone else is still needed.
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::anyone().group("sre", ["erin", "frank"], 1);
        decide(&store, "erin", Decision::Approve, None).await;
        let reason = wait_reason(&gate, &store).await;
        assert!(reason.contains("1 more from anyone"), "{reason}");
        decide(&store, "zoe", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
        // An author that is not an identity is an error, not no exclusion.
        let bad = StageContext::detached(
            "approval",
            Release::new("v1").config("author", "Dana <dana@example.com>"),
            store.clone(),
        );
        let e = ApprovalGate::any_of(["alice"])
            .evaluate(&bad)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("author \"Dana <dana@example.com>\" is not an identity"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn anyone_must_be_explicit() {
        let store = Arc::new(MemoryStore::new());
        let empty = ApprovalGate::any_of(Vec::<String>::new());
        let err = empty.validate().unwrap_err();
        assert!(err.to_string().contains("ApprovalGate::anyone()"), "{err}");
        assert!(ApprovalGate::any_of(["alice "]).validate().is_err());
        assert!(ApprovalGate::any_of([""]).validate().is_err());
        assert!(ApprovalGate::any_of(["alice"])
            .four_eyes()
            .validate()
            .is_err());

        let gate = ApprovalGate::anyone();
        let reason = wait_reason(&gate, &store).await;
        assert!(reason.contains("who may decide: anyone"), "{reason}");
        decide(&store, "carl", Decision::Approve, None).await; // the actor
        wait_reason(&gate, &store).await;
        decide(&store, "zoe", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }
}
