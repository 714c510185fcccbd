//! `ApprovalGate`: a person (or two) must approve before the run goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use cd_core::{ApprovalRecord, Decision, Gate, Result, StageContext, Verdict};
use chrono::Utc;

/// Human approval, recorded in the run's [`cd_core::Store`].
///
/// The gate reads the approvals of its run and node (written by `cdctl
/// approve`, an HTTP API, or [`cd_core::Store::put_approval`] directly):
/// - a rejection by a listed approver fails the gate, naming who and why;
/// - enough approvals by distinct listed approvers pass it (one by default,
///   two with [`ApprovalGate::four_eyes`]);
/// - otherwise it waits, and its reason tells how to approve.
///
/// Only listed approvers count; decisions by anyone else are ignored. A
/// person's latest decision is the one that counts. While the gate waits the
/// runner holds no thread and re-evaluates it every
/// [`ApprovalGate::recheck_every`].
///
/// ```
/// use std::sync::Arc;
/// use cd_core::{Gate, MemoryStore, Release, StageContext, Verdict};
/// use cd_stages::ApprovalGate;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let gate = ApprovalGate::any_of(["alice", "bob"]).four_eyes();
/// let cx = StageContext::detached("approval", Release::new("v42"), Arc::new(MemoryStore::new()));
/// match gate.evaluate(&cx).await.unwrap() {
///     Verdict::Wait { reason, .. } => assert!(reason.contains("cdctl approve")),
///     other => panic!("{other:?}"),
/// }
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct ApprovalGate {
    approvers: Vec<String>,
    required: usize,
    recheck: Duration,
    auto_approve: Option<String>,
}

impl ApprovalGate {
    /// Approval by any one of these people. An empty list means anyone.
    pub fn any_of<I, S>(approvers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ApprovalGate {
            approvers: approvers.into_iter().map(Into::into).collect(),
            required: 1,
            recheck: Duration::from_secs(5),
            auto_approve: None,
        }
    }

    /// Approval by anyone.
    pub fn anyone() -> Self {
        Self::any_of(Vec::<String>::new())
    }

    /// Requires two distinct approvers (the four-eyes principle).
    pub fn four_eyes(self) -> Self {
        self.required(2)
    }

    /// Requires `n` distinct approvers (at least 1).
    pub fn required(mut self, n: usize) -> Self {
        self.required = n.max(1);
        self
    }

    /// How often the runner asks again while waiting (default 5 s).
    pub fn recheck_every(mut self, d: Duration) -> Self {
        self.recheck = d;
        self
    }

    /// For demos and tests: when nobody has decided yet, the gate records
    /// an approval by `name` itself (with the comment `auto-approved`) and
    /// passes. The record shows in the store like any other approval. A
    /// recorded rejection still fails the gate.
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

    fn counts(&self, who: &str) -> bool {
        self.approvers.is_empty() || self.approvers.iter().any(|a| a == who)
    }

    fn who(&self) -> String {
        match self.approvers.len() {
            0 => "anyone".to_string(),
            1 => self.approvers[0].clone(),
            n => format!(
                "{} or {}",
                self.approvers[..n - 1].join(", "),
                self.approvers[n - 1]
            ),
        }
    }

    /// Decides from a list of approval records (oldest first).
    pub fn decide(&self, records: &[ApprovalRecord], run_id: &str, node: &str) -> Verdict {
        // Each listed person's latest decision.
        let mut latest: BTreeMap<&str, &ApprovalRecord> = BTreeMap::new();
        for r in records.iter().filter(|r| self.counts(&r.approver)) {
            latest.insert(r.approver.as_str(), r);
        }
        if let Some(reject) = latest
            .values()
            .filter(|r| r.decision == Decision::Reject)
            .max_by_key(|r| r.at)
        {
            let why = reject
                .comment
                .as_deref()
                .filter(|c| !c.trim().is_empty())
                .unwrap_or("no reason given");
            return Verdict::fail(format!("rejected by {}: {why}", reject.approver));
        }
        let approved: Vec<&str> = latest
            .values()
            .filter(|r| r.decision == Decision::Approve)
            .map(|r| r.approver.as_str())
            .collect();
        if approved.len() >= self.required {
            return Verdict::Pass;
        }
        let needed = if self.required == 1 {
            format!("approval by {}", self.who())
        } else {
            format!(
                "{} distinct approvals by {} ({} so far{})",
                self.required,
                self.who(),
                approved.len(),
                if approved.is_empty() {
                    String::new()
                } else {
                    format!(": {}", approved.join(", "))
                }
            )
        };
        Verdict::wait(
            self.recheck,
            format!("waiting for {needed}: run `cdctl approve {run_id} {node} --as <name>` (or `cdctl reject {run_id} {node} --as <name> --comment <why>`)"),
        )
    }
}

