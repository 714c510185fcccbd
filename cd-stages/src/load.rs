//! `LoadTest`: a performance check with a built-in HTTP load generator on
//! hyper (HTTP/1.1 keep-alive, `http://` and `https://`), latencies in an
//! HdrHistogram.
//!
//! Two models, as the field names them:
//! - **closed** (like `wrk`): `concurrency` connections, each sending its
//!   next request when the last response is in;
//! - **open** (like `wrk2`, k6's constant-arrival-rate): requests are due at
//!   a constant rate whatever the responses do, and each latency is measured
//!   from the moment its request was *due*, not sent, which corrects
//!   coordinated omission: a server that stalls shows the stall in its
//!   percentiles instead of slowing the load down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{Capabilities, Error, Result, Stage, StageContext, StageOutput};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::http::{HttpError, Method, Request, Url};
use crate::source::UrlSource;
use crate::tls::TlsOptions;

/// How much load to generate, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Total requests (`None`: until `duration` ends).
    pub requests: Option<u64>,
    /// Connections (closed model: requests in flight at once; open model:
    /// the cap on requests in flight).
    pub concurrency: usize,
    /// Stop after this long, whatever the count.
    pub duration: Option<Duration>,
    /// Deadline per request; a request past it counts as a `timeout` error
    /// and its connection is replaced.
    pub timeout: Duration,
    /// Open model: requests are due at this rate (per second) and latency is
    /// measured from when each was due. `None`: closed model.
    pub rate: Option<f64>,
    /// Requests that complete (closed) or are due (open) within this long of
    /// the start are sent but not measured (default 0).
    pub warmup: Duration,
    /// OS threads the connections are spread over, each with its own
    /// single-threaded event loop, as wrk does (default 0: one per core).
    pub threads: usize,
    /// Closed model: connections start spread evenly over this long
    /// (default 0: all at once).
    pub ramp: Duration,
    /// TLS for `https://` targets.
    pub tls: TlsOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            requests: Some(200),
            concurrency: 8,
            duration: None,
            timeout: Duration::from_secs(5),
            rate: None,
            warmup: Duration::ZERO,
            threads: 0,
            ramp: Duration::ZERO,
            tls: TlsOptions::default(),
        }
    }
}

/// What a load run measured. Latencies are in milliseconds (three
/// significant digits, HdrHistogram), over every measured request that got
/// a response, whatever its status; `rps` counts measured requests per
/// second of the measured window (warm-up excluded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The URL loaded.
    pub url: String,
    /// `closed` or `open`.
    #[serde(default)]
    pub model: String,
    /// Measured requests (warm-up excluded).
    pub requests: u64,
    /// Responses with a 2xx or 3xx status.
    pub ok: u64,
    /// Responses with a 4xx or 5xx status.
    pub non_success: u64,
    /// Requests that got no response (connection failure, timeout, reset,
    /// malformed response).
    pub errors: u64,
    /// `(non_success + errors) / requests`, 0.0–1.0.
    pub error_rate: f64,
    /// Connections used.
    pub concurrency: usize,
    /// The measured window's wall time (warm-up excluded).
    pub duration_ms: f64,
    /// Measured requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile latency.
    #[serde(default)]
    pub p90_ms: f64,
    /// 95th percentile latency.
    pub p95_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// 99.9th percentile latency.
    #[serde(default)]
    pub p999_ms: f64,
    /// Slowest response.
    pub max_ms: f64,
    /// Mean latency.
    pub mean_ms: f64,
    /// Errors by kind: `connect`, `tls`, `timeout`, `reset` (the connection
    /// failed mid-request), `protocol`.
    #[serde(default)]
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Responses by status code.
    #[serde(default)]
    pub statuses: BTreeMap<u16, u64>,
    /// The latency distribution at fixed percentiles, `(percentile, ms)`
    /// for 50, 75, 90, 95, 99, 99.9, 99.99 and 100: what `cdctl` shows later.
    #[serde(default)]
    pub distribution: Vec<(f64, f64)>,
    /// The first error seen, for a person.
    pub first_error: Option<String>,
}

/// The `p`-th percentile (0–100) of sorted values, by nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies are recorded in microseconds, from 1 µs to one hour, to three
/// significant digits: about 200 KiB per worker whatever the run's length.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

struct WorkerStats {
    latency_us: Histogram<u64>,
    ok: u64,
    non_success: u64,
    errors: BTreeMap<&'static str, u64>,
    statuses: BTreeMap<u16, u64>,
    first_error: Option<String>,
}

impl WorkerStats {
    fn new() -> Self {
        WorkerStats {
            latency_us: new_histogram(),
            ok: 0,
            non_success: 0,
            errors: BTreeMap::new(),
            statuses: BTreeMap::new(),
            first_error: None,
        }
    }

    fn error(&mut self, kind: &'static str, text: String) {
        *self.errors.entry(kind).or_insert(0) += 1;
        if self.first_error.is_none() {
            self.first_error = Some(text);
        }
    }
}

