//! The appservice core against a real Synapse and the real `crew` binary.

#[path = "support/crew.rs"]
mod crew;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/tools.rs"]
mod tools;

use std::time::Duration;

use crew::CrewEnv;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn manager_greets_admin_and_acknowledges_a_mention() {
    let env = CrewEnv::start().await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    // On first start the Manager opens a DM with the admin. The admin registered after crew
    // started, but the invite waits for them.
    let dm = tools::wait_for("the Manager's DM invite", WAIT, || async {
        admin.invites().await.into_iter().next()
    })
    .await;
    admin.join(&dm).await;
    let greeting = tools::wait_for("the greeting", WAIT, || async {
        admin.messages_from(&dm, &manager).await.into_iter().next()
    })
    .await;
    assert!(
        greeting["content"]["body"]
            .as_str()
            .unwrap()
            .contains("Manager")
    );
    assert!(greeting["content"]["m.mentions"]["user_ids"][0] == admin.user_id.as_str());

    // A group room (two people and the Manager): a mention gets an acknowledgement naming us.
    let bob = env.synapse.register_user("bob").await;
    let room = admin
        .create_room("project", &[&manager, &bob.user_id])
        .await;
    bob.join(&room).await;
    admin.wait_joined(&room, &manager).await;
    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "nobody is mentioned here", "m.mentions": {}}),
        )
        .await;
    let asked = admin
        .send_mention(&room, "are you there?", &[&manager])
        .await;
    let texts = || async {
        let all = admin.messages_from(&room, &manager).await;
        all.into_iter()
            .filter(|e| e["content"]["msgtype"] == "m.text")
            .collect::<Vec<_>>()
    };
    let ack = tools::wait_for("the acknowledgement", WAIT, || async {
        texts().await.into_iter().next()
    })
    .await;
    let body = ack["content"]["body"].as_str().unwrap();
    assert!(
        body.contains("admin"),
        "the acknowledgement names the sender: {body}"
    );
    assert_eq!(
        ack["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        asked.as_str()
    );
    // Only the mention was answered.
    assert_eq!(texts().await.len(), 1);
    // Without an LLM the Manager says once what to configure.
    let notices: Vec<Value> = admin
        .messages_from(&room, &manager)
        .await
        .into_iter()
        .filter(|e| e["content"]["msgtype"] == "m.notice")
        .collect();
    assert_eq!(notices.len(), 1);
    assert!(
        notices[0]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("gateway.routes")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_strangers_invite_is_declined_with_a_reason() {
    let env = CrewEnv::start().await;
    let stranger = env.synapse.register_user("stranger").await;
    let manager = env.manager_id();
    let room = stranger.create_room("spam", &[&manager]).await;
    let member = tools::wait_for("the Manager to decline", WAIT, || async {
        let member = stranger.membership(&room, &manager).await?;
        (member["membership"] == "leave").then_some(member)
    })
    .await;
    let reason = member["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("admins"), "decline says why: {member}");
}

#[path = "support/tuwunel_replay.rs"]
mod tuwunel_replay;

use serde_json::Value;
use synapse::TestUser;

/// An admin and a group room the Manager has joined.
async fn room_with_manager(env: &CrewEnv) -> (TestUser, String) {
    let admin = env.admin().await;
    let manager = env.manager_id();
    let room = admin.create_room("work", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    (admin, room)
}

/// A message event as a homeserver would push it, mentioning the Manager.
fn mention_event(room: &str, sender: &str, manager: &str, id: &str) -> Value {
    json!({
        "type": "m.room.message",
        "event_id": format!("$replayed-{id}"),
        "room_id": room,
        "sender": sender,
        "origin_server_ts": 1_700_000_000_000u64,
        "content": {
            "msgtype": "m.text",
            "body": format!("{manager} please look at {id}"),
            "m.mentions": { "user_ids": [manager] },
        },
    })
}

async fn put_transaction(env: &CrewEnv, txn: &str, events: &[Value]) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(format!(
            "{}/_matrix/app/v1/transactions/{txn}",
            env.appservice_url()
        ))
        .bearer_auth(env.hs_token())
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Sends a sentinel mention and waits for its acknowledgement: the pump handles events in
/// order, so every event sent before it has been handled too. Returns the Manager's messages.
async fn settle(env: &CrewEnv, admin: &TestUser, room: &str) -> Vec<Value> {
    let manager = env.manager_id();
    let sentinel = mention_event(
        room,
        &admin.user_id,
        &manager,
        &format!("sentinel-{}", rand_id()),
    );
    let sentinel_id = sentinel["event_id"].as_str().unwrap().to_owned();
    let (status, _) = put_transaction(env, &format!("sentinel-{}", rand_id()), &[sentinel]).await;
    assert_eq!(status, 200);
    tools::wait_for("the sentinel's acknowledgement", WAIT, || async {
        let acks = admin.messages_from(room, &manager).await;
        acks.iter()
            .any(|ack| {
                ack["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == sentinel_id.as_str()
            })
            .then_some(acks)
    })
    .await
}

fn replied_to(acks: &[Value]) -> Vec<String> {
    acks.iter()
        .filter_map(|ack| ack["content"]["m.relates_to"]["m.in_reply_to"]["event_id"].as_str())
        .map(str::to_owned)
        .collect()
}

fn rand_id() -> String {
    use rand::Rng;
    format!("{:012x}", rand::thread_rng().r#gen::<u64>() >> 16)
}

#[tokio::test]
async fn init_writes_a_valid_registration_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = |force: bool| {
        let mut command = std::process::Command::new(crew::crew_binary());
        command
            .args([
                "init",
                "--homeserver",
                "http://127.0.0.1:8008",
                "--server-name",
                "example.org",
            ])
            .args(["--admin", "@me:example.org", "--data-dir"])
            .arg(&data);
        if force {
            command.arg("--force");
        }
        command.output().unwrap()
    };
    assert!(init(false).status.success());
    let read = || -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(data.join("registration.yaml")).unwrap())
            .unwrap()
    };
    let registration = read();
    let as_token = registration["as_token"].as_str().unwrap().to_owned();
    let hs_token = registration["hs_token"].as_str().unwrap();
    assert!(
        as_token.len() >= 43 && hs_token.len() >= 43,
        "32 random bytes each"
    );
    assert_ne!(as_token, hs_token);
    assert_eq!(registration["rate_limited"], serde_yaml::Value::Bool(false));
    assert_eq!(registration["sender_localpart"].as_str(), Some("crew"));
    let namespace = &registration["namespaces"]["users"][0];
    assert_eq!(namespace["exclusive"], serde_yaml::Value::Bool(true));
    assert_eq!(
        namespace["regex"].as_str(),
        Some(r"^@crew_[a-z0-9._=/-]+:example\.org$")
    );
    assert!(
        std::fs::read_to_string(data.join("config.toml"))
            .unwrap()
            .contains("@me:example.org")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700, "the data directory is private");
        for file in ["config.toml", "registration.yaml"] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file} is private");
        }
    }

    let again = init(false);
    assert!(!again.status.success());
    let message = String::from_utf8_lossy(&again.stderr);
    assert!(
        message.contains("--force"),
        "refusal names the fix: {message}"
    );
    assert_eq!(
        read()["as_token"].as_str().unwrap(),
        as_token,
        "nothing was overwritten"
    );

    assert!(init(true).status.success());
    assert_ne!(
        read()["as_token"].as_str().unwrap(),
        as_token,
        "--force makes fresh tokens"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_appservice_api_answers_with_matrix_errors() {
    let env = CrewEnv::start().await;
    let http = reqwest::Client::new();
    let base = env.appservice_url();
    let token = env.hs_token();
    let txn = |n: &str| format!("{base}/_matrix/app/v1/transactions/{n}");
    let call = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (
            status,
            body["errcode"].as_str().unwrap_or("").to_owned(),
            body,
        )
    };
    let empty = json!({ "events": [] });

    let (status, code, _) = call(http.put(txn("a")).json(&empty)).await;
    assert_eq!((status, code.as_str()), (401, "M_UNAUTHORIZED"));
    let (status, code, _) = call(http.put(txn("b")).bearer_auth("wrong").json(&empty)).await;
    assert_eq!((status, code.as_str()), (403, "M_FORBIDDEN"));
    let (status, code, _) = call(
        http.put(format!("{}?access_token=wrong", txn("c")))
            .json(&empty),
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "M_FORBIDDEN"));
    // Both presented: both must match.
    let (status, code, _) = call(
        http.put(format!("{}?access_token=wrong", txn("d")))
            .bearer_auth(&token)
            .json(&empty),
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "M_FORBIDDEN"));
    let (status, _, body) = call(
        http.put(format!("{}?access_token={token}", txn("e")))
            .bearer_auth(&token)
            .json(&empty),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));
    let (status, _, body) = call(
        http.put(format!("{}?access_token={token}", txn("f")))
            .json(&empty),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({})),
        "legacy query parameter alone"
    );

    let (status, code, _) = call(
        http.get(format!("{base}/_matrix/app/v1/nope"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "M_UNRECOGNIZED"));
    let (status, _, _) = call(http.get(txn("g")).bearer_auth(&token)).await;
    assert_eq!(status, 405);
    let (status, code, _) = call(
        http.get(format!("{base}/_matrix/app/v1/users/%40nobody%3Acrew.test"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "M_NOT_FOUND"));
    let (status, _, body) = call(
        http.post(format!("{base}/_matrix/app/v1/ping"))
            .bearer_auth(&token)
            .json(&json!({})),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));

    // Bodies up to at least 32 MiB are accepted.
    let big = "x".repeat(60 * 1024);
    let events: Vec<Value> = (0..560)
        .map(|i| json!({"type": "m.room.message", "event_id": format!("$big{i}"), "room_id": "!nowhere:crew.test",
                        "sender": "@someone:crew.test", "content": {"msgtype": "m.text", "body": big}}))
        .collect();
    let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
    assert!(body.len() > 32 * 1024 * 1024);
    let (status, _, _) = call(http.put(txn("big")).bearer_auth(&token).body(body)).await;
    assert_eq!(status, 200);
}

