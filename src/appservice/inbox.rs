//! The durable inbox: every event the homeserver pushes, persisted before we acknowledge it.
//!
//! This is the one queue of incoming work. The transaction handler [`Inbox::ingest`]s a
//! transaction (deduplicating by event id, the real guarantee, and by transaction id), then waits
//! for [`crate::store::Store::flush`] before answering `200 {}`, so a crash right after the answer
//! loses nothing. The event pump reads entries in arrival order with [`Inbox::pending`] and
//! removes each with [`Inbox::complete`] once it has been fully handled; what is not completed is
//! handled again after a restart.
//!
//! A transaction's new events are stored as **one** sled value (a batch), not one value each:
//! sled splits a leaf every 16 keys and copies the node it changes, so a hundred inserts per
//! transaction (and a hundred removals by the pump) were most of ingest's time and a page of
//! sled's memory per 16 events (docs/benchmarks.md, "One value per transaction"). An entry is
//! then addressed by an [`EntryId`]: its batch, its place in it and whether it is the batch's
//! last; handling part of a batch records how far the pump got (tree `inbox_progress`), handling
//! its last event removes the batch. Entries an older crew wrote one per event read as batches
//! of one.
//!
//! A backlog is bounded ([`BacklogLimit`]): once more events wait than the limit, a
//! transaction's answer waits (a few seconds at most) for the pump to take the backlog under it.
//! The homeserver sends one transaction at a time, so it then holds the rest of a burst in its
//! own database, where it is kept anyway, instead of crew holding it in memory (sled's cache,
//! the fingerprints); nothing is refused and nothing is lost.
//!
//! Transaction ids are scoped by the digest of the transaction's events: a homeserver that
//! resets and counts its txnIds from 1 again sends different events under an old id, and those are
//! processed, not mistaken for a retry.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sled::Transactional;
use tokio::sync::Notify;

use super::seen::{self, SeenEvents};
use crate::clock::now_ms;
use crate::dispatch::event::{EventError, RoomEvent};
use crate::store::{Store, StoreError, Tree, TreeKey};

/// The most entries [`Inbox::pending`] allocates room for up front.
const BATCH_CAPACITY_MAX: usize = 1024;

/// The sled tree of the waiting batches.
const ENTRIES_TREE: &str = "inbox";

/// Bits of an [`EntryId`] below the batch's sequence number: the event's place in its batch
/// and the "last of its batch" flag. A homeserver sends at most 100 events per transaction
/// (Synapse) and crew refuses bodies over its limit long before 65,536.
const PLACE_BITS: u32 = 17;

/// The most events one batch holds (what 16 bits of place can address).
const BATCH_EVENTS_MAX: usize = 1 << (PLACE_BITS - 1);

/// Where one inbox entry is: `batch << 17 | place << 1 | last`. Ordered as the entries arrived
/// (batches are numbered by the store's counter, far below 2^47). The pump hands it back to
/// [`complete_in`] with what the entry caused.
pub type EntryId = u64;

fn entry_id(batch: u64, place: usize, last: bool) -> EntryId {
    (batch << PLACE_BITS) | ((place as u64) << 1) | u64::from(last)
}

/// An entry id's batch, place in it and whether it is the batch's last.
fn split_id(id: EntryId) -> (u64, usize, bool) {
    (
        id >> PLACE_BITS,
        ((id >> 1) & ((1 << (PLACE_BITS - 1)) - 1)) as usize,
        id & 1 == 1,
    )
}

/// How big a backlog the inbox takes before it slows the homeserver down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimit {
    /// Events waiting for the pump past which a transaction's answer waits for it.
    pub events: usize,
    /// The longest one answer waits. Well under the homeserver's own timeout (Tuwunel's
    /// `appservice_timeout` is 35 s, and Tuwunel does not retry a transaction that timed out
    /// until its next event): past it the transaction is taken anyway, so a stalled pump
    /// slows the homeserver down but never makes it give up.
    pub wait: Duration,
}

impl Default for BacklogLimit {
    /// 10,000 events (a hundred full transactions, a few MiB) is far more than a busy
    /// homeserver's normal traffic leaves waiting, and small enough to keep crew's memory flat
    /// under a flood (docs/benchmarks.md, "A bounded backlog").
    fn default() -> Self {
        Self {
            events: 10_000,
            wait: Duration::from_secs(5),
        }
    }
}

