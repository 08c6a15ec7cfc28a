//! Replays how Tuwunel delivers transactions, in front of a real Synapse.
//!
//! Tuwunel never retries a failed transaction on a timer, nor on a ping: it resends only when
//! the next event for the appservice is queued (checked in its source and on a real 1.4.6). It
//! sends the hs_token both as a Bearer header and as the `access_token` query parameter, its
//! transaction ids are hashes of the events, and it sends no to-device events or device lists.
//! It delivers an invite for the appservice's sender user only when that user id matches the
//! registration's users namespace. This relay forwards every client-server request to Synapse
//! unchanged; the events the test
//! [`TuwunelReplay::push`]es are delivered Tuwunel style: held after a failure, and re-sent when
//! the next event is queued, which is a pushed event or an event crew itself sends through the
//! relay (a `PUT …/send/…` or `…/state/…` that Synapse accepted). A ping delivers nothing.
//!
//! As a client-API proxy it can also fail, hold or cut crew's requests (a homeserver in
//! trouble, or a send that reached it whose answer was lost).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct TuwunelReplay {
    inner: Arc<Inner>,
    pub url: String,
}

struct Inner {
    synapse: String,
    appservice: String,
    hs_token: String,
    http: reqwest::Client,
    backlog: Mutex<Vec<(String, Value)>>,
    /// While true, message sends from the appservice are held (not forwarded) until released.
    hold_sends: tokio::sync::watch::Sender<bool>,
    held: std::sync::atomic::AtomicUsize,
    /// (txn id, status) of every delivery attempt, in order.
    pub deliveries: Mutex<Vec<(String, Option<u16>)>>,
    /// The next joins answered with this status instead of being forwarded: (status, how many).
    failing_joins: Mutex<(u16, usize)>,
    /// Join requests seen (forwarded or failed).
    joins: std::sync::atomic::AtomicUsize,
    /// As `failing_joins`, for message sends in one room.
    failing_sends: Mutex<(String, u16, usize)>,
    /// Whether only the outbox's sends (their content carries `org.matrix-crew.outbox_key`)
    /// are held by `hold_sends`.
    hold_only_outbox: std::sync::atomic::AtomicBool,
    /// The next outbox send is forwarded, then its connection is cut before the answer, and
    /// every request after it is held until `release_all`.
    cut_next_outbox_send: std::sync::atomic::AtomicBool,
    /// The next `POST …/createRoom` is forwarded and its connection cut before the answer.
    cut_next_create_room: std::sync::atomic::AtomicBool,
    cuts: std::sync::atomic::AtomicUsize,
    hold_all: tokio::sync::watch::Sender<bool>,
    /// Message sends in this room wait until this instant before they are forwarded.
    stalled_room: Mutex<Option<(String, std::time::Instant)>>,
    /// The appservice's sender user and its users namespaces, for the invite rule.
    sender_user: String,
    users_namespaces: Vec<regex::Regex>,
    /// Invites Tuwunel would not deliver (the sender user outside the users namespace).
    undelivered_invites: std::sync::atomic::AtomicUsize,
}

