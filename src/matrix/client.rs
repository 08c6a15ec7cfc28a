//! The HTTP side of the Matrix client: one method per endpoint we use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::error::MatrixError;
use super::message::OutgoingMessage;
use crate::secret::Secret;

/// Downloaded media, chunk by chunk (the same shape as a storage body, so it streams straight in).
pub type MediaStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static>>;

/// Attempts for one request before giving up (429 and network errors are retried).
const MAX_ATTEMPTS: u32 = 6;
/// First backoff; doubles each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait honoured from a 429's `retry_after_ms`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A client acting as the appservice (and, by masquerading, any of its users).
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: url::Url,
    as_token: Secret,
    /// crate::crypto hook: encrypts sends into encrypted rooms once set (shared by clones).
    encryptor: Arc<std::sync::OnceLock<Arc<dyn crate::crypto::RoomEncryptor>>>,
}

/// A joined member of a room.
#[derive(Debug, Clone, Deserialize)]
pub struct RoomMember {
    pub display_name: Option<String>,
}

/// A room to create.
#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// Power levels by user (the creator always has full power).
    pub power_levels: BTreeMap<OwnedUserId, i64>,
}

impl MatrixClient {
    pub fn new(base: url::Url, as_token: Secret) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("a reqwest client with static settings builds");
        Self {
            http,
            base,
            as_token,
            encryptor: Arc::default(),
        }
    }

    /// crate::crypto hook: from now on, messages into encrypted rooms are sent encrypted (by
    /// this client and every clone of it).
    pub fn set_encryptor(&self, encryptor: Arc<dyn crate::crypto::RoomEncryptor>) {
        let _ = self.encryptor.set(encryptor);
    }

    pub fn homeserver_url(&self) -> &url::Url {
        &self.base
    }

    /// `GET /_matrix/client/versions`: is there a Matrix homeserver at this URL?
    pub async fn versions(&self) -> Result<Vec<String>, MatrixError> {
        // Unauthenticated: some homeservers reject a wrong token even here, and this check is
        // about the URL, not the token.
        let path = "/_matrix/client/versions";
        let response = self
            .http
            .get(self.url(path, None, &[]))
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let answer = Self::answer(Method::GET, path, response).await?;
        Ok(answer
            .get("versions")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `GET /account/whoami` as `user` (or the appservice's own user).
    pub async fn whoami(&self, user: Option<&UserId>) -> Result<OwnedUserId, MatrixError> {
        let path = "/_matrix/client/v3/account/whoami";
        let answer = self.call_once(Method::GET, path, user, None, &[]).await?;
        answer
            .get("user_id")
            .and_then(Value::as_str)
            .and_then(|id| UserId::parse(id).ok())
            .ok_or_else(|| bad(path, "no user_id in whoami answer"))
    }

    /// Registers a virtual user in our namespace; an existing user is success.
    pub async fn register(&self, localpart: &str) -> Result<(), MatrixError> {
        let body = json!({
            "type": "m.login.application_service",
            "username": localpart,
            "inhibit_login": true,
        });
        match self
            .call(
                Method::POST,
                "/_matrix/client/v3/register",
                None,
                Some(body),
                &[],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(error) => Err(error),
        }
    }

    pub async fn set_display_name(&self, user: &UserId, name: &str) -> Result<(), MatrixError> {
        let path = profile_path(user, "displayname");
        self.call(
            Method::PUT,
            &path,
            Some(user),
            Some(json!({ "displayname": name })),
            &[],
        )
        .await
        .map(drop)
    }

    pub async fn display_name(&self, user: &UserId) -> Result<Option<String>, MatrixError> {
        let path = profile_path(user, "displayname");
        match self.call(Method::GET, &path, Some(user), None, &[]).await {
            Ok(answer) => Ok(answer
                .get("displayname")
                .and_then(Value::as_str)
                .map(str::to_owned)),
            Err(error) if error.status() == Some(404) => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub async fn set_avatar_url(&self, user: &UserId, mxc: &str) -> Result<(), MatrixError> {
        let path = profile_path(user, "avatar_url");
        self.call(
            Method::PUT,
            &path,
            Some(user),
            Some(json!({ "avatar_url": mxc })),
            &[],
        )
        .await
        .map(drop)
    }

    pub async fn join(&self, user: &UserId, room: &RoomId) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/join", enc(room.as_str()));
        self.call(Method::POST, &path, Some(user), Some(json!({})), &[])
            .await
            .map(drop)
    }

    /// Leaves a room, or declines an invite, with a reason the inviter sees.
    pub async fn leave(
        &self,
        user: &UserId,
        room: &RoomId,
        reason: Option<&str>,
    ) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room.as_str()));
        let body = match reason {
            Some(reason) => json!({ "reason": reason }),
            None => json!({}),
        };
        self.call(Method::POST, &path, Some(user), Some(body), &[])
            .await
            .map(drop)
    }

    pub async fn invite(
        &self,
        user: &UserId,
        room: &RoomId,
        invitee: &UserId,
    ) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(room.as_str()));
        self.call(
            Method::POST,
            &path,
            Some(user),
            Some(json!({ "user_id": invitee })),
            &[],
        )
        .await
        .map(drop)
    }

    /// The room an alias (`#name:server`) points to.
    pub async fn resolve_alias(&self, alias: &str) -> Result<OwnedRoomId, MatrixError> {
        let path = format!("/_matrix/client/v3/directory/room/{}", enc(alias));
        let answer = self.call(Method::GET, &path, None, None, &[]).await?;
        answer
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|id| RoomId::parse(id).ok())
            .ok_or_else(|| bad(&path, "no room_id in the alias answer"))
    }

    /// Creates a room as `user`, in the homeserver's default room version. Rooms crew creates
    /// are never encrypted: agents cannot read encrypted rooms.
    pub async fn create_room(
        &self,
        user: &UserId,
        room: &CreateRoom,
    ) -> Result<OwnedRoomId, MatrixError> {
        self.create_room_in(user, room, None).await
    }

    /// The homeserver's default room version (`/capabilities`), if it says.
    pub async fn default_room_version(&self, user: &UserId) -> Result<Option<String>, MatrixError> {
        let answer = self
            .call(
                Method::GET,
                "/_matrix/client/v3/capabilities",
                Some(user),
                None,
                &[],
            )
            .await?;
        Ok(answer
            .pointer("/capabilities/m.room_versions/default")
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    /// As [`MatrixClient::create_room`], in `version` when given (else the homeserver's
    /// default). The power levels are built for the version the room will have: before room
    /// version 12 the creator must be listed or the override takes its power away (Tuwunel's
    /// default v11), from 12 on it must not be (Synapse's default v12).
    pub async fn create_room_in(
        &self,
        user: &UserId,
        room: &CreateRoom,
        version: Option<&str>,
    ) -> Result<OwnedRoomId, MatrixError> {
        let path = "/_matrix/client/v3/createRoom";
        let version = match version {
            Some(version) => Some(version.to_owned()),
            None if room.power_levels.is_empty() => None,
            None => self.default_room_version(user).await?,
        };
        let mut body = json!({
            "preset": if room.is_direct { "trusted_private_chat" } else { "private_chat" },
            "is_direct": room.is_direct,
            "invite": room.invite,
        });
        if let Some(name) = &room.name {
            body["name"] = json!(name);
        }
        if let Some(topic) = &room.topic {
            body["topic"] = json!(topic);
        }
        if let Some(version) = &version {
            body["room_version"] = json!(version);
        }
        if !room.power_levels.is_empty() {
            let users = power_level_users(version.as_deref(), user, &room.power_levels);
            body["power_level_content_override"] = json!({ "users": users });
        }
        let answer = self
            .call(Method::POST, path, Some(user), Some(body), &[])
            .await?;
        answer
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|id| RoomId::parse(id).ok())
            .ok_or_else(|| bad(path, "no room_id in createRoom answer"))
    }

    /// Sends a message as `user`. `txn_key` identifies this send: the same key gives the same
    /// transaction id, so a retry after a crash is deduplicated by the homeserver.
    pub async fn send(
        &self,
        user: &UserId,
        room: &RoomId,
        txn_key: &str,
        message: &OutgoingMessage,
    ) -> Result<OwnedEventId, MatrixError> {
        self.send_event(user, room, "m.room.message", txn_key, message.to_content())
            .await
    }

    /// Sends any room event as `user` with a deterministic transaction id.
    pub async fn send_event(
        &self,
        user: &UserId,
        room: &RoomId,
        event_type: &str,
        txn_key: &str,
        content: Value,
    ) -> Result<OwnedEventId, MatrixError> {
        // crate::crypto hook: the same transaction id either way, so a retry stays one event.
        let (event_type, content) = match self.encryptor.get() {
            Some(encryptor) if event_type != "m.room.encrypted" => {
                match encryptor.encrypt(user, room, event_type, &content).await? {
                    Some(encrypted) => ("m.room.encrypted", encrypted),
                    None => (event_type, content),
                }
            }
            _ => (event_type, content),
        };
        let txn_id = transaction_id(user.as_str(), txn_key);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            enc(room.as_str()),
            enc(event_type),
            txn_id
        );
        let answer = self
            .call(Method::PUT, &path, Some(user), Some(content), &[])
            .await?;
        answer
            .get("event_id")
            .and_then(Value::as_str)
            .and_then(|id| ruma::EventId::parse(id).ok())
            .ok_or_else(|| bad(&path, "no event_id in send answer"))
    }

    pub async fn typing(
        &self,
        user: &UserId,
        room: &RoomId,
        typing: bool,
    ) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(room.as_str()),
            enc(user.as_str())
        );
        let body = if typing {
            json!({ "typing": true, "timeout": 30_000 })
        } else {
            json!({ "typing": false })
        };
        self.call(Method::PUT, &path, Some(user), Some(body), &[])
            .await
            .map(drop)
    }

    /// The joined members of a room, as seen by `user` (who must be in it).
    pub async fn joined_members(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<BTreeMap<OwnedUserId, RoomMember>, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            enc(room.as_str())
        );
        let answer = self.call(Method::GET, &path, Some(user), None, &[]).await?;
        let joined = answer
            .get("joined")
            .cloned()
            .ok_or_else(|| bad(&path, "no `joined` in answer"))?;
        serde_json::from_value(joined).map_err(|error| bad(&path, &error.to_string()))
    }

    /// The full current state of a room (membership, encryption, power levels, name…).
    pub async fn room_state(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<Vec<Value>, MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room.as_str()));
        let answer = self.call(Method::GET, &path, Some(user), None, &[]).await?;
        serde_json::from_value(answer).map_err(|error| bad(&path, &error.to_string()))
    }

    /// The rooms `user` has joined.
    pub async fn joined_rooms(&self, user: &UserId) -> Result<Vec<OwnedRoomId>, MatrixError> {
        let path = "/_matrix/client/v3/joined_rooms";
        let answer = self.call(Method::GET, path, Some(user), None, &[]).await?;
        let rooms = answer
            .get("joined_rooms")
            .cloned()
            .ok_or_else(|| bad(path, "no `joined_rooms` in answer"))?;
        serde_json::from_value(rooms).map_err(|error| bad(path, &error.to_string()))
    }

    /// One event by id, as `user` sees it.
    pub async fn event(
        &self,
        user: &UserId,
        room: &RoomId,
        event_id: &str,
    ) -> Result<Value, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(room.as_str()),
            enc(event_id)
        );
        self.call(Method::GET, &path, Some(user), None, &[]).await
    }

    /// Uploads bytes to the media repository; returns the `mxc://` URI.
    pub async fn upload(
        &self,
        user: &UserId,
        bytes: impl Into<reqwest::Body>,
        content_type: &str,
        filename: &str,
    ) -> Result<String, MatrixError> {
        let path = "/_matrix/media/v3/upload";
        let url = self.url(path, Some(user), &[("filename", filename)]);
        let response = self
            .http
            .post(url)
            .bearer_auth(self.as_token.expose())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes.into())
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let answer = Self::answer(Method::POST, path, response).await?;
        answer
            .get("content_uri")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(path, "no content_uri in upload answer"))
    }

    /// `GET /_matrix/client/v1/media/download/{server}/{id}` as `user`: the media as a stream
    /// of chunks (never held whole in memory) and its content type. A file announced or found to
    /// be over `max_bytes` fails (the stream ends with an error once past the limit).
    pub async fn download(
        &self,
        user: &UserId,
        mxc: &str,
        max_bytes: u64,
    ) -> Result<(MediaStream, String), MatrixError> {
        use futures::TryStreamExt;
        let (server, media_id) = mxc
            .strip_prefix("mxc://")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(server, id)| !server.is_empty() && !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| bad("media download", "not an mxc:// URI"))?;
        let path = format!(
            "/_matrix/client/v1/media/download/{}/{}",
            enc(server),
            enc(media_id)
        );
        let response = self
            .http
            .get(self.url(&path, Some(user), &[]))
            .bearer_auth(self.as_token.expose())
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        if !response.status().is_success() {
            return Err(Self::answer(Method::GET, &path, response)
                .await
                .err()
                .unwrap_or_else(|| bad(&path, "download failed")));
        }
        if response.content_length().is_some_and(|len| len > max_bytes) {
            return Err(bad(
                &path,
                &format!("the file is larger than {max_bytes} bytes"),
            ));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let mut seen: u64 = 0;
        let body = response
            .bytes_stream()
            .map_err(|error| std::io::Error::other(error.without_url()))
            .and_then(move |chunk| {
                seen = seen.saturating_add(chunk.len() as u64);
                futures::future::ready(if seen > max_bytes {
                    Err(std::io::Error::other(format!(
                        "the file is larger than {max_bytes} bytes"
                    )))
                } else {
                    Ok(chunk)
                })
            });
        Ok((Box::pin(body), content_type))
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: asks the homeserver to call us back. A
    /// success also makes it resend transactions it was holding back.
    pub async fn ping(&self, appservice_id: &str, txn_id: &str) -> Result<u64, MatrixError> {
        let path = format!("/_matrix/client/v1/appservice/{}/ping", enc(appservice_id));
        let answer = self
            .call_once(
                Method::POST,
                &path,
                None,
                Some(json!({ "transaction_id": txn_id })),
                &[],
            )
            .await?;
        Ok(answer
            .get("duration_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0))
    }

    /// A request with retries on 429 (honouring `retry_after_ms`) and on network errors.
    async fn call(
        &self,
        method: Method,
        path: &str,
        user: Option<&UserId>,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<Value, MatrixError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let result = self
                .call_once(method.clone(), path, user, body.clone(), query)
                .await;
            let wait = match &result {
                Err(MatrixError::Unreachable { .. }) => backoff,
                Err(MatrixError::Api {
                    status: 429, error, ..
                }) => retry_after(error).unwrap_or(backoff),
                Err(MatrixError::Api { status, .. }) if *status >= 500 => backoff,
                _ => return result,
            };
            if attempt >= MAX_ATTEMPTS {
                return result;
            }
            tracing::debug!(path, attempt, ?wait, "retrying homeserver request");
            tokio::time::sleep(wait.min(MAX_RETRY_AFTER)).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        user: Option<&UserId>,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<Value, MatrixError> {
        let mut request = self
            .http
            .request(method.clone(), self.url(path, user, query))
            .bearer_auth(self.as_token.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        Self::answer(method, path, response).await
    }

    async fn answer(
        method: Method,
        path: &str,
        response: reqwest::Response,
    ) -> Result<Value, MatrixError> {
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| MatrixError::BadResponse {
                path: path.to_owned(),
                message: error.to_string(),
            })?;
        let value: Value = if text.is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "error": text }))
        };
        if status.is_success() {
            return Ok(value);
        }
        let errcode = value
            .get("errcode")
            .and_then(Value::as_str)
            .unwrap_or("M_UNKNOWN")
            .to_owned();
        // Keep retry_after_ms reachable for the retry loop without a second type.
        let mut error = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if let Some(ms) = value.get("retry_after_ms").and_then(Value::as_u64) {
            error = format!("{error} [retry_after_ms={ms}]");
        }
        Err(MatrixError::Api {
            method: method.to_string(),
            path: path.split('?').next().unwrap_or(path).to_owned(),
            status: status.as_u16(),
            errcode,
            error,
        })
    }

    fn url(&self, path: &str, user: Option<&UserId>, query: &[(&str, &str)]) -> url::Url {
        let mut url = self.base.clone();
        // `path` is already percent-encoded where it carries ids.
        url.set_path(&format!(
            "{}{}",
            self.base.path().trim_end_matches('/'),
            path
        ));
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(user) = user {
                pairs.append_pair("user_id", user.as_str());
            }
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    fn unreachable(&self, error: reqwest::Error) -> MatrixError {
        // reqwest's message may include the URL with our query, never the token (it is a header).
        MatrixError::Unreachable {
            url: self.base.to_string(),
            message: error.without_url().to_string(),
        }
    }
}

