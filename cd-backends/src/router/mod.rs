//! `HttpRouter`: an embedded HTTP reverse proxy (hyper) in front of a
//! service's slots or replicas, whose upstream weights change atomically.
//!
//! - **Blue-green**: as a [`cd_core::Router`], [`Router::switch`] moves all
//!   traffic to one slot at once, then waits for the requests still in
//!   flight on the others to finish (the drain timeout) before it returns,
//!   so the strategy never stops a slot that is still answering.
//! - **Canary by traffic**: as a [`cd_core::WeightedRouter`],
//!   [`WeightedRouter::set_weights`] sends each slot its share in percent
//!   (`canary 10`, `stable 90`); [`cd_core::TrafficCanary`] walks the steps
//!   with an analysis between them.
//! - **Sticky sessions** (optional): requests carrying the same header or
//!   cookie value go to the same upstream while the weights do not change.
//! - **Retries**: a request whose upstream refuses the connection goes to
//!   another upstream with weight (at most 2 retries): nothing was sent, so
//!   this is safe for any method. A failure after the request was sent is a
//!   `502` (it may have been processed).
//! - **Connections**: each client connection keeps its own keep-alive
//!   connection to each upstream (as nginx's `keepalive` upstreams), so no
//!   pool is shared between connections.
//! - **Headers**: `X-Forwarded-For` (appended), `X-Forwarded-Proto`,
//!   `X-Forwarded-Host`.
//! - **Its own samples**: per upstream, requests, errors (a 5xx answer or
//!   no answer at all) and latency (HdrHistogram, µs); [`RouterMonitor`]
//!   turns them into [`cd_core::Monitor`] samples, so a canary is judged on
//!   the traffic it really served.
//!
//! - **Replica pools**: [`HttpRouter::spread`] shares traffic evenly between
//!   replicas; [`Drained`] wraps their deployer so each replica leaves the
//!   rotation (drained) while it is replaced: rolling updates drop nothing.
//!
//! It runs in the deploy process, or as a process of its own (`cd-router`)
//! driven through its admin API ([`RemoteRouter`]).
//!
//! ```no_run
//! # async fn demo() -> cd_core::Result<()> {
//! use cd_backends::router::HttpRouter;
//! let router = HttpRouter::builder("127.0.0.1:8080")
//!     .upstream("blue", "127.0.0.1:18301")
//!     .upstream("green", "127.0.0.1:18302")
//!     .start()
//!     .await?;
//! assert_eq!(router.weights(), vec![("blue".to_string(), 100), ("green".to_string(), 0)]);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    DeployContext, Error, ErrorKind, Monitor, MonitorContext, Result, Sample, Target,
    WeightedRouter,
};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

mod admin;
mod pool;
pub use admin::RemoteRouter;
pub use pool::Drained;

/// What the router answers with: an upstream's body, or its own short
/// message (an enum, not a box: no allocation per request).
enum ProxyBody {
    Upstream(Tracked),
    Own(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(t) => Pin::new(t).poll_frame(cx),
            ProxyBody::Own(f) => Pin::new(f).poll_frame(cx).map_err(|e| match e {}),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(t) => t.is_end_stream(),
            ProxyBody::Own(f) => f.is_end_stream(),
        }
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ProxyBody::Upstream(t) => t.size_hint(),
            ProxyBody::Own(f) => f.size_hint(),
        }
    }
}

/// Per-upstream counters.
struct Stats {
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicUsize,
    /// Latency of answered requests, in µs.
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    drained: tokio::sync::Notify,
}

impl Stats {
    fn new() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            ),
            drained: tokio::sync::Notify::new(),
        }
    }
}

struct Upstream {
    name: String,
    addr: SocketAddr,
    stats: Stats,
}

/// The routing table: weights in percent, summing to 100 (or all zero).
#[derive(Debug, Clone)]
struct Table {
    weights: Vec<u32>,
    total: u32,
}

#[derive(Debug, Clone)]
enum Sticky {
    None,
    Header(String),
    Cookie(String),
}

struct Shared {
    upstreams: Vec<Upstream>,
    table: RwLock<Arc<Table>>,
    next: AtomicU64,
    sticky: Sticky,
    drain_timeout: Duration,
    addr: SocketAddr,
    state_file: Option<std::path::PathBuf>,
    /// Bumped at every weight change, with every upstream's (requests,
    /// errors) at that moment: monitors count from the last change.
    epoch: Mutex<(u64, Vec<(u64, u64)>)>,
}

