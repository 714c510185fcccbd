//! Local processes: a [`LocalProcessDeployer`] that runs each release as a
//! process on this machine, health-checked over HTTP, and a [`LocalRouter`]
//! (a TCP proxy) that sends traffic to one slot of a blue-green pair.
//!
//! Each target is a slot with a fixed port (`blue` on 18081, `green` on
//! 18082). Deploying to a slot stops the process serving that slot, starts
//! the new release on the same port and waits until
//! `GET http://127.0.0.1:<port><health_path>` answers 2xx. If it never does,
//! the new process is stopped and the one it replaced is started again, so
//! the slot is left as it was. Zero-downtime comes from blue-green: deploy
//! the idle slot, then switch the [`LocalRouter`] to it. (A fixed port per slot
//! keeps the router's and the user's view simple: a slot *is* a port; the
//! price is that redeploying the live slot in place has a short gap, which
//! blue-green avoids.)
//!
//! State lives in a small JSON file per target under the state directory
//! (default `.cd/local/`): pid, version, port, the process's start time and
//! the command, for the live release and the one before it. Processes outlive
//! the host program; [`Deployer::current`] reads the file and checks that the
//! pid is still the same live process, so it tells the truth after a
//! restart. Each process's output is appended to `<target>.log` in the same
//! directory.
//!
//! ```no_run
//! use cd_backends::local::{LocalProcessDeployer, LocalRouter};
//! use cd_core::{DeployContext, Deployer, Release, Router, Target};
//!
//! # async fn demo() -> cd_core::Result<()> {
//! let deployer = LocalProcessDeployer::builder()
//!     .program("target/debug/my-service")
//!     .args(["serve", "--port", "{port}"])
//!     .target("blue", 18081)
//!     .target("green", 18082)
//!     .health_path("/health")
//!     .build()?;
//! let router = LocalRouter::for_deployer(&deployer, 18080).start().await?;
//!
//! let cx = DeployContext::detached("production");
//! let green = Target::new("green");
//! let plan = deployer.plan(&Release::new("v2"), &green, &cx).await?;
//! let revision = deployer.apply(&plan, &cx).await?;
//! router.switch("green", &cx).await?;
//! println!("{} live on {}", revision.version, router.url());
//! # Ok(()) }
//! ```

mod process;
mod router;
mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    Change, ChangeAction, DeployContext, Deployer, DeployerCapabilities, Error, ErrorKind, Plan,
    Release, Result, Revision, Target,
};
use cd_stages::http::HttpClient;
use chrono::Utc;

pub use router::{LocalRouter, LocalRouterBuilder};

use process::{is_alive, log_tail, Children, Launch};
use state::{ProcessRecord, TargetState};

/// The environment variable every started process carries, naming its
/// slot's state file, so a process a killed host program never recorded can
/// still be found and stopped.
pub const SLOT_MARKER: &str = "CD_LOCAL_SLOT";

/// A resolved command: program, arguments, environment.
type Command = (String, Vec<String>, Vec<(String, String)>);

/// One slot: a target name and the port its process listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    name: String,
    port: u16,
}

/// Configures a [`LocalProcessDeployer`].
#[derive(Debug, Clone)]
pub struct LocalProcessDeployerBuilder {
    name: String,
    program: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    slots: Vec<Slot>,
    health_path: String,
    health_timeout: Duration,
    stop_timeout: Duration,
    state_dir: PathBuf,
}

impl LocalProcessDeployerBuilder {
    /// The deployer's name in events (default `local`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The program to run (a path, or a command name looked up in `PATH`).
    /// Without it, the release's artifact path is run.
    pub fn program(mut self, program: impl Into<String>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Arguments. `{port}`, `{version}` and `{target}` are replaced.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// An environment variable; `{port}`, `{version}` and `{target}` are
    /// replaced in the value. Every process also gets `PORT`, `CD_VERSION`
    /// and `CD_TARGET`.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds a target: a slot name and the port its process listens on.
    pub fn target(mut self, name: impl Into<String>, port: u16) -> Self {
        self.slots.push(Slot {
            name: name.into(),
            port,
        });
        self
    }

    /// The health endpoint's path (default `/health`).
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.health_path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        self
    }

    /// How long a new process has to answer 2xx on its health endpoint
    /// (default 10 s).
    pub fn health_timeout(mut self, d: Duration) -> Self {
        self.health_timeout = d;
        self
    }

