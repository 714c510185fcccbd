//! SBOMs in CycloneDX 1.5 JSON (<https://cyclonedx.org/docs/1.5/json/>).
//!
//! - [`Sbom::from_cargo`]: a Rust workspace, from `cargo metadata` (every
//!   package the build resolves that is not a workspace member: name,
//!   version, `pkg:cargo/...` purl, license expression, the SHA-256 of the
//!   crate from `Cargo.lock`, and the dependency graph);
//! - [`Sbom::from_components`]: any tree, from the lock files
//!   [`super::components::discover`] reads (Cargo.lock, package-lock.json,
//!   requirements.txt).
//!
//! purls follow the package-url spec: `pkg:cargo/name@version`,
//! `pkg:npm/%40scope/name@version`, `pkg:pypi/name@version` (lower case,
//! `_` as `-`), `+` in a version as `%2B`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cd_core::{Error, Result};
use serde_json::{json, Value};

use super::advisories::Component;

/// A CycloneDX 1.5 BOM.
#[derive(Debug, Clone, PartialEq)]
pub struct Sbom {
    /// The application it describes.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its components (libraries), by bom-ref.
    pub components: BTreeMap<String, SbomComponent>,
    /// bom-ref → the bom-refs it depends on (the application's ref is
    /// `app`).
    pub dependencies: BTreeMap<String, BTreeSet<String>>,
}

/// One library of an [`Sbom`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbomComponent {
    /// The ecosystem (`crates.io`, `npm`, `PyPI`).
    pub ecosystem: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its package URL (also its bom-ref).
    pub purl: String,
    /// An SPDX license expression, when known.
    pub license: Option<String>,
    /// SHA-256 of the package, hex, when known.
    pub sha256: Option<String>,
}

/// The package URL of a component.
pub fn purl(ecosystem: &str, name: &str, version: &str) -> String {
    let v = version.replace('+', "%2B");
    match ecosystem {
        "npm" => format!("pkg:npm/{}@{v}", name.replace('@', "%40")),
        "PyPI" => format!(
            "pkg:pypi/{}@{v}",
            name.to_ascii_lowercase().replace('_', "-")
        ),
        _ => format!("pkg:cargo/{name}@{v}"),
    }
}

