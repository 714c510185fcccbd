//! `ContainerDeployer`: releases as containers, through the Docker Engine
//! API (bollard), so it works with Docker and with Podman's
//! Docker-compatible service (`podman system service`).
//!
//! Each [`Target`] is one replica: one container at a time serving a host
//! port. Applying a release to a replica creates the container
//! `<app>-<target>-<version>` from the release's image (the image template
//! with `{version}` put in), stops the replica's running container, starts
//! the new one and waits until it is healthy (an HTTP probe on the host
//! port, or the image's own healthcheck) within a deadline. If it is not, or
//! it exits at start, the old container is started again and the error
//! says why (with the container's last log lines). The stopped container of
//! the previous release stays for rollback; older ones are removed (keep
//! the last [`ContainerDeployerBuilder::keep`]).
//!
//! What is live comes from the engine itself: every container carries the
//! labels `cd.app`, `cd.target`, `cd.release`, `cd.environment` and
//! `cd.seq` (creation order), so a second process, or a second machine
//! talking to the same engine, reads the same truth from
//! [`Deployer::current`].
//!
//! Images are never pulled: build or load them on the engine first.
//! Environment values given as [`Secret`] reach the container only; they are
//! never logged, put in labels, events or the store.
//!
//! Errors (all name the target and, where one is at fault, the image, port
//! or container):
//! - the engine does not answer: `Unavailable`, naming its socket;
//! - the image is not on the engine: `NotFound`;
//! - the host port is taken: `Conflict`;
//! - the container exits at start: `Failed`, with its exit code and last
//!   log lines;
//! - the probe never passes within the deadline: `Timeout`.
//!
//! ```no_run
//! # async fn demo() -> cd_core::Result<()> {
//! use std::time::Duration;
//! use cd_backends::container::ContainerDeployer;
//! use cd_core::Secret;
//! let web = ContainerDeployer::builder("web")
//!     .socket("/run/podman/podman.sock")
//!     .image("localhost/web:{version}")
//!     .container_port(8080)
//!     .replica("web-1", 18301)
//!     .replica("web-2", 18302)
//!     .env("LOG_LEVEL", "info")
//!     .secret_env("DATABASE_URL", Secret::new("postgres://...".into()))
//!     .health_http("/health")
//!     .health_timeout(Duration::from_secs(20))
//!     .build()?;
//! # let _ = web; Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, HealthConfig, HostConfig, PortBinding, RestartPolicy as EngineRestart,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::{ClientVersion, Docker};
use cd_core::{
    Change, ChangeAction, DeployContext, Deployer, DeployerCapabilities, Error, ErrorKind, Plan,
    Release, Result, Revision, Secret, Target,
};
use chrono::{TimeZone, Utc};
use futures::StreamExt;

/// The Docker API version asked for: 1.41, which Podman 4 and every Docker
/// since 20.10 serve.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Label keys.
const APP: &str = "cd.app";
const TARGET: &str = "cd.target";
const RELEASE: &str = "cd.release";
const ENVIRONMENT: &str = "cd.environment";
const SEQ: &str = "cd.seq";

/// How the engine restarts a container that stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never (the default: the deployer decides what runs).
    No,
    /// When it exits with a non-zero code, at most this many times.
    OnFailure(u32),
    /// Always, unless stopped by someone.
    UnlessStopped,
}

/// How a new container is judged healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// `GET http://127.0.0.1:<host port><path>` answers 2xx.
    Http(String),
    /// The image's own `HEALTHCHECK` (or [`ContainerDeployerBuilder::healthcheck`])
    /// says `healthy`. Docker runs healthchecks by itself; Podman schedules
    /// them with systemd timers, so on a host without systemd they only run
    /// when something calls `podman healthcheck run` (use
    /// [`HealthProbe::Http`] there).
    Container,
    /// Running is enough.
    Running,
}

#[derive(Debug, Clone)]
struct Replica {
    name: String,
    host_port: u16,
}

