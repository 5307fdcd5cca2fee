//! The contract cases. Each takes a [`Harness`], builds its own broker, topics and groups,
//! and panics with a message naming what broke.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spindle_core::{
    Capabilities, Delivery, DynBroker, Error, GroupPolicy, Message, PublishOptions,
    SubscribeOptions, Subscription, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
};

use crate::Harness;

// ---------------------------------------------------------------------------------------
// Helpers

async fn topic_with_groups(h: &Harness, groups: &[&str]) -> (DynBroker, String) {
    let broker = h.broker().await;
    let topic = h.name("t");
    broker.ensure_topic(&topic).await.expect("ensure_topic");
    for g in groups {
        broker
            .ensure_group(&topic, &h.name(g), &GroupPolicy::default())
            .await
            .expect("ensure_group");
    }
    (broker, topic)
}

async fn subscribe(
    broker: &DynBroker,
    topic: &str,
    group: &str,
    options: SubscribeOptions,
) -> Subscription {
    broker
        .subscribe(topic, group, options)
        .await
        .unwrap_or_else(|e| panic!("subscribe to {topic}/{group}: {e}"))
}

async fn recv(h: &Harness, sub: &mut Subscription) -> Delivery {
    match tokio::time::timeout(h.timing.receive_timeout, sub.next_delivery()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("expected a delivery, got an error: {e}"),
        Ok(None) => panic!("expected a delivery, the stream ended"),
        Err(_) => panic!(
            "expected a delivery within {:?}, none came",
            h.timing.receive_timeout
        ),
    }
}

async fn expect_quiet(sub: &mut Subscription, for_how_long: Duration, why: &str) {
    if let Ok(Some(item)) = tokio::time::timeout(for_how_long, sub.next_delivery()).await {
        match item {
            Ok(d) => panic!(
                "{why}: unexpected delivery (attempt {}) of message {}",
                d.attempt(),
                d.message().id()
            ),
            Err(e) => panic!("{why}: unexpected error: {e}"),
        }
    }
}

async fn publish(broker: &DynBroker, topic: &str, msg: Message) {
    broker
        .publish(topic, msg)
        .await
        .unwrap_or_else(|e| panic!("publish to {topic}: {e}"));
}

fn numbered(n: usize, prefix: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_id(format!("{prefix}-{i}")))
        .collect()
}

async fn publish_all(broker: &DynBroker, topic: &str, msgs: Vec<Message>) {
    for m in msgs {
        publish(broker, topic, m).await;
    }
}

