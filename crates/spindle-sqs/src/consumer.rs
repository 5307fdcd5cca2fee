//! One subscription: a receive loop bounded by `prefetch`, and the acknowledger that maps
//! delivery tokens to receipt handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use spindle_core::{
    async_trait, Acknowledger, Delivery, Error, Message, Result, SubscribeOptions, Subscription,
    SubscriptionControl, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_TOPIC,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::broker::{ceil_secs, Inner, MAX_VISIBILITY};
use crate::codec;
use crate::error::map_sdk;
use crate::BACKEND;

/// Decodes a received SQS message.
pub(crate) fn decode_sqs(m: &aws_sdk_sqs::types::Message) -> Message {
    let attrs: HashMap<String, String> = m
        .message_attributes()
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    codec::decode(m.body().unwrap_or_default(), m.message_id(), attrs)
}

struct Held {
    receipt: String,
    message: Arc<Message>,
    attempt: u32,
    received: Instant,
    /// Until when SQS keeps it invisible, as far as this subscription has asked.
    invisible_until: Instant,
    _permit: OwnedSemaphorePermit,
}

/// The acknowledger of one subscription.
struct Acker {
    inner: Arc<Inner>,
    queue_url: Arc<str>,
    /// The group's dead-letter queue (absent when consuming a dead-letter queue).
    dlq_url: Option<Arc<str>>,
    /// The group's max attempts: a nack of the last attempt dead-letters at once, rather than
    /// waiting for a receive that SQS's redrive policy needs before it moves the message.
    max_attempts: Option<u32>,
    topic: Arc<str>,
    group: Arc<str>,
    fifo: bool,
    held: Mutex<HashMap<u64, Held>>,
    /// Held by the heartbeat while its extensions are sent, and by `extend` and `nack` around
    /// theirs: the batcher does not keep order, and a stale extension must not cut a longer
    /// `extend` or a nack's delay short. (`release` does not wait for it: at worst a released
    /// message comes back one visibility timeout later.)
    visibility_gate: tokio::sync::Mutex<()>,
}

impl Acker {
    fn take(&self, token: u64) -> Result<Held> {
        self.held.lock().unwrap().remove(&token).ok_or_else(|| {
            Error::StaleDelivery(
                "the delivery was already settled or its subscription reset".into(),
            )
        })
    }

    /// Sends a copy with the dead-letter headers to the dead-letter queue, then deletes the
    /// original; on failure the original becomes visible again.
    async fn send_dead(&self, held: Held, dlq_url: Arc<str>, reason: &str) -> Result<()> {
        let mut copy = (*held.message).clone();
        let h = copy.headers_mut();
        h.insert(HEADER_DEAD_LETTER_REASON.into(), reason.to_string());
        h.insert(HEADER_ATTEMPT.into(), held.attempt.to_string());
        h.insert(HEADER_ORIGINAL_TOPIC.into(), self.topic.to_string());
        if let Err(e) = self.inner.send_to_queue(dlq_url, &copy, self.fifo).await {
            self.make_visible(held.receipt);
            return Err(e);
        }
        self.inner
            .deletes
            .submit(self.queue_url.clone(), held.receipt, 0)
            .await
    }

    fn make_visible(&self, receipt: String) {
        if !self
            .inner
            .visibility
            .submit_detached(self.queue_url.clone(), (receipt, 0), 0)
        {
            tracing::debug!(
                "broker shut down: a released delivery returns after its visibility timeout"
            );
        }
    }
}

#[async_trait]
impl Acknowledger for Acker {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn group(&self) -> &str {
        &self.group
    }