/// Builds a [`ContainerDeployer`].
#[derive(Debug, Clone)]
pub struct ContainerDeployerBuilder {
    app: String,
    socket: Option<String>,
    image: String,
    container_port: u16,
    replicas: Vec<Replica>,
    cmd: Option<Vec<String>>,
    env: Vec<(String, String)>,
    secret_env: Vec<(String, Secret<String>)>,
    volumes: Vec<String>,
    memory_bytes: Option<i64>,
    nano_cpus: Option<i64>,
    restart: RestartPolicy,
    health: HealthProbe,
    healthcheck: Option<Vec<String>>,
    health_timeout: Duration,
    stop_timeout: Duration,
    keep: usize,
}

impl ContainerDeployerBuilder {
    /// The engine's unix socket (`/run/podman/podman.sock`,
    /// `/var/run/docker.sock`, with or without `unix://`). Default:
    /// `DOCKER_HOST`, else `/var/run/docker.sock`.
    pub fn socket(mut self, path: impl Into<String>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The image, with `{version}` for the release's version
    /// (`localhost/web:{version}`). Required.
    pub fn image(mut self, template: impl Into<String>) -> Self {
        self.image = template.into();
        self
    }

    /// The port the application listens on inside the container (default
    /// 8080).
    pub fn container_port(mut self, port: u16) -> Self {
        self.container_port = port;
        self
    }

    /// A replica: a target named `name` publishing the container port on
    /// `127.0.0.1:<host_port>`.
    pub fn replica(mut self, name: impl Into<String>, host_port: u16) -> Self {
        self.replicas.push(Replica {
            name: name.into(),
            host_port,
        });
        self
    }

    /// The command (default: the image's).
    pub fn cmd<I, S>(mut self, cmd: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// An environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// An environment variable whose value is a secret: given to the
    /// engine, never logged or stored by cd.
    pub fn secret_env(mut self, key: impl Into<String>, value: Secret<String>) -> Self {
        self.secret_env.push((key.into(), value));
        self
    }

    /// A volume or bind mount, as the engine reads it (`/srv/data:/data:ro`,
    /// `name:/data`).
    pub fn volume(mut self, spec: impl Into<String>) -> Self {
        self.volumes.push(spec.into());
        self
    }

    /// A memory limit, in bytes.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = Some(bytes.min(i64::MAX as u64) as i64);
        self
    }

    /// A CPU limit, in CPUs (`0.5` is half a CPU).
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.nano_cpus = Some((cpus.max(0.0) * 1e9) as i64);
        self
    }

    /// The restart policy (default: [`RestartPolicy::No`]).
    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Healthy when `GET <path>` on the replica's host port answers 2xx (the
    /// default, with `/`).
    pub fn health_http(mut self, path: impl Into<String>) -> Self {
        self.health = HealthProbe::Http(path.into());
        self
    }

    /// How health is judged.
    pub fn health(mut self, probe: HealthProbe) -> Self {
        self.health = probe;
        self
    }

    /// A healthcheck command run inside the container every second
    /// (`["CMD", "wget", "-q", "-O-", "http://127.0.0.1:8080/health"]`);
    /// implies [`HealthProbe::Container`].
    pub fn healthcheck<I, S>(mut self, test: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.healthcheck = Some(test.into_iter().map(Into::into).collect());
        self.health = HealthProbe::Container;
        self
    }

    /// How long a new container has to become healthy (default 30 s).
    pub fn health_timeout(mut self, d: Duration) -> Self {
        self.health_timeout = d;
        self
    }

