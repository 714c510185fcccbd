//! The regression-test stage against real processes: a Python stand-in for
//! pytest (tests/fixtures/junit/fake_suite.py) and a real cargo-nextest run
//! of a tiny crate made in the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cd_core::{
    CollectingSink, ErrorKind, EventKind, MemoryStore, Pipeline, Release, RunStatus, Runner,
    StageContext, Store,
};
use cd_stages::junit::CaseStatus;
use cd_stages::testsuite::{TestSuite, TestSuiteOutput, FAILED, REPORT_EVENT};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit/fake_suite.py")
}

fn suite(dir: &Path, extra: &[&str]) -> TestSuite {
    let mut args = vec![script().display().to_string(), "report.xml".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    TestSuite::new("python3")
        .args(args)
        .cwd(dir)
        .report("report.xml")
        .timeout(Duration::from_secs(60))
}

/// The `test_report` event data of a run's `tests` node.
async fn report_event(store: &Arc<dyn Store>, run: &str) -> serde_json::Value {
    store
        .events(run, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::Custom { name, data } if name == REPORT_EVENT => Some(data),
            _ => None,
        })
        .expect("a test_report event")
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

#[tokio::test]
async fn regressions_fixes_and_missing_tests_against_the_previous_release() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runner = Runner::new(store.clone()).environment("staging");
    let run = |version: &'static str, extra: &'static [&'static str]| {
        let p = Pipeline::builder("tests")
            .stage("tests", suite(dir.path(), extra))
            .build()
            .unwrap();
        let runner = runner.clone();
        async move { runner.run(&p, Release::new(version)).await.unwrap() }
    };

    // v1: search fails. Nothing to compare with yet.
    let v1 = run("v1", &["--fail", "test_search"]).await;
    assert_eq!(v1.status, RunStatus::Failed, "{v1}");
    let err = v1.node("tests").unwrap().error.clone().unwrap();
    assert!(
        err.message.contains("tests.test_app::test_search"),
        "{}",
        err.message
    );

    // v2: search is fixed, checkout regressed.
    let v2 = run("v2", &["--fail", "test_checkout"]).await;
    assert_eq!(v2.status, RunStatus::Failed, "{v2}");
    let err = v2.node("tests").unwrap().error.clone().unwrap();
    assert!(
        err.message
            .contains("1 regressions: tests.test_app::test_checkout"),
        "{}",
        err.message
    );
    let data = report_event(&store, &v2.run_id).await;
    assert_eq!(ids(&data["regressions"]), ["tests.test_app::test_checkout"]);
    assert_eq!(ids(&data["fixed"]), ["tests.test_app::test_search"]);

    // v3: all pass, but checkout is no longer run: it is missing.
    let v3 = run("v3", &["--only", "test_login", "test_search"]).await;
    assert_eq!(v3.status, RunStatus::Succeeded, "{v3}");
    let out: TestSuiteOutput = serde_json::from_value(v3.output("tests").unwrap().clone()).unwrap();
    let cmp = out.comparison.unwrap();
    assert_eq!(cmp.previous_version, "v2");
    assert_eq!(cmp.missing, ["tests.test_app::test_checkout"]);
    assert!(cmp.regressions.is_empty());
    assert_eq!(out.counts.passed, 2);
    assert!(out.table.contains("missing"), "{}", out.table);
    assert!(out.table.contains("vs v2: 0 regressions"), "{}", out.table);
}

