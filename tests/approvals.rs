//! Approval security, end to end: a real runner waits at an approval gate
//! in a SQLite store; decisions go through `cdctl` (the binary people run)
//! with tokens. Every bypass is refused with its own typed error and exit
//! status, and nothing is recorded as an approval; two valid approvers pass
//! the gate; a run waiting for approval survives its process being killed.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_backends::sqlite::SqliteStore;
use cd_core::approval::{issue_token, ApprovalRequest};
use cd_core::{
    ApprovalRecord, Decision, NodeStatus, Pipeline, Release, RunReport, RunStatus, Runner, Store,
};
use cd_stages::ApprovalGate;
use cd_testkit::TestChild;

const DEADLINE: Duration = Duration::from_secs(30);

fn cdctl(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("CD_DB")
        .env_remove("CD_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refused decision: its exit status, a message naming why, and no
/// approval recorded.
async fn refused(store: &SqliteStore, run: &str, out: Output, code: i32, says: &str) {
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(says), "expected {says:?} in: {err}");
    assert!(
        store.approvals(run, "approval").await.unwrap().is_empty(),
        "a refused decision was recorded: {err}"
    );
}

struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
    store: Arc<SqliteStore>,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let store = Arc::new(SqliteStore::open(&db).await.unwrap());
        Fixture {
            _dir: dir,
            db,
            store,
        }
    }

    /// A token for `name`, written to a file; returns the file.
    fn token(&self, name: &str) -> String {
        let file = self.db.with_file_name(format!("{name}.token"));
        let out = cdctl(
            &self.db,
            &["token", "create", name, "--out", file.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        file.to_string_lossy().into_owned()
    }

    /// Starts a run of `gate` by carol (release authored by dave) and
    /// waits until it has asked for a decision. Each version deploys to
    /// its own environment (runs of one environment take turns).
    async fn waiting(
        &self,
        gate: ApprovalGate,
        version: &str,
    ) -> (String, tokio::task::JoinHandle<RunReport>) {
        let pipeline = Pipeline::builder("web")
            .gate("approval", gate.recheck_every(Duration::from_millis(30)))
            .build()
            .unwrap();
        let runner = Runner::new(self.store.clone())
            .environment(format!("production-{version}"))
            .actor("carol");
        let release = Release::new(version).config("author", "dave");
        let handle = tokio::spawn(async move { runner.run(&pipeline, release).await.unwrap() });
        let store = self.store.clone();
        let version = version.to_string();
        let request = cd_testkit::eventually(DEADLINE, || {
            let store = store.clone();
            let version = version.clone();
            async move {
                store
                    .approval_requests(50)
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|r| r.release == version)
            }
        })
        .await
        .expect("the gate never asked for a decision");
        // And the node is recorded as waiting.
        let run = request.run_id.clone();
        cd_testkit::eventually(DEADLINE, || {
            let store = store.clone();
            let run = run.clone();
            async move {
                store
                    .nodes(&run)
                    .await
                    .unwrap()
                    .iter()
                    .any(|n| &*n.node == "approval" && n.status == NodeStatus::Waiting)
                    .then_some(())
            }
        })
        .await
        .expect("the node never showed as waiting");
        (request.run_id, handle)
    }
}

fn team() -> ApprovalGate {
    ApprovalGate::any_of(["alice", "bob", "carol", "dave"]).four_eyes()
}

