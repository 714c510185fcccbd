//! SshDeployer against real OpenSSH sshd hosts (cd-testkit's SshFleet):
//! rollouts, rollback, host keys, authentication and failing steps.
//!
//! These tests skip (loudly) when sshd is missing, and fail instead when CI
//! or CD_SETUP_DONE is set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cd::backends::ssh::{HostKeyPolicy, SshDeployer, SshDeployerBuilder, SshHost};
use cd::core::{
    Analysis, Canary, DeployContext, Deployer, Emitter, ErrorKind, Event, EventKind, FnSink,
    Monitor, MonitorContext, Redactor, Release, Rolling, Sample, Secret, Strategy, Target,
};
use cd_testkit::SshFleet;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Restart writes a marker and appends to a log; both live in the host root.
/// A `*-slow` version takes 2 s to restart (the conformance suite cancels
/// it part-way).
const RESTART: &str = "case \"$CD_VERSION\" in *-slow) sleep 2;; esac; \
                       printf '%s' \"$CD_VERSION\" > \"$CD_ROOT/restarted\" && \
                       echo \"$CD_VERSION\" >> \"$CD_ROOT/restarts.log\"";
/// Healthy when the artifact is in the live release and the marker matches.
const HEALTH: &str = "test -f \"$CD_ROOT/current/app.bin\" && \
                      test \"$(cat \"$CD_ROOT/restarted\")\" = \"$CD_VERSION\"";

struct Fixture {
    fleet: Arc<SshFleet>,
    _artifacts: tempfile::TempDir,
    artifacts: PathBuf,
}

impl Fixture {
    async fn start(k: usize) -> Option<Fixture> {
        let fleet = SshFleet::start_or_skip(k).await.expect("fleet starts")?;
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().to_path_buf();
        Some(Fixture {
            fleet: Arc::new(fleet),
            _artifacts: dir,
            artifacts,
        })
    }

    /// The deploy root of host `i` (inside its fixture root).
    fn root(&self, i: usize) -> PathBuf {
        self.fleet.host(i).root.join("app")
    }

    fn builder(&self) -> SshDeployerBuilder {
        self.builder_without_key()
            .key_file(self.fleet.user_key_path())
    }

    /// Everything but credentials.
    fn builder_without_key(&self) -> SshDeployerBuilder {
        let mut b = SshDeployer::builder()
            .user(self.fleet.user())
            .known_hosts(self.fleet.known_hosts_path())
            .restart(RESTART)
            .health_command(HEALTH)
            .connect_timeout(Duration::from_secs(5))
            .step_timeout(Duration::from_secs(30));
        for (i, h) in self.fleet.hosts().iter().enumerate() {
            b = b.host(
                SshHost::new(&h.name, &h.ip, h.port).root(self.root(i).display().to_string()),
            );
        }
        b
    }

    fn deployer(&self) -> SshDeployer {
        self.builder().build().expect("deployer builds")
    }

    /// A 1 MiB artifact `app.bin` whose content depends on `version`.
    fn release(&self, version: &str) -> Release {
        let dir = self.artifacts.join(version);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.bin");
        if !path.exists() {
            let mut data = Vec::with_capacity(1 << 20);
            let mut x: u64 = version.bytes().fold(1469598103934665603, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(1099511628211)
            });
            while data.len() < 1 << 20 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            std::fs::write(&path, &data).unwrap();
        }
        Release::new(version).artifact(path)
    }

    fn artifact_sha(&self, version: &str) -> String {
        sha256_file(&self.artifacts.join(version).join("app.bin"))
    }

    /// What `current` points at on host `i`, read from disk.
    fn current_on_disk(&self, i: usize) -> Option<String> {
        std::fs::read_link(self.root(i).join("current"))
            .ok()
            .map(|p| p.display().to_string())
    }

    fn restarted(&self, i: usize) -> Option<String> {
        std::fs::read_to_string(self.root(i).join("restarted")).ok()
    }

    fn restarts(&self, i: usize) -> Vec<String> {
        std::fs::read_to_string(self.root(i).join("restarts.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Asserts host `i` runs `version`: symlink, artifact checksum, restart
    /// marker.
    fn assert_live(&self, i: usize, version: &str) {
        let name = &self.fleet.host(i).name;
        assert_eq!(
            self.current_on_disk(i).as_deref(),
            Some(format!("releases/{version}").as_str()),
            "current on {name}"
        );
        assert_eq!(
            sha256_file(&self.root(i).join("current").join("app.bin")),
            self.artifact_sha(version),
            "artifact on {name}"
        );
        assert_eq!(
            self.restarted(i).as_deref(),
            Some(version),
            "restart marker on {name}"
        );
    }
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap_or_default()))
}

/// How many logins sshd on host `i` accepted.
fn accepted_logins(fx: &Fixture, i: usize) -> usize {
    fx.fleet.sshd_log(i).matches("Accepted publickey").count()
}

