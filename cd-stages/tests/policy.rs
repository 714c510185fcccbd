//! The example policies in `policies/` on crafted inputs (each passes and
//! fails), policy errors with their locations, and the policy gate in a
//! pipeline over a real SBOM, secret scan and advisory check, in SQLite.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cd_core::{ErrorKind, EventKind, MemoryStore, Pipeline, Release, RunStatus, Runner, Store};
use cd_stages::compliance::advisories::{AdvisoryCheck, Level};
use cd_stages::compliance::policy::{Policy, PolicyDecision, PolicyGate, DECISION_EVENT};
use cd_stages::compliance::sbom::SbomStage;
use cd_stages::compliance::secrets::SecretScan;
use serde_json::{json, Value};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn examples() -> Policy {
    Policy::new().dir(policies_dir()).unwrap()
}

fn one(file: &str) -> Policy {
    Policy::new().file(policies_dir().join(file)).unwrap()
}

fn deny_messages(d: &PolicyDecision) -> Vec<String> {
    d.deny.iter().map(|m| m.message.clone()).collect()
}

fn rc(address: &str, ty: &str, actions: &[&str]) -> Value {
    json!({"address": address, "type": ty, "actions": actions,
           "action": match actions { ["delete"] => "delete", ["delete", "create"] | ["create", "delete"] => "replace", ["create"] => "create", _ => "update" }})
}

#[test]
fn all_example_policies_load_with_their_packages() {
    let p = examples();
    let mut packages = p.packages();
    packages.sort();
    assert_eq!(
        packages,
        [
            "cd.approvals",
            "cd.images",
            "cd.secrets",
            "cd.terraform",
            "cd.vulnerabilities"
        ]
    );
    // An empty input: nothing to deny outside production; the missing scans
    // are warnings.
    let d = p.evaluate(&json!({"environment": "staging"})).unwrap();
    assert!(d.allowed, "{:?}", d.deny);
    let warns: Vec<&str> = d.warn.iter().map(|w| w.message.as_str()).collect();
    assert!(
        warns.contains(&"no secret scan result in the input"),
        "{warns:?}"
    );
    assert!(
        warns.contains(&"no advisory check result in the input"),
        "{warns:?}"
    );
}

#[test]
fn terraform_policy_denies_deleting_or_replacing_protected_types_only() {
    let p = one("terraform_protected.rego");
    let plan = |changes: Vec<Value>| json!({"terraform_plan": {"resource_changes": changes}});

    let d = p
        .evaluate(&plan(vec![
            rc("aws_db_instance.main", "aws_db_instance", &["delete"]),
            rc("aws_s3_bucket.logs", "aws_s3_bucket", &["delete", "create"]),
            rc("aws_instance.web", "aws_instance", &["delete"]),
            rc("aws_db_instance.replica", "aws_db_instance", &["update"]),
            rc("aws_kms_key.new", "aws_kms_key", &["create"]),
        ]))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        [
            "aws_db_instance.main would be deleted: aws_db_instance is a protected resource type",
            "aws_s3_bucket.logs would be replaced: aws_s3_bucket is a protected resource type",
        ]
    );
    assert_eq!(d.deny[0].package, "cd.terraform");
    assert_eq!(d.deny[0].rule, "deny");
    assert!(d.deny[0].files[0].ends_with("terraform_protected.rego"));

    // Nothing protected destroyed: allowed.
    let d = p
        .evaluate(&plan(vec![
            rc("aws_instance.web", "aws_instance", &["delete", "create"]),
            rc("aws_db_instance.main", "aws_db_instance", &["update"]),
        ]))
        .unwrap();
    assert!(d.allowed, "{:?}", d.deny);

    // The raw JSON of `terraform show -json` (actions under `change`).
    let raw = json!({"terraform_plan": {"resource_changes": [
        {"address": "aws_dynamodb_table.t", "type": "aws_dynamodb_table", "change": {"actions": ["delete"]}}
    ]}});
    assert_eq!(p.evaluate(&raw).unwrap().deny.len(), 1);

    // Configured types replace the defaults; addresses are protected too.
    let p = one("terraform_protected.rego")
        .data(json!({"policy_config": {
            "protected_resource_types": ["null_resource"],
            "protected_addresses": ["aws_instance.bastion"]
        }}))
        .unwrap();
    let d = p
        .evaluate(&plan(vec![
            rc("null_resource.app", "null_resource", &["delete", "create"]),
            rc("aws_db_instance.main", "aws_db_instance", &["delete"]),
            rc("aws_instance.bastion", "aws_instance", &["delete"]),
        ]))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        [
            "aws_instance.bastion would be deleted: aws_instance is a protected resource type",
            "null_resource.app would be replaced: null_resource is a protected resource type",
        ]
    );
}

