//! Loop guards that need memory: the per-agent wake rate limit and the per-room cap on agent
//! messages. Time is passed in (milliseconds), so tests and replays control it.
//!
//! The depth budget needs no memory (the depth travels with each message, see
//! [`super::DEPTH_KEY`]) and is applied in [`super::decide`]. Nothing here is persisted: after a
//! restart the windows start empty, which can only allow more, never wake twice.

use std::collections::{HashMap, VecDeque};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::decide::{Decision, SkipReason};

/// Length of the rate windows: the config speaks of "per minute".
pub const WINDOW_MS: u64 = 60_000;

/// A sliding one-minute window of event times.
#[derive(Debug, Clone, Default)]
struct Window {
    times: VecDeque<u64>,
}

impl Window {
    fn prune(&mut self, now_ms: u64) {
        while let Some(&first) = self.times.front() {
            if now_ms.saturating_sub(first) >= WINDOW_MS {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }

    fn count_at(&self, now_ms: u64) -> usize {
        self.times
            .iter()
            .filter(|&&t| now_ms.saturating_sub(t) < WINDOW_MS)
            .count()
    }
}

/// At most `per_minute` wakes per agent in any minute.
#[derive(Debug, Clone)]
pub struct WakeRateLimiter {
    per_minute: usize,
    agents: HashMap<OwnedUserId, Window>,
}

impl WakeRateLimiter {
    /// A limiter allowing `per_minute` wakes per agent (at least one).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: (per_minute as usize).max(1),
            agents: HashMap::new(),
        }
    }

    /// Counts a wake of `agent` at `now_ms` and returns true, or returns false (and counts
    /// nothing) when the agent already had its fill in the last minute.
    pub fn try_wake(&mut self, agent: &UserId, now_ms: u64) -> bool {
        let window = self.agents.entry(agent.to_owned()).or_default();
        window.prune(now_ms);
        if window.times.len() >= self.per_minute {
            return false;
        }
        window.times.push_back(now_ms);
        true
    }

    /// Wakes `agent` could still take at `now_ms`.
    pub fn remaining(&self, agent: &UserId, now_ms: u64) -> usize {
        let used = self.agents.get(agent).map_or(0, |w| w.count_at(now_ms));
        self.per_minute.saturating_sub(used)
    }
}

/// At most `per_minute` agent messages per room in any minute. Messages over the cap wake
/// nobody; the lead can also ask [`RoomMessageCap::would_allow`] before sending.
#[derive(Debug, Clone)]
pub struct RoomMessageCap {
    per_minute: usize,
    rooms: HashMap<OwnedRoomId, Window>,
}

impl RoomMessageCap {
    /// A cap of `per_minute` agent messages per room (at least one).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: (per_minute as usize).max(1),
            rooms: HashMap::new(),
        }
    }

    /// Counts an agent message in `room` at `now_ms`; true when it is within the cap.
    pub fn note_message(&mut self, room: &RoomId, now_ms: u64) -> bool {
        let window = self.rooms.entry(room.to_owned()).or_default();
        window.prune(now_ms);
        window.times.push_back(now_ms);
        window.times.len() <= self.per_minute
    }

    /// True when one more agent message in `room` at `now_ms` would be within the cap.
    pub fn would_allow(&self, room: &RoomId, now_ms: u64) -> bool {
        self.rooms.get(room).map_or(0, |w| w.count_at(now_ms)) < self.per_minute
    }
}

/// Both stateful guards, applied to a decision in the right order.
#[derive(Debug, Clone)]
pub struct Guards {
    pub rate: WakeRateLimiter,
    pub room_cap: RoomMessageCap,
}

impl Guards {
    /// Guards with the given limits.
    pub fn new(agent_wakes_per_minute: u32, room_agent_messages_per_minute: u32) -> Self {
        Self {
            rate: WakeRateLimiter::new(agent_wakes_per_minute),
            room_cap: RoomMessageCap::new(room_agent_messages_per_minute),
        }
    }

    /// Counts an agent's message against its room's cap (over the cap, its wakes become
    /// [`SkipReason::RoomCap`]), then moves wakes over an agent's rate to
    /// [`SkipReason::RateLimit`]. Call once per decision, in event order.
    pub fn apply(&mut self, decision: &mut Decision, now_ms: u64) {
        if decision.sender_is_agent
            && decision.message
            && let Some(room) = &decision.room_id
            && !self.room_cap.note_message(room, now_ms)
        {
            while !decision.wakes.is_empty() {
                decision.demote(0, SkipReason::RoomCap);
            }
        }
        let mut i = 0;
        while i < decision.wakes.len() {
            if self.rate.try_wake(&decision.wakes[i].agent, now_ms) {
                i += 1;
            } else {
                decision.demote(i, SkipReason::RateLimit);
            }
        }
    }
}
