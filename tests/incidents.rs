//! A failing bake rolls back, opens an incident and notifies real HTTP
//! receivers (Slack and PagerDuty shapes); deliveries retry, are recorded in
//! the SQLite store, and a receiver that never answers does not hold up the
//! rollback.

use std::sync::Arc;
use std::time::Duration;

use cd::backends::sqlite::SqliteStore;
use cd::core::incident::{resolve_incident, DeliveryOutcome};
use cd::core::{
    EventKind, IncidentStatus, MemoryDeployer, NodeStatus, NotificationKind, Notifications,
    Pipeline, Release, RunStatus, Runner, Secret, Severity, Store,
};
use cd::stages::webhook::WebhookNotifier;
use cd::stages::{Bake, Deploy, HttpMonitor};
use cd_testkit::webhook::{Behaviour, WebhookReceiver};

const DEADLINE: Duration = Duration::from_secs(30);

fn pipeline(health_url: &str) -> Pipeline {
    Pipeline::builder("web")
        .stage(
            "deploy",
            Deploy::new(DEPLOYER.with(|d| d.clone())).env("production"),
        )
        .stage(
            "bake",
            Bake::new(HttpMonitor::get(health_url))
                .for_duration(Duration::from_millis(100), Duration::from_millis(50)),
        )
        .needs(["deploy"])
        .build()
        .unwrap()
}

thread_local! {
    static DEPLOYER: Arc<MemoryDeployer> = Arc::new(MemoryDeployer::new(["web1", "web2"]));
}

async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(
        SqliteStore::open(dir.path().join("state.db"))
            .await
            .unwrap(),
    )
}

/// v1 goes live with a healthy bake; returns the store and a runner.
async fn live_v1(
    dir: &tempfile::TempDir,
    notifications: Notifications,
) -> (Arc<dyn Store>, Runner) {
    let healthy = WebhookReceiver::start().await;
    let store = store(dir).await;
    let runner = Runner::new(store.clone())
        .environment("production")
        .notify(notifications);
    let report = runner
        .run(&pipeline(&healthy.url("/health")), Release::new("v1"))
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    assert_eq!(DEPLOYER.with(|d| d.versions()), ["v1", "v1"]);
    (store, runner)
}

/// v2, whose health answers 500: the bake fails.
async fn broken_v2(runner: &Runner) -> cd::core::RunReport {
    let unhealthy = WebhookReceiver::with(Behaviour::FailFirst(usize::MAX)).await;
    runner
        .run(&pipeline(&unhealthy.url("/health")), Release::new("v2"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn failing_bake_rolls_back_opens_an_incident_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let slack = WebhookReceiver::start().await;
    let pagerduty = WebhookReceiver::start().await;
    let slack_url = slack.url("/services/T000/B000/SLACKTOKEN");
    let notifications = Notifications::new()
        .to(WebhookNotifier::slack(Secret::new(slack_url.clone())))
        .to(
            WebhookNotifier::pagerduty(Secret::new("PDROUTINGKEY".into()))
                .url(Secret::new(pagerduty.url("/v2/enqueue"))),
        )
        .retry(3, Duration::from_millis(50));
    let (store, runner) = live_v1(&dir, notifications.clone()).await;
    assert!(slack.received().is_empty(), "a good run notifies nobody");

    // v2: the service's health answers 500.
    let report = broken_v2(&runner).await;
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(
        report.node("deploy").unwrap().status,
        NodeStatus::RolledBack
    );
    assert_eq!(DEPLOYER.with(|d| d.versions()), ["v1", "v1"], "rolled back");

    // The incident, in the store.
    let open = store.incidents(true, 10).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    let incident = &open[0];
    assert_eq!(incident.status, IncidentStatus::Open);
    assert_eq!(incident.severity, Severity::Critical);
    assert_eq!(incident.run_id.as_deref(), Some(report.run_id.as_str()));
    assert_eq!(incident.node.as_deref(), Some("bake"));
    assert_eq!(incident.release.as_deref(), Some("v2"));
    assert_eq!(incident.environment.as_deref(), Some("production"));
    assert_eq!(incident.pipeline.as_deref(), Some("web"));
    assert!(
        incident.title.contains("v2 is not healthy"),
        "{}",
        incident.title
    );
    assert!(incident.reason.contains("-> 500"), "{}", incident.reason);
    let bake_error = report.node("bake").unwrap().error.clone().unwrap();
    assert!(
        bake_error.to_string().contains(&incident.id),
        "{bake_error}"
    );

    // Slack got the incident, the rollback and the failed run.
    let got = slack.wait_for(DEADLINE, |r| r.len() >= 3).await;
    let texts: Vec<String> = got.iter().map(|r| r.json["text"].to_string()).collect();
    assert_eq!(got.len(), 3, "{texts:?}");
    assert!(got
        .iter()
        .all(|r| r.path == "/services/T000/B000/SLACKTOKEN"));
    assert!(
        texts
            .iter()
            .any(|t| t.contains(&format!("incident {} opened", incident.id))),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("rolled back: web of v2 to production")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("run failed: web of v2 to production")),
        "{texts:?}"
    );
    let opened = got
        .iter()
        .find(|r| r.json["text"].to_string().contains("opened"))
        .unwrap();
    assert_eq!(opened.json["blocks"][0]["type"], "header");
    assert!(
        opened.json["blocks"][1]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("-&gt; 500"),
        "Slack text is escaped"
    );

    // PagerDuty got a trigger with the incident's dedup key.
    let got = pagerduty.wait_for(DEADLINE, |r| r.len() >= 3).await;
    let trigger = got
        .iter()
        .find(|r| r.json["dedup_key"] == incident.dedup_key.as_str())
        .expect("a trigger for the incident");
    assert_eq!(trigger.path, "/v2/enqueue");
    assert_eq!(trigger.json["event_action"], "trigger");
    assert_eq!(trigger.json["routing_key"], "PDROUTINGKEY");
    assert_eq!(trigger.json["payload"]["severity"], "critical");
    assert_eq!(trigger.json["payload"]["source"], "production");
    assert_eq!(trigger.json["payload"]["class"], "incident_opened");
    assert!(trigger
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));

    // Every attempt is recorded, none holds the Slack token.
    let deliveries = store.deliveries(&incident.id, 100).await.unwrap();
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    assert!(deliveries
        .iter()
        .all(|d| d.outcome == DeliveryOutcome::Delivered));
    assert!(deliveries
        .iter()
        .all(|d| !d.notifier.contains("SLACKTOKEN")));
    assert!(deliveries
        .iter()
        .any(|d| d.notifier.starts_with("slack http://127.0.0.1:")));

    // Resolving sends PagerDuty a resolve with the same key.
    let resolved = resolve_incident(&store, &incident.id, "alice", Some(&notifications))
        .await
        .unwrap();
    assert_eq!(resolved.status, IncidentStatus::Resolved);
    assert_eq!(resolved.resolved_by.as_deref(), Some("alice"));
    let got = pagerduty
        .wait_for(DEADLINE, |r| {
            r.iter().any(|x| x.json["event_action"] == "resolve")
        })
        .await;
    let resolve = got
        .iter()
        .find(|r| r.json["event_action"] == "resolve")
        .unwrap();
    assert_eq!(resolve.json["dedup_key"], incident.dedup_key.as_str());
    assert!(store.incidents(true, 10).await.unwrap().is_empty());
    assert_eq!(store.incidents(false, 10).await.unwrap().len(), 1);
    let err = resolve_incident(&store, &incident.id, "bob", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), cd::core::ErrorKind::Conflict);
}

