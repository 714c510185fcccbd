//! SSH fleet benchmark: deploy a 1 MiB artifact (upload, checksum, switch,
//! restart, health check) to 10 and to 50 real sshd hosts on loopback
//! addresses (cd-testkit's `SshFleet`), with
//!
//! - cd's `SshDeployer` (a rolling strategy with one batch of all hosts; a
//!   child process, so its peak RSS is measured alone; fresh connections
//!   every round),
//! - ansible-playbook (`benches/ansible/ssh_fleet.yml`, pipelining on,
//!   forks = hosts, no fact gathering),
//! - a shell script running OpenSSH `ssh` to all hosts in parallel, one
//!   connection per host carrying all steps (`benches/ssh_fleet_openssh.sh`).
//!
//! Every run is checked on disk (each host's `current` and restart marker).
//!
//! Run: `cargo bench --bench ssh_fleet --features ssh`. Environment:
//! `SSH_FLEET_SIZES` (default `10,50`), `SSH_FLEET_ROUNDS` (cd and OpenSSH
//! rounds, median reported; default 5), `SSH_FLEET_ANSIBLE_ROUNDS` (default
//! 1). Last line per fleet size:
//! `bench ssh_fleet: hosts=<n> cd_s=<x> ansible_s=<y> openssh_s=<z> vs_ansible=<y/x> vs_openssh=<x/z> peak_rss_mib=<m>`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cd::backends::ssh::{SshDeployer, SshHost};
use cd::core::{DeployContext, Deployer, Release, Rolling, Strategy};
use cd_testkit::SshFleet;
use serde_json::{json, Value};

const CHILD_ENV: &str = "CD_SSH_BENCH_CHILD";
const ARTIFACT_BYTES: usize = 1 << 20;
const RESTART: &str = "printf '%s' \"$CD_VERSION\" > \"$CD_ROOT/restarted\"";
const HEALTH: &str = "test \"$(cat \"$CD_ROOT/restarted\")\" = \"$CD_VERSION\"";

