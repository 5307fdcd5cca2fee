//! The heartbeat (`heartbeat_max_secs`): a delivery held past its visibility timeout stays
//! invisible to other consumers while the heartbeat extends it, up to the configured maximum;
//! then it comes back. A longer `extend` is not cut short by it.

mod common;

use std::time::{Duration, Instant};

use spindle_core::{
    Admin, Broker, Error, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};

/// The visibility timeout (the subscriptions' ack timeout) and the heartbeat's maximum.
const VISIBILITY: Duration = Duration::from_secs(3);
const MAX: Duration = Duration::from_secs(9);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_long_handler_s_message_until_its_maximum() {
    if !common::moto_available("heartbeat_keeps_a_long_handler_s_message_until_its_maximum").await {
        return;
    }
    for mode in ["queue", "fanout"] {
        let topic = common::unique("sp-heartbeat");
        let group = common::unique("g");
        let options = SubscribeOptions::default().with_ack_timeout(VISIBILITY);
        let beating = spindle_sqs::connect(
            &spindle_core::Config::parse(&common::url(mode))
                .unwrap()
                .with_option("heartbeat_max_secs", MAX.as_secs().to_string()),
        )
        .await
        .expect("connect");
        beating.ensure_topic(&topic).await.unwrap();
        beating
            .ensure_group(&topic, &group, &GroupPolicy::default())
            .await
            .unwrap();
        // Prefetch 2: while it holds both messages, this subscription cannot take one again.
        let mut held_sub = beating
            .subscribe(&topic, &group, options.clone().with_prefetch(2))
            .await
            .unwrap();
        for id in ["job-1", "job-2"] {
            beating
                .publish(&topic, Message::new("long work").with_id(id))
                .await
                .unwrap();
        }
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(common::next(&mut held_sub).await);
        }
        let received_at = Instant::now();
        // job-2's handler asks for longer than the heartbeat's maximum.
        let extended = held
            .iter()
            .position(|d| d.message().id() == "job-2")
            .unwrap();
        held[extended]
            .extend(MAX + Duration::from_secs(10))
            .await
            .unwrap();

        // Another consumer of the group, without a heartbeat, polls meanwhile: nothing for
        // twice the visibility timeout, then job-1 once the maximum has passed.
        let other = common::broker(mode).await.expect("connect");
        let mut other_sub = other
            .subscribe(&topic, &group, options.clone())
            .await
            .unwrap();
        let early = tokio::time::timeout(VISIBILITY * 2, other_sub.next_delivery()).await;
        assert!(
            early.is_err(),
            "{mode}: a held message came back after {:?}, though the heartbeat extends it",
            received_at.elapsed()
        );
        let again = common::next(&mut other_sub).await;
        let waited = received_at.elapsed();
        assert!(
            waited >= MAX - Duration::from_secs(1)
                && waited <= MAX + VISIBILITY + Duration::from_secs(2),
            "{mode}: came back after {waited:?}; the heartbeat's maximum is {MAX:?}"
        );
        assert_eq!(again.message().id(), "job-1");
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
        // job-2 is still extended: nothing more for a while.
        let more = tokio::time::timeout(VISIBILITY, other_sub.next_delivery()).await;
        assert!(
            more.is_err(),
            "{mode}: the extended message came back after {:?}",
            received_at.elapsed()
        );
        held.remove(extended).ack().await.unwrap();
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
