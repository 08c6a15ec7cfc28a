//! What the dispatcher knows about each room: who is in it (with display names), whether it is
//! encrypted, who may notify `@room`, and which one-time notices were already asked for.
//!
//! Fed by the room's state events (from the transaction stream, or from `/state` when an agent
//! first joins). Serde-able so the lead can persist it. Not a general room-state store: only the
//! facts that decide who wakes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruma::events::TimelineEventType;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::event::{Content, RoomEvent};

/// Membership of one user, as the last `m.room.member` event said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// In the room: receives and may send messages.
    Join,
    /// Invited, not yet in.
    Invite,
    /// Asked to join (knock).
    Knock,
    /// Left or was kicked.
    Leave,
    /// Banned.
    Ban,
}

/// One member's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub membership: Membership,
    /// The room-specific display name, for the "you named me but did not mention me" hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// The power-level facts needed for `@room`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerLevels {
    pub users: BTreeMap<OwnedUserId, i64>,
    pub users_default: i64,
    /// `notifications.room`: the level needed to notify everyone with `@room` (spec default 50).
    pub notify_room: i64,
}

/// Spec default of `notifications.room`.
const DEFAULT_NOTIFY_ROOM: i64 = 50;
/// Level a creator has when a room has no power-levels event (rooms before version 12).
const CREATOR_DEFAULT_LEVEL: i64 = 100;
/// From room version 12 (MSC4289) creators have infinite power and are not in the users map.
const FIRST_VERSION_WITH_PRIVILEGED_CREATORS: u32 = 12;

/// The dispatcher's view of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomState {
    members: BTreeMap<OwnedUserId, Member>,
    /// Number of members with `Join`, kept in step with `members`.
    joined: usize,
    /// Set only by the `m.room.encryption` state event: a lone `m.room.encrypted` timeline
    /// event (anyone can send one) must not make a room unreadable for ever.
    pub encrypted: bool,
    /// `None` until a power-levels event is seen.
    pub power_levels: Option<PowerLevels>,
    /// Senders of `m.room.create` (plus `additional_creators`).
    pub creators: BTreeSet<OwnedUserId>,
    /// True when creators have infinite power (room version 12 and later).
    pub privileged_creators: bool,
    /// Agents that already gave the "mention me like this" hint here.
    pub hinted: BTreeSet<OwnedUserId>,
    /// Agents that already said they cannot read this encrypted room.
    pub encryption_notified: BTreeSet<OwnedUserId>,
    /// The "loop stopped" notice was asked for since the last human message.
    pub loop_notified: bool,
}

impl RoomState {
    /// Applies a state event to the model. Anything else, or unreadable content, leaves it
    /// unchanged: state from the wire must never stop dispatch.
    pub fn apply_event(&mut self, event: &RoomEvent) {
        let Some(state_key) = event.state_key.as_deref() else {
            return;
        };
        match (&event.kind, &event.content) {
            (TimelineEventType::RoomMember, Content::Member(member)) => {
                let Ok(user) = UserId::parse(state_key) else {
                    return;
                };
                let Some(membership) = member.membership else {
                    return;
                };
                let display_name = member
                    .displayname
                    .as_deref()
                    .filter(|name| !name.trim().is_empty())
                    .map(str::to_owned);
                self.set_member(user, membership, display_name);
            }
            (TimelineEventType::RoomEncryption, _) if state_key.is_empty() => {
                // An `m.room.encryption` event cannot be undone in Matrix; even an empty one
                // (redacted) keeps the room encrypted.
                self.encrypted = true;
            }
            (TimelineEventType::RoomPowerLevels, Content::PowerLevels(levels))
                if state_key.is_empty() =>
            {
                self.power_levels = Some(PowerLevels {
                    users: levels.users.clone(),
                    users_default: levels.users_default.unwrap_or(0),
                    notify_room: levels.notify_room.unwrap_or(DEFAULT_NOTIFY_ROOM),
                });
            }
            (TimelineEventType::RoomCreate, Content::Create(create)) if state_key.is_empty() => {
                self.creators.clear();
                self.creators.insert(event.sender.clone());
                let version = create.room_version.as_deref().unwrap_or("1");
                self.privileged_creators = version
                    .parse::<u32>()
                    .is_ok_and(|v| v >= FIRST_VERSION_WITH_PRIVILEGED_CREATORS);
                if self.privileged_creators {
                    self.creators
                        .extend(create.additional_creators.iter().cloned());
                }
            }
            _ => {}
        }
    }

