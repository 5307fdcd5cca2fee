#!/usr/bin/env bash
# Starts a moto server (SQS + SNS emulator) on 127.0.0.1:4566 for spindle-sqs's tests.
#
# - The virtualenv lives outside the repository:
#   ${SPINDLE_CACHE_DIR:-$HOME/.cache/spindle}/venv-moto (created and filled if missing).
# - moto_server runs in the background, logging to ${SPINDLE_CACHE_DIR:-...}/moto.log.
# - Idempotent: if something already answers on the port, nothing is done.
# - Waits (bounded, MOTO_WAIT_SECS, default 60) until the server answers; exits non-zero if not.
set -euo pipefail

HOST="${MOTO_HOST:-127.0.0.1}"
PORT="${MOTO_PORT:-4566}"
CACHE_DIR="${SPINDLE_CACHE_DIR:-$HOME/.cache/spindle}"
VENV="$CACHE_DIR/venv-moto"
LOG="$CACHE_DIR/moto.log"
WAIT_SECS="${MOTO_WAIT_SECS:-60}"

answers() {
    # Any HTTP answer from the port means the server is up.
    python3 - "$HOST" "$PORT" <<'PY' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/moto-api/", timeout=2)
except urllib.error.HTTPError:
    pass
PY
}

if answers; then
    echo "moto already answering on $HOST:$PORT"
    exit 0
fi

mkdir -p "$CACHE_DIR"
if [ ! -x "$VENV/bin/moto_server" ]; then
    echo "installing moto[server] into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'moto[server]'
fi

echo "starting moto_server on $HOST:$PORT (log: $LOG)"
nohup "$VENV/bin/moto_server" -H "$HOST" -p "$PORT" >>"$LOG" 2>&1 </dev/null &
echo $! >"$CACHE_DIR/moto.pid"

for _ in $(seq 1 "$WAIT_SECS"); do
    if answers; then
        echo "moto is up on $HOST:$PORT (pid $(cat "$CACHE_DIR/moto.pid"))"
        exit 0
    fi
    sleep 1
done
echo "moto did not answer on $HOST:$PORT within ${WAIT_SECS}s; see $LOG" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
