//! Terraform-managed infrastructure as a [`Deployer`]: the terraform CLI
//! (or OpenTofu's `tofu`) planned, checked, applied and rolled back like any
//! release.
//!
//! - **init**: `terraform init -input=false`, once per deployer, honouring
//!   the user's CLI configuration (`TF_CLI_CONFIG_FILE`, or
//!   [`TerraformDeployer::cli_config`]).
//! - **workspaces**: a [`Target`] is a workspace (its `workspace` label, or
//!   its name); one workspace per environment, created when missing and
//!   selected per process through `TF_WORKSPACE`, so several workspaces can
//!   be planned at once in the same directory.
//! - **plan**: `terraform plan -out=<file> -json` with the release's
//!   configuration written as a `-var-file` (JSON, never shell-quoted);
//!   the machine-readable UI is streamed as events, then
//!   `terraform show -json <file>` is parsed into a [`TerraformPlan`]
//!   (resource changes with actions and addresses, output changes). Planning
//!   changes nothing.
//! - **apply**: exactly the saved plan file, with per-resource progress events;
//!   the outputs end up in the [`Revision`] (and in [`TerraformApplyStage`]'s
//!   output).
//! - **drift**: [`TerraformDriftGate`] (`plan -detailed-exitcode`, or
//!   refresh-only) as a pipeline gate.
//! - **rollback**: re-applies the configuration and variables of the previous
//!   release. The variables are kept in the deployer's release history (in
//!   the store with [`TerraformDeployer::store`], so every machine sharing it
//!   agrees on what is live; else `.terraform/cd/history/<workspace>.json`,
//!   this machine only) and in each revision; every
//!   plan keeps a copy of the configuration files (`*.tf`, `*.tfvars`, the
//!   lock file, local modules) under `.terraform/cd/configs/<sha256>/`. When
//!   the files changed since, rollback plans and applies from that copy (in a
//!   working directory sharing `.terraform` and the local states); your files
//!   are left as they are.
//! - **secrets**: a release's secret values ([`Release::secret`]) and
//!   [`TerraformDeployer::secret_var`]s are passed as `TF_VAR_<name>` in
//!   terraform's environment, never in a variable file; the saved plan (which
//!   holds every variable's value) is removed as soon as it is applied,
//!   failed or cancelled, at once when it changes nothing, and a plan never
//!   applied at the workspace's next plan (files 0600 in a 0700 directory).
//!   The history keeps secret names only. Terraform itself writes a
//!   sensitive value into the state when a resource attribute holds it:
//!   protect the state as you protect the secret.
//! - **locking**: terraform's own state lock with `-lock-timeout`; a lock held
//!   elsewhere is [`cd_core::ErrorKind::Locked`].
//! - **errors**: [`TerraformError`] carries the diagnostic's summary, detail,
//!   file and line, and the resource address of a failing provisioner.
//!
//! ```no_run
//! use cd_backends::terraform::TerraformDeployer;
//! use cd_core::{DeployContext, Deployer, Release};
//!
//! # async fn demo() -> cd_core::Result<()> {
//! let infra = TerraformDeployer::new("infra/").workspaces(["staging", "production"]);
//! let staging = infra.target("staging");
//! let cx = DeployContext::detached("staging");
//! let plan = infra.plan(&Release::new("v2").config("replicas", 3), &staging, &cx).await?;
//! for change in &plan.changes {
//!     println!("{} {}", change.action, change.address);
//! }
//! let revision = infra.apply(&plan, &cx).await?;
//! println!("outputs: {}", revision.detail["outputs"]);
//! # Ok(()) }
//! ```

mod cli;
mod drift;
mod error;
mod plan;
mod stage;
mod ui;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    DeployContext, Deployer, DeployerCapabilities, Emitter, LogLevel, Plan, Release, Result,
    Revision, Secret, Store, Target,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

pub use drift::{DriftMode, TerraformDriftGate};
pub use error::TerraformError;
pub use plan::{action_from_list, OutputChange, PlanCounts, ResourceChange, TerraformPlan};
pub use stage::{TerraformApplyStage, TerraformPlanStage};
pub use ui::{
    parse_human_diagnostics, ChangeSummary, Diagnostic, Hook, OutputValue, PlannedChange,
    ResourceAddr, SourcePos, SourceRange, UiMessage,
};

use crate::history::{write_private, HistoryHome, RemoveOnDrop, SecretMemory};
use cli::{Cli, Finished};

/// The environment variable naming the terraform binary when
/// [`TerraformDeployer::binary`] is not set.
pub const TERRAFORM_ENV: &str = "CD_TERRAFORM";

/// The environment variable naming the tofu binary for [`TerraformDeployer::tofu`].
pub const TOFU_ENV: &str = "CD_TOFU";

/// The label of a [`Target`] that names its workspace (else its name is used).
pub const WORKSPACE_LABEL: &str = "workspace";

/// One release applied to one workspace, as kept in the deployer's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedRelease {
    /// The release version.
    pub version: String,
    /// The release configuration that became terraform variables.
    pub config: BTreeMap<String, Value>,
    /// The names of the release's secret values (passed as `TF_VAR_*`,
    /// never stored): a rollback to this release needs them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The outputs after apply (sensitive ones masked).
    pub outputs: BTreeMap<String, Value>,
    /// The state serial after apply, when the state is local.
    pub serial: Option<u64>,
    /// sha256 over the configuration files when applied.
    pub config_hash: String,
    /// When it was applied.
    pub at: DateTime<Utc>,
    /// Set when this entry is a rollback: the version it rolled back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// Set when the workspace was destroyed (rollback past the first release).
    #[serde(default)]
    pub destroyed: bool,
}

