//! The Terraform deployer against the real terraform CLI (1.0.3 with the
//! null provider 2.1.2 from an offline filesystem mirror, both installed by
//! scripts/setup.sh). Each test works in its own copy of a fixture.
//!
//! Tool paths: `CD_TERRAFORM` and `TF_CLI_CONFIG_FILE` when set, else the
//! set-up script's `~/.cache/cd-tools`. A missing terraform fails the test
//! when `CI` or `CD_SETUP_DONE` is set, and skips it loudly otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cd_backends::terraform::{
    TerraformApplyStage, TerraformDeployer, TerraformDriftGate, TerraformPlan, TerraformPlanStage,
};
use cd_core::{
    ChangeAction, CollectingSink, DeployContext, Deployer, Emitter, ErrorKind, Event, EventKind,
    Gate, MemoryStore, Pipeline, Redactor, Release, RunStatus, Runner, StageContext, Verdict,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Tools {
    terraform: PathBuf,
    cli_config: Option<PathBuf>,
}

fn tools() -> Option<Tools> {
    let terraform = match std::env::var_os("CD_TERRAFORM").filter(|v| !v.is_empty()) {
        Some(p) => cd_testkit::require_tool(&PathBuf::from(p).to_string_lossy())?,
        None => cd_testkit::require_tool("terraform")?,
    };
    let cli_config = std::env::var_os("TF_CLI_CONFIG_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let p = cd_testkit::tools_dir()
                .join("terraform")
                .join("terraformrc");
            p.is_file().then_some(p)
        });
    Some(Tools {
        terraform,
        cli_config,
    })
}

fn fixture(name: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/terraform")
        .join(name);
    let dir = tempfile::Builder::new()
        .prefix(&format!("cd-tf-{name}-"))
        .tempdir()
        .unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

fn deployer(tools: &Tools, dir: &Path) -> TerraformDeployer {
    let mut d = TerraformDeployer::new(dir).binary(&tools.terraform);
    if let Some(cfg) = &tools.cli_config {
        d = d.cli_config(cfg);
    }
    d
}

fn context(env: &str) -> (DeployContext, CollectingSink) {
    let sink = CollectingSink::new();
    let emitter = Emitter::new("test", 1, vec![Arc::new(sink.clone())], Redactor::default());
    (
        DeployContext::new(emitter, CancellationToken::new(), env),
        sink,
    )
}

fn action_of(plan: &cd_core::Plan, address: &str) -> Option<ChangeAction> {
    plan.changes
        .iter()
        .find(|c| c.address == address)
        .map(|c| c.action)
}

fn progress<'a>(events: &'a [Event], target: &str) -> Vec<(&'a str, &'a str)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Progress {
                target: Some(t),
                step,
                status,
                ..
            } if t == target => Some((step.as_str(), status.as_str())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn plan_apply_outputs_replace_and_rollback() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let target = tf.target("default");
    let (cx, sink) = context("default");

    // v1: everything is created.
    let v1 = Release::new("v1").config("color", "blue").config("size", 1);
    let plan = tf.plan_in(&v1, &target, &cx).await.unwrap();
    assert_eq!(
        action_of(&plan, "null_resource.app"),
        Some(ChangeAction::Create)
    );
    assert_eq!(
        action_of(&plan, "null_resource.network"),
        Some(ChangeAction::Create)
    );
    assert_eq!(action_of(&plan, "output.color"), Some(ChangeAction::Create));
    let typed = TerraformPlan::from_plan(&plan).expect("typed plan in the plan detail");
    assert_eq!(typed.counts().add, 2);
    assert_eq!(typed.output_changes["color"].after, json!("blue"));
    assert!(
        tf.current(&target).await.unwrap().is_none(),
        "planning applied nothing"
    );

    let rev1 = tf.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev1.version, "v1");
    assert_eq!(rev1.detail["outputs"]["color"], json!("blue"));
    assert_eq!(rev1.detail["outputs"]["size"], json!(1));
    let app_id_v1 = rev1.detail["outputs"]["app_id"]
        .as_str()
        .unwrap()
        .to_string();
    let read_back = tf.outputs(&target, &cx).await.unwrap();
    assert_eq!(read_back["color"].value, json!("blue"));
    assert_eq!(read_back["app_id"].value, json!(app_id_v1));
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");

    // Per-resource progress events while applying.
    let events = sink.events();
    let app = progress(&events, "null_resource.app");
    assert!(app.contains(&("plan", "create")), "{app:?}");
    assert!(app.contains(&("create", "started")), "{app:?}");
    assert!(app.contains(&("create", "ok")), "{app:?}");
    assert!(events.iter().any(|e| matches!(&e.kind,
        EventKind::Log { message, .. } if message.contains("deploying app in blue"))));

    // Only an output changes: an update, no resource touched.
    let bigger = Release::new("v1.1")
        .config("color", "blue")
        .config("size", 2);
    let plan = tf.plan_in(&bigger, &target, &cx).await.unwrap();
    assert_eq!(action_of(&plan, "output.size"), Some(ChangeAction::Update));
    assert_eq!(
        action_of(&plan, "null_resource.app"),
        Some(ChangeAction::NoOp)
    );
    assert_eq!(action_of(&plan, "output.color"), Some(ChangeAction::NoOp));

    // v2 changes a trigger: the app is replaced, the network stays.
    let v2 = Release::new("v2")
        .config("color", "green")
        .config("size", 1);
    let plan = tf.plan_in(&v2, &target, &cx).await.unwrap();
    assert_eq!(
        action_of(&plan, "null_resource.app"),
        Some(ChangeAction::Replace)
    );
    assert_eq!(
        action_of(&plan, "null_resource.network"),
        Some(ChangeAction::NoOp)
    );
    assert_eq!(action_of(&plan, "output.color"), Some(ChangeAction::Update));
    let typed = TerraformPlan::from_plan(&plan).unwrap();
    assert!(typed.destroys_any(&["null_resource.app"]));
    assert!(!typed.destroys_any(&["null_resource.network"]));
    assert_eq!(
        typed
            .resource("null_resource.app")
            .unwrap()
            .action_reason
            .as_deref(),
        Some("replace_because_cannot_update")
    );
    let rev2 = tf.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev2.detail["outputs"]["color"], json!("green"));
    assert_ne!(rev2.detail["outputs"]["app_id"], json!(app_id_v1));

    // Rollback: v1's variables again.
    let back = tf.rollback(&target, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert_eq!(back.detail["outputs"]["color"], json!("blue"));
    assert_eq!(back.detail["outputs"]["size"], json!(1));
    let read_back = tf.outputs(&target, &cx).await.unwrap();
    assert_eq!(read_back["color"].value, json!("blue"));
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");

    // Redeploying the live release is a no-op.
    let again = Release::new("v1").config("color", "blue").config("size", 1);
    let plan = tf.plan_in(&again, &target, &cx).await.unwrap();
    assert!(plan.is_noop(), "{:?}", plan.changes);
    let rev = tf.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev.detail["outputs"]["color"], json!("blue"));

    // Rollback to a named revision.
    let to_v2 = tf
        .rollback(&target, Some(&rev2), &cx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(to_v2.detail["outputs"]["color"], json!("green"));
}

