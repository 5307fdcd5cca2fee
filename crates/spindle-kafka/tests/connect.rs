//! Connecting: typed, bounded failures without a broker.

use std::time::{Duration, Instant};

use spindle_core::{Config, Error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_with_connection_error_in_bounded_time() {
    // Port 9 (discard) on loopback: nothing listens there.
    let config = Config::parse("kafka://127.0.0.1:9?connect_timeout_ms=1500").unwrap();
    let started = Instant::now();
    let err = spindle_kafka::connect(&config)
        .await
        .expect_err("nothing listens on port 9");
    assert!(matches!(err, Error::Connection { .. }), "got {err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unknown_option_is_rejected_naming_it() {
    let config = Config::parse("kafka://127.0.0.1:9092?lingerr_ms=5").unwrap();
    let err = spindle_kafka::connect(&config).await.expect_err("typo");
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("lingerr_ms"), "{err}");
}

#[tokio::test]
async fn password_never_shows() {
    let config =
        Config::parse("kafka://app:hunter2@127.0.0.1:9?connect_timeout_ms=500&partitions=x")
            .unwrap();
    let err = spindle_kafka::connect(&config)
        .await
        .expect_err("bad option");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}
