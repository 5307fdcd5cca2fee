//! Spindle's embedded in-memory backend: the default, and the reference for the contract.
//!
//! It implements the whole portable model in-process: topics with groups (fan-out), competing
//! consumers within a group, ack / nack / delayed nack, max attempts then a dead-letter queue,
//! redelivery of dropped or timed-out deliveries, ordering per key, delayed publish, depth,
//! and a bounded prefetch per consumer. Nothing survives the process: use it for tests,
//! single-process apps and demos.
//!
//! ```
//! use spindle_core::{Admin, Publisher, Subscriber, Message, SubscribeOptions};
//! use spindle_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> spindle_core::Result<()> {
//! let broker = MemoryBroker::new();
//! broker.ensure_topic("orders").await?;
//! let mut sub = broker.subscribe("orders", "billing", SubscribeOptions::default()).await?;
//! broker.publish("orders", Message::new("order #1")).await?;
//! let delivery = sub.next_delivery().await.unwrap()?;
//! assert_eq!(&delivery.message().payload()[..], b"order #1");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! URL: `memory://`, options `max_payload_bytes`, `max_delay_ms`, `tick_ms`, `max_depth`.
//!
//! Payloads up to 1 KiB of messages without a key or a delay are copied into 64 KiB buffers
//! their topic owns (unless another publisher is copying into that topic's buffer at that
//! moment), so that the publisher's allocation is freed on its own thread. With glibc's
//! malloc a free on another thread costs a contended lock, and this copy more than doubles
//! end-to-end throughput with a fresh payload per message; with an allocator that frees across
//! threads cheaply (mimalloc) it costs a little. A payload kept alive keeps its buffer alive:
//! a delivery left unsettled (at most `prefetch` per consumer), or a payload you keep after
//! settling it (copy it with `Bytes::copy_from_slice` to keep it for long). Larger payloads
//! are passed on as they are.

mod consumer;
mod group;
mod payload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spindle_core::{
    async_trait, Admin, Broker, Capabilities, Config, Error, GroupDepth, GroupPolicy, Message,
    PublishNow, PublishOptions, Publisher, Publishing, Result, SubscribeOptions, Subscriber,
    Subscription,
};

use consumer::{ConsumerConfig, ConsumerShared, Control};
use group::{Group, Padded, Published};
use payload::PayloadBuffer;
use rustc_hash::FxHashMap as HashMap;

/// The URL schemes this backend answers to.
pub const SCHEMES: &[&str] = &["memory"];

const BACKEND: &str = "memory";

/// Limits and timing of a [`MemoryBroker`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemorySettings {
    /// Largest payload accepted. Default 1 MiB, like SQS, so code tested here fits elsewhere.
    pub max_payload_bytes: usize,
    /// Longest publish or nack delay. Default 24 hours.
    pub max_delay: Duration,
    /// How often delays and ack deadlines are checked: they fire at most this late.
    pub tick: Duration,
    /// Most messages waiting (ready or delayed) in one group; a publish that would go past it
    /// fails with [`Error::Full`] rather than letting memory grow without bound. Default 1,000,000.
    pub max_depth: usize,
}

impl Default for MemorySettings {
    fn default() -> Self {
        MemorySettings {
            max_payload_bytes: 1024 * 1024,
            max_delay: Duration::from_secs(24 * 3600),
            tick: Duration::from_millis(10),
            max_depth: 1_000_000,
        }
    }
}

impl MemorySettings {
    /// Reads `max_payload_bytes`, `max_delay_ms` and `tick_ms` from a `memory://` config and
    /// rejects any other option.
    pub fn from_config(config: &Config) -> Result<Self> {
        if !SCHEMES.contains(&config.scheme()) {
            return Err(Error::InvalidConfig(format!(
                "memory backend cannot use scheme `{}`",
                config.scheme()
            )));
        }
        if config.url().host_str().is_some_and(|h| !h.is_empty()) || config.url().path().len() > 1 {
            return Err(Error::InvalidConfig(format!(
                "memory URL takes no host or path: `{config}`; write `memory://`"
            )));
        }
        let mut settings = MemorySettings::default();
        let mut options = config.option_reader(BACKEND);
        if let Some(v) = options.parse("max_payload_bytes")? {
            settings.max_payload_bytes = v;
        }
        if let Some(v) = options.millis("max_delay_ms")? {
            settings.max_delay = v;
        }
        if let Some(v) = options.millis("tick_ms")? {
            if v.is_zero() {
                return Err(Error::InvalidConfig(
                    "memory: tick_ms must be at least 1".into(),
                ));
            }
            settings.tick = v;
        }
        if let Some(v) = options.parse("max_depth")? {
            settings.max_depth = v;
        }
        options.finish()?;
        Ok(settings)
    }
}

