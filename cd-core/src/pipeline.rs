//! Pipelines: a validated DAG of named stages and gates.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use sha2::{Digest, Sha256};

use crate::stage::{Gate, Stage};

/// Why a pipeline definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline has no nodes.
    #[error("pipeline `{pipeline}` has no nodes")]
    Empty {
        /// The pipeline.
        pipeline: String,
    },
    /// Two nodes share a name.
    #[error("pipeline `{pipeline}`: duplicate node name `{node}`")]
    DuplicateNode {
        /// The pipeline.
        pipeline: String,
        /// The name used twice.
        node: String,
    },
    /// A node needs a node that does not exist.
    #[error(
        "pipeline `{pipeline}`: node `{node}` needs `{needs}`, which is not a node of the pipeline"
    )]
    UnknownDependency {
        /// The pipeline.
        pipeline: String,
        /// The node with the bad edge.
        node: String,
        /// The missing node.
        needs: String,
    },
    /// The needs form a cycle.
    #[error("pipeline `{pipeline}`: dependency cycle {}", .cycle.join(" -> "))]
    Cycle {
        /// The pipeline.
        pipeline: String,
        /// The cycle, first node repeated at the end: `deploy -> verify -> deploy`.
        cycle: Vec<String>,
    },
    /// A node's own configuration is invalid ([`crate::Stage::validate`],
    /// [`crate::Gate::validate`]): a canary without a judge, steps out of
    /// range, a bad environment name.
    #[error("pipeline `{pipeline}`: node `{node}`: {message}")]
    InvalidNode {
        /// The pipeline.
        pipeline: String,
        /// The node at fault.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// A builder call was misplaced (`needs` before any node, a bad name).
    #[error("pipeline `{pipeline}`: {message}")]
    Misuse {
        /// The pipeline.
        pipeline: String,
        /// What was wrong.
        message: String,
    },
}

/// What a node does.
#[derive(Clone)]
pub enum NodeKind {
    /// Does work.
    Stage(Arc<dyn Stage>),
    /// Decides whether the run goes on.
    Gate(Arc<dyn Gate>),
}

impl NodeKind {
    /// The stage's or gate's own description.
    pub fn describe(&self) -> String {
        match self {
            NodeKind::Stage(s) => s.kind(),
            NodeKind::Gate(g) => g.kind(),
        }
    }

    /// The stage's or gate's fingerprint (its behaviour-changing settings).
    pub fn fingerprint(&self) -> String {
        match self {
            NodeKind::Stage(s) => s.fingerprint(),
            NodeKind::Gate(g) => g.fingerprint(),
        }
    }

    /// Whether it is a gate.
    pub fn is_gate(&self) -> bool {
        matches!(self, NodeKind::Gate(_))
    }
}

/// One node of a pipeline, with its settings.
#[derive(Clone)]
pub struct NodeSpec {
    /// Unique name.
    pub name: String,
    /// Stage or gate.
    pub kind: NodeKind,
    /// Names of the nodes that must succeed first.
    pub needs: Vec<String>,
    /// Per-attempt timeout (overrides the runner's default).
    pub timeout: Option<Duration>,
    /// Extra attempts for retryable errors (overrides the runner's default).
    pub retries: Option<u32>,
    /// How long the node gets, after its timeout fires or the run is
    /// cancelled, to stop cooperatively (revert, stop its tools) before its
    /// future is dropped (overrides the runner's default).
    pub grace: Option<Duration>,
    /// Whether a timed-out attempt is retried (overrides the runner's
    /// default, which is no: a timed-out deploy may have half happened).
    pub retry_on_timeout: Option<bool>,
    /// Runs after everything else, whatever happened.
    pub finally: bool,
}

impl fmt::Debug for NodeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSpec")
            .field("name", &self.name)
            .field("kind", &self.kind.describe())
            .field("needs", &self.needs)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("grace", &self.grace)
            .field("retry_on_timeout", &self.retry_on_timeout)
            .field("finally", &self.finally)
            .finish()
    }
}

