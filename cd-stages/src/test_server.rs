//! A tiny HTTP/1.1 server for the crate's unit tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the test server saw it.
#[derive(Debug, Clone)]
pub struct TestRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// What the test server answers.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: u16,
    pub body: Vec<u8>,
    chunks: Option<Vec<Vec<u8>>>,
    close_delimited: bool,
    silently_close: bool,
    delay: Option<Duration>,
}

impl TestResponse {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        TestResponse {
            status,
            body: body.into(),
            chunks: None,
            close_delimited: false,
            silently_close: false,
            delay: None,
        }
    }

    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::new(200, body)
    }

    /// Sends the body in these chunks (`Transfer-Encoding: chunked`).
    pub fn chunked(mut self, chunks: Vec<&str>) -> Self {
        self.chunks = Some(chunks.into_iter().map(|c| c.as_bytes().to_vec()).collect());
        self
    }

    /// No length: the body ends when the connection closes.
    pub fn close_delimited(mut self) -> Self {
        self.close_delimited = true;
        self
    }

    /// Closes the connection after the response without `Connection: close`.
    pub fn silently_close(mut self) -> Self {
        self.silently_close = true;
        self
    }

    /// Waits before answering.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
}

type Handler = dyn Fn(&TestRequest) -> TestResponse + Send + Sync;

/// A running test server; stops when dropped.
pub struct TestServer {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start(
        handler: impl Fn(&TestRequest) -> TestResponse + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, handler).await;
                });
            }
        });
        TestServer {
            port,
            connections,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, handler: Arc<Handler>) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read one request head.
        let (req, consumed) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = parsed.parse(&buf) {
                let len = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                let method = parsed.method.unwrap_or("").to_string();
                let path = parsed.path.unwrap_or("").to_string();
                while buf.len() < n + len {
                    let mut chunk = [0u8; 4096];
                    let r = stream.read(&mut chunk).await?;
                    if r == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..r]);
                }
                let body = buf[n..n + len].to_vec();
                break (TestRequest { method, path, body }, n + len);
            }
            let mut chunk = [0u8; 4096];
            let r = stream.read(&mut chunk).await?;
            if r == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..r]);
        };
        buf.drain(..consumed);
        let resp = handler(&req);
        if let Some(d) = resp.delay {
            tokio::time::sleep(d).await;
        }
        let mut out = format!("HTTP/1.1 {} X\r\n", resp.status).into_bytes();
        if let Some(chunks) = &resp.chunks {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        } else if resp.close_delimited {
            out.extend_from_slice(b"Connection: close\r\n\r\n");
            out.extend_from_slice(&resp.body);
        } else {
            out.extend_from_slice(
                format!("Content-Length: {}\r\n\r\n", resp.body.len()).as_bytes(),
            );
            if req.method != "HEAD" {
                out.extend_from_slice(&resp.body);
            }
        }
        stream.write_all(&out).await?;
        if resp.close_delimited || resp.silently_close {
            stream.shutdown().await?;
            return Ok(());
        }
    }
}
