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
        self.tree.update(&fact.event_id.to_string(), |entry| {
            let mut entry = entry.unwrap_or_default();
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
