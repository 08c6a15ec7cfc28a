//! The dispatcher against a corpus of real-looking events (Element, FluffyChat, older clients),
//! each with the wake set it must produce; plus the stateful parts (guards, one-time notices,
//! context buffer, reason log) and property tests that no input panics.

use std::collections::BTreeMap;
use std::path::Path;

use matrix_crew::dispatch::{
    Agent, Decision, DispatchConfig, Dispatcher, History, MemoryHistory, NoHistory, ReasonLog,
    Remember, Role, RoomEvent, RoomMessageCap, RoomState, Rooms, Roster, SaidSince, Signal,
    SkipReason, WakeRateLimiter, decide,
};
use proptest::prelude::*;
use ruma::{EventId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

const MANAGER: &str = "@crew:example.org";
const WRITER: &str = "@crew_writer:example.org";
const CODER: &str = "@crew_coder:example.org";
const OPS: &str = "@crew_ops:example.org";
const RESEARCH: &str = "@crew_research:example.org";
const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const MALLORY: &str = "@mallory:example.org";
const GROUP: &str = "!ZqOGFtwJVjxtYDXuFS:example.org";
const DM: &str = "!dmWriterAlice:example.org";
const DM_MALLORY: &str = "!dmCoderMallory:example.org";
const ENCRYPTED: &str = "!encRoomAbc:example.org";

/// Events reach the dispatcher parsed, as ingest parses them; one that ingest rejects (no
/// valid ids or type) never reaches it, which the tests count as `malformed`.
trait DispatchJson {
    fn dispatch_json(&mut self, event: &Value, history: &dyn History, now_ms: u64) -> Decision;
}

impl DispatchJson for Dispatcher {
    fn dispatch_json(&mut self, event: &Value, history: &dyn History, now_ms: u64) -> Decision {
        match RoomEvent::from_json(event) {
            Ok(event) => self.dispatch(&event, history, now_ms),
            Err(_) => rejected(),
        }
    }
}

fn rejected() -> Decision {
    Decision {
        ignored: Some(SkipReason::Malformed),
        ..Decision::default()
    }
}

fn user(id: &str) -> OwnedUserId {
    UserId::parse(id).expect("valid test user id")
}

fn agents() -> Vec<Agent> {
    let agent = |id: &str, role, name: &str, keywords: &[&str]| Agent {
        user_id: user(id),
        role,
        display_name: name.into(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
    };
    vec![
        agent(MANAGER, Role::Manager, "Crew Manager", &[]),
        agent(WRITER, Role::Worker, "Writer", &[]),
        agent(CODER, Role::Worker, "Coder", &[]),
        agent(OPS, Role::Worker, "Ops", &["deploy"]),
        agent(RESEARCH, Role::Worker, "Researcher", &[]),
    ]
}

/// The test config: Writer's keyword comes from the config, Ops's from its agent entry.
fn base_config() -> DispatchConfig {
    DispatchConfig {
        keywords: BTreeMap::from([("crew_writer".to_string(), vec!["draft".to_string()])]),
        worker_pairs: vec![["crew_writer".into(), "@crew_coder:example.org".into()]],
        ..DispatchConfig::default()
    }
}

fn crew(config: &DispatchConfig) -> Roster {
    Roster::new(agents(), [user(ALICE)], [user(BOB)], config).expect("valid crew")
}

fn member(room: &str, who: &str, membership: &str, name: &str) -> Value {
    json!({"type": "m.room.member", "room_id": room, "sender": who, "state_key": who,
           "event_id": format!("$m{}{}", who.len(), membership), "origin_server_ts": 1,
           "content": {"membership": membership, "displayname": name}})
}

/// The rooms the fixtures name, built from state events as the homeserver sends them.
fn rooms() -> Rooms {
    let mut rooms = Rooms::new();
    let mut next = 0;
    let mut feed = |mut event: Value| {
        next += 1;
        event["event_id"] = json!(format!("$state{next}"));
        rooms.apply_event(&RoomEvent::from_json(&event).expect("a valid state event"));
    };
    feed(
        json!({"type": "m.room.create", "room_id": GROUP, "sender": ALICE, "state_key": "",
                "content": {"room_version": "10"}}),
    );
    feed(
        json!({"type": "m.room.power_levels", "room_id": GROUP, "sender": ALICE, "state_key": "",
                "content": {"users": {ALICE: 100, MANAGER: 50}, "users_default": 0}}),
    );
    for (who, name) in [
        (ALICE, "Alice"),
        (BOB, "Bob"),
        (MALLORY, "Mallory"),
        (MANAGER, "Crew Manager"),
        (WRITER, "Writer"),
        (CODER, "Coder"),
        (OPS, "Ops"),
    ] {
        feed(member(GROUP, who, "join", name));
    }
    feed(member(GROUP, RESEARCH, "invite", "Researcher"));
    for (who, name) in [(ALICE, "Alice"), (WRITER, "Writer")] {
        feed(member(DM, who, "join", name));
    }
    for (who, name) in [(MALLORY, "Mallory"), (CODER, "Coder")] {
        feed(member(DM_MALLORY, who, "join", name));
    }
    for (who, name) in [
        (ALICE, "Alice"),
        (MANAGER, "Crew Manager"),
        (WRITER, "Writer"),
    ] {
        feed(member(ENCRYPTED, who, "join", name));
    }
    feed(
        json!({"type": "m.room.encryption", "room_id": ENCRYPTED, "sender": ALICE, "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"}}),
    );
    rooms
}

fn room_id(preset: &str) -> &'static str {
    match preset {
        "group" => GROUP,
        "dm" => DM,
        "dm_mallory" => DM_MALLORY,
        "encrypted" => ENCRYPTED,
        other => panic!("unknown room preset {other}"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    about: String,
    room: String,
    #[serde(default)]
    config: serde_json::Map<String, Value>,
    #[serde(default)]
    history: Vec<Remember>,
    event: Value,
    wake: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    skip: BTreeMap<String, String>,
    ignored: Option<SkipReason>,
    signals: Vec<Signal>,
    depth: Option<u32>,
}

fn config_with(overrides: &serde_json::Map<String, Value>) -> DispatchConfig {
    let mut value = serde_json::to_value(base_config()).expect("config serialises");
    let object = value.as_object_mut().expect("config is an object");
    for (key, v) in overrides {
        object.insert(key.clone(), v.clone());
    }
    serde_json::from_value(value).expect("fixture config overrides are valid")
}

fn as_str<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Checks one fixture; returns a description of every mismatch.
fn check_fixture(name: &str, fixture: &Fixture, rooms: &Rooms) -> Vec<String> {
    let config = config_with(&fixture.config);
    let crew = crew(&config);
    let mut history = MemoryHistory::new(100);
    for fact in &fixture.history {
        history.remember(fact);
    }
    let room = rooms
        .get(
            RoomId::parse(room_id(&fixture.room))
                .expect("valid room id")
                .as_ref(),
        )
        .expect("preset room exists");
    let decision = match RoomEvent::from_json(&fixture.event) {
        Ok(event) => decide(&event, room, &crew, &config, &history),
        Err(_) => rejected(),
    };
    let mut problems = Vec::new();
    let mut say = |what: String| problems.push(format!("{name} ({}): {what}", fixture.about));
    let woken: BTreeMap<String, Vec<String>> = decision
        .wakes
        .iter()
        .map(|w| (w.agent.to_string(), w.reasons.iter().map(as_str).collect()))
        .collect();
    if woken != fixture.wake {
        say(format!("woke {woken:?}, expected {:?}", fixture.wake));
    }
    if decision.ignored != fixture.ignored {
        say(format!(
            "ignored {:?}, expected {:?}",
            decision.ignored, fixture.ignored
        ));
    }
    for (agent, reason) in &fixture.skip {
        let got = decision.skips.iter().find(|s| s.agent.as_str() == agent);
        match got {
            Some(skip) if as_str(&skip.reason) == *reason => {}
            other => say(format!("{agent}: skip {other:?}, expected {reason}")),
        }
    }
    if decision.signals != fixture.signals {
        say(format!(
            "signals {:?}, expected {:?}",
            decision.signals, fixture.signals
        ));
    }
    if let Some(depth) = fixture.depth
        && (decision.depth != depth || decision.wakes.iter().any(|w| w.depth != depth))
    {
        say(format!(
            "depth {} (wakes {:?}), expected {depth}",
            decision.depth, decision.wakes
        ));
    }
    // Every agent appears at most once, in wakes or skips.
    let mut seen: Vec<&str> = decision.woken().map(|u| u.as_str()).collect();
    seen.extend(decision.skips.iter().map(|s| s.agent.as_str()));
    let total = seen.len();
    seen.sort();
    seen.dedup();
    if seen.len() != total {
        say(format!("an agent is listed twice: {decision:?}"));
    }
    problems
}

fn load_fixtures() -> Vec<(String, Fixture)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixture directory exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable fixture");
        let fixture: Fixture = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("fixture {} is not valid: {e}", path.display()));
        let name = path
            .file_stem()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        out.push((name, fixture));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn fixture_corpus_wakes_exactly_the_expected_agents() {
    let fixtures = load_fixtures();
    assert!(fixtures.len() >= 50, "corpus shrank to {}", fixtures.len());
    let rooms = rooms();
    let problems: Vec<String> = fixtures
        .iter()
        .flat_map(|(name, fixture)| check_fixture(name, fixture, &rooms))
        .collect();
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn corpus_covers_every_client_and_kind() {
    let fixtures = load_fixtures();
    for prefix in [
        "element_",
        "fluffychat_",
        "legacy_",
        "dm_",
        "room_mention",
        "keyword_",
        "encrypted_",
        "edit_",
    ] {
        assert!(
            fixtures.iter().any(|(name, _)| name.starts_with(prefix)),
            "no fixture for {prefix}"
        );
    }
    let woke_something = fixtures.iter().filter(|(_, f)| !f.wake.is_empty()).count();
    let woke_nothing = fixtures.len() - woke_something;
    assert!(
        woke_something >= 15 && woke_nothing >= 15,
        "{woke_something} / {woke_nothing}"
    );
}

fn message(room: &str, sender: &str, id: &str, content: Value) -> Value {
    json!({"type": "m.room.message", "room_id": room, "sender": sender, "event_id": id,
           "origin_server_ts": 1, "content": content})
}

fn dispatcher(config: DispatchConfig) -> Dispatcher {
    let crew = crew(&config);
    let mut dispatcher = Dispatcher::new(config, crew).expect("valid dispatcher");
    dispatcher.rooms = rooms();
    dispatcher
}

#[test]
fn hint_is_given_once_per_agent_per_room() {
    let mut d = dispatcher(base_config());
    let history = NoHistory;
    let first = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$h1",
            json!({"msgtype": "m.text", "body": "Writer?", "m.mentions": {}}),
        ),
        &history,
        0,
    );
    assert_eq!(
        first.signals,
        [Signal::MentionHint {
            agent: user(WRITER)
        }]
    );
    let second = d.dispatch_json(
        &message(
            GROUP,
            BOB,
            "$h2",
            json!({"msgtype": "m.text", "body": "writer!!", "m.mentions": {}}),
        ),
        &history,
        1,
    );
    assert!(second.signals.is_empty(), "{second:?}");
    // Another room has its own hint.
    let mut rooms_state = d.rooms.clone();
    rooms_state.entry(RoomId::parse("!other:example.org").unwrap().as_ref());
    let third = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$h3",
            json!({"msgtype": "m.text", "body": "and coder?", "m.mentions": {}}),
        ),
        &history,
        2,
    );
    assert_eq!(third.signals, [Signal::MentionHint { agent: user(CODER) }]);
    // Leaving and rejoining re-arms it.
    d.dispatch_json(&member(GROUP, WRITER, "leave", "Writer"), &history, 3);
    d.dispatch_json(&member(GROUP, WRITER, "join", "Writer"), &history, 4);
    let again = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$h4",
            json!({"msgtype": "m.text", "body": "Writer?", "m.mentions": {}}),
        ),
        &history,
        5,
    );
    assert_eq!(
        again.signals,
        [Signal::MentionHint {
            agent: user(WRITER)
        }]
    );
}