fn main() -> Result<()> {
    if let Ok(config) = std::env::var(CHILD_ENV) {
        return child(&config);
    }
    let sizes: Vec<usize> = std::env::var("SSH_FLEET_SIZES")
        .unwrap_or_else(|_| "10,50".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("SSH_FLEET_SIZES")?;
    let rounds = env_usize("SSH_FLEET_ROUNDS", 5).max(1);
    let ansible_rounds = env_usize("SSH_FLEET_ANSIBLE_ROUNDS", 1);
    if cd_testkit::require_tool("sshd").is_none() || cd_testkit::require_tool("ssh").is_none() {
        return Ok(());
    }
    let ansible = cd_testkit::require_tool("ansible-playbook");
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");

    let mut lines = Vec::new();
    for n in sizes {
        let fleet = SshFleet::start_blocking(n)?;
        let work = tempfile::tempdir()?;
        let artifact = work.path().join("app.bin");
        std::fs::write(&artifact, pseudo_random(ARTIFACT_BYTES, n as u64))?;
        let sha = sha256_hex(&std::fs::read(&artifact)?);
        eprintln!(
            "[ssh_fleet] {n} hosts up; artifact {} ({sha})",
            artifact.display()
        );

        // cd, in a child process.
        let mut cd_times = Vec::new();
        let mut peak_kib = 0u64;
        for r in 0..rounds {
            let version = format!("cd{r}");
            let (wall, child_kib) = run_cd_child(&fleet, &artifact, &version)?;
            verify(&fleet, "cd", &version)?;
            eprintln!("[ssh_fleet] hosts={n} cd round {r}: {wall:.3} s, peak rss {child_kib} KiB");
            cd_times.push(wall);
            peak_kib = peak_kib.max(child_kib);
        }

        // OpenSSH, parallel shell loop.
        let hosts_file = work.path().join("hosts");
        let mut listing = String::new();
        for h in fleet.hosts() {
            listing.push_str(&format!(
                "{} {}\n",
                h.name,
                h.root.join("openssh").display()
            ));
        }
        std::fs::write(&hosts_file, listing)?;
        let mut ssh_times = Vec::new();
        for r in 0..rounds {
            let version = format!("ssh{r}");
            let t = Instant::now();
            let out = Command::new("sh")
                .arg(bench_dir.join("ssh_fleet_openssh.sh"))
                .arg(fleet.ssh_config_path())
                .arg(&artifact)
                .arg(&version)
                .arg(&hosts_file)
                .output()?;
            let wall = t.elapsed().as_secs_f64();
            if !out.status.success() {
                bail!(
                    "openssh script failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            verify(&fleet, "openssh", &version)?;
            eprintln!("[ssh_fleet] hosts={n} openssh round {r}: {wall:.3} s");
            ssh_times.push(wall);
        }

        // ansible-playbook.
        let mut ansible_times = Vec::new();
        if let Some(ansible) = &ansible {
            for r in 0..ansible_rounds {
                let version = format!("ansible{r}");
                let wall = run_ansible(
                    ansible,
                    &bench_dir,
                    &fleet,
                    work.path(),
                    &artifact,
                    &sha,
                    &version,
                )?;
                verify(&fleet, "ansible", &version)?;
                eprintln!("[ssh_fleet] hosts={n} ansible round {r}: {wall:.3} s");
                ansible_times.push(wall);
            }
        }

        let cd_s = median(&mut cd_times);
        let ssh_s = median(&mut ssh_times);
        let ansible_s = if ansible_times.is_empty() {
            f64::NAN
        } else {
            median(&mut ansible_times)
        };
        let line = format!(
            "bench ssh_fleet: hosts={n} cd_s={cd_s:.3} ansible_s={ansible_s:.3} openssh_s={ssh_s:.3} \
             vs_ansible={:.1} vs_openssh={:.2} peak_rss_mib={:.1}",
            ansible_s / cd_s,
            cd_s / ssh_s,
            peak_kib as f64 / 1024.0
        );
        println!("{line}");
        lines.push(line);
        drop(fleet);
    }
    // Repeat the result lines together at the end.
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Checks every host: `<root>/<tool>/current -> releases/<version>`, the
/// restart marker, the artifact.
fn verify(fleet: &SshFleet, tool: &str, version: &str) -> Result<()> {
    for h in fleet.hosts() {
        let root = h.root.join(tool);
        let link = std::fs::read_link(root.join("current"))
            .with_context(|| format!("{tool}: no current on {}", h.name))?;
        if link != Path::new("releases").join(version) {
            bail!("{tool}: {} has current -> {}", h.name, link.display());
        }
        let marker = std::fs::read_to_string(root.join("restarted"))?;
        if marker != version {
            bail!("{tool}: {} restart marker says {marker}", h.name);
        }
        let len = std::fs::metadata(root.join("current").join("app.bin"))?.len();
        if len != ARTIFACT_BYTES as u64 {
            bail!("{tool}: {} has an artifact of {len} bytes", h.name);
        }
    }
    Ok(())
}

fn run_cd_child(fleet: &SshFleet, artifact: &Path, version: &str) -> Result<(f64, u64)> {
    let config = json!({
        "user": fleet.user(),
        "key": fleet.user_key_path(),
        "known_hosts": fleet.known_hosts_path(),
        "artifact": artifact,
        "version": version,
        "hosts": fleet.hosts().iter().map(|h| json!({
            "name": h.name, "ip": h.ip, "port": h.port,
            "root": h.root.join("cd"),
        })).collect::<Vec<_>>(),
    });
    let t = Instant::now();
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, config.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "cd child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cpu = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpu_s="))
        .unwrap_or("?");
    eprintln!("[ssh_fleet] cd child cpu {cpu} s");
    let kib = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peak_rss_kib="))
        .and_then(|v| v.parse().ok())
        .context("child did not report its peak RSS")?;
    Ok((wall, kib))
}

/// The child: one deploy of the whole fleet, then its own peak RSS.
fn child(config: &str) -> Result<()> {
    let c: Value = serde_json::from_str(config)?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    let hosts = c["hosts"].as_array().cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut b = SshDeployer::builder()
            .user(s("user"))
            .key_file(s("key"))
            .known_hosts(s("known_hosts"))
            .restart(RESTART)
            .health_command(HEALTH)
            .keep_releases(3)
            .parallelism(hosts.len().max(1))
            .concurrent_uploads(env_usize("SSH_FLEET_UPLOADS", 8))
            .step_timeout(Duration::from_secs(60));
        for h in &hosts {
            b = b.host(
                SshHost::new(
                    h["name"].as_str().unwrap_or_default(),
                    h["ip"].as_str().unwrap_or_default(),
                    h["port"].as_u64().unwrap_or(22) as u16,
                )
                .root(h["root"].as_str().unwrap_or_default()),
            );
        }
        let deployer = Arc::new(b.build()?);
        let targets = deployer.targets();
        let release = Release::new(s("version")).artifact(PathBuf::from(s("artifact")));
        // SSH_FLEET_TRACE=1: every step of every host on stderr, with times
        // since the child started.
        let cx = if std::env::var_os("SSH_FLEET_TRACE").is_some() {
            let t0 = Instant::now();
            let sink = cd::core::FnSink(move |e: &cd::core::Event| {
                eprintln!("{:>7.1} ms {e}", t0.elapsed().as_secs_f64() * 1000.0)
            });
            DeployContext::new(
                cd::core::Emitter::new("bench", 1, vec![Arc::new(sink)], Default::default()),
                Default::default(),
                "bench",
            )
        } else {
            DeployContext::detached("bench")
        };
        if std::env::var_os("SSH_FLEET_RSS_PROBE").is_some() {
            eprintln!("rss before connect: {} KiB", peak_rss_kib());
            let _ = deployer.check_hosts().await;
            eprintln!("rss after connect: {} KiB", peak_rss_kib());
        }
        let report = Rolling::new()
            .batch_size(targets.len())
            .deploy(&deployer, &release, &targets, &cx)
            .await?;
        anyhow::ensure!(
            report.deployed.len() == targets.len(),
            "not every host deployed"
        );
        Ok::<_, anyhow::Error>(())
    })?;
    println!("peak_rss_kib={} cpu_s={:.3}", peak_rss_kib(), cpu_seconds());
    Ok(())
}

