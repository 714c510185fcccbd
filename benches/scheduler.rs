//! Scheduler overhead: 10,000 no-op nodes as a layered DAG (100 layers × 100,
//! each node needing three nodes of the layer before) and as a 10,000-node
//! chain, against the bare cost of spawning and joining 10,000 tokio tasks in
//! the same process.
//!
//! Run: `cargo bench --bench scheduler`. `CD_BENCH_PROFILE=inline|spawn|null`
//! runs one case 20 times and prints nothing (for `perf record`). Last line:
//! `bench scheduler: layered_us_per_node=<x> chain_us_per_node=<y> tokio_us_per_task=<z> ratio_vs_tokio=<r>`
//! where the ratio is the worse of the two pipeline shapes over bare tokio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cd::core::{
    stage_fn, ApprovalRecord, Lease, LockAttempt, LockRequest, MemoryStore, NodeRecord, Pipeline,
    Release, ReleaseRecord, RetryPolicy, RunRecord, RunStatus, Runner, StageOutput, Store,
};

const N: usize = 10_000;
const ROUNDS: usize = 7;

fn layered() -> Pipeline {
    let mut b = Pipeline::builder("layered");
    for layer in 0..100 {
        for j in 0..100 {
            b = b.stage(
                format!("l{layer}n{j}"),
                stage_fn(|_| async { Ok(StageOutput::empty()) }),
            );
            if layer > 0 {
                b = b.needs((0..3).map(|k| format!("l{}n{}", layer - 1, (j + k) % 100)));
            }
        }
    }
    b.build().unwrap()
}

fn chain() -> Pipeline {
    let mut b = Pipeline::builder("chain");
    for i in 0..N {
        b = b.stage(
            format!("n{i}"),
            stage_fn(|_| async { Ok(StageOutput::empty()) }),
        );
        if i > 0 {
            b = b.needs([format!("n{}", i - 1)]);
        }
    }
    b.build().unwrap()
}

/// A store that keeps nothing: isolates the scheduler from persistence.
struct NullStore(MemoryStore);

