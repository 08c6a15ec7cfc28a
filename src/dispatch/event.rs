//! One incoming room event, parsed once where the transaction is ingested (and, for an
//! encrypted one, once more only in its decrypted form) into the typed [`RoomEvent`] that the
//! inbox stores, the dispatcher reads, the wake queue carries and the turns answer.
//!
//! Its serialised form is the Matrix event's own shape (a subset: only what crew reads, plus
//! the few pieces forwarded verbatim), so an inbox entry or a queued wake written by an older
//! crew, which stored the homeserver's JSON as it came, is read by the same code.
//!
//! Parsing is strict only where an event cannot be handled without it: a string `type`, and
//! valid `event_id`, `room_id` and `sender` ([`EventError`] names what is missing). Everything
//! in `content` is read leniently (homeservers and clients send what they like): a field of
//! the wrong type counts as absent, and a message without `msgtype` or with content that is
//! not an object stays an event, marked [`Content::Malformed`], for the dispatcher to skip with
//! its reason (kept for `!crew why`). ruma's own event types refuse such events whole, so only
//! ruma's identifiers and [`TimelineEventType`] are used here.

use std::collections::BTreeMap;

use ruma::events::TimelineEventType;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use super::room::Membership;

/// Content key in which an agent's message carries the depth of the wake it was sent in.
/// Trusted only on messages sent by our own agents; see [`super::tag_depth`].
pub const DEPTH_KEY: &str = "org.matrix-crew.wake_depth";

/// Content key in which an agent's answer carries the least trusted author of the turn that
/// wrote it, so a later turn trusts the answer no further than that. Believed only on messages
/// sent by our own agents (`agent::authority`).
pub const WRITTEN_WITH_KEY: &str = "org.matrix-crew.written_with";

/// Content key marking a crew-made event (an internal wake) and what it is about; read by
/// `agent::project_flow`.
pub const INTERNAL_KEY: &str = "org.matrix-crew.internal";

/// `unsigned` key with which `crate::crypto` marks an event it decrypted.
pub const DECRYPTED_KEY: &str = "org.matrix-crew.decrypted";

/// Why an event cannot be handled at all (it is rejected at ingest, with this reason logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Not JSON, or not an object.
    #[error("not a JSON object: {0}")]
    NotAnObject(String),
    /// A required field is absent or not a string.
    #[error("no string `{0}`")]
    Missing(&'static str),
    /// A required id does not parse.
    #[error("`{field}` is not a valid id: {value}")]
    InvalidId { field: &'static str, value: String },
}

/// One room event as crew reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    /// The event's `type`.
    pub kind: TimelineEventType,
    /// `origin_server_ts`, 0 when absent.
    pub origin_server_ts: u64,
    /// Present (a string) on state events only.
    pub state_key: Option<String>,
    /// `unsigned.redacted_because` was present.
    pub redacted: bool,
    /// Decrypted by `crate::crypto` (it arrived as `m.room.encrypted`).
    pub decrypted: bool,
    pub content: Content,
}

/// What crew reads of an event's content, by type.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// `m.room.message` with an object content and a `msgtype`.
    Message(Box<Message>),
    /// `m.room.message` with `{}`: what a redacted message looks like when `unsigned` was
    /// stripped.
    Empty,
    /// `m.room.message` whose content is not an object or has no `msgtype`.
    Malformed,
    /// `m.room.member`.
    Member(Member),
    /// `m.room.power_levels`: the levels `@room` needs.
    PowerLevels(PowerLevelsContent),
    /// `m.room.create`.
    Create(CreateContent),
    /// Any other type (including `m.room.encryption` and `m.room.encrypted`): its content is
    /// not read.
    Unread,
}

/// A message's content.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub msgtype: String,
    /// `body`, empty when absent.
    pub body: String,
    pub format: Option<String>,
    pub formatted_body: Option<String>,
    /// `m.mentions`: `None` when absent; present but not an object mentions nobody.
    pub mentions: Option<Mentions>,
    pub relates_to: Option<RelatesTo>,
    /// A clear attachment's `mxc://` URL.
    pub url: Option<String>,
    /// An encrypted attachment (`file`: its URL, key, iv and hashes), verbatim for
    /// `crypto::attachments`.
    pub file: Option<Value>,
    pub filename: Option<String>,
    /// [`DEPTH_KEY`], when it is a non-negative integer.
    pub depth: Option<u64>,
    /// [`WRITTEN_WITH_KEY`], verbatim (kept with the room's conversation).
    pub written_with: Option<Value>,
    /// [`INTERNAL_KEY`], verbatim (crew's internal wakes).
    pub internal: Option<Value>,
}

