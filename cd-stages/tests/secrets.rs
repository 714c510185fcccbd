//! The secret scanner on a planted tree, the same files in a tar.gz and a
//! zip, the project's own sources (clean), and as a stage whose events,
//! output and store never hold a secret.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use cd_core::{CollectingSink, MemoryStore, Pipeline, Release, RunStatus, Runner, Store};
use cd_stages::compliance::secrets::{scan_path, Allowlist, ScanOptions, SecretScan, RULES};

use cd_testkit::secrets::write_tree;

#[test]
fn every_planted_secret_is_found_in_a_tree_and_in_archives() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    let planted = write_tree(&root);
    let kinds: BTreeSet<&str> = planted.iter().map(|p| p.1.as_str()).collect();
    assert!(kinds.len() >= 15 && kinds.len() == RULES.len(), "{kinds:?}");

    let report = scan_path(&root, &ScanOptions::default()).unwrap();
    let found: BTreeSet<(String, String, usize)> = report
        .findings
        .iter()
        .map(|f| (f.file.clone(), f.rule.clone(), f.line))
        .collect();
    let want: BTreeSet<(String, String, usize)> = planted
        .iter()
        .map(|(f, r, l, _)| (f.clone(), r.clone(), *l))
        .collect();
    assert_eq!(found, want, "{:#?}", report.findings);
    assert!(report
        .skipped
        .iter()
        .any(|s| s.file == "app/logo.png" && s.reason == "binary"));
    // Not one secret in the report.
    let json = serde_json::to_string(&report).unwrap();
    for (_, rule, _, secret) in &planted {
        if rule != "private-key" {
            assert!(!json.contains(secret.as_str()), "{rule} leaked");
        }
    }

    // The same files as a tar.gz and a zip.
    let tgz = dir.path().join("app.tar.gz");
    {
        let f = std::fs::File::create(&tgz).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all(".", &root).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }
    let zip_path = dir.path().join("app.zip");
    {
        let f = std::fs::File::create(&zip_path).unwrap();
        let mut zip = zip::ZipWriter::new(f);
        for (file, _, _, _) in &planted {
            if zip
                .start_file(file.as_str(), zip::write::SimpleFileOptions::default())
                .is_ok()
            {
                zip.write_all(&std::fs::read(root.join(file)).unwrap())
                    .unwrap();
            }
        }
        zip.finish().unwrap();
    }
    for archive in [&tgz, &zip_path] {
        let r = scan_path(archive, &ScanOptions::default()).unwrap();
        let rules: BTreeSet<&str> = r.findings.iter().map(|f| f.rule.as_str()).collect();
        assert_eq!(rules, kinds, "{}", archive.display());
        assert!(
            r.findings.iter().all(|f| f.file.contains('!')),
            "archive!entry names"
        );
    }
}

#[test]
fn the_allowlist_skips_paths_rules_and_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let planted = write_tree(dir.path());
    let all = scan_path(dir.path(), &ScanOptions::default()).unwrap();
    let jwt = all
        .findings
        .iter()
        .find(|f| f.rule == "jwt")
        .unwrap()
        .clone();
    let mut allow = Allowlist::default();
    allow.paths.push("config/".into());
    allow.rules.insert("twilio-key".into());
    allow.fingerprints.insert(jwt.fingerprint.clone());
    let r = scan_path(
        dir.path(),
        &ScanOptions {
            allow,
            ..ScanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        r.findings.len(),
        planted.len() - 4,
        "2 in config/, twilio, the jwt"
    );
    assert!(r.findings.iter().all(|f| !f.file.starts_with("config/")));
    assert!(r
        .findings
        .iter()
        .all(|f| f.rule != "twilio-key" && f.rule != "jwt"));
    assert_eq!(r.allowed, 1);
}

#[test]
fn the_projects_own_sources_are_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut total = 0;
    for dir in [
        "cd-core/src",
        "cd-stages/src",
        "cd-backends/src",
        "src",
        "examples",
        "scripts",
    ] {
        let r = scan_path(&root.join(dir), &ScanOptions::default()).unwrap();
        assert!(r.findings.is_empty(), "{dir}: {:#?}", r.findings);
        total += r.files;
    }
    assert!(total > 50, "{total} files scanned");
}

#[tokio::test]
async fn as_a_stage_it_fails_and_no_secret_reaches_events_output_or_store() {
    let dir = tempfile::tempdir().unwrap();
    let planted = write_tree(dir.path());
    let store = Arc::new(MemoryStore::new());
    let sink = CollectingSink::new();
    let pipeline = Pipeline::builder("scan")
        .stage("secrets", SecretScan::path(dir.path()))
        .build()
        .unwrap();
    let report = Runner::new(store.clone())
        .sink(sink.clone())
        .run(&pipeline, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let err = report
        .node("secrets")
        .unwrap()
        .error
        .clone()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("{} secret(s) found", planted.len())),
        "{err}"
    );
    let events = serde_json::to_string(&sink.events()).unwrap();
    let stored =
        serde_json::to_string(&store.events(&report.run_id, 0, 100_000).await.unwrap()).unwrap();
    let nodes = serde_json::to_string(&store.nodes(&report.run_id).await.unwrap()).unwrap();
    for (_, rule, _, secret) in &planted {
        if rule == "private-key" {
            continue;
        }
        for (what, text) in [
            ("error", &err),
            ("events", &events),
            ("store", &stored),
            ("nodes", &nodes),
        ] {
            assert!(!text.contains(secret.as_str()), "{rule} leaked into {what}");
        }
    }
    assert!(
        events.contains("aws-access-key-id"),
        "findings are logged, redacted"
    );
}
