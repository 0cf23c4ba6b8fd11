//! The deployment artifacts in `deploy/` against the configurations they ship.
//!
//! Each Kubernetes manifest carries its gateway.toml in a ConfigMap (or, for the shared gateway,
//! a Secret), the Dockerfile bakes one in and the systemd unit comes with one; these tests parse
//! both sides (YAML, Dockerfile lines, unit INI lines, and the TOML through `Config::parse`) and
//! check that ports, paths, probes and timeouts agree, so that neither side can be edited
//! without the other.
//!
//! One module per artifact; `parse` holds the small parsers they share.

mod docker;
mod kubernetes;
mod parse;
mod systemd;

use std::path::{Path, PathBuf};

use datafold_gateway::config::{ApiKeySource, Config};

/// Where every shipped artifact tells the gateway to read its configuration.
const CONFIG_PATH: &str = "/etc/datafold-gateway/gateway.toml";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn read_deploy_file(relative: &str) -> String {
    read_repo_file(&format!("deploy/{relative}"))
}

fn parse_config(source: &str, text: &str) -> Config {
    Config::parse(Path::new(source), text).unwrap_or_else(|e| panic!("{e}"))
}

fn key_file(config: &Config, source: &str) -> PathBuf {
    match &config.api_key {
        ApiKeySource::File(path) => path.clone(),
        other => panic!("{source}: the key must come from a file, not {other:?}"),
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .unwrap_or_else(|| panic!("{} has no folder", path.display()))
}
