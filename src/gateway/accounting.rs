//! Usage charges and audit records, kept in memory and written to sled in batches.
//!
//! The gateway is on every LLM and API call, so it must not pay a database write (and its page
//! rewrites and contention) per request: charges add to in-memory deltas and audit records go to a
//! buffer, and [`Accounting::write_pending`] moves both into sled in one batch. The gateway's
//! background task calls it every `gateway.accounting_flush_ms` and then makes the database
//! durable, so after a crash at most that interval of accounting is lost. Budget checks read the
//! stored usage plus the pending deltas, so they are exact whatever the interval.
//!
//! Refusals of requests without a valid token are only counted here, in memory: anyone who can
//! reach the gateway can send those, and they must not be able to fill the database.
//!
//! Not for: rate and concurrency limits (see [`super::limits`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{AuditRecord, MS_PER_DAY, Usage, usage_key};
use crate::store::{Store, StoreError, Tree};

/// Old audit records are pruned once per this many batches, so pruning costs nothing per request.
const PRUNE_EVERY_BATCHES: u64 = 64;

/// Most audit records stored in one sled value: a second of heavy traffic (tens of thousands of
/// records) becomes a hundred-odd values of ~40 KiB rather than one large one. Pending records
/// are kept in chunks of this size too, each a medium-sized allocation the allocator reuses
/// (one vector grown to megabytes every second cost page faults on the gateway thread).
const AUDIT_RECORDS_PER_VALUE: usize = 256;

/// What one value of the audit tree holds: a batch of records, or (written before batching) one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum StoredAudit {
    Batch(Vec<AuditRecord>),
    One(AuditRecord),
}

impl StoredAudit {
    fn into_records(self) -> Vec<AuditRecord> {
        match self {
            StoredAudit::Batch(records) => records,
            StoredAudit::One(record) => vec![record],
        }
    }
}

pub(super) struct Accounting {
    store: Store,
    usage: Tree<String, Usage>,
    audit: Tree<u64, StoredAudit>,
    pending: Mutex<Pending>,
    /// Each consumer's usage on the day it last used the gateway (stored plus pending), so budget
    /// checks read no database.
    totals: Mutex<HashMap<String, (u64, Usage)>>,
    /// Serialises batches, so two writers never interleave their read-modify-writes.
    writing: Mutex<()>,
    /// Tokens charged across all consumers on `global_day`.
    global: Mutex<GlobalToday>,
    unauthenticated: AtomicU64,
    batches: AtomicU64,
    /// Days audit records are kept.
    retention_days: u64,
}

#[derive(Default)]
struct Pending {
    usage: HashMap<String, Usage>,
    /// Audit records in chunks of at most [`AUDIT_RECORDS_PER_VALUE`], each stored as one value:
    /// one vector reallocated to megabytes every second showed as page faults (fresh pages
    /// zeroed by the kernel) in the gateway thread's profile (docs/benchmarks.md).
    audit: Vec<Vec<AuditRecord>>,
}

struct GlobalToday {
    day: u64,
    total_tokens: u64,
}

