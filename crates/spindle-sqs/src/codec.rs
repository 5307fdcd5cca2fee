//! How a [`Message`] maps onto an SQS/SNS body and message attributes, and back.
//!
//! - The body is the payload when it is non-empty UTF-8 made only of characters SQS accepts
//!   (XML 1.0 characters, without `\r`); otherwise it is base64 and attribute `spindle.enc`
//!   says so (`base64`, or `empty` for an empty payload, since SQS bodies cannot be empty).
//! - The message id, key and content type travel in `spindle.id`, `spindle.key`, `spindle.ct`.
//! - Headers become attributes of their own when their name is a valid attribute name and
//!   their value a non-empty safe string, as long as the 10-attribute limit allows; the rest
//!   (and any id, key or content type that is not a safe attribute value) are packed as JSON
//!   into the single attribute `spindle.x`.
//! - Size is counted as AWS does, in bytes: body plus every attribute's name, data type and
//!   value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use spindle_core::{Error, Headers, Message, Result};

/// The most message attributes SQS (and SNS raw delivery) carries.
pub(crate) const MAX_ATTRIBUTES: usize = 10;
/// Bytes set aside for the adapter's own attributes (id, key, content type, encoding) when
/// computing the advertised `max_payload_bytes`.
pub(crate) const RESERVED_ATTRIBUTE_BYTES: usize = 1024;
/// SQS's limit on one message (and on one batch request), in bytes.
pub(crate) const SQS_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// SNS's limit on one message (and on one batch request), in bytes.
pub(crate) const SNS_MAX_MESSAGE_BYTES: usize = 256 * 1024;

const ATTR_ID: &str = "spindle.id";
const ATTR_KEY: &str = "spindle.key";
const ATTR_CT: &str = "spindle.ct";
const ATTR_ENC: &str = "spindle.enc";
const ATTR_PACK: &str = "spindle.x";
const STRING: &str = "String";

/// The largest payload, in bytes, that fits `limit` whatever its content: binary payloads
/// are base64-encoded (4 bytes for every 3), after setting aside [`RESERVED_ATTRIBUTE_BYTES`].
pub(crate) const fn max_payload_for(limit: usize) -> usize {
    (limit - RESERVED_ATTRIBUTE_BYTES) / 4 * 3
}

/// A message ready for SendMessage(Batch) or Publish(Batch).
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub body: String,
    pub attributes: Vec<(String, String)>,
    /// Bytes as AWS counts them.
    pub size: usize,
    /// FIFO only.
    pub group_id: Option<String>,
    /// FIFO only.
    pub dedup_id: Option<String>,
    /// Whole seconds.
    pub delay_secs: Option<i32>,
}

#[derive(Default, Serialize, Deserialize)]
struct Pack {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    h: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ct: Option<String>,
}

impl Pack {
    fn is_empty(&self) -> bool {
        self.h.is_empty() && self.id.is_none() && self.key.is_none() && self.ct.is_none()
    }
}

/// Whether `c` may appear in an SQS body or string attribute (XML 1.0 characters). `\r` is
/// excluded too, since XML parsers may normalise it.
fn safe_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn safe_text(s: &str) -> bool {
    s.chars().all(safe_char)
}

/// Valid SQS message attribute name, and not one of the adapter's own.
fn valid_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !lower.starts_with("spindle.")
}

/// JSON with every character SQS would refuse escaped as `\uXXXX`.
fn safe_json(value: &impl Serialize) -> String {
    let json = serde_json::to_string(value).expect("maps of strings serialise");
    if safe_text(&json) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if safe_char(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{:04x}", u));
            }
        }
    }
    out
}

/// A FIFO group or deduplication id: up to 128 printable ASCII characters, else a hash.
fn fifo_id(raw: &str) -> String {
    if !raw.is_empty() && raw.len() <= 128 && raw.bytes().all(|b| b.is_ascii_graphic()) {
        raw.to_string()
    } else {
        format!("h-{:016x}", fnv64(raw.as_bytes()))
    }
}

pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Encodes `message`, rejecting it if its payload exceeds `max_payload` or its encoded size
/// exceeds `limit` (both in bytes).
pub(crate) fn encode(
    message: &Message,
    max_payload: usize,
    limit: usize,
    fifo: bool,
    delay_secs: Option<i32>,
) -> Result<Encoded> {
    let payload = message.payload();
    if payload.len() > max_payload {
        return Err(Error::PayloadTooLarge {
            size: payload.len(),
            max: max_payload,
        });
    }
    let mut attributes: Vec<(String, String)> = Vec::new();
    let mut pack = Pack::default();
    let body = if payload.is_empty() {
        attributes.push((ATTR_ENC.into(), "empty".into()));
        "-".to_string()
    } else {
        match std::str::from_utf8(payload) {
            Ok(text) if safe_text(text) => text.to_string(),
            _ => {
                attributes.push((ATTR_ENC.into(), "base64".into()));
                base64::engine::general_purpose::STANDARD.encode(payload)
            }
        }
    };
    let mut meta = |name: &str, value: Option<&str>, slot: &mut Option<String>| {
        if let Some(v) = value {
            if !v.is_empty() && safe_text(v) {
                attributes.push((name.to_string(), v.to_string()));
            } else {
                *slot = Some(v.to_string());
            }
        }
    };
    meta(ATTR_ID, Some(message.id()), &mut pack.id);
    meta(ATTR_KEY, message.key(), &mut pack.key);
    meta(ATTR_CT, message.content_type(), &mut pack.ct);

    let (eligible, other): (Vec<_>, Vec<_>) = message
        .headers()
        .iter()
        .partition(|(k, v)| valid_attribute_name(k) && !v.is_empty() && safe_text(v));
    pack.h
        .extend(other.into_iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut need_pack = !pack.is_empty();
    let mut room = MAX_ATTRIBUTES - attributes.len() - usize::from(need_pack);
    if eligible.len() > room && !need_pack {
        need_pack = true;
        room -= 1;
    }
    for (i, (k, v)) in eligible.into_iter().enumerate() {
        if i < room {
            attributes.push((k.clone(), v.clone()));
        } else {
            pack.h.insert(k.clone(), v.clone());
        }
    }
    if need_pack {
        attributes.push((ATTR_PACK.into(), safe_json(&pack)));
    }
    let size = body.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + STRING.len() + v.len())
            .sum::<usize>();
    if size > limit {
        return Err(Error::PayloadTooLarge { size, max: limit });
    }
    Ok(Encoded {
        body,
        attributes,
        size,
        group_id: fifo.then(|| fifo_id(message.key().unwrap_or("spindle"))),
        dedup_id: fifo.then(|| fifo_id(message.id())),
        delay_secs,
    })
}

/// Rebuilds a message from a received body and string attributes.
pub(crate) fn decode(
    body: &str,
    sqs_message_id: Option<&str>,
    attributes: HashMap<String, String>,
) -> Message {
    let mut attributes = attributes;
    let payload: Vec<u8> = match attributes.remove(ATTR_ENC).as_deref() {
        Some("empty") => Vec::new(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .unwrap_or_else(|_| body.as_bytes().to_vec()),
        _ => body.as_bytes().to_vec(),
    };
    let pack: Pack = attributes
        .remove(ATTR_PACK)
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default();
    let id = attributes
        .remove(ATTR_ID)
        .or(pack.id)
        .or_else(|| sqs_message_id.map(str::to_string))
        .unwrap_or_else(spindle_core::new_message_id);
    let key = attributes.remove(ATTR_KEY).or(pack.key);
    let ct = attributes.remove(ATTR_CT).or(pack.ct);
    let mut headers: Headers = attributes.into_iter().collect();
    headers.extend(pack.h);
    let mut message = Message::new(payload).with_id(id).with_headers(headers);
    if let Some(k) = key {
        message = message.with_key(k);
    }
    if let Some(ct) = ct {
        message = message.with_content_type(ct);
    }
    message
}

/// An SQS queue name (at most 80 characters of `[A-Za-z0-9_-]`, plus `.fifo` for FIFO queues)
/// built from `parts` joined by `__`, then `suffix`. Over-long names are shortened and given a
/// hash of the full name, so the mapping stays deterministic and collision-resistant.
pub(crate) fn queue_name(parts: &[&str], suffix: &str, fifo: bool) -> String {
    let parts: Vec<&str> = parts
        .iter()
        .map(|p| p.strip_suffix(".fifo").unwrap_or(p))
        .collect();
    let base = parts.join("__");
    let tail = if fifo { ".fifo" } else { "" };
    if base.len() + suffix.len() + tail.len() <= 80 {
        return format!("{base}{suffix}{tail}");
    }
    let keep = 80 - suffix.len() - tail.len() - 17;
    let mut cut = keep.min(base.len());
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}-{:016x}{suffix}{tail}",
        &base[..cut],
        fnv64(base.as_bytes())
    )
}