/// Sends `req` with `opts` and measures it. The engine behind [`LoadTest`],
/// public for benchmarks and custom stages.
///
/// Errors: [`HttpError::Config`] when the TLS options cannot be used;
/// [`HttpError::InvalidHeader`] for a header that may not be sent. Failures
/// of requests are counted in the report, not returned.
pub async fn generate(
    req: Request,
    opts: LoadOptions,
) -> std::result::Result<LoadReport, HttpError> {
    let url = req.url.to_string();
    let target = Arc::new(Target::new(&req, &opts.tls)?);
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = opts
        .duration
        .map(|d| cd_core::clock::instant_add(started, d));
    let limit = opts
        .requests
        .unwrap_or(if deadline.is_some() { u64::MAX } else { 0 });
    let concurrency = opts.concurrency.max(1);
    let warm_until = cd_core::clock::instant_add(started, opts.warmup);
    let pace = opts
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| (started, cd_core::clock::secs_f64(1.0 / r)));
    // Like wrk: a few OS threads, each with its own single-threaded event
    // loop running its share of the connections (no work stealing, no
    // cross-thread wake-ups per request).
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(concurrency);
    // Dropping the run (a cancelled stage) stops every worker at once:
    // sleeps and requests in flight are abandoned, connections closed.
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let mut results = Vec::with_capacity(threads);
    for t in 0..threads {
        let (tx, rx) = tokio::sync::oneshot::channel::<Vec<WorkerStats>>();
        results.push(rx);
        let mine: Vec<usize> = (0..concurrency).filter(|n| n % threads == t).collect();
        let (target, issued, stop) = (target.clone(), issued.clone(), stop.clone());
        let (timeout, ramp) = (opts.timeout, opts.ramp);
        let spawned = std::thread::Builder::new()
            .name(format!("cd-load-{t}"))
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let stats = rt.block_on(async move {
                    let mut handles = Vec::with_capacity(mine.len());
                    for n in mine {
                        let (target, issued, stop) = (target.clone(), issued.clone(), stop.clone());
                        let start_at = (pace.is_none() && !ramp.is_zero())
                            .then(|| started + ramp.mul_f64(n as f64 / concurrency as f64));
                        handles.push(tokio::spawn(async move {
                            if let Some(at) = start_at {
                                tokio::time::sleep_until(at.into()).await;
                            }
                            let w = Worker {
                                issued: &issued,
                                stop: &stop,
                                limit,
                                deadline,
                                timeout,
                                pace,
                                warm_until,
                            };
                            w.run(&target).await
                        }));
                    }
                    let all = async {
                        let mut out = Vec::with_capacity(handles.len());
                        for h in handles {
                            if let Ok(s) = h.await {
                                out.push(s);
                            }
                        }
                        out
                    };
                    // Stopped: this loop ends, and dropping its runtime
                    // drops every worker (requests in flight, sleeps,
                    // connections) at once. One wait per thread, not one per
                    // request.
                    tokio::select! {
                        out = all => out,
                        _ = stop.cancelled() => Vec::new(),
                    }
                });
                let _ = tx.send(stats);
            });
        if spawned.is_err() {
            return Err(HttpError::Config {
                what: "load generator".into(),
                reason: "cannot start a worker thread".into(),
            });
        }
    }
    let mut all = WorkerStats::new();
    for rx in results {
        for s in rx.await.unwrap_or_default() {
            let _ = all.latency_us.add(&s.latency_us);
            all.ok += s.ok;
            all.non_success += s.non_success;
            for (k, n) in s.errors {
                *all.errors.entry(k).or_insert(0) += n;
            }
            for (k, n) in s.statuses {
                *all.statuses.entry(k).or_insert(0) += n;
            }
            if all.first_error.is_none() {
                all.first_error = s.first_error;
            }
        }
    }
    let ended = Instant::now();
    let window = ended.saturating_duration_since(warm_until.min(ended));
    let errors: u64 = all.errors.values().sum();
    let requests = all.ok + all.non_success + errors;
    let h = &all.latency_us;
    let ms = |us: u64| us as f64 / 1000.0;
    let at = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(q))
        }
    };
    Ok(LoadReport {
        url,
        model: if pace.is_some() { "open" } else { "closed" }.into(),
        requests,
        ok: all.ok,
        non_success: all.non_success,
        errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            (all.non_success + errors) as f64 / requests as f64
        },
        concurrency,
        duration_ms: (window.as_secs_f64() * 1e6).round() / 1000.0,
        rps: if window.is_zero() {
            0.0
        } else {
            (requests as f64 / window.as_secs_f64() * 10.0).round() / 10.0
        },
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: if h.is_empty() { 0.0 } else { ms(h.max()) },
        mean_ms: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        errors_by_kind: all
            .errors
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect(),
        statuses: all.statuses,
        distribution: [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0]
            .into_iter()
            .map(|p| (p, at(p / 100.0)))
            .collect(),
        first_error: all.first_error,
    })
}

