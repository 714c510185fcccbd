//! The JSON state file kept per target.

use std::io;
use std::path::Path;

use cd_core::Release;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One process this deployer started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProcessRecord {
    pub version: String,
    pub pid: u32,
    pub port: u16,
    /// Kernel start time, to tell this process from a later one with the same pid.
    pub start_time: Option<u64>,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub started_at: DateTime<Utc>,
    /// The release, to start it again on rollback.
    pub release: Release,
}

/// What a target runs and ran before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TargetState {
    pub current: Option<ProcessRecord>,
    pub previous: Option<ProcessRecord>,
    /// Write-ahead record of a process started but not yet healthy: if the
    /// host program dies during the health wait, the next apply (or `stop`)
    /// finds it here and stops it instead of leaving it holding the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting: Option<ProcessRecord>,
}

/// Reads a state file; a missing file is an empty state.
pub(crate) fn read(path: &Path) -> io::Result<TargetState> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TargetState::default()),
        Err(e) => Err(e),
    }
}

/// Writes a state file atomically (write to a temporary file, rename).
pub(crate) fn write(path: &Path, state: &TargetState) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Removes a state file; a missing one is fine.
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
