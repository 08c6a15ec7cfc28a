//! The event pump: takes events from the durable inbox in order and hands each to the part of
//! crew that cares (room state, invites, the agents). An event leaves the inbox only once it has
//! been fully handled, so a crash means handling it again, and every send uses a transaction id
//! derived from the event, so handling twice never answers twice.

use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Crew;
use crate::matrix::message::ReplyTo;

/// Events taken from the inbox per round.
const BATCH: usize = 100;

pub(super) async fn run(crew: Arc<Crew>, shutdown: CancellationToken) {
    loop {
        let batch = match crew.inbox.pending(BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, "cannot read the inbox; retrying");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = crew.inbox.arrived() => continue,
                () = shutdown.cancelled() => return,
            }
        }
        for (seq, entry) in batch {
            if shutdown.is_cancelled() {
                return;
            }
            handle(&crew, &entry.event).await;
            if let Err(error) = crew.inbox.complete(seq) {
                tracing::error!(%error, seq, "cannot remove a handled event from the inbox");
            }
        }
    }
}

/// Handles one event. Never fails: problems are logged, and the event is not retried forever.
#[tracing::instrument(skip_all, fields(event_id = event.get("event_id").and_then(|id| id.as_str()).unwrap_or("?")))]
async fn handle(crew: &Crew, event: &Value) {
    let Some(room) = event
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|id| RoomId::parse(id).ok())
    else {
        return;
    };
    let Some(sender) = event
        .get("sender")
        .and_then(Value::as_str)
        .and_then(|id| UserId::parse(id).ok())
    else {
        return;
    };
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    if event.get("state_key").is_some() {
        if let Err(error) = crew.rooms.apply(&room, event) {
            tracing::error!(%error, "cannot update room state");
        }
        if kind == "m.room.member" {
            handle_membership(crew, &room, &sender, event).await;
        }
        return;
    }
    if kind == "m.room.message" {
        handle_message(crew, &room, &sender, event).await;
    }
}

async fn handle_membership(crew: &Crew, room: &OwnedRoomId, sender: &UserId, event: &Value) {
    let Some(target) = event
        .get("state_key")
        .and_then(Value::as_str)
        .and_then(|id| UserId::parse(id).ok())
    else {
        return;
    };
    if !crew.is_ours(&target) {
        return;
    }
    let membership = event
        .pointer("/content/membership")
        .and_then(Value::as_str)
        .unwrap_or("");
    match membership {
        "invite" => {
            let known = target == crew.manager
                || matches!(crew.team.registry.by_user(&target), Ok(Some(_)));
            if !known {
                let reason = format!(
                    "{target} is not an agent of this crew; ask the Manager to create it first"
                );
                if let Err(error) = crew.client.leave(&target, room, Some(&reason)).await {
                    super::log_matrix_error(
                        "cannot decline an invite for an unknown agent",
                        &error,
                    );
                }
                return;
            }
            if crew.config.invites.allows(sender, &crew.config.admins) {
                match crew.client.join(&target, room).await {
                    Ok(()) => {
                        tracing::info!(%room, agent = %target, inviter = %sender, "joined on invite")
                    }
                    Err(error) => super::log_matrix_error("cannot join on invite", &error),
                }
            } else {
                let reason = format!(
                    "{target} only accepts invites from the people its admins allow; ask one of them to invite it"
                );
                match crew.client.leave(&target, room, Some(&reason)).await {
                    Ok(()) => {
                        tracing::info!(%room, agent = %target, inviter = %sender, "declined an invite from someone not allowed")
                    }
                    Err(error) => super::log_matrix_error("cannot decline an invite", &error),
                }
            }
        }
        "join" => {
            // We see nothing from before we joined: fetch the room's whole state now.
            match crew.client.room_state(&target, room).await {
                Ok(state) => {
                    if let Err(error) = crew.rooms.replace_from_state(room, &state) {
                        tracing::error!(%error, "cannot store room state");
                    }
                }
                Err(error) => {
                    super::log_matrix_error("cannot fetch room state after joining", &error)
                }
            }
        }
        _ => {}
    }
}

async fn handle_message(crew: &Crew, room: &OwnedRoomId, sender: &UserId, event: &Value) {
    if crew.is_ours(sender) {
        return; // our own echo
    }
    let content = event.get("content").unwrap_or(&Value::Null);
    if content.get("msgtype").and_then(Value::as_str) == Some("m.notice") {
        return;
    }
    if !mentions(content, &crew.manager) {
        return;
    }
    if !crew.config.invites.allows(sender, &crew.config.admins) {
        tracing::info!(%sender, "ignoring a mention from someone not allowed to wake agents");
        return;
    }
    let sender_name = crew
        .rooms
        .get(room)
        .ok()
        .flatten()
        .and_then(|record| record.display_name(sender).map(str::to_owned))
        .unwrap_or_else(|| sender.localpart().to_owned());
    let event_id = event.get("event_id").and_then(Value::as_str).unwrap_or("");
    let reply = crate::agent::manager::acknowledgement(sender, &sender_name)
        .reply_to(ReplyTo::event(event));
    if let Err(error) = crew
        .client
        .send(&crew.manager, room, &format!("ack:{event_id}"), &reply)
        .await
    {
        super::log_matrix_error("cannot acknowledge a mention", &error);
    }
}

/// Whether `content` mentions `user`: `m.mentions` when present (authoritative), else the MXID
/// in the body or a pill in the formatted body.
fn mentions(content: &Value, user: &UserId) -> bool {
    if let Some(mentions) = content.get("m.mentions") {
        return mentions
            .get("user_ids")
            .and_then(Value::as_array)
            .is_some_and(|ids| ids.iter().any(|id| id.as_str() == Some(user.as_str())));
    }
    let body = content.get("body").and_then(Value::as_str).unwrap_or("");
    let html = content
        .get("formatted_body")
        .and_then(Value::as_str)
        .unwrap_or("");
    body.contains(user.as_str()) || html.contains(&format!("matrix.to/#/{}", user.as_str()))
}
