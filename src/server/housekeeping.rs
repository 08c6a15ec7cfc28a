//! Keeps the database from growing with time: marks that only exist to recognise the
//! homeserver's retries are forgotten once no retry can come any more, and the event history
//! (who sent what, for replies) after [`EVENT_MEMORY`]. Rooms crew left are forgotten when it
//! leaves them (in the pump).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Service;

/// How long event ids and transaction ids are remembered. Homeservers retry a transaction for
/// hours at most (Synapse backs off to about a day before giving up); a week is far past that.
pub(crate) const RETRY_MEMORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long senders and mentions of events are remembered (for replies to agents' messages).
pub(crate) const EVENT_MEMORY: Duration = Duration::from_secs(90 * 24 * 3600);

/// How often the prune runs.
const PERIOD: Duration = Duration::from_secs(3600);

/// Prunes at start-up and then every [`PERIOD`] until `shutdown`.
pub(super) async fn run(crew: Arc<Service>, shutdown: CancellationToken) {
    loop {
        let before = crate::clock::now_ms().saturating_sub(RETRY_MEMORY.as_millis() as u64);
        match crew.inbox.prune(before) {
            Ok(pruned) if pruned.events + pruned.transactions > 0 => {
                tracing::info!(
                    events = pruned.events,
                    transactions = pruned.transactions,
                    "forgot old inbox marks"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot prune the inbox marks"),
        }
        let before = crate::clock::now_ms().saturating_sub(RETRY_MEMORY.as_millis() as u64);
        if let Err(error) = crew
            .outbox
            .prune_sent(before)
            .and_then(|_| crew.outbox.prune_failures(before))
        {
            tracing::error!(%error, "cannot prune the outbox records");
        }
        let before = crate::clock::now_ms().saturating_sub(EVENT_MEMORY.as_millis() as u64);
        match crew.dispatch.prune_history(before) {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "forgot old event history"),
            Err(error) => tracing::error!(%error, "cannot prune the event history"),
        }
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
