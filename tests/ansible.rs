//! The Ansible deployer against real ansible-playbook (ansible-core from
//! scripts/setup.sh's virtualenv) and real sshd hosts (cd-testkit's
//! SshFleet on 127.0.0.2…).
//!
//! Tool path: `CD_ANSIBLE_PLAYBOOK` when set, else the set-up script's
//! `~/.cache/cd-tools/venv/bin/ansible-playbook`. A missing tool fails the
//! test when `CI` or `CD_SETUP_DONE` is set, and skips it loudly otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cd_backends::ansible::{AnsibleDeployer, AnsibleHost, TaskStatus};
use cd_core::{
    ChangeAction, CollectingSink, DeployContext, Deployer, Emitter, ErrorKind, Event, EventKind,
    Redactor, Release,
};
use cd_testkit::SshFleet;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn ansible_playbook() -> Option<PathBuf> {
    match std::env::var_os("CD_ANSIBLE_PLAYBOOK").filter(|v| !v.is_empty()) {
        Some(p) => cd_testkit::require_tool(&PathBuf::from(p).to_string_lossy()),
        None => cd_testkit::require_tool("ansible-playbook"),
    }
}

/// The hosts are this machine: use its system Python (ansible's discovery
/// may find a pyenv shim that does not work in a non-interactive session).
fn remote_python() -> String {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        return system.display().to_string();
    }
    cd_testkit::tools_dir()
        .join("venv/bin/python")
        .display()
        .to_string()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ansible")
        .join(name)
}

/// The fleet's hosts, all in group `web`, each with its root directory as
/// the host variable `host_root`.
fn hosts(fleet: &SshFleet) -> Vec<AnsibleHost> {
    fleet
        .hosts()
        .iter()
        .map(|h| {
            AnsibleHost::new(&h.name)
                .address(&h.ip)
                .port(h.port)
                .user(fleet.user())
                .key_file(fleet.user_key_path())
                .groups(["web"])
                .var("host_root", h.root.display().to_string())
        })
        .collect()
}

/// A deployer running `playbook` on the fleet; state kept in `state`.
fn deployer_for(playbook: &str, bin: &Path, fleet: &SshFleet, state: &Path) -> AnsibleDeployer {
    AnsibleDeployer::new(fixture(playbook))
        .binary(bin)
        .known_hosts(fleet.known_hosts_path())
        .state_dir(state)
        .connect_timeout(5)
        .python_interpreter(remote_python())
        .pipelining(true)
        .hosts_from(hosts(fleet))
}

/// The deployer for `site.yml`.
fn deployer(bin: &Path, fleet: &SshFleet, state: &Path) -> AnsibleDeployer {
    deployer_for("site.yml", bin, fleet, state)
}

fn context() -> (DeployContext, CollectingSink) {
    let sink = CollectingSink::new();
    let emitter = Emitter::new("test", 1, vec![Arc::new(sink.clone())], Redactor::default());
    (
        DeployContext::new(emitter, CancellationToken::new(), "test"),
        sink,
    )
}

