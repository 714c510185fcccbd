//! `HttpMonitor` (health over HTTP) and `Bake` (watch a release for a while).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::incident::open_incident;
use cd_core::{
    Analysis, AnalysisOutcome, Capabilities, Error, IncidentRecord, Monitor, MonitorContext,
    Result, Sample, Severity, Stage, StageContext, StageOutput, Target,
};

use crate::check::excerpt;
use crate::http::{HttpClient, Url};
use crate::tls::TlsOptions;

/// A [`Monitor`] that GETs a URL: a sample is `Ok` when the status is 2xx
/// (and the body contains the expected text, if set), `Failing` otherwise,
/// and an error (`Unavailable`) when no response comes at all.
///
/// Every sample opens a new connection, so a monitor behind a
/// [`Router`](cd_core::Router) sees a switch at once.
///
/// ```
/// use cd_stages::HttpMonitor;
/// let health = HttpMonitor::get("http://127.0.0.1:18080/health").body_contains("ok");
/// # let _ = health;
/// ```
#[derive(Debug, Clone)]
pub struct HttpMonitor {
    url: String,
    label: Option<String>,
    latency_below: Option<Duration>,
    body_contains: Option<String>,
    timeout: Duration,
    tls: TlsOptions,
    /// Built on the first sample (building reads CA files).
    client: Arc<std::sync::Mutex<Option<HttpClient>>>,
}

impl HttpMonitor {
    /// Monitors `GET url`.
    pub fn get(url: impl Into<String>) -> Self {
        HttpMonitor {
            url: url.into(),
            label: None,
            latency_below: None,
            body_contains: None,
            timeout: Duration::from_secs(2),
            tls: TlsOptions::default(),
            client: Arc::default(),
        }
    }

    /// TLS trust and client certificate for `https://` (default: the
    /// system's roots).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self.client = Arc::default();
        self
    }

    /// The client, built once: no keep-alive (each sample is a fresh
    /// connection, as a user behind a router would make).
    fn client(&self) -> Result<HttpClient> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = HttpClient::builder()
            .keep_alive(false)
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .tls(self.tls.clone())
            .build()?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A name for events and verdicts (default: `http GET <url>`).
    pub fn label(mut self, name: impl Into<String>) -> Self {
        self.label = Some(name.into());
        self
    }

    /// Fails a sample whose response took `limit` or longer (the time to
    /// the whole response, connection included, in ms in the sample).
    pub fn latency_below(mut self, limit: Duration) -> Self {
        self.latency_below = Some(limit);
        self
    }

    /// Requires the body to contain `text`.
    pub fn body_contains(mut self, text: impl Into<String>) -> Self {
        self.body_contains = Some(text.into());
        self
    }

    /// Deadline per sample (default 2 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self.client = Arc::default();
        self
    }
}

#[async_trait]
impl Monitor for HttpMonitor {
    fn name(&self) -> String {
        match &self.label {
            Some(l) => l.clone(),
            None => format!("http GET {}", self.url),
        }
    }

    async fn sample(&self, _cx: &MonitorContext) -> Result<Sample> {
        let url = Url::parse(&self.url)?;
        let started = Instant::now();
        let resp = self.client()?.get(&url.to_string()).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if !resp.is_success() {
            return Ok(Sample::failing(
                Some(f64::from(resp.status)),
                format!(
                    "GET {url} -> {} (body: {})",
                    resp.status,
                    excerpt(&resp.text())
                ),
            ));
        }
        if let Some(text) = &self.body_contains {
            if !resp.text().contains(text.as_str()) {
                return Ok(Sample::failing(
                    Some(f64::from(resp.status)),
                    format!(
                        "GET {url} -> {} but the body does not contain `{text}` (body: {})",
                        resp.status,
                        excerpt(&resp.text())
                    ),
                ));
            }
        }
        let value = Some((ms * 1000.0).round() / 1000.0);
        if let Some(limit) = self.latency_below {
            let limit_ms = limit.as_secs_f64() * 1000.0;
            if ms >= limit_ms {
                return Ok(Sample::failing(
                    value,
                    format!(
                        "GET {url} -> {} in {ms:.1} ms (healthy < {limit_ms:.0} ms)",
                        resp.status
                    ),
                ));
            }
        }
        Ok(Sample::ok(
            value,
            format!("GET {url} -> {} in {ms:.1} ms", resp.status),
        ))
    }
}