/// What every worker sends: the connection target and the request, built
/// once.
struct Target {
    url: Url,
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    method: http::Method,
    /// Whether sending the request twice has the effect of sending it once.
    idempotent: bool,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Target {
    fn new(req: &Request, tls: &TlsOptions) -> std::result::Result<Target, HttpError> {
        let mut headers = req.header_map()?;
        let host = http::HeaderValue::from_str(&req.url.host_header()).map_err(|_| {
            HttpError::InvalidUrl {
                url: req.url.to_string(),
                reason: "the host is not a valid Host header".into(),
            }
        })?;
        headers.entry(http::header::HOST).or_insert(host);
        headers
            .entry(http::header::USER_AGENT)
            .or_insert(http::HeaderValue::from_static(concat!(
                "cd/",
                env!("CARGO_PKG_VERSION")
            )));
        let uri: http::Uri = req.url.path().parse().map_err(|_| HttpError::InvalidUrl {
            url: req.url.to_string(),
            reason: "the path is not a valid request target".into(),
        })?;
        let tls = if req.url.scheme() == "https" {
            let config = tls.client_config(false)?;
            let name = rustls_pki_types::ServerName::try_from(req.url.host().to_string()).map_err(
                |_| HttpError::InvalidUrl {
                    url: req.url.to_string(),
                    reason: "the host is not a valid TLS server name".into(),
                },
            )?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Target {
            url: req.url.clone(),
            authority: req.url.authority(),
            tls,
            method: req.method.to_http(),
            idempotent: req.method.is_idempotent(),
            uri,
            headers,
            body: Bytes::from(req.body.clone()),
        })
    }

    fn request(&self) -> http::Request<Full<Bytes>> {
        let mut r = http::Request::new(Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }

    /// A new keep-alive HTTP/1.1 connection (TLS for `https://`): the
    /// sender and the connection's driver, which the worker polls itself
    /// (no task hand-off per request).
    async fn connect(
        &self,
        deadline: tokio::time::Instant,
    ) -> std::result::Result<Conn, (&'static str, String)> {
        let fail = |kind: &'static str, why: String| (kind, why);
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(&self.authority)).await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(fail("connect", format!("cannot connect: {e}"))),
            Err(_) => return Err(fail("timeout", "no connection within the deadline".into())),
        };
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                match tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp)).await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        let why = crate::tls::tls_failure(&e).unwrap_or_else(|| e.to_string());
                        return Err(fail("tls", format!("TLS handshake failed: {why}")));
                    }
                    Err(_) => {
                        return Err(fail(
                            "timeout",
                            "no TLS handshake within the deadline".into(),
                        ))
                    }
                }
            }
        };
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| fail("protocol", e.to_string()))?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
        })
    }
}

/// The driver of one HTTP/1.1 connection.
type Driver = hyper::client::conn::http1::Connection<TokioIo<Box<dyn Io>>, Full<Bytes>>;

/// One keep-alive connection of a worker.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: std::pin::Pin<Box<Driver>>,
}

/// A connection's byte stream: TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The kind of a failed request, for [`LoadReport::errors_by_kind`]: a TLS
/// failure after the handshake (a TLS 1.3 server refusing the client
/// certificate) is `tls`.
fn failure_kind(e: &hyper::Error) -> &'static str {
    if crate::tls::tls_failure(e).is_some() {
        "tls"
    } else if e.is_parse() || e.is_parse_status() || e.is_user() {
        "protocol"
    } else {
        "reset"
    }
}

/// What one request came to.
enum Outcome {
    /// A whole response, with its status; `reusable` when the connection
    /// stays open.
    Done { status: u16, reusable: bool },
    /// A failure of this kind.
    Failed(&'static str, String),
}

/// One connection's loop and what it shares with the others.
struct Worker<'a> {
    issued: &'a AtomicU64,
    stop: &'a tokio_util::sync::CancellationToken,
    limit: u64,
    deadline: Option<Instant>,
    timeout: Duration,
    pace: Option<(Instant, Duration)>,
    warm_until: Instant,
}

