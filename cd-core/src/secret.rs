//! Secrets that never show up in logs, events or the store.

use std::fmt;
use std::sync::{Arc, RwLock};

/// A value that redacts itself in `Debug` and `Display`.
///
/// Register it with the runner ([`crate::Runner::secret`]) and every
/// occurrence of its text is also scrubbed from events and log lines.
///
/// ```
/// use cd_core::Secret;
/// let token = Secret::new("hunter2".to_string());
/// assert_eq!(format!("{token:?}"), "Secret(***)");
/// assert_eq!(format!("{token}"), "***");
/// assert_eq!(token.expose(), "hunter2");
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret value. Call only where the value is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// Unwraps the secret value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

/// The text every registered secret is replaced with.
pub const REDACTED: &str = "***";

/// A shared set of secret strings to scrub from text.
///
/// ```
/// use cd_core::Redactor;
/// let r = Redactor::default();
/// r.register("s3cr3t");
/// assert_eq!(r.scrub("token=s3cr3t!"), "token=***!");
/// ```
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<RwLock<Vec<String>>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.secrets.read().map(|s| s.len()).unwrap_or(0);
        write!(f, "Redactor({n} secrets)")
    }
}

impl Redactor {
    /// Registers a secret value. Empty strings are ignored.
    pub fn register(&self, secret: impl Into<String>) {
        let secret = secret.into();
        if secret.is_empty() {
            return;
        }
        let mut s = self.secrets.write().expect("redactor lock");
        if !s.contains(&secret) {
            s.push(secret);
            // Longest first, so a secret that contains another is scrubbed whole.
            s.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// Whether no secret is registered (scrubbing is then free).
    pub fn is_empty(&self) -> bool {
        self.secrets.read().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// Replaces every registered secret in `text` with `***`.
    pub fn scrub(&self, text: &str) -> String {
        let secrets = self.secrets.read().expect("redactor lock");
        let mut out = text.to_string();
        for s in secrets.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        out
    }

    /// Scrubs every string inside a JSON value, in place.
    pub fn scrub_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(s) => {
                let scrubbed = self.scrub(s);
                *s = scrubbed;
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_json(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.scrub_json(v)),
            _ => {}
        }
    }
}