    /// Records a membership directly (e.g. from `/joined_members` when seeding a room).
    pub fn set_member(
        &mut self,
        user: OwnedUserId,
        membership: Membership,
        display_name: Option<String>,
    ) {
        let was_joined = self
            .members
            .get(&user)
            .is_some_and(|m| m.membership == Membership::Join);
        let is_joined = membership == Membership::Join;
        match (was_joined, is_joined) {
            (false, true) => self.joined += 1,
            (true, false) => self.joined -= 1,
            _ => {}
        }
        if membership == Membership::Leave || membership == Membership::Ban {
            // The hint is per stay: someone who leaves and comes back may need it again.
            self.hinted.remove(&user);
        }
        self.members.insert(
            user,
            Member {
                membership,
                display_name,
            },
        );
    }

    /// The member entry of `user`, if any event about them was seen.
    pub fn member(&self, user: &UserId) -> Option<&Member> {
        self.members.get(user)
    }

    /// True when `user` is joined.
    pub fn is_joined(&self, user: &UserId) -> bool {
        self.members
            .get(user)
            .is_some_and(|m| m.membership == Membership::Join)
    }

    /// Number of joined members.
    pub fn joined_count(&self) -> usize {
        self.joined
    }

    /// Whether any member for whom `wanted` holds is joined or invited.
    pub fn joined_or_invited(&self, wanted: impl Fn(&UserId) -> bool) -> bool {
        self.members.iter().any(|(user, member)| {
            matches!(member.membership, Membership::Join | Membership::Invite) && wanted(user)
        })
    }

    /// Joined members.
    pub fn joined_members(&self) -> impl Iterator<Item = &UserId> {
        self.members
            .iter()
            .filter(|(_, m)| m.membership == Membership::Join)
            .map(|(id, _)| id.as_ref())
    }

    /// Power level of `user`, following the spec's defaults.
    pub fn power_level(&self, user: &UserId) -> i64 {
        if self.privileged_creators && self.creators.contains(user) {
            return i64::MAX;
        }
        match &self.power_levels {
            Some(levels) => levels
                .users
                .get(user)
                .copied()
                .unwrap_or(levels.users_default),
            None if self.creators.contains(user) => CREATOR_DEFAULT_LEVEL,
            None => 0,
        }
    }

    /// True when `user` may notify the whole room (`@room`).
    pub fn can_notify_room(&self, user: &UserId) -> bool {
        let needed = self
            .power_levels
            .as_ref()
            .map_or(DEFAULT_NOTIFY_ROOM, |levels| levels.notify_room);
        self.power_level(user) >= needed
    }
}

/// All rooms the dispatcher has seen. Serde-able as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rooms {
    rooms: HashMap<OwnedRoomId, RoomState>,
}

impl Rooms {
    /// An empty set of rooms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a state event to its room (named by the event's `room_id`).
    pub fn apply_event(&mut self, event: &RoomEvent) {
        if event.is_state() {
            self.rooms
                .entry(event.room_id.clone())
                .or_default()
                .apply_event(event);
        }
    }

    /// The state of a room, if any event of it was seen.
    pub fn get(&self, room: &RoomId) -> Option<&RoomState> {
        self.rooms.get(room)
    }

    /// The state of a room, created empty if needed (for seeding from `/state`).
    pub fn entry(&mut self, room: &RoomId) -> &mut RoomState {
        self.rooms.entry(room.to_owned()).or_default()
    }

