//! A `datafold-gateway serve` process for the tests about processes (signals, exit codes, logs):
//! its log lines are collected as they come, and it is killed if dropped while still running.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_datafold-gateway");

pub struct Served {
    child: Child,
    /// Every line the process writes to stderr (its log), in order. The channel closes when the
    /// process does.
    pub lines: mpsc::Receiver<String>,
    /// The lines logged before the "listening" line (empty until [`Served::start`] saw it).
    pub startup: Vec<String>,
    /// The main and admin listeners' addresses, from the "listening" line.
    pub addr: String,
    pub admin: String,
}

impl Served {
    /// Runs `serve --config CONFIG` with `envs`, without waiting for anything. The variables a
    /// developer's shell may hold (key, config path, log filter) are not passed on.
    pub fn spawn(config: impl AsRef<OsStr>, envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_remove("DATAFOLD_API_KEY")
            .env_remove("DATAFOLD_GATEWAY_CONFIG")
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            startup: Vec::new(),
            addr: String::new(),
            admin: String::new(),
        }
    }

    /// Starts `serve` and waits (up to 30 s) for its "listening" line, which names both
    /// listeners.
    pub fn start(config: impl AsRef<OsStr>, envs: &[(&str, &str)]) -> Self {
        let mut served = Self::spawn(config, envs);
        loop {
            let line = served
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no 'listening' line; log: {:?}", served.startup));
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(value) if value["message"] == "listening" => {
                    served.addr = value["addr"].as_str().unwrap().to_owned();
                    served.admin = value["admin"].as_str().unwrap().to_owned();
                    return served;
                }
                _ => served.startup.push(line),
            }
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and have not waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill failed");
    }

    /// Sends SIGTERM; see [`wait`](Self::wait) and [`exit_within`](Self::exit_within).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits (up to 10 s) for a log line whose message is `message`.
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        self.wait_for_line(message, |value| value["message"] == message)
    }

    /// Waits (up to 10 s) for a JSON log line that `wanted` picks; `what` names it on failure.
    pub fn wait_for_line(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no '{what}' log line within 10 s"));
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if wanted(&value) {
                    return value;
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in kB.
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Waits for the process to exit, however long it takes; returns its status and the lines
    /// it logged since they were last read.
    pub fn wait(self) -> (ExitStatus, String) {
        self.exit_within(Duration::MAX)
    }

    /// Waits up to `limit` for the process to exit; returns its status and the lines it logged
    /// meanwhile. Panics (and the drop kills it) if it does not exit in time.
    pub fn exit_within(mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now().checked_add(limit);
        let mut log = String::new();
        loop {
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    log.push_str(&line);
                    log.push('\n');
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if deadline.is_some() => {
                    panic!("the gateway did not exit within {limit:?}; log:\n{log}")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let status = self.child.wait().unwrap();
        (status, log)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
