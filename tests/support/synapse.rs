//! A real Synapse on loopback for the tests, installed once from PyPI into a cached virtualenv.
//!
//! Each test environment gets its own homeserver (SQLite, rate limits relaxed) in a temporary
//! directory, so tests that kill `crew` or reconfigure the appservice disturb nobody.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{Value, json};

use super::tools;

/// The Synapse version the tests pin (the field notes checked 1.163.x).
const SYNAPSE_REQUIREMENT: &str = "matrix-synapse>=1.140";

/// The virtualenv's python, installing Synapse first if needed.
pub fn python() -> PathBuf {
    let venv = tools::cache_dir().join("synapse-venv");
    let python = venv.join("bin/python");
    let marker = tools::cache_dir().join("synapse-venv.ok");
    tools::install_once("synapse", &marker, || {
        if !python.exists() {
            tools::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).map_err(|e| {
                format!("{e}\nInstall Python 3 with the venv module (Debian: python3-venv).")
            })?;
        }
        tools::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            SYNAPSE_REQUIREMENT,
        ]))
        .map_err(|e| format!("{e}\npip must reach PyPI to install Synapse."))
    });
    python
}

/// A running Synapse; killed on drop.
pub struct Synapse {
    pub url: String,
    pub server_name: String,
    pub dir: PathBuf,
    child: Child,
}

impl Synapse {
    /// Starts Synapse in `dir` with the given appservice registration files.
    pub async fn start(dir: &Path, registrations: &[PathBuf]) -> Synapse {
        Self::start_with_features(dir, registrations, true).await
    }

    /// As [`Synapse::start`]; `encrypted_appservices` turns on what encrypted appservices use
    /// (MSC2409 to-device events and MSC3202 device lists and key counts in transactions). Off,
    /// Synapse behaves as Tuwunel 1.4.6 does towards appservices.
    pub async fn start_with_features(
        dir: &Path,
        registrations: &[PathBuf],
        encrypted_appservices: bool,
    ) -> Synapse {
        let python = python();
        std::fs::create_dir_all(dir).unwrap();
        let port = tools::free_port();
        let server_name = "crew.test".to_owned();
        let mut config = synapse_config(dir, port, &server_name, registrations);
        if encrypted_appservices {
            config.push_str(
                "experimental_features:\n  msc2409_to_device_messages_enabled: true\n  msc3202_transaction_extensions: true\n",
            );
        }
        let config_path = dir.join("homeserver.yaml");
        std::fs::write(&config_path, config).unwrap();
        let child = spawn(&python, &config_path, dir);
        let mut synapse = Synapse {
            url: format!("http://127.0.0.1:{port}"),
            server_name,
            dir: dir.to_path_buf(),
            child,
        };
        synapse.wait_ready().await;
        synapse
    }