#[tokio::test]
async fn planning_leaves_the_state_file_unchanged() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let target = tf.target("default");
    let (cx, _) = context("default");
    let v1 = Release::new("v1").config("color", "blue");
    let plan = tf.plan_in(&v1, &target, &cx).await.unwrap();
    assert!(
        !dir.path().join("terraform.tfstate").exists(),
        "planning the first release wrote a state file"
    );
    tf.apply(&plan, &cx).await.unwrap();
    let state = dir.path().join("terraform.tfstate");
    let before = std::fs::read(&state).unwrap();
    let mtime = std::fs::metadata(&state).unwrap().modified().unwrap();

    let v2 = Release::new("v2").config("color", "red").config("size", 5);
    let plan = tf.plan_in(&v2, &target, &cx).await.unwrap();
    assert!(!plan.is_noop());
    let _ = tf
        .plan(&v2, &target, &cd::core::DeployContext::detached("test"))
        .await
        .unwrap();

    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "plan changed the state"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().modified().unwrap(),
        mtime
    );
    assert!(!dir.path().join("terraform.tfstate.backup").exists());
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");
}

#[tokio::test]
async fn syntax_error_names_file_and_line() {
    let Some(tools) = tools() else { return };
    let dir = fixture("syntax_error");
    let tf = deployer(&tools, dir.path());
    let err = tf
        .plan(
            &Release::new("v1"),
            &tf.target("default"),
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(err.context("file"), Some("main.tf"), "{err}");
    assert_eq!(err.context("line"), Some("6"), "{err}");
    assert_eq!(err.context("tool"), Some("terraform"), "{err}");
    assert!(err.message().contains("Invalid expression"), "{err}");
    assert!(
        err.context("detail")
            .unwrap_or_default()
            .contains("expression"),
        "{err}"
    );
}

#[tokio::test]
async fn failing_local_exec_names_the_resource_address() {
    let Some(tools) = tools() else { return };
    let dir = fixture("failing_provisioner");
    let tf = deployer(&tools, dir.path());
    let target = tf.target("default");
    let (cx, sink) = context("default");
    let plan = tf.plan_in(&Release::new("v1"), &target, &cx).await.unwrap();
    assert_eq!(
        action_of(&plan, "null_resource.migrate"),
        Some(ChangeAction::Create)
    );
    let err = tf.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    assert_eq!(
        err.context("address"),
        Some("null_resource.migrate"),
        "{err}"
    );
    assert_eq!(err.context("file"), Some("main.tf"), "{err}");
    assert_eq!(err.context("line"), Some("16"), "{err}");
    assert!(
        err.message().contains("local-exec provisioner error"),
        "{err}"
    );
    assert!(
        err.context("detail").unwrap().contains("exit status 3"),
        "{err}"
    );
    assert!(
        err.context("detail").unwrap().contains("migration failed"),
        "{err}"
    );
    let events = sink.events();
    assert!(progress(&events, "null_resource.fine").contains(&("create", "ok")));
    assert!(progress(&events, "null_resource.migrate").contains(&("create", "failed")));
    // Nothing was recorded as live.
    assert!(tf.current(&target).await.unwrap().is_none());
}

#[tokio::test]
async fn missing_binary_names_the_binary_and_the_setting() {
    let dir = fixture("app");
    let tf = TerraformDeployer::new(dir.path()).binary("/nonexistent/terraform-xyz");
    let err = tf
        .plan(
            &Release::new("v1"),
            &tf.target("default"),
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/terraform-xyz"), "{text}");
    assert!(text.contains("CD_TERRAFORM"), "{text}");
    assert!(text.contains("TerraformDeployer::binary"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

#[tokio::test]
async fn workspace_per_environment() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path()).workspaces(["staging", "production"]);
    assert_eq!(tf.targets().len(), 2);
    let (cx, _) = context("staging");
    let staging = tf.target("staging");
    let production = tf.target("production");
    // Plan both at once in the same directory.
    let s1 = Release::new("s1").config("color", "yellow");
    let p1 = Release::new("p1").config("color", "black");
    let (a, b) = tokio::join!(
        tf.plan_in(&s1, &staging, &cx),
        tf.plan_in(&p1, &production, &cx),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    tf.apply(&a, &cx).await.unwrap();
    tf.apply(&b, &cx).await.unwrap();
    assert_eq!(
        tf.outputs(&staging, &cx).await.unwrap()["color"].value,
        json!("yellow")
    );
    assert_eq!(
        tf.outputs(&production, &cx).await.unwrap()["color"].value,
        json!("black")
    );
    assert!(dir
        .path()
        .join("terraform.tfstate.d/staging/terraform.tfstate")
        .is_file());
    assert!(dir
        .path()
        .join("terraform.tfstate.d/production/terraform.tfstate")
        .is_file());
    assert_eq!(
        tf.current(&production).await.unwrap().unwrap().version,
        "p1"
    );
}

#[tokio::test]
async fn drift_gate_passes_then_fails_on_a_tainted_resource() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let target = tf.target("default");
    let (cx, _) = context("default");
    let v1 = Release::new("v1").config("color", "blue");
    let plan = tf.plan_in(&v1, &target, &cx).await.unwrap();
    tf.apply(&plan, &cx).await.unwrap();

    let gate = TerraformDriftGate::new(tf.clone(), target.clone());
    let scx = StageContext::detached("drift", v1.clone(), Arc::new(MemoryStore::new()));
    assert_eq!(gate.evaluate(&scx).await.unwrap(), Verdict::Pass);
    let refresh_only = TerraformDriftGate::new(tf.clone(), target.clone()).refresh_only();
    assert_eq!(refresh_only.evaluate(&scx).await.unwrap(), Verdict::Pass);

    // Someone taints the app outside the pipeline.
    let mut taint = std::process::Command::new(&tools.terraform);
    taint
        .arg("taint")
        .arg("null_resource.app")
        .current_dir(dir.path());
    if let Some(cfg) = &tools.cli_config {
        taint.env("TF_CLI_CONFIG_FILE", cfg);
    }
    assert!(taint.status().unwrap().success());
    match gate.evaluate(&scx).await.unwrap() {
        Verdict::Fail(reason) => assert!(reason.contains("null_resource.app"), "{reason}"),
        other => panic!("expected drift, got {other:?}"),
    }
}

#[tokio::test]
async fn lock_held_elsewhere_is_a_lock_error() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path()).lock_timeout(std::time::Duration::from_secs(1));
    let target = tf.target("default");
    let (cx, _) = context("default");
    let plan = tf.plan_in(&Release::new("v1"), &target, &cx).await.unwrap();
    tf.apply(&plan, &cx).await.unwrap();
    // Hold the state lock: a local backend locks the state file with fcntl;
    // an interactive `terraform console` holds it while it runs.
    let mut holder = std::process::Command::new(&tools.terraform);
    holder
        .arg("console")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(cfg) = &tools.cli_config {
        holder.env("TF_CLI_CONFIG_FILE", cfg);
    }
    let mut holder = holder.spawn().unwrap();
    // The local backend writes this file while it holds the lock.
    wait_for_file(&dir.path().join(".terraform.tfstate.lock.info")).await;
    let result = tf
        .plan_in(&Release::new("v2").config("color", "red"), &target, &cx)
        .await;
    let _ = holder.kill();
    let _ = holder.wait();
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn plan_stage_approval_and_apply_stage_in_a_pipeline() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let pipeline = Pipeline::builder("infra")
        .stage("plan", TerraformPlanStage::new(tf.clone()))
        .gate(
            "no-protected-deletes",
            cd_core::gate_fn(|cx| async move {
                let out = cx.require_output("plan")?;
                let plan: TerraformPlan =
                    serde_json::from_value(out.get("terraform_plan").cloned().unwrap_or_default())?;
                Ok(if plan.destroys_any(&["null_resource.network"]) {
                    Verdict::fail("the network would be destroyed")
                } else {
                    Verdict::Pass
                })
            }),
        )
        .needs(["plan"])
        .stage("apply", TerraformApplyStage::from_plan(tf.clone(), "plan"))
        .needs(["no-protected-deletes"])
        .build()
        .unwrap();
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .environment("default")
        .run(&pipeline, Release::new("v1").config("color", "blue"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let out = report.output("apply").unwrap();
    assert_eq!(out["outputs"]["color"], json!("blue"));
    let plan_out = report.output("plan").unwrap();
    assert_eq!(plan_out["counts"]["add"], json!(2));
}

#[tokio::test]
async fn deploy_stage_compensation_rolls_infrastructure_back() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let store = Arc::new(MemoryStore::new());
    let sink = CollectingSink::new();
    let runner = Runner::new(store.clone())
        .environment("default")
        .sink(sink.clone());

    let ok = Pipeline::builder("infra")
        .stage("infra", cd_stages::Deploy::new(tf.clone()))
        .build()
        .unwrap();
    let report = runner
        .run(&ok, Release::new("v1").config("color", "blue"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    // The generic Deploy stage plans through the trait (no event context):
    // the plan's events are recorded and emitted when the plan is applied.
    let events = sink.events();
    let app = progress(&events, "null_resource.app");
    assert!(app.contains(&("plan", "create")), "{app:?}");
    assert!(app.contains(&("create", "ok")), "{app:?}");

    // v2 goes out, then a later stage fails: the runner compensates and the
    // infrastructure is back on v1's variables.
    let failing = Pipeline::builder("infra")
        .stage("infra", cd_stages::Deploy::new(tf.clone()))
        .stage(
            "smoke",
            cd_core::stage_fn(|_| async { Err(cd_core::Error::failed("smoke test failed")) }),
        )
        .needs(["infra"])
        .build()
        .unwrap();
    let report = runner
        .run(&failing, Release::new("v2").config("color", "green"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let (cx, _) = context("default");
    let target = tf.target("default");
    assert_eq!(
        tf.outputs(&target, &cx).await.unwrap()["color"].value,
        json!("blue")
    );
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");
}

#[tokio::test]
async fn fast_plans_without_show_still_apply_output_only_changes() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path()).show_plan(false);
    let target = tf.target("default");
    let (cx, _) = context("default");
    let plan = tf
        .plan_in(&Release::new("v1").config("size", 1), &target, &cx)
        .await
        .unwrap();
    let typed = TerraformPlan::from_plan(&plan).unwrap();
    assert!(typed.partial);
    assert_eq!(
        action_of(&plan, "null_resource.app"),
        Some(ChangeAction::Create)
    );
    assert!(typed.output_changes.is_empty());
    tf.apply(&plan, &cx).await.unwrap();

    // Only an output changes: the partial plan cannot see it, apply runs anyway.
    let plan = tf
        .plan_in(&Release::new("v2").config("size", 2), &target, &cx)
        .await
        .unwrap();
    assert!(plan.changes.is_empty(), "{:?}", plan.changes);
    let rev = tf.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev.detail["outputs"]["size"], json!(2));
}

#[tokio::test]
async fn cancelling_an_apply_interrupts_terraform_and_releases_the_lock() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    // One operation at a time: the interrupt lands while worker 0 works;
    // terraform finishes it and starts nothing else.
    let tf = deployer(&tools, dir.path())
        .parallelism(1)
        .lock_timeout(std::time::Duration::from_secs(5));
    let target = tf.target("default");
    let (cx, sink) = context("default");
    let slow = Release::new("v1")
        .config("workers", 4)
        .config("work_seconds", 4);
    let plan = tf.plan_in(&slow, &target, &cx).await.unwrap();
    // Interrupt once the first worker's provisioner is under way (a
    // condition, not a guess at timing).
    let cancel = cx.cancel.clone();
    let watching = sink.clone();
    tokio::spawn(async move {
        loop {
            let events = watching.events();
            let working = (0..4).any(|i| {
                progress(&events, &format!("null_resource.worker[{i}]"))
                    .iter()
                    .any(|(step, _)| *step == "create")
            });
            if working {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        cancel.cancel();
    });
    let err = tf.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    // Terraform walks the workers in no fixed order: read which finished.
    let events = sink.events();
    let finished: Vec<usize> = (0..4)
        .filter(|i| {
            progress(&events, &format!("null_resource.worker[{i}]")).contains(&("create", "ok"))
        })
        .collect();
    assert!(
        finished.len() < 4,
        "all workers finished despite the interrupt: {finished:?}"
    );
    assert!(tf.current(&target).await.unwrap().is_none());
    // The state lock was released and the rest is still to do: finished
    // workers stay, the one interrupted mid-provisioner is tainted (replace),
    // the ones never started are created.
    let (cx, _) = context("default");
    let again = tf.plan_in(&slow, &target, &cx).await.unwrap();
    let mut replaced = 0;
    for i in 0..4 {
        let address = format!("null_resource.worker[{i}]");
        let action = action_of(&again, &address);
        if finished.contains(&i) {
            assert_eq!(action, None, "{address} finished but is planned again");
        } else {
            match action {
                Some(ChangeAction::Create) => {}
                Some(ChangeAction::Replace) => replaced += 1,
                other => panic!("{address} did not finish, yet its plan is {other:?}"),
            }
        }
    }
    assert!(
        replaced <= 1,
        "with parallelism 1 at most one worker was interrupted mid-way"
    );
}

#[tokio::test]
async fn rollback_reapplies_the_configuration_files_of_the_previous_release() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let (cx, _) = context("default");
    let v1 = deployer(&tools, dir.path());
    let target = v1.target("default");
    let plan = v1.plan_in(&Release::new("v1"), &target, &cx).await.unwrap();
    v1.apply(&plan, &cx).await.unwrap();

    // The next release also changes the configuration: a new resource and
    // a local module (the same deployer notices and runs init again).
    std::fs::create_dir_all(dir.path().join("modules/tag")).unwrap();
    std::fs::write(
        dir.path().join("modules/tag/main.tf"),
        "output \"name\" {\n  value = \"tag-v2\"\n}\n",
    )
    .unwrap();
    let extra = "resource \"null_resource\" \"cache\" {}\n\
                 module \"tag\" {\n  source = \"./modules/tag\"\n}\n\
                 output \"tag\" {\n  value = module.tag.name\n}\n";
    std::fs::write(dir.path().join("extra.tf"), extra).unwrap();
    let tf = v1;
    let plan = tf.plan_in(&Release::new("v2"), &target, &cx).await.unwrap();
    assert_eq!(
        action_of(&plan, "null_resource.cache"),
        Some(ChangeAction::Create)
    );
    let rev = tf.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev.detail["outputs"]["tag"], json!("tag-v2"));

    // The copies of the configuration are owner-only (`*.tfvars` may hold
    // secrets).
    {
        use std::os::unix::fs::PermissionsExt;
        let configs = dir.path().join(".terraform/cd/configs");
        let mode = std::fs::metadata(&configs).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", configs.display());
        assert_eq!(
            std::fs::read_dir(&configs).unwrap().count(),
            2,
            "one copy per configuration"
        );
    }

    // Rollback re-applies v1's files, not v1's variables on v2's files.
    let (cx, sink) = context("default");
    let back = tf.rollback(&target, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert!(
        back.detail["outputs"].get("tag").is_none(),
        "{}",
        back.detail
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("terraform.tfstate")).unwrap())
            .unwrap();
    let types: Vec<String> = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}.{}",
                r["type"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        !types.contains(&"null_resource.cache".to_string()),
        "{types:?}"
    );
    assert!(
        types.contains(&"null_resource.app".to_string()),
        "{types:?}"
    );
    let said: Vec<String> = sink.events().iter().map(|e| e.to_string()).collect();
    assert!(
        said.iter()
            .any(|l| l.contains("rolling back with the copy kept")),
        "{said:#?}"
    );
    // The user's files are untouched, and the next plan works from them
    // again (the deployer initialises its directory afresh).
    assert!(dir.path().join("extra.tf").is_file());
    let again = tf.plan_in(&Release::new("v2"), &target, &cx).await.unwrap();
    assert_eq!(
        action_of(&again, "null_resource.cache"),
        Some(ChangeAction::Create)
    );
    let history = tf.history(&target).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (last.version.as_str(), last.rollback_of.as_deref()),
        ("v1", Some("v2"))
    );
}

