//! The operator CLI as a library: the `cdctl` commands as a clap
//! subcommand set ([`Command`]) that a deploy binary mounts next to its own
//! commands, with its pipelines and deployers registered on an
//! [`Operator`], so `mydeploy rollback production --to v41`, `mydeploy
//! resume <run>`, `mydeploy approve ...` and `mydeploy history production`
//! work with that binary's deployers. `cdctl` is this module with nothing
//! registered: the generic, store-only tool.
//!
//! Tables via comfy-table, `--json` everywhere, durations via humantime.
//! Exit status: [`exit_code`].
//!
//! ```no_run
//! use clap::Parser;
//! use cd::cli::{Command, Operator, Options};
//!
//! #[derive(Parser)]
//! struct MyDeploy {
//!     #[command(flatten)]
//!     options: Options,
//!     #[command(subcommand)]
//!     command: MyCommand,
//! }
//!
//! #[derive(clap::Subcommand)]
//! enum MyCommand {
//!     /// Deploy a version (the binary's own command).
//!     Deploy { version: String },
//!     #[command(flatten)]
//!     Operate(Command),
//! }
//!
//! # fn deploy_stage() -> cd::stages::Deploy {
//! #     cd::stages::Deploy::new(cd::core::MemoryDeployer::new(["web-1"]))
//! # }
//! let cli = MyDeploy::parse();
//! match cli.command {
//!     MyCommand::Deploy { version } => { /* run your pipeline */ }
//!     MyCommand::Operate(command) => Operator::new()
//!         .deploy("production", deploy_stage())
//!         .main(cd::cli::Cli { options: cli.options, command }),
//! }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use cd_backends::sqlite::SqliteStore;
use cd_core::{Decision, Error, ErrorKind, NodeStatus, Pipeline, Result, RunStatus, Store};
use cd_stages::{Deploy, Restore};

