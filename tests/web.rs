//! The web console over a real SQLite store and a real run waiting for
//! approval: sign-in, escaping, security headers, CSRF, replayed forms, the
//! JSON API — and a headless Chromium (Debian's chromium, driven by
//! playwright-core from `scripts/setup.sh`) signing in, approving, and the
//! waiting run going on; a screenshot of the run page is saved as a test
//! artefact (`CD_UPDATE_SCREENSHOT=1` also writes `docs/console-run.png`).
#![cfg(all(feature = "web", feature = "sqlite"))]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cd_backends::sqlite::SqliteStore;
use cd_core::approval::issue_token;
use cd_core::{NodeStatus, Pipeline, Release, RunReport, RunStatus, Runner, Store};
use cd_stages::{ApprovalGate, LoadTest};
use reqwest::redirect::Policy;

const DEADLINE: Duration = Duration::from_secs(60);

struct Console {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    base: String,
    dir: PathBuf,
}

async fn console() -> Console {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(dir.path().join("state.db"))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let console = cd::web::Console::new(store.clone());
    tokio::spawn(cd::web::serve(listener, console));
    Console {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        store,
        base,
    }
}

impl Console {
    async fn token(&self, name: &str) -> (String, PathBuf) {
        let (record, token) = issue_token(name, None, "test").unwrap();
        self.store.put_token(&record).await.unwrap();
        let file = self.dir.join(format!("{name}.token"));
        std::fs::write(&file, token.expose()).unwrap();
        (token.expose().clone(), file)
    }

    /// Starts a run of build → load-test → approval (alice or bob, four
    /// eyes off) → deploy, by carol; waits for the gate to ask.
    async fn waiting_run(&self, version: &str) -> (String, tokio::task::JoinHandle<RunReport>) {
        let pipeline = Pipeline::builder("web-shop")
            .stage(
                "build",
                cd_core::stage_fn(|_| async { Ok(cd_core::StageOutput::empty()) }),
            )
            .stage(
                "load-test",
                LoadTest::get(format!("{}/login", self.base))
                    .requests(200)
                    .concurrency(4),
            )
            .needs(["build"])
            .gate(
                "approval",
                ApprovalGate::any_of(["alice", "bob"]).recheck_every(Duration::from_millis(50)),
            )
            .needs(["load-test"])
            .stage(
                "deploy",
                cd_core::stage_fn(|_| async { Ok(cd_core::StageOutput::empty()) }),
            )
            .needs(["approval"])
            .build()
            .unwrap();
        let runner = Runner::new(self.store.clone())
            .environment("production")
            .actor("carol");
        let release = Release::new(version);
        let handle = tokio::spawn(async move { runner.run(&pipeline, release).await.unwrap() });
        let store = self.store.clone();
        let version = version.to_string();
        let run = cd_testkit::eventually(DEADLINE, || {
            let store = store.clone();
            let version = version.clone();
            async move {
                let r = store
                    .approval_requests(10)
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|r| r.release == version)?;
                let waiting = store
                    .nodes(&r.run_id)
                    .await
                    .unwrap()
                    .iter()
                    .any(|n| &*n.node == "approval" && n.status == NodeStatus::Waiting);
                waiting.then_some(r.run_id)
            }
        })
        .await
        .expect("the run never waited for approval");
        (run, handle)
    }
}

