#!/usr/bin/env bash
# Throughput of harness next to graphile-worker (npm), on the same machine and the same
# PostgreSQL server, interleaved run by run. See README.md in this directory.
#
#   benches/peers/run.sh                      # from the repository root
#
# Environment (defaults in brackets):
#   DATABASE_URL        a PostgreSQL server to use, as a role that may CREATE DATABASE
#                       [unset: the private server of the harness home, see below]
#   HARNESS             the harness binary               [target/release/harness]
#   CONCURRENCIES       concurrencies to compare         ["8 24 128 512"]
#   JOBS                no-op jobs per run                [20000]
#   RUNS                runs per side and concurrency     [3]
#   HARNESS_BENCH_ARGS  extra arguments to `harness bench` (word-split) [empty]
#   HARNESS_HOME        the harness home whose private PostgreSQL is used when DATABASE_URL
#                       is unset                          [.harness]
#   RUN_TIMEOUT         seconds one run of either side may take [300 + JOBS/100]
#
# Writes peers-results.jsonl (one line per run, then the medians) and peers-results.log (the
# stderr of every run) in the current directory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HARNESS=${HARNESS:-target/release/harness}
CONCURRENCIES=${CONCURRENCIES:-"8 24 128 512"}
JOBS=${JOBS:-20000}
RUNS=${RUNS:-3}
HARNESS_BENCH_ARGS=${HARNESS_BENCH_ARGS:-}
RESULTS=$PWD/peers-results.jsonl
LOG=$PWD/peers-results.log
GRAPHILE_DB=peers_graphile_$$
# While the private server is used, fd 9 holds a shared lock on its pg.users; every child gets
# `9>&-`: a postgres started by `harness migrate` must not inherit it, or it would never stop.

die() {
    echo "run.sh: $*" >&2
    exit 1
}

