//! `TestSuite`: the regression-test step. Runs the user's test command,
//! reads its JUnit XML report(s) ([`crate::junit`]), reruns failed cases to
//! tell flaky ones apart, and compares the result with the previous
//! release's in the same environment: new failures are **regressions**,
//! newly passing cases **fixed**, cases that disappeared **missing**.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cd_core::{
    Capabilities, Error, ErrorKind, EventKind, Result, Stage, StageContext, StageOutput,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::junit::{parse_junit, CaseStatus, Counts, TestCase, TestReport};

/// The placeholder in [`TestSuite::retry_failed`]'s arguments replaced by
/// the failed cases' names, one argument each.
pub const FAILED: &str = "{failed}";
/// The placeholder replaced by one argument: the failed cases' names
/// joined with ` or ` (pytest's `-k`).
pub const FAILED_OR: &str = "{failed_or}";
/// The placeholder replaced by one argument: a cargo-nextest filterset
/// matching exactly the failed tests (`test(=a) | test(=b)`).
pub const FAILED_NEXTEST: &str = "{failed_nextest}";

/// How this release's cases differ from the previous release's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The release compared with.
    pub previous_version: String,
    /// The run that produced the previous report.
    pub previous_run: String,
    /// Passed (or flaky) before, failing now.
    pub regressions: Vec<String>,
    /// Failing before, passing now.
    pub fixed: Vec<String>,
    /// In the previous report, not in this one.
    pub missing: Vec<String>,
    /// In this report, not in the previous one.
    pub new: Vec<String>,
}

/// What the stage outputs (and stores with the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSuiteOutput {
    /// The command, as run.
    pub command: Vec<String>,
    /// Its exit code (`None` when killed by a signal).
    pub exit_code: Option<i32>,
    /// Wall time of the first run, in milliseconds.
    pub duration_ms: f64,
    /// Cases by status (after reruns).
    pub counts: Counts,
    /// Every case.
    pub report: TestReport,
    /// Cases that failed and then passed on a rerun.
    pub flaky: Vec<String>,
    /// The comparison with the previous release, if there was one.
    pub comparison: Option<Comparison>,
    /// The summary table, as logged.
    pub table: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Retry {
    times: u32,
    args: Vec<String>,
}

/// Runs a test command and judges its JUnit report.
///
/// The command runs in its own process group, with the given working
/// directory and environment; its output is streamed as log events (the
/// first [`TestSuite::max_log_lines`], then a count). Report files are
/// removed before the run (a stale report is never read) and must exist
/// after it. The stage fails on failed or errored cases (flaky ones too,
/// unless [`TestSuite::allow_flaky`]), on a missing or malformed report
/// (naming the file and line), on a non-zero exit with no failing case
/// (unless [`TestSuite::allow_nonzero_exit`]), and on a command that
/// outlives its timeout (its process group gets SIGTERM, then SIGKILL 5 s
/// later). When the command exits, whatever it left in its group is
/// stopped the same way.
///
/// ```
/// use std::time::Duration;
/// use cd_stages::testsuite::{TestSuite, FAILED_NEXTEST};
/// let tests = TestSuite::new("cargo")
///     .args(["nextest", "run", "--profile", "ci"])
///     .report("target/nextest/ci/junit.xml")
///     .timeout(Duration::from_secs(600))
///     .retry_failed(1, ["nextest", "run", "--profile", "ci", "-E", FAILED_NEXTEST])
///     .allow_flaky(true);
/// # let _ = tests;
/// ```
#[derive(Debug, Clone)]
pub struct TestSuite {
    program: String,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    env: Vec<(String, String)>,
    timeout: Duration,
    reports: Vec<PathBuf>,
    retry: Option<Retry>,
    allow_flaky: bool,
    allow_nonzero_exit: bool,
    compare: bool,
    max_log_lines: usize,
}

impl TestSuite {
    /// Runs `program` (found on `PATH` unless a path).
    pub fn new(program: impl Into<String>) -> Self {
        TestSuite {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            timeout: Duration::from_secs(600),
            reports: Vec::new(),
            retry: None,
            allow_flaky: false,
            allow_nonzero_exit: false,
            compare: true,
            max_log_lines: 200,
        }
    }

