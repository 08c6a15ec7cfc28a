//! End-to-end encryption for the agents: each agent's own device and Olm/Megolm keys, the
//! decryption of what arrives and the encryption of what agents send in encrypted rooms.
//!
//! The cryptography is `matrix-sdk-crypto`'s [`OlmMachine`] (the state machine of Element X and
//! the Rust SDK), one per agent, each with its own sqlite store under
//! `<data_dir>/crypto/<localpart>/`. This module only carries its requests to the homeserver
//! (through `crate::matrix::MatrixClient`, asserting the device) and feeds it what the
//! homeserver delivers:
//! - with encrypted-appservice support (Synapse: MSC2409 to-device events, MSC3202 device lists
//!   and one-time-key counts in transactions) from [`Crypto::on_transaction`];
//! - without it (Tuwunel 1.4.6), from one filtered `/sync` per agent device that carries only
//!   to-device events, device lists and key counts ([`sync`]).
//!
//! Decrypted events replace their `m.room.encrypted` originals *before* the inbox, so they go
//! through exactly the path clear events take (inbox deduplication by event id, dispatcher,
//! loop guards, turns). An event that cannot be decrypted yet waits in the `crypto_waiting`
//! tree and is ingested once its keys arrive; past `encryption.undecryptable_after_secs` an agent
//! says once that it could not read it.
//!
//! Not for: deciding who wakes (`crate::dispatch`) or what is sent (`crate::outbox`); sends are
//! encrypted on their way out by [`RoomEncryptor`], hooked into `crate::matrix::MatrixClient`.

pub mod attachments;
mod device;
mod sync;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk_crypto::{DecryptionSettings, TrustRequirement};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::appservice::inbox::Inbox;
use crate::clock::now_ms;
use crate::matrix::{MatrixClient, MatrixError};
use crate::store::{Store, StoreError, Tree};

pub use device::{AgentDevice, CrossSigning};

/// The `[encryption]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Whether agents get devices and read and answer encrypted rooms. Off: an agent in an
    /// encrypted room says it cannot read it and offers an unencrypted room.
    pub enabled: bool,
    /// How to-device events (room keys), device lists and one-time-key counts reach crew.
    pub key_delivery: KeyDelivery,
    /// How long an event whose keys have not arrived waits before its agent says it could not
    /// read it.
    pub undecryptable_after_secs: u64,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            key_delivery: KeyDelivery::Transactions,
            // Keys normally arrive in the same transaction or within a second; a client that
            // was offline when it sent may take longer. A minute keeps the person waiting little.
            undecryptable_after_secs: 60,
        }
    }
}

/// Where keys and device lists come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyDelivery {
    /// In the appservice transactions (MSC2409 + MSC3202; Synapse with its experimental
    /// features on and the registration's flags).
    Transactions,
    /// One filtered `/sync` per agent device (Tuwunel, or Synapse without those features).
    Sync,
}

/// What went wrong in the encryption layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the homeserver: {0}")]
    Matrix(#[from] MatrixError),
    #[error("the encryption store {path}: {message}")]
    CryptoStore { path: String, message: String },
    #[error("encryption: {0}")]
    Olm(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The store does not belong to the device the homeserver knows: refusing to start.
    #[error(
        "the encryption store of {agent} ({path}) does not match its device {device} on the homeserver: {why}. \
         If the homeserver's database was reset or the device deleted, stop crew, move {path} aside and start crew again: \
         the agent gets a new device (people see a new device for it) and messages encrypted for the old one stay unreadable to it"
    )]
    Mismatch {
        agent: OwnedUserId,
        path: String,
        device: OwnedDeviceId,
        why: String,
    },
}

/// An event whose keys had not arrived, kept until they do or its time runs out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitingEvent {
    /// The `m.room.encrypted` event as received.
    pub event: Value,
    pub room: OwnedRoomId,
    pub first_seen_ms: u64,
}

