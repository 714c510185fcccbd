//! Crash and resume: a child process runs a pipeline of local deploys
//! against a SQLite store; the test SIGKILLs it at seeded random points (at
//! least 20 per run), restarts it with `Runner::resume`, and checks that the
//! run completes, that no node that had completed ran again, that every local
//! target ends on the release's version (asked over HTTP), and that the
//! store's release history agrees with what is deployed.
//!
//! The seed is printed; set `CD_CRASH_SEED` to replay a schedule. The child is
//! this test binary run again with `--ignored --exact crash_helper`.
#![cfg(all(feature = "sqlite", feature = "local"))]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_backends::local::LocalProcessDeployer;
use cd_backends::sqlite::SqliteStore;
use cd_core::{
    Capabilities, Deployer, Error, EventKind, FnSink, LockSettings, Pipeline, Release,
    ReleaseStatus, Result, RunStatus, Runner, Stage, StageContext, StageOutput, Store,
};
use cd_stages::Deploy;
use cd_testkit::TestChild;
use rand::{Rng, SeedableRng};

const ENV: &str = "production";
const HELPER_ENV: &str = "CD_CRASH_HELPER";

/// Everything the child needs, passed as one environment variable.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Setup {
    db: PathBuf,
    journal: PathBuf,
    state_dir: PathBuf,
    www: PathBuf,
    ports: Vec<u16>,
    version: String,
    resume: Option<String>,
}

fn deployer(setup: &Setup) -> LocalProcessDeployer {
    let mut b = LocalProcessDeployer::builder()
        .name("py-http")
        .program("python3")
        .args([
            "-m".to_string(),
            "http.server".to_string(),
            "{port}".to_string(),
            "--bind".to_string(),
            "127.0.0.1".to_string(),
            "--directory".to_string(),
            setup.www.join("{version}").display().to_string(),
        ])
        .health_path("/version.txt")
        .health_timeout(Duration::from_secs(20))
        .stop_timeout(Duration::from_secs(5))
        .state_dir(&setup.state_dir);
    for (i, port) in setup.ports.iter().enumerate() {
        b = b.target(format!("web{}", i + 1), *port);
    }
    b.build().unwrap()
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
    f.sync_data().unwrap();
}

/// A stage that records `start <node>` and `done <node>` in a journal.
struct Journaled<S> {
    inner: S,
    journal: PathBuf,
}

#[async_trait]
impl<S: Stage> Stage for Journaled<S> {
    fn kind(&self) -> String {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        append(&self.journal, &format!("start {}", cx.node()));
        let out = self.inner.run(cx).await?;
        append(&self.journal, &format!("done {}", cx.node()));
        Ok(out)
    }

    async fn rollback(&self, cx: &StageContext, output: &StageOutput) -> Result<()> {
        self.inner.rollback(cx, output).await
    }
}

/// Sleeps, then outputs its name and the release (checked downstream).
struct Work {
    ms: u64,
}

#[async_trait]
impl Stage for Work {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            rollback: false,
            idempotent: true,
        }
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
        Ok(StageOutput::json(serde_json::json!({
            "node": cx.node(),
            "version": cx.release().version,
        })))
    }
}

/// After the deploy: every target answers with the release's version, and
/// the outputs of nodes completed in earlier processes were restored.
struct Smoke {
    ports: Vec<u16>,
    needs: Vec<String>,
}

#[async_trait]
impl Stage for Smoke {
    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        for n in &self.needs {
            let out = cx.require_output(n)?;
            if out.get_str("version") != Some(cx.release().version.as_str()) {
                return Err(Error::failed(format!("output of {n} was not restored")));
            }
        }
        for port in &self.ports {
            let body = http_get(*port, "/version.txt")
                .map_err(|e| Error::failed(format!("port {port}: {e}")))?;
            if body.trim() != cx.release().version {
                return Err(Error::failed(format!(
                    "port {port} serves {body:?}, not {}",
                    cx.release().version
                )));
            }
        }
        Ok(StageOutput::json(
            serde_json::json!({"version": cx.release().version}),
        ))
    }
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "status line {:?}",
            head.lines().next()
        )));
    }
    Ok(body.to_string())
}

