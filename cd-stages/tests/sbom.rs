//! The SBOM of this workspace lists exactly the packages `cargo metadata`
//! resolves, and every SBOM cd writes validates against the CycloneDX 1.5
//! JSON schema (vendored in tests/fixtures/cyclonedx, checked offline).

use std::collections::BTreeSet;
use std::path::Path;

use cd_stages::compliance::advisories::Component;
use cd_stages::compliance::sbom::{purl, Sbom};
use serde_json::Value;

fn schema_errors(doc: &Value) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cyclonedx");
    let load = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(f)).unwrap()).unwrap()
    };
    let bom = load("bom-1.5.schema.json");
    let registry = jsonschema::Registry::new()
        .add(
            "http://cyclonedx.org/schema/spdx.schema.json",
            load("spdx.schema.json"),
        )
        .unwrap()
        .add(
            "http://cyclonedx.org/schema/jsf-0.82.schema.json",
            load("jsf-0.82.schema.json"),
        )
        .unwrap()
        .prepare()
        .unwrap();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .with_registry(&registry)
        .build(&bom)
        .unwrap();
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_workspace_sbom_lists_exactly_what_cargo_resolves_and_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let sbom = Sbom::from_cargo(root, "cd", "0.1.0").unwrap();

    // What cargo resolves, independently.
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let resolved: BTreeSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .filter(|id| !members.contains(id))
        .collect();
    let want: BTreeSet<(String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().unwrap()))
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let got: BTreeSet<(String, String)> = sbom
        .components
        .values()
        .map(|c| (c.name.clone(), c.version.clone()))
        .collect();
    assert_eq!(got, want);
    assert!(got.len() > 100, "{} packages", got.len());
    let serde_version = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "serde")
        .unwrap()["version"]
        .as_str()
        .unwrap();
    let serde = &sbom.components[&purl("crates.io", "serde", serde_version)];

    assert_eq!(
        serde.sha256.as_ref().map(String::len),
        Some(64),
        "checksum from Cargo.lock"
    );
    assert_eq!(serde.license.as_deref(), Some("MIT OR Apache-2.0"));
    assert!(sbom.dependencies["app"]
        .iter()
        .any(|d| d.starts_with("pkg:cargo/tokio@")));

    let doc = sbom.to_json();
    assert_eq!(doc["specVersion"], "1.5");
    let errors = schema_errors(&doc);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn sboms_of_lock_files_use_each_ecosystems_purl_and_validate() {
    let c = |e: &str, n: &str, v: &str| Component {
        ecosystem: e.into(),
        name: n.into(),
        version: v.into(),
    };
    let sbom = Sbom::from_components(
        "web",
        "2.0.0",
        &[
            c("npm", "@acme/widget", "3.0.0"),
            c("PyPI", "Some_Lib", "1.0"),
            c("crates.io", "semver", "1.0.0+build.5"),
        ],
    );
    let purls: Vec<&str> = sbom.components.keys().map(String::as_str).collect();
    assert_eq!(
        purls,
        [
            "pkg:cargo/semver@1.0.0%2Bbuild.5",
            "pkg:npm/%40acme/widget@3.0.0",
            "pkg:pypi/some-lib@1.0"
        ]
    );
    assert_eq!(sbom.to_components().len(), 3);
    let errors = schema_errors(&sbom.to_json());
    assert!(errors.is_empty(), "{errors:#?}");
    // The validator does reject a broken document.
    let mut bad = sbom.to_json();
    bad["components"][0]["type"] = "gizmo".into();
    assert!(!schema_errors(&bad).is_empty());
}
