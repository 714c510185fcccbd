//! Where Terraform and Ansible keep what they applied to each target (their
//! release history, which `current()` and `rollback` read): in the run's
//! [`Store`] when one is given, so every machine sharing the store agrees on
//! what is live; otherwise in owner-only JSON files under the deployer's
//! state directory, which only that machine sees.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use cd_core::{Error, ErrorKind, Release, Result, Secret, Store};

/// How many entries a target's history keeps (the newest).
pub(crate) const KEEP: usize = 100;

/// The home of a deployer's per-target history.
#[derive(Clone)]
pub(crate) enum HistoryHome {
    /// `<dir>/<target>.json`, this machine only.
    Files(PathBuf),
    /// The store's target records under `scope`.
    Store {
        /// The store.
        store: Arc<dyn Store>,
        /// `<deployer>:<what it deploys>`, the same on every machine.
        scope: String,
    },
}

impl std::fmt::Debug for HistoryHome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryHome::Files(dir) => write!(f, "files in {}", dir.display()),
            HistoryHome::Store { scope, .. } => write!(f, "store scope {scope}"),
        }
    }
}

impl HistoryHome {
    /// A target's history, oldest first (at most [`KEEP`] entries).
    pub(crate) async fn read<T: DeserializeOwned>(&self, target: &str) -> Result<Vec<T>> {
        match self {
            HistoryHome::Files(dir) => {
                let path = file_of(dir, target);
                match std::fs::read(&path) {
                    Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                        Error::new(
                            ErrorKind::Invalid,
                            format!("release history {} is not readable: {e}", path.display()),
                        )
                        .with("file", path.display())
                    }),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(Error::from(e).with("file", path.display())),
                }
            }
            HistoryHome::Store { store, scope } => {
                let mut records = store.target_records(scope, target, KEEP).await?;
                records.reverse();
                records
                    .into_iter()
                    .map(|r| {
                        serde_json::from_value(r.entry).map_err(|e| {
                            Error::new(
                                ErrorKind::Invalid,
                                format!("release history entry {} is not readable: {e}", r.seq),
                            )
                            .with("scope", scope)
                            .with("target", target)
                        })
                    })
                    .collect()
            }
        }
    }

    /// Appends an entry to a target's history. The caller serialises
    /// appends from this process; the store orders appends from several.
    pub(crate) async fn append<T: Serialize + DeserializeOwned>(
        &self,
        target: &str,
        entry: &T,
    ) -> Result<()> {
        match self {
            HistoryHome::Files(dir) => {
                let mut all: Vec<serde_json::Value> = self.read(target).await?;
                all.push(serde_json::to_value(entry)?);
                if all.len() > KEEP {
                    let n = all.len() - KEEP;
                    all.drain(..n);
                }
                let path = file_of(dir, target);
                write_private(&path, &serde_json::to_vec_pretty(&all)?)
                    .map_err(|e| Error::from(e).with("file", path.display()))
            }
            HistoryHome::Store { store, scope } => {
                store
                    .append_target_record(scope, target, &serde_json::to_value(entry)?)
                    .await?;
                Ok(())
            }
        }
    }
}

/// `<dir>/<target>.json`, the target's name made safe for a file name.
fn file_of(dir: &Path, target: &str) -> PathBuf {
    let safe: String = target
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.json"))
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it),
/// owner-only (0600), creating the parent directory owner-only (0700): these
/// files hold release configuration.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The secret values of releases this process deployed, by target and
/// version, in memory only: where a rollback (or a restore) finds the values
/// the history never held, before falling back to the deployer's own
/// `secret_var`s.
#[derive(Debug, Default)]
pub(crate) struct SecretMemory(
    std::sync::Mutex<BTreeMap<(String, String), BTreeMap<String, Value>>>,
);

impl SecretMemory {
    /// Remembers the known secret values of `release` on `target`.
    pub(crate) fn remember(&self, target: &str, release: &Release) {
        let values: BTreeMap<String, Value> = release
            .secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        if !values.is_empty() {
            self.0
                .lock()
                .expect("secret memory lock")
                .insert((target.to_string(), release.version.clone()), values);
        }
    }

    /// Gives `release` a value for each secret in `names` it lacks: the one
    /// remembered for it on `target`, else the deployer's `fallback`.
    /// `Err(name)` names the first secret with no value anywhere.
    pub(crate) fn complete<'a>(
        &self,
        target: &str,
        release: &mut Release,
        names: impl IntoIterator<Item = &'a str>,
        fallback: &BTreeMap<String, Secret<Value>>,
    ) -> std::result::Result<(), String> {
        let remembered = self
            .0
            .lock()
            .expect("secret memory lock")
            .get(&(target.to_string(), release.version.clone()))
            .cloned()
            .unwrap_or_default();
        for name in names {
            if release.secrets.get(name).is_some() {
                continue;
            }
            let value = remembered
                .get(name)
                .or_else(|| fallback.get(name).map(Secret::expose))
                .cloned()
                .ok_or_else(|| name.to_string())?;
            release.secrets.insert(name.to_string(), value);
        }
        Ok(())
    }
}

/// Removes files and directories when dropped: a tool run's private files
/// (variable files, saved plans, extra vars) go on every way out of the
/// code that made them, a dropped future included.
pub(crate) struct RemoveOnDrop {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl RemoveOnDrop {
    /// Removes these files.
    pub(crate) fn files(files: impl IntoIterator<Item = PathBuf>) -> Self {
        RemoveOnDrop {
            files: files.into_iter().collect(),
            dirs: Vec::new(),
        }
    }

    /// Removes this directory and everything in it.
    #[cfg_attr(not(feature = "ansible"), allow(dead_code))]
    pub(crate) fn dir(dir: PathBuf) -> Self {
        RemoveOnDrop {
            files: Vec::new(),
            dirs: vec![dir],
        }
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cd_core::MemoryStore;

    #[tokio::test]
    async fn both_homes_keep_order_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let homes = [
            HistoryHome::Files(dir.path().join("h")),
            HistoryHome::Store {
                store: Arc::new(MemoryStore::new()),
                scope: "t:x".into(),
            },
        ];
        for home in homes {
            for i in 0..(KEEP + 5) {
                home.append("web/1", &i).await.unwrap();
            }
            home.append("other", &7usize).await.unwrap();
            let got: Vec<usize> = home.read("web/1").await.unwrap();
            assert_eq!(got.len(), KEEP, "{home:?}");
            assert_eq!(got.first(), Some(&5), "{home:?}");
            assert_eq!(got.last(), Some(&(KEEP + 4)), "{home:?}");
            assert_eq!(home.read::<usize>("other").await.unwrap(), [7]);
            assert!(home.read::<usize>("none").await.unwrap().is_empty());
        }
    }
}
