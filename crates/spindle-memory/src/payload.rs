//! Small payloads move into buffers their topic owns, so the publisher's allocation is freed
//! on the publisher's thread.
//!
//! Without this, a payload allocated by the publishing thread is freed by the consuming one,
//! once per message. glibc's malloc frees another thread's chunk under that thread's arena
//! lock, the lock the publisher needs for its next allocation: the two threads take turns on
//! it and end-to-end throughput with a fresh payload per message fell to less than half. After
//! the copy, the publisher frees its own allocation (its thread cache hands it straight back
//! for the next message) and the consumer frees one buffer per [`CHUNK`] bytes.
//!
//! One buffer per topic, not per thread: every group of a topic gets the topic's messages in
//! publish order, so a group's backlog pins buffers full of its own messages rather than one
//! buffer per retained message. Messages that may leave that order for long are not copied
//! (delayed or keyed ones, see [`PayloadBuffer::adopt_messages`]) or get their own copy back with
//! [`detach`] (delayed retries, dead letters). What can still pin a buffer per message:
//! deliveries in flight (at most the prefetch of each consumer), messages put back at the
//! front by an immediate nack or an expired deadline (they are next in line), and payloads
//! the application keeps. A topic no one published to for a second lets its buffer go (the
//! sweeper checks), so idle topics cost no buffer.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use spindle_core::Message;

/// Payloads up to this size are copied; larger ones are passed on as they are (the copy
/// would cost more than the allocator's lock).
pub(crate) const COPY_MAX: usize = 1024;

/// Size of one shared buffer: 64 or more payloads share one allocation. (16 KiB was measured
/// too: the consumer's frees of whole buffers still met the publisher on glibc's arena lock,
/// and `publish_batch` ran about 15% slower.)
pub(crate) const CHUNK: usize = 64 * 1024;

/// A topic's buffer for small payloads.
#[derive(Default)]
pub(crate) struct PayloadBuffer {
    free: Mutex<Spare>,
}

/// The unused end of the current buffer (it keeps the whole buffer allocated), and whether a
/// publish used it since the last idle check.
#[derive(Default)]
struct Spare {
    buf: BytesMut,
    used: bool,
}

impl PayloadBuffer {
    /// Moves the small payloads of messages that will be consumed in publish order into this
    /// buffer, taking it once. A delayed message waits past later ones, and a keyed one may
    /// wait behind an earlier message of its key for as long as that one is delayed or held:
    /// either would keep a whole buffer alive, so they keep their payloads.
    pub fn adopt_messages<'a>(
        &self,
        messages: impl IntoIterator<Item = &'a mut Message>,
        delayed: bool,
    ) {
        if !delayed {
            self.adopt_all(
                messages
                    .into_iter()
                    .filter(|m| m.key().is_none())
                    .map(Message::payload_mut),
            );
        }
    }

    /// Moves a small payload into this buffer.
    #[cfg(test)]
    fn adopt(&self, payload: &mut Bytes) {
        self.adopt_all([payload]);
    }

    /// Moves small payloads into this buffer, taking it once. A publisher that finds another
    /// one copying leaves its payloads where they are rather than wait.
    fn adopt_all<'a>(&self, payloads: impl IntoIterator<Item = &'a mut Bytes>) {
        let mut payloads = payloads.into_iter().filter(|p| copyable(p)).peekable();
        if payloads.peek().is_none() {
            return;
        }
        let Ok(mut spare) = self.free.try_lock() else {
            return;
        };
        spare.used = true;
        let free = &mut spare.buf;
        for payload in payloads {
            if free.capacity() < payload.len() {
                *free = BytesMut::with_capacity(CHUNK);
            }
            free.extend_from_slice(payload);
            *payload = free.split().freeze();
        }
    }

    /// Lets go of the buffer if no publish used it since the last call, so an idle topic
    /// keeps no buffer alive (the sweeper calls this about once a second). Returns whether it
    /// did.
    pub fn release_if_idle(&self) -> bool {
        let Ok(mut spare) = self.free.try_lock() else {
            return false; // in use right now
        };
        let idle = !std::mem::take(&mut spare.used) && spare.buf.capacity() > 0;
        if idle {
            spare.buf = BytesMut::new();
        }
        idle
    }
}

/// Gives a payload that may sit in a shared buffer its own allocation, so that holding it
/// for long does not keep the rest of that buffer alive.
pub(crate) fn detach(payload: &mut Bytes) {
    if copyable(payload) {
        *payload = Bytes::copy_from_slice(payload);
    }
}

