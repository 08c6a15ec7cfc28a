//! The event pump: takes events from the durable inbox in order, lets the dispatcher decide who
//! wakes, and turns the decision into durable wakes in the same sled transaction that removes the
//! event from the inbox. A crash therefore means handling an event again (never losing it), and
//! every send uses a transaction id derived from the event, so handling twice never answers twice.
//!
//! Nothing here calls the homeserver: joins, declines, notices, `!crew` answers, the offer of an
//! unencrypted room and `!crew remove` are [`crate::outbox::Effect`]s, committed with the wakes
//! and performed by `server::outbox_runner`.

use std::sync::Arc;

use ruma::events::TimelineEventType;
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::agent::commands::{self, Command};
use crate::clock::now_ms;
use crate::dispatch::Membership;
use crate::dispatch::event::RoomEvent;
use crate::dispatch::pump::Pump;
use crate::dispatch::queue::{Handled, PendingWake};
use crate::dispatch::{Decision, Signal};
use crate::matrix::OutgoingMessage;
use crate::matrix::message::ReplyTo;
use crate::outbox::{Effect, Staged};

/// Runs the pump until `shutdown` on [`crate::dispatch::pump::Pump`]'s schedule (a chunk of
/// entries per sled transaction, yielding between chunks); [`handle`] decides each entry.
pub(super) async fn run(crew: Arc<Service>, shutdown: CancellationToken) {
    Pump::new(&crew.inbox, &crew.queue, &crew.outbox)
        .run(
            &shutdown,
            |seq, entry| {
                let (wakes, effects) = handle(&crew, &entry.event);
                Handled {
                    seq,
                    wakes,
                    effects,
                }
            },
            |handled| {
                if handled.iter().any(|item| !item.effects.is_empty()) {
                    crew.outbox.notify();
                }
                for wake in handled.into_iter().flat_map(|item| item.wakes) {
                    crew.wake_agent(wake.agent);
                }
            },
        )
        .await;
}

/// Read → decide → commit for inbox entry `seq`: the dispatcher's decision, its wakes and its
/// effects are committed in one sled transaction with the entry's removal, and the outbox is
/// told. Returns the agents woken (whose turns the caller starts). One entry at a time, for the
/// tests that drive the pump by hand; [`run`] commits a chunk per transaction.
#[cfg(test)]
pub(crate) fn decide_and_commit(
    crew: &Arc<Service>,
    seq: crate::appservice::inbox::EntryId,
    event: &RoomEvent,
) -> Result<Vec<ruma::OwnedUserId>, crate::store::StoreError> {
    let (wakes, effects) = handle(crew, event);
    crew.queue
        .commit_with_effects(&crew.inbox, seq, &wakes, &crew.outbox, &effects)?;
    if !effects.is_empty() {
        crew.outbox.notify();
    }
    Ok(wakes.into_iter().map(|wake| wake.agent).collect())
}

/// Handles one event and returns the wakes and the homeserver effects it causes (committed
/// together by the caller). Never fails: problems are logged. Not `async`: nothing here may
/// wait on the homeserver, which the compiler now checks.
#[tracing::instrument(skip_all, fields(event_id = %event.event_id))]
fn handle(crew: &Arc<Service>, event: &RoomEvent) -> (Vec<PendingWake>, Vec<Staged>) {
    let decision = dispatch(crew, event);
    let room = &event.room_id;
    let sender = &event.sender;
    let cause = event.event_id.to_string();
    let mut effects = Vec::new();
    let mut stage = |effect: Effect| {
        effects.push(Staged {
            room: room.clone(),
            cause: cause.clone(),
            effect,
        });
    };
    if let Some(effect) = membership_effect(crew, event) {
        if let Effect::Join { agent } = &effect {
            crew.dispatch.expect_joined(room, agent);
        }
        stage(effect);
    }
    for signal in &decision.signals {
        if let Some(effect) = signal_effect(crew, room, event, &decision, signal) {
            stage(effect);
        }
    }
    if let Some(command) = command_for_manager(crew, event) {
        let may_talk = crew.config.invites.allows(sender, &crew.config.admins);
        match crew.commands.admit(room, may_talk, now_ms()) {
            Ok(()) => stage(answer_command(crew, room, sender, event, command)),
            Err(why) => tracing::info!(?why, %room, %sender, "a !crew command left unanswered"),
        }
        return (Vec::new(), effects);
    }
    let wakes = PendingWake::for_decision(&decision, room, event, now_ms());
    (wakes, effects)
}

