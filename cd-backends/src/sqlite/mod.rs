//! The embedded durable store: [`SqliteStore`], one SQLite file in WAL mode.
//!
//! Runs, node states and outputs, append-only events, approvals, environment
//! locks (leases with a waiter queue) and release history per environment,
//! with the same semantics as [`cd_core::MemoryStore`], kept in one file that
//! several processes may share.
//!
//! ```no_run
//! # async fn demo() -> cd_core::Result<()> {
//! use cd_backends::sqlite::SqliteStore;
//! use cd_core::Store;
//!
//! let store = SqliteStore::open(".cd/state.db").await?;
//! for run in store.list_runs(10).await? {
//!     println!("{} {} {}", run.id, run.pipeline, run.status);
//! }
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Durable acknowledgements.** A method that returned `Ok` has committed.
//!   Writes go through one writer thread that commits whatever is queued
//!   together (group commit), so concurrent writers share a commit. With the
//!   default [`Durability::Process`] (WAL, `synchronous = NORMAL`) a commit
//!   survives the process being killed (SIGKILL); [`Durability::PowerLoss`]
//!   (`synchronous = FULL`) also fsyncs every commit.
//! - **Locks across processes.** Every write runs in a `BEGIN IMMEDIATE`
//!   transaction, so the check-and-take of [`Store::try_acquire_lock`] is
//!   atomic against other processes using the same file. Leases expire by
//!   the wall clock of the machine: processes sharing a file must share a
//!   clock (one host, or hosts kept in sync).
//! - **Migrations in the repository.** `migrations/*.sql` are compiled in and
//!   applied at [`SqliteStore::open`]; a file written by an older version is
//!   upgraded, one written by a newer version is refused.
//! - **Bad files are left alone.** A file that is not a SQLite database, or
//!   whose schema cannot be read, is reported (naming the file) and never
//!   written to.
//! - **No secrets.** The store writes what it is given; the runner scrubs
//!   registered secret values from events and outputs before they get here.

mod engine;
mod owner;
mod rows;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use serde::{Deserialize, Serialize};

use cd_core::{
    ApprovalRecord, Error, ErrorKind, Event, Lease, LockAttempt, LockRequest, NodeRecord,
    ReleaseRecord, Result, RunRecord, RunStatus, Store, TargetRecord,
};

use engine::Engine;
use rows::{to_json, ts, ts_opt};

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// WAL with `synchronous = NORMAL`: a commit survives the process being
    /// killed, and the operating system crashing loses at most the last
    /// commits (never corrupts the file). The default.
    #[default]
    Process,
    /// WAL with `synchronous = FULL`: every commit is fsynced, so it also
    /// survives a power loss. Slower per commit; group commit amortises it.
    PowerLoss,
}

/// Settings for [`SqliteStore::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    busy_timeout: Duration,
    durability: Durability,
    schema_version: Option<u32>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(10),
            durability: Durability::Process,
            schema_version: None,
        }
    }
}

impl SqliteOptions {
    /// The defaults: 10 s busy timeout, [`Durability::Process`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a write waits for another process's write to finish before
    /// failing with a retryable store error.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How hard a commit tries to reach the disk.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Migrates only up to `version` (for building fixtures of old schema
    /// versions in tests). Not for production use.
    #[doc(hidden)]
    pub fn schema_version_limit(mut self, version: u32) -> Self {
        self.schema_version = Some(version);
        self
    }
}

/// A waiting request for an environment lock (see [`SqliteStore::lock_waiters`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockWaiter {
    /// The environment waited for.
    pub environment: String,
    /// Who waits.
    pub holder: String,
    /// When it first asked.
    pub waiting_since: DateTime<Utc>,
    /// When it last asked (a waiter that stops asking for longer than the
    /// lease TTL drops out of the queue).
    pub last_asked: DateTime<Utc>,
}

/// One entry of the lock audit trail: a lock broken by force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockAuditRecord {
    /// The environment.
    pub environment: String,
    /// What was done: `force_unlock` (cdctl unlock), `take_over` (a stale lease
    /// taken: its run was missing or finished, or its owner process gone).
    pub action: String,
    /// Who held the lock, if anyone did.
    pub holder: Option<String>,
    /// The run that held it.
    pub run_id: Option<String>,
    /// The holder's message.
    pub message: Option<String>,
    /// Who broke it.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// A [`Store`] in one SQLite file (WAL mode), safe to share between tasks
/// and between processes.
///
/// Open it once per process and share it (`Arc<SqliteStore>`); every clone of
/// the `Arc` uses the same writer thread, which is what batches commits.
pub struct SqliteStore {
    engine: Engine,
    schema_version: u32,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.engine.path())
            .field("schema_version", &self.schema_version)
            .finish()
    }
}

