//! Vulnerability advisories: components matched against advisories in the
//! OSV format (schema 1.7, <https://ossf.github.io/osv-schema/>), read from
//! a local directory of `*.json` files or a zip of an OSV ecosystem export.
//! Offline: nothing is fetched.
//!
//! Matching follows the OSV schema's evaluation: a component is affected
//! when its `(ecosystem, name)` is an affected package and its version is
//! listed in `versions`, or falls in a range: events sorted by version,
//! `introduced` opens (`"0"` is before every version), `fixed` closes
//! (exclusive), `last_affected` closes after it (inclusive), `limit` bounds
//! the range. `SEMVER` and `ECOSYSTEM` ranges are evaluated (versions
//! compared as SemVer 2.0, missing minor/patch read as 0, else by dotted
//! numeric parts); `GIT` ranges are ignored. Withdrawn advisories are
//! ignored; aliases are merged into the match.
//!
//! Severity: the CVSS v3 base score computed from the vector (CVSS 3.1
//! specification, section 7 and appendix A: weights, scope-changed
//! privileges, the `Roundup` function), else the database's own severity
//! (`LOW`, `MODERATE`/`MEDIUM`, `HIGH`, `CRITICAL`).
//!
//! ```
//! use cd_stages::compliance::advisories::{cvss3_base_score, Level};
//! let s = cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H").unwrap();
//! assert_eq!((s, Level::from_score(s)), (9.8, Level::Critical));
//! ```

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use cd_core::{Error, ErrorKind, Result};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// A severity level, CVSS v3 qualitative ratings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// 0.0, or not known.
    None,
    /// 0.1–3.9.
    Low,
    /// 4.0–6.9.
    Medium,
    /// 7.0–8.9.
    High,
    /// 9.0–10.0.
    Critical,
}

impl Level {
    /// The rating of a CVSS v3 score.
    pub fn from_score(score: f64) -> Self {
        match score {
            s if s >= 9.0 => Level::Critical,
            s if s >= 7.0 => Level::High,
            s if s >= 4.0 => Level::Medium,
            s if s > 0.0 => Level::Low,
            _ => Level::None,
        }
    }

    /// A database's word (`LOW`, `MODERATE`, `MEDIUM`, `HIGH`, `CRITICAL`).
    pub fn from_word(w: &str) -> Option<Self> {
        Some(match w.to_ascii_uppercase().as_str() {
            "LOW" => Level::Low,
            "MODERATE" | "MEDIUM" => Level::Medium,
            "HIGH" => Level::High,
            "CRITICAL" => Level::Critical,
            _ => return None,
        })
    }
}

/// The CVSS v3.0/v3.1 base score of a vector
/// (`CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H`), 0.0–10.0.
///
/// Errors: [`ErrorKind::Invalid`] naming the metric that is missing or has
/// an unknown value.
pub fn cvss3_base_score(vector: &str) -> Result<f64> {
    let mut m: BTreeMap<&str, &str> = BTreeMap::new();
    for part in vector.split('/') {
        if let Some((k, v)) = part.split_once(':') {
            m.insert(k, v);
        }
    }
    let get = |k: &str, table: &[(&str, f64)]| -> Result<f64> {
        let v = m.get(k).ok_or_else(|| {
            Error::invalid(format!("CVSS vector `{vector}` has no {k}")).with("vector", vector)
        })?;
        table
            .iter()
            .find(|(n, _)| n == v)
            .map(|(_, w)| *w)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "CVSS vector `{vector}`: {k}:{v} is not a CVSS v3 value"
                ))
                .with("vector", vector)
            })
    };
    let changed = match m.get("S") {
        Some(&"C") => true,
        Some(&"U") => false,
        _ => {
            return Err(
                Error::invalid(format!("CVSS vector `{vector}` has no scope (S:U or S:C)"))
                    .with("vector", vector),
            )
        }
    };
    let av = get("AV", &[("N", 0.85), ("A", 0.62), ("L", 0.55), ("P", 0.2)])?;
    let ac = get("AC", &[("L", 0.77), ("H", 0.44)])?;
    let pr = if changed {
        get("PR", &[("N", 0.85), ("L", 0.68), ("H", 0.5)])?
    } else {
        get("PR", &[("N", 0.85), ("L", 0.62), ("H", 0.27)])?
    };
    let ui = get("UI", &[("N", 0.85), ("R", 0.62)])?;
    let cia = [("H", 0.56), ("L", 0.22), ("N", 0.0)];
    let (c, i, a) = (get("C", &cia)?, get("I", &cia)?, get("A", &cia)?);
    let iss = 1.0 - (1.0 - c) * (1.0 - i) * (1.0 - a);
    let impact = if changed {
        7.52 * (iss - 0.029) - 3.25 * (iss - 0.02).powi(15)
    } else {
        6.42 * iss
    };
    let exploitability = 8.22 * av * ac * pr * ui;
    if impact <= 0.0 {
        return Ok(0.0);
    }
    let base = if changed {
        roundup((1.08 * (impact + exploitability)).min(10.0))
    } else {
        roundup((impact + exploitability).min(10.0))
    };
    Ok(base)
}