/// How rollback is done, printed in `cdctl --help`.
pub const ROLLBACK_HELP: &str = "\
Rollback and resume need your pipeline's deployers, which live in your deploy
binary: mount these commands there (cd::cli::Operator with .deploy(env, Deploy)
and .pipeline(Pipeline)) and run `mydeploy rollback production --to v41` or
`mydeploy resume <run>`. In code: cd_stages::Deploy::restore(&store,
&Restore::new(\"production\").version(\"v41\").actor(\"alice\"), &cx) takes the
environment lock, redeploys that release from this history, and records it.";

/// `s` with control characters (newlines, carriage returns, terminal
/// escapes) and bidirectional overrides escaped, for a terminal: strings from
/// the store (versions, messages, names, reasons) cannot forge table rows or
/// send escape sequences.
pub fn term_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}') {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `println!` through [`term_safe`]: the one way the CLI writes text lines.
macro_rules! say {
    ($($arg:tt)+) => {
        $crate::cli::out(&$crate::cli::term_safe(&format!($($arg)+)))
    };
}

/// Writes one line to stdout. A closed pipe (`cdctl runs | head`) ends
/// the program quietly with status 0 instead of a panic, as other Unix
/// tools do.
pub fn out(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|_| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// What the host binary lends the operator commands: its pipelines (for
/// `resume`) and its deploys per environment (for `rollback`).
#[derive(Default)]
pub struct Operator {
    pipelines: BTreeMap<String, Pipeline>,
    deploys: BTreeMap<String, Deploy>,
    local_trust: bool,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("pipelines", &self.pipelines.keys().collect::<Vec<_>>())
            .field("deploys", &self.deploys.keys().collect::<Vec<_>>())
            .field("local_trust", &self.local_trust)
            .finish()
    }
}

impl Operator {
    /// Nothing registered: the store-only commands (what `cdctl` is).
    pub fn new() -> Self {
        Self::default()
    }

    /// A pipeline `resume` may continue (by its name).
    pub fn pipeline(mut self, pipeline: Pipeline) -> Self {
        self.pipelines.insert(pipeline.name().to_string(), pipeline);
        self
    }

    /// Local-trust mode: `approve` and `reject` without a token decide as
    /// the operating-system user (`$USER`), recorded with via `trusted: cli
    /// local user <user>@<host>`. For a deploy binary whose callers the host
    /// already authenticates (a CI runner, a sudo wrapper); everything else
    /// still applies (who may decide, four eyes, expiry). Off by default;
    /// `cdctl` never turns it on. A token, when given, still wins.
    pub fn trust_local_user(mut self) -> Self {
        self.local_trust = true;
        self
    }

    /// The deploy `rollback` uses for `environment`.
    pub fn deploy(mut self, environment: impl Into<String>, deploy: Deploy) -> Self {
        self.deploys.insert(environment.into(), deploy);
        self
    }

    /// Runs one command (on a current-thread runtime of its own) and exits
    /// the process with [`exit_code`] on error, the message on stderr.
    pub fn main(self, cli: Cli) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!(
                    "error: cannot start the runtime: {}",
                    term_safe(&e.to_string())
                );
                std::process::exit(1);
            }
        };
        if let Err(e) = rt.block_on(self.execute(&cli.options, &cli.command)) {
            eprintln!("error: {}", term_safe(&e.to_string()));
            std::process::exit(exit_code(&e));
        }
    }

    /// Runs one command inside the caller's runtime.
    ///
    /// Errors: what the command returns (see [`exit_code`]); `rollback` and
    /// `resume` without a registered deploy or pipeline are
    /// [`ErrorKind::Unsupported`], naming what to register.
    pub async fn execute(&self, options: &Options, command: &Command) -> Result<()> {
        run(self, options, command).await
    }

    async fn rollback(
        &self,
        store: SqliteStore,
        json: bool,
        env: &str,
        to: Option<&str>,
        actor: Option<String>,
    ) -> Result<()> {
        let deploy = self.deploys.get(env).ok_or_else(|| {
            Error::unsupported(format!(
                "rollback of `{env}` needs its deployer: {}",
                if self.deploys.is_empty() {
                    "cdctl has none; mount cd::cli in your deploy binary with Operator::deploy(env, Deploy)".to_string()
                } else {
                    format!(
                        "this binary rolls back {}",
                        self.deploys.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
            ))
        })?;
        let actor =
            actor.unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "operator".into()));
        let mut request = Restore::new(env).actor(&actor);
        if let Some(v) = to {
            request = request.version(v);
        }
        let store: Arc<dyn Store> = Arc::new(store);
        let sink = cd_core::FnSink(|e: &cd_core::Event| {
            if let cd_core::EventKind::Rollout { message, .. } = &e.kind {
                eprintln!("  {}", term_safe(message));
            }
        });
        let emitter = cd_core::Emitter::new(
            "rollback",
            1,
            vec![Arc::new(sink)],
            cd_core::Redactor::default(),
        );
        let cx =
            cd_core::DeployContext::new(emitter, tokio_util::sync::CancellationToken::new(), env);
        let report = deploy.restore(&store, &request, &cx).await?;
        let live = store
            .release_history(env, 5)
            .await?
            .into_iter()
            .find(|r| r.status == cd_core::ReleaseStatus::Live);
        if json {
            return print_json(&json!({"environment": env, "live": live, "rollout": report}));
        }
        say!(
            "{env} rolled back to {} by {actor}",
            live.map(|r| r.version).unwrap_or_else(|| "?".into())
        );
        Ok(())
    }

    async fn resume(&self, store: SqliteStore, json: bool, run_prefix: &str) -> Result<()> {
        let run = store.find_run(run_prefix).await?;
        let pipeline = self.pipelines.get(&run.pipeline).ok_or_else(|| {
            Error::unsupported(format!(
                "resuming run {} needs pipeline `{}`: {}",
                run.id,
                run.pipeline,
                if self.pipelines.is_empty() {
                    "cdctl has none; mount cd::cli in your deploy binary with Operator::pipeline(Pipeline)".to_string()
                } else {
                    format!(
                        "this binary has {}",
                        self.pipelines.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
            ))
        })?;
        let store: Arc<dyn Store> = Arc::new(store);
        let report = cd_core::Runner::new(store)
            .environment(run.environment.clone())
            .actor(run.started_by.clone())
            .resume(&run.id, pipeline)
            .await?;
        if json {
            return print_json(&json!({"run_id": report.run_id, "status": report.status}));
        }
        say!("{}", report);
        Ok(())
    }
}

/// Inspect and operate the runs, locks, approvals and release history in
/// a cd state database.
///
/// Exit status: 0 done; 1 failed; 2 invalid input; 3 not found; 4 not
/// allowed (no, a wrong, revoked or expired token; not an approver);
/// 5 conflict (already decided, finished, expired, replayed).
#[derive(Debug, Parser)]
#[command(name = "cdctl", version, after_long_help = ROLLBACK_HELP)]
pub struct Cli {
    /// Where the state is and how to print.
    #[command(flatten)]
    pub options: Options,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The options every operator command takes; flatten them into a host
/// binary's own parser.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// The state database [default: $CD_DB, else .cd/state.db].
    #[arg(long, global = true, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The operator commands (see `cdctl --help`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List runs, newest first.
    Runs {
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only runs in this environment.
        #[arg(long, value_name = "ENV")]
        env: Option<String>,
    },
    /// Look at one run.
    Run {
        /// The subcommand.
        #[command(subcommand)]
        command: RunCommand,
    },
    /// An environment's release history, newest first (which version is
    /// live, which were rolled back).
    #[command(after_long_help = ROLLBACK_HELP)]
    History {
        /// The environment.
        env: String,
        /// How many releases.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Print the SBOM (CycloneDX 1.5 JSON) stored with a release: the
    /// environment's live release, or VERSION. An SbomStage in the
    /// pipeline stores it. Exit 3 when there is none.
    Sbom {
        /// The environment.
        env: String,
        /// The release version [default: the live one in ENV].
        version: Option<String>,
        /// Print what is stored (version, size, hash, components, run)
        /// instead of the document.
        #[arg(long)]
        summary: bool,
    },
    /// Environment locks held now, and who waits for them.
    Locks,
    /// Break an environment's lock whoever holds it (recorded, with the
    /// reason, in the lock audit trail). Use it when the holder is gone
    /// and you cannot wait for its lease to expire.
    Unlock {
        /// The environment.
        env: String,
        /// Required: you know the holder may still be deploying.
        #[arg(long)]
        force: bool,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: String,
        /// Who breaks it [default: $USER].
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// Approve a waiting approval gate of a run, with your token.
    /// Refused, with the list of who may, when you may not.
    Approve(Decide),
    /// Reject a waiting approval gate of a run, with your token.
    Reject(Decide),
    /// Serve the web console (runs, run pages with their DAG, environments,
    /// approvals with Approve / Reject) over this database. Sign in with
    /// a token.
    #[cfg(feature = "web")]
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Mark the session cookie Secure (behind HTTPS).
        #[arg(long)]
        secure_cookies: bool,
    },
    /// Redeploy an earlier release of ENV through the host binary's deploy
    /// for it (the newest that was live before the live one, or --to a
    /// version), under the environment's lock; recorded in the history.
    /// Needs a deploy binary that mounts these commands (`cdctl` has no
    /// deployers).
    Rollback {
        /// The environment.
        env: String,
        /// The version to go back to [default: the one before the live one].
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Who rolls back, for the history [default: $USER].
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// Resume a run whose process died, with the host binary's pipeline of
    /// the same name and definition (completed nodes are not run again).
    /// Needs a deploy binary that mounts these commands.
    Resume {
        /// The run id, or a unique prefix of it.
        run: String,
    },
    /// API tokens: one per approver.
    Token {
        /// The subcommand.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List incidents, newest first (a failed bake opens one).
    Incidents {
        /// Only unresolved ones (open or acknowledged).
        #[arg(long)]
        open: bool,
        /// How many incidents.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Look at, acknowledge or resolve one incident. Acknowledging and
    /// resolving notify the receivers set in $CD_NOTIFY_WEBHOOK_URL,
    /// $CD_NOTIFY_SLACK_URL and $CD_PAGERDUTY_ROUTING_KEY (PagerDuty
    /// gets an `acknowledge` or `resolve` with the incident's dedup key).
    Incident {
        /// The subcommand.
        #[command(subcommand)]
        command: IncidentCommand,
    },
}

/// `incident` subcommands.
#[derive(Debug, Subcommand)]
pub enum IncidentCommand {
    /// One incident and its notification deliveries.
    Show {
        /// The incident id (`inc-...`).
        id: String,
    },
    /// Someone is on it.
    Ack {
        /// The incident id (`inc-...`).
        id: String,
        /// Who [default: $USER].
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// It is over.
    Resolve {
        /// The incident id (`inc-...`).
        id: String,
        /// Who [default: $USER].
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
}

/// `run` subcommands.
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// A run's nodes, approvals and events.
    Show {
        /// The run id, or a unique prefix of it.
        id: String,
        /// Show the last N events.
        #[arg(long, default_value_t = 200, value_name = "N")]
        events: usize,
    },
    /// Give up a run whose process died (recorded `abandoned`, audited,
    /// its environment lease freed). Nothing is rolled back. Refused
    /// while the run's lease owner may be alive, unless --force.
    Abandon {
        /// The run id, or a unique prefix of it.
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: String,
        /// Abandon even though the owner cannot be proven gone (another
        /// machine, another PID namespace).
        #[arg(long)]
        force: bool,
        /// Who abandons it [default: $USER].
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
}

/// What `approve` and `reject` take.
#[derive(Debug, clap::Args)]
pub struct Decide {
    /// The run id, or a unique prefix of it.
    pub run: String,
    /// The approval gate's node name.
    pub node: String,
    /// A comment kept with the decision (some gates require one).
    #[arg(long)]
    pub comment: Option<String>,
    /// Read the approver's token from this file (else $CD_TOKEN, else
    /// a prompt when stdin is a terminal). The token says who you are.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A unique id for this decision, so a retried command is not
    /// recorded twice [default: a new UUID].
    #[arg(long, value_name = "ID")]
    pub decision_id: Option<String>,
    /// Gone: who decides comes from the token.
    #[arg(long = "as", value_name = "NAME", hide = true)]
    pub approver: Option<String>,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for NAME and print it once (it is stored
    /// only as an HMAC-SHA256 hash). Give it to that person: with it
    /// they approve and reject (`cdctl approve`, the web console).
    Create {
        /// The identity: a-z, 0-9, '.', '_', '@', '-' (lower-cased).
        name: String,
        /// Expire after this long (`30d`, `12h`) [default: never].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Write the token to this file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List tokens (ids, identities, state; never the secrets).
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token id (12 hex digits, as `token list` shows).
        id: String,
    },
}

/// The exit status for an error: 2 invalid input, 3 not found, 4 not
/// allowed, 5 conflict, 1 anything else.
pub fn exit_code(e: &Error) -> i32 {
    match e.kind() {
        ErrorKind::NotFound => 3,
        ErrorKind::Invalid | ErrorKind::Unsupported => 2,
        ErrorKind::Auth => 4,
        ErrorKind::Conflict => 5,
        _ => 1,
    }
}

/// `cdctl`'s `main`: the store-only operator ([`Operator::new`] with no
/// pipeline or deployer).
pub fn main() {
    Operator::new().main(Cli::parse())
}

fn db_path(options: &Options) -> PathBuf {
    options
        .db
        .clone()
        .or_else(|| std::env::var_os("CD_DB").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".cd/state.db"))
}

async fn open(options: &Options) -> Result<SqliteStore> {
    let path = db_path(options);
    if !path.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no state database at {} (pass --db PATH or set CD_DB)",
                path.display()
            ),
        ));
    }
    SqliteStore::open(&path).await
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    out(&serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run(op: &Operator, options: &Options, command: &Command) -> Result<()> {
    let store = open(options).await?;
    let json = options.json;
    match command {
        Command::Runs { limit, env } => runs(&store, json, *limit, env.as_deref()).await,
        Command::Run {
            command: RunCommand::Show { id, events },
        } => show(&store, json, id, *events).await,
        Command::Run {
            command:
                RunCommand::Abandon {
                    id,
                    reason,
                    force,
                    actor,
                },
        } => abandon(store, json, id, reason, *force, actor.clone()).await,
        Command::History { env, limit } => history(&store, json, env, *limit).await,
        Command::Sbom {
            env,
            version,
            summary,
        } => sbom(&store, json, env, version.as_deref(), *summary).await,
        Command::Locks => locks(&store, json).await,
        Command::Unlock {
            env,
            force,
            reason,
            actor,
        } => unlock(&store, json, env, *force, reason, actor.clone()).await,
        Command::Approve(d) => decide(op, &store, json, d, Decision::Approve).await,
        Command::Reject(d) => decide(op, &store, json, d, Decision::Reject).await,
        Command::Token { command } => token(&store, json, command).await,
        Command::Rollback { env, to, actor } => {
            op.rollback(store, json, env, to.as_deref(), actor.clone())
                .await
        }
        Command::Resume { run } => op.resume(store, json, run).await,
        #[cfg(feature = "web")]
        Command::Serve {
            listen,
            secure_cookies,
        } => {
            let listener = tokio::net::TcpListener::bind(listen.as_str())
                .await
                .map_err(|e| Error::invalid(format!("listening on {listen}: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::invalid(format!("listening on {listen}: {e}")))?;
            say!("console at http://{addr}/ (sign in with a token: `cdctl token create <name>`)");
            let console = crate::web::Console::new(std::sync::Arc::new(store))
                .secure_cookies(*secure_cookies);
            crate::web::serve(listener, console)
                .await
                .map_err(|e| Error::failed(format!("console: {e}")))
        }
        Command::Incidents { open, limit } => incidents(store, json, *open, *limit).await,
        Command::Incident { command } => match command {
            IncidentCommand::Show { id } => incident_show(store, json, id).await,
            IncidentCommand::Ack { id, actor } => {
                incident_change(store, json, id, actor.clone(), false).await
            }
            IncidentCommand::Resolve { id, actor } => {
                incident_change(store, json, id, actor.clone(), true).await
            }
        },
    }
}

async fn incidents(store: SqliteStore, as_json: bool, open: bool, limit: usize) -> Result<()> {
    let list = store.incidents(open, limit).await?;
    if as_json {
        return print_json(&list);
    }
    if list.is_empty() {
        say!(
            "{}",
            if open {
                "no open incident"
            } else {
                "no incidents"
            }
        );
        return Ok(());
    }
    let mut t = Table::new(&[
        "INCIDENT", "STATUS", "SEVERITY", "ENV", "RELEASE", "TITLE", "OPENED", "BY",
    ]);
    for i in &list {
        let by = i
            .resolved_by
            .as_ref()
            .or(i.acknowledged_by.as_ref())
            .cloned()
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            i.id.clone(),
            i.status.to_string(),
            i.severity.to_string(),
            i.environment.clone().unwrap_or_else(|| "-".into()),
            i.release.clone().unwrap_or_else(|| "-".into()),
            i.title.clone(),
            time(i.opened_at),
            by,
        ]);
    }
    t.print();
    Ok(())
}

async fn incident_show(store: SqliteStore, as_json: bool, id: &str) -> Result<()> {
    let incident = store
        .get_incident(id)
        .await?
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no incident with id {id}")))?;
    let deliveries = store.deliveries(id, 1000).await?;
    if as_json {
        return print_json(&json!({ "incident": incident, "deliveries": deliveries }));
    }
    say!("incident {}: {}", incident.id, incident.title);
    say!("  status    {}", incident.status);
    say!("  severity  {}", incident.severity);
    for (k, v) in [
        ("run", &incident.run_id),
        ("node", &incident.node),
        ("pipeline", &incident.pipeline),
        ("release", &incident.release),
        ("env", &incident.environment),
        ("ack by", &incident.acknowledged_by),
        ("resolved by", &incident.resolved_by),
    ] {
        if let Some(v) = v {
            say!("  {k:<9} {v}");
        }
    }
    say!("  opened    {}", time(incident.opened_at));
    say!("  dedup key {}", incident.dedup_key);
    for l in &incident.links {
        say!("  link      {l}");
    }
    say!("  reason    {}", incident.reason);
    if !deliveries.is_empty() {
        out("");
        let mut t = Table::new(&["KIND", "NOTIFIER", "ATTEMPT", "OUTCOME", "ERROR", "AT"]);
        for d in &deliveries {
            t.row(vec![
                d.kind.to_string(),
                d.notifier.clone(),
                d.attempt.to_string(),
                d.outcome.as_str().to_string(),
                d.error.clone().unwrap_or_else(|| "-".into()),
                time(d.at),
            ]);
        }
        t.print();
    }
    Ok(())
}

/// Notifiers from the environment, for acknowledge and resolve.
fn notifications_from_env() -> Option<cd_core::Notifications> {
    use cd_core::Secret;
    use cd_stages::webhook::WebhookNotifier;
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let mut n = cd_core::Notifications::new();
    let mut any = false;
    if let Some(url) = var("CD_NOTIFY_WEBHOOK_URL") {
        n = n.to(WebhookNotifier::json(Secret::new(url)));
        any = true;
    }
    if let Some(url) = var("CD_NOTIFY_SLACK_URL") {
        n = n.to(WebhookNotifier::slack(Secret::new(url)));
        any = true;
    }
    if let Some(key) = var("CD_PAGERDUTY_ROUTING_KEY") {
        let mut pd = WebhookNotifier::pagerduty(Secret::new(key));
        if let Some(url) = var("CD_PAGERDUTY_URL") {
            pd = pd.url(Secret::new(url));
        }
        n = n.to(pd);
        any = true;
    }
    any.then_some(n.retry(3, std::time::Duration::from_millis(250)))
}

async fn incident_change(
    store: SqliteStore,
    as_json: bool,
    id: &str,
    actor: Option<String>,
    resolve: bool,
) -> Result<()> {
    let actor = actor
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "cdctl".into());
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(store);
    let notify = notifications_from_env();
    let record = if resolve {
        cd_core::incident::resolve_incident(&store, id, &actor, notify.as_ref()).await?
    } else {
        cd_core::incident::acknowledge_incident(&store, id, &actor, notify.as_ref()).await?
    };
    let mut undelivered = 0;
    if let Some(n) = &notify {
        undelivered = n.flush(std::time::Duration::from_secs(15)).await;
    }
    let deliveries: Vec<_> = store
        .deliveries(id, 1000)
        .await?
        .into_iter()
        .filter(|d| {
            d.kind
                == if resolve {
                    cd_core::NotificationKind::IncidentResolved
                } else {
                    cd_core::NotificationKind::IncidentAcknowledged
                }
        })
        .collect();
    if as_json {
        return print_json(&json!({ "incident": record, "deliveries": deliveries }));
    }
    say!(
        "incident {} {} by {actor}: {}",
        record.id,
        record.status,
        record.title
    );
    for d in deliveries
        .iter()
        .filter(|d| d.outcome != cd_core::incident::DeliveryOutcome::Retrying)
    {
        say!(
            "  notified {}: {}{}",
            d.notifier,
            d.outcome.as_str(),
            d.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    if undelivered > 0 {
        say!("  {undelivered} notification(s) still undelivered after 15 s; giving up");
    }
    Ok(())
}

async fn runs(store: &SqliteStore, as_json: bool, limit: usize, env: Option<&str>) -> Result<()> {
    let mut runs = store
        .list_runs(if env.is_some() { usize::MAX } else { limit })
        .await?;
    if let Some(env) = env {
        runs.retain(|r| r.environment == env);
        runs.truncate(limit);
    }
    if as_json {
        return print_json(&runs);
    }
    if runs.is_empty() {
        say!("no runs");
        return Ok(());
    }
    let mut t = Table::new(&[
        "RUN", "PIPELINE", "RELEASE", "ENV", "STATUS", "BY", "STARTED", "TOOK",
    ]);
    for r in &runs {
        t.row(vec![
            r.id.clone(),
            r.pipeline.clone(),
            r.release.version.clone(),
            r.environment.clone(),
            r.status.to_string(),
            r.started_by.clone(),
            time(r.started_at),
            took(Some(r.started_at), r.finished_at),
        ]);
    }
    t.print();
    Ok(())
}

async fn show(store: &SqliteStore, as_json: bool, id: &str, last: usize) -> Result<()> {
    let run = store.find_run(id).await?;
    let nodes = store.nodes(&run.id).await?;
    let approvals = store.run_approvals(&run.id).await?;
    let mut events = store.events(&run.id, 0, usize::MAX).await?;
    let total = events.len();
    // Load and test results, whatever `--events` keeps.
    let results: Vec<(String, String, serde_json::Value)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            cd_core::EventKind::Custom { name, data }
                if name == "load_report" || name == "test_report" =>
            {
                Some((
                    e.node.as_deref().unwrap_or("-").to_string(),
                    name.clone(),
                    data.clone(),
                ))
            }
            _ => None,
        })
        .collect();
    if events.len() > last {
        events.drain(..events.len() - last);
    }
    if as_json {
        return print_json(&json!({
            "run": run,
            "nodes": nodes,
            "approvals": approvals,
            "events": events,
            "events_total": total,
        }));
    }
    say!("run       {}", run.id);
    say!(
        "pipeline  {} (definition {})",
        run.pipeline,
        short(&run.definition_hash, 12)
    );
    say!("release   {}", run.release.version);
    say!("env       {}", run.environment);
    say!("status    {}", run.status);
    say!("started   {} by {}", time(run.started_at), run.started_by);
    match run.finished_at {
        Some(f) => say!(
            "finished  {} (took {})",
            time(f),
            took(Some(run.started_at), Some(f))
        ),
        None if run.status == RunStatus::Running => {
            say!("finished  - (still running, or interrupted: resume it from the host binary)")
        }
        None => say!("finished  -"),
    }
    out("");
    if nodes.is_empty() {
        say!("no node records");
    } else {
        let mut t = Table::new(&["NODE", "STATUS", "ATTEMPTS", "STARTED", "TOOK", "DETAIL"]);
        for n in &nodes {
            let detail = match (&n.error, &n.output, n.recheck_at) {
                (Some(e), _, _) => e.to_string(),
                (None, _, Some(at)) if n.status == NodeStatus::Waiting => {
                    format!("recheck at {}", time(at))
                }
                (None, Some(o), _) if !o.is_null() => short(&o.to_string(), 60),
                _ => String::new(),
            };
            t.row(vec![
                n.node.to_string(),
                n.status.to_string(),
                n.attempts.to_string(),
                n.started_at.map(time).unwrap_or_else(|| "-".into()),
                took(n.started_at, n.finished_at),
                detail,
            ]);
        }
        t.print();
    }
    if !approvals.is_empty() {
        out("");
        let mut t = Table::new(&["GATE", "BY", "DECISION", "AT", "COMMENT"]);
        for a in &approvals {
            t.row(vec![
                a.node.clone(),
                a.approver.clone(),
                decision(a.decision).into(),
                time(a.at),
                a.comment.clone().unwrap_or_default(),
            ]);
        }
        t.print();
    }
    out("");
    if total > events.len() {
        say!(
            "events (last {} of {total}; --events N for more):",
            events.len()
        );
    } else {
        say!("events ({total}):");
    }
    for e in &events {
        say!("  {e}");
    }
    for (node, name, data) in &results {
        out("");
        if name == "load_report" {
            print_load(node, data);
        } else {
            print_tests(node, data);
        }
    }
    Ok(())
}

/// A stored load report: the figures and the latency distribution.
fn print_load(node: &str, r: &serde_json::Value) {
    let f = |k: &str| r.get(k).cloned().unwrap_or(serde_json::Value::Null);
    say!(
        "load test [{node}] {} ({} model, {} connections): {} requests, {} rps, {} errors, {} non-2xx/3xx",
        f("url").as_str().unwrap_or("?"),
        f("model").as_str().unwrap_or("closed"),
        f("concurrency"),
        f("requests"),
        f("rps"),
        f("errors"),
        f("non_success")
    );
    let mut t = Table::new(&["PERCENTILE", "LATENCY"]);
    for point in f("distribution").as_array().into_iter().flatten() {
        let (p, ms) = (point.get(0), point.get(1));
        t.row(vec![
            format!("{}%", p.cloned().unwrap_or_default()),
            format!("{} ms", ms.cloned().unwrap_or_default()),
        ]);
    }
    t.print();
}

/// A stored test report: counts and the comparison with the previous
/// release.
fn print_tests(node: &str, r: &serde_json::Value) {
    let c = r.get("counts").cloned().unwrap_or_default();
    let n = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    say!(
        "tests [{node}]: {} passed, {} failed, {} errors, {} skipped, {} flaky",
        n("passed"),
        n("failed"),
        n("errors"),
        n("skipped"),
        n("flaky")
    );
    for key in ["regressions", "flaky", "fixed", "missing"] {
        let ids: Vec<String> = r
            .get(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        if !ids.is_empty() {
            say!("  {key}: {}", ids.join(", "));
        }
    }
}

async fn sbom(
    store: &SqliteStore,
    as_json: bool,
    env: &str,
    version: Option<&str>,
    summary: bool,
) -> Result<()> {
    let version = match version {
        Some(v) => v.to_string(),
        None => store
            .release_history(env, 100)
            .await?
            .into_iter()
            .find(|r| r.status == cd_core::ReleaseStatus::Live)
            .map(|r| r.version)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("no live release in environment `{env}`: name a version"),
                )
            })?,
    };
    let doc = store
        .release_document(&version, "sbom")
        .await?
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                "no SBOM stored for release {version} (an SbomStage in the pipeline stores one)"
            ),
            )
        })?;
    let parsed: Value = serde_json::from_str(&doc.content)?;
    if !summary {
        if as_json {
            return print_json(&parsed);
        }
        out(&doc.content);
        return Ok(());
    }
    let components = parsed["components"].as_array().map(Vec::len).unwrap_or(0);
    if as_json {
        let mut meta = serde_json::to_value(&doc)?;
        meta["content"] = Value::Null;
        meta["components"] = json!(components);
        return print_json(&meta);
    }
    say!("sbom of {version} ({})", doc.media_type);
    say!("  components {components}");
    say!("  bytes      {}", doc.bytes);
    say!("  sha256     {}", doc.sha256);
    say!("  stored     {}", time(doc.created_at));
    if let Some(run) = &doc.run_id {
        say!("  run        {run}");
    }
    if let Some(e) = &doc.environment {
        say!("  env        {e}");
    }
    Ok(())
}

