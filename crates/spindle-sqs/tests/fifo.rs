//! FIFO queues (`.fifo` topics): the key is the MessageGroupId, the id the deduplication id.

mod common;

use std::time::Duration;

use spindle_core::{
    Admin, Broker, Error, GroupPolicy, Message, PublishOptions, Publisher, SubscribeOptions,
    Subscriber,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_topic_keeps_key_order_and_dedups_ids() {
    if !common::moto_available("fifo_topic_keeps_key_order_and_dedups_ids").await {
        return;
    }
    let broker = common::broker("queue").await.expect("connect");
    let topic = format!("{}.fifo", common::unique("sp-fifo"));
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, "g", &GroupPolicy::default())
        .await
        .unwrap();
    for i in 0..5 {
        broker
            .publish(
                &topic,
                Message::new(format!("{i}"))
                    .with_key("order-1")
                    .with_id(format!("m{i}")),
            )
            .await
            .unwrap();
    }
    // The same id again is deduplicated by SQS.
    broker
        .publish(
            &topic,
            Message::new("dup").with_key("order-1").with_id("m0"),
        )
        .await
        .unwrap();
    let err = broker
        .publish_with(
            &topic,
            Message::new("late"),
            &PublishOptions::delayed(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");

    let mut sub = broker
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        let d = common::next(&mut sub).await;
        assert_eq!(d.message().id(), format!("m{i}"), "in key order");
        assert_eq!(d.message().key(), Some("order-1"));
        d.ack().await.unwrap();
    }
    let extra = tokio::time::timeout(Duration::from_secs(2), sub.next_delivery()).await;
    assert!(
        extra.is_err(),
        "the duplicate id was not delivered: {extra:?}"
    );
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
}