/// CVSS 3.1 appendix A: the smallest number with one decimal that is equal
/// to or higher than the input, immune to floating-point error.
fn roundup(x: f64) -> f64 {
    let i = (x * 100_000.0).round() as i64;
    if i % 10_000 == 0 {
        i as f64 / 100_000.0
    } else {
        ((i / 10_000) as f64 + 1.0) / 10.0
    }
}

/// A component to check (from an SBOM or a lock file).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Component {
    /// The OSV ecosystem: `crates.io`, `npm`, `PyPI`.
    pub ecosystem: String,
    /// The package name.
    pub name: String,
    /// Its version.
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvEvent {
    introduced: Option<String>,
    fixed: Option<String>,
    last_affected: Option<String>,
    limit: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvRange {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    events: Vec<OsvEvent>,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvPackage {
    ecosystem: String,
    name: String,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvSeverity {
    #[serde(rename = "type")]
    kind: String,
    score: String,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvAffected {
    package: Option<OsvPackage>,
    #[serde(default)]
    ranges: Vec<OsvRange>,
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    severity: Vec<OsvSeverity>,
    #[serde(default)]
    ecosystem_specific: serde_json::Value,
    #[serde(default)]
    database_specific: serde_json::Value,
}

/// One OSV advisory (the fields matching needs).
#[derive(Debug, Clone, Deserialize)]
pub struct Advisory {
    /// Its id (`RUSTSEC-2024-0001`, `GHSA-...`).
    pub id: String,
    /// Other ids of the same vulnerability (`CVE-...`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// One line.
    #[serde(default)]
    pub summary: String,
    /// When it was withdrawn (then it is ignored).
    pub withdrawn: Option<String>,
    #[serde(default)]
    affected: Vec<OsvAffected>,
    #[serde(default)]
    severity: Vec<OsvSeverity>,
    #[serde(default)]
    database_specific: serde_json::Value,
}

/// Compares versions: SemVer when both parse (a missing minor or patch
/// read as 0), else dotted numeric parts, else text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn sem(v: &str) -> Option<semver::Version> {
        let v = v.trim().trim_start_matches('v');
        semver::Version::parse(v).ok().or_else(|| {
            let (core, rest) = match v.find(['-', '+']) {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            };
            let mut parts: Vec<&str> = core.split('.').collect();
            while parts.len() < 3 {
                parts.push("0");
            }
            semver::Version::parse(&format!("{}{rest}", parts.join("."))).ok()
        })
    }
    if a == "0" {
        return if b == "0" {
            Ordering::Equal
        } else {
            Ordering::Less
        };
    }
    if b == "0" {
        return Ordering::Greater;
    }
    match (sem(a), sem(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => {
            let nums = |v: &str| -> Vec<u64> {
                v.split(|c: char| !c.is_ascii_digit())
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().unwrap_or(0))
                    .collect()
            };
            nums(a).cmp(&nums(b)).then_with(|| a.cmp(b))
        }
    }
}

fn in_range(version: &str, range: &OsvRange) -> bool {
    if range.kind != "SEMVER" && range.kind != "ECOSYSTEM" {
        return false;
    }
    let limits: Vec<&str> = range
        .events
        .iter()
        .filter_map(|e| e.limit.as_deref())
        .collect();
    if !limits.is_empty()
        && !limits
            .iter()
            .any(|l| *l == "*" || compare_versions(version, l) == Ordering::Less)
    {
        return false;
    }
    let mut events: Vec<(&str, u8)> = Vec::new();
    for e in &range.events {
        if let Some(v) = &e.introduced {
            events.push((v, 0));
        }
        if let Some(v) = &e.fixed {
            events.push((v, 1));
        }
        if let Some(v) = &e.last_affected {
            events.push((v, 2));
        }
    }
    events.sort_by(|a, b| compare_versions(a.0, b.0).then(a.1.cmp(&b.1)));
    let mut vulnerable = false;
    for (v, kind) in events {
        let cmp = compare_versions(version, v);
        match kind {
            0 if cmp != Ordering::Less => vulnerable = true,
            1 if cmp != Ordering::Less => vulnerable = false,
            2 if cmp == Ordering::Greater => vulnerable = false,
            _ => {}
        }
    }
    vulnerable
}

/// Advisories loaded from disk.
#[derive(Debug, Clone, Default)]
pub struct AdvisoryDb {
    advisories: Vec<Advisory>,
}

impl AdvisoryDb {
    /// Parses one OSV JSON document.
    ///
    /// Errors: [`ErrorKind::Invalid`] naming `source` and the JSON error's
    /// line and column.
    pub fn parse(source: &str, json: &[u8]) -> Result<Advisory> {
        serde_json::from_slice(json).map_err(|e| {
            Error::invalid(format!(
                "advisory {source}: line {}, column {}: {e}",
                e.line(),
                e.column()
            ))
            .with("file", source)
        })
    }

    /// Every `*.json` under `dir`, or every `*.json` entry of a zip (an OSV
    /// ecosystem export, `all.zip`).
    ///
    /// Errors: [`ErrorKind::NotFound`] for a missing path,
    /// [`ErrorKind::Invalid`] for a file that is not OSV JSON.
    pub fn load(path: &Path) -> Result<Self> {
        let mut db = AdvisoryDb::default();
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::new(
                ErrorKind::NotFound,
                format!("advisories {}: {e}", path.display()),
            )
            .with("file", path.display())
        })?;
        if meta.is_dir() {
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let mut entries: Vec<_> = std::fs::read_dir(&dir)
                    .map_err(|e| Error::invalid(format!("advisories {}: {e}", dir.display())))?
                    .filter_map(|e| e.ok())
                    .collect();
                entries.sort_by_key(|e| e.file_name());
                for e in entries {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "json") {
                        let bytes = std::fs::read(&p)
                            .map_err(|e| Error::invalid(format!("{}: {e}", p.display())))?;
                        db.advisories
                            .push(Self::parse(&p.display().to_string(), &bytes)?);
                    }
                }
            }
        } else {
            let file = std::fs::File::open(path)
                .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
            let mut zip = zip::ZipArchive::new(file).map_err(|e| {
                Error::invalid(format!("advisories {}: not a zip: {e}", path.display()))
            })?;
            for i in 0..zip.len() {
                let mut f = zip
                    .by_index(i)
                    .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
                if !f.name().ends_with(".json") {
                    continue;
                }
                let name = format!("{}!{}", path.display(), f.name());
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
                db.advisories.push(Self::parse(&name, &bytes)?);
            }
        }
        Ok(db)
    }

    /// The advisories loaded.
    pub fn len(&self) -> usize {
        self.advisories.len()
    }

    /// Whether none was loaded.
    pub fn is_empty(&self) -> bool {
        self.advisories.is_empty()
    }

    /// Adds one.
    pub fn push(&mut self, a: Advisory) {
        self.advisories.push(a);
    }

    /// The advisories affecting `c` (withdrawn ones left out).
    pub fn matches(&self, c: &Component) -> Vec<AdvisoryMatch> {
        let mut out = Vec::new();
        for a in self.advisories.iter().filter(|a| a.withdrawn.is_none()) {
            for aff in &a.affected {
                let Some(pkg) = &aff.package else { continue };
                if !pkg.ecosystem.eq_ignore_ascii_case(&c.ecosystem)
                    || !same_name(&c.ecosystem, &pkg.name, &c.name)
                {
                    continue;
                }
                let hit = aff.versions.iter().any(|v| v == &c.version)
                    || aff.ranges.iter().any(|r| in_range(&c.version, r));
                if !hit {
                    continue;
                }
                let (score, level) = severity(a, aff);
                let fixed: Vec<String> = aff
                    .ranges
                    .iter()
                    .flat_map(|r| r.events.iter().filter_map(|e| e.fixed.clone()))
                    .collect();
                out.push(AdvisoryMatch {
                    component: c.clone(),
                    id: a.id.clone(),
                    aliases: a.aliases.clone(),
                    summary: a.summary.clone(),
                    score,
                    level,
                    fixed,
                });
                break;
            }
        }
        out
    }
}

