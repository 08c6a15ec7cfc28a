//! What an agent costs: resident memory per idle Worker with 1,000 Workers defined, the size of
//! a turn's prompt as a room's history grows (it must stay flat), and how long it takes from
//! "create a worker named X" to the person being invited to the Worker's room.
//!
//! Run: `cargo bench --bench agents`. Token counts are estimated as characters / 4 (the usual
//! rule of thumb for English with OpenAI tokenizers); the figure to watch is that they do not
//! grow with history. The provisioning figure starts a real Synapse and the release `crew`
//! binary, as the integration tests do, and creates Workers through the admin API with the
//! same code the Manager's create_worker tool runs, so no LLM time is in it.

#[path = "../tests/support/crew.rs"]
mod crew;
#[path = "support/process.rs"]
mod process;
#[path = "../tests/support/synapse.rs"]
mod synapse;
#[path = "../tests/support/tools.rs"]
mod tools;

use std::time::{Duration, Instant};

use matrix_crew::agent::llm_turn::{TurnContext, conversation};
use matrix_crew::agent::registry::Registry;
use matrix_crew::dispatch::{
    Agent, DispatchConfig, Dispatcher, Membership, NoHistory, Role, RoomEvent, Roster,
};
use matrix_crew::store::Store;
use process::{ms, percentile};
use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

const WORKERS: usize = 1_000;
/// Workers provisioned one after another for the creation-to-invite figure: enough for a p95
/// that is not the maximum, few enough to run in seconds.
const PROVISIONED: usize = 20;
/// How long one provisioning may take before the benchmark gives up (the target is 1 s).
const PROVISION_DEADLINE: Duration = Duration::from_secs(30);

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
    let crew = Roster::new(agents, [user("@human:example.org")], [], &config).expect("crew");
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
    println!(
        "history (messages)   prompt chars   ~tokens   said since (lines shown)   recent lines"
    );
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
        let crew = Roster::new(agents, [human.clone()], [], &config).expect("crew");
        let mut dispatcher = Dispatcher::new(config, crew).expect("dispatcher");
        let state = dispatcher.rooms.entry(&room);
        for member in [&human, &alice, &user("@bob:example.org")] {
            state.set_member(member.clone(), Membership::Join, None);
        }
        // alice's previous turn was 5 messages ago: older messages are "recent conversation",
        // the last 5 are "said since".
        let previous_turn = history.saturating_sub(5);
        for n in 0..history {
            if n == previous_turn {
                dispatcher.context.take(&alice, &room);
            }
            let event = json!({"type": "m.room.message", "event_id": format!("$h{n}"), "room_id": room,
                "sender": human, "origin_server_ts": n,
                "content": {"msgtype": "m.text", "body": format!("message {n} about the project, nobody mentioned"), "m.mentions": {}}});
            dispatcher.dispatch(
                &RoomEvent::from_json(&event).expect("a valid event"),
                &NoHistory,
                n as u64,
            );
        }
        let waking = json!({"type": "m.room.message", "event_id": "$wake", "room_id": room, "sender": human,
            "content": {"msgtype": "m.text", "body": "@crew_alice:example.org please summarise", "m.mentions": {"user_ids": [alice]}}});
        let decision = dispatcher.dispatch(
            &RoomEvent::from_json(&waking).expect("a valid event"),
            &NoHistory,
            history as u64 + 1,
        );
        assert_eq!(decision.wakes.len(), 1, "alice wakes");
        let missed = dispatcher.context.take(&alice, &room);
        let recent = dispatcher
            .context
            .recent(&room, TurnContext::recent_window(&missed));
        let (context, said_since) = TurnContext::assemble(
            &alice,
            &missed,
            &recent,
            &["$wake"],
            |user| user.localpart().to_owned(),
            "human (@human:example.org)".into(),
            "please summarise".into(),
        );
        let prompt = conversation(&context);
        println!(
            "{history:>18}   {:>12}   {:>7}   {:>24}   {:>12}",
            prompt.len(),
            prompt.len() / 4,
            format!("{said_since} ({})", context.said_since.len()),
            context.recent.len()
        );
    }
}