    async fn ack(&self, token: u64) -> Result<()> {
        let held = self.take(token)?;
        self.inner
            .deletes
            .submit(self.queue_url.clone(), held.receipt, 0)
            .await
    }

    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()> {
        let _gate = self.visibility_gate.lock().await;
        let held = self.take(token)?;
        if let (Some(max), Some(dlq_url)) = (self.max_attempts, self.dlq_url.clone()) {
            if held.attempt >= max {
                let reason = format!("nacked; max attempts ({max}) reached");
                return self.send_dead(held, dlq_url, &reason).await;
            }
        }
        let secs = match delay {
            Some(d) if d > MAX_VISIBILITY => {
                self.make_visible(held.receipt);
                return Err(Error::DelayTooLong {
                    requested: d,
                    max: MAX_VISIBILITY,
                });
            }
            Some(d) => ceil_secs(d),
            None => 0,
        };
        self.inner
            .visibility
            .submit(self.queue_url.clone(), (held.receipt, secs), 0)
            .await
    }

    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()> {
        let Some(dlq_url) = self.dlq_url.clone() else {
            let held = self.take(token)?;
            self.make_visible(held.receipt);
            return Err(Error::unsupported(
                BACKEND,
                "dead-lettering a message read from a dead-letter queue",
            ));
        };
        let held = self.take(token)?;
        self.send_dead(held, dlq_url, reason).await
    }

    async fn extend(&self, token: u64, by: Duration) -> Result<()> {
        if by > MAX_VISIBILITY {
            return Err(Error::DelayTooLong {
                requested: by,
                max: MAX_VISIBILITY,
            });
        }
        let _gate = self.visibility_gate.lock().await;
        let asked_at = Instant::now();
        let receipt = match self.held.lock().unwrap().get(&token) {
            Some(h) => h.receipt.clone(),
            None => {
                return Err(Error::StaleDelivery(
                    "the delivery was already settled".into(),
                ))
            }
        };
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&*self.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(ceil_secs(by))
            .send()
            .await
            .map_err(|e| {
                map_sdk(
                    "ChangeMessageVisibility",
                    &format!("queue {}", self.queue_url),
                    e,
                )
            })?;
        // Still under the gate, so the heartbeat's next round sees it.
        if let Some(h) = self.held.lock().unwrap().get_mut(&token) {
            h.invisible_until = asked_at + by;
        }
        Ok(())
    }

    fn release(&self, token: u64) {
        if let Ok(held) = self.take(token) {
            self.make_visible(held.receipt);
        }
    }
}

