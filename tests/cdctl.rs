//! `cdctl` against a real state database: tables, `--json`, breaking a lock
//! (only with `--force` and a reason, audited), approvals, errors.
#![cfg(feature = "sqlite")]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cd_backends::sqlite::SqliteStore;
use cd_core::{
    Decision, LockRequest, NodeRecord, NodeStatus, Release, ReleaseRecord, ReleaseStatus, Revision,
    RunRecord, RunStatus, Store,
};
use chrono::{Duration as ChronoDuration, Utc};

const RUN: &str = "7f3c2a10-0000-4000-8000-000000000001";
const DONE: &str = "1b2d0000-0000-4000-8000-000000000002";

fn cdctl(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("CD_DB")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "cdctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn record(id: &str, version: &str, status: ReleaseStatus, ago_s: i64) -> ReleaseRecord {
    let at = Utc::now() - ChronoDuration::seconds(ago_s);
    ReleaseRecord {
        id: id.into(),
        environment: "production".into(),
        version: version.into(),
        release: Release::new(version),
        revisions: vec![Revision::new("blue", version, format!("pid-{ago_s}"))],
        status,
        run_id: Some(DONE.into()),
        actor: "alice".into(),
        at,
        updated_at: at,
        restored_from: None,
    }
}

async fn populate(db: &Path) {
    let store = SqliteStore::open(db).await.unwrap();
    let now = Utc::now();
    for (id, status, version, ago) in [
        (DONE, RunStatus::Failed, "v2-broken", 60),
        (RUN, RunStatus::Running, "v3", 5),
    ] {
        store
            .create_run(&RunRecord {
                id: id.into(),
                pipeline: "web".into(),
                definition_hash: "0123456789abcdef".into(),
                release: Release::new(version),
                environment: "production".into(),
                status,
                started_by: "alice".into(),
                started_at: now - ChronoDuration::seconds(ago),
                finished_at: (status != RunStatus::Running).then_some(now),
            })
            .await
            .unwrap();
    }
    let mut build = NodeRecord::pending(RUN, "build");
    build.status = NodeStatus::Succeeded;
    build.attempts = 1;
    build.started_at = Some(now - ChronoDuration::seconds(4));
    build.finished_at = Some(now - ChronoDuration::seconds(3));
    build.output = Some(serde_json::json!({"image": "app:v3"}));
    let mut gate = NodeRecord::pending(RUN, "approval");
    gate.status = NodeStatus::Waiting;
    gate.started_at = Some(now - ChronoDuration::seconds(2));
    gate.recheck_at = Some(now + ChronoDuration::seconds(30));
    store.put_nodes(&[build, gate]).await.unwrap();
    store
        .put_approval_request(&cd_core::approval::ApprovalRequest {
            run_id: RUN.into(),
            node: "approval".into(),
            pipeline: "web".into(),
            definition_hash: "0123456789abcdef".into(),
            release: "v3".into(),
            environment: "production".into(),
            approvers: vec!["bob".into(), "erin".into()],
            anyone: false,
            groups: vec![],
            required: 1,
            excluded: vec![],
            comment_required: false,
            created_at: now,
            expires_at: None,
        })
        .await
        .unwrap();
    store
        .append_events(&[cd_core::Event {
            run_id: RUN.into(),
            seq: 1,
            at: now,
            node: Some("build".into()),
            kind: cd_core::EventKind::Log {
                level: cd_core::LogLevel::Info,
                message: "built app:v3".into(),
            },
        }])
        .await
        .unwrap();
    store
        .put_release(&record("r1", "v1", ReleaseStatus::Live, 120))
        .await
        .unwrap();
    store
        .put_release(&record("r2", "v2-broken", ReleaseStatus::RolledBack, 60))
        .await
        .unwrap();
    store
        .try_acquire_lock(&LockRequest {
            environment: "production".into(),
            holder: "alice@ci pid 7".into(),
            run_id: Some(RUN.into()),
            message: "run 7f3c".into(),
            ttl: Duration::from_secs(600),
        })
        .await
        .unwrap();
    store.close().await;
}

