//! Environment locks across real processes sharing one SQLite file.
//!
//! The second process is this test binary run again with `--ignored --exact
//! lock_helper` and a role in the environment (see [`lock_helper`]).
#![cfg(feature = "sqlite")]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_backends::sqlite::SqliteStore;
use cd_core::{
    stage_fn, ErrorKind, EventKind, FnSink, LockAttempt, LockRequest, LockSettings, Pipeline,
    Release, RunStatus, Runner, StageOutput, Store,
};

const ROLE: &str = "CD_LOCK_HELPER_ROLE";
const DB: &str = "CD_LOCK_HELPER_DB";
const HOLDER: &str = "CD_LOCK_HELPER_HOLDER";
const TRIALS: &str = "CD_LOCK_HELPER_TRIALS";
const LOG: &str = "CD_LOCK_HELPER_LOG";
const TTL_MS: &str = "CD_LOCK_HELPER_TTL_MS";

fn req(holder: &str, ttl: Duration) -> LockRequest {
    LockRequest {
        environment: "production".into(),
        holder: holder.into(),
        run_id: None,
        message: format!("{holder} is deploying v42"),
        ttl,
    }
}

async fn acquire(store: &SqliteStore, req: &LockRequest, poll: Duration) {
    loop {
        if let LockAttempt::Acquired(_) = store.try_acquire_lock(req).await.unwrap() {
            return;
        }
        tokio::time::sleep(poll).await;
    }
}

fn append(log: &Path, line: &str) {
    // O_APPEND: each small write lands whole and in order.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// Not a test: the second process of the tests below. Roles:
/// - `loop`: take and release the lock `CD_LOCK_HELPER_TRIALS` times,
///   logging `B holder` / `E holder` around each critical section;
/// - `hold`: take the lock, print `acquired`, then release it when a
///   `release` line arrives on stdin (and print `released`), or hold it
///   until killed.
#[test]
#[ignore = "child process of the other tests"]
fn lock_helper() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let db = PathBuf::from(std::env::var(DB).unwrap());
    let holder = std::env::var(HOLDER).unwrap();
    let ttl = Duration::from_millis(
        std::env::var(TTL_MS)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10_000),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = SqliteStore::open(&db).await.unwrap();
        let req = req(&holder, ttl);
        match role.as_str() {
            "loop" => {
                let trials: usize = std::env::var(TRIALS).unwrap().parse().unwrap();
                let log = PathBuf::from(std::env::var(LOG).unwrap());
                for _ in 0..trials {
                    acquire(&store, &req, Duration::from_millis(1)).await;
                    append(&log, &format!("B {holder}\n"));
                    std::thread::sleep(Duration::from_millis(2));
                    append(&log, &format!("E {holder}\n"));
                    assert!(store.release_lock("production", &holder).await.unwrap());
                }
                println!("done");
            }
            "hold" => {
                acquire(&store, &req, Duration::from_millis(5)).await;
                println!("acquired");
                std::io::stdout().flush().unwrap();
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).unwrap();
                if line.trim() == "release" {
                    assert!(store.release_lock("production", &holder).await.unwrap());
                    println!("released");
                    std::io::stdout().flush().unwrap();
                } else {
                    // Stdin closed: hold until killed.
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            "run" => {
                // A deploy binary as users write it: Ctrl-C cancels the run.
                let token = tokio_util::sync::CancellationToken::new();
                let on_signal = token.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    on_signal.cancel();
                });
                let store: Arc<dyn Store> = Arc::new(store);
                let pipeline = Pipeline::builder("web")
                    .stage(
                        "deploy",
                        stage_fn(|cx| async move {
                            cx.sleep(Duration::from_secs(600)).await?;
                            Ok(StageOutput::empty())
                        }),
                    )
                    .build()
                    .unwrap();
                let runner = Runner::new(store)
                    .environment("production")
                    .actor(holder.as_str())
                    .cancel_token(token)
                    .lock(LockSettings {
                        ttl,
                        wait_timeout: Duration::from_secs(30),
                        poll_interval: Duration::from_millis(20),
                    })
                    .sink(FnSink(|e: &cd_core::Event| {
                        if let EventKind::NodeStarted { .. } = e.kind {
                            println!("\nrunning");
                            let _ = std::io::stdout().flush();
                        }
                    }));
                let outcome = runner.run(&pipeline, Release::new("v42")).await;
                let status = match outcome {
                    Ok(report) => report.status.to_string(),
                    Err(e) => e.kind().to_string(),
                };
                println!("\nfinished {status}");
            }
            other => panic!("unknown role {other}"),
        }
    });
}

