//! Wake only on mention, against a real Synapse and the real `crew` binary: who wakes, replies,
//! the loop budget, encrypted rooms, the mention hint, and a wake surviving `kill -9`.

#[path = "support/crew.rs"]
mod crew;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/tools.rs"]
mod tools;
#[path = "support/tuwunel_replay.rs"]
mod tuwunel_replay;

use std::time::Duration;

use crew::CrewEnv;
use serde_json::{Value, json};
use synapse::TestUser;

const WAIT: Duration = Duration::from_secs(30);
const ALICE: &str = "@crew_alice:crew.test";

/// The dispatcher's kept decision for an event, once it has been made.
async fn why(env: &CrewEnv, event_id: &str) -> Value {
    let path = format!("/dispatch/why/{}", synapse::enc(event_id));
    tools::wait_for("the dispatcher's decision", WAIT, || env.admin_api(&path)).await["decision"]
        .clone()
}

fn woken(decision: &Value) -> Vec<String> {
    decision["wakes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|wake| wake["agent"].as_str().unwrap().to_owned())
        .collect()
}

fn skip_reason(decision: &Value, agent: &str) -> String {
    decision["skips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|skip| skip["agent"] == agent)
        .map(|skip| skip["reason"].as_str().unwrap().to_owned())
        .or_else(|| decision["ignored"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn add_worker(env: &CrewEnv, name: &str) {
    let (ok, out) = env.cli(&["workers", "add", name]);
    assert!(ok, "{out}");
}

/// A group room with the admin, a second person, the Manager and Worker alice.
async fn team_room(env: &CrewEnv) -> (TestUser, String) {
    add_worker(env, "alice");
    let admin = env.admin().await;
    let bob = env.synapse.register_user("bob").await;
    let manager = env.manager_id();
    let room = admin
        .create_room("team", &[&manager, ALICE, &bob.user_id])
        .await;
    bob.join(&room).await;
    admin.wait_joined(&room, &manager).await;
    admin.wait_joined(&room, ALICE).await;
    (admin, room)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_wakes_exactly_the_agents_it_is_for() {
    let env = CrewEnv::start().await;
    let (admin, room) = team_room(&env).await;
    let manager = env.manager_id();

    let for_alice = admin
        .send_mention(&room, "please build the login page", &[ALICE])
        .await;
    let decision = why(&env, &for_alice).await;
    assert_eq!(woken(&decision), [ALICE]);
    assert_eq!(skip_reason(&decision, &manager), "no_mention");

    let for_nobody = admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "lunch at noon?", "m.mentions": {}}),
        )
        .await;
    let decision = why(&env, &for_nobody).await;
    assert!(woken(&decision).is_empty(), "{decision}");

    // Quoting a message that mentioned alice (an older client, no m.mentions) wakes nobody.
    let quote = admin
        .send(
            &room,
            json!({"msgtype": "m.text",
                   "body": format!("> <@admin:crew.test> {ALICE} please build the login page\n\nnice"),
                   "m.relates_to": {"m.in_reply_to": {"event_id": for_alice}}}),
        )
        .await;
    let decision = why(&env, &quote).await;
    assert!(woken(&decision).is_empty(), "{decision}");

    // alice answered the first message; a reply to her answer wakes her.
    let answer = tools::wait_for("alice's answer", WAIT, || async {
        let said = admin.messages_from(&room, ALICE).await;
        said.into_iter()
            .find(|e| e["content"]["msgtype"] == "m.text")
    })
    .await;
    assert!(
        admin.messages_from(&room, &manager).await.is_empty(),
        "the Manager said nothing"
    );
    let answer_id = answer["event_id"].as_str().unwrap();
    let reply = admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "thanks", "m.mentions": {},
                   "m.relates_to": {"m.in_reply_to": {"event_id": answer_id}}}),
        )
        .await;
    let decision = why(&env, &reply).await;
    assert_eq!(woken(&decision), [ALICE]);
    assert_eq!(decision["wakes"][0]["reasons"], json!(["reply"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_pinging_each_other_stop_at_the_depth_budget() {
    let env = CrewEnv::start().await;
    let (admin, room) = team_room(&env).await;
    let manager = env.manager_id();
    // Mentioning both makes each acknowledgement loop the other in: a ping-pong.
    admin
        .send_mention(
            &room,
            "you two, sort it out between you",
            &[&manager, ALICE],
        )
        .await;
    let notice = tools::wait_for("the loop-stopped notice", WAIT, || async {
        admin.messages(&room).await.into_iter().find(|event| {
            event["content"]["msgtype"] == "m.notice"
                && event["content"]["body"]
                    .as_str()
                    .unwrap_or("")
                    .contains("stopped waking")
        })
    })
    .await;
    assert!(
        notice["content"]["body"]
            .as_str()
            .unwrap()
            .contains("limit is 4")
    );
    // The chain ran to depth 4 and no further: every agent message carries its depth.
    let agent_messages: Vec<Value> = admin
        .messages(&room)
        .await
        .into_iter()
        .filter(|e| {
            (e["sender"] == manager.as_str() || e["sender"] == ALICE)
                && e["content"]["msgtype"] == "m.text"
        })
        .collect();
    let deepest = agent_messages
        .iter()
        .filter_map(|e| e["content"]["org.matrix-crew.wake_depth"].as_u64())
        .max()
        .unwrap();
    assert_eq!(
        deepest, 5,
        "answers to depth-4 wakes carry depth 5 and wake nobody"
    );
    assert!(
        agent_messages.len() <= 10,
        "{} agent messages",
        agent_messages.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wake_pending_at_kill_runs_once_after_restart() {
    let mut env = CrewEnv::start().await;
    let (admin, room) = team_room(&env).await;
    let relay = tuwunel_replay::TuwunelReplay::between(&mut env).await;
    env.start_crew().await;
    relay.hold_sends();
    let asked = admin.send_mention(&room, "are you there?", &[ALICE]).await;
    // alice's turn is running: its answer is on its way, held by the homeserver.
    tools::wait_for("alice's answer to be in flight", WAIT, || async {
        (relay.held() > 0).then_some(())
    })
    .await;
    env.kill_crew();
    relay.release_sends();
    env.start_crew().await;
    tools::wait_for("alice's answer after the restart", WAIT, || async {
        (!admin.messages_from(&room, ALICE).await.is_empty()).then_some(())
    })
    .await;
    // A later mention, answered, proves the queue moved on; the first was answered once.
    admin.send_mention(&room, "and now?", &[ALICE]).await;
    let answers = tools::wait_for("the second answer", WAIT, || async {
        let now = admin.messages_from(&room, ALICE).await;
        (now.len() >= 2).then_some(now)
    })
    .await;
    let to_first = answers
        .iter()
        .filter(|a| a["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str())
        .count();
    assert_eq!(to_first, 1, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_rooms_and_missed_mentions_get_one_notice_each() {
    // With encryption off, an encrypted room gets the notice and the offer of a clear room.
    let env = CrewEnv::start_with(|config| {
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str("\n[encryption]\nenabled = false\n");
        std::fs::write(config, text).unwrap();
    })
    .await;
    let (admin, room) = team_room(&env).await;
    let manager = env.manager_id();

    // Named but not mentioned: one hint, once.
    let first = admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "alice can you look at this", "m.mentions": {}}),
        )
        .await;
    let decision = why(&env, &first).await;
    assert!(woken(&decision).is_empty());
    let hint = admin
        .wait_for_message(&room, ALICE, "I only wake up when")
        .await;
    assert!(
        hint["content"]["body"]
            .as_str()
            .unwrap()
            .contains("mentioned")
    );
    let second = admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "alice??", "m.mentions": {}}),
        )
        .await;
    why(&env, &second).await;
    let sentinel = admin.send_mention(&room, "ping", &[ALICE]).await;
    why(&env, &sentinel).await;
    tools::wait_for("alice's answer to the mention", WAIT, || async {
        admin
            .messages_from(&room, ALICE)
            .await
            .into_iter()
            .find(|e| e["content"]["msgtype"] == "m.text")
    })
    .await;
    let hints = admin
        .messages_from(&room, ALICE)
        .await
        .into_iter()
        .filter(|e| {
            e["content"]["body"]
                .as_str()
                .unwrap_or("")
                .contains("I only wake up when")
        })
        .count();
    assert_eq!(hints, 1);

    // An encrypted room: the Manager says once that it cannot read it and opens another room.
    let (_, created) = admin
        .request(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(json!({"preset": "private_chat", "invite": [manager],
                        "initial_state": [{"type": "m.room.encryption", "state_key": "",
                                           "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]})),
        )
        .await;
    let secret_room = created["room_id"].as_str().unwrap().to_owned();
    admin.wait_joined(&secret_room, &manager).await;
    let ciphertext = json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEnAcool", "sender_key": "k", "session_id": "s", "device_id": "D"});
    for _ in 0..2 {
        let (status, _) = admin
            .request(
                reqwest::Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.encrypted/t{}",
                    synapse::enc(&secret_room),
                    rand_id()
                ),
                Some(ciphertext.clone()),
            )
            .await;
        assert_eq!(status, 200);
    }
    let notice = admin.wait_for_notice(&secret_room, &manager).await;
    assert!(
        notice["content"]["body"]
            .as_str()
            .unwrap()
            .contains("encrypted")
    );
    tools::wait_for("the invite to an unencrypted room", WAIT, || async {
        (!admin.invites().await.is_empty()).then_some(())
    })
    .await;
    let sentinel = admin.send_mention(&room, "still there?", &[&manager]).await;
    why(&env, &sentinel).await;
    tools::wait_for("the Manager's answer", WAIT, || async {
        admin
            .messages_from(&room, &manager)
            .await
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(
        admin.messages_from(&secret_room, &manager).await.len(),
        1,
        "said once"
    );
}

fn rand_id() -> String {
    use rand::Rng;
    format!("{:012x}", rand::thread_rng().r#gen::<u64>() >> 16)
}

/// The Manager's answer (a notice in reply) to a command event.
async fn command_answer(
    admin: &TestUser,
    room: &str,
    manager: &str,
    command_event: &str,
) -> String {
    tools::wait_for("the command's answer", WAIT, || async {
        admin
            .messages_from(room, manager)
            .await
            .into_iter()
            .find_map(|e| {
                (e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == command_event)
                    .then(|| e["content"]["body"].as_str().unwrap().to_owned())
            })
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn crew_commands_work_without_an_llm_and_changes_are_for_admins() {
    // bob2 may talk to the agents (only such people get answers), but is not an admin.
    let env = CrewEnv::start_with(|config| {
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str("\n[invites]\nallow_users = [\"@bob2:crew.test\"]\n");
        std::fs::write(config, text).unwrap();
    })
    .await;
    let (admin, room) = team_room(&env).await;
    let manager = env.manager_id();
    let bob = env.synapse.register_user("bob2").await;
    admin.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let text = |body: &str| json!({"msgtype": "m.text", "body": body, "m.mentions": {}});

    let asked = admin.send(&room, text("!crew help")).await;
    assert!(
        command_answer(&admin, &room, &manager, &asked)
            .await
            .contains("!crew why")
    );
    let asked = admin.send(&room, text("!crew workers")).await;
    let answer = command_answer(&admin, &room, &manager, &asked).await;
    assert!(
        answer.contains("@crew_alice:crew.test") && answer.contains("idle"),
        "{answer}"
    );

    let asked = bob.send(&room, text("!crew stop alice")).await;
    assert!(
        command_answer(&admin, &room, &manager, &asked)
            .await
            .contains("only the admins")
    );
    let asked = admin.send(&room, text("!crew stop alice")).await;
    assert!(
        command_answer(&admin, &room, &manager, &asked)
            .await
            .contains("Stopped Alice")
    );
    // A stopped Worker wakes for nothing.
    let mention = admin.send_mention(&room, "are you there?", &[ALICE]).await;
    let decision = why(&env, &mention).await;
    assert!(woken(&decision).is_empty(), "{decision}");
    let asked = admin
        .send(&room, text(&format!("!crew why {mention}")))
        .await;
    let answer = command_answer(&admin, &room, &manager, &asked).await;
    assert!(
        answer.contains("did not wake") || answer.contains("No agent"),
        "{answer}"
    );
    let asked = admin.send(&room, text("!crew start alice")).await;
    assert!(
        command_answer(&admin, &room, &manager, &asked)
            .await
            .contains("Started Alice")
    );
    let mention = admin.send_mention(&room, "and now?", &[ALICE]).await;
    assert_eq!(woken(&why(&env, &mention).await), [ALICE]);

    // Removing a Worker revokes its gateway token and takes it out of its rooms.
    let rotated = std::process::Command::new(crew::crew_binary())
        .arg("--config")
        .arg(env.config_path())
        .args(["gateway", "consumers", "rotate", "crew_alice"])
        .output()
        .unwrap();
    let rotated = String::from_utf8_lossy(&rotated.stdout).into_owned();
    let token = rotated
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    let gateway = format!("http://127.0.0.1:{}/llm/chat/completions", env.gateway_port);
    let status = || async {
        let response = reqwest::Client::new()
            .post(&gateway)
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (
            status,
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    assert_ne!(
        status().await.0,
        401,
        "alice's token works before the removal"
    );
    let asked = admin.send(&room, text("!crew remove alice")).await;
    assert!(
        command_answer(&admin, &room, &manager, &asked)
            .await
            .contains("Removed Alice")
    );
    assert_eq!(status().await, (401, "token_revoked".to_owned()));
    let member = admin.membership(&room, ALICE).await.unwrap();
    assert_eq!(member["membership"], "leave");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyword_naming_a_stopped_worker_keeps_the_others_waking_and_crew_restarting() {
    const CAROL: &str = "@crew_carol:crew.test";
    let mut env = CrewEnv::start().await;
    let (admin, room) = team_room(&env).await;
    let manager = env.manager_id();
    // The operator names alice in a keyword, then restarts crew.
    env.kill_crew();
    let mut config = std::fs::read_to_string(env.config_path()).unwrap();
    config.push_str("\n[dispatch.keywords]\ncrew_alice = [\"frontend\"]\n");
    std::fs::write(env.config_path(), config).unwrap();
    env.start_crew().await;

    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "!crew stop alice"}),
        )
        .await;
    admin
        .wait_for_message(&room, &manager, "Stopped Alice")
        .await;
    // A Worker created afterwards changes the roster: the reload must accept the stopped alice.
    add_worker(&env, "carol");
    admin.invite(&room, CAROL).await;
    admin.wait_joined(&room, CAROL).await;
    let asked = admin
        .send_mention(&room, "carol, are you there?", &[CAROL])
        .await;
    tools::wait_for("carol's answer", WAIT, || async {
        admin
            .messages_from(&room, CAROL)
            .await
            .into_iter()
            .find(|m| m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str())
    })
    .await;
    // The keyword wakes nobody now, and a restart with it in the config works.
    let keyword = admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "who does frontend?", "m.mentions": {}}),
        )
        .await;
    assert!(woken(&why(&env, &keyword).await).is_empty());
    env.kill_crew();
    env.start_crew().await;
    let again = admin
        .send_mention(&room, "carol, still there?", &[CAROL])
        .await;
    tools::wait_for("carol's answer after the restart", WAIT, || async {
        admin
            .messages_from(&room, CAROL)
            .await
            .into_iter()
            .find(|m| m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == again.as_str())
    })
    .await;
}