/// A validated DAG of nodes. Build one with [`Pipeline::builder`].
///
/// ```
/// use cd_core::{stage_fn, Pipeline, PipelineError, StageOutput};
/// let noop = || stage_fn(|_| async { Ok(StageOutput::empty()) });
/// let p = Pipeline::builder("web")
///     .stage("build", noop())
///     .stage("deploy", noop()).needs(["build"])
///     .stage("verify", noop()).needs(["deploy"])
///     .build()
///     .unwrap();
/// assert_eq!(p.len(), 3);
/// assert!(p.to_mermaid().contains("-->"));
///
/// let err = Pipeline::builder("bad")
///     .stage("deploy", noop()).needs(["verify"])
///     .stage("verify", noop()).needs(["deploy"])
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, PipelineError::Cycle { .. }));
/// assert!(err.to_string().contains("deploy -> verify -> deploy"));
/// ```
#[derive(Clone)]
pub struct Pipeline(Arc<PipelineInner>);

struct PipelineInner {
    name: String,
    nodes: Vec<NodeSpec>,
    index: HashMap<String, usize>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    topo: Vec<usize>,
    hash: String,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.0.name)
            .field("nodes", &self.0.nodes)
            .finish()
    }
}

impl Pipeline {
    /// Starts a pipeline definition.
    pub fn builder(name: impl Into<String>) -> PipelineBuilder {
        PipelineBuilder {
            name: name.into(),
            nodes: Vec::new(),
            misuse: None,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Number of nodes, `finally` nodes included.
    pub fn len(&self) -> usize {
        self.0.nodes.len()
    }

    /// Whether there are no nodes (never true for a built pipeline).
    pub fn is_empty(&self) -> bool {
        self.0.nodes.is_empty()
    }

    /// All nodes, in definition order.
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.0.nodes
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.0.index.get(name).map(|&i| &self.0.nodes[i])
    }

    /// The index of a node by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.0.index.get(name).copied()
    }

    /// Indices of the nodes `i` needs.
    pub fn deps_of(&self, i: usize) -> &[usize] {
        &self.0.deps[i]
    }

    /// Indices of the nodes that need `i`.
    pub fn dependents_of(&self, i: usize) -> &[usize] {
        &self.0.dependents[i]
    }

    /// Node indices in a topological order (needs first); `finally` nodes last.
    pub fn topological_order(&self) -> &[usize] {
        &self.0.topo
    }

    /// A hash of the definition: names, kinds, edges, node settings and each
    /// node's [`crate::Stage::fingerprint`] (URLs, thresholds, strategy
    /// steps, approvers). A run is only resumed with a pipeline of the same
    /// hash.
    pub fn definition_hash(&self) -> &str {
        &self.0.hash
    }

    /// A Graphviz DOT picture.
    pub fn to_dot(&self) -> String {
        let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n", esc(&self.0.name));
        for n in &self.0.nodes {
            let shape = if n.kind.is_gate() { "diamond" } else { "box" };
            let style = if n.finally { ", style=dashed" } else { "" };
            s.push_str(&format!(
                "  \"{}\" [shape={shape}{style}, label=\"{}\\n{}\"];\n",
                esc(&n.name),
                esc(&n.name),
                esc(&n.kind.describe())
            ));
        }
        for n in &self.0.nodes {
            for d in &n.needs {
                s.push_str(&format!("  \"{}\" -> \"{}\";\n", esc(d), esc(&n.name)));
            }
        }
        s.push_str("}\n");
        s
    }

    /// A Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        let mut s = String::from("flowchart LR\n");
        for (i, n) in self.0.nodes.iter().enumerate() {
            let label = n.name.replace('"', "'");
            if n.kind.is_gate() {
                s.push_str(&format!("  n{i}{{\"{label}\"}}\n"));
            } else if n.finally {
                s.push_str(&format!("  n{i}([\"{label}\"])\n"));
            } else {
                s.push_str(&format!("  n{i}[\"{label}\"]\n"));
            }
        }
        for (i, deps) in self.0.deps.iter().enumerate() {
            for d in deps {
                s.push_str(&format!("  n{d} --> n{i}\n"));
            }
        }
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Builds a [`Pipeline`]. Settings (`needs`, `timeout`, `retries`) apply to
/// the node added last.
pub struct PipelineBuilder {
    name: String,
    nodes: Vec<NodeSpec>,
    misuse: Option<String>,
}

impl PipelineBuilder {
    fn push(mut self, name: String, kind: NodeKind, finally: bool) -> Self {
        if name.trim().is_empty() && self.misuse.is_none() {
            self.misuse = Some("a node name must not be empty".into());
        }
        self.nodes.push(NodeSpec {
            name,
            kind,
            needs: Vec::new(),
            timeout: None,
            retries: None,
            grace: None,
            retry_on_timeout: None,
            finally,
        });
        self
    }