#[tokio::test]
async fn rolling_back_the_first_release_destroys_only_when_asked() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let target = tf.target("default");
    let (cx, _) = context("default");
    let plan = tf
        .plan_in(&Release::new("v1").config("workers", 2), &target, &cx)
        .await
        .unwrap();
    tf.apply(&plan, &cx).await.unwrap();

    let err = tf.rollback(&target, None, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");

    let tf = tf.destroy_when_no_previous(true);
    assert!(tf.rollback(&target, None, &cx).await.unwrap().is_none());
    assert!(tf.current(&target).await.unwrap().is_none());
    assert!(tf.outputs(&target, &cx).await.unwrap().is_empty());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("terraform.tfstate")).unwrap())
            .unwrap();
    assert_eq!(state["resources"], json!([]), "{state}");
}

/// Issue 8, case 2: a node timeout interrupts terraform's whole process
/// group (terraform and the provisioners it started), waits for it before
/// the node is reported, and does not retry the timed-out deploy by default.
/// After the run nothing of it is alive, no side effect appears later, and
/// the state lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_timeout_stops_terraform_and_its_provisioners_before_the_node_is_reported() {
    let Some(tools) = tools() else { return };
    let dir = fixture("hang");
    let tf = deployer(&tools, dir.path());
    // A value no other test uses: the provisioners' `sleep` is found by it.
    let seconds = format!("30.{}{}", std::process::id(), line!());
    let marker = dir.path().join("side-effect");
    let release = Release::new("v1")
        .config("marker", marker.display().to_string())
        .config("seconds", seconds.clone());
    let pipeline = Pipeline::builder("infra")
        .stage("apply", cd_stages::Deploy::new(tf).env("infra"))
        .timeout(std::time::Duration::from_secs(6))
        .build()
        .unwrap();
    // Default retries (2): a timed-out deploy is still not retried.
    let runner = Runner::new(Arc::new(MemoryStore::new())).environment("infra");
    let run = tokio::spawn(async move { runner.run(&pipeline, release).await });
    // The provisioners must be running when the timeout fires.
    let needle = format!("sleep {seconds}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while cd_testkit::processes_matching(&needle).is_empty() {
        assert!(
            std::time::Instant::now() < end,
            "the provisioners never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let node = report.node("apply").unwrap();
    assert_eq!(node.attempts, 1, "a timed-out deploy is not retried");
    assert_eq!(node.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    // Nothing of terraform is left when the report is given: no
    // provisioner, no terraform (checked at once, not after a while).
    let sleeping = cd_testkit::processes_matching(&needle);
    assert!(
        sleeping.is_empty(),
        "provisioners still alive: {sleeping:?}"
    );
    let dir_name = dir.path().display().to_string();
    let terraform_left: Vec<_> = cd_testkit::processes_matching("terraform")
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.display().to_string().starts_with(&dir_name))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        terraform_left.is_empty(),
        "terraform still alive: {terraform_left:?}"
    );
    assert!(
        !dir.path().join(".terraform.tfstate.lock.info").exists(),
        "the state lock was left behind"
    );
    let effects: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("side-effect"))
        .collect();
    assert!(
        effects.is_empty(),
        "a provisioner finished after the run failed"
    );
}

