//! Policy as code: Rego policies (OPA's language, v1 syntax: `deny contains
//! msg if { … }`) evaluated in process by the regorus interpreter over one
//! input document the pipeline assembles.
//!
//! A policy module's `deny` rules fail the gate, each message a reason;
//! its `warn` rules are reported. The conventions are conftest's: a rule
//! produces a set of messages, each a string or an object with `msg` (the
//! other fields are kept as `details`). Every package loaded is evaluated.
//!
//! The input document ([`PolicyGate`] assembles it; [`Policy::evaluate`]
//! takes any JSON):
//!
//! | field | what | from |
//! |---|---|---|
//! | `run` | `{id, pipeline, node, attempt}` | the run |
//! | `environment` | the environment deployed to (`"production"`) | the run |
//! | `release` | `{version, artifact: {path, sha256}, config}`; secrets never | the release |
//! | `images` | container images the release deploys (strings) | release config `image` / `images`, [`PolicyGate::image`] |
//! | `approvals` | `[{node, approver, decision, comment, at}]`, decisions so far in this run | the store |
//! | `terraform_plan` | the typed plan: `resource_changes[]` with `address`, `type`, `action`, `actions`, `before`, `after` | a Terraform plan node's `terraform_plan` output |
//! | `sbom` | the CycloneDX 1.5 document | an [`super::sbom::SbomStage`] node |
//! | `secrets` | `{files, bytes, findings: [{file, line, rule, fingerprint, redacted}], skipped}` | a [`super::secrets::SecretScan`] node |
//! | `advisories` | `{components, failing, below_threshold, ignored, expired_ignores}` | an [`super::advisories::AdvisoryCheck`] node |
//! | `outputs` | every upstream node's output, by node | the run |
//!
//! Sections with no source are `null`. Shipped example policies are in the
//! repository's `policies/` directory.
//!
//! Errors: a syntax or type error in a policy is
//! [`cd_core::ErrorKind::Invalid`] with context `file`, `line` and `column`
//! (and the message regorus gives, with the offending line); an error while
//! evaluating (a builtin given the wrong type, a conflict between rule
//! values) is [`cd_core::ErrorKind::Failed`] naming the package and, where
//! regorus gives one, the location.
//!
//! ```
//! use cd_stages::compliance::policy::Policy;
//! let policy = Policy::new()
//!     .source("images.rego", r#"
//!         package cd.images
//!         deny contains msg if {
//!             some image in input.images
//!             not contains(image, "@sha256:")
//!             msg := sprintf("image %s is not pinned by digest", [image])
//!         }
//!     "#)
//!     .unwrap();
//! let decision = policy.evaluate(&serde_json::json!({"images": ["nginx:1.27"]})).unwrap();
//! assert!(!decision.allowed);
//! assert_eq!(decision.deny[0].package, "cd.images");
//! assert_eq!(decision.deny[0].message, "image nginx:1.27 is not pinned by digest");
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use cd_core::{
    Capabilities, Error, EventKind, Gate, Result, Stage, StageContext, StageOutput, Verdict,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The event each evaluation emits, with the [`PolicyDecision`] as data.
pub const DECISION_EVENT: &str = "policy_decision";

/// A set of Rego modules and data documents, parsed and ready to evaluate.
/// Cloning is cheap (the interpreter shares parsed modules).
#[derive(Clone)]
pub struct Policy {
    engine: regorus::Engine,
    modules: Vec<Module>,
}

#[derive(Debug, Clone)]
struct Module {
    file: String,
    package: String,
    sha256: String,
    deny: bool,
    warn: bool,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field(
                "modules",
                &self
                    .modules
                    .iter()
                    .map(|m| format!("{} ({})", m.file, m.package))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

/// One message a `deny` or `warn` rule produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMessage {
    /// The package whose rule fired (`cd.terraform`).
    pub package: String,
    /// The rule: `deny` or `warn`.
    pub rule: String,
    /// The file(s) declaring the package.
    pub files: Vec<String>,
    /// The message.
    pub message: String,
    /// The other fields of an object message (`{"msg": …, "resource": …}`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

/// What a policy decided about one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// No `deny` message.
    pub allowed: bool,
    /// Every `deny` message, by package then message.
    pub deny: Vec<PolicyMessage>,
    /// Every `warn` message, by package then message.
    pub warn: Vec<PolicyMessage>,
    /// The packages evaluated.
    pub packages: Vec<String>,
    /// Time spent evaluating, in milliseconds.
    pub eval_ms: f64,
}

impl PolicyDecision {
    /// The deny messages as one reason: `cd.terraform: …; cd.images: …`.
    pub fn reasons(&self) -> String {
        self.deny
            .iter()
            .map(|m| format!("{}: {}", m.package, m.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Reads `--> file:line:col` and the last `kind: message` line of a
/// regorus error.
fn located(text: &str, fallback_file: &str) -> Error {
    let mut e = Error::invalid(format!("policy {fallback_file}: {}", summary(text)));
    match location(text) {
        Some((file, line, col)) => {
            e = Error::invalid(format!(
                "policy {file}:{line}:{col}: {}\n{}",
                summary(text),
                text.trim()
            ))
            .with("file", file)
            .with("line", line)
            .with("column", col);
        }
        None => e = e.with("file", fallback_file),
    }
    e.retryable(false)
}

fn io_err(e: std::io::Error, what: &str, path: &Path) -> Error {
    let kind = Error::from(e);
    Error::new(
        kind.kind(),
        format!("{what} {}: {}", path.display(), kind.message()),
    )
    .with("file", path.display())
}

fn location(text: &str) -> Option<(String, u32, u32)> {
    let at = text.find("--> ")?;
    let rest = text[at + 4..].lines().next()?.trim();
    let mut parts = rest.rsplitn(3, ':');
    let col = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    let file = parts.next()?.to_string();
    Some((file, line, col))
}

fn summary(text: &str) -> String {
    text.trim().lines().last().unwrap_or("").trim().to_string()
}

impl Policy {
    /// No module, no data.
    pub fn new() -> Self {
        Policy {
            engine: regorus::Engine::new(),
            modules: Vec::new(),
        }
    }

    /// Adds a module from text; `name` is the file name errors give.
    ///
    /// Errors: [`cd_core::ErrorKind::Invalid`] for a syntax error (with
    /// `file`, `line`, `column`), or a module name already loaded.
    pub fn source(mut self, name: impl Into<String>, rego: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if self.modules.iter().any(|m| m.file == name) {
            return Err(Error::invalid(format!(
                "policy {name}: a module of this name is already loaded"
            ))
            .with("file", &name));
        }
        let rego = rego.into();
        let sha256 = {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(rego.as_bytes()))
        };
        let package = self
            .engine
            .add_policy(name.clone(), rego)
            .map_err(|e| located(&e.to_string(), &name))?;
        let package = package
            .strip_prefix("data.")
            .unwrap_or(&package)
            .to_string();
        let has = |rule: &str| {
            self.engine
                .has_declared_rule_rooted_at(&name, rule)
                .unwrap_or(false)
        };
        let (deny, warn) = (has("deny"), has("warn"));
        self.modules.push(Module {
            file: name,
            package,
            sha256,
            deny,
            warn,
        });
        Ok(self)
    }

    /// Adds a module from a file.
    ///
    /// Errors: [`cd_core::ErrorKind::NotFound`] or [`cd_core::ErrorKind::Invalid`]
    /// naming the file when it cannot be read; as [`Policy::source`].
    pub fn file(self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| io_err(e, "policy", path))?;
        self.source(path.display().to_string(), text)
    }

    /// Adds every `*.rego` file in `dir` (not recursive, in name order),
    /// except tests (`*_test.rego`).
    ///
    /// Errors: as [`Policy::file`]; [`cd_core::ErrorKind::Invalid`] when the
    /// directory holds no policy.
    pub fn dir(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_err(e, "policy directory", dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".rego") && !name.ends_with("_test.rego")
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::invalid(format!(
                "policy directory {} holds no .rego file",
                dir.display()
            ))
            .with("file", dir.display()));
        }
        for f in files {
            self = self.file(f)?;
        }
        Ok(self)
    }

    /// Adds a data document (merged with those added before; available
    /// to policies as `data.…`).
    ///
    /// Errors: [`cd_core::ErrorKind::Invalid`] when it is not an object or
    /// conflicts with data already added.
    pub fn data(mut self, data: Value) -> Result<Self> {
        let text = serde_json::to_string(&data)?;
        self.engine
            .add_data_json(&text)
            .map_err(|e| Error::invalid(format!("policy data: {e}")))?;
        Ok(self)
    }

    /// Adds a data document from a JSON file.
    pub fn data_file(self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| io_err(e, "policy data", path))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(format!("policy data {}: {e}", path.display()))
                .with("file", path.display())
                .with("line", e.line())
                .with("column", e.column())
        })?;
        self.data(v)
    }

    /// The packages loaded, in load order, without repeats.
    pub fn packages(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.modules {
            if !out.contains(&m.package) {
                out.push(m.package.clone());
            }
        }
        out
    }

    /// Evaluates every package's `deny` and `warn` rules over `input`.
    ///
    /// Errors: [`cd_core::ErrorKind::Invalid`] when no module is loaded;
    /// [`cd_core::ErrorKind::Failed`] for an evaluation error (package and
    /// location named).
    pub fn evaluate(&self, input: &Value) -> Result<PolicyDecision> {
        if self.modules.is_empty() {
            return Err(Error::invalid("policy: no module loaded"));
        }
        let started = Instant::now();
        let mut engine = self.engine.clone();
        engine
            .set_input_json(&serde_json::to_string(input)?)
            .map_err(|e| Error::invalid(format!("policy input: {e}")))?;
        // package -> (files, has deny, has warn)
        let mut packages: BTreeMap<&str, (Vec<String>, bool, bool)> = BTreeMap::new();
        for m in &self.modules {
            let p = packages.entry(&m.package).or_default();
            p.0.push(m.file.clone());
            p.1 |= m.deny;
            p.2 |= m.warn;
        }
        let mut decision = PolicyDecision {
            allowed: true,
            deny: Vec::new(),
            warn: Vec::new(),
            packages: packages.keys().map(|p| p.to_string()).collect(),
            eval_ms: 0.0,
        };
        for (package, (files, deny, warn)) in &packages {
            for (rule, declared) in [("deny", *deny), ("warn", *warn)] {
                if !declared {
                    continue;
                }
                let value = engine
                    .eval_rule(format!("data.{package}.{rule}"))
                    .map_err(|e| {
                        let text = e.to_string();
                        let mut err =
                            Error::failed(format!("policy {package}.{rule}: {}", text.trim()))
                                .with("package", package);
                        if let Some((file, line, col)) = location(&text) {
                            err = err
                                .with("file", file)
                                .with("line", line)
                                .with("column", col);
                        }
                        err.retryable(false)
                    })?;
                if value == regorus::Value::Undefined {
                    continue;
                }
                let value: Value = serde_json::to_value(&value).unwrap_or(Value::Null);
                let items: Vec<Value> = match value {
                    Value::Array(a) => a,
                    Value::Null => Vec::new(),
                    other => vec![other],
                };
                for item in items {
                    let (message, details) = match item {
                        Value::String(s) => (s, Value::Null),
                        Value::Object(mut o) => {
                            let msg = o
                                .remove("msg")
                                .map(|m| m.as_str().map(str::to_string).unwrap_or(m.to_string()))
                                .unwrap_or_else(|| Value::Object(o.clone()).to_string());
                            (msg, Value::Object(o))
                        }
                        other => (other.to_string(), Value::Null),
                    };
                    let m = PolicyMessage {
                        package: package.to_string(),
                        rule: rule.into(),
                        files: files.clone(),
                        message,
                        details,
                    };
                    if rule == "deny" {
                        decision.deny.push(m);
                    } else {
                        decision.warn.push(m);
                    }
                }
            }
        }
        decision.allowed = decision.deny.is_empty();
        decision.eval_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(decision)
    }
}