/// Runs the dispatcher on one event (reloading the roster first if it changed); the dispatch
/// service saves the room's state.
fn dispatch(crew: &Service, event: &RoomEvent) -> Decision {
    let decision = crew
        .dispatch
        .dispatch(event, now_ms(), crew.team.registry.generation(), || {
            super::dispatch_roster(
                &crew.config,
                &crew.manager,
                crew.agents.manager_name(),
                &crew.team,
            )
        });
    tracing::debug!(
        woken = ?decision.wakes.iter().map(|w| w.agent.as_str()).collect::<Vec<_>>(),
        ignored = ?decision.ignored,
        skipped = ?decision.skips.iter().map(|s| (s.agent.as_str(), s.reason)).collect::<Vec<_>>(),
        "dispatched"
    );
    decision
}

/// What an invite or a join of one of our agents asks of the homeserver: join or decline an
/// invite (with the reason), learn a room an agent joined.
fn membership_effect(crew: &Service, event: &RoomEvent) -> Option<Effect> {
    let sender = &event.sender;
    let target = UserId::parse(event.state_key.as_deref()?).ok()?;
    if !crew.is_ours(&target) {
        return None;
    }
    let membership = event.member()?.membership?;
    match membership {
        Membership::Invite => {
            let known = target == crew.manager
                || matches!(crew.team.registry.by_user(&target), Ok(Some(_)));
            let reason = if !known {
                Some(format!(
                    "{target} is not an agent of this crew; ask the Manager to create it first"
                ))
            } else if !crew.is_ours(sender)
                && !crew.config.invites.allows(sender, &crew.config.admins)
            {
                Some(format!(
                    "{target} only accepts invites from the people its admins allow; ask one of them to invite it"
                ))
            } else {
                None
            };
            Some(match reason {
                None => Effect::Join { agent: target },
                Some(reason) => Effect::Decline {
                    agent: target,
                    reason,
                },
            })
        }
        Membership::Join => Some(Effect::Seed { agent: target }),
        _ => None,
    }
}

/// The one-time notice a dispatcher signal asks for (never waking anyone: `m.notice`), or the
/// offer of an unencrypted room (created by the outbox, which then says so).
fn signal_effect(
    crew: &Service,
    room: &OwnedRoomId,
    event: &RoomEvent,
    decision: &Decision,
    signal: &Signal,
) -> Option<Effect> {
    let event_id = event.event_id.as_str();
    let (agent, message, key) = match signal {
        Signal::MentionHint { agent } => {
            let name = display_name(crew, room, agent);
            (
                agent.clone(),
                OutgoingMessage::notice(format!(
                    "I only wake up when I am mentioned: type `@` and pick **{name}** from the list (or reply to one of my messages), and I will answer."
                )),
                format!("hint:{event_id}:{agent}"),
            )
        }
        Signal::LoopStopped { depth, max_depth } => {
            let agent = decision
                .sender
                .clone()
                .filter(|sender| crew.is_ours(sender))
                .unwrap_or_else(|| crew.manager.clone());
            (
                agent,
                OutgoingMessage::notice(format!(
                    "Agents stopped waking each other here: the chain reached depth {depth} (the limit is {max_depth}). Mention an agent to continue."
                )),
                format!("loop:{event_id}"),
            )
        }
        Signal::EncryptedRoom { agent } => {
            let humans = crew
                .dispatch
                .joined_members_where(room, |member| !crew.is_ours(member));
            let name = display_name(crew, room, agent);
            return Some(Effect::OfferRoom {
                agent: agent.clone(),
                name: format!("{name} (unencrypted)"),
                topic: format!("A room where {name} can read what you write"),
                invite: humans,
                txn_key: format!("encrypted:{room}:{agent}"),
            });
        }
    };
    Some(Effect::Send {
        agent,
        txn_key: key,
        content: message.to_content(),
    })
}

