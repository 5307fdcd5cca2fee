#!/usr/bin/env bash
# Starts every broker the tests use, on this machine: RabbitMQ (127.0.0.1:5672), tansu as the
# Kafka-protocol broker (127.0.0.1:9092) and moto as the SQS/SNS emulator (127.0.0.1:4566).
# Each script installs what is missing and does nothing when its broker already answers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for script in ensure-rabbitmq.sh start-tansu.sh start-moto.sh; do
    if [ -f "$here/$script" ]; then
        bash "$here/$script"
    fi
done
