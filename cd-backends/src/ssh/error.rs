//! Typed errors of the SSH deployer.

use std::path::PathBuf;
use std::time::Duration;

use cd_core::{Error, ErrorKind};

/// Everything that can go wrong while deploying over SSH. Each variant names
/// the host (target name and `address`) and, where it applies, the step.
/// Converts into [`cd_core::Error`] with `host`, `address` and `step`
/// context; host-key and authentication errors are never retryable, a
/// refused or dropped connection is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The builder was given something unusable.
    #[error("invalid SSH deployer configuration: {0}")]
    Config(String),

    /// A version or artifact name that is not safe as a directory name.
    #[error("invalid {what} {value:?}: use letters, digits, '.', '_', '+' and '-', not starting with '.'")]
    InvalidName {
        /// `version` or `artifact name`.
        what: &'static str,
        /// The rejected value.
        value: String,
    },

    /// A value read back from a host (the release it says is live) fails
    /// the version rule: it is not put in any command, nothing is switched.
    #[error("host {host} reports an invalid {what} {value:?}: {reason}")]
    HostValue {
        /// The host.
        host: String,
        /// What was read (`live release`).
        what: &'static str,
        /// The value, as read.
        value: String,
        /// Why it is refused.
        reason: String,
    },

    /// A restart or health check failed and switching the host back failed
    /// too: the host may be on neither release.
    #[error("on {host}: {cause}; switching back failed too: {revert}")]
    RevertFailed {
        /// The host.
        host: String,
        /// Why the apply failed.
        cause: Box<SshError>,
        /// Why the revert failed.
        revert: Box<SshError>,
    },

    /// The target is not one of this deployer's hosts.
    #[error("unknown SSH target {0:?}")]
    UnknownTarget(String),

    /// The local artifact could not be read.
    #[error("cannot read artifact {path}: {source}")]
    Artifact {
        /// The artifact path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The private key file could not be read or decrypted.
    #[error("cannot load private key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong (wrong passphrase, unknown format, ...).
        message: String,
    },

    /// The known_hosts file could not be read or written.
    #[error("known_hosts file {path}: {message}")]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// The TCP connection failed (refused, unreachable).
    #[error("cannot connect to {host} ({address}): {source}")]
    Connect {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The host presented a key that differs from the one in known_hosts.
    /// Nothing was sent to it.
    #[error(
        "HOST KEY CHANGED for {host} ({address}): it presented {fingerprint}, which differs from \
         line {line} of {known_hosts}; refusing to connect"
    )]
    HostKeyChanged {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The presented key's SHA256 fingerprint.
        fingerprint: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// The line with the recorded key.
        line: usize,
    },

    /// The host presented a key that an `@revoked` line of known_hosts
    /// names. Nothing was sent to it.
    #[error(
        "REVOKED HOST KEY for {host} ({address}): {fingerprint} is revoked by line {line} of \
         {known_hosts}; refusing to connect"
    )]
    HostKeyRevoked {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The presented key's SHA256 fingerprint.
        fingerprint: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// The `@revoked` line.
        line: usize,
    },

    /// The host is not in known_hosts and trust-on-first-use is off.
    #[error(
        "unknown host key for {host} ({address}): {fingerprint} is not in {known_hosts} \
         (add it, or enable trust-on-first-use explicitly)"
    )]
    HostKeyUnknown {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The presented key's SHA256 fingerprint.
        fingerprint: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
    },

    /// The server refused every key we offered.
    #[error("authentication as {user:?} rejected by {host} ({address}) (offered: {offered})")]
    AuthRejected {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The login user.
        user: String,
        /// What was offered (`key file …`, `ssh-agent`).
        offered: String,
    },

    /// The SSH protocol failed or the connection dropped during a step.
    #[error("SSH session with {host} ({address}) failed during {step}: {message}")]
    Session {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The step.
        step: String,
        /// What went wrong.
        message: String,
    },

    /// A remote command exited non-zero (or was killed by a signal).
    #[error("{step} failed on {host} ({address}): exit {status}{}", stderr_suffix(.stderr))]
    CommandFailed {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The step (`upload`, `switch`, `restart`, `health`, ...).
        step: String,
        /// The exit status (`status 3`, `signal KILL`, `none`).
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },

    /// The artifact on the host does not have the expected sha256.
    #[error("checksum mismatch on {host} ({address}): expected sha256 {expected}, the host has {actual}")]
    ChecksumMismatch {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// Expected hex digest.
        expected: String,
        /// Digest computed on the host.
        actual: String,
    },

    /// A step ran past its timeout.
    #[error("{step} on {host} ({address}) timed out after {after:?}")]
    Timeout {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// The step.
        step: String,
        /// The limit.
        after: Duration,
    },

    /// Rollback was asked for a release the host does not have.
    #[error("cannot roll back {host} ({address}): {message}")]
    NoSuchRelease {
        /// The target name.
        host: String,
        /// `host:port`.
        address: String,
        /// What is missing.
        message: String,
    },

    /// The run was cancelled.
    #[error("cancelled during {step} on {host}")]
    Cancelled {
        /// The target name.
        host: String,
        /// The step.
        step: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.trim())
    }
}

