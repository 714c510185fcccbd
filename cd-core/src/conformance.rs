//! The conformance suite every [`Deployer`] must pass.
//!
//! Backends run [`Conformance`] from their own tests, against the real thing
//! (a real process, a real sshd, real terraform, real ansible-playbook). As in
//! opendal's behaviour tests, the suite picks its checks from what the
//! deployer declares ([`crate::DeployerCapabilities`]) and from what the test
//! gives it (several targets, a slow release to cancel); each check is a
//! small function whose doc comment states the contract it holds, and the
//! report lists what passed and what was skipped, and why.
//!
//! ```
//! # use cd_core::conformance::Conformance;
//! # use cd_core::{Deployer, Release};
//! # use std::time::Duration;
//! # async fn demo(d: &dyn Deployer) -> cd_core::Result<()> {
//! let report = Conformance::new(d, Release::new("v1"), Release::new("v2"))
//!     .cancel_mid_apply(Release::new("v3-slow"), Duration::from_millis(500))
//!     .run()
//!     .await?;
//! assert!(report.is_complete(), "{report:?}");
//! # Ok(()) }
//! ```

use std::time::Duration;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::deploy::{DeployContext, Deployer};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{Release, Revision, Target};

/// What the suite saw, check by check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    /// One line per passed check.
    pub passed: Vec<String>,
    /// One line per check not run, with the reason (a capability not
    /// declared, a second target not given).
    pub skipped: Vec<String>,
    /// Whether the cancellation landed while `apply` was working (it
    /// returned [`ErrorKind::Cancelled`]) rather than after it finished;
    /// `None` when the check did not run. A backend test asserts `Some(true)`
    /// so that the check means something.
    pub cancel_landed_mid_apply: Option<bool>,
}

impl ConformanceReport {
    /// Whether every check ran (none skipped, the crash checks included)
    /// and the cancellation landed
    /// mid-apply: what a backend test asserts once it gives the suite
    /// several targets and a slow release.
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty() && self.cancel_landed_mid_apply == Some(true)
    }
}

fn fail(step: &str, target: &Target, message: String) -> Error {
    Error::failed(format!("conformance: {step}: {message}"))
        .with("target", &target.name)
        .with("step", step)
}

fn version(r: &Option<Revision>) -> Option<&str> {
    r.as_ref().map(|r| r.version.as_str())
}

/// The conformance suite, configured with a builder; [`Conformance::run`]
/// runs it.
pub struct Conformance<'a> {
    deployer: &'a dyn Deployer,
    targets: Vec<Target>,
    first: Release,
    second: Release,
    cancellation: Option<(Release, Duration)>,
    crash_steps: bool,
    cx: DeployContext,
}

impl<'a> Conformance<'a> {
    /// The suite for `deployer`, deploying `first` and `second` (two
    /// different versions) to the deployer's targets.
    pub fn new(deployer: &'a dyn Deployer, first: Release, second: Release) -> Self {
        Conformance {
            targets: deployer.targets(),
            deployer,
            first,
            second,
            cancellation: None,
            crash_steps: false,
            cx: DeployContext::detached("conformance"),
        }
    }

    /// The targets to use (default: all the deployer's). The first is used
    /// for the single-target checks; with two or more, the several-targets
    /// check runs, and a target with nothing live is used for the check of
    /// rolling back a first release.
    pub fn targets(mut self, targets: impl IntoIterator<Item = Target>) -> Self {
        self.targets = targets.into_iter().collect();
        self
    }

    /// Runs the cancellation checks: `slow` (a third version whose apply
    /// takes well over `after`) is applied and cancelled `after` into the
    /// apply, then applied again to completion.
    pub fn cancel_mid_apply(mut self, slow: Release, after: Duration) -> Self {
        self.cancellation = Some((slow, after));
        self
    }

    /// Runs the crash checks: an apply, then a rollback, whose future is
    /// dropped (nothing after it runs, as when the process is SIGKILLed)
    /// right after the deployer reports its 1st step, its 2nd, … until one
    /// completes. Each crash must leave `current()` on the old or the new
    /// release, and doing it again must converge. Costs a few applies per
    /// step the deployer reports.
    pub fn crash_after_each_step(mut self, yes: bool) -> Self {
        self.crash_steps = yes;
        self
    }

    /// The context the deployer is given (events, environment).
    pub fn context(mut self, cx: DeployContext) -> Self {
        self.cx = cx;
        self
    }

