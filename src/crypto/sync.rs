//! The fallback for homeservers that do not put keys in appservice transactions (Tuwunel 1.4.6,
//! Synapse without MSC2409/MSC3202): one long-polling `/sync` per agent device, filtered down to
//! to-device events, device lists and one-time-key counts (no rooms, presence or account data).
//! Its position (`next_batch`) is kept in the device's own crypto store.

use std::sync::Arc;
use std::time::Duration;

use ruma::serde::Raw;
use serde_json::Value;

use super::{AgentDevice, Crypto, DeviceChanges};

/// Nothing but to-device events and the device fields.
const FILTER: &str = r#"{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}"#;
/// The long poll's wait.
const TIMEOUT_MS: u64 = 30_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(super) async fn run(crypto: Arc<Crypto>, device: Arc<AgentDevice>) {
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
            answer = crypto.transport.sync(device.identity(), FILTER, since.as_deref(), TIMEOUT_MS) => answer,
            () = crypto.shutdown.cancelled() => return,
        };
        match answer {
            Ok(answer) => {
                backoff = Duration::from_millis(500);
                let changes = changes_from_sync(&answer);
                if crypto.receive(&device, changes).await {
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

fn changes_from_sync(answer: &Value) -> DeviceChanges {
    let to_device = answer
        .pointer("/to_device/events")
        .and_then(Value::as_array)
        .map(|events| {
            events
                .iter()
                .filter_map(|event| serde_json::from_value::<Raw<_>>(event.clone()).ok())
                .collect()
        })
        .unwrap_or_default();
    DeviceChanges {
        to_device,
        device_lists: answer
            .get("device_lists")
            .and_then(|lists| serde_json::from_value(lists.clone()).ok())
            .unwrap_or_default(),
        otk_counts: answer
            .get("device_one_time_keys_count")
            .and_then(|counts| serde_json::from_value(counts.clone()).ok())
            .unwrap_or_default(),
        fallback: answer
            .get("device_unused_fallback_key_types")
            .and_then(|kinds| serde_json::from_value(kinds.clone()).ok()),
        next_batch: answer
            .get("next_batch")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}