fn config_of(root: &Path) -> Value {
    let text = std::fs::read_to_string(root.join("app/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn statuses<'a>(events: &'a [Event], host: &str, task: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Progress {
                target: Some(t),
                step,
                status,
                ..
            } if t == host && step == task => Some(status.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn playbook_on_three_hosts_with_per_host_events_and_rollback() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(3).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path());
    assert_eq!(ansible.targets().len(), 3);
    let web = ansible.group_target("web");
    let (cx, sink) = context();

    // A value that would break any shell quoting.
    let motd = "it's \"quoted\"; $(touch /tmp/pwned) `x` \\ done";
    let v1 = Release::new("v1")
        .config("color", "blue")
        .config("motd", motd);
    let plan = ansible.plan_in(&v1, &web, &cx).await.unwrap();
    let rev = ansible.apply(&plan, &cx).await.unwrap();
    assert_eq!(rev.version, "v1");

    for h in fleet.hosts() {
        let config = config_of(&h.root);
        assert_eq!(config["version"], "v1");
        assert_eq!(config["color"], "blue");
        assert_eq!(config["motd"], motd);
        assert_eq!(
            std::fs::read_to_string(h.root.join("app/restarted")).unwrap(),
            "v1\n"
        );
    }
    let events = sink.events();
    for h in fleet.hosts() {
        let s = statuses(&events, &h.name, "write the config");
        assert!(
            s.contains(&"would_change"),
            "check run for {}: {s:?}",
            h.name
        );
        assert!(s.contains(&"started"), "{}: {s:?}", h.name);
        assert!(s.contains(&"changed"), "{}: {s:?}", h.name);
        assert!(statuses(&events, &h.name, "check health").contains(&"skipped"));
        assert!(statuses(&events, &h.name, "recap").contains(&"ok"));
    }

    // v2, then back to v1.
    let v2 = Release::new("v2").config("color", "green");
    let plan = ansible.plan_in(&v2, &web, &cx).await.unwrap();
    assert!(plan
        .changes
        .iter()
        .any(|c| c.action == ChangeAction::Update && c.address == "host1: write the config"));
    ansible.apply(&plan, &cx).await.unwrap();
    assert_eq!(config_of(&fleet.host(2).root)["color"], "green");
    assert_eq!(ansible.current(&web).await.unwrap().unwrap().version, "v2");

    let back = ansible.rollback(&web, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    for h in fleet.hosts() {
        let config = config_of(&h.root);
        assert_eq!(config["version"], "v1");
        assert_eq!(config["color"], "blue");
        assert_eq!(config["motd"], motd);
    }
    assert_eq!(ansible.current(&web).await.unwrap().unwrap().version, "v1");
    assert!(!Path::new("/tmp/pwned").exists());
}

#[tokio::test]
async fn check_mode_changes_nothing_on_disk() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(3).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path());
    let web = ansible.group_target("web");
    let plan = ansible
        .plan(
            &Release::new("v1"),
            &web,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    for h in fleet.hosts() {
        for task in [
            "create the app directory",
            "write the config",
            "restart the app",
        ] {
            let address = format!("{}: {task}", h.name);
            let change = plan.changes.iter().find(|c| c.address == address);
            assert_eq!(
                change.map(|c| c.action),
                Some(ChangeAction::Update),
                "{address}"
            );
        }
        assert!(
            !h.root.join("app").exists(),
            "check mode wrote to {}",
            h.name
        );
    }
    assert!(ansible.current(&web).await.unwrap().is_none());

    // Once applied, a second check shows nothing to change.
    let (cx, _) = context();
    ansible.apply(&plan, &cx).await.unwrap();
    let before = std::fs::read(fleet.host(0).root.join("app/config.json")).unwrap();
    let again = ansible
        .plan(
            &Release::new("v1"),
            &web,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert!(again.is_noop(), "{:?}", again.changes);
    let other = ansible
        .plan(
            &Release::new("v2"),
            &web,
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap();
    assert!(!other.is_noop());
    assert_eq!(
        std::fs::read(fleet.host(0).root.join("app/config.json")).unwrap(),
        before
    );
}

#[tokio::test]
async fn one_failing_host_names_host_and_task() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(3).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path());
    let web = ansible.group_target("web");
    let (cx, sink) = context();
    // Check mode skips nothing here: `fail` runs in check mode too.
    let release = Release::new("v1").config("fail_on", "host2");
    let err = ansible.plan_in(&release, &web, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed, "{err}");
    assert_eq!(err.context("host"), Some("host2"), "{err}");
    assert_eq!(err.context("task"), Some("check health"), "{err}");
    assert!(
        err.message().contains("health check failed on host2"),
        "{err}"
    );

    // The real run: the other hosts finish, host2 stops at the failing task.
    let (report, _) = ansible
        .run_playbook(
            None,
            &release,
            Some("web"),
            cd_backends::ansible::RunMode::Apply,
            &cx,
        )
        .await
        .unwrap();
    assert_eq!(report.failures().len(), 1);
    assert_eq!(
        report.result("host1", "restart the app").map(|r| r.status),
        Some(TaskStatus::Changed)
    );
    assert!(report.result("host2", "restart the app").is_none());
    assert_eq!(report.stats["host2"].failed, 1);
    let e: cd_core::Error = report.error("").unwrap().into();
    assert_eq!(e.context("host"), Some("host2"));
    assert!(statuses(&sink.events(), "host2", "check health").contains(&"failed"));
}

#[tokio::test]
async fn unreachable_host_is_reported_as_unreachable() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(3).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path());
    let web = ansible.group_target("web");
    fleet.stop_host(2).await.unwrap();
    let (cx, sink) = context();
    let err = ansible
        .plan_in(&Release::new("v1"), &web, &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(err.context("host"), Some("host3"), "{err}");
    assert!(err.message().contains("unreachable"), "{err}");
    assert_eq!(err.context("unreachable"), Some("host3"));
    assert!(statuses(&sink.events(), "host3", "recap").contains(&"unreachable"));
    // The reachable hosts were planned.
    assert!(statuses(&sink.events(), "host1", "write the config").contains(&"would_change"));

    // Per-host targets: the reachable host deploys on its own.
    let host1 = ansible.targets().into_iter().next().unwrap();
    let plan = ansible
        .plan_in(&Release::new("v1"), &host1, &cx)
        .await
        .unwrap();
    ansible.apply(&plan, &cx).await.unwrap();
    assert_eq!(config_of(&fleet.host(0).root)["version"], "v1");
    assert!(!fleet.host(1).root.join("app").exists());
}

