//! How a Spindle message travels as a Kafka record.
//!
//! Payload is the record value, the key is the record key, user headers are Kafka headers.
//! The id and content type travel as reserved headers; retry records add the attempt and the
//! due time; dead-letter records add the reason, attempt and original topic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;
use spindle_core::{
    Headers, Message, HEADER_ATTEMPT, HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_TOPIC,
};

/// Reserved header carrying the message id.
pub const HEADER_ID: &str = "spindle-id";
/// Reserved header carrying the content type.
pub const HEADER_CONTENT_TYPE: &str = "spindle-content-type";
/// Reserved header of retry records: when (Unix milliseconds) the retry is due.
pub const HEADER_DUE_MS: &str = "spindle-due-ms";

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// How long until `due_ms` (Unix milliseconds); `None` if it has passed.
pub(crate) fn until_due(due_ms: u64) -> Option<Duration> {
    let due = due_ms.saturating_mul(1000);
    let now = now_micros();
    (due > now).then(|| Duration::from_micros(due - now))
}

/// Kafka headers for `message`, plus `extra` reserved ones.
pub(crate) fn headers_for(message: &Message, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(message.headers().len() + 2 + extra.len());
    for (k, v) in message.headers() {
        if extra.iter().any(|(e, _)| e == k) {
            continue;
        }
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h = h.insert(Header {
        key: HEADER_ID,
        value: Some(message.id().as_bytes()),
    });
    if let Some(ct) = message.content_type() {
        h = h.insert(Header {
            key: HEADER_CONTENT_TYPE,
            value: Some(ct.as_bytes()),
        });
    }
    for (k, v) in extra {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// A record read back: the message, its attempt and its due time (retry records).
pub(crate) struct Decoded {
    pub message: Message,
    pub attempt: Option<u32>,
    pub due_ms: Option<u64>,
}

/// Decodes a record. `keep_dead_letter_headers` keeps the attempt, reason and original topic
/// headers (dead-letter deliveries show them); otherwise the attempt header is consumed.
pub(crate) fn decode(record: &BorrowedMessage<'_>, keep_dead_letter_headers: bool) -> Decoded {
    let mut headers = Headers::new();
    let mut id = None;
    let mut content_type = None;
    let mut attempt = None;
    let mut due_ms = None;
    if let Some(hs) = record.headers() {
        for h in hs.iter() {
            let value = h
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            match h.key {
                HEADER_ID => id = Some(value),
                HEADER_CONTENT_TYPE => content_type = Some(value),
                HEADER_DUE_MS => due_ms = value.parse().ok(),
                HEADER_ATTEMPT if !keep_dead_letter_headers => attempt = value.parse().ok(),
                _ => {
                    headers.insert(h.key.to_string(), value);
                }
            }
        }
    }
    let payload = record.payload().map(<[u8]>::to_vec).unwrap_or_default();
    let mut message = Message::new(payload).with_headers(headers);
    message = match id {
        Some(id) => message.with_id(id),
        None => message.with_id(format!(
            "{}-{}-{}",
            record.topic(),
            record.partition(),
            record.offset()
        )),
    };
    if let Some(key) = record.key() {
        message = message.with_key(String::from_utf8_lossy(key).into_owned());
    }
    if let Some(ct) = content_type {
        message = message.with_content_type(ct);
    }
    Decoded {
        message,
        attempt,
        due_ms,
    }
}

/// Extra headers of a retry record: the attempt it will be and when it is due.
pub(crate) fn retry_headers(attempt: u32, delay: Option<Duration>) -> Vec<(&'static str, String)> {
    // Round up so the message is never due early.
    let due_micros = now_micros() + delay.map(|d| d.as_micros() as u64).unwrap_or(0);
    vec![
        (HEADER_ATTEMPT, attempt.to_string()),
        (HEADER_DUE_MS, due_micros.div_ceil(1000).to_string()),
    ]
}

/// Extra headers of a dead-letter record.
pub(crate) fn dead_letter_headers(
    attempt: u32,
    reason: &str,
    topic: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (HEADER_ATTEMPT, attempt.to_string()),
        (HEADER_DEAD_LETTER_REASON, reason.to_string()),
        (HEADER_ORIGINAL_TOPIC, topic.to_string()),
    ]
}

/// Removes the dead-letter headers of a message going back to its group (redrive).
pub(crate) fn strip_dead_letter_headers(message: &mut Message) {
    let h = message.headers_mut();
    h.remove(HEADER_ATTEMPT);
    h.remove(HEADER_DEAD_LETTER_REASON);
    h.remove(HEADER_ORIGINAL_TOPIC);
}