    /// How long a container has to stop before it is killed (default 10 s).
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = d;
        self
    }

    /// Containers kept per replica, the running one included (default 2:
    /// the live release and the previous one, for rollback; at least 1).
    pub fn keep(mut self, n: usize) -> Self {
        self.keep = n.max(1);
        self
    }

    /// Builds the deployer (no connection is made yet).
    ///
    /// Errors: [`ErrorKind::Invalid`] without an image or a replica, for two
    /// replicas with one name or one port, or a socket bollard refuses.
    pub fn build(self) -> Result<ContainerDeployer> {
        if self.image.is_empty() {
            return Err(Error::invalid(format!(
                "container deployer `{}` has no image: set .image(\"registry/app:{{version}}\")",
                self.app
            )));
        }
        if self.replicas.is_empty() {
            return Err(Error::invalid(format!(
                "container deployer `{}` has no replica: add .replica(name, host_port)",
                self.app
            )));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(o) = self.replicas[..i]
                .iter()
                .find(|o| o.name == r.name || o.host_port == r.host_port)
            {
                return Err(Error::invalid(format!(
                    "container deployer `{}`: replicas `{}` and `{}` share a name or the host port {}",
                    self.app, o.name, r.name, r.host_port
                )));
            }
        }
        let socket = self
            .socket
            .clone()
            .or_else(|| {
                std::env::var("DOCKER_HOST")
                    .ok()
                    .filter(|h| h.starts_with("unix://"))
            })
            .unwrap_or_else(|| "/var/run/docker.sock".into());
        let socket = socket.trim_start_matches("unix://").to_string();
        let probe = cd_stages::HttpClient::builder()
            .keep_alive(false)
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        Ok(ContainerDeployer {
            inner: Arc::new(Inner {
                docker: std::sync::Mutex::new(None),
                socket,
                cfg: self,
                probe,
            }),
        })
    }
}

struct Inner {
    /// Connected on first use: the socket may appear after the deployer is
    /// built (an engine started later).
    docker: std::sync::Mutex<Option<Docker>>,
    socket: String,
    cfg: ContainerDeployerBuilder,
    probe: cd_stages::HttpClient,
}