/// One event waiting to be handled, parsed once at ingest. Stored in its transaction's batch,
/// in the Matrix shape (see [`StoredValue`]); what an older crew wrote, the homeserver's JSON as
/// it came, reads the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxEntry {
    pub event: RoomEvent,
    /// Milliseconds since the epoch when the transaction arrived.
    pub received_ms: u64,
}

impl InboxEntry {
    pub fn event_id(&self) -> &str {
        self.event.event_id.as_str()
    }
}

/// What ingesting a transaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The transaction id was seen before with the same events: nothing was done.
    pub duplicate_transaction: bool,
    /// Events newly queued.
    pub queued: usize,
    /// Events already seen (by event id) and skipped.
    pub duplicate_events: usize,
    /// Events that could not be handled at all (not an object; no string `type`; no valid
    /// `event_id`, `room_id` or `sender`); each logged with its reason and skipped.
    pub malformed: usize,
}

/// The id of an event that could not be parsed, for the transaction digest.
#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(borrow, default)]
    event_id: Option<std::borrow::Cow<'a, str>>,
}

/// One value of the inbox tree, as read: a batch (`{"received_ms", "batch": [events]}`, what
/// this crew writes, one per transaction), or one event (`{"event", "received_ms"}`, what an
/// older crew wrote per event). Events are parsed one by one, so one that the typed event
/// refuses does not take its batch with it.
#[derive(Deserialize)]
struct StoredValue<'a> {
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    received_ms: u64,
}

/// A transaction parsed and encoded, before the lock: see [`Inbox::prepare`].
struct Prepared {
    digest: String,
    received_ms: u64,
    /// Each valid event's id and the event encoded, in the transaction's order.
    entries: Vec<(String, Vec<u8>)>,
    malformed: usize,
}

/// What [`Inbox::prune`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub events: usize,
    pub transactions: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransactionRecord {
    digest: String,
    received_ms: u64,
}

/// The durable inbox. Cheap to share behind an `Arc`.
pub struct Inbox {
    store: Store,
    /// Batches by sequence number, big-endian (see the module documentation); values read
    /// as [`StoredValue`].
    entries: sled::Tree,
    /// How many events of a batch the pump has handled, by batch, when it stopped inside one.
    progress: sled::Tree,
    transactions: Tree<String, TransactionRecord>,
    /// The event ids queued (see [`super::seen`]). Its lock serialises ingest, so that two copies
    /// of one transaction arriving at once are seen as one. No `.await` happens under it: sled
    /// writes go to memory, the flush happens after.
    seen: Mutex<SeenEvents>,
    arrived: Notify,
    /// Events queued and not yet handled, as ingest adds them and the pump marks them handled
    /// (counted at open). It may read low, never lastingly high: it is set to zero whenever the
    /// pump finds the inbox empty.
    waiting: AtomicUsize,
    limit: BacklogLimit,
    /// Signalled when the pump takes the backlog under [`BacklogLimit::events`].
    drained: Notify,
    /// Transactions whose answer waited for the pump (for tests and a debugger; no status page
    /// shows it yet).
    held_back: AtomicUsize,
}

