//! One group's queue: ready messages (with per-key ordering), delayed messages, and a nested
//! dead-letter queue. Deliveries in flight are tracked by the consumer holding them (see
//! `consumer.rs`), so acks never contend with publishers for this lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use rustc_hash::FxHashMap as HashMap;
use spindle_core::{
    GroupDepth, GroupPolicy, Message, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
    HEADER_ORIGINAL_TOPIC,
};
use tokio::sync::Notify;

use crate::consumer::ConsumerShared;

/// A stored message and how many times it has been delivered.
pub(crate) struct Entry {
    pub msg: Published,
    pub attempts: u32,
}

impl Entry {
    /// This entry with a payload of its own (see [`crate::payload::detach`]), for one that
    /// will wait out of publish order.
    fn detached(self) -> Entry {
        let mut msg = self.msg.into_message();
        crate::payload::detach(msg.payload_mut());
        Entry {
            msg: Published::Owned(msg),
            attempts: self.attempts,
        }
    }
}

/// A stored message. Going to one group it stays owned until a consumer hands it out: the
/// shared copy a delivery points to is made then, on the consumer's thread, one at a time, so
/// its allocation and free stay on that thread and in its allocator cache. (glibc frees a
/// chunk of another thread's arena under that arena's lock, which the publishing thread needs
/// for its next allocation: one such free per message halved end-to-end throughput.) Fanned
/// out to several groups, it is shared from the start.
pub(crate) enum Published {
    Owned(Message),
    Shared(Arc<Message>),
}

impl Published {
    pub fn key(&self) -> Option<&str> {
        match self {
            Published::Owned(m) => m.key(),
            Published::Shared(m) => m.key(),
        }
    }

    fn into_entry(self) -> Entry {
        Entry {
            msg: self,
            attempts: 0,
        }
    }

    /// The shared form deliveries point to.
    pub fn into_shared(self) -> Arc<Message> {
        match self {
            Published::Owned(m) => Arc::new(m),
            Published::Shared(m) => m,
        }
    }

    pub fn into_message(self) -> Message {
        match self {
            Published::Owned(m) => m,
            Published::Shared(m) => Arc::unwrap_or_clone(m),
        }
    }
}

/// New unkeyed messages: a lock-free queue, with a count publishers keep to themselves, so a
/// publisher checking the depth bound does not read the line every pop writes (as
/// `SegQueue::len` does) until the bound is near.
struct Inbox {
    queue: SegQueue<Published>,
    /// Written by publishers only: messages pushed (counted before the push), and how many of
    /// those had been popped when a publisher last measured the queue.
    pushed: Padded<(AtomicUsize, AtomicUsize)>,
}

impl Inbox {
    fn new() -> Self {
        Inbox {
            queue: SegQueue::new(),
            pushed: Padded((AtomicUsize::new(0), AtomicUsize::new(0))),
        }
    }

    fn push(&self, msg: Published) {
        self.pushed.0 .0.fetch_add(1, Ordering::Relaxed);
        self.queue.push(msg);
    }

    /// Pops up to `max` messages into `f`; returns how many.
    fn pop_into(&self, max: usize, mut f: impl FnMut(Published)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(msg) = self.queue.pop() else { break };
            f(msg);
            n += 1;
        }
        n
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The number queued, give or take publishes under way, from publishers' own count: it
    /// only grows until the next measurement.
    fn len_estimate(&self) -> usize {
        let (pushed, popped_then) = &self.pushed.0;
        let pushed = pushed.load(Ordering::Acquire);
        pushed.saturating_sub(popped_then.load(Ordering::Relaxed))
    }

