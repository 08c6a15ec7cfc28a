//! [`History`] in sled: who sent which event, and which agents it already mentioned, kept across
//! restarts so that a reply to an agent's message from before a restart still wakes it.

use ruma::{EventId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::roster::{History, Remember};
use crate::store::{Store, StoreError, Tree};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Remembered {
    sender: Option<OwnedUserId>,
    #[serde(default)]
    mentioned: Vec<OwnedUserId>,
    /// When it was first remembered (0 in records from before pruning existed).
    #[serde(default)]
    at_ms: u64,
}

/// The `event_history` tree, keyed by event id.
#[derive(Clone)]
pub struct SledHistory {
    tree: Tree<String, Remembered>,
}

impl SledHistory {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("event_history")?,
        })
    }

    /// Adds what a decision asked to remember (mentions are a union, never a replacement).
    pub fn remember(&self, fact: &Remember) -> Result<(), StoreError> {
        let now = crate::clock::now_ms();
        self.tree.update(&fact.event_id.to_string(), |entry| {
            let mut entry = entry.unwrap_or(Remembered {
                at_ms: now,
                ..Remembered::default()
            });
            if entry.sender.is_none() {
                entry.sender = Some(fact.sender.clone());
            }
            for user in &fact.mentioned {
                if !entry.mentioned.contains(user) {
                    entry.mentioned.push(user.clone());
                }
            }
            Some(entry)
        })?;
        Ok(())
    }
}

impl SledHistory {
    /// Forgets events remembered before `before_ms` (a reply to a message that old no longer
    /// wakes through the history, only through its mentions). Records from before the time was
    /// kept get it now, so they go one retention later. Returns how many were forgotten.
    pub fn prune(&self, before_ms: u64) -> Result<usize, StoreError> {
        let now = crate::clock::now_ms();
        let mut forgotten = 0;
        for entry in self.tree.iter() {
            let (event_id, mut remembered) = entry?;
            if remembered.at_ms == 0 {
                remembered.at_ms = now;
                self.tree.insert(&event_id, &remembered)?;
            } else if remembered.at_ms < before_ms {
                self.tree.remove(&event_id)?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }
}

impl History for SledHistory {
    fn sender_of(&self, event: &EventId) -> Option<OwnedUserId> {
        self.tree
            .get(&event.to_string())
            .ok()
            .flatten()
            .and_then(|entry| entry.sender)
    }

    fn mentioned_by(&self, event: &EventId) -> Vec<OwnedUserId> {
        self.tree
            .get(&event.to_string())
            .ok()
            .flatten()
            .map(|entry| entry.mentioned)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_forgets_old_events_only() {
        let store = Store::temporary().unwrap();
        let history = SledHistory::open(&store).unwrap();
        let fact = |id: &str| Remember {
            event_id: EventId::parse(id).unwrap(),
            sender: OwnedUserId::try_from("@crew_alice:example.org").unwrap(),
            mentioned: Vec::new(),
        };
        history.remember(&fact("$old")).unwrap();
        let cut = crate::clock::now_ms() + 1;
        while crate::clock::now_ms() <= cut {
            std::hint::spin_loop();
        }
        history.remember(&fact("$new")).unwrap();
        assert_eq!(history.prune(cut).unwrap(), 1);
        let old = EventId::parse("$old").unwrap();
        let new = EventId::parse("$new").unwrap();
        assert_eq!(history.sender_of(&old), None);
        assert!(history.sender_of(&new).is_some());
    }
}