#[tokio::test]
async fn a_test_failing_once_then_passing_is_flaky() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("flaky.state");
    let flaky = ["--flaky", "test_search", state.to_str().unwrap()];
    let rerun: Vec<String> = [script().display().to_string(), "report.xml".into()]
        .into_iter()
        .chain(flaky.iter().map(|s| s.to_string()))
        .chain(["--only".to_string(), FAILED.to_string()])
        .collect();
    let cx = || StageContext::detached("tests", Release::new("v1"), Arc::new(MemoryStore::new()));

    // Allowed: the stage passes and names the flaky case.
    let allowed = suite(dir.path(), &flaky)
        .retry_failed(2, rerun.clone())
        .allow_flaky(true);
    let out: TestSuiteOutput = cd_core::Stage::run(&allowed, &cx())
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(out.flaky, ["tests.test_app::test_search"]);
    assert_eq!(out.counts.flaky, 1);
    assert_eq!(out.exit_code, Some(1), "the first run failed");
    let case = out
        .report
        .cases
        .iter()
        .find(|c| c.name == "test_search")
        .unwrap();
    assert_eq!(case.status, CaseStatus::Flaky);

    // Not allowed (the default): the same run fails, naming it flaky.
    std::fs::remove_file(&state).unwrap();
    let strict = suite(dir.path(), &flaky).retry_failed(2, rerun);
    let err = cd_core::Stage::run(&strict, &cx()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("1 flaky: tests.test_app::test_search"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_reports_and_a_hanging_command_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cx = || StageContext::detached("tests", Release::new("v1"), Arc::new(MemoryStore::new()));

    // Malformed XML: the file and the line.
    let err = cd_core::Stage::run(&suite(dir.path(), &["--garbage"]), &cx())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(
        err.context("file").unwrap().ends_with("report.xml"),
        "{err}"
    );
    assert_eq!(err.context("line"), Some("4"), "{err}");

    // No report: the file, and the command's exit code. A stale report
    // from the run before is not read.
    let err = cd_core::Stage::run(&suite(dir.path(), &["--no-report"]), &cx())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    assert!(err.to_string().contains("left no readable report"), "{err}");
    assert!(err.to_string().contains("report.xml"), "{err}");

    // A non-zero exit with a clean report: the command failed outside its
    // tests.
    let err = cd_core::Stage::run(&suite(dir.path(), &["--exit", "3"]), &cx())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exited with code 3"), "{err}");
    let out = cd_core::Stage::run(
        &suite(dir.path(), &["--exit", "3"]).allow_nonzero_exit(true),
        &cx(),
    )
    .await
    .unwrap();
    assert_eq!(out.get("exit_code"), Some(&serde_json::json!(3)));

    // Output that is not UTF-8 does not break the run.
    cd_core::Stage::run(&suite(dir.path(), &["--binary-output"]), &cx())
        .await
        .unwrap();

    // A command that does not start: named.
    let err = cd_core::Stage::run(
        &TestSuite::new("/nonexistent/pytest").report("r.xml"),
        &cx(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/pytest"), "{err}");

    // A command that hangs past its timeout: its whole group is killed,
    // the child it started included.
    let pid_file = dir.path().join("child.pid");
    let hanging =
        suite(dir.path(), &["--hang", pid_file.to_str().unwrap()]).timeout(Duration::from_secs(5));
    let err = cd_core::Stage::run(&hanging, &cx()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("fake_suite.py"), "{err}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proc.exists() && !zombie(&proc) {
        assert!(
            std::time::Instant::now() < deadline,
            "the test's child survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn zombie(proc: &Path) -> bool {
    std::fs::read_to_string(proc.join("stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// cargo-nextest's own JUnit output: a tiny crate with a passing and a
/// failing test, run by the real cargo-nextest inside the test.
#[tokio::test]
async fn reads_the_junit_report_cargo_nextest_writes() {
    if std::process::Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(std::env::var_os("CI").is_none(), "cargo-nextest is missing");
        eprintln!("SKIP: cargo-nextest is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir_all(root.join(".config")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        root.join("src/lib.rs"),
        "#[cfg(test)]\nmod tests {\n    #[test]\n    fn adds() { assert_eq!(1 + 1, 2); }\n    #[test]\n    fn divides() { assert_eq!(7 / 2, 4, \"integer division\"); }\n}\n",
    )
    .unwrap();
    std::fs::write(
        root.join(".config/nextest.toml"),
        "[profile.ci.junit]\npath = \"junit.xml\"\n",
    )
    .unwrap();
    let tests = TestSuite::new("cargo")
        .args(["nextest", "run", "--profile", "ci", "--offline"])
        .cwd(root)
        .env(
            "CARGO_TARGET_DIR",
            root.join("target").display().to_string(),
        )
        .env("CARGO_TERM_COLOR", "never")
        .report("target/nextest/ci/junit.xml")
        .timeout(Duration::from_secs(300));
    let sink = CollectingSink::new();
    let cx = StageContext::detached("tests", Release::new("v1"), Arc::new(MemoryStore::new()))
        .with_emitter(cd_core::Emitter::new(
            "r",
            1,
            vec![Arc::new(sink.clone())],
            Default::default(),
        ));
    let err = cd_core::Stage::run(&tests, &cx).await.unwrap_err();
    assert!(
        err.to_string().contains("1 failing: tiny::tests::divides"),
        "{err}"
    );
    let report = sink
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::Custom { name, data } if name == REPORT_EVENT => Some(data),
            _ => None,
        })
        .unwrap();
    let cases: Vec<cd_stages::junit::TestCase> =
        serde_json::from_value(report["report"]["cases"].clone()).unwrap();
    let status = |n: &str| cases.iter().find(|c| c.name.ends_with(n)).unwrap().status;
    assert_eq!(status("adds"), CaseStatus::Passed);
    assert_eq!(status("divides"), CaseStatus::Failed);
    let failed = cases.iter().find(|c| c.name.ends_with("divides")).unwrap();
    assert!(
        failed
            .output
            .as_deref()
            .unwrap_or("")
            .contains("integer division"),
        "{failed:?}"
    );
}
