//! `datafold-gateway demo`: the gateway with its shipped configuration, pointed at a local
//! stand-in for Datafold, walked through what it forwards, what it refuses and what it audits.
//!
//! Everything runs on loopback with ephemeral ports and a fresh temporary folder, so the demo
//! works on any machine, needs no Datafold account and leaves nothing listening. Each step checks
//! the status it promises and the demo fails if one differs: it never claims what did not happen.
//! The demo key plays the part of the real key, so it is never printed either.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::cli::standin::{StandIn, ThrowawayCa};
use crate::config::{ApiKeySource, Config};
use crate::gateway::Gateway;

type Error = Box<dyn std::error::Error>;

const CONFIG_PATH: &str = "config/gateway.toml";
/// The shipped configuration, for a demo run outside the source tree.
const SHIPPED_CONFIG: &str = include_str!("../../config/gateway.toml");
/// Well past the shipped global burst (60), yet a bounded number of requests.
const MAX_BURST: usize = 100;
const TEST_42: &str = "/api/v1/data_sources/42/test";

pub async fn run(keep: bool) -> Result<(), Box<dyn std::error::Error>> {
    let workdir = std::env::temp_dir().join(format!("datafold-gateway-demo.{}", unique()));
    std::fs::create_dir_all(&workdir).context(format!("cannot create {}", workdir.display()))?;
    let demo_key = format!("demo-{}", unique());
    let ca = ThrowawayCa::new("datafold-gateway demo CA").context("cannot make the demo CA")?;
    let tls = ca
        .server_config(&["127.0.0.1", "localhost"])
        .context("cannot issue a certificate")?;
    let standin = StandIn::start(tls, &demo_key)
        .await
        .context("cannot start the stand-in")?;

    let ca_path = workdir.join("demo-ca.pem");
    ca.write_cert(&ca_path)
        .context(format!("cannot write {}", ca_path.display()))?;
    let key_path = workdir.join("datafold-api-key");
    std::fs::write(&key_path, &demo_key).context(format!("cannot write {}", key_path.display()))?;
    let (config, source) = demo_config(&standin, ca_path, &key_path, &workdir)?;
    let audit_path = config.audit.file.clone();
    let global = config
        .rate_limit
        .global
        .map(|l| format!("{:?}, burst {}", l.rate, l.burst));

    let gateway = Gateway::bind(config).await?;
    // The gateway reads the key once, at start; the file has done its job.
    let _ = std::fs::remove_file(&key_path);
    let (listen, admin) = (gateway.listen_addr(), gateway.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));

    println!("datafold-gateway demo");
    println!(
        "  stand-in Datafold  {} (data source 13 fails)",
        standin.url()
    );
    println!("  gateway            http://{listen} (admin http://{admin})");
    println!("  configuration      {source}, pointed at the stand-in");
    println!("  API key            a random demo key, never shown; callers never send it");

    let caller = Caller {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: format!("http://{listen}"),
    };
    let global = global.unwrap_or_else(|| "none configured".into());
    let shown = async {
        let first_job = walk_through(&caller, &standin, &global).await?;
        print_audit(&audit_path)?;
        Ok::<_, Error>(first_job)
    }
    .await;
    // Idle pooled connections would otherwise hold the graceful shutdown open.
    drop(caller);

    let waited: Result<(), Error> = match (&shown, keep) {
        (Ok(first_job), true) => {
            // Listen for Ctrl-C before saying so, or an early one would kill the process.
            match interrupt_listener().context("cannot wait for Ctrl-C") {
                Ok(interrupted) => {
                    print_curl_lines(listen, admin, *first_job);
                    interrupted.await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        _ => Ok(()),
    };
    let _ = stop.send(());
    serving.await.context("the gateway task failed")??;
    shown?;
    waited?;
    println!("\nGateway stopped. For real: `datafold-gateway serve --config {CONFIG_PATH}`.");
    Ok(())
}

/// Resolves on the next SIGINT; listening starts when this returns, not when it is awaited.
fn interrupt_listener() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        interrupt.recv().await;
    })
}

fn unique() -> impl Display {
    uuid::Uuid::new_v4().simple()
}

/// The default configuration (`config/gateway.toml` in the source tree, else the same text as
/// shipped) with only what must change to talk to the stand-in on free ports.
fn demo_config(
    standin: &StandIn,
    ca_path: PathBuf,
    key_path: &Path,
    workdir: &Path,
) -> Result<(Config, &'static str), Error> {
    let path = Path::new(CONFIG_PATH);
    let (mut config, source) = if path.exists() {
        (Config::load(path)?, CONFIG_PATH)
    } else {
        let shipped = Config::parse(path, SHIPPED_CONFIG)?;
        (shipped, "the shipped config/gateway.toml")
    };
    config.upstream.url = standin.url().parse()?;
    config.upstream.ca_file = Some(ca_path);
    config.api_key = ApiKeySource::File(key_path.to_owned());
    // Ephemeral ports, so the demo runs beside a real gateway on 8080/9090.
    config.listen.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.audit.file = workdir.join("audit.jsonl");
    Ok((config, source))
}

