//! Group commit: many writers, one fsync.
//!
//! A writer takes a ticket after its writes; a flush that *starts* after the ticket was taken
//! covers it. While one flush runs, later callers queue on the lock and the next flush covers all
//! of them, so under load the number of fsyncs is bounded by the disk, not by the request rate.

use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

pub struct Durability {
    db: sled::Db,
    /// Tickets handed out to writers that want their writes durable.
    issued: AtomicU64,
    /// Every ticket up to this one is durable.
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
}

impl Durability {
    pub(super) fn new(db: sled::Db) -> Self {
        Self {
            db,
            issued: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        loop {
            if self.flushed.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            let _guard = self.flush_lock.lock().await;
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
