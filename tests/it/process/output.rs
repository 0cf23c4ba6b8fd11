//! What the process writes: logs that never hold the key or a caller's credential, the log
//! format and level, a failed handshake as one debug line, and the audit on stdout.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::harness::{send, setup, setup_with, CALLER_SECRET};
use crate::common;
use crate::common::serve::{Served, BIN};
use crate::common::API_KEY;

/// Stops a gateway that served `/api/v1/data_sources/1/test` at `RUST_LOG=trace` and checks that
/// its log holds neither the key nor the caller's credential.
fn assert_trace_log_keeps_secrets(served: Served) {
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "{status}");
    // The log did capture the traffic, so its silence about secrets means something.
    assert!(
        log.contains("/api/v1/data_sources/1/test"),
        "trace log is missing the requests"
    );
    assert!(!log.contains(API_KEY), "the API key is in the log");
    assert!(
        !log.contains(CALLER_SECRET),
        "a caller credential is in the log"
    );
}

#[tokio::test]
async fn neither_key_nor_caller_credentials_appear_in_logs_or_audit() {
    let setup = setup("[rate_limit.global]\nrate = \"1/h\"\nburst = 3\n").await;
    // Everything every crate will say, in both formats' worth of detail.
    let served = Served::start(&setup.config, &[("RUST_LOG", "trace")]);
    let bearer = format!("Bearer {CALLER_SECRET}");
    let credentials = [
        ("authorization", bearer.as_str()),
        ("cookie", CALLER_SECRET),
    ];
    for (method, path, status) in [
        ("POST", "/api/v1/data_sources/1/test", 200),
        ("GET", "/api/v1/data_sources/test/1001", 200),
        ("GET", "/api/v1/data_sources", 404),
        ("POST", "/api/v1/data_sources/x/test", 422),
        ("POST", "/api/v1/data_sources/2/test", 200),
        ("POST", "/api/v1/data_sources/3/test", 429),
    ] {
        assert_eq!(
            send(&served.addr, method, path, &credentials).await,
            status,
            "{method} {path}"
        );
    }
    assert_trace_log_keeps_secrets(served);
    let audit = std::fs::read_to_string(setup.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 6);
    assert!(!audit.contains(API_KEY) && !audit.contains(CALLER_SECRET));
}

#[tokio::test]
async fn token_mode_keeps_tokens_out_of_logs_audit_and_upstream() {
    let digest = datafold_gateway::config::TokenDigest::of(CALLER_SECRET.as_bytes()).to_hex();
    let setup = setup(&format!(
        "[callers]\nmode = \"token\"\n[[callers.token]]\nname = \"analytics\"\nsha256 = \"{digest}\"\n"
    ))
    .await;
    let served = Served::start(&setup.config, &[("RUST_LOG", "trace")]);
    let good = format!("Bearer {CALLER_SECRET}");
    let wrong = format!("Bearer {CALLER_SECRET}-wrong");
    for (token, path, status) in [
        (good.as_str(), "/api/v1/data_sources/1/test", 200),
        (good.as_str(), "/api/v1/data_sources/test/1001", 200),
        (good.as_str(), "/api/v1/data_sources/test/999", 404),
        (wrong.as_str(), "/api/v1/data_sources/1/test", 401),
    ] {
        let method = if path.ends_with("/test") {
            "POST"
        } else {
            "GET"
        };
        assert_eq!(
            send(&served.addr, method, path, &[("authorization", token)]).await,
            status,
            "{path}"
        );
    }
    assert_trace_log_keeps_secrets(served);
    let audit = std::fs::read_to_string(setup.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 4);
    assert!(audit.contains("\"caller\":\"analytics\""), "{audit}");
    assert!(!audit.contains(CALLER_SECRET) && !audit.contains(API_KEY));
    for received in setup.upstream.received() {
        assert!(!format!("{:?}", received.headers).contains(CALLER_SECRET));
    }
}

