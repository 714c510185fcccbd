//! The load generator against a local server whose delays the test
//! controls: measured latencies match what the server injected; the open
//! model shows a stall the closed model hides (coordinated omission);
//! memory stays flat in a long run; a regression against the previous
//! release fails naming the metric and both values.
//!
//! The timing tests run alone (`.config/nextest.toml` gives them every test
//! thread): their figures are about the server, not about a busy machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_core::{MemoryStore, Pipeline, Release, RunStatus, Runner, Store};
use cd_stages::http::{Request, Url};
use cd_stages::load::{generate, LoadOptions, LoadReport};
use cd_stages::LoadTest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long the server waits before answering a request that arrives at
/// `now` (ms since the server started).
type Delay = dyn Fn(u64) -> Duration + Send + Sync;

/// A keep-alive HTTP/1.1 server answering `200 ok` after `delay`.
async fn server(delay: Arc<Delay>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let t0 = Instant::now();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let delay = delay.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let d = delay(t0.elapsed().as_millis() as u64);
                    if !d.is_zero() {
                        // A thread's sleep overshoots by tens of µs; tokio's
                        // timer wheel rounds up to the next millisecond.
                        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, task)
}

fn opts(concurrency: usize, duration: Duration) -> LoadOptions {
    LoadOptions {
        requests: None,
        concurrency,
        duration: Some(duration),
        timeout: Duration::from_secs(5),
        ..LoadOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_accuracy_latencies_match_an_injected_20_ms() {
    let (url, _server) = server(Arc::new(|_| Duration::from_millis(20))).await;
    let req = Request::get(Url::parse(&url).unwrap());
    let mut o = opts(4, Duration::from_secs(3));
    o.warmup = Duration::from_millis(500);
    let r = generate(req, o).await.unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.requests > 100, "{r:?}");
    eprintln!(
        "injected 20 ms: p50 {} ms, p99 {} ms over {} requests",
        r.p50_ms, r.p99_ms, r.requests
    );
    // Within 10% of the injected 20 ms.
    for (name, v) in [("p50", r.p50_ms), ("p99", r.p99_ms)] {
        assert!(
            (18.0..=22.0).contains(&v),
            "{name} = {v} ms for an injected 20 ms: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stall_shows_in_the_open_model_and_hides_in_the_closed_one() {
    // From 1 s to 2 s after it starts, the server answers nothing (every
    // request waits for the stall to end).
    let stall = |now: u64| {
        if (1000..2000).contains(&now) {
            Duration::from_millis(2000 - now)
        } else {
            Duration::ZERO
        }
    };
    let run = |rate: Option<f64>| async move {
        let (url, _server) = server(Arc::new(stall)).await;
        let mut o = opts(4, Duration::from_secs(3));
        o.rate = rate;
        generate(Request::get(Url::parse(&url).unwrap()), o)
            .await
            .unwrap()
    };
    let open = run(Some(200.0)).await;
    let closed = run(None).await;
    assert_eq!((open.errors, closed.errors), (0, 0));
    eprintln!(
        "1 s stall: open p99 {} ms max {} ms; closed p99 {} ms max {} ms",
        open.p99_ms, open.max_ms, closed.p99_ms, closed.max_ms
    );
    // Open: ~200 requests were due during the stall; each waited for its
    // end, measured from when it was due: the stall dominates p99.
    assert!(
        open.p99_ms >= 500.0,
        "open model p99 {} ms: {open:?}",
        open.p99_ms
    );
    assert!(open.max_ms >= 900.0, "{open:?}");
    // Closed: only the 4 requests in flight waited; thousands did not.
    assert!(
        closed.max_ms >= 900.0,
        "the stall is seen once per connection: {closed:?}"
    );
    assert!(
        open.p99_ms > 10.0 * closed.p99_ms,
        "coordinated omission: open p99 {} ms vs closed p99 {} ms",
        open.p99_ms,
        closed.p99_ms
    );
}

/// RSS of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_soak_memory_stays_flat_for_60_s() {
    let (url, _server) = server(Arc::new(|_| Duration::ZERO)).await;
    let req = Request::get(Url::parse(&url).unwrap());
    // Sample RSS while the run goes: after 10 s of warm-up, and at the end.
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (samples, done) = (samples.clone(), done.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            while done.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if t0.elapsed() >= Duration::from_secs(10) {
                    samples.lock().unwrap().push(rss_kib());
                }
            }
        })
    };
    let r = generate(req, opts(16, Duration::from_secs(60)))
        .await
        .unwrap();
    done.store(1, Ordering::Relaxed);
    sampler.await.unwrap();
    let s = samples.lock().unwrap().clone();
    assert!(s.len() >= 40, "{s:?}");
    let first = s[0] as f64;
    let peak = *s.iter().max().unwrap() as f64;
    eprintln!(
        "soak: {} requests, {} rps; RSS after warm-up {first} KiB, peak {peak} KiB",
        r.requests, r.rps
    );
    assert!(r.requests > 10_000, "{r:?}");
    assert!(
        peak <= first * 1.10,
        "RSS grew from {first} KiB to {peak} KiB: {s:?}"
    );
}

#[tokio::test]
async fn a_latency_regression_against_the_previous_release_fails_naming_both_values() {
    let fast = Arc::new(AtomicU64::new(0));
    let delay_ms = fast.clone();
    let (url, _server) = server(Arc::new(move |_| {
        Duration::from_millis(delay_ms.load(Ordering::Relaxed))
    }))
    .await;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runner = Runner::new(store).environment("staging");
    let p = Pipeline::builder("perf")
        .stage(
            "load",
            LoadTest::get(url)
                .requests(200)
                .concurrency(2)
                .compare_with_previous(50.0),
        )
        .build()
        .unwrap();
    let v1 = runner.run(&p, Release::new("v1")).await.unwrap();
    assert_eq!(v1.status, RunStatus::Succeeded, "{v1}");
    let before: LoadReport = serde_json::from_value(v1.output("load").unwrap().clone()).unwrap();
    // v2 is slower by 30 ms per request: p50 and p99 regress far beyond 50%.
    fast.store(30, Ordering::Relaxed);
    let v2 = runner.run(&p, Release::new("v2")).await.unwrap();
    assert_eq!(v2.status, RunStatus::Failed, "{v2}");
    let msg = v2.node("load").unwrap().error.clone().unwrap().message;
    assert!(msg.contains("p50 latency regressed"), "{msg}");
    assert!(
        msg.contains(&format!("vs {} ms in v1", before.p50_ms)),
        "{msg}"
    );
    assert!(msg.contains("throughput regressed"), "{msg}");
}