/// Where one section of the input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum From {
    /// The one upstream output that has it (an error if several do).
    Auto,
    /// This node's output.
    Node(String),
}

/// A gate (and a stage) that assembles the input document from the run
/// (see the [module docs](self)) and evaluates a [`Policy`] over it.
///
/// As a [`Gate`] it passes when no `deny` rule fires and fails with the
/// deny messages as reasons. As a [`Stage`] it outputs the
/// [`PolicyDecision`] (and the stage fails the same way). Either way the
/// decision is a `policy_decision` event and each message a log line;
/// warnings never fail.
///
/// Sections are found in upstream outputs by their shape (a
/// `terraform_plan` key; a CycloneDX document under `sbom`; a secret scan
/// `report`; an advisory report). When two upstream nodes output the same
/// section, name the one to use ([`PolicyGate::plan_from`], …).
///
/// ```
/// use cd_stages::compliance::policy::{Policy, PolicyGate};
/// let policy = Policy::new().source("p.rego", "package cd.x\ndeny contains \"no\" if input.environment == \"prod\"").unwrap();
/// let gate = PolicyGate::new(policy).plan_from("plan").image("registry.example/shop@sha256:0123");
/// # let _ = gate;
/// ```
#[derive(Debug, Clone)]
pub struct PolicyGate {
    policy: Policy,
    plan: From,
    sbom: From,
    secrets: From,
    advisories: From,
    images: Vec<String>,
}

