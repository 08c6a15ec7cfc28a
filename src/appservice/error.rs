//! The one place where appservice API errors become HTTP status codes and Matrix `errcode`s.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answer of the appservice API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token presented (spec: 401 `M_UNAUTHORIZED`).
    #[error("no hs_token presented")]
    MissingToken,
    /// A token was presented but it is not our hs_token (spec: 403 `M_FORBIDDEN`).
    #[error("the presented hs_token is wrong")]
    Forbidden,
    /// The body is not a JSON transaction at all.
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
    /// The user or alias is not one of ours.
    #[error("{0}")]
    NotFound(String),
    /// Unknown endpoint (spec: 404 `M_UNRECOGNIZED`).
    #[error("unrecognized request")]
    Unrecognized,
    /// Known endpoint, wrong method (spec: 405 `M_UNRECOGNIZED`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// We could not persist; the homeserver should retry later.
    #[error("crew cannot store the transaction right now")]
    Unavailable,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MissingToken => (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            ApiError::NotJson(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            ApiError::Unrecognized => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, errcode) = self.status_and_code();
        let body = serde_json::json!({ "errcode": errcode, "error": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}
