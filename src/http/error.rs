//! `ApiError`: every error the HTTP front answers, and the one place that
//! picks its status and code (contract: "Errors").
//!
//! Every non-2xx answer has the body `{"error": {"code", "message"}}`; a
//! `503` also carries `Retry-After`. Engine and domain errors convert here,
//! nowhere else.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::domain::DomainError;
use crate::engine::EngineError;
use crate::journal::JournalError;
use crate::limits::{BODY_BYTES_MAX, RETRY_AFTER_SECONDS};

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// `400 invalid_request`.
    #[error("{0}")]
    Invalid(String),
    /// `401 unauthorized`.
    #[error("{0}")]
    Unauthorized(String),
    /// `403 forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// `404 not_found`.
    #[error("{0}")]
    NotFound(String),
    /// `405 method_not_allowed`: a known path, a method it does not take;
    /// `allow` is the `Allow` header (RFC 9110), the methods it takes.
    #[error("{message}")]
    MethodNotAllowed {
        /// What was asked.
        message: String,
        /// The methods the path takes, as the `Allow` header lists them.
        allow: String,
    },
    /// `409 out_of_stock`.
    #[error("{0}")]
    OutOfStock(String),
    /// `409 limit_exceeded`.
    #[error("{0}")]
    LimitExceeded(String),
    /// `409 sale_not_started`.
    #[error("{0}")]
    SaleNotStarted(String),
    /// `409 sale_ended`.
    #[error("{0}")]
    SaleEnded(String),
    /// `409 invalid_transition`.
    #[error("{0}")]
    InvalidTransition(String),
    /// `409 already_exists`.
    #[error("{0}")]
    AlreadyExists(String),
    /// `409 payment_mismatch`.
    #[error("{0}")]
    PaymentMismatch(String),
    /// `429 rate_limited`, with `Retry-After` in whole seconds (at least 1).
    #[error("too many requests; retry in {0} s")]
    RateLimited(u64),
    /// `413 payload_too_large`.
    #[error("the body is over {BODY_BYTES_MAX} bytes")]
    PayloadTooLarge,
    /// `422 idempotency_conflict`.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyConflict,
    /// `503 overloaded`.
    #[error("{0}")]
    Overloaded(String),
    /// `503 storage_unavailable`.
    #[error("{0}")]
    StorageUnavailable(String),
    /// `503 partition_unavailable` (cluster mode): the partition that
    /// holds the SKU or order is between owners.
    #[error("{0}")]
    PartitionUnavailable(String),
}