impl Sbom {
    /// The BOM of the Rust workspace at `dir`, from `cargo metadata
    /// --format-version 1 --locked` (run in `dir`; offline when the
    /// registry cache has the crates).
    ///
    /// Errors: [`cd_core::ErrorKind::Failed`] when cargo fails (its message
    /// quoted), [`cd_core::ErrorKind::Invalid`] for output it cannot read.
    pub fn from_cargo(dir: &Path, name: &str, version: &str) -> Result<Self> {
        let out =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["metadata", "--format-version", "1", "--locked"])
                .current_dir(dir)
                .output()
                .map_err(|e| Error::failed(format!("cargo metadata in {}: {e}", dir.display())))?;
        if !out.status.success() {
            return Err(Error::failed(format!(
                "cargo metadata in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let meta: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::invalid(format!("cargo metadata output: {e}")))?;
        let members: BTreeSet<&str> = meta["workspace_members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        // Checksums from Cargo.lock.
        let lock_path = meta["workspace_root"]
            .as_str()
            .map(|r| Path::new(r).join("Cargo.lock"));
        let mut checksums: BTreeMap<(String, String), String> = BTreeMap::new();
        if let Some(text) = lock_path.and_then(|p| std::fs::read_to_string(p).ok()) {
            if let Ok(doc) = text.parse::<toml::Table>() {
                for p in doc
                    .get("package")
                    .and_then(|p| p.as_array())
                    .into_iter()
                    .flatten()
                {
                    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
                    if let (Some(n), Some(v), Some(c)) = (s("name"), s("version"), s("checksum")) {
                        checksums.insert((n, v), c);
                    }
                }
            }
        }
        let mut sbom = Sbom {
            name: name.into(),
            version: version.into(),
            components: BTreeMap::new(),
            dependencies: BTreeMap::new(),
        };
        let mut refs: BTreeMap<&str, String> = BTreeMap::new();
        for p in meta["packages"].as_array().into_iter().flatten() {
            let id = p["id"].as_str().unwrap_or_default();
            if members.contains(id) {
                refs.insert(id, "app".into());
                continue;
            }
            let (n, v) = (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["version"].as_str().unwrap_or_default().to_string(),
            );
            let purl = purl("crates.io", &n, &v);
            refs.insert(id, purl.clone());
            sbom.components.insert(
                purl.clone(),
                SbomComponent {
                    ecosystem: "crates.io".into(),
                    sha256: checksums.get(&(n.clone(), v.clone())).cloned(),
                    name: n,
                    version: v,
                    purl,
                    license: p["license"].as_str().map(|l| l.replace('/', " OR ")),
                },
            );
        }
        for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
            let Some(from) = node["id"].as_str().and_then(|id| refs.get(id)) else {
                continue;
            };
            let deps = sbom.dependencies.entry(from.clone()).or_default();
            for d in node["dependencies"].as_array().into_iter().flatten() {
                if let Some(to) = d.as_str().and_then(|id| refs.get(id)) {
                    if to != from {
                        deps.insert(to.clone());
                    }
                }
            }
        }
        // Only packages the build resolves.
        let resolved: BTreeSet<String> = sbom.dependencies.keys().cloned().collect();
        sbom.components.retain(|r, _| resolved.contains(r));
        Ok(sbom)
    }

    /// A BOM of `components` (no dependency graph: lock files other than
    /// Cargo's are read flat).
    pub fn from_components(name: &str, version: &str, components: &[Component]) -> Self {
        let mut sbom = Sbom {
            name: name.into(),
            version: version.into(),
            components: BTreeMap::new(),
            dependencies: BTreeMap::new(),
        };
        for c in components {
            let p = purl(&c.ecosystem, &c.name, &c.version);
            sbom.components.insert(
                p.clone(),
                SbomComponent {
                    ecosystem: c.ecosystem.clone(),
                    name: c.name.clone(),
                    version: c.version.clone(),
                    purl: p.clone(),
                    license: None,
                    sha256: None,
                },
            );
            sbom.dependencies.entry("app".into()).or_default().insert(p);
        }
        sbom
    }

    /// The components as [`Component`]s, for the advisory check.
    pub fn to_components(&self) -> Vec<Component> {
        self.components
            .values()
            .map(|c| Component {
                ecosystem: c.ecosystem.clone(),
                name: c.name.clone(),
                version: c.version.clone(),
            })
            .collect()
    }

    /// The CycloneDX 1.5 JSON document.
    pub fn to_json(&self) -> Value {
        let components: Vec<Value> = self
            .components
            .values()
            .map(|c| {
                let mut v = json!({
                    "type": "library",
                    "bom-ref": c.purl,
                    "name": c.name,
                    "version": c.version,
                    "purl": c.purl,
                });
                if let Some(h) = &c.sha256 {
                    v["hashes"] = json!([{ "alg": "SHA-256", "content": h }]);
                }
                if let Some(l) = &c.license {
                    v["licenses"] = json!([{ "expression": l }]);
                }
                v
            })
            .collect();
        let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        deps.insert("app", Vec::new());
        for r in self.components.keys() {
            deps.insert(r, Vec::new());
        }
        for (from, to) in &self.dependencies {
            deps.insert(from, to.iter().map(String::as_str).collect());
        }
        json!({
            "bomFormat": "CycloneDX",
            "specVersion": "1.5",
            "serialNumber": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "version": 1,
            "metadata": {
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "tools": { "components": [{ "type": "application", "name": "cd", "version": env!("CARGO_PKG_VERSION") }] },
                "component": { "type": "application", "bom-ref": "app", "name": self.name, "version": self.version },
            },
            "components": components,
            "dependencies": deps.iter().map(|(r, d)| json!({ "ref": r, "dependsOn": d })).collect::<Vec<_>>(),
        })
    }
}

/// The media type SBOMs are stored under.
pub const MEDIA_TYPE: &str = "application/vnd.cyclonedx+json; version=1.5";

/// The [`cd_core::ReleaseDocument`] kind SBOMs are stored under.
pub const DOCUMENT_KIND: &str = "sbom";

/// The components listed in a CycloneDX JSON document (any spec version
/// with `components[].purl`), for the advisory check: the ecosystem comes
/// from the purl type (`cargo` → `crates.io`, `npm`, `pypi` → `PyPI`);
/// components without a purl of those types are left out. Nested
/// components are read too.
pub fn components_from_cyclonedx(doc: &Value) -> Vec<Component> {
    fn walk(list: &Value, out: &mut Vec<Component>) {
        for c in list.as_array().into_iter().flatten() {
            if let (Some(name), Some(version), Some(purl)) = (
                c["name"].as_str(),
                c["version"].as_str(),
                c["purl"].as_str(),
            ) {
                let ecosystem = match purl.split(['/', ':']).nth(1) {
                    Some("cargo") => Some("crates.io"),
                    Some("npm") => Some("npm"),
                    Some("pypi") => Some("PyPI"),
                    _ => None,
                };
                if let Some(e) = ecosystem {
                    // npm scopes are part of the name in the document.
                    let name = match (e, c["group"].as_str()) {
                        ("npm", Some(g)) if !g.is_empty() && !name.starts_with('@') => {
                            format!("{g}/{name}")
                        }
                        _ => name.to_string(),
                    };
                    out.push(Component {
                        ecosystem: e.into(),
                        name,
                        version: version.into(),
                    });
                }
            }
            walk(&c["components"], out);
        }
    }
    let mut out = Vec::new();
    walk(&doc["components"], &mut out);
    out
}

#[derive(Debug, Clone)]
enum SbomSource {
    Cargo(std::path::PathBuf),
    LockFiles(std::path::PathBuf),
}

/// A stage that makes the release's SBOM and stores it with the release
/// version in the run's store (a [`cd_core::ReleaseDocument`] of kind
/// [`DOCUMENT_KIND`]; `cdctl sbom <env> [version]` prints it).
///
/// Output:
///
/// ```json
/// {"components": 312, "bytes": 171204, "sha256": "…", "stored": true,
///  "sbom": { …the CycloneDX 1.5 document… }}
/// ```
///
/// [`super::policy::PolicyGate`] finds the document under `sbom`, and
/// [`super::advisories::AdvisoryCheck::sbom_from`] checks its components.
///
/// Errors: what [`Sbom::from_cargo`] or [`super::components::discover`]
/// return, with the node named. A store that keeps no documents
/// ([`cd_core::ErrorKind::Unsupported`]) is logged as a warning and the
/// output says `"stored": false`.
///
/// ```
/// use cd_stages::compliance::sbom::SbomStage;
/// let sbom = SbomStage::cargo(".").name("shop");
/// let from_locks = SbomStage::lock_files("dist/");
/// # let _ = (sbom, from_locks);
/// ```
#[derive(Debug, Clone)]
pub struct SbomStage {
    source: SbomSource,
    name: Option<String>,
}

impl SbomStage {
    /// The SBOM of the Rust workspace at `dir` ([`Sbom::from_cargo`]).
    pub fn cargo(dir: impl Into<std::path::PathBuf>) -> Self {
        SbomStage {
            source: SbomSource::Cargo(dir.into()),
            name: None,
        }
    }

    /// The SBOM of the lock files found under `dir` (Cargo.lock,
    /// package-lock.json, requirements.txt; [`Sbom::from_components`]).
    pub fn lock_files(dir: impl Into<std::path::PathBuf>) -> Self {
        SbomStage {
            source: SbomSource::LockFiles(dir.into()),
            name: None,
        }
    }

    /// The application's name in the SBOM (default: the pipeline's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

#[async_trait::async_trait]
impl cd_core::Stage for SbomStage {
    fn kind(&self) -> String {
        "sbom".into()
    }

    fn fingerprint(&self) -> String {
        format!("sbom:{:?}:{:?}", self.source, self.name)
    }

    fn capabilities(&self) -> cd_core::Capabilities {
        cd_core::Capabilities::CHECK
    }

    async fn run(&self, cx: &cd_core::StageContext) -> Result<cd_core::StageOutput> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| cx.pipeline().to_string());
        let version = cx.release().version.clone();
        let source = self.source.clone();
        let started = std::time::Instant::now();
        let (v, name2) = (version.clone(), name.clone());
        let sbom = tokio::task::spawn_blocking(move || match &source {
            SbomSource::Cargo(dir) => Sbom::from_cargo(dir, &name2, &v),
            SbomSource::LockFiles(dir) => Ok(Sbom::from_components(
                &name2,
                &v,
                &super::components::discover(dir)?,
            )),
        })
        .await
        .map_err(|e| Error::failed(format!("sbom panicked: {e}")))?
        .map_err(|e| e.with("node", cx.node()))?;
        let doc = sbom.to_json();
        let content = serde_json::to_string_pretty(&doc)?;
        let mut record =
            cd_core::ReleaseDocument::new(&version, DOCUMENT_KIND, MEDIA_TYPE, content);
        record.run_id = Some(cx.run_id().to_string());
        record.environment = Some(cx.environment().to_string());
        let stored = match cx.store().put_release_document(&record).await {
            Ok(()) => true,
            Err(e) if e.kind() == cd_core::ErrorKind::Unsupported => {
                cx.events()
                    .warn(format!("sbom not stored: {}", e.message()));
                false
            }
            Err(e) => return Err(e.with("node", cx.node())),
        };
        let licensed = sbom
            .components
            .values()
            .filter(|c| c.license.is_some())
            .count();
        cx.log(format!(
            "sbom: CycloneDX 1.5 for {name} {version}: {} component(s) ({licensed} with a license), {} bytes, sha256 {}…, {} in {} ms",
            sbom.components.len(),
            record.bytes,
            &record.sha256[..12],
            if stored { "stored with the release" } else { "not stored" },
            started.elapsed().as_millis()
        ));
        Ok(cd_core::StageOutput::json(json!({
            "components": sbom.components.len(),
            "bytes": record.bytes,
            "sha256": record.sha256,
            "stored": stored,
            "sbom": doc,
        })))
    }
}
