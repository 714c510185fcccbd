//! The `Store` contract against `SqliteStore`: runs, nodes, events, approvals,
//! locks and release history behave as `MemoryStore` does; migrations
//! upgrade a database written by the first schema version; bad files are
//! reported and left untouched; an acknowledged append survives SIGKILL.
#![cfg(feature = "sqlite")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cd_backends::sqlite::SqliteStore;
use cd_core::{
    ApprovalRecord, Decision, ErrorInfo, ErrorKind, Event, EventKind, Lease, LockAttempt,
    LockRequest, LogLevel, MemoryStore, NodeRecord, NodeStatus, Release, ReleaseRecord,
    ReleaseStatus, Revision, RunRecord, RunStatus, Store,
};
use chrono::{DateTime, TimeZone, Utc};

const FIXTURE_V1: &str = "tests/fixtures/sqlite/v1.db";

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 123_456_789)
        .unwrap()
}

fn run(id: &str, env: &str, started: i64) -> RunRecord {
    RunRecord {
        id: id.into(),
        pipeline: "web".into(),
        definition_hash: "abc123".into(),
        release: Release::new("v1")
            .artifact("target/app.tar.gz")
            .config("replicas", 3),
        environment: env.into(),
        status: RunStatus::Running,
        started_by: "alice@host".into(),
        started_at: at(started),
        finished_at: None,
    }
}

fn event(run_id: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        run_id: run_id.into(),
        seq,
        at: at(seq as i64),
        node: if seq.is_multiple_of(2) {
            Some("deploy".into())
        } else {
            None
        },
        kind,
    }
}

fn log(run_id: &str, seq: u64) -> Event {
    event(
        run_id,
        seq,
        EventKind::Log {
            level: LogLevel::Info,
            message: format!("line {seq}"),
        },
    )
}

fn release(id: &str, env: &str, version: &str, at_s: i64, status: ReleaseStatus) -> ReleaseRecord {
    ReleaseRecord {
        id: id.into(),
        environment: env.into(),
        version: version.into(),
        release: Release::new(version).config("k", "v"),
        revisions: vec![Revision {
            target: "web1".into(),
            version: version.into(),
            id: format!("/srv/app/releases/{version}"),
            deployed_at: Some(at(at_s)),
            detail: serde_json::json!({"port": 8080}),
        }],
        status,
        run_id: Some(format!("run-{id}")),
        actor: "alice".into(),
        at: at(at_s),
        updated_at: at(at_s),
        restored_from: None,
    }
}

/// A lock request for no run (a run's lease is stale once its run is
/// missing or finished; see `leases_of_missing_or_finished_runs_are_stale`).
fn req(env: &str, holder: &str, ttl: Duration) -> LockRequest {
    LockRequest {
        environment: env.into(),
        holder: holder.into(),
        run_id: None,
        message: format!("{holder} deploys"),
        ttl,
    }
}

async fn open_temp() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("state.db"))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn open_creates_parent_directories_and_reports_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/.cd/state.db");
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(path.is_file());
    assert_eq!(store.path(), path);
    assert_eq!(store.schema_version(), SqliteStore::latest_schema_version());
    assert!(SqliteStore::latest_schema_version() >= 2);
    // WAL mode is recorded in the file header (bytes 18 and 19 are 2).
    store.close().await;
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..16], b"SQLite format 3\0");
    assert_eq!((bytes[18], bytes[19]), (2, 2), "file is not in WAL mode");
}