/// Deploys a Terraform (or OpenTofu) configuration. See the [module docs](self).
///
/// Cloning is cheap; clones share the initialisation state.
#[derive(Debug, Clone)]
pub struct TerraformDeployer {
    name: String,
    binary: Option<PathBuf>,
    binary_env: &'static str,
    default_binary: &'static str,
    dir: PathBuf,
    cli_config: Option<PathBuf>,
    env: Vec<(String, String)>,
    workspaces: Vec<String>,
    lock_timeout: Duration,
    parallelism: Option<u32>,
    vars: BTreeMap<String, Value>,
    version_var: Option<String>,
    config_filter: Option<Vec<String>>,
    state_dir: Option<PathBuf>,
    destroy_when_no_previous: bool,
    show_plan: bool,
    interrupt_grace: Duration,
    history_home: Option<HistoryHome>,
    secret_vars: BTreeMap<String, Secret<Value>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The configuration hash `init` last ran for.
    initialized: Mutex<Option<String>>,
    workspaces: Mutex<HashSet<String>>,
    history: Mutex<()>,
    /// Secret values of releases planned in this process, by workspace and
    /// version, for a rollback to them (never written anywhere).
    secrets: SecretMemory,
}

impl TerraformDeployer {
    /// A deployer for the configuration in `dir`, driving `terraform` (from
    /// `CD_TERRAFORM`, else `terraform` on `PATH`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TerraformDeployer {
            name: "terraform".into(),
            binary: None,
            binary_env: TERRAFORM_ENV,
            default_binary: "terraform",
            dir: absolute(dir.into()),
            cli_config: None,
            env: Vec::new(),
            workspaces: Vec::new(),
            lock_timeout: Duration::from_secs(60),
            parallelism: None,
            vars: BTreeMap::new(),
            version_var: None,
            config_filter: None,
            state_dir: None,
            destroy_when_no_previous: false,
            show_plan: true,
            interrupt_grace: Duration::from_secs(25),
            history_home: None,
            secret_vars: BTreeMap::new(),
            shared: Arc::new(Shared::default()),
        }
    }

    /// A deployer driving OpenTofu's `tofu` (from `CD_TOFU`, else `tofu` on `PATH`).
    pub fn tofu(dir: impl Into<PathBuf>) -> Self {
        let mut d = Self::new(dir);
        d.name = "tofu".into();
        d.binary_env = TOFU_ENV;
        d.default_binary = "tofu";
        d
    }

    /// The CLI binary (`/usr/local/bin/terraform`, `tofu`).
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// The CLI configuration file (sets `TF_CLI_CONFIG_FILE` for every
    /// command). Without it, the user's own configuration applies.
    pub fn cli_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.cli_config = Some(path.into());
        self
    }

    /// An environment variable for every terraform process (`TF_LOG`,
    /// provider credentials, `TF_PLUGIN_CACHE_DIR`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The workspaces this deployer manages, one per environment. Their
    /// targets are [`TerraformDeployer::targets`]. Default: `default`.
    pub fn workspaces<I, S>(mut self, workspaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.workspaces = workspaces.into_iter().map(Into::into).collect();
        self
    }

    /// How long terraform waits for its state lock (`-lock-timeout`).
    /// Default 60 s.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Terraform's `-parallelism`.
    pub fn parallelism(mut self, n: u32) -> Self {
        self.parallelism = Some(n);
        self
    }

    /// A variable set for every release (the release's configuration wins).
    pub fn var(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// A secret variable set for every release, passed as `TF_VAR_<name>` in
    /// terraform's environment, never written to a file or the store (the
    /// release's own secrets, [`Release::secret`], win). A rollback to a
    /// release whose secrets this process did not see takes their values
    /// from here.
    pub fn secret_var(mut self, name: impl Into<String>, value: Secret<String>) -> Self {
        self.secret_vars
            .insert(name.into(), Secret::new(Value::String(value.into_inner())));
        self
    }

    /// Keeps the release history in `store` under `scope` (a name for what
    /// this configuration deploys, the same on every machine:
    /// `payments-infra`), instead of in files under the state directory.
    /// Every deployer sharing the store and scope agrees on `current()` and
    /// rolls back to the same release, whichever machine applied it. Plan
    /// files and configuration snapshots stay local.
    pub fn store(mut self, store: Arc<dyn Store>, scope: impl Into<String>) -> Self {
        self.history_home = Some(HistoryHome::Store {
            store,
            scope: format!("{}:{}", self.name, scope.into()),
        });
        self
    }

    /// Passes the release version as this terraform variable (which the
    /// configuration must declare).
    pub fn version_var(mut self, name: impl Into<String>) -> Self {
        self.version_var = Some(name.into());
        self
    }

    /// Passes only these keys of the release configuration as variables
    /// (by default every key is passed; terraform warns about undeclared ones).
    pub fn only_vars<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config_filter = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Where the deployer keeps plan files and its release history.
    /// Default: `<dir>/.terraform/cd`.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(absolute(dir.into()));
        self
    }

    /// Rolling back the first release destroys the workspace's resources
    /// (`terraform apply -destroy`). Off by default: such a rollback is an error.
    pub fn destroy_when_no_previous(mut self, yes: bool) -> Self {
        self.destroy_when_no_previous = yes;
        self
    }

    /// How long terraform gets, after the run is cancelled (or its node timed
    /// out) and terraform's process group got SIGINT, to finish the
    /// operations in flight and release its state lock before the group is
    /// killed (killing it may lose state). Default 25 s, inside the runner's
    /// default node grace period of 60 s, leaving time for the revert ([`cd_core::Runner::grace`]).
    ///
    /// Raise the node's grace above this when you raise it
    /// ([`cd_core::PipelineBuilder::grace`]): when the node's grace runs out
    /// first, the runner drops the deploy and terraform's whole process group
    /// is killed at once.
    pub fn interrupt_grace(mut self, grace: Duration) -> Self {
        self.interrupt_grace = grace;
        self
    }

    /// Whether planning runs `terraform show -json` on the saved plan to
    /// build the full [`TerraformPlan`] (default `true`).
    ///
    /// With `false`, the typed plan is built from the `planned_change` lines
    /// terraform streams while planning: resource addresses and actions only —
    /// no before/after values and **no output changes** — and marked
    /// [`TerraformPlan::partial`]. That saves one terraform process (and its
    /// provider start) per plan; apply then always runs, since an
    /// output-only change cannot be seen.
    pub fn show_plan(mut self, yes: bool) -> Self {
        self.show_plan = yes;
        self
    }

    /// The configuration directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The target for one workspace (environment).
    pub fn target(&self, workspace: &str) -> Target {
        Target::new(workspace).label(WORKSPACE_LABEL, workspace)
    }

    /// The binary that will be run.
    pub fn binary_path(&self) -> PathBuf {
        self.binary
            .clone()
            .or_else(|| std::env::var_os(self.binary_env).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(self.default_binary))
    }

    fn cli(&self) -> Cli {
        Cli {
            binary: self.binary_path(),
            dir: self.dir.clone(),
            cli_config: self.cli_config.clone(),
            env: self.env.clone(),
            grace: self.interrupt_grace,
        }
    }

    fn state_root(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.dir.join(".terraform").join("cd"))
    }

    fn lock_arg(&self) -> OsString {
        format!("-lock-timeout={}s", self.lock_timeout.as_secs().max(1)).into()
    }

    /// The workspace a target stands for.
    pub fn workspace_of(target: &Target) -> String {
        target
            .label_value(WORKSPACE_LABEL)
            .unwrap_or(&target.name)
            .to_string()
    }

    /// Runs `terraform init -input=false` once for this deployer (and its
    /// clones), and again whenever the configuration files changed since.
    pub async fn init(&self, cx: &DeployContext) -> Result<()> {
        let mut done = self.shared.initialized.lock().await;
        // Again when the configuration changed (a new module or provider).
        let hash = self.config_hash();
        if done.as_deref() == Some(hash.as_str()) {
            return Ok(());
        }
        if !self.dir.is_dir() {
            return Err(TerraformError::InvalidPlan(format!(
                "configuration directory {} does not exist",
                self.dir.display()
            ))
            .into());
        }
        let started = Instant::now();
        cx.events
            .progress(None, "terraform init", "started", None, None);
        let args: Vec<OsString> = vec!["init".into(), "-input=false".into(), "-no-color".into()];
        let events = cx.events.clone();
        let finished = self
            .cli()
            .run(
                &args,
                None,
                &cx.cancel,
                |_| {},
                |line| {
                    if !line.trim().is_empty() {
                        events.log(LogLevel::Debug, format!("terraform init: {line}"));
                    }
                },
            )
            .await?;
        if !finished.success() {
            cx.events.progress(
                None,
                "terraform init",
                "failed",
                Some(started.elapsed()),
                None,
            );
            return Err(self.init_error(finished, cx).await.into());
        }
        cx.events
            .progress(None, "terraform init", "ok", Some(started.elapsed()), None);
        *done = Some(hash);
        Ok(())
    }

    /// `init` has no `-json` in terraform 1.0: read its text, and if that
    /// names no file, ask `validate -json` (which works before init for
    /// syntax errors).
    async fn init_error(&self, finished: Finished, cx: &DeployContext) -> TerraformError {
        let text = format!("{}\n{}", finished.stderr, finished.text);
        let has_range = parse_human_diagnostics(&text)
            .iter()
            .any(|d| d.range.is_some());
        if !has_range {
            let args: Vec<OsString> = vec!["validate".into(), "-json".into(), "-no-color".into()];
            if let Ok((_, out)) = self.cli().capture(&args, None, &cx.cancel).await {
                if let Ok(v) = serde_json::from_str::<Value>(&out) {
                    let diags: Vec<Diagnostic> = v
                        .get("diagnostics")
                        .cloned()
                        .and_then(|d| serde_json::from_value(d).ok())
                        .unwrap_or_default();
                    let mut errors: Vec<Diagnostic> =
                        diags.into_iter().filter(Diagnostic::is_error).collect();
                    if !errors.is_empty() {
                        let first = errors.remove(0);
                        return TerraformError::Diagnostic {
                            command: "init".into(),
                            diagnostic: Box::new(first),
                            others: errors,
                            stderr: finished.stderr,
                        };
                    }
                }
            }
        }
        finished.into_error("init")
    }

    /// Creates `workspace` if missing (once per deployer).
    async fn ensure_workspace(&self, workspace: &str, cx: &DeployContext) -> Result<()> {
        if workspace == "default" {
            return Ok(());
        }
        let mut known = self.shared.workspaces.lock().await;
        if known.contains(workspace) {
            return Ok(());
        }
        let args: Vec<OsString> = vec![
            "workspace".into(),
            "new".into(),
            "-no-color".into(),
            self.lock_arg(),
            workspace.into(),
        ];
        let finished = self
            .cli()
            .run(&args, None, &cx.cancel, |_| {}, |_| {})
            .await?;
        if !finished.success() {
            let text = format!("{}{}", finished.stderr, finished.text);
            if !text.contains("already exists") {
                return Err(finished.into_error("workspace new").into());
            }
        } else {
            cx.events
                .info(format!("terraform: created workspace {workspace}"));
        }
        known.insert(workspace.to_string());
        Ok(())
    }

    /// The variables for a release: deployer variables, then the release's
    /// configuration (filtered by [`TerraformDeployer::only_vars`]), then the
    /// version variable.
    fn variables(&self, release: &Release) -> BTreeMap<String, Value> {
        let mut vars = self.vars.clone();
        for (k, v) in &release.config {
            if self.passes(k) {
                vars.insert(k.clone(), v.clone());
            }
        }
        if let Some(name) = &self.version_var {
            vars.insert(name.clone(), Value::String(release.version.clone()));
        }
        for k in release
            .secrets
            .keys()
            .chain(self.secret_vars.keys().map(String::as_str))
        {
            vars.remove(k);
        }
        vars
    }

    /// Whether a release key is passed as a variable ([`Self::only_vars`]).
    fn passes(&self, key: &str) -> bool {
        match &self.config_filter {
            Some(names) => names.iter().any(|x| x == key),
            None => true,
        }
    }

    /// The secret variables as `TF_VAR_*` environment variables: the
    /// deployer's, then the release's. Fails naming the first secret of the
    /// release whose value is unknown (a release read back from the store).
    fn secret_env(&self, release: &Release, workspace: &str) -> Result<Vec<(String, String)>> {
        let mut release = release.clone();
        let missing: Vec<String> = release
            .secrets
            .missing()
            .into_iter()
            .filter(|k| self.passes(k))
            .map(str::to_string)
            .collect();
        self.complete_secrets(&mut release, workspace, &missing)?;
        self.shared.secrets.remember(workspace, &release);
        let mut values: BTreeMap<String, Value> = self
            .secret_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().clone()))
            .collect();
        for (k, v) in release.secrets.iter().filter(|(k, _)| self.passes(k)) {
            values.insert(k.to_string(), v.clone());
        }
        Ok(values
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (format!("TF_VAR_{k}"), text)
            })
            .collect())
    }

    /// Fills in the values of `names` the release lacks (see
    /// [`SecretMemory::complete`]), else [`TerraformError::MissingSecret`].
    fn complete_secrets(
        &self,
        release: &mut Release,
        workspace: &str,
        names: &[String],
    ) -> Result<()> {
        self.shared
            .secrets
            .complete(
                workspace,
                release,
                names.iter().map(String::as_str),
                &self.secret_vars,
            )
            .map_err(|name| {
                TerraformError::MissingSecret {
                    workspace: workspace.to_string(),
                    version: release.version.clone(),
                    name,
                }
                .into()
            })
    }

    fn plan_paths(&self, workspace: &str, version: &str) -> (PathBuf, PathBuf) {
        let safe: String = version
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = self.state_root().join("plans").join(workspace);
        (
            dir.join(format!("{safe}-{nonce}.tfplan")),
            dir.join(format!("{safe}-{nonce}.tfvars.json")),
        )
    }

    /// Plans `release` on `target`, streaming terraform's progress to `cx`'s
    /// events. [`Deployer::plan`] does the same without events (the trait
    /// gives it no context).
    pub async fn plan_in(
        &self,
        release: &Release,
        target: &Target,
        cx: &DeployContext,
    ) -> Result<Plan> {
        cd_core::types::validate_version(&release.version)?;
        release.secrets.register(cx.events.redactor());
        let workspace = Self::workspace_of(target);
        self.init(cx).await?;
        self.ensure_workspace(&workspace, cx).await?;
        let (plan_file, var_file) = self.plan_paths(&workspace, &release.version);
        if let Some(dir) = plan_file.parent() {
            remove_stale_plans(dir);
        }
        write_json(
            &var_file,
            &Value::Object(self.variables(release).into_iter().collect()),
        )?;
        let result = self
            .plan_files(
                release, target, &workspace, &plan_file, &var_file, false, cx,
            )
            .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&plan_file);
            let _ = std::fs::remove_file(&var_file);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn plan_files(
        &self,
        release: &Release,
        target: &Target,
        workspace: &str,
        plan_file: &Path,
        var_file: &Path,
        destroy: bool,
        cx: &DeployContext,
    ) -> Result<Plan> {
        let started = Instant::now();
        cx.events.progress(
            Some(workspace),
            "terraform plan",
            "started",
            None,
            Some(release.version.clone()),
        );
        let mut args: Vec<OsString> = vec![
            "plan".into(),
            "-input=false".into(),
            "-json".into(),
            self.lock_arg(),
        ];
        if destroy {
            args.push("-destroy".into());
        }
        if let Some(p) = self.parallelism {
            args.push(format!("-parallelism={p}").into());
        }
        args.push(os_flag("-out=", plan_file));
        args.push(os_flag("-var-file=", var_file));
        let events = cx.events.clone();
        let mut streamed: Vec<PlannedChange> = Vec::new();
        let mut cli = self.cli();
        cli.env.extend(self.secret_env(release, workspace)?);
        let finished = cli
            .run(
                &args,
                Some(workspace),
                &cx.cancel,
                |m| {
                    if m.kind == "planned_change" {
                        if let Some(c) = &m.change {
                            streamed.push(c.clone());
                        }
                    }
                    stream_event(&events, &m)
                },
                |l| stream_line(&events, l),
            )
            .await?;
        if !finished.success() {
            cx.events.progress(
                Some(workspace),
                "terraform plan",
                "failed",
                Some(started.elapsed()),
                None,
            );
            return Err(finished.into_error("plan").into());
        }
        let typed = if self.show_plan {
            self.show(plan_file, workspace, cx).await?
        } else {
            TerraformPlan::from_planned_changes(&streamed)
        };
        let counts = typed.counts();
        cx.events.progress(
            Some(workspace),
            "terraform plan",
            "ok",
            Some(started.elapsed()),
            Some(format!(
                "{} to add, {} to change, {} to destroy",
                counts.add, counts.change, counts.destroy
            )),
        );
        let current = self.current(target).await?;
        let mut plan = Plan::new(release.clone(), target.clone(), current);
        plan.changes = typed.changes();
        if plan.is_noop() && !destroy && !typed.partial {
            // Nothing to apply: the saved plan (which holds every variable's
            // value, secrets included) is not needed.
            let _ = std::fs::remove_file(plan_file);
            let _ = std::fs::remove_file(var_file);
        }
        plan.detail = json!({
            "backend": self.name,
            "workspace": workspace,
            "plan_file": plan_file,
            "var_file": var_file,
            "destroy": destroy,
            "config_hash": self.snapshot_config()?,
            "counts": counts,
            "terraform_plan": typed,
        });
        Ok(plan)
    }

    /// `terraform show -json <planfile>`, typed.
    pub async fn show(
        &self,
        plan_file: &Path,
        workspace: &str,
        cx: &DeployContext,
    ) -> Result<TerraformPlan> {
        let args: Vec<OsString> = vec!["show".into(), "-json".into(), plan_file.into()];
        let (finished, out) = self
            .cli()
            .capture(&args, Some(workspace), &cx.cancel)
            .await?;
        if !finished.success() {
            return Err(finished.into_error("show").into());
        }
        Ok(TerraformPlan::parse(&out)?)
    }

    /// The outputs of a workspace, unmasked (`terraform output -json`).
    pub async fn outputs(
        &self,
        target: &Target,
        cx: &DeployContext,
    ) -> Result<BTreeMap<String, OutputValue>> {
        let workspace = Self::workspace_of(target);
        self.init(cx).await?;
        self.ensure_workspace(&workspace, cx).await?;
        let args: Vec<OsString> = vec!["output".into(), "-json".into(), "-no-color".into()];
        let (finished, out) = self
            .cli()
            .capture(&args, Some(&workspace), &cx.cancel)
            .await?;
        if !finished.success() {
            return Err(finished.into_error("output").into());
        }
        if out.trim().is_empty() {
            return Ok(BTreeMap::new());
        }
        serde_json::from_str(&out).map_err(|e| {
            TerraformError::Parse {
                command: "output -json".into(),
                message: e.to_string(),
            }
            .into()
        })
    }

    async fn apply_plan(
        &self,
        plan: &Plan,
        cx: &DeployContext,
        rollback_of: Option<String>,
    ) -> Result<Option<Revision>> {
        let detail = &plan.detail;
        let workspace = detail
            .get("workspace")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                TerraformError::InvalidPlan("the plan was not made by a TerraformDeployer".into())
            })?
            .to_string();
        let plan_file = PathBuf::from(
            detail
                .get("plan_file")
                .and_then(Value::as_str)
                .ok_or_else(|| TerraformError::InvalidPlan("the plan names no plan file".into()))?,
        );
        let var_file = detail
            .get("var_file")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        let destroy = detail
            .get("destroy")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let partial = detail
            .pointer("/terraform_plan/partial")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let skip = plan.is_noop() && !destroy && !partial;
        if !skip && !plan_file.is_file() {
            return Err(TerraformError::InvalidPlan(format!(
                "plan file {} is gone (already applied?)",
                plan_file.display()
            ))
            .into());
        }
        // The plan's files hold variable values (the saved plan, secrets
        // included): removed on every way out of here, a dropped future too.
        let _files = RemoveOnDrop::files([plan_file.clone()].into_iter().chain(var_file.clone()));
        self.init(cx).await?;
        self.ensure_workspace(&workspace, cx).await?;
        let started = Instant::now();
        let mut outputs: Option<BTreeMap<String, OutputValue>> = None;
        let mut interrupted = false;
        if skip {
            cx.events.progress(
                Some(&workspace),
                "terraform apply",
                "skipped",
                None,
                Some("no changes".into()),
            );
        } else {
            cx.events.progress(
                Some(&workspace),
                "terraform apply",
                "started",
                None,
                Some(plan.release.version.clone()),
            );
            let mut args: Vec<OsString> = vec![
                "apply".into(),
                "-input=false".into(),
                "-json".into(),
                "-auto-approve".into(),
                self.lock_arg(),
            ];
            if let Some(p) = self.parallelism {
                args.push(format!("-parallelism={p}").into());
            }
            args.push(plan_file.clone().into());
            let events = cx.events.clone();
            let finished = self
                .cli()
                .run_raw(
                    &args,
                    Some(&workspace),
                    &cx.cancel,
                    |m| {
                        if let Some(o) = &m.outputs {
                            outputs = Some(o.clone());
                        }
                        stream_event(&events, &m)
                    },
                    |l| stream_line(&events, l),
                )
                .await?;
            interrupted = finished.interrupted;
            if interrupted && !finished.success() {
                cx.events.progress(
                    Some(&workspace),
                    "terraform apply",
                    "cancelled",
                    Some(started.elapsed()),
                    Some("interrupted; operations in flight were finished".into()),
                );
                return Err(TerraformError::Cancelled {
                    command: "apply".into(),
                }
                .into());
            }
            if interrupted {
                // Terraform finished everything before the interrupt took
                // effect: the release is live, say so truthfully.
                cx.events.warn(format!(
                    "terraform apply of {} completed although the run was cancelled",
                    plan.release.version
                ));
            }
            if !finished.success() {
                cx.events.progress(
                    Some(&workspace),
                    "terraform apply",
                    "failed",
                    Some(started.elapsed()),
                    None,
                );
                return Err(finished.into_error("apply").into());
            }
            cx.events.progress(
                Some(&workspace),
                "terraform apply",
                "ok",
                Some(started.elapsed()),
                None,
            );
        }
        drop(_files);
        let outputs = match outputs {
            Some(o) => o,
            None if destroy || interrupted => BTreeMap::new(),
            None => self.outputs(&plan.target, cx).await?,
        };
        let mut shown = BTreeMap::new();
        for (name, o) in &outputs {
            if o.sensitive {
                register_secrets(cx.events.redactor(), &o.value);
                shown.insert(name.clone(), Value::String("(sensitive)".into()));
            } else {
                shown.insert(name.clone(), o.value.clone());
            }
        }
        let serial = self.local_serial(&workspace);
        let entry = AppliedRelease {
            version: plan.release.version.clone(),
            config: plan.release.config.clone(),
            secrets: plan.release.secrets.keys().map(str::to_string).collect(),
            outputs: shown,
            serial,
            config_hash: detail
                .get("config_hash")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            at: Utc::now(),
            rollback_of,
            destroyed: destroy,
        };
        self.record(&workspace, entry.clone()).await?;
        if destroy {
            return Ok(None);
        }
        Ok(Some(self.revision(&plan.target, &workspace, &entry)))
    }

    fn revision(&self, target: &Target, workspace: &str, entry: &AppliedRelease) -> Revision {
        let id = match entry.serial {
            Some(s) => format!("{workspace}#{s}"),
            None => format!("{workspace}@{}", entry.version),
        };
        let mut rev = Revision::new(&target.name, &entry.version, id).detail(json!({
            "workspace": workspace,
            "outputs": entry.outputs,
            "config": entry.config,
            "secrets": entry.secrets,
            "serial": entry.serial,
            "config_hash": entry.config_hash,
        }));
        rev.deployed_at = Some(entry.at);
        rev
    }

    /// The release a history entry was applied with, for a rollback: its
    /// configuration, and its secret values from this process's memory or
    /// the deployer's [`Self::secret_var`]s.
    fn release_of(&self, entry: &AppliedRelease, workspace: &str) -> Result<Release> {
        let mut release = Release::new(entry.version.clone());
        release.config = entry.config.clone();
        self.complete_secrets(&mut release, workspace, &entry.secrets)?;
        Ok(release)
    }

    /// Where the release history lives: the store given with
    /// [`TerraformDeployer::store`], else files under the state directory.
    fn history_home(&self) -> HistoryHome {
        self.history_home
            .clone()
            .unwrap_or_else(|| HistoryHome::Files(self.state_root().join("history")))
    }

    /// The releases applied to a workspace, oldest first (the newest 100).
    pub async fn history(&self, target: &Target) -> Result<Vec<AppliedRelease>> {
        let _guard = self.shared.history.lock().await;
        self.history_home().read(&Self::workspace_of(target)).await
    }

    async fn record(&self, workspace: &str, entry: AppliedRelease) -> Result<()> {
        let _guard = self.shared.history.lock().await;
        self.history_home().append(workspace, &entry).await
    }

    /// The serial of a local state file, if the backend is local.
    fn local_serial(&self, workspace: &str) -> Option<u64> {
        let path = if workspace == "default" {
            self.dir.join("terraform.tfstate")
        } else {
            self.dir
                .join("terraform.tfstate.d")
                .join(workspace)
                .join("terraform.tfstate")
        };
        let bytes = std::fs::read(path).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        v.get("serial").and_then(Value::as_u64)
    }

    /// sha256 over the configuration files (`*.tf`, `*.tf.json`, `*.tfvars`,
    /// `*.tfvars.json`, `.terraform.lock.hcl`) of the directory and of its
    /// subdirectories (local modules), `.terraform` and states excepted.
    pub fn config_hash(&self) -> String {
        config_hash_of(&config_files(&self.dir))
    }

    /// Keeps a copy of the configuration files under
    /// `<state dir>/configs/<hash>/` (once per distinct configuration), so a
    /// rollback can re-apply the configuration a release was applied with.
    /// Returns the hash.
    fn snapshot_config(&self) -> Result<String> {
        let files = config_files(&self.dir);
        let hash = config_hash_of(&files);
        let dest = self.state_root().join("configs").join(&hash);
        if dest.is_dir() {
            return Ok(hash);
        }
        let configs = self.state_root().join("configs");
        let staging = configs.join(format!(".{hash}.{}", std::process::id()));
        write_config_tree(
            &configs,
            &staging,
            &files,
            "writing the configuration snapshot",
        )?;
        if let Err(e) = std::fs::rename(&staging, &dest) {
            let _ = std::fs::remove_dir_all(&staging);
            if !dest.is_dir() {
                return Err(TerraformError::io(
                    format!("writing the configuration snapshot {}", dest.display()),
                    e,
                )
                .into());
            }
        }
        Ok(hash)
    }

    /// A working directory with the configuration snapshot `hash`, sharing
    /// this directory's `.terraform` and local states (symlinks), or `None`
    /// when no such snapshot was kept.
    fn rollback_workdir(&self, hash: &str) -> Result<Option<PathBuf>> {
        let snapshot = self.state_root().join("configs").join(hash);
        if hash.is_empty() || !snapshot.is_dir() {
            return Ok(None);
        }
        const WHAT: &str = "preparing the rollback working directory";
        let rollbacks = self.state_root().join("rollback");
        let work = rollbacks.join(hash);
        write_config_tree(&rollbacks, &work, &config_files(&snapshot), WHAT)?;
        for shared in [".terraform", "terraform.tfstate", "terraform.tfstate.d"] {
            let original = self.dir.join(shared);
            if original.exists() {
                std::os::unix::fs::symlink(&original, work.join(shared))
                    .map_err(|e| TerraformError::io(format!("{WHAT} {}", work.display()), e))?;
            }
        }
        Ok(Some(work))
    }

    async fn rollback_to(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let workspace = Self::workspace_of(target);
        let history = self.history(target).await?;
        let current = history.last().filter(|e| !e.destroyed).cloned();
        let previous: Option<AppliedRelease> = match to {
            Some(rev) => {
                let found = history
                    .iter()
                    .rev()
                    .find(|e| e.version == rev.version && !e.destroyed)
                    .cloned();
                match found {
                    Some(e) => Some(e),
                    None => {
                        // A revision from elsewhere (the store's release
                        // history): its detail carries the configuration.
                        let config: BTreeMap<String, Value> = rev
                            .detail
                            .get("config")
                            .cloned()
                            .and_then(|c| serde_json::from_value(c).ok())
                            .ok_or_else(|| TerraformError::NoPreviousRelease {
                                workspace: workspace.clone(),
                            })?;
                        let secrets = rev
                            .detail
                            .get("secrets")
                            .cloned()
                            .and_then(|c| serde_json::from_value(c).ok())
                            .unwrap_or_default();
                        Some(AppliedRelease {
                            version: rev.version.clone(),
                            config,
                            secrets,
                            outputs: BTreeMap::new(),
                            serial: None,
                            config_hash: String::new(),
                            at: Utc::now(),
                            rollback_of: None,
                            destroyed: false,
                        })
                    }
                }
            }
            None if history.len() >= 2 => {
                Some(history[history.len() - 2].clone()).filter(|e| !e.destroyed)
            }
            None => None,
        };
        let from = current.as_ref().map(|c| c.version.clone());
        cx.events.emit(cd_core::EventKind::Rollout {
            strategy: "terraform".into(),
            message: format!(
                "rolling back workspace {workspace} from {} to {}",
                from.as_deref().unwrap_or("nothing"),
                previous
                    .as_ref()
                    .map(|p| p.version.as_str())
                    .unwrap_or("nothing (destroy)")
            ),
        });
        match previous {
            Some(prev) => {
                let release = self.release_of(&prev, &workspace)?;
                let changed =
                    !prev.config_hash.is_empty() && prev.config_hash != self.config_hash();
                let work = if changed {
                    self.rollback_workdir(&prev.config_hash)?
                } else {
                    None
                };
                let Some(work) = work else {
                    if changed {
                        cx.events.warn(format!(
                            "terraform: configuration files in {} changed since {} was applied \
                             and no copy of them was kept; rollback re-applies its variables \
                             to the current files",
                            self.dir.display(),
                            prev.version
                        ));
                    }
                    let plan = self.plan_in(&release, target, cx).await?;
                    return self.apply_plan(&plan, cx, from).await;
                };
                cx.events.info(format!(
                    "terraform: configuration files changed since {} was applied; rolling back \
                     with the copy kept then ({})",
                    prev.version,
                    work.display()
                ));
                // The same deployer, run in the working directory of the
                // snapshot; its plan files and history stay where they are.
                let mut old = self.clone();
                old.dir = work.clone();
                old.state_dir = Some(self.state_root());
                old.shared = Arc::new(Shared::default());
                let result = async {
                    let plan = old.plan_in(&release, target, cx).await?;
                    old.apply_plan(&plan, cx, from).await
                }
                .await;
                // `init` there may have changed the shared `.terraform`
                // (modules, providers): initialise here again next time,
                // even if these files did not change.
                *self.shared.initialized.lock().await = None;
                let _ = std::fs::remove_dir_all(&work);
                result
            }
            None if self.destroy_when_no_previous && current.is_some() => {
                // Destroying needs the variables the resources were made with.
                let Some(current) = current else {
                    return Err(TerraformError::NoPreviousRelease { workspace }.into());
                };
                let mut release = self.release_of(&current, &workspace)?;
                release.version = format!("{}-destroyed", current.version);
                self.init(cx).await?;
                self.ensure_workspace(&workspace, cx).await?;
                let (plan_file, var_file) = self.plan_paths(&workspace, &release.version);
                write_json(
                    &var_file,
                    &Value::Object(self.variables(&release).into_iter().collect()),
                )?;
                let plan = self
                    .plan_files(
                        &release, target, &workspace, &plan_file, &var_file, true, cx,
                    )
                    .await?;
                self.apply_plan(&plan, cx, from).await
            }
            None => Err(TerraformError::NoPreviousRelease { workspace }.into()),
        }
    }
}