    /// Kills Synapse (SIGKILL: its memory, such as the transaction ids it saw, is gone) and
    /// starts it again on the same database, port and config.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&python(), &self.dir.join("homeserver.yaml"), &self.dir);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let dir = self.dir.clone();
        let http = reqwest::Client::new();
        let versions = format!("{}/_matrix/client/versions", self.url);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answered = http.get(&versions).send().await;
            if answered.is_ok_and(|response| response.status().is_success()) {
                break;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "synapse exited with {status} during start-up:\n{}",
                    tail(&dir.join("synapse.log"))
                );
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "synapse did not start within 60 s:\n{}",
                    tail(&dir.join("synapse.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers a human user with a password; returns a logged-in client.
    pub async fn register_user(&self, localpart: &str) -> TestUser {
        let http = reqwest::Client::new();
        let answer: Value = http
            .post(format!("{}/_matrix/client/v3/register", self.url))
            .json(&json!({
                "username": localpart,
                "password": "correct horse battery staple",
                "auth": {"type": "m.login.dummy"},
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("register {localpart}: {answer}"))
            .to_owned();
        TestUser {
            http,
            url: self.url.clone(),
            token,
            user_id: answer["user_id"].as_str().unwrap().to_owned(),
        }
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }
}

/// Starts Synapse on `config`, appending to its log.
fn spawn(python: &Path, config: &Path, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("synapse.log"))
        .unwrap();
    Command::new(python)
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(config)
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start synapse")
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A human user driving the homeserver as a Matrix client would.
#[derive(Clone)]
pub struct TestUser {
    http: reqwest::Client,
    url: String,
    pub token: String,
    pub user_id: String,
}

impl TestUser {
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(json!({ "raw": text })),
        )
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.request(method.clone(), path, body).await;
        assert!(status < 300, "{method} {path} → {status}: {value}");
        value
    }

    /// Uploads `bytes` to the media repository; returns the `mxc://` URI.
    pub async fn upload(&self, bytes: Vec<u8>, content_type: &str, filename: &str) -> String {
        let response = self
            .http
            .post(format!(
                "{}/_matrix/media/v3/upload?filename={}",
                self.url,
                enc(filename)
            ))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "upload failed");
        let answer: Value = response.json().await.unwrap();
        answer["content_uri"].as_str().unwrap().to_owned()
    }

    /// Creates an unencrypted group room and invites `invite`.
    pub async fn create_room(&self, name: &str, invite: &[&str]) -> String {
        let answer = self
            .ok(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(json!({ "name": name, "preset": "private_chat", "invite": invite })),
            )
            .await;
        answer["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn invite(&self, room: &str, user: &str) {
        self.ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            Some(json!({ "user_id": user })),
        )
        .await;
    }

    pub async fn join(&self, room: &str) {
        self.ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/join", enc(room)),
            Some(json!({})),
        )
        .await;
    }

