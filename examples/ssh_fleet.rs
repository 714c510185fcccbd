//! Deploys to a fleet of real OpenSSH sshd hosts on loopback addresses
//! (cd-testkit's `SshFleet`) with a rolling strategy, then rolls back.
//!
//! ```text
//! cargo run --release --example ssh_fleet --features ssh -- [hosts]
//! ```
//!
//! Needs `sshd` and `ssh-keygen` (Debian packages openssh-server and
//! openssh-client; `scripts/setup.sh` installs them).

use std::sync::Arc;
use std::time::Instant;

use cd::backends::ssh::{SshDeployer, SshHost};
use cd::core::{
    DeployContext, Deployer, Emitter, Event, EventKind, FnSink, Redactor, Release, Rolling,
    Strategy,
};
use cd_testkit::SshFleet;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hosts: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);

    // K real sshd processes on 127.0.0.2 ... 127.0.0.(K+1).
    let Some(fleet) = SshFleet::start_or_skip(hosts).await? else {
        return Ok(());
    };
    println!(
        "started {} sshd hosts in {}",
        fleet.len(),
        fleet.dir().display()
    );

    let mut builder = SshDeployer::builder()
        .user(fleet.user())
        .key_file(fleet.user_key_path())
        .known_hosts(fleet.known_hosts_path())
        .restart("printf '%s' \"$CD_VERSION\" > \"$CD_ROOT/restarted\"")
        .health_command("test \"$(cat \"$CD_ROOT/restarted\")\" = \"$CD_VERSION\"")
        .keep_releases(3);
    for h in fleet.hosts() {
        let root = h.root.join("app").display().to_string();
        builder = builder.host(SshHost::new(&h.name, &h.ip, h.port).root(root));
    }
    let deployer = builder.build()?;

    // Print each step of each host as it ends.
    let sink = FnSink(|e: &Event| match &e.kind {
        EventKind::Progress { status, .. } if status != "started" => println!("  {e}"),
        EventKind::Rollout { .. } => println!("{e}"),
        _ => {}
    });
    let cx = DeployContext::new(
        Emitter::new("example", 1, vec![Arc::new(sink)], Redactor::default()),
        CancellationToken::new(),
        "example",
    );

    let work = tempfile::tempdir()?;
    let targets = deployer.targets();
    let rolling = Rolling::new().batch_size(hosts.div_ceil(2)).max_failures(0);
    let mut last = None;
    for version in ["v1", "v2"] {
        let artifact = work.path().join(format!("app-{version}.tar"));
        std::fs::write(&artifact, format!("the {version} build\n").repeat(50_000))?;
        let release = Release::new(version).artifact(&artifact);
        let t = Instant::now();
        let report = rolling.deploy(&deployer, &release, &targets, &cx).await?;
        println!(
            "{version}: {} hosts in {:.2} s",
            report.deployed.len(),
            t.elapsed().as_secs_f64()
        );
        last = Some(report);
    }

    let t = Instant::now();
    rolling.rollback(&deployer, &last.unwrap(), &cx).await?;
    println!("rolled back in {:.2} s", t.elapsed().as_secs_f64());
    for target in &targets {
        let rev = deployer.current(target).await?.expect("a release is live");
        println!("{}: {} ({})", target.name, rev.version, rev.id);
    }
    Ok(())
}
