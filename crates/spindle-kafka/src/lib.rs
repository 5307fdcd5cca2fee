//! Spindle's Kafka backend, on librdkafka (the `rdkafka` crate, bundled and statically built).
//!
//! ```no_run
//! # async fn example() -> spindle_core::Result<()> {
//! use spindle_core::{Admin, Config};
//! let broker = spindle_kafka::connect(&Config::parse("kafka://127.0.0.1:9092?partitions=6")?).await?;
//! broker.ensure_topic("orders").await?;
//! # Ok(()) }
//! ```
//!
//! # URL and options
//!
//! `kafka://[user:password@]host:port?option=value&...`. Options (unknown ones are rejected):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `hosts` | — | more bootstrap servers, `a:9092,b:9092` |
//! | `partitions` | 3 | partitions of topics this adapter creates |
//! | `replication_factor` | 1 | replication of topics this adapter creates |
//! | `linger_ms` | 5 | producer linger |
//! | `max_payload_bytes` | 1 048 576 | largest message (payload + headers) accepted |
//! | `request_timeout_ms` | 10 000 | bound on metadata, admin and commit calls |
//! | `connect_timeout_ms` | 10 000 | bound on `connect` reaching the cluster |
//! | `message_timeout_ms` | 30 000 | bound on one publish, retries included |
//! | `session_timeout_ms` | 10 000 | consumer group session timeout |
//! | `assign_timeout_ms` | 30 000 | bound on `subscribe` waiting for its first assignment |
//! | `max_nack_delay_ms` | 900 000 | longest nack delay |
//! | `retry_suffix` / `dlq_suffix` | `.retry` / `.dlq` | names of the per-group topics |
//! | `group_prefix` | empty | prefix of the Kafka group ids |
//! | `idempotence` | true | idempotent producer |
//! | `security_protocol` | plaintext (sasl_plaintext with a user) | `ssl`, `sasl_ssl`, ... |
//! | `sasl_mechanism` | PLAIN with a user | `SCRAM-SHA-256`, ... |
//! | `sasl_username` / `sasl_password` | URL user / password | SASL credentials (redacted in logs) |
//! | `ssl_ca_location`, `ssl_certificate_location`, `ssl_key_location` | — | TLS files |
//!
//! # Topology
//!
//! For a topic `t` and a Spindle group `g`:
//!
//! - `t`: the topic, created explicitly by [`Admin::ensure_topic`] (never auto-created; a
//!   publish to a missing topic is [`Error::NotFound`]). Every group reads all of it (fan-out).
//! - Kafka consumer group `<group_prefix>t.g`: the members of Spindle group `g` on `t`. Group
//!   ids are per topic, so one Spindle group name used on several topics makes independent
//!   Kafka groups (no cross-topic rebalances).
//! - `t.g.retry`: the group's retry topic. A nack (with or without delay) or a dropped delivery
//!   writes a copy there with headers `spindle-attempt` (the next attempt) and `spindle-due-ms`
//!   (Unix ms), then the original offset counts as decided. The group's members consume the
//!   retry topic along with `t` and hold a retry record in memory until it is due: a delay is
//!   never delivered early.
//! - `t.g.dlq`: the group's dead-letter topic, consumed by
//!   [`Subscriber::subscribe_dead_letters`] in Kafka group `<group_prefix>t.g.dlq`. Records
//!   keep payload, key and headers and add `spindle-dead-letter-reason`, `spindle-attempt` and
//!   `spindle-original-topic`.
//!
//! Message id and content type travel as headers `spindle-id` and `spindle-content-type`; the
//! key is the record key (it chooses the partition, murmur2 as in the Java client); messages
//! without a key go round-robin over the partitions.
//!
//! # Acks and commits
//!
//! Each subscription is one group member polled on its own thread. Per partition it tracks the
//! offsets read and not yet decided; it commits (every 100 ms, asynchronously, and
//! synchronously before partitions are revoked and when it leaves) only the offset below which
//! everything is decided. Acks may arrive in any order; nothing undecided is committed.
//! Deliveries are yielded in partition order, so work can run concurrently across partitions.
//! When a rebalance takes a partition away, deliveries of it still held become stale (their ack
//! returns [`Error::StaleDelivery`]) and the partition's new owner reads them again: at least
//! once, never lost. The prefetch bound counts deliveries handed out and undecided; when it is
//! reached the member pauses its partitions and keeps polling (heartbeats and rebalances go on).
//!
//! `Subscription::close` stops handing out messages; deliveries already handed out can still be
//! acked and are committed; the member leaves the group once none is in flight (or when the
//! broker shuts down). A delivery dropped undecided is nacked (attempt + 1) while the
//! subscription is open, and left uncommitted for the next owner after close.
//!
//! # Capabilities
//!
//! | capability | value | how |
//! |---|---|---|
//! | fan_out | yes | one Kafka group per Spindle group |
//! | ordering_per_key | **no** | per partition in the log, but retries go through the retry topic |
//! | nack_delay | yes, up to `max_nack_delay_ms` (15 min) | retry topic + due header, held in memory |
//! | native_dead_letter | no | the adapter writes `t.g.dlq` |
//! | delayed_publish | **no** | `Unsupported` |
//! | extend / ack_deadline | **no** | Kafka has no per-message deadline; `extend` is `Unsupported` |
//! | max_payload_bytes | `max_payload_bytes` (1 MiB) | payload + header bytes, checked before sending |
//! | max_batch | 500 | batches are pipelined through the producer |
//! | replay | yes | a new group starts at the earliest offset |
//! | rejects_unroutable | no | the log keeps messages for groups created later |
//! | durable | yes | acks=all, idempotent producer |
//! | depth | yes | lag = high watermark − committed offset ([`KafkaBroker::partition_lag`]) |
//! | purge | **no** | `Unsupported` |
//! | redrive | yes | the DLQ is copied to the retry topic with attempt 1 |
//!
//! # Limits
//!
//! - Depth is eventual: commits are asynchronous (≤ 100 ms); `ready` is lag minus what this
//!   process holds (in flight, delayed); other processes' in-flight deliveries count as ready.
//! - Dead-letter subscriptions redeliver nacks themselves (in memory); they cannot dead-letter.
//! - A consumer that crashes without leaving keeps its partitions until `session_timeout_ms`.
//! - Redrive commits the dead-letter group's offsets from outside the group: do not run it
//!   while a dead-letter subscription of that group is open.
//! - `max_attempts` is applied by each member from its own `SubscribeOptions::policy`;
//!   `ensure_group` validates its policy and creates the retry and dead-letter topics (Kafka
//!   has nowhere to keep a group policy).
//! - `delete_topic` deletes the topic and the retry / dead-letter topics of its groups (those
//!   this process provisioned, plus those the cluster lists); `delete_group` deletes the
//!   group's two topics and its committed offsets. Against tansu 0.6.0 do not call them:
//!   its DeleteTopics removes every topic of the cluster.
//! - tansu 0.6.0 answers an all-topics metadata request with no topics, and its SQLite schema
//!   lacks an index that reading a backlog needs (`scripts/start-tansu.sh` adds it).

