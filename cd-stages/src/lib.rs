//! # cd-stages
//!
//! Built-in stages, gates and monitors for `cd` pipelines.
//!
//! | step of delivery | here |
//! |---|---|
//! | regression / smoke testing | [`HttpCheck`] |
//! | HTTP client (checks, monitors, load) | [`http`] |
#![forbid(unsafe_code)]

pub mod check;
pub mod deploy;
pub mod http;
pub mod source;

#[cfg(test)]
pub(crate) mod test_server;

pub use check::{HttpCheck, HttpCheckSummary, HttpProbe, ProbeResult};
pub use deploy::{Deploy, DeployOutput};
pub use http::{HttpClient, HttpError};
pub use source::UrlSource;
