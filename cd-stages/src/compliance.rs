//! `ComplianceCheck`: simple built-in rules a release must satisfy.

pub mod advisories;
pub mod components;
#[cfg(feature = "policy")]
pub mod policy;
pub mod sbom;
pub mod secrets;

use std::io::Read;
use std::path::Path;

use async_trait::async_trait;
use cd_core::{Capabilities, Error, Release, Result, Stage, StageContext, StageOutput};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The outcome of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleResult {
    /// The rule (`version-present`, `artifact-checksum`, ...).
    pub rule: String,
    /// Whether it held.
    pub passed: bool,
    /// What was found.
    pub detail: String,
}

/// What a [`ComplianceCheck`] outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceReport {
    /// The release version checked.
    pub version: String,
    /// The artifact's sha256, when there is an artifact that could be read.
    pub artifact_sha256: Option<String>,
    /// Every rule, in order.
    pub rules: Vec<RuleResult>,
    /// How many held.
    pub passed: usize,
    /// How many did not.
    pub failed: usize,
}

/// Built-in compliance rules (richer policy checks come later):
/// - `version-present`: the release has a non-empty version;
/// - `version-pattern` (with [`ComplianceCheck::version_pattern`]): the
///   version matches a simple pattern where `*` is any run of characters and
///   `?` any one character (`v*`, `v?.*`);
/// - `artifact-exists`: when the release has an artifact, the file exists
///   (and with [`ComplianceCheck::require_artifact`], it must have one);
/// - `artifact-checksum`: when the release gives `Artifact::sha256`, the
///   file's sha256 (computed off the async threads) matches it;
/// - `config:<key>` (with [`ComplianceCheck::require_config`]): the release
///   configuration has the key.
///
/// The output lists every rule and whether it held; the stage fails naming
/// each rule that did not.
///
/// ```
/// use std::sync::Arc;
/// use cd_core::{MemoryStore, Release, Stage, StageContext};
/// use cd_stages::ComplianceCheck;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let check = ComplianceCheck::new().version_pattern("v*").require_config(["owner"]);
/// let release = Release::new("v42").config("owner", "payments");
/// let cx = StageContext::detached("compliance", release, Arc::new(MemoryStore::new()));
/// let out = check.run(&cx).await.unwrap();
/// assert_eq!(out.get("failed"), Some(&serde_json::json!(0)));
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct ComplianceCheck {
    version_pattern: Option<String>,
    require_artifact: bool,
    config_keys: Vec<String>,
}

impl ComplianceCheck {
    /// The default rules: version present; artifact exists and matches its
    /// checksum when the release has one.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version must match `pattern` (`*` any run, `?` one character).
    pub fn version_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.version_pattern = Some(pattern.into());
        self
    }

    /// The release must have an artifact.
    pub fn require_artifact(mut self) -> Self {
        self.require_artifact = true;
        self
    }

    /// The release configuration must have these keys.
    pub fn require_config<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config_keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Evaluates every rule against a release, without failing.
    pub async fn evaluate(&self, release: &Release) -> ComplianceReport {
        let mut rules = Vec::new();
        let mut rule = |name: &str, passed: bool, detail: String| {
            rules.push(RuleResult {
                rule: name.to_string(),
                passed,
                detail,
            })
        };
        let version = release.version.trim();
        rule(
            "version-present",
            !version.is_empty(),
            if version.is_empty() {
                "the release has no version".into()
            } else {
                format!("version `{}`", release.version)
            },
        );
        if let Some(pattern) = &self.version_pattern {
            let ok = matches_pattern(pattern, &release.version);
            rule(
                "version-pattern",
                ok,
                format!(
                    "version `{}` {} pattern `{pattern}`",
                    release.version,
                    if ok { "matches" } else { "does not match" }
                ),
            );
        }
        let mut artifact_sha256 = None;
        match &release.artifact {
            None => {
                if self.require_artifact {
                    rule(
                        "artifact-exists",
                        false,
                        "the release has no artifact".into(),
                    );
                }
            }
            Some(artifact) => {
                let path = artifact.path.clone();
                let hashed = tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match hashed {
                    Err(e) => rule(
                        "artifact-exists",
                        false,
                        format!("cannot read artifact {}: {e}", artifact.path.display()),
                    ),
                    Ok((digest, size)) => {
                        rule(
                            "artifact-exists",
                            true,
                            format!("{} ({size} bytes)", artifact.path.display()),
                        );
                        if let Some(expected) = &artifact.sha256 {
                            let ok = expected.trim().eq_ignore_ascii_case(&digest);
                            rule(
                                "artifact-checksum",
                                ok,
                                if ok {
                                    format!("sha256 {digest} matches")
                                } else {
                                    format!(
                                        "sha256 of {} is {digest}, expected {}",
                                        artifact.path.display(),
                                        expected.trim()
                                    )
                                },
                            );
                        }
                        artifact_sha256 = Some(digest);
                    }
                }
            }
        }
        for key in &self.config_keys {
            let ok = release.config.contains_key(key);
            rule(
                &format!("config:{key}"),
                ok,
                if ok {
                    format!("config `{key}` is set")
                } else {
                    format!("config `{key}` is missing")
                },
            );
        }
        let failed = rules.iter().filter(|r| !r.passed).count();
        ComplianceReport {
            version: release.version.clone(),
            artifact_sha256,
            passed: rules.len() - failed,
            failed,
            rules,
        }
    }
}

