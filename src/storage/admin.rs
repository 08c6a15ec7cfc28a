//! The `files` part of the admin endpoint, used by `crew files …` while `crew serve` runs.
//!
//! Thin handlers over [`Storage`]: list as JSON, download and upload as streamed bodies. The
//! operator acts as the Manager here (no access rules). Not reachable by agents or from outside
//! loopback; the admin endpoint's token guards it.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{Storage, StorageError, StoragePath, StoragePrefix, body_from_stream};
use crate::admin::error_response;

/// Routes, relative to where the lead nests them (`/files`):
/// - `GET /list?prefix=…` → JSON array of [`super::ObjectMeta`], sorted by path;
/// - `GET /object/<path>` → the file, streamed;
/// - `PUT /object/<path>` → stores the streamed request body, answers its [`super::ObjectMeta`];
/// - `DELETE /object/<path>` → `{}`.
pub fn admin_router(storage: Storage) -> Router {
    Router::new()
        .route("/list", get(list))
        .route("/object/{*path}", get(download).put(upload).delete(remove))
        .with_state(storage)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
}

async fn list(State(storage): State<Storage>, Query(query): Query<ListQuery>) -> Response {
    let result = async {
        let prefix = StoragePrefix::parse(&query.prefix)?;
        storage.list(&prefix).await
    }
    .await;
    match result {
        Ok(listed) => axum::Json(listed).into_response(),
        Err(error) => storage_error(error),
    }
}

async fn download(State(storage): State<Storage>, UrlPath(path): UrlPath<String>) -> Response {
    let result = async { storage.get(&StoragePath::parse(&path)?).await }.await;
    match result {
        Ok(object) => {
            let mut response = Body::from_stream(object.body).into_response();
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&object.meta.content_type) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(object.meta.size));
            response
        }
        Err(error) => storage_error(error),
    }
}

async fn upload(
    State(storage): State<Storage>,
    UrlPath(path): UrlPath<String>,
    body: Body,
) -> Response {
    let result = async {
        let path = StoragePath::parse(&path)?;
        storage
            .put(&path, body_from_stream(body.into_data_stream()))
            .await
    }
    .await;
    match result {
        Ok(meta) => axum::Json(meta).into_response(),
        Err(error) => storage_error(error),
    }
}

async fn remove(State(storage): State<Storage>, UrlPath(path): UrlPath<String>) -> Response {
    let result = async { storage.delete(&StoragePath::parse(&path)?).await }.await;
    match result {
        Ok(()) => axum::Json(serde_json::json!({})).into_response(),
        Err(error) => storage_error(error),
    }
}

/// The one place storage errors become HTTP answers.
pub fn storage_error(error: StorageError) -> Response {
    let status = match &error {
        StorageError::InvalidPath { .. } => StatusCode::BAD_REQUEST,
        StorageError::NotFound { .. } => StatusCode::NOT_FOUND,
        StorageError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StorageError::Forbidden { .. } => StatusCode::FORBIDDEN,
        StorageError::Body { .. } => StatusCode::BAD_REQUEST,
        StorageError::BucketMissing { .. }
        | StorageError::Credentials { .. }
        | StorageError::S3 { .. } => StatusCode::BAD_GATEWAY,
        StorageError::Config(_) | StorageError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, error.to_string())
}
