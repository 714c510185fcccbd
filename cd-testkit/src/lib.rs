//! # cd-testkit
//!
//! Test fixtures for `cd`: real OpenSSH `sshd` fleets on loopback addresses,
//! and a tool policy that fails loudly in CI.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cd_testkit::SshFleet;
//!
//! // Three real sshd processes on 127.0.0.2, 127.0.0.3 and 127.0.0.4, each
//! // with its own root directory, host key and port. `None` means sshd is
//! // missing and we are not in CI (a SKIP line was printed); in CI, or once
//! // `scripts/setup.sh` ran (CD_SETUP_DONE), a missing sshd panics instead.
//! let Some(fleet) = SshFleet::start_or_skip(3).await? else { return Ok(()) };
//! for host in fleet.hosts() {
//!     println!("{} at {} (root {})", host.name, host.addr(), host.root.display());
//! }
//! // Connect with: user `fleet.user()`, key `fleet.user_key_path()`,
//! // known hosts `fleet.known_hosts_path()` (or the hashed copy), or OpenSSH
//! // itself: `ssh -F <fleet.ssh_config_path()> host1 true`.
//! fleet.stop_host(1).await?;   // refuses connections and drops live ones
//! fleet.start_host(1).await?;  // same address, port and host key
//! # Ok(()) }
//! ```
//!
//! Everything (processes, keys, root directories) is removed when the
//! [`SshFleet`] is dropped, also when a test panics. Fleets left behind by a
//! test process that was killed outright are reaped by the next
//! [`SshFleet::start`].
#![forbid(unsafe_code)]

pub mod bench;
pub mod podman;
pub mod prometheus;
pub mod secrets;
pub mod webhook;

use std::fmt::Write as _;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

// ------------------------------------------------------------------ tools

/// Whether a missing tool is a failure rather than a skip: true when the
/// environment variable `CI` or `CD_SETUP_DONE` is set (to anything but
/// empty, `0` or `false`). `scripts/setup.sh` writes `CD_SETUP_DONE=1` into
/// `tools.env`.
pub fn tools_required() -> bool {
    ["CI", "CD_SETUP_DONE"].iter().any(|var| {
        std::env::var(var)
            .map(|v| {
                let v = v.trim().to_ascii_lowercase();
                !(v.is_empty() || v == "0" || v == "false")
            })
            .unwrap_or(false)
    })
}

/// Where `scripts/setup.sh` puts its tools: `$CD_TOOLS_DIR`, else
/// `~/.cache/cd-tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CD_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("cd-tools")
}

/// Finds a tool without applying the policy: an absolute or relative path
/// that exists, else the directories of `scripts/setup.sh`
/// (`<tools>/venv/bin`, `<tools>/terraform/bin`), then `PATH`, then
/// `/usr/sbin` and `/sbin` (where Debian puts `sshd`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let as_path = Path::new(name);
    if as_path.components().count() > 1 {
        return is_executable(as_path).then(|| as_path.to_path_buf());
    }
    let tools = tools_dir();
    let mut dirs = vec![
        tools.join("venv").join("bin"),
        tools.join("terraform").join("bin"),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend([
        PathBuf::from("/usr/local/sbin"),
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/sbin"),
    ]);
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds a tool the way [`find_tool`] does and applies the tool policy.
///
/// - found: returns its path;
/// - missing while [`tools_required`] (env `CI` or `CD_SETUP_DONE`): panics,
///   because a test that silently skips in CI tests nothing;
/// - missing otherwise: prints a loud `SKIP` line to stderr and returns
///   `None`; the caller returns early.
///
/// ```no_run
/// let Some(ansible) = cd_testkit::require_tool("ansible-playbook") else { return };
/// # let _ = ansible;
/// ```
pub fn require_tool(name: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    if tools_required() {
        panic!(
            "required tool `{name}` not found (looked in {}/venv/bin, {}/terraform/bin, PATH, \
             /usr/sbin); CI or CD_SETUP_DONE is set, so this is a failure: run scripts/setup.sh",
            tools_dir().display(),
            tools_dir().display()
        );
    }
    eprintln!(
        "\n======== SKIP: tool `{name}` not found; run scripts/setup.sh \
         (set CI=1 to make this a failure) ========\n"
    );
    None
}

// ------------------------------------------------------------------ fleet

/// One host of an [`SshFleet`]: a real `sshd` on a loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// 0-based position in the fleet.
    pub index: usize,
    /// `host1`, `host2`, ... (also the `Host` alias in the fleet's ssh config).
    pub name: String,
    /// `127.0.0.2` for the first host, `127.0.0.(K+1)` for the last.
    pub ip: String,
    /// The TCP port sshd listens on (picked free at start).
    pub port: u16,
    /// This host's own directory: deploy into it (e.g. `<root>/app`). The
    /// sshd session also sees it as the environment variable `CD_HOST_ROOT`.
    /// Sessions get `HOME=<root>/../home` (an empty per-host directory), so
    /// the test user's own shell start-up files (`~/.bashrc`, often slow)
    /// are not run on every command, and tools that write to `~` (Ansible's
    /// remote tmp) stay per host.
    pub root: PathBuf,
    /// The host's private key file (ed25519).
    pub host_key_path: PathBuf,
    /// The host's public key line (`ssh-ed25519 AAAA...`).
    pub host_public_key: String,
}