/// A topic: the groups its messages go to. Topics and their groups change rarely and sit under
/// one lock, so a publish takes one read lock to route.
pub(crate) struct Topic {
    name: Arc<str>,
    groups: Vec<Arc<Group>>,
    payloads: PayloadBuffer,
}

type Topics = HashMap<String, Topic>;

fn topic_not_found(topic: &str) -> Error {
    Error::not_found(format!("topic `{topic}`"))
}

/// A clock the sweeper advances every tick, read on the hot path instead of the system clock.
pub(crate) struct CoarseClock {
    start: Instant,
    elapsed_nanos: std::sync::atomic::AtomicU64,
}

impl CoarseClock {
    fn new() -> Self {
        CoarseClock {
            start: Instant::now(),
            elapsed_nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn advance(&self, now: Instant) {
        let nanos = now.saturating_duration_since(self.start).as_nanos() as u64;
        self.elapsed_nanos.fetch_max(nanos, Ordering::Release);
    }

    /// Never later than the real time, and at most one tick earlier.
    pub(crate) fn now(&self) -> Instant {
        self.start + Duration::from_nanos(self.elapsed_nanos.load(Ordering::Acquire))
    }
}

pub(crate) struct Inner {
    /// On its own cache lines: every publish writes the lock word.
    topics: Padded<RwLock<Topics>>,
    settings: MemorySettings,
    publishing_closed: AtomicBool,
    shut_down: Arc<AtomicBool>,
    sweeper_stop: Arc<(Mutex<bool>, Condvar)>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    clock: Arc<CoarseClock>,
}

impl Inner {
    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, Topics> {
        self.topics.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, Topics> {
        self.topics.0.write().unwrap_or_else(|e| e.into_inner())
    }

    fn group(&self, topic: &str, group: &str) -> Result<Arc<Group>> {
        let topics = self.read_topics();
        let t = topics.get(topic).ok_or_else(|| topic_not_found(topic))?;
        t.groups
            .iter()
            .find(|g| &*g.name == group)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("group `{group}` of topic `{topic}`")))
    }

    /// The named group of `topic`, created with `policy` if absent; `true` when created here.
    fn group_or_create(
        &self,
        topic: &str,
        group: &str,
        policy: &GroupPolicy,
    ) -> Result<(Arc<Group>, bool)> {
        if group.is_empty() {
            return Err(Error::InvalidArgument("group name is empty".into()));
        }
        let mut topics = self.write_topics();
        let t = topics
            .get_mut(topic)
            .ok_or_else(|| topic_not_found(topic))?;
        if let Some(g) = t.groups.iter().find(|g| &*g.name == group) {
            return Ok((g.clone(), false));
        }
        let g = Group::new(t.name.clone(), group.into(), policy.clone());
        t.groups.push(g.clone());
        Ok((g, true))
    }

    fn all_groups(&self) -> Vec<Arc<Group>> {
        self.read_topics()
            .values()
            .flat_map(|t| t.groups.iter().cloned())
            .collect()
    }

    /// Lets idle topics' payload buffers go (see [`PayloadBuffer::release_if_idle`]).
    fn release_idle_payload_buffers(&self) {
        for topic in self.read_topics().values() {
            topic.payloads.release_if_idle();
        }
    }

    fn stop_sweeper(&self) {
        let (lock, cvar) = &*self.sweeper_stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Never join here: the sweeper itself may hold the last reference.
        self.stop_sweeper();
    }
}

/// The in-memory broker. Cheap to clone; clones share the same topics.
///
/// A background thread (owned by the broker, stopped by [`Broker::shutdown`] or when the last
/// clone is dropped) fires delays and ack deadlines every `tick`.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("settings", &self.inner.settings)
            .field("topics", &self.inner.read_topics().len())
            .finish()
    }
}

impl MemoryBroker {
    /// A broker with default settings.
    pub fn new() -> Self {
        Self::with_settings(MemorySettings::default())
    }

    /// A broker from a `memory://` config.
    pub fn from_config(config: &Config) -> Result<Self> {
        Ok(Self::with_settings(MemorySettings::from_config(config)?))
    }