/// The sha256 (lowercase hex) and size of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Glob-like match: `*` any run of characters, `?` exactly one.
pub fn matches_pattern(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[async_trait]
impl Stage for ComplianceCheck {
    fn kind(&self) -> String {
        "compliance".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let report = self.evaluate(cx.release()).await;
        for r in &report.rules {
            let mark = if r.passed { "pass" } else { "FAIL" };
            cx.log(format!("{mark} {}: {}", r.rule, r.detail));
        }
        if report.failed == 0 {
            return StageOutput::from_serialize(&report);
        }
        let failures: Vec<String> = report
            .rules
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{}: {}", r.rule, r.detail))
            .collect();
        Err(Error::failed(format!(
            "release {} fails {} compliance rule(s): {}",
            report.version,
            report.failed,
            failures.join("; ")
        ))
        .with("node", cx.node()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cd_core::{ErrorKind, MemoryStore};

    use super::*;

    fn cx(release: Release) -> StageContext {
        StageContext::detached("compliance", release, Arc::new(MemoryStore::new()))
    }

    #[test]
    fn patterns() {
        assert!(matches_pattern("v*", "v42"));
        assert!(matches_pattern("v*", "v"));
        assert!(!matches_pattern("v*", "42"));
        assert!(matches_pattern("v?.*", "v1.2.3"));
        assert!(!matches_pattern("v?.*", "v12.3"));
        assert!(matches_pattern("*-rc*", "v2-rc1"));
        assert!(matches_pattern("*", ""));
        assert!(!matches_pattern("", "x"));
        assert!(matches_pattern("a*b*c", "axxbyyc"));
        assert!(!matches_pattern("a*b*c", "axxbyy"));
    }

    #[tokio::test]
    async fn artifact_checksum_is_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.tar.gz");
        std::fs::write(&path, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

        let out = ComplianceCheck::new()
            .run(&cx(
                Release::new("v1").artifact_with_sha256(&path, good.to_uppercase())
            ))
            .await
            .unwrap();
        let report: ComplianceReport = out.parse().unwrap();
        assert_eq!(report.artifact_sha256.as_deref(), Some(good));
        let names: Vec<&str> = report.rules.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(
            names,
            ["version-present", "artifact-exists", "artifact-checksum"]
        );
        assert_eq!((report.passed, report.failed), (3, 0));

        let err = ComplianceCheck::new()
            .run(&cx(Release::new("v1").artifact_with_sha256(&path, "00ff")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Failed);
        assert!(
            err.to_string().contains(&format!(
                "artifact-checksum: sha256 of {} is {good}, expected 00ff",
                path.display()
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_artifact_version_and_config_fail() {
        let err = ComplianceCheck::new()
            .version_pattern("v*")
            .require_config(["owner", "ticket"])
            .run(&cx(Release::new("42")
                .artifact("/nonexistent/app")
                .config("owner", "me")))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fails 3 compliance rule(s)"), "{msg}");
        assert!(
            msg.contains("version `42` does not match pattern `v*`"),
            "{msg}"
        );
        assert!(
            msg.contains("cannot read artifact /nonexistent/app"),
            "{msg}"
        );
        assert!(msg.contains("config `ticket` is missing"), "{msg}");

        let err = ComplianceCheck::new()
            .require_artifact()
            .run(&cx(Release::new(" ")))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("version-present: the release has no version"),
            "{msg}"
        );
        assert!(
            msg.contains("artifact-exists: the release has no artifact"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_plain_release_passes_the_defaults() {
        let out = ComplianceCheck::new()
            .run(&cx(Release::new("v1")))
            .await
            .unwrap();
        assert_eq!(out.get("passed"), Some(&serde_json::json!(1)));
    }
}