/// Shared state of one subscription.
pub(crate) struct SubInner {
    closed: watch::Sender<bool>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Result<Delivery>>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    heartbeat: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SubInner {
    /// Stops receiving, waits for the receive loop, and returns fetched-but-not-yielded
    /// messages to the queue.
    pub(crate) async fn close(&self) {
        self.closed.send_replace(true);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        if let Some(task) = self.heartbeat.lock().await.take() {
            let _ = task.await;
        }
        let rx = self.rx.lock().unwrap().take();
        drop(rx); // buffered deliveries are released as they drop
    }
}

struct Control(Arc<SubInner>);

#[async_trait]
impl SubscriptionControl for Control {
    async fn close(&self) -> Result<()> {
        self.0.close().await;
        Ok(())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.0.closed.send_replace(true);
    }
}

/// Starts a subscription on `queue_url`. `dlq` is where `dead_letter` sends messages and the
/// group's max attempts; `dead_letters` is `Some(max_attempts)` when the queue is itself a
/// dead-letter queue.
pub(crate) fn start(
    inner: Arc<Inner>,
    topic: &str,
    group: &str,
    queue_url: Arc<str>,
    dlq: Option<(Arc<str>, u32)>,
    dead_letters: Option<u32>,
    options: &SubscribeOptions,
) -> Subscription {
    let fifo = topic.ends_with(".fifo");
    let acker = Arc::new(Acker {
        inner: inner.clone(),
        queue_url: queue_url.clone(),
        max_attempts: dlq.as_ref().map(|(_, max)| *max),
        dlq_url: dlq.map(|(url, _)| url),
        topic: topic.into(),
        group: group.into(),
        fifo,
        held: Mutex::new(HashMap::new()),
        visibility_gate: tokio::sync::Mutex::new(()),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let (closed, closed_rx) = watch::channel(false);
    let visibility = ceil_secs(options.ack_timeout).max(1);
    let heartbeat = inner
        .settings
        .heartbeat_max
        .map(|max| tokio::spawn(heartbeat(acker.clone(), visibility, max, closed_rx.clone())));
    let loop_state = ReceiveLoop {
        inner: inner.clone(),
        acker,
        queue_url,
        topic: topic.into(),
        group: group.into(),
        dead_letters,
        prefetch: Arc::new(Semaphore::new(options.prefetch)),
        prefetch_total: options.prefetch,
        visibility,
        next_token: AtomicU64::new(1),
    };
    let task = tokio::spawn(loop_state.run(tx, closed_rx));
    let sub = Arc::new(SubInner {
        closed,
        rx: Mutex::new(Some(rx)),
        task: tokio::sync::Mutex::new(Some(task)),
        heartbeat: tokio::sync::Mutex::new(heartbeat),
    });
    inner.register(&sub);
    let state = sub.clone();
    let stream = futures::stream::poll_fn(move |cx| {
        if *state.closed.borrow() {
            return std::task::Poll::Ready(None);
        }
        let mut guard = state.rx.lock().unwrap();
        match guard.as_mut() {
            None => std::task::Poll::Ready(None),
            Some(rx) => rx.poll_recv(cx),
        }
    });
    Subscription::new(Box::pin(stream), Control(sub))
}

/// Every third of a visibility timeout, extends the visibility of each delivery this
/// subscription holds (fetched or being handled) to one visibility timeout from now, until
/// `max` after its receipt; after that it is left to come back. Stops when the subscription
/// closes or the broker shuts down.
async fn heartbeat(
    acker: Arc<Acker>,
    visibility_secs: i32,
    max: Duration,
    mut closed: watch::Receiver<bool>,
) {
    let visibility = Duration::from_secs(visibility_secs as u64);
    // A third: one failed or late round still leaves another before the deadline.
    let mut ticks = tokio::time::interval(visibility / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = ticks.tick() => {},
            _ = closed.wait_for(|c| *c) => return,
        }
        let _gate = acker.visibility_gate.lock().await;
        let now = Instant::now();
        let due: Vec<(u64, String, i32)> = acker
            .held
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(token, h)| {
                let left = max.checked_sub(now.duration_since(h.received))?;
                // Whole seconds, rounded down on the last step so as not to pass `max`
                // (SQS refuses to pass 12 hours from the receipt).
                let secs = if left >= visibility {
                    visibility_secs
                } else {
                    left.as_secs() as i32
                };
                // Never shortens an `extend` that reaches further.
                (secs > 0 && h.invisible_until < now + Duration::from_secs(secs as u64))
                    .then(|| (*token, h.receipt.clone(), secs))
            })
            .collect();
        let sent = due.iter().map(|(_, receipt, secs)| {
            acker
                .inner
                .visibility
                .submit(acker.queue_url.clone(), (receipt.clone(), *secs), 0)
        });
        let results = futures::future::join_all(sent).await;
        let mut held = acker.held.lock().unwrap();
        for ((token, _, secs), result) in due.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    if let Some(h) = held.get_mut(&token) {
                        let until = now + Duration::from_secs(secs as u64);
                        h.invisible_until = h.invisible_until.max(until);
                    }
                }
                // Settled meanwhile (SQS refuses a change to a deleted message), or a failure
                // the next round retries.
                Err(Error::Closed(_)) => return, // the broker shut down
                Err(e) => tracing::debug!(error = %e, "heartbeat extension not applied"),
            }
        }
    }
}

/// How long a receive waits for more prefetch room before asking for fewer than 10.
const FILL_WAIT: Duration = Duration::from_millis(10);

