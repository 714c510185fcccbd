//! Terraform's machine-readable UI (`-json`): one JSON object per line.
//!
//! Message types used here (Terraform ≥ 0.15.3, OpenTofu): `version`,
//! `planned_change`, `change_summary`, `apply_start`, `apply_progress`,
//! `apply_complete`, `apply_errored`, `provision_start`, `provision_progress`,
//! `provision_complete`, `provision_errored`, `refresh_start`,
//! `refresh_complete`, `diagnostic`, `outputs`. Unknown types are kept as
//! [`UiMessage::kind`] and ignored by the deployer.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One line of terraform's `-json` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UiMessage {
    /// `info`, `warn`, `error`.
    #[serde(rename = "@level", default)]
    pub level: String,
    /// The human-readable line.
    #[serde(rename = "@message", default)]
    pub message: String,
    /// The message type (`apply_start`, `diagnostic`, ...).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// For `apply_*`, `provision_*` and `refresh_*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// For `planned_change`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<PlannedChange>,
    /// For `diagnostic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<Diagnostic>,
    /// For `change_summary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeSummary>,
    /// For `outputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BTreeMap<String, OutputValue>>,
}

impl UiMessage {
    /// Parses one line; `None` for lines that are not UI messages.
    pub fn parse(line: &str) -> Option<UiMessage> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        let msg: UiMessage = serde_json::from_str(line).ok()?;
        // `show -json` and `output -json` documents parse too (every field
        // has a default); UI messages always carry a level and a type.
        (!msg.kind.is_empty() && !msg.level.is_empty()).then_some(msg)
    }

    /// The resource address the message is about, if any.
    pub fn address(&self) -> Option<&str> {
        self.hook
            .as_ref()
            .map(|h| h.resource.addr.as_str())
            .or_else(|| self.change.as_ref().map(|c| c.resource.addr.as_str()))
            .or_else(|| self.diagnostic.as_ref().and_then(|d| d.address.as_deref()))
    }
}

/// The resource a message is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAddr {
    /// Full address (`module.net.null_resource.a[0]`).
    pub addr: String,
    /// Module address, empty for the root module.
    #[serde(default)]
    pub module: String,
    /// Resource type.
    #[serde(default)]
    pub resource_type: String,
    /// Resource name.
    #[serde(default)]
    pub resource_name: String,
}

/// Progress of one operation on one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    /// The resource.
    pub resource: ResourceAddr,
    /// `create`, `update`, `delete`, `replace`, `read`, `noop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Seconds since the operation began (`apply_progress`, `apply_complete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_seconds: Option<f64>,
    /// The provisioner (`local-exec`), for `provision_*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<String>,
    /// A line of provisioner output, for `provision_progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The resource id after the operation, for `apply_complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_value: Option<String>,
}

/// A change announced while planning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedChange {
    /// The resource.
    pub resource: ResourceAddr,
    /// `create`, `update`, `delete`, `replace`, `read`, `noop`, `move`.
    pub action: String,
    /// Why (`cannot_update`, `tainted`, `requested`), for replacements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `change_summary` counts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangeSummary {
    /// Resources to add (or added).
    #[serde(default)]
    pub add: u64,
    /// Resources to change in place.
    #[serde(default)]
    pub change: u64,
    /// Resources to destroy.
    #[serde(default)]
    pub remove: u64,
    /// `plan`, `apply` or `destroy`.
    #[serde(default)]
    pub operation: String,
}

/// An output value as terraform reports it after apply (`outputs` message,
/// `terraform output -json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputValue {
    /// Whether terraform marks the output sensitive.
    #[serde(default)]
    pub sensitive: bool,
    /// The type, as terraform spells it.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<serde_json::Value>,
    /// The value (absent while unknown).
    #[serde(default)]
    pub value: serde_json::Value,
}

/// A terraform diagnostic: an error or a warning, with where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// `error` or `warning`.
    pub severity: String,
    /// One line (`Invalid expression`, `local-exec provisioner error`).
    pub summary: String,
    /// More text, possibly several lines.
    #[serde(default)]
    pub detail: String,
    /// The resource the diagnostic is about (a failing provisioner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where in the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<SourceRange>,
}

impl Diagnostic {
    /// Whether this is an error (not a warning).
    pub fn is_error(&self) -> bool {
        self.severity == "error"
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)?;
        if let Some(r) = &self.range {
            write!(f, " at {}:{}", r.filename, r.start.line)?;
        }
        if let Some(a) = &self.address {
            write!(f, " ({a})")?;
        }
        Ok(())
    }
}

