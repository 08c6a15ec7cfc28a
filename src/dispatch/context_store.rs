//! The rooms' conversation logs ([`RoomLog`]) in sled, written incrementally: each kept message
//! once, under its own key (tree `room_said`), and a small per-room record of the next seq and
//! the agents' cursors (tree `room_said_cursors`) when a cursor moves. A message that falls out
//! of the bound is removed. Writing the whole log for every message (the older `room_context`
//! tree, up to `dispatch.context_messages` messages per write) cost ~2.7 KiB of sled log per
//! event and filled sled's cache with superseded copies; that tree is migrated at open and
//! dropped.
//!
//! Not for: what a log keeps or shows (that is [`super::SaidSince`]).

use std::collections::HashMap;

use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde::{Deserialize, Serialize};

use super::{RoomLog, Said};
use crate::store::{Store, StoreError, Tree, TreeKey};

/// The tree of kept messages, one entry per message.
const SAID_TREE: &str = "room_said";
/// The tree of per-room records (next seq, cursors).
const CURSORS_TREE: &str = "room_said_cursors";
/// The whole-log-per-room tree written by crew before this module; read once to migrate it.
const LEGACY_TREE: &str = "room_context";

/// A `room_said` key: the room id, a 0 byte (never part of a room id), the seq big-endian, so
/// that a prefix scan gives one room's messages in seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SaidKey {
    room: OwnedRoomId,
    seq: u64,
}

impl SaidKey {
    fn room_prefix(room: &RoomId) -> Vec<u8> {
        let mut prefix = Vec::with_capacity(room.as_str().len() + 1);
        prefix.extend_from_slice(room.as_bytes());
        prefix.push(0);
        prefix
    }
}

impl TreeKey for SaidKey {
    fn to_key(&self) -> Vec<u8> {
        let mut key = Self::room_prefix(&self.room);
        key.extend_from_slice(&self.seq.to_be_bytes());
        key
    }

    fn from_key(raw: &[u8]) -> Option<Self> {
        let split = raw.len().checked_sub(9)?;
        let (room, rest) = raw.split_at(split);
        let (separator, seq) = rest.split_first()?;
        if *separator != 0 {
            return None;
        }
        Some(Self {
            room: RoomId::parse(std::str::from_utf8(room).ok()?).ok()?,
            seq: u64::from_be_bytes(seq.try_into().ok()?),
        })
    }
}

/// A room's log without its messages: rewritten when a cursor moves, not per message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RoomCursors {
    /// The next seq when written; the messages' own seqs win when they are further on.
    next_seq: u64,
    /// Per agent: the first seq it has not seen.
    cursors: HashMap<OwnedUserId, u64>,
}

/// See the module documentation.
#[derive(Clone)]
pub struct SledContext {
    said: Tree<SaidKey, Said>,
    cursors: Tree<String, RoomCursors>,
}

impl SledContext {
    /// Opens the trees, migrating the older whole-log tree first if it is there.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let context = Self {
            said: store.tree(SAID_TREE)?,
            cursors: store.tree(CURSORS_TREE)?,
        };
        context.migrate_whole_logs(store)?;
        Ok(context)
    }

    /// Writes each room of the `room_context` tree in the new form, then removes it (the new
    /// form first, so a crash in between migrates the same room again), and drops the tree.
    fn migrate_whole_logs(&self, store: &Store) -> Result<(), StoreError> {
        let exists = store
            .db()
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == LEGACY_TREE.as_bytes());
        if !exists {
            return Ok(());
        }
        let legacy: Tree<String, RoomLog> = store.tree(LEGACY_TREE)?;
        let mut migrated = 0;
        for entry in legacy.iter() {
            let (room, log) = entry?;
            if let Ok(room) = RoomId::parse(&room) {
                for said in log.said() {
                    self.insert(&room, said)?;
                }
                self.save_cursors(&room, &log)?;
                migrated += 1;
            }
            legacy.remove(&room)?;
        }
        store.db().drop_tree(LEGACY_TREE)?;
        tracing::info!(
            rooms = migrated,
            "moved the rooms' conversation logs to one entry per message"
        );
        Ok(())
    }

    /// Every room's log, at most `per_room` messages each (older ones still on disk, from a
    /// larger `dispatch.context_messages` or a crash between a write and its removal, are
    /// removed here).
    pub fn load(&self, per_room: usize) -> Result<Vec<(OwnedRoomId, RoomLog)>, StoreError> {
        let mut rooms: HashMap<OwnedRoomId, Vec<Said>> = HashMap::new();
        for entry in self.said.iter() {
            let (key, said) = entry?;
            rooms.entry(key.room).or_default().push(said);
        }
        let mut records: HashMap<OwnedRoomId, RoomCursors> = HashMap::new();
        for entry in self.cursors.iter() {
            let (room, record) = entry?;
            if let Ok(room) = RoomId::parse(&room) {
                records.insert(room, record);
            }
        }
        let mut logs = Vec::with_capacity(rooms.len().max(records.len()));
        for (room, mut said) in rooms {
            let excess = said.len().saturating_sub(per_room);
            for old in said.drain(..excess) {
                self.said.remove(&SaidKey {
                    room: room.clone(),
                    seq: old.seq,
                })?;
            }
            let record = records.remove(&room).unwrap_or_default();
            logs.push((
                room,
                RoomLog::from_parts(record.next_seq, said, record.cursors),
            ));
        }
        for (room, record) in records {
            logs.push((
                room,
                RoomLog::from_parts(record.next_seq, Vec::new(), record.cursors),
            ));
        }
        Ok(logs)
    }

    /// Saves the message just kept in `room` (`log`'s newest) and removes the one that fell out
    /// of the bound, if any. The new message is written first: a crash in between leaves one
    /// message too many on disk, which [`SledContext::load`] trims.
    pub fn append(&self, room: &RoomId, log: &RoomLog) -> Result<(), StoreError> {
        let Some(newest) = log.newest() else {
            return Ok(());
        };
        self.insert(room, newest)?;
        if let Some(fallen) = log.oldest().and_then(|oldest| oldest.seq.checked_sub(1)) {
            self.said.remove(&SaidKey {
                room: room.to_owned(),
                seq: fallen,
            })?;
        }
        Ok(())
    }

    /// Saves `room`'s next seq and cursors (an agent's turn moved its cursor).
    pub fn save_cursors(&self, room: &RoomId, log: &RoomLog) -> Result<(), StoreError> {
        self.cursors.insert(
            &room.to_string(),
            &RoomCursors {
                next_seq: log.next_seq(),
                cursors: log.cursors().clone(),
            },
        )
    }

    /// Removes everything kept of `room`.
    pub fn forget(&self, room: &RoomId) -> Result<(), StoreError> {
        for key in self
            .said
            .raw()
            .scan_prefix(SaidKey::room_prefix(room))
            .keys()
        {
            self.said.raw().remove(key?)?;
        }
        self.cursors.remove(&room.to_string())?;
        Ok(())
    }

    fn insert(&self, room: &RoomId, said: &Said) -> Result<(), StoreError> {
        self.said.insert(
            &SaidKey {
                room: room.to_owned(),
                seq: said.seq,
            },
            said,
        )
    }
}
