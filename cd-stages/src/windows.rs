//! `DeploymentWindows`: deploy only inside allowed windows and never in a
//! freeze, in an IANA time zone, correct across daylight-saving changes.
//!
//! A window is a set of weekdays and a local time range (`Mon-Fri
//! 09:00-17:00`; a range whose end is not after its start runs past
//! midnight: `22:00-02:00` belongs to the day it starts). A freeze is a
//! local date-time range with a name (`year-end`, from `2026-12-19 18:00`
//! to `2027-01-04 08:00`). With no window, every time outside a freeze is
//! allowed.
//!
//! Closed, the gate says `Wait` until the next instant that is allowed —
//! the reason names it in local time and UTC — so the run holds no thread
//! and resumes on time even across a restart. Local times that a DST
//! change skips (02:30 on the spring-forward night in Europe/Paris) start
//! at the first valid instant after the gap; local times that happen twice
//! (the autumn fall-back) start a window or end a freeze at the later of
//! the two, and end a window or start a freeze at the earlier: closed time
//! is never shortened.
//!
//! An override needs an approval by a member of a named group
//! ([`DeploymentWindows::override_by`]): the same authenticated decision
//! flow as [`crate::ApprovalGate`] (`cdctl approve <run> <node>`).
//!
//! Time comes from a [`Clock`]: tests use a [`cd_core::clock::ManualClock`].
//!
//! ```
//! use std::sync::Arc;
//! use cd_core::clock::ManualClock;
//! use cd_core::{Gate, MemoryStore, Release, StageContext, Verdict};
//! use cd_stages::windows::DeploymentWindows;
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // Saturday 2026-03-28 10:00 in Paris (09:00 UTC).
//! let clock = ManualClock::new("2026-03-28T09:00:00Z".parse().unwrap());
//! let gate = DeploymentWindows::new("Europe/Paris").unwrap()
//!     .allow("Mon-Fri", "09:00", "17:00").unwrap()
//!     .clock(clock.clone());
//! let cx = StageContext::detached("window", Release::new("v1"), Arc::new(MemoryStore::new()));
//! match gate.evaluate(&cx).await.unwrap() {
//!     // Monday 09:00 CEST (after the DST change) is 07:00 UTC.
//!     Verdict::Wait { reason, .. } => assert!(reason.contains("2026-03-30T07:00:00Z"), "{reason}"),
//!     v => panic!("{v:?}"),
//! }
//! # });
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cd_core::approval::{identity, ApprovalRequest, ApproverGroup, Tally};
use cd_core::clock::{Clock, SystemClock};
use cd_core::{Error, ErrorKind, Gate, Result, StageContext, Verdict};
use chrono::{
    DateTime, Datelike, Duration as TimeDelta, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
    Weekday,
};
use chrono_tz::Tz;

/// An allowed window: weekdays and a local time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The days it starts on.
    pub days: Vec<Weekday>,
    /// Local start time.
    pub start: NaiveTime,
    /// Local end time (not after `start`: the next day).
    pub end: NaiveTime,
}

/// A freeze: no deploys between two local date-times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    /// Its name (`year-end`).
    pub name: String,
    /// Local start.
    pub from: NaiveDateTime,
    /// Local end (exclusive).
    pub until: NaiveDateTime,
}

/// The deployment-windows gate (see the [module docs](self)).
#[derive(Clone)]
pub struct DeploymentWindows {
    tz: Tz,
    windows: Vec<Window>,
    freezes: Vec<Freeze>,
    override_group: Option<ApproverGroup>,
    clock: Arc<dyn Clock>,
    max_recheck: Duration,
}

impl fmt::Debug for DeploymentWindows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeploymentWindows")
            .field("tz", &self.tz.name())
            .field("windows", &self.windows)
            .field("freezes", &self.freezes)
            .field("override_group", &self.override_group)
            .finish()
    }
}

fn parse_days(days: &str) -> Result<Vec<Weekday>> {
    let day = |s: &str| -> Result<Weekday> {
        s.trim().parse::<Weekday>().map_err(|_| {
            Error::invalid(format!(
                "deployment window: {s:?} is not a weekday (Mon, Tue, ... or Monday, ...)"
            ))
        })
    };
    let mut out = Vec::new();
    for part in days.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (mut d, end) = (day(a)?, day(b)?);
                loop {
                    out.push(d);
                    if d == end {
                        break;
                    }
                    d = d.succ();
                }
            }
            None => out.push(day(part)?),
        }
    }
    Ok(out)
}

fn parse_time(s: &str) -> Result<NaiveTime> {
    NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map_err(|e| Error::invalid(format!("deployment window: time {s:?} is not HH:MM ({e})")))
}

fn parse_local(s: &str) -> Result<NaiveDateTime> {
    let s = s.trim();
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
        .or_else(|_| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d").map(|d| d.and_time(NaiveTime::MIN))
        })
        .map_err(|_| {
            Error::invalid(format!(
                "deployment freeze: {s:?} is not a local date-time (YYYY-MM-DD HH:MM, or YYYY-MM-DD for midnight)"
            ))
        })
}