/// A range in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRange {
    /// The file, relative to the working directory.
    pub filename: String,
    /// Where it starts.
    pub start: SourcePos,
    /// Where it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<SourcePos>,
}

/// A position in a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePos {
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    #[serde(default)]
    pub column: u64,
}

/// Reads diagnostics from terraform's human-readable output (`init` has no
/// `-json` in terraform 1.0):
///
/// ```text
/// Error: Invalid expression
///
///   on main.tf line 3, in resource "null_resource" "x":
///    3:     a =
///
/// Expected the start of an expression, but found an invalid expression token.
/// ```
pub fn parse_human_diagnostics(text: &str) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = strip_box(lines[i]);
        let (severity, summary) = if let Some(s) = line.strip_prefix("Error: ") {
            ("error", s)
        } else if let Some(s) = line.strip_prefix("Warning: ") {
            ("warning", s)
        } else {
            i += 1;
            continue;
        };
        let mut d = Diagnostic {
            severity: severity.into(),
            summary: summary.trim().to_string(),
            detail: String::new(),
            address: None,
            range: None,
        };
        i += 1;
        let mut detail: Vec<&str> = Vec::new();
        while i < lines.len() {
            let l = strip_box(lines[i]);
            if l.starts_with("Error: ") || l.starts_with("Warning: ") {
                break;
            }
            let t = l.trim();
            if d.range.is_none() && t.starts_with("on ") && t.contains(" line ") {
                // `on main.tf line 3, in resource ...:` or `on main.tf line 3:`
                let rest = &t[3..];
                if let Some(pos) = rest.find(" line ") {
                    let file = rest[..pos].to_string();
                    let num: String = rest[pos + 6..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    if let Ok(n) = num.parse::<u64>() {
                        d.range = Some(SourceRange {
                            filename: file,
                            start: SourcePos { line: n, column: 0 },
                            end: None,
                        });
                    }
                }
            } else if is_snippet_line(t) {
                // source excerpt: `3:     a =`
            } else {
                detail.push(t);
            }
            i += 1;
        }
        d.detail = detail.join("\n").trim().to_string();
        out.push(d);
    }
    out
}

fn strip_box(line: &str) -> &str {
    // terraform ≥ 1.1 draws a box (`│ `, `╷`, `╵`) around diagnostics.
    let l = line.trim_start();
    let l = l
        .strip_prefix('│')
        .or_else(|| l.strip_prefix('╷'))
        .or_else(|| l.strip_prefix('╵'))
        .unwrap_or(l);
    l.trim_start()
}

fn is_snippet_line(t: &str) -> bool {
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    !digits.is_empty() && t[digits.len()..].starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_diagnostic() {
        let text = "\nThere are some problems with the configuration, described below.\n\nError: Invalid expression\n\n  on main.tf line 3, in resource \"null_resource\" \"x\":\n   3:     a = \n   4:   }\n\nExpected the start of an expression, but found an invalid expression token.\n";
        let d = parse_human_diagnostics(text);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].summary, "Invalid expression");
        let r = d[0].range.as_ref().unwrap();
        assert_eq!((r.filename.as_str(), r.start.line), ("main.tf", 3));
        assert!(d[0].detail.starts_with("Expected the start"));
    }

    #[test]
    fn parses_boxed_diagnostic() {
        let text = "╷\n│ Error: Unsupported argument\n│ \n│   on vars.tf line 12:\n│   12:   foo = 1\n│ \n│ An argument named \"foo\" is not expected here.\n╵\n";
        let d = parse_human_diagnostics(text);
        assert_eq!(d[0].range.as_ref().unwrap().start.line, 12);
        assert_eq!(d[0].summary, "Unsupported argument");
    }

    #[test]
    fn parses_ui_message() {
        let line = r#"{"@level":"error","@message":"Error: local-exec provisioner error","@module":"terraform.ui","diagnostic":{"severity":"error","summary":"local-exec provisioner error","detail":"exit status 3","address":"null_resource.bad","range":{"filename":"main.tf","start":{"line":2,"column":30,"byte":62},"end":{"line":2,"column":31,"byte":63}}},"type":"diagnostic"}"#;
        let m = UiMessage::parse(line).unwrap();
        assert_eq!(m.kind, "diagnostic");
        assert_eq!(m.address(), Some("null_resource.bad"));
        assert_eq!(m.diagnostic.unwrap().range.unwrap().start.line, 2);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any line terraform streams (`-json` UI lines or text): a message
        /// or nothing, never a panic; diagnostics text likewise.
        #[test]
        fn ui_lines_never_panic(line in crate::fuzz::line()) {
            let _ = UiMessage::parse(&line);
            let _ = parse_human_diagnostics(&line);
        }
    }
}
