//! Performs the outbox's effects: in order per room, concurrently across rooms, retrying
//! transient failures with backoff (one stalled room delays only itself) and recording
//! permanent ones for `!crew why`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use ruma::{OwnedRoomId, RoomId};
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::matrix::MatrixError;
use crate::outbox::{Effect, Staged};

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
            // again on the next start (sends keep their transaction id; joins are idempotent).
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
                Err(error) if error.is_transient() => {
                    let wait =
                        crate::matrix::honour_retry_after(&error, backoff.next(), MAX_BACKOFF)
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

fn record_failure(crew: &Service, key: &[u8], staged: &Staged, error: &MatrixError) {
    if let Err(store) = crew
        .outbox
        .failed(key, staged, error.to_string(), crate::clock::now_ms())
    {
        tracing::error!(error = %store, "cannot record an outbox failure");
    }
}

async fn perform(crew: &Service, room: &RoomId, effect: &Effect) -> Result<(), MatrixError> {
    match effect {
        Effect::Join { agent } => {
            crew.client.join(agent, room).await?;
            tracing::info!(%room, %agent, "joined on invite");
            // Know the room now, not when our join's echo arrives: the next message in the
            // inbox may already be for us.
            super::pump::seed_room(crew, agent, room).await;
            Ok(())
        }
        Effect::Decline { agent, reason } => {
            crew.client.leave(agent, room, Some(reason)).await?;
            tracing::info!(%room, %agent, "declined an invite");
            Ok(())
        }
        Effect::Seed { agent } => {
            super::pump::seed_room(crew, agent, room).await;
            Ok(())
        }
        Effect::Send {
            agent,
            txn_key,
            content,
        } => {
            if let Ok(Some(sent)) = crew.outbox.sent(agent, txn_key) {
                tracing::debug!(event_id = %sent.event_id, "already sent; not sending again");
                return Ok(());
            }
            let event_id = crew
                .client
                .send_event(agent, room, "m.room.message", txn_key, content.clone())
                .await?;
            if let Err(error) =
                crew.outbox
                    .record_sent(agent, txn_key, event_id.as_str(), crate::clock::now_ms())
            {
                tracing::error!(%error, "cannot record a sent message");
            }
            Ok(())
        }
    }
}
