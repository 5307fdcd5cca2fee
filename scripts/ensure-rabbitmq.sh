#!/usr/bin/env bash
# Makes sure RabbitMQ answers on 127.0.0.1:5672; starts it (detached) if not.
# Exits non-zero if it cannot get it up within the bound (default 60 s, RABBITMQ_WAIT_SECS).
set -u
HOST=127.0.0.1
PORT=5672
WAIT_SECS=${RABBITMQ_WAIT_SECS:-60}

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

if port_open; then
  echo "rabbitmq: already listening on $HOST:$PORT"
  exit 0
fi

echo "rabbitmq: nothing on $HOST:$PORT; starting it"
if timeout 15 rabbitmqctl ping >/dev/null 2>&1; then
  # The node runs but its application is stopped (e.g. after `rabbitmqctl stop_app`).
  # (`rabbitmqctl status` fails in that state, so it cannot tell the two cases apart.)
  echo "rabbitmq: node is up, application stopped: rabbitmqctl start_app"
  timeout "$WAIT_SECS" rabbitmqctl start_app >/dev/null 2>&1 || true
else
  echo "rabbitmq: node is down: rabbitmq-server -detached"
  rabbitmq-server -detached || { echo "rabbitmq: rabbitmq-server -detached failed" >&2; exit 1; }
fi

# `await_startup` fails at once while the node is not registered yet: wait for `ping` first.
deadline=$((SECONDS + WAIT_SECS))
until timeout 15 rabbitmqctl ping >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "rabbitmq: the node did not come up within ${WAIT_SECS}s" >&2
    exit 1
  fi
  sleep 1
done
remaining=$((deadline - SECONDS))
[ "$remaining" -lt 5 ] && remaining=5
if ! timeout "$remaining" rabbitmqctl await_startup --timeout "$remaining" >/dev/null 2>&1; then
  echo "rabbitmq: did not finish starting within ${WAIT_SECS}s" >&2
  exit 1
fi

for _ in $(seq 1 "$WAIT_SECS"); do
  if port_open; then
    echo "rabbitmq: up on $HOST:$PORT"
    exit 0
  fi
  sleep 1
done
echo "rabbitmq: started but $HOST:$PORT does not accept connections" >&2
exit 1
