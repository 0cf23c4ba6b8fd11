//! The gateway as a real process: start-up errors, exit codes, signals, and what it logs.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::serve::{Served, BIN};
use common::{config_for, read_audit, wait_for_upstream, API_KEY};
use datafold_gateway::standin::{StandIn, ThrowawayCa};
use http::Request;
use http_body_util::{BodyExt, Full};

/// A caller's credential sent to the gateway; it must not show up anywhere either.
const CALLER_SECRET: &str = "caller-secret-3b9d0f1e";

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DATAFOLD_API_KEY")
        .env_remove("DATAFOLD_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

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

/// Sends a request and returns its status, checking that no answer, gateway-made errors
/// included, carries the key or a caller's credential in its headers or body.
async fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    // A result poll carries no body; a test start carries `{}`.
    let body = if method == "GET" { "" } else { "{}" };
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let head = format!("{:?}", response.headers());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer = format!("{head}{}", String::from_utf8_lossy(&body));
    assert!(
        !answer.contains(API_KEY),
        "the key is in an answer: {answer}"
    );
    assert!(
        !answer.contains(CALLER_SECRET),
        "a credential is in an answer: {answer}"
    );
    status
}

/// A stand-in upstream and a config file for a gateway in front of it (ephemeral ports, the
/// key in a file, the audit file beside it), plus `extra` TOML.
struct Setup {
    dir: tempfile::TempDir,
    ca: ThrowawayCa,
    upstream: StandIn,
    config: String,
}

async fn setup(extra: &str) -> Setup {
    setup_with(|_, _| String::new(), extra).await
}

/// As [`setup`], with `listen` adding keys to the `[listen]` table (it may write files into
/// the folder it gets, with certificates from the CA).
async fn setup_with(listen: impl FnOnce(&Path, &ThrowawayCa) -> String, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = ThrowawayCa::new("ca").unwrap();
    let upstream = StandIn::start(ca.server_config(&["127.0.0.1"]).unwrap(), API_KEY)
        .await
        .unwrap();
    let base = config_for(dir.path(), &ca, &upstream.url());
    let datafold_gateway::config::ApiKeySource::File(key_file) = base.api_key else {
        unreachable!("config_for keeps the key in a file");
    };
    let listen = listen(dir.path(), &ca);
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{listen}[admin]\naddr = \"127.0.0.1:0\"\n\
         [upstream]\nurl = {:?}\nca_file = {:?}\n\
         [api_key]\nfile = {:?}\n[audit]\nfile = {:?}\n{extra}",
        upstream.url(),
        base.upstream.ca_file.unwrap(),
        key_file,
        base.audit.file,
    );
    let config = write_config(dir.path(), &text);
    Setup {
        dir,
        ca,
        upstream,
        config,
    }
}

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
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let setup = setup("[limits]\nshutdown_grace = \"20s\"\n").await;
    setup.upstream.set_delay(Duration::from_millis(1500));
    let served = Served::start(&setup.config, &[]);
    let addr = served.addr.clone();
    let in_flight =
        tokio::spawn(async move { send(&addr, "POST", "/api/v1/data_sources/7/test", &[]).await });
    // SIGTERM only once the request is in flight: it has reached the upstream.
    wait_for_upstream(&setup.upstream).await;
    served.terminate();
    assert_eq!(in_flight.await.unwrap(), 200);
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
    let audit = read_audit(&setup.dir.path().join("audit.jsonl"));
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(audit[0]["data_source_id"], 7);
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

#[tokio::test]
async fn sigterm_ends_a_gateway_whose_audit_file_hangs() {
    // A FIFO nobody reads: the gateway opens it read-write, so the opening succeeds, and its
    // writes block for good once the pipe's buffer is full, as on a stuck network volume.
    let setup = setup("[limits]\nshutdown_grace = \"1s\"\n").await;
    let fifo = setup.dir.path().join("audit.jsonl");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let served = Served::start(&setup.config, &[]);
    // Requests until the workers stop answering: each record is a few hundred bytes, the pipe
    // holds 64 KiB.
    let mut hung = false;
    for batch in 0..40 {
        let sends: Vec<_> = (0..16)
            .map(|n| {
                let addr = served.addr.clone();
                let path = format!("/api/v1/data_sources/{}/test", batch * 16 + n);
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(2), send(&addr, "POST", &path, &[]))
                        .await
                })
            })
            .collect();
        for sent in sends {
            hung |= sent.await.unwrap().is_err();
        }
        if hung {
            break;
        }
    }
    assert!(hung, "the audit FIFO never filled up");
    served.terminate();
    // Grace (1 s), the workers' margin (5 s), the audit file's close (10 s), the runtime (1 s).
    let (status, log) = served.exit_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("workers did not stop in time"), "{log}");
}

