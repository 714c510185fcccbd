//! # cd-core
//!
//! The core of an embeddable continuous-delivery library: the [`Stage`],
//! [`Gate`], [`Deployer`] and [`Monitor`] traits, the [`Pipeline`] DAG, the
//! [`Runner`] that schedules it (bounded concurrency, timeouts, retries,
//! cancellation, `finally` nodes, compensation), rollout [`strategy`]s written
//! once over any deployer, typed [`Event`]s, [`Secret`] redaction and the
//! [`Store`] trait with an in-memory implementation.
//!
//! cd-core does no I/O of its own beyond tokio timers and channels; deployers
//! and stores that talk to the world live in `cd-backends`, built-in stages in
//! `cd-stages`.
//!
//! ```
//! use std::sync::Arc;
//! use cd_core::{stage_fn, MemoryStore, Pipeline, Release, Runner, RunStatus, StageOutput};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let pipeline = Pipeline::builder("hello")
//!     .stage("build", stage_fn(|_| async { Ok(StageOutput::json(serde_json::json!({"image": "app:v1"}))) }))
//!     .stage("deploy", stage_fn(|cx| async move {
//!         let image = cx.require_output("build")?.get_str("image").unwrap_or_default().to_string();
//!         cx.log(format!("deploying {image}"));
//!         Ok(StageOutput::empty())
//!     }))
//!     .needs(["build"])
//!     .build()?;
//!
//! let report = Runner::new(Arc::new(MemoryStore::new()))
//!     .concurrency(4)
//!     .run(&pipeline, Release::new("v1"))
//!     .await?;
//! assert_eq!(report.status, RunStatus::Succeeded);
//! println!("{report}");
//! # Ok::<(), cd_core::Error>(())
//! # }).unwrap();
//! ```
#![forbid(unsafe_code)]

pub mod approval;
pub mod clock;
pub mod conformance;
pub mod deploy;
pub mod error;
pub mod event;
pub mod incident;
pub mod lease;
pub mod memory_deployer;
pub mod monitor;
pub mod pipeline;
pub mod report;
pub mod runner;
pub mod secret;
pub mod stage;
pub mod store;
pub mod strategy;
pub mod telemetry;
pub mod types;

pub use deploy::{DeployContext, Deployer, DeployerCapabilities, Router, WeightedRouter};
pub use error::{Error, ErrorInfo, ErrorKind, Result};
pub use event::{
    CollectingSink, Emitter, Event, EventKind, EventSink, FnSink, LogLevel, RunStatus, TracingSink,
};
pub use incident::{
    IncidentRecord, IncidentStatus, Notification, NotificationKind, Notifications, Notifier,
    Severity,
};
pub use lease::{EnvironmentLease, LockSettings};
pub use memory_deployer::MemoryDeployer;
pub use monitor::{
    Analysis, AnalysisOutcome, Monitor, MonitorContext, NoDataPolicy, Sample, SampleStatus,
};
pub use pipeline::{NodeKind, NodeSpec, Pipeline, PipelineBuilder, PipelineError};
pub use report::{NodeReport, RunReport};
pub use runner::{RetryPolicy, Runner};
pub use secret::{Redactor, Secret};
pub use stage::{
    gate_fn, stage_fn, Capabilities, FnGate, FnStage, Gate, Stage, StageContext, StageOutput,
    Verdict,
};
pub use store::{
    ApprovalRecord, Decision, Lease, LockAttempt, LockRequest, MemoryStore, NodeRecord, NodeStatus,
    ReleaseDocument, ReleaseRecord, ReleaseStatus, RunRecord, Store, TargetRecord,
};
pub use strategy::{BlueGreen, Canary, Rolling, RolloutReport, Strategy, TrafficCanary};
pub use types::{Artifact, Change, ChangeAction, Plan, Release, ReleaseSecrets, Revision, Target};

/// Everything a pipeline author usually needs, in one import.
pub mod prelude {
    pub use crate::{
        gate_fn, stage_fn, Analysis, AnalysisOutcome, BlueGreen, Canary, Capabilities,
        DeployContext, Deployer, Error, ErrorKind, Event, EventKind, EventSink, Gate,
        MemoryDeployer, MemoryStore, Monitor, MonitorContext, Pipeline, Plan, Release, Result,
        Revision, Rolling, RunReport, RunStatus, Runner, Sample, Secret, Stage, StageContext,
        StageOutput, Store, Strategy, Target, Verdict,
    };
}
