//! What a backend can do, declared up front so callers and the contract suite can check.

use std::time::Duration;

/// Flags and limits one backend declares. Anything marked absent returns
/// [`Error::Unsupported`](crate::Error::Unsupported) when asked for; nothing is a silent no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Every group subscribed to a topic gets every message.
    pub fan_out: bool,
    /// Messages with the same key are delivered in publish order, one at a time per key.
    pub ordering_per_key: bool,
    /// `nack` with a delay.
    pub nack_delay: bool,
    /// Longest delay a nack may ask for, if bounded.
    pub max_nack_delay: Option<Duration>,
    /// The broker itself moves messages to a dead-letter queue (otherwise the adapter does).
    pub native_dead_letter: bool,
    /// Publishing with a delay.
    pub delayed_publish: bool,
    /// Longest publish delay, if bounded.
    pub max_publish_delay: Option<Duration>,
    /// `Delivery::extend` lengthens the ack deadline.
    pub extend: bool,
    /// Unacked deliveries come back after an ack deadline, not only when the consumer goes away.
    pub ack_deadline: bool,
    /// Largest payload accepted, in bytes, for a message without user headers.
    pub max_payload_bytes: usize,
    /// Most messages in one batch request to the broker.
    pub max_batch: usize,
    /// A group created after messages were published can read them (the backend keeps history).
    pub replay: bool,
    /// Publishing to a topic with no group is an error (rather than stored for later groups).
    pub rejects_unroutable: bool,
    /// Messages survive a broker restart.
    pub durable: bool,
    /// Depth per group is available.
    pub depth: bool,
    /// Purging a group is available.
    pub purge: bool,
    /// Dead-lettered messages can be moved back to their group.
    pub redrive: bool,
}

impl Capabilities {
    /// A starting point with everything off and conservative limits; backends switch on what
    /// they support. (The struct is `#[non_exhaustive]`, so adapters outside this crate start
    /// from here.)
    pub const fn none() -> Self {
        Capabilities {
            fan_out: false,
            ordering_per_key: false,
            nack_delay: false,
            max_nack_delay: None,
            native_dead_letter: false,
            delayed_publish: false,
            max_publish_delay: None,
            extend: false,
            ack_deadline: false,
            max_payload_bytes: 256 * 1024,
            max_batch: 1,
            replay: false,
            rejects_unroutable: false,
            durable: false,
            depth: false,
            purge: false,
            redrive: false,
        }
    }
}