    /// Runs every check that applies. Leaves `first` live on the first
    /// target. Returns the first broken contract as an error naming the
    /// check (`step`) and the target.
    pub async fn run(&self) -> Result<ConformanceReport> {
        if self.first.version == self.second.version {
            return Err(Error::invalid("conformance needs two different versions"));
        }
        let Some(t0) = self.targets.first() else {
            return Err(Error::invalid("conformance needs at least one target"));
        };
        let caps = self.deployer.capabilities();
        let mut r = ConformanceReport::default();
        // Targets with nothing live, before the suite touches them.
        let mut fresh = Vec::new();
        for t in &self.targets[1..] {
            if self.deployer.current(t).await?.is_none() {
                fresh.push(t.clone());
            }
        }

        self.plan_changes_nothing(t0, &mut r).await?;
        let rev1 = self.apply_goes_live(t0, &self.first, &mut r).await?;
        if caps.idempotent {
            self.redeploying_the_live_version_is_a_noop(t0, &mut r)
                .await?;
        } else {
            r.skipped
                .push("redeploy is a no-op: the deployer is not idempotent".into());
        }
        self.a_new_version_is_planned_and_goes_live(t0, &mut r)
            .await?;
        if caps.rollback {
            self.rollback_to_a_named_revision(t0, &rev1, &mut r).await?;
            self.rollback_without_a_revision_returns_to_the_previous(t0, &mut r)
                .await?;
        } else {
            r.skipped
                .push("rollback: the deployer cannot roll back".into());
        }
        match (caps.rollback && caps.undeploy, fresh.first()) {
            (true, Some(t)) => {
                self.rolling_back_a_first_release_removes_it(t, &mut r)
                    .await?
            }
            (false, _) => r.skipped.push(
                "rollback of a first release: the deployer does not declare `undeploy`".into(),
            ),
            (true, None) => r
                .skipped
                .push("rollback of a first release: no second target with nothing live".into()),
        }
        if self.targets.len() >= 2 {
            self.several_targets_deploy_at_once(&mut r).await?;
        } else {
            r.skipped
                .push("several targets: only one target given".into());
        }
        match &self.cancellation {
            Some((slow, after)) => {
                self.a_cancelled_apply_leaves_a_truthful_target(t0, slow, *after, &mut r)
                    .await?;
                self.a_half_done_apply_is_reconciled_by_applying_again(t0, slow, &mut r)
                    .await?;
            }
            None => r
                .skipped
                .push("cancellation mid-apply: no slow release given".into()),
        }
        if self.crash_steps {
            self.a_crash_after_any_step_is_recovered(t0, &mut r).await?;
        } else {
            r.skipped
                .push("crash after each step: not asked for".into());
        }
        // Leave `first` live on the first target.
        self.deploy(t0, &self.first, &self.cx).await?;
        Ok(r)
    }

    /// Plans and applies `release` on `target` (skipping a no-op apply when
    /// the deployer is idempotent), returning what is live.
    async fn deploy(
        &self,
        target: &Target,
        release: &Release,
        cx: &DeployContext,
    ) -> Result<Revision> {
        let plan = self.deployer.plan(release, target, cx).await?;
        self.deployer.apply(&plan, cx).await
    }

    /// `plan` changes nothing: `current()` is the same before and after.
    async fn plan_changes_nothing(&self, t: &Target, r: &mut ConformanceReport) -> Result<()> {
        let before = self.deployer.current(t).await?;
        self.deployer.plan(&self.first, t, &self.cx).await?;
        let after = self.deployer.current(t).await?;
        if version(&before) != version(&after) {
            return Err(fail(
                "plan",
                t,
                format!("plan changed current() from {before:?} to {after:?}"),
            ));
        }
        r.passed.push("plan changes nothing".into());
        Ok(())
    }

    /// `apply` puts the release live, returns its revision, and `current()`
    /// agrees.
    async fn apply_goes_live(
        &self,
        t: &Target,
        release: &Release,
        r: &mut ConformanceReport,
    ) -> Result<Revision> {
        let rev = self.deploy(t, release, &self.cx).await?;
        if rev.version != release.version {
            return Err(fail(
                "apply",
                t,
                format!("apply returned {} for {}", rev.version, release.version),
            ));
        }
        let cur = self.deployer.current(t).await?;
        if version(&cur) != Some(release.version.as_str()) {
            return Err(fail(
                "current",
                t,
                format!("after deploying {}, current() is {cur:?}", release.version),
            ));
        }
        r.passed
            .push(format!("apply {} and current() agree", release.version));
        Ok(rev)
    }

