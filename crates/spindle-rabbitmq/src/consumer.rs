//! One subscription: a channel with `basic.qos`, a consumer, a pump task feeding the stream,
//! and a worker task that carries out decisions made from `Drop` (which cannot await).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use spindle_core::{
    async_trait, Acknowledger, Delivery, Error, Message, Result, Subscription, SubscriptionControl,
    HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_TOPIC,
};
use tokio::sync::{mpsc, watch};

use crate::{codec, Core, BACKEND};

static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// A delivery handed to the application and not yet decided.
pub(crate) struct Pending {
    generation: u64,
    tag: u64,
    message: Arc<Message>,
    attempt: u32,
}

enum Cmd {
    /// Dropped undecided: deliver again, counting an attempt.
    Release(Arc<ConsumerShared>, Pending),
    /// Fetched but never yielded: back to the queue without counting an attempt.
    Requeue(Arc<ConsumerShared>, Pending),
    /// Arrived past the group's max attempts (e.g. after a consumer crash).
    DeadLetter(Arc<ConsumerShared>, Pending, String),
}

/// What one subscription consumes.
pub(crate) struct Target {
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    /// The queue consumed: the group's queue or its dead-letter queue.
    pub(crate) queue: String,
    /// The group's dead-letter exchange.
    pub(crate) dlx: String,
    pub(crate) dead_letters: bool,
    pub(crate) max_attempts: u32,
    pub(crate) prefetch: u16,
}

