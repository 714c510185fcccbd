//! Policy evaluation over a Terraform plan of 1,000 resources: the five
//! example policies in `policies/` plus one rule with a Checkov twin
//! (CKV_AWS_16, RDS storage encrypted at rest), evaluated in process by
//! regorus. Time per evaluation is the median of 30 after 3 warm-ups, input
//! conversion included.
//!
//! When Checkov (PyPI) is installed — `$CD_CHECKOV`,
//! `$CD_TOOLS_DIR/venv/bin/checkov`, or `checkov` on PATH; `pip install
//! checkov` into the set-up venv — it scans
//! the same plan JSON with `--check CKV_AWS_16`, and the bench checks that
//! both deny the same resources. Checkov's time includes its start-up (it
//! is a CLI); ours does not include loading the policies (done once).
//!
//! ```text
//! cargo bench --bench policy
//! ```
//!
//! Last line: `bench policy: eval_ms=<x> resources=1000 deny=<n>
//! checkov_s=<y|na> same_deny=<true|false|na>`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use cd::stages::compliance::policy::Policy;
use serde_json::{json, Value};

const ENCRYPTION: &str = r#"
package bench.encryption

# As Checkov's CKV_AWS_16: RDS storage is encrypted at rest.
deny contains msg if {
	some rc in input.terraform_plan.resource_changes
	rc.type == "aws_db_instance"
	not "delete" in rc.change.actions
	not rc.change.after.storage_encrypted == true
	msg := sprintf("%s: RDS storage not encrypted at rest (CKV_AWS_16)", [rc.address])
}
"#;

/// The raw `terraform show -json` shape: resource_changes (for us) and
/// planned_values (for Checkov).
fn plan(n: usize) -> Value {
    let mut changes = Vec::new();
    let mut planned = Vec::new();
    for i in 0..n {
        let (ty, name, actions, after) = match i % 10 {
            0 => (
                "aws_db_instance",
                format!("db_{i}"),
                vec!["create"],
                // Every 100th database unencrypted.
                json!({"engine": "postgres", "instance_class": "db.t3.micro",
                       "storage_encrypted": i % 100 != 0, "allocated_storage": 20}),
            ),
            1 => (
                "aws_s3_bucket",
                format!("bucket_{i}"),
                vec!["no-op"],
                json!({"bucket": format!("bucket-{i}"), "tags": {"team": "shop"}}),
            ),
            2 | 3 => (
                "aws_security_group",
                format!("sg_{i}"),
                vec!["update"],
                json!({"name": format!("sg-{i}"), "ingress": [], "egress": []}),
            ),
            _ => (
                "aws_instance",
                format!("web_{i}"),
                if i % 7 == 0 {
                    vec!["delete", "create"]
                } else {
                    vec!["update"]
                },
                json!({"ami": "ami-0123456789abcdef0", "instance_type": "t3.small",
                       "tags": {"Name": format!("web-{i}")}}),
            ),
        };
        let address = format!("{ty}.{name}");
        changes.push(json!({
            "address": address, "mode": "managed", "type": ty, "name": name,
            "provider_name": "registry.terraform.io/hashicorp/aws",
            "change": {"actions": actions, "before": {}, "after": after, "after_unknown": {}}
        }));
        planned.push(json!({
            "address": address, "mode": "managed", "type": ty, "name": name,
            "provider_name": "registry.terraform.io/hashicorp/aws",
            "schema_version": 0, "values": after
        }));
    }
    // One protected delete for the terraform policy.
    changes.push(json!({
        "address": "aws_s3_bucket.audit_logs", "mode": "managed", "type": "aws_s3_bucket",
        "name": "audit_logs", "provider_name": "registry.terraform.io/hashicorp/aws",
        "change": {"actions": ["delete"], "before": {"bucket": "audit-logs"}, "after": null, "after_unknown": {}}
    }));
    json!({
        "format_version": "1.2", "terraform_version": "1.5.7",
        "planned_values": {"root_module": {"resources": planned}},
        "resource_changes": changes,
        "configuration": {"root_module": {}}
    })
}

fn checkov() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(c) = std::env::var("CD_CHECKOV") {
        candidates.push(c);
    }
    if let Ok(d) = std::env::var("CD_TOOLS_DIR") {
        candidates.push(format!("{d}/venv/bin/checkov"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(format!(
            "{}/.cache/cd-tools/venv/bin/checkov",
            home.to_string_lossy()
        ));
    }
    candidates.push("checkov".into());
    candidates.into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn main() {
    let n = 1000;
    let raw = plan(n);
    let policy = Policy::new()
        .dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .unwrap()
        .source("bench_encryption.rego", ENCRYPTION)
        .unwrap();
    let input = json!({
        "environment": "staging",
        "terraform_plan": raw,
        "images": [],
        "approvals": [],
    });
    for _ in 0..3 {
        policy.evaluate(&input).unwrap();
    }
    let mut times = Vec::new();
    let mut decision = None;
    for _ in 0..30 {
        let t = Instant::now();
        let d = policy.evaluate(&input).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        decision = Some(d);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let eval_ms = times[times.len() / 2];
    let decision = decision.unwrap();
    println!(
        "policy: {} packages over {} resources: median {eval_ms:.2} ms (min {:.2}, max {:.2}); {} deny, {} warn",
        decision.packages.len(),
        n + 1,
        times[0],
        times[times.len() - 1],
        decision.deny.len(),
        decision.warn.len()
    );
    for m in &decision.deny {
        println!("  deny {}: {}", m.package, m.message);
    }
    let ours: BTreeSet<String> = decision
        .deny
        .iter()
        .filter(|m| m.package == "bench.encryption")
        .filter_map(|m| m.message.split(':').next().map(str::to_string))
        .collect();

    let (checkov_s, same) = match checkov() {
        None => {
            println!(
                "checkov not installed: `pip install checkov` into the set-up venv to compare"
            );
            ("na".to_string(), "na".to_string())
        }
        Some(bin) => {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("plan.json");
            std::fs::write(&file, serde_json::to_vec(&raw).unwrap()).unwrap();
            let t = Instant::now();
            let out = std::process::Command::new(&bin)
                .args(["--framework", "terraform_plan", "--check", "CKV_AWS_16"])
                .args(["-o", "json", "--compact", "--quiet", "--skip-download"])
                .arg("-f")
                .arg(&file)
                .output()
                .expect("run checkov");
            let secs = t.elapsed().as_secs_f64();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            // One report object, or a list of them (one per framework).
            let reports: Vec<&Value> = match &v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            let theirs: BTreeSet<String> = reports
                .iter()
                .flat_map(|r| {
                    r["results"]["failed_checks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                })
                .filter_map(|c| c["resource"].as_str().map(str::to_string))
                .collect();
            println!(
                "checkov: {secs:.2} s, CKV_AWS_16 failed on {} resource(s): {:?}",
                theirs.len(),
                theirs
            );
            println!(
                "cd:      CKV_AWS_16 twin denied {} resource(s): {:?}",
                ours.len(),
                ours
            );
            (format!("{secs:.2}"), (theirs == ours).to_string())
        }
    };
    println!(
        "bench policy: eval_ms={eval_ms:.2} resources={} deny={} checkov_s={checkov_s} same_deny={same}",
        n + 1,
        decision.deny.len()
    );
}
