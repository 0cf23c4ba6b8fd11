#!/usr/bin/env python3
"""One connection that sends a request head one byte every GAP seconds; prints when the
gateway closes it. With PREFACE=1 in the environment it sends the HTTP/2 preface instead.
usage: slowstart.py GAP   (gateway on 127.0.0.1:18080; gives up after 60 s)
Shows that hyper's header timer starts only once the protocol is known (the 2nd byte).
"""
import os, socket, sys, time
gap = float(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 18080)); t0 = time.monotonic()
s.settimeout(0.2)
data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if os.environ.get("PREFACE") else b"POST /api/v1/data_sources/1/test HTTP/1.1\r\nHost: gw\r\n"
i = 0
while time.monotonic() - t0 < 60:
    if i < len(data) and time.monotonic() - t0 >= i * gap:
        try: s.send(data[i:i+1]); i += 1
        except OSError as e: print("send failed", e, round(time.monotonic()-t0,1)); break
    try:
        if s.recv(100) == b"": print(f"gap {gap}: closed after {time.monotonic()-t0:.1f} s, {i} bytes sent"); break
    except socket.timeout: pass
    except OSError as e: print("reset", round(time.monotonic()-t0,1)); break
