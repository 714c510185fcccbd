//! # cd
//!
//! Continuous delivery as a library: pipelines, gates, approvals, progressive
//! rollouts with automatic rollback, an audit trail — linked into your own
//! deploy binary, with no server to run.
//!
//! This facade re-exports [`cd_core`] (traits, pipeline, runner, strategies),
//! [`cd_stages`] (built-in stages and gates) and [`cd_backends`] (deployers
//! and stores; cargo features choose which: `local`, `sqlite`, `ssh`,
//! `terraform`, `ansible`).
//!
//! ```
//! use std::sync::Arc;
//! use cd::prelude::*;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let pipeline = Pipeline::builder("hello")
//!     .stage("greet", stage_fn(|cx| async move {
//!         cx.log(format!("delivering {}", cx.release().version));
//!         Ok(StageOutput::empty())
//!     }))
//!     .build()?;
//! let report = Runner::new(Arc::new(MemoryStore::new()))
//!     .run(&pipeline, Release::new("v1"))
//!     .await?;
//! assert_eq!(report.status, RunStatus::Succeeded);
//! # Ok::<(), cd::core::Error>(())
//! # }).unwrap();
//! ```
#![forbid(unsafe_code)]

pub use cd_backends as backends;
pub use cd_core as core;
pub use cd_stages as stages;

#[cfg(feature = "sqlite")]
pub mod cli;
#[cfg(feature = "prometheus-exporter")]
pub mod telemetry;
#[cfg(feature = "web")]
pub mod web;

/// The attribute the `Stage`, `Gate`, `Deployer`, `Monitor` and `Router`
/// traits are written with: implement them as `#[cd::async_trait]`.
pub use async_trait::async_trait;
/// The cancellation token runs and deployers share
/// ([`cd_core::Runner::cancel_token`], [`cd_core::DeployContext::cancel`]).
pub use tokio_util::sync::CancellationToken;

/// One import for pipeline authors: core types, built-in stages and the
/// backends enabled by features.
pub mod prelude {
    pub use crate::{async_trait, CancellationToken};
    pub use cd_core::prelude::*;
    pub use cd_stages::{Deploy, Restore};

    #[cfg(feature = "ansible")]
    pub use cd_backends::ansible::AnsibleDeployer;
    #[cfg(feature = "local")]
    pub use cd_backends::local::{LocalProcessDeployer, LocalRouter};
    #[cfg(feature = "sqlite")]
    pub use cd_backends::sqlite::SqliteStore;
    #[cfg(feature = "ssh")]
    pub use cd_backends::ssh::SshDeployer;
    #[cfg(feature = "terraform")]
    pub use cd_backends::terraform::TerraformDeployer;
}