/// Releases as containers on a Docker-API engine; see the [module docs](self).
#[derive(Clone)]
pub struct ContainerDeployer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ContainerDeployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDeployer")
            .field("app", &self.inner.cfg.app)
            .field("socket", &self.inner.socket)
            .field("image", &self.inner.cfg.image)
            .field(
                "replicas",
                &self
                    .inner
                    .cfg
                    .replicas
                    .iter()
                    .map(|r| format!("{}:{}", r.name, r.host_port))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One of a replica's containers, as the engine lists it.
#[derive(Debug, Clone)]
struct Found {
    id: String,
    name: String,
    release: String,
    seq: u64,
    running: bool,
    created: i64,
}

impl ContainerDeployer {
    /// A builder for application `app` (the `cd.app` label and the name
    /// prefix of its containers).
    pub fn builder(app: impl Into<String>) -> ContainerDeployerBuilder {
        ContainerDeployerBuilder {
            app: app.into(),
            socket: None,
            image: String::new(),
            container_port: 8080,
            replicas: Vec::new(),
            cmd: None,
            env: Vec::new(),
            secret_env: Vec::new(),
            volumes: Vec::new(),
            memory_bytes: None,
            nano_cpus: None,
            restart: RestartPolicy::No,
            health: HealthProbe::Http("/".into()),
            healthcheck: None,
            health_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            keep: 2,
        }
    }

    /// The image for `version`.
    pub fn image_for(&self, version: &str) -> String {
        self.inner.cfg.image.replace("{version}", version)
    }

    /// The host port of a replica.
    pub fn host_port(&self, target: &str) -> Option<u16> {
        self.replica(target).ok().map(|r| r.host_port)
    }

    /// The engine's socket.
    pub fn socket(&self) -> &str {
        &self.inner.socket
    }

    /// Removes every container of this application on the engine (all
    /// replicas, all releases).
    pub async fn remove_all(&self) -> Result<()> {
        for r in &self.inner.cfg.replicas {
            for c in self.list(&r.name).await? {
                self.remove(&c.id).await?;
            }
        }
        Ok(())
    }

    /// The engine's client, connected on first use.
    fn docker(&self) -> Result<Docker> {
        let mut slot = self.inner.docker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let socket = &self.inner.socket;
        let d = Docker::connect_with_unix(socket, 120, &API_VERSION).map_err(|e| {
            Error::unavailable(format!(
                "the container engine at {socket} does not answer: {e} (is it running? `podman system service` or dockerd)"
            ))
            .with("socket", socket)
        })?;
        *slot = Some(d.clone());
        Ok(d)
    }

    /// Whether container `id` runs, its exit code once it stopped, and its
    /// healthcheck status (`starting`, `healthy`, `unhealthy`), from the
    /// engine's container list (its `inspect` states differ between Docker
    /// and Podman; the list's do not).
    async fn state(&self, id: &str) -> Result<(bool, Option<i64>, Option<String>)> {
        let list = self
            .containers_json(&serde_json::json!({ "id": [id] }))
            .await
            .map_err(|e| e.with("container", id))?;
        let Some(c) = list.first() else {
            return Ok((false, None, None));
        };
        let state = c["State"].as_str().unwrap_or_default();
        let running = matches!(state, "running" | "restarting");
        let status = c["Status"].as_str().unwrap_or_default();
        // Docker: "Exited (3) 2 seconds ago"; Podman: also `ExitCode`.
        let exit = c["ExitCode"].as_i64().or_else(|| {
            status
                .strip_prefix("Exited (")
                .and_then(|r| r.split(')').next())
                .and_then(|n| n.trim().parse().ok())
        });
        let mut health = c["Health"]["Status"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                ["(healthy)", "(unhealthy)", "(health: starting)"]
                    .iter()
                    .find(|m| status.contains(*m))
                    .map(|m| {
                        m.trim_matches(|c| c == '(' || c == ')')
                            .replace("health: ", "")
                    })
            });
        if health.is_none() && running && self.inner.cfg.health == HealthProbe::Container {
            // Podman's list leaves it out; its inspect has it.
            let inspect = self
                .raw_get(&format!("/v1.41/containers/{id}/json"))
                .await
                .map_err(|e| e.with("container", id))?;
            health = inspect["State"]["Health"]["Status"]
                .as_str()
                .map(str::to_string);
        }
        Ok((running, exit, health))
    }

    fn replica(&self, target: &str) -> Result<&Replica> {
        self.inner
            .cfg
            .replicas
            .iter()
            .find(|r| r.name == target)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "container deployer `{}` has no replica `{target}`",
                    self.inner.cfg.app
                ))
                .with("target", target)
            })
    }

    fn container_name(&self, target: &str, version: &str) -> String {
        let clean = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        format!(
            "{}-{}-{}",
            clean(&self.inner.cfg.app),
            clean(target),
            clean(version)
        )
    }

    /// An engine error as ours.
    fn engine_err(&self, what: &str, e: bollard::errors::Error) -> Error {
        use bollard::errors::Error as E;
        match e {
            E::DockerResponseServerError {
                status_code,
                message,
            } => {
                let kind = match status_code {
                    404 => ErrorKind::NotFound,
                    409 => ErrorKind::Conflict,
                    400 => ErrorKind::Invalid,
                    _ if message.contains("address already in use") => ErrorKind::Conflict,
                    _ => ErrorKind::Failed,
                };
                Error::new(
                    kind,
                    format!("{what}: the engine answered {status_code}: {message}"),
                )
            }
            other => Error::unavailable(format!(
                "{what}: the container engine at {} does not answer: {other}",
                self.inner.socket
            ))
            .with("socket", &self.inner.socket),
        }
    }

    async fn list(&self, target: &str) -> Result<Vec<Found>> {
        let filters = serde_json::json!({
            "label": [format!("{APP}={}", self.inner.cfg.app), format!("{TARGET}={target}")],
        });
        let list = self
            .containers_json(&filters)
            .await
            .map_err(|e| e.with("target", target))?;
        let mut found: Vec<Found> = list.iter().filter_map(found).collect();
        found.sort_by(|a, b| b.seq.cmp(&a.seq).then(b.created.cmp(&a.created)));
        Ok(found)
    }

    /// `GET /containers/json?all=true&filters=...` as plain JSON: the
    /// engines disagree on state names (Podman says `stopped` where Docker
    /// says `exited`), which typed models refuse.
    async fn containers_json(&self, filters: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
        let mut url = url_path("/v1.41/containers/json");
        url.query_pairs_mut()
            .append_pair("all", "true")
            .append_pair("filters", &filters.to_string());
        let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
        let body = self.raw_get(&path).await?;
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    /// A GET on the engine's socket, its JSON body.
    async fn raw_get(&self, path: &str) -> Result<serde_json::Value> {
        use http_body_util::BodyExt;
        let socket = &self.inner.socket;
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::unavailable(format!(
                "the container engine at {socket} does not answer: {e} (is it running? `podman system service` or dockerd)"
            ))
            .with("socket", socket)
        };
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("Host", "engine")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| Error::invalid(format!("engine request {path}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !(200..300).contains(&status) {
            let message = json["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(self.engine_err(
                &format!("GET {path}"),
                bollard::errors::Error::DockerResponseServerError {
                    status_code: status,
                    message,
                },
            ));
        }
        Ok(json)
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.docker()?.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(self.engine_err(&format!("removing container {id}"), e)),
        }
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let opts = StopContainerOptions {
            t: Some(self.inner.cfg.stop_timeout.as_secs().min(3600) as i32),
            ..Default::default()
        };
        match self.docker()?.stop_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // Already stopped (304) or gone.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(self.engine_err(&format!("stopping container {id}"), e)),
        }
    }

    async fn start(&self, id: &str, replica: &Replica) -> Result<()> {
        self.docker()?
            .start_container(id, None)
            .await
            .map_err(|e| {
                let err = self.engine_err(&format!("starting container {id}"), e);
                if err.message().contains("address already in use") {
                    Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "host port {} of replica `{}` is taken by another process: {}",
                            replica.host_port,
                            replica.name,
                            err.message()
                        ),
                    )
                    .with("port", replica.host_port)
                } else {
                    err
                }
            })
            .map_err(|e| e.with("target", &replica.name).with("container", id))
    }

    async fn last_logs(&self, id: &str) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".into(),
            ..Default::default()
        };
        let Ok(docker) = self.docker() else {
            return String::new();
        };
        let mut stream = docker.logs(id, Some(opts));
        let mut out = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            out.push_str(&chunk.to_string());
        }
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `id` is healthy, it exits, the deadline passes or the
    /// run is cancelled.
    async fn wait_healthy(&self, id: &str, replica: &Replica, cx: &DeployContext) -> Result<()> {
        let deadline = Instant::now() + self.inner.cfg.health_timeout;
        let mut last = String::from("no answer yet");
        loop {
            let (running, exit_code, health) = self.state(id).await?;
            if !running {
                let code = exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "unknown".into());
                let logs = self.last_logs(id).await;
                return Err(Error::failed(format!(
                    "container {id} of replica `{}` exited at start (exit code {code}); last log lines:\n{}",
                    replica.name,
                    if logs.is_empty() { "(none)" } else { &logs }
                ))
                .with("target", &replica.name)
                .with("container", id)
                .retryable(false));
            }
            let healthy = match &self.inner.cfg.health {
                HealthProbe::Running => true,
                HealthProbe::Container => {
                    last = format!("healthcheck: {}", health.as_deref().unwrap_or("none yet"));
                    health.as_deref() == Some("healthy")
                }
                HealthProbe::Http(path) => {
                    let url = format!("http://127.0.0.1:{}{path}", replica.host_port);
                    match self.inner.probe.get(&url).await {
                        Ok(r) if r.is_success() => true,
                        Ok(r) => {
                            last = format!("GET {url} -> {}", r.status);
                            false
                        }
                        Err(e) => {
                            last = e.to_string();
                            false
                        }
                    }
                }
            };
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "container {id} of replica `{}` never passed its health probe within {} ms (last: {last})",
                        replica.name,
                        self.inner.cfg.health_timeout.as_millis()
                    ),
                )
                .with("target", &replica.name)
                .with("container", id));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = cx.cancel.cancelled() => {
                    return Err(Error::cancelled().with("target", &replica.name));
                }
            }
        }
    }

    async fn create(&self, replica: &Replica, version: &str, environment: &str) -> Result<String> {
        let cfg = &self.inner.cfg;
        let image = self.image_for(version);
        if let Err(e) = self.docker()?.inspect_image(&image).await {
            let err = self.engine_err(&format!("image {image}"), e);
            return Err(if err.kind() == ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "image {image} is not on the engine at {}: cd never pulls; build or load it there first",
                        self.inner.socket
                    ),
                )
            } else {
                err
            }
            .with("image", &image)
            .with("target", &replica.name));
        }
        let seq = Utc::now().timestamp_micros().max(0) as u64;
        let labels = HashMap::from([
            (APP.to_string(), cfg.app.clone()),
            (TARGET.to_string(), replica.name.clone()),
            (RELEASE.to_string(), version.to_string()),
            (ENVIRONMENT.to_string(), environment.to_string()),
            (SEQ.to_string(), seq.to_string()),
        ]);
        let mut env: Vec<String> = cfg.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(
            cfg.secret_env
                .iter()
                .map(|(k, v)| format!("{k}={}", v.expose())),
        );
        let port = format!("{}/tcp", cfg.container_port);
        let restart = match cfg.restart {
            RestartPolicy::No => EngineRestart {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            },
            RestartPolicy::OnFailure(n) => EngineRestart {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(i64::from(n)),
            },
            RestartPolicy::UnlessStopped => EngineRestart {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            },
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: cfg.cmd.clone(),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port.clone()]),
            healthcheck: cfg.healthcheck.as_ref().map(|test| HealthConfig {
                test: Some(test.clone()),
                interval: Some(1_000_000_000),
                timeout: Some(1_000_000_000),
                retries: Some(3),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    port,
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(replica.host_port.to_string()),
                    }]),
                )])),
                binds: (!cfg.volumes.is_empty()).then(|| cfg.volumes.clone()),
                memory: cfg.memory_bytes,
                nano_cpus: cfg.nano_cpus,
                restart_policy: Some(restart),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = self.container_name(&replica.name, version);
        // A container of this name from an earlier apply is replaced: the
        // configuration may have changed since.
        self.remove(&name).await?;
        let opts = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = self
            .docker()?
            .create_container(Some(opts), body)
            .await
            .map_err(|e| {
                self.engine_err(&format!("creating container {name} from {image}"), e)
                    .with("image", &image)
                    .with("target", &replica.name)
            })?;
        Ok(created.id)
    }

    /// Stops what runs on the replica, starts `id`, waits for health; on
    /// failure stops `id` and starts what ran before again.
    async fn switch_to(
        &self,
        replica: &Replica,
        id: &str,
        running: &[Found],
        cx: &DeployContext,
    ) -> Result<()> {
        for old in running.iter().filter(|c| c.id != id) {
            self.stop(&old.id).await?;
        }
        let result = match self.start(id, replica).await {
            Ok(()) => self.wait_healthy(id, replica, cx).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // Back to what ran before, whatever failed.
            let _ = self.stop(id).await;
            for old in running.iter().filter(|c| c.id != id) {
                let _ = self.start(&old.id, replica).await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes the replica's stopped containers beyond `keep`.
    async fn prune(&self, target: &str) -> Result<()> {
        let all = self.list(target).await?;
        for c in all
            .iter()
            .filter(|c| !c.running)
            .skip(self.inner.cfg.keep - 1)
        {
            self.remove(&c.id).await?;
        }
        Ok(())
    }

    fn revision(&self, target: &str, c: &Found) -> Revision {
        let mut r = Revision::new(target, &c.release, short(&c.id));
        r.deployed_at = Utc.timestamp_opt(c.created, 0).single();
        r.detail = serde_json::json!({
            "container": c.name,
            "image": self.image_for(&c.release),
            "host_port": self.host_port(target),
        });
        r
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn found(c: &serde_json::Value) -> Option<Found> {
    let labels = &c["Labels"];
    Some(Found {
        id: c["Id"].as_str()?.to_string(),
        name: c["Names"][0]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        release: labels[RELEASE].as_str()?.to_string(),
        seq: labels[SEQ]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        running: matches!(c["State"].as_str(), Some("running" | "restarting")),
        created: c["Created"].as_i64().unwrap_or(0),
    })
}

/// A URL to build an engine path and query with.
fn url_path(path: &str) -> url::Url {
    let mut u = url::Url::parse("http://engine").expect("static URL");
    u.set_path(path);
    u
}

#[async_trait]
impl Deployer for ContainerDeployer {
    fn name(&self) -> &str {
        "container"
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
            .replicas
            .iter()
            .map(|r| Target::new(&r.name).address(format!("127.0.0.1:{}", r.host_port)))
            .collect()
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        self.replica(&target.name)?;
        let all = self.list(&target.name).await?;
        Ok(all
            .iter()
            .find(|c| c.running)
            .map(|c| self.revision(&target.name, c)))
    }

    async fn plan(&self, release: &Release, target: &Target, _cx: &DeployContext) -> Result<Plan> {
        self.replica(&target.name)?;
        cd_core::types::validate_version(&release.version)?;
        let current = self.current(target).await?;
        let mut plan = Plan::new(release.clone(), target.clone(), current.clone());
        let live = current.as_ref().map(|c| c.version.as_str());
        if live != Some(release.version.as_str()) {
            plan.changes.push(Change {
                action: if current.is_some() {
                    ChangeAction::Update
                } else {
                    ChangeAction::Create
                },
                address: format!(
                    "container {}",
                    self.container_name(&target.name, &release.version)
                ),
                detail: serde_json::json!({
                    "from": live,
                    "to": release.version,
                    "image": self.image_for(&release.version),
                }),
            });
        }
        Ok(plan)
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        let replica = self.replica(&plan.target.name)?.clone();
        let version = &plan.release.version;
        cd_core::types::validate_version(version)?;
        let all = self.list(&replica.name).await?;
        let running: Vec<Found> = all.iter().filter(|c| c.running).cloned().collect();
        if let Some(live) = running.iter().find(|c| &c.release == version) {
            if running.len() == 1 {
                return Ok(self.revision(&replica.name, live));
            }
        }
        if cx.cancel.is_cancelled() {
            return Err(Error::cancelled().with("target", &replica.name));
        }
        let id = self.create(&replica, version, &cx.environment).await?;
        if let Err(e) = self.switch_to(&replica, &id, &running, cx).await {
            let _ = self.remove(&id).await;
            return Err(e);
        }
        self.prune(&replica.name).await?;
        let now = self.list(&replica.name).await?;
        let live = now.iter().find(|c| c.id == id).ok_or_else(|| {
            Error::failed(format!("container {id} vanished after it started"))
                .with("target", &replica.name)
        })?;
        Ok(self.revision(&replica.name, live))
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let replica = self.replica(&target.name)?.clone();
        let all = self.list(&replica.name).await?;
        let running: Vec<Found> = all.iter().filter(|c| c.running).cloned().collect();
        let live = running.first().map(|c| c.release.clone());
        let back = match to {
            Some(rev) => all.iter().find(|c| c.release == rev.version).cloned(),
            None => all
                .iter()
                .find(|c| !c.running && Some(&c.release) != live.as_ref())
                .cloned(),
        };
        let cx = cx.for_cleanup();
        match (back, to) {
            (Some(back), _) => {
                if back.running && running.len() == 1 {
                    return Ok(Some(self.revision(&replica.name, &back)));
                }
                self.switch_to(&replica, &back.id, &running, &cx).await?;
                self.prune(&replica.name).await?;
                let now = self.list(&replica.name).await?;
                Ok(now
                    .iter()
                    .find(|c| c.id == back.id)
                    .map(|c| self.revision(&replica.name, c)))
            }
            // The revision's container is gone: recreate it from its image.
            (None, Some(rev)) => {
                let id = self.create(&replica, &rev.version, &cx.environment).await?;
                if let Err(e) = self.switch_to(&replica, &id, &running, &cx).await {
                    let _ = self.remove(&id).await;
                    return Err(e);
                }
                self.prune(&replica.name).await?;
                let now = self.list(&replica.name).await?;
                Ok(now
                    .iter()
                    .find(|c| c.id == id)
                    .map(|c| self.revision(&replica.name, c)))
            }
            // Nothing before the first release: remove it.
            (None, None) => {
                for c in &all {
                    self.remove(&c.id).await?;
                }
                Ok(None)
            }
        }
    }
}