/// Converts a SQLite error into a store error naming the file.
pub(crate) fn sql_err(path: &Path, e: rusqlite::Error) -> Error {
    let (kind, retryable) = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => (ErrorKind::Store, true),
        Some(ErrorCode::ConstraintViolation) => (ErrorKind::Conflict, false),
        _ => (ErrorKind::Store, false),
    };
    Error::new(kind, format!("SQLite: {e}"))
        .retryable(retryable)
        .with("file", path.display())
}

fn ttl_chrono(ttl: Duration) -> chrono::Duration {
    cd_core::clock::chrono_duration(ttl)
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` with default settings.
    ///
    /// Creates the parent directory (0700) and the file (0600) when missing,
    /// switches the file to WAL, sets a busy
    /// timeout and applies the migrations this build carries. Fails with an
    /// [`ErrorKind::Store`] error naming the file (context `file`) when the
    /// path cannot be created or written, when the file is not a SQLite
    /// database or is corrupt (the file is then left byte-for-byte
    /// untouched), or when it was written by a newer schema version.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens (or creates) the store at `path` with `options`.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, options))
            .await
            .map_err(|e| Error::store(format!("opening the SQLite store failed: {e}")))?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<SqliteStore> {
        if path.as_os_str().is_empty() {
            return Err(Error::invalid("the state database path is empty"));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Directories the store creates are the owner's only (0700).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| {
                    Error::store(format!(
                        "cannot create the directory `{}` for the state database: {e}",
                        parent.display()
                    ))
                    .with("file", path.display())
                })?;
        }
        // A new database file is the owner's only (0600) from its first
        // byte; SQLite gives its -wal and -shm files the database's mode.
        // An existing file keeps the mode its owner chose.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(
                        Error::store(format!("cannot create the state database: {e}"))
                            .with("file", path.display()),
                    )
                }
            }
        }
        schema::check_header(&path)?;
        let mut conn = schema::connect(&path, options.busy_timeout, options.durability)?;
        let target = options
            .schema_version
            .unwrap_or_else(schema::latest_version)
            .min(schema::latest_version());
        let schema_version = schema::migrate(&mut conn, &path, target)?;
        let engine = Engine::start(path, conn, options.busy_timeout, options.durability)?;
        Ok(SqliteStore {
            engine,
            schema_version,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.engine.path()
    }

    /// The schema version of the file (after migrations).
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }

    /// The newest schema version this build knows.
    pub fn latest_schema_version() -> u32 {
        schema::latest_version()
    }

    /// The highest event sequence number stored for a run (0 if none): the
    /// emitter of a resumed run continues at this plus one.
    pub async fn last_event_seq(&self, run_id: &str) -> Result<u64> {
        let run_id = run_id.to_string();
        let path = self.path().to_path_buf();
        self.engine
            .read(move |c| {
                c.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?1",
                    [&run_id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n.max(0) as u64)
                .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    /// Finds a run by its id or by a unique prefix of it (as `cdctl` does).
    /// Fails with [`ErrorKind::NotFound`] or, for an ambiguous prefix,
    /// [`ErrorKind::Invalid`].
    pub async fn find_run(&self, id_or_prefix: &str) -> Result<RunRecord> {
        if let Some(run) = self.get_run(id_or_prefix).await? {
            return Ok(run);
        }
        let prefix = id_or_prefix.to_string();
        let path = self.path().to_path_buf();
        let found = self
            .engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM runs WHERE substr(id, 1, length(?1)) = ?1 ORDER BY started_at DESC LIMIT 2",
                    rows::RUN_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([&prefix], rows::run)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await?;
        match found.len() {
            0 => Err(Error::new(
                ErrorKind::NotFound,
                format!("no run `{id_or_prefix}`"),
            )),
            1 => Ok(found.into_iter().next().expect("one run")),
            _ => Err(Error::invalid(format!(
                "`{id_or_prefix}` matches several runs; give more of the id"
            ))),
        }
    }

    /// Every approval of a run, oldest first.
    pub async fn run_approvals(&self, run_id: &str) -> Result<Vec<ApprovalRecord>> {
        let run_id = run_id.to_string();
        let path = self.path().to_path_buf();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM approvals WHERE run_id = ?1 ORDER BY id",
                    rows::APPROVAL_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([&run_id], rows::approval)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    /// Requests waiting for environment locks, oldest first (all
    /// environments when `environment` is `None`). Includes waiters that
    /// stopped asking but have not yet been dropped from the queue.
    pub async fn lock_waiters(&self, environment: Option<&str>) -> Result<Vec<LockWaiter>> {
        let env = environment.map(str::to_string);
        let path = self.path().to_path_buf();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM lock_waiters WHERE ?1 IS NULL OR environment = ?1 ORDER BY environment, id",
                    rows::WAITER_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([&env], rows::waiter)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    /// Why `environment`'s lease may be taken at once although it has not
    /// expired: its run is missing or finished, or its owner process is
    /// provably gone (same machine, see the store's docs). `None` when the
    /// lease is live, or its owner cannot be judged from here, or there is
    /// no lease.
    pub async fn lease_staleness(&self, environment: &str) -> Result<Option<String>> {
        let path = self.p();
        let env = environment.to_string();
        self.engine
            .read(move |c| match read_lease(c, &path, &env)? {
                None => Ok(None),
                Some(lease) => Ok(stale_lease(c, &path, &lease)?.map(|(why, _)| why)),
            })
            .await
    }

    /// Breaks an environment's lock whoever holds it, recording who did it
    /// and why in the lock audit trail. Returns the broken lease.
    pub async fn force_unlock_as(
        &self,
        environment: &str,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<Option<Lease>> {
        let env = environment.to_string();
        let actor = actor.to_string();
        let reason = reason.map(str::to_string);
        let path = self.path().to_path_buf();
        let audit = self.schema_version >= 2;
        self.engine
            .write(move |c| force_unlock_in(c, &path, &env, &actor, reason.as_deref(), audit))
            .await
    }

    /// The lock audit trail, newest first (all environments when
    /// `environment` is `None`).
    pub async fn lock_audit(
        &self,
        environment: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LockAuditRecord>> {
        if self.schema_version < 2 {
            return Ok(Vec::new());
        }
        let env = environment.map(str::to_string);
        let path = self.path().to_path_buf();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM lock_audit WHERE ?1 IS NULL OR environment = ?1 ORDER BY id DESC LIMIT ?2",
                    rows::AUDIT_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![env, clamp_i64(limit as u64)], rows::audit)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    /// Finishes the writes already queued, checkpoints the WAL into the
    /// database file and closes every connection. Calls after `close` fail
    /// with a store error. Dropping the store without closing is safe too
    /// (every acknowledged write is already committed); `close` only waits.
    pub async fn close(&self) {
        self.engine.close().await
    }

    fn p(&self) -> PathBuf {
        self.path().to_path_buf()
    }
}

fn read_lease(c: &Connection, path: &Path, env: &str) -> Result<Option<Lease>> {
    let sql = format!(
        "SELECT {} FROM locks WHERE environment = ?1",
        rows::LEASE_COLUMNS
    );
    c.prepare_cached(&sql)
        .and_then(|mut s| s.query_row([env], rows::lease).optional())
        .map_err(|e| sql_err(path, e))
}

fn touch_waiter(c: &Connection, path: &Path, env: &str, holder: &str, now: &str) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO lock_waiters (environment, holder, first_at, last_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (environment, holder) DO UPDATE SET last_at = excluded.last_at",
    )
    .and_then(|mut s| s.execute(params![env, holder, now]))
    .map_err(|e| sql_err(path, e))?;
    Ok(())
}

/// Why a live lease is nonetheless free to take: its run does not exist or
/// has finished (runs are recorded before they take the lease), or its
/// owner process is provably gone (see [`owner`]). `(reason, owner gone)`.
fn stale_lease(c: &Connection, path: &Path, lease: &Lease) -> Result<Option<(String, bool)>> {
    if let Some(id) = &lease.run_id {
        let status: Option<String> = c
            .prepare_cached("SELECT status FROM runs WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
            .map_err(|e| sql_err(path, e))?;
        match status.as_deref() {
            None => return Ok(Some((format!("its run {id} does not exist"), false))),
            Some("running") => {}
            Some(other) => {
                return Ok(Some((
                    format!("its run {id} already finished ({other})"),
                    false,
                )))
            }
        }
    }
    let owner: Option<(Option<String>, Option<String>)> = c
        .prepare_cached("SELECT owner_host, owner_process FROM locks WHERE environment = ?1")
        .and_then(|mut s| {
            s.query_row([&lease.environment], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(|e| sql_err(path, e))?;
    if let Some((Some(host), Some(process))) = owner {
        if owner::is_gone(&host, &process) {
            return Ok(Some((
                format!("its owner process ({process} on {host}) is gone"),
                true,
            )));
        }
    }
    Ok(None)
}

/// Hands a stale lease over: audited as `take_over`; a run whose owner is
/// gone is recorded `abandoned` (it is not running any more).
fn take_over(
    c: &Connection,
    path: &Path,
    lease: &Lease,
    by: &str,
    reason: &str,
    owner_gone: bool,
    now: &str,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO lock_audit (environment, action, holder, run_id, message, actor, reason, at)
         VALUES (?1, 'take_over', ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            lease.environment,
            lease.holder,
            lease.run_id,
            lease.message,
            by,
            reason,
            now
        ])
    })
    .map_err(|e| sql_err(path, e))?;
    if let (true, Some(id)) = (owner_gone, &lease.run_id) {
        c.prepare_cached(
            "UPDATE runs SET status = 'abandoned', finished_at = ?2 WHERE id = ?1 AND status = 'running'",
        )
        .and_then(|mut s| s.execute(params![id, now]))
        .map_err(|e| sql_err(path, e))?;
    }
    Ok(())
}

fn try_acquire_in(c: &Connection, path: &Path, req: &LockRequest) -> Result<LockAttempt> {
    let now = Utc::now();
    let now_s = ts(now);
    let ttl = ttl_chrono(req.ttl);
    let env = req.environment.as_str();
    if let Some(lease) = read_lease(c, path, env)? {
        if lease.expires_at > now && lease.holder != req.holder {
            match stale_lease(c, path, &lease)? {
                None => {
                    touch_waiter(c, path, env, &req.holder, &now_s)?;
                    return Ok(LockAttempt::Busy(Some(lease)));
                }
                Some((reason, gone)) => {
                    take_over(c, path, &lease, &req.holder, &reason, gone, &now_s)?;
                    tracing::warn!(
                        target: "cd::store",
                        "environment `{env}`: lease of {} taken over: {reason}",
                        lease.holder
                    );
                }
            }
        }
    }
    // Free: the oldest waiter that asked recently goes first.
    c.prepare_cached("DELETE FROM lock_waiters WHERE environment = ?1 AND last_at <= ?2")
        .and_then(|mut s| {
            s.execute(params![
                env,
                ts(now
                    .checked_sub_signed(ttl)
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC))
            ])
        })
        .map_err(|e| sql_err(path, e))?;
    let first: Option<String> = c
        .prepare_cached(
            "SELECT holder FROM lock_waiters WHERE environment = ?1 ORDER BY id LIMIT 1",
        )
        .and_then(|mut s| s.query_row([env], |r| r.get(0)).optional())
        .map_err(|e| sql_err(path, e))?;
    if let Some(first) = first {
        if first != req.holder {
            touch_waiter(c, path, env, &req.holder, &now_s)?;
            return Ok(LockAttempt::Busy(None));
        }
    }
    c.prepare_cached("DELETE FROM lock_waiters WHERE environment = ?1 AND holder = ?2")
        .and_then(|mut s| s.execute(params![env, req.holder]))
        .map_err(|e| sql_err(path, e))?;
    let lease = Lease {
        environment: req.environment.clone(),
        holder: req.holder.clone(),
        run_id: req.run_id.clone(),
        message: req.message.clone(),
        acquired_at: now,
        renewed_at: now,
        expires_at: now
            .checked_add_signed(ttl)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
    };
    let (owner_host, owner_process) = match owner::this_process() {
        Some((h, p)) => (Some(h), Some(p)),
        None => (None, None),
    };
    c.prepare_cached(
        "INSERT INTO locks (environment, holder, run_id, message, acquired_at, renewed_at, expires_at,
                            owner_host, owner_process)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (environment) DO UPDATE SET holder = excluded.holder, run_id = excluded.run_id,
           message = excluded.message, acquired_at = excluded.acquired_at,
           renewed_at = excluded.renewed_at, expires_at = excluded.expires_at,
           owner_host = excluded.owner_host, owner_process = excluded.owner_process",
    )
    .and_then(|mut s| {
        s.execute(params![
            lease.environment,
            lease.holder,
            lease.run_id,
            lease.message,
            ts(lease.acquired_at),
            ts(lease.renewed_at),
            ts(lease.expires_at),
            owner_host,
            owner_process
        ])
    })
    .map_err(|e| sql_err(path, e))?;
    Ok(LockAttempt::Acquired(lease))
}

fn force_unlock_in(
    c: &Connection,
    path: &Path,
    env: &str,
    actor: &str,
    reason: Option<&str>,
    audit: bool,
) -> Result<Option<Lease>> {
    let lease = read_lease(c, path, env)?;
    c.prepare_cached("DELETE FROM locks WHERE environment = ?1")
        .and_then(|mut s| s.execute([env]))
        .map_err(|e| sql_err(path, e))?;
    if audit {
        c.prepare_cached(
            "INSERT INTO lock_audit (environment, action, holder, run_id, message, actor, reason, at)
             VALUES (?1, 'force_unlock', ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                env,
                lease.as_ref().map(|l| l.holder.clone()),
                lease.as_ref().and_then(|l| l.run_id.clone()),
                lease.as_ref().map(|l| l.message.clone()),
                actor,
                reason,
                ts(Utc::now())
            ])
        })
        .map_err(|e| sql_err(path, e))?;
    }
    Ok(lease)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, run: &RunRecord) -> Result<()> {
        let path = self.p();
        let run = run.clone();
        let release = to_json(&run.release)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO runs (id, pipeline, definition_hash, version, release, environment, status,
                                       started_by, started_at, finished_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (id) DO UPDATE SET pipeline = excluded.pipeline,
                       definition_hash = excluded.definition_hash, version = excluded.version,
                       release = excluded.release, environment = excluded.environment,
                       status = excluded.status, started_by = excluded.started_by,
                       started_at = excluded.started_at, finished_at = excluded.finished_at",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        run.id,
                        run.pipeline,
                        run.definition_hash,
                        run.release.version,
                        release,
                        run.environment,
                        run.status.as_str(),
                        run.started_by,
                        ts(run.started_at),
                        ts_opt(run.finished_at)
                    ])
                })
                .map_err(|e| sql_err(&path, e))?;
                Ok(())
            })
            .await
    }

    async fn set_run_status(
        &self,
        run_id: &str,
        status: RunStatus,
        finished_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let path = self.p();
        let run_id = run_id.to_string();
        self.engine
            .write(move |c| {
                let n = c
                    .prepare_cached("UPDATE runs SET status = ?2, finished_at = ?3 WHERE id = ?1")
                    .and_then(|mut s| {
                        s.execute(params![run_id, status.as_str(), ts_opt(finished_at)])
                    })
                    .map_err(|e| sql_err(&path, e))?;
                if n == 0 {
                    return Err(Error::new(ErrorKind::NotFound, format!("no run {run_id}")));
                }
                Ok(())
            })
            .await
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let path = self.p();
        let run_id = run_id.to_string();
        self.engine
            .read(move |c| {
                let sql = format!("SELECT {} FROM runs WHERE id = ?1", rows::RUN_COLUMNS);
                c.prepare_cached(&sql)
                    .and_then(|mut s| s.query_row([&run_id], rows::run).optional())
                    .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let path = self.p();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM runs ORDER BY started_at DESC, id ASC LIMIT ?1",
                    rows::RUN_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([clamp_i64(limit as u64)], rows::run)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        self.put_nodes(std::slice::from_ref(node)).await
    }

    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let path = self.p();
        let mut encoded = Vec::with_capacity(nodes.len());
        for n in nodes {
            encoded.push((
                n.clone(),
                n.output.as_ref().map(to_json).transpose()?,
                n.error.as_ref().map(to_json).transpose()?,
            ));
        }
        self.engine
            .write(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "INSERT INTO nodes (run_id, node, status, attempts, output, error, started_at,
                                            finished_at, recheck_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                         ON CONFLICT (run_id, node) DO UPDATE SET status = excluded.status,
                           attempts = excluded.attempts, output = excluded.output,
                           error = excluded.error, started_at = excluded.started_at,
                           finished_at = excluded.finished_at, recheck_at = excluded.recheck_at",
                    )
                    .map_err(|e| sql_err(&path, e))?;
                for (n, output, error) in &encoded {
                    stmt.execute(params![
                        n.run_id,
                        n.node,
                        n.status.as_str(),
                        n.attempts,
                        output,
                        error,
                        ts_opt(n.started_at),
                        ts_opt(n.finished_at),
                        ts_opt(n.recheck_at)
                    ])
                    .map_err(|e| sql_err(&path, e))?;
                }
                Ok(())
            })
            .await
    }

    async fn nodes(&self, run_id: &str) -> Result<Vec<NodeRecord>> {
        let path = self.p();
        let run_id = run_id.to_string();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM nodes WHERE run_id = ?1 ORDER BY started_at ASC, node ASC",
                    rows::NODE_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([&run_id], rows::node)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let path = self.p();
        let mut encoded = Vec::with_capacity(events.len());
        for e in events {
            encoded.push((
                e.run_id.clone(),
                clamp_i64(e.seq),
                ts(e.at),
                e.node.clone(),
                rows::event_kind_tag(&e.kind),
                to_json(&e.kind)?,
            ));
        }
        self.engine
            .write(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "INSERT INTO events (run_id, seq, at, node, kind, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(|e| sql_err(&path, e))?;
                for (run_id, seq, at, node, kind, body) in &encoded {
                    stmt.execute(params![run_id, seq, at, node, kind, body])
                        .map_err(|e| {
                            let err = sql_err(&path, e);
                            if err.kind() == ErrorKind::Conflict {
                                Error::new(
                                    ErrorKind::Conflict,
                                    format!("event #{seq} of run {run_id} is already stored (events are append-only)"),
                                )
                                .with("file", path.display())
                            } else {
                                err
                            }
                        })?;
                }
                Ok(())
            })
            .await
    }

    async fn events(&self, run_id: &str, after_seq: u64, limit: usize) -> Result<Vec<Event>> {
        let path = self.p();
        let run_id = run_id.to_string();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    rows::EVENT_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(
                        params![run_id, clamp_i64(after_seq), clamp_i64(limit as u64)],
                        rows::event,
                    )
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_approval(&self, approval: &ApprovalRecord) -> Result<()> {
        let path = self.p();
        let a = approval.clone();
        let audit = to_json(&rows::ApprovalAudit {
            via: a.via.clone(),
            token_id: a.token_id.clone(),
            release: a.release.clone(),
            pipeline: a.pipeline.clone(),
            definition_hash: a.definition_hash.clone(),
        })?;
        self.engine
            .write(move |c| {
                let inserted = c
                    .prepare_cached(
                        "INSERT INTO approvals (run_id, node, approver, decision, comment, at, decision_id, audit)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            a.run_id,
                            a.node,
                            a.approver,
                            rows::decision_str(a.decision),
                            a.comment,
                            ts(a.at),
                            a.decision_id,
                            audit
                        ])
                    });
                match inserted {
                    Ok(_) => Ok(()),
                    Err(rusqlite::Error::SqliteFailure(e, msg))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        let per_person = msg.as_deref().is_some_and(|m| m.contains("approvals.approver"));
                        Err(Error::new(
                            ErrorKind::Conflict,
                            if per_person {
                                format!(
                                    "{} already decided `{}` of run {}; one person counts once",
                                    a.approver, a.node, a.run_id
                                )
                            } else {
                                format!(
                                    "decision {} was already recorded (a replay)",
                                    a.decision_id.as_deref().unwrap_or("-")
                                )
                            },
                        ))
                    }
                    Err(e) => Err(sql_err(&path, e)),
                }
            })
            .await
    }

    async fn approvals(&self, run_id: &str, node: &str) -> Result<Vec<ApprovalRecord>> {
        let path = self.p();
        let run_id = run_id.to_string();
        let node = node.to_string();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM approvals WHERE run_id = ?1 AND node = ?2 ORDER BY id",
                    rows::APPROVAL_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![run_id, node], rows::approval)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn try_acquire_lock(&self, req: &LockRequest) -> Result<LockAttempt> {
        let path = self.p();
        let req = req.clone();
        self.engine
            .write(move |c| try_acquire_in(c, &path, &req))
            .await
    }

    async fn renew_lock(&self, environment: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        let path = self.p();
        let env = environment.to_string();
        let holder = holder.to_string();
        self.engine
            .write(move |c| {
                let now = Utc::now();
                match read_lease(c, &path, &env)? {
                    Some(mut lease) if lease.holder == holder => {
                        lease.renewed_at = now;
                        lease.expires_at = cd_core::clock::utc_add(now, ttl);
                        c.prepare_cached(
                            "UPDATE locks SET renewed_at = ?2, expires_at = ?3 WHERE environment = ?1",
                        )
                        .and_then(|mut s| {
                            s.execute(params![env, ts(lease.renewed_at), ts(lease.expires_at)])
                        })
                        .map_err(|e| sql_err(&path, e))?;
                        Ok(lease)
                    }
                    other => {
                        let now_held = match other {
                            Some(l) => format!("; it is now held by {} ({})", l.holder, l.message),
                            None => String::new(),
                        };
                        Err(Error::new(
                            ErrorKind::Locked,
                            format!("lock on environment `{env}` was lost by {holder}{now_held}"),
                        ))
                    }
                }
            })
            .await
    }

    async fn release_lock(&self, environment: &str, holder: &str) -> Result<bool> {
        let path = self.p();
        let env = environment.to_string();
        let holder = holder.to_string();
        self.engine
            .write(move |c| {
                c.prepare_cached("DELETE FROM lock_waiters WHERE environment = ?1 AND holder = ?2")
                    .and_then(|mut s| s.execute(params![env, holder]))
                    .map_err(|e| sql_err(&path, e))?;
                let n = c
                    .prepare_cached("DELETE FROM locks WHERE environment = ?1 AND holder = ?2")
                    .and_then(|mut s| s.execute(params![env, holder]))
                    .map_err(|e| sql_err(&path, e))?;
                Ok(n > 0)
            })
            .await
    }

    async fn force_unlock(&self, environment: &str) -> Result<Option<Lease>> {
        SqliteStore::force_unlock_as(self, environment, "api", None).await
    }

    async fn force_unlock_as(
        &self,
        environment: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Option<Lease>> {
        SqliteStore::force_unlock_as(self, environment, actor, Some(reason)).await
    }

    async fn last_event_seq(&self, run_id: &str) -> Result<u64> {
        SqliteStore::last_event_seq(self, run_id).await
    }

    async fn locks(&self) -> Result<Vec<Lease>> {
        let path = self.p();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM locks WHERE expires_at > ?1 ORDER BY environment",
                    rows::LEASE_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([ts(Utc::now())], rows::lease)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_release(&self, release: &ReleaseRecord) -> Result<()> {
        let path = self.p();
        let r = release.clone();
        let release_json = to_json(&r.release)?;
        let revisions = to_json(&r.revisions)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO releases (id, environment, version, release, revisions, status, run_id,
                                           actor, at, updated_at, restored_from)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (id) DO UPDATE SET environment = excluded.environment,
                       version = excluded.version, release = excluded.release,
                       revisions = excluded.revisions, status = excluded.status,
                       run_id = excluded.run_id, actor = excluded.actor, at = excluded.at,
                       updated_at = excluded.updated_at, restored_from = excluded.restored_from",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        r.id,
                        r.environment,
                        r.version,
                        release_json,
                        revisions,
                        r.status.as_str(),
                        r.run_id,
                        r.actor,
                        ts(r.at),
                        ts(r.updated_at),
                        r.restored_from
                    ])
                })
                .map_err(|e| sql_err(&path, e))?;
                Ok(())
            })
            .await
    }

    async fn release_history(&self, environment: &str, limit: usize) -> Result<Vec<ReleaseRecord>> {
        let path = self.p();
        let env = environment.to_string();
        self.engine
            .read(move |c| {
                let sql = format!(
                    "SELECT {} FROM releases WHERE environment = ?1 ORDER BY rowid DESC LIMIT ?2",
                    rows::RELEASE_COLUMNS
                );
                let mut stmt = c.prepare_cached(&sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![env, clamp_i64(limit as u64)], rows::release)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn append_target_record(
        &self,
        scope: &str,
        target: &str,
        entry: &serde_json::Value,
    ) -> Result<u64> {
        let path = self.p();
        let (scope, target) = (scope.to_string(), target.to_string());
        let entry = to_json(entry)?;
        let at = rows::ts(Utc::now());
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO target_records (scope, target, entry, at) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![scope, target, entry, at]))
                .map_err(|e| sql_err(&path, e))?;
                Ok(c.last_insert_rowid() as u64)
            })
            .await
    }

    async fn target_records(
        &self,
        scope: &str,
        target: &str,
        limit: usize,
    ) -> Result<Vec<TargetRecord>> {
        let path = self.p();
        let (scope, target) = (scope.to_string(), target.to_string());
        self.engine
            .read(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT seq, scope, target, entry, at FROM target_records
                         WHERE scope = ?1 AND target = ?2 ORDER BY seq DESC LIMIT ?3",
                    )
                    .map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(
                        params![scope, target, clamp_i64(limit as u64)],
                        rows::target_record,
                    )
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_incident(&self, incident: &cd_core::IncidentRecord) -> Result<()> {
        let path = self.p();
        let id = incident.id.clone();
        let status = incident.status.as_str();
        let opened = rows::ts(incident.opened_at);
        let record = to_json(incident)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO incidents (id, status, opened_at, record) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status, record = excluded.record",
                )
                .and_then(|mut s| s.execute(params![id, status, opened, record]))
                .map_err(|e| sql_err(&path, e))?;
                Ok(())
            })
            .await
    }

    async fn get_incident(&self, id: &str) -> Result<Option<cd_core::IncidentRecord>> {
        let path = self.p();
        let id = id.to_string();
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT record FROM incidents WHERE id = ?1")
                    .and_then(|mut s| s.query_row(params![id], rows::incident).optional())
                    .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    async fn incidents(
        &self,
        active_only: bool,
        limit: usize,
    ) -> Result<Vec<cd_core::IncidentRecord>> {
        let path = self.p();
        self.engine
            .read(move |c| {
                let sql = if active_only {
                    "SELECT record FROM incidents WHERE status <> 'resolved' ORDER BY seq DESC LIMIT ?1"
                } else {
                    "SELECT record FROM incidents ORDER BY seq DESC LIMIT ?1"
                };
                let mut stmt = c.prepare_cached(sql).map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![clamp_i64(limit as u64)], rows::incident)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn append_delivery(&self, record: &cd_core::incident::DeliveryRecord) -> Result<u64> {
        let path = self.p();
        let subject = record.subject.clone();
        let at = rows::ts(record.at);
        let json = to_json(record)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO deliveries (subject, record, at) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut s| s.execute(params![subject, json, at]))
                .map_err(|e| sql_err(&path, e))?;
                Ok(c.last_insert_rowid() as u64)
            })
            .await
    }

    async fn deliveries(
        &self,
        subject: &str,
        limit: usize,
    ) -> Result<Vec<cd_core::incident::DeliveryRecord>> {
        let path = self.p();
        let subject = subject.to_string();
        self.engine
            .read(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT seq, record FROM deliveries WHERE subject = ?1 ORDER BY seq LIMIT ?2",
                    )
                    .map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![subject, clamp_i64(limit as u64)], rows::delivery)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }
    async fn put_approval_request(
        &self,
        request: &cd_core::approval::ApprovalRequest,
    ) -> Result<cd_core::approval::ApprovalRequest> {
        let path = self.p();
        let r = request.clone();
        let record = to_json(request)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO approval_requests (run_id, node, record, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (run_id, node) DO NOTHING",
                )
                .and_then(|mut s| s.execute(params![r.run_id, r.node, record, rows::ts(r.created_at)]))
                .map_err(|e| sql_err(&path, e))?;
                c.prepare_cached("SELECT record FROM approval_requests WHERE run_id = ?1 AND node = ?2")
                    .and_then(|mut s| s.query_row(params![r.run_id, r.node], rows::approval_request))
                    .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    async fn approval_request(
        &self,
        run_id: &str,
        node: &str,
    ) -> Result<Option<cd_core::approval::ApprovalRequest>> {
        let path = self.p();
        let (run_id, node) = (run_id.to_string(), node.to_string());
        self.engine
            .read(move |c| {
                c.prepare_cached(
                    "SELECT record FROM approval_requests WHERE run_id = ?1 AND node = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![run_id, node], rows::approval_request)
                        .optional()
                })
                .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    async fn approval_requests(
        &self,
        limit: usize,
    ) -> Result<Vec<cd_core::approval::ApprovalRequest>> {
        let path = self.p();
        self.engine
            .read(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT record FROM approval_requests ORDER BY seq DESC LIMIT ?1",
                    )
                    .map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map(params![clamp_i64(limit as u64)], rows::approval_request)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_token(&self, token: &cd_core::approval::TokenRecord) -> Result<()> {
        let path = self.p();
        let (id, identity) = (token.id.clone(), token.identity.clone());
        let at = rows::ts(token.created_at);
        let record = to_json(token)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO tokens (id, identity, record, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                )
                .and_then(|mut s| s.execute(params![id, identity, record, at]))
                .map_err(|e| sql_err(&path, e))?;
                Ok(())
            })
            .await
    }

    async fn token(&self, id: &str) -> Result<Option<cd_core::approval::TokenRecord>> {
        let path = self.p();
        let id = id.to_string();
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT record FROM tokens WHERE id = ?1")
                    .and_then(|mut s| s.query_row(params![id], rows::token).optional())
                    .map_err(|e| sql_err(&path, e))
            })
            .await
    }

    async fn tokens(&self) -> Result<Vec<cd_core::approval::TokenRecord>> {
        let path = self.p();
        self.engine
            .read(move |c| {
                let mut stmt = c
                    .prepare_cached("SELECT record FROM tokens ORDER BY created_at DESC, id")
                    .map_err(|e| sql_err(&path, e))?;
                let v = stmt
                    .query_map([], rows::token)
                    .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| sql_err(&path, e))?;
                Ok(v)
            })
            .await
    }

    async fn put_release_document(&self, document: &cd_core::ReleaseDocument) -> Result<()> {
        let path = self.p();
        let (version, kind) = (document.version.clone(), document.kind.clone());
        let at = rows::ts(document.created_at);
        let content = document.content.clone();
        let mut meta = document.clone();
        meta.content = String::new();
        let record = to_json(&meta)?;
        self.engine
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO release_documents (version, kind, record, content, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut s| s.execute(params![version, kind, record, content, at]))
                .map_err(|e| sql_err(&path, e))?;
                Ok(())
            })
            .await
    }

    async fn release_document(
        &self,
        version: &str,
        kind: &str,
    ) -> Result<Option<cd_core::ReleaseDocument>> {
        let path = self.p();
        let (version, kind) = (version.to_string(), kind.to_string());
        self.engine
            .read(move |c| {
                c.prepare_cached(
                    "SELECT record, content FROM release_documents WHERE version = ?1 AND kind = ?2
                     ORDER BY seq DESC LIMIT 1",
                )
                .and_then(|mut s| {
                    s.query_row(params![version, kind], rows::release_document)
                        .optional()
                })
                .map_err(|e| sql_err(&path, e))
            })
            .await
    }
}
