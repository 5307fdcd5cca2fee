//! Memory-specific behaviour beyond the shared contract.

use std::time::Duration;

use bytes::Bytes;
use spindle_core::{
    Admin, Broker, Config, Error, GroupPolicy, Message, PublishOptions, Publisher,
    SubscribeOptions, Subscriber, HEADER_DEAD_LETTER_REASON,
};
use spindle_memory::{MemoryBroker, MemorySettings};

/// A broker with topic `t` and group `g` (default policy).
async fn broker_with_group() -> MemoryBroker {
    let b = MemoryBroker::new();
    b.ensure_topic("t").await.unwrap();
    b.ensure_group("t", "g", &GroupPolicy::default())
        .await
        .unwrap();
    b
}

/// A broker with topic `t`, and a subscription of group `g` (default options).
async fn subscribed() -> (MemoryBroker, spindle_core::Subscription) {
    let b = MemoryBroker::new();
    b.ensure_topic("t").await.unwrap();
    let sub = b
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    (b, sub)
}

async fn recv(sub: &mut spindle_core::Subscription) -> spindle_core::Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("no error")
}

#[test]
fn settings_from_config() {
    let c = Config::parse("memory://?max_payload_bytes=10&max_delay_ms=2000&tick_ms=3").unwrap();
    let s = MemorySettings::from_config(&c).unwrap();
    assert_eq!(s.max_payload_bytes, 10);
    assert_eq!(s.max_delay, Duration::from_secs(2));
    assert_eq!(s.tick, Duration::from_millis(3));
    let err =
        MemorySettings::from_config(&Config::parse("memory://?tick_ms=0").unwrap()).unwrap_err();
    assert!(err.to_string().contains("tick_ms"), "{err}");
    let err = MemorySettings::from_config(&Config::parse("amqp://h").unwrap()).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)));
}

