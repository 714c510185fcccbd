//! Monitors and analysis: is the new release healthy?

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::event::{Emitter, EventKind};
use crate::types::{Release, Target};

/// How one sample looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleStatus {
    /// Healthy.
    Ok,
    /// Unhealthy (a threshold was crossed, a check failed).
    Failing,
    /// Nothing to judge by (no series, no requests). Never a silent pass.
    NoData,
}

impl SampleStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleStatus::Ok => "ok",
            SampleStatus::Failing => "failing",
            SampleStatus::NoData => "no_data",
        }
    }
}

/// One measurement from a [`Monitor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// How it looked.
    pub status: SampleStatus,
    /// The measured value, if there is one.
    pub value: Option<f64>,
    /// For a person: what was measured and against what.
    pub detail: String,
}

impl Sample {
    /// A healthy sample.
    pub fn ok(value: Option<f64>, detail: impl Into<String>) -> Self {
        Sample {
            status: SampleStatus::Ok,
            value,
            detail: detail.into(),
        }
    }

    /// An unhealthy sample.
    pub fn failing(value: Option<f64>, detail: impl Into<String>) -> Self {
        Sample {
            status: SampleStatus::Failing,
            value,
            detail: detail.into(),
        }
    }

    /// A sample with nothing to judge by.
    pub fn no_data(detail: impl Into<String>) -> Self {
        Sample {
            status: SampleStatus::NoData,
            value: None,
            detail: detail.into(),
        }
    }
}

/// What a monitor is asked about.
///
/// A canary judge compares the `targets` (serving the new release since
/// `since`) with the `baseline` (still serving the previous one); when there
/// is no baseline left (a canary's last step), with the same targets before
/// `rollout_started`.
#[derive(Debug, Clone)]
pub struct MonitorContext {
    /// The targets under analysis (a canary's share, a new slot).
    pub targets: Vec<Target>,
    /// Targets still on the previous release, to compare with (a canary's
    /// remaining targets, a rolling update's later batches, the live slot).
    /// Empty for a bake.
    pub baseline: Vec<Target>,
    /// When the `targets` began serving the release (this step's switch).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// When the rollout began (before any target switched).
    pub rollout_started: Option<chrono::DateTime<chrono::Utc>>,
    /// The release under analysis.
    pub release: Release,
    /// Where to report.
    pub events: Emitter,
    /// Fires when the run is cancelled.
    pub cancel: CancellationToken,
}

impl MonitorContext {
    /// A context for `targets` and `release`, without baseline or times.
    pub fn new(
        targets: Vec<Target>,
        release: Release,
        events: Emitter,
        cancel: CancellationToken,
    ) -> Self {
        MonitorContext {
            targets,
            baseline: Vec::new(),
            since: None,
            rollout_started: None,
            release,
            events,
            cancel,
        }
    }
}

/// Measures health: HTTP checks, Prometheus queries, log scans.
#[async_trait]
pub trait Monitor: Send + Sync + 'static {
    /// A short name (`http http://.../health`, `prometheus error_rate`).
    fn name(&self) -> String;

    /// Takes one sample.
    async fn sample(&self, cx: &MonitorContext) -> Result<Sample>;
}

#[async_trait]
impl<M: Monitor + ?Sized> Monitor for Arc<M> {
    fn name(&self) -> String {
        (**self).name()
    }
    async fn sample(&self, cx: &MonitorContext) -> Result<Sample> {
        (**self).sample(cx).await
    }
}

/// What an analysis concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum AnalysisOutcome {
    /// Healthy.
    Pass,
    /// Unhealthy.
    Fail(String),
    /// Not enough to judge by. Strategies treat it as a failure unless told
    /// otherwise: no data is never a silent pass.
    Inconclusive(String),
}

impl AnalysisOutcome {
    /// Whether it passed.
    pub fn is_pass(&self) -> bool {
        matches!(self, AnalysisOutcome::Pass)
    }
}

impl fmt::Display for AnalysisOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnalysisOutcome::Pass => f.write_str("pass"),
            AnalysisOutcome::Fail(r) => write!(f, "fail: {r}"),
            AnalysisOutcome::Inconclusive(r) => write!(f, "inconclusive: {r}"),
        }
    }
}

/// What a sample without data does to an [`Analysis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDataPolicy {
    /// Counts toward `inconclusive_limit`: too many, or no healthy sample at
    /// all, make the analysis inconclusive (the default; never a pass).
    #[default]
    Inconclusive,
    /// Counts as a failing sample (toward `failure_limit`).
    CountAsFailure,
    /// Fails the analysis at once.
    Fail,
}