async fn history(store: &SqliteStore, as_json: bool, env: &str, limit: usize) -> Result<()> {
    let releases = store.release_history(env, limit).await?;
    if as_json {
        return print_json(&releases);
    }
    if releases.is_empty() {
        say!("no releases recorded for environment `{env}`");
        return Ok(());
    }
    let mut t = Table::new(&["VERSION", "STATUS", "AT", "UPDATED", "BY", "RUN", "TARGETS"]);
    for r in &releases {
        let targets = r
            .revisions
            .iter()
            .map(|rev| format!("{}={}", rev.target, rev.version))
            .collect::<Vec<_>>()
            .join(" ");
        t.row(vec![
            r.version.clone(),
            r.status.to_string(),
            time(r.at),
            time(r.updated_at),
            r.actor.clone(),
            r.run_id
                .as_deref()
                .map(|s| short(s, 8))
                .unwrap_or_else(|| "-".into()),
            targets,
        ]);
    }
    t.print();
    Ok(())
}

async fn locks(store: &SqliteStore, as_json: bool) -> Result<()> {
    let leases = store.locks().await?;
    let waiters = store.lock_waiters(None).await?;
    let audit = store.lock_audit(None, 5).await?;
    if as_json {
        return print_json(
            &json!({ "locks": leases, "waiters": waiters, "recent_force_unlocks": audit }),
        );
    }
    let now = Utc::now();
    if leases.is_empty() {
        say!("no environment is locked");
    } else {
        let mut t = Table::new(&[
            "ENV",
            "HOLDER",
            "RUN",
            "MESSAGE",
            "SINCE",
            "RENEWED",
            "EXPIRES IN",
        ]);
        for l in &leases {
            t.row(vec![
                l.environment.clone(),
                l.holder.clone(),
                l.run_id.clone().unwrap_or_else(|| "-".into()),
                l.message.clone(),
                time(l.acquired_at),
                time(l.renewed_at),
                human((l.expires_at - now).to_std().unwrap_or_default()),
            ]);
        }
        t.print();
    }
    if !waiters.is_empty() {
        out("");
        let mut t = Table::new(&["ENV", "WAITING", "SINCE", "LAST ASKED"]);
        for w in &waiters {
            t.row(vec![
                w.environment.clone(),
                w.holder.clone(),
                time(w.waiting_since),
                time(w.last_asked),
            ]);
        }
        t.print();
    }
    Ok(())
}

