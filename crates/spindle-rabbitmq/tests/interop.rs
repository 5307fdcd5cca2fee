//! Spindle and plain AMQP clients read each other's messages; quorum queues work too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use spindle_core::{
    Admin, Broker, Config, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
    HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
};

fn unique(what: &str) -> String {
    format!(
        "sp-interop-{what}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

async fn raw_connection() -> Connection {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(&common::url(), props).await.unwrap()
}

async fn spindle(url: &str) -> spindle_rabbitmq::RabbitBroker {
    spindle_rabbitmq::connect(&Config::parse(url).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_message_is_consumed_by_spindle() {
    if !common::broker_available("plain_client_message").await {
        return;
    }
    let broker = spindle(&common::url()).await;
    let (topic, group) = (unique("t"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let mut sub = broker
        .subscribe(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();

    // A plain AMQP publish: no message_id, no Spindle headers, a numeric header.
    let raw = raw_connection().await;
    let ch = raw.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "origin".into(),
        AMQPValue::LongString(LongString::from("legacy")),
    );
    headers.insert("count".into(), AMQPValue::LongInt(42));
    ch.basic_publish(
        &topic,
        "customer-7",
        BasicPublishOptions::default(),
        b"from a plain client",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&d.message().payload()[..], b"from a plain client");
    assert_eq!(d.attempt(), 1);
    assert!(!d.message().id().is_empty());
    assert_eq!(d.message().header("origin"), Some("legacy"));
    assert_eq!(d.message().header("count"), Some("42"));
    assert_eq!(d.message().key(), Some("customer-7"));
    let id = d.message().id().to_string();
    d.nack().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(again.attempt(), 2);
    assert_eq!(
        again.message().id(),
        id,
        "the id given on first delivery sticks"
    );
    assert_eq!(again.message().key(), Some("customer-7"));
    again.ack().await.unwrap();
    raw.close(200, "bye").await.unwrap();
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spindle_message_reads_naturally_in_a_plain_client() {
    if !common::broker_available("spindle_message_in_plain_client").await {
        return;
    }
    let broker = spindle(&common::url()).await;
    let (topic, group) = (unique("t"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, &group, &GroupPolicy::default())
        .await
        .unwrap();
    broker
        .publish(
            &topic,
            Message::new("hello")
                .with_id("order-1")
                .with_key("customer-9")
                .with_content_type("text/plain")
                .with_header("trace", "abc"),
        )
        .await
        .unwrap();

    let raw = raw_connection().await;
    let ch = raw.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            &format!("{topic}.{group}"),
            "plain",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"hello");
    let p = &d.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "order-1");
    assert_eq!(p.content_type().as_ref().unwrap().as_str(), "text/plain");
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(d.routing_key.as_str(), "customer-9");
    let headers = p.headers().as_ref().unwrap();
    match headers.inner().get("trace") {
        Some(AMQPValue::LongString(s)) => assert_eq!(s.as_bytes(), b"abc"),
        other => panic!("trace header: {other:?}"),
    }
    assert!(
        !headers.contains_key(HEADER_ATTEMPT),
        "no attempt header on a first delivery"
    );
    d.ack(BasicAckOptions::default()).await.unwrap();
    raw.close(200, "bye").await.unwrap();
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_nack_and_dead_letter() {
    if !common::broker_available("quorum_queues").await {
        return;
    }
    let broker = Arc::new(spindle(&format!("{}?queue_type=quorum", common::url())).await);
    let (topic, group) = (unique("t"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let mut sub = broker
        .subscribe(
            &topic,
            &group,
            SubscribeOptions::default().with_max_attempts(2),
        )
        .await
        .unwrap();
    broker.publish(&topic, Message::new("q")).await.unwrap();
    for attempt in 1..=2 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.attempt(), attempt);
        d.nack().await.unwrap();
    }
    let mut dlq = broker
        .subscribe_dead_letters(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(10), dlq.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(dead
        .message()
        .header(HEADER_DEAD_LETTER_REASON)
        .unwrap()
        .contains("max attempts"));
    dead.ack().await.unwrap();
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_deleted_behind_our_back_is_not_found_and_the_rest_keeps_working() {
    if !common::broker_available("topic_deleted_behind_our_back").await {
        return;
    }
    let broker = spindle(&common::url()).await;
    let (gone, kept, group) = (unique("gone"), unique("kept"), unique("g"));
    for t in [&gone, &kept] {
        broker.ensure_topic(t).await.unwrap();
        broker
            .ensure_group(t, &group, &GroupPolicy::default())
            .await
            .unwrap();
    }
    broker.publish(&gone, Message::new("1")).await.unwrap();
    // Another client deletes the exchange; this broker still thinks it exists.
    let raw = raw_connection().await;
    let ch = raw.create_channel().await.unwrap();
    ch.exchange_delete(&gone, Default::default()).await.unwrap();
    let err = broker
        .publish(&gone, Message::new("2"))
        .await
        .expect_err("the exchange is gone");
    assert!(
        matches!(err, spindle_core::Error::NotFound { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&gone), "{err}");
    // Checked again, still missing; and other topics are unaffected.
    let err = broker.publish(&gone, Message::new("3")).await.unwrap_err();
    assert!(
        matches!(err, spindle_core::Error::NotFound { .. }),
        "{err:?}"
    );
    broker.publish(&kept, Message::new("4")).await.unwrap();
    raw.close(200, "bye").await.unwrap();
    broker.delete_topic(&kept).await.unwrap();
    broker.delete_group(&gone, &group).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_unyielded_deliveries_without_counting_an_attempt() {
    if !common::broker_available("close_returns_unyielded").await {
        return;
    }
    let broker = spindle(&common::url()).await;
    let (topic, group) = (unique("t"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let mut a = broker
        .subscribe(
            &topic,
            &group,
            SubscribeOptions::default().with_prefetch(10),
        )
        .await
        .unwrap();
    for i in 0..10 {
        broker
            .publish(
                &topic,
                Message::new(format!("m{i}")).with_id(format!("m{i}")),
            )
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            tokio::time::timeout(Duration::from_secs(10), a.next_delivery())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    // Let the other 8 arrive in the prefetch buffer, then close without polling again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.close().await.unwrap();
    let mut b = broker
        .subscribe(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();
    let mut others = std::collections::HashSet::new();
    while others.len() < 8 {
        let d = tokio::time::timeout(Duration::from_secs(10), b.next_delivery())
            .await
            .expect("the unyielded deliveries come back to another consumer")
            .unwrap()
            .unwrap();
        assert_eq!(
            d.attempt(),
            1,
            "returning an unyielded delivery counts no attempt"
        );
        others.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    for d in held {
        assert!(!others.contains(d.message().id()));
        d.ack()
            .await
            .expect("a yielded delivery still acks after close");
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(5), a.next_delivery())
            .await
            .expect("the closed stream ends")
            .is_none()
    );
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}
