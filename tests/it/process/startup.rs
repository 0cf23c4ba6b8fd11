//! Start-up as a process: configuration errors named by key and file, never a panic; where
//! the config path comes from; `check-config`; and `runtime.workers`.

use datafold_gateway::cli::standin::ThrowawayCa;

use super::harness::{run, send, setup, stderr, write_config};
use crate::common::serve::Served;
use crate::common::{read_audit, API_KEY};

#[test]
fn serve_without_the_key_variable_exits_nonzero_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[api_key]\nenv = \"DFGW_TEST_UNSET_KEY\"\n[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n",
    );
    let output = run(&["serve", "--config", &config], &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("DFGW_TEST_UNSET_KEY"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn serve_with_an_empty_key_file_exits_nonzero_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("empty-key");
    std::fs::write(&key, "\n").unwrap();
    let config = write_config(
        dir.path(),
        &format!("[api_key]\nfile = {:?}\n[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n", key),
    );
    let output = run(&["serve", "--config", &config], &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("empty-key") && err.contains("empty"), "{err}");
}

#[test]
fn bad_config_files_name_the_key_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[rate_limit.global]\nrate = \"600/min\"\nburst = 60\nbrust = 1\n",
            "rate_limit.global",
        ),
        (
            "[rate_limit.per_data_source]\nrate = \"ten per minute\"\nburst = 1\n",
            "rate_limit.per_data_source.rate",
        ),
        ("[upstream]\ntimeout = \"soon\"\n", "upstream.timeout"),
        (
            "[upstream]\nurl = \"http://app.datafold.com\"\n",
            "upstream.url",
        ),
        ("[limits]\nmax_body_bytes = -1\n", "limits.max_body_bytes"),
        ("[callers]\nmode = \"everyone\"\n", "callers.mode"),
        ("[listen]\naddr = \"localhost\"\n", "listen.addr"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[runtime]\nworkers = 0\n", "runtime.workers"),
        (
            "[upstream]\nmax_connections_per_worker = 0\n",
            "upstream.max_connections_per_worker",
        ),
        ("[upstream]\nhttp2 = \"sometimes\"\n", "upstream.http2"),
        ("this is not toml", "gateway.toml"),
    ];
    for (text, key) in cases {
        let config = write_config(dir.path(), text);
        let output = run(
            &["check-config", "--config", &config],
            &[("DATAFOLD_API_KEY", API_KEY)],
        );
        let err = stderr(&output);
        assert!(!output.status.success(), "accepted: {text}");
        assert!(err.contains(key), "for {text:?} expected {key} in: {err}");
        assert!(err.contains("gateway.toml"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let output = run(
        &["check-config", "--config", "/nonexistent/gateway.toml"],
        &[],
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/nonexistent/gateway.toml"));
}

#[test]
fn check_config_prints_the_effective_config_without_the_key() {
    let output = run(
        &["check-config", "--config", "config/gateway.toml"],
        &[("DATAFOLD_API_KEY", API_KEY)],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[rate_limit.global]"), "{stdout}");
    assert!(stdout.contains("DATAFOLD_API_KEY"), "{stdout}");
    assert!(!stdout.contains(API_KEY) && !stderr(&output).contains(API_KEY));
}

#[test]
fn config_path_defaults_to_config_gateway_toml() {
    // cargo runs integration tests from the package root, where the shipped config lives.
    let output = run(&["check-config"], &[("DATAFOLD_API_KEY", API_KEY)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("config/gateway.toml"), "{stdout}");
    assert!(stdout.contains("app.datafold.com"), "{stdout}");
}

#[test]
fn config_path_defaults_to_the_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[upstream]\nurl = \"https://eu.datafold.com\"\n",
    );
    let output = run(
        &["check-config"],
        &[
            ("DATAFOLD_GATEWAY_CONFIG", &config),
            ("DATAFOLD_API_KEY", API_KEY),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("eu.datafold.com"));
}

#[test]
fn check_config_names_unreadable_or_invalid_pem_files() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let (cert, key) = (dir.path().join("gw.pem"), dir.path().join("gw-key.pem"));
    ca.issue(&["127.0.0.1"])
        .unwrap()
        .write(&cert, &key)
        .unwrap();
    let cases = [
        (
            format!("tls_cert = {not_pem:?}\ntls_key = {key:?}\n"),
            "listen.tls_cert",
        ),
        (
            format!("tls_cert = {cert:?}\ntls_key = {not_pem:?}\n"),
            "listen.tls_key",
        ),
        (
            format!("tls_cert = {cert:?}\ntls_key = \"/nonexistent/key.pem\"\n"),
            "listen.tls_key",
        ),
        (
            format!("tls_cert = {cert:?}\ntls_key = {key:?}\nclient_ca = {not_pem:?}\n"),
            "listen.client_ca",
        ),
    ];
    for (listen, key_name) in cases {
        let mode = if listen.contains("client_ca") {
            "mtls"
        } else {
            "open"
        };
        let config = write_config(
            dir.path(),
            &format!("[listen]\n{listen}[callers]\nmode = \"{mode}\"\n"),
        );
        let output = run(
            &["check-config", "--config", &config],
            &[("DATAFOLD_API_KEY", API_KEY)],
        );
        let err = stderr(&output);
        assert!(!output.status.success(), "accepted: {listen}");
        assert!(err.contains(key_name), "expected {key_name} in: {err}");
        assert!(err.contains(".pem"), "the file is not named: {err}");
    }
}

#[tokio::test]
async fn runtime_workers_sets_how_many_worker_threads_serve() {
    let setup = setup("[runtime]\nworkers = 3\n").await;
    let served = Served::start(&setup.config, &[]);
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", served.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .filter(|comm| comm.starts_with("worker-"))
        .collect();
    names.sort();
    assert_eq!(names, ["worker-0", "worker-1", "worker-2"]);
    // Every connection is answered, whichever worker's socket the kernel gave it to.
    let sends = (0..24).map(|id| {
        let addr = served.addr.clone();
        tokio::spawn(async move {
            send(
                &addr,
                "POST",
                &format!("/api/v1/data_sources/{id}/test"),
                &[],
            )
            .await
        })
    });
    for sent in sends.collect::<Vec<_>>() {
        assert_eq!(sent.await.unwrap(), 200);
    }
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert_eq!(read_audit(&setup.dir.path().join("audit.jsonl")).len(), 24);
}
