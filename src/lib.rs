//! Spindle: publish and consume messages without caring which broker carries them.
//!
//! Pick the backend with a URL, from configuration; the code that publishes and consumes does
//! not change:
//!
//! ```
//! use spindle::{Message, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> spindle::Result<()> {
//! let broker = spindle::connect("memory://").await?;
//! broker.ensure_topic("orders").await?;
//! let mut inventory = broker.subscribe("orders", "inventory", SubscribeOptions::default()).await?;
//!
//! broker.publish("orders", Message::json(&serde_json::json!({"order_id": 1234}))?).await?;
//!
//! let delivery = inventory.next_delivery().await.expect("a delivery")?;
//! let order: serde_json::Value = delivery.decode_json()?;
//! assert_eq!(order["order_id"], 1234);
//! delivery.ack().await?;
//! broker.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! | scheme | backend | cargo feature |
//! |---|---|---|
//! | `memory://` | in-process (default) | `memory` |
//! | `amqp://`, `amqps://` | RabbitMQ | `rabbitmq` |
//! | `kafka://` | Kafka protocol | `kafka` |
//! | `sqs://` | AWS SQS, SNS fan-out | `sqs` |
//!
//! Each backend declares its [`Capabilities`]; what it cannot do returns
//! [`Error::Unsupported`], never a silent no-op.

pub use spindle_core::*;

#[cfg(feature = "kafka")]
pub use spindle_kafka as kafka;
#[cfg(feature = "memory")]
pub use spindle_memory as memory;
#[cfg(feature = "rabbitmq")]
pub use spindle_rabbitmq as rabbitmq;
#[cfg(feature = "sqs")]
pub use spindle_sqs as sqs;

use std::sync::Arc;

/// Every scheme Spindle knows, with the feature that enables it.
const KNOWN_SCHEMES: &[(&str, &str)] = &[
    ("memory", "memory"),
    ("amqp", "rabbitmq"),
    ("amqps", "rabbitmq"),
    ("kafka", "kafka"),
    ("sqs", "sqs"),
];

/// The schemes this build can connect to.
pub fn enabled_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut schemes: Vec<&'static str> = Vec::new();
    #[cfg(feature = "memory")]
    schemes.extend_from_slice(spindle_memory::SCHEMES);
    #[cfg(feature = "rabbitmq")]
    schemes.extend_from_slice(spindle_rabbitmq::SCHEMES);
    #[cfg(feature = "kafka")]
    schemes.extend_from_slice(spindle_kafka::SCHEMES);
    #[cfg(feature = "sqs")]
    schemes.extend_from_slice(spindle_sqs::SCHEMES);
    schemes
}

/// Connects to the backend named by `url`'s scheme, e.g. `memory://`.
///
/// A malformed URL, an unknown option, or a scheme this build does not enable fails here with
/// a typed error naming the problem.
pub async fn connect(url: &str) -> Result<DynBroker> {
    connect_with(Config::parse(url)?).await
}

/// Connects with a parsed [`Config`] (from a file, the environment or code).
pub async fn connect_with(config: Config) -> Result<DynBroker> {
    let scheme = config.scheme().to_string();
    match scheme.as_str() {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(spindle_memory::MemoryBroker::from_config(
            &config,
        )?)),
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(spindle_rabbitmq::connect(&config).await?)),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(spindle_kafka::connect(&config).await?)),
        #[cfg(feature = "sqs")]
        "sqs" => Ok(Arc::new(spindle_sqs::connect(&config).await?)),
        other => match KNOWN_SCHEMES.iter().find(|(s, _)| *s == other) {
            Some((_, feature)) => Err(Error::FeatureDisabled {
                scheme: other.to_string(),
                feature,
            }),
            None => Err(Error::UnknownScheme {
                scheme: other.to_string(),
                enabled: enabled_schemes(),
            }),
        },
    }
}

/// Connects with the configuration in `SPINDLE_URL` (and `SPINDLE_OPTION_*`), or to
/// `memory://` when `SPINDLE_URL` is not set.
pub async fn connect_from_env() -> Result<DynBroker> {
    match std::env::var(ENV_URL) {
        Ok(_) => connect_with(Config::from_env()?).await,
        Err(_) => connect("memory://").await,
    }
}