#[tokio::test]
async fn runs_round_trip_newest_first() {
    let (_dir, store) = open_temp().await;
    store.create_run(&run("r1", "staging", 1)).await.unwrap();
    store.create_run(&run("r3", "production", 3)).await.unwrap();
    store.create_run(&run("r2", "staging", 2)).await.unwrap();

    assert_eq!(
        store.get_run("r1").await.unwrap(),
        Some(run("r1", "staging", 1))
    );
    assert_eq!(store.get_run("nope").await.unwrap(), None);
    let ids: Vec<_> = store
        .list_runs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["r3", "r2", "r1"]);
    assert_eq!(store.list_runs(2).await.unwrap().len(), 2);

    store
        .set_run_status("r1", RunStatus::Succeeded, Some(at(10)))
        .await
        .unwrap();
    let r1 = store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(r1.status, RunStatus::Succeeded);
    assert_eq!(r1.finished_at, Some(at(10)));

    let err = store
        .set_run_status("missing", RunStatus::Failed, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // Creating again replaces, as MemoryStore does.
    let mut again = run("r1", "staging", 1);
    again.started_by = "bob".into();
    store.create_run(&again).await.unwrap();
    assert_eq!(
        store.get_run("r1").await.unwrap().unwrap().started_by,
        "bob"
    );
    assert_eq!(store.list_runs(10).await.unwrap().len(), 3);

    // find_run accepts a unique prefix.
    assert_eq!(store.find_run("r3").await.unwrap().id, "r3");
    store.create_run(&run("abc-1", "staging", 5)).await.unwrap();
    store.create_run(&run("abd-2", "staging", 6)).await.unwrap();
    assert_eq!(store.find_run("abd").await.unwrap().id, "abd-2");
    assert_eq!(
        store.find_run("ab").await.unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        store.find_run("zz").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn node_records_are_replaced_and_ordered_like_memory_store() {
    let (_dir, store) = open_temp().await;
    let memory = MemoryStore::new();
    let mut build = NodeRecord::pending("r1", "build");
    let mut deploy = NodeRecord::pending("r1", "deploy");
    let tests = NodeRecord::pending("r1", "tests");
    let other = NodeRecord::pending("r2", "build");
    for s in [&store as &dyn Store, &memory] {
        s.put_node(&build).await.unwrap();
        s.put_node(&deploy).await.unwrap();
        s.put_node(&tests).await.unwrap();
        s.put_node(&other).await.unwrap();
    }
    build.status = NodeStatus::Succeeded;
    build.attempts = 2;
    build.started_at = Some(at(5));
    build.finished_at = Some(at(6));
    build.output = Some(serde_json::json!({"image": "app:v1", "n": [1, 2]}));
    deploy.status = NodeStatus::Failed;
    deploy.attempts = 1;
    deploy.started_at = Some(at(1));
    deploy.error = Some(ErrorInfo {
        kind: ErrorKind::Failed,
        message: "exit 1 (target=web1)".into(),
        retryable: false,
        context: vec![("target".into(), "web1".into())],
    });
    deploy.recheck_at = Some(at(100));
    // Several records in one call (one transaction for SQLite).
    for s in [&store as &dyn Store, &memory] {
        s.put_nodes(&[build.clone(), deploy.clone()]).await.unwrap();
        s.put_nodes(&[]).await.unwrap();
    }
    let got = store.nodes("r1").await.unwrap();
    assert_eq!(got, memory.nodes("r1").await.unwrap());
    let names: Vec<_> = got.iter().map(|n| &*n.node).collect();
    assert_eq!(names, ["tests", "deploy", "build"]);
    assert_eq!(got[2], build);
    assert_eq!(got[1], deploy);
    assert_eq!(store.nodes("r2").await.unwrap(), vec![other]);
    assert!(store.nodes("r3").await.unwrap().is_empty());
}

#[tokio::test]
async fn events_come_back_in_order_after_a_sequence_number() {
    let (_dir, store) = open_temp().await;
    let kinds = vec![
        EventKind::RunStarted {
            pipeline: "web".into(),
            release: "v1".into(),
            environment: "staging".into(),
        },
        EventKind::NodeStarted { attempt: 1 },
        EventKind::Progress {
            target: Some("web1".into()),
            step: "upload".into(),
            status: "ok".into(),
            duration_ms: Some(12),
            message: None,
        },
        EventKind::NodeFailed {
            error: ErrorInfo {
                kind: ErrorKind::Unavailable,
                message: "refused".into(),
                retryable: true,
                context: Vec::new(),
            },
        },
        EventKind::Custom {
            name: "x".into(),
            data: serde_json::json!({"a": [1, {"b": null}]}),
        },
        EventKind::RunFinished {
            status: RunStatus::Failed,
        },
    ];
    let events: Vec<Event> = kinds
        .into_iter()
        .enumerate()
        .map(|(i, k)| event("r1", i as u64 + 1, k))
        .collect();
    // Two batches, the second before the first: order comes from seq.
    store.append_events(&events[3..]).await.unwrap();
    store.append_events(&events[..3]).await.unwrap();
    store.append_events(&[log("r2", 1)]).await.unwrap();
    store.append_events(&[]).await.unwrap();

    assert_eq!(store.events("r1", 0, 100).await.unwrap(), events);
    assert_eq!(
        store.events("r1", 2, 3).await.unwrap(),
        events[2..5].to_vec()
    );
    assert!(store.events("r1", 6, 10).await.unwrap().is_empty());
    assert_eq!(store.events("r2", 0, 10).await.unwrap(), vec![log("r2", 1)]);
    assert_eq!(store.last_event_seq("r1").await.unwrap(), 6);
    assert_eq!(store.last_event_seq("none").await.unwrap(), 0);

    // Events are append-only: a sequence number cannot be written twice,
    // and a batch with a duplicate is refused whole.
    let err = store
        .append_events(&[log("r1", 7), log("r1", 3)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(store.events("r1", 0, 100).await.unwrap(), events);
}

#[tokio::test]
async fn concurrent_appends_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("s.db")).await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let run_id = format!("run{t}");
            for seq in 1..=200 {
                store.append_events(&[log(&run_id, seq)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for t in 0..8u64 {
        let evs = store.events(&format!("run{t}"), 0, 1000).await.unwrap();
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn approvals_are_listed_oldest_first_per_gate() {
    let (_dir, store) = open_temp().await;
    let a = |node: &str, who: &str, d: Decision, s: i64| ApprovalRecord {
        run_id: "r1".into(),
        node: node.into(),
        approver: who.into(),
        decision: d,
        comment: if s % 2 == 0 {
            Some(format!("ok from {who}"))
        } else {
            None
        },
        at: at(s),
        ..ApprovalRecord::new("r1", node, who, d)
    };
    // Inserted out of time order: "oldest first" is insertion order, as in
    // MemoryStore.
    store
        .put_approval(&a("approval", "bob", Decision::Approve, 5))
        .await
        .unwrap();
    store
        .put_approval(&a("other", "carol", Decision::Reject, 2))
        .await
        .unwrap();
    store
        .put_approval(&a("approval", "alice", Decision::Reject, 4))
        .await
        .unwrap();
    assert_eq!(
        store.approvals("r1", "approval").await.unwrap(),
        vec![
            a("approval", "bob", Decision::Approve, 5),
            a("approval", "alice", Decision::Reject, 4)
        ]
    );
    assert_eq!(store.run_approvals("r1").await.unwrap().len(), 3);
    assert!(store.approvals("r2", "approval").await.unwrap().is_empty());
}

#[tokio::test]
async fn release_history_is_newest_first_and_replaced_by_id() {
    let (_dir, store) = open_temp().await;
    store
        .put_release(&release("1", "production", "v1", 10, ReleaseStatus::Live))
        .await
        .unwrap();
    store
        .put_release(&release(
            "2",
            "production",
            "v2",
            20,
            ReleaseStatus::Deploying,
        ))
        .await
        .unwrap();
    store
        .put_release(&release("3", "staging", "v2", 15, ReleaseStatus::Live))
        .await
        .unwrap();
    // v2 failed and was rolled back; v1 stays live.
    let mut v2 = release("2", "production", "v2", 20, ReleaseStatus::RolledBack);
    v2.updated_at = at(30);
    store.put_release(&v2).await.unwrap();

    let prod = store.release_history("production", 10).await.unwrap();
    assert_eq!(
        prod,
        vec![
            v2,
            release("1", "production", "v1", 10, ReleaseStatus::Live)
        ]
    );
    assert_eq!(
        store.release_history("production", 1).await.unwrap().len(),
        1
    );
    assert_eq!(store.release_history("staging", 10).await.unwrap().len(), 1);
    assert!(store.release_history("dev", 10).await.unwrap().is_empty());
}

/// What a lock call answered, without timestamps.
#[derive(Debug, PartialEq)]
enum Seen {
    Acquired(String),
    Busy(Option<String>),
    Renewed(String),
    Lost(ErrorKind),
    Released(bool),
    Broken(Option<String>),
    Held(Vec<(String, String)>),
}

fn seen_attempt(a: LockAttempt) -> Seen {
    match a {
        LockAttempt::Acquired(l) => Seen::Acquired(l.holder),
        LockAttempt::Busy(l) => Seen::Busy(l.map(|l| l.holder)),
    }
}

fn held(leases: Vec<Lease>) -> Seen {
    Seen::Held(
        leases
            .into_iter()
            .map(|l| (l.environment, l.holder))
            .collect(),
    )
}

/// One script of lock calls, played against any store.
async fn lock_script(s: &dyn Store) -> Vec<Seen> {
    let long = Duration::from_secs(60);
    let mut out = Vec::new();
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "a", long)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "b", long)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "c", long)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("staging", "c", long))
            .await
            .unwrap(),
    ));
    out.push(held(s.locks().await.unwrap()));
    out.push(match s.renew_lock("prod", "a", long).await {
        Ok(l) => Seen::Renewed(l.holder),
        Err(e) => Seen::Lost(e.kind()),
    });
    out.push(match s.renew_lock("prod", "b", long).await {
        Ok(l) => Seen::Renewed(l.holder),
        Err(e) => Seen::Lost(e.kind()),
    });
    out.push(Seen::Released(s.release_lock("prod", "b").await.unwrap()));
    out.push(Seen::Released(s.release_lock("prod", "a").await.unwrap()));
    // b left the queue by releasing; c is the oldest waiter now, so d waits.
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "d", long)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "c", long)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "d", long)).await.unwrap(),
    ));
    out.push(Seen::Broken(
        s.force_unlock("prod").await.unwrap().map(|l| l.holder),
    ));
    out.push(Seen::Broken(
        s.force_unlock("prod").await.unwrap().map(|l| l.holder),
    ));
    out.push(match s.renew_lock("prod", "c", long).await {
        Ok(l) => Seen::Renewed(l.holder),
        Err(e) => Seen::Lost(e.kind()),
    });
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "d", long)).await.unwrap(),
    ));
    // Re-asking while holding renews the lease for the holder.
    out.push(seen_attempt(
        s.try_acquire_lock(&req("prod", "d", long)).await.unwrap(),
    ));
    out.push(held(s.locks().await.unwrap()));
    // A short lease lapses; the next asker takes it over.
    let short = Duration::from_millis(150);
    out.push(seen_attempt(
        s.try_acquire_lock(&req("dev", "x", short)).await.unwrap(),
    ));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("dev", "y", short)).await.unwrap(),
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // y stopped asking for longer than the TTL: it dropped out of the queue.
    out.push(held(s.locks().await.unwrap()));
    out.push(seen_attempt(
        s.try_acquire_lock(&req("dev", "z", short)).await.unwrap(),
    ));
    out.push(match s.renew_lock("dev", "x", short).await {
        Ok(l) => Seen::Renewed(l.holder),
        Err(e) => Seen::Lost(e.kind()),
    });
    out
}

