//! The values a delivery speaks: releases, targets, revisions and plans.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What is being delivered: a version, an optional artifact, configuration
/// and secret values.
///
/// Configuration is durable: it is kept in the store with the run and the
/// release history. Secret values ([`Release::secret`]) reach the deployers
/// (Terraform as `TF_VAR_*` environment variables, Ansible as extra vars from
/// an owner-only file removed after the run) but nothing durable holds them:
/// the store keeps only their names, `Debug` prints `***`, and the runner
/// scrubs their text from events, errors, outputs and the report.
///
/// ```
/// use cd_core::{Release, Secret};
/// let r = Release::new("v42")
///     .artifact("target/app.tar.gz")
///     .config("replicas", 3)
///     .secret("db_password", Secret::new("hunter2".to_string()));
/// assert_eq!(r.version, "v42");
/// assert_eq!(r.config["replicas"], 3);
/// assert_eq!(r.secrets.get("db_password").unwrap(), "hunter2");
/// // What is stored: the names of the secrets, never their values.
/// let stored = serde_json::to_string(&r).unwrap();
/// assert!(stored.contains("db_password") && !stored.contains("hunter2"));
/// assert!(!format!("{r:?}").contains("hunter2"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The version label, unique per environment history (`v42`, a git sha).
    pub version: String,
    /// The file that is deployed, if the release has one.
    pub artifact: Option<Artifact>,
    /// Free-form configuration passed to deployers (Terraform variables,
    /// Ansible extra vars, environment variables, ...).
    pub config: BTreeMap<String, serde_json::Value>,
    /// Sensitive values passed to deployers like configuration, never stored.
    #[serde(default, skip_serializing_if = "ReleaseSecrets::is_empty")]
    pub secrets: ReleaseSecrets,
}

impl Release {
    /// A release with a version and nothing else.
    pub fn new(version: impl Into<String>) -> Self {
        Release {
            version: version.into(),
            artifact: None,
            config: BTreeMap::new(),
            secrets: ReleaseSecrets::default(),
        }
    }

    /// Adds a secret value: passed to deployers under `key` like a
    /// configuration value, never stored (see [`ReleaseSecrets`]).
    pub fn secret(mut self, key: impl Into<String>, value: crate::Secret<String>) -> Self {
        self.secrets
            .insert(key.into(), serde_json::Value::String(value.into_inner()));
        self
    }

    /// The configuration and the secret values together, as deployers pass
    /// them on (a secret wins over a configuration value of the same key).
    /// Secrets whose values are missing (a release read back from the store)
    /// are left out: see [`ReleaseSecrets::missing`].
    pub fn values(&self) -> BTreeMap<String, serde_json::Value> {
        let mut all = self.config.clone();
        for (k, v) in self.secrets.iter() {
            all.insert(k.to_string(), v.clone());
        }
        all
    }

    /// Moves every configuration value that holds a secret `redactor` knows
    /// (in a string or a key, in any encoding it scrubs) into
    /// [`Release::secrets`], so the stored release never holds it. The runner
    /// seals every release before it stores the run; deployers see the same
    /// values through [`Release::values`]. Returns the keys moved.
    pub fn seal(&mut self, redactor: &crate::Redactor) -> Vec<String> {
        if redactor.is_empty() {
            return Vec::new();
        }
        let moved: Vec<String> = self
            .config
            .iter()
            .filter(|(k, v)| redactor.finds(k) || redactor.finds_in_json(v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &moved {
            if let Some(v) = self.config.remove(k) {
                self.secrets.insert(k.clone(), v);
            }
        }
        moved
    }

    /// Sets the artifact file.
    pub fn artifact(mut self, path: impl Into<PathBuf>) -> Self {
        self.artifact = Some(Artifact {
            path: path.into(),
            sha256: None,
        });
        self
    }

    /// Sets the artifact with its expected sha256 (hex).
    pub fn artifact_with_sha256(
        mut self,
        path: impl Into<PathBuf>,
        sha256: impl Into<String>,
    ) -> Self {
        self.artifact = Some(Artifact {
            path: path.into(),
            sha256: Some(sha256.into()),
        });
        self
    }

    /// Adds a configuration value.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.version)
    }
}

/// The secret values of a [`Release`], by key.
///
/// Serialized as the sorted list of keys only (`["db_password"]`): a release
/// read back from the store knows which secrets it had but not their values
/// ([`ReleaseSecrets::missing`]); resuming such a run needs the release again
/// (`Runner::resume_with_release`). `Debug` prints `***` for every value.
#[derive(Clone, Default, PartialEq)]
pub struct ReleaseSecrets(BTreeMap<String, Option<crate::Secret<serde_json::Value>>>);

impl ReleaseSecrets {
    /// Whether the release has no secret (present or missing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets a secret value.
    pub fn insert(&mut self, key: String, value: serde_json::Value) {
        self.0.insert(key, Some(crate::Secret::new(value)));
    }

