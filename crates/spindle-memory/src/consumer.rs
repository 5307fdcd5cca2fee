//! One subscription: a bounded buffer fed from its group, the deliveries it holds in flight,
//! and the acknowledger those deliveries call back into.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use spindle_core::{async_trait, Acknowledger, Delivery, Error, Result, SubscriptionControl};
use tokio::sync::Notify;

use crate::group::{Entry, Group, Published};
use crate::CoarseClock;

struct InFlight {
    entry: Entry,
    deadline: Instant,
    generation: u32,
}

/// Deliveries held, in a slab: a token is the slot and a generation, so a stale token never
/// finds the slot's next occupant.
#[derive(Default)]
struct InFlightSlab {
    slots: slab::Slab<InFlight>,
    next_generation: u32,
}

impl InFlightSlab {
    fn split(token: u64) -> (usize, u32) {
        ((token & 0xFFFF_FFFF) as usize, (token >> 32) as u32)
    }

    fn insert(&mut self, entry: Entry, deadline: Instant) -> u64 {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let slot = self.slots.insert(InFlight {
            entry,
            deadline,
            generation,
        });
        (u64::from(generation) << 32) | slot as u64
    }

    fn get(&self, token: u64) -> Option<&InFlight> {
        let (slot, generation) = Self::split(token);
        self.slots.get(slot).filter(|f| f.generation == generation)
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut InFlight> {
        let (slot, generation) = Self::split(token);
        self.slots
            .get_mut(slot)
            .filter(|f| f.generation == generation)
    }

    fn remove(&mut self, token: u64) -> Option<InFlight> {
        self.get(token)?;
        Some(self.slots.remove(Self::split(token).0))
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn tokens_due(&self, now: Instant) -> Vec<u64> {
        self.slots
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(slot, f)| (u64::from(f.generation) << 32) | slot as u64)
            .collect()
    }
}

#[derive(Default)]
struct ConsumerState {
    /// Fetched from the group, not yet handed out, with their ack deadlines.
    buffer: VecDeque<(Entry, Instant)>,
    /// Handed out and not yet decided. The prefetch bound applies to both together.
    in_flight: InFlightSlab,
}

impl ConsumerState {
    fn held(&self) -> usize {
        self.buffer.len() + self.in_flight.len()
    }
}

/// What a consumer takes from its broker and subscription options.
pub(crate) struct ConsumerConfig {
    pub broker_shut_down: Arc<AtomicBool>,
    pub max_delay: Duration,
    /// The sweeper's clock: deadlines need no more precision than its tick.
    pub clock: Arc<CoarseClock>,
    pub tick: Duration,
    pub prefetch: usize,
    pub ack_timeout: Duration,
    pub is_dead_letter_queue: bool,
}

pub(crate) struct ConsumerShared {
    pub group: Arc<Group>,
    config: ConsumerConfig,
    state: Mutex<ConsumerState>,
    closed: AtomicBool,
    /// Wakes the stream: prefetch room freed, subscription closed, group or broker gone.
    pub wake: Notify,
}

impl ConsumerShared {
    pub fn new(group: Arc<Group>, config: ConsumerConfig) -> Arc<Self> {
        let c = Arc::new(ConsumerShared {
            group,
            config,
            state: Mutex::new(ConsumerState::default()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        c.group.register(&c);
        c
    }

    fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finished(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self.group.is_closed()
            || self.config.broker_shut_down.load(Ordering::Acquire)
    }

    pub fn in_flight_count(&self) -> usize {
        self.lock().held()
    }

    /// Removes a held delivery; wakes the stream if that frees the room it waits for.
    fn remove(&self, token: u64) -> Option<Entry> {
        let mut st = self.lock();
        let held = st.held();
        let f = st.in_flight.remove(token)?;
        drop(st);
        if held >= self.config.prefetch {
            self.wake.notify_one();
        }
        Some(f.entry)
    }

    /// Stops fetching and returns what was fetched but not yielded. Safe to call repeatedly:
    /// each call returns whatever arrived since.
    fn close_now(&self) {
        self.closed.store(true, Ordering::Release);
        let returned: Vec<Entry> = self.lock().buffer.drain(..).map(|(e, _)| e).collect();
        self.group.requeue_unyielded(returned);
        self.wake.notify_one();
    }

    /// The ack deadline of a delivery taken now. The coarse clock may be a tick behind: add one
    /// so no deadline comes early.
    fn deadline(&self) -> Instant {
        self.config.clock.now() + self.config.ack_timeout + self.config.tick
    }

    /// Redelivers what is past its deadline. Called by the sweeper.
    pub fn expire(&self, now: Instant) {
        let expired: Vec<Entry> = {
            let mut st = self.lock();
            let tokens = st.in_flight.tokens_due(now);
            let buffered_due = st.buffer.iter().any(|(_, deadline)| *deadline <= now);
            if tokens.is_empty() && !buffered_due {
                return;
            }
            let mut expired: Vec<Entry> = tokens
                .iter()
                .filter_map(|t| st.in_flight.remove(*t).map(|f| f.entry))
                .collect();
            if buffered_due {
                let (due, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut st.buffer)
                    .into_iter()
                    .partition(|(_, deadline)| *deadline <= now);
                st.buffer = kept;
                expired.extend(due.into_iter().map(|(e, _)| e));
            }
            expired
        };
        for entry in expired {
            self.group.requeue(entry, None, "ack deadline passed");
        }
        self.wake.notify_one();
    }

    fn stale(&self) -> Error {
        Error::StaleDelivery(format!(
            "the delivery from group `{}` of topic `{}` is no longer in flight (its ack \
             deadline passed, or it was already decided); it will be delivered again",
            self.group.name, self.group.topic
        ))
    }

    /// A fetched delivery, or one new message straight from the group; else the prefetch room
    /// left (the caller then fetches in a batch, or waits).
    fn pop_buffered(self: &Arc<Self>) -> std::result::Result<Delivery, usize> {
        let mut st = self.lock();
        let (entry, deadline) = match st.buffer.pop_front() {
            Some(buffered) => buffered,
            None => {
                let room = self.config.prefetch.saturating_sub(st.held());
                if room == 0 {
                    return Err(0);
                }
                match self.group.take_new() {
                    Some(entry) => (entry, self.deadline()),
                    None => return Err(room),
                }
            }
        };
        let attempt = entry.attempts;
        // Made here, one per hand-out, so allocations and frees alternate on this thread.
        let msg = entry.msg.into_shared();
        let held = Entry {
            msg: Published::Shared(msg.clone()),
            attempts: attempt,
        };
        let token = st.in_flight.insert(held, deadline);
        drop(st);
        let acker: Arc<dyn Acknowledger> = self.clone();
        Ok(Delivery::new(msg, attempt, acker, token))
    }

    /// The next delivery, waiting for room and for messages; `None` once closed.
    async fn next(self: &Arc<Self>, scratch: &mut Vec<Entry>) -> Option<Delivery> {
        loop {
            if self.finished() {
                self.close_now();
                return None;
            }
            let room = match self.pop_buffered() {
                Ok(delivery) => return Some(delivery),
                Err(room) => room,
            };
            let wake = self.wake.notified();
            let ready = self.group.ready_notify.notified();
            tokio::pin!(wake, ready);
            wake.as_mut().enable();
            if room == 0 {
                if self.lock().held() >= self.config.prefetch {
                    wake.await;
                }
                continue;
            }
            ready.as_mut().enable();
            scratch.clear();
            let taken = self.group.take(room, scratch);
            if taken == 0 {
                let _idle = self.group.idle_guard();
                // The last look, after registering as idle (see `Group::idle_guard`).
                if self.group.take(room, scratch) == 0 {
                    tokio::select! {
                        _ = wake => {}
                        _ = ready => {}
                    }
                    continue;
                }
            }
            let deadline = self.deadline();
            let mut st = self.lock();
            st.buffer
                .extend(scratch.drain(..).map(|entry| (entry, deadline)));
        }
    }

    pub fn into_stream(self: Arc<Self>) -> BoxStream<'static, Result<Delivery>> {
        Box::pin(DeliveryStream {
            consumer: self,
            scratch: Vec::new(),
            waiting: None,
        })
    }
}

type Waiting = BoxFuture<'static, (Option<Delivery>, Vec<Entry>)>;

/// The subscription's stream. Buffered and new messages are handed out directly; only when
/// there is none (or no room) does it build the future that fetches and waits. Every delivery
/// takes a unit of the task's tokio budget, so a stream that is always ready still lets other
/// tasks run. Dropping it returns what it fetched.
struct DeliveryStream {
    consumer: Arc<ConsumerShared>,
    scratch: Vec<Entry>,
    waiting: Option<Waiting>,
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.waiting.is_none() {
            if !this.consumer.finished() {
                let budget = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                if let Ok(delivery) = this.consumer.pop_buffered() {
                    budget.made_progress();
                    return Poll::Ready(Some(Ok(delivery)));
                }
            }
            let consumer = this.consumer.clone();
            let mut scratch = std::mem::take(&mut this.scratch);
            this.waiting = Some(Box::pin(async move {
                tokio::task::consume_budget().await;
                let delivery = consumer.next(&mut scratch).await;
                (delivery, scratch)
            }));
        }
        let waiting = this.waiting.as_mut().expect("set above");
        match waiting.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((delivery, scratch)) => {
                this.waiting = None;
                this.scratch = scratch;
                Poll::Ready(delivery.map(Ok))
            }
        }
    }
}

impl Drop for DeliveryStream {
    fn drop(&mut self) {
        self.consumer.close_now();
    }
}

impl Drop for ConsumerShared {
    fn drop(&mut self) {
        // Deliveries keep their consumer alive, so whatever is left here was never yielded.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let unyielded: Vec<Entry> = st.buffer.drain(..).map(|(e, _)| e).collect();
        let left: Vec<Entry> = st.in_flight.slots.drain().map(|f| f.entry).collect();
        self.group.requeue_unyielded(unyielded);
        for entry in left {
            self.group.requeue(entry, None, "consumer dropped");
        }
    }
}

#[async_trait]
impl Acknowledger for ConsumerShared {
    fn topic(&self) -> &str {
        &self.group.topic
    }

