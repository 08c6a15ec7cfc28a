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
    },
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
}