#[test]
fn encrypted_room_is_announced_once_per_agent() {
    let mut d = dispatcher(base_config());
    let encrypted = json!({"type": "m.room.encrypted", "room_id": ENCRYPTED, "sender": ALICE,
                           "event_id": "$e1", "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"}});
    let first = d.dispatch_json(&encrypted, &NoHistory, 0);
    assert_eq!(first.signals.len(), 2);
    assert_eq!(first.ignored, Some(SkipReason::Encrypted));
    assert!(
        d.dispatch_json(&encrypted, &NoHistory, 1)
            .signals
            .is_empty()
    );
    // Coder joins later: it says so once too.
    let joined = d.dispatch_json(&member(ENCRYPTED, CODER, "join", "Coder"), &NoHistory, 2);
    assert_eq!(
        joined.signals,
        [Signal::EncryptedRoom { agent: user(CODER) }]
    );
    // An `m.room.encrypted` event in a room without `m.room.encryption` state is unreadable,
    // but it does not mark the room: the next plain message still wakes.
    let stray = json!({"type": "m.room.encrypted", "room_id": GROUP, "sender": BOB, "event_id": "$e2", "content": {}});
    let decision = d.dispatch_json(&stray, &NoHistory, 3);
    assert_eq!(decision.ignored, Some(SkipReason::Encrypted));
    assert!(decision.signals.is_empty(), "{decision:?}");
    let after = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$e3",
            json!({"msgtype": "m.text", "body": "Writer", "m.mentions": {"user_ids": [WRITER]}}),
        ),
        &NoHistory,
        4,
    );
    assert_eq!(after.ignored, None, "{after:?}");
    assert_eq!(after.wakes.len(), 1, "{after:?}");
    // Only the state event turns a room encrypted.
    let turned = json!({"type": "m.room.encryption", "room_id": GROUP, "sender": BOB, "state_key": "",
                        "event_id": "$e4", "content": {"algorithm": "m.megolm.v1.aes-sha2"}});
    let decision = d.dispatch_json(&turned, &NoHistory, 5);
    assert_eq!(decision.signals.len(), 4, "{decision:?}");
    let later = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$e5",
            json!({"msgtype": "m.text", "body": "Writer", "m.mentions": {"user_ids": [WRITER]}}),
        ),
        &NoHistory,
        6,
    );
    assert_eq!(later.ignored, Some(SkipReason::Encrypted));
    assert!(later.wakes.is_empty());
}

