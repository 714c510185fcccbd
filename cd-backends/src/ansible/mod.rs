//! Ansible-managed hosts as a [`Deployer`]: ansible-playbook run against an
//! inventory generated from the pipeline's targets.
//!
//! - **inventory** from targets ([`AnsibleHost`]: address, port, user, key,
//!   groups, host vars), written per run as a JSON inventory.
//! - **variables**: the release's configuration (plus `cd_release_version`
//!   and `cd_release_artifact`) passed as `-e @<file>.json`, never as
//!   shell-quoted strings.
//! - **plan** = `ansible-playbook --check --diff`: every task that would
//!   change something on a host is a [`cd_core::Change`] (`<host>: <task>`).
//! - **results**: a JSON-lines callback plugin shipped with the crate
//!   (`cd_jsonl`, written next to the run and selected through
//!   `ANSIBLE_CALLBACK_PLUGINS` / `ANSIBLE_STDOUT_CALLBACK`) gives one event
//!   per task and host and a typed [`PlaybookReport`]; a failure names host,
//!   task and message; unreachable hosts are reported as unreachable
//!   ([`cd_core::ErrorKind::Unavailable`]).
//! - **rollback**: the previous release's variables again, or a rollback
//!   playbook the user names ([`AnsibleDeployer::rollback_playbook`]).
//!
//! A [`Target`] is one host (`--limit <host>`), or a group made with
//! [`AnsibleDeployer::group_target`] (`--limit <group>`): rollout strategies
//! go host by host, a plain deploy runs the whole group in one playbook run.
//! Each target keeps its own release history, which `current()` and
//! `rollback` read: in the store with [`AnsibleDeployer::store`] (every
//! controller sharing the store agrees on what is live), else in
//! `<state dir>/history/<target>.json` (this machine only).
//!
//! **Secrets**: a release's secret values ([`Release::secret`]) and
//! [`AnsibleDeployer::secret_var`]s are extra vars like the rest, marked
//! unsafe for templating, in an owner-only file removed when the run ends
//! (whatever the outcome); their text is scrubbed from events, and the
//! history keeps their names only. Tasks marked `no_log` have their output,
//! messages and `--diff` withheld by the callback plugin.
//!
//! ```no_run
//! use cd_backends::ansible::{AnsibleDeployer, AnsibleHost};
//! use cd_core::{DeployContext, Deployer, Release};
//!
//! # async fn demo() -> cd_core::Result<()> {
//! let web = AnsibleDeployer::new("deploy/site.yml")
//!     .host(AnsibleHost::new("web1").address("10.0.0.1").user("deploy").groups(["web"]))
//!     .host(AnsibleHost::new("web2").address("10.0.0.2").user("deploy").groups(["web"]))
//!     .known_hosts("~/.ssh/known_hosts");
//! let all = web.group_target("web");
//! let cx = DeployContext::detached("production");
//! let plan = web.plan(&Release::new("v7").config("app_port", 8080), &all, &cx).await?;
//! for change in &plan.changes {
//!     println!("would change {}", change.address);
//! }
//! web.apply(&plan, &cx).await?;
//! # Ok(()) }
//! ```

mod error;

use crate::history::{write_private as write_private_io, HistoryHome, RemoveOnDrop, SecretMemory};
use crate::process_group::{drive, GroupGuard};
mod inventory;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    Change, ChangeAction, DeployContext, Deployer, DeployerCapabilities, Emitter, LogLevel, Plan,
    Release, Result, Revision, Secret, Store, Target,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Mutex;

pub use error::{AnsibleError, HostFailure};
pub use inventory::{
    inventory_json, AnsibleHost, GROUPS_LABEL, KEY_LABEL, LIMIT_LABEL, USER_LABEL,
};
pub use report::{CallbackLine, HostStats, PlaybookReport, TaskResult, TaskStatus};

/// The environment variable naming ansible-playbook when
/// [`AnsibleDeployer::binary`] is not set.
pub const ANSIBLE_PLAYBOOK_ENV: &str = "CD_ANSIBLE_PLAYBOOK";

/// The callback plugin shipped with the crate.
pub const CALLBACK_PLUGIN: &str = include_str!("cd_jsonl.py");

/// The callback plugin's name (`ANSIBLE_STDOUT_CALLBACK`).
pub const CALLBACK_NAME: &str = "cd_jsonl";

/// How long ansible-playbook gets to stop after an interrupt before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

/// How long the clean-up play that stops an interrupted run's processes on
/// the hosts may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The environment variable that marks every process a task starts on the
/// hosts, `<run id>/<task uuid>` (set by the callback plugin as the task's
/// `environment` before the task is queued).
pub const RUN_MARKER_VAR: &str = "CD_ANSIBLE_RUN_ID";

