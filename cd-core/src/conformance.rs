//! The conformance suite every [`Deployer`] must pass.
//!
//! Backends call [`check_deployer`] from their own tests, against the real
//! thing (a real process, a real sshd, real terraform). It checks the
//! contract the strategies rely on:
//!
//! 1. `plan` changes nothing (`current()` is the same before and after);
//! 2. `apply` puts the release live and `current()` says so;
//! 3. planning the live version again is a no-op, and so is deploying it;
//! 4. a second release goes live;
//! 5. `rollback` to the first returns it, and `current()` agrees.

use crate::deploy::{DeployContext, Deployer};
use crate::error::{Error, Result};
use crate::types::{Release, Target};

/// What the suite saw, step by step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    /// One line per passed check.
    pub passed: Vec<String>,
}

fn fail(step: &str, target: &Target, message: String) -> Error {
    Error::failed(format!("conformance: {step}: {message}"))
        .with("target", &target.name)
        .with("step", step)
}

/// Runs the conformance checks for `deployer` on `target`, deploying `first`
/// then `second` (two different versions). Leaves `first` live.
pub async fn check_deployer(
    deployer: &dyn Deployer,
    target: &Target,
    first: &Release,
    second: &Release,
    cx: &DeployContext,
) -> Result<ConformanceReport> {
    if first.version == second.version {
        return Err(Error::invalid("conformance needs two different versions"));
    }
    let mut report = ConformanceReport::default();
    let before = deployer.current(target).await?;
    let plan = deployer.plan(first, target, cx).await?;
    let after = deployer.current(target).await?;
    if before.as_ref().map(|r| &r.version) != after.as_ref().map(|r| &r.version) {
        return Err(fail(
            "plan",
            target,
            format!("plan changed current() from {before:?} to {after:?}"),
        ));
    }
    report.passed.push("plan changes nothing".into());

    let rev1 = deployer.apply(&plan, cx).await?;
    if rev1.version != first.version {
        return Err(fail(
            "apply",
            target,
            format!("apply returned {} for {}", rev1.version, first.version),
        ));
    }
    let cur = deployer.current(target).await?;
    if cur.as_ref().map(|r| r.version.as_str()) != Some(first.version.as_str()) {
        return Err(fail(
            "current",
            target,
            format!("after deploying {}, current() is {cur:?}", first.version),
        ));
    }
    report
        .passed
        .push(format!("apply {} and current() agree", first.version));

    let again = deployer.plan(first, target, cx).await?;
    if !again.is_noop() {
        return Err(fail(
            "redeploy",
            target,
            format!(
                "planning the live version {} is not a no-op: {:?}",
                first.version, again.changes
            ),
        ));
    }
    let rev1b = deployer.apply(&again, cx).await?;
    if rev1b.version != first.version {
        return Err(fail(
            "redeploy",
            target,
            format!("re-applying {} gave {}", first.version, rev1b.version),
        ));
    }
    report
        .passed
        .push("redeploying the live version is a no-op".into());

    let plan2 = deployer.plan(second, target, cx).await?;
    if plan2.is_noop() {
        return Err(fail(
            "plan",
            target,
            format!("a new version {} planned as a no-op", second.version),
        ));
    }
    let rev2 = deployer.apply(&plan2, cx).await?;
    let cur = deployer.current(target).await?;
    if rev2.version != second.version
        || cur.as_ref().map(|r| r.version.as_str()) != Some(second.version.as_str())
    {
        return Err(fail(
            "apply",
            target,
            format!("after deploying {}, current() is {cur:?}", second.version),
        ));
    }
    report
        .passed
        .push(format!("apply {} and current() agree", second.version));

    let back = deployer.rollback(target, Some(&rev1), cx).await?;
    let cur = deployer.current(target).await?;
    let back_version = back.as_ref().map(|r| r.version.as_str());
    if back_version != Some(first.version.as_str())
        || cur.as_ref().map(|r| r.version.as_str()) != Some(first.version.as_str())
    {
        return Err(fail(
            "rollback",
            target,
            format!(
                "rollback to {} returned {back_version:?}, current() is {cur:?}",
                first.version
            ),
        ));
    }
    report
        .passed
        .push(format!("rollback to {} and current() agree", first.version));
    Ok(report)
}
