//! Memory backend throughput beside `tokio::sync::mpsc` and omniqueue's in-memory backend,
//! measured in the same run with 256-byte payloads (`BENCH_PAYLOAD` changes the size),
//! printing the ratios. In every end-to-end case the producer and the consumer are two tasks
//! on a two-worker runtime.
//!
//! Two payload modes, because they stress different things:
//! - shared: every message carries a clone of one `Bytes` (Spindle's API takes `Bytes`), so
//!   the producer allocates no payload;
//! - copied: every message gets a fresh copy of the payload, as omniqueue's `send_raw(&[u8])`
//!   always makes, so each payload is allocated on the producer's thread, and whichever thread
//!   frees it decides whether the allocator's cross-thread frees enter the measurement.
//!
//! (The memory backend copies payloads up to 1 KiB into its topic's buffers in both modes.)
//!
//! omniqueue's producer never yields to the scheduler (its send is ready at once), so its
//! producer and consumer mostly take turns on one worker; Spindle's publish yields every 128
//! calls, as tokio's own channels do, so the two run in parallel. The `omniqueue-coop` row
//! gives omniqueue's producer the same yields.
//!
//! `cargo bench -p spindle-memory --bench throughput`. `BENCH_MESSAGES` (default 1,000,000),
//! `BENCH_ROUNDS` (default 5; rounds are interleaved, best kept) and `BENCH_PAYLOAD` (bytes,
//! default 256) change the run;
//! `BENCH_RUNTIME=current-thread` runs everything on one thread (per-message cost without
//! parallelism); `BENCH_CASE=<name>` runs one case once, for profiling (names in `CASES`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use omniqueue::backends::InMemoryBackend;
use spindle_core::{Admin, Broker, Message, Publisher, SubscribeOptions, Subscriber};
use spindle_memory::MemoryBroker;

/// Payload size in bytes: `BENCH_PAYLOAD`, default 256 (the figure).
fn payload_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| env_number("BENCH_PAYLOAD", 256))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Shared,
    Copied,
}

fn make_payload(template: &Bytes, mode: Mode) -> Bytes {
    match mode {
        Mode::Shared => template.clone(),
        Mode::Copied => Bytes::copy_from_slice(template),
    }
}

/// The cases, in print order: (name, what it measures).
const CASES: &[(&str, &str)] = &[
    ("publish", "spindle: publish only (shared)"),
    ("receive", "spindle: receive + ack only"),
    ("spindle", "spindle: end to end, shared payload"),
    (
        "spindle-batch",
        "spindle: end to end, publish_batch(100), shared",
    ),
    ("spindle-copy", "spindle: end to end, copied payload"),
    ("mpsc", "tokio mpsc (bounded 256): shared payload"),
    ("mpsc-copy", "tokio mpsc (bounded 256): copied payload"),
    ("omniqueue", "omniqueue in-memory: copied payload (its API)"),
    (
        "omniqueue-coop",
        "omniqueue, producer yielding like spindle's",
    ),
];

async fn subscribed_broker() -> (MemoryBroker, spindle_core::Subscription) {
    let broker = MemoryBroker::new();
    broker.ensure_topic("bench").await.unwrap();
    let sub = broker
        .subscribe("bench", "g", SubscribeOptions::default().with_prefetch(256))
        .await
        .unwrap();
    (broker, sub)
}