/// User + system CPU time of this process (from /proc/self/stat, 100 Hz ticks).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn run_ansible(
    ansible: &Path,
    bench_dir: &Path,
    fleet: &SshFleet,
    work: &Path,
    artifact: &Path,
    sha: &str,
    version: &str,
) -> Result<f64> {
    let dir = work.join("ansible");
    std::fs::create_dir_all(dir.join("cp"))?;
    let mut inventory = String::from("[fleet]\n");
    for h in fleet.hosts() {
        inventory.push_str(&format!(
            "{} ansible_host={} ansible_port={} host_root={}\n",
            h.name,
            h.ip,
            h.port,
            h.root.join("ansible").display()
        ));
    }
    inventory.push_str(&format!(
        "[fleet:vars]\nansible_user={}\nansible_ssh_private_key_file={}\nansible_python_interpreter=/usr/bin/python3\n",
        fleet.user(),
        fleet.user_key_path().display()
    ));
    std::fs::write(dir.join("inventory.ini"), inventory)?;
    std::fs::write(
        dir.join("ansible.cfg"),
        format!(
            "[defaults]\nforks = {forks}\nhost_key_checking = True\ngathering = explicit\n\
             local_tmp = {dir}/local\nretry_files_enabled = False\n\
             [ssh_connection]\npipelining = True\ncontrol_path_dir = {dir}/cp\n\
             ssh_args = -C -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile={kh} \
             -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes\n",
            forks = fleet.len(),
            dir = dir.display(),
            kh = fleet.known_hosts_path().display(),
        ),
    )?;
    std::fs::write(
        dir.join("vars.json"),
        json!({ "version": version, "artifact": artifact, "artifact_sha256": sha }).to_string(),
    )?;
    let t = Instant::now();
    let out = Command::new(ansible)
        .arg("-i")
        .arg(dir.join("inventory.ini"))
        .arg("-e")
        .arg(format!("@{}", dir.join("vars.json").display()))
        .arg(bench_dir.join("ansible").join("ssh_fleet.yml"))
        .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
        .env("ANSIBLE_HOME", dir.join("home"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "ansible-playbook failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(wall)
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
