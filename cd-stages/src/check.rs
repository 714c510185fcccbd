//! `HttpCheck`: regression and smoke checks over HTTP.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{Capabilities, Error, ErrorKind, Result, Stage, StageContext, StageOutput};
use serde::{Deserialize, Serialize};

use crate::http::{HttpClient, Method, Request};
use crate::source::UrlSource;
use crate::tls::TlsOptions;

/// One request and what its response must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpProbe {
    /// The method (`GET` unless set).
    #[serde(skip, default = "default_method")]
    pub method: Method,
    /// A path joined to the base URL, or a full `http://` URL.
    pub path: String,
    /// The expected status.
    pub status: u16,
    /// A substring the body must contain.
    pub body_contains: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The request body (empty for none).
    #[serde(skip)]
    pub body: Vec<u8>,
}

fn default_method() -> Method {
    Method::Get
}

impl HttpProbe {
    /// `GET path`, expecting 200.
    pub fn get(path: impl Into<String>) -> Self {
        HttpProbe {
            method: Method::Get,
            path: path.into(),
            status: 200,
            body_contains: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `POST path` with a body of `content_type`, expecting 200.
    pub fn post(path: impl Into<String>, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        let mut probe = Self::get(path)
            .method(Method::Post)
            .header("Content-Type", content_type);
        probe.body = body.into();
        probe
    }

    /// Adds a request header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the method.
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Sets the expected status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Requires the body to contain `text`.
    pub fn body_contains(mut self, text: impl Into<String>) -> Self {
        self.body_contains = Some(text.into());
        self
    }
}

/// The result of one probe, as found in the stage output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `GET http://.../path`.
    pub request: String,
    /// The expected status.
    pub expected_status: u16,
    /// The status received, if a response came.
    pub status: Option<u16>,
    /// Whether the probe passed.
    pub ok: bool,
    /// Wall time of the request.
    pub duration_ms: u64,
    /// What differed, when it failed.
    pub problem: Option<String>,
}

/// What an [`HttpCheck`] outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCheckSummary {
    /// The base URL the paths were joined to.
    pub base_url: String,
    /// Probes that passed.
    pub passed: usize,
    /// Probes that failed.
    pub failed: usize,
    /// Every probe, in order.
    pub checks: Vec<ProbeResult>,
}

/// Regression and smoke checks: a list of requests against a service and
/// the status (and optionally body text) each must return.
///
/// The base URL is given directly or read from an upstream node's output.
/// Every probe runs, and the stage fails naming each URL and what differed.
/// When every failure is a connection failure, the error is `Unavailable`
/// (retryable: the service may still be starting); any wrong answer makes it
/// `Failed`.
///
/// ```
/// use cd_stages::HttpCheck;
/// let smoke = HttpCheck::base_url_from("staging", "url")
///     .get("/health")
///     .expect_body("/version", 200, "v42")
///     .expect("/admin", 403);
/// # let _ = smoke;
/// ```
#[derive(Debug, Clone)]
pub struct HttpCheck {
    base: UrlSource,
    probes: Vec<HttpProbe>,
    timeout: Duration,
    tls: TlsOptions,
    redirects: usize,
}

impl HttpCheck {
    /// Checks against a fixed base URL.
    pub fn base_url(url: impl Into<String>) -> Self {
        Self::with_source(UrlSource::Fixed(url.into()))
    }

    /// Checks against the URL in field `field` of node `node`'s output (see
    /// [`UrlSource::FromOutput`]).
    pub fn base_url_from(node: impl Into<String>, field: impl Into<String>) -> Self {
        Self::with_source(UrlSource::FromOutput {
            node: node.into(),
            field: field.into(),
        })
    }

    fn with_source(base: UrlSource) -> Self {
        HttpCheck {
            base,
            probes: Vec::new(),
            timeout: Duration::from_secs(5),
            tls: TlsOptions::default(),
            redirects: 0,
        }
    }

    /// TLS trust and client certificate for `https://` (default: the
    /// system's roots).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// Follows up to `n` redirects (default 0: a probe sees the redirect
    /// itself, so `expect(path, 301)` works).
    pub fn redirects(mut self, n: usize) -> Self {
        self.redirects = n;
        self
    }