#[tokio::test]
async fn dead_letter_queue_cannot_dead_letter_again() {
    let (b, mut sub) = subscribed().await;
    b.publish("t", Message::new("x")).await.unwrap();
    recv(&mut sub).await.dead_letter("bad").await.unwrap();
    let mut dlq = b
        .subscribe_dead_letters("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = recv(&mut dlq).await;
    assert!(matches!(
        d.dead_letter("again").await,
        Err(Error::Unsupported { .. })
    ));
    // Refused, not lost: it is delivered again from the dead-letter queue.
    let again = recv(&mut dlq).await;
    assert_eq!(
        again.message().header(HEADER_DEAD_LETTER_REASON),
        Some("bad")
    );
    again.ack().await.unwrap();
}

#[tokio::test]
async fn redrive_strips_dead_letter_headers() {
    let (b, mut sub) = subscribed().await;
    b.publish("t", Message::new("x").with_header("keep", "me"))
        .await
        .unwrap();
    recv(&mut sub).await.dead_letter("bad").await.unwrap();
    assert_eq!(b.redrive("t", "g").await.unwrap(), 1);
    let d = recv(&mut sub).await;
    assert_eq!(d.message().header("keep"), Some("me"));
    assert_eq!(d.message().header(HEADER_DEAD_LETTER_REASON), None);
    d.ack().await.unwrap();
    assert_eq!(b.depth("t", "g").await.unwrap().dead_lettered, 0);
}

#[tokio::test]
async fn delayed_nack_of_a_key_holds_back_that_key_only() {
    let (b, mut sub) = subscribed().await;
    for (key, n) in [("a", 1), ("a", 2), ("b", 1)] {
        b.publish("t", Message::new(format!("{key}{n}")).with_key(key))
            .await
            .unwrap();
    }
    let a1 = recv(&mut sub).await;
    assert_eq!(&a1.message().payload()[..], b"a1");
    a1.nack_after(Duration::from_millis(200)).await.unwrap();
    // b1 is free to go; a2 must wait behind the delayed a1.
    let next = recv(&mut sub).await;
    assert_eq!(&next.message().payload()[..], b"b1");
    next.ack().await.unwrap();
    let again = recv(&mut sub).await;
    assert_eq!(
        &again.message().payload()[..],
        b"a1",
        "a1 comes back before a2"
    );
    again.ack().await.unwrap();
    let a2 = recv(&mut sub).await;
    assert_eq!(&a2.message().payload()[..], b"a2");
    a2.ack().await.unwrap();
}

/// Small payloads are copied into a buffer their topic shares among them (so the publisher's
/// allocation is freed on its own thread); a message that waits out of publish order gets an
/// allocation of its own back, so it does not keep the rest of that buffer alive.
#[tokio::test]
async fn small_payloads_share_a_buffer_until_they_wait_out_of_order() {
    let (b, mut sub) = subscribed().await;
    let sent = Bytes::from(vec![1u8; 64]);
    b.publish("t", Message::new(sent.clone())).await.unwrap();
    b.publish("t", Message::new(vec![2u8; 64])).await.unwrap();

    let first = recv(&mut sub).await;
    let payload = first.message().payload();
    assert_eq!(payload, &sent);
    assert_ne!(payload.as_ptr(), sent.as_ptr(), "a small payload is copied");
    assert!(!payload.is_unique(), "it shares the topic's buffer");
    // Long enough that the second delivery comes first even on a busy machine.
    first.nack_after(Duration::from_millis(500)).await.unwrap();
    let second = recv(&mut sub).await;
    assert_eq!(&second.message().payload()[..], &[2u8; 64][..]);
    second.dead_letter("bad").await.unwrap();

    let retried = recv(&mut sub).await;
    assert_eq!(retried.attempt(), 2);
    assert_eq!(retried.message().payload(), &sent);
    assert!(retried.message().payload().is_unique(), "a delayed retry");
    retried.ack().await.unwrap();
    let mut dlq = b
        .subscribe_dead_letters("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let dead = recv(&mut dlq).await;
    assert_eq!(&dead.message().payload()[..], &[2u8; 64][..]);
    assert!(dead.message().payload().is_unique(), "a dead letter");
    dead.ack().await.unwrap();
}

/// A topic that no one publishes to lets its payload buffer go: the next small payload lands
/// in a new buffer, not next to the last one.
#[tokio::test]
async fn an_idle_topic_lets_its_payload_buffer_go() {
    let (b, mut sub) = subscribed().await;
    let mut received = Vec::new();
    for pause in [Duration::ZERO, Duration::from_millis(2500)] {
        tokio::time::sleep(pause).await;
        b.publish("t", Message::new(vec![7u8; 16])).await.unwrap();
        let d = recv(&mut sub).await;
        received.push(d.message().payload().clone());
        d.ack().await.unwrap();
    }
    b.publish("t", Message::new(vec![8u8; 16])).await.unwrap();
    let d = recv(&mut sub).await;
    received.push(d.message().payload().clone());
    d.ack().await.unwrap();
    let at = |i: usize| received[i].as_ptr() as usize;
    assert_ne!(at(0) + 16, at(1), "after a pause the buffer was let go");
    assert_eq!(at(1) + 16, at(2), "without a pause the buffer is kept");
}

/// Large payloads, and those of messages that may wait out of order from the start (keyed,
/// delayed), are delivered as published: never copied.
#[tokio::test]
async fn large_keyed_and_delayed_payloads_are_not_copied() {
    let (b, mut sub) = subscribed().await;
    let large = Bytes::from(vec![3u8; 64 * 1024]);
    let keyed = Bytes::from(vec![4u8; 64]);
    let delayed = Bytes::from(vec![5u8; 64]);
    b.publish("t", Message::new(large.clone())).await.unwrap();
    b.publish("t", Message::new(keyed.clone()).with_key("k"))
        .await
        .unwrap();
    let options = PublishOptions::delayed(Duration::from_millis(20));
    b.publish_with("t", Message::new(delayed.clone()), &options)
        .await
        .unwrap();
    let mut sent = vec![(large, "large"), (keyed, "keyed"), (delayed, "delayed")];
    while !sent.is_empty() {
        // Keyed and unkeyed messages are not ordered with each other: match by content.
        let got = recv(&mut sub).await;
        let payload = got.message().payload().clone();
        let i = sent.iter().position(|(p, _)| *p == payload).expect("sent");
        let (p, what) = sent.remove(i);
        assert_eq!(payload.as_ptr(), p.as_ptr(), "{what}");
        got.ack().await.unwrap();
    }
}

#[tokio::test]
async fn purge_releases_a_key_held_by_a_delayed_nack() {
    let (b, mut sub) = subscribed().await;
    b.publish("t", Message::new("k1").with_key("k"))
        .await
        .unwrap();
    recv(&mut sub)
        .await
        .nack_after(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(b.purge("t", "g").await.unwrap(), 1);
    b.publish("t", Message::new("k2").with_key("k"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        &d.message().payload()[..],
        b"k2",
        "the key is free after the purge"
    );
    d.ack().await.unwrap();
}

#[tokio::test]
async fn ensure_group_updates_policy_and_validates() {
    let b = MemoryBroker::new();
    b.ensure_topic("t").await.unwrap();
    b.ensure_group("t", "g", &GroupPolicy::max_attempts(1))
        .await
        .unwrap();
    let mut sub = b
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    b.publish("t", Message::new("once")).await.unwrap();
    recv(&mut sub).await.nack().await.unwrap();
    assert_eq!(
        b.depth("t", "g").await.unwrap().dead_lettered,
        1,
        "one attempt only"
    );
    assert!(b
        .ensure_group("missing", "g", &GroupPolicy::default())
        .await
        .is_err());
}

#[tokio::test]
async fn delete_group_ends_its_streams_and_unroutes() {
    let (b, mut sub) = subscribed().await;
    b.delete_group("t", "g").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
        .await
        .unwrap();
    assert!(end.is_none());
    assert!(matches!(
        b.publish("t", Message::new("x")).await,
        Err(Error::Unroutable { .. })
    ));
    b.delete_topic("t").await.unwrap();
    assert!(matches!(
        b.delete_topic("t").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn dropping_the_broker_stops_its_sweeper() {
    let b = MemoryBroker::new();
    let weak_probe = b.clone();
    drop(b);
    weak_probe.shutdown().await.unwrap();
    // Shut down twice is fine and nothing hangs.
    weak_probe.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_group_refuses_publishes_instead_of_growing() {
    let b = MemoryBroker::from_config(&Config::parse("memory://?max_depth=3").unwrap()).unwrap();
    b.ensure_topic("t").await.unwrap();
    b.ensure_group("t", "slow", &GroupPolicy::default())
        .await
        .unwrap();
    b.ensure_group("t", "fast", &GroupPolicy::default())
        .await
        .unwrap();
    for i in 0..3 {
        b.publish("t", Message::new(format!("{i}"))).await.unwrap();
    }
    let err = b.publish("t", Message::new("4")).await.unwrap_err();
    assert!(matches!(err, Error::Full { limit: 3, .. }), "{err:?}");
    assert!(err.is_transient());
    // All or nothing: no group got the refused message.
    assert_eq!(b.depth("t", "fast").await.unwrap().ready, 3);
    let results = b
        .publish_batch("t", vec![Message::new("a"), Message::new("b")])
        .await;
    assert!(results.iter().all(|r| matches!(r, Err(Error::Full { .. }))));
    // Consuming makes room again.
    let mut slow = b
        .subscribe("t", "slow", SubscribeOptions::default())
        .await
        .unwrap();
    let mut fast = b
        .subscribe("t", "fast", SubscribeOptions::default())
        .await
        .unwrap();
    recv(&mut slow).await.ack().await.unwrap();
    recv(&mut fast).await.ack().await.unwrap();
    b.publish("t", Message::new("5")).await.unwrap();
}

#[tokio::test]
async fn a_publish_does_nothing_until_polled() {
    let b = broker_with_group().await;
    let never_polled = b.publish("t", Message::new("dropped"));
    drop(never_polled);
    assert_eq!(b.depth("t", "g").await.unwrap().ready, 0);
    b.publish("t", Message::new("awaited")).await.unwrap();
    assert_eq!(b.depth("t", "g").await.unwrap().ready, 1);
}

/// A task spawned on this (current-thread) runtime, and whether it ran while a loop went on:
/// a loop whose awaits never wait must still yield to it.
struct OtherTask {
    ran: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ran_during: bool,
}

impl OtherTask {
    fn spawn() -> Self {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        tokio::spawn(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
        OtherTask {
            ran,
            ran_during: false,
        }
    }

    fn look(&mut self) {
        self.ran_during |= self.ran.load(std::sync::atomic::Ordering::SeqCst);
    }

    fn assert_ran(&self, what: &str) {
        assert!(
            self.ran_during,
            "the spawned task never ran while the loop {what}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_publishing_loop_lets_other_tasks_run() {
    let b = broker_with_group().await;
    let mut other = OtherTask::spawn();
    for i in 0..10_000 {
        b.publish("t", Message::new(format!("{i}"))).await.unwrap();
        other.look();
    }
    other.assert_ran("published");
}

#[tokio::test(flavor = "current_thread")]
async fn a_consuming_loop_lets_other_tasks_run() {
    let (b, mut sub) = subscribed().await;
    let batch = (0..10_000).map(|i| Message::new(format!("{i}"))).collect();
    assert!(b.publish_batch("t", batch).await.iter().all(Result::is_ok));
    let mut other = OtherTask::spawn();
    for _ in 0..10_000 {
        recv(&mut sub).await.ack().await.unwrap();
        other.look();
    }
    other.assert_ran("consumed");
}
