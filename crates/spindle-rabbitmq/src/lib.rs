//! Spindle's RabbitMQ backend (AMQP 0-9-1, checked against RabbitMQ 3.10).
//!
//! ```no_run
//! # async fn demo() -> spindle_core::Result<()> {
//! use spindle_core::{Admin, Config, Message, Publisher, SubscribeOptions, Subscriber};
//! let broker = spindle_rabbitmq::connect(&Config::parse("amqp://guest:guest@127.0.0.1:5672/%2f")?).await?;
//! broker.ensure_topic("orders").await?;
//! let mut sub = broker.subscribe("orders", "billing", SubscribeOptions::default()).await?;
//! broker.publish("orders", Message::new("order #1")).await?;
//! let delivery = sub.next_delivery().await.unwrap()?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! # URL and options
//!
//! `amqp://user:password@host:5672/vhost` or `amqps://…` (the vhost `/` is written `%2f`).
//! Options (URL query or config file), unknown ones rejected:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `prefetch` | 128 | prefetch used when a subscription leaves [`SubscribeOptions::prefetch`](spindle_core::SubscribeOptions) at its default (1..=65535) |
//! | `queue_type` | `classic` | `classic` or `quorum`, for group and dead-letter queues |
//! | `connect_timeout_ms` | 5000 | bound on opening a connection (TCP, TLS, login, vhost) |
//! | `operation_timeout_ms` | 10000 | bound on every other broker call, and on reconnecting |
//! | `max_payload_bytes` | 4194304 | largest payload accepted (at most 128 MiB, RabbitMQ's own limit) |
//! | `max_delay_ms` | 604800000 | longest publish or nack delay (7 days; at most 2147483647, about 24.8 days, so a wait queue's `x-expires` stays in range) |
//!
//! # Topology (created by the adapter)
//!
//! | Spindle | RabbitMQ |
//! |---|---|
//! | topic `T` | durable `fanout` exchange `T` ([`Admin::ensure_topic`]); publishing or subscribing to a missing one is [`Error::NotFound`] (checked with a passive declare) |
//! | group `G` of `T` | durable queue `T.G` (classic, or quorum with `queue_type=quorum`) bound to `T`, with `x-dead-letter-exchange = T.G.dlx` |
//! | dead letters of `G` | durable fanout exchange `T.G.dlx` and queue `T.G.dlq` bound to it |
//! | nack with delay `d` | queue `T.G.wait.<ms>` with `x-message-ttl = ms`, dead-lettering to `T.G` through the default exchange; `x-expires` removes it when unused |
//! | publish with delay `d` | queue `T.~wait.<ms>` with `x-message-ttl = ms`, dead-lettering to exchange `T` |
//!
//! Delays are rounded **up** (10 ms steps below 1 s, 100 ms below 1 min, 1 s below 1 h, then
//! 1 min) so one TTL per queue keeps expiry in order; a message never arrives early.
//!
//! Messages: persistent (`delivery_mode` 2); the Spindle id is `message_id`, the content type
//! is `content_type`, headers are AMQP headers with long-string values, the key is the routing
//! key and the `spindle-key` header, the attempt number is the `spindle-attempt` header (absent
//! on the first attempt). A plain AMQP client reads these naturally; a plain client's message
//! (no Spindle headers, maybe no `message_id`) is consumed as attempt 1, with a fresh id if it
//! has none.
//!
//! # Semantics
//!
//! - **Publish** returns `Ok` once the broker confirmed the message (publisher confirms on one
//!   shared channel, pipelined: concurrent publishes and batches keep many in flight). It is
//!   `mandatory`: a topic with no group gives [`Error::Unroutable`]. Payloads over
//!   `max_payload_bytes` are refused before sending.
//! - **Consume**: manual acks, `basic.qos` with the subscription's prefetch (per consumer,
//!   never unlimited).
//! - **Nack** republishes the message (confirmed) to the group's queue, or to a wait queue for
//!   a delay, with `spindle-attempt` one higher, then acks the original; a dropped delivery
//!   does the same from a background task. After `max_attempts` the message goes to the
//!   dead-letter queue with `spindle-dead-letter-reason`, `spindle-attempt` and
//!   `spindle-original-topic`. `basic.nack` with requeue cannot change headers, hence the
//!   republish; the cost is that a nacked message goes to the back of the queue.
//! - **Close** (graceful drain): `basic.cancel`, then what was fetched but not yielded goes
//!   back with `basic.nack(requeue)` (no attempt counted); yielded deliveries still ack on the
//!   same channel, which stays open until they are all decided.
//! - **Crash**: messages a vanished consumer held are requeued by the broker with their
//!   `spindle-attempt` unchanged, so a crash does not count an attempt (with either queue
//!   type; quorum queues' `x-delivery-count` is not used). A process that crashes on a
//!   message every time is therefore not stopped by `max_attempts`.
//! - **Reconnect**: the next call after a lost connection reconnects with backoff (100 ms
//!   doubling to 2 s, within `operation_timeout_ms`); a publish in flight when the connection
//!   drops returns [`Error::Connection`] (it may or may not have been stored: at-least-once).
//!   Consumers resume by themselves; deliveries of the lost channel then fail to ack with
//!   [`Error::StaleDelivery`] and are redelivered.
//!
//! # Capabilities and limits
//!
//! | capability | value |
//! |---|---|
//! | fan-out groups | yes |
//! | ordering per key | no (competing consumers and republished nacks reorder) |
//! | nack delay / delayed publish | yes, up to `max_delay_ms` (7 days; RabbitMQ's TTL allows 49 days) |
//! | native dead letter | no: the adapter moves messages (the queue's `x-dead-letter-exchange` also catches plain clients' rejects) |
//! | ack deadline / extend | no: RabbitMQ keeps an unacked message until its channel closes; [`Delivery::extend`](spindle_core::Delivery::extend) is [`Error::Unsupported`] |
//! | max payload | `max_payload_bytes` (4 MiB by default) |
//! | max batch | 1000: `publish_batch` takes any number and keeps up to 1000 awaiting confirms |
//! | replay | no; unroutable publishes are rejected |
//! | durable | yes (durable queues, persistent messages, confirms) |
//! | depth / purge / redrive | yes |
//!
//! `amqps://` uses rustls with the platform's root certificates; it compiles but was not
//! exercised against a TLS listener here.
//!
//! Known limits: a delayed publish is not checked for routability (it goes to a wait queue,
//! which always accepts it); if the topic has no group when the delay ends, RabbitMQ drops the
//! message, since dead-lettering is not `mandatory`. [`Admin::depth`]
//! `ready` is the queue's ready count; `in_flight` counts deliveries held by consumers **of
//! this process** (AMQP 0-9-1 does not report unacked counts; use the management API for the
//! cluster-wide figure); `delayed` counts wait queues this process created.
//! [`Admin::delete_topic`] deletes the exchange and the groups this process knows of. A group's
//! `max_attempts` is the one given to [`Admin::ensure_group`] or to the first subscription in
//! this process.

