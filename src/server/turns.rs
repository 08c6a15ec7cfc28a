//! Running agents' turns: one turn per agent at a time, fed from the durable wake queue.
//!
//! A turn takes every wake pending for its agent, so messages that arrive while it works are
//! coalesced into its next turn, never dropped. A wake leaves the queue only after the turn
//! that handled it has finished; after a crash the turn runs again and its sends, keyed by the
//! waking event, are deduplicated by the homeserver.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::Value;

use super::Crew;
use crate::agent::turn::{WakingMessage, acknowledge};
use crate::dispatch::queue::QueuedWake;

/// The turn loop of one agent; ends when its queue is empty.
pub(super) async fn drive(crew: Arc<Crew>, agent: OwnedUserId) {
    loop {
        if crew.shutdown.is_cancelled() {
            release(&crew, &agent);
            return;
        }
        let pending = match crew.queue.pending_for(&agent) {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(%error, %agent, "cannot read the wake queue");
                release(&crew, &agent);
                return;
            }
        };
        if pending.is_empty() {
            // Re-check under the lock: a wake committed before `wake_agent` took the lock is
            // seen here; one committed after finds the loop gone and starts a new one.
            let mut running = crew
                .running
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if crew
                .queue
                .pending_for(&agent)
                .map(|p| p.is_empty())
                .unwrap_or(true)
            {
                running.remove(&agent);
                return;
            }
            continue;
        }
        run_turn(&crew, &agent, &pending).await;
        if let Err(error) = crew.queue.finish(&pending) {
            tracing::error!(%error, %agent, "cannot remove finished wakes");
        }
        if let Err(error) = crew.store.flush().await {
            tracing::error!(%error, "cannot flush after a turn");
        }
    }
}

fn release(crew: &Crew, agent: &UserId) {
    crew.running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(agent);
}

/// One turn: typing on in every room involved, one answer per waking message, typing off.
#[tracing::instrument(skip_all, fields(agent = %agent, wakes = wakes.len()))]
async fn run_turn(crew: &Crew, agent: &UserId, wakes: &[QueuedWake]) {
    let rooms: BTreeSet<OwnedRoomId> = wakes.iter().map(|w| w.wake.room.clone()).collect();
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, true).await {
            tracing::debug!(%error, "cannot set typing");
        }
    }
    for queued in wakes {
        let wake = &queued.wake;
        let Some(sender) = wake
            .event
            .get("sender")
            .and_then(Value::as_str)
            .and_then(|id| UserId::parse(id).ok())
        else {
            continue;
        };
        let said_since = {
            let mut state = crew
                .dispatcher
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let missed = state.dispatcher.context.take(agent, &wake.room);
            // The waking message itself is in the buffer too; it is not "earlier".
            missed.messages.len().saturating_sub(1) + missed.dropped as usize
        };
        let also_mentioned: Vec<(OwnedUserId, String)> = wake
            .event
            .pointer("/content/m.mentions/user_ids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|id| id.as_str().and_then(|id| UserId::parse(id).ok()))
            .filter(|id| id != agent && *id != sender && crew.is_ours(id))
            .map(|id| {
                let name = super::pump::display_name(crew, &wake.room, &id);
                (id, name)
            })
            .collect();
        let sender_name = super::pump::display_name(crew, &wake.room, &sender);
        let message = acknowledge(&WakingMessage {
            event: &wake.event,
            sender: &sender,
            sender_name: &sender_name,
            also_mentioned,
            depth: wake.depth,
            said_since,
        });
        let event_id = wake
            .event
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Err(error) = crew
            .client
            .send(agent, &wake.room, &format!("turn:{event_id}"), &message)
            .await
        {
            super::log_matrix_error("cannot answer in a turn", &error);
        }
    }
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, false).await {
            tracing::debug!(%error, "cannot clear typing");
        }
    }
    *crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(agent.to_owned())
        .or_default() += 1;
}

/// `/dispatch/why/{event_id}` (the dispatcher's reasons) and `/dispatch/turns` (turns per agent).
pub(super) fn admin_router(crew: Arc<Crew>) -> axum::Router {
    axum::Router::new()
        .route("/why/{event_id}", get(why))
        .route("/turns", get(turns))
        .with_state(crew)
}

async fn why(State(crew): State<Arc<Crew>>, Path(event_id): Path<String>) -> Response {
    let Ok(event_id) = ruma::EventId::parse(&event_id) else {
        return crate::admin::error_response(StatusCode::BAD_REQUEST, "not an event id");
    };
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match state.dispatcher.reasons.get(&event_id) {
        Some(kept) => axum::Json(kept.clone()).into_response(),
        None => crate::admin::error_response(
            StatusCode::NOT_FOUND,
            "no decision kept for that event (unknown, or older than the retention)",
        ),
    }
}

async fn turns(State(crew): State<Arc<Crew>>) -> Response {
    let turns = crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    axum::Json(turns).into_response()
}