#[tokio::test]
async fn lock_calls_answer_as_memory_store_does() {
    let (_dir, store) = open_temp().await;
    let memory = MemoryStore::new();
    let from_memory = lock_script(&memory).await;
    let from_sqlite = lock_script(&store).await;
    assert_eq!(from_sqlite, from_memory);
    // And the script itself checks what it should.
    use Seen::*;
    let s = |x: &str| x.to_string();
    assert_eq!(
        from_sqlite,
        vec![
            Acquired(s("a")),
            Busy(Some(s("a"))),
            Busy(Some(s("a"))),
            Acquired(s("c")),
            Held(vec![(s("prod"), s("a")), (s("staging"), s("c"))]),
            Renewed(s("a")),
            Lost(ErrorKind::Locked),
            Released(false),
            Released(true),
            Busy(None),
            Acquired(s("c")),
            Busy(Some(s("c"))),
            Broken(Some(s("c"))),
            Broken(None),
            Lost(ErrorKind::Locked),
            Acquired(s("d")),
            Acquired(s("d")),
            Held(vec![(s("prod"), s("d")), (s("staging"), s("c"))]),
            Acquired(s("x")),
            Busy(Some(s("x"))),
            Held(vec![(s("prod"), s("d")), (s("staging"), s("c"))]),
            Acquired(s("z")),
            Lost(ErrorKind::Locked),
        ]
    );
}