#![deny(missing_docs)]

mod codec;
mod conn;
mod consumer;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use spindle_core::{
    async_trait, Admin, Broker, Capabilities, Config, Error, GroupDepth, GroupPolicy, Message,
    PublishOptions, Publisher, Result, SubscribeOptions, Subscriber, Subscription, HEADER_ATTEMPT,
    HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_TOPIC,
};
use tokio::sync::watch;

use conn::Conn;
use consumer::{ConsumerShared, Target};

/// The URL schemes this backend answers to.
pub const SCHEMES: &[&str] = &["amqp", "amqps"];

pub(crate) const BACKEND: &str = "rabbitmq";

/// Most messages one `publish_batch` call sends before awaiting their confirms.
pub const MAX_BATCH: usize = 1000;

static OPEN_BROKERS: AtomicUsize = AtomicUsize::new(0);

/// How many [`RabbitBroker`]s in this process are connected and not shut down. For tests
/// that restart the broker and must wait for other users to finish.
pub fn open_brokers() -> usize {
    OPEN_BROKERS.load(Ordering::Acquire)
}

/// Which kind of queue groups use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues (the default).
    Classic,
    /// Quorum queues (replicated; RabbitMQ 3.8+).
    Quorum,
}

/// Settings read from the URL's options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitSettings {
    /// Prefetch used when a subscription keeps the default prefetch.
    pub prefetch: u16,
    /// Queue type for groups and dead-letter queues.
    pub queue_type: QueueType,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
    /// Bound on every other broker call and on reconnecting.
    pub operation_timeout: Duration,
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
    /// Longest publish or nack delay.
    pub max_delay: Duration,
}