#[tokio::test]
async fn cdctl_reads_and_operates_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    populate(&db).await;

    // runs: newest first, as a table and as JSON.
    let table = ok(&cdctl(&db, &["runs"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("RUN"), "{table}");
    assert!(
        lines[1].starts_with(RUN) && lines[1].contains("running"),
        "{table}"
    );
    assert!(
        lines[2].starts_with(DONE) && lines[2].contains("failed"),
        "{table}"
    );
    let runs: serde_json::Value =
        serde_json::from_str(&ok(&cdctl(&db, &["runs", "--json"]))).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[0]["id"], RUN);

    // run show, by a prefix of the id.
    let show = ok(&cdctl(&db, &["run", "show", "7f3c"]));
    assert!(show.contains(RUN), "{show}");
    assert!(
        show.contains("approval") && show.contains("waiting"),
        "{show}"
    );
    assert!(show.contains("built app:v3"), "{show}");
    let show: serde_json::Value =
        serde_json::from_str(&ok(&cdctl(&db, &["run", "show", RUN, "--json"]))).unwrap();
    assert_eq!(show["run"]["id"], RUN);
    assert_eq!(show["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(show["events"][0]["seq"], 1);

    // history: the table and the JSON say the same.
    let history = ok(&cdctl(&db, &["history", "production"]));
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert!(
        rows[0].starts_with("v2-broken") && rows[0].contains("rolled_back"),
        "{history}"
    );
    assert!(
        rows[1].starts_with("v1") && rows[1].contains("live"),
        "{history}"
    );
    let json: Vec<ReleaseRecord> =
        serde_json::from_str(&ok(&cdctl(&db, &["history", "production", "--json"]))).unwrap();
    let store = SqliteStore::open(&db).await.unwrap();
    assert_eq!(json, store.release_history("production", 20).await.unwrap());

    // locks, and breaking one: refused without --force, audited with it.
    let locks = ok(&cdctl(&db, &["locks"]));
    assert!(locks.contains("alice@ci pid 7"), "{locks}");
    let refused = cdctl(&db, &["unlock", "production", "--reason", "stuck"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(store.locks().await.unwrap().len(), 1);
    let out = ok(&cdctl(
        &db,
        &[
            "unlock",
            "production",
            "--force",
            "--reason",
            "ci host died",
            "--as",
            "carol",
        ],
    ));
    assert!(out.contains("alice@ci pid 7"), "{out}");
    assert!(store.locks().await.unwrap().is_empty());
    let audit = store.lock_audit(Some("production"), 5).await.unwrap();
    assert_eq!(audit[0].actor, "carol");
    assert_eq!(audit[0].reason.as_deref(), Some("ci host died"));
    let locks: serde_json::Value =
        serde_json::from_str(&ok(&cdctl(&db, &["locks", "--json"]))).unwrap();
    assert!(locks["locks"].as_array().unwrap().is_empty());

    // approve a waiting gate with a token; a finished run or an unknown
    // node is refused (the security cases are in tests/approvals.rs).
    let token = dir.path().join("bob.token");
    let made = ok(&cdctl(
        &db,
        &["token", "create", "bob", "--out", token.to_str().unwrap()],
    ));
    assert!(made.contains("for bob written to"), "{made}");
    let tf = token.to_str().unwrap();
    let approval: serde_json::Value = serde_json::from_str(&ok(&cdctl(
        &db,
        &[
            "approve",
            "7f3c",
            "approval",
            "--token-file",
            tf,
            "--comment",
            "lgtm",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(approval["approver"], "bob");
    assert_eq!(
        approval["via"].as_str().map(|v| v.starts_with("cli ")),
        Some(true)
    );
    let stored = store.approvals(RUN, "approval").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].decision, Decision::Approve);
    assert_eq!(stored[0].comment.as_deref(), Some("lgtm"));
    let reject = cdctl(&db, &["reject", "7f3c", "nope", "--token-file", tf]);
    assert_eq!(reject.status.code(), Some(3));
    let late = cdctl(&db, &["approve", DONE, "approval", "--token-file", tf]);
    assert_eq!(late.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&late.stderr).contains("already finished"));
    assert_eq!(store.approvals(DONE, "approval").await.unwrap().len(), 0);
    // --as is gone, with an explanation.
    let old = cdctl(&db, &["approve", "7f3c", "approval", "--as", "bob"]);
    assert_eq!(old.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&old.stderr)
        .contains("who decides comes from the approver's token"));
}

#[test]
fn cdctl_explains_a_missing_database_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope/state.db");
    let out = cdctl(&missing, &["runs"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no state database") && err.contains("CD_DB"),
        "{err}"
    );
    assert!(
        !missing.exists(),
        "a read command must not create a database"
    );

    let help = Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Deploy::restore"), "{help}");
    for cmd in [
        "runs", "run", "history", "locks", "unlock", "approve", "reject",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
}

mod fuzz {
    //! Issue 10: cdctl's arguments are outside input too. Whatever argv it
    //! gets, it ends with its documented exit codes (a usage or input error
    //! 2, not found 3, another failure 1) and a message on stderr, or
    //! succeeds — never a panic, never a hang on a huge number.
    use super::*;
    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("runs".to_string()),
            Just("run".to_string()),
            Just("show".to_string()),
            Just("abandon".to_string()),
            Just("history".to_string()),
            Just("locks".to_string()),
            Just("unlock".to_string()),
            Just("approve".to_string()),
            Just("reject".to_string()),
            Just("--json".to_string()),
            Just("--limit".to_string()),
            Just("--events".to_string()),
            Just("--force".to_string()),
            Just("--reason".to_string()),
            Just("--as".to_string()),
            Just("--env".to_string()),
            Just(RUN.to_string()),
            Just("7f".to_string()),
            Just("production".to_string()),
            Just(u64::MAX.to_string()),
            Just("-1".to_string()),
            Just("99999999999999999999999".to_string()),
            Just(String::new()),
            "[a-z0-9-]{1,12}",
            "\\PC{0,40}",
            "[\\x00-\\x1f\\x7f\u{202e}a-z]{1,12}",
        ]
        .prop_filter("argv holds no NUL", |s| !s.contains('\0'))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn any_arguments_end_in_a_result_or_a_typed_error(
            args in proptest::collection::vec(word(), 0..7)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("state.db");
            tokio::runtime::Runtime::new().unwrap().block_on(populate(&db));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = cdctl(&db, &refs);
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            let code = out.status.code();
            // cdctl's exit codes: 0 done, 1 failed, 2 bad usage or input,
            // 3 not found.
            prop_assert!(matches!(code, Some(0..=3)), "{args:?}: exit {code:?}: {stderr}");
            if code != Some(0) {
                prop_assert!(!stderr.trim().is_empty(), "{args:?}: failed silently");
            }
            // Whatever was printed cannot carry a terminal escape from argv.
            prop_assert!(!out.stdout.contains(&0x1b), "{args:?}");
        }
    }
}

/// Issue 11: load and test results stored with a run are shown later by
/// `cdctl run show` (the latency distribution, the test counts and
/// regressions).
#[tokio::test]
async fn run_show_prints_stored_load_and_test_results() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    populate(&db).await;
    let store = SqliteStore::open(&db).await.unwrap();
    let at = Utc::now();
    let event = |seq: u64, name: &str, data: serde_json::Value| cd_core::Event {
        run_id: RUN.into(),
        seq: 1000 + seq,
        at,
        node: Some("perf".into()),
        kind: cd_core::EventKind::Custom {
            name: name.into(),
            data,
        },
    };
    store
        .append_events(&[
            event(
                1,
                "load_report",
                serde_json::json!({
                    "url": "https://staging/", "model": "open", "concurrency": 8,
                    "requests": 5000, "rps": 250.0, "errors": 0, "non_success": 0,
                    "distribution": [[50.0, 1.5], [99.0, 12.25], [100.0, 40.0]]
                }),
            ),
            event(
                2,
                "test_report",
                serde_json::json!({
                    "counts": {"passed": 41, "failed": 1, "errors": 0, "skipped": 2, "flaky": 1},
                    "regressions": ["api::users::deletes"], "flaky": ["api::cart::checkout"]
                }),
            ),
        ])
        .await
        .unwrap();
    store.close().await;
    let text = ok(&cdctl(&db, &["run", "show", RUN, "--events", "1"]));
    assert!(text.contains("load test [perf] https://staging/ (open model, 8 connections): 5000 requests, 250.0 rps"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("99.0%") && l.contains("12.25 ms")),
        "{text}"
    );
    assert!(
        text.contains("tests [perf]: 41 passed, 1 failed, 0 errors, 2 skipped, 1 flaky"),
        "{text}"
    );
    assert!(text.contains("regressions: api::users::deletes"), "{text}");
}

#[tokio::test]
async fn cdctl_sbom_prints_the_document_stored_with_the_release() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    populate(&db).await;
    let store = SqliteStore::open(&db).await.unwrap();
    let bom = |n: usize| {
        serde_json::json!({"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
            "components": (0..n).map(|i| serde_json::json!({"type": "library", "name": format!("lib{i}"), "version": "1.0.0"})).collect::<Vec<_>>()})
        .to_string()
    };
    let media = "application/vnd.cyclonedx+json; version=1.5";
    // Two documents for v1: the later one is the one printed.
    store
        .put_release_document(&cd_core::ReleaseDocument::new("v1", "sbom", media, bom(1)))
        .await
        .unwrap();
    let mut latest = cd_core::ReleaseDocument::new("v1", "sbom", media, bom(3));
    latest.run_id = Some(DONE.into());
    store.put_release_document(&latest).await.unwrap();
    store
        .put_release_document(&cd_core::ReleaseDocument::new(
            "v2-broken",
            "sbom",
            media,
            bom(2),
        ))
        .await
        .unwrap();
    store.close().await;

    // The live release (v1) by default.
    let out = ok(&cdctl(&db, &["sbom", "production"]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["components"].as_array().unwrap().len(), 3);
    assert_eq!(out.trim(), latest.content);
    // A named version.
    let out = ok(&cdctl(&db, &["sbom", "production", "v2-broken"]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["components"].as_array().unwrap().len(), 2);
    // The summary, as text and JSON.
    let out = ok(&cdctl(&db, &["sbom", "production", "--summary"]));
    assert!(out.contains("components 3"), "{out}");
    assert!(out.contains(&latest.sha256), "{out}");
    assert!(out.contains(DONE), "{out}");
    let out = ok(&cdctl(&db, &["--json", "sbom", "production", "--summary"]));
    let meta: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(meta["components"], 3);
    assert_eq!(meta["bytes"], latest.bytes);
    // A reader that stops early (`| head`): cdctl ends quietly, status 0.
    let store = SqliteStore::open(&db).await.unwrap();
    store
        .put_release_document(&cd_core::ReleaseDocument::new(
            "v-big",
            "sbom",
            media,
            bom(8000),
        ))
        .await
        .unwrap();
    store.close().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--db")
        .arg(&db)
        .args(["sbom", "production", "v-big"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
    // None stored: exit 3, saying how one gets stored.
    let out = cdctl(&db, &["sbom", "production", "v9"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no SBOM stored for release v9"), "{err}");
    assert!(err.contains("SbomStage"), "{err}");
    // Rollback and resume need a deploy binary's deployers and pipelines.
    let out = cdctl(&db, &["rollback", "production", "--to", "v1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mount cd::cli in your deploy binary"));
    let out = cdctl(&db, &["resume", "7f3c"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs pipeline `web`"));
    // No live release and no version named.
    let out = cdctl(&db, &["sbom", "staging"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no live release in environment `staging`")
    );
}
