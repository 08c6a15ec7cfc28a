//! The event ids the inbox has queued, so that an event the homeserver delivers again (in a
//! retried or a new transaction) is dropped: the inbox's real deduplication guarantee.
//!
//! Kept as **fingerprints**, not as one sled key per event id. A key per event was one
//! random-key sled insert per event on ingest's path: once a transaction's events had become
//! one sled value, its 100 marks were nearly all of ingest's sled work, and at a sustained
//! 20,000 events/s they put 1.2 M keys a minute into sled's page table (docs/benchmarks.md,
//! "Seen marks as fingerprints"). Now:
//! - an event id is reduced to a 64-bit SipHash-1-3 of it, under a key drawn at random for each
//!   database and stored in it, so that whoever chooses event ids cannot aim a collision at
//!   another event. Two different ids share a fingerprint with probability n / 2^64 for a new
//!   event among n held (about 10^-13 at a million): the cost of an error is one dropped event;
//! - the fingerprints of one transaction are **one** sled value (tree `inbox_seen`, keyed by
//!   arrival time and batch), written in ingest's sled transaction beside its events;
//! - the set of them lives in memory, loaded when the inbox opens, as sorted shards
//!   ([`FingerprintSet`]): 8.5 bytes an event (about 8 MiB per million events held;
//!   [`super::inbox::Inbox::prune`] forgets them by age).
//!
//! Marks an older crew kept per event id (tree `inbox_seen_events`) are folded into this form
//! when the inbox opens.

use serde::Deserialize;
use siphasher::sip::SipHasher13;
use sled::Transactional;

use crate::store::{Store, StoreError};

/// The tree of fingerprint records; key [`record_key`], value 8 bytes (little-endian) per
/// fingerprint.
const TREE: &str = "inbox_seen";

/// Where the database's SipHash key is kept in [`TREE`]; not 16 bytes long, so never a record.
const HASH_KEY: &[u8] = b"siphash-1-3 key";

/// The per-event marks of crews before fingerprints: event id → `{"received_ms"}`.
const LEGACY_TREE: &str = "inbox_seen_events";

/// Legacy marks folded into one record per sled transaction when the inbox opens.
const LEGACY_CHUNK: usize = 4096;

/// A record's key: arrival time first (pruning by age is a range from the start), then the batch
/// that makes it unique.
pub(super) fn record_key(received_ms: u64, batch: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&received_ms.to_be_bytes());
    key[8..].copy_from_slice(&batch.to_be_bytes());
    key
}

/// A record's value: the fingerprints, 8 bytes each.
pub(super) fn record_value(fingerprints: &[u64]) -> Vec<u8> {
    fingerprints
        .iter()
        .flat_map(|fp| fp.to_le_bytes())
        .collect()
}

fn fingerprints_of(value: &[u8]) -> impl Iterator<Item = u64> + '_ {
    value
        .chunks_exact(8)
        .map(|raw| u64::from_le_bytes(raw.try_into().expect("chunks of 8")))
}

/// Top bits of a fingerprint that choose its shard in a [`FingerprintSet`].
const SHARD_BITS: u32 = 12;

/// A set of fingerprints as 4,096 sorted vectors, chosen by a fingerprint's top bits.
///
/// Why not a `HashSet<u64>`: a hash set takes 9 bytes a bucket at a load between 7/16 and 7/8
/// (about 14 bytes a fingerprint), and as it grows it doubles its table with the old one still
/// live, a spike of half as much again (heaptrack saw 4.7 MiB plus 2.4 at a resize after
/// 261,000 events; docs/benchmarks.md, "A bounded backlog"). Here a fingerprint costs 8
/// bytes and a shard grows by an eighth at a time. Fingerprints are uniform (a keyed hash), so
/// the shards fill evenly: an insert moves part of one shard (about 2 KiB at a million held), a
/// lookup is a binary search in it.
#[derive(Debug)]
pub(super) struct FingerprintSet {
    shards: Vec<Vec<u64>>,
    len: usize,
}

impl Default for FingerprintSet {
    fn default() -> Self {
        Self {
            shards: vec![Vec::new(); 1 << SHARD_BITS],
            len: 0,
        }
    }
}

impl FingerprintSet {
    fn shard_of(fingerprint: u64) -> usize {
        (fingerprint >> (u64::BITS - SHARD_BITS)) as usize
    }

    /// Adds `fingerprints` without keeping the shards sorted: loading many, call
    /// [`FingerprintSet::settle`] before anything else.
    fn push_unsorted(&mut self, fingerprints: impl IntoIterator<Item = u64>) {
        for fingerprint in fingerprints {
            self.shards[Self::shard_of(fingerprint)].push(fingerprint);
        }
    }

    /// Sorts each shard once (rather than inserting one by one), drops repeats, counts.
    fn settle(&mut self) {
        self.len = 0;
        for shard in &mut self.shards {
            shard.sort_unstable();
            shard.dedup();
            shard.shrink_to_fit();
            self.len += shard.len();
        }
    }