    /// Planning the live version is a no-op, and applying that plan keeps it
    /// live (declared `idempotent`).
    async fn redeploying_the_live_version_is_a_noop(
        &self,
        t: &Target,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let again = self.deployer.plan(&self.first, t, &self.cx).await?;
        if !again.is_noop() {
            return Err(fail(
                "redeploy",
                t,
                format!(
                    "planning the live version {} is not a no-op: {:?}",
                    self.first.version, again.changes
                ),
            ));
        }
        let rev = self.deployer.apply(&again, &self.cx).await?;
        if rev.version != self.first.version {
            return Err(fail(
                "redeploy",
                t,
                format!("re-applying {} gave {}", self.first.version, rev.version),
            ));
        }
        r.passed
            .push("redeploying the live version is a no-op".into());
        Ok(())
    }

    /// A different version is planned as a change and goes live.
    async fn a_new_version_is_planned_and_goes_live(
        &self,
        t: &Target,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let plan = self.deployer.plan(&self.second, t, &self.cx).await?;
        if plan.is_noop() {
            return Err(fail(
                "plan",
                t,
                format!("a new version {} planned as a no-op", self.second.version),
            ));
        }
        let rev = self.deployer.apply(&plan, &self.cx).await?;
        let cur = self.deployer.current(t).await?;
        if rev.version != self.second.version || version(&cur) != Some(&self.second.version) {
            return Err(fail(
                "apply",
                t,
                format!(
                    "after deploying {}, apply gave {} and current() is {cur:?}",
                    self.second.version, rev.version
                ),
            ));
        }
        r.passed
            .push(format!("apply {} and current() agree", self.second.version));
        Ok(())
    }

    /// `rollback(target, Some(rev))` returns the target to `rev`, and
    /// `current()` agrees.
    async fn rollback_to_a_named_revision(
        &self,
        t: &Target,
        rev1: &Revision,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let back = self.deployer.rollback(t, Some(rev1), &self.cx).await?;
        let cur = self.deployer.current(t).await?;
        if version(&back) != Some(&self.first.version) || version(&cur) != Some(&self.first.version)
        {
            return Err(fail(
                "rollback",
                t,
                format!(
                    "rollback to {} returned {back:?}, current() is {cur:?}",
                    self.first.version
                ),
            ));
        }
        r.passed.push(format!(
            "rollback to {} and current() agree",
            self.first.version
        ));
        Ok(())
    }

    /// `rollback(target, None)` returns the target to the revision live
    /// before the last apply (what compensation calls when it has no
    /// revision at hand).
    async fn rollback_without_a_revision_returns_to_the_previous(
        &self,
        t: &Target,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        self.deploy(t, &self.second, &self.cx).await?;
        let back = self.deployer.rollback(t, None, &self.cx).await?;
        let cur = self.deployer.current(t).await?;
        if version(&back) != Some(&self.first.version) || version(&cur) != Some(&self.first.version)
        {
            return Err(fail(
                "rollback(None)",
                t,
                format!(
                    "after {} then {}, rollback(None) returned {back:?}, current() is {cur:?}",
                    self.first.version, self.second.version
                ),
            ));
        }
        r.passed
            .push("rollback(None) returns to the previous release".into());
        Ok(())
    }

    /// On a target with nothing live, applying a first release and then
    /// `rollback(target, None)` removes it: it returns `None` and `current()`
    /// is `None` (what the runner's compensation of a first rollout calls;
    /// declared `undeploy`).
    async fn rolling_back_a_first_release_removes_it(
        &self,
        t: &Target,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        self.deploy(t, &self.first, &self.cx).await?;
        let back = self.deployer.rollback(t, None, &self.cx).await?;
        let cur = self.deployer.current(t).await?;
        if back.is_some() || cur.is_some() {
            return Err(fail(
                "rollback(None) of a first release",
                t,
                format!("returned {back:?}, current() is {cur:?}; expected nothing live"),
            ));
        }
        r.passed
            .push("rollback(None) of a first release removes it".into());
        Ok(())
    }

