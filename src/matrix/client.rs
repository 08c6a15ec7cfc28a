//! The HTTP side of the Matrix client: one method per endpoint we use, each a typed ruma request
//! (`ruma::api::client`) sent over our reqwest client and read back as ruma's typed response or
//! error, so paths, bodies and error codes come from one well-kept definition of the spec.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::Retryable;
use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::{
    account, alias, appservice, authenticated_media, discovery, media, membership, message,
    profile, room as rooms, state, typing as typing_api,
};
use ruma::api::error::{
    Error as RumaError, ErrorBody, ErrorKind, FromHttpResponseError, RetryAfter,
};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{
    AppserviceUserIdentity, EndpointError, IncomingResponse, MatrixVersion, OutgoingRequest,
    OutgoingRequestAppserviceExt, SupportedVersions,
};
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::MatrixError;
use super::message::OutgoingMessage;
use crate::secret::Secret;

/// Downloaded media, chunk by chunk (the same shape as a storage body, so it streams straight in).
pub type MediaStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static>>;

/// Retries for one request after its first attempt (429, 5xx and network errors are retried).
const MAX_RETRIES: usize = 5;
/// First backoff; doubles each attempt (with jitter).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait honoured from a 429's `Retry-After` / `retry_after_ms`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The spec version whose endpoint paths we use (ruma picks the stable path for each endpoint
/// from it): 1.11, for authenticated media; Synapse and Tuwunel both serve it.
const SPEC_VERSION: MatrixVersion = MatrixVersion::V1_11;

/// A client acting as the appservice (and, by masquerading, any of its users).
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: url::Url,
    as_token: Secret,
    versions: SupportedVersions,
    /// crate::crypto hook: encrypts sends into encrypted rooms once set (shared by clones).
    encryptor: Arc<std::sync::OnceLock<Arc<dyn crate::crypto::RoomEncryptor>>>,
}

/// A file uploaded for a room, as its event refers to it.
#[derive(Debug, Clone)]
pub enum UploadedMedia {
    /// The `mxc://` URI of the file as it is (the event's `url`).
    Clear(String),
    /// The spec's `EncryptedFile` (`url`, `key`, `iv`, `hashes`, `v`): the event's `file`.
    Encrypted(Value),
}

impl UploadedMedia {
    /// Puts the reference into a message's content (`url` or `file`).
    pub fn insert_into(self, content: &mut serde_json::Map<String, Value>) {
        match self {
            UploadedMedia::Clear(url) => content.insert("url".to_owned(), Value::from(url)),
            UploadedMedia::Encrypted(file) => content.insert("file".to_owned(), file),
        };
    }
}

/// A joined member of a room.
pub type RoomMember = membership::joined_members::v3::RoomMember;

/// A room to create.
#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// Power levels by user (the creator always has full power).
    pub power_levels: BTreeMap<OwnedUserId, i64>,
    /// Extra `creation_content` fields (the outbox's idempotency key, found again by
    /// [`MatrixClient::created_room_with`]).
    pub creation_content: serde_json::Map<String, Value>,
}

/// The path input of the endpoints we call: versioned paths are chosen for [`SPEC_VERSION`].
pub trait PathFor: PathBuilder {
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathFor for VersionHistory {
    fn input(versions: &SupportedVersions) -> Cow<'_, SupportedVersions> {
        Cow::Borrowed(versions)
    }
}

impl PathFor for SinglePath {
    fn input(_: &SupportedVersions) {}
}

/// Who a request is sent as: the appservice's token always, and the puppet as `user_id`.
#[derive(Clone, Copy)]
enum Auth<'a> {
    /// No token at all (`/versions`: the check is about the URL, not the token).
    Anonymous,
    /// The appservice's own user.
    Appservice,
    /// One of our users, by masquerading.
    As(&'a UserId),
    /// One of our users' devices, by masquerading (`user_id` and `device_id`): the requests of
    /// an agent's encryption device, which keeps no access token of its own.
    Device(&'a DeviceIdentity),
}

/// An agent's device, as requests assert it (`user_id` and `device_id` with the appservice
/// token: Synapse accepts a device of an appservice user this way, even for the appservice's own
/// sender user, whose login tokens it does not accept).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    pub user_id: OwnedUserId,
    pub device_id: ruma::OwnedDeviceId,
}

