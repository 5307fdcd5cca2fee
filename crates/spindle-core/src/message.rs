//! Messages: payload, headers, key, id and content type.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// Message headers: string keys to string values, ordered so output is stable.
pub type Headers = BTreeMap<String, String>;

/// The prefix of header names Spindle reserves for its own metadata (attempt count, delay,
/// dead-letter reason). Adapters carry these through the broker so they survive restarts.
pub const RESERVED_HEADER_PREFIX: &str = "spindle-";

/// Reserved header: why a message was dead-lettered.
pub const HEADER_DEAD_LETTER_REASON: &str = "spindle-dead-letter-reason";
/// Reserved header: the attempt on which a message was dead-lettered.
pub const HEADER_ATTEMPT: &str = "spindle-attempt";
/// Reserved header: the topic a dead-lettered message came from.
pub const HEADER_ORIGINAL_TOPIC: &str = "spindle-original-topic";

/// Content type of messages built with [`Message::json`].
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// A message as published and as delivered.
///
/// Cloning is cheap: a generated id is stored inline, a given one is shared, and the payload
/// is reference-counted.
///
/// ```
/// use spindle_core::Message;
/// let msg = Message::new("hello").with_header("trace", "abc").with_key("order-7");
/// assert_eq!(&msg.payload()[..], b"hello");
/// assert_eq!(msg.header("trace"), Some("abc"));
/// assert!(!msg.id().is_empty());
/// ```
#[derive(Clone)]
pub struct Message {
    id: MessageId,
    payload: Bytes,
    /// Headers, key and content type, boxed only when one is set: a plain message stays small
    /// (it is moved through queues and copied between cores).
    extras: Option<Box<Extras>>,
}

#[derive(Clone, Default, PartialEq, Eq)]
struct Extras {
    headers: Headers,
    key: Option<String>,
    content_type: Option<Cow<'static, str>>,
}

/// Headers of a message that has none.
static NO_HEADERS: Headers = Headers::new();

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.payload == other.payload
            && self.headers() == other.headers()
            && self.key() == other.key()
            && self.content_type() == other.content_type()
    }
}

impl Eq for Message {}

impl Message {
    /// A message with this payload and a fresh, time-ordered id (UUIDv7).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::generate(),
            payload: payload.into(),
            extras: None,
        }
    }

    /// A message whose payload is `value` encoded as JSON, with content type `application/json`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let payload = serde_json::to_vec(value).map_err(|e| Error::Codec(Box::new(e)))?;
        let mut msg = Message::new(payload);
        // Borrowed: the common content type costs no allocation.
        msg.extras_mut().content_type = Some(Cow::Borrowed(CONTENT_TYPE_JSON));
        Ok(msg)
    }

    /// Decodes the payload as JSON.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Codec(Box::new(e)))
    }

    /// Replaces the id. Use a stable business id to make deduplication possible downstream.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = MessageId::Given(id.into().into());
        self
    }

    /// Adds or replaces one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers_mut().insert(name.into(), value.into());
        self
    }

    /// Replaces all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        *self.headers_mut() = headers;
        self
    }

    /// Sets the ordering key: messages with the same key are delivered in order where the
    /// backend orders (see [`Capabilities::ordering_per_key`](crate::Capabilities)).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.extras_mut().key = Some(key.into());
        self
    }

    /// Sets the content type, e.g. `application/json`.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.extras_mut().content_type = Some(Cow::Owned(content_type.into()));
        self
    }

    /// The message id: generated (UUIDv7) unless set with [`Message::with_id`].
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload bytes, to replace or re-point them (a backend may move a payload into its
    /// own buffer; middleware may compress it).
    pub fn payload_mut(&mut self) -> &mut Bytes {
        &mut self.payload
    }

    /// All headers.
    pub fn headers(&self) -> &Headers {
        self.extras.as_ref().map_or(&NO_HEADERS, |e| &e.headers)
    }

    /// Mutable access to the headers (adapters strip or add reserved headers with it).
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.extras_mut().headers
    }

    fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name).map(String::as_str)
    }

    /// The ordering key, if any.
    pub fn key(&self) -> Option<&str> {
        self.extras.as_ref()?.key.as_deref()
    }

    /// The content type, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.extras.as_ref()?.content_type.as_deref()
    }

    /// Size as most backends count it: payload plus header names and values.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
            + self
                .headers()
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