#[tokio::test]
async fn forced_unlocks_are_audited_and_waiters_listed() {
    let (_dir, store) = open_temp().await;
    let long = Duration::from_secs(60);
    store
        .try_acquire_lock(&req("prod", "deployer@ci:42", long))
        .await
        .unwrap();
    store
        .try_acquire_lock(&req("prod", "bob@laptop:7", long))
        .await
        .unwrap();
    let waiters = store.lock_waiters(Some("prod")).await.unwrap();
    assert_eq!(waiters.len(), 1);
    assert_eq!(waiters[0].holder, "bob@laptop:7");
    let broken = store
        .force_unlock_as("prod", "carol", Some("host died during deploy"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(broken.holder, "deployer@ci:42");
    assert!(store.locks().await.unwrap().is_empty());
    let audit = store.lock_audit(Some("prod"), 10).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor, "carol");
    assert_eq!(audit[0].holder.as_deref(), Some("deployer@ci:42"));
    assert_eq!(audit[0].message.as_deref(), Some("deployer@ci:42 deploys"));
    assert_eq!(audit[0].reason.as_deref(), Some("host died during deploy"));
    assert!(store
        .lock_audit(Some("staging"), 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn everything_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.create_run(&run("r1", "production", 1)).await.unwrap();
        store
            .put_node(&NodeRecord::pending("r1", "build"))
            .await
            .unwrap();
        store
            .append_events(&[log("r1", 1), log("r1", 2)])
            .await
            .unwrap();
        store
            .put_release(&release("1", "production", "v1", 1, ReleaseStatus::Live))
            .await
            .unwrap();
        store
            .try_acquire_lock(&req("production", "a", Duration::from_secs(60)))
            .await
            .unwrap();
        // Dropped without close: acknowledged writes are committed already.
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        store.get_run("r1").await.unwrap(),
        Some(run("r1", "production", 1))
    );
    assert_eq!(store.nodes("r1").await.unwrap().len(), 1);
    assert_eq!(store.events("r1", 0, 10).await.unwrap().len(), 2);
    assert_eq!(
        store.release_history("production", 10).await.unwrap().len(),
        1
    );
    assert_eq!(store.locks().await.unwrap()[0].holder, "a");
    store.close().await;
    assert_eq!(
        store.get_run("r1").await.unwrap_err().kind(),
        ErrorKind::Store
    );
}

#[tokio::test]
async fn two_handles_on_one_file_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let one = SqliteStore::open(&path).await.unwrap();
    let two = SqliteStore::open(&path).await.unwrap();
    one.create_run(&run("r1", "production", 1)).await.unwrap();
    assert!(two.get_run("r1").await.unwrap().is_some());
    let long = Duration::from_secs(60);
    assert!(matches!(
        one.try_acquire_lock(&req("production", "one", long))
            .await
            .unwrap(),
        LockAttempt::Acquired(_)
    ));
    match two
        .try_acquire_lock(&req("production", "two", long))
        .await
        .unwrap()
    {
        LockAttempt::Busy(Some(l)) => assert_eq!(l.holder, "one"),
        other => panic!("expected busy, got {other:?}"),
    }
}

// --- migrations -----------------------------------------------------------

/// Fills a store with one of everything (used for the v1 fixture).
async fn fill(store: &SqliteStore) {
    let mut r = run("fixture-run-1", "production", 1);
    r.status = RunStatus::Succeeded;
    r.finished_at = Some(at(9));
    store.create_run(&r).await.unwrap();
    let mut n = NodeRecord::pending("fixture-run-1", "deploy");
    n.status = NodeStatus::Succeeded;
    n.attempts = 1;
    n.started_at = Some(at(2));
    n.finished_at = Some(at(8));
    n.output = Some(serde_json::json!({"revision": "v1"}));
    store.put_node(&n).await.unwrap();
    store
        .append_events(&[log("fixture-run-1", 1), log("fixture-run-1", 2)])
        .await
        .unwrap();
    store
        .put_approval(&ApprovalRecord {
            run_id: "fixture-run-1".into(),
            node: "approval".into(),
            approver: "alice".into(),
            decision: Decision::Approve,
            comment: Some("lgtm".into()),
            at: at(3),
            ..ApprovalRecord::new("fixture-run-1", "approval", "alice", Decision::Approve)
        })
        .await
        .unwrap();
    store
        .put_release(&release(
            "rel-1",
            "production",
            "v1",
            9,
            ReleaseStatus::Live,
        ))
        .await
        .unwrap();
}

/// Regenerates `tests/fixtures/sqlite/v1.db` with the first schema version.
/// Run by hand only: `cargo test --test sqlite_store -- --ignored generate_v1_fixture`
/// with `CD_WRITE_FIXTURE=1`; the committed file must stay as it is.
#[tokio::test]
#[ignore = "writes the committed fixture; run by hand"]
async fn generate_v1_fixture() {
    if std::env::var_os("CD_WRITE_FIXTURE").is_none() {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE_V1);
    let _ = std::fs::remove_file(&path);
    let store = SqliteStore::open_with(
        &path,
        cd_backends::sqlite::SqliteOptions::new().schema_version_limit(1),
    )
    .await
    .unwrap();
    assert_eq!(store.schema_version(), 1);
    fill(&store).await;
    store.close().await;
    assert!(!path.with_extension("db-wal").exists());
}

#[tokio::test]
async fn a_v1_database_opens_and_upgrades() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE_V1);
    let original = std::fs::read(&fixture).expect("fixture tests/fixtures/sqlite/v1.db");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    std::fs::write(&path, &original).unwrap();

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.schema_version(), SqliteStore::latest_schema_version());
    assert!(store.schema_version() > 1, "no migration to exercise");

    // The data written by v1 reads back.
    let r = store.get_run("fixture-run-1").await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Succeeded);
    assert_eq!(r.release.config["replicas"], 3);
    let nodes = store.nodes("fixture-run-1").await.unwrap();
    assert_eq!(nodes[0].output, Some(serde_json::json!({"revision": "v1"})));
    assert_eq!(store.events("fixture-run-1", 0, 10).await.unwrap().len(), 2);
    assert_eq!(
        store.approvals("fixture-run-1", "approval").await.unwrap()[0].approver,
        "alice"
    );
    let history = store.release_history("production", 10).await.unwrap();
    assert_eq!(
        history,
        vec![release("rel-1", "production", "v1", 9, ReleaseStatus::Live)]
    );

    // What v2 added works on the upgraded file.
    store
        .try_acquire_lock(&req("production", "a", Duration::from_secs(60)))
        .await
        .unwrap();
    store
        .force_unlock_as("production", "ops", Some("test"))
        .await
        .unwrap();
    assert_eq!(store.lock_audit(None, 10).await.unwrap().len(), 1);
    store.close().await;

    // Reopening does not migrate again; the fixture itself is unchanged.
    let again = SqliteStore::open(&path).await.unwrap();
    assert_eq!(again.schema_version(), SqliteStore::latest_schema_version());
    assert_eq!(std::fs::read(&fixture).unwrap(), original);
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.close().await;
    // Bump user_version (bytes 60..64 of the header, big-endian).
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60..64].copy_from_slice(&999u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

// --- bad input ------------------------------------------------------------

#[tokio::test]
async fn a_corrupt_file_is_reported_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Not a database at all.
    let garbage = dir.path().join("garbage.db");
    let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let err = SqliteStore::open(&garbage).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert_eq!(
        err.context("file"),
        Some(garbage.display().to_string().as_str())
    );
    assert!(err.to_string().contains("untouched"), "{err}");
    assert_eq!(std::fs::read(&garbage).unwrap(), bytes);

    // A real database whose schema pages were overwritten.
    let damaged = dir.path().join("damaged.db");
    let store = SqliteStore::open(&damaged).await.unwrap();
    fill(&store).await;
    store.close().await;
    let mut bytes = std::fs::read(&damaged).unwrap();
    for b in bytes[100..4096].iter_mut() {
        *b = 0xA5;
    }
    std::fs::write(&damaged, &bytes).unwrap();
    let err = SqliteStore::open(&damaged).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert_eq!(
        err.context("file"),
        Some(damaged.display().to_string().as_str())
    );
    assert_eq!(std::fs::read(&damaged).unwrap(), bytes);
}

