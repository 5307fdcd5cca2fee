//! The whole contract suite against moto in fan-out mode (SNS topic, one SQS queue per group).

mod common;

spindle_contract::contract_tests!(spindle_contract::Harness::new(|| async {
    let broker: spindle_core::DynBroker = std::sync::Arc::new(common::broker("fanout").await?);
    Ok(broker)
})
.requires_broker("moto (SQS)", common::MOTO)
.with_timing(common::timing())
// moto's cost per request grows with the queue's length (it rescans the queue on every send
// and delete), so 10,000 queued messages would take about 1,000 s; see the crate docs.
.with_stress_messages(common::STRESS_MESSAGES));
