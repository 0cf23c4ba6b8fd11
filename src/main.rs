//! The command line: parsed here, then handed to `gateway::serve` (the gateway) or to a subcommand
//! in `cli/` (the tools around it). Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use datafold_gateway::cli::{audit, check_config, demo, hash_token};
use datafold_gateway::gateway;

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
    // `serve` handles requests on worker threads of its own (see gateway.rs and server/); this runtime only
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
        Command::Serve(args) => runtime.block_on(gateway::serve(args.config)),
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

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