/// The extra fields of a transaction that carry keys (MSC2409, MSC3202), unstable names first.
#[derive(Debug, Default, Deserialize)]
pub struct TransactionKeys {
    #[serde(default, rename = "de.sorunome.msc2409.to_device")]
    to_device_unstable: Vec<Value>,
    #[serde(default, rename = "to_device")]
    to_device: Vec<Value>,
    #[serde(default, rename = "org.matrix.msc3202.device_lists")]
    device_lists_unstable: Option<DeviceLists>,
    #[serde(default, rename = "device_lists")]
    device_lists: Option<DeviceLists>,
    #[serde(default, rename = "org.matrix.msc3202.device_one_time_keys_count")]
    otk_counts_unstable:
        BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OneTimeKeyAlgorithm, UInt>>>,
    #[serde(default, rename = "device_one_time_keys_count")]
    otk_counts: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OneTimeKeyAlgorithm, UInt>>>,
    #[serde(
        default,
        rename = "org.matrix.msc3202.device_unused_fallback_key_types"
    )]
    fallback_unstable: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Vec<OneTimeKeyAlgorithm>>>,
    #[serde(default, rename = "device_unused_fallback_key_types")]
    fallback: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Vec<OneTimeKeyAlgorithm>>>,
}

impl TransactionKeys {
    fn is_empty(&self) -> bool {
        self.to_device_unstable.is_empty()
            && self.to_device.is_empty()
            && self.device_lists_unstable.is_none()
            && self.device_lists.is_none()
            && self.otk_counts_unstable.is_empty()
            && self.otk_counts.is_empty()
            && self.fallback_unstable.is_empty()
            && self.fallback.is_empty()
    }
}

/// What one device gets from a transaction or a sync.
#[derive(Default)]
pub(crate) struct DeviceChanges {
    pub to_device: Vec<Raw<ruma::events::AnyToDeviceEvent>>,
    pub device_lists: DeviceLists,
    pub otk_counts: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    pub fallback: Option<Vec<OneTimeKeyAlgorithm>>,
    pub next_batch: Option<String>,
}

/// The agents' devices and what they have learnt. Shared behind an `Arc`.
pub struct Crypto {
    config: EncryptionConfig,
    dir: PathBuf,
    /// Every homeserver call, the devices' own included (`MatrixClient::call_as_device`).
    client: MatrixClient,
    inbox: Arc<Inbox>,
    manager: OwnedUserId,
    /// The agents' user ids (the registration's users), compiled once.
    our_users: crate::registration::OurUsers,
    /// Devices by agent; the async mutex makes creation happen once.
    devices: tokio::sync::Mutex<HashMap<OwnedUserId, Arc<AgentDevice>>>,
    /// Rooms' `m.room.encryption` content (None: known not encrypted). A std mutex: never held
    /// across an await.
    rooms: std::sync::Mutex<HashMap<OwnedRoomId, Option<Value>>>,
    waiting: Tree<String, WaitingEvent>,
    store: Store,
    shutdown: CancellationToken,
}

fn decryption_settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

impl Crypto {
    /// Opens the encryption state under `data_dir` and checks every existing agent device
    /// against the homeserver (a mismatch refuses the start).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        config: EncryptionConfig,
        data_dir: &Path,
        client: MatrixClient,
        store: &Store,
        inbox: Arc<Inbox>,
        manager: OwnedUserId,
        registration: crate::registration::Registration,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, CryptoError> {
        let dir = data_dir.join("crypto");
        create_private_dir(&dir)?;
        let crypto = Arc::new(Self {
            config,
            client,
            inbox,
            our_users: registration.our_users(manager.server_name().as_str()),
            manager,
            devices: tokio::sync::Mutex::new(HashMap::new()),
            rooms: std::sync::Mutex::new(HashMap::new()),
            waiting: store.tree("crypto_waiting")?,
            store: store.clone(),
            shutdown,
            dir,
        });
        let mut devices = crypto.devices.lock().await;
        for agent_dir in device::existing(&crypto.dir)? {
            let device = AgentDevice::load(&agent_dir).await?;
            device.verify(&crypto.client).await?;
            tracing::info!(agent = %device.user_id(), device = %device.device_id(), "encryption device loaded");
            // Devices made before agents were cross-signed get their identity now; for the
            // others this is one key query that finds everything published.
            cross_sign(&device, &crypto.client).await;
            devices.insert(device.user_id().to_owned(), Arc::new(device));
        }
        drop(devices);
        Ok(crypto)
    }