#[test]
fn images_policy_requires_a_digest() {
    let p = one("images_by_digest.rego");
    let digest = format!("registry.example/shop@sha256:{}", "a1".repeat(32));
    let d = p
        .evaluate(&json!({"images": [digest, "nginx:1.27", "registry.example/api@sha256:short"]}))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        [
            "image nginx:1.27 is not referenced by digest (use name@sha256:<digest>)",
            "image registry.example/api@sha256:short is not referenced by digest (use name@sha256:<digest>)",
        ]
    );
    assert!(p.evaluate(&json!({"images": [digest]})).unwrap().allowed);
    assert!(p.evaluate(&json!({"images": []})).unwrap().allowed);
}

#[test]
fn production_needs_two_approvals_by_different_people() {
    let p = one("production_approvals.rego");
    let approval = |who: &str, decision: &str| json!({"node": "approval", "approver": who, "decision": decision, "at": "2026-11-30T12:00:00Z"});
    let input =
        |env: &str, approvals: Vec<Value>| json!({"environment": env, "approvals": approvals});

    let d = p
        .evaluate(&input("production", vec![approval("alice", "approve")]))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        ["production needs 2 approvals by different people, has 1 (alice)"]
    );
    // The same person twice is one approval.
    let d = p
        .evaluate(&input(
            "production",
            vec![approval("alice", "approve"), approval("alice", "approve")],
        ))
        .unwrap();
    assert!(!d.allowed);
    // Two people: allowed.
    let d = p
        .evaluate(&input(
            "production",
            vec![approval("alice", "approve"), approval("bob", "approve")],
        ))
        .unwrap();
    assert!(d.allowed, "{:?}", d.deny);
    // A rejection denies whatever the count.
    let d = p
        .evaluate(&input(
            "production",
            vec![
                approval("alice", "approve"),
                approval("bob", "approve"),
                approval("carol", "reject"),
            ],
        ))
        .unwrap();
    assert_eq!(deny_messages(&d), ["carol rejected this release"]);
    // Staging needs none.
    assert!(p.evaluate(&input("staging", vec![])).unwrap().allowed);
    // Configurable.
    let p = one("production_approvals.rego")
        .data(json!({"policy_config": {"required_approvals": 3, "production_environments": ["prod-eu"]}}))
        .unwrap();
    let d = p
        .evaluate(&input(
            "prod-eu",
            vec![approval("alice", "approve"), approval("bob", "approve")],
        ))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        ["prod-eu needs 3 approvals by different people, has 2 (alice, bob)"]
    );
}