/// The clean-up play: on each host, stops the processes whose environment
/// carries one of the markers of the tasks still running when the run was
/// interrupted (TERM, then KILL after 5 s). Processes started by tasks that
/// had finished (a service an earlier task started) carry another marker and
/// are left alone. With `ansible_become` set for a host, it looks with
/// `become` (processes of privileged tasks). Linux hosts (`/proc`).
/// `@MARKERS@` is replaced by a JSON list of `CD_ANSIBLE_RUN_ID=<run>/<task>`.
const STOP_PLAYBOOK: &str = r#"# Written by the cd library: stops what an interrupted run started.
- name: stop the processes of an interrupted cd run
  hosts: all
  gather_facts: false
  vars:
    cd_stop_markers: @MARKERS@
  tasks:
    - name: stop the processes of the tasks that were running
      become: "{{ ansible_become | default(false) | bool }}"
      ansible.builtin.shell: |
        pids=""
        for d in /proc/[0-9]*; do
          if tr '\000' '\n' < "$d/environ" 2>/dev/null | grep -qxF{% for m in cd_stop_markers %} -e {{ m | quote }}{% endfor %}; then
            pids="$pids $(basename "$d")"
          fi
        done
        alive="$pids"
        if [ -n "$pids" ]; then
          kill -s TERM $pids 2>/dev/null || true
          n=0
          while [ $n -lt 20 ]; do
            alive=""
            for p in $pids; do
              if [ -r "/proc/$p/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status"; then
                alive="$alive $p"
              fi
            done
            [ -z "$alive" ] && break
            sleep 0.25
            n=$((n+1))
          done
          if [ -n "$alive" ]; then kill -s KILL $alive 2>/dev/null || true; fi
        fi
        echo $pids
      register: cd_stopped
      changed_when: cd_stopped.stdout | length > 0
"#;

/// Whether a run changes things or only reports what it would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    /// `--check --diff`: changes nothing.
    Check,
    /// A real run (with `--diff` when [`AnsibleDeployer::diff`] is on).
    Apply,
}

/// One release applied to one target, as kept in the deployer's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedRelease {
    /// The release version.
    pub version: String,
    /// The release configuration (the extra vars).
    pub config: BTreeMap<String, Value>,
    /// The names of the release's secret values (extra vars never
    /// stored): a rollback to this release needs them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The artifact path, if the release had one.
    #[serde(default)]
    pub artifact: Option<PathBuf>,
    /// Tasks that changed something, per host.
    #[serde(default)]
    pub changed: BTreeMap<String, u64>,
    /// When it was applied.
    pub at: DateTime<Utc>,
    /// Set when this entry is a rollback: the version rolled back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// Set when a rollback playbook undid the first release: nothing is live.
    #[serde(default)]
    pub removed: bool,
}

/// Runs a playbook against hosts. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct AnsibleDeployer {
    playbook: PathBuf,
    rollback_playbook: Option<PathBuf>,
    binary: Option<PathBuf>,
    hosts: Vec<AnsibleHost>,
    vars: BTreeMap<String, Value>,
    env: Vec<(String, String)>,
    known_hosts: Option<PathBuf>,
    ssh_args: Option<String>,
    python: Option<String>,
    forks: Option<u32>,
    pipelining: Option<bool>,
    diff: bool,
    timeout: Option<u32>,
    extra_args: Vec<String>,
    state_dir: Option<PathBuf>,
    history_home: Option<HistoryHome>,
    secret_vars: BTreeMap<String, Secret<Value>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    history: Mutex<()>,
    /// Secret values of releases applied in this process, by target and
    /// version, for a rollback to them (never written anywhere durable).
    secrets: SecretMemory,
}

impl AnsibleDeployer {
    /// A deployer running `playbook` with `ansible-playbook` (from
    /// `CD_ANSIBLE_PLAYBOOK`, else on `PATH`).
    pub fn new(playbook: impl Into<PathBuf>) -> Self {
        AnsibleDeployer {
            playbook: absolute(playbook.into()),
            rollback_playbook: None,
            binary: None,
            hosts: Vec::new(),
            vars: BTreeMap::new(),
            env: Vec::new(),
            known_hosts: None,
            ssh_args: None,
            python: None,
            forks: None,
            pipelining: None,
            diff: true,
            timeout: None,
            extra_args: Vec::new(),
            state_dir: None,
            history_home: None,
            secret_vars: BTreeMap::new(),
            shared: Arc::new(Shared::default()),
        }
    }

    /// The ansible-playbook binary.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Adds a host.
    pub fn host(mut self, host: AnsibleHost) -> Self {
        self.hosts.push(host);
        self
    }

    /// Adds several hosts.
    pub fn hosts_from<I: IntoIterator<Item = AnsibleHost>>(mut self, hosts: I) -> Self {
        self.hosts.extend(hosts);
        self
    }

    /// Adds hosts from pipeline targets (see [`AnsibleHost::from_target`]).
    pub fn targets_from<I: IntoIterator<Item = Target>>(mut self, targets: I) -> Self {
        self.hosts
            .extend(targets.into_iter().map(|t| AnsibleHost::from_target(&t)));
        self
    }

