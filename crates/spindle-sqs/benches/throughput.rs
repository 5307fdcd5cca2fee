//! Requests per message and throughput of spindle-sqs against raw aws-sdk-sqs used one call
//! per message (SendMessage, ReceiveMessage of 1, DeleteMessage), both against moto.
//!
//! `cargo bench -p spindle-sqs --bench throughput` (moto on 127.0.0.1:4566; start it with
//! `scripts/start-moto.sh`). `BENCH_MESSAGES` sets the message count (default 500, which keeps a run near a minute: moto
//! spends time proportional to the queue length on every message).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spindle_core::{Admin, Broker, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber};

const ENDPOINT: &str = "http://127.0.0.1:4566";
const PUBLISHERS: usize = 50;

struct Figures {
    publish: Duration,
    consume: Duration,
    requests: u64,
}

async fn spindle_run(n: usize, run: &str) -> Figures {
    let url = format!(
        "sqs://?endpoint={ENDPOINT}&region=us-east-1&access_key_id=test&secret_access_key=test"
    );
    let broker = spindle_sqs::connect(&spindle_core::Config::parse(&url).unwrap())
        .await
        .expect("moto must be running (scripts/start-moto.sh)");
    let topic = format!("bench-spindle-{run}");
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, "g", &GroupPolicy::default())
        .await
        .unwrap();
    let before = broker.request_count();

    // Publish: PUBLISHERS concurrent tasks, each publishing single messages.
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let broker = broker.clone();
            let topic = topic.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    broker
                        .publish(&topic, Message::new(vec![b'x'; 256]))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let publish = started.elapsed();

    // Consume: one subscription, acks concurrent with handling.
    let started = Instant::now();
    let mut sub = broker
        .subscribe(&topic, "g", SubscribeOptions::default().with_prefetch(100))
        .await
        .unwrap();
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next_delivery())
            .await
            .expect("delivery")
            .unwrap()
            .unwrap();
        acks.push(tokio::spawn(d.ack()));
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let consume = started.elapsed();
    sub.close().await.unwrap();
    let requests = broker.request_count() - before;
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
    Figures {
        publish,
        consume,
        requests,
    }
}

async fn raw_client() -> aws_sdk_sqs::Client {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(ENDPOINT)
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&sdk)
}

async fn raw_run(n: usize, run: &str) -> Figures {
    let client = raw_client().await;
    let url: Arc<str> = client
        .create_queue()
        .queue_name(format!("bench-raw-{run}"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .into();
    let body = "x".repeat(256);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (client, url, next, body) =
                (client.clone(), url.clone(), next.clone(), body.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    client
                        .send_message()
                        .queue_url(&*url)
                        .message_body(&body)
                        .send()
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let publish = started.elapsed();
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (client, url, done, requests) =
                (client.clone(), url.clone(), done.clone(), requests.clone());
            tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < n {
                    let out = client
                        .receive_message()
                        .queue_url(&*url)
                        .max_number_of_messages(1)
                        .wait_time_seconds(1)
                        .send()
                        .await
                        .unwrap();
                    requests.fetch_add(1, Ordering::Relaxed);
                    for m in out.messages() {
                        client
                            .delete_message()
                            .queue_url(&*url)
                            .receipt_handle(m.receipt_handle().unwrap())
                            .send()
                            .await
                            .unwrap();
                        requests.fetch_add(1, Ordering::Relaxed);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let consume = started.elapsed();
    let _ = client.delete_queue().queue_url(&*url).send().await;
    Figures {
        publish,
        consume,
        requests: (n + requests.load(Ordering::Relaxed)) as u64,
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let s = spindle_run(n, &run).await;
        let r = raw_run(n, &run).await;
        let per_msg = s.requests as f64 / n as f64;
        let raw_per_msg = r.requests as f64 / n as f64;
        println!("messages: {n} of 256 bytes, {PUBLISHERS} concurrent publishers, against moto");
        println!(
            "spindle-sqs: {:.3} requests/message ({} requests); publish {:.0} msg/s, consume+ack {:.0} msg/s, end to end {:.0} msg/s",
            per_msg,
            s.requests,
            rate(n, s.publish),
            rate(n, s.consume),
            rate(n, s.publish + s.consume)
        );
        println!(
            "raw aws-sdk-sqs, one call per message: {:.3} requests/message ({} requests); publish {:.0} msg/s, consume+ack {:.0} msg/s, end to end {:.0} msg/s",
            raw_per_msg,
            r.requests,
            rate(n, r.publish),
            rate(n, r.consume),
            rate(n, r.publish + r.consume)
        );
        println!(
            "ratios spindle/raw: requests {:.2}, publish throughput {:.2}x, consume throughput {:.2}x, end to end {:.2}x",
            per_msg / raw_per_msg,
            rate(n, s.publish) / rate(n, r.publish),
            rate(n, s.consume) / rate(n, r.consume),
            rate(n, s.publish + s.consume) / rate(n, r.publish + r.consume)
        );
        println!(
            "target: at most 0.35 requests/message: {}",
            if per_msg <= 0.35 { "met" } else { "NOT met" }
        );
    });
}