/// Bake time: samples a [`Monitor`] with an [`Analysis`] for a while after
/// a deployment, and fails the stage when the analysis does not pass, so the
/// runner's compensation rolls back the deployment before it.
///
/// No data is never a silent pass: an inconclusive analysis fails the stage
/// too, unless [`Bake::allow_inconclusive`] is set.
///
/// ```
/// use std::time::Duration;
/// use cd_stages::{Bake, HttpMonitor};
/// let bake = Bake::new(HttpMonitor::get("http://127.0.0.1:18080/health"))
///     .for_duration(Duration::from_secs(10), Duration::from_secs(1))
///     .failure_limit(1);
/// # let _ = bake;
/// ```
#[derive(Clone)]
pub struct Bake {
    monitors: Vec<Arc<dyn Monitor>>,
    analysis: Analysis,
    targets: Vec<Target>,
    allow_inconclusive: bool,
    incident: Option<Severity>,
}

impl std::fmt::Debug for Bake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bake")
            .field(
                "monitors",
                &self.monitors.iter().map(|m| m.name()).collect::<Vec<_>>(),
            )
            .field("analysis", &self.analysis)
            .finish()
    }
}

impl Bake {
    /// Bakes with `monitor` and the default analysis: 5 samples 1 s apart,
    /// no failing sample tolerated, 2 monitor errors in a row tolerated.
    pub fn new(monitor: impl Monitor) -> Self {
        Bake {
            monitors: vec![Arc::new(monitor)],
            analysis: Analysis::new().count(5).interval(Duration::from_secs(1)),
            targets: Vec::new(),
            allow_inconclusive: false,
            incident: Some(Severity::Critical),
        }
    }

    /// Watches `monitor` too, with the same analysis, at the same time.
    /// The bake fails as soon as one monitor's analysis fails (the others
    /// stop), and its verdict lists every monitor with its own.
    pub fn monitor(mut self, monitor: impl Monitor) -> Self {
        self.monitors.push(Arc::new(monitor));
        self
    }

    /// Replaces the analysis.
    pub fn analysis(mut self, analysis: Analysis) -> Self {
        self.analysis = analysis;
        self
    }

    /// Samples every `interval` for `total` (one sample at the start, one
    /// at the end).
    pub fn for_duration(mut self, total: Duration, interval: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let count =
            (total.as_millis() / interval.as_millis()).min(u128::from(u32::MAX - 1)) as u32 + 1;
        self.analysis = self.analysis.interval(interval).count(count);
        self
    }

    /// Failing samples tolerated.
    pub fn failure_limit(mut self, n: u32) -> Self {
        self.analysis = self.analysis.failure_limit(n);
        self
    }

    /// The targets under watch (passed to the monitor).
    pub fn targets(mut self, targets: impl IntoIterator<Item = Target>) -> Self {
        self.targets = targets.into_iter().collect();
        self
    }

    /// Opens an incident of `severity` when the bake fails (the default:
    /// [`Severity::Critical`]); `None` opens none.
    pub fn incident(mut self, severity: Option<Severity>) -> Self {
        self.incident = severity;
        self
    }

    /// Lets an inconclusive analysis (no data) pass, with a warning.
    pub fn allow_inconclusive(mut self) -> Self {
        self.allow_inconclusive = true;
        self
    }
}

