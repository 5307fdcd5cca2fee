//! The heartbeat (`heartbeat_max_secs`): a delivery held past its visibility timeout stays
//! invisible to other consumers while the heartbeat extends it, up to the configured maximum;
//! then it comes back.

mod common;

use std::time::{Duration, Instant};

use spindle_core::{
    Admin, Broker, Error, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_long_handler_s_message_until_its_maximum() {
    if !common::moto_available("heartbeat_keeps_a_long_handler_s_message_until_its_maximum").await {
        return;
    }
    for mode in ["queue", "fanout"] {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let topic = format!("sp-heartbeat-{}", &run[..8]);
        let group = format!("g-{}", &run[..8]);
        // Visibility 2 s; the heartbeat keeps a held delivery invisible for 6 s.
        let options = SubscribeOptions::default().with_ack_timeout(Duration::from_secs(2));
        let beating = spindle_sqs::connect(
            &spindle_core::Config::parse(&common::url(mode))
                .unwrap()
                .with_option("heartbeat_max_secs", "6"),
        )
        .await
        .expect("connect");
        beating.ensure_topic(&topic).await.unwrap();
        beating
            .ensure_group(&topic, &group, &GroupPolicy::default())
            .await
            .unwrap();
        // Prefetch 1: while it holds the message, this subscription cannot take it again.
        let mut held_sub = beating
            .subscribe(&topic, &group, options.clone().with_prefetch(1))
            .await
            .unwrap();
        beating
            .publish(&topic, Message::new("long work").with_id("job-1"))
            .await
            .unwrap();
        let held = tokio::time::timeout(Duration::from_secs(15), held_sub.next_delivery())
            .await
            .expect("a delivery")
            .expect("stream open")
            .expect("no error");
        let received_at = Instant::now();

        // Another consumer of the group, without a heartbeat, polls meanwhile.
        let other = common::broker(mode).await.expect("connect");
        let mut other_sub = other
            .subscribe(&topic, &group, options.clone())
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_secs(4), other_sub.next_delivery()).await;
        assert!(
            early.is_err(),
            "{mode}: the held message came back after {:?}, though the heartbeat extends it",
            received_at.elapsed()
        );
        // Past the heartbeat's maximum it is left to come back.
        let again = tokio::time::timeout(Duration::from_secs(15), other_sub.next_delivery())
            .await
            .expect("redelivered once the heartbeat's maximum has passed")
            .expect("stream open")
            .expect("no error");
        let waited = received_at.elapsed();
        assert!(
            waited >= Duration::from_secs(6),
            "{mode}: came back after {waited:?}, before the heartbeat's maximum of 6 s"
        );
        assert_eq!(again.message().id(), "job-1");
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
        drop(held);
        drop(held_sub);
        other.shutdown().await.unwrap();
        beating.delete_topic(&topic).await.unwrap();
        beating.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn heartbeat_max_is_checked() {
    for (value, wanted) in [("43201", "at most 43200"), ("soon", "heartbeat_max_secs")] {
        let config = spindle_core::Config::parse(&common::url("queue"))
            .unwrap()
            .with_option("heartbeat_max_secs", value);
        let err = spindle_sqs::connect(&config).await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(err.to_string().contains(wanted), "{err}");
    }
}