struct Helper {
    child: Child,
    out: mpsc::Receiver<String>,
}

impl Helper {
    fn start(role: &str, db: &Path, holder: &str, envs: &[(&str, String)]) -> Helper {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "lock_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(DB, db)
        .env(HOLDER, holder)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Helper { child, out }
    }

    /// Waits (at most a minute) for a line of the helper's stdout ending
    /// with `want` (libtest may print `test lock_helper ... ` before it).
    fn expect(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) if line.trim_end().ends_with(want) => return,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("helper did not print `{want}` within a minute")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("helper exited before printing `{want}`")
                }
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn no_overlap_between_two_processes_in_100_trials() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let log = dir.path().join("critical.log");
    // Create the file (and run migrations) once before the race.
    SqliteStore::open(&db).await.unwrap().close().await;
    let envs = [
        (TRIALS, "100".to_string()),
        (LOG, log.display().to_string()),
    ];
    let mut a = Helper::start("loop", &db, "proc-a", &envs);
    let mut b = Helper::start("loop", &db, "proc-b", &envs);
    a.expect("done");
    b.expect("done");
    assert!(a.child.wait().unwrap().success());
    assert!(b.child.wait().unwrap().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let mut inside: Option<&str> = None;
    let mut sections = 0;
    let mut handovers = 0;
    let mut last: Option<&str> = None;
    for line in text.lines() {
        let (what, who) = line.split_once(' ').unwrap();
        match (what, inside) {
            ("B", None) => {
                inside = Some(who);
                sections += 1;
                if last.is_some_and(|l| l != who) {
                    handovers += 1;
                }
            }
            ("E", Some(h)) if h == who => {
                inside = None;
                last = Some(who);
            }
            _ => panic!("overlap: `{line}` while {inside:?} was inside\n{text}"),
        }
    }
    assert_eq!(sections, 200);
    // The waiter queue hands the lock over instead of letting one process
    // take it back again and again.
    assert!(
        handovers >= 50,
        "only {handovers} handovers in 200 sections"
    );
}

/// A holder SIGKILLed on this machine is provably gone (its pid is dead):
/// the waiter takes the lease at once, long before its ttl, and the take-over
/// is audited. (Another machine's dead holder still lapses at the ttl.)
#[tokio::test]
async fn a_killed_holders_lease_is_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let mut holder = Helper::start("hold", &db, "victim", &[(TTL_MS, "30000".into())]);
    holder.expect("acquired");
    let store = SqliteStore::open(&db).await.unwrap();
    let me = req("survivor", Duration::from_secs(30));
    let lease = match store.try_acquire_lock(&me).await.unwrap() {
        LockAttempt::Busy(Some(lease)) => lease,
        other => panic!("expected the victim's lease, got {other:?}"),
    };
    assert_eq!(lease.holder, "victim");
    holder.child.kill().unwrap(); // SIGKILL: no release, no renewals.
    holder.child.wait().unwrap();

    let acquired = match store.try_acquire_lock(&me).await.unwrap() {
        LockAttempt::Acquired(l) => l,
        other => panic!("the dead holder's lease was not taken over: {other:?}"),
    };
    assert_eq!(acquired.holder, "survivor");
    assert!(
        acquired.acquired_at < lease.expires_at,
        "taken over before the lease would have expired"
    );
    let audit = store.lock_audit(Some("production"), 10).await.unwrap();
    assert!(
        audit.iter().any(|a| a.action == "take_over"
            && a.holder.as_deref() == Some("victim")
            && a.reason.as_deref().is_some_and(|r| r.contains("is gone"))),
        "{audit:?}"
    );
}

