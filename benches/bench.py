#!/usr/bin/env python3
"""Side-by-side benchmark of datafold-gateway against nginx and HAProxy doing the same job.

Normally started by benches/run.sh, which installs the tools, builds the gateway and makes the
throwaway certificates. Standard library only (Python 3.11).

Everything runs on loopback with ephemeral ports:

  upstream        nginx over TLS answering the two routes, 401 without the key, on two ports:
                  h2-capable (ALPN offers h2 and http/1.1) and HTTP/1.1-only (http/1.1 alone);
                  scenario 1 runs against each shape chosen with --upstream
  direct          wrk straight to the upstream: the floor
  nginx           nginx as the proxy
  haproxy         HAProxy as the proxy
  gateway         datafold-gateway, open callers, no rate limits
  gateway-baseline
                  only with --baseline-gateway: another build of the gateway (run.sh --baseline
                  REV builds one at a git revision), same config as gateway, run right after it
  gateway-lua     the same gateway, driven through wrk's per-request Lua hook (one fixed request):
                  what scenario 2's load script costs wrk, measured
  gateway-many    scenario 2: 1,000 token callers, 100,000 data source ids, limits on but high

Targets run in turn, round after round (scenario 1 once per upstream shape, scenario 2 against
the first shape chosen); each proxy is started fresh for each of its runs (so its peak RSS is that
of one run) and stopped afterwards. The upstream stays up for the whole run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

TEST_PATH = "/api/v1/data_sources/42/test"
RESULT_PATH = "/api/v1/data_sources/test/123"
CALLER_AUTH = "Bearer something"
MANY_CALLERS = 1000
MANY_IDS = 100_000
TOKEN_NAME = "bench-caller-{:04d}"
# Limits on, but far above anything loopback can reach: they must never refuse.
HIGH_RATE = "1000000/s"
HIGH_BURST = 1_000_000
# Above the 100,000 distinct data source ids, so the key cap never refuses either.
MANY_MAX_TRACKED_KEYS = 200_000

SCENARIO1 = ["direct", "nginx", "haproxy", "gateway"]
# With --baseline-gateway: another build of the gateway, in scenario 1 right after `gateway`.
BASELINE = "gateway-baseline"
SCENARIO2 = ["gateway-lua", "gateway-many"]
# Upstream shapes: what the upstream's ALPN offers. Scenario 1 runs against each chosen shape.
SHAPES = {
    "h2": "h2-capable upstream",
    "h1": "HTTP/1.1-only upstream",
}
# What a client offering both protocols by ALPN must get from each shape's listener.
SHAPE_ALPN = {"h2": "h2", "h1": "http/1.1"}
LABELS = {
    "direct": "direct to upstream (floor)",
    "nginx": "nginx proxy",
    "haproxy": "HAProxy",
    "gateway": "datafold-gateway",
    BASELINE: "datafold-gateway, baseline build",  # main() adds the baseline's label
    "gateway-lua": "datafold-gateway, Lua-driven control",
    "gateway-many": "datafold-gateway, 1,000 callers × 100,000 ids",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
# --profile: perf's sampling rate, how many symbols the report lists, how long strace counts.
PERF_HZ = 999
PROFILE_TOP_SYMBOLS = 15
STRACE_SECONDS = 3


class BenchError(Exception):
    pass


# --- processes ------------------------------------------------------------------------------

_running: list["Proc"] = []


class Proc:
    """A server we started, in its own session so that Ctrl-C reaches only bench.py, which then
    stops it (and, through its process group, any workers it forked)."""

    def __init__(self, name: str, argv: list[str], log: Path, stdout: Path | None = None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        self.stdout_path = stdout
        err = open(log, "ab")
        out = open(stdout, "ab") if stdout else err
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                start_new_session=True,
            )
        finally:
            err.close()
            if stdout:
                out.close()
        self.pid = self.popen.pid
        _running.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def interrupt(self, timeout: float = 60.0) -> None:
        """SIGINT, then stop: perf and strace write what they gathered when interrupted."""
        if self.popen.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.stop()

    def stop(self) -> None:
        if self in _running:
            _running.remove(self)
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Workers of a master that is gone (should not happen): same process group, our session.
        self._signal(signal.SIGKILL, quiet=True)

    def _signal(self, sig: int, quiet: bool = False) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            if not quiet:
                raise


def stop_all() -> None:
    for proc in list(reversed(_running)):
        try:
            proc.stop()
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop {proc.name} ({proc.pid}): {exc}", file=sys.stderr)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- /proc ----------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and its descendants (nginx master and workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return out


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- small helpers --------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def fill(template: str, values: dict[str, str]) -> str:
    text = (HERE / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = sorted(set(re.findall(r"@[A-Z0-9_]+@", text)))
    if left:
        raise BenchError(f"{template}: no value for {', '.join(left)}")
    return text


def find_tool(name: str) -> str:
    path = shutil.which(name)
    for candidate in (path, f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError(f"{name} not found (benches/run.sh installs it)")


def optional_tool(name: str) -> str | None:
    try:
        return find_tool(name)
    except BenchError:
        return None


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (done.stdout + done.stderr).strip()


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class Answer:
    status: int | str  # an HTTP status, or the ALPN protocol for the ALPN check
    body: str


def alpn_chosen(port: int, cafile: Path) -> str:
    """The protocol the listener picks when a client offers h2 and http/1.1 by ALPN."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.selected_alpn_protocol() or "none"


def check_key(target: str, shape: str) -> str:
    """How checks and summaries name a target run against one upstream shape."""
    return f"{target} @ {shape}"


def request(port: int, method: str, path: str, auth: str | None, tls: ssl.SSLContext | None = None,
            timeout: float = 5.0) -> Answer:
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    body = "{}" if method == "POST" else None
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read().decode(errors="replace"))
    finally:
        conn.close()


