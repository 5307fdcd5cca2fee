//! The contract suite through `spindle::connect`, against the backend named by
//! `SPINDLE_TEST_URL` (the memory backend when it is not set).

fn test_url() -> String {
    std::env::var("SPINDLE_TEST_URL").unwrap_or_else(|_| "memory://?tick_ms=5".to_string())
}

spindle_contract::contract_tests!(spindle_contract::Harness::new(|| async {
    spindle::connect(&test_url()).await
}));