    /// A playbook that undoes a release, run by [`Deployer::rollback`] with
    /// the previous release's variables and `cd_rollback_from` /
    /// `cd_rollback_to`. Without it, rollback runs the main playbook with
    /// the previous release's variables.
    pub fn rollback_playbook(mut self, playbook: impl Into<PathBuf>) -> Self {
        self.rollback_playbook = Some(absolute(playbook.into()));
        self
    }

    /// A variable for every run (all hosts); the release's configuration wins.
    pub fn var(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// A secret extra var for every release: passed like
    /// [`AnsibleDeployer::var`] but marked unsafe for templating, scrubbed
    /// from events and never stored (the release's own secrets,
    /// [`Release::secret`], win). A rollback to a release whose secrets this
    /// process did not see takes their values from here.
    pub fn secret_var(mut self, name: impl Into<String>, value: Secret<String>) -> Self {
        self.secret_vars
            .insert(name.into(), Secret::new(Value::String(value.into_inner())));
        self
    }

    /// Keeps the release history in `store` under `scope` (a name for what
    /// this playbook deploys, the same on every controller: `web-fleet`),
    /// instead of in files under the state directory. Every deployer
    /// sharing the store and scope agrees on `current()` and rolls back to
    /// the same release, whichever machine applied it.
    pub fn store(mut self, store: Arc<dyn Store>, scope: impl Into<String>) -> Self {
        self.history_home = Some(HistoryHome::Store {
            store,
            scope: format!("ansible:{}", scope.into()),
        });
        self
    }

    /// An environment variable for ansible-playbook.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Verify host keys against this known_hosts file (strictly).
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_hosts = Some(expand_home(path.into()));
        self
    }

    /// Extra arguments for every ssh connection (`ansible_ssh_common_args`).
    pub fn ssh_args(mut self, args: impl Into<String>) -> Self {
        self.ssh_args = Some(args.into());
        self
    }

    /// The Python interpreter on the hosts (`ansible_python_interpreter`);
    /// default: ansible's discovery.
    pub fn python_interpreter(mut self, path: impl Into<String>) -> Self {
        self.python = Some(path.into());
        self
    }

    /// `--forks` (default: the number of hosts, at least 5).
    pub fn forks(mut self, n: u32) -> Self {
        self.forks = Some(n);
        self
    }

    /// SSH pipelining (`ANSIBLE_PIPELINING`); by default the user's
    /// ansible configuration decides.
    pub fn pipelining(mut self, on: bool) -> Self {
        self.pipelining = Some(on);
        self
    }

    /// `--diff` on real runs too (default on; check runs always diff).
    pub fn diff(mut self, on: bool) -> Self {
        self.diff = on;
        self
    }

    /// SSH connection timeout in seconds (`--timeout`).
    pub fn connect_timeout(mut self, secs: u32) -> Self {
        self.timeout = Some(secs);
        self
    }

