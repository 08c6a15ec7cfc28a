//! The homeserver calls of the encryption layer: logging an agent's device in, the Olm
//! machine's key requests (upload, query, claim, to-device, signatures) sent with that device's
//! access token, and the room facts encryption needs (its `m.room.encryption`, its members).
//!
//! Requests are ruma's own types, turned into HTTP by ruma, so their wire format is the
//! spec's and not ours. Network failures, 429 and 5xx answers are retried here a few times;
//! what still fails goes back to the caller (the outbox retries sends with backoff).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::Duration;

use ruma::api::auth_scheme::SendAccessToken;
use ruma::api::{
    AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequest,
    OutgoingRequestAppserviceExt, SupportedVersions,
};
use ruma::{OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

use crate::matrix::MatrixError;
use crate::secret::Secret;

/// Retries per request after its first attempt (network errors, 429, 5xx).
const MAX_RETRIES: usize = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between attempts, also for a 429's `retry_after_ms`.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// `attempt` retried on network errors, 429 and 5xx by the crate's one retry policy.
async fn retrying<T, Attempt, Answer>(attempt: Attempt) -> Result<T, MatrixError>
where
    Attempt: FnMut() -> Answer,
    Answer: std::future::Future<Output = Result<T, MatrixError>>,
{
    use backon::Retryable;
    attempt
        .retry(crate::retry::exponential(
            FIRST_BACKOFF,
            MAX_WAIT,
            MAX_RETRIES,
        ))
        .sleep(tokio::time::sleep)
        .when(MatrixError::is_transient)
        .adjust(|error, wait| crate::matrix::honour_retry_after(error, wait, MAX_WAIT))
        .await
}

/// An agent's device, as requests assert it (`user_id` and `device_id` with the appservice
/// token: Synapse accepts a device of an appservice user this way, even for the appservice's own
/// sender user, whose login tokens it does not accept).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

/// HTTP to the homeserver for the encryption layer.
#[derive(Clone)]
pub struct Transport {
    http: reqwest::Client,
    base: url::Url,
    as_token: Secret,
}

impl Transport {
    pub fn new(base: url::Url, as_token: Secret) -> Self {
        let http = reqwest::Client::builder()
            // Long enough for a `/sync` long poll (30 s) plus the answer.
            .timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("a reqwest client with static settings builds");
        Self {
            http,
            base,
            as_token,
        }
    }

    fn url(&self, path: &str) -> url::Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}{}",
            self.base.path().trim_end_matches('/'),
            path
        ));
        url
    }

    /// Sends one ruma request as `device` (the appservice token with identity assertion of the
    /// agent and its device), retrying transient failures.
    pub async fn send<R>(
        &self,
        request: R,
        device: &DeviceIdentity,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest + Clone,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = SendAccessToken<'a>>,
        for<'a> R::PathBuilder:
            ruma::api::path_builder::PathBuilder<Input<'a> = Cow<'a, SupportedVersions>>,
    {
        let versions = SupportedVersions {
            versions: BTreeSet::from([MatrixVersion::V1_1]),
            features: BTreeSet::new(),
        };
        let base = self.base.as_str().trim_end_matches('/').to_owned();
        let mut identity = AppserviceUserIdentity::new(&device.user_id);
        identity.device_id = Some(&device.device_id);
        let http_request = request
            .try_into_http_request_with_identity::<Vec<u8>>(
                &base,
                SendAccessToken::Appservice(self.as_token.expose()),
                identity,
                Cow::Borrowed(&versions),
            )
            .map_err(|error| MatrixError::Request {
                what: "build an encryption request".to_owned(),
                message: error.to_string(),
            })?;
        let path = http_request.uri().path().to_owned();
        let response = retrying(|| self.execute(http_request.clone())).await?;
        R::IncomingResponse::try_from_http_response(response).map_err(|error| {
            MatrixError::BadResponse {
                path,
                message: error.to_string(),
            }
        })
    }

    async fn execute(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, MatrixError> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let url =
            url::Url::parse(&parts.uri.to_string()).map_err(|error| MatrixError::BadResponse {
                path: path.clone(),
                message: error.to_string(),
            })?;
        let response = self
            .http
            .request(parts.method.clone(), url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.unreachable(error))?;
        if !status.is_success() {
            return Err(api_error(
                parts.method.as_str(),
                &path,
                status.as_u16(),
                &bytes,
            ));
        }
        let mut builder = http::Response::builder().status(status);
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        builder
            .body(bytes.to_vec())
            .map_err(|error| MatrixError::BadResponse {
                path,
                message: error.to_string(),
            })
    }

    fn unreachable(&self, error: reqwest::Error) -> MatrixError {
        MatrixError::Unreachable {
            url: self.base.to_string(),
            message: error.without_url().to_string(),
        }
    }

    /// A JSON call with the appservice token, masquerading as `user`.
    async fn as_call(
        &self,
        method: reqwest::Method,
        path: &str,
        user: &UserId,
        body: Option<Value>,
    ) -> Result<Value, MatrixError> {
        let mut url = self.url(path);
        url.query_pairs_mut().append_pair("user_id", user.as_str());
        self.json_call(method, url, &self.as_token, body).await
    }

    /// A JSON call with `token`, retrying transient failures.
    pub(crate) async fn json_call(
        &self,
        method: reqwest::Method,
        url: url::Url,
        token: &Secret,
        body: Option<Value>,
    ) -> Result<Value, MatrixError> {
        retrying(|| self.json_attempt(&method, &url, token, body.as_ref())).await
    }

    async fn json_attempt(
        &self,
        method: &reqwest::Method,
        url: &url::Url,
        token: &Secret,
        body: Option<&Value>,
    ) -> Result<Value, MatrixError> {
        let path = url.path().to_owned();
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token.expose());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.unreachable(error))?;
        if status.is_success() {
            serde_json::from_slice::<Value>(&bytes).map_err(|error| MatrixError::BadResponse {
                path,
                message: error.to_string(),
            })
        } else {
            Err(api_error(method.as_str(), &path, status.as_u16(), &bytes))
        }
    }

    /// Creates the device `device_id` for `user` by logging in as the appservice (the spec's
    /// `m.login.application_service`, on Synapse and Tuwunel alike). The access token it returns
    /// is not kept: requests assert the device with the appservice token instead.
    pub async fn login(
        &self,
        user: &UserId,
        device_id: &str,
        display_name: &str,
    ) -> Result<(), MatrixError> {
        let body = json!({
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": user.as_str()},
            "device_id": device_id,
            "initial_device_display_name": display_name,
        });
        let answer = self
            .json_call(
                reqwest::Method::POST,
                self.url("/_matrix/client/v3/login"),
                &self.as_token,
                Some(body),
            )
            .await?;
        match answer.get("device_id").and_then(Value::as_str) {
            Some(created) if created == device_id => Ok(()),
            other => Err(MatrixError::BadResponse {
                path: "/_matrix/client/v3/login".to_owned(),
                message: format!("the login made device {other:?}, not {device_id}"),
            }),
        }
    }

    fn device_url(&self, path: &str, device: &DeviceIdentity) -> url::Url {
        let mut url = self.url(path);
        url.query_pairs_mut()
            .append_pair("user_id", device.user_id.as_str())
            .append_pair("device_id", device.device_id.as_str());
        url
    }

    /// Whether the homeserver still knows `device`: false when it refuses the device
    /// (`M_UNKNOWN_DEVICE`, or any 400/401/403/404 answer about it).
    pub async fn device_exists(&self, device: &DeviceIdentity) -> Result<bool, MatrixError> {
        let url = self.device_url("/_matrix/client/v3/account/whoami", device);
        match self
            .json_call(reqwest::Method::GET, url, &self.as_token, None)
            .await
        {
            Ok(answer) => {
                Ok(answer.get("device_id").and_then(Value::as_str)
                    == Some(device.device_id.as_str()))
            }
            Err(MatrixError::Api {
                status: 400 | 401 | 403 | 404,
                ..
            }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The room's `m.room.encryption` content, as `agent` sees it; None when there is none.
    pub async fn room_encryption(
        &self,
        agent: &UserId,
        room: &RoomId,
    ) -> Result<Option<Value>, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.encryption/",
            enc(room.as_str())
        );
        match self.as_call(reqwest::Method::GET, &path, agent, None).await {
            Ok(content) => Ok(Some(content)),
            Err(MatrixError::Api { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The joined and invited members of `room` (everyone who gets the room key).
    pub async fn members(
        &self,
        agent: &UserId,
        room: &RoomId,
    ) -> Result<Vec<ruma::OwnedUserId>, MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/members", enc(room.as_str()));
        let answer = self
            .as_call(reqwest::Method::GET, &path, agent, None)
            .await?;
        Ok(answer
            .get("chunk")
            .and_then(Value::as_array)
            .map(|events| {
                events
                    .iter()
                    .filter(|event| {
                        matches!(
                            event.pointer("/content/membership").and_then(Value::as_str),
                            Some("join" | "invite")
                        )
                    })
                    .filter_map(|event| event.get("state_key").and_then(Value::as_str))
                    .filter_map(|id| UserId::parse(id).ok())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// One `/sync` long poll as `device` with `filter`.
    pub async fn sync(
        &self,
        device: &DeviceIdentity,
        filter: &str,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Result<Value, MatrixError> {
        let mut url = self.device_url("/_matrix/client/v3/sync", device);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("filter", filter);
            query.append_pair("timeout", &timeout_ms.to_string());
            if let Some(since) = since {
                query.append_pair("since", since);
            }
        }
        self.json_call(reqwest::Method::GET, url, &self.as_token, None)
            .await
    }
}

fn api_error(method: &str, path: &str, status: u16, body: &[u8]) -> MatrixError {
    let value: Value = serde_json::from_slice(body).unwrap_or_else(|_| json!({}));
    MatrixError::Api {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        errcode: value
            .get("errcode")
            .and_then(Value::as_str)
            .unwrap_or("M_UNKNOWN")
            .to_owned(),
        error: value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        retry_after: value
            .get("retry_after_ms")
            .and_then(Value::as_u64)
            .map(std::time::Duration::from_millis),
    }
}

fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}
