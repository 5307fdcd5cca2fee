//! One subscription: a consumer-group member polled on its own thread, a per-partition ack
//! tracker deciding what may be committed, and the acknowledger behind its deliveries.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use spindle_core::{Acknowledger, Delivery, Error, Result, Subscription, SubscriptionControl};
use tokio::sync::{mpsc, Notify};

use crate::codec;
use crate::{Core, BACKEND};

/// How often acked offsets are committed (asynchronously) while consuming.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest single poll of the consumer.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a full consumer waits for room before pausing its partitions. Pausing makes
/// librdkafka drop what it fetched ahead, so short stalls just wait (without polling).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

type Tp = (String, i32);

/// What a subscription reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The topic and the group's retry topic; nacks go through the retry topic.
    Main { max_attempts: u32 },
    /// The group's dead-letter topic; nacks are redelivered by this consumer.
    DeadLetters,
}

/// One message read from Kafka and not yet decided.
#[derive(Clone)]
struct Record {
    tp: Tp,
    epoch: u64,
    offset: i64,
    message: Arc<spindle_core::Message>,
    attempt: u32,
}

/// Ack tracking of one assigned partition.
struct Part {
    epoch: u64,
    /// Offsets read and not yet decided (acked, or safely forwarded to retry/DLQ).
    pending: BTreeSet<i64>,
    /// One past the highest offset read; -1 before the first.
    next: i64,
    /// The last offset committed by this member.
    committed: i64,
}

impl Part {
    /// Everything below this offset is decided.
    fn commit_point(&self) -> Option<i64> {
        match self.pending.first() {
            Some(first) => Some(*first),
            None if self.next >= 0 => Some(self.next),
            None => None,
        }
    }
}

#[derive(Default)]
struct State {
    parts: HashMap<Tp, Part>,
    /// Deliveries handed to the application and not decided yet.
    tokens: HashMap<u64, Record>,
    next_token: u64,
    next_epoch: u64,
    /// Read, ready, waiting for room under the prefetch bound.
    stash: VecDeque<Record>,
    /// Waiting for a due time: retry records and local redeliveries.
    delayed: BTreeMap<(Instant, u64), Record>,
    delayed_seq: u64,
    sender: Option<mpsc::UnboundedSender<Result<Delivery>>>,
    closing: bool,
    shutdown: bool,
    paused: bool,
    assigned: bool,
    finished: bool,
}

/// State shared by the polling thread, the acknowledger, the stream and the broker.
pub(crate) struct SubShared {
    pub(crate) kind: Kind,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    prefetch: usize,
    state: Mutex<State>,
    /// Signalled when a delivery is decided (room under the prefetch bound) or on close.
    room: Condvar,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Result<Delivery>>>>,
    assigned: Notify,
    finished: Notify,
    finished_flag: AtomicBool,
}

impl SubShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the polling thread if it waits for room.
    fn wake(&self) {
        self.room.notify_all();
    }

    /// Delivered-unacked and delayed counts, for depth.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.tokens.len() as u64, st.delayed.len() as u64)
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished_flag.load(Ordering::SeqCst)
    }

    /// Stops yielding; deliveries buffered and not yet taken go back to the group.
    fn begin_close(&self, shutdown: bool) {
        {
            let mut st = self.lock();
            st.closing = true;
            st.shutdown |= shutdown;
            st.sender = None;
        }
        self.wake();
        // Dropping buffered deliveries releases them (outside the state lock).
        let drained: Vec<_> = {
            let mut rx = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
            let mut v = Vec::new();
            if let Some(rx) = rx.as_mut() {
                while let Ok(item) = rx.try_recv() {
                    v.push(item);
                }
            }
            v
        };
        drop(drained);
    }

    /// Forced stop (broker shutdown): the thread commits what is decided and leaves the group.
    pub(crate) fn shutdown(&self) {
        self.begin_close(true);
    }

    /// Waits until the polling thread has left the group, at most `bound`.
    pub(crate) async fn wait_finished(&self, bound: Duration) -> bool {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.finished.notified();
            if self.is_finished() {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.is_finished();
            }
        }
    }

    /// Marks a record decided; false if its partition was reassigned since it was read.
    fn settle(st: &mut State, rec: &Record) -> bool {
        match st.parts.get_mut(&rec.tp) {
            Some(p) if p.epoch == rec.epoch => {
                p.pending.remove(&rec.offset);
                true
            }
            _ => false,
        }
    }

    fn requeue(st: &mut State, mut rec: Record, delay: Duration) {
        rec.attempt += 1;
        let due = Instant::now() + delay;
        st.delayed_seq += 1;
        let seq = st.delayed_seq;
        st.delayed.insert((due, seq), rec);
    }
}

