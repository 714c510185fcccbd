//! SIGKILL chaos on a real SSH fleet (issue 9): a child process runs a
//! rolling deploy over 8 real sshd hosts against a SQLite store; the test
//! SIGKILLs it at seeded random points — after 1 to 9 remote steps (check,
//! upload, switch, restart, health, record) of apply and of rollback, some
//! during a resume, some with a host's sshd stopped and started again — and
//! resumes it until the run ends. Then: no run stuck `running`, no mixed
//! fleet, the store's history agrees with the hosts (applied marker,
//! `current` symlink and restart marker on each), no leftover lease.
//!
//! Prints `chaos ssh: seed=… kills=… stuck=0 mixed=0 store_mismatch=0
//! leftover_leases=0`. Set `CD_CHAOS_SEED` to replay a schedule and
//! `CD_CHAOS_KILLS` for a longer run (`scripts/ssh-chaos.sh 200`). The child
//! is this test binary run again with `--ignored --exact chaos_child`.
#![cfg(all(feature = "sqlite", feature = "ssh"))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd::backends::sqlite::SqliteStore;
use cd::backends::ssh::{SshDeployer, SshHost};
use cd::core::{
    stage_fn, Error, EventKind, FnSink, LockSettings, Pipeline, Release, ReleaseStatus,
    RetryPolicy, RunStatus, Runner, StageOutput, Store,
};
use cd::stages::Deploy;
use cd_testkit::{SshFleet, TestChild};
use rand::{Rng, SeedableRng};

const ENV: &str = "production";
const HELPER_ENV: &str = "CD_SSH_CHAOS";
const HOSTS: usize = 8;

/// Restart: marker and log in the host root.
const RESTART: &str = "printf '%s' \"$CD_VERSION\" > \"$CD_ROOT/restarted\" && \
                       echo \"$CD_VERSION\" >> \"$CD_ROOT/restarts.log\"";
const HEALTH: &str = "test \"$(cat \"$CD_ROOT/restarted\")\" = \"$CD_VERSION\"";

/// What the child needs, as one environment variable.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Setup {
    db: PathBuf,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
    /// (name, ip, port, deploy root)
    hosts: Vec<(String, String, u16, String)>,
    artifacts: PathBuf,
    version: String,
    /// Fail the check after the deploy, so the run compensates (rollback).
    fail_check: bool,
    resume: Option<String>,
}

fn deployer(setup: &Setup) -> SshDeployer {
    let mut b = SshDeployer::builder()
        .user(&setup.user)
        .key_file(&setup.key)
        .known_hosts(&setup.known_hosts)
        .restart(RESTART)
        .health_command(HEALTH)
        .connect_timeout(Duration::from_secs(2))
        .step_timeout(Duration::from_secs(20));
    for (name, ip, port, root) in &setup.hosts {
        b = b.host(SshHost::new(name, ip, *port).root(root));
    }
    b.build().unwrap()
}

fn release(setup: &Setup) -> Release {
    let dir = setup.artifacts.join(&setup.version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.bin");
    if !path.exists() {
        std::fs::write(&path, format!("app {}\n", setup.version).repeat(2048)).unwrap();
    }
    Release::new(&setup.version).artifact(path)
}

fn pipeline(setup: &Setup) -> Pipeline {
    let fail = setup.fail_check;
    Pipeline::builder("ssh-chaos")
        .stage("deploy", Deploy::new(deployer(setup)).rolling(1, 0))
        .stage(
            "check",
            stage_fn(move |_| async move {
                if fail {
                    Err(Error::failed("check failed on purpose"))
                } else {
                    Ok(StageOutput::empty())
                }
            }),
        )
        .needs(["deploy"])
        .build()
        .unwrap()
}

/// Not a test: the child process. Runs (or resumes) the pipeline, printing
/// `step` for every remote step and `finished <status>` at the end.
#[test]
#[ignore = "child process of ssh_chaos"]
fn chaos_child() {
    let Ok(raw) = std::env::var(HELPER_ENV) else {
        return;
    };
    let setup: Setup = serde_json::from_str(&raw).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&setup.db).await.unwrap());
        let p = pipeline(&setup);
        let runner = Runner::new(store)
            .environment(ENV)
            .actor("chaos")
            .retry(RetryPolicy::none())
            .lock(LockSettings {
                ttl: Duration::from_secs(30),
                wait_timeout: Duration::from_secs(30),
                poll_interval: Duration::from_millis(20),
            })
            .sink(FnSink(|e: &cd::core::Event| {
                if let EventKind::Progress { status, .. } = &e.kind {
                    if status != "started" {
                        println!("\nstep");
                        let _ = std::io::stdout().flush();
                    }
                }
            }));
        let report = match &setup.resume {
            Some(id) => runner.resume(id, &p).await,
            None => runner.run(&p, release(&setup)).await,
        };
        match report {
            Ok(r) => println!("\nfinished {}", r.status),
            Err(e) => println!("\nerror {e}"),
        }
        let _ = std::io::stdout().flush();
    });
}

