//! The command line: parsed here, then handed to `serve` below (the gateway) or to a subcommand
//! in `cli/` (the tools around it). Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use datafold_gateway::cli::{audit, check_config, demo, hash_token};
use datafold_gateway::config::Config;
use datafold_gateway::{reload, server, telemetry};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    version,
    about = "Forward Datafold connection tests with a key callers never see"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file (TOML).
    #[arg(
        long,
        env = "DATAFOLD_GATEWAY_CONFIG",
        default_value = "config/gateway.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Check a configuration (including that the key loads) and print it, key redacted.
    CheckConfig(ConfigArg),
    /// Print the `sha256 = "..."` line of a caller token for `[[callers.token]]`. Reads the
    /// token from stdin (one line), or makes a new random one with --generate.
    HashToken {
        /// Generate a strong random token and print it along with its digest.
        #[arg(long)]
        generate: bool,
    },
    /// Query the audit trail: who tested which data source, when, and with what result.
    Audit(audit::AuditArgs),
    /// Try the gateway against a local stand-in for Datafold, then exit.
    Demo {
        /// Keep the gateway and the stand-in running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` handles requests on worker threads of its own (see server.rs); this runtime only
    // keeps the signals, the admin listener and the watches, and one thread does for that.
    let mut builder = match cli.command {
        Command::Serve(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args.config)),
        Command::CheckConfig(args) => check_config::run(&args.config),
        Command::HashToken { generate } => hash_token::run(generate),
        Command::Audit(args) => audit::run(&args).map_err(Into::into),
        Command::Demo { keep } => runtime.block_on(demo::run(keep)),
    };
    // Dropping the runtime would wait for every blocking task, and a read of a file on a hung
    // file system (see files.rs) never ends: the process exits without it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(&path)?;
    telemetry::init(&config.log);
    // Installed before anything slow: SIGHUP's default action would end the process.
    let stop = shutdown_signal()?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut user1 = signal(SignalKind::user_defined1())?;
    let in_file = |e: server::GatewayError| format!("{}: {e}", path.display());
    let gateway = server::Gateway::bind(config).await.map_err(in_file)?;
    let control = gateway.control(Some(path.clone()));
    // A changed config file (a ConfigMap update, where nobody can send SIGHUP) is reloaded too.
    let _config_watch = reload::watch_config_file(&path, control.clone())
        .map_err(|e| tracing::warn!(error = %e, "config changes will be picked up on SIGHUP only"))
        .ok();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hangup.recv() => control.reload().await,
                Some(()) = user1.recv() => {
                    tracing::info!("reopening the audit file (SIGUSR1)");
                    let _ = control.reopen_audit().await;
                }
                else => return,
            }
        }
    });
    gateway.run(stop).await.map_err(in_file)?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this returns, so a
/// signal that arrives while the gateway is still starting is not lost (nor fatal).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