/// An agent's or person's name in a room, falling back to the localpart.
fn display_name(crew: &Service, room: &RoomId, user: &UserId) -> String {
    crew.dispatch.display_name(room, user)
}

/// A `!crew` command from a person, in a room the Manager is in.
fn command_for_manager(crew: &Service, event: &RoomEvent) -> Option<Command> {
    if crew.is_ours(&event.sender) || event.kind != TimelineEventType::RoomMessage {
        return None;
    }
    let command = Command::parse(&event.message()?.body)?;
    crew.dispatch
        .is_joined(&event.room_id, &crew.manager)
        .then_some(command)
}

/// The Manager's answer to a `!crew` command, in reply to it. `!crew remove` acts on the
/// homeserver (the Worker leaves its rooms), so the outbox removes the Worker and then answers.
fn answer_command(
    crew: &Arc<Service>,
    room: &OwnedRoomId,
    sender: &UserId,
    event: &RoomEvent,
    command: Command,
) -> Effect {
    use crate::agent::registry::WorkerState;
    let event_id = event.event_id.as_str();
    let text = if command.changes_state() && !crew.is_admin(sender) {
        "Sorry, only the admins can do that. `!crew help` lists what everyone can ask.".to_owned()
    } else {
        match command {
            Command::Help => commands::help(),
            Command::Workers => match crate::agent::status::team_status(
                &crew.team.registry,
                &crew.tasks,
                &crew.agents.activity,
                &crew.agents.busy,
            ) {
                Ok(statuses) => crate::agent::status::render(
                    &room_view(crew, room, sender).workers(statuses),
                    now_ms(),
                ),
                Err(error) => format!("I cannot read the roster: {error}"),
            },
            Command::Tasks => match crew.tasks.list(&crate::tasks::TaskFilter::open()) {
                Ok(tasks) => commands::list_tasks(
                    &room_view(crew, room, sender)
                        .tasks(tasks, |name| crew.team.registry.user_id_for(name).ok()),
                ),
                Err(error) => format!("I cannot read the tasks: {error}"),
            },
            Command::Cancel(task) => match crew.tasks.cancel(&task, now_ms()) {
                Ok(task) => format!("Cancelled {}: {}.", task.id, task.title),
                Err(error) => error.to_string(),
            },
            Command::Stop(name) => {
                commands::set_state(&crew.team.registry, &name, WorkerState::Stopped)
            }
            Command::Model(name, model) => commands::set_model(&crew.team.registry, &name, &model),
            Command::Start(name) => {
                commands::set_state(&crew.team.registry, &name, WorkerState::Active)
            }
            Command::Remove(name) => {
                return Effect::RemoveWorker {
                    name,
                    command: reply_context(event),
                    txn_key: format!("command:{event_id}"),
                };
            }
            Command::Why(event_id) => why(crew, room, sender, &event_id),
            Command::Projects => commands::projects_answer(
                crew.agents.projects.projects(),
                &room_view(crew, room, sender),
                room,
                None,
            ),
            Command::Project(id) => commands::projects_answer(
                crew.agents.projects.projects(),
                &room_view(crew, room, sender),
                room,
                Some(&id),
            ),
            Command::Unknown(verb) => {
                format!("`{verb}` is not a command I know. {}", commands::help())
            }
        }
    };
    let reply = OutgoingMessage::notice(text).reply_to(ReplyTo::event(event));
    Effect::Send {
        agent: crew.manager.clone(),
        txn_key: format!("command:{event_id}"),
        content: reply.to_content(),
    }
}