    /// A broker with these settings.
    pub fn with_settings(settings: MemorySettings) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let inner = Arc::new(Inner {
            topics: Padded(RwLock::new(HashMap::default())),
            settings,
            publishing_closed: AtomicBool::new(false),
            shut_down: Arc::new(AtomicBool::new(false)),
            sweeper_stop: stop.clone(),
            sweeper: Mutex::new(None),
            clock: Arc::new(CoarseClock::new()),
        });
        let weak = Arc::downgrade(&inner);
        let tick = inner.settings.tick;
        let handle = std::thread::Builder::new()
            .name("spindle-memory-sweeper".into())
            .spawn(move || sweep(weak, stop, tick))
            .expect("spawning the memory broker's sweeper thread");
        *inner.sweeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        MemoryBroker { inner }
    }

    /// The settings in force.
    pub fn settings(&self) -> &MemorySettings {
        &self.inner.settings
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.is_shut_down() {
            return Err(Error::Closed("the memory broker was shut down"));
        }
        Ok(())
    }

    fn check_publish(&self, message: &Message, options: &PublishOptions) -> Result<()> {
        if self.inner.publishing_closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the publisher was closed"));
        }
        self.check_open()?;
        let max = self.inner.settings.max_payload_bytes;
        if message.payload().len() > max {
            return Err(Error::PayloadTooLarge {
                size: message.payload().len(),
                max,
            });
        }
        if let Some(delay) = options.delay {
            if delay > self.inner.settings.max_delay {
                return Err(Error::DelayTooLong {
                    requested: delay,
                    max: self.inner.settings.max_delay,
                });
            }
        }
        Ok(())
    }

    /// Runs `f` on the topic's groups and payload buffer, under the topic's read lock (the
    /// group list is not copied on the hot path), after checking that each group can take
    /// `adding` more messages.
    fn with_groups<T>(
        &self,
        topic: &str,
        adding: usize,
        f: impl FnOnce(&[Arc<Group>], &PayloadBuffer) -> T,
    ) -> Result<T> {
        let topics = self.inner.read_topics();
        let Topic {
            groups, payloads, ..
        } = topics.get(topic).ok_or_else(|| topic_not_found(topic))?;
        if groups.is_empty() {
            return Err(Error::Unroutable {
                topic: topic.to_string(),
            });
        }
        let limit = self.inner.settings.max_depth;
        if let Some(full) = groups.iter().find(|g| g.would_exceed(adding, limit)) {
            return Err(Error::Full {
                what: format!("group `{}` of topic `{topic}`", full.name),
                limit,
            });
        }
        Ok(f(groups, payloads))
    }

    fn publish_one(&self, topic: &str, message: Message, options: &PublishOptions) -> Result<()> {
        self.check_publish(&message, options)?;
        self.with_groups(topic, 1, move |groups, payloads| {
            let mut message = message;
            payloads.adopt_messages([&mut message], options.delay.is_some());
            match groups {
                [g] => g.publish([Published::Owned(message)], options.delay),
                _ => {
                    let msg = Arc::new(message);
                    for g in groups {
                        g.publish([Published::Shared(msg.clone())], options.delay);
                    }
                }
            }
        })
    }

    fn consume(&self, group: Arc<Group>, options: &SubscribeOptions, dlq: bool) -> Subscription {
        let consumer = ConsumerShared::new(
            group,
            ConsumerConfig {
                broker_shut_down: self.inner.shut_down.clone(),
                max_delay: self.inner.settings.max_delay,
                clock: self.inner.clock.clone(),
                tick: self.inner.settings.tick,
                prefetch: options.prefetch,
                ack_timeout: options.ack_timeout,
                is_dead_letter_queue: dlq,
            },
        );
        Subscription::new(consumer.clone().into_stream(), Control(consumer))
    }
}

