//! The pump's schedule: how inbox entries are read, decided and committed, and when the pump
//! lets the rest of the runtime (above all the transaction handler) run.
//!
//! Deciding is the caller's: `server::pump` passes its `handle` (dispatcher, room state,
//! effects), `benches/ingest.rs` the dispatcher alone. Both run this same loop, so the ingest
//! bench measures ingest beside the schedule production uses.
//!
//! Why it is shaped so (`docs/benchmarks.md`, "Ingest beside the real pump schedule"):
//! - entries are committed [`CHUNK`] at a time in one sled transaction
//!   ([`WakeQueue::commit_batch`]), not one transaction each. Every sled transaction takes a
//!   process-wide lock whose read side every flush holds during its fsync, so a commit per event
//!   is a hand-off with the transaction handler per event;
//! - a chunk commits through the store's write gate (`Store::write_gate`), so it waits for a
//!   running flush asynchronously instead of parking a worker thread, and every other sled
//!   call behind it, on sled's lock;
//! - between chunks the pump yields to the runtime: a chunk is the longest the pump keeps a
//!   worker thread from the transaction handler.

use tokio_util::sync::CancellationToken;

use super::queue::{Handled, WakeQueue};
use crate::appservice::inbox::{Inbox, InboxEntry};
use crate::outbox::Outbox;

/// Entries read from the inbox per round.
pub const BATCH: usize = 100;

/// Entries decided and then committed in one sled transaction. Small enough that a chunk keeps
/// a worker thread for well under a millisecond, large enough that the commit's fixed cost
/// (the lock, the log reservation) is shared.
pub const CHUNK: usize = 25;

/// Where the pump reads and commits.
pub struct Pump<'a> {
    pub inbox: &'a Inbox,
    pub queue: &'a WakeQueue,
    pub outbox: &'a Outbox,
    /// Entries per sled transaction: [`CHUNK`] (other values are for benchmarks comparing
    /// schedules).
    pub chunk: usize,
}

impl<'a> Pump<'a> {
    /// The pump over these stores, on the production schedule.
    pub fn new(inbox: &'a Inbox, queue: &'a WakeQueue, outbox: &'a Outbox) -> Self {
        Self {
            inbox,
            queue,
            outbox,
            chunk: CHUNK,
        }
    }

    /// Runs until `shutdown`: reads entries in arrival order, `decide`s each (the wakes and
    /// effects it causes), commits them a chunk at a time, then hands what was committed to
    /// `committed` (to wake agents, tell the outbox). Entries whose commit failed stay in the
    /// inbox and are read and decided again after a pause.
    pub async fn run(
        &self,
        shutdown: &CancellationToken,
        mut decide: impl FnMut(u64, &InboxEntry) -> Handled,
        mut committed: impl FnMut(Vec<Handled>),
    ) {
        loop {
            let batch = match self.inbox.pending(BATCH) {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(%error, "cannot read the inbox; retrying");
                    if pause(shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = self.inbox.arrived() => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            for chunk in batch.chunks(self.chunk.max(1)) {
                if shutdown.is_cancelled() {
                    return;
                }
                let handled: Vec<Handled> = chunk
                    .iter()
                    .map(|(seq, entry)| decide(*seq, entry))
                    .collect();
                let result = {
                    let _gate = self.inbox.store().write_gate().await;
                    self.queue.commit_batch(self.inbox, self.outbox, &handled)
                };
                match result {
                    Ok(()) => committed(handled),
                    Err(error) => {
                        tracing::error!(
                            %error,
                            first = chunk[0].0,
                            entries = chunk.len(),
                            "cannot queue wakes; the events stay in the inbox"
                        );
                        if pause(shutdown).await {
                            return;
                        }
                        break;
                    }
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Waits a second before trying the store again; true if shut down meanwhile.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
        () = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::*;
    use crate::dispatch::WakeReason;
    use crate::dispatch::queue::PendingWake;
    use crate::store::Store;

    const AGENT: &str = "@crew:crew.test";

    fn transaction(first: usize, count: usize) -> Vec<Box<serde_json::value::RawValue>> {
        (first..first + count)
            .map(|n| {
                serde_json::value::to_raw_value(&json!({
                    "type": "m.room.message", "event_id": format!("$e{n}"), "room_id": "!r:crew.test",
                    "sender": "@a:crew.test", "content": {"msgtype": "m.text", "body": n.to_string()},
                }))
                .unwrap()
            })
            .collect()
    }

    /// Every entry is decided once, in arrival order, committed in chunks of at most
    /// [`CHUNK`] with its wakes, and the inbox ends empty; entries arriving while the pump runs
    /// are handled too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_entry_is_committed_once_in_order_a_chunk_per_transaction() {
        let store = Store::temporary().unwrap();
        let inbox = std::sync::Arc::new(Inbox::open(&store).unwrap());
        let queue = WakeQueue::open(&store).unwrap();
        let outbox = Outbox::open(&store).unwrap();
        inbox.ingest("t1", &transaction(0, 130)).unwrap();
        let shutdown = CancellationToken::new();
        let (chunks_tx, mut chunks) = tokio::sync::mpsc::unbounded_channel();
        let pump = {
            let (inbox, shutdown, store) = (inbox.clone(), shutdown.clone(), store.clone());
            tokio::spawn(async move {
                let queue = WakeQueue::open(&store).unwrap();
                let outbox = Outbox::open(&store).unwrap();
                Pump::new(&inbox, &queue, &outbox)
                    .run(
                        &shutdown,
                        |seq, entry| {
                            let n: usize = entry.event_id()[2..].parse().unwrap();
                            // Every other event wakes the agent.
                            let wakes = if n.is_multiple_of(2) {
                                vec![PendingWake {
                                    agent: ruma::UserId::parse(AGENT).unwrap(),
                                    room: ruma::RoomId::parse("!r:crew.test").unwrap(),
                                    event: entry.event.clone(),
                                    depth: 0,
                                    reasons: vec![WakeReason::Mentioned],
                                    queued_ms: 0,
                                }]
                            } else {
                                Vec::new()
                            };
                            Handled {
                                seq,
                                wakes,
                                effects: Vec::new(),
                            }
                        },
                        |handled| {
                            chunks_tx
                                .send(handled.iter().map(|item| item.seq).collect::<Vec<_>>())
                                .unwrap();
                        },
                    )
                    .await;
            })
        };
        inbox.ingest("t2", &transaction(130, 70)).unwrap();
        inbox.nudge();
        let mut seqs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seqs.len() < 200 {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, chunks.recv())
                .await
                .expect("the pump handles all 200 entries within 30 s")
                .unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK, "{chunk:?}");
            seqs.extend(chunk);
        }
        shutdown.cancel();
        pump.await.unwrap();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, seqs, "once each, in arrival order");
        assert!(inbox.is_empty());
        let agent = ruma::UserId::parse(AGENT).unwrap();
        assert_eq!(queue.pending_for(&agent).unwrap().len(), 100);
        assert!(outbox.pending().unwrap().is_empty());
    }
}
