//! A deploy binary of your own, with the operator commands mounted next to
//! its own (`cd::cli`): they work with this binary's deployers.
//!
//! ```text
//! cargo run --example mydeploy -- deploy v41          # this binary's own command
//! cargo run --example mydeploy -- history production  # mounted: the release history
//! cargo run --example mydeploy -- rollback production --to v40
//! cargo run --example mydeploy -- approve <run> approval --token-file alice.token
//! cargo run --example mydeploy -- demo                # deploy v40, v41, v42, roll back to v41
//! ```
//!
//! The service is this executable started with `service` on 127.0.0.1:18190
//! (a local process per release). `demo` is what `scripts/test.sh` runs: it
//! deploys three releases, then parses and runs `rollback production --to
//! v41` through the mounted commands, and checks that v41 answers and is
//! `live` in the history.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cd::backends::local::LocalProcessDeployer;
use cd::backends::sqlite::SqliteStore;
use cd::cli::{Command, Operator, Options};
use cd::core::{Pipeline, Release, ReleaseStatus, RunStatus, Runner, Store};
use cd::stages::Deploy;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 18190;

#[derive(Parser)]
#[command(
    name = "mydeploy",
    about = "Deploys the shop; operates its runs and releases"
)]
struct MyDeploy {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: MyCommand,
}

#[derive(Subcommand)]
enum MyCommand {
    /// Deploy VERSION to production.
    Deploy {
        /// The version.
        version: String,
    },
    /// Deploy v40, v41 and v42, then roll back to v41 through the mounted
    /// `rollback` command, and check the outcome.
    Demo,
    /// The service itself (what the deployer starts).
    #[command(hide = true, name = "service")]
    Service {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        version: String,
    },
    /// Everything `cdctl` does, plus rollback and resume with this
    /// binary's deployers.
    #[command(flatten)]
    Operate(Command),
}

fn db(options: &Options) -> PathBuf {
    options
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from(".cd/mydeploy.db"))
}

fn deploy_stage(state: &Path) -> anyhow::Result<Deploy> {
    let exe = std::env::current_exe()?;
    let deployer = LocalProcessDeployer::builder()
        .name("shop")
        .program(exe.to_string_lossy())
        .args(["service", "--port", "{port}", "--version", "{version}"])
        .health_path("/health")
        .health_timeout(Duration::from_secs(10))
        .state_dir(state.join("local"))
        .target("production", PORT)
        .build()?;
    Ok(Deploy::new(deployer).env("production"))
}

fn pipeline(state: &Path) -> anyhow::Result<Pipeline> {
    Ok(Pipeline::builder("shop")
        .stage("production", deploy_stage(state)?)
        .build()?)
}

/// The operator, lent this binary's pipeline and deploy.
fn operator(state: &Path) -> anyhow::Result<Operator> {
    Ok(Operator::new()
        .pipeline(pipeline(state)?)
        .deploy("production", deploy_stage(state)?))
}

async fn deploy(store: Arc<dyn Store>, state: &Path, version: &str) -> anyhow::Result<()> {
    let report = Runner::new(store)
        .environment("production")
        .run(&pipeline(state)?, Release::new(version))
        .await?;
    println!("{report}");
    if report.status != RunStatus::Succeeded {
        bail!("deploying {version}: the run {}", report.status);
    }
    Ok(())
}

async fn get(path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", PORT)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string())
}

async fn demo(options: &Options) -> anyhow::Result<()> {
    let path = db(options);
    let state = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&state)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await?);
    for v in ["v40", "v41", "v42"] {
        deploy(store.clone(), &state, v).await?;
    }
    println!("live: {}", get("/version").await?);
    // The mounted command, parsed as a person would type it.
    let args = [
        "mydeploy",
        "--db",
        path.to_str().context("db path")?,
        "rollback",
        "production",
        "--to",
        "v41",
        "--as",
        "alice",
    ];
    println!("$ {}", args.join(" "));
    let cli = MyDeploy::try_parse_from(args)?;
    let MyCommand::Operate(command) = cli.command else {
        bail!("`rollback` should be a mounted operator command");
    };
    operator(&state)?.execute(&cli.options, &command).await?;
    let answer = get("/version").await?;
    let live: Vec<String> = store
        .release_history("production", 10)
        .await?
        .into_iter()
        .filter(|r| r.status == ReleaseStatus::Live)
        .map(|r| format!("{} (by {})", r.version, r.actor))
        .collect();
    println!("after rollback: serving {answer}; live in history: {live:?}");
    // The demo cleans up its process; a real deploy leaves it running.
    stop(&state).await;
    if answer != "v41" || live != ["v41 (by alice)"] {
        bail!("expected v41 live after the rollback, got {answer} and {live:?}");
    }
    println!("OK: rolled back to v41 through the mounted `rollback` command");
    Ok(())
}

async fn stop(state: &Path) {
    if let Ok(d) = LocalProcessDeployer::builder()
        .name("shop")
        .program("true")
        .state_dir(state.join("local"))
        .target("production", PORT)
        .build()
    {
        let _ = d.stop_all().await;
    }
}

async fn serve(port: u16, version: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        let version = version.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let Ok(n) = sock.read(&mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = match path.as_str() {
                "/health" => "ok".to_string(),
                "/version" => version.clone(),
                _ => format!("hello from {version}"),
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

fn main() -> anyhow::Result<()> {
    let cli = MyDeploy::parse();
    match cli.command {
        MyCommand::Operate(command) => {
            let state = db(&cli.options)
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let options = Options {
                db: Some(db(&cli.options)),
                json: cli.options.json,
            };
            operator(&state)?.main(cd::cli::Cli { options, command });
            Ok(())
        }
        other => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                match other {
                    MyCommand::Service { port, version } => serve(port, version).await,
                    MyCommand::Demo => demo(&cli.options).await,
                    MyCommand::Deploy { version } => {
                        let path = db(&cli.options);
                        let state = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                        std::fs::create_dir_all(&state)?;
                        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await?);
                        deploy(store, &state, &version).await
                    }
                    MyCommand::Operate(_) => unreachable!("handled above"),
                }
            })
        }
    }
}
