//! `WebhookNotifier`: notifications as HTTP POSTs of JSON, in three shapes.
//!
//! - **generic JSON**: the [`Notification`] as it serialises (`kind`,
//!   `title`, `summary`, `severity`, `run_id`, `pipeline`, `release`,
//!   `environment`, `node`, `incident`, `dedup_key`, `links`, `at`);
//! - **Slack** incoming webhooks: `text` (the fallback line) and Block Kit
//!   `blocks` (a header, the summary as `mrkdwn` with `&`, `<`, `>`
//!   escaped as Slack asks, a context line);
//! - **PagerDuty Events API v2** (`POST /v2/enqueue`): `trigger` with
//!   `payload.summary` (at most 1024 characters), `source`, `severity`,
//!   `component`, `group`, `class`, `custom_details`, `links`; an
//!   acknowledged incident sends `acknowledge`, a resolved one `resolve`,
//!   with the same `dedup_key`, so PagerDuty closes the alert it opened.
//!
//! The URL (Slack's holds a token) and the routing key are [`Secret`]s:
//! the notifier's [`name`](cd_core::Notifier::name) shows the scheme and
//! host only, and every error it returns is scrubbed of them.
//!
//! Errors of [`send`](cd_core::Notifier::send): a 408, 429 or 5xx
//! response, a refused connection or a timeout are `Unavailable`/`Timeout`
//! and retryable; any other non-2xx is `Invalid` (the payload or key is
//! wrong: retrying would not help).
//!
//! ```
//! use cd_core::{Notifications, Secret};
//! use cd_stages::webhook::WebhookNotifier;
//! let slack = WebhookNotifier::slack(Secret::new("https://hooks.slack.com/services/T0/B0/XYZ".into()));
//! assert_eq!(cd_core::Notifier::name(&slack), "slack https://hooks.slack.com");
//! let pd = WebhookNotifier::pagerduty(Secret::new("R0UTINGKEY".into()));
//! let notifications = Notifications::new().to(slack).to(pd);
//! # let _ = notifications;
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cd_core::{
    Error, ErrorKind, Notification, NotificationKind, Notifier, Redactor, Result, Secret,
};
use serde_json::{json, Value};

use crate::http::{HttpClient, Request, Url};
use crate::tls::TlsOptions;

/// PagerDuty's Events API v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// The shape of the JSON a [`WebhookNotifier`] posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// The notification as it serialises.
    Json,
    /// A Slack incoming-webhook message.
    Slack,
    /// A PagerDuty Events API v2 event.
    PagerDuty,
}

impl WebhookFormat {
    fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "webhook",
            WebhookFormat::Slack => "slack",
            WebhookFormat::PagerDuty => "pagerduty",
        }
    }
}

/// Posts notifications as JSON to a URL (see the [module docs](self)).
#[derive(Clone)]
pub struct WebhookNotifier {
    format: WebhookFormat,
    url: Secret<String>,
    routing_key: Option<Secret<String>>,
    bearer: Option<Secret<String>>,
    timeout: Duration,
    tls: TlsOptions,
    client: Arc<std::sync::OnceLock<HttpClient>>,
}

