//! [`Drained`]: a deployer whose targets are replicas behind an
//! [`HttpRouter`], each taken out of rotation (and drained) while it is
//! replaced, so rolling updates and target-share canaries drop no request.

use async_trait::async_trait;
use cd_core::{
    DeployContext, Deployer, DeployerCapabilities, Plan, Release, Result, Revision, Target,
};

use super::HttpRouter;

/// Wraps `inner` (whose targets are the router's upstreams, same names):
/// `apply` and `rollback` on a target first take it out of rotation (the
/// other replicas in rotation share the traffic evenly), wait for its
/// requests in flight, do the work, and put it back when it succeeded. A
/// replica whose apply failed stays out of rotation until a rollback or a
/// later apply brings it back.
///
/// ```no_run
/// # async fn demo(web: cd_backends::container::ContainerDeployer) -> cd_core::Result<()> {
/// use cd_backends::router::{Drained, HttpRouter};
/// let router = HttpRouter::builder("127.0.0.1:8080")
///     .upstreams_of(&cd_core::Deployer::targets(&web))
///     .start()
///     .await?;
/// router.spread(&["web-1", "web-2", "web-3"])?;
/// let rolling_without_drops = Drained::new(web, router);
/// # let _ = rolling_without_drops; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Drained<D> {
    inner: D,
    router: HttpRouter,
}

impl<D: Deployer> Drained<D> {
    /// `inner` behind `router`.
    pub fn new(inner: D, router: HttpRouter) -> Self {
        Drained { inner, router }
    }

    /// Takes `target` out of rotation and waits for its requests in flight.
    async fn take_out(&self, target: &str) -> Result<()> {
        let rest: Vec<String> = self
            .router
            .weights()
            .into_iter()
            .filter(|(n, w)| *w > 0 && n != target)
            .map(|(n, _)| n)
            .collect();
        if rest.is_empty() {
            // The only replica serving: nothing to move the traffic to.
            return Ok(());
        }
        let names: Vec<&str> = rest.iter().map(String::as_str).collect();
        self.router.spread(&names)?;
        self.router.drain().await;
        Ok(())
    }

    /// Puts `target` back: every replica in rotation shares evenly.
    fn put_back(&self, target: &str) -> Result<()> {
        let mut names: Vec<String> = self
            .router
            .weights()
            .into_iter()
            .filter(|(n, w)| *w > 0 || n == target)
            .map(|(n, _)| n)
            .collect();
        names.dedup();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.router.spread(&names)
    }
}

#[async_trait]
impl<D: Deployer> Deployer for Drained<D> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> DeployerCapabilities {
        self.inner.capabilities()
    }
    fn targets(&self) -> Vec<Target> {
        self.inner.targets()
    }
    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        self.inner.current(target).await
    }
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        self.inner.plan(release, target, cx).await
    }
    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        if plan.is_noop() {
            return self.inner.apply(plan, cx).await;
        }
        self.take_out(&plan.target.name).await?;
        let rev = self.inner.apply(plan, cx).await?;
        self.put_back(&plan.target.name)?;
        Ok(rev)
    }
    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.take_out(&target.name).await?;
        let back = self.inner.rollback(target, to, cx).await?;
        if back.is_some() {
            self.put_back(&target.name)?;
        }
        Ok(back)
    }
}
