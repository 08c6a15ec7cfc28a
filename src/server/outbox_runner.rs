//! Performs the outbox's effects: in order per room, concurrently across rooms, retrying
//! transient failures with backoff (one stalled room delays only itself) and recording
//! permanent ones for `!crew why`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::matrix::message::ReplyTo;
use crate::matrix::{CreateRoom, MatrixError, OutgoingMessage};
use crate::outbox::{CreateOnceError, Effect, OUTBOX_KEY_FIELD, Staged};
use crate::store::StoreError;

/// First wait after a transient failure; doubles (with jitter) up to [`MAX_BACKOFF`], for ever.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Rooms whose drain is running.
#[derive(Default)]
pub(crate) struct Draining(Mutex<HashSet<OwnedRoomId>>);

/// Starts a drain for every room with pending effects, now and whenever effects are staged.
pub(super) async fn run(crew: Arc<Service>, shutdown: CancellationToken) {
    loop {
        match crew.outbox.rooms() {
            Ok(rooms) => {
                for room in rooms {
                    start(&crew, room, &shutdown);
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the outbox"),
        }
        tokio::select! {
            () = crew.outbox.staged() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn start(crew: &Arc<Service>, room: OwnedRoomId, shutdown: &CancellationToken) {
    let mut draining = crew
        .draining
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if draining.insert(room.clone()) {
        crew.background
            .spawn(drain(crew.clone(), room, shutdown.clone()));
    }
}

/// Performs `room`'s effects until none is left.
async fn drain(crew: Arc<Service>, room: OwnedRoomId, shutdown: CancellationToken) {
    loop {
        let next = match crew.outbox.next(&room) {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, %room, "cannot read the outbox");
                None
            }
        };
        let Some((key, staged)) = next else {
            let mut draining = crew
                .draining
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Re-checked under the lock: an effect staged meanwhile finds no drain and starts one.
            if matches!(crew.outbox.next(&room), Ok(Some(_))) {
                continue;
            }
            draining.remove(&room);
            return;
        };
        let mut backoff = crate::retry::exponential(FIRST_BACKOFF, MAX_BACKOFF, 0)
            .without_max_times()
            .build();
        loop {
            // A shutdown drops the call in flight: the effect stays pending and is performed
            // again on the next start (a send or a createRoom looks first for what the dropped
            // attempt made; joins are idempotent).
            let performed = tokio::select! {
                performed = perform(&crew, &room, &staged.effect) => performed,
                () = shutdown.cancelled() => {
                    release(&crew, &room);
                    return;
                }
            };
            match performed {
                Ok(()) => {
                    if let Err(error) = crew.outbox.done(&key) {
                        tracing::error!(%error, "cannot mark an outbox effect done");
                    }
                    break;
                }
                Err(error) if is_transient(&error) => {
                    let asked = match &error {
                        PerformError::Matrix(matrix) => matrix.retry_after(),
                        PerformError::Store(_) => None,
                    };
                    let wait = crate::retry::at_least_asked(backoff.next(), asked, MAX_BACKOFF)
                        .unwrap_or(MAX_BACKOFF);
                    tracing::warn!(%error, %room, what = %staged.effect.describe(), ?wait, "homeserver call failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => {
                            release(&crew, &room);
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %room, what = %staged.effect.describe(), "the homeserver refused; recorded for !crew why");
                    record_failure(&crew, &key, &staged, &error);
                    break;
                }
            }
        }
        if shutdown.is_cancelled() {
            release(&crew, &room);
            return;
        }
    }
}

fn release(crew: &Service, room: &RoomId) {
    crew.draining
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(room);
}

fn record_failure(crew: &Service, key: &[u8], staged: &Staged, error: &PerformError) {
    if let Err(store) = crew
        .outbox
        .failed(key, staged, error.to_string(), crate::clock::now_ms())
    {
        tracing::error!(error = %store, "cannot record an outbox failure");
    }
}

/// Why an effect was not performed this time.
#[derive(Debug, thiserror::Error)]
enum PerformError {
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The outbox's own records could not be read or written: retried, never sent unrecorded.
    #[error("the outbox's records: {0}")]
    Store(#[from] StoreError),
}

/// Network errors, rate limits, server errors and our own storage's trouble pass; anything else
/// is the homeserver's answer for good.
fn is_transient(error: &PerformError) -> bool {
    match error {
        PerformError::Matrix(error) => error.is_transient(),
        PerformError::Store(_) => true,
    }
}

async fn perform(crew: &Service, room: &RoomId, effect: &Effect) -> Result<(), PerformError> {
    match effect {
        Effect::Join { agent } => {
            crew.client.join(agent, room).await?;
            tracing::info!(%room, %agent, "joined on invite");
            // Know the room now, not when our join's echo arrives: the next message in the
            // inbox may already be for us.
            seed_room(crew, agent, room).await;
            Ok(())
        }
        Effect::Decline { agent, reason } => {
            crew.client.leave(agent, room, Some(reason)).await?;
            tracing::info!(%room, %agent, "declined an invite");
            Ok(())
        }
        Effect::Seed { agent } => {
            seed_room(crew, agent, room).await;
            Ok(())
        }
        Effect::Send {
            agent,
            txn_key,
            content,
        } => send_once(crew, agent, room, txn_key, content).await,
        Effect::OfferRoom {
            agent,
            name,
            topic,
            invite,
            txn_key,
        } => {
            let offer = CreateRoom {
                name: Some(name.clone()),
                topic: Some(topic.clone()),
                invite: invite.clone(),
                ..CreateRoom::default()
            };
            let created = crew
                .outbox
                .rooms
                .create(&crew.client, agent, offer, txn_key)
                .await
                .map_err(|error| match error {
                    CreateOnceError::Matrix(error) => PerformError::Matrix(error),
                    CreateOnceError::Store(error) => PerformError::Store(error),
                });
            let text = match created {
                Ok(_) => {
                    "This room is encrypted and encryption is turned off for this crew (`encryption.enabled = false` in its config), so I cannot read anything said here. I opened an unencrypted room and invited you: talk to me there."
                }
                Err(error) if is_transient(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "cannot open an unencrypted room");
                    "This room is encrypted and encryption is turned off for this crew (`encryption.enabled = false` in its config), so I cannot read anything said here. Invite me into an unencrypted room instead."
                }
            };
            let content = OutgoingMessage::notice(text).to_content();
            send_once(crew, agent, room, txn_key, &content).await
        }
        Effect::RemoveWorker {
            name,
            command,
            txn_key,
        } => {
            let text = match crew.team.remove(name).await {
                Ok(worker) => format!(
                    "Removed {}: its gateway token is revoked and it left its rooms. Its files and history stay.",
                    worker.display_name
                ),
                Err(crate::agent::team::TeamError::Matrix(error)) if error.is_transient() => {
                    return Err(error.into());
                }
                Err(error) => format!("I could not remove `{name}`: {error}"),
            };
            let reply = OutgoingMessage::notice(text).reply_to(ReplyTo::from_json(command));
            send_once(crew, &crew.manager, room, txn_key, &reply.to_content()).await
        }
    }
}

/// Sends `content` as `agent` once, whatever happens to the homeserver: it carries its outbox
/// key, the attempt is recorded before it leaves, and a repeated attempt first looks for the
/// key among the room's recent events (an earlier attempt may have been carried out without
/// its answer reaching us, and a restarted homeserver has forgotten its transaction ids).
async fn send_once(
    crew: &Service,
    agent: &UserId,
    room: &RoomId,
    txn_key: &str,
    content: &Value,
) -> Result<(), PerformError> {
    if let Some(sent) = crew.outbox.sent(agent, txn_key)? {
        tracing::debug!(event_id = %sent.event_id, "already sent; not sending again");
        return Ok(());
    }
    let mut content = content.clone();
    if let Some(fields) = content.as_object_mut() {
        fields.insert(OUTBOX_KEY_FIELD.to_owned(), Value::from(txn_key));
    }
    let now = crate::clock::now_ms();
    if crew.outbox.mark_attempted(agent, txn_key, now).await? {
        let found = crew
            .client
            .recent_event_where(agent, room, |event| {
                event.get("sender").and_then(Value::as_str) == Some(agent.as_str())
                    && event
                        .pointer(&format!("/content/{OUTBOX_KEY_FIELD}"))
                        .and_then(Value::as_str)
                        == Some(txn_key)
            })
            .await?;
        if let Some(event_id) = found {
            tracing::info!(%event_id, %room, "an earlier attempt was sent; not sending again");
            crew.outbox
                .record_sent(agent, txn_key, event_id.as_str(), now)?;
            return Ok(());
        }
    }
    let event_id = crew
        .client
        .send_event_once(agent, room, "m.room.message", txn_key, content)
        .await?;
    crew.outbox
        .record_sent(agent, txn_key, event_id.as_str(), crate::clock::now_ms())?;
    Ok(())
}

/// Fetches a room's whole state as `agent` (we see nothing from before we joined) and gives it
/// to the dispatcher.
pub(super) async fn seed_room(crew: &Service, agent: &UserId, room: &RoomId) {
    match crew.client.room_state(agent, room).await {
        Ok(events) => {
            // `/state` answers client events; one without its room id gets this room's.
            let events: Vec<crate::dispatch::RoomEvent> = events
                .into_iter()
                .filter_map(|mut event| {
                    if let Some(object) = event.as_object_mut() {
                        object
                            .entry("room_id")
                            .or_insert_with(|| serde_json::Value::from(room.as_str()));
                    }
                    crate::dispatch::RoomEvent::from_json(&event)
                        .inspect_err(
                            |error| tracing::warn!(%error, %room, "skipping a room state event"),
                        )
                        .ok()
                })
                .collect();
            crew.dispatch.seed_room(room, &events);
        }
        Err(error) => super::log_matrix_error("cannot fetch room state", &error),
    }
}
