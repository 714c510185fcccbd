//! A drift check as a pipeline gate.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::time::Instant;

use async_trait::async_trait;
use cd_core::{DeployContext, Gate, Release, Result, StageContext, Target, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{os_flag, stream_event, write_json, TerraformDeployer};

/// How [`TerraformDriftGate`] looks for drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMode {
    /// `terraform plan -detailed-exitcode` with the live release's variables:
    /// anything terraform would change (real infrastructure that drifted, or
    /// configuration files changed since the live release) is drift.
    #[default]
    Full,
    /// `terraform plan -refresh-only -detailed-exitcode`: only differences
    /// between the state and the real infrastructure.
    RefreshOnly,
}

/// What a drift check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    /// The workspace checked.
    pub workspace: String,
    /// Whether terraform found differences (exit code 2).
    pub drifted: bool,
    /// `(address, action)` for each resource that would change.
    pub changes: Vec<(String, String)>,
}

/// Fails when a workspace has drifted from what the live release applied.
///
/// The variables come from the deployer's release history (the live
/// release); when nothing was applied yet, from the run's release.
///
/// ```no_run
/// use cd_backends::terraform::{TerraformDeployer, TerraformDriftGate};
/// let infra = TerraformDeployer::new("infra/").workspaces(["production"]);
/// let gate = TerraformDriftGate::new(infra.clone(), infra.target("production")).refresh_only();
/// # let _ = gate;
/// ```
#[derive(Debug, Clone)]
pub struct TerraformDriftGate {
    deployer: TerraformDeployer,
    target: Target,
    mode: DriftMode,
}

impl TerraformDriftGate {
    /// A gate checking `target`'s workspace with a full plan.
    pub fn new(deployer: TerraformDeployer, target: Target) -> Self {
        TerraformDriftGate {
            deployer,
            target,
            mode: DriftMode::Full,
        }
    }

    /// Checks only state against the real infrastructure (`-refresh-only`).
    pub fn refresh_only(mut self) -> Self {
        self.mode = DriftMode::RefreshOnly;
        self
    }

    /// Runs the check. `fallback` gives the variables when the deployer has
    /// no applied release for the workspace.
    pub async fn check(&self, fallback: &Release, cx: &DeployContext) -> Result<DriftReport> {
        let d = &self.deployer;
        let workspace = TerraformDeployer::workspace_of(&self.target);
        d.init(cx).await?;
        d.ensure_workspace(&workspace, cx).await?;
        let history = d.history(&self.target).await?;
        let release = match history.last().filter(|e| !e.destroyed) {
            Some(live) => d.release_of(live, &workspace)?,
            None => fallback.clone(),
        };
        let (_, var_file) = d.plan_paths(&workspace, &format!("drift-{}", release.version));
        write_json(
            &var_file,
            &Value::Object(d.variables(&release).into_iter().collect()),
        )?;
        let mut args: Vec<OsString> = vec![
            "plan".into(),
            "-input=false".into(),
            "-json".into(),
            "-detailed-exitcode".into(),
            d.lock_arg(),
        ];
        // Refresh-only exit codes are unreliable (terraform 1.0 answers 2
        // for "No changes"; see hashicorp/terraform#36403, and OpenTofu
        // never answers 2: opentofu/opentofu#3107): save the refresh plan and
        // compare the refreshed state with the stored one instead.
        let (refresh_plan, _) = d.plan_paths(&workspace, &format!("drift-{}", release.version));
        if self.mode == DriftMode::RefreshOnly {
            args.push("-refresh-only".into());
            args.push(os_flag("-out=", &refresh_plan));
        }
        args.push(os_flag("-var-file=", &var_file));
        let started = Instant::now();
        cx.events
            .progress(Some(&workspace), "drift check", "started", None, None);
        let events = cx.events.clone();
        let mut changes = Vec::new();
        let mut cli = d.cli();
        cli.env.extend(d.secret_env(&release, &workspace)?);
        let result = cli
            .run(
                &args,
                Some(&workspace),
                &cx.cancel,
                |m| {
                    if let (Some(c), "planned_change") = (&m.change, m.kind.as_str()) {
                        changes.push((c.resource.addr.clone(), c.action.clone()));
                    } else if m.kind == "resource_drift" {
                        if let Some(c) = &m.change {
                            changes.push((c.resource.addr.clone(), format!("drift:{}", c.action)));
                        }
                    }
                    stream_event(&events, &m)
                },
                |_| {},
            )
            .await;
        let _ = std::fs::remove_file(&var_file);
        let finished = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&refresh_plan);
                return Err(e.into());
            }
        };
        let drifted = match finished.code {
            Some(0) => false,
            Some(2) if self.mode == DriftMode::RefreshOnly => {
                let found = self
                    .refreshed_differences(&refresh_plan, &workspace, cx)
                    .await;
                let _ = std::fs::remove_file(&refresh_plan);
                let found = found?;
                changes.extend(
                    found
                        .iter()
                        .map(|a| (a.clone(), "changed outside terraform".to_string())),
                );
                !found.is_empty()
            }
            Some(2) => true,
            _ => {
                let _ = std::fs::remove_file(&refresh_plan);
                cx.events.progress(
                    Some(&workspace),
                    "drift check",
                    "failed",
                    Some(started.elapsed()),
                    None,
                );
                return Err(finished.into_error("plan -detailed-exitcode").into());
            }
        };
        cx.events.progress(
            Some(&workspace),
            "drift check",
            if drifted { "drifted" } else { "ok" },
            Some(started.elapsed()),
            None,
        );
        Ok(DriftReport {
            workspace,
            drifted,
            changes,
        })
    }
}

