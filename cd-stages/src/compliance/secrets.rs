//! Secret scanning: a directory or an artifact (tar, tar.gz, zip — opened
//! in memory) searched for credentials, in the manner of gitleaks and
//! detect-secrets.
//!
//! Rules ([`RULES`]): cloud and SaaS keys with a recognisable shape (AWS,
//! GitHub, GitLab, Slack, Stripe, Google, npm, PyPI, SendGrid, Twilio,
//! Azure storage), private key blocks, JWTs, connection strings with a
//! password, and generic assignments (`token = ...`, `password: ...`) whose
//! value is long and random enough (Shannon entropy ≥ 3.5 bits per
//! character over ≥ 16 characters).
//!
//! A [`Finding`] gives the file and line, the rule, a fingerprint (the first
//! 16 hex digits of SHA-256 over `rule:secret`: stable when the file moves,
//! usable in an allowlist) and a **redacted** match (its first 4 characters
//! and its length): the secret itself is never kept, logged or stored.
//!
//! Files are scanned in parallel (one thread per core); binaries (a NUL
//! byte in the first 8 KiB) and files larger than the limit (default 8 MiB)
//! are skipped with a note.
//!
//! ```
//! use cd_stages::compliance::secrets::{scan_bytes, Allowlist};
//! let key = format!("{}{}", "AKIA", "Z7SW3RBE4KQXJ6PO");
//! let text = format!("aws_access_key_id = {key}\n");
//! let found = scan_bytes("config.ini", text.as_bytes(), &Allowlist::default());
//! assert_eq!(found.len(), 1);
//! assert_eq!((found[0].rule.as_str(), found[0].line), ("aws-access-key-id", 1));
//! assert!(!found[0].redacted.contains(&key));
//! ```

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One rule: an id, a description, and a pattern whose first capture group
/// (or whole match) is the secret.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Its id (`aws-access-key-id`), as findings and allowlists name it.
    pub id: &'static str,
    /// What it finds.
    pub description: &'static str,
    /// The pattern (Rust `regex` syntax).
    pub pattern: &'static str,
    /// Whether the secret must also look random (entropy ≥ 3.5 bits/char).
    pub entropy: bool,
}

/// The built-in rules.
pub const RULES: &[Rule] = &[
    Rule {
        id: "aws-access-key-id",
        description: "AWS access key id",
        pattern: r"\b((?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16})\b",
        entropy: false,
    },
    Rule {
        id: "aws-secret-access-key",
        description: "AWS secret access key",
        pattern: r#"(?i)aws_?(?:secret)?_?(?:access)?_?key[\w.-]*["']?\s*[:=]\s*["']?([A-Za-z0-9/+]{40})(?:["'\s,;]|$)"#,
        entropy: false,
    },
    Rule {
        id: "github-token",
        description: "GitHub token",
        pattern: r"\b(gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        entropy: false,
    },
    Rule {
        id: "gitlab-token",
        description: "GitLab personal access token",
        pattern: r"\b(glpat-[A-Za-z0-9_-]{20})\b",
        entropy: false,
    },
    Rule {
        id: "slack-token",
        description: "Slack token",
        pattern: r"\b(xox[baprs]-[0-9]{8,}-[A-Za-z0-9-]{8,})\b",
        entropy: false,
    },
    Rule {
        id: "slack-webhook",
        description: "Slack incoming webhook URL",
        pattern: r"(https://hooks\.slack\.com/services/T[A-Z0-9]{8,}/B[A-Z0-9]{8,}/[A-Za-z0-9]{20,})",
        entropy: false,
    },
    Rule {
        id: "stripe-key",
        description: "Stripe live secret key",
        pattern: r"\b((?:sk|rk)_live_[A-Za-z0-9]{24,})\b",
        entropy: false,
    },
    Rule {
        id: "google-api-key",
        description: "Google API key",
        pattern: r"\b(AIza[0-9A-Za-z_-]{35})\b",
        entropy: false,
    },
    Rule {
        id: "private-key",
        description: "private key block",
        pattern: r"(-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----)",
        entropy: false,
    },
    Rule {
        id: "jwt",
        description: "JSON Web Token",
        pattern: r"\b(eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
        entropy: false,
    },
    Rule {
        id: "connection-string-password",
        description: "URL or connection string with a password",
        pattern: r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@'\x22]{1,64}:([^\s:/@'\x22${}*<>]{4,128})@[A-Za-z0-9.-]+",
        entropy: false,
    },
    Rule {
        id: "npm-token",
        description: "npm access token",
        pattern: r"\b(npm_[A-Za-z0-9]{36})\b",
        entropy: false,
    },
    Rule {
        id: "pypi-token",
        description: "PyPI upload token",
        pattern: r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,})",
        entropy: false,
    },
    Rule {
        id: "sendgrid-key",
        description: "SendGrid API key",
        pattern: r"\b(SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})\b",
        entropy: false,
    },
    Rule {
        id: "twilio-key",
        description: "Twilio API key",
        pattern: r"\b(SK[0-9a-f]{32})\b",
        entropy: false,
    },
    Rule {
        id: "azure-storage-key",
        description: "Azure storage account key",
        pattern: r"AccountKey=([A-Za-z0-9+/]{86}==)",
        entropy: false,
    },
    Rule {
        id: "generic-secret",
        description: "secret-looking value assigned to a secret-looking name",
        pattern: r#"(?i)\b(?:secret|token|passwd|password|pwd|api[_-]?key|access[_-]?key|auth[_-]?key|client[_-]?secret)[\w.-]{0,20}["']?\s*[:=]\s*["']([A-Za-z0-9/+_=.-]{16,128})["']"#,
        entropy: true,
    },
];

