//! Crash safety of the run record, its events and its lease (issue 9, cases
//! 1, 2 and 5): a child process starts a run whose gate waits, and is
//! SIGKILLed there. Its events up to the gate's record are durable; resuming
//! continues the event numbers; a new run takes the dead run's environment
//! at once and records the dead run `abandoned`; `cdctl run abandon` gives
//! up a dead run and refuses a live one.
//!
//! The child is this test binary run again with `--ignored --exact
//! lease_holder`.
#![cfg(feature = "sqlite")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cd_backends::sqlite::SqliteStore;
use cd_core::{
    gate_fn, stage_fn, EventKind, LockSettings, NodeStatus, Pipeline, Release, RunStatus, Runner,
    StageOutput, Store, Verdict,
};

const HELPER_ENV: &str = "CD_LEASE_HOLDER_DB";
const ENV: &str = "production";

fn pipeline() -> Pipeline {
    Pipeline::builder("held")
        .stage(
            "staging",
            stage_fn(|cx| async move {
                cx.log("staging deployed");
                Ok(StageOutput::empty())
            }),
        )
        .gate(
            "approval",
            gate_fn(|_| async { Ok(Verdict::wait(Duration::from_millis(200), "approval")) }),
        )
        .needs(["staging"])
        .build()
        .unwrap()
}

fn settings() -> LockSettings {
    LockSettings {
        ttl: Duration::from_secs(60),
        wait_timeout: Duration::from_secs(3),
        poll_interval: Duration::from_millis(50),
    }
}

/// The child: runs `pipeline()` in `production`; prints `waiting <run id>`
/// once the gate waits; then waits to be killed.
#[test]
#[ignore = "run as a child process by the tests of this file"]
fn lease_holder() {
    let Ok(db) = std::env::var(HELPER_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
        let runner = Runner::new(store.clone()).environment(ENV).lock(settings());
        let p = pipeline();
        let run = tokio::spawn(async move { runner.run(&p, Release::new("v1")).await });
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let Some(r) = store.list_runs(1).await.unwrap().into_iter().next() else {
                continue;
            };
            let nodes = store.nodes(&r.id).await.unwrap();
            if nodes
                .iter()
                .any(|n| n.node.as_ref() == "approval" && n.status == NodeStatus::Waiting)
            {
                println!("waiting {}", r.id);
                break;
            }
        }
        let _ = run.await;
    });
}

struct Holder {
    child: Child,
    run_id: String,
}

impl Holder {
    /// Starts a child holding `production` in `db`; returns once its gate
    /// waits.
    fn start(db: &Path) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "lease_holder", "--nocapture"])
            .env(HELPER_ENV, db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut run_id = None;
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("waiting ") {
                run_id = Some(id.trim().to_string());
                break;
            }
        }
        Holder {
            child,
            run_id: run_id.expect("the child printed its run id"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    (dir, db)
}

fn quick() -> Pipeline {
    Pipeline::builder("next")
        .stage("noop", stage_fn(|_| async { Ok(StageOutput::empty()) }))
        .build()
        .unwrap()
}

/// Cases 1 and 2: killed while its gate waits, the run's events up to the
/// gate's record are in the store; a new run takes the environment at once
/// (not after the 60 s lease) and the dead run is recorded abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_keeps_its_events_and_its_environment_is_taken_over_at_once() {
    let (_dir, db) = temp_db();
    let mut holder = Holder::start(&db);
    holder.kill();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
    let events = store.events(&holder.run_id, 0, 1000).await.unwrap();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            let k = format!("{:?}", e.kind);
            k.split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    for want in ["RunStarted", "NodeSucceeded", "GateWaiting"] {
        assert!(
            events
                .iter()
                .any(|e| format!("{:?}", e.kind).starts_with(want)),
            "{want} missing from the durable events: {kinds:?}"
        );
    }
    assert!(events.iter().any(
        |e| matches!(&e.kind, EventKind::Log { message, .. } if message == "staging deployed")
    ));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // A new run (not a resume): the owner is provably gone, so the lease is
    // taken at once; the wait limit is 3 s, the lease 60 s.
    let report = Runner::new(store.clone())
        .environment(ENV)
        .lock(settings())
        .run(&quick(), Release::new("v2"))
        .await
        .expect("the dead run's lease is taken over at once");
    assert_eq!(report.status, RunStatus::Succeeded);
    let dead = store.get_run(&holder.run_id).await.unwrap().unwrap();
    assert_eq!(dead.status, RunStatus::Abandoned);
    assert!(store.locks().await.unwrap().is_empty());
}