#[async_trait]
impl Deployer for TerraformDeployer {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> DeployerCapabilities {
        DeployerCapabilities {
            rollback: true,
            undeploy: self.destroy_when_no_previous,
            idempotent: true,
            dry_run: true,
        }
    }

    fn targets(&self) -> Vec<Target> {
        if self.workspaces.is_empty() {
            vec![self.target("default")]
        } else {
            self.workspaces.iter().map(|w| self.target(w)).collect()
        }
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        let workspace = Self::workspace_of(target);
        let history = self.history(target).await?;
        Ok(history
            .last()
            .filter(|e| !e.destroyed)
            .map(|e| self.revision(target, &workspace, e)))
    }

    /// Plans, streaming the tool's output as events through `cx`.
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        self.plan_in(release, target, cx).await
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        cd_core::types::validate_version(&plan.release.version)?;
        self.apply_plan(plan, cx, None).await?.ok_or_else(|| {
            TerraformError::InvalidPlan("a destroy plan leaves no revision".into()).into()
        })
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        self.rollback_to(target, to, cx).await
    }
}

/// Turns one UI message into events.
fn stream_event(events: &Emitter, m: &UiMessage) {
    let addr = m.address().map(str::to_string);
    let hook = m.hook.as_ref();
    let elapsed = hook
        .and_then(|h| h.elapsed_seconds)
        .map(Duration::from_secs_f64);
    let action = hook
        .and_then(|h| h.action.clone())
        .unwrap_or_else(|| "apply".into());
    match m.kind.as_str() {
        "planned_change" => {
            if let Some(c) = &m.change {
                events.progress(
                    addr.as_deref(),
                    "plan",
                    &c.action,
                    None,
                    c.reason.as_ref().map(|r| format!("because {r}")),
                );
            }
        }
        "apply_start" => events.progress(addr.as_deref(), &action, "started", None, None),
        "apply_progress" => events.progress(
            addr.as_deref(),
            &action,
            "running",
            elapsed,
            Some(m.message.clone()),
        ),
        "apply_complete" => events.progress(
            addr.as_deref(),
            &action,
            "ok",
            elapsed,
            hook.and_then(|h| h.id_value.clone())
                .map(|id| format!("id={id}")),
        ),
        "apply_errored" => events.progress(addr.as_deref(), &action, "failed", elapsed, None),
        "provision_progress" => {
            let output = hook.and_then(|h| h.output.clone()).unwrap_or_default();
            events.info(format!(
                "{} ({}): {output}",
                addr.as_deref().unwrap_or("-"),
                hook.and_then(|h| h.provisioner.clone()).unwrap_or_default()
            ));
        }
        "provision_errored" => events.progress(
            addr.as_deref(),
            &format!(
                "provision {}",
                hook.and_then(|h| h.provisioner.clone()).unwrap_or_default()
            ),
            "failed",
            None,
            None,
        ),
        "diagnostic" => {
            if let Some(d) = &m.diagnostic {
                let level = if d.is_error() {
                    LogLevel::Error
                } else {
                    LogLevel::Warn
                };
                let mut text = format!("terraform {}: {d}", d.severity);
                if !d.detail.is_empty() {
                    text.push_str(": ");
                    text.push_str(d.detail.trim());
                }
                events.log(level, text);
            }
        }
        "change_summary" => events.info(format!("terraform: {}", m.message)),
        "version" | "outputs" => {}
        _ => events.log(LogLevel::Debug, format!("terraform: {}", m.message)),
    }
}