impl TuwunelReplay {
    /// A relay to `synapse` that delivers to `appservice` as the appservice `registration`
    /// (its YAML) says.
    pub async fn start(
        synapse: &str,
        appservice: &str,
        registration: &serde_yaml::Value,
        server_name: &str,
    ) -> TuwunelReplay {
        let hs_token = registration["hs_token"].as_str().expect("an hs_token");
        let sender_user = format!(
            "@{}:{server_name}",
            registration["sender_localpart"]
                .as_str()
                .expect("a sender_localpart")
        );
        let users_namespaces = registration["namespaces"]["users"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|namespace| namespace["regex"].as_str())
            .map(|pattern| regex::Regex::new(pattern).expect("a valid namespace regex"))
            .collect();
        let inner = Arc::new(Inner {
            synapse: synapse.to_owned(),
            appservice: appservice.to_owned(),
            hs_token: hs_token.to_owned(),
            http: reqwest::Client::new(),
            backlog: Mutex::new(Vec::new()),
            hold_sends: tokio::sync::watch::channel(false).0,
            held: Default::default(),
            deliveries: Mutex::new(Vec::new()),
            failing_joins: Mutex::new((0, 0)),
            joins: Default::default(),
            failing_sends: Mutex::new((String::new(), 0, 0)),
            hold_only_outbox: Default::default(),
            cut_next_outbox_send: Default::default(),
            cut_next_create_room: Default::default(),
            cuts: Default::default(),
            hold_all: tokio::sync::watch::channel(false).0,
            stalled_room: Mutex::new(None),
            sender_user,
            users_namespaces,
            undelivered_invites: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        TuwunelReplay { inner, url }
    }

    /// Stops `env`'s crew and puts a relay between it and its Synapse: crew uses the relay as
    /// its homeserver from its next start, and the relay delivers to crew Tuwunel-style.
    pub async fn between(env: &mut super::crew::CrewEnv) -> TuwunelReplay {
        let relay = Self::start(
            &env.synapse.url,
            &env.appservice_url(),
            &env.registration(),
            &env.synapse.server_name,
        )
        .await;
        env.kill_crew();
        env.homeserver_url = relay.url.clone();
        relay
    }

    /// Queues events as one transaction (id = hash of the events) and tries to deliver the
    /// backlog once, as Tuwunel does when a new event arrives.
    ///
    /// Tuwunel's invite rule is applied first: an invite for the appservice's sender user is
    /// delivered only when that user id also matches the users namespace (Tuwunel 1.4.6
    /// compares the full user id with the bare `sender_localpart`, which never matches, so only
    /// the namespace lets it through; otherwise the invite is dropped, not held).
    pub async fn push(&self, events: Vec<Value>) {
        let events: Vec<Value> = events
            .into_iter()
            .filter(|event| {
                let sender_invite = event["type"] == "m.room.member"
                    && event["content"]["membership"] == "invite"
                    && event["state_key"] == self.inner.sender_user.as_str();
                let listed = self
                    .inner
                    .users_namespaces
                    .iter()
                    .any(|namespace| namespace.is_match(&self.inner.sender_user));
                let dropped = sender_invite && !listed;
                if dropped {
                    self.inner
                        .undelivered_invites
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                !dropped
            })
            .collect();
        if events.is_empty() {
            return;
        }
        let mut hasher = Sha256::new();
        for event in &events {
            hasher.update(event.to_string().as_bytes());
        }
        let txn_id = base64_url(&hasher.finalize());
        self.inner
            .backlog
            .lock()
            .unwrap()
            .push((txn_id, json!({ "events": events })));
        self.inner.deliver().await;
    }

    /// Holds every `m.room.message` send until [`TuwunelReplay::release_sends`]: the sender is
    /// left mid-request, as with a slow homeserver.
    pub fn hold_sends(&self) {
        self.inner.hold_sends.send_replace(true);
    }

    /// As [`TuwunelReplay::hold_sends`], for the outbox's sends only (a turn's answer, a
    /// `!crew` answer): other messages pass.
    pub fn hold_outbox_sends(&self) {
        self.inner
            .hold_only_outbox
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.hold_sends.send_replace(true);
    }

    /// The next outbox send reaches Synapse, but its answer never reaches crew: the connection
    /// is cut first (sent but unacknowledged). Every request after it is held until
    /// [`TuwunelReplay::release_all`], so the test decides what crew finds when it asks again.
    pub fn cut_next_outbox_send(&self) {
        self.inner
            .cut_next_outbox_send
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next createRoom reaches Synapse (the room exists), but its answer never reaches
    /// crew: the connection is cut first.
    pub fn cut_next_create_room(&self) {
        self.inner
            .cut_next_create_room
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds every message send in `room` until `stall` has passed from now (a homeserver slow
    /// in one room), then forwards it.
    pub fn stall_sends(&self, room: &str, stall: std::time::Duration) {
        *self.inner.stalled_room.lock().unwrap() =
            Some((room.to_owned(), std::time::Instant::now() + stall));
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.inner.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn release_all(&self) {
        self.inner.hold_all.send_replace(false);
    }

    pub fn release_sends(&self) {
        self.inner.hold_sends.send_replace(false);
    }

    /// Sends currently held.
    pub fn held(&self) -> usize {
        self.inner.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers the next `count` joins (`POST …/join`) with `status` (a Matrix error), as a
    /// homeserver in trouble (5xx) or one that refuses (403) would.
    pub fn fail_joins(&self, status: u16, count: usize) {
        *self.inner.failing_joins.lock().unwrap() = (status, count);
    }

    /// Answers the next `count` message sends (`PUT …/send/m.room.message/…`) in `room` with
    /// `status`.
    pub fn fail_sends(&self, room: &str, status: u16, count: usize) {
        *self.inner.failing_sends.lock().unwrap() = (room.to_owned(), status, count);
    }

    /// Join requests seen so far.
    pub fn joins(&self) -> usize {
        self.inner.joins.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Invites for the sender user that Tuwunel would not have delivered.
    pub fn undelivered_invites(&self) -> usize {
        self.inner
            .undelivered_invites
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn backlog_len(&self) -> usize {
        self.inner.backlog.lock().unwrap().len()
    }

    pub fn deliveries(&self) -> Vec<(String, Option<u16>)> {
        self.inner.deliveries.lock().unwrap().clone()
    }
}

impl Inner {
    /// Sends each held transaction in order; stops at the first failure and keeps the rest.
    async fn deliver(&self) {
        loop {
            let Some((txn_id, body)) = self.backlog.lock().unwrap().first().cloned() else {
                return;
            };
            let url = format!(
                "{}/_matrix/app/v1/transactions/{}?access_token={}",
                self.appservice, txn_id, self.hs_token
            );
            let status = self
                .http
                .put(url)
                .bearer_auth(&self.hs_token)
                .json(&body)
                .send()
                .await
                .ok()
                .map(|response| response.status().as_u16());
            self.deliveries.lock().unwrap().push((txn_id, status));
            if status != Some(200) {
                return;
            }
            self.backlog.lock().unwrap().remove(0);
        }
    }
}

async fn relay(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::POST && uri.path().ends_with("/join") {
        inner
            .joins
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let failed = {
            let mut failing = inner.failing_joins.lock().unwrap();
            (failing.1 > 0).then(|| {
                failing.1 -= 1;
                failing.0
            })
        };
        if let Some(status) = failed {
            let errcode = if status == 403 {
                "M_FORBIDDEN"
            } else {
                "M_UNKNOWN"
            };
            return (
                axum::http::StatusCode::from_u16(status).unwrap(),
                axum::Json(json!({"errcode": errcode, "error": "refused by the test relay"})),
            )
                .into_response();
        }
    }
    let mut hold_all = inner.hold_all.subscribe();
    if *hold_all.borrow() {
        let _ = hold_all.wait_for(|held| !held).await;
    }
    let creates_event =
        method == Method::PUT && (uri.path().contains("/send/") || uri.path().contains("/state/"));
    let outbox_send = method == Method::PUT
        && uri.path().contains("/send/m.room.message/")
        && String::from_utf8_lossy(&body).contains("org.matrix-crew.outbox_key");
    let cut = outbox_send
        && inner
            .cut_next_outbox_send
            .swap(false, std::sync::atomic::Ordering::SeqCst);
    let cut_create = method == Method::POST
        && uri.path().ends_with("/createRoom")
        && inner
            .cut_next_create_room
            .swap(false, std::sync::atomic::Ordering::SeqCst);
    if method == Method::PUT && uri.path().contains("/send/m.room.message/") {
        let failed = {
            let mut failing = inner.failing_sends.lock().unwrap();
            let path = percent_encoding::percent_decode_str(uri.path()).decode_utf8_lossy();
            (failing.2 > 0 && path.contains(&format!("/rooms/{}/", failing.0))).then(|| {
                failing.2 -= 1;
                failing.1
            })
        };
        if let Some(status) = failed {
            return (
                axum::http::StatusCode::from_u16(status).unwrap(),
                axum::Json(json!({"errcode": "M_UNKNOWN", "error": "failed by the test relay"})),
            )
                .into_response();
        }
        let stalled_until = {
            let stalled = inner.stalled_room.lock().unwrap();
            let path = percent_encoding::percent_decode_str(uri.path()).decode_utf8_lossy();
            stalled
                .as_ref()
                .filter(|(room, _)| path.contains(&format!("/rooms/{room}/")))
                .map(|(_, until)| *until)
        };
        if let Some(until) = stalled_until {
            tokio::time::sleep_until(until.into()).await;
        }
        let mut hold = inner.hold_sends.subscribe();
        let only_outbox = inner
            .hold_only_outbox
            .load(std::sync::atomic::Ordering::SeqCst);
        if *hold.borrow() && (outbox_send || !only_outbox) {
            inner.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = hold.wait_for(|held| !held).await;
            inner.held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = inner
        .http
        .request(method, format!("{}{}", inner.synapse, path))
        .body(body);
    for (name, value) in &headers {
        if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            if cut || cut_create {
                // Synapse has the event (or room); crew never hears so. Ending this
                // connection's task (without the panic hook) drops the socket before any answer
                // is written.
                let _ = response.bytes().await;
                if cut {
                    inner.hold_all.send_replace(true);
                }
                inner.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::panic::resume_unwind(Box::new("connection cut by the test relay"));
            }
            if creates_event && status.is_success() {
                // An event for the appservice is queued: Tuwunel sends its backlog first. Not
                // awaited here: the sender gets its answer as from Tuwunel, at once.
                let inner = inner.clone();
                tokio::spawn(async move { inner.deliver().await });
            }
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .cloned();
            let bytes = response.bytes().await.unwrap_or_default();
            let mut answer = (status, bytes).into_response();
            if let Some(content_type) = content_type {
                answer
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, content_type);
            }
            answer
        }
        Err(error) => (axum::http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
