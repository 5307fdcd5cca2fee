//! Spindle's Kafka adapter against raw rdkafka with the same settings, in one run.
//!
//! `cargo bench -p spindle-kafka --bench throughput` with tansu on 127.0.0.1:9092
//! (`scripts/start-tansu.sh`). Prints msgs/s for publish and consume and the ratio. Set
//! `SPINDLE_BENCH_MESSAGES` to change the count (default 20 000, 256-byte payloads).
//!
//! Both sides send the same bytes (payload + a `spindle-id` header), use the same producer
//! settings (acks=all, idempotence, linger) and the same consumer settings; consume clocks start
//! at the first message. Spindle's consumer acks every message and commits what is acked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use spindle_core::{Admin, Broker, Config, Message, Publisher, SubscribeOptions, Subscriber};

const ADDRESS: &str = "127.0.0.1:9092";
const PAYLOAD: usize = 256;
const CHUNK: usize = 500;

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn spindle_publish(broker: &spindle_kafka::KafkaBroker, topic: &str, n: usize) -> Duration {
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (sent..(sent + CHUNK).min(n))
            .map(|_| Message::new(vec![b'x'; PAYLOAD]))
            .collect();
        sent += batch.len();
        for r in broker.publish_batch(topic, batch).await {
            r.expect("publish");
        }
    }
    started.elapsed()
}

async fn raw_publish(
    producer: &FutureProducer,
    topic: &str,
    partitions: i32,
    n: usize,
) -> Duration {
    let payload = vec![b'x'; PAYLOAD];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let end = (sent + CHUNK).min(n);
        let futures: Vec<_> = (sent..end)
            .map(|i| {
                // The same bytes on the wire as Spindle's: payload plus an id header.
                let id = spindle_core::new_message_id();
                let headers = OwnedHeaders::new().insert(Header {
                    key: "spindle-id",
                    value: Some(id.as_bytes()),
                });
                let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                    .payload(&payload[..])
                    .headers(headers)
                    .partition((i % partitions as usize) as i32);
                producer.send(record, Duration::from_secs(30))
            })
            .collect();
        for r in futures::future::join_all(futures).await {
            r.expect("raw publish");
        }
        sent = end;
    }
    started.elapsed()
}

async fn spindle_consume(broker: &spindle_kafka::KafkaBroker, topic: &str, n: usize) -> Duration {
    let mut sub = broker
        .subscribe(
            topic,
            "bench",
            SubscribeOptions::default().with_prefetch(1000),
        )
        .await
        .expect("subscribe");
    // Like the raw consumer, the clock starts at the first message.
    let mut started = None;
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n {
        let d = match tokio::time::timeout(Duration::from_secs(5), sub.next_delivery()).await {
            Ok(item) => item.expect("stream").expect("delivery"),
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "spindle consumer read only {got} of {n}"
                );
                eprintln!("spindle consumer: {got} of {n} so far");
                continue;
            }
        };
        started.get_or_insert_with(Instant::now);
        got += 1;
        acks.push(d.ack());
        while acks.len() > 256 {
            acks.next().await.unwrap().expect("ack");
        }
    }
    while let Some(r) = acks.next().await {
        r.expect("ack");
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    sub.close().await.unwrap();
    elapsed
}

fn raw_consume(settings: &spindle_kafka::KafkaSettings, topic: &str, n: usize) -> Duration {
    // The same consumer settings the adapter uses, manual commits every 100 ms.
    let config = settings.consumer_config(&format!("{topic}.raw"));
    let consumer: BaseConsumer = config.create().expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut got = 0;
    let mut started = None;
    let mut last_commit = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            started.get_or_insert_with(Instant::now);
            got += 1;
            next.insert(m.partition(), m.offset() + 1);
        }
        if last_commit.elapsed() > Duration::from_millis(100) && !next.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                    .unwrap();
            }
            let _ = consumer.commit(&tpl, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    assert_eq!(got, n, "raw consumer read everything");
    started.map(|s| s.elapsed()).unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::net::TcpStream::connect_timeout(&ADDRESS.parse().unwrap(), Duration::from_secs(3))
        .is_err()
    {
        if spindle_contract::running_in_ci() {
            panic!("tansu is not reachable at {ADDRESS}");
        }
        eprintln!("SKIPPED throughput bench: tansu is not reachable at {ADDRESS}");
        return;
    }
    let n: usize = std::env::var("SPINDLE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let config = Config::parse(&format!("kafka://{ADDRESS}")).unwrap();
    let broker = spindle_kafka::connect(&config).await.expect("connect");
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (t_spindle, t_raw) = (format!("bench-spindle-{run}"), format!("bench-raw-{run}"));
    broker.ensure_topic(&t_spindle).await.unwrap();
    broker.ensure_topic(&t_raw).await.unwrap();
    let partitions = broker.settings().partitions;

    // The producer settings the adapter uses.
    let s = broker.settings();
    let producer: FutureProducer = s.producer_config().create().expect("raw producer");

    println!("{n} messages of {PAYLOAD} bytes, batches of {CHUNK}, tansu at {ADDRESS}");
    let sp = spindle_publish(&broker, &t_spindle, n).await;
    let rp = raw_publish(&producer, &t_raw, partitions, n).await;
    println!(
        "publish  spindle {:>9.0} msg/s   raw rdkafka {:>9.0} msg/s   ratio {:.2}",
        rate(n, sp),
        rate(n, rp),
        rate(n, sp) / rate(n, rp)
    );
    let sc = spindle_consume(&broker, &t_spindle, n).await;
    let settings = broker.settings().clone();
    let raw_topic = t_raw.clone();
    let rc = tokio::task::spawn_blocking(move || raw_consume(&settings, &raw_topic, n))
        .await
        .unwrap();
    println!(
        "consume  spindle {:>9.0} msg/s   raw rdkafka {:>9.0} msg/s   ratio {:.2}   (spindle acks every message)",
        rate(n, sc),
        rate(n, rc),
        rate(n, sc) / rate(n, rc)
    );
    // The topics are left in place: tansu 0.6.0's DeleteTopics removes every topic.
    broker.shutdown().await.unwrap();
}