    /// `GET path` must answer 200.
    pub fn get(self, path: impl Into<String>) -> Self {
        self.probe(HttpProbe::get(path))
    }

    /// `GET path` must answer `status`.
    pub fn expect(self, path: impl Into<String>, status: u16) -> Self {
        self.probe(HttpProbe::get(path).status(status))
    }

    /// `GET path` must answer `status` with a body containing `text`.
    pub fn expect_body(
        self,
        path: impl Into<String>,
        status: u16,
        text: impl Into<String>,
    ) -> Self {
        self.probe(HttpProbe::get(path).status(status).body_contains(text))
    }

    /// Adds a probe.
    pub fn probe(mut self, probe: HttpProbe) -> Self {
        self.probes.push(probe);
        self
    }

    /// Deadline per request (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Runs every probe and summarizes, without failing on a mismatch.
    pub async fn check(&self, cx: &StageContext) -> Result<HttpCheckSummary> {
        let base = self.base.resolve(cx)?;
        let client = HttpClient::builder()
            .timeout(self.timeout)
            .tls(self.tls.clone())
            .redirects(self.redirects)
            .build()
            .map_err(|e| Error::from(e).with("node", cx.node()))?;
        let mut checks = Vec::with_capacity(self.probes.len());
        for probe in &self.probes {
            let url = base
                .join(&probe.path)
                .map_err(|e| Error::from(e).with("node", cx.node()))?;
            let request = format!("{} {}", probe.method, url);
            let started = Instant::now();
            let mut req = Request::new(probe.method, url).body(probe.body.clone());
            req.headers.clone_from(&probe.headers);
            let result = client.send(&req).await;
            let duration_ms = started.elapsed().as_millis() as u64;
            let (status, problem) = match result {
                Err(e) => (None, Some(e.to_string())),
                Ok(resp) => {
                    let problem = if resp.status != probe.status {
                        Some(format!(
                            "{request}: expected status {}, got {} (body: {})",
                            probe.status,
                            resp.status,
                            excerpt(&resp.text())
                        ))
                    } else {
                        match &probe.body_contains {
                            Some(text) if !resp.text().contains(text.as_str()) => Some(format!(
                                "{request}: body does not contain `{text}` (body: {})",
                                excerpt(&resp.text())
                            )),
                            _ => None,
                        }
                    };
                    (Some(resp.status), problem)
                }
            };
            match &problem {
                None => cx.log(format!(
                    "ok   {request} -> {} ({duration_ms} ms)",
                    probe.status
                )),
                Some(p) => cx.events().warn(format!("FAIL {p}")),
            }
            checks.push(ProbeResult {
                request,
                expected_status: probe.status,
                status,
                ok: problem.is_none(),
                duration_ms,
                problem,
            });
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        Ok(HttpCheckSummary {
            base_url: base.to_string(),
            passed: checks.len() - failed,
            failed,
            checks,
        })
    }
}

/// The first 200 characters of a body, on one line.
pub(crate) fn excerpt(text: &str) -> String {
    let one_line: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.trim();
    if one_line.is_empty() {
        "empty".to_string()
    } else if text.chars().count() > 200 {
        format!("`{one_line}...`")
    } else {
        format!("`{one_line}`")
    }
}

#[async_trait]
impl Stage for HttpCheck {
    fn kind(&self) -> String {
        "http-check".into()
    }

    fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        if self.probes.is_empty() {
            return Err(Error::invalid(
                "HTTP check has no probes: add .get(path) or .expect(path, status)",
            )
            .with("node", cx.node()));
        }
        let summary = self.check(cx).await?;
        if summary.failed == 0 {
            return StageOutput::from_serialize(&summary);
        }
        let problems: Vec<&str> = summary
            .checks
            .iter()
            .filter_map(|c| c.problem.as_deref())
            .collect();
        let only_connection_failures = summary
            .checks
            .iter()
            .filter(|c| !c.ok)
            .all(|c| c.status.is_none());
        let kind = if only_connection_failures {
            ErrorKind::Unavailable
        } else {
            ErrorKind::Failed
        };
        Err(Error::new(
            kind,
            format!(
                "{} of {} HTTP checks failed: {}",
                summary.failed,
                summary.checks.len(),
                problems.join("; ")
            ),
        )
        .with("node", cx.node())
        .with("url", &summary.base_url))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use cd_core::{MemoryStore, Release};

