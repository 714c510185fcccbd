//! JUnit XML test reports, typed: what cargo-nextest, pytest
//! (`--junitxml`), Maven Surefire / JUnit 5 and gotestsum write.
//!
//! The format has no single standard; this reads the common shape
//! (`<testsuites>` optional, `<testsuite>` possibly nested, `<testcase
//! name classname time>` with `<failure>`, `<error>`, `<skipped>`,
//! `<system-out>`, `<system-err>`), and the rerun elements nextest and
//! Surefire add (`<flakyFailure>`, `<rerunFailure>`: a test that failed and
//! then passed is [`CaseStatus::Flaky`]). Times are seconds in the XML and
//! milliseconds here.
//!
//! ```
//! use cd_stages::junit::{parse_junit, CaseStatus};
//! let xml = r#"<testsuites>
//!   <testsuite name="api" tests="2">
//!     <testcase classname="api::users" name="creates" time="0.012"/>
//!     <testcase classname="api::users" name="deletes" time="0.5">
//!       <failure message="expected 204, got 500">assertion failed</failure>
//!     </testcase>
//!   </testsuite>
//! </testsuites>"#;
//! let report = parse_junit(xml, "report.xml").unwrap();
//! assert_eq!(report.cases.len(), 2);
//! assert_eq!(report.cases[1].id(), "api::users::deletes");
//! assert_eq!(report.cases[1].status, CaseStatus::Failed);
//! assert_eq!(report.cases[1].duration_ms, 500.0);
//! assert_eq!(report.counts().failed, 1);
//! ```

use std::collections::BTreeMap;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

/// How much of a failure's text or a test's output is kept, in bytes (the
/// tail, where the assertion usually is).
pub const MAX_EXCERPT: usize = 4000;

/// How one test case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    /// Passed.
    Passed,
    /// An assertion failed (`<failure>`).
    Failed,
    /// It could not run to an assertion: a panic outside one, a crash, a
    /// setup error (`<error>`).
    Error,
    /// Not run (`<skipped>`).
    Skipped,
    /// Failed, then passed on a rerun (`<flakyFailure>`, or a rerun by the
    /// `TestSuite` stage).
    Flaky,
}

impl CaseStatus {
    /// Whether the case counts against the run (failed or error).
    pub fn is_failure(self) -> bool {
        matches!(self, CaseStatus::Failed | CaseStatus::Error)
    }

    /// The status's name (`passed`, `failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Passed => "passed",
            CaseStatus::Failed => "failed",
            CaseStatus::Error => "error",
            CaseStatus::Skipped => "skipped",
            CaseStatus::Flaky => "flaky",
        }
    }
}

/// One test case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    /// The innermost `<testsuite name>` it was in.
    pub suite: String,
    /// `classname` (a module, a class, a file), possibly empty.
    pub classname: String,
    /// `name`.
    pub name: String,
    /// How it ended.
    pub status: CaseStatus,
    /// `time`, in milliseconds (0 when absent).
    pub duration_ms: f64,
    /// The failure's or error's `message` attribute, or the first line of
    /// its text; the skip reason for a skipped case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The tail of the failure's text, `<system-out>` and `<system-err>`
    /// (at most [`MAX_EXCERPT`] bytes), for failed, error and flaky cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl TestCase {
    /// The case's identity across runs: `classname::name`, or `suite::name`
    /// without a classname, or `name` alone without either.
    pub fn id(&self) -> String {
        let prefix = if self.classname.is_empty() {
            &self.suite
        } else {
            &self.classname
        };
        if prefix.is_empty() {
            self.name.clone()
        } else {
            format!("{prefix}::{}", self.name)
        }
    }
}

/// Cases by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Errors.
    pub errors: usize,
    /// Skipped.
    pub skipped: usize,
    /// Flaky (failed, then passed).
    pub flaky: usize,
}

impl Counts {
    /// Every case.
    pub fn total(&self) -> usize {
        self.passed + self.failed + self.errors + self.skipped + self.flaky
    }
}

/// Every case of one or more JUnit files, in file order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    /// The cases.
    pub cases: Vec<TestCase>,
}

impl TestReport {
    /// Cases by status.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for case in &self.cases {
            match case.status {
                CaseStatus::Passed => c.passed += 1,
                CaseStatus::Failed => c.failed += 1,
                CaseStatus::Error => c.errors += 1,
                CaseStatus::Skipped => c.skipped += 1,
                CaseStatus::Flaky => c.flaky += 1,
            }
        }
        c
    }

    /// The failed and errored cases.
    pub fn failures(&self) -> impl Iterator<Item = &TestCase> {
        self.cases.iter().filter(|c| c.status.is_failure())
    }

    /// Adds another report's cases.
    pub fn extend(&mut self, other: TestReport) {
        self.cases.extend(other.cases);
    }

    /// Each case by id; a case reported more than once (a rerun in the
    /// same file) keeps its last status.
    pub fn by_id(&self) -> BTreeMap<String, &TestCase> {
        self.cases.iter().map(|c| (c.id(), c)).collect()
    }
}

