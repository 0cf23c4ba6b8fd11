//! `audit --verify` as a process: its exit status (0 every link holds, 1 a broken link, 2 no
//! check made), its text and `--json` output, and that the key never shows.

use std::path::Path;
use std::process::Output;

use datafold_gateway::audit::chain::{self, IntegrityKey};
use serde_json::Value;

use super::harness::{run, stderr};

const KEY: &str = "integrity-k3y-for-the-process-tests-0d4e";

/// `n` records as the writer chains them, one a line.
fn trail(n: usize, key: Option<&IntegrityKey>) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut prev: Option<Vec<u8>> = None;
    for i in 0..n {
        let own = format!(
            r#"{{"ts":"2026-12-01T00:00:{i:02}Z","caller":"alice","data_source_id":{i},"status":200,"outcome":"forwarded"}}"#
        );
        let link = chain::link(prev.as_deref(), own.as_bytes(), key);
        let link = std::str::from_utf8(&link).unwrap().to_owned();
        lines.push(format!(
            "{},\"chain\":\"{link}\"}}",
            own.strip_suffix('}').unwrap()
        ));
        prev = Some(link.into_bytes());
    }
    lines
}

fn write(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn verify(file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["audit", "--verify", "--file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args, &[])
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_intact_trail_exits_zero_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    write(&file, &trail(5, None));
    let output = verify(&file, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("5 records in 1 file, every link holds"),
        "{text}"
    );
    assert!(text.contains(file.to_str().unwrap()), "{text}");

    let output = verify(&file, &["--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let document: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(document["ok"], true);
    assert_eq!(document["records"], 5);
    assert_eq!(document["files"][0], file.to_str().unwrap());
    assert!(document["broken"].is_null());
}

#[test]
fn a_broken_link_exits_one_naming_file_line_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let mut lines = trail(5, None);
    lines[3] = lines[3].replace("alice", "mallory");
    write(&file, &lines);
    let output = verify(&file, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    let expected = format!("first broken link: {}:4: changed: ", file.display());
    assert!(text.starts_with(&expected), "{text}");

    let output = verify(&file, &["--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let document: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(document["ok"], false);
    assert_eq!(document["records"], 3);
    assert_eq!(document["broken"]["file"], file.to_str().unwrap());
    assert_eq!(document["broken"]["line"], 4);
    assert_eq!(document["broken"]["kind"], "changed");
    assert!(document["broken"]["detail"].is_string());
}

#[test]
fn a_keyed_trail_needs_its_key_which_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let key = IntegrityKey::from_file_bytes(KEY.as_bytes()).unwrap();
    write(&file, &trail(3, Some(&key)));
    let right = dir.path().join("right.key");
    std::fs::write(&right, format!("{KEY}\n")).unwrap();
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "not-the-key").unwrap();
    let (right, wrong) = (right.to_str().unwrap(), wrong.to_str().unwrap());

    let runs = [
        (
            vec!["--integrity-key-file", wrong, "--integrity-key-file", right],
            0,
        ),
        (vec!["--integrity-key-file", wrong, "--json"], 1),
        (vec![], 1),
    ];
    for (args, code) in runs {
        let output = verify(&file, &args);
        let (out, err) = (stdout(&output), stderr(&output));
        assert_eq!(output.status.code(), Some(code), "{args:?}: {out}{err}");
        assert!(!out.contains(KEY) && !err.contains(KEY), "{out}{err}");
        if code == 1 {
            assert!(
                out.contains(":1: changed: ") || out.contains("\"line\":1"),
                "{out}"
            );
            assert!(out.contains("key"), "{out}");
        }
    }
}

#[test]
fn no_check_made_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    write(&file, &trail(2, None));
    let missing = dir.path().join("nowhere.jsonl");
    let blank = dir.path().join("blank.key");
    std::fs::write(&blank, "\n").unwrap();
    let blank = blank.to_str().unwrap();
    let output = verify(&missing, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains(missing.to_str().unwrap()));
    assert!(output.stdout.is_empty());

    let output = verify(&file, &["--integrity-key-file", blank]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains(blank), "{}", stderr(&output));
    let output = verify(&file, &["--integrity-key-file", "/nonexistent/audit.key"]);
    assert_eq!(output.status.code(), Some(2));

    // The whole trail or nothing: no filters, no summary; and the key only with --verify.
    for extra in [["--summary", ""], ["--caller", "alice"], ["--since", "1h"]] {
        let args: Vec<&str> = extra.into_iter().filter(|arg| !arg.is_empty()).collect();
        let output = verify(&file, &args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
    let output = run(
        &[
            "audit",
            "--file",
            file.to_str().unwrap(),
            "--integrity-key-file",
            blank,
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
}

/// `n` requests at once to a running gateway, each answered 200.
async fn burst(served: &crate::common::serve::Served, n: usize) {
    let addr = served.addr.clone();
    let sends: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let path = format!("/api/v1/data_sources/{}/test", 10 + i);
                super::harness::send(&addr, "POST", &path, &[]).await
            })
        })
        .collect();
    for sent in sends {
        assert_eq!(sent.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn what_the_gateway_writes_verifies_across_rotation_gzip_and_restart() {
    use std::io::Write;
    let key_text = "e2e-audit-integrity-key-7f21";
    let setup = super::harness::setup("").await;
    let key_file = setup.dir.path().join("audit-integrity.key");
    std::fs::write(&key_file, key_text).unwrap();
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[audit]\n",
        &format!("[audit]\nintegrity_key_file = {key_file:?}\n"),
    );
    std::fs::write(&setup.config, config).unwrap();
    let audit = setup.dir.path().join("audit.jsonl");
    let (rotated, older) = (
        setup.dir.path().join("audit.jsonl.1"),
        setup.dir.path().join("audit.jsonl.2.gz"),
    );

    let served = crate::common::serve::Served::start(&setup.config, &[]);
    assert!(!served.startup.concat().contains(key_text));
    burst(&served, 20).await;
    // Rotated as logrotate does it, and compressed (the siblings are read oldest first, by
    // their modification times: the compressed file is made before the next records).
    std::fs::rename(&audit, &rotated).unwrap();
    served.signal(libc::SIGUSR1);
    served.wait_for_log("audit file reopened");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&older).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(&std::fs::read(&rotated).unwrap()).unwrap();
    gz.finish().unwrap();
    std::fs::remove_file(&rotated).unwrap();
    burst(&served, 20).await;
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success());
    assert!(!log.contains(key_text), "the integrity key is in the log");
    std::fs::rename(&audit, &rotated).unwrap();
    // A new gateway after the restart: the live file starts empty, its chain goes on from `.1`.
    let served = crate::common::serve::Served::start(&setup.config, &[]);
    assert!(!served.startup.concat().contains(key_text));
    burst(&served, 10).await;
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success());
    assert!(!log.contains(key_text), "the integrity key is in the log");

    let key_arg = key_file.to_str().unwrap();
    let output = verify(&audit, &["--integrity-key-file", key_arg, "--json"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let document: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(document["records"], 50);
    assert_eq!(document["starts_mid_chain"], false);
    // Without the key, nothing holds.
    assert_eq!(verify(&audit, &[]).status.code(), Some(1));
    // One field changed in the live file: found at its line.
    let text = std::fs::read_to_string(&audit).unwrap();
    let edited = text.replacen("\"status\":200", "\"status\":500", 1);
    std::fs::write(&audit, edited).unwrap();
    let output = verify(&audit, &["--integrity-key-file", key_arg, "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let document: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(document["broken"]["file"], audit.to_str().unwrap());
    assert_eq!(document["broken"]["line"], 1);
    for output in [stdout(&output), stderr(&output)] {
        assert!(!output.contains(key_text));
    }
}

#[tokio::test]
async fn sighup_takes_a_new_integrity_key_and_a_cut_file_restarts_the_chain_saying_why() {
    let (first_key, next_key) = ("sighup-audit-key-ONE-51c2", "sighup-audit-key-TWO-8e07");
    let setup = super::harness::setup("").await;
    let key_file = setup.dir.path().join("audit-integrity.key");
    std::fs::write(&key_file, first_key).unwrap();
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[audit]\n",
        &format!("[audit]\nintegrity_key_file = {key_file:?}\n"),
    );
    std::fs::write(&setup.config, config).unwrap();
    let audit = setup.dir.path().join("audit.jsonl");
    let old_key_file = setup.dir.path().join("audit-integrity.key.old");
    std::fs::copy(&key_file, &old_key_file).unwrap();

    let served = crate::common::serve::Served::start(&setup.config, &[]);
    burst(&served, 3).await;
    std::fs::write(&key_file, next_key).unwrap();
    served.signal(libc::SIGHUP);
    served.wait_for_log("audit integrity key reloaded");
    burst(&served, 3).await;
    // Across the key change the chain goes on: it holds given both keys, not given either alone.
    let both = [
        "--integrity-key-file",
        old_key_file.to_str().unwrap(),
        "--integrity-key-file",
        key_file.to_str().unwrap(),
    ];
    let output = verify(&audit, &both);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(
        stdout(&output).starts_with("6 records"),
        "{}",
        stdout(&output)
    );
    for one in [&old_key_file, &key_file] {
        let output = verify(&audit, &["--integrity-key-file", one.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1));
    }

    // Cut short under the running gateway: the next record starts a new chain, and the log says
    // why.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&audit)
        .unwrap()
        .set_len(0)
        .unwrap();
    burst(&served, 1).await;
    let warning = served.wait_for_log("the audit chain starts anew (chain_restart)");
    assert!(
        warning["reason"].as_str().unwrap().contains("truncated"),
        "{warning}"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("\"chain_restart\":true"), "{text}");
    served.terminate();
    let (status, log) = served.wait();
    assert!(status.success());
    assert!(!log.contains(first_key) && !log.contains(next_key));
}
