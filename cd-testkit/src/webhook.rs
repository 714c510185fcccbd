//! A webhook receiver on loopback: a real HTTP server (hyper) that records
//! every request and can be told to fail the first ones or to never answer.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path and query.
    pub path: String,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` if it is not JSON).
    pub json: serde_json::Value,
    /// The status the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    hits: AtomicUsize,
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// 500 for the first `n` requests, then 202.
    FailFirst(usize),
    /// Accepts connections and never answers.
    Hang,
}

/// A running receiver; stops when dropped.
pub struct WebhookReceiver {
    port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookReceiver {
    /// Starts a receiver answering 202 to everything.
    pub async fn start() -> Self {
        Self::with(Behaviour::FailFirst(0)).await
    }

    /// Starts a receiver that behaves as told.
    pub async fn with(behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let n = st.hits.fetch_add(1, Ordering::SeqCst);
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_string(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = match behaviour {
                                Behaviour::Hang => {
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                                Behaviour::FailFirst(k) if n < k => 500,
                                Behaviour::FailFirst(_) => 202,
                            };
                            st.received.lock().unwrap().push(Received {
                                path,
                                headers,
                                json: serde_json::from_slice(&body)
                                    .unwrap_or(serde_json::Value::Null),
                                status,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(
                                br#"{"status":"success"}"#,
                            )));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        WebhookReceiver { port, state, task }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests answered so far (any status), in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Requests that came in, answered or not.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the answered requests, or `deadline`
    /// passes (then returns what there is).
    pub async fn wait_for(
        &self,
        deadline: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let received = || async {
            let got = self.received();
            pred(&got).then_some(got)
        };
        match crate::eventually(deadline, received).await {
            Ok(got) => got,
            Err(()) => self.received(),
        }
    }
}
