//! The durable wake queue: what each agent still has to answer.
//!
//! It grows out of the inbox: the pump turns one inbox entry into its wakes and removes the
//! entry in the same sled transaction, so a wake exists durably from the moment the transaction
//! that carried it was acknowledged, and a crash anywhere loses nothing and duplicates nothing.
//! A wake leaves the queue when the agent's turn that handled it has finished.
//!
//! Keys are `<agent user id> 0x00 <sequence, big-endian>`, so one agent's wakes are one ordered
//! prefix scan.

use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::WakeReason;
use super::event::RoomEvent;
use crate::appservice::inbox::{EntryId, Inbox, complete_in};
use crate::store::{Store, StoreError, Tree};

/// One pending wake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingWake {
    pub agent: OwnedUserId,
    pub room: OwnedRoomId,
    /// The event that woke the agent, as parsed at ingest (a wake an older crew queued, with
    /// the homeserver's JSON, reads the same).
    pub event: RoomEvent,
    /// Depth in a chain of agents waking agents (a person's message is 0).
    pub depth: u32,
    pub reasons: Vec<WakeReason>,
    pub queued_ms: u64,
}

/// What handling one inbox entry caused: committed together with the entry's removal by
/// [`WakeQueue::commit_batch`].
#[derive(Debug, Clone, Default)]
pub struct Handled {
    /// The inbox entry's id.
    pub seq: EntryId,
    pub wakes: Vec<PendingWake>,
    pub effects: Vec<crate::outbox::Staged>,
}

impl PendingWake {
    /// The wakes `decision` asks for, each carrying `event` into `room`'s queue: the one place a
    /// decision becomes queue entries (the pump and the benches that stand in for it).
    pub fn for_decision(
        decision: &super::Decision,
        room: &OwnedRoomId,
        event: &super::event::RoomEvent,
        queued_ms: u64,
    ) -> Vec<PendingWake> {
        decision
            .wakes
            .iter()
            .map(|wake| PendingWake {
                agent: wake.agent.clone(),
                room: room.clone(),
                event: event.clone(),
                depth: wake.depth,
                reasons: wake.reasons.clone(),
                queued_ms,
            })
            .collect()
    }
}

/// A wake and its key in the queue (to finish it).
#[derive(Debug, Clone)]
pub struct QueuedWake {
    pub key: Vec<u8>,
    pub wake: PendingWake,
}

pub struct WakeQueue {
    store: Store,
    wakes: Tree<String, PendingWake>,
}