/// Runs `serve` with the pretty log format at `level`, has it answer one test start, stops it,
/// and returns its "listening" line and every line after it.
async fn pretty_log_at(level: &str) -> (String, Vec<String>) {
    let setup = setup(&format!(
        "[log]\nformat = \"pretty\"\nlevel = \"{level}\"\n"
    ))
    .await;
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &setup.config])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let listening = lines
        .find(|l| l.contains("listening"))
        .expect("no listening line");
    let addr = listening
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {listening}"))
        .to_owned();
    assert_eq!(
        send(&addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        200
    );
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and have not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.collect();
    assert!(child.wait().unwrap().success());
    (listening, rest)
}

#[tokio::test]
async fn pretty_log_format_is_text_and_log_level_is_obeyed() {
    let (listening, rest) = pretty_log_at("info").await;
    assert!(
        serde_json::from_str::<serde_json::Value>(&listening).is_err(),
        "{listening}"
    );
    assert!(listening.contains("INFO"), "{listening}");
    // `info` hides the per-request debug lines that `debug` shows for the same request.
    assert!(rest.iter().all(|l| !l.contains("DEBUG")), "{rest:?}");
    let (_, rest) = pretty_log_at("debug").await;
    assert!(rest.iter().any(|l| l.contains("DEBUG")), "{rest:?}");
}

#[tokio::test]
async fn a_failed_client_certificate_handshake_is_one_debug_line() {
    let setup = setup_with(
        |dir, ca| {
            let (cert, key) = (dir.join("gw.pem"), dir.join("gw-key.pem"));
            ca.issue(&["127.0.0.1"])
                .unwrap()
                .write(&cert, &key)
                .unwrap();
            let client_ca = dir.join("client-ca.pem");
            ca.write_cert(&client_ca).unwrap();
            format!("tls_cert = {cert:?}\ntls_key = {key:?}\nclient_ca = {client_ca:?}\n")
        },
        "[callers]\nmode = \"mtls\"\n",
    )
    .await;
    let served = Served::start(
        &setup.config,
        &[("RUST_LOG", "info,datafold_gateway=debug")],
    );
    let client = common::tls_client(&setup.ca, None, false);
    let request = Request::post(format!(
        "https://{}/api/v1/data_sources/1/test",
        served.addr
    ))
    .body(Full::new(Bytes::from_static(b"{}")))
    .unwrap();
    assert!(common::send_with(&client, request).await.is_err());
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "{status}");
    let failures: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "TLS handshake failed")
        .collect();
    assert_eq!(failures.len(), 1, "{log}");
    // Anyone who can connect can fail a handshake: it costs no log volume at the default level.
    assert_eq!(failures[0]["level"], "DEBUG");
    assert!(
        !log.contains("backtrace") && !log.contains("panicked"),
        "{log}"
    );
    assert!(setup.upstream.received().is_empty());
}

#[tokio::test]
async fn audit_stdout_repeats_each_record_for_log_shippers() {
    let setup = setup("").await;
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace("[audit]\n", "[audit]\nstdout = true\n");
    std::fs::write(&setup.config, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &setup.config])
        .env_remove("DATAFOLD_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = stderr.next().expect("no listening line").unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        if value["message"] == "listening" {
            break value["addr"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in stderr {});
    for path in ["/api/v1/data_sources/1/test", "/api/v1/data_sources"] {
        let method = if path.ends_with("test") {
            "POST"
        } else {
            "GET"
        };
        send(&addr, method, path, &[]).await;
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and have not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let file = std::fs::read_to_string(setup.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), file);
    assert_eq!(file.lines().count(), 2);
}

#[tokio::test]
async fn the_listening_line_spells_the_caller_mode_as_the_config_does() {
    let setup = setup("").await;
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &setup.config])
        .env_remove("DATAFOLD_API_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = loop {
        let line = stderr.next().expect("no listening line").unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        if value["message"] == "listening" {
            break value;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(listening["callers"], "open", "{listening}");
}
