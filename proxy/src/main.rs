//! `lagrouter-proxy`: a PostgreSQL wire-protocol proxy that routes reads to
//! fresh-enough replicas and writes to the primary, with read-your-writes.
//!
//! ```text
//! lagrouter-proxy --config lagrouter.toml
//! lagrouter-proxy                 # demo: starts a local primary + 2 replicas
//! ```
//!
//! The demo needs the `demo` cargo feature (on by default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lagrouter_proxy::config::Config;
use lagrouter_proxy::server::{Proxy, ProxyHandle};
use tracing::{error, info, warn};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "lagrouter-proxy", version, about)]
struct Args {
    /// Configuration file (TOML). Without it, a demo cluster (primary and
    /// two replicas) is started locally with the test harness (cargo
    /// feature `demo`, on by default).
    #[arg(short, long, env = "LAGROUTER_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `proxy.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `proxy.admin_listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Replicas in demo mode.
    #[arg(long, default_value_t = 2)]
    demo_replicas: usize,
    /// Log format on stderr: `text` (coloured only on a terminal) or `json`
    /// (one object a line, for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LAGROUTER_LOG_FORMAT")]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal.
    Text,
    /// One JSON object a line.
    Json,
}

/// Logs to stderr with `RUST_LOG` (default `info`) in `format`.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn apply_overrides(config: &mut Config, args: &Args) {
    if let Some(l) = args.listen {
        config.proxy.listen = l;
    }
    if let Some(a) = args.admin_listen {
        config.proxy.admin_listen = a;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("lagrouter-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut demo: Option<DemoCluster> = None;
    let config = match &args.config {
        Some(path) => {
            let mut c = Config::load(path)?;
            apply_overrides(&mut c, &args);
            c
        }
        None => {
            let (d, c) = start_demo(&args).await?;
            demo = Some(d);
            c
        }
    };
    let proxy = Proxy::start(config).await?;
    if let Some(path) = &args.config {
        proxy.set_config_path(path);
    }
    if let Some(d) = &demo {
        print_demo_banner(d, &proxy);
    }
    let died = tokio::select! {
        () = wait_for_signals(&proxy, args.config.as_deref(), &args) => None,
        () = proxy.shutdown_requested() => None,
        reason = demo_server_exited(demo.as_ref()) => Some(reason),
    };
    proxy.shutdown().await;
    if let Some(d) = demo {
        info!("stopping the demo cluster");
        #[cfg_attr(not(feature = "demo"), allow(clippy::drop_non_drop))]
        drop(d);
    }
    match died {
        Some(reason) => Err(reason.into()),
        None => Ok(()),
    }
}

/// The demo cluster run when no `--config` is given (feature `demo`).
#[cfg(feature = "demo")]
type DemoCluster = lagrouter_proxy::demo::Demo;
/// Without the `demo` feature there is never a demo cluster.
#[cfg(not(feature = "demo"))]
enum DemoCluster {}

/// Starts the demo cluster and returns it with its configuration (command
/// line overrides applied).
#[cfg(feature = "demo")]
async fn start_demo(args: &Args) -> Result<(DemoCluster, Config), Box<dyn std::error::Error>> {
    info!(
        replicas = args.demo_replicas,
        "no --config: starting the demo cluster"
    );
    let d = lagrouter_proxy::demo::start(args.demo_replicas).await?;
    let mut c = d.config.clone();
    apply_overrides(&mut c, args);
    Ok((d, c))
}

/// Resolves when a demo server exits; never without a demo.
#[cfg(feature = "demo")]
async fn demo_server_exited(demo: Option<&DemoCluster>) -> String {
    match demo {
        Some(d) => d.server_exited().await,
        None => std::future::pending().await,
    }
}

/// Without the `demo` feature there is no demo server to watch.
#[cfg(not(feature = "demo"))]
async fn demo_server_exited(_demo: Option<&DemoCluster>) -> String {
    std::future::pending().await
}

/// Without the `demo` feature a configuration file is required.
#[cfg(not(feature = "demo"))]
async fn start_demo(_args: &Args) -> Result<(DemoCluster, Config), Box<dyn std::error::Error>> {
    Err("built without the demo feature: pass --config".into())
}

/// Prints how to connect to the demo.
#[cfg(feature = "demo")]
fn print_demo_banner(_demo: &DemoCluster, proxy: &ProxyHandle) {
    println!("lagrouter-proxy demo is ready.");
    println!(
        "  connect:  {}",
        lagrouter_proxy::demo::psql_command(
            proxy.local_addr(),
            lagrouter_proxy::demo::DEMO_USER,
            lagrouter_proxy::demo::DEMO_PASSWORD
        )
    );
    println!(
        "  console:  {} -c 'SHOW NODES'",
        lagrouter_proxy::demo::psql_command(
            proxy.local_addr(),
            lagrouter_proxy::demo::DEMO_USER,
            lagrouter_proxy::demo::DEMO_PASSWORD
        )
        .replace("dbname=postgres", "dbname=lagrouter")
    );
    println!(
        "  admin:    http://{}/status  (also /health, /metrics)",
        proxy.admin_addr()
    );
    println!("  Ctrl-C stops the proxy and the demo cluster.");
}

/// Without the `demo` feature there is no demo to describe.
#[cfg(not(feature = "demo"))]
fn print_demo_banner(demo: &DemoCluster, _proxy: &ProxyHandle) {
    match *demo {}
}

/// Waits for SIGINT/SIGTERM; reloads the configuration on SIGHUP.
#[cfg(unix)]
async fn wait_for_signals(proxy: &ProxyHandle, config: Option<&std::path::Path>, args: &Args) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); return; }
            _ = term.recv() => { info!("SIGTERM: shutting down"); return; }
            _ = hup.recv() => {
                if config.is_none() {
                    warn!("SIGHUP: no configuration file to reload (demo mode)");
                    continue;
                }
                // Command-line overrides are listen addresses, which a
                // reload keeps as started anyway.
                let _ = args;
                if let Err(e) = proxy.reload_from_file() {
                    error!(error = %e, "reload failed; keeping the running configuration");
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_proxy: &ProxyHandle, _config: Option<&std::path::Path>, _args: &Args) {
    let _ = tokio::signal::ctrl_c().await;
}
