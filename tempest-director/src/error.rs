//! The director's API errors: who is at fault decides the status, and the
//! body is always `{"error": "..."}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use tempest_control::ApiError;

/// An error answered to an API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong (the caller's fault; do not retry as is).
    #[error("{0}")]
    BadRequest(String),
    /// No credential, or a wrong one.
    #[error("{0}")]
    Unauthorized(String),
    /// Refused: a cross-site request, or a credential that cannot do this.
    #[error("{0}")]
    Forbidden(String),
    /// The request names a host this director does not answer to.
    #[error("{0}")]
    MisdirectedRequest(String),
    /// Too many failed attempts to authenticate from this address.
    #[error("{0}")]
    TooManyRequests(String),
    /// No such package, topology or agent.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with the current state (a duplicate name, a stopped
    /// topology asked to stop).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// An agent the call needed did not answer (or answered nonsense).
    #[error("{0}")]
    BadGateway(String),
    /// The director's own fault (its disk or database); may be retried.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An internal error from anything displayable.
    pub fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(e.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Internal(format!("database: {e}"))
    }
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::MisdirectedRequest(_) => StatusCode::MISDIRECTED_REQUEST,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Error::Internal(e) = self {
            tracing::error!("internal error: {e}");
        }
        HttpResponse::build(self.status_code()).json(ApiError::new(self.to_string()))
    }
}
