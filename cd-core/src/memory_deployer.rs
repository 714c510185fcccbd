//! [`MemoryDeployer`]: a deployer that keeps what is live in memory, for unit
//! tests of pipelines, strategies and stages (as [`crate::MemoryStore`] is for
//! stores). It keeps the [`Deployer`] contract and passes the conformance
//! suite ([`crate::conformance`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::deploy::{DeployContext, Deployer};
use crate::error::{Error, Result};
use crate::types::{Change, ChangeAction, Plan, Release, Revision, Target};

/// A fleet in memory: each target holds a live revision and the revisions
/// it replaced. Applies can take time (and can be told to ignore
/// cancellation, the worst case a strategy must survive), targets can be
/// told to fail, and every apply and rollback is logged.
///
/// Behaviour, as a real deployer's:
/// - `plan` of the live version is a no-op; `plan` changes nothing;
/// - `apply` waits its delay, stopping at the cancellation with the target
///   as it was ([`crate::ErrorKind::Cancelled`]) unless told to ignore it;
/// - `rollback(target, None)` returns to the revision live before the last
///   apply, or removes the release when there was none;
/// - `rollback` under an already-fired token fails at once with
///   [`crate::ErrorKind::Cancelled`], as a real tool that is interrupted
///   would: clean-up must use a fresh token
///   ([`DeployContext::for_cleanup`]).
///
/// ```
/// use cd_core::{MemoryDeployer, Rolling, Release, Strategy, DeployContext};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let fleet = MemoryDeployer::new(["web1", "web2"]);
/// Rolling::new()
///     .deploy(&fleet, &Release::new("v1"), &fleet.targets_list(), &DeployContext::detached("test"))
///     .await?;
/// assert_eq!(fleet.versions(), ["v1", "v1"]);
/// # Ok::<(), cd_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Default)]
pub struct MemoryDeployer {
    targets: Vec<Target>,
    apply_delay: Duration,
    ignore_cancellation: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    live: BTreeMap<String, Revision>,
    replaced: BTreeMap<String, Vec<Revision>>,
    fail_on: HashSet<String>,
    unreachable: HashSet<String>,
    applied: Vec<String>,
    rolled_back: Vec<String>,
}

impl MemoryDeployer {
    /// A fleet of the named targets, nothing live.
    pub fn new<I, S>(targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        MemoryDeployer {
            targets: targets.into_iter().map(|t| Target::new(t.into())).collect(),
            ..Default::default()
        }
    }

    /// Each apply takes this long (default: no time).
    pub fn apply_delay(mut self, delay: Duration) -> Self {
        self.apply_delay = delay;
        self
    }

    /// Applies finish their delay and go live even when cancelled (the
    /// worst case: a tool that cannot be interrupted).
    pub fn ignore_cancellation(mut self) -> Self {
        self.ignore_cancellation = true;
        self
    }

    /// Applies to `target` fail from now on ("disk full").
    pub fn fail_on(&self, target: &str) {
        self.lock().fail_on.insert(target.to_string());
    }

    /// `target` cannot be reached from now on: `current`, `apply` and
    /// `rollback` fail there with [`crate::ErrorKind::Unavailable`] ("cannot
    /// connect"), as a host whose sshd stopped.
    pub fn unreachable(&self, target: &str) {
        self.lock().unreachable.insert(target.to_string());
    }

    fn reach(&self, target: &str) -> Result<()> {
        if self.lock().unreachable.contains(target) {
            return Err(
                Error::unavailable(format!("cannot connect to {target}")).with("target", target)
            );
        }
        Ok(())
    }

    /// The targets, as a list (the same as [`Deployer::targets`]).
    pub fn targets_list(&self) -> Vec<Target> {
        self.targets.clone()
    }

    /// The live version on each target, in target order (`-` where nothing
    /// is live).
    pub fn versions(&self) -> Vec<String> {
        let st = self.lock();
        self.targets
            .iter()
            .map(|t| {
                st.live
                    .get(&t.name)
                    .map(|r| r.version.clone())
                    .unwrap_or_else(|| "-".into())
            })
            .collect()
    }

    /// Targets applied to, in order (no-op applies left out).
    pub fn applied(&self) -> Vec<String> {
        self.lock().applied.clone()
    }

    /// Targets rolled back, in order.
    pub fn rolled_back(&self) -> Vec<String> {
        self.lock().rolled_back.clone()
    }

    /// Forgets the apply and rollback logs.
    pub fn clear_logs(&self) {
        let mut st = self.lock();
        st.applied.clear();
        st.rolled_back.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Deployer for MemoryDeployer {
    fn name(&self) -> &str {
        "memory"
    }

    fn targets(&self) -> Vec<Target> {
        self.targets.clone()
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        self.reach(&target.name)?;
        Ok(self.lock().live.get(&target.name).cloned())
    }

    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        let cur = self.current(target).await?;
        let action = match &cur {
            Some(c) if c.version == release.version => ChangeAction::NoOp,
            Some(_) => ChangeAction::Update,
            None => ChangeAction::Create,
        };
        Ok(Plan::new(release.clone(), target.clone(), cur).change(Change::new(action, "release")))
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        let name = &plan.target.name;
        self.reach(name)?;
        if plan.is_noop() {
            if let Some(live) = self.current(&plan.target).await? {
                return Ok(live);
            }
        }
        if self.lock().fail_on.contains(name) {
            return Err(Error::failed("disk full").with("target", name));
        }
        if !self.apply_delay.is_zero() {
            if self.ignore_cancellation {
                tokio::time::sleep(self.apply_delay).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.apply_delay) => {}
                    _ = cx.cancel.cancelled() => {
                        return Err(Error::cancelled().with("target", name));
                    }
                }
            }
        }
        let rev = Revision::new(
            name,
            &plan.release.version,
            format!("{name}@{}", plan.release.version),
        );
        let mut st = self.lock();
        if let Some(prev) = st.live.insert(name.clone(), rev.clone()) {
            st.replaced.entry(name.clone()).or_default().push(prev);
        }
        st.applied.push(name.clone());
        Ok(rev)
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        if cx.cancel.is_cancelled() {
            return Err(Error::cancelled().with("target", &target.name));
        }
        self.reach(&target.name)?;
        let mut st = self.lock();
        st.rolled_back.push(target.name.clone());
        let to = match to {
            Some(r) => Some(r.clone()),
            None => st.replaced.get_mut(&target.name).and_then(|h| h.pop()),
        };
        match to {
            Some(r) => {
                st.live.insert(target.name.clone(), r.clone());
                Ok(Some(r))
            }
            None => {
                st.live.remove(&target.name);
                Ok(None)
            }
        }
    }
}