#[tokio::test]
async fn an_unwritable_path_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // The parent "directory" is a regular file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"hello").unwrap();
    let path = file.join("state.db");
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert_eq!(
        err.context("file"),
        Some(path.display().to_string().as_str())
    );
    assert!(
        err.to_string().contains("cannot create the directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");

    // The path is a directory.
    let err = SqliteStore::open(dir.path()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert!(err.to_string().contains("directory"), "{err}");

    // A read-only file system.
    if Path::new("/proc/version").exists() {
        let err = SqliteStore::open("/proc/cd-test/state.db")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Store);
        assert_eq!(err.context("file"), Some("/proc/cd-test/state.db"));
    }
}

// --- an acknowledged append survives SIGKILL --------------------------------

const HELPER_ENV: &str = "CD_SQLITE_TEST_HELPER";

/// Not a test: the child process of `acknowledged_appends_survive_sigkill`,
/// started by re-running this test binary with `--ignored --exact`.
#[test]
#[ignore = "child process of another test"]
fn helper_process() {
    let Some(db) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = SqliteStore::open(PathBuf::from(db)).await.unwrap();
        let mut stdout = std::io::stdout();
        let mut seq = 1u64;
        loop {
            let batch: Vec<Event> = (seq..seq + 10).map(|s| log("killed", s)).collect();
            store.append_events(&batch).await.unwrap();
            seq += 10;
            writeln!(stdout, "acked {}", seq - 1).unwrap();
            stdout.flush().unwrap();
        }
    });
}

