//! A real Prometheus (the Debian package `scripts/setup.sh` installs) on a
//! reserved loopback port, scraping given targets every second, and a tiny
//! metrics app in the Prometheus text format for it to scrape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running Prometheus, killed on drop.
pub struct PrometheusServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
    _port: crate::PortLease,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape target: `host:port` and labels Prometheus adds to its series.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    /// `127.0.0.1:port`.
    pub address: String,
    /// Extra labels (`target="web1"`).
    pub labels: Vec<(String, String)>,
}

impl ScrapeTarget {
    /// A target without extra labels.
    pub fn new(address: impl Into<String>) -> Self {
        ScrapeTarget {
            address: address.into(),
            labels: Vec::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` every second (job `app`).
    /// `None` when the binary is missing and tools are not required (see
    /// [`crate::require_tool`]: it panics in CI).
    pub fn start(targets: &[ScrapeTarget]) -> Option<Self> {
        let bin = crate::require_tool("prometheus")?;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n",
        );
        for t in targets {
            config.push_str(&format!("      - targets: ['{}']\n", t.address));
            if !t.labels.is_empty() {
                config.push_str("        labels:\n");
                for (k, v) in &t.labels {
                    config.push_str(&format!("          {k}: '{v}'\n"));
                }
            }
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write prometheus.yml");
        let port = crate::reserve_port();
        let child = std::process::Command::new(bin)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", port.port))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        Some(PrometheusServer {
            child,
            url: format!("http://127.0.0.1:{}", port.port),
            _dir: dir,
            _port: port,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Waits (up to `deadline`) until Prometheus answers `/-/ready`.
    pub fn wait_ready(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let addr = self.url.trim_start_matches("http://").to_string();
        while Instant::now() < end {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!("GET /-/ready HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                let mut out = String::new();
                if s.write_all(req.as_bytes()).is_ok()
                    && s.read_to_string(&mut out).is_ok()
                    && out.starts_with("HTTP/1.0 200")
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Serves whatever `body()` returns at any path, in the Prometheus text
/// format, on a loopback port; returns the port. Runs until the runtime
/// ends.
pub async fn metrics_app(body: impl Fn() -> String + Send + Sync + 'static) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = Arc::new(body);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let text = body();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}
