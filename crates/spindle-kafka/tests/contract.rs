//! The whole contract suite against tansu (scripts/start-tansu.sh), including a broker restart.
//!
//! Run with `--test-threads=1`: `restart_loses_nothing` restarts the shared broker process.

use std::sync::Arc;
use std::time::Duration;

use spindle_contract::{Harness, Timing};
use spindle_core::Config;

const ADDRESS: &str = "127.0.0.1:9092";

fn url() -> String {
    std::env::var("SPINDLE_KAFKA_URL").unwrap_or_else(|_| format!("kafka://{ADDRESS}"))
}

async fn restart_tansu() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/start-tansu.sh");
    // Captured, so the script's progress lines don't interleave with the test harness's.
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .arg("restart")
        .output()
        .await
        .expect("run scripts/start-tansu.sh restart");
    assert!(
        out.status.success(),
        "scripts/start-tansu.sh restart failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn harness() -> Harness {
    Harness::new(|| async {
        let broker = spindle_kafka::connect(&Config::parse(&url())?).await?;
        Ok(Arc::new(broker) as spindle_core::DynBroker)
    })
    .requires_broker("tansu (Kafka)", ADDRESS)
    .with_timing(Timing {
        ack_timeout: Duration::from_millis(400),
        delay: Duration::from_millis(500),
        receive_timeout: Duration::from_secs(20),
        quiet: Duration::from_millis(1000),
        case_timeout: Duration::from_secs(240),
    })
    .with_restart(restart_tansu)
}

spindle_contract::contract_tests!(harness());