#[test]
fn only_state_and_recorded_notices_change_the_room_model() {
    let mut d = dispatcher(base_config());
    let plain = message(
        GROUP,
        ALICE,
        "$p1",
        json!({"msgtype": "m.text", "body": "Writer", "m.mentions": {"user_ids": [WRITER]}}),
    );
    let decision = d.dispatch_json(&plain, &NoHistory, 1);
    assert_eq!(decision.wakes.len(), 1);
    assert!(
        !decision.room_changed,
        "a message leaves the room model as it was: nothing to save"
    );
    let joined = d.dispatch_json(
        &member(GROUP, "@dave:example.org", "join", "Dave"),
        &NoHistory,
        2,
    );
    assert!(joined.room_changed, "a membership is state");
    let unmentioned = message(
        GROUP,
        BOB,
        "$p2",
        json!({"msgtype": "m.text", "body": "Writer, are you there?"}),
    );
    let hinted = d.dispatch_json(&unmentioned, &NoHistory, 3);
    assert!(!hinted.signals.is_empty(), "{hinted:?}");
    assert!(
        hinted.room_changed,
        "the one-time hint is recorded in the room"
    );
}

#[test]
fn ping_pong_stops_at_the_depth_budget_with_one_notice() {
    let config = base_config();
    let max = config.max_depth;
    let mut d = dispatcher(config);
    let mut history = MemoryHistory::new(100);
    // Alice asks Writer (depth 0); Writer and Coder (a pair) then hand over back and forth,
    // each message sent while handling the wake that the previous one caused.
    let first = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$p0",
            json!({"msgtype": "m.text", "body": "go", "m.mentions": {"user_ids": [WRITER]}}),
        ),
        &history,
        0,
    );
    assert_eq!(first.wakes[0].depth, 0);
    let mut depth = 0;
    let mut notices = 0;
    let mut wakes = 1;
    for turn in 0..10u32 {
        let (from, to) = if turn % 2 == 0 {
            (WRITER, CODER)
        } else {
            (CODER, WRITER)
        };
        let event = message(
            GROUP,
            from,
            &format!("$p{}", turn + 1),
            json!({"msgtype": "m.text", "body": "your turn",
            "m.mentions": {"user_ids": [to]}, "org.matrix-crew.wake_depth": depth}),
        );
        let decision = d.dispatch_json(&event, &history, u64::from(turn) * 10_000);
        if let Some(fact) = &decision.remember {
            history.remember(fact);
        }
        notices += decision
            .signals
            .iter()
            .filter(|s| matches!(s, Signal::LoopStopped { .. }))
            .count();
        match decision.wakes.first() {
            Some(wake) => {
                wakes += 1;
                depth = wake.depth;
            }
            None => {
                assert_eq!(
                    decision.skip_reason(&user(to)),
                    Some(SkipReason::LoopBudget)
                );
            }
        }
    }
    assert_eq!(depth, max);
    assert_eq!(wakes, 1 + max as usize);
    assert_eq!(notices, 1);
    // A person speaking re-arms the notice for the next runaway chain.
    d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$p99",
            json!({"msgtype": "m.text", "body": "ok stop", "m.mentions": {}}),
        ),
        &history,
        200_000,
    );
    let again = d.dispatch_json(
        &message(
            GROUP,
            CODER,
            "$p100",
            json!({"msgtype": "m.text", "body": "x",
        "m.mentions": {"user_ids": [WRITER]}, "org.matrix-crew.wake_depth": max}),
        ),
        &history,
        200_001,
    );
    assert!(matches!(
        again.signals.as_slice(),
        [Signal::LoopStopped { .. }]
    ));
}

