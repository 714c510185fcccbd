//! Property test: random DAGs of up to 200 nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cd_core::{
    stage_fn, Error, MemoryStore, Pipeline, Release, RetryPolicy, RunReport, RunStatus, Runner,
    StageOutput,
};
use proptest::prelude::*;

/// A DAG as, for each node, the indices of earlier nodes it needs, plus a
/// permutation giving the order nodes are added to the builder.
fn dag() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>, Option<usize>)> {
    (1usize..=200).prop_flat_map(|n| {
        let deps = (0..n)
            .map(|i| {
                if i == 0 {
                    Just(Vec::new()).boxed()
                } else {
                    proptest::collection::vec(0..i, 0..=3.min(i)).boxed()
                }
            })
            .collect::<Vec<_>>();
        let order = Just((0..n).collect::<Vec<usize>>()).prop_shuffle();
        let fail = proptest::option::weighted(0.5, 0..n);
        (deps, order, fail)
    })
}

type Trace = Arc<Mutex<Vec<(usize, &'static str)>>>;

fn run(
    deps: &[Vec<usize>],
    order: &[usize],
    fail: Option<usize>,
) -> (RunReport, Vec<(usize, &'static str)>) {
    let trace: Trace = Arc::default();
    let mut b = Pipeline::builder("prop");
    for &i in order {
        let t = trace.clone();
        let fails = fail == Some(i);
        b = b
            .stage(
                format!("n{i}"),
                stage_fn(move |_| {
                    let t = t.clone();
                    async move {
                        t.lock().unwrap().push((i, "start"));
                        tokio::task::yield_now().await;
                        if fails {
                            return Err(Error::failed("boom"));
                        }
                        t.lock().unwrap().push((i, "end"));
                        Ok(StageOutput::empty())
                    }
                }),
            )
            .needs(deps[i].iter().map(|d| format!("n{d}")));
    }
    let p = b.build().expect("a DAG is valid");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(
        Runner::new(Arc::new(MemoryStore::new()))
            .concurrency(8)
            .fail_fast(false)
            .retry(RetryPolicy::none())
            .without_lock()
            .run(&p, Release::new("v1")),
    );
    let trace = trace.lock().unwrap().clone();
    (report.unwrap(), trace)
}

fn descendants(deps: &[Vec<usize>], root: usize) -> Vec<bool> {
    let n = deps.len();
    let mut dependents = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut seen = vec![false; n];
    let mut stack = dependents[root].clone();
    while let Some(j) = stack.pop() {
        if !seen[j] {
            seen[j] = true;
            stack.extend(dependents[j].iter().copied());
        }
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_node_runs_once_after_its_needs((deps, order, fail) in dag()) {
        let (report, trace) = run(&deps, &order, fail);
        let n = deps.len();
        let mut starts: HashMap<usize, usize> = HashMap::new();
        let mut ends: HashMap<usize, usize> = HashMap::new();
        for (pos, (i, what)) in trace.iter().enumerate() {
            let map = if *what == "start" { &mut starts } else { &mut ends };
            prop_assert!(map.insert(*i, pos).is_none(), "node {} {} twice", i, what);
        }
        let doomed = fail.map(|f| descendants(&deps, f)).unwrap_or_else(|| vec![false; n]);
        for i in 0..n {
            if doomed[i] {
                prop_assert!(!starts.contains_key(&i), "descendant n{} of failing node ran", i);
                continue;
            }
            prop_assert!(starts.contains_key(&i), "n{} never ran", i);
            for &d in &deps[i] {
                let end_d = ends.get(&d).copied();
                prop_assert!(end_d.is_some_and(|e| e < starts[&i]), "n{} started before its need n{} ended", i, d);
            }
        }
        let expected = if fail.is_some() { RunStatus::Failed } else { RunStatus::Succeeded };
        prop_assert_eq!(report.status, expected);
    }
}
