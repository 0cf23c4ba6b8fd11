#!/usr/bin/env bash
# One reliability run against one gateway binary. Everything on 127.0.0.1, bounded in time.
#   BIN=/path/to/datafold-gateway docs/reliability/run.sh CASE
# CASE: flood-short flood-long slowbody smuggle h2-reset h2-reset-stranger h2-continuation
#       idle slowloris big-answer sigterm files
# Needs: python3 (+ `pip install h2` for the h2 cases), wrk, curl, openssl.
set -u
: "${BIN:?set BIN to the gateway binary}"
. "$(dirname "$0")/lib.sh"
export GW
mkdir -p "$R"
trap rel_stop EXIT

# A caller with the token, one request every 0.1 s for SECS seconds; prints status counts.
caller() {
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ]; do authed; sleep 0.1; done | sort | uniq -c | sed 's/^/  caller: /'
}

report() {  # audit and upstream totals after a run
  echo "  audit: $(wc -l < "$R/audit.jsonl") records, $(stat -c %s "$R/audit.jsonl") bytes;" \
       "forwarded: $(grep -c '"outcome":"forwarded"' "$R/audit.jsonl");" \
       "upstream received: $(wc -l < "$R/upstream.log")"
}

flood() {  # $1: path
  rel_config; { rel_upstream && rel_gateway; } || exit 1
  local c0; c0=$(cpu)
  wrk -t1 -c32 -d10s "http://$GW$1" > "$R/wrk.out" 2>&1 &
  local w=$!
  sleep 0.5; caller 9
  wait $w
  grep -E 'Requests/sec|requests in|Non-2xx|Socket errors' "$R/wrk.out" | sed 's/^ */  wrk: /'
  echo "  audit bytes/s over the 10 s: $(( $(stat -c %s "$R/audit.jsonl") / 10 ))"
  echo "  gateway: $(hwm) cpu $(echo "$(cpu) - $c0" | bc) s"
  report
  # The metrics count every answer; the audit's records plus its `suppressed` counts should match.
  sleep 1.5  # summaries are written about once a second
  curl -s "http://$ADMIN/metrics" | awk '/^datafold_gateway_requests_total/ && !/forwarded/ {n += $NF}
    END {print "  metrics: " n " refusals answered"}'
  python3 - "$R/audit.jsonl" <<'PY'
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
refused = [r for r in recs if r["outcome"] != "forwarded"]
summaries = [r for r in refused if r.get("suppressed")]
print(f"  audit: {len(refused)} refusal records ({len(summaries)} summaries standing for"
      f" {sum(r['suppressed'] for r in summaries)} more refusals),"
      f" {sum(1 for r in recs if r.get('path_truncated'))} with path_truncated;"
      f" by status {dict(collections.Counter(r['status'] for r in refused))}")
PY
}

case "${1:-}" in
flood-short) flood /api/v1/data_sources ;;
flood-long) flood "/$(head -c 8192 /dev/zero | tr '\0' a)" ;;
slowbody)
  rel_config; { rel_upstream && rel_gateway; } || exit 1
  ( ulimit -n "$(ulimit -Hn)"; python3 "$HERE/conns.py" slowbody 1100 14 "$TOKEN" ) > "$R/conns.out" 2>&1 &
  w=$!
  sleep 3; echo "  gateway: $(hwm)"; caller 5
  wait $w; cat "$R/conns.out"; report ;;
smuggle)
  rel_config; { rel_upstream && rel_gateway; } || exit 1
  python3 "$HERE/smuggle.py" "$TOKEN"
  sleep 0.5
  echo "  upstream received (method path content-length body):"
  python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); h={k.lower():v for k,v in r["headers"].items()}
    print("   ", r["method"], r["path"], h.get("content-length"), h.get("transfer-encoding"), repr(r["body"]))' "$R/upstream.log"
  echo "  data source 666 reached the upstream: $(grep -c '/666/' "$R/upstream.log") times"
  report ;;
h2-reset|h2-reset-stranger|h2-continuation)
  rel_config; { rel_upstream && rel_gateway; } || exit 1
  c0=$(cpu)
  case $1 in
    h2-reset) args=(reset 10 "$TOKEN") ;;
    h2-reset-stranger) args=(reset 10) ;;
    h2-continuation) args=(continuation 10) ;;
  esac
  python3 "$HERE/h2attack.py" "${args[@]}" > "$R/h2.out" 2>&1 &
  w=$!
  sleep 0.5; caller 9
  wait $w; cat "$R/h2.out"
  echo "  gateway: $(hwm) cpu $(echo "$(cpu) - $c0" | bc) s over ~10 s"
  report ;;
idle)
  rel_config $'[limits]\nheader_read_timeout = "20s"'; { rel_upstream && rel_gateway; } || exit 1
  echo "  gateway before: $(hwm)"
  ( ulimit -n "$(ulimit -Hn)"; python3 "$HERE/conns.py" idle 10000 35 ) > "$R/conns.out" 2>&1 &
  w=$!
  # Connecting 10,000 takes ~8-10 s here; wait until (nearly) all are open, at most 18 s.
  for _ in $(seq 18); do sleep 1; [ "$(ls /proc/$(gwpid)/fd | wc -l)" -gt 10000 ] && break; done
  echo "  gateway with them open: $(hwm), fds $(ls /proc/$(gwpid)/fd | wc -l)"
  echo "  healthz: $(curl -s -o /dev/null -w '%{http_code}' -m 5 "http://$ADMIN/healthz")"
  caller 2
  wait $w; cat "$R/conns.out"
  echo "  gateway after: $(hwm), fds $(ls /proc/$(gwpid)/fd | wc -l)" ;;
