//! Terraform as pipeline stages: plan in one node, look at the plan (policy,
//! approval), apply exactly that plan in another.

use async_trait::async_trait;
use cd_core::{
    Capabilities, Deployer, Error, Plan, Result, Stage, StageContext, StageOutput, Target,
};
use serde_json::{json, Value};

use super::{TerraformDeployer, TerraformPlan};

/// Plans the run's release; its output is the plan, typed:
///
/// ```json
/// {"workspace": "staging", "has_changes": true,
///  "counts": {"add": 1, "change": 0, "destroy": 0},
///  "terraform_plan": {"resource_changes": [...], "output_changes": {...}},
///  "plan": { ...the cd_core::Plan, for TerraformApplyStage... }}
/// ```
///
/// A policy gate or an approver downstream reads `terraform_plan`.
#[derive(Debug, Clone)]
pub struct TerraformPlanStage {
    deployer: TerraformDeployer,
    target: Option<Target>,
}

impl TerraformPlanStage {
    /// Plans in the workspace named after the run's environment.
    pub fn new(deployer: TerraformDeployer) -> Self {
        TerraformPlanStage {
            deployer,
            target: None,
        }
    }

    /// Plans in this target's workspace instead.
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }
}

#[async_trait]
impl Stage for TerraformPlanStage {
    fn kind(&self) -> String {
        "terraform-plan".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let target = self
            .target
            .clone()
            .unwrap_or_else(|| self.deployer.target(cx.environment()));
        let plan = self
            .deployer
            .plan_in(cx.release(), &target, &cx.deploy_context())
            .await?;
        Ok(StageOutput::json(json!({
            "workspace": plan.detail.get("workspace"),
            "has_changes": !plan.is_noop(),
            "counts": plan.detail.get("counts"),
            "terraform_plan": plan.detail.get("terraform_plan"),
            "plan": plan,
        })))
    }
}

/// Applies a plan and outputs terraform's outputs:
///
/// ```json
/// {"workspace": "staging", "version": "v2", "outputs": {"url": "..."}, "revision": {...}}
/// ```
///
/// With [`TerraformApplyStage::from_plan`] it applies exactly the plan a
/// [`TerraformPlanStage`] node made (and fails if that plan is stale);
/// otherwise it plans and applies in one go. Rolls back by re-applying the
/// previous release's variables.
#[derive(Debug, Clone)]
pub struct TerraformApplyStage {
    deployer: TerraformDeployer,
    plan_node: Option<String>,
    target: Option<Target>,
}

impl TerraformApplyStage {
    /// Plans and applies the run's release.
    pub fn new(deployer: TerraformDeployer) -> Self {
        TerraformApplyStage {
            deployer,
            plan_node: None,
            target: None,
        }
    }

    /// Applies the plan made by the [`TerraformPlanStage`] node `node`.
    pub fn from_plan(deployer: TerraformDeployer, node: impl Into<String>) -> Self {
        TerraformApplyStage {
            deployer,
            plan_node: Some(node.into()),
            target: None,
        }
    }

    /// Applies to this target's workspace (when not applying a plan node's plan).
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }
}

#[async_trait]
impl Stage for TerraformApplyStage {
    fn kind(&self) -> String {
        "terraform-apply".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            rollback: true,
            idempotent: true,
        }
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let dcx = cx.deploy_context();
        let plan: Plan = match &self.plan_node {
            Some(node) => {
                let out = cx.require_output(node)?;
                let plan = out.get("plan").cloned().ok_or_else(|| {
                    Error::invalid(format!("node `{node}` did not output a terraform plan"))
                        .with("node", cx.node())
                })?;
                serde_json::from_value(plan)?
            }
            None => {
                let target = self
                    .target
                    .clone()
                    .unwrap_or_else(|| self.deployer.target(cx.environment()));
                self.deployer.plan_in(cx.release(), &target, &dcx).await?
            }
        };
        if let Some(tp) = TerraformPlan::from_plan(&plan) {
            let n = tp.counts();
            cx.log(format!(
                "applying {}: {} to add, {} to change, {} to destroy",
                plan.release.version, n.add, n.change, n.destroy
            ));
        }
        let revision = self.deployer.apply(&plan, &dcx).await?;
        Ok(StageOutput::json(json!({
            "workspace": revision.detail.get("workspace"),
            "version": revision.version,
            "outputs": revision.detail.get("outputs").cloned().unwrap_or(Value::Null),
            "revision": revision,
        })))
    }

    async fn rollback(&self, cx: &StageContext, output: &StageOutput) -> Result<()> {
        let workspace = output
            .get_str("workspace")
            .map(str::to_string)
            .unwrap_or_else(|| cx.environment().to_string());
        let target = self.deployer.target(&workspace);
        self.deployer
            .rollback(&target, None, &cx.deploy_context())
            .await?;
        Ok(())
    }
}
