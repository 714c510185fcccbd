//! A playbook against real hosts: three fixture sshd hosts on 127.0.0.2-4
//! (cd-testkit's SshFleet), an inventory generated from them, `--check
//! --diff` as the plan, per-host task events as it applies, then a second
//! release and a rollback.
//!
//! Needs ansible-playbook and sshd as `scripts/setup.sh` installs them
//! (`CD_ANSIBLE_PLAYBOOK`, else `~/.cache/cd-tools/venv/bin`).
//!
//! Run: `cargo run --example ansible_hosts --features ansible`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cd_backends::ansible::{AnsibleDeployer, AnsibleHost};
use cd_core::{DeployContext, Deployer, Emitter, Event, EventKind, FnSink, Redactor, Release};
use cd_testkit::SshFleet;
use tokio_util::sync::CancellationToken;

fn print_event(e: &Event) {
    if let EventKind::Progress {
        target: Some(host),
        step,
        status,
        duration_ms,
        message,
    } = &e.kind
    {
        if status == "started" {
            return;
        }
        let ms = duration_ms
            .map(|d| format!(" ({d} ms)"))
            .unwrap_or_default();
        let msg = message
            .as_ref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        println!("  {host:<6} {step:<28} {status}{ms}{msg}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let playbook_bin = std::env::var_os("CD_ANSIBLE_PLAYBOOK")
        .map(PathBuf::from)
        .or_else(|| cd_testkit::find_tool("ansible-playbook"))
        .ok_or_else(|| anyhow::anyhow!("ansible-playbook not found: run scripts/setup.sh"))?;
    let fleet = SshFleet::start(3).await?;
    let state = tempfile::tempdir()?;
    let playbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ansible");
    // The fixture hosts are this machine: use its system Python.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".to_string()
    } else {
        cd_testkit::tools_dir()
            .join("venv/bin/python")
            .display()
            .to_string()
    };

    let mut ansible = AnsibleDeployer::new(playbooks.join("site.yml"))
        .binary(playbook_bin)
        .known_hosts(fleet.known_hosts_path())
        .python_interpreter(python)
        .pipelining(true)
        .state_dir(state.path());
    for h in fleet.hosts() {
        ansible = ansible.host(
            AnsibleHost::new(&h.name)
                .address(&h.ip)
                .port(h.port)
                .user(fleet.user())
                .key_file(fleet.user_key_path())
                .groups(["web"])
                .var("host_root", h.root.display().to_string()),
        );
    }
    let web = ansible.group_target("web");
    let emitter = Emitter::new(
        "example",
        1,
        vec![Arc::new(FnSink(print_event))],
        Redactor::default(),
    );
    let cx = DeployContext::new(emitter, CancellationToken::new(), "production");

    for (version, color) in [("v1", "blue"), ("v2", "green")] {
        let release = Release::new(version).config("color", color);
        println!("--check --diff for {version}:");
        let plan = ansible.plan_in(&release, &web, &cx).await?;
        let would: Vec<_> = plan
            .changes
            .iter()
            .filter(|c| c.action != cd_core::ChangeAction::NoOp)
            .map(|c| c.address.clone())
            .collect();
        println!("would change: {would:?}");
        println!("apply {version}:");
        ansible.apply(&plan, &cx).await?;
    }
    println!("rollback:");
    let back = ansible.rollback(&web, None, &cx).await?;
    println!(
        "live: {}",
        back.map(|r| r.version).unwrap_or_else(|| "nothing".into())
    );
    for h in fleet.hosts() {
        println!(
            "{} config: {}",
            h.name,
            std::fs::read_to_string(h.root.join("app/config.json"))?.trim()
        );
    }
    Ok(())
}
