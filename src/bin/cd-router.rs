//! `cd-router`: the embedded HTTP router as a process of its own, driven by
//! deploy processes through its admin API (`cd::backends::router::RemoteRouter`).
//!
//! ```text
//! cd-router --listen 127.0.0.1:8080 --admin 127.0.0.1:8081 \
//!     --upstream blue=127.0.0.1:18301 --upstream green=127.0.0.1:18302 \
//!     --state-file /var/lib/cd/router.json
//! curl -X PUT -d '{"blue":90,"green":10}' http://127.0.0.1:8081/weights
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// An HTTP reverse proxy with weighted upstreams for blue-green and canary
/// releases; `GET/PUT /weights` and `GET /stats` on the admin address.
#[derive(Debug, Parser)]
#[command(name = "cd-router", version)]
struct Args {
    /// Where clients connect.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Where the admin API listens (keep it on loopback: no authentication).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    admin: String,
    /// An upstream, `name=host:port`; the first gets the traffic until told
    /// otherwise (or the state file says otherwise).
    #[arg(long = "upstream", value_name = "NAME=HOST:PORT", required = true)]
    upstreams: Vec<String>,
    /// Keep the weights in this file across restarts.
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    /// How long a weight change waits for requests in flight, in ms.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    drain_timeout_ms: u64,
    /// Keep requests with the same value of this header on one upstream.
    #[arg(long, value_name = "HEADER")]
    sticky_header: Option<String>,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("error: {e}");
        std::process::exit(if e.kind() == cd::core::ErrorKind::Invalid {
            2
        } else {
            1
        });
    }
}

async fn run(args: Args) -> cd::core::Result<()> {
    let mut b = cd::backends::router::HttpRouter::builder(&args.listen)
        .drain_timeout(Duration::from_millis(args.drain_timeout_ms));
    for u in &args.upstreams {
        let Some((name, addr)) = u.split_once('=') else {
            return Err(cd::core::Error::invalid(format!(
                "--upstream `{u}`: expected NAME=HOST:PORT"
            )));
        };
        b = b.upstream(name, addr);
    }
    if let Some(f) = &args.state_file {
        b = b.state_file(f);
    }
    if let Some(h) = &args.sticky_header {
        b = b.sticky_header(h);
    }
    let router = b.start().await?;
    let admin = router.serve_admin(&args.admin).await?;
    println!("cd-router: serving {} ; admin http://{admin}", router.url());
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}