/// Minimum Shannon entropy, bits per character, for rules that ask for it.
pub const MIN_ENTROPY: f64 = 3.5;

/// Shannon entropy of `s`, in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    if n == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

struct Compiled {
    set: RegexSet,
    rules: Vec<Regex>,
}

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| Compiled {
        set: RegexSet::new(RULES.iter().map(|r| r.pattern)).expect("built-in rules compile"),
        rules: RULES
            .iter()
            .map(|r| Regex::new(r.pattern).expect("built-in rule compiles"))
            .collect(),
    })
}

/// What is not reported: paths (a path containing the text, e.g.
/// `tests/fixtures/`), rules (by id), and fingerprints (one finding, with a
/// reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    /// Paths containing any of these are not scanned.
    pub paths: Vec<String>,
    /// Rules not applied.
    pub rules: BTreeSet<String>,
    /// Findings not reported, by fingerprint.
    pub fingerprints: BTreeSet<String>,
}

impl Allowlist {
    fn skips_path(&self, path: &str) -> bool {
        self.paths.iter().any(|p| path.contains(p.as_str()))
    }
}

/// One secret found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The file (`dir/a.env`, or `app.tar.gz!etc/a.env` inside an archive).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The rule's id.
    pub rule: String,
    /// The first 16 hex digits of SHA-256 over `rule:secret`.
    pub fingerprint: String,
    /// The match with the secret hidden: its first 4 characters and its
    /// length (`AKIA… (20 chars)`).
    pub redacted: String,
}

/// A file not scanned, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The file.
    pub file: String,
    /// Why (`binary`, `larger than 8388608 bytes`, an I/O error).
    pub reason: String,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretReport {
    /// Files scanned.
    pub files: usize,
    /// Bytes scanned.
    pub bytes: u64,
    /// Findings, by file and line.
    pub findings: Vec<Finding>,
    /// Files skipped, with the reason.
    pub skipped: Vec<Skipped>,
    /// Findings left out by fingerprint.
    pub allowed: usize,
}

fn redact(secret: &str) -> String {
    let head: String = secret.chars().take(4).collect();
    format!("{head}… ({} chars)", secret.chars().count())
}

