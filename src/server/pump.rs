//! The event pump: takes events from the durable inbox in order, lets the dispatcher decide who
//! wakes, and turns the decision into durable wakes in the same sled transaction that removes the
//! event from the inbox. A crash therefore means handling an event again (never losing it), and
//! every send uses a transaction id derived from the event, so handling twice never answers twice.

use std::sync::Arc;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::agent::commands::{self, Command};
use crate::clock::now_ms;
use crate::dispatch::queue::PendingWake;
use crate::dispatch::{Decision, Signal};
use crate::matrix::message::ReplyTo;
use crate::matrix::{CreateRoom, OutgoingMessage};
use crate::outbox::{Effect, Staged};

/// Events taken from the inbox per round.
const BATCH: usize = 100;

pub(super) async fn run(crew: Arc<Service>, shutdown: CancellationToken) {
    loop {
        let batch = match crew.inbox.pending(BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, "cannot read the inbox; retrying");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = crew.inbox.arrived() => continue,
                () = shutdown.cancelled() => return,
            }
        }
        for (seq, entry) in batch {
            if shutdown.is_cancelled() {
                return;
            }
            let (wakes, effects) = handle(&crew, &entry.event).await;
            if let Err(error) =
                crew.queue
                    .commit_with_effects(&crew.inbox, seq, &wakes, &crew.outbox, &effects)
            {
                tracing::error!(%error, seq, "cannot queue wakes; the event stays in the inbox");
                continue;
            }
            if !effects.is_empty() {
                crew.outbox.notify();
            }
            for wake in wakes {
                crew.wake_agent(wake.agent);
            }
        }
    }
}

/// Handles one event and returns the wakes and the homeserver effects it causes (committed
/// together by the caller). Never fails: problems are logged.
#[tracing::instrument(skip_all, fields(event_id = event.get("event_id").and_then(|id| id.as_str()).unwrap_or("?")))]
async fn handle(crew: &Arc<Service>, event: &Value) -> (Vec<PendingWake>, Vec<Staged>) {
    let decision = dispatch(crew, event);
    if let Some(Err(error)) = decision
        .remember
        .as_ref()
        .map(|fact| crew.history.remember(fact))
    {
        tracing::error!(%error, "cannot remember the event's sender");
    }
    let room = event
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|id| RoomId::parse(id).ok());
    let sender = event
        .get("sender")
        .and_then(Value::as_str)
        .and_then(|id| UserId::parse(id).ok());
    let (Some(room), Some(sender)) = (room, sender) else {
        return (Vec::new(), Vec::new());
    };
    let cause = event
        .get("event_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut effects = Vec::new();
    let mut stage = |effect: Effect| {
        effects.push(Staged {
            room: room.clone(),
            cause: cause.clone(),
            effect,
        });
    };
    if event.get("type").and_then(Value::as_str) == Some("m.room.member")
        && let Some(effect) = membership_effect(crew, &sender, event)
    {
        if let Effect::Join { agent } = &effect {
            expect_joined(crew, &room, agent);
        }
        stage(effect);
    }
    for signal in &decision.signals {
        if let Some(effect) = signal_effect(crew, &room, event, &decision, signal).await {
            stage(effect);
        }
    }
    if let Some(command) = command_for_manager(crew, &room, &sender, event) {
        let may_talk = crew.config.invites.allows(&sender, &crew.config.admins);
        match crew.commands.admit(&room, may_talk, now_ms()) {
            Ok(()) => stage(answer_command(crew, &room, &sender, event, command).await),
            Err(why) => tracing::info!(?why, %room, %sender, "a !crew command left unanswered"),
        }
        return (Vec::new(), effects);
    }
    let queued_ms = now_ms();
    let wakes = decision
        .wakes
        .iter()
        .map(|wake| PendingWake {
            agent: wake.agent.clone(),
            room: room.clone(),
            event: event.clone(),
            depth: wake.depth,
            reasons: wake.reasons.clone(),
            queued_ms,
        })
        .collect();
    (wakes, effects)
}

