//! A small, fast HTTP/1.1 client over tokio TCP for `http://` URLs.
//!
//! It does what delivery checks and the load generator need and no more:
//! `GET`/`POST`/`PUT`/`DELETE`/`HEAD`, keep-alive with a per-host pool,
//! `Content-Length`, chunked and read-to-close bodies, a per-request deadline
//! and a connect deadline. No TLS, no redirects, no compression.
//!
//! Every error names the URL it was about:
//!
//! ```
//! use cd_stages::http::{HttpClient, HttpError};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let client = HttpClient::new();
//! // Nothing listens on port 9 (discard) here.
//! let err = client.get("http://127.0.0.1:9/health").await.unwrap_err();
//! assert!(matches!(err, HttpError::Connect { .. }));
//! assert!(err.to_string().contains("http://127.0.0.1:9/health"));
//! # });
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Maximum size of a response head (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Maximum number of response headers.
const MAX_HEADERS: usize = 64;

/// What went wrong with a request. Every variant names the URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL could not be parsed or is not `http://`.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// No complete response before the deadline.
    #[error("{url}: no response within {} ms", after.as_millis())]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The connection failed while sending or receiving.
    #[error("{url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something that is not HTTP/1.x.
    #[error("{url}: malformed response: {reason}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl HttpError {
    /// The URL the error is about.
    pub fn url(&self) -> &str {
        match self {
            HttpError::InvalidUrl { url, .. }
            | HttpError::Connect { url, .. }
            | HttpError::Timeout { url, .. }
            | HttpError::Io { url, .. }
            | HttpError::Protocol { url, .. } => url,
        }
    }

    /// The [`cd_core::ErrorKind`] this error maps to: connection and I/O
    /// failures are `Unavailable` (retryable), deadlines `Timeout`, a bad URL
    /// `Invalid`, a malformed response `Failed`.
    pub fn kind(&self) -> cd_core::ErrorKind {
        match self {
            HttpError::InvalidUrl { .. } => cd_core::ErrorKind::Invalid,
            HttpError::Connect { .. } | HttpError::Io { .. } => cd_core::ErrorKind::Unavailable,
            HttpError::Timeout { .. } => cd_core::ErrorKind::Timeout,
            HttpError::Protocol { .. } => cd_core::ErrorKind::Failed,
        }
    }
}

impl From<HttpError> for cd_core::Error {
    fn from(e: HttpError) -> Self {
        let url = e.url().to_string();
        cd_core::Error::new(e.kind(), e.to_string())
            .with("url", url)
            .with_typed_source(e)
    }
}

/// A parsed `http://` URL: host, port and path with query.
///
/// ```
/// use cd_stages::http::Url;
/// let u: Url = "http://127.0.0.1:8080/api?x=1".parse().unwrap();
/// assert_eq!((u.host(), u.port(), u.path()), ("127.0.0.1", 8080, "/api?x=1"));
/// assert_eq!(u.join("/health").unwrap().to_string(), "http://127.0.0.1:8080/api/health");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url {
    host: String,
    port: u16,
    path: String,
}

