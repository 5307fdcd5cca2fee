//! The behaviour every Spindle backend must show, as a library any adapter can run.
//!
//! Each case is a `pub async fn(&Harness)` in [`cases`]; [`contract_tests!`] expands to one
//! `#[tokio::test]` per case so every failure names its case. A case whose capability the
//! backend lacks asserts that the operation returns [`Error::Unsupported`]; none passes by
//! skipping.
//!
//! ```text
//! // tests/contract.rs of an adapter crate (needs tokio as a dev-dependency):
//! spindle_contract::contract_tests!(spindle_contract::Harness::new(|| async {
//!     my_adapter::connect("mybroker://127.0.0.1").await
//! }));
//! ```

pub mod cases;
mod harness;

pub use harness::{Harness, Timing};
pub use spindle_core::Error;

/// Whether the `CI` environment variable asks for strict runs (`true` or `1`): then a broker
/// that cannot be reached fails its tests instead of skipping them.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Re-exported for the macro.
#[doc(hidden)]
pub use tokio as __tokio;

/// Every case, in the order the suite runs them.
pub const CASES: &[&str] = &[
    "round_trip_payloads",
    "payload_at_size_limit",
    "oversized_payload_rejected",
    "headers_key_and_content_type_round_trip",
    "message_id_preserved",
    "topic_isolation",
    "many_topics_at_once",
    "publish_batch_results",
    "receive_batch_max_and_deadline",
    "publish_to_missing_topic",
    "subscribe_to_missing_topic",
    "publish_without_group",
    "ack_prevents_redelivery",
    "nack_redelivers",
    "nack_with_delay",
    "nack_delay_over_maximum",
    "dead_letter_keeps_payload_headers_reason",
    "max_attempts_then_dead_letter",
    "redrive_from_dead_letter",
    "repeated_nacks_across_consumers",
    "dropped_delivery_redelivered",
    "closed_subscriber_redelivers",
    "close_mid_stream_loses_nothing",
    "unacked_redelivered_after_ack_timeout",
    "extend_prevents_redelivery",
    "competing_consumers_share",
    "fan_out_every_group",
    "ordering_per_key",
    "delayed_publish",
    "delayed_publish_over_maximum",
    "prefetch_bound_honoured",
    "graceful_drain",
    "close_is_idempotent_and_publish_after_close_fails",
    "cancel_one_subscription_others_work",
    "shutdown_ends_streams",
    "depth_reflects_unacked",
    "purge_empties_group",
    "invalid_options_rejected",
    "restart_loses_nothing",
    "stress_random_nacks",
];

/// Expands to one `#[tokio::test]` per contract case, each building its harness with
/// `$harness` (an expression evaluated per test).
#[macro_export]
macro_rules! contract_tests {
    ($harness:expr) => {
        $crate::contract_tests!(@cases $harness;
            round_trip_payloads,
            payload_at_size_limit,
            oversized_payload_rejected,
            headers_key_and_content_type_round_trip,
            message_id_preserved,
            topic_isolation,
            many_topics_at_once,
            publish_batch_results,
            receive_batch_max_and_deadline,
            publish_to_missing_topic,
            subscribe_to_missing_topic,
            publish_without_group,
            ack_prevents_redelivery,
            nack_redelivers,
            nack_with_delay,
            nack_delay_over_maximum,
            dead_letter_keeps_payload_headers_reason,
            max_attempts_then_dead_letter,
            redrive_from_dead_letter,
            repeated_nacks_across_consumers,
            dropped_delivery_redelivered,
            closed_subscriber_redelivers,
            close_mid_stream_loses_nothing,
            unacked_redelivered_after_ack_timeout,
            extend_prevents_redelivery,
            competing_consumers_share,
            fan_out_every_group,
            ordering_per_key,
            delayed_publish,
            delayed_publish_over_maximum,
            prefetch_bound_honoured,
            graceful_drain,
            close_is_idempotent_and_publish_after_close_fails,
            cancel_one_subscription_others_work,
            shutdown_ends_streams,
            depth_reflects_unacked,
            purge_empties_group,
            invalid_options_rejected,
            restart_loses_nothing,
            stress_random_nacks
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[$crate::__tokio::test(flavor = "multi_thread", worker_threads = 2, crate = "spindle_contract::__tokio")]
            async fn $case() {
                let harness: $crate::Harness = $harness;
                harness.run(stringify!($case), |h| Box::pin($crate::cases::$case(h))).await;
            }
        )*
    };
}