    /// Further ansible-playbook arguments (`--tags`, `-v`, ...).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Where the deployer keeps its release history, run files and the
    /// callback plugin. Default: `<playbook dir>/.cd/ansible`.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(absolute(dir.into()));
        self
    }

    /// The hosts.
    pub fn hosts(&self) -> &[AnsibleHost] {
        &self.hosts
    }

    /// A target standing for a whole group (or any host pattern): plans and
    /// applies run all its hosts in one playbook run.
    pub fn group_target(&self, group: &str) -> Target {
        Target::new(group).label(LIMIT_LABEL, group)
    }

    /// The binary that will be run.
    pub fn binary_path(&self) -> PathBuf {
        self.binary
            .clone()
            .or_else(|| std::env::var_os(ANSIBLE_PLAYBOOK_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("ansible-playbook"))
    }

    fn state_root(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            self.playbook
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(".cd")
                .join("ansible")
        })
    }

    fn limit_of(target: &Target) -> String {
        target
            .label_value(LIMIT_LABEL)
            .unwrap_or(&target.name)
            .to_string()
    }

    /// The extra variables of a run. Everything that comes from the release
    /// (its version, config, artifact path, the rollback versions) is marked
    /// unsafe for templating (`__ansible_unsafe`): a value such as
    /// `{{ lookup('pipe', ...) }}` reaches the playbook as text and is never
    /// executed. The deployer's own [`AnsibleDeployer::var`]s are code, and
    /// templated as usual.
    fn extra_vars(&self, release: &Release, rollback: Option<(&str, Option<&str>)>) -> Value {
        let mut vars: serde_json::Map<String, Value> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &self.secret_vars {
            vars.insert(k.clone(), unsafe_for_templating(v.expose()));
        }
        for (k, v) in &release.values() {
            vars.insert(k.clone(), unsafe_for_templating(v));
        }
        vars.insert(
            "cd_release_version".into(),
            unsafe_for_templating(&json!(release.version)),
        );
        if let Some(a) = &release.artifact {
            vars.insert(
                "cd_release_artifact".into(),
                unsafe_for_templating(&json!(a.path.display().to_string())),
            );
        }
        if let Some((from, to)) = rollback {
            vars.insert(
                "cd_rollback_from".into(),
                unsafe_for_templating(&json!(from)),
            );
            vars.insert("cd_rollback_to".into(), unsafe_for_templating(&json!(to)));
        }
        Value::Object(vars)
    }

    /// Runs `playbook` (the main one when `None`) for `release` on the hosts
    /// matched by `limit`, streaming one event per task and host to `cx`.
    ///
    /// Returns the report whether or not hosts failed (see
    /// [`PlaybookReport::error`]); errors only when ansible-playbook could
    /// not run at all.
    pub async fn run_playbook(
        &self,
        playbook: Option<&Path>,
        release: &Release,
        limit: Option<&str>,
        mode: RunMode,
        cx: &DeployContext,
    ) -> Result<(PlaybookReport, String)> {
        self.run_inner(playbook, release, limit, mode, None, cx)
            .await
    }

    async fn run_inner(
        &self,
        playbook: Option<&Path>,
        release: &Release,
        limit: Option<&str>,
        mode: RunMode,
        rollback: Option<(&str, Option<&str>)>,
        cx: &DeployContext,
    ) -> Result<(PlaybookReport, String)> {
        // Every playbook run checks the version with the one shared rule
        // (the removal of a first release runs with no version).
        if !release.version.is_empty() {
            cd_core::types::validate_version(&release.version)?;
        }
        // A release read back from the store (a restore) knows its secrets'
        // names only: their values must come from the deployer.
        if let Some(name) = release
            .secrets
            .missing()
            .into_iter()
            .find(|k| !self.secret_vars.contains_key(*k))
        {
            return Err(AnsibleError::MissingSecret {
                target: limit.unwrap_or("all").to_string(),
                version: release.version.clone(),
                name: name.to_string(),
            }
            .into());
        }
        release.secrets.register(cx.events.redactor());
        for v in self.secret_vars.values() {
            if let Value::String(s) = v.expose() {
                cx.events.redactor().register(s.clone());
            }
        }
        let playbook = playbook.unwrap_or(&self.playbook).to_path_buf();
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let run_dir = self.state_root().join("runs").join(&run_id);
        // The run's files (the extra vars hold release values, secrets
        // included) go on every way out, a dropped future too.
        let _run_files = RemoveOnDrop::dir(run_dir.clone());
        let plugin_dir = run_dir.join("callback_plugins");
        std::fs::create_dir_all(&plugin_dir)
            .map_err(|e| AnsibleError::io(format!("creating {}", plugin_dir.display()), e))?;
        let mut in_flight = BTreeSet::new();
        let result = self
            .run_in(
                &run_dir,
                &plugin_dir,
                &playbook,
                release,
                limit,
                mode,
                rollback,
                Some((&run_id, &mut in_flight)),
                cx,
            )
            .await;
        if matches!(&result, Err(e) if e.kind() == cd_core::ErrorKind::Cancelled) {
            let markers: Vec<String> = in_flight
                .iter()
                .map(|task| format!("{RUN_MARKER_VAR}={run_id}/{task}"))
                .collect();
            self.stop_on_hosts(&run_dir, &plugin_dir, release, limit, &markers, cx)
                .await;
        }
        result
    }

    /// After an interrupted run: stops, on the hosts, the processes of the
    /// tasks that were still running (`markers`; ansible-playbook's interrupt
    /// only stops the controller side; a remote command keeps running when
    /// its connection goes, as sshd does not signal sessions without a
    /// terminal). Bounded by [`STOP_TIMEOUT`]; reports what it stopped as a
    /// `stop` progress event.
    async fn stop_on_hosts(
        &self,
        run_dir: &Path,
        plugin_dir: &Path,
        release: &Release,
        limit: Option<&str>,
        markers: &[String],
        cx: &DeployContext,
    ) {
        let started = Instant::now();
        if markers.is_empty() {
            cx.events.progress(
                limit,
                "stop",
                "ok",
                Some(started.elapsed()),
                Some("no task was running on the hosts when the run was interrupted".into()),
            );
            return;
        }
        let book = run_dir.join("cd_stop.yml");
        let markers_json = serde_json::to_string(markers).unwrap_or_else(|_| "[]".into());
        let written = write_private(
            &book,
            STOP_PLAYBOOK.replace("@MARKERS@", &markers_json).as_bytes(),
        );
        let cleanup = cx.for_cleanup();
        let outcome = match written {
            Err(e) => Err(e.to_string()),
            Ok(()) => match tokio::time::timeout(
                STOP_TIMEOUT,
                self.run_in(
                    run_dir,
                    plugin_dir,
                    &book,
                    release,
                    limit,
                    RunMode::Apply,
                    None,
                    None,
                    &cleanup,
                ),
            )
            .await
            {
                Err(_) => Err(format!("timed out after {}s", STOP_TIMEOUT.as_secs())),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok((report, _))) => Ok(report),
            },
        };
        let (status, detail) = match outcome {
            Ok(report) => {
                let stopped: Vec<String> =
                    report.changed().iter().map(|r| r.host.clone()).collect();
                (
                    if report.succeeded() { "ok" } else { "failed" },
                    if stopped.is_empty() {
                        "no process of the interrupted run left on the hosts".to_string()
                    } else {
                        format!(
                            "stopped processes of the interrupted run on {}",
                            stopped.join(", ")
                        )
                    },
                )
            }
            Err(e) => (
                "failed",
                format!("could not stop the interrupted run's processes on the hosts: {e}"),
            ),
        };
        cx.events
            .progress(limit, "stop", status, Some(started.elapsed()), Some(detail));
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        run_dir: &Path,
        plugin_dir: &Path,
        playbook: &Path,
        release: &Release,
        limit: Option<&str>,
        mode: RunMode,
        rollback: Option<(&str, Option<&str>)>,
        marker: Option<(&str, &mut BTreeSet<String>)>,
        cx: &DeployContext,
    ) -> Result<(PlaybookReport, String)> {
        write_private(
            &plugin_dir.join(format!("{CALLBACK_NAME}.py")),
            CALLBACK_PLUGIN.as_bytes(),
        )?;
        let mut common = BTreeMap::new();
        let mut ssh_args: Vec<String> = Vec::new();
        if let Some(kh) = &self.known_hosts {
            ssh_args.push(format!(
                "-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
                kh.display()
            ));
        }
        if let Some(a) = &self.ssh_args {
            ssh_args.push(a.clone());
        }
        if let Some(p) = &self.python {
            common.insert("ansible_python_interpreter".to_string(), json!(p));
        }
        if !ssh_args.is_empty() {
            common.insert(
                "ansible_ssh_common_args".to_string(),
                json!(ssh_args.join(" ")),
            );
        }
        let inventory = run_dir.join("inventory.json");
        write_private(
            &inventory,
            &serde_json::to_vec_pretty(&inventory_json(&self.hosts, &common))?,
        )?;
        let vars_file = run_dir.join("extra_vars.json");
        write_private(
            &vars_file,
            &serde_json::to_vec_pretty(&self.extra_vars(release, rollback))?,
        )?;

        let mut args: Vec<OsString> = vec!["-i".into(), inventory.clone().into_os_string()];
        let mut at_vars = OsString::from("@");
        at_vars.push(vars_file.as_os_str());
        args.push("-e".into());
        args.push(at_vars);
        if let Some(l) = limit {
            args.push("--limit".into());
            args.push(l.into());
        }
        let forks = self
            .forks
            .unwrap_or_else(|| (self.hosts.len() as u32).max(5));
        args.push(format!("--forks={forks}").into());
        if let Some(t) = self.timeout {
            args.push(format!("--timeout={t}").into());
        }
        match mode {
            RunMode::Check => {
                args.push("--check".into());
                args.push("--diff".into());
            }
            RunMode::Apply if self.diff => args.push("--diff".into()),
            RunMode::Apply => {}
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args.push(playbook.as_os_str().to_owned());

        let binary = self.binary_path();
        let mut cmd = Command::new(&binary);
        cmd.args(&args)
            .current_dir(playbook.parent().unwrap_or_else(|| Path::new(".")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C on the user's terminal reaches
            // the host program (which cancels the run), not the tool
            // directly; on cancellation the whole group gets SIGINT, as a
            // terminal would send it (terraform re-executes itself under
            // panicwrap, so signalling the parent alone does nothing).
            .process_group(0)
            .env("ANSIBLE_CALLBACK_PLUGINS", callback_path(plugin_dir))
            .env("ANSIBLE_STDOUT_CALLBACK", CALLBACK_NAME)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("PYTHONUNBUFFERED", "1");
        if let Some(on) = self.pipelining {
            cmd.env("ANSIBLE_PIPELINING", if on { "1" } else { "0" });
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // The callback plugin marks every module process on the hosts with
        // this run's id, so an interrupted run can be stopped there too.
        let mut in_flight = match marker {
            Some((m, tasks)) => {
                cmd.env(RUN_MARKER_VAR, m);
                Some(tasks)
            }
            None => {
                cmd.env_remove(RUN_MARKER_VAR);
                None
            }
        };
        let started = Instant::now();
        let step = match mode {
            RunMode::Check => "ansible-playbook --check",
            RunMode::Apply => "ansible-playbook",
        };
        cx.events.progress(
            limit,
            step,
            "started",
            None,
            Some(format!("{} {}", playbook.display(), release.version)),
        );
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                AnsibleError::BinaryNotFound {
                    binary: binary.clone(),
                    reason: e.to_string(),
                }
            }
            _ => AnsibleError::io(format!("starting {}", binary.display()), e),
        })?;
        // Dropped before ansible-playbook was reaped: its whole group
        // (workers, ssh clients) is killed.
        let mut guard = GroupGuard::new(&child);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        let mut report = PlaybookReport {
            playbook: playbook.display().to_string(),
            check: mode == RunMode::Check,
            ..Default::default()
        };
        // Tasks running on some host: started there, no result yet.
        let mut running: BTreeSet<(String, String)> = BTreeSet::new();
        let driven = drive(
            &mut child,
            &mut guard,
            stdout,
            &cx.cancel,
            INTERRUPT_GRACE,
            |line| match CallbackLine::parse(&line) {
                Some(l) => {
                    if let (Some(host), Some(task)) = (&l.host, &l.task_uuid) {
                        let key = (host.clone(), task.clone());
                        match l.event.as_str() {
                            "runner_start" => {
                                running.insert(key);
                            }
                            "runner_ok" | "runner_failed" | "runner_skipped"
                            | "runner_unreachable" => {
                                running.remove(&key);
                            }
                            _ => {}
                        }
                    }
                    report.absorb(&l);
                    emit_line(&cx.events, &l, mode);
                }
                None if !line.trim().is_empty() => {
                    cx.events.log(LogLevel::Debug, format!("ansible: {line}"));
                }
                None => {}
            },
        )
        .await
        .map_err(|e| AnsibleError::io("running ansible-playbook", e))?;
        let (status, cancelled) = (driven.status, driven.interrupted);
        if let Some(tasks) = in_flight.as_mut() {
            tasks.extend(running.into_iter().map(|(_, task)| task));
        }
        let stderr = stderr_task.await.unwrap_or_default();
        if cancelled {
            return Err(AnsibleError::Cancelled.into());
        }
        report.exit_code = status.and_then(|s| s.code());
        report.duration_s = started.elapsed().as_secs_f64();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            let level = if line.contains("ERROR") {
                LogLevel::Error
            } else {
                LogLevel::Warn
            };
            cx.events.log(level, format!("ansible: {line}"));
        }
        cx.events.progress(
            limit,
            step,
            if report.succeeded() { "ok" } else { "failed" },
            Some(started.elapsed()),
            Some(format!(
                "{} task results, {} changed, {} failed, {} unreachable",
                report.results.len(),
                report.changed().len(),
                report.failures().len(),
                report.unreachable().len()
            )),
        );
        Ok((report, stderr))
    }

    /// Runs and turns host failures into an error.
    async fn run_checked(
        &self,
        playbook: Option<&Path>,
        release: &Release,
        limit: Option<&str>,
        mode: RunMode,
        rollback: Option<(&str, Option<&str>)>,
        cx: &DeployContext,
    ) -> Result<PlaybookReport> {
        let (report, stderr) = self
            .run_inner(playbook, release, limit, mode, rollback, cx)
            .await?;
        match report.error(&stderr) {
            Some(e) => Err(e.into()),
            None => Ok(report),
        }
    }

    /// Plans with events (`--check --diff`); [`Deployer::plan`] does the
    /// same without events.
    pub async fn plan_in(
        &self,
        release: &Release,
        target: &Target,
        cx: &DeployContext,
    ) -> Result<Plan> {
        cd_core::types::validate_version(&release.version)?;
        let limit = Self::limit_of(target);
        let report = self
            .run_checked(None, release, Some(&limit), RunMode::Check, None, cx)
            .await?;
        let current = self.current(target).await?;
        let mut plan = Plan::new(release.clone(), target.clone(), current);
        for r in &report.results {
            let action = match r.status {
                TaskStatus::Changed => ChangeAction::Update,
                _ => ChangeAction::NoOp,
            };
            let mut c = Change::new(action, format!("{}: {}", r.host, r.task));
            c.detail = json!({"host": r.host, "task": r.task, "status": r.status, "diff": r.diff, "message": r.message});
            plan.changes.push(c);
        }
        plan.detail = json!({
            "backend": "ansible",
            "limit": limit,
            "check_report": report,
        });
        Ok(plan)
    }

    /// Where the release history lives: the store given with
    /// [`AnsibleDeployer::store`], else files under the state directory.
    fn history_home(&self) -> HistoryHome {
        self.history_home
            .clone()
            .unwrap_or_else(|| HistoryHome::Files(self.state_root().join("history")))
    }

    /// The releases applied to a target, oldest first (the newest 100).
    pub async fn history(&self, target: &Target) -> Result<Vec<AppliedRelease>> {
        let _g = self.shared.history.lock().await;
        self.history_home().read(&target.name).await
    }

    async fn record(&self, target: &Target, entry: AppliedRelease) -> Result<()> {
        let _g = self.shared.history.lock().await;
        self.history_home().append(&target.name, &entry).await
    }

    /// The release a history entry was applied with, for a rollback: its
    /// configuration and artifact, and its secret values from this
    /// process's memory or the deployer's [`Self::secret_var`]s.
    fn release_of(&self, entry: &AppliedRelease, target: &Target) -> Result<Release> {
        let mut release = Release::new(entry.version.clone());
        release.config = entry.config.clone();
        release.artifact = entry.artifact.clone().map(|p| cd_core::Artifact {
            path: p,
            sha256: None,
        });
        self.shared
            .secrets
            .complete(
                &target.name,
                &mut release,
                entry.secrets.iter().map(String::as_str),
                &self.secret_vars,
            )
            .map_err(|name| AnsibleError::MissingSecret {
                target: target.name.clone(),
                version: entry.version.clone(),
                name,
            })?;
        Ok(release)
    }

    fn revision(&self, target: &Target, e: &AppliedRelease) -> Revision {
        let mut r = Revision::new(
            &target.name,
            &e.version,
            format!("{}@{}", target.name, e.version),
        )
        .detail(json!({
            "config": e.config,
            "secrets": e.secrets,
            "changed": e.changed,
            "rollback_of": e.rollback_of,
        }));
        r.deployed_at = Some(e.at);
        r
    }

    async fn apply_release(
        &self,
        release: &Release,
        target: &Target,
        playbook: Option<&Path>,
        rollback: Option<(&str, Option<&str>)>,
        cx: &DeployContext,
    ) -> Result<(PlaybookReport, AppliedRelease)> {
        let limit = Self::limit_of(target);
        let report = self
            .run_checked(
                playbook,
                release,
                Some(&limit),
                RunMode::Apply,
                rollback,
                cx,
            )
            .await?;
        let mut changed = BTreeMap::new();
        for r in report.changed() {
            *changed.entry(r.host.clone()).or_insert(0) += 1;
        }
        self.shared.secrets.remember(&target.name, release);
        let entry = AppliedRelease {
            version: release.version.clone(),
            config: release.config.clone(),
            secrets: release.secrets.keys().map(str::to_string).collect(),
            artifact: release.artifact.as_ref().map(|a| a.path.clone()),
            changed,
            at: Utc::now(),
            rollback_of: rollback.map(|(from, _)| from.to_string()),
            removed: false,
        };
        Ok((report, entry))
    }
}