#[async_trait::async_trait]
impl Store for NullStore {
    async fn create_run(&self, run: &RunRecord) -> cd::core::Result<()> {
        self.0.create_run(run).await
    }
    async fn set_run_status(
        &self,
        id: &str,
        s: RunStatus,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> cd::core::Result<()> {
        self.0.set_run_status(id, s, at).await
    }
    async fn get_run(&self, id: &str) -> cd::core::Result<Option<RunRecord>> {
        self.0.get_run(id).await
    }
    async fn list_runs(&self, n: usize) -> cd::core::Result<Vec<RunRecord>> {
        self.0.list_runs(n).await
    }
    async fn put_node(&self, _: &NodeRecord) -> cd::core::Result<()> {
        Ok(())
    }
    async fn put_nodes(&self, _: &[NodeRecord]) -> cd::core::Result<()> {
        Ok(())
    }
    async fn nodes(&self, _: &str) -> cd::core::Result<Vec<NodeRecord>> {
        Ok(Vec::new())
    }
    async fn append_events(&self, _: &[cd::core::Event]) -> cd::core::Result<()> {
        Ok(())
    }
    async fn events(&self, _: &str, _: u64, _: usize) -> cd::core::Result<Vec<cd::core::Event>> {
        Ok(Vec::new())
    }
    async fn put_approval(&self, a: &ApprovalRecord) -> cd::core::Result<()> {
        self.0.put_approval(a).await
    }
    async fn approvals(&self, r: &str, n: &str) -> cd::core::Result<Vec<ApprovalRecord>> {
        self.0.approvals(r, n).await
    }
    async fn try_acquire_lock(&self, r: &LockRequest) -> cd::core::Result<LockAttempt> {
        self.0.try_acquire_lock(r).await
    }
    async fn renew_lock(&self, e: &str, h: &str, t: Duration) -> cd::core::Result<Lease> {
        self.0.renew_lock(e, h, t).await
    }
    async fn release_lock(&self, e: &str, h: &str) -> cd::core::Result<bool> {
        self.0.release_lock(e, h).await
    }
    async fn force_unlock(&self, e: &str) -> cd::core::Result<Option<Lease>> {
        self.0.force_unlock(e).await
    }
    async fn locks(&self) -> cd::core::Result<Vec<Lease>> {
        self.0.locks().await
    }
    async fn put_release(&self, r: &ReleaseRecord) -> cd::core::Result<()> {
        self.0.put_release(r).await
    }
    async fn release_history(&self, e: &str, n: usize) -> cd::core::Result<Vec<ReleaseRecord>> {
        self.0.release_history(e, n).await
    }
    async fn append_target_record(
        &self,
        scope: &str,
        target: &str,
        entry: &serde_json::Value,
    ) -> cd::core::Result<u64> {
        self.0.append_target_record(scope, target, entry).await
    }
    async fn target_records(
        &self,
        scope: &str,
        target: &str,
        limit: usize,
    ) -> cd::core::Result<Vec<cd::core::TargetRecord>> {
        self.0.target_records(scope, target, limit).await
    }
}

async fn run_pipeline(p: &Pipeline) -> Duration {
    run_with(p, Arc::new(MemoryStore::new()), true).await
}

async fn run_with(p: &Pipeline, store: Arc<dyn Store>, spawn: bool) -> Duration {
    run_with_telemetry(p, store, spawn, true).await
}

async fn run_with_telemetry(
    p: &Pipeline,
    store: Arc<dyn Store>,
    spawn: bool,
    telemetry: bool,
) -> Duration {
    let runner = Runner::new(store)
        .telemetry(telemetry)
        .spawn_stages(spawn)
        .concurrency(128)
        .retry(RetryPolicy::none())
        .without_lock();
    let t = Instant::now();
    let report = runner.run(p, Release::new("bench")).await.unwrap();
    let d = t.elapsed();
    assert_eq!(report.status, RunStatus::Succeeded);
    assert_eq!(report.nodes.len(), N);
    d
}

async fn bare_tokio() -> Duration {
    let t = Instant::now();
    let handles: Vec<_> = (0..N).map(|_| tokio::spawn(async {})).collect();
    for h in handles {
        h.await.unwrap();
    }
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us_per(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / N as f64
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (layered_p, chain_p) = (layered(), chain());
    rt.block_on(async {
        // For profiling (`perf record`): only one case, 20 times.
        if let Ok(v) = std::env::var("CD_BENCH_PROFILE") {
            let inline = v != "spawn";
            for _ in 0..(if v == "build" { 0 } else { 20 }) {
                if v == "null" {
                    run_with(&chain_p, Arc::new(NullStore(MemoryStore::new())), false).await;
                } else {
                    run_with(&chain_p, Arc::new(MemoryStore::new()), !inline).await;
                }
            }
            return;
        }
        // Warm up.
        run_pipeline(&layered_p).await;
        bare_tokio().await;
        let mut l = Vec::new();
        let mut c = Vec::new();
        let mut t = Vec::new();
        let mut n = Vec::new();
        let (mut il, mut ic) = (Vec::new(), Vec::new());
        let mut off = Vec::new();
        for _ in 0..ROUNDS {
            l.push(run_pipeline(&layered_p).await);
            c.push(run_pipeline(&chain_p).await);
            t.push(bare_tokio().await);
            n.push(run_with(&layered_p, Arc::new(NullStore(MemoryStore::new())), true).await);
            il.push(run_with(&layered_p, Arc::new(MemoryStore::new()), false).await);
            ic.push(run_with(&chain_p, Arc::new(MemoryStore::new()), false).await);
            off.push(run_with_telemetry(&layered_p, Arc::new(MemoryStore::new()), true, false).await);
        }
        // The runner spawns from a worker thread; the headline baseline
        // (from the main thread) is the faster of the two here, so the
        // reported ratio is the conservative one.
        let mut w = Vec::new();
        for _ in 0..ROUNDS {
            w.push(tokio::spawn(bare_tokio()).await.unwrap());
        }
        let w = us_per(median(w));
        let (l, c, t, n) = (us_per(median(l)), us_per(median(c)), us_per(median(t)), us_per(median(n)));
        println!("layered 100x100: {l:.2} µs/node (median of {ROUNDS})");
        println!("layered, store that keeps nothing: {n:.2} µs/node (the scheduler alone)");
        let (il, ic) = (us_per(median(il)), us_per(median(ic)));
        println!(
            "inline attempts (Runner::spawn_stages(false)): layered {il:.2} µs/node, chain {ic:.2} µs/node, ratio vs tokio {:.2}",
            il.max(ic) / t
        );
        let off = us_per(median(off));
        println!(
            "layered without telemetry (Runner::telemetry(false)): {off:.2} µs/node; telemetry costs {:.2} µs/node",
            l - off
        );
        println!("chain 10000:     {c:.2} µs/node");
        println!("bare tokio:      {t:.2} µs/task (spawn + join from the main thread)");
        println!("bare tokio:      {w:.2} µs/task (spawn + join from a worker, as the runner does)");
        println!(
            "bench scheduler: layered_us_per_node={l:.2} chain_us_per_node={c:.2} tokio_us_per_task={t:.2} ratio_vs_tokio={:.2}",
            l.max(c) / t
        );
    });
}
