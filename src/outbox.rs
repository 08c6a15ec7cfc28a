//! The durable outbox: what the event pump decided to do on the homeserver, done later.
//!
//! The pump never waits on the homeserver: joining on an invite, declining one, a one-time
//! notice and the answer to a `!crew` command are *effects*, committed in the same sled
//! transaction that removes their event from the inbox (with the wakes). The outbox runner
//! (`server::outbox_runner`) performs them in order per room and concurrently across rooms,
//! retrying transient failures (network, 429, 5xx) with backoff, so one slow room never delays
//! the others and a failed join is not lost. A permanent refusal (403, 404…) is recorded with
//! its reason under the event that caused it, where `!crew why` shows it.
//!
//! Nothing that creates something on the homeserver is sent blindly twice. Every message
//! carries its outbox key in its content ([`OUTBOX_KEY_FIELD`]) and a transaction id derived
//! from it; a room the outbox creates carries the key in its `creation_content`. The first
//! attempt is recorded ([`Outbox::mark_attempted`]) before the request leaves; an attempted
//! effect is re-run only after looking on the homeserver for what the first attempt made (the
//! room's recent events, the agent's rooms), because a homeserver that restarted has forgotten
//! its transaction ids. What was made (the event id, the room id) is recorded before the effect
//! is marked done. Joins, declines and leaves are idempotent on the homeserver.
//!
//! Keys are `<room id> 0x00 <sequence, big-endian>`: one room's effects are one ordered prefix
//! scan.

use std::collections::BTreeSet;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::matrix::{CreateRoom, MatrixClient, MatrixError};
use crate::store::{Store, StoreError, Tree};

/// The content field that carries an effect's outbox key in every message and created room, so
/// that a re-run finds what an unacknowledged attempt made.
pub const OUTBOX_KEY_FIELD: &str = "org.matrix-crew.outbox_key";

/// Something to do on the homeserver, in one room, as one of our agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    /// Join on an invite, then learn the room's state.
    Join { agent: OwnedUserId },
    /// Decline an invite, saying why.
    Decline { agent: OwnedUserId, reason: String },
    /// Learn the room's state as `agent` (after its join was seen).
    Seed { agent: OwnedUserId },
    /// Send an `m.room.message`; `txn_key` makes the transaction id and is the outbox key.
    Send {
        agent: OwnedUserId,
        txn_key: String,
        content: Value,
    },
    /// The offer of an encrypted room: `agent` creates an unencrypted room (once, keyed by
    /// `txn_key`) with `invite`d, then says so in this room (or, if the homeserver refused the
    /// room, how to invite it elsewhere).
    OfferRoom {
        agent: OwnedUserId,
        name: String,
        topic: String,
        invite: Vec<OwnedUserId>,
        txn_key: String,
    },
    /// `!crew remove <name>`: the Worker is removed (token revoked, sandbox gone, it leaves its
    /// rooms), then the Manager answers `command` in this room, in reply to it.
    RemoveWorker {
        name: String,
        /// The command event, as far as a reply needs it (`event_id`, `content.m.relates_to`).
        command: Value,
        txn_key: String,
    },
}

/// An effect with its room and the event that caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Staged {
    pub room: OwnedRoomId,
    /// The event id the effect answers (for `!crew why`).
    pub cause: String,
    pub effect: Effect,
}

/// A permanent failure, kept for `!crew why`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub what: String,
    pub reason: String,
    pub at_ms: u64,
}

/// One effect as stored: its key and its JSON.
pub type Encoded = (Vec<u8>, Vec<u8>);

/// A message the outbox sent: recorded before its effect is marked done, so a send staged
/// again (a turn re-run after a crash) is not sent twice, whatever the homeserver remembers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub event_id: String,
    pub at_ms: u64,
}

/// A room created once, recorded before its effect is marked done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub room_id: OwnedRoomId,
    pub at_ms: u64,
}