#[async_trait]
impl Deployer for AnsibleDeployer {
    fn name(&self) -> &str {
        "ansible"
    }

    fn capabilities(&self) -> DeployerCapabilities {
        DeployerCapabilities {
            rollback: true,
            // Undoing a first release needs the user's rollback playbook.
            undeploy: self.rollback_playbook.is_some(),
            idempotent: true,
            dry_run: true,
        }
    }

    fn targets(&self) -> Vec<Target> {
        self.hosts.iter().map(AnsibleHost::to_target).collect()
    }

    async fn current(&self, target: &Target) -> Result<Option<Revision>> {
        let h = self.history(target).await?;
        Ok(h.last()
            .filter(|e| !e.removed)
            .map(|e| self.revision(target, e)))
    }

    /// Plans, streaming the tool's output as events through `cx`.
    async fn plan(&self, release: &Release, target: &Target, cx: &DeployContext) -> Result<Plan> {
        self.plan_in(release, target, cx).await
    }

    async fn apply(&self, plan: &Plan, cx: &DeployContext) -> Result<Revision> {
        if plan.detail.get("backend").and_then(Value::as_str) != Some("ansible") {
            return Err(AnsibleError::InvalidPlan(
                "the plan was not made by an AnsibleDeployer".into(),
            )
            .into());
        }
        let (_, entry) = self
            .apply_release(&plan.release, &plan.target, None, None, cx)
            .await?;
        self.record(&plan.target, entry.clone()).await?;
        Ok(self.revision(&plan.target, &entry))
    }