impl SshHost {
    /// `ip:port`, e.g. `127.0.0.2:40211`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr().parse().expect("fixture addresses are valid")
    }

    /// The known_hosts name of this host: `[ip]:port`.
    pub fn known_hosts_name(&self) -> String {
        format!("[{}]:{}", self.ip, self.port)
    }
}

struct HostProc {
    host: SshHost,
    config: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

/// K real OpenSSH `sshd` processes on `127.0.0.2` … `127.0.0.(K+1)`, each
/// with its own root directory and generated host key, one generated user key
/// authorized on all of them, and a known_hosts file (plain and hashed).
///
/// The login user is the user running the tests ([`SshFleet::user`]). Each
/// host runs `sshd -D -e -f <its config>` in its own process group;
/// [`SshFleet::stop_host`] kills the group, so live connections to the host
/// drop as well. Dropping the fleet kills every process and removes every
/// file.
pub struct SshFleet {
    dir: tempfile::TempDir,
    sshd: PathBuf,
    keygen: PathBuf,
    user: String,
    user_key: PathBuf,
    user_public_key: String,
    known_hosts: PathBuf,
    known_hosts_hashed: PathBuf,
    ssh_config: PathBuf,
    procs: Arc<Mutex<Vec<HostProc>>>,
    hosts: Vec<SshHost>,
}

impl std::fmt::Debug for SshFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshFleet")
            .field("dir", &self.dir.path())
            .field("user", &self.user)
            .field("hosts", &self.hosts)
            .finish()
    }
}

const MAX_HOSTS: usize = 250;

impl SshFleet {
    /// Starts `k` hosts (1 ≤ k ≤ 250) and waits until each answers with an
    /// SSH banner. Fails when `sshd` or `ssh-keygen` is missing; see
    /// [`SshFleet::start_or_skip`] for the test policy.
    pub async fn start(k: usize) -> Result<SshFleet> {
        tokio::task::spawn_blocking(move || Self::start_blocking(k))
            .await
            .map_err(|e| anyhow!("fleet start task failed: {e}"))?
    }

    /// Like [`SshFleet::start`], but applies the tool policy of
    /// [`require_tool`] to `sshd` and `ssh-keygen`: `Ok(None)` (after a SKIP
    /// line) when they are missing outside CI, a panic when they are missing
    /// in CI.
    pub async fn start_or_skip(k: usize) -> Result<Option<SshFleet>> {
        if require_tool("sshd").is_none() || require_tool("ssh-keygen").is_none() {
            return Ok(None);
        }
        Self::start(k).await.map(Some)
    }

