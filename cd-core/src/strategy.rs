//! Rollout strategies, written once over any [`Deployer`]: rolling,
//! blue-green and canary, with automatic rollback.
//!
//! A strategy deploys a release to a set of targets and returns a
//! [`RolloutReport`] that says what it switched and what was live before;
//! [`Strategy::rollback`] undoes a completed rollout from that report (the
//! runner's compensation uses it through the `Deploy` stage).
//!
//! A rollout that fails, is judged bad, or is cancelled (its node's timeout
//! fired, the run was cancelled) reverts every target it switched before it
//! returns its error, and the error names them. The revert runs with a fresh
//! cancellation token ([`DeployContext::for_cleanup`]): it is bounded by the
//! node's grace period, not stopped by the cancellation that caused it.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::deploy::{DeployContext, Deployer, Router, WeightedRouter};
use crate::error::{Error, ErrorInfo, ErrorKind, Result};
use crate::event::EventKind;
use crate::monitor::{Analysis, AnalysisOutcome, Monitor, MonitorContext};
use crate::types::{Release, Revision, Target};

/// What a rollout did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutReport {
    /// `rolling`, `canary` or `blue_green`.
    pub strategy: String,
    /// The release version.
    pub version: String,
    /// What is live on each target the rollout switched (or found already
    /// on the release).
    pub deployed: Vec<Revision>,
    /// What was live on each switched target before, by target name.
    pub previous: BTreeMap<String, Option<Revision>>,
    /// Targets whose deployment failed (tolerated by `max_failures`).
    pub failed: Vec<(String, ErrorInfo)>,
    /// For blue-green: the slot serving traffic after the rollout.
    pub active_slot: Option<String>,
    /// For blue-green: the slot that served traffic before.
    pub previous_slot: Option<String>,
    /// Whether nothing changed (the release was already live everywhere).
    pub noop: bool,
}

impl RolloutReport {
    /// Whether every target the rollout touched already ran the release
    /// before it (nothing changed).
    pub fn already_live_everywhere(&self) -> bool {
        self.deployed.iter().all(
            |r| matches!(self.previous.get(&r.target), Some(Some(p)) if p.version == r.version),
        )
    }
}

/// A way to roll a release out over a deployer's targets.
#[async_trait]
pub trait Strategy: Send + Sync + 'static {
    /// `rolling`, `canary`, `blue_green`.
    fn name(&self) -> &str;

    /// Checks the configuration for a rollout over `targets` targets (the
    /// `Deploy` stage calls it when the pipeline is built; `deploy` calls it
    /// first). Returns [`ErrorKind::Invalid`] saying what is wrong.
    fn validate(&self, targets: usize) -> Result<()> {
        let _ = targets;
        Ok(())
    }

    /// Rolls `release` out to `targets`. On failure, everything the rollout
    /// switched is rolled back before the error is returned.
    async fn deploy(
        &self,
        deployer: &dyn Deployer,
        release: &Release,
        targets: &[Target],
        cx: &DeployContext,
    ) -> Result<RolloutReport>;

    /// Undoes a completed rollout (compensation).
    async fn rollback(
        &self,
        deployer: &dyn Deployer,
        report: &RolloutReport,
        cx: &DeployContext,
    ) -> Result<()> {
        revert(
            deployer,
            &report.deployed,
            &report.previous,
            self.name(),
            cx,
        )
        .await
    }
}