/// PyPI names compare normalised (PEP 503); others exactly.
fn same_name(ecosystem: &str, a: &str, b: &str) -> bool {
    if ecosystem.eq_ignore_ascii_case("pypi") {
        let norm = |s: &str| s.to_ascii_lowercase().replace(['_', '.'], "-");
        norm(a) == norm(b)
    } else {
        a == b
    }
}

fn severity(a: &Advisory, aff: &OsvAffected) -> (Option<f64>, Level) {
    for s in aff.severity.iter().chain(&a.severity) {
        if s.kind == "CVSS_V3" {
            if let Ok(score) = cvss3_base_score(&s.score) {
                return (Some(score), Level::from_score(score));
            }
        }
    }
    let word = [
        &aff.ecosystem_specific["severity"],
        &aff.database_specific["severity"],
        &a.database_specific["severity"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().and_then(Level::from_word));
    (None, word.unwrap_or(Level::None))
}

/// One component affected by one advisory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvisoryMatch {
    /// The component.
    pub component: Component,
    /// The advisory's id.
    pub id: String,
    /// Its aliases (`CVE-...`).
    pub aliases: Vec<String>,
    /// Its summary.
    pub summary: String,
    /// The CVSS v3 base score, when the advisory gives a vector.
    pub score: Option<f64>,
    /// The severity level.
    pub level: Level,
    /// Versions that fix it.
    pub fixed: Vec<String>,
}