impl std::fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookNotifier")
            .field("format", &self.format)
            .field("url", &"***")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WebhookNotifier {
    fn new(format: WebhookFormat, url: Secret<String>) -> Self {
        WebhookNotifier {
            format,
            url,
            routing_key: None,
            bearer: None,
            timeout: Duration::from_secs(5),
            tls: TlsOptions::default(),
            client: Arc::default(),
        }
    }

    /// Generic JSON to `url`.
    pub fn json(url: Secret<String>) -> Self {
        Self::new(WebhookFormat::Json, url)
    }

    /// A Slack incoming webhook (`https://hooks.slack.com/services/...`).
    pub fn slack(url: Secret<String>) -> Self {
        Self::new(WebhookFormat::Slack, url)
    }

    /// PagerDuty Events API v2 with an integration's routing key, posted to
    /// [`PAGERDUTY_EVENTS_URL`] (another with [`WebhookNotifier::url`]).
    pub fn pagerduty(routing_key: Secret<String>) -> Self {
        let mut n = Self::new(
            WebhookFormat::PagerDuty,
            Secret::new(PAGERDUTY_EVENTS_URL.to_string()),
        );
        n.routing_key = Some(routing_key);
        n
    }

    /// Posts to `url` instead (a proxy, a test receiver).
    pub fn url(mut self, url: Secret<String>) -> Self {
        self.url = url;
        self
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn bearer_token(mut self, token: Secret<String>) -> Self {
        self.bearer = Some(token);
        self
    }

    /// Deadline per attempt (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self.client = Arc::default();
        self
    }

    /// TLS trust for `https://` (default: the system's roots).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self.client = Arc::default();
        self
    }

    /// The format.
    pub fn format(&self) -> WebhookFormat {
        self.format
    }

    fn redactor(&self) -> Redactor {
        let r = Redactor::default();
        r.register(self.url.expose().clone());
        // The path of a Slack URL is the token, on its own too.
        if let Ok(u) = Url::parse(self.url.expose()) {
            let path = u.path().trim_start_matches('/');
            if path.len() >= 8 {
                r.register(path.to_string());
            }
        }
        for s in [&self.routing_key, &self.bearer].into_iter().flatten() {
            r.register(s.expose().clone());
        }
        r
    }

    fn client(&self) -> Result<HttpClient> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let c = HttpClient::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .tls(self.tls.clone())
            .redirects(0)
            .build()
            .map_err(|e| Error::invalid(self.redactor().scrub(&e.to_string())))?;
        Ok(self.client.get_or_init(|| c).clone())
    }

    /// The JSON body this notifier posts for `n`.
    pub fn payload(&self, n: &Notification) -> Value {
        match self.format {
            WebhookFormat::Json => serde_json::to_value(n).unwrap_or(Value::Null),
            WebhookFormat::Slack => slack_payload(n),
            WebhookFormat::PagerDuty => pagerduty_payload(
                n,
                self.routing_key
                    .as_ref()
                    .map(|k| k.expose().as_str())
                    .unwrap_or(""),
            ),
        }
    }
}

fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn slack_payload(n: &Notification) -> Value {
    let icon = match n.severity {
        cd_core::Severity::Critical => ":rotating_light:",
        cd_core::Severity::Error => ":x:",
        cd_core::Severity::Warning => ":warning:",
        cd_core::Severity::Info => ":information_source:",
    };
    let mut context = vec![format!("*severity* {}", n.severity)];
    for (k, v) in [
        ("pipeline", &n.pipeline),
        ("release", &n.release),
        ("environment", &n.environment),
        ("node", &n.node),
        ("run", &n.run_id),
    ] {
        if let Some(v) = v {
            context.push(format!("*{k}* {}", slack_escape(v)));
        }
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": truncate(&n.title, 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&format!("{icon} {}", slack_escape(&n.summary)), 3000)}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": context.join("  ·  ")}]}),
    ];
    if !n.links.is_empty() {
        let links = n
            .links
            .iter()
            .map(|l| format!("<{}>", slack_escape(l)))
            .collect::<Vec<_>>()
            .join("  ");
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": links}}));
    }
    json!({
        "text": format!("{icon} {}", slack_escape(&n.title)),
        "blocks": blocks,
    })
}

fn pagerduty_payload(n: &Notification, routing_key: &str) -> Value {
    let action = match n.kind {
        NotificationKind::IncidentResolved => "resolve",
        NotificationKind::IncidentAcknowledged => "acknowledge",
        _ => "trigger",
    };
    if action != "trigger" {
        return json!({
            "routing_key": routing_key,
            "event_action": action,
            "dedup_key": n.dedup_key,
        });
    }
    let mut details = serde_json::Map::new();
    details.insert("summary".into(), json!(n.summary));
    for (k, v) in [
        ("run_id", &n.run_id),
        ("pipeline", &n.pipeline),
        ("release", &n.release),
        ("environment", &n.environment),
        ("node", &n.node),
    ] {
        if let Some(v) = v {
            details.insert(k.into(), json!(v));
        }
    }
    if let Some(i) = &n.incident {
        details.insert("incident".into(), json!(i.id));
    }
    let mut payload = json!({
        "summary": truncate(&n.title, 1024),
        "source": n.environment.clone().unwrap_or_else(|| "cd".into()),
        "severity": n.severity.as_str(),
        "timestamp": n.at.to_rfc3339(),
        "class": n.kind.as_str(),
        "custom_details": details,
    });
    if let Some(p) = &n.pipeline {
        payload["component"] = json!(p);
    }
    if let Some(e) = &n.environment {
        payload["group"] = json!(e);
    }
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": n.dedup_key,
        "client": "cd",
        "payload": payload,
        "links": n.links.iter().map(|l| json!({"href": l, "text": l})).collect::<Vec<_>>(),
    })
}

#[async_trait]
impl Notifier for WebhookNotifier {
    fn name(&self) -> String {
        let place = match Url::parse(self.url.expose()) {
            Ok(u) => format!("{}://{}", u.scheme(), u.host_header()),
            Err(_) => "(invalid URL)".into(),
        };
        format!("{} {place}", self.format.as_str())
    }

