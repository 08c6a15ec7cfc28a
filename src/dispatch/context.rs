//! "Said since your last turn": the last N messages of each room, and for each agent a cursor
//! to where its last turn ended, so its next wake can see what it missed.
//!
//! Bounded per room (oldest dropped first). Pure data with serde, for the lead to persist; it
//! does not decide what an agent is shown (that is the agent runtime's business).

use std::collections::{HashMap, VecDeque};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// One message kept as context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Said {
    /// Position in the room's log; increases by one per message.
    pub seq: u64,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    /// The body without reply fallback.
    pub body: String,
    /// What the message says of the authority it was written with ([`super::WRITTEN_WITH_KEY`]):
    /// kept as sent; only our own agents' words are believed (`agent::authority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_with: Option<serde_json::Value>,
}

/// One room's kept messages and the agents' cursors. The dispatch service persists it in parts
/// (each message once, the cursors when they move: `super::context_store`) so that the context
/// survives a restart; its serde form is the older whole-log record, still read to migrate it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomLog {
    next_seq: u64,
    said: VecDeque<Said>,
    /// Per agent: the first seq it has not seen.
    cursors: HashMap<OwnedUserId, u64>,
}

impl RoomLog {
    /// Rebuilds a log from its persisted parts: `said` in seq order. The next seq is never at or
    /// below a kept message's, whatever the stored record says (it may lag the messages).
    pub fn from_parts(
        next_seq: u64,
        said: impl IntoIterator<Item = Said>,
        cursors: HashMap<OwnedUserId, u64>,
    ) -> Self {
        let said: VecDeque<Said> = said.into_iter().collect();
        let after_last = said.back().map_or(0, |last| last.seq + 1);
        Self {
            next_seq: next_seq.max(after_last),
            said,
            cursors,
        }
    }

    /// The seq the next message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The kept messages, oldest first.
    pub fn said(&self) -> impl ExactSizeIterator<Item = &Said> {
        self.said.iter()
    }

    /// The newest kept message: the one a push just added.
    pub fn newest(&self) -> Option<&Said> {
        self.said.back()
    }

    /// The oldest kept message: everything before it fell out of the bound.
    pub fn oldest(&self) -> Option<&Said> {
        self.said.front()
    }

    /// Per agent, the first seq it has not seen.
    pub fn cursors(&self) -> &HashMap<OwnedUserId, u64> {
        &self.cursors
    }
}

/// The per-room bounded buffers and per-agent cursors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaidSince {
    per_room: usize,
    rooms: HashMap<OwnedRoomId, RoomLog>,
}

/// What an agent missed in a room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missed {
    /// Kept messages since the agent's last turn, oldest first, without its own.
    pub messages: Vec<Said>,
    /// Messages since its last turn that fell out of the bounded buffer.
    pub dropped: u64,
}

impl Missed {
    /// How many messages were said since the agent's last turn, kept or dropped, besides
    /// `events` (the ones that woke it).
    pub fn count_besides(&self, events: &[&str]) -> usize {
        self.messages
            .iter()
            .filter(|said| !events.contains(&said.event_id.as_str()))
            .count()
            + self.dropped as usize
    }
}

impl SaidSince {
    /// Keeps the last `per_room` messages of each room (at least one).
    pub fn new(per_room: usize) -> Self {
        Self {
            per_room: per_room.max(1),
            rooms: HashMap::new(),
        }
    }

    /// Appends a message to its room's log and returns its seq.
    pub fn push(
        &mut self,
        room: &RoomId,
        event_id: OwnedEventId,
        sender: OwnedUserId,
        body: String,
        written_with: Option<serde_json::Value>,
    ) -> u64 {
        let log = self.rooms.entry(room.to_owned()).or_default();
        let seq = log.next_seq;
        log.next_seq += 1;
        while log.said.len() >= self.per_room {
            log.said.pop_front();
        }
        log.said.push_back(Said {
            seq,
            event_id,
            sender,
            body,
            written_with,
        });
        seq
    }

    /// What `agent` missed in `room` since its last [`SaidSince::take`], without moving its cursor.
    pub fn peek(&self, agent: &UserId, room: &RoomId) -> Missed {
        let Some(log) = self.rooms.get(room) else {
            return Missed::default();
        };
        let cursor = log.cursors.get(agent).copied().unwrap_or(0);
        let oldest_kept = log.said.front().map_or(log.next_seq, |s| s.seq);
        Missed {
            messages: log
                .said
                .iter()
                .filter(|s| s.seq >= cursor && s.sender != agent)
                .cloned()
                .collect(),
            dropped: oldest_kept.saturating_sub(cursor),
        }
    }

    /// What `agent` missed in `room`, moving its cursor to now (its turn is starting).
    pub fn take(&mut self, agent: &UserId, room: &RoomId) -> Missed {
        let missed = self.peek(agent, room);
        if let Some(log) = self.rooms.get_mut(room) {
            let next = log.next_seq;
            log.cursors.insert(agent.to_owned(), next);
        }
        missed
    }

    /// The last `limit` messages of `room`, everyone's (agents' own included), oldest first:
    /// the recent conversation a turn is shown.
    pub fn recent(&self, room: &RoomId, limit: usize) -> Vec<Said> {
        let Some(log) = self.rooms.get(room) else {
            return Vec::new();
        };
        let skip = log.said.len().saturating_sub(limit);
        log.said.iter().skip(skip).cloned().collect()
    }

    /// One room's log, to persist it.
    pub fn room_log(&self, room: &RoomId) -> Option<&RoomLog> {
        self.rooms.get(room)
    }

    /// The seq `room`'s next message will get: it moves exactly when a message is kept.
    pub fn next_seq(&self, room: &RoomId) -> u64 {
        self.rooms.get(room).map_or(0, RoomLog::next_seq)
    }

    /// How many messages each room keeps.
    pub fn per_room(&self) -> usize {
        self.per_room
    }

    /// Puts back a persisted room log (at start-up), trimmed to this buffer's size.
    pub fn restore_room(&mut self, room: &RoomId, mut log: RoomLog) {
        while log.said.len() > self.per_room {
            log.said.pop_front();
        }
        self.rooms.insert(room.to_owned(), log);
    }

    /// Forgets a room.
    pub fn remove_room(&mut self, room: &RoomId) {
        self.rooms.remove(room);
    }
}
