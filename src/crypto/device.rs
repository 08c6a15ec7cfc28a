//! One agent's device: its Olm machine over its own sqlite store and
//! the loop that carries the machine's requests to the homeserver.
//!
//! On disk, `<data_dir>/crypto/<localpart>/` (mode 0700) holds `device.json` (user and device
//! id; mode 0600) and the sqlite crypto store (identity keys, Olm
//! sessions, Megolm room keys, tracked users and their devices).

use std::path::{Path, PathBuf};

use matrix_sdk_crypto::types::requests::{AnyIncomingResponse, AnyOutgoingRequest};
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    TrustRequirement,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::api::client::keys::{get_keys, upload_signing_keys};
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::room::encryption::RoomEncryptionEventContent;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::serde::Raw;
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{CryptoError, DeviceChanges};
use crate::matrix::{DeviceIdentity, MatrixClient};

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
        client: &MatrixClient,
    ) -> Result<Self, CryptoError> {
        let dir = crypto_dir.join(agent.localpart());
        super::create_private_dir(&dir)?;
        let device_id = OwnedDeviceId::from(format!("CREW{}", random_suffix()));
        client.login_device(agent, &device_id, "crew agent").await?;
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
    pub(super) async fn verify(&self, client: &MatrixClient) -> Result<(), CryptoError> {
        let mismatch = |why: String| CryptoError::Mismatch {
            agent: self.session.user_id.clone(),
            path: self.dir.display().to_string(),
            device: self.session.device_id.clone(),
            why,
        };
        if !client.device_exists(&self.session).await? {
            return Err(mismatch(
                "the homeserver does not know the device (it was deleted, or the homeserver's database was reset)".to_owned(),
            ));
        }
        let mut request = get_keys::v3::Request::new();
        request.device_keys.insert(
            self.session.user_id.clone(),
            vec![self.session.device_id.clone()],
        );
        let response = client.call_as_device(request, self.identity()).await?;
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
    pub(super) async fn send_outgoing(&self, client: &MatrixClient) -> Result<(), CryptoError> {
        let _guard = self.requests.lock().await;
        self.send_outgoing_locked(client).await
    }

    async fn send_outgoing_locked(&self, client: &MatrixClient) -> Result<(), CryptoError> {
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
                self.send_one(client, request.request_id(), request.request())
                    .await?;
            }
        }
        Ok(())
    }

    async fn send_one(
        &self,
        client: &MatrixClient,
        request_id: &ruma::TransactionId,
        request: &AnyOutgoingRequest,
    ) -> Result<(), CryptoError> {
        let token = self.identity();
        let olm = |error: matrix_sdk_crypto::OlmError| CryptoError::Olm(error.to_string());
        match request {
            AnyOutgoingRequest::KeysUpload(request) => {
                let response = client.call_as_device(request.clone(), token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::KeysQuery(request) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = request.device_keys.clone();
                query.timeout = request.timeout;
                let response = client.call_as_device(query, token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::KeysClaim(request) => {
                let response = client.call_as_device(request.clone(), token).await?;
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
                let response = client.call_as_device(send, token).await?;
                self.machine
                    .mark_request_as_sent(request_id, &response)
                    .await
                    .map_err(olm)?;
            }
            AnyOutgoingRequest::SignatureUpload(request) => {
                let response = client.call_as_device(request.clone(), token).await?;
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

    /// Gives the agent a cross-signing identity and signs this device with it, so people's
    /// clients see a device verified by its owner (Element shows no "not verified by its owner"
    /// warning on the agent's messages). The private keys are made once and kept in this
    /// device's crypto store; what is published is checked first, so a restart uploads nothing
    /// and never makes a second master key. Returns what was done.
    pub(super) async fn cross_sign(
        &self,
        client: &MatrixClient,
    ) -> Result<CrossSigning, CryptoError> {
        let _guard = self.requests.lock().await;
        let olm = |error: String| CryptoError::Olm(error);
        let had_identity = self.machine.cross_signing_status().await.has_master;
        // With keys in the store, this only builds the requests that would publish them (the
        // same keys); without, it makes and stores new ones.
        let requests = self
            .machine
            .bootstrap_cross_signing(false)
            .await
            .map_err(|error| olm(error.to_string()))?;
        let ours = &requests.upload_signing_keys_req;
        let (Some(master), Some(self_signing)) = (&ours.master_key, &ours.self_signing_key) else {
            return Err(olm(
                "the cross-signing identity has no master or self-signing key".to_owned(),
            ));
        };
        let to_value = |key: &matrix_sdk_crypto::types::CrossSigningKey| {
            serde_json::to_value(key).map_err(|error| olm(error.to_string()))
        };
        let (master, self_signing) = (to_value(master)?, to_value(self_signing)?);
        let published = self.published_keys(client).await?;
        match published_state(
            &published,
            self.user_id(),
            self.device_id(),
            &master,
            &self_signing,
        ) {
            Published::Signed => return Ok(CrossSigning::AlreadyPublished),
            Published::Missing => {}
            Published::Other => tracing::warn!(
                agent = %self.user_id(),
                "the homeserver publishes a cross-signing identity this device's store does not hold \
                 (the store was reset): replacing it; people who verified the agent see its identity change"
            ),
        }
        if let Some(upload) = &requests.upload_keys_req {
            self.send_one(client, upload.request_id(), upload.request())
                .await?;
        }
        let mut upload = upload_signing_keys::v3::Request::new();
        upload.master_key = ours.master_key.as_ref().map(|key| key.to_raw());
        upload.self_signing_key = ours.self_signing_key.as_ref().map(|key| key.to_raw());
        upload.user_signing_key = ours.user_signing_key.as_ref().map(|key| key.to_raw());
        let response = client
            .call_as_device(upload, self.identity())
            .await
            .map_err(uia_hint)?;
        self.machine
            .mark_request_as_sent(
                &ruma::TransactionId::new(),
                AnyIncomingResponse::SigningKeysUpload(&response),
            )
            .await
            .map_err(|error| olm(error.to_string()))?;
        let response = client
            .call_as_device(requests.upload_signatures_req.clone(), self.identity())
            .await?;
        if !response.failures.is_empty() {
            let failures = serde_json::to_string(&response.failures).unwrap_or_default();
            return Err(olm(format!(
                "the homeserver refused the device's cross-signing signature: {failures}"
            )));
        }
        self.machine
            .mark_request_as_sent(&ruma::TransactionId::new(), &response)
            .await
            .map_err(|error| olm(error.to_string()))?;
        let master_key = master_key_of(&master).unwrap_or_default();
        tracing::info!(agent = %self.user_id(), device = %self.device_id(), %master_key,
            "cross-signing identity published and the device signed with it");
        Ok(if had_identity {
            CrossSigning::Republished
        } else {
            CrossSigning::Created
        })
    }

    /// The agent's cross-signing keys and this device's keys as the homeserver publishes them
    /// (`/keys/query`: what any person's client sees), as JSON.
    async fn published_keys(&self, client: &MatrixClient) -> Result<Value, CryptoError> {
        let mut request = get_keys::v3::Request::new();
        request.device_keys.insert(
            self.session.user_id.clone(),
            vec![self.session.device_id.clone()],
        );
        let response = client.call_as_device(request, self.identity()).await?;
        let raw = |map: &std::collections::BTreeMap<OwnedUserId, Raw<_>>| -> Value {
            map.iter()
                .filter_map(|(user, key)| {
                    Some((
                        user.to_string(),
                        serde_json::from_str(key.json().get()).ok()?,
                    ))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let devices: serde_json::Map<String, Value> = response
            .device_keys
            .iter()
            .map(|(user, devices)| {
                let devices: serde_json::Map<String, Value> = devices
                    .iter()
                    .filter_map(|(id, keys)| {
                        Some((
                            id.to_string(),
                            serde_json::from_str(keys.json().get()).ok()?,
                        ))
                    })
                    .collect();
                (user.to_string(), Value::Object(devices))
            })
            .collect();
        Ok(serde_json::json!({
            "master_keys": raw(&response.master_keys),
            "self_signing_keys": raw(&response.self_signing_keys),
            "device_keys": devices,
        }))
    }

    /// Shares the room key with every device of `members` (sessions claimed where missing)
    /// and encrypts `content` for `room`.
    pub(super) async fn encrypt(
        &self,
        client: &MatrixClient,
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
        self.send_outgoing_locked(client).await?;
        if let Some((request_id, request)) =
            send_future(self.machine.get_missing_sessions(users.iter().copied()))
                .await
                .map_err(|error| olm(error.to_string()))?
        {
            let response = client.call_as_device(request, self.identity()).await?;
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
            let response = client.call_as_device(send, self.identity()).await?;
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

/// What [`AgentDevice::cross_sign`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossSigning {
    /// A new identity was made, published and the device signed.
    Created,
    /// The kept identity was published again (the homeserver did not have it).
    Republished,
    /// The homeserver already had the identity and the device's signature.
    AlreadyPublished,
}

/// How the homeserver's `/keys/query` answer stands to the identity this device holds.
#[derive(Debug, PartialEq, Eq)]
enum Published {
    /// Our master and self-signing keys are published and the device carries the
    /// self-signing key's signature.
    Signed,
    /// No cross-signing identity published, or ours without the device's signature.
    Missing,
    /// Someone else's master key (a store made afresh while the old identity stays published).
    Other,
}

fn published_state(
    query: &Value,
    user: &UserId,
    device: &DeviceId,
    master: &Value,
    self_signing: &Value,
) -> Published {
    let user = user.as_str();
    let Some(published_master) = query.pointer(&format!("/master_keys/{}", pointer_escape(user)))
    else {
        return Published::Missing;
    };
    if published_master.get("keys") != master.get("keys") {
        return Published::Other;
    }
    let published_ssk = query
        .pointer(&format!("/self_signing_keys/{}", pointer_escape(user)))
        .and_then(|key| key.get("keys"));
    if published_ssk != self_signing.get("keys") {
        return Published::Missing;
    }
    let Some(ssk_id) = self_signing
        .get("keys")
        .and_then(Value::as_object)
        .and_then(|keys| keys.keys().next())
    else {
        return Published::Missing;
    };
    let signed = query
        .pointer(&format!(
            "/device_keys/{}/{}/signatures/{}/{}",
            pointer_escape(user),
            pointer_escape(device.as_str()),
            pointer_escape(user),
            pointer_escape(ssk_id)
        ))
        .is_some();
    if signed {
        Published::Signed
    } else {
        Published::Missing
    }
}

/// The master key's public key (unpadded base64), for the log line people compare against.
fn master_key_of(master: &Value) -> Option<String> {
    master
        .get("keys")?
        .as_object()?
        .values()
        .next()?
        .as_str()
        .map(str::to_owned)
}

/// A JSON pointer segment for a Matrix id (`~` and `/` escaped).
fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The homeserver asked for interactive authentication: say what that means here.
fn uia_hint(error: crate::matrix::MatrixError) -> crate::matrix::MatrixError {
    match error {
        crate::matrix::MatrixError::Api {
            method,
            path,
            status: 401,
            errcode,
            error,
            retry_after,
        } => crate::matrix::MatrixError::Api {
            method,
            path,
            status: 401,
            errcode,
            error: format!(
                "{error} (the homeserver asks for interactive authentication to replace the agent's \
                 cross-signing keys: Synapse never does for appservice users; Tuwunel needs \
                 `device_management: true` (MSC4190) in the registration to allow a replacement)"
            ),
            retry_after,
        },
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(id: &str, public: &str) -> Value {
        json!({"user_id": "@crew_a:x", "usage": ["master"], "keys": {id: public}})
    }

    fn query(master: &Value, ssk: &Value, device_signed_by: Option<&str>) -> Value {
        let mut signatures = json!({"@crew_a:x": {"ed25519:CREWDEV": "self"}});
        if let Some(id) = device_signed_by {
            signatures["@crew_a:x"][id] = json!("sig");
        }
        json!({
            "master_keys": {"@crew_a:x": master},
            "self_signing_keys": {"@crew_a:x": ssk},
            "device_keys": {"@crew_a:x": {"CREWDEV": {"signatures": signatures}}},
        })
    }

    #[test]
    fn published_identity_is_judged_against_ours() {
        let user = UserId::parse("@crew_a:x").unwrap();
        let device = OwnedDeviceId::from("CREWDEV");
        let master = key("ed25519:M", "M");
        let ssk = key("ed25519:S", "S");
        let state = |query: &Value| published_state(query, &user, &device, &master, &ssk);

        assert_eq!(
            state(&query(&master, &ssk, Some("ed25519:S"))),
            Published::Signed
        );
        // Nothing published yet: the first upload.
        assert_eq!(state(&json!({"device_keys": {}})), Published::Missing);
        // Ours, but the device was never signed (the signature upload failed last time).
        assert_eq!(state(&query(&master, &ssk, None)), Published::Missing);
        // Signed by some other self-signing key.
        assert_eq!(
            state(&query(&master, &key("ed25519:T", "T"), Some("ed25519:T"))),
            Published::Missing
        );
        // Another master key: a store made afresh.
        assert_eq!(
            state(&query(&key("ed25519:N", "N"), &ssk, Some("ed25519:S"))),
            Published::Other
        );
        assert_eq!(master_key_of(&master).as_deref(), Some("M"));
    }
}
