//! Errors of the Terraform backend.

use std::path::PathBuf;

use cd_core::{Error, ErrorKind};

use super::ui::Diagnostic;

/// What went wrong while driving the terraform (or tofu) CLI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TerraformError {
    /// The CLI binary could not be started.
    #[error(
        "terraform binary `{binary}` not found or not executable ({reason}); \
         set it with `TerraformDeployer::binary(..)` or the `CD_TERRAFORM` environment variable \
         (run scripts/setup.sh to install terraform into ~/.cache/cd-tools)"
    )]
    BinaryNotFound {
        /// The binary that was tried.
        binary: PathBuf,
        /// Why it could not be started.
        reason: String,
    },
    /// Terraform reported an error diagnostic (a syntax error, a failing
    /// provisioner, a provider error).
    #[error("terraform {command}: {}", .diagnostic.summary)]
    Diagnostic {
        /// The subcommand (`init`, `plan`, `apply`, ...).
        command: String,
        /// The first error diagnostic.
        diagnostic: Box<Diagnostic>,
        /// Further error diagnostics, if any.
        others: Vec<Diagnostic>,
        /// What terraform wrote to stderr (tail).
        stderr: String,
    },
    /// The state lock is held by someone else and `-lock-timeout` ran out.
    #[error("terraform {command}: the state lock is held by someone else: {detail}")]
    Locked {
        /// The subcommand.
        command: String,
        /// Terraform's explanation (lock id, holder).
        detail: String,
    },
    /// Terraform exited non-zero without a diagnostic we could read.
    #[error("terraform {command} exited with {}: {stderr}", code.map(|c| c.to_string()).unwrap_or_else(|| "a signal".into()))]
    Command {
        /// The subcommand.
        command: String,
        /// The exit code, if it exited.
        code: Option<i32>,
        /// What terraform wrote to stderr (tail).
        stderr: String,
    },
    /// Terraform's JSON could not be read.
    #[error("cannot read the JSON of terraform {command}: {message}")]
    Parse {
        /// The subcommand.
        command: String,
        /// What was wrong.
        message: String,
    },
    /// A plan given to `apply` was not made by this deployer, or its plan file is gone.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// There is no earlier release to roll back to.
    #[error("workspace `{workspace}` has no release before the current one to roll back to")]
    NoPreviousRelease {
        /// The workspace.
        workspace: String,
    },
    /// A release's secret value is needed (a rollback to it, a plan of a
    /// release read back from the store) but only its name is known: secret
    /// values are never stored.
    #[error(
        "workspace `{workspace}`: release {version} needs secret variable `{name}`, whose value \
         is never stored; give it with TerraformDeployer::secret_var or plan the release itself"
    )]
    MissingSecret {
        /// The workspace.
        workspace: String,
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
    /// The run was cancelled; terraform was interrupted.
    #[error("terraform {command} was cancelled")]
    Cancelled {
        /// The subcommand.
        command: String,
    },
}

impl TerraformError {
    /// The first error diagnostic, if the error came from one.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            TerraformError::Diagnostic { diagnostic, .. } => Some(diagnostic),
            _ => None,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TerraformError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<TerraformError> for Error {
    /// The typed `TerraformError` stays reachable as the error's `source()`.
    fn from(e: TerraformError) -> Self {
        let message = e.to_string();
        let err = match &e {
            TerraformError::BinaryNotFound { binary, .. } => {
                Error::new(ErrorKind::Invalid, message)
                    .with("tool", binary.display())
                    .with("setting", "TerraformDeployer::binary / CD_TERRAFORM")
            }
            TerraformError::Diagnostic {
                command,
                diagnostic,
                others,
                stderr,
            } => {
                let kind = if is_invalid_configuration(diagnostic) {
                    ErrorKind::Invalid
                } else {
                    ErrorKind::Failed
                };
                let mut err = Error::new(kind, message)
                    .with("tool", "terraform")
                    .with("command", command);
                if let Some(address) = &diagnostic.address {
                    err = err.with("address", address);
                }
                if let Some(range) = &diagnostic.range {
                    err = err
                        .with("file", &range.filename)
                        .with("line", range.start.line);
                }
                if !diagnostic.detail.is_empty() {
                    err = err.with("detail", diagnostic.detail.trim());
                }
                if !others.is_empty() {
                    let more: Vec<String> = others.iter().map(|d| d.to_string()).collect();
                    err = err.with("more", more.join("; "));
                }
                if !stderr.trim().is_empty() {
                    err = err.with("stderr", stderr.trim());
                }
                err
            }
            TerraformError::Locked { command, .. } => Error::new(ErrorKind::Locked, message)
                .retryable(true)
                .with("tool", "terraform")
                .with("command", command),
            TerraformError::Command {
                command, stderr, ..
            } => Error::new(ErrorKind::Failed, message)
                .with("tool", "terraform")
                .with("command", command)
                .with("stderr", stderr.trim()),
            TerraformError::Parse { command, .. } => Error::new(ErrorKind::Failed, message)
                .with("tool", "terraform")
                .with("command", command),
            TerraformError::InvalidPlan(_) => Error::new(ErrorKind::Invalid, message),
            TerraformError::NoPreviousRelease { workspace } => {
                Error::new(ErrorKind::NotFound, message).with("workspace", workspace)
            }
            TerraformError::MissingSecret {
                workspace,
                version,
                name,
            } => Error::new(ErrorKind::Invalid, message)
                .with("workspace", workspace)
                .with("version", version)
                .with("secret", name),
            TerraformError::Io { .. } => Error::new(ErrorKind::Failed, message),
            TerraformError::Cancelled { command } => Error::cancelled()
                .with("tool", "terraform")
                .with("command", command),
        };
        err.with_typed_source(e)
    }
}

/// Whether a diagnostic says the configuration itself is wrong (syntax,
/// references): retrying cannot help and the kind is `Invalid`.
fn is_invalid_configuration(d: &Diagnostic) -> bool {
    d.address.is_none()
        && d.range.is_some()
        && !d.summary.contains("provisioner")
        && !d.summary.contains("lock")
}
