//! HTTP for delivery checks, monitors and health waits: hyper (through
//! reqwest) over rustls with the ring provider.
//!
//! `http://` and `https://` (system roots or a given CA bundle, optional
//! client certificate: [`crate::tls::TlsOptions`]), HTTP/1.1 and HTTP/2
//! (negotiated by ALPN), keep-alive with a per-host pool, proxies from the
//! environment (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`), redirects off by
//! default (a check should see the redirect, not its target). Every request
//! has a total deadline (connect, send, the whole body), response bodies are
//! read up to a cap ([`HttpClientBuilder::max_body_bytes`], default 4 MiB),
//! and header names and values are validated before anything is sent (no
//! CR/LF injection).
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
use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::Duration;

use crate::tls::TlsOptions;

/// What went wrong with a request. Every variant names the URL (or, for a
/// client configuration error, the file at fault).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL could not be parsed or is not `http://` or `https://`.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name or value that may not be sent (CR, LF, NUL, a
    /// non-token name): refused before anything is sent.
    #[error("{url}: header `{name}` refused: {reason}")]
    InvalidHeader {
        /// The URL.
        url: String,
        /// The header's name (as given, escaped).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The connection could not be made.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (an untrusted or expired certificate, a
    /// name mismatch, a protocol the peer does not speak).
    #[error("{url}: TLS handshake failed: {reason}")]
    Tls {
        /// The URL.
        url: String,
        /// rustls' reason.
        reason: String,
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
    /// The peer sent something that is not HTTP.
    #[error("{url}: malformed response: {reason}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The response body is larger than the client reads.
    #[error("{url}: response body larger than {limit} bytes")]
    BodyTooLarge {
        /// The URL.
        url: String,
        /// The cap, in bytes.
        limit: usize,
    },
    /// The client could not be configured (a CA bundle or client
    /// certificate that cannot be read or used).
    #[error("HTTP client configuration: {what}: {reason}")]
    Config {
        /// The file (or setting) at fault.
        what: String,
        /// What is wrong.
        reason: String,
    },
}

impl HttpError {
    /// The URL the error is about (for [`HttpError::Config`], the file).
    pub fn url(&self) -> &str {
        match self {
            HttpError::InvalidUrl { url, .. }
            | HttpError::InvalidHeader { url, .. }
            | HttpError::Connect { url, .. }
            | HttpError::Tls { url, .. }
            | HttpError::Timeout { url, .. }
            | HttpError::Io { url, .. }
            | HttpError::Protocol { url, .. }
            | HttpError::BodyTooLarge { url, .. } => url,
            HttpError::Config { what, .. } => what,
        }
    }

    /// The [`cd_core::ErrorKind`] this error maps to: connection and I/O
    /// failures are `Unavailable` (retryable), deadlines `Timeout`, a bad
    /// URL, header or configuration `Invalid`; a TLS failure, a malformed
    /// or oversized response `Failed`.
    pub fn kind(&self) -> cd_core::ErrorKind {
        match self {
            HttpError::InvalidUrl { .. }
            | HttpError::InvalidHeader { .. }
            | HttpError::Config { .. } => cd_core::ErrorKind::Invalid,
            HttpError::Connect { .. } | HttpError::Io { .. } => cd_core::ErrorKind::Unavailable,
            HttpError::Timeout { .. } => cd_core::ErrorKind::Timeout,
            HttpError::Tls { .. } | HttpError::Protocol { .. } | HttpError::BodyTooLarge { .. } => {
                cd_core::ErrorKind::Failed
            }
        }
    }
}

impl From<HttpError> for cd_core::Error {
    fn from(e: HttpError) -> Self {
        let key = if matches!(e, HttpError::Config { .. }) {
            "file"
        } else {
            "url"
        };
        let url = e.url().to_string();
        cd_core::Error::new(e.kind(), e.to_string())
            .with(key, url)
            .with_typed_source(e)
    }
}

/// A parsed `http://` or `https://` URL.
///
/// ```
/// use cd_stages::http::Url;
/// let u: Url = "http://127.0.0.1:8080/api?x=1".parse().unwrap();
/// assert_eq!((u.host(), u.port(), u.path()), ("127.0.0.1", 8080, "/api?x=1"));
/// assert_eq!(u.join("/health").unwrap().to_string(), "http://127.0.0.1:8080/api/health");
/// let s: Url = "https://example.com/x".parse().unwrap();
/// assert_eq!((s.scheme(), s.port()), ("https", 443));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url(reqwest::Url);

impl Url {
    /// Parses an `http(s)://host[:port][/path][?query]` URL. A missing
    /// scheme is taken as `http://`; the fragment is dropped; user
    /// information (`user:pass@`) is refused (credentials go in headers,
    /// where they are not logged with the URL).
    pub fn parse(s: &str) -> Result<Url, HttpError> {
        let invalid = |reason: &str| HttpError::InvalidUrl {
            url: s.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = s.trim();
        let full = if has_scheme(trimmed) {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        if full
            .split_once("://")
            .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with(['/', '?', '#']))
        {
            return Err(invalid("no host"));
        }
        let mut url = reqwest::Url::parse(&full).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("only http:// and https:// URLs are supported"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("user information in URLs is not supported"));
        }
        url.set_fragment(None);
        Ok(Url(url))
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        let h = self.0.host_str().unwrap_or_default();
        h.strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(h)
    }

    /// The port (80 or 443 when the URL gives none).
    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(80)
    }

    /// The path with the query, starting with `/`.
    pub fn path(&self) -> &str {
        &self.0[url::Position::BeforePath..url::Position::AfterQuery]
    }

    /// `host:port`, as used to connect (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host().contains(':') {
            format!("[{}]:{}", self.host(), self.port())
        } else {
            format!("{}:{}", self.host(), self.port())
        }
    }

    /// The value of the `Host` header (the port only when it is not the
    /// scheme's default).
    pub fn host_header(&self) -> String {
        let h = self.0.host_str().unwrap_or_default();
        match self.0.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        }
    }

    /// Resolves `path_or_url` against this URL: a full URL is parsed as is;
    /// anything else is a path appended to this URL's path
    /// (`http://h/api` joined with `/health` is `http://h/api/health`).
    pub fn join(&self, path_or_url: &str) -> Result<Url, HttpError> {
        if has_scheme(path_or_url) {
            return Url::parse(path_or_url);
        }
        let base = self.0.path().trim_end_matches('/');
        let rel = path_or_url.trim_start_matches('/');
        let mut joined = self.0.clone();
        joined.set_query(None);
        let (path, query) = match rel.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rel, None),
        };
        joined.set_path(&format!("{base}/{path}"));
        joined.set_query(query);
        Ok(Url(joined))
    }

    /// The URL as reqwest takes it.
    pub fn as_reqwest(&self) -> &reqwest::Url {
        &self.0
    }
}