impl SshError {
    /// The kind the scheduler reads.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SshError::Config(_) | SshError::InvalidName { .. } | SshError::Key { .. } => {
                ErrorKind::Invalid
            }
            SshError::HostValue { .. } => ErrorKind::Failed,
            SshError::RevertFailed { cause, .. } => match cause.kind() {
                ErrorKind::Cancelled => ErrorKind::Failed,
                kind => kind,
            },
            SshError::Artifact { .. } | SshError::KnownHosts { .. } => ErrorKind::Invalid,
            SshError::UnknownTarget(_) | SshError::NoSuchRelease { .. } => ErrorKind::NotFound,
            SshError::Connect { .. } | SshError::Session { .. } => ErrorKind::Unavailable,
            SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. }
            | SshError::HostKeyUnknown { .. }
            | SshError::AuthRejected { .. } => ErrorKind::Auth,
            SshError::CommandFailed { .. } | SshError::ChecksumMismatch { .. } => ErrorKind::Failed,
            SshError::Timeout { .. } => ErrorKind::Timeout,
            SshError::Cancelled { .. } => ErrorKind::Cancelled,
        }
    }

    /// Whether retrying may help: a refused, dropped or slow connection.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. } | SshError::Session { .. } | SshError::Timeout { .. }
        )
    }

    /// The target name, when the error is about one host.
    pub fn host(&self) -> Option<&str> {
        match self {
            SshError::Connect { host, .. }
            | SshError::HostKeyChanged { host, .. }
            | SshError::HostKeyRevoked { host, .. }
            | SshError::HostKeyUnknown { host, .. }
            | SshError::AuthRejected { host, .. }
            | SshError::Session { host, .. }
            | SshError::CommandFailed { host, .. }
            | SshError::ChecksumMismatch { host, .. }
            | SshError::Timeout { host, .. }
            | SshError::NoSuchRelease { host, .. }
            | SshError::HostValue { host, .. }
            | SshError::RevertFailed { host, .. }
            | SshError::Cancelled { host, .. } => Some(host),
            SshError::UnknownTarget(host) => Some(host),
            _ => None,
        }
    }

    /// `host:port`, when the error is about one host.
    pub fn address(&self) -> Option<&str> {
        match self {
            SshError::RevertFailed { cause, .. } => cause.address(),
            SshError::Connect { address, .. }
            | SshError::HostKeyChanged { address, .. }
            | SshError::HostKeyRevoked { address, .. }
            | SshError::HostKeyUnknown { address, .. }
            | SshError::AuthRejected { address, .. }
            | SshError::Session { address, .. }
            | SshError::CommandFailed { address, .. }
            | SshError::ChecksumMismatch { address, .. }
            | SshError::Timeout { address, .. }
            | SshError::NoSuchRelease { address, .. } => Some(address),
            _ => None,
        }
    }

    /// The step, when the error happened during one (for a failed revert:
    /// the step that made the apply fail).
    pub fn step(&self) -> Option<&str> {
        match self {
            SshError::RevertFailed { cause, .. } => cause.step(),
            SshError::Connect { .. } => Some("connect"),
            SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. }
            | SshError::HostKeyUnknown { .. } => Some("host-key"),
            SshError::AuthRejected { .. } => Some("auth"),
            SshError::ChecksumMismatch { .. } => Some("checksum"),
            SshError::Session { step, .. }
            | SshError::CommandFailed { step, .. }
            | SshError::Timeout { step, .. }
            | SshError::Cancelled { step, .. } => Some(step),
            SshError::NoSuchRelease { .. } => Some("rollback"),
            _ => None,
        }
    }
}

impl From<SshError> for Error {
    fn from(e: SshError) -> Error {
        let mut err = Error::new(e.kind(), e.to_string()).retryable(e.is_retryable());
        if let Some(host) = e.host() {
            err = err.with("host", host);
        }
        if let Some(address) = e.address() {
            err = err.with("address", address);
        }
        if let Some(step) = e.step() {
            err = err.with("step", step);
        }
        if let SshError::CommandFailed { stderr, .. } = &e {
            if !stderr.trim().is_empty() {
                err = err.with("stderr", stderr.trim());
            }
        }
        err.with("backend", "ssh").with_typed_source(e)
    }
}