    /// Its arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Its working directory (report paths are relative to it).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// An environment variable for it.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long it may run (default 10 min); then its process group is
    /// killed and the stage fails with [`ErrorKind::Timeout`].
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// A JUnit XML file it writes (several: their cases are merged).
    pub fn report(mut self, path: impl Into<PathBuf>) -> Self {
        self.reports.push(path.into());
        self
    }

    /// After a run with failures, runs the program again up to `times`
    /// times with these arguments, where [`FAILED`], [`FAILED_OR`] or
    /// [`FAILED_NEXTEST`] stand for the cases still failing. A case that
    /// passes on a rerun is [`CaseStatus::Flaky`].
    pub fn retry_failed<I, S>(mut self, times: u32, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.retry = Some(Retry {
            times,
            args: args.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Whether flaky cases pass the stage (default no: they fail it, and
    /// are reported as flaky).
    pub fn allow_flaky(mut self, yes: bool) -> Self {
        self.allow_flaky = yes;
        self
    }

    /// Whether a non-zero exit with no failing case in the report passes
    /// (default no: the command failed outside its tests).
    pub fn allow_nonzero_exit(mut self, yes: bool) -> Self {
        self.allow_nonzero_exit = yes;
        self
    }

    /// Whether to compare with the previous release's report (default yes).
    pub fn compare_with_previous(mut self, yes: bool) -> Self {
        self.compare = yes;
        self
    }

    /// How many output lines become log events (default 200; the rest are
    /// counted).
    pub fn max_log_lines(mut self, n: usize) -> Self {
        self.max_log_lines = n;
        self
    }

    fn report_paths(&self) -> Vec<PathBuf> {
        self.reports
            .iter()
            .map(|p| match (&self.cwd, p.is_absolute()) {
                (Some(cwd), false) => cwd.join(p),
                _ => p.clone(),
            })
            .collect()
    }

    fn command_line(&self, args: &[String]) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(args.iter().cloned())
            .collect()
    }

    /// Runs the program once with `args`; returns its exit code.
    async fn run_once(&self, args: &[String], cx: &StageContext) -> Result<Option<i32>> {
        let shown = self.command_line(args).join(" ");
        for p in self.report_paths() {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::from(e)
                        .with("node", cx.node())
                        .with("file", p.display()))
                }
            }
        }
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::new(
                ErrorKind::Invalid,
                format!("cannot start test command `{shown}`: {e}"),
            )
            .with("node", cx.node())
            .with("command", &shown)
        })?;
        let group = child.id();
        let kill_group = KillGroupOnDrop(group);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(forward_lines(pipe, tx.clone()));
        }
        drop(tx);
        let mut logged = 0usize;
        let mut dropped = 0usize;
        let mut log = |line: String| {
            if logged < self.max_log_lines {
                cx.log(line);
                logged += 1;
            } else {
                dropped += 1;
            }
        };
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut open = true;
        let status = loop {
            tokio::select! {
                line = rx.recv(), if open => match line {
                    Some(line) => log(line),
                    None => open = false,
                },
                status = child.wait() => break status,
                _ = &mut deadline => {
                    stop_group(group).await;
                    let _ = child.wait().await;
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "test command `{shown}` still ran after {} s; its process group was stopped",
                            self.timeout.as_secs()
                        ),
                    )
                    .with("node", cx.node())
                    .with("command", &shown));
                }
                _ = cx.cancel_token().cancelled() => {
                    stop_group(group).await;
                    let _ = child.wait().await;
                    return Err(Error::cancelled().with("node", cx.node()).with("command", &shown));
                }
            }
        };
        // The command is done: what it left behind in its group is stopped,
        // and the output still in the pipes is read (for a bounded time: a
        // process outside the group may still hold them).
        stop_group(group).await;
        drop(kill_group);
        let drain = tokio::time::sleep(DRAIN);
        tokio::pin!(drain);
        while open {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(line) => log(line),
                    None => open = false,
                },
                _ = &mut drain => break,
            }
        }
        if dropped > 0 {
            cx.log(format!("… {dropped} more output lines not logged"));
        }
        let status = status.map_err(|e| Error::from(e).with("command", &shown))?;
        Ok(status.code())
    }

    /// Reads and merges the report files.
    fn read_reports(
        &self,
        shown: &str,
        exit: Option<i32>,
        cx: &StageContext,
    ) -> Result<TestReport> {
        let paths = self.report_paths();
        if paths.is_empty() {
            return Err(Error::invalid("TestSuite needs at least one .report(path)")
                .with("node", cx.node()));
        }
        let mut report = TestReport::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                Error::new(
                    ErrorKind::Failed,
                    format!(
                        "test command `{shown}` (exit code {}) left no readable report {}: {e}",
                        exit.map_or("none".into(), |c| c.to_string()),
                        p.display()
                    ),
                )
                .with("node", cx.node())
                .with("file", p.display())
            })?;
            let part = parse_junit(&text, &p.display().to_string()).map_err(|e| {
                Error::new(ErrorKind::Invalid, e.to_string())
                    .with("node", cx.node())
                    .with("file", &e.file)
                    .with("line", e.line)
            })?;
            report.extend(part);
        }
        Ok(report)
    }

    /// The previous release's report of this node in this environment
    /// ([`crate::previous`]).
    async fn previous(&self, cx: &StageContext) -> Result<Option<(String, String, TestReport)>> {
        let Some(p) = crate::previous::previous_result(cx, REPORT_EVENT).await? else {
            return Ok(None);
        };
        Ok(p.data
            .get("report")
            .and_then(|r| serde_json::from_value::<TestReport>(r.clone()).ok())
            .map(|r| (p.version, p.run_id, r)))
    }
}

