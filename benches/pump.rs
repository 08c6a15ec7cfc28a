//! The pump's path without a homeserver: read an inbox entry, decide (the dispatcher), commit
//! (the entry's removal, its wakes and its outbox effects in one sled transaction), over 100
//! rooms, against the bare decide figure.
//!
//! Run: `cargo bench --bench pump` (`PUMP_BENCH_EVENTS=N` changes the 20,000 events). Prints
//! events/s for: decide alone; read → decide → commit with no effect staged; and the same with
//! one outbox effect staged per ten events and per event (an upper bound: the real pump stages
//! effects only for invites, notices and `!crew` answers). One in ten messages mentions the
//! Manager and wakes it.

use std::time::Instant;

use matrix_crew::appservice::inbox::Inbox;
use matrix_crew::dispatch::queue::{PendingWake, WakeQueue};
use matrix_crew::dispatch::{
    Agent, DispatchConfig, Dispatcher, MemoryHistory, Role, RoomEvent, Roster,
};
use matrix_crew::outbox::{Effect, Outbox, Staged};
use matrix_crew::store::Store;
use ruma::{OwnedRoomId, UserId};
use serde_json::{Value, json};

const ROOMS: usize = 100;
const MANAGER: &str = "@crew:example.org";
const PERSON: &str = "@human:example.org";
/// A third member, so that the rooms are not direct chats (where every message wakes).
const OTHER: &str = "@other:example.org";

fn room(index: usize) -> String {
    format!("!room{index}:example.org")
}

/// Membership of the Manager, the person and one more in every room, so mentions can wake.
fn memberships() -> Vec<Value> {
    (0..ROOMS)
        .flat_map(|index| {
            [MANAGER, PERSON, OTHER].map(|user| {
                json!({
                    "type": "m.room.member",
                    "state_key": user,
                    "sender": user,
                    "room_id": room(index),
                    "event_id": format!("$join-{index}-{user}"),
                    "origin_server_ts": 1_700_000_000_000u64,
                    "content": {"membership": "join"},
                })
            })
        })
        .collect()
}

/// `count` messages round-robin over the rooms; every tenth mentions the Manager.
fn messages(count: usize) -> Vec<Value> {
    (0..count)
        .map(|n| {
            let mentions = if n % 10 == 0 {
                json!({"user_ids": [MANAGER]})
            } else {
                json!({})
            };
            json!({
                "type": "m.room.message",
                "sender": PERSON,
                "room_id": room(n % ROOMS),
                "event_id": format!("$msg-{n}-abcdefghijklmnopqrstuvwxyz"),
                "origin_server_ts": 1_700_000_000_000u64 + n as u64,
                "content": {"msgtype": "m.text", "body": format!("message {n} of ordinary length in a busy room"),
                            "m.mentions": mentions},
            })
        })
        .collect()
}

fn dispatcher() -> Dispatcher {
    let config = DispatchConfig {
        agent_wakes_per_minute: u32::MAX,
        room_agent_messages_per_minute: u32::MAX,
        ..DispatchConfig::default()
    };
    let roster = Roster::new(
        vec![Agent {
            user_id: UserId::parse(MANAGER).expect("valid id"),
            role: Role::Manager,
            display_name: "Crew Manager".into(),
            keywords: Vec::new(),
        }],
        [UserId::parse(PERSON).expect("valid id")],
        [],
        &config,
    )
    .expect("valid roster");
    let mut dispatcher = Dispatcher::new(config, roster).expect("valid config");
    let history = MemoryHistory::new(16);
    for event in memberships() {
        let event = RoomEvent::from_json(&event).expect("a valid event");
        dispatcher.dispatch(&event, &history, 0);
    }
    dispatcher
}

/// Decide alone, the events already in memory (parsed, as ingest leaves them): the ceiling.
fn decide_only(events: &[Value]) -> (f64, usize) {
    let events: Vec<RoomEvent> = events
        .iter()
        .map(|event| RoomEvent::from_json(event).expect("a valid event"))
        .collect();
    let mut dispatcher = dispatcher();
    let history = MemoryHistory::new(10_000);
    let started = Instant::now();
    let mut wakes = 0;
    for event in &events {
        wakes += dispatcher.dispatch(event, &history, 1).wakes.len();
    }
    (events.len() as f64 / started.elapsed().as_secs_f64(), wakes)
}

/// Read → decide → commit through a fresh sled database, staging one outbox effect every
/// `stage_every` events (never when 0).
fn through_the_store(events: &[Value], stage_every: usize) -> (f64, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let inbox = Inbox::open(&store).expect("inbox");
    let queue = WakeQueue::open(&store).expect("queue");
    let outbox = Outbox::open(&store).expect("outbox");
    for (n, chunk) in events.chunks(100).enumerate() {
        let raw: Vec<Box<serde_json::value::RawValue>> = chunk
            .iter()
            .map(|event| serde_json::value::to_raw_value(event).expect("serialises"))
            .collect();
        inbox.ingest(&format!("txn-{n}"), &raw).expect("ingest");
    }
    let mut dispatcher = dispatcher();
    let history = MemoryHistory::new(10_000);
    let manager = UserId::parse(MANAGER).expect("valid id");
    let started = Instant::now();
    let mut handled = 0;
    let mut wakes_queued = 0;
    loop {
        let pending = inbox.pending(256).expect("read");
        if pending.is_empty() {
            break;
        }
        for (seq, entry) in pending {
            let decision = dispatcher.dispatch(&entry.event, &history, 1);
            let room: OwnedRoomId = decision.room_id.clone().expect("a room event");
            let wakes = PendingWake::for_decision(&decision, &room, &entry.event, 1);
            let effects: Vec<Staged> = if stage_every > 0 && handled % stage_every == 0 {
                vec![Staged {
                    room: room.clone(),
                    cause: entry.event_id().to_owned(),
                    effect: Effect::Send {
                        agent: manager.clone(),
                        txn_key: format!("bench:{seq}"),
                        content: json!({"msgtype": "m.notice", "body": "a one-time notice"}),
                    },
                }]
            } else {
                Vec::new()
            };
            queue
                .commit_with_effects(&inbox, seq, &wakes, &outbox, &effects)
                .expect("commit");
            wakes_queued += wakes.len();
            handled += 1;
        }
    }
    let rate = handled as f64 / started.elapsed().as_secs_f64();
    assert_eq!(handled, events.len(), "every event handled");
    (rate, wakes_queued)
}

fn main() {
    let count = std::env::var("PUMP_BENCH_EVENTS")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(20_000);
    let events = messages(count);
    println!("pump path, {count} messages over {ROOMS} rooms, 1 in 10 mentions the Manager");
    let (decide, wakes) = decide_only(&events);
    println!(
        "decide only (events in memory)               {decide:>10.0} events/s  ({wakes} wakes)"
    );
    let (bare, wakes) = through_the_store(&events, 0);
    println!(
        "read -> decide -> commit, no effect           {bare:>10.0} events/s  ({wakes} wakes queued)"
    );
    for every in [10, 1] {
        let (staged, _) = through_the_store(&events, every);
        println!(
            "read -> decide -> commit, 1 effect per {every:>2}     {staged:>10.0} events/s  (outbox costs {:.1} %)",
            (1.0 - staged / bare) * 100.0
        );
    }
}