fn stream_line(events: &Emitter, line: &str) {
    if !line.trim().is_empty() {
        events.log(LogLevel::Debug, format!("terraform: {line}"));
    }
}

fn register_secrets(redactor: &cd_core::Redactor, v: &Value) {
    match v {
        Value::String(s) => redactor.register(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| register_secrets(redactor, x)),
        Value::Object(o) => o.values().for_each(|x| register_secrets(redactor, x)),
        _ => {}
    }
}

/// Writes a variable file owner-only (`*.tfvars.json` hold release
/// configuration; terraform writes the plan files next to them).
fn write_json(path: &Path, value: &Value) -> Result<()> {
    write_private(path, &serde_json::to_vec_pretty(value)?)
        .map_err(|e| TerraformError::io(format!("writing {}", path.display()), e).into())
}

/// Plans that were never applied leave their files behind; remove those
/// older than a day (they are stale by then anyway).
fn remove_stale_plans(dir: &Path) {
    const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > MAX_AGE);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn os_flag(flag: &str, path: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(path.as_os_str());
    s
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

/// The configuration files below `dir` (relative path, contents), sorted;
/// `.terraform`, local states and hidden directories are left out.
fn config_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !name.starts_with('.') && name != "terraform.tfstate.d" {
                    walk(root, &path, out);
                }
            } else if kind.is_file()
                && (name.ends_with(".tf")
                    || name.ends_with(".tf.json")
                    || name.ends_with(".tfvars")
                    || name.ends_with(".tfvars.json")
                    || name == ".terraform.lock.hcl")
            {
                if let (Ok(rel), Ok(bytes)) = (path.strip_prefix(root), std::fs::read(&path)) {
                    out.push((rel.to_path_buf(), bytes));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn config_hash_of(files: &[(PathBuf, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (rel, bytes) in files {
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(bytes);
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Writes `files` (from [`config_files`]) afresh into `dest`, a directory
/// under `parent`, which is made owner-only: `*.tfvars` may hold secrets.
fn write_config_tree(
    parent: &Path,
    dest: &Path,
    files: &[(PathBuf, Vec<u8>)],
    what: &str,
) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| {
        TerraformError::io(format!("{what} {}", path.display()), e)
    };
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700));
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).map_err(|e| io(dest, e))?;
    for (rel, bytes) in files {
        let path = dest.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    Ok(())
}
