//! Untrusted release inputs (issue 10, cases 2 and 4): one version rule for
//! every deployer and the runner; cdctl's terminal output cannot be forged by
//! what the store holds.
#![cfg(all(
    feature = "sqlite",
    feature = "local",
    feature = "ssh",
    feature = "terraform",
    feature = "ansible"
))]

use std::sync::Arc;

use cd::backends::ansible::{AnsibleDeployer, AnsibleHost};
use cd::backends::local::LocalProcessDeployer;
use cd::backends::sqlite::SqliteStore;
use cd::backends::ssh::{SshDeployer, SshHost};
use cd::backends::terraform::TerraformDeployer;
use cd::core::{
    stage_fn, DeployContext, Deployer, ErrorKind, MemoryStore, Pipeline, Release, ReleaseRecord,
    ReleaseStatus, Revision, Runner, StageOutput, Store, Target,
};

const BAD: [&str; 6] = [
    "",
    "../../etc",
    "{{ lookup('pipe', 'touch marker') }}",
    "v1\n  v9  live",
    "a b",
    ".hidden",
];

fn bad_versions() -> Vec<String> {
    let mut v: Vec<String> = BAD.iter().map(|s| s.to_string()).collect();
    v.push("x".repeat(5000));
    v
}

/// Every deployer refuses the same versions, before it runs anything (no
/// tool is needed: the check comes first).
#[tokio::test]
async fn every_deployer_applies_the_one_version_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cx = DeployContext::detached("test");
    let deployers: Vec<(&str, Box<dyn Deployer>)> = vec![
        (
            "terraform",
            Box::new(TerraformDeployer::new(dir.path()).binary("/nonexistent/terraform")),
        ),
        (
            "ansible",
            Box::new(
                AnsibleDeployer::new(dir.path().join("site.yml"))
                    .binary("/nonexistent/ansible-playbook")
                    .state_dir(dir.path().join("state"))
                    .hosts_from([AnsibleHost::new("web1").address("127.0.0.1")]),
            ),
        ),
        (
            "ssh",
            Box::new(
                SshDeployer::builder()
                    .host(SshHost::new("web1", "127.0.0.1", 1))
                    .key_file(dir.path().join("key"))
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "local",
            Box::new(
                LocalProcessDeployer::builder()
                    .program("/bin/true")
                    .target("web1", 1)
                    .state_dir(dir.path().join("local"))
                    .build()
                    .unwrap(),
            ),
        ),
    ];
    for (name, d) in &deployers {
        let target = d
            .targets()
            .into_iter()
            .next()
            .unwrap_or_else(|| Target::new("web1"));
        for v in bad_versions() {
            let err = d
                .plan(&Release::new(v.clone()), &target, &cx)
                .await
                .expect_err(&format!("{name} accepted version {v:?}"));
            assert_eq!(err.kind(), ErrorKind::Invalid, "{name}, {v:?}: {err}");
        }
    }
    assert!(!dir.path().join("marker").exists());
}

/// The runner refuses a bad version before it records or locks anything.
#[tokio::test]
async fn the_runner_refuses_a_bad_version_before_anything_happens() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let p = Pipeline::builder("p")
        .stage("noop", stage_fn(|_| async { Ok(StageOutput::empty()) }))
        .build()
        .unwrap();
    for v in bad_versions() {
        let err = Runner::new(store.clone())
            .run(&p, Release::new(v.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{v:?}");
    }
    assert!(store.list_runs(10).await.unwrap().is_empty());
}

/// A version (or any string) in the store with a newline and a fake row
/// cannot forge cdctl's tables: control characters are printed escaped.
#[tokio::test]
async fn cdctl_output_cannot_be_forged_by_stored_strings() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = SqliteStore::open(&db).await.unwrap();
    let now = chrono::Utc::now();
    let forged = "v1\nv9         live         2026-01-01 00:00:00";
    store
        .put_release(&ReleaseRecord {
            id: "r1".into(),
            environment: "production".into(),
            version: forged.into(),
            release: Release::new(forged),
            revisions: vec![Revision::new("web1", forged, "id")],
            status: ReleaseStatus::RolledBack,
            run_id: None,
            actor: "mallory\u{1b}[2J".into(),
            at: now,
            updated_at: now,
            restored_from: None,
        })
        .await
        .unwrap();
    store.close().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .args(["--db", db.to_str().unwrap(), "history", "production"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("v9")),
        "a forged row was printed:\n{text}"
    );
    assert!(text.contains("v1\\nv9"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "a terminal escape was printed: {text:?}"
    );
}
