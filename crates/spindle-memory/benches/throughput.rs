//! Memory backend throughput beside `tokio::sync::mpsc` and omniqueue's in-memory backend,
//! measured in the same run with 256-byte payloads, printing the ratios. In every end-to-end
//! case the producer and the consumer are two tasks on a two-worker runtime.
//!
//! `cargo bench -p spindle-memory --bench throughput` (set `BENCH_MESSAGES` to change the count).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use omniqueue::backends::InMemoryBackend;
use spindle_core::{Admin, Broker, Message, Publisher, SubscribeOptions, Subscriber};
use spindle_memory::MemoryBroker;

const PAYLOAD: usize = 256;
const ROUNDS: usize = 3;

fn payload() -> Bytes {
    Bytes::from(vec![0xAB; PAYLOAD])
}

/// Spindle: publish N (one call each), then receive and ack N.
async fn spindle_phases(n: usize) -> (Duration, Duration) {
    let broker = MemoryBroker::new();
    broker.ensure_topic("bench").await.unwrap();
    let mut sub = broker
        .subscribe("bench", "g", SubscribeOptions::default().with_prefetch(256))
        .await
        .unwrap();
    let p = payload();
    let start = Instant::now();
    for _ in 0..n {
        broker
            .publish("bench", Message::new(p.clone()))
            .await
            .unwrap();
    }
    let publish = start.elapsed();
    let start = Instant::now();
    for _ in 0..n {
        let d = sub.next().await.unwrap().unwrap();
        d.ack().await.unwrap();
    }
    let consume = start.elapsed();
    broker.shutdown().await.unwrap();
    (publish, consume)
}

/// Spindle end to end: a producer task and a consumer task at once.
async fn spindle_end_to_end(n: usize, batch: usize) -> Duration {
    let broker = MemoryBroker::new();
    broker.ensure_topic("bench").await.unwrap();
    let mut sub = broker
        .subscribe("bench", "g", SubscribeOptions::default().with_prefetch(256))
        .await
        .unwrap();
    let p = payload();
    let start = Instant::now();
    let producer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            if batch <= 1 {
                for _ in 0..n {
                    broker
                        .publish("bench", Message::new(p.clone()))
                        .await
                        .unwrap();
                }
            } else {
                let mut left = n;
                while left > 0 {
                    let k = left.min(batch);
                    let msgs = (0..k).map(|_| Message::new(p.clone())).collect();
                    for r in broker.publish_batch("bench", msgs).await {
                        r.unwrap();
                    }
                    left -= k;
                }
            }
        })
    };
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            let d = sub.next().await.unwrap().unwrap();
            d.ack().await.unwrap();
        }
    });
    producer.await.unwrap();
    consumer.await.unwrap();
    let took = start.elapsed();
    broker.shutdown().await.unwrap();
    took
}

async fn mpsc_end_to_end(n: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let p = payload();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(p.clone()).await.unwrap();
        }
    });
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            std::hint::black_box(rx.recv().await.unwrap());
        }
    });
    producer.await.unwrap();
    consumer.await.unwrap();
    start.elapsed()
}

async fn omniqueue_end_to_end(n: usize) -> Duration {
    let (producer, mut consumer) = InMemoryBackend::builder().build_pair().await.unwrap();
    let p = payload().to_vec();
    let start = Instant::now();
    let task = tokio::spawn(async move {
        for _ in 0..n {
            producer.send_raw(&p).await.unwrap();
        }
    });
    let receiver = tokio::spawn(async move {
        for _ in 0..n {
            let d = consumer.receive().await.unwrap();
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    });
    task.await.unwrap();
    receiver.await.unwrap();
    start.elapsed()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn best<F, Fut>(rt: &tokio::runtime::Runtime, f: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    (0..ROUNDS).map(|_| rt.block_on(f())).min().unwrap()
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("BENCH_CASE").as_deref() == Ok("phases") {
        // For profiling: only Spindle's publish, then receive + ack.
        let (p, c) = rt.block_on(spindle_phases(n));
        println!(
            "publish {:.0} msg/s, receive+ack {:.0} msg/s",
            rate(n, p),
            rate(n, c)
        );
        return;
    }
    if std::env::var("BENCH_CASE").as_deref() == Ok("e2e") {
        // For profiling: only Spindle end to end.
        let d = rt.block_on(spindle_end_to_end(n, 1));
        println!("spindle end to end: {:.0} msg/s", rate(n, d));
        return;
    }
    println!("memory backend throughput: {n} messages of {PAYLOAD} bytes, best of {ROUNDS}, 2 worker threads");

    let (mut publish, mut consume) = (Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS {
        let (p, c) = rt.block_on(spindle_phases(n));
        publish = publish.min(p);
        consume = consume.min(c);
    }
    let spindle_single = best(&rt, || spindle_end_to_end(n, 1));
    let spindle_batch = best(&rt, || spindle_end_to_end(n, 100));
    let mpsc = best(&rt, || mpsc_end_to_end(n));
    let omni = best(&rt, || omniqueue_end_to_end(n));

    let omni_rate = rate(n, omni);
    let rows = [
        ("spindle memory: publish only", rate(n, publish)),
        ("spindle memory: receive + ack only", rate(n, consume)),
        (
            "spindle memory: end to end, publish",
            rate(n, spindle_single),
        ),
        (
            "spindle memory: end to end, publish_batch(100)",
            rate(n, spindle_batch),
        ),
        ("tokio mpsc (bounded 256): end to end", rate(n, mpsc)),
        ("omniqueue in-memory: end to end", omni_rate),
    ];
    println!("{:<50} {:>14} {:>14}", "case", "msg/s", "vs omniqueue");
    for (name, r) in rows {
        println!("{name:<50} {r:>14.0} {:>13.2}x", r / omni_rate);
    }
    println!(
        "ratio spindle end-to-end / omniqueue = {:.2}, spindle end-to-end / mpsc = {:.2}",
        rate(n, spindle_single) / omni_rate,
        rate(n, spindle_single) / rate(n, mpsc)
    );
}
