//! The secret scanner against detect-secrets (PyPI, installed by
//! `scripts/setup.sh`), in one run, on the same generated corpus: about
//! 50 MB of filler source files around 10 copies of the planted tree (one
//! secret of each of the 17 kinds the rules know).
//!
//! Recall is the share of planted secrets (file and line) a scanner
//! reports; detect-secrets runs with `--all-files` and its default plugins.
//!
//! ```text
//! cargo bench --bench secret_scan
//! CD_SECRETS_MB=100 cargo bench --bench secret_scan
//! ```
//!
//! Last line: `bench secret_scan: cd_s=<x> detect_secrets_s=<y>
//! speedup=<y/x> cd_recall=<r1> ds_recall=<r2>`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use cd::stages::compliance::secrets::{scan_path, ScanOptions};

fn main() {
    let mb: u64 = std::env::var("CD_SECRETS_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let planted = cd_testkit::secrets::write_corpus(root, mb << 20, 10);
    let want: BTreeSet<(String, usize)> = planted.iter().map(|p| (p.0.clone(), p.2)).collect();
    println!(
        "corpus: {mb} MB of filler + {} planted secrets of {} kinds",
        planted.len(),
        planted
            .iter()
            .map(|p| p.1.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    );

    // Warm the page cache for both, then cd.
    let _ = scan_path(root, &ScanOptions::default()).unwrap();
    let t = Instant::now();
    let report = scan_path(root, &ScanOptions::default()).unwrap();
    let cd_s = t.elapsed().as_secs_f64();
    let cd_found: BTreeSet<(String, usize)> = report
        .findings
        .iter()
        .map(|f| (f.file.clone(), f.line))
        .collect();
    let cd_hits = want.intersection(&cd_found).count();
    println!(
        "cd:             {cd_s:.3} s, {} files, {} MB, {} findings, recall {cd_hits}/{}",
        report.files,
        report.bytes >> 20,
        report.findings.len(),
        want.len()
    );

    let ds = ["detect-secrets"]
        .into_iter()
        .map(|n| {
            std::env::var("CD_TOOLS_DIR")
                .map(|d| format!("{d}/venv/bin/{n}"))
                .unwrap_or_else(|_| n.to_string())
        })
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| "detect-secrets".into());
    let t = Instant::now();
    let out = std::process::Command::new(&ds)
        .args(["scan", "--all-files", "."])
        .current_dir(root)
        .output();
    let ds_s = t.elapsed().as_secs_f64();
    let (ds_hits, per_kind) = match out {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            let mut found = BTreeSet::new();
            if let Some(results) = v["results"].as_object() {
                for (file, list) in results {
                    for r in list.as_array().into_iter().flatten() {
                        if let Some(n) = r["line_number"].as_u64() {
                            found.insert((file.trim_start_matches("./").to_string(), n as usize));
                        }
                    }
                }
            }
            let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for p in &planted {
                let e = per_kind.entry(p.1.as_str()).or_default();
                e.1 += 1;
                if found.contains(&(p.0.clone(), p.2)) {
                    e.0 += 1;
                }
            }
            (want.intersection(&found).count(), per_kind)
        }
        Ok(o) => {
            println!(
                "detect-secrets failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            (0, BTreeMap::new())
        }
        Err(e) => {
            println!("detect-secrets not installed ({e}): scripts/setup.sh installs it");
            (0, BTreeMap::new())
        }
    };
    println!(
        "detect-secrets: {ds_s:.3} s, recall {ds_hits}/{}",
        want.len()
    );
    for (kind, (hit, n)) in &per_kind {
        println!("  detect-secrets {kind:<28} {hit}/{n}");
    }
    let n = want.len() as f64;
    println!(
        "bench secret_scan: cd_s={cd_s:.3} detect_secrets_s={ds_s:.3} speedup={:.1} cd_recall={:.2} ds_recall={:.2}",
        ds_s / cd_s,
        cd_hits as f64 / n,
        ds_hits as f64 / n
    );
}
