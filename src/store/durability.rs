//! Group commit: many writers, one fsync; and the gate that keeps sled's write lock away from
//! a running fsync.
//!
//! A writer takes a ticket after its writes; a flush that *starts* after the ticket was taken
//! covers it. While one flush runs, later callers queue on the gate and the next flush covers all
//! of them, so under load the number of fsyncs is bounded by the disk, not by the request rate.
//!
//! Why the gate: every sled transaction and batch takes the write side of one process-wide
//! lock, whose read side a flush holds for its whole fsync, and once any write side has been
//! taken every other sled call (a get, an insert) takes the read side. A transaction begun
//! during a flush therefore parks its thread until the disk answers, and with the lock being
//! writer-fair every sled call on every other thread parks behind it. Hot writers that commit
//! a transaction wait on the gate instead, asynchronously: a flush in progress then costs them
//! an `.await`, not a thread, and costs nobody else anything.

use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

pub struct Durability {
    db: sled::Db,
    /// Tickets handed out to writers that want their writes durable.
    issued: AtomicU64,
    /// Every ticket up to this one is durable.
    flushed: AtomicU64,
    /// Held by a flush for its fsync and by a hot transaction for its commit.
    gate: tokio::sync::Mutex<()>,
}

/// Keeps flushes out while a sled transaction or batch commits (see the module documentation).
pub struct WriteGate<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
}

impl Durability {
    pub(super) fn new(db: sled::Db) -> Self {
        Self {
            db,
            issued: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) async fn write_gate(&self) -> WriteGate<'_> {
        WriteGate {
            _held: self.gate.lock().await,
        }
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        loop {
            if self.flushed.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            let _guard = self.gate.lock().await;
            if self.flushed.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            // Everything issued so far was written before its ticket was taken, so this flush
            // covers all of them.
            let covers = self.issued.load(Ordering::SeqCst);
            self.db.flush_async().await?;
            self.flushed.fetch_max(covers, Ordering::SeqCst);
        }
    }
}