    async fn rollback(
        &self,
        target: &Target,
        to: Option<&Revision>,
        cx: &DeployContext,
    ) -> Result<Option<Revision>> {
        let history = self.history(target).await?;
        let current = history.last().filter(|e| !e.removed).cloned();
        let from = current
            .as_ref()
            .map(|c| c.version.clone())
            .unwrap_or_default();
        let previous: Option<Release> = match to {
            Some(rev) => {
                let found = history
                    .iter()
                    .rev()
                    .find(|e| e.version == rev.version && !e.removed)
                    .cloned();
                let entry = match found {
                    Some(e) => e,
                    None => {
                        // A revision from elsewhere (the store's release
                        // history): its detail carries the configuration.
                        let field = |name: &str| rev.detail.get(name).cloned();
                        let config = field("config")
                            .and_then(|c| serde_json::from_value(c).ok())
                            .ok_or_else(|| AnsibleError::NoPreviousRelease {
                                target: target.name.clone(),
                            })?;
                        AppliedRelease {
                            version: rev.version.clone(),
                            config,
                            secrets: field("secrets")
                                .and_then(|c| serde_json::from_value(c).ok())
                                .unwrap_or_default(),
                            artifact: None,
                            changed: BTreeMap::new(),
                            at: Utc::now(),
                            rollback_of: None,
                            removed: false,
                        }
                    }
                };
                Some(self.release_of(&entry, target)?)
            }
            None if history.len() >= 2 => {
                Some(self.release_of(&history[history.len() - 2], target)?)
            }
            None => None,
        };
        cx.events.emit(cd_core::EventKind::Rollout {
            strategy: "ansible".into(),
            message: format!(
                "rolling back {} from {} to {}{}",
                target.name,
                if from.is_empty() { "nothing" } else { &from },
                previous
                    .as_ref()
                    .map(|p| p.version.as_str())
                    .unwrap_or("nothing"),
                if self.rollback_playbook.is_some() {
                    " with the rollback playbook"
                } else {
                    ""
                }
            ),
        });
        let playbook = self.rollback_playbook.as_deref();
        match previous {
            Some(release) => {
                let (_, entry) = self
                    .apply_release(
                        &release,
                        target,
                        playbook,
                        Some((&from, Some(&release.version))),
                        cx,
                    )
                    .await?;
                self.record(target, entry.clone()).await?;
                Ok(Some(self.revision(target, &entry)))
            }
            None if playbook.is_some() => {
                let release = match &current {
                    Some(c) => self.release_of(c, target)?,
                    None => Release::new(""),
                };
                let (_, mut entry) = self
                    .apply_release(&release, target, playbook, Some((&from, None)), cx)
                    .await?;
                entry.removed = true;
                self.record(target, entry).await?;
                Ok(None)
            }
            None => Err(AnsibleError::NoPreviousRelease {
                target: target.name.clone(),
            }
            .into()),
        }
    }
}