    /// A secret value; `None` when unknown or missing.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)?.as_ref().map(|s| s.expose())
    }

    /// Every secret's key, present or missing.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The secrets whose values are known, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &serde_json::Value)> {
        self.0
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.as_str(), v.expose())))
    }

    /// The keys whose values are not known (the release was read back from
    /// the store, which keeps names only).
    pub fn missing(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Registers every string inside every known value with `redactor`.
    pub fn register(&self, redactor: &crate::Redactor) {
        fn walk(r: &crate::Redactor, v: &serde_json::Value) {
            match v {
                serde_json::Value::String(s) => r.register(s.clone()),
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(r, x)),
                serde_json::Value::Object(o) => o.values().for_each(|x| walk(r, x)),
                _ => {}
            }
        }
        for (_, v) in self.iter() {
            walk(redactor, v);
        }
    }
}

impl fmt::Debug for ReleaseSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if v.is_some() { "***" } else { "(missing)" })),
            )
            .finish()
    }
}

impl Serialize for ReleaseSecrets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.keys())
    }
}

impl<'de> Deserialize<'de> for ReleaseSecrets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let keys = Vec::<String>::deserialize(d)?;
        Ok(ReleaseSecrets(
            keys.into_iter().map(|k| (k, None)).collect(),
        ))
    }
}

/// A file that a release delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Where the file is on the machine running the pipeline.
    pub path: PathBuf,
    /// Its expected sha256, lowercase hex, when known in advance.
    pub sha256: Option<String>,
}

/// Where a release goes: a host, a slot, a workspace, a container group.
///
/// ```
/// use cd_core::Target;
/// let t = Target::new("web1").address("127.0.0.2:22").label("role", "web");
/// assert_eq!(t.label_value("role"), Some("web"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    /// A unique, human-readable name (`web1`, `blue`, `staging`).
    pub name: String,
    /// How to reach it (`host:port`, a URL, a directory), if it needs one.
    pub address: Option<String>,
    /// Labels: groups, slots, roles.
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// A target with a name.
    pub fn new(name: impl Into<String>) -> Self {
        Target {
            name: name.into(),
            address: None,
            labels: BTreeMap::new(),
        }
    }

    /// Sets the address.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// A label's value.
    pub fn label_value(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What is live on a target after a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The target's name.
    pub target: String,
    /// The release version that is live.
    pub version: String,
    /// A backend-specific identifier (a release directory, a pid, a state
    /// serial, a container id).
    pub id: String,
    /// When it went live, if known.
    pub deployed_at: Option<DateTime<Utc>>,
    /// Backend-specific details (outputs, ports, checksums).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Revision {
    /// A revision of `version` on `target` with a backend id.
    pub fn new(
        target: impl Into<String>,
        version: impl Into<String>,
        id: impl Into<String>,
    ) -> Self {
        Revision {
            target: target.into(),
            version: version.into(),
            id: id.into(),
            deployed_at: Some(Utc::now()),
            detail: serde_json::Value::Null,
        }
    }

    /// Attaches details.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// What a change does to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    /// Nothing changes.
    NoOp,
    /// The resource is created.
    Create,
    /// The resource is changed in place.
    Update,
    /// The resource is destroyed and created again.
    Replace,
    /// The resource is destroyed.
    Delete,
    /// The resource is read (data source).
    Read,
}

impl fmt::Display for ChangeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeAction::NoOp => "no-op",
            ChangeAction::Create => "create",
            ChangeAction::Update => "update",
            ChangeAction::Replace => "replace",
            ChangeAction::Delete => "delete",
            ChangeAction::Read => "read",
        })
    }
}

/// One planned change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// What happens.
    pub action: ChangeAction,
    /// What it happens to (a resource address, a file, `current`).
    pub address: String,
    /// Backend-specific details (before/after values).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Change {
    /// A change of `action` to `address`.
    pub fn new(action: ChangeAction, address: impl Into<String>) -> Self {
        Change {
            action,
            address: address.into(),
            detail: serde_json::Value::Null,
        }
    }
}