impl Accounting {
    pub(super) fn new(
        store: Store,
        usage: Tree<String, Usage>,
        audit: Tree<u64, StoredAudit>,
        retention_days: u64,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let day = now_ms / MS_PER_DAY;
        let total_tokens = stored_total_on(&usage, day)?;
        Ok(Self {
            store,
            usage,
            audit,
            pending: Mutex::new(Pending::default()),
            totals: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
            global: Mutex::new(GlobalToday { day, total_tokens }),
            unauthenticated: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            retention_days,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .expect("accounting lock is never poisoned")
    }

    /// A consumer's usage on `day`: what is stored plus what is pending.
    pub(super) fn usage_on(&self, consumer: &str, day: u64) -> Result<Usage, StoreError> {
        let mut totals = self.totals.lock().expect("totals lock is never poisoned");
        if let Some((cached_day, usage)) = totals.get(consumer)
            && *cached_day == day
        {
            return Ok(usage.clone());
        }
        // Not while a batch moves pending charges into the store (they would be missed or
        // counted twice).
        let _writing = self.writing.lock().expect("writing lock is never poisoned");
        let key = usage_key(consumer, day);
        let mut usage = self.usage.get(&key)?.unwrap_or_default();
        if let Some(delta) = self.pending().usage.get(&key) {
            add(&mut usage, delta);
        }
        totals.insert(consumer.to_owned(), (day, usage.clone()));
        Ok(usage)
    }

    /// Tokens used by all consumers together on `day` (0 for any day but today).
    pub(super) fn global_on(&self, day: u64) -> Result<u64, StoreError> {
        let mut global = self.global.lock().expect("global lock is never poisoned");
        if global.day < day {
            // A new day: today's rows may already exist (written before a restart).
            self.write_pending()?;
            *global = GlobalToday {
                day,
                total_tokens: stored_total_on(&self.usage, day)?,
            };
        }
        Ok(if global.day == day {
            global.total_tokens
        } else {
            0
        })
    }

    /// Adds one request and its tokens to `consumer`'s usage on `day`.
    pub(super) fn charge(&self, consumer: &str, day: u64, usage: &Usage) {
        {
            // Under the totals lock, so a concurrent first read cannot miss this charge.
            let mut totals = self.totals.lock().expect("totals lock is never poisoned");
            if let Some((cached_day, total)) = totals.get_mut(consumer) {
                if *cached_day == day {
                    add(total, usage);
                } else {
                    totals.remove(consumer);
                }
            }
            add(
                self.pending()
                    .usage
                    .entry(usage_key(consumer, day))
                    .or_default(),
                usage,
            );
        }
        let mut global = self.global.lock().expect("global lock is never poisoned");
        if global.day == day {
            global.total_tokens += usage.total_tokens;
        } else if global.day < day {
            // The first charge of a new day; `global_on` reloads from the store when it sees it.
            global.day = day;
            global.total_tokens = usage.total_tokens;
        }
    }

    pub(super) fn audit(&self, record: AuditRecord) {
        let mut pending = self.pending();
        match pending.audit.last_mut() {
            Some(chunk) if chunk.len() < AUDIT_RECORDS_PER_VALUE => chunk.push(record),
            _ => {
                let mut chunk = Vec::with_capacity(AUDIT_RECORDS_PER_VALUE);
                chunk.push(record);
                pending.audit.push(chunk);
            }
        }
    }

    /// Counts a refusal of a request that had no valid token.
    pub(super) fn count_unauthenticated(&self) {
        self.unauthenticated.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn unauthenticated(&self) -> u64 {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    /// Moves pending charges and audit records into sled (not yet flushed to disk); says
    /// whether there was anything to write.
    pub(super) fn write_pending(&self) -> Result<bool, StoreError> {
        let _writing = self.writing.lock().expect("writing lock is never poisoned");
        let Pending { usage, audit } = std::mem::take(&mut *self.pending());
        if usage.is_empty() && audit.is_empty() {
            return Ok(false);
        }
        let mut failed = None;
        for (key, delta) in usage {
            let result = self.usage.update(&key, |current| {
                let mut current = current.unwrap_or_default();
                add(&mut current, &delta);
                Some(current)
            });
            if let Err(error) = result {
                // Keep the charge for the next batch rather than lose it.
                add(self.pending().usage.entry(key).or_default(), &delta);
                failed = Some(error);
            }
        }
        let newest = audit.iter().flatten().map(|record| record.at_ms).max();
        // A few sled values per batch rather than one per record: each insert rewrites a leaf
        // node, and thousands of them a second showed in the profile (docs/benchmarks.md).
        for chunk in audit {
            let chunk = StoredAudit::Batch(chunk);
            let stored = self
                .store
                .next_id()
                .and_then(|id| self.audit.insert(&id, &chunk));
            if let Err(error) = stored {
                tracing::warn!(%error, "cannot store gateway audit records");
            }
        }
        if let Some(newest) = newest
            && self
                .batches
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(PRUNE_EVERY_BATCHES)
        {
            self.prune_audit(newest)?;
        }
        failed.map_or(Ok(true), Err)
    }

    /// Writes pending accounting and waits until it is on disk (an idle gateway costs no disk
    /// sync).
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        if self.write_pending()? {
            self.store.flush().await?;
        }
        Ok(())
    }

    /// Removes audit records older than the retention period. Keys are ids in the order the
    /// batches were written, so the oldest records come first; the first batch with records to
    /// keep is rewritten without its old ones, and nothing after it is read.
    pub(super) fn prune_audit(&self, now_ms: u64) -> Result<(), StoreError> {
        let cutoff = now_ms.saturating_sub(self.retention_days * MS_PER_DAY);
        for entry in self.audit.iter() {
            let (id, stored) = entry?;
            let mut records = stored.into_records();
            let before = records.len();
            records.retain(|record| record.at_ms >= cutoff);
            if records.is_empty() {
                self.audit.remove(&id)?;
                continue;
            }
            if records.len() < before {
                self.audit.insert(&id, &StoredAudit::Batch(records))?;
            }
            break;
        }
        Ok(())
    }

    /// The most recent `limit` audit records, newest last.
    pub(super) fn recent_audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.audit.raw().iter().rev() {
            if records.len() >= limit {
                break;
            }
            let (_, raw) = entry?;
            let batch = self.audit.decode(&raw)?.into_records();
            let wanted = limit - records.len();
            records.extend(batch.into_iter().rev().take(wanted));
        }
        records.reverse();
        Ok(records)
    }
}

fn add(total: &mut Usage, delta: &Usage) {
    total.requests += delta.requests;
    total.prompt_tokens += delta.prompt_tokens;
    total.completion_tokens += delta.completion_tokens;
    total.total_tokens += delta.total_tokens;
}

/// Sum of every consumer's tokens on `day`, as stored.
fn stored_total_on(usage: &Tree<String, Usage>, day: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    for entry in usage.iter() {
        let (key, row) = entry?;
        if super::split_usage_key(&key).is_some_and(|(_, row_day)| row_day == day) {
            total += row.total_tokens;
        }
    }
    Ok(total)
}