/// How many of a room's latest events [`MatrixClient::recent_event_where`] reads at most: an
/// unacknowledged send is looked for soon after it, so it is among the last few hundred.
pub const RECENT_EVENTS_SEARCHED: usize = 500;
/// Events per `/messages` page.
const MESSAGES_PAGE: u32 = 100;

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
            versions: SupportedVersions {
                versions: BTreeSet::from([SPEC_VERSION]),
                features: BTreeSet::new(),
            },
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
        let request = discovery::get_supported_versions::Request::new();
        let answer = self.call_once(request, Auth::Anonymous).await?;
        Ok(answer.versions)
    }

    /// `GET /account/whoami` as `user` (or the appservice's own user).
    pub async fn whoami(&self, user: Option<&UserId>) -> Result<OwnedUserId, MatrixError> {
        let auth = user.map_or(Auth::Appservice, Auth::As);
        let request = account::whoami::v3::Request::new();
        Ok(self.call_once(request, auth).await?.user_id)
    }

    /// Registers a virtual user in our namespace; an existing user is success.
    pub async fn register(&self, localpart: &str) -> Result<(), MatrixError> {
        let mut request = account::register::v3::Request::new();
        request.username = Some(localpart.to_owned());
        request.inhibit_login = true;
        request.login_type = Some(account::register::LoginType::ApplicationService);
        match self.call(request, Auth::Appservice).await {
            Ok(_) => Ok(()),
            Err(error) if error.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(error) => Err(error),
        }
    }

    // The per-field profile endpoints: the generic `profile/{user}/{field}` one is stable only
    // from spec 1.16, which Tuwunel does not announce.
    #[allow(deprecated)]
    pub async fn set_display_name(&self, user: &UserId, name: &str) -> Result<(), MatrixError> {
        let request =
            profile::set_display_name::v3::Request::new(user.to_owned(), Some(name.to_owned()));
        self.call(request, Auth::As(user)).await.map(drop)
    }

    #[allow(deprecated)]
    pub async fn display_name(&self, user: &UserId) -> Result<Option<String>, MatrixError> {
        let request = profile::get_display_name::v3::Request::new(user.to_owned());
        match self.call(request, Auth::As(user)).await {
            Ok(answer) => Ok(answer.displayname),
            Err(error) if error.status() == Some(404) => Ok(None),
            Err(error) => Err(error),
        }
    }

    #[allow(deprecated)]
    pub async fn set_avatar_url(&self, user: &UserId, mxc: &str) -> Result<(), MatrixError> {
        let request = profile::set_avatar_url::v3::Request::new(user.to_owned(), Some(mxc.into()));
        self.call(request, Auth::As(user)).await.map(drop)
    }

    pub async fn join(&self, user: &UserId, room: &RoomId) -> Result<(), MatrixError> {
        let request = membership::join_room_by_id::v3::Request::new(room.to_owned());
        self.call(request, Auth::As(user)).await.map(drop)
    }

    /// Leaves a room, or declines an invite, with a reason the inviter sees.
    pub async fn leave(
        &self,
        user: &UserId,
        room: &RoomId,
        reason: Option<&str>,
    ) -> Result<(), MatrixError> {
        let mut request = membership::leave_room::v3::Request::new(room.to_owned());
        request.reason = reason.map(str::to_owned);
        self.call(request, Auth::As(user)).await.map(drop)
    }

    pub async fn invite(
        &self,
        user: &UserId,
        room: &RoomId,
        invitee: &UserId,
    ) -> Result<(), MatrixError> {
        use membership::invite_user::v3::{InvitationRecipient, InviteUserId};
        let recipient = InvitationRecipient::UserId(InviteUserId::new(invitee.to_owned()));
        let request = membership::invite_user::v3::Request::new(room.to_owned(), recipient);
        self.call(request, Auth::As(user)).await.map(drop)
    }

    /// The room an alias (`#name:server`) points to.
    pub async fn resolve_alias(&self, alias: &str) -> Result<OwnedRoomId, MatrixError> {
        let alias = RoomAliasId::parse(alias).map_err(|error| MatrixError::Request {
            what: "resolve a room alias".to_owned(),
            message: format!("`{alias}` is not a room alias: {error}"),
        })?;
        let request = alias::get_alias::v3::Request::new(alias);
        Ok(self.call(request, Auth::Appservice).await?.room_id)
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
        let request = discovery::get_capabilities::v3::Request::new();
        let answer = self.call(request, Auth::As(user)).await?;
        Ok(Some(answer.capabilities.room_versions.default.to_string()))
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
        use rooms::create_room::RoomPowerLevelsContentOverride;
        use rooms::create_room::v3::{Request, RoomPreset};
        let version = match version {
            Some(version) => Some(version.to_owned()),
            None if room.power_levels.is_empty() => None,
            None => self.default_room_version(user).await?,
        };
        let mut request = Request::new();
        request.preset = Some(if room.is_direct {
            RoomPreset::TrustedPrivateChat
        } else {
            RoomPreset::PrivateChat
        });
        request.is_direct = room.is_direct;
        request.invite = room.invite.clone();
        request.name = room.name.clone();
        request.topic = room.topic.clone();
        request.room_version = version
            .as_deref()
            .map(ruma::RoomVersionId::try_from)
            .transpose()
            .map_err(|error| MatrixError::Request {
                what: "createRoom".to_owned(),
                message: format!("room version: {error}"),
            })?;
        if !room.creation_content.is_empty() {
            let content =
                serde_json::value::to_raw_value(&room.creation_content).map_err(|error| {
                    MatrixError::Request {
                        what: "createRoom".to_owned(),
                        message: format!("creation content: {error}"),
                    }
                })?;
            request.creation_content = Some(Raw::from_json(content));
        }
        if !room.power_levels.is_empty() {
            let mut content = RoomPowerLevelsContentOverride::new();
            content.users = power_level_users(version.as_deref(), user, &room.power_levels)
                .into_iter()
                .map(|(user, level)| (user, ruma::Int::new_saturating(level)))
                .collect();
            request.power_level_content_override =
                Some(Raw::new(&content).map_err(|error| MatrixError::Request {
                    what: "createRoom".to_owned(),
                    message: error.to_string(),
                })?);
        }
        // Never re-posted blindly (a lost answer would make a second room): only a refusal
        // (429, nothing created) is asked again.
        Ok(self
            .call_unless_sent(request, Auth::As(user))
            .await?
            .room_id)
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
        self.send_event_retried(
            user,
            room,
            event_type,
            txn_key,
            content,
            MatrixError::is_transient,
        )
        .await
    }

    /// crate::crypto hook: in an encrypted room, `content` encrypted (the transaction id is the
    /// caller's either way, so a retry stays one event). The outbox key stays readable beside
    /// the ciphertext, so an unacknowledged send is still found before it goes again.
    async fn encrypted_if_needed<'t>(
        &self,
        user: &UserId,
        room: &RoomId,
        event_type: &'t str,
        content: Value,
    ) -> Result<(&'t str, Value), MatrixError> {
        let Some(encryptor) = self.encryptor.get() else {
            return Ok((event_type, content));
        };
        if event_type == "m.room.encrypted" {
            return Ok((event_type, content));
        }
        match encryptor.encrypt(user, room, event_type, &content).await? {
            Some(mut encrypted) => {
                let key = crate::outbox::OUTBOX_KEY_FIELD;
                if let (Some(outer), Some(value)) = (encrypted.as_object_mut(), content.get(key)) {
                    outer.insert(key.to_owned(), value.clone());
                }
                Ok(("m.room.encrypted", encrypted))
            }
            None => Ok((event_type, content)),
        }
    }

    /// As [`MatrixClient::send_event`], retried only on 429: the caller looks for an
    /// unacknowledged attempt's event before it sends again.
    pub async fn send_event_once(
        &self,
        user: &UserId,
        room: &RoomId,
        event_type: &str,
        txn_key: &str,
        content: Value,
    ) -> Result<OwnedEventId, MatrixError> {
        self.send_event_retried(user, room, event_type, txn_key, content, nothing_was_made)
            .await
    }

    /// A room event sent as `user` (encrypted where the room is), retried while `retried` says.
    async fn send_event_retried(
        &self,
        user: &UserId,
        room: &RoomId,
        event_type: &str,
        txn_key: &str,
        content: Value,
        retried: fn(&MatrixError) -> bool,
    ) -> Result<OwnedEventId, MatrixError> {
        let (event_type, content) = self
            .encrypted_if_needed(user, room, event_type, content)
            .await?;
        let request = send_request(user, room, event_type, txn_key, &content)?;
        Ok(self
            .call_retrying(request, Auth::As(user), retried)
            .await?
            .event_id)
    }

    /// The newest of `room`'s latest [`RECENT_EVENTS_SEARCHED`] events (`/messages`
    /// backwards, as `user`) that `matches`, if any.
    pub async fn recent_event_where(
        &self,
        user: &UserId,
        room: &RoomId,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Option<OwnedEventId>, MatrixError> {
        use message::get_message_events::v3::Request;
        let mut from: Option<String> = None;
        let mut seen = 0;
        while seen < RECENT_EVENTS_SEARCHED {
            let mut request = Request::new(room.to_owned(), ruma::api::Direction::Backward);
            request.limit = ruma::UInt::from(MESSAGES_PAGE);
            request.from = from.take();
            let answer = self.call(request, Auth::As(user)).await?;
            let found = answer.chunk.iter().find_map(|event| {
                let event: Value = serde_json::from_str(event.json().get()).ok()?;
                if !matches(&event) {
                    return None;
                }
                event
                    .get("event_id")
                    .and_then(Value::as_str)
                    .and_then(|id| ruma::EventId::parse(id).ok())
            });
            if found.is_some() {
                return Ok(found);
            }
            seen += answer.chunk.len();
            match answer.end {
                Some(end) if !answer.chunk.is_empty() => from = Some(end),
                _ => break,
            }
        }
        Ok(None)
    }

    /// A room `user` is in whose `m.room.create` content has `field` = `value` (a room an
    /// unacknowledged createRoom made), if any.
    pub async fn created_room_with(
        &self,
        user: &UserId,
        field: &str,
        value: &str,
    ) -> Result<Option<OwnedRoomId>, MatrixError> {
        use state::get_state_event_for_key::v3::Request;
        for room in self.joined_rooms(user).await? {
            let request = Request::new(
                room.clone(),
                ruma::events::StateEventType::RoomCreate,
                String::new(),
            );
            match self.call(request, Auth::As(user)).await {
                Ok(answer) => {
                    let content: Value =
                        serde_json::from_str(answer.event_or_content.get()).unwrap_or_default();
                    if content.get(field).and_then(Value::as_str) == Some(value) {
                        return Ok(Some(room));
                    }
                }
                Err(error) if error.status().is_some_and(|status| status < 500) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    pub async fn typing(
        &self,
        user: &UserId,
        room: &RoomId,
        typing: bool,
    ) -> Result<(), MatrixError> {
        use typing_api::create_typing_event::v3::{Request, Typing, TypingInfo};
        let state = if typing {
            Typing::Yes(TypingInfo::new(Duration::from_secs(30)))
        } else {
            Typing::No
        };
        let request = Request::new(user.to_owned(), room.to_owned(), state);
        self.call(request, Auth::As(user)).await.map(drop)
    }

    /// The joined members of a room, as seen by `user` (who must be in it).
    pub async fn joined_members(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<BTreeMap<OwnedUserId, RoomMember>, MatrixError> {
        let request = membership::joined_members::v3::Request::new(room.to_owned());
        Ok(self.call(request, Auth::As(user)).await?.joined)
    }

    /// The full current state of a room (membership, encryption, power levels, name…), as the
    /// raw events: the room model reads them as it reads the events of a transaction.
    pub async fn room_state(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<Vec<Value>, MatrixError> {
        let request = state::get_state_events::v3::Request::new(room.to_owned());
        let answer = self.call(request, Auth::As(user)).await?;
        answer
            .room_state
            .iter()
            .map(|event| {
                serde_json::from_str(event.json().get()).map_err(|error| MatrixError::BadResponse {
                    path: format!("room state of {room}"),
                    message: error.to_string(),
                })
            })
            .collect()
    }

    /// The rooms `user` has joined.
    pub async fn joined_rooms(&self, user: &UserId) -> Result<Vec<OwnedRoomId>, MatrixError> {
        let request = membership::joined_rooms::v3::Request::new();
        Ok(self.call(request, Auth::As(user)).await?.joined_rooms)
    }

    /// Uploads bytes to the media repository; returns the `mxc://` URI.
    pub async fn upload(
        &self,
        user: &UserId,
        bytes: impl Into<Vec<u8>>,
        content_type: &str,
        filename: &str,
    ) -> Result<String, MatrixError> {
        let mut request = media::create_content::v3::Request::new(bytes.into());
        request.content_type = Some(content_type.to_owned());
        request.filename = Some(filename.to_owned());
        Ok(self
            .call(request, Auth::As(user))
            .await?
            .content_uri
            .to_string())
    }

    /// Uploads a file to be posted in `room`: in an encrypted room as ciphertext (the key goes
    /// in the event's `file` field, inside the encrypted event, and the media repository never
    /// sees the bytes or the file name), elsewhere as it is.
    pub async fn upload_for_room(
        &self,
        user: &UserId,
        room: &RoomId,
        bytes: Vec<u8>,
        content_type: &str,
        filename: &str,
    ) -> Result<UploadedMedia, MatrixError> {
        let encrypted = match self.encryptor.get() {
            Some(encryptor) => encryptor.is_encrypted(user, room).await?,
            None => false,
        };
        if !encrypted {
            return Ok(UploadedMedia::Clear(
                self.upload(user, bytes, content_type, filename).await?,
            ));
        }
        let (ciphertext, mut file) =
            crate::crypto::attachments::encrypt(bytes)
                .await
                .map_err(|error| MatrixError::Request {
                    what: "encrypt an attachment".to_owned(),
                    message: error.to_string(),
                })?;
        let mut request = media::create_content::v3::Request::new(ciphertext);
        request.content_type = Some("application/octet-stream".to_owned());
        let url = self.call(request, Auth::As(user)).await?.content_uri;
        if let Some(fields) = file.as_object_mut() {
            fields.insert("url".to_owned(), Value::from(url.to_string()));
        }
        Ok(UploadedMedia::Encrypted(file))
    }

    /// `GET /_matrix/client/v1/media/download/{server}/{id}` as `user`: the media as a stream
    /// of chunks (never held whole in memory) and its content type. A file announced or found to
    /// be over `max_bytes` fails (the stream ends with an error once past the limit).
    ///
    /// The request is ruma's; the answer is read by hand, because ruma's typed response holds
    /// the whole file in memory and we stream it with a size cap.
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
        let server = ruma::ServerName::parse(server)
            .map_err(|_| bad("media download", "not an mxc:// URI"))?;
        let request =
            authenticated_media::get_content::v1::Request::new(media_id.to_owned(), server);
        let http_request = self.http_request(request, Auth::As(user))?;
        let path = http_request.uri().path().to_owned();
        let response = self.execute(http_request).await?;
        if !response.status().is_success() {
            let response = read_whole(response, &path).await?;
            return Err(api_error(
                "GET",
                &path,
                RumaError::from_http_response(response),
            ));
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

    /// Sends one request of an agent's encryption device (its key uploads, queries and claims,
    /// to-device messages, signatures), asserting the device with the appservice token and
    /// retrying transient failures. The requests are `matrix-sdk-crypto`'s, in ruma's types.
    pub async fn call_as_device<R>(
        &self,
        request: R,
        device: &DeviceIdentity,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.call(request, Auth::Device(device)).await
    }

    /// Creates the device `device_id` for `user` by logging in as the appservice (the spec's
    /// `m.login.application_service`, on Synapse and Tuwunel alike). The access token it
    /// returns is not kept: requests assert the device with the appservice token instead.
    pub async fn login_device(
        &self,
        user: &UserId,
        device_id: &ruma::DeviceId,
        display_name: &str,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::session::login::v3::{ApplicationService, LoginInfo, Request};
        use ruma::api::client::uiaa::{MatrixUserIdentifier, UserIdentifier};
        let identifier = UserIdentifier::Matrix(MatrixUserIdentifier::new(user.to_string()));
        let mut request = Request::new(LoginInfo::ApplicationService(ApplicationService::new(
            identifier,
        )));
        request.device_id = Some(device_id.to_owned());
        request.initial_device_display_name = Some(display_name.to_owned());
        let answer = self.call(request, Auth::Appservice).await?;
        if answer.device_id != device_id {
            return Err(bad(
                "/_matrix/client/v3/login",
                &format!(
                    "the login made device {}, not {device_id}",
                    answer.device_id
                ),
            ));
        }
        Ok(())
    }

    /// Whether the homeserver still knows `device`: false when it refuses the device
    /// (`M_UNKNOWN_DEVICE`, or any 400/401/403/404 answer about it).
    pub async fn device_exists(&self, device: &DeviceIdentity) -> Result<bool, MatrixError> {
        let request = account::whoami::v3::Request::new();
        match self.call(request, Auth::Device(device)).await {
            Ok(answer) => Ok(answer.device_id.as_deref() == Some(&*device.device_id)),
            Err(MatrixError::Api {
                status: 400 | 401 | 403 | 404,
                ..
            }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The room's `m.room.encryption` content, as `user` sees it; None when there is none.
    pub async fn room_encryption(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<Option<Value>, MatrixError> {
        use state::get_state_event_for_key::v3::Request;
        let request = Request::new(
            room.to_owned(),
            ruma::events::StateEventType::RoomEncryption,
            String::new(),
        );
        match self.call(request, Auth::As(user)).await {
            Ok(answer) => serde_json::from_str(answer.event_or_content.get())
                .map(Some)
                .map_err(|error| bad("m.room.encryption", &error.to_string())),
            Err(error) if error.status() == Some(404) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The joined and invited members of `room` as `user` sees them (everyone who gets an
    /// encrypted room's key).
    pub async fn joined_and_invited(
        &self,
        user: &UserId,
        room: &RoomId,
    ) -> Result<Vec<OwnedUserId>, MatrixError> {
        let request = membership::get_member_events::v3::Request::new(room.to_owned());
        let answer = self.call(request, Auth::As(user)).await?;
        Ok(answer
            .chunk
            .iter()
            .filter_map(|event| serde_json::from_str::<Value>(event.json().get()).ok())
            .filter(|event| {
                matches!(
                    event.pointer("/content/membership").and_then(Value::as_str),
                    Some("join" | "invite")
                )
            })
            .filter_map(|event| {
                event
                    .get("state_key")
                    .and_then(Value::as_str)
                    .and_then(|id| UserId::parse(id).ok())
            })
            .collect())
    }

    /// One `/sync` long poll as `device` with `filter` (no retry: the caller's loop backs off).
    pub async fn sync_as_device(
        &self,
        device: &DeviceIdentity,
        filter: &ruma::api::client::filter::FilterDefinition,
        since: Option<&str>,
        timeout: Duration,
    ) -> Result<ruma::api::client::sync::sync_events::v3::Response, MatrixError> {
        use ruma::api::client::sync::sync_events::v3::{Filter, Request};
        let mut request = Request::new();
        request.filter = Some(Filter::FilterDefinition(filter.clone()));
        request.since = since.map(str::to_owned);
        request.timeout = Some(timeout);
        self.call_once(request, Auth::Device(device)).await
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: asks the homeserver to call us back. A
    /// success also makes it resend transactions it was holding back.
    pub async fn ping(&self, appservice_id: &str, txn_id: &str) -> Result<u64, MatrixError> {
        let mut request = appservice::request_ping::v1::Request::new(appservice_id.to_owned());
        request.transaction_id = Some(txn_id.into());
        let answer = self.call_once(request, Auth::Appservice).await?;
        Ok(u64::try_from(answer.duration.as_millis()).unwrap_or(u64::MAX))
    }

    /// A request with retries on 429 (honouring `Retry-After` / `retry_after_ms`), 5xx and
    /// network errors: exponential backoff with jitter.
    async fn call<R>(&self, request: R, auth: Auth<'_>) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.call_retrying(request, auth, MatrixError::is_transient)
            .await
    }

    /// A request retried only while the homeserver refuses it with 429 (it made nothing): a
    /// network error or a 5xx may hide a request that was carried out, so it is the caller's
    /// to look before asking again.
    async fn call_unless_sent<R>(
        &self,
        request: R,
        auth: Auth<'_>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.call_retrying(request, auth, nothing_was_made).await
    }

    /// A request retried while `retried` says so (honouring `Retry-After` / `retry_after_ms`):
    /// exponential backoff with jitter.
    async fn call_retrying<R>(
        &self,
        request: R,
        auth: Auth<'_>,
        retried: fn(&MatrixError) -> bool,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_request = self.http_request(request, auth)?;
        let path = http_request.uri().path().to_owned();
        (|| self.send_and_read::<R>(http_request.clone()))
            .retry(crate::retry::exponential(
                FIRST_BACKOFF,
                MAX_RETRY_AFTER,
                MAX_RETRIES,
            ))
            .sleep(tokio::time::sleep)
            .when(retried)
            .adjust(|error, wait| honour_retry_after(error, wait, MAX_RETRY_AFTER))
            .notify(|error, wait| {
                tracing::debug!(%path, %error, ?wait, "retrying homeserver request");
            })
            .await
    }

    /// One attempt, no retry (for checks whose caller decides what a failure means).
    async fn call_once<R>(
        &self,
        request: R,
        auth: Auth<'_>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_request = self.http_request(request, auth)?;
        self.send_and_read::<R>(http_request).await
    }

    /// The HTTP request for `request`: ruma builds the path, query and body; we add the
    /// appservice token and, for a puppet, the `user_id` query parameter.
    fn http_request<R>(
        &self,
        request: R,
        auth: Auth<'_>,
    ) -> Result<http::Request<Vec<u8>>, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathFor,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let token = match auth {
            Auth::Anonymous => SendAccessToken::None,
            Auth::Appservice | Auth::As(_) | Auth::Device(_) => {
                SendAccessToken::Always(self.as_token.expose())
            }
        };
        let identity = match auth {
            Auth::As(user) => AppserviceUserIdentity::new(user),
            Auth::Device(device) => {
                let mut identity = AppserviceUserIdentity::new(&device.user_id);
                identity.device_id = Some(&device.device_id);
                identity
            }
            Auth::Anonymous | Auth::Appservice => AppserviceUserIdentity::default(),
        };
        let path_input = <R::PathBuilder as PathFor>::input(&self.versions);
        request
            .try_into_http_request_with_identity(self.base.as_str(), token, identity, path_input)
            .map_err(|error| MatrixError::Request {
                what: format!(
                    "{} {}",
                    R::METHOD,
                    R::PATH_BUILDER.all_paths().next().unwrap_or("")
                ),
                // ruma's message never holds the token: it is a header.
                message: error.to_string(),
            })
    }

    async fn send_and_read<R>(
        &self,
        http_request: http::Request<Vec<u8>>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::EndpointError: ServerError,
    {
        let method = http_request.method().to_string();
        let path = http_request.uri().path().to_owned();
        let response = self.execute(http_request).await?;
        let response = read_whole(response, &path).await?;
        R::IncomingResponse::try_from_http_response(response).map_err(|error| match error {
            FromHttpResponseError::Server(error) => error.into_matrix_error(&method, &path),
            FromHttpResponseError::Deserialization(error) => bad(&path, &error.to_string()),
            other => bad(&path, &other.to_string()),
        })
    }

    async fn execute(
        &self,
        http_request: http::Request<Vec<u8>>,
    ) -> Result<reqwest::Response, MatrixError> {
        let request =
            reqwest::Request::try_from(http_request).map_err(|error| self.unreachable(error))?;
        self.http
            .execute(request)
            .await
            .map_err(|error| self.unreachable(error))
    }

    fn unreachable(&self, error: reqwest::Error) -> MatrixError {
        // reqwest's message may include the URL with our query, never the token (it is a header).
        MatrixError::Unreachable {
            url: self.base.to_string(),
            message: error.without_url().to_string(),
        }
    }
}

/// The wait before the next homeserver attempt: the backoff's, at least what the homeserver
/// asked for (`Retry-After` / `retry_after_ms`), at most `cap`.
pub fn honour_retry_after(
    error: &MatrixError,
    wait: Option<Duration>,
    cap: Duration,
) -> Option<Duration> {
    crate::retry::at_least_asked(wait, error.retry_after(), cap)
}

/// A refusal that made nothing (429): the only failure of a creating request that is asked again
/// without looking first.
fn nothing_was_made(error: &MatrixError) -> bool {
    error.status() == Some(429)
}

/// The `PUT /rooms/{room}/send/{type}/{txnId}` request for `content`, its transaction id derived
/// from `user` and `txn_key` (the same key, the same id).
fn send_request(
    user: &UserId,
    room: &RoomId,
    event_type: &str,
    txn_key: &str,
    content: &Value,
) -> Result<message::send_message_event::v3::Request, MatrixError> {
    let txn_id = transaction_id(user.as_str(), txn_key);
    let body = serde_json::value::to_raw_value(content).map_err(|error| MatrixError::Request {
        what: format!("send {event_type}"),
        message: error.to_string(),
    })?;
    Ok(message::send_message_event::v3::Request::new_raw(
        room.to_owned(),
        txn_id.into(),
        event_type.into(),
        Raw::from_json(body),
    ))
}

/// The whole body of `response`, as the `http::Response` ruma reads.
async fn read_whole(
    response: reqwest::Response,
    path: &str,
) -> Result<http::Response<bytes::Bytes>, MatrixError> {
    let mut builder = http::Response::builder().status(response.status());
    if let Some(headers) = builder.headers_mut() {
        headers.extend(
            response
                .headers()
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
    }
    // A body cut off is the connection failing, not the homeserver's answer: retried.
    let body = response
        .bytes()
        .await
        .map_err(|error| MatrixError::Unreachable {
            url: path.to_owned(),
            message: error.without_url().to_string(),
        })?;
    builder
        .body(body)
        .map_err(|error| bad(path, &error.to_string()))
}

/// The error answers of the endpoints we call, as a [`MatrixError`].
pub trait ServerError: EndpointError {
    fn into_matrix_error(self, method: &str, path: &str) -> MatrixError;
}

impl ServerError for RumaError {
    fn into_matrix_error(self, method: &str, path: &str) -> MatrixError {
        api_error(method, path, self)
    }
}

/// `/register` may answer with user-interactive authentication, which an appservice never
/// needs: that answer means the homeserver does not take our registration as an appservice's.
impl ServerError for ruma::api::client::uiaa::UiaaResponse {
    fn into_matrix_error(self, method: &str, path: &str) -> MatrixError {
        match self {
            Self::MatrixError(error) => api_error(method, path, error),
            Self::AuthResponse(info) => MatrixError::Api {
                method: method.to_owned(),
                path: path.to_owned(),
                status: 401,
                errcode: info
                    .auth_error
                    .as_ref()
                    .map_or("M_FORBIDDEN".to_owned(), |error| {
                        error.kind.errcode().to_string()
                    }),
                error: "the homeserver asked for interactive authentication".to_owned(),
                retry_after: None,
            },
        }
    }
}

/// A Matrix error answer, with its code, message and the wait a rate limit asked for.
fn api_error(method: &str, path: &str, error: RumaError) -> MatrixError {
    let status = error.status_code.as_u16();
    let (errcode, message, retry_after) = match error.body {
        ErrorBody::Standard(body) => {
            let retry_after = match &body.kind {
                ErrorKind::LimitExceeded(data) => data.retry_after.map(|after| match after {
                    RetryAfter::Delay(delay) => delay,
                    RetryAfter::DateTime(at) => at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO),
                }),
                _ => None,
            };
            (body.kind.errcode().to_string(), body.message, retry_after)
        }
        ErrorBody::Json(value) => (
            value
                .get("errcode")
                .and_then(Value::as_str)
                .unwrap_or("M_UNKNOWN")
                .to_owned(),
            value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            None,
        ),
        ErrorBody::NotJson { bytes, .. } => (
            "M_UNKNOWN".to_owned(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned(),
            None,
        ),
    };
    MatrixError::Api {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        errcode,
        error: message,
        retry_after,
    }
}

/// A transaction id derived from who sends and why, so that a retry reuses it.
fn transaction_id(sender: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(sender.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    format!("crew.{}", &hex::encode(hasher.finalize())[..32])
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
    use serde_json::json;

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

    fn limit_exceeded(headers: &[(&str, &str)], body: Value) -> MatrixError {
        let mut response = http::Response::builder().status(429);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        let response = response.body(body.to_string().into_bytes()).unwrap();
        api_error("PUT", "/send", RumaError::from_http_response(response))
    }

    #[test]
    fn a_rate_limit_says_how_long_to_wait() {
        let error = limit_exceeded(
            &[],
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 1500}),
        );
        assert_eq!(error.errcode(), Some("M_LIMIT_EXCEEDED"));
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)));
        assert!(error.is_transient());
        // The Retry-After header, in seconds, wins over the body.
        let error = limit_exceeded(
            &[("retry-after", "3")],
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 1500}),
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn the_backoff_waits_at_least_what_the_homeserver_asked_within_the_cap() {
        let cap = Duration::from_secs(30);
        let asked = limit_exceeded(
            &[],
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "", "retry_after_ms": 5000}),
        );
        let short = Some(Duration::from_millis(200));
        assert_eq!(
            honour_retry_after(&asked, short, cap),
            Some(Duration::from_secs(5))
        );
        let greedy = limit_exceeded(
            &[],
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "", "retry_after_ms": 3_600_000}),
        );
        assert_eq!(honour_retry_after(&greedy, short, cap), Some(cap));
        // The backoff's end stays the end.
        assert_eq!(honour_retry_after(&asked, None, cap), None);
    }

    #[test]
    fn a_refusal_is_not_transient() {
        let response = http::Response::builder()
            .status(403)
            .body(br#"{"errcode":"M_FORBIDDEN","error":"no"}"#.to_vec())
            .unwrap();
        let error = api_error("POST", "/join", RumaError::from_http_response(response));
        assert_eq!(error.errcode(), Some("M_FORBIDDEN"));
        assert_eq!(error.status(), Some(403));
        assert!(!error.is_transient());
        assert_eq!(error.retry_after(), None);
    }
}