    /// Deploying to every target at once (as a rolling batch or a canary
    /// step does) puts the release live on each, and each `current()`
    /// agrees: targets do not share state they should not.
    async fn several_targets_deploy_at_once(&self, r: &mut ConformanceReport) -> Result<()> {
        let results = join_all(
            self.targets
                .iter()
                .map(|t| self.deploy(t, &self.second, &self.cx)),
        )
        .await;
        for (t, res) in self.targets.iter().zip(results) {
            let rev = res.map_err(|e| e.with("target", &t.name).with("step", "several targets"))?;
            let cur = self.deployer.current(t).await?;
            if rev.version != self.second.version || version(&cur) != Some(&self.second.version) {
                return Err(fail(
                    "several targets",
                    t,
                    format!(
                        "deployed {} to {} targets at once; this one gave {} and current() is {cur:?}",
                        self.second.version,
                        self.targets.len(),
                        rev.version
                    ),
                ));
            }
        }
        r.passed.push(format!(
            "{} targets deployed at once, each current() agrees",
            self.targets.len()
        ));
        Ok(())
    }

    /// An apply cancelled part-way returns [`ErrorKind::Cancelled`] (or, if
    /// it finished first, the new revision) and leaves the target either as
    /// it was or on the new release, with `current()` saying which — never
    /// an error, never nothing live when something was.
    async fn a_cancelled_apply_leaves_a_truthful_target(
        &self,
        t: &Target,
        slow: &Release,
        after: Duration,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let before = self.deployer.current(t).await?;
        let plan = self.deployer.plan(slow, t, &self.cx).await?;
        let token = CancellationToken::new();
        let cx = DeployContext::new(self.cx.events.clone(), token.clone(), &self.cx.environment);
        let timer = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                token.cancel();
            })
        };
        let result = self.deployer.apply(&plan, &cx).await;
        timer.abort();
        let landed = match &result {
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::Cancelled => true,
            Err(e) => {
                return Err(fail(
                    "cancel mid-apply",
                    t,
                    format!("a cancelled apply must return a cancellation, got: {e}"),
                ))
            }
        };
        let cur = self.deployer.current(t).await.map_err(|e| {
            fail(
                "cancel mid-apply",
                t,
                format!("current() failed after a cancelled apply: {e}"),
            )
        })?;
        let ok = match (&result, version(&cur)) {
            (Ok(rev), Some(v)) => v == rev.version,
            (Err(_), Some(v)) => v == slow.version || Some(v) == version(&before),
            (Err(_), None) => before.is_none(),
            (Ok(_), None) => false,
        };
        if !ok {
            return Err(fail(
                "cancel mid-apply",
                t,
                format!(
                    "before: {:?}; apply of {} cancelled after {after:?} returned {}; current() is {cur:?}",
                    version(&before),
                    slow.version,
                    match &result {
                        Ok(rev) => format!("Ok({})", rev.version),
                        Err(e) => e.to_string(),
                    }
                ),
            ));
        }
        r.cancel_landed_mid_apply = Some(landed);
        r.passed.push(format!(
            "a cancelled apply leaves current() truthful ({})",
            if landed {
                "cancelled mid-apply"
            } else {
                "the apply finished before the cancel"
            }
        ));
        Ok(())
    }

    /// After a cancelled (half-done) apply, planning and applying the same
    /// release again converges: it goes live and `current()` agrees.
    async fn a_half_done_apply_is_reconciled_by_applying_again(
        &self,
        t: &Target,
        slow: &Release,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let rev = self.deploy(t, slow, &self.cx).await?;
        let cur = self.deployer.current(t).await?;
        if rev.version != slow.version || version(&cur) != Some(&slow.version) {
            return Err(fail(
                "reconcile",
                t,
                format!(
                    "applying {} again after a cancelled apply gave {} and current() is {cur:?}",
                    slow.version, rev.version
                ),
            ));
        }
        r.passed
            .push("applying again after a cancelled apply converges".into());
        Ok(())
    }
}

/// Counts the steps a deployer reports (progress events that end a step) and
/// wakes a waiter at the `n`-th.
struct StepCounter {
    n: usize,
    seen: std::sync::atomic::AtomicUsize,
    reached: std::sync::Arc<tokio::sync::Notify>,
}

impl crate::event::EventSink for StepCounter {
    fn emit(&self, event: &crate::event::Event) {
        if let crate::event::EventKind::Progress { status, .. } = &event.kind {
            if status != "started" {
                let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if seen == self.n {
                    self.reached.notify_one();
                }
            }
        }
    }
}

