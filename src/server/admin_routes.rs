//! The server's own admin routes (next to those the services bring): `/share` posts a file
//! reference as an agent, `/dispatch` shows the dispatcher's reasons, turns and wake queue.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ruma::OwnedUserId;
use serde_json::Value;

use super::Service;

/// What `crew share` asks for.
#[derive(serde::Deserialize)]
pub(super) struct ShareRequest {
    path: String,
    room: ruma::OwnedRoomId,
    /// The agent that posts it (default: the Manager).
    #[serde(default)]
    agent: Option<OwnedUserId>,
    /// Upload small files as `m.file` even when links are available.
    #[serde(default)]
    upload: bool,
}

/// `POST /share`: an agent posts a file reference (link or `m.file`) in a room.
pub(super) fn share_router(crew: Arc<Service>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::post(share))
        .with_state(crew)
}

async fn share(
    State(crew): State<Arc<Service>>,
    axum::Json(request): axum::Json<ShareRequest>,
) -> Response {
    let agent = request.agent.unwrap_or_else(|| crew.manager.clone());
    if !crew.is_ours(&agent) {
        return crate::admin::error_response(
            StatusCode::BAD_REQUEST,
            format!("{agent} is not one of our agents"),
        );
    }
    match crate::agent::files::share(
        &crew.storage,
        &crew.links,
        &crew.client,
        &agent,
        &request.room,
        &request.path,
        request.upload,
    )
    .await
    {
        Ok(event_id) => axum::Json(serde_json::json!({ "event_id": event_id })).into_response(),
        Err(crate::agent::files::ShareError::Storage(error)) => {
            crate::storage::admin::storage_error(error)
        }
        Err(error) => crate::admin::error_response(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}

/// `/dispatch/why/{event_id}` (the dispatcher's reasons), `/dispatch/turns` (turns per agent),
/// `/dispatch/queue` (wakes not yet answered, per agent), `/dispatch/team` (what every
/// Worker is doing, for `crew workers status`) and `/dispatch/outbox` (effects not yet done).
pub(super) fn dispatch_router(crew: Arc<Service>) -> axum::Router {
    axum::Router::new()
        .route("/why/{event_id}", get(why))
        .route("/turns", get(turns))
        .route("/queue", get(queue))
        .route("/team", get(team))
        .route("/outbox", get(outbox))
        .with_state(crew)
}

async fn why(State(crew): State<Arc<Service>>, Path(event_id): Path<String>) -> Response {
    let Ok(event_id) = ruma::EventId::parse(&event_id) else {
        return crate::admin::error_response(StatusCode::BAD_REQUEST, "not an event id");
    };
    match crew.dispatch.kept(&event_id) {
        Some(kept) => {
            // What the homeserver refused for good, from the outbox (`!crew why` says it too).
            let mut answer = serde_json::to_value(kept).unwrap_or_default();
            if let Some(object) = answer.as_object_mut() {
                let failures = crew.outbox.failures(event_id.as_str()).unwrap_or_default();
                object.insert(
                    "failures".to_owned(),
                    serde_json::to_value(failures).unwrap_or_default(),
                );
            }
            axum::Json(answer).into_response()
        }
        None => crate::admin::error_response(
            StatusCode::NOT_FOUND,
            "no decision kept for that event (unknown, or older than the retention)",
        ),
    }
}

async fn turns(State(crew): State<Arc<Service>>) -> Response {
    let turns = crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    axum::Json(turns).into_response()
}

async fn queue(State(crew): State<Arc<Service>>) -> Response {
    let agents = match crew.queue.agents_with_pending() {
        Ok(agents) => agents,
        Err(error) => {
            return crate::admin::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                error.to_string(),
            );
        }
    };
    let mut pending = serde_json::Map::new();
    for agent in agents {
        let events: Vec<Value> = crew
            .queue
            .pending_for(&agent)
            .unwrap_or_default()
            .iter()
            .map(|queued| Value::from(queued.wake.event.event_id.as_str()))
            .collect();
        pending.insert(agent.to_string(), Value::Array(events));
    }
    axum::Json(Value::Object(pending)).into_response()
}

async fn team(State(crew): State<Arc<Service>>) -> Response {
    match crate::agent::status::team_status(
        &crew.team.registry,
        &crew.tasks,
        &crew.agents.activity,
        &crew.agents.busy,
    ) {
        Ok(statuses) => axum::Json(statuses).into_response(),
        Err(error) => {
            crate::admin::error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
    }
}

/// `GET /dispatch/outbox`: the effects not yet performed, oldest first per room (what a
/// homeserver in trouble holds up).
async fn outbox(State(crew): State<Arc<Service>>) -> Response {
    match crew.outbox.pending() {
        Ok(pending) => axum::Json(serde_json::json!({ "pending": pending })).into_response(),
        Err(error) => {
            crate::admin::error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
    }
}