impl Default for RabbitSettings {
    fn default() -> Self {
        RabbitSettings {
            prefetch: 128,
            queue_type: QueueType::Classic,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            max_payload_bytes: 4 * 1024 * 1024,
            max_delay: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl RabbitSettings {
    /// Reads the options of an `amqp://` or `amqps://` config, rejecting unknown ones.
    pub fn from_config(config: &Config) -> Result<Self> {
        if !SCHEMES.contains(&config.scheme()) {
            return Err(Error::InvalidConfig(format!(
                "rabbitmq backend cannot use scheme `{}`",
                config.scheme()
            )));
        }
        let mut s = RabbitSettings::default();
        let mut o = config.option_reader(BACKEND);
        if let Some(v) = o.parse::<u16>("prefetch")? {
            if v == 0 {
                return Err(Error::InvalidConfig(
                    "rabbitmq: option `prefetch` must be at least 1 (unlimited is not offered)"
                        .into(),
                ));
            }
            s.prefetch = v;
        }
        if let Some(v) = o.string("queue_type") {
            s.queue_type = match v.as_str() {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                other => {
                    return Err(Error::InvalidConfig(format!(
                        "rabbitmq: option `queue_type` must be `classic` or `quorum`, not `{other}`"
                    )))
                }
            };
        }
        if let Some(v) = o.millis("connect_timeout_ms")? {
            s.connect_timeout = v.max(Duration::from_millis(1));
        }
        if let Some(v) = o.millis("operation_timeout_ms")? {
            s.operation_timeout = v.max(Duration::from_millis(1));
        }
        if let Some(v) = o.parse::<usize>("max_payload_bytes")? {
            if v == 0 || v > 128 * 1024 * 1024 {
                return Err(Error::InvalidConfig(
                    "rabbitmq: option `max_payload_bytes` must be between 1 and 134217728".into(),
                ));
            }
            s.max_payload_bytes = v;
        }
        if let Some(v) = o.millis("max_delay_ms")? {
            if v > Duration::from_millis(u32::MAX as u64 / 2) {
                return Err(Error::InvalidConfig(
                    "rabbitmq: option `max_delay_ms` must be at most 2147483647 (RabbitMQ's TTL limit)"
                        .into(),
                ));
            }
            s.max_delay = v;
        }
        o.finish()?;
        Ok(s)
    }
}

/// Connects to RabbitMQ. Fails within `connect_timeout_ms` with [`Error::Authentication`]
/// (wrong credentials), [`Error::NotFound`] (missing vhost) or [`Error::Connection`].
pub async fn connect(config: &Config) -> Result<RabbitBroker> {
    let settings = RabbitSettings::from_config(config)?;
    let conn = Conn::new(config, settings.connect_timeout, settings.operation_timeout);
    let connection = conn.connect_once().await?;
    conn.install(connection).await;
    OPEN_BROKERS.fetch_add(1, Ordering::AcqRel);
    Ok(RabbitBroker {
        core: Arc::new(Core {
            conn,
            settings,
            shut_down: AtomicBool::new(false),
            publish_closed: AtomicBool::new(false),
            counted: AtomicBool::new(true),
            shutdown: watch::channel(false).0,
            topics: Mutex::new(HashSet::new()),
            policies: Mutex::new(HashMap::new()),
            consumers: Mutex::new(Vec::new()),
            wait_queues: Mutex::new(HashMap::new()),
        }),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Core {
    conn: Conn,
    settings: RabbitSettings,
    shut_down: AtomicBool,
    publish_closed: AtomicBool,
    counted: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Topics known to exist (declared or checked by this process).
    topics: Mutex<HashSet<String>>,
    /// Group policies by queue name.
    policies: Mutex<HashMap<String, GroupPolicy>>,
    consumers: Mutex<Vec<Weak<ConsumerShared>>>,
    /// Wait queues created, by the queue or topic they feed.
    wait_queues: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.uncount();
    }
}

fn queue_name(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

/// Rounds a delay up to its bucket, in milliseconds.
fn delay_bucket(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000).max(1) as u64;
    let step = match ms {
        0..=1_000 => 10,
        1_001..=60_000 => 100,
        60_001..=3_600_000 => 1_000,
        _ => 60_000,
    };
    ms.div_ceil(step) * step
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

impl Core {
    fn uncount(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            OPEN_BROKERS.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn check_open(&self) -> Result<()> {
        if self.shut_down.load(Ordering::Acquire) {
            return Err(Error::Closed("the rabbitmq broker was shut down"));
        }
        Ok(())
    }

    fn queue_args(&self, dlx: Option<&str>) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(dlx) = dlx {
            args.insert("x-dead-letter-exchange".into(), long_string(dlx));
        }
        if self.settings.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        args
    }

    fn durable_queue() -> QueueDeclareOptions {
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        }
    }

    /// Whether the exchange of `topic` exists: cached, else a passive declare.
    async fn check_topic(&self, topic: &str) -> Result<()> {
        if lock(&self.topics).contains(topic) {
            return Ok(());
        }
        let ch = self.conn.channel().await?;
        let result = self
            .conn
            .op(
                "exchange.declare (passive)",
                ch.exchange_declare(
                    topic,
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
        match result {
            Ok(()) => {
                lock(&self.topics).insert(topic.to_string());
                Ok(())
            }
            Err(Error::NotFound { .. }) => Err(Error::not_found(format!(
                "topic `{topic}` (no such exchange)"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Message and consumer counts of a queue, `None` if it does not exist.
    async fn queue_counts(&self, queue: &str) -> Result<Option<(u64, u64)>> {
        let ch = self.conn.channel().await?;
        match self
            .conn
            .op(
                "queue.declare (passive)",
                ch.queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await
        {
            Ok(q) => Ok(Some((q.message_count() as u64, q.consumer_count() as u64))),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        if group.is_empty() {
            return Err(Error::InvalidArgument("group name is empty".into()));
        }
        self.check_topic(topic).await?;
        let q = queue_name(topic, group);
        let dlx = format!("{q}.dlx");
        let dlq = format!("{q}.dlq");
        let ch = self.conn.channel().await?;
        let c = &self.conn;
        c.op(
            "exchange.declare",
            ch.exchange_declare(
                &dlx,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        c.op(
            "queue.declare",
            ch.queue_declare(&dlq, Self::durable_queue(), self.queue_args(None)),
        )
        .await?;
        c.op(
            "queue.bind",
            ch.queue_bind(
                &dlq,
                &dlx,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        c.op(
            "queue.declare",
            ch.queue_declare(&q, Self::durable_queue(), self.queue_args(Some(&dlx))),
        )
        .await?;
        c.op(
            "queue.bind",
            ch.queue_bind(
                &q,
                topic,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|e| match e {
            Error::NotFound { .. } => {
                Error::not_found(format!("topic `{topic}` (no such exchange)"))
            }
            e => e,
        })?;
        Ok(())
    }

    /// Declares (or refreshes) a wait queue; returns its name.
    async fn wait_queue(
        &self,
        name: String,
        ttl_ms: u64,
        dead_letter_exchange: &str,
        dead_letter_routing_key: Option<&str>,
        feeds: &str,
    ) -> Result<String> {
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(ttl_ms as i64),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt((ttl_ms * 2 + 60_000) as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long_string(dead_letter_exchange),
        );
        if let Some(rk) = dead_letter_routing_key {
            args.insert("x-dead-letter-routing-key".into(), long_string(rk));
        }
        let ch = self.conn.channel().await?;
        self.conn
            .op(
                "queue.declare (wait queue)",
                ch.queue_declare(&name, Self::durable_queue(), args),
            )
            .await?;
        lock(&self.wait_queues)
            .entry(feeds.to_string())
            .or_default()
            .insert(name.clone());
        Ok(name)
    }

    pub(crate) async fn group_wait_queue(&self, queue: &str, delay: Duration) -> Result<String> {
        let ms = delay_bucket(delay);
        self.wait_queue(format!("{queue}.wait.{ms}"), ms, "", Some(queue), queue)
            .await
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm> {
        let ch = self.conn.publisher().await?;
        self.send_on(&ch, exchange, routing_key, payload, props)
            .await
    }

    async fn send_on(
        &self,
        ch: &lapin::Channel,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm> {
        self.conn
            .op(
                "basic.publish",
                ch.basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    props,
                ),
            )
            .await
    }

    async fn confirmed(&self, confirm: PublisherConfirm, topic: &str) -> Result<()> {
        match self.conn.op("publisher confirm", confirm).await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(Error::Unroutable {
                topic: topic.to_string(),
            }),
            Confirmation::Nack(_) => Err(Error::backend(
                BACKEND,
                "the broker refused the message (publisher nack)",
                true,
                None,
            )),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub(crate) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
        topic: &str,
    ) -> Result<()> {
        let result = match self.send(exchange, routing_key, payload, props).await {
            Ok(confirm) => self.confirmed(confirm, topic).await,
            Err(e) => Err(e),
        };
        self.forget_if_missing(result, topic)
    }

    /// A 404 while publishing means the exchange went away after it was checked: forget it,
    /// so the next publish checks again, and name the topic.
    fn forget_if_missing(&self, result: Result<()>, topic: &str) -> Result<()> {
        match result {
            Err(Error::NotFound { what }) => {
                lock(&self.topics).remove(topic);
                Err(Error::not_found(format!("topic `{topic}` ({what})")))
            }
            other => other,
        }
    }

    fn check_publish(&self, message: &Message, options: &PublishOptions) -> Result<()> {
        if self.publish_closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the publisher was closed"));
        }
        self.check_open()?;
        let max = self.settings.max_payload_bytes;
        if message.payload().len() > max {
            return Err(Error::PayloadTooLarge {
                size: message.payload().len(),
                max,
            });
        }
        if let Some(delay) = options.delay {
            if delay > self.settings.max_delay {
                return Err(Error::DelayTooLong {
                    requested: delay,
                    max: self.settings.max_delay,
                });
            }
        }
        Ok(())
    }

    /// Where a message for `topic` goes: the exchange, or a wait queue for a delay.
    async fn route(
        &self,
        topic: &str,
        message: &Message,
        delay: Option<Duration>,
    ) -> Result<(String, String)> {
        match delay {
            Some(d) if !d.is_zero() => {
                let ms = delay_bucket(d);
                let q = self
                    .wait_queue(format!("{topic}.~wait.{ms}"), ms, topic, None, topic)
                    .await?;
                Ok((String::new(), q))
            }
            _ => Ok((topic.to_string(), message.key().unwrap_or("").to_string())),
        }
    }

    fn live_consumers(&self) -> Vec<Arc<ConsumerShared>> {
        let mut list = lock(&self.consumers);
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }
}

/// A connected RabbitMQ backend. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RabbitBroker {
    core: Arc<Core>,
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("settings", &self.core.settings)
            .finish_non_exhaustive()
    }
}

impl RabbitBroker {
    /// The settings in force.
    pub fn settings(&self) -> &RabbitSettings {
        &self.core.settings
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        dead_letters: bool,
    ) -> Result<Subscription> {
        self.core.check_open()?;
        options.validate()?;
        let prefetch = if options.prefetch == SubscribeOptions::DEFAULT_PREFETCH {
            self.core.settings.prefetch
        } else {
            u16::try_from(options.prefetch).map_err(|_| {
                Error::InvalidArgument(format!(
                    "prefetch {} is over RabbitMQ's maximum of 65535",
                    options.prefetch
                ))
            })?
        };
        let group_queue = queue_name(topic, group);
        let max_attempts = {
            let mut policies = lock(&self.core.policies);
            policies
                .entry(group_queue.clone())
                .or_insert_with(|| options.policy.clone())
                .max_attempts
        };
        let queue = if dead_letters {
            self.core.check_topic(topic).await?;
            let dlq = format!("{group_queue}.dlq");
            if self.core.queue_counts(&dlq).await?.is_none() {
                return Err(Error::not_found(format!(
                    "group `{group}` of topic `{topic}` (no dead-letter queue `{dlq}`)"
                )));
            }
            dlq
        } else {
            self.core.declare_group(topic, group).await?;
            group_queue.clone()
        };
        let target = Target {
            topic: topic.into(),
            group: group.into(),
            dlx: format!("{group_queue}.dlx"),
            queue,
            dead_letters,
            max_attempts,
            prefetch,
        };
        let (shared, subscription) = consumer::start(self.core.clone(), target).await?;
        {
            let mut consumers = lock(&self.core.consumers);
            consumers.retain(|w| w.strong_count() > 0);
            consumers.push(Arc::downgrade(&shared));
        }
        Ok(subscription)
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish_with(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> Result<()> {
        let core = &self.core;
        core.check_publish(&message, options)?;
        core.check_topic(topic).await?;
        let (exchange, routing_key) = core.route(topic, &message, options.delay).await?;
        let (props, _) = codec::encode(&message, 1, &[]);
        core.publish_confirmed(&exchange, &routing_key, message.payload(), props, topic)
            .await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        let core = &self.core;
        let options = PublishOptions::default();
        // One channel for the whole batch (taken once, not per message).
        let topic_ok = match core.check_topic(topic).await {
            Ok(()) => core.conn.publisher().await,
            Err(e) => Err(e),
        };
        let mut results: Vec<Result<()>> = Vec::with_capacity(messages.len());
        let mut confirms = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let ch = match &topic_ok {
                Ok(ch) => ch,
                Err(e) => {
                    results.push(Err(clone_error(e)));
                    continue;
                }
            };
            if let Err(e) = core.check_publish(m, &options) {
                results.push(Err(e));
                continue;
            }
            let (props, routing_key) = codec::encode(m, 1, &[]);
            match core
                .send_on(ch, topic, &routing_key, m.payload(), props)
                .await
            {
                Ok(confirm) => {
                    results.push(Ok(()));
                    confirms.push((i, confirm));
                }
                Err(e) => results.push(core.forget_if_missing(Err(e), topic)),
            }
            // Keep at most MAX_BATCH confirms outstanding.
            if confirms.len() >= MAX_BATCH {
                for (i, c) in confirms.drain(..) {
                    results[i] = core.forget_if_missing(core.confirmed(c, topic).await, topic);
                }
            }
        }
        let pending = confirms
            .into_iter()
            .map(|(i, c)| async move { (i, core.confirmed(c, topic).await) });
        for (i, r) in futures::future::join_all(pending).await {
            results[i] = core.forget_if_missing(r, topic);
        }
        results
    }

    async fn flush(&self) -> Result<()> {
        // Every publish waits for its own confirm: nothing is left to flush.
        self.core.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.core.publish_closed.store(true, Ordering::Release);
        Ok(())
    }
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::NotFound { what } => Error::NotFound { what: what.clone() },
        Error::Closed(w) => Error::Closed(w),
        Error::Timeout { operation, after } => Error::Timeout {
            operation,
            after: *after,
        },
        e => Error::backend(BACKEND, e.to_string(), e.is_transient(), None),
    }
}

#[async_trait]
impl Subscriber for RabbitBroker {
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.consume(topic, group, options, false).await
    }

    async fn subscribe_dead_letters(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.consume(topic, group, options, true).await
    }
}

#[async_trait]
impl Admin for RabbitBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.core.check_open()?;
        if topic.is_empty() {
            return Err(Error::InvalidArgument("topic name is empty".into()));
        }
        let ch = self.core.conn.channel().await?;
        self.core
            .conn
            .op(
                "exchange.declare",
                ch.exchange_declare(
                    topic,
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
        lock(&self.core.topics).insert(topic.to_string());
        Ok(())
    }

    async fn ensure_group(&self, topic: &str, group: &str, policy: &GroupPolicy) -> Result<()> {
        self.core.check_open()?;
        policy.validate()?;
        self.core.declare_group(topic, group).await?;
        lock(&self.core.policies).insert(queue_name(topic, group), policy.clone());
        Ok(())
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<GroupDepth> {
        self.core.check_open()?;
        let q = queue_name(topic, group);
        let (ready, _) = self
            .core
            .queue_counts(&q)
            .await?
            .ok_or_else(|| Error::not_found(format!("group `{group}` of topic `{topic}`")))?;
        let dead = self
            .core
            .queue_counts(&format!("{q}.dlq"))
            .await?
            .map_or(0, |c| c.0);
        let in_flight = self
            .core
            .live_consumers()
            .iter()
            .filter(|c| c.target.queue == q)
            .map(|c| c.in_flight())
            .sum();
        let waits: Vec<String> = {
            let w = lock(&self.core.wait_queues);
            [q.as_str(), topic]
                .iter()
                .filter_map(|k| w.get(*k))
                .flatten()
                .cloned()
                .collect()
        };
        let mut delayed = 0;
        for w in waits {
            delayed += self.core.queue_counts(&w).await?.map_or(0, |c| c.0);
        }
        Ok(GroupDepth::new(ready, in_flight, delayed, dead))
    }

    async fn purge(&self, topic: &str, group: &str) -> Result<u64> {
        self.core.check_open()?;
        let q = queue_name(topic, group);
        let ch = self.core.conn.channel().await?;
        self.core
            .conn
            .op(
                "queue.purge",
                ch.queue_purge(&q, QueuePurgeOptions::default()),
            )
            .await
            .map(u64::from)
            .map_err(|e| match e {
                Error::NotFound { .. } => {
                    Error::not_found(format!("group `{group}` of topic `{topic}`"))
                }
                e => e,
            })
    }

    async fn redrive(&self, topic: &str, group: &str) -> Result<u64> {
        self.core.check_open()?;
        let q = queue_name(topic, group);
        let dlq = format!("{q}.dlq");
        let (count, _) = self
            .core
            .queue_counts(&dlq)
            .await?
            .ok_or_else(|| Error::not_found(format!("group `{group}` of topic `{topic}`")))?;
        let ch = self.core.conn.channel().await?;
        let c = &self.core.conn;
        let mut moved = 0;
        while moved < count {
            let Some(got) = c
                .op(
                    "basic.get",
                    ch.basic_get(&dlq, BasicGetOptions { no_ack: false }),
                )
                .await?
            else {
                break;
            };
            let d = got.delivery;
            let (message, _) = codec::decode(
                &d.properties,
                d.exchange.as_str(),
                d.routing_key.as_str(),
                d.data,
            );
            let mut message = Arc::unwrap_or_clone(message);
            for h in [
                HEADER_ATTEMPT,
                HEADER_DEAD_LETTER_REASON,
                HEADER_ORIGINAL_TOPIC,
            ] {
                message.headers_mut().remove(h);
            }
            let (props, _) = codec::encode(&message, 1, &[]);
            self.core
                .publish_confirmed("", &q, message.payload(), props, topic)
                .await?;
            c.op(
                "basic.ack",
                ch.basic_ack(d.delivery_tag, BasicAckOptions::default()),
            )
            .await?;
            moved += 1;
        }
        Ok(moved)
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.core.check_open()?;
        let q = queue_name(topic, group);
        if self.core.queue_counts(&q).await?.is_none() {
            return Err(Error::not_found(format!(
                "group `{group}` of topic `{topic}`"
            )));
        }
        let ch = self.core.conn.channel().await?;
        let c = &self.core.conn;
        for name in [q.clone(), format!("{q}.dlq")] {
            c.op(
                "queue.delete",
                ch.queue_delete(&name, QueueDeleteOptions::default()),
            )
            .await?;
        }
        c.op(
            "exchange.delete",
            ch.exchange_delete(&format!("{q}.dlx"), ExchangeDeleteOptions::default()),
        )
        .await?;
        lock(&self.core.policies).remove(&q);
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.core.check_open()?;
        self.core.check_topic(topic).await?;
        let prefix = format!("{topic}.");
        let groups: Vec<String> = lock(&self.core.policies)
            .keys()
            .filter_map(|q| q.strip_prefix(&prefix).map(str::to_string))
            .collect();
        for g in groups {
            match self.delete_group(topic, &g).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let ch = self.core.conn.channel().await?;
        self.core
            .conn
            .op(
                "exchange.delete",
                ch.exchange_delete(topic, ExchangeDeleteOptions::default()),
            )
            .await?;
        lock(&self.core.topics).remove(topic);
        Ok(())
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let s = &self.core.settings;
        let mut c = Capabilities::none();
        c.fan_out = true;
        c.ordering_per_key = false;
        c.nack_delay = true;
        c.max_nack_delay = Some(s.max_delay);
        c.native_dead_letter = false;
        c.delayed_publish = true;
        c.max_publish_delay = Some(s.max_delay);
        c.extend = false;
        c.ack_deadline = false;
        c.max_payload_bytes = s.max_payload_bytes;
        c.max_batch = MAX_BATCH;
        c.replay = false;
        c.rejects_unroutable = true;
        c.durable = true;
        c.depth = true;
        c.purge = true;
        c.redrive = true;
        c
    }

    async fn shutdown(&self) -> Result<()> {
        let core = &self.core;
        if core.shut_down.swap(true, Ordering::AcqRel) {
            // A concurrent shutdown may still be closing: wait for it.
            let mut s = core.shutdown.subscribe();
            let _ = tokio::time::timeout(core.settings.operation_timeout, s.wait_for(|done| *done))
                .await;
            return Ok(());
        }
        core.publish_closed.store(true, Ordering::Release);
        let consumers = core.live_consumers();
        for c in &consumers {
            c.begin_close();
        }
        for c in &consumers {
            c.wait_done(core.settings.operation_timeout).await;
        }
        core.conn.close().await;
        core.shutdown.send_replace(true);
        core.uncount();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up() {
        assert_eq!(delay_bucket(Duration::from_millis(300)), 300);
        assert_eq!(delay_bucket(Duration::from_micros(300_001)), 310);
        assert_eq!(delay_bucket(Duration::from_millis(1_050)), 1_100);
        assert_eq!(delay_bucket(Duration::ZERO), 10);
        assert!(delay_bucket(Duration::from_secs(7 * 24 * 3600)) >= 7 * 24 * 3600 * 1000);
    }

    #[test]
    fn options_are_read_and_unknown_ones_rejected() {
        let c = Config::parse(
            "amqp://u:secret@h/%2f?prefetch=200&queue_type=quorum&connect_timeout_ms=100",
        )
        .unwrap();
        let s = RabbitSettings::from_config(&c).unwrap();
        assert_eq!(s.prefetch, 200);
        assert_eq!(s.queue_type, QueueType::Quorum);
        assert_eq!(s.connect_timeout, Duration::from_millis(100));
        let bad = Config::parse("amqp://h/?bogus=1").unwrap();
        let err = RabbitSettings::from_config(&bad).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        for bad in ["prefetch=0", "queue_type=stream", "prefetch=70000"] {
            let c = Config::parse(&format!("amqp://h/?{bad}")).unwrap();
            assert!(RabbitSettings::from_config(&c).is_err(), "{bad}");
        }
    }
}
