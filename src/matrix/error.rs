//! Errors from the homeserver, with typed access to the Matrix error code.

/// A failed call to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver could not be reached at all (wrong URL, down, network).
    #[error("cannot reach the homeserver at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The homeserver answered with a Matrix error.
    #[error("{method} {path} failed: {status} {errcode}: {error}")]
    Api {
        method: String,
        path: String,
        status: u16,
        errcode: String,
        error: String,
        /// How long a rate limit (`M_LIMIT_EXCEEDED`) asked us to wait, from `Retry-After` or
        /// `retry_after_ms`.
        retry_after: Option<std::time::Duration>,
    },
    /// The request could not be built (an id or a body that ruma refuses); nothing was sent.
    #[error("cannot {what}: {message}")]
    Request { what: String, message: String },
    /// The homeserver answered something that is not the expected JSON.
    #[error("unexpected answer from {path}: {message}")]
    BadResponse { path: String, message: String },
}

impl MatrixError {
    /// The Matrix `errcode`, when the homeserver gave one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Api { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MatrixError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the homeserver asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            MatrixError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again may succeed: network errors, rate limits and server errors. Any
    /// other answer is the homeserver's for good.
    pub fn is_transient(&self) -> bool {
        match self {
            MatrixError::Unreachable { .. } => true,
            MatrixError::Api { status, .. } => *status == 429 || *status >= 500,
            MatrixError::Request { .. } | MatrixError::BadResponse { .. } => false,
        }
    }
}