def wait_until(what: str, probe, proc: Proc | None, timeout: float = 30.0) -> None:
    """Polls probe() until it returns True; fails early if proc exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{what}: process exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            if probe():
                return
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.05)
    raise BenchError(f"{what}: not ready after {timeout:.0f}s (last error: {last})"
                     + (f"\n{proc.tail()}" if proc else ""))


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


# --- the bench ------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    script: str
    url: str
    env: dict[str, str]
    log: Path | None = None  # the proxy's per-request log (audit) file
    proc: Proc | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    gateway_bin: str
    nginx: str
    haproxy: str
    wrk: str
    key: str = field(default_factory=lambda: "bench-key-" + secrets.token_hex(16))
    checks: dict[str, list[dict]] = field(default_factory=dict)
    upstream: Proc | None = None

    def __post_init__(self):
        # Ports per upstream shape: the upstream's listener and each scenario 1 proxy's.
        self.up_port, self.nginx_port, self.haproxy_port, self.gw_port, self.gw_admin = (
            {}, {}, {}, {}, {})
        # With --baseline-gateway, its own listener and admin port per shape too.
        self.baseline_bin: str | None = self.args.baseline_gateway
        self.base_port, self.base_admin = {}, {}
        ports = free_ports((7 if self.baseline_bin else 5) * len(SHAPES) + 2)
        for shape in SHAPES:
            (self.up_port[shape], self.nginx_port[shape], self.haproxy_port[shape],
             self.gw_port[shape], self.gw_admin[shape]) = (ports.pop() for _ in range(5))
            if self.baseline_bin:
                self.base_port[shape], self.base_admin[shape] = ports.pop(), ports.pop()
        self.many_port, self.many_admin = ports.pop(), ports.pop()
        # Scenario 2 runs against the first chosen shape (h2 unless only h1 is chosen).
        self.shapes: list[str] = self.args.shapes
        self.many_shape = self.shapes[0]
        self.key_file = self.work / "datafold-api-key"
        self.key_file.write_text(self.key + "\n")
        self.ca = self.work / "ca.pem"
        self.tls = ssl.create_default_context(cafile=str(self.ca))
        self.nginx_version = nginx_version_tuple(self.nginx)

    # -- configs --

    def common(self, shape: str) -> dict[str, str]:
        """Values for the templates, with UPSTREAM_PORT the listener of the given shape."""
        return {
            "DIR": self.work,
            "UPSTREAM_PORT": self.up_port[shape],
            "UPSTREAM_H1_PORT": self.up_port["h1"],
            "API_KEY": self.key,
            "CA_CERT": self.ca,
            "SERVER_CERT": self.work / "server.pem",
            "SERVER_KEY": self.work / "server.key",
            "WORKERS": self.args.workers,
            "THREADS": self.args.workers,
        }

    def write_configs(self) -> None:
        v = self.common("h2")
        # nginx 1.25.1 replaced `listen ... http2` with the `http2 on;` directive.
        new_h2 = self.nginx_version >= (1, 25, 1)
        v["HTTP2_LISTEN"] = "" if new_h2 else "http2"
        v["HTTP2_DIRECTIVE"] = "http2 on;" if new_h2 else ""
        v["HTTP2_OFF_DIRECTIVE"] = "http2 off;" if new_h2 else ""
        for name in ("nginx-upstream", *(f"nginx-proxy-{s}" for s in SHAPES)):
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.work / f"{name}.tmp" / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "nginx-upstream.conf").write_text(fill("nginx-upstream.conf.in", v))
        (self.work / "nginx-upstream-server.conf").write_text(
            fill("nginx-upstream-server.conf.in", v))

        open_callers = '[callers]\nmode = "open"'
        no_limits = "# No [rate_limit] sections: no limits."
        # One nginx proxy, HAProxy and gateway config per upstream shape, each on its own port.
        for shape in SHAPES:
            s = self.common(shape)
            (self.work / f"nginx-proxy-{shape}.conf").write_text(fill("nginx-proxy.conf.in", s | {
                "LISTEN_PORT": self.nginx_port[shape], "NAME": f"nginx-proxy-{shape}"}))
            (self.work / f"haproxy-{shape}.cfg").write_text(
                fill("haproxy.cfg.in", s | {"LISTEN_PORT": self.haproxy_port[shape]}))
            (self.work / f"gateway-{shape}.toml").write_text(fill("gateway.toml.in", s | {
                "LISTEN_PORT": self.gw_port[shape], "ADMIN_PORT": self.gw_admin[shape],
                "KEY_FILE": self.key_file, "AUDIT_FILE": self.work / f"gateway-{shape}.audit.jsonl",
                "CALLERS": open_callers, "RATE_LIMITS": no_limits,
            }))
            if self.baseline_bin:
                # The gateway's config but for its ports and audit file.
                (self.work / f"{BASELINE}-{shape}.toml").write_text(fill("gateway.toml.in", s | {
                    "LISTEN_PORT": self.base_port[shape], "ADMIN_PORT": self.base_admin[shape],
                    "KEY_FILE": self.key_file,
                    "AUDIT_FILE": self.work / f"{BASELINE}-{shape}.audit.jsonl",
                    "CALLERS": open_callers, "RATE_LIMITS": no_limits,
                }))
        v = self.common(self.many_shape)
        entries = ['[callers]\nmode = "token"']
        for i in range(MANY_CALLERS):
            token = TOKEN_NAME.format(i)
            digest = hashlib.sha256(token.encode()).hexdigest()
            entries.append(f'[[callers.token]]\nname = "{token}"\nsha256 = "{digest}"')
        limits = (
            f"[rate_limit]\nmax_tracked_keys = {MANY_MAX_TRACKED_KEYS}\n\n"
            f'[rate_limit.per_caller]\nrate = "{HIGH_RATE}"\nburst = {HIGH_BURST}\n\n'
            f'[rate_limit.per_data_source]\nrate = "{HIGH_RATE}"\nburst = {HIGH_BURST}'
        )
        (self.work / "gateway-many.toml").write_text(fill("gateway.toml.in", v | {
            "LISTEN_PORT": self.many_port, "ADMIN_PORT": self.many_admin,
            "KEY_FILE": self.key_file, "AUDIT_FILE": self.work / "gateway-many.audit.jsonl",
            "CALLERS": "\n\n".join(entries), "RATE_LIMITS": limits,
        }))

    def validate_configs(self) -> None:
        run = lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=60)
        nginx_t = lambda conf: [self.nginx, "-t", "-p", str(self.work), "-e",
                                str(self.work / "nginx-check.log"), "-c", str(self.work / conf)]
        gw_check = lambda conf, binary=self.gateway_bin: [binary, "check-config", "--config",
                                                          str(self.work / conf)]
        # (generated file, template it was filled from, validating command)
        checks = [("nginx-upstream.conf", "nginx-upstream.conf.in and nginx-upstream-server.conf.in",
                   nginx_t("nginx-upstream.conf"))]
        for shape in SHAPES:
            checks += [
                (f"nginx-proxy-{shape}.conf", "nginx-proxy.conf.in",
                 nginx_t(f"nginx-proxy-{shape}.conf")),
                (f"haproxy-{shape}.cfg", "haproxy.cfg.in",
                 [self.haproxy, "-c", "-q", "-f", str(self.work / f"haproxy-{shape}.cfg")]),
                (f"gateway-{shape}.toml", "gateway.toml.in", gw_check(f"gateway-{shape}.toml")),
            ]
            if self.baseline_bin:
                checks.append((f"{BASELINE}-{shape}.toml", "gateway.toml.in (checked by the "
                               "baseline build)", gw_check(f"{BASELINE}-{shape}.toml",
                                                           self.baseline_bin)))
        checks.append(("gateway-many.toml", "gateway.toml.in", gw_check("gateway-many.toml")))
        for name, template, argv in checks:
            done = run(argv)
            if done.returncode != 0:
                raise BenchError(f"{self.work / name} (filled from benches/{template}) does not "
                                 f"validate:\n{done.stdout}{done.stderr}")

    # -- servers --

    def nginx_argv(self, conf: str, errlog: str) -> list[str]:
        return [self.nginx, "-p", str(self.work), "-e", str(self.work / errlog),
                "-c", str(self.work / conf), "-g", "daemon off;"]

    def start_upstream(self) -> None:
        self.upstream = Proc("nginx-upstream",
                             self.nginx_argv("nginx-upstream.conf", "nginx-upstream.error.log"),
                             self.work / "nginx-upstream.stderr.log")
        for shape in self.shapes:
            up = self.up_port[shape]
            wait_until(f"upstream ({SHAPES[shape]}, port {up})",
                       lambda: request(up, "POST", TEST_PATH, f"Key {self.key}", self.tls).status == 200,
                       self.upstream)
            self.record_checks(check_key("direct", shape), [
                ("ALPN offering h2 and http/1.1 → chosen", SHAPE_ALPN[shape],
                 lambda: Answer(alpn_chosen(up, self.ca), "")),
                ("POST test, right key", 200, lambda: request(up, "POST", TEST_PATH, f"Key {self.key}", self.tls)),
                ("GET result, right key", 200, lambda: request(up, "GET", RESULT_PATH, f"Key {self.key}", self.tls)),
                ("POST test, no Authorization", 401, lambda: request(up, "POST", TEST_PATH, None, self.tls)),
                ("POST test, caller's Bearer", 401, lambda: request(up, "POST", TEST_PATH, CALLER_AUTH, self.tls)),
                ("POST test, wrong key", 401, lambda: request(up, "POST", TEST_PATH, "Key wrong", self.tls)),
            ])

    def record_checks(self, target: str, cases) -> None:
        results = []
        for what, want, call in cases:
            answer = call()
            ok = answer.status == want
            # A started test must come back with the upstream's own answer.
            if ok and want == 200 and what.startswith("POST"):
                ok = answer.body.replace(" ", "") == '{"job_id":123}'
            results.append({"check": what, "want": want, "got": answer.status, "ok": ok})
        self.checks.setdefault(target, [])
        # Keep one set per target (the first start), but any failure later is kept too.
        if not self.checks[target] or not all(r["ok"] for r in results):
            self.checks[target].extend(results)
        bad = [r for r in results if not r["ok"]]
        if bad:
            raise BenchError(f"{target}: checks failed: {bad}")

    def proxy_checks(self, target: str, shape: str, port: int, token: str = CALLER_AUTH) -> None:
        cases = [
            ("POST test with caller's Bearer: key injected", 200,
             lambda: request(port, "POST", TEST_PATH, token)),
            ("GET result", 200, lambda: request(port, "GET", RESULT_PATH, token)),
            ("GET /api/v1/data_sources (not allowed)", 404,
             lambda: request(port, "GET", "/api/v1/data_sources", token)),
            ("POST /api/v1/data_sources/42 (not allowed)", 404,
             lambda: request(port, "POST", "/api/v1/data_sources/42", token)),
        ]
        if target == "gateway-many":
            # Token callers may read only their own jobs; unknown tokens are refused.
            cases[1] = ("GET result of own job", 200, lambda: request(port, "GET", RESULT_PATH, token))
            cases.append(("POST test with an unknown token", 401,
                          lambda: request(port, "POST", TEST_PATH, "Bearer not-a-caller")))
        self.record_checks(check_key(target, shape), cases)

    def start_target(self, name: str, shape: str) -> Target:
        w = self.work
        key = check_key(name, shape)
        if name == "direct":
            return Target(name, "wrk-post.lua", f"https://127.0.0.1:{self.up_port[shape]}{TEST_PATH}",
                          {"BENCH_AUTH": f"Key {self.key}"})
        if name == "nginx":
            port = self.nginx_port[shape]
            log = w / f"nginx-proxy-{shape}.audit.jsonl"
            proc = Proc(key, self.nginx_argv(f"nginx-proxy-{shape}.conf",
                                             f"nginx-proxy-{shape}.error.log"),
                        w / f"nginx-proxy-{shape}.stderr.log")
            wait_until(key, lambda: port_open(port), proc)
            self.proxy_checks(name, shape, port)
            return Target(name, "wrk-post.lua", f"http://127.0.0.1:{port}{TEST_PATH}",
                          {"BENCH_AUTH": CALLER_AUTH}, log, proc)
        if name == "haproxy":
            port = self.haproxy_port[shape]
            log = w / f"haproxy-{shape}.audit.jsonl"
            proc = Proc(key, [self.haproxy, "-db", "-f", str(w / f"haproxy-{shape}.cfg")],
                        w / f"haproxy-{shape}.stderr.log", stdout=log)
            wait_until(key, lambda: port_open(port), proc)
            self.proxy_checks(name, shape, port)
            return Target(name, "wrk-post.lua", f"http://127.0.0.1:{port}{TEST_PATH}",
                          {"BENCH_AUTH": CALLER_AUTH}, log, proc)
        if name in ("gateway", BASELINE, "gateway-lua", "gateway-many"):
            many = name == "gateway-many"
            base = name == BASELINE
            if many and shape != self.many_shape:
                raise BenchError(f"gateway-many is configured for the {self.many_shape} upstream")
            if base and not self.baseline_bin:
                raise BenchError(f"{BASELINE} needs --baseline-gateway")
            conf = w / ("gateway-many.toml" if many else f"{name}-{shape}.toml" if base
                        else f"gateway-{shape}.toml")
            port, admin = ((self.many_port, self.many_admin) if many
                           else (self.base_port[shape], self.base_admin[shape]) if base
                           else (self.gw_port[shape], self.gw_admin[shape]))
            log = w / ("gateway-many.audit.jsonl" if many else f"{name}-{shape}.audit.jsonl" if base
                       else f"gateway-{shape}.audit.jsonl")
            env = os.environ.copy()
            env.pop("RUST_LOG", None)
            env.pop("DATAFOLD_API_KEY", None)
            binary = self.baseline_bin if base else self.gateway_bin
            proc = Proc(key, [binary, "serve", "--config", str(conf)],
                        w / f"{name}-{shape}.stderr.log", env=env)
            wait_until(key, lambda: request(admin, "GET", "/readyz", None).status == 200, proc)
            self.proxy_checks(name, shape, port,
                              f"Bearer {TOKEN_NAME.format(7)}" if many else CALLER_AUTH)
            url = f"http://127.0.0.1:{port}{TEST_PATH}"
            if name in ("gateway", BASELINE):
                return Target(name, "wrk-post.lua", url, {"BENCH_AUTH": CALLER_AUTH}, log, proc)
            counts = ({"BENCH_CALLERS": str(MANY_CALLERS), "BENCH_IDS": str(MANY_IDS)} if many
                      else {"BENCH_CALLERS": "1", "BENCH_IDS": "1"})
            return Target(name, "wrk-many-callers.lua", url, counts, log, proc)
        raise BenchError(f"unknown target {name}")

    # -- wrk --

    def wrk_run(self, target: Target, seconds: float) -> tuple[dict, str]:
        argv = [self.wrk, "-t", str(self.args.threads), "-c", str(self.args.connections),
                "-d", f"{int(seconds)}s", "--timeout", "5s", "--latency",
                "-s", str(HERE / target.script), target.url]
        env = os.environ.copy() | target.env
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        try:
            out, _ = proc.communicate(timeout=seconds + 60)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise BenchError(f"wrk failed for {target.name} ({proc.returncode}):\n{out}")
        match = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
        if not match:
            raise BenchError(f"no result line from wrk for {target.name}:\n{out}")
        return json.loads(match.group(1)), out

    def measure(self, name: str, shape: str, round_no: int) -> dict:
        target = self.start_target(name, shape)
        try:
            if self.args.warmup > 0:
                self.wrk_run(target, self.args.warmup)
            pids = process_tree(target.proc.pid) if target.proc else []
            up_pids = process_tree(self.upstream.pid)
            lines_before = count_lines(target.log) if target.log else 0
            up_offset = file_size(self.work / "nginx-upstream.access.log")
            cpu_before = cpu_seconds(pids)
            up_cpu_before = cpu_seconds(up_pids)
            wrk_cpu_before = children_cpu_seconds()

            result, raw = self.wrk_run(target, self.args.seconds)

            cpu = cpu_seconds(pids) - cpu_before
            up_cpu = cpu_seconds(up_pids) - up_cpu_before
            wrk_cpu = children_cpu_seconds() - wrk_cpu_before
            rss = {str(p): vm_hwm_kib(p) for p in process_tree(target.proc.pid)} if target.proc else {}
        finally:
            if target.proc:
                target.proc.stop()
        # The log is complete once the process has stopped (the gateway syncs it on shutdown).
        logged = count_lines(target.log) - lines_before if target.log else None
        upstream = upstream_view(self.work / "nginx-upstream.access.log", up_offset)
        secs = result["duration_us"] / 1e6
        run = {
            "target": name,
            "upstream": shape,
            "upstream_port": self.up_port[shape],
            "round": round_no,
            "rps": result["requests"] / secs,
            **result,
            "socket_errors": sum(result[k] for k in
                                 ("connect_errors", "read_errors", "write_errors", "timeouts")),
            "peak_rss_kib": sum(rss.values()),
            "rss_by_pid_kib": rss,
            "proxy_cpu_s": cpu if target.proc else None,
            "upstream_cpu_s": up_cpu,
            "wrk_cpu_s": wrk_cpu,
            "log_lines": logged,
            "upstream_sampled": upstream,
            "wrk_output": raw,
        }
        if target.log:
            # Every request wrk counted must have its line (a few more: answers in flight when
            # wrk stopped), and the lines must be JSON.
            run["log_json_ok"] = last_line_is_json(target.log)
            # A lower bound: lines of answers wrk did not count can make up for lost ones.
            run["log_missing"] = max(0, result["requests"] - logged)
            target.log.unlink(missing_ok=True)
        return run

    # -- profile (--profile, after the measured rounds) --

    def profile_all(self, perf: str, strace: str | None) -> dict:
        """The gateway profiled against each upstream shape. A shape whose profile fails is
        noted and left out; an interrupt ends the profile, not the benchmark."""
        out: dict = {}
        for shape in self.shapes:
            print(f"    profile gateway @ {shape}: perf {self.args.profile_seconds:.0f} s"
                  + (f", strace {STRACE_SECONDS} s" if strace else ""), file=sys.stderr)
            try:
                out[shape] = self.profile(shape, perf, strace)
            except KeyboardInterrupt:
                print("note: profile interrupted; the report leaves it out", file=sys.stderr)
                return {"skipped": "interrupted"}
            except (BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
                print(f"note: profile of the gateway @ {shape} failed, left out: {exc}",
                      file=sys.stderr)
                out[shape] = {"skipped": str(exc)}
        return out

    def profile(self, shape: str, perf: str, strace: str | None) -> dict:
        """A fresh gateway, one warm-up, then wrk while perf samples the gateway's threads;
        then, on the same gateway, syscalls counted by strace during a short run."""
        target = self.start_target("gateway", shape)
        data = self.work / f"perf-gateway-{shape}.data"
        try:
            if self.args.warmup > 0:
                self.wrk_run(target, self.args.warmup)
            pids = process_tree(target.proc.pid)
            recorder = Proc(f"perf record ({shape})",
                            [perf, "record", "-q", "-N", "-F", str(PERF_HZ), "-g",
                             "-p", str(target.proc.pid), "-o", str(data)],
                            self.work / f"perf-gateway-{shape}.log")
            try:
                # perf writes the file's header once its counters are open.
                wait_until("perf record", lambda: file_size(data) > 0, recorder, timeout=30)
                cpu_before = cpu_seconds(pids)
                result, _ = self.wrk_run(target, self.args.profile_seconds)
                cpu = cpu_seconds(pids) - cpu_before
            finally:
                recorder.interrupt()
            syscalls = (self.count_syscalls(target, strace, shape) if strace
                        else {"skipped": "strace not installed"})
        finally:
            target.proc.stop()
            target.log.unlink(missing_ok=True)
        rows, samples = perf_report_rows(perf, data)
        cpu_us = cpu / result["requests"] * 1e6 if result["requests"] else 0.0
        at = lambda pct: round(pct / 100 * cpu_us, 2)
        top = sorted(rows, key=lambda r: -r[0])[:PROFILE_TOP_SYMBOLS]
        return {
            "seconds": self.args.profile_seconds,
            "requests": result["requests"],
            "rps": result["requests"] / (result["duration_us"] / 1e6),
            "non2xx": result["non2xx"],
            "socket_errors": sum(result[k] for k in
                                 ("connect_errors", "read_errors", "write_errors", "timeouts")),
            "gateway_cpu_s": cpu,
            "cpu_us_per_req": cpu_us,
            "perf_samples": samples,
            "by_crate": [{"group": g, "percent": round(pct, 2), "cpu_us_per_req": at(pct)}
                         for g, pct in crate_shares(rows)],
            "top_symbols": [{"symbol": sym, "dso": dso, "group": symbol_group(dso, kind, sym),
                             "percent": pct, "cpu_us_per_req": at(pct)}
                            for pct, dso, kind, sym in top],
            "syscalls": syscalls,
        }

    def count_syscalls(self, target: Target, strace: str, shape: str) -> dict:
        """Syscalls per request: `strace -c -f` on the gateway while wrk runs; requests from the
        audit file, whose line is written before each answer is released. Optional: a failure
        is noted in the result."""
        out = self.work / f"strace-gateway-{shape}.txt"
        pid = target.proc.pid
        lines_before = count_lines(target.log)
        tracer = Proc(f"strace ({shape})", [strace, "-c", "-f", "-p", str(pid), "-o", str(out)],
                      self.work / f"strace-gateway-{shape}.log")
        try:
            wait_until("strace", lambda: traced(pid), tracer, timeout=30)
            self.wrk_run(target, STRACE_SECONDS)
        except BenchError as exc:
            return {"skipped": f"strace: {exc}"}
        finally:
            tracer.interrupt()
        requests = count_lines(target.log) - lines_before
        try:
            calls = parse_strace_summary(out.read_text())
        except OSError as exc:
            return {"skipped": f"strace wrote no summary ({exc})"}
        if not requests or not calls:
            return {"skipped": f"strace counted {len(calls)} syscalls over {requests} requests"}
        return {
            "seconds": STRACE_SECONDS,
            "requests": requests,
            "per_request": sum(c["calls"] for c in calls.values()) / requests,
            "calls": {name: c | {"per_request": c["calls"] / requests}
                      for name, c in sorted(calls.items(), key=lambda kv: -kv[1]["calls"])},
        }


def last_line_is_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, file_size(path) - 4096))
            lines = f.read().splitlines()
        return bool(lines) and isinstance(json.loads(lines[-1]), dict)
    except (OSError, ValueError):
        return False


def upstream_view(path: Path, offset: int) -> dict:
    """What the upstream's sampled log says about one run: requests per protocol, and which
    connections and workers served them (lower bounds: one request in 16 is logged)."""
    protocols: dict[str, int] = {}
    ports: dict[str, int] = {}
    conns, workers = set(), set()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                parts = line.decode(errors="replace").split()
                if len(parts) >= 4:
                    protocols[parts[1]] = protocols.get(parts[1], 0) + 1
                    workers.add(parts[2])
                    conns.add((parts[2], parts[3]))
                if len(parts) >= 7:
                    ports[parts[6]] = ports.get(parts[6], 0) + 1
    except FileNotFoundError:
        pass
    return {"protocols": protocols, "ports": ports, "connections": len(conns),
            "workers": len(workers)}


# --- profile: perf and strace output ---------------------------------------------------------

PERF_ROW = re.compile(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)")
RUST_CRATE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)::")


def perf_unavailable(perf: str | None, work: Path) -> str | None:
    """Why perf cannot profile the gateway here, or None when it can (a one-second probe)."""
    if not perf:
        return "perf is not installed (linux-perf / linux-tools)"
    probe = work / "perf-probe.data"
    try:
        done = subprocess.run([perf, "record", "-q", "-N", "-F", str(PERF_HZ), "-g",
                               "-o", str(probe), "--", "sleep", "0.1"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"perf does not run ({exc})"
    finally:
        probe.unlink(missing_ok=True)
    if done.returncode == 0:
        return None
    try:
        paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    except OSError:
        paranoid = "unknown"
    said = next((l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()), "")
    return f"perf record is not permitted here (perf_event_paranoid={paranoid}): {said}"


def perf_report_rows(perf: str, data: Path) -> tuple[list[tuple[float, str, str, str]], str]:
    """(percent of samples, shared object, [k]ernel or [.] user, symbol) per symbol, and
    perf's sample count line."""
    done = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children",
                           "--sort", "dso,sym", "-g", "none", "--percent-limit", "0"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"perf report failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    rows, samples = [], ""
    for line in done.stdout.splitlines():
        if line.startswith("# Samples:"):
            samples = line[len("# Samples:"):].strip()
        elif m := PERF_ROW.match(line):
            rows.append((float(m[1]), m[2], m[3], m[4].strip()))
    if not rows:
        raise BenchError(f"perf report shows no samples in {data}")
    return rows, samples