/// Runs the dispatcher on one event (reloading the roster first if it changed) and saves the
/// room's state.
fn dispatch(crew: &Service, event: &Value) -> Decision {
    let mut state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let generation = crew.team.registry.generation();
    if generation != state.roster_generation {
        match super::dispatch_roster(
            &crew.config,
            &crew.manager,
            crew.agents.manager_name(),
            &crew.team,
        ) {
            Ok(roster) => {
                state.dispatcher.set_roster(roster);
                state.roster_generation = generation;
            }
            Err(error) => tracing::error!(%error, "cannot reload the roster; keeping the old one"),
        }
    }
    let decision = state.dispatcher.dispatch(event, &crew.history, now_ms());
    let room = event
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|id| RoomId::parse(id).ok());
    if let Some((room, room_state)) = room.and_then(|room| {
        state
            .dispatcher
            .rooms
            .get(&room)
            .map(|state| (room.clone(), state))
    }) {
        if room_state.joined_or_invited(|user| crew.is_ours(user)) {
            // The member map is saved when it changes, not re-serialised for every message.
            if decision.room_changed {
                crew.persist_room(&room, room_state);
            }
            if decision.message {
                crew.persist_context(&room, &state.dispatcher);
            }
        } else if event.get("type").and_then(Value::as_str) == Some("m.room.member") {
            // None of our agents is in the room any more: its model and conversation go.
            crew.forget_room(&room, &mut state.dispatcher);
        }
    }
    tracing::debug!(
        woken = ?decision.wakes.iter().map(|w| w.agent.as_str()).collect::<Vec<_>>(),
        ignored = ?decision.ignored,
        skipped = ?decision.skips.iter().map(|s| (s.agent.as_str(), s.reason)).collect::<Vec<_>>(),
        "dispatched"
    );
    decision
}

/// Decides as if the join staged for `agent` had happened: the next event in the inbox may
/// already be for it, before the outbox has joined and its echo has arrived. (A join that
/// fails is recorded for `!crew why`, and the room's state is fetched after a join that works.)
fn expect_joined(crew: &Service, room: &RoomId, agent: &UserId) {
    let mut state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let room_state = state.dispatcher.rooms.entry(room);
    if !room_state.is_joined(agent) {
        room_state.set_member(agent.to_owned(), crate::dispatch::Membership::Join, None);
        let snapshot = room_state.clone();
        drop(state);
        crew.persist_room(room, &snapshot);
    }
}

/// What an invite or a join of one of our agents asks of the homeserver: join or decline an
/// invite (with the reason), learn a room an agent joined.
fn membership_effect(crew: &Service, sender: &UserId, event: &Value) -> Option<Effect> {
    let target = event
        .get("state_key")
        .and_then(Value::as_str)
        .and_then(|id| UserId::parse(id).ok())?;
    if !crew.is_ours(&target) {
        return None;
    }
    let membership = event
        .pointer("/content/membership")
        .and_then(Value::as_str)
        .unwrap_or("");
    match membership {
        "invite" => {
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
        "join" => Some(Effect::Seed { agent: target }),
        _ => None,
    }
}

/// Fetches a room's whole state as `agent` (we see nothing from before we joined) and gives it
/// to the dispatcher.
pub(super) async fn seed_room(crew: &Service, agent: &UserId, room: &RoomId) {
    match crew.client.room_state(agent, room).await {
        Ok(events) => {
            let mut state = crew
                .dispatcher
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let room_state = state.dispatcher.rooms.entry(room);
            for event in &events {
                room_state.apply_event(event);
            }
            let snapshot = room_state.clone();
            drop(state);
            crew.persist_room(room, &snapshot);
        }
        Err(error) => super::log_matrix_error("cannot fetch room state", &error),
    }
}

/// The one-time notice a dispatcher signal asks for (never waking anyone: `m.notice`). The
/// offer of an unencrypted room is still created here, before the notice that names it.
async fn signal_effect(
    crew: &Service,
    room: &OwnedRoomId,
    event: &Value,
    decision: &Decision,
    signal: &Signal,
) -> Option<Effect> {
    let event_id = event.get("event_id").and_then(Value::as_str).unwrap_or("");
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
            let humans = joined_members_where(crew, room, |member| !crew.is_ours(member));
            let name = display_name(crew, room, agent);
            let offer = CreateRoom {
                name: Some(format!("{name} (unencrypted)")),
                topic: Some(format!("A room where {name} can read what you write")),
                invite: humans,
                ..CreateRoom::default()
            };
            let text = match crew.client.create_room(agent, &offer).await {
                Ok(_) => "This room is encrypted and encryption is turned off for this crew (`encryption.enabled = false` in its config), so I cannot read anything said here. I opened an unencrypted room and invited you: talk to me there.".to_owned(),
                Err(error) => {
                    super::log_matrix_error("cannot open an unencrypted room", &error);
                    "This room is encrypted and encryption is turned off for this crew (`encryption.enabled = false` in its config), so I cannot read anything said here. Invite me into an unencrypted room instead.".to_owned()
                }
            };
            (
                agent.clone(),
                OutgoingMessage::notice(text),
                format!("encrypted:{room}:{agent}"),
            )
        }
    };
    Some(Effect::Send {
        agent,
        txn_key: key,
        content: message.to_content(),
    })
}