/// Builds an [`HttpRouter`].
#[derive(Debug, Clone)]
pub struct HttpRouterBuilder {
    listen: String,
    upstreams: Vec<(String, String)>,
    sticky: Sticky,
    drain_timeout: Duration,
    state_file: Option<std::path::PathBuf>,
}

impl HttpRouterBuilder {
    /// An upstream (a slot or replica) named like its deploy target, at
    /// `host:port`. The first one gets all the traffic until told otherwise.
    pub fn upstream(mut self, name: impl Into<String>, addr: impl Into<String>) -> Self {
        self.upstreams.push((name.into(), addr.into()));
        self
    }

    /// Every target of a deployer, at its address (`Target::address`).
    pub fn upstreams_of(mut self, targets: &[Target]) -> Self {
        for t in targets {
            if let Some(a) = &t.address {
                self.upstreams.push((t.name.clone(), a.clone()));
            }
        }
        self
    }

    /// Requests with the same value of `header` go to the same upstream.
    pub fn sticky_header(mut self, header: impl Into<String>) -> Self {
        self.sticky = Sticky::Header(header.into().to_ascii_lowercase());
        self
    }

    /// Requests with the same value of cookie `name` go to the same
    /// upstream.
    pub fn sticky_cookie(mut self, name: impl Into<String>) -> Self {
        self.sticky = Sticky::Cookie(name.into());
        self
    }

    /// Keeps the weights in this JSON file (written at every change, read
    /// at start), so a router started again, by another deploy process
    /// too, routes as the last one did.
    pub fn state_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    /// How long a switch waits for requests in flight on the upstreams that
    /// lose their traffic (default 30 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Binds the listen address and starts serving.
    ///
    /// Errors: [`ErrorKind::Invalid`] for no upstream, a duplicate name or
    /// an address that does not parse; [`ErrorKind::Conflict`] when the
    /// listen address is taken.
    pub async fn start(self) -> Result<HttpRouter> {
        if self.upstreams.is_empty() {
            return Err(Error::invalid("an HTTP router needs at least one upstream"));
        }
        let mut upstreams = Vec::new();
        for (i, (name, addr)) in self.upstreams.iter().enumerate() {
            if self.upstreams[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(format!(
                    "router upstream `{name}` is named twice"
                )));
            }
            let addr: SocketAddr = addr.parse().map_err(|e| {
                Error::invalid(format!("router upstream `{name}`: address `{addr}`: {e}"))
                    .with("upstream", name)
            })?;
            upstreams.push(Upstream {
                name: name.clone(),
                addr,
                stats: Stats::new(),
            });
        }
        let mut weights = vec![0; upstreams.len()];
        weights[0] = 100;
        if let Some(saved) = self.state_file.as_deref().and_then(load_weights) {
            let restored: Vec<u32> = upstreams
                .iter()
                .map(|u| saved.get(&u.name).copied().unwrap_or(0))
                .collect();
            if restored.iter().sum::<u32>() == 100 {
                weights = restored;
            }
        }
        let listener = tokio::net::TcpListener::bind(&self.listen)
            .await
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::AddrInUse {
                    ErrorKind::Conflict
                } else {
                    ErrorKind::Invalid
                };
                Error::new(
                    kind,
                    format!("router cannot listen on {}: {e}", self.listen),
                )
                .with("address", &self.listen)
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::invalid(format!("router address: {e}")))?;
        let shared = Arc::new(Shared {
            upstreams,
            table: RwLock::new(Arc::new(Table {
                weights,
                total: 100,
            })),
            next: AtomicU64::new(0),
            sticky: self.sticky,
            drain_timeout: self.drain_timeout,
            addr,
            state_file: self.state_file,
            epoch: Mutex::new((0, Vec::new())),
        });
        let stop = CancellationToken::new();
        let s = shared.clone();
        let st = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(_) => continue,
                    },
                    _ = st.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    // Each client connection keeps its own upstream
                    // connections (as nginx's keepalive upstreams): no
                    // shared pool, no lock per request.
                    let conns: Conns =
                        Arc::new(Mutex::new((0..s.upstreams.len()).map(|_| None).collect()));
                    let peer_ip = hyper::header::HeaderValue::from_str(&peer.ip().to_string())
                        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("unknown"));
                    let service = hyper::service::service_fn(move |req| {
                        let (s, conns, peer_ip) = (s.clone(), conns.clone(), peer_ip.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                proxy(&s, &conns, req, peer, &peer_ip).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(HttpRouter {
            shared,
            _stop: Arc::new(stop.drop_guard()),
        })
    }
}

/// The embedded reverse proxy; see the [module docs](self). Cloning shares
/// it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct HttpRouter {
    shared: Arc<Shared>,
    _stop: Arc<tokio_util::sync::DropGuard>,
}

