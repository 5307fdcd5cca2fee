//! Spindle messages to AMQP properties and back.
//!
//! - id → `message_id`, content type → `content_type`, `delivery_mode` 2 (persistent);
//! - user headers → AMQP headers as long strings;
//! - key → routing key, and the `spindle-key` header (the routing key is lost when a message
//!   is moved between queues);
//! - attempt → the reserved `spindle-attempt` header, only when above 1.

use std::sync::Arc;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use spindle_core::{new_message_id, Headers, Message, HEADER_ATTEMPT};

/// Reserved header carrying the message key.
pub(crate) const HEADER_KEY: &str = "spindle-key";

/// Properties and routing key for `message`, with `extra` reserved headers set on top.
pub(crate) fn encode(
    message: &Message,
    attempt: u32,
    extra: &[(&str, String)],
) -> (BasicProperties, String) {
    let mut headers = FieldTable::default();
    for (k, v) in message.headers() {
        if k == HEADER_ATTEMPT {
            continue;
        }
        headers.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    if let Some(key) = message.key() {
        headers.insert(
            HEADER_KEY.into(),
            AMQPValue::LongString(LongString::from(key.as_bytes())),
        );
    }
    if attempt > 1 {
        headers.insert(
            HEADER_ATTEMPT.into(),
            AMQPValue::LongString(LongString::from(attempt.to_string().as_bytes())),
        );
    }
    for (k, v) in extra {
        headers.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(message.id()))
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ct) = message.content_type() {
        props = props.with_content_type(ShortString::from(ct));
    }
    (props, message.key().unwrap_or("").to_string())
}

/// The message in an AMQP delivery and its attempt number (from `spindle-attempt`, else 1).
pub(crate) fn decode(
    properties: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    data: Vec<u8>,
) -> (Arc<Message>, u32) {
    let mut headers = Headers::new();
    let mut key = None;
    let mut attempt = 1u32;
    if let Some(table) = properties.headers() {
        for (k, v) in table.inner() {
            let Some(text) = value_text(v) else { continue };
            match k.as_str() {
                HEADER_KEY => key = Some(text),
                HEADER_ATTEMPT => {
                    attempt = text.parse().unwrap_or(1).max(1);
                    headers.insert(k.as_str().to_string(), text);
                }
                name => {
                    headers.insert(name.to_string(), text);
                }
            }
        }
    }
    if key.is_none() && !exchange.is_empty() && !routing_key.is_empty() {
        key = Some(routing_key.to_string());
    }
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(new_message_id);
    let mut message = Message::new(data).with_id(id).with_headers(headers);
    if let Some(key) = key {
        message = message.with_key(key);
    }
    if let Some(ct) = properties.content_type() {
        message = message.with_content_type(ct.as_str());
    }
    (Arc::new(message), attempt)
}

/// A header value as text, for the scalar AMQP types; tables and arrays are left out.
fn value_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        _ => return None,
    })
}
