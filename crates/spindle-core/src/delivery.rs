//! A received message and the decision the consumer makes about it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Message, Result};

/// The backend side of a [`Delivery`]: what `ack`, `nack`, `dead_letter` and `extend` do.
///
/// One acknowledger serves a whole subscription (one topic and group); `token` names the
/// delivery within it, so nothing is allocated or reference-counted per message beyond the
/// acknowledger itself. Adapter authors implement this; applications never call it directly.
#[async_trait]
pub trait Acknowledger: Send + Sync + 'static {
    /// The topic the deliveries it settles were published to.
    fn topic(&self) -> &str;
    /// The group they were delivered to.
    fn group(&self) -> &str;
    /// The message was handled: never deliver it again.
    async fn ack(&self, token: u64) -> Result<()>;
    /// An ack settled on the spot, for backends that never wait to settle one (the in-memory
    /// backend): `Some` skips the boxed future of [`ack`](Acknowledger::ack). The default,
    /// `None`, means "call `ack`".
    fn ack_now(&self, token: u64) -> Option<Result<()>> {
        let _ = token;
        None
    }
    /// The message was not handled: deliver it again, now or after `delay`.
    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()>;
    /// The message cannot be handled: move it to the group's dead-letter queue with `reason`.
    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()>;
    /// Keep the message from being redelivered for `by` from now.
    async fn extend(&self, token: u64, by: Duration) -> Result<()>;
    /// The delivery was dropped without a decision: deliver it again. Must not block.
    fn release(&self, token: u64);
}

/// One delivery of a message to a consumer.
///
/// Decide its fate with [`ack`](Delivery::ack), [`nack`](Delivery::nack),
/// [`nack_after`](Delivery::nack_after) or [`dead_letter`](Delivery::dead_letter); each consumes
/// the delivery. A delivery dropped without a decision is redelivered (at-least-once).
pub struct Delivery {
    message: Arc<Message>,
    attempt: u32,
    handle: Option<(Arc<dyn Acknowledger>, u64)>,
}

impl Delivery {
    /// Builds a delivery; for adapter authors.
    ///
    /// `attempt` starts at 1 for the first delivery and rises by one for each redelivery; the
    /// topic and group are the acknowledger's.
    pub fn new(
        message: Arc<Message>,
        attempt: u32,
        acknowledger: Arc<dyn Acknowledger>,
        token: u64,
    ) -> Self {
        Delivery {
            message,
            attempt,
            handle: Some((acknowledger, token)),
        }
    }

    fn acknowledger(&self) -> &dyn Acknowledger {
        &*self
            .handle
            .as_ref()
            .expect("handle is present until the delivery is consumed")
            .0
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Which delivery of this message this is: 1 for the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the message was delivered before.
    pub fn redelivered(&self) -> bool {
        self.attempt > 1
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        self.acknowledger().topic()
    }

    /// The group it was delivered to.
    pub fn group(&self) -> &str {
        self.acknowledger().group()
    }

    /// Decodes the payload as JSON.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        self.message.decode_json()
    }

    fn take(&mut self) -> (Arc<dyn Acknowledger>, u64) {
        self.handle
            .take()
            .expect("a delivery's handle is taken only by the method that consumes it")
    }

    /// Marks the message handled. On error the message will be delivered again.
    pub async fn ack(mut self) -> Result<()> {
        let (acker, token) = self.take();
        match acker.ack_now(token) {
            Some(result) => result,
            None => acker.ack(token).await,
        }
    }

    /// Asks for the message again right away.
    pub async fn nack(mut self) -> Result<()> {
        let (acker, token) = self.take();
        acker.nack(token, None).await
    }

    /// Asks for the message again after `delay` (not before).
    pub async fn nack_after(mut self, delay: Duration) -> Result<()> {
        let (acker, token) = self.take();
        acker.nack(token, Some(delay)).await
    }

    /// Moves the message to the group's dead-letter queue, keeping payload and headers and
    /// recording `reason`.
    pub async fn dead_letter(mut self, reason: &str) -> Result<()> {
        let (acker, token) = self.take();
        acker.dead_letter(token, reason).await
    }

    /// Keeps the message from being redelivered for `by`, counted from now, for long work.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        let (acker, token) = self
            .handle
            .as_ref()
            .expect("handle is present until the delivery is consumed");
        acker.extend(*token, by).await
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some((acker, token)) = self.handle.take() {
            acker.release(token);
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field(
                "topic",
                &self.handle.as_ref().map_or("", |(a, _)| a.topic()),
            )
            .field(
                "group",
                &self.handle.as_ref().map_or("", |(a, _)| a.group()),
            )
            .finish()
    }
}