const CHECKS: usize = 12;
const SMOKES: usize = 6;

/// The pipeline: build, twelve checks, package, deploy to three local
/// targets (one at a time), six smoke checks, report.
fn pipeline(setup: &Setup) -> Pipeline {
    let journal = setup.journal.clone();
    let work = |ms| Journaled {
        inner: Work { ms },
        journal: journal.clone(),
    };
    let mut b = Pipeline::builder("crash-resume").stage("build", work(40));
    for i in 1..=CHECKS {
        b = b
            .stage(format!("check-{i}"), work(25 + 5 * (i as u64 % 7)))
            .needs(["build"]);
    }
    b = b
        .stage("package", work(40))
        .needs((1..=CHECKS).map(|i| format!("check-{i}")))
        .stage(
            "deploy",
            Journaled {
                inner: Deploy::new(deployer(setup)),
                journal: journal.clone(),
            },
        )
        .needs(["package"]);
    for i in 1..=SMOKES {
        b = b
            .stage(
                format!("smoke-{i}"),
                Journaled {
                    inner: Smoke {
                        ports: setup.ports.clone(),
                        needs: vec!["build".into(), "package".into()],
                    },
                    journal: journal.clone(),
                },
            )
            .needs(["deploy"]);
    }
    b.stage("report", work(30))
        .needs((1..=SMOKES).map(|i| format!("smoke-{i}")))
        .build()
        .unwrap()
}

/// Not a test: the child process. Runs (or resumes) the pipeline, printing
/// `event <kind> <node>` for each node start, success and deploy step (the
/// test kills it after a random number of these) and `finished <status>`
/// at the end.
#[test]
#[ignore = "child process of crash_resume"]
fn crash_helper() {
    let Ok(raw) = std::env::var(HELPER_ENV) else {
        return;
    };
    let setup: Setup = serde_json::from_str(&raw).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&setup.db).await.unwrap());
        let p = pipeline(&setup);
        let runner = Runner::new(store)
            .environment(ENV)
            .actor("crash-test")
            .concurrency(2)
            .lock(LockSettings {
                ttl: Duration::from_millis(300),
                wait_timeout: Duration::from_secs(30),
                poll_interval: Duration::from_millis(20),
            })
            .sink(FnSink(|e: &cd_core::Event| {
                let kind = match &e.kind {
                    EventKind::NodeStarted { .. } => "started",
                    EventKind::NodeSucceeded { .. } => "succeeded",
                    EventKind::Progress { .. } => "progress",
                    _ => return,
                };
                println!("\nevent {kind} {}", e.node.as_deref().unwrap_or("-"));
                let _ = std::io::stdout().flush();
            }));
        let report = match &setup.resume {
            Some(id) => runner.resume(id, &p).await.unwrap(),
            None => runner.run(&p, Release::new(&setup.version)).await.unwrap(),
        };
        println!("\nfinished {}", report.status);
        let _ = std::io::stdout().flush();
    });
}

fn start(setup: &Setup) -> TestChild {
    let setup = serde_json::to_string(setup).unwrap();
    TestChild::start("crash_helper", (HELPER_ENV, &setup), Stdio::inherit())
}

/// What a child did while the test watched.
enum Seen {
    /// It emitted the node events waited for.
    Events,
    /// It finished the run (`finished <status>`).
    Finished(String),
    /// Nothing more within the time allowed.
    Silent,
}

/// Waits for `n` node events (or the end of the run), within `within`.
fn wait_events(inc: &TestChild, n: usize, within: Duration) -> Seen {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    loop {
        match inc.next_line(deadline) {
            Some(l) => {
                if let Some((_, status)) = l.split_once("finished ") {
                    return Seen::Finished(status.trim().to_string());
                }
                if l.contains("event ") {
                    seen += 1;
                    if seen == n {
                        return Seen::Events;
                    }
                }
            }
            None => return Seen::Silent,
        }
    }
}

