//! The other subcommands: `demo` (its scenario, and `--keep` until interrupted) and
//! `hash-token`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::harness::{run, stderr, CALLER_SECRET};
use crate::common::serve::BIN;

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
