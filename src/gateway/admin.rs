//! The operator's endpoint for consumers and usage, nested by the admin API at `/gateway`.
//!
//! Routes (relative to the nest point):
//! - `GET  /consumers` → `[ConsumerInfo]`
//! - `POST /consumers` `{"id": …, "policy": {…}?}` → `IssuedToken` (creates or re-enables)
//! - `POST /consumers/{id}/rotate` → `IssuedToken`
//! - `POST /consumers/{id}/revoke` → `ConsumerInfo`
//! - `GET  /usage` → `[UsageRow]`
//!
//! Tokens appear only in the answers to add and rotate, which go to the operator over the
//! authenticated loopback admin endpoint.
//!
//! Not for: agents (they get their token from [`super::Gateway::consumer_token`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{ConsumerInfo, ConsumerPolicy, ConsumerRecord, Gateway, GatewayError};
use crate::admin::error_response;

/// Body of `POST /consumers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddConsumer {
    pub id: String,
    /// The consumer's policy; the configured defaults when absent.
    #[serde(default)]
    pub policy: Option<ConsumerPolicy>,
}

/// Answer of add and rotate: the consumer and its current token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    pub consumer: ConsumerInfo,
    pub token: String,
}

/// The admin routes over `gateway`.
pub fn admin_router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/consumers", get(list).post(add))
        .route("/consumers/{id}/rotate", post(rotate))
        .route("/consumers/{id}/revoke", post(revoke))
        .route("/usage", get(usage))
        .with_state(gateway)
}

fn failure(error: GatewayError) -> Response {
    let status = match error {
        GatewayError::UnknownConsumer(_) => StatusCode::NOT_FOUND,
        GatewayError::Revoked(_) => StatusCode::CONFLICT,
        GatewayError::InvalidConsumerId(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, error.to_string())
}

fn info(gateway: &Gateway, record: ConsumerRecord) -> ConsumerInfo {
    gateway
        .consumers()
        .ok()
        .and_then(|all| all.into_iter().find(|c| c.id == record.id))
        .unwrap_or(ConsumerInfo {
            id: record.id,
            generation: record.generation,
            revoked: record.revoked,
            previous_valid_until_ms: record.previous.map(|p| p.valid_until_ms),
            policy: record.policy,
            today: super::Usage::default(),
        })
}

async fn list(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.consumers() {
        Ok(consumers) => Json(consumers).into_response(),
        Err(error) => failure(error),
    }
}

async fn add(State(gateway): State<Arc<Gateway>>, Json(body): Json<AddConsumer>) -> Response {
    match gateway.add_consumer(&body.id, body.policy).await {
        Ok((record, token)) => Json(IssuedToken {
            consumer: info(&gateway, record),
            token: token.expose().to_owned(),
        })
        .into_response(),
        Err(error) => failure(error),
    }
}

async fn rotate(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    match gateway.rotate(&id).await {
        Ok((record, token)) => Json(IssuedToken {
            consumer: info(&gateway, record),
            token: token.expose().to_owned(),
        })
        .into_response(),
        Err(error) => failure(error),
    }
}

async fn revoke(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    match gateway.revoke(&id).await {
        Ok(record) => Json(info(&gateway, record)).into_response(),
        Err(error) => failure(error),
    }
}

async fn usage(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.usage() {
        Ok(rows) => Json(rows).into_response(),
        Err(error) => failure(error),
    }
}
