//! Kafka-specific resilience: a consumer killed before it acks, and a broker restart while a
//! consumer is reading. Needs tansu on 127.0.0.1:9092 (`scripts/start-tansu.sh`); under
//! `CI=true` an unreachable broker fails these tests, elsewhere they are skipped loudly.
//!
//! Run with `--test-threads=1`: the restart test restarts the shared broker process.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spindle_core::{
    Admin, Broker, Config, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};
use spindle_kafka::KafkaBroker;

const ADDRESS: &str = "127.0.0.1:9092";

async fn broker_or_skip(test: &str) -> Option<KafkaBroker> {
    let probe = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(ADDRESS),
    )
    .await;
    if !matches!(probe, Ok(Ok(_))) {
        if spindle_contract::running_in_ci() {
            panic!("{test}: tansu is not reachable at {ADDRESS}, and CI=true requires it");
        }
        eprintln!("SKIPPED {test}: tansu is not reachable at {ADDRESS} (this fails under CI=true)");
        return None;
    }
    let config = Config::parse(&format!("kafka://{ADDRESS}")).unwrap();
    Some(spindle_kafka::connect(&config).await.expect("connect"))
}

fn unique(what: &str) -> String {
    format!(
        "sp-kafka-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Consumer A takes messages and dies (its broker shut down, its deliveries never acked);
/// consumer B of the same group, in another broker instance, gets every message A held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_messages_go_to_another_member() {
    let Some(a_broker) = broker_or_skip("killed_consumer_messages_go_to_another_member").await
    else {
        return;
    };
    let b_broker = broker_or_skip("killed_consumer").await.unwrap();
    let (topic, group) = (unique("killed"), unique("g"));
    a_broker.ensure_topic(&topic).await.unwrap();
    a_broker
        .ensure_group(&topic, &group, &GroupPolicy::default())
        .await
        .unwrap();
    let mut a = a_broker
        .subscribe(
            &topic,
            &group,
            SubscribeOptions::default().with_prefetch(10),
        )
        .await
        .unwrap();
    let total = 30;
    for i in 0..total {
        a_broker
            .publish(
                &topic,
                Message::new(format!("m{i}")).with_id(format!("m{i}")),
            )
            .await
            .unwrap();
    }
    // A acks the first five and holds the next five unacked.
    let mut acked = HashSet::new();
    let mut held = Vec::new();
    for i in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(20), a.next_delivery())
            .await
            .expect("A receives")
            .unwrap()
            .unwrap();
        if i < 5 {
            acked.insert(d.message().id().to_string());
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    let held_ids: HashSet<String> = held.iter().map(|d| d.message().id().to_string()).collect();
    // A dies: its process goes away without acking (shutdown, then the deliveries vanish).
    a_broker.shutdown().await.unwrap();
    std::mem::forget(held);
    drop(a);

    let mut b = b_broker
        .subscribe(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = HashSet::new();
    let until = Instant::now() + Duration::from_secs(60);
    while got.len() + acked.len() < total && Instant::now() < until {
        if let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(5), b.next_delivery()).await
        {
            assert!(
                !acked.contains(d.message().id()),
                "a message A acked came back: {}",
                d.message().id()
            );
            got.insert(d.message().id().to_string());
            d.ack().await.unwrap();
        }
    }
    assert!(
        held_ids.is_subset(&got),
        "B got every message A held: {held_ids:?} vs {got:?}"
    );
    assert_eq!(got.len() + acked.len(), total, "nothing lost");
    b_broker.shutdown().await.unwrap();
}

/// A subscription dropped (not closed) while holding unacked deliveries: the group's next
/// member gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_subscription_messages_go_to_another_member() {
    let Some(broker) = broker_or_skip("dropped_subscription_messages_go_to_another_member").await
    else {
        return;
    };
    let (topic, group) = (unique("dropped"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let mut a = broker
        .subscribe(&topic, &group, SubscribeOptions::default().with_prefetch(3))
        .await
        .unwrap();
    for i in 0..6 {
        broker
            .publish(
                &topic,
                Message::new(format!("d{i}")).with_id(format!("d{i}")),
            )
            .await
            .unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(20), a.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let held_id = first.message().id().to_string();
    drop(a);
    drop(first);
    let mut b = broker
        .subscribe(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = HashSet::new();
    while got.len() < 6 {
        let d = tokio::time::timeout(Duration::from_secs(20), b.next_delivery())
            .await
            .expect("B receives every message")
            .unwrap()
            .unwrap();
        got.insert(d.message().id().to_string());
        d.ack().await.unwrap();
    }
    assert!(got.contains(&held_id));
    broker.shutdown().await.unwrap();
}

async fn restart_tansu() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/start-tansu.sh");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .arg("restart")
        .status()
        .await
        .expect("run scripts/start-tansu.sh restart");
    assert!(status.success(), "scripts/start-tansu.sh restart failed");
}

/// tansu restarts while a consumer is reading and a producer is writing: every message whose
/// publish returned Ok is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let Some(broker) = broker_or_skip("broker_restart_mid_stream_loses_nothing").await else {
        return;
    };
    let broker = Arc::new(broker);
    let (topic, group) = (unique("restart"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let mut sub = broker
        .subscribe(&topic, &group, SubscribeOptions::default())
        .await
        .unwrap();
    let consumed = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let reader = {
        let consumed = consumed.clone();
        tokio::spawn(async move {
            while let Some(item) = sub.next_delivery().await {
                if let Ok(d) = item {
                    consumed
                        .lock()
                        .unwrap()
                        .insert(d.message().id().to_string());
                    let _ = d.ack().await;
                }
            }
        })
    };
    let total = 1500;
    let mut ok = HashSet::new();
    for i in 0..total {
        if i == total / 3 {
            restart_tansu().await;
        }
        let id = format!("r{i}");
        if broker
            .publish(&topic, Message::new(id.clone()).with_id(id.clone()))
            .await
            .is_ok()
        {
            ok.insert(id);
        }
    }
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = ok.difference(&consumed.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{missing} of {} acknowledged publishes never consumed",
            ok.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "restart mid-stream: {} of {total} publishes Ok, {} consumed",
        ok.len(),
        consumed.lock().unwrap().len()
    );
    broker.shutdown().await.unwrap();
    reader.await.unwrap();
}

/// Per-partition lag of a group that has not consumed yet.
///
/// Deletion is not exercised here: tansu 0.6.0's DeleteTopics removes every topic of the
/// cluster (deleting one topic emptied all 187), which would break whatever else runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_lag_per_partition() {
    let Some(broker) = broker_or_skip("partition_lag_per_partition").await else {
        return;
    };
    let (topic, group) = (unique("lag"), unique("g"));
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, &group, &GroupPolicy::default())
        .await
        .unwrap();
    for i in 0..9 {
        broker
            .publish(&topic, Message::new(format!("a{i}")))
            .await
            .unwrap();
    }
    let lag = broker.partition_lag(&topic, &group).await.unwrap();
    let main: Vec<_> = lag.iter().filter(|l| l.topic == topic).collect();
    assert_eq!(main.len(), 3, "one entry per partition: {lag:?}");
    assert!(
        main.iter().all(|l| l.lag == 3 && l.committed.is_none()),
        "round-robin spreads 9 over 3: {lag:?}"
    );
    assert_eq!(lag.iter().map(|l| l.lag).sum::<u64>(), 9);
    broker.shutdown().await.unwrap();
}