#[tokio::test(flavor = "current_thread")]
async fn a_receiver_failing_twice_gets_the_notification_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = WebhookReceiver::with(Behaviour::FailFirst(2)).await;
    let notifications = Notifications::new()
        .to_on(
            WebhookNotifier::json(Secret::new(flaky.url("/hook"))),
            [NotificationKind::IncidentOpened],
        )
        .retry(5, Duration::from_millis(20));
    let (store, runner) = live_v1(&dir, notifications).await;
    let report = broken_v2(&runner).await;
    assert_eq!(report.status, RunStatus::Failed);
    let incident = store.incidents(true, 1).await.unwrap().remove(0);

    // The run waited for the delivery (flush), so everything is in.
    let got = flaky.received();
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 202], "three attempts, one accepted");
    assert!(got.iter().all(|r| r.json["kind"] == "incident_opened"));
    assert!(got
        .iter()
        .all(|r| r.json["incident"]["id"] == incident.id.as_str()));
    let outcomes: Vec<(u32, DeliveryOutcome)> = store
        .deliveries(&incident.id, 100)
        .await
        .unwrap()
        .iter()
        .map(|d| (d.attempt, d.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, DeliveryOutcome::Retrying),
            (2, DeliveryOutcome::Retrying),
            (3, DeliveryOutcome::Delivered)
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_receiver_that_never_answers_does_not_hold_up_the_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let hung = WebhookReceiver::with(Behaviour::Hang).await;
    let notifications = Notifications::new()
        .to(WebhookNotifier::slack(Secret::new(hung.url("/hook")))
            .timeout(Duration::from_millis(300)))
        .retry(2, Duration::from_millis(20))
        .flush_timeout(Duration::ZERO);
    let (store, runner) = live_v1(&dir, notifications).await;
    let report = broken_v2(&runner).await;
    // The run is over, rolled back, while the receiver still holds the
    // requests: nothing was answered.
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(
        report.node("deploy").unwrap().status,
        NodeStatus::RolledBack
    );
    assert_eq!(DEPLOYER.with(|d| d.versions()), ["v1", "v1"]);
    assert!(hung.received().is_empty());
    let events = store.events(&report.run_id, 0, 10_000).await.unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::RolledBack { .. })));

    // The deliveries give up on their own, recorded.
    let incident = store.incidents(true, 1).await.unwrap().remove(0);
    let records = cd_testkit::eventually(DEADLINE, || async {
        let r = store.deliveries(&incident.id, 100).await.unwrap();
        r.iter()
            .any(|d| d.outcome == DeliveryOutcome::GaveUp)
            .then_some(r)
    })
    .await
    .expect("the deliveries never gave up");
    let outcomes: Vec<DeliveryOutcome> = records.iter().map(|d| d.outcome).collect();
    assert_eq!(
        outcomes,
        [DeliveryOutcome::Retrying, DeliveryOutcome::GaveUp]
    );
    assert!(
        records[1]
            .error
            .as_deref()
            .unwrap()
            .contains("no response within 300 ms"),
        "{records:?}"
    );
    assert!(hung.hits() >= 2);
}

