//! The components of a release, read from the package manifests and lock
//! files found in a directory: `Cargo.lock` (registry packages, ecosystem
//! `crates.io`), `package-lock.json` (lockfile v2/v3 `packages`, `npm`),
//! `requirements.txt` (pinned `name==version` lines, `PyPI`) and
//! `poetry.lock` (`[[package]]` tables, `PyPI`).
//!
//! ```
//! use cd_stages::compliance::components::from_cargo_lock;
//! let lock = "version = 3\n[[package]]\nname = \"serde\"\nversion = \"1.0.200\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n[[package]]\nname = \"my-app\"\nversion = \"0.1.0\"\n";
//! let c = from_cargo_lock("Cargo.lock", lock).unwrap();
//! assert_eq!(c.len(), 1);
//! assert_eq!((c[0].name.as_str(), c[0].version.as_str()), ("serde", "1.0.200"));
//! ```

use std::path::Path;

use cd_core::{Error, Result};

use super::advisories::Component;

/// The `[[package]]` tables of a TOML lock file (Cargo.lock, poetry.lock).
fn lock_packages(file: &str, text: &str) -> Result<Vec<toml::Table>> {
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::invalid(format!("{file}: {e}")).with("file", file))?;
    Ok(match doc.remove("package") {
        Some(toml::Value::Array(list)) => list
            .into_iter()
            .filter_map(|p| match p {
                toml::Value::Table(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// Registry packages of a `Cargo.lock` (path and git packages are the
/// project's own, or not on crates.io: left out).
///
/// Errors: [`cd_core::ErrorKind::Invalid`] naming `file` and the TOML
/// error's place.
pub fn from_cargo_lock(file: &str, text: &str) -> Result<Vec<Component>> {
    let mut out = Vec::new();
    for p in lock_packages(file, text)? {
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        if s("source").starts_with("registry+") || s("source").starts_with("sparse+") {
            out.push(Component {
                ecosystem: "crates.io".into(),
                name: s("name").into(),
                version: s("version").into(),
            });
        }
    }
    Ok(out)
}

/// The installed packages of an npm `package-lock.json` (lockfile version
/// 2 or 3: `packages`, keyed by `node_modules/...` paths).
///
/// Errors: [`cd_core::ErrorKind::Invalid`] naming `file`, line and column.
pub fn from_package_lock(file: &str, text: &str) -> Result<Vec<Component>> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::invalid(format!(
            "{file}: line {}, column {}: {e}",
            e.line(),
            e.column()
        ))
        .with("file", file)
    })?;
    let mut out = Vec::new();
    for (path, p) in doc["packages"].as_object().into_iter().flatten() {
        let Some(name) = path
            .rsplit("node_modules/")
            .next()
            .filter(|_| path.contains("node_modules/"))
        else {
            continue;
        };
        if let Some(v) = p["version"].as_str() {
            out.push(Component {
                ecosystem: "npm".into(),
                name: name.to_string(),
                version: v.to_string(),
            });
        }
    }
    Ok(out)
}

/// The pinned requirements (`name==version`, extras and markers dropped).
pub fn from_requirements(text: &str) -> Vec<Component> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| {
            let (name, rest) = l.split_once("==")?;
            let version = rest.split([';', ' ']).next()?.trim();
            let name = name.split('[').next()?.trim();
            (!name.is_empty() && !version.is_empty()).then(|| Component {
                ecosystem: "PyPI".into(),
                name: name.to_string(),
                version: version.to_string(),
            })
        })
        .collect()
}

/// The packages of a Poetry `poetry.lock` (`[[package]]` tables with
/// `name` and `version`; packages whose `source` is a directory, file or
/// git repository are not on PyPI: left out).
///
/// Errors: [`cd_core::ErrorKind::Invalid`] naming `file` and the TOML
/// error's place.
pub fn from_poetry_lock(file: &str, text: &str) -> Result<Vec<Component>> {
    let mut out = Vec::new();
    for p in lock_packages(file, text)? {
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let source = p
            .get("source")
            .and_then(|v| v.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if matches!(source, "directory" | "file" | "git" | "url") {
            continue;
        }
        if !s("name").is_empty() && !s("version").is_empty() {
            out.push(Component {
                ecosystem: "PyPI".into(),
                name: s("name").into(),
                version: s("version").into(),
            });
        }
    }
    Ok(out)
}

/// Every component of the lock files under `dir` (not under `target`,
/// `node_modules` or `.git`), sorted, without duplicates.
///
/// Errors: a lock file that does not parse, naming it.
pub fn discover(dir: &Path) -> Result<Vec<Component>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !matches!(name.as_str(), "target" | "node_modules" | ".git") {
                    stack.push(p);
                }
                continue;
            }
            let shown = p.display().to_string();
            let read =
                || std::fs::read_to_string(&p).map_err(|e| Error::invalid(format!("{shown}: {e}")));
            match name.as_str() {
                "Cargo.lock" => out.extend(from_cargo_lock(&shown, &read()?)?),
                "package-lock.json" => out.extend(from_package_lock(&shown, &read()?)?),
                "requirements.txt" => out.extend(from_requirements(&read()?)),
                "poetry.lock" => out.extend(from_poetry_lock(&shown, &read()?)?),
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
