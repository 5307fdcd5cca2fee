//! Shared test setup: the moto endpoint and URLs.

#![allow(dead_code)]

use std::time::Duration;

/// Where moto listens (start it with `scripts/start-moto.sh`).
pub const MOTO: &str = "127.0.0.1:4566";

/// The URL of a broker on moto in `mode` (`queue` or `fanout`). `SPINDLE_SQS_URL` overrides
/// the base (without mode).
pub fn url(mode: &str) -> String {
    let base = std::env::var("SPINDLE_SQS_URL").unwrap_or_else(|_| {
        format!(
            "sqs://?endpoint=http://{MOTO}&region=us-east-1&access_key_id=test&secret_access_key=test"
        )
    });
    format!("{base}&mode={mode}")
}

pub async fn broker(mode: &str) -> spindle_core::Result<spindle_sqs::SqsBroker> {
    let config = spindle_core::Config::parse(&url(mode))?;
    spindle_sqs::connect(&config).await
}

/// Messages in the contract's stress case against moto (10,000 elsewhere).
pub const STRESS_MESSAGES: usize = 1_000;

/// Timing for SQS: visibility timeouts and delays are whole seconds.
pub fn timing() -> spindle_contract::Timing {
    spindle_contract::Timing {
        ack_timeout: Duration::from_secs(2),
        delay: Duration::from_secs(1),
        receive_timeout: Duration::from_secs(15),
        quiet: Duration::from_secs(1),
        case_timeout: Duration::from_secs(300),
    }
}

/// Whether moto answers; under CI a missing moto panics, elsewhere the test skips loudly.
pub async fn moto_available(test: &str) -> bool {
    let probe =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(MOTO)).await;
    if matches!(probe, Ok(Ok(_))) {
        return true;
    }
    if spindle_contract::running_in_ci() {
        panic!("{test}: moto is not reachable at {MOTO}, and CI=true requires it (run scripts/start-moto.sh)");
    }
    eprintln!("SKIPPED {test}: moto is not reachable at {MOTO} (run scripts/start-moto.sh; this fails under CI=true)");
    false
}

/// A name no other run uses: `prefix-<8 hex digits>`.
pub fn unique(prefix: &str) -> String {
    let run = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &run[..8])
}

/// The subscription's next delivery; panics if none comes within 15 s or it is an error.
pub async fn next(sub: &mut spindle_core::Subscription) -> spindle_core::Delivery {
    tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
        .await
        .expect("a delivery within 15 s")
        .expect("stream open")
        .expect("no error")
}