impl Worker<'_> {
    async fn run(&self, target: &Target) -> WorkerStats {
        let Worker {
            issued,
            stop,
            limit,
            deadline,
            timeout,
            pace,
            warm_until,
        } = *self;
        let mut stats = WorkerStats::new();
        let mut conn: Option<Conn> = None;
        loop {
            // Closed model: stop at the deadline. Open model: send every
            // request due before it, however late.
            if stop.is_cancelled()
                || (pace.is_none() && deadline.is_some_and(|d| Instant::now() >= d))
            {
                break;
            }
            let i = issued.fetch_add(1, Ordering::Relaxed);
            if i >= limit {
                break;
            }
            // Open model: wait until this request is due, and time it from then.
            let due = pace.map(|(start, period)| start + period.mul_f64(i as f64));
            if let Some(due) = due {
                if deadline.is_some_and(|d| due >= d) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
            }
            let t0 = due.unwrap_or_else(Instant::now);
            // One deadline for the whole request: connect, TLS, exchange.
            let until = tokio::time::Instant::now() + timeout;
            let outcome = self.request(target, &mut conn, until).await;
            let done = Instant::now();
            // Warm-up: closed model by completion time, open model by due time.
            let measured = match due {
                Some(d) => d >= warm_until,
                None => done >= warm_until,
            };
            match outcome {
                Outcome::Done { status, .. } if measured => {
                    let us = done.saturating_duration_since(t0).as_micros() as u64;
                    let _ = stats.latency_us.record(us.max(1));
                    *stats.statuses.entry(status).or_insert(0) += 1;
                    if status < 400 {
                        stats.ok += 1;
                    } else {
                        stats.non_success += 1;
                        if stats.first_error.is_none() {
                            stats.first_error =
                                Some(format!("{} {}: status {status}", target.method, target.url));
                        }
                    }
                }
                Outcome::Done { .. } => {}
                Outcome::Failed(kind, text) => {
                    if measured {
                        stats.error(kind, format!("{} {}: {text}", target.method, target.url));
                    }
                    if kind == "connect" {
                        // Do not spin on a refused port.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        stats
    }

    /// Sends one request on the worker's connection (a new one when there
    /// is none, or when the idle one was closed by the server meanwhile)
    /// and reads the whole response, all before `until`.
    async fn request(
        &self,
        target: &Target,
        conn: &mut Option<Conn>,
        until: tokio::time::Instant,
    ) -> Outcome {
        let reused = conn.is_some();
        let outcome = self.attempt(target, conn, until).await;
        // A kept-alive connection the server closed just as it was reused
        // (its close not seen yet): the request never reached it. An
        // idempotent request is sent again on a new connection, as HTTP
        // clients do (RFC 9112 §9.3.1); it is not a failure of the server.
        match outcome {
            Outcome::Failed("stale", _) if reused && target.idempotent => {
                *conn = None;
                self.attempt(target, conn, until).await
            }
            Outcome::Failed("stale", text) => Outcome::Failed("reset", text),
            o => o,
        }
    }

    async fn attempt(
        &self,
        target: &Target,
        conn: &mut Option<Conn>,
        until: tokio::time::Instant,
    ) -> Outcome {
        let timed_out = || {
            Outcome::Failed(
                "timeout",
                format!("no response within {} ms", self.timeout.as_millis()),
            )
        };
        // An idle connection the server closed since the last response (its
        // keep-alive timeout) is not reused: its driver has finished. (A
        // request that cannot be sent twice is checked first; an idempotent
        // one is sent again if it meets a closed connection, see `request`,
        // which spares the check on the fast path.)
        if let Some(c) = conn.as_mut() {
            let check = !target.idempotent || self.pace.is_some();
            if c.sender.is_closed()
                || (check && futures::FutureExt::now_or_never(c.driver.as_mut()).is_some())
            {
                *conn = None;
            }
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match target.connect(until).await {
                Ok(c) => c,
                Err(("timeout", _)) => return timed_out(),
                Err((kind, text)) => return Outcome::Failed(kind, text),
            },
        };
        // The exchange borrows the connection only in here.
        let outcome = {
            let Conn { sender, driver } = &mut c;
            let exchange = async {
                sender.ready().await?;
                let resp = sender.send_request(target.request()).await?;
                let status = resp.status().as_u16();
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    frame?;
                }
                Ok::<u16, hyper::Error>(status)
            };
            tokio::pin!(exchange);
            // Nothing of the response arrived and the connection was closed
            // under the request: "stale" (see `request`).
            let failed = |e: hyper::Error| {
                let kind = if e.is_incomplete_message() || e.is_canceled() {
                    "stale"
                } else {
                    failure_kind(&e)
                };
                Outcome::Failed(kind, e.to_string())
            };
            // The exchange and the connection's driver, polled together here.
            let driven = async {
                tokio::select! {
                    biased;
                    r = &mut exchange => match r {
                        Ok(status) => Outcome::Done { status, reusable: true },
                        Err(e) => failed(e),
                    },
                    closed = driver.as_mut() => match closed {
                        Err(e) => failed(e),
                        // The driver finished: the server closed the connection
                        // after (or while) sending the response. What it sent is
                        // buffered: finish reading it, then drop the connection.
                        Ok(()) => match exchange.await {
                            Ok(status) => Outcome::Done { status, reusable: false },
                            Err(e) => failed(e),
                        },
                    },
                }
            };
            match tokio::time::timeout_at(until, driven).await {
                Ok(o) => o,
                Err(_) => timed_out(),
            }
        };
        if let Outcome::Done { reusable: true, .. } = outcome {
            if !c.sender.is_closed() {
                *conn = Some(c);
            }
        }
        outcome
    }
}

/// A performance check: requests against a URL, latency percentiles,
/// errors and throughput, with thresholds and a comparison with the
/// previous release.
///
/// By default each of the `C` connections sends requests back to back
/// (closed model, like `wrk`); [`LoadTest::rate`] switches to the open model
/// (requests due at a constant rate, latency from when each was due). The
/// stage fails when p95 or p99 is at or over its threshold, when the error
/// rate (4xx/5xx and failed requests) is over [`LoadTest::max_error_rate`]
/// (0 by default), when throughput is under [`LoadTest::min_rps`], or on a
/// regression against the previous release
/// ([`LoadTest::compare_with_previous`]); its output carries the figures
/// ([`LoadReport`]) and a table.
///
/// ```
/// use cd_stages::LoadTest;
/// let perf = LoadTest::get_from("staging", "url")
///     .path("/")
///     .requests(500)
///     .concurrency(16)
///     .p95_below_ms(50)
///     .p99_below_ms(200);
/// # let _ = perf;
/// ```
#[derive(Debug, Clone)]
pub struct LoadTest {
    url: UrlSource,
    path: Option<String>,
    method: Method,
    opts: LoadOptions,
    p95_below: Option<Duration>,
    p99_below: Option<Duration>,
    max_error_rate: f64,
    min_rps: Option<f64>,
    /// Tolerated regression vs the previous release, percent.
    regression_tolerance: Option<f64>,
}

/// The event a `LoadTest` emits with its report, so the next release can
/// compare with it ([`LoadTest::compare_with_previous`]).
pub const LOAD_EVENT: &str = "load_report";

impl LoadTest {
    /// Loads `GET url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::with_source(UrlSource::Fixed(url.into()))
    }

    /// Loads `GET` on the URL in field `field` of node `node`'s output (see
    /// [`UrlSource::FromOutput`]); add a path with [`LoadTest::path`].
    pub fn get_from(node: impl Into<String>, field: impl Into<String>) -> Self {
        Self::with_source(UrlSource::FromOutput {
            node: node.into(),
            field: field.into(),
        })
    }

    fn with_source(url: UrlSource) -> Self {
        LoadTest {
            url,
            path: None,
            method: Method::Get,
            opts: LoadOptions {
                requests: None,
                ..LoadOptions::default()
            },
            p95_below: None,
            p99_below: None,
            max_error_rate: 0.0,
            min_rps: None,
            regression_tolerance: None,
        }
    }

    /// Fails when fewer than `rps` measured requests per second were served.
    pub fn min_rps(mut self, rps: f64) -> Self {
        self.min_rps = Some(rps);
        self
    }

    /// Compares with the previous release's result of this node in this
    /// environment ([`crate::previous`]) and fails on a regression beyond
    /// `tolerance_percent`: p50 or p99 latency more than that much higher,
    /// or throughput more than that much lower, naming the metric and both
    /// values. Without an earlier result, nothing is compared.
    pub fn compare_with_previous(mut self, tolerance_percent: f64) -> Self {
        self.regression_tolerance = Some(tolerance_percent.max(0.0));
        self
    }

    /// Starts the connections spread evenly over `d` instead of all at
    /// once (closed model).
    pub fn ramp(mut self, d: Duration) -> Self {
        self.opts.ramp = d;
        self
    }

    /// A path joined to the URL.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Total requests (default 200 when no duration is set).
    pub fn requests(mut self, n: u64) -> Self {
        self.opts.requests = Some(n);
        self
    }

    /// Requests in flight at once (default 8).
    pub fn concurrency(mut self, c: usize) -> Self {
        self.opts.concurrency = c.max(1);
        self
    }

    /// Runs for this long instead of a fixed count (with
    /// [`LoadTest::requests`] too, whichever ends first).
    pub fn duration(mut self, d: Duration) -> Self {
        self.opts.duration = Some(d);
        self
    }

    /// Open loop at `rps` requests per second (see [`LoadOptions::rate`]);
    /// the concurrency caps the requests in flight.
    pub fn rate(mut self, rps: u32) -> Self {
        self.opts.rate = Some(f64::from(rps.max(1)));
        self
    }

    /// Shorthand for [`LoadTest::duration`] in seconds.
    pub fn secs(self, s: u64) -> Self {
        self.duration(Duration::from_secs(s))
    }

    /// Deadline per request (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.opts.timeout = d;
        self
    }

    /// TLS trust and client certificate for `https://` (default: the
    /// system's roots).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.opts.tls = tls;
        self
    }

    /// Requests within this long of the start are sent but not measured
    /// (connection set-up, caches warming).
    pub fn warmup(mut self, d: Duration) -> Self {
        self.opts.warmup = d;
        self
    }

    /// Fails when p95 latency is at or over `ms` milliseconds.
    pub fn p95_below_ms(mut self, ms: u64) -> Self {
        self.p95_below = Some(Duration::from_millis(ms));
        self
    }

    /// Fails when p99 latency is at or over `ms` milliseconds.
    pub fn p99_below_ms(mut self, ms: u64) -> Self {
        self.p99_below = Some(Duration::from_millis(ms));
        self
    }

    /// The share of failed requests tolerated, 0.0–1.0 (default 0).
    pub fn max_error_rate(mut self, rate: f64) -> Self {
        self.max_error_rate = rate.clamp(0.0, 1.0);
        self
    }

    fn target(&self, cx: &StageContext) -> Result<Url> {
        let base = self.url.resolve(cx)?;
        match &self.path {
            Some(p) => base
                .join(p)
                .map_err(|e| Error::from(e).with("node", cx.node())),
            None => Ok(base),
        }
    }
}