fn client() -> reqwest::Client {
    // Plain HTTP here; reqwest still wants a TLS provider configured.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Signs in; returns the `Cookie` header value.
async fn sign_in(base: &str, token: &str) -> String {
    let res = client()
        .post(format!("{base}/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "sign-in should redirect");
    let set = res
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    set.split(';').next().unwrap().to_string()
}

async fn get(base: &str, path: &str, cookie: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let res = client()
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, res.text().await.unwrap(), headers)
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + 64].to_string()
}

fn decision_id_of(page: &str) -> String {
    let at = page
        .find("name=\"decision_id\" value=\"")
        .expect("a decision id")
        + 26;
    page[at..at + 64].to_string()
}

#[tokio::test]
async fn sign_in_escaping_headers_csrf_and_replays() {
    let c = console().await;
    // Not signed in: every page sends you to /login.
    let (status, _, headers) = get(&c.base, "/approvals", "").await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/login");
    // A wrong token: refused with the reason.
    let res = client()
        .post(format!("{}/login", c.base))
        .form(&[("token", "cdt_000000000000_".to_string() + &"0".repeat(64))])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res
        .text()
        .await
        .unwrap()
        .contains("unknown token 000000000000"));

    let (alice, _) = c.token("alice").await;
    let cookie = sign_in(&c.base, &alice).await;

    // A release named like a script, in the store by other means: escaped.
    let evil = "<script>alert(1)</script>";
    c.store
        .create_run(&cd_core::RunRecord {
            id: "evil-run".into(),
            pipeline: evil.into(),
            definition_hash: "0".repeat(64),
            release: Release::new(evil),
            environment: "production".into(),
            status: RunStatus::Failed,
            started_by: evil.into(),
            started_at: chrono::Utc::now(),
            finished_at: None,
        })
        .await
        .unwrap();
    for path in ["/", "/runs/evil-run", "/environments"] {
        let (status, body, headers) = get(&c.base, path, &cookie).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.contains(evil), "{path} is not escaped");
        if path != "/environments" {
            assert!(
                body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{path}: {body}"
            );
        }
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(!csp.contains("script-src"), "{csp}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
    }

    let (run, handle) = c.waiting_run("v7").await;
    let (_, page, _) = get(&c.base, "/approvals", &cookie).await;
    assert!(
        page.contains(&format!("action=\"/approvals/{run}/approval\"")),
        "{page}"
    );
    assert!(
        page.contains("who may decide: alice or bob; not carol (started this run)"),
        "{page}"
    );
    let (csrf, decision_id) = (csrf_of(&page), decision_id_of(&page));
    let post = |form: Vec<(&'static str, String)>| {
        let (base, run, cookie) = (c.base.clone(), run.clone(), cookie.clone());
        async move {
            client()
                .post(format!("{base}/approvals/{run}/approval"))
                .header("cookie", cookie)
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    // Without its CSRF token, or with another: refused, nothing recorded.
    let res = post(vec![
        ("decision", "approve".into()),
        ("decision_id", decision_id.clone()),
    ])
    .await;
    assert_eq!(res.status(), 403);
    let res = post(vec![
        ("csrf", "f".repeat(64)),
        ("decision", "approve".into()),
        ("decision_id", decision_id.clone()),
    ])
    .await;
    assert_eq!(res.status(), 403);
    assert!(c
        .store
        .approvals(&run, "approval")
        .await
        .unwrap()
        .is_empty());

    // With it: recorded, from the remote address.
    let form = vec![
        ("csrf", csrf.clone()),
        ("decision", "approve".into()),
        ("comment", "ship it".into()),
        ("decision_id", decision_id.clone()),
    ];
    let res = post(form.clone()).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/approvals");
    let (_, page, _) = get(&c.base, "/approvals", &cookie).await;
    assert!(
        page.contains(&format!("alice approved `approval` of run {run}")),
        "{page}"
    );
    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let records = c.store.approvals(&run, "approval").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].approver, "alice");
    assert!(
        records[0]
            .via
            .as_deref()
            .unwrap()
            .starts_with("http 127.0.0.1:"),
        "{:?}",
        records[0].via
    );

    // The same form again (a replay): refused, still one record.
    let res = post(form).await;
    assert_eq!(res.status(), 303);
    let (_, page, _) = get(&c.base, "/approvals", &cookie).await;
    assert!(page.contains("class=\"err\""), "{page}");
    assert!(page.contains("already finished"), "{page}");
    assert_eq!(c.store.approvals(&run, "approval").await.unwrap().len(), 1);
    // Messages come from the server only: a crafted link shows nothing.
    let (_, page, _) = get(
        &c.base,
        "/approvals?error=token+expired,+paste+it+at+evil",
        &cookie,
    )
    .await;
    assert!(!page.contains("paste it at evil"), "{page}");

    // The run page draws the DAG with statuses and the load test.
    let (_, page, _) = get(&c.base, &format!("/runs/{run}"), &cookie).await;
    assert!(page.contains("aria-label=\"pipeline graph\""));
    for node in ["build", "load-test", "approval", "deploy"] {
        assert!(
            page.contains(&format!(">{node}</text>")),
            "{node} missing from the graph"
        );
    }
    assert!(page.contains("aria-label=\"latency distribution\""));
    assert!(
        page.contains("Load test <code>load-test</code>: 200 requests"),
        "{page}"
    );
}

