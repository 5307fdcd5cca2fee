//! The whole contract suite against the real RabbitMQ on 127.0.0.1:5672.
//!
//! The restart case stops the broker, which would break the cases running beside it; so the
//! restart hook first closes a gate that new connections wait at, waits until its own broker is
//! the only one open in this process, restarts, and the gate opens again once that case's
//! broker is shut down too.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use spindle_contract::{Harness, Timing};
use spindle_core::{Config, DynBroker};

#[derive(Default)]
struct Gate {
    restarting: bool,
    connecting: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    restarting: false,
    connecting: 0,
});

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connect() -> spindle_core::Result<DynBroker> {
    loop {
        {
            let mut g = gate();
            if g.restarting && spindle_rabbitmq::open_brokers() == 0 && g.connecting == 0 {
                g.restarting = false;
            }
            if !g.restarting {
                g.connecting += 1;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = Config::parse(&common::url()).expect("the test URL parses");
    let result = spindle_rabbitmq::connect(&config).await;
    gate().connecting -= 1;
    Ok(Arc::new(result?) as DynBroker)
}

async fn restart() {
    gate().restarting = true;
    let until = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        {
            let g = gate();
            if g.connecting == 0 && spindle_rabbitmq::open_brokers() <= 1 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "other cases did not finish in time for the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::restart_rabbitmq().await;
}

fn harness() -> Harness {
    Harness::new(connect)
        .with_cleanup()
        .with_restart(restart)
        .requires_broker("RabbitMQ", common::ADDRESS)
        .with_timing(Timing {
            ack_timeout: Duration::from_millis(400),
            delay: Duration::from_millis(300),
            receive_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            case_timeout: Duration::from_secs(180),
        })
}

spindle_contract::contract_tests!(harness());