    /// Adds a stage.
    pub fn stage(self, name: impl Into<String>, stage: impl Stage) -> Self {
        self.push(name.into(), NodeKind::Stage(Arc::new(stage)), false)
    }

    /// Adds a shared stage.
    pub fn stage_arc(self, name: impl Into<String>, stage: Arc<dyn Stage>) -> Self {
        self.push(name.into(), NodeKind::Stage(stage), false)
    }

    /// Adds a gate.
    pub fn gate(self, name: impl Into<String>, gate: impl Gate) -> Self {
        self.push(name.into(), NodeKind::Gate(Arc::new(gate)), false)
    }

    /// Adds a shared gate.
    pub fn gate_arc(self, name: impl Into<String>, gate: Arc<dyn Gate>) -> Self {
        self.push(name.into(), NodeKind::Gate(gate), false)
    }

    /// Adds a stage that runs after everything else, whatever happened
    /// (notifications, clean-up). `finally` nodes run one after another in
    /// the order they were added.
    pub fn finally(self, name: impl Into<String>, stage: impl Stage) -> Self {
        self.push(name.into(), NodeKind::Stage(Arc::new(stage)), true)
    }

    fn last(&mut self, what: &str) -> Option<&mut NodeSpec> {
        if self.nodes.is_empty() {
            if self.misuse.is_none() {
                self.misuse = Some(format!("`{what}` called before any node was added"));
            }
            return None;
        }
        self.nodes.last_mut()
    }

    /// The last node needs these nodes to succeed first.
    pub fn needs<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let mut misuse = None;
        if let Some(n) = self.last("needs") {
            if n.finally {
                misuse = Some(format!("finally node `{}` cannot have needs", n.name));
            } else {
                for name in names {
                    if !n.needs.contains(&name) {
                        n.needs.push(name);
                    }
                }
            }
        }
        if misuse.is_some() && self.misuse.is_none() {
            self.misuse = misuse;
        }
        self
    }

