//! One SSH connection per host: host-key verification, authentication and
//! remote commands with their output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;

use super::error::SshError;
use super::known_hosts::Verdict;

/// How an unknown host (no line in known_hosts) is treated. A host whose key
/// differs from the recorded one is always refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Only hosts listed in known_hosts are accepted (the default).
    #[default]
    Strict,
    /// An unknown host is accepted once and its key appended to the
    /// known_hosts file (trust on first use). Only when asked for.
    TrustOnFirstUse,
}

/// Verifies host keys against a known_hosts file (plain and hashed names).
#[derive(Debug)]
pub(crate) struct HostKeyVerifier {
    pub(crate) path: PathBuf,
    pub(crate) policy: HostKeyPolicy,
    learn_lock: std::sync::Mutex<()>,
}

impl HostKeyVerifier {
    pub(crate) fn new(path: PathBuf, policy: HostKeyPolicy) -> Self {
        HostKeyVerifier {
            path,
            policy,
            learn_lock: std::sync::Mutex::new(()),
        }
    }

    /// Checks `key` for `hostname:port`; `name`/`address` are for messages.
    pub(crate) fn verify(
        &self,
        name: &str,
        address: &str,
        hostname: &str,
        port: u16,
        key: &PublicKey,
    ) -> Result<(), SshError> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let _guard = self.learn_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.policy == HostKeyPolicy::Strict && !self.path.exists() {
            return Err(SshError::KnownHosts {
                path: self.path.clone(),
                message: "file does not exist (host keys cannot be verified)".into(),
            });
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(SshError::KnownHosts {
                    path: self.path.clone(),
                    message: e.to_string(),
                })
            }
        };
        match super::known_hosts::check(&text, hostname, port, key) {
            Verdict::Known => Ok(()),
            Verdict::Unknown => match self.policy {
                HostKeyPolicy::Strict => Err(SshError::HostKeyUnknown {
                    host: name.to_string(),
                    address: address.to_string(),
                    fingerprint,
                    known_hosts: self.path.clone(),
                }),
                HostKeyPolicy::TrustOnFirstUse => {
                    russh::keys::known_hosts::learn_known_hosts_path(
                        hostname, port, key, &self.path,
                    )
                    .map_err(|e| SshError::KnownHosts {
                        path: self.path.clone(),
                        message: format!("cannot record the key of {address}: {e}"),
                    })?;
                    tracing::warn!(host = name, %address, %fingerprint, "trust on first use: recorded host key");
                    Ok(())
                }
            },
            Verdict::Changed { line } => Err(SshError::HostKeyChanged {
                host: name.to_string(),
                address: address.to_string(),
                fingerprint,
                known_hosts: self.path.clone(),
                line,
            }),
            Verdict::Revoked { line } => Err(SshError::HostKeyRevoked {
                host: name.to_string(),
                address: address.to_string(),
                fingerprint,
                known_hosts: self.path.clone(),
                line,
            }),
        }
    }
}

/// The russh handler's error: a russh error or our host-key verdict.
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKey(SshError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

pub(crate) struct Handler {
    name: String,
    address: String,
    hostname: String,
    port: u16,
    verifier: Arc<HostKeyVerifier>,
}

impl client::Handler for Handler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self
                .verifier
                .verify(&self.name, &self.address, &self.hostname, self.port, key)
                .map(|()| true)
                .map_err(HandlerError::HostKey),
            PublicKeyOrCertificate::Certificate(cert) => {
                // Host certificates: verify the certified key like a plain one.
                let key = PublicKey::from(cert.public_key().clone());
                self.verifier
                    .verify(&self.name, &self.address, &self.hostname, self.port, &key)
                    .map(|()| true)
                    .map_err(HandlerError::HostKey)
            }
        }
    }
}

/// How to authenticate.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) user: String,
    pub(crate) key: Option<(PathBuf, Arc<PrivateKey>)>,
    pub(crate) agent: bool,
    /// The agent's socket; `None` means `SSH_AUTH_SOCK`.
    pub(crate) agent_socket: Option<PathBuf>,
}

/// Where a host is and what it is called.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) port: u16,
}

impl Endpoint {
    pub(crate) fn address(&self) -> String {
        if self.hostname.contains(':') {
            format!("[{}]:{}", self.hostname, self.port)
        } else {
            format!("{}:{}", self.hostname, self.port)
        }
    }
}