    /// Sends a message with exactly this content; returns its event id.
    pub async fn send(&self, room: &str, content: Value) -> String {
        let txn = format!("t{}", rand_suffix());
        let answer = self
            .ok(
                reqwest::Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                    enc(room)
                ),
                Some(content),
            )
            .await;
        answer["event_id"].as_str().unwrap().to_owned()
    }

    /// Sends a text message that mentions `users` the way Element does (pills + m.mentions).
    pub async fn send_mention(&self, room: &str, text: &str, users: &[&str]) -> String {
        let pills: Vec<String> = users
            .iter()
            .map(|user| format!("<a href=\"https://matrix.to/#/{user}\">{user}</a>"))
            .collect();
        self.send(
            room,
            json!({
                "msgtype": "m.text",
                "body": format!("{} {text}", users.join(" ")),
                "format": "org.matrix.custom.html",
                "formatted_body": format!("{} {text}", pills.join(" ")),
                "m.mentions": { "user_ids": users },
            }),
        )
        .await
    }

    /// The room's latest messages, newest first.
    pub async fn messages(&self, room: &str) -> Vec<Value> {
        let answer = self
            .ok(
                reqwest::Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                    enc(room)
                ),
                None,
            )
            .await;
        answer["chunk"].as_array().cloned().unwrap_or_default()
    }

    /// Messages in `room` sent by `sender`, oldest first.
    pub async fn messages_from(&self, room: &str, sender: &str) -> Vec<Value> {
        let mut found: Vec<Value> = self
            .messages(room)
            .await
            .into_iter()
            .filter(|event| event["type"] == "m.room.message" && event["sender"] == sender)
            .collect();
        found.reverse();
        found
    }

    /// Waits (30 s at most) for a message from `sender` in `room` whose body contains `needle`,
    /// and returns the first one.
    pub async fn wait_for_message(&self, room: &str, sender: &str, needle: &str) -> Value {
        tools::wait_for(
            &format!("a message from {sender} containing {needle:?}"),
            Duration::from_secs(30),
            || async {
                self.messages_from(room, sender)
                    .await
                    .into_iter()
                    .find(|event| {
                        event["content"]["body"]
                            .as_str()
                            .unwrap_or("")
                            .contains(needle)
                    })
            },
        )
        .await
    }

    /// Waits (30 s at most) for the first `m.notice` from `sender` in `room`.
    pub async fn wait_for_notice(&self, room: &str, sender: &str) -> Value {
        tools::wait_for(
            &format!("a notice from {sender}"),
            Duration::from_secs(30),
            || async {
                self.messages_from(room, sender)
                    .await
                    .into_iter()
                    .find(|event| event["content"]["msgtype"] == "m.notice")
            },
        )
        .await
    }

    /// The membership of `user` in `room` (from the room state), if any.
    pub async fn membership(&self, room: &str, user: &str) -> Option<Value> {
        let (status, value) = self
            .request(
                reqwest::Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
                    enc(room),
                    enc(user)
                ),
                None,
            )
            .await;
        (status == 200).then_some(value)
    }

    /// Waits until `who` has joined `room` (as this user sees the room state).
    pub async fn wait_joined(&self, room: &str, who: &str) {
        super::tools::wait_for(
            &format!("{who} to join {room}"),
            Duration::from_secs(30),
            || async {
                let member = self.membership(room, who).await?;
                (member["membership"] == "join").then_some(())
            },
        )
        .await;
    }

    /// Rooms this user is invited to whose name (from the invite state) is `name`.
    pub async fn invites_named(&self, name: &str) -> Vec<String> {
        let answer = self.initial_sync().await;
        answer["rooms"]["invite"]
            .as_object()
            .map(|rooms| {
                rooms
                    .iter()
                    .filter(|(_, room)| {
                        room["invite_state"]["events"]
                            .as_array()
                            .is_some_and(|events| {
                                events.iter().any(|event| {
                                    event["type"] == "m.room.name"
                                        && event["content"]["name"] == name
                                })
                            })
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rooms this user is invited to (from an initial sync).
    pub async fn invites(&self) -> Vec<String> {
        let answer = self.initial_sync().await;
        answer["rooms"]["invite"]
            .as_object()
            .map(|rooms| rooms.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn initial_sync(&self) -> Value {
        // Synapse caches an initial sync for a while; a unique filter makes each call fresh.
        let filter = enc(&format!(
            r#"{{"room":{{"timeline":{{"limit":1}}}},"account_data":{{"not_types":["x{}"]}}}}"#,
            rand_suffix()
        ));
        self.ok(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/sync?timeout=0&filter={filter}"),
            None,
        )
        .await
    }
}

pub fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn rand_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().r#gen::<u64>())
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Backtrace frames would push the message they belong to out of view.
    let is_frame = |line: &&str| {
        let line = line.trim_start();
        line.starts_with("at ")
            || line
                .split_once(": ")
                .is_some_and(|(number, _)| number.parse::<u32>().is_ok())
    };
    let lines: Vec<&str> = text.lines().filter(|line| !is_frame(line)).collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn synapse_config(dir: &Path, port: u16, server_name: &str, registrations: &[PathBuf]) -> String {
    let limit = "{per_second: 1000, burst_count: 10000}";
    let registrations: Vec<String> = registrations
        .iter()
        .map(|path| format!("  - \"{}\"", path.display()))
        .collect();
    format!(
        r#"server_name: "{server_name}"
public_baseurl: "http://127.0.0.1:{port}/"
pid_file: "{dir}/homeserver.pid"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{dir}/homeserver.db"
media_store_path: "{dir}/media"
signing_key_path: "{dir}/signing.key"
report_stats: false
suppress_key_server_warning: true
trusted_key_servers: []
registration_shared_secret: "test-shared-secret"
enable_registration: true
enable_registration_without_verification: true
presence:
  enabled: false
app_service_config_files:
{registrations}
rc_message: {limit}
rc_registration: {limit}
rc_registration_token_validity: {limit}
rc_login:
  address: {limit}
  account: {limit}
  failed_attempts: {limit}
rc_joins:
  local: {limit}
  remote: {limit}
rc_joins_per_room: {limit}
rc_invites:
  per_room: {limit}
  per_user: {limit}
  per_issuer: {limit}
rc_room_creation: {limit}
rc_3pid_validation: {limit}
rc_admin_redaction: {limit}
rc_presence:
  per_user: {limit}
rc_delayed_event_mgmt: {limit}
rc_reports: {limit}
"#,
        dir = dir.display(),
        registrations = if registrations.is_empty() {
            "  []".to_owned()
        } else {
            registrations.join("\n")
        },
    )
}