impl ApiError {
    /// The status and the contract's code: one match, every variant.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::OutOfStock(_) => (StatusCode::CONFLICT, "out_of_stock"),
            ApiError::LimitExceeded(_) => (StatusCode::CONFLICT, "limit_exceeded"),
            ApiError::SaleNotStarted(_) => (StatusCode::CONFLICT, "sale_not_started"),
            ApiError::SaleEnded(_) => (StatusCode::CONFLICT, "sale_ended"),
            ApiError::InvalidTransition(_) => (StatusCode::CONFLICT, "invalid_transition"),
            ApiError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            ApiError::PaymentMismatch(_) => (StatusCode::CONFLICT, "payment_mismatch"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::IdempotencyConflict => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_conflict")
            }
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::StorageUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            ApiError::PartitionUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable")
            }
        }
    }

    /// A `400` with a message.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::Invalid(message.into())
    }

    /// The standard `503 overloaded`.
    pub fn overloaded() -> ApiError {
        ApiError::Overloaded("the server is overloaded; retry shortly".into())
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> ApiError {
        let message = error.to_string();
        match error {
            DomainError::Invalid(_) | DomainError::Overflow { .. } => ApiError::Invalid(message),
            DomainError::OutOfStock { .. } => ApiError::OutOfStock(message),
            DomainError::LimitExceeded { .. } => ApiError::LimitExceeded(message),
            DomainError::SaleNotStarted { .. } => ApiError::SaleNotStarted(message),
            DomainError::SaleEnded { .. } => ApiError::SaleEnded(message),
            DomainError::InvalidTransition { .. } => ApiError::InvalidTransition(message),
            DomainError::PaymentMismatch { .. } => ApiError::PaymentMismatch(message),
            DomainError::Inconsistent(_) => {
                // Never caused by a request; logged where it happens.
                ApiError::StorageUnavailable("the server hit an internal inconsistency".into())
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Domain(domain) => domain.into(),
            EngineError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            EngineError::AlreadyExists { .. } => ApiError::AlreadyExists(error.to_string()),
            EngineError::Forbidden(_) => ApiError::Forbidden(error.to_string()),
            EngineError::Overloaded => ApiError::overloaded(),
            EngineError::Storage(journal) => journal.into(),
            EngineError::Spawn { .. } | EngineError::Task { .. } | EngineError::IdsExhausted => {
                ApiError::StorageUnavailable(error.to_string())
            }
            EngineError::Stopped => {
                ApiError::Overloaded("the server is restarting its engine; retry shortly".into())
            }
        }
    }
}

/// Every journal failure's answer, by kind: a full queue sheds load
/// (`503 overloaded`); every failure to store or read (I/O of any kind,
/// sled, damage, a stopped or closed writer, a remote store) is `503
/// storage_unavailable`. The match names every variant, so a new kind of
/// failure gets its answer chosen here.
impl From<JournalError> for ApiError {
    fn from(error: JournalError) -> ApiError {
        match error {
            JournalError::Full => ApiError::overloaded(),
            JournalError::Io { .. }
            | JournalError::Spawn { .. }
            | JournalError::Sled { .. }
            | JournalError::Open { .. }
            | JournalError::Locked { .. }
            | JournalError::Codec { .. }
            | JournalError::BadKey { .. }
            | JournalError::NotDurable
            | JournalError::Stopped { .. }
            | JournalError::Closed
            | JournalError::WriterStopped
            | JournalError::SeqExhausted
            | JournalError::NoDataDir(_)
            | JournalError::NoHistory
            | JournalError::DurableState(_)
            | JournalError::ArchiveOpening
            | JournalError::Remote { .. } => {
                ApiError::StorageUnavailable(EngineError::Storage(error).to_string())
            }
        }
    }
}

impl ApiError {
    /// The message, moved out where the variant holds one.
    fn into_message(self) -> String {
        match self {
            ApiError::Invalid(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::OutOfStock(m)
            | ApiError::LimitExceeded(m)
            | ApiError::SaleNotStarted(m)
            | ApiError::SaleEnded(m)
            | ApiError::InvalidTransition(m)
            | ApiError::AlreadyExists(m)
            | ApiError::PaymentMismatch(m)
            | ApiError::Overloaded(m)
            | ApiError::StorageUnavailable(m)
            | ApiError::PartitionUnavailable(m)
            | ApiError::MethodNotAllowed { message: m, .. } => m,
            other @ (ApiError::PayloadTooLarge
            | ApiError::IdempotencyConflict
            | ApiError::RateLimited(_)) => other.to_string(),
        }
    }
}

/// The error body of every non-2xx answer (contract: "Errors").
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

/// The fields of [`ErrorBody`].
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ErrorFields)]
pub(crate) struct ErrorFields<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let allow = match &self {
            ApiError::MethodNotAllowed { allow, .. } => HeaderValue::from_str(allow).ok(),
            _ => None,
        };
        let retry_after_s = match self {
            ApiError::RateLimited(seconds) => Some(seconds.max(1)),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorFields {
                code,
                message: self.into_message(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        if let Some(seconds) = retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SkuId;

    #[test]
    fn each_error_has_the_contract_status_and_code() {
        let sku = SkuId::parse("tee").expect("valid");
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (DomainError::invalid("x").into(), 400, "invalid_request"),
            (
                DomainError::Overflow { what: "x" }.into(),
                400,
                "invalid_request",
            ),
            (DomainError::OutOfStock { sku }.into(), 409, "out_of_stock"),
            (
                DomainError::LimitExceeded { sku, limit: 2 }.into(),
                409,
                "limit_exceeded",
            ),
            (
                DomainError::SaleNotStarted {
                    sku,
                    starts_at_ms: 1,
                }
                .into(),
                409,
                "sale_not_started",
            ),
            (
                DomainError::SaleEnded { sku, ends_at_ms: 1 }.into(),
                409,
                "sale_ended",
            ),
            (ApiError::RateLimited(3), 429, "rate_limited"),
            (EngineError::Overloaded.into(), 503, "overloaded"),
            (
                EngineError::Storage(JournalError::NotDurable).into(),
                503,
                "storage_unavailable",
            ),
            (EngineError::IdsExhausted.into(), 503, "storage_unavailable"),
            (EngineError::sku_not_found(sku).into(), 404, "not_found"),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (ApiError::IdempotencyConflict, 422, "idempotency_conflict"),
            (
                ApiError::MethodNotAllowed {
                    message: "x".into(),
                    allow: "GET, HEAD".into(),
                },
                405,
                "method_not_allowed",
            ),
        ];
        for (error, status, code) in cases {
            let (s, c) = error.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{error:?}");
        }
        let out_of_stock: ApiError = DomainError::OutOfStock { sku }.into();
        assert!(
            out_of_stock.to_string().contains("tee"),
            "the message names the SKU"
        );
        let wrong = ApiError::MethodNotAllowed {
            message: "x".into(),
            allow: "GET, HEAD".into(),
        }
        .into_response();
        assert_eq!(
            wrong.headers().get(header::ALLOW),
            Some(&HeaderValue::from_static("GET, HEAD"))
        );
        let shed = ApiError::overloaded().into_response();
        assert_eq!(
            shed.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(1u64))
        );
    }

    /// One of each kind of journal failure, as the engine hands it on.
    fn journal_failures() -> Vec<JournalError> {
        use std::io::{Error, ErrorKind};
        use std::path::PathBuf;
        use std::sync::Arc;
        let io = |kind: ErrorKind| {
            JournalError::io(
                "cannot fsync",
                "/data/journal/db".as_ref(),
                Error::from(kind),
            )
        };
        vec![
            io(ErrorKind::StorageFull),
            io(ErrorKind::PermissionDenied),
            io(ErrorKind::Other),
            JournalError::Spawn {
                what: "the journal thread",
                source: Arc::new(Error::from(ErrorKind::OutOfMemory)),
            },
            JournalError::sled(
                "sled flush",
                sled::Error::Io(Error::from(ErrorKind::StorageFull)),
            ),
            JournalError::Open {
                path: PathBuf::from("/data/journal"),
                source: Arc::new(sled::Error::Unsupported("conf".into())),
            },
            JournalError::Locked {
                path: PathBuf::from("/data/journal"),
                source: Arc::new(sled::Error::Io(Error::other("locked"))),
            },
            JournalError::codec(
                "archive: order 7 is damaged",
                crate::journal::codec::CodecError::BadChecksum,
            ),
            JournalError::BadKey {
                what: "archive: a user index key",
                len: 3,
                expected: 8,
            },
            JournalError::NotDurable,
            JournalError::stopped(io(ErrorKind::StorageFull)),
            JournalError::Closed,
            JournalError::WriterStopped,
            JournalError::SeqExhausted,
            JournalError::NoDataDir(PathBuf::from("/")),
            JournalError::NoHistory,
            JournalError::DurableState(Arc::new(crate::journal::RecoveryError::Corrupt {
                seq: 3,
                why: "x".into(),
            })),
            JournalError::ArchiveOpening,
            JournalError::remote("the cluster journal", "no answer in time"),
        ]
    }

    #[test]
    fn every_journal_failure_is_storage_unavailable_and_a_full_queue_sheds() {
        let full: ApiError = EngineError::from(JournalError::Full).into();
        assert_eq!(
            full.status_and_code(),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        let full_direct: ApiError = JournalError::Full.into();
        assert_eq!(full_direct, full, "the same answer either way");
        for failure in journal_failures() {
            let through_engine: ApiError = EngineError::from(failure.clone()).into();
            let direct: ApiError = failure.clone().into();
            for error in [through_engine, direct] {
                assert_eq!(
                    error.status_and_code(),
                    (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
                    "{failure:?}"
                );
                assert!(
                    error.to_string().starts_with("storage unavailable: "),
                    "the message reads as before: {error}"
                );
                let response = error.into_response();
                assert_eq!(
                    response.headers().get(header::RETRY_AFTER),
                    Some(&HeaderValue::from(RETRY_AFTER_SECONDS)),
                    "{failure:?}"
                );
            }
        }
    }

    #[test]
    fn the_engine_keeps_the_journal_failure_and_its_io_kind() {
        use std::error::Error as _;
        let failure = JournalError::io(
            "cannot fsync",
            "/data/journal/db".as_ref(),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        let engine = EngineError::from(failure);
        let source = engine.source().expect("the journal's error is the source");
        let journal = source
            .downcast_ref::<JournalError>()
            .expect("a JournalError");
        assert_eq!(journal.io_kind(), Some(std::io::ErrorKind::StorageFull));
        assert_eq!(
            crate::journal::io_kind(&engine),
            Some(std::io::ErrorKind::StorageFull)
        );
    }

    #[test]
    fn the_overloaded_answer_carries_retry_after() {
        let shed = ApiError::overloaded().into_response();
        assert_eq!(
            shed.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(1u64))
        );
    }
}