impl std::fmt::Debug for HttpRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRouter")
            .field("addr", &self.shared.addr)
            .field("weights", &self.weights())
            .finish()
    }
}

/// What [`HttpRouter::stats`] reports for one upstream since it started.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStats {
    /// The upstream.
    pub name: String,
    /// Its weight now, in percent.
    pub weight: u32,
    /// Requests sent to it.
    pub requests: u64,
    /// Of which failed: a 5xx answer, or no answer.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Median latency of answered requests, in ms.
    pub p50_ms: f64,
    /// 99th percentile latency, in ms.
    pub p99_ms: f64,
}

impl HttpRouter {
    /// A router that will listen on `listen` (`127.0.0.1:8080`, port 0 for
    /// any free port).
    pub fn builder(listen: impl Into<String>) -> HttpRouterBuilder {
        HttpRouterBuilder {
            listen: listen.into(),
            upstreams: Vec::new(),
            sticky: Sticky::None,
            drain_timeout: Duration::from_secs(30),
            state_file: None,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Each upstream with its weight in percent.
    pub fn weights(&self) -> Vec<(String, u32)> {
        let t = self.table();
        self.shared
            .upstreams
            .iter()
            .zip(&t.weights)
            .map(|(u, w)| (u.name.clone(), *w))
            .collect()
    }

    /// Counters of every upstream.
    pub fn stats(&self) -> Vec<UpstreamStats> {
        let t = self.table();
        self.shared
            .upstreams
            .iter()
            .zip(&t.weights)
            .map(|(u, w)| {
                let h = u.stats.latency.lock().unwrap_or_else(|p| p.into_inner());
                UpstreamStats {
                    name: u.name.clone(),
                    weight: *w,
                    requests: u.stats.requests.load(Ordering::Relaxed),
                    errors: u.stats.errors.load(Ordering::Relaxed),
                    in_flight: u.stats.in_flight.load(Ordering::Relaxed),
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                    p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                }
            })
            .collect()
    }

    fn table(&self) -> Arc<Table> {
        self.shared
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.shared
            .upstreams
            .iter()
            .position(|u| u.name == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the router has no upstream `{name}` (it has {})",
                    self.shared
                        .upstreams
                        .iter()
                        .map(|u| u.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .with("upstream", name)
            })
    }

    /// Sets the weights (percent, summing to 100; upstreams not named get
    /// 0) in one step: every request after it sees the new table.
    ///
    /// Errors: [`ErrorKind::Invalid`] for an unknown upstream or weights
    /// that do not sum to 100.
    pub fn set(&self, weights: &[(&str, u32)]) -> Result<()> {
        let mut table = vec![0u32; self.shared.upstreams.len()];
        for (name, w) in weights {
            table[self.index(name)?] = *w;
        }
        let total: u32 = table.iter().sum();
        if total != 100 {
            return Err(Error::invalid(format!(
                "router weights must sum to 100 percent, not {total}: {weights:?}"
            )));
        }
        {
            let mut epoch = self.shared.epoch.lock().unwrap_or_else(|p| p.into_inner());
            *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Table {
                weights: table,
                total,
            });
            epoch.0 += 1;
            epoch.1 = self
                .shared
                .upstreams
                .iter()
                .map(|u| {
                    (
                        u.stats.requests.load(Ordering::SeqCst),
                        u.stats.errors.load(Ordering::SeqCst),
                    )
                })
                .collect();
        }
        if let Some(path) = &self.shared.state_file {
            let map: HashMap<String, u32> = self.weights().into_iter().collect();
            save_weights(path, &map)?;
        }
        Ok(())
    }

    /// Shares the traffic evenly between `names` (integer percentages, the
    /// first ones get the remainder: 34/33/33); the others get none.
    ///
    /// Errors: as [`HttpRouter::set`]; [`ErrorKind::Invalid`] for no name.
    pub fn spread(&self, names: &[&str]) -> Result<()> {
        if names.is_empty() {
            return Err(Error::invalid("spread needs at least one upstream"));
        }
        let n = names.len() as u32;
        let w: Vec<(&str, u32)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, 100 / n + u32::from((i as u32) < 100 % n)))
            .collect();
        self.set(&w)
    }

    /// Waits until no request is in flight on the upstreams that have no
    /// weight, or the drain timeout passes; returns the requests still in
    /// flight then.
    pub async fn drain(&self) -> usize {
        let deadline = Instant::now() + self.shared.drain_timeout;
        loop {
            let t = self.table();
            let busy: usize = self
                .shared
                .upstreams
                .iter()
                .zip(&t.weights)
                .filter(|(_, w)| **w == 0)
                .map(|(u, _)| u.stats.in_flight.load(Ordering::SeqCst))
                .sum();
            if busy == 0 || Instant::now() >= deadline {
                return busy;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl cd_core::Router for HttpRouter {
    async fn active(&self) -> Result<Option<String>> {
        Ok(self
            .weights()
            .into_iter()
            .find(|(_, w)| *w == 100)
            .map(|(n, _)| n))
    }

    async fn switch(&self, slot: &str, cx: &DeployContext) -> Result<()> {
        self.set(&[(slot, 100)])?;
        let left = self.drain().await;
        cx.events.progress(
            Some(slot),
            "switch",
            "ok",
            None,
            Some(if left == 0 {
                format!("all traffic to {slot}; the others drained")
            } else {
                format!("all traffic to {slot}; {left} request(s) still in flight elsewhere after the drain timeout")
            }),
        );
        Ok(())
    }
}

#[async_trait]
impl WeightedRouter for HttpRouter {
    async fn set_weights(&self, weights: &[(String, u32)], cx: &DeployContext) -> Result<()> {
        let w: Vec<(&str, u32)> = weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        self.set(&w)?;
        let left = self.drain().await;
        cx.events.progress(
            None,
            "weights",
            "ok",
            None,
            Some(format!(
                "{}{}",
                weights
                    .iter()
                    .map(|(n, w)| format!("{n} {w}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if left > 0 {
                    format!("; {left} request(s) still in flight on drained upstreams")
                } else {
                    String::new()
                }
            )),
        );
        Ok(())
    }

    async fn weights(&self) -> Result<Vec<(String, u32)>> {
        Ok(HttpRouter::weights(self))
    }
}

fn load_weights(path: &std::path::Path) -> Option<HashMap<String, u32>> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes the weights atomically (a temporary file renamed over).
fn save_weights(path: &std::path::Path, weights: &HashMap<String, u32>) -> Result<()> {
    let io = |e: std::io::Error| {
        Error::new(
            ErrorKind::Failed,
            format!("router state file {}: {e}", path.display()),
        )
        .with("file", path.display())
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(weights).unwrap_or_default();
    std::fs::write(&tmp, json).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// FNV-1a, for sticky keys.
fn fnv(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn sticky_key(sticky: &Sticky, req: &Request<Incoming>) -> Option<u64> {
    match sticky {
        Sticky::None => None,
        Sticky::Header(h) => req.headers().get(h.as_str()).map(|v| fnv(v.as_bytes())),
        Sticky::Cookie(name) => req
            .headers()
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| fnv(v.as_bytes()))
            }),
    }
}

/// Picks an upstream by weight: a sticky key, or a counter spread by a
/// multiplicative hash (no lock, an even interleaving).
fn pick(table: &Table, key: u64, skip: &[usize]) -> Option<usize> {
    let mut total = table.total;
    for &s in skip {
        total -= table.weights[s];
    }
    if total == 0 {
        return None;
    }
    let mut x = (key % u64::from(total)) as u32;
    for (i, w) in table.weights.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        if x < *w {
            return Some(i);
        }
        x -= w;
    }
    None
}

/// Counts a request in flight on an upstream until dropped.
struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// A response body that keeps its upstream's request in flight until it is
/// sent (or dropped).
struct Tracked {
    inner: Incoming,
    shared: Arc<Shared>,
    upstream: usize,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = InFlight(&self.shared.upstreams[self.upstream].stats);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Own(Full::new(Bytes::from(msg))));
    *r.status_mut() = status;
    r
}

/// A client connection's upstream connections, by upstream index.
type Conns = Arc<Mutex<Vec<Option<hyper::client::conn::http1::SendRequest<Incoming>>>>>;

/// A ready connection to upstream `i`: the client connection's own if it is
/// still open, else a new one.
async fn connection(
    s: &Shared,
    conns: &Conns,
    i: usize,
) -> std::result::Result<hyper::client::conn::http1::SendRequest<Incoming>, String> {
    let kept = conns.lock().unwrap_or_else(|p| p.into_inner())[i].take();
    if let Some(mut sender) = kept {
        if sender.ready().await.is_ok() {
            return Ok(sender);
        }
    }
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(s.upstreams[i].addr),
    )
    .await
    .map_err(|_| "connect timed out after 2 s".to_string())?
    .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn proxy(
    s: &Arc<Shared>,
    conns: &Conns,
    req: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: &hyper::header::HeaderValue,
) -> Response<ProxyBody> {
    let table = s.table.read().unwrap_or_else(|p| p.into_inner()).clone();
    let key = sticky_key(&s.sticky, &req).unwrap_or_else(|| {
        s.next
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            >> 32
    });
    let (mut parts, body) = req.into_parts();
    // X-Forwarded-*.
    let host = parts.headers.get(hyper::header::HOST).cloned();
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()).parse().ok(),
        None => Some(peer_ip.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert(
        "x-forwarded-proto",
        hyper::header::HeaderValue::from_static("http"),
    );
    if let Some(h) = host {
        parts.headers.insert("x-forwarded-host", h);
    }
    // Upstreams get the origin form (`/path?query`).
    if parts.uri.scheme().is_some() {
        if let Some(pq) = parts.uri.path_and_query() {
            if let Ok(u) = pq.as_str().parse() {
                parts.uri = u;
            }
        }
    }
    // Find an upstream that takes a connection: one that refuses is skipped
    // (the request has not been sent yet, so any method may go elsewhere).
    let mut tried: Vec<usize> = Vec::new();
    let (i, mut sender) = loop {
        let Some(i) = pick(&table, key, &tried) else {
            return text(
                StatusCode::BAD_GATEWAY,
                if tried.is_empty() {
                    "no upstream has traffic\n".into()
                } else {
                    "no upstream answered\n".into()
                },
            );
        };
        match connection(s, conns, i).await {
            Ok(sender) => break (i, sender),
            Err(e) => {
                let up = &s.upstreams[i];
                up.stats.requests.fetch_add(1, Ordering::Relaxed);
                up.stats.errors.fetch_add(1, Ordering::Relaxed);
                tried.push(i);
                if tried.len() > 2 {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("upstream {} refused: {e}\n", up.name),
                    );
                }
            }
        }
    };
    let up = &s.upstreams[i];
    up.stats.requests.fetch_add(1, Ordering::Relaxed);
    up.stats.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(&up.stats);
    let started = Instant::now();
    let result = sender.send_request(Request::from_parts(parts, body)).await;
    match result {
        Ok(resp) => {
            // The connection goes back for this client's next request.
            conns.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(sender);
            let us = started.elapsed().as_micros().max(1) as u64;
            if let Ok(mut h) = up.stats.latency.lock() {
                let _ = h.record(us.min(60_000_000));
            }
            if resp.status().is_server_error() {
                up.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            // The body keeps the request in flight until it is sent.
            std::mem::forget(guard);
            let (p, inner) = resp.into_parts();
            let tracked = Tracked {
                inner,
                shared: s.clone(),
                upstream: i,
            };
            Response::from_parts(p, ProxyBody::Upstream(tracked))
        }
        Err(e) => {
            up.stats.errors.fetch_add(1, Ordering::Relaxed);
            drop(guard);
            text(
                StatusCode::BAD_GATEWAY,
                format!("upstream {} failed: {e}\n", up.name),
            )
        }
    }
}

/// An upstream's (epoch, requests, errors) when a monitor last looked.
type Seen = (u64, u64, u64);

/// Judges the upstreams under analysis on the traffic the router sent them
/// since the previous sample (or since the last weight change, if later): `Failing` when the error rate (5xx or no
/// answer, percent) exceeds its limit or the p99 latency exceeds its own,
/// `NoData` with fewer than `min_requests`.
///
/// The upstreams are the analysis's targets (a canary slot), or those named
/// with [`RouterMonitor::upstreams`].
#[derive(Clone)]
pub struct RouterMonitor {
    router: HttpRouter,
    names: Vec<String>,
    max_error_percent: f64,
    max_p99: Option<Duration>,
    min_requests: u64,
    /// Per upstream: the epoch, requests and errors at the last sample.
    last: Arc<Mutex<HashMap<String, Seen>>>,
}

impl std::fmt::Debug for RouterMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMonitor")
            .field("names", &self.names)
            .field("max_error_percent", &self.max_error_percent)
            .finish()
    }
}