    /// The blocking version of [`SshFleet::start`], for code without a
    /// runtime (benchmarks, build scripts).
    pub fn start_blocking(k: usize) -> Result<SshFleet> {
        if k == 0 || k > MAX_HOSTS {
            bail!("an SshFleet has 1..={MAX_HOSTS} hosts, not {k}");
        }
        reap_stale_fleets();
        let sshd = find_tool("sshd").context("sshd not found (Debian package openssh-server)")?;
        let keygen = find_tool("ssh-keygen")
            .context("ssh-keygen not found (Debian package openssh-client)")?;
        let user = current_user();
        if is_root() {
            // sshd running as root needs its privilege separation directory.
            let _ = std::fs::create_dir_all("/run/sshd");
        }

        let dir = tempfile::Builder::new().prefix("cd-sshfleet-").tempdir()?;
        std::fs::write(
            dir.path().join("owner.pid"),
            owner_stamp(std::process::id()),
        )?;

        let user_key = dir.path().join("id_ed25519");
        keygen_ed25519(&keygen, &user_key, "cd-testkit-user")?;
        let user_public_key = read_trimmed(&user_key.with_extension("pub"))?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{user_public_key}\n"))?;

        let mut procs = Vec::with_capacity(k);
        for index in 0..k {
            let name = format!("host{}", index + 1);
            let hdir = dir.path().join(&name);
            let root = hdir.join("root");
            std::fs::create_dir_all(&root)?;
            std::fs::create_dir_all(hdir.join("home"))?;
            let host_key_path = hdir.join("ssh_host_ed25519_key");
            keygen_ed25519(&keygen, &host_key_path, &format!("cd-testkit-{name}"))?;
            let host_public_key = public_key_of(&host_key_path)?;
            let ip = format!("127.0.0.{}", index + 2);
            let host = SshHost {
                index,
                name,
                ip,
                port: 0,
                root,
                host_key_path,
                host_public_key,
            };
            procs.push(HostProc {
                config: hdir.join("sshd_config"),
                log: hdir.join("sshd.log"),
                pid_file: hdir.join("sshd.pid"),
                host,
                child: None,
            });
        }

        let fleet_dir = dir.path().to_path_buf();
        let mut fleet = SshFleet {
            known_hosts: fleet_dir.join("known_hosts"),
            known_hosts_hashed: fleet_dir.join("known_hosts_hashed"),
            ssh_config: fleet_dir.join("ssh_config"),
            dir,
            sshd,
            keygen,
            user,
            user_key,
            user_public_key,
            procs: Arc::new(Mutex::new(procs)),
            hosts: Vec::new(),
        };

        // Spawn all, then wait for all: 50 hosts start in well under a second.
        for i in 0..k {
            fleet.spawn_with_fresh_port(i)?;
        }
        for i in 0..k {
            if let Err(first) = fleet.wait_ready(i) {
                // Lost a port race (or similar): try a couple of fresh ports.
                let mut last = first;
                let mut ok = false;
                for _ in 0..3 {
                    fleet.kill_host(i);
                    fleet.spawn_with_fresh_port(i)?;
                    match fleet.wait_ready(i) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                if !ok {
                    return Err(last);
                }
            }
        }
        let hosts: Vec<SshHost> = fleet.lock().iter().map(|p| p.host.clone()).collect();
        fleet.hosts = hosts;
        fleet.write_client_files()?;
        Ok(fleet)
    }

    /// The hosts, in order (`host1` on `127.0.0.2` first).
    pub fn hosts(&self) -> &[SshHost] {
        &self.hosts
    }

    /// One host by index (0-based).
    pub fn host(&self, i: usize) -> &SshHost {
        &self.hosts[i]
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Never true (a fleet has at least one host); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The login user on every host (the user running the tests).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The user's private key (ed25519, no passphrase), authorized on every
    /// host.
    pub fn user_key_path(&self) -> &Path {
        &self.user_key
    }

    /// The user's public key line.
    pub fn user_public_key(&self) -> &str {
        &self.user_public_key
    }

    /// Writes a copy of the user key encrypted with `passphrase` and returns
    /// its path.
    pub fn encrypted_user_key(&self, passphrase: &str) -> Result<PathBuf> {
        let path = self
            .dir
            .path()
            .join(format!("id_ed25519_enc_{}", passphrase.len()));
        std::fs::copy(&self.user_key, &path)?;
        set_mode(&path, 0o600)?;
        run(Command::new(&self.keygen)
            .arg("-q")
            .arg("-p")
            .args(["-P", "", "-N", passphrase, "-f"])
            .arg(&path))?;
        Ok(path)
    }

    /// Writes a fresh key pair that no host authorizes and returns the
    /// private key's path (for "wrong key" tests).
    pub fn unauthorized_key(&self) -> Result<PathBuf> {
        let path = self.dir.path().join("id_ed25519_unauthorized");
        if !path.exists() {
            keygen_ed25519(&self.keygen, &path, "cd-testkit-stranger")?;
        }
        Ok(path)
    }

    /// A known_hosts file with one plain line per host
    /// (`[127.0.0.2]:port ssh-ed25519 AAAA...`).
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// The same entries with hashed host names (`|1|salt|hash ...`, as
    /// `ssh-keygen -H` writes them).
    pub fn hashed_known_hosts_path(&self) -> &Path {
        &self.known_hosts_hashed
    }

    /// An OpenSSH client config with one `Host hostN` entry per host (address,
    /// port, user, key, known hosts, strict host key checking):
    /// `ssh -F <path> host1 uname`.
    pub fn ssh_config_path(&self) -> &Path {
        &self.ssh_config
    }

    /// The fleet's scratch directory (keys, configs, logs, host roots).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `ssh` command prepared to run `remote` on host `i` with the fleet's
    /// ssh config (batch mode, no tty).
    pub fn ssh_command(&self, i: usize, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.ssh_config)
            .arg(&self.hosts[i].name)
            .arg(remote);
        cmd
    }

    /// The sshd log of host `i` (sshd runs with `-e`, at log level VERBOSE).
    pub fn sshd_log(&self, i: usize) -> String {
        let path = self.lock()[i].log.clone();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Whether host `i`'s sshd is running.
    pub fn is_running(&self, i: usize) -> bool {
        let mut procs = self.lock();
        match procs[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops host `i`: kills its sshd and every session process of it, so
    /// new connections are refused and live ones drop.
    pub async fn stop_host(&self, i: usize) -> Result<()> {
        self.check_index(i)?;
        self.kill_host(i);
        Ok(())
    }

    /// The blocking form of [`SshFleet::stop_host`], usable from an event
    /// sink or any other synchronous callback ("stop this host when batch 2
    /// begins").
    pub fn stop_host_now(&self, i: usize) {
        if i < self.lock().len() {
            self.kill_host(i);
        }
    }

    /// Starts host `i` again on the same address and port with the same host
    /// key; returns when it answers.
    pub async fn start_host(&self, i: usize) -> Result<()> {
        self.check_index(i)?;
        if self.is_running(i) {
            return Ok(());
        }
        self.spawn(i)?;
        let this = self.procs.clone();
        let (log, addr) = {
            let p = &this.lock().unwrap_or_else(|e| e.into_inner())[i];
            (p.log.clone(), p.host.socket_addr())
        };
        tokio::task::spawn_blocking(move || wait_banner(addr, &log))
            .await
            .map_err(|e| anyhow!("{e}"))?
    }

    /// Stops host `i`, gives it a new host key and starts it again: clients
    /// that trust the fleet's known_hosts must now refuse it. Returns the new
    /// public key line. ([`SshFleet::hosts`] keeps the old key.)
    pub async fn replace_host_key(&self, i: usize) -> Result<String> {
        self.check_index(i)?;
        self.kill_host(i);
        let key = self.lock()[i].host.host_key_path.clone();
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(key.with_extension("pub"));
        keygen_ed25519(&self.keygen, &key, "cd-testkit-replaced")?;
        let public = public_key_of(&key)?;
        self.lock()[i].host.host_public_key = public.clone();
        self.start_host(i).await?;
        Ok(public)
    }

    /// Stops every host now (also done on drop).
    pub fn shutdown(&self) {
        let n = self.lock().len();
        for i in 0..n {
            self.kill_host(i);
        }
    }

    // -------------------------------------------------------------- inner

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HostProc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.lock().len() {
            bail!("no host {i} in a fleet of {}", self.lock().len());
        }
        Ok(())
    }

    fn spawn_with_fresh_port(&mut self, i: usize) -> Result<()> {
        let ip = self.lock()[i].host.ip.clone();
        let port = free_port(&ip)?;
        self.lock()[i].host.port = port;
        self.spawn(i)
    }

    fn spawn(&self, i: usize) -> Result<()> {
        let mut procs = self.lock();
        let p = &mut procs[i];
        let config = sshd_config(
            &p.host,
            &self.dir.path().join("authorized_keys"),
            &p.pid_file,
        );
        std::fs::write(&p.config, config)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)?;
        let child = Command::new(&self.sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&p.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", self.sshd.display()))?;
        std::fs::write(p.pid_file.with_extension("pgid"), child.id().to_string())?;
        p.child = Some(child);
        Ok(())
    }

    fn wait_ready(&self, i: usize) -> Result<()> {
        let (addr, log) = {
            let p = &self.lock()[i];
            (p.host.socket_addr(), p.log.clone())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let mut procs = self.lock();
                if let Some(child) = procs[i].child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!(
                            "sshd for {addr} exited ({status}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                }
            }
            if wait_banner_once(addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sshd for {addr} did not answer within 10 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_host(&self, i: usize) {
        let mut procs = self.lock();
        let p = &mut procs[i];
        if let Some(mut child) = p.child.take() {
            let pid = child.id();
            kill_tree(pid);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn write_client_files(&self) -> Result<()> {
        let mut known = String::new();
        let mut config = String::new();
        for h in &self.hosts {
            let _ = writeln!(known, "{} {}", h.known_hosts_name(), h.host_public_key);
            let _ = writeln!(
                config,
                "Host {name}\n  HostName {ip}\n  Port {port}\n  User {user}\n  IdentityFile {key}\n  \
                 IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n",
                name = h.name,
                ip = h.ip,
                port = h.port,
                user = self.user,
                key = self.user_key.display(),
                known = self.known_hosts.display(),
            );
        }
        std::fs::write(&self.known_hosts, &known)?;
        std::fs::write(&self.known_hosts_hashed, &known)?;
        run(Command::new(&self.keygen)
            .arg("-q")
            .arg("-H")
            .arg("-f")
            .arg(&self.known_hosts_hashed))?;
        let _ = std::fs::remove_file(self.known_hosts_hashed.with_extension("old"));
        std::fs::write(&self.ssh_config, config)?;
        Ok(())
    }
}

impl Drop for SshFleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn sshd_config(host: &SshHost, authorized_keys: &Path, pid_file: &Path) -> String {
    format!(
        "ListenAddress {ip}:{port}\n\
         HostKey {hostkey}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {auth}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         StrictModes no\n\
         UsePAM no\n\
         UseDNS no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         MaxStartups 500\n\
         MaxSessions 500\n\
         LogLevel VERBOSE\n\
         SetEnv CD_HOST_ROOT={root} HOME={home}\n\
         Subsystem sftp internal-sftp\n",
        ip = host.ip,
        port = host.port,
        hostkey = host.host_key_path.display(),
        pid = pid_file.display(),
        auth = authorized_keys.display(),
        root = host.root.display(),
        home = host.root.with_file_name("home").display(),
    )
}

fn free_port(ip: &str) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("binding {ip}:0 (is the loopback range 127.0.0.0/8 usable?)"))?;
    Ok(listener.local_addr()?.port())
}

fn wait_banner_once(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 8];
    matches!(stream.read_exact(&mut buf), Ok(()) if &buf[..4] == b"SSH-")
}

fn wait_banner(addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if wait_banner_once(addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "sshd for {addr} did not answer within 10 s: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

fn keygen_ed25519(keygen: &Path, path: &Path, comment: &str) -> Result<()> {
    run(Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path))?;
    set_mode(path, 0o600)
}

fn public_key_of(private: &Path) -> Result<String> {
    let line = read_trimmed(&private.with_extension("pub"))?;
    // Drop the comment: `ssh-ed25519 AAAA... comment` -> first two fields.
    Ok(line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn current_user() -> String {
    if let Some(u) = std::env::var_os("USER").filter(|u| !u.is_empty()) {
        return u.to_string_lossy().into_owned();
    }
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_string())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}

/// Kills `pid`, its process group and every descendant (sshd session
/// processes may start their own sessions with `setsid`).
fn kill_tree(pid: u32) {
    let mut victims = descendants(pid);
    victims.push(pid);
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(Stdio::null())
        .status();
    if !victims.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(victims.iter().map(|p| p.to_string()))
            .stderr(Stdio::null())
            .status();
    }
}

fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...; comm may contain spaces, so split
            // after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Kills the sshd processes of fleets whose test process died without
/// dropping them (SIGKILL, abort) and removes their directories.
fn reap_stale_fleets() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("cd-sshfleet-") {
            continue;
        }
        let dir = e.path();
        let Ok(owner) = std::fs::read_to_string(dir.join("owner.pid")) else {
            continue;
        };
        if !owner_is_gone(owner.trim()) {
            continue;
        }
        if let Ok(hosts) = std::fs::read_dir(&dir) {
            for h in hosts.flatten() {
                if let Ok(pgid) = std::fs::read_to_string(h.path().join("sshd.pgid")) {
                    if let Ok(pgid) = pgid.trim().parse::<u32>() {
                        if is_sshd(pgid) {
                            kill_tree(pgid);
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `<pid> <kernel start time> <pid namespace>`: enough to tell, later and
/// from another process, whether the owner is really gone.
fn owner_stamp(pid: u32) -> String {
    format!(
        "{pid} {} {}",
        proc_start_time(pid).unwrap_or(0),
        pid_namespace().unwrap_or_default()
    )
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether the fleet's owner process has exited. A fleet made in another
/// PID namespace (a concurrent, sandboxed test run) is never judged gone:
/// its pids mean nothing here, and its sshd must not be touched.
fn owner_is_gone(stamp: &str) -> bool {
    let mut parts = stamp.split_whitespace();
    let (Some(pid), Some(start), Some(ns)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    if pid_namespace().as_deref() != Some(ns) {
        return false;
    }
    proc_start_time(pid) != Some(start)
}

fn is_sshd(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "sshd")
        .unwrap_or(false)
}

/// Live processes (zombies excluded: their command line is empty) whose
/// command line, arguments joined by spaces, contains `needle`: `(pid,
/// command line)`. For tests that check a tool left nothing running.
pub fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        if !cmdline.is_empty() && cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits until no live process's command line contains `needle`, at most
/// `deadline`; returns the ones still there (empty: all gone).
pub async fn wait_until_gone(needle: &str, deadline: std::time::Duration) -> Vec<(u32, String)> {
    let end = std::time::Instant::now() + deadline;
    loop {
        let left = processes_matching(needle);
        if left.is_empty() || std::time::Instant::now() >= end {
            return left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A TCP port on 127.0.0.1 held for one test: for a process the test
/// starts that must listen on a port given in advance (the local deployer's
/// targets). Dropping it frees the port.
#[derive(Debug)]
pub struct PortLease {
    /// The port.
    pub port: u16,
    _lock: std::fs::File,
}

/// Reserves a port without bind-drop-rebind races: ports come from a range
/// the kernel never hands out on its own (below or above
/// `ip_local_port_range`), and each is taken under an exclusive file lock
/// (`$TMPDIR/cd-test-ports/<port>`) that every test process honours, held
/// for as long as the lease lives. A port some other program listens on is
/// skipped.
pub fn reserve_port() -> PortLease {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let range: (u32, u32) = if lo >= 12000 {
        (lo.saturating_sub(10000).max(1024), lo)
    } else {
        (hi + 1, (hi + 10001).min(65536))
    };
    let dir = std::env::temp_dir().join("cd-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = range.1 - range.0;
    let offset = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (range.0 + (offset.wrapping_add(i)) % span) as u16;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        // Held by a program outside the tests? Then try the next.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return PortLease { port, _lock: file };
        }
    }
    panic!(
        "no free port in {}..{} (every one locked or in use)",
        range.0, range.1
    );
}

/// A port from [`reserve_port`] held until this test process exits: for
/// a target whose port is fixed when the test builds its deployer.
pub fn held_port() -> u16 {
    static HELD: Mutex<Vec<PortLease>> = Mutex::new(Vec::new());
    let lease = reserve_port();
    let port = lease.port;
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(lease);
    port
}

/// One ignored test of the current test binary run as a child process (a
/// process the test can SIGKILL): its standard output arrives line by line.
#[derive(Debug)]
pub struct TestChild {
    /// The process.
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TestChild {
    /// Runs the ignored test `test` of this binary (one thread, output not
    /// captured), with `env` set (the test's instructions).
    pub fn start(test: &str, env: (&str, &str), stderr: Stdio) -> TestChild {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--ignored",
                "--exact",
                test,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(env.0, env.1)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting the test child");
        let out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in out.lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TestChild { child, lines }
    }

    /// The next output line, or `None` when none comes before `deadline`
    /// (or the output ended).
    pub fn next_line(&self, deadline: Instant) -> Option<String> {
        self.lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `root` (recursively, skipping directories named in
/// `skip`, such as terraform's `providers`) whose bytes contain `needle`:
/// for tests that a secret was left nowhere on disk.
pub fn files_holding(root: &Path, needle: &str, skip: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !skip.iter().any(|s| entry.file_name() == *s) {
                    stack.push(path);
                }
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes
                    .windows(needle.len().max(1))
                    .any(|w| w == needle.as_bytes())
                {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// Waits until `check` returns `Some`, asking every 20 ms, and returns its
/// value; after `deadline` returns the last `None` as `Err(())`. The one
/// polling loop the tests share (no sleep as synchronisation elsewhere).
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= end {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_tool_finds_sh() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("definitely-not-a-tool-cd-testkit").is_none());
    }

    #[test]
    fn missing_tool_fails_in_ci_and_skips_elsewhere() {
        let outcome = std::panic::catch_unwind(|| require_tool("definitely-not-a-tool-cd-testkit"));
        match outcome {
            Err(_) => assert!(
                tools_required(),
                "panicked although CI/CD_SETUP_DONE are unset"
            ),
            Ok(found) => {
                assert!(
                    !tools_required(),
                    "skipped although CI or CD_SETUP_DONE is set"
                );
                assert_eq!(found, None);
            }
        }
    }

    #[tokio::test]
    async fn fleet_starts_answers_ssh_and_stops() {
        let Some(fleet) = SshFleet::start_or_skip(2).await.unwrap() else {
            return;
        };
        assert_eq!(fleet.len(), 2);
        assert_eq!(fleet.host(0).ip, "127.0.0.2");
        assert_eq!(fleet.host(1).ip, "127.0.0.3");
        // OpenSSH logs in with the fleet's key and strict host key checking,
        // and sees its own root through CD_HOST_ROOT.
        let out = fleet.ssh_command(1, "echo $CD_HOST_ROOT").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            fleet.host(1).root.display().to_string()
        );
        fleet.stop_host(0).await.unwrap();
        assert!(!fleet.is_running(0));
        assert!(TcpStream::connect(fleet.host(0).socket_addr()).is_err());
        fleet.start_host(0).await.unwrap();
        let out = fleet.ssh_command(0, "true").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A replaced host key is refused by strict checking.
        fleet.replace_host_key(0).await.unwrap();
        let out = fleet.ssh_command(0, "true").output().unwrap();
        assert!(!out.status.success());
        let dir = fleet.dir().to_path_buf();
        drop(fleet);
        assert!(!dir.exists());
    }
}
