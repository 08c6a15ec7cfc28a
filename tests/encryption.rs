//! Encrypted rooms end to end: the real `crew` binary, a real Synapse, and a person whose client
//! encrypts (matrix-nio with its E2E extra, `support/e2e_person.py`). The LLM is the scripted one.
//!
//! What must hold: agents read encrypted messages (the mention inside the ciphertext wakes the
//! right agent only), answer encrypted so that the person's client decrypts the answer, keep
//! doing so across restarts (kill -9 too) without duplicate answers, answer a message whose keys
//! come late once they come, say once that a never-readable message could not be read, keep
//! secrets out of their crypto stores and room keys out of the logs; and all of it also where
//! the homeserver does not deliver keys in transactions (Tuwunel), through the per-agent sync.
//! Agents' devices are cross-signed (people's clients see them verified by their owner) with
//! one identity kept across restarts, and files agents share in encrypted rooms are encrypted
//! attachments that the person's client decrypts.

#[path = "support/crew.rs"]
mod crew;
#[path = "support/e2e_person.rs"]
mod e2e_person;
#[path = "support/scripted_llm.rs"]
mod scripted_llm;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use crew::CrewEnv;
use e2e_person::Person;
use matrix_sdk_crypto::vodozemac::{Ed25519PublicKey, Ed25519Signature};
use scripted_llm::{Reply, ScriptedLlm, waking_text};
use serde_json::{Value, json};

const REAL_KEY: &str = "sk-real-provider-key-for-the-encryption-tests";
const PASSWORD: &str = "correct horse battery staple";
const ALICE: &str = "@crew_alice:crew.test";
const BOB: &str = "@crew_bob:crew.test";
const WAIT: Duration = Duration::from_secs(60);

/// crew with the scripted LLM behind its gateway; `extra` is appended to the config.
async fn crew_with_llm(llm: &ScriptedLlm, encrypted_appservices: bool, extra: &str) -> CrewEnv {
    let upstream = llm.url();
    let extra = extra.to_owned();
    CrewEnv::start_on(encrypted_appservices, &[], move |config: &Path| {
        // Outside the data directory, so a scan of what crew stored finds only crew's writing.
        let key_file = config.parent().unwrap().parent().unwrap().join("llm.key");
        std::fs::write(&key_file, REAL_KEY).unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str(&format!(
            "\n[[gateway.routes]]\nname = \"llm\"\nprefix = \"/llm\"\nupstream = \"{upstream}/v1\"\nkind = \"openai\"\ncredentials = [{{ file = \"{}\" }}]\n\n[llm]\nmodel = \"scripted-model\"\nmax_retries = 0\n{extra}",
            key_file.display()
        ));
        std::fs::write(config, text).unwrap();
    })
    .await
}

async fn person(env: &CrewEnv, name: &str) -> Person {
    Person::login(
        &env.synapse.url,
        &env.synapse.user_id(crew::ADMIN),
        PASSWORD,
        &env.root.path().join(format!("person-{name}")),
    )
    .await
}

fn add_worker(env: &CrewEnv, name: &str) {
    let (ok, out) = env.cli(&["workers", "add", name]);
    assert!(ok, "{out}");
}

