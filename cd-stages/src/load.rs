//! `LoadTest`: a short performance check with a built-in HTTP load generator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{Capabilities, Error, Result, Stage, StageContext, StageOutput};
use serde::{Deserialize, Serialize};

use crate::http::{HttpConnection, Method, Request, Url};
use crate::source::UrlSource;

/// How much load to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Total requests (`None`: until `duration` ends).
    pub requests: Option<u64>,
    /// Requests in flight at once (one keep-alive connection each).
    pub concurrency: usize,
    /// Stop after this long, whatever the count.
    pub duration: Option<Duration>,
    /// Deadline per request.
    pub timeout: Duration,
    /// Open loop: start requests at this rate (per second) whatever the
    /// responses do, and measure each latency from the moment its request
    /// was due (so a stalled server shows in the percentiles instead of
    /// slowing the load down). `None`: closed loop, back to back.
    pub rate: Option<f64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            requests: Some(200),
            concurrency: 8,
            duration: None,
            timeout: Duration::from_secs(5),
            rate: None,
        }
    }
}

/// What a load run measured. Latencies are in milliseconds, over every
/// request that got a response (whatever its status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The URL loaded.
    pub url: String,
    /// Requests attempted.
    pub requests: u64,
    /// Responses with a 2xx or 3xx status.
    pub ok: u64,
    /// Responses with a 4xx or 5xx status.
    pub non_success: u64,
    /// Requests that got no response (connection failure, timeout, malformed).
    pub errors: u64,
    /// `(non_success + errors) / requests`.
    pub error_rate: f64,
    /// Concurrency used.
    pub concurrency: usize,
    /// Wall time of the run.
    pub duration_ms: f64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 95th percentile latency.
    pub p95_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Slowest response.
    pub max_ms: f64,
    /// Mean latency.
    pub mean_ms: f64,
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

#[derive(Default)]
struct WorkerStats {
    latencies_ns: Vec<u64>,
    ok: u64,
    non_success: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Sends `GET url` (or `req`) as fast as `concurrency` keep-alive
/// connections allow and measures the latencies. The engine behind
/// [`LoadTest`], public for benchmarks and custom stages.
pub async fn generate(req: Request, opts: LoadOptions) -> LoadReport {
    let url = req.url.to_string();
    let req = Arc::new(req);
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = opts
        .duration
        .map(|d| cd_core::clock::instant_add(started, d));
    let limit = opts
        .requests
        .unwrap_or(if deadline.is_some() { u64::MAX } else { 0 });
    let concurrency = opts.concurrency.max(1);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (req, issued) = (req.clone(), issued.clone());
        let pace = opts
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| (started, cd_core::clock::secs_f64(1.0 / r)));
        tasks.push(tokio::spawn(async move {
            worker(&req, &issued, limit, deadline, opts.timeout, pace).await
        }));
    }
    let mut all = WorkerStats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            all.latencies_ns.extend(s.latencies_ns);
            all.ok += s.ok;
            all.non_success += s.non_success;
            all.errors += s.errors;
            if all.first_error.is_none() {
                all.first_error = s.first_error;
            }
        }
    }
    let elapsed = started.elapsed();
    let mut lat = all.latencies_ns;
    lat.sort_unstable();
    let requests = all.ok + all.non_success + all.errors;
    let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
    let mean = if lat.is_empty() {
        0
    } else {
        (lat.iter().map(|&x| x as u128).sum::<u128>() / lat.len() as u128) as u64
    };
    LoadReport {
        url,
        requests,
        ok: all.ok,
        non_success: all.non_success,
        errors: all.errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            (all.non_success + all.errors) as f64 / requests as f64
        },
        concurrency,
        duration_ms: ms(elapsed.as_nanos() as u64),
        rps: if elapsed.is_zero() {
            0.0
        } else {
            (requests as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0
        },
        p50_ms: ms(percentile(&lat, 50.0)),
        p95_ms: ms(percentile(&lat, 95.0)),
        p99_ms: ms(percentile(&lat, 99.0)),
        max_ms: ms(lat.last().copied().unwrap_or(0)),
        mean_ms: ms(mean),
        first_error: all.first_error,
    }
}