#[async_trait]
impl Gate for ApprovalGate {
    fn kind(&self) -> String {
        "approval".into()
    }

    fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        let records = cx.store().approvals(cx.run_id(), cx.node()).await?;
        let verdict = self.decide(&records, cx.run_id(), cx.node());
        if let (Verdict::Wait { .. }, Some(name)) = (&verdict, &self.auto_approve) {
            cx.store()
                .put_approval(&ApprovalRecord {
                    run_id: cx.run_id().to_string(),
                    node: cx.node().to_string(),
                    approver: name.clone(),
                    decision: Decision::Approve,
                    comment: Some("auto-approved".into()),
                    at: Utc::now(),
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
        StageContext::detached("approval", Release::new("v1"), store.clone())
    }

    async fn decide(
        store: &Arc<MemoryStore>,
        who: &str,
        decision: Decision,
        comment: Option<&str>,
    ) {
        store
            .put_approval(&ApprovalRecord {
                run_id: "detached".into(),
                node: "approval".into(),
                approver: who.into(),
                decision,
                comment: comment.map(str::to_string),
                at: Utc::now(),
            })
            .await
            .unwrap();
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
        assert!(
            reason.contains("waiting for approval by alice or bob"),
            "{reason}"
        );
        assert!(
            reason.contains("cdctl approve detached approval --as <name>"),
            "{reason}"
        );

        // Someone who is not listed does not count.
        decide(&store, "mallory", Decision::Approve, None).await;
        decide(&store, "mallory", Decision::Reject, Some("mischief")).await;
        assert!(matches!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Wait { .. }
        ));

        decide(&store, "bob", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }

    #[tokio::test]
    async fn four_eyes_needs_two_distinct_people() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob", "carol"]).four_eyes();
        decide(&store, "alice", Decision::Approve, None).await;
        decide(&store, "alice", Decision::Approve, Some("really")).await;
        let Verdict::Wait { reason, .. } = gate.evaluate(&cx(&store)).await.unwrap() else {
            panic!("one person twice is not two")
        };
        assert!(
            reason.contains("2 distinct approvals by alice, bob or carol (1 so far: alice)"),
            "{reason}"
        );
        decide(&store, "carol", Decision::Approve, None).await;
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
    async fn latest_decision_of_a_person_counts() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice"]);
        decide(&store, "alice", Decision::Reject, None).await;
        assert_eq!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail("rejected by alice: no reason given".into())
        );
        decide(&store, "alice", Decision::Approve, Some("fixed")).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }

    #[tokio::test]
    async fn auto_approve_records_and_passes() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::any_of(["alice", "bob"])
            .four_eyes()
            .auto_approve_as("quickstart");
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
        let records = store.approvals("detached", "approval").await.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].approver, "quickstart");
        assert_eq!(records[0].comment.as_deref(), Some("auto-approved"));

        // A recorded rejection still wins over auto-approval.
        let store = Arc::new(MemoryStore::new());
        decide(&store, "alice", Decision::Reject, Some("no")).await;
        assert!(matches!(
            gate.evaluate(&cx(&store)).await.unwrap(),
            Verdict::Fail(_)
        ));
    }

    #[tokio::test]
    async fn anyone_may_approve_an_open_gate() {
        let store = Arc::new(MemoryStore::new());
        let gate = ApprovalGate::anyone();
        let Verdict::Wait { reason, .. } = gate.evaluate(&cx(&store)).await.unwrap() else {
            panic!()
        };
        assert!(reason.contains("approval by anyone"), "{reason}");
        decide(&store, "zoe", Decision::Approve, None).await;
        assert_eq!(gate.evaluate(&cx(&store)).await.unwrap(), Verdict::Pass);
    }
}