#[test]
fn edit_wakes_a_newly_mentioned_agent_once_per_original() {
    let mut d = dispatcher(base_config());
    let mut history = MemoryHistory::new(100);
    let run = |d: &mut Dispatcher, history: &mut MemoryHistory, event: Value| {
        let decision = d.dispatch_json(&event, history, 0);
        if let Some(fact) = &decision.remember {
            history.remember(fact);
        }
        decision
    };
    let original = run(
        &mut d,
        &mut history,
        message(
            GROUP,
            ALICE,
            "$o1",
            json!({"msgtype": "m.text", "body": "Writer: start", "m.mentions": {"user_ids": [WRITER]}}),
        ),
    );
    assert_eq!(original.woken().collect::<Vec<_>>(), [user(WRITER)]);
    let edit = |id: &str, mentions: &[&str]| {
        message(
            GROUP,
            ALICE,
            id,
            json!({"msgtype": "m.text", "body": "* edited",
        "m.new_content": {"msgtype": "m.text", "body": "edited"}, "m.mentions": {"user_ids": mentions},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$o1"}}),
        )
    };
    let first = run(&mut d, &mut history, edit("$o1e1", &[WRITER, CODER]));
    assert_eq!(first.woken().collect::<Vec<_>>(), [user(CODER)]);
    assert_eq!(
        first.skip_reason(&user(WRITER)),
        Some(SkipReason::EditAlreadyMentioned)
    );
    let second = run(&mut d, &mut history, edit("$o1e2", &[WRITER, CODER]));
    assert!(second.wakes.is_empty(), "{second:?}");
    let third = run(&mut d, &mut history, edit("$o1e3", &[OPS]));
    assert_eq!(third.woken().collect::<Vec<_>>(), [user(OPS)]);
}

#[test]
fn rate_limit_and_room_cap_demote_wakes() {
    let config = DispatchConfig {
        agent_wakes_per_minute: 2,
        room_agent_messages_per_minute: 3,
        ..base_config()
    };
    let mut d = dispatcher(config);
    let mention = |id: &str, sender: &str, who: &str| {
        message(
            GROUP,
            sender,
            id,
            json!({"msgtype": "m.text", "body": "hey", "m.mentions": {"user_ids": [who]}}),
        )
    };
    assert_eq!(
        d.dispatch_json(&mention("$r1", ALICE, CODER), &NoHistory, 0)
            .wakes
            .len(),
        1
    );
    assert_eq!(
        d.dispatch_json(&mention("$r2", ALICE, CODER), &NoHistory, 1_000)
            .wakes
            .len(),
        1
    );
    let third = d.dispatch_json(&mention("$r3", ALICE, CODER), &NoHistory, 2_000);
    assert_eq!(third.skip_reason(&user(CODER)), Some(SkipReason::RateLimit));
    assert_eq!(
        third
            .skips
            .iter()
            .find(|s| s.agent == CODER)
            .unwrap()
            .wanted
            .len(),
        1
    );
    // A minute after the first wake there is room again.
    assert_eq!(
        d.dispatch_json(&mention("$r4", ALICE, CODER), &NoHistory, 60_000)
            .wakes
            .len(),
        1
    );

    // The Manager sends 3 messages in a minute: fine; the 4th wakes nobody.
    for (i, at) in [0u64, 10, 20].iter().enumerate() {
        let decision = d.dispatch_json(
            &mention(&format!("$c{i}"), MANAGER, WRITER),
            &NoHistory,
            100_000 + at,
        );
        assert_eq!(decision.wakes.len(), usize::from(i < 2), "{decision:?}");
    }
    let capped = d.dispatch_json(&mention("$c3", MANAGER, OPS), &NoHistory, 100_030);
    assert_eq!(capped.skip_reason(&user(OPS)), Some(SkipReason::RoomCap));
    assert!(
        !d.guards
            .room_cap
            .would_allow(RoomId::parse(GROUP).unwrap().as_ref(), 100_040)
    );
    assert!(
        d.guards
            .room_cap
            .would_allow(RoomId::parse(GROUP).unwrap().as_ref(), 160_031)
    );
}

#[test]
fn rate_limiter_window_slides() {
    let agent = user(WRITER);
    let mut limiter = WakeRateLimiter::new(3);
    assert!(limiter.try_wake(&agent, 0));
    assert!(limiter.try_wake(&agent, 10));
    assert!(limiter.try_wake(&agent, 20));
    assert!(!limiter.try_wake(&agent, 59_999));
    assert_eq!(limiter.remaining(&agent, 59_999), 0);
    assert!(limiter.try_wake(&agent, 60_000));
    assert_eq!(limiter.remaining(&agent, 60_015), 1);
    assert!(
        limiter.try_wake(&user(CODER), 60_000),
        "limits are per agent"
    );
    let room = RoomId::parse(GROUP).unwrap();
    let mut cap = RoomMessageCap::new(1);
    assert!(cap.note_message(&room, 0));
    assert!(!cap.note_message(&room, 1));
    assert!(cap.note_message(RoomId::parse(DM).unwrap().as_ref(), 1));
}

#[test]
fn said_since_buffer_is_bounded_and_per_agent() {
    let room = RoomId::parse(GROUP).unwrap();
    let writer = user(WRITER);
    let coder = user(CODER);
    let mut buffer = SaidSince::new(3);
    let id = |n: u32| EventId::parse(format!("$s{n}")).unwrap();
    buffer.push(&room, id(0), user(ALICE), "zero".into(), None);
    buffer.push(&room, id(1), writer.clone(), "mine".into(), None);
    let missed = buffer.take(&writer, &room);
    assert_eq!(
        missed
            .messages
            .iter()
            .map(|s| s.body.as_str())
            .collect::<Vec<_>>(),
        ["zero"]
    );
    assert_eq!(missed.dropped, 0);
    for n in 2..7 {
        buffer.push(&room, id(n), user(BOB), format!("m{n}"), None);
    }
    let missed = buffer.take(&writer, &room);
    assert_eq!(
        missed
            .messages
            .iter()
            .map(|s| s.body.as_str())
            .collect::<Vec<_>>(),
        ["m4", "m5", "m6"]
    );
    assert_eq!(missed.dropped, 2);
    assert!(buffer.take(&writer, &room).messages.is_empty());
    // Coder never took a turn: it missed all 7, 3 kept.
    let coder_missed = buffer.peek(&coder, &room);
    assert_eq!(coder_missed.messages.len(), 3);
    assert_eq!(coder_missed.dropped, 4);
    let text = serde_json::to_string(&buffer).unwrap();
    let back: SaidSince = serde_json::from_str(&text).unwrap();
    assert_eq!(back.peek(&coder, &room), coder_missed);
}

#[test]
fn dispatcher_keeps_context_and_reasons() {
    let mut d = dispatcher(base_config());
    d.dispatch_json(&message(GROUP, ALICE, "$k1", json!({"msgtype": "m.text", "body": "> <@bob:example.org> q\n\nplain talk", "m.mentions": {}})), &NoHistory, 0);
    d.dispatch_json(
        &message(
            GROUP,
            BOB,
            "$k2",
            json!({"msgtype": "m.notice", "body": "a notice"}),
        ),
        &NoHistory,
        1,
    );
    let woke = d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$k3",
            json!({"msgtype": "m.text", "body": "Coder: go", "m.mentions": {"user_ids": [CODER]}}),
        ),
        &NoHistory,
        2,
    );
    assert_eq!(woke.wakes.len(), 1);
    let missed = d
        .context
        .take(&user(CODER), RoomId::parse(GROUP).unwrap().as_ref());
    assert_eq!(
        missed
            .messages
            .iter()
            .map(|s| s.body.as_str())
            .collect::<Vec<_>>(),
        ["plain talk", "a notice", "Coder: go"]
    );
    let kept = d
        .reasons
        .get(EventId::parse("$k1").unwrap().as_ref())
        .expect("reason kept");
    assert_eq!(
        kept.decision.skip_reason(&user(CODER)),
        Some(SkipReason::NoMention)
    );
    let why = d
        .reasons
        .get(EventId::parse("$k3").unwrap().as_ref())
        .unwrap();
    assert_eq!(why.decision.wakes[0].agent, CODER);
}