def symbol_group(dso: str, kind: str, sym: str) -> str:
    """Where a symbol's CPU goes: kernel, libc, mimalloc, ring's assembly, or the Rust crate
    (first path segment of the demangled symbol, `<`, `&mut ` and `&` stripped)."""
    if kind == "k":
        return "kernel"
    if dso.startswith("libc"):
        return "libc"
    if dso == "[vdso]":
        return "vdso"
    if sym.startswith(("_mi_", "mi_")):
        return "mimalloc"
    if m := RUST_CRATE.match(re.sub(r"^(?:<|&mut |&)+", "", sym)):
        return m[1]
    low = sym.lower()
    if sym.startswith("ring_core_") or "aes" in low or "gcm" in low:
        return "ring"
    return f"other ({dso})"


def crate_shares(rows: list[tuple[float, str, str, str]]) -> list[tuple[str, float]]:
    shares: dict[str, float] = {}
    for pct, dso, kind, sym in rows:
        group = symbol_group(dso, kind, sym)
        shares[group] = shares.get(group, 0.0) + pct
    return sorted(shares.items(), key=lambda kv: -kv[1])


def traced(pid: int) -> bool:
    """Every thread of pid has a tracer (strace has attached to all of them)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    for task in tasks:
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith("TracerPid:") and line.split()[1] == "0":
                return False
    return bool(tasks)


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """strace -c's table: calls and errors per syscall (the total line left out)."""
    calls = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) in (5, 6) and parts[-1] != "total" and all(
                re.fullmatch(r"[\d.]+", x) for x in parts[:-1]):
            calls[parts[-1]] = {"calls": int(parts[3]),
                                "errors": int(parts[4]) if len(parts) == 6 else 0}
    return calls