/// What a reply to `event` needs of it (its id and thread), kept in an effect.
fn reply_context(event: &RoomEvent) -> Value {
    let mut kept = serde_json::json!({ "event_id": event.event_id });
    if let Some(relates) = event.message().and_then(|m| m.relates_to.as_ref()) {
        let mut out = serde_json::Map::new();
        if let Some(rel_type) = &relates.rel_type {
            out.insert("rel_type".into(), Value::from(rel_type.as_str()));
        }
        if let Some(id) = &relates.event_id {
            out.insert("event_id".into(), Value::from(id.as_str()));
        }
        kept["content"] = serde_json::json!({ "m.relates_to": out });
    }
    kept
}

/// What read-only commands show `sender` in `room`: everything to an admin, else only this
/// room's Workers and their (or the sender's) tasks.
fn room_view(crew: &Service, room: &RoomId, sender: &UserId) -> commands::RoomView {
    let workers_here = (!crew.is_admin(sender)).then(|| {
        crew.dispatch
            .joined_members_where(room, |member| crew.is_ours(member))
    });
    commands::RoomView {
        workers_here,
        asker: sender.to_owned(),
    }
}

/// `!crew why`: the dispatcher's kept decision, in words. Room-scoped like the other read-only
/// commands: to anyone but an admin, a decision about another room's event is answered as if
/// none was kept, so the answer does not even say that the event exists.
fn why(crew: &Service, room: &RoomId, sender: &UserId, event_id: &str) -> String {
    let Ok(event_id) = ruma::EventId::parse(event_id) else {
        return format!("`{event_id}` is not an event id (they start with `$`).");
    };
    let kept = crew
        .dispatch
        .kept(&event_id)
        .filter(|kept| crew.is_admin(sender) || kept.decision.room_id.as_deref() == Some(room));
    let Some(kept) = kept else {
        return "I kept no decision for that event (unknown to me, or older than the retention)."
            .to_owned();
    };
    let decision = &kept.decision;
    let mut lines = Vec::new();
    if let Some(reason) = decision.ignored {
        lines.push(format!("Nobody woke: {}.", wire_name(&reason)));
    }
    for wake in &decision.wakes {
        let reasons: Vec<String> = wake.reasons.iter().map(wire_name).collect();
        lines.push(format!(
            "{} woke: {} (depth {}).",
            wake.agent,
            reasons.join(", "),
            wake.depth
        ));
    }
    for skip in &decision.skips {
        lines.push(format!(
            "{} did not wake: {}.",
            skip.agent,
            wire_name(&skip.reason)
        ));
    }
    match crew.outbox.failures(event_id.as_str()) {
        Ok(failures) => {
            for failure in failures {
                lines.push(format!(
                    "{} failed for good: {}.",
                    failure.what, failure.reason
                ));
            }
        }
        Err(error) => lines.push(format!("(I cannot read what failed: {error}.)")),
    }
    if lines.is_empty() {
        lines.push("No agent was concerned.".to_owned());
    }
    lines.join("\n")
}