/// `m.mentions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mentions {
    /// The valid user ids listed (others are dropped).
    pub user_ids: Vec<OwnedUserId>,
    /// `"room": true`.
    pub room: bool,
}

/// `m.relates_to`: replies, threads, edits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelatesTo {
    pub rel_type: Option<String>,
    /// The related event (thread root, edited event); `None` when absent or invalid.
    pub event_id: Option<OwnedEventId>,
    /// `m.in_reply_to.event_id`.
    pub in_reply_to: Option<OwnedEventId>,
    /// A thread's fallback reply (`is_falling_back: true`).
    pub is_falling_back: bool,
}

/// `m.room.member` content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    /// `None` when absent or not one crew knows.
    pub membership: Option<Membership>,
    pub displayname: Option<String>,
}

/// `m.room.power_levels` content: `None` means "absent or unreadable" (the spec default
/// applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerLevelsContent {
    pub users: BTreeMap<OwnedUserId, i64>,
    pub users_default: Option<i64>,
    /// `notifications.room`.
    pub notify_room: Option<i64>,
}

/// `m.room.create` content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateContent {
    pub room_version: Option<String>,
    pub additional_creators: Vec<OwnedUserId>,
}

impl RoomEvent {
    /// Parses one event as the homeserver sent it (or as an older crew stored it).
    pub fn parse(json: &str) -> Result<Self, EventError> {
        let wire: WireEvent<'_> = serde_json::from_str(json)
            .map_err(|error| EventError::NotAnObject(error.to_string()))?;
        wire.into_event()
    }

    /// Parses an event held as a JSON value (tests, and crew's own internal wakes).
    pub fn from_json(value: &Value) -> Result<Self, EventError> {
        Self::parse(&value.to_string())
    }

    /// Whether this is a state event (its `state_key` is a string).
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The message content, for `m.room.message` events that have one.
    pub fn message(&self) -> Option<&Message> {
        match &self.content {
            Content::Message(message) => Some(message),
            _ => None,
        }
    }

    /// The message's `body` ("" for anything else).
    pub fn body(&self) -> &str {
        self.message().map_or("", |message| message.body.as_str())
    }

    /// The membership content of an `m.room.member` event.
    pub fn member(&self) -> Option<&Member> {
        match &self.content {
            Content::Member(member) => Some(member),
            _ => None,
        }
    }

    /// The crew-made tag of an internal wake, verbatim.
    pub fn internal(&self) -> Option<&Value> {
        self.message().and_then(|message| message.internal.as_ref())
    }
}

/// What every event must have, borrowed from the JSON; content kept raw until the type is
/// known.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(rename = "type", default, deserialize_with = "lenient")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    event_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    room_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    sender: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    origin_server_ts: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    state_key: Option<String>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "lenient")]
    unsigned: Option<WireUnsigned>,
}

#[derive(Deserialize, Default)]
struct WireUnsigned {
    #[serde(default)]
    redacted_because: Option<serde::de::IgnoredAny>,
    #[serde(
        rename = "org.matrix-crew.decrypted",
        default,
        deserialize_with = "lenient"
    )]
    decrypted: Option<bool>,
}

impl WireEvent<'_> {
    fn into_event(self) -> Result<RoomEvent, EventError> {
        let kind = self.kind.ok_or(EventError::Missing("type"))?;
        let event_id = self.event_id.ok_or(EventError::Missing("event_id"))?;
        let room_id = self.room_id.ok_or(EventError::Missing("room_id"))?;
        let sender = self.sender.ok_or(EventError::Missing("sender"))?;
        let invalid = |field, value: &str| EventError::InvalidId {
            field,
            value: value.chars().take(80).collect(),
        };
        let event_id = OwnedEventId::try_from(event_id.as_str())
            .map_err(|_| invalid("event_id", &event_id))?;
        let room_id =
            OwnedRoomId::try_from(room_id.as_str()).map_err(|_| invalid("room_id", &room_id))?;
        let sender =
            OwnedUserId::try_from(sender.as_str()).map_err(|_| invalid("sender", &sender))?;
        let kind = TimelineEventType::from(kind);
        let content = parse_content(&kind, self.content);
        let unsigned = self.unsigned.unwrap_or_default();
        Ok(RoomEvent {
            event_id,
            room_id,
            sender,
            origin_server_ts: self.origin_server_ts.unwrap_or(0),
            state_key: self.state_key,
            redacted: unsigned.redacted_because.is_some(),
            decrypted: unsigned.decrypted == Some(true),
            content,
            kind,
        })
    }
}