impl std::fmt::Debug for Message {
    // The payload may be large or sensitive: show its length, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id.as_str())
            .field("payload_len", &self.payload.len())
            .field("headers", self.headers())
            .field("key", &self.key())
            .field("content_type", &self.content_type())
            .finish()
    }
}

/// A new message id: a UUIDv7, so ids sort by creation time.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

thread_local! {
    /// (millisecond, random base, counter) of this thread's last UUIDv7.
    static V7_STATE: std::cell::Cell<(u64, u128, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

/// A UUIDv7 from a per-thread state: random bits are drawn once per millisecond and a counter
/// added for the messages within it, so ids stay unique and ordered per thread without the
/// shared context and random draw `Uuid::now_v7` pays on every call (a third of a publish).
fn fast_v7() -> uuid::Uuid {
    let millis = unix_millis();
    V7_STATE.with(|state| {
        let (last, mut base, mut counter) = state.get();
        if millis != last {
            // Keep the counter's headroom: the low 32 bits start at zero.
            base = uuid::Uuid::new_v4().as_u128() & !0xFFFF_FFFF;
            counter = 0;
        } else {
            counter += 1;
        }
        state.set((millis, base, counter));
        let bits = base.wrapping_add(u128::from(counter)).to_be_bytes();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&bits[6..]);
        uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid()
    })
}

/// Milliseconds since the Unix epoch. On Linux from the coarse real-time clock: a few
/// nanoseconds rather than a fifth of a publish, at the kernel tick's precision (1 to 4 ms),
/// which a UUIDv7 may use (RFC 9562, 6.2) and the per-thread counter keeps ordered.
#[cfg(target_os = "linux")]
fn unix_millis() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
    }
    precise_unix_millis()
}

#[cfg(not(target_os = "linux"))]
fn unix_millis() -> u64 {
    precise_unix_millis()
}

fn precise_unix_millis() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() * 1000 + u64::from(now.subsec_millis())
}

/// A message id. Generated ids live inline, so creating a message allocates nothing for its id
/// (and a consumer on another thread frees nothing for it).
#[derive(Clone, PartialEq, Eq)]
enum MessageId {
    Generated([u8; uuid::fmt::Hyphenated::LENGTH]),
    Given(Arc<str>),
}

impl MessageId {
    fn generate() -> Self {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        fast_v7().hyphenated().encode_lower(&mut text);
        MessageId::Generated(text)
    }

    fn as_str(&self) -> &str {
        match self {
            MessageId::Generated(text) => {
                std::str::from_utf8(text).expect("a hyphenated UUID is ASCII")
            }
            MessageId::Given(id) => id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_sets_content_type() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Order {
            id: u32,
        }
        let msg = Message::json(&Order { id: 7 }).unwrap();
        assert_eq!(msg.content_type(), Some(CONTENT_TYPE_JSON));
        assert_eq!(msg.decode_json::<Order>().unwrap(), Order { id: 7 });
        assert!(matches!(msg.decode_json::<u32>(), Err(Error::Codec(_))));
    }

    #[test]
    fn ids_are_unique_and_overridable() {
        let a = Message::new("x");
        let b = Message::new("x");
        assert_ne!(a.id(), b.id());
        assert_eq!(a.with_id("order-1").id(), "order-1");
    }

    #[test]
    fn generated_ids_are_v7_and_ordered() {
        let ids: Vec<uuid::Uuid> = (0..10_000)
            .map(|_| Message::new("x").id().parse().unwrap())
            .collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids sort by creation");
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn debug_hides_payload() {
        let msg = Message::new("secret-card-number");
        assert!(!format!("{msg:?}").contains("secret"));
    }
}
