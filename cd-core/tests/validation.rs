//! Every pipeline validation error, and the pictures.

use cd_core::{stage_fn, Pipeline, PipelineError, StageOutput};

fn noop() -> impl cd_core::Stage {
    stage_fn(|_| async { Ok(StageOutput::empty()) })
}

#[test]
fn empty_pipeline_is_refused() {
    let err = Pipeline::builder("p").build().unwrap_err();
    assert_eq!(
        err,
        PipelineError::Empty {
            pipeline: "p".into()
        }
    );
    assert_eq!(err.to_string(), "pipeline `p` has no nodes");
}

#[test]
fn duplicate_names_are_refused() {
    let err = Pipeline::builder("p")
        .stage("deploy", noop())
        .stage("deploy", noop())
        .build()
        .unwrap_err();
    assert!(matches!(err, PipelineError::DuplicateNode { ref node, .. } if node == "deploy"));
}

#[test]
fn unknown_dependency_is_refused_with_both_names() {
    let err = Pipeline::builder("p")
        .stage("deploy", noop())
        .needs(["biuld"])
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pipeline `p`: node `deploy` needs `biuld`, which is not a node of the pipeline"
    );
}

#[test]
fn a_cycle_is_spelled_out() {
    let err = Pipeline::builder("p")
        .stage("build", noop())
        .stage("deploy", noop())
        .needs(["build", "verify"])
        .stage("verify", noop())
        .needs(["deploy"])
        .build()
        .unwrap_err();
    match &err {
        PipelineError::Cycle { cycle, .. } => {
            assert_eq!(cycle, &["deploy", "verify", "deploy"]);
        }
        other => panic!("expected a cycle, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "pipeline `p`: dependency cycle deploy -> verify -> deploy"
    );
}

#[test]
fn a_self_loop_is_a_cycle() {
    let err = Pipeline::builder("p")
        .stage("a", noop())
        .needs(["a"])
        .build()
        .unwrap_err();
    assert!(err.to_string().ends_with("a -> a"), "{err}");
}

#[test]
fn a_longer_cycle_is_spelled_out_in_order() {
    let err = Pipeline::builder("p")
        .stage("a", noop())
        .needs(["c"])
        .stage("b", noop())
        .needs(["a"])
        .stage("c", noop())
        .needs(["b"])
        .build()
        .unwrap_err();
    assert!(err.to_string().ends_with("a -> b -> c -> a"), "{err}");
}

#[test]
fn misuse_is_reported() {
    let err = Pipeline::builder("p").needs(["x"]).build().unwrap_err();
    assert!(matches!(err, PipelineError::Misuse { .. }));
    let err = Pipeline::builder("p")
        .stage("a", noop())
        .finally("n", noop())
        .needs(["a"])
        .build()
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("finally node `n` cannot have needs"));
    let err = Pipeline::builder("p")
        .stage("", noop())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("must not be empty"));
}

#[test]
fn dot_and_mermaid_show_nodes_and_edges() {
    let p = Pipeline::builder("web")
        .stage("build", noop())
        .gate(
            "approval",
            cd_core::gate_fn(|_| async { Ok(cd_core::Verdict::Pass) }),
        )
        .needs(["build"])
        .stage("deploy", noop())
        .needs(["approval"])
        .build()
        .unwrap();
    let dot = p.to_dot();
    assert!(dot.contains("\"build\" -> \"approval\""));
    assert!(dot.contains("shape=diamond"));
    let m = p.to_mermaid();
    assert!(m.starts_with("flowchart LR"));
    assert!(m.contains("n0 --> n1") && m.contains("n1 --> n2"), "{m}");
}

#[test]
fn the_definition_hash_changes_with_the_definition() {
    let a = Pipeline::builder("p").stage("a", noop()).build().unwrap();
    let a2 = Pipeline::builder("p").stage("a", noop()).build().unwrap();
    let b = Pipeline::builder("p")
        .stage("a", noop())
        .timeout(std::time::Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(a.definition_hash(), a2.definition_hash());
    assert_ne!(a.definition_hash(), b.definition_hash());
}