/// From the request that creates a Worker to the person seeing the invite to its room, on a real
/// Synapse. Two figures per Worker: the request's own latency (when it returns, the room exists
/// and the invite is sent) and when the person's client learns of the invite through a long-poll
/// `/sync`, as Element would (Synapse answers a waiting sync as soon as the invite lands, so
/// there is no poll interval in the figure).
fn worker_provisioning() {
    process::two_core_runtime().block_on(async {
        let env = crew::CrewEnv::start().await;
        let human = env.admin().await;
        let token = std::fs::read_to_string(env.data_dir.join("admin.token")).expect("admin token");
        let url = format!("http://127.0.0.1:{}/workers", env.admin_port);
        let http = reqwest::Client::new();
        // On first start crew opens a DM with the admin: wait for it, so that it does not overlap
        // the first Worker's creation.
        let initial = sync(&human, None).await;
        let mut since = initial["next_batch"]
            .as_str()
            .expect("next_batch")
            .to_owned();
        if initial["rooms"]["invite"].as_object().is_none_or(|rooms| rooms.is_empty()) {
            since = invite_to(human.clone(), None, since).await.2;
        }
        let mut answered = Vec::with_capacity(PROVISIONED);
        let mut invited = Vec::with_capacity(PROVISIONED);
        for n in 0..PROVISIONED {
            let watcher = tokio::spawn(invite_to(
                human.clone(),
                Some(format!("Worker: Bench{n}")),
                since,
            ));
            let started = Instant::now();
            let response = http
                .post(&url)
                .bearer_auth(token.trim())
                .json(&json!({
                    "name": format!("bench{n}"),
                    "role": "benchmark worker",
                    "invite": human.user_id,
                }))
                .send()
                .await
                .expect("POST /workers");
            let status = response.status();
            let created: Value = response.json().await.expect("JSON answer");
            answered.push(started.elapsed());
            assert!(status.is_success(), "POST /workers → {status}: {created}");
            let room = created["worker"]["room"]
                .as_str()
                .unwrap_or_else(|| panic!("the worker has a room: {created}"))
                .to_owned();
            let (seen, invited_to, next_batch) = watcher.await.expect("invite watcher");
            assert_eq!(invited_to, room, "the invite is to the Worker's room");
            invited.push(seen.duration_since(started));
            since = next_batch;
        }
        println!(
            "create a worker → human invited to its room, {PROVISIONED} workers one after another (first: answered {:.0} ms, invite seen {:.0} ms)",
            ms(answered[0]),
            ms(invited[0])
        );
        println!("                         p50 ms   p95 ms   max ms");
        for (what, mut figures) in [
            ("request answered", answered),
            ("invite seen (/sync)", invited),
        ] {
            figures.sort();
            println!(
                "{what:<21}   {:>6.0}   {:>6.0}   {:>6.0}",
                ms(percentile(&figures, 50.0)),
                ms(percentile(&figures, 95.0)),
                ms(figures[figures.len() - 1])
            );
        }
    });
}

/// One `/sync` of `user`: from `since` and waiting for news, or an initial one without.
async fn sync(user: &synapse::TestUser, since: Option<&str>) -> Value {
    // Only what an invite brings: no timeline, no account data, no presence.
    let filter = synapse::enc(
        r#"{"room":{"timeline":{"limit":0},"ephemeral":{"types":[]},"account_data":{"types":[]}},"account_data":{"types":[]},"presence":{"types":[]}}"#,
    );
    let path = match since {
        Some(since) => format!(
            "/_matrix/client/v3/sync?filter={filter}&timeout={}&since={}",
            PROVISION_DEADLINE.as_millis(),
            synapse::enc(since)
        ),
        None => format!("/_matrix/client/v3/sync?filter={filter}&timeout=0"),
    };
    let (status, answer) = user.request(reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "sync: {answer}");
    answer
}

/// Waits on `user`'s `/sync` from `since` until an invite arrives to a room named `name` (crew
/// invites the person elsewhere too, e.g. the admin's DM), or to any room without a name: when it
/// was seen, the room, and the token to continue from.
async fn invite_to(
    user: synapse::TestUser,
    name: Option<String>,
    mut since: String,
) -> (Instant, String, String) {
    let deadline = Instant::now() + PROVISION_DEADLINE;
    loop {
        let answer = sync(&user, Some(&since)).await;
        let seen = Instant::now();
        since = answer["next_batch"]
            .as_str()
            .expect("next_batch")
            .to_owned();
        let named = answer["rooms"]["invite"].as_object().and_then(|rooms| {
            rooms.iter().find_map(|(room, invite)| {
                let events = invite["invite_state"]["events"].as_array()?;
                let named = |name: &String| {
                    events.iter().any(|event| {
                        event["type"] == "m.room.name" && event["content"]["name"] == *name
                    })
                };
                name.as_ref().is_none_or(named).then(|| room.clone())
            })
        });
        if let Some(room) = named {
            return (seen, room, since);
        }
        assert!(
            Instant::now() < deadline,
            "no invite to {name:?} within {PROVISION_DEADLINE:?}"
        );
    }
}

fn main() {
    idle_workers();
    prompt_size_by_history();
    worker_provisioning();
}