    pub fn config(&self) -> &EncryptionConfig {
        &self.config
    }

    /// The device of `agent`, created (logged in, keys uploaded) on first need.
    pub async fn device(self: &Arc<Self>, agent: &UserId) -> Result<Arc<AgentDevice>, CryptoError> {
        let mut devices = self.devices.lock().await;
        if let Some(device) = devices.get(agent) {
            return Ok(device.clone());
        }
        let device = Arc::new(AgentDevice::create(&self.dir, agent, &self.client).await?);
        tracing::info!(%agent, device = %device.device_id(), "encryption device created");
        devices.insert(agent.to_owned(), device.clone());
        drop(devices);
        device.send_outgoing(&self.client).await?;
        cross_sign(&device, &self.client).await;
        if self.config.key_delivery == KeyDelivery::Sync {
            self.spawn_sync(device.clone());
        }
        Ok(device)
    }

    /// Creates `agent`'s device in the background (on an invite: before the person's client
    /// shares its room key, the device must exist).
    pub fn prepare_device(self: &Arc<Self>, agent: OwnedUserId) {
        let crypto = self.clone();
        tokio::spawn(async move {
            if let Err(error) = crypto.device(&agent).await {
                tracing::warn!(%error, %agent, "cannot create the agent's encryption device");
            }
        });
    }

    async fn all_devices(&self) -> Vec<Arc<AgentDevice>> {
        self.devices.lock().await.values().cloned().collect()
    }

    /// The transaction hook: feeds keys and to-device events to the devices, decrypts the
    /// timeline events (returned in their place; undecryptable ones wait), and ingests waiting
    /// events whose keys just arrived.
    pub async fn on_transaction(
        self: &Arc<Self>,
        keys: TransactionKeys,
        events: Vec<Box<RawValue>>,
    ) -> Vec<Box<RawValue>> {
        let got_keys = if keys.is_empty() {
            false
        } else {
            self.receive_transaction_keys(keys).await
        };
        let mut out = Vec::with_capacity(events.len());
        for raw in events {
            match self.inspect(&raw).await {
                Inspected::Keep => out.push(raw),
                Inspected::Decrypted(event) => out.push(event),
                Inspected::Waiting => {}
            }
        }
        if got_keys {
            self.retry_waiting().await;
        }
        out
    }

    async fn receive_transaction_keys(self: &Arc<Self>, keys: TransactionKeys) -> bool {
        let devices = self.all_devices().await;
        let lists = keys
            .device_lists
            .or(keys.device_lists_unstable)
            .unwrap_or_default();
        let mut per_device: HashMap<(OwnedUserId, OwnedDeviceId), DeviceChanges> = HashMap::new();
        for device in &devices {
            let key = (device.user_id().to_owned(), device.device_id().to_owned());
            let changes = per_device.entry(key).or_default();
            changes.device_lists = lists.clone();
        }
        for event in keys.to_device.into_iter().chain(keys.to_device_unstable) {
            let user = event
                .get("to_user_id")
                .and_then(Value::as_str)
                .and_then(|id| UserId::parse(id).ok());
            let device_id = event.get("to_device_id").and_then(Value::as_str);
            let (Some(user), Some(device_id)) = (user, device_id) else {
                continue;
            };
            if let Some(changes) = per_device.get_mut(&(user, OwnedDeviceId::from(device_id)))
                && let Ok(raw) = serde_json::from_value(event)
            {
                changes.to_device.push(raw);
            }
        }
        for (user, by_device) in keys.otk_counts.into_iter().chain(keys.otk_counts_unstable) {
            for (device_id, counts) in by_device {
                if let Some(changes) = per_device.get_mut(&(user.clone(), device_id)) {
                    changes.otk_counts = counts;
                }
            }
        }
        for (user, by_device) in keys.fallback.into_iter().chain(keys.fallback_unstable) {
            for (device_id, kinds) in by_device {
                if let Some(changes) = per_device.get_mut(&(user.clone(), device_id)) {
                    changes.fallback = Some(kinds);
                }
            }
        }
        let mut got_keys = false;
        for device in devices {
            let key = (device.user_id().to_owned(), device.device_id().to_owned());
            if let Some(changes) = per_device.remove(&key) {
                got_keys |= self.receive(&device, changes).await;
            }
        }
        got_keys
    }

