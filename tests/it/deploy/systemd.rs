//! The systemd unit (`deploy/systemd/`): its credential, paths, reload and stop timing, and
//! hardening, against the gateway.toml shipped beside it.

use std::path::{Path, PathBuf};

use datafold_gateway::config::{CallerMode, Config};

use super::parse::{systemd_span, Unit};
use super::{key_file, parse_config, read_deploy_file, CONFIG_PATH};

const UNIT: &str = "systemd/datafold-gateway.service";
const UNIT_CONFIG: &str = "systemd/gateway.toml";

fn unit() -> Unit {
    Unit::parse(UNIT, &read_deploy_file(UNIT))
}

/// The unit file's own name, as systemd knows the service.
fn unit_name() -> &'static str {
    Path::new(UNIT).file_name().unwrap().to_str().unwrap()
}

fn unit_config() -> Config {
    parse_config(
        &format!("deploy/{UNIT_CONFIG}"),
        &read_deploy_file(UNIT_CONFIG),
    )
}

#[test]
fn systemd_credential_lands_where_the_config_reads_the_key() {
    let unit = unit();
    let config = unit_config();
    let key = key_file(&config, UNIT_CONFIG);
    let credentials: Vec<(&str, &str)> = unit
        .all("LoadCredential")
        .into_iter()
        .map(|c| c.split_once(':').expect("LoadCredential=NAME:PATH"))
        .collect();
    let expected: Vec<PathBuf> = credentials
        .iter()
        .map(|(name, _)| Path::new("/run/credentials").join(unit_name()).join(name))
        .collect();
    assert!(
        expected.contains(&key),
        "api_key.file {} is none of the unit's credentials {expected:?}",
        key.display()
    );
    for (_, source) in credentials {
        assert!(
            Path::new(source).is_absolute(),
            "LoadCredential source {source}"
        );
    }
}

#[test]
fn systemd_exec_start_serves_the_shipped_config_path() {
    let unit = unit();
    let words: Vec<&str> = unit.get("ExecStart").split_whitespace().collect();
    assert!(Path::new(words[0]).is_absolute(), "ExecStart {}", words[0]);
    assert_eq!(words.get(1), Some(&"serve"));
    let i = words
        .iter()
        .position(|w| *w == "--config")
        .expect("ExecStart passes --config");
    assert_eq!(words[i + 1], CONFIG_PATH);
    unit_config();
}

#[test]
fn systemd_audit_file_is_inside_the_logs_or_state_directory() {
    let unit = unit();
    let config = unit_config();
    let mut folders = Vec::new();
    for (key, base) in [
        ("LogsDirectory", "/var/log"),
        ("StateDirectory", "/var/lib"),
    ] {
        for value in unit.all(key) {
            folders.extend(
                value
                    .split_whitespace()
                    .map(|d| Path::new(base).join(d.split(':').next().unwrap())),
            );
        }
    }
    assert!(
        folders.iter().any(|f| config.audit.file.starts_with(f)),
        "audit.file {} is outside {folders:?}, the only folders the unit may write",
        config.audit.file.display()
    );
}

#[test]
fn systemd_reload_sends_sighup_to_the_main_process() {
    let unit = unit();
    let words: Vec<&str> = unit.get("ExecReload").split_whitespace().collect();
    assert!(words[0].ends_with("/kill"), "ExecReload {words:?}");
    assert!(words.contains(&"-HUP") || words.contains(&"-SIGHUP"));
    assert!(words.contains(&"$MAINPID"));
}

#[test]
fn systemd_stop_timeout_outlasts_shutdown_grace() {
    let unit = unit();
    let config = unit_config();
    let timeout = systemd_span(unit.get("TimeoutStopSec"));
    assert!(
        timeout > config.limits.shutdown_grace,
        "TimeoutStopSec {timeout:?} <= shutdown_grace {:?}",
        config.limits.shutdown_grace
    );
}

#[test]
fn systemd_unit_is_hardened_and_restarts_on_failure() {
    let unit = unit();
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(unit.get(key), value, "{key}=");
    }
    assert!(unit.all("SystemCallFilter").contains(&"@system-service"));
}

#[test]
fn systemd_config_keeps_the_open_listener_on_loopback() {
    let config = unit_config();
    assert_eq!(config.callers.mode, CallerMode::Open);
    assert!(
        config.listen.addr.ip().is_loopback(),
        "{}",
        config.listen.addr
    );
}