#[test]
fn reason_log_is_bounded_by_count_and_age() {
    let mut log = ReasonLog::new(2, 1_000);
    let decision = |id: &str| Decision {
        event_id: Some(EventId::parse(id).unwrap()),
        ..Decision::default()
    };
    log.insert(&decision("$a"), 0);
    log.insert(&decision("$b"), 10);
    log.insert(&decision("$c"), 20);
    assert_eq!(log.len(), 2);
    assert!(log.get(EventId::parse("$a").unwrap().as_ref()).is_none());
    log.insert(&decision("$b"), 30);
    assert_eq!(log.len(), 2);
    log.prune(1_025);
    assert_eq!(log.len(), 1);
    assert!(log.get(EventId::parse("$b").unwrap().as_ref()).is_some());
    log.insert(&Decision::default(), 2_000);
    assert_eq!(log.len(), 0);
}

#[test]
fn config_errors_name_the_fix() {
    let config = DispatchConfig {
        keywords: BTreeMap::from([("crew_nobody".to_string(), vec!["x".to_string()])]),
        ..DispatchConfig::default()
    };
    let error = Roster::new(agents(), [], [], &config).unwrap_err();
    assert!(error.to_string().contains("crew_nobody"), "{error}");
    let mut twice = agents();
    twice.push(twice[0].clone());
    assert!(Roster::new(twice, [], [], &DispatchConfig::default()).is_err());
    let bad = DispatchConfig {
        context_messages: 0,
        ..DispatchConfig::default()
    };
    let crew = crew(&DispatchConfig::default());
    assert!(
        Dispatcher::new(bad, crew)
            .unwrap_err()
            .to_string()
            .contains("context_messages")
    );
}