    /// Feeds one device; true when room keys arrived. Keys uploads it asks for go out now.
    pub(crate) async fn receive(
        self: &Arc<Self>,
        device: &Arc<AgentDevice>,
        changes: DeviceChanges,
    ) -> bool {
        let keys = match device.receive(changes).await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(%error, agent = %device.user_id(), "cannot take in keys and to-device events");
                return false;
            }
        };
        let crypto = self.clone();
        let device = device.clone();
        tokio::spawn(async move {
            if let Err(error) = device.send_outgoing(&crypto.client).await {
                tracing::warn!(%error, agent = %device.user_id(), "cannot send the device's key requests");
            }
        });
        keys > 0
    }

    /// What to do with one timeline event.
    async fn inspect(self: &Arc<Self>, raw: &RawValue) -> Inspected {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(rename = "type", borrow)]
            kind: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            room_id: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            state_key: Option<std::borrow::Cow<'a, str>>,
        }
        let Ok(head) = serde_json::from_str::<Head<'_>>(raw.get()) else {
            return Inspected::Keep;
        };
        let Some(room) = head
            .room_id
            .as_deref()
            .and_then(|id| RoomId::parse(id).ok())
        else {
            return Inspected::Keep;
        };
        match head.kind.as_deref() {
            Some("m.room.encryption") if head.state_key.as_deref() == Some("") => {
                let content = serde_json::from_str::<Value>(raw.get())
                    .ok()
                    .and_then(|event| event.get("content").cloned())
                    .unwrap_or_else(|| serde_json::json!({}));
                self.rooms
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(room, Some(content));
                Inspected::Keep
            }
            Some("m.room.member") => {
                // An invite or join of one of our agents: its device (with its keys uploaded)
                // must exist before the people's clients share their room keys. On an invite
                // it is made before the transaction is taken in, so before the agent joins.
                if let Ok(event) = serde_json::from_str::<Value>(raw.get())
                    && let Some(target) = event
                        .get("state_key")
                        .and_then(Value::as_str)
                        .and_then(|id| UserId::parse(id).ok())
                    && self.is_agent(&target)
                    && !self.devices.lock().await.contains_key(&target)
                {
                    match event.pointer("/content/membership").and_then(Value::as_str) {
                        Some("invite") => {
                            if let Err(error) = self.device(&target).await {
                                tracing::warn!(%error, agent = %target, "cannot create the agent's encryption device");
                            }
                        }
                        Some("join") => self.prepare_device(target),
                        _ => {}
                    }
                }
                Inspected::Keep
            }
            Some("m.room.encrypted") if head.state_key.is_none() => {
                let Ok(event) = serde_json::from_str::<Value>(raw.get()) else {
                    return Inspected::Keep;
                };
                match self.decrypt(&event, &room).await {
                    Some(decrypted) => Inspected::Decrypted(decrypted),
                    // Our own agents' messages are never worth a "could not read" notice: the
                    // ciphertext goes on (the dispatcher skips it) rather than wait.
                    None if event
                        .get("sender")
                        .and_then(Value::as_str)
                        .and_then(|id| UserId::parse(id).ok())
                        .is_some_and(|sender| self.is_agent(&sender)) =>
                    {
                        Inspected::Keep
                    }
                    None => {
                        self.wait(event, room).await;
                        Inspected::Waiting
                    }
                }
            }
            _ => Inspected::Keep,
        }
    }

    fn is_agent(&self, user: &UserId) -> bool {
        self.our_users.contains(user.as_str())
    }

    /// Tries every agent device; the first that has the room key decrypts.
    async fn decrypt(&self, event: &Value, room: &RoomId) -> Option<Box<RawValue>> {
        let raw: Raw<matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent> =
            serde_json::from_value(event.clone()).ok()?;
        for device in self.all_devices().await {
            match device
                .machine()
                .decrypt_room_event(&raw, room, &decryption_settings())
                .await
            {
                Ok(decrypted) => {
                    let mut value: Value = decrypted.event.deserialize_as().ok()?;
                    // Downstream code (room context, replies) sees the event as if sent clear;
                    // this marks where it came from.
                    if let Some(object) = value.as_object_mut() {
                        let unsigned = object
                            .entry("unsigned")
                            .or_insert_with(|| serde_json::json!({}));
                        if let Some(unsigned) = unsigned.as_object_mut() {
                            unsigned.insert(ENCRYPTED_MARK.to_owned(), Value::Bool(true));
                        }
                        object.insert("room_id".to_owned(), Value::from(room.as_str()));
                    }
                    return serde_json::value::to_raw_value(&value).ok();
                }
                Err(error) => {
                    tracing::debug!(%error, agent = %device.user_id(), "this device cannot decrypt the event");
                }
            }
        }
        None
    }

    /// Keeps an event that cannot be decrypted yet, durably before the transaction is answered.
    async fn wait(&self, event: Value, room: OwnedRoomId) {
        let Some(event_id) = event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return;
        };
        if matches!(self.waiting.get(&event_id), Ok(Some(_))) {
            return;
        }
        tracing::info!(%event_id, %room, "an encrypted event waits for its keys");
        let waiting = WaitingEvent {
            event,
            room,
            first_seen_ms: now_ms(),
        };
        if let Err(error) = self.waiting.insert(&event_id, &waiting) {
            tracing::error!(%error, %event_id, "cannot keep an undecryptable event");
        } else if let Err(error) = self.store.flush().await {
            tracing::error!(%error, %event_id, "cannot keep an undecryptable event");
        }
    }

    /// Decrypts the waiting events that now can be and ingests them into the inbox (deduplicated
    /// by event id there, so a second retry never makes a second wake).
    pub async fn retry_waiting(&self) {
        let waiting: Vec<(String, WaitingEvent)> =
            self.waiting.iter().filter_map(Result::ok).collect();
        for (event_id, entry) in waiting {
            let Some(decrypted) = self.decrypt(&entry.event, &entry.room).await else {
                continue;
            };
            match self
                .inbox
                .ingest_durably(&format!("crypto-retry:{event_id}"), &[decrypted])
                .await
            {
                Ok(_) => {
                    tracing::info!(%event_id, "a waiting event was decrypted after its keys arrived");
                    if let Err(error) = self.waiting.remove(&event_id) {
                        tracing::error!(%error, %event_id, "cannot forget a decrypted waiting event");
                    }
                }
                Err(error) => tracing::error!(%error, %event_id, "cannot ingest a decrypted event"),
            }
        }
    }

    /// Events whose keys never came: one notice each, from an agent in the room, then they are
    /// forgotten.
    async fn give_up_on_expired(&self) {
        let limit = self.config.undecryptable_after_secs.saturating_mul(1000);
        let now = now_ms();
        let expired: Vec<(String, WaitingEvent)> = self
            .waiting
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| now.saturating_sub(entry.first_seen_ms) >= limit)
            .collect();
        for (event_id, entry) in expired {
            let Some(agent) = self.agent_in_room(&entry.room).await else {
                tracing::warn!(%event_id, room = %entry.room, "no agent left in the room of an unreadable event");
                let _ = self.waiting.remove(&event_id);
                continue;
            };
            let content = serde_json::json!({
                "msgtype": "m.notice",
                "body": "I could not read your last message: its keys never reached me. Please send it again.",
            });
            match self
                .client
                .send_event(
                    &agent,
                    &entry.room,
                    "m.room.message",
                    &format!("undecryptable:{event_id}"),
                    content,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(%event_id, %agent, "said that a message could not be read");
                    if let Err(error) = self.waiting.remove(&event_id) {
                        tracing::error!(%error, %event_id, "cannot forget an unreadable event");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %event_id, "cannot say that a message could not be read; retrying")
                }
            }
        }
    }

    /// The Manager when it is in `room`, else any agent with a device that is.
    async fn agent_in_room(&self, room: &RoomId) -> Option<OwnedUserId> {
        let mut candidates = vec![self.manager.clone()];
        candidates.extend(
            self.all_devices()
                .await
                .iter()
                .map(|device| device.user_id().to_owned())
                .filter(|user| *user != self.manager),
        );
        for agent in candidates {
            if self.client.joined_members(&agent, room).await.is_ok() {
                return Some(agent);
            }
        }
        None
    }

    /// The room's `m.room.encryption` content, or None when it is not encrypted.
    async fn room_encryption(
        &self,
        agent: &UserId,
        room: &RoomId,
    ) -> Result<Option<Value>, CryptoError> {
        if let Some(known) = self
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(room)
        {
            return Ok(known.clone());
        }
        let content = self.client.room_encryption(agent, room).await?;
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // An `m.room.encryption` seen meanwhile wins over an older "not encrypted".
        let entry = rooms.entry(room.to_owned()).or_insert(content);
        Ok(entry.clone())
    }

    /// Encrypts `content` for `room` when the room is encrypted (sharing the room key with
    /// every device of its members first); None in a clear room.
    pub async fn encrypt(
        self: &Arc<Self>,
        agent: &UserId,
        room: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Option<Value>, CryptoError> {
        let Some(settings) = self.room_encryption(agent, room).await? else {
            return Ok(None);
        };
        let device = self.device(agent).await?;
        let members = self.client.joined_and_invited(agent, room).await?;
        let encrypted = device
            .encrypt(&self.client, room, &members, &settings, event_type, content)
            .await?;
        Ok(Some(encrypted))
    }

    /// Background work: give up on events whose keys never came and, in `sync` mode, the
    /// per-device sync loops.
    pub async fn run(self: Arc<Self>) {
        if self.config.key_delivery == KeyDelivery::Sync {
            for device in self.all_devices().await {
                self.spawn_sync(device);
            }
        }
        // The Manager is in every DM: its device exists before anyone's first encrypted message.
        if let Err(error) = self.device(&self.manager.clone()).await {
            tracing::warn!(%error, "cannot create the Manager's encryption device");
        }
        loop {
            self.give_up_on_expired().await;
            tokio::select! {
                () = tokio::time::sleep(EXPIRY_CHECK) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    fn spawn_sync(self: &Arc<Self>, device: Arc<AgentDevice>) {
        let crypto = self.clone();
        tokio::spawn(async move { sync::run(crypto, device).await });
    }
}

/// Cross-signs `device` (see [`AgentDevice::cross_sign`]). A failure is logged, not returned:
/// without cross-signing the agent still reads and answers, its messages only carry the
/// clients' "not verified by its owner" mark, and the next start tries again.
async fn cross_sign(device: &AgentDevice, client: &MatrixClient) {
    match device.cross_sign(client).await {
        Ok(done) => {
            tracing::debug!(agent = %device.user_id(), ?done, "cross-signing checked");
        }
        Err(error) => {
            tracing::warn!(%error, agent = %device.user_id(), "cannot cross-sign the agent's device; its messages show as from a device not verified by its owner");
        }
    }
}

/// How often waiting events are checked for having waited too long.
const EXPIRY_CHECK: Duration = Duration::from_secs(2);

/// Key in a decrypted event's `unsigned` saying it arrived encrypted.
pub const ENCRYPTED_MARK: &str = "org.matrix-crew.decrypted";

enum Inspected {
    Keep,
    Decrypted(Box<RawValue>),
    Waiting,
}

/// Encrypts what agents send, for `crate::matrix::MatrixClient`.
#[async_trait::async_trait]
pub trait RoomEncryptor: Send + Sync {
    /// The `m.room.encrypted` content to send instead of `content`, or None in a clear room.
    async fn encrypt(
        &self,
        sender: &UserId,
        room: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Option<Value>, MatrixError>;

    /// Whether `room` is encrypted, as `sender` sees it: files shared there are uploaded
    /// encrypted.
    async fn is_encrypted(&self, sender: &UserId, room: &RoomId) -> Result<bool, MatrixError>;
}

/// The encryptor as the client holds it: a weak link, so the client (which the crypto layer
/// also holds) does not keep the crypto layer alive.
pub struct WeakEncryptor(pub std::sync::Weak<Crypto>);

#[async_trait::async_trait]
impl RoomEncryptor for WeakEncryptor {
    async fn encrypt(
        &self,
        sender: &UserId,
        room: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Option<Value>, MatrixError> {
        let Some(crypto) = self.0.upgrade() else {
            return Ok(None);
        };
        crypto
            .encrypt(sender, room, event_type, content)
            .await
            .map_err(into_matrix_error)
    }

    async fn is_encrypted(&self, sender: &UserId, room: &RoomId) -> Result<bool, MatrixError> {
        let Some(crypto) = self.0.upgrade() else {
            return Ok(false);
        };
        Ok(crypto
            .room_encryption(sender, room)
            .await
            .map_err(into_matrix_error)?
            .is_some())
    }
}

fn into_matrix_error(error: CryptoError) -> MatrixError {
    match error {
        CryptoError::Matrix(error) => error,
        // Store and Olm trouble may pass (a busy sqlite, a key claim that raced): retried
        // by the outbox like a network error.
        other => MatrixError::Unreachable {
            url: "encryption".to_owned(),
            message: other.to_string(),
        },
    }
}

/// Creates `dir` readable by the owner only: it holds private keys.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CryptoError> {
    let io = |source| CryptoError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synapse_transaction_key_fields_are_read() {
        // The body Synapse sends (synapse/appservice/api.py, MSC2409 + MSC3202 unstable names).
        let body = serde_json::json!({
            "events": [],
            "de.sorunome.msc2409.to_device": [{
                "type": "m.room.encrypted", "sender": "@p:x", "to_user_id": "@crew:x",
                "to_device_id": "CREWABCD", "content": {}
            }],
            "org.matrix.msc3202.device_lists": {"changed": ["@p:x"], "left": []},
            "org.matrix.msc3202.device_one_time_keys_count": {
                "@crew:x": {"CREWABCD": {"signed_curve25519": 12}}
            },
            "org.matrix.msc3202.device_unused_fallback_key_types": {
                "@crew:x": {"CREWABCD": ["signed_curve25519"]}
            }
        });
        let keys: TransactionKeys = serde_json::from_value(body).unwrap();
        assert!(!keys.is_empty());
        assert_eq!(keys.to_device_unstable.len(), 1);
        assert_eq!(
            keys.device_lists_unstable.unwrap().changed,
            vec![UserId::parse("@p:x").unwrap()]
        );
        let counts = &keys.otk_counts_unstable[&UserId::parse("@crew:x").unwrap()]
            [&OwnedDeviceId::from("CREWABCD")];
        assert_eq!(
            counts[&OneTimeKeyAlgorithm::SignedCurve25519],
            UInt::from(12u32)
        );
        let plain: TransactionKeys =
            serde_json::from_value(serde_json::json!({"events": []})).unwrap();
        assert!(plain.is_empty());
    }
}
