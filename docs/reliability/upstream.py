#!/usr/bin/env python3
"""A small TLS stand-in for Datafold, for the reliability runs.

usage: upstream.py PORT CERT KEY LOG [DELAY_SECONDS [PAD_BYTES]]

Answers POST /api/v1/data_sources/{id}/test with 200 {"job_id": N} and
GET /api/v1/data_sources/test/{job} with 200 {"status": "done"}, anything else 404.
Waits DELAY_SECONDS (default 0) before each answer, to keep requests in flight;
PAD_BYTES (default 0) makes each 200 answer that much bigger (a "pad" field).
Appends one JSON line per request it receives to LOG (method, path, headers, body),
so a run can check what reached it. HTTP/1.1 only (no ALPN), one thread per connection.
"""
import http.server, itertools, json, re, ssl, sys, threading, time

port, cert, key, log_path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
pad = int(sys.argv[6]) if len(sys.argv) > 6 else 0
jobs = itertools.count(1001)
lock = threading.Lock()
log = open(log_path, "a", buffering=1)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        with lock:
            log.write(json.dumps({"method": self.command, "path": self.path,
                                  "headers": dict(self.headers.items()),
                                  "body": body.decode("latin-1")}) + "\n")
        if delay:
            time.sleep(delay)
        if self.command == "POST" and re.fullmatch(r"/api/v1/data_sources/-?\d+/test", self.path):
            out = {"job_id": next(jobs)}
        elif self.command == "GET" and re.fullmatch(r"/api/v1/data_sources/test/-?\d+", self.path):
            out = {"id": int(self.path.rsplit("/", 1)[1]), "status": "done", "results": []}
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if pad:
            out["pad"] = "x" * pad
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = Server(("127.0.0.1", int(port)), Handler)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(f"upstream https://127.0.0.1:{port} delay={delay}", flush=True)
srv.serve_forever()
