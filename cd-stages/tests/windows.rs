//! Deployment windows and freezes in Europe/Paris across both DST changes
//! of 2026 (spring forward 2026-03-29 02:00 → 03:00 CEST, fall back
//! 2026-10-25 03:00 → 02:00 CET), with a manual clock; and a run that
//! waits for a freeze to end under paused tokio time, passing the gate at
//! the exact instant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cd_core::approval::{record_decision, Actor, DecisionRequest};
use cd_core::clock::{Clock, ManualClock};
use cd_core::{
    Decision, ErrorKind, Gate, MemoryStore, Pipeline, Release, RunStatus, Runner, StageContext,
    Store, Verdict,
};
use cd_stages::windows::DeploymentWindows;
use chrono::{DateTime, Utc};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn cx() -> StageContext {
    StageContext::detached("window", Release::new("v1"), Arc::new(MemoryStore::new()))
}

async fn verdict(gate: &DeploymentWindows) -> Verdict {
    gate.evaluate(&cx()).await.unwrap()
}

fn wait_of(v: Verdict) -> (Duration, String) {
    match v {
        Verdict::Wait {
            recheck_after,
            reason,
        } => (recheck_after, reason),
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[tokio::test]
async fn a_freeze_across_spring_forward_opens_at_the_right_instant() {
    // Saturday noon in Paris (CET, UTC+1).
    let clock = ManualClock::new(at("2026-03-28T11:00:00Z"));
    let gate = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .freeze(
            "spring release freeze",
            "2026-03-28 00:00",
            "2026-03-29 03:30",
        )
        .unwrap()
        .max_recheck(Duration::from_secs(86_400))
        .clock(clock.clone());
    let (wait, reason) = wait_of(verdict(&gate).await);
    // 03:30 CEST (UTC+2, after the change) is 01:30 UTC: 14 h 30 min away,
    // not 13 h 30 (what ignoring DST would give).
    assert_eq!(wait, Duration::from_secs(14 * 3600 + 30 * 60));
    assert!(
        reason.contains("deployment freeze `spring release freeze`"),
        "{reason}"
    );
    assert!(
        reason.contains("opens at 2026-03-29 03:30 CEST (2026-03-29T01:30:00Z)"),
        "{reason}"
    );

    clock.set(at("2026-03-29T01:29:59Z"));
    assert_eq!(wait_of(verdict(&gate).await).0, Duration::from_secs(1));
    clock.set(at("2026-03-29T01:30:00Z"));
    assert_eq!(verdict(&gate).await, Verdict::Pass);
}

#[tokio::test]
async fn a_local_time_skipped_by_spring_forward_starts_after_the_gap() {
    // The freeze ends at 02:30, which does not exist that night: it ends at
    // 03:00 CEST = 01:00 UTC.
    let clock = ManualClock::new(at("2026-03-29T00:30:00Z"));
    let gate = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .freeze("night", "2026-03-28 22:00", "2026-03-29 02:30")
        .unwrap()
        .clock(clock.clone());
    let (wait, reason) = wait_of(verdict(&gate).await);
    assert_eq!(wait, Duration::from_secs(30 * 60), "{reason}");
    clock.set(at("2026-03-29T01:00:00Z"));
    assert_eq!(verdict(&gate).await, Verdict::Pass);
}

#[tokio::test]
async fn a_local_time_that_happens_twice_ends_a_freeze_at_the_later_one() {
    // 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
    let clock = ManualClock::new(at("2026-10-25T00:45:00Z"));
    let gate = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .freeze("maintenance", "2026-10-24 20:00", "2026-10-25 02:30")
        .unwrap()
        .clock(clock.clone());
    let (wait, reason) = wait_of(verdict(&gate).await);
    assert_eq!(wait, Duration::from_secs(45 * 60), "{reason}");
    assert!(reason.contains("2026-10-25T01:30:00Z"), "{reason}");
    clock.set(at("2026-10-25T01:30:00Z"));
    assert_eq!(verdict(&gate).await, Verdict::Pass);

    // A freeze *starting* at 02:30 that night starts at the earlier 02:30
    // (00:30 UTC): closed time is never shortened.
    let starts = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .freeze("late", "2026-10-25 02:30", "2026-10-25 06:00")
        .unwrap();
    assert!(starts.is_open(at("2026-10-25T00:29:59Z")));
    assert!(!starts.is_open(at("2026-10-25T00:30:00Z")));
}

#[tokio::test]
async fn weekly_windows_follow_local_time_across_the_change() {
    // Friday 2026-03-27 17:30 CET: closed until Monday 09:00 CEST = 07:00
    // UTC (it was 08:00 UTC the Monday before).
    let clock = ManualClock::new(at("2026-03-27T16:30:00Z"));
    let gate = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .allow("Mon-Fri", "09:00", "17:00")
        .unwrap()
        .clock(clock.clone());
    assert!(!gate.is_open(clock.now()));
    assert_eq!(
        gate.next_open(clock.now()),
        Some(at("2026-03-30T07:00:00Z"))
    );
    let (wait, reason) = wait_of(verdict(&gate).await);
    assert_eq!(wait, Duration::from_secs(3600), "capped by max_recheck");
    assert!(
        reason.contains("outside the deployment windows (Mon,Tue,Wed,Thu,Fri 09:00-17:00)"),
        "{reason}"
    );
    assert!(
        gate.is_open(at("2026-03-23T08:00:00Z")),
        "09:00 CET a week earlier"
    );
    assert!(!gate.is_open(at("2026-03-30T06:59:59Z")));
    assert!(gate.is_open(at("2026-03-30T07:00:00Z")));
    assert!(!gate.is_open(at("2026-03-30T15:00:00Z")), "17:00 CEST");

    // A window past midnight belongs to the day it starts.
    let night = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .allow("Sat", "22:00", "02:00")
        .unwrap();
    assert!(
        night.is_open(at("2026-01-04T00:30:00Z")),
        "Sun 01:30 CET, Saturday's window"
    );
    assert!(!night.is_open(at("2026-01-05T00:30:00Z")), "Mon 01:30 CET");

    // A freeze inside a window: it opens when the freeze ends.
    let both = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .allow("Mon-Fri", "09:00", "17:00")
        .unwrap()
        .freeze("incident", "2026-03-30 08:00", "2026-03-30 11:15")
        .unwrap();
    assert_eq!(
        both.next_open(at("2026-03-27T16:30:00Z")),
        Some(at("2026-03-30T09:15:00Z"))
    );
}

#[tokio::test]
async fn bad_settings_are_typed_errors_naming_the_part() {
    let e = DeploymentWindows::new("Europe/Pariss").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.to_string().contains("Europe/Pariss"), "{e}");
    let w = DeploymentWindows::new("UTC").unwrap();
    let e = w.clone().allow("Mon-Fry", "09:00", "17:00").unwrap_err();
    assert!(e.to_string().contains("\"Fry\""), "{e}");
    let e = w.clone().allow("Mon", "9h", "17:00").unwrap_err();
    assert!(e.to_string().contains("\"9h\""), "{e}");
    let e = w
        .clone()
        .freeze("x", "2026-12-24", "2026-12-20")
        .unwrap_err();
    assert!(e.to_string().contains("ends"), "{e}");
    let e = w.freeze("x", "Christmas", "2026-12-26").unwrap_err();
    assert!(e.to_string().contains("\"Christmas\""), "{e}");
}

/// A clock that follows tokio's (paused) time from a start instant.
#[derive(Debug, Clone)]
struct TokioClock {
    start: DateTime<Utc>,
    base: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.base.elapsed()).unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_waits_out_the_freeze_and_passes_at_its_end() {
    let clock = TokioClock {
        start: at("2026-03-28T23:00:00Z"),
        base: tokio::time::Instant::now(),
    };
    let passed_at = Arc::new(Mutex::new(None));
    let seen = passed_at.clone();
    let c2 = clock.clone();
    let pipeline = Pipeline::builder("web")
        .gate(
            "window",
            DeploymentWindows::new("Europe/Paris")
                .unwrap()
                .freeze("spring", "2026-03-28 00:00", "2026-03-29 03:30")
                .unwrap()
                .max_recheck(Duration::from_secs(600))
                .clock(clock),
        )
        .stage(
            "deploy",
            cd_core::stage_fn(move |_cx| {
                let seen = seen.clone();
                let c2 = c2.clone();
                async move {
                    *seen.lock().unwrap() = Some(c2.now());
                    Ok(cd_core::StageOutput::empty())
                }
            }),
        )
        .needs(["window"])
        .build()
        .unwrap();
    let report = Runner::new(Arc::new(MemoryStore::new()))
        .run(&pipeline, Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let t = passed_at.lock().unwrap().unwrap();
    // 2h30 of waiting (in 10-minute rechecks), then through within the
    // millisecond the freeze ends.
    assert!(t >= at("2026-03-29T01:30:00Z"), "{t}");
    assert!(t < at("2026-03-29T01:30:01Z"), "{t}");
    assert!(report.node("window").unwrap().checks >= 15);
}

#[tokio::test]
async fn an_override_needs_a_member_of_the_group_with_a_comment() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(at("2026-12-24T10:00:00Z"));
    let gate = DeploymentWindows::new("Europe/Paris")
        .unwrap()
        .freeze("year-end", "2026-12-19 18:00", "2027-01-04 08:00")
        .unwrap()
        .override_by("sre", ["erin", "frank"])
        .clock(clock);
    let cx = StageContext::detached("window", Release::new("v1"), store.clone())
        .with_actor("carol")
        .with_definition_hash("h1");
    let (_, reason) = wait_of(gate.evaluate(&cx).await.unwrap());
    assert!(reason.contains("opens at 2027-01-04 08:00 CET"), "{reason}");
    assert!(
        reason.contains("override by group sre (erin, frank)"),
        "{reason}"
    );

    // Decisions go through the same checks as approvals. The run record
    // is needed: a detached context has none, so put one.
    store
        .create_run(&cd_core::RunRecord {
            id: "detached".into(),
            pipeline: "detached".into(),
            definition_hash: "h1".into(),
            release: Release::new("v1"),
            environment: "default".into(),
            status: RunStatus::Running,
            started_by: "carol".into(),
            started_at: Utc::now(),
            finished_at: None,
        })
        .await
        .unwrap();
    let mut node = cd_core::NodeRecord::pending("detached", "window");
    node.status = cd_core::NodeStatus::Waiting;
    store.put_node(&node).await.unwrap();
    let decide = |who: &str, comment: Option<&str>, id: &str| {
        let store = store.clone();
        let (who, comment, id) = (who.to_string(), comment.map(str::to_string), id.to_string());
        async move {
            record_decision(
                store.as_ref(),
                &Actor::trusted(&who, "test").unwrap(),
                &DecisionRequest {
                    run_id: "detached".into(),
                    node: "window".into(),
                    decision: Decision::Approve,
                    comment,
                    decision_id: id,
                },
            )
            .await
        }
    };
    let e = decide("carol", Some("urgent fix"), "d1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    let e = decide("mallory", Some("urgent fix"), "d2")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(
        e.to_string().contains("group sre: 1 of erin or frank"),
        "{e}"
    );
    let e = decide("erin", None, "d3").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(store
        .approvals("detached", "window")
        .await
        .unwrap()
        .is_empty());
    decide("erin", Some("payment outage fix"), "d4")
        .await
        .unwrap();
    assert_eq!(gate.evaluate(&cx).await.unwrap(), Verdict::Pass);
}