#[tokio::test]
async fn the_json_api_needs_a_bearer_token_and_refuses_what_cdctl_refuses() {
    let c = console().await;
    let (run, handle) = c.waiting_run("v8").await;
    let api = |path: String, token: Option<String>, body: Option<String>| {
        let base = c.base.clone();
        async move {
            let mut r = match &body {
                Some(b) => client()
                    .post(format!("{base}{path}"))
                    .header("content-type", "application/json")
                    .body(b.clone()),
                None => client().get(format!("{base}{path}")),
            };
            if let Some(t) = token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            let res = r.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.text().await.unwrap())
        }
    };
    let (status, _) = api("/api/approvals".into(), None, None).await;
    assert_eq!(status, 401);
    let (mallory, _) = c.token("mallory").await;
    let (bob, _) = c.token("bob").await;
    let (status, body) = api("/api/approvals".into(), Some(bob.clone()), None).await;
    assert_eq!(status, 200);
    assert!(body.contains(&run));
    let decide = |who: String, id: &str| {
        let body = format!(r#"{{"decision":"approve","comment":"ok","decision_id":"{id}"}}"#);
        api(
            format!("/api/approvals/{run}/approval"),
            Some(who),
            Some(body),
        )
    };
    let (status, body) = decide(mallory, "m-1").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("who may: alice or bob"), "{body}");
    let (status, body) = decide(bob.clone(), "b-1").await;
    assert_eq!(status, 201, "{body}");
    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded);
    let (status, body) = decide(bob, "b-2").await;
    assert_eq!(status, 409, "{body}");
}

fn playwright() -> Option<PathBuf> {
    let dir = std::env::var_os("CD_PLAYWRIGHT_CORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cd_testkit::tools_dir().join("node/node_modules/playwright-core"));
    if dir.join("package.json").is_file() {
        return Some(dir);
    }
    if cd_testkit::tools_required() {
        panic!(
            "playwright-core is not installed at {} (scripts/setup.sh installs it)",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: playwright-core not installed at {}: run scripts/setup.sh",
        dir.display()
    );
    None
}

fn browser(args: &[&str], playwright: &Path, chromium: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console.cjs");
    let out = std::process::Command::new("node")
        .arg(script)
        .args(args)
        .env("PLAYWRIGHT_CORE", playwright)
        .env("CHROMIUM", chromium)
        .output()
        .expect("node runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "browser {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn a_person_approves_in_a_real_browser_and_the_run_goes_on() {
    let Some(chromium) = cd_testkit::require_tool("chromium") else {
        return;
    };
    if cd_testkit::require_tool("node").is_none() {
        return;
    }
    let Some(playwright) = playwright() else {
        return;
    };
    let c = console().await;
    let (run, handle) = c.waiting_run("v9").await;
    let (_, token_file) = c.token("alice").await;
    let tf = token_file.to_str().unwrap().to_string();

    let (base, run2, pw, ch) = (
        c.base.clone(),
        run.clone(),
        playwright.clone(),
        chromium.clone(),
    );
    let out = tokio::task::spawn_blocking(move || {
        browser(&["approve", &base, &tf, &run2, "approval"], &pw, &ch)
    })
    .await
    .unwrap();
    assert!(out.contains("signed in: cd"), "{out}");
    assert!(
        out.contains(&format!("decided: alice approved `approval` of run {run}")),
        "{out}"
    );

    let report = tokio::time::timeout(DEADLINE, handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Succeeded, "{report}");
    let records = c.store.approvals(&run, "approval").await.unwrap();
    assert_eq!(
        records[0].comment.as_deref(),
        Some("looks good (browser test)")
    );

    // The run page, as an artefact.
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-run.png");
    let (base, tf, pw, ch, p) = (
        c.base.clone(),
        token_file.to_str().unwrap().to_string(),
        playwright.clone(),
        chromium.clone(),
        png.to_str().unwrap().to_string(),
    );
    tokio::task::spawn_blocking(move || browser(&["screenshot", &base, &tf, &run, &p], &pw, &ch))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        bytes.len() > 10_000,
        "a {}-byte screenshot is blank",
        bytes.len()
    );
    eprintln!("screenshot of the run page: {}", png.display());
    if std::env::var_os("CD_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console-run.png");
        std::fs::create_dir_all(docs.parent().unwrap()).unwrap();
        std::fs::copy(&png, &docs).unwrap();
    }
}