    async fn send(&self, n: &Notification) -> Result<()> {
        let redactor = self.redactor();
        let name = self.name();
        let fail = |kind: ErrorKind, msg: String| {
            Error::new(kind, redactor.scrub(&format!("{name}: {msg}")))
                .with("notifier", &name)
                .retryable(kind.is_retryable_by_default())
        };
        let url = Url::parse(self.url.expose())
            .map_err(|e| fail(ErrorKind::Invalid, format!("bad URL: {e}")))?;
        let body = serde_json::to_vec(&self.payload(n))
            .map_err(|e| fail(ErrorKind::Invalid, e.to_string()))?;
        let mut req = Request::post(url, body).header("Content-Type", "application/json");
        if let Some(t) = &self.bearer {
            req = req.header("Authorization", format!("Bearer {}", t.expose()));
        }
        let resp = self
            .client()?
            .send(&req)
            .await
            .map_err(|e| fail(e.kind(), e.to_string()))?;
        if resp.is_success() {
            return Ok(());
        }
        let text = crate::check::excerpt(&resp.text());
        let kind = match resp.status {
            408 | 429 | 500..=599 => ErrorKind::Unavailable,
            _ => ErrorKind::Invalid,
        };
        Err(fail(kind, format!("HTTP {} (body: {text})", resp.status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cd_core::{IncidentRecord, Severity};

    fn incident() -> IncidentRecord {
        IncidentRecord::open(
            "v2 is not healthy <after> deployment",
            "error_rate: 7.5% > 1% & rising",
            Severity::Critical,
        )
        .environment("production")
        .pipeline("web")
        .release("v2")
        .link("http://grafana/d/1")
    }

    #[test]
    fn pagerduty_trigger_and_resolve_share_the_dedup_key() {
        let pd = WebhookNotifier::pagerduty(Secret::new("KEY123".into()));
        let i = incident();
        let open = pd.payload(&Notification::for_incident(
            NotificationKind::IncidentOpened,
            &i,
        ));
        assert_eq!(open["event_action"], "trigger");
        assert_eq!(open["routing_key"], "KEY123");
        assert_eq!(open["payload"]["severity"], "critical");
        assert_eq!(open["payload"]["source"], "production");
        assert_eq!(open["payload"]["component"], "web");
        assert_eq!(open["links"][0]["href"], "http://grafana/d/1");
        let resolve = pd.payload(&Notification::for_incident(
            NotificationKind::IncidentResolved,
            &i,
        ));
        assert_eq!(resolve["event_action"], "resolve");
        assert_eq!(resolve["dedup_key"], open["dedup_key"]);
        assert!(resolve.get("payload").is_none());
    }

    #[test]
    fn slack_text_is_escaped_and_the_name_hides_the_token() {
        let slack = WebhookNotifier::slack(Secret::new(
            "https://hooks.slack.com/services/T000/B000/SECRETTOKEN".into(),
        ));
        assert_eq!(slack.name(), "slack https://hooks.slack.com");
        assert!(!format!("{slack:?}").contains("SECRETTOKEN"));
        let p = slack.payload(&Notification::for_incident(
            NotificationKind::IncidentOpened,
            &incident(),
        ));
        let section = p["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(section.contains("7.5% &gt; 1% &amp; rising"), "{section}");
        assert!(p["text"].as_str().unwrap().contains("&lt;after&gt;"));
    }

    #[tokio::test]
    async fn errors_hold_no_secret_and_say_whether_to_retry() {
        let (_held, port) = crate::test_server::refused_port();
        let n = WebhookNotifier::slack(Secret::new(format!(
            "http://127.0.0.1:{port}/services/T000/B000/SECRETTOKEN"
        )));
        let err = n
            .send(&Notification::for_incident(
                NotificationKind::IncidentOpened,
                &incident(),
            ))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        let all = format!("{err} {err:?}");
        assert!(!all.contains("SECRETTOKEN"), "{all}");
        assert!(all.contains("slack http://127.0.0.1"), "{all}");

        let server = crate::test_server::TestServer::start(|_| {
            crate::test_server::TestResponse::new(400, "invalid routing key")
        })
        .await;
        let pd = WebhookNotifier::pagerduty(Secret::new("KEY123".into()))
            .url(Secret::new(server.url("/v2/enqueue")));
        let err = pd
            .send(&Notification::for_incident(
                NotificationKind::IncidentOpened,
                &incident(),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("HTTP 400"), "{err}");
    }
}