#[tokio::test]
async fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    for round in 0..3 {
        let _ = std::fs::remove_file(&db);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "helper_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = 0u64;
        let target = 200 + round * 500;
        while let Some(Ok(line)) = lines.next() {
            // libtest may print `test helper_process ... ` before the first line.
            if let Some((_, n)) = line.split_once("acked ") {
                acked = n.trim().parse().unwrap();
                if acked >= target {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        assert!(acked >= target, "helper stopped early at {acked}");
        let store = SqliteStore::open(&db).await.unwrap();
        let stored = store.last_event_seq("killed").await.unwrap();
        assert!(
            stored >= acked,
            "acknowledged {acked} events, only {stored} survived"
        );
        let evs = store.events("killed", 0, usize::MAX).await.unwrap();
        assert_eq!(evs.len() as u64, stored, "gaps in the stored events");
        let ordered: BTreeMap<u64, ()> = evs.iter().map(|e| (e.seq, ())).collect();
        assert_eq!(ordered.len() as u64, stored);
        store.close().await;
    }
}

// --- secrets ----------------------------------------------------------------

/// Whether `needle` occurs in the database file or its WAL.
fn file_contains(db: &Path, needle: &str) -> bool {
    let mut hay = std::fs::read(db).unwrap();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    hay.extend(std::fs::read(&wal).unwrap_or_default());
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn registered_secrets_never_reach_the_database_file() {
    use cd_core::{stage_fn, Error, Pipeline, Runner, Secret, StageOutput};
    const SECRET: &str = "hunter2-Zq8xV3kP";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = Arc::new(SqliteStore::open(&db).await.unwrap());
    let pipeline = Pipeline::builder("secretive")
        .stage(
            "login",
            stage_fn(|cx| async move {
                cx.log(format!("logging in with token {SECRET}"));
                Ok(StageOutput::json(serde_json::json!({
                    "header": format!("Bearer {SECRET}"),
                    "nested": [{"token": SECRET}],
                })))
            }),
        )
        .stage(
            "push",
            stage_fn(|_| async move {
                Err::<StageOutput, _>(Error::failed(format!("registry refused token {SECRET}")))
            }),
        )
        .needs(["login"])
        .build()
        .unwrap();
    let runner = Runner::new(store.clone())
        .secret(&Secret::new(SECRET.to_string()))
        .retry(cd_core::RetryPolicy::none());
    let report = runner.run(&pipeline, Release::new("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    // What was stored is scrubbed, yet still there to read.
    let evs = store.events(&report.run_id, 0, 1000).await.unwrap();
    assert!(evs.iter().any(|e| matches!(&e.kind,
        EventKind::Log { message, .. } if message.starts_with("logging in with token"))));
    let nodes = store.nodes(&report.run_id).await.unwrap();
    let login = nodes.iter().find(|n| &*n.node == "login").unwrap();
    assert!(login.output.as_ref().unwrap()["header"]
        .as_str()
        .unwrap()
        .starts_with("Bearer "));
    let push = nodes.iter().find(|n| &*n.node == "push").unwrap();
    assert!(push
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("registry refused token"));
    store.close().await;
    assert!(
        !file_contains(&db, SECRET),
        "a secret value reached {}",
        db.display()
    );
    // The check itself can see plain text in the file.
    assert!(file_contains(&db, "registry refused token"));
}

/// Release history is ordered by a sequence, not the wall clock: releases
/// recorded in the same millisecond, or with a clock that stepped back,
/// come back newest (last recorded) first, in both stores.
#[tokio::test]
async fn release_history_order_is_total_and_ignores_the_clock() {
    let (_dir, sqlite) = open_temp().await;
    let memory = MemoryStore::new();
    for store in [&sqlite as &dyn Store, &memory] {
        // Same instant for a and b; c's clock stepped back.
        store
            .put_release(&release("a", "prod", "v1", 10, ReleaseStatus::Superseded))
            .await
            .unwrap();
        store
            .put_release(&release("b", "prod", "v2", 10, ReleaseStatus::Superseded))
            .await
            .unwrap();
        store
            .put_release(&release("c", "prod", "v3", 5, ReleaseStatus::Live))
            .await
            .unwrap();
        // Replacing a record keeps its place.
        store
            .put_release(&release("a", "prod", "v1", 10, ReleaseStatus::RolledBack))
            .await
            .unwrap();
        let ids: Vec<String> = store
            .release_history("prod", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["c", "b", "a"]);
    }
}

/// Issue 10: a state database the store creates is the owner's only: the
/// file and its -wal/-shm 0600, the directories it creates 0700.
#[tokio::test]
async fn a_new_database_and_its_directory_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state").join("cd.db");
    let store = SqliteStore::open(&db).await.unwrap();
    store.create_run(&run("r1", "production", 1)).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&db), 0o600);
    for suffix in ["-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

#[tokio::test]
async fn audited_approvals_tokens_and_requests_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let record = ApprovalRecord {
        comment: Some("ship it".into()),
        decision_id: Some("d-1".into()),
        via: Some("http 10.0.0.7:53122".into()),
        token_id: Some("0123456789ab".into()),
        release: Some("v7".into()),
        pipeline: Some("web".into()),
        definition_hash: Some("abc".into()),
        ..ApprovalRecord::new("r1", "approval", "alice", Decision::Approve)
    };
    store.put_approval(&record).await.unwrap();
    // The same decision id again: a replay, refused, nothing written.
    let replay = ApprovalRecord {
        approver: "bob".into(),
        ..record.clone()
    };
    let err = store.put_approval(&replay).await.unwrap_err();
    assert_eq!(err.kind(), cd_core::ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("d-1"), "{err}");

    let (token, secret) = cd_core::approval::issue_token("alice", None, "admin").unwrap();
    store.put_token(&token).await.unwrap();
    let request = cd_core::approval::ApprovalRequest {
        run_id: "r1".into(),
        node: "approval".into(),
        pipeline: "web".into(),
        definition_hash: "abc".into(),
        release: "v7".into(),
        environment: "production".into(),
        approvers: vec!["alice".into(), "bob".into()],
        anyone: false,
        groups: vec![],
        required: 1,
        excluded: vec![],
        comment_required: false,
        created_at: Utc::now(),
        expires_at: None,
    };
    assert_eq!(store.put_approval_request(&request).await.unwrap(), request);
    // A second put keeps the first request.
    let later = cd_core::approval::ApprovalRequest {
        required: 2,
        ..request.clone()
    };
    assert_eq!(store.put_approval_request(&later).await.unwrap(), request);
    store.close().await;

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        store.approvals("r1", "approval").await.unwrap(),
        vec![record]
    );
    assert_eq!(
        store.approval_request("r1", "approval").await.unwrap(),
        Some(request)
    );
    let stored = store.token(&token.id).await.unwrap().unwrap();
    assert_eq!(stored, token);
    assert!(!stored.hash.contains(secret.expose().as_str()));
    assert_eq!(
        cd_core::approval::authenticate_record(&stored, secret.expose(), Utc::now()).unwrap(),
        "alice"
    );
    assert_eq!(store.tokens().await.unwrap().len(), 1);
}