#[tokio::test]
async fn rollback_playbook_named_by_the_user() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(3).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path()).rollback_playbook(fixture("rollback.yml"));
    let web = ansible.group_target("web");
    let (cx, _) = context();
    for (v, color) in [("v1", "blue"), ("v2", "red")] {
        let plan = ansible
            .plan_in(&Release::new(v).config("color", color), &web, &cx)
            .await
            .unwrap();
        ansible.apply(&plan, &cx).await.unwrap();
    }
    let back = ansible.rollback(&web, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    for h in fleet.hosts() {
        assert_eq!(
            std::fs::read_to_string(h.root.join("app/rolled_back")).unwrap(),
            "v2 -> v1\n"
        );
        assert_eq!(config_of(&h.root)["color"], "blue");
    }
}

#[tokio::test]
async fn missing_binary_names_the_binary_and_the_setting() {
    let ansible = AnsibleDeployer::new(fixture("site.yml"))
        .binary("/nonexistent/ansible-playbook-xyz")
        .state_dir(tempfile::tempdir().unwrap().path())
        .host(AnsibleHost::new("h").address("127.0.0.1"));
    let err = ansible
        .plan(
            &Release::new("v1"),
            &ansible.group_target("all"),
            &cd::core::DeployContext::detached("test"),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/ansible-playbook-xyz"), "{text}");
    assert!(text.contains("CD_ANSIBLE_PLAYBOOK"), "{text}");
    assert!(text.contains("AnsibleDeployer::binary"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

#[tokio::test]
async fn cancelling_a_run_interrupts_ansible_playbook() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(1).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer_for("slow.yml", &bin, &fleet, state.path());
    let target = ansible.group_target("all");
    let (cx, sink) = context();
    // Check mode skips `command`, so plan in check mode first, then apply.
    let plan = ansible
        .plan_in(&Release::new("v1"), &target, &cx)
        .await
        .unwrap();
    // Interrupt once the 60 s task has started on the host (a condition,
    // not a guess at timing).
    let cancel = cx.cancel.clone();
    let watching = sink.clone();
    let host = fleet.host(0).name.clone();
    tokio::spawn(async move {
        while !statuses(&watching.events(), &host, "wait a long time").contains(&"started") {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        cancel.cancel();
    });
    let err = ansible.apply(&plan, &cx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    // The interrupt cut the task short: it never finished on the host.
    let events = sink.events();
    let task = statuses(&events, &fleet.host(0).name, "wait a long time");
    assert!(
        !task.contains(&"ok") && !task.contains(&"changed"),
        "the task ran to its end despite the interrupt: {task:?}"
    );
    assert!(ansible.current(&target).await.unwrap().is_none());
}

/// Issue 8, case 2: a node timeout interrupts ansible-playbook (its whole
/// process group) and stops the command the run started on the host, which
/// sshd would otherwise leave running (no terminal with pipelining), before
/// the node is reported; the timed-out deploy is not retried by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_timeout_stops_ansible_and_the_command_it_started_on_the_host() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(1).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    // A value no other test uses: the remote `sleep` is found by it.
    let hang = format!("30.{}{}", std::process::id(), line!());
    let service = format!("60.{}{}", std::process::id(), line!());
    let hosts: Vec<AnsibleHost> = hosts(&fleet)
        .into_iter()
        .map(|h| {
            h.var("hang_secs", hang.clone())
                .var("service_secs", service.clone())
        })
        .collect();
    let ansible = AnsibleDeployer::new(fixture("hang.yml"))
        .binary(&bin)
        .known_hosts(fleet.known_hosts_path())
        .state_dir(state.path())
        .connect_timeout(5)
        .python_interpreter(remote_python())
        .pipelining(true)
        .hosts_from(hosts);
    let sink = CollectingSink::new();
    let pipeline = cd_core::Pipeline::builder("hosts")
        .stage("configure", cd_stages::Deploy::new(ansible).env("hosts"))
        .timeout(std::time::Duration::from_secs(8))
        .build()
        .unwrap();
    let runner = cd_core::Runner::new(Arc::new(cd_core::MemoryStore::new()))
        .environment("hosts")
        .sink(sink.clone());
    // The remote command must have started before the timeout: wait for it
    // while the run goes on.
    let needle = format!("sleep {hang}");
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { runner.run(&pipeline, Release::new("v1")).await }
    });
    let end = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while cd_testkit::processes_matching(&needle).is_empty() {
        assert!(
            std::time::Instant::now() < end,
            "the remote command never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.status, cd_core::RunStatus::Failed, "{report}");
    let node = report.node("configure").unwrap();
    assert_eq!(node.attempts, 1, "a timed-out deploy is not retried");
    assert_eq!(node.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    // Gone when the report is given (a short allowance for the kernel to
    // reap what was killed).
    let left = cd_testkit::wait_until_gone(&needle, std::time::Duration::from_secs(2)).await;
    assert!(
        left.is_empty(),
        "the remote command is still running: {left:?}"
    );
    let playbook = fixture("hang.yml").display().to_string();
    let controller = cd_testkit::processes_matching(&playbook);
    assert!(
        controller.is_empty(),
        "ansible-playbook left: {controller:?}"
    );
    let stop = sink
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::Progress { step, message, .. } if step == "stop" => message,
            _ => None,
        })
        .expect("a stop event");
    assert!(stop.contains("stopped processes"), "{stop}");
    // The service an earlier, finished task started is left alone.
    let services = cd_testkit::processes_matching(&format!("sleep {service}"));
    assert_eq!(services.len(), 1, "{services:?}");
    for (pid, _) in services {
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &pid.to_string()])
            .status();
    }
}

/// The deployer conformance suite against real ansible-playbook on two
/// hosts: rollback with and without a revision, rolling back a first
/// release, both hosts at once, an apply cancelled while a task works on
/// the hosts, and re-applying after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ansible_deployer_passes_the_conformance_suite() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(2).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let ansible = deployer(&bin, &fleet, state.path()).rollback_playbook(fixture("rollback.yml"));
    let (cx, _) = context();
    // `v3-slow` settles for 6 s after writing its config: the cancel lands
    // then, with the hosts half-way.
    let slow = Release::new("v3-slow").config("settle_seconds", 6);
    let report = cd_core::conformance::Conformance::new(
        &ansible,
        Release::new("v1"),
        Release::new("v2").config("color", "green"),
    )
    .cancel_mid_apply(slow, std::time::Duration::from_secs(4))
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
    assert_eq!(config_of(&fleet.host(0).root)["version"], "v1");
}

