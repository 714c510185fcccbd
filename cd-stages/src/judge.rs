//! A canary judge in the model of Spinnaker Kayenta's NetflixACAJudge:
//! each metric's canary samples are compared with the baseline's (the
//! Mann-Whitney U test, the Hodges-Lehmann shift with its 98% confidence
//! interval, the mean ratio as effect size), classified `High`, `Low`,
//! `Pass`, `NoData` or `Error`, and the classifications are scored 0–100 by
//! metric group.
//!
//! The classification follows Kayenta's `MannWhitneyClassifier` (kayenta-judge,
//! `classifiers/metric/MannWhitneyClassifier.scala`):
//! - too few samples (under [`Metric::min_samples`] on either side, after
//!   the NaN policy) → `NoData` (or a failure, for [`Metric::must_have_data`]);
//! - equal samples, or a single distinct value across both → `Pass`;
//! - with `b = tolerance · |shift|` (tolerance 0.25): **High** when the
//!   direction allows an increase, the interval's lower bound is above `b`
//!   and the mean ratio is at least [`Metric::allowed_increase`]; **Low**
//!   symmetrically; else `Pass`;
//! - a critical metric that is High (or Low) beyond its critical effect size
//!   fails the whole analysis alone.
//!
//! Scoring follows Kayenta's `WeightedSumScorer`: a failing critical metric,
//! or `NoData` for half the metrics or more, scores 0; otherwise each group
//! scores `100 · pass / (pass + high + low + nodata-failures)` and groups are
//! weighted (unweighted groups share what the weighted ones leave). The
//! verdict is `Pass` at or above the pass threshold (default 75), `Marginal`
//! at or above the marginal one (default 50), else `Fail`.
//!
//! Differences from Kayenta, on purpose: the shift estimate is the median
//! of pairwise differences (the textbook Hodges-Lehmann estimator; Kayenta
//! finds the root of the continuity-corrected z function instead) and its
//! interval comes from order statistics of those differences
//! ([`crate::stats::hodges_lehmann`]); a degenerate sample (one distinct
//! value per side) needs no added noise.
//!
//! ```
//! use cd_stages::judge::{CanaryJudge, Direction, Metric, Classification, Verdict};
//! let judge = CanaryJudge::new()
//!     .metric(Metric::new("latency_ms").direction(Direction::Increase).critical(true));
//! let baseline = [10.0, 11.0, 9.5, 10.2, 10.8, 9.9, 10.4, 10.1, 10.6, 9.7];
//! let canary = [15.0, 16.2, 14.8, 15.5, 15.1, 16.0, 14.9, 15.7, 15.3, 15.9];
//! let report = judge.judge(&[("latency_ms", &baseline[..], &canary[..])]);
//! assert_eq!(report.verdict, Verdict::Fail);
//! assert_eq!(report.metrics[0].classification, Classification::High);
//! assert!(report.reasons().contains("latency_ms"));
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::stats::{hodges_lehmann, mann_whitney_u, median, Shift};

/// Which change of a metric is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A higher canary value is bad (latency, errors).
    Increase,
    /// A lower canary value is bad (throughput, success rate).
    Decrease,
    /// Either change is bad.
    Either,
}

/// What to do with NaN samples (a query's division by zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Drop them (Kayenta's default).
    Remove,
    /// Count them as 0.
    Replace,
}

/// One metric's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Its name, as the samples are given.
    pub name: String,
    /// Its group, for scoring (default: its name).
    pub group: String,
    /// Which change is bad (default `Either`).
    pub direction: Direction,
    /// Fails the whole analysis alone when it is High or Low beyond its
    /// critical effect size.
    pub critical: bool,
    /// Missing data is a failure of this metric, not `NoData`.
    pub must_have_data: bool,
    /// NaN samples (default `Remove`).
    pub nan: NanPolicy,
    /// Fewer samples than this on either side is `NoData` (default 3).
    pub min_samples: usize,
    /// The smallest canary/baseline mean ratio that counts as an increase
    /// (default 1.0: any significant increase).
    pub allowed_increase: f64,
    /// The largest mean ratio that counts as a decrease (default 1.0).
    pub allowed_decrease: f64,
    /// The mean ratio from which a High critical metric fails the analysis
    /// (default 1.0).
    pub critical_increase: f64,
    /// The mean ratio up to which a Low critical metric fails the analysis
    /// (default 1.0).
    pub critical_decrease: f64,
}