/// The `outbox`, `outbox_failures`, `outbox_sent`, `outbox_attempted` and `outbox_created`
/// trees.
pub struct Outbox {
    store: Store,
    pending: Tree<String, Staged>,
    failures: Tree<String, Vec<Failure>>,
    sent: Tree<String, Sent>,
    /// Creating requests that may have reached the homeserver (by agent and outbox key), with
    /// when: a re-run looks for what they made before sending again.
    attempted: Tree<String, u64>,
    created: Tree<String, Created>,
    /// Rooms created once (the offer of an unencrypted room; a Worker's room through
    /// `agent::team`).
    pub rooms: RoomsCreatedOnce,
    staged: Notify,
}

/// Creates rooms at most once per key, whatever happens to the request: the room is recorded
/// once created, the attempt is recorded (and flushed) before the request leaves, and a repeated
/// attempt first looks for a room of the creator's whose `m.room.create` content carries the
/// key ([`OUTBOX_KEY_FIELD`]). A Clone is a handle on the same trees.
#[derive(Clone)]
pub struct RoomsCreatedOnce {
    store: Store,
    attempted: Tree<String, u64>,
    created: Tree<String, Created>,
}

/// Why a room could not be created (yet).
#[derive(Debug, thiserror::Error)]
pub enum CreateOnceError {
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The records of what was created could not be read or written: nothing was sent.
    #[error("the record of created rooms: {0}")]
    Store(#[from] StoreError),
}

impl RoomsCreatedOnce {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            attempted: store.tree("outbox_attempted")?,
            created: store.tree("outbox_created")?,
        })
    }

    /// The room `creator` created under `key`, creating it unless an earlier attempt did.
    pub async fn create(
        &self,
        client: &MatrixClient,
        creator: &UserId,
        mut room: CreateRoom,
        key: &str,
    ) -> Result<OwnedRoomId, CreateOnceError> {
        let record = sent_key(creator, key);
        if let Some(created) = self.created.get(&record)? {
            return Ok(created.room_id);
        }
        let attempt = sent_key(creator, &format!("create:{key}"));
        if self.attempted.get(&attempt)?.is_some() {
            if let Some(found) = client
                .created_room_with(creator, OUTBOX_KEY_FIELD, key)
                .await?
            {
                tracing::info!(room = %found, "an earlier attempt created the room; not creating again");
                self.record(&record, &found)?;
                return Ok(found);
            }
        } else {
            self.attempted.insert(&attempt, &crate::clock::now_ms())?;
            self.store.flush().await?;
        }
        room.creation_content
            .insert(OUTBOX_KEY_FIELD.to_owned(), Value::from(key));
        let created = client.create_room(creator, &room).await?;
        self.record(&record, &created)?;
        Ok(created)
    }

    fn record(&self, record: &String, room: &RoomId) -> Result<(), StoreError> {
        self.created.insert(
            record,
            &Created {
                room_id: room.to_owned(),
                at_ms: crate::clock::now_ms(),
            },
        )
    }
}