#[tokio::test]
async fn no_wrong_revoked_or_expired_token_is_refused() {
    let f = Fixture::new().await;
    let (run, handle) = f.waiting(team(), "v1").await;
    let alice = f.token("alice");

    // No token at all (no file, no $CD_TOKEN, stdin not a terminal).
    let out = cdctl(&f.db, &["approve", &run, "approval"]);
    refused(&f.store, &run, out, 4, "no token given").await;

    // A wrong secret for a real token id.
    let real = std::fs::read_to_string(&alice).unwrap();
    let id = cd_core::approval::token_id(real.trim())
        .unwrap()
        .to_string();
    let wrong = f.db.with_file_name("wrong.token");
    std::fs::write(&wrong, format!("cdt_{id}_{}", "0".repeat(64))).unwrap();
    let out = cdctl(
        &f.db,
        &[
            "approve",
            &run,
            "approval",
            "--token-file",
            wrong.to_str().unwrap(),
        ],
    );
    refused(&f.store, &run, out, 4, "does not match").await;
    // Garbage.
    std::fs::write(&wrong, "alice").unwrap();
    let out = cdctl(
        &f.db,
        &[
            "approve",
            &run,
            "approval",
            "--token-file",
            wrong.to_str().unwrap(),
        ],
    );
    refused(&f.store, &run, out, 4, "not a cd token").await;

    // Revoked.
    let bob = f.token("bob");
    let bob_id = {
        let t = std::fs::read_to_string(&bob).unwrap();
        cd_core::approval::token_id(t.trim()).unwrap().to_string()
    };
    assert!(cdctl(&f.db, &["token", "revoke", &bob_id]).status.success());
    let out = cdctl(&f.db, &["approve", &run, "approval", "--token-file", &bob]);
    refused(&f.store, &run, out, 4, "was revoked").await;

    // Expired.
    let (mut record, token) = issue_token("alice", None, "test").unwrap();
    record.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    f.store.put_token(&record).await.unwrap();
    let expired = f.db.with_file_name("expired.token");
    std::fs::write(&expired, token.expose()).unwrap();
    let out = cdctl(
        &f.db,
        &[
            "approve",
            &run,
            "approval",
            "--token-file",
            expired.to_str().unwrap(),
        ],
    );
    refused(&f.store, &run, out, 4, "expired at").await;

    // The secret never shows in the store's token records.
    let list = cdctl(&f.db, &["token", "list", "--json"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains(token.expose().as_str()));

    handle.abort();
}

#[tokio::test]
async fn people_who_may_not_decide_are_refused_with_the_list_of_who_may() {
    let f = Fixture::new().await;
    let (run, handle) = f.waiting(team(), "v1").await;

    // Not on the list.
    let mallory = f.token("mallory");
    let out = cdctl(
        &f.db,
        &["approve", &run, "approval", "--token-file", &mallory],
    );
    let err = stderr(&out);
    refused(&f.store, &run, out, 4, "mallory may not decide").await;
    assert!(
        err.contains("who may: alice or bob (2 distinct); not carol (started this run), dave (authored release v1)"),
        "{err}"
    );
    // The run's actor approving their own run.
    let carol = f.token("carol");
    let out = cdctl(
        &f.db,
        &["approve", &run, "approval", "--token-file", &carol],
    );
    refused(&f.store, &run, out, 4, "carol may not decide").await;
    // The release's author.
    let dave = f.token("dave");
    let out = cdctl(&f.db, &["approve", &run, "approval", "--token-file", &dave]);
    refused(&f.store, &run, out, 4, "authored release v1 (four eyes)").await;
    // Names that look alike are not other people: a token for "alice " or
    // "" cannot be made.
    let out = cdctl(&f.db, &["token", "create", "alice "]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = cdctl(&f.db, &["token", "create", ""]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    handle.abort();
}

#[tokio::test]
async fn the_same_person_twice_and_a_replay_do_not_make_four_eyes() {
    let f = Fixture::new().await;
    let (run, handle) = f.waiting(team(), "v1").await;
    let alice = f.token("alice");
    let out = cdctl(
        &f.db,
        &[
            "approve",
            &run,
            "approval",
            "--token-file",
            &alice,
            "--decision-id",
            "d-1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Alice again (another token of hers, too): refused.
    let alice2 = f.db.with_file_name("alice2.token");
    let (record, token) = issue_token("Alice", None, "test").unwrap();
    f.store.put_token(&record).await.unwrap();
    std::fs::write(&alice2, token.expose()).unwrap();
    for file in [alice.as_str(), alice2.to_str().unwrap()] {
        let out = cdctl(&f.db, &["approve", &run, "approval", "--token-file", file]);
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("alice already approved"),
            "{}",
            stderr(&out)
        );
    }
    // A replay of bob's decision id d-1 (already used): refused.
    let bob = f.token("bob");
    let out = cdctl(
        &f.db,
        &[
            "approve",
            &run,
            "approval",
            "--token-file",
            &bob,
            "--decision-id",
            "d-1",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("a replay"), "{}", stderr(&out));
    assert_eq!(f.store.approvals(&run, "approval").await.unwrap().len(), 1);
    // Still waiting with one approval.
    assert!(!handle.is_finished());

    // Bob, properly: two people, the gate passes.
    let out = cdctl(&f.db, &["approve", &run, "approval", "--token-file", &bob]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let records = f.store.approvals(&run, "approval").await.unwrap();
    let who: Vec<&str> = records.iter().map(|r| r.approver.as_str()).collect();
    assert_eq!(who, ["alice", "bob"]);
    // Audited: from where, with which token, for which release/definition.
    for r in &records {
        assert!(r.via.as_deref().unwrap().starts_with("cli "), "{r:?}");
        assert!(r.token_id.is_some());
        assert_eq!(r.release.as_deref(), Some("v1"));
        assert_eq!(r.pipeline.as_deref(), Some("web"));
        assert!(r.definition_hash.is_some());
    }
}

#[tokio::test]
async fn after_expiry_no_decision_is_taken_and_the_gate_fails() {
    let f = Fixture::new().await;
    let (run, handle) = f
        .waiting(team().expires_after(Duration::from_millis(400)), "v1")
        .await;
    let request: ApprovalRequest = f
        .store
        .approval_request(&run, "approval")
        .await
        .unwrap()
        .unwrap();
    let expires = request.expires_at.unwrap();
    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let msg = report
        .node("approval")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("approval expired at"), "{msg}");
    assert!(chrono::Utc::now() >= expires);
    let alice = f.token("alice");
    let out = cdctl(
        &f.db,
        &["approve", &run, "approval", "--token-file", &alice],
    );
    refused(&f.store, &run, out, 5, "already finished").await;
}

#[tokio::test]
async fn decisions_do_not_carry_over_to_another_run_or_definition() {
    let f = Fixture::new().await;
    let (run_a, handle_a) = f.waiting(team(), "v1").await;
    let (run_b, handle_b) = f.waiting(team(), "v2").await;
    let (alice, bob) = (f.token("alice"), f.token("bob"));
    // Both approve run B's gate: B passes, A still waits with nothing.
    for t in [&alice, &bob] {
        let out = cdctl(&f.db, &["approve", &run_b, "approval", "--token-file", t]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let report = tokio::time::timeout(DEADLINE, handle_b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    assert!(f
        .store
        .approvals(&run_a, "approval")
        .await
        .unwrap()
        .is_empty());

    // Records written into the store by other means for run A — copied
    // from B, or for another definition of the pipeline — count for
    // nothing: the gate keeps waiting.
    for r in f.store.approvals(&run_b, "approval").await.unwrap() {
        f.store
            .put_approval(&ApprovalRecord {
                run_id: run_a.clone(),
                decision_id: None,
                definition_hash: Some("0".repeat(64)),
                ..r
            })
            .await
            .unwrap();
    }
    f.store
        .put_approval(&ApprovalRecord::new(
            &run_a,
            "approval",
            "alice",
            Decision::Approve,
        ))
        .await
        .unwrap();
    let a = f
        .store
        .approval_request(&run_a, "approval")
        .await
        .unwrap()
        .unwrap();
    // Let the gate recheck a few times.
    let before = f.store.events(&run_a, 0, 10_000).await.unwrap().len();
    cd_testkit::eventually(DEADLINE, || {
        let store = f.store.clone();
        let run_a = run_a.clone();
        async move {
            let n = store.events(&run_a, 0, 10_000).await.unwrap().len();
            (n >= before + 3).then_some(())
        }
    })
    .await
    .expect("the gate stopped rechecking");
    assert!(!handle_a.is_finished(), "forged records passed the gate");
    assert!(matches!(
        a.tally(&f.store.approvals(&run_a, "approval").await.unwrap()),
        cd_core::approval::Tally::Waiting { .. }
    ));

    // A request made for another definition of the pipeline: decisions on
    // it are refused.
    let mut other = a.clone();
    other.node = "approval-2".into();
    other.definition_hash = "f".repeat(64);
    f.store.put_approval_request(&other).await.unwrap();
    let out = cdctl(
        &f.db,
        &["approve", &run_a, "approval-2", "--token-file", &alice],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another definition"),
        "{}",
        stderr(&out)
    );
    handle_a.abort();
}

const HELPER_ENV: &str = "CD_APPROVAL_HELPER";

/// Not a test: the child process that runs (or resumes) a pipeline waiting
/// for approval. Prints `waiting <run id>` once the gate waits, and
/// `finished <status>` at the end.
#[test]
#[ignore = "child process of approvals"]
fn approval_helper() {
    let Ok(raw) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (db, resume): (PathBuf, Option<String>) = serde_json::from_str(&raw).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
        let pipeline = Pipeline::builder("web")
            .gate("approval", team().recheck_every(Duration::from_millis(30)))
            .build()
            .unwrap();
        let runner = Runner::new(store)
            .environment("production")
            .actor("carol")
            .sink(cd_core::FnSink(|e: &cd_core::Event| {
                if matches!(e.kind, cd_core::EventKind::GateWaiting { .. }) {
                    println!("\nwaiting {}", e.run_id);
                }
            }));
        let report = match resume {
            Some(id) => runner.resume(&id, &pipeline).await.unwrap(),
            None => runner
                .run(&pipeline, Release::new("v1").config("author", "dave"))
                .await
                .unwrap(),
        };
        println!("\nfinished {}", report.status);
    });
}

fn line_with(child: &TestChild, prefix: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    while let Some(l) = child.next_line(deadline) {
        if let Some(rest) = l.trim().strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
    panic!("the child never printed `{prefix}`");
}

#[tokio::test]
async fn a_run_waiting_for_approval_survives_its_process_being_killed() {
    let f = Fixture::new().await;
    let arg = serde_json::to_string(&(&f.db, None::<String>)).unwrap();
    let mut child = TestChild::start("approval_helper", (HELPER_ENV, &arg), Stdio::inherit());
    let run = line_with(&child, "waiting ");
    child.kill();

    // Decided while no process runs: recorded against the stored request.
    let (alice, bob) = (f.token("alice"), f.token("bob"));
    for t in [&alice, &bob] {
        let out = cdctl(&f.db, &["approve", &run, "approval", "--token-file", t]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // A new process resumes the run; the gate passes on the decisions.
    let arg = serde_json::to_string(&(&f.db, Some(run.clone()))).unwrap();
    let child = TestChild::start("approval_helper", (HELPER_ENV, &arg), Stdio::inherit());
    assert_eq!(line_with(&child, "finished "), "succeeded");
    let stored = f.store.get_run(&run).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Succeeded);
}

#[tokio::test]
async fn local_trust_is_a_choice_made_in_code() {
    let f = Fixture::new().await;
    // Whoever runs the tests is the local user.
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let me = cd_core::approval::identity(&user).unwrap();
    let (run, handle) = f
        .waiting(ApprovalGate::any_of([me.as_str(), "bob"]), "v1")
        .await;
    let options = cd::cli::Options {
        db: Some(f.db.clone()),
        json: false,
    };
    let approve = cd::cli::Command::Approve(cd::cli::Decide {
        run: run.clone(),
        node: "approval".into(),
        comment: Some("from the deploy host".into()),
        token_file: None,
        decision_id: None,
        approver: None,
    });
    // cdctl's operator: no token, no decision.
    let err = cd::cli::Operator::new()
        .execute(&options, &approve)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), cd_core::ErrorKind::Auth, "{err}");
    assert!(f
        .store
        .approvals(&run, "approval")
        .await
        .unwrap()
        .is_empty());
    // A host binary that chose local trust: the OS user decides, and the
    // record says so.
    cd::cli::Operator::new()
        .trust_local_user()
        .execute(&options, &approve)
        .await
        .unwrap();
    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let records = f.store.approvals(&run, "approval").await.unwrap();
    assert_eq!(records[0].approver, me);
    assert!(
        records[0]
            .via
            .as_deref()
            .unwrap()
            .starts_with("trusted: cli local user"),
        "{:?}",
        records[0].via
    );
    assert!(records[0].token_id.is_none());
}
