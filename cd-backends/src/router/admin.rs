//! The router's admin API, so a router can run as a process of its own
//! (`cd-router`) that deploy processes drive, and [`RemoteRouter`], the
//! client a strategy uses in its place.
//!
//! Endpoints (JSON):
//! - `GET /weights` → `{"blue": 100, "green": 0}`;
//! - `PUT /weights` with `{"blue": 90, "green": 10}` → the new weights,
//!   after the upstreams that lost their share drained (`400` with
//!   `{"error": ...}` for weights that do not sum to 100 or name an unknown
//!   upstream);
//! - `GET /stats` → per upstream: weight, requests, errors, in flight,
//!   p50 and p99 in ms.
//!
//! The admin listener should stay on loopback: it has no authentication.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use async_trait::async_trait;
use cd_core::{DeployContext, Error, ErrorKind, Result, WeightedRouter};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::HttpRouter;

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn weights_json(router: &HttpRouter) -> serde_json::Value {
    let m: BTreeMap<String, u32> = router.weights().into_iter().collect();
    serde_json::json!(m)
}

async fn handle(router: HttpRouter, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/weights") => json(StatusCode::OK, weights_json(&router)),
        (Method::PUT, "/weights") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": e.to_string() }),
                    )
                }
            };
            let wanted: BTreeMap<String, u32> = match serde_json::from_slice(&body) {
                Ok(w) => w,
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": format!("weights must be a JSON object of percentages: {e}") }),
                    )
                }
            };
            let w: Vec<(&str, u32)> = wanted.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            if let Err(e) = router.set(&w) {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": e.message() }),
                );
            }
            router.drain().await;
            json(StatusCode::OK, weights_json(&router))
        }
        (Method::GET, "/stats") => {
            let stats: Vec<serde_json::Value> = router
                .stats()
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name, "weight": s.weight, "requests": s.requests,
                        "errors": s.errors, "in_flight": s.in_flight,
                        "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
                    })
                })
                .collect();
            json(StatusCode::OK, serde_json::json!(stats))
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "GET /weights, PUT /weights, GET /stats" }),
        ),
    }
}

impl HttpRouter {
    /// Serves the admin API on `listen` (keep it on loopback); returns the
    /// address bound. Runs until the router is dropped.
    ///
    /// Errors: [`ErrorKind::Conflict`] when the address is taken,
    /// [`ErrorKind::Invalid`] when it cannot be bound otherwise.
    pub async fn serve_admin(&self, listen: &str) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::AddrInUse {
                ErrorKind::Conflict
            } else {
                ErrorKind::Invalid
            };
            Error::new(kind, format!("router admin cannot listen on {listen}: {e}"))
                .with("address", listen)
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::invalid(format!("router admin address: {e}")))?;
        let weak = std::sync::Arc::downgrade(&self.shared);
        let stop = self._stop.clone();
        tokio::spawn(async move {
            let stop = std::sync::Arc::downgrade(&stop);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (Some(shared), Some(stop)) = (weak.upgrade(), stop.upgrade()) else {
                    return;
                };
                let router = HttpRouter {
                    shared,
                    _stop: stop,
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let router = router.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(router, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(addr)
    }
}

/// A router in another process, driven through its admin API: a
/// [`cd_core::Router`] and [`WeightedRouter`] for the strategies.
#[derive(Debug, Clone)]
pub struct RemoteRouter {
    admin: String,
    client: cd_stages::HttpClient,
}

impl RemoteRouter {
    /// The router whose admin API is at `admin` (`http://127.0.0.1:8081`).
    /// Requests time out after 60 s (a weight change waits for the drain).
    pub fn new(admin: impl Into<String>) -> Result<Self> {
        let client = cd_stages::HttpClient::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(RemoteRouter {
            admin: admin.into().trim_end_matches('/').to_string(),
            client,
        })
    }

    async fn call(
        &self,
        method: cd_stages::http::Method,
        body: Option<String>,
    ) -> Result<Vec<(String, u32)>> {
        let url = cd_stages::http::Url::parse(&format!("{}/weights", self.admin))?;
        let mut req = cd_stages::http::Request::new(method, url);
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = self.client.send(&req).await?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if !resp.is_success() {
            return Err(Error::new(
                if resp.status == 400 {
                    ErrorKind::Invalid
                } else {
                    ErrorKind::Unavailable
                },
                format!(
                    "router admin {}: {}",
                    self.admin,
                    v["error"].as_str().unwrap_or("no message")
                ),
            ));
        }
        let map: BTreeMap<String, u32> = serde_json::from_value(v).map_err(|e| {
            Error::unavailable(format!(
                "router admin {}: unexpected answer: {e}",
                self.admin
            ))
        })?;
        Ok(map.into_iter().collect())
    }
}

#[async_trait]
impl cd_core::Router for RemoteRouter {
    async fn active(&self) -> Result<Option<String>> {
        Ok(self
            .call(cd_stages::http::Method::Get, None)
            .await?
            .into_iter()
            .find(|(_, w)| *w == 100)
            .map(|(n, _)| n))
    }

    async fn switch(&self, slot: &str, cx: &DeployContext) -> Result<()> {
        self.set_weights(&[(slot.to_string(), 100)], cx).await
    }
}

#[async_trait]
impl WeightedRouter for RemoteRouter {
    async fn set_weights(&self, weights: &[(String, u32)], cx: &DeployContext) -> Result<()> {
        let body: BTreeMap<&str, u32> = weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        self.call(
            cd_stages::http::Method::Put,
            Some(serde_json::json!(body).to_string()),
        )
        .await?;
        cx.events.progress(
            None,
            "weights",
            "ok",
            None,
            Some(
                weights
                    .iter()
                    .map(|(n, w)| format!("{n} {w}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        );
        Ok(())
    }

    async fn weights(&self) -> Result<Vec<(String, u32)>> {
        self.call(cd_stages::http::Method::Get, None).await
    }
}