#[test]
fn no_critical_vulnerability_and_high_ones_warn() {
    let p = one("no_critical_vulnerabilities.rego");
    let m = |id: &str, level: &str| {
        json!({"id": id, "aliases": [], "summary": "bad", "level": level, "score": null,
               "fixed": ["1.2.3"], "component": {"ecosystem": "crates.io", "name": "vulnlib", "version": "1.0.0"}})
    };
    let d = p
        .evaluate(&json!({"advisories": {
            "components": 3,
            "failing": [m("RUSTSEC-2099-0001", "critical")],
            "below_threshold": [m("RUSTSEC-2099-0002", "high"), m("RUSTSEC-2099-0003", "medium")],
            "ignored": [], "expired_ignores": []}}))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        ["vulnlib@1.0.0: critical vulnerability RUSTSEC-2099-0001 (bad), fixed in 1.2.3"]
    );
    assert_eq!(
        d.warn
            .iter()
            .map(|w| w.message.as_str())
            .collect::<Vec<_>>(),
        ["vulnlib@1.0.0: high vulnerability RUSTSEC-2099-0002 (bad), fixed in 1.2.3"]
    );
    let d = p
        .evaluate(&json!({"advisories": {"components": 3, "failing": [], "below_threshold": [m("X", "medium")], "ignored": [], "expired_ignores": []}}))
        .unwrap();
    assert!(d.allowed && d.warn.is_empty(), "{d:?}");
}

#[test]
fn no_secret_findings() {
    let p = one("no_secrets.rego");
    let d = p
        .evaluate(&json!({"secrets": {"files": 2, "bytes": 10, "findings": [
            {"file": "app/.env", "line": 3, "rule": "aws-access-key-id", "fingerprint": "0123456789abcdef", "redacted": "AKIA… (20 chars)"}
        ], "skipped": [{"file": "logo.png", "reason": "binary"}]}}))
        .unwrap();
    assert_eq!(
        deny_messages(&d),
        ["secret at app/.env:3 (aws-access-key-id, AKIA… (20 chars), fingerprint 0123456789abcdef)"]
    );
    assert_eq!(d.warn[0].message, "not scanned: logo.png (binary)");
    let d = p
        .evaluate(&json!({"secrets": {"files": 2, "bytes": 10, "findings": [], "skipped": []}}))
        .unwrap();
    assert!(d.allowed && d.warn.is_empty(), "{d:?}");
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let err = Policy::new()
        .source(
            "broken.rego",
            "package cd.broken\n\ndeny contains msg if {\n    msg := )\n}\n",
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(err.context("file"), Some("broken.rego"), "{err}");
    assert_eq!(err.context("line"), Some("4"), "{err}");
    assert_eq!(err.context("column"), Some("9"), "{err}");
    assert!(
        err.to_string().starts_with("policy broken.rego:4:9: "),
        "{err}"
    );

    // From a file: the path is the file named.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.rego"),
        "package cd.a\ndeny contains 1 if {\n",
    )
    .unwrap();
    let err = Policy::new().dir(dir.path()).unwrap_err();
    let file = err.context("file").unwrap().to_string();
    assert!(file.ends_with("a.rego"), "{err}");
    assert!(err.context("line").is_some(), "{err}");

    // A directory without policies, a missing file.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        Policy::new().dir(empty.path()).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let missing = Policy::new()
        .file(dir.path().join("nope.rego"))
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    assert!(missing.to_string().contains("nope.rego"), "{missing}");
}

#[test]
fn an_evaluation_error_names_the_package() {
    // Two values for one complete rule: a conflict only evaluation finds.
    let p = Policy::new()
        .source(
            "conflict.rego",
            "package cd.conflict\n\nlimit := 1 if input.a\nlimit := 2 if input.b\n\ndeny contains \"too many\" if limit > 0\n",
        )
        .unwrap();
    assert!(p.evaluate(&json!({"a": true})).unwrap().deny.len() == 1);
    let err = p.evaluate(&json!({"a": true, "b": true})).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    assert_eq!(err.context("package"), Some("cd.conflict"), "{err}");
    assert_eq!(err.context("file"), Some("conflict.rego"), "{err}");
}

#[test]
fn object_messages_keep_their_details() {
    let p = Policy::new()
        .source(
            "obj.rego",
            "package cd.obj\ndeny contains {\"msg\": \"bad\", \"resource\": \"x\"} if true\nwarn contains \"careful\" if true\n",
        )
        .unwrap();
    let d = p.evaluate(&json!({})).unwrap();
    assert_eq!(d.deny[0].message, "bad");
    assert_eq!(d.deny[0].details, json!({"resource": "x"}));
    assert_eq!(d.warn[0].message, "careful");
    assert_eq!(d.reasons(), "cd.obj: bad");
}

