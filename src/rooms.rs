//! What we know about the rooms our agents are in: who is a member, under which name, whether
//! the room is encrypted.
//!
//! The appservice sees nothing from before one of its users joined, so on joining (and at
//! start-up) the state is fetched whole; afterwards state events from the transaction stream keep
//! it current. Kept in sled so a restart does not need to refetch every room.

use std::collections::BTreeMap;

use ruma::{OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Store, StoreError, Tree};

/// One member's current membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `join`, `invite`, `leave`, `ban` or `knock`.
    pub membership: String,
    pub display_name: Option<String>,
}

/// The state of one room as far as the agents care.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomRecord {
    pub members: BTreeMap<OwnedUserId, Member>,
    /// `m.room.encryption` is set: agents cannot read messages here.
    pub encrypted: bool,
    pub name: Option<String>,
    /// Power levels of users (absent = the room's default).
    #[serde(default)]
    pub power_levels: BTreeMap<OwnedUserId, i64>,
}

impl RoomRecord {
    /// Users currently joined.
    pub fn joined(&self) -> impl Iterator<Item = &OwnedUserId> {
        self.members
            .iter()
            .filter(|(_, member)| member.membership == "join")
            .map(|(user, _)| user)
    }

    pub fn is_joined(&self, user: &UserId) -> bool {
        self.members
            .get(user)
            .is_some_and(|member| member.membership == "join")
    }

    pub fn display_name(&self, user: &UserId) -> Option<&str> {
        self.members.get(user)?.display_name.as_deref()
    }

    /// Applies one state event (`m.room.member`, `m.room.encryption`, `m.room.name`,
    /// `m.room.power_levels`); others are ignored. Returns whether anything changed.
    pub fn apply(&mut self, event: &Value) -> bool {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let content = event.get("content").unwrap_or(&Value::Null);
        match kind {
            "m.room.member" => {
                let Some(user) = event
                    .get("state_key")
                    .and_then(Value::as_str)
                    .and_then(|key| UserId::parse(key).ok())
                else {
                    return false;
                };
                let member = Member {
                    membership: content
                        .get("membership")
                        .and_then(Value::as_str)
                        .unwrap_or("leave")
                        .to_owned(),
                    display_name: content
                        .get("displayname")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                };
                self.members.insert(user, member.clone()) != Some(member)
            }
            "m.room.encryption" => !std::mem::replace(&mut self.encrypted, true),
            "m.room.name" => {
                let name = content
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                std::mem::replace(&mut self.name, name.clone()) != name
            }
            "m.room.power_levels" => {
                let users: BTreeMap<OwnedUserId, i64> = content
                    .get("users")
                    .and_then(|users| serde_json::from_value(users.clone()).ok())
                    .unwrap_or_default();
                std::mem::replace(&mut self.power_levels, users.clone()) != users
            }
            _ => false,
        }
    }
}

/// The rooms tree.
#[derive(Clone)]
pub struct Rooms {
    tree: Tree<String, RoomRecord>,
}

impl Rooms {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("rooms")?,
        })
    }

    pub fn get(&self, room: &RoomId) -> Result<Option<RoomRecord>, StoreError> {
        self.tree.get(&room.as_str().to_owned())
    }

    /// Applies a state event from the stream to its room.
    pub fn apply(&self, room: &RoomId, event: &Value) -> Result<(), StoreError> {
        self.tree.update(&room.as_str().to_owned(), |record| {
            let mut record = record.unwrap_or_default();
            record.apply(event);
            Some(record)
        })?;
        Ok(())
    }

    /// Replaces a room's record with one built from its full state.
    pub fn replace_from_state(
        &self,
        room: &RoomId,
        state: &[Value],
    ) -> Result<RoomRecord, StoreError> {
        let mut record = RoomRecord::default();
        for event in state {
            record.apply(event);
        }
        self.tree.insert(&room.as_str().to_owned(), &record)?;
        Ok(record)
    }

    pub fn forget(&self, room: &RoomId) -> Result<(), StoreError> {
        self.tree.remove(&room.as_str().to_owned())?;
        Ok(())
    }
}
