//! The load generator (`cd_stages::load::generate`, closed model) against
//! wrk and hey, in one run, against the same local server, with the same
//! connections and duration.
//!
//! The server is this binary re-executed (`CD_LOADGEN_SERVER=1`): a small
//! keep-alive HTTP/1.1 server on one tokio worker thread answering every
//! request with a fixed 13-byte body. The three generators share the other
//! core. wrk runs with 2 threads, hey with its defaults, cd on a 2-thread
//! tokio runtime.
//!
//! ```text
//! cargo bench --bench loadgen              # 32 connections, 10 s each
//! CD_LOADGEN_SECS=30 CD_LOADGEN_CONNS=64 cargo bench --bench loadgen
//! ```
//!
//! Last line: `bench loadgen: cd_rps=<x> wrk_rps=<y> hey_rps=<z> vs_wrk=<x/y>
//! p99_cd_ms=<a> p99_wrk_ms=<b>` (plus `vs_hey`, p50s).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use cd::stages::http::{Request, Url};
use cd::stages::load::{generate, LoadOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world!";

fn serve() {
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

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn run_wrk(url: &str, conns: usize, secs: u64) -> Option<Figures> {
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

fn run_hey(url: &str, conns: usize, secs: u64) -> Option<Figures> {
    let out = Command::new("hey")
        .args(["-z", &format!("{secs}s"), "-c", &conns.to_string(), url])
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
        } else if let Some(v) = t.strip_prefix("50% in ") {
            f.p50_ms = v.trim_end_matches(" secs").trim().parse::<f64>().ok()? * 1000.0;
        } else if let Some(v) = t.strip_prefix("99% in ") {
            f.p99_ms = v.trim_end_matches(" secs").trim().parse::<f64>().ok()? * 1000.0;
        }
    }
    (f.rps > 0.0).then_some(f)
}

fn run_cd(url: &str, conns: usize, secs: u64) -> Figures {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(generate(
            Request::get(Url::parse(url).unwrap()),
            LoadOptions {
                requests: None,
                concurrency: conns,
                duration: Some(Duration::from_secs(secs)),
                timeout: Duration::from_secs(5),
                ..LoadOptions::default()
            },
        ))
        .unwrap();
    assert_eq!(r.errors + r.non_success, 0, "{r:?}");
    Figures {
        rps: r.rps,
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
    }
}

fn main() {
    if std::env::var_os("CD_LOADGEN_SERVER").is_some() {
        serve();
        return;
    }
    let secs: u64 = std::env::var("CD_LOADGEN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let conns: usize = std::env::var("CD_LOADGEN_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut server = Command::new(std::env::current_exe().unwrap())
        .env("CD_LOADGEN_SERVER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("http://127.0.0.1:{}/", port.trim());
    println!("server {url}; {conns} connections, {secs} s per generator");

    // A short warm-up of the server, then each generator in turn.
    let _ = run_cd(&url, conns, 1);
    let cd = run_cd(&url, conns, secs);
    println!(
        "cd:  {:>10.1} rps  p50 {:.3} ms  p99 {:.3} ms",
        cd.rps, cd.p50_ms, cd.p99_ms
    );
    let wrk = run_wrk(&url, conns, secs);
    match &wrk {
        Some(w) => println!(
            "wrk: {:>10.1} rps  p50 {:.3} ms  p99 {:.3} ms",
            w.rps, w.p50_ms, w.p99_ms
        ),
        None => println!("wrk: not installed or failed (scripts/setup.sh installs it)"),
    }
    let hey = run_hey(&url, conns, secs);
    match &hey {
        Some(h) => println!(
            "hey: {:>10.1} rps  p50 {:.3} ms  p99 {:.3} ms",
            h.rps, h.p50_ms, h.p99_ms
        ),
        None => println!("hey: not installed or failed (scripts/setup.sh installs it)"),
    }
    let _ = server.kill();
    let _ = server.wait();
    let (w, h) = (
        wrk.as_ref().map_or(f64::NAN, |w| w.rps),
        hey.as_ref().map_or(f64::NAN, |h| h.rps),
    );
    println!(
        "bench loadgen: cd_rps={:.0} wrk_rps={:.0} hey_rps={:.0} vs_wrk={:.2} vs_hey={:.2} p50_cd_ms={:.3} p50_wrk_ms={:.3} p99_cd_ms={:.3} p99_wrk_ms={:.3}",
        cd.rps,
        w,
        h,
        cd.rps / w,
        cd.rps / h,
        cd.p50_ms,
        wrk.as_ref().map_or(f64::NAN, |w| w.p50_ms),
        cd.p99_ms,
        wrk.as_ref().map_or(f64::NAN, |w| w.p99_ms),
    );
}