impl Conformance<'_> {
    /// A context whose `n`-th reported step wakes the returned notify.
    fn crash_context(&self, n: usize) -> (DeployContext, std::sync::Arc<tokio::sync::Notify>) {
        let reached = std::sync::Arc::new(tokio::sync::Notify::new());
        let counter = StepCounter {
            n,
            seen: Default::default(),
            reached: reached.clone(),
        };
        let events = crate::event::Emitter::new(
            "conformance",
            1,
            vec![std::sync::Arc::new(counter) as std::sync::Arc<dyn crate::event::EventSink>],
            crate::secret::Redactor::default(),
        );
        (
            DeployContext::new(events, CancellationToken::new(), &self.cx.environment),
            reached,
        )
    }

    /// Checks `current()` after a crash: the old or the new release, or
    /// nothing (a deployer that replaces a process in place has nothing
    /// running between stop and start) — never another release, never an
    /// error. Returns whether nothing was live.
    async fn after_crash(&self, t: &Target, what: &str, n: usize) -> Result<bool> {
        let cur = self.deployer.current(t).await.map_err(|e| {
            fail(
                "crash",
                t,
                format!("current() failed after a crash after step {n} of {what}: {e}"),
            )
        })?;
        let v = version(&cur);
        if v.is_some() && v != Some(&self.first.version) && v != Some(&self.second.version) {
            return Err(fail(
                "crash",
                t,
                format!(
                    "after a crash after step {n} of {what}, current() is {cur:?}, neither {} nor {}",
                    self.first.version, self.second.version
                ),
            ));
        }
        Ok(v.is_none())
    }

    /// A crash (the future dropped: nothing after it runs) right after any
    /// step of an apply or a rollback leaves `current()` on the old or the
    /// new release, and applying (rolling back) again converges.
    async fn a_crash_after_any_step_is_recovered(
        &self,
        t: &Target,
        r: &mut ConformanceReport,
    ) -> Result<()> {
        let mut steps = 0;
        let mut empty = 0;
        for n in 1..=64usize {
            let rev1 = self.deploy(t, &self.first, &self.cx).await?;
            // Apply, crashed after step n.
            let plan = self.deployer.plan(&self.second, t, &self.cx).await?;
            let (cx, reached) = self.crash_context(n);
            let applied = tokio::select! {
                r = self.deployer.apply(&plan, &cx) => Some(r?),
                _ = reached.notified() => None,
            };
            empty += usize::from(self.after_crash(t, "apply", n).await?);
            let rev = self.deploy(t, &self.second, &self.cx).await?;
            let cur = self.deployer.current(t).await?;
            if rev.version != self.second.version || version(&cur) != Some(&self.second.version) {
                return Err(fail(
                    "crash",
                    t,
                    format!(
                        "applying again after a crash after step {n} left current() at {cur:?}"
                    ),
                ));
            }
            // Rollback, crashed after step n.
            let (cx, reached) = self.crash_context(n);
            let rolled = tokio::select! {
                r = self.deployer.rollback(t, Some(&rev1), &cx) => Some(r?),
                _ = reached.notified() => None,
            };
            empty += usize::from(self.after_crash(t, "rollback", n).await?);
            self.deployer.rollback(t, Some(&rev1), &self.cx).await?;
            let cur = self.deployer.current(t).await?;
            if version(&cur) != Some(&self.first.version) {
                return Err(fail(
                    "crash",
                    t,
                    format!(
                        "rolling back again after a crash after step {n} left current() at {cur:?}"
                    ),
                ));
            }
            steps = n;
            if applied.is_some() && rolled.is_some() {
                break;
            }
        }
        r.passed.push(format!(
            "a crash after any of {steps} steps of apply and rollback is recovered{}",
            if empty > 0 {
                format!(" (nothing was live after {empty} of the crashes)")
            } else {
                String::new()
            }
        ));
        Ok(())
    }
}

/// The suite on one target with the basic checks (plan, apply, redeploy,
/// rollback to a named revision and with none): a shorthand for
/// [`Conformance`] with `targets([target])` and no cancellation.
pub async fn check_deployer(
    deployer: &dyn Deployer,
    target: &Target,
    first: &Release,
    second: &Release,
    cx: &DeployContext,
) -> Result<ConformanceReport> {
    Conformance::new(deployer, first.clone(), second.clone())
        .targets([target.clone()])
        .context(cx.clone())
        .run()
        .await
}
