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

use std::process::Command;
use std::time::Duration;

use cd::stages::http::{Request, Url};
use cd::stages::load::{generate, LoadOptions};

use cd_testkit::bench::{run_wrk, Figures};

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
        cd_testkit::bench::serve_fixed();
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
    let (mut server, port) = cd_testkit::bench::start_fixed_server("CD_LOADGEN_SERVER");
    let url = format!("http://127.0.0.1:{port}/");
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