fn fingerprint(rule: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(rule.as_bytes());
    h.update(b":");
    h.update(secret.as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Scans one file's bytes (text; binaries are the caller's to skip).
pub fn scan_bytes(file: &str, bytes: &[u8], allow: &Allowlist) -> Vec<Finding> {
    scan_inner(file, bytes, allow).0
}

/// The findings, and how many the allowlist's fingerprints left out.
fn scan_inner(file: &str, bytes: &[u8], allow: &Allowlist) -> (Vec<Finding>, usize) {
    let mut allowed = 0;
    let text = String::from_utf8_lossy(bytes);
    let c = compiled();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for i in c.set.matches(&text).iter() {
        let rule = &RULES[i];
        if allow.rules.contains(rule.id) {
            continue;
        }
        for caps in c.rules[i].captures_iter(&text) {
            let m = caps.get(1).or_else(|| caps.get(0)).expect("a match");
            let secret = m.as_str();
            if rule.entropy && entropy(secret) < MIN_ENTROPY {
                continue;
            }
            let fp = fingerprint(rule.id, secret);
            let line = 1 + memchr::memchr_iter(b'\n', &text.as_bytes()[..m.start()]).count();
            if !seen.insert((line, rule.id, fp.clone())) {
                continue;
            }
            if allow.fingerprints.contains(&fp) {
                allowed += 1;
                continue;
            }
            out.push(Finding {
                file: file.to_string(),
                line,
                rule: rule.id.to_string(),
                fingerprint: fp,
                redacted: redact(secret),
            });
        }
    }
    // A line a specific rule explains is not reported again as generic.
    let specific: BTreeSet<usize> = out
        .iter()
        .filter(|f| f.rule != "generic-secret")
        .map(|f| f.line)
        .collect();
    out.retain(|f| f.rule != "generic-secret" || !specific.contains(&f.line));
    out.sort_by(|a, b| (a.line, &a.rule).cmp(&(b.line, &b.rule)));
    (out, allowed)
}

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// What is not reported.
    pub allow: Allowlist,
    /// Files larger than this are skipped, in bytes (default 8 MiB).
    pub max_file_bytes: u64,
    /// Threads (default: one per core).
    pub threads: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            allow: Allowlist::default(),
            max_file_bytes: 8 << 20,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

fn is_binary(bytes: &[u8]) -> bool {
    memchr::memchr(0, &bytes[..bytes.len().min(8192)]).is_some()
}

/// One thing to scan: a file on disk, or an entry of an archive in memory.
enum Item {
    Path(PathBuf, String),
    Bytes(String, Vec<u8>),
}

fn walk(root: &Path, shown: &Path, out: &mut Vec<Item>, allow: &Allowlist) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name == ".git" {
            continue;
        }
        let path = e.path();
        let rel = shown.join(&name);
        let rel_s = rel.to_string_lossy().into_owned();
        if allow.skips_path(&rel_s) {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(&path, &rel, out, allow)?;
        } else if ft.is_file() {
            out.push(Item::Path(path, rel_s));
        }
    }
    Ok(())
}

/// Scans a directory tree, or an archive (`.tar`, `.tar.gz`/`.tgz`,
/// `.zip`, read into memory), or a single file.
///
/// Errors: [`cd_core::ErrorKind::NotFound`] for a missing path,
/// [`cd_core::ErrorKind::Invalid`] for an archive that cannot be read.
pub fn scan_path(path: &Path, opts: &ScanOptions) -> cd_core::Result<SecretReport> {
    let meta = std::fs::metadata(path).map_err(|e| {
        cd_core::Error::new(
            cd_core::ErrorKind::NotFound,
            format!("secret scan: {}: {e}", path.display()),
        )
        .with("file", path.display())
    })?;
    let mut items = Vec::new();
    let mut report = SecretReport::default();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if meta.is_dir() {
        walk(path, Path::new(""), &mut items, &opts.allow).map_err(|e| {
            cd_core::Error::invalid(format!("secret scan: {}: {e}", path.display()))
                .with("file", path.display())
        })?;
    } else if name.ends_with(".tar")
        || name.ends_with(".tar.gz")
        || name.ends_with(".tgz")
        || name.ends_with(".zip")
    {
        archive_items(path, &name, opts, &mut items, &mut report)?;
    } else {
        items.push(Item::Path(path.to_path_buf(), name));
    }
    scan_items(items, opts, report)
}