/// The sweeper: fires due delays and expired ack deadlines, and lets idle payload buffers go,
/// until told to stop.
fn sweep(inner: Weak<Inner>, stop: Arc<(Mutex<bool>, Condvar)>, tick: Duration) {
    let (lock, cvar) = &*stop;
    let mut next_idle_check = Instant::now() + IDLE_CHECK;
    loop {
        {
            // The lock is not held while sweeping: `Inner::drop` may run on this thread.
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = cvar
                .wait_timeout_while(guard, tick, |stopped| !*stopped)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        inner.clock.advance(now);
        for group in inner.all_groups() {
            group.tick(now);
        }
        if now >= next_idle_check {
            inner.release_idle_payload_buffers();
            next_idle_check = now + IDLE_CHECK;
        }
    }
}

/// How often the sweeper lets idle topics' payload buffers go.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl PublishNow for MemoryBroker {
    fn publish_now(&self, topic: &str, message: Message) -> Result<()> {
        self.publish_one(topic, message, &PublishOptions::default())
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish_with(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> Result<()> {
        // Publishing never waits, so give the scheduler its turn now and then: a consumer
        // woken on this thread gets to run instead of queueing behind a publishing loop.
        tokio::task::consume_budget().await;
        self.publish_one(topic, message, options)
    }

    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> Publishing<'a> {
        // The hot path: settled on the spot, no boxed future.
        Publishing::now(self, topic, message)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        tokio::task::consume_budget().await;
        let options = PublishOptions::default();
        let mut results = Vec::with_capacity(messages.len());
        let mut accepted = Vec::with_capacity(messages.len());
        for m in messages {
            match self.check_publish(&m, &options) {
                Ok(()) => {
                    accepted.push(m);
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let routed = self.with_groups(topic, accepted.len(), move |groups, payloads| {
            payloads.adopt_messages(&mut accepted, false);
            match groups {
                [g] => g.publish(accepted.into_iter().map(Published::Owned), None),
                _ => {
                    let shared: Vec<Arc<Message>> = accepted.into_iter().map(Arc::new).collect();
                    for g in groups {
                        g.publish(shared.iter().cloned().map(Published::Shared), None);
                    }
                }
            }
        });
        if let Err(e) = routed {
            // Nothing was enqueued: every message that passed its own checks gets the error.
            let text = e.to_string();
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(clone_error(&e, &text));
            }
        }
        results
    }

    async fn flush(&self) -> Result<()> {
        // Publishing is synchronous here: there is never anything left to flush.
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.inner.publishing_closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Errors are not `Clone` (they may carry a source); a batch that fails as a whole gives each
/// message an equivalent error.
fn clone_error(e: &Error, text: &str) -> Error {
    match e {
        Error::NotFound { what } => Error::NotFound { what: what.clone() },
        Error::Unroutable { topic } => Error::Unroutable {
            topic: topic.clone(),
        },
        Error::Closed(what) => Error::Closed(what),
        Error::Full { what, limit } => Error::Full {
            what: what.clone(),
            limit: *limit,
        },
        _ => Error::backend(BACKEND, text.to_string(), false, None),
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.check_open()?;
        options.validate()?;
        let (g, _) = self.inner.group_or_create(topic, group, &options.policy)?;
        Ok(self.consume(g, &options, false))
    }

    async fn subscribe_dead_letters(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.check_open()?;
        options.validate()?;
        let g = self.inner.group(topic, group)?;
        let dlq = g
            .dead_letters
            .clone()
            .expect("every group has a dead-letter queue");
        Ok(self.consume(dlq, &options, true))
    }
}

#[async_trait]
impl Admin for MemoryBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        if topic.is_empty() {
            return Err(Error::InvalidArgument("topic name is empty".into()));
        }
        self.inner
            .write_topics()
            .entry(topic.to_string())
            .or_insert_with(|| Topic {
                name: topic.into(),
                groups: Vec::new(),
                payloads: PayloadBuffer::default(),
            });
        Ok(())
    }

    async fn ensure_group(&self, topic: &str, group: &str, policy: &GroupPolicy) -> Result<()> {
        self.check_open()?;
        policy.validate()?;
        let (g, created) = self.inner.group_or_create(topic, group, policy)?;
        if !created {
            g.lock().policy = policy.clone();
        }
        Ok(())
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<GroupDepth> {
        Ok(self.inner.group(topic, group)?.depth())
    }

    async fn purge(&self, topic: &str, group: &str) -> Result<u64> {
        Ok(self.inner.group(topic, group)?.purge())
    }

    async fn redrive(&self, topic: &str, group: &str) -> Result<u64> {
        Ok(self.inner.group(topic, group)?.redrive())
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        let removed = {
            let mut topics = self.inner.write_topics();
            let groups = &mut topics
                .get_mut(topic)
                .ok_or_else(|| topic_not_found(topic))?
                .groups;
            let before = groups.len();
            let mut removed = None;
            groups.retain(|g| {
                if &*g.name == group {
                    removed = Some(g.clone());
                    false
                } else {
                    true
                }
            });
            debug_assert!(groups.len() + usize::from(removed.is_some()) == before);
            removed
        };
        match removed {
            Some(g) => {
                g.close();
                Ok(())
            }
            None => Err(Error::not_found(format!(
                "group `{group}` of topic `{topic}`"
            ))),
        }
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let t = self
            .inner
            .write_topics()
            .remove(topic)
            .ok_or_else(|| topic_not_found(topic))?;
        for g in &t.groups {
            g.close();
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.fan_out = true;
        c.ordering_per_key = true;
        c.nack_delay = true;
        c.max_nack_delay = Some(self.inner.settings.max_delay);
        c.native_dead_letter = true;
        c.delayed_publish = true;
        c.max_publish_delay = Some(self.inner.settings.max_delay);
        c.extend = true;
        c.ack_deadline = true;
        c.max_payload_bytes = self.inner.settings.max_payload_bytes;
        c.max_batch = usize::MAX;
        c.replay = false;
        c.rejects_unroutable = true;
        c.durable = false;
        c.depth = true;
        c.purge = true;
        c.redrive = true;
        c
    }

    async fn shutdown(&self) -> Result<()> {
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.publishing_closed.store(true, Ordering::Release);
        for g in self.inner.all_groups() {
            g.close();
        }
        self.inner.stop_sweeper();
        let handle = self
            .inner
            .sweeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            // The sweeper sees the stop flag at once; joining cannot wait long.
            let _ = handle.join();
        }
        Ok(())
    }
}
