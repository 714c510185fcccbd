//! # SSH deployer: Capistrano-style releases on plain SSH hosts
//!
//! [`SshDeployer`] puts a release on Linux hosts over SSH (russh, pure Rust,
//! one connection per host reused for every step, bounded parallelism across
//! hosts). On each host, under its root directory:
//!
//! ```text
//! <root>/releases/<version>/<artifact>   uploaded, sha256 verified on the host
//! <root>/current  -> releases/<version>  switched atomically (symlink + rename)
//! <root>/previous -> releases/<older>    what was live before the last apply
//! ```
//!
//! An apply runs these steps, each reported as a progress event with its
//! timing: `check` (what is live; the version already live is a no-op),
//! `upload`, `checksum`, `switch`, `restart`, `health`, `cleanup` (keep the
//! last N releases). When restart or health check fail, the host is switched
//! back and restarted before the error is returned, so a failed host stays
//! on its old version. [`Deployer::rollback`] switches back and restarts.
//!
//! Host keys are verified against a known_hosts file (plain and hashed
//! names, patterns, `@revoked` keys). A changed or revoked key is a hard
//! error before anything is sent; an unknown host is an error unless
//! [`HostKeyPolicy::TrustOnFirstUse`] was set. Before the first write, the
//! deployer checks the host keys of its whole fleet, so a host presenting a
//! wrong key stops the rollout before any host is touched.
//!
//! Restart and health commands run in `<root>/current` with the environment
//! variables `CD_VERSION`, `CD_ROOT`, `CD_RELEASE_DIR` and `CD_HOST`.
//!
//! Each step is a remote shell command on the host's one connection; to save
//! round trips (and process start-ups on the host) an apply sends three or
//! four commands: check + upload + checksum (the artifact travels on stdin),
//! switch + cleanup, restart + health check, with mark lines between steps
//! so that each step still gets its own event, timing and error. A host
//! needs a POSIX shell, `readlink`, GNU `mv -T`, `sha256sum` (or `shasum`),
//! and `curl` or `wget` for [`HealthCheck::Http`].
//!
//! Memory: an artifact up to
//! [`artifact_memory_limit`](SshDeployerBuilder::artifact_memory_limit)
//! (64 MiB) is read once and shared by every upload; larger ones are
//! streamed from the file. At most
//! [`concurrent_uploads`](SshDeployerBuilder::concurrent_uploads) hosts
//! receive it at once.
//!
//! ```no_run
//! use cd_backends::ssh::SshDeployer;
//! use cd_core::{Deployer, DeployContext, Release};
//!
//! # async fn demo() -> cd_core::Result<()> {
//! let web = SshDeployer::builder()
//!     .hosts(["web1:22", "web2:22", "web3:22"])
//!     .user("deploy")
//!     .known_hosts("~/.ssh/known_hosts")
//!     .key_file("deploy_key")
//!     .root("/srv/app")
//!     .restart("systemctl restart app")
//!     .health_command("curl -fsS http://127.0.0.1:8080/health")
//!     .keep_releases(5)
//!     .build()?;
//!
//! let release = Release::new("v42").artifact("target/app.tar.gz");
//! let cx = DeployContext::detached("production");
//! for target in web.targets() {
//!     let plan = web.plan(&release, &target, &cx).await?;
//!     web.apply(&plan, &cx).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Rollouts across the fleet (rolling, canary, blue-green) come from the
//! strategies in `cd_core::strategy`, which work over any [`Deployer`].

mod error;
mod known_hosts;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    Change, ChangeAction, DeployContext, Deployer, DeployerCapabilities, Plan, Release, Result,
    Revision, Secret, Target,
};
use russh::keys::PrivateKey;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OnceCell, Semaphore};

pub use error::SshError;
pub use session::HostKeyPolicy;
use session::{Connection, Credentials, Endpoint, HostKeyVerifier, Output, MARK};

/// How long a `current()` answer may stand in for the one `plan()` needs.
const RECENT_STATE_TTL: Duration = Duration::from_secs(2);

/// Default of [`SshDeployerBuilder::artifact_memory_limit`].
const DEFAULT_ARTIFACT_MEMORY_LIMIT: u64 = 64 * 1024 * 1024;

/// One host of an [`SshDeployer`]'s fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// The target name (`web1`), unique in the fleet.
    pub name: String,
    /// Host name or IP address to connect to.
    pub hostname: String,
    /// TCP port (22 by default).
    pub port: u16,
    /// This host's deploy root, if it differs from the deployer's.
    pub root: Option<String>,
    /// This host's login user, if it differs from the deployer's.
    pub user: Option<String>,
}

impl SshHost {
    /// A host called `name` at `hostname:port`.
    pub fn new(name: impl Into<String>, hostname: impl Into<String>, port: u16) -> Self {
        SshHost {
            name: name.into(),
            hostname: hostname.into(),
            port,
            root: None,
            user: None,
        }
    }

    /// Parses `[user@]host[:port]` (IPv6 as `[::1]:22`). The name is the
    /// spec without the user.
    pub fn parse(spec: &str) -> std::result::Result<SshHost, SshError> {
        let bad = || SshError::Config(format!("bad host {spec:?}: expected [user@]host[:port]"));
        let (user, rest) = match spec.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(bad()),
            None => (None, spec),
        };
        let (hostname, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 22,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (rest.to_string(), 22),
            }
        };
        if hostname.is_empty() {
            return Err(bad());
        }
        Ok(SshHost {
            name: rest.to_string(),
            hostname,
            port,
            root: None,
            user,
        })
    }

    /// Sets this host's deploy root.
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Sets this host's login user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// `host:port` (`[v6]:port`).
    pub fn address(&self) -> String {
        self.endpoint().address()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            port: self.port,
        }
    }
}

/// How a host proves it is healthy after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// A remote command that exits 0 when healthy.
    Command(String),
    /// An HTTP GET from the host itself (`curl`, else `wget`) that must
    /// answer 2xx/3xx.
    Http(String),
    /// An HTTP GET from the deploy machine (cd-stages' client: `https://`
    /// with the system's roots, HTTP/2, a 10 s deadline) that must answer
    /// 2xx/3xx: what users reach, through the network they use. In the URL,
    /// `{host}` stands for the host's address and `{name}` for its target
    /// name (`https://{host}:8443/health`).
    HttpFromDeployer(String),
}

/// Builds an [`SshDeployer`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct SshDeployerBuilder {
    hosts: Vec<SshHost>,
    bad_hosts: Vec<String>,
    user: Option<String>,
    key_file: Option<PathBuf>,
    passphrase: Option<Secret<String>>,
    agent: bool,
    agent_socket: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    host_key_policy: HostKeyPolicy,
    root: String,
    restart: Option<String>,
    health: Option<HealthCheck>,
    health_attempts: u32,
    health_interval: Duration,
    keep_releases: usize,
    parallelism: usize,
    connect_timeout: Duration,
    step_timeout: Duration,
    verify_fleet_first: bool,
    revert_on_failure: bool,
    artifact_memory_limit: u64,
    concurrent_uploads: usize,
}

impl Default for SshDeployerBuilder {
    fn default() -> Self {
        SshDeployerBuilder {
            hosts: Vec::new(),
            bad_hosts: Vec::new(),
            user: None,
            key_file: None,
            passphrase: None,
            agent: false,
            agent_socket: None,
            known_hosts: None,
            host_key_policy: HostKeyPolicy::Strict,
            root: "/srv/app".into(),
            restart: None,
            health: None,
            health_attempts: 1,
            health_interval: Duration::from_secs(1),
            keep_releases: 5,
            parallelism: 32,
            connect_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(300),
            verify_fleet_first: true,
            revert_on_failure: true,
            artifact_memory_limit: DEFAULT_ARTIFACT_MEMORY_LIMIT,
            concurrent_uploads: 8,
        }
    }
}