/// The deployer conformance suite against real terraform: two workspaces
/// as targets, rollback with and without a revision, rolling back a first
/// release (destroy), both workspaces at once, an apply cancelled while its
/// provisioners work, and re-applying after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_deployer_passes_the_conformance_suite() {
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path())
        .workspaces(["blue", "green"])
        .destroy_when_no_previous(true);
    let (cx, _) = context("conformance");
    // `v3-slow` adds two workers whose provisioners work 4 s: the cancel
    // lands while they do.
    let slow = Release::new("v3-slow")
        .config("workers", 2)
        .config("work_seconds", 4);
    let report = cd_core::conformance::Conformance::new(
        &tf,
        Release::new("v1").config("color", "blue"),
        Release::new("v2").config("color", "green"),
    )
    .cancel_mid_apply(slow, std::time::Duration::from_millis(1500))
    .context(cx)
    .run()
    .await
    .unwrap();
    // Every check but the crash-after-each-step one, which costs several
    // real applies per step (run for the local and SSH deployers).
    assert_eq!(
        report.skipped,
        ["crash after each step: not asked for"],
        "{report:?}"
    );
    assert_eq!(report.cancel_landed_mid_apply, Some(true), "{report:?}");
    assert_eq!(report.passed.len(), 10, "{report:?}");
    assert!(!dir.path().join(".terraform.tfstate.lock.info").exists());
}