/// Whether `s` starts with a scheme (`letter *( letter / digit / "+" /
/// "-" / "." ) "://"`, RFC 3986): `/login?next=http://x` does not.
fn has_scheme(s: &str) -> bool {
    match s.find("://") {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
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

    /// Whether sending it twice has the effect of sending it once.
    pub fn is_idempotent(self) -> bool {
        !matches!(self, Method::Post)
    }

    /// The `http` crate's method.
    pub fn to_http(self) -> http::Method {
        match self {
            Method::Get => http::Method::GET,
            Method::Head => http::Method::HEAD,
            Method::Post => http::Method::POST,
            Method::Put => http::Method::PUT,
            Method::Delete => http::Method::DELETE,
        }
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
    /// Extra headers (`Host` and `Content-Length` are set by the client).
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

    /// Adds a header (validated when the request is sent).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The headers as the `http` crate's map.
    ///
    /// Errors: [`HttpError::InvalidHeader`] naming the first header whose
    /// name is not a token or whose value holds CR, LF or NUL.
    pub fn header_map(&self) -> Result<http::HeaderMap, HttpError> {
        let mut map = http::HeaderMap::with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            let refused = |reason: &str| HttpError::InvalidHeader {
                url: self.url.to_string(),
                name: k.escape_debug().to_string(),
                reason: reason.to_string(),
            };
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| refused("not a valid header name"))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| refused("the value holds a control character (CR, LF, NUL)"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// A response, body read in full (up to the client's cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase (the standard one for the status).
    pub reason: String,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from its transfer framing.
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

/// An HTTP client: cheap to clone (clones share the connection pool).
///
/// ```no_run
/// use std::time::Duration;
/// use cd_stages::http::HttpClient;
/// use cd_stages::tls::TlsOptions;
/// # async fn demo() -> Result<(), cd_stages::http::HttpError> {
/// let client = HttpClient::builder()
///     .timeout(Duration::from_secs(2))
///     .tls(TlsOptions::new().ca_file("/etc/cd/internal-ca.pem"))
///     .build()?;
/// let resp = client.get("https://app.internal:8443/health").await?;
/// assert!(resp.is_success());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    timeout: Duration,
    max_body: usize,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
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
    max_body: usize,
    redirects: usize,
    proxy_from_env: bool,
    http2: bool,
    tls: TlsOptions,
}

/// The default cap on a response body: 4 MiB.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

impl HttpClientBuilder {
    /// Deadline for a whole request: connect, TLS, send and the whole body
    /// (default 10 s).
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
    /// keep-alive every request opens a new connection (what a health
    /// monitor behind a router wants).
    pub fn keep_alive(mut self, on: bool) -> Self {
        self.keep_alive = on;
        self
    }

    /// Idle connections kept per host (default 32).
    pub fn max_idle_per_host(mut self, n: usize) -> Self {
        self.max_idle_per_host = n;
        self
    }

    /// The largest response body read, in bytes (default 4 MiB); a larger
    /// one is [`HttpError::BodyTooLarge`].
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body = n;
        self
    }

    /// Follows up to `n` redirects (default 0: a redirect is the response).
    pub fn redirects(mut self, n: usize) -> Self {
        self.redirects = n;
        self
    }

    /// Whether `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` apply (default yes).
    pub fn proxy_from_env(mut self, on: bool) -> Self {
        self.proxy_from_env = on;
        self
    }

    /// Whether HTTP/2 is offered by ALPN on `https://` (default yes).
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// Where TLS trust and the client certificate come from (default: the
    /// system's roots).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// The client.
    ///
    /// Errors: [`HttpError::Config`] for a CA bundle or client certificate
    /// that cannot be read or used.
    pub fn build(self) -> Result<HttpClient, HttpError> {
        let tls = self.tls.client_config(self.http2)?;
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .pool_max_idle_per_host(if self.keep_alive {
                self.max_idle_per_host
            } else {
                0
            })
            .tcp_nodelay(true)
            .user_agent(concat!("cd/", env!("CARGO_PKG_VERSION")))
            .redirect(if self.redirects == 0 {
                reqwest::redirect::Policy::none()
            } else {
                reqwest::redirect::Policy::limited(self.redirects)
            });
        if !self.proxy_from_env {
            b = b.no_proxy();
        }
        if !self.http2 {
            b = b.http1_only();
        }
        let inner = b.build().map_err(|e| HttpError::Config {
            what: "HTTP client".into(),
            reason: e.to_string(),
        })?;
        Ok(HttpClient {
            inner,
            timeout: self.timeout,
            max_body: self.max_body,
        })
    }
}

impl HttpClient {
    /// A client with the defaults: 10 s per request, 3 s to connect,
    /// keep-alive, system roots, bodies up to 4 MiB, no redirects.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default HTTP client needs no files")
    }

    /// A builder.
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            keep_alive: true,
            max_idle_per_host: 32,
            max_body: DEFAULT_MAX_BODY,
            redirects: 0,
            proxy_from_env: true,
            http2: true,
            tls: TlsOptions::default(),
        }
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

    /// Sends a request and reads the response within the client's deadline.
    ///
    /// Errors: every [`HttpError`] but `Config`, naming the URL.
    pub async fn send(&self, req: &Request) -> Result<Response, HttpError> {
        let headers = req.header_map()?;
        let url = req.url.to_string();
        let deadline = self.timeout;
        let work = async {
            let mut builder = self
                .inner
                .request(req.method.to_http(), req.url.0.clone())
                .headers(headers);
            if !req.body.is_empty() || matches!(req.method, Method::Post | Method::Put) {
                builder = builder.body(req.body.clone());
            }
            let mut resp = builder
                .send()
                .await
                .map_err(|e| from_reqwest(&url, deadline, e))?;
            let status = resp.status();
            let headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| from_reqwest(&url, deadline, e))?
            {
                if body.len() + chunk.len() > self.max_body {
                    return Err(HttpError::BodyTooLarge {
                        url: url.clone(),
                        limit: self.max_body,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Response {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or_default().to_string(),
                headers,
                body,
            })
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url,
                after: deadline,
            }),
        }
    }
}

