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
        format!("http GET {}", self.url)
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
        Ok(Sample::ok(
            Some((ms * 1000.0).round() / 1000.0),
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
    monitor: Arc<dyn Monitor>,
    analysis: Analysis,
    targets: Vec<Target>,
    allow_inconclusive: bool,
    incident: Option<Severity>,
}

impl std::fmt::Debug for Bake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bake")
            .field("monitor", &self.monitor.name())
            .field("analysis", &self.analysis)
            .finish()
    }
}

impl Bake {
    /// Bakes with `monitor` and the default analysis: 5 samples 1 s apart,
    /// no failing sample tolerated, 2 monitor errors in a row tolerated.
    pub fn new(monitor: impl Monitor) -> Self {
        Bake {
            monitor: Arc::new(monitor),
            analysis: Analysis::new().count(5).interval(Duration::from_secs(1)),
            targets: Vec::new(),
            allow_inconclusive: false,
            incident: Some(Severity::Critical),
        }
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
        let mut mcx = MonitorContext::new(
            self.targets.clone(),
            cx.release().clone(),
            cx.events().clone(),
            cx.cancel_token().clone(),
        );
        mcx.since = Some(chrono::Utc::now());
        let name = self.monitor.name();
        cx.log(format!(
            "baking {} for {} ms: {} samples {} ms apart with {name}",
            cx.release().version,
            self.analysis.total_duration().as_millis(),
            self.analysis.count,
            self.analysis.interval.as_millis()
        ));
        let started = Instant::now();
        let outcome = self
            .analysis
            .run(self.monitor.as_ref(), &mcx)
            .await
            .map_err(|e| e.with("node", cx.node()))?;
        let output = || {
            StageOutput::json(serde_json::json!({
                "monitor": name,
                "outcome": outcome,
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
}
