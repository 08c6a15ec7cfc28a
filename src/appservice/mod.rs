//! What the homeserver calls: the appservice API (transactions, user and alias queries, ping).
//!
//! Handlers are thin: authenticate, hand the events to the [`inbox::Inbox`], answer. Every error
//! answer is a Matrix error (`errcode` + `error`) from [`error::ApiError`]. An event's content
//! never causes a 4xx: the homeserver would resend the same transaction forever.

pub mod error;
pub mod inbox;
mod seen;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;

use crate::registration::Registration;
use crate::secret::Secret;
use error::ApiError;
use inbox::Inbox;

/// What the handlers need.
pub struct AppserviceState {
    pub hs_token: Secret,
    pub inbox: Arc<Inbox>,
    pub registration: Registration,
    pub server_name: String,
    /// Set when the homeserver's ping arrives, so start-up can confirm the round trip.
    pub pings: tokio::sync::watch::Sender<Option<String>>,
    /// Encryption (`crate::crypto`): None when off; an empty slot while it starts, when
    /// transactions are answered "unavailable" so the homeserver sends them again.
    pub crypto: Option<std::sync::OnceLock<Arc<crate::crypto::Crypto>>>,
}

/// The homeserver-facing router, with `max_body` as the largest accepted transaction.
///
/// Every route checks the hs_token in a layer that runs before the handler's extractors, so a
/// caller without the token is refused before a byte of its body is read (a wrong token with a
/// huge body costs no memory).
pub fn router(state: Arc<AppserviceState>, max_body: usize) -> Router {
    let require_token = axum::middleware::from_fn_with_state(Arc::clone(&state), require_hs_token);
    let api = Router::new()
        .route("/transactions/{txn_id}", put(put_transaction))
        .route("/users/{user_id}", get(query_user))
        .route("/rooms/{alias}", get(query_alias))
        .route("/ping", post(ping))
        .route_layer(require_token.clone());
    Router::new()
        .nest("/_matrix/app/v1", api.clone())
        // Pre-v1.1 homeservers call the unprefixed paths.
        .merge(legacy_routes().route_layer(require_token))
        .fallback(|| async { ApiError::Unrecognized })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn legacy_routes() -> Router<Arc<AppserviceState>> {
    Router::new()
        .route("/transactions/{txn_id}", put(put_transaction))
        .route("/users/{user_id}", get(query_user))
        .route("/rooms/{alias}", get(query_alias))
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The token check as a layer: headers and query only, the body untouched.
async fn require_hs_token(
    State(state): State<Arc<AppserviceState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let query = Query::<TokenQuery>::try_from_uri(request.uri())
        .map(|Query(query)| query)
        .unwrap_or(TokenQuery { access_token: None });
    match authenticate(&state, request.headers(), &query) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Bearer header or the legacy `access_token` query parameter; when both are present both must
/// match (Tuwunel sends both).
fn authenticate(
    state: &AppserviceState,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<(), ApiError> {
    let header = match headers.get(axum::http::header::AUTHORIZATION) {
        Some(value) => {
            let text = value.to_str().map_err(|_| ApiError::Forbidden)?;
            Some(text.strip_prefix("Bearer ").ok_or(ApiError::Forbidden)?)
        }
        None => None,
    };
    let presented: Vec<&str> = header
        .into_iter()
        .chain(query.access_token.as_deref())
        .collect();
    if presented.is_empty() {
        return Err(ApiError::MissingToken);
    }
    // Check every presented token (no short-circuit) so timing does not tell which one failed.
    let all_match = presented
        .iter()
        .fold(true, |ok, token| state.hs_token.matches(token) & ok);
    if all_match {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// Events stay raw: each is checked on its own, so one malformed event cannot fail the rest.
#[derive(Debug, Deserialize)]
struct TransactionBody {
    #[serde(default)]
    events: Vec<Box<serde_json::value::RawValue>>,
}

#[tracing::instrument(skip_all, fields(txn_id = %txn_id))]
async fn put_transaction(
    State(state): State<Arc<AppserviceState>>,
    Path(txn_id): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authenticate(&state, &headers, &query)?;
    // The body as a whole must be JSON; individual events are checked one by one later.
    let body_bytes = body;
    let body: TransactionBody = serde_json::from_slice(&body_bytes)
        .map_err(|error| ApiError::NotJson(error.to_string()))?;
    // crate::crypto hook: keys and to-device events go to the agents' devices, encrypted events
    // are replaced by their decrypted form before the inbox (or wait for their keys).
    let events = match &state.crypto {
        None => body.events,
        Some(slot) => {
            let crypto = slot.get().ok_or(ApiError::Unavailable)?;
            let keys = serde_json::from_slice(&body_bytes).unwrap_or_default();
            crypto.on_transaction(keys, body.events).await
        }
    };
    let outcome = state
        .inbox
        .ingest_durably(&txn_id, &events)
        .await
        .map_err(|error| {
            tracing::error!(%error, "cannot persist transaction");
            ApiError::Unavailable
        })?;
    tracing::debug!(?outcome, "transaction persisted");
    Ok(empty_object())
}

async fn query_user(
    State(state): State<Arc<AppserviceState>>,
    Path(user_id): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&state, &headers, &query)?;
    // Agents exist only once created through the Manager; unknown names are not auto-created.
    let _ = user_id;
    Err(ApiError::NotFound("no such agent".into()))
}

async fn query_alias(
    State(state): State<Arc<AppserviceState>>,
    Path(alias): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&state, &headers, &query)?;
    let _ = alias;
    Err(ApiError::NotFound(
        "crew does not provide room aliases".into(),
    ))
}

#[derive(Debug, Deserialize)]
struct PingBody {
    transaction_id: Option<String>,
}

async fn ping(
    State(state): State<Arc<AppserviceState>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authenticate(&state, &headers, &query)?;
    let body: PingBody = serde_json::from_slice(&body).unwrap_or(PingBody {
        transaction_id: None,
    });
    state.pings.send_replace(body.transaction_id);
    Ok(empty_object())
}

/// `200 {}` with a Content-Length (Synapse treats anything else as a failure).
fn empty_object() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response()
}
