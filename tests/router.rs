//! The HTTP router in front of real containers (Podman): no request fails
//! while a steady client sends 200+ requests a second through a blue-green
//! switch, a traffic canary and a rollback; a canary answering 500 is
//! judged on the router's own samples and sent back to 0%.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cd::backends::container::ContainerDeployer;
use cd::backends::router::{HttpRouter, RouterMonitor};
use cd::core::{
    Analysis, BlueGreen, DeployContext, Deployer, ErrorKind, EventKind, Release, Router, Strategy,
    TrafficCanary, WeightedRouter,
};
use cd_testkit::podman::{build_image, remove_app, PodmanService};

/// `localhost/cd-test:<version>`: busybox httpd; `/cgi-bin/app` answers the
/// version (or 500 for a version named `bad`), `/health` answers ok.
fn image(version: &str) {
    let app = if version == "bad" {
        "#!/bin/sh\nprintf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nbroken\\n'\n".to_string()
    } else {
        format!("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n{version}\\n'\n")
    };
    build_image(
        "cd-test",
        version,
        &[
            ("/www/health", "ok\n"),
            ("/www/index.html", &format!("{version}\n")),
            ("/www/cgi-bin/app", &app),
        ],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
}

/// A client sending about 250 requests a second through the router
/// (5 loops, one request every 20 ms each), counting failures and the
/// versions that answered.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(Vec::new()));
        let client = cd::stages::HttpClient::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let tasks = (0..5)
            .map(|_| {
                let (stop, ok, failed, last, client, url) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    last.clone(),
                    client.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        match client.get(&url).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                let mut l = last.lock().unwrap();
                                l.push(r.text().trim().to_string());
                                let n = l.len();
                                if n > 200 {
                                    l.drain(..n - 200);
                                }
                            }
                            Ok(r) => failed.lock().unwrap().push(format!("HTTP {}", r.status)),
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            last,
            tasks,
        }
    }

    /// Waits until `n` more requests succeeded.
    async fn more(&self, n: u64) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(std::time::Instant::now() < end, "the load stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The versions of the last `n` answers.
    fn recent(&self, n: usize) -> Vec<String> {
        let l = self.last.lock().unwrap();
        l[l.len().saturating_sub(n)..].to_vec()
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failed)
    }
}