impl Inbox {
    /// The inbox in `store`, with the default [`BacklogLimit`].
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let inbox = Self {
            store: store.clone(),
            entries: store.db().open_tree(ENTRIES_TREE)?,
            progress: store.db().open_tree("inbox_progress")?,
            transactions: store.tree("inbox_transactions")?,
            seen: Mutex::new(SeenEvents::open(store)?),
            arrived: Notify::new(),
            waiting: AtomicUsize::new(0),
            limit: BacklogLimit::default(),
            drained: Notify::new(),
            held_back: AtomicUsize::new(0),
        };
        inbox.waiting.store(inbox.len(), Ordering::Relaxed);
        Ok(inbox)
    }

    /// The same inbox with another backlog limit.
    pub fn with_backlog_limit(mut self, limit: BacklogLimit) -> Self {
        self.limit = limit;
        self
    }

    /// Queues the events of one transaction, deduplicated. Not yet durable: call
    /// [`Inbox::ingest_durably`] from request handlers.
    pub fn ingest(
        &self,
        txn_id: &str,
        events: &[Box<RawValue>],
    ) -> Result<IngestOutcome, StoreError> {
        let prepared = self.prepare(txn_id, events)?;
        self.commit(txn_id, prepared)
    }

    /// The work that needs no lock: every event parsed (once, here: the pump, the wake queue
    /// and the turns read the typed event), the transaction's digest, each entry encoded.
    fn prepare(&self, txn_id: &str, events: &[Box<RawValue>]) -> Result<Prepared, StoreError> {
        let parsed: Vec<Result<RoomEvent, EventError>> = events
            .iter()
            .map(|raw| RoomEvent::parse(raw.get()))
            .collect();
        let digest = transaction_digest(events, &parsed);
        let now = now_ms();
        let mut prepared = Prepared {
            digest,
            received_ms: now,
            entries: Vec::with_capacity(parsed.len()),
            malformed: 0,
        };
        for (index, event) in parsed.iter().enumerate() {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(txn_id, index, %error, "rejecting an event crew cannot handle");
                    prepared.malformed += 1;
                    continue;
                }
            };
            let encoded = serde_json::to_vec(event).map_err(|source| StoreError::Encode {
                tree: ENTRIES_TREE.to_owned(),
                source,
            })?;
            prepared
                .entries
                .push((event.event_id.as_str().to_owned(), encoded));
        }
        Ok(prepared)
    }

    /// Deduplicates a prepared transaction and writes what is new in one sled transaction.
    fn commit(&self, txn_id: &str, prepared: Prepared) -> Result<IngestOutcome, StoreError> {
        let mut seen = self.seen_events();
        let mut outcome = IngestOutcome {
            malformed: prepared.malformed,
            ..IngestOutcome::default()
        };
        if let Some(record) = self.transactions.get(&txn_id.to_owned())? {
            if record.digest == prepared.digest {
                return Ok(IngestOutcome {
                    duplicate_transaction: true,
                    ..IngestOutcome::default()
                });
            }
            tracing::info!(
                txn_id,
                "transaction id reused with different events (homeserver reset?); processing it"
            );
        }
        // Deduplicated here, under the lock, against the fingerprints in memory; the record of
        // the new ones is written with their events below.
        let mut new = Vec::with_capacity(prepared.entries.len());
        let mut new_fingerprints = Vec::with_capacity(prepared.entries.len());
        let mut here = std::collections::HashSet::with_capacity(prepared.entries.len());
        for (event_id, encoded) in &prepared.entries {
            let fingerprint = seen.fingerprint(event_id);
            if seen.contains(fingerprint) || !here.insert(fingerprint) {
                outcome.duplicate_events += 1;
                continue;
            }
            new_fingerprints.push(fingerprint);
            new.push(encoded);
        }
        // Numbered before the sled transaction (the store's counter cannot be read inside one).
        let batch_seqs = (0..new.len().div_ceil(BATCH_EVENTS_MAX))
            .map(|_| self.store.next_id())
            .collect::<Result<Vec<_>, _>>()?;
        let record = self.transactions.encode(&TransactionRecord {
            digest: prepared.digest,
            received_ms: prepared.received_ms,
        })?;
        let seen_record = batch_seqs.first().map(|&batch| {
            (
                seen::record_key(prepared.received_ms, batch),
                seen::record_value(&new_fingerprints),
            )
        });
        // One sled transaction: a flush can never persist the seen record without the entries
        // (which would make the homeserver's retry look like a duplicate and lose the events).
        (seen.tree(), &self.entries, self.transactions.raw())
            .transaction(|(seen_records, entries, transactions)| {
                for (events, seq) in new.chunks(BATCH_EVENTS_MAX).zip(&batch_seqs) {
                    let batch = encode_batch(prepared.received_ms, events.iter().copied());
                    entries.insert(&seq.to_be_bytes(), batch)?;
                }
                if let Some((key, value)) = &seen_record {
                    seen_records.insert(key, value.as_slice())?;
                }
                transactions.insert(txn_id.as_bytes(), record.as_slice())?;
                Ok(())
            })
            .map_err(|error| StoreError::from_transaction("ingest", error))?;
        seen.extend(new_fingerprints);
        outcome.queued = new.len();
        self.waiting.fetch_add(outcome.queued, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Forgets event ids and transaction ids received before `before_ms`. The homeserver
    /// retries a transaction for minutes to hours, not weeks: past the retention the marks only
    /// grow the database.
    pub fn prune(&self, before_ms: u64) -> Result<Pruned, StoreError> {
        let mut seen = self.seen_events();
        let mut pruned = Pruned {
            events: seen.prune(before_ms)?,
            ..Pruned::default()
        };
        for entry in self.transactions.iter() {
            let (txn_id, record) = entry?;
            if record.received_ms < before_ms {
                self.transactions.remove(&txn_id)?;
                pruned.transactions += 1;
            }
        }
        Ok(pruned)
    }

    /// The seen set, under the lock that serialises ingest. A panic while it was held left it as
    /// the last committed transaction left it (it is extended only after a commit).
    fn seen_events(&self) -> std::sync::MutexGuard<'_, SeenEvents> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many event ids are remembered (for status pages and tests).
    pub fn seen_len(&self) -> usize {
        self.seen_events().len()
    }

    /// Queues the events and returns once they are on disk; then wakes the pump.
    pub async fn ingest_durably(
        &self,
        txn_id: &str,
        events: &[Box<RawValue>],
    ) -> Result<IngestOutcome, StoreError> {
        self.wait_for_room().await;
        let prepared = self.prepare(txn_id, events)?;
        let outcome = {
            // The commit waits for a running flush here, not on sled's lock (`Store::write_gate`).
            let _gate = self.store.write_gate().await;
            self.commit(txn_id, prepared)?
        };
        // A duplicate also waits: the first copy's events may still be on their way to disk.
        self.store.flush().await?;
        if outcome.queued > 0 {
            self.arrived.notify_one();
        }
        Ok(outcome)
    }

    /// Returns at once while the backlog is under its limit; otherwise when the pump has taken
    /// it under, or after [`BacklogLimit::wait`] (then the transaction is taken anyway).
    async fn wait_for_room(&self) {
        if self.waiting() < self.limit.events {
            return;
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let deadline = started + self.limit.wait;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain between the two is not missed.
            drained.as_mut().enable();
            if self.waiting() < self.limit.events {
                tracing::debug!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "a transaction waited for the pump to take the backlog under its limit"
                );
                return;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                tracing::warn!(
                    waiting = self.waiting(),
                    limit = self.limit.events,
                    "the inbox backlog stays over its limit; taking the transaction anyway"
                );
                return;
            }
        }
    }

    /// Events waiting for the pump, as ingest and the pump count them: it may read low (until
    /// the pump next finds the inbox empty), never lastingly high.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// How many transactions' answers waited for the pump since start-up.
    pub fn held_back(&self) -> usize {
        self.held_back.load(Ordering::Relaxed)
    }

    /// Counts `count` entries handled, after the sled transaction that marked them
    /// ([`complete_in`]) committed; releases waiting transactions once under the limit.
    pub fn mark_handled(&self, count: usize) {
        let before = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waiting| {
                Some(waiting.saturating_sub(count))
            })
            .unwrap_or_else(|waiting| waiting);
        if before.saturating_sub(count) < self.limit.events {
            self.drained.notify_waiters();
        }
    }

    /// Up to `limit` entries in arrival order, oldest first, each with its [`EntryId`]. An
    /// event that cannot be read (one an older crew queued that the typed event refuses) is
    /// logged and skipped, and a batch with nothing left to handle is removed: it could never
    /// be handled, and must not stop the entries behind it.
    pub fn pending(&self, limit: usize) -> Result<Vec<(EntryId, InboxEntry)>, StoreError> {
        // Not `limit.min(self.len())`: sled counts a tree by walking all of it, which made every
        // read of the pump cost the whole backlog (a pump 172,000 entries behind handled 500 of
        // them while ingest ran).
        let mut pending = Vec::with_capacity(limit.min(BATCH_CAPACITY_MAX));
        for item in self.entries.iter() {
            if pending.len() >= limit {
                break;
            }
            let (key, value) = item?;
            let Some(seq) = u64::from_key(&key) else {
                tracing::warn!("removing an inbox entry with a malformed key");
                self.entries.remove(key)?;
                continue;
            };
            let readable = self.waiting_in(seq, &value)?;
            let Some(last) = readable.last().map(|(place, _)| *place) else {
                tracing::warn!(seq, "removing an inbox batch with nothing left to handle");
                self.forget_batch(seq)?;
                continue;
            };
            // The last *readable* event carries the flag: handling it removes the batch.
            for (place, entry) in readable {
                if pending.len() >= limit {
                    break;
                }
                pending.push((entry_id(seq, place, place == last), entry));
            }
        }
        if pending.is_empty() {
            // Nothing waits: whatever the count says. An ingest that commits meanwhile may have
            // its events counted out here, which only lets a little more in.
            self.waiting.store(0, Ordering::Relaxed);
            self.drained.notify_waiters();
        }
        Ok(pending)
    }

    /// The events of batch `seq` (stored as `value`) that wait: readable and not yet handled,
    /// with their places.
    fn waiting_in(&self, seq: u64, value: &[u8]) -> Result<Vec<(usize, InboxEntry)>, StoreError> {
        let handled = self.handled_of(seq)?;
        let mut readable = self.read_batch(seq, value);
        readable.retain(|(place, _)| *place >= handled);
        Ok(readable)
    }

    /// The events of one stored value that the typed event accepts, with their places.
    fn read_batch(&self, seq: u64, value: &[u8]) -> Vec<(usize, InboxEntry)> {
        let stored: StoredValue<'_> = match serde_json::from_slice(value) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(seq, %error, "an inbox entry crew cannot read");
                return Vec::new();
            }
        };
        let events = match (stored.batch, stored.event) {
            (Some(batch), _) => batch,
            (None, Some(event)) => vec![event],
            (None, None) => Vec::new(),
        };
        events
            .into_iter()
            .enumerate()
            .filter_map(|(place, raw)| match RoomEvent::parse(raw.get()) {
                Ok(event) => Some((
                    place,
                    InboxEntry {
                        event,
                        received_ms: stored.received_ms,
                    },
                )),
                Err(error) => {
                    tracing::warn!(seq, place, %error, "skipping a queued event crew cannot handle");
                    None
                }
            })
            .collect()
    }

    /// How many events of batch `seq` were handled already.
    fn handled_of(&self, seq: u64) -> Result<usize, StoreError> {
        Ok(self
            .progress
            .get(seq.to_be_bytes())?
            .and_then(|raw| u64::from_key(&raw))
            .map_or(0, |handled| handled as usize))
    }

    fn forget_batch(&self, seq: u64) -> Result<(), StoreError> {
        self.entries.remove(seq.to_be_bytes())?;
        self.progress.remove(seq.to_be_bytes())?;
        Ok(())
    }

    /// Removes a handled entry (and the batch with its last one).
    pub fn complete(&self, id: EntryId) -> Result<(), StoreError> {
        (&self.entries, &self.progress)
            .transaction(|(entries, progress)| complete_in(entries, progress, &[id]))
            .map_err(|error| StoreError::from_transaction("completion", error))?;
        self.mark_handled(1);
        Ok(())
    }

    /// How many events wait. Walks the whole inbox and reads every batch (sled keeps no
    /// count): for status pages and tests, never on the pump's path.
    pub fn len(&self) -> usize {
        self.entries
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, value)| {
                let seq = u64::from_key(&key)?;
                Some(self.waiting_in(seq, &value).ok()?.len())
            })
            .sum()
    }

    /// The database the inbox lives in, for consumers that commit beside it (the pump takes its
    /// [`Store::write_gate`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The trees [`complete_in`] writes, for consumers that mark entries handled in the same
    /// sled transaction as they record their outcome (the wake queue).
    pub fn raw_trees(&self) -> (&sled::Tree, &sled::Tree) {
        (&self.entries, &self.progress)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Resolves when new events may have arrived since the last call.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Wakes the pump (e.g. at start-up, to handle what a previous run left).
    pub fn nudge(&self) {
        self.arrived.notify_one();
    }
}

