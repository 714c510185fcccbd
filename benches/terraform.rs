//! Terraform deployer vs the raw terraform CLI, same configuration, same run.
//!
//! Each round applies a new release to an already-initialised copy of
//! `tests/fixtures/terraform/app` (the app and every worker are replaced):
//!
//! - **cd**: `TerraformDeployer::plan_in` (`terraform plan -out -json`,
//!   streamed into events, then `terraform show -json` into the typed plan)
//!   and `TerraformDeployer::apply` (`terraform apply -json <planfile>`);
//! - **raw**: `terraform plan -input=false -out=<file> -var ...` then
//!   `terraform apply -input=false <file>`.
//!
//! - **raw + show** (context only): the raw CLI plus the `terraform show
//!   -json` it needs to hand an approver the same machine-readable plan.
//!
//! - **cd without show** (context only): the deployer with
//!   `show_plan(false)`.
//!
//! Rounds alternate between cd and raw to spread machine noise. Settings (env):
//! `CD_BENCH_TF_ROUNDS` (default 7), `CD_BENCH_TF_WORKERS` (default 10),
//! `CD_BENCH_TF_WORK_SECONDS` (seconds each worker's provisioner works,
//! default 0). Prints one line per round and, last, the medians:
//! `bench terraform: cd_s=<x> raw_s=<y> ratio=<x/y>`.
//!
//! Run: `cargo bench --features terraform --bench terraform`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_backends::terraform::TerraformDeployer;
use cd_core::{DeployContext, Deployer, Emitter, Event, EventSink, Redactor, Release};
use tokio_util::sync::CancellationToken;

struct CountingSink(AtomicU64);

impl EventSink for CountingSink {
    fn emit(&self, _event: &Event) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn copy_fixture(into: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/terraform/app");
    std::fs::create_dir_all(into).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), into.join(entry.file_name())).unwrap();
        }
    }
}