/// Issue 10, case 2: values from the release reach the playbook as text:
/// a template in a release's config is written out literally, never run on
/// the controller.
#[tokio::test]
async fn release_values_are_never_templated() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(1).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let marker = state.path().join("pwned");
    let template = format!("{{{{ lookup('pipe', 'touch {}') }}}}", marker.display());
    let ansible = deployer(&bin, &fleet, state.path());
    let target = ansible.targets().remove(0);
    let (cx, _) = context();
    let release = Release::new("v1").config("motd", template.clone());
    let plan = ansible.plan(&release, &target, &cx).await.unwrap();
    ansible.apply(&plan, &cx).await.unwrap();
    assert!(
        !marker.exists(),
        "the release's template ran on the controller"
    );
    assert_eq!(config_of(&fleet.host(0).root)["motd"], template.as_str());
}

/// Issue 10, case 1 and secrets in releases: a release secret reaches the
/// host verbatim (never templated), a `no_log` task's output and diff are
/// withheld, another task's diff shows `***` in its place, and no event nor
/// file of the deployer holds it; the history keeps its name only.
#[tokio::test]
async fn secrets_reach_the_host_and_no_event_or_file_keeps_them() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(1).await.unwrap() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    const PW: &str = "pa\"ss{{ 7 * 7 }}w0rd-91c2";
    let json_pw = serde_json::to_string(PW).unwrap();
    let json_pw = json_pw[1..json_pw.len() - 1].to_string();
    let ansible = deployer_for("secret.yml", &bin, &fleet, state.path());
    let target = ansible.targets().remove(0);
    let (cx, sink) = context();
    let release = Release::new("v1").secret("db_password", cd_core::Secret::new(PW.to_string()));
    let plan = ansible.plan_in(&release, &target, &cx).await.unwrap();
    ansible.apply(&plan, &cx).await.unwrap();

    let root = &fleet.host(0).root;
    assert_eq!(
        std::fs::read_to_string(root.join("app/password")).unwrap(),
        PW
    );
    assert_eq!(
        std::fs::read_to_string(root.join("app/dsn")).unwrap(),
        format!("postgres://app:{PW}@db/v1\n")
    );
    let events = serde_json::to_string(&sink.events()).unwrap();
    for needle in [PW, json_pw.as_str(), "w0rd-91c2"] {
        assert!(!events.contains(needle), "an event holds {needle:?}");
    }
    assert!(
        events.contains("postgres://app:***@db/v1"),
        "the dsn diff is shown with the secret scrubbed"
    );
    let no_log: Vec<String> = sink
        .events()
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .filter(|text| text.contains("write the password file"))
        .collect();
    assert!(!no_log.is_empty(), "the no_log task reports its status");
    for text in &no_log {
        assert!(
            !text.contains("before") && !text.contains("after"),
            "a no_log task's diff was emitted: {text}"
        );
    }
    let history = ansible.history(&target).await.unwrap();
    assert_eq!(history[0].secrets, ["db_password"]);
    assert!(history[0].config.is_empty());
    let left = cd_testkit::files_holding(state.path(), "w0rd-91c2", &[]);
    assert!(left.is_empty(), "the secret is in {left:?}");
}

