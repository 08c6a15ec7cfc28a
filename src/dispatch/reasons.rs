//! The decision log behind `!crew why <event>`: the last decisions, by event id, bounded in
//! count and age. Not a history of messages (see [`super::History`]).

use std::collections::{HashMap, VecDeque};

use ruma::{EventId, OwnedEventId};
use serde::{Deserialize, Serialize};

use super::decide::Decision;

/// A kept decision and when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub at_ms: u64,
    pub decision: Decision,
}

/// Bounded log of decisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReasonLog {
    capacity: usize,
    retention_ms: u64,
    entries: HashMap<OwnedEventId, Kept>,
    order: VecDeque<(OwnedEventId, u64)>,
}

impl ReasonLog {
    /// Keeps at most `capacity` decisions (at least one), none older than `retention_ms`.
    pub fn new(capacity: usize, retention_ms: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            retention_ms,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keeps `decision` (if it names an event), replacing an older decision for the same event.
    pub fn insert(&mut self, decision: &Decision, now_ms: u64) {
        self.prune(now_ms);
        let Some(event_id) = decision.event_id.clone() else {
            return;
        };
        while self.entries.len() >= self.capacity && !self.entries.contains_key(&event_id) {
            if !self.pop_oldest() {
                break;
            }
        }
        self.order.push_back((event_id.clone(), now_ms));
        self.entries.insert(
            event_id,
            Kept {
                at_ms: now_ms,
                decision: decision.clone(),
            },
        );
    }

    /// The decision for `event`, if still kept.
    pub fn get(&self, event: &EventId) -> Option<&Kept> {
        self.entries.get(event)
    }

    /// Drops decisions older than the retention.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some((_, at)) = self.order.front() {
            if now_ms.saturating_sub(*at) > self.retention_ms {
                self.pop_oldest();
            } else {
                break;
            }
        }
    }

    /// Number of decisions kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none are kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes the oldest order entry (and its decision unless a newer one replaced it).
    fn pop_oldest(&mut self) -> bool {
        let Some((event_id, at)) = self.order.pop_front() else {
            return false;
        };
        if self.entries.get(&event_id).is_some_and(|k| k.at_ms == at) {
            self.entries.remove(&event_id);
        }
        true
    }
}