async fn abandon(
    store: SqliteStore,
    as_json: bool,
    id: &str,
    reason: &str,
    force: bool,
    actor: Option<String>,
) -> Result<()> {
    if reason.trim().is_empty() {
        return Err(Error::invalid("--reason must say why the run is abandoned"));
    }
    let run = store.find_run(id).await?;
    let held = store
        .locks()
        .await?
        .into_iter()
        .find(|l| l.run_id.as_deref() == Some(run.id.as_str()));
    if let (Some(lease), false) = (&held, force) {
        if store.lease_staleness(&lease.environment).await?.is_none() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "run {} still holds `{}` and its owner ({}) may be alive; \
                     refusing without --force",
                    run.id, lease.environment, lease.holder
                ),
            ));
        }
    }
    let actor = actor
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "cdctl".into());
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(store);
    let record = cd_core::Runner::new(store)
        .actor(&actor)
        .abandon(&run.id, reason)
        .await?;
    if as_json {
        return print_json(&record);
    }
    say!(
        "abandoned run {} ({} {} in `{}`); recorded as {actor}: {reason}{}",
        record.id,
        record.pipeline,
        record.release.version,
        record.environment,
        if held.is_some() { "; lease freed" } else { "" }
    );
    Ok(())
}

async fn unlock(
    store: &SqliteStore,
    as_json: bool,
    env: &str,
    force: bool,
    reason: &str,
    actor: Option<String>,
) -> Result<()> {
    if !force {
        return Err(Error::invalid(format!(
            "refusing to break the lock on `{env}` without --force: its holder may still be deploying \
             (a lease whose process died expires by itself; see `cdctl locks`)"
        )));
    }
    if reason.trim().is_empty() {
        return Err(Error::invalid("--reason must say why the lock is broken"));
    }
    let actor = actor
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "cdctl".into());
    let broken = store.force_unlock_as(env, &actor, Some(reason)).await?;
    if as_json {
        return print_json(&json!({
            "environment": env,
            "broken": broken,
            "actor": actor,
            "reason": reason,
        }));
    }
    match broken {
        Some(l) => say!(
            "broke the lock on `{env}` held by {} ({}); recorded as {actor}: {reason}",
            l.holder,
            l.message
        ),
        None => say!("`{env}` was not locked; recorded as {actor}: {reason}"),
    }
    Ok(())
}