/// What a deployer would do to put a release on a target. Planning never
/// changes anything; [`crate::Deployer::apply`] carries the plan out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The release to deploy.
    pub release: Release,
    /// Where.
    pub target: Target,
    /// What is live there now.
    pub current: Option<Revision>,
    /// The changes, in order.
    pub changes: Vec<Change>,
    /// Backend-specific data `apply` needs (a saved plan file, checksums).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Plan {
    /// A plan with no changes yet.
    pub fn new(release: Release, target: Target, current: Option<Revision>) -> Self {
        Plan {
            release,
            target,
            current,
            changes: Vec::new(),
            detail: serde_json::Value::Null,
        }
    }

    /// Adds a change.
    pub fn change(mut self, change: Change) -> Self {
        self.changes.push(change);
        self
    }

    /// Whether applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.changes.iter().all(|c| c.action == ChangeAction::NoOp)
    }
}

/// Longest environment name accepted, in bytes.
pub const MAX_ENVIRONMENT_LEN: usize = 128;

/// Characters that render as nothing, so that two names that look the same
/// differ: zero-width spaces and joiners, directional marks, word joiners,
/// the byte-order mark, the soft hyphen.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

/// Checks an environment name at the API boundary (runner, deploy stage,
/// restore, locks): not empty, at most [`MAX_ENVIRONMENT_LEN`] bytes, no
/// leading or trailing whitespace, no control characters. `production` and
/// `production ` would otherwise be two environments that deploy at once.
///
/// Returns [`crate::ErrorKind::Invalid`] naming the environment (quoted, with
/// escapes) and what is wrong.
///
/// ```
/// use cd_core::types::validate_environment;
/// assert!(validate_environment("production").is_ok());
/// assert!(validate_environment("eu-west/prod").is_ok());
/// assert!(validate_environment("production ").is_err());
/// assert!(validate_environment("").is_err());
/// assert!(validate_environment("prod\n").is_err());
/// assert!(validate_environment("production\u{200B}").is_err());
/// ```
pub fn validate_environment(name: &str) -> crate::Result<()> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_ENVIRONMENT_LEN {
        Some("is longer than 128 bytes")
    } else if name.trim() != name {
        Some("has leading or trailing whitespace")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.chars().any(is_invisible) {
        Some("contains an invisible character (zero-width space, joiner, byte-order mark, soft hyphen)")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => {
            let shown: String = name.chars().take(64).collect();
            Err(
                crate::Error::invalid(format!("environment name {shown:?} {p}"))
                    .with("environment", shown.escape_debug().to_string()),
            )
        }
    }
}

/// Longest release version accepted, in bytes.
pub const MAX_VERSION_LEN: usize = 128;

/// The one rule every deployer applies to a release version (it becomes a
/// directory name on hosts, a Terraform variable, an Ansible variable, a
/// history key): 1 to [`MAX_VERSION_LEN`] bytes of ASCII letters, digits,
/// `.`, `_`, `+`, `-`, not starting with `.` (so no `..`, no `/`, no
/// spaces, no quotes, no `{{ }}`, no control characters). Semver with build
/// metadata (`1.4.0+build.7`) and git hashes pass.
///
/// Returns [`crate::ErrorKind::Invalid`] naming the version (escaped,
/// shortened to 64 characters) and the rule.
///
/// ```
/// use cd_core::types::validate_version;
/// assert!(validate_version("v1.2.3+build-4_x").is_ok());
/// for bad in ["", ".hidden", "../../etc", "a b", "{{ x }}", "v1\n", "a/b"] {
///     assert!(validate_version(bad).is_err(), "{bad:?}");
/// }
/// assert!(validate_version(&"x".repeat(5000)).is_err());
/// ```
pub fn validate_version(version: &str) -> crate::Result<()> {
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION_LEN
        && !version.starts_with('.')
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        return Ok(());
    }
    let shown: String = version.chars().take(64).collect();
    Err(crate::Error::invalid(format!(
        "release version {shown:?} is not valid: 1 to {MAX_VERSION_LEN} letters, digits, `.`, `_`, `+`, `-`, not starting with `.`"
    ))
    .with("version", shown.escape_debug().to_string()))
}
