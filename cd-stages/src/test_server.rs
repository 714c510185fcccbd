//! A tiny HTTP/1.1 server for the crate's unit tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

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
    headers: Vec<(String, String)>,
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
            headers: Vec::new(),
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

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Waits before answering.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
}

type Handler = dyn Fn(&TestRequest) -> TestResponse + Send + Sync;

/// A port nothing listens on, held for as long as the returned socket
/// lives (bound, never listening: connections are refused), so no other
/// test can take it meanwhile.
pub fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by
/// it, made fresh for a test (rcgen).
pub struct TestPki {
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
    /// The server's TLS configuration (HTTP/1.1 by ALPN).
    pub server: Arc<rustls::ServerConfig>,
}

impl TestPki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "cd test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        TestPki {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }
}

/// A running test server; stops when dropped.
pub struct TestServer {
    scheme: &'static str,
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
        Self::start_with(handler, None).await
    }

    /// The same server behind TLS (`https://127.0.0.1:<port>`).
    pub async fn start_tls(
        handler: impl Fn(&TestRequest) -> TestResponse + Send + Sync + 'static,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self::start_with(handler, Some(tls)).await
    }

    async fn start_with(
        handler: impl Fn(&TestRequest) -> TestResponse + Send + Sync + 'static,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
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
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => {
                            let _ = serve(stream, handler).await;
                        }
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = serve(tls, handler).await;
                            }
                        }
                    }
                });
            }
        });
        TestServer {
            scheme,
            port,
            connections,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    handler: Arc<Handler>,
) -> std::io::Result<()> {
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
        for (k, v) in &resp.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
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
