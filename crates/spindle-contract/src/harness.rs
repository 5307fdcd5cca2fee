//! What a case needs: a fresh broker, unique names, timing, and an optional restart hook.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use spindle_core::{DynBroker, Result};

type Factory = Arc<dyn Fn() -> BoxFuture<'static, Result<DynBroker>> + Send + Sync>;
type Restart = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The delays the time-based cases use. Short by default so the suite stays fast; a broker
/// with coarser timers (an SQS visibility timeout counts in seconds) passes longer ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Ack timeout given to subscriptions in cases that wait for one to pass.
    pub ack_timeout: Duration,
    /// Delay used for delayed publish and delayed nack.
    pub delay: Duration,
    /// Longest wait for a delivery that must come.
    pub receive_timeout: Duration,
    /// How long to watch for a delivery that must not come.
    pub quiet: Duration,
    /// Bound on a whole case, so a hang fails instead of stalling the run.
    pub case_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ack_timeout: Duration::from_millis(400),
            delay: Duration::from_millis(300),
            receive_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            case_timeout: Duration::from_secs(120),
        }
    }
}

/// How the suite reaches one backend.
#[derive(Clone)]
pub struct Harness {
    factory: Factory,
    restart: Option<Restart>,
    /// The delays cases use.
    pub timing: Timing,
    case: &'static str,
    run_id: String,
    requires: Option<(String, String)>,
    stress_messages: usize,
    cleanup: bool,
    /// The names a case used, for cleaning up after it.
    named: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Harness {
    /// A harness whose `factory` connects a fresh broker for each case.
    pub fn new<F, Fut>(factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<DynBroker>> + Send + 'static,
    {
        Harness {
            factory: Arc::new(move || Box::pin(factory())),
            restart: None,
            timing: Timing::default(),
            case: "case",
            requires: None,
            stress_messages: Self::DEFAULT_STRESS_MESSAGES,
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            cleanup: false,
            named: Arc::default(),
        }
    }

    /// After a case passes, deletes every group and topic it could have made from the names it
    /// used (through a fresh broker: cases shut theirs down), so a long-lived broker does not
    /// collect a run's worth of durable topics and queues. Failures are ignored; a failed case
    /// keeps its state for inspection. Leave it off for a backend where deleting one topic
    /// disturbs others.
    pub fn with_cleanup(mut self) -> Self {
        self.cleanup = true;
        self
    }

    /// Messages the stress case sends, unless changed with
    /// [`with_stress_messages`](Harness::with_stress_messages).
    pub const DEFAULT_STRESS_MESSAGES: usize = 10_000;

    /// Sends `n` messages in the stress case instead of 10,000: for an emulator whose cost
    /// grows with queue length. Say so where the results are reported.
    pub fn with_stress_messages(mut self, n: usize) -> Self {
        self.stress_messages = n;
        self
    }

    /// Messages the stress case sends.
    pub fn stress_messages(&self) -> usize {
        self.stress_messages
    }

    /// Uses these delays.
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Names the broker address (`host:port`) the cases need. When nothing listens there, a
    /// case fails under CI (`CI=true`) and, elsewhere, is skipped with a loud message.
    pub fn requires_broker(mut self, what: impl Into<String>, address: impl Into<String>) -> Self {
        self.requires = Some((what.into(), address.into()));
        self
    }

    /// Registers a hook that restarts the broker process (stop, then start, then return once
    /// it accepts connections again). The restart case runs only with one.
    pub fn with_restart<F, Fut>(mut self, restart: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.restart = Some(Arc::new(move || Box::pin(restart())));
        self
    }

    /// Connects a fresh broker; a failure fails the case with the error.
    pub async fn broker(&self) -> DynBroker {
        match (self.factory)().await {
            Ok(b) => b,
            Err(e) => panic!("{}: cannot connect the backend: {e}", self.case),
        }
    }

    /// A name unique to this case and run, safe for every backend (letters, digits, `-`).
    pub fn name(&self, what: &str) -> String {
        let name = format!(
            "sp-{}-{}-{}",
            self.case.replace('_', "-"),
            what,
            self.run_id
        );
        if self.cleanup {
            self.named
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name.clone());
        }
        name
    }

    /// Deletes every (topic, group) pair and every topic the case's names could form; errors
    /// are ignored (most pairs never existed).
    async fn clean_up(&self) {
        let names = std::mem::take(&mut *self.named.lock().unwrap_or_else(|e| e.into_inner()));
        let bounded = Duration::from_secs(5);
        let Ok(Ok(broker)) = tokio::time::timeout(bounded, (self.factory)()).await else {
            return;
        };
        for topic in &names {
            for group in names.iter().filter(|g| *g != topic) {
                let _ = tokio::time::timeout(bounded, broker.delete_group(topic, group)).await;
            }
            let _ = tokio::time::timeout(bounded, broker.delete_topic(topic)).await;
        }
        let _ = tokio::time::timeout(bounded, broker.shutdown()).await;
    }

    /// Whether a restart hook was given.
    pub fn can_restart(&self) -> bool {
        self.restart.is_some()
    }

    /// Restarts the broker with the registered hook.
    pub async fn restart(&self) {
        let hook = self.restart.as_ref().expect("no restart hook registered");
        hook().await
    }

    /// Runs one case within [`Timing::case_timeout`]. Called by [`contract_tests!`](crate::contract_tests).
    pub async fn run<F>(mut self, case: &'static str, body: F)
    where
        F: for<'a> FnOnce(&'a Harness) -> BoxFuture<'a, ()>,
    {
        self.case = case;
        if let Some((what, address)) = &self.requires {
            let probe = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(address.as_str()),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                if crate::running_in_ci() {
                    panic!("{case}: {what} is not reachable at {address}, and CI=true requires it");
                }
                eprintln!(
                    "SKIPPED {case}: {what} is not reachable at {address} (this fails under CI=true)"
                );
                return;
            }
        }
        // Each case records its own names.
        self.named = Arc::default();
        let limit = self.timing.case_timeout;
        if tokio::time::timeout(limit, body(&self)).await.is_err() {
            panic!("{case}: did not finish within {limit:?}");
        }
        if self.cleanup {
            self.clean_up().await;
        }
    }
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("timing", &self.timing)
            .field("case", &self.case)
            .field("can_restart", &self.can_restart())
            .finish()
    }
}