/// Spindle: publish N (one call each), then receive and ack N.
async fn spindle_phases(n: usize) -> (Duration, Duration) {
    let (broker, mut sub) = subscribed_broker().await;
    let p = Bytes::from(vec![0xAB; payload_size()]);
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

/// Spindle end to end: a producer task and a consumer task at once. `batch` > 1 publishes
/// with `publish_batch`.
async fn spindle_end_to_end(n: usize, batch: usize, mode: Mode) -> Duration {
    let (broker, mut sub) = subscribed_broker().await;
    let template = Bytes::from(vec![0xAB; payload_size()]);
    let start = Instant::now();
    let producer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                if batch <= 1 {
                    let msg = Message::new(make_payload(&template, mode));
                    broker.publish("bench", msg).await.unwrap();
                    left -= 1;
                } else {
                    let k = left.min(batch);
                    let msgs = (0..k)
                        .map(|_| Message::new(make_payload(&template, mode)))
                        .collect();
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

async fn mpsc_end_to_end(n: usize, mode: Mode) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let template = Bytes::from(vec![0xAB; payload_size()]);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(make_payload(&template, mode)).await.unwrap();
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

async fn omniqueue_end_to_end(n: usize, cooperative: bool) -> Duration {
    let (producer, mut consumer) = InMemoryBackend::builder().build_pair().await.unwrap();
    let p = vec![0xAB; payload_size()];
    let start = Instant::now();
    let task = tokio::spawn(async move {
        for _ in 0..n {
            if cooperative {
                tokio::task::consume_budget().await;
            }
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

/// Runs one case once; returns its duration.
fn run_case(rt: &tokio::runtime::Runtime, case: &str, n: usize) -> Duration {
    match case {
        "publish" => rt.block_on(spindle_phases(n)).0,
        "receive" => rt.block_on(spindle_phases(n)).1,
        "spindle" => rt.block_on(spindle_end_to_end(n, 1, Mode::Shared)),
        "spindle-batch" => rt.block_on(spindle_end_to_end(n, 100, Mode::Shared)),
        "spindle-copy" => rt.block_on(spindle_end_to_end(n, 1, Mode::Copied)),
        "mpsc" => rt.block_on(mpsc_end_to_end(n, Mode::Shared)),
        "mpsc-copy" => rt.block_on(mpsc_end_to_end(n, Mode::Copied)),
        "omniqueue" => rt.block_on(omniqueue_end_to_end(n, false)),
        "omniqueue-coop" => rt.block_on(omniqueue_end_to_end(n, true)),
        other => panic!(
            "unknown BENCH_CASE `{other}`; cases: {:?}",
            CASES.iter().map(|c| c.0).collect::<Vec<_>>()
        ),
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn main() {
    let n = env_number("BENCH_MESSAGES", 1_000_000);
    let rounds = env_number("BENCH_ROUNDS", 5).max(1);
    let single_thread = std::env::var("BENCH_RUNTIME").as_deref() == Ok("current-thread");
    let rt = if single_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let runtime = if single_thread {
        "a current-thread runtime"
    } else {
        "2 worker threads"
    };
    if let Ok(case) = std::env::var("BENCH_CASE") {
        let d = run_case(&rt, &case, n);
        println!("{case}: {:.0} msg/s", rate(n, d));
        return;
    }
    println!(
        "memory backend throughput: {n} messages of {} bytes, {runtime}, \
         best of {rounds} interleaved rounds",
        payload_size()
    );
    // Interleaved, so a slow spell of the machine hits every contender alike.
    let mut best = vec![Duration::MAX; CASES.len()];
    for _ in 0..rounds {
        for (i, (case, _)) in CASES.iter().enumerate() {
            best[i] = best[i].min(run_case(&rt, case, n));
        }
    }
    let rates: Vec<f64> = best.iter().map(|d| rate(n, *d)).collect();
    let of = |name: &str| rates[CASES.iter().position(|c| c.0 == name).unwrap()];
    let omni = of("omniqueue");
    println!("{:<52} {:>12} {:>13}", "case", "msg/s", "vs omniqueue");
    for ((_, what), r) in CASES.iter().zip(&rates) {
        println!("{what:<52} {r:>12.0} {:>12.2}x", r / omni);
    }
    println!(
        "end to end, spindle / omniqueue: shared payload {:.2}, copied payload {:.2}; \
         spindle / mpsc: shared {:.2}, copied {:.2}",
        of("spindle") / omni,
        of("spindle-copy") / omni,
        of("spindle") / of("mpsc"),
        of("spindle-copy") / of("mpsc-copy"),
    );
}
