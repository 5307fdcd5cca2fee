//! Publish and end-to-end throughput through Spindle and through raw lapin with the same
//! settings: publisher confirms, persistent messages, mandatory flag, batches of 1,000
//! pipelined (all sent, then all confirms awaited), manual acks, the same prefetch.
//!
//! `cargo bench -p spindle-rabbitmq --bench throughput` (needs RabbitMQ on 127.0.0.1:5672;
//! `BENCH_MESSAGES` sets the count, default 20,000 per measurement).

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use spindle_core::{
    Admin, Broker, Config, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PAYLOAD: usize = 256;
const BATCH: usize = 1000;
const PREFETCH: u16 = 200;

fn count() -> usize {
    std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

async fn spindle_publish(broker: &spindle_rabbitmq::RabbitBroker, topic: &str, n: usize) {
    let payload = vec![7u8; PAYLOAD];
    let mut sent = 0;
    while sent < n {
        let k = BATCH.min(n - sent);
        let batch = (0..k).map(|_| Message::new(payload.clone())).collect();
        for r in broker.publish_batch(topic, batch).await {
            r.expect("spindle publish");
        }
        sent += k;
    }
}

async fn raw_publish(ch: &Channel, exchange: &str, n: usize) {
    let payload = vec![7u8; PAYLOAD];
    let mut sent = 0;
    while sent < n {
        let k = BATCH.min(n - sent);
        let mut confirms = Vec::with_capacity(k);
        for _ in 0..k {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(spindle_core::new_message_id().into());
            let c = ch
                .basic_publish(
                    exchange,
                    "",
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload,
                    props,
                )
                .await
                .expect("raw publish");
            confirms.push(c);
        }
        for c in futures::future::join_all(confirms).await {
            assert!(matches!(c.expect("confirm"), Confirmation::Ack(None)));
        }
        sent += k;
    }
}

async fn run() {
    let n = count();
    let config = Config::parse(URL).unwrap();
    let broker = spindle_rabbitmq::connect(&config).await.expect("connect");
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let raw = Connection::connect(URL, props).await.expect("raw connect");
    let id = std::process::id();
    let topic = |what: &str| format!("sp-bench-{what}-{id}");
    let group = "g";

    // Each measurement runs twice, in the orders spindle-raw and raw-spindle, on fresh
    // topics; the better run of each side is reported (order and queue state skew single runs).
    let ch = raw.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (mut spindle_pub, mut raw_pub, mut spindle_e2e, mut raw_e2e) = (0f64, 0f64, 0f64, 0f64);
    let mut topics = Vec::new();
    for round in 0..2 {
        for side in [round % 2, 1 - round % 2] {
            let tp = topic(&format!("pub-{round}-{side}"));
            let te = topic(&format!("e2e-{round}-{side}"));
            for t in [&tp, &te] {
                broker.ensure_topic(t).await.unwrap();
                broker
                    .ensure_group(t, group, &GroupPolicy::default())
                    .await
                    .unwrap();
            }
            topics.push(tp.clone());
            topics.push(te.clone());
            if side == 0 {
                spindle_publish(&broker, &tp, 500).await; // warm-up
                let t = Instant::now();
                spindle_publish(&broker, &tp, n).await;
                spindle_pub = spindle_pub.max(rate(n, t.elapsed()));

                let mut sub = broker
                    .subscribe(
                        &te,
                        group,
                        SubscribeOptions::default().with_prefetch(PREFETCH as usize),
                    )
                    .await
                    .unwrap();
                let t = Instant::now();
                let consumer = tokio::spawn(async move {
                    for _ in 0..n {
                        let d = sub.next_delivery().await.unwrap().unwrap();
                        d.ack().await.unwrap();
                    }
                    sub.close().await.unwrap();
                });
                spindle_publish(&broker, &te, n).await;
                consumer.await.unwrap();
                spindle_e2e = spindle_e2e.max(rate(n, t.elapsed()));
            } else {
                raw_publish(&ch, &tp, 500).await; // warm-up
                let t = Instant::now();
                raw_publish(&ch, &tp, n).await;
                raw_pub = raw_pub.max(rate(n, t.elapsed()));

                let cch = raw.create_channel().await.unwrap();
                cch.basic_qos(PREFETCH, BasicQosOptions { global: false })
                    .await
                    .unwrap();
                let mut raw_consumer = cch
                    .basic_consume(
                        &format!("{te}.{group}"),
                        "bench",
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                let t = Instant::now();
                let consumer = tokio::spawn(async move {
                    for _ in 0..n {
                        let d = raw_consumer.next().await.unwrap().unwrap();
                        d.ack(BasicAckOptions::default()).await.unwrap();
                    }
                    drop(raw_consumer);
                    let _ = cch.close(200, "done").await;
                });
                raw_publish(&ch, &te, n).await;
                consumer.await.unwrap();
                raw_e2e = raw_e2e.max(rate(n, t.elapsed()));
            }
        }
    }

    println!("throughput, {n} messages of {PAYLOAD} bytes, confirms + persistent + mandatory, batches of {BATCH}, prefetch {PREFETCH}:");
    println!(
        "  publish     spindle {spindle_pub:>9.0} msg/s   raw lapin {raw_pub:>9.0} msg/s   ratio {:.2}",
        spindle_pub / raw_pub
    );
    println!(
        "  end to end  spindle {spindle_e2e:>9.0} msg/s   raw lapin {raw_e2e:>9.0} msg/s   ratio {:.2}",
        spindle_e2e / raw_e2e
    );

    for t in &topics {
        let _ = broker.delete_topic(t).await;
    }
    broker.shutdown().await.unwrap();
    let _ = raw.close(200, "bench done").await;
}

fn main() {
    let reachable = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5672".parse().unwrap(),
        Duration::from_secs(3),
    )
    .is_ok();
    if !reachable {
        if spindle_contract::running_in_ci() {
            panic!(
                "throughput: RabbitMQ is not reachable at 127.0.0.1:5672, and CI=true requires it"
            );
        }
        eprintln!("SKIPPED throughput: RabbitMQ is not reachable at 127.0.0.1:5672");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(run());
    println!("  (bench ran in {:?})", started.elapsed());
}
