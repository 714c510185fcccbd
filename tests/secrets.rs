//! Secrets never stored (issue 10, case 1): a secret registered with the
//! runner or given as a release secret appears nowhere durable or shown —
//! not in the SQLite files (`-wal` and `-shm` included), events, the report's
//! `Display`/`Debug`, node outputs (keys and values), release history, nor
//! `cdctl --json` — in any of the encodings it takes on the way.
#![cfg(feature = "sqlite")]

use std::path::Path;
use std::sync::Arc;

use cd::backends::sqlite::SqliteStore;
use cd::core::{
    stage_fn, Error, ErrorKind, MemoryDeployer, Pipeline, Release, RunStatus, Runner, Secret,
    StageOutput, Store,
};
use cd::stages::Deploy;

/// A runner-registered secret with a quote, a backslash, a shell quote and a
/// space: its JSON-, Debug-, shell- and percent-encoded forms all differ.
const S: &str = "hun\"ter\\2'x y";
/// A release secret.
const R: &str = "r3lease-only-pw";

/// The tell-tale parts no encoding hides: each secret's distinctive middle.
fn leaks(bytes: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(bytes);
    ["ter\\2", "ter\\\\2", "ter%5C2", R]
        .into_iter()
        .filter(|needle| text.contains(needle))
        .collect()
}

fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn pipeline(deployer: Arc<MemoryDeployer>) -> Pipeline {
    Pipeline::builder("secrets")
        .stage(
            "render",
            stage_fn(|cx| async move {
                // A stage that handles the secrets puts them in its output's
                // keys, values and a nested JSON document, and in its log.
                let r = cx.release();
                let pw = r.values()["db_password"].clone();
                let token = r.secrets.get("api_token").cloned().unwrap_or_default();
                assert_eq!(pw, S, "the stage sees the secret's value");
                assert_eq!(token, R);
                cx.log(format!("connecting with {S} and {R}"));
                let doc = serde_json::json!({ "pw": S }).to_string();
                Ok(StageOutput::json(serde_json::json!({
                    S: "as a key",
                    "value": format!("pw={S}"),
                    "nested_document": doc,
                    "token": R,
                })))
            }),
        )
        .stage("deploy", Deploy::new(deployer))
        .needs(["render"])
        .stage(
            "fails",
            stage_fn(|_| async move {
                Err::<StageOutput, _>(
                    Error::new(
                        ErrorKind::Failed,
                        format!("login as admin:{S} refused ({R})"),
                    )
                    .with("dsn", format!("postgres://admin:{S}@db/app")),
                )
            }),
        )
        .needs(["deploy"])
        .build()
        .unwrap()
}

fn release() -> Release {
    Release::new("v1")
        .config("db_password", S)
        .config("replicas", 3)
        .secret("api_token", Secret::new(R.to_string()))
}

#[tokio::test]
async fn secrets_appear_nowhere_durable_or_shown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
    let deployer = Arc::new(MemoryDeployer::new(["web1"]));
    let runner = Runner::new(store.clone())
        .environment("production")
        .secret(&Secret::new(S.to_string()));
    let report = runner.run(&pipeline(deployer), release()).await.unwrap();
    assert_eq!(
        report.status,
        RunStatus::Failed,
        "the failing stage fails the run"
    );

    // The report, shown and debugged.
    for shown in [format!("{report}"), format!("{report:?}")] {
        assert!(
            leaks(shown.as_bytes()).is_empty(),
            "{:?} in {shown}",
            leaks(shown.as_bytes())
        );
    }
    let failed = report.node("fails").unwrap().error.as_ref().unwrap();
    assert!(failed.message.contains("admin:***"), "{}", failed.message);
    let out = report.output("render").unwrap();
    assert!(
        out.get("***").is_some(),
        "the key is scrubbed, not dropped: {out}"
    );

    // The stored run: config holding the secret was moved to the secrets,
    // which are stored by name only; the rest of the config is kept.
    let run = store.get_run(&report.run_id).await.unwrap().unwrap();
    assert_eq!(run.release.config["replicas"], 3);
    assert!(!run.release.config.contains_key("db_password"));
    let mut names: Vec<&str> = run.release.secrets.keys().collect();
    names.sort();
    assert_eq!(names, ["api_token", "db_password"]);
    assert_eq!(run.release.secrets.missing().len(), 2);
    let history = store.release_history("production", 10).await.unwrap();
    assert_eq!(history.len(), 1);

    // cdctl --json over every view.
    let cdctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdctl"))
            .arg("--db")
            .arg(&db)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    for args in [
        vec!["runs", "--json"],
        vec!["run", "show", &report.run_id, "--json"],
        vec!["history", "production", "--json"],
        vec!["runs"],
        vec!["run", "show", &report.run_id],
    ] {
        let out = cdctl(&args);
        assert!(leaks(&out).is_empty(), "cdctl {args:?}: {:?}", leaks(&out));
    }

    // Every file of the database, before and after a checkpoint.
    for (name, bytes) in files_under(dir.path()) {
        assert!(leaks(&bytes).is_empty(), "{name} holds {:?}", leaks(&bytes));
    }
    drop(runner);
    drop(store);
    for (name, bytes) in files_under(dir.path()) {
        assert!(leaks(&bytes).is_empty(), "{name} holds {:?}", leaks(&bytes));
    }
}

/// A run whose release had secrets resumes only with the release given
/// again: the store never held the values.
#[tokio::test]
async fn resume_needs_the_release_again() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("state.db"))
            .await
            .unwrap(),
    );
    let runner = Runner::new(store.clone()).secret(&Secret::new(S.to_string()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = {
        let seen = seen.clone();
        Pipeline::builder("resume")
            .stage(
                "uses",
                stage_fn(move |cx| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .unwrap()
                            .push(cx.release().values()["db_password"].clone());
                        Ok(StageOutput::empty())
                    }
                }),
            )
            .build()
            .unwrap()
    };
    // A run as a crashed process left it: recorded, never finished.
    let mut sealed = release();
    sealed.seal(runner.redactor());
    let run = cd::core::RunRecord {
        id: "r1".into(),
        pipeline: "resume".into(),
        definition_hash: p.definition_hash().to_string(),
        release: sealed,
        environment: "default".into(),
        status: RunStatus::Running,
        started_by: "test".into(),
        started_at: chrono::Utc::now(),
        finished_at: None,
    };
    store.create_run(&run).await.unwrap();

    let err = runner.resume("r1", &p).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("api_token, db_password"), "{err}");
    assert!(err.to_string().contains("resume_with_release"), "{err}");

    let other = Release::new("v2").config("db_password", S);
    let err = runner
        .resume_with_release("r1", &p, other)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");

    let report = runner
        .resume_with_release("r1", &p, release())
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    assert_eq!(*seen.lock().unwrap(), [serde_json::json!(S)]);
}