fn start(setup: &Setup) -> TestChild {
    let setup = serde_json::to_string(setup).unwrap();
    TestChild::start("chaos_child", (HELPER_ENV, &setup), Stdio::null())
}

enum Seen {
    Steps,
    Ended(String),
    Silent,
}

/// Waits for `n` remote steps (or the end), within `within`.
fn wait_steps(inc: &TestChild, n: usize, within: Duration) -> Seen {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    loop {
        match inc.next_line(deadline) {
            Some(l) if l.starts_with("finished ") || l.starts_with("error ") => {
                return Seen::Ended(l);
            }
            Some(l) if l == "step" => {
                seen += 1;
                if seen >= n {
                    return Seen::Steps;
                }
            }
            Some(_) => {}
            None => return Seen::Silent,
        }
    }
}

/// The run of `version` still `running`, if any.
async fn running_run(db: &Path, version: &str) -> Option<String> {
    let store = SqliteStore::open(db).await.unwrap();
    let id = store
        .list_runs(1000)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.release.version == version && r.status == RunStatus::Running)
        .map(|r| r.id);
    store.close().await;
    id
}

#[derive(Debug, Default)]
struct Tally {
    kills: usize,
    stuck: usize,
    mixed: usize,
    store_mismatch: usize,
    leftover_leases: usize,
}

/// The chaos run's state: the fleet, what the child is given, the seeded
/// schedule, the counts and the log.
struct Chaos<'a> {
    fleet: &'a SshFleet,
    setup: Setup,
    rng: rand::rngs::StdRng,
    tally: Tally,
    log: Vec<String>,
}

impl Chaos<'_> {
    /// One scenario: deploys `version` (with a failing check: the run rolls
    /// back), killing the process `kills` times, then lets it end. A kill
    /// in `sshd_down` stops a host's sshd first and starts it again before
    /// the next incarnation. Returns the child's last line.
    async fn scenario(
        &mut self,
        version: &str,
        fail_check: bool,
        kills: usize,
        sshd_down: &[usize],
    ) -> String {
        self.setup.version = version.into();
        self.setup.fail_check = fail_check;
        let mut done = 0;
        loop {
            self.setup.resume = running_run(&self.setup.db, version).await;
            let mut inc = start(&self.setup);
            if done < kills {
                let steps = self.rng.gen_range(1..=9usize);
                let jitter = self.rng.gen_range(0..15u64);
                let down = sshd_down
                    .contains(&done)
                    .then(|| self.rng.gen_range(0..HOSTS));
                match wait_steps(&inc, steps, Duration::from_secs(60)) {
                    Seen::Steps => {}
                    Seen::Ended(l) => {
                        // Ended before the kill: the scenario was shorter
                        // than its schedule.
                        self.log
                            .push(format!("{version}: ended early after {done} kills: {l}"));
                        let _ = inc.child.wait();
                        return l;
                    }
                    Seen::Silent => panic!("{version}: the child made no progress for 60 s"),
                }
                if let Some(h) = down {
                    self.fleet.stop_host(h).await.unwrap();
                }
                std::thread::sleep(Duration::from_millis(jitter));
                inc.kill();
                done += 1;
                self.tally.kills += 1;
                self.log.push(format!(
                    "{version}: kill {done} after {steps} steps + {jitter} ms{}",
                    down.map(|h| format!(", sshd of host{} stopped", h + 1))
                        .unwrap_or_default()
                ));
                if let Some(h) = down {
                    self.fleet.start_host(h).await.unwrap();
                }
                continue;
            }
            let end = match wait_steps(&inc, usize::MAX, Duration::from_secs(120)) {
                Seen::Ended(l) => l,
                _ => panic!("{version}: the last incarnation did not end"),
            };
            let _ = inc.child.wait();
            return end;
        }
    }
}

