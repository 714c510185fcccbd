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
/// A registered secret is scrubbed in the encodings it takes on its way to a
/// log, an event or the store, not only raw: JSON string escaping (`"` as
/// `\"`, as `serde_json` writes it), Rust `Debug` escaping, POSIX shell
/// single quoting (`'` as `'\''`) and URL percent-encoding. Replacement is
/// leftmost-longest (Aho-Corasick), so a secret that contains another is
/// scrubbed whole.
///
/// ```
/// use cd_core::Redactor;
/// let r = Redactor::default();
/// r.register("s3cr3t");
/// assert_eq!(r.scrub("token=s3cr3t!"), "token=***!");
/// r.register(r#"pa"ss"#);
/// // The JSON-escaped form of a secret is scrubbed too.
/// assert_eq!(r.scrub(r#"{"password":"pa\"ss"}"#), r#"{"password":"***"}"#);
/// ```
#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<RwLock<Patterns>>,
}

#[derive(Default)]
struct Patterns {
    /// The registered secrets, raw.
    secrets: Vec<String>,
    /// Every form of every secret, matched together.
    matcher: Option<aho_corasick::AhoCorasick>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.read().map(|s| s.secrets.len()).unwrap_or(0);
        write!(f, "Redactor({n} secrets)")
    }
}

/// The forms a secret takes once encoded: raw, JSON-escaped, `Debug`-escaped,
/// shell-quoted and percent-encoded (each only when it differs).
fn encodings(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string()];
    let mut add = |form: String| {
        if !form.is_empty() && !out.contains(&form) {
            out.push(form);
        }
    };
    if let Ok(json) = serde_json::to_string(secret) {
        add(json[1..json.len() - 1].to_string());
    }
    let debug = format!("{secret:?}");
    add(debug[1..debug.len() - 1].to_string());
    add(secret.replace('\'', "'\\''"));
    add(percent_encode(secret));
    add(percent_encode(secret).replace("%20", "+"));
    out
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Redactor {
    /// Registers a secret value. Empty strings are ignored.
    pub fn register(&self, secret: impl Into<String>) {
        let secret = secret.into();
        if secret.is_empty() {
            return;
        }
        let mut p = self.inner.write().expect("redactor lock");
        if p.secrets.contains(&secret) {
            return;
        }
        p.secrets.push(secret);
        let mut forms: Vec<String> = p.secrets.iter().flat_map(|s| encodings(s)).collect();
        forms.sort();
        forms.dedup();
        p.matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&forms)
            .ok();
    }

    /// Whether no secret is registered (scrubbing is then free).
    pub fn is_empty(&self) -> bool {
        self.inner
            .read()
            .map(|s| s.secrets.is_empty())
            .unwrap_or(true)
    }

    /// Whether `text` holds a registered secret in any of its encodings.
    pub fn finds(&self, text: &str) -> bool {
        let p = self.inner.read().expect("redactor lock");
        p.matcher.as_ref().is_some_and(|m| m.is_match(text))
    }

    /// Replaces every registered secret in `text`, in each of its encodings,
    /// with `***`.
    pub fn scrub(&self, text: &str) -> String {
        let p = self.inner.read().expect("redactor lock");
        match &p.matcher {
            Some(m) if m.is_match(text) => m.replace_all(text, &vec![REDACTED; m.patterns_len()]),
            _ => text.to_string(),
        }
    }

    /// Scrubs every string inside a JSON value, object keys included, in
    /// place.
    pub fn scrub_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(s) if self.finds(s) => *s = self.scrub(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_json(v)),
            serde_json::Value::Object(map) => {
                if map.keys().any(|k| self.finds(k)) {
                    let old = std::mem::take(map);
                    for (k, v) in old {
                        map.insert(self.scrub(&k), v);
                    }
                }
                map.values_mut().for_each(|v| self.scrub_json(v));
            }
            _ => {}
        }
    }

    /// Whether a JSON value holds a registered secret in a string or a key.
    pub fn finds_in_json(&self, value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::String(s) => self.finds(s),
            serde_json::Value::Array(items) => items.iter().any(|v| self.finds_in_json(v)),
            serde_json::Value::Object(map) => map
                .iter()
                .any(|(k, v)| self.finds(k) || self.finds_in_json(v)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_of_a_secret_is_scrubbed() {
        let r = Redactor::default();
        let s = "p\"a'ss w\\rd";
        r.register(s);
        let json = serde_json::to_string(&serde_json::json!({ "k": s })).unwrap();
        assert!(!r.scrub(&json).contains("ss w"), "{}", r.scrub(&json));
        assert_eq!(r.scrub(&format!("{s:?}")), "\"***\"");
        assert_eq!(r.scrub(&format!("x={s}")), "x=***");
        assert_eq!(r.scrub(&s.replace('\'', "'\\''")), "***");
        assert_eq!(r.scrub(&format!("?t={}", percent_encode(s))), "?t=***");
    }

    #[test]
    fn keys_and_nested_values_are_scrubbed() {
        let r = Redactor::default();
        r.register("hunter2");
        let mut v = serde_json::json!({"hunter2-key": {"a": ["x hunter2 y"]}, "n": 1});
        assert!(r.finds_in_json(&v));
        r.scrub_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"***-key": {"a": ["x *** y"]}, "n": 1})
        );
        assert!(!r.finds_in_json(&v));
    }

    #[test]
    fn a_secret_containing_another_is_scrubbed_whole() {
        let r = Redactor::default();
        r.register("abc");
        r.register("xabcx");
        assert_eq!(r.scrub("1xabcx2abc"), "1***2***");
    }
}