/// Marks entries handled inside a sled transaction over [`Inbox::raw_trees`]: `ids` in the
/// order they were handled. The last event of a batch removes the batch (and its progress);
/// otherwise the batch's progress moves past the entry. Call [`Inbox::mark_handled`] once the
/// transaction committed.
pub fn complete_in(
    entries: &sled::transaction::TransactionalTree,
    progress: &sled::transaction::TransactionalTree,
    ids: &[EntryId],
) -> sled::transaction::ConflictableTransactionResult<(), ()> {
    for &id in ids {
        let (seq, place, last) = split_id(id);
        let key = seq.to_be_bytes();
        if last {
            entries.remove(&key)?;
            progress.remove(&key)?;
        } else {
            progress.insert(&key, &(place as u64 + 1).to_be_bytes())?;
        }
    }
    Ok(())
}

/// A batch as stored: `{"received_ms":…,"batch":[…]}` around events already encoded.
fn encode_batch<'a>(
    received_ms: u64,
    events: impl ExactSizeIterator<Item = &'a Vec<u8>>,
) -> Vec<u8> {
    let mut batch = Vec::with_capacity(64 + events.len() * 512);
    batch.extend_from_slice(b"{\"received_ms\":");
    batch.extend_from_slice(received_ms.to_string().as_bytes());
    batch.extend_from_slice(b",\"batch\":[");
    for (place, encoded) in events.enumerate() {
        if place > 0 {
            batch.push(b',');
        }
        batch.extend_from_slice(encoded);
    }
    batch.extend_from_slice(b"]}");
    batch
}