/// Rolls back `switched` targets to what `previous` says was live. Returns the
/// first error after trying every target.
async fn revert(
    deployer: &dyn Deployer,
    switched: &[Revision],
    previous: &BTreeMap<String, Option<Revision>>,
    strategy: &str,
    cx: &DeployContext,
) -> Result<()> {
    // Reverting is what a cancellation asks for: it must not itself stop at
    // the fired token.
    let cleanup = cx.for_cleanup();
    let cx = &cleanup;
    let targets: BTreeMap<String, Target> = deployer
        .targets()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let jobs = switched
        .iter()
        .filter(|rev| {
            // A target already on the release before the rollout stays.
            !matches!(previous.get(&rev.target), Some(Some(p)) if p.version == rev.version)
        })
        .map(|rev| {
            let target = targets
                .get(&rev.target)
                .cloned()
                .unwrap_or_else(|| Target::new(rev.target.clone()));
            let prev = previous.get(&rev.target).cloned().flatten();
            async move {
                let t = std::time::Instant::now();
                let r = deployer.rollback(&target, prev.as_ref(), cx).await;
                cx.events.progress(
                    Some(&target.name),
                    "rollback",
                    if r.is_ok() { "ok" } else { "failed" },
                    Some(t.elapsed()),
                    Some(match (&r, &prev) {
                        (Err(e), _) => e.to_string(),
                        (Ok(_), Some(p)) => format!("back on {}", p.version),
                        (Ok(_), None) => "removed (nothing was live before)".into(),
                    }),
                );
                r.map(|_| ())
            }
        });
    let results = join_all(jobs).await;
    if !switched.is_empty() {
        cx.events.emit(EventKind::Rollout {
            strategy: strategy.into(),
            message: format!(
                "rolled back {} target(s): {}",
                switched.len(),
                switched
                    .iter()
                    .map(|r| r.target.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

/// Deploys one target: reads what is live, plans, applies unless the plan is
/// a no-op. Returns (previous, now live).
/// A target whose apply failed after it was planned: what was live before,
/// so the abort can restore it when the failed apply left it changed.
type HalfDone = Vec<(Target, Option<Revision>)>;

/// Deploys one target: reads what is live, plans, applies unless the plan is
/// a no-op. Returns (previous, now live, no-op). When the apply itself fails
/// (or is cancelled), the target and what was live before go to `half_done`.
async fn deploy_one(
    deployer: &dyn Deployer,
    release: &Release,
    target: &Target,
    cx: &DeployContext,
    half_done: &std::sync::Mutex<HalfDone>,
) -> Result<(Option<Revision>, Revision, bool)> {
    if cx.cancel.is_cancelled() {
        return Err(Error::cancelled().with("target", &target.name));
    }
    let previous = deployer
        .current(target)
        .await
        .map_err(|e| e.with("target", &target.name).with("step", "current"))?;
    let plan = deployer
        .plan(release, target, cx)
        .await
        .map_err(|e| e.with("target", &target.name).with("step", "plan"))?;
    // Skipped only when the deployer plans nothing: `current()` may name the
    // release on a target an interrupted apply or rollback left unsettled.
    if let Some(p) = &previous {
        if p.version == release.version && plan.is_noop() {
            cx.events.progress(
                Some(&target.name),
                "deploy",
                "skipped",
                None,
                Some(format!("{} already live", p.version)),
            );
            return Ok((previous.clone(), p.clone(), true));
        }
    }
    let t = std::time::Instant::now();
    let rev = match deployer.apply(&plan, cx).await {
        Ok(rev) => rev,
        Err(e) => {
            half_done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((target.clone(), previous));
            return Err(e.with("target", &target.name));
        }
    };
    cx.events.progress(
        Some(&target.name),
        "deploy",
        "ok",
        Some(t.elapsed()),
        Some(format!("{} live", rev.version)),
    );
    crate::telemetry::target_switched(&cx.environment);
    Ok((previous, rev, false))
}

/// Deploys a group of targets in parallel; returns successes and failures.
async fn deploy_group(
    deployer: &dyn Deployer,
    release: &Release,
    targets: &[Target],
    cx: &DeployContext,
    report: &mut RolloutReport,
    half_done: &std::sync::Mutex<HalfDone>,
) -> Vec<(String, Error)> {
    let results = join_all(
        targets
            .iter()
            .map(|t| deploy_one(deployer, release, t, cx, half_done)),
    )
    .await;
    let mut failures = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok((prev, rev, _noop)) => {
                report.previous.insert(t.name.clone(), prev);
                report.deployed.push(rev);
            }
            Err(e) => failures.push((t.name.clone(), e)),
        }
    }
    failures
}

/// `2 switched target(s) rolled back (web1, web2)`, or `nothing to roll back`.
fn reverted_list(switched: &[Revision]) -> String {
    if switched.is_empty() {
        return "nothing had switched".into();
    }
    format!(
        "{} switched target(s) rolled back ({})",
        switched.len(),
        switched
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Reverts what `report` switched, and restores each target whose apply
/// failed or was cancelled part-way when it is no longer on what was live
/// before (a deployer may leave an interrupted target on the new release).
/// Returns the error that caused it, with what was restored, or the
/// revert's own error, which says more.
async fn abort(
    deployer: &dyn Deployer,
    report: &RolloutReport,
    half_done: &std::sync::Mutex<HalfDone>,
    cx: &DeployContext,
    error: Error,
) -> Error {
    let reverted = revert(
        deployer,
        &report.deployed,
        &report.previous,
        &report.strategy,
        cx,
    )
    .await;
    let cleanup = cx.for_cleanup();
    let half_done = std::mem::take(&mut *half_done.lock().unwrap_or_else(|p| p.into_inner()));
    let mut restored = Vec::new();
    let mut restore_failed: Option<Error> = None;
    for (target, previous) in half_done {
        let now = match deployer.current(&target).await {
            Ok(now) => now,
            Err(e) => {
                restore_failed.get_or_insert(e.with("target", &target.name));
                continue;
            }
        };
        let was = previous.as_ref().map(|p| p.version.as_str());
        if now.as_ref().map(|r| r.version.as_str()) == was {
            continue; // left as it was
        }
        match deployer
            .rollback(&target, previous.as_ref(), &cleanup)
            .await
        {
            Ok(_) => {
                cx.events.progress(
                    Some(&target.name),
                    "rollback",
                    "ok",
                    None,
                    Some(format!(
                        "interrupted mid-apply; back on {}",
                        was.unwrap_or("nothing")
                    )),
                );
                restored.push(target.name.clone());
            }
            Err(e) => {
                restore_failed.get_or_insert(e.with("target", &target.name));
            }
        }
    }
    let mut message = error.message().to_string();
    if !restored.is_empty() {
        message.push_str(&format!(
            "; interrupted mid-apply and restored: {}",
            restored.join(", ")
        ));
    }
    let trouble = match (reverted, restore_failed) {
        (Err(e), _) | (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) => None,
    };
    let mut out = match trouble {
        None if restored.is_empty() => return error,
        None => Error::new(error.kind(), message),
        Some(e) => Error::new(
            error.kind(),
            format!("{message}; rolling back failed too: {e}"),
        ),
    }
    .retryable(false);
    for (k, v) in error.context_pairs() {
        out = out.with(k, v);
    }
    out
}

fn failure_error(strategy: &str, failures: &[(String, Error)], switched: &[Revision]) -> Error {
    let first = &failures[0].1;
    let names: Vec<&str> = failures.iter().map(|(n, _)| n.as_str()).collect();
    let msg = if first.kind() == ErrorKind::Cancelled {
        let on = if names == ["-"] {
            String::new()
        } else {
            format!(" (interrupted on {})", names.join(", "))
        };
        format!(
            "{strategy} rollout cancelled{on}; {}",
            reverted_list(switched)
        )
    } else {
        format!(
            "{strategy} rollout failed on {} ({}); {}; first error: {first}",
            names.join(", "),
            failures.len(),
            reverted_list(switched)
        )
    };
    let kind = if first.kind() == ErrorKind::Cancelled {
        ErrorKind::Cancelled
    } else {
        ErrorKind::Failed
    };
    Error::new(kind, msg)
        .with("target", &failures[0].0)
        .retryable(false)
}

/// The targets of the batches after batch `b` (a rolling update's baseline).
fn batches_after(targets: &[Target], batch_size: usize, b: usize) -> Vec<Target> {
    targets
        .get((b + 1).saturating_mul(batch_size)..)
        .unwrap_or_default()
        .to_vec()
}

/// What an analysis looks at: the targets under analysis, the baseline,
/// and when they switched.
struct Scope {
    targets: Vec<Target>,
    baseline: Vec<Target>,
    since: DateTime<Utc>,
    rollout_started: DateTime<Utc>,
}

async fn analyse(
    monitor: &Option<(Arc<dyn Monitor>, Analysis)>,
    release: &Release,
    scope: Scope,
    cx: &DeployContext,
) -> Result<AnalysisOutcome> {
    match monitor {
        None => Ok(AnalysisOutcome::Pass),
        Some((m, a)) => {
            let mcx = MonitorContext {
                targets: scope.targets,
                baseline: scope.baseline,
                since: Some(scope.since),
                rollout_started: Some(scope.rollout_started),
                release: release.clone(),
                events: cx.events.clone(),
                cancel: cx.cancel.clone(),
            };
            a.run(m.as_ref(), &mcx).await
        }
    }
}

/// Rolling update: batches of `batch_size` targets, one batch after another.
/// More than `max_failures` failed targets stop the rollout and roll back
/// every target already switched.
///
/// ```
/// use cd_core::Rolling;
/// let r = Rolling::new().batch_size(2).max_failures(1);
/// # let _ = r;
/// ```
#[derive(Clone, Default)]
pub struct Rolling {
    batch_size: usize,
    max_failures: usize,
    monitor: Option<(Arc<dyn Monitor>, Analysis)>,
}

impl Rolling {
    /// One target at a time, no failure tolerated.
    pub fn new() -> Self {
        Rolling {
            batch_size: 1,
            max_failures: 0,
            monitor: None,
        }
    }

    /// Targets per batch (at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Failed targets tolerated before the rollout stops and rolls back.
    pub fn max_failures(mut self, n: usize) -> Self {
        self.max_failures = n;
        self
    }

    /// Analysis after each batch.
    pub fn analysis(mut self, monitor: impl Monitor, analysis: Analysis) -> Self {
        self.monitor = Some((Arc::new(monitor), analysis));
        self
    }
}

#[async_trait]
impl Strategy for Rolling {
    fn name(&self) -> &str {
        "rolling"
    }

    async fn deploy(
        &self,
        deployer: &dyn Deployer,
        release: &Release,
        targets: &[Target],
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        let rollout_started = Utc::now();
        let mut report = RolloutReport {
            strategy: "rolling".into(),
            version: release.version.clone(),
            ..Default::default()
        };
        let mut failures: Vec<(String, Error)> = Vec::new();
        let half_done = std::sync::Mutex::new(HalfDone::new());
        let batches: Vec<&[Target]> = targets.chunks(self.batch_size.max(1)).collect();
        let total = batches.len();
        for (b, batch) in batches.into_iter().enumerate() {
            cx.events.emit(EventKind::Rollout {
                strategy: "rolling".into(),
                message: format!(
                    "batch {}/{total}: {}",
                    b + 1,
                    batch
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            let before = report.deployed.len();
            let mut f = deploy_group(deployer, release, batch, cx, &mut report, &half_done).await;
            failures.append(&mut f);
            if failures.len() > self.max_failures || cx.cancel.is_cancelled() {
                if failures.is_empty() {
                    failures.push(("-".into(), Error::cancelled()));
                }
                let err = failure_error("rolling", &failures, &report.deployed);
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
            let batch_targets: Vec<Target> = report.deployed[before..]
                .iter()
                .filter_map(|r| batch.iter().find(|t| t.name == r.target).cloned())
                .collect();
            let scope = Scope {
                targets: batch_targets,
                baseline: batches_after(targets, self.batch_size.max(1), b),
                since: Utc::now(),
                rollout_started,
            };
            let outcome = match analyse(&self.monitor, release, scope, cx).await {
                Ok(o) => o,
                Err(e) => {
                    let err = Error::new(
                        e.kind(),
                        format!(
                            "rolling rollout stopped during the analysis of batch {}: {e}; {}",
                            b + 1,
                            reverted_list(&report.deployed)
                        ),
                    );
                    return Err(abort(deployer, &report, &half_done, cx, err).await);
                }
            };
            if !outcome.is_pass() {
                let err = Error::failed(format!(
                    "rolling rollout stopped after batch {}: analysis {outcome}; {}",
                    b + 1,
                    reverted_list(&report.deployed)
                ));
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
        }
        if report.deployed.is_empty() && !failures.is_empty() {
            // Every target failed: nothing went live, whatever the tolerance.
            let err = failure_error("rolling", &failures, &report.deployed);
            return Err(abort(deployer, &report, &half_done, cx, err).await);
        }
        report.noop = report.already_live_everywhere();
        report.failed = failures
            .iter()
            .map(|(n, e)| (n.clone(), e.to_info()))
            .collect();
        Ok(report)
    }
}

/// Canary: release to a growing share of targets (`steps` in percent, e.g.
/// `[10, 50, 100]`), judged by an analysis after **every** step, the last
/// one included: a canary is never promoted unjudged. A failed deploy, a
/// failing (or inconclusive) analysis, or a cancellation aborts and rolls
/// back every target switched so far.
///
/// **How percentages round to targets.** Over `n` targets, step `p` covers
/// the first `ceil(n × p / 100)` targets, and always at least one target more
/// than the step before (at most `n`). A step that would cover no new target
/// (`[10, 50, 100]` over one target: 10% is already that target) is skipped
/// and says so in an event; the analysis after the final step still runs.
/// Over 4 targets, `[10, 50, 100]` covers 1, then 2, then 4 targets.
///
/// A canary needs a judge ([`Canary::analysis`]) and steps strictly rising
/// within 1..=100; [`Strategy::validate`] (called by the `Deploy` stage when
/// the pipeline is built, and by `deploy`) refuses anything else.
///
/// ```
/// use cd_core::{Canary, Strategy};
/// let err = Canary::new([10, 50, 100]).validate(4).unwrap_err();
/// assert!(err.to_string().contains("judge"));
/// assert_eq!(Canary::plan_steps(&[10, 50, 100], 4), vec![1, 2, 4]);
/// assert_eq!(Canary::plan_steps(&[10, 50, 100], 1), vec![1]);
/// ```
#[derive(Clone)]
pub struct Canary {
    steps: Vec<u32>,
    monitor: Option<(Arc<dyn Monitor>, Analysis)>,
    inconclusive_passes: bool,
}

impl Canary {
    /// Steps in percent of targets; a final 100 is added when missing.
    /// Steps must rise strictly within 1..=100 (checked by
    /// [`Strategy::validate`]).
    pub fn new(steps: impl IntoIterator<Item = u32>) -> Self {
        let mut steps: Vec<u32> = steps.into_iter().collect();
        if steps.last() != Some(&100) {
            steps.push(100);
        }
        Canary {
            steps,
            monitor: None,
            inconclusive_passes: false,
        }
    }

    /// Analysis after each step, the last one included.
    pub fn analysis(mut self, monitor: impl Monitor, analysis: Analysis) -> Self {
        self.monitor = Some((Arc::new(monitor), analysis));
        self
    }

    /// Analysis with a shared monitor.
    pub fn analysis_arc(mut self, monitor: Arc<dyn Monitor>, analysis: Analysis) -> Self {
        self.monitor = Some((monitor, analysis));
        self
    }

    /// Treat an inconclusive analysis as a pass (default: abort).
    pub fn inconclusive_passes(mut self, yes: bool) -> Self {
        self.inconclusive_passes = yes;
        self
    }

    /// How many targets each effective step covers over `targets` targets
    /// (cumulative; steps covering no new target left out). See the type's
    /// docs for the rounding rule.
    pub fn plan_steps(steps: &[u32], targets: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut done = 0usize;
        for pct in steps {
            let want = (targets.saturating_mul(*pct as usize).div_ceil(100))
                .max(done + 1)
                .min(targets);
            if want > done {
                out.push(want);
                done = want;
            }
        }
        out
    }
}

#[async_trait]
impl Strategy for Canary {
    fn name(&self) -> &str {
        "canary"
    }

    fn validate(&self, targets: usize) -> Result<()> {
        let steps = self
            .steps
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if self.monitor.is_none() {
            return Err(Error::invalid(format!(
                "canary [{steps}] has no judge: a canary is never promoted unjudged; \
                 add an analysis (`.judge(monitor, analysis)` on `Deploy`) or use a rolling update"
            )));
        }
        if let Some(bad) = self.steps.iter().find(|s| **s == 0 || **s > 100) {
            return Err(Error::invalid(format!(
                "canary [{steps}]: step {bad}% is outside 1..=100"
            )));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(format!(
                "canary [{steps}]: steps must rise strictly"
            )));
        }
        if targets == 0 {
            return Err(Error::invalid("canary over no targets"));
        }
        Ok(())
    }

    async fn deploy(
        &self,
        deployer: &dyn Deployer,
        release: &Release,
        targets: &[Target],
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        self.validate(targets.len())?;
        let rollout_started = Utc::now();
        let mut report = RolloutReport {
            strategy: "canary".into(),
            version: release.version.clone(),
            ..Default::default()
        };
        let total = targets.len();
        let mut done = 0usize;
        let half_done = std::sync::Mutex::new(HalfDone::new());
        for (s, pct) in self.steps.iter().enumerate() {
            let want = (total.saturating_mul(*pct as usize).div_ceil(100))
                .max(done + 1)
                .min(total);
            if want <= done {
                cx.events.emit(EventKind::Rollout {
                    strategy: "canary".into(),
                    message: format!(
                        "step {}/{}: {pct}% of {total} target(s) covers no new target; skipped",
                        s + 1,
                        self.steps.len()
                    ),
                });
                continue;
            }
            let group = &targets[done..want];
            cx.events.emit(EventKind::Rollout {
                strategy: "canary".into(),
                message: format!(
                    "step {}/{}: {pct}% = {want} of {total} target(s)",
                    s + 1,
                    self.steps.len()
                ),
            });
            let mut failures =
                deploy_group(deployer, release, group, cx, &mut report, &half_done).await;
            done = want;
            if failures.is_empty() && cx.cancel.is_cancelled() {
                failures.push(("-".into(), Error::cancelled()));
            }
            if !failures.is_empty() {
                let err = failure_error("canary", &failures, &report.deployed);
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
            // Judged after every step, the last one too: never promoted unjudged.
            let scope = Scope {
                targets: targets[..done].to_vec(),
                baseline: targets[done..].to_vec(),
                since: Utc::now(),
                rollout_started,
            };
            let outcome = match analyse(&self.monitor, release, scope, cx).await {
                Ok(o) => o,
                Err(e) => {
                    let err = Error::new(
                        e.kind(),
                        format!(
                            "canary stopped during the analysis of step {} ({pct}%): {e}; {}",
                            s + 1,
                            reverted_list(&report.deployed)
                        ),
                    );
                    return Err(abort(deployer, &report, &half_done, cx, err).await);
                }
            };
            let pass = match &outcome {
                AnalysisOutcome::Pass => true,
                AnalysisOutcome::Inconclusive(_) => self.inconclusive_passes,
                AnalysisOutcome::Fail(_) => false,
            };
            if !pass {
                cx.events.emit(EventKind::Rollout {
                    strategy: "canary".into(),
                    message: format!("abort at step {}: analysis {outcome}", s + 1),
                });
                let err = Error::failed(format!(
                    "canary aborted at step {} ({pct}%): analysis {outcome}; {}",
                    s + 1,
                    reverted_list(&report.deployed)
                ));
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
        }
        cx.events.emit(EventKind::Rollout {
            strategy: "canary".into(),
            message: format!("promoted {} to all {total} target(s)", release.version),
        });
        report.noop = report.already_live_everywhere();
        Ok(report)
    }
}

/// Blue-green: deploy the idle slot, verify it, switch the router, keep the
/// old slot as it was for rollback. The targets are the two slots.
#[derive(Clone)]
pub struct BlueGreen {
    router: Arc<dyn Router>,
    verify: Option<(Arc<dyn Monitor>, Analysis)>,
}

impl BlueGreen {
    /// Blue-green over `router`.
    pub fn new(router: impl Router) -> Self {
        BlueGreen {
            router: Arc::new(router),
            verify: None,
        }
    }

    /// Blue-green over a shared router.
    pub fn with_router(router: Arc<dyn Router>) -> Self {
        BlueGreen {
            router,
            verify: None,
        }
    }

    /// Verifies the idle slot before the switch.
    pub fn verify(mut self, monitor: impl Monitor, analysis: Analysis) -> Self {
        self.verify = Some((Arc::new(monitor), analysis));
        self
    }

    /// Verifies with a shared monitor.
    pub fn verify_arc(mut self, monitor: Arc<dyn Monitor>, analysis: Analysis) -> Self {
        self.verify = Some((monitor, analysis));
        self
    }
}

#[async_trait]
impl Strategy for BlueGreen {
    fn name(&self) -> &str {
        "blue_green"
    }

    fn validate(&self, targets: usize) -> Result<()> {
        if targets != 2 {
            return Err(Error::invalid(format!(
                "blue-green needs exactly two slots (targets), got {targets}"
            )));
        }
        Ok(())
    }

    async fn deploy(
        &self,
        deployer: &dyn Deployer,
        release: &Release,
        targets: &[Target],
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        if targets.len() != 2 {
            return Err(Error::invalid(format!(
                "blue-green needs exactly two slots, got {}: {}",
                targets.len(),
                targets
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let active = self.router.active().await?;
        let (live, idle) = match active.as_deref() {
            Some(a) if a == targets[0].name => (Some(&targets[0]), &targets[1]),
            Some(a) if a == targets[1].name => (Some(&targets[1]), &targets[0]),
            _ => (None, &targets[0]),
        };
        let rollout_started = Utc::now();
        let mut report = RolloutReport {
            strategy: "blue_green".into(),
            version: release.version.clone(),
            previous_slot: live.map(|t| t.name.clone()),
            ..Default::default()
        };
        if let Some(live) = live {
            if let Some(cur) = deployer.current(live).await? {
                if cur.version == release.version {
                    cx.events.emit(EventKind::Rollout {
                        strategy: "blue_green".into(),
                        message: format!("{} already live on slot {}", release.version, live.name),
                    });
                    report.active_slot = Some(live.name.clone());
                    report.previous.insert(live.name.clone(), Some(cur.clone()));
                    report.deployed.push(cur);
                    report.noop = true;
                    return Ok(report);
                }
            }
        }
        cx.events.emit(EventKind::Rollout {
            strategy: "blue_green".into(),
            message: format!(
                "deploying {} to idle slot {} (live: {})",
                release.version,
                idle.name,
                live.map(|t| t.name.as_str()).unwrap_or("none")
            ),
        });
        let half_done = std::sync::Mutex::new(HalfDone::new());
        let (prev, rev, _) = match deploy_one(deployer, release, idle, cx, &half_done).await {
            Ok(r) => r,
            Err(e) => {
                let e = e.with("target", &idle.name);
                return Err(abort(deployer, &report, &half_done, cx, e).await);
            }
        };
        report.previous.insert(idle.name.clone(), prev);
        report.deployed.push(rev);
        let stays_on = live.map(|t| t.name.as_str()).unwrap_or("none");
        let scope = Scope {
            targets: vec![idle.clone()],
            baseline: targets
                .iter()
                .filter(|t| t.name != idle.name)
                .cloned()
                .collect(),
            since: Utc::now(),
            rollout_started,
        };
        let outcome = match analyse(&self.verify, release, scope, cx).await {
            Ok(o) => o,
            Err(e) => {
                let err = Error::new(
                    e.kind(),
                    format!(
                        "blue-green stopped while verifying slot {}: {e}; slot reverted, traffic stays on {stays_on}",
                        idle.name
                    ),
                )
                .with("target", &idle.name);
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
        };
        if !outcome.is_pass() {
            let err = Error::failed(format!(
                "blue-green: slot {} failed verification ({outcome}); traffic stays on {stays_on}",
                idle.name
            ))
            .with("target", &idle.name);
            return Err(abort(deployer, &report, &half_done, cx, err).await);
        }
        if cx.cancel.is_cancelled() {
            let err = Error::new(
                ErrorKind::Cancelled,
                format!(
                    "blue-green cancelled before the switch; slot {} reverted, traffic stays on {stays_on}",
                    idle.name
                ),
            );
            return Err(abort(deployer, &report, &half_done, cx, err).await);
        }
        self.router.switch(&idle.name, cx).await?;
        cx.events.emit(EventKind::Rollout {
            strategy: "blue_green".into(),
            message: format!("switched traffic to slot {}", idle.name),
        });
        report.active_slot = Some(idle.name.clone());
        Ok(report)
    }

    async fn rollback(
        &self,
        deployer: &dyn Deployer,
        report: &RolloutReport,
        cx: &DeployContext,
    ) -> Result<()> {
        if report.noop {
            return Ok(());
        }
        match &report.previous_slot {
            Some(prev) => {
                self.router.switch(prev, cx).await?;
                cx.events.emit(EventKind::Rollout {
                    strategy: "blue_green".into(),
                    message: format!("switched traffic back to slot {prev}"),
                });
                Ok(())
            }
            // Nothing served before: take the new slot down.
            None => {
                revert(
                    deployer,
                    &report.deployed,
                    &report.previous,
                    "blue_green",
                    cx,
                )
                .await
            }
        }
    }
}

/// Canary by traffic share, in the manner of Argo Rollouts with a traffic
/// router: the release goes to the idle one of two slots, then a
/// [`WeightedRouter`] gives it a growing share of the traffic (`steps` in
/// percent, e.g. `[10, 50, 100]`), judged by an analysis after every step
/// (the canary slot against the stable one, as baseline). A failing step
/// sends all traffic back to the stable slot at once, then rolls the canary
/// slot back. At 100% the canary slot is the live one.
///
/// ```
/// use cd_core::{Strategy, TrafficCanary};
/// # struct R;
/// # #[async_trait::async_trait]
/// # impl cd_core::Router for R {
/// #   async fn active(&self) -> cd_core::Result<Option<String>> { Ok(None) }
/// #   async fn switch(&self, _: &str, _: &cd_core::DeployContext) -> cd_core::Result<()> { Ok(()) }
/// # }
/// # #[async_trait::async_trait]
/// # impl cd_core::WeightedRouter for R {
/// #   async fn set_weights(&self, _: &[(String, u32)], _: &cd_core::DeployContext) -> cd_core::Result<()> { Ok(()) }
/// #   async fn weights(&self) -> cd_core::Result<Vec<(String, u32)>> { Ok(vec![]) }
/// # }
/// let unjudged = TrafficCanary::new(R, [10, 50, 100]);
/// assert!(unjudged.validate(2).unwrap_err().to_string().contains("judge"));
/// ```
#[derive(Clone)]
pub struct TrafficCanary {
    router: Arc<dyn WeightedRouter>,
    steps: Vec<u32>,
    monitor: Option<(Arc<dyn Monitor>, Analysis)>,
    inconclusive_passes: bool,
}

impl TrafficCanary {
    /// Shares of traffic in percent, strictly rising, ending at 100.
    pub fn new(router: impl WeightedRouter, steps: impl IntoIterator<Item = u32>) -> Self {
        TrafficCanary {
            router: Arc::new(router),
            steps: steps.into_iter().collect(),
            monitor: None,
            inconclusive_passes: false,
        }
    }

    /// The same with a shared router.
    pub fn with_router(
        router: Arc<dyn WeightedRouter>,
        steps: impl IntoIterator<Item = u32>,
    ) -> Self {
        TrafficCanary {
            router,
            steps: steps.into_iter().collect(),
            monitor: None,
            inconclusive_passes: false,
        }
    }

    /// The judge of every step.
    pub fn analysis(mut self, monitor: impl Monitor, analysis: Analysis) -> Self {
        self.monitor = Some((Arc::new(monitor), analysis));
        self
    }

    /// Lets an inconclusive analysis pass a step (default: it aborts).
    pub fn inconclusive_passes(mut self, yes: bool) -> Self {
        self.inconclusive_passes = yes;
        self
    }
}

#[async_trait]
impl Strategy for TrafficCanary {
    fn name(&self) -> &str {
        "traffic_canary"
    }

    fn validate(&self, targets: usize) -> Result<()> {
        if targets != 2 {
            return Err(Error::invalid(format!(
                "a traffic canary needs exactly two slots (targets), got {targets}"
            )));
        }
        if self.monitor.is_none() {
            return Err(Error::invalid(
                "traffic canary has no judge: a canary is never promoted unjudged; add an analysis",
            ));
        }
        let rising = self.steps.windows(2).all(|w| w[0] < w[1]);
        if self.steps.is_empty() || !rising || self.steps.last() != Some(&100) || self.steps[0] == 0
        {
            return Err(Error::invalid(format!(
                "traffic canary steps must rise strictly from above 0 to 100 percent, got {:?}",
                self.steps
            )));
        }
        Ok(())
    }

    async fn deploy(
        &self,
        deployer: &dyn Deployer,
        release: &Release,
        targets: &[Target],
        cx: &DeployContext,
    ) -> Result<RolloutReport> {
        self.validate(targets.len())?;
        let weights = self.router.weights().await?;
        let share = |name: &str| {
            weights
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, w)| *w)
                .unwrap_or(0)
        };
        let (stable, canary) = if share(&targets[1].name) > share(&targets[0].name) {
            (&targets[1], &targets[0])
        } else {
            (&targets[0], &targets[1])
        };
        let rollout_started = Utc::now();
        let mut report = RolloutReport {
            strategy: "traffic_canary".into(),
            version: release.version.clone(),
            previous_slot: Some(stable.name.clone()),
            ..Default::default()
        };
        let stable_rev = deployer.current(stable).await?;
        if stable_rev.as_ref().map(|r| r.version.as_str()) == Some(release.version.as_str())
            && share(&stable.name) == 100
        {
            report.active_slot = Some(stable.name.clone());
            report
                .previous
                .insert(stable.name.clone(), stable_rev.clone());
            report.deployed.extend(stable_rev);
            report.noop = true;
            return Ok(report);
        }
        cx.events.emit(EventKind::Rollout {
            strategy: "traffic_canary".into(),
            message: format!(
                "deploying {} to canary slot {} (stable: {})",
                release.version, canary.name, stable.name
            ),
        });
        let half_done = std::sync::Mutex::new(HalfDone::new());
        let (prev, rev, _) = match deploy_one(deployer, release, canary, cx, &half_done).await {
            Ok(r) => r,
            Err(e) => {
                let e = e.with("target", &canary.name);
                return Err(abort(deployer, &report, &half_done, cx, e).await);
            }
        };
        report.previous.insert(canary.name.clone(), prev);
        report.deployed.push(rev);
        let back_to_stable = |why: String| async move {
            let w = [(stable.name.clone(), 100), (canary.name.clone(), 0)];
            if let Err(e) = self.router.set_weights(&w, &cx.for_cleanup()).await {
                cx.events.warn(format!(
                    "could not send all traffic back to {}: {e}",
                    stable.name
                ));
            }
            cx.events.emit(EventKind::Rollout {
                strategy: "traffic_canary".into(),
                message: format!("all traffic back to {}: {why}", stable.name),
            });
        };
        for (s, pct) in self.steps.iter().enumerate() {
            let w = [
                (canary.name.clone(), *pct),
                (stable.name.clone(), 100 - *pct),
            ];
            if let Err(e) = self.router.set_weights(&w, cx).await {
                back_to_stable(format!("setting the weights failed: {e}")).await;
                return Err(abort(deployer, &report, &half_done, cx, e).await);
            }
            cx.events.emit(EventKind::Rollout {
                strategy: "traffic_canary".into(),
                message: format!(
                    "step {}/{}: {pct}% of traffic to {} ({})",
                    s + 1,
                    self.steps.len(),
                    canary.name,
                    release.version
                ),
            });
            let scope = Scope {
                targets: vec![canary.clone()],
                baseline: vec![stable.clone()],
                since: Utc::now(),
                rollout_started,
            };
            let outcome = match analyse(&self.monitor, release, scope, cx).await {
                Ok(o) => o,
                Err(e) => {
                    back_to_stable(format!("the analysis stopped: {e}")).await;
                    let err = Error::new(
                        e.kind(),
                        format!(
                            "traffic canary stopped during the analysis of step {} ({pct}%): {e}; traffic back on {}, slot {} reverted",
                            s + 1,
                            stable.name,
                            canary.name
                        ),
                    );
                    return Err(abort(deployer, &report, &half_done, cx, err).await);
                }
            };
            let pass = match &outcome {
                AnalysisOutcome::Pass => true,
                AnalysisOutcome::Inconclusive(_) => self.inconclusive_passes,
                AnalysisOutcome::Fail(_) => false,
            };
            if !pass {
                back_to_stable(format!("analysis {outcome}")).await;
                let err = Error::failed(format!(
                    "traffic canary aborted at step {} ({pct}%): analysis {outcome}; traffic back on {}, slot {} reverted",
                    s + 1,
                    stable.name,
                    canary.name
                ))
                .with("target", &canary.name);
                return Err(abort(deployer, &report, &half_done, cx, err).await);
            }
        }
        cx.events.emit(EventKind::Rollout {
            strategy: "traffic_canary".into(),
            message: format!(
                "promoted {}: all traffic on {}",
                release.version, canary.name
            ),
        });
        report.active_slot = Some(canary.name.clone());
        Ok(report)
    }

    async fn rollback(
        &self,
        deployer: &dyn Deployer,
        report: &RolloutReport,
        cx: &DeployContext,
    ) -> Result<()> {
        if report.noop {
            return Ok(());
        }
        match &report.previous_slot {
            // As blue-green: traffic goes back to the stable slot, which
            // never stopped serving; the canary slot stays idle.
            Some(prev) => {
                let w = [(prev.clone(), 100)];
                self.router.set_weights(&w, cx).await?;
                cx.events.emit(EventKind::Rollout {
                    strategy: "traffic_canary".into(),
                    message: format!("all traffic back to slot {prev}"),
                });
                Ok(())
            }
            None => {
                revert(
                    deployer,
                    &report.deployed,
                    &report.previous,
                    "traffic_canary",
                    cx,
                )
                .await
            }
        }
    }
}