fn journal_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The running run of `version`, if the killed process got to create it.
async fn running_run(db: &Path, version: &str) -> Option<String> {
    let store = SqliteStore::open(db).await.unwrap();
    let runs = store.list_runs(100).await.unwrap();
    store.close().await;
    runs.into_iter()
        .find(|r| r.release.version == version && r.status == RunStatus::Running)
        .map(|r| r.id)
}

/// Completed node names of a run, as the store has them.
async fn completed(db: &Path, run_id: &str) -> BTreeSet<String> {
    let store = SqliteStore::open(db).await.unwrap();
    let nodes = store.nodes(run_id).await.unwrap();
    store.close().await;
    nodes
        .into_iter()
        .filter(|n| n.status.completed())
        .map(|n| n.node.to_string())
        .collect()
}

/// One run of `version`, killed `kills` times, then let finish.
async fn crash_and_resume(
    setup: &mut Setup,
    version: &str,
    rng: &mut rand::rngs::StdRng,
) -> (String, usize) {
    setup.version = version.into();
    setup.resume = None;
    let _ = std::fs::remove_file(&setup.journal);
    let kills_planned = 20 + rng.gen_range(0..5);
    // (journal length, completed nodes) at each kill.
    let mut snapshots: Vec<(usize, BTreeSet<String>)> = Vec::new();
    let mut kills = 0;
    let mut run_id: Option<String> = None;
    let mut schedule = Vec::new();
    let final_status = loop {
        setup.resume = run_id.clone();
        let mut inc = start(setup);
        if kills < kills_planned {
            // Kill after 1 to 4 more node events, plus up to 25 ms: the kill
            // lands inside a stage, a deploy step or a store write.
            let events = rng.gen_range(1..=4usize);
            let jitter = rng.gen_range(0..25u64);
            schedule.push((events, jitter));
            match wait_events(&inc, events, Duration::from_secs(60)) {
                Seen::Events => {}
                Seen::Finished(status) if status != "succeeded" => {
                    panic!("{version}: {}", explain(&setup.db, version).await)
                }
                Seen::Finished(status) => panic!(
                    "{version}: the run finished ({status}) after only {kills} kills; \
                     the pipeline is too short for the schedule"
                ),
                Seen::Silent => panic!("{version}: the child made no progress for 60 s"),
            }
            std::thread::sleep(Duration::from_millis(jitter));
            inc.child.kill().unwrap(); // SIGKILL
            inc.child.wait().unwrap();
            kills += 1;
            if run_id.is_none() {
                run_id = running_run(&setup.db, version).await;
            }
            let done = match &run_id {
                Some(id) => completed(&setup.db, id).await,
                None => BTreeSet::new(),
            };
            snapshots.push((journal_lines(&setup.journal).len(), done));
            continue;
        }
        let finished = match wait_events(&inc, usize::MAX, Duration::from_secs(120)) {
            Seen::Finished(status) if status != "succeeded" => {
                panic!("{version}: {}", explain(&setup.db, version).await)
            }
            Seen::Finished(status) => status,
            _ => panic!("{version}: the resumed run did not finish"),
        };
        assert!(inc.child.wait().unwrap().success());
        break finished;
    };
    println!("{version}: killed at {kills} points; (node events, jitter ms) before each kill: {schedule:?}");
    let progress: Vec<usize> = snapshots.iter().map(|(_, done)| done.len()).collect();
    println!("{version}: completed nodes at each kill: {progress:?}");
    let mid_deploy = snapshots
        .iter()
        .filter(|(len, done)| {
            !done.contains("deploy")
                && journal_lines(&setup.journal)[..*len].contains(&"start deploy".to_string())
        })
        .count();
    println!("{version}: kills while the deploy node had started but not completed: {mid_deploy}");
    assert!(kills >= 20);
    assert_eq!(
        final_status, "succeeded",
        "{version}: run ended {final_status}"
    );
    let run_id = running_run_or_last(&setup.db, version).await;

    // No node that had completed ran again.
    let journal = journal_lines(&setup.journal);
    for (k, (len, done)) in snapshots.iter().enumerate() {
        for line in &journal[*len..] {
            if let Some(node) = line.strip_prefix("start ") {
                assert!(
                    !done.contains(node),
                    "{version}: node {node} completed before kill #{} and ran again",
                    k + 1
                );
            }
        }
    }
    // Every node finished at least once, and reruns happened only for
    // nodes interrupted by a kill.
    let p = pipeline(setup);
    for n in p.nodes() {
        assert!(
            journal.contains(&format!("done {}", n.name)),
            "{version}: {} never finished",
            n.name
        );
    }
    (run_id, kills)
}