impl PolicyGate {
    /// A gate evaluating `policy`.
    pub fn new(policy: Policy) -> Self {
        PolicyGate {
            policy,
            plan: From::Auto,
            sbom: From::Auto,
            secrets: From::Auto,
            advisories: From::Auto,
            images: Vec::new(),
        }
    }

    /// `terraform_plan` from this node's output.
    pub fn plan_from(mut self, node: impl Into<String>) -> Self {
        self.plan = From::Node(node.into());
        self
    }

    /// `sbom` from this node's output.
    pub fn sbom_from(mut self, node: impl Into<String>) -> Self {
        self.sbom = From::Node(node.into());
        self
    }

    /// `secrets` from this node's output.
    pub fn secrets_from(mut self, node: impl Into<String>) -> Self {
        self.secrets = From::Node(node.into());
        self
    }

    /// `advisories` from this node's output.
    pub fn advisories_from(mut self, node: impl Into<String>) -> Self {
        self.advisories = From::Node(node.into());
        self
    }

    /// Adds a container image to `images`.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.images.push(image.into());
        self
    }

    /// The input document for this run (see the [module docs](self)).
    ///
    /// Errors: [`cd_core::ErrorKind::Invalid`] naming the node when a named
    /// node did not output the section, or naming both nodes when two
    /// output it and none is named; store errors reading approvals.
    pub async fn input(&self, cx: &StageContext) -> Result<Value> {
        let outputs = cx.outputs();
        let pick = |from: &From, section: &str, get: &dyn Fn(&Value) -> Option<Value>| {
            pick(&outputs, from, section, get).map_err(|e| e.with("node", cx.node()))
        };
        let plan = pick(&self.plan, "terraform_plan", &|v| {
            v.get("terraform_plan").filter(|p| p.is_object()).cloned()
        })?;
        let sbom = pick(&self.sbom, "sbom", &|v| {
            v.get("sbom")
                .filter(|d| d["bomFormat"] == "CycloneDX")
                .cloned()
        })?;
        let secrets = pick(&self.secrets, "secrets", &|v| {
            v.get("report")
                .filter(|r| r.get("findings").is_some_and(Value::is_array))
                .cloned()
        })?;
        let advisories = pick(&self.advisories, "advisories", &|v| {
            (v.get("failing").is_some_and(Value::is_array) && v.get("below_threshold").is_some())
                .then(|| v.clone())
        })?;

        let release = cx.release();
        let mut images = self.images.clone();
        match release.config.get("image") {
            Some(Value::String(s)) => images.push(s.clone()),
            Some(other) if !other.is_null() => images.push(other.to_string()),
            _ => {}
        }
        if let Some(Value::Array(list)) = release.config.get("images") {
            images.extend(list.iter().map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }));
        }

        let mut approvals = Vec::new();
        if !cx.run_id().is_empty() {
            for node in cx.store().nodes(cx.run_id()).await? {
                for a in cx.store().approvals(cx.run_id(), &node.node).await? {
                    approvals.push(json!({
                        "node": a.node,
                        "approver": a.approver,
                        "decision": a.decision,
                        "comment": a.comment,
                        "at": a.at,
                    }));
                }
            }
        }

        Ok(json!({
            "run": {
                "id": cx.run_id(),
                "pipeline": cx.pipeline(),
                "node": cx.node(),
                "attempt": cx.attempt(),
            },
            "environment": cx.environment(),
            "release": {
                "version": release.version,
                "artifact": release.artifact.as_ref().map(|a| json!({
                    "path": a.path,
                    "sha256": a.sha256,
                })),
                "config": release.config,
            },
            "images": images,
            "approvals": approvals,
            "terraform_plan": plan,
            "sbom": sbom,
            "secrets": secrets,
            "advisories": advisories,
            "outputs": outputs.iter().map(|(k, v)| (k.clone(), v.value().clone())).collect::<BTreeMap<_, _>>(),
        }))
    }

    async fn decide(&self, cx: &StageContext) -> Result<PolicyDecision> {
        let input = self.input(cx).await?;
        let policy = self.policy.clone();
        let decision = tokio::task::spawn_blocking(move || policy.evaluate(&input))
            .await
            .map_err(|e| Error::failed(format!("policy evaluation panicked: {e}")))?
            .map_err(|e| e.with("node", cx.node()))?;
        if let Ok(data) = serde_json::to_value(&decision) {
            cx.events().emit(EventKind::Custom {
                name: DECISION_EVENT.into(),
                data,
            });
        }
        cx.log(format!(
            "policy: {} package(s) in {:.2} ms: {} deny, {} warn → {}",
            decision.packages.len(),
            decision.eval_ms,
            decision.deny.len(),
            decision.warn.len(),
            if decision.allowed {
                "allowed"
            } else {
                "denied"
            }
        ));
        for m in &decision.deny {
            cx.log(format!("  deny  {}: {}", m.package, m.message));
        }
        for m in &decision.warn {
            cx.events()
                .warn(format!("  warn  {}: {}", m.package, m.message));
        }
        Ok(decision)
    }

    fn fingerprint_text(&self) -> String {
        format!(
            "policy:{:?}:{:?}:{:?}:{:?}:{:?}:{:?}",
            self.policy
                .modules
                .iter()
                .map(|m| (&m.file, &m.package, &m.sha256))
                .collect::<Vec<_>>(),
            self.plan,
            self.sbom,
            self.secrets,
            self.advisories,
            self.images
        )
    }
}