fn read_token(d: &Decide) -> Result<Option<String>> {
    use std::io::IsTerminal;
    if let Some(f) = &d.token_file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            Error::new(
                ErrorKind::Auth,
                format!("reading the token file {}: {e}", f.display()),
            )
        })?;
        return Ok(Some(text.trim().to_string()));
    }
    if let Ok(t) = std::env::var("CD_TOKEN") {
        return Ok(Some(t));
    }
    if std::io::stdin().is_terminal() {
        let t = rpassword::prompt_password("token: ")
            .map_err(|e| Error::new(ErrorKind::Auth, format!("reading the token: {e}")))?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(None)
}

async fn decide(
    op: &Operator,
    store: &SqliteStore,
    as_json: bool,
    d: &Decide,
    decision: Decision,
) -> Result<()> {
    if let Some(name) = &d.approver {
        return Err(Error::invalid(format!(
            "--as {name:?} is gone: who decides comes from the approver's token (--token-file, $CD_TOKEN, or the prompt); `cdctl token create <name>` makes one"
        )));
    }
    let run = store.find_run(&d.run).await?;
    let who = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let token = read_token(d)?;
    let actor = match token {
        // Local trust, chosen in code by the host binary: no token means
        // the operating-system user.
        None if op.local_trust => {
            cd_core::approval::Actor::trusted(&who, &format!("cli local user {who}@{host}"))?
        }
        token => {
            cd_core::approval::authenticate(store, token.as_deref(), &format!("cli {who}@{host}"))
                .await?
        }
    };
    let record = cd_core::approval::record_decision(
        store,
        &actor,
        &cd_core::approval::DecisionRequest {
            run_id: run.id.clone(),
            node: d.node.clone(),
            decision,
            comment: d.comment.clone(),
            decision_id: d
                .decision_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        },
    )
    .await?;
    if as_json {
        return print_json(&record);
    }
    say!(
        "{} `{}` of run {} as {} (token {}); the gate takes it into account at its next check",
        match decision {
            Decision::Approve => "approved",
            Decision::Reject => "rejected",
        },
        d.node,
        run.id,
        record.approver,
        record.token_id.as_deref().unwrap_or("-")
    );
    Ok(())
}