#![warn(missing_docs)]

mod codec;
mod consumer;
mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use spindle_core::{
    Admin, Broker, Capabilities, Config, Error, GroupDepth, GroupPolicy, Message, PublishOptions,
    Publisher, Result, SubscribeOptions, Subscriber, Subscription,
};

pub use codec::{HEADER_CONTENT_TYPE, HEADER_DUE_MS, HEADER_ID};
pub use settings::KafkaSettings;

use consumer::{Kind, SubShared, SubscribeArgs};

/// URL schemes this backend answers to.
pub const SCHEMES: &[&str] = &["kafka"];

/// The backend's name in errors and [`Broker::name`].
pub const BACKEND: &str = "kafka";

/// Connects to the cluster named by `config` (`kafka://host:port?...`), failing with
/// [`Error::Connection`] if it does not answer within `connect_timeout_ms`.
pub async fn connect(config: &Config) -> Result<KafkaBroker> {
    KafkaBroker::connect(KafkaSettings::from_config(config)?).await
}

/// Lag of one partition for one Kafka group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The Kafka topic (the topic itself or its retry / dead-letter topic).
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset, if it committed one.
    pub committed: Option<i64>,
    /// The partition's low watermark (earliest offset kept).
    pub low_watermark: i64,
    /// The partition's high watermark (next offset to be written).
    pub high_watermark: i64,
    /// Messages after the committed offset (or the low watermark without one).
    pub lag: u64,
}

