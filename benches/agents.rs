//! What an agent costs: resident memory per idle Worker with 1,000 Workers defined, and the size
//! of a turn's prompt as a room's history grows (it must stay flat).
//!
//! Run: `cargo bench --bench agents`. Token counts are estimated as characters / 4 (the usual
//! rule of thumb for English with OpenAI tokenizers); the figure to watch is that they do not
//! grow with history.

#[path = "support/process.rs"]
mod process;

use matrix_crew::agent::llm_turn::{RECENT_MESSAGES, TurnContext, conversation};
use matrix_crew::agent::registry::Registry;
use matrix_crew::dispatch::{Agent, Crew, DispatchConfig, Dispatcher, Membership, NoHistory, Role};
use matrix_crew::store::Store;
use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::json;

const WORKERS: usize = 1_000;

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| {
                    let path = entry.path();
                    if path.is_dir() {
                        dir_size(&path)
                    } else {
                        entry.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn user(id: &str) -> OwnedUserId {
    UserId::parse(id).expect("valid user id")
}

fn idle_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let before = process::status_kib("VmRSS");
    let registry = Registry::open(&store, "crew_", "example.org").expect("registry");
    for n in 0..WORKERS {
        registry
            .create(
                &format!("worker{n}"),
                "a role of ordinary length for a worker",
                0,
            )
            .expect("create");
    }
    let mut agents = vec![Agent {
        user_id: user("@crew:example.org"),
        role: Role::Manager,
        display_name: "Crew Manager".into(),
        keywords: Vec::new(),
    }];
    for worker in registry.list().expect("list") {
        agents.push(Agent {
            user_id: worker.user_id,
            role: Role::Worker,
            display_name: worker.display_name,
            keywords: worker.keywords,
        });
    }
    let config = DispatchConfig::default();
    let crew = Crew::new(agents, [user("@human:example.org")], [], &config).expect("crew");
    let dispatcher = Dispatcher::new(config, crew).expect("dispatcher");
    let after = process::status_kib("VmRSS");
    let _ = store.db().flush();
    let disk = dir_size(dir.path());
    println!(
        "{WORKERS} idle workers: {} KiB resident in all, {:.1} KiB per worker (roster + dispatcher); {:.1} KiB on disk per worker",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / WORKERS as f64,
        disk as f64 / 1024.0 / WORKERS as f64
    );
    drop(dispatcher);
}

fn prompt_size_by_history() {
    let room = RoomId::parse("!room:example.org").expect("room id");
    let human = user("@human:example.org");
    let alice = user("@crew_alice:example.org");
    println!("history (messages)   prompt chars   ~tokens   said-since lines");
    for history in [1usize, 100, 10_000] {
        let config = DispatchConfig::default();
        let agents = vec![
            Agent {
                user_id: user("@crew:example.org"),
                role: Role::Manager,
                display_name: "Crew Manager".into(),
                keywords: Vec::new(),
            },
            Agent {
                user_id: alice.clone(),
                role: Role::Worker,
                display_name: "Alice".into(),
                keywords: Vec::new(),
            },
        ];
        let crew = Crew::new(agents, [human.clone()], [], &config).expect("crew");
        let mut dispatcher = Dispatcher::new(config, crew).expect("dispatcher");
        let state = dispatcher.rooms.entry(&room);
        for member in [&human, &alice, &user("@bob:example.org")] {
            state.set_member(member.clone(), Membership::Join, None);
        }
        for n in 0..history {
            let event = json!({"type": "m.room.message", "event_id": format!("$h{n}"), "room_id": room,
                "sender": human, "origin_server_ts": n,
                "content": {"msgtype": "m.text", "body": format!("message {n} about the project, nobody mentioned"), "m.mentions": {}}});
            dispatcher.dispatch(&event, &NoHistory, n as u64);
        }
        let waking = json!({"type": "m.room.message", "event_id": "$wake", "room_id": room, "sender": human,
            "content": {"msgtype": "m.text", "body": "@crew_alice:example.org please summarise", "m.mentions": {"user_ids": [alice]}}});
        let decision = dispatcher.dispatch(&waking, &NoHistory, history as u64 + 1);
        assert_eq!(decision.wakes.len(), 1, "alice wakes");
        let missed = dispatcher.context.take(&alice, &room);
        let recent = dispatcher.context.recent(&room, RECENT_MESSAGES + 1);
        let (context, said_since) = TurnContext::assemble(
            &alice,
            &missed,
            &recent,
            "$wake",
            |user| user.localpart().to_owned(),
            "human (@human:example.org)".into(),
            "please summarise".into(),
        );
        let prompt = conversation(&context);
        println!(
            "{history:>18}   {:>12}   {:>7}   {:>16}",
            prompt.len(),
            prompt.len() / 4,
            said_since
        );
    }
}

fn main() {
    idle_workers();
    prompt_size_by_history();
}
