//! Options of the `sqs://` URL.

use std::time::Duration;

use spindle_core::{Config, Error, Result};

use crate::broker::MAX_VISIBILITY;

/// How topics and groups map onto SQS and SNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A topic is one SQS queue, consumed by one group.
    Queue,
    /// A topic is an SNS topic; each group is an SQS queue subscribed to it.
    FanOut,
}

/// Parsed options. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub(crate) struct Settings {
    pub mode: Mode,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub wait_time_secs: i32,
    pub publish_linger: Duration,
    pub ack_linger: Duration,
    /// Keep unsettled deliveries invisible for up to this long after their receipt, by
    /// extending their visibility in the background (`heartbeat_max_secs`; off when absent).
    pub heartbeat_max: Option<Duration>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id.as_ref().map(|_| "***"))
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("wait_time_secs", &self.wait_time_secs)
            .field("heartbeat_max", &self.heartbeat_max)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub(crate) fn from_config(config: &Config) -> Result<Self> {
        if !crate::SCHEMES.contains(&config.scheme()) {
            return Err(Error::InvalidConfig(format!(
                "sqs: scheme `{}` is not one of {:?}",
                config.scheme(),
                crate::SCHEMES
            )));
        }
        let url = config.url();
        if url.host_str().is_some_and(|h| !h.is_empty()) || url.username() != "" {
            return Err(Error::InvalidConfig(
                "sqs: the URL takes no host or credentials; use `sqs://?region=...&endpoint=...`"
                    .into(),
            ));
        }
        let mut o = config.option_reader("sqs");
        let mode = match o.string("mode").as_deref() {
            None | Some("queue") => Mode::Queue,
            Some("fanout") | Some("fan-out") | Some("sns") => Mode::FanOut,
            Some(other) => {
                return Err(Error::InvalidConfig(format!(
                    "sqs: option `mode` has invalid value `{other}`: expected `queue` or `fanout`"
                )))
            }
        };
        let region = o.string("region");
        let endpoint = o.string("endpoint");
        if let Some(e) = &endpoint {
            url::Url::parse(e).map_err(|err| {
                Error::InvalidConfig(format!("sqs: option `endpoint` is not a URL: {err}"))
            })?;
        }
        let access_key_id = o.string("access_key_id");
        let secret_access_key = o.string("secret_access_key");
        let session_token = o.string("session_token");
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(Error::InvalidConfig(
                "sqs: options `access_key_id` and `secret_access_key` go together".into(),
            ));
        }
        let timeout = o.millis("timeout_ms")?.unwrap_or(Duration::from_secs(10));
        let connect_timeout = o
            .millis("connect_timeout_ms")?
            .unwrap_or(Duration::from_secs(3));
        let wait_time_secs = o.parse::<i32>("wait_time_secs")?.unwrap_or(1);
        if !(0..=20).contains(&wait_time_secs) {
            return Err(Error::InvalidConfig(
                "sqs: option `wait_time_secs` must be 0 to 20".into(),
            ));
        }
        if timeout <= Duration::from_secs(wait_time_secs as u64 + 1) {
            return Err(Error::InvalidConfig(
                "sqs: option `timeout_ms` must exceed the long-poll wait by more than a second"
                    .into(),
            ));
        }
        let publish_linger = o
            .millis("publish_linger_ms")?
            .unwrap_or(Duration::from_millis(5));
        let ack_linger = o
            .millis("ack_linger_ms")?
            .unwrap_or(Duration::from_millis(5));
        if ack_linger > Duration::from_millis(100) {
            return Err(Error::InvalidConfig(
                "sqs: option `ack_linger_ms` is at most 100".into(),
            ));
        }
        let heartbeat_max = match o.parse::<u64>("heartbeat_max_secs")? {
            None | Some(0) => None,
            Some(secs) if Duration::from_secs(secs) > MAX_VISIBILITY => {
                return Err(Error::InvalidConfig(format!(
                    "sqs: option `heartbeat_max_secs` is at most {} (SQS keeps a message \
                     invisible for at most 12 hours after its receipt)",
                    MAX_VISIBILITY.as_secs()
                )))
            }
            Some(secs) => Some(Duration::from_secs(secs)),
        };
        o.finish()?;
        Ok(Settings {
            mode,
            region,
            endpoint,
            access_key_id,
            secret_access_key,
            session_token,
            timeout,
            connect_timeout,
            wait_time_secs,
            publish_linger,
            ack_linger,
            heartbeat_max,
        })
    }
}