impl<'de> Deserialize<'de> for RoomEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireEvent::deserialize(deserializer)?;
        wire.into_event().map_err(D::Error::custom)
    }
}

/// Reads a field that may be of any type: the wrong type counts as absent.
fn lenient<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok(T::deserialize(value).ok())
}

/// `m.mentions` present but not an object mentions nobody (`Some` of an empty one).
fn mentions<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Mentions>, D::Error> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default, deserialize_with = "lenient")]
        user_ids: Option<Vec<Value>>,
        #[serde(default, deserialize_with = "lenient")]
        room: Option<bool>,
    }
    let value = Value::deserialize(deserializer)?;
    let Ok(wire) = Wire::deserialize(value) else {
        return Ok(Some(Mentions::default()));
    };
    Ok(Some(Mentions {
        user_ids: ids(wire.user_ids.unwrap_or_default()),
        room: wire.room == Some(true),
    }))
}

/// The valid user ids among `values`.
fn ids(values: Vec<Value>) -> Vec<OwnedUserId> {
    values
        .into_iter()
        .filter_map(|value| match value {
            Value::String(id) => OwnedUserId::try_from(id).ok(),
            _ => None,
        })
        .collect()
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default, deserialize_with = "lenient")]
    msgtype: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    body: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    format: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    formatted_body: Option<String>,
    #[serde(rename = "m.mentions", default, deserialize_with = "mentions")]
    mentions: Option<Mentions>,
    #[serde(rename = "m.relates_to", default, deserialize_with = "lenient")]
    relates_to: Option<WireRelatesTo>,
    #[serde(default, deserialize_with = "lenient")]
    url: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    file: Option<serde_json::Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient")]
    filename: Option<String>,
    #[serde(
        rename = "org.matrix-crew.wake_depth",
        default,
        deserialize_with = "lenient"
    )]
    depth: Option<u64>,
    #[serde(rename = "org.matrix-crew.written_with", default)]
    written_with: Option<Value>,
    #[serde(rename = "org.matrix-crew.internal", default)]
    internal: Option<Value>,
}

#[derive(Deserialize)]
struct WireRelatesTo {
    #[serde(default, deserialize_with = "lenient")]
    rel_type: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    event_id: Option<OwnedEventId>,
    #[serde(rename = "m.in_reply_to", default, deserialize_with = "lenient")]
    in_reply_to: Option<WireInReplyTo>,
    #[serde(default, deserialize_with = "lenient")]
    is_falling_back: Option<bool>,
}

#[derive(Deserialize)]
struct WireInReplyTo {
    #[serde(default, deserialize_with = "lenient")]
    event_id: Option<OwnedEventId>,
}

#[derive(Deserialize)]
struct WireMember {
    #[serde(default, deserialize_with = "lenient")]
    membership: Option<Membership>,
    #[serde(default, deserialize_with = "lenient")]
    displayname: Option<String>,
}