/// The steps, each printed as one line; returns the first job id, for the curl lines.
async fn walk_through(caller: &Caller, standin: &StandIn, global: &str) -> Result<i64, Error> {
    println!("\n1. Start a connection test, then read its result");
    let first_job = job_id(&caller.step("POST", TEST_42, 200).await?)?;
    let poll = format!("/api/v1/data_sources/test/{first_job}");
    caller.step("GET", &poll, 200).await?;

    println!("\n2. Data source 13 cannot connect; its result says why");
    let failing = caller.step("POST", "/api/v1/data_sources/13/test", 200);
    let poll = format!("/api/v1/data_sources/test/{}", job_id(&failing.await?)?);
    caller.step("GET", &poll, 200).await?;

    println!("\n3. A caller's own Authorization header is replaced by the gateway's key");
    let answer = caller.send("POST", TEST_42, Some("Key not-the-real-key"));
    expect(answer.await?, "POST", TEST_42, 200)?;
    println!("  (sent as `Authorization: Key not-the-real-key`; the stand-in 401s any key but the real one)");

    println!("\n4. Refused by the gateway itself, never sent upstream");
    let before = standin.received().len();
    let bad_id = "/api/v1/data_sources/not-a-number/test";
    caller.step("POST", bad_id, 422).await?;
    caller.step("GET", "/api/v1/data_sources", 404).await?;
    caller
        .step("POST", "/api/v1/data_sources/42/query", 404)
        .await?;
    let reached = standin.received().len() - before;
    if reached > 0 {
        return Err(format!("{reached} refused request(s) reached the stand-in").into());
    }
    println!(
        "  (the list would show data sources' credentials; none of these reached the stand-in)"
    );

    println!("\n5. A burst meets the global rate limit ({global})");
    meet_rate_limit(caller).await?;
    Ok(first_job)
}

/// Starts tests one after another until the gateway answers 429, which it must.
async fn meet_rate_limit(caller: &Caller) -> Result<(), Error> {
    let path = "/api/v1/data_sources/7/test";
    let mut admitted = 0;
    for _ in 0..MAX_BURST {
        let answer = caller.send("POST", path, None).await?;
        if answer.status == StatusCode::OK {
            admitted += 1;
            continue;
        }
        println!("  POST {path:<40} → 200 ×{admitted} (admitted and forwarded)");
        let retry_after = answer.retry_after.as_deref().unwrap_or("(missing)");
        let (status, body) = (answer.status.as_u16(), short(&answer.body));
        println!("  POST {path:<40} → {status} Retry-After: {retry_after} {body}");
        return match status {
            429 => Ok(()),
            other => Err(format!("POST {path}: expected 200 or 429, got {other}").into()),
        };
    }
    let hint = format!("is [rate_limit.global] set in {CONFIG_PATH}?");
    Err(format!("no 429 after {MAX_BURST} requests: {hint}").into())
}

/// A plain-HTTP client of the gateway, as an internal caller would use it.
struct Caller {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Bytes,
}

impl Caller {
    /// POSTs carry `{}` as JSON, as Datafold's own client sends them.
    async fn send(&self, method: &str, path: &str, auth: Option<&str>) -> Result<Answer, Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let mut body = Bytes::new();
        if method == "POST" {
            request = request.header(CONTENT_TYPE, "application/json");
            body = Bytes::from_static(b"{}");
        }
        if let Some(value) = auth {
            request = request.header(AUTHORIZATION, value);
        }
        let failed = format!("{method} {path}: no answer from the gateway");
        let response = self.client.request(request.body(Full::new(body))?);
        let response = response.await.context(&failed)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok());
        let retry_after = retry_after.map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .context(&failed)?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    /// Sends a request, prints it as one line, and fails unless the status is `expected`.
    async fn step(&self, method: &str, path: &str, expected: u16) -> Result<Answer, Error> {
        expect(self.send(method, path, None).await?, method, path, expected)
    }
}

fn expect(answer: Answer, method: &str, path: &str, expected: u16) -> Result<Answer, Error> {
    let status = answer.status.as_u16();
    let shown = describe_results(&answer.body).unwrap_or_else(|| short(&answer.body));
    println!("  {method:<4} {path:<40} → {status} {shown}");
    if status != expected {
        return Err(format!("{method} {path}: expected {expected}, got {status}").into());
    }
    Ok(answer)
}