const OSV_CRITICAL: &str = r#"{
  "schema_version": "1.6.0", "id": "RUSTSEC-2099-0001", "aliases": ["CVE-2099-1111"],
  "summary": "memory corruption in vulnlib",
  "affected": [{
    "package": {"ecosystem": "crates.io", "name": "vulnlib"},
    "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "1.2.3"}]}],
    "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]
  }]}"#;

const CARGO_LOCK: &str = "version = 3\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"vulnlib\"\nversion = \"1.0.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n[[package]]\nname = \"serde\"\nversion = \"1.0.200\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n";

/// A release tree with a lock file and (optionally) a planted AWS key; an
/// OSV directory with one critical advisory.
fn release_tree(with_secret: bool, vulnlib: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("Cargo.lock"),
        CARGO_LOCK.replace("\"1.0.0\"", &format!("\"{vulnlib}\"")),
    )
    .unwrap();
    std::fs::write(app.join("main.rs"), "fn main() {}\n").unwrap();
    let key = format!("AKIA{}", "QX7RT2ZKLM4NB6VW");
    if with_secret {
        std::fs::write(
            app.join("settings.env"),
            format!("AWS_ACCESS_KEY_ID={key}\n"),
        )
        .unwrap();
    }
    let osv = dir.path().join("osv");
    std::fs::create_dir_all(&osv).unwrap();
    std::fs::write(osv.join("RUSTSEC-2099-0001.json"), OSV_CRITICAL).unwrap();
    (dir, key)
}

fn compliance_pipeline(root: &Path) -> Pipeline {
    Pipeline::builder("shop")
        .stage("sbom", SbomStage::lock_files(root.join("app")).name("shop"))
        .stage("secrets", SecretScan::path(root.join("app")).report_only())
        .stage(
            "advisories",
            AdvisoryCheck::sbom_from(root.join("osv"), "sbom")
                .fail_at(Level::Critical)
                .report_only(),
        )
        .needs(["sbom"])
        .gate("policy", PolicyGate::new(examples()))
        .needs(["sbom", "secrets", "advisories"])
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_policy_gate_decides_over_sbom_secrets_and_advisories() {
    let (tree, key) = release_tree(true, "1.0.0");
    let store = Arc::new(MemoryStore::new());
    let release = Release::new("v7").config(
        "image",
        format!("registry.example/shop@sha256:{}", "b2".repeat(32)),
    );
    let report = Runner::new(store.clone())
        .environment("staging")
        .run(&compliance_pipeline(tree.path()), release)
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let node = report.node("policy").unwrap();
    let reason = node
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(reason.contains("policy denied"), "{reason}");
    assert!(
        reason.contains(
            "cd.vulnerabilities: vulnlib@1.0.0: critical vulnerability RUSTSEC-2099-0001"
        ),
        "{reason}"
    );
    assert!(reason.contains("cd.secrets: secret at "), "{reason}");
    assert!(
        reason.contains("settings.env:1 (aws-access-key-id"),
        "{reason}"
    );

    // The decision is an event naming the rule that fired.
    let events = store.events(&report.run_id, 0, 10_000).await.unwrap();
    let decision = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Custom { name, data } if name == DECISION_EVENT => Some(data.clone()),
            _ => None,
        })
        .expect("a policy_decision event");
    let d: PolicyDecision = serde_json::from_value(decision).unwrap();
    assert!(!d.allowed);
    let fired: Vec<&str> = d.deny.iter().map(|m| m.package.as_str()).collect();
    assert_eq!(fired, ["cd.secrets", "cd.vulnerabilities"]);

    // The secret's value is nowhere: not in events, node records, outputs.
    let all_events = serde_json::to_string(&events).unwrap();
    assert!(!all_events.contains(&key), "secret in events");
    let nodes = serde_json::to_string(&store.nodes(&report.run_id).await.unwrap()).unwrap();
    assert!(!nodes.contains(&key), "secret in node records");
    assert!(!format!("{report}").contains(&key));

    // The SBOM is stored with the release.
    let doc = store.release_document("v7", "sbom").await.unwrap().unwrap();
    let sbom: Value = serde_json::from_str(&doc.content).unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(
        doc.media_type,
        "application/vnd.cyclonedx+json; version=1.5"
    );
    assert_eq!(doc.run_id.as_deref(), Some(report.run_id.as_str()));
    let names: Vec<&str> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["serde", "vulnlib"]);
}

