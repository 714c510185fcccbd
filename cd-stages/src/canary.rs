//! `CanaryAnalysis`: the [`CanaryJudge`] as the judge of a [`Canary`],
//! [`Rolling`] or [`BlueGreen`] rollout, on metrics from Prometheus.
//!
//! Each sample of the analysis runs one range query per metric
//! (`/api/v1/query_range`, every point of every series is one
//! observation) twice:
//!
//! - **canary**: the query with `{{targets}}` = the targets under analysis,
//!   over the last `lookback`, but never from before they switched (the
//!   step's `since`): old-release points do not dilute the canary;
//! - **baseline**: the same query with `{{targets}}` = the targets still on
//!   the previous release, over the same window; when none is left (a
//!   canary's last step), the canary targets themselves over the `lookback`
//!   before the rollout began: the fleet after the release against the
//!   fleet before it.
//!
//! The judge then compares them metric by metric (Mann-Whitney U,
//! Hodges-Lehmann shift; see [`crate::judge`]). The sample is `Ok` when the
//! score reaches the pass threshold, `Failing` below it (a marginal score
//! fails too, unless [`CanaryAnalysis::marginal_passes`]), and `NoData`
//! when the judge is inconclusive. Every judgement is emitted as a
//! `canary_judgement` event (the full [`JudgeReport`]: per metric its
//! classification, p-value, shift and interval, medians, counts, reason).
//!
//! [`Canary`]: cd_core::Canary
//! [`Rolling`]: cd_core::Rolling
//! [`BlueGreen`]: cd_core::BlueGreen
//!
//! ```
//! use std::time::Duration;
//! use cd_core::{Analysis, Canary};
//! use cd_stages::canary::CanaryAnalysis;
//! use cd_stages::judge::{Direction, Metric};
//! use cd_stages::prometheus::Prometheus;
//! let judge = CanaryAnalysis::new(Prometheus::new("http://prometheus:9090"))
//!     .metric(
//!         Metric::new("latency p50").direction(Direction::Increase).critical(true),
//!         r#"demo_latency_ms{target=~"{{targets}}"}"#,
//!     )
//!     .window(Duration::from_secs(30), Duration::from_secs(1));
//! let canary = Canary::new([25, 50, 100])
//!     .analysis(judge, Analysis::new().count(1).interval(Duration::from_secs(1)));
//! # let _ = canary;
//! ```

use std::time::Duration;

use async_trait::async_trait;
use cd_core::{Error, EventKind, Monitor, MonitorContext, Result, Sample, Target};
use chrono::{DateTime, Utc};

use crate::judge::{CanaryJudge, JudgeReport, Metric, Verdict};
use crate::prometheus::{render_query, Prometheus};

/// The canary judge on Prometheus metrics; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct CanaryAnalysis {
    prometheus: Prometheus,
    queries: Vec<(String, String)>,
    judge: CanaryJudge,
    lookback: Duration,
    step: Duration,
    marginal_passes: bool,
}

/// The `canary_judgement` event's name.
pub const JUDGEMENT_EVENT: &str = "canary_judgement";

impl CanaryAnalysis {
    /// A judge querying `prometheus`: no metric yet, a 60 s window with a
    /// point every 5 s, Kayenta's defaults for the judge (98% confidence,
    /// pass at 75, marginal at 50).
    pub fn new(prometheus: Prometheus) -> Self {
        CanaryAnalysis {
            prometheus,
            queries: Vec::new(),
            judge: CanaryJudge::new(),
            lookback: Duration::from_secs(60),
            step: Duration::from_secs(5),
            marginal_passes: false,
        }
    }

    /// Judges `metric`, measured by the PromQL `query` (templated as
    /// [`render_query`] says; `{{targets}}` selects canary or baseline).
    pub fn metric(mut self, metric: Metric, query: impl Into<String>) -> Self {
        self.queries.push((metric.name.clone(), query.into()));
        self.judge = self.judge.metric(metric);
        self
    }