    fn contains(&self, fingerprint: u64) -> bool {
        self.shards[Self::shard_of(fingerprint)]
            .binary_search(&fingerprint)
            .is_ok()
    }

    /// Adds `fingerprint`; false when it was there already.
    fn insert(&mut self, fingerprint: u64) -> bool {
        let shard = &mut self.shards[Self::shard_of(fingerprint)];
        let Err(at) = shard.binary_search(&fingerprint) else {
            return false;
        };
        if shard.len() == shard.capacity() {
            shard.reserve_exact(shard.len() / 8 + 4);
        }
        shard.insert(at, fingerprint);
        self.len += 1;
        true
    }

    /// Removes `fingerprint`; false when it was not there.
    fn remove(&mut self, fingerprint: u64) -> bool {
        let shard = &mut self.shards[Self::shard_of(fingerprint)];
        let Ok(at) = shard.binary_search(&fingerprint) else {
            return false;
        };
        shard.remove(at);
        if shard.capacity() > 2 * shard.len() + 16 {
            shard.shrink_to(shard.len() + shard.len() / 8);
        }
        self.len -= 1;
        true
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[derive(Deserialize)]
struct LegacyMark {
    received_ms: u64,
}

/// The fingerprints of every event id queued within the retention. Not synchronised: the inbox
/// holds it under its ingest lock, which also makes check-then-record safe.
pub(super) struct SeenEvents {
    tree: sled::Tree,
    hasher: SipHasher13,
    fingerprints: FingerprintSet,
}

impl SeenEvents {
    /// Opens the records (drawing the hash key on first use), folds in an older crew's marks and
    /// loads every fingerprint.
    pub(super) fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.db().open_tree(TREE)?;
        let drawn: [u8; 16] = rand::random();
        // Kept if another opener drew first; never replaced, or every mark would change meaning.
        let hash_key = match tree.compare_and_swap(HASH_KEY, None::<&[u8]>, Some(&drawn[..]))? {
            Ok(()) => drawn,
            Err(existing) => existing
                .current
                .as_deref()
                .and_then(|raw| <[u8; 16]>::try_from(raw).ok())
                .ok_or_else(|| {
                    StoreError::Sled(sled::Error::Unsupported(format!(
                        "the `{TREE}` tree's hash key is not 16 bytes"
                    )))
                })?,
        };
        let mut seen = Self {
            tree,
            hasher: SipHasher13::new_with_key(&hash_key),
            fingerprints: FingerprintSet::default(),
        };
        seen.fold_legacy_marks(store)?;
        for record in seen.tree.iter() {
            let (key, value) = record?;
            if key.len() == 16 {
                seen.fingerprints.push_unsorted(fingerprints_of(&value));
            }
        }
        seen.fingerprints.settle();
        Ok(seen)
    }

    /// The fingerprint of an event id under this database's key.
    pub(super) fn fingerprint(&self, event_id: &str) -> u64 {
        self.hasher.hash(event_id.as_bytes())
    }

    pub(super) fn contains(&self, fingerprint: u64) -> bool {
        self.fingerprints.contains(fingerprint)
    }

    /// Takes in fingerprints whose record the caller's sled transaction has committed.
    pub(super) fn extend(&mut self, fingerprints: impl IntoIterator<Item = u64>) {
        for fingerprint in fingerprints {
            self.fingerprints.insert(fingerprint);
        }
    }

    /// The records' tree, for the ingest transaction that writes a record with its events.
    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// How many fingerprints are held.
    pub(super) fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Forgets the records of events that arrived before `before_ms`; returns how many
    /// fingerprints went.
    pub(super) fn prune(&mut self, before_ms: u64) -> Result<usize, StoreError> {
        let mut forgotten = 0;
        for record in self.tree.range(..record_key(before_ms, 0)) {
            let (key, value) = record?;
            if key.len() != 16 {
                continue;
            }
            for fingerprint in fingerprints_of(&value) {
                forgotten += usize::from(self.fingerprints.remove(fingerprint));
            }
            self.tree.remove(key)?;
        }
        Ok(forgotten)
    }

    /// Moves the marks of `inbox_seen_events` into records, a chunk per sled transaction (each
    /// chunk's record written and its marks removed together, so a crash in between repeats
    /// nothing and loses nothing), then drops the old tree.
    fn fold_legacy_marks(&self, store: &Store) -> Result<(), StoreError> {
        if !store
            .db()
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == LEGACY_TREE.as_bytes())
        {
            return Ok(());
        }
        let legacy = store.db().open_tree(LEGACY_TREE)?;
        let mut folded = 0usize;
        loop {
            let mut keys = Vec::with_capacity(LEGACY_CHUNK);
            let mut fingerprints = Vec::with_capacity(LEGACY_CHUNK);
            // The newest arrival of the chunk dates its record: pruned no earlier than any mark.
            let mut received_ms = 0;
            for mark in legacy.iter().take(LEGACY_CHUNK) {
                let (event_id, value) = mark?;
                if let Ok(mark) = serde_json::from_slice::<LegacyMark>(&value) {
                    received_ms = received_ms.max(mark.received_ms);
                }
                fingerprints.push(self.fingerprint(&String::from_utf8_lossy(&event_id)));
                keys.push(event_id);
            }
            if keys.is_empty() {
                break;
            }
            let key = record_key(received_ms, store.next_id()?);
            let value = record_value(&fingerprints);
            (&self.tree, &legacy)
                .transaction(|(records, legacy)| {
                    records.insert(&key, value.as_slice())?;
                    for event_id in &keys {
                        legacy.remove(event_id)?;
                    }
                    Ok(())
                })
                .map_err(|error| StoreError::from_transaction("folding seen marks", error))?;
            folded += keys.len();
        }
        store.db().drop_tree(LEGACY_TREE)?;
        if folded > 0 {
            tracing::info!(
                folded,
                "folded per-event seen marks into fingerprint records"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shards behave as one set: present after insert, absent after remove, counted once,
    /// in order within each shard, whether built at once or one at a time.
    #[test]
    fn a_fingerprint_set_is_a_set() {
        let values: Vec<u64> = (0..20_000u64)
            .map(|n| n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut one_by_one = FingerprintSet::default();
        for &value in &values {
            assert!(one_by_one.insert(value));
        }
        assert!(
            !one_by_one.insert(values[7]),
            "a second insert adds nothing"
        );
        let mut doubled = values.clone();
        doubled.extend_from_slice(&values[..100]);
        let mut at_once = FingerprintSet::default();
        at_once.push_unsorted(doubled);
        at_once.settle();
        for set in [&one_by_one, &at_once] {
            assert_eq!(set.len(), values.len());
            assert!(values.iter().all(|&value| set.contains(value)));
            assert!(!set.contains(1), "never inserted");
            assert!(set.shards.iter().all(|shard| shard.is_sorted()));
        }
        let mut set = at_once;
        for &value in &values[..15_000] {
            assert!(set.remove(value));
        }
        assert!(!set.remove(values[0]), "already gone");
        assert_eq!(set.len(), 5_000);
        assert!(values[15_000..].iter().all(|&value| set.contains(value)));
        assert!(!values[..15_000].iter().any(|&value| set.contains(value)));
    }

    #[test]
    fn fingerprints_are_stable_per_database_and_differ_between_databases() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(dir.path()).unwrap();
            SeenEvents::open(&store).unwrap().fingerprint("$event")
        };
        let store = Store::open(dir.path()).unwrap();
        let reopened = SeenEvents::open(&store).unwrap();
        assert_eq!(reopened.fingerprint("$event"), first, "the key is kept");
        assert_ne!(reopened.fingerprint("$other"), first);
        let elsewhere = SeenEvents::open(&Store::temporary().unwrap()).unwrap();
        assert_ne!(
            elsewhere.fingerprint("$event"),
            first,
            "another database draws another key"
        );
    }

    #[test]
    fn records_load_at_open_and_prune_by_age() {
        let store = Store::temporary().unwrap();
        let seen = SeenEvents::open(&store).unwrap();
        let (old, new) = (seen.fingerprint("$old"), seen.fingerprint("$new"));
        seen.tree()
            .insert(record_key(10, 1), record_value(&[old]))
            .unwrap();
        seen.tree()
            .insert(record_key(20, 2), record_value(&[new]))
            .unwrap();
        let mut seen = SeenEvents::open(&store).unwrap();
        assert!(seen.contains(old) && seen.contains(new));
        assert_eq!(seen.prune(20).unwrap(), 1);
        assert!(!seen.contains(old) && seen.contains(new));
        let seen = SeenEvents::open(&store).unwrap();
        assert_eq!(seen.len(), 1, "the pruned record is gone from disk too");
    }

    #[test]
    fn an_older_crews_marks_are_folded_in_and_their_tree_dropped() {
        let store = Store::temporary().unwrap();
        let legacy = store.db().open_tree(LEGACY_TREE).unwrap();
        for n in 0..(LEGACY_CHUNK + 3) {
            legacy
                .insert(format!("$legacy{n}"), br#"{"received_ms":5}"#.as_slice())
                .unwrap();
        }
        let mut seen = SeenEvents::open(&store).unwrap();
        assert_eq!(seen.len(), LEGACY_CHUNK + 3);
        assert!(seen.contains(seen.fingerprint("$legacy0")));
        assert!(seen.contains(seen.fingerprint(&format!("$legacy{}", LEGACY_CHUNK + 2))));
        assert!(
            !store
                .db()
                .tree_names()
                .iter()
                .any(|name| name.as_ref() == LEGACY_TREE.as_bytes())
        );
        assert_eq!(
            seen.prune(6).unwrap(),
            LEGACY_CHUNK + 3,
            "dated by their arrival"
        );
    }
}
