//! A background batcher: callers submit single items keyed by queue URL or topic ARN; a task
//! owned by the broker groups them into batch requests of up to `max_items` entries (and
//! `max_bytes`), sent when full or when the oldest item has waited `linger`. Every item gets
//! its own result: a failed entry fails exactly its message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use spindle_core::{Error, Result};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Sends one batch for one key; returns one result per item, in order.
pub(crate) type FlushFn<T> =
    Arc<dyn Fn(Arc<str>, Vec<T>) -> BoxFuture<'static, Vec<Result<()>>> + Send + Sync>;

type Reply = oneshot::Sender<Result<()>>;

enum Cmd<T> {
    Item {
        key: Arc<str>,
        item: T,
        size: usize,
        reply: Option<Reply>,
    },
    Flush(oneshot::Sender<()>),
}

/// Limits of one batcher.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub linger: Duration,
    pub max_items: usize,
    pub max_bytes: usize,
    pub max_in_flight: usize,
}

pub(crate) struct Batcher<T> {
    name: &'static str,
    tx: Mutex<Option<mpsc::UnboundedSender<Cmd<T>>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

struct Pending<T> {
    items: Vec<(T, Option<Reply>)>,
    bytes: usize,
    since: Instant,
}

impl<T: Send + 'static> Batcher<T> {
    pub(crate) fn new(name: &'static str, limits: Limits, flush: FlushFn<T>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(name, limits, flush, rx));
        Batcher {
            name,
            tx: Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    fn send(&self, cmd: Cmd<T>) -> Result<()> {
        let guard = self.tx.lock().unwrap();
        match guard.as_ref() {
            Some(tx) => tx.send(cmd).map_err(|_| Error::Closed(self.name)),
            None => Err(Error::Closed(self.name)),
        }
    }

    /// Queues an item and waits for its own result.
    pub(crate) async fn submit(&self, key: Arc<str>, item: T, size: usize) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Item {
            key,
            item,
            size,
            reply: Some(reply),
        })?;
        rx.await.map_err(|_| Error::Closed(self.name))?
    }

    /// Queues an item without waiting; a failure is logged. Returns false if stopped.
    pub(crate) fn submit_detached(&self, key: Arc<str>, item: T, size: usize) -> bool {
        self.send(Cmd::Item {
            key,
            item,
            size,
            reply: None,
        })
        .is_ok()
    }

    /// Sends everything queued so far and waits for those requests to finish.
    pub(crate) async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.send(Cmd::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Flushes, then stops the task. Idempotent; later submissions fail with `Closed`.
    pub(crate) async fn stop(&self) {
        let tx = self.tx.lock().unwrap().take();
        drop(tx);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

async fn run<T: Send + 'static>(
    name: &'static str,
    limits: Limits,
    flush: FlushFn<T>,
    mut rx: mpsc::UnboundedReceiver<Cmd<T>>,
) {
    let semaphore = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let mut pending: HashMap<Arc<str>, Pending<T>> = HashMap::new();
    let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
    let dispatch = |key: Arc<str>, batch: Pending<T>, in_flight: &mut Vec<JoinHandle<()>>| {
        let semaphore = semaphore.clone();
        let flush = flush.clone();
        in_flight.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let (items, replies): (Vec<T>, Vec<Option<Reply>>) = batch.items.into_iter().unzip();
            let n = items.len();
            let mut results = flush(key, items).await;
            if results.len() != n {
                tracing::error!(batcher = name, "batch returned {} results for {n} items", results.len());
                results.resize_with(n, || {
                    Err(spindle_core::Error::backend(
                        crate::BACKEND,
                        "no result for this batch entry",
                        true,
                        None,
                    ))
                });
            }
            for (result, reply) in results.into_iter().zip(replies) {
                match reply {
                    Some(reply) => {
                        let _ = reply.send(result);
                    }
                    None => {
                        if let Err(e) = result {
                            tracing::warn!(batcher = name, error = %e, "background batch entry failed");
                        }
                    }
                }
            }
        }));
    };
    loop {
        let next_due = pending.values().map(|p| p.since + limits.linger).min();
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Item { key, item, size, reply }) => {
                    if let Some(p) = pending.get(&key) {
                        if p.bytes + size > limits.max_bytes {
                            let full = pending.remove(&key).expect("present");
                            dispatch(key.clone(), full, &mut in_flight);
                        }
                    }
                    let p = pending.entry(key.clone()).or_insert_with(|| Pending {
                        items: Vec::new(),
                        bytes: 0,
                        since: Instant::now(),
                    });
                    p.items.push((item, reply));
                    p.bytes += size;
                    if p.items.len() >= limits.max_items {
                        let full = pending.remove(&key).expect("present");
                        dispatch(key, full, &mut in_flight);
                    }
                }
                Some(Cmd::Flush(done)) => {
                    for (key, batch) in pending.drain() {
                        dispatch(key, batch, &mut in_flight);
                    }
                    let handles = std::mem::take(&mut in_flight);
                    tokio::spawn(async move {
                        for h in handles {
                            let _ = h.await;
                        }
                        let _ = done.send(());
                    });
                }
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                let now = Instant::now();
                let due: Vec<Arc<str>> = pending
                    .iter()
                    .filter(|(_, p)| p.since + limits.linger <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in due {
                    let batch = pending.remove(&key).expect("present");
                    dispatch(key, batch, &mut in_flight);
                }
            }
        }
        in_flight.retain(|h| !h.is_finished());
    }
    for (key, batch) in pending.drain() {
        dispatch(key, batch, &mut in_flight);
    }
    for h in in_flight {
        let _ = h.await;
    }
}
