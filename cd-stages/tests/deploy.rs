//! The Deploy stage: release history, compensation, restore to known-good.

use std::sync::Arc;

use cd_core::*;
use cd_stages::{Deploy, Restore};

async fn history(store: &Arc<dyn Store>) -> Vec<(String, ReleaseStatus)> {
    store
        .release_history("prod", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.version, r.status))
        .collect()
}

#[tokio::test]
async fn history_records_live_superseded_and_rolled_back() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let deployer = Arc::new(MemoryDeployer::new(["a", "b"]));
    let pipeline = |fail_after: bool| {
        let mut b =
            Pipeline::builder("p").stage("deploy", Deploy::shared(deployer.clone()).env("prod"));
        if fail_after {
            b = b
                .stage(
                    "verify",
                    stage_fn(|_| async { Err(Error::failed("smoke test failed")) }),
                )
                .needs(["deploy"]);
        }
        b.build().unwrap()
    };
    let runner = Runner::new(store.clone()).retry(RetryPolicy::none());
    let r1 = runner
        .run(&pipeline(false), Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(r1.status, RunStatus::Succeeded);
    let r2 = runner
        .run(&pipeline(false), Release::new("v2"))
        .await
        .unwrap();
    assert_eq!(r2.status, RunStatus::Succeeded);
    assert_eq!(
        history(&store).await,
        [
            ("v2".into(), ReleaseStatus::Live),
            ("v1".into(), ReleaseStatus::Superseded)
        ]
    );
    let r3 = runner
        .run(&pipeline(true), Release::new("v3"))
        .await
        .unwrap();
    assert_eq!(r3.status, RunStatus::Failed);
    assert_eq!(r3.node("deploy").unwrap().status, NodeStatus::RolledBack);
    assert_eq!(deployer.versions(), ["v2", "v2"]);
    assert_eq!(
        history(&store).await,
        [
            ("v3".into(), ReleaseStatus::RolledBack),
            ("v2".into(), ReleaseStatus::Live),
            ("v1".into(), ReleaseStatus::Superseded)
        ]
    );

    // Roll back to known-good: the release before the live one.
    let stage = Deploy::shared(deployer.clone()).env("prod").rolling(2, 0);
    stage
        .restore(
            &store,
            &Restore::new("prod"),
            &DeployContext::detached("prod"),
        )
        .await
        .unwrap();
    assert_eq!(deployer.versions(), ["v1", "v1"]);
    let h = history(&store).await;
    assert_eq!(h[0], ("v1".into(), ReleaseStatus::Live));
    // Or a named version.
    stage
        .restore(
            &store,
            &Restore::new("prod").version("v2"),
            &DeployContext::detached("prod"),
        )
        .await
        .unwrap();
    assert_eq!(deployer.versions(), ["v2", "v2"]);
    let err = stage
        .restore(
            &store,
            &Restore::new("prod").version("v9"),
            &DeployContext::detached("prod"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("v9"));
}
