//! Sizes are counted in bytes, attributes included, before anything is sent: moto counts
//! characters and ignores attributes, so it would accept these messages.

mod common;

use std::time::Duration;

use spindle_core::{
    Admin, Broker, Error, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_plus_attributes_over_one_mib_is_rejected() {
    if !common::moto_available("payload_plus_attributes_over_one_mib_is_rejected").await {
        return;
    }
    let broker = common::broker("queue").await.expect("connect");
    let topic = common::unique("sp-size");
    let group = "g";
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, group, &GroupPolicy::default())
        .await
        .unwrap();
    let max = broker.capabilities().max_payload_bytes;

    // 2-byte characters: under 1 MiB counted in characters, over it in bytes.
    let payload = "é".repeat(max / 2); // max bytes, max/2 characters
    let header = "é".repeat(150_000); // 300,000 bytes in one attribute
    let message = Message::new(payload.clone()).with_header("big", header);
    assert!(payload.chars().count() + 150_000 < 1024 * 1024);
    match broker.publish(&topic, message).await {
        Err(Error::PayloadTooLarge { size, max }) => {
            assert!(
                size > 1024 * 1024,
                "size {size} counts bytes and attributes"
            );
            assert_eq!(max, 1024 * 1024);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }

    // Many small headers add up too.
    let mut message = Message::new(payload.clone());
    for i in 0..40 {
        message = message.with_header(format!("h{i}"), "x".repeat(8_000));
    }
    assert!(matches!(
        broker.publish(&topic, message).await,
        Err(Error::PayloadTooLarge { .. })
    ));

    // The same payload without the headers fits, and arrives intact.
    broker
        .publish(&topic, Message::new(payload.clone()).with_id("fits"))
        .await
        .expect("a payload at the limit is accepted");
    let mut sub = broker
        .subscribe(&topic, group, SubscribeOptions::default())
        .await
        .unwrap();
    let d = common::next(&mut sub).await;
    assert_eq!(d.message().id(), "fits", "nothing rejected was sent");
    assert_eq!(d.message().payload().len(), payload.len());
    d.ack().await.unwrap();
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_fast_with_a_typed_error() {
    let config = spindle_core::Config::parse(
        "sqs://?endpoint=http://127.0.0.1:9&region=us-east-1&access_key_id=a&secret_access_key=b&timeout_ms=3000&connect_timeout_ms=500",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = spindle_sqs::connect(&config)
        .await
        .expect_err("nothing listens on port 9");
    assert!(
        matches!(err, Error::Connection { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.to_string().contains("b&"), "no secret in {err}");
}

#[tokio::test]
async fn unknown_options_are_rejected_and_secrets_redacted() {
    let config = spindle_core::Config::parse(
        "sqs://?region=us-east-1&secret_access_key=hunter2&access_key_id=a&bogus=1",
    )
    .unwrap();
    let err = spindle_sqs::connect(&config).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("bogus"), "{err}");
    assert!(!format!("{config:?}").contains("hunter2"));
}