fn retry_after(error: &str) -> Option<Duration> {
    let start = error.find("[retry_after_ms=")? + "[retry_after_ms=".len();
    let end = error[start..].find(']')? + start;
    error[start..end].parse().ok().map(Duration::from_millis)
}

/// A transaction id derived from who sends and why, so that a retry reuses it.
fn transaction_id(sender: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(sender.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    format!("crew.{}", &hex::encode(hasher.finalize())[..32])
}

/// `/_matrix/client/v3/profile/{user}/{field}`.
fn profile_path(user: &UserId, field: &str) -> String {
    format!("/_matrix/client/v3/profile/{}/{field}", enc(user.as_str()))
}

/// Characters escaped in a path segment: everything but RFC 3986's unreserved characters.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

fn bad(path: &str, message: &str) -> MatrixError {
    MatrixError::BadResponse {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

/// Whether rooms of `version` give their creators unlimited power by themselves (room version
/// 12 and its MSC4289 predecessor): then the creator must not appear in `users`.
pub fn creators_are_privileged(version: &str) -> bool {
    version == "org.matrix.hydra.11" || version.parse::<u32>().is_ok_and(|number| number >= 12)
}

/// The `users` of a createRoom power-level override: `wanted` for the others, and the creator
/// at 100 where the room version needs it listed (an unknown version leaves it out).
pub fn power_level_users(
    version: Option<&str>,
    creator: &UserId,
    wanted: &BTreeMap<OwnedUserId, i64>,
) -> BTreeMap<OwnedUserId, i64> {
    let mut users = wanted.clone();
    match version {
        Some(version) if !creators_are_privileged(version) => {
            users.insert(creator.to_owned(), 100);
        }
        _ => {
            users.remove(creator);
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_deterministic_and_distinct() {
        assert_eq!(transaction_id("@a:x", "k"), transaction_id("@a:x", "k"));
        assert_ne!(transaction_id("@a:x", "k"), transaction_id("@b:x", "k"));
        assert_ne!(transaction_id("@a:x", "k"), transaction_id("@a:x", "k2"));
    }

    #[test]
    fn the_creator_is_listed_before_room_version_12_only() {
        let creator = UserId::parse("@crew:example.org").unwrap();
        let admin = UserId::parse("@admin:example.org").unwrap();
        let wanted = BTreeMap::from([(admin.clone(), 100), (creator.clone(), 50)]);
        for version in ["1", "10", "11"] {
            let users = power_level_users(Some(version), &creator, &wanted);
            assert_eq!(users.get(&creator), Some(&100), "v{version}");
            assert_eq!(users.get(&admin), Some(&100));
        }
        for version in [Some("12"), Some("13"), Some("org.matrix.hydra.11"), None] {
            let users = power_level_users(version, &creator, &wanted);
            assert_eq!(users.get(&creator), None, "{version:?}");
            assert_eq!(users.get(&admin), Some(&100));
        }
    }

    #[test]
    fn retry_after_is_read_back() {
        assert_eq!(
            retry_after("Too many [retry_after_ms=1500]"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after("nothing"), None);
    }
}
