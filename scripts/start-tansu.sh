#!/usr/bin/env bash
# Starts tansu (a Kafka-protocol broker) on 127.0.0.1:9092 for spindle-kafka's tests.
#
# Usage: scripts/start-tansu.sh [start|stop|restart|status]   (default: start)
#
# - Installs tansu with `cargo install tansu --locked --features libsql` if it is not on PATH
#   (about 9 minutes on 2 cores).
# - Data (SQLite file tansu.db), pid file and log live outside the repository, in
#   ${SPINDLE_DATA_DIR:-/tmp/spindle-tansu}; the log is tansu.log there.
# - start is idempotent: if something already accepts connections on the port, nothing is done.
# - Every wait is bounded (TANSU_WAIT_SECS, default 60); a failure exits non-zero with the log tail.
# - stop only stops the tansu this script started (its pid file), never other processes.
# - tansu 0.6.0's SQLite schema has no index on the `header` table, so every fetched record
#   scans all stored headers: reading a backlog gets quadratically slow (20 000 records took
#   minutes and timed out). Once tansu has created its schema, this script adds
#   `spindle_header_topition_offset` on header (topition, offset_id) (needs python3).
set -euo pipefail

HOST="${TANSU_HOST:-127.0.0.1}"
PORT="${TANSU_PORT:-9092}"
DATA_DIR="${SPINDLE_DATA_DIR:-/tmp/spindle-tansu}"
LOG="$DATA_DIR/tansu.log"
PID_FILE="$DATA_DIR/tansu.pid"
WAIT_SECS="${TANSU_WAIT_SECS:-60}"
MODE="${1:-start}"

listening() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" >/dev/null 2>&1
}

ensure_installed() {
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! command -v tansu >/dev/null 2>&1; then
        echo "installing tansu (cargo install tansu --locked --features libsql)"
        cargo install tansu --locked --features libsql
    fi
}

start() {
    if listening; then
        echo "tansu: something already accepts connections on $HOST:$PORT"
        if [ -f "$DATA_DIR/tansu.db" ]; then add_header_index || true; fi
        return 0
    fi
    ensure_installed
    mkdir -p "$DATA_DIR"
    echo "starting tansu on $HOST:$PORT (data: $DATA_DIR/tansu.db, log: $LOG)"
    # The SQLite path is relative to the working directory: an absolute one gets doubled.
    (
        cd "$DATA_DIR"
        nohup tansu broker \
            --listener-url "tcp://$HOST:$PORT" \
            --advertised-listener-url "tcp://$HOST:$PORT" \
            --storage-engine "sqlite://tansu.db" >>"$LOG" 2>&1 </dev/null &
        echo $! >"$PID_FILE"
    )
    for _ in $(seq 1 $((WAIT_SECS * 5))); do
        if listening; then
            echo "tansu is up on $HOST:$PORT (pid $(cat "$PID_FILE"))"
            add_header_index
            return 0
        fi
        if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
            echo "tansu exited during start-up; see $LOG" >&2
            tail -n 20 "$LOG" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    echo "tansu did not accept connections on $HOST:$PORT within ${WAIT_SECS}s; see $LOG" >&2
    tail -n 20 "$LOG" >&2 || true
    return 1
}

add_header_index() {
    # tansu creates its schema at start-up; wait (bounded) for the header table, then index it.
    python3 - "$DATA_DIR/tansu.db" "$WAIT_SECS" <<'PY'
import sqlite3, sys, time
path, wait = sys.argv[1], int(sys.argv[2])
deadline = time.time() + wait
while True:
    try:
        db = sqlite3.connect(path, timeout=10)
        if db.execute("select 1 from sqlite_master where type='table' and name='header'").fetchone():
            db.execute("create index if not exists spindle_header_topition_offset on header (topition, offset_id)")
            db.commit()
            print("tansu: header index in place")
            break
        db.close()
    except sqlite3.Error as e:
        if time.time() > deadline:
            sys.exit(f"tansu: could not add the header index: {e}")
    if time.time() > deadline:
        sys.exit("tansu: header table not created in time; index not added")
    time.sleep(0.2)
PY
}

stop() {
    if [ ! -f "$PID_FILE" ]; then
        echo "tansu: no pid file in $DATA_DIR; nothing this script started is running"
        return 0
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 $((WAIT_SECS * 5))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "tansu (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PID_FILE"
    for _ in $(seq 1 $((WAIT_SECS * 5))); do
        listening || { echo "tansu stopped"; return 0; }
        sleep 0.2
    done
    echo "port $HOST:$PORT still accepts connections after stopping tansu" >&2
    return 1
}

case "$MODE" in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    status)
        if listening; then echo "tansu: listening on $HOST:$PORT"; else echo "tansu: not listening"; exit 1; fi
        ;;
    *)
        echo "usage: $0 [start|stop|restart|status]" >&2
        exit 2
        ;;
esac