#[derive(Deserialize)]
struct WirePowerLevels {
    #[serde(default, deserialize_with = "lenient")]
    users: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    users_default: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    notifications: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
struct WireCreate {
    #[serde(default, deserialize_with = "lenient")]
    room_version: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    additional_creators: Option<Vec<Value>>,
}

/// A power level: a number, or (in old rooms) a string holding one.
fn level(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Whether a raw JSON value is `{}` (whitespace aside).
fn is_empty_object(raw: &str) -> bool {
    let mut chars = raw.chars().filter(|c| !c.is_whitespace());
    chars.next() == Some('{') && chars.next() == Some('}') && chars.next().is_none()
}

fn parse_content(kind: &TimelineEventType, raw: Option<&RawValue>) -> Content {
    let json = raw.map_or("null", RawValue::get);
    match kind {
        TimelineEventType::RoomMessage => {
            if is_empty_object(json) {
                return Content::Empty;
            }
            match serde_json::from_str::<WireMessage>(json) {
                Ok(WireMessage {
                    msgtype: Some(msgtype),
                    body,
                    format,
                    formatted_body,
                    mentions,
                    relates_to,
                    url,
                    file,
                    filename,
                    depth,
                    written_with,
                    internal,
                }) => Content::Message(Box::new(Message {
                    msgtype,
                    body: body.unwrap_or_default(),
                    format,
                    formatted_body,
                    mentions,
                    relates_to: relates_to.map(|r| RelatesTo {
                        rel_type: r.rel_type,
                        event_id: r.event_id,
                        in_reply_to: r.in_reply_to.and_then(|i| i.event_id),
                        is_falling_back: r.is_falling_back == Some(true),
                    }),
                    url,
                    file: file.map(Value::Object),
                    filename,
                    depth,
                    written_with,
                    internal,
                })),
                _ => Content::Malformed,
            }
        }
        TimelineEventType::RoomMember => {
            let wire = serde_json::from_str::<WireMember>(json).ok();
            Content::Member(Member {
                membership: wire.as_ref().and_then(|w| w.membership),
                displayname: wire.and_then(|w| w.displayname),
            })
        }
        TimelineEventType::RoomPowerLevels => {
            let Ok(wire) = serde_json::from_str::<WirePowerLevels>(json) else {
                return Content::PowerLevels(PowerLevelsContent::default());
            };
            Content::PowerLevels(PowerLevelsContent {
                users: wire
                    .users
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(id, lvl)| {
                        Some((
                            OwnedUserId::try_from(id).ok()?,
                            level(Some(&lvl)).unwrap_or(0),
                        ))
                    })
                    .collect(),
                users_default: level(wire.users_default.as_ref()),
                notify_room: level(wire.notifications.as_ref().and_then(|n| n.get("room"))),
            })
        }
        TimelineEventType::RoomCreate => {
            let wire = serde_json::from_str::<WireCreate>(json).ok();
            Content::Create(CreateContent {
                room_version: wire.as_ref().and_then(|w| w.room_version.clone()),
                additional_creators: ids(wire
                    .and_then(|w| w.additional_creators)
                    .unwrap_or_default()),
            })
        }
        _ => Content::Unread,
    }
}

impl Serialize for RoomEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", &self.kind)?;
        map.serialize_entry("event_id", &self.event_id)?;
        map.serialize_entry("room_id", &self.room_id)?;
        map.serialize_entry("sender", &self.sender)?;
        map.serialize_entry("origin_server_ts", &self.origin_server_ts)?;
        if let Some(state_key) = &self.state_key {
            map.serialize_entry("state_key", state_key)?;
        }
        map.serialize_entry("content", &ContentOut(&self.content))?;
        if self.redacted || self.decrypted {
            let mut unsigned = serde_json::Map::new();
            if self.redacted {
                unsigned.insert("redacted_because".into(), Value::Object(Default::default()));
            }
            if self.decrypted {
                unsigned.insert(DECRYPTED_KEY.into(), Value::Bool(true));
            }
            map.serialize_entry("unsigned", &unsigned)?;
        }
        map.end()
    }
}

/// Writes content back in the Matrix shape, only the fields crew reads.
struct ContentOut<'a>(&'a Content);