impl WakeQueue {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            wakes: store.tree("wakes")?,
        })
    }

    /// Queues `wakes`, stages `effects` in the outbox and marks inbox entry `seq` handled, in one sled
    /// transaction: a crash leaves either the event in the inbox or everything it caused.
    pub fn commit_with_effects(
        &self,
        inbox: &Inbox,
        seq: EntryId,
        wakes: &[PendingWake],
        outbox: &crate::outbox::Outbox,
        effects: &[crate::outbox::Staged],
    ) -> Result<(), StoreError> {
        self.commit(inbox, outbox, &[(seq, wakes, effects)])
    }

    /// Commits what handling several inbox entries caused, in ONE sled transaction: every
    /// entry removed, its wakes queued, its effects staged. A crash leaves either all of these
    /// entries in the inbox or everything they caused (handled again after a restart, as for
    /// one entry).
    ///
    /// Why a batch: sled serialises every transaction behind a process-wide lock whose read side
    /// every flush holds for its whole fsync, so each commit of the pump waits for the flush of
    /// the transaction being acknowledged and makes the next ingest wait in turn. One commit per
    /// batch instead of per event removes almost all of those hand-offs (`docs/benchmarks.md`,
    /// "Ingest beside the real pump schedule").
    pub fn commit_batch(
        &self,
        inbox: &Inbox,
        outbox: &crate::outbox::Outbox,
        handled: &[Handled],
    ) -> Result<(), StoreError> {
        let parts: Vec<_> = handled
            .iter()
            .map(|item| (item.seq, item.wakes.as_slice(), item.effects.as_slice()))
            .collect();
        self.commit(inbox, outbox, &parts)
    }

    /// The one sled transaction behind [`WakeQueue::commit_batch`]: (entry, its wakes, its
    /// effects) for each handled entry.
    fn commit(
        &self,
        inbox: &Inbox,
        outbox: &crate::outbox::Outbox,
        handled: &[(EntryId, &[PendingWake], &[crate::outbox::Staged])],
    ) -> Result<(), StoreError> {
        let mut encoded = Vec::new();
        let mut staged = Vec::new();
        for (_, wakes, effects) in handled {
            staged.extend(outbox.encode(effects)?);
            for wake in *wakes {
                let mut key = wake.agent.as_str().as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&self.store.next_id()?.to_be_bytes());
                encoded.push((key, self.wakes.encode(wake)?));
            }
        }
        let (inbox_entries, inbox_progress) = inbox.raw_trees();
        let ids: Vec<_> = handled.iter().map(|(id, _, _)| *id).collect();
        (
            inbox_entries,
            inbox_progress,
            self.wakes.raw(),
            outbox.raw(),
        )
            .transaction(|(entries, progress, queue, pending)| {
                complete_in(entries, progress, &ids)?;
                for (key, value) in &encoded {
                    queue.insert(key.as_slice(), value.as_slice())?;
                }
                for (key, value) in &staged {
                    pending.insert(key.as_slice(), value.as_slice())?;
                }
                Ok(())
            })
            .map_err(|error| StoreError::from_transaction("event commit", error))?;
        inbox.mark_handled(ids.len());
        Ok(())
    }

    /// Queues wakes crew decided itself (internal wakes: a project task done, blocked,
    /// ready), durably: flushed before this returns, so a wake promised is never lost.
    pub async fn push(&self, wakes: &[PendingWake]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for wake in wakes {
            let mut key = wake.agent.as_str().as_bytes().to_vec();
            key.push(0);
            key.extend_from_slice(&self.store.next_id()?.to_be_bytes());
            batch.insert(key, self.wakes.encode(wake)?);
        }
        self.wakes.raw().apply_batch(batch)?;
        self.store.flush().await
    }

    /// Whether a wake for the event `event_id` is queued for `agent` (an internal wake is
    /// queued once per cause).
    pub fn has_event(&self, agent: &UserId, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .pending_for(agent)?
            .iter()
            .any(|queued| queued.wake.event.event_id == event_id))
    }

    /// Every pending wake of `agent`, oldest first. A wake that cannot be read (queued by an
    /// older crew for an event the typed event refuses) is logged and removed: it could never
    /// be answered, and must not stop the agent's other wakes.
    pub fn pending_for(&self, agent: &UserId) -> Result<Vec<QueuedWake>, StoreError> {
        let mut prefix = agent.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut pending = Vec::new();
        for entry in self.wakes.raw().scan_prefix(&prefix) {
            let (key, value) = entry?;
            match self.wakes.decode(&value) {
                Ok(wake) => pending.push(QueuedWake {
                    key: key.to_vec(),
                    wake,
                }),
                Err(error) => {
                    tracing::warn!(%agent, %error, "dropping a queued wake crew cannot read");
                    self.wakes.raw().remove(key)?;
                }
            }
        }
        Ok(pending)
    }

    /// Agents that have pending wakes (after a restart: whose turns to run).
    pub fn agents_with_pending(&self) -> Result<Vec<OwnedUserId>, StoreError> {
        let mut agents: Vec<OwnedUserId> = Vec::new();
        for entry in self.wakes.raw().iter() {
            let (key, _) = entry?;
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            let agent = std::str::from_utf8(&key[..end])
                .ok()
                .and_then(|id| UserId::parse(id).ok());
            if let Some(agent) = agent.filter(|agent| agents.last() != Some(agent)) {
                agents.push(agent);
            }
        }
        agents.dedup();
        Ok(agents)
    }

    /// Removes handled wakes.
    pub fn finish(&self, wakes: &[QueuedWake]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for wake in wakes {
            batch.remove(wake.key.as_slice());
        }
        self.wakes.raw().apply_batch(batch)?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.wakes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wakes.is_empty()
    }
}
