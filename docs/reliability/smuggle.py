#!/usr/bin/env python3
"""HTTP/1 framing attacks against the gateway, one fresh connection each.

usage: smuggle.py TOKEN
Each case is a valid-looking POST to data source 1 with the bearer token, framed in an
ambiguous way, followed by a second request for data source 666 hidden in the body. The
script prints what the gateway answered (every status line it got back) and whether it closed
the connection. Afterwards, check the stand-in's log: 666 must never appear there, and every
request that reached it must have a body that matches its content-length.
"""
import os, re, socket, sys

token = sys.argv[1]
host, port = os.environ.get("GW", "127.0.0.1:18080").split(":")
A = f"Authorization: Bearer {token}\r\n"
SMUG = ("POST /api/v1/data_sources/666/test HTTP/1.1\r\nHost: gw\r\n" + A +
        "Content-Length: 2\r\n\r\n{}")
START = "POST /api/v1/data_sources/1/test HTTP/1.1\r\nHost: gw\r\n" + A

CASES = {
    "CL+TE (CL first)": START + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUG,
    "TE+CL (TE first)": START + "Transfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n" + SMUG,
    "two different CL": START + "Content-Length: 2\r\nContent-Length: 70\r\n\r\n{}" + SMUG,
    "two equal CL": START + "Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "CL list '2, 2'": START + "Content-Length: 2, 2\r\n\r\n{}",
    "TE: chunked, identity": START + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUG,
    "TE: identity, chunked + CL": START + "Transfer-Encoding: identity, chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUG,
    "TE: xchunked": START + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUG,
    "TE with space before colon": START + "Transfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\n{}" + SMUG,
    "obs-fold in CL": START + "Content-Length: 2\r\n 60\r\n\r\n{}" + SMUG,
    "obs-fold in TE": START + "Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 2\r\n\r\n{}" + SMUG,
    "bare LF line ends": START.replace("\r\n", "\n") + "Content-Length: 2\n\n{}",
    "bare LF inside chunked": START + "Transfer-Encoding: chunked\r\n\r\n2\n{}\n0\n\n" + SMUG,
    "chunk size overflow": START + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n{}\r\n0\r\n\r\n" + SMUG,
    "well-framed pipelined pair": START + "Content-Length: 2\r\n\r\n{}" + START + "Content-Length: 2\r\n\r\n{}",
}

for name, raw in CASES.items():
    s = socket.create_connection((host, int(port)), timeout=3)
    s.sendall(raw.encode())
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                end = "closed"
                break
            got += chunk
    except socket.timeout:
        end = "left open"
    s.close()
    # A status line may follow the previous answer's body with no line break before it.
    statuses = [m.decode() for m in re.findall(rb"HTTP/1\.1 \d{3} [^\r\n]*", got)]
    print(f"{name:30s} -> {', '.join(statuses) or 'no answer'}; {end}")
