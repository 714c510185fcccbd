//! `LocalRouter`: a TCP proxy that sends new connections to the active slot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{DeployContext, Error, ErrorKind, Result, Router};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::LocalProcessDeployer;

/// Configures a [`LocalRouter`].
#[derive(Debug, Clone)]
pub struct LocalRouterBuilder {
    listen: SocketAddr,
    slots: BTreeMap<String, u16>,
    state_dir: Option<PathBuf>,
    initial: Option<String>,
}

impl LocalRouterBuilder {
    /// Adds a slot: a name and the local port its process listens on.
    pub fn slot(mut self, name: impl Into<String>, port: u16) -> Self {
        self.slots.insert(name.into(), port);
        self
    }

    /// Where the active slot is remembered across restarts (a file
    /// `router-<port>.json`). Without it nothing is remembered.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The slot active at start when none is remembered.
    pub fn initial(mut self, slot: impl Into<String>) -> Self {
        self.initial = Some(slot.into());
        self
    }

    /// Binds the listening socket and starts proxying. The proxy stops when
    /// the last clone of the returned router is dropped.
    pub async fn start(self) -> Result<LocalRouter> {
        let listener = TcpListener::bind(self.listen).await.map_err(|e| {
            Error::new(
                ErrorKind::Conflict,
                format!("router cannot listen on {}: {e}", self.listen),
            )
            .with("step", "listen")
        })?;
        let listen = listener
            .local_addr()
            .map_err(|e| Error::unavailable(e.to_string()))?;
        let state_file = self
            .state_dir
            .as_ref()
            .map(|d| d.join(format!("router-{}.json", self.listen.port())));
        let remembered = state_file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<RouterState>(&b).ok())
            .and_then(|s| s.active)
            .filter(|s| self.slots.contains_key(s));
        let active = remembered.or(self.initial.filter(|s| self.slots.contains_key(s)));
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            slots: self.slots,
            active: RwLock::new(active),
            state_file,
        });
        tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        Ok(LocalRouter {
            listen,
            shared,
            _stop: Arc::new(cancel.drop_guard()),
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RouterState {
    active: Option<String>,
}

#[derive(Debug)]
struct Shared {
    slots: BTreeMap<String, u16>,
    active: RwLock<Option<String>>,
    state_file: Option<PathBuf>,
}

impl Shared {
    fn active(&self) -> Option<String> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn active_port(&self) -> Option<u16> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        active.as_ref().and_then(|s| self.slots.get(s).copied())
    }
}

/// A TCP proxy on a local port that forwards each new connection to the
/// active slot's port: the traffic switch of a local blue-green deployment.
///
/// [`Router::switch`] changes, atomically, where *new* connections go;
/// connections already open finish on the slot they started on (as a load
/// balancer drains). Clients that keep connections alive across a switch
/// keep talking to the old slot until they reconnect.
///
/// ```no_run
/// use cd_backends::local::LocalRouter;
/// use cd_core::{DeployContext, Router};
/// # async fn demo() -> cd_core::Result<()> {
/// let router = LocalRouter::builder(18080).slot("blue", 18081).slot("green", 18082).start().await?;
/// router.switch("green", &DeployContext::detached("production")).await?;
/// assert_eq!(router.active().await?, Some("green".to_string()));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LocalRouter {
    listen: SocketAddr,
    shared: Arc<Shared>,
    _stop: Arc<DropGuard>,
}

impl LocalRouter {
    /// A router listening on `127.0.0.1:<port>` (0 picks a free port).
    pub fn builder(port: u16) -> LocalRouterBuilder {
        LocalRouterBuilder {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            slots: BTreeMap::new(),
            state_dir: None,
            initial: None,
        }
    }

    /// A router over a deployer's targets, remembering the active slot in
    /// the deployer's state directory.
    pub fn for_deployer(deployer: &LocalProcessDeployer, port: u16) -> LocalRouterBuilder {
        let mut b = Self::builder(port).state_dir(deployer.state_dir());
        for slot in &deployer.inner.cfg.slots {
            b = b.slot(&slot.name, slot.port);
        }
        b
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }
}

#[async_trait]
impl Router for LocalRouter {
    async fn active(&self) -> Result<Option<String>> {
        Ok(self.shared.active())
    }

    async fn switch(&self, slot: &str, cx: &DeployContext) -> Result<()> {
        let started = Instant::now();
        let Some(&port) = self.shared.slots.get(slot) else {
            let known: Vec<&str> = self.shared.slots.keys().map(String::as_str).collect();
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("router has no slot `{slot}` (known: {})", known.join(", ")),
            )
            .with("target", slot)
            .with("step", "switch"));
        };
        // Refuse to send traffic to a slot where nothing listens.
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            return Err(Error::unavailable(format!(
                "slot `{slot}` (port {port}) accepts no connections; traffic not switched"
            ))
            .with("target", slot)
            .with("step", "switch"));
        }
        let from = {
            let mut active = self
                .shared
                .active
                .write()
                .unwrap_or_else(|p| p.into_inner());
            active.replace(slot.to_string())
        };
        if let Some(file) = &self.shared.state_file {
            let state = RouterState {
                active: Some(slot.to_string()),
            };
            let write = || -> std::io::Result<()> {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = file.with_extension("json.tmp");
                std::fs::write(
                    &tmp,
                    serde_json::to_vec(&state).map_err(std::io::Error::other)?,
                )?;
                std::fs::rename(&tmp, file)
            };
            if let Err(e) = write() {
                cx.events.warn(format!(
                    "router: cannot remember the active slot in {}: {e}",
                    file.display()
                ));
            }
        }
        cx.events.progress(
            Some(slot),
            "switch",
            "ok",
            Some(started.elapsed()),
            Some(format!(
                "{} now sends new connections to {slot} (port {port}), was {}",
                self.listen,
                from.as_deref().unwrap_or("none")
            )),
        );
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        let Ok((mut inbound, _)) = accepted else {
            // Out of file descriptors and the like: back off a little.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Some(port) = shared.active_port() else {
            // No active slot: refuse by closing.
            continue;
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}
