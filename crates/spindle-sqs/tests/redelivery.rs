//! A consumer that stops before acking: the message comes back after the visibility timeout
//! (the subscription's ack timeout), to another consumer, as attempt 2.

mod common;

use std::time::{Duration, Instant};

use spindle_core::{Admin, Broker, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_message_returns_after_visibility_timeout() {
    if !common::moto_available("unacked_message_returns_after_visibility_timeout").await {
        return;
    }
    for mode in ["queue", "fanout"] {
        let topic = common::unique("sp-redelivery");
        let group = common::unique("g");
        let ack_timeout = Duration::from_secs(2);
        let options = SubscribeOptions::default().with_ack_timeout(ack_timeout);

        // The first consumer receives the message and "crashes": it never decides, and its
        // broker goes away without returning the message.
        let first = common::broker(mode).await.expect("connect");
        first.ensure_topic(&topic).await.unwrap();
        first
            .ensure_group(&topic, &group, &GroupPolicy::default())
            .await
            .unwrap();
        let mut sub = first
            .subscribe(&topic, &group, options.clone())
            .await
            .unwrap();
        first
            .publish(&topic, Message::new("work").with_id("job-1"))
            .await
            .unwrap();
        let delivery = common::next(&mut sub).await;
        let received_at = Instant::now();
        assert_eq!(delivery.attempt(), 1);
        std::mem::forget(delivery); // a crash: no ack, no nack, no release
        drop(sub);
        first.shutdown().await.unwrap();

        // Another consumer gets it again once the visibility timeout has passed, not before.
        let second = common::broker(mode).await.expect("connect");
        let mut sub = second
            .subscribe(&topic, &group, options.clone())
            .await
            .unwrap();
        let again = common::next(&mut sub).await;
        let waited = received_at.elapsed();
        assert!(
            waited + Duration::from_millis(100) >= ack_timeout,
            "{mode}: came back after {waited:?}, before the visibility timeout {ack_timeout:?}"
        );
        assert_eq!(again.message().id(), "job-1");
        assert_eq!(&again.message().payload()[..], b"work");
        assert_eq!(
            again.attempt(),
            2,
            "{mode}: ApproximateReceiveCount counts the first try"
        );
        again.ack().await.unwrap();
        second.delete_topic(&topic).await.unwrap();
        second.shutdown().await.unwrap();
    }
}