async fn running_run_or_last(db: &Path, version: &str) -> String {
    let store = SqliteStore::open(db).await.unwrap();
    let runs = store.list_runs(100).await.unwrap();
    store.close().await;
    runs.into_iter()
        .find(|r| r.release.version == version)
        .map(|r| {
            assert_eq!(r.status, RunStatus::Succeeded);
            r.id
        })
        .unwrap()
}

/// Why the run of `version` failed: its failed nodes and their errors.
async fn explain(db: &Path, version: &str) -> String {
    let store = SqliteStore::open(db).await.unwrap();
    let mut out = String::new();
    for r in store.list_runs(100).await.unwrap() {
        if r.release.version != version {
            continue;
        }
        out.push_str(&format!("run {} {}\n", r.id, r.status));
        for n in store.nodes(&r.id).await.unwrap() {
            if let Some(e) = &n.error {
                out.push_str(&format!(
                    "  {} {} (attempts {}): {e}\n",
                    n.node, n.status, n.attempts
                ));
            }
        }
    }
    store.close().await;
    out
}

/// Kills the servers this test started that no state file names any more
/// (their command line contains the test's own temporary `www` path).
fn kill_servers_under(www: &Path) {
    let needle = www.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runs_resume_to_completion() {
    let seed: u64 = std::env::var("CD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("crash_resume seed: {seed} (replay with CD_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    for v in ["v1", "v2"] {
        std::fs::create_dir_all(www.join(v)).unwrap();
        std::fs::write(www.join(v).join("version.txt"), v).unwrap();
    }
    let mut ports = Vec::new();
    while ports.len() < 3 {
        let p = cd_testkit::held_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let mut setup = Setup {
        db: dir.path().join("state.db"),
        journal: dir.path().join("journal.log"),
        state_dir: dir.path().join("local"),
        www,
        ports: ports.clone(),
        version: String::new(),
        resume: None,
    };
    let local = deployer(&setup);
    let outcome = async {
        for version in ["v1", "v2"] {
            let (run_id, _) = crash_and_resume(&mut setup, version, &mut rng).await;

            // Every target runs this version, as its process says over HTTP.
            let mut live = Vec::new();
            for (i, t) in local.targets().iter().enumerate() {
                let rev = local
                    .current(t)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("{version}: {} runs nothing", t.name));
                assert_eq!(rev.version, version, "{version}: target {}", t.name);
                assert_eq!(http_get(ports[i], "/version.txt").unwrap().trim(), version);
                live.push(rev);
            }

            // The release history agrees with what is deployed.
            let store = SqliteStore::open(&setup.db).await.unwrap();
            let history = store.release_history(ENV, 100).await.unwrap();
            store.close().await;
            let lives: Vec<_> = history
                .iter()
                .filter(|r| r.status == ReleaseStatus::Live)
                .collect();
            assert_eq!(lives.len(), 1, "{version}: live releases {history:#?}");
            let rec = lives[0];
            assert_eq!(rec.version, version);
            assert_eq!(rec.run_id.as_deref(), Some(run_id.as_str()));
            let mut recorded: Vec<_> = rec
                .revisions
                .iter()
                .map(|r| (r.target.clone(), r.version.clone(), r.id.clone()))
                .collect();
            recorded.sort();
            let mut actual: Vec<_> = live
                .iter()
                .map(|r| (r.target.clone(), r.version.clone(), r.id.clone()))
                .collect();
            actual.sort();
            assert_eq!(recorded, actual, "{version}: history vs deployed");
            if version == "v2" {
                assert!(history
                    .iter()
                    .any(|r| r.version == "v1" && r.status == ReleaseStatus::Superseded));
            }
        }
    };
    // Stop the servers whatever happened.
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    let _ = local.stop_all().await;
    kill_servers_under(&setup.www);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