/// The dispatcher's kept decision for an event, once made.
async fn woken(env: &CrewEnv, event_id: &str) -> Vec<String> {
    let path = format!("/dispatch/why/{}", synapse::enc(event_id));
    let why = tools::wait_for("the dispatcher's decision", WAIT, || env.admin_api(&path)).await;
    why["decision"]["wakes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|wake| wake["agent"].as_str().unwrap().to_owned())
        .collect()
}

/// Message events (clear or encrypted) `sender` sent into `room`, as the homeserver stores them.
async fn raw_events_from(env: &CrewEnv, room: &str, sender: &str) -> Vec<Value> {
    env.admin()
        .await
        .messages(room)
        .await
        .into_iter()
        .filter(|event| {
            event["sender"] == sender
                && (event["type"] == "m.room.message" || event["type"] == "m.room.encrypted")
        })
        .collect()
}

/// How many of `messages` (as the person's client reports them) `sender` wrote and the client
/// decrypted.
fn decrypted_from(messages: &[Value], sender: &str) -> usize {
    messages
        .iter()
        .filter(|m| m["sender"] == sender && m["decrypted"] == true)
        .count()
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_read_and_answer_encrypted_rooms_across_restarts() {
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("Noted, here is my answer."));
    let mut env = crew_with_llm(&llm, true, "").await;
    add_worker(&env, "alice");
    add_worker(&env, "bob");
    let manager = env.manager_id();
    let mut person = person(&env, "admin").await;

    // An encrypted DM with the Manager: the message is decrypted, the Manager wakes, its
    // answer arrives encrypted and the person's client decrypts it.
    let dm = person.create_encrypted_room("dm", &[&manager], true).await;
    person.wait_joined(&dm, &manager).await;
    let hello = person
        .send(&dm, "hello manager, what is the plan?", &[&manager])
        .await;
    assert_eq!(woken(&env, &hello).await, std::slice::from_ref(&manager));
    let answer = person
        .wait_message(&dm, &manager, "here is my answer")
        .await;
    assert_eq!(answer["decrypted"], true, "{answer}");
    assert_eq!(answer["encrypted"], true, "{answer}");
    let raw = raw_events_from(&env, &dm, &manager).await;
    assert!(
        !raw.is_empty() && raw.iter().all(|event| event["type"] == "m.room.encrypted"),
        "everything the Manager sent into the DM is ciphertext: {raw:?}"
    );
    assert!(
        llm.requests()
            .iter()
            .any(|request| request.everything().contains("what is the plan?")),
        "the turn saw the decrypted words"
    );

    // A group room with two Workers: the mention inside the ciphertext wakes alice only.
    let team = person
        .create_encrypted_room("team", &[&manager, ALICE, BOB], false)
        .await;
    for agent in [&manager, ALICE, BOB] {
        person.wait_joined(&team, agent).await;
    }
    let for_alice = person
        .send(&team, "alice, please review the spec", &[ALICE])
        .await;
    assert_eq!(woken(&env, &for_alice).await, [ALICE.to_owned()]);
    let from_alice = person.wait_message(&team, ALICE, "here is my answer").await;
    assert_eq!(from_alice["decrypted"], true, "{from_alice}");

    // A file sent encrypted is decrypted into alice's inbox like a clear one.
    let plan = "the plan, in clear only after decryption";
    let sent_file = person
        .call(
            json!({"cmd": "send_file", "room_id": team, "name": "plan.txt", "data": plan,
                     "mentions": [ALICE]}),
        )
        .await;
    assert_eq!(
        woken(&env, sent_file["event_id"].as_str().unwrap()).await,
        [ALICE.to_owned()]
    );
    let inbox = env.data_dir.join("files/agents/alice/inbox");
    tools::wait_for("the decrypted file in alice's inbox", WAIT, || async {
        std::fs::read_dir(&inbox)
            .ok()?
            .flatten()
            .find(|entry| entry.file_name().to_string_lossy().ends_with("plan.txt"))
            .and_then(|entry| std::fs::read_to_string(entry.path()).ok())
            .filter(|text| text == plan)
            .map(|_| ())
    })
    .await;
    person
        .wait_messages(&team, "alice's answer to the file", |messages| {
            decrypted_from(messages, ALICE) >= 2
        })
        .await;

    // Secrets stay out of the crypto stores; the room key stays out of the logs.
    let session = person
        .call(json!({"cmd": "session_key", "room_id": team}))
        .await;
    let session_keys: Vec<String> = session["session_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key.as_str().unwrap().to_owned())
        .collect();
    let (ok, out) = env.cli(&["gateway", "consumers", "add", "probe"]);
    assert!(ok, "{out}");
    let consumer_token = out
        .lines()
        .find_map(|line| line.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    let crypto_dir = env.data_dir.join("crypto");
    assert!(
        crypto_dir.join("crew").is_dir(),
        "the Manager has a device store"
    );
    assert!(
        crypto_dir.join("crew_alice").is_dir(),
        "alice has a device store"
    );
    assert!(files_containing(&env.data_dir, REAL_KEY.as_bytes()).is_empty());
    assert!(files_containing(&crypto_dir, consumer_token.as_bytes()).is_empty());
    let logs = env.all_logs();
    assert!(
        session_keys.iter().all(|key| !logs.contains(key.as_str())),
        "a room key was logged"
    );

    // kill -9, then a clean restart: the agents still decrypt, the person still decrypts
    // the answers, and nothing is answered twice.
    env.kill_crew();
    env.start_crew().await;
    let again = person.send(&team, "alice, one more thing", &[ALICE]).await;
    assert_eq!(woken(&env, &again).await, [ALICE.to_owned()]);
    person
        .wait_messages(
            &team,
            "alice's decrypted answer after the restart",
            |messages| decrypted_from(messages, ALICE) >= 3,
        )
        .await;
    env.terminate_crew(Duration::from_secs(30)).await;
    env.start_crew().await;
    let after = person
        .send(&dm, "still there after the restart?", &[&manager])
        .await;
    assert_eq!(woken(&env, &after).await, std::slice::from_ref(&manager));
    person
        .wait_messages(
            &dm,
            "the Manager's answer after a clean restart",
            |messages| decrypted_from(messages, &manager) >= 2,
        )
        .await;
    // By now any repeat of an earlier answer would have been sent: exactly one answer each.
    let alice_events = raw_events_from(&env, &team, ALICE).await;
    assert_eq!(
        alice_events.len(),
        3,
        "three messages for alice, three answers: {alice_events:?}"
    );
    let manager_events: Vec<Value> = raw_events_from(&env, &dm, &manager).await;
    assert_eq!(manager_events.len(), 2, "{manager_events:?}");
    assert!(
        raw_events_from(&env, &team, BOB).await.is_empty(),
        "bob never woke"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn late_keys_are_answered_once_and_unreadable_messages_get_one_notice() {
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("got it"));
    let mut env = crew_with_llm(
        &llm,
        true,
        "\n[encryption]\nundecryptable_after_secs = 10\n",
    )
    .await;
    let manager = env.manager_id();
    let mut person = person(&env, "admin").await;
    let dm = person.create_encrypted_room("dm", &[&manager], true).await;
    person.wait_joined(&dm, &manager).await;

    // The room key is held back: the event waits, and is answered once the key arrives.
    let late = person
        .send_held(&dm, "this one has late keys", &[&manager])
        .await;
    tools::wait_for("the event waiting for its keys", WAIT, || async {
        env.all_logs().contains("waits for its keys").then_some(())
    })
    .await;
    person.release_keys(&dm).await;
    assert_eq!(woken(&env, &late).await, std::slice::from_ref(&manager));
    let answer = person.wait_message(&dm, &manager, "got it").await;
    assert_eq!(answer["decrypted"], true);

    // Ciphertext nobody can ever decrypt: one notice, after the wait.
    let admin = env.admin().await;
    let bogus = json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEnAcool",
                       "sender_key": "k", "session_id": "never-shared", "device_id": "D"});
    let (status, _) = admin
        .request(
            reqwest::Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.encrypted/bogus1",
                synapse::enc(&dm)
            ),
            Some(bogus),
        )
        .await;
    assert_eq!(status, 200);
    let notice = person
        .wait_message(&dm, &manager, "I could not read your last message")
        .await;
    assert_eq!(notice["msgtype"], "m.notice");
    // A later message is answered, and by then the notice was not repeated.
    person.send(&dm, "and this one?", &[&manager]).await;
    person
        .wait_messages(&dm, "the answer after the notice", |messages| {
            messages
                .iter()
                .filter(|m| m["sender"] == manager && m["body"] == "got it")
                .count()
                >= 2
        })
        .await;
    let messages = person.messages(&dm).await;
    let notices = messages
        .iter()
        .filter(|m| {
            m["sender"] == manager
                && m["body"]
                    .as_str()
                    .is_some_and(|body| body.contains("could not read"))
        })
        .count();
    assert_eq!(notices, 1, "{messages:?}");
    let answers = messages
        .iter()
        .filter(|m| m["sender"] == manager && m["body"] == "got it")
        .count();
    assert_eq!(
        answers, 2,
        "the late message was answered once: {messages:?}"
    );

    // A store that does not match the device the homeserver knows refuses the start, saying
    // how to reset.
    env.kill_crew();
    let device_file = env.data_dir.join("crypto/crew/device.json");
    let text = std::fs::read_to_string(&device_file).unwrap();
    let session: Value = serde_json::from_str(&text).unwrap();
    let device = session["device_id"].as_str().unwrap();
    std::fs::write(&device_file, text.replace(device, "CREWGONEDEVICE")).unwrap();
    let mut refused =
        crew::CrewProcess::start(&env.config_path(), &env.homeserver_url, &env.data_dir, 99);
    tools::wait_for("crew to refuse the start", WAIT, || {
        let running = refused.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    let log = refused.log_text();
    assert!(
        log.contains("does not match its device CREWGONEDEVICE"),
        "{log}"
    );
    assert!(log.contains("move") && log.contains("aside"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_in_transactions_the_agents_sync_for_them() {
    // Synapse without MSC2409/MSC3202, as Tuwunel 1.4.6 behaves towards appservices. (Synapse
    // refuses `/sync` to the appservice's own sender user, the Manager, so a Worker is asked
    // here: the mechanism is the same for every agent.)
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("answered through the sync fallback"));
    let mut env = crew_with_llm(&llm, false, "\n[encryption]\nkey_delivery = \"sync\"\n").await;
    add_worker(&env, "alice");
    let mut person = person(&env, "admin").await;
    let dm = person.create_encrypted_room("dm", &[ALICE], true).await;
    person.wait_joined(&dm, ALICE).await;
    let hello = person.send(&dm, "hello over sync", &[ALICE]).await;
    assert_eq!(woken(&env, &hello).await, [ALICE.to_owned()]);
    let answer = person
        .wait_message(&dm, ALICE, "answered through the sync fallback")
        .await;
    assert_eq!(answer["decrypted"], true);
    // After a restart the sync resumes from its kept position.
    env.kill_crew();
    env.start_crew().await;
    person.send(&dm, "and after a restart?", &[ALICE]).await;
    person
        .wait_messages(&dm, "the second answer", |messages| {
            decrypted_from(messages, ALICE) >= 2
        })
        .await;
}

/// `signed` (a device key or cross-signing key as published) carries a valid signature by
/// `user`'s ed25519 key `key_id` (public key `public`): checked here, not taken on trust.
fn assert_signed_by(signed: &Value, user: &str, key_id: &str, public: &str) {
    let signature = signed["signatures"][user][key_id]
        .as_str()
        .unwrap_or_else(|| panic!("no signature by {key_id} on {signed}"));
    let mut unsigned = signed.clone();
    let object = unsigned.as_object_mut().unwrap();
    object.remove("signatures");
    object.remove("unsigned");
    let canonical = ruma::canonical_json::to_canonical_value(&unsigned)
        .unwrap()
        .to_string();
    Ed25519PublicKey::from_base64(public)
        .unwrap()
        .verify(
            canonical.as_bytes(),
            &Ed25519Signature::from_base64(signature).unwrap(),
        )
        .unwrap_or_else(|error| panic!("the signature by {key_id} does not verify: {error}"));
}

/// The one ed25519 key of a published cross-signing key: (key id, public key).
fn only_key(key: &Value) -> (String, String) {
    let keys = key["keys"]
        .as_object()
        .expect("a cross-signing key has keys");
    assert_eq!(keys.len(), 1, "{key}");
    let (id, public) = keys.iter().next().unwrap();
    (id.clone(), public.as_str().unwrap().to_owned())
}

/// What the person's client learns about `agent` from `/keys/query` once the agent's device
/// is cross-signed: its master key (id, public key), after checking that the self-signing key
/// is signed by the master key and every device of the agent by the self-signing key.
async fn cross_signed_master_key(env: &CrewEnv, agent: &str) -> (String, String) {
    let admin = env.admin().await;
    let query = tools::wait_for(
        &format!("{agent}'s cross-signing keys and signed device"),
        WAIT,
        || async {
            let (status, answer) = admin
                .request(
                    reqwest::Method::POST,
                    "/_matrix/client/v3/keys/query",
                    Some(json!({"device_keys": {agent: []}})),
                )
                .await;
            assert_eq!(status, 200, "{answer}");
            let ssk_id = answer["self_signing_keys"][agent]["keys"]
                .as_object()?
                .keys()
                .next()?
                .clone();
            let devices = answer["device_keys"][agent].as_object()?;
            (!devices.is_empty()
                && devices
                    .values()
                    .all(|device| !device["signatures"][agent][&ssk_id].is_null()))
            .then_some(answer)
        },
    )
    .await;
    let master = &query["master_keys"][agent];
    let ssk = &query["self_signing_keys"][agent];
    assert_eq!(master["usage"], json!(["master"]), "{master}");
    assert_eq!(ssk["usage"], json!(["self_signing"]), "{ssk}");
    let (master_id, master_public) = only_key(master);
    let (ssk_id, ssk_public) = only_key(ssk);
    assert_signed_by(ssk, agent, &master_id, &master_public);
    let devices = query["device_keys"][agent].as_object().unwrap();
    assert_eq!(devices.len(), 1, "one device per agent: {devices:?}");
    for device in devices.values() {
        assert_signed_by(device, agent, &ssk_id, &ssk_public);
    }
    (master_id, master_public)
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_are_cross_signed_and_share_encrypted_files() {
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("Noted, here is my answer."));
    llm.on(
        |body| {
            waking_text(body).contains("share the report")
                && !body["messages"]
                    .as_array()
                    .is_some_and(|messages| messages.iter().any(|m| m["role"] == "tool"))
        },
        Reply::tool_call(
            "s1",
            "share_file",
            json!({"path": "shared/report.txt", "upload": true}),
        ),
    );
    let mut env = crew_with_llm(&llm, true, "").await;
    add_worker(&env, "alice");
    let manager = env.manager_id();
    let report = "quarterly report \u{2014} only the room may read this\n";
    let report_path = env.data_dir.join("files/shared/report.txt");
    std::fs::create_dir_all(report_path.parent().unwrap()).unwrap();
    std::fs::write(&report_path, report).unwrap();
    let mut person = person(&env, "admin").await;

    // The Manager's device (made at start-up) and alice's (made on her invite) are
    // cross-signed by the time they are in the room.
    let dm = person.create_encrypted_room("dm", &[&manager], true).await;
    person.wait_joined(&dm, &manager).await;
    let manager_master = cross_signed_master_key(&env, &manager).await;
    // (alice alone with the person: a member event after the first message would make the
    // person's client start a new room key, whose sharing a restart may race.)
    let team = person.create_encrypted_room("team", &[ALICE], false).await;
    person.wait_joined(&team, ALICE).await;
    let alice_master = cross_signed_master_key(&env, ALICE).await;
    assert_ne!(manager_master, alice_master, "an identity per agent");
    // A cross-signed device still gets the room key and answers.
    let hello = person.send(&team, "alice, are you there?", &[ALICE]).await;
    assert_eq!(woken(&env, &hello).await, [ALICE.to_owned()]);
    let answer = person.wait_message(&team, ALICE, "here is my answer").await;
    assert_eq!(answer["decrypted"], true, "{answer}");

    // A file the Manager shares in the encrypted DM is an encrypted attachment: the event
    // is ciphertext, the media holds ciphertext, and the person's client decrypts the bytes.
    let ask = person
        .send(&dm, "please share the report with me", &[&manager])
        .await;
    assert_eq!(woken(&env, &ask).await, std::slice::from_ref(&manager));
    person
        .wait_messages(&dm, "the Manager's encrypted file", |messages| {
            messages
                .iter()
                .any(|m| m["sender"] == manager && m["msgtype"] == "m.file" && !m["file"].is_null())
        })
        .await;
    let downloaded = person
        .call(json!({"cmd": "download_file", "room_id": dm, "sender": manager}))
        .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(downloaded["data_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, report.as_bytes());
    assert_eq!(downloaded["ciphertext_is_plaintext"], false);
    let raw = raw_events_from(&env, &dm, &manager).await;
    assert!(
        raw.iter().all(|event| event["type"] == "m.room.encrypted"),
        "the file went out inside an encrypted event: {raw:?}"
    );

    // Restarts (kill -9, then a clean one) keep each agent's identity: nothing new published,
    // no second master key.
    env.kill_crew();
    env.start_crew().await;
    env.terminate_crew(Duration::from_secs(30)).await;
    env.start_crew().await;
    let again = person.send(&team, "alice, still you?", &[ALICE]).await;
    assert_eq!(woken(&env, &again).await, [ALICE.to_owned()]);
    person
        .wait_messages(&team, "alice's answer after the restarts", |messages| {
            decrypted_from(messages, ALICE) >= 2
        })
        .await;
    assert_eq!(
        cross_signed_master_key(&env, &manager).await,
        manager_master
    );
    assert_eq!(cross_signed_master_key(&env, ALICE).await, alice_master);
    let logs = env.all_logs();
    assert_eq!(
        logs.matches("cross-signing identity published").count(),
        2,
        "published once per agent, never again on restart: {logs}"
    );
}