/// An authenticated connection to one host.
pub(crate) struct Connection {
    handle: client::Handle<Handler>,
    pub(crate) endpoint: Endpoint,
    /// Process groups of remote commands abandoned before they ended (step
    /// timeout, cancellation); [`Connection::stop_abandoned`] signals them.
    abandoned: std::sync::Mutex<Vec<u32>>,
}

/// What a remote command returned.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Exit status; `None` when killed by a signal or closed without one.
    pub(crate) status: Option<u32>,
    pub(crate) signal: Option<String>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    /// `cd:mark:<name>` lines seen on stdout, with their arrival time.
    pub(crate) marks: Vec<(String, std::time::Instant)>,
}

/// What a remote command reads on stdin.
enum Input<R> {
    None,
    Bytes(bytes::Bytes),
    Reader(R),
}

/// Prefix of a stdout line that marks the end of a step inside a command.
pub(crate) const MARK: &str = "cd:mark:";

/// The first line of every command's output: the remote shell's pid, which
/// is also its process group (sshd starts each session with `setsid`).
const PGID: &str = "cd:pgid:";

impl Output {
    pub(crate) fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub(crate) fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub(crate) fn status_str(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("status {s}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "none (channel closed)".into(),
        }
    }

    /// When the `cd:mark:<name>` line arrived, if it did.
    pub(crate) fn mark(&self, name: &str) -> Option<std::time::Instant> {
        self.marks.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }

    /// Standard error after the `cd:mark:<name>` line written to it (all of
    /// it when the mark is absent).
    pub(crate) fn stderr_after(&self, name: &str) -> Output {
        let text = String::from_utf8_lossy(&self.stderr);
        let mark = format!("{MARK}{name}\n");
        let tail = match text.find(&mark) {
            Some(i) => text[i + mark.len()..].to_string(),
            None => text.into_owned(),
        };
        Output {
            status: self.status,
            signal: self.signal.clone(),
            stderr: tail.into_bytes(),
            ..Output::default()
        }
    }

    /// Standard error before the `cd:mark:<name>` line.
    pub(crate) fn stderr_before(&self, name: &str) -> Output {
        let text = String::from_utf8_lossy(&self.stderr);
        let mark = format!("{MARK}{name}\n");
        let head = match text.find(&mark) {
            Some(i) => text[..i].to_string(),
            None => text.into_owned(),
        };
        Output {
            status: self.status,
            signal: self.signal.clone(),
            stderr: head.into_bytes(),
            ..Output::default()
        }
    }

    pub(crate) fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        let text = text.trim();
        if text.len() > 2000 {
            let mut start = text.len() - 2000;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            format!("…{}", &text[start..])
        } else {
            text.to_string()
        }
    }
}