impl SshDeployerBuilder {
    /// Adds hosts given as `[user@]host[:port]` strings; the name of each is
    /// the spec without the user.
    pub fn hosts<I, S>(mut self, specs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for spec in specs {
            match SshHost::parse(spec.as_ref()) {
                Ok(h) => self.hosts.push(h),
                Err(_) => self.bad_hosts.push(spec.as_ref().to_string()),
            }
        }
        self
    }

    /// Adds one host with its own name (and optionally root and user).
    pub fn host(mut self, host: SshHost) -> Self {
        self.hosts.push(host);
        self
    }

    /// The login user (default: `$USER`).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The private key file (OpenSSH, PKCS#8 or PEM; `~/` is expanded).
    pub fn key_file(mut self, path: impl AsRef<Path>) -> Self {
        self.key_file = Some(expand_home(path.as_ref()));
        self
    }

    /// The passphrase of an encrypted key file.
    pub fn passphrase(mut self, passphrase: Secret<String>) -> Self {
        self.passphrase = Some(passphrase);
        self
    }

    /// Also offer the keys of the ssh-agent at `SSH_AUTH_SOCK` (after the
    /// key file, if any).
    pub fn agent(mut self, enabled: bool) -> Self {
        self.agent = enabled;
        self
    }

    /// Offer the keys of the ssh-agent listening on `socket` (after the key
    /// file, if any); implies [`SshDeployerBuilder::agent`].
    pub fn agent_socket(mut self, socket: impl AsRef<Path>) -> Self {
        self.agent = true;
        self.agent_socket = Some(expand_home(socket.as_ref()));
        self
    }

    /// The known_hosts file host keys are checked against (default
    /// `~/.ssh/known_hosts`; `~/` is expanded). Read as OpenSSH reads it:
    /// hashed names, `*`/`?` patterns and `!` negation, `[host]:port`,
    /// several keys per host, and `@revoked` keys refused outright
    /// (`@cert-authority` lines are skipped: host certificates are not
    /// accepted).
    pub fn known_hosts(mut self, path: impl AsRef<Path>) -> Self {
        self.known_hosts = Some(expand_home(path.as_ref()));
        self
    }

