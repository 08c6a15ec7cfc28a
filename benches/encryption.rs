//! What encryption costs: the extra time from a person's mention to the agent's answer in an
//! encrypted DM over a clear one, and the resident memory each agent with a device adds.
//!
//! Run: `cargo bench --bench encryption` (or `--profile dev` for the debug build, as the
//! figures in docs/benchmarks.md say). It starts a real Synapse (with MSC2409/MSC3202 on) and
//! the `crew` binary as the integration tests do, the scripted LLM answering at once, and a
//! person whose client encrypts (matrix-nio). Each round trip is timed by the person's client,
//! from the homeserver accepting the message to the answer arriving (decrypted, in the encrypted
//! room), so the LLM's time is nil and both rooms pay the same sync overheads.

#[path = "../tests/support/crew.rs"]
mod crew;
#[path = "../tests/support/e2e_person.rs"]
mod e2e_person;
#[path = "support/process.rs"]
mod process;
#[path = "../tests/support/scripted_llm.rs"]
mod scripted_llm;
#[path = "../tests/support/synapse.rs"]
mod synapse;
#[path = "../tests/support/tools.rs"]
mod tools;

use std::time::Duration;

use process::{ms, percentile};
use serde_json::json;

/// Round trips per room: enough for a p95 that is not the maximum.
const ROUNDS: usize = 20;
/// Agents given devices for the memory figure.
const AGENTS: usize = 10;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS of crew")
}

async fn round_trips(person: &mut e2e_person::Person, room: &str, manager: &str) -> Vec<Duration> {
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let answer = person
            .call(
                json!({"cmd": "roundtrip", "room_id": room, "body": format!("question {round}"),
                         "mentions": [manager], "sender": manager}),
            )
            .await;
        times.push(Duration::from_secs_f64(
            answer["ms"].as_f64().unwrap() / 1000.0,
        ));
    }
    times.sort();
    times
}

fn main() {
    let runtime = process::two_core_runtime();
    runtime.block_on(async {
        let llm = scripted_llm::ScriptedLlm::start().await;
        llm.set_default(scripted_llm::Reply::text("ok"));
        let upstream = llm.url();
        let mut env = crew::CrewEnv::start_with(move |config| {
            let key_file = config.parent().unwrap().parent().unwrap().join("llm.key");
            std::fs::write(&key_file, "sk-bench").unwrap();
            let mut text = std::fs::read_to_string(config).unwrap();
            text.push_str(&format!(
                "\n[[gateway.routes]]\nname = \"llm\"\nprefix = \"/llm\"\nupstream = \"{upstream}/v1\"\nkind = \"openai\"\ncredentials = [{{ file = \"{}\" }}]\n\n[llm]\nmodel = \"scripted-model\"\n\n[dispatch]\n# Forty round trips a minute to one agent are the benchmark, not a loop.\nagent_wakes_per_minute = 10000\nroom_agent_messages_per_minute = 10000\n",
                key_file.display()
            ));
            std::fs::write(config, text).unwrap();
        })
        .await;
        let manager = env.manager_id();
        let mut person = e2e_person::Person::login(
            &env.synapse.url,
            &env.synapse.user_id(crew::ADMIN),
            "correct horse battery staple",
            &env.root.path().join("person"),
        )
        .await;
        let mut rooms = Vec::new();
        for encrypted in [false, true] {
            let room = person
                .call(json!({"cmd": "create_room", "name": "bench", "invite": [manager],
                             "direct": true, "encrypted": encrypted}))
                .await["room_id"]
                .as_str()
                .unwrap()
                .to_owned();
            person.wait_joined(&room, &manager).await;
            // One warm-up: the first encrypted send shares the room key.
            round_trips_once(&mut person, &room, &manager).await;
            rooms.push(room);
        }
        let clear = round_trips(&mut person, &rooms[0], &manager).await;
        let encrypted = round_trips(&mut person, &rooms[1], &manager).await;
        println!("mention -> answer, {ROUNDS} round trips each, one after another");
        println!("| room | p50 | p95 | max |");
        println!("|---|---:|---:|---:|");
        for (name, times) in [("clear", &clear), ("encrypted", &encrypted)] {
            println!(
                "| {name} | {:.0} ms | {:.0} ms | {:.0} ms |",
                ms(percentile(times, 50.0)),
                ms(percentile(times, 95.0)),
                ms(*times.last().unwrap())
            );
        }
        println!(
            "extra for encryption: p50 {:+.0} ms, p95 {:+.0} ms",
            ms(percentile(&encrypted, 50.0)) - ms(percentile(&clear, 50.0)),
            ms(percentile(&encrypted, 95.0)) - ms(percentile(&clear, 95.0)),
        );

        // Memory: AGENTS Workers invited into an encrypted room get devices (and the room
        // key when the person speaks there).
        let pid = env.crew.as_ref().unwrap().pid();
        let mut names = Vec::new();
        for index in 0..AGENTS {
            let name = format!("w{index}");
            let (ok, out) = env.cli(&["workers", "add", &name]);
            assert!(ok, "{out}");
            names.push(format!("@crew_{name}:crew.test"));
        }
        let before = rss_kib(pid);
        let invite: Vec<&str> = names.iter().map(String::as_str).collect();
        let team = person.create_encrypted_room("team", &invite, false).await;
        for agent in &names {
            person.wait_joined(&team, agent).await;
        }
        tools::wait_for("every Worker's device", Duration::from_secs(120), || async {
            let devices = std::fs::read_dir(env.data_dir.join("crypto"))
                .map(|entries| entries.count())
                .unwrap_or(0);
            (devices > AGENTS).then_some(())
        })
        .await;
        person.send(&team, "hello team", &[]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!(
            "crew resident memory: {before} KiB with the Manager's device, {after} KiB with {AGENTS} more agent devices: {:.0} KiB per encrypted agent",
            (after as f64 - before as f64) / AGENTS as f64
        );
        env.kill_crew();
    });
}

async fn round_trips_once(person: &mut e2e_person::Person, room: &str, manager: &str) {
    person
        .call(
            json!({"cmd": "roundtrip", "room_id": room, "body": "warm-up",
                     "mentions": [manager], "sender": manager}),
        )
        .await;
}