    /// How long a process has to exit after SIGTERM before SIGKILL (default 5 s).
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = d;
        self
    }

    /// Where state files and logs go (default `.cd/local`).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// Validates and builds: at least one target, unique names and ports.
    pub fn build(self) -> Result<LocalProcessDeployer> {
        if self.slots.is_empty() {
            return Err(Error::invalid(
                "local deployer has no targets: add .target(name, port)",
            ));
        }
        for (i, a) in self.slots.iter().enumerate() {
            if a.name.is_empty() || a.name.contains(['/', '\\']) || a.name.starts_with('.') {
                return Err(Error::invalid(format!(
                    "target name `{}` is not usable as a file name",
                    a.name
                ))
                .with("target", &a.name));
            }
            for b in &self.slots[i + 1..] {
                if a.name == b.name {
                    return Err(
                        Error::invalid(format!("target `{}` is defined twice", a.name))
                            .with("target", &a.name),
                    );
                }
                if a.port == b.port {
                    return Err(Error::invalid(format!(
                        "targets `{}` and `{}` both use port {}",
                        a.name, b.name, a.port
                    ))
                    .with("target", &b.name));
                }
            }
        }
        let locks = self
            .slots
            .iter()
            .map(|s| (s.name.clone(), Arc::new(tokio::sync::Mutex::new(()))))
            .collect();
        Ok(LocalProcessDeployer {
            inner: Arc::new(Inner {
                cfg: self,
                children: Children::default(),
                locks,
            }),
        })
    }
}

