#!/usr/bin/env bash
# Side-by-side benchmark: upstream floor, nginx, HAProxy and datafold-gateway on loopback,
# against an h2-capable upstream and an HTTP/1.1-only one (same nginx, same answers).
#
#   benches/run.sh                  # full run, both upstream shapes, about 9-10 minutes
#   benches/run.sh --quick          # both upstream shapes, about 2 minutes
#   benches/run.sh --upstream h1    # one shape only: h2 or h1 (default both)
#   benches/run.sh --profile        # then perf-profile the gateway per shape (--profile-seconds, default 8)
#   benches/run.sh --help           # every option (rounds, seconds per round, ...)
#
# Installs nginx, haproxy and wrk when missing, builds the gateway in release mode in its own
# target dir, makes a throwaway CA and server certificate, then hands over to bench.py, which
# runs everything and writes benches/results/latest.md and latest.json. Every option is passed
# on to bench.py. --profile needs perf (not installed here; skipped with a note without it or
# when perf_event_paranoid forbids it) and uses strace for syscall counts when it is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

for arg in "$@"; do
    case "$arg" in
        -h|--help) exec python3 "$here/bench.py" --help ;;
    esac
done

# --- tools ----------------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have nginx || missing+=(nginx)
have haproxy || missing+=(haproxy)
have wrk || missing+=(wrk)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi
for tool in openssl python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is needed but not installed" >&2; exit 1; }
done

# --- gateway --------------------------------------------------------------------------------
echo "==> building datafold-gateway (release, target/bench)" >&2
(cd "$repo" && cargo build --release --locked --target-dir target/bench)
gateway="$repo/target/bench/release/datafold-gateway"

# --- throwaway CA and server certificate ----------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/datafold-bench.XXXXXX")"
keep=0
for arg in "$@"; do [ "$arg" = "--keep-workdir" ] && keep=1; done
cleanup() { [ "$keep" = 1 ] || rm -rf "$work"; }
trap cleanup EXIT
# nginx workers drop to an unprivileged user when started as root; let them reach their files.
chmod 755 "$work"

echo "==> throwaway CA and certificate in $work" >&2
openssl req -x509 -new -nodes -days 2 \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=datafold-bench throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -nodes \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$work/server.key" -out "$work/server.csr" -subj "/CN=localhost" 2>/dev/null
printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:localhost,IP:127.0.0.1" > "$work/server.ext"
openssl x509 -req -days 2 -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null

# --- run ------------------------------------------------------------------------------------
# Not exec: the trap above removes the work dir when bench.py is done. Ctrl-C reaches bench.py
# too (same process group), which stops everything it started before exiting.
python3 "$here/bench.py" --gateway "$gateway" --workdir "$work" "$@"
