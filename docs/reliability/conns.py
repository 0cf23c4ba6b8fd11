#!/usr/bin/env python3
"""Many slow or idle connections to the gateway, held for a bounded time.

usage: conns.py MODE N HOLD_SECONDS [TOKEN]
  idle      N connections that send nothing
  slowloris N connections that send a request's headers one byte per second
  slowbody  N connections that send complete headers (content-length: 10, the bearer
            TOKEN if given) and then one body byte
Connects to 127.0.0.1:18080 (GW env to change), at most HOLD_SECONDS, then closes
whatever is still open. Prints how many connected, how many the gateway closed and when
(seconds after connecting: min / median / max), and the first status line it answered.
Raise `ulimit -n` first for N near or over 1000.
"""
import asyncio, collections, os, statistics, sys, time

mode, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
token = sys.argv[4] if len(sys.argv) > 4 else None
host, port = os.environ.get("GW", "127.0.0.1:18080").split(":")
auth = f"Authorization: Bearer {token}\r\n" if token else ""
HEAD = ("POST /api/v1/data_sources/1/test HTTP/1.1\r\nHost: gw\r\n" + auth +
        "Content-Type: application/json\r\n").encode()
closed, answers, failed = [], collections.Counter(), 0
deadline = time.monotonic() + hold


async def one():
    global failed
    try:
        r, w = await asyncio.open_connection(host, int(port))
    except OSError:
        failed += 1
        return
    t0 = time.monotonic()

    async def feed():
        if mode == "slowbody":
            w.write(HEAD + b"Content-Length: 10\r\n\r\n{")
            await w.drain()
        elif mode == "slowloris":
            for b in HEAD + b"X-Pad: " + b"a" * 10_000:
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(1)

    sender = asyncio.create_task(feed())
    try:
        line = await asyncio.wait_for(r.read(200), max(0.0, deadline - time.monotonic()))
        # An answer or a close, either way the gateway ended it.
        closed.append(time.monotonic() - t0)
        answers[line.split(b"\r\n")[0].decode(errors="replace") or "(closed, no answer)"] += 1
    except asyncio.TimeoutError:
        pass
    except OSError:
        closed.append(time.monotonic() - t0)
        answers["(reset)"] += 1
    finally:
        sender.cancel()
        w.close()


async def main():
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.0005)  # ~2000 connects/s, gentle on the accept queue
    await asyncio.gather(*tasks)


asyncio.run(main())
c = sorted(closed)
print(f"{mode}: {n} tried, {n - failed} connected, {len(c)} ended by the gateway within {hold:.0f}s", end="")
if c:
    print(f" (after {c[0]:.1f} / {statistics.median(c):.1f} / {c[-1]:.1f} s)", end="")
print()
for k, v in answers.most_common():
    print(f"  {v:6d}  {k}")