impl Metric {
    /// A metric with the defaults.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Metric {
            group: name.clone(),
            name,
            direction: Direction::Either,
            critical: false,
            must_have_data: false,
            nan: NanPolicy::Remove,
            min_samples: 3,
            allowed_increase: 1.0,
            allowed_decrease: 1.0,
            critical_increase: 1.0,
            critical_decrease: 1.0,
        }
    }

    /// Which change is bad.
    pub fn direction(mut self, d: Direction) -> Self {
        self.direction = d;
        self
    }

    /// Its scoring group.
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = g.into();
        self
    }

    /// Whether it fails the whole analysis alone.
    pub fn critical(mut self, yes: bool) -> Self {
        self.critical = yes;
        self
    }

    /// Whether missing data is a failure.
    pub fn must_have_data(mut self, yes: bool) -> Self {
        self.must_have_data = yes;
        self
    }

    /// What to do with NaN samples.
    pub fn nan(mut self, p: NanPolicy) -> Self {
        self.nan = p;
        self
    }

    /// The fewest samples per side.
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n.max(1);
        self
    }

    /// Effect-size thresholds (mean ratios): an increase counts from
    /// `increase`, a decrease up to `decrease`.
    pub fn effect_size(mut self, increase: f64, decrease: f64) -> Self {
        self.allowed_increase = increase;
        self.allowed_decrease = decrease;
        self
    }

    /// Critical effect sizes (mean ratios).
    pub fn critical_effect_size(mut self, increase: f64, decrease: f64) -> Self {
        self.critical_increase = increase;
        self.critical_decrease = decrease;
        self
    }
}

/// How a metric compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// No significant bad change.
    Pass,
    /// Significantly higher in the canary.
    High,
    /// Significantly lower in the canary.
    Low,
    /// Too few samples to judge (inconclusive).
    NoData,
    /// Too few samples for a metric that must have data: a failure.
    NoDataFailure,
}

/// One metric's verdict and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricResult {
    /// The metric.
    pub name: String,
    /// Its group.
    pub group: String,
    /// The classification.
    pub classification: Classification,
    /// Whether it failed the analysis alone.
    pub critical_failure: bool,
    /// The Mann-Whitney two-sided p-value (none without data).
    pub p_value: Option<f64>,
    /// The canary − baseline shift (Hodges-Lehmann) and its interval.
    pub shift: Option<Shift>,
    /// Baseline and canary medians.
    pub baseline_median: Option<f64>,
    /// The canary's median.
    pub canary_median: Option<f64>,
    /// Samples used (after the NaN policy).
    pub baseline_count: usize,
    /// Canary samples used.
    pub canary_count: usize,
    /// The canary/baseline mean ratio (the effect size), when defined.
    pub mean_ratio: Option<f64>,
    /// A sentence for a person.
    pub reason: String,
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// At or above the pass threshold.
    Pass,
    /// Between the marginal and the pass threshold.
    Marginal,
    /// Below the marginal threshold, or a critical metric failed.
    Fail,
    /// Half the metrics or more had no data.
    Inconclusive,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Marginal => "marginal",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

/// The judgement of one canary analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    /// 0–100.
    pub score: f64,
    /// The verdict.
    pub verdict: Verdict,
    /// Every metric, in the order judged.
    pub metrics: Vec<MetricResult>,
}

