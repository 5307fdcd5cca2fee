//! Spindle's core: the broker-neutral vocabulary every backend speaks.
//!
//! - [`Message`]: payload, headers, key, id, content type.
//! - [`Publisher`], [`Subscriber`], [`Admin`], together [`Broker`]: object-safe traits.
//!   A publish returns [`Publishing`]; a backend that settles publishes on the spot implements
//!   [`PublishNow`] and allocates nothing per publish.
//! - [`Delivery`]: a received message, decided with `ack`, `nack`, `nack_after`,
//!   `dead_letter`, or extended with `extend`; dropped undecided, it is redelivered.
//! - [`Capabilities`]: what a backend can do; the rest is [`Error::Unsupported`].
//! - [`Config`]: a URL whose scheme picks the backend, with options and redacted credentials.
//!
//! This crate has no broker SDK in it. Applications use the `spindle` facade, which re-exports
//! everything here and connects by URL.

mod capabilities;
mod config;
mod delivery;
mod error;
mod message;
mod publishing;
mod subscription;
mod traits;

pub use capabilities::Capabilities;
pub use config::{is_secret_option, Config, OptionReader, ENV_OPTION_PREFIX, ENV_URL};
pub use delivery::{Acknowledger, Delivery};
pub use error::{with_timeout, BoxError, Error, Result};
pub use message::{
    new_message_id, Headers, Message, CONTENT_TYPE_JSON, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON,
    HEADER_ORIGINAL_TOPIC, RESERVED_HEADER_PREFIX,
};
pub use publishing::{PublishNow, Publishing};
pub use subscription::{Subscription, SubscriptionControl};
pub use traits::{
    Admin, Broker, DynBroker, GroupDepth, GroupPolicy, PublishOptions, Publisher, PublisherExt,
    SubscribeOptions, Subscriber,
};

/// Re-exported so adapters and users name the same versions.
pub use async_trait::async_trait;
pub use bytes::Bytes;