async fn worker(
    req: &Request,
    issued: &AtomicU64,
    limit: u64,
    deadline: Option<Instant>,
    timeout: Duration,
    pace: Option<(Instant, Duration)>,
) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<HttpConnection> = None;
    fn error(stats: &mut WorkerStats, e: String) {
        stats.errors += 1;
        if stats.first_error.is_none() {
            stats.first_error = Some(e);
        }
    }
    loop {
        // Closed loop: stop at the deadline. Open loop: send every request
        // due before it, however late.
        if pace.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let i = issued.fetch_add(1, Ordering::Relaxed);
        if i >= limit {
            break;
        }
        // Open loop: wait until this request is due, and time it from then.
        let due = pace.map(|(start, period)| start + period.mul_f64(i as f64));
        if let Some(due) = due {
            if deadline.is_some_and(|d| due >= d) {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match HttpConnection::connect(&req.url, timeout).await {
                Ok(c) => c,
                Err(e) => {
                    error(&mut stats, e.to_string());
                    // Do not spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t0 = due.unwrap_or_else(Instant::now);
        match tokio::time::timeout(timeout, c.send(req)).await {
            Ok(Ok(resp)) => {
                stats.latencies_ns.push(t0.elapsed().as_nanos() as u64);
                if resp.status < 400 {
                    stats.ok += 1;
                } else {
                    stats.non_success += 1;
                    if stats.first_error.is_none() {
                        stats.first_error = Some(format!(
                            "{} {}: status {}",
                            req.method, req.url, resp.status
                        ));
                    }
                }
                if c.is_reusable() {
                    conn = Some(c);
                }
            }
            Ok(Err(e)) => error(&mut stats, e.to_string()),
            Err(_) => error(
                &mut stats,
                format!(
                    "{} {}: no response within {} ms",
                    req.method,
                    req.url,
                    timeout.as_millis()
                ),
            ),
        }
    }
    stats
}

/// A short performance check: `N` requests at concurrency `C` against a URL,
/// latency percentiles and errors, with thresholds.
///
/// Each of the `C` workers keeps one HTTP/1.1 connection alive and sends
/// requests back to back (closed loop, like `wrk`). The stage fails when
/// p95 or p99 is over its threshold or when the error rate (4xx/5xx and
/// failed requests) is over [`LoadTest::max_error_rate`] (0 by default),
/// and its output carries the figures ([`LoadReport`]).
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
}

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
        }
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
        Capabilities {
            rollback: false,
            idempotent: true,
        }
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let url = self.target(cx)?;
        let mut opts = self.opts;
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
            r = generate(Request::new(self.method, url.clone()), opts) => r,
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
        if problems.is_empty() {
            let mut out = serde_json::to_value(&report)?;
            out["thresholds"] = serde_json::json!({
                "p95_below_ms": self.p95_below.map(|d| d.as_millis() as u64),
                "p99_below_ms": self.p99_below.map(|d| d.as_millis() as u64),
                "max_error_rate": self.max_error_rate,
            });
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
        let port = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let err = LoadTest::get(format!("http://127.0.0.1:{port}/"))
            .requests(5)
            .concurrency(1)
            .run(&cx())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("no request got a response: cannot connect"),
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
            },
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(report.requests > 0);
        assert_eq!(report.errors, 0);
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
            },
        )
        .await;
        let elapsed = started.elapsed();
        // 100/s for 0.5 s: 50 requests, due at 0, 10, ..., 490 ms.
        assert_eq!(report.requests, 50, "{report:?}");
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
        assert_eq!(report.errors, 0);
    }
}