def nginx_version_tuple(nginx: str) -> tuple[int, ...]:
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", command_output([nginx, "-v"]))
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


# --- report ---------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    rps = [r["rps"] for r in runs]
    per_req = lambda key: [r[key] / r["requests"] * 1e6 for r in runs
                           if r.get(key) is not None and r["requests"]]
    protocols: dict[str, int] = {}
    ports: dict[str, int] = {}
    for r in runs:
        for k, v in r["upstream_sampled"]["protocols"].items():
            protocols[k] = protocols.get(k, 0) + v
        for k, v in r["upstream_sampled"].get("ports", {}).items():
            ports[k] = ports.get(k, 0) + v
    cpu = per_req("proxy_cpu_s")
    shape = runs[0]["upstream"]
    want_port = str(runs[0]["upstream_port"])
    # Every sampled request reached the listener of this shape, and against the HTTP/1.1-only
    # upstream nothing but HTTP/1.1 was spoken.
    upstream_ok = (bool(protocols) and set(ports) == {want_port}
                   and (shape != "h1" or set(protocols) == {"HTTP/1.1"}))
    return {
        "upstream": shape,
        "upstream_label": SHAPES[shape],
        "rounds": len(runs),
        "proxy_cpu_us_per_req": statistics.median(cpu) if cpu else None,
        "proxy_cpu_us_per_req_min": min(cpu) if cpu else None,
        "proxy_cpu_us_per_req_max": max(cpu) if cpu else None,
        "rps_median": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50_us": statistics.median(r["p50_us"] for r in runs),
        "p99_us": statistics.median(r["p99_us"] for r in runs),
        "p99_us_worst": max(r["p99_us"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "non2xx": sum(r["non2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "peak_rss_kib": max(r["peak_rss_kib"] for r in runs),
        "upstream_cpu_us_per_req": statistics.median(per_req("upstream_cpu_s")),
        "wrk_cpu_us_per_req": statistics.median(per_req("wrk_cpu_s")),
        "log_json_ok": all(r.get("log_json_ok", True) for r in runs),
        "log_missing": (sum(r["log_missing"] for r in runs)
                        if all("log_missing" in r for r in runs) else None),
        "upstream_protocols_sampled": protocols,
        "upstream_ports_sampled": ports,
        "upstream_ok": upstream_ok,
        "upstream_connections_max": max(r["upstream_sampled"]["connections"] for r in runs),
        "upstream_workers_max": max(r["upstream_sampled"]["workers"] for r in runs),
    }


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def fmt_mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB" if kib else "–"


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def fmt_us(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} µs"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def run_cpu_us(r: dict) -> float | None:
    if r.get("proxy_cpu_s") is None or not r["requests"]:
        return None
    return r["proxy_cpu_s"] / r["requests"] * 1e6


def per_round_ratios(runs: list[dict], shape: str, num: str, den: str) -> list[float]:
    """Throughput num/den round by round, within one upstream shape."""
    by = {}
    for r in runs:
        if r["upstream"] == shape:
            by.setdefault(r["round"], {})[r["target"]] = r["rps"]
    return [round(v[num] / v[den], 2) for _, v in sorted(by.items()) if num in v and den in v]


def per_round_cpu_ratios(runs: list[dict], shape: str, num: str, den: str) -> list[float]:
    """CPU/req num/den round by round, within one upstream shape."""
    by = {}
    for r in runs:
        if r["upstream"] == shape and r["target"] in (num, den):
            by.setdefault(r["round"], {})[r["target"]] = run_cpu_us(r)
    return [round(v[num] / v[den], 2) for _, v in sorted(by.items())
            if v.get(num) is not None and v.get(den)]


def per_round_cpu_vs_lower(runs: list[dict], shape: str) -> list[float]:
    """The gateway's CPU/req ÷ the lower of nginx's and HAProxy's, round by round."""
    by = {}
    for r in runs:
        if r["upstream"] == shape and r["target"] in ("gateway", "nginx", "haproxy"):
            by.setdefault(r["round"], {})[r["target"]] = run_cpu_us(r)
    out = []
    for _, v in sorted(by.items()):
        peers = [v[k] for k in ("nginx", "haproxy") if v.get(k)]
        if v.get("gateway") is not None and peers:
            out.append(round(v["gateway"] / min(peers), 2))
    return out


def lower_peer(shape_summary: dict[str, dict]) -> tuple[str, float] | None:
    """The peer (nginx or HAProxy) with the lower CPU/req, and that figure."""
    peers = [(LABELS[k].split()[0], s["proxy_cpu_us_per_req"]) for k in ("nginx", "haproxy")
             if (s := shape_summary.get(k)) and s["proxy_cpu_us_per_req"] is not None]
    return min(peers, key=lambda p: p[1]) if peers else None


def ratios(shape_summary: dict[str, dict], runs: list[dict], shape: str) -> dict:
    """The gateway against its peers within one upstream shape (for latest.json)."""
    gw, ng, hp = (shape_summary.get(k) for k in ("gateway", "nginx", "haproxy"))
    if not gw:
        return {}
    out: dict = {}
    low = lower_peer(shape_summary)
    cpu = gw["proxy_cpu_us_per_req"]
    if low and cpu is not None:
        out["cpu_per_req_vs_lower_peer"] = round(cpu / low[1], 3)
        out["lower_cpu_peer"] = low[0]
        out["cpu_per_req_vs_lower_peer_per_round"] = per_round_cpu_vs_lower(runs, shape)
    for key, peer in (("nginx", ng), ("haproxy", hp)):
        if peer:
            if cpu is not None and peer["proxy_cpu_us_per_req"]:
                out[f"cpu_per_req_vs_{key}"] = round(cpu / peer["proxy_cpu_us_per_req"], 3)
            out[f"rps_vs_{key}"] = round(gw["rps_median"] / peer["rps_median"], 3)
            out[f"rps_vs_{key}_per_round"] = per_round_ratios(runs, shape, "gateway", key)
            out[f"p99_vs_{key}"] = round(gw["p99_us"] / peer["p99_us"], 3) if peer["p99_us"] else None
    base = shape_summary.get(BASELINE)
    if base:
        # Only with --baseline-gateway: the gateway against another build of itself.
        base_cpu = base["proxy_cpu_us_per_req"]
        out["cpu_per_req_vs_baseline"] = round(cpu / base_cpu, 3) if cpu is not None and base_cpu else None
        out["cpu_per_req_vs_baseline_per_round"] = per_round_cpu_ratios(runs, shape, "gateway", BASELINE)
        out["rps_vs_baseline"] = round(gw["rps_median"] / base["rps_median"], 3)
        out["rps_vs_baseline_per_round"] = per_round_ratios(runs, shape, "gateway", BASELINE)
        out["p99_vs_baseline"] = round(gw["p99_us"] / base["p99_us"], 3) if base["p99_us"] else None
    return out


TABLE_HEAD = [
    "| target | proxy CPU/req (median) | req/s (median) | req/s (min–max) | p99 | p50 | non-2xx "
    "| socket errors | peak RSS | log lines missing | to upstream |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]


def report(meta: dict, summary: dict[str, dict[str, dict]], runs: list[dict], checks: dict,
           profile: dict | None = None) -> str:
    out = []
    add = out.append
    add("# datafold-gateway side-by-side benchmark")
    add("")
    add(f"- date: {meta['date']}")
    add(f"- machine: {meta['nproc']} cores (nproc), {meta['cpu']}, {meta['mem']}, kernel {meta['kernel']}")
    add(f"- versions: {meta['versions']['nginx']}; {meta['versions']['haproxy']}; "
        f"{meta['versions']['wrk']}; datafold-gateway {meta['versions']['gateway']}"
        + (f"; baseline datafold-gateway {meta['baseline']['label']}" if "baseline" in meta else ""))
    add(f"- load: wrk -t{meta['threads']} -c{meta['connections']}, POST `{{}}` with "
        f"`Authorization: {CALLER_AUTH}`; {meta['rounds']} rounds × {meta['seconds']} s "
        f"(+{meta['warmup']} s warm-up per run); targets in turn each round: "
        + ", ".join(meta["order"]))
    add("- upstreams: nginx over TLS, one process, two listeners with the same certificate, answers "
        "and keep-alive settings: " + "; ".join(
            f"**{SHAPES[s]}** (ALPN offers {'h2, http/1.1' if s == 'h2' else 'http/1.1 only'})"
            for s in meta["upstreams"]))
    add(f"- proxies: nginx worker_processes {meta['workers']}, HAProxy nbthread {meta['workers']}, "
        "gateway: one single-threaded tokio runtime per core (`[runtime] workers`), each with its "
        "own SO_REUSEPORT listener and upstream pool; every proxy logs one JSON line per request "
        "to a file and verifies the upstream's certificate")
    add("- everything (wrk, upstream, proxy) shares the same cores: compare ratios within this run only")
    add("")

    # At a glance: the primary figure (CPU per request) and the ratios, per upstream shape.
    glance = [s for s in meta["upstreams"] if summary.get(s, {}).get("gateway")]
    if glance:
        add("## At a glance (scenario 1)")
        add("")
        add("| upstream | gateway CPU/req | nginx | HAProxy | gateway ÷ lower peer (CPU/req) "
            "| req/s gateway/nginx | req/s gateway/HAProxy | p99 gateway / nginx / HAProxy |")
        add("|---|---:|---:|---:|---:|---:|---:|---|")
        for shape in glance:
            ss = summary[shape]
            gw, ng, hp = (ss.get(k) for k in ("gateway", "nginx", "haproxy"))
            rt = ratios(ss, runs, shape)
            cpu_of = lambda s: fmt_us(s["proxy_cpu_us_per_req"]) if s else "–"
            p99_of = lambda s: fmt_ms(s["p99_us"]) if s else "–"
            r2 = lambda key: f"{rt[key]:.2f}" if rt.get(key) is not None else "–"
            add(f"| {SHAPES[shape]} | **{cpu_of(gw)}** | {cpu_of(ng)} | {cpu_of(hp)} | "
                f"**{r2('cpu_per_req_vs_lower_peer')}** | {r2('rps_vs_nginx')} | "
                f"{r2('rps_vs_haproxy')} | {p99_of(gw)} / {p99_of(ng)} / {p99_of(hp)} |")
        add("")
        add("CPU/req ratios below 1 mean the gateway spends less CPU per request than the cheaper "
            "of its peers; throughput ratios above 1 mean it serves more requests per second.")
        add("")
    if "baseline" in meta:
        out.extend(baseline_section(meta, summary, runs))

    for shape in meta["upstreams"]:
        ss = summary.get(shape, {})
        add(f"## Scenario 1: one caller, one data source — {SHAPES[shape]}")
        add("")
        out.extend(TABLE_HEAD)
        for name in scenario1_targets(BASELINE in ss):
            if name in ss:
                add(table_row(name, ss[name]))
        add("")
        gw, ng, hp, fl = (ss.get(k) for k in ("gateway", "nginx", "haproxy", "direct"))
        if gw:
            rt = ratios(ss, runs, shape)
            parts = []
            low = lower_peer(ss)
            if low and "cpu_per_req_vs_lower_peer" in rt:
                cpu_parts = [f"gateway ÷ lower of nginx's and HAProxy's ({low[0]}, "
                             f"{fmt_us(low[1])}) **{rt['cpu_per_req_vs_lower_peer']:.2f}** "
                             f"(per round: {rt['cpu_per_req_vs_lower_peer_per_round']})"]
                for key, label in (("nginx", "gateway/nginx"), ("haproxy", "gateway/HAProxy")):
                    if f"cpu_per_req_vs_{key}" in rt:
                        cpu_parts.append(f"{label} {rt[f'cpu_per_req_vs_{key}']:.2f}")
                add("CPU/req ratios (medians of this run): " + "; ".join(cpu_parts) + ".")
                add("")
            if ng:
                parts.append(f"gateway/nginx **{ratio(gw['rps_median'], ng['rps_median'])}** "
                             f"(per round: {rt['rps_vs_nginx_per_round']})")
            if hp:
                parts.append(f"gateway/HAProxy **{ratio(gw['rps_median'], hp['rps_median'])}** "
                             f"(per round: {rt['rps_vs_haproxy_per_round']})")
            if fl:
                parts.append(f"gateway/floor {ratio(gw['rps_median'], fl['rps_median'])}")
            add("Throughput ratios (medians of this run): " + "; ".join(parts) + ".")
            add("")

    many_shape = meta.get("scenario2_upstream")
    ss = summary.get(many_shape, {})
    if "gateway-many" in ss:
        add("## Scenario 2: 1,000 token callers × 100,000 data source ids, per-caller and "
            f"per-data-source limits on (never refusing) — {SHAPES[many_shape]}")
        add("")
        out.extend(TABLE_HEAD)
        for name in ["gateway", *SCENARIO2]:
            if name in ss:
                add(table_row(name, ss[name]))
        add("")
        many, gw = ss["gateway-many"], ss.get("gateway")
        lines = []
        if gw:
            r = many["rps_median"] / gw["rps_median"]
            verdict = "within 10%" if r >= 0.9 else "MORE than 10% slower"
            growth = many["peak_rss_kib"] - gw["peak_rss_kib"]
            lines.append(f"many callers / scenario 1 gateway: CPU/req "
                         f"{ratio(many['proxy_cpu_us_per_req'], gw['proxy_cpu_us_per_req'])}, "
                         f"throughput **{r:.2f}** ({verdict}; per round: "
                         f"{per_round_ratios(runs, many_shape, 'gateway-many', 'gateway')}), "
                         f"peak RSS {fmt_mib(many['peak_rss_kib'])} vs {fmt_mib(gw['peak_rss_kib'])} "
                         f"(**{growth / 1024:+.1f} MiB**, {growth / gw['peak_rss_kib'] * 100:+.0f}%)")
        ctl = ss.get("gateway-lua")
        if ctl:
            line = (f"many callers / Lua-driven control (same wrk cost per request; one caller, "
                    f"one id, open mode, no limits): CPU/req "
                    f"{ratio(many['proxy_cpu_us_per_req'], ctl['proxy_cpu_us_per_req'])}, "
                    f"throughput **{ratio(many['rps_median'], ctl['rps_median'])}** "
                    f"(per round: {per_round_ratios(runs, many_shape, 'gateway-many', 'gateway-lua')})")
            if gw:
                line += (f"; wrk CPU/req {ctl['wrk_cpu_us_per_req']:.1f} µs with the Lua hook vs "
                         f"{gw['wrk_cpu_us_per_req']:.1f} µs without")
            lines.append(line)
        for line in lines:
            add(f"- {line}")
        add("")

    if profile and "skipped" not in profile:
        out.extend(profile_section(profile, summary))

    add("## Checks")
    add("")
    add("Before each run every target answered these as expected against the upstream in use "
        "(a proxy that fails to inject the key gets 401 from the upstream; each upstream listener "
        "must pick the protocol of its shape by ALPN):")
    add("")
    add("| target @ upstream | check → result |")
    add("|---|---|")
    for target, results in checks.items():
        cells = [f"{r['check']} → {r['got']}" + ("" if r["ok"] else f" ✗ (want {r['want']})")
                 for r in results]
        add(f"| {target} | {'; '.join(cells)} |")
    add("")
    flat = [(shape, n, s) for shape, ss in summary.items() for n, s in ss.items()]
    problems = [f"{LABELS[n]} ({SHAPES[shape]}): {s['non2xx']} non-2xx, {s['socket_errors']} "
                "socket errors"
                + ("" if s["log_json_ok"] else ", log lines that are not JSON")
                + ("" if s["upstream_ok"] else
                   f", upstream saw {s['upstream_protocols_sampled']} on ports "
                   f"{s['upstream_ports_sampled']}")
                for shape, n, s in flat if failed(n, s)]
    if problems:
        add("**Problems:** " + "; ".join(problems))
    else:
        add("All targets: 0 non-2xx, 0 socket errors, log/audit lines are JSON, every sampled "
            "upstream request reached the listener of its shape (HTTP/1.1 only on the "
            "HTTP/1.1-only upstream).")
    short = [f"{LABELS[n]} ({SHAPES[shape]}) at least {s['log_missing']:,} of {s['requests']:,}"
             for shape, n, s in flat if s["log_missing"]]
    if short:
        add("")
        add("Log lines missing (fewer lines than requests wrk counted): " + "; ".join(short) + "."
            + (" HAProxy drops a log line rather than block when its threads collide on the log "
               "file descriptor (`log stdout`), so its log is not a complete audit trail under "
               "load." if any(n == "haproxy" and s["log_missing"] for _, n, s in flat) else ""))
    else:
        add("")
        add("Every target logged at least one line per request wrk counted.")
    add("")
    add("Columns: proxy CPU/req = user+system CPU of the proxy's processes during the measured run "
        "÷ requests, median over rounds (the primary figure: steadier than req/s when everything "
        "shares the cores); req/s = requests ÷ wrk's measured duration; p99/p50 = wrk --latency, "
        "median over rounds; non-2xx and socket errors summed over rounds; peak RSS = VmHWM, max "
        "over rounds (nginx: master + workers summed); log lines missing = requests wrk counted "
        "minus lines the proxy logged during the run (a lower bound); to upstream = the protocols "
        "the upstream saw from that target, over how many connections and upstream workers (one "
        "request in 16 sampled, so the counts are lower bounds).")
    return "\n".join(out) + "\n"


def scenario1_targets(baseline: bool) -> list[str]:
    """Scenario 1's targets in the order they run: the baseline build, when there is one, right
    after the gateway."""
    return [t for name in SCENARIO1 for t in ([name, BASELINE] if baseline and name == "gateway"
                                              else [name])]


def baseline_section(meta: dict, summary: dict[str, dict[str, dict]], runs: list[dict]) -> list[str]:
    """The gateway against another build of itself (--baseline-gateway), per upstream shape."""
    label = meta["baseline"]["label"]
    out = [f"## Against the baseline build (scenario 1): {label}", ""]
    add = out.append
    add(f"`gateway` is this checkout ({meta['versions']['gateway']}); `baseline` is datafold-gateway "
        f"built at {label}, with the same config (its own ports and audit file), run right after "
        "the gateway in every round.")
    add("")
    add("| upstream | CPU/req gateway / baseline | gateway ÷ baseline (CPU/req) | per round "
        "| req/s gateway / baseline | gateway ÷ baseline (req/s) | per round | p99 gateway / baseline |")
    add("|---|---:|---:|---|---:|---:|---|---|")
    for shape in meta["upstreams"]:
        ss = summary.get(shape, {})
        gw, base = ss.get("gateway"), ss.get(BASELINE)
        if not gw or not base:
            continue
        rt = ratios(ss, runs, shape)
        r2 = lambda key: f"{rt[key]:.2f}" if rt.get(key) is not None else "–"
        add(f"| {SHAPES[shape]} | {fmt_us(gw['proxy_cpu_us_per_req'])} / "
            f"{fmt_us(base['proxy_cpu_us_per_req'])} | **{r2('cpu_per_req_vs_baseline')}** | "
            f"{rt['cpu_per_req_vs_baseline_per_round']} | {fmt_rps(gw['rps_median'])} / "
            f"{fmt_rps(base['rps_median'])} | **{r2('rps_vs_baseline')}** | "
            f"{rt['rps_vs_baseline_per_round']} | {fmt_ms(gw['p99_us'])} / {fmt_ms(base['p99_us'])} |")
    add("")
    add("Medians of this run. A CPU/req ratio above 1 means this checkout spends more CPU per "
        "request than the baseline; a req/s ratio below 1 means it serves fewer requests per "
        "second. Read the per-round values for the spread: a difference smaller than the rounds "
        "disagree by is noise.")
    add("")
    return out


def profile_section(profile: dict, summary: dict[str, dict[str, dict]]) -> list[str]:
    """Where the gateway's CPU goes, per upstream shape (from --profile)."""
    out = ["## Profile (perf, gateway only)", ""]
    add = out.append
    add("After the measured rounds and not part of their figures: per upstream shape a fresh "
        f"gateway, one warm-up, then wrk while `perf record -F {PERF_HZ} -g` samples the gateway's "
        "threads. Share = the group's part of the gateway's samples (self time, `perf report "
        "--no-children`); CPU/req = that share of the gateway's CPU per request in the same run "
        "(user + system from /proc, under perf, so a little above the measured figure). Rust "
        "symbols are grouped by crate (first path segment), `ring_core_*`/AES/GCM symbols under "
        "ring, `mi_*` under mimalloc.")
    add("")
    for shape, p in profile.items():
        add(f"### {SHAPES[shape]}")
        add("")
        if "skipped" in p:
            add(f"Profile failed: {p['skipped']}")
            add("")
            continue
        measured = summary.get(shape, {}).get("gateway", {}).get("proxy_cpu_us_per_req")
        errors = (f"; {p['non2xx']} non-2xx, {p['socket_errors']} socket errors"
                  if p["non2xx"] or p["socket_errors"] else "")
        add(f"{p['requests']:,} requests in {p['seconds']:.0f} s ({fmt_rps(p['rps'])} req/s){errors}; "
            f"gateway CPU {p['gateway_cpu_s']:.2f} s → **{fmt_us(p['cpu_us_per_req'])}/req** under "
            f"perf (measured median above: {fmt_us(measured)}); perf samples: {p['perf_samples']}.")
        add("")
        add("| where the gateway's CPU goes | share of samples | CPU/req |")
        add("|---|---:|---:|")
        rest = [g for g in p["by_crate"] if g["percent"] < 0.1]
        for g in p["by_crate"]:
            if g["percent"] >= 0.1:
                add(f"| {g['group']} | {g['percent']:.1f}% | {g['cpu_us_per_req']:.2f} µs |")
        if rest:
            add(f"| {len(rest)} others below 0.1% each | {sum(g['percent'] for g in rest):.1f}% | "
                f"{sum(g['cpu_us_per_req'] for g in rest):.2f} µs |")
        add("")
        add(f"Top {len(p['top_symbols'])} symbols:")
        add("")
        add("| symbol | shared object | group | share | CPU/req |")
        add("|---|---|---|---:|---:|")
        for t in p["top_symbols"]:
            add(f"| {md_code(t['symbol'])} | {md_code(t['dso'])} | {t['group']} | "
                f"{t['percent']:.1f}% | {t['cpu_us_per_req']:.2f} µs |")
        add("")
        out.extend(syscall_lines(p["syscalls"]))
    return out


def syscall_lines(sc: dict) -> list[str]:
    if "skipped" in sc:
        return [f"Syscalls per request: not counted ({sc['skipped']}).", ""]
    shown = [(n, c) for n, c in sc["calls"].items() if c["per_request"] >= 0.01]
    out = [f"Syscalls per request: **{sc['per_request']:.2f}** (`strace -c -f` for "
           f"{sc['seconds']} s of wrk, {sc['requests']:,} requests counted in the audit file; "
           "strace slows the gateway down a lot, so it batches differently than in the runs "
           "above):", "",
           "| syscall | calls/req | errors/req |", "|---|---:|---:|"]
    for name, c in shown:
        out.append(f"| {name} | {c['per_request']:.2f} | {c['errors'] / sc['requests']:.2f} |")
    if len(shown) < len(sc["calls"]):
        out.append(f"| {len(sc['calls']) - len(shown)} others below 0.01/req | "
                   f"{sum(c['per_request'] for n, c in sc['calls'].items() if c['per_request'] < 0.01):.2f} | |")
    return out + [""]


def md_code(text: str, limit: int = 110) -> str:
    """A symbol as inline code in a table cell: shortened, pipes escaped."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def failed(name: str, s: dict) -> bool:
    """Errors fail the run; so does a gateway audit trail with a line missing (the gateway
    promises one line per answer), and requests that reached the wrong upstream listener or
    spoke anything but HTTP/1.1 to the HTTP/1.1-only one. nginx's and HAProxy's logs are
    reported, not judged."""
    gateway_short = name.startswith("gateway") and s["log_missing"]
    return bool(s["non2xx"] or s["socket_errors"] or not s["log_json_ok"] or gateway_short
                or not s["upstream_ok"])


def table_row(name: str, s: dict) -> str:
    seen = s["upstream_protocols_sampled"]
    total = sum(seen.values())
    protos = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(seen.items())) if total else "–"
    if total:
        protos += (f"; {s['upstream_connections_max']} conn, "
                   f"{s['upstream_workers_max']} worker{'s' if s['upstream_workers_max'] > 1 else ''}")
    cpu = f"**{fmt_us(s['proxy_cpu_us_per_req'])}**" if s["proxy_cpu_us_per_req"] is not None else "–"
    missing = "–" if s["log_missing"] is None else f"{s['log_missing']:,}"
    return (f"| {LABELS[name]} | {cpu} | {fmt_rps(s['rps_median'])} | "
            f"{fmt_rps(s['rps_min'])}–{fmt_rps(s['rps_max'])} | {fmt_ms(s['p99_us'])} | "
            f"{fmt_ms(s['p50_us'])} | {s['non2xx']} | {s['socket_errors']} | "
            f"{fmt_mib(s['peak_rss_kib'])} | {missing} | {protos} |")


def machine_meta(bench: Bench) -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown memory"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    wrk_v = command_output([bench.wrk, "-v"]).splitlines()
    haproxy_v = command_output([bench.haproxy, "-v"]).splitlines()
    git = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem": mem,
        "kernel": platform.release(),
        "versions": {
            "nginx": command_output([bench.nginx, "-v"]).replace("nginx version: ", ""),
            "haproxy": haproxy_v[0] if haproxy_v else "unknown",
            "wrk": wrk_v[0].split(" Copyright")[0] if wrk_v else "unknown",
            "gateway": f"{git}{' (uncommitted changes)' if dirty else ''}",
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 2 rounds of 3 s (+1 s warm-up)")
    p.add_argument("--rounds", type=int, help="rounds over all targets (default 5, quick 2)")
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 8, quick 3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 2, quick 1)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--workers", type=int, default=2,
                   help="nginx worker_processes and HAProxy nbthread (default 2)")
    p.add_argument("--upstream", choices=["h2", "h1", "both"], default="both",
                   help="upstream shape(s) for scenario 1: h2 (ALPN offers h2 and http/1.1), "
                        "h1 (ALPN offers http/1.1 only) or both, in the same run (default both); "
                        "scenario 2 uses the first chosen")
    p.add_argument("--scenario1-only", action="store_true", help="skip the many-callers scenario")
    p.add_argument("--profile", action="store_true",
                   help="after the measured rounds, profile the gateway with perf against each "
                        "upstream shape (CPU by crate, top symbols; syscalls per request with "
                        "strace if installed); needs perf, skipped with a note otherwise")
    p.add_argument("--profile-seconds", type=float, default=8,
                   help="seconds of wrk under perf per upstream shape (default 8)")
    p.add_argument("--results", default=str(HERE / "results"), help="where latest.md/json go")
    p.add_argument("--gateway", required=True, help="the release binary (run.sh passes it)")
    p.add_argument("--workdir", required=True, help="temp dir with ca.pem, server.pem, server.key")
    p.add_argument("--keep-workdir", action="store_true", help="(run.sh) keep the temp dir")
    p.add_argument("--baseline-gateway", metavar="PATH",
                   help="another release binary of the gateway, run in scenario 1 right after "
                        "the gateway with the same config and compared with it (run.sh "
                        "--baseline REV builds one at a git revision and passes it)")
    p.add_argument("--baseline-label", metavar="TEXT",
                   help="how the report names the baseline build (run.sh passes 'REV (short "
                        "id)'; default: its path)")
    args = p.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.seconds = args.seconds or (3 if quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.rounds < 1 or args.seconds <= 0 or args.profile_seconds <= 0:
        p.error("--rounds, --seconds and --profile-seconds must be positive")
    # wrk takes whole seconds only ("1.5s" is a usage error from wrk itself).
    for opt, value in (("--seconds", args.seconds), ("--warmup", args.warmup),
                       ("--profile-seconds", args.profile_seconds)):
        if value != int(value):
            p.error(f"{opt} must be a whole number of seconds (wrk takes no fractions), got {value}")
    args.shapes = ["h2", "h1"] if args.upstream == "both" else [args.upstream]
    if args.baseline_label and not args.baseline_gateway:
        p.error("--baseline-label needs --baseline-gateway")
    if args.baseline_gateway:
        if not os.access(args.baseline_gateway, os.X_OK):
            p.error(f"--baseline-gateway {args.baseline_gateway}: not an executable file")
        args.baseline_label = args.baseline_label or args.baseline_gateway
        LABELS[BASELINE] = f"datafold-gateway baseline, {args.baseline_label}"

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # (target, upstream shape) in the order they run each round: scenario 1 against every
    # chosen shape, then scenario 2 against the first.
    plan = [(name, shape) for shape in args.shapes
            for name in scenario1_targets(bool(args.baseline_gateway))]
    if not args.scenario1_only:
        plan += [(name, args.shapes[0]) for name in SCENARIO2]
    order = [check_key(name, shape) for name, shape in plan]
    profile: dict | None = None
    try:
        bench = Bench(args, Path(args.workdir).resolve(), args.gateway, find_tool("nginx"),
                      find_tool("haproxy"), find_tool("wrk"))
        bench.write_configs()
        bench.validate_configs()
        meta = machine_meta(bench) | {
            "rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
            "threads": args.threads, "connections": args.connections, "workers": args.workers,
            "order": order, "upstreams": args.shapes,
            "scenario2_upstream": None if args.scenario1_only else args.shapes[0],
            "upstream_ports": {s: bench.up_port[s] for s in args.shapes},
        }
        if args.baseline_gateway:
            meta["baseline"] = {"label": args.baseline_label, "binary": args.baseline_gateway}
        perf = strace = None
        if args.profile:
            # Checked now, so that the note comes before the rounds rather than after them.
            perf = optional_tool("perf")
            why = perf_unavailable(perf, bench.work)
            if why:
                print(f"note: --profile skipped: {why}", file=sys.stderr)
                perf = None
                profile = {"skipped": why}
            else:
                strace = optional_tool("strace")
                if not strace:
                    print("note: strace is not installed: the profile counts no syscalls",
                          file=sys.stderr)
        est = args.rounds * len(plan) * (args.seconds + args.warmup + 0.7)
        if perf:
            est += len(args.shapes) * (args.warmup + args.profile_seconds + 5
                                       + (STRACE_SECONDS + 3 if strace else 0))
        print(f"==> {args.rounds} rounds × {len(plan)} targets, about {est / 60:.1f} min",
              file=sys.stderr)
        bench.start_upstream()
        runs = []
        key_width = max(17, *(len(k) for k in order))
        for round_no in range(1, args.rounds + 1):
            for name, shape in plan:
                run = bench.measure(name, shape, round_no)
                runs.append(run)
                cpu = run_cpu_us(run)
                print(f"    round {round_no} {check_key(name, shape):{key_width}} "
                      f"cpu/req {fmt_us(cpu):>9}  {run['rps']:8,.0f} req/s  "
                      f"p99 {fmt_ms(run['p99_us']):>9}  non-2xx {run['non2xx']}  "
                      f"sock {run['socket_errors']}  rss {fmt_mib(run['peak_rss_kib'])}",
                      file=sys.stderr)
        if perf:
            profile = bench.profile_all(perf, strace)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        stop_all()
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        stop_all()
        return 1
    finally:
        stop_all()

    # Keyed by upstream shape, then target; every run in latest.json carries its shape too.
    summary: dict[str, dict[str, dict]] = {}
    for name, shape in plan:
        summary.setdefault(shape, {})[name] = summarize(
            [r for r in runs if r["target"] == name and r["upstream"] == shape])
    ratio_book = {shape: ratios(summary[shape], runs, shape) for shape in summary}
    text = report(meta, summary, runs, bench.checks, profile)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.md").write_text(text)
    (results / "latest.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "ratios": ratio_book, "checks": bench.checks,
         **({"profile": profile} if profile is not None else {}), "runs": runs}, indent=1) + "\n")
    print(text)
    print(f"(saved to {results / 'latest.md'} and latest.json)", file=sys.stderr)
    return 1 if any(failed(n, s) for ss in summary.values() for n, s in ss.items()) else 0


if __name__ == "__main__":
    sys.exit(main())
