//! The one list of error kinds every twokey service speaks: each service's
//! error says its [`ErrorKind`], and each kind maps once to a gRPC code and
//! once to an HTTP status, so the same failure maps the same way everywhere
//! (quickwit-proto's `ServiceErrorCode` is the model).

use http::StatusCode;
use tonic::Code;

/// What kind of failure an error is, as a caller needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller has no certificate or no usable identity.
    Unauthenticated,
    /// The caller lacks the role, or a rule (separation of duties, single
    /// use, a bad signature on a grant) forbids the action.
    PermissionDenied,
    /// A field of the call is missing or malformed.
    InvalidArgument,
    /// No such account, request or entry.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The state does not allow the action now.
    FailedPrecondition,
    /// A position or size lies outside what exists.
    OutOfRange,
    /// A size or rate limit was hit.
    ResourceExhausted,
    /// The call (or the one it made to another service) ran out of time;
    /// whether the other side finished is not known.
    DeadlineExceeded,
    /// A dependency (audit, the vault) or the service's own storage cannot
    /// serve now; nothing was done, and a retry later may succeed.
    Unavailable,
    /// The service's own data or code is broken; see its log.
    Internal,
}

impl ErrorKind {
    /// The gRPC status code of this kind.
    pub fn grpc_code(self) -> Code {
        match self {
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::OutOfRange => Code::OutOfRange,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }

    /// The HTTP status of this kind (the Connect protocol's table).
    pub fn http_status(self) -> StatusCode {
        http_status_of(self.grpc_code())
    }

    /// The kind of a gRPC code received from another service, so an error
    /// passed on keeps its meaning (`Unknown`, `DataLoss` → internal;
    /// `Cancelled` → deadline exceeded: the outcome is unknown either way;
    /// `Aborted` → unavailable).
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::InvalidArgument => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::OutOfRange => Self::OutOfRange,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::DeadlineExceeded | Code::Cancelled => Self::DeadlineExceeded,
            Code::Unavailable | Code::Aborted => Self::Unavailable,
            Code::Ok | Code::Unknown | Code::DataLoss | Code::Unimplemented | Code::Internal => {
                Self::Internal
            }
        }
    }
}

/// The HTTP status of any gRPC code, per the Connect protocol's table
/// (<https://connectrpc.com/docs/protocol#error-codes>).
pub fn http_status_of(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// An error a service answers with: it knows its kind.
pub trait ServiceError: std::error::Error {
    /// The kind, which decides the gRPC code and HTTP status.
    fn kind(&self) -> ErrorKind;
}

/// The status a service answers for `error`. Internal and unavailable
/// failures are logged here, once, at ERROR and WARN; their message is kept
/// (service messages never carry a seed, PIN or code).
pub fn to_status<E: ServiceError>(error: &E) -> tonic::Status {
    let kind = error.kind();
    let message = error.to_string();
    match kind {
        ErrorKind::Internal => tracing::error!(error = %message, "request failed"),
        ErrorKind::Unavailable => tracing::warn!(error = %message, "request could not be served"),
        _ => {}
    }
    tonic::Status::new(kind.grpc_code(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 11] = [
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::FailedPrecondition,
        ErrorKind::OutOfRange,
        ErrorKind::ResourceExhausted,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    #[test]
    fn every_kind_round_trips_through_its_grpc_code() {
        for kind in ALL {
            assert_eq!(ErrorKind::of_code(kind.grpc_code()), kind);
        }
    }

    #[test]
    fn kinds_map_to_the_connect_http_statuses() {
        let got: Vec<u16> = ALL.iter().map(|k| k.http_status().as_u16()).collect();
        assert_eq!(
            got,
            [401, 403, 400, 404, 409, 400, 400, 429, 504, 503, 500],
            "{ALL:?}"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("storage failure: disk full")]
    struct Full;
    impl ServiceError for Full {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Unavailable
        }
    }

    #[test]
    fn to_status_keeps_the_message_and_uses_the_kinds_code() {
        let status = to_status(&Full);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "storage failure: disk full");
    }
}