    /// Forgets a room (e.g. when the last agent left it).
    pub fn remove(&mut self, room: &RoomId) -> Option<RoomState> {
        self.rooms.remove(room)
    }

    /// Rooms known.
    pub fn iter(&self) -> impl Iterator<Item = (&RoomId, &RoomState)> {
        self.rooms.iter().map(|(id, state)| (id.as_ref(), state))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The event, with the ids a test leaves out filled in.
    fn ev(mut value: serde_json::Value) -> RoomEvent {
        let object = value.as_object_mut().unwrap();
        object.entry("event_id").or_insert(json!("$e"));
        object.entry("room_id").or_insert(json!("!r:x.org"));
        object.entry("sender").or_insert(json!("@s:x.org"));
        RoomEvent::from_json(&value).unwrap()
    }

    fn member(user: &str, membership: &str, name: Option<&str>) -> RoomEvent {
        ev(
            json!({"type": "m.room.member", "state_key": user, "sender": "@s:x.org",
               "room_id": "!r:x.org", "content": {"membership": membership, "displayname": name}}),
        )
    }

    #[test]
    fn membership_counts_follow_events() {
        let mut room = RoomState::default();
        room.apply_event(&member("@a:x.org", "invite", None));
        assert_eq!(room.joined_count(), 0);
        room.apply_event(&member("@a:x.org", "join", Some("Alice")));
        room.apply_event(&member("@a:x.org", "join", Some("Alice B")));
        room.apply_event(&member("@b:x.org", "join", None));
        assert_eq!(room.joined_count(), 2);
        assert_eq!(
            room.member(&UserId::parse("@a:x.org").unwrap())
                .unwrap()
                .display_name
                .as_deref(),
            Some("Alice B")
        );
        room.apply_event(&member("@b:x.org", "leave", None));
        room.apply_event(&member("@b:x.org", "ban", None));
        assert_eq!(room.joined_count(), 1);
        room.apply_event(&ev(
            json!({"type": "m.room.member", "state_key": "not-a-user",
            "content": {"membership": "join"}}),
        ));
        room.apply_event(&member("@c:x.org", "dance", None));
        assert_eq!(room.joined_count(), 1);
    }

    #[test]
    fn power_levels_and_creators() {
        let alice = UserId::parse("@alice:x.org").unwrap();
        let bob = UserId::parse("@bob:x.org").unwrap();
        let mut room = RoomState::default();
        room.apply_event(&ev(
            json!({"type": "m.room.create", "state_key": "", "sender": "@alice:x.org",
                                 "content": {"room_version": "10"}}),
        ));
        assert!(room.can_notify_room(&alice));
        assert!(!room.can_notify_room(&bob));
        room.apply_event(&ev(json!({"type": "m.room.power_levels", "state_key": "",
            "content": {"users": {"@alice:x.org": 100, "@bob:x.org": "30"}, "notifications": {"room": 20}}})));
        assert!(room.can_notify_room(&bob));
        assert_eq!(room.power_level(&bob), 30);
        room.apply_event(&ev(
            json!({"type": "m.room.create", "state_key": "", "sender": "@bob:x.org",
                                 "content": {"room_version": "12"}}),
        ));
        assert_eq!(room.power_level(&bob), i64::MAX);
        room.apply_event(&ev(
            json!({"type": "m.room.encryption", "state_key": "", "content": {}}),
        ));
        assert!(room.encrypted);
    }

    #[test]
    fn rooms_round_trip_through_json() {
        let mut rooms = Rooms::new();
        rooms.apply_event(&member("@a:x.org", "join", Some("A")));
        let text = serde_json::to_string(&rooms).unwrap();
        let back: Rooms = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rooms);
        let room = back.get(&RoomId::parse("!r:x.org").unwrap()).unwrap();
        assert_eq!(room.joined_count(), 1);
    }
}
