//! The connections behind a [`super::SqliteStore`]: one writer thread that
//! commits in groups, and a small pool of reader connections.
//!
//! Every write is a closure sent to the writer thread. The thread takes all
//! writes waiting in its queue (up to [`MAX_GROUP`]), runs each inside its own
//! savepoint of one `BEGIN IMMEDIATE` transaction and commits once; only then
//! are the callers answered. So an acknowledged write is committed (in WAL
//! mode a commit survives the process being killed; with
//! [`super::Durability::PowerLoss`] it is also fsynced), concurrent writers
//! share one commit, and one failing write does not undo the others. `BEGIN
//! IMMEDIATE` takes SQLite's write lock up front, which makes each group
//! atomic against other processes sharing the file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cd_core::{Error, Result};
use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{schema, sql_err, Durability};

/// Most writes committed together.
const MAX_GROUP: usize = 512;
/// Reader connections kept open for reuse.
const MAX_IDLE_READERS: usize = 4;

/// A write waiting for the writer thread.
trait WriteOp: Send {
    /// Runs the write; returns whether it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the group's commit is known.
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

struct Op<T, F> {
    f: Option<F>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    path: Arc<PathBuf>,
}

impl<T, F> WriteOp for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let r = match self.f.take() {
            Some(f) => f(conn),
            None => Err(Error::store("write ran twice")),
        };
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let answer = match (self.result, commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(msg)) => Err(Error::store(msg).with("file", self.path.display())),
            (None, Ok(())) => {
                Err(Error::store("write was not run").with("file", self.path.display()))
            }
        };
        let _ = self.reply.send(answer);
    }
}

/// The connections of one store.
pub(crate) struct Engine {
    path: Arc<PathBuf>,
    writer: Mutex<Option<mpsc::Sender<Box<dyn WriteOp>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    busy_timeout: Duration,
    durability: Durability,
}

impl Engine {
    /// Starts the writer thread over an opened, migrated connection.
    pub(crate) fn start(
        path: PathBuf,
        writer_conn: Connection,
        busy_timeout: Duration,
        durability: Durability,
    ) -> Result<Engine> {
        let path = Arc::new(path);
        let (tx, rx) = mpsc::channel::<Box<dyn WriteOp>>();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("cd-sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, &thread_path))
            .map_err(|e| {
                Error::store(format!("cannot start the SQLite writer thread: {e}"))
                    .with("file", path.display())
            })?;
        Ok(Engine {
            path,
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
            busy_timeout,
            durability,
        })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the writer's transaction; answers once it is committed.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let op = Box::new(Op {
            f: Some(f),
            result: None,
            reply,
            path: self.path.clone(),
        });
        let sent = match &*self.writer.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(op).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.gone());
        }
        rx.await.map_err(|_| self.gone())?
    }

    /// Runs `f` on a reader connection (a consistent snapshot per statement).
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        if self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(self.gone());
        }
        let readers = self.readers.clone();
        let path = self.path.clone();
        let busy = self.busy_timeout;
        let durability = self.durability;
        let join = tokio::task::spawn_blocking(move || {
            let conn = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => schema::connect(&path, busy, durability)?,
            };
            let out = f(&conn);
            let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
            out
        });
        join.await.map_err(|e| {
            Error::store(format!("SQLite reader task failed: {e}"))
                .with("file", self.path.display())
        })?
    }

    /// Stops the writer after the writes already queued, waits for it to
    /// close its connection (which checkpoints the WAL into the main file)
    /// and closes the readers. Later calls fail.
    pub(crate) async fn close(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn gone(&self) -> Error {
        Error::store("the SQLite store is closed").with("file", self.path.display())
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Box<dyn WriteOp>>, path: &Path) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        commit_group(&conn, group, path);
    }
}

fn commit_group(conn: &Connection, mut group: Vec<Box<dyn WriteOp>>, path: &Path) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = format!("cannot start a write transaction: {}", sql_err(path, e));
        for op in group {
            op.finish(Err(msg.clone()));
        }
        return;
    }
    let mut broken: Option<String> = None;
    for op in group.iter_mut() {
        if broken.is_some() {
            break;
        }
        if let Err(e) = conn.execute_batch("SAVEPOINT op") {
            broken = Some(format!("{}", sql_err(path, e)));
            break;
        }
        let ok = op.run(conn);
        let end = if ok {
            conn.execute_batch("RELEASE op")
        } else {
            conn.execute_batch("ROLLBACK TO op; RELEASE op")
        };
        if let Err(e) = end {
            broken = Some(format!("{}", sql_err(path, e)));
        }
    }
    let outcome = match broken {
        Some(msg) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(msg)
        }
        None => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(format!("commit failed: {}", sql_err(path, e)))
            }
        },
    };
    for op in group {
        op.finish(outcome.clone());
    }
}