/// An advisory deliberately ignored: needs a reason and an expiry date
/// (after it, the advisory counts again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ignore {
    /// The advisory id or one of its aliases.
    pub id: String,
    /// Why.
    pub reason: String,
    /// The last day it is ignored.
    pub until: NaiveDate,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdvisoryReport {
    /// Components checked.
    pub components: usize,
    /// Matches at or above the threshold, not ignored: these fail.
    pub failing: Vec<AdvisoryMatch>,
    /// Matches below the threshold.
    pub below_threshold: Vec<AdvisoryMatch>,
    /// Matches ignored (with the entry that ignored them).
    pub ignored: Vec<(AdvisoryMatch, Ignore)>,
    /// Ignore entries past their date (they ignore nothing).
    pub expired_ignores: Vec<Ignore>,
}

/// Checks `components` against `db`: matches at or above `fail_at` fail
/// unless an ignore entry (by id or alias) is still valid on `today`.
pub fn check(
    db: &AdvisoryDb,
    components: &[Component],
    fail_at: Level,
    ignores: &[Ignore],
    today: NaiveDate,
) -> AdvisoryReport {
    let mut r = AdvisoryReport {
        components: components.len(),
        expired_ignores: ignores
            .iter()
            .filter(|i| i.until < today)
            .cloned()
            .collect(),
        ..Default::default()
    };
    for c in components {
        for m in db.matches(c) {
            let ignore = ignores
                .iter()
                .find(|i| i.until >= today && (i.id == m.id || m.aliases.contains(&i.id)));
            match ignore {
                Some(i) => r.ignored.push((m, i.clone())),
                None if m.level >= fail_at => r.failing.push(m),
                None => r.below_threshold.push(m),
            }
        }
    }
    r
}

/// A stage that checks the components of the lock files under a directory
/// ([`super::components::discover`]) against an OSV advisory database and
/// fails on matches at or above a level (default [`Level::High`]) that no
/// ignore entry covers. Its output is the [`AdvisoryReport`].
///
/// ```
/// use chrono::NaiveDate;
/// use cd_stages::compliance::advisories::{AdvisoryCheck, Level};
/// let check = AdvisoryCheck::new("osv/", ".")
///     .fail_at(Level::Critical)
///     .ignore("RUSTSEC-2099-0001", "not reachable", NaiveDate::from_ymd_opt(2099, 1, 1).unwrap());
/// # let _ = check;
/// ```
#[derive(Debug, Clone)]
pub struct AdvisoryCheck {
    db: std::path::PathBuf,
    components: ComponentSource,
    fail_at: Level,
    ignores: Vec<Ignore>,
    report_only: bool,
}

#[derive(Debug, Clone)]
enum ComponentSource {
    Dir(std::path::PathBuf),
    SbomNode(String),
}

impl AdvisoryCheck {
    /// Advisories from `db` (a directory of OSV JSON or a zip export);
    /// components from the lock files under `dir`.
    pub fn new(db: impl Into<std::path::PathBuf>, dir: impl Into<std::path::PathBuf>) -> Self {
        AdvisoryCheck {
            db: db.into(),
            components: ComponentSource::Dir(dir.into()),
            fail_at: Level::High,
            ignores: Vec::new(),
            report_only: false,
        }
    }

