//! # cd-stages
//!
//! Built-in stages, gates and monitors for `cd` pipelines, one per step of
//! delivery that needs no outside tool:
//!
//! | step of delivery | here |
//! |---|---|
//! | regression / smoke testing | [`HttpCheck`]: requests and the status and body each must return |
//! | performance testing | [`LoadTest`]: N requests at concurrency C, p50/p95/p99, thresholds |
//! | compliance checking | [`ComplianceCheck`]: version rules, artifact checksum, required config |
//! | deployment | [`Deploy`]: a rollout strategy over any deployer, recorded in the release history |
//! | human approval | [`ApprovalGate`]: any of a list of people, four eyes, durable in the store |
//! | monitoring | [`HttpMonitor`] (a [`cd_core::Monitor`]) and [`Bake`] (bake time with analysis) |
//! | plumbing | [`http`]: a small HTTP/1.1 client; [`UrlSource`]: URLs read from upstream outputs |
//!
//! Every stage is a value you build, test and replace with your own type.
//! Stages that talk to a service take its URL directly or from an upstream
//! node's output (`HttpCheck::base_url_from("staging", "url")`).
//!
//! ```
//! use std::sync::Arc;
//! use cd_core::{Gate, MemoryStore, Release, Stage, StageContext, Verdict};
//! use cd_stages::{ApprovalGate, ComplianceCheck, HttpCheck, LoadTest};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // The nodes of a delivery pipeline (see cd_core::Pipeline to wire them).
//! let smoke = HttpCheck::base_url_from("staging", "url").get("/health").expect("/admin", 403);
//! let perf = LoadTest::get_from("staging", "url").requests(200).concurrency(8).p95_below_ms(50);
//! let compliance = ComplianceCheck::new().version_pattern("v*");
//! let approval = ApprovalGate::any_of(["alice", "bob"]).auto_approve_as("demo");
//! # let _ = (smoke, perf);
//!
//! // Each runs on its own, too: here outside any runner.
//! let store = Arc::new(MemoryStore::new());
//! let cx = StageContext::detached("compliance", Release::new("v42"), store.clone());
//! let report = compliance.run(&cx).await?;
//! assert_eq!(report.get("failed"), Some(&serde_json::json!(0)));
//!
//! let cx = StageContext::detached("approval", Release::new("v42"), store.clone());
//! assert_eq!(approval.evaluate(&cx).await?, Verdict::Pass);
//! # Ok::<(), cd_core::Error>(())
//! # }).unwrap();
//! ```
#![forbid(unsafe_code)]

pub mod approval;
pub mod canary;
pub mod check;
pub mod compliance;
pub mod deploy;
pub mod http;
pub mod judge;
pub mod junit;
pub mod load;
pub mod monitor;
pub mod previous;
pub mod prometheus;
pub mod source;
pub mod stats;
pub mod testsuite;
pub mod tls;
pub mod webhook;
pub mod windows;

#[cfg(test)]
pub(crate) mod test_server;

pub use approval::ApprovalGate;
pub use check::{HttpCheck, HttpCheckSummary, HttpProbe, ProbeResult};
pub use compliance::{ComplianceCheck, ComplianceReport, RuleResult};
pub use deploy::{Deploy, DeployOutput, Restore};
pub use http::{HttpClient, HttpError};
pub use load::{LoadOptions, LoadReport, LoadTest};
pub use monitor::{Bake, HttpMonitor};
pub use source::UrlSource;
pub use testsuite::TestSuite;
pub use webhook::WebhookNotifier;
