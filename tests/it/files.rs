//! The key and config files read safely, by the real process: a FIFO or a device in their place
//! is refused (at start: an exit naming the file; on reload: the old value stays) without
//! freezing the listeners or shutdown, or filling memory; a key file others can read is warned
//! about.

use crate::common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::serve::Served;
use common::API_KEY;
use http_body_util::{BodyExt, Full};

/// The gateway's shutdown grace in these tests; a clean stop takes far less.
const GRACE: Duration = Duration::from_secs(5);

/// How long the gateway gets to answer a request while a bad file sits in place of a good one.
/// Generous: it includes the first upstream TLS handshake of a debug build on a busy machine.
const PROMPT: Duration = Duration::from_secs(5);

/// Most memory a gateway that refused `/dev/zero` may hold; it needs about 20 MB.
const RSS_LIMIT_KB: u64 = 200 * 1024;

/// What the gateway logs when a reload is refused.
const KEY_REFUSED: &str = "new API key refused; the previous key stays in effect";
const CONFIG_REFUSED: &str = "configuration not reloaded; the previous one stays in effect";

/// The process tests' gateway setup (a stand-in upstream, a config file, the key in a file
/// beside it), with a short shutdown grace; the key file's path at hand.
struct Setup {
    _base: crate::process::harness::Setup,
    config: PathBuf,
    key_file: PathBuf,
}

async fn setup() -> Setup {
    let grace = format!("[limits]\nshutdown_grace = \"{}s\"\n", GRACE.as_secs());
    let base = crate::process::harness::setup(&grace).await;
    let key_file = base.dir.path().join(common::API_KEY_FILE);
    Setup {
        config: PathBuf::from(&base.config),
        key_file,
        _base: base,
    }
}

/// Puts a FIFO (that nobody ever writes to) in place of `path`.
fn replace_with_fifo(path: &Path) {
    std::fs::remove_file(path).unwrap();
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo(3) only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// SIGTERM, then the exit status, which must come within the shutdown grace.
fn stop(gateway: Served) -> (ExitStatus, String) {
    gateway.terminate();
    gateway.exit_within(GRACE)
}

/// The status of a request to the gateway, which must answer within [`PROMPT`].
async fn status_of(method: &str, url: String) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(&url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let answer = async {
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains(API_KEY));
        status
    };
    tokio::time::timeout(PROMPT, answer)
        .await
        .unwrap_or_else(|_| panic!("{method} {url} not answered within {PROMPT:?}"))
}

/// Checks that the gateway still answers its probe and forwards a request (with the key it
/// started with, which the stand-in accepts).
async fn assert_serving(gateway: &Served) {
    let healthz = format!("http://{}/healthz", gateway.admin);
    assert_eq!(status_of("GET", healthz).await, 200);
    let test = format!("http://{}/api/v1/data_sources/1/test", gateway.addr);
    assert_eq!(status_of("POST", test).await, 200);
}

#[tokio::test]
async fn a_fifo_as_the_key_file_on_sighup_is_refused_and_the_gateway_keeps_serving() {
    let setup = setup().await;
    let gateway = Served::start(&setup.config, &[]);
    assert_serving(&gateway).await;

    // The folder watch sees the swap too; either reload must refuse the FIFO, not wait on it.
    replace_with_fifo(&setup.key_file);
    gateway.signal(libc::SIGHUP);
    gateway.wait_for_log("reloading (SIGHUP)");
    let refused = gateway.wait_for_log(KEY_REFUSED);
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains(&*setup.key_file.to_string_lossy()) && error.contains("FIFO"),
        "{refused}"
    );

    assert_serving(&gateway).await;
    let (status, log) = stop(gateway);
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(!log.contains(API_KEY));
}

#[tokio::test]
async fn dev_zero_as_the_config_file_is_refused_without_filling_memory() {
    let setup = setup().await;
    let gateway = Served::start(&setup.config, &[]);
    assert_serving(&gateway).await;

    // Replaced by a symlink (as a ConfigMap is), which the folder watch sees, then SIGHUP.
    std::fs::remove_file(&setup.config).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &setup.config).unwrap();
    gateway.signal(libc::SIGHUP);
    // Memory is watched while the refusals are awaited: a gateway reading /dev/zero grows by
    // about 1 GB/s and is stopped (dropped, killed) as soon as it passes the limit.
    let (mut hangup, mut refusals) = (false, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(hangup && refusals >= 1) {
        let rss = gateway.rss_kb();
        assert!(rss < RSS_LIMIT_KB, "RSS {rss} kB while reading /dev/zero");
        assert!(Instant::now() < deadline, "no refusal within 10 s");
        let Ok(line) = gateway.lines.recv_timeout(Duration::from_millis(20)) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["message"] == "reloading (SIGHUP)" {
            hangup = true;
            refusals = 0;
        } else if value["message"] == CONFIG_REFUSED && hangup {
            let error = value["error"].as_str().unwrap();
            assert!(
                error.contains("gateway.toml") && error.contains("character device"),
                "{value}"
            );
            refusals += 1;
        }
    }

    assert_serving(&gateway).await;
    let rss = gateway.rss_kb();
    assert!(rss < RSS_LIMIT_KB, "RSS {rss} kB after refusing /dev/zero");
    let (status, log) = stop(gateway);
    assert!(status.success(), "exit {status}; log:\n{log}");
}

#[tokio::test]
async fn a_fifo_as_the_key_file_at_start_is_an_immediate_error_naming_it() {
    let setup = setup().await;
    replace_with_fifo(&setup.key_file);
    let gateway = Served::spawn(&setup.config, &[]);
    let (status, log) = gateway.exit_within(Duration::from_secs(10));
    assert!(!status.success(), "{status}");
    assert!(
        log.contains(&*setup.key_file.to_string_lossy())
            && log.contains("is a FIFO, not a regular file"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn a_key_file_others_can_read_is_warned_about_at_start_and_on_reload() {
    let setup = setup().await;
    let warned = |line: &str| line.contains("chmod 600") && line.contains("defaultMode");
    let names_the_key = |line: &str| line.contains(&*setup.key_file.to_string_lossy());

    std::fs::set_permissions(&setup.key_file, PermissionsExt::from_mode(0o644)).unwrap();
    let gateway = Served::start(&setup.config, &[]);
    let warning = gateway
        .startup
        .iter()
        .find(|line| warned(line.as_str()))
        .unwrap_or_else(|| panic!("no warning at start: {:?}", gateway.startup));
    assert!(
        names_the_key(warning) && warning.contains("0644"),
        "{warning}"
    );
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(warning.contains("not an error"), "{warning}");
    gateway.signal(libc::SIGHUP);
    gateway.wait_for_log("reloading (SIGHUP)");
    let again = gateway.wait_for_line("permission warning", |value| {
        value["level"] == "WARN" && warned(&value.to_string())
    });
    assert_eq!(again["mode"], "0644", "{again}");
    let (status, log) = stop(gateway);
    assert!(status.success(), "exit {status}; log:\n{log}");

    std::fs::set_permissions(&setup.key_file, PermissionsExt::from_mode(0o600)).unwrap();
    let gateway = Served::start(&setup.config, &[]);
    assert!(
        !gateway.startup.iter().any(|line| warned(line)),
        "warned about a 0600 key file: {:?}",
        gateway.startup
    );
    let (status, log) = stop(gateway);
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(!log.lines().any(warned), "{log}");
}