/// A reason in its wire name (`no_mention`, `mentioned`…), as the admin API shows it.
fn wire_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The pump over a sled temp dir, with no homeserver: its homeserver URL points at a closed
/// port, and `handle` cannot await, so nothing here could have called one.
#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::outbox::Effect;

    const ADMIN: &str = "@admin:crew.test";
    const MANAGER: &str = "@crew:crew.test";
    const ROOM: &str = "!room:crew.test";

    async fn service(dir: &std::path::Path) -> Arc<Service> {
        let written = crate::init::init(&crate::init::InitOptions {
            data_dir: dir.join("data"),
            homeserver: "http://127.0.0.1:9".parse().unwrap(),
            server_name: "crew.test".try_into().unwrap(),
            admins: vec![UserId::parse(ADMIN).unwrap()],
            user_prefix: "crew_".into(),
            appservice_id: "crew".into(),
            manager_localpart: "crew".into(),
            appservice_url: "http://127.0.0.1:9".parse().unwrap(),
            bind: "127.0.0.1:0".parse().unwrap(),
            admin_bind: "127.0.0.1:0".parse().unwrap(),
            force: false,
            llm: None,
        })
        .unwrap();
        let mut loaded = crate::config::Config::load(&written.config).unwrap();
        // The offer of an unencrypted room is made only where encryption is off.
        loaded.config.encryption.enabled = false;
        super::super::open(loaded, CancellationToken::new())
            .await
            .unwrap()
            .crew
    }

    /// Puts `events` into the inbox as one transaction and runs read → decide → commit on each.
    async fn pump(crew: &Arc<Service>, txn: &str, events: &[Value]) -> Vec<ruma::OwnedUserId> {
        let raw: Vec<Box<serde_json::value::RawValue>> = events
            .iter()
            .map(|event| serde_json::value::to_raw_value(event).unwrap())
            .collect();
        crew.inbox.ingest_durably(txn, &raw).await.unwrap();
        let mut woken = Vec::new();
        for (seq, entry) in crew.inbox.pending(100).unwrap() {
            woken.extend(decide_and_commit(crew, seq, &entry.event).unwrap());
        }
        assert!(crew.inbox.is_empty(), "every event left the inbox");
        woken
    }

    fn effects(crew: &Service) -> Vec<Effect> {
        crew.outbox
            .pending()
            .unwrap()
            .into_iter()
            .map(|staged| staged.effect)
            .collect()
    }

    fn member(id: &str, sender: &str, target: &str, membership: &str) -> Value {
        json!({"type": "m.room.member", "room_id": ROOM, "event_id": id, "sender": sender,
               "state_key": target, "origin_server_ts": 1, "content": {"membership": membership}})
    }

    fn message(id: &str, body: &str, mentions: &[&str]) -> Value {
        json!({"type": "m.room.message", "room_id": ROOM, "event_id": id, "sender": ADMIN,
               "origin_server_ts": 2,
               "content": {"msgtype": "m.text", "body": body, "m.mentions": {"user_ids": mentions}}})
    }

    /// The Manager invited by an admin and joined: what every later test starts from.
    async fn joined(crew: &Arc<Service>) {
        let woken = pump(
            crew,
            "t-invite",
            &[
                member("$invite", ADMIN, MANAGER, "invite"),
                // (The room's earlier state comes from seeding it after the join, in real life.)
                member("$admin", ADMIN, ADMIN, "join"),
            ],
        )
        .await;
        assert!(woken.is_empty());
        let manager = UserId::parse(MANAGER).unwrap();
        assert_eq!(
            effects(crew),
            [Effect::Join {
                agent: manager.clone()
            }]
        );
        let pending = crew.outbox.pending().unwrap();
        assert_eq!(pending[0].cause, "$invite", "kept for !crew why");
        // The outbox has not run: the pump decides as if the join had happened.
        let (key, _) = crew
            .outbox
            .next(&RoomId::parse(ROOM).unwrap())
            .unwrap()
            .unwrap();
        crew.outbox.done(&key).unwrap();
    }

    #[tokio::test]
    async fn an_invite_commits_a_join_and_a_mention_a_wake_with_the_inbox_removal() {
        let dir = tempfile::tempdir().unwrap();
        let crew = service(dir.path()).await;
        joined(&crew).await;
        let woken = pump(
            &crew,
            "t-mention",
            &[message("$ask", &format!("{MANAGER}: hello"), &[MANAGER])],
        )
        .await;
        let manager = UserId::parse(MANAGER).unwrap();
        assert_eq!(woken, std::slice::from_ref(&manager));
        let queued = crew.queue.pending_for(&manager).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].wake.event.event_id, "$ask");
        assert!(
            effects(&crew).is_empty(),
            "a mention needs no homeserver effect"
        );

        // A stranger's invite is declined, with the reason, through the outbox too.
        pump(
            &crew,
            "t-stranger",
            &[
                json!({"type": "m.room.member", "room_id": "!other:crew.test",
                     "event_id": "$stranger", "sender": "@mallory:crew.test",
                     "state_key": MANAGER, "content": {"membership": "invite"}}),
            ],
        )
        .await;
        let declined = effects(&crew);
        assert!(
            matches!(&declined[..], [Effect::Decline { reason, .. }] if reason.contains("admins allow")),
            "{declined:?}"
        );
    }

    #[tokio::test]
    async fn crew_remove_and_the_encrypted_room_offer_are_effects_not_calls() {
        let dir = tempfile::tempdir().unwrap();
        let crew = service(dir.path()).await;
        joined(&crew).await;
        pump(
            &crew,
            "t-remove",
            &[message("$rm", "!crew remove alice", &[])],
        )
        .await;
        let staged = effects(&crew);
        assert!(
            staged.iter().any(
                |effect| matches!(effect, Effect::RemoveWorker { name, command, txn_key }
                if name == "alice" && command["event_id"] == "$rm" && txn_key == "command:$rm")
            ),
            "{staged:?}"
        );
        // (Besides the one-time hint that the Manager wakes only when mentioned.)
        while let Some((key, _)) = crew.outbox.next(&RoomId::parse(ROOM).unwrap()).unwrap() {
            crew.outbox.done(&key).unwrap();
        }

        pump(
            &crew,
            "t-encryption",
            &[
                json!({"type": "m.room.encryption", "room_id": ROOM, "event_id": "$enc",
                     "sender": ADMIN, "state_key": "",
                     "content": {"algorithm": "m.megolm.v1.aes-sha2"}}),
            ],
        )
        .await;
        let staged = effects(&crew);
        let manager = UserId::parse(MANAGER).unwrap();
        let admin = UserId::parse(ADMIN).unwrap();
        assert!(
            matches!(&staged[..], [Effect::OfferRoom { agent, invite, txn_key, .. }]
                if *agent == manager && *invite == std::slice::from_ref(&admin)
                    && txn_key == &format!("encrypted:{ROOM}:{MANAGER}")),
            "{staged:?}"
        );
        // Said once: the next encrypted event stages nothing more.
        pump(
            &crew,
            "t-encrypted",
            &[
                json!({"type": "m.room.encrypted", "room_id": ROOM, "event_id": "$e1",
                     "sender": ADMIN, "content": {}}),
            ],
        )
        .await;
        assert_eq!(effects(&crew).len(), 1);
    }

    #[tokio::test]
    async fn a_crash_before_the_commit_leaves_the_event_and_after_it_everything_it_caused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let crew = service(dir.path()).await;
            joined(&crew).await;
            let raw = [serde_json::value::to_raw_value(&message(
                "$ask",
                &format!("{MANAGER}: hi"),
                &[MANAGER],
            ))
            .unwrap()];
            crew.inbox.ingest_durably("t-ask", &raw).await.unwrap();
            // Decided but not committed (the process dies here): nothing is queued.
            let _ = handle(&crew, &crew.inbox.pending(1).unwrap()[0].1.event);
            crew.store.flush().await.unwrap();
        }
        let crew = service_again(dir.path()).await;
        let manager = UserId::parse(MANAGER).unwrap();
        assert!(crew.queue.pending_for(&manager).unwrap().is_empty());
        assert_eq!(crew.inbox.len(), 1, "the event waits in the inbox");
        for (seq, entry) in crew.inbox.pending(10).unwrap() {
            decide_and_commit(&crew, seq, &entry.event).unwrap();
        }
        assert_eq!(crew.queue.pending_for(&manager).unwrap().len(), 1);
        assert!(crew.inbox.is_empty());
    }

    /// The service over an existing data directory (a restart).
    async fn service_again(dir: &std::path::Path) -> Arc<Service> {
        let loaded = crate::config::Config::load(&dir.join("data/config.toml")).unwrap();
        super::super::open(loaded, CancellationToken::new())
            .await
            .unwrap()
            .crew
    }
}