/// Case 1: resuming a killed run continues its event numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_continues_the_event_numbers() {
    let (_dir, db) = temp_db();
    let mut holder = Holder::start(&db);
    holder.kill();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
    let before = store.last_event_seq(&holder.run_id).await.unwrap();
    assert!(
        before >= 4,
        "events were persisted before the kill: {before}"
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let runner = Runner::new(store.clone())
        .environment(ENV)
        .lock(settings())
        .cancel_token(cancel.clone());
    let id = holder.run_id.clone();
    let resumed = tokio::spawn(async move { runner.resume(&id, &pipeline()).await });
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while store.last_event_seq(&holder.run_id).await.unwrap() <= before + 1 {
        assert!(
            std::time::Instant::now() < end,
            "the resumed run emitted nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    let report = resumed.await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Cancelled);
    let events = store.events(&holder.run_id, 0, 10_000).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "numbers continue without reuse or gap"
    );
    assert!(events
        .iter()
        .any(|e| e.seq == before + 1 && matches!(e.kind, EventKind::RunResumed)));
}

/// Case 5: a lease whose run is missing or finished is free at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_missing_or_finished_runs_are_stale_in_both_stores() {
    let (_dir, db) = temp_db();
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
    let memory: Arc<dyn Store> = Arc::new(cd_core::MemoryStore::new());
    for store in [sqlite, memory] {
        let held = |run: &str| cd_core::LockRequest {
            environment: ENV.into(),
            holder: format!("crashed-{run}"),
            run_id: Some(run.into()),
            message: "left by a crash".into(),
            ttl: Duration::from_secs(3600),
        };
        // Locked for a run that was never recorded (crash between the two).
        store.try_acquire_lock(&held("ghost")).await.unwrap();
        let r = Runner::new(store.clone())
            .environment(ENV)
            .lock(settings())
            .run(&quick(), Release::new("v1"))
            .await
            .expect("a lease for a missing run is free");
        assert_eq!(r.status, RunStatus::Succeeded);
        // Locked for a run that finished (crash before the release).
        store.try_acquire_lock(&held(&r.run_id)).await.unwrap();
        let r2 = Runner::new(store.clone())
            .environment(ENV)
            .lock(settings())
            .run(&quick(), Release::new("v2"))
            .await
            .expect("a lease for a finished run is free");
        assert_eq!(r2.status, RunStatus::Succeeded);
        assert!(store.locks().await.unwrap().is_empty());
    }
}

fn cdctl(db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap()
}

/// Case 2: `cdctl run abandon` refuses a run whose owner is alive, gives up
/// a dead one (audited, lease freed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdctl_abandons_a_dead_run_and_refuses_a_live_one() {
    let (_dir, db) = temp_db();
    let mut holder = Holder::start(&db);
    let out = cdctl(&db, &["run", "abandon", &holder.run_id, "--reason", "test"]);
    assert!(!out.status.success(), "a live run must not be abandoned");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may be alive"), "{err}");
    holder.kill();
    let out = cdctl(
        &db,
        &[
            "run",
            "abandon",
            &holder.run_id[..8],
            "--reason",
            "host rebooted",
            "--as",
            "alice",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = SqliteStore::open(&db).await.unwrap();
    let run = store.get_run(&holder.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Abandoned);
    assert!(store.locks().await.unwrap().is_empty());
    let events = store.events(&holder.run_id, 0, 1000).await.unwrap();
    assert!(events.iter().any(|e| matches!(&e.kind,
        EventKind::RunAbandoned { actor, reason } if actor == "alice" && reason == "host rebooted")));
    // Finished runs cannot be abandoned again.
    let out = cdctl(
        &db,
        &["run", "abandon", &holder.run_id, "--reason", "again"],
    );
    assert!(!out.status.success());
}
