//! Errors of the Ansible backend.

use std::path::PathBuf;

use cd_core::{Error, ErrorKind};

/// One host's failure in a playbook run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFailure {
    /// The inventory host name.
    pub host: String,
    /// The task that failed (empty for an unreachable host before any task).
    pub task: String,
    /// The module's message (`msg`, `stderr`, ...).
    pub message: String,
}

/// What went wrong while driving ansible-playbook.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnsibleError {
    /// ansible-playbook could not be started.
    #[error(
        "ansible-playbook binary `{binary}` not found or not executable ({reason}); \
         set it with `AnsibleDeployer::binary(..)` or the `CD_ANSIBLE_PLAYBOOK` environment \
         variable (run scripts/setup.sh to install ansible-core into ~/.cache/cd-tools/venv)"
    )]
    BinaryNotFound {
        /// The binary that was tried.
        binary: PathBuf,
        /// Why it could not be started.
        reason: String,
    },
    /// A task failed on one or more hosts.
    #[error("task `{}` failed on host {}: {}{}", .first.task, .first.host, .first.message,
        if .others.is_empty() { String::new() } else { format!(" (and {} more failure(s))", .others.len()) })]
    TaskFailed {
        /// The first failure.
        first: HostFailure,
        /// Further failures (other hosts or unreachable ones).
        others: Vec<HostFailure>,
    },
    /// One or more hosts could not be reached.
    #[error("host {} unreachable{}: {}", .first.host,
        if .first.task.is_empty() { String::new() } else { format!(" during task `{}`", .first.task) },
        .first.message)]
    Unreachable {
        /// The first unreachable host.
        first: HostFailure,
        /// Further unreachable hosts.
        others: Vec<HostFailure>,
    },
    /// ansible-playbook exited non-zero without a host result to blame (a
    /// syntax error in the playbook, bad options, a missing file).
    #[error("ansible-playbook exited with {}: {stderr}", code.map(|c| c.to_string()).unwrap_or_else(|| "a signal".into()))]
    Command {
        /// The exit code, if it exited.
        code: Option<i32>,
        /// What it wrote to stderr (tail).
        stderr: String,
    },
    /// A plan given to `apply` was not made by an AnsibleDeployer.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// There is no earlier release to roll back to.
    #[error("target `{target}` has no release before the current one to roll back to (name a rollback playbook to undo the first release)")]
    NoPreviousRelease {
        /// The target.
        target: String,
    },
    /// A release's secret value is needed (a rollback to it) but only its
    /// name is known: secret values are never stored.
    #[error(
        "target `{target}`: release {version} needs secret `{name}`, whose value is never \
         stored; give it with AnsibleDeployer::secret_var"
    )]
    MissingSecret {
        /// The target.
        target: String,
        /// The release version.
        version: String,
        /// The secret's name.
        name: String,
    },
    /// Reading or writing the deployer's own files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The run was cancelled; ansible-playbook was interrupted.
    #[error("ansible-playbook was cancelled")]
    Cancelled,
}

impl AnsibleError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AnsibleError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<AnsibleError> for Error {
    /// The typed `AnsibleError` stays reachable as the error's `source()`.
    fn from(e: AnsibleError) -> Self {
        let message = e.to_string();
        let err = match &e {
            AnsibleError::BinaryNotFound { binary, .. } => Error::new(ErrorKind::Invalid, message)
                .with("tool", binary.display())
                .with("setting", "AnsibleDeployer::binary / CD_ANSIBLE_PLAYBOOK"),
            AnsibleError::TaskFailed { first, others } => {
                let mut err = Error::new(ErrorKind::Failed, message)
                    .with("tool", "ansible-playbook")
                    .with("host", &first.host)
                    .with("task", &first.task);
                if !others.is_empty() {
                    let more: Vec<String> = others
                        .iter()
                        .map(|f| format!("{} `{}`: {}", f.host, f.task, f.message))
                        .collect();
                    err = err.with("more", more.join("; "));
                }
                err
            }
            AnsibleError::Unreachable { first, others } => {
                let mut hosts = vec![first.host.clone()];
                hosts.extend(others.iter().map(|f| f.host.clone()));
                let mut err = Error::new(ErrorKind::Unavailable, message)
                    .with("tool", "ansible-playbook")
                    .with("host", &first.host)
                    .with("unreachable", hosts.join(","));
                if !first.task.is_empty() {
                    err = err.with("task", &first.task);
                }
                err
            }
            AnsibleError::Command { stderr, .. } => Error::new(ErrorKind::Failed, message)
                .with("tool", "ansible-playbook")
                .with("stderr", stderr.trim()),
            AnsibleError::InvalidPlan(_) => Error::new(ErrorKind::Invalid, message),
            AnsibleError::NoPreviousRelease { target } => {
                Error::new(ErrorKind::NotFound, message).with("target", target)
            }
            AnsibleError::MissingSecret {
                target,
                version,
                name,
            } => Error::new(ErrorKind::Invalid, message)
                .with("target", target)
                .with("version", version)
                .with("secret", name),
            AnsibleError::Io { .. } => Error::new(ErrorKind::Failed, message),
            AnsibleError::Cancelled => Error::cancelled().with("tool", "ansible-playbook"),
        };
        err.with_typed_source(e)
    }
}
