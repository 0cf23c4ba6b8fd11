//! What the process tests share: running the binary, a config file for a gateway in front
//! of a stand-in, and requests that check every answer for secrets. The `serve` process itself
//! (readiness, log lines, signals) is `common::serve::Served`, which the file tests use too.

use std::path::Path;
use std::process::{Command, Output};

use bytes::Bytes;
use datafold_gateway::cli::standin::{StandIn, ThrowawayCa};
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::common::serve::BIN;
use crate::common::{config_for, API_KEY};

/// A caller's credential sent to the gateway; it must not show up anywhere either.
pub const CALLER_SECRET: &str = "caller-secret-3b9d0f1e";

pub fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DATAFOLD_API_KEY")
        .env_remove("DATAFOLD_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sends a request and returns its status, checking that no answer, gateway-made errors
/// included, carries the key or a caller's credential in its headers or body.
pub async fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
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
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub ca: ThrowawayCa,
    pub upstream: StandIn,
    pub config: String,
}

pub async fn setup(extra: &str) -> Setup {
    setup_with(|_, _| String::new(), extra).await
}

/// As [`setup`], with `listen` adding keys to the `[listen]` table (it may write files into
/// the folder it gets, with certificates from the CA).
pub async fn setup_with(listen: impl FnOnce(&Path, &ThrowawayCa) -> String, extra: &str) -> Setup {
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

/// A token-mode config section with one entry per `(name, token)`.
pub fn token_callers(callers: &[(&str, &str)]) -> String {
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
pub fn rewrite_config(setup: &Setup, old_extra: &str, new_extra: &str) {
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let base = text
        .strip_suffix(old_extra)
        .expect("config ends with its extra");
    std::fs::write(&setup.config, format!("{base}{new_extra}")).unwrap();
}