fn archive_items(
    path: &Path,
    name: &str,
    opts: &ScanOptions,
    items: &mut Vec<Item>,
    report: &mut SecretReport,
) -> cd_core::Result<()> {
    let bad = |e: &dyn std::fmt::Display| {
        cd_core::Error::invalid(format!("secret scan: archive {}: {e}", path.display()))
            .with("file", path.display())
    };
    let data = std::fs::read(path).map_err(|e| bad(&e))?;
    let mut push = |entry: String, bytes: Vec<u8>| {
        let shown = format!("{name}!{entry}");
        if opts.allow.skips_path(&shown) {
            return;
        }
        if bytes.len() as u64 > opts.max_file_bytes {
            report.skipped.push(Skipped {
                file: shown,
                reason: format!("larger than {} bytes", opts.max_file_bytes),
            });
        } else {
            items.push(Item::Bytes(shown, bytes));
        }
    };
    if name.ends_with(".zip") {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&data)).map_err(|e| bad(&e))?;
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).map_err(|e| bad(&e))?;
            if f.is_dir() {
                continue;
            }
            let entry = f.name().to_string();
            let mut bytes = Vec::new();
            f.by_ref()
                .take(opts.max_file_bytes + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| bad(&e))?;
            push(entry, bytes);
        }
        return Ok(());
    }
    let reader: Box<dyn Read> = if name.ends_with(".tar") {
        Box::new(std::io::Cursor::new(&data))
    } else {
        Box::new(flate2::read::GzDecoder::new(std::io::Cursor::new(&data)))
    };
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(|e| bad(&e))? {
        let mut entry = entry.map_err(|e| bad(&e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(opts.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(&e))?;
        push(entry_name, bytes);
    }
    Ok(())
}

fn scan_items(
    items: Vec<Item>,
    opts: &ScanOptions,
    report: SecretReport,
) -> cd_core::Result<SecretReport> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(report);
    let threads = opts.threads.max(1).min(items.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut local = SecretReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let (file, owned);
                    let bytes: &[u8] = match item {
                        Item::Bytes(name, b) => {
                            file = name.clone();
                            b
                        }
                        Item::Path(p, name) => {
                            file = name.clone();
                            match std::fs::metadata(p) {
                                Ok(m) if m.len() > opts.max_file_bytes => {
                                    local.skipped.push(Skipped {
                                        file,
                                        reason: format!(
                                            "larger than {} bytes",
                                            opts.max_file_bytes
                                        ),
                                    });
                                    continue;
                                }
                                Err(e) => {
                                    local.skipped.push(Skipped {
                                        file,
                                        reason: e.to_string(),
                                    });
                                    continue;
                                }
                                Ok(_) => {}
                            }
                            match std::fs::read(p) {
                                Ok(b) => {
                                    owned = b;
                                    &owned
                                }
                                Err(e) => {
                                    local.skipped.push(Skipped {
                                        file,
                                        reason: e.to_string(),
                                    });
                                    continue;
                                }
                            }
                        }
                    };
                    if is_binary(bytes) {
                        local.skipped.push(Skipped {
                            file,
                            reason: "binary".into(),
                        });
                        continue;
                    }
                    local.files += 1;
                    local.bytes += bytes.len() as u64;
                    let (found, allowed) = scan_inner(&file, bytes, &opts.allow);
                    local.findings.extend(found);
                    local.allowed += allowed;
                }
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                o.files += local.files;
                o.bytes += local.bytes;
                o.findings.extend(local.findings);
                o.allowed += local.allowed;
                o.skipped.extend(local.skipped);
            });
        }
    });
    let mut report = out.into_inner().unwrap_or_else(|p| p.into_inner());
    report
        .findings
        .sort_by(|a, b| (&a.file, a.line, &a.rule).cmp(&(&b.file, b.line, &b.rule)));
    report.skipped.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(report)
}

/// A stage that scans a directory, or the release's artifact, for secrets
/// and fails when it finds any (see the [module docs](self)). Its output is
/// the [`SecretReport`] (redacted matches and fingerprints only).
///
/// ```
/// use cd_stages::compliance::secrets::SecretScan;
/// let scan = SecretScan::path("deploy/")
///     .allow_path("tests/fixtures/")
///     .allow_fingerprint("0123456789abcdef", "a documented example key");
/// # let _ = scan;
/// ```
#[derive(Debug, Clone)]
pub struct SecretScan {
    path: Option<PathBuf>,
    more: Vec<PathBuf>,
    opts: ScanOptions,
    reasons: Vec<(String, String)>,
    report_only: bool,
}

impl SecretScan {
    /// Scans `path` (a directory, an archive or a file).
    pub fn path(path: impl Into<PathBuf>) -> Self {
        SecretScan {
            path: Some(path.into()),
            more: Vec::new(),
            opts: ScanOptions::default(),
            reasons: Vec::new(),
            report_only: false,
        }
    }

    /// Scans several paths (directories, archives or files) as one scan:
    /// one report, findings in path order. Errors on the first path that
    /// cannot be read, naming it.
    pub fn paths<I, P>(paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        let mut all = paths.into_iter().map(Into::into);
        let mut scan = match all.next() {
            Some(first) => SecretScan::path(first),
            None => SecretScan::artifact(),
        };
        scan.more = all.collect();
        scan
    }

    /// Scans the release's artifact.
    pub fn artifact() -> Self {
        SecretScan {
            path: None,
            more: Vec::new(),
            opts: ScanOptions::default(),
            reasons: Vec::new(),
            report_only: false,
        }
    }