fn copyable(payload: &Bytes) -> bool {
    (1..=COPY_MAX).contains(&payload.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_share_a_buffer_and_keep_their_bytes() {
        let buffer = PayloadBuffer::default();
        let mut a = Bytes::from(vec![1u8; 100]);
        let mut b = Bytes::from(vec![2u8; 100]);
        buffer.adopt(&mut a);
        buffer.adopt(&mut b);
        assert_eq!(&a[..], &[1u8; 100][..]);
        assert_eq!(&b[..], &[2u8; 100][..]);
        // Adjacent in one allocation.
        assert_eq!(a.as_ptr() as usize + 100, b.as_ptr() as usize);
    }

    #[test]
    fn large_and_empty_payloads_are_left_alone() {
        let buffer = PayloadBuffer::default();
        let big = Bytes::from(vec![7u8; COPY_MAX + 1]);
        let mut moved = big.clone();
        buffer.adopt(&mut moved);
        assert_eq!(moved.as_ptr(), big.as_ptr());
        let mut empty = Bytes::new();
        buffer.adopt(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn a_full_buffer_is_replaced_and_nothing_overlaps() {
        let buffer = PayloadBuffer::default();
        let per_chunk = CHUNK / COPY_MAX;
        let kept: Vec<Bytes> = (0..=per_chunk)
            .map(|i| {
                let mut p = Bytes::from(vec![i as u8; COPY_MAX]);
                buffer.adopt(&mut p);
                p
            })
            .collect();
        for (i, p) in kept.iter().enumerate() {
            assert_eq!(&p[..], &vec![i as u8; COPY_MAX][..], "payload {i}");
        }
        let start = kept[0].as_ptr() as usize;
        let last_in_first = &kept[per_chunk - 1];
        assert_eq!(
            last_in_first.as_ptr() as usize + COPY_MAX,
            start + CHUNK,
            "the first buffer is filled to its end"
        );
        let next = kept[per_chunk].as_ptr() as usize;
        assert!(
            !(start..start + CHUNK).contains(&next),
            "the payload that did not fit went to a new buffer"
        );
    }

    #[test]
    fn a_batch_shares_one_buffer() {
        let buffer = PayloadBuffer::default();
        let mut batch: Vec<Bytes> = (0..4u8).map(|i| Bytes::from(vec![i; 32])).collect();
        batch.push(Bytes::from(vec![9u8; COPY_MAX + 1]));
        let big_at = batch[4].as_ptr();
        buffer.adopt_all(batch.iter_mut());
        for (i, p) in batch[..4].iter().enumerate() {
            assert_eq!(&p[..], &[i as u8; 32][..]);
            assert_eq!(p.as_ptr() as usize, batch[0].as_ptr() as usize + 32 * i);
        }
        assert_eq!(batch[4].as_ptr(), big_at, "too large to copy");
    }

    #[test]
    fn a_busy_buffer_is_skipped_not_waited_for() {
        let buffer = PayloadBuffer::default();
        let held = buffer.free.lock().unwrap();
        let mut p = Bytes::from(vec![5u8; 10]);
        let at = p.as_ptr();
        buffer.adopt(&mut p);
        assert_eq!(p.as_ptr(), at);
        drop(held);
    }

    #[test]
    fn an_idle_buffer_is_let_go() {
        let buffer = PayloadBuffer::default();
        assert!(!buffer.release_if_idle(), "nothing to let go");
        let mut a = Bytes::from(vec![1u8; 10]);
        buffer.adopt(&mut a);
        assert!(!buffer.release_if_idle(), "used since the last check");
        assert!(buffer.release_if_idle(), "idle since the last check");
        assert_eq!(buffer.free.lock().unwrap().buf.capacity(), 0);
        assert_eq!(&a[..], &[1u8; 10][..], "payloads keep their bytes");
        let mut b = Bytes::from(vec![2u8; 10]);
        buffer.adopt(&mut b);
        assert_eq!(&b[..], &[2u8; 10][..], "a new buffer after");
    }

    #[test]
    fn detach_gives_a_payload_its_own_allocation() {
        let buffer = PayloadBuffer::default();
        let mut a = Bytes::from(vec![3u8; 10]);
        buffer.adopt(&mut a);
        let shared_at = a.as_ptr();
        detach(&mut a);
        assert_ne!(a.as_ptr(), shared_at);
        assert_eq!(&a[..], &[3u8; 10][..]);
        assert!(a.is_unique());
    }
}