#[tokio::test]
async fn the_policy_gate_passes_a_clean_release_and_outputs_its_decision() {
    let (tree, _) = release_tree(false, "1.2.3");
    let store = Arc::new(MemoryStore::new());
    let pipeline = Pipeline::builder("shop")
        .stage("sbom", SbomStage::lock_files(tree.path().join("app")))
        .stage("secrets", SecretScan::path(tree.path().join("app")))
        .stage(
            "advisories",
            AdvisoryCheck::sbom_from(tree.path().join("osv"), "sbom").report_only(),
        )
        .needs(["sbom"])
        .stage("policy", PolicyGate::new(examples()))
        .needs(["sbom", "secrets", "advisories"])
        .build()
        .unwrap();
    let report = Runner::new(store.clone())
        .environment("staging")
        .run(&pipeline, Release::new("v8"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let out = report.output("policy").unwrap();
    assert_eq!(out["allowed"], json!(true));
    assert_eq!(out["deny"], json!([]));
    assert_eq!(out["packages"].as_array().unwrap().len(), 5);
    // The sbom output carries its size and the stored document's hash.
    let sbom = report.output("sbom").unwrap();
    assert_eq!(sbom["components"], json!(2));
    assert_eq!(sbom["stored"], json!(true));
    let doc = store.release_document("v8", "sbom").await.unwrap().unwrap();
    assert_eq!(sbom["sha256"], json!(doc.sha256));
}

#[tokio::test]
async fn production_is_denied_without_two_approvals_and_unpinned_images() {
    let store = Arc::new(MemoryStore::new());
    let pipeline = Pipeline::builder("shop")
        .gate(
            "approval",
            cd_stages::ApprovalGate::any_of(["alice", "bob"]).auto_approve_as("alice"),
        )
        .gate("policy", PolicyGate::new(examples()).image("nginx:1.27"))
        .needs(["approval"])
        .build()
        .unwrap();
    let report = Runner::new(store.clone())
        .environment("production")
        .run(&pipeline, Release::new("v9"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let reason = report
        .node("policy")
        .and_then(|n| n.error.as_ref())
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        reason.contains(
            "cd.approvals: production needs 2 approvals by different people, has 1 (alice)"
        ),
        "{reason}"
    );
    assert!(
        reason.contains("cd.images: image nginx:1.27 is not referenced by digest"),
        "{reason}"
    );
}

#[tokio::test]
async fn two_nodes_with_the_same_section_must_be_named() {
    let (tree, _) = release_tree(false, "1.2.3");
    let app = tree.path().join("app");
    let pipeline = |gate: PolicyGate| {
        Pipeline::builder("shop")
            .stage("sbom-a", SbomStage::lock_files(&app))
            .stage("sbom-b", SbomStage::lock_files(&app))
            .gate("policy", gate)
            .needs(["sbom-a", "sbom-b"])
            .build()
            .unwrap()
    };
    let store = Arc::new(MemoryStore::new());
    let report = Runner::new(store.clone())
        .run(&pipeline(PolicyGate::new(examples())), Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let msg = report
        .node("policy")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("`sbom-a`, `sbom-b`"), "{msg}");
    assert!(msg.contains("PolicyGate::sbom_from"), "{msg}");
    let report = Runner::new(store)
        .run(
            &pipeline(PolicyGate::new(examples()).sbom_from("sbom-b")),
            Release::new("v1"),
        )
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
}