fn terraform(
    bin: &Path,
    cfg: &Option<PathBuf>,
    dir: &Path,
    args: &[String],
) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(dir).env("TF_IN_AUTOMATION", "1");
    if let Some(c) = cfg {
        cmd.env("TF_CLI_CONFIG_FILE", c);
    }
    let out = cmd.output().expect("run terraform");
    assert!(
        out.status.success(),
        "terraform {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let terraform_bin = match std::env::var_os("CD_TERRAFORM").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match cd_testkit::require_tool("terraform") {
            Some(p) => p,
            None => return,
        },
    };
    let cli_config = std::env::var_os("TF_CLI_CONFIG_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let p = cd_testkit::tools_dir().join("terraform/terraformrc");
            p.is_file().then_some(p)
        });
    let rounds = env_num("CD_BENCH_TF_ROUNDS", 7.0) as usize;
    let workers = env_num("CD_BENCH_TF_WORKERS", 10.0) as u64;
    let work_seconds = env_num("CD_BENCH_TF_WORK_SECONDS", 0.0);

    let tmp = tempfile::Builder::new()
        .prefix("cd-bench-tf-")
        .tempdir()
        .unwrap();
    let cd_dir = tmp.path().join("cd");
    let raw_dir = tmp.path().join("raw");
    copy_fixture(&cd_dir);
    copy_fixture(&raw_dir);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut tf = TerraformDeployer::new(&cd_dir).binary(&terraform_bin);
    if let Some(c) = &cli_config {
        tf = tf.cli_config(c);
    }
    let target = tf.target("default");
    // Context: the same deployer with `show_plan(false)` (typed plan from
    // the streamed plan lines only; no `terraform show -json`).
    let fast_dir = tmp.path().join("cd_fast");
    copy_fixture(&fast_dir);
    let mut fast = TerraformDeployer::new(&fast_dir)
        .binary(&terraform_bin)
        .show_plan(false);
    if let Some(c) = &cli_config {
        fast = fast.cli_config(c);
    }
    let sink = Arc::new(CountingSink(AtomicU64::new(0)));
    let emitter = Emitter::new(
        "bench",
        1,
        vec![sink.clone() as Arc<dyn EventSink>],
        Redactor::default(),
    );
    let cx = DeployContext::new(emitter, CancellationToken::new(), "bench");

    let release = |color: &str| {
        Release::new(format!("r-{color}"))
            .config("color", color)
            .config("workers", workers)
            .config("work_seconds", work_seconds)
    };
    let raw_round = |color: &str, show: bool| {
        let vars = [
            format!("-var=color={color}"),
            format!("-var=workers={workers}"),
            format!("-var=work_seconds={work_seconds}"),
        ];
        let mut plan = vec![
            "plan".to_string(),
            "-input=false".into(),
            "-out=raw.tfplan".into(),
        ];
        plan.extend(vars);
        terraform(&terraform_bin, &cli_config, &raw_dir, &plan);
        if show {
            // What the raw CLI needs to give an approver the same typed plan.
            terraform(
                &terraform_bin,
                &cli_config,
                &raw_dir,
                &["show".into(), "-json".into(), "raw.tfplan".into()],
            );
        }
        terraform(
            &terraform_bin,
            &cli_config,
            &raw_dir,
            &["apply".into(), "-input=false".into(), "raw.tfplan".into()],
        );
    };

    // Untimed: init both, create everything once.
    terraform(
        &terraform_bin,
        &cli_config,
        &raw_dir,
        &["init".into(), "-input=false".into()],
    );
    raw_round("warmup", false);
    rt.block_on(async {
        let plan = tf.plan_in(&release("warmup"), &target, &cx).await.unwrap();
        tf.apply(&plan, &cx).await.unwrap();
        let plan = fast
            .plan_in(&release("warmup"), &target, &cx)
            .await
            .unwrap();
        fast.apply(&plan, &cx).await.unwrap();
    });

    println!(
        "terraform bench: {rounds} rounds, {} resources replaced per round, provisioners work {work_seconds} s",
        workers + 1
    );
    let mut cd_times = Vec::new();
    let mut raw_times = Vec::new();
    let mut raw_show_times = Vec::new();
    let mut fast_times = Vec::new();
    for i in 0..rounds {
        let color = format!("c{i}");
        let run_cd = || {
            let t = Instant::now();
            rt.block_on(async {
                let plan = tf.plan_in(&release(&color), &target, &cx).await.unwrap();
                assert!(!plan.is_noop());
                tf.apply(&plan, &cx).await.unwrap();
            });
            t.elapsed()
        };
        let run_raw = || {
            let t = Instant::now();
            raw_round(&color, false);
            t.elapsed()
        };
        let run_raw_show = || {
            let t = Instant::now();
            raw_round(&format!("{color}s"), true);
            t.elapsed()
        };
        // Alternate which goes first.
        let (cd, raw): (Duration, Duration) = if i % 2 == 0 {
            let a = run_cd();
            (a, run_raw())
        } else {
            let b = run_raw();
            (run_cd(), b)
        };
        let raw_show = run_raw_show();
        let t = Instant::now();
        rt.block_on(async {
            let plan = fast.plan_in(&release(&color), &target, &cx).await.unwrap();
            fast.apply(&plan, &cx).await.unwrap();
        });
        let cd_fast = t.elapsed();
        println!(
            "round {i}: cd_s={:.3} raw_s={:.3} raw_with_show_s={:.3} cd_without_show_s={:.3}",
            cd.as_secs_f64(),
            raw.as_secs_f64(),
            raw_show.as_secs_f64(),
            cd_fast.as_secs_f64()
        );
        fast_times.push(cd_fast.as_secs_f64());
        cd_times.push(cd.as_secs_f64());
        raw_times.push(raw.as_secs_f64());
        raw_show_times.push(raw_show.as_secs_f64());
    }
    let cd = median(&mut cd_times);
    let raw = median(&mut raw_times);
    let raw_show = median(&mut raw_show_times);
    println!(
        "context: raw CLI plus `terraform show -json` (the typed plan cd also produces): \
         raw_with_show_s={raw_show:.3} cd/raw_with_show={:.3}",
        cd / raw_show
    );
    let fast_s = median(&mut fast_times);
    println!(
        "context: cd with show_plan(false) (partial typed plan, no `show -json`): \
         cd_without_show_s={fast_s:.3} ratio_vs_raw={:.3}",
        fast_s / raw
    );
    println!("events emitted by cd: {}", sink.0.load(Ordering::Relaxed));
    println!(
        "bench terraform: cd_s={cd:.3} raw_s={raw:.3} ratio={:.3}",
        cd / raw
    );
}
