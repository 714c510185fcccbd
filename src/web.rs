//! The web console (feature `web`): an [`axum::Router`] a host application
//! mounts (or `cdctl serve` serves) over any [`Store`].
//!
//! Pages, rendered on the server (maud templates: every value is HTML-
//! escaped), no JavaScript:
//!
//! | path | what |
//! |---|---|
//! | `GET /login`, `POST /login` | sign in with an API token (`cdctl token create`) |
//! | `GET /` | runs, newest first (`?env=production&status=failed`) |
//! | `GET /runs/{id}` | a run: its DAG as SVG (statuses, durations), nodes, events, the load-test latency distribution when there is one |
//! | `GET /runs/{id}/graph.svg` | the DAG alone |
//! | `GET /environments` | each environment's release history and lock |
//! | `GET /approvals` | approval gates waiting, with Approve / Reject forms |
//! | `POST /approvals/{run}/{node}` | a decision (form: `csrf`, `decision`, `comment`, `decision_id`) |
//! | `POST /logout` | end the session |
//!
//! JSON API (with `Authorization: Bearer <token>`): `GET /api/runs`,
//! `GET /api/runs/{id}`, `GET /api/approvals`, `POST
//! /api/approvals/{run}/{node}` with `{"decision": "approve"|"reject",
//! "comment": "...", "decision_id": "..."}`.
//!
//! Security: sessions are random 128-bit ids in an `HttpOnly; SameSite=
//! Strict` cookie (`Secure` with [`Console::secure_cookies`]), kept in
//! memory for 8 hours and ended when their token is revoked or expires;
//! every form carries the session's CSRF token (compared in constant time)
//! and a one-time decision id (a replayed form is refused); decisions go
//! through [`cd_core::approval::record_decision`], so the console refuses
//! exactly what `cdctl` refuses, with the same messages, and records the
//! remote address. Every response has a strict Content-Security-Policy
//! (no scripts), `X-Frame-Options: DENY`, `X-Content-Type-Options:
//! nosniff` and `Referrer-Policy: no-referrer`.
//!
//! The remote address comes from axum's `ConnectInfo<SocketAddr>`: serve
//! with `into_make_service_with_connect_info::<SocketAddr>()` ([`serve`]
//! does).
//!
//! ```no_run
//! use std::sync::Arc;
//! # async fn f() -> anyhow::Result<()> {
//! let store = Arc::new(cd::backends::sqlite::SqliteStore::open(".cd/state.db").await?);
//! let app = cd::web::Console::new(store).router();
//! // Mount it under your own router, or serve it:
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cd_core::approval::{self, Actor, DecisionRequest};
use cd_core::{Decision, ErrorKind, EventKind, NodeRecord, NodeStatus, RunStatus, Store};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use serde_json::{json, Value};

const COOKIE: &str = "cd_session";
const SESSION_HOURS: i64 = 8;

#[derive(Debug, Clone)]
struct Session {
    identity: String,
    token_id: String,
    csrf: String,
    expires: DateTime<Utc>,
    /// A message for the next page (ok, text), kept on the server so a
    /// link cannot put words in the console's mouth.
    flash: Option<(bool, String)>,
}

struct Inner {
    store: Arc<dyn Store>,
    sessions: Mutex<HashMap<String, Session>>,
    secure: bool,
}

/// The console: build it over a store, then take its [`Console::router`].
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("secure_cookies", &self.inner.secure)
            .finish()
    }
}

fn random_id() -> String {
    approval::random_hex(32)
}

/// The remote address of a request, as the audit trail shows it.
#[derive(Debug, Clone)]
struct Remote(String);