    /// What to do with hosts missing from known_hosts (default: refuse).
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.host_key_policy = policy;
        self
    }

    /// The deploy root on every host (default `/srv/app`); a host's own
    /// [`SshHost::root`] wins.
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    /// The command that restarts the application (runs in `<root>/current`).
    pub fn restart(mut self, command: impl Into<String>) -> Self {
        self.restart = Some(command.into());
        self
    }

    /// A remote health-check command that exits 0 when healthy.
    pub fn health_command(mut self, command: impl Into<String>) -> Self {
        self.health = Some(HealthCheck::Command(command.into()));
        self
    }

    /// An HTTP health check done from the host (`curl`/`wget` on the host).
    pub fn health_http(mut self, url: impl Into<String>) -> Self {
        self.health = Some(HealthCheck::Http(url.into()));
        self
    }

    /// An HTTP health check done from the deploy machine
    /// ([`HealthCheck::HttpFromDeployer`]; `{host}` and `{name}` in `url`
    /// are the host's address and target name).
    pub fn health_http_from_deployer(mut self, url: impl Into<String>) -> Self {
        self.health = Some(HealthCheck::HttpFromDeployer(url.into()));
        self
    }

    /// How often the health check is tried (default 1) and the pause
    /// between tries (default 1 s).
    pub fn health_retries(mut self, attempts: u32, interval: Duration) -> Self {
        self.health_attempts = attempts.max(1);
        self.health_interval = interval;
        self
    }

    /// How many releases to keep on each host (default 5; at least 1). The
    /// live and the previous release are never removed.
    pub fn keep_releases(mut self, n: usize) -> Self {
        self.keep_releases = n.max(1);
        self
    }

    /// How many hosts are worked on at once (default 32).
    pub fn parallelism(mut self, n: usize) -> Self {
        self.parallelism = n.max(1);
        self
    }

    /// Limit for TCP connect, handshake and authentication (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limit for each remote step (default 300 s). A step that runs past it
    /// (or is cancelled) fails with a timeout (or cancellation) error, and
    /// its remote process group is sent SIGTERM, then SIGKILL 5 s later:
    /// nothing keeps running on the host behind the deployer's back.
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// Check every host's key before the first write (default on). A host
    /// that cannot be reached is not fatal here (its own apply fails); a
    /// wrong or unknown key is.
    pub fn verify_fleet_first(mut self, enabled: bool) -> Self {
        self.verify_fleet_first = enabled;
        self
    }

    /// Switch a host back when its restart or health check fails (default
    /// on). A restart or health check that is *cancelled* (the node timed
    /// out, the run was cancelled) is always switched back, so `current()`
    /// never names a release that was not brought up.
    pub fn revert_on_failure(mut self, enabled: bool) -> Self {
        self.revert_on_failure = enabled;
        self
    }

    /// Artifacts up to this size (default 64 MiB) are read once and shared
    /// by every host's upload; larger ones are streamed from the file for
    /// each host (less memory, one more round trip per host).
    pub fn artifact_memory_limit(mut self, bytes: u64) -> Self {
        self.artifact_memory_limit = bytes;
        self
    }

    /// How many hosts receive the artifact at once (default 8). The other
    /// steps run on up to [`SshDeployerBuilder::parallelism`] hosts; limiting
    /// uploads bounds the memory that encrypted, unsent data can take
    /// (about one artifact per upload in flight).
    pub fn concurrent_uploads(mut self, n: usize) -> Self {
        self.concurrent_uploads = n.max(1);
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<SshDeployer> {
        self.build_typed().map_err(Into::into)
    }

    /// Like [`SshDeployerBuilder::build`], with the typed error.
    pub fn build_typed(self) -> std::result::Result<SshDeployer, SshError> {
        if let Some(bad) = self.bad_hosts.first() {
            return Err(SshError::Config(format!(
                "bad host {bad:?}: expected [user@]host[:port]"
            )));
        }
        if self.hosts.is_empty() {
            return Err(SshError::Config("no hosts".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for h in &self.hosts {
            if !seen.insert(h.name.clone()) {
                return Err(SshError::Config(format!("host {:?} listed twice", h.name)));
            }
        }
        if self.key_file.is_none() && !self.agent {
            return Err(SshError::Config(
                "no credentials: set key_file(...) and/or agent(true)".into(),
            ));
        }
        if self.root.trim().is_empty() || self.hosts.iter().any(|h| h.root.as_deref() == Some("")) {
            return Err(SshError::Config("empty root directory".into()));
        }
        let known_hosts = match self.known_hosts {
            Some(p) => p,
            None => expand_home(Path::new("~/.ssh/known_hosts")),
        };
        let user = self
            .user
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".into());
        let conns = self
            .hosts
            .iter()
            .map(|h| (h.name.clone(), Mutex::new(None)))
            .collect();
        let config = russh::client::Config {
            // Few queued messages per channel: an upload waits for the
            // connection to write instead of piling encrypted data up in
            // its buffer (memory stays ~flat with the number of hosts).
            channel_buffer_size: 8,
            nodelay: true,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        };
        Ok(SshDeployer {
            inner: Arc::new(Inner {
                hosts: self.hosts,
                user,
                key_file: self.key_file,
                passphrase: self.passphrase,
                agent: self.agent,
                agent_socket: self.agent_socket,
                verifier: Arc::new(HostKeyVerifier::new(known_hosts, self.host_key_policy)),
                root: self.root,
                restart: self.restart,
                health: self.health,
                health_attempts: self.health_attempts,
                health_interval: self.health_interval,
                keep_releases: self.keep_releases,
                permits: Semaphore::new(self.parallelism),
                parallelism: self.parallelism,
                connect_timeout: self.connect_timeout,
                step_timeout: self.step_timeout,
                verify_fleet_first: self.verify_fleet_first,
                revert_on_failure: self.revert_on_failure,
                artifact_memory_limit: self.artifact_memory_limit,
                upload_permits: Semaphore::new(self.concurrent_uploads),
                config: Arc::new(config),
                key: OnceCell::new(),
                conns,
                preflight: OnceCell::new(),
                artifacts: std::sync::Mutex::new(HashMap::new()),
                recent: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Deploys releases to a fleet of SSH hosts, Capistrano-style. Cheap to
/// clone (clones share connections). See the [module docs](self).
#[derive(Clone)]
pub struct SshDeployer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SshDeployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshDeployer")
            .field("hosts", &self.inner.hosts)
            .field("user", &self.inner.user)
            .field("root", &self.inner.root)
            .field("known_hosts", &self.inner.verifier.path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    hosts: Vec<SshHost>,
    user: String,
    key_file: Option<PathBuf>,
    passphrase: Option<Secret<String>>,
    agent: bool,
    agent_socket: Option<PathBuf>,
    verifier: Arc<HostKeyVerifier>,
    root: String,
    restart: Option<String>,
    health: Option<HealthCheck>,
    health_attempts: u32,
    health_interval: Duration,
    keep_releases: usize,
    permits: Semaphore,
    parallelism: usize,
    connect_timeout: Duration,
    step_timeout: Duration,
    verify_fleet_first: bool,
    revert_on_failure: bool,
    artifact_memory_limit: u64,
    upload_permits: Semaphore,
    config: Arc<russh::client::Config>,
    key: OnceCell<Option<Arc<PrivateKey>>>,
    conns: HashMap<String, Mutex<Option<Arc<Connection>>>>,
    preflight: OnceCell<()>,
    artifacts: std::sync::Mutex<HashMap<PathBuf, Arc<LoadedArtifact>>>,
    /// The last `current()` per host, for the `plan()` right after it.
    recent: std::sync::Mutex<HashMap<String, (Instant, Option<Revision>)>>,
}

/// The artifact of a release, read and hashed once per deployer.
struct LoadedArtifact {
    name: String,
    declared: Option<String>,
    expected: String,
    len: u64,
    modified: Option<std::time::SystemTime>,
    data: Option<bytes::Bytes>,
    path: PathBuf,
}

/// What the `check` step of an apply found.
struct Checked {
    /// The version live before.
    old: Option<String>,
    /// The release is already live (nothing to do).
    live: bool,
}

/// What is live on a host, and what was before the last apply.
struct HostState {
    /// Where the `current` symlink points.
    current: Option<String>,
    /// Where the `previous` symlink points.
    previous: Option<String>,
    /// The `applied` marker: the release last *fully* applied (switched,
    /// restarted, healthy), written as the last step of an apply or
    /// rollback. `None`: no marker (a host deployed before markers);
    /// `Some(None)`: nothing applied.
    applied: Option<Option<String>>,
}

impl HostState {
    /// What is live: the applied marker where there is one (a host whose
    /// symlink was switched but never restarted is not on the new release),
    /// else the symlink.
    fn live(&self) -> Option<String> {
        match &self.applied {
            Some(applied) => applied.clone(),
            None => self.current.clone(),
        }
    }

    /// Whether the symlink agrees with the applied marker. When not, an
    /// apply or rollback was cut short between its switch and its restart:
    /// the process runs the applied release, the next restart would start
    /// the other one. Such a host is not settled on any release.
    fn settled(&self) -> bool {
        match &self.applied {
            Some(applied) => *applied == self.current,
            None => true,
        }
    }
}

type SshResult<T> = std::result::Result<T, SshError>;

impl SshDeployer {
    /// A builder.
    pub fn builder() -> SshDeployerBuilder {
        SshDeployerBuilder::default()
    }

    /// The fleet.
    pub fn hosts(&self) -> &[SshHost] {
        &self.inner.hosts
    }

    /// Connects to every host (at most `parallelism` at once), verifying
    /// host keys and authenticating; returns each host's outcome, in fleet
    /// order. Connections are kept for later steps.
    pub async fn check_hosts(&self) -> Vec<(String, std::result::Result<(), SshError>)> {
        use futures::StreamExt;
        let this = self.clone();
        futures::stream::iter(self.inner.hosts.clone())
            .map(|h| {
                let this = this.clone();
                async move {
                    let r = this.connection(&h, None).await.map(|_| ());
                    (h.name.clone(), r)
                }
            })
            .buffered(self.inner.parallelism)
            .collect()
            .await
    }

    /// Closes every open connection (they are reopened when needed).
    pub async fn disconnect_all(&self) {
        for slot in self.inner.conns.values() {
            if let Some(conn) = slot.lock().await.take() {
                conn.close().await;
            }
        }
    }

    fn host_for(&self, target: &Target) -> SshResult<&SshHost> {
        let hosts = &self.inner.hosts;
        hosts
            .iter()
            .find(|h| h.name == target.name)
            .or_else(|| {
                target
                    .address
                    .as_deref()
                    .and_then(|a| hosts.iter().find(|h| h.address() == a))
            })
            .ok_or_else(|| SshError::UnknownTarget(target.name.clone()))
    }

    fn root_of<'a>(&'a self, host: &'a SshHost) -> &'a str {
        host.root.as_deref().unwrap_or(&self.inner.root)
    }

    async fn private_key(&self) -> SshResult<Option<Arc<PrivateKey>>> {
        self.inner
            .key
            .get_or_try_init(|| async {
                let Some(path) = self.inner.key_file.clone() else {
                    return Ok(None);
                };
                let pass = self.inner.passphrase.as_ref().map(|p| p.expose().clone());
                tokio::task::spawn_blocking(move || session::load_key(&path, pass.as_deref()))
                    .await
                    .map_err(|e| SshError::Config(format!("key loading task failed: {e}")))?
                    .map(|k| Some(Arc::new(k)))
            })
            .await
            .cloned()
    }

    /// The host's connection, opened (and verified) when there is none.
    async fn connection(
        &self,
        host: &SshHost,
        cx: Option<&DeployContext>,
    ) -> SshResult<Arc<Connection>> {
        let slot = self
            .inner
            .conns
            .get(&host.name)
            .ok_or_else(|| SshError::UnknownTarget(host.name.clone()))?;
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        *guard = None;
        let started = Instant::now();
        if let Some(cx) = cx {
            cx.events
                .progress(Some(&host.name), "connect", "started", None, None);
        }
        let key = self.private_key().await?;
        let creds = Credentials {
            user: host.user.clone().unwrap_or_else(|| self.inner.user.clone()),
            key: key.map(|k| (self.inner.key_file.clone().unwrap_or_default(), k)),
            agent: self.inner.agent,
            agent_socket: self.inner.agent_socket.clone(),
        };
        let result = Connection::open(
            host.endpoint(),
            self.inner.config.clone(),
            self.inner.verifier.clone(),
            &creds,
            self.inner.connect_timeout,
        )
        .await;
        if let Some(cx) = cx {
            let (status, msg) = match &result {
                Ok(_) => ("ok", Some(host.address())),
                Err(e) => ("failed", Some(e.to_string())),
            };
            cx.events.progress(
                Some(&host.name),
                "connect",
                status,
                Some(started.elapsed()),
                msg,
            );
        }
        let conn = Arc::new(result?);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Drops a connection that failed, so the next step reconnects.
    async fn forget_connection(&self, host: &SshHost) {
        if let Some(slot) = self.inner.conns.get(&host.name) {
            let mut guard = slot.lock().await;
            if guard.as_ref().is_some_and(|c| c.is_closed()) {
                *guard = None;
            }
        }
    }

    /// Before the first write: every host key of the fleet must verify.
    async fn preflight(&self) -> SshResult<()> {
        if !self.inner.verify_fleet_first {
            return Ok(());
        }
        self.inner
            .preflight
            .get_or_try_init(|| async {
                for (_, outcome) in self.check_hosts().await {
                    if let Err(
                        e @ (SshError::HostKeyChanged { .. }
                        | SshError::HostKeyRevoked { .. }
                        | SshError::HostKeyUnknown { .. }
                        | SshError::KnownHosts { .. }
                        | SshError::Key { .. }),
                    ) = outcome
                    {
                        return Err(e);
                    }
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Runs a remote command as a step: events, timeout, cancellation.
    async fn run_step<T, F>(
        &self,
        cx: &DeployContext,
        host: &SshHost,
        step: &str,
        message: Option<String>,
        fut: F,
    ) -> SshResult<T>
    where
        F: Future<Output = SshResult<T>>,
    {
        let started = Instant::now();
        cx.events
            .progress(Some(&host.name), step, "started", None, message);
        let result = self.bounded(cx, host, step, fut).await;
        match &result {
            Ok(_) => {
                cx.events
                    .progress(Some(&host.name), step, "ok", Some(started.elapsed()), None)
            }
            Err(e) => cx.events.progress(
                Some(&host.name),
                step,
                "failed",
                Some(started.elapsed()),
                Some(e.to_string()),
            ),
        }
        result
    }

    /// Runs a step's future under the step timeout and the run's
    /// cancellation; forgets the connection when the session broke.
    async fn bounded<T, F>(
        &self,
        cx: &DeployContext,
        host: &SshHost,
        step: &str,
        fut: F,
    ) -> SshResult<T>
    where
        F: Future<Output = SshResult<T>>,
    {
        let result = tokio::select! {
            biased;
            _ = cx.cancel.cancelled() => Err(SshError::Cancelled {
                host: host.name.clone(),
                step: step.to_string(),
            }),
            r = tokio::time::timeout(self.inner.step_timeout, fut) => match r {
                Ok(r) => r,
                Err(_) => Err(SshError::Timeout {
                    host: host.name.clone(),
                    address: host.address(),
                    step: step.to_string(),
                    after: self.inner.step_timeout,
                }),
            },
        };
        match &result {
            Err(SshError::Session { .. }) => self.forget_connection(host).await,
            Err(SshError::Timeout { .. } | SshError::Cancelled { .. }) => {
                self.stop_abandoned(host).await
            }
            _ => {}
        }
        result
    }

    /// After a step was abandoned (timeout, cancellation): stops what it
    /// left running on the host, within a few seconds at most.
    async fn stop_abandoned(&self, host: &SshHost) {
        let Some(slot) = self.inner.conns.get(&host.name) else {
            return;
        };
        let stop = async {
            let conn = slot.lock().await.clone();
            if let Some(conn) = conn {
                conn.stop_abandoned().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), stop).await;
    }

    /// Runs `command`; a non-zero exit becomes [`SshError::CommandFailed`].
    async fn exec_ok(
        &self,
        conn: &Connection,
        host: &SshHost,
        step: &str,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> SshResult<Output> {
        let out = conn.exec(step, command, stdin).await?;
        if !out.success() {
            return Err(command_failed(host, step, &out));
        }
        Ok(out)
    }

    async fn read_state(&self, conn: &Connection, host: &SshHost) -> SshResult<HostState> {
        let root = sq(self.root_of(host));
        let cmd = format!(
            "cd {root} 2>/dev/null || exit 0; \
             if [ -L current ]; then printf 'current=%s\\n' \"$(readlink current)\"; fi; \
             if [ -L previous ]; then printf 'previous=%s\\n' \"$(readlink previous)\"; fi; \
             if [ -f applied ]; then printf 'applied=%s\\n' \"$(cat applied)\"; fi"
        );
        let out = self.exec_ok(conn, host, "current", &cmd, None).await?;
        Ok(parse_state(&out.stdout_str()))
    }

    fn revision(&self, host: &SshHost, version: &str, sha256: Option<&str>) -> Revision {
        let dir = format!("{}/releases/{version}", self.root_of(host));
        let mut detail = json!({ "host": host.address(), "release_dir": dir });
        if let Some(sha) = sha256 {
            detail["sha256"] = json!(sha);
        }
        Revision::new(&host.name, version, dir).detail(detail)
    }

    /// Reads (once per file version) and hashes the release's artifact.
    async fn load_artifact(&self, release: &Release) -> SshResult<Option<Arc<LoadedArtifact>>> {
        let Some(artifact) = &release.artifact else {
            return Ok(None);
        };
        let path = artifact.path.clone();
        let io_err = |source| SshError::Artifact {
            path: path.clone(),
            source,
        };
        let meta = tokio::fs::metadata(&path).await.map_err(io_err)?;
        let modified = meta.modified().ok();
        if let Some(hit) = self
            .inner
            .artifacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&path)
        {
            if hit.len == meta.len() && hit.modified == modified && artifact.sha256 == hit.declared
            {
                return Ok(Some(hit.clone()));
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "artifact".into());
        check_name("artifact name", &name)?;
        let p = path.clone();
        let limit = self.inner.artifact_memory_limit;
        let (actual, data) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            if meta.len() <= limit {
                let data = std::fs::read(&p)?;
                let sha = hex::encode(Sha256::digest(&data));
                Ok((sha, Some(bytes::Bytes::from(data))))
            } else {
                let mut f = std::fs::File::open(&p)?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h)?;
                Ok((hex::encode(h.finalize()), None))
            }
        })
        .await
        .map_err(|e| SshError::Config(format!("artifact task failed: {e}")))?
        .map_err(io_err)?;
        let expected = artifact
            .sha256
            .clone()
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or(actual);
        let loaded = Arc::new(LoadedArtifact {
            name,
            declared: artifact.sha256.clone(),
            expected,
            len: meta_len(&data, &path),
            modified,
            data,
            path: path.clone(),
        });
        self.inner
            .artifacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path, loaded.clone());
        Ok(Some(loaded))
    }

    /// The shell that uploads stdin to `<dir>/.<name>.part`, verifies its
    /// sha256 and renames it into place. Exit 3: checksum mismatch.
    fn upload_cmd(dir: &str, art: &LoadedArtifact) -> String {
        let part = format!("{dir}/.{}.part", art.name);
        let fin = format!("{dir}/{}", art.name);
        format!(
            "umask 022 && mkdir -p {dir} && cat > {part} || exit 2; echo {MARK}uploaded; \
             {SUM_FN} h=$(cd_sum {part}) || exit 4; echo \"sha256=$h\"; \
             if [ \"$h\" = {exp} ]; then mv -f {part} {fin}; else rm -f {part}; exit 3; fi",
            exp = sq(&art.expected)
        )
    }

    /// Uploads the artifact and verifies its sha256 on the host, in one
    /// remote command; reports `upload` and `checksum` as two steps.
    async fn upload_verified(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        dir: &str,
        art: &LoadedArtifact,
    ) -> SshResult<()> {
        let cmd = Self::upload_cmd(dir, art);
        let started = Instant::now();
        self.upload_started(cx, host, art);
        let result = self
            .bounded(cx, host, "upload", async {
                let _upload = self.inner.upload_permits.acquire().await;
                match &art.data {
                    Some(data) => conn.exec_bytes("upload", &cmd, data.clone()).await,
                    None => {
                        // Large artifact: stream it from the file.
                        let file = tokio::fs::File::open(&art.path).await.map_err(|source| {
                            SshError::Artifact {
                                path: art.path.clone(),
                                source,
                            }
                        })?;
                        conn.exec_with("upload", &cmd, tokio::io::BufReader::new(file))
                            .await
                    }
                }
            })
            .await;
        self.upload_finished(cx, host, art, result, started)
    }

    fn upload_started(&self, cx: &DeployContext, host: &SshHost, art: &LoadedArtifact) {
        cx.events.progress(
            Some(&host.name),
            "upload",
            "started",
            None,
            Some(format!("{} ({} bytes)", art.name, art.len)),
        );
    }

    /// Reports `upload` and `checksum` from the output of [`Self::upload_cmd`].
    fn upload_finished(
        &self,
        cx: &DeployContext,
        host: &SshHost,
        art: &LoadedArtifact,
        result: SshResult<Output>,
        started: Instant,
    ) -> SshResult<()> {
        let name = Some(host.name.as_str());
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                return Err(step_failed(cx, name, "upload", started, e));
            }
        };
        let text = out.stdout_str();
        let Some(sent) = out.mark("uploaded") else {
            let e = command_failed(host, "upload", &out);
            return Err(step_failed(cx, name, "upload", started, e));
        };
        cx.events.progress(
            name,
            "upload",
            "ok",
            Some(sent.duration_since(started)),
            None,
        );
        cx.events.progress(name, "checksum", "started", None, None);
        let result = match out.status {
            Some(0) => Ok(()),
            Some(3) => Err(SshError::ChecksumMismatch {
                host: host.name.clone(),
                address: host.address(),
                expected: art.expected.clone(),
                actual: text
                    .lines()
                    .find_map(|l| l.strip_prefix("sha256="))
                    .unwrap_or("?")
                    .trim()
                    .to_string(),
            }),
            _ => Err(command_failed(host, "checksum", &out)),
        };
        let (status, msg) = match &result {
            Ok(()) => ("ok", Some(format!("sha256 {}", art.expected))),
            Err(e) => ("failed", Some(e.to_string())),
        };
        cx.events
            .progress(name, "checksum", status, Some(sent.elapsed()), msg);
        result
    }

    /// The `check` step (what is live; remember it as `previous`; is the
    /// artifact already there?) and, for artifacts kept in memory, the
    /// upload and checksum in the same remote command.
    async fn check_and_upload(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        version: &str,
        art: Option<&LoadedArtifact>,
    ) -> SshResult<Checked> {
        let root = self.root_of(host);
        let dir = format!("{}/releases/{version}", sq(root));
        // With the upload in the same command, stdin carries the artifact:
        // when it is not needed, the host drains it.
        let combined = art.filter(|a| a.data.is_some());
        let drain = if combined.is_some() {
            "cat >/dev/null; "
        } else {
            ""
        };
        let have = match art {
            Some(a) => format!(
                "{SUM_FN} if [ -f releases/{version}/{n} ] && [ \"$(cd_sum releases/{version}/{n})\" = {exp} ]; \
                 then echo {MARK}have; {drain}exit 0; fi; ",
                n = a.name,
                exp = sq(&a.expected)
            ),
            None => String::new(),
        };
        // The `applied` marker (written last by every apply and rollback)
        // says what is fully live; a host without one gets it from its
        // symlink first. The release is live only when both agree; the
        // release to go back to is the applied one.
        let mut cmd = format!(
            "mkdir -p {r} && cd {r} || exit 5; c=$(readlink current 2>/dev/null || true); \
             if [ ! -f applied ]; then printf '%s' \"${{c##*/}}\" > applied || exit 5; fi; \
             a=$(cat applied); \
             printf 'current=%s\\n' \"$c\"; printf 'applied=%s\\n' \"$a\"; \
             if [ \"$c\" = releases/{version} ] && [ \"$a\" = {version} ]; then echo {MARK}live; {drain}exit 0; fi; \
             if [ -n \"$a\" ]; then ln -sfn \"releases/$a\" .previous.tmp.$$ && mv -Tf .previous.tmp.$$ previous; \
             else rm -f previous; fi || exit 5; {have}echo {MARK}checked",
            r = sq(root),
        );
        if let Some(a) = combined {
            cmd.push_str("; ");
            cmd.push_str(&Self::upload_cmd(&dir, a));
        }
        let name = Some(host.name.as_str());
        let started = Instant::now();
        cx.events.progress(name, "check", "started", None, None);
        let stdin = combined.and_then(|a| a.data.clone());
        let result = self
            .bounded(cx, host, "check", async {
                match stdin {
                    Some(data) => {
                        let _upload = self.inner.upload_permits.acquire().await;
                        conn.exec_bytes("check", &cmd, data).await
                    }
                    None => conn.exec("check", &cmd, None).await,
                }
            })
            .await;
        let marks = |out: &Output| {
            ["live", "have", "checked"]
                .into_iter()
                .find_map(|m| out.mark(m).map(|t| (m, t)))
        };
        let (out, (mark, checked_at)) = match result {
            Ok(out) => match marks(&out) {
                Some(m) => (out, m),
                None => {
                    let e = command_failed(host, "check", &out);
                    return Err(step_failed(cx, name, "check", started, e));
                }
            },
            Err(e) => {
                return Err(step_failed(cx, name, "check", started, e));
            }
        };
        cx.events.progress(
            name,
            "check",
            "ok",
            Some(checked_at.duration_since(started)),
            None,
        );
        let state = parse_state(&out.stdout_str());
        // What the host says was live goes into later commands (a revert):
        // it must pass the version rule, or nothing is switched.
        if let Some(old) = state.live() {
            if let Err(e) = check_name("version", &old) {
                let e = SshError::HostValue {
                    host: host.name.clone(),
                    what: "live release",
                    value: old,
                    reason: e.to_string(),
                };
                return Err(step_failed(cx, name, "check", started, e));
            }
        }
        let checked = Checked {
            old: state.live(),
            live: mark == "live",
        };
        match (mark, art) {
            ("live", _) | (_, None) => {}
            ("have", Some(a)) => cx.events.progress(
                name,
                "upload",
                "skipped",
                None,
                Some(format!("{} already on the host", a.name)),
            ),
            (_, Some(a)) => {
                if combined.is_some() {
                    self.upload_started(cx, host, a);
                    self.upload_finished(cx, host, a, Ok(out), checked_at)?;
                } else {
                    self.upload_verified(cx, conn, host, &dir, a).await?;
                }
            }
        }
        Ok(checked)
    }

    /// Points `current` at `releases/<version>` (symlink + rename) as the
    /// step `step`; with `cleanup`, then removes all but the newest
    /// `keep_releases` releases (never `current` or `previous`), reported
    /// as the step `cleanup`.
    #[allow(clippy::too_many_arguments)]
    async fn switch(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        step: &str,
        version: &str,
        require_existing: bool,
        cleanup: bool,
    ) -> SshResult<()> {
        let root = sq(self.root_of(host));
        let rel = sq(&format!("releases/{version}"));
        let ensure = if require_existing {
            format!("[ -d {rel} ] || {{ echo 'release is not on this host' >&2; exit 4; }}; ")
        } else {
            format!("mkdir -p {rel}; ")
        };
        let cleanup_cmd = if cleanup {
            format!(
                "echo {MARK}switched; set +e; if ! ( cd releases && \
                 cur=$(readlink ../current 2>/dev/null); cur=${{cur##*/}}; \
                 prev=$(readlink ../previous 2>/dev/null); prev=${{prev##*/}}; n=0; \
                 ls -1t | while IFS= read -r d; do \
                 case \"$d\" in ''|.*|*[!A-Za-z0-9._+-]*) continue;; esac; \
                 n=$((n+1)); [ $n -le {keep} ] && continue; \
                 [ \"$d\" = \"$cur\" ] || [ \"$d\" = \"$prev\" ] || rm -rf -- \"$d\"; done \
                 ) >/dev/null 2>&1; then echo cd:cleanup-failed; fi",
                keep = self.inner.keep_releases
            )
        } else {
            String::new()
        };
        let rel = sq(&format!("releases/{version}"));
        let cmd = format!(
            "set -e; cd {root}; {ensure}touch {rel}; \
             ln -sfn {rel} .current.tmp.$$; mv -Tf .current.tmp.$$ current; {cleanup_cmd}"
        );
        let started = Instant::now();
        let name = Some(host.name.as_str());
        cx.events.progress(
            name,
            step,
            "started",
            None,
            Some(format!("current -> releases/{version}")),
        );
        let result = self
            .bounded(cx, host, step, conn.exec(step, &cmd, None))
            .await
            .and_then(|out| match out.status {
                Some(0) => Ok(out),
                Some(4) => Err(SshError::NoSuchRelease {
                    host: host.name.clone(),
                    address: host.address(),
                    message: format!("release {version} is not on the host"),
                }),
                _ => Err(command_failed(host, step, &out)),
            });
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                return Err(step_failed(cx, name, step, started, e));
            }
        };
        let switched = out.mark("switched").unwrap_or_else(Instant::now);
        cx.events.progress(
            name,
            step,
            "ok",
            Some(switched.duration_since(started)),
            None,
        );
        if cleanup {
            let failed = out.stdout_str().contains("cd:cleanup-failed");
            cx.events.progress(
                name,
                "cleanup",
                if failed { "failed" } else { "ok" },
                Some(switched.elapsed()),
                Some(format!(
                    "keep the last {} releases",
                    self.inner.keep_releases
                )),
            );
        }
        Ok(())
    }

    fn env_prefix(&self, host: &SshHost, version: &str) -> String {
        let root = self.root_of(host);
        format!(
            "cd {cur} && export CD_VERSION={v} CD_ROOT={r} CD_RELEASE_DIR={d} CD_HOST={h} && ",
            cur = sq(&format!("{root}/current")),
            v = sq(version),
            r = sq(root),
            d = sq(&format!("{root}/releases/{version}")),
            h = sq(&host.name),
        )
    }

    /// The remote part of the health check (none for a check made from
    /// the deploy machine).
    fn health_body(&self) -> Option<String> {
        self.inner.health.as_ref().and_then(|check| match check {
            HealthCheck::Command(cmd) => Some(cmd.clone()),
            HealthCheck::Http(url) => Some(format!(
                "if command -v curl >/dev/null 2>&1; then curl -fsS -o /dev/null --max-time 10 {u}; \
                 else wget -q -O /dev/null -T 10 {u}; fi",
                u = sq(url)
            )),
            HealthCheck::HttpFromDeployer(_) => None,
        })
    }

    /// The URL of a health check made from the deploy machine, for `host`.
    fn local_health_url(&self, host: &SshHost) -> Option<String> {
        match &self.inner.health {
            Some(HealthCheck::HttpFromDeployer(url)) => Some(
                url.replace("{host}", &host.hostname)
                    .replace("{name}", &host.name),
            ),
            _ => None,
        }
    }

    /// One HTTP health check from the deploy machine.
    async fn check_from_deployer(&self, host: &SshHost, url: &str) -> SshResult<()> {
        let failed = |status: String, detail: String| SshError::CommandFailed {
            host: host.name.clone(),
            address: host.address(),
            step: "health".into(),
            status,
            stderr: detail,
        };
        let client = cd_stages::HttpClient::builder()
            .keep_alive(false)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| failed("none".into(), e.to_string()))?;
        match client.get(url).await {
            Ok(r) if r.status < 400 => Ok(()),
            Ok(r) => Err(failed(
                format!("HTTP {}", r.status),
                format!("GET {url} answered {}", r.status),
            )),
            Err(e) => Err(failed("none".into(), e.to_string())),
        }
    }

    /// Runs the restart command, then the health check, as the steps
    /// `restart` and `health` — in one remote command (a mark line between
    /// them gives each its own timing and standard error). A failing health
    /// check is retried alone as configured.
    async fn activate(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        version: &str,
        note: Option<String>,
    ) -> SshResult<()> {
        let health = self.health_body();
        let local = self.local_health_url(host);
        if self.inner.restart.is_none() && health.is_none() && local.is_none() {
            return Ok(());
        }
        let name = Some(host.name.as_str());
        let prefix = self.env_prefix(host, version);
        let restart_part = match &self.inner.restart {
            Some(cmd) => format!("( {cmd}\n ) || exit $?; "),
            None => String::new(),
        };
        let health_part = match &health {
            Some(cmd) => format!("( {cmd}\n )"),
            None => "true".into(),
        };
        let cmd = format!(
            "{prefix}{{ {restart_part}echo {MARK}restarted; echo {MARK}restarted >&2; {health_part}; }}"
        );
        let started = Instant::now();
        let first = if self.inner.restart.is_some() {
            "restart"
        } else {
            "health"
        };
        cx.events
            .progress(name, first, "started", None, note.clone());
        let out = match self
            .bounded(cx, host, first, conn.exec(first, &cmd, None))
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return Err(step_failed(cx, name, first, started, e));
            }
        };
        let restarted = out.mark("restarted");
        if self.inner.restart.is_some() {
            match restarted {
                Some(at) => {
                    cx.events.progress(
                        name,
                        "restart",
                        "ok",
                        Some(at.duration_since(started)),
                        None,
                    );
                }
                None => {
                    let e = command_failed(host, "restart", &out.stderr_before("restarted"));
                    return Err(step_failed(cx, name, "restart", started, e));
                }
            }
            if health.is_none() && local.is_none() {
                return Ok(());
            }
            cx.events.progress(name, "health", "started", None, note);
        }
        let health_started = restarted.unwrap_or(started);
        if let Some(url) = &local {
            let mut result = self
                .bounded(cx, host, "health", self.check_from_deployer(host, url))
                .await;
            for _ in 1..self.inner.health_attempts {
                if !matches!(result, Err(SshError::CommandFailed { .. })) {
                    break;
                }
                tokio::time::sleep(self.inner.health_interval).await;
                result = self
                    .bounded(cx, host, "health", self.check_from_deployer(host, url))
                    .await;
            }
            return self.health_outcome(cx, name, health_started, result);
        }
        let mut result = if out.success() {
            Ok(())
        } else {
            Err(command_failed(
                host,
                "health",
                &out.stderr_after("restarted"),
            ))
        };
        if let (Err(_), Some(body)) = (&result, &health) {
            let full = format!("{prefix}{{ {body}\n}}");
            for _ in 1..self.inner.health_attempts {
                tokio::time::sleep(self.inner.health_interval).await;
                result = self
                    .bounded(cx, host, "health", async {
                        self.exec_ok(conn, host, "health", &full, None)
                            .await
                            .map(|_| ())
                    })
                    .await;
                if !matches!(result, Err(SshError::CommandFailed { .. })) {
                    break;
                }
            }
        }
        self.health_outcome(cx, name, health_started, result)
    }

    /// Reports the health step's outcome as a progress event.
    fn health_outcome(
        &self,
        cx: &DeployContext,
        name: Option<&str>,
        started: Instant,
        result: SshResult<()>,
    ) -> SshResult<()> {
        match &result {
            Ok(()) => cx
                .events
                .progress(name, "health", "ok", Some(started.elapsed()), None),
            Err(e) => cx.events.progress(
                name,
                "health",
                "failed",
                Some(started.elapsed()),
                Some(e.to_string()),
            ),
        }
        result
    }

    /// Switches `host` back to `old` (or removes `current` when nothing was
    /// live) and restarts; used when a restart or health check fails.
    async fn revert(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        old: Option<&str>,
    ) -> SshResult<()> {
        match old {
            Some(old) => {
                self.switch(cx, conn, host, "revert", old, true, false)
                    .await?;
                self.activate(cx, conn, host, old, Some(format!("revert to {old}")))
                    .await?;
            }
            None => {
                let root = sq(self.root_of(host));
                self.run_step(cx, host, "revert", Some("remove current".into()), async {
                    self.exec_ok(conn, host, "revert", &format!("rm -f {root}/current"), None)
                        .await
                        .map(|_| ())
                })
                .await?;
            }
        }
        self.mark_applied(cx, conn, host, old).await
    }

    fn forget_state(&self, host: &SshHost) {
        self.inner
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host.name);
    }

    async fn apply_inner(&self, plan: &Plan, cx: &DeployContext) -> SshResult<Revision> {
        let host = self.host_for(&plan.target)?.clone();
        self.forget_state(&host);
        let version = plan.release.version.clone();
        check_name("version", &version)?;
        let art = self.load_artifact(&plan.release).await?;
        self.preflight().await?;
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| SshError::Config("deployer closed".into()))?;
        let conn = self.connection(&host, Some(cx)).await?;
        let checked = self
            .check_and_upload(cx, &conn, &host, &version, art.as_deref())
            .await?;
        let old = checked.old;
        let sha = art.as_ref().map(|a| a.expected.clone());
        if checked.live {
            cx.events.progress(
                Some(&host.name),
                "deploy",
                "skipped",
                None,
                Some(format!("{version} is already live")),
            );
            return Ok(self.revision(&host, &version, sha.as_deref()));
        }

        self.switch(cx, &conn, &host, "switch", &version, art.is_some(), true)
            .await?;
        if let Err(e) = self.activate(cx, &conn, &host, &version, None).await {
            // A cancelled activation is reverted too: switched but never
            // restarted, the host would run the old process while
            // `current()` named the new release. The revert works under a
            // fresh token (bounded by the step timeout and the runner's grace).
            let cancelled = matches!(e, SshError::Cancelled { .. });
            if self.inner.revert_on_failure || cancelled {
                let cleanup = cx.for_cleanup();
                if let Err(revert_err) = self.revert(&cleanup, &conn, &host, old.as_deref()).await {
                    // Not only logged: the host may be on neither release.
                    cx.events.progress(
                        Some(&host.name),
                        "revert",
                        "failed",
                        None,
                        Some(revert_err.to_string()),
                    );
                    return Err(SshError::RevertFailed {
                        host: host.name.clone(),
                        cause: Box::new(e),
                        revert: Box::new(revert_err),
                    });
                }
            }
            return Err(e);
        }
        // The last step, not cancelled half-way: the host runs the release.
        self.mark_applied(&cx.for_cleanup(), &conn, &host, Some(&version))
            .await?;
        Ok(self.revision(&host, &version, sha.as_deref()))
    }

    /// Records `version` (or nothing) as fully applied on `host`, as the
    /// step `record`: the last step of every apply, revert and rollback;
    /// `current()` reads it.
    async fn mark_applied(
        &self,
        cx: &DeployContext,
        conn: &Connection,
        host: &SshHost,
        version: Option<&str>,
    ) -> SshResult<()> {
        let root = sq(self.root_of(host));
        let v = version.map(sq).unwrap_or_else(|| "''".into());
        let cmd = format!(
            "cd {root} && printf '%s' {v} > .applied.tmp.$$ && mv -f .applied.tmp.$$ applied"
        );
        self.run_step(cx, host, "record", version.map(str::to_string), async {
            self.exec_ok(conn, host, "record", &cmd, None)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn rollback_inner(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> SshResult<Option<Revision>> {
        let host = self.host_for(target)?.clone();
        self.forget_state(&host);
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| SshError::Config("deployer closed".into()))?;
        let conn = self.connection(&host, Some(cx)).await?;
        let state = self
            .run_step(cx, &host, "current", None, self.read_state(&conn, &host))
            .await?;
        let want = match to {
            Some(rev) => Some(rev.version.clone()),
            None => state.previous.clone(),
        };
        if let Some(v) = &want {
            check_name("version", v)?;
        }
        // Skipped only when the release is fully live: marker and symlink
        // agree (a rollback interrupted between its switch and restart is
        // done again).
        if want == state.live() && want == state.current {
            cx.events.progress(
                Some(&host.name),
                "rollback",
                "skipped",
                None,
                Some("already live".into()),
            );
            return Ok(want.map(|v| self.revision(&host, &v, None)));
        }
        match want {
            None => {
                let root = sq(self.root_of(&host));
                self.run_step(
                    cx,
                    &host,
                    "rollback",
                    Some("remove current".into()),
                    async {
                        self.exec_ok(
                            &conn,
                            &host,
                            "rollback",
                            &format!("rm -f {root}/current"),
                            None,
                        )
                        .await
                        .map(|_| ())
                    },
                )
                .await?;
                self.mark_applied(&cx.for_cleanup(), &conn, &host, None)
                    .await?;
                Ok(None)
            }
            Some(v) => {
                self.switch(cx, &conn, &host, "rollback", &v, true, false)
                    .await?;
                self.activate(cx, &conn, &host, &v, Some(format!("rollback to {v}")))
                    .await?;
                self.mark_applied(&cx.for_cleanup(), &conn, &host, Some(&v))
                    .await?;
                Ok(Some(self.revision(&host, &v, None)))
            }
        }
    }
}

#[async_trait]
impl Deployer for SshDeployer {
    fn name(&self) -> &str {
        "ssh"
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
            .hosts
            .iter()
            .map(|h| {
                Target::new(&h.name)
                    .address(h.address())
                    .label("backend", "ssh")
            })
            .collect()
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        let host = self.host_for(target)?.clone();
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| cd_core::Error::from(SshError::Config("deployer closed".into())))?;
        let conn = self.connection(&host, None).await?;
        let state = match self.read_state(&conn, &host).await {
            Ok(s) => s,
            Err(e) => {
                self.forget_connection(&host).await;
                return Err(e.into());
            }
        };
        let settled = state.settled();
        let rev = state.live().map(|v| {
            let mut rev = self.revision(&host, &v, None);
            rev.deployed_at = None;
            if !settled {
                // Planning this release again is not a no-op: the switch
                // must be made to agree and the release restarted.
                rev.detail["settled"] = json!(false);
            }
            rev
        });
        self.inner
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.name.clone(), (Instant::now(), rev.clone()));
        Ok(rev)
    }

    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        let host = self.host_for(target)?.clone();
        check_name("version", &release.version)?;
        // A `current()` read an instant ago (rollout strategies call it just
        // before planning) saves a round trip; `apply` reconciles anyway.
        let recent = self
            .inner
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host.name)
            .filter(|(at, _)| at.elapsed() < RECENT_STATE_TTL)
            .map(|(_, rev)| rev);
        let current = match recent {
            Some(rev) => rev,
            None => self.current(target).await?,
        };
        let root = self.root_of(&host).to_string();
        let mut plan = Plan::new(release.clone(), target.clone(), current.clone());
        plan.detail = json!({ "host": host.address(), "root": root });
        let settled = current
            .as_ref()
            .is_none_or(|c| c.detail.get("settled") != Some(&json!(false)));
        if settled && current.as_ref().map(|c| c.version.as_str()) == Some(release.version.as_str())
        {
            return Ok(plan.change(Change::new(ChangeAction::NoOp, format!("{root}/current"))));
        }
        let v = &release.version;
        let mut release_dir = Change::new(ChangeAction::Create, format!("{root}/releases/{v}"));
        if let Some(a) = &release.artifact {
            release_dir.detail = json!({ "artifact": a.path, "sha256": a.sha256 });
        }
        let mut switch = Change::new(ChangeAction::Update, format!("{root}/current"));
        switch.detail = json!({
            "from": current.as_ref().map(|c| c.version.clone()),
            "to": v,
        });
        plan = plan.change(release_dir).change(switch);
        if let Some(cmd) = &self.inner.restart {
            let mut c = Change::new(ChangeAction::Update, format!("restart on {}", host.name));
            c.detail = json!({ "command": cmd });
            plan = plan.change(c);
        }
        Ok(plan)
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        self.apply_inner(plan, cx).await.map_err(Into::into)
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.rollback_inner(target, to, cx)
            .await
            .map_err(Into::into)
    }
}

/// A portable `cd_sum FILE` shell function printing the sha256 hex digest.
const SUM_FN: &str = "cd_sum() { if command -v sha256sum >/dev/null 2>&1; then sha256sum \"$1\"; \
                      else shasum -a 256 \"$1\"; fi | cut -d' ' -f1; };";

fn meta_len(data: &Option<bytes::Bytes>, path: &Path) -> u64 {
    match data {
        Some(d) => d.len() as u64,
        None => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
}

/// Reports `step` on `target` as failed (with its wall time) and hands the
/// error back, for `return Err(step_failed(..))`.
fn step_failed<E: std::fmt::Display>(
    cx: &DeployContext,
    target: Option<&str>,
    step: &str,
    started: Instant,
    e: E,
) -> E {
    cx.events.progress(
        target,
        step,
        "failed",
        Some(started.elapsed()),
        Some(e.to_string()),
    );
    e
}

fn command_failed(host: &SshHost, step: &str, out: &Output) -> SshError {
    SshError::CommandFailed {
        host: host.name.clone(),
        address: host.address(),
        step: step.to_string(),
        status: out.status_str(),
        stderr: out.stderr_tail(),
    }
}

fn parse_state(text: &str) -> HostState {
    let version_of = |link: &str| {
        let link = link.trim().trim_end_matches('/');
        if link.is_empty() {
            None
        } else {
            Some(link.rsplit('/').next().unwrap_or(link).to_string())
        }
    };
    let mut state = HostState {
        current: None,
        previous: None,
        applied: None,
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("current=") {
            state.current = version_of(v);
        } else if let Some(v) = line.strip_prefix("previous=") {
            state.previous = version_of(v);
        } else if let Some(v) = line.strip_prefix("applied=") {
            state.applied = Some(version_of(v));
        }
    }
    state
}

/// Versions and artifact names become directory and file names on the
/// host: letters, digits, `.`, `_`, `+`, `-`; not starting with `.`.
/// The rule is [`cd_core::types::validate_version`]'s (one rule for every
/// deployer), applied to versions and artifact names alike.
fn check_name(what: &'static str, value: &str) -> SshResult<()> {
    let ok = !value.is_empty()
        && value.len() <= cd_core::types::MAX_VERSION_LEN
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SshError::InvalidName {
            what,
            value: value.to_string(),
        })
    }
}