fn cdctl(db: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdctl"))
        .arg("--db")
        .arg(db)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("CD_NOTIFY_WEBHOOK_URL")
        .env_remove("CD_NOTIFY_SLACK_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdctl_lists_acknowledges_and_resolves_incidents() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = store(&dir).await;
    let incident = cd::core::IncidentRecord::open(
        "v2 is not healthy after deployment to production",
        "http GET /health: 1 failing sample(s) > limit 0",
        Severity::Critical,
    )
    .environment("production")
    .release("v2");
    store.put_incident(&incident).await.unwrap();
    drop(store);
    let pagerduty = WebhookReceiver::start().await;
    let env = [
        ("CD_PAGERDUTY_ROUTING_KEY", "PDKEY".to_string()),
        ("CD_PAGERDUTY_URL", pagerduty.url("/v2/enqueue")),
    ];
    let db2 = db.clone();
    let run = move |args: Vec<&'static str>, env: Vec<(&'static str, String)>| {
        let db = db2.clone();
        tokio::task::spawn_blocking(move || cdctl(&db, &args, &env))
    };

    let (code, out, err) = run(vec!["incidents", "--open"], vec![]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&incident.id) && out.contains("open") && out.contains("critical"),
        "{out}"
    );

    let id: &'static str = Box::leak(incident.id.clone().into_boxed_str());
    let (code, out, err) = run(vec!["incident", "ack", id, "--as", "alice"], env.to_vec())
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acknowledged by alice"), "{out}");
    assert!(out.contains("notified pagerduty http://127.0.0.1"), "{out}");
    let (code, out, err) = run(vec!["incident", "resolve", id, "--as", "bob"], env.to_vec())
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("resolved by bob") && out.contains("delivered"),
        "{out}"
    );
    let actions: Vec<String> = pagerduty
        .received()
        .iter()
        .map(|r| r.json["event_action"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(actions, ["acknowledge", "resolve"]);
    assert!(pagerduty
        .received()
        .iter()
        .all(|r| r.json["dedup_key"] == incident.dedup_key.as_str()));

    let (code, out, _) = run(vec!["incidents", "--open"], vec![]).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("no open incident"), "{out}");
    let (code, _, err) = run(vec!["incident", "resolve", id], vec![]).await.unwrap();
    assert_eq!(code, 5, "resolving twice is a conflict: {err}");
    assert!(err.contains("already resolved by bob"), "{err}");
    let (code, _, err) = run(vec!["incident", "ack", "inc-nope"], vec![])
        .await
        .unwrap();
    assert_eq!(code, 3, "{err}");
    let (code, out, _) = run(vec!["incident", "show", id, "--json"], vec![])
        .await
        .unwrap();
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["incident"]["status"], "resolved");
    assert_eq!(v["deliveries"].as_array().unwrap().len(), 2);
    assert!(!out.contains("PDKEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_waiting_is_announced_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let receiver = WebhookReceiver::start().await;
    let notifications = Notifications::new().to_on(
        WebhookNotifier::json(Secret::new(receiver.url("/hook"))),
        [NotificationKind::ApprovalWaiting],
    );
    let pipeline = Pipeline::builder("web")
        .gate(
            "approval",
            cd::stages::ApprovalGate::any_of(["alice"]).recheck_every(Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    let runner = Runner::new(store.clone())
        .environment("production")
        .notify(notifications);
    let run = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run(&pipeline, Release::new("v7")).await }
    });
    // The gate is announced; it keeps waiting (several rechecks).
    let got = receiver.wait_for(DEADLINE, |r| !r.is_empty()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let n = &got[0].json;
    assert_eq!(n["kind"], "approval_waiting");
    assert_eq!(n["node"], "approval");
    assert_eq!(n["release"], "v7");
    assert!(
        n["summary"].as_str().unwrap().contains("cdctl approve"),
        "{n}"
    );
    let run_id = n["run_id"].as_str().unwrap().to_string();
    cd_testkit::eventually(DEADLINE, || async {
        let waits = store
            .events(&run_id, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| matches!(e.kind, EventKind::GateWaiting { .. }))
            .count();
        (waits >= 3).then_some(())
    })
    .await
    .expect("the gate never rechecked");
    cd::core::approval::record_decision(
        store.as_ref(),
        &cd::core::approval::Actor::trusted("alice", "test").unwrap(),
        &cd::core::approval::DecisionRequest {
            run_id: run_id.clone(),
            node: "approval".into(),
            decision: cd::core::Decision::Approve,
            comment: None,
            decision_id: "decision-1".into(),
        },
    )
    .await
    .unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    assert_eq!(
        receiver.received().len(),
        1,
        "announced once, not per recheck"
    );
}
