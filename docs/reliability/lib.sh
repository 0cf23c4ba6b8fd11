# Helpers for the reliability runs; source it:  . docs/reliability/lib.sh
# Everything listens on 127.0.0.1: gateway 18080, admin 19090, stand-in upstream 18443.
# R is the run folder (default /tmp/rel); BIN the gateway binary under test.

R=${R:-/tmp/rel}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOKEN=dfgw_reliability_run_token_0123456789
GW=127.0.0.1:18080
ADMIN=127.0.0.1:19090

# A CA and a certificate for 127.0.0.1 (rustls wants a real chain, not a self-signed leaf).
rel_certs() {
  mkdir -p "$R"; cd "$R" || return
  [ -f leaf.pem ] && { cd - >/dev/null; return; }
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
    -subj /CN=rel-ca -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem \
    -days 2 -extfile leaf.ext 2>/dev/null
  cd - >/dev/null
}

# rel_config [EXTRA_TOML]: token mode, one caller "team" with $TOKEN, no rate limit but the
# built-in ones, audit to $R/audit.jsonl. The same file works for the old and the new binary.
rel_config() {
  rel_certs
  rm -f "$R/api-key"; printf 'k3y-reliability' > "$R/api-key"; chmod 600 "$R/api-key"
  local sha; sha=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
  cat > "$R/gateway.toml" <<TOML
[listen]
addr = "$GW"
[admin]
addr = "$ADMIN"
[upstream]
url = "https://127.0.0.1:18443"
ca_file = "$R/ca.pem"
[api_key]
file = "$R/api-key"
[audit]
file = "$R/audit.jsonl"
[log]
level = "warn"
[callers]
mode = "token"
[[callers.token]]
name = "team"
sha256 = "$sha"
${1:-}
TOML
}

# rel_upstream [DELAY [PAD]]: start the stand-in; what reaches it is logged to $R/upstream.log.
rel_upstream() {
  if ss -ltn | grep -qE '127.0.0.1:(18080|18443|19090) '; then
    echo "a port of the run is taken (a gateway or stand-in left running?)"; return 1
  fi
  : > "$R/upstream.log"
  python3 "$HERE/upstream.py" 18443 "$R/leaf.pem" "$R/leaf.key" "$R/upstream.log" "${1:-0}" "${2:-0}" \
    > "$R/upstream.out" 2>&1 &
  echo $! > "$R/upstream.pid"
  for _ in $(seq 50); do grep -q "^upstream https" "$R/upstream.out" && return 0; sleep 0.1; done
  echo "stand-in did not start:"; cat "$R/upstream.out"; return 1
}

# rel_gateway: start $BIN with the config, a fresh audit file and the highest fd limit allowed.
rel_gateway() {
  : > "$R/audit.jsonl"
  ( ulimit -n "$(ulimit -Hn)"; exec "$BIN" serve --config "$R/gateway.toml" ) > "$R/gateway.log" 2>&1 &
  echo $! > "$R/gateway.pid"
  for _ in $(seq 50); do kill -0 "$(gwpid)" 2>/dev/null || break
    curl -fs "http://$ADMIN/healthz" >/dev/null && return 0; sleep 0.1; done
  echo "gateway did not start:"; cat "$R/gateway.log"; return 1
}

rel_stop() {
  for p in gateway upstream; do
    [ -f "$R/$p.pid" ] && kill "$(cat "$R/$p.pid")" 2>/dev/null
    rm -f "$R/$p.pid"
  done
  sleep 0.5
}

gwpid() { cat "$R/gateway.pid"; }
# Peak and current resident memory of the gateway, in kB.
hwm() { awk '/VmHWM|VmRSS/{printf "%s %s kB  ", $1, $2} END{print ""}' "/proc/$(gwpid)/status"; }
# Total CPU time (user+sys, seconds) the gateway has used.
cpu() { awk '{printf "%.2f\n", ($14+$15)/100}' "/proc/$(gwpid)/stat"; }
# One authenticated request; prints the status.
authed() { curl -s -o /dev/null -w '%{http_code}\n' -m 5 -X POST -H "Authorization: Bearer $TOKEN" \
  "http://$GW/api/v1/data_sources/1/test"; }
