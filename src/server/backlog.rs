//! Makes the homeserver send what it held back while it could not reach crew.
//!
//! Tuwunel re-sends a failed appservice transaction neither on a timer nor on a ping: only when
//! the next event for the appservice is queued. Mentions sent while crew was down would wait for
//! somebody else to speak. So at start-up, and whenever the homeserver reaches crew again after
//! it could not, the Manager posts a small custom event in a room only it is in: that event is
//! for the appservice, and the backlog goes out ahead of it.

use crate::clock::now_ms;
use crate::matrix::{CreateRoom, MatrixError};
use crate::store::Tree;

use super::Service;

/// The custom event posted; the dispatcher ignores it (not a message).
pub(crate) const NUDGE_EVENT: &str = "org.matrix_crew.nudge";

/// Where the Manager's own room id is kept.
const TREE: &str = "manager_rooms";
const KEY: &str = "nudge";

/// Posts one nudge event; creates the Manager's own room the first time (and again if the old
/// one is gone). Failures are logged: the periodic ping retries when the homeserver is back.
pub(super) async fn nudge(crew: &Service, why: &str) {
    if let Err(error) = try_nudge(crew).await {
        tracing::warn!(%error, "cannot nudge the homeserver to send held-back events ({why})");
    } else {
        tracing::debug!("nudged the homeserver to send held-back events ({why})");
    }
}

async fn try_nudge(crew: &Service) -> Result<(), NudgeError> {
    let rooms: Tree<String, String> = crew.store.tree(TREE)?;
    let key = KEY.to_owned();
    let content = serde_json::json!({ "at_ms": now_ms() });
    let txn_key = format!("nudge:{}", now_ms());
    if let Some(room) = rooms.get(&key)?.and_then(|id| ruma::RoomId::parse(id).ok()) {
        match crew
            .client
            .send_event(&crew.manager, &room, NUDGE_EVENT, &txn_key, content.clone())
            .await
        {
            Ok(_) => return Ok(()),
            // Left, or the room is gone: make a new one below.
            Err(error) if matches!(error.status(), Some(403 | 404)) => {
                tracing::info!(%error, %room, "the Manager's own room is gone; making a new one");
            }
            Err(error) => return Err(error.into()),
        }
    }
    let room = crew
        .client
        .create_room(
            &crew.manager,
            &CreateRoom {
                name: Some("crew (internal)".to_owned()),
                topic: Some(
                    "crew posts small events here so the homeserver sends what it held back"
                        .to_owned(),
                ),
                ..CreateRoom::default()
            },
        )
        .await?;
    rooms.insert(&key, &room.to_string())?;
    crew.client
        .send_event(&crew.manager, &room, NUDGE_EVENT, &txn_key, content)
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum NudgeError {
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}
