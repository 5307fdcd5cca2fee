//! One group's queue: ready messages (with per-key ordering), in-flight deliveries, delayed
//! messages, and a nested dead-letter queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use spindle_core::{
    GroupDepth, GroupPolicy, Message, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
    HEADER_ORIGINAL_TOPIC,
};
use tokio::sync::Notify;

use crate::consumer::ConsumerShared;

/// A stored message and how many times it has been delivered.
#[derive(Clone)]
pub(crate) struct Entry {
    pub msg: Arc<Message>,
    pub attempts: u32,
}

/// A place in the ready queue: an unkeyed message, or "the next message of this key".
enum Slot {
    Unkeyed(Entry),
    Key(Arc<str>),
}

/// Messages of one key, delivered one at a time in order.
#[derive(Default)]
struct KeyQueue {
    items: VecDeque<Entry>,
    /// A message of this key is in flight or waiting on a delayed nack.
    busy: bool,
}

pub(crate) struct InFlight {
    entry: Entry,
    deadline: Instant,
    consumer: Weak<ConsumerShared>,
}

struct Delayed {
    due: Instant,
    seq: u64,
    entry: Entry,
    /// A delayed nack of a keyed message keeps its key busy, so later messages of the key wait.
    holds_key: bool,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// What happened to a delivery that came back without an ack.
pub(crate) enum Outcome {
    Requeued,
    Delayed,
    DeadLettered,
}

pub(crate) struct GroupState {
    pub policy: GroupPolicy,
    ready: VecDeque<Slot>,
    keyed: HashMap<Arc<str>, KeyQueue>,
    ready_count: usize,
    in_flight: HashMap<u64, InFlight>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    next_seq: u64,
    consumers: Vec<Weak<ConsumerShared>>,
}

/// A group of a topic, or the dead-letter queue of one.
pub(crate) struct Group {
    pub topic: Arc<str>,
    pub name: Arc<str>,
    state: Mutex<GroupState>,
    /// Signalled when messages become ready.
    pub ready_notify: Notify,
    closed: AtomicBool,
    /// `None` for a dead-letter queue itself.
    pub dead_letters: Option<Arc<Group>>,
}

/// A message taken for delivery.
pub(crate) struct Taken {
    pub token: u64,
    pub msg: Arc<Message>,
    pub attempt: u32,
}

impl Group {
    pub fn new(topic: Arc<str>, name: Arc<str>, policy: GroupPolicy) -> Arc<Group> {
        let dlq = Group::build(
            topic.clone(),
            format!("{name}.dlq").into(),
            GroupPolicy::max_attempts(u32::MAX),
            None,
        );
        Group::build(topic, name, policy, Some(dlq))
    }