    /// Does not scan paths containing `text`.
    pub fn allow_path(mut self, text: impl Into<String>) -> Self {
        self.opts.allow.paths.push(text.into());
        self
    }

    /// Does not apply rule `id`.
    pub fn allow_rule(mut self, id: impl Into<String>) -> Self {
        self.opts.allow.rules.insert(id.into());
        self
    }

    /// Does not report the finding with this fingerprint; the reason is
    /// kept in the stage's output.
    pub fn allow_fingerprint(mut self, fp: impl Into<String>, reason: impl Into<String>) -> Self {
        let fp = fp.into();
        self.opts.allow.fingerprints.insert(fp.clone());
        self.reasons.push((fp, reason.into()));
        self
    }

    /// Reports findings in the output instead of failing the stage, for a
    /// [`super::policy::PolicyGate`] downstream to decide on.
    pub fn report_only(mut self) -> Self {
        self.report_only = true;
        self
    }

    /// Skips files larger than `bytes`.
    pub fn max_file_bytes(mut self, bytes: u64) -> Self {
        self.opts.max_file_bytes = bytes;
        self
    }
}

#[async_trait::async_trait]
impl cd_core::Stage for SecretScan {
    fn kind(&self) -> String {
        "secret-scan".into()
    }

    fn fingerprint(&self) -> String {
        format!(
            "secret-scan:{:?}:{:?}:{:?}:{}:{}",
            self.path, self.more, self.opts.allow, self.opts.max_file_bytes, self.report_only
        )
    }

    fn capabilities(&self) -> cd_core::Capabilities {
        cd_core::Capabilities::CHECK
    }

    async fn run(&self, cx: &cd_core::StageContext) -> cd_core::Result<cd_core::StageOutput> {
        let path = match &self.path {
            Some(p) => p.clone(),
            None => cx
                .release()
                .artifact
                .as_ref()
                .map(|a| a.path.clone())
                .ok_or_else(|| {
                    cd_core::Error::invalid(format!(
                        "secret scan of the artifact: release {} has none",
                        cx.release().version
                    ))
                    .with("node", cx.node())
                })?,
        };
        let opts = self.opts.clone();
        let started = std::time::Instant::now();
        let mut all = vec![path.clone()];
        all.extend(self.more.iter().cloned());
        let report = tokio::task::spawn_blocking(move || {
            let mut total = SecretReport::default();
            for p in &all {
                let r = scan_path(p, &opts)?;
                total.files += r.files;
                total.bytes += r.bytes;
                total.findings.extend(r.findings);
                total.skipped.extend(r.skipped);
                total.allowed += r.allowed;
            }
            Ok::<_, cd_core::Error>(total)
        })
        .await
        .map_err(|e| cd_core::Error::failed(format!("secret scan panicked: {e}")))?
        .map_err(|e| e.with("node", cx.node()))?;
        let shown = if self.more.is_empty() {
            path.display().to_string()
        } else {
            format!("{} (+{} more)", path.display(), self.more.len())
        };
        cx.log(format!(
            "secret scan of {shown}: {} file(s), {} bytes in {} ms: {} finding(s), {} allowed, {} skipped",
            report.files,
            report.bytes,
            started.elapsed().as_millis(),
            report.findings.len(),
            report.allowed,
            report.skipped.len()
        ));
        for f in report.findings.iter().take(20) {
            cx.log(format!(
                "  {}:{} {} {} [{}]",
                f.file, f.line, f.rule, f.redacted, f.fingerprint
            ));
        }
        let out = serde_json::json!({
            "report": report,
            "allowed_fingerprints": self.reasons.iter().map(|(f, r)| serde_json::json!({"fingerprint": f, "reason": r})).collect::<Vec<_>>(),
        });
        if report.findings.is_empty() || self.report_only {
            return Ok(cd_core::StageOutput::json(out));
        }
        let list: Vec<String> = report
            .findings
            .iter()
            .take(5)
            .map(|f| format!("{}:{} ({}, {})", f.file, f.line, f.rule, f.redacted))
            .collect();
        Err(cd_core::Error::failed(format!(
            "{} secret(s) found in {shown}: {}{}",
            report.findings.len(),
            list.join("; "),
            if report.findings.len() > 5 {
                "; ..."
            } else {
                ""
            }
        ))
        .with("node", cx.node())
        .retryable(false))
    }
}