/// Deploys releases as local processes, one per target (slot), each on its
/// own port; see the [module docs](self).
///
/// Cheap to clone; clones share the processes they started.
#[derive(Debug, Clone)]
pub struct LocalProcessDeployer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: LocalProcessDeployerBuilder,
    children: Children,
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl LocalProcessDeployer {
    /// A builder with the defaults: health path `/health`, 10 s to become
    /// healthy, 5 s to stop, state under `.cd/local`.
    pub fn builder() -> LocalProcessDeployerBuilder {
        LocalProcessDeployerBuilder {
            name: "local".into(),
            program: None,
            args: Vec::new(),
            env: Vec::new(),
            slots: Vec::new(),
            health_path: "/health".into(),
            health_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
            state_dir: PathBuf::from(".cd/local"),
        }
    }

    /// The port of a target.
    pub fn port(&self, target: &str) -> Option<u16> {
        self.slot(target).ok().map(|s| s.port)
    }

    /// `http://127.0.0.1:<port>` of a target.
    pub fn url(&self, target: &str) -> Option<String> {
        self.port(target).map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.cfg.state_dir
    }

    /// The log file of a target's processes.
    pub fn log_file(&self, target: &str) -> PathBuf {
        self.inner.cfg.state_dir.join(format!("{target}.log"))
    }

    /// Stops the process on `target`, if any, and forgets its state.
    pub async fn stop(&self, target: &str) -> Result<()> {
        let slot = self.slot(target)?;
        let lock = self.lock_for(&slot.name);
        let _guard = lock.lock().await;
        let state = self.read_state(&slot)?;
        for rec in state.current.iter().chain(state.starting.iter()) {
            self.inner
                .children
                .stop(rec.pid, rec.start_time, self.inner.cfg.stop_timeout)
                .await;
        }
        self.stop_strays(&slot, None, &DeployContext::detached("local"))
            .await;
        state::remove(&self.state_file(&slot.name))
            .map_err(|e| io_error(e, &slot.name, "state"))?;
        Ok(())
    }

    /// Stops every target's process.
    pub async fn stop_all(&self) -> Result<()> {
        for slot in &self.inner.cfg.slots {
            self.stop(&slot.name).await?;
        }
        Ok(())
    }

    fn slot(&self, target: &str) -> Result<Slot> {
        self.inner
            .cfg
            .slots
            .iter()
            .find(|s| s.name == target)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .inner
                    .cfg
                    .slots
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                Error::new(
                    ErrorKind::NotFound,
                    format!("unknown target `{target}` (known: {})", known.join(", ")),
                )
                .with("target", target)
            })
    }

    fn lock_for(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .get(target)
            .cloned()
            .unwrap_or_else(|| Arc::new(tokio::sync::Mutex::new(())))
    }

    fn state_file(&self, target: &str) -> PathBuf {
        self.inner.cfg.state_dir.join(format!("{target}.json"))
    }

    fn read_state(&self, slot: &Slot) -> Result<TargetState> {
        state::read(&self.state_file(&slot.name)).map_err(|e| {
            Error::new(ErrorKind::Store, format!("cannot read local state: {e}"))
                .with("target", &slot.name)
                .with("step", "state")
                .with("file", self.state_file(&slot.name).display())
        })
    }

    fn write_state(&self, slot: &Slot, state: &TargetState) -> Result<()> {
        state::write(&self.state_file(&slot.name), state).map_err(|e| {
            Error::new(ErrorKind::Store, format!("cannot write local state: {e}"))
                .with("target", &slot.name)
                .with("step", "state")
                .with("file", self.state_file(&slot.name).display())
        })
    }

    fn revision(&self, slot: &Slot, rec: &ProcessRecord) -> Revision {
        Revision {
            target: slot.name.clone(),
            version: rec.version.clone(),
            id: format!("pid:{}", rec.pid),
            deployed_at: Some(rec.started_at),
            detail: serde_json::json!({
                "pid": rec.pid,
                "port": rec.port,
                "url": format!("http://127.0.0.1:{}", rec.port),
                "program": rec.program,
                "args": rec.args,
                "log": self.log_file(&slot.name).display().to_string(),
                "release": rec.release,
            }),
        }
    }

    fn live(&self, rec: &Option<ProcessRecord>) -> bool {
        rec.as_ref().is_some_and(|r| is_alive(r.pid, r.start_time))
    }

    /// The value of [`SLOT_MARKER`] for processes of `slot`: the absolute
    /// path of its state file, unique per deployer state and slot.
    fn slot_marker(&self, slot: &Slot) -> String {
        let file = self.state_file(&slot.name);
        std::path::absolute(&file)
            .unwrap_or(file)
            .display()
            .to_string()
    }

    /// Stops every live process of `slot` that is not `keep`: those a host
    /// program started and died before it could record them.
    async fn stop_strays(&self, slot: &Slot, keep: Option<u32>, cx: &DeployContext) {
        for pid in process::pids_with_env(SLOT_MARKER, &self.slot_marker(slot)) {
            if Some(pid) == keep {
                continue;
            }
            cx.events.warn(format!(
                "{}: stopping pid {pid}, left behind by an interrupted deploy",
                slot.name
            ));
            self.inner
                .children
                .stop(pid, process::start_time(pid), self.inner.cfg.stop_timeout)
                .await;
        }
    }

    /// Resolves the command for `release` on `slot`.
    fn command_for(&self, release: &Release, slot: &Slot) -> Result<Command> {
        let cfg = &self.inner.cfg;
        let program = match (&cfg.program, &release.artifact) {
            (Some(p), _) => p.clone(),
            (None, Some(a)) => a.path.display().to_string(),
            (None, None) => {
                return Err(Error::invalid(format!(
                    "no program to run for release {}: set .program(...) or give the release an artifact",
                    release.version
                ))
                .with("target", &slot.name)
                .with("step", "plan"))
            }
        };
        let fill = |s: &str| {
            s.replace("{port}", &slot.port.to_string())
                .replace("{version}", &release.version)
                .replace("{target}", &slot.name)
        };
        let args = cfg.args.iter().map(|a| fill(a)).collect();
        let mut env: Vec<(String, String)> = vec![
            ("PORT".into(), slot.port.to_string()),
            ("CD_VERSION".into(), release.version.clone()),
            ("CD_TARGET".into(), slot.name.clone()),
            (SLOT_MARKER.into(), self.slot_marker(slot)),
        ];
        env.extend(cfg.env.iter().map(|(k, v)| (k.clone(), fill(v))));
        Ok((program, args, env))
    }

    /// Starts `release` on `slot` and waits for it to be healthy. On failure
    /// the new process is stopped again.
    async fn start(
        &self,
        release: &Release,
        slot: &Slot,
        cx: &DeployContext,
    ) -> Result<ProcessRecord> {
        let (program, args, env) = self.command_for(release, slot)?;
        self.wait_port_free(slot, cx).await?;
        let log_file = self.log_file(&slot.name);
        let started = Instant::now();
        let pid = self
            .inner
            .children
            .spawn(&Launch {
                program: &program,
                args: &args,
                env: &env,
                log_file: &log_file,
            })
            .map_err(|e| {
                Error::new(ErrorKind::Failed, format!("cannot start `{program}`: {e}"))
                    .with("target", &slot.name)
                    .with("step", "start")
            })?;
        let rec = ProcessRecord {
            version: release.version.clone(),
            pid,
            port: slot.port,
            start_time: process::start_time(pid),
            program,
            args,
            env,
            started_at: Utc::now(),
            release: release.clone(),
        };
        // Write-ahead: record the process before waiting on it.
        let mut ahead = self.read_state(slot)?;
        ahead.starting = Some(rec.clone());
        self.write_state(slot, &ahead)?;
        cx.events.progress(
            Some(&slot.name),
            "start",
            "ok",
            Some(started.elapsed()),
            Some(format!(
                "{} started as pid {pid} on port {}",
                release.version, slot.port
            )),
        );
        if let Err(e) = self.wait_healthy(&rec, slot, cx).await {
            self.inner
                .children
                .stop(rec.pid, rec.start_time, self.inner.cfg.stop_timeout)
                .await;
            return Err(e);
        }
        Ok(rec)
    }

    async fn wait_port_free(&self, slot: &Slot, cx: &DeployContext) -> Result<()> {
        let deadline = cd_core::clock::instant_after(self.inner.cfg.stop_timeout);
        loop {
            match std::net::TcpListener::bind(("127.0.0.1", slot.port)) {
                Ok(l) => {
                    drop(l);
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("port {} is in use by another process: {e}", slot.port),
                    )
                    .with("target", &slot.name)
                    .with("step", "start"));
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = cx.cancel.cancelled() => return Err(Error::cancelled().with("target", &slot.name)),
                    }
                }
            }
        }
    }

    async fn wait_healthy(
        &self,
        rec: &ProcessRecord,
        slot: &Slot,
        cx: &DeployContext,
    ) -> Result<()> {
        let cfg = &self.inner.cfg;
        let url = format!("http://127.0.0.1:{}{}", rec.port, cfg.health_path);
        let client = HttpClient::builder()
            .keep_alive(false)
            .timeout(Duration::from_secs(2).min(cfg.health_timeout))
            .connect_timeout(Duration::from_millis(500))
            .build()?;
        let started = Instant::now();
        let deadline = started + cfg.health_timeout;
        let mut pause = Duration::from_millis(20);
        let mut last: String;
        let fail = |why: String| {
            let tail = log_tail(&self.log_file(&slot.name), 10);
            let mut e = Error::new(
                ErrorKind::Failed,
                format!("{} on port {} is not healthy: {why}", rec.version, rec.port),
            )
            .with("target", &slot.name)
            .with("step", "health")
            .with("url", &url);
            if !tail.is_empty() {
                e = e.with("log", tail);
            }
            e
        };
        loop {
            if let Some(status) = self.inner.children.exited(rec.pid) {
                cx.events.progress(
                    Some(&slot.name),
                    "health",
                    "failed",
                    Some(started.elapsed()),
                    None,
                );
                return Err(fail(format!(
                    "the process exited ({status}) before it became healthy"
                )));
            }
            match client.get(&url).await {
                Ok(resp) if resp.is_success() => {
                    cx.events.progress(
                        Some(&slot.name),
                        "health",
                        "ok",
                        Some(started.elapsed()),
                        Some(format!("GET {url} -> {}", resp.status)),
                    );
                    return Ok(());
                }
                Ok(resp) => last = format!("GET {url} answered {}", resp.status),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                cx.events.progress(
                    Some(&slot.name),
                    "health",
                    "failed",
                    Some(started.elapsed()),
                    Some(last.clone()),
                );
                return Err(fail(format!(
                    "no 2xx within {} ms; last: {last}",
                    cfg.health_timeout.as_millis()
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cx.cancel.cancelled() => return Err(Error::cancelled().with("target", &slot.name).with("step", "health")),
            }
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn stop_record(&self, rec: &ProcessRecord, slot: &Slot, cx: &DeployContext) {
        let started = Instant::now();
        self.inner
            .children
            .stop(rec.pid, rec.start_time, self.inner.cfg.stop_timeout)
            .await;
        cx.events.progress(
            Some(&slot.name),
            "stop",
            "ok",
            Some(started.elapsed()),
            Some(format!("stopped {} (pid {})", rec.version, rec.pid)),
        );
    }

    /// Replaces whatever runs on `slot` with `release`. When the new release
    /// does not become healthy, the process it replaced is started again.
    async fn replace(
        &self,
        slot: &Slot,
        release: &Release,
        previous_for_state: impl FnOnce(Option<ProcessRecord>) -> Option<ProcessRecord>,
        cx: &DeployContext,
    ) -> Result<ProcessRecord> {
        let mut state = self.read_state(slot)?;
        if let Some(orphan) = state.starting.take() {
            // Started by a host program that died before the health wait ended.
            if is_alive(orphan.pid, orphan.start_time) {
                cx.events.warn(format!(
                    "{}: stopping {} (pid {}), left starting by an interrupted deploy",
                    slot.name, orphan.version, orphan.pid
                ));
                self.inner
                    .children
                    .stop(orphan.pid, orphan.start_time, self.inner.cfg.stop_timeout)
                    .await;
            }
            self.write_state(slot, &state)?;
        }
        let old = state
            .current
            .clone()
            .filter(|r| is_alive(r.pid, r.start_time));
        if let Some(old) = &old {
            self.stop_record(old, slot, cx).await;
        }
        self.stop_strays(slot, None, cx).await;
        match self.start(release, slot, cx).await {
            Ok(new) => {
                let next = TargetState {
                    current: Some(new.clone()),
                    previous: previous_for_state(state.current.clone()),
                    starting: None,
                };
                self.write_state(slot, &next)?;
                Ok(new)
            }
            Err(err) => {
                let Some(old) = old else {
                    self.write_state(
                        slot,
                        &TargetState {
                            current: None,
                            previous: state.previous,
                            starting: None,
                        },
                    )?;
                    return Err(err);
                };
                cx.events.warn(format!(
                    "{}: {} failed, starting {} again",
                    slot.name, release.version, old.version
                ));
                // Restore even when the run was cancelled: leave the slot as it was.
                let restore_cx = DeployContext::new(
                    cx.events.clone(),
                    tokio_util::sync::CancellationToken::new(),
                    &cx.environment,
                );
                match self.start(&old.release, slot, &restore_cx).await {
                    Ok(restored) => {
                        self.write_state(
                            slot,
                            &TargetState {
                                current: Some(restored),
                                previous: state.previous,
                                starting: None,
                            },
                        )?;
                        Err(err.with("restored", &old.version))
                    }
                    Err(e2) => {
                        self.write_state(
                            slot,
                            &TargetState {
                                current: None,
                                previous: Some(old.clone()),
                                starting: None,
                            },
                        )?;
                        Err(err.with(
                            "restore_failed",
                            format!("{} did not start again: {e2}", old.version),
                        ))
                    }
                }
            }
        }
    }
}

fn io_error(e: std::io::Error, target: &str, step: &str) -> Error {
    Error::new(ErrorKind::Store, e.to_string())
        .with("target", target)
        .with("step", step)
}

#[async_trait]
impl Deployer for LocalProcessDeployer {
    fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    fn capabilities(&self) -> DeployerCapabilities {
        DeployerCapabilities {
            rollback: true,
            undeploy: true,
            idempotent: true,
            dry_run: true,
        }
    }

    fn targets(&self) -> Vec<Target> {
        self.inner
            .cfg
            .slots
            .iter()
            .map(|s| {
                Target::new(&s.name)
                    .address(format!("127.0.0.1:{}", s.port))
                    .label("port", s.port.to_string())
            })
            .collect()
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        let slot = self.slot(&target.name)?;
        let state = self.read_state(&slot)?;
        Ok(state
            .current
            .filter(|r| is_alive(r.pid, r.start_time))
            .map(|r| self.revision(&slot, &r)))
    }

    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        cd_core::types::validate_version(&release.version)?;
        let slot = self.slot(&target.name)?;
        let (program, args, _) = self.command_for(release, &slot)?;
        let current = self.current(target).await?;
        let action = match &current {
            Some(cur) if cur.version == release.version => ChangeAction::NoOp,
            Some(_) => ChangeAction::Replace,
            None => ChangeAction::Create,
        };
        let mut change = Change::new(action, format!("process:{}", slot.name));
        change.detail = serde_json::json!({
            "from": current.as_ref().map(|c| c.version.clone()),
            "to": release.version,
            "port": slot.port,
            "command": std::iter::once(program).chain(args).collect::<Vec<_>>(),
        });
        let target = self
            .targets()
            .into_iter()
            .find(|t| t.name == slot.name)
            .unwrap_or_else(|| target.clone());
        Ok(Plan::new(release.clone(), target, current).change(change))
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        cd_core::types::validate_version(&plan.release.version)?;
        let slot = self.slot(&plan.target.name)?;
        let lock = self.lock_for(&slot.name);
        let _guard = lock.lock().await;
        // Reconcile: the world may have changed since the plan was made.
        let state = self.read_state(&slot)?;
        if let Some(cur) = &state.current {
            if cur.version == plan.release.version && self.live(&state.current) {
                let healthy = self.wait_healthy_once(cur).await;
                if healthy {
                    cx.events.progress(
                        Some(&slot.name),
                        "deploy",
                        "skipped",
                        None,
                        Some(format!("{} already live and healthy", cur.version)),
                    );
                    return Ok(self.revision(&slot, cur));
                }
            }
        }
        let replaced_version = state
            .current
            .as_ref()
            .filter(|r| r.version != plan.release.version)
            .map(|r| r.version.clone());
        let new = self
            .replace(
                &slot,
                &plan.release,
                |old| match old {
                    Some(old) if Some(&old.version) == replaced_version.as_ref() => Some(old),
                    _ => state.previous.clone(),
                },
                cx,
            )
            .await?;
        Ok(self.revision(&slot, &new))
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let slot = self.slot(&target.name)?;
        let lock = self.lock_for(&slot.name);
        let _guard = lock.lock().await;
        let state = self.read_state(&slot)?;
        let wanted: Option<Release> = match to {
            Some(rev) => {
                let known = [&state.previous, &state.current]
                    .into_iter()
                    .flatten()
                    .find(|r| r.version == rev.version)
                    .map(|r| r.release.clone());
                let from_detail = rev
                    .detail
                    .get("release")
                    .and_then(|v| serde_json::from_value::<Release>(v.clone()).ok());
                match known.or(from_detail) {
                    Some(r) => Some(r),
                    None => {
                        return Err(Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "no record of version {} on this target to roll back to",
                                rev.version
                            ),
                        )
                        .with("target", &slot.name)
                        .with("step", "rollback"))
                    }
                }
            }
            None => state.previous.as_ref().map(|r| r.release.clone()),
        };
        let Some(release) = wanted else {
            // Nothing before the last apply: remove the first release.
            if let Some(cur) = state
                .current
                .as_ref()
                .filter(|r| is_alive(r.pid, r.start_time))
            {
                self.stop_record(cur, &slot, cx).await;
            }
            state::remove(&self.state_file(&slot.name))
                .map_err(|e| io_error(e, &slot.name, "rollback"))?;
            cx.events.progress(
                Some(&slot.name),
                "rollback",
                "ok",
                None,
                Some("no previous release: slot stopped".into()),
            );
            return Ok(None);
        };
        if let Some(cur) = &state.current {
            if cur.version == release.version && self.live(&state.current) {
                return Ok(Some(self.revision(&slot, cur)));
            }
        }
        let from = state
            .current
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default();
        let rec = self
            .replace(&slot, &release, |_| None, cx)
            .await
            .map_err(|e| e.with("step", "rollback"))?;
        cx.events.progress(
            Some(&slot.name),
            "rollback",
            "ok",
            None,
            Some(format!("{from} -> {}", rec.version)),
        );
        Ok(Some(self.revision(&slot, &rec)))
    }
}

impl LocalProcessDeployer {
    /// One health probe, for the "already live" check.
    async fn wait_healthy_once(&self, rec: &ProcessRecord) -> bool {
        let url = format!(
            "http://127.0.0.1:{}{}",
            rec.port, self.inner.cfg.health_path
        );
        let client = HttpClient::builder()
            .keep_alive(false)
            .timeout(Duration::from_secs(2))
            .build();
        match client {
            Ok(client) => matches!(client.get(&url).await, Ok(r) if r.is_success()),
            Err(_) => false,
        }
    }
}