#[tokio::test]
async fn sigterm_right_after_start_is_a_clean_stop() {
    let setup = setup("").await;
    let served = Served::start(&setup.config, &[]);
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
}

#[tokio::test]
async fn pretty_log_format_is_text_and_log_level_is_obeyed() {
    let setup = setup("[log]\nformat = \"pretty\"\nlevel = \"info\"\n").await;
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &setup.config])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let listening = lines.find(|l| l.contains("listening"));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and have not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.collect();
    assert!(child.wait().unwrap().success());
    let listening = listening.expect("no listening line");
    assert!(
        serde_json::from_str::<serde_json::Value>(&listening).is_err(),
        "{listening}"
    );
    assert!(listening.contains("INFO"), "{listening}");
    // `info` hides the per-request debug spans that RUST_LOG=trace shows elsewhere.
    assert!(rest.iter().all(|l| !l.contains("DEBUG")), "{rest:?}");
}

#[tokio::test]
async fn sigint_stops_it_cleanly_too() {
    let setup = setup("[log]\nformat = \"json\"\n").await;
    let served = Served::start(&setup.config, &[]);
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        200
    );
    served.signal(libc::SIGINT);
    let (status, log) = served.wait();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("\"stopped\""), "{log}");
    assert_eq!(read_audit(&setup.dir.path().join("audit.jsonl")).len(), 1);
}

#[test]
fn demo_runs_its_scenario_and_exits_zero() {
    let output = Command::new(BIN)
        .arg("demo")
        .env_remove("DATAFOLD_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", stderr(&output));
    for status in ["200", "422", "404", "429"] {
        assert!(
            stdout.contains(status),
            "demo output lacks {status}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("test_connection"),
        "demo shows no audit table:\n{stdout}"
    );
}

#[test]
fn demo_keep_serves_until_interrupted() {
    let mut child = Command::new(BIN)
        .args(["demo", "--keep"])
        .env_remove("DATAFOLD_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    // The readyz curl line names the admin listener that --keep leaves running.
    let readyz = lines
        .find_map(|line| {
            let url = line.split_whitespace().find(|w| w.ends_with("/readyz"))?;
            Some(url.trim_start_matches("http://").to_owned())
        })
        .expect("demo --keep printed no readyz line");
    let (admin, path) = readyz.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and have not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
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

#[test]
fn hash_token_reads_one_line_from_stdin() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{CALLER_SECRET}\n").as_bytes())
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let digest = datafold_gateway::config::TokenDigest::of(CALLER_SECRET.as_bytes()).to_hex();
    assert_eq!(stdout, format!("sha256 = \"{digest}\"\n"));
}

#[test]
fn hash_token_generate_prints_a_token_and_its_digest() {
    let output = run(&["hash-token", "--generate"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    let token = lines.next().unwrap().strip_prefix("token: ").unwrap();
    assert!(token.len() >= 40, "{token}");
    let digest = datafold_gateway::config::TokenDigest::of(token.as_bytes()).to_hex();
    assert_eq!(
        lines.next(),
        Some(format!("sha256 = \"{digest}\"").as_str())
    );
    let again = String::from_utf8(run(&["hash-token", "--generate"], &[]).stdout).unwrap();
    assert_ne!(stdout, again);
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

/// A token-mode config section with one entry per `(name, token)`.
fn token_callers(callers: &[(&str, &str)]) -> String {
    let mut text = String::from("[callers]\nmode = \"token\"\n");
    for (name, token) in callers {
        let digest = datafold_gateway::config::TokenDigest::of(token.as_bytes()).to_hex();
        text.push_str(&format!(
            "[[callers.token]]\nname = \"{name}\"\nsha256 = \"{digest}\"\n"
        ));
    }
    text
}

/// Rewrites the config file: `setup`'s base with `extra` in place of what it had.
fn rewrite_config(setup: &Setup, old_extra: &str, new_extra: &str) {
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let base = text
        .strip_suffix(old_extra)
        .expect("config ends with its extra");
    std::fs::write(&setup.config, format!("{base}{new_extra}")).unwrap();
}

#[tokio::test]
async fn sighup_adds_and_revokes_token_callers() {
    const ANALYTICS: &str = "dfgw_sighup_analytics_token";
    const BILLING: &str = "dfgw_sighup_billing_token";
    let before = token_callers(&[("analytics", ANALYTICS)]);
    let setup = setup(&before).await;
    let served = Served::start(&setup.config, &[]);
    let start = |token: &'static str| {
        let addr = served.addr.clone();
        async move {
            let bearer = format!("Bearer {token}");
            send(
                &addr,
                "POST",
                "/api/v1/data_sources/1/test",
                &[("authorization", &bearer)],
            )
            .await
        }
    };
    assert_eq!(start(ANALYTICS).await, 200);
    assert_eq!(start(BILLING).await, 401);

    // billing added, analytics revoked.
    rewrite_config(&setup, &before, &token_callers(&[("billing", BILLING)]));
    served.signal(libc::SIGHUP);
    // The folder watch may reload first; the signal's own reload follows its log line.
    served.wait_for_log("reloading (SIGHUP)");
    served.wait_for_log("[callers] and [rate_limit] reloaded");
    assert_eq!(start(BILLING).await, 200);
    assert_eq!(start(ANALYTICS).await, 401);

    // A broken file is refused whole: billing stays in.
    rewrite_config(
        &setup,
        &token_callers(&[("billing", BILLING)]),
        "[callers]\nmode = \"token\"\n[[callers.token]]\nname = \"x\"\nsha256 = \"not hex\"\n",
    );
    served.signal(libc::SIGHUP);
    served.wait_for_log("reloading (SIGHUP)");
    let refused =
        served.wait_for_log("configuration not reloaded; the previous one stays in effect");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("callers.token[0].sha256")),
        "{refused}"
    );
    assert_eq!(start(BILLING).await, 200);
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success(), "{status}");
    assert!(!log.contains(BILLING) && !log.contains(ANALYTICS));
}

#[tokio::test]
async fn sighup_rotates_the_key_from_its_file() {
    const NEW_KEY: &str = "dfk_live_SIGHUP_ROTATED_5e7a1c";
    let setup = setup("").await;
    let key_file = setup.dir.path().join("datafold-api-key");
    let served = Served::start(&setup.config, &[]);
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        200
    );
    // The stand-in only knows API_KEY: after the rotation, Datafold itself refuses (401).
    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    served.signal(libc::SIGHUP);
    // The folder watch may get to the key first; either way it is in effect once the
    // signal's reload, which does the key first, has moved on to the config.
    served.wait_for_log("reloading (SIGHUP)");
    served.wait_for_log("[callers] and [rate_limit] reloaded");
    assert_eq!(
        send(&served.addr, "POST", "/api/v1/data_sources/1/test", &[]).await,
        401
    );
    let received = setup.upstream.received();
    assert_eq!(
        received.last().unwrap().headers["authorization"],
        format!("Key {NEW_KEY}").as_str()
    );
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success());
    assert!(!log.contains(NEW_KEY) && !log.contains(API_KEY));
}