    /// Replaces the judge's settings (weights, thresholds, confidence)
    /// keeping the metrics added with [`CanaryAnalysis::metric`].
    pub fn configure(mut self, f: impl FnOnce(CanaryJudge) -> CanaryJudge) -> Self {
        self.judge = f(self.judge);
        self
    }

    /// The window each sample looks back over, and the resolution (the
    /// range query's `step`, at least 1 ms).
    pub fn window(mut self, lookback: Duration, step: Duration) -> Self {
        self.lookback = lookback;
        self.step = step.max(Duration::from_millis(1));
        self
    }

    /// Lets a marginal score pass (default: it fails the sample).
    pub fn marginal_passes(mut self, yes: bool) -> Self {
        self.marginal_passes = yes;
        self
    }

    /// The judge.
    pub fn judge(&self) -> &CanaryJudge {
        &self.judge
    }

    async fn values(
        &self,
        template: &str,
        version: &str,
        targets: &[Target],
        window: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<Vec<f64>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let promql = render_query(template, version, targets)?;
        let series = self
            .prometheus
            .query_range(&promql, window.0, window.1, self.step)
            .await?;
        Ok(series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .collect())
    }

    /// Queries baseline and canary and judges them now.
    ///
    /// Errors: Prometheus' (see [`Prometheus::query_range`]); an
    /// [`cd_core::ErrorKind::Invalid`] for a release version the version
    /// rule refuses.
    pub async fn judge_now(&self, cx: &MonitorContext) -> Result<JudgeReport> {
        self.prometheus.hide_secrets(cx.events.redactor());
        let now = Utc::now();
        let lookback = chrono::Duration::from_std(self.lookback).unwrap_or(chrono::Duration::MAX);
        let mut from = now - lookback;
        if let Some(since) = cx.since {
            from = from.max(since);
        }
        let canary_window = (from, now);
        let (baseline_targets, baseline_window) = if cx.baseline.is_empty() {
            // No target left on the previous release: the same targets
            // before the rollout.
            let before = cx.rollout_started.or(cx.since).unwrap_or(now);
            (&cx.targets, (before - lookback, before))
        } else {
            (&cx.baseline, canary_window)
        };
        let version = &cx.release.version;
        let mut samples = Vec::with_capacity(self.queries.len());
        for (name, template) in &self.queries {
            let canary = self
                .values(template, version, &cx.targets, canary_window)
                .await
                .map_err(|e| e.with("metric", name))?;
            let baseline = self
                .values(template, version, baseline_targets, baseline_window)
                .await
                .map_err(|e| e.with("metric", name))?;
            samples.push((name.as_str(), baseline, canary));
        }
        let refs: Vec<(&str, &[f64], &[f64])> = samples
            .iter()
            .map(|(n, b, c)| (*n, b.as_slice(), c.as_slice()))
            .collect();
        Ok(self.judge.judge(&refs))
    }
}

#[async_trait]
impl Monitor for CanaryAnalysis {
    fn name(&self) -> String {
        format!(
            "canary judge ({})",
            self.queries
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    async fn sample(&self, cx: &MonitorContext) -> Result<Sample> {
        if self.queries.is_empty() {
            return Err(Error::invalid(
                "the canary judge has no metric: add one with CanaryAnalysis::metric",
            ));
        }
        let report = self.judge_now(cx).await?;
        if let Ok(data) = serde_json::to_value(&report) {
            cx.events.emit(EventKind::Custom {
                name: JUDGEMENT_EVENT.into(),
                data,
            });
        }
        let reasons = report.reasons();
        let detail = format!(
            "score {:.0}/100 ({}){}",
            report.score,
            report.verdict,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", reasons.replace('\n', "; "))
            }
        );
        Ok(match report.verdict {
            Verdict::Pass => Sample::ok(Some(report.score), detail),
            Verdict::Marginal if self.marginal_passes => Sample::ok(Some(report.score), detail),
            Verdict::Marginal | Verdict::Fail => Sample::failing(Some(report.score), detail),
            Verdict::Inconclusive => Sample::no_data(detail),
        })
    }
}