/// Peak resident memory of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: usize = 60 * 1024 * 1024;
    const MIB: usize = 1024 * 1024;
    let env = CrewEnv::start().await;
    let pid = env.crew.as_ref().unwrap().pid();
    let before = peak_kib(pid);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", env.appservice_port))
        .await
        .unwrap();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/huge HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong-token\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // None of the 60 MiB is sent yet: the answer must come anyway.
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("crew answers before the body is sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("M_FORBIDDEN"), "{answer}");
    // The body finds nobody reading it; crew's memory stays flat.
    let chunk = vec![b' '; MIB];
    for _ in 0..BODY / MIB {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
    }
    drop(stream);
    let grown_mib = peak_kib(pid).saturating_sub(before) / 1024;
    assert!(grown_mib < 30, "crew's peak memory grew by {grown_mib} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_and_concurrent_transactions_are_processed_once() {
    let env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    let first = mention_event(&room, &admin.user_id, &manager, "one");
    let second = mention_event(&room, &admin.user_id, &manager, "two");
    // The same transaction twice, one after the other…
    for _ in 0..2 {
        assert_eq!(
            put_transaction(&env, "txn-1", std::slice::from_ref(&first))
                .await
                .0,
            200
        );
    }
    // …and five copies of another at the same moment.
    let copies = (0..5).map(|_| put_transaction(&env, "txn-2", std::slice::from_ref(&second)));
    for (status, _) in futures::future::join_all(copies).await {
        assert_eq!(status, 200);
    }
    // The same event again under a new transaction id is still a duplicate.
    assert_eq!(
        put_transaction(&env, "txn-3", std::slice::from_ref(&first))
            .await
            .0,
        200
    );

    let acks = settle(&env, &admin, &room).await;
    let replied = replied_to(&acks);
    for id in ["$replayed-one", "$replayed-two"] {
        assert_eq!(
            replied.iter().filter(|r| *r == id).count(),
            1,
            "{id} answered once: {replied:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_event_does_not_stop_the_others() {
    let env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    let events = vec![
        mention_event(&room, &admin.user_id, &manager, "before"),
        json!(42),
        json!({"type": "m.room.message", "content": {"body": "no event id"}}),
        json!({"type": "m.room.message", "event_id": "$bad-content", "room_id": room, "sender": admin.user_id, "content": "not an object"}),
        json!({"type": "m.room.message", "event_id": "$bad-sender", "room_id": room, "sender": "not a user id", "content": {}}),
        mention_event(&room, &admin.user_id, &manager, "after"),
    ];
    let (status, body) = put_transaction(&env, "mixed", &events).await;
    assert_eq!((status, body), (200, json!({})));
    let replied = replied_to(&settle(&env, &admin, &room).await);
    assert!(
        replied.contains(&"$replayed-before".to_owned()),
        "{replied:?}"
    );
    assert!(
        replied.contains(&"$replayed-after".to_owned()),
        "{replied:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_the_answer_loses_nothing_and_answers_once() {
    let mut env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    // Fewer than the per-agent wake rate limit (20 a minute), so that every one must be answered.
    let events: Vec<Value> = (0..12)
        .map(|i| mention_event(&room, &admin.user_id, &manager, &format!("k{i}")))
        .collect();
    let (status, _) = put_transaction(&env, "before-the-crash", &events).await;
    assert_eq!(status, 200);
    env.kill_crew();
    env.start_crew().await;
    let replied = replied_to(&settle(&env, &admin, &room).await);
    for i in 0..12 {
        let id = format!("$replayed-k{i}");
        assert_eq!(
            replied.iter().filter(|r| **r == id).count(),
            1,
            "{id} answered exactly once: {replied:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tuwunel_style_backlog_arrives_when_crew_nudges_after_a_restart() {
    let mut env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    // crew now talks to the homeserver through the Tuwunel-style relay.
    let replay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    replay
        .push(vec![mention_event(
            &room,
            &admin.user_id,
            &manager,
            "while-down",
        )])
        .await;
    assert_eq!(
        replay.backlog_len(),
        1,
        "delivery failed while crew was down and is held, not retried"
    );
    env.start_crew().await;
    // Pings release nothing on Tuwunel: only crew's own start-up event (the nudge) does.
    let acks = tools::wait_for("the held-back event's acknowledgement", WAIT, || async {
        let acks = admin.messages_from(&room, &manager).await;
        replied_to(&acks)
            .contains(&"$replayed-while-down".to_owned())
            .then_some(acks)
    })
    .await;
    assert_eq!(replay.backlog_len(), 0);
    let deliveries = replay.deliveries();
    assert!(
        deliveries.iter().any(|(_, status)| *status == Some(200)),
        "{deliveries:?}"
    );
    // Tuwunel resends the same transaction id with a later event; it must not be answered twice.
    replay
        .push(vec![mention_event(
            &room,
            &admin.user_id,
            &manager,
            "while-down",
        )])
        .await;
    let replied = replied_to(&settle(&env, &admin, &room).await);
    assert_eq!(
        replied
            .iter()
            .filter(|r| *r == "$replayed-while-down")
            .count(),
        1
    );
    drop(acks);
}

/// Runs `crew serve` with extra environment and returns (exit success, everything it logged),
/// or panics if it does not exit within the deadline.
async fn serve_until_exit(env: &CrewEnv, extra: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(crew::crew_binary());
    command
        .arg("serve")
        .arg("--config")
        .arg(env.config_path())
        .env("CREW_HOMESERVER__URL", &env.synapse.url)
        .env("CREW_HOMESERVER__STARTUP_WAIT_SECS", "1")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for (key, value) in extra {
        command.env(key, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("crew serve exits on a failed start-up check")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_says_what_is_wrong() {
    let mut env = CrewEnv::start().await;
    env.kill_crew();

    let closed = format!("http://127.0.0.1:{}", tools::free_port());
    let (ok, log) = serve_until_exit(&env, &[("CREW_HOMESERVER__URL", &closed)]).await;
    assert!(!ok);
    assert!(
        log.contains("no Matrix homeserver answers at") && log.contains("homeserver.url"),
        "{log}"
    );

    let wrong = "w".repeat(43);
    let (ok, log) = serve_until_exit(&env, &[("CREW_AS_TOKEN", &wrong)]).await;
    assert!(!ok);
    assert!(
        log.contains("does not accept crew's as_token") && log.contains("docs/homeservers.md"),
        "{log}"
    );
    assert!(!log.contains(&wrong), "the rejected token is not printed");

    // The homeserver cannot reach crew: crew listens somewhere else than the registration says.
    let elsewhere = format!("127.0.0.1:{}", tools::free_port());
    let log_path = env.data_dir.join("unreachable.log");
    let mut crew = tokio::process::Command::new(crew::crew_binary())
        .arg("serve")
        .arg("--config")
        .arg(env.config_path())
        .env("CREW_HOMESERVER__URL", &env.synapse.url)
        .env("CREW_APPSERVICE__BIND", &elsewhere)
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tools::wait_for("the ping failure to be explained", WAIT, || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("cannot reach crew at").then_some(())
    })
    .await;
    crew.kill().await.unwrap();
}

/// `crew init` into a fresh directory, without a homeserver: for start-up checks that come first.
fn init_only() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let output = std::process::Command::new(crew::crew_binary())
        .args(["init", "--homeserver", "http://127.0.0.1:1"])
        .args(["--server-name", "crew.test", "--admin", "@me:crew.test"])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success(), "crew init: {output:?}");
    (dir, data)
}

/// `crew serve` with `vars`: (exit success, stderr). It must exit by itself.
async fn serve_with(config: &std::path::Path, vars: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(crew::crew_binary());
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("CREW_HOMESERVER__STARTUP_WAIT_SECS", "1")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for (key, value) in vars {
        command.env(key, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("crew serve exits")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn empty_secrets_and_a_public_admin_api_refuse_to_start() {
    let (dir, data) = init_only();
    let config = data.join("config.toml");
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.display().to_string();
    for (name, value) in [
        ("CREW_HS_TOKEN_FILE", empty.as_str()),
        ("CREW_AS_TOKEN_FILE", empty.as_str()),
        ("CREW_HS_TOKEN_FILE", ""),
        ("CREW_HS_TOKEN", "   "),
    ] {
        let (ok, log) = serve_with(&config, &[(name, value)]).await;
        assert!(!ok, "{name}={value:?} started");
        assert!(log.contains(name), "{name}={value:?}: {log}");
    }
    let (ok, log) = serve_with(&config, &[("CREW_ADMIN_API__BIND", "0.0.0.0:19002")]).await;
    assert!(!ok);
    assert!(log.contains("admin_api.allow_non_loopback"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_reach_the_logs() {
    let env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    settle(&env, &admin, &room).await;
    let registration = env.registration();
    let logs = env.all_logs();
    assert!(logs.contains("crew is ready"));
    for key in ["as_token", "hs_token"] {
        let token = registration[key].as_str().unwrap();
        assert!(!logs.contains(token), "{key} leaked into the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_are_created_once_and_join_when_an_admin_invites_them() {
    let env = CrewEnv::start().await;
    let (ok, out) = env.cli(&["workers", "add", "Alice", "--role", "frontend"]);
    assert!(ok && out.contains("created alice"), "{out}");
    let (ok, out) = env.cli(&["workers", "add", "alice"]);
    assert!(ok && out.contains("exists: alice"), "{out}");
    let (ok, out) = env.cli(&["workers", "list"]);
    assert!(
        ok && out.contains("@crew_alice:crew.test") && out.contains("frontend"),
        "{out}"
    );
    let (ok, out) = env.cli(&["workers", "add", "../etc"]);
    assert!(!ok && out.contains("not a valid worker name"), "{out}");

    let admin = env.admin().await;
    let (status, profile) = admin
        .request(
            reqwest::Method::GET,
            "/_matrix/client/v3/profile/@crew_alice:crew.test/displayname",
            None,
        )
        .await;
    assert_eq!(
        (status, profile["displayname"].as_str()),
        (200, Some("Alice"))
    );
    let room = admin
        .create_room("frontend", &["@crew_alice:crew.test"])
        .await;
    admin.wait_joined(&room, "@crew_alice:crew.test").await;
}

#[tokio::test]
async fn admin_commands_say_when_crew_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = tools::free_port();
    let output = std::process::Command::new(crew::crew_binary())
        .args([
            "init",
            "--homeserver",
            "http://127.0.0.1:1",
            "--server-name",
            "x.test",
            "--admin",
            "@a:x.test",
        ])
        .args(["--admin-bind", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success());
    std::fs::write(data.join("admin.token"), "t").unwrap();
    let output = std::process::Command::new(crew::crew_binary())
        .arg("--config")
        .arg(data.join("config.toml"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("crew serve is not running"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_runs_in_crew_serve_and_tokens_survive_a_restart() {
    let mut env = CrewEnv::start().await;
    let (ok, out) = env.cli(&["gateway", "consumers", "add", "alice"]);
    assert!(ok, "{out}");
    let token = out
        .lines()
        .find_map(|line| line.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    // The gateway binds any free port, so its address is read again after each start.
    let code = |port: u16, token: String| {
        let gateway = format!("http://127.0.0.1:{port}/no/such/route");
        async move {
            let response = reqwest::Client::new()
                .get(&gateway)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body["error"]["code"].as_str().unwrap().to_owned())
        }
    };
    // The token is accepted (the path is what is wrong); a made-up one is not.
    assert_eq!(
        code(env.gateway_port, token.clone()).await,
        (404, "unknown_route".to_owned())
    );
    assert_eq!(
        code(env.gateway_port, "made-up".into()).await,
        (401, "invalid_token".to_owned())
    );
    env.kill_crew();
    env.start_crew().await;
    assert_eq!(
        code(env.gateway_port, token.clone()).await,
        (404, "unknown_route".to_owned()),
        "still valid after a restart"
    );
    let (ok, out) = env.cli(&["gateway", "consumers", "revoke", "alice"]);
    assert!(ok, "{out}");
    assert_eq!(
        code(env.gateway_port, token.clone()).await,
        (401, "token_revoked".to_owned())
    );
    assert!(
        !env.all_logs().contains(&token),
        "the consumer token is never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_go_in_and_out_and_are_shared_by_link_or_upload() {
    // Signed links are served by crew next to the appservice API.
    let env = CrewEnv::start_with(|config| {
        let mut text = std::fs::read_to_string(config).unwrap();
        let bind = text
            .lines()
            .find_map(|line| line.strip_prefix("bind = \"127.0.0.1:"))
            .unwrap()
            .trim_end_matches('"')
            .to_owned();
        text.push_str(&format!(
            "\n[storage]\npublic_base_url = \"http://127.0.0.1:{bind}\"\n"
        ));
        std::fs::write(config, text).unwrap();
    })
    .await;
    let local = env.root.path().join("spec.md");
    let spec = "# Login page\n\nBuild it.\n";
    std::fs::write(&local, spec).unwrap();
    let (ok, out) = env.cli(&["files", "put", "tasks/t1/spec.md", local.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["files", "ls", "tasks/"]);
    assert!(ok && out.contains("tasks/t1/spec.md"), "{out}");
    let (ok, out) = env.cli(&["files", "get", "tasks/t1/spec.md"]);
    assert!(ok && out.contains("Build it."), "{out}");
    let (ok, out) = env.cli(&["files", "get", "../etc/passwd"]);
    assert!(!ok && out.contains(".."), "{out}");
    // The embedded default keeps files under the data directory.
    assert!(env.data_dir.join("files/tasks/t1/spec.md").exists());

    // Shared in a room: a reference with a signed link that opens the file.
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    let (ok, out) = env.cli(&["share", "tasks/t1/spec.md", "--room", &room]);
    assert!(ok, "{out}");
    let reference = tools::wait_for("the file reference", WAIT, || async {
        admin
            .messages_from(&room, &manager)
            .await
            .into_iter()
            .find(|e| {
                e["content"]["body"]
                    .as_str()
                    .unwrap_or("")
                    .contains("tasks/t1/spec.md")
                    && e["content"]["msgtype"] == "m.text"
            })
    })
    .await;
    let body = reference["content"]["body"].as_str().unwrap();
    let link = body
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '<' || c == '>')
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no link in {body}"));
    let fetched = reqwest::get(link).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.text().await.unwrap(), spec);
    let tampered = link.replace("spec.md", "plan.md");
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

    // Or uploaded as m.file, which any client shows as a download.
    let (ok, out) = env.cli(&["share", "tasks/t1/spec.md", "--room", &room, "--upload"]);
    assert!(ok, "{out}");
    let file = tools::wait_for("the m.file", WAIT, || async {
        admin
            .messages_from(&room, &manager)
            .await
            .into_iter()
            .find(|e| e["content"]["msgtype"] == "m.file")
    })
    .await;
    let mxc = file["content"]["url"].as_str().unwrap();
    let media = mxc.strip_prefix("mxc://").unwrap();
    let response = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v1/media/download/{media}",
            env.synapse.url
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn created_rooms_keep_the_creator_in_power_in_every_room_version() {
    use matrix_crew::matrix::{CreateRoom, MatrixClient};
    let env = CrewEnv::start().await;
    let admin = env.admin().await;
    let registration = env.registration();
    let client = MatrixClient::new(
        env.homeserver_url.parse().unwrap(),
        matrix_crew::secret::Secret::new(registration["as_token"].as_str().unwrap()),
    );
    let manager = ruma::UserId::parse(env.manager_id()).unwrap();
    let admin_id = ruma::UserId::parse(admin.user_id.as_str()).unwrap();
    let mut power_levels = std::collections::BTreeMap::new();
    power_levels.insert(admin_id.clone(), 100);
    // v10 and v11 (Tuwunel's default) need the creator listed; v12 (Synapse's default)
    // refuses it. The default version goes through /capabilities.
    for version in [Some("10"), Some("11"), Some("12"), None] {
        let room = client
            .create_room_in(
                &manager,
                &CreateRoom {
                    name: Some(format!("v{version:?}")),
                    power_levels: power_levels.clone(),
                    ..CreateRoom::default()
                },
                version,
            )
            .await
            .unwrap_or_else(|error| panic!("createRoom in version {version:?}: {error}"));
        let state = client.room_state(&manager, &room).await.unwrap();
        let content = |kind: &str| {
            state
                .iter()
                .find(|event| event["type"] == kind)
                .map(|event| event["content"].clone())
                .unwrap_or_else(|| panic!("no {kind} in {room}"))
        };
        let created_in = content("m.room.create")["room_version"]
            .as_str()
            .unwrap_or("1")
            .to_owned();
        if let Some(version) = version {
            assert_eq!(created_in, version);
        }
        let users = content("m.room.power_levels")["users"].clone();
        assert_eq!(users[admin_id.as_str()], 100, "{users}");
        if matrix_crew::matrix::creators_are_privileged(&created_in) {
            assert!(
                users.get(manager.as_str()).is_none(),
                "v{created_in}: {users}"
            );
        } else {
            assert_eq!(
                users[manager.as_str()],
                100,
                "v{created_in}: the creator keeps its power: {users}"
            );
        }
    }
}

/// The event id and membership of `user` in `room`, as `admin` sees the room's state.
async fn membership_event(admin: &TestUser, room: &str, user: &str) -> (String, String) {
    let (status, state) = admin
        .request(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", synapse::enc(room)),
            None,
        )
        .await;
    assert_eq!(status, 200, "{state}");
    let event = state
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == user)
        .unwrap_or_else(|| panic!("no membership of {user} in {room}: {state}"))
        .clone();
    (
        event["event_id"].as_str().unwrap().to_owned(),
        event["content"]["membership"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_the_homeserver_fails_is_retried_and_one_it_refuses_is_explained() {
    let mut env = CrewEnv::start().await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let relay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    env.start_crew().await;

    // More 500s than one homeserver call retries by itself: only the outbox's own retry (with
    // backoff, after the pump has moved on) gets the Manager in.
    relay.fail_joins(500, 8);
    let room = admin.create_room("flaky", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    assert!(relay.joins() >= 9, "{} join attempts", relay.joins());

    // A refusal is not retried for ever: it is recorded under the invite, for `!crew why`.
    relay.fail_joins(403, 1_000);
    let refused = admin.create_room("refused", &[&manager]).await;
    let (invite, _) = membership_event(&admin, &refused, &manager).await;
    let failures = tools::wait_for(
        "the refused join in the decision's record",
        WAIT,
        || async {
            let kept = env
                .admin_api(&format!("/dispatch/why/{}", synapse::enc(&invite)))
                .await?;
            let failures = kept["failures"].as_array()?.clone();
            (!failures.is_empty()).then_some(failures)
        },
    )
    .await;
    assert!(
        failures[0]["reason"]
            .as_str()
            .unwrap()
            .contains("403 M_FORBIDDEN"),
        "{failures:?}"
    );
    assert!(failures[0]["what"].as_str().unwrap().contains("joining"));
    assert_eq!(relay.joins(), 10, "a refusal is asked once, not retried");
    let (_, membership) = membership_event(&admin, &refused, &manager).await;
    assert_eq!(membership, "invite");
    // The pump did not wait on the refusals: the first room is answered meanwhile.
    let asked = admin.send_mention(&room, "still there?", &[&manager]).await;
    tools::wait_for("the Manager's answer", WAIT, || async {
        admin
            .messages_from(&room, &manager)
            .await
            .into_iter()
            .find(|m| m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_the_homeserver_fails_to_take_is_sent_later_once() {
    let mut env = CrewEnv::start().await;
    let (admin, room) = room_with_manager(&env).await;
    let manager = env.manager_id();
    let relay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    env.start_crew().await;
    // More 500s than the first call retries by itself (6: the one-time note that no LLM is
    // configured), then three for the answer, which the outbox sends in one attempt at a time
    // (looking first whether an earlier one was taken). The turn is over long before the
    // homeserver takes its answer, which the outbox keeps and re-sends.
    relay.fail_sends(&room, 500, 9);
    let asked = admin
        .send_mention(&room, "are you there?", &[&manager])
        .await;
    let replies = |asked: String| {
        let admin = admin.clone();
        let room = room.clone();
        let manager = manager.clone();
        async move {
            admin
                .messages_from(&room, &manager)
                .await
                .into_iter()
                .filter(|m| {
                    m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str()
                })
                .count()
        }
    };
    tools::wait_for(
        "the answer, after the homeserver recovered",
        WAIT,
        || async { (replies(asked.clone()).await > 0).then_some(()) },
    )
    .await;
    // Settled: a later mention is answered, and the first one still once.
    let later = admin.send_mention(&room, "and now?", &[&manager]).await;
    tools::wait_for("the second answer", WAIT, || async {
        (replies(later.clone()).await > 0).then_some(())
    })
    .await;
    assert_eq!(replies(asked).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tuwunel_delivers_the_managers_invite_only_with_the_manager_in_the_users_namespace() {
    let mut env = CrewEnv::start().await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let invite = |id: &str| {
        json!({"type": "m.room.member", "event_id": format!("$invite-{id}"),
               "room_id": format!("!tuwunel-{id}:crew.test"), "sender": admin.user_id,
               "state_key": manager, "origin_server_ts": 1_700_000_000_000u64,
               "content": {"membership": "invite"}})
    };
    // The registration `crew init` writes lists the Manager: its invite is delivered.
    let relay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    env.start_crew().await;
    relay.push(vec![invite("listed")]).await;
    assert_eq!(relay.undelivered_invites(), 0);
    assert!(
        relay
            .deliveries()
            .iter()
            .any(|(_, status)| *status == Some(200)),
        "{:?}",
        relay.deliveries()
    );
    assert!(
        !env.all_logs().contains("leaves out the Manager"),
        "no advice for a registration that lists the Manager"
    );

    // An older registration without the Manager in its users namespace: Tuwunel drops the
    // invite, and crew's start-up says what to add.
    let path = env.data_dir.join("registration.yaml");
    let mut registration = env.registration();
    let users = registration["namespaces"]["users"]
        .as_sequence_mut()
        .unwrap();
    users.retain(|namespace| {
        !regex::Regex::new(namespace["regex"].as_str().unwrap())
            .unwrap()
            .is_match(&manager)
    });
    assert_eq!(users.len(), 1, "the Workers' namespace stays");
    std::fs::write(&path, serde_yaml::to_string(&registration).unwrap()).unwrap();
    let relay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    env.start_crew().await;
    relay.push(vec![invite("unlisted")]).await;
    assert_eq!(relay.undelivered_invites(), 1);
    assert!(relay.deliveries().is_empty(), "{:?}", relay.deliveries());
    let log = env.crew.as_ref().unwrap().log_text();
    assert!(
        log.contains("leaves out the Manager @crew:crew.test")
            && log.contains("regex: '^@crew:crew\\.test$'"),
        "{log}"
    );
}
