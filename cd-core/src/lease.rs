//! Environment leases: one run (or restore) per environment at a time.
//!
//! A lease is a lock in the [`Store`] with a holder, a message and an
//! expiry. [`EnvironmentLease::acquire`] waits for it (polling, announcing the
//! holder once), then a heartbeat renews it every `ttl / 3`. The lease is
//! released by [`EnvironmentLease::release`]; if the value is dropped instead
//! (the future holding it was dropped, the task aborted), the heartbeat stops
//! at once and a release is attempted in the background, so the lease is
//! freed at once where a runtime is still running, and lapses at `ttl`
//! otherwise. A lease is never renewed by nobody.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Emitter, EventKind};
use crate::store::{LockAttempt, LockRequest, Store};

/// Environment lock settings: one run per environment at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSettings {
    /// Lease duration; a heartbeat renews it every `ttl / 3`. A killed
    /// process's lease lapses after at most this long.
    pub ttl: Duration,
    /// How long to wait for a held lock before giving up.
    pub wait_timeout: Duration,
    /// How often a waiter asks again.
    pub poll_interval: Duration,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            ttl: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// `actor@host pid N run ID`: who holds a lease, as waiters and `cdctl
/// locks` show it.
pub fn holder_name(actor: &str, run_id: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("{actor}@{host} pid {} run {run_id}", std::process::id())
}

/// A held environment lease, renewed by a heartbeat until released or
/// dropped.
pub struct EnvironmentLease {
    release: ReleaseOnDrop,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    lost: CancellationToken,
}

impl std::fmt::Debug for EnvironmentLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvironmentLease")
            .field("environment", &self.release.environment)
            .field("holder", &self.release.holder)
            .finish()
    }
}

impl EnvironmentLease {
    /// Waits for the lease on `request.environment` (at most
    /// `settings.wait_timeout`, polling every `settings.poll_interval`), then
    /// keeps it renewed. Emits `lock` events (`waiting` with the holder's
    /// name once, `acquired`, `lost`).
    ///
    /// Errors: [`ErrorKind::Locked`] naming the holder when the wait times
    /// out; [`ErrorKind::Cancelled`] when `cancel` fires while waiting;
    /// [`ErrorKind::Invalid`] for a bad environment name; store errors.
    pub async fn acquire(
        store: Arc<dyn Store>,
        request: LockRequest,
        settings: &LockSettings,
        cancel: &CancellationToken,
        emitter: &Emitter,
    ) -> Result<EnvironmentLease> {
        crate::types::validate_environment(&request.environment)?;
        let env = request.environment.clone();
        let holder = request.holder.clone();
        let deadline = clock::instant_after(settings.wait_timeout);
        let mut announced = false;
        // Dropped while waiting (the caller's own timeout): leave no waiter
        // row behind to make everyone else wait for "an earlier waiter".
        let release = ReleaseOnDrop {
            store: Some(store.clone()),
            environment: env.clone(),
            holder: holder.clone(),
        };
        loop {
            match store.try_acquire_lock(&request).await? {
                LockAttempt::Acquired(_) => {
                    emitter.emit(EventKind::Lock {
                        environment: env.clone(),
                        status: "acquired".into(),
                        message: holder.clone(),
                    });
                    break;
                }
                LockAttempt::Busy(lease) => {
                    let who = lease
                        .as_ref()
                        .map(|l| {
                            format!(
                                "{} since {} ({})",
                                l.holder,
                                l.acquired_at.format("%Y-%m-%d %H:%M:%S UTC"),
                                l.message
                            )
                        })
                        .unwrap_or_else(|| "an earlier waiter".into());
                    if !announced {
                        emitter.emit(EventKind::Lock {
                            environment: env.clone(),
                            status: "waiting".into(),
                            message: who.clone(),
                        });
                        announced = true;
                    }
                    if Instant::now() >= deadline {
                        release.now().await;
                        return Err(Error::new(
                            ErrorKind::Locked,
                            format!(
                                "environment `{env}` is locked by {who}; gave up after {}",
                                crate::report::fmt_duration(settings.wait_timeout)
                            ),
                        )
                        .with("environment", &env));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(settings.poll_interval) => {}
                        _ = cancel.cancelled() => {
                            release.now().await;
                            return Err(Error::cancelled().with("environment", &env));
                        }
                    }
                }
            }
        }
        let lost = CancellationToken::new();
        let heartbeat = {
            let store = store.clone();
            let (env, holder, ttl) = (env.clone(), holder.clone(), settings.ttl);
            let emitter = emitter.clone();
            let lost = lost.clone();
            let every = (ttl / 3).max(Duration::from_millis(10));
            tokio::spawn(async move {
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    match store.renew_lock(&env, &holder, ttl).await {
                        Ok(_) => renewed = tokio::time::Instant::now(),
                        // A transient store error (busy, I/O): try again
                        // while the lease may still be ours.
                        Err(e) if e.kind() != ErrorKind::Locked && renewed.elapsed() < ttl => {
                            emitter.emit(EventKind::Lock {
                                environment: env.clone(),
                                status: "renewal_failed".into(),
                                message: e.to_string(),
                            });
                        }
                        Err(e) => {
                            emitter.emit(EventKind::Lock {
                                environment: env.clone(),
                                status: "lost".into(),
                                message: e.to_string(),
                            });
                            lost.cancel();
                            break;
                        }
                    }
                }
            })
        };
        Ok(EnvironmentLease {
            release,
            heartbeat: Some(heartbeat),
            lost,
        })
    }

    /// Fires when the heartbeat could not renew the lease (it expired and
    /// was taken, or was force-unlocked): the holder must stop.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The environment.
    pub fn environment(&self) -> &str {
        &self.release.environment
    }

    /// The holder's name.
    pub fn holder(&self) -> &str {
        &self.release.holder
    }

    /// Stops the heartbeat and releases the lease. Returns whether this
    /// holder still held it.
    pub async fn release(mut self) -> Result<bool> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let Some(store) = self.release.store.take() else {
            return Ok(false);
        };
        store
            .release_lock(&self.release.environment, &self.release.holder)
            .await
    }
}

impl Drop for EnvironmentLease {
    fn drop(&mut self) {
        // The heartbeat stops at once; `release` (a field) frees the lease.
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

/// Withdraws a request or frees a lease when dropped: in the background
/// where a runtime still runs (otherwise the lease lapses at its ttl). Held
/// while waiting (a dropped waiter leaves no waiter row behind) and then by
/// the lease itself.
struct ReleaseOnDrop {
    store: Option<Arc<dyn Store>>,
    environment: String,
    holder: String,
}

impl ReleaseOnDrop {
    /// Releases now (awaiting it) instead of on drop.
    async fn now(mut self) {
        if let Some(store) = self.store.take() {
            let _ = store.release_lock(&self.environment, &self.holder).await;
        }
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (env, holder) = (self.environment.clone(), self.holder.clone());
            rt.spawn(async move {
                let _ = store.release_lock(&env, &holder).await;
            });
        }
    }
}