fn job_id(answer: &Answer) -> Result<i64, Error> {
    let value: Option<Value> = serde_json::from_slice(&answer.body).ok();
    let job = value.and_then(|v| v["job_id"].as_i64());
    job.ok_or_else(|| format!("no job_id in the answer: {}", short(&answer.body)).into())
}

/// A test result in one phrase, since its full JSON does not fit on a line.
fn describe_results(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let status = value["status"].as_str()?;
    let steps = value["results"].as_array()?;
    let connection = &steps.iter().find(|s| s["step"] == "connection")?["result"];
    let code = connection["code"].as_str()?;
    let message = connection["message"].as_str().unwrap_or_default();
    Some(format!("test {status}; connection {code}: \"{message}\""))
}

fn short(body: &[u8]) -> String {
    truncate(String::from_utf8_lossy(body).trim(), 100)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max - 1) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// (header, field of the audit record); headers abbreviated to keep the table on a screen.
const COLUMNS: [(&str, &str); 12] = [
    ("time", "ts"),
    ("caller", "caller"),
    ("method", "method"),
    ("path", "path"),
    ("route", "route"),
    ("ds", "data_source_id"),
    ("job", "job_id"),
    ("status", "status"),
    ("outcome", "outcome"),
    ("limit", "limit"),
    ("upstream", "upstream_status"),
    ("ms", "duration_ms"),
];
/// Columns that differ between otherwise identical requests: time, job, ms.
const VARYING: [usize; 3] = [0, 6, 11];

/// Prints the audit file as a table, folding runs of identical forwarded requests into one.
fn print_audit(path: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(path).context(format!("cannot read {}", path.display()))?;
    let mut shown: Vec<(Vec<String>, usize)> = Vec::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).context(path.display())?;
        let row: Vec<String> = COLUMNS.iter().map(|(_, f)| cell(f, &record[*f])).collect();
        let forwarded = record["outcome"] == "forwarded";
        match shown.last_mut() {
            // Refusals are never folded away: each one is something to see.
            Some((last, more)) if forwarded && same_request(last, &row) => *more += 1,
            _ => shown.push((row, 0)),
        }
    }
    let mut widths: Vec<usize> = COLUMNS.iter().map(|(header, _)| header.len()).collect();
    for (row, _) in &shown {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}"));
        format!("  {}", padded.collect::<Vec<_>>().join("  ").trim_end())
    };
    println!(
        "\nThe audit trail, one line per request answered: {}",
        path.display()
    );
    println!(
        "{}",
        line(COLUMNS.iter().map(|(header, _)| *header).collect())
    );
    for (row, more) in &shown {
        println!("{}", line(row.iter().map(String::as_str).collect()));
        if *more > 0 {
            println!("  {:w$}  … {more} more like this", "", w = widths[0]);
        }
    }
    println!("  (ds = data_source_id, job = job_id, upstream = upstream_status, ms = duration_ms)");
    Ok(())
}

fn same_request(a: &[String], b: &[String]) -> bool {
    (0..COLUMNS.len())
        .filter(|i| !VARYING.contains(i))
        .all(|i| a[i] == b[i])
}

fn cell(field: &str, value: &Value) -> String {
    match (field, value) {
        // `2026-01-02T03:04:05.678901Z` → `03:04:05.678`
        ("ts", Value::String(ts)) => ts
            .split_once('T')
            .map_or(&ts[..], |(_, t)| t.get(..12).unwrap_or(t))
            .into(),
        ("path", Value::String(path)) => truncate(path, 32),
        ("duration_ms", Value::Number(ms)) => format!("{:.2}", ms.as_f64().unwrap_or_default()),
        (_, Value::String(s)) => s.clone(),
        (_, Value::Null) => "-".to_owned(),
        (_, other) => other.to_string(),
    }
}

fn print_curl_lines(listen: SocketAddr, admin: SocketAddr, job: i64) {
    let json = "-H 'content-type: application/json' -d '{}'";
    println!("\nThe gateway (http://{listen}) and its admin listener (http://{admin})");
    println!("keep running until Ctrl-C. Try:");
    println!("  curl -s -X POST {json} http://{listen}{TEST_42}");
    println!("  curl -s http://{listen}/api/v1/data_sources/test/{job}");
    println!("  curl -si http://{listen}/api/v1/data_sources    # 404: never forwarded");
    println!("  curl -s http://{admin}/readyz");
}

/// Adds what was being done to an error, for messages that say where it went wrong.
trait Context<T> {
    fn context(self, doing: impl Display) -> Result<T, Error>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, doing: impl Display) -> Result<T, Error> {
        self.map_err(|e| format!("{doing}: {e}").into())
    }
}
