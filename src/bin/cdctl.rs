//! `cdctl`: the operator CLI for a cd state database — [`cd::cli`] with
//! nothing registered (the generic, store-only tool).
//!
//! Lists runs, shows a run's nodes and events, prints an environment's
//! release history, the stored SBOM and the environment locks, breaks a
//! stuck lock (with a reason, kept in an audit trail), records approvals or
//! rejections with an approver's token, manages tokens, incidents, and
//! serves the web console. Every command prints a table for people, or
//! JSON with `--json`.
//!
//! ```text
//! cdctl runs
//! cdctl run show 3f2a
//! cdctl history production --json
//! cdctl locks
//! cdctl unlock production --force --reason "deploy host died"
//! cdctl approve 3f2a approval --token-file alice.token --comment "load test looks fine"
//! ```
//!
//! Rollback and resume need the pipeline's deployers, which live in the
//! host binary: mount [`cd::cli`] there.
#![forbid(unsafe_code)]

#[cfg(not(feature = "sqlite"))]
fn main() {
    eprintln!("cdctl was built without the `sqlite` feature; rebuild with `--features sqlite`");
    std::process::exit(2);
}

#[cfg(feature = "sqlite")]
fn main() {
    cd::cli::main()
}
