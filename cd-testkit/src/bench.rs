//! Pieces the benchmarks share: a fixed-answer HTTP server to measure
//! against, and running wrk.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts this executable again with `env` set (its `main` then calls
/// [`serve_fixed`]) and returns the child and the port it serves.
pub fn start_fixed_server(env: &str) -> (Child, u16) {
    let mut server = Command::new(std::env::current_exe().expect("current exe"))
        .env(env, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the fixed server");
    let mut port = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut port)
        .expect("read the port");
    (server, port.trim().parse().expect("a port"))
}

/// The fixed answer.
const BODY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world!";

/// Serves every request on a loopback port with a fixed 13-byte body
/// (keep-alive, pipelining) on one tokio worker; prints the port on stdout
/// first. Blocks forever: run it in a re-executed benchmark binary.
pub fn serve_fixed() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0usize;
                loop {
                    match s.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    // Answer every complete request head in the buffer
                    // (pipelined or not).
                    let mut answers = 0;
                    let mut start = 0;
                    while let Some(p) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        start += p + 4;
                        answers += 1;
                    }
                    buf.copy_within(start..have, 0);
                    have -= start;
                    if have == buf.len() {
                        return;
                    }
                    for _ in 0..answers {
                        if s.write_all(BODY).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

/// `1.23ms`, `456.78us`, `1.2s` → milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(x) = v.strip_suffix("us") {
        (x, 0.001)
    } else if let Some(x) = v.strip_suffix("ms") {
        (x, 1.0)
    } else if let Some(x) = v.strip_suffix('s') {
        (x, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// What a load generator measured.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// Runs `wrk -t2 -c<conns> -d<secs>s --latency url`; `None` when wrk is
/// missing or measured nothing.
pub fn run_wrk(url: &str, conns: usize, secs: u64) -> Option<Figures> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = Figures {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
    };
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            f.rps = v.trim().parse().ok()?;
        } else if let Some(v) = t.strip_prefix("50%") {
            f.p50_ms = wrk_ms(v)?;
        } else if let Some(v) = t.strip_prefix("99%") {
            f.p99_ms = wrk_ms(v)?;
        }
    }
    (f.rps > 0.0).then_some(f)
}
