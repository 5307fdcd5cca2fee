//! The one error type every backend maps its failures into.

use std::time::Duration;

/// A boxed error from a backend's SDK, kept as the `source` so SDK types stay out of the API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, spindle_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, whatever the backend.
///
/// Match on the variant to decide what to do; call [`Error::is_transient`] to decide whether a
/// retry may help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or URL is malformed, or names an option the backend does not know.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The URL scheme is not one of the enabled backends.
    #[error("unknown scheme `{scheme}`: enabled schemes are {}", enabled.join(", "))]
    UnknownScheme {
        /// The scheme that was asked for.
        scheme: String,
        /// The schemes this build can connect to.
        enabled: Vec<&'static str>,
    },

    /// The scheme is known, but its backend was not compiled in.
    #[error("scheme `{scheme}` needs the `{feature}` feature of the `spindle` crate")]
    FeatureDisabled {
        /// The scheme that was asked for.
        scheme: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },

    /// The broker could not be reached, or the connection broke.
    #[error("{backend}: connection failed: {message}")]
    Connection {
        /// Backend name, e.g. `rabbitmq`.
        backend: &'static str,
        /// What happened, with no credentials in it.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker refused the credentials or the access they grant.
    #[error("{backend}: authentication failed: {message}")]
    Authentication {
        /// Backend name.
        backend: &'static str,
        /// What happened, with no credentials in it.
        message: String,
    },

    /// A topic, group or queue does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was missing, e.g. `topic \"orders\"`.
        what: String,
    },

    /// A message was published to a topic no group receives: it would be dropped.
    #[error("unroutable: topic `{topic}` has no group to receive the message")]
    Unroutable {
        /// The topic.
        topic: String,
    },

    /// The message is larger than the backend accepts; nothing was sent.
    #[error("payload too large: {size} bytes, the limit is {max} bytes")]
    PayloadTooLarge {
        /// Size of the rejected message as the backend counts it.
        size: usize,
        /// The backend's limit.
        max: usize,
    },

    /// A delay longer than the backend can honour; it is never silently shortened.
    #[error("delay of {requested:?} exceeds the backend's maximum of {max:?}")]
    DelayTooLong {
        /// The delay asked for.
        requested: Duration,
        /// The longest delay the backend supports.
        max: Duration,
    },

    /// The backend cannot do this; its [`Capabilities`](crate::Capabilities) say so too.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The operation, e.g. `nack with delay`.
        operation: &'static str,
    },

    /// A queue is at its capacity; the message was not accepted. Retry once consumers catch up.
    #[error("{what} is full ({limit} messages waiting)")]
    Full {
        /// The queue, e.g. `group \"billing\" of topic \"orders\"`.
        what: String,
        /// Its capacity.
        limit: usize,
    },

    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The bound that was exceeded.
        after: Duration,
    },

    /// The publisher, subscriber or connection was closed.
    #[error("closed: {0}")]
    Closed(&'static str),

    /// The delivery is no longer held by this consumer (its ack deadline passed and it was
    /// redelivered, or the connection that carried it is gone). It will be delivered again.
    #[error("delivery is stale: {0}")]
    StaleDelivery(String),

    /// An argument is out of range (for example a zero prefetch).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The message could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[source] BoxError),

    /// Any other backend failure.
    #[error("{backend}: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
        /// Whether retrying may succeed.
        transient: bool,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Timeout { .. } | Error::Full { .. } => true,
            Error::Backend { transient, .. } => *transient,
            _ => false,
        }
    }

    /// Builds [`Error::Unsupported`].
    pub fn unsupported(backend: &'static str, operation: &'static str) -> Self {
        Error::Unsupported { backend, operation }
    }

    /// Builds [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// Builds [`Error::Backend`].
    pub fn backend(
        backend: &'static str,
        message: impl Into<String>,
        transient: bool,
        source: Option<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            transient,
            source,
        }
    }
}

/// Runs `fut` with a bound, turning an elapsed bound into [`Error::Timeout`].
pub async fn with_timeout<T>(
    operation: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}