impl DeploymentWindows {
    /// Windows in the IANA time zone `tz` (`Europe/Paris`, `UTC`), none yet
    /// (every time allowed until windows or freezes are added).
    ///
    /// Errors: [`ErrorKind::Invalid`] for an unknown zone.
    pub fn new(tz: &str) -> Result<Self> {
        let tz: Tz = tz.parse().map_err(|_| {
            Error::invalid(format!("deployment windows: unknown time zone {tz:?} (IANA names: Europe/Paris, America/New_York, UTC)"))
        })?;
        Ok(DeploymentWindows {
            tz,
            windows: Vec::new(),
            freezes: Vec::new(),
            override_group: None,
            clock: Arc::new(SystemClock),
            max_recheck: Duration::from_secs(3600),
        })
    }

    /// Allows deploys on `days` (`Mon-Fri`, `Sat,Sun`, `Tue`) from `start`
    /// to `end` (`HH:MM`, local).
    ///
    /// Errors: [`ErrorKind::Invalid`] naming the part that does not parse.
    pub fn allow(mut self, days: &str, start: &str, end: &str) -> Result<Self> {
        self.windows.push(Window {
            days: parse_days(days)?,
            start: parse_time(start)?,
            end: parse_time(end)?,
        });
        Ok(self)
    }

    /// No deploys from `from` to `until` (local `YYYY-MM-DD HH:MM`, or a
    /// date for midnight), named `name`.
    ///
    /// Errors: [`ErrorKind::Invalid`] for a date that does not parse or a
    /// freeze that ends before it starts.
    pub fn freeze(mut self, name: &str, from: &str, until: &str) -> Result<Self> {
        let (from, until) = (parse_local(from)?, parse_local(until)?);
        if until <= from {
            return Err(Error::invalid(format!(
                "deployment freeze {name}: ends ({until}) before it starts ({from})"
            )));
        }
        self.freezes.push(Freeze {
            name: name.into(),
            from,
            until,
        });
        Ok(self)
    }

    /// While closed, an approval by one member of group `name` lets the run
    /// through (recorded and audited like any approval; the run's actor
    /// cannot override for themselves).
    pub fn override_by<I, S>(mut self, name: &str, members: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.override_group = Some(ApproverGroup {
            name: name.into(),
            members: members.into_iter().map(Into::into).collect(),
            required: 1,
        });
        self
    }

    /// Where "now" comes from (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The longest wait before asking again (default 1 h), so a changed
    /// clock or an override is noticed.
    pub fn max_recheck(mut self, d: Duration) -> Self {
        self.max_recheck = d;
        self
    }

    /// The instant of a local date-time that opens something (a window's
    /// start, a freeze's end): the first valid instant after a DST gap; the
    /// later of two in a fall-back.
    fn instant(&self, local: NaiveDateTime) -> DateTime<Utc> {
        self.resolve(local, true)
    }

    /// The instant of a local date-time that closes something (a window's
    /// end, a freeze's start): the earlier of two in a fall-back, so the
    /// closed time is never shortened.
    fn closing(&self, local: NaiveDateTime) -> DateTime<Utc> {
        self.resolve(local, false)
    }

    fn resolve(&self, local: NaiveDateTime, later: bool) -> DateTime<Utc> {
        let mut t = local;
        for _ in 0..(4 * 60) {
            match self.tz.from_local_datetime(&t) {
                chrono::LocalResult::Single(x) => return x.with_timezone(&Utc),
                chrono::LocalResult::Ambiguous(a, b) => {
                    return if later { b } else { a }.with_timezone(&Utc)
                }
                chrono::LocalResult::None => t += TimeDelta::minutes(1),
            }
        }
        Utc.from_utc_datetime(&local)
    }

    fn freeze_at(&self, now: DateTime<Utc>) -> Option<&Freeze> {
        self.freezes
            .iter()
            .find(|f| self.closing(f.from) <= now && now < self.instant(f.until))
    }