impl Connection {
    /// Connects, verifies the host key (before anything else is sent) and
    /// authenticates.
    pub(crate) async fn open(
        endpoint: Endpoint,
        config: Arc<client::Config>,
        verifier: Arc<HostKeyVerifier>,
        creds: &Credentials,
        connect_timeout: Duration,
    ) -> Result<Connection, SshError> {
        let address = endpoint.address();
        let timeout = |step: &str| SshError::Timeout {
            host: endpoint.name.clone(),
            address: address.clone(),
            step: step.to_string(),
            after: connect_timeout,
        };
        let socket = tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect((endpoint.hostname.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| timeout("connect"))?
        .map_err(|source| SshError::Connect {
            host: endpoint.name.clone(),
            address: address.clone(),
            source,
        })?;
        let _ = socket.set_nodelay(true);
        let handler = Handler {
            name: endpoint.name.clone(),
            address: address.clone(),
            hostname: endpoint.hostname.clone(),
            port: endpoint.port,
            verifier,
        };
        let handle = tokio::time::timeout(
            connect_timeout,
            client::connect_stream(config, socket, handler),
        )
        .await
        .map_err(|_| timeout("handshake"))?
        .map_err(|e| match e {
            HandlerError::HostKey(e) => e,
            HandlerError::Russh(e) => SshError::Session {
                host: endpoint.name.clone(),
                address: address.clone(),
                step: "handshake".into(),
                message: e.to_string(),
            },
        })?;
        let auth_timeout = timeout("auth");
        let mut conn = Connection {
            handle,
            endpoint,
            abandoned: std::sync::Mutex::new(Vec::new()),
        };
        tokio::time::timeout(connect_timeout, conn.authenticate(creds))
            .await
            .map_err(|_| auth_timeout)??;
        Ok(conn)
    }

    async fn authenticate(&mut self, creds: &Credentials) -> Result<(), SshError> {
        let mut offered = Vec::new();
        if let Some((path, key)) = &creds.key {
            offered.push(format!("key file {}", path.display()));
            let hash = if key.algorithm().is_rsa() {
                self.handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| self.session_error("auth", e))?
                    .flatten()
            } else {
                None
            };
            let result = self
                .handle
                .authenticate_publickey(&creds.user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(|e| self.session_error("auth", e))?;
            if result.success() {
                return Ok(());
            }
        }
        if creds.agent {
            offered.push("ssh-agent".to_string());
            if self
                .authenticate_with_agent(&creds.user, creds.agent_socket.as_deref())
                .await?
            {
                return Ok(());
            }
        }
        Err(SshError::AuthRejected {
            host: self.endpoint.name.clone(),
            address: self.endpoint.address(),
            user: creds.user.clone(),
            offered: if offered.is_empty() {
                "nothing".into()
            } else {
                offered.join(", ")
            },
        })
    }

    async fn authenticate_with_agent(
        &mut self,
        user: &str,
        socket: Option<&Path>,
    ) -> Result<bool, SshError> {
        use russh::keys::agent::client::AgentClient;
        use russh::keys::agent::AgentIdentity;
        let agent = match socket {
            Some(path) => AgentClient::connect_uds(path).await,
            None => AgentClient::connect_env().await,
        };
        let Ok(mut agent) = agent else {
            tracing::debug!(socket = ?socket, "ssh-agent not reachable");
            return Ok(false);
        };
        let identities = agent.request_identities().await.unwrap_or_default();
        for identity in identities {
            let AgentIdentity::PublicKey { key, .. } = identity else {
                continue;
            };
            let hash = if key.algorithm().is_rsa() {
                self.handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| self.session_error("auth", e))?
                    .flatten()
            } else {
                None
            };
            match self
                .handle
                .authenticate_publickey_with(user, key, hash, &mut agent)
                .await
            {
                Ok(r) if r.success() => return Ok(true),
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "ssh-agent could not sign");
                    continue;
                }
            }
        }
        Ok(false)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    fn session_error(&self, step: &str, e: impl std::fmt::Display) -> SshError {
        SshError::Session {
            host: self.endpoint.name.clone(),
            address: self.endpoint.address(),
            step: step.to_string(),
            message: e.to_string(),
        }
    }

    /// Runs `command` with `stdin` (then EOF) and collects its output.
    pub(crate) async fn exec(
        &self,
        step: &str,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> Result<Output, SshError> {
        match stdin {
            Some(data) => self.run(step, command, Input::Reader(data)).await,
            None => self.run(step, command, Input::<&[u8]>::None).await,
        }
    }

    /// Runs `command` with shared bytes as stdin: every host's upload sends
    /// the same buffer, without copying it per channel.
    pub(crate) async fn exec_bytes(
        &self,
        step: &str,
        command: &str,
        stdin: bytes::Bytes,
    ) -> Result<Output, SshError> {
        self.run(step, command, Input::<&[u8]>::Bytes(stdin)).await
    }

    /// Runs `command`, streaming `stdin` from a reader (then EOF).
    pub(crate) async fn exec_with<R: tokio::io::AsyncRead + Unpin>(
        &self,
        step: &str,
        command: &str,
        stdin: R,
    ) -> Result<Output, SshError> {
        self.run(step, command, Input::Reader(stdin)).await
    }

    /// Sends stdin and reads the output at the same time, so a command that
    /// ends without reading all of its input never leaves us waiting on
    /// flow control.
    async fn run<R: tokio::io::AsyncRead + Unpin>(
        &self,
        step: &str,
        command: &str,
        stdin: Input<R>,
    ) -> Result<Output, SshError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.session_error(step, e))?;
        channel
            .exec(true, format!("printf '{PGID}%s\\n' \"$$\"; {command}"))
            .await
            .map_err(|e| self.session_error(step, e))?;
        let (mut read, write) = channel.split();
        // Should this future be dropped before the command ends (step
        // timeout, cancellation), its process group is remembered, to be
        // stopped rather than left running on the host.
        let pgid = std::sync::atomic::AtomicU32::new(0);
        let mut abandon = Abandon {
            pgid: &pgid,
            list: &self.abandoned,
            armed: true,
        };
        let send = async {
            match stdin {
                Input::None => {}
                // Through the AsyncRead path on purpose: it sends 8 KiB
                // messages, which keeps the connection's write buffer (and
                // so memory per host) small; 32 KiB packets cost ~3× more.
                Input::Bytes(b) => write.data(&b[..]).await?,
                Input::Reader(r) => write.data(r).await?,
            }
            write.eof().await
        };
        let recv = async {
            let mut out = Output::default();
            let mut exited = false;
            let mut refused = false;
            let mut scanned = 0;
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        out.stdout.extend_from_slice(&data);
                        if pgid.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                            // The pid line comes first; it is not output.
                            if let Some(nl) = out.stdout.iter().position(|b| *b == b'\n') {
                                let line = String::from_utf8_lossy(&out.stdout[..nl]);
                                if let Some(id) = line.strip_prefix(PGID) {
                                    let id = id.trim().parse().unwrap_or(u32::MAX);
                                    pgid.store(id, std::sync::atomic::Ordering::Relaxed);
                                    out.stdout.drain(..=nl);
                                }
                            }
                        }
                        // Record when each `cd:mark:<name>` line arrives (the
                        // boundary between two steps run by one command).
                        while let Some(nl) = out.stdout[scanned..].iter().position(|b| *b == b'\n')
                        {
                            let line = &out.stdout[scanned..scanned + nl];
                            if let Some(name) = line.strip_prefix(MARK.as_bytes()) {
                                out.marks.push((
                                    String::from_utf8_lossy(name).into_owned(),
                                    std::time::Instant::now(),
                                ));
                            }
                            scanned += nl + 1;
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        out.stderr.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        out.status = Some(exit_status);
                        exited = true;
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        out.signal = Some(format!("{signal_name:?}"));
                        exited = true;
                    }
                    ChannelMsg::Failure => {
                        refused = true;
                        break;
                    }
                    _ => {}
                }
            }
            (out, exited, refused)
        };
        tokio::pin!(send);
        tokio::pin!(recv);
        let mut sent: Option<Result<(), russh::Error>> = None;
        let (out, exited, refused) = loop {
            tokio::select! {
                r = &mut send, if sent.is_none() => sent = Some(r),
                done = &mut recv => break done,
            }
        };
        abandon.armed = false;
        if refused {
            return Err(self.session_error(step, "the server refused to run the command"));
        }
        if !exited {
            let why = match sent {
                Some(Err(e)) => format!("the connection closed while sending input: {e}"),
                _ => "the connection closed before the command ended".to_string(),
            };
            return Err(self.session_error(step, why));
        }
        Ok(out)
    }

    /// Stops the process groups of commands abandoned before they ended:
    /// SIGTERM now, SIGKILL 5 s later for whatever ignored it. Best effort
    /// (the connection may be what failed).
    pub(crate) async fn stop_abandoned(&self) {
        let groups = std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()));
        if groups.is_empty() {
            return;
        }
        // `--` before negative ids: some `kill`s read `-123` as a signal.
        let ids: Vec<String> = groups.iter().map(|g| format!("-{g}")).collect();
        let ids = ids.join(" ");
        let command = format!(
            "kill -TERM -- {ids} 2>/dev/null; \
             (sleep 5; kill -KILL -- {ids}) </dev/null >/dev/null 2>&1 & true"
        );
        let _ = self.exec("stop-abandoned", &command, None).await;
    }

    /// Closes the connection politely.
    pub(crate) async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// Loads a private key (OpenSSH, PKCS#8 or PEM), decrypting it with
/// `passphrase` when given. CPU-heavy for encrypted keys (bcrypt KDF).
pub(crate) fn load_key(path: &Path, passphrase: Option<&str>) -> Result<PrivateKey, SshError> {
    russh::keys::load_secret_key(path, passphrase).map_err(|e| SshError::Key {
        path: path.to_path_buf(),
        message: match e {
            russh::keys::Error::KeyIsEncrypted => {
                "the key is encrypted: set a passphrase".to_string()
            }
            other => other.to_string(),
        },
    })
}

/// Remembers a remote command's process group when the future running it is
/// dropped before the command ended.
struct Abandon<'a> {
    pgid: &'a std::sync::atomic::AtomicU32,
    list: &'a std::sync::Mutex<Vec<u32>>,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let pgid = self.pgid.load(std::sync::atomic::Ordering::Relaxed);
        // 0: not known yet; 1 and u32::MAX: never a session's group.
        if self.armed && pgid > 1 && pgid != u32::MAX {
            self.list
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pgid);
        }
    }
}