/// Turns one callback line into events: per task and host.
fn emit_line(events: &Emitter, l: &CallbackLine, mode: RunMode) {
    let task = l.task.clone().unwrap_or_default();
    let dur = l.duration_s.map(cd_core::clock::secs_f64);
    match l.event.as_str() {
        "play_start" => events.info(format!(
            "ansible play: {}",
            l.play.clone().unwrap_or_default()
        )),
        "task_start" => events.log(LogLevel::Debug, format!("ansible task: {task}")),
        "runner_start" => events.progress(l.host.as_deref(), &task, "started", None, None),
        "runner_ok" | "runner_failed" | "runner_skipped" | "runner_unreachable" => {
            let status = match l.event.as_str() {
                "runner_ok" if l.changed && mode == RunMode::Check => "would_change",
                "runner_ok" if l.changed => "changed",
                "runner_ok" => "ok",
                "runner_failed" if l.ignore_errors => "ignored",
                "runner_failed" => "failed",
                "runner_skipped" => "skipped",
                _ => "unreachable",
            };
            let message = if matches!(status, "failed" | "unreachable" | "ignored") {
                l.msg.clone()
            } else {
                None
            };
            events.progress(l.host.as_deref(), &task, status, dur, message);
        }
        "item_failed" => events.warn(format!(
            "{}: {task} item {} failed: {}",
            l.host.as_deref().unwrap_or("-"),
            l.item.as_deref().unwrap_or_default(),
            l.msg.as_deref().unwrap_or_default()
        )),
        "diff" => {
            if let Some(d) = &l.diff {
                events.info(format!(
                    "{}: {task} diff: {}",
                    l.host.as_deref().unwrap_or("-"),
                    d
                ));
            }
        }
        "stats" => {
            for (host, s) in l.hosts.iter().flatten() {
                let status = if s.unreachable > 0 {
                    "unreachable"
                } else if s.failed > 0 {
                    "failed"
                } else {
                    "ok"
                };
                events.progress(
                    Some(host),
                    "recap",
                    status,
                    None,
                    Some(format!(
                        "ok={} changed={} unreachable={} failed={} skipped={}",
                        s.ok, s.changed, s.unreachable, s.failed, s.skipped
                    )),
                );
            }
        }
        "no_hosts_matched" => events.warn("ansible: no hosts matched"),
        _ => {}
    }
}