#[tokio::test]
async fn release_frees_the_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    // A long lease: only an explicit release can free it within the test.
    let mut holder = Helper::start("hold", &db, "holder", &[(TTL_MS, "600000".into())]);
    holder.expect("acquired");
    let store = SqliteStore::open(&db).await.unwrap();
    let me = req("next", Duration::from_secs(30));
    assert!(matches!(
        store.try_acquire_lock(&me).await.unwrap(),
        LockAttempt::Busy(Some(_))
    ));
    holder.say("release");
    holder.expect("released");
    // The first try after the release gets it: no waiting at all.
    match store.try_acquire_lock(&me).await.unwrap() {
        LockAttempt::Acquired(l) => assert_eq!(l.holder, "next"),
        other => panic!("lock not free right after release: {other:?}"),
    }
}

#[tokio::test]
async fn a_waiter_past_its_timeout_learns_the_holders_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let mut holder = Helper::start(
        "hold",
        &db,
        "deployer@ci-7 pid 4242",
        &[(TTL_MS, "600000".into())],
    );
    holder.expect("acquired");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
    let pipeline = Pipeline::builder("web")
        .stage("deploy", stage_fn(|_| async { Ok(StageOutput::empty()) }))
        .build()
        .unwrap();
    let runner = Runner::new(store.clone())
        .environment("production")
        .actor("bob")
        .lock(LockSettings {
            ttl: Duration::from_secs(5),
            wait_timeout: Duration::from_millis(600),
            poll_interval: Duration::from_millis(50),
        });
    let t0 = Instant::now();
    let err = runner
        .run(&pipeline, Release::new("v43"))
        .await
        .unwrap_err();
    let waited = t0.elapsed();
    assert_eq!(err.kind(), ErrorKind::Locked);
    let text = err.to_string();
    assert!(text.contains("deployer@ci-7 pid 4242"), "{text}");
    assert!(
        text.contains("deployer@ci-7 pid 4242 is deploying v42"),
        "{text}"
    );
    assert!(
        waited >= Duration::from_millis(600),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "gave up after {waited:?}");
    // Giving up leaves the queue, so it does not block the next one.
    let sqlite = SqliteStore::open(&db).await.unwrap();
    assert!(sqlite
        .lock_waiters(Some("production"))
        .await
        .unwrap()
        .is_empty());

    // Once the holder releases, the same runner goes through.
    holder.say("release");
    holder.expect("released");
    let report = runner.run(&pipeline, Release::new("v43")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    assert!(store.locks().await.unwrap().is_empty());
}

#[tokio::test]
async fn ctrl_c_releases_the_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    // A 10-minute lease: only the cancelled run's release can free it.
    let mut deploying = Helper::start("run", &db, "alice", &[(TTL_MS, "600000".into())]);
    deploying.expect("running");
    let store = SqliteStore::open(&db).await.unwrap();
    let me = req("bob", Duration::from_secs(30));
    match store.try_acquire_lock(&me).await.unwrap() {
        LockAttempt::Busy(Some(l)) => assert!(l.holder.starts_with("alice@"), "{l:?}"),
        other => panic!("expected the run to hold the lock, got {other:?}"),
    }
    let pid = deploying.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    loop {
        match store.try_acquire_lock(&me).await.unwrap() {
            LockAttempt::Acquired(l) => {
                assert_eq!(l.holder, "bob");
                break;
            }
            LockAttempt::Busy(_) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "lock still held 5 s after Ctrl-C"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    deploying.expect("finished cancelled");
}
