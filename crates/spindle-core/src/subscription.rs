//! A stream of deliveries that can be closed gracefully.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream, StreamExt};
use sync_wrapper::SyncWrapper;

use crate::{Delivery, Result};

/// The backend side of a [`Subscription`]'s lifecycle.
#[async_trait]
pub trait SubscriptionControl: Send + Sync + 'static {
    /// Stops receiving: messages fetched but not yet yielded go back to the group, the stream
    /// ends, and deliveries already yielded can still be acked. Must be idempotent.
    async fn close(&self) -> Result<()>;
}

/// A `'static` stream of deliveries for one (topic, group) consumer.
///
/// Dropping it closes it; [`close`](Subscription::close) does so explicitly and waits.
pub struct Subscription {
    // Only ever polled through `&mut self`, so wrapping it makes the subscription `Sync`.
    stream: SyncWrapper<BoxStream<'static, Result<Delivery>>>,
    control: Box<dyn SubscriptionControl>,
}

impl Subscription {
    /// Builds a subscription; for adapter authors.
    pub fn new(
        stream: BoxStream<'static, Result<Delivery>>,
        control: impl SubscriptionControl,
    ) -> Self {
        Subscription {
            stream: SyncWrapper::new(stream),
            control: Box::new(control),
        }
    }

    /// The next delivery; `None` once the subscription or backend is closed.
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        self.stream.get_mut().next().await
    }

    /// Up to `max` deliveries: waits for the first one, then takes what arrives until `max` or
    /// until `deadline` has passed since the call. Returns an empty batch if nothing came by
    /// then, and an error only if nothing was gathered before it.
    pub async fn receive_batch(&mut self, max: usize, deadline: Duration) -> Result<Vec<Delivery>> {
        let mut batch = Vec::with_capacity(max.min(1024));
        if max == 0 {
            return Ok(batch);
        }
        let until = tokio::time::Instant::now() + deadline;
        while batch.len() < max {
            match tokio::time::timeout_at(until, self.stream.get_mut().next()).await {
                Ok(Some(Ok(delivery))) => batch.push(delivery),
                Ok(Some(Err(e))) if batch.is_empty() => return Err(e),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "error after a partial batch; returning the batch");
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Graceful drain: stop receiving new messages. Deliveries already yielded can still be
    /// acked; messages fetched but not yet yielded go back to the group without counting an
    /// attempt. The stream then ends.
    pub async fn close(&self) -> Result<()> {
        self.control.close().await
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.get_mut().poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}