impl Serialize for ContentOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            // Not an object: reads back as malformed.
            Content::Malformed => serializer.serialize_unit(),
            Content::Empty | Content::Unread => serializer.serialize_map(Some(0))?.end(),
            Content::Message(message) => {
                let mut map = serializer.serialize_map(None)?;
                map.serialize_entry("msgtype", &message.msgtype)?;
                map.serialize_entry("body", &message.body)?;
                if let Some(format) = &message.format {
                    map.serialize_entry("format", format)?;
                }
                if let Some(html) = &message.formatted_body {
                    map.serialize_entry("formatted_body", html)?;
                }
                if let Some(mentions) = &message.mentions {
                    let mut out = serde_json::Map::new();
                    out.insert(
                        "user_ids".into(),
                        Value::from(
                            mentions
                                .user_ids
                                .iter()
                                .map(|id| Value::from(id.as_str()))
                                .collect::<Vec<_>>(),
                        ),
                    );
                    if mentions.room {
                        out.insert("room".into(), Value::Bool(true));
                    }
                    map.serialize_entry("m.mentions", &out)?;
                }
                if let Some(relates) = &message.relates_to {
                    let mut out = serde_json::Map::new();
                    if let Some(rel_type) = &relates.rel_type {
                        out.insert("rel_type".into(), Value::from(rel_type.as_str()));
                    }
                    if let Some(id) = &relates.event_id {
                        out.insert("event_id".into(), Value::from(id.as_str()));
                    }
                    if let Some(id) = &relates.in_reply_to {
                        out.insert(
                            "m.in_reply_to".into(),
                            serde_json::json!({ "event_id": id.as_str() }),
                        );
                    }
                    if relates.is_falling_back {
                        out.insert("is_falling_back".into(), Value::Bool(true));
                    }
                    map.serialize_entry("m.relates_to", &out)?;
                }
                if let Some(url) = &message.url {
                    map.serialize_entry("url", url)?;
                }
                if let Some(file) = &message.file {
                    map.serialize_entry("file", file)?;
                }
                if let Some(filename) = &message.filename {
                    map.serialize_entry("filename", filename)?;
                }
                if let Some(depth) = message.depth {
                    map.serialize_entry(DEPTH_KEY, &depth)?;
                }
                if let Some(written_with) = &message.written_with {
                    map.serialize_entry(WRITTEN_WITH_KEY, written_with)?;
                }
                if let Some(internal) = &message.internal {
                    map.serialize_entry(INTERNAL_KEY, internal)?;
                }
                map.end()
            }
            Content::Member(member) => {
                let mut map = serializer.serialize_map(None)?;
                if let Some(membership) = &member.membership {
                    map.serialize_entry("membership", membership)?;
                }
                if let Some(name) = &member.displayname {
                    map.serialize_entry("displayname", name)?;
                }
                map.end()
            }
            Content::PowerLevels(levels) => {
                let mut map = serializer.serialize_map(None)?;
                map.serialize_entry("users", &levels.users)?;
                if let Some(default) = levels.users_default {
                    map.serialize_entry("users_default", &default)?;
                }
                if let Some(room) = levels.notify_room {
                    map.serialize_entry("notifications", &serde_json::json!({ "room": room }))?;
                }
                map.end()
            }
            Content::Create(create) => {
                let mut map = serializer.serialize_map(None)?;
                if let Some(version) = &create.room_version {
                    map.serialize_entry("room_version", version)?;
                }
                if !create.additional_creators.is_empty() {
                    map.serialize_entry("additional_creators", &create.additional_creators)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(content: Value) -> Value {
        json!({"type": "m.room.message", "event_id": "$e", "room_id": "!r:x.org",
               "sender": "@a:x.org", "origin_server_ts": 5, "content": content})
    }

    fn parse(value: &Value) -> RoomEvent {
        RoomEvent::from_json(value).unwrap()
    }

    #[test]
    fn required_fields_are_checked_and_named() {
        let cases = [
            (json!(42), "not a JSON object"),
            (
                json!({"event_id": "$e", "room_id": "!r:x.org", "sender": "@a:x.org"}),
                "`type`",
            ),
            (
                json!({"type": "m.room.message", "room_id": "!r:x.org", "sender": "@a:x.org"}),
                "`event_id`",
            ),
            (
                json!({"type": "m.x", "event_id": 7, "room_id": "!r:x.org", "sender": "@a:x.org"}),
                "`event_id`",
            ),
            (
                json!({"type": "m.x", "event_id": "$e", "sender": "@a:x.org"}),
                "`room_id`",
            ),
            (
                json!({"type": "m.x", "event_id": "$e", "room_id": "!r:x.org", "sender": "nobody"}),
                "`sender` is not a valid id",
            ),
        ];
        for (value, expected) in cases {
            let error = RoomEvent::from_json(&value).unwrap_err().to_string();
            assert!(error.contains(expected), "{value}: {error}");
        }
    }

    #[test]
    fn message_content_is_read_leniently() {
        let event = parse(&message(json!({
            "msgtype": "m.text", "body": "hi @crew:x.org", "format": "org.matrix.custom.html",
            "formatted_body": "<a href=\"https://matrix.to/#/@crew:x.org\">Crew</a>",
            "m.mentions": {"user_ids": ["@crew:x.org", 7, "bad"], "room": true},
            "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true,
                             "m.in_reply_to": {"event_id": "$prev"}},
            DEPTH_KEY: 2, WRITTEN_WITH_KEY: {"admin": true}, "unknown": [1, 2]
        })));
        let read = event.message().unwrap();
        assert_eq!(read.body, "hi @crew:x.org");
        let mentions = read.mentions.as_ref().unwrap();
        assert_eq!(mentions.user_ids, ["@crew:x.org"]);
        assert!(mentions.room);
        let relates = read.relates_to.as_ref().unwrap();
        assert_eq!(relates.event_id.as_ref().unwrap(), "$root");
        assert_eq!(relates.in_reply_to.as_ref().unwrap(), "$prev");
        assert!(relates.is_falling_back);
        assert_eq!(read.depth, Some(2));
        assert_eq!(read.written_with, Some(json!({"admin": true})));

        // Wrong types count as absent; `m.mentions` that is not an object mentions nobody.
        let odd = parse(&message(
            json!({"msgtype": "m.text", "body": 5, "m.mentions": "x",
                                        DEPTH_KEY: -1, "m.relates_to": "?"}),
        ));
        let odd = odd.message().unwrap();
        assert_eq!(odd.body, "");
        assert_eq!(odd.mentions, Some(Mentions::default()));
        assert_eq!(odd.depth, None);
        assert_eq!(odd.relates_to, None);
        assert_eq!(
            parse(&message(json!({"body": "no msgtype"}))).content,
            Content::Malformed
        );
        assert_eq!(parse(&message(json!("text"))).content, Content::Malformed);
        assert_eq!(parse(&message(json!({}))).content, Content::Empty);
    }

    #[test]
    fn state_contents_are_typed() {
        let member = parse(
            &json!({"type": "m.room.member", "event_id": "$m", "room_id": "!r:x.org",
            "sender": "@a:x.org", "state_key": "@a:x.org",
            "content": {"membership": "join", "displayname": "A"}}),
        );
        assert_eq!(
            member.member(),
            Some(&Member {
                membership: Some(Membership::Join),
                displayname: Some("A".into())
            })
        );
        let dance = parse(
            &json!({"type": "m.room.member", "event_id": "$m", "room_id": "!r:x.org",
            "sender": "@a:x.org", "state_key": "@a:x.org", "content": {"membership": "dance"}}),
        );
        assert_eq!(dance.member().unwrap().membership, None);
        let levels = parse(&json!({"type": "m.room.power_levels", "event_id": "$p",
            "room_id": "!r:x.org", "sender": "@a:x.org", "state_key": "",
            "content": {"users": {"@a:x.org": "30", "bad": 1}, "notifications": {"room": 20}}}));
        assert_eq!(
            levels.content,
            Content::PowerLevels(PowerLevelsContent {
                users: [("@a:x.org".try_into().unwrap(), 30)].into(),
                users_default: None,
                notify_room: Some(20),
            })
        );
        let not_state = parse(&json!({"type": "m.room.member", "event_id": "$m",
            "room_id": "!r:x.org", "sender": "@a:x.org", "state_key": 5, "content": {}}));
        assert!(!not_state.is_state());
    }

    /// What an older crew stored (the homeserver's JSON, with everything in it) reads the same
    /// as the typed form crew stores now, and the typed form reads back to itself.
    #[test]
    fn the_stored_form_round_trips_and_old_raw_events_still_read() {
        let raw = json!({"type": "m.room.message", "event_id": "$e", "room_id": "!r:x.org",
            "sender": "@a:x.org", "origin_server_ts": 5, "age": 10,
            "unsigned": {"age": 10, "redacted_because": {"type": "m.room.redaction"},
                         DECRYPTED_KEY: true},
            "content": {"msgtype": "m.file", "body": "a.pdf", "filename": "a.pdf",
                        "file": {"url": "mxc://x/y", "key": {"k": "s"}, "iv": "i", "hashes": {}},
                        "info": {"size": 3},
                        "m.relates_to": {"m.in_reply_to": {"event_id": "$q"}},
                        INTERNAL_KEY: {"reason": "task_completed"}}});
        let old = parse(&raw);
        assert!(old.redacted && old.decrypted);
        let stored = serde_json::to_string(&old).unwrap();
        let again = RoomEvent::parse(&stored).unwrap();
        assert_eq!(again, old);
        assert_eq!(
            again.message().unwrap().file.as_ref().unwrap()["key"]["k"],
            "s"
        );
        for content in [json!({}), json!("x"), json!({"body": "b"})] {
            let event = parse(&message(content));
            assert_eq!(
                RoomEvent::parse(&serde_json::to_string(&event).unwrap()).unwrap(),
                event
            );
        }
        for state in [
            json!({"type": "m.room.create", "event_id": "$c", "room_id": "!r:x.org",
                   "sender": "@a:x.org", "state_key": "",
                   "content": {"room_version": "12", "additional_creators": ["@b:x.org"]}}),
            json!({"type": "m.room.encryption", "event_id": "$c", "room_id": "!r:x.org",
                   "sender": "@a:x.org", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}),
        ] {
            let event = parse(&state);
            assert_eq!(
                RoomEvent::parse(&serde_json::to_string(&event).unwrap()).unwrap(),
                event
            );
        }
    }
}
