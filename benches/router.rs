//! The HTTP router against nginx `proxy_pass`, in one run: wrk (2 threads,
//! 32 keep-alive connections) direct to an upstream, through `HttpRouter`,
//! and through nginx with keep-alive upstream connections.
//!
//! The upstream is this binary re-executed (`CD_ROUTER_UPSTREAM=1`): a
//! keep-alive server with a fixed 13-byte answer on one tokio worker. The
//! router runs on one thread (a single-threaded tokio runtime); nginx with
//! one worker process: each proxy gets one core's worth, wrk the other.
//!
//! ```text
//! cargo bench --bench router --features router     # 5 s per case
//! CD_ROUTER_SECS=10 cargo bench --bench router --features router
//! ```
//!
//! Router and nginx run three alternating rounds; their medians (by rps)
//! are reported. Last line: `bench router: direct_rps=<a> routed_rps=<b>
//! nginx_rps=<c> vs_nginx=<b/c> added_p99_ms=<d>` (router p99 minus direct
//! p99).

use std::process::{Command, Stdio};
use std::time::Duration;

use cd::backends::router::HttpRouter;
use cd_testkit::bench::{run_wrk, start_fixed_server, Figures};

fn nginx(upstream: u16, listen: u16, dir: &std::path::Path) -> Option<std::process::Child> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
               upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
               server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            err = dir.join("error.log").display(),
            tmp = dir.display(),
        ),
    )
    .ok()?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Ready when it accepts.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok() {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn show(name: &str, f: &Option<Figures>) {
    match f {
        Some(f) => println!(
            "{name:<16} {:>10.0} rps  p50 {:.3} ms  p99 {:.3} ms",
            f.rps, f.p50_ms, f.p99_ms
        ),
        None => println!("{name:<8} failed (wrk or nginx missing? scripts/setup.sh installs them)"),
    }
}

fn main() {
    if std::env::var_os("CD_ROUTER_UPSTREAM").is_some() {
        cd_testkit::bench::serve_fixed();
        return;
    }
    let secs: u64 = std::env::var("CD_ROUTER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut upstream, port) = start_fixed_server("CD_ROUTER_UPSTREAM");

    // The router on a thread of its own with a single-threaded runtime, as
    // nginx's one worker process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let router = HttpRouter::builder("127.0.0.1:0")
                .upstream("app", format!("127.0.0.1:{port}"))
                .start()
                .await
                .unwrap();
            tx.send(router.clone()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let router: HttpRouter = rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nginx_port = cd_testkit::reserve_port();
    let mut nginx = nginx(port, nginx_port.port, dir.path());

    let direct_url = format!("http://127.0.0.1:{port}/");
    let routed_url = format!("{}/", router.url());
    let nginx_url = format!("http://127.0.0.1:{}/", nginx_port.port);
    println!("upstream {direct_url}; router {routed_url}; nginx {nginx_url}; 32 connections, {secs} s each");
    // Warm up, then each case.
    let _ = run_wrk(&routed_url, 32, 1);
    let direct = run_wrk(&direct_url, 32, secs);
    show("direct", &direct);
    // Router and nginx alternate, three rounds each; the medians count (a
    // shared 2-core box drifts by 10-20% between runs).
    let (mut routed_runs, mut nginx_runs) = (Vec::new(), Vec::new());
    for round in 1..=3 {
        let r = run_wrk(&routed_url, 32, secs);
        show(&format!("router#{round}"), &r);
        routed_runs.extend(r);
        let n = nginx.as_ref().and_then(|_| run_wrk(&nginx_url, 32, secs));
        show(&format!("nginx#{round}"), &n);
        nginx_runs.extend(n);
    }
    let median = |mut v: Vec<Figures>| -> Option<Figures> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        Some(v[v.len() / 2])
    };
    let routed = median(routed_runs);
    let proxied = median(nginx_runs);
    show("router (median)", &routed);
    show("nginx (median)", &proxied);
    let stats = router.stats();
    println!(
        "router upstream errors: {} of {} requests",
        stats[0].errors, stats[0].requests
    );
    if let Some(n) = nginx.as_mut() {
        let _ = n.kill();
        let _ = n.wait();
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
    let rps = |f: &Option<Figures>| f.map_or(f64::NAN, |f| f.rps);
    let p99 = |f: &Option<Figures>| f.map_or(f64::NAN, |f| f.p99_ms);
    println!(
        "bench router: direct_rps={:.0} routed_rps={:.0} nginx_rps={:.0} vs_nginx={:.2} added_p99_ms={:.3}",
        rps(&direct),
        rps(&routed),
        rps(&proxied),
        rps(&routed) / rps(&proxied),
        p99(&routed) - p99(&direct),
    );
}
