#!/usr/bin/env bash
# Side-by-side benchmark: upstream floor, nginx, HAProxy and datafold-gateway on loopback,
# against an h2-capable upstream and an HTTP/1.1-only one (same nginx, same answers).
#
#   benches/run.sh                  # full run, both upstream shapes, about 9-10 minutes
#   benches/run.sh --quick          # both upstream shapes, about 2 minutes
#   benches/run.sh --upstream h1    # one shape only: h2 or h1 (default both)
#   benches/run.sh --profile        # then perf-profile the gateway per shape (--profile-seconds, default 8)
#   benches/run.sh --baseline REV   # also run the gateway as built at git revision REV (HEAD~3, a
#                                   # commit id, a tag) beside this checkout's, and compare the two
#   benches/run.sh --help           # every option (rounds, seconds per round, ...)
#
# Installs nginx, haproxy and wrk when missing, builds the gateway in release mode in its own
# target dir, makes a throwaway CA and server certificate, then hands over to bench.py, which
# runs everything and writes benches/results/latest.md and latest.json. Every option but
# --baseline is passed on to bench.py. --baseline REV exports REV with `git archive` into a temp
# dir under target/bench-baseline, builds it there in release mode with target/bench-baseline as
# its target dir (kept, so the next baseline build only recompiles what changed), removes the
# temp dir and passes --baseline-gateway and --baseline-label "REV (short id)" to bench.py.
# --profile needs perf (not installed here; skipped with a note without it or
# when perf_event_paranoid forbids it) and uses strace for syscall counts when it is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

for arg in "$@"; do
    case "$arg" in
        -h|--help) exec python3 "$here/bench.py" --help ;;
    esac
done

# --baseline REV (or --baseline=REV) is run.sh's own: taken out, everything else goes to bench.py.
baseline_given=0
baseline_rev=""
pass=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --baseline) baseline_given=1; baseline_rev="${2-}"; shift; [ "$#" -eq 0 ] || shift ;;
        --baseline=*) baseline_given=1; baseline_rev="${1#--baseline=}"; shift ;;
        *) pass+=("$1"); shift ;;
    esac
done
case "$baseline_given:$baseline_rev" in
    1:|1:-*) echo "--baseline needs a git revision (HEAD~3, a commit id, a tag)" >&2; exit 2 ;;
esac
# Resolved now, before any build, so that a mistyped revision fails at once.
baseline_id=""
if [ -n "$baseline_rev" ]; then
    command -v git >/dev/null 2>&1 || { echo "--baseline needs git" >&2; exit 1; }
    baseline_id="$(git -C "$repo" rev-parse --verify --quiet "${baseline_rev}^{commit}")" \
        || { echo "--baseline $baseline_rev: not a commit in $repo" >&2; exit 2; }
    baseline_short="$(git -C "$repo" rev-parse --short "$baseline_id")"
    # "HEAD~3 (1a2b3c4)"; a commit id given as the revision is named once.
    case "$baseline_id" in
        "$baseline_rev"*) baseline_label="$baseline_short" ;;
        *) baseline_label="$baseline_rev ($baseline_short)" ;;
    esac
fi

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

# Removed on exit whatever happens: the baseline's exported source, the work dir (unless kept).
work=""
baseline_src=""
keep=0
for arg in "${pass[@]}"; do [ "$arg" = "--keep-workdir" ] && keep=1; done
cleanup() {
    [ -z "$baseline_src" ] || rm -rf "$baseline_src"
    [ -z "$work" ] || [ "$keep" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

# --- baseline gateway (--baseline REV) ------------------------------------------------------
baseline_args=()
if [ -n "$baseline_id" ]; then
    baseline_target="$repo/target/bench-baseline"
    mkdir -p "$baseline_target"
    baseline_src="$(mktemp -d "$baseline_target/src.XXXXXX")"
    echo "==> building datafold-gateway at $baseline_label (release, target/bench-baseline)" >&2
    git -C "$repo" archive --format=tar "$baseline_id" | tar -x -C "$baseline_src"
    (cd "$baseline_src" && cargo build --release --locked --target-dir "$baseline_target")
    rm -rf "$baseline_src"
    baseline_src=""
    baseline_args=(--baseline-gateway "$baseline_target/release/datafold-gateway"
                   --baseline-label "$baseline_label")
fi

# --- throwaway CA and server certificate ----------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/datafold-bench.XXXXXX")"
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
python3 "$here/bench.py" --gateway "$gateway" --workdir "$work" "${baseline_args[@]}" "${pass[@]}"