    /// The number queued, measured (and remembered for the estimate).
    fn len(&self) -> usize {
        let (pushed, popped_then) = &self.pushed.0;
        let pushed = pushed.load(Ordering::Acquire);
        let len = self.queue.len();
        popped_then.fetch_max(pushed.saturating_sub(len), Ordering::Relaxed);
        len
    }
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

pub(crate) struct GroupState {
    pub policy: GroupPolicy,
    ready: VecDeque<Slot>,
    keyed: HashMap<Arc<str>, KeyQueue>,
    ready_count: usize,
    delayed: BinaryHeap<Reverse<Delayed>>,
    next_seq: u64,
    consumers: Vec<Weak<ConsumerShared>>,
}

/// Keeps a value on its own cache lines: idle consumers poll the takeable hint, and must not
/// slow down the publisher that holds the lock next to it.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

/// A group of a topic, or the dead-letter queue of one.
pub(crate) struct Group {
    pub topic: Arc<str>,
    pub name: Arc<str>,
    state: Mutex<GroupState>,
    /// Signalled when messages become takeable.
    pub ready_notify: Notify,
    /// How many slots were takeable when the lock was last released: lets an idle consumer
    /// look without taking the lock a publisher needs.
    takeable_hint: Padded<AtomicUsize>,
    /// Ready plus delayed messages when the lock was last released: the capacity check reads
    /// it without locking.
    queued_hint: AtomicUsize,
    /// New unkeyed messages. Publishers push here without the lock, so they never wait for a
    /// consumer; consumers take from here after the locked queue (which holds redeliveries,
    /// keyed and delayed messages, and so comes first).
    inbox: Inbox,
    /// Consumers about to wait for messages: publishers wake one only when this is non-zero.
    idle: Padded<AtomicUsize>,
    closed: AtomicBool,
    /// `None` for a dead-letter queue itself.
    pub dead_letters: Option<Arc<Group>>,
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
                keyed: HashMap::default(),
                ready_count: 0,
                delayed: BinaryHeap::new(),
                next_seq: 0,
                consumers: Vec::new(),
            }),
            ready_notify: Notify::new(),
            takeable_hint: Padded(AtomicUsize::new(0)),
            queued_hint: AtomicUsize::new(0),
            inbox: Inbox::new(),
            idle: Padded(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
            dead_letters,
        })
    }

    pub fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            // A panic while holding the lock leaves plain data behind; keep serving it.
            guard: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            hint: &self.takeable_hint.0,
            queued: &self.queued_hint,
        }
    }

    /// Whether `adding` more messages would take the group past `limit` waiting (ready or
    /// delayed, as of the last release of the lock). Measures the inbox only when publishers'
    /// own estimate says it might.
    pub fn would_exceed(&self, adding: usize, limit: usize) -> bool {
        let locked = self.queued_hint.load(Ordering::Acquire) + adding;
        locked + self.inbox.len_estimate() > limit && locked + self.inbox.len() > limit
    }

    /// Whether anything may be takeable, without locking (a hint: `take` decides).
    pub fn maybe_takeable(&self) -> bool {
        self.takeable_hint.0.load(Ordering::Acquire) > 0 || !self.inbox.is_empty()
    }

    /// Marks a consumer as about to wait; the guard unmarks it. Register before the last look
    /// for messages, so a publisher either sees the mark or the consumer sees the message.
    pub fn idle_guard(&self) -> IdleGuard<'_> {
        self.idle.0.fetch_add(1, Ordering::SeqCst);
        IdleGuard(&self.idle.0)
    }

    /// Wakes one waiting consumer, if any is waiting.
    fn wake_idle(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.idle.0.load(Ordering::SeqCst) > 0 {
            self.ready_notify.notify_one();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the group deleted or shut down and wakes every consumer so their streams end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for c in self.consumers() {
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

    pub fn consumers(&self) -> Vec<Arc<ConsumerShared>> {
        self.lock()
            .consumers
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Adds messages published now (or after `delay`).
    pub fn publish(&self, msgs: impl IntoIterator<Item = Published>, delay: Option<Duration>) {
        let mut locked: Option<StateGuard<'_>> = None;
        let due = delay.map(|d| Instant::now() + d);
        for msg in msgs {
            match due {
                Some(due) => locked.get_or_insert_with(|| self.lock()).push_delayed(
                    due,
                    msg.into_entry(),
                    false,
                ),
                None if msg.key().is_some() => locked
                    .get_or_insert_with(|| self.lock())
                    .push_back(msg.into_entry()),
                None => self.inbox.push(msg),
            }
        }
        drop(locked);
        self.wake_idle();
    }

    /// One new message straight from the inbox, counting its first attempt, when nothing in the
    /// locked queue (redeliveries, keyed or delayed messages) comes first.
    pub fn take_new(&self) -> Option<Entry> {
        if self.takeable_hint.0.load(Ordering::Acquire) > 0 {
            return None;
        }
        let mut taken = None;
        self.inbox.pop_into(1, |msg| {
            let mut entry = msg.into_entry();
            entry.attempts = 1;
            taken = Some(entry);
        });
        taken
    }

    /// Takes up to `max` takeable messages, counting one more attempt for each: first from
    /// the locked queue (redeliveries and keyed messages), then new ones from the inbox.
    pub fn take(&self, max: usize, out: &mut Vec<Entry>) -> usize {
        let mut taken = 0;
        if self.takeable_hint.0.load(Ordering::Acquire) > 0 {
            let mut st = self.lock();
            while taken < max {
                let Some(mut entry) = st.pop_ready() else {
                    break;
                };
                entry.attempts += 1;
                out.push(entry);
                taken += 1;
            }
        }
        taken += self.inbox.pop_into(max - taken, |msg| {
            let mut entry = msg.into_entry();
            entry.attempts += 1;
            out.push(entry);
        });
        if taken == max && self.maybe_takeable() {
            // Pass the wake-up on to the next waiting consumer.
            self.wake_idle();
        }
        taken
    }

    /// A delivered message is done (acked): a keyed message frees its key.
    pub fn finish(&self, entry: &Entry) {
        if entry.msg.key().is_none() {
            return;
        }
        let freed = self.lock().finish_key(entry);
        if freed {
            self.ready_notify.notify_one();
        }
    }

    /// A delivered message comes back: now, after `delay`, or to the dead-letter queue once
    /// the policy's attempts are used up. Returns whether it was dead-lettered.
    pub fn requeue(&self, entry: Entry, delay: Option<Duration>, why: &str) -> bool {
        let delay = delay.filter(|d| !d.is_zero());
        // Copied before the lock: it may clone the message.
        let entry = if delay.is_some() {
            entry.detached()
        } else {
            entry
        };
        let mut st = self.lock();
        if entry.attempts >= st.policy.max_attempts {
            let freed = st.finish_key(&entry);
            let reason = format!("{why}; max attempts ({}) reached", st.policy.max_attempts);
            drop(st);
            self.dead_letter_entry(entry, &reason);
            if freed {
                self.ready_notify.notify_one();
            }
            return true;
        }
        match delay {
            Some(d) => st.push_delayed(Instant::now() + d, entry, true),
            None => {
                st.push_front(entry);
                drop(st);
                self.ready_notify.notify_one();
            }
        }
        false
    }

    /// Returns messages fetched but never handed to the application: back to the front, in
    /// their order, without counting an attempt.
    pub fn requeue_unyielded(&self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut st = self.lock();
        for mut entry in entries.into_iter().rev() {
            entry.attempts = entry.attempts.saturating_sub(1);
            st.push_front(entry);
        }
        drop(st);
        self.ready_notify.notify_one();
    }

    /// Moves a delivered message to the dead-letter queue with `reason`.
    pub fn dead_letter(&self, entry: Entry, reason: &str) {
        let freed = self.lock().finish_key(&entry);
        self.dead_letter_entry(entry, reason);
        if freed {
            self.ready_notify.notify_one();
        }
    }

    fn dead_letter_entry(&self, entry: Entry, reason: &str) {
        let Some(dlq) = &self.dead_letters else {
            // A dead-letter queue never runs out of attempts, and the acknowledger refuses an
            // explicit dead-letter there, so nothing reaches this.
            return;
        };
        let Entry { msg, attempts } = entry.detached();
        let mut msg = msg.into_message();
        let headers = msg.headers_mut();
        headers.insert(HEADER_DEAD_LETTER_REASON.into(), reason.into());
        headers.insert(HEADER_ATTEMPT.into(), attempts.to_string());
        headers.insert(HEADER_ORIGINAL_TOPIC.into(), self.topic.to_string());
        dlq.publish([Published::Owned(msg)], None);
    }

    /// Fires due delays here and in the dead-letter queue, and expires consumers' overdue
    /// deliveries.
    pub fn tick(&self, now: Instant) {
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
        let consumers: Vec<_> = st.consumers.iter().filter_map(Weak::upgrade).collect();
        drop(st);
        if became_ready {
            self.ready_notify.notify_one();
        }
        for c in consumers {
            c.expire(now);
        }
        if let Some(dlq) = &self.dead_letters {
            dlq.tick(now);
        }
    }

    pub fn depth(&self) -> GroupDepth {
        let (ready, delayed, consumers) = {
            let st = self.lock();
            let consumers: Vec<_> = st.consumers.iter().filter_map(Weak::upgrade).collect();
            (
                st.ready_count + self.inbox.len(),
                st.delayed.len(),
                consumers,
            )
        };
        let in_flight: usize = consumers.iter().map(|c| c.in_flight_count()).sum();
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
        let mut n = st.ready_count + st.delayed.len();
        n += self.inbox.pop_into(usize::MAX, drop);
        let delayed = std::mem::take(&mut st.delayed);
        for Reverse(d) in delayed {
            if d.holds_key {
                // The purged message was holding its key; nothing else of it is in flight.
                if let Some(key) = d.entry.msg.key() {
                    if let Some(q) = st.keyed.get_mut(key) {
                        q.busy = false;
                    }
                }
            }
        }
        st.ready.clear();
        st.ready_count = 0;
        // A key stays only while a message of it is in flight.
        st.keyed.retain(|_, q| {
            q.items.clear();
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
                moved.push(entry.msg.into_message());
            }
            dlq.inbox
                .pop_into(usize::MAX, |msg| moved.push(msg.into_message()));
        }
        let n = moved.len() as u64;
        let restored = moved.into_iter().map(|mut msg| {
            let h = msg.headers_mut();
            h.remove(HEADER_DEAD_LETTER_REASON);
            h.remove(HEADER_ATTEMPT);
            h.remove(HEADER_ORIGINAL_TOPIC);
            Published::Owned(msg)
        });
        self.publish(restored, None);
        n
    }
}

/// Unmarks a waiting consumer, also when its future is dropped mid-wait.
pub(crate) struct IdleGuard<'a>(&'a AtomicUsize);

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The group's lock; releasing it publishes the takeable hint.
pub(crate) struct StateGuard<'a> {
    guard: MutexGuard<'a, GroupState>,
    hint: &'a AtomicUsize,
    queued: &'a AtomicUsize,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = GroupState;
    fn deref(&self) -> &GroupState {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut GroupState {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.hint.store(self.guard.ready.len(), Ordering::Release);
        let queued = self.guard.ready_count + self.guard.delayed.len();
        self.queued.store(queued, Ordering::Release);
    }
}

impl GroupState {
    fn key_arc(&self, key: &str) -> Arc<str> {
        match self.keyed.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        }
    }

    fn push_back(&mut self, entry: Entry) {
        self.ready_count += 1;
        match entry.msg.key() {
            None => self.ready.push_back(Slot::Unkeyed(entry)),
            Some(key) => {
                let key = self.key_arc(key);
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
                let key = self.key_arc(key);
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
    /// Returns whether that made a message takeable.
    fn finish_key(&mut self, entry: &Entry) -> bool {
        let Some(key) = entry.msg.key() else {
            return false;
        };
        let Some(q) = self.keyed.get_mut(key) else {
            return false;
        };
        q.busy = false;
        if q.items.is_empty() {
            self.keyed.remove(key);
            false
        } else {
            let key = self.key_arc(key);
            self.ready.push_back(Slot::Key(key));
            true
        }
    }
}