    fn group(&self) -> &str {
        &self.group.name
    }

    async fn ack(&self, token: u64) -> Result<()> {
        self.ack_now(token).expect("memory acks settle at once")
    }

    fn ack_now(&self, token: u64) -> Option<Result<()>> {
        Some(match self.remove(token) {
            Some(entry) => {
                self.group.finish(&entry);
                Ok(())
            }
            None => Err(self.stale()),
        })
    }

    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()> {
        if let Some(delay) = delay.filter(|d| *d > self.config.max_delay) {
            // The delivery goes back now rather than being lost with the error.
            self.release(token);
            return Err(Error::DelayTooLong {
                requested: delay,
                max: self.config.max_delay,
            });
        }
        let entry = self.remove(token).ok_or_else(|| self.stale())?;
        self.group.requeue(entry, delay, "nacked");
        Ok(())
    }

    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()> {
        if self.config.is_dead_letter_queue {
            self.release(token);
            return Err(Error::unsupported(
                "memory",
                "dead-lettering a message that is already in a dead-letter queue",
            ));
        }
        let entry = self.remove(token).ok_or_else(|| self.stale())?;
        self.group.dead_letter(entry, reason);
        Ok(())
    }

    async fn extend(&self, token: u64, by: Duration) -> Result<()> {
        match self.lock().in_flight.get_mut(token) {
            Some(f) => {
                f.deadline = Instant::now() + by;
                Ok(())
            }
            None => Err(self.stale()),
        }
    }

    fn release(&self, token: u64) {
        if let Some(entry) = self.remove(token) {
            self.group
                .requeue(entry, None, "released without a decision");
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