/// Maps reqwest's error to ours, by what failed: the deadline, TLS, the
/// connection, or the response.
fn from_reqwest(url: &str, after: Duration, e: reqwest::Error) -> HttpError {
    let url = url.to_string();
    if e.is_timeout() && e.is_connect() {
        return HttpError::Connect {
            url,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                "no connection within the connect deadline",
            ),
        };
    }
    if e.is_timeout() {
        return HttpError::Timeout { url, after };
    }
    if let Some(reason) = crate::tls::tls_failure(&e) {
        return HttpError::Tls { url, reason };
    }
    let io_kind = io_kind_in(&e);
    if e.is_connect() {
        return HttpError::Connect {
            url,
            source: io::Error::new(io_kind.unwrap_or(io::ErrorKind::Other), innermost(&e)),
        };
    }
    if let Some(h) = hyper_in(&e) {
        if h.is_parse() || h.is_parse_status() {
            return HttpError::Protocol {
                url,
                reason: innermost(&e),
            };
        }
    }
    HttpError::Io {
        url,
        source: io::Error::new(io_kind.unwrap_or(io::ErrorKind::Other), innermost(&e)),
    }
}

fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    crate::tls::causes(e)
}

fn io_kind_in(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    chain(e).find_map(|x| x.downcast_ref::<io::Error>().map(io::Error::kind))
}