#[test]
fn room_state_persists_one_time_flags() {
    let mut d = dispatcher(base_config());
    d.dispatch_json(
        &message(
            GROUP,
            ALICE,
            "$f1",
            json!({"msgtype": "m.text", "body": "Ops?", "m.mentions": {}}),
        ),
        &NoHistory,
        0,
    );
    let text = serde_json::to_string(&d.rooms).unwrap();
    let rooms: Rooms = serde_json::from_str(&text).unwrap();
    let state: &RoomState = rooms.get(RoomId::parse(GROUP).unwrap().as_ref()).unwrap();
    assert!(state.hinted.contains(&user(OPS)));
    assert!(state.is_joined(&user(WRITER)));
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just(WRITER),
            Just(CODER),
            Just(MANAGER),
            Just("@room"),
            Just("m.mentions"),
            Just("https://matrix.to/#/%40crew_writer%3Aexample.org"),
            Just("matrix:u/crew_ops:example.org"),
            Just("<mx-reply><blockquote>"),
            Just("</mx-reply>"),
            Just("> "),
            Just("$writerSaid1"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    ".{0,8}",
                    Just("m.mentions".to_string()),
                    Just("user_ids".to_string()),
                    Just("body".to_string()),
                    Just("formatted_body".to_string()),
                    Just("format".to_string()),
                    Just("m.relates_to".to_string()),
                    Just("m.in_reply_to".to_string()),
                    Just("event_id".to_string()),
                    Just("rel_type".to_string()),
                    Just("msgtype".to_string()),
                    Just("room".to_string()),
                    Just("is_falling_back".to_string()),
                    Just("org.matrix-crew.wake_depth".to_string()),
                ],
                inner,
                0..6,
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_content_never_panics(content in arbitrary_json(), sender in prop_oneof![Just(ALICE), Just(WRITER), Just(MALLORY), Just(MANAGER)],
                                      room in prop_oneof![Just(GROUP), Just(DM), Just(ENCRYPTED)], kind in prop_oneof![Just("m.room.message"), Just("m.room.member"), Just("m.room.power_levels"), Just("m.room.create")]) {
        let mut d = dispatcher(base_config());
        let mut history = MemoryHistory::new(10);
        history.remember(&Remember { event_id: EventId::parse("$writerSaid1").unwrap(), sender: user(WRITER), mentioned: vec![] });
        let mut event = json!({"type": kind, "room_id": room, "sender": sender, "event_id": "$x", "content": content});
        if kind != "m.room.message" {
            event["state_key"] = json!(sender);
        }
        let decision = d.dispatch_json(&event, &history, 0);
        // Whatever the content, only joined agents wake, never the sender.
        for wake in &decision.wakes {
            prop_assert!(wake.agent != sender);
        }
    }

    #[test]
    fn arbitrary_events_never_panic(event in arbitrary_json()) {
        let mut d = dispatcher(base_config());
        let _ = d.dispatch_json(&event, &NoHistory, 0);
        if let Ok(event) = RoomEvent::from_json(&event) {
            let mut room = RoomState::default();
            room.apply_event(&event);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(body in "\\PC{0,200}", html in "\\PC{0,200}") {
        let mut d = dispatcher(base_config());
        let event = message(GROUP, ALICE, "$t", json!({"msgtype": "m.text", "body": body, "format": "org.matrix.custom.html", "formatted_body": html}));
        let _ = d.dispatch_json(&event, &NoHistory, 0);
    }

    #[test]
    fn arbitrary_links_and_ids_never_panic(junk in "\\PC{0,40}", pre in "\\PC{0,6}") {
        let mut d = dispatcher(base_config());
        let html = format!(
            "<a href=\"https://matrix.to/#/{junk}\">x</a><a href='{junk}'>y</a><a href=matrix:u/{junk}>z</a><mx-reply>{junk}"
        );
        let body = format!("{pre}@crew_writer:example.org{junk}\n> {junk}\n{pre}@room{junk}");
        let event = message(GROUP, ALICE, "$l", json!({"msgtype": "m.text", "body": body,
            "format": "org.matrix.custom.html", "formatted_body": html}));
        let decision = d.dispatch_json(&event, &NoHistory, 0);
        prop_assert!(decision.ignored.is_none());
    }
}