/// The event a `TestSuite` emits with its counts, comparison and full
/// report (so the next release compares with it whether this run passed).
pub const REPORT_EVENT: &str = "test_report";

/// Compares two reports case by case.
pub fn compare(previous: &TestReport, current: &TestReport) -> Comparison {
    let before = previous.by_id();
    let now = current.by_id();
    let mut c = Comparison::default();
    for (id, case) in &now {
        match before.get(id) {
            None => c.new.push(id.clone()),
            Some(old) => {
                let was_ok = matches!(old.status, CaseStatus::Passed | CaseStatus::Flaky);
                if case.status.is_failure() && was_ok {
                    c.regressions.push(id.clone());
                } else if old.status.is_failure()
                    && matches!(case.status, CaseStatus::Passed | CaseStatus::Flaky)
                {
                    c.fixed.push(id.clone());
                }
            }
        }
    }
    c.missing = before
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    c
}

/// Up to this many cases, the table lists every case; above, only those
/// worth a look (regressions, failures, flaky, fixed, missing).
const SHOW_ALL: usize = 20;

/// The summary table: counts, then one row per case worth a look.
fn table(counts: &Counts, report: &TestReport, cmp: Option<&Comparison>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["RESULT", "TEST", "TIME", "DETAIL"]);
    let regressions: Vec<&String> = cmp
        .map(|c| c.regressions.iter().collect())
        .unwrap_or_default();
    let mut rows: Vec<(u8, Vec<String>)> = Vec::new();
    for case in &report.cases {
        let id = case.id();
        let small = report.cases.len() <= SHOW_ALL;
        let label = if regressions.contains(&&id) {
            (0, "REGRESSION")
        } else {
            match case.status {
                CaseStatus::Failed => (1, "failed"),
                CaseStatus::Error => (1, "error"),
                CaseStatus::Flaky => (2, "flaky"),
                CaseStatus::Passed if small => (5, "passed"),
                CaseStatus::Skipped if small => (6, "skipped"),
                _ => continue,
            }
        };
        rows.push((
            label.0,
            vec![
                label.1.to_string(),
                id,
                format!("{:.0} ms", case.duration_ms),
                truncate(case.message.as_deref().unwrap_or(""), 80),
            ],
        ));
    }
    if let Some(c) = cmp {
        for id in &c.fixed {
            rows.push((
                3,
                vec!["fixed".into(), id.clone(), String::new(), String::new()],
            ));
        }
        for id in &c.missing {
            rows.push((
                4,
                vec![
                    "missing".into(),
                    id.clone(),
                    String::new(),
                    "not in this report".into(),
                ],
            ));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1[1].cmp(&b.1[1])));
    for (_, r) in rows {
        t.add_row(r);
    }
    let head = format!(
        "tests: {} passed, {} failed, {} errors, {} skipped, {} flaky{}",
        counts.passed,
        counts.failed,
        counts.errors,
        counts.skipped,
        counts.flaky,
        match cmp {
            Some(c) => format!(
                " · vs {}: {} regressions, {} fixed, {} missing, {} new",
                c.previous_version,
                c.regressions.len(),
                c.fixed.len(),
                c.missing.len(),
                c.new.len()
            ),
            None => " · no earlier report to compare with".into(),
        }
    );
    if t.row_count() == 0 {
        head
    } else {
        format!("{head}\n{t}")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// How long a test command's process group gets between SIGTERM and
/// SIGKILL (cargo-nextest and pytest stop their own test processes on
/// SIGTERM; SIGKILL would leave those in their own groups running).
const TERM_GRACE: Duration = Duration::from_secs(5);

/// How long output is still read after the command exited.
const DRAIN: Duration = Duration::from_secs(2);

/// The longest output line kept, in bytes (the rest of the line is cut).
const MAX_LINE: usize = 2000;

/// Forwards `pipe`'s lines (invalid UTF-8 replaced, long lines cut) to `tx`,
/// reading to the end whatever happens, so the command never writes into a
/// closed pipe.
async fn forward_lines(
    pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // Read one line, keeping at most MAX_LINE bytes of it.
        let mut cut = false;
        loop {
            let chunk = match reader.fill_buf().await {
                Ok([]) => break,
                Ok(c) => c,
                Err(_) => break,
            };
            let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
                Some(p) => (p + 1, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE.saturating_sub(buf.len());
            if take > room {
                cut = true;
            }
            buf.extend_from_slice(&chunk[..take.min(room)]);
            reader.consume(take);
            if end {
                break;
            }
        }
        if buf.is_empty() && !cut {
            return;
        }
        let mut line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\n', '\r'])
            .to_string();
        if cut {
            line.push('…');
        }
        // The receiver may be gone (the stage ended): keep draining.
        let _ = tx.send(line).await;
    }
}

/// Stops a process group: SIGTERM, then SIGKILL after [`TERM_GRACE`] if
/// anything in it is still alive.
async fn stop_group(group: Option<u32>) {
    use nix::sys::signal::{killpg, Signal};
    let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let pgid = nix::unistd::Pid::from_raw(pid);
    if killpg(pgid, Signal::SIGTERM).is_err() {
        return; // nothing left in the group
    }
    let deadline = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if killpg(pgid, None).is_err() {
            return;
        }
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

/// Kills a process group (SIGKILL) when dropped, unless it has none.
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Replaces the placeholders in a rerun's arguments.
fn rerun_args(template: &[String], failed: &[&TestCase]) -> Vec<String> {
    let mut out = Vec::new();
    for a in template {
        if a == FAILED {
            out.extend(failed.iter().map(|c| c.name.clone()));
        } else if a.contains(FAILED_OR) {
            let names: Vec<&str> = failed.iter().map(|c| c.name.as_str()).collect();
            out.push(a.replace(FAILED_OR, &names.join(" or ")));
        } else if a.contains(FAILED_NEXTEST) {
            let set: Vec<String> = failed
                .iter()
                .map(|c| format!("test(={})", c.name))
                .collect();
            out.push(a.replace(FAILED_NEXTEST, &set.join(" | ")));
        } else {
            out.push(a.clone());
        }
    }
    out
}

#[async_trait]
impl Stage for TestSuite {
    fn kind(&self) -> String {
        "test-suite".into()
    }

    fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CHECK
    }

    async fn run(&self, cx: &StageContext) -> Result<StageOutput> {
        let shown = self.command_line(&self.args).join(" ");
        cx.log(format!("running tests: {shown}"));
        let started = Instant::now();
        let exit = self.run_once(&self.args, cx).await?;
        let duration_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let mut report = self.read_reports(&shown, exit, cx)?;
        if exit != Some(0) && report.failures().next().is_none() && !self.allow_nonzero_exit {
            return Err(Error::failed(format!(
                "test command `{shown}` exited with {} although its report shows no failing case \
                 (a crash outside the tests, a coverage threshold, a setup error?); see its output \
                 above, or allow it with .allow_nonzero_exit(true)",
                exit.map_or("a signal".to_string(), |c| format!("code {c}"))
            ))
            .with("node", cx.node())
            .with("command", &shown));
        }

        // Reruns: a case failing first and passing later is flaky.
        let mut flaky: Vec<String> = Vec::new();
        if let Some(retry) = &self.retry {
            for attempt in 1..=retry.times {
                let failing: Vec<&TestCase> = report.failures().collect();
                if failing.is_empty() {
                    break;
                }
                let args = rerun_args(&retry.args, &failing);
                let again = self.command_line(&args).join(" ");
                cx.log(format!(
                    "rerun {attempt}/{} of {} failed case(s): {again}",
                    retry.times,
                    failing.len()
                ));
                let code = self.run_once(&args, cx).await?;
                let rerun = self.read_reports(&again, code, cx)?;
                let passed: BTreeMap<String, &TestCase> = rerun
                    .cases
                    .iter()
                    .filter(|c| matches!(c.status, CaseStatus::Passed | CaseStatus::Flaky))
                    .map(|c| (c.id(), c))
                    .collect();
                for case in report.cases.iter_mut().filter(|c| c.status.is_failure()) {
                    if passed.contains_key(&case.id()) {
                        case.status = CaseStatus::Flaky;
                        flaky.push(case.id());
                    }
                }
            }
        }
        flaky.extend(
            report
                .cases
                .iter()
                .filter(|c| c.status == CaseStatus::Flaky)
                .map(TestCase::id)
                .filter(|id| !flaky.contains(id))
                .collect::<Vec<_>>(),
        );

        let comparison = if self.compare {
            self.previous(cx).await?.map(|(version, run, prev)| {
                let mut c = compare(&prev, &report);
                c.previous_version = version;
                c.previous_run = run;
                c
            })
        } else {
            None
        };
        let counts = report.counts();
        let table = table(&counts, &report, comparison.as_ref());
        for line in table.lines() {
            cx.log(line.to_string());
        }
        let output = TestSuiteOutput {
            command: self.command_line(&self.args),
            exit_code: exit,
            duration_ms,
            counts,
            report,
            flaky: flaky.clone(),
            comparison: comparison.clone(),
            table: table.clone(),
        };
        cx.events().emit(EventKind::Custom {
            name: REPORT_EVENT.into(),
            data: serde_json::json!({
                "report": output.report,
                "counts": counts,
                "flaky": flaky,
                "regressions": comparison.as_ref().map(|c| c.regressions.clone()).unwrap_or_default(),
                "fixed": comparison.as_ref().map(|c| c.fixed.clone()).unwrap_or_default(),
                "missing": comparison.as_ref().map(|c| c.missing.clone()).unwrap_or_default(),
            }),
        });
        let failing: Vec<String> = output.report.failures().map(TestCase::id).collect();
        let flaky_fails = !self.allow_flaky && !output.flaky.is_empty();
        if failing.is_empty() && !flaky_fails {
            if counts.total() == 0 {
                cx.events()
                    .warn(format!("`{shown}` reported no test cases"));
            }
            return StageOutput::from_serialize(&output);
        }
        let mut why = Vec::new();
        if !failing.is_empty() {
            let regressions = comparison.map(|c| c.regressions).unwrap_or_default();
            why.push(format!(
                "{} failing: {}{}",
                failing.len(),
                list(&failing, 5),
                if regressions.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} regressions: {})",
                        regressions.len(),
                        list(&regressions, 5)
                    )
                }
            ));
        }
        if flaky_fails {
            why.push(format!(
                "{} flaky: {}",
                output.flaky.len(),
                list(&output.flaky, 5)
            ));
        }
        Err(
            Error::failed(format!("tests of `{shown}` failed: {}", why.join("; ")))
                .with("node", cx.node())
                .with("command", shown),
        )
    }
}

fn list(items: &[String], max: usize) -> String {
    let mut s = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        s.push_str(&format!(" and {} more", items.len() - max));
    }
    s
}
