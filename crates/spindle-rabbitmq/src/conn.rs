//! The connection manager: one AMQP connection, reconnected with backoff, and one publisher
//! channel with confirms on; plus the mapping of lapin errors into Spindle's error type.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use spindle_core::{Config, Error, Result};
use tokio::sync::Mutex;

use crate::BACKEND;

struct Live {
    connection: Connection,
    publisher: Option<Channel>,
}

/// Owns the connection. Every call that needs the broker goes through here, so a lost
/// connection is replaced by the next caller (with backoff), never by a background loop.
pub(crate) struct Conn {
    url: String,
    redacted: String,
    vhost: String,
    connect_timeout: Duration,
    operation_timeout: Duration,
    live: Mutex<Option<Live>>,
}

impl Conn {
    pub(crate) fn new(
        config: &Config,
        connect_timeout: Duration,
        operation_timeout: Duration,
    ) -> Self {
        let path = config.url().path();
        let vhost = match path.strip_prefix('/') {
            None | Some("") => "/".to_string(),
            Some(v) => percent_decode(v),
        };
        Conn {
            url: config.url().to_string(),
            redacted: config.redacted_url(),
            vhost,
            connect_timeout,
            operation_timeout,
            live: Mutex::new(None),
        }
    }

    /// Connects once, within the connect timeout, with a typed error on failure.
    pub(crate) async fn connect_once(&self) -> Result<Connection> {
        let properties = ConnectionProperties::default()
            .with_connection_name("spindle".into())
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect(&self.url, properties),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.connect_error(e)),
            Err(_) => Err(Error::Connection {
                backend: BACKEND,
                message: format!(
                    "no connection to {} within {:?} (broker down, or it never answered the \
                     handshake: check the credentials and the vhost `{}`)",
                    self.redacted, self.connect_timeout, self.vhost
                ),
                source: None,
            }),
        }
    }

    fn connect_error(&self, e: lapin::Error) -> Error {
        if let ErrorKind::ProtocolError(amqp) = e.kind() {
            let text = amqp.get_message().as_str().to_string();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                    if text.contains("vhost") && text.contains("not found") =>
                {
                    return Error::not_found(format!("vhost `{}` ({text})", self.vhost));
                }
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                    return Error::Authentication {
                        backend: BACKEND,
                        message: format!("{} refused the login: {text}", self.redacted),
                    };
                }
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                    return Error::Authentication {
                        backend: BACKEND,
                        message: format!(
                            "{} refused access to vhost `{}`: {text}",
                            self.redacted, self.vhost
                        ),
                    };
                }
                _ => {}
            }
        }
        Error::Connection {
            backend: BACKEND,
            message: format!(
                "cannot connect to {}: {}",
                self.redacted,
                scrub(&e.to_string())
            ),
            source: None,
        }
    }

    /// Installs an already-open connection (the first one, made by `connect`).
    pub(crate) async fn install(&self, connection: Connection) {
        *self.live.lock().await = Some(Live {
            connection,
            publisher: None,
        });
    }

    async fn ensure_connected<'a>(&self, guard: &'a mut Option<Live>) -> Result<&'a mut Live> {
        let healthy = guard
            .as_ref()
            .is_some_and(|l| l.connection.status().connected());
        if !healthy {
            if let Some(old) = guard.take() {
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    old.connection.close(200, "reconnecting"),
                )
                .await;
            }
            let deadline = tokio::time::Instant::now() + self.operation_timeout;
            let mut backoff = Duration::from_millis(100);
            let connection = loop {
                match self.connect_once().await {
                    Ok(c) => break c,
                    Err(e @ (Error::Authentication { .. } | Error::NotFound { .. })) => {
                        return Err(e)
                    }
                    Err(e) => {
                        if tokio::time::Instant::now() + backoff > deadline {
                            return Err(e);
                        }
                        tracing::warn!(error = %e, "rabbitmq: reconnecting in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            };
            tracing::info!(url = %self.redacted, "rabbitmq: connected");
            *guard = Some(Live {
                connection,
                publisher: None,
            });
        }
        Ok(guard.as_mut().expect("connection installed above"))
    }

    /// The shared publisher channel (confirms on), reconnecting if needed.
    pub(crate) async fn publisher(&self) -> Result<Channel> {
        self.bounded("get the publisher channel", self.publisher_inner())
            .await
    }

    async fn publisher_inner(&self) -> Result<Channel> {
        let mut guard = self.live.lock().await;
        let live = self.ensure_connected(&mut guard).await?;
        if let Some(ch) = &live.publisher {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self
            .op("open a channel", live.connection.create_channel())
            .await?;
        self.op(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        live.publisher = Some(ch.clone());
        Ok(ch)
    }

    /// A fresh channel (for consumers and administration), reconnecting if needed. It closes
    /// by itself when its last handle is dropped.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        self.bounded("open a channel", self.channel_inner()).await
    }

    async fn channel_inner(&self) -> Result<Channel> {
        let mut guard = self.live.lock().await;
        let live = self.ensure_connected(&mut guard).await?;
        self.op("open a channel", live.connection.create_channel())
            .await
    }

    /// Bounds a whole step (waiting for the connection lock and reconnecting included): a
    /// little over the operation timeout, so a reconnect loop can report its own error first.
    async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let bound = self.operation_timeout + self.connect_timeout;
        match tokio::time::timeout(bound, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation: what,
                after: bound,
            }),
        }
    }

    /// Runs one broker call within the operation timeout.
    pub(crate) async fn op<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.operation_timeout, fut).await {
            Ok(r) => r.map_err(|e| map_error(&e, what)),
            Err(_) => Err(Error::Timeout {
                operation: what,
                after: self.operation_timeout,
            }),
        }
    }

    pub(crate) fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// Closes the connection. Idempotent.
    pub(crate) async fn close(&self) {
        let live = self.live.lock().await.take();
        if let Some(live) = live {
            let _ = tokio::time::timeout(
                self.operation_timeout,
                live.connection.close(200, "spindle shutdown"),
            )
            .await;
        }
    }
}

/// Maps a lapin error from operation `what` into Spindle's error.
pub(crate) fn map_error(e: &lapin::Error, what: &str) -> Error {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().as_str().to_string();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Error::not_found(text),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Error::Authentication {
                    backend: BACKEND,
                    message: format!("{what}: {text}"),
                },
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Error::backend(
                    BACKEND,
                    format!("{what}: precondition failed: {text}"),
                    false,
                    None,
                ),
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => Error::Connection {
                    backend: BACKEND,
                    message: format!("{what}: {text}"),
                    source: None,
                },
                _ => Error::backend(BACKEND, format!("{what}: {text}"), true, None),
            }
        }
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError => Error::Connection {
            backend: BACKEND,
            message: format!("{what}: {}", scrub(&e.to_string())),
            source: None,
        },
        _ => Error::backend(
            BACKEND,
            format!("{what}: {}", scrub(&e.to_string())),
            false,
            None,
        ),
    }
}

/// Removes anything that looks like `user:password@` from a message, to be safe.
fn scrub(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://***@{}", &text[..start], &text[at + 1..])
        }
        _ => text.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