async fn token(store: &SqliteStore, as_json: bool, command: &TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            name,
            expires_in,
            out,
        } => {
            let creator = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
            let (record, token) = cd_core::approval::issue_token(name, *expires_in, &creator)?;
            store.put_token(&record).await?;
            if let Some(path) = out {
                write_secret_file(path, token.expose())?;
                say!(
                    "token {} for {} written to {}{}",
                    record.id,
                    record.identity,
                    path.display(),
                    expiry(&record)
                );
                return Ok(());
            }
            if as_json {
                return print_json(&json!({"id": record.id, "identity": record.identity,
                    "expires_at": record.expires_at, "token": token.expose()}));
            }
            say!("{}", token.expose());
            eprintln!(
                "token {} for {}{}: shown once, keep it secret",
                record.id,
                record.identity,
                expiry(&record)
            );
            Ok(())
        }
        TokenCommand::List => {
            let list = store.tokens().await?;
            if as_json {
                let v: Vec<Value> = list
                    .iter()
                    .map(|t| {
                        json!({"id": t.id, "identity": t.identity, "created_at": t.created_at,
                            "created_by": t.created_by, "expires_at": t.expires_at, "revoked_at": t.revoked_at})
                    })
                    .collect();
                return print_json(&v);
            }
            if list.is_empty() {
                say!("no tokens: `cdctl token create <name>` makes one");
                return Ok(());
            }
            let now = Utc::now();
            let mut t = Table::new(&["ID", "IDENTITY", "STATE", "CREATED", "BY", "EXPIRES"]);
            for r in &list {
                let state = if r.revoked_at.is_some() {
                    "revoked"
                } else if r.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                t.row(vec![
                    r.id.clone(),
                    r.identity.clone(),
                    state.into(),
                    time(r.created_at),
                    r.created_by.clone(),
                    r.expires_at.map(time).unwrap_or_else(|| "never".into()),
                ]);
            }
            t.print();
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let mut record = store.token(id).await?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("no token {id} (see `cdctl token list`)"),
                )
            })?;
            if record.revoked_at.is_none() {
                record.revoked_at = Some(Utc::now());
                store.put_token(&record).await?;
            }
            if as_json {
                return print_json(
                    &json!({"id": record.id, "identity": record.identity, "revoked_at": record.revoked_at}),
                );
            }
            say!(
                "token {} of {} revoked at {}",
                record.id,
                record.identity,
                record.revoked_at.map(time).unwrap_or_default()
            );
            Ok(())
        }
    }
}