    /// Advisories from `db`; components from the CycloneDX document an
    /// upstream [`super::sbom::SbomStage`] node output under `sbom`
    /// ([`super::sbom::components_from_cyclonedx`]). Fails with
    /// [`cd_core::ErrorKind::Invalid`] naming the node when it output no SBOM.
    pub fn sbom_from(db: impl Into<std::path::PathBuf>, node: impl Into<String>) -> Self {
        AdvisoryCheck {
            db: db.into(),
            components: ComponentSource::SbomNode(node.into()),
            fail_at: Level::High,
            ignores: Vec::new(),
            report_only: false,
        }
    }

    /// Reports failing matches in the output instead of failing the stage,
    /// for a [`super::policy::PolicyGate`] downstream to decide on.
    pub fn report_only(mut self) -> Self {
        self.report_only = true;
        self
    }

    /// The lowest level that fails.
    pub fn fail_at(mut self, level: Level) -> Self {
        self.fail_at = level;
        self
    }

    /// Ignores advisory `id` (or an alias) until `until`, for `reason`.
    pub fn ignore(
        mut self,
        id: impl Into<String>,
        reason: impl Into<String>,
        until: NaiveDate,
    ) -> Self {
        self.ignores.push(Ignore {
            id: id.into(),
            reason: reason.into(),
            until,
        });
        self
    }
}

#[async_trait::async_trait]
impl cd_core::Stage for AdvisoryCheck {
    fn kind(&self) -> String {
        "advisory-check".into()
    }

    fn fingerprint(&self) -> String {
        format!(
            "advisory-check:{}:{:?}:{:?}:{}:{:?}",
            self.db.display(),
            self.components,
            self.fail_at,
            self.report_only,
            self.ignores
        )
    }

    fn capabilities(&self) -> cd_core::Capabilities {
        cd_core::Capabilities::CHECK
    }

    async fn run(&self, cx: &cd_core::StageContext) -> Result<cd_core::StageOutput> {
        let (db, fail_at, ignores) = (self.db.clone(), self.fail_at, self.ignores.clone());
        let from_sbom = match &self.components {
            ComponentSource::Dir(_) => None,
            ComponentSource::SbomNode(node) => {
                let out = cx.require_output(node)?;
                let doc = out.get("sbom").filter(|d| d["bomFormat"] == "CycloneDX");
                let doc = doc.ok_or_else(|| {
                    Error::invalid(format!(
                        "node `{node}` output no CycloneDX SBOM under `sbom`"
                    ))
                    .with("node", cx.node())
                })?;
                Some(super::sbom::components_from_cyclonedx(doc))
            }
        };
        let dir = match &self.components {
            ComponentSource::Dir(d) => Some(d.clone()),
            ComponentSource::SbomNode(_) => None,
        };
        let (report, advisories) = tokio::task::spawn_blocking(move || -> Result<_> {
            let db = AdvisoryDb::load(&db)?;
            let components = match (from_sbom, dir) {
                (Some(c), _) => c,
                (None, Some(dir)) => super::components::discover(&dir)?,
                (None, None) => Vec::new(),
            };
            let today = chrono::Utc::now().date_naive();
            Ok((check(&db, &components, fail_at, &ignores, today), db.len()))
        })
        .await
        .map_err(|e| Error::failed(format!("advisory check panicked: {e}")))?
        .map_err(|e| e.with("node", cx.node()))?;
        cx.log(format!(
            "advisories: {} component(s) against {advisories} advisories: {} failing (>= {:?}), {} below, {} ignored, {} expired ignore(s)",
            report.components,
            report.failing.len(),
            fail_at,
            report.below_threshold.len(),
            report.ignored.len(),
            report.expired_ignores.len()
        ));
        for m in report.failing.iter().chain(&report.below_threshold) {
            cx.log(format!(
                "  {} {}@{}: {} ({:?}{}) fixed in {}",
                m.id,
                m.component.name,
                m.component.version,
                m.summary,
                m.level,
                m.score.map(|s| format!(" {s}")).unwrap_or_default(),
                if m.fixed.is_empty() {
                    "-".to_string()
                } else {
                    m.fixed.join(", ")
                }
            ));
        }
        let out = serde_json::to_value(&report).unwrap_or_default();
        if report.failing.is_empty() || self.report_only {
            return Ok(cd_core::StageOutput::json(out));
        }
        let list: Vec<String> = report
            .failing
            .iter()
            .map(|m| {
                format!(
                    "{} in {}@{} ({:?})",
                    m.id, m.component.name, m.component.version, m.level
                )
            })
            .collect();
        Err(Error::failed(format!(
            "{} advisory match(es) at or above {:?}: {}",
            report.failing.len(),
            fail_at,
            list.join("; ")
        ))
        .with("node", cx.node())
        .retryable(false))
    }
}
