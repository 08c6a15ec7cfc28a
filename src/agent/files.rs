//! Files in chat: an agent refers to a file by path, size and a signed link a person can open
//! from any client (a phone included), or, without a public base URL (or on request, for small
//! files), uploads it to Matrix media as `m.file` (encrypted in an encrypted room). Chat carries
//! references, never file bodies.

use std::time::SystemTime;

use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::json;

use crate::matrix::{MatrixClient, MatrixError, OutgoingMessage};
use crate::storage::links::{FileReference, Links};
use crate::storage::{Storage, StorageError, StoragePath};

/// Why a file could not be shared.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the homeserver refused the file: {0}")]
    Matrix(#[from] MatrixError),
}

/// Posts a reference to `path` in `room` as `agent`; returns the event id.
pub async fn share(
    storage: &Storage,
    links: &Links,
    client: &MatrixClient,
    agent: &UserId,
    room: &RoomId,
    path: &str,
    prefer_upload: bool,
) -> Result<OwnedEventId, ShareError> {
    let path = StoragePath::parse(path)?;
    let reference = links
        .reference(storage, &path, prefer_upload, SystemTime::now())
        .await?;
    let txn_key = format!("share:{room}:{path}:{}", crate::clock::now_ms());
    match reference {
        FileReference::Link { text, .. } | FileReference::PathOnly { text, .. } => Ok(client
            .send(agent, room, &txn_key, &OutgoingMessage::text(text))
            .await?),
        FileReference::UploadAsFile {
            file_name,
            caption,
            meta,
        } => {
            let bytes = storage.get_bytes(&path, meta.size).await?;
            // In an encrypted room the file goes up encrypted, its key inside the event.
            let media = client
                .upload_for_room(agent, room, bytes.into(), &meta.content_type, &file_name)
                .await?;
            let mut content = json!({
                "msgtype": "m.file",
                "body": file_name,
                "filename": file_name,
                "info": { "size": meta.size, "mimetype": meta.content_type },
                "m.mentions": {},
            });
            if let Some(fields) = content.as_object_mut() {
                media.insert_into(fields);
            }
            let event = client
                .send_event(agent, room, "m.room.message", &txn_key, content)
                .await?;
            // The caption (path and size) follows, so the file's place in storage is known.
            client
                .send(
                    agent,
                    room,
                    &format!("{txn_key}:caption"),
                    &OutgoingMessage::notice(caption),
                )
                .await?;
            Ok(event)
        }
    }
}

/// The `share_file` tool both kinds of agent have.
pub fn share_tool() -> crate::llm::Tool {
    crate::llm::Tool::function(
        "share_file",
        "Post a file in this room for the people here: a signed link, or the file itself (as a Matrix attachment) when `upload` is true and it is small.",
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "e.g. tasks/t-1/result.md"},
                "upload": {"type": "boolean"}
            },
            "required": ["path"]
        }),
    )
}

/// Runs `share_file` for `agent` in `room`, if its workspace may read the path.
pub async fn share_tool_call(
    services: &super::services::AgentServices,
    workspace: &super::workspace::Workspace,
    agent: &UserId,
    room: &RoomId,
    arguments: &serde_json::Value,
) -> String {
    let path = arguments
        .get("path")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let upload = arguments
        .get("upload")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let path = match workspace.readable_path(path) {
        Ok(path) => path,
        Err(error) => return format!("error: {error}"),
    };
    match share(
        &services.storage,
        &services.links,
        &services.client,
        agent,
        room,
        path.as_str(),
        upload,
    )
    .await
    {
        Ok(event) => json!({"shared": path.as_str(), "event_id": event}).to_string(),
        Err(error) => format!("error: {error}"),
    }
}