/// An agent's or person's name in a room, falling back to the localpart.
pub(crate) fn display_name(crew: &Service, room: &RoomId, user: &UserId) -> String {
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    state
        .dispatcher
        .rooms
        .get(room)
        .and_then(|room| room.member(user))
        .and_then(|member| member.display_name.clone())
        .unwrap_or_else(|| user.localpart().to_owned())
}

/// A `!crew` command from a person, in a room the Manager is in.
fn command_for_manager(
    crew: &Service,
    room: &RoomId,
    sender: &UserId,
    event: &Value,
) -> Option<Command> {
    if crew.is_ours(sender) || event.get("type").and_then(Value::as_str) != Some("m.room.message") {
        return None;
    }
    let command = Command::parse(event.pointer("/content/body").and_then(Value::as_str)?)?;
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let joined = state
        .dispatcher
        .rooms
        .get(room)
        .is_some_and(|room| room.is_joined(&crew.manager));
    joined.then_some(command)
}

/// The Manager's answer to a `!crew` command, in reply to it. (Only `!crew remove` acts on the
/// homeserver here: the Worker leaves its rooms.)
async fn answer_command(
    crew: &Arc<Service>,
    room: &OwnedRoomId,
    sender: &UserId,
    event: &Value,
    command: Command,
) -> Effect {
    use crate::agent::registry::WorkerState;
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
            Command::Remove(name) => match crew.team.remove(&name).await {
                Ok(worker) => format!(
                    "Removed {}: its gateway token is revoked and it left its rooms. Its files and history stay.",
                    worker.display_name
                ),
                Err(error) => format!("I could not remove `{name}`: {error}"),
            },
            Command::Why(event_id) => why(crew, &event_id),
            Command::Unknown(verb) => {
                format!("`{verb}` is not a command I know. {}", commands::help())
            }
        }
    };
    let event_id = event.get("event_id").and_then(Value::as_str).unwrap_or("");
    let reply = OutgoingMessage::notice(text).reply_to(ReplyTo::event(event));
    Effect::Send {
        agent: crew.manager.clone(),
        txn_key: format!("command:{event_id}"),
        content: reply.to_content(),
    }
}

/// The members joined to `room` (as the dispatcher's room model knows them) that `keep` accepts.
fn joined_members_where(
    crew: &Service,
    room: &RoomId,
    keep: impl Fn(&UserId) -> bool,
) -> Vec<OwnedUserId> {
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    state
        .dispatcher
        .rooms
        .get(room)
        .map(|room| {
            room.joined_members()
                .filter(|member| keep(member))
                .map(|member| member.to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What read-only commands show `sender` in `room`: everything to an admin, else only this
/// room's Workers and their (or the sender's) tasks.
fn room_view(crew: &Service, room: &RoomId, sender: &UserId) -> commands::RoomView {
    let workers_here = (!crew.is_admin(sender))
        .then(|| joined_members_where(crew, room, |member| crew.is_ours(member)));
    commands::RoomView {
        workers_here,
        asker: sender.to_owned(),
    }
}

/// `!crew why`: the dispatcher's kept decision, in words.
fn why(crew: &Service, event_id: &str) -> String {
    let Ok(event_id) = ruma::EventId::parse(event_id) else {
        return format!("`{event_id}` is not an event id (they start with `$`).");
    };
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(kept) = state.dispatcher.reasons.get(&event_id) else {
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