impl Url {
    /// Parses an `http://host[:port][/path][?query]` URL. A missing scheme
    /// is taken as `http://`; `https://` is refused (no TLS yet).
    pub fn parse(s: &str) -> Result<Url, HttpError> {
        let invalid = |reason: &str| HttpError::InvalidUrl {
            url: s.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = s.trim();
        let rest = if let Some(i) = trimmed.find("://") {
            let scheme = &trimmed[..i];
            if scheme.eq_ignore_ascii_case("https") {
                return Err(invalid("https is not supported (no TLS); use http://"));
            }
            if !scheme.eq_ignore_ascii_case("http") {
                return Err(invalid("only http:// URLs are supported"));
            }
            &trimmed[i + 3..]
        } else {
            trimmed
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err(invalid("no host"));
        }
        if authority.contains('@') {
            return Err(invalid("user information in URLs is not supported"));
        }
        let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
            let end = stripped
                .find(']')
                .ok_or_else(|| invalid("unclosed `[` in IPv6 host"))?;
            let host = &stripped[..end];
            let after = &stripped[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(invalid("unexpected text after IPv6 host")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| invalid(&format!("bad port `{p}`")))?,
            None => 80,
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Url { host, port, path })
    }

    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (80 when the URL gives none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path with the query, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host:port`, as used to connect (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The value of the `Host` header (the port only when it is not 80).
    pub fn host_header(&self) -> String {
        if self.port == 80 {
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            }
        } else {
            self.authority()
        }
    }

    /// Resolves `path_or_url` against this URL: a full `http://` URL is
    /// parsed as is; anything else is a path appended to this URL's path
    /// (`http://h/api` joined with `/health` is `http://h/api/health`).
    pub fn join(&self, path_or_url: &str) -> Result<Url, HttpError> {
        if path_or_url.contains("://") {
            return Url::parse(path_or_url);
        }
        let base = self.path.split('?').next().unwrap_or("/");
        let base = base.trim_end_matches('/');
        let rel = path_or_url.trim_start_matches('/');
        let path = if rel.is_empty() && base.is_empty() {
            "/".to_string()
        } else {
            format!("{base}/{rel}")
        };
        Ok(Url {
            host: self.host.clone(),
            port: self.port,
            path,
        })
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

impl FromStr for Url {
    type Err = HttpError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Url::parse(s)
    }
}

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// Whether sending it twice has the effect of sending it once (such
    /// requests are resent once when a pooled connection turns out closed).
    pub fn is_idempotent(self) -> bool {
        !matches!(self, Method::Post)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Where.
    pub url: Url,
    /// Extra headers (`Host`, `Content-Length` and `Connection` are set by the client).
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: Method, url: Url) -> Self {
        Request {
            method,
            url,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` request.
    pub fn get(url: Url) -> Self {
        Self::new(Method::Get, url)
    }

    /// A `POST` request with a body.
    pub fn post(url: Url, body: impl Into<Vec<u8>>) -> Self {
        Self::new(Method::Post, url).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Writes the request as HTTP/1.1 bytes into `out`.
    fn encode(&self, keep_alive: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        out.clear();
        let _ = write!(
            out,
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            self.method,
            self.url.path(),
            self.url.host_header()
        );
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        };
        if !has("user-agent") {
            out.extend_from_slice(b"User-Agent: cd/0.1\r\n");
        }
        if !self.body.is_empty() || matches!(self.method, Method::Post | Method::Put) {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        if !keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        for (k, v) in &self.headers {
            let _ = write!(out, "{k}: {v}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
    }
}

/// A response, body read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// The headers, in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// How a response body is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// One HTTP/1.1 connection. The load generator drives these directly, one
/// per worker; [`HttpClient`] pools them.
pub struct HttpConnection {
    stream: TcpStream,
    last_url: Option<Url>,
    url_for_errors: String,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    reusable: bool,
    /// Whether the last failed request had received any response byte.
    got_bytes: bool,
}

impl fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnection")
            .field("peer", &self.stream.peer_addr().ok())
            .field("reusable", &self.reusable)
            .finish()
    }
}

impl HttpConnection {
    /// Connects to the URL's host and port within `timeout`.
    pub async fn connect(url: &Url, timeout: Duration) -> Result<Self, HttpError> {
        let authority = url.authority();
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(HttpError::Connect {
                    url: url.to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(HttpError::Connect {
                    url: url.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {} ms", timeout.as_millis()),
                    ),
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(HttpConnection {
            stream,
            last_url: Some(url.clone()),
            url_for_errors: url.to_string(),
            buf: Vec::with_capacity(8 * 1024),
            pos: 0,
            out: Vec::with_capacity(512),
            reusable: true,
            got_bytes: false,
        })
    }

    /// Whether the connection can carry another request (the peer did not
    /// ask to close it and the last body was delimited).
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Sends a request and reads the whole response. No deadline: wrap the
    /// call in `tokio::time::timeout` (as [`HttpClient`] does).
    pub async fn send(&mut self, req: &Request) -> Result<Response, HttpError> {
        self.send_with(req, true).await
    }

    async fn send_with(&mut self, req: &Request, keep_alive: bool) -> Result<Response, HttpError> {
        if self.last_url.as_ref() != Some(&req.url) {
            self.url_for_errors = req.url.to_string();
            self.last_url = Some(req.url.clone());
        }
        self.got_bytes = false;
        let mut out = std::mem::take(&mut self.out);
        req.encode(keep_alive, &mut out);
        let written = self.stream.write_all(&out).await;
        self.out = out;
        if let Err(source) = written {
            self.reusable = false;
            return Err(self.io_err(source));
        }
        let result = self.read_response(req.method == Method::Head).await;
        if result.is_err() || !keep_alive {
            self.reusable = false;
        }
        result
    }

    fn io_err(&self, source: io::Error) -> HttpError {
        HttpError::Io {
            url: self.url_for_errors.clone(),
            source,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> HttpError {
        HttpError::Protocol {
            url: self.url_for_errors.clone(),
            reason: reason.into(),
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> Result<usize, HttpError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(8 * 1024);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| self.io_err(e))?;
        if n > 0 {
            self.got_bytes = true;
        }
        Ok(n)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    async fn read_response(&mut self, head_request: bool) -> Result<Response, HttpError> {
        // Status line and headers.
        let (status, reason, headers, version) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(self.available()) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = parsed.code.unwrap_or(0);
                    let reason = parsed.reason.unwrap_or("").to_string();
                    let version = parsed.version.unwrap_or(1);
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect();
                    self.pos += n;
                    // 1xx interim responses carry no body; skip them.
                    if (100..200).contains(&status) && status != 101 {
                        continue;
                    }
                    break (status, reason, headers, version);
                }
                Ok(httparse::Status::Partial) => {
                    if self.available().len() > MAX_HEAD {
                        return Err(self.protocol("response head larger than 64 KiB"));
                    }
                    if self.fill().await? == 0 {
                        let reason = if self.got_bytes {
                            "connection closed in the middle of the response head"
                        } else {
                            "connection closed before any response"
                        };
                        return Err(
                            self.io_err(io::Error::new(io::ErrorKind::UnexpectedEof, reason))
                        );
                    }
                }
                Err(e) => return Err(self.protocol(format!("bad response head: {e}"))),
            }
        };

        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let connection = header("connection").unwrap_or("").to_ascii_lowercase();
        let mut reusable = if version == 0 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let framing = if head_request || status == 204 || status == 304 {
            Framing::None
        } else if header("transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false)
        {
            Framing::Chunked
        } else if let Some(len) = header("content-length") {
            let len = len
                .parse::<usize>()
                .map_err(|_| self.protocol(format!("bad Content-Length `{len}`")))?;
            Framing::Length(len)
        } else {
            reusable = false;
            Framing::UntilClose
        };

        let body = match framing {
            Framing::None => Vec::new(),
            Framing::Length(len) => self.read_exact_body(len).await?,
            Framing::Chunked => self.read_chunked_body().await?,
            Framing::UntilClose => {
                while self.fill().await? > 0 {}
                let body = self.available().to_vec();
                self.pos = self.buf.len();
                body
            }
        };
        self.reusable = reusable;
        Ok(Response {
            status,
            reason,
            headers,
            body,
        })
    }

    async fn read_exact_body(&mut self, len: usize) -> Result<Vec<u8>, HttpError> {
        while self.available().len() < len {
            if self.fill().await? == 0 {
                return Err(self.io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {len} body bytes",
                        self.available().len()
                    ),
                )));
            }
        }
        let body = self.buf[self.pos..self.pos + len].to_vec();
        self.pos += len;
        Ok(body)
    }

    /// A CRLF-terminated line, without the CRLF.
    async fn read_line(&mut self) -> Result<String, HttpError> {
        loop {
            if let Some(i) = self.available().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.available()[..i]).into_owned();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.available().len() > MAX_HEAD {
                return Err(self.protocol("chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(self.io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                )));
            }
        }
    }

    async fn read_chunked_body(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| self.protocol(format!("bad chunk size `{size_hex}`")))?;
            if size == 0 {
                // Trailers, up to an empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            let chunk = self.read_exact_body(size).await?;
            body.extend_from_slice(&chunk);
            if !self.read_line().await?.is_empty() {
                return Err(self.protocol("chunk not followed by CRLF"));
            }
        }
    }
}

/// An HTTP/1.1 client with a keep-alive pool. Cheap to clone (clones share
/// the pool).
///
/// ```no_run
/// use std::time::Duration;
/// use cd_stages::http::HttpClient;
/// # async fn demo() -> Result<(), cd_stages::http::HttpError> {
/// let client = HttpClient::builder().timeout(Duration::from_secs(2)).build();
/// let resp = client.get("http://127.0.0.1:8080/health").await?;
/// assert!(resp.is_success());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    timeout: Duration,
    connect_timeout: Duration,
    keep_alive: bool,
    max_idle_per_host: usize,
    pool: Mutex<HashMap<String, Vec<HttpConnection>>>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.inner.timeout)
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("keep_alive", &self.inner.keep_alive)
            .finish()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// Configures an [`HttpClient`].
#[derive(Debug, Clone)]
pub struct HttpClientBuilder {
    timeout: Duration,
    connect_timeout: Duration,
    keep_alive: bool,
    max_idle_per_host: usize,
}

impl HttpClientBuilder {
    /// Deadline for a whole request, connect included (default 10 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Deadline for the TCP connect (default 3 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Whether connections are kept open and reused (default yes). Without
    /// keep-alive every request opens a new connection and sends
    /// `Connection: close` (what a health monitor behind a router wants).
    pub fn keep_alive(mut self, on: bool) -> Self {
        self.keep_alive = on;
        self
    }

    /// Idle connections kept per `host:port` (default 32).
    pub fn max_idle_per_host(mut self, n: usize) -> Self {
        self.max_idle_per_host = n;
        self
    }

    /// The client.
    pub fn build(self) -> HttpClient {
        HttpClient {
            inner: Arc::new(ClientInner {
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                keep_alive: self.keep_alive,
                max_idle_per_host: self.max_idle_per_host,
                pool: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl HttpClient {
    /// A client with the defaults: 10 s per request, 3 s to connect, keep-alive.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            keep_alive: true,
            max_idle_per_host: 32,
        }
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response, HttpError> {
        self.send(&Request::get(Url::parse(url)?)).await
    }

    /// `POST url` with a body of `content_type`.
    pub async fn post(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> Result<Response, HttpError> {
        let req = Request::post(Url::parse(url)?, body).header("Content-Type", content_type);
        self.send(&req).await
    }

    /// Sends a request within the client's deadline, reusing a pooled
    /// connection when there is one.
    pub async fn send(&self, req: &Request) -> Result<Response, HttpError> {
        let deadline = self.inner.timeout;
        match tokio::time::timeout(deadline, self.send_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url: req.url.to_string(),
                after: deadline,
            }),
        }
    }

    async fn send_inner(&self, req: &Request) -> Result<Response, HttpError> {
        let key = req.url.authority();
        let keep_alive = self.inner.keep_alive;
        if keep_alive {
            if let Some(mut conn) = self.take_idle(&key) {
                match conn.send_with(req, true).await {
                    Ok(resp) => {
                        self.put_idle(key, conn);
                        return Ok(resp);
                    }
                    // A pooled connection the peer had closed: send again on a
                    // fresh one, when that is safe.
                    Err(HttpError::Io { .. }) if !conn.got_bytes && req.method.is_idempotent() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut conn = HttpConnection::connect(&req.url, self.inner.connect_timeout).await?;
        let resp = conn.send_with(req, keep_alive).await?;
        if keep_alive {
            self.put_idle(key, conn);
        }
        Ok(resp)
    }

    fn take_idle(&self, key: &str) -> Option<HttpConnection> {
        let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.get_mut(key).and_then(Vec::pop)
    }

    fn put_idle(&self, key: String, conn: HttpConnection) {
        if !conn.is_reusable() {
            return;
        }
        let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(key).or_default();
        if idle.len() < self.inner.max_idle_per_host {
            idle.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{TestResponse, TestServer};

    #[test]
    fn parses_urls() {
        let u = Url::parse("http://localhost:8080").unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("localhost", 8080, "/"));
        let u = Url::parse("127.0.0.1/x?y=1#frag").unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("127.0.0.1", 80, "/x?y=1"));
        assert_eq!(u.to_string(), "http://127.0.0.1/x?y=1");
        let u = Url::parse("http://[::1]:9000/a").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.authority()),
            ("::1", 9000, "[::1]:9000".to_string())
        );
        let u = Url::parse("http://h:1?q").unwrap();
        assert_eq!(u.path(), "/?q");
        assert!(matches!(
            Url::parse("https://x/"),
            Err(HttpError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Url::parse("ftp://x/"),
            Err(HttpError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Url::parse("http://x:99999/"),
            Err(HttpError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Url::parse("http:///a"),
            Err(HttpError::InvalidUrl { .. })
        ));
        let e = Url::parse("http://x:bad/").unwrap_err();
        assert!(e.to_string().contains("http://x:bad/"), "{e}");
    }

    #[test]
    fn joins_paths() {
        let base = Url::parse("http://h:1").unwrap();
        assert_eq!(base.join("health").unwrap().path(), "/health");
        assert_eq!(base.join("/health").unwrap().path(), "/health");
        assert_eq!(base.join("").unwrap().path(), "/");
        let base = Url::parse("http://h:1/api/").unwrap();
        assert_eq!(base.join("/v1?x=2").unwrap().path(), "/api/v1?x=2");
        assert_eq!(
            base.join("http://o:2/z").unwrap().to_string(),
            "http://o:2/z"
        );
    }

    #[tokio::test]
    async fn get_post_and_keep_alive() {
        let server = TestServer::start(|req| match req.path.as_str() {
            "/hello" => TestResponse::ok("hello world"),
            "/echo" => TestResponse::new(201, req.body.clone()),
            _ => TestResponse::new(404, "nope"),
        })
        .await;
        let client = HttpClient::new();
        for _ in 0..5 {
            let r = client.get(&server.url("/hello")).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "hello world");
        }
        let r = client
            .post(&server.url("/echo"), "text/plain", "ping")
            .await
            .unwrap();
        assert_eq!((r.status, r.text().as_ref()), (201, "ping"));
        let r = client.get(&server.url("/missing")).await.unwrap();
        assert_eq!(r.status, 404);
        assert!(!r.is_success());
        assert_eq!(server.connections(), 1, "keep-alive reuses one connection");
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies() {
        let server = TestServer::start(|req| match req.path.as_str() {
            "/chunked" => TestResponse::ok("").chunked(vec!["abc", "", "defgh", "x"]),
            "/close" => TestResponse::ok("until the end").close_delimited(),
            _ => TestResponse::new(404, ""),
        })
        .await;
        let client = HttpClient::new();
        let r = client.get(&server.url("/chunked")).await.unwrap();
        assert_eq!(r.text(), "abcdefghx");
        let r = client.get(&server.url("/close")).await.unwrap();
        assert_eq!(r.text(), "until the end");
        // The chunked connection was reusable; the close-delimited one was not.
        let r = client.get(&server.url("/chunked")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(server.connections(), 2);
    }

    #[tokio::test]
    async fn head_has_no_body() {
        let server = TestServer::start(|_| TestResponse::ok("body")).await;
        let client = HttpClient::new();
        let req = Request::new(Method::Head, Url::parse(&server.url("/")).unwrap());
        let r = client.send(&req).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        let r = client.get(&server.url("/")).await.unwrap();
        assert_eq!(r.text(), "body");
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn retries_a_stale_pooled_connection() {
        // The server closes every connection after one response, without
        // saying so: the pooled connection is stale on the second request.
        let server = TestServer::start(|_| TestResponse::ok("x").silently_close()).await;
        let client = HttpClient::new();
        for _ in 0..3 {
            assert_eq!(client.get(&server.url("/")).await.unwrap().status, 200);
        }
        assert_eq!(server.connections(), 3);
    }

    #[tokio::test]
    async fn without_keep_alive_each_request_connects() {
        let server = TestServer::start(|_| TestResponse::ok("x")).await;
        let client = HttpClient::builder().keep_alive(false).build();
        for _ in 0..3 {
            assert_eq!(client.get(&server.url("/")).await.unwrap().status, 200);
        }
        assert_eq!(server.connections(), 3);
    }

    #[tokio::test]
    async fn timeout_names_the_url() {
        let server =
            TestServer::start(|_| TestResponse::ok("late").delay(Duration::from_secs(5))).await;
        let client = HttpClient::builder()
            .timeout(Duration::from_millis(100))
            .build();
        let url = server.url("/slow");
        let err = client.get(&url).await.unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains(&url), "{err}");
        let core: cd_core::Error = err.into();
        assert_eq!(core.kind(), cd_core::ErrorKind::Timeout);
        assert_eq!(core.context("url"), Some(url.as_str()));
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        // Bind then drop a listener: the port is (very likely) closed now.
        let port = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/health");
        let err = HttpClient::new().get(&url).await.unwrap_err();
        assert!(matches!(err, HttpError::Connect { .. }), "{err}");
        let core: cd_core::Error = err.into();
        assert_eq!(core.kind(), cd_core::ErrorKind::Unavailable);
        assert!(core.is_retryable());
        assert!(core.to_string().contains(&url));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        });
        let err = HttpClient::new()
            .get(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Protocol { .. }), "{err}");
    }
}