struct ReceiveLoop {
    inner: Arc<Inner>,
    acker: Arc<Acker>,
    queue_url: Arc<str>,
    topic: Arc<str>,
    group: Arc<str>,
    dead_letters: Option<u32>,
    prefetch: Arc<Semaphore>,
    prefetch_total: usize,
    visibility: i32,
    next_token: AtomicU64,
}

impl ReceiveLoop {
    async fn run(
        self,
        tx: mpsc::UnboundedSender<Result<Delivery>>,
        mut closed: watch::Receiver<bool>,
    ) {
        let wait = self.inner.settings.wait_time_secs;
        let mut backoff = Duration::from_millis(100);
        loop {
            if *closed.borrow() {
                return;
            }
            let first = tokio::select! {
                p = self.prefetch.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = closed.wait_for(|c| *c) => return,
            };
            // Fill the request up to 10 (or the whole prefetch): wait a moment for acks in
            // flight to free more room, so receives stay full under load.
            let want = self.prefetch_total.min(10);
            let fill_until = tokio::time::Instant::now() + FILL_WAIT;
            let mut permits = vec![first];
            while permits.len() < want {
                match self.prefetch.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => {
                        match tokio::time::timeout_at(
                            fill_until,
                            self.prefetch.clone().acquire_owned(),
                        )
                        .await
                        {
                            Ok(Ok(p)) => permits.push(p),
                            _ => break,
                        }
                    }
                }
            }
            // Before the call: SQS counts its 12-hour limit from its own receipt.
            let asked_at = Instant::now();
            let result = self
                .inner
                .sqs
                .receive_message()
                .queue_url(&*self.queue_url)
                .max_number_of_messages(permits.len() as i32)
                .wait_time_seconds(wait)
                .visibility_timeout(self.visibility)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_attribute_names("All")
                .send()
                .await;
            let out = match result {
                Ok(out) => {
                    backoff = Duration::from_millis(100);
                    out
                }
                Err(e) => {
                    let err = map_sdk(
                        "ReceiveMessage",
                        &format!("group `{}` of topic `{}`", self.group, self.topic),
                        e,
                    );
                    if *closed.borrow() {
                        return;
                    }
                    if matches!(err, Error::NotFound { .. } | Error::Authentication { .. }) {
                        tracing::error!(error = %err, "subscription stops");
                        let _ = tx.send(Err(err));
                        return;
                    }
                    tracing::warn!(error = %err, "receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = closed.wait_for(|c| *c) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            for m in out.messages() {
                let Some(receipt) = m.receipt_handle() else {
                    continue;
                };
                let Some(permit) = permits.pop() else {
                    // More than asked for: give it back.
                    self.acker.make_visible(receipt.to_string());
                    continue;
                };
                let count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse::<u32>().ok())
                    .unwrap_or(1)
                    .max(1);
                let mut message = decode_sqs(m);
                if let Some(max_attempts) = self.dead_letters {
                    let h = message.headers_mut();
                    h.entry(HEADER_DEAD_LETTER_REASON.into())
                        .or_insert_with(|| format!("max attempts ({max_attempts}) exceeded"));
                    h.entry(HEADER_ATTEMPT.into())
                        .or_insert_with(|| max_attempts.to_string());
                    h.entry(HEADER_ORIGINAL_TOPIC.into())
                        .or_insert_with(|| self.topic.to_string());
                }
                let message = codec::shared(message);
                let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                self.acker.held.lock().unwrap().insert(
                    token,
                    Held {
                        receipt: receipt.to_string(),
                        message: message.clone(),
                        attempt: count,
                        received: asked_at,
                        invisible_until: asked_at + Duration::from_secs(self.visibility as u64),
                        _permit: permit,
                    },
                );
                let delivery = Delivery::new(message, count, self.acker.clone(), token);
                // If the stream is gone the delivery drops here and is released.
                let _ = tx.send(Ok(delivery));
            }
        }
    }
}