impl Console {
    /// A console over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Console {
            inner: Arc::new(Inner {
                store,
                sessions: Mutex::new(HashMap::new()),
                secure: false,
            }),
        }
    }

    /// Marks the session cookie `Secure` (serve over HTTPS, or behind a
    /// TLS-terminating proxy).
    pub fn secure_cookies(self, yes: bool) -> Self {
        let inner = Inner {
            store: self.inner.store.clone(),
            sessions: Mutex::new(HashMap::new()),
            secure: yes,
        };
        Console {
            inner: Arc::new(inner),
        }
    }

    /// The routes (see the [module docs](self)).
    pub fn router(self) -> Router {
        Router::new()
            .route("/login", get(login_page).post(login))
            .route("/logout", post(logout))
            .route("/", get(runs_page))
            .route("/runs/{id}", get(run_page))
            .route("/runs/{id}/graph.svg", get(graph_svg))
            .route("/environments", get(environments_page))
            .route("/approvals", get(approvals_page))
            .route("/approvals/{run}/{node}", post(decide_form))
            .route("/api/runs", get(api_runs))
            .route("/api/runs/{id}", get(api_run))
            .route("/api/approvals", get(api_approvals))
            .route("/api/approvals/{run}/{node}", post(api_decide))
            .layer(axum::middleware::from_fn(guard))
            .with_state(self)
    }

    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match sessions.get(&id) {
            Some(s) if s.expires > Utc::now() => Some((id, s.clone())),
            Some(_) => {
                sessions.remove(&id);
                None
            }
            None => None,
        }
    }

    fn set_flash(&self, id: &str, ok: bool, text: String) {
        if let Some(s) = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            s.flash = Some((ok, text));
        }
    }

    fn take_flash(&self, id: &str) -> Option<(bool, String)> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
            .and_then(|s| s.flash.take())
    }

    /// The signed-in person, re-checking their token (revoked or expired
    /// ends the session).
    async fn actor(&self, headers: &HeaderMap, remote: &Remote) -> Option<SignedIn> {
        let (id, s) = self.session(headers)?;
        let ok = match self.inner.store.token(&s.token_id).await {
            Ok(Some(t)) => t.revoked_at.is_none() && t.expires_at.is_none_or(|e| e > Utc::now()),
            _ => false,
        };
        if !ok {
            self.inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return None;
        }
        let actor = Actor {
            identity: s.identity.clone(),
            token_id: Some(s.token_id.clone()),
            via: format!("http {}", remote.0),
        };
        Some(SignedIn {
            id,
            session: s,
            actor,
        })
    }
}

/// Serves `console` on `listener` with remote addresses (until the task is
/// dropped).
pub async fn serve(listener: tokio::net::TcpListener, console: Console) -> std::io::Result<()> {
    axum::serve(
        listener,
        console
            .router()
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// Security headers on every response; the remote address for handlers.
async fn guard(mut req: Request, next: Next) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    req.extensions_mut().insert(Remote(remote));
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn remote_of(req_ext: &axum::http::Extensions) -> Remote {
    req_ext
        .get::<Remote>()
        .cloned()
        .unwrap_or(Remote("unknown".into()))
}

/// A signed-in person: the session (id and contents) and the actor their
/// decisions are recorded as. Without one, pages send the browser to
/// `/login`.
struct SignedIn {
    id: String,
    session: Session,
    actor: Actor,
}

impl axum::extract::FromRequestParts<Console> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Console,
    ) -> std::result::Result<Self, Response> {
        let remote = remote_of(&parts.extensions);
        c.actor(&parts.headers, &remote).await.ok_or_else(to_login)
    }
}

/// The JSON API's caller, from `Authorization: Bearer <token>`; without a
/// valid token the request is answered with the JSON error.
struct ApiCaller(Actor);

