//! Resilience: 10,000 messages published while RabbitMQ is stopped and started (at one third
//! and at one half of the run), with a consumer running throughout. Every message whose
//! publish returned Ok must be consumed; duplicates are counted and printed.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spindle_core::{
    Admin, Broker, Config, GroupPolicy, Message, Publisher, SubscribeOptions, Subscriber,
};
use tokio::task::JoinSet;

const TOTAL: usize = 10_000;
/// Publishes in flight at once.
const WINDOW: usize = 64;
/// Pace: this many publishes started per 10 ms tick (about 1,500 messages a second), so the
/// run lasts long enough for both restarts to land in the middle of it.
const PER_TICK: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_publish_loses_nothing_acknowledged() {
    if !common::broker_available("restart_mid_publish").await {
        return;
    }
    let started = Instant::now();
    let config = Config::parse(&common::url()).unwrap();
    let broker = Arc::new(spindle_rabbitmq::connect(&config).await.unwrap());
    let run = format!("{}", std::process::id());
    let topic = format!("sp-restart-t-{run}");
    let group = format!("sp-restart-g-{run}");
    broker.ensure_topic(&topic).await.unwrap();
    broker
        .ensure_group(&topic, &group, &GroupPolicy::default())
        .await
        .unwrap();

    // The consumer runs through both restarts and must resume by itself.
    let got = Arc::new(Mutex::new(HashSet::<String>::new()));
    let duplicates = Arc::new(AtomicUsize::new(0));
    let stale_acks = Arc::new(AtomicUsize::new(0));
    let mut sub = broker
        .subscribe(
            &topic,
            &group,
            SubscribeOptions::default().with_prefetch(200),
        )
        .await
        .unwrap();
    let consumer = {
        let (got, duplicates, stale_acks) = (got.clone(), duplicates.clone(), stale_acks.clone());
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            while let Some(item) = sub.next_delivery().await {
                let Ok(d) = item else { continue };
                let id = d.message().id().to_string();
                if !seen.insert(id.clone()) {
                    // Delivered before (acked or not): a duplicate delivery.
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if d.ack().await.is_err() {
                    // Its channel died with the broker: it will come again.
                    stale_acks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                got.lock().unwrap().insert(id);
            }
        })
    };

    // Restarts run beside the publisher, which never pauses for them.
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let restarter = tokio::spawn(async move {
        let mut log = Vec::new();
        while let Some(at) = restart_rx.recv().await {
            let t = Instant::now();
            common::restart_rabbitmq().await;
            log.push((at, t.elapsed()));
        }
        log
    });

    let mut ok = HashSet::new();
    let mut errors = 0usize;
    let mut in_flight = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..TOTAL {
        if i == TOTAL / 3 || i == TOTAL / 2 {
            restart_tx.send(i).unwrap();
        }
        if i % PER_TICK == 0 {
            tick.tick().await;
        }
        while in_flight.len() >= WINDOW {
            let (id, r): (String, spindle_core::Result<()>) =
                in_flight.join_next().await.unwrap().unwrap();
            match r {
                Ok(()) => {
                    ok.insert(id);
                }
                Err(_) => errors += 1,
            }
        }
        let broker = broker.clone();
        let topic = topic.clone();
        in_flight.spawn(async move {
            let id = format!("rs-{i}");
            let r = broker
                .publish(&topic, Message::new(id.clone()).with_id(id.clone()))
                .await;
            (id, r)
        });
    }
    while let Some(done) = in_flight.join_next().await {
        let (id, r) = done.unwrap();
        match r {
            Ok(()) => {
                ok.insert(id);
            }
            Err(_) => errors += 1,
        }
    }
    drop(restart_tx);
    let restarts = restarter.await.unwrap();
    let published_after = started.elapsed();

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = ok.difference(&got.lock().unwrap()).count();
        if missing == 0 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let late duplicates show up in the count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = got.lock().unwrap().clone();
    let missing = ok.difference(&got).count();
    println!(
        "restart: {} of {TOTAL} publishes returned Ok, {errors} returned an error; {} consumed \
         ({} of them not acknowledged as Ok); {} duplicate deliveries; {} acks refused as stale; \
         {missing} missing; restarts (at message, took) {restarts:?}; published in {:?}, \
         total {:?}",
        ok.len(),
        got.len(),
        got.difference(&ok).count(),
        duplicates.load(Ordering::Relaxed),
        stale_acks.load(Ordering::Relaxed),
        published_after,
        started.elapsed()
    );
    assert_eq!(restarts.len(), 2, "both restarts ran");
    assert_eq!(
        missing, 0,
        "every message whose publish returned Ok is consumed"
    );
    assert!(
        ok.len() > TOTAL / 2,
        "most publishes succeed across restarts"
    );
    broker.delete_topic(&topic).await.unwrap();
    broker.shutdown().await.unwrap();
    consumer.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(110));
}