fn slots(svc: &PodmanService, app: &str) -> ContainerDeployer {
    ContainerDeployer::builder(app)
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .replica("blue", cd_testkit::held_port())
        .replica("green", cd_testkit::held_port())
        .health_http("/health")
        .health_timeout(Duration::from_secs(15))
        .stop_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_through_blue_green_a_traffic_canary_and_a_rollback() {
    remove_app("zero");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    for v in ["v1", "v2", "v3"] {
        image(v);
    }
    let d = slots(&svc, "zero");
    let targets = d.targets();
    let router = HttpRouter::builder("127.0.0.1:0")
        .upstreams_of(&targets)
        .drain_timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let cx = DeployContext::detached("production");
    let bg = BlueGreen::new(router.clone());

    // A fresh router sends everything to its first upstream (blue), where
    // nothing runs yet: v1 goes to the idle slot, green, then the client
    // starts.
    bg.deploy(&d, &Release::new("v1"), &targets, &cx)
        .await
        .unwrap();
    assert_eq!(router.active().await.unwrap().as_deref(), Some("green"));
    let load = Load::start(format!("{}/cgi-bin/app", router.url()));
    load.more(100).await;

    // Blue-green to v2: zero failures, then only v2 answers.
    let r = bg
        .deploy(&d, &Release::new("v2"), &targets, &cx)
        .await
        .unwrap();
    assert_eq!(r.active_slot.as_deref(), Some("blue"));
    load.more(100).await;
    assert!(
        load.recent(50).iter().all(|v| v == "v2"),
        "{:?}",
        load.recent(50)
    );

    // A traffic canary of v3 judged on the router's own samples.
    let canary = TrafficCanary::new(router.clone(), [10, 50, 100]).analysis(
        RouterMonitor::new(&router, 1.0).min_requests(5),
        Analysis::new()
            .initial_delay(Duration::from_millis(600))
            .count(2)
            .interval(Duration::from_millis(400)),
    );
    let report = canary
        .deploy(&d, &Release::new("v3"), &targets, &cx)
        .await
        .unwrap();
    assert_eq!(report.active_slot.as_deref(), Some("green"));
    assert_eq!(
        WeightedRouter::weights(&router).await.unwrap(),
        [("blue".to_string(), 0), ("green".to_string(), 100)]
    );
    load.more(100).await;
    assert!(
        load.recent(50).iter().all(|v| v == "v3"),
        "{:?}",
        load.recent(50)
    );

    // Roll the canary back (compensation): traffic returns to v2.
    canary.rollback(&d, &report, &cx).await.unwrap();
    load.more(100).await;
    assert!(
        load.recent(50).iter().all(|v| v == "v2"),
        "{:?}",
        load.recent(50)
    );

    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 400, "{ok}");
    let stats = router.stats();
    assert_eq!(stats.iter().map(|s| s.errors).sum::<u64>(), 0, "{stats:?}");
    d.remove_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_answering_500_is_sent_back_to_zero_on_the_routers_own_samples() {
    remove_app("bad");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    for v in ["v1", "bad"] {
        image(v);
    }
    let d = slots(&svc, "bad");
    let targets = d.targets();
    let router = HttpRouter::builder("127.0.0.1:0")
        .upstreams_of(&targets)
        .start()
        .await
        .unwrap();
    let sink = cd::core::CollectingSink::new();
    let events = cd::core::Emitter::new("run", 1, vec![Arc::new(sink.clone())], Default::default());
    let cx = DeployContext::new(events, Default::default(), "production");
    BlueGreen::new(router.clone())
        .deploy(&d, &Release::new("v1"), &targets, &cx)
        .await
        .unwrap();
    let load = Load::start(format!("{}/cgi-bin/app", router.url()));
    load.more(50).await;

    let canary = TrafficCanary::new(router.clone(), [20, 100]).analysis(
        RouterMonitor::new(&router, 1.0).min_requests(5),
        Analysis::new()
            .initial_delay(Duration::from_millis(800))
            .count(3)
            .interval(Duration::from_millis(300)),
    );
    let err = canary
        .deploy(&d, &Release::new("bad"), &targets, &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("aborted at step 1 (20%)"), "{msg}");
    assert!(msg.contains("blue:") && msg.contains("error(s)"), "{msg}");
    assert_eq!(
        router.weights(),
        [("blue".to_string(), 0), ("green".to_string(), 100)]
    );
    // An event says why; the old release keeps serving.
    let why = sink.events().iter().any(|e| {
        matches!(&e.kind, EventKind::Rollout { message, .. } if message.starts_with("all traffic back to green: analysis fail"))
    });
    assert!(why);
    load.more(50).await;
    assert!(
        load.recent(40).iter().all(|v| v == "v1"),
        "{:?}",
        load.recent(40)
    );
    let (_, failed) = load.stop().await;
    assert!(failed.iter().all(|f| f == "HTTP 500"), "{failed:?}");
    assert!(!failed.is_empty(), "the canary did serve some traffic");
    // The bad release's container is gone; blue is back to nothing.
    assert!(d.current(&targets[0]).await.unwrap().is_none());
    d.remove_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_replicas_behind_the_router_drops_nothing() {
    remove_app("pool");
    let Some(svc) = PodmanService::start() else {
        return;
    };
    for v in ["v1", "v2"] {
        image(v);
    }
    let mut b = ContainerDeployer::builder("pool")
        .socket(svc.socket().display().to_string())
        .image("localhost/cd-test:{version}")
        .health_http("/health")
        .health_timeout(Duration::from_secs(15))
        .stop_timeout(Duration::from_secs(2));
    for i in 1..=3 {
        b = b.replica(format!("web-{i}"), cd_testkit::held_port());
    }
    let d = b.build().unwrap();
    let targets = d.targets();
    let cx = DeployContext::detached("production");
    cd::core::Rolling::new()
        .batch_size(3)
        .deploy(&d, &Release::new("v1"), &targets, &cx)
        .await
        .unwrap();
    let router = HttpRouter::builder("127.0.0.1:0")
        .upstreams_of(&targets)
        .start()
        .await
        .unwrap();
    router.spread(&["web-1", "web-2", "web-3"]).unwrap();
    assert_eq!(
        router.weights().iter().map(|w| w.1).collect::<Vec<_>>(),
        [34, 33, 33]
    );
    let load = Load::start(format!("{}/cgi-bin/app", router.url()));
    load.more(100).await;

    // One replica at a time leaves the rotation, is replaced, comes back.
    let pool = cd::backends::router::Drained::new(d.clone(), router.clone());
    cd::core::Rolling::new()
        .batch_size(1)
        .deploy(&pool, &Release::new("v2"), &targets, &cx)
        .await
        .unwrap();
    load.more(100).await;
    assert!(
        load.recent(50).iter().all(|v| v == "v2"),
        "{:?}",
        load.recent(50)
    );
    assert_eq!(
        router.weights().iter().map(|w| w.1).collect::<Vec<_>>(),
        [34, 33, 33],
        "every replica back in rotation"
    );
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    d.remove_all().await.unwrap();
}