/// The consumer's context: commits decided offsets before partitions are revoked and starts
/// fresh trackers for assigned ones.
struct SubContext {
    shared: Arc<SubShared>,
}

impl ClientContext for SubContext {}

impl ConsumerContext for SubContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut commit = TopicPartitionList::new();
            {
                let mut st = self.shared.lock();
                for e in tpl.elements() {
                    let tp = (e.topic().to_string(), e.partition());
                    if let Some(p) = st.parts.remove(&tp) {
                        if let Some(point) = p.commit_point() {
                            let _ = commit.add_partition_offset(&tp.0, tp.1, Offset::Offset(point));
                        }
                    }
                    st.stash.retain(|r| r.tp != tp);
                    st.delayed.retain(|_, r| r.tp != tp);
                }
            }
            if commit.count() > 0 {
                if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                    tracing::warn!(error = %e, "kafka: commit before revoke failed");
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            {
                let mut st = self.shared.lock();
                for e in tpl.elements() {
                    st.next_epoch += 1;
                    let epoch = st.next_epoch;
                    st.parts.insert(
                        (e.topic().to_string(), e.partition()),
                        Part {
                            epoch,
                            pending: BTreeSet::new(),
                            next: -1,
                            committed: -1,
                        },
                    );
                }
                st.paused = false;
                st.assigned = true;
            }
            self.shared.assigned.notify_waiters();
        }
    }
}

/// Acknowledges deliveries of one subscription.
#[derive(Clone)]
pub(crate) struct Acker {
    shared: Arc<SubShared>,
    core: Arc<Core>,
    runtime: tokio::runtime::Handle,
}

impl Acker {
    fn take(&self, token: u64) -> Result<Record> {
        let mut st = self.shared.lock();
        match st.tokens.remove(&token) {
            Some(rec) => {
                drop(st);
                self.shared.wake();
                Ok(rec)
            }
            None if st.shutdown => Err(Error::Closed("the subscription was shut down")),
            None => Err(Error::StaleDelivery(format!(
                "delivery {token} is no longer held by this consumer"
            ))),
        }
    }

    /// Forwards `rec` to the retry or dead-letter topic, then marks it decided. On failure the
    /// consumer redelivers it itself.
    async fn forward(
        &self,
        rec: Record,
        dead_letter: Option<String>,
        delay: Option<Duration>,
    ) -> Result<()> {
        let (topic, group) = (&self.shared.topic, &self.shared.group);
        let (target, extra) = match &dead_letter {
            Some(reason) => (
                self.core.dlq_topic(topic, group),
                codec::dead_letter_headers(rec.attempt, reason, topic),
            ),
            None => (
                self.core.retry_topic(topic, group),
                codec::retry_headers(rec.attempt + 1, delay),
            ),
        };
        let result = self.core.produce(&target, &rec.message, &extra, None).await;
        let mut st = self.shared.lock();
        match result {
            Ok(()) => {
                SubShared::settle(&mut st, &rec);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = %target, "kafka: forwarding failed; redelivering locally");
                if !st.closing {
                    SubShared::requeue(&mut st, rec, Duration::ZERO);
                }
                Err(e)
            }
        }
    }

    async fn nack_record(&self, rec: Record, delay: Option<Duration>) -> Result<()> {
        match self.shared.kind {
            Kind::DeadLetters => {
                let mut st = self.shared.lock();
                SubShared::requeue(&mut st, rec, delay.unwrap_or_default());
                Ok(())
            }
            Kind::Main { max_attempts } => {
                if rec.attempt >= max_attempts {
                    let reason = format!("max attempts ({max_attempts}) reached");
                    self.forward(rec, Some(reason), None).await
                } else {
                    self.forward(rec, None, delay).await
                }
            }
        }
    }
}

#[async_trait]
impl Acknowledger for Acker {
    fn topic(&self) -> &str {
        &self.shared.topic
    }

    fn group(&self) -> &str {
        &self.shared.group
    }

    async fn ack(&self, token: u64) -> Result<()> {
        let rec = self.take(token)?;
        let mut st = self.shared.lock();
        if SubShared::settle(&mut st, &rec) {
            Ok(())
        } else if st.shutdown {
            Err(Error::Closed("the subscription was shut down"))
        } else {
            Err(Error::StaleDelivery(
                "its partition was reassigned; it will be delivered again".into(),
            ))
        }
    }

    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()> {
        let rec = self.take(token)?;
        if let Some(d) = delay {
            let max = self.core.settings.max_nack_delay;
            if d > max {
                // Not lost: delivered again right away.
                let mut st = self.shared.lock();
                SubShared::requeue(&mut st, rec, Duration::ZERO);
                return Err(Error::DelayTooLong { requested: d, max });
            }
        }
        self.nack_record(rec, delay).await
    }

    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()> {
        if self.shared.kind == Kind::DeadLetters {
            return Err(Error::unsupported(
                BACKEND,
                "dead-lettering from a dead-letter queue",
            ));
        }
        let rec = self.take(token)?;
        self.forward(rec, Some(reason.to_string()), None).await
    }