/// A JUnit file that cannot be read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: not a JUnit XML report: {reason}")]
pub struct JunitError {
    /// The file.
    pub file: String,
    /// The line (1-based) where reading stopped.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

/// Parses one JUnit XML document; `file` names it in errors.
///
/// Errors: [`JunitError`] with the file and line of malformed XML, of a
/// document with no `<testsuites>` or `<testsuite>`, or of a `<testcase>`
/// without a name.
pub fn parse_junit(xml: &str, file: &str) -> Result<TestReport, JunitError> {
    let line_at = |pos: u64| {
        xml.as_bytes()[..(pos as usize).min(xml.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    };
    let fail = |pos: u64, reason: String| JunitError {
        file: file.to_string(),
        line: line_at(pos),
        reason,
    };
    let mut reader = Reader::from_str(xml);
    let mut st = State::default();
    loop {
        let pos = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| fail(reader.error_position(), e.to_string()))?;
        match event {
            Event::Start(e) => st.open(&e).map_err(|r| fail(pos, r))?,
            Event::Empty(e) => {
                st.open(&e).map_err(|r| fail(pos, r))?;
                st.close(e.local_name().as_ref());
            }
            Event::End(e) => st.close(e.local_name().as_ref()),
            Event::Text(t) if st.text_of.is_some() => {
                let s = t.unescape().map_err(|e| fail(pos, e.to_string()))?;
                st.text.push_str(&s);
            }
            Event::CData(t) if st.text_of.is_some() => {
                st.text.push_str(&String::from_utf8_lossy(&t));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !st.saw_root {
        return Err(fail(0, "no <testsuites> or <testsuite> element".into()));
    }
    Ok(st.report)
}

/// The reader's place in the document.
#[derive(Default)]
struct State {
    saw_root: bool,
    suites: Vec<String>,
    report: TestReport,
    /// The case being read.
    case: Option<TestCase>,
    /// The child element whose text is being read, and the text so far.
    text_of: Option<Vec<u8>>,
    text: String,
    /// The case's failure text and output so far.
    output: String,
    /// The case has a `<flakyFailure>`/`<rerunFailure>`.
    reran_failed: bool,
}

impl State {
    fn open(&mut self, e: &BytesStart<'_>) -> Result<(), String> {
        let name = e.local_name().as_ref().to_vec();
        match name.as_slice() {
            b"testsuites" => self.saw_root = true,
            b"testsuite" => {
                self.saw_root = true;
                self.suites.push(attr(e, b"name").unwrap_or_default());
            }
            b"testcase" => {
                let n = attr(e, b"name").ok_or("a <testcase> has no name attribute")?;
                let time = attr(e, b"time")
                    .and_then(|t| t.trim().replace(',', "").parse::<f64>().ok())
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .unwrap_or(0.0);
                self.case = Some(TestCase {
                    suite: self.suites.last().cloned().unwrap_or_default(),
                    classname: attr(e, b"classname").unwrap_or_default(),
                    name: n,
                    status: CaseStatus::Passed,
                    duration_ms: (time * 1e6).round() / 1e3,
                    message: None,
                    output: None,
                });
                self.output.clear();
                self.reran_failed = false;
            }
            b"failure" | b"error" | b"skipped" => {
                if let Some(c) = self.case.as_mut() {
                    let status = match name.as_slice() {
                        b"failure" => CaseStatus::Failed,
                        b"error" => CaseStatus::Error,
                        _ => CaseStatus::Skipped,
                    };
                    // A failure wins over a skip; the first failure's
                    // message is kept.
                    if c.status == CaseStatus::Passed
                        || (status.is_failure() && !c.status.is_failure())
                    {
                        c.status = status;
                        c.message = attr(e, b"message");
                    }
                    self.text_of = Some(name);
                    self.text.clear();
                }
            }
            b"flakyFailure" | b"flakyError" | b"rerunFailure" | b"rerunError" => {
                self.reran_failed = true;
                self.text_of = Some(name);
                self.text.clear();
            }
            b"system-out" | b"system-err" if self.case.is_some() => {
                self.text_of = Some(name);
                self.text.clear();
            }
            _ => {}
        }
        Ok(())
    }

    fn close(&mut self, name: &[u8]) {
        if self.text_of.as_deref() == Some(name) {
            self.text_of = None;
            if let Some(c) = self.case.as_mut() {
                if matches!(name, b"failure" | b"error" | b"skipped") && c.message.is_none() {
                    c.message = self
                        .text
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty())
                        .map(str::to_string);
                }
            }
            if !self.text.trim().is_empty() {
                if !self.output.is_empty() {
                    self.output.push('\n');
                }
                self.output.push_str(self.text.trim_end());
                if self.output.len() > 4 * MAX_EXCERPT {
                    self.output = tail(&self.output, MAX_EXCERPT);
                }
            }
            self.text.clear();
        }
        match name {
            b"testcase" => {
                if let Some(mut c) = self.case.take() {
                    if c.status == CaseStatus::Passed && self.reran_failed {
                        c.status = CaseStatus::Flaky;
                    }
                    let keep = matches!(
                        c.status,
                        CaseStatus::Failed | CaseStatus::Error | CaseStatus::Flaky
                    );
                    if keep && !self.output.is_empty() {
                        c.output = Some(tail(&self.output, MAX_EXCERPT));
                    }
                    self.report.cases.push(c);
                }
            }
            b"testsuite" => {
                self.suites.pop();
            }
            _ => {}
        }
    }
}

/// An attribute's unescaped value.
fn attr(e: &BytesStart<'_>, key: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == key)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// The last `max` bytes of `s` (on a character boundary), marked when cut.
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_report() {
        let xml = include_str!("../tests/fixtures/junit/pytest.xml");
        let r = parse_junit(xml, "pytest.xml").unwrap();
        let c = r.counts();
        assert_eq!(
            (c.passed, c.failed, c.errors, c.skipped),
            (2, 1, 1, 1),
            "{r:#?}"
        );
        let failed = r
            .cases
            .iter()
            .find(|c| c.status == CaseStatus::Failed)
            .unwrap();
        assert_eq!(failed.id(), "tests.test_api::test_create_user");
        assert!(failed
            .message
            .as_deref()
            .unwrap()
            .contains("assert 500 == 201"));
        assert!(failed
            .output
            .as_deref()
            .unwrap()
            .contains("def test_create_user"));
    }

    #[test]
    fn junit5_surefire_report_with_a_flaky_rerun() {
        let xml = include_str!("../tests/fixtures/junit/surefire.xml");
        let r = parse_junit(xml, "TEST-com.example.CartTest.xml").unwrap();
        let c = r.counts();
        assert_eq!(
            (c.passed, c.failed, c.skipped, c.flaky),
            (1, 1, 1, 1),
            "{r:#?}"
        );
        let flaky = r
            .cases
            .iter()
            .find(|c| c.status == CaseStatus::Flaky)
            .unwrap();
        assert_eq!(flaky.id(), "com.example.CartTest::checkoutTimesOut");
        assert_eq!(flaky.duration_ms, 1234.0);
    }

    #[test]
    fn gotestsum_report() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" failures="1" errors="0" time="0.512">
	<testsuite tests="3" failures="1" time="0.510" name="example.com/shop/cart" timestamp="2026-11-30T08:00:00Z">
		<properties>
			<property name="go.version" value="go1.22.5 linux/amd64"></property>
		</properties>
		<testcase classname="example.com/shop/cart" name="TestAdd" time="0.000"></testcase>
		<testcase classname="example.com/shop/cart" name="TestCheckout/with_coupon" time="0.010">
			<failure message="Failed" type="">=== RUN   TestCheckout/with_coupon&#xA;    cart_test.go:42: total = 100, want 90&#xA;--- FAIL: TestCheckout/with_coupon (0.01s)&#xA;</failure>
		</testcase>
		<testcase classname="example.com/shop/cart" name="TestRefund" time="0.000">
			<skipped message="=== RUN   TestRefund&#xA;    cart_test.go:60: needs a payment sandbox&#xA;"></skipped>
		</testcase>
	</testsuite>
</testsuites>"#;
        let r = parse_junit(xml, "junit.xml").unwrap();
        let c = r.counts();
        assert_eq!((c.passed, c.failed, c.skipped), (1, 1, 1), "{r:#?}");
        let failed = r.failures().next().unwrap();
        assert_eq!(
            failed.id(),
            "example.com/shop/cart::TestCheckout/with_coupon"
        );
        assert!(failed
            .output
            .as_deref()
            .unwrap()
            .contains("total = 100, want 90"));
    }

    #[test]
    fn malformed_xml_names_file_and_line() {
        let err = parse_junit(
            "<testsuite name=\"a\">\n<testcase name=\"x\">\n</testsuite>",
            "r.xml",
        )
        .unwrap_err();
        assert_eq!(err.file, "r.xml");
        assert_eq!(err.line, 3, "{err}");
        let err = parse_junit("<html><body/></html>", "index.html").unwrap_err();
        assert!(err.to_string().contains("no <testsuites>"), "{err}");
        let err = parse_junit(
            "<testsuite><testcase classname=\"a\"/></testsuite>",
            "r.xml",
        )
        .unwrap_err();
        assert!(err.reason.contains("no name"), "{err}");
    }
}
