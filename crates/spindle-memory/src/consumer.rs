//! One subscription: a bounded local buffer fed from its group, and the acknowledger its
//! deliveries call back into.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use spindle_core::{async_trait, Acknowledger, Delivery, Error, Result, SubscriptionControl};
use tokio::sync::Notify;

use crate::group::{Group, Outcome, Taken};
use crate::Inner;

pub(crate) struct ConsumerShared {
    pub group: Arc<Group>,
    broker: Weak<Inner>,
    prefetch: usize,
    ack_timeout: Duration,
    /// Deliveries held: fetched into the buffer or yielded and not yet decided.
    outstanding: AtomicUsize,
    /// Fetched, not yet yielded.
    buffer: Mutex<VecDeque<Taken>>,
    closed: AtomicBool,
    /// Wakes the stream: prefetch room freed, subscription closed, group or broker gone.
    pub wake: Notify,
    is_dead_letter_queue: bool,
}

impl ConsumerShared {
    pub fn new(
        group: Arc<Group>,
        broker: Weak<Inner>,
        prefetch: usize,
        ack_timeout: Duration,
        is_dead_letter_queue: bool,
    ) -> Arc<Self> {
        let c = Arc::new(ConsumerShared {
            group,
            broker,
            prefetch,
            ack_timeout,
            outstanding: AtomicUsize::new(0),
            buffer: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            is_dead_letter_queue,
        });
        c.group.register(&c);
        c
    }

    fn finished(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self.group.is_closed()
            || self.broker.upgrade().is_none_or(|b| b.is_shut_down())
    }

    /// One delivery's prefetch room is free again.
    pub fn release_room(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn close_now(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let tokens: Vec<u64> = self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .map(|t| t.token)
            .collect();
        let n = tokens.len();
        self.group.return_unyielded(tokens);
        self.outstanding.fetch_sub(n, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn stale(&self) -> Error {
        Error::StaleDelivery(format!(
            "the delivery from group `{}` of topic `{}` is no longer in flight (its ack \
             deadline passed, or it was already decided); it will be delivered again",
            self.group.name, self.group.topic
        ))
    }

    /// The next delivery, waiting for room and for messages; `None` once closed.
    async fn next(self: &Arc<Self>) -> Option<Delivery> {
        loop {
            if self.finished() {
                self.close_now();
                return None;
            }
            if let Some(t) = self
                .buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                let acker: Arc<dyn Acknowledger> = self.clone();
                return Some(Delivery::new(
                    t.msg,
                    t.attempt,
                    self.group.topic.clone(),
                    self.group.name.clone(),
                    acker,
                    t.token,
                ));
            }
            let wake = self.wake.notified();
            let ready = self.group.ready_notify.notified();
            tokio::pin!(wake, ready);
            wake.as_mut().enable();
            let room = self
                .prefetch
                .saturating_sub(self.outstanding.load(Ordering::Acquire));
            if room == 0 {
                wake.await;
                continue;
            }
            ready.as_mut().enable();
            if self.finished() {
                continue;
            }
            let taken = {
                let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
                let weak = Arc::downgrade(self);
                let n = self.group.take(room, self.ack_timeout, &weak, &mut buffer);
                self.outstanding.fetch_add(n, Ordering::AcqRel);
                n
            };
            if taken == 0 {
                tokio::select! {
                    _ = wake => {}
                    _ = ready => {}
                }
            }
        }
    }

    pub fn into_stream(self: Arc<Self>) -> BoxStream<'static, Result<Delivery>> {
        let guard = CloseOnDrop(self);
        stream::unfold(guard, |guard| async move {
            let delivery = guard.0.next().await?;
            Some((Ok(delivery), guard))
        })
        .boxed()
    }
}

/// Returns buffered messages to the group when the stream is dropped.
struct CloseOnDrop(Arc<ConsumerShared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close_now();
    }
}

#[async_trait]
impl Acknowledger for ConsumerShared {
    async fn ack(&self, token: u64) -> Result<()> {
        if self.group.ack(token) {
            self.release_room();
            Ok(())
        } else {
            Err(self.stale())
        }
    }

    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()> {
        if let Some(delay) = delay {
            let max = self.broker.upgrade().map(|b| b.settings.max_delay);
            if let Some(max) = max.filter(|max| delay > *max) {
                // The delivery goes back now rather than being lost with the error.
                self.release(token);
                return Err(Error::DelayTooLong {
                    requested: delay,
                    max,
                });
            }
        }
        match self.group.nack(token, delay, "nacked") {
            Some(Outcome::Requeued | Outcome::Delayed | Outcome::DeadLettered) => {
                self.release_room();
                Ok(())
            }
            None => Err(self.stale()),
        }
    }

    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()> {
        if self.is_dead_letter_queue {
            self.release(token);
            return Err(Error::unsupported(
                "memory",
                "dead-lettering a message that is already in a dead-letter queue",
            ));
        }
        if self.group.dead_letter(token, reason) {
            self.release_room();
            Ok(())
        } else {
            Err(self.stale())
        }
    }

    async fn extend(&self, token: u64, by: Duration) -> Result<()> {
        if self.group.extend(token, by) {
            Ok(())
        } else {
            Err(self.stale())
        }
    }

    fn release(&self, token: u64) {
        if self
            .group
            .nack(token, None, "released without a decision")
            .is_some()
        {
            self.release_room();
        }
    }
}

/// Closes one subscription.
pub(crate) struct Control(pub Arc<ConsumerShared>);

#[async_trait]
impl SubscriptionControl for Control {
    async fn close(&self) -> Result<()> {
        self.0.close_now();
        Ok(())
    }
}