    /// Per-attempt timeout for the last node.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let Some(n) = self.last("timeout") {
            n.timeout = Some(timeout);
        }
        self
    }

    /// Extra attempts for retryable errors, for the last node.
    pub fn retries(mut self, retries: u32) -> Self {
        if let Some(n) = self.last("retries") {
            n.retries = Some(retries);
        }
        self
    }

    /// Grace period of the last node: after its timeout fires or the run is
    /// cancelled, the node's cancellation token fires and it has this long
    /// to stop cooperatively before its future is dropped.
    pub fn grace(mut self, grace: Duration) -> Self {
        if let Some(n) = self.last("grace") {
            n.grace = Some(grace);
        }
        self
    }

    /// Whether a timed-out attempt of the last node is retried (within its
    /// `retries`). Default: the runner's ([`crate::Runner::retry_on_timeout`]),
    /// which is `false`.
    pub fn retry_on_timeout(mut self, yes: bool) -> Self {
        if let Some(n) = self.last("retry_on_timeout") {
            n.retry_on_timeout = Some(yes);
        }
        self
    }

    /// Validates and builds: duplicate names, unknown needs, cycles, and
    /// each node's own [`crate::Stage::validate`] / [`crate::Gate::validate`].
    pub fn build(self) -> Result<Pipeline, PipelineError> {
        let pipeline = self.name.clone();
        if let Some(message) = self.misuse {
            return Err(PipelineError::Misuse { pipeline, message });
        }
        if self.nodes.is_empty() {
            return Err(PipelineError::Empty { pipeline });
        }
        let mut index = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if index.insert(n.name.clone(), i).is_some() {
                return Err(PipelineError::DuplicateNode {
                    pipeline,
                    node: n.name.clone(),
                });
            }
        }
        for n in &self.nodes {
            let checked = match &n.kind {
                NodeKind::Stage(s) => s.validate(),
                NodeKind::Gate(g) => g.validate(),
            };
            if let Err(e) = checked {
                return Err(PipelineError::InvalidNode {
                    pipeline,
                    node: n.name.clone(),
                    message: e.to_string(),
                });
            }
        }
        let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(self.nodes.len(), 0);
        let ids: Vec<NodeIndex> = (0..self.nodes.len()).map(|i| graph.add_node(i)).collect();
        let mut deps = vec![Vec::new(); self.nodes.len()];
        let mut dependents = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for d in &n.needs {
                let Some(&j) = index.get(d) else {
                    return Err(PipelineError::UnknownDependency {
                        pipeline,
                        node: n.name.clone(),
                        needs: d.clone(),
                    });
                };
                if self.nodes[j].finally {
                    return Err(PipelineError::Misuse {
                        pipeline,
                        message: format!("node `{}` needs finally node `{d}`", n.name),
                    });
                }
                deps[i].push(j);
                dependents[j].push(i);
                graph.add_edge(ids[j], ids[i], ());
            }
        }
        if toposort(&graph, None).is_err() {
            let cycle = find_cycle(&graph, &self.nodes);
            return Err(PipelineError::Cycle { pipeline, cycle });
        }
        // A stable topological order: among the nodes whose needs are met,
        // the one defined first goes first. `finally` nodes last.
        let mut missing: Vec<usize> = deps.iter().map(Vec::len).collect();
        let mut ready: BinaryHeap<Reverse<usize>> = (0..self.nodes.len())
            .filter(|&i| missing[i] == 0)
            .map(Reverse)
            .collect();
        let mut topo = Vec::with_capacity(self.nodes.len());
        while let Some(Reverse(i)) = ready.pop() {
            topo.push(i);
            for &j in &dependents[i] {
                missing[j] -= 1;
                if missing[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
        let (mut topo, finals): (Vec<usize>, Vec<usize>) =
            topo.into_iter().partition(|&i| !self.nodes[i].finally);
        topo.extend(finals);
        let hash = definition_hash(&self.name, &self.nodes);
        Ok(Pipeline(Arc::new(PipelineInner {
            name: self.name,
            nodes: self.nodes,
            index,
            deps,
            dependents,
            topo,
            hash,
        })))
    }
}

/// Spells out one cycle: `a -> b -> a`.
fn find_cycle(graph: &DiGraph<usize, ()>, nodes: &[NodeSpec]) -> Vec<String> {
    // Self-loops first (a node that needs itself).
    for ix in graph.node_indices() {
        if graph.contains_edge(ix, ix) {
            let n = nodes[graph[ix]].name.clone();
            return vec![n.clone(), n];
        }
    }
    for scc in tarjan_scc(graph) {
        if scc.len() < 2 {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        // Start at the member defined first, walk edges inside the SCC until a
        // node repeats.
        let start = *scc
            .iter()
            .min_by_key(|ix| graph[**ix])
            .expect("non-empty scc");
        let mut path = vec![start];
        let mut cur = start;
        loop {
            let next = graph
                .neighbors(cur)
                .filter(|n| members.contains(n))
                .min_by_key(|n| graph[*n])
                .expect("scc member has an edge inside the scc");
            if let Some(pos) = path.iter().position(|&p| p == next) {
                let mut cycle: Vec<String> = path[pos..]
                    .iter()
                    .map(|ix| nodes[graph[*ix]].name.clone())
                    .collect();
                cycle.push(nodes[graph[next]].name.clone());
                return cycle;
            }
            path.push(next);
            cur = next;
        }
    }
    Vec::new()
}

fn definition_hash(name: &str, nodes: &[NodeSpec]) -> String {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    for n in nodes {
        let mut needs = n.needs.clone();
        needs.sort();
        h.update(
            format!(
                "\n{}|{}|{}|{}|{:?}|{:?}|{}",
                n.name,
                if n.kind.is_gate() { "gate" } else { "stage" },
                n.kind.describe(),
                needs.join(","),
                n.timeout,
                n.retries,
                n.finally
            )
            .as_bytes(),
        );
        // Settings added later hash only when set, so runs started before
        // they existed still resume.
        let fingerprint = n.kind.fingerprint();
        if fingerprint != n.kind.describe() {
            h.update(b"|fp:");
            h.update(fingerprint.as_bytes());
        }
        if n.grace.is_some() || n.retry_on_timeout.is_some() {
            h.update(format!("|{:?}|{:?}", n.grace, n.retry_on_timeout).as_bytes());
        }
    }
    hex::encode(h.finalize())
}
