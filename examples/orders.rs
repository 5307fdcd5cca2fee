//! The order-events story: an order service publishes `order_placed` events; the inventory,
//! payment, notification and analytics services each handle every event in their own group.
//! One poison order fails payment every time and lands in payment's dead-letter queue after 3
//! attempts. Prints what happened and exits.
//!
//! `cargo run --example orders` runs on the embedded memory backend; set `SPINDLE_URL` to run
//! the same code on another backend.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spindle::{
    Delivery, DynBroker, Error, GroupPolicy, Message, SubscribeOptions, Subscription,
    HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
};

const GROUPS: [&str; 4] = ["inventory", "payment", "notification", "analytics"];
const MAX_ATTEMPTS: u32 = 3;
const POISON_ORDER: u32 = 1004;
const STORY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u32,
    user_id: u32,
    amount: f64,
    card: String,
}

fn orders() -> Vec<OrderPlaced> {
    [
        (1001, 42, 99.99, "4242-ok"),
        (1002, 7, 15.50, "4242-ok"),
        (1003, 42, 230.00, "4242-ok"),
        (POISON_ORDER, 13, 12.00, "0000-expired"),
        (1005, 99, 48.25, "4242-ok"),
    ]
    .into_iter()
    .map(|(order_id, user_id, amount, card)| OrderPlaced {
        order_id,
        user_id,
        amount,
        card: card.to_string(),
    })
    .collect()
}

/// What one service does with an event. Only payment can fail, and only on the poison order.
fn handle(group: &str, order: &OrderPlaced) -> Result<String, String> {
    match group {
        "inventory" => Ok(format!("reserved stock for order {}", order.order_id)),
        "payment" if order.card.starts_with("0000") => Err(format!("card {} declined", order.card)),
        "payment" => Ok(format!(
            "charged ${:.2} for order {}",
            order.amount, order.order_id
        )),
        "notification" => Ok(format!(
            "emailed user {} about order {}",
            order.user_id, order.order_id
        )),
        _ => Ok(format!(
            "recorded order {} (${:.2})",
            order.order_id, order.amount
        )),
    }
}

/// One service: handles events until it has settled every order (acked, or gave up on it).
async fn run_service(
    group: &'static str,
    mut sub: Subscription,
    expected: usize,
    retry_delay: Option<Duration>,
) -> Result<BTreeSet<u32>, Error> {
    let mut handled = BTreeSet::new(); // idempotency: a redelivered, handled order is skipped
    let mut settled = BTreeSet::new();
    while settled.len() < expected {
        let delivery: Delivery = sub.next_delivery().await.ok_or(Error::Closed("stream"))??;
        let order: OrderPlaced = delivery.decode_json()?;
        if handled.contains(&order.order_id) {
            println!(
                "[{group:<12}] order {} again: already handled, acking",
                order.order_id
            );
            delivery.ack().await?;
            continue;
        }
        match handle(group, &order) {
            Ok(what) => {
                println!("[{group:<12}] {what}");
                delivery.ack().await?;
                handled.insert(order.order_id);
                settled.insert(order.order_id);
            }
            Err(why) => {
                let attempt = delivery.attempt();
                println!(
                    "[{group:<12}] order {} failed on attempt {attempt}/{MAX_ATTEMPTS}: {why}",
                    order.order_id
                );
                match retry_delay {
                    Some(delay) => delivery.nack_after(delay).await?,
                    None => delivery.nack().await?,
                }
                if attempt >= MAX_ATTEMPTS {
                    settled.insert(order.order_id);
                }
            }
        }
    }
    sub.close().await?;
    Ok(handled)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker: DynBroker = spindle::connect_from_env().await?;
    let caps = broker.capabilities();
    println!(
        "Spindle order-events demo on the `{}` backend\n",
        broker.name()
    );

    // A fresh topic per run, so a durable broker never replays an earlier run's events.
    let topic = format!("order_events-{}", &spindle::new_message_id()[24..]);
    broker.ensure_topic(&topic).await?;
    let policy = GroupPolicy::max_attempts(MAX_ATTEMPTS);
    let options = SubscribeOptions::default()
        .with_prefetch(50)
        .with_policy(policy.clone());
    let mut services = Vec::new();
    for group in GROUPS {
        broker.ensure_group(&topic, group, &policy).await?;
        let sub = broker.subscribe(&topic, group, options.clone()).await?;
        let retry_delay = caps.nack_delay.then_some(Duration::from_millis(100));
        services.push((
            group,
            tokio::spawn(run_service(group, sub, orders().len(), retry_delay)),
        ));
    }

    for order in orders() {
        let message = Message::json(&order)?
            .with_id(format!("order-{}", order.order_id))
            .with_key(format!("user-{}", order.user_id))
            .with_header("event", "order_placed");
        broker.publish(&topic, message).await?;
        println!(
            "[order-service] published order_placed {} (${:.2})",
            order.order_id, order.amount
        );
    }
    println!();

    let mut summary = BTreeMap::new();
    for (group, task) in services {
        let handled = tokio::time::timeout(STORY_TIMEOUT, task)
            .await
            .map_err(|_| format!("{group} did not finish within {STORY_TIMEOUT:?}"))???;
        summary.insert(group, handled);
    }

    // Queue-depth monitoring: what an alert would watch.
    if caps.depth {
        for group in GROUPS {
            let depth = broker.depth(&topic, group).await?;
            println!(
                "  {group:<12} depth: {} waiting, {} in flight, {} dead-lettered",
                depth.ready + depth.delayed,
                depth.in_flight,
                depth.dead_lettered
            );
        }
    }

    let mut dead = broker
        .subscribe_dead_letters(&topic, "payment", SubscribeOptions::default())
        .await?;
    let letter = tokio::time::timeout(STORY_TIMEOUT, dead.next_delivery())
        .await
        .map_err(|_| "the poison order never reached the dead-letter queue")?
        .ok_or("the dead-letter stream ended")??;
    let poison: OrderPlaced = letter.decode_json()?;
    println!(
        "\n[dead-letter ] payment gave up on order {} after {} attempts: {}",
        poison.order_id,
        letter.message().header(HEADER_ATTEMPT).unwrap_or("?"),
        letter
            .message()
            .header(HEADER_DEAD_LETTER_REASON)
            .unwrap_or("?"),
    );
    letter.ack().await?;
    dead.close().await?;

    println!("\nSummary ({} orders published):", orders().len());
    for (group, handled) in &summary {
        let ids: Vec<String> = handled.iter().map(u32::to_string).collect();
        println!(
            "  {group:<12} handled {} orders: {}",
            handled.len(),
            ids.join(", ")
        );
    }
    let complete = GROUPS.iter().all(|g| {
        let expected = if *g == "payment" {
            orders().len() - 1
        } else {
            orders().len()
        };
        summary[g].len() == expected
    }) && poison.order_id == POISON_ORDER;
    broker.shutdown().await?;
    if !complete {
        return Err("the story did not complete as expected".into());
    }
    println!("\nEvery service handled every order; the poison order is in the dead-letter queue.");
    Ok(())
}