/// Polls `check` until it returns true or the receive timeout passes.
async fn eventually<F, Fut>(h: &Harness, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + h.timing.receive_timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > until {
            panic!("{what}: not true within {:?}", h.timing.receive_timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_unsupported<T: std::fmt::Debug>(result: spindle_core::Result<T>, operation: &str) {
    match result {
        Err(Error::Unsupported { .. }) => {}
        other => {
            panic!("{operation}: the capability is absent, so expected Unsupported, got {other:?}")
        }
    }
}

fn opts() -> SubscribeOptions {
    SubscribeOptions::default()
}

fn short_ack(h: &Harness) -> SubscribeOptions {
    SubscribeOptions::default().with_ack_timeout(h.timing.ack_timeout)
}

/// A latch the consumer tasks of a case watch: once finished it stays finished, so a task that
/// was busy when it was set still sees it (a `Notify` would wake only the tasks waiting then).
#[derive(Clone)]
struct Done(Arc<tokio::sync::watch::Sender<bool>>);

impl Done {
    fn new() -> Self {
        Done(Arc::new(tokio::sync::watch::channel(false).0))
    }

    fn finish(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }
}

fn caps(broker: &DynBroker) -> Capabilities {
    broker.capabilities()
}

// ---------------------------------------------------------------------------------------
// Delivery

/// Empty, non-UTF-8 and every-byte payloads arrive byte for byte.
pub async fn round_trip_payloads(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let payloads: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from_static(b"\xff\xfe\x00\x01\x80"),
        Bytes::from(all_bytes),
        Bytes::from(vec![0u8; 4096]),
        Bytes::from("plain text ünïcödé 🚀"),
    ];
    let mut expected = HashMap::new();
    for p in &payloads {
        let m = Message::new(p.clone());
        expected.insert(m.id().to_string(), p.clone());
        publish(&broker, &topic, m).await;
    }
    for _ in 0..payloads.len() {
        let d = recv(h, &mut sub).await;
        let want = expected
            .remove(d.message().id())
            .expect("delivered id was published once");
        assert_eq!(d.message().payload(), &want, "payload changed in transit");
        d.ack().await.expect("ack");
    }
    broker.shutdown().await.unwrap();
}

/// A payload exactly at the declared limit is accepted and arrives intact.
pub async fn payload_at_size_limit(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let max = caps(&broker).max_payload_bytes;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let payload: Bytes = (0..max).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
    publish(&broker, &topic, Message::new(payload.clone())).await;
    let d = recv(h, &mut sub).await;
    assert_eq!(d.message().payload().len(), max);
    assert_eq!(d.message().payload(), &payload);
    d.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// One byte over the limit is `PayloadTooLarge`, and nothing is delivered.
pub async fn oversized_payload_rejected(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let max = caps(&broker).max_payload_bytes;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let err = broker
        .publish(&topic, Message::new(vec![7u8; max + 1]))
        .await
        .expect_err("an oversized payload must be rejected");
    match err {
        Error::PayloadTooLarge { size, max: limit } => {
            assert!(size > limit, "size {size} should exceed limit {limit}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    expect_quiet(&mut sub, h.timing.quiet, "a rejected message").await;
    broker.shutdown().await.unwrap();
}

fn awkward_headers() -> BTreeMap<String, String> {
    [
        ("x-dashed-name", "value"),
        ("under_score", ""),
        ("dotted.name", "a.b.c"),
        ("MixedCase", "Value With Spaces"),
        ("unicode-ключ", "значение ünïcödé 🚀"),
        ("quotes", "\"double\" 'single' \\back\\slash"),
        ("symbols", "=;,:/?#[]@!$&()*+%"),
        ("long", &"x".repeat(1000)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Headers with awkward names and values, the key and the content type arrive unchanged.
pub async fn headers_key_and_content_type_round_trip(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let headers = awkward_headers();
    let msg = Message::new("with headers")
        .with_headers(headers.clone())
        .with_key("customer-42")
        .with_content_type("application/vnd.order+json");
    publish(&broker, &topic, msg).await;
    let d = recv(h, &mut sub).await;
    for (k, v) in &headers {
        assert_eq!(d.message().header(k), Some(v.as_str()), "header `{k}`");
    }
    let user_headers = d
        .message()
        .headers()
        .keys()
        .filter(|k| !k.starts_with(spindle_core::RESERVED_HEADER_PREFIX))
        .count();
    assert_eq!(user_headers, headers.len(), "no header added or lost");
    assert_eq!(d.message().key(), Some("customer-42"));
    assert_eq!(
        d.message().content_type(),
        Some("application/vnd.order+json")
    );
    d.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// A given id and a generated id both survive the trip.
pub async fn message_id_preserved(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let generated = Message::new("a");
    let generated_id = generated.id().to_string();
    assert!(!generated_id.is_empty());
    publish(&broker, &topic, generated).await;
    publish(&broker, &topic, Message::new("b").with_id("order-42:α")).await;
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let d = recv(h, &mut sub).await;
        seen.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    assert!(seen.contains(&generated_id), "generated id kept: {seen:?}");
    assert!(seen.contains("order-42:α"), "given id kept: {seen:?}");
    broker.shutdown().await.unwrap();
}

/// Messages of one topic never reach another topic's groups.
pub async fn topic_isolation(h: &Harness) {
    let broker = h.broker().await;
    let (a, b) = (h.name("a"), h.name("b"));
    let group = h.name("g");
    for t in [&a, &b] {
        broker.ensure_topic(t).await.unwrap();
    }
    let mut sub_a = subscribe(&broker, &a, &group, opts()).await;
    let mut sub_b = subscribe(&broker, &b, &group, opts()).await;
    publish(&broker, &a, Message::new("for a")).await;
    publish(&broker, &b, Message::new("for b")).await;
    let da = recv(h, &mut sub_a).await;
    assert_eq!(&da.message().payload()[..], b"for a");
    let db = recv(h, &mut sub_b).await;
    assert_eq!(&db.message().payload()[..], b"for b");
    da.ack().await.unwrap();
    db.ack().await.unwrap();
    expect_quiet(&mut sub_a, h.timing.quiet, "topic a after its one message").await;
    expect_quiet(&mut sub_b, Duration::ZERO, "topic b after its one message").await;
    broker.shutdown().await.unwrap();
}

/// Sixteen topics used at once each deliver exactly their own messages.
pub async fn many_topics_at_once(h: &Harness) {
    let broker = h.broker().await;
    let group = h.name("g");
    let tasks = (0..16).map(|i| {
        let broker = broker.clone();
        let topic = h.name(&format!("t{i}"));
        let group = group.clone();
        let h = h.clone();
        async move {
            broker.ensure_topic(&topic).await.unwrap();
            let mut sub = subscribe(&broker, &topic, &group, opts()).await;
            publish_all(&broker, &topic, numbered(5, &topic)).await;
            let mut got = HashSet::new();
            for _ in 0..5 {
                let d = recv(&h, &mut sub).await;
                assert!(
                    d.message().id().starts_with(&topic),
                    "foreign message in {topic}"
                );
                got.insert(d.message().id().to_string());
                d.ack().await.unwrap();
            }
            assert_eq!(got.len(), 5, "{topic} got every message once");
        }
    });
    futures::future::join_all(tasks).await;
    broker.shutdown().await.unwrap();
}

/// A batch gets one result per message, in order; a bad message fails alone.
pub async fn publish_batch_results(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let max = caps(&broker).max_payload_bytes;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let mut batch = numbered(25, "batch");
    batch[7] = Message::new(vec![0u8; max + 1]).with_id("too-big");
    let results = broker.publish_batch(&topic, batch).await;
    assert_eq!(results.len(), 25, "one result per message");
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            assert!(
                matches!(r, Err(Error::PayloadTooLarge { .. })),
                "message 7 must fail alone: {r:?}"
            );
        } else {
            assert!(r.is_ok(), "message {i}: {r:?}");
        }
    }
    let mut got = HashSet::new();
    for _ in 0..24 {
        let d = recv(h, &mut sub).await;
        got.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(got.len(), 24);
    assert!(!got.contains("too-big"));
    expect_quiet(&mut sub, h.timing.quiet, "after the batch").await;
    broker.shutdown().await.unwrap();
}

/// `receive_batch` stops at its max count, and at its deadline with what it has.
pub async fn receive_batch_max_and_deadline(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    publish_all(&broker, &topic, numbered(5, "rb")).await;
    let mut total = 0;
    let first = sub
        .receive_batch(3, h.timing.receive_timeout)
        .await
        .unwrap();
    assert!(
        !first.is_empty() && first.len() <= 3,
        "max count honoured: {}",
        first.len()
    );
    total += first.len();
    for d in first {
        d.ack().await.unwrap();
    }
    while total < 5 {
        let batch = sub.receive_batch(10, h.timing.quiet * 3).await.unwrap();
        assert!(!batch.is_empty(), "the rest arrive: {total} of 5 so far");
        total += batch.len();
        for d in batch {
            d.ack().await.unwrap();
        }
    }
    assert_eq!(total, 5);
    let started = Instant::now();
    let empty = sub.receive_batch(10, h.timing.quiet).await.unwrap();
    assert!(empty.is_empty(), "nothing left");
    assert!(
        started.elapsed() >= h.timing.quiet,
        "an empty batch waits for its deadline"
    );
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Errors

/// Publishing to a topic that does not exist is `NotFound`, naming the topic.
pub async fn publish_to_missing_topic(h: &Harness) {
    let broker = h.broker().await;
    let topic = h.name("missing");
    let err = broker
        .publish(&topic, Message::new("x"))
        .await
        .expect_err("missing topic");
    assert!(
        matches!(err, Error::NotFound { .. }),
        "expected NotFound, got {err:?}"
    );
    assert!(
        err.to_string().contains(&topic),
        "error names the topic: {err}"
    );
    broker.shutdown().await.unwrap();
}

/// Subscribing to a topic that does not exist is `NotFound`.
pub async fn subscribe_to_missing_topic(h: &Harness) {
    let broker = h.broker().await;
    let topic = h.name("missing");
    let err = broker
        .subscribe(&topic, &h.name("g"), opts())
        .await
        .expect_err("missing topic");
    assert!(
        matches!(err, Error::NotFound { .. }),
        "expected NotFound, got {err:?}"
    );
    broker.shutdown().await.unwrap();
}

/// A topic with no group either rejects the publish as unroutable or keeps the message for a
/// group created later (replay); it never drops it silently.
pub async fn publish_without_group(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &[]).await;
    let c = caps(&broker);
    let result = broker
        .publish(&topic, Message::new("early").with_id("early"))
        .await;
    if c.rejects_unroutable {
        assert!(
            matches!(result, Err(Error::Unroutable { .. })),
            "expected Unroutable, got {result:?}"
        );
    } else {
        assert!(
            c.replay,
            "a backend that accepts unroutable messages must replay them"
        );
        result.expect("publish before any group");
        let mut sub = subscribe(&broker, &topic, &h.name("late"), opts()).await;
        let d = recv(h, &mut sub).await;
        assert_eq!(d.message().id(), "early");
        d.ack().await.unwrap();
    }
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Ack and nack

/// An acked message is not delivered again, even after the ack timeout.
pub async fn ack_prevents_redelivery(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut sub = subscribe(&broker, &topic, &group, short_ack(h)).await;
    publish(&broker, &topic, Message::new("once")).await;
    recv(h, &mut sub).await.ack().await.expect("ack");
    expect_quiet(
        &mut sub,
        h.timing.ack_timeout * 2 + h.timing.quiet,
        "after ack",
    )
    .await;
    if caps(&broker).depth {
        let depth = broker.depth(&topic, &group).await.unwrap();
        assert_eq!(depth.unacked(), 0, "{depth:?}");
    }
    broker.shutdown().await.unwrap();
}

/// A nacked message comes back, marked redelivered, with the attempt number one higher.
pub async fn nack_redelivers(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    publish(&broker, &topic, Message::new("again").with_header("h", "v")).await;
    let first = recv(h, &mut sub).await;
    assert_eq!(first.attempt(), 1);
    assert!(!first.redelivered());
    let id = first.message().id().to_string();
    first.nack().await.expect("nack");
    let second = recv(h, &mut sub).await;
    assert_eq!(second.message().id(), id);
    assert_eq!(second.attempt(), 2);
    assert!(second.redelivered());
    assert_eq!(&second.message().payload()[..], b"again");
    assert_eq!(second.message().header("h"), Some("v"));
    second.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// A message nacked with a delay is not seen again before the delay.
pub async fn nack_with_delay(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    publish(&broker, &topic, Message::new("later")).await;
    let d = recv(h, &mut sub).await;
    if !caps(&broker).nack_delay {
        assert_unsupported(d.nack_after(h.timing.delay).await, "nack with delay");
        broker.shutdown().await.unwrap();
        return;
    }
    let started = Instant::now();
    d.nack_after(h.timing.delay).await.expect("nack_after");
    let again = recv(h, &mut sub).await;
    let waited = started.elapsed();
    assert!(
        waited >= h.timing.delay,
        "redelivered after {waited:?}, before the delay of {:?}",
        h.timing.delay
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// A nack delay over the backend's maximum is an error and the message is not lost.
pub async fn nack_delay_over_maximum(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut sub = subscribe(&broker, &topic, &group, opts()).await;
    publish(&broker, &topic, Message::new("x")).await;
    let d = recv(h, &mut sub).await;
    let c = caps(&broker);
    match (c.nack_delay, c.max_nack_delay) {
        (false, _) => assert_unsupported(
            d.nack_after(Duration::from_secs(1)).await,
            "nack with delay",
        ),
        (true, Some(max)) => {
            let err = d
                .nack_after(max + Duration::from_secs(1))
                .await
                .expect_err("a delay over the maximum");
            assert!(matches!(err, Error::DelayTooLong { .. }), "got {err:?}");
            // Not lost: it is delivered again.
            let again = recv(h, &mut sub).await;
            again.ack().await.unwrap();
        }
        (true, None) => {
            d.nack_after(Duration::from_secs(3600))
                .await
                .expect("an unbounded delay");
            expect_quiet(&mut sub, h.timing.quiet, "an hour-long delay").await;
        }
    }
    broker.shutdown().await.unwrap();
}

/// A dead-lettered message keeps its payload, headers and id, and records the reason.
pub async fn dead_letter_keeps_payload_headers_reason(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut sub = subscribe(&broker, &topic, &group, opts()).await;
    let headers = awkward_headers();
    let msg = Message::new(&b"\x00poison\xff"[..])
        .with_headers(headers.clone())
        .with_id("poison-1");
    publish(&broker, &topic, msg).await;
    let d = recv(h, &mut sub).await;
    d.dead_letter("invoice total is negative")
        .await
        .expect("dead_letter");
    let mut dlq = broker
        .subscribe_dead_letters(&topic, &group, opts())
        .await
        .expect("subscribe_dead_letters");
    let dead = recv(h, &mut dlq).await;
    assert_eq!(dead.message().id(), "poison-1");
    assert_eq!(&dead.message().payload()[..], b"\x00poison\xff");
    for (k, v) in &headers {
        assert_eq!(dead.message().header(k), Some(v.as_str()), "header `{k}`");
    }
    let reason = dead
        .message()
        .header(HEADER_DEAD_LETTER_REASON)
        .unwrap_or("");
    assert!(
        reason.contains("invoice total is negative"),
        "reason kept: {reason:?}"
    );
    dead.ack().await.unwrap();
    expect_quiet(&mut sub, h.timing.quiet, "the group after dead-lettering").await;
    broker.shutdown().await.unwrap();
}

/// After `max_attempts` deliveries, each one attempt higher, the message goes to the
/// dead-letter queue instead of coming back.
pub async fn max_attempts_then_dead_letter(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &[]).await;
    let group = h.name("g");
    let mut sub = subscribe(&broker, &topic, &group, opts().with_max_attempts(3)).await;
    publish(
        &broker,
        &topic,
        Message::new("always fails").with_id("poison"),
    )
    .await;
    for attempt in 1..=3 {
        let d = recv(h, &mut sub).await;
        assert_eq!(d.attempt(), attempt, "attempt numbers rise by one");
        d.nack().await.unwrap();
    }
    expect_quiet(&mut sub, h.timing.quiet, "a fourth attempt").await;
    let mut dlq = broker
        .subscribe_dead_letters(&topic, &group, opts())
        .await
        .unwrap();
    let dead = recv(h, &mut dlq).await;
    assert_eq!(dead.message().id(), "poison");
    assert_eq!(dead.message().header(HEADER_ATTEMPT), Some("3"));
    let reason = dead
        .message()
        .header(HEADER_DEAD_LETTER_REASON)
        .unwrap_or("");
    assert!(reason.contains("max attempts"), "reason: {reason:?}");
    dead.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// Redrive moves dead-lettered messages back to their group as fresh deliveries.
pub async fn redrive_from_dead_letter(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    if !caps(&broker).redrive {
        assert_unsupported(broker.redrive(&topic, &group).await, "redrive");
        broker.shutdown().await.unwrap();
        return;
    }
    let mut sub = subscribe(&broker, &topic, &group, opts()).await;
    publish_all(&broker, &topic, numbered(3, "rd")).await;
    for _ in 0..3 {
        recv(h, &mut sub)
            .await
            .dead_letter("for redrive")
            .await
            .unwrap();
    }
    eventually(h, "three messages dead-lettered", || async {
        broker.depth(&topic, &group).await.unwrap().dead_lettered == 3
    })
    .await;
    let moved = broker.redrive(&topic, &group).await.expect("redrive");
    assert_eq!(moved, 3);
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let d = recv(h, &mut sub).await;
        assert_eq!(d.attempt(), 1, "a redriven message starts over");
        ids.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(ids, (0..3).map(|i| format!("rd-{i}")).collect());
    broker.shutdown().await.unwrap();
}

/// Three consumers that each nack a message the first time they see it still end with every
/// message acked.
pub async fn repeated_nacks_across_consumers(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &[]).await;
    let group = h.name("g");
    let total = 60;
    let o = opts().with_prefetch(10).with_max_attempts(10);
    let subs = vec![
        subscribe(&broker, &topic, &group, o.clone()).await,
        subscribe(&broker, &topic, &group, o.clone()).await,
        subscribe(&broker, &topic, &group, o).await,
    ];
    publish_all(&broker, &topic, numbered(total, "rn")).await;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let done = Done::new();
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            let acked = acked.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                loop {
                    tokio::select! {
                        _ = done.wait() => return,
                        item = sub.next_delivery() => {
                            let Some(Ok(d)) = item else { return };
                            let id = d.message().id().to_string();
                            if seen.insert(id.clone()) {
                                d.nack().await.unwrap();
                            } else {
                                d.ack().await.unwrap();
                                let mut acked = acked.lock().unwrap();
                                acked.insert(id);
                                if acked.len() == total {
                                    done.finish();
                                    return;
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    eventually(h, "every message acked", || async {
        acked.lock().unwrap().len() == total
    })
    .await;
    done.finish();
    for t in tasks {
        t.await.unwrap();
    }
    broker.shutdown().await.unwrap();
}

/// A delivery dropped without a decision is delivered again.
pub async fn dropped_delivery_redelivered(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    publish(&broker, &topic, Message::new("dropped").with_id("dropped")).await;
    let d = recv(h, &mut sub).await;
    drop(d);
    let again = recv(h, &mut sub).await;
    assert_eq!(again.message().id(), "dropped");
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// Messages a closed subscriber fetched, handed out or not, go to another consumer.
pub async fn closed_subscriber_redelivers(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut a = subscribe(&broker, &topic, &group, opts().with_prefetch(5)).await;
    publish_all(&broker, &topic, numbered(5, "cs")).await;
    let held = recv(h, &mut a).await;
    a.close().await.unwrap();
    drop(a);
    drop(held);
    let mut b = subscribe(&broker, &topic, &group, opts()).await;
    let mut ids = HashSet::new();
    while ids.len() < 5 {
        let d = recv(h, &mut b).await;
        ids.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    broker.shutdown().await.unwrap();
}

/// Closing a consumer after it acked some messages loses none and repeats none.
pub async fn close_mid_stream_loses_nothing(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut a = subscribe(&broker, &topic, &group, opts().with_prefetch(20)).await;
    publish_all(&broker, &topic, numbered(100, "mid")).await;
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..30 {
        let d = recv(h, &mut a).await;
        seen.push(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    a.close().await.unwrap();
    drop(a);
    let mut b = subscribe(&broker, &topic, &group, opts()).await;
    for _ in 0..70 {
        let d = recv(h, &mut b).await;
        seen.push(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    expect_quiet(&mut b, h.timing.quiet, "after all 100").await;
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 100, "every message once, no duplicates");
    broker.shutdown().await.unwrap();
}

/// An unacked delivery comes back after the ack timeout, to the same group.
pub async fn unacked_redelivered_after_ack_timeout(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), short_ack(h)).await;
    publish(&broker, &topic, Message::new("slow").with_id("slow")).await;
    let held = recv(h, &mut sub).await;
    if !caps(&broker).ack_deadline {
        assert_unsupported(held.extend(h.timing.ack_timeout).await, "extend");
        broker.shutdown().await.unwrap();
        return;
    }
    let started = Instant::now();
    let again = recv(h, &mut sub).await;
    assert!(started.elapsed() + Duration::from_millis(50) >= h.timing.ack_timeout);
    assert_eq!(again.message().id(), "slow");
    assert_eq!(again.attempt(), 2);
    // The old delivery is stale: its ack either fails as such or is a harmless no-op.
    match held.ack().await {
        Ok(()) | Err(Error::StaleDelivery(_)) => {}
        Err(e) => panic!("acking a stale delivery: {e}"),
    }
    again.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// Extending a slow delivery keeps it from being redelivered past the original deadline.
pub async fn extend_prevents_redelivery(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), short_ack(h)).await;
    publish(&broker, &topic, Message::new("long job")).await;
    let d = recv(h, &mut sub).await;
    if !caps(&broker).extend {
        assert_unsupported(d.extend(h.timing.ack_timeout).await, "extend");
        broker.shutdown().await.unwrap();
        return;
    }
    d.extend(h.timing.ack_timeout * 6).await.expect("extend");
    expect_quiet(&mut sub, h.timing.ack_timeout * 2, "an extended delivery").await;
    d.ack().await.expect("ack after extend");
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Topology

async fn drain_shared(
    mut sub: Subscription,
    seen: Arc<Mutex<Vec<String>>>,
    total: usize,
    done: Done,
) -> usize {
    let mut mine = 0;
    loop {
        tokio::select! {
            _ = done.wait() => return mine,
            item = sub.next_delivery() => {
                let Some(Ok(d)) = item else { return mine };
                tokio::time::sleep(Duration::from_millis(1)).await;
                let id = d.message().id().to_string();
                d.ack().await.unwrap();
                mine += 1;
                let mut seen = seen.lock().unwrap();
                seen.push(id);
                if seen.len() >= total {
                    done.finish();
                    return mine;
                }
            }
        }
    }
}

/// Two consumers of one group share the load, and between them get every message once.
pub async fn competing_consumers_share(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let total = 200;
    let a = subscribe(&broker, &topic, &group, opts().with_prefetch(5)).await;
    let b = subscribe(&broker, &topic, &group, opts().with_prefetch(5)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let done = Done::new();
    let ta = tokio::spawn(drain_shared(a, seen.clone(), total, done.clone()));
    let tb = tokio::spawn(drain_shared(b, seen.clone(), total, done.clone()));
    publish_all(&broker, &topic, numbered(total, "cc")).await;
    eventually(h, "all messages consumed", || async {
        seen.lock().unwrap().len() >= total
    })
    .await;
    done.finish();
    let (na, nb) = (ta.await.unwrap(), tb.await.unwrap());
    assert!(na > 0 && nb > 0, "both consumers got work: {na} and {nb}");
    {
        let seen = seen.lock().unwrap();
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), total, "union complete");
        assert_eq!(seen.len(), total, "no message twice");
    }
    broker.shutdown().await.unwrap();
}

/// Every group gets every message.
pub async fn fan_out_every_group(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["inventory"]).await;
    let mut first = subscribe(&broker, &topic, &h.name("inventory"), opts()).await;
    if !caps(&broker).fan_out {
        let second = broker.subscribe(&topic, &h.name("payment"), opts()).await;
        assert_unsupported(second, "a second group on a topic");
        broker.shutdown().await.unwrap();
        return;
    }
    let mut second = subscribe(&broker, &topic, &h.name("payment"), opts()).await;
    publish_all(&broker, &topic, numbered(30, "fan")).await;
    for sub in [&mut first, &mut second] {
        let mut ids = HashSet::new();
        for _ in 0..30 {
            let d = recv(h, sub).await;
            ids.insert(d.message().id().to_string());
            d.ack().await.unwrap();
        }
        assert_eq!(ids.len(), 30, "each group gets all 30");
    }
    broker.shutdown().await.unwrap();
}

/// With several consumers and random nacks, messages of one key are handled in publish order.
pub async fn ordering_per_key(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let ordered = caps(&broker).ordering_per_key;
    let (keys, per_key) = (4usize, 25usize);
    let total = keys * per_key;
    let o = opts().with_prefetch(10).with_max_attempts(50);
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(subscribe(&broker, &topic, &group, o.clone()).await);
    }
    for seq in 0..per_key {
        for k in 0..keys {
            let m = Message::new(format!("{k}:{seq}"))
                .with_key(format!("key-{k}"))
                .with_id(format!("k{k}-{seq}"));
            publish(&broker, &topic, m).await;
        }
    }
    // Last acked sequence number per key.
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    let acked = Arc::new(Mutex::new(0usize));
    let done = Done::new();
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            let (last, acked, done) = (last.clone(), acked.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let d = tokio::select! {
                        _ = done.wait() => return,
                        item = sub.next_delivery() => match item { Some(Ok(d)) => d, _ => return },
                    };
                    let text = String::from_utf8(d.message().payload().to_vec()).unwrap();
                    let (k, seq) = text.split_once(':').unwrap();
                    let seq: i64 = seq.parse().unwrap();
                    let key = d.message().key().expect("key kept").to_string();
                    assert_eq!(key, format!("key-{k}"));
                    if ordered {
                        let prev = *last.lock().unwrap().get(&key).unwrap_or(&-1);
                        assert_eq!(seq, prev + 1, "{key}: got {seq} after {prev}");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if rand::random_ratio(1, 10) {
                        d.nack().await.unwrap();
                        continue;
                    }
                    last.lock().unwrap().insert(key, seq);
                    d.ack().await.unwrap();
                    let mut n = acked.lock().unwrap();
                    *n += 1;
                    if *n == total {
                        done.finish();
                        return;
                    }
                }
            })
        })
        .collect();
    eventually(h, "every keyed message acked", || async {
        *acked.lock().unwrap() >= total
    })
    .await;
    done.finish();
    for t in tasks {
        t.await
            .expect("a consumer saw messages of one key out of order");
    }
    if !ordered {
        println!(
            "ordering_per_key: backend does not order per key; checked delivery and keys only"
        );
    }
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Time

/// A delayed publish arrives after its delay and not before.
pub async fn delayed_publish(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let result = broker
        .publish_with(
            &topic,
            Message::new("later"),
            &PublishOptions::delayed(h.timing.delay),
        )
        .await;
    if !caps(&broker).delayed_publish {
        assert_unsupported(result, "delayed publish");
        broker.shutdown().await.unwrap();
        return;
    }
    let started = Instant::now();
    result.expect("delayed publish");
    let d = recv(h, &mut sub).await;
    // The clock started after the publish returned, so this bound is conservative.
    assert!(
        started.elapsed() + Duration::from_millis(20) >= h.timing.delay,
        "arrived after {:?}, before the delay of {:?}",
        started.elapsed(),
        h.timing.delay
    );
    d.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// A publish delay over the backend's maximum is an error, never silently shortened.
pub async fn delayed_publish_over_maximum(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let c = caps(&broker);
    match (c.delayed_publish, c.max_publish_delay) {
        (false, _) => assert_unsupported(
            broker
                .publish_with(
                    &topic,
                    Message::new("x"),
                    &PublishOptions::delayed(Duration::from_secs(1)),
                )
                .await,
            "delayed publish",
        ),
        (true, Some(max)) => {
            let err = broker
                .publish_with(
                    &topic,
                    Message::new("x"),
                    &PublishOptions::delayed(max + Duration::from_secs(1)),
                )
                .await
                .expect_err("a delay over the maximum");
            assert!(matches!(err, Error::DelayTooLong { .. }), "got {err:?}");
            expect_quiet(&mut sub, h.timing.quiet, "a rejected delayed message").await;
        }
        (true, None) => {
            broker
                .publish_with(
                    &topic,
                    Message::new("x"),
                    &PublishOptions::delayed(Duration::from_secs(3600)),
                )
                .await
                .expect("an unbounded delay");
            expect_quiet(&mut sub, h.timing.quiet, "an hour-long delay").await;
        }
    }
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Flow control and lifecycle

/// A consumer never holds more unacked deliveries than its prefetch.
pub async fn prefetch_bound_honoured(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts().with_prefetch(5)).await;
    publish_all(&broker, &topic, numbered(20, "pf")).await;
    let held = sub.receive_batch(20, h.timing.quiet * 3).await.unwrap();
    assert_eq!(
        held.len(),
        5,
        "prefetch 5 holds exactly 5 unacked deliveries"
    );
    let mut held = held.into_iter();
    held.next().unwrap().ack().await.unwrap();
    let one_more = recv(h, &mut sub).await;
    let extra = sub.receive_batch(20, h.timing.quiet).await.unwrap();
    assert!(
        extra.is_empty(),
        "one ack frees room for one more, not {}",
        1 + extra.len()
    );
    one_more.ack().await.unwrap();
    for d in held {
        d.ack().await.unwrap();
    }
    broker.shutdown().await.unwrap();
}

/// Graceful drain: after close the stream ends, in-flight deliveries still ack, and nothing
/// acked comes back.
pub async fn graceful_drain(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    let mut a = subscribe(&broker, &topic, &group, opts().with_prefetch(10)).await;
    publish_all(&broker, &topic, numbered(10, "drain")).await;
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        in_flight.push(recv(h, &mut a).await);
    }
    a.close().await.unwrap();
    let end = tokio::time::timeout(h.timing.receive_timeout, async {
        while let Some(item) = a.next_delivery().await {
            in_flight.push(item.expect("no error while draining"));
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ends after close");
    let drained: HashSet<String> = in_flight
        .iter()
        .map(|d| d.message().id().to_string())
        .collect();
    for d in in_flight {
        d.ack()
            .await
            .expect("an in-flight delivery acks after close");
    }
    let mut b = subscribe(&broker, &topic, &group, opts()).await;
    let mut rest = HashSet::new();
    while drained.len() + rest.len() < 10 {
        let d = recv(h, &mut b).await;
        assert!(
            !drained.contains(d.message().id()),
            "an acked message came back"
        );
        rest.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    expect_quiet(&mut b, h.timing.quiet, "after the drain").await;
    broker.shutdown().await.unwrap();
}

/// Closing twice (even at once) is fine; publishing after close is an error.
pub async fn close_is_idempotent_and_publish_after_close_fails(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let (r1, r2) = tokio::join!(sub.close(), sub.close());
    r1.unwrap();
    r2.unwrap();
    sub.close().await.unwrap();
    let (p1, p2) = tokio::join!(broker.close(), broker.close());
    p1.unwrap();
    p2.unwrap();
    let err = broker
        .publish(&topic, Message::new("late"))
        .await
        .expect_err("publish after close");
    assert!(
        matches!(err, Error::Closed(_)),
        "expected Closed, got {err:?}"
    );
    broker.shutdown().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// Closing one subscription leaves the group's other consumers and other groups working.
pub async fn cancel_one_subscription_others_work(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g1", "g2"]).await;
    let mut a1 = subscribe(&broker, &topic, &h.name("g1"), opts()).await;
    let mut a2 = subscribe(&broker, &topic, &h.name("g1"), opts()).await;
    let fan_out = caps(&broker).fan_out;
    let mut b = if fan_out {
        Some(subscribe(&broker, &topic, &h.name("g2"), opts()).await)
    } else {
        None
    };
    a1.close().await.unwrap();
    assert!(
        tokio::time::timeout(h.timing.receive_timeout, a1.next_delivery())
            .await
            .expect("a closed stream ends")
            .is_none()
    );
    publish_all(&broker, &topic, numbered(10, "cancel")).await;
    for _ in 0..10 {
        recv(h, &mut a2).await.ack().await.unwrap();
    }
    if let Some(b) = b.as_mut() {
        for _ in 0..10 {
            recv(h, b).await.ack().await.unwrap();
        }
    }
    broker.shutdown().await.unwrap();
}

/// Shutting the broker down ends its streams; afterwards calls fail with `Closed`.
pub async fn shutdown_ends_streams(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let mut sub = subscribe(&broker, &topic, &h.name("g"), opts()).await;
    let waiter = tokio::spawn(async move { sub.next_delivery().await.is_none() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s1, s2) = tokio::join!(broker.shutdown(), broker.shutdown());
    s1.unwrap();
    s2.unwrap();
    let ended = tokio::time::timeout(h.timing.receive_timeout, waiter)
        .await
        .expect("the stream ends after shutdown")
        .unwrap();
    assert!(ended, "the stream ended without a delivery");
    let err = broker
        .subscribe(&topic, &h.name("g"), opts())
        .await
        .expect_err("subscribe after shutdown");
    assert!(matches!(err, Error::Closed(_)), "got {err:?}");
    let err = broker
        .publish(&topic, Message::new("x"))
        .await
        .expect_err("publish after shutdown");
    assert!(matches!(err, Error::Closed(_)), "got {err:?}");
}

/// Depth counts published-and-unacked messages per group.
pub async fn depth_reflects_unacked(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    if !caps(&broker).depth {
        assert_unsupported(broker.depth(&topic, &group).await, "depth");
        broker.shutdown().await.unwrap();
        return;
    }
    publish_all(&broker, &topic, numbered(7, "depth")).await;
    eventually(h, "depth shows 7 ready", || async {
        let d = broker.depth(&topic, &group).await.unwrap();
        d.ready == 7 && d.unacked() == 7
    })
    .await;
    let mut sub = subscribe(&broker, &topic, &group, opts().with_prefetch(3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(h, &mut sub).await);
    }
    eventually(h, "depth still counts 7 unacked", || async {
        broker.depth(&topic, &group).await.unwrap().unacked() == 7
    })
    .await;
    for d in held {
        d.ack().await.unwrap();
    }
    drop(sub);
    eventually(h, "depth counts 4 after 3 acks", || async {
        broker.depth(&topic, &group).await.unwrap().unacked() == 4
    })
    .await;
    broker.shutdown().await.unwrap();
}

/// Purge removes waiting messages from a group.
pub async fn purge_empties_group(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    if !caps(&broker).purge {
        assert_unsupported(broker.purge(&topic, &group).await, "purge");
        broker.shutdown().await.unwrap();
        return;
    }
    publish_all(&broker, &topic, numbered(5, "purge")).await;
    if caps(&broker).depth {
        eventually(h, "5 ready before purge", || async {
            broker.depth(&topic, &group).await.unwrap().ready == 5
        })
        .await;
    }
    broker.purge(&topic, &group).await.expect("purge");
    let mut sub = subscribe(&broker, &topic, &group, opts()).await;
    expect_quiet(&mut sub, h.timing.quiet, "a purged group").await;
    publish(&broker, &topic, Message::new("after purge")).await;
    recv(h, &mut sub).await.ack().await.unwrap();
    broker.shutdown().await.unwrap();
}

/// Zero prefetch, zero max attempts and a zero ack timeout are rejected, naming the option.
pub async fn invalid_options_rejected(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &[]).await;
    let group = h.name("g");
    let cases = [
        (opts().with_prefetch(0), "prefetch"),
        (opts().with_max_attempts(0), "max_attempts"),
        (opts().with_ack_timeout(Duration::ZERO), "ack_timeout"),
    ];
    for (o, name) in cases {
        let err = broker.subscribe(&topic, &group, o).await.expect_err(name);
        assert!(matches!(err, Error::InvalidArgument(_)), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    let err = broker
        .ensure_group(&topic, &group, &GroupPolicy::max_attempts(0))
        .await
        .expect_err("zero attempts");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    broker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Resilience

/// With a restart hook: publish while the broker restarts at one third and one half; every
/// message whose publish returned Ok is consumed. Without one the backend must not claim to be
/// durable, since nothing would prove it.
pub async fn restart_loses_nothing(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &["g"]).await;
    let group = h.name("g");
    if !h.can_restart() {
        assert!(
            !caps(&broker).durable,
            "a backend that declares itself durable must give the suite a restart hook"
        );
        broker.shutdown().await.unwrap();
        return;
    }
    let total = 3000;
    let mut ok = HashSet::new();
    for (i, m) in numbered(total, "rs").into_iter().enumerate() {
        if i == total / 3 || i == total / 2 {
            h.restart().await;
        }
        let id = m.id().to_string();
        if broker.publish(&topic, m).await.is_ok() {
            ok.insert(id);
        }
    }
    let mut sub = subscribe(&broker, &topic, &group, opts()).await;
    let (mut got, mut duplicates) = (HashSet::new(), 0);
    let until = Instant::now() + h.timing.receive_timeout * 6;
    while !ok.is_subset(&got) && Instant::now() < until {
        match tokio::time::timeout(h.timing.receive_timeout, sub.next_delivery()).await {
            Ok(Some(Ok(d))) => {
                if !got.insert(d.message().id().to_string()) {
                    duplicates += 1;
                }
                let _ = d.ack().await;
            }
            _ => continue,
        }
    }
    let missing = ok.difference(&got).count();
    println!(
        "restart: {} of {total} publishes returned Ok; {} consumed; {duplicates} duplicates; {missing} missing",
        ok.len(),
        got.len()
    );
    assert_eq!(
        missing, 0,
        "every message whose publish returned Ok is consumed"
    );
    broker.shutdown().await.unwrap();
}

/// 10,000 messages (or the harness's `stress_messages`), three consumers, 10% random nacks:
/// every message is consumed; the duplicates are counted and reported.
pub async fn stress_random_nacks(h: &Harness) {
    let (broker, topic) = topic_with_groups(h, &[]).await;
    let group = h.name("g");
    let total = h.stress_messages();
    let o = opts().with_prefetch(100).with_max_attempts(1000);
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(subscribe(&broker, &topic, &group, o.clone()).await);
    }
    let chunk = caps(&broker).max_batch.clamp(1, 500);
    let mut published = 0;
    for batch in numbered(total, "st").chunks(chunk) {
        for r in broker.publish_batch(&topic, batch.to_vec()).await {
            r.expect("batch publish");
            published += 1;
        }
    }
    assert_eq!(published, total);
    #[derive(Default)]
    struct Tally {
        acked: HashSet<String>,
        deliveries: usize,
        nacks: usize,
        stale: usize,
        duplicates: usize,
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Done::new();
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            let (tally, done) = (tally.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let d = tokio::select! {
                        _ = done.wait() => return,
                        item = sub.next_delivery() => match item { Some(Ok(d)) => d, _ => return },
                    };
                    let id = d.message().id().to_string();
                    if rand::random_ratio(1, 10) {
                        tally.lock().unwrap().nacks += 1;
                        match d.nack().await {
                            Ok(()) => {}
                            Err(Error::StaleDelivery(_)) => tally.lock().unwrap().stale += 1,
                            Err(e) => panic!("nack: {e}"),
                        }
                        continue;
                    }
                    match d.ack().await {
                        Ok(()) => {}
                        // Held past its ack deadline: it comes again and is counted then.
                        Err(Error::StaleDelivery(_)) => {
                            tally.lock().unwrap().stale += 1;
                            continue;
                        }
                        Err(e) => panic!("ack: {e}"),
                    }
                    let mut t = tally.lock().unwrap();
                    t.deliveries += 1;
                    if !t.acked.insert(id) {
                        t.duplicates += 1;
                    }
                    if t.acked.len() == total {
                        done.finish();
                        return;
                    }
                }
            })
        })
        .collect();
    let limit = h.timing.receive_timeout * 12;
    let until = Instant::now() + limit;
    while tally.lock().unwrap().acked.len() < total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.finish();
    for t in tasks {
        t.await.unwrap();
    }
    {
        let t = tally.lock().unwrap();
        println!(
            "stress: {total} messages, {} acked deliveries, {} nacks, {} stale decisions, {} duplicates",
            t.deliveries, t.nacks, t.stale, t.duplicates
        );
        assert_eq!(
            t.acked.len(),
            total,
            "every message consumed within {limit:?}"
        );
    }
    broker.shutdown().await.unwrap();
}