/// Quotes `s` for a POSIX shell.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn expand_home(path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    path.to_path_buf()
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a host prints for its state, parsing does not panic, and
        /// a release name taken from it is either refused by the version
        /// rule or safe to put in a command.
        #[test]
        fn host_state_parses_without_panic(text in "(\\PC{0,40}\n){0,6}|(current=|previous=|applied=)\\PC{0,40}") {
            let state = parse_state(&text);
            let _ = state.settled();
            if let Some(v) = state.live() {
                if check_name("version", &v).is_ok() {
                    prop_assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)));
                }
            }
        }

        /// Any known_hosts text, any host name: a verdict, never a panic.
        #[test]
        fn known_hosts_never_panics(
            text in prop::collection::vec("(@revoked |@cert-authority |#)?\\PC{0,30}( ssh-ed25519 \\PC{0,20})?", 0..8),
            host in "\\PC{0,20}",
            port in any::<u16>(),
        ) {
            let key = russh::keys::parse_public_key_base64(
                "AAAAC3NzaC1lZDI1NTE5AAAAIEmu7z8L69NUj6ZW4swq5yI3z5JWYMaBG58KbPfEVkI7",
            )
            .unwrap();
            let _ = known_hosts::check(&text.join("\n"), &host, port, &key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_specs() {
        let h = SshHost::parse("deploy@web1:2222").unwrap();
        assert_eq!(
            (h.name.as_str(), h.hostname.as_str(), h.port),
            ("web1:2222", "web1", 2222)
        );
        assert_eq!(h.user.as_deref(), Some("deploy"));
        let h = SshHost::parse("web2").unwrap();
        assert_eq!((h.hostname.as_str(), h.port), ("web2", 22));
        let h = SshHost::parse("[::1]:2200").unwrap();
        assert_eq!(
            (h.hostname.as_str(), h.port, h.address()),
            ("::1", 2200, "[::1]:2200".to_string())
        );
        assert!(SshHost::parse("web:notaport").is_err());
        assert!(SshHost::parse("@web").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("version", "v1.2.3+build-4_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "x;rm", "$(id)", ".."] {
            assert!(check_name("version", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sq("a'b"), "'a'\\''b'");
    }

    #[test]
    fn state_parsing() {
        let s = parse_state("current=releases/v2\nprevious=releases/v1\n");
        assert_eq!(s.current.as_deref(), Some("v2"));
        assert_eq!(s.previous.as_deref(), Some("v1"));
        let s = parse_state("current=\n");
        assert_eq!(s.current, None);
    }

    #[test]
    fn builder_rejects_bad_config() {
        assert!(SshDeployer::builder().key_file("k").build().is_err());
        assert!(SshDeployer::builder().hosts(["a"]).build().is_err());
        assert!(SshDeployer::builder()
            .hosts(["a", "a"])
            .key_file("k")
            .build()
            .is_err());
        let err = SshDeployer::builder()
            .hosts(["a:x"])
            .key_file("k")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), cd_core::ErrorKind::Invalid);
    }
}