impl RouterMonitor {
    /// Fails a sample above `max_error_percent` percent of errors; needs 10
    /// requests per sample.
    pub fn new(router: &HttpRouter, max_error_percent: f64) -> Self {
        RouterMonitor {
            router: router.clone(),
            names: Vec::new(),
            max_error_percent,
            max_p99: None,
            min_requests: 10,
            last: Arc::default(),
        }
    }

    /// Watches these upstreams instead of the analysis's targets.
    pub fn upstreams<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.names = names.into_iter().map(Into::into).collect();
        self
    }

    /// Also fails a sample whose p99 latency (since the router started)
    /// exceeds `limit`.
    pub fn max_p99(mut self, limit: Duration) -> Self {
        self.max_p99 = Some(limit);
        self
    }

    /// Requests needed per sample (default 10); fewer is no data.
    pub fn min_requests(mut self, n: u64) -> Self {
        self.min_requests = n;
        self
    }
}

#[async_trait]
impl Monitor for RouterMonitor {
    fn name(&self) -> String {
        format!("router {}", self.router.addr())
    }

    async fn sample(&self, cx: &MonitorContext) -> Result<Sample> {
        let names: Vec<String> = if self.names.is_empty() {
            cx.targets.iter().map(|t| t.name.clone()).collect()
        } else {
            self.names.clone()
        };
        let (epoch, at_change) = self
            .router
            .shared
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stats = self.router.stats();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (mut req, mut err, mut p99) = (0u64, 0u64, 0f64);
        for (i, s) in stats.iter().enumerate() {
            if !names.contains(&s.name) {
                continue;
            }
            // Counted from this monitor's previous sample, or from the last
            // weight change if that came after it: a step is judged on
            // the traffic it served.
            let (r0, e0) = match last.insert(s.name.clone(), (epoch, s.requests, s.errors)) {
                Some((e, r, x)) if e == epoch => (r, x),
                _ => at_change.get(i).copied().unwrap_or((0, 0)),
            };
            req += s.requests.saturating_sub(r0);
            err += s.errors.saturating_sub(e0);
            p99 = p99.max(s.p99_ms);
        }
        if req < self.min_requests {
            return Ok(Sample::no_data(format!(
                "{} request(s) to {} since the last sample (< {})",
                req,
                names.join(", "),
                self.min_requests
            )));
        }
        let rate = err as f64 * 100.0 / req as f64;
        let detail = format!(
            "{}: {err} error(s) in {req} request(s) = {rate:.1}% (limit {}%), p99 {p99:.1} ms",
            names.join(", "),
            self.max_error_percent
        );
        if rate > self.max_error_percent {
            return Ok(Sample::failing(Some(rate), detail));
        }
        if let Some(limit) = self.max_p99 {
            if p99 > limit.as_secs_f64() * 1000.0 {
                return Ok(Sample::failing(
                    Some(rate),
                    format!("{detail} over the p99 limit {} ms", limit.as_millis()),
                ));
            }
        }
        Ok(Sample::ok(Some(rate), detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cd_testkit::webhook::WebhookReceiver;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    async fn get(url: &str, header: Option<(&str, &str)>) -> u16 {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = Request::get(url);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let resp = client
            .request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    }

    fn addr(r: &WebhookReceiver) -> String {
        r.url("").trim_start_matches("http://").to_string()
    }

    #[tokio::test]
    async fn weights_split_traffic_and_headers_are_forwarded() {
        let (a, b) = (
            WebhookReceiver::start().await,
            WebhookReceiver::start().await,
        );
        let router = HttpRouter::builder("127.0.0.1:0")
            .upstream("a", addr(&a))
            .upstream("b", addr(&b))
            .start()
            .await
            .unwrap();
        router.set(&[("a", 90), ("b", 10)]).unwrap();
        for _ in 0..200 {
            assert_eq!(get(&format!("{}/x", router.url()), None).await, 202);
        }
        let s = router.stats();
        assert_eq!(s[0].requests + s[1].requests, 200);
        assert!((10..=30).contains(&s[1].requests), "{s:?}");
        let got = a.received();
        let h = |k: &str| {
            got[0]
                .headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
        assert!(h("x-forwarded-host").unwrap().starts_with("127.0.0.1:"));
        assert_eq!(got[0].path, "/x");

        let err = router.set(&[("a", 50)]).unwrap_err();
        assert!(err.to_string().contains("sum to 100"), "{err}");
        let err = router.set(&[("c", 100)]).unwrap_err();
        assert!(err.to_string().contains("no upstream `c`"), "{err}");
    }

    #[tokio::test]
    async fn sticky_sessions_stay_and_a_dead_upstream_is_retried_elsewhere() {
        let (a, b) = (
            WebhookReceiver::start().await,
            WebhookReceiver::start().await,
        );
        let router = HttpRouter::builder("127.0.0.1:0")
            .upstream("a", addr(&a))
            .upstream("b", addr(&b))
            .sticky_header("X-Session")
            .start()
            .await
            .unwrap();
        router.set(&[("a", 50), ("b", 50)]).unwrap();
        for _ in 0..20 {
            get(&router.url(), Some(("X-Session", "user-42"))).await;
        }
        let s = router.stats();
        assert!(s[0].requests == 20 || s[1].requests == 20, "{s:?}");

        // b goes away: GETs that pick it are retried on a.
        drop(b);
        let before = a.received().len();
        for i in 0..20 {
            let session = format!("user-{i}");
            assert_eq!(get(&router.url(), Some(("X-Session", &session))).await, 202);
        }
        assert_eq!(a.received().len() - before, 20);
        assert!(router.stats()[1].errors > 0, "some picked b first");
    }

    #[tokio::test]
    async fn the_weights_survive_a_restart_through_the_state_file() {
        let (a, b) = (
            WebhookReceiver::start().await,
            WebhookReceiver::start().await,
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.json");
        let build = || {
            HttpRouter::builder("127.0.0.1:0")
                .upstream("a", addr(&a))
                .upstream("b", addr(&b))
                .state_file(&file)
        };
        let r = build().start().await.unwrap();
        assert_eq!(r.weights()[0], ("a".to_string(), 100));
        r.set(&[("b", 100)]).unwrap();
        drop(r);
        let r = build().start().await.unwrap();
        assert_eq!(r.weights(), [("a".to_string(), 0), ("b".to_string(), 100)]);
    }
}

#[cfg(test)]
mod admin_tests {
    use super::*;
    use cd_core::Router as _;
    use cd_testkit::webhook::WebhookReceiver;

    #[tokio::test]
    async fn a_remote_router_drives_the_router_through_its_admin_api() {
        let (a, b) = (
            WebhookReceiver::start().await,
            WebhookReceiver::start().await,
        );
        let addr = |r: &WebhookReceiver| r.url("").trim_start_matches("http://").to_string();
        let router = HttpRouter::builder("127.0.0.1:0")
            .upstream("blue", addr(&a))
            .upstream("green", addr(&b))
            .start()
            .await
            .unwrap();
        let admin = router.serve_admin("127.0.0.1:0").await.unwrap();
        let remote = RemoteRouter::new(format!("http://{admin}")).unwrap();
        let cx = DeployContext::detached("test");
        assert_eq!(remote.active().await.unwrap().as_deref(), Some("blue"));
        remote
            .set_weights(&[("blue".into(), 90), ("green".into(), 10)], &cx)
            .await
            .unwrap();
        assert_eq!(
            router.weights(),
            [("blue".to_string(), 90), ("green".to_string(), 10)]
        );
        remote.switch("green", &cx).await.unwrap();
        assert_eq!(router.weights()[1], ("green".to_string(), 100));
        let err = remote
            .set_weights(&[("blue".into(), 50)], &cx)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.to_string().contains("sum to 100"), "{err}");
    }
}
