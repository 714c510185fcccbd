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

/// A PromQL query judged against a threshold; see the [module docs](self).
#[derive(Clone)]
pub struct PrometheusMonitor {
    base: String,
    query: String,
    threshold: Threshold,
    name: Option<String>,
    auth: Auth,
    tls: TlsOptions,
    timeout: Duration,
}

impl std::fmt::Debug for PrometheusMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusMonitor")
            .field("base", &self.base)
            .field("query", &self.query)
            .field("threshold", &self.threshold)
            .field(
                "auth",
                &matches!(self.auth, Auth::None)
                    .then_some("none")
                    .unwrap_or("***"),
            )
            .finish()
    }
}

impl PrometheusMonitor {
    /// Queries the Prometheus at `base` (`http://prometheus:9090`).
    pub fn new(base: impl Into<String>, query: impl Into<String>, threshold: Threshold) -> Self {
        PrometheusMonitor {
            base: base.into().trim_end_matches('/').to_string(),
            query: query.into(),
            threshold,
            name: None,
            auth: Auth::None,
            tls: TlsOptions::default(),
            timeout: Duration::from_secs(10),
        }
    }

    /// A name for events and verdicts (default: the query).
    pub fn label(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
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

    /// The query with the release and targets put in.
    ///
    /// Errors: [`ErrorKind::Invalid`] for a release version the version rule
    /// refuses.
    pub fn render(&self, cx: &MonitorContext) -> Result<String> {
        cd_core::types::validate_version(&cx.release.version)?;
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let first = cx.targets.first().map(|t| esc(&t.name)).unwrap_or_default();
        let all = cx
            .targets
            .iter()
            .map(|t| esc(&regex_escape(&t.name)))
            .collect::<Vec<_>>()
            .join("|");
        Ok(self
            .query
            .replace("{{version}}", &cx.release.version)
            .replace("{{target}}", &first)
            .replace("{{targets}}", &all))
    }

    /// Runs the query and returns Prometheus' `data` (its result type and
    /// result).
    async fn query(&self, promql: &str) -> Result<serde_json::Value> {
        let url = Url::parse(&format!("{}/api/v1/query", self.base))?;
        let mut endpoint = url.as_reqwest().clone();
        endpoint.query_pairs_mut().append_pair("query", promql);
        let url = Url::parse(endpoint.as_str())?;
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
        match &self.auth {
            Auth::Basic(_, p) => cx.events.redactor().register(p.expose().clone()),
            Auth::Bearer(t) => cx.events.redactor().register(t.expose().clone()),
            Auth::None => {}
        }
        let promql = self.render(cx)?;
        let data = self.query(&promql).await?;
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