/// Turns samples into a verdict, in the manner of Argo Rollouts' analysis:
/// `count` samples `interval` apart; more than `failure_limit` failing samples
/// fail it; more than `consecutive_error_limit` monitor errors in a row fail
/// it; more than `inconclusive_limit` no-data samples, or no healthy sample at
/// all, make it inconclusive.
///
/// ```
/// use std::time::Duration;
/// use cd_core::Analysis;
/// let a = Analysis::new().count(5).interval(Duration::from_secs(2)).failure_limit(1);
/// assert_eq!(a.total_duration(), Duration::from_secs(8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// Time between samples.
    pub interval: Duration,
    /// How many samples.
    pub count: u32,
    /// Failing samples tolerated.
    pub failure_limit: u32,
    /// Monitor errors in a row tolerated.
    pub consecutive_error_limit: u32,
    /// No-data samples tolerated.
    pub inconclusive_limit: u32,
    /// Wait before the first sample (Argo Rollouts' `initialDelay`): lets
    /// metrics of the new release accumulate.
    #[serde(default)]
    pub initial_delay: Duration,
    /// What a no-data sample does.
    #[serde(default)]
    pub no_data: NoDataPolicy,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            interval: Duration::from_secs(5),
            count: 3,
            failure_limit: 0,
            consecutive_error_limit: 2,
            inconclusive_limit: 0,
            initial_delay: Duration::ZERO,
            no_data: NoDataPolicy::Inconclusive,
        }
    }
}

impl Analysis {
    /// Defaults: 3 samples 5 s apart, no failure tolerated, 2 errors in a row tolerated.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the interval.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }

    /// Sets the sample count (at least 1).
    pub fn count(mut self, n: u32) -> Self {
        self.count = n.max(1);
        self
    }

    /// Sets the failing samples tolerated.
    pub fn failure_limit(mut self, n: u32) -> Self {
        self.failure_limit = n;
        self
    }

    /// Sets the monitor errors in a row tolerated.
    pub fn consecutive_error_limit(mut self, n: u32) -> Self {
        self.consecutive_error_limit = n;
        self
    }

    /// Sets the no-data samples tolerated.
    pub fn inconclusive_limit(mut self, n: u32) -> Self {
        self.inconclusive_limit = n;
        self
    }

    /// Sets what a no-data sample does (default: inconclusive).
    pub fn no_data(mut self, policy: NoDataPolicy) -> Self {
        self.no_data = policy;
        self
    }

    /// Sets the wait before the first sample.
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// Time from the start to the last sample (the initial delay included).
    pub fn total_duration(&self) -> Duration {
        self.initial_delay
            .saturating_add(self.interval.saturating_mul(self.count.saturating_sub(1)))
    }

    /// Samples `monitor` and concludes. Emits one event per sample. Returns
    /// an error only when cancelled.
    pub async fn run(&self, monitor: &dyn Monitor, cx: &MonitorContext) -> Result<AnalysisOutcome> {
        let name = monitor.name();
        let (mut ok, mut failing, mut no_data, mut errors_in_row) = (0u32, 0u32, 0u32, 0u32);
        let mut last_failure = String::new();
        if !self.initial_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.initial_delay) => {}
                _ = cx.cancel.cancelled() => return Err(Error::cancelled()),
            }
        }
        for i in 0..self.count.max(1) {
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = cx.cancel.cancelled() => return Err(Error::cancelled()),
                }
            }
            let sample = tokio::select! {
                s = monitor.sample(cx) => s,
                _ = cx.cancel.cancelled() => return Err(Error::cancelled()),
            };
            match sample {
                Ok(s) => {
                    errors_in_row = 0;
                    cx.events.emit(EventKind::AnalysisSample {
                        monitor: name.clone(),
                        status: s.status.as_str().into(),
                        value: s.value,
                        detail: s.detail.clone(),
                    });
                    match s.status {
                        SampleStatus::Ok => ok += 1,
                        SampleStatus::Failing => {
                            failing += 1;
                            last_failure = s.detail;
                        }
                        SampleStatus::NoData => match self.no_data {
                            NoDataPolicy::Inconclusive => no_data += 1,
                            NoDataPolicy::CountAsFailure => {
                                failing += 1;
                                last_failure = format!("no data: {}", s.detail);
                            }
                            NoDataPolicy::Fail => {
                                return Ok(AnalysisOutcome::Fail(format!(
                                    "{name}: no data (no-data policy: fail): {}",
                                    s.detail
                                )));
                            }
                        },
                    }
                }
                Err(e) => {
                    if e.kind() == crate::ErrorKind::Cancelled {
                        return Err(e);
                    }
                    errors_in_row += 1;
                    cx.events.emit(EventKind::AnalysisSample {
                        monitor: name.clone(),
                        status: "error".into(),
                        value: None,
                        detail: e.to_string(),
                    });
                    if errors_in_row > self.consecutive_error_limit {
                        return Ok(AnalysisOutcome::Fail(format!(
                            "{name}: {errors_in_row} errors in a row, last: {e}"
                        )));
                    }
                }
            }
            if failing > self.failure_limit {
                return Ok(AnalysisOutcome::Fail(format!(
                    "{name}: {failing} failing sample(s) > limit {}: {last_failure}",
                    self.failure_limit
                )));
            }
        }
        if no_data > self.inconclusive_limit {
            return Ok(AnalysisOutcome::Inconclusive(format!(
                "{name}: {no_data} sample(s) without data"
            )));
        }
        if ok == 0 && failing > 0 {
            // Failures within the limit, but nothing healthy to weigh them
            // against: never a pass, not even an inconclusive one.
            return Ok(AnalysisOutcome::Fail(format!(
                "{name}: no healthy sample, {failing} failing: {last_failure}"
            )));
        }
        if ok == 0 {
            return Ok(AnalysisOutcome::Inconclusive(format!(
                "{name}: no healthy sample"
            )));
        }
        Ok(AnalysisOutcome::Pass)
    }
}
