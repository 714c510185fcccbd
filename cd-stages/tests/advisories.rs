//! Advisory matching on fixture OSV advisories (ranges with introduced,
//! fixed, last_affected and limit; withdrawn; aliases; ignore entries with
//! an expiry), loaded from a directory and from a zip, and the CVSS v3.1
//! base score against the specification's calculator values.

use std::io::Write;

use cd_stages::compliance::advisories::{
    check, compare_versions, cvss3_base_score, AdvisoryDb, Component, Ignore, Level,
};
use chrono::NaiveDate;

const ADVISORIES: &[(&str, &str)] = &[
    (
        "RUSTSEC-2099-0001.json",
        r#"{
      "schema_version": "1.6.0", "id": "RUSTSEC-2099-0001", "aliases": ["CVE-2099-1111"],
      "summary": "memory corruption in vulnlib",
      "affected": [{
        "package": {"ecosystem": "crates.io", "name": "vulnlib"},
        "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "1.2.3"}]}],
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]
      }]}"#,
    ),
    (
        "GHSA-aaaa-bbbb-cccc.json",
        r#"{
      "id": "GHSA-aaaa-bbbb-cccc", "summary": "inclusive last_affected",
      "affected": [{
        "package": {"ecosystem": "npm", "name": "@acme/widget"},
        "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "2.0.0"}, {"last_affected": "2.1.0"}]}]
      }],
      "database_specific": {"severity": "HIGH"}}"#,
    ),
    (
        "GHSA-withdrawn.json",
        r#"{
      "id": "GHSA-dddd-eeee-ffff", "withdrawn": "2099-01-02T00:00:00Z", "summary": "withdrawn",
      "affected": [{"package": {"ecosystem": "crates.io", "name": "vulnlib"},
        "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}]}]}],
      "database_specific": {"severity": "CRITICAL"}}"#,
    ),
    (
        "PYSEC-2099-1.json",
        r#"{
      "id": "PYSEC-2099-1", "summary": "moderate, listed versions",
      "affected": [{"package": {"ecosystem": "PyPI", "name": "Some_Lib"}, "versions": ["0.9", "1.0"]}],
      "database_specific": {"severity": "MODERATE"}}"#,
    ),
    (
        "LIMITED.json",
        r#"{
      "id": "LIMITED-1", "summary": "a limit",
      "affected": [{"package": {"ecosystem": "crates.io", "name": "limited"},
        "ranges": [{"type": "SEMVER", "events": [{"introduced": "1.0.0"}, {"limit": "1.5.0"}]}]}],
      "database_specific": {"severity": "CRITICAL"}}"#,
    ),
];

fn c(eco: &str, name: &str, version: &str) -> Component {
    Component {
        ecosystem: eco.into(),
        name: name.into(),
        version: version.into(),
    }
}

fn db_dir() -> (tempfile::TempDir, AdvisoryDb) {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("osv/crates.io");
    std::fs::create_dir_all(&sub).unwrap();
    for (name, json) in ADVISORIES {
        std::fs::write(sub.join(name), json).unwrap();
    }
    let db = AdvisoryDb::load(&dir.path().join("osv")).unwrap();
    (dir, db)
}

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2099, 6, 1).unwrap()
}

