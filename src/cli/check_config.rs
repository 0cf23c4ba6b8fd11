//! `datafold-gateway check-config`: loads a configuration as `serve` would (the API key, the
//! TLS files, the audit file's folder) and prints the settings in effect, the key redacted. Run
//! before a restart or a reload, it finds a mistake while the running gateway still serves.

use std::path::Path;

use crate::config::Config;
use crate::gateway;

/// Checks the configuration at `path` and prints it; the error names the file.
pub fn run(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(path)?;
    gateway::prepare(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("# {}: OK (API key loaded; shown redacted)", path.display());
    print!("{}", config.redacted_toml());
    Ok(())
}