/// `ANSIBLE_CALLBACK_PLUGINS` with our plugin first, then what the
/// environment already named, then ansible's default directories (setting the
/// variable replaces the configured path; playbook-adjacent
/// `callback_plugins/` directories are still searched by ansible itself).
/// `value` with every string in it wrapped as `{"__ansible_unsafe": s}`:
/// ansible loads such strings as unsafe text, which its template engine
/// never evaluates. Numbers, booleans and nulls stay as they are; object keys
/// are kept (ansible does not template keys of extra variables).
fn unsafe_for_templating(value: &Value) -> Value {
    match value {
        Value::String(s) => json!({ "__ansible_unsafe": s }),
        Value::Array(items) => Value::Array(items.iter().map(unsafe_for_templating).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), unsafe_for_templating(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn callback_path(plugin_dir: &Path) -> OsString {
    let mut dirs: Vec<PathBuf> = vec![plugin_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("ANSIBLE_CALLBACK_PLUGINS") {
        dirs.extend(std::env::split_paths(&existing));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".ansible/plugins/callback"));
    }
    dirs.push(PathBuf::from("/usr/share/ansible/plugins/callback"));
    std::env::join_paths(dirs).unwrap_or_else(|_| plugin_dir.as_os_str().to_owned())
}

/// Writes a file readable by the owner only (extra vars may hold secrets).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_private_io(path, bytes)
        .map_err(|e| AnsibleError::io(format!("writing {}", path.display()), e).into())
}

fn absolute(p: PathBuf) -> PathBuf {
    let p = expand_home(p);
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

fn expand_home(p: PathBuf) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or(p),
        None => p,
    }
}