fn expiry(r: &cd_core::approval::TokenRecord) -> String {
    r.expires_at
        .map(|e| format!(", expires {}", time(e)))
        .unwrap_or_default()
}

/// Writes `text` and a newline to `path`, created or truncated with mode
/// 0600 (owner only): for tokens.
///
/// Errors: [`ErrorKind::Invalid`] naming the file when it cannot be
/// written.
pub fn write_secret_file(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::invalid(format!(
            "{} is a symbolic link: refusing to write a secret through it",
            path.display()
        )));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::invalid(format!("writing {}: {e}", path.display())))?;
    // An existing file keeps its mode on open: make it owner-only.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::invalid(format!("writing {}: {e}", path.display())))?;
    writeln!(f, "{text}")
        .map_err(|e| Error::invalid(format!("writing {}: {e}", path.display())))?;
    Ok(())
}

fn decision(d: Decision) -> &'static str {
    match d {
        Decision::Approve => "approve",
        Decision::Reject => "reject",
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn took(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    match (start, end) {
        (Some(a), Some(b)) => human((b - a).to_std().unwrap_or_default()),
        _ => "-".into(),
    }
}

fn human(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// A plain text table with columns as wide as their widest cell.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table (comfy-table, no borders, two spaces between
    /// columns), every cell through [`term_safe`].
    fn print(&self) {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING);
        // Each cell is escaped first: a newline in a stored string must
        // not become a row of its own.
        let safe =
            |cells: &[String]| -> Vec<String> { cells.iter().map(|c| term_safe(c)).collect() };
        t.set_header(safe(&self.head));
        for r in &self.rows {
            t.add_row(safe(r));
        }
        let last = self.head.len().saturating_sub(1);
        for (i, col) in t.column_iter_mut().enumerate() {
            col.set_padding((0, if i == last { 0 } else { 2 }));
        }
        for line in t.lines() {
            say!("{}", line.trim_end());
        }
    }
}