pub(crate) struct Core {
    pub(crate) settings: KafkaSettings,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    partitions: Mutex<HashMap<String, i32>>,
    round_robin: AtomicUsize,
    closed: AtomicBool,
    shutdown: AtomicBool,
    subs: Mutex<Vec<Weak<SubShared>>>,
    /// (topic, group) pairs this process provisioned: `delete_topic` deletes their topics even
    /// where the cluster does not list topics (tansu answers an all-topics metadata request
    /// with none).
    known_groups: Mutex<HashSet<(String, String)>>,
}

/// A connected Kafka backend: publisher, subscriber and administration.
#[derive(Clone)]
pub struct KafkaBroker {
    core: Arc<Core>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("settings", &self.core.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) fn map_err(operation: &str, e: KafkaError) -> Error {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            Error::not_found(format!("{operation}: {e}"))
        }
        Some(RDKafkaErrorCode::MessageTimedOut)
        | Some(RDKafkaErrorCode::OperationTimedOut)
        | Some(RDKafkaErrorCode::RequestTimedOut) => Error::backend(
            BACKEND,
            format!("{operation}: timed out: {e}"),
            true,
            Some(Box::new(e)),
        ),
        Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::Resolve) => Error::Connection {
            backend: BACKEND,
            message: format!("{operation}: {e}"),
            source: Some(Box::new(e)),
        },
        Some(RDKafkaErrorCode::SaslAuthenticationFailed)
        | Some(RDKafkaErrorCode::Authentication)
        | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
        | Some(RDKafkaErrorCode::GroupAuthorizationFailed) => Error::Authentication {
            backend: BACKEND,
            message: format!("{operation}: {e}"),
        },
        _ => Error::backend(
            BACKEND,
            format!("{operation}: {e}"),
            true,
            Some(Box::new(e)),
        ),
    }
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::InvalidArgument(format!(
            "{what} `{name}`: Kafka names are 1 to 200 characters of letters, digits, `.`, `_` and `-`"
        )));
    }
    Ok(())
}

