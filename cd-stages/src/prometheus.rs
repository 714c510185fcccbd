//! `PrometheusMonitor`: a PromQL query through the Prometheus HTTP API
//! (`GET /api/v1/query`, instant queries) as a [`Monitor`], judged against a
//! threshold.
//!
//! The query is templated with the release and the targets under analysis:
//! `{{version}}` (the release version), `{{target}}` (the first target's
//! name) and `{{targets}}` (every target's name joined with `|`, for a
//! regex matcher). Values from a release are checked by the one version rule
//! before they are put in a query; target names are escaped for a PromQL
//! string.
//!
//! How results are read (Prometheus HTTP API v1):
//! - `vector`: no series is **no data** (never a pass); several series are
//!   judged by the worst value (the highest for [`Threshold::Below`], the
//!   lowest for [`Threshold::Above`]);
//! - `scalar`: its value;
//! - `matrix` and `string`: a typed error (use an instant query that yields
//!   a vector or a scalar);
//! - `NaN` (a rate over nothing, a division by zero) is no data; `±Inf` is
//!   compared like any value.
//!
//! Errors: Prometheus' own (`bad_data` for a syntax error, `timeout`,
//! `execution`) become [`ErrorKind::Invalid`] (bad data) or
//! [`ErrorKind::Unavailable`] naming the query and quoting Prometheus'
//! message; a Prometheus that does not answer is `Unavailable`, which the
//! analysis counts toward its consecutive-error limit.
//!
//! ```
//! use cd_stages::prometheus::{PrometheusMonitor, Threshold};
//! let errors = PrometheusMonitor::new(
//!     "http://prometheus:9090",
//!     r#"sum(rate(http_requests_total{code=~"5..",version="{{version}}"}[1m]))
//!        / sum(rate(http_requests_total{version="{{version}}"}[1m]))"#,
//!     Threshold::Below(0.01),
//! )
//! .label("error rate");
//! # let _ = errors;
//! ```

use std::time::Duration;

use async_trait::async_trait;
use cd_core::{Error, ErrorKind, Monitor, MonitorContext, Result, Sample, Secret};

use crate::http::{HttpClient, Request, Url};
use crate::tls::TlsOptions;

/// What a healthy value is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Healthy while the value is below this (error rates, latencies).
    Below(f64),
    /// Healthy while the value is above this (success rates, throughput).
    Above(f64),
}

/// How Prometheus is reached.
#[derive(Clone)]
enum Auth {
    None,
    Basic(String, Secret<String>),
    Bearer(Secret<String>),
}