    fn build(
        topic: Arc<str>,
        name: Arc<str>,
        policy: GroupPolicy,
        dead_letters: Option<Arc<Group>>,
    ) -> Arc<Group> {
        Arc::new(Group {
            topic,
            name,
            state: Mutex::new(GroupState {
                policy,
                ready: VecDeque::new(),
                keyed: HashMap::new(),
                ready_count: 0,
                in_flight: HashMap::new(),
                delayed: BinaryHeap::new(),
                next_seq: 0,
                consumers: Vec::new(),
            }),
            ready_notify: Notify::new(),
            closed: AtomicBool::new(false),
            dead_letters,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the group deleted or shut down and wakes every consumer so their streams end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let consumers = std::mem::take(&mut self.lock().consumers);
        for c in consumers.iter().filter_map(Weak::upgrade) {
            c.wake.notify_one();
        }
        self.ready_notify.notify_waiters();
        if let Some(dlq) = &self.dead_letters {
            dlq.close();
        }
    }

    pub fn register(&self, consumer: &Arc<ConsumerShared>) {
        let mut st = self.lock();
        st.consumers.retain(|c| c.strong_count() > 0);
        st.consumers.push(Arc::downgrade(consumer));
    }

    /// Adds messages published now (or after `delay`).
    pub fn publish(&self, msgs: impl IntoIterator<Item = Arc<Message>>, delay: Option<Duration>) {
        let mut st = self.lock();
        let due = delay.map(|d| Instant::now() + d);
        for msg in msgs {
            let entry = Entry { msg, attempts: 0 };
            match due {
                Some(due) => st.push_delayed(due, entry, false),
                None => st.push_back(entry),
            }
        }
        let ready = st.has_takeable();
        drop(st);
        if ready {
            self.ready_notify.notify_one();
        }
    }

    /// Takes up to `max` ready messages for `consumer`, holding them in flight until
    /// `ack_timeout` passes.
    pub fn take(
        &self,
        max: usize,
        ack_timeout: Duration,
        consumer: &Weak<ConsumerShared>,
        out: &mut VecDeque<Taken>,
    ) -> usize {
        let mut st = self.lock();
        let deadline = Instant::now() + ack_timeout;
        let mut taken = 0;
        while taken < max {
            let Some(mut entry) = st.pop_ready() else {
                break;
            };
            entry.attempts += 1;
            let token = st.next_seq;
            st.next_seq += 1;
            out.push_back(Taken {
                token,
                msg: entry.msg.clone(),
                attempt: entry.attempts,
            });
            st.in_flight.insert(
                token,
                InFlight {
                    entry,
                    deadline,
                    consumer: consumer.clone(),
                },
            );
            taken += 1;
        }
        let more = st.has_takeable();
        drop(st);
        if more {
            // Pass the wake-up on to the next waiting consumer.
            self.ready_notify.notify_one();
        }
        taken
    }

    /// Removes an in-flight delivery as handled. `false` if it was not in flight any more.
    pub fn ack(&self, token: u64) -> bool {
        let mut st = self.lock();
        match st.in_flight.remove(&token) {
            Some(f) => {
                st.finish_key(&f.entry);
                let ready = st.has_takeable();
                drop(st);
                if ready {
                    self.ready_notify.notify_one();
                }
                true
            }
            None => false,
        }
    }

    /// Puts an in-flight delivery back: now, after `delay`, or in the dead-letter queue once
    /// the policy's attempts are used up. `None` if it was not in flight any more.
    pub fn nack(&self, token: u64, delay: Option<Duration>, why: &str) -> Option<Outcome> {
        let mut st = self.lock();
        let f = st.in_flight.remove(&token)?;
        let outcome = if f.entry.attempts >= st.policy.max_attempts {
            st.finish_key(&f.entry);
            let reason = format!("{why}; max attempts ({}) reached", st.policy.max_attempts);
            drop(st);
            self.dead_letter_entry(f.entry, &reason);
            Outcome::DeadLettered
        } else {
            match delay {
                Some(d) if !d.is_zero() => {
                    st.push_delayed(Instant::now() + d, f.entry, true);
                    drop(st);
                    Outcome::Delayed
                }
                _ => {
                    st.push_front(f.entry);
                    drop(st);
                    Outcome::Requeued
                }
            }
        };
        if matches!(outcome, Outcome::Requeued | Outcome::DeadLettered) {
            self.ready_notify.notify_one();
        }
        Some(outcome)
    }

    /// Moves an in-flight delivery to the dead-letter queue. `false` if it was not in flight.
    pub fn dead_letter(&self, token: u64, reason: &str) -> bool {
        let mut st = self.lock();
        let Some(f) = st.in_flight.remove(&token) else {
            return false;
        };
        st.finish_key(&f.entry);
        let ready = st.has_takeable();
        drop(st);
        self.dead_letter_entry(f.entry, reason);
        if ready {
            self.ready_notify.notify_one();
        }
        true
    }

    fn dead_letter_entry(&self, entry: Entry, reason: &str) {
        let Some(dlq) = &self.dead_letters else {
            // A dead-letter queue has no dead-letter queue of its own; its policy never runs
            // out of attempts, so this is only reached by an explicit dead_letter, which the
            // acknowledger refuses before getting here.
            return;
        };
        let mut msg = Message::clone(&entry.msg);
        let headers = msg.headers_mut();
        headers.insert(HEADER_DEAD_LETTER_REASON.into(), reason.into());
        headers.insert(HEADER_ATTEMPT.into(), entry.attempts.to_string());
        headers.insert(HEADER_ORIGINAL_TOPIC.into(), self.topic.to_string());
        dlq.publish([Arc::new(msg)], None);
    }

    /// Sets a new deadline, `by` from now. `false` if the delivery was not in flight.
    pub fn extend(&self, token: u64, by: Duration) -> bool {
        let mut st = self.lock();
        match st.in_flight.get_mut(&token) {
            Some(f) => {
                f.deadline = Instant::now() + by;
                true
            }
            None => false,
        }
    }

    /// Returns deliveries that were fetched but never handed to the application: they go
    /// back to the front without counting an attempt.
    pub fn return_unyielded(&self, tokens: impl IntoIterator<Item = u64>) -> usize {
        let mut st = self.lock();
        let mut returned = Vec::new();
        for token in tokens {
            if let Some(mut f) = st.in_flight.remove(&token) {
                f.entry.attempts = f.entry.attempts.saturating_sub(1);
                returned.push(f.entry);
            }
        }
        // Push in reverse so the earliest fetched ends up first.
        let n = returned.len();
        for entry in returned.into_iter().rev() {
            st.push_front(entry);
        }
        drop(st);
        if n > 0 {
            self.ready_notify.notify_one();
        }
        n
    }

    /// Moves due delayed messages to ready and expires deliveries past their deadline.
    /// Returns the consumers whose expired deliveries free prefetch room.
    pub fn tick(&self, now: Instant) -> Vec<Weak<ConsumerShared>> {
        let mut st = self.lock();
        let mut became_ready = false;
        while st.delayed.peek().is_some_and(|d| d.0.due <= now) {
            let Reverse(d) = st.delayed.pop().expect("peeked");
            if d.holds_key {
                st.push_front(d.entry);
            } else {
                st.push_back(d.entry);
            }
            became_ready = true;
        }
        let mut expired_consumers = Vec::new();
        if st.in_flight.values().any(|f| f.deadline <= now) {
            let expired: Vec<u64> = st
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            let max_attempts = st.policy.max_attempts;
            let mut dead = Vec::new();
            for token in expired {
                let f = st.in_flight.remove(&token).expect("listed above");
                expired_consumers.push(f.consumer);
                if f.entry.attempts >= max_attempts {
                    st.finish_key(&f.entry);
                    dead.push(f.entry);
                } else {
                    st.push_front(f.entry);
                }
                became_ready = true;
            }
            drop(st);
            let reason = format!("ack deadline passed; max attempts ({max_attempts}) reached");
            for entry in dead {
                self.dead_letter_entry(entry, &reason);
            }
        } else {
            drop(st);
        }
        if became_ready {
            self.ready_notify.notify_one();
        }
        if let Some(dlq) = &self.dead_letters {
            expired_consumers.extend(dlq.tick(now));
        }
        expired_consumers
    }

    pub fn depth(&self) -> GroupDepth {
        let (ready, in_flight, delayed) = {
            let st = self.lock();
            (st.ready_count, st.in_flight.len(), st.delayed.len())
        };
        let dead = self
            .dead_letters
            .as_ref()
            .map(|d| d.depth().unacked())
            .unwrap_or(0);
        GroupDepth::new(ready as u64, in_flight as u64, delayed as u64, dead)
    }

    /// Drops ready and delayed messages; in-flight ones stay ackable.
    pub fn purge(&self) -> u64 {
        let mut st = self.lock();
        let n = st.ready_count + st.delayed.len();
        st.ready.clear();
        st.ready_count = 0;
        st.delayed.clear();
        // Keys stay only while a message of theirs is in flight.
        let busy: std::collections::HashSet<Arc<str>> = st
            .in_flight
            .values()
            .filter_map(|f| f.entry.msg.key().map(Arc::from))
            .collect();
        st.keyed.retain(|k, q| {
            q.items.clear();
            q.busy = busy.contains(k);
            q.busy
        });
        n as u64
    }

    /// Moves every ready dead-lettered message back to this group as a fresh message.
    pub fn redrive(&self) -> u64 {
        let Some(dlq) = &self.dead_letters else {
            return 0;
        };
        let mut moved = Vec::new();
        {
            let mut dst = dlq.lock();
            while let Some(entry) = dst.pop_ready() {
                dst.finish_key(&entry);
                moved.push(entry.msg);
            }
        }
        let n = moved.len() as u64;
        let restored = moved.into_iter().map(|m| {
            let mut msg = Message::clone(&m);
            let h = msg.headers_mut();
            h.remove(HEADER_DEAD_LETTER_REASON);
            h.remove(HEADER_ATTEMPT);
            h.remove(HEADER_ORIGINAL_TOPIC);
            Arc::new(msg)
        });
        self.publish(restored, None);
        n
    }
}

impl GroupState {
    /// Whether a consumer could take a message now. Messages of busy keys are ready but not
    /// takeable, so waking consumers for them would only make them spin.
    fn has_takeable(&self) -> bool {
        !self.ready.is_empty()
    }

    fn push_back(&mut self, entry: Entry) {
        self.ready_count += 1;
        match entry.msg.key() {
            None => self.ready.push_back(Slot::Unkeyed(entry)),
            Some(key) => {
                let key: Arc<str> = match self.keyed.get_key_value(key) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(key),
                };
                let q = self.keyed.entry(key.clone()).or_default();
                q.items.push_back(entry);
                if !q.busy && q.items.len() == 1 {
                    self.ready.push_back(Slot::Key(key));
                }
            }
        }
    }

    /// Puts a message back at the front: it was delivered before, and comes next. For a keyed
    /// message this also frees its key, which the delivery was holding.
    fn push_front(&mut self, entry: Entry) {
        self.ready_count += 1;
        match entry.msg.key() {
            None => self.ready.push_front(Slot::Unkeyed(entry)),
            Some(key) => {
                let key: Arc<str> = match self.keyed.get_key_value(key) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(key),
                };
                let q = self.keyed.entry(key.clone()).or_default();
                let was_scheduled = !q.busy && !q.items.is_empty();
                q.items.push_front(entry);
                q.busy = false;
                if was_scheduled {
                    // Its slot is somewhere in the queue already; move it to the front.
                    self.ready
                        .retain(|s| !matches!(s, Slot::Key(k) if Arc::ptr_eq(k, &key)));
                }
                self.ready.push_front(Slot::Key(key));
            }
        }
    }

    fn push_delayed(&mut self, due: Instant, entry: Entry, holds_key: bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.delayed.push(Reverse(Delayed {
            due,
            seq,
            entry,
            holds_key,
        }));
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let entry = match self.ready.pop_front()? {
            Slot::Unkeyed(e) => e,
            Slot::Key(key) => {
                let q = self
                    .keyed
                    .get_mut(&key)
                    .expect("a scheduled key has a queue");
                q.busy = true;
                q.items.pop_front().expect("a scheduled key has a message")
            }
        };
        self.ready_count -= 1;
        Some(entry)
    }

    /// A keyed message is done (acked or dead-lettered): the key's next message may go.
    fn finish_key(&mut self, entry: &Entry) {
        let Some(key) = entry.msg.key() else { return };
        let Some((k, _)) = self.keyed.get_key_value(key) else {
            return;
        };
        let k = k.clone();
        let q = self.keyed.get_mut(key).expect("just found");
        q.busy = false;
        if q.items.is_empty() {
            self.keyed.remove(key);
        } else {
            self.ready.push_back(Slot::Key(k));
        }
    }
}