impl Core {
    pub(crate) fn retry_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}{}", self.settings.retry_suffix)
    }

    pub(crate) fn dlq_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}{}", self.settings.dlq_suffix)
    }

    fn group_id(&self, topic: &str, group: &str) -> String {
        format!("{}{topic}.{group}", self.settings.group_prefix)
    }

    fn dlq_group_id(&self, topic: &str, group: &str) -> String {
        format!(
            "{}{topic}.{group}{}",
            self.settings.group_prefix, self.settings.dlq_suffix
        )
    }

    fn check_open(&self) -> Result<()> {
        if self.shutdown.load(Ordering::SeqCst) {
            return Err(Error::Closed("the broker was shut down"));
        }
        Ok(())
    }

    /// Partition count from fresh metadata; `None` if the topic does not exist.
    async fn fetch_partitions(self: &Arc<Self>, topic: &str) -> Result<Option<i32>> {
        let me = self.clone();
        let name = topic.to_string();
        let timeout = self.settings.request_timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            me.producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|e| Error::backend(BACKEND, "metadata task", false, Some(Box::new(e))))?
        .map_err(|e| map_err("fetching metadata", e))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match t.error() {
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Ok(None),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE) => Ok(Some(0)),
            Some(err) => Err(Error::backend(
                BACKEND,
                format!("metadata of topic `{topic}`: {err:?}"),
                true,
                None,
            )),
            None if t.partitions().is_empty() => Ok(None),
            None => Ok(Some(t.partitions().len() as i32)),
        }
    }

    /// Partition count of an existing topic (cached), or `NotFound` naming it.
    async fn partitions_of(self: &Arc<Self>, topic: &str) -> Result<i32> {
        if let Some(n) = self.partitions.lock().unwrap().get(topic) {
            return Ok(*n);
        }
        match self.fetch_partitions(topic).await? {
            Some(n) if n > 0 => {
                self.partitions.lock().unwrap().insert(topic.to_string(), n);
                Ok(n)
            }
            _ => Err(Error::not_found(format!("topic `{topic}`"))),
        }
    }

    /// Sends one record and waits for its delivery report.
    pub(crate) async fn produce(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
        partition: Option<i32>,
    ) -> Result<()> {
        let headers = codec::headers_for(message, extra);
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(&message.payload()[..])
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let bound = self.settings.message_timeout + Duration::from_secs(5);
        let started = Instant::now();
        let future = loop {
            match self.producer.send_result(record) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if started.elapsed() > bound {
                        return Err(Error::Timeout {
                            operation: "kafka publish (local queue full)",
                            after: bound,
                        });
                    }
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(self.publish_error(topic, e)),
            }
        };
        match tokio::time::timeout(bound, future).await {
            Err(_) => Err(Error::Timeout {
                operation: "kafka publish",
                after: bound,
            }),
            Ok(Err(_canceled)) => Err(Error::Closed("the producer was closed")),
            Ok(Ok(Err((e, _)))) => Err(self.publish_error(topic, e)),
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    fn publish_error(&self, topic: &str, e: KafkaError) -> Error {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            | Some(RDKafkaErrorCode::UnknownTopic) => {
                self.partitions.lock().unwrap().remove(topic);
                Error::not_found(format!("topic `{topic}`"))
            }
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => Error::PayloadTooLarge {
                size: self.settings.max_payload_bytes + 1,
                max: self.settings.max_payload_bytes,
            },
            _ => map_err(&format!("publishing to `{topic}`"), e),
        }
    }

    /// Creates `topic` if missing and waits until its metadata shows it usable.
    async fn create_topic(self: &Arc<Self>, topic: &str, partitions: i32) -> Result<i32> {
        validate_name("topic", topic)?;
        if let Some(n) = self.fetch_partitions(topic).await? {
            if n > 0 {
                self.partitions.lock().unwrap().insert(topic.to_string(), n);
                return Ok(n);
            }
        }
        let timeout = self.settings.request_timeout;
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        );
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = tokio::time::timeout(timeout * 2, self.admin.create_topics([&new], &options))
            .await
            .map_err(|_| Error::Timeout {
                operation: "creating a topic",
                after: timeout * 2,
            })?
            .map_err(|e| map_err("creating a topic", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::backend(
                        BACKEND,
                        format!("creating topic `{name}`: {code}"),
                        false,
                        None,
                    ))
                }
            }
        }
        let until = Instant::now() + timeout;
        loop {
            if let Some(n) = self.fetch_partitions(topic).await? {
                if n > 0 {
                    self.partitions.lock().unwrap().insert(topic.to_string(), n);
                    return Ok(n);
                }
            }
            if Instant::now() > until {
                return Err(Error::Timeout {
                    operation: "waiting for a new topic to be usable",
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ensure_group_topics(self: &Arc<Self>, topic: &str, group: &str) -> Result<()> {
        validate_name("group", group)?;
        let n = self.partitions_of(topic).await?;
        self.create_topic(&self.retry_topic(topic, group), n)
            .await?;
        self.create_topic(&self.dlq_topic(topic, group), n).await?;
        self.known_groups
            .lock()
            .unwrap()
            .insert((topic.to_string(), group.to_string()));
        Ok(())
    }

    async fn delete_topics(self: &Arc<Self>, topics: &[String]) -> Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let timeout = self.settings.request_timeout;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = tokio::time::timeout(timeout * 2, self.admin.delete_topics(&names, &options))
            .await
            .map_err(|_| Error::Timeout {
                operation: "deleting topics",
                after: timeout * 2,
            })?
            .map_err(|e| map_err("deleting topics", e))?;
        let mut cache = self.partitions.lock().unwrap();
        for r in results {
            match r {
                Ok(name) => {
                    cache.remove(&name);
                }
                Err((name, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    cache.remove(&name);
                }
                Err((name, code)) => {
                    return Err(Error::backend(
                        BACKEND,
                        format!("deleting topic `{name}`: {code}"),
                        false,
                        None,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Lag of `group_id` on each partition of `topics` (missing topics are skipped).
    async fn lag(self: &Arc<Self>, group_id: &str, topics: &[String]) -> Result<Vec<PartitionLag>> {
        let mut wanted = Vec::new();
        for t in topics {
            if let Some(n) = self.fetch_partitions(t).await? {
                wanted.push((t.clone(), n));
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let config = self.settings.consumer_config(group_id);
        let timeout = self.settings.request_timeout;
        tokio::task::spawn_blocking(move || -> Result<Vec<PartitionLag>> {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| map_err("creating a lag reader", e))?;
            let mut tpl = TopicPartitionList::new();
            for (t, n) in &wanted {
                for p in 0..*n {
                    tpl.add_partition(t, p);
                }
            }
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| map_err("reading committed offsets", e))?;
            let mut out = Vec::new();
            for e in committed.elements() {
                let (low, high) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .map_err(|err| map_err("reading watermarks", err))?;
                let committed = match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                };
                let from = committed.unwrap_or(low).max(low);
                out.push(PartitionLag {
                    topic: e.topic().to_string(),
                    partition: e.partition(),
                    committed,
                    low_watermark: low,
                    high_watermark: high,
                    lag: (high - from).max(0) as u64,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::backend(BACKEND, "lag task", false, Some(Box::new(e))))?
    }

    fn live_subs(&self) -> Vec<Arc<SubShared>> {
        let mut subs = self.subs.lock().unwrap();
        subs.retain(|w| w.upgrade().is_some_and(|s| !s.is_finished()));
        subs.iter().filter_map(Weak::upgrade).collect()
    }
}

impl KafkaBroker {
    /// Connects with explicit settings, checking within `connect_timeout` that the cluster
    /// answers a metadata request.
    pub async fn connect(settings: KafkaSettings) -> Result<Self> {
        let producer: FutureProducer = settings
            .producer_config()
            .create()
            .map_err(|e| map_err("creating the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = settings
            .client_config()
            .create()
            .map_err(|e| map_err("creating the admin client", e))?;
        let core = Arc::new(Core {
            settings,
            producer,
            admin,
            partitions: Mutex::new(HashMap::new()),
            round_robin: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            subs: Mutex::new(Vec::new()),
            known_groups: Mutex::new(HashSet::new()),
        });
        let probe = core.clone();
        let bound = core.settings.connect_timeout;
        // Metadata of one (absent) topic proves the cluster answers without listing them all.
        let checked = tokio::task::spawn_blocking(move || {
            probe
                .producer
                .client()
                .fetch_metadata(Some("__spindle_connect_probe"), bound)
        })
        .await
        .map_err(|e| Error::backend(BACKEND, "connect task", false, Some(Box::new(e))))?;
        if let Err(e) = checked {
            return Err(Error::Connection {
                backend: BACKEND,
                message: format!(
                    "no answer from {} within {bound:?}: {e}",
                    core.settings.bootstrap.join(",")
                ),
                source: Some(Box::new(e)),
            });
        }
        Ok(KafkaBroker { core })
    }

    /// The settings in use.
    pub fn settings(&self) -> &KafkaSettings {
        &self.core.settings
    }

    /// The retry topic of (`topic`, `group`).
    pub fn retry_topic(&self, topic: &str, group: &str) -> String {
        self.core.retry_topic(topic, group)
    }

    /// The dead-letter topic of (`topic`, `group`).
    pub fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        self.core.dlq_topic(topic, group)
    }

    /// The Kafka consumer group id of Spindle group `group` on `topic`.
    pub fn group_id(&self, topic: &str, group: &str) -> String {
        self.core.group_id(topic, group)
    }

    /// Per-partition lag of the group on the topic and its retry topic.
    pub async fn partition_lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>> {
        self.core.check_open()?;
        self.core.partitions_of(topic).await?;
        let topics = [topic.to_string(), self.core.retry_topic(topic, group)];
        self.core
            .lag(&self.core.group_id(topic, group), &topics)
            .await
    }
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish_with(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> Result<()> {
        self.core.check_open()?;
        if self.core.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed("the publisher was closed"));
        }
        if options.delay.is_some() {
            return Err(Error::unsupported(BACKEND, "delayed publish"));
        }
        let size = message.encoded_len();
        let max = self.core.settings.max_payload_bytes;
        if size > max {
            return Err(Error::PayloadTooLarge { size, max });
        }
        let n = self.core.partitions_of(topic).await?;
        let partition = if message.key().is_some() {
            None
        } else {
            Some((self.core.round_robin.fetch_add(1, Ordering::Relaxed) % n as usize) as i32)
        };
        self.core.produce(topic, &message, &[], partition).await
    }

    async fn flush(&self) -> Result<()> {
        let core = self.core.clone();
        let bound = self.core.settings.message_timeout;
        tokio::task::spawn_blocking(move || core.producer.flush(bound))
            .await
            .map_err(|e| Error::backend(BACKEND, "flush task", false, Some(Box::new(e))))?
            .map_err(|e| map_err("flushing", e))
    }

    async fn close(&self) -> Result<()> {
        if self.core.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.flush().await
    }
}

impl KafkaBroker {
    /// What both kinds of subscription check first: open broker, valid options and group name,
    /// an existing topic, and the group's retry and dead-letter topics.
    async fn prepare_group(
        &self,
        topic: &str,
        group: &str,
        options: &SubscribeOptions,
    ) -> Result<()> {
        self.core.check_open()?;
        options.validate()?;
        validate_name("group", group)?;
        self.core.partitions_of(topic).await?;
        self.core.ensure_group_topics(topic, group).await
    }

    /// Starts a group member and registers it for shutdown (closing it at once if shutdown
    /// raced with the start).
    async fn start_member(&self, args: SubscribeArgs) -> Result<Subscription> {
        let (sub, shared) = consumer::subscribe(&self.core, args).await?;
        self.core.subs.lock().unwrap().push(Arc::downgrade(&shared));
        if self.core.shutdown.load(Ordering::SeqCst) {
            shared.shutdown();
        }
        Ok(sub)
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.prepare_group(topic, group, &options).await?;
        let args = SubscribeArgs {
            kind: Kind::Main {
                max_attempts: options.policy.max_attempts,
            },
            topic: topic.to_string(),
            group: group.to_string(),
            group_id: self.core.group_id(topic, group),
            topics: vec![topic.to_string(), self.core.retry_topic(topic, group)],
            prefetch: options.prefetch,
        };
        self.start_member(args).await
    }

    async fn subscribe_dead_letters(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.prepare_group(topic, group, &options).await?;
        let args = SubscribeArgs {
            kind: Kind::DeadLetters,
            topic: topic.to_string(),
            group: group.to_string(),
            group_id: self.core.dlq_group_id(topic, group),
            topics: vec![self.core.dlq_topic(topic, group)],
            prefetch: options.prefetch,
        };
        self.start_member(args).await
    }
}

#[async_trait]
impl Admin for KafkaBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.core.check_open()?;
        self.core
            .create_topic(topic, self.core.settings.partitions)
            .await
            .map(|_| ())
    }

    async fn ensure_group(&self, topic: &str, group: &str, policy: &GroupPolicy) -> Result<()> {
        self.core.check_open()?;
        policy.validate()?;
        self.core.ensure_group_topics(topic, group).await
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<GroupDepth> {
        self.core.check_open()?;
        self.core.partitions_of(topic).await?;
        let lag: u64 = self
            .partition_lag(topic, group)
            .await?
            .iter()
            .map(|p| p.lag)
            .sum();
        let dlq = [self.core.dlq_topic(topic, group)];
        let dead: u64 = self
            .core
            .lag(&self.core.dlq_group_id(topic, group), &dlq)
            .await?
            .iter()
            .map(|p| p.lag)
            .sum();
        let (mut in_flight, mut delayed) = (0, 0);
        for s in self.core.live_subs() {
            if s.kind != Kind::DeadLetters && &*s.topic == topic && &*s.group == group {
                let (i, d) = s.counts();
                in_flight += i;
                delayed += d;
            }
        }
        let ready = lag.saturating_sub(in_flight + delayed);
        Ok(GroupDepth::new(ready, in_flight, delayed, dead))
    }

    async fn purge(&self, _topic: &str, _group: &str) -> Result<u64> {
        Err(Error::unsupported(BACKEND, "purge"))
    }

    async fn redrive(&self, topic: &str, group: &str) -> Result<u64> {
        self.core.check_open()?;
        self.core.partitions_of(topic).await?;
        let dlq = self.core.dlq_topic(topic, group);
        let retry = self.core.retry_topic(topic, group);
        let lags = self
            .core
            .lag(
                &self.core.dlq_group_id(topic, group),
                std::slice::from_ref(&dlq),
            )
            .await?;
        let config = self
            .core
            .settings
            .consumer_config(&self.core.dlq_group_id(topic, group));
        let timeout = self.core.settings.request_timeout;
        // Read every dead-lettered record between the committed offset and the high watermark.
        let work: Vec<PartitionLag> = lags.into_iter().filter(|l| l.lag > 0).collect();
        if work.is_empty() {
            return Ok(0);
        }
        let reader_work = work.clone();
        let (consumer, messages) = tokio::task::spawn_blocking(move || -> Result<_> {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| map_err("creating a redrive reader", e))?;
            let mut tpl = TopicPartitionList::new();
            for l in &reader_work {
                let from = l.committed.unwrap_or(l.low_watermark).max(l.low_watermark);
                tpl.add_partition_offset(&l.topic, l.partition, Offset::Offset(from))
                    .map_err(|e| map_err("redrive", e))?;
            }
            consumer.assign(&tpl).map_err(|e| map_err("redrive", e))?;
            let mut remaining: HashMap<i32, i64> = reader_work
                .iter()
                .map(|l| (l.partition, l.high_watermark))
                .collect();
            let mut out = Vec::new();
            let until = Instant::now() + timeout * 3;
            while !remaining.is_empty() {
                if Instant::now() > until {
                    return Err(Error::Timeout {
                        operation: "reading the dead-letter topic",
                        after: timeout * 3,
                    });
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        use rdkafka::Message as _;
                        let Some(high) = remaining.get(&m.partition()).copied() else {
                            continue;
                        };
                        if m.offset() < high {
                            out.push(codec::decode(&m, true).message);
                        }
                        if m.offset() + 1 >= high {
                            remaining.remove(&m.partition());
                        }
                    }
                    Some(Err(e)) => return Err(map_err("reading the dead-letter topic", e)),
                    None => {}
                }
            }
            Ok((consumer, out))
        })
        .await
        .map_err(|e| Error::backend(BACKEND, "redrive task", false, Some(Box::new(e))))??;
        let moved = messages.len() as u64;
        for mut m in messages {
            codec::strip_dead_letter_headers(&mut m);
            self.core
                .produce(&retry, &m, &codec::retry_headers(1, None), None)
                .await?;
        }
        let mut tpl = TopicPartitionList::new();
        for l in &work {
            tpl.add_partition_offset(&l.topic, l.partition, Offset::Offset(l.high_watermark))
                .map_err(|e| map_err("redrive", e))?;
        }
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| Error::backend(BACKEND, "redrive task", false, Some(Box::new(e))))?
            .map_err(|e| map_err("committing the redriven offsets", e))?;
        Ok(moved)
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.core.check_open()?;
        self.core
            .known_groups
            .lock()
            .unwrap()
            .remove(&(topic.to_string(), group.to_string()));
        self.core
            .delete_topics(&[
                self.core.retry_topic(topic, group),
                self.core.dlq_topic(topic, group),
            ])
            .await?;
        let timeout = self.core.settings.request_timeout;
        let ids = [
            self.core.group_id(topic, group),
            self.core.dlq_group_id(topic, group),
        ];
        let names: Vec<&str> = ids.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(timeout));
        // Offsets of a group that never committed are absent: not an error.
        let _ = tokio::time::timeout(timeout * 2, self.core.admin.delete_groups(&names, &options))
            .await;
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.core.check_open()?;
        if self.core.fetch_partitions(topic).await?.is_none() {
            return Err(Error::not_found(format!("topic `{topic}`")));
        }
        let mut names: HashSet<String> = HashSet::from([topic.to_string()]);
        // Retry and dead-letter topics of the topic's groups: those this process provisioned,
        // plus those the cluster lists (Kafka does; tansu lists none).
        for (t, g) in self.core.known_groups.lock().unwrap().iter() {
            if t == topic {
                names.insert(self.core.retry_topic(t, g));
                names.insert(self.core.dlq_topic(t, g));
            }
        }
        let core = self.core.clone();
        let timeout = self.core.settings.request_timeout;
        let listed = tokio::task::spawn_blocking(move || {
            core.producer.client().fetch_metadata(None, timeout)
        })
        .await
        .map_err(|e| Error::backend(BACKEND, "metadata task", false, Some(Box::new(e))))?;
        if let Ok(metadata) = listed {
            let prefix = format!("{topic}.");
            let (retry, dlq) = (
                &self.core.settings.retry_suffix,
                &self.core.settings.dlq_suffix,
            );
            for t in metadata.topics() {
                let name = t.name();
                if name.starts_with(&prefix)
                    && (name.ends_with(retry.as_str()) || name.ends_with(dlq.as_str()))
                {
                    names.insert(name.to_string());
                }
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        self.core.delete_topics(&names).await?;
        self.core
            .known_groups
            .lock()
            .unwrap()
            .retain(|(t, _)| t != topic);
        Ok(())
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.fan_out = true;
        c.ordering_per_key = false;
        c.nack_delay = true;
        c.max_nack_delay = Some(self.core.settings.max_nack_delay);
        c.native_dead_letter = false;
        c.delayed_publish = false;
        c.extend = false;
        c.ack_deadline = false;
        c.max_payload_bytes = self.core.settings.max_payload_bytes;
        c.max_batch = 500;
        c.replay = true;
        c.rejects_unroutable = false;
        c.durable = true;
        c.depth = true;
        c.purge = false;
        c.redrive = true;
        c
    }

    async fn shutdown(&self) -> Result<()> {
        let first = !self.core.shutdown.swap(true, Ordering::SeqCst);
        self.core.closed.store(true, Ordering::SeqCst);
        let subs = self.core.live_subs();
        for s in &subs {
            s.shutdown();
        }
        for s in &subs {
            if !s
                .wait_finished(self.core.settings.request_timeout * 2)
                .await
            {
                tracing::warn!(topic = %s.topic, group = %s.group, "kafka: a consumer did not stop in time");
            }
        }
        if first {
            let _ = self.flush().await;
        }
        Ok(())
    }
}