    use super::*;
    use crate::test_server::{TestResponse, TestServer};

    fn cx() -> StageContext {
        StageContext::detached("smoke", Release::new("v1"), Arc::new(MemoryStore::new()))
    }

    async fn app() -> TestServer {
        TestServer::start(|req| match req.path.as_str() {
            "/health" => TestResponse::ok("ok"),
            "/version" => TestResponse::ok("{\"version\":\"v1\"}"),
            "/echo" if req.method == "POST" => TestResponse::new(201, req.body.clone()),
            "/boom" => TestResponse::new(500, "internal error: database is down"),
            _ => TestResponse::new(404, "not found"),
        })
        .await
    }

    #[tokio::test]
    async fn passes_and_outputs_a_summary() {
        let server = app().await;
        let check = HttpCheck::base_url(server.base())
            .get("/health")
            .expect_body("/version", 200, "v1")
            .expect("/nope", 404)
            .probe(
                HttpProbe::post("/echo", "text/plain", "ping")
                    .status(201)
                    .body_contains("ping"),
            );
        let out = check.run(&cx()).await.unwrap();
        let summary: HttpCheckSummary = out.parse().unwrap();
        assert_eq!((summary.passed, summary.failed), (4, 0));
        assert_eq!(
            summary.checks[3].request,
            format!("POST {}/echo", server.base())
        );
        assert_eq!(
            summary.checks[1].request,
            format!("GET {}/version", server.base())
        );
    }

    #[tokio::test]
    async fn failure_names_url_and_difference() {
        let server = app().await;
        let check = HttpCheck::base_url(server.base())
            .get("/health")
            .get("/boom")
            .expect_body("/version", 200, "v2");
        let err = check.run(&cx()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Failed);
        let msg = err.to_string();
        assert!(msg.contains("2 of 3 HTTP checks failed"), "{msg}");
        assert!(
            msg.contains(&format!(
                "GET {}/boom: expected status 200, got 500",
                server.base()
            )),
            "{msg}"
        );
        assert!(msg.contains("database is down"), "{msg}");
        assert!(msg.contains("body does not contain `v2`"), "{msg}");
    }

    #[tokio::test]
    async fn reads_base_url_from_upstream_output() {
        let server = app().await;
        let outputs = BTreeMap::from([(
            "staging".to_string(),
            StageOutput::json(
                serde_json::json!({"url": server.base(), "slot": {"port": server.port()}}),
            ),
        )]);
        let cx = cx().with_outputs(outputs);
        HttpCheck::base_url_from("staging", "url")
            .get("/health")
            .run(&cx)
            .await
            .unwrap();
        HttpCheck::base_url_from("staging", "/slot/port")
            .get("/health")
            .run(&cx)
            .await
            .unwrap();
        let err = HttpCheck::base_url_from("staging", "nope")
            .get("/")
            .run(&cx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("has no field `nope`"), "{err}");
        let err = HttpCheck::base_url_from("build", "url")
            .get("/")
            .run(&cx)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no output from node `build`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn connection_failures_are_retryable() {
        let (_held, port) = crate::test_server::refused_port();
        let err = HttpCheck::base_url(format!("http://127.0.0.1:{port}"))
            .get("/health")
            .run(&cx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.is_retryable());
        assert!(
            err.to_string()
                .contains(&format!("http://127.0.0.1:{port}/health")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn no_probes_is_invalid() {
        let err = HttpCheck::base_url("http://127.0.0.1:1")
            .run(&cx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
    }

    #[tokio::test]
    async fn checks_an_https_service_with_its_ca() {
        let pki = crate::test_server::TestPki::new();
        let server = TestServer::start_tls(|_| TestResponse::ok("ok"), pki.server.clone()).await;
        let check = HttpCheck::base_url(server.base()).get("/health");
        let err = check.run(&cx()).await.unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
        let check = check.tls(crate::tls::TlsOptions::new().ca_pem(pki.ca_pem.clone()));
        check.run(&cx()).await.unwrap();
    }
}