#[test]
fn affected_ranges_fixed_versions_and_withdrawn_advisories() {
    let (_d, db) = db_dir();
    assert_eq!(db.len(), 5);
    let ids = |c: &Component| {
        db.matches(c)
            .iter()
            .map(|m| m.id.clone())
            .collect::<Vec<_>>()
    };
    // Inside [0, 1.2.3): affected; the withdrawn one is not reported.
    assert_eq!(
        ids(&c("crates.io", "vulnlib", "1.2.0")),
        ["RUSTSEC-2099-0001"]
    );
    assert_eq!(
        ids(&c("crates.io", "vulnlib", "0.1.0")),
        ["RUSTSEC-2099-0001"]
    );
    // The fixed version and after: not.
    assert!(ids(&c("crates.io", "vulnlib", "1.2.3")).is_empty());
    assert!(ids(&c("crates.io", "vulnlib", "2.0.0")).is_empty());
    // last_affected is inclusive.
    assert!(ids(&c("npm", "@acme/widget", "1.9.9")).is_empty());
    assert_eq!(
        ids(&c("npm", "@acme/widget", "2.1.0")),
        ["GHSA-aaaa-bbbb-cccc"]
    );
    assert!(ids(&c("npm", "@acme/widget", "2.1.1")).is_empty());
    // Listed versions, PyPI names normalised.
    assert_eq!(ids(&c("PyPI", "some-lib", "1.0")), ["PYSEC-2099-1"]);
    assert!(ids(&c("PyPI", "some-lib", "1.1")).is_empty());
    // A limit bounds the range.
    assert_eq!(ids(&c("crates.io", "limited", "1.4.9")), ["LIMITED-1"]);
    assert!(ids(&c("crates.io", "limited", "1.5.0")).is_empty());
    // Another ecosystem with the same name is another package.
    assert!(ids(&c("npm", "vulnlib", "1.0.0")).is_empty());

    let m = &db.matches(&c("crates.io", "vulnlib", "1.2.0"))[0];
    assert_eq!((m.score, m.level), (Some(9.8), Level::Critical));
    assert_eq!(m.fixed, ["1.2.3"]);
    assert_eq!(m.aliases, ["CVE-2099-1111"]);
}

#[test]
fn the_gate_fails_at_the_threshold_and_ignores_expire() {
    let (_d, db) = db_dir();
    let components = [
        c("crates.io", "vulnlib", "1.2.0"),
        c("crates.io", "vulnlib", "1.2.3"),
        c("npm", "@acme/widget", "2.0.5"),
        c("PyPI", "Some.Lib", "0.9"),
    ];
    let r = check(&db, &components, Level::High, &[], today());
    let failing: Vec<&str> = r.failing.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(failing, ["RUSTSEC-2099-0001", "GHSA-aaaa-bbbb-cccc"]);
    assert_eq!(r.below_threshold.len(), 1, "the moderate one");
    assert_eq!(r.below_threshold[0].level, Level::Medium);

    // Ignored by alias until a date; after it, it fails again.
    let ignore = Ignore {
        id: "CVE-2099-1111".into(),
        reason: "not reachable: we never call the parser".into(),
        until: NaiveDate::from_ymd_opt(2099, 7, 1).unwrap(),
    };
    let r = check(
        &db,
        &components,
        Level::High,
        std::slice::from_ref(&ignore),
        today(),
    );
    assert_eq!(r.failing.len(), 1);
    assert_eq!(r.ignored.len(), 1);
    assert_eq!(r.ignored[0].1.reason, ignore.reason);
    let later = NaiveDate::from_ymd_opt(2099, 7, 2).unwrap();
    let r = check(
        &db,
        &components,
        Level::High,
        std::slice::from_ref(&ignore),
        later,
    );
    assert_eq!(r.failing.len(), 2, "an expired ignore no longer ignores");
    assert_eq!(r.expired_ignores, [ignore]);
}

#[test]
fn advisories_load_from_a_zip_export_and_bad_json_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let zip_path = dir.path().join("all.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    for (name, json) in ADVISORIES {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(json.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
    let db = AdvisoryDb::load(&zip_path).unwrap();
    assert_eq!(db.len(), 5);
    assert_eq!(db.matches(&c("crates.io", "vulnlib", "1.0.0")).len(), 1);

    std::fs::write(
        dir.path().join("bad.json"),
        "{\n  \"id\": \"X\",\n  \"affected\": 7\n}",
    )
    .unwrap();
    let err = AdvisoryDb::load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad.json") && msg.contains("line 3"), "{msg}");
    let err = AdvisoryDb::load(&dir.path().join("missing")).unwrap_err();
    assert_eq!(err.kind(), cd_core::ErrorKind::NotFound);
}

