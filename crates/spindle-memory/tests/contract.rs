//! The whole contract suite against the memory backend, constructed directly.

use std::sync::Arc;
use std::time::Duration;

use spindle_memory::{MemoryBroker, MemorySettings};

fn broker() -> spindle_core::DynBroker {
    let mut settings = MemorySettings::default();
    settings.tick = Duration::from_millis(5);
    Arc::new(MemoryBroker::with_settings(settings))
}

spindle_contract::contract_tests!(spindle_contract::Harness::new(|| async { Ok(broker()) }));