fn hyper_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    chain(e).find_map(|x| x.downcast_ref::<hyper::Error>())
}

/// The deepest cause's text (reqwest's own message only says "error
/// sending request").
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    chain(e).last().map(|x| x.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{TestResponse, TestServer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let u = Url::parse("https://x/").unwrap();
        assert_eq!(
            (u.scheme(), u.port(), u.host_header()),
            ("https", 443, "x".to_string())
        );
        assert!(matches!(
            Url::parse("http://user:pw@x/"),
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
    fn a_url_in_the_query_is_not_a_scheme() {
        let base = Url::parse("http://h:1/app").unwrap();
        let u = base.join("/login?next=http://x/y").unwrap();
        assert_eq!(u.path(), "/app/login?next=http://x/y");
        let u = Url::parse("h:8080/?u=http://x").unwrap();
        assert_eq!((u.host(), u.port()), ("h", 8080));
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
        let client = HttpClient::builder().keep_alive(false).build().unwrap();
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
            .build()
            .unwrap();
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
        let (_held, port) = crate::test_server::refused_port();
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

    #[tokio::test]
    async fn https_passes_with_the_ca_given_and_is_a_tls_error_without() {
        let pki = crate::test_server::TestPki::new();
        let server =
            TestServer::start_tls(|_| TestResponse::ok("secure"), pki.server.clone()).await;
        let url = server.url("/health");
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let trusted = HttpClient::builder()
            .tls(TlsOptions::new().ca_pem(pki.ca_pem.clone()))
            .build()
            .unwrap();
        let r = trusted.get(&url).await.unwrap();
        assert_eq!((r.status, r.text().as_ref()), (200, "secure"));
        // The system's roots do not know the test CA.
        let err = HttpClient::new().get(&url).await.unwrap_err();
        assert!(matches!(err, HttpError::Tls { .. }), "{err}");
        assert!(err.to_string().contains(&url), "{err}");
        let core: cd_core::Error = err.into();
        assert_eq!(core.kind(), cd_core::ErrorKind::Failed);
        assert!(!core.is_retryable());
    }

    #[tokio::test]
    async fn an_unreadable_ca_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-ca.pem");
        let err = HttpClient::builder()
            .tls(TlsOptions::new().ca_file(&missing))
            .build()
            .unwrap_err();
        assert!(matches!(err, HttpError::Config { .. }), "{err}");
        assert!(err.to_string().contains("missing-ca.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let err = HttpClient::builder()
            .tls(TlsOptions::new().ca_file(&empty))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }

    #[tokio::test]
    async fn crlf_in_a_header_is_refused_before_anything_is_sent() {
        let server = TestServer::start(|_| TestResponse::ok("x")).await;
        let url = Url::parse(&server.url("/")).unwrap();
        for (name, value) in [
            ("X-Note", "a\r\nX-Injected: 1"),
            ("X-Note", "a\nb"),
            ("X-Bad\r\nName", "v"),
            ("", "v"),
        ] {
            let req = Request::get(url.clone()).header(name, value);
            let err = HttpClient::new().send(&req).await.unwrap_err();
            assert!(
                matches!(err, HttpError::InvalidHeader { .. }),
                "{name:?}: {err}"
            );
            assert_eq!(
                cd_core::Error::from(err).kind(),
                cd_core::ErrorKind::Invalid
            );
        }
        assert_eq!(server.connections(), 0, "nothing reached the server");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused() {
        let server = TestServer::start(|_| TestResponse::ok(vec![b'x'; 100_000])).await;
        let client = HttpClient::builder().max_body_bytes(1000).build().unwrap();
        let err = client.get(&server.url("/big")).await.unwrap_err();
        assert!(
            matches!(err, HttpError::BodyTooLarge { limit: 1000, .. }),
            "{err}"
        );
        let chunked =
            TestServer::start(|_| TestResponse::ok("").chunked(vec!["0123456789"; 200])).await;
        let err = client.get(&chunked.url("/")).await.unwrap_err();
        assert!(matches!(err, HttpError::BodyTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn redirects_are_responses_unless_followed() {
        let server = TestServer::start(|req| match req.path.as_str() {
            "/old" => TestResponse::new(301, "").header("Location", "/new"),
            _ => TestResponse::ok("new place"),
        })
        .await;
        let r = HttpClient::new().get(&server.url("/old")).await.unwrap();
        assert_eq!(r.status, 301);
        let follow = HttpClient::builder().redirects(3).build().unwrap();
        let r = follow.get(&server.url("/old")).await.unwrap();
        assert_eq!((r.status, r.text().as_ref()), (200, "new place"));
    }
}