impl JudgeReport {
    /// The reasons of every metric that did not pass, one per line.
    pub fn reasons(&self) -> String {
        self.metrics
            .iter()
            .filter(|m| m.classification != Classification::Pass)
            .map(|m| format!("{}: {}", m.name, m.reason))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The judge: metric settings, group weights and thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryJudge {
    metrics: Vec<Metric>,
    weights: BTreeMap<String, f64>,
    pass: f64,
    marginal: f64,
    confidence: f64,
    tolerance: f64,
}

impl Default for CanaryJudge {
    fn default() -> Self {
        Self::new()
    }
}

impl CanaryJudge {
    /// No metrics yet; pass at 75, marginal at 50, 98% confidence, tolerance
    /// 0.25 (Kayenta's judge settings).
    pub fn new() -> Self {
        CanaryJudge {
            metrics: Vec::new(),
            weights: BTreeMap::new(),
            pass: 75.0,
            marginal: 50.0,
            confidence: 0.98,
            tolerance: 0.25,
        }
    }

    /// Adds a metric.
    pub fn metric(mut self, m: Metric) -> Self {
        self.metrics.push(m);
        self
    }

    /// A group's weight, in points of 100.
    pub fn weight(mut self, group: impl Into<String>, w: f64) -> Self {
        self.weights.insert(group.into(), w.max(0.0));
        self
    }

    /// The pass and marginal score thresholds (0–100).
    pub fn thresholds(mut self, pass: f64, marginal: f64) -> Self {
        self.pass = pass;
        self.marginal = marginal.min(pass);
        self
    }

    /// The confidence level of the shift's interval (default 0.98).
    pub fn confidence(mut self, c: f64) -> Self {
        self.confidence = c.clamp(0.5, 0.9999);
        self
    }

    /// The configured metrics.
    pub fn metrics(&self) -> &[Metric] {
        &self.metrics
    }

    /// Judges `(metric, baseline samples, canary samples)` for every
    /// configured metric; a configured metric missing from `samples` has no
    /// data.
    pub fn judge(&self, samples: &[(&str, &[f64], &[f64])]) -> JudgeReport {
        let results: Vec<MetricResult> = self
            .metrics
            .iter()
            .map(|m| {
                let (b, c) = samples
                    .iter()
                    .find(|(n, _, _)| *n == m.name)
                    .map(|(_, b, c)| (b.to_vec(), c.to_vec()))
                    .unwrap_or_default();
                self.classify(m, &b, &c)
            })
            .collect();
        self.score(results)
    }

    fn classify(&self, m: &Metric, baseline: &[f64], canary: &[f64]) -> MetricResult {
        let clean = |v: &[f64]| -> Vec<f64> {
            match m.nan {
                NanPolicy::Remove => v.iter().copied().filter(|x| !x.is_nan()).collect(),
                NanPolicy::Replace => v
                    .iter()
                    .map(|x| if x.is_nan() { 0.0 } else { *x })
                    .collect(),
            }
        };
        let (b, c) = (clean(baseline), clean(canary));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let mut r = MetricResult {
            name: m.name.clone(),
            group: m.group.clone(),
            classification: Classification::Pass,
            critical_failure: false,
            p_value: None,
            shift: None,
            baseline_median: median(&b),
            canary_median: median(&c),
            baseline_count: b.len(),
            canary_count: c.len(),
            mean_ratio: None,
            reason: String::new(),
        };
        if b.len() < m.min_samples || c.len() < m.min_samples {
            r.classification = if m.must_have_data {
                Classification::NoDataFailure
            } else {
                Classification::NoData
            };
            r.critical_failure = m.critical && m.must_have_data;
            r.reason = format!(
                "too few samples to judge: {} baseline, {} canary (at least {} each)",
                b.len(),
                c.len(),
                m.min_samples
            );
            return r;
        }
        let (mb, mc) = (mean(&b), mean(&c));
        r.mean_ratio = (mb != 0.0 && mc != 0.0)
            .then(|| mc / mb)
            .filter(|x| x.is_finite());
        let mut sb = b.clone();
        let mut sc = c.clone();
        sb.sort_by(f64::total_cmp);
        sc.sort_by(f64::total_cmp);
        let one_value =
            sb.first() == sb.last() && sc.first() == sc.last() && sb.first() == sc.first();
        if sb == sc || one_value {
            r.p_value = Some(1.0);
            r.reason = "the canary's samples equal the baseline's".into();
            return r;
        }
        let mw = mann_whitney_u(&c, &b);
        let shift = hodges_lehmann(&b, &c, self.confidence);
        r.p_value = mw.map(|x| x.p_value);
        r.shift = shift;
        let Some(s) = shift else {
            r.classification = Classification::NoData;
            r.reason = "no comparable samples".into();
            return r;
        };
        let bound = self.tolerance * s.estimate.abs();
        let ratio_ok = |limit: f64, up: bool| match r.mean_ratio {
            None => true,
            Some(e) if up => e >= limit,
            Some(e) => e <= limit,
        };
        let up = matches!(m.direction, Direction::Increase | Direction::Either);
        let down = matches!(m.direction, Direction::Decrease | Direction::Either);
        r.classification = if up && s.lower > bound && ratio_ok(m.allowed_increase, true) {
            Classification::High
        } else if down && s.upper < -bound && ratio_ok(m.allowed_decrease, false) {
            Classification::Low
        } else {
            Classification::Pass
        };
        r.critical_failure = m.critical
            && match r.classification {
                Classification::High => ratio_ok(m.critical_increase, true),
                Classification::Low => ratio_ok(m.critical_decrease, false),
                _ => false,
            };
        let pct = 100.0 * self.confidence;
        r.reason = match r.classification {
            Classification::High | Classification::Low => format!(
                "canary {} than baseline: median {} vs {}, shift {:+.4} ({pct:.0}% interval {:.4} to {:.4}), mean ratio {}, p = {:.4}{}",
                if r.classification == Classification::High { "higher" } else { "lower" },
                fmt_num(r.canary_median),
                fmt_num(r.baseline_median),
                s.estimate,
                s.lower,
                s.upper,
                fmt_num(r.mean_ratio),
                r.p_value.unwrap_or(1.0),
                if r.critical_failure { " — critical" } else { "" }
            ),
            _ => format!(
                "no significant bad change: shift {:+.4} ({pct:.0}% interval {:.4} to {:.4}), p = {:.4}",
                s.estimate,
                s.lower,
                s.upper,
                r.p_value.unwrap_or(1.0)
            ),
        };
        r
    }

    fn score(&self, metrics: Vec<MetricResult>) -> JudgeReport {
        let fail = |score: f64, verdict: Verdict, metrics: Vec<MetricResult>| JudgeReport {
            score,
            verdict,
            metrics,
        };
        if metrics.iter().any(|m| m.critical_failure) {
            return fail(0.0, Verdict::Fail, metrics);
        }
        let nodata = metrics
            .iter()
            .filter(|m| m.classification == Classification::NoData)
            .count();
        if metrics.is_empty() || 2 * nodata >= metrics.len() {
            return fail(0.0, Verdict::Inconclusive, metrics);
        }
        let mut groups: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for m in &metrics {
            let g = groups.entry(m.group.as_str()).or_default();
            match m.classification {
                Classification::Pass => {
                    g.0 += 1;
                    g.1 += 1;
                }
                Classification::High | Classification::Low | Classification::NoDataFailure => {
                    g.1 += 1
                }
                Classification::NoData => {}
            }
        }
        let weighted: f64 = groups.keys().filter_map(|g| self.weights.get(*g)).sum();
        let unweighted = groups
            .keys()
            .filter(|g| !self.weights.contains_key(**g))
            .count();
        let share = if unweighted == 0 {
            0.0
        } else {
            (100.0 - weighted).max(0.0) / unweighted as f64
        };
        let mut total = 0.0;
        for (g, (pass, counted)) in &groups {
            let s = if *counted == 0 {
                100.0
            } else {
                100.0 * *pass as f64 / *counted as f64
            };
            let w = self.weights.get(*g).copied().unwrap_or(share);
            total += s * w / 100.0;
        }
        let score = (total * 100.0).round() / 100.0;
        let verdict = if score >= self.pass {
            Verdict::Pass
        } else if score >= self.marginal {
            Verdict::Marginal
        } else {
            Verdict::Fail
        };
        JudgeReport {
            score,
            verdict,
            metrics,
        }
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        Some(x) => format!("{:.4}", x),
        None => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(shift: f64, n: usize) -> Vec<f64> {
        // A deterministic, skewed sample around 20 ms.
        (0..n)
            .map(|i| 20.0 + shift + ((i * 7919) % 97) as f64 / 10.0)
            .collect()
    }

    #[test]
    fn a_clearly_slower_canary_fails_naming_the_metric() {
        let judge = CanaryJudge::new()
            .metric(Metric::new("latency").direction(Direction::Increase))
            .metric(Metric::new("errors").direction(Direction::Increase))
            .thresholds(90.0, 60.0);
        let (b, c) = (latency(0.0, 50), latency(15.0, 50));
        let ok = vec![0.0; 50];
        let r = judge.judge(&[("latency", &b, &c), ("errors", &ok, &ok)]);
        assert_eq!(r.verdict, Verdict::Fail, "{r:#?}");
        assert_eq!(r.score, 50.0);
        let m = &r.metrics[0];
        assert_eq!(m.classification, Classification::High);
        assert!(m.p_value.unwrap() < 1e-6);
        let s = m.shift.unwrap();
        assert!(
            s.lower > 10.0 && s.estimate > 13.0 && s.upper < 20.0,
            "{s:?}"
        );
        assert!(
            r.reasons()
                .starts_with("latency: canary higher than baseline"),
            "{}",
            r.reasons()
        );
    }

    #[test]
    fn identical_distributions_pass() {
        let judge = CanaryJudge::new().metric(Metric::new("latency"));
        let (b, c) = (latency(0.0, 40), latency(0.0, 40));
        let r = judge.judge(&[("latency", &b, &c)]);
        assert_eq!((r.verdict, r.score), (Verdict::Pass, 100.0), "{r:#?}");
        // The same distribution, differently ordered and a little noisier.
        let c2: Vec<f64> = b.iter().rev().map(|v| v + 0.01).collect();
        let r = judge.judge(&[("latency", &b, &c2)]);
        assert_eq!(r.verdict, Verdict::Pass, "{r:#?}");
    }

    #[test]
    fn too_few_samples_is_inconclusive_and_degenerate_samples_have_no_nan() {
        let judge = CanaryJudge::new().metric(Metric::new("latency").min_samples(5));
        let r = judge.judge(&[("latency", &[1.0, 2.0], &[3.0, 4.0, 5.0, 6.0, 7.0])]);
        assert_eq!(r.verdict, Verdict::Inconclusive, "{r:#?}");
        assert_eq!(r.metrics[0].classification, Classification::NoData);
        let r = judge.judge(&[]);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        // One value per side: no NaN anywhere, a clear increase.
        let r = judge.judge(&[("latency", &[5.0; 10], &[9.0; 10])]);
        let m = &r.metrics[0];
        assert_eq!(m.classification, Classification::High, "{m:#?}");
        assert!(m.p_value.unwrap().is_finite());
        assert!(serde_json::to_string(&r).unwrap().find("NaN").is_none());
        // The same single value on both sides passes.
        let r = judge.judge(&[("latency", &[5.0; 10], &[5.0; 10])]);
        assert_eq!(r.verdict, Verdict::Pass);
    }

    #[test]
    fn a_critical_metric_fails_alone_and_weights_count() {
        let judge = CanaryJudge::new()
            .metric(
                Metric::new("errors")
                    .direction(Direction::Increase)
                    .critical(true),
            )
            .metric(Metric::new("a").group("g1"))
            .metric(Metric::new("b").group("g2"))
            .metric(Metric::new("c").group("g2"))
            .weight("g1", 60.0);
        let same = latency(0.0, 30);
        let up = latency(20.0, 30);
        let r = judge.judge(&[
            ("errors", &same, &up),
            ("a", &same, &same),
            ("b", &same, &same),
            ("c", &same, &same),
        ]);
        assert_eq!((r.verdict, r.score), (Verdict::Fail, 0.0));
        assert!(r.metrics[0].critical_failure);
        // Without the critical failure: g1 (60 points) passes; the 40 points
        // left are shared by the unweighted groups `errors` (passes: 20) and
        // g2 (b is High, c passes: 50% of 20 = 10).
        let r = judge.judge(&[
            ("errors", &same, &same),
            ("a", &same, &same),
            ("b", &same, &up),
            ("c", &same, &same),
        ]);
        assert_eq!(r.metrics[2].classification, Classification::High, "{r:#?}");
        assert_eq!((r.score, r.verdict), (90.0, Verdict::Pass));
    }
}