pub(crate) struct ConsumerShared {
    core: Arc<Core>,
    pub(crate) target: Target,
    consumer_tag: String,
    channel: Mutex<Option<(u64, Channel)>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_token: AtomicU64,
    cmds: mpsc::UnboundedSender<Cmd>,
    closing: watch::Sender<bool>,
    done: watch::Sender<bool>,
    me: std::sync::Weak<ConsumerShared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a subscription: the first consumer is started here so that errors (a missing queue)
/// are returned to the caller.
pub(crate) async fn start(
    core: Arc<Core>,
    target: Target,
) -> Result<(Arc<ConsumerShared>, Subscription)> {
    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new_cyclic(|me| ConsumerShared {
        core: core.clone(),
        consumer_tag: format!(
            "spindle-{}-{}",
            std::process::id(),
            NEXT_TAG.fetch_add(1, Ordering::Relaxed)
        ),
        target,
        channel: Mutex::new(None),
        pending: Mutex::new(HashMap::new()),
        next_token: AtomicU64::new(1),
        cmds,
        closing: watch::channel(false).0,
        done: watch::channel(false).0,
        me: me.clone(),
    });
    let consumer = shared.consume(1).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(pump(shared.clone(), consumer, tx));
    tokio::spawn(worker(cmd_rx, core.shutdown_signal()));
    let rx = Arc::new(Mutex::new(rx));
    let stream_rx = rx.clone();
    let stream = futures::stream::poll_fn(move |cx| loop {
        let item = lock(&stream_rx).poll_recv(cx);
        match item {
            Poll::Ready(Some(Ok(incoming))) => {
                let closing = *incoming.shared.closing.borrow();
                if closing {
                    // Closing: not yielded, so it goes back (the guard requeues it).
                    drop(incoming);
                    continue;
                }
                return Poll::Ready(Some(Ok(incoming.into_delivery())));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
    })
    .boxed();
    let control = Control {
        shared: shared.clone(),
        unyielded: rx,
    };
    let subscription = Subscription::new(stream, control);
    Ok((shared, subscription))
}

type Unyielded = Arc<Mutex<mpsc::UnboundedReceiver<Result<Incoming>>>>;

/// A delivery between the pump and the stream. Dropped before being yielded, it goes back to
/// the queue without counting an attempt.
struct Incoming {
    shared: Arc<ConsumerShared>,
    token: u64,
    message: Arc<Message>,
    attempt: u32,
    armed: bool,
}

impl Incoming {
    fn into_delivery(mut self) -> Delivery {
        self.armed = false;
        Delivery::new(
            self.message.clone(),
            self.attempt,
            self.shared.clone() as Arc<dyn Acknowledger>,
            self.token,
        )
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.armed {
            if let Some(p) = self.shared.take(self.token) {
                let _ = self.shared.cmds.send(Cmd::Requeue(self.shared.clone(), p));
            }
        }
    }
}

struct Control {
    shared: Arc<ConsumerShared>,
    /// Deliveries the pump fetched that the stream has not yielded. Kept here, not in
    /// `ConsumerShared`, because each one holds that `Arc`.
    unyielded: Unyielded,
}

#[async_trait]
impl SubscriptionControl for Control {
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared.begin_close();
        let bound = shared.core.conn.operation_timeout() + Duration::from_secs(2);
        shared.wait_done(bound).await;
        // Return what was fetched but not yielded, now rather than when the stream is next
        // polled or dropped.
        let waiting: Vec<Incoming> = {
            let mut rx = lock(&self.unyielded);
            std::iter::from_fn(|| rx.try_recv().ok())
                .filter_map(Result::ok)
                .collect()
        };
        for mut incoming in waiting {
            incoming.armed = false;
            if let Some(p) = shared.take(incoming.token) {
                if let Err(e) = shared.requeue(&p).await {
                    tracing::warn!(error = %e, "rabbitmq: could not requeue an unyielded delivery; it returns when its channel closes");
                }
            }
        }
        Ok(())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.shared.begin_close();
    }
}

impl ConsumerShared {
    pub(crate) fn begin_close(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) async fn wait_done(&self, bound: Duration) {
        let mut done = self.done.subscribe();
        let _ = tokio::time::timeout(bound, done.wait_for(|d| *d)).await;
    }

    /// Deliveries this consumer holds on its current channel (fetched and not decided).
    pub(crate) fn in_flight(&self) -> u64 {
        let generation = lock(&self.channel).as_ref().map(|(g, _)| *g);
        lock(&self.pending)
            .values()
            .filter(|p| Some(p.generation) == generation)
            .count() as u64
    }

    fn take(&self, token: u64) -> Option<Pending> {
        lock(&self.pending).remove(&token)
    }

    async fn consume(&self, generation: u64) -> Result<lapin::Consumer> {
        let conn = &self.core.conn;
        let ch = conn.channel().await?;
        conn.op(
            "basic.qos",
            ch.basic_qos(self.target.prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let consumer = conn
            .op(
                "basic.consume",
                ch.basic_consume(
                    &self.target.queue,
                    &self.consumer_tag,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
            .map_err(|e| match e {
                Error::NotFound { .. } => Error::not_found(format!(
                    "queue `{}` of group `{}` on topic `{}`",
                    self.target.queue, self.target.group, self.target.topic
                )),
                e => e,
            })?;
        *lock(&self.channel) = Some((generation, ch));
        // Deliveries of older channels can no longer be acked: the broker requeued them.
        lock(&self.pending).retain(|_, p| p.generation == generation);
        Ok(consumer)
    }

    fn accept(
        self: &Arc<Self>,
        generation: u64,
        d: lapin::message::Delivery,
        tx: &mpsc::UnboundedSender<Result<Incoming>>,
    ) {
        let (message, mut attempt) = codec::decode(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            d.data,
        );
        if self.target.dead_letters {
            attempt = 1 + u32::from(d.redelivered);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            generation,
            tag: d.delivery_tag,
            message: message.clone(),
            attempt,
        };
        if !self.target.dead_letters && attempt > self.target.max_attempts {
            let reason = format!("max attempts ({}) reached", self.target.max_attempts);
            let _ = self
                .cmds
                .send(Cmd::DeadLetter(self.clone(), pending, reason));
            return;
        }
        lock(&self.pending).insert(token, pending);
        let incoming = Incoming {
            shared: self.clone(),
            token,
            message,
            attempt,
            armed: true,
        };
        // If the stream is gone the guard requeues it.
        let _ = tx.send(Ok(incoming));
    }

    /// The channel a pending delivery came on, if it is still the current one.
    fn channel_for(&self, p: &Pending) -> Result<Channel> {
        match &*lock(&self.channel) {
            Some((g, ch)) if *g == p.generation && ch.status().connected() => Ok(ch.clone()),
            _ => Err(Error::StaleDelivery(
                "the channel that carried it was closed; it will be delivered again".into(),
            )),
        }
    }

    async fn ack_pending(&self, p: &Pending) -> Result<()> {
        let ch = self.channel_for(p)?;
        self.core
            .conn
            .op("basic.ack", ch.basic_ack(p.tag, BasicAckOptions::default()))
            .await
            .map_err(|e| match e {
                Error::Connection { .. } => Error::StaleDelivery(e.to_string()),
                e => e,
            })
    }

    async fn requeue(&self, p: &Pending) -> Result<()> {
        let ch = self.channel_for(p)?;
        self.core
            .conn
            .op(
                "basic.nack",
                ch.basic_nack(
                    p.tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                ),
            )
            .await
    }

    /// Delivers the message again (after `delay`), one attempt higher, or dead-letters it
    /// once the group's max attempts are used up.
    async fn redeliver(&self, p: Pending, delay: Option<Duration>) -> Result<()> {
        let t = &self.target;
        if t.dead_letters && delay.is_none() {
            return self.requeue(&p).await;
        }
        if !t.dead_letters && p.attempt >= t.max_attempts {
            let reason = format!("max attempts ({}) reached", t.max_attempts);
            return self.dead_letter_pending(p, &reason).await;
        }
        let next = if t.dead_letters { 1 } else { p.attempt + 1 };
        let routing_key = match delay {
            Some(d) if !d.is_zero() => self.core.group_wait_queue(&t.queue, d).await?,
            _ => t.queue.clone(),
        };
        let (props, _) = codec::encode(&p.message, next, &[]);
        self.core
            .publish_confirmed("", &routing_key, p.message.payload(), props, &t.topic)
            .await?;
        self.finish(&p).await;
        Ok(())
    }

    async fn dead_letter_pending(&self, p: Pending, reason: &str) -> Result<()> {
        let t = &self.target;
        let extra = [
            (HEADER_DEAD_LETTER_REASON, reason.to_string()),
            (HEADER_ATTEMPT, p.attempt.to_string()),
            (HEADER_ORIGINAL_TOPIC, t.topic.to_string()),
        ];
        let (props, _) = codec::encode(&p.message, 1, &extra);
        self.core
            .publish_confirmed(&t.dlx, "", p.message.payload(), props, &t.topic)
            .await?;
        self.finish(&p).await;
        Ok(())
    }

    /// Acks the original once its copy is confirmed. If that fails the original comes back
    /// too: a duplicate, never a loss.
    async fn finish(&self, p: &Pending) {
        if let Err(e) = self.ack_pending(p).await {
            tracing::warn!(error = %e, "rabbitmq: the original of a moved message was not acked; it may be delivered twice");
        }
    }

    /// Stops consuming and returns what was fetched but not yielded.
    async fn cancel_and_return(&self, consumer: &mut lapin::Consumer) {
        let ch = lock(&self.channel).as_ref().map(|(_, ch)| ch.clone());
        let Some(ch) = ch else { return };
        let conn = &self.core.conn;
        if conn
            .op(
                "basic.cancel",
                ch.basic_cancel(&self.consumer_tag, BasicCancelOptions::default()),
            )
            .await
            .is_err()
        {
            // The channel is gone: the broker requeued everything it carried.
            return;
        }
        // After cancel-ok, the consumer yields what it had buffered, then ends.
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        {
            let _ = conn
                .op(
                    "basic.nack",
                    ch.basic_nack(
                        d.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    ),
                )
                .await;
        }
    }
}

#[async_trait]
impl Acknowledger for ConsumerShared {
    fn topic(&self) -> &str {
        &self.target.topic
    }

    fn group(&self) -> &str {
        &self.target.group
    }

    async fn ack(&self, token: u64) -> Result<()> {
        let p = self.take(token).ok_or_else(|| {
            Error::StaleDelivery("no longer held (its channel was replaced)".into())
        })?;
        self.ack_pending(&p).await
    }

    async fn nack(&self, token: u64, delay: Option<Duration>) -> Result<()> {
        let p = self.take(token).ok_or_else(|| {
            Error::StaleDelivery("no longer held (its channel was replaced)".into())
        })?;
        if let Some(d) = delay {
            let max = self.core.settings.max_delay;
            if d > max {
                // Not lost: it is delivered again right away.
                let _ = self.cmds.send(Cmd::Release(self.core_arc_self()?, p));
                return Err(Error::DelayTooLong { requested: d, max });
            }
        }
        self.redeliver(p, delay).await
    }

    async fn dead_letter(&self, token: u64, reason: &str) -> Result<()> {
        let p = self.take(token).ok_or_else(|| {
            Error::StaleDelivery("no longer held (its channel was replaced)".into())
        })?;
        self.dead_letter_pending(p, reason).await
    }

    async fn extend(&self, _token: u64, _by: Duration) -> Result<()> {
        Err(Error::unsupported(
            BACKEND,
            "extending an ack deadline (RabbitMQ has none by default)",
        ))
    }

    fn release(&self, token: u64) {
        if let Some(p) = self.take(token) {
            if let Ok(me) = self.core_arc_self() {
                let _ = self.cmds.send(Cmd::Release(me, p));
            }
        }
    }
}

impl ConsumerShared {
    /// An `Arc` of this consumer (the acknowledger is called through `&self`).
    fn core_arc_self(&self) -> Result<Arc<ConsumerShared>> {
        self.me
            .upgrade()
            .ok_or(Error::Closed("the subscription is gone"))
    }
}

async fn pump(
    shared: Arc<ConsumerShared>,
    first: lapin::Consumer,
    tx: mpsc::UnboundedSender<Result<Incoming>>,
) {
    let mut closing = shared.closing.subscribe();
    let mut consumer = Some(first);
    let mut generation = 1u64;
    let mut backoff = Duration::from_millis(100);
    'outer: loop {
        let mut c = match consumer.take() {
            Some(c) => c,
            None => {
                generation += 1;
                match shared.consume(generation).await {
                    Ok(c) => {
                        tracing::info!(queue = %shared.target.queue, "rabbitmq: consumer resumed");
                        backoff = Duration::from_millis(100);
                        c
                    }
                    Err(e @ Error::NotFound { .. }) => {
                        let _ = tx.send(Err(e));
                        break 'outer;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, queue = %shared.target.queue, "rabbitmq: consumer cannot resume yet");
                        tokio::select! {
                            _ = closing.wait_for(|c| *c) => break 'outer,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        loop {
            let item = tokio::select! {
                biased;
                r = closing.wait_for(|c| *c) => {
                    drop(r);
                    None
                }
                item = c.next() => Some(item),
            };
            match item {
                None => {
                    shared.cancel_and_return(&mut c).await;
                    break 'outer;
                }
                Some(Some(Ok(d))) => shared.accept(generation, d, &tx),
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, queue = %shared.target.queue, "rabbitmq: consumer lost its channel; resuming");
                    break;
                }
                Some(None) => {
                    tracing::warn!(queue = %shared.target.queue, "rabbitmq: consumer cancelled by the broker; resuming");
                    break;
                }
            }
        }
        let closed = *closing.borrow();
        if closed {
            break;
        }
        tokio::select! {
            _ = closing.wait_for(|c| *c) => break 'outer,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
    drop(tx);
    shared.done.send_replace(true);
}

async fn worker(mut rx: mpsc::UnboundedReceiver<Cmd>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let cmd = tokio::select! {
            cmd = rx.recv() => match cmd { Some(c) => c, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let result = match cmd {
            Cmd::Release(s, p) => s.redeliver(p, None).await,
            Cmd::Requeue(s, p) => s.requeue(&p).await,
            Cmd::DeadLetter(s, p, reason) => s.dead_letter_pending(p, &reason).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "rabbitmq: could not return a delivery; the broker will redeliver it when its channel closes");
        }
    }
}
