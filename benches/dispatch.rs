//! Busy-room replay through the dispatcher.
//!
//! A generator writes a transcript of 10,000 messages in one room (6 agents, 5 people, about 5%
//! addressed to an agent, in Element, FluffyChat and older-client formats, with replies,
//! threads, edits, notices and agents talking to agents). When it writes each message it also
//! writes the agents that message must wake: the label comes from what the generator meant,
//! never from the parser under test. The replay then runs every message through `decide` and
//! compares: zero spurious and zero missed wakes, or the benchmark fails. It prints decisions
//! per second and the turns an "every agent reads every message" design would run.
//!
//! Run: `cargo bench --bench dispatch` (see docs/benchmarks.md for the figures).

use std::collections::BTreeSet;
use std::io::{BufRead, BufWriter, Write};
use std::time::Instant;

use matrix_crew::dispatch::{
    Agent, DispatchConfig, Dispatcher, MemoryHistory, Role, RoomEvent, RoomState, Roster, decide,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use ruma::UserId;
use serde_json::{Value, json};

const MESSAGES: usize = 10_000;
const ROOM: &str = "!busyRoomQwErTy:example.org";
const ROUNDS: usize = 20;

/// (user id, display name, role)
const AGENTS: [(&str, &str, Role); 6] = [
    ("@crew:example.org", "Crew Manager", Role::Manager),
    ("@crew_writer:example.org", "Writer", Role::Worker),
    ("@crew_coder:example.org", "Coder", Role::Worker),
    ("@crew_ops:example.org", "Ops", Role::Worker),
    ("@crew_research:example.org", "Researcher", Role::Worker),
    ("@crew_design:example.org", "Designer", Role::Worker),
];
/// (user id, display name, allowed to wake agents)
const PEOPLE: [(&str, &str, bool); 5] = [
    ("@alice:example.org", "Alice", true),
    ("@bob:example.org", "Bob", true),
    ("@carol:example.org", "Carol", true),
    ("@erin:example.org", "Erin", true),
    ("@dave:example.org", "Dave", false),
];
const CHATTER: [&str; 12] = [
    "morning all",
    "the build is green again",
    "lunch at noon?",
    "I pushed the fix for the login page",
    "can someone review my PR when free",
    "meeting moved to 3pm",
    "that graph looks off to me",
    "thanks, that helped a lot",
    "I'll be offline tomorrow",
    "which branch are we on for the release?",
    "let me check and get back to you",
    "👍 sounds good",
];

fn pill_html(user: &str, name: &str, style: usize) -> String {
    match style {
        0 => format!("<a href=\"https://matrix.to/#/{user}\">{name}</a>"),
        1 => format!(
            "<a href=\"https://matrix.to/#/{}\">{name}</a>",
            user.replace('@', "%40").replace(':', "%3A")
        ),
        _ => format!("<a href=\"matrix:u/{}?action=chat\">{name}</a>", &user[1..]),
    }
}

struct Generator {
    rng: StdRng,
    next_id: usize,
    /// (event id, sender, agents it mentioned) of earlier messages.
    sent: Vec<(String, String, Vec<String>)>,
}

impl Generator {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("$ev{:06}busy", self.next_id)
    }

    fn event(&mut self, sender: &str, content: Value) -> (String, Value) {
        let id = self.id();
        let event = json!({"type": "m.room.message", "room_id": ROOM, "sender": sender,
            "event_id": id, "origin_server_ts": 1_764_000_000_000u64 + self.next_id as u64,
            "unsigned": {"age": 50}, "content": content});
        (id, event)
    }

    fn person(&mut self, allowed_only: bool) -> (&'static str, &'static str) {
        loop {
            let (id, name, allowed) = PEOPLE[self.rng.gen_range(0..PEOPLE.len())];
            if allowed || !allowed_only {
                return (id, name);
            }
        }
    }

    fn agent(&mut self) -> (&'static str, &'static str) {
        let (id, name, _) = AGENTS[self.rng.gen_range(0..AGENTS.len())];
        (id, name)
    }

    fn chatter(&mut self) -> &'static str {
        CHATTER[self.rng.gen_range(0..CHATTER.len())]
    }

    /// One message and the agents it is meant to wake.
    fn message(&mut self) -> (Value, BTreeSet<String>) {
        let roll = self.rng.gen_range(0..1000);
        let mut wake = BTreeSet::new();
        let (id, sender, mentioned, event) = if roll < 40 {
            // About 5%: addressed to one or two agents by an allowed person, in varied formats.
            let (sender, _) = self.person(true);
            let count = if self.rng.gen_bool(0.2) { 2 } else { 1 };
            let mut targets: Vec<(&str, &str)> =
                AGENTS.iter().map(|(id, name, _)| (*id, *name)).collect();
            targets.shuffle(&mut self.rng);
            targets.truncate(count);
            let text = self.chatter();
            let format = self.rng.gen_range(0..5);
            let ids: Vec<String> = targets.iter().map(|(id, _)| id.to_string()).collect();
            let names: Vec<&str> = targets.iter().map(|(_, name)| *name).collect();
            let content = match format {
                // Element: pills and m.mentions.
                0 | 1 => {
                    json!({"msgtype": "m.text", "body": format!("{}: {text}", names.join(" and ")),
                    "format": "org.matrix.custom.html",
                    "formatted_body": format!("{}: {text}", targets.iter().map(|(i, n)| pill_html(i, n, 0)).collect::<Vec<_>>().join(" and ")),
                    "m.mentions": {"user_ids": ids}})
                }
                // FluffyChat (older): percent-encoded pills, no m.mentions.
                2 => json!({"msgtype": "m.text", "body": format!("{} {text}", names.join(" ")),
                    "format": "org.matrix.custom.html",
                    "formatted_body": format!("{} {text}", targets.iter().map(|(i, n)| pill_html(i, n, 1)).collect::<Vec<_>>().join(" "))}),
                // matrix: URIs.
                3 => json!({"msgtype": "m.text", "body": format!("{} {text}", names.join(" ")),
                    "format": "org.matrix.custom.html",
                    "formatted_body": format!("{} {text}", targets.iter().map(|(i, n)| pill_html(i, n, 2)).collect::<Vec<_>>().join(" "))}),
                // Plain-text client: full user ids in the body.
                _ => json!({"msgtype": "m.text", "body": format!("{}: {text}", ids.join(", "))}),
            };
            wake.extend(ids.iter().cloned());
            let (id, event) = self.event(sender, content);
            (id, sender.to_string(), ids, event)
        } else if roll < 46 && self.sent.iter().any(|(_, s, _)| is_agent(s)) {
            // A reply to an agent's message (Element puts the agent in m.mentions).
            let (sender, _) = self.person(true);
            let (target_event, target, _) = loop {
                let pick = self.sent[self.rng.gen_range(0..self.sent.len())].clone();
                if is_agent(&pick.1) {
                    break pick;
                }
            };
            let element = self.rng.gen_bool(0.5);
            let content = if element {
                json!({"msgtype": "m.text", "body": "ok, go ahead", "m.mentions": {"user_ids": [target]},
                       "m.relates_to": {"m.in_reply_to": {"event_id": target_event}}})
            } else {
                json!({"msgtype": "m.text", "body": format!("> <{target}> earlier words\n\nok, go ahead"),
                       "m.relates_to": {"m.in_reply_to": {"event_id": target_event}}})
            };
            wake.insert(target.clone());
            let (id, event) = self.event(sender, content);
            // Only the Element form mentions; the old form is a reply without a mention.
            let mentioned = if element { vec![target] } else { Vec::new() };
            (id, sender.to_string(), mentioned, event)
        } else if roll < 49 {
            // The Manager hands work to a Worker while handling a person's wake.
            let (target, name) = loop {
                let pick = self.agent();
                if pick.0 != AGENTS[0].0 {
                    break pick;
                }
            };
            let content = json!({"msgtype": "m.text", "body": format!("{name}: please take this one"),
                "format": "org.matrix.custom.html", "formatted_body": format!("{}: please take this one", pill_html(target, name, 0)),
                "m.mentions": {"user_ids": [target]}, "org.matrix-crew.wake_depth": 0});
            wake.insert(target.to_string());
            let (id, event) = self.event(AGENTS[0].0, content);
            (id, AGENTS[0].0.to_string(), vec![target.to_string()], event)
        } else if roll < 51 && self.sent.iter().any(|(_, s, _)| !is_agent(s)) {
            // An edit of a person's message that adds a mention of an agent.
            let (original, original_sender, before) = loop {
                let pick = self.sent[self.rng.gen_range(0..self.sent.len())].clone();
                if !is_agent(&pick.1) {
                    break pick;
                }
            };
            let (target, name) = self.agent();
            let allowed_person = PEOPLE
                .iter()
                .any(|(id, _, ok)| *id == original_sender && *ok);
            let content = json!({"msgtype": "m.text", "body": format!("* {name}: see above"),
                "m.new_content": {"msgtype": "m.text", "body": format!("{name}: see above"), "m.mentions": {"user_ids": [target]}},
                "m.mentions": {"user_ids": [target]},
                "m.relates_to": {"rel_type": "m.replace", "event_id": original}});
            // Each agent wakes at most once per original, and only for people allowed to wake it;
            // a mention counts as made either way.
            if !before.iter().any(|b| b == target) {
                if allowed_person {
                    wake.insert(target.to_string());
                }
                if let Some(entry) = self.sent.iter_mut().find(|(id, _, _)| *id == original) {
                    entry.2.push(target.to_string());
                }
            }
            let (_, event) = self.event(&original_sender, content);
            return (event, wake);
        } else {
            // The 95%: chatter that wakes nobody, in its many disguises.
            let kind = self.rng.gen_range(0..8);
            let (sender, content) = match kind {
                0 => {
                    let (sender, _) = self.person(false);
                    (
                        sender,
                        json!({"msgtype": "m.text", "body": self.chatter(), "m.mentions": {}}),
                    )
                }
                1 => {
                    let (sender, _) = self.person(false);
                    (sender, json!({"msgtype": "m.text", "body": self.chatter()}))
                }
                2 => {
                    // Names an agent without mentioning it.
                    let (sender, _) = self.person(true);
                    let (_, name) = self.agent();
                    (
                        sender,
                        json!({"msgtype": "m.text", "body": format!("I think {name} did that yesterday"), "m.mentions": {}}),
                    )
                }
                3 => {
                    // Quotes a message that mentioned an agent (old-client fallback).
                    let (sender, _) = self.person(true);
                    let (agent, name) = self.agent();
                    (
                        sender,
                        json!({"msgtype": "m.text",
                        "body": format!("> <@alice:example.org> {agent} please check\n\n+1"),
                        "format": "org.matrix.custom.html",
                        "formatted_body": format!("<mx-reply><blockquote>{} please check</blockquote></mx-reply>+1", pill_html(agent, name, 0)),
                        "m.relates_to": {"m.in_reply_to": {"event_id": "$someHumanMessage"}}}),
                    )
                }
                4 => {
                    // In a thread; the fallback points at an agent's message.
                    let (sender, _) = self.person(true);
                    let target = self
                        .sent
                        .iter()
                        .rev()
                        .find(|(_, s, _)| is_agent(s))
                        .map(|(id, _, _)| id.clone())
                        .unwrap_or_else(|| "$noAgentYet".into());
                    (
                        sender,
                        json!({"msgtype": "m.text", "body": self.chatter(), "m.mentions": {},
                        "m.relates_to": {"rel_type": "m.thread", "event_id": "$threadRoot", "is_falling_back": true,
                                         "m.in_reply_to": {"event_id": target}}}),
                    )
                }
                5 => {
                    // Agents answering: plain messages and notices.
                    let (agent, _) = self.agent();
                    let msgtype = if self.rng.gen_bool(0.5) {
                        "m.text"
                    } else {
                        "m.notice"
                    };
                    (
                        agent,
                        json!({"msgtype": msgtype, "body": "Done: summary posted above.", "m.mentions": {}, "org.matrix-crew.wake_depth": 1}),
                    )
                }
                6 => {
                    // Someone not allowed pings an agent.
                    let (agent, name) = self.agent();
                    (
                        "@dave:example.org",
                        json!({"msgtype": "m.text", "body": format!("{name} do my homework"),
                        "format": "org.matrix.custom.html", "formatted_body": format!("{} do my homework", pill_html(agent, name, 0)),
                        "m.mentions": {"user_ids": [agent]}}),
                    )
                }
                _ => {
                    // A bot notice that mentions an agent.
                    let (agent, _) = self.agent();
                    (
                        "@erin:example.org",
                        json!({"msgtype": "m.notice", "body": format!("CI failed, {agent}")}),
                    )
                }
            };
            let (id, event) = self.event(sender, content);
            let mentioned = match kind {
                // Dave's mention still counts as a mention for later edits.
                6 => event["content"]["m.mentions"]["user_ids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            (id, sender.to_string(), mentioned, event)
        };
        // Notices are not remembered by the dispatcher; keep the generator's view the same.
        let notice = event["content"]["msgtype"] == "m.notice";
        if !notice {
            self.sent.push((id, sender, mentioned));
        }
        (event, wake)
    }
}

fn is_agent(user: &str) -> bool {
    AGENTS.iter().any(|(id, _, _)| *id == user)
}

fn setup() -> (DispatchConfig, Roster, RoomState) {
    let config = DispatchConfig {
        worker_pairs: vec![["crew_writer".into(), "crew_coder".into()]],
        ..DispatchConfig::default()
    };
    let agents = AGENTS
        .iter()
        .map(|(id, name, role)| Agent {
            user_id: UserId::parse(*id).expect("valid agent id"),
            role: *role,
            display_name: (*name).into(),
            keywords: Vec::new(),
        })
        .collect();
    let allowed = PEOPLE
        .iter()
        .filter(|(_, _, ok)| *ok)
        .map(|(id, _, _)| UserId::parse(*id).expect("valid person id"));
    let crew = Roster::new(agents, [], allowed, &config).expect("valid crew");
    let mut room = RoomState::default();
    for (id, name) in AGENTS
        .iter()
        .map(|(id, name, _)| (*id, *name))
        .chain(PEOPLE.iter().map(|(id, name, _)| (*id, *name)))
    {
        room.apply_event(
            &RoomEvent::from_json(
                &json!({"type": "m.room.member", "state_key": id, "sender": id,
                "room_id": ROOM, "event_id": format!("$join-{id}"),
                "content": {"membership": "join", "displayname": name}}),
            )
            .expect("a valid member event"),
        );
    }
    (config, crew, room)
}

fn main() {
    // 1. Generate and write the labelled transcript.
    let path = std::env::temp_dir().join(format!(
        "crew-dispatch-transcript-{}.jsonl",
        std::process::id()
    ));
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(0x5eed_d15a),
        next_id: 0,
        sent: Vec::new(),
    };
    {
        let file = std::fs::File::create(&path).expect("temp dir is writable");
        let mut out = BufWriter::new(file);
        for _ in 0..MESSAGES {
            let (event, wake) = generator.message();
            let line = json!({"event": event, "wake": wake});
            writeln!(out, "{line}").expect("write transcript");
        }
        out.flush().expect("flush transcript");
    }

    // 2. Read it back: the events and the labels travel together.
    let file = std::fs::File::open(&path).expect("transcript exists");
    let mut lines = Vec::new();
    let mut events = Vec::new();
    let mut labels: Vec<BTreeSet<String>> = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.expect("read transcript");
        let record: Value = serde_json::from_str(&line).expect("transcript line is JSON");
        events.push(record["event"].clone());
        labels.push(
            record["wake"]
                .as_array()
                .expect("labels")
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        );
        lines.push(serde_json::to_vec(&record["event"]).expect("serialise event"));
    }
    let _ = std::fs::remove_file(&path);
    let (config, crew, room) = setup();
    // Ingest parses each event once into the typed event the dispatcher reads.
    let values = events;
    let events: Vec<RoomEvent> = values
        .iter()
        .map(|event| RoomEvent::from_json(event).expect("a valid event"))
        .collect();

    // 3. Correctness: every decision against its label.
    let mut history = MemoryHistory::new(MESSAGES);
    let mut state = room.clone();
    let (mut produced, mut labelled, mut spurious, mut missed, mut addressed) = (0, 0, 0, 0, 0);
    for (event, label) in events.iter().zip(&labels) {
        let decision = decide(event, &state, &crew, &config, &history);
        state.record(&decision);
        if let Some(fact) = &decision.remember {
            history.remember(fact);
        }
        let woken: BTreeSet<String> = decision.woken().map(|u| u.to_string()).collect();
        produced += woken.len();
        labelled += label.len();
        addressed += usize::from(!label.is_empty());
        let extra: Vec<_> = woken.difference(label).collect();
        let lacking: Vec<_> = label.difference(&woken).collect();
        if !extra.is_empty() || !lacking.is_empty() {
            eprintln!(
                "MISMATCH {:?}: spurious {extra:?} missed {lacking:?}: {decision:?}",
                event.content
            );
        }
        spurious += extra.len();
        missed += lacking.len();
    }

    // 4. Speed: decide over the parsed events (the transaction handler has parsed them), with
    // the history and the one-time flags kept as the Dispatcher keeps them.
    let start = Instant::now();
    let mut wakes = 0usize;
    for _ in 0..ROUNDS {
        let mut history = MemoryHistory::new(MESSAGES);
        let mut state = room.clone();
        for event in &events {
            let decision = decide(event, &state, &crew, &config, &history);
            state.record(&decision);
            if let Some(fact) = &decision.remember {
                history.remember(fact);
            }
            wakes += decision.wakes.len();
        }
    }
    let elapsed = start.elapsed();
    let per_second = (ROUNDS * events.len()) as f64 / elapsed.as_secs_f64();
    std::hint::black_box(wakes);

    // Including JSON parsing of each event.
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let mut history = MemoryHistory::new(MESSAGES);
        let mut state = room.clone();
        for bytes in &lines {
            let event: RoomEvent = serde_json::from_slice(bytes).expect("a valid event");
            let decision = decide(&event, &state, &crew, &config, &history);
            state.record(&decision);
            if let Some(fact) = &decision.remember {
                history.remember(fact);
            }
        }
    }
    let with_parse = (ROUNDS * lines.len()) as f64 / start.elapsed().as_secs_f64();

    // The whole Dispatcher (guards, hints, context buffer, reason log), limits out of the way.
    let dispatch_config = DispatchConfig {
        agent_wakes_per_minute: u32::MAX,
        room_agent_messages_per_minute: u32::MAX,
        ..config.clone()
    };
    let start = Instant::now();
    let mut dispatcher_wakes = 0usize;
    for _ in 0..ROUNDS {
        let mut dispatcher = Dispatcher::new(dispatch_config.clone(), crew.clone()).expect("valid");
        *dispatcher
            .rooms
            .entry(ruma::RoomId::parse(ROOM).expect("valid room").as_ref()) = room.clone();
        let mut history = MemoryHistory::new(MESSAGES);
        for (i, event) in events.iter().enumerate() {
            let decision = dispatcher.dispatch(event, &history, i as u64 * 100);
            if let Some(fact) = &decision.remember {
                history.remember(fact);
            }
            dispatcher_wakes += decision.wakes.len();
        }
    }
    let dispatcher_per_second = (ROUNDS * events.len()) as f64 / start.elapsed().as_secs_f64();

    // 5. The alternative: every agent reads every message (all but its own).
    let every_agent_turns: usize = events
        .iter()
        .map(|e| {
            let sender = e.sender.as_str();
            AGENTS.iter().filter(|(id, _, _)| *id != sender).count()
        })
        .sum();

    println!(
        "dispatcher replay: {} messages, 6 agents, 5 people, {} rounds",
        events.len(),
        ROUNDS
    );
    println!(
        "  messages addressed to an agent (labelled): {addressed} ({:.1}%)",
        addressed as f64 * 100.0 / events.len() as f64
    );
    println!("  wakes labelled by the generator:          {labelled}");
    println!("  wakes produced by decide:                 {produced}");
    println!("  spurious wakes:                           {spurious}");
    println!("  missed wakes:                             {missed}");
    println!("  decide, parsed events:                    {per_second:.0} decisions/s");
    println!("  decide incl. JSON parsing:                {with_parse:.0} decisions/s");
    println!("  Dispatcher::dispatch (all bookkeeping):   {dispatcher_per_second:.0} decisions/s");
    println!("  turns if every agent read every message:  {every_agent_turns}");
    println!("  turns with wake-on-mention:               {produced}");
    assert_eq!(
        dispatcher_wakes,
        produced * ROUNDS,
        "Dispatcher and decide disagree"
    );
    assert_eq!((spurious, missed), (0, 0), "wakes differ from the labels");
    assert_eq!(produced, labelled);
}