impl axum::extract::FromRequestParts<Console> for ApiCaller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Console,
    ) -> std::result::Result<Self, Response> {
        let remote = remote_of(&parts.extensions);
        api_actor(c, &parts.headers, &remote).await.map(ApiCaller)
    }
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2433}\
header{background:#1d2433;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}\
header a{color:#cfe0ff;text-decoration:none}main{padding:1em 1.5em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #dde;padding:.3em .8em;text-align:left;vertical-align:top}\
.s-succeeded{color:#18794e}.s-failed,.s-rolled_back{color:#b42318}.s-waiting{color:#b54708}.s-running{color:#175cd3}\
.err{background:#fee4e2;border:1px solid #b42318;padding:.6em;margin:.6em 0}.ok{background:#dcfae6;border:1px solid #18794e;padding:.6em;margin:.6em 0}\
form.inline{display:inline}button{padding:.3em .9em;margin:.2em}.muted{color:#667085}code{background:#f2f4f7;padding:0 .2em}";

fn page(title: &str, who: Option<&Session>, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (title) " — cd" }
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    header {
                        strong { "cd" }
                        a href="/" { "Runs" }
                        a href="/environments" { "Environments" }
                        a href="/approvals" { "Approvals" }
                        @if let Some(s) = who {
                            span style="margin-left:auto" { "signed in as " strong { (s.identity) } }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

async fn login_page() -> Html<String> {
    page(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p.muted { "With your API token (" code { "cdctl token create <name>" } ")." }
            form method="post" action="/login" {
                input type="password" name="token" size="90" autocomplete="off" autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(c): State<Console>, Form(f): Form<LoginForm>) -> Response {
    let actor = match approval::authenticate(c.inner.store.as_ref(), Some(&f.token), "http").await {
        Ok(a) => a,
        Err(e) => {
            let msg = e.to_string();
            return (
                StatusCode::UNAUTHORIZED,
                page(
                    "Sign in",
                    None,
                    html! {
                        h1 { "Sign in" }
                        div.err { (msg) }
                        form method="post" action="/login" {
                            input type="password" name="token" size="90" autocomplete="off";
                            button type="submit" { "Sign in" }
                        }
                    },
                ),
            )
                .into_response();
        }
    };
    let id = random_id();
    let session = Session {
        identity: actor.identity,
        token_id: actor.token_id.unwrap_or_default(),
        csrf: random_id(),
        expires: Utc::now() + chrono::Duration::hours(SESSION_HOURS),
        flash: None,
    };
    c.inner
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), session);
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_HOURS * 3600,
        if c.inner.secure { "; Secure" } else { "" }
    );
    let mut res = Redirect::to("/approvals").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

fn csrf_ok(s: &Session, given: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(s.csrf.as_bytes(), given.as_bytes()).into()
}

async fn logout(State(c): State<Console>, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Some((id, s)) = c.session(&headers) {
        if csrf_ok(&s, &f.csrf) {
            c.inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
    let mut res = to_login();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("cd_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    res
}

#[derive(Deserialize, Default)]
struct RunsQuery {
    env: Option<String>,
    status: Option<String>,
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn duration(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => {
            let ms = (b - a).num_milliseconds().max(0);
            if ms < 1000 {
                format!("{ms} ms")
            } else {
                format!("{:.1} s", ms as f64 / 1000.0)
            }
        }
        _ => String::new(),
    }
}

async fn runs_page(
    State(c): State<Console>,
    SignedIn { session: s, .. }: SignedIn,
    Query(q): Query<RunsQuery>,
) -> Response {
    let runs = c.inner.store.list_runs(200).await.unwrap_or_default();
    let runs: Vec<_> = runs
        .into_iter()
        .filter(|r| {
            q.env
                .as_deref()
                .is_none_or(|e| e.is_empty() || r.environment == e)
        })
        .filter(|r| {
            q.status
                .as_deref()
                .is_none_or(|st| st.is_empty() || r.status.as_str() == st)
        })
        .collect();
    page(
        "Runs",
        Some(&s),
        html! {
            h1 { "Runs" }
            form method="get" action="/" {
                "environment " input name="env" value=(q.env.clone().unwrap_or_default());
                " status "
                select name="status" {
                    option value="" { "any" }
                    @for st in ["running", "succeeded", "failed", "rolled_back", "cancelled", "abandoned"] {
                        option value=(st) selected[q.status.as_deref() == Some(st)] { (st) }
                    }
                }
                button type="submit" { "Filter" }
            }
            table {
                tr { th { "run" } th { "pipeline" } th { "release" } th { "environment" } th { "status" } th { "started" } th { "by" } }
                @for r in &runs {
                    tr {
                        td { a href={ "/runs/" (r.id) } { code { (r.id.get(..8).unwrap_or(&r.id)) } } }
                        td { (r.pipeline) }
                        td { (r.release.version) }
                        td { (r.environment) }
                        td class={ "s-" (r.status.as_str()) } { (r.status.as_str()) }
                        td { (time(r.started_at)) }
                        td { (r.started_by) }
                    }
                }
            }
            @if runs.is_empty() { p.muted { "No runs." } }
        },
    )
    .into_response()
}

/// The run's graph from its `pipeline_graph` event, else its nodes in
/// order without edges.
async fn graph_of(
    store: &dyn Store,
    run_id: &str,
    nodes: &[NodeRecord],
) -> Vec<(String, String, bool, Vec<String>)> {
    let events = store.events(run_id, 0, 50).await.unwrap_or_default();
    for e in &events {
        if let EventKind::Custom { name, data } = &e.kind {
            if name == cd_core::runner::GRAPH_EVENT {
                return data["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| {
                        (
                            n["name"].as_str().unwrap_or("").to_string(),
                            n["kind"].as_str().unwrap_or("").to_string(),
                            n["gate"].as_bool().unwrap_or(false),
                            n["needs"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect(),
                        )
                    })
                    .collect();
            }
        }
    }
    nodes
        .iter()
        .map(|n| (n.node.to_string(), String::new(), false, Vec::new()))
        .collect()
}

fn status_color(s: Option<NodeStatus>) -> (&'static str, &'static str) {
    match s {
        Some(NodeStatus::Succeeded) => ("#dcfae6", "#18794e"),
        Some(NodeStatus::Failed) | Some(NodeStatus::RolledBack) => ("#fee4e2", "#b42318"),
        Some(NodeStatus::Waiting) => ("#fef0c7", "#b54708"),
        Some(NodeStatus::Running) => ("#d1e9ff", "#175cd3"),
        Some(NodeStatus::Skipped) | Some(NodeStatus::Cancelled) => ("#f2f4f7", "#98a2b3"),
        _ => ("#ffffff", "#667085"),
    }
}

/// The DAG as SVG: one column per depth, nodes coloured by status with
/// their duration; edges from each dependency.
fn graph_markup(graph: &[(String, String, bool, Vec<String>)], nodes: &[NodeRecord]) -> Markup {
    let index: BTreeMap<&str, usize> = graph
        .iter()
        .enumerate()
        .map(|(i, g)| (g.0.as_str(), i))
        .collect();
    let mut depth = vec![0usize; graph.len()];
    for _ in 0..graph.len() {
        for (i, g) in graph.iter().enumerate() {
            for d in &g.3 {
                if let Some(&j) = index.get(d.as_str()) {
                    depth[i] = depth[i].max(depth[j] + 1);
                }
            }
        }
    }
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pos = vec![(0usize, 0usize); graph.len()];
    for i in 0..graph.len() {
        let r = rows.entry(depth[i]).or_default();
        pos[i] = (depth[i], *r);
        *r += 1;
    }
    let (w, h, gx, gy) = (170usize, 50usize, 40usize, 18usize);
    let cols = depth.iter().max().map_or(1, |d| d + 1);
    let maxrows = rows.values().max().copied().unwrap_or(1);
    let width = cols * (w + gx) + gx;
    let height = maxrows * (h + gy) + gy;
    let xy = |i: usize| (gx + pos[i].0 * (w + gx), gy + pos[i].1 * (h + gy));
    let by_name: BTreeMap<&str, &NodeRecord> = nodes.iter().map(|n| (&*n.node, n)).collect();
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(width) height=(height) viewBox={ "0 0 " (width) " " (height) } role="img" aria-label="pipeline graph" {
            @for (i, g) in graph.iter().enumerate() {
                @for d in &g.3 {
                    @if let Some(&j) = index.get(d.as_str()) {
                        @let (x1, y1) = xy(j);
                        @let (x2, y2) = xy(i);
                        line x1=(x1 + w) y1=(y1 + h / 2) x2=(x2) y2=(y2 + h / 2) stroke="#98a2b3" stroke-width="1.5" {}
                    }
                }
            }
            @for (i, g) in graph.iter().enumerate() {
                @let n = by_name.get(g.0.as_str());
                @let status = n.map(|n| n.status);
                @let (fill, stroke) = status_color(status);
                @let (x, y) = xy(i);
                g {
                    rect x=(x) y=(y) width=(w) height=(h) rx=(if g.2 { 18 } else { 6 }) fill=(fill) stroke=(stroke) stroke-width="1.5" {}
                    text x=(x + 10) y=(y + 20) font-size="13" font-weight="600" fill="#1d2433" { (g.0) }
                    text x=(x + 10) y=(y + 38) font-size="11" fill=(stroke) {
                        (status.map(|s| s.as_str()).unwrap_or("pending"))
                        @if let Some(n) = n { " " (duration(n.started_at, n.finished_at)) }
                    }
                }
            }
        }
    }
}

async fn graph_svg(
    State(c): State<Console>,
    signed_in: std::result::Result<SignedIn, Response>,
    Path(id): Path<String>,
) -> Response {
    if signed_in.is_err() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let nodes = c.inner.store.nodes(&id).await.unwrap_or_default();
    let graph = graph_of(c.inner.store.as_ref(), &id, &nodes).await;
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        graph_markup(&graph, &nodes).into_string(),
    )
        .into_response()
}

/// A latency distribution (percentile, ms) as horizontal bars.
fn distribution_markup(node: &str, out: &Value) -> Markup {
    let points: Vec<(f64, f64)> = out["distribution"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
        .collect();
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(0.001);
    html! {
        h3 { "Load test " code { (node) } ": " (out["requests"]) " requests, " (out["rps"]) " rps, p99 " (out["p99_ms"]) " ms" }
        svg xmlns="http://www.w3.org/2000/svg" width="520" height=(points.len() * 22 + 10) role="img" aria-label="latency distribution" {
            @for (i, (p, ms)) in points.iter().enumerate() {
                text x="0" y=(i * 22 + 16) font-size="12" { "p" (p) }
                rect x="60" y=(i * 22 + 4) height="16" width=(((ms / max) * 380.0).max(1.0) as u32) fill="#84adff" {}
                text x=(((ms / max) * 380.0) as u32 + 66) y=(i * 22 + 16) font-size="12" { (format!("{ms:.2} ms")) }
            }
        }
    }
}

async fn run_page(
    State(c): State<Console>,
    SignedIn { session: s, .. }: SignedIn,
    Path(id): Path<String>,
) -> Response {
    let store = c.inner.store.as_ref();
    let Some(run) = store.get_run(&id).await.ok().flatten() else {
        return (
            StatusCode::NOT_FOUND,
            page(
                "Not found",
                Some(&s),
                html! { h1 { "No run " code { (id) } } },
            ),
        )
            .into_response();
    };
    let nodes = store.nodes(&id).await.unwrap_or_default();
    let graph = graph_of(store, &id, &nodes).await;
    let events = store.events(&id, 0, 10_000).await.unwrap_or_default();
    let shown: Vec<_> = events.iter().rev().take(200).collect();
    let loads: Vec<(&str, &Value)> = nodes
        .iter()
        .filter_map(|n| {
            let o = n.output.as_ref()?;
            (o.get("distribution").is_some() && o.get("p99_ms").is_some()).then_some((&*n.node, o))
        })
        .collect();
    page(
        &format!("Run {}", run.id),
        Some(&s),
        html! {
            h1 { (run.pipeline) " " (run.release.version) " → " (run.environment) }
            p {
                "run " code { (run.id) } " · "
                span class={ "s-" (run.status.as_str()) } { (run.status.as_str()) }
                " · started " (time(run.started_at)) " by " (run.started_by)
                @if let Some(f) = run.finished_at { " · finished " (time(f)) }
            }
            (graph_markup(&graph, &nodes))
            h2 { "Nodes" }
            table {
                tr { th { "node" } th { "status" } th { "attempts" } th { "duration" } th { "error" } }
                @for n in &nodes {
                    tr {
                        td { (n.node) }
                        td class={ "s-" (n.status.as_str()) } { (n.status.as_str()) }
                        td { (n.attempts) }
                        td { (duration(n.started_at, n.finished_at)) }
                        td { @if let Some(e) = &n.error { (e.message) } }
                    }
                }
            }
            @for (node, out) in &loads { (distribution_markup(node, out)) }
            h2 { "Events" }
            table {
                @for e in &shown {
                    tr { td { code { (e.to_string()) } } }
                }
            }
        },
    )
    .into_response()
}

async fn environments_page(
    State(c): State<Console>,
    SignedIn { session: s, .. }: SignedIn,
) -> Response {
    let store = c.inner.store.as_ref();
    let runs = store.list_runs(500).await.unwrap_or_default();
    let mut envs: Vec<String> = runs.iter().map(|r| r.environment.clone()).collect();
    envs.sort();
    envs.dedup();
    let locks = store.locks().await.unwrap_or_default();
    let mut sections = Vec::new();
    for env in &envs {
        sections.push((
            env.clone(),
            store.release_history(env, 20).await.unwrap_or_default(),
        ));
    }
    page(
        "Environments",
        Some(&s),
        html! {
            h1 { "Environments" }
            @for (env, history) in &sections {
                h2 { (env) }
                @if let Some(l) = locks.iter().find(|l| &l.environment == env) {
                    p.err { "locked by " (l.holder) ": " (l.message) " (until " (time(l.expires_at)) ")" }
                }
                table {
                    tr { th { "version" } th { "status" } th { "at" } th { "by" } th { "run" } }
                    @for r in history {
                        tr {
                            td { (r.version) }
                            td { (r.status.as_str()) }
                            td { (time(r.at)) }
                            td { (r.actor) }
                            td { @if let Some(run) = &r.run_id { a href={ "/runs/" (run) } { code { (run.get(..8).unwrap_or(run)) } } } }
                        }
                    }
                }
                @if history.is_empty() { p.muted { "No release recorded." } }
            }
        },
    )
    .into_response()
}

/// Approval requests whose run is running and whose node waits.
async fn pending(store: &dyn Store) -> Vec<approval::ApprovalRequest> {
    let mut out = Vec::new();
    for r in store.approval_requests(200).await.unwrap_or_default() {
        let Ok(Some(run)) = store.get_run(&r.run_id).await else {
            continue;
        };
        if run.status != RunStatus::Running || run.definition_hash != r.definition_hash {
            continue;
        }
        let waiting = store
            .nodes(&r.run_id)
            .await
            .unwrap_or_default()
            .iter()
            .any(|n| {
                *n.node == *r.node && matches!(n.status, NodeStatus::Waiting | NodeStatus::Running)
            });
        if waiting {
            out.push(r);
        }
    }
    out
}

async fn approvals_page(
    State(c): State<Console>,
    SignedIn { session: s, id, .. }: SignedIn,
) -> Response {
    let flash = c.take_flash(&id);
    let store = c.inner.store.as_ref();
    let list = pending(store).await;
    let mut rows = Vec::new();
    for r in list {
        let records = store
            .approvals(&r.run_id, &r.node)
            .await
            .unwrap_or_default();
        let may = r.check_eligible(&s.identity);
        rows.push((r.clone(), r.tally(&records), may));
    }
    page(
        "Approvals",
        Some(&s),
        html! {
            h1 { "Waiting for approval" }
            @if let Some((ok, m)) = &flash {
                @if *ok { div.ok { (m) } } @else { div.err { (m) } }
            }
            @if rows.is_empty() { p.muted { "Nothing is waiting for a decision." } }
            @for (r, tally, may) in &rows {
                section style="border:1px solid #dde;padding:.8em;margin:.8em 0" {
                    h2 { (r.pipeline) " " (r.release) " → " (r.environment) " · " code { (r.node) } }
                    p { "run " a href={ "/runs/" (r.run_id) } { code { (r.run_id) } } }
                    p { "who may decide: " (r.who()) }
                    @if let approval::Tally::Waiting { approved, missing } = tally {
                        p { "still needed: " (missing) @if !approved.is_empty() { " · approved so far by " (approved.join(", ")) } }
                    }
                    @if let Some(at) = r.expires_at { p { "expires " (time(at)) } }
                    @match may {
                        Ok(()) => {
                            form method="post" action={ "/approvals/" (segment(&r.run_id)) "/" (segment(&r.node)) } {
                                input type="hidden" name="csrf" value=(s.csrf);
                                input type="hidden" name="decision_id" value=(random_id());
                                "comment " input name="comment" size="50" required[r.comment_required];
                                button type="submit" name="decision" value="approve" { "Approve" }
                                button type="submit" name="decision" value="reject" { "Reject" }
                            }
                        }
                        Err(why) => { p.muted { (why) } }
                    }
                }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: Option<String>,
    decision: String,
    comment: Option<String>,
    decision_id: Option<String>,
}

fn decision_of(s: &str) -> Option<Decision> {
    match s {
        "approve" => Some(Decision::Approve),
        "reject" => Some(Decision::Reject),
        _ => None,
    }
}

/// What must be percent-encoded in one URL path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// `s` as one URL path segment (`/`, `?`, `#`, `%`, spaces, ...
/// percent-encoded).
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

async fn decide_form(
    State(c): State<Console>,
    SignedIn {
        session: s,
        actor,
        id,
    }: SignedIn,
    Path((run, node)): Path<(String, String)>,
    Form(f): Form<DecideForm>,
) -> Response {
    if !f.csrf.as_deref().is_some_and(|t| csrf_ok(&s, t)) {
        return (
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                Some(&s),
                html! { h1 { "Refused" } div.err { "the form's CSRF token is missing or wrong: reload the page and decide again" } },
            ),
        )
            .into_response();
    }
    let Some(decision) = decision_of(&f.decision) else {
        c.set_flash(&id, false, format!("unknown decision {:?}", f.decision));
        return Redirect::to("/approvals").into_response();
    };
    let Some(decision_id) = f.decision_id.filter(|d| !d.is_empty()) else {
        c.set_flash(
            &id,
            false,
            "the form has no decision id: reload the page".into(),
        );
        return Redirect::to("/approvals").into_response();
    };
    let req = DecisionRequest {
        run_id: run,
        node,
        decision,
        comment: f.comment,
        decision_id,
    };
    match approval::record_decision(c.inner.store.as_ref(), &actor, &req).await {
        Ok(r) => c.set_flash(
            &id,
            true,
            format!(
                "{} {} `{}` of run {}",
                r.approver,
                match r.decision {
                    Decision::Approve => "approved",
                    Decision::Reject => "rejected",
                },
                r.node,
                r.run_id
            ),
        ),
        Err(e) => c.set_flash(&id, false, e.to_string()),
    }
    Redirect::to("/approvals").into_response()
}

/// The API's caller, from `Authorization: Bearer <token>`.
async fn api_actor(c: &Console, headers: &HeaderMap, remote: &Remote) -> Result<Actor, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    approval::authenticate(c.inner.store.as_ref(), token, &format!("http {}", remote.0))
        .await
        .map_err(|e| api_error(&e))
}

fn api_error(e: &cd_core::Error) -> Response {
    let status = match e.kind() {
        ErrorKind::Auth => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    // Not allowed to decide is 403, not 401: the caller is known.
    let status = if e.kind() == ErrorKind::Auth && e.message().contains("may not decide") {
        StatusCode::FORBIDDEN
    } else {
        status
    };
    (
        status,
        Json(json!({"error": e.kind().as_str(), "message": e.to_string()})),
    )
        .into_response()
}

async fn api_runs(State(c): State<Console>, _caller: ApiCaller) -> Response {
    match c.inner.store.list_runs(200).await {
        Ok(runs) => Json(runs).into_response(),
        Err(e) => api_error(&e),
    }
}

async fn api_run(State(c): State<Console>, _caller: ApiCaller, Path(id): Path<String>) -> Response {
    let store = c.inner.store.as_ref();
    match store.get_run(&id).await {
        Ok(Some(run)) => {
            let nodes = store.nodes(&id).await.unwrap_or_default();
            Json(json!({"run": run, "nodes": nodes})).into_response()
        }
        Ok(None) => api_error(&cd_core::Error::new(
            ErrorKind::NotFound,
            format!("no run {id}"),
        )),
        Err(e) => api_error(&e),
    }
}

async fn api_approvals(State(c): State<Console>, _caller: ApiCaller) -> Response {
    Json(pending(c.inner.store.as_ref()).await).into_response()
}

#[derive(Deserialize)]
struct ApiDecision {
    decision: String,
    comment: Option<String>,
    decision_id: String,
}

async fn api_decide(
    State(c): State<Console>,
    ApiCaller(actor): ApiCaller,
    Path((run, node)): Path<(String, String)>,
    Json(d): Json<ApiDecision>,
) -> Response {
    let Some(decision) = decision_of(&d.decision) else {
        return api_error(&cd_core::Error::invalid(
            "decision must be \"approve\" or \"reject\"",
        ));
    };
    let req = DecisionRequest {
        run_id: run,
        node,
        decision,
        comment: d.comment,
        decision_id: d.decision_id,
    };
    match approval::record_decision(c.inner.store.as_ref(), &actor, &req).await {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e) => api_error(&e),
    }
}