impl TerraformDriftGate {
    /// Addresses whose refreshed values (the saved refresh-only plan's
    /// `prior_state`) differ from the stored state (`terraform show -json`),
    /// plus outputs that would change.
    async fn refreshed_differences(
        &self,
        refresh_plan: &std::path::Path,
        workspace: &str,
        cx: &DeployContext,
    ) -> Result<Vec<String>> {
        let d = &self.deployer;
        let show = |args: Vec<std::ffi::OsString>| async move {
            let (finished, out) = d.cli().capture(&args, Some(workspace), &cx.cancel).await?;
            if !finished.success() {
                return Err(cd_core::Error::from(finished.into_error("show")));
            }
            serde_json::from_str::<Value>(&out).map_err(|e| {
                cd_core::Error::from(super::error::TerraformError::Parse {
                    command: "show -json".into(),
                    message: e.to_string(),
                })
            })
        };
        let plan = show(vec!["show".into(), "-json".into(), refresh_plan.into()]).await?;
        let state = show(vec!["show".into(), "-json".into()]).await?;
        let mut refreshed = BTreeMap::new();
        if let Some(m) = plan.pointer("/prior_state/values/root_module") {
            collect_resources(m, &mut refreshed);
        }
        let mut stored = BTreeMap::new();
        if let Some(m) = state.pointer("/values/root_module") {
            collect_resources(m, &mut stored);
        }
        let mut out: Vec<String> = stored
            .iter()
            .filter(|(addr, v)| refreshed.get(*addr) != Some(*v))
            .map(|(addr, _)| addr.clone())
            .collect();
        out.extend(
            refreshed
                .keys()
                .filter(|a| !stored.contains_key(*a))
                .cloned(),
        );
        if let Some(outputs) = plan.get("output_changes").and_then(Value::as_object) {
            for (name, c) in outputs {
                let actions = c.get("actions").cloned().unwrap_or(Value::Null);
                if actions != serde_json::json!(["no-op"]) {
                    out.push(format!("output.{name}"));
                }
            }
        }
        Ok(out)
    }
}

/// Resource address → values, over a module and its child modules.
fn collect_resources(module: &Value, out: &mut BTreeMap<String, Value>) {
    for r in module
        .get("resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(addr) = r.get("address").and_then(Value::as_str) {
            out.insert(
                addr.to_string(),
                r.get("values").cloned().unwrap_or(Value::Null),
            );
        }
    }
    for child in module
        .get("child_modules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        collect_resources(child, out);
    }
}

#[async_trait]
impl Gate for TerraformDriftGate {
    fn kind(&self) -> String {
        "terraform-drift".into()
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        let report = self.check(cx.release(), &cx.deploy_context()).await?;
        if !report.drifted {
            return Ok(Verdict::Pass);
        }
        let what = if report.changes.is_empty() {
            "state and configuration differ".to_string()
        } else {
            report
                .changes
                .iter()
                .map(|(a, c)| format!("{a} ({c})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Ok(Verdict::fail(format!(
            "workspace {} has drifted: {what}",
            report.workspace
        )))
    }
}

impl From<DriftReport> for Value {
    fn from(r: DriftReport) -> Value {
        serde_json::to_value(r).unwrap_or(Value::Null)
    }
}