/// Waits (up to a minute) for `path` to exist.
async fn wait_for_file(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Issue 10, case 1: a release secret reaches terraform (as `TF_VAR_*`) and
/// no file holds it afterwards — not the variable files, saved plans, the
/// release history, the state, nor the SQLite store and its `-wal` — after a
/// success, a failed apply (and its rollback), a cancelled apply and a plan
/// that changes nothing. A deployer in a new process cannot roll back to a
/// release whose secret it never saw, and says which secret it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_terraform_and_no_file_keeps_them() {
    use sha2::Digest;
    let Some(tools) = tools() else { return };
    let dir = fixture("secret");
    let work = dir.path();
    let out = work.join("got");
    const PW: &str = "pa\"ss-w0rd-7f3c";
    let json_pw = serde_json::to_string(PW).unwrap();
    let json_pw = &json_pw[1..json_pw.len() - 1];
    let store: Arc<dyn cd_core::Store> = Arc::new(
        cd_backends::sqlite::SqliteStore::open(work.join("state.db"))
            .await
            .unwrap(),
    );
    let tf = deployer(&tools, work).store(store.clone(), "secret-app");
    let target = tf.target("default");
    let release = |v: &str| {
        Release::new(v)
            .config("release", v)
            .config("out", out.to_str().unwrap())
            .secret("db_password", cd_core::Secret::new(PW.to_string()))
    };
    let runner = Runner::new(store.clone()).environment("default");
    let deploy = Pipeline::builder("infra")
        .stage("infra", cd_stages::Deploy::new(tf.clone()))
        .build()
        .unwrap();

    // Success.
    let report = runner.run(&deploy, release("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let want = hex::encode(sha2::Sha256::digest(PW.as_bytes()));
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), want);

    // A plan that changes nothing keeps no plan file.
    let (cx, _) = context("default");
    let noop = tf.plan_in(&release("v1"), &target, &cx).await.unwrap();
    assert!(noop.is_noop(), "{:?}", noop.changes);
    let plan_file = noop.detail["plan_file"].as_str().unwrap();
    assert!(
        !Path::new(plan_file).exists(),
        "a no-op plan kept {plan_file}"
    );

    // A failed apply, rolled back by the strategy with the secret it kept
    // in memory.
    let report = runner
        .run(&deploy, release("v2").config("fail", true))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(tf.current(&target).await.unwrap().unwrap().version, "v1");

    // A cancelled apply.
    let (cx, _) = context("default");
    let plan = tf
        .plan_in(&release("v3").config("sleep_seconds", 30), &target, &cx)
        .await
        .unwrap();
    let started = out.with_extension("started");
    let _ = std::fs::remove_file(&started);
    let cancel = cx.cancel.clone();
    let apply = tokio::spawn({
        let tf = tf.clone();
        async move { tf.apply(&plan, &cx).await }
    });
    wait_for_file(&started).await;
    cancel.cancel();
    let err = apply.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");

    drop(runner);
    for needle in [PW, json_pw] {
        let found = cd_testkit::files_holding(work, needle, &["providers"]);
        assert!(found.is_empty(), "{needle:?} is in {found:?}");
    }

    // A new process knows the secret's name only.
    let fresh = deployer(&tools, work).store(store.clone(), "secret-app");
    let (cx, _) = context("default");
    let live = fresh.current(&target).await.unwrap().unwrap();
    assert_eq!(live.version, "v1");
    let err = fresh.rollback(&target, Some(&live), &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("`db_password`"), "{err}");
    let fresh = fresh.secret_var("db_password", cd_core::Secret::new(PW.to_string()));
    fresh.rollback(&target, Some(&live), &cx).await.unwrap();
    let found = cd_testkit::files_holding(work, PW, &["providers"]);
    assert!(found.is_empty(), "{PW:?} is in {found:?}");
}

