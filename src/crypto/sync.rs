//! The fallback for homeservers that do not put keys in appservice transactions (Tuwunel 1.4.6,
//! Synapse without MSC2409/MSC3202): one long-polling `/sync` per agent device, filtered down to
//! to-device events, device lists and one-time-key counts (no rooms, presence or account data).
//! Its position (`next_batch`) is kept in the device's own crypto store.

use std::sync::Arc;
use std::time::Duration;

use ruma::api::client::filter::FilterDefinition;
use ruma::api::client::sync::sync_events::v3::Response;

use super::{AgentDevice, Crypto, DeviceChanges};

/// The long poll's wait.
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(super) async fn run(crypto: Arc<Crypto>, device: Arc<AgentDevice>) {
    // Nothing but to-device events and the device fields: no rooms, presence or account
    // data (to-device events, device lists and key counts are not filtered by any of these).
    let filter = FilterDefinition::ignore_all();
    let mut backoff = Duration::from_millis(500);
    loop {
        let since = device
            .machine()
            .store()
            .next_batch_token()
            .await
            .ok()
            .flatten();
        // The first sync (no position yet) answers at once: it catches up without waiting.
        let answer = tokio::select! {
            answer = crypto.client.sync_as_device(device.identity(), &filter, since.as_deref(), TIMEOUT) => answer,
            () = crypto.shutdown.cancelled() => return,
        };
        match answer {
            Ok(answer) => {
                backoff = Duration::from_millis(500);
                if crypto.receive(&device, changes_from_sync(answer)).await {
                    crypto.retry_waiting().await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, agent = %device.user_id(), ?backoff, "the encryption sync failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = crypto.shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn changes_from_sync(answer: Response) -> DeviceChanges {
    DeviceChanges {
        to_device: answer.to_device.events,
        device_lists: answer.device_lists,
        otk_counts: answer.device_one_time_keys_count,
        fallback: answer.device_unused_fallback_key_types,
        next_batch: Some(answer.next_batch),
    }
}