    /// The window open at `now`, if any (always `Some` when there are no
    /// windows).
    fn in_window(&self, now: DateTime<Utc>) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let local = now.with_timezone(&self.tz).naive_local();
        let today = local.date();
        self.windows.iter().any(|w| {
            // The occurrences that could contain now: starting today or
            // (past midnight) yesterday.
            [today, today - TimeDelta::days(1)].iter().any(|d| {
                if !w.days.contains(&d.weekday()) {
                    return false;
                }
                let start = self.instant(d.and_time(w.start));
                let end_day = if w.end > w.start {
                    *d
                } else {
                    *d + TimeDelta::days(1)
                };
                let end = self.closing(end_day.and_time(w.end));
                start <= now && now < end
            })
        })
    }

    /// Whether deploys are allowed at `now`.
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        self.freeze_at(now).is_none() && self.in_window(now)
    }

    /// The first instant at or after `now` when deploys are allowed, within
    /// a year; `None` if there is none.
    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(now) {
            return Some(now);
        }
        // Openings happen when a freeze ends or a window starts.
        let mut candidates: Vec<DateTime<Utc>> = self
            .freezes
            .iter()
            .map(|f| self.instant(f.until))
            .filter(|t| *t > now)
            .collect();
        let today = now.with_timezone(&self.tz).date_naive();
        for offset in 0..=366 {
            let d = today + TimeDelta::days(offset);
            for w in &self.windows {
                if w.days.contains(&d.weekday()) {
                    let t = self.instant(d.and_time(w.start));
                    if t > now {
                        candidates.push(t);
                    }
                }
            }
        }
        candidates.sort();
        candidates.dedup();
        // A freeze ending inside a window opens at the freeze's end; a
        // window starting inside a freeze opens when it ends (a candidate
        // too).
        candidates.into_iter().find(|t| self.is_open(*t))
    }

    fn why_closed(&self, now: DateTime<Utc>) -> String {
        match self.freeze_at(now) {
            Some(f) => format!(
                "deployment freeze `{}` ({} to {} {})",
                f.name,
                f.from,
                f.until,
                self.tz.name()
            ),
            None => format!(
                "outside the deployment windows ({})",
                self.windows
                    .iter()
                    .map(|w| format!(
                        "{} {}-{}",
                        w.days
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        w.start.format("%H:%M"),
                        w.end.format("%H:%M")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    fn override_request(
        &self,
        cx: &StageContext,
        group: &ApproverGroup,
    ) -> Result<ApprovalRequest> {
        let members = group
            .members
            .iter()
            .map(|m| identity(m))
            .collect::<Result<Vec<_>>>()?;
        // Neither the run's actor nor the release's author overrides.
        let excluded = cd_core::approval::exclusions(cx.actor(), cx.release())?;
        Ok(ApprovalRequest {
            run_id: cx.run_id().to_string(),
            node: cx.node().to_string(),
            pipeline: cx.pipeline().to_string(),
            definition_hash: cx.definition_hash().to_string(),
            release: cx.release().version.clone(),
            environment: cx.environment().to_string(),
            approvers: Vec::new(),
            anyone: false,
            groups: vec![ApproverGroup {
                name: group.name.clone(),
                members,
                required: group.required,
            }],
            required: 1,
            excluded,
            comment_required: true,
            created_at: Utc::now(),
            expires_at: None,
        })
    }
}

#[async_trait]
impl Gate for DeploymentWindows {
    fn kind(&self) -> String {
        "deployment-windows".into()
    }

    fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    fn validate(&self) -> Result<()> {
        if let Some(g) = &self.override_group {
            if g.members.is_empty() {
                return Err(Error::invalid(format!(
                    "deployment windows: override group {} has no member",
                    g.name
                )));
            }
            for m in &g.members {
                identity(m)?;
            }
        }
        Ok(())
    }

    async fn evaluate(&self, cx: &StageContext) -> Result<Verdict> {
        let now = self.clock.now();
        if self.is_open(now) {
            return Ok(Verdict::Pass);
        }
        let why = self.why_closed(now);
        let mut how = String::new();
        if let Some(group) = &self.override_group {
            let mine = self.override_request(cx, group)?;
            let request = match cx.store().put_approval_request(&mine).await {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Unsupported => mine,
                Err(e) => return Err(e),
            };
            let records = cx.store().approvals(cx.run_id(), cx.node()).await?;
            match request.tally(&records) {
                Tally::Approved(by) => {
                    cx.log(format!("{why}: overridden by {}", by.join(", ")));
                    return Ok(Verdict::Pass);
                }
                Tally::Rejected { by, comment } => {
                    return Ok(Verdict::fail(format!(
                        "{why}; override refused by {by}: {}",
                        comment.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                Tally::Waiting { .. } => {
                    how = format!(
                        "; or an override by group {} ({}) with a comment: `cdctl approve {} {} --comment <why>`",
                        group.name,
                        request.groups[0].members.join(", "),
                        cx.run_id(),
                        cx.node()
                    );
                }
            }
        }
        match self.next_open(now) {
            Some(at) => {
                let wait = (at - now).to_std().unwrap_or_default();
                let local = at.with_timezone(&self.tz);
                Ok(Verdict::wait(
                    wait.min(self.max_recheck).max(Duration::from_millis(1)),
                    format!(
                        "{why}: opens at {} ({}), in {}{how}",
                        local.format("%Y-%m-%d %H:%M %Z"),
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        humanize(wait)
                    ),
                ))
            }
            None => Ok(Verdict::fail(format!(
                "{why}: no deployment window opens within a year{how}"
            ))),
        }
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (days, h, m) {
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (d, h, _) => format!("{d} d {h} h"),
    }
}
