//! The `Deployer` trait: how a release gets onto a target.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::event::Emitter;
use crate::types::{Plan, Release, Revision, Target};

/// What a deployer can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployerCapabilities {
    /// [`Deployer::rollback`] works.
    pub rollback: bool,
    /// `rollback(target, None)` on a target whose first release was just
    /// applied removes it (nothing was live before). This is what the
    /// runner's compensation of a first rollout calls. Default true.
    #[serde(default = "yes")]
    pub undeploy: bool,
    /// Applying the release already live is a no-op.
    pub idempotent: bool,
    /// [`Deployer::plan`] shows real changes (a dry run), not only a summary.
    pub dry_run: bool,
}

impl Default for DeployerCapabilities {
    fn default() -> Self {
        DeployerCapabilities {
            rollback: true,
            undeploy: true,
            idempotent: true,
            dry_run: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// What a deployer is given while it changes things: where to report, when to
/// stop, which environment it works for.
#[derive(Debug, Clone)]
pub struct DeployContext {
    /// Emits events (progress per target and step).
    pub events: Emitter,
    /// Fires when the run is cancelled.
    pub cancel: CancellationToken,
    /// The environment (`staging`, `production`).
    pub environment: String,
}

impl DeployContext {
    /// A context with its parts.
    pub fn new(events: Emitter, cancel: CancellationToken, environment: &str) -> Self {
        DeployContext {
            events,
            cancel,
            environment: environment.to_string(),
        }
    }

    /// A context outside any run: events are dropped, nothing cancels.
    pub fn detached(environment: &str) -> Self {
        Self::new(Emitter::noop(), CancellationToken::new(), environment)
    }

    /// The same context with a fresh cancellation token, for clean-up that
    /// must run *because* the work was cancelled (a strategy reverting the
    /// targets it switched, a deployer restoring a half-switched target).
    /// Clean-up is still bounded: the runner drops the stage's future when
    /// the node's grace period is over.
    pub fn for_cleanup(&self) -> Self {
        DeployContext {
            events: self.events.clone(),
            cancel: CancellationToken::new(),
            environment: self.environment.clone(),
        }
    }
}

/// Puts releases on targets.
///
/// The contract every implementation keeps (and the conformance suite checks):
/// - [`Deployer::plan`] changes nothing;
/// - applying the version already live is a no-op;
/// - [`Deployer::current`] tells the truth after any apply or rollback, and
///   after a crash: a deployer reconciles from `current()` before it acts;
/// - [`Deployer::rollback`] returns the target to `to` (or to the revision it
///   kept before the last apply when `to` is `None`).
///
/// Rollout strategies ([`crate::strategy`]) are written once over this trait.
///
/// **Cancellation** ([`DeployContext::cancel`]): the token fires when the
/// node's timeout fires or the run is cancelled. A deployer then stops at the
/// next safe point: it interrupts its tool's whole process group gracefully
/// (SIGINT, so terraform releases its state lock and ansible stops its
/// workers), waits for it, kills it after its own grace period, and returns
/// [`crate::ErrorKind::Cancelled`] with the target named. It leaves the
/// target either as it was or on the new release, and `current()` says
/// which (the conformance suite checks this). A deployer whose future is
/// dropped (the runner's grace period ran out) must not leave processes
/// behind: tools run in their own process group, killed on drop. Clean-up
/// after a cancellation (restoring a half-switched target) uses
/// [`DeployContext::for_cleanup`].
#[async_trait]
pub trait Deployer: Send + Sync + 'static {
    /// A short name for the backend (`local`, `ssh`, `terraform`).
    fn name(&self) -> &str;

    /// What the deployer can do.
    fn capabilities(&self) -> DeployerCapabilities {
        DeployerCapabilities::default()
    }

    /// The targets this deployer knows (its fleet, its slots, its workspaces).
    fn targets(&self) -> Vec<Target>;

    /// What is live on `target`, if anything.
    async fn current(&self, target: &Target) -> Result<Option<Revision>>;

    /// What applying `release` to `target` would change. Changes nothing.
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan>;

    /// Carries out a plan and returns what is then live.
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision>;

    /// Returns `target` to `to`, or to the revision kept before the last
    /// apply when `to` is `None`. Returns what is live afterwards (`None`
    /// when nothing is: the first release was removed).
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>>;
}

#[async_trait]
impl<D: Deployer + ?Sized> Deployer for Arc<D> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn capabilities(&self) -> DeployerCapabilities {
        (**self).capabilities()
    }
    fn targets(&self) -> Vec<Target> {
        (**self).targets()
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        (**self).current(target).await
    }
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        (**self).plan(release, target, cx).await
    }
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        (**self).apply(plan, cx).await
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        (**self).rollback(target, to, cx).await
    }
}

/// Sends traffic to one slot of a blue-green pair (a load balancer, a proxy,
/// a DNS record, a symlink).
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// The slot (target name) that serves traffic now, if any.
    async fn active(&self) -> Result<Option<String>>;

    /// Sends traffic to `slot`.
    async fn switch(&self, slot: &str, cx: &DeployContext) -> Result<()>;
}

#[async_trait]
impl<R: Router + ?Sized> Router for Arc<R> {
    async fn active(&self) -> Result<Option<String>> {
        (**self).active().await
    }
    async fn switch(&self, slot: &str, cx: &DeployContext) -> Result<()> {
        (**self).switch(slot, cx).await
    }
}

/// A [`Router`] that can split traffic between slots by weight (an HTTP
/// proxy, a service mesh, a load balancer with weighted target groups), for
/// a canary judged on real traffic ([`crate::TrafficCanary`]).
#[async_trait]
pub trait WeightedRouter: Router {
    /// Sends each named slot its share, in percent (summing to 100; slots
    /// not named get none), at once; returns after the slots that lost
    /// their share have finished the requests they were serving (or the
    /// router's drain timeout).
    async fn set_weights(&self, weights: &[(String, u32)], cx: &DeployContext) -> Result<()>;

    /// Each slot with its share now, in percent.
    async fn weights(&self) -> Result<Vec<(String, u32)>>;
}

#[async_trait]
impl<R: WeightedRouter + ?Sized> WeightedRouter for Arc<R> {
    async fn set_weights(&self, weights: &[(String, u32)], cx: &DeployContext) -> Result<()> {
        (**self).set_weights(weights, cx).await
    }
    async fn weights(&self) -> Result<Vec<(String, u32)>> {
        (**self).weights().await
    }
}
