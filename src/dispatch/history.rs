//! [`History`] in sled: who sent which event, and which agents it already mentioned, kept across
//! restarts so that a reply to an agent's message from before a restart still wakes it.
//!
//! Only what can matter after a restart goes to sled: the messages agents sent (a reply to one
//! wakes its agent) and those that mentioned an agent (an edit must not wake it twice). Every
//! other message (most of any room's chatter) is kept in memory only, the last
//! [`RECENT_EVENTS`], for the one use it has: an edit of it that adds a mention, which comes
//! minutes after the message, not days. A random-key sled write per message was the pump's
//! largest cost in sled and the largest part of crew's memory that grew with traffic
//! (docs/benchmarks.md, "The event history"). An edit of a mention-less message from before a
//! restart, or older than the window, is then an edit of an unknown original: it wakes nobody,
//! as for any original the history does not know.

use std::sync::Mutex;

use ruma::{EventId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::roster::{History, MemoryHistory, Remember};
use crate::store::{Store, StoreError, Tree};

/// How many mention-less messages by people are remembered in memory (a few MiB).
pub const RECENT_EVENTS: usize = 10_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Remembered {
    sender: Option<OwnedUserId>,
    #[serde(default)]
    mentioned: Vec<OwnedUserId>,
    /// When it was first remembered (0 in records from before pruning existed).
    #[serde(default)]
    at_ms: u64,
}

/// The `event_history` tree, keyed by event id, and the recent mention-less messages.
pub struct SledHistory {
    tree: Tree<String, Remembered>,
    recent: Mutex<MemoryHistory>,
}

impl SledHistory {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("event_history")?,
            recent: Mutex::new(MemoryHistory::new(RECENT_EVENTS)),
        })
    }

    /// Adds what a decision asked to remember (mentions are a union, never a replacement):
    /// in sled when `by_agent` (an agent sent the event) or when it mentions an agent,
    /// otherwise in memory (see the module documentation).
    pub fn remember(&self, fact: &Remember, by_agent: bool) -> Result<(), StoreError> {
        if fact.mentioned.is_empty() && !by_agent {
            self.recent().remember(fact);
            return Ok(());
        }
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
    fn recent(&self) -> std::sync::MutexGuard<'_, MemoryHistory> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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
            .or_else(|| self.recent().sender_of(event))
    }

    fn mentioned_by(&self, event: &EventId) -> Vec<OwnedUserId> {
        self.tree
            .get(&event.to_string())
            .ok()
            .flatten()
            .map(|entry| entry.mentioned)
            .unwrap_or_else(|| self.recent().mentioned_by(event))
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
        history.remember(&fact("$old"), true).unwrap();
        let cut = crate::clock::now_ms() + 1;
        while crate::clock::now_ms() <= cut {
            std::hint::spin_loop();
        }
        history.remember(&fact("$new"), true).unwrap();
        assert_eq!(history.prune(cut).unwrap(), 1);
        let old = EventId::parse("$old").unwrap();
        let new = EventId::parse("$new").unwrap();
        assert_eq!(history.sender_of(&old), None);
        assert!(history.sender_of(&new).is_some());
    }

    /// An agent's message and a message that mentions an agent outlive a restart; a person's
    /// mention-less message is known until then (for an edit that adds a mention), not after.
    #[test]
    fn only_agents_messages_and_mentions_go_to_sled() {
        let dir = tempfile::tempdir().unwrap();
        let person = OwnedUserId::try_from("@alice:example.org").unwrap();
        let agent = OwnedUserId::try_from("@crew_coder:example.org").unwrap();
        let fact = |id: &str, sender: &OwnedUserId, mentioned: &[&OwnedUserId]| Remember {
            event_id: EventId::parse(id).unwrap(),
            sender: sender.clone(),
            mentioned: mentioned.iter().map(|user| (*user).clone()).collect(),
        };
        let ids = ["$by_agent", "$mentioning", "$chatter"].map(|id| EventId::parse(id).unwrap());
        {
            let store = Store::open(dir.path()).unwrap();
            let history = SledHistory::open(&store).unwrap();
            history
                .remember(&fact("$by_agent", &agent, &[]), true)
                .unwrap();
            history
                .remember(&fact("$mentioning", &person, &[&agent]), false)
                .unwrap();
            history
                .remember(&fact("$chatter", &person, &[]), false)
                .unwrap();
            assert_eq!(history.tree.len(), 2, "the chatter is not in sled");
            assert_eq!(history.sender_of(&ids[2]).as_ref(), Some(&person));
            // An edit adds a mention to the chatter: from then on it is kept in sled.
            history
                .remember(&fact("$chatter", &person, &[&agent]), false)
                .unwrap();
            assert_eq!(history.mentioned_by(&ids[2]), std::slice::from_ref(&agent));
        }
        let store = Store::open(dir.path()).unwrap();
        let history = SledHistory::open(&store).unwrap();
        assert_eq!(history.sender_of(&ids[0]).as_ref(), Some(&agent));
        assert_eq!(history.mentioned_by(&ids[1]), std::slice::from_ref(&agent));
        assert_eq!(history.sender_of(&ids[2]).as_ref(), Some(&person));
        history
            .remember(&fact("$later_chatter", &person, &[]), false)
            .unwrap();
        drop((history, store));
        let history = SledHistory::open(&Store::open(dir.path()).unwrap()).unwrap();
        assert_eq!(
            history.sender_of(&EventId::parse("$later_chatter").unwrap()),
            None,
            "mention-less chatter is not kept across a restart"
        );
    }
}