    async fn extend(&self, _token: u64, _by: Duration) -> Result<()> {
        Err(Error::unsupported(
            BACKEND,
            "extend (Kafka has no ack deadline)",
        ))
    }

    fn release(&self, token: u64) {
        let rec = {
            let mut st = self.shared.lock();
            let Some(rec) = st.tokens.remove(&token) else {
                return;
            };
            self.shared.room.notify_all();
            if st.closing {
                // Closing: it stays uncommitted, so the group's next owner reads it again.
                return;
            }
            if self.shared.kind == Kind::DeadLetters {
                SubShared::requeue(&mut st, rec, Duration::ZERO);
                return;
            }
            rec
        };
        let me = self.clone();
        self.runtime.spawn(async move {
            if let Err(e) = me.nack_record(rec, None).await {
                tracing::warn!(error = %e, "kafka: redelivering a dropped delivery");
            }
        });
    }
}

/// Ends the stream and lets in-flight deliveries finish.
struct Control {
    shared: Arc<SubShared>,
}

#[async_trait]
impl SubscriptionControl for Control {
    async fn close(&self) -> Result<()> {
        self.shared.begin_close(false);
        let idle = self.shared.lock().tokens.is_empty();
        if idle {
            // Nothing in flight: wait until the decided offsets are committed and the group
            // is left, so the next member starts exactly after them.
            self.shared.wait_finished(Duration::from_secs(30)).await;
        }
        Ok(())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.shared.begin_close(false);
    }
}

/// What [`subscribe`] needs.
pub(crate) struct SubscribeArgs {
    pub kind: Kind,
    pub topic: String,
    pub group: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub prefetch: usize,
}

/// Starts a consumer and waits for its first assignment.
pub(crate) async fn subscribe(
    core: &Arc<Core>,
    args: SubscribeArgs,
) -> Result<(Subscription, Arc<SubShared>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(SubShared {
        kind: args.kind,
        topic: args.topic.into(),
        group: args.group.into(),
        prefetch: args.prefetch,
        state: Mutex::new(State {
            sender: Some(tx),
            ..State::default()
        }),
        room: Condvar::new(),
        receiver: Mutex::new(Some(rx)),
        assigned: Notify::new(),
        finished: Notify::new(),
        finished_flag: AtomicBool::new(false),
    });
    let consumer: BaseConsumer<SubContext> = core
        .settings
        .consumer_config(&args.group_id)
        .create_with_context(SubContext {
            shared: shared.clone(),
        })
        .map_err(|e| crate::map_err("creating a consumer", e))?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| crate::map_err("subscribing", e))?;
    let acker: Arc<dyn Acknowledger> = Arc::new(Acker {
        shared: shared.clone(),
        core: core.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("spindle-kafka-{}", args.group_id))
        .spawn(move || run(consumer, thread_shared, acker))
        .map_err(|e| {
            Error::backend(
                BACKEND,
                "spawning the consumer thread",
                false,
                Some(Box::new(e)),
            )
        })?;

    // Wait for the first assignment, so the caller's next publish is seen by this member.
    let bound = core.settings.assign_timeout;
    let until = tokio::time::Instant::now() + bound;
    loop {
        let notified = shared.assigned.notified();
        if shared.lock().assigned {
            break;
        }
        if tokio::time::timeout_at(until, notified).await.is_err() && !shared.lock().assigned {
            shared.shutdown();
            return Err(Error::Timeout {
                operation: "waiting for a consumer group assignment",
                after: bound,
            });
        }
    }

    let stream_shared = shared.clone();
    let stream = futures::stream::poll_fn(move |cx| {
        if stream_shared.lock().closing {
            return std::task::Poll::Ready(None);
        }
        let mut rx = stream_shared
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => std::task::Poll::Ready(None),
        }
    });
    let sub = Subscription::new(
        Box::pin(stream),
        Control {
            shared: shared.clone(),
        },
    );
    Ok((sub, shared))
}

/// Builds the commit list of decided offsets; `all` ignores what was committed already.
fn commit_list(st: &mut State, all: bool) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, p) in st.parts.iter_mut() {
        if let Some(point) = p.commit_point() {
            if all || point > p.committed {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(point));
                p.committed = point;
            }
        }
    }
    tpl
}

