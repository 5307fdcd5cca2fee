//! Maps AWS SDK errors into [`spindle_core::Error`], keeping SDK types out of the API.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use spindle_core::Error;

use crate::BACKEND;

/// Whether an error code means the queue or topic does not exist.
fn is_missing(code: &str) -> bool {
    code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist") || code == "NotFound"
}

fn is_throttle(code: &str) -> bool {
    code.contains("Throttl") || code.contains("RequestThrottled") || code == "OverLimit"
}

/// Converts an SDK error; `what` names the resource for `NotFound`.
pub(crate) fn map_sdk<E, R>(operation: &'static str, what: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => Error::Timeout {
            operation,
            after: crate::error::configured_timeout(),
        },
        SdkError::DispatchFailure(_) => Error::Connection {
            backend: BACKEND,
            message: format!("{operation}: cannot reach the endpoint"),
            source: Some(Box::new(err)),
        },
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("").to_string();
            let message = service.err().message().unwrap_or("").to_string();
            if is_missing(&code) {
                return Error::not_found(what.to_string());
            }
            if code.contains("AccessDenied")
                || code.contains("InvalidClientTokenId")
                || code.contains("SignatureDoesNotMatch")
                || code.contains("UnrecognizedClient")
                || code.contains("AuthorizationError")
            {
                return Error::Authentication {
                    backend: BACKEND,
                    message: format!("{operation}: {code}: {message}"),
                };
            }
            Error::backend(
                BACKEND,
                format!("{operation} ({what}): {code}: {message}"),
                is_throttle(&code)
                    || code.contains("InternalError")
                    || code.contains("ServiceUnavailable"),
                Some(Box::new(err)),
            )
        }
        _ => Error::backend(
            BACKEND,
            format!(
                "{operation} ({what}): {}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
            true,
            Some(Box::new(err)),
        ),
    }
}

/// The error of one failed batch entry.
pub(crate) fn entry_error(
    operation: &'static str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> Error {
    if code.contains("ReceiptHandleIsInvalid") || code.contains("InvalidReceiptHandle") {
        return Error::StaleDelivery(format!("{code}: {}", message.unwrap_or("")));
    }
    Error::backend(
        BACKEND,
        format!(
            "{operation}: entry failed: {code}: {}",
            message.unwrap_or("")
        ),
        !sender_fault,
        None,
    )
}

/// A copy of `err` for each message of a failed batch request (errors are not `Clone`).
pub(crate) fn replicate(err: &Error) -> Error {
    match err {
        Error::Timeout { operation, after } => Error::Timeout {
            operation,
            after: *after,
        },
        Error::Connection { message, .. } => Error::Connection {
            backend: BACKEND,
            message: message.clone(),
            source: None,
        },
        Error::NotFound { what } => Error::not_found(what.clone()),
        Error::Closed(what) => Error::Closed(what),
        Error::Authentication { message, .. } => Error::Authentication {
            backend: BACKEND,
            message: message.clone(),
        },
        Error::StaleDelivery(m) => Error::StaleDelivery(m.clone()),
        other => Error::backend(BACKEND, other.to_string(), other.is_transient(), None),
    }
}

static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10_000);

/// Records the operation timeout of the most recently connected broker, for error messages.
pub(crate) fn set_configured_timeout(t: std::time::Duration) {
    TIMEOUT_MS.store(t.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The operation timeout that errors report (the SDK does not say which bound elapsed).
pub(crate) fn configured_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}