slowloris)
  rel_config $'[limits]\nheader_read_timeout = "10s"'; { rel_upstream && rel_gateway; } || exit 1
  python3 "$HERE/conns.py" slowloris 50 20 "$TOKEN" ;;
big-answer)
  # Each answer from the stand-in is 20 MB; 20 requests at once.
  rel_config; { rel_upstream 0 20000000 && rel_gateway; } || exit 1
  seq 20 | xargs -P 20 -I{} curl -s -o /dev/null -w '%{http_code} %{size_download}\n' -m 30 -X POST \
    -H "Authorization: Bearer $TOKEN" "http://$GW/api/v1/data_sources/{}/test" | sort | uniq -c | sed 's/^/  /'
  echo "  gateway: $(hwm)"; report ;;
sigterm)
  rel_config; { rel_upstream 8 && rel_gateway; } || exit 1
  # The stand-in holds each request 8 s; SIGTERM goes once all 200 have reached it (or after 7 s).
  seq 200 | xargs -P 200 -I{} curl -s -o /dev/null -w '%{http_code} curl-exit-%{exitcode}\n' -m 40 -X POST \
    -H "Authorization: Bearer $TOKEN" "http://$GW/api/v1/data_sources/{}/test" > "$R/codes.out" &
  w=$!
  for _ in $(seq 70); do [ "$(wc -l < "$R/upstream.log")" -ge 200 ] && break; sleep 0.1; done
  echo "  in flight at SIGTERM: $(wc -l < "$R/upstream.log") reached the upstream, $(wc -l < "$R/codes.out") answered"
  g=$(gwpid); kill -TERM "$g"
  wait "$g" 2>/dev/null; rc=$?
  # `wait` only works on children of this shell; the gateway is one (started with &).
  echo "  gateway exit code: $rc"
  wait $w
  echo "  answers:"; sort "$R/codes.out" | uniq -c | sed 's/^/    /'
  echo "  curls: $(grep -c . "$R/codes.out"), answered with a status: $(grep -vc "^000" "$R/codes.out"), audit records: $(wc -l < "$R/audit.jsonl")"
  echo "  requests lost (sent, not answered): $(grep -c '^000' "$R/codes.out")"
  report ;;
files)
  # 1) at start: the key file is a FIFO nobody writes; 2) the config file is /dev/zero.
  rel_config
  rm -f "$R/fifo"; mkfifo "$R/fifo"
  sed "s|file = \"$R/api-key\"|file = \"$R/fifo\"|" "$R/gateway.toml" > "$R/fifo.toml"
  ( ulimit -v 4000000; timeout -k 1 10 "$BIN" serve --config "$R/fifo.toml" ) > "$R/f1.log" 2>&1
  echo "  key = FIFO at start: exit $? (124 or 137 = still hanging after 10 s, killed); $(tail -c 300 "$R/f1.log")"
  ( ulimit -v 4000000; timeout -k 1 10 "$BIN" serve --config /dev/zero ) > "$R/f2.log" 2>&1
  echo "  config = /dev/zero at start: exit $? (124 or 137 = still hanging after 10 s, killed); $(tail -c 300 "$R/f2.log")"
  # 3) on reload: a running gateway, the key file swapped for the FIFO, then for /dev/zero.
  rel_upstream
  : > "$R/audit.jsonl"
  ( ulimit -n "$(ulimit -Hn)"; ulimit -v 4000000; exec "$BIN" serve --config "$R/gateway.toml" ) > "$R/gateway.log" 2>&1 &
  echo $! > "$R/gateway.pid"; sleep 1
  echo "  running: request $(authed), $(hwm)"
  ln -sf "$R/fifo" "$R/api-key.new"; mv -T "$R/api-key.new" "$R/api-key"; kill -HUP "$(gwpid)"; sleep 2
  echo "  key -> FIFO + SIGHUP: healthz $(curl -s -o /dev/null -w '%{http_code}' -m 3 "http://$ADMIN/healthz")," \
       "request $(authed), $(hwm)"
  printf 'k3y-reliability' > "$R/api-key.new"; mv -T "$R/api-key.new" "$R/api-key"; kill -HUP "$(gwpid)"; sleep 1
  if ! curl -fs -o /dev/null -m 3 "http://$ADMIN/healthz"; then
    echo "  the gateway is stuck; KILL and start it again for the next step"
    kill -KILL "$(gwpid)"; sleep 0.5
    ( ulimit -n "$(ulimit -Hn)"; ulimit -v 4000000; exec "$BIN" serve --config "$R/gateway.toml" ) >> "$R/gateway.log" 2>&1 &
    echo $! > "$R/gateway.pid"; sleep 1
    echo "  running again: request $(authed), $(hwm)"
  fi
  ln -sf /dev/zero "$R/api-key.new"; mv -T "$R/api-key.new" "$R/api-key"; kill -HUP "$(gwpid)"; sleep 3
  if kill -0 "$(gwpid)" 2>/dev/null; then
    echo "  key -> /dev/zero + SIGHUP: healthz $(curl -s -o /dev/null -w '%{http_code}' -m 3 "http://$ADMIN/healthz")," \
         "request $(authed), $(hwm)"
  else
    echo "  key -> /dev/zero + SIGHUP: the gateway died"
  fi
  grep -iE 'refused|panic|memory|alloc' "$R/gateway.log" | cut -c1-300 | sed 's/^/    log: /'
  # A gateway stuck opening the FIFO ignores SIGTERM (its handler is on the runtime): KILL it.
  kill -KILL "$(gwpid)" 2>/dev/null
  rm -f "$R/api-key"; printf 'k3y-reliability' > "$R/api-key" ;;
*) sed -n 2,6p "$0"; exit 2 ;;
esac
