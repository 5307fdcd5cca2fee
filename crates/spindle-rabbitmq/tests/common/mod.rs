//! Shared by the RabbitMQ integration tests.
#![allow(dead_code)]

use std::time::Duration;

/// The broker every test uses (see /work/shared/reference/brokers.md).
pub const ADDRESS: &str = "127.0.0.1:5672";
/// Where to connect, overridable with `SPINDLE_RABBITMQ_URL`.
pub fn url() -> String {
    std::env::var("SPINDLE_RABBITMQ_URL")
        .unwrap_or_else(|_| format!("amqp://guest:guest@{ADDRESS}/%2f"))
}

/// Whether RabbitMQ listens. When it does not: under CI=true this panics, elsewhere it says so
/// loudly and the caller returns (skips).
pub async fn broker_available(test: &str) -> bool {
    let probe = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(ADDRESS),
    )
    .await;
    if matches!(probe, Ok(Ok(_))) {
        return true;
    }
    if spindle_contract::running_in_ci() {
        panic!("{test}: RabbitMQ is not reachable at {ADDRESS}, and CI=true requires it");
    }
    eprintln!("SKIPPED {test}: RabbitMQ is not reachable at {ADDRESS} (this fails under CI=true)");
    false
}

async fn rabbitmqctl(args: &[&str]) {
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .args(args)
            .status(),
    )
    .await;
    match status {
        Ok(Ok(s)) if s.success() => {}
        other => panic!("rabbitmqctl {args:?} failed: {other:?}"),
    }
}

/// Stops and starts the RabbitMQ application, then waits until it accepts connections.
pub async fn restart_rabbitmq() {
    rabbitmqctl(&["stop_app"]).await;
    rabbitmqctl(&["start_app"]).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < until {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(ADDRESS),
        )
        .await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("RabbitMQ did not accept connections within 60 s of start_app");
}