#[async_trait]
impl Stage for LoadTest {
    fn kind(&self) -> String {
        "load-test".into()
    }

    fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let url = self.target(cx)?;
        let mut opts = self.opts.clone();
        if opts.requests.is_none() && opts.duration.is_none() {
            opts.requests = LoadOptions::default().requests;
        }
        cx.log(format!(
            "load: {} {url}, {} at concurrency {}",
            self.method,
            match (opts.requests, opts.duration) {
                (Some(n), None) => format!("{n} requests"),
                (None, Some(d)) => format!("for {} ms", d.as_millis()),
                (Some(n), Some(d)) => format!("{n} requests or {} ms", d.as_millis()),
                (None, None) => "0 requests".into(),
            },
            opts.concurrency
        ));
        let report = tokio::select! {
            r = generate(Request::new(self.method, url.clone()), opts) => {
                r.map_err(|e| Error::from(e).with("node", cx.node()))?
            }
            _ = cx.cancel_token().cancelled() => return Err(Error::cancelled().with("node", cx.node())),
        };
        cx.log(format!(
            "load: {} requests in {:.0} ms ({} rps): p50 {} ms, p95 {} ms, p99 {} ms, max {} ms; {} errors, {} non-2xx",
            report.requests,
            report.duration_ms,
            report.rps,
            report.p50_ms,
            report.p95_ms,
            report.p99_ms,
            report.max_ms,
            report.errors,
            report.non_success
        ));
        let mut problems = Vec::new();
        if report.requests == 0 {
            problems.push("no request was sent".to_string());
        } else if report.ok + report.non_success == 0 {
            problems.push(format!(
                "no request got a response: {}",
                report.first_error.as_deref().unwrap_or("unknown error")
            ));
        }
        if report.error_rate > self.max_error_rate {
            problems.push(format!(
                "error rate {:.2}% is over the {:.2}% allowed ({} errors, {} non-2xx; first: {})",
                report.error_rate * 100.0,
                self.max_error_rate * 100.0,
                report.errors,
                report.non_success,
                report.first_error.as_deref().unwrap_or("-")
            ));
        }
        let over = |name: &str, value: f64, limit: Option<Duration>| {
            limit.and_then(|l| {
                let limit_ms = l.as_secs_f64() * 1000.0;
                (value >= limit_ms).then(|| {
                    format!("{name} latency {value} ms is over the {limit_ms} ms threshold")
                })
            })
        };
        problems.extend(over("p95", report.p95_ms, self.p95_below));
        problems.extend(over("p99", report.p99_ms, self.p99_below));
        if let Some(min) = self.min_rps {
            if report.rps < min {
                problems.push(format!(
                    "throughput {} rps is under the {min} rps required",
                    report.rps
                ));
            }
        }
        let previous = match self.regression_tolerance {
            Some(_) => crate::previous::previous_result(cx, LOAD_EVENT).await?,
            None => None,
        };
        if let (Some(tol), Some(prev)) = (self.regression_tolerance, &previous) {
            match serde_json::from_value::<LoadReport>(prev.data.clone()) {
                Ok(before) => problems.extend(regressions(&before, &report, tol, &prev.version)),
                Err(e) => cx.events().warn(format!(
                    "the load report of {} cannot be read ({e}); not compared",
                    prev.version
                )),
            }
        }
        let table = table(&report, previous.as_ref());
        for line in table.lines() {
            cx.log(line.to_string());
        }
        cx.events().emit(cd_core::EventKind::Custom {
            name: LOAD_EVENT.into(),
            data: serde_json::to_value(&report)?,
        });
        if problems.is_empty() {
            let mut out = serde_json::to_value(&report)?;
            out["thresholds"] = serde_json::json!({
                "p95_below_ms": self.p95_below.map(|d| d.as_millis() as u64),
                "p99_below_ms": self.p99_below.map(|d| d.as_millis() as u64),
                "max_error_rate": self.max_error_rate,
                "min_rps": self.min_rps,
                "regression_tolerance_percent": self.regression_tolerance,
            });
            out["previous_version"] = serde_json::json!(previous.map(|p| p.version));
            out["table"] = serde_json::json!(table);
            return Ok(StageOutput::json(out));
        }
        Err(Error::failed(format!(
            "load test of {url} failed: {} ({} requests at concurrency {}: p50 {} ms, p95 {} ms, p99 {} ms)",
            problems.join("; "),
            report.requests,
            report.concurrency,
            report.p50_ms,
            report.p95_ms,
            report.p99_ms
        ))
        .with("node", cx.node())
        .with("url", url))
    }
}