fn collecting_cx() -> (DeployContext, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    let sink = FnSink(move |e: &Event| sink_events.lock().unwrap().push(e.clone()));
    let emitter = Emitter::new("test", 1, vec![Arc::new(sink)], Redactor::default());
    (
        DeployContext::new(emitter, CancellationToken::new(), "test"),
        events,
    )
}

fn progress(events: &[Event], target: &str, step: &str, status: &str) -> Vec<Option<u64>> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Progress {
                target: Some(t),
                step: s,
                status: st,
                duration_ms,
                ..
            } if t == target && s == step && st == status => Some(*duration_ms),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_v1_v2_rollback_on_ten_hosts() {
    let Some(fx) = Fixture::start(10).await else {
        return;
    };
    let deployer = fx.deployer();
    let targets = deployer.targets();
    assert_eq!(targets.len(), 10);
    let rolling = Rolling::new().batch_size(4);
    let (cx, events) = collecting_cx();

    let r1 = rolling
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .expect("v1 rolls out");
    assert_eq!(r1.deployed.len(), 10);
    for i in 0..10 {
        fx.assert_live(i, "v1");
        // Nothing was live before: no `previous` link.
        assert!(std::fs::read_link(fx.root(i).join("previous")).is_err());
    }

    // Events per host and step, with timings.
    {
        let events = events.lock().unwrap();
        for h in fx.fleet.hosts() {
            for step in [
                "check", "upload", "checksum", "switch", "restart", "health", "cleanup",
            ] {
                let ok = progress(&events, &h.name, step, "ok");
                assert_eq!(ok.len(), 1, "{} {step}: {ok:?}", h.name);
                assert!(ok[0].is_some(), "{} {step} has a duration", h.name);
            }
        }
    }
    // One connection per host, reused for every step: sshd logged exactly
    // one authentication per host.
    for i in 0..10 {
        assert_eq!(accepted_logins(&fx, i), 1, "host{}", i + 1);
    }

    let r2 = rolling
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .expect("v2 rolls out");
    assert_eq!(r2.deployed.len(), 10);
    assert!(!r2.noop);
    for (i, target) in targets.iter().enumerate() {
        fx.assert_live(i, "v2");
        assert_eq!(
            std::fs::read_link(fx.root(i).join("previous")).unwrap(),
            PathBuf::from("releases/v1")
        );
        let rev = deployer.current(target).await.unwrap().unwrap();
        assert_eq!(rev.version, "v2");
    }
    // Still one connection per host after two rollouts.
    for i in 0..10 {
        assert_eq!(accepted_logins(&fx, i), 1, "host{}", i + 1);
    }

    // Deploying the live version again changes nothing and restarts nothing.
    let again = rolling
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .unwrap();
    assert!(again.noop);
    for i in 0..10 {
        assert_eq!(fx.restarts(i), ["v1", "v2"]);
    }
    // Applying a plan for the live version directly is a no-op too.
    let plan = deployer
        .plan(
            &fx.release("v2"),
            &targets[0],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert!(plan.is_noop());
    deployer.apply(&plan, &cx).await.unwrap();
    assert_eq!(fx.restarts(0), ["v1", "v2"]);

    // Roll the whole v2 rollout back: every host is on v1 again, restarted.
    rolling
        .rollback(&deployer, &r2, &cx)
        .await
        .expect("rollback");
    for i in 0..10 {
        fx.assert_live(i, "v1");
        assert_eq!(fx.restarts(i), ["v1", "v2", "v1"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_host_stopped_mid_rollout() {
    let Some(fx) = Fixture::start(6).await else {
        return;
    };
    let deployer = fx.deployer();
    let targets = deployer.targets();
    let (cx, _) = collecting_cx();
    Rolling::new()
        .batch_size(6)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .expect("v1 everywhere");

    // host4 (index 3) dies when batch 2 (host3, host4) begins: its live
    // connection drops and new ones are refused.
    let fleet = fx.fleet.clone();
    let sink = FnSink(move |e: &Event| {
        if let EventKind::Rollout { message, .. } = &e.kind {
            if message.starts_with("batch 2/") {
                fleet.stop_host_now(3);
            }
        }
    });
    let cx2 = DeployContext::new(
        Emitter::new("stop", 1, vec![Arc::new(sink)], Redactor::default()),
        CancellationToken::new(),
        "test",
    );
    let err = Rolling::new()
        .batch_size(2)
        .max_failures(0)
        .deploy(&deployer, &fx.release("v2"), &targets, &cx2)
        .await
        .expect_err("the rollout stops");
    assert!(err.to_string().contains("host4"), "{err}");
    assert_eq!(err.context("target"), Some("host4"), "{err}");
    assert!(!fx.fleet.is_running(3));
    // Hosts switched before the failure (host1, host2, host3) are back on
    // v1; the rest were never touched.
    for i in [0, 1, 2, 4, 5] {
        fx.assert_live(i, "v1");
    }
    for i in [0, 1, 2] {
        assert_eq!(fx.restarts(i), ["v1", "v2", "v1"], "host{}", i + 1);
    }
    for i in [4, 5] {
        assert_eq!(fx.restarts(i), ["v1"], "host{}", i + 1);
    }

    // With one failure allowed, the rollout finishes on the others and
    // reports the failed host.
    let report = Rolling::new()
        .batch_size(2)
        .max_failures(1)
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .expect("rollout tolerates one failure");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "host4");
    assert!(
        report.failed[0].1.message.contains("host4"),
        "{:?}",
        report.failed
    );
    for i in [0, 1, 2, 4, 5] {
        fx.assert_live(i, "v2");
    }
    // host4 kept v1 on disk.
    assert_eq!(fx.current_on_disk(3).as_deref(), Some("releases/v1"));

    // Back up again, the deployer reconnects and finishes the job.
    fx.fleet.start_host(3).await.unwrap();
    let report = Rolling::new()
        .batch_size(6)
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .expect("host4 catches up");
    assert!(report.failed.is_empty());
    fx.assert_live(3, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_changed_host_key_stops_before_any_write() {
    let Some(fx) = Fixture::start(4).await else {
        return;
    };
    fx.fleet.replace_host_key(2).await.unwrap();
    let deployer = fx.deployer();
    let targets = deployer.targets();
    let (cx, _) = collecting_cx();
    let err = Rolling::new()
        .batch_size(1)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .expect_err("a changed host key stops the rollout");
    assert!(err.to_string().contains("HOST KEY CHANGED"), "{err}");
    assert!(err.to_string().contains("host3"), "{err}");
    // Nothing was written on any host, not even the deploy root.
    for i in 0..4 {
        assert!(!fx.root(i).exists(), "host{} was written to", i + 1);
    }
    // The typed error straight from the deployer: auth kind, not retryable,
    // names host and step.
    let plan_err = deployer.current(&targets[2]).await.unwrap_err();
    assert_eq!(plan_err.kind(), ErrorKind::Auth);
    assert!(!plan_err.is_retryable());
    assert_eq!(plan_err.context("host"), Some("host3"));
    assert_eq!(plan_err.context("step"), Some("host-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_revoked_host_key_is_refused_even_when_listed() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    // known_hosts lists every host's key, and also revokes host2's.
    let text = std::fs::read_to_string(fx.fleet.known_hosts_path()).unwrap();
    let name = fx.fleet.host(1).known_hosts_name();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .expect("host2 is in known_hosts");
    let key: Vec<&str> = line.split_whitespace().skip(1).take(2).collect();
    let revoking = fx.fleet.dir().join("revoking_known_hosts");
    std::fs::write(
        &revoking,
        format!("{text}\n@revoked * {} {}\n", key[0], key[1]),
    )
    .unwrap();
    let deployer = fx.builder().known_hosts(&revoking).build().unwrap();
    let targets = deployer.targets();
    let (cx, _) = collecting_cx();
    let err = Rolling::new()
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .expect_err("a revoked host key stops the rollout");
    assert!(err.to_string().contains("REVOKED HOST KEY"), "{err}");
    assert!(err.to_string().contains("host2"), "{err}");
    for i in 0..2 {
        assert!(!fx.root(i).exists(), "host{} was written to", i + 1);
    }
    let typed = deployer.current(&targets[1]).await.unwrap_err();
    assert_eq!(typed.kind(), ErrorKind::Auth);
    assert!(!typed.is_retryable());
    assert_eq!(typed.context("host"), Some("host2"));
    // host1's key is not revoked.
    assert!(deployer.current(&targets[0]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_hashed_known_hosts_unknown_hosts_and_tofu() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    let (cx, _) = collecting_cx();
    // Hashed known_hosts names verify like plain ones.
    let hashed = fx
        .builder()
        .known_hosts(fx.fleet.hashed_known_hosts_path())
        .build()
        .unwrap();
    let text = std::fs::read_to_string(fx.fleet.hashed_known_hosts_path()).unwrap();
    assert!(text.starts_with("|1|"), "{text}");
    let t = hashed.targets();
    let plan = hashed
        .plan(
            &fx.release("v1"),
            &t[0],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    hashed
        .apply(&plan, &cx)
        .await
        .expect("hashed known_hosts works");
    fx.assert_live(0, "v1");

    // An unknown host is refused unless trust-on-first-use was asked for.
    let empty = fx.fleet.dir().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let strict = fx.builder().known_hosts(&empty).build().unwrap();
    let err = strict.current(&t[1]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(err.to_string().contains("unknown host key"), "{err}");
    assert_eq!(err.context("host"), Some("host2"));

    let tofu = fx
        .builder()
        .known_hosts(&empty)
        .host_key_policy(HostKeyPolicy::TrustOnFirstUse)
        .build()
        .unwrap();
    assert_eq!(tofu.current(&t[1]).await.unwrap(), None);
    let learned = std::fs::read_to_string(&empty).unwrap();
    assert!(
        learned.contains(&fx.fleet.host(1).host_public_key),
        "TOFU recorded the key: {learned}"
    );
    // The recorded key is now enforced by a strict deployer.
    let strict = fx.builder().known_hosts(&empty).build().unwrap();
    assert_eq!(strict.current(&t[1]).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_wrong_user_key_and_closed_port_are_typed() {
    let Some(fx) = Fixture::start(3).await else {
        return;
    };
    let (cx, _) = collecting_cx();
    let wrong = fx
        .builder()
        .key_file(fx.fleet.unauthorized_key().unwrap())
        .build()
        .unwrap();
    let targets = wrong.targets();
    let err = Rolling::new()
        .batch_size(3)
        .deploy(&wrong, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rejected"), "{err}");
    let direct = wrong.current(&targets[1]).await.unwrap_err();
    assert_eq!(direct.kind(), ErrorKind::Auth);
    assert!(!direct.is_retryable());
    assert_eq!(direct.context("host"), Some("host2"));
    assert_eq!(direct.context("step"), Some("auth"));
    for i in 0..3 {
        assert_eq!(fx.current_on_disk(i), None);
    }

    // A closed port: retryable, names host and step.
    fx.fleet.stop_host(1).await.unwrap();
    let deployer = fx.deployer();
    let err = deployer.current(&targets[1]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.context("host"), Some("host2"));
    assert_eq!(err.context("step"), Some("connect"));
    assert!(err.to_string().contains(&fx.fleet.host(1).addr()), "{err}");
    // The rollout fails on host2 and leaves the fleet on one version
    // (nothing live anywhere).
    let err = Rolling::new()
        .batch_size(3)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap_err();
    assert_eq!(err.context("target"), Some("host2"), "{err}");
    for i in 0..3 {
        assert_eq!(fx.current_on_disk(i), None, "host{}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_checksum_mismatch_fails_before_switch() {
    let Some(fx) = Fixture::start(4).await else {
        return;
    };
    let deployer = fx.deployer();
    let targets = deployer.targets();
    let (cx, events) = collecting_cx();
    Rolling::new()
        .batch_size(4)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap();

    // The release declares a sha256 that the uploaded bytes do not have
    // (as when the artifact was corrupted after the build signed it).
    let release = fx.release("v2");
    let path = release.artifact.as_ref().unwrap().path.clone();
    let bad = Release::new("v2").artifact_with_sha256(path, "0".repeat(64));
    let plan = deployer
        .plan(
            &bad,
            &targets[0],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = deployer.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    assert_eq!(err.context("host"), Some("host1"));
    assert_eq!(err.context("step"), Some("checksum"));
    assert!(err.to_string().contains(&fx.artifact_sha("v2")), "{err}");
    assert!(progress(&events.lock().unwrap(), "host1", "checksum", "failed").len() == 1);
    // Nothing half-written stays behind: no artifact, no partial upload.
    let dir = fx.root(0).join("releases/v2");
    assert!(!dir.join("app.bin").exists());
    assert!(!dir.join(".app.bin.part").exists());

    let err = Rolling::new()
        .batch_size(2)
        .deploy(&deployer, &bad, &targets, &cx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    for i in 0..4 {
        fx.assert_live(i, "v1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_failing_restart_or_health_keeps_fleet_on_one_version() {
    let Some(fx) = Fixture::start(4).await else {
        return;
    };
    let (cx, _) = collecting_cx();
    let good = fx.deployer();
    let targets = good.targets();
    Rolling::new()
        .batch_size(4)
        .deploy(&good, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap();

    // Restart fails on host3 for v2.
    let restart = format!(
        "if [ \"$CD_HOST\" = host3 ] && [ \"$CD_VERSION\" = v2 ]; then echo 'app refused to start' >&2; exit 7; fi; {RESTART}"
    );
    let bad_restart = fx.builder().restart(restart).build().unwrap();
    let plan = bad_restart
        .plan(
            &fx.release("v2"),
            &targets[2],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = bad_restart.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    assert_eq!(err.context("host"), Some("host3"));
    assert_eq!(err.context("step"), Some("restart"));
    assert_eq!(err.context("stderr"), Some("app refused to start"));
    // The host switched back by itself.
    fx.assert_live(2, "v1");

    let err = Rolling::new()
        .batch_size(4)
        .deploy(&bad_restart, &fx.release("v2"), &targets, &cx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("host3"), "{err}");
    assert!(err.to_string().contains("restart"), "{err}");
    for i in 0..4 {
        fx.assert_live(i, "v1");
    }

    // Health check fails on host2 for v2.
    let health = format!("[ \"$CD_HOST\" != host2 ] || [ \"$CD_VERSION\" != v2 ] && {HEALTH}");
    let bad_health = fx
        .builder()
        .health_command(health)
        .health_retries(2, Duration::from_millis(50))
        .build()
        .unwrap();
    let plan = bad_health
        .plan(
            &fx.release("v2"),
            &targets[1],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = bad_health.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.context("host"), Some("host2"));
    assert_eq!(err.context("step"), Some("health"));
    fx.assert_live(1, "v1");
    let err = Rolling::new()
        .batch_size(2)
        .deploy(&bad_health, &fx.release("v2"), &targets, &cx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("host2"), "{err}");
    for i in 0..4 {
        fx.assert_live(i, "v1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_keeps_last_releases_and_rolls_back_to_previous() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let deployer = fx.builder().keep_releases(2).build().unwrap();
    let t = deployer.targets().remove(0);
    let (cx, events) = collecting_cx();
    for v in ["v1", "v2", "v3", "v4"] {
        let plan = deployer
            .plan(
                &fx.release(v),
                &t,
                &cd::core::DeployContext::detached("test"),
            )
            .await
            .unwrap();
        let rev = deployer.apply(&plan, &cx).await.unwrap();
        assert_eq!(rev.version, v);
        // mtime resolution: keep the release directories apart in time.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut kept: Vec<String> = std::fs::read_dir(fx.root(0).join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["v3", "v4"]);
    fx.assert_live(0, "v4");

    // rollback(None) goes to what was live before the last apply.
    let rev = deployer.rollback(&t, None, &cx).await.unwrap().unwrap();
    assert_eq!(rev.version, "v3");
    fx.assert_live(0, "v3");
    // Rolling back to the live version is a no-op (no restart).
    let n = fx.restarts(0).len();
    deployer.rollback(&t, Some(&rev), &cx).await.unwrap();
    assert_eq!(fx.restarts(0).len(), n);
    // A release that was cleaned up cannot be rolled back to.
    let gone = cd::core::Revision::new("host1", "v1", "x");
    let err = deployer.rollback(&t, Some(&gone), &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    fx.assert_live(0, "v3");
    // Redeploying a release still on the host skips the upload.
    let plan = deployer
        .plan(
            &fx.release("v4"),
            &t,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    deployer.apply(&plan, &cx).await.unwrap();
    fx.assert_live(0, "v4");
    assert_eq!(
        progress(&events.lock().unwrap(), "host1", "upload", "skipped").len(),
        1
    );

    // Artifacts above the memory limit are streamed from the file.
    let streaming = fx
        .builder()
        .keep_releases(2)
        .artifact_memory_limit(0)
        .build()
        .unwrap();
    let plan = streaming
        .plan(
            &fx.release("v5"),
            &t,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    streaming.apply(&plan, &cx).await.unwrap();
    fx.assert_live(0, "v5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_encrypted_key_needs_its_passphrase() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let key = fx.fleet.encrypted_user_key("correct horse").unwrap();
    let t = Target::new("host1");
    let ok = fx
        .builder()
        .key_file(&key)
        .passphrase(Secret::new("correct horse".to_string()))
        .build()
        .unwrap();
    assert_eq!(ok.current(&t).await.unwrap(), None);
    let wrong = fx
        .builder()
        .key_file(&key)
        .passphrase(Secret::new("wrong".to_string()))
        .build()
        .unwrap();
    let err = wrong.current(&t).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "passphrase leaked: {err}"
    );
    let missing = fx.builder().key_file(&key).build().unwrap();
    let err = missing.current(&t).await.unwrap_err();
    assert!(err.to_string().contains("encrypted"), "{err}");
}

/// Passes while every analysed host runs the release and no host root has a
/// `poison` file; records how many targets each sample looked at.
struct DiskMonitor {
    roots: Vec<(String, PathBuf)>,
    seen: Arc<Mutex<Vec<usize>>>,
}

#[async_trait]
impl Monitor for DiskMonitor {
    fn name(&self) -> String {
        "disk".into()
    }

    async fn sample(&self, cx: &MonitorContext) -> cd::core::Result<Sample> {
        self.seen.lock().unwrap().push(cx.targets.len());
        for t in &cx.targets {
            let root = &self.roots.iter().find(|(n, _)| *n == t.name).unwrap().1;
            if root.join("poison").exists() {
                return Ok(Sample::failing(None, format!("{} is poisoned", t.name)));
            }
            let marker = std::fs::read_to_string(root.join("restarted")).unwrap_or_default();
            if marker != cx.release.version {
                return Ok(Sample::failing(None, format!("{} runs {marker}", t.name)));
            }
        }
        Ok(Sample::ok(Some(1.0), "healthy"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_canary_one_host_first_then_the_rest() {
    let Some(fx) = Fixture::start(5).await else {
        return;
    };
    let deployer = fx.deployer();
    let targets = deployer.targets();
    let (cx, _) = collecting_cx();
    Rolling::new()
        .batch_size(5)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap();
    let roots: Vec<(String, PathBuf)> = (0..5)
        .map(|i| (fx.fleet.host(i).name.clone(), fx.root(i)))
        .collect();
    let analysis = Analysis::new().count(2).interval(Duration::from_millis(20));

    // Poisoned canary: analysis fails, only the canary host was switched and
    // it is rolled back; the rest never saw v2.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let canary = Canary::new([20]).analysis(
        DiskMonitor {
            roots: roots.clone(),
            seen: seen.clone(),
        },
        analysis,
    );
    let first = targets[0].name.clone();
    let first_root = roots.iter().find(|(n, _)| *n == first).unwrap().1.clone();
    std::fs::write(first_root.join("poison"), "x").unwrap();
    let err = canary
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("poisoned") || err.to_string().contains("analysis"),
        "{err}"
    );
    assert!(
        seen.lock().unwrap().iter().all(|n| *n == 1),
        "{:?}",
        seen.lock().unwrap()
    );
    for i in 0..5 {
        fx.assert_live(i, "v1");
    }
    assert_eq!(fx.restarts(0), ["v1", "v2", "v1"]);
    for i in 1..5 {
        assert_eq!(fx.restarts(i), ["v1"]);
    }

    // Healthy canary: one host, analysis passes, then the rest.
    std::fs::remove_file(first_root.join("poison")).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let canary = Canary::new([20]).analysis(
        DiskMonitor {
            roots,
            seen: seen.clone(),
        },
        analysis,
    );
    let report = canary
        .deploy(&deployer, &fx.release("v2"), &targets, &cx)
        .await
        .expect("canary passes");
    assert_eq!(report.deployed.len(), 5);
    assert_eq!(seen.lock().unwrap().first(), Some(&1));
    for i in 0..5 {
        fx.assert_live(i, "v2");
    }
}

/// Kills a child process on drop (panics included).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_agent_authentication() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    let Some(agent_bin) = cd_testkit::require_tool("ssh-agent") else {
        return;
    };
    let Some(ssh_add) = cd_testkit::require_tool("ssh-add") else {
        return;
    };
    let sock = fx.fleet.dir().join("agent.sock");
    let _agent = KillOnDrop(
        std::process::Command::new(agent_bin)
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (cx, _) = collecting_cx();
    let targets = fx.deployer().targets();

    // An empty agent has nothing to offer: a typed auth error.
    let deployer = fx
        .builder_without_key()
        .agent_socket(&sock)
        .build()
        .unwrap();
    let err = deployer.current(&targets[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("ssh-agent"), "{err}");

    let out = std::process::Command::new(ssh_add)
        .arg(fx.fleet.user_key_path())
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deployer = fx
        .builder_without_key()
        .agent_socket(&sock)
        .build()
        .unwrap();
    Rolling::new()
        .batch_size(2)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .expect("deploys with the agent's key");
    fx.assert_live(0, "v1");
    fx.assert_live(1, "v1");

    // A key file the hosts refuse, then the agent: the agent's key is used.
    let both = fx
        .builder_without_key()
        .key_file(fx.fleet.unauthorized_key().unwrap())
        .agent_socket(&sock)
        .build()
        .unwrap();
    assert_eq!(
        both.current(&targets[1]).await.unwrap().map(|r| r.version),
        Some("v1".to_string())
    );
}

/// Answers `GET /health` with 200 and anything else with 503; counts hits.
async fn http_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let status = if path == "/health" {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                seen.lock().unwrap().push(path);
                let body =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_http_health_check_runs_on_the_host() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    if cd_testkit::require_tool("curl").is_none() {
        return;
    }
    let (port, hits) = http_server().await;
    let (cx, _) = collecting_cx();
    let good = fx
        .builder()
        .health_http(format!("http://127.0.0.1:{port}/health"))
        .build()
        .unwrap();
    let targets = good.targets();
    Rolling::new()
        .batch_size(2)
        .deploy(&good, &fx.release("v1"), &targets, &cx)
        .await
        .expect("healthy over HTTP");
    assert_eq!(hits.lock().unwrap().len(), 2);

    let bad = fx
        .builder()
        .health_http(format!("http://127.0.0.1:{port}/broken"))
        .build()
        .unwrap();
    let plan = bad
        .plan(
            &fx.release("v2"),
            &targets[1],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = bad.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.context("step"), Some("health"), "{err}");
    assert_eq!(err.context("host"), Some("host2"));
    assert!(hits.lock().unwrap().contains(&"/broken".to_string()));
    fx.assert_live(1, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_pipeline_failure_compensates_the_fleet() {
    use cd::core::{stage_fn, Error, MemoryStore, Pipeline, RunStatus, Runner, StageOutput};
    use cd::stages::Deploy;

    let Some(fx) = Fixture::start(3).await else {
        return;
    };
    let deployer = fx.deployer();
    let store = Arc::new(MemoryStore::new());
    let runner = Runner::new(store).environment("production");

    let deliver = Pipeline::builder("web")
        .stage(
            "production",
            Deploy::new(deployer.clone())
                .env("production")
                .rolling(2, 0),
        )
        .build()
        .unwrap();
    let report = runner.run(&deliver, fx.release("v1")).await.unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    for i in 0..3 {
        fx.assert_live(i, "v1");
    }

    // A smoke test after the deploy fails: the runner compensates, the
    // Deploy stage rolls the whole fleet back to v1.
    let with_smoke = Pipeline::builder("web")
        .stage(
            "production",
            Deploy::new(deployer.clone())
                .env("production")
                .rolling(2, 0),
        )
        .stage(
            "smoke",
            stage_fn(|_| async { Err::<StageOutput, _>(Error::failed("smoke test failed")) }),
        )
        .needs(["production"])
        .build()
        .unwrap();
    let report = runner.run(&with_smoke, fx.release("v2")).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    for i in 0..3 {
        fx.assert_live(i, "v1");
        assert_eq!(fx.restarts(i), ["v1", "v2", "v1"], "host{}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_timeout_and_cancellation_are_typed() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let (cx, _) = collecting_cx();
    let deployer = fx.deployer();
    let t = deployer.targets().remove(0);
    let plan = deployer
        .plan(
            &fx.release("v1"),
            &t,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    deployer.apply(&plan, &cx).await.unwrap();

    // A restart that hangs runs into the step timeout: retryable, names
    // host and step; the host is switched back to v1, and the hanging
    // process is signalled rather than left running on the host.
    let pid_file = fx.root(0).join("hang.pid");
    let hanging = fx
        .builder()
        .restart(format!(
            "if [ \"$CD_VERSION\" = v2 ]; then sleep 30 & echo $! > '{}'; wait; fi; {RESTART}",
            pid_file.display()
        ))
        .step_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let plan = hanging
        .plan(
            &fx.release("v2"),
            &t,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    // Without the step timeout the restart would finish (after 30 s) and
    // the apply succeed: the error kind is the logical check.
    let err = hanging.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.context("host"), Some("host1"));
    assert_eq!(err.context("step"), Some("restart"));
    fx.assert_live(0, "v1");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie nobody reaped yet: either way it stopped.
    while std::fs::read_to_string(&stat)
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the timed-out remote command (pid {}) still runs on the host; sshd log:\n{}",
            pid.trim(),
            fx.fleet.sshd_log(0)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A cancelled run stops before it changes anything.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let cancelled = DeployContext::new(Emitter::noop(), cancel, "test");
    let plan = deployer
        .plan(
            &fx.release("v3"),
            &t,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = deployer.apply(&plan, &cancelled).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    fx.assert_live(0, "v1");
    assert!(!fx.root(0).join("releases/v3").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_deployer_passes_the_conformance_suite() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    let deployer = fx.deployer();
    // `v3-slow` restarts for 2 s: the cancel lands in the restart step.
    let report =
        cd::core::conformance::Conformance::new(&deployer, fx.release("v1"), fx.release("v2"))
            .cancel_mid_apply(fx.release("v3-slow"), Duration::from_millis(800))
            .crash_after_each_step(true)
            .run()
            .await
            .unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.passed.len(), 11, "{report:?}");
    fx.assert_live(0, "v1");
}

/// Issue 9, case 3: a host whose `current` was switched but never restarted
/// (the deploy process died in between, or sshd did) is not reported on the
/// new release; applying it again restarts it. The same for a rollback
/// switched back but not restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_a_switched_but_never_restarted_host_is_not_live() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let d = fx.deployer();
    let t = d.targets().remove(0);
    let cx = DeployContext::detached("test");
    for v in ["v1", "v2"] {
        let plan = d.plan(&fx.release(v), &t, &cx).await.unwrap();
        d.apply(&plan, &cx).await.unwrap();
    }
    fx.assert_live(0, "v2");
    // Rolled back to v1 by a process that died after the switch: the
    // symlink says v1, nothing restarted.
    let root = fx.root(0);
    std::os::unix::fs::symlink("releases/v1", root.join(".crash")).unwrap();
    std::fs::rename(root.join(".crash"), root.join("current")).unwrap();
    let cur = d.current(&t).await.unwrap().unwrap();
    assert_eq!(cur.version, "v2", "v1 was switched to but never restarted");
    let restarts = fx.restarts(0).len();
    let back = d.rollback(&t, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert_eq!(
        fx.restarts(0).len(),
        restarts + 1,
        "the rollback restarted v1"
    );
    fx.assert_live(0, "v1");

    // Deploying v2 by a process that died after the switch: symlink v2,
    // v1 still running. current() says v1; applying v2 again restarts it.
    std::os::unix::fs::symlink("releases/v2", root.join(".crash")).unwrap();
    std::fs::rename(root.join(".crash"), root.join("current")).unwrap();
    assert_eq!(d.current(&t).await.unwrap().unwrap().version, "v1");
    let plan = d.plan(&fx.release("v2"), &t, &cx).await.unwrap();
    assert!(!plan.is_noop(), "a half-applied release is planned again");
    d.apply(&plan, &cx).await.unwrap();
    assert_eq!(fx.restarts(0).last().map(String::as_str), Some("v2"));
    fx.assert_live(0, "v2");
    assert_eq!(d.current(&t).await.unwrap().unwrap().version, "v2");
}

/// Issue 10, case 3: a release name read back from a host goes into no
/// command unless it passes the version rule: a host whose `current` points
/// at `x;touch${IFS}marker` gets a typed error naming host and value, and
/// nothing is switched or run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_a_hostile_name_read_back_from_a_host_is_refused() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let d = fx.deployer();
    let t = d.targets().remove(0);
    let cx = DeployContext::detached("test");
    let root = fx.root(0);
    let evil = "x;touch${IFS}marker";
    std::fs::create_dir_all(root.join("releases").join(evil)).unwrap();
    std::os::unix::fs::symlink(format!("releases/{evil}"), root.join("current")).unwrap();
    let plan = d.plan(&fx.release("v2"), &t, &cx).await.unwrap();
    let err = d.apply(&plan, &cx).await.unwrap_err();
    assert!(err.to_string().contains("x;touch"), "{err}");
    assert_eq!(err.context("host"), Some(fx.fleet.host(0).name.as_str()));
    assert_eq!(
        fx.current_on_disk(0).as_deref(),
        Some(format!("releases/{evil}").as_str()),
        "nothing was switched"
    );
    assert!(!root.join("marker").exists());
    assert!(fx.restarts(0).is_empty(), "nothing was restarted");
}

/// Issue 10, typed errors: the `SshError` behind a deployer error is its
/// `source()`, so callers match on the type, not the text; the report's
/// `ErrorInfo` keeps the context pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_errors_stay_typed() {
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    fx.fleet.stop_host(0).await.unwrap();
    let d = fx.deployer();
    let t = d.targets().remove(0);
    let err = d.current(&t).await.unwrap_err();
    let typed = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<cd::backends::ssh::SshError>())
        .expect("the SshError is the source");
    assert!(
        matches!(typed, cd::backends::ssh::SshError::Connect { .. }),
        "{typed:?}"
    );
    let info = err.to_info();
    assert!(info
        .context
        .iter()
        .any(|(k, v)| k == "host" && v == &fx.fleet.host(0).name));
    fx.fleet.start_host(0).await.unwrap();
}

/// A rollback cut short after its switch leaves the host running v2 with
/// `current` pointing at v1: deploying v2 through a strategy must not skip it
/// as "already live" (found by the chaos test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_an_unsettled_host_is_not_skipped_as_already_live() {
    use cd::core::{Rolling, Strategy};
    let Some(fx) = Fixture::start(1).await else {
        return;
    };
    let d = fx.deployer();
    let cx = DeployContext::detached("test");
    for v in ["v1", "v2"] {
        Rolling::new()
            .deploy(&d, &fx.release(v), &d.targets(), &cx)
            .await
            .unwrap();
    }
    let root = fx.root(0);
    std::os::unix::fs::symlink("releases/v1", root.join(".crash")).unwrap();
    std::fs::rename(root.join(".crash"), root.join("current")).unwrap();
    let restarts = fx.restarts(0).len();
    let report = Rolling::new()
        .deploy(&d, &fx.release("v2"), &d.targets(), &cx)
        .await
        .unwrap();
    assert_eq!(report.deployed[0].version, "v2");
    assert_eq!(fx.restarts(0).len(), restarts + 1, "v2 restarted");
    fx.assert_live(0, "v2");
}

/// Issue 11: the health check can be made from the deploy machine (over
/// cd-stages' HTTP client), against each host's address: a host whose new
/// release answers 503 there is switched back, and the error names the
/// host, the step and the HTTP status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_health_checked_from_the_deploy_machine() {
    let Some(fx) = Fixture::start(2).await else {
        return;
    };
    // Answers `GET /health/<host>`: 200 while that host's `current` is v1.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let roots: Vec<(String, PathBuf)> = fx
        .fleet
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.clone(), fx.root(i)))
        .collect();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let roots = roots.clone();
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let host = path.trim_start_matches("/health/");
                let live = roots
                    .iter()
                    .find(|(name, _)| name == host)
                    .and_then(|(_, root)| std::fs::read_link(root.join("current")).ok())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let status = if live.ends_with("v1") {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let deployer = fx
        .builder()
        .health_http_from_deployer(format!("http://{{host}}:{port}/health/{{name}}"))
        .build()
        .unwrap();
    let (cx, _) = collecting_cx();
    let targets = deployer.targets();
    Rolling::new()
        .batch_size(2)
        .deploy(&deployer, &fx.release("v1"), &targets, &cx)
        .await
        .unwrap();
    fx.assert_live(0, "v1");
    fx.assert_live(1, "v1");
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the deploy machine checked each host"
    );

    let plan = deployer
        .plan(
            &fx.release("v2"),
            &targets[1],
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    let err = deployer.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    assert_eq!(err.context("host"), Some(fx.fleet.host(1).name.as_str()));
    assert_eq!(err.context("step"), Some("health"));
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    fx.assert_live(1, "v1");
}
