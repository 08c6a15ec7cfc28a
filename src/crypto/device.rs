//! One agent's device: its Olm machine over its own sqlite store and
//! the loop that carries the machine's requests to the homeserver.
//!
//! On disk, `<data_dir>/crypto/<localpart>/` (mode 0700) holds `device.json` (user and device
//! id; mode 0600) and the sqlite crypto store (identity keys, Olm
//! sessions, Megolm room keys, tracked users and their devices).

use std::path::{Path, PathBuf};

use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    TrustRequirement,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::api::client::keys::get_keys;
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::room::encryption::RoomEncryptionEventContent;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::serde::Raw;
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::transport::{DeviceIdentity, Transport};
use super::{CryptoError, DeviceChanges};

const SESSION_FILE: &str = "device.json";

/// How many rounds of follow-up requests one call to [`AgentDevice::send_outgoing`] makes (an
/// upload can make a query due, a query a claim); the rest waits for the next call.
const MAX_REQUEST_ROUNDS: usize = 4;

/// An agent's device and its Olm machine. Requests assert the device with the appservice token
/// (`user_id` + `device_id`), so no per-device access token is kept.
pub struct AgentDevice {
    machine: OlmMachine,
    session: DeviceIdentity,
    dir: PathBuf,
    /// Serialises the machine's requests and room key sharing, as the SDK expects (one
    /// outgoing-requests loop per machine).
    requests: tokio::sync::Mutex<()>,
}

/// The agent folders under `crypto_dir` that hold a device.
pub(super) fn existing(crypto_dir: &Path) -> Result<Vec<PathBuf>, CryptoError> {
    let entries = std::fs::read_dir(crypto_dir).map_err(|source| CryptoError::Io {
        path: crypto_dir.display().to_string(),
        source,
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.join(SESSION_FILE).is_file())
        .collect())
}

impl AgentDevice {
    pub fn user_id(&self) -> &UserId {
        &self.session.user_id
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.session.device_id
    }

    pub fn machine(&self) -> &OlmMachine {
        &self.machine
    }

    pub(super) fn identity(&self) -> &DeviceIdentity {
        &self.session
    }

