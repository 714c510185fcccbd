//! Infrastructure as a release: a Terraform configuration (null resources
//! with local-exec provisioners and outputs) planned, looked at, applied,
//! changed and rolled back — first with the deployer directly, then as a
//! pipeline (plan node → policy gate on the typed plan → apply node).
//!
//! Needs terraform and the null provider as `scripts/setup.sh` installs them
//! (`CD_TERRAFORM` / `TF_CLI_CONFIG_FILE`, else `~/.cache/cd-tools`).
//!
//! Run: `cargo run --example terraform_infra --features terraform`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cd_backends::terraform::{
    TerraformApplyStage, TerraformDeployer, TerraformPlan, TerraformPlanStage,
};
use cd_core::{
    gate_fn, DeployContext, Deployer, Emitter, Event, EventKind, FnSink, MemoryStore, Pipeline,
    Plan, Redactor, Release, Runner, Verdict,
};
use tokio_util::sync::CancellationToken;

fn show(plan: &Plan) {
    println!("plan for {}:", plan.release.version);
    for c in &plan.changes {
        println!("  {:>8}  {}", c.action.to_string(), c.address);
    }
    if let Some(tp) = TerraformPlan::from_plan(plan) {
        let n = tp.counts();
        println!(
            "  = {} to add, {} to change, {} to destroy",
            n.add, n.change, n.destroy
        );
    }
}

fn print_event(e: &Event) {
    match &e.kind {
        EventKind::Progress {
            target: Some(t),
            step,
            status,
            ..
        } if t.contains('.') && step != "plan" => println!("    {t}: {step} {status}"),
        EventKind::Log { message, .. } if message.contains("(local-exec): ") => {
            println!("    {message}")
        }
        _ => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let terraform = std::env::var_os("CD_TERRAFORM")
        .map(PathBuf::from)
        .or_else(|| cd_testkit::find_tool("terraform"))
        .ok_or_else(|| anyhow::anyhow!("terraform not found: run scripts/setup.sh"))?;
    let cli_config = std::env::var_os("TF_CLI_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| {
            let p = cd_testkit::tools_dir().join("terraform/terraformrc");
            p.is_file().then_some(p)
        });

    // A scratch copy of the configuration (state files land next to it).
    let work = tempfile::Builder::new()
        .prefix("cd-tf-example-")
        .tempdir()?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/terraform/app");
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), work.path().join(entry.file_name()))?;
    }

    let mut infra = TerraformDeployer::new(work.path()).binary(&terraform);
    if let Some(cfg) = &cli_config {
        infra = infra.cli_config(cfg);
    }
    let target = infra.target("default");
    let emitter = Emitter::new(
        "example",
        1,
        vec![Arc::new(FnSink(print_event))],
        Redactor::default(),
    );
    let cx = DeployContext::new(emitter, CancellationToken::new(), "default");

    // v1: everything is created.
    let v1 = Release::new("v1")
        .config("color", "blue")
        .config("workers", 2);
    let plan = infra.plan_in(&v1, &target, &cx).await?;
    show(&plan);
    let rev = infra.apply(&plan, &cx).await?;
    println!("applied v1, outputs: {}", rev.detail["outputs"]);

    // v2 changes a trigger: the app and the workers are replaced.
    let v2 = Release::new("v2")
        .config("color", "green")
        .config("workers", 2);
    let plan = infra.plan_in(&v2, &target, &cx).await?;
    show(&plan);
    let rev = infra.apply(&plan, &cx).await?;
    println!("applied v2, outputs: {}", rev.detail["outputs"]);

    // Rollback re-applies v1's variables.
    let back = infra
        .rollback(&target, None, &cx)
        .await?
        .expect("v1 is live again");
    println!(
        "rolled back to {}, outputs: {}",
        back.version, back.detail["outputs"]
    );

    // The same as a pipeline: plan, a policy on the typed plan, apply.
    let pipeline = Pipeline::builder("infra")
        .stage("plan", TerraformPlanStage::new(infra.clone()))
        .gate(
            "keep-the-network",
            gate_fn(|cx| async move {
                let out = cx.require_output("plan")?;
                let plan: TerraformPlan =
                    serde_json::from_value(out.get("terraform_plan").cloned().unwrap_or_default())?;
                Ok(if plan.destroys_any(&["null_resource.network"]) {
                    Verdict::fail("the plan destroys the network")
                } else {
                    Verdict::Pass
                })
            }),
        )
        .needs(["plan"])
        .stage(
            "apply",
            TerraformApplyStage::from_plan(infra.clone(), "plan"),
        )
        .needs(["keep-the-network"])
        .build()?;
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .environment("default")
        .run(
            &pipeline,
            Release::new("v3")
                .config("color", "red")
                .config("workers", 1),
        )
        .await?;
    println!("{report}");
    println!(
        "pipeline outputs: {}",
        report
            .output("apply")
            .map(|o| o["outputs"].clone())
            .unwrap_or_default()
    );
    Ok(())
}
