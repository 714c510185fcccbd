//! Serving the pipeline's own metrics ([`cd_core::telemetry`]) to
//! Prometheus, with `metrics-exporter-prometheus` (feature
//! `prometheus-exporter`).
//!
//! ```no_run
//! # async fn demo() -> cd::core::Result<()> {
//! // Prometheus scrapes http://<host>:9464/metrics from now on.
//! cd::telemetry::serve_prometheus("0.0.0.0:9464".parse().unwrap())?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;

use cd_core::{Error, ErrorKind, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Histogram buckets for the `_seconds` metrics, in seconds: from 5 ms (a
/// quick stage) to one hour (a long bake or approval wait).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Installs the process-wide metrics recorder and an HTTP listener at
/// `addr` answering every `GET` with the metrics in Prometheus' text format
/// (histograms as real histograms with [`SECONDS_BUCKETS`]). Spawns the
/// listener on the current Tokio runtime, or on a thread of its own outside
/// one. Call it once per process.
///
/// Errors: [`ErrorKind::Conflict`] when a recorder is already installed,
/// [`ErrorKind::Unavailable`] when the address cannot be bound.
pub fn serve_prometheus(addr: SocketAddr) -> Result<()> {
    let builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| Error::invalid(format!("metrics buckets: {e}")))?;
    builder.install().map_err(|e| {
        let msg = e.to_string();
        let kind = if msg.contains("recorder") {
            ErrorKind::Conflict
        } else {
            ErrorKind::Unavailable
        };
        Error::new(kind, format!("cannot serve metrics at {addr}: {msg}")).with("address", addr)
    })?;
    cd_core::telemetry::describe();
    Ok(())
}