/// Issue 10, one home for durable state: two controllers with their own
/// state directories over one SQLite store agree on what is live, and one
/// rolls back what the other applied.
#[tokio::test]
async fn two_controllers_sharing_a_store_agree_on_current_and_rollback() {
    let Some(bin) = ansible_playbook() else {
        return;
    };
    let Some(fleet) = SshFleet::start_or_skip(1).await.unwrap() else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let store: Arc<dyn cd_core::Store> = Arc::new(
        cd_backends::sqlite::SqliteStore::open(shared.path().join("state.db"))
            .await
            .unwrap(),
    );
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = deployer(&bin, &fleet, state_a.path()).store(store.clone(), "web");
    let b = deployer(&bin, &fleet, state_b.path()).store(store.clone(), "web");
    let target = a.targets().remove(0);
    let (cx, _) = context();
    let plan = a
        .plan(&Release::new("v1").config("color", "blue"), &target, &cx)
        .await
        .unwrap();
    a.apply(&plan, &cx).await.unwrap();
    let plan = b
        .plan(&Release::new("v2").config("color", "green"), &target, &cx)
        .await
        .unwrap();
    b.apply(&plan, &cx).await.unwrap();
    for d in [&a, &b] {
        assert_eq!(d.current(&target).await.unwrap().unwrap().version, "v2");
    }
    let back = a.rollback(&target, None, &cx).await.unwrap().unwrap();
    assert_eq!(back.version, "v1");
    assert_eq!(config_of(&fleet.host(0).root)["color"], "blue");
    for d in [&a, &b] {
        assert_eq!(d.current(&target).await.unwrap().unwrap().version, "v1");
        assert_eq!(d.history(&target).await.unwrap().len(), 3);
    }
    for s in [&state_a, &state_b] {
        assert!(!s.path().join("history").exists());
    }
}