    /// Opens the device kept in `dir`.
    pub(super) async fn load(dir: &Path) -> Result<Self, CryptoError> {
        let path = dir.join(SESSION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| CryptoError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let session: DeviceIdentity =
            serde_json::from_str(&text).map_err(|error| CryptoError::CryptoStore {
                path: path.display().to_string(),
                message: error.to_string(),
            })?;
        Self::open(dir, session).await
    }

    async fn open(dir: &Path, session: DeviceIdentity) -> Result<Self, CryptoError> {
        let store_error = |message: String| CryptoError::CryptoStore {
            path: dir.display().to_string(),
            message,
        };
        let store = SqliteCryptoStore::open(dir, None)
            .await
            .map_err(|error| store_error(error.to_string()))?;
        let machine =
            match OlmMachine::with_store(&session.user_id, &session.device_id, store, None).await {
                Ok(machine) => machine,
                Err(matrix_sdk_crypto::CryptoStoreError::MismatchedAccount {
                    expected, ..
                }) => {
                    return Err(CryptoError::Mismatch {
                        agent: session.user_id.clone(),
                        path: dir.display().to_string(),
                        device: session.device_id.clone(),
                        why: format!("the store holds the keys of device {} instead", expected.1),
                    });
                }
                Err(error) => return Err(store_error(error.to_string())),
            };
        Ok(Self {
            machine,
            session,
            dir: dir.to_path_buf(),
            requests: tokio::sync::Mutex::new(()),
        })
    }

    /// Logs a new device in for `agent` and opens a fresh store for it.
    pub(super) async fn create(
        crypto_dir: &Path,
        agent: &UserId,
        transport: &Transport,
    ) -> Result<Self, CryptoError> {
        let dir = crypto_dir.join(agent.localpart());
        super::create_private_dir(&dir)?;
        let device_id = OwnedDeviceId::from(format!("CREW{}", random_suffix()));
        transport
            .login(agent, device_id.as_str(), "crew agent")
            .await?;
        let session = DeviceIdentity {
            user_id: agent.to_owned(),
            device_id,
        };
        let path = dir.join(SESSION_FILE);
        let text = serde_json::to_vec_pretty(&session).expect("a device session serialises");
        write_private(&path, &text)?;
        Self::open(&dir, session).await
    }

    /// Refuses a store that is not the device the homeserver knows: the device must still exist
    /// (its token accepted, for the same device id) and, once keys were uploaded, carry our
    /// identity key.
    pub(super) async fn verify(&self, transport: &Transport) -> Result<(), CryptoError> {
        let mismatch = |why: String| CryptoError::Mismatch {
            agent: self.session.user_id.clone(),
            path: self.dir.display().to_string(),
            device: self.session.device_id.clone(),
            why,
        };
        if !transport.device_exists(&self.session).await? {
            return Err(mismatch(
                "the homeserver does not know the device (it was deleted, or the homeserver's database was reset)".to_owned(),
            ));
        }
        let mut request = get_keys::v3::Request::new();
        request.device_keys.insert(
            self.session.user_id.clone(),
            vec![self.session.device_id.clone()],
        );
        let response = transport.send(request, self.identity()).await?;
        let published = response
            .device_keys
            .get(&self.session.user_id)
            .and_then(|devices| devices.get(&self.session.device_id))
            .and_then(|keys| keys.deserialize().ok());
        if let Some(keys) = published {
            let ours = self.machine.identity_keys().ed25519.to_base64();
            let key_id = format!("ed25519:{}", self.session.device_id);
            let theirs = keys
                .keys
                .iter()
                .find(|(id, _)| id.as_str() == key_id)
                .map(|(_, key)| key.clone());
            if theirs.as_deref() != Some(ours.as_str()) {
                return Err(mismatch(
                    "the homeserver publishes a different identity key for it".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Takes in to-device events, device lists and key counts; returns how many room keys
    /// arrived.
    pub(super) async fn receive(&self, changes: DeviceChanges) -> Result<usize, CryptoError> {
        let settings = DecryptionSettings {
            sender_device_trust_requirement: TrustRequirement::Untrusted,
        };
        let (_events, room_keys) = self
            .machine
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: changes.to_device,
                    changed_devices: &changes.device_lists,
                    one_time_keys_counts: &changes.otk_counts,
                    unused_fallback_keys: changes.fallback.as_deref(),
                    next_batch_token: changes.next_batch,
                },
                &settings,
            )
            .await
            .map_err(|error| CryptoError::Olm(error.to_string()))?;
        Ok(room_keys.len())
    }

    /// Sends what the machine asks for (keys upload, key queries…) and gives it the answers.
    pub(super) async fn send_outgoing(&self, transport: &Transport) -> Result<(), CryptoError> {
        let _guard = self.requests.lock().await;
        self.send_outgoing_locked(transport).await
    }

    async fn send_outgoing_locked(&self, transport: &Transport) -> Result<(), CryptoError> {
        for _ in 0..MAX_REQUEST_ROUNDS {
            let requests = self
                .machine
                .outgoing_requests()
                .await
                .map_err(|error| CryptoError::Olm(error.to_string()))?;
            if requests.is_empty() {
                return Ok(());
            }
            for request in requests {
                self.send_one(transport, request.request_id(), request.request())
                    .await?;
            }
        }
        Ok(())
    }

    async fn send_one(
        &self,
        transport: &Transport,
        request_id: &ruma::TransactionId,
        request: &AnyOutgoingRequest,
    ) -> Result<(), CryptoError> {
        let token = self.identity();
        let olm = |error: matrix_sdk_crypto::OlmError| CryptoError::Olm(error.to_string());
        match request {
            AnyOutgoingRequest::KeysUpload(request) => {
                let response = transport.send(request.clone(), token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::KeysQuery(request) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = request.device_keys.clone();
                query.timeout = request.timeout;
                let response = transport.send(query, token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::KeysClaim(request) => {
                let response = transport.send(request.clone(), token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::ToDeviceRequest(request) => {
                let send = send_event_to_device::v3::Request::new_raw(
                    request.event_type.clone(),
                    request.txn_id.clone(),
                    request.messages.clone(),
                );
                let response = transport.send(send, token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::SignatureUpload(request) => {
                let response = transport.send(request.clone(), token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::RoomMessage(_) => {
                // In-room verification messages: agents do not run verification flows.
                tracing::debug!("ignoring an in-room verification request of the Olm machine");
            }
        }
        Ok(())
    }

    /// Shares the room key with every device of `members` (sessions claimed where missing)
    /// and encrypts `content` for `room`.
    pub(super) async fn encrypt(
        &self,
        transport: &Transport,
        room: &RoomId,
        members: &[OwnedUserId],
        encryption: &Value,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, CryptoError> {
        let _guard = self.requests.lock().await;
        let olm = |error: String| CryptoError::Olm(error);
        // Collected first: a closure over the members would make this future not `Send`.
        let users: Vec<&UserId> = members.iter().map(|user| &**user).collect();
        send_future(self.machine.update_tracked_users(users.iter().copied()))
            .await
            .map_err(|error| olm(error.to_string()))?;
        // Key queries for newly tracked (or changed) users go out first.
        self.send_outgoing_locked(transport).await?;
        if let Some((request_id, request)) =
            send_future(self.machine.get_missing_sessions(users.iter().copied()))
                .await
                .map_err(|error| olm(error.to_string()))?
        {
            let response = transport.send(request, self.identity()).await?;
            self.machine
                .mark_request_as_sent(&request_id, &response)
                .await
                .map_err(|error| olm(error.to_string()))?;
        }
        let encryption: RoomEncryptionEventContent = serde_json::from_value(encryption.clone())
            .map_err(|error| olm(format!("the room's m.room.encryption: {error}")))?;
        let settings = EncryptionSettings::new(
            encryption,
            HistoryVisibility::Shared,
            CollectStrategy::AllDevices,
        );
        let shares = send_future(self.machine.share_room_key(
            room,
            users.iter().copied(),
            settings,
        ))
        .await
        .map_err(|error| olm(error.to_string()))?;
        for share in shares {
            let send = send_event_to_device::v3::Request::new_raw(
                share.event_type.clone(),
                share.txn_id.clone(),
                share.messages.clone(),
            );
            let response = transport.send(send, self.identity()).await?;
            self.machine
                .mark_request_as_sent(&share.txn_id, &response)
                .await
                .map_err(|error| olm(error.to_string()))?;
        }
        let raw = Raw::from_json(
            serde_json::value::to_raw_value(content).map_err(|error| olm(error.to_string()))?,
        );
        let encrypted = send_future(self.machine.encrypt_room_event_raw(room, event_type, &raw))
            .await
            .map_err(|error| olm(error.to_string()))?;
        encrypted
            .content
            .deserialize_as::<Value>()
            .map_err(|error| olm(error.to_string()))
    }
}

/// Boxes a future of the Olm machine as `Send` here, where its lifetimes are concrete: rustc
/// cannot prove `Send` for them through the callers' `async_trait` futures otherwise.
fn send_future<'a, T>(
    future: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(future)
}

/// Eight random uppercase letters: device ids people can read in their clients' device lists.
fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..8).map(|_| rng.gen_range(b'A'..=b'Z') as char).collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CryptoError> {
    use std::io::Write;
    let io = |source| CryptoError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}
