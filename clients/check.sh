#!/usr/bin/env bash
# The API against its own document, on a live replica (run by .ci/run after `cargo test`):
#   1. start a replica (a private PostgreSQL under a temporary home) with an admin token;
#   2. generate the Python client from its /api/openapi.json and fail if it differs from the
#      committed clients/python (clients/check.sh --update rewrites clients/python instead);
#   3. drive the replica through the generated client (clients/smoke.py);
#   4. schemathesis --checks all over the live document (see clients/schemathesis.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
update=false
[ "${1:-}" = "--update" ] && update=true

bin=${HARNESS_BIN:-target/debug/harness}
unset HARNESS_BIN # not a setting: the harness refuses unknown HARNESS_* variables
[ -x "$bin" ] || cargo build --quiet
venv=${CLIENTS_VENV:-target/clients-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y python3-venv >/dev/null
        python3 -m venv "$venv"
    }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r clients/requirements.txt

work=$(mktemp -d /tmp/harness-clients-XXXXXX)
chmod 755 "$work" # PostgreSQL runs as another account when this runs as root
token="admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
HARNESS_HOME="$work/home" HARNESS_API__BIND="127.0.0.1:$port" RUST_LOG=warn \
    HARNESS_API__TOKENS="[{\"token\":\"$token\",\"scope\":\"admin\"}]" \
    HARNESS_BULK__POLL_INTERVAL_MS=100 \
    "$bin" serve >"$work/serve.log" 2>&1 &
pid=$!
cleanup() {
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$venv/bin/python" - "$base" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=2)
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("the replica did not get ready within 60 s")
        time.sleep(0.2)
PY
"$venv/bin/python" - "$base" "$token" "$work/openapi.json" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/openapi.json", headers={"Authorization": "Bearer " + sys.argv[2]})
open(sys.argv[3], "wb").write(urllib.request.urlopen(req).read())
PY

echo "== the Python client, generated from the live document"
"$venv/bin/openapi-python-client" generate --path "$work/openapi.json" \
    --config clients/openapi-python-client.yaml --output-path "$work/python" --meta setup >/dev/null
if $update; then
    rm -rf clients/python && cp -r "$work/python" clients/python
    echo "clients/python rewritten"
elif ! diff -r clients/python "$work/python"; then
    echo "clients/python is not what the live document generates: run clients/check.sh --update" >&2
    exit 1
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "$work/python"

echo "== a replica driven through the client"
"$venv/bin/python" clients/smoke.py "$base" "$token"

echo "== schemathesis --checks all"
st=("$venv/bin/schemathesis" --config-file clients/schemathesis.toml run "$base/api/openapi.json"
    -H "Authorization: Bearer $token" --seed "${SCHEMATHESIS_SEED:-20261201}" --no-color)
"${st[@]}" --checks all --exclude-operation-id create_agent --exclude-operation-id update_agent \
    --exclude-operation-id task_logs
"${st[@]}" --checks all --exclude-checks positive_data_acceptance \
    --include-operation-id create_agent --include-operation-id update_agent