/// Checks a topic or group name can be part of an SQS queue name.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    let core = name.strip_suffix(".fifo").unwrap_or(name);
    if core.is_empty()
        || !core
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidArgument(format!(
            "{what} name `{name}`: SQS allows only letters, digits, `-` and `_` (and a `.fifo` suffix)"
        )));
    }
    Ok(())
}

/// Shared, cheap message handle.
pub(crate) fn shared(message: Message) -> Arc<Message> {
    Arc::new(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: &Message) -> Message {
        let e = encode(m, usize::MAX, usize::MAX, false, None).unwrap();
        assert!(e.attributes.len() <= MAX_ATTRIBUTES);
        assert!(safe_text(&e.body));
        decode(&e.body, None, e.attributes.into_iter().collect())
    }

    #[test]
    fn payloads_and_headers_round_trip() {
        let mut headers = Headers::new();
        for i in 0..15 {
            headers.insert(format!("h{i}"), format!("v{i}"));
        }
        headers.insert("unicode-ключ".into(), "значение".into());
        headers.insert("empty".into(), String::new());
        headers.insert("cr".into(), "a\rb\u{FFFE}".into());
        for payload in [&b""[..], b"\xff\x00", b"text", b"a\rb"] {
            let m = Message::new(payload.to_vec())
                .with_headers(headers.clone())
                .with_key("k")
                .with_content_type("text/plain")
                .with_id("order-42:α");
            let back = roundtrip(&m);
            assert_eq!(back, m);
        }
    }

    #[test]
    fn size_limits() {
        let max = max_payload_for(SQS_MAX_MESSAGE_BYTES);
        let at = Message::new((0..max).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let e = encode(&at, max, SQS_MAX_MESSAGE_BYTES, false, None).unwrap();
        assert!(e.size <= SQS_MAX_MESSAGE_BYTES);
        let over = Message::new(vec![7u8; max + 1]);
        assert!(matches!(
            encode(&over, max, SQS_MAX_MESSAGE_BYTES, false, None),
            Err(Error::PayloadTooLarge { .. })
        ));
        // Attributes count too: a payload under the limit with large headers is rejected.
        let big = Message::new(vec![b'a'; max]).with_header("big", "x".repeat(300_000));
        assert!(matches!(
            encode(&big, max, SQS_MAX_MESSAGE_BYTES, false, None),
            Err(Error::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn names_are_bounded_and_stable() {
        let long = "x".repeat(70);
        let a = queue_name(&[&long, &long], "__dlq", false);
        assert!(a.len() <= 80, "{a}");
        assert_eq!(a, queue_name(&[&long, &long], "__dlq", false));
        assert_ne!(a, queue_name(&[&long, "y"], "__dlq", false));
        assert!(queue_name(&["t.fifo"], "__dlq", true).ends_with("__dlq.fifo"));
    }
}