impl Outbox {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            pending: store.tree("outbox")?,
            failures: store.tree("outbox_failures")?,
            sent: store.tree("outbox_sent")?,
            attempted: store.tree("outbox_attempted")?,
            created: store.tree("outbox_created")?,
            rooms: RoomsCreatedOnce::open(store)?,
            staged: Notify::new(),
        })
    }

    /// The encoded entries for `effects`, to insert into [`Outbox::raw`] inside the caller's
    /// transaction.
    pub fn encode(&self, effects: &[Staged]) -> Result<Vec<Encoded>, StoreError> {
        effects
            .iter()
            .map(|staged| {
                let mut key = staged.room.as_str().as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&self.store.next_id()?.to_be_bytes());
                Ok((key, self.pending.encode(staged)?))
            })
            .collect()
    }

    /// Stages effects on their own (not with an inbox entry): a turn's answer.
    pub fn stage(&self, effects: &[Staged]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in self.encode(effects)? {
            batch.insert(key, value);
        }
        self.pending.raw().apply_batch(batch)?;
        self.notify();
        Ok(())
    }

    /// The event id of the message `agent` sent under `txn_key`, if the outbox sent it.
    pub fn sent(&self, agent: &UserId, txn_key: &str) -> Result<Option<Sent>, StoreError> {
        self.sent.get(&sent_key(agent, txn_key))
    }

    /// Records a message as sent; call before [`Outbox::done`].
    pub fn record_sent(
        &self,
        agent: &UserId,
        txn_key: &str,
        event_id: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.sent.insert(
            &sent_key(agent, txn_key),
            &Sent {
                event_id: event_id.to_owned(),
                at_ms: now_ms,
            },
        )
    }

    /// Records that a creating request (a send, a createRoom) for `agent` under `key` is about
    /// to leave, flushed before it does: after a crash or an unanswered request, whether the
    /// homeserver has it must be looked up, not assumed. Returns whether an earlier attempt was
    /// already recorded (then look before sending again).
    pub async fn mark_attempted(
        &self,
        agent: &UserId,
        key: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let key = sent_key(agent, key);
        if self.attempted.get(&key)?.is_some() {
            return Ok(true);
        }
        self.attempted.insert(&key, &now_ms)?;
        self.store.flush().await?;
        Ok(false)
    }

    /// Forgets sent, attempted and created records older than `before_ms`.
    pub fn prune_sent(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for entry in self.sent.iter() {
            let (key, sent) = entry?;
            if sent.at_ms < before_ms {
                self.sent.remove(&key)?;
                pruned += 1;
            }
        }
        for entry in self.attempted.iter() {
            let (key, at_ms) = entry?;
            if at_ms < before_ms {
                self.attempted.remove(&key)?;
                pruned += 1;
            }
        }
        for entry in self.created.iter() {
            let (key, created) = entry?;
            if created.at_ms < before_ms {
                self.created.remove(&key)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// The pending tree, for the pump's transaction.
    pub fn raw(&self) -> &sled::Tree {
        self.pending.raw()
    }

    /// Tells the runner that effects were committed.
    pub fn notify(&self) {
        self.staged.notify_one();
    }

    /// Resolves when effects may have been committed since the last call.
    pub async fn staged(&self) {
        self.staged.notified().await;
    }

    /// Rooms with pending effects.
    pub fn rooms(&self) -> Result<BTreeSet<OwnedRoomId>, StoreError> {
        let mut rooms = BTreeSet::new();
        for key in self.pending.raw().iter().keys() {
            let key = key?;
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            if let Some(room) = std::str::from_utf8(&key[..end])
                .ok()
                .and_then(|id| RoomId::parse(id).ok())
            {
                rooms.insert(room);
            }
        }
        Ok(rooms)
    }

    /// The oldest pending effect of `room`.
    pub fn next(&self, room: &RoomId) -> Result<Option<(Vec<u8>, Staged)>, StoreError> {
        let mut prefix = room.as_str().as_bytes().to_vec();
        prefix.push(0);
        match self.pending.raw().scan_prefix(&prefix).next() {
            Some(entry) => {
                let (key, value) = entry?;
                Ok(Some((key.to_vec(), self.pending.decode(&value)?)))
            }
            None => Ok(None),
        }
    }

    /// Every pending effect, oldest first per room.
    pub fn pending(&self) -> Result<Vec<Staged>, StoreError> {
        self.pending
            .raw()
            .iter()
            .values()
            .map(|value| self.pending.decode(&value?))
            .collect()
    }

    /// The effect is done.
    pub fn done(&self, key: &[u8]) -> Result<(), StoreError> {
        self.pending.raw().remove(key)?;
        Ok(())
    }

    /// The homeserver refused the effect for good: it leaves the outbox and its reason is kept
    /// under its cause.
    pub fn failed(
        &self,
        key: &[u8],
        staged: &Staged,
        reason: String,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let failure = Failure {
            what: staged.effect.describe(),
            reason,
            at_ms: now_ms,
        };
        self.failures.update(&staged.cause, |kept| {
            let mut kept = kept.unwrap_or_default();
            kept.push(failure.clone());
            Some(kept)
        })?;
        self.done(key)
    }

    /// The permanent failures of effects caused by `event_id`.
    pub fn failures(&self, event_id: &str) -> Result<Vec<Failure>, StoreError> {
        Ok(self.failures.get(&event_id.to_owned())?.unwrap_or_default())
    }

    /// Forgets failures recorded before `before_ms`.
    pub fn prune_failures(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for entry in self.failures.iter() {
            let (cause, kept) = entry?;
            if kept.iter().all(|failure| failure.at_ms < before_ms) {
                self.failures.remove(&cause)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

fn sent_key(agent: &UserId, txn_key: &str) -> String {
    format!("{agent}\u{0}{txn_key}")
}

impl Effect {
    /// In words, for `!crew why`.
    pub fn describe(&self) -> String {
        match self {
            Effect::Join { agent } => format!("{agent} joining"),
            Effect::Decline { agent, .. } => format!("{agent} declining the invite"),
            Effect::Seed { agent } => format!("{agent} reading the room's state"),
            Effect::Send { agent, .. } => format!("{agent}'s message"),
            Effect::OfferRoom { agent, .. } => format!("{agent} opening an unencrypted room"),
            Effect::RemoveWorker { name, .. } => format!("removing the Worker `{name}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(room: &str, cause: &str, agent: &str) -> Staged {
        Staged {
            room: RoomId::parse(room).unwrap(),
            cause: cause.to_owned(),
            effect: Effect::Join {
                agent: OwnedUserId::try_from(agent).unwrap(),
            },
        }
    }

    fn commit(outbox: &Outbox, effects: &[Staged]) {
        for (key, value) in outbox.encode(effects).unwrap() {
            outbox.raw().insert(key, value).unwrap();
        }
    }

    #[test]
    fn effects_are_ordered_per_room_and_failures_kept_by_cause() {
        let store = Store::temporary().unwrap();
        let outbox = Outbox::open(&store).unwrap();
        commit(
            &outbox,
            &[
                staged("!b:x", "$1", "@crew_a:x"),
                staged("!a:x", "$2", "@crew_a:x"),
                staged("!b:x", "$3", "@crew_b:x"),
            ],
        );
        let rooms: Vec<String> = outbox
            .rooms()
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(rooms, ["!a:x", "!b:x"]);
        let b = RoomId::parse("!b:x").unwrap();
        let (key, first) = outbox.next(&b).unwrap().unwrap();
        assert_eq!(first.cause, "$1");
        outbox
            .failed(&key, &first, "403 M_FORBIDDEN: not invited".into(), 5)
            .unwrap();
        let (_, second) = outbox.next(&b).unwrap().unwrap();
        assert_eq!(second.cause, "$3", "the next effect of the room follows");
        let failures = outbox.failures("$1").unwrap();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].reason.contains("not invited"));
        assert!(failures[0].what.contains("joining"));
        assert_eq!(outbox.prune_failures(6).unwrap(), 1);
        assert!(outbox.failures("$1").unwrap().is_empty());
    }

    #[test]
    fn a_sent_message_is_remembered_until_pruned() {
        let store = Store::temporary().unwrap();
        let outbox = Outbox::open(&store).unwrap();
        let agent = UserId::parse("@crew:x").unwrap();
        assert_eq!(outbox.sent(&agent, "turn:$1").unwrap(), None);
        outbox.record_sent(&agent, "turn:$1", "$sent", 10).unwrap();
        assert_eq!(
            outbox.sent(&agent, "turn:$1").unwrap().unwrap().event_id,
            "$sent"
        );
        assert_eq!(outbox.sent(&agent, "turn:$2").unwrap(), None);
        assert_eq!(outbox.prune_sent(11).unwrap(), 1);
        assert_eq!(outbox.sent(&agent, "turn:$1").unwrap(), None);
    }
}