fn pick(
    outputs: &BTreeMap<String, StageOutput>,
    from: &From,
    section: &str,
    get: &dyn Fn(&Value) -> Option<Value>,
) -> Result<Value> {
    match from {
        From::Node(node) => {
            let out = outputs.get(node).ok_or_else(|| {
                Error::invalid(format!(
                    "policy input `{section}`: node `{node}` has no output (is it upstream of the gate?)"
                ))
            })?;
            get(out.value()).ok_or_else(|| {
                Error::invalid(format!(
                    "policy input `{section}`: node `{node}`'s output has no {section}"
                ))
            })
        }
        From::Auto => {
            let found: Vec<(&String, Value)> = outputs
                .iter()
                .filter_map(|(n, o)| get(o.value()).map(|v| (n, v)))
                .collect();
            match found.len() {
                0 => Ok(Value::Null),
                1 => Ok(found.into_iter().next().map(|(_, v)| v).unwrap_or_default()),
                _ => Err(Error::invalid(format!(
                    "policy input `{section}`: nodes {} all output one; name the one to use (PolicyGate::{}_from)",
                    found.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                    match section {
                        "terraform_plan" => "plan",
                        s => s,
                    }
                ))),
            }
        }
    }
}

#[async_trait]
impl Gate for PolicyGate {
    fn kind(&self) -> String {
        "policy".into()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint_text()
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        let d = self.decide(cx).await?;
        Ok(if d.allowed {
            Verdict::Pass
        } else {
            Verdict::fail(format!("policy denied: {}", d.reasons()))
        })
    }
}

#[async_trait]
impl Stage for PolicyGate {
    fn kind(&self) -> String {
        "policy".into()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint_text()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let d = self.decide(cx).await?;
        if d.allowed {
            return StageOutput::from_serialize(&d);
        }
        Err(Error::failed(format!("policy denied: {}", d.reasons()))
            .with("node", cx.node())
            .retryable(false))
    }
}