/// Reads what a host really runs: (applied marker, `current` symlink's
/// release, restart marker).
fn on_host(root: &Path) -> (Option<String>, Option<String>, Option<String>) {
    let applied = std::fs::read_to_string(root.join("applied")).ok();
    let current = std::fs::read_link(root.join("current"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    let restarted = std::fs::read_to_string(root.join("restarted")).ok();
    (applied, current, restarted)
}

impl Chaos<'_> {
    /// Checks the invariants after a scenario; counts violations.
    async fn check(&mut self, roots: &[PathBuf], expected: &str) {
        let (tally, log) = (&mut self.tally, &mut self.log);
        let store = SqliteStore::open(&self.setup.db).await.unwrap();
        let stuck: Vec<_> = store
            .list_runs(1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.status == RunStatus::Running)
            .collect();
        tally.stuck += stuck.len();
        let leases = store.locks().await.unwrap();
        tally.leftover_leases += leases.len();
        let states: Vec<_> = roots.iter().map(|r| on_host(r)).collect();
        let mixed = states.iter().any(|(a, c, r)| {
            a.as_deref() != Some(expected)
                || c.as_deref() != Some(expected)
                || r.as_deref() != Some(expected)
        });
        if mixed {
            tally.mixed += 1;
            log.push(format!("expected {expected} everywhere, hosts: {states:?}"));
        }
        let history = store.release_history(ENV, 1000).await.unwrap();
        let live: Vec<_> = history
            .iter()
            .filter(|r| r.status == ReleaseStatus::Live)
            .collect();
        // The live record says, per host, what the host runs.
        let agrees = live.len() == 1
            && live[0].version == expected
            && live[0].revisions.len() == roots.len()
            && live[0].revisions.iter().all(|r| r.version == expected)
            && states
                .iter()
                .all(|(a, _, _)| a.as_deref() == Some(expected));
        if !agrees {
            tally.store_mismatch += 1;
            log.push(format!(
                "store: live {:?}, expected {expected} on {} hosts",
                live.iter()
                    .map(|r| (&r.version, r.revisions.len()))
                    .collect::<Vec<_>>(),
                roots.len()
            ));
        }
        if !stuck.is_empty() || !leases.is_empty() {
            log.push(format!("stuck runs {stuck:?}, leases {leases:?}"));
        }
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_chaos_on_an_ssh_fleet_leaves_no_stuck_run_mixed_fleet_or_false_history() {
    let Some(fleet) = SshFleet::start_or_skip(HOSTS).await.unwrap() else {
        return;
    };
    let seed: u64 = std::env::var("CD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let total: usize = std::env::var("CD_CHAOS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
        .max(30);
    println!("chaos seed {seed} (CD_CHAOS_SEED={seed} replays it)");
    let rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let roots: Vec<PathBuf> = fleet.hosts().iter().map(|h| h.root.join("app")).collect();
    let setup = Setup {
        db: dir.path().join("state.db"),
        user: fleet.user().to_string(),
        key: fleet.user_key_path().to_path_buf(),
        known_hosts: fleet.known_hosts_path().to_path_buf(),
        hosts: fleet
            .hosts()
            .iter()
            .zip(&roots)
            .map(|(h, r)| {
                (
                    h.name.clone(),
                    h.ip.clone(),
                    h.port,
                    r.display().to_string(),
                )
            })
            .collect(),
        artifacts: dir.path().join("artifacts"),
        version: String::new(),
        fail_check: false,
        resume: None,
    };
    let mut chaos = Chaos {
        fleet: &fleet,
        setup,
        rng,
        tally: Tally::default(),
        log: Vec::new(),
    };
    // Rounds of three scenarios (≥ 30 kills in all): deploy a release;
    // deploy the next one with a failing check (it rolls back); deploy it
    // for good with an sshd stopped at some kills. After each, the fleet
    // must be on one release and the store must say so.
    let mut round = 0;
    while chaos.tally.kills < total {
        round += 1;
        let (a, b) = (format!("r{round}a"), format!("r{round}b"));
        let per = 10usize;
        let end = chaos.scenario(&a, false, per, &[]).await;
        assert!(
            end.contains("succeeded"),
            "{a}: {end}\n{}",
            chaos.log.join("\n")
        );
        chaos.check(&roots, &a).await;

        let end = chaos.scenario(&b, true, per, &[]).await;
        assert!(
            end.contains("failed"),
            "{b} with a failing check: {end}\n{}",
            chaos.log.join("\n")
        );
        chaos.check(&roots, &a).await;

        let end = chaos.scenario(&b, false, per, &[2, 6]).await;
        // A stopped sshd may fail the run (its compensation rolls back); a
        // new run then converges.
        if !end.contains("succeeded") {
            chaos.log.push(format!("{b}: {end}; deploying again"));
            let end = chaos.scenario(&b, false, 0, &[]).await;
            assert!(
                end.contains("succeeded"),
                "{b} again: {end}\n{}",
                chaos.log.join("\n")
            );
        }
        chaos.check(&roots, &b).await;
    }
    let (tally, log) = (chaos.tally, chaos.log);
    println!("{}", log.join("\n"));
    println!(
        "chaos ssh: seed={seed} kills={} stuck={} mixed={} store_mismatch={} leftover_leases={}",
        tally.kills, tally.stuck, tally.mixed, tally.store_mismatch, tally.leftover_leases
    );
    assert!(tally.kills >= 30);
    assert_eq!(
        (
            tally.stuck,
            tally.mixed,
            tally.store_mismatch,
            tally.leftover_leases
        ),
        (0, 0, 0, 0),
        "seed {seed}: {tally:?}\n{}",
        log.join("\n")
    );
}
