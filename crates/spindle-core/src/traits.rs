//! The traits every backend implements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::{Capabilities, Message, Publishing, Result, Subscription};

/// Options for one publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Deliver no earlier than this long after the publish.
    pub delay: Option<Duration>,
}

impl PublishOptions {
    /// Publish with a delay.
    pub fn delayed(delay: Duration) -> Self {
        PublishOptions { delay: Some(delay) }
    }
}

/// Options of a plain publish.
static NO_OPTIONS: PublishOptions = PublishOptions { delay: None };

/// Sends messages to topics.
///
/// `publish` returns `Ok` only once the backend has durably accepted the message, where it can
/// tell (publisher confirms, acks=all).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message with options.
    async fn publish_with(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> Result<()>;

    /// Publishes one message. The default calls [`publish_with`](Publisher::publish_with); a
    /// backend that settles publishes on the spot returns [`Publishing::now`] instead, which
    /// allocates nothing.
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> Publishing<'a> {
        Publishing::waiting(self.publish_with(topic, message, &NO_OPTIONS))
    }

    /// Publishes many messages, with one result per message, in order. A failure is never
    /// dropped: each message's own result says whether it was accepted.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        let options = PublishOptions::default();
        let pending = messages
            .into_iter()
            .map(|m| self.publish_with(topic, m, &options));
        futures::future::join_all(pending).await
    }

    /// Waits until everything published so far is accepted by the backend.
    async fn flush(&self) -> Result<()>;

    /// Flushes and closes. Idempotent; publishing afterwards returns [`Error::Closed`](crate::Error::Closed).
    async fn close(&self) -> Result<()>;
}

/// Typed conveniences over any [`Publisher`].
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Publishes `value` as JSON.
    async fn publish_json<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<()> {
        let message = Message::json(value)?;
        self.publish(topic, message).await
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// How a group treats messages that keep failing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupPolicy {
    /// Deliveries of one message before it is dead-lettered instead of redelivered. At least 1.
    /// Unlimited retries are not offered: a poison message would block the queue forever.
    pub max_attempts: u32,
}

impl GroupPolicy {
    /// The default: 5 attempts, then the dead-letter queue.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

    /// A policy with this many attempts.
    pub fn max_attempts(max_attempts: u32) -> Self {
        GroupPolicy { max_attempts }
    }

    /// Checks the policy's values.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(crate::Error::InvalidArgument(
                "max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Default for GroupPolicy {
    fn default() -> Self {
        GroupPolicy {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
        }
    }
}

/// Options for one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Most unacked deliveries this consumer holds at once (fetched ahead or being handled).
    /// Never unlimited.
    pub prefetch: usize,
    /// An unacked delivery is redelivered this long after it was delivered, unless extended.
    pub ack_timeout: Duration,
    /// The group's policy, applied when the subscription creates the group.
    pub policy: GroupPolicy,
}

impl SubscribeOptions {
    /// The default prefetch.
    pub const DEFAULT_PREFETCH: usize = 128;
    /// The default ack timeout.
    pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

    /// Sets the prefetch bound.
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the ack timeout.
    pub fn with_ack_timeout(mut self, ack_timeout: Duration) -> Self {
        self.ack_timeout = ack_timeout;
        self
    }

    /// Sets the group policy.
    pub fn with_policy(mut self, policy: GroupPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the group's max attempts.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// Checks the options' values.
    pub fn validate(&self) -> Result<()> {
        if self.prefetch == 0 {
            return Err(crate::Error::InvalidArgument(
                "prefetch must be at least 1".into(),
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err(crate::Error::InvalidArgument(
                "ack_timeout must be positive".into(),
            ));
        }
        self.policy.validate()
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            prefetch: Self::DEFAULT_PREFETCH,
            ack_timeout: Self::DEFAULT_ACK_TIMEOUT,
            policy: GroupPolicy::default(),
        }
    }
}

/// Receives messages.
///
/// The portable model: every group subscribed to a topic gets every message published to it
/// (fan-out); the consumers of one group share that group's messages (competing consumers).
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Consumes `topic` as a member of `group`, creating the group (with its dead-letter queue
    /// and `options.policy`) if it does not exist. The topic must exist.
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription>;

    /// Consumes the dead-letter queue of (`topic`, `group`). Dead-lettered deliveries carry
    /// the reserved headers with the reason, the attempt and the original topic.
    async fn subscribe_dead_letters(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription>;
}

/// Message counts of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupDepth {
    /// Waiting to be delivered (for log-based brokers: the lag).
    pub ready: u64,
    /// Delivered and not yet acked.
    pub in_flight: u64,
    /// Waiting for a delay (delayed publish or delayed nack) to pass.
    pub delayed: u64,
    /// In the group's dead-letter queue.
    pub dead_lettered: u64,
}

impl GroupDepth {
    /// Builds a depth; for adapter authors.
    pub fn new(ready: u64, in_flight: u64, delayed: u64, dead_lettered: u64) -> Self {
        GroupDepth {
            ready,
            in_flight,
            delayed,
            dead_lettered,
        }
    }

    /// Published and not yet acked: ready, in flight and delayed.
    pub fn unacked(&self) -> u64 {
        self.ready + self.in_flight + self.delayed
    }
}

/// Creates, inspects and removes topics and groups.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Creates the topic if it does not exist.
    async fn ensure_topic(&self, topic: &str) -> Result<()>;
    /// Creates the group on the topic, with its dead-letter queue, if it does not exist, and
    /// applies `policy`.
    async fn ensure_group(&self, topic: &str, group: &str, policy: &GroupPolicy) -> Result<()>;
    /// Message counts of one group: alert on these.
    async fn depth(&self, topic: &str, group: &str) -> Result<GroupDepth>;
    /// Removes every message waiting in the group (not its dead-letter queue); returns how many.
    async fn purge(&self, topic: &str, group: &str) -> Result<u64>;
    /// Moves the group's dead-lettered messages back to the group; returns how many.
    async fn redrive(&self, topic: &str, group: &str) -> Result<u64>;
    /// Deletes the group and its dead-letter queue.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()>;
    /// Deletes the topic and its groups.
    async fn delete_topic(&self, topic: &str) -> Result<()>;
}

/// A connected backend: publisher, subscriber and administration in one object.
///
/// Object-safe: `spindle::connect` returns an `Arc<dyn Broker>`.
#[async_trait]
pub trait Broker: Publisher + Subscriber + Admin {
    /// The backend's name, e.g. `memory` or `rabbitmq`.
    fn name(&self) -> &'static str;
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;
    /// Closes publishing, every subscription and background task. Idempotent.
    async fn shutdown(&self) -> Result<()>;
}

/// A shared, type-erased broker.
pub type DynBroker = Arc<dyn Broker>;
