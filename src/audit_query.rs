//! `datafold-gateway audit`: reads the audit trail (the file and its rotated siblings) and
//! answers questions about it.

use std::path::PathBuf;

/// Options of the `audit` subcommand.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The audit file; rotated siblings beside it are read too.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

/// Runs the query; the error names the file and what went wrong.
pub fn run(args: &AuditArgs) -> Result<(), String> {
    Err(format!("not yet implemented: {args:?}"))
}