/// Issue 10, one home for durable state: two deployers in different working
/// directories (two machines), sharing one state backend and one SQLite
/// store, agree on what is live and roll back to the same release.
#[tokio::test]
async fn two_machines_sharing_a_store_agree_on_current_and_rollback() {
    let Some(tools) = tools() else { return };
    let shared = tempfile::tempdir().unwrap();
    let machines = [fixture("app"), fixture("app")];
    for m in &machines {
        std::fs::write(
            m.path().join("backend.tf"),
            format!(
                "terraform {{\n  backend \"local\" {{\n    path = \"{}\"\n  }}\n}}\n",
                shared.path().join("terraform.tfstate").display()
            ),
        )
        .unwrap();
    }
    let store: Arc<dyn cd_core::Store> = Arc::new(
        cd_backends::sqlite::SqliteStore::open(shared.path().join("state.db"))
            .await
            .unwrap(),
    );
    let a = deployer(&tools, machines[0].path()).store(store.clone(), "app");
    let b = deployer(&tools, machines[1].path()).store(store.clone(), "app");
    let target = a.target("default");
    let (cx, _) = context("default");

    let plan = a
        .plan_in(&Release::new("v1").config("color", "blue"), &target, &cx)
        .await
        .unwrap();
    a.apply(&plan, &cx).await.unwrap();
    let plan = b
        .plan_in(&Release::new("v2").config("color", "green"), &target, &cx)
        .await
        .unwrap();
    b.apply(&plan, &cx).await.unwrap();
    for d in [&a, &b] {
        assert_eq!(d.current(&target).await.unwrap().unwrap().version, "v2");
    }

    // Machine A rolls back what machine B applied: to v1, with v1's
    // variables, and B sees it.
    let back = a.rollback(&target, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert_eq!(
        b.outputs(&target, &cx).await.unwrap()["color"].value,
        json!("blue")
    );
    for d in [&a, &b] {
        assert_eq!(d.current(&target).await.unwrap().unwrap().version, "v1");
        assert_eq!(d.history(&target).await.unwrap().len(), 3);
    }
    // Nothing of the history was written to the machines' own directories.
    for m in &machines {
        assert!(!m.path().join(".terraform/cd/history").exists());
    }
}

#[tokio::test]
async fn policy_gate_denies_a_real_plan_that_deletes_a_protected_resource() {
    use cd_stages::compliance::policy::{Policy, PolicyGate};
    let Some(tools) = tools() else { return };
    let dir = fixture("app");
    let tf = deployer(&tools, dir.path());
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policy = Policy::new()
        .file(policies.join("terraform_protected.rego"))
        .unwrap()
        .data(json!({"policy_config": {"protected_resource_types": ["null_resource"]}}))
        .unwrap();
    let pipeline = Pipeline::builder("infra")
        .stage("plan", TerraformPlanStage::new(tf.clone()))
        .gate("policy", PolicyGate::new(policy))
        .needs(["plan"])
        .stage("apply", TerraformApplyStage::from_plan(tf.clone(), "plan"))
        .needs(["policy"])
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let runner = Runner::new(store.clone()).environment("default");

    // v1 creates everything (nothing destroyed): allowed and applied.
    let v1 = Release::new("v1")
        .config("color", "blue")
        .config("workers", 1);
    let report = runner.run(&pipeline, v1).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");

    // v2 drops the worker: terraform plans a delete, the policy denies it,
    // nothing is applied.
    let v2 = Release::new("v2")
        .config("color", "blue")
        .config("workers", 0);
    let report = runner.run(&pipeline, v2).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let reason = report
        .node("policy")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message
        .clone();
    assert!(
        reason.contains(
            "cd.terraform: null_resource.worker[0] would be deleted: null_resource is a protected resource type"
        ),
        "{reason}"
    );
    assert_eq!(
        report.node("apply").unwrap().status,
        cd_core::NodeStatus::Skipped
    );
    let outputs = tf
        .outputs(&tf.target("default"), &context("default").0)
        .await
        .unwrap();
    assert_eq!(outputs["color"].value, json!("blue"));
    let state = std::process::Command::new(&tools.terraform)
        .args(["state", "list"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&state.stdout);
    assert!(listed.contains("null_resource.worker[0]"), "{listed}");

    // v3 only changes an output: allowed.
    let v3 = Release::new("v3")
        .config("color", "blue")
        .config("workers", 1)
        .config("size", 3);
    let report = runner.run(&pipeline, v3).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
}
