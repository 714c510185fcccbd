//! Opening a database file safely and bringing its schema up to date.
//!
//! Migrations are plain SQL files in `migrations/`, compiled into the binary
//! and applied in order at open inside one `BEGIN IMMEDIATE` transaction, so
//! two processes opening the same file at once do not both migrate it. The
//! applied version is kept in `PRAGMA user_version` and, for people reading
//! the file, in the `cd_schema_migrations` table.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use cd_core::{Error, Result};
use rusqlite::{Connection, OpenFlags};

use super::rows::ts;
use super::{sql_err, Durability};

/// One migration: its version (from 1, without gaps), name and SQL.
pub(crate) struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first. A migration that has shipped is never
/// edited: change the schema with a new file. `tests/fixtures/sqlite/v1.db`
/// (written by version 1 only) checks that old files still upgrade.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "lock_audit",
        sql: include_str!("migrations/0002_lock_audit.sql"),
    },
    Migration {
        version: 3,
        name: "restored_from",
        sql: include_str!("migrations/0003_restored_from.sql"),
    },
    Migration {
        version: 4,
        name: "lease_owner",
        sql: include_str!("migrations/0004_lease_owner.sql"),
    },
    Migration {
        version: 5,
        name: "target_records",
        sql: include_str!("migrations/0005_target_records.sql"),
    },
    Migration {
        version: 6,
        name: "incidents",
        sql: include_str!("migrations/0006_incidents.sql"),
    },
    Migration {
        version: 7,
        name: "release_documents",
        sql: include_str!("migrations/0007_release_documents.sql"),
    },
    Migration {
        version: 8,
        name: "approval_identity",
        sql: include_str!("migrations/0008_approval_identity.sql"),
    },
    Migration {
        version: 9,
        name: "one_decision_per_person",
        sql: include_str!("migrations/0009_one_decision_per_person.sql"),
    },
];

/// The schema version this build writes.
pub(crate) fn latest_version() -> u32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Checks, without writing anything, that an existing file looks like a
/// SQLite database. A file that does not is never opened read-write.
pub(crate) fn check_header(path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::store(format!("cannot read the state database: {e}"))
                .with("file", path.display()))
        }
    };
    if meta.is_dir() {
        return Err(Error::store(
            "the state database path is a directory, not a file (give a file path such as .cd/state.db)",
        )
        .with("file", path.display()));
    }
    if meta.len() == 0 {
        return Ok(());
    }
    let mut header = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    match read {
        Ok(()) if &header == SQLITE_MAGIC => Ok(()),
        Ok(()) | Err(_) => Err(Error::store(
            "not a SQLite database, or the file is corrupt; the file was left untouched (move it aside to start a fresh store)",
        )
        .with("file", path.display())),
    }
}

/// Opens a connection with the settings every connection of a store uses.
pub(crate) fn connect(
    path: &Path,
    busy_timeout: Duration,
    durability: Durability,
) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        sql_err(path, e).with("hint", "is the directory writable and the path a file?")
    })?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| sql_err(path, e))?;
    let sync = match durability {
        Durability::Process => "NORMAL",
        Durability::PowerLoss => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(|e| sql_err(path, e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Reads the schema before anything is written: a file whose pages are
/// damaged fails here, while it is still untouched.
pub(crate) fn probe(conn: &Connection, path: &Path) -> Result<(u32, Vec<String>)> {
    let corrupt = |e: rusqlite::Error| {
        Error::store(format!(
            "cannot read the state database ({e}); it is not a SQLite database or it is corrupt; the file was left untouched"
        ))
        .with("file", path.display())
    };
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(corrupt)?;
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .map_err(corrupt)?;
    let tables = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(corrupt)?;
    Ok((version, tables))
}

/// Switches the file to WAL and applies missing migrations up to `target`.
/// Returns the schema version the file is at afterwards.
pub(crate) fn migrate(conn: &mut Connection, path: &Path, target: u32) -> Result<u32> {
    let (version, tables) = probe(conn, path)?;
    let latest = latest_version();
    if version > latest {
        return Err(Error::store(format!(
            "the state database has schema version {version}, newer than this build understands ({latest}); upgrade the binary"
        ))
        .with("file", path.display()));
    }
    if version == 0 && tables.iter().any(|t| t != "cd_schema_migrations") {
        return Err(Error::store(format!(
            "this SQLite file is not a cd state database (it has tables {}); the file was left untouched",
            tables.join(", ")
        ))
        .with("file", path.display()));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| sql_err(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::store(format!(
            "cannot switch the state database to WAL mode (journal mode is {mode})"
        ))
        .with("file", path.display()));
    }
    if version >= target {
        return Ok(version);
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| sql_err(path, e))?;
    // Re-read under the write lock: another process may have migrated it.
    let version: u32 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| sql_err(path, e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS cd_schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TEXT NOT NULL
        );",
    )
    .map_err(|e| sql_err(path, e))?;
    let mut now_at = version;
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > version && m.version <= target)
    {
        tx.execute_batch(m.sql).map_err(|e| {
            sql_err(path, e).with("migration", format!("{:04}_{}", m.version, m.name))
        })?;
        tx.execute(
            "INSERT INTO cd_schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![m.version, m.name, ts(chrono::Utc::now())],
        )
        .map_err(|e| sql_err(path, e))?;
        now_at = m.version;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {now_at}"))
        .map_err(|e| sql_err(path, e))?;
    tx.commit().map_err(|e| sql_err(path, e))?;
    Ok(now_at)
}
