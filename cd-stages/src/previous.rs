//! The previous release's result of a stage, for comparisons release to
//! release (regression tests, load tests).
//!
//! A stage that wants to be compared emits its result as a
//! [`EventKind::Custom`] event (stored with the run's events, so a failed
//! run's result counts too); the next release finds it in the newest earlier
//! run of the same pipeline and environment for another version.

use cd_core::{EventKind, Result, StageContext};

/// A result found in an earlier run.
#[derive(Debug, Clone, PartialEq)]
pub struct Previous {
    /// That run's release version.
    pub version: String,
    /// That run.
    pub run_id: String,
    /// The event's data.
    pub data: serde_json::Value,
}

/// How many runs back (all pipelines and environments) to look; only runs
/// of this pipeline and environment have their events read.
const LOOK_BACK: usize = 2000;

/// The data of the newest `event` emitted by this node in the newest earlier
/// run of this pipeline in this environment for another release version.
///
/// Errors: store errors.
pub async fn previous_result(cx: &StageContext, event: &str) -> Result<Option<Previous>> {
    let store = cx.store();
    for run in store.list_runs(LOOK_BACK).await? {
        if run.id == cx.run_id()
            || run.pipeline != cx.pipeline()
            || run.environment != cx.environment()
            || run.release.version == cx.release().version
        {
            continue;
        }
        let events = store.events(&run.id, 0, usize::MAX).await?;
        let found = events.into_iter().rev().find_map(|e| match e.kind {
            EventKind::Custom { name, data }
                if name == event && e.node.as_deref() == Some(cx.node()) =>
            {
                Some(data)
            }
            _ => None,
        });
        if let Some(data) = found {
            return Ok(Some(Previous {
                version: run.release.version.clone(),
                run_id: run.id.clone(),
                data,
            }));
        }
    }
    Ok(None)
}