#[tokio::test]
async fn sigusr1_reopens_the_audit_file_without_losing_records_in_flight() {
    let setup = setup("").await;
    let served = Served::start(&setup.config, &[]);
    let audit = setup.dir.path().join("audit.jsonl");
    let rotated = setup.dir.path().join("audit.jsonl.1");
    // Requests keep flowing from four callers while the file is rotated under them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let addr = served.addr.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut answered = 0u32;
                while !*stop.borrow() {
                    assert_eq!(
                        send(&addr, "POST", "/api/v1/data_sources/5/test", &[]).await,
                        200
                    );
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    // Whole lines only: a line being written is not counted, nor parsed.
    let lines = |path: &Path| {
        std::fs::read(path).map_or(0, |bytes| bytes.iter().filter(|b| **b == b'\n').count())
    };
    while lines(&audit) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::rename(&audit, &rotated).unwrap();
    served.signal(libc::SIGUSR1);
    served.wait_for_log("audit file reopened");
    while lines(&audit) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(true).unwrap();
    let mut answered = 0;
    for sender in senders {
        answered += sender.await.unwrap();
    }
    served.terminate();
    let (status, _) = served.wait();
    assert!(status.success());
    let (old, new) = (read_audit(&rotated).len(), read_audit(&audit).len());
    assert!(old >= 20 && new >= 20, "{old} + {new}");
    assert_eq!(
        old + new,
        answered as usize,
        "every answered request has its record"
    );
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
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    const OPS: &str = "dfgw_watch_ops_token";
    let before = token_callers(&[("analytics", "dfgw_watch_analytics_token")]);
    let setup = setup(&before).await;
    let served = Served::start(&setup.config, &[]);
    let bearer = format!("Bearer {OPS}");
    let headers = [("authorization", bearer.as_str())];
    let path = "/api/v1/data_sources/1/test";
    assert_eq!(send(&served.addr, "POST", path, &headers).await, 401);
    // Written aside, then renamed over the config: how editors and ConfigMaps replace a file.
    let staged = setup.dir.path().join("gateway.toml.new");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace(&before, &token_callers(&[("ops", OPS)]));
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, &setup.config).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while send(&served.addr, "POST", path, &headers).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new caller was not let in within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.terminate();
    assert!(served.wait().0.success());
}