/// The polling thread of one subscription.
fn run(consumer: BaseConsumer<SubContext>, shared: Arc<SubShared>, acker: Arc<dyn Acknowledger>) {
    let mut last_commit = Instant::now();
    let mut last_error: Option<Instant> = None;
    let mut full_since: Option<Instant> = None;
    loop {
        let mut undeliverable = Vec::new();
        // What to do this round: wait for room (short stall), or pause/resume and poll.
        let (waited, want_pause, paused, next_due) = {
            let mut st = shared.lock();
            if st.shutdown || (st.closing && st.tokens.is_empty()) {
                break;
            }
            // Hand out what is ready, up to the prefetch bound.
            let now = Instant::now();
            while !st.closing && st.tokens.len() < shared.prefetch {
                let rec = match st.delayed.first_key_value() {
                    Some(((due, _), _)) if *due <= now => st.delayed.pop_first().map(|(_, r)| r),
                    _ => st.stash.pop_front(),
                };
                let Some(rec) = rec else { break };
                st.next_token += 1;
                let token = st.next_token;
                let delivery =
                    Delivery::new(rec.message.clone(), rec.attempt, acker.clone(), token);
                st.tokens.insert(token, rec);
                if let Some(tx) = &st.sender {
                    if let Err(e) = tx.send(Ok(delivery)) {
                        undeliverable.push(e.0);
                    }
                } else {
                    undeliverable.push(Ok(delivery));
                }
            }
            let full = st.tokens.len() >= shared.prefetch || !st.stash.is_empty();
            let next_due = st.delayed.first_key_value().map(|((due, _), _)| *due);
            if full {
                full_since.get_or_insert(now);
            } else {
                full_since = None;
            }
            let long_full = full_since.is_some_and(|t| t.elapsed() >= PAUSE_AFTER);
            if full && !long_full && !st.paused && !st.closing && undeliverable.is_empty() {
                // A short stall: wait for room without polling, keeping what librdkafka
                // fetched ahead (pausing would drop it).
                let mut wait = POLL_INTERVAL;
                if let Some(due) = next_due {
                    wait = wait.min(due.saturating_duration_since(now));
                }
                let (st, _) = shared
                    .room
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner());
                drop(st);
                (true, false, false, None)
            } else {
                (false, long_full || st.closing, st.paused, next_due)
            }
        };
        // Dropped outside the lock: releasing takes it.
        drop(undeliverable);
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            let tpl = commit_list(&mut shared.lock(), false);
            if tpl.count() > 0 {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %e, "kafka: async commit failed");
                }
            }
            last_commit = Instant::now();
        }
        if waited {
            continue;
        }
        if want_pause != paused {
            if let Ok(assignment) = consumer.assignment() {
                let r = if want_pause {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                };
                if r.is_ok() {
                    shared.lock().paused = want_pause;
                }
            }
        }
        let mut timeout = POLL_INTERVAL;
        if let Some(due) = next_due {
            timeout = timeout.min(due.saturating_duration_since(Instant::now()));
        }
        match consumer.poll(timeout) {
            Some(Ok(m)) => on_message(&shared, &m),
            // Rate-limited: a broker outage reports the same error on every poll.
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                tracing::warn!(error = %e, "kafka: consumer error");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) | None => {}
        }
    }
    // Commit everything decided, then leave the group (the drop of the consumer does).
    let tpl = commit_list(&mut shared.lock(), true);
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "kafka: final commit failed");
        }
    }
    consumer.unsubscribe();
    drop(consumer);
    {
        let mut st = shared.lock();
        st.parts.clear();
        st.stash.clear();
        st.delayed.clear();
        st.finished = true;
        st.sender = None;
    }
    shared.finished_flag.store(true, Ordering::SeqCst);
    shared.finished.notify_waiters();
}

fn on_message(shared: &SubShared, m: &BorrowedMessage<'_>) {
    let dead_letters = shared.kind == Kind::DeadLetters;
    let decoded = codec::decode(m, dead_letters);
    let mut st = shared.lock();
    if st.closing {
        return;
    }
    let tp = (m.topic().to_string(), m.partition());
    let Some(part) = st.parts.get_mut(&tp) else {
        return;
    };
    part.pending.insert(m.offset());
    part.next = part.next.max(m.offset() + 1);
    let rec = Record {
        tp,
        epoch: part.epoch,
        offset: m.offset(),
        message: Arc::new(decoded.message),
        attempt: if dead_letters {
            1
        } else {
            decoded.attempt.unwrap_or(1).max(1)
        },
    };
    match decoded.due_ms.and_then(codec::until_due) {
        Some(wait) => {
            let due = Instant::now() + wait;
            st.delayed_seq += 1;
            let seq = st.delayed_seq;
            st.delayed.insert((due, seq), rec);
        }
        _ => st.stash.push_back(rec),
    }
}
