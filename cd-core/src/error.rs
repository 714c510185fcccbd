//! Errors shared by every part of the library.
//!
//! One [`Error`] type crosses every trait boundary. It carries an
//! [`ErrorKind`] the scheduler reads (is it worth retrying? was it a
//! cancellation?), a message for a person, and context pairs naming the thing
//! at fault (`node`, `target`, `step`, `address`, `file`, ...). Backends keep
//! their own `thiserror` enums and convert into this one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Result type used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. The scheduler decides on retries and
/// on what to report from the kind alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input: configuration, arguments, a malformed file. Never retried.
    Invalid,
    /// Something that should exist does not (a target, a revision, a run).
    NotFound,
    /// A transient failure: network, a busy resource. Retried by the runner.
    Unavailable,
    /// An operation ran past its deadline. Retried by the runner.
    Timeout,
    /// The work ran and failed (a command exited non-zero, a check failed).
    Failed,
    /// The run was cancelled.
    Cancelled,
    /// A lock or lease is held by someone else.
    Locked,
    /// Authentication or host verification failed. Never retried.
    Auth,
    /// The durable store failed.
    Store,
    /// The operation is not supported by this implementation.
    Unsupported,
    /// A conflict with the current state (a changed pipeline definition, a
    /// concurrent change).
    Conflict,
}

impl ErrorKind {
    /// Whether errors of this kind are retried by default.
    pub fn is_retryable_by_default(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    /// A short lower-case name, as used in events and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Failed => "failed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Locked => "locked",
            ErrorKind::Auth => "auth",
            ErrorKind::Store => "store",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Conflict => "conflict",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of the library.
///
/// ```
/// use cd_core::{Error, ErrorKind};
/// let err = Error::new(ErrorKind::Unavailable, "connection refused")
///     .with("target", "web1")
///     .with("step", "upload");
/// assert!(err.is_retryable());
/// assert_eq!(err.context("target"), Some("web1"));
/// assert_eq!(err.to_string(), "connection refused (target=web1, step=upload)");
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    context: Vec<(String, String)>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// Whether `Display` appends the source (not when the message already
    /// is the source's text: a converted backend error).
    show_source: bool,
}

impl Error {
    /// A new error of `kind`; retryable when the kind is retryable by default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.is_retryable_by_default(),
            context: Vec::new(),
            source: None,
            show_source: false,
        }
    }

    /// Shorthand for [`ErrorKind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// Shorthand for [`ErrorKind::Failed`].
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }

    /// Shorthand for [`ErrorKind::Unavailable`] (retryable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Shorthand for [`ErrorKind::Cancelled`].
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "cancelled")
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Store`].
    pub fn store(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Store, message)
    }

    /// Adds a context pair (`node`, `target`, `host`, `step`, `address`,
    /// `file`, `line`, `tool`, `stderr`, ...). A later value for the same key
    /// does not replace an earlier one: the innermost context wins.
    pub fn with(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        let key = key.into();
        if !self.context.iter().any(|(k, _)| *k == key) {
            self.context.push((key, value.to_string()));
        }
        self
    }

    /// Overrides whether the runner may retry this error.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Attaches the underlying cause; `Display` appends its text.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self.show_source = true;
        self
    }

    /// Attaches the typed error this one was made from (a backend's
    /// `SshError`, `TerraformError`, `AnsibleError`, `HttpError`, an
    /// `std::io::Error`) as [`std::error::Error::source`], so callers can
    /// `downcast_ref` it instead of matching text. Its text is already the
    /// message, so `Display` does not repeat it.
    ///
    /// ```
    /// use cd_core::Error;
    /// let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
    /// let err = Error::from(io);
    /// let typed = std::error::Error::source(&err)
    ///     .and_then(|s| s.downcast_ref::<std::io::Error>())
    ///     .unwrap();
    /// assert_eq!(typed.kind(), std::io::ErrorKind::NotFound);
    /// assert_eq!(err.to_string(), "no such file");
    /// ```
    pub fn with_typed_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self.show_source = false;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the runner may retry the operation that failed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The value of a context key, if set.
    pub fn context(&self, key: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All context pairs, in the order they were added.
    pub fn context_pairs(&self) -> &[(String, String)] {
        &self.context
    }

    /// A serializable snapshot of this error (for events and the store).
    pub fn to_info(&self) -> ErrorInfo {
        ErrorInfo {
            kind: self.kind,
            message: self.to_string(),
            retryable: self.retryable,
            context: self.context.clone(),
        }
    }

    /// Rebuilds an error from a snapshot (used when restoring a run). The
    /// message already holds the context.
    pub fn from_info(info: &ErrorInfo) -> Self {
        Error::new(info.kind, info.message.clone()).retryable(info.retryable)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str(")")?;
        }
        if let (Some(source), true) = (&self.source, self.show_source) {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable)
            .field("context", &self.context)
            .field("source", &self.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::pipeline::PipelineError> for Error {
    fn from(e: crate::pipeline::PipelineError) -> Self {
        Error::invalid(e.to_string())
    }
}

/// An I/O error: `NotFound` stays not-found, time-outs time out, broken and
/// refused connections are unavailable (retryable), the rest failed. The
/// `io::Error` is the typed source.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match e.kind() {
            Io::NotFound => ErrorKind::NotFound,
            Io::TimedOut => ErrorKind::Timeout,
            Io::ConnectionRefused
            | Io::ConnectionReset
            | Io::ConnectionAborted
            | Io::BrokenPipe
            | Io::Interrupted
            | Io::WouldBlock => ErrorKind::Unavailable,
            Io::PermissionDenied | Io::InvalidInput | Io::InvalidData => ErrorKind::Invalid,
            _ => ErrorKind::Failed,
        };
        Error::new(kind, e.to_string()).with_typed_source(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::invalid(format!("JSON: {e}"))
    }
}

/// A serializable summary of an [`Error`], as kept in events and the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The full message, context included.
    pub message: String,
    /// Whether it was retryable.
    pub retryable: bool,
    /// The context pairs (`host`, `step`, `address`, `file`, ...), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<(String, String)>,
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}
