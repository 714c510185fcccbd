//! Store benchmark: event appends to `SqliteStore`, and the store's overhead
//! per node when the runner persists a 1,000-node pipeline to `SqliteStore`
//! instead of `MemoryStore`.
//!
//! Run: `cargo bench --bench store`. Every figure is printed; the last line is
//! `bench store: events_per_s=<x> overhead_ms_per_node=<y>` where
//! - `events_per_s` is 100,000 events appended in batches of 100 (each batch
//!   one `append_events` call, awaited before the next, so every batch is
//!   committed before it is acknowledged) with the default durability (WAL,
//!   commits survive SIGKILL);
//! - `overhead_ms_per_node` is (median SQLite run − median memory run) / 1,000
//!   for a 1,000-node pipeline (layered DAG, concurrency 4, environment lock
//!   on), each run fully persisted (run, node records, events, lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_backends::sqlite::{Durability, SqliteOptions, SqliteStore};
use cd_core::{
    stage_fn, Event, EventKind, LogLevel, MemoryStore, Pipeline, Release, RunStatus, Runner,
    StageOutput, Store,
};

const EVENTS: u64 = 100_000;
const BATCH: u64 = 100;
const NODES: usize = 1_000;
const ROUNDS: usize = 5;

fn event(run_id: &str, seq: u64) -> Event {
    Event {
        run_id: run_id.into(),
        seq,
        at: chrono::Utc::now(),
        node: Some(format!("node{}", seq % 50).into()),
        kind: EventKind::Log {
            level: LogLevel::Info,
            message: format!("step {seq}: uploading release to web{} ok", seq % 3),
        },
    }
}

/// Appends `total` events in batches of `batch`, one awaited call per batch.
async fn append_sequential(store: &SqliteStore, run_id: &str, total: u64, batch: u64) -> f64 {
    let t0 = Instant::now();
    let mut seq = 1;
    while seq <= total {
        let end = (seq + batch).min(total + 1);
        let evs: Vec<Event> = (seq..end).map(|s| event(run_id, s)).collect();
        store.append_events(&evs).await.unwrap();
        seq = end;
    }
    total as f64 / t0.elapsed().as_secs_f64()
}

/// `tasks` tasks each appending single events: group commit shares commits.
async fn append_concurrent(store: Arc<SqliteStore>, tasks: u64, per_task: u64) -> f64 {
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let run_id = format!("concurrent-{t}");
            for seq in 1..=per_task {
                store.append_events(&[event(&run_id, seq)]).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task) as f64 / t0.elapsed().as_secs_f64()
}

fn pipeline() -> Pipeline {
    // 10 layers of 100 nodes; each node needs two nodes of the layer before.
    let mut b = Pipeline::builder("store-bench");
    for layer in 0..10 {
        for j in 0..NODES / 10 {
            b = b.stage(
                format!("l{layer}n{j}"),
                stage_fn(|_| async { Ok(StageOutput::empty()) }),
            );
            if layer > 0 {
                b = b.needs([
                    format!("l{}n{}", layer - 1, j),
                    format!("l{}n{}", layer - 1, (j + 1) % (NODES / 10)),
                ]);
            }
        }
    }
    b.build().unwrap()
}

async fn time_run(store: Arc<dyn Store>, p: &Pipeline) -> Duration {
    let runner = Runner::new(store)
        .concurrency(4)
        .environment("bench")
        .actor("bench");
    let t0 = Instant::now();
    let report = runner.run(p, Release::new("v1")).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(report.status, RunStatus::Succeeded);
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();

        // 1. Event appends.
        let store = SqliteStore::open(dir.path().join("events.db")).await.unwrap();
        let batched = append_sequential(&store, "batched", EVENTS, BATCH).await;
        assert_eq!(store.last_event_seq("batched").await.unwrap(), EVENTS);
        println!("events: {EVENTS} appended in batches of {BATCH}: {batched:.0} events/s (durability=process)");
        let single = append_sequential(&store, "single", 10_000, 1).await;
        println!("events: 10000 appended one per call, sequentially: {single:.0} events/s");
        let store = Arc::new(store);
        let concurrent = append_concurrent(store.clone(), 8, 2_500).await;
        println!("events: 8 tasks x 2500 single-event calls (group commit): {concurrent:.0} events/s");
        store.close().await;

        let full = SqliteStore::open_with(
            dir.path().join("events-full.db"),
            SqliteOptions::new().durability(Durability::PowerLoss),
        )
        .await
        .unwrap();
        let batched_full = append_sequential(&full, "batched", 20_000, BATCH).await;
        println!("events: 20000 appended in batches of {BATCH}, durability=power_loss (fsync per commit): {batched_full:.0} events/s");
        full.close().await;

        // 2. A 1,000-node pipeline, memory vs SQLite.
        let p = pipeline();
        let sqlite: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join("runs.db")).await.unwrap());
        let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
        // Warm up both.
        time_run(memory.clone(), &p).await;
        time_run(sqlite.clone(), &p).await;
        let mut mem_times = Vec::new();
        let mut sql_times = Vec::new();
        for _ in 0..ROUNDS {
            mem_times.push(time_run(memory.clone(), &p).await);
            sql_times.push(time_run(sqlite.clone(), &p).await);
        }
        let (m, s) = (median(mem_times), median(sql_times));
        let overhead_ms = (s.as_secs_f64() - m.as_secs_f64()) * 1000.0 / NODES as f64;
        println!(
            "pipeline: {NODES} nodes, median of {ROUNDS}: memory {:.1} ms, sqlite {:.1} ms",
            m.as_secs_f64() * 1000.0,
            s.as_secs_f64() * 1000.0
        );
        let runs = sqlite.list_runs(100).await.unwrap();
        let nodes = sqlite.nodes(&runs[0].id).await.unwrap();
        assert_eq!(nodes.len(), NODES, "every node persisted");
        println!("bench store: events_per_s={batched:.0} overhead_ms_per_node={overhead_ms:.3}");
    });
}