/// A client of one Prometheus' HTTP API (v1): base URL, credentials, TLS
/// and deadline. [`PrometheusMonitor`] and
/// [`CanaryAnalysis`](crate::canary::CanaryAnalysis) query through it.
///
/// ```
/// use std::time::Duration;
/// use cd_core::Secret;
/// use cd_stages::prometheus::Prometheus;
/// let p = Prometheus::new("https://prometheus.internal:9090")
///     .bearer_token(Secret::new("token".into()))
///     .timeout(Duration::from_secs(5));
/// assert_eq!(p.base(), "https://prometheus.internal:9090");
/// ```
#[derive(Clone)]
pub struct Prometheus {
    base: String,
    auth: Auth,
    tls: TlsOptions,
    timeout: Duration,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus")
            .field("base", &self.base)
            .field(
                "auth",
                &matches!(self.auth, Auth::None)
                    .then_some("none")
                    .unwrap_or("***"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One series of a range query: its labels and its `(unix seconds, value)`
/// points, oldest first (`NaN` and `±Inf` kept as such).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The series' labels (`__name__` included when Prometheus gives it).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

impl Prometheus {
    /// The Prometheus at `base` (`http://prometheus:9090`); queries time
    /// out after 10 s.
    pub fn new(base: impl Into<String>) -> Self {
        Prometheus {
            base: base.into().trim_end_matches('/').to_string(),
            auth: Auth::None,
            tls: TlsOptions::default(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// HTTP basic authentication.
    pub fn basic_auth(mut self, user: impl Into<String>, password: Secret<String>) -> Self {
        self.auth = Auth::Basic(user.into(), password);
        self
    }

    /// A bearer token.
    pub fn bearer_token(mut self, token: Secret<String>) -> Self {
        self.auth = Auth::Bearer(token);
        self
    }

    /// TLS trust and client certificate for `https://`.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// The deadline of one query (default 10 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Registers the credentials with `redactor`, so no event echoes them.
    pub fn hide_secrets(&self, redactor: &cd_core::Redactor) {
        match &self.auth {
            Auth::Basic(_, p) => redactor.register(p.expose().clone()),
            Auth::Bearer(t) => redactor.register(t.expose().clone()),
            Auth::None => {}
        }
    }

    /// An instant query (`GET /api/v1/query`): Prometheus' `data` (its
    /// `resultType` and `result`).
    ///
    /// Errors: [`ErrorKind::Invalid`] for Prometheus' `bad_data` (a syntax
    /// error), with its message; [`ErrorKind::Unavailable`] for its other
    /// errors, an unreachable server or an answer that is not its JSON.
    pub async fn query(&self, promql: &str) -> Result<serde_json::Value> {
        self.api("query", &[("query", promql.to_string())], promql)
            .await
    }

    /// A range query (`GET /api/v1/query_range`) from `start` to `end`
    /// every `step` (at least 1 ms): every series with its points.
    ///
    /// Errors: as [`Prometheus::query`]; [`ErrorKind::Invalid`] when the
    /// result is not a matrix.
    pub async fn query_range(
        &self,
        promql: &str,
        start: chrono::DateTime<chrono::Utc>,
        end: chrono::DateTime<chrono::Utc>,
        step: Duration,
    ) -> Result<Vec<Series>> {
        let secs = |t: chrono::DateTime<chrono::Utc>| {
            format!("{:.3}", t.timestamp_millis() as f64 / 1000.0)
        };
        let step = format!("{:.3}", step.max(Duration::from_millis(1)).as_secs_f64());
        let data = self
            .api(
                "query_range",
                &[
                    ("query", promql.to_string()),
                    ("start", secs(start)),
                    ("end", secs(end)),
                    ("step", step),
                ],
                promql,
            )
            .await?;
        let kind = data
            .get("resultType")
            .and_then(|s| s.as_str())
            .unwrap_or("");
        if kind != "matrix" {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("a range query yielded a {kind}, not a matrix"),
            )
            .with("query", promql));
        }
        let result = data
            .get("result")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(result
            .iter()
            .map(|s| Series {
                labels: s
                    .get("metric")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                points: s
                    .get("values")
                    .and_then(|v| v.as_array())
                    .map(|v| {
                        v.iter()
                            .filter_map(|p| Some((p.get(0)?.as_f64()?, value_of(p)?)))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn api(
        &self,
        endpoint: &str,
        params: &[(&str, String)],
        promql: &str,
    ) -> Result<serde_json::Value> {
        let url = Url::parse(&format!("{}/api/v1/{endpoint}", self.base))?;
        let mut full = url.as_reqwest().clone();
        {
            let mut q = full.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
        }
        let url = Url::parse(full.as_str())?;
        let mut req = Request::get(url);
        match &self.auth {
            Auth::None => {}
            Auth::Basic(user, pass) => {
                use base64::Engine;
                // RFC 7617: base64 of `user:password`.
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}:{}", pass.expose()));
                req = req.header("Authorization", format!("Basic {token}"));
            }
            Auth::Bearer(t) => req = req.header("Authorization", format!("Bearer {}", t.expose())),
        }
        let client = HttpClient::builder()
            .timeout(self.timeout)
            .tls(self.tls.clone())
            .build()?;
        let resp = client.send(&req).await?;
        let body: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Prometheus at {} answered {} with something that is not its API's JSON: {e}",
                    self.base, resp.status
                ),
            )
        })?;
        if body.get("status").and_then(|s| s.as_str()) != Some("success") {
            let kind = body
                .get("errorType")
                .and_then(|s| s.as_str())
                .unwrap_or("unknown");
            let msg = body
                .get("error")
                .and_then(|s| s.as_str())
                .unwrap_or("no message");
            let ek = if kind == "bad_data" {
                ErrorKind::Invalid
            } else {
                ErrorKind::Unavailable
            };
            return Err(
                Error::new(ek, format!("Prometheus refused the query ({kind}): {msg}"))
                    .with("query", promql),
            );
        }
        Ok(body.get("data").cloned().unwrap_or_default())
    }
}

/// Escapes regex metacharacters for a PromQL `=~` matcher.
/// A PromQL query judged against a threshold; see the [module docs](self).
#[derive(Clone)]
pub struct PrometheusMonitor {
    prometheus: Prometheus,
    query: String,
    threshold: Threshold,
    name: Option<String>,
}

impl std::fmt::Debug for PrometheusMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusMonitor")
            .field("prometheus", &self.prometheus)
            .field("query", &self.query)
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl PrometheusMonitor {
    /// Queries the Prometheus at `base` (`http://prometheus:9090`).
    pub fn new(base: impl Into<String>, query: impl Into<String>, threshold: Threshold) -> Self {
        Self::with(Prometheus::new(base), query, threshold)
    }

    /// Queries through `prometheus` (credentials, TLS, deadline set there).
    pub fn with(prometheus: Prometheus, query: impl Into<String>, threshold: Threshold) -> Self {
        PrometheusMonitor {
            prometheus,
            query: query.into(),
            threshold,
            name: None,
        }
    }

    /// A name for events and verdicts (default: the query).
    pub fn label(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// HTTP basic authentication.
    pub fn basic_auth(mut self, user: impl Into<String>, password: Secret<String>) -> Self {
        self.prometheus = self.prometheus.basic_auth(user, password);
        self
    }

    /// A bearer token.
    pub fn bearer_token(mut self, token: Secret<String>) -> Self {
        self.prometheus = self.prometheus.bearer_token(token);
        self
    }

    /// TLS trust and client certificate for `https://`.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.prometheus = self.prometheus.tls(tls);
        self
    }

    /// The deadline of one query (default 10 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.prometheus = self.prometheus.timeout(d);
        self
    }

    /// The query with the release and targets put in.
    ///
    /// Errors: [`ErrorKind::Invalid`] for a release version the version rule
    /// refuses.
    pub fn render(&self, cx: &MonitorContext) -> Result<String> {
        render_query(&self.query, &cx.release.version, &cx.targets)
    }
}

/// Puts `version` and `targets` into a query template: `{{version}}` (the
/// version, after the version rule checked it), `{{target}}` (the first
/// target's name, escaped for a PromQL string) and `{{targets}}` (every
/// name regex-escaped, joined with `|`).
///
/// Errors: [`ErrorKind::Invalid`] for a version the version rule refuses.
pub fn render_query(template: &str, version: &str, targets: &[cd_core::Target]) -> Result<String> {
    cd_core::types::validate_version(version)?;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let first = targets.first().map(|t| esc(&t.name)).unwrap_or_default();
    let all = targets
        .iter()
        .map(|t| esc(&regex_escape(&t.name)))
        .collect::<Vec<_>>()
        .join("|");
    Ok(template
        .replace("{{version}}", version)
        .replace("{{target}}", &first)
        .replace("{{targets}}", &all))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Prometheus sample value (`[ts, "1.5"]`), NaN and ±Inf included.
fn value_of(pair: &serde_json::Value) -> Option<f64> {
    let s = pair.get(1)?.as_str()?;
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

#[async_trait]
impl Monitor for PrometheusMonitor {
    fn name(&self) -> String {
        match &self.name {
            Some(n) => format!("prometheus {n}"),
            None => format!("prometheus {}", self.query),
        }
    }

    async fn sample(&self, cx: &MonitorContext) -> Result<Sample> {
        // Credentials never reach an event, even echoed in an error.
        self.prometheus.hide_secrets(cx.events.redactor());
        let promql = self.render(cx)?;
        let data = self.prometheus.query(&promql).await?;
        let kind = data
            .get("resultType")
            .and_then(|s| s.as_str())
            .unwrap_or("");
        let result = data.get("result").cloned().unwrap_or_default();
        let values: Vec<f64> = match kind {
            "vector" => result
                .as_array()
                .map(|series| {
                    series
                        .iter()
                        .filter_map(|s| s.get("value").and_then(value_of))
                        .collect()
                })
                .unwrap_or_default(),
            "scalar" => value_of(&result).into_iter().collect(),
            other => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                    "the query yields a {other}, not a vector or a scalar: use an instant query \
                         (a range selector needs a function such as rate())"
                ),
                )
                .with("query", promql))
            }
        };
        if values.is_empty() {
            return Ok(Sample::no_data(format!("{promql}: no series")));
        }
        let numbers: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if numbers.is_empty() {
            return Ok(Sample::no_data(format!(
                "{promql}: NaN (nothing to divide by?)"
            )));
        }
        let (worst, ok, limit) = match self.threshold {
            Threshold::Below(t) => {
                let w = numbers.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (w, w < t, format!("< {t}"))
            }
            Threshold::Above(t) => {
                let w = numbers.iter().copied().fold(f64::INFINITY, f64::min);
                (w, w > t, format!("> {t}"))
            }
        };
        let detail = format!(
            "{} = {worst} (healthy {limit}{})",
            self.name.as_deref().unwrap_or(&promql),
            if numbers.len() > 1 {
                format!(", worst of {} series", numbers.len())
            } else {
                String::new()
            }
        );
        Ok(if ok {
            Sample::ok(Some(worst), detail)
        } else {
            Sample::failing(Some(worst), detail)
        })
    }
}