#[async_trait]
impl Stage for Bake {
    fn kind(&self) -> String {
        "bake".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        // One token for the monitors: the first failing analysis stops the
        // others (the bake has failed anyway).
        let stop = cx.cancel_token().child_token();
        let mut mcx = MonitorContext::new(
            self.targets.clone(),
            cx.release().clone(),
            cx.events().clone(),
            stop.clone(),
        );
        mcx.since = Some(chrono::Utc::now());
        let names: Vec<String> = self.monitors.iter().map(|m| m.name()).collect();
        cx.log(format!(
            "baking {} for {} ms: {} samples {} ms apart with {}",
            cx.release().version,
            self.analysis.total_duration().as_millis(),
            self.analysis.count,
            self.analysis.interval.as_millis(),
            names.join(", ")
        ));
        let started = Instant::now();
        let mut running: futures::stream::FuturesUnordered<_> = self
            .monitors
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mcx = &mcx;
                async move { (i, self.analysis.run(m.as_ref(), mcx).await) }
            })
            .collect();
        let mut outcomes: Vec<Option<AnalysisOutcome>> = vec![None; self.monitors.len()];
        while let Some((i, r)) = futures::StreamExt::next(&mut running).await {
            match r {
                Ok(o) => {
                    if matches!(o, AnalysisOutcome::Fail(_)) {
                        stop.cancel();
                    }
                    outcomes[i] = Some(o);
                }
                // Stopped because another monitor failed: no verdict.
                Err(_) if stop.is_cancelled() && !cx.cancel_token().is_cancelled() => {}
                Err(e) => return Err(e.with("node", cx.node())),
            }
        }
        drop(running);
        let verdicts: Vec<serde_json::Value> = names
            .iter()
            .zip(&outcomes)
            .map(|(name, o)| match o {
                Some(o) => serde_json::json!({ "monitor": name, "outcome": o }),
                None => serde_json::json!({
                    "monitor": name,
                    "outcome": { "outcome": "stopped", "reason": "another monitor failed first" },
                }),
            })
            .collect();
        let failed: Vec<String> = outcomes
            .iter()
            .filter_map(|o| match o {
                Some(AnalysisOutcome::Fail(r)) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let inconclusive: Vec<String> = outcomes
            .iter()
            .filter_map(|o| match o {
                Some(AnalysisOutcome::Inconclusive(r)) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let outcome = if !failed.is_empty() {
            AnalysisOutcome::Fail(failed.join("; "))
        } else if !inconclusive.is_empty() {
            AnalysisOutcome::Inconclusive(inconclusive.join("; "))
        } else {
            AnalysisOutcome::Pass
        };
        // The verdict, monitor by monitor, for a person.
        cx.log(format!(
            "bake verdict: {}",
            match &outcome {
                AnalysisOutcome::Pass => "pass",
                AnalysisOutcome::Fail(_) => "fail",
                AnalysisOutcome::Inconclusive(_) => "inconclusive",
            }
        ));
        for (name, o) in names.iter().zip(&outcomes) {
            // Reasons start with the monitor's name already.
            let own = |r: &str| {
                r.strip_prefix(&format!("{name}: "))
                    .unwrap_or(r)
                    .to_string()
            };
            cx.log(match o {
                Some(AnalysisOutcome::Pass) => format!("  {name}: pass"),
                Some(AnalysisOutcome::Fail(r)) => format!("  {name}: FAIL: {}", own(r)),
                Some(AnalysisOutcome::Inconclusive(r)) => {
                    format!("  {name}: inconclusive: {}", own(r))
                }
                None => format!("  {name}: stopped (another monitor failed first)"),
            });
        }
        let output = || {
            StageOutput::json(serde_json::json!({
                "monitor": names.join(", "),
                "outcome": outcome,
                "monitors": verdicts,
                "samples": self.analysis.count,
                "duration_ms": started.elapsed().as_millis() as u64,
            }))
        };
        let (title, reason) = match &outcome {
            AnalysisOutcome::Pass => return Ok(output()),
            AnalysisOutcome::Inconclusive(reason) if self.allow_inconclusive => {
                cx.events()
                    .warn(format!("bake inconclusive, allowed: {reason}"));
                return Ok(output());
            }
            AnalysisOutcome::Fail(reason) => (
                format!("{} is not healthy after deployment", cx.release().version),
                reason,
            ),
            AnalysisOutcome::Inconclusive(reason) => (
                format!(
                    "{} could not be judged healthy after deployment (inconclusive is not a pass)",
                    cx.release().version
                ),
                reason,
            ),
        };
        let mut err = Error::failed(format!("{title}: {reason}")).with("node", cx.node());
        if let Some(severity) = self.incident {
            let env = cx.environment();
            let title = if env.is_empty() {
                title
            } else {
                format!("{title} to {env}")
            };
            let incident = IncidentRecord::open(title, reason.clone(), severity);
            match open_incident(cx, incident).await {
                Ok(i) => {
                    cx.log(format!("opened incident {} ({})", i.id, i.severity));
                    err = err.with("incident", i.id);
                }
                // The bake's verdict stands: the rollback must not wait
                // on the incident's record.
                Err(e) => cx.events().warn(format!("could not open an incident: {e}")),
            }
        }
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cd_core::{
        CollectingSink, Emitter, ErrorKind, EventKind, MemoryStore, Release, SampleStatus,
    };

    use super::*;
    use crate::test_server::{TestResponse, TestServer};

    fn mcx() -> MonitorContext {
        MonitorContext::new(
            vec![],
            Release::new("v1"),
            Emitter::noop(),
            Default::default(),
        )
    }

    #[tokio::test]
    async fn http_monitor_samples() {
        let server = TestServer::start(|req| match req.path.as_str() {
            "/health" => TestResponse::ok("status: ok"),
            _ => TestResponse::new(500, "down"),
        })
        .await;
        let s = HttpMonitor::get(server.url("/health"))
            .sample(&mcx())
            .await
            .unwrap();
        assert_eq!(s.status, SampleStatus::Ok);
        let s = HttpMonitor::get(server.url("/health"))
            .body_contains("healthy")
            .sample(&mcx())
            .await
            .unwrap();
        assert_eq!(s.status, SampleStatus::Failing);
        assert!(
            s.detail.contains("does not contain `healthy`"),
            "{}",
            s.detail
        );
        let s = HttpMonitor::get(server.url("/other"))
            .sample(&mcx())
            .await
            .unwrap();
        assert_eq!((s.status, s.value), (SampleStatus::Failing, Some(500.0)));
        assert!(s.detail.contains("-> 500"), "{}", s.detail);

        let (_held, port) = crate::test_server::refused_port();
        let err = HttpMonitor::get(format!("http://127.0.0.1:{port}/health"))
            .sample(&mcx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }

    fn stage_cx(sink: &CollectingSink) -> StageContext {
        StageContext::detached("bake", Release::new("v2"), Arc::new(MemoryStore::new()))
            .with_emitter(Emitter::new(
                "run",
                1,
                vec![Arc::new(sink.clone())],
                Default::default(),
            ))
    }

    #[tokio::test]
    async fn bake_passes_on_a_healthy_service() {
        let server = TestServer::start(|_| TestResponse::ok("ok")).await;
        let sink = CollectingSink::new();
        let bake = Bake::new(HttpMonitor::get(server.url("/health")))
            .for_duration(Duration::from_millis(40), Duration::from_millis(10));
        let out = bake.run(&stage_cx(&sink)).await.unwrap();
        assert_eq!(out.get("samples"), Some(&serde_json::json!(5)));
        let samples = sink
            .events()
            .iter()
            .filter(|e| matches!(e.kind, EventKind::AnalysisSample { .. }))
            .count();
        assert_eq!(samples, 5);
    }

    #[tokio::test]
    async fn bake_fails_when_health_goes_bad() {
        // Healthy twice, then failing: the analysis fails at the first bad
        // sample (failure limit 0) and the stage error says why.
        let n = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start(move |_| {
            if n.fetch_add(1, Ordering::SeqCst) < 2 {
                TestResponse::ok("ok")
            } else {
                TestResponse::new(503, "degraded")
            }
        })
        .await;
        let sink = CollectingSink::new();
        let bake = Bake::new(HttpMonitor::get(server.url("/health")))
            .for_duration(Duration::from_millis(100), Duration::from_millis(10));
        let err = bake.run(&stage_cx(&sink)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Failed);
        assert!(!err.is_retryable());
        let msg = err.to_string();
        assert!(msg.contains("v2 is not healthy after deployment"), "{msg}");
        assert!(msg.contains("-> 503"), "{msg}");
        assert_eq!(err.context("node"), Some("bake"));
    }

    struct NoData;

    #[async_trait]
    impl Monitor for NoData {
        fn name(&self) -> String {
            "nothing".into()
        }
        async fn sample(&self, _cx: &MonitorContext) -> Result<Sample> {
            Ok(Sample::no_data("no series"))
        }
    }

    #[tokio::test]
    async fn no_data_is_not_a_pass_unless_allowed() {
        let sink = CollectingSink::new();
        let bake =
            Bake::new(NoData).for_duration(Duration::from_millis(20), Duration::from_millis(10));
        let err = bake.run(&stage_cx(&sink)).await.unwrap_err();
        assert!(
            err.to_string().contains("inconclusive is not a pass"),
            "{err}"
        );
        bake.allow_inconclusive()
            .run(&stage_cx(&sink))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bake_fails_when_the_service_is_gone() {
        let (_held, port) = crate::test_server::refused_port();
        let sink = CollectingSink::new();
        let bake = Bake::new(HttpMonitor::get(format!("http://127.0.0.1:{port}/health")))
            .for_duration(Duration::from_millis(50), Duration::from_millis(10));
        let err = bake.run(&stage_cx(&sink)).await.unwrap_err();
        assert!(err.to_string().contains("errors in a row"), "{err}");
    }

    #[tokio::test]
    async fn http_monitor_samples_an_https_service() {
        let pki = crate::test_server::TestPki::new();
        let server =
            TestServer::start_tls(|_| TestResponse::ok("status: ok"), pki.server.clone()).await;
        let s = HttpMonitor::get(server.url("/health"))
            .tls(crate::tls::TlsOptions::new().ca_pem(pki.ca_pem.clone()))
            .body_contains("ok")
            .sample(&mcx())
            .await
            .unwrap();
        assert_eq!(s.status, SampleStatus::Ok);
        let err = HttpMonitor::get(server.url("/health"))
            .sample(&mcx())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
    }

    #[tokio::test]
    async fn a_bake_with_several_monitors_gives_a_verdict_per_monitor() {
        let server = TestServer::start(|req| match req.path.as_str() {
            "/health" => TestResponse::ok("ok"),
            _ => TestResponse::new(500, "boom"),
        })
        .await;
        let sink = CollectingSink::new();
        let bake = Bake::new(HttpMonitor::get(server.url("/health")).label("health"))
            .monitor(HttpMonitor::get(server.url("/orders")).label("orders"))
            .monitor(
                HttpMonitor::get(server.url("/health"))
                    .label("latency")
                    .latency_below(Duration::from_secs(30)),
            )
            .for_duration(Duration::from_millis(40), Duration::from_millis(10));
        let err = bake.run(&stage_cx(&sink)).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("orders: 1 failing sample(s) > limit 0"),
            "{msg}"
        );
        assert!(!msg.contains("health:"), "{msg}");
        let logs: Vec<String> = sink
            .events()
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Log { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect();
        assert!(logs.contains(&"bake verdict: fail".to_string()), "{logs:?}");
        let orders = logs.iter().find(|l| l.starts_with("  orders: ")).unwrap();
        assert!(
            orders.starts_with("  orders: FAIL: 1 failing sample(s)"),
            "{orders}"
        );
        assert!(orders.contains("-> 500"), "{orders}");
        // The others were stopped by the failure, or had passed.
        for name in ["health", "latency"] {
            let l = logs
                .iter()
                .find(|l| l.starts_with(&format!("  {name}: ")))
                .unwrap();
            assert!(l.ends_with(": pass") || l.contains("stopped"), "{l}");
        }

        // A latency limit no response can meet fails every sample.
        let slow = Bake::new(
            HttpMonitor::get(server.url("/health"))
                .label("latency")
                .latency_below(Duration::ZERO),
        )
        .for_duration(Duration::from_millis(10), Duration::from_millis(10));
        let err = slow.run(&stage_cx(&sink)).await.unwrap_err();
        assert!(err.to_string().contains("(healthy < 0 ms)"), "{err}");
    }
}
