//! A person whose client encrypts: matrix-nio (with its E2E extra, installed once from PyPI into
//! a cached virtualenv) driven through `e2e_person.py`, one JSON command per line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::tools;

/// matrix-nio 0.26 uses vodozemac's Python bindings (wheels on PyPI): no libolm to build.
const NIO_REQUIREMENT: &str = "matrix-nio[e2e]>=0.25";

/// The virtualenv's python, installing matrix-nio first if needed.
pub fn python() -> PathBuf {
    let venv = tools::cache_dir().join("nio-venv");
    let python = venv.join("bin/python");
    let marker = tools::cache_dir().join("nio-venv.ok");
    tools::install_once("nio", &marker, || {
        if !python.exists() {
            tools::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).map_err(|e| {
                format!("{e}\nInstall Python 3 with the venv module (Debian: python3-venv).")
            })?;
        }
        tools::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", NIO_REQUIREMENT]))
            .map_err(|e| format!("{e}\npip must reach PyPI to install matrix-nio."))
    });
    python
}

/// A logged-in person with an encrypting client; the process is killed on drop.
pub struct Person {
    pub user_id: String,
    child: Child,
    stdin: tokio::process::ChildStdin,
    stdout: BufReader<tokio::process::ChildStdout>,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/e2e_person.py");

impl Person {
    /// Logs `user_id` in with `password` as a new device whose keys live under `store`.
    pub async fn login(homeserver: &str, user_id: &str, password: &str, store: &Path) -> Person {
        std::fs::create_dir_all(store).unwrap();
        let log = std::fs::File::create(store.join("nio.log")).unwrap();
        let mut child = Command::new(python())
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the e2e person script");
        let stdin: ChildStdin = child.stdin.take().unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let mut person = Person {
            user_id: user_id.to_owned(),
            child,
            stdin: tokio::process::ChildStdin::from_std(stdin).unwrap(),
            stdout: BufReader::new(tokio::process::ChildStdout::from_std(stdout).unwrap()),
        };
        person
            .call(
                json!({"cmd": "login", "homeserver": homeserver, "user_id": user_id,
                         "password": password, "store": store}),
            )
            .await;
        person
    }

    /// Sends one command and returns its answer; panics with the script's error.
    pub async fn call(&mut self, command: Value) -> Value {
        let answer = self.try_call(command.clone()).await;
        assert!(
            answer["ok"].as_bool() == Some(true),
            "e2e person: {command} failed: {answer}"
        );
        answer
    }

    /// As [`Person::call`], returning a failed answer instead of panicking.
    pub async fn try_call(&mut self, command: Value) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let mut answer = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(180), self.stdout.read_line(&mut answer))
                .await
                .expect("the e2e person answers within 3 minutes")
                .unwrap();
        assert!(read > 0, "the e2e person script exited (see its nio.log)");
        serde_json::from_str(&answer).unwrap()
    }

    /// An encrypted room (from its creation) with `invite`d users.
    pub async fn create_encrypted_room(
        &mut self,
        name: &str,
        invite: &[&str],
        direct: bool,
    ) -> String {
        self.call(json!({"cmd": "create_room", "name": name, "invite": invite, "direct": direct}))
            .await["room_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn wait_joined(&mut self, room: &str, user: &str) {
        self.call(json!({"cmd": "wait_joined", "room_id": room, "user_id": user, "timeout": 60}))
            .await;
    }

    /// Sends an encrypted text that mentions `mentions`; its event id.
    pub async fn send(&mut self, room: &str, body: &str, mentions: &[&str]) -> String {
        self.call(json!({"cmd": "send", "room_id": room, "body": body, "mentions": mentions}))
            .await["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// As [`Person::send`], but the room key stays with the person until [`Person::release_keys`].
    pub async fn send_held(&mut self, room: &str, body: &str, mentions: &[&str]) -> String {
        self.call(json!({"cmd": "send_held", "room_id": room, "body": body, "mentions": mentions}))
            .await["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn release_keys(&mut self, room: &str) {
        self.call(json!({"cmd": "release_keys", "room_id": room}))
            .await;
    }

    /// Every message the client has seen in `room` (after a sync).
    pub async fn messages(&mut self, room: &str) -> Vec<Value> {
        self.call(json!({"cmd": "messages", "room_id": room, "timeout": 0}))
            .await["messages"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits (syncing, up to a minute) until the messages seen in `room` satisfy `done`; them.
    pub async fn wait_messages(
        &mut self,
        room: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let messages = self
                .call(json!({"cmd": "messages", "room_id": room, "timeout": 500}))
                .await["messages"]
                .as_array()
                .unwrap()
                .clone();
            if done(&messages) {
                return messages;
            }
            assert!(
                std::time::Instant::now() < until,
                "timed out waiting for {what}; seen: {messages:?}"
            );
        }
    }

    /// The first message from `sender` in `room` whose body contains `contains`.
    pub async fn wait_message(&mut self, room: &str, sender: &str, contains: &str) -> Value {
        self.call(
            json!({"cmd": "wait_message", "room_id": room, "sender": sender,
                         "contains": contains, "timeout": 60}),
        )
        .await["message"]
            .clone()
    }
}

impl Drop for Person {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