/// Identifies a transaction's content: the event ids in order, or the raw event when it carries
/// no id.
fn transaction_digest(
    events: &[Box<RawValue>],
    parsed: &[Result<RoomEvent, EventError>],
) -> String {
    let mut hasher = Sha256::new();
    for (raw, event) in events.iter().zip(parsed) {
        match event {
            Ok(event) => hasher.update(event.event_id.as_str().as_bytes()),
            // A rejected event is hashed as it was before events were typed: by its string id
            // when it has one, so a retry across an upgrade is still recognised.
            Err(_) => match serde_json::from_str::<EventHead<'_>>(raw.get())
                .ok()
                .and_then(|head| head.event_id)
            {
                Some(id) => hasher.update(id.as_bytes()),
                None => hasher.update(raw.get().as_bytes()),
            },
        }
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(values: &[serde_json::Value]) -> Vec<Box<RawValue>> {
        values
            .iter()
            .map(|value| RawValue::from_string(value.to_string()).unwrap())
            .collect()
    }

    /// The event ids waiting, in order.
    fn pending_ids(inbox: &Inbox) -> Vec<String> {
        inbox
            .pending(10)
            .unwrap()
            .into_iter()
            .map(|(_, entry)| entry.event_id().to_owned())
            .collect()
    }

    fn message(id: &str) -> serde_json::Value {
        json!({"type": "m.room.message", "event_id": id, "room_id": "!r:x", "sender": "@a:x",
               "content": {"msgtype": "m.text", "body": "hi"}})
    }

    #[test]
    fn duplicates_by_txn_and_event_are_dropped_and_reset_txn_ids_are_not() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let first = inbox
            .ingest("1", &raw(&[message("$a"), message("$b")]))
            .unwrap();
        assert_eq!(first.queued, 2);
        let again = inbox
            .ingest("1", &raw(&[message("$a"), message("$b")]))
            .unwrap();
        assert!(again.duplicate_transaction);
        // A homeserver reset reuses txn id 1 for new events.
        let reset = inbox
            .ingest("1", &raw(&[message("$c"), message("$a")]))
            .unwrap();
        assert!(!reset.duplicate_transaction);
        assert_eq!(reset.queued, 1);
        assert_eq!(reset.duplicate_events, 1);
        assert_eq!(pending_ids(&inbox), ["$a", "$b", "$c"]);
    }

    #[test]
    fn malformed_events_are_skipped_and_the_rest_kept() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let outcome = inbox
            .ingest(
                "t",
                &raw(&[
                    json!(42),
                    json!({"event_id": 7}),
                    json!({"event_id": "$x"}),
                    json!({"type": "m.room.message", "event_id": "$y", "room_id": "!r:x",
                           "sender": "not a user id", "content": {}}),
                    message("$ok"),
                    message("$ok"),
                ]),
            )
            .unwrap();
        assert_eq!(outcome.malformed, 4);
        assert_eq!(outcome.queued, 1);
        assert_eq!(
            outcome.duplicate_events, 1,
            "the same event twice in one transaction"
        );
    }

    /// An entry an older crew wrote (the homeserver's JSON kept whole) is read as the typed
    /// event; one that can never be handled is dropped with a warning, not left to block the
    /// entries behind it.
    #[test]
    fn entries_written_by_an_older_crew_are_still_read() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let old = json!({"event": {"type": "m.room.message", "event_id": "$old", "room_id": "!r:x",
            "sender": "@a:x", "origin_server_ts": 3, "unsigned": {"age": 5},
            "content": {"msgtype": "m.text", "body": "from before", "m.mentions": {"user_ids": ["@crew:x"]},
                        "info": {"w": 1}}}, "received_ms": 7});
        let broken =
            json!({"event": {"type": "m.room.message", "event_id": "$b"}, "received_ms": 8});
        inbox.ingest("t", &raw(&[message("$new")])).unwrap();
        let (old_seq, broken_seq): (u64, u64) = (1 << 40, (1 << 40) + 1);
        inbox
            .entries
            .insert(old_seq.to_be_bytes(), old.to_string().as_bytes())
            .unwrap();
        inbox
            .entries
            .insert(broken_seq.to_be_bytes(), broken.to_string().as_bytes())
            .unwrap();
        let pending = inbox.pending(10).unwrap();
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert_eq!(pending[0].1.event_id(), "$new");
        let (id, entry) = &pending[1];
        assert_eq!(*id, entry_id(old_seq, 0, true));
        assert_eq!(entry.received_ms, 7);
        assert_eq!(entry.event.body(), "from before");
        let mentions = &entry
            .event
            .message()
            .unwrap()
            .mentions
            .as_ref()
            .unwrap()
            .user_ids;
        assert_eq!(mentions, &["@crew:x"]);
        assert_eq!(inbox.len(), 2, "the unreadable entry is gone");
    }

    /// A transaction is one sled value; the pump handles it an event at a time, and where it
    /// stopped inside it survives a restart.
    #[test]
    fn a_transaction_is_one_batch_handled_an_event_at_a_time() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let outcome = inbox
            .ingest("t1", &raw(&[message("$a"), message("$b"), message("$c")]))
            .unwrap();
        assert_eq!(outcome.queued, 3);
        assert_eq!(inbox.entries.len(), 1, "one value for the transaction");
        assert_eq!(inbox.len(), 3);
        let first = inbox.pending(2).unwrap();
        let ids: Vec<_> = first.iter().map(|(_, entry)| entry.event_id()).collect();
        assert_eq!(ids, ["$a", "$b"]);
        assert!(
            first.iter().all(|(id, _)| !split_id(*id).2),
            "neither is the last"
        );
        inbox.complete(first[0].0).unwrap();
        drop(inbox);

        let inbox = Inbox::open(&store).unwrap();
        assert_eq!(inbox.len(), 2);
        let rest = inbox.pending(10).unwrap();
        let ids: Vec<_> = rest.iter().map(|(_, entry)| entry.event_id()).collect();
        assert_eq!(
            ids,
            ["$b", "$c"],
            "handled once, in order, after the restart"
        );
        assert!(split_id(rest[1].0).2, "$c is the batch's last");
        inbox.complete(rest[0].0).unwrap();
        assert!(!inbox.is_empty());
        inbox.complete(rest[1].0).unwrap();
        assert!(inbox.is_empty());
        assert!(inbox.progress.is_empty(), "no progress left behind");
        // Entry ids keep arrival order across batches.
        inbox.ingest("t2", &raw(&[message("$d")])).unwrap();
        inbox.ingest("t3", &raw(&[message("$e")])).unwrap();
        let later = inbox.pending(10).unwrap();
        assert!(later[0].0 < later[1].0);
    }

    #[test]
    fn entry_ids_carry_batch_place_and_last() {
        for (batch, place, last) in [(0, 0, true), (7, 99, false), ((1 << 46) + 3, 65_535, true)] {
            assert_eq!(split_id(entry_id(batch, place, last)), (batch, place, last));
        }
        assert!(entry_id(5, 65_535, true) < entry_id(6, 0, false));
    }

    #[test]
    fn one_transaction_writes_marks_entries_and_the_txn_record_together() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        inbox
            .ingest("t1", &raw(&[message("$a"), message("$b")]))
            .unwrap();
        // Every mark has its entry and the transaction is recorded: the three trees agree.
        let records: Vec<_> = inbox
            .seen_events()
            .tree()
            .iter()
            .map(|record| record.unwrap())
            .filter(|(key, _)| key.len() == 16)
            .collect();
        assert_eq!(records.len(), 1, "one record for the transaction");
        assert_eq!(records[0].1.len(), 16, "two fingerprints");
        assert_eq!(inbox.seen_len(), 2);
        assert_eq!(inbox.len(), 2);
        assert!(inbox.transactions.get(&"t1".to_owned()).unwrap().is_some());
    }

    /// The marks outlive the process: an event delivered again after a restart, in a
    /// transaction of another id, is still recognised.
    #[test]
    fn an_event_seen_before_a_restart_is_dropped_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let inbox = Inbox::open(&store).unwrap();
            inbox
                .ingest("t1", &raw(&[message("$a"), message("$b")]))
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let inbox = Inbox::open(&store).unwrap();
        assert_eq!(inbox.seen_len(), 2);
        let again = inbox
            .ingest("t2", &raw(&[message("$b"), message("$c")]))
            .unwrap();
        assert_eq!((again.queued, again.duplicate_events), (1, 1));
        assert_eq!(pending_ids(&inbox), ["$a", "$b", "$c"]);
    }

    /// `count` messages with ids `$<prefix>-<n>`.
    fn messages(prefix: &str, count: usize) -> Vec<Box<RawValue>> {
        raw(&(0..count)
            .map(|n| message(&format!("${prefix}-{n}")))
            .collect::<Vec<_>>())
    }

    /// Waits (deadline 10 s) until `condition` holds.
    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Over the limit, a transaction's answer waits for the pump, and the pump's progress
    /// releases it (long before its deadline); what it brought is then queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_over_the_backlog_waits_for_the_pump_to_catch_up() {
        let store = Store::temporary().unwrap();
        let inbox = std::sync::Arc::new(Inbox::open(&store).unwrap().with_backlog_limit(
            BacklogLimit {
                events: 150,
                wait: Duration::from_secs(600),
            },
        ));
        inbox
            .ingest_durably("t1", &messages("a", 100))
            .await
            .unwrap();
        inbox
            .ingest_durably("t2", &messages("b", 100))
            .await
            .unwrap();
        assert_eq!(inbox.waiting(), 200);
        assert_eq!(inbox.held_back(), 0, "under the limit nothing waited");
        let held = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.ingest_durably("t3", &messages("c", 100)).await }
        });
        until("the third transaction is held back", || {
            inbox.held_back() == 1
        })
        .await;
        // The pump handles 50: still at the limit, the transaction still waits.
        for (id, _) in inbox.pending(50).unwrap() {
            inbox.complete(id).unwrap();
        }
        assert_eq!(inbox.waiting(), 150);
        assert!(!held.is_finished(), "at the limit the answer waits");
        assert_eq!(
            inbox.len(),
            150,
            "and the third transaction is not queued yet"
        );
        let (id, _) = inbox.pending(1).unwrap()[0].clone();
        inbox.complete(id).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("released by the pump, not by its deadline")
            .unwrap()
            .unwrap();
        assert_eq!(outcome.queued, 100);
        assert_eq!((inbox.waiting(), inbox.len()), (249, 249));
    }

    /// A pump that does not catch up slows the homeserver down but never makes it give up:
    /// after the wait the transaction is taken, and nothing is lost.
    #[tokio::test]
    async fn a_stalled_pump_delays_the_answer_and_loses_nothing() {
        let store = Store::temporary().unwrap();
        let wait = Duration::from_millis(300);
        let inbox = Inbox::open(&store)
            .unwrap()
            .with_backlog_limit(BacklogLimit { events: 100, wait });
        inbox
            .ingest_durably("t1", &messages("a", 100))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let outcome = inbox
            .ingest_durably("t2", &messages("b", 100))
            .await
            .unwrap();
        assert!(started.elapsed() >= wait, "the answer waited for the pump");
        assert_eq!((outcome.queued, inbox.held_back()), (100, 1));
        assert_eq!(inbox.len(), 200);
    }

    /// The count of what waits survives a restart, and the pump finding the inbox empty sets
    /// it right whatever it said.
    #[test]
    fn the_backlog_is_counted_at_open_and_reset_when_the_inbox_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let inbox = Inbox::open(&store).unwrap();
            inbox.ingest("t1", &messages("a", 30)).unwrap();
            let (id, _) = inbox.pending(1).unwrap()[0].clone();
            inbox.complete(id).unwrap();
            assert_eq!(inbox.waiting(), 29);
        }
        let store = Store::open(dir.path()).unwrap();
        let inbox = Inbox::open(&store).unwrap();
        assert_eq!(inbox.waiting(), 29);
        // Handled behind the count's back (as the wake queue's commit does before it calls
        // `mark_handled`): the next read of an empty inbox corrects it.
        let ids: Vec<_> = inbox
            .pending(100)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let (entries, progress) = inbox.raw_trees();
        (entries, progress)
            .transaction(|(entries, progress)| complete_in(entries, progress, &ids))
            .unwrap();
        assert_eq!(inbox.waiting(), 29);
        assert!(inbox.pending(100).unwrap().is_empty());
        assert_eq!(inbox.waiting(), 0);
    }

    #[test]
    fn prune_forgets_old_marks_only() {
        let store = Store::temporary().unwrap();
        let inbox = Inbox::open(&store).unwrap();
        inbox.ingest("old", &raw(&[message("$old")])).unwrap();
        let cut = now_ms() + 1;
        while now_ms() <= cut {
            std::hint::spin_loop();
        }
        inbox.ingest("new", &raw(&[message("$new")])).unwrap();
        let pruned = inbox.prune(cut).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                events: 1,
                transactions: 1
            }
        );
        // The recent marks still recognise a retry; the forgotten one is new again.
        assert!(
            inbox
                .ingest("new", &raw(&[message("$new")]))
                .unwrap()
                .duplicate_transaction
        );
        assert_eq!(
            inbox
                .ingest("old2", &raw(&[message("$old")]))
                .unwrap()
                .queued,
            1
        );
    }
}