for v in JOBS RUNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
RUN_TIMEOUT=${RUN_TIMEOUT:-$((300 + JOBS / 100))}
[[ $RUN_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "RUN_TIMEOUT must be a positive integer, not '$RUN_TIMEOUT'"
for c in $CONCURRENCIES; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CONCURRENCIES must be positive integers, not '$c'"
done
[[ -n ${CONCURRENCIES// /} ]] || die "CONCURRENCIES is empty"

if [[ ! -x $HARNESS && $HARNESS == target/release/harness && -x $HERE/../../target/release/harness ]]; then
    HARNESS=$HERE/../../target/release/harness
fi
[[ -x $HARNESS ]] || die "no harness binary at $HARNESS: build it (cargo build --release) or set HARNESS"
HARNESS=$(cd "$(dirname "$HARNESS")" && pwd)/$(basename "$HARNESS")
command -v node >/dev/null || die "node (>= 18) is needed for graphile-worker"
command -v npm >/dev/null || die "npm is needed to install graphile-worker"
command -v flock >/dev/null || die "flock (util-linux) is needed"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"

# --- graphile-worker, pinned in package.json / package-lock.json --------------------------
wanted=$(node -p 'require(process.argv[1]).dependencies["graphile-worker"]' "$HERE/package.json")
installed=$(node -p 'try { require(process.argv[1]).version } catch { "" }' \
    "$HERE/node_modules/graphile-worker/package.json")
if [[ $installed != "$wanted" ]]; then
    echo "installing graphile-worker $wanted into $HERE/node_modules ..." >&2
    if [[ -f $HERE/package-lock.json ]]; then
        (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) >&2
    else
        (cd "$HERE" && npm install --no-audit --no-fund --loglevel=error) >&2
    fi
fi

query() { DATABASE_URL=$URL node "$HERE/query.mjs" "$1" 9>&-; }

# --- the PostgreSQL server ----------------------------------------------------------------
STARTED_PRIVATE=""
HOME_DIR=""
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/peers.XXXXXX")
CHILD=""
cleanup() {
    local rc=$?
    set +e
    if [[ -n $CHILD ]]; then
        # A run in progress: stop its process group (timeout's; the bench and its replica).
        kill -TERM -- "-$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    rm -rf "$SCRATCH"
    if [[ -n ${URL:-} ]]; then
        query "DROP DATABASE IF EXISTS $GRAPHILE_DB WITH (FORCE)" >/dev/null 2>&1
    fi
    if [[ -n $HOME_DIR ]]; then
        exec 9>&-
        if [[ -n $STARTED_PRIVATE ]]; then
            # Stop the private server we started (`down` refuses if others use it meanwhile).
            env -u DATABASE_URL HARNESS_HOME="$HOME_DIR" "$HARNESS" down >&2 ||
                echo "run.sh: left the private PostgreSQL under $HOME_DIR running" >&2
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${DATABASE_URL:-} ]]; then
    URL=$DATABASE_URL
else
    # harness's own fallback: a private PostgreSQL under the home ($HARNESS_HOME, or `home:` of
    # its config file, default .harness). It listens on its Unix socket only (<home>/pg, port
    # number in <home>/pg.port) and admits this OS account as role `postgres` (peer
    # authentication); harness connects to it with
    #   postgres://postgres@localhost/<db>?host=<home>/pg&port=<pg.port>
    # (PrivateServer::url in src/db/private.rs). It stops when its last user leaves, so this
    # script holds a shared lock on <home>/pg.users (as every harness process does) for as long
    # as it uses it.
    unset DATABASE_URL
    HOME_DIR=$("$HARNESS" config 2>/dev/null | sed -n 's/^home: *//p' | sed "s/^['\"]//; s/['\"]$//")
    HOME_DIR=${HOME_DIR:-${HARNESS_HOME:-.harness}}
    mkdir -p "$HOME_DIR"
    HOME_DIR=$(cd "$HOME_DIR" && pwd -P)
    pid=$(head -n1 "$HOME_DIR/pg/postmaster.pid" 2>/dev/null || true)
    if [[ -f $HOME_DIR/pg.port && -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        echo "using the running private PostgreSQL under $HOME_DIR" >&2
    else
        STARTED_PRIVATE=1
        echo "DATABASE_URL is not set: starting harness's private PostgreSQL under $HOME_DIR" >&2
    fi
    exec 9>>"$HOME_DIR/pg.users"
    flock -s 9
    if ! HARNESS_HOME=$HOME_DIR "$HARNESS" migrate >&2 9>&-; then
        die "\`$HARNESS migrate\` could not start a private PostgreSQL under $HOME_DIR (see above).
Either install the PostgreSQL server binaries (e.g. apt-get install postgresql) so that harness
can run one, or set DATABASE_URL to a server of your own as a role that may create databases,
e.g. DATABASE_URL=postgres://postgres:secret@localhost:5432/postgres"
    fi
    [[ -f $HOME_DIR/pg.port ]] || die "no $HOME_DIR/pg.port after \`harness migrate\`"
    socket=$(node -p 'encodeURIComponent(process.argv[1])' "$HOME_DIR/pg")
    URL="postgres://postgres@localhost/harness?host=$socket&port=$(cat "$HOME_DIR/pg.port")"
fi
pg_version=$(query "SELECT version()") ||
    die "cannot connect to PostgreSQL with DATABASE_URL (see above); set DATABASE_URL to a server, as a role that may create databases"

# --- where `harness bench` runs ---------------------------------------------------------
# Builds before 2026-12-02 left the bench's replica (`harness serve --no-api`) on api.bind
# (127.0.0.1:8080 by default) for health and metrics, with HARNESS_* stripped from its
# environment: with that port taken (a `harness up` on this machine, another bench) the
# replica exited at once and the bench waited up to 10 minutes. Newer builds give it a free
# port themselves. So that older builds can be compared too, unless the user has a config of
# their own, the bench runs in a scratch directory whose harness.yml only moves api.bind to a
# free port (the replica reads ./harness.yml).
if [[ -z ${HARNESS_CONFIG:-} && ! -e harness.yml ]]; then
    BENCH_DIR=$SCRATCH
    printf 'api:\n  bind: 127.0.0.1:0\n' >"$BENCH_DIR/harness.yml"
else
    BENCH_DIR=$PWD
    echo "note: harness bench uses your configuration (HARNESS_CONFIG or ./harness.yml)" >&2
fi
if [[ -n ${HARNESS_HOME:-} ]]; then
    BENCH_HOME=$(mkdir -p "$HARNESS_HOME" && cd "$HARNESS_HOME" && pwd -P)
else
    BENCH_HOME=$SCRATCH/.harness
fi

# --- the machine --------------------------------------------------------------------------
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n1)
harness_version=$("$HARNESS" --version 2>/dev/null || echo unknown)
graphile_version=$(node -p 'require(process.argv[1]).version' "$HERE/node_modules/graphile-worker/package.json")
node_version=$(node --version)
cat <<EOF
machine:     $(nproc) CPUs, ${cpu_model:-unknown CPU}
PostgreSQL:  $pg_version
harness:     $harness_version ($HARNESS)
graphile:    graphile-worker $graphile_version on node $node_version
workload:    $JOBS no-op jobs per run, $RUNS run(s) per side, concurrencies: $CONCURRENCIES
EOF

: >"$LOG"
node -e 'console.log(JSON.stringify({kind: "machine", cpus: +process.argv[1], cpu_model: process.argv[2],
    postgres: process.argv[3], harness: process.argv[4], graphile_worker: process.argv[5],
    node: process.argv[6], jobs: +process.argv[7], runs: +process.argv[8],
    harness_bench_args: process.argv[9], started_at: new Date().toISOString()}))' \
    "$(nproc)" "$cpu_model" "$pg_version" "$harness_version" "$graphile_version" "$node_version" \
    "$JOBS" "$RUNS" "$HARNESS_BENCH_ARGS" >"$RESULTS"

# Runs one measurement: the command in the background with stdout to $SCRATCH/out, under
# `timeout` (which puts it in a process group of its own: the terminal's Ctrl-C does not reach
# it, so cleanup stops it), then appends its JSON, tagged, to the results and prints the rate.
measure() { # side concurrency run command...
    local side=$1 c=$2 run=$3 rc=0
    shift 3
    echo "== $side concurrency $c run $run" >>"$LOG"
    timeout --kill-after=30 "$RUN_TIMEOUT" "$@" >"$SCRATCH/out" 2>>"$LOG" 9>&- &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    if ((rc != 0)); then
        local why="exited with $rc"
        ((rc == 124 || rc == 137)) && why="took over RUN_TIMEOUT=${RUN_TIMEOUT}s"
        die "$side $why (concurrency $c, run $run); the end of $LOG:
$(tail -n 20 "$LOG")"
    fi
    node -e '
        const [side, c, run, file, results] = process.argv.slice(1);
        const fs = require("fs");
        const line = fs.readFileSync(file, "utf8").split("\n").filter((l) => l.startsWith("{")).pop();
        if (!line) { console.error(`run.sh: no JSON on the stdout of ${side}`); process.exit(1); }
        const r = { kind: "run", side, concurrency: +c, run: +run, ...JSON.parse(line) };
        r.side = side;
        if (typeof r.process_per_s !== "number") { console.error(`run.sh: no process_per_s from ${side}`); process.exit(1); }
        fs.appendFileSync(results, JSON.stringify(r) + "\n");
        console.log(Math.round(r.process_per_s));
    ' "$side" "$c" "$run" "$SCRATCH/out" "$RESULTS" >"$SCRATCH/rate"
}

run_graphile() { # concurrency run
    measure graphile-worker "$1" "$2" env DATABASE_URL="$URL" JOBS="$JOBS" CONCURRENCY="$1" \
        DB_NAME="$GRAPHILE_DB" node "$HERE/graphile.mjs"
    G=$(cat "$SCRATCH/rate")
}

run_harness() { # concurrency run
    # shellcheck disable=SC2086 # HARNESS_BENCH_ARGS is word-split on purpose
    measure harness "$1" "$2" env -C "$BENCH_DIR" DATABASE_URL="$URL" HARNESS_HOME="$BENCH_HOME" \
        "$HARNESS" bench --concurrency "$1" --tasks "$JOBS" --json $HARNESS_BENCH_ARGS
    H=$(cat "$SCRATCH/rate")
}

for c in $CONCURRENCIES; do
    for ((r = 1; r <= RUNS; r++)); do
        # Interleaved, alternating which goes first, so both see the same machine state.
        if ((r % 2)); then
            run_graphile "$c" "$r"
            run_harness "$c" "$r"
        else
            run_harness "$c" "$r"
            run_graphile "$c" "$r"
        fi
        printf 'concurrency %-4s run %d/%d: graphile-worker %7s jobs/s   harness %7s jobs/s\n' \
            "$c" "$r" "$RUNS" "$G" "$H"
    done
done

node "$HERE/report.mjs" "$RESULTS"
echo
echo "results: $RESULTS (stderr of the runs: $LOG)"