/// The regressions of `now` against `before` beyond `tol` percent: p50 and
/// p99 latency up, throughput down.
fn regressions(before: &LoadReport, now: &LoadReport, tol: f64, version: &str) -> Vec<String> {
    let mut out = Vec::new();
    let grow = 1.0 + tol / 100.0;
    for (name, b, n) in [
        ("p50", before.p50_ms, now.p50_ms),
        ("p99", before.p99_ms, now.p99_ms),
    ] {
        if b > 0.0 && n > b * grow {
            out.push(format!(
                "{name} latency regressed: {n} ms vs {b} ms in {version} (+{:.1}%, {tol}% tolerated)",
                (n / b - 1.0) * 100.0
            ));
        }
    }
    if before.rps > 0.0 && now.rps < before.rps / grow {
        out.push(format!(
            "throughput regressed: {} rps vs {} rps in {version} ({:.1}%, {tol}% tolerated)",
            now.rps,
            before.rps,
            (now.rps / before.rps - 1.0) * 100.0
        ));
    }
    out
}

/// The load report as a text table, with the previous release's figures
/// when there are some.
fn table(report: &LoadReport, previous: Option<&crate::previous::Previous>) -> String {
    let before = previous.and_then(|p| {
        serde_json::from_value::<LoadReport>(p.data.clone())
            .ok()
            .map(|r| (p.version.clone(), r))
    });
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    let mut header = vec!["METRIC".to_string(), "THIS RELEASE".to_string()];
    if let Some((v, _)) = &before {
        header.push(v.clone());
    }
    t.set_header(header);
    type Row = (&'static str, fn(&LoadReport) -> String);
    let rows: [Row; 10] = [
        ("requests", |r| r.requests.to_string()),
        ("throughput", |r| format!("{} rps", r.rps)),
        ("p50", |r| format!("{} ms", r.p50_ms)),
        ("p90", |r| format!("{} ms", r.p90_ms)),
        ("p95", |r| format!("{} ms", r.p95_ms)),
        ("p99", |r| format!("{} ms", r.p99_ms)),
        ("p99.9", |r| format!("{} ms", r.p999_ms)),
        ("max", |r| format!("{} ms", r.max_ms)),
        ("errors", |r| {
            let kinds: Vec<String> = r
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if kinds.is_empty() {
                "0".into()
            } else {
                format!("{} ({})", r.errors, kinds.join(", "))
            }
        }),
        ("non-2xx/3xx", |r| r.non_success.to_string()),
    ];
    for (name, f) in rows {
        let mut row = vec![name.to_string(), f(report)];
        if let Some((_, b)) = &before {
            row.push(f(b));
        }
        t.add_row(row);
    }
    format!(
        "load: {} model, {} connections, {}\n{t}",
        report.model, report.concurrency, report.url
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use cd_core::{ErrorKind, MemoryStore, Release};

    use super::*;
    use crate::test_server::{TestResponse, TestServer};

    fn cx() -> StageContext {
        StageContext::detached("load", Release::new("v1"), Arc::new(MemoryStore::new()))
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 95.0), 95);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        let v = [10, 20, 30, 40];
        assert_eq!(percentile(&v, 50.0), 20);
        assert_eq!(percentile(&v, 75.0), 30);
        assert_eq!(percentile(&v, 76.0), 40);
    }

    #[tokio::test]
    async fn measures_and_passes_under_threshold() {
        let server = TestServer::start(|_| TestResponse::ok("fast")).await;
        let stage = LoadTest::get(server.url("/"))
            .requests(300)
            .concurrency(4)
            .p95_below_ms(1000)
            .p99_below_ms(2000);
        let out = stage.run(&cx()).await.unwrap();
        let report: LoadReport = out.parse().unwrap();
        assert_eq!(report.requests, 300);
        assert_eq!((report.ok, report.errors, report.non_success), (300, 0, 0));
        assert!(
            report.p50_ms <= report.p95_ms
                && report.p95_ms <= report.p99_ms
                && report.p99_ms <= report.max_ms
        );
        assert!(report.rps > 0.0);
        assert_eq!(out.get("thresholds").unwrap()["p95_below_ms"], 1000);
        assert_eq!(
            server.connections(),
            4,
            "one keep-alive connection per worker"
        );
    }

    #[tokio::test]
    async fn slow_service_fails_the_p95_threshold() {
        // Every 10th request (and so p95) is slow.
        let n = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start(move |_| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            let r = TestResponse::ok("x");
            if i.is_multiple_of(10) {
                r.delay(Duration::from_millis(60))
            } else {
                r
            }
        })
        .await;
        let err = LoadTest::get(server.url("/"))
            .requests(40)
            .concurrency(2)
            .p95_below_ms(30)
            .run(&cx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Failed);
        let msg = err.to_string();
        assert!(msg.contains("p95 latency"), "{msg}");
        assert!(msg.contains("over the 30 ms threshold"), "{msg}");
        assert!(msg.contains(&server.url("/")), "{msg}");
    }

    #[tokio::test]
    async fn errors_count_against_the_error_rate() {
        let n = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start(move |_| {
            if n.fetch_add(1, Ordering::SeqCst).is_multiple_of(4) {
                TestResponse::new(503, "busy")
            } else {
                TestResponse::ok("ok")
            }
        })
        .await;
        let err = LoadTest::get(server.url("/"))
            .requests(40)
            .concurrency(1)
            .run(&cx())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("error rate 25.00% is over the 0.00% allowed"),
            "{err}"
        );
        // Tolerated with a higher limit.
        let out = LoadTest::get(server.url("/"))
            .requests(40)
            .concurrency(1)
            .max_error_rate(0.3)
            .run(&cx())
            .await
            .unwrap();
        assert_eq!(out.get("non_success"), Some(&serde_json::json!(10)));
    }

    #[tokio::test]
    async fn unreachable_service_fails_clearly() {
        let (_held, port) = crate::test_server::refused_port();
        let err = LoadTest::get(format!("http://127.0.0.1:{port}/"))
            .requests(5)
            .concurrency(1)
            .run(&cx())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("no request got a response: GET http://127.0.0.1"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("cannot connect: Connection refused"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn duration_mode_stops_in_time() {
        let server = TestServer::start(|_| TestResponse::ok("x")).await;
        let started = Instant::now();
        let report = generate(
            Request::get(Url::parse(&server.url("/")).unwrap()),
            LoadOptions {
                requests: None,
                concurrency: 2,
                duration: Some(Duration::from_millis(200)),
                timeout: Duration::from_secs(1),
                rate: None,
                ..LoadOptions::default()
            },
        )
        .await
        .unwrap();
        // It returned: the duration, not a count, ended it.
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(report.requests > 0);
        assert_eq!(report.errors, 0);
    }

    #[tokio::test]
    async fn loads_an_https_service() {
        let pki = crate::test_server::TestPki::new();
        let server = TestServer::start_tls(|_| TestResponse::ok("x"), pki.server.clone()).await;
        let out = LoadTest::get(server.url("/"))
            .tls(TlsOptions::new().ca_pem(pki.ca_pem.clone()))
            .requests(50)
            .concurrency(2)
            .run(&cx())
            .await
            .unwrap();
        let report: LoadReport = out.parse().unwrap();
        assert_eq!((report.requests, report.ok), (50, 50), "{report:?}");
        assert_eq!(
            server.connections(),
            2,
            "one keep-alive connection per worker"
        );
        // Without the CA every request is a TLS error, counted by kind.
        let err = LoadTest::get(server.url("/"))
            .requests(3)
            .concurrency(1)
            .run(&cx())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
    }

    #[tokio::test]
    async fn responses_on_closing_connections_are_not_errors() {
        for server in [
            TestServer::start(|_| TestResponse::ok("bye").close_delimited()).await,
            TestServer::start(|_| TestResponse::ok("bye").silently_close()).await,
        ] {
            let report = generate(
                Request::get(Url::parse(&server.url("/")).unwrap()),
                LoadOptions {
                    requests: Some(40),
                    concurrency: 2,
                    ..LoadOptions::default()
                },
            )
            .await
            .unwrap();
            assert_eq!((report.ok, report.errors), (40, 0), "{report:?}");
        }
    }

    /// Worker threads of this process that are still alive.
    fn load_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .map(|c| c.starts_with("cd-load-"))
                    .unwrap_or(false)
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_run_stops_its_threads() {
        let server = TestServer::start(|_| TestResponse::ok("x")).await;
        let mut run = Box::pin(generate(
            Request::get(Url::parse(&server.url("/")).unwrap()),
            LoadOptions {
                requests: None,
                duration: Some(Duration::from_secs(600)),
                concurrency: 4,
                threads: 2,
                ..LoadOptions::default()
            },
        ));
        // Let it start (a condition: the server saw its connections).
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.connections() < 4 {
            tokio::select! {
                _ = run.as_mut() => panic!("a 600 s run ended"),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            assert!(Instant::now() < deadline, "the run never connected");
        }
        assert!(load_threads() >= 2);
        drop(run);
        let deadline = Instant::now() + Duration::from_secs(10);
        while load_threads() > 0 {
            assert!(
                Instant::now() < deadline,
                "load threads outlived the dropped run"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use crate::test_server::{TestResponse, TestServer};

    #[tokio::test]
    async fn open_loop_keeps_the_rate() {
        let server = TestServer::start(|_| TestResponse::ok("x")).await;
        let started = Instant::now();
        let report = generate(
            Request::get(Url::parse(&server.url("/")).unwrap()),
            LoadOptions {
                requests: None,
                concurrency: 4,
                duration: Some(Duration::from_millis(500)),
                timeout: Duration::from_secs(1),
                rate: Some(100.0),
                ..LoadOptions::default()
            },
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        // 100/s for 0.5 s: 50 requests, due at 0, 10, ..., 490 ms.
        assert_eq!(report.requests, 50, "{report:?}");
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
        assert_eq!(report.errors, 0);
    }
}