#[test]
fn cvss_v3_base_scores_match_the_calculator() {
    for (vector, want) in [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:N/AC:H/PR:N/UI:N/S:C/C:H/I:N/A:N", 6.8),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", 6.4),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:N/A:N", 4.3),
        ("CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.6),
        ("CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0),
    ] {
        assert_eq!(cvss3_base_score(vector).unwrap(), want, "{vector}");
    }
    let err = cvss3_base_score("CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H").unwrap_err();
    assert!(err.to_string().contains("AV:X"), "{err}");
    assert_eq!(Level::from_score(6.9), Level::Medium);
    assert_eq!(compare_versions("1.2", "1.2.0"), std::cmp::Ordering::Equal);
    assert_eq!(
        compare_versions("1.10.0", "1.9.0"),
        std::cmp::Ordering::Greater
    );
    assert_eq!(
        compare_versions("1.0.0-rc.1", "1.0.0"),
        std::cmp::Ordering::Less
    );
}

#[tokio::test]
async fn the_stage_reads_lock_files_and_fails_on_a_vulnerable_component() {
    use cd_core::{MemoryStore, Pipeline, Release, RunStatus, Runner};
    use cd_stages::compliance::advisories::AdvisoryCheck;
    let (d, _) = db_dir();
    let app = d.path().join("app");
    std::fs::create_dir_all(app.join("web")).unwrap();
    std::fs::write(
        app.join("Cargo.lock"),
        "version = 3\n\n[[package]]\nname = \"vulnlib\"\nversion = \"1.2.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::write(
        app.join("web/package-lock.json"),
        r#"{"lockfileVersion": 3, "packages": {"": {"name": "web"}, "node_modules/@acme/widget": {"version": "3.0.0"}}}"#,
    )
    .unwrap();
    std::fs::write(
        app.join("requirements.txt"),
        "Some_Lib==1.0  # pinned\nrequests>=2\n",
    )
    .unwrap();
    std::fs::create_dir_all(app.join("worker")).unwrap();
    std::fs::write(
        app.join("worker/poetry.lock"),
        "# This file is automatically @generated by Poetry\n\n[[package]]\nname = \"urllib3\"\nversion = \"2.2.1\"\ndescription = \"HTTP\"\noptional = false\npython-versions = \">=3.8\"\n\n[[package]]\nname = \"mylib\"\nversion = \"0.1.0\"\ndescription = \"local\"\noptional = false\npython-versions = \"*\"\n\n[package.source]\ntype = \"directory\"\nurl = \"../mylib\"\n\n[metadata]\nlock-version = \"2.0\"\n",
    )
    .unwrap();
    let comps = cd_stages::compliance::components::discover(&app).unwrap();
    assert_eq!(
        comps,
        [
            c("PyPI", "Some_Lib", "1.0"),
            c("PyPI", "urllib3", "2.2.1"),
            c("crates.io", "vulnlib", "1.2.0"),
            c("npm", "@acme/widget", "3.0.0")
        ]
    );
    // A poetry.lock that does not parse names the file.
    std::fs::write(app.join("worker/poetry.lock"), "[[package]\nname = 1").unwrap();
    let err = cd_stages::compliance::components::discover(&app).unwrap_err();
    assert!(err.to_string().contains("poetry.lock"), "{err}");
    std::fs::remove_file(app.join("worker/poetry.lock")).unwrap();
    let run = |stage: AdvisoryCheck| async move {
        let p = Pipeline::builder("adv")
            .stage("advisories", stage)
            .build()
            .unwrap();
        Runner::new(std::sync::Arc::new(MemoryStore::new()))
            .run(&p, Release::new("v1"))
            .await
            .unwrap()
    };
    let r = run(AdvisoryCheck::new(d.path().join("osv"), &app)).await;
    assert_eq!(r.status, RunStatus::Failed);
    let err = r
        .node("advisories")
        .unwrap()
        .error
        .clone()
        .unwrap()
        .to_string();
    assert!(
        err.contains("RUSTSEC-2099-0001 in vulnlib@1.2.0 (Critical)"),
        "{err}"
    );
    // Ignored until a date that has not come: it passes.
    let until = chrono::Utc::now().date_naive() + chrono::Duration::days(30);
    let r = run(AdvisoryCheck::new(d.path().join("osv"), &app).ignore(
        "RUSTSEC-2099-0001",
        "patched locally",
        until,
    ))
    .await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r}");
}
