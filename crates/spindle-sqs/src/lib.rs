//! Spindle's Amazon SQS backend, with SNS fan-out.
//!
//! Connect with a URL such as
//! `sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566&mode=fanout`. Credentials come from
//! the standard AWS chain (environment, profile, web identity, instance metadata), or from
//! the options `access_key_id` / `secret_access_key` / `session_token` (the secret ones are
//! redacted from `Debug` output and errors).
//!
//! # Modes and topology
//!
//! | | `mode=queue` (default) | `mode=fanout` |
//! |---|---|---|
//! | topic | one SQS queue named after the topic | one SNS topic named after the topic |
//! | group | the one group consuming that queue (recorded as queue tag `spindle-group`) | an SQS queue `<topic>__<group>` subscribed to the topic with `RawMessageDelivery` |
//! | dead-letter queue | `<topic>__dlq` | `<topic>__<group>__dlq` |
//! | second group on a topic | `subscribe` returns `Unsupported` (`ensure_group` accepts and ignores it) | every group gets every message |
//! | publish with no group | stored in the queue for the group that comes later | `Unroutable` |
//!
//! Queue names longer than SQS's 80 characters are shortened with a hash of the full name.
//! Topics whose name ends in `.fifo` are FIFO queues / FIFO SNS topics: the message key is the
//! `MessageGroupId` (default `spindle`) and the message id the `MessageDeduplicationId`.
//!
//! # What each operation does
//!
//! - publish: `SendMessageBatch` (queue mode) or `PublishBatch` (fan-out); concurrent single
//!   publishes are coalesced by a background batcher (up to 10 entries, `publish_linger_ms`,
//!   default 5 ms). Every `Failed` entry becomes the error of exactly that message.
//! - receive: `ReceiveMessage` of up to 10, long polling `wait_time_secs` (default 1 s, so a
//!   close is prompt); the visibility timeout is the subscription's `ack_timeout` rounded up
//!   to whole seconds. Never more than `prefetch` unacked deliveries per subscription.
//! - ack: `DeleteMessageBatch` (batched, `ack_linger_ms`, default 5 ms, at most 100 ms); `ack`
//!   returns that entry's result. An ack whose receipt handle expired is `StaleDelivery`.
//! - nack: `ChangeMessageVisibility` to 0, or to the delay (whole seconds rounded up, at most
//!   12 h). A dropped delivery is made visible again the same way, in the background.
//! - extend: `ChangeMessageVisibility` to `by` (rounded up).
//! - heartbeat (option `heartbeat_max_secs`; absent or 0 is off, at most 43,200): for long
//!   handlers, every third of the subscription's visibility timeout (its `ack_timeout`) the
//!   subscription extends each delivery it holds to one visibility timeout from then
//!   (`ChangeMessageVisibilityBatch`), until `heartbeat_max_secs` after its receipt; then the
//!   delivery is left to come back, so a stuck handler cannot hold a message for ever (a
//!   maximum below the visibility timeout has no effect). It never shortens a longer
//!   `extend` or a nack's delay. It stops when the subscription is closed or dropped, or the
//!   broker shuts down: a delivery still being handled then comes back after its visibility
//!   timeout.
//! - dead-letter: a redrive policy with `maxReceiveCount = max_attempts` sends a message to
//!   the dead-letter queue on its next receive after the last attempt; `dead_letter(reason)`
//!   sends a copy with the reason headers to the dead-letter queue, then deletes the
//!   original. Deliveries from `subscribe_dead_letters` always carry the reserved headers
//!   (reason, attempt, original topic); for messages moved by SQS itself the reason is
//!   `max attempts (N) exceeded`.
//! - redrive: receive from the dead-letter queue, send to the group queue, delete.
//! - depth: `ApproximateNumberOfMessages`, `...NotVisible`, `...Delayed` of the group queue,
//!   and the dead-letter queue's total. purge: `PurgeQueue` (returns the approximate count
//!   just before).
//!
//! # Capabilities and limits
//!
//! | capability | queue mode | fan-out mode |
//! |---|---|---|
//! | fan_out | no | yes |
//! | ordering_per_key | no (standard queues) | no |
//! | nack_delay / max | yes / 12 h | yes / 12 h |
//! | native_dead_letter | yes | yes |
//! | delayed_publish / max | yes / 15 min (not on FIFO queues) | no (SNS has no per-message delay) |
//! | extend, ack_deadline | yes | yes |
//! | max_payload_bytes | 785,664 | 195,840 |
//! | max_batch | 10 | 10 |
//! | replay | yes (the queue keeps messages for its group) | no |
//! | rejects_unroutable | no | yes |
//! | durable | no (not provable against the moto emulator; SQS itself is) | no |
//! | depth, purge, redrive | yes | yes |
//!
//! Sizes are checked in bytes before sending, attributes included: an SQS message is at most
//! 1 MiB, an SNS message 256 KiB. Binary (and empty) payloads travel base64-encoded, so the
//! declared `max_payload_bytes` is what fits after encoding, with 1 KiB set aside for the
//! adapter's own attributes. Headers map to message attributes; past SQS's 10 attributes (or
//! when a name or value is not a valid attribute), they are packed as JSON into one attribute.
//!
//! Every call is bounded: `timeout_ms` (default 10 s) per operation including retries,
//! `connect_timeout_ms` (default 3 s). [`connect`] probes the endpoint and fails with a typed
//! error when it cannot be reached.
//!
//! Options: `mode`, `region`, `endpoint`, `access_key_id`, `secret_access_key`,
//! `session_token`, `timeout_ms`, `connect_timeout_ms`, `wait_time_secs`,
//! `publish_linger_ms`, `ack_linger_ms`, `heartbeat_max_secs`. Unknown options are rejected.

#![warn(missing_docs)]

mod batch;
mod broker;
mod codec;
mod consumer;
mod error;
mod settings;

pub use broker::SqsBroker;
pub use settings::Mode;

/// The URL schemes this backend serves.
pub const SCHEMES: &[&str] = &["sqs"];

/// The backend's name, as errors and [`spindle_core::Broker::name`] report it.
pub const BACKEND: &str = "sqs";

/// Connects to SQS (and SNS in fan-out mode) as `config` says, probing the endpoint.
pub async fn connect(config: &spindle_core::Config) -> spindle_core::Result<SqsBroker> {
    SqsBroker::connect(config).await
}
