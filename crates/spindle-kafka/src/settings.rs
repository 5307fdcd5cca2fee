//! URL and options of the Kafka backend.

use std::time::Duration;

use rdkafka::ClientConfig;
use spindle_core::{Config, Error, Result};

use crate::BACKEND;

/// Settings read from a `kafka://` URL and its options. `Debug` hides the SASL password.
#[derive(Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port`, the URL's authority first.
    pub bootstrap: Vec<String>,
    /// Partitions of topics this adapter creates (option `partitions`, default 3).
    pub partitions: i32,
    /// Replication factor of topics this adapter creates (option `replication_factor`, default 1).
    pub replication_factor: i32,
    /// Producer linger (option `linger_ms`, default 5).
    pub linger: Duration,
    /// Largest payload accepted (option `max_payload_bytes`, default 1 MiB).
    pub max_payload_bytes: usize,
    /// Bound on each network call: metadata, admin, commits (option `request_timeout_ms`,
    /// default 10 000).
    pub request_timeout: Duration,
    /// How long `connect` waits for the cluster to answer (option `connect_timeout_ms`,
    /// default 10 000).
    pub connect_timeout: Duration,
    /// How long a publish may take, retries included, before it fails (option
    /// `message_timeout_ms`, default 30 000).
    pub message_timeout: Duration,
    /// Consumer group session timeout (option `session_timeout_ms`, default 10 000).
    pub session_timeout: Duration,
    /// How long `subscribe` waits for its first partition assignment (option
    /// `assign_timeout_ms`, default 30 000).
    pub assign_timeout: Duration,
    /// Longest nack delay (option `max_nack_delay_ms`, default 15 minutes). Waiting retries are
    /// held in the consumer's memory and pin the retry partition's commit point.
    pub max_nack_delay: Duration,
    /// Suffix of the per-group retry topic `<topic>.<group><retry_suffix>` (option
    /// `retry_suffix`, default `.retry`).
    pub retry_suffix: String,
    /// Suffix of the per-group dead-letter topic (option `dlq_suffix`, default `.dlq`).
    pub dlq_suffix: String,
    /// Prefix of Kafka group ids (option `group_prefix`, default empty): the Kafka group of
    /// Spindle group `g` on topic `t` is `<group_prefix><t>.<g>`.
    pub group_prefix: String,
    /// Idempotent producer (option `idempotence`, default true).
    pub idempotence: bool,
    /// `security.protocol`: plaintext, ssl, sasl_plaintext, sasl_ssl (option `security_protocol`).
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`, e.g. PLAIN, SCRAM-SHA-256 (option `sasl_mechanism`).
    pub sasl_mechanism: Option<String>,
    /// SASL user: option `sasl_username` or the URL's user.
    pub sasl_username: Option<String>,
    /// SASL password: option `sasl_password` or the URL's password.
    pub sasl_password: Option<String>,
    /// CA file for TLS (option `ssl_ca_location`).
    pub ssl_ca_location: Option<String>,
    /// Client certificate for TLS (option `ssl_certificate_location`).
    pub ssl_certificate_location: Option<String>,
    /// Client key for TLS (option `ssl_key_location`).
    pub ssl_key_location: Option<String>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap", &self.bootstrap)
            .field("partitions", &self.partitions)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl KafkaSettings {
    /// Reads a `kafka://host:port?...` config, rejecting unknown options.
    pub fn from_config(config: &Config) -> Result<Self> {
        if config.scheme() != "kafka" {
            return Err(Error::InvalidConfig(format!(
                "{BACKEND}: scheme must be `kafka`, not `{}`",
                config.scheme()
            )));
        }
        let url = config.url();
        let mut bootstrap = Vec::new();
        if let Some(host) = url.host_str() {
            if !host.is_empty() {
                bootstrap.push(format!("{host}:{}", url.port().unwrap_or(9092)));
            }
        }
        let mut r = config.option_reader(BACKEND);
        if let Some(hosts) = r.string("hosts") {
            bootstrap.extend(
                hosts
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(|h| {
                        if h.contains(':') {
                            h.to_string()
                        } else {
                            format!("{h}:9092")
                        }
                    }),
            );
        }
        if bootstrap.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "{BACKEND}: no bootstrap server: use kafka://host:port or the `hosts` option"
            )));
        }
        let ms = |d: Option<Duration>, default: u64| d.unwrap_or(Duration::from_millis(default));
        let user = (!url.username().is_empty()).then(|| url.username().to_string());
        let settings = KafkaSettings {
            bootstrap,
            partitions: r.parse("partitions")?.unwrap_or(3),
            replication_factor: r.parse("replication_factor")?.unwrap_or(1),
            linger: ms(r.millis("linger_ms")?, 5),
            max_payload_bytes: r.parse("max_payload_bytes")?.unwrap_or(1024 * 1024),
            request_timeout: ms(r.millis("request_timeout_ms")?, 10_000),
            connect_timeout: ms(r.millis("connect_timeout_ms")?, 10_000),
            message_timeout: ms(r.millis("message_timeout_ms")?, 30_000),
            session_timeout: ms(r.millis("session_timeout_ms")?, 10_000),
            assign_timeout: ms(r.millis("assign_timeout_ms")?, 30_000),
            max_nack_delay: ms(r.millis("max_nack_delay_ms")?, 15 * 60 * 1000),
            retry_suffix: r.string("retry_suffix").unwrap_or_else(|| ".retry".into()),
            dlq_suffix: r.string("dlq_suffix").unwrap_or_else(|| ".dlq".into()),
            group_prefix: r.string("group_prefix").unwrap_or_default(),
            idempotence: r.parse("idempotence")?.unwrap_or(true),
            security_protocol: r.string("security_protocol"),
            sasl_mechanism: r.string("sasl_mechanism"),
            sasl_username: r.string("sasl_username").or(user),
            sasl_password: r
                .string("sasl_password")
                .or_else(|| url.password().map(str::to_string)),
            ssl_ca_location: r.string("ssl_ca_location"),
            ssl_certificate_location: r.string("ssl_certificate_location"),
            ssl_key_location: r.string("ssl_key_location"),
        };
        r.finish()?;
        if settings.partitions < 1 {
            return Err(Error::InvalidConfig(format!(
                "{BACKEND}: option `partitions` must be at least 1"
            )));
        }
        if settings.max_payload_bytes == 0 || settings.max_payload_bytes > 100 * 1024 * 1024 {
            return Err(Error::InvalidConfig(format!(
                "{BACKEND}: option `max_payload_bytes` must be between 1 and 100 MiB"
            )));
        }
        if settings.retry_suffix.is_empty()
            || settings.dlq_suffix.is_empty()
            || settings.retry_suffix == settings.dlq_suffix
        {
            return Err(Error::InvalidConfig(format!(
                "{BACKEND}: options `retry_suffix` and `dlq_suffix` must be non-empty and differ"
            )));
        }
        Ok(settings)
    }

    /// Connection and security settings shared by every client.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap.join(","))
            .set(
                "socket.timeout.ms",
                self.request_timeout.as_millis().max(10).to_string(),
            )
            .set("allow.auto.create.topics", "false")
            .set("log_level", "3");
        if let Some(p) = &self.security_protocol {
            c.set("security.protocol", p);
        } else if self.sasl_username.is_some() {
            c.set("security.protocol", "sasl_plaintext");
        }
        if let Some(m) = &self.sasl_mechanism {
            c.set("sasl.mechanism", m);
        } else if self.sasl_username.is_some() {
            c.set("sasl.mechanism", "PLAIN");
        }
        if let Some(u) = &self.sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &self.sasl_password {
            c.set("sasl.password", p);
        }
        if let Some(v) = &self.ssl_ca_location {
            c.set("ssl.ca.location", v);
        }
        if let Some(v) = &self.ssl_certificate_location {
            c.set("ssl.certificate.location", v);
        }
        if let Some(v) = &self.ssl_key_location {
            c.set("ssl.key.location", v);
        }
        c
    }

    /// The producer's configuration: acks=all, idempotence, linger, bounded delivery time.
    /// Public so raw rdkafka clients (benchmarks, tools) can use exactly the same settings.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("acks", "all")
            .set("enable.idempotence", self.idempotence.to_string())
            .set("linger.ms", self.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().max(1).to_string(),
            )
            .set(
                "message.max.bytes",
                (self.max_payload_bytes + 512 * 1024).to_string(),
            )
            .set("partitioner", "murmur2_random");
        c
    }

    /// A consumer's configuration: manual commits of explicit offsets, earliest reset.
    /// Public so raw rdkafka clients can use exactly the same settings.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut c = self.client_config();
        c.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100")
            .set(
                "max.partition.fetch.bytes",
                (self.max_payload_bytes * 2 + 1024 * 1024).to_string(),
            );
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_options() {
        let c = Config::parse("kafka://a:1?hosts=b:2,c&partitions=6&linger_ms=2").unwrap();
        let s = KafkaSettings::from_config(&c).unwrap();
        assert_eq!(s.bootstrap, vec!["a:1", "b:2", "c:9092"]);
        assert_eq!(s.partitions, 6);
        assert_eq!(s.linger, Duration::from_millis(2));
    }

    #[test]
    fn rejects_unknown_options_and_hides_password() {
        let c = Config::parse("kafka://a:1?bogus=1").unwrap();
        let err = KafkaSettings::from_config(&c).unwrap_err().to_string();
        assert!(err.contains("bogus") && err.contains("partitions"), "{err}");
        let c = Config::parse("kafka://u:s3cret@a:1?security_protocol=sasl_ssl").unwrap();
        let s = KafkaSettings::from_config(&c).unwrap();
        assert_eq!(s.sasl_username.as_deref(), Some("u"));
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
