//! Running agents' turns: one turn per agent at a time, fed from the durable wake queue.
//!
//! A turn takes every wake pending for its agent, so messages that arrive while it works are
//! coalesced into its next turn, never dropped; a message for the agent in the room it is
//! working in is delivered into the running turn at its next step instead, and an admin's
//! "stop" (or `!crew stop`) ends the turn there. A wake leaves the queue only after the turn
//! that handled it has finished; after a crash the turn runs again, replaying its journalled
//! steps, and its sends, keyed by the waking event, are deduplicated by the homeserver.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use crate::agent::authority::{self, TurnAuthority};
use crate::agent::llm_turn::{
    self, Between, Supervisor, Toolbox, TurnContext, TurnLimits, TurnOutcome,
};
use crate::agent::manager_tools::ManagerTools;
use crate::agent::registry::WorkerState;
use crate::agent::turn::{WakingMessage, acknowledge};
use crate::agent::worker_tools::WorkerTools;
use crate::agent::workspace::{ANSWER_PREVIEW_CHARS, LONG_ANSWER_CHARS, Workspace};
use crate::dispatch::queue::{PendingWake, QueuedWake};
use crate::dispatch::{DEPTH_KEY, Missed, RoomEvent, Said, WRITTEN_WITH_KEY};
use crate::llm::LlmClient;
use crate::matrix::OutgoingMessage;
use crate::matrix::message::ReplyTo;
use crate::server::Service;
use crate::storage::access::Role;
use crate::storage::links::FileReference;

/// The turn loop of one agent; ends when its queue is empty.
pub(crate) async fn drive(crew: Arc<Service>, agent: OwnedUserId) {
    loop {
        if crew.shutdown.is_cancelled() {
            release(&crew, &agent);
            return;
        }
        let pending = match crew.queue.pending_for(&agent) {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(%error, %agent, "cannot read the wake queue");
                release(&crew, &agent);
                return;
            }
        };
        if pending.is_empty() {
            // Re-check under the lock: a wake committed before `wake_agent` took the lock is
            // seen here; one committed after finds the loop gone and starts a new one.
            let mut running = crew
                .running
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if crew
                .queue
                .pending_for(&agent)
                .map(|p| p.is_empty())
                .unwrap_or(true)
            {
                running.remove(&agent);
                return;
            }
            continue;
        }
        let mut finished = pending.clone();
        if let Some(worker) = retired(&crew, &agent) {
            // Wakes queued before an admin stopped (or removed) the Worker: no LLM call, a
            // notice per message so the people who asked know why nobody answers.
            say_retired(&crew, &worker, &pending).await;
        } else {
            // A shutdown ends the turn at its next await: its wakes stay queued and its
            // journalled steps replay on the next start, so nothing is lost or done twice.
            tokio::select! {
                adopted = run_turn(&crew, &agent, &pending) => finished.extend(adopted),
                () = crew.shutdown.cancelled() => {
                    tracing::info!(%agent, "turn interrupted by shutdown; it resumes on the next start");
                    release(&crew, &agent);
                    return;
                }
            }
        }
        // A finished project's review turn is over: the person gets the summary (unless the
        // review sent a part back).
        for queued in &finished {
            if let Some(tag) = crate::agent::project_flow::internal_tag(&queued.wake.event)
                && tag.reason == crate::dispatch::WakeReason::ProjectReview
            {
                crate::agent::project_flow::after_review(&crew.agents, &tag.project).await;
            }
        }
        if let Err(error) = crew.queue.finish(&finished) {
            tracing::error!(%error, %agent, "cannot remove finished wakes");
        }
        for queued in &finished {
            if let Err(error) = crew.journal.forget(&agent, event_id(&queued.wake.event)) {
                tracing::error!(%error, "cannot clear the turn journal");
            }
        }
        if let Err(error) = crew.store.flush().await {
            tracing::error!(%error, "cannot flush after a turn");
        }
    }
}

/// `agent` when it is a Worker that no longer takes wakes (stopped or removed).
fn retired(crew: &Service, agent: &UserId) -> Option<crate::agent::registry::Worker> {
    crew.team
        .registry
        .by_user(agent)
        .ok()
        .flatten()
        .filter(|worker| worker.state != WorkerState::Active)
}

/// Says in each room of `wakes` (once per waking event) that a stopped Worker will not answer.
/// A removed Worker has left its rooms and says nothing; its wakes are only logged.
async fn say_retired(
    crew: &Service,
    worker: &crate::agent::registry::Worker,
    wakes: &[QueuedWake],
) {
    if worker.state == WorkerState::Removed {
        tracing::info!(worker = %worker.name, wakes = wakes.len(), "dropping wakes of a removed Worker");
        return;
    }
    for queued in wakes {
        let wake = &queued.wake;
        let notice = OutgoingMessage::notice(format!(
            "{} was stopped by an admin before it could answer this; an admin can start it again with `!crew start {}`.",
            worker.display_name, worker.name
        ))
        .reply_to(ReplyTo::event(&wake.event));
        if let Err(error) = crew
            .client
            .send(
                &worker.user_id,
                &wake.room,
                &format!("retired:{}", event_id(&wake.event)),
                &notice,
            )
            .await
        {
            crate::server::log_matrix_error("cannot say that a Worker is stopped", &error);
        }
    }
}

fn release(crew: &Service, agent: &UserId) {
    crew.running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(agent);
}

fn event_id(event: &RoomEvent) -> &str {
    event.event_id.as_str()
}

/// The sender of a waking event (typed at ingest: always there).
fn sender_of(event: &RoomEvent) -> Option<OwnedUserId> {
    Some(event.sender.clone())
}

fn body_of(event: &RoomEvent) -> &str {
    event.body()
}

/// One turn: typing on in every room involved, an answer per room (with an LLM: the room's
/// waking messages are answered together, in one run that sees them all) or per message
/// (without), typing off. Returns the wakes it took in while running (delivered mid-turn or a
/// stop), which are finished with it.
#[tracing::instrument(skip_all, fields(agent = %agent, wakes = wakes.len()))]
async fn run_turn(crew: &Arc<Service>, agent: &UserId, wakes: &[QueuedWake]) -> Vec<QueuedWake> {
    let rooms: BTreeSet<OwnedRoomId> = wakes.iter().map(|w| w.wake.room.clone()).collect();
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, true).await {
            tracing::debug!(%error, "cannot set typing");
        }
    }
    // Typing lasts 30 s on the homeserver; a turn can take longer.
    let typing_renewal = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keep_typing(
        crew.clone(),
        agent.to_owned(),
        rooms.clone(),
    )));
    let watch = TurnWatch {
        crew: crew.clone(),
        agent: agent.to_owned(),
        known: Mutex::new(wakes.iter().map(|w| w.key.clone()).collect()),
        adopted: Mutex::new(Vec::new()),
        stops: Mutex::new(HashSet::new()),
    };
    match crew.llm_base_url() {
        Some(base) => {
            for room in &rooms {
                let group: Vec<&PendingWake> = wakes
                    .iter()
                    .map(|queued| &queued.wake)
                    .filter(|wake| wake.room == *room && sender_of(&wake.event).is_some())
                    .collect();
                if !group.is_empty() {
                    answer_with_llm(crew, agent, &base, &group, &watch).await;
                }
            }
        }
        None => {
            for queued in wakes {
                // Crew's own wakes need a model; without one there is nobody to answer.
                if crate::agent::project_flow::internal_tag(&queued.wake.event).is_some() {
                    tracing::info!(%agent, "an internal wake without an LLM configured is dropped");
                    continue;
                }
                acknowledge_without_llm(crew, agent, &queued.wake).await;
            }
        }
    }
    drop(typing_renewal);
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, false).await {
            tracing::debug!(%error, "cannot clear typing");
        }
    }
    crew.agents.activity.touch(agent, crate::clock::now_ms());
    *crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(agent.to_owned())
        .or_default() += 1;
    watch
        .adopted
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Renews the typing notice in `rooms` every 20 s until aborted (when the turn ends).
async fn keep_typing(crew: Arc<Service>, agent: OwnedUserId, rooms: BTreeSet<OwnedRoomId>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(20)).await;
        for room in &rooms {
            if let Err(error) = crew.client.typing(&agent, room, true).await {
                tracing::debug!(%error, "cannot renew typing");
            }
        }
    }
}

/// Without an LLM: saves files sent, says once what to configure, and acknowledges.
async fn acknowledge_without_llm(crew: &Arc<Service>, agent: &UserId, wake: &PendingWake) {
    let Some(sender) = sender_of(&wake.event) else {
        return;
    };
    let sender_name = crew.dispatch.display_name(&wake.room, &sender);
    let (missed, _) = take_said_since(crew, agent, &wake.room);
    let said_since = missed.count_besides(&[event_id(&wake.event)]);
    incoming_workspace(crew, agent)
        .save_incoming(&crew.client, agent, &wake.event)
        .await;
    note_missing_llm(crew, agent, &wake.room).await;
    let message = acknowledge(&WakingMessage {
        event: &wake.event,
        sender: &sender,
        sender_name: &sender_name,
        also_mentioned: also_mentioned(crew, agent, &sender, wake),
        depth: wake.depth,
        said_since,
    });
    send_answer(crew, agent, wake, &message).await;
}

/// With an LLM: one run answers the waking messages of one room (`group`, oldest first, never
/// empty), replying to the newest and mentioning everyone who wrote.
async fn answer_with_llm(
    crew: &Arc<Service>,
    agent: &UserId,
    base: &url::Url,
    group: &[&PendingWake],
    watch: &TurnWatch,
) {
    let first = group[0];
    let room = &first.room;
    let mut senders: Vec<(OwnedUserId, String)> = Vec::new();
    for wake in group {
        if let Some(sender) = sender_of(&wake.event)
            && !senders.iter().any(|(known, _)| *known == sender)
        {
            let name = crew.dispatch.display_name(room, &sender);
            senders.push((sender, name));
        }
    }
    let (sender, sender_name) = senders[0].clone();
    // Every sender of the group, not the first: the least privileged one sets the authority.
    let authority = TurnAuthority::of_senders(
        crew.agents.clone(),
        senders.iter().map(|(id, _)| id.as_ref()),
    );
    let (mut missed, mut recent) = take_said_since(crew, agent, room);
    let waking: Vec<&str> = group.iter().map(|wake| event_id(&wake.event)).collect();
    // The room's earlier lines carry their authors' authority: screened before the prompt.
    let left_out = authority.screen_context(
        agent,
        &kept_log(crew, room),
        &waking,
        &mut missed,
        &mut recent,
    );
    let (mut context, _) = TurnContext::assemble(
        agent,
        &missed,
        &recent,
        &waking,
        |user| {
            let name = crew.dispatch.display_name(room, user);
            authority::context_speaker(&crew.agents, &name, user)
        },
        authority::speaker(&sender_name, &sender, true),
        authority::quoted_block(&crate::dispatch::text::strip_quotes(body_of(&first.event))),
    );
    context.left_out = left_out;
    // Files a person sends are saved before anything else.
    let workspace = incoming_workspace(crew, agent);
    for (index, wake) in group.iter().enumerate() {
        let note = workspace
            .save_incoming(&crew.client, agent, &wake.event)
            .await;
        let note = note.map(|note| format!("\n{note}")).unwrap_or_default();
        if index == 0 {
            context.body.push_str(&note);
        } else if let Some(from) = sender_of(&wake.event) {
            let name = crew.dispatch.display_name(room, &from);
            let body: String = crate::dispatch::text::strip_quotes(body_of(&wake.event))
                .chars()
                .take(llm_turn::LINE_CHARS)
                .collect();
            context.more.push(format!(
                "{}: {}{note}",
                authority::speaker(&name, &from, true),
                authority::one_line(&body)
            ));
        }
    }
    // Crew's own internal wakes are answered with a notice that replies to nobody and
    // mentions nobody (there is no such event, and a mention would wake its "sender").
    let people: Vec<(OwnedUserId, String)> = senders
        .iter()
        .filter(|(id, _)| {
            group.iter().any(|wake| {
                sender_of(&wake.event).as_ref() == Some(id)
                    && crate::agent::project_flow::internal_tag(&wake.event).is_none()
            })
        })
        .cloned()
        .collect();
    let reply_target = group
        .iter()
        .rev()
        .find(|wake| crate::agent::project_flow::internal_tag(&wake.event).is_none())
        .copied();
    let project_task = group
        .iter()
        .find_map(|wake| crate::agent::project_flow::internal_tag(&wake.event))
        .or_else(|| crate::agent::project_flow::task_worked_on(&crew.agents, agent, room));
    let answering = Answering {
        first,
        depth: group.iter().map(|wake| wake.depth).max().unwrap_or(0),
        people,
        reply_target,
        project_task: project_task.clone(),
        authority,
    };
    let supervisor = WakeSupervisor {
        watch,
        room,
        authority: &answering.authority,
    };
    let (message, answered) = llm_answer(crew, agent, base, &answering, context, &supervisor).await;
    if let Some(tag) = &project_task {
        let usage = turn_usage(crew, agent, event_id(&first.event)).await;
        crate::agent::project_flow::charge(&crew.agents, tag, usage);
    }
    send_answer(crew, agent, first, &message).await;
    if !answered {
        // The run ended without an answer (a limit, a stop, an error): the messages it took in
        // from this room stay queued and start the next turn, never finished unanswered.
        watch.carry_over(room);
    }
}

/// What a run cost, from its journalled steps: the tokens the provider reported through the
/// gateway for each request (the gateway meters the same numbers per consumer). Read before
/// the journal is forgotten; steps replayed after a crash count once, as they were paid once.
async fn turn_usage(crew: &Service, agent: &UserId, waking: &str) -> crate::projects::Usage {
    use crate::agent::llm_turn::StepJournal;
    let journal = crew.journal.for_wake(agent, waking);
    let mut usage = crate::projects::Usage::default();
    let mut step = 0;
    while let Ok(Some(entry)) = journal.load(step).await {
        usage.add(crate::projects::Usage {
            prompt_tokens: entry.prompt_tokens,
            completion_tokens: entry.tokens.saturating_sub(entry.prompt_tokens),
            requests: 1,
        });
        step += 1;
    }
    usage
}

/// Stages a turn's answer in the outbox, keyed by the (first) waking event: it is sent in the
/// room's order, retried while the homeserver has trouble, and recorded as sent (with its event
/// id) so that a re-run of the turn never answers twice.
async fn send_answer(
    crew: &Service,
    agent: &UserId,
    wake: &PendingWake,
    message: &OutgoingMessage,
) {
    let staged = crate::outbox::Staged {
        room: wake.room.clone(),
        cause: event_id(&wake.event).to_owned(),
        effect: crate::outbox::Effect::Send {
            agent: agent.to_owned(),
            txn_key: format!("turn:{}", event_id(&wake.event)),
            content: message.to_content(),
        },
    };
    if let Err(error) = crew.outbox.stage(&[staged]) {
        tracing::error!(%error, "cannot stage a turn's answer");
    }
}

/// What one LLM run answers.
struct Answering<'a> {
    /// The oldest waking message: its sender is the requester, its id keys the journal.
    first: &'a PendingWake,
    /// The deepest wake of the group; what the agent says is one deeper.
    depth: u32,
    /// The senders of messages people actually sent (not crew's internal wakes): mentioned.
    people: Vec<(OwnedUserId, String)>,
    /// The newest message someone sent, replied to; `None` when only internal wakes woke.
    reply_target: Option<&'a PendingWake>,
    /// The project task the run works for, if any (its cost is charged there; a Worker that
    /// reaches its step limit on it goes on by itself).
    project_task: Option<crate::agent::project_flow::InternalTag>,
    /// Whose words are in the run (the senders, and anyone adopted mid-turn).
    authority: TurnAuthority,
}

/// Where files sent to `agent` are saved.
fn incoming_workspace(crew: &Service, agent: &UserId) -> Workspace {
    let storage = crew.storage.clone();
    match crew.team.registry.by_user(agent).ok().flatten() {
        Some(worker) => Workspace::new(storage, &worker.name, Role::Worker, Vec::new()),
        None => Workspace::new(storage, "manager", Role::Manager, Vec::new()),
    }
}

/// Our other agents a message mentioned (the acknowledgement without an LLM loops them in).
fn also_mentioned(
    crew: &Service,
    agent: &UserId,
    sender: &UserId,
    wake: &PendingWake,
) -> Vec<(OwnedUserId, String)> {
    wake.event
        .message()
        .and_then(|message| message.mentions.as_ref())
        .into_iter()
        .flat_map(|mentions| mentions.user_ids.iter())
        .filter(|id| id.as_str() != agent.as_str() && id.as_str() != sender.as_str())
        .filter(|id| crew.is_ours(id))
        .map(|id| {
            let name = crew.dispatch.display_name(&wake.room, id);
            (id.clone(), name)
        })
        .collect()
}

/// What was said in `room` since `agent`'s last turn, and the room's recent messages (enough
/// for [`TurnContext::assemble`]); moves the agent's "said since" cursor to now.
fn take_said_since(crew: &Service, agent: &UserId, room: &RoomId) -> (Missed, Vec<Said>) {
    crew.dispatch
        .take_said_since(agent, room, TurnContext::recent_window)
}

/// Everything the dispatcher still keeps of `room`'s conversation (whose authors decide how
/// far the agents' own replies in it are trusted).
fn kept_log(crew: &Service, room: &RoomId) -> Vec<Said> {
    crew.dispatch.kept_log(room)
}

/// What a running turn knows about the queue: the wakes it has taken (its own and those it
/// adopted mid-turn).
struct TurnWatch {
    crew: Arc<Service>,
    agent: OwnedUserId,
    known: Mutex<HashSet<Vec<u8>>>,
    adopted: Mutex<Vec<QueuedWake>>,
    /// The keys of adopted wakes that were a stop request (finished with the turn whatever its
    /// outcome: the stop was obeyed).
    stops: Mutex<HashSet<Vec<u8>>>,
}

impl TurnWatch {
    /// Gives back the messages adopted from `room` (not the stop requests): they stay in the
    /// queue for the next turn.
    fn carry_over(&self, room: &RoomId) {
        let stops = self
            .stops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.adopted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|queued| queued.wake.room != room || stops.contains(&queued.key));
    }
}

/// The supervisor of one waking message's LLM run, in its room.
struct WakeSupervisor<'a> {
    watch: &'a TurnWatch,
    room: &'a RoomId,
    /// Lowered by every message adopted into the run.
    authority: &'a TurnAuthority,
}

#[async_trait::async_trait]
impl Supervisor for WakeSupervisor<'_> {
    async fn peek_stop(&self) -> Option<String> {
        let crew = &self.watch.crew;
        let agent = &self.watch.agent;
        let worker = crew.team.registry.by_user(agent).ok().flatten();
        if worker
            .as_ref()
            .is_some_and(|w| w.state != WorkerState::Active)
        {
            return Some("an admin".to_owned());
        }
        let display = worker
            .map(|worker| worker.display_name)
            .unwrap_or_else(|| crew.agents.manager_name());
        let names = [agent.as_str(), display.as_str(), agent.localpart()];
        let known = self
            .watch
            .known
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default();
        crew.queue
            .pending_for(agent)
            .ok()?
            .into_iter()
            .find_map(|queued| {
                let sender = sender_of(&queued.wake.event)?;
                let body = crate::dispatch::text::strip_quotes(body_of(&queued.wake.event));
                (!known.contains(&queued.key)
                    && crew.is_admin(&sender)
                    && llm_turn::is_stop_request(&body, &names))
                .then(|| sender.to_string())
            })
    }

    async fn between_steps(&self) -> Between {
        let crew = &self.watch.crew;
        let agent = &self.watch.agent;
        let worker = crew.team.registry.by_user(agent).ok().flatten();
        if let Some(worker) = &worker
            && worker.state != WorkerState::Active
        {
            return Between::Stop {
                by: "an admin (the Worker was stopped)".to_owned(),
            };
        }
        let display = worker
            .map(|worker| worker.display_name)
            .unwrap_or_else(|| crew.agents.manager_name());
        let names = [agent.as_str(), display.as_str(), agent.localpart()];
        let pending = match crew.queue.pending_for(agent) {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(%error, "cannot read the wake queue mid-turn");
                return Between::Continue(Vec::new());
            }
        };
        let mut taken = Vec::new();
        {
            let mut known = self
                .watch
                .known
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut adopted = self
                .watch
                .adopted
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for queued in pending {
                if known.contains(&queued.key) {
                    continue;
                }
                let Some(sender) = sender_of(&queued.wake.event) else {
                    continue;
                };
                let body =
                    crate::dispatch::text::strip_quotes(body_of(&queued.wake.event)).into_owned();
                let name = crew.dispatch.display_name(&queued.wake.room, &sender);
                if crew.is_admin(&sender) && llm_turn::is_stop_request(&body, &names) {
                    known.insert(queued.key.clone());
                    self.watch
                        .stops
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(queued.key.clone());
                    adopted.push(queued);
                    return Between::Stop {
                        by: format!("{name} ({sender})"),
                    };
                }
                if queued.wake.room == self.room {
                    known.insert(queued.key.clone());
                    self.authority.admit(&sender);
                    taken.push((queued.wake.event.clone(), name, sender, body));
                    adopted.push(queued);
                }
            }
        }
        // Files in a message that joins the turn are saved, as for a waking message.
        let workspace = incoming_workspace(crew, agent);
        let mut said = Vec::new();
        for (event, name, sender, body) in taken {
            let note = workspace
                .save_incoming(&crew.client, agent, &event)
                .await
                .map(|note| format!("\n{note}"))
                .unwrap_or_default();
            said.push(format!(
                "{} wrote to you while you were working:\n{}{note}",
                authority::speaker(&name, &sender, true),
                authority::quoted_block(&body)
            ));
        }
        Between::Continue(said)
    }
}

/// The answer of an LLM-driven turn (or, when the LLM fails, a notice that says what went
/// wrong), and whether it is the model's answer (false: a limit, a stop or an error ended it).
async fn llm_answer(
    crew: &Arc<Service>,
    agent: &UserId,
    base: &url::Url,
    answering: &Answering<'_>,
    context: TurnContext,
    supervisor: &WakeSupervisor<'_>,
) -> (OutgoingMessage, bool) {
    let reply = |text: String, notice: bool| {
        let mut message = if notice || answering.reply_target.is_none() {
            OutgoingMessage::notice(text)
        } else {
            OutgoingMessage::text(text)
        };
        for (sender, name) in &answering.people {
            message = message.mention(sender.clone(), name.clone());
        }
        if let Some(target) = answering.reply_target {
            message = message.reply_to(ReplyTo::event(&target.event));
        }
        message = message.with_field(DEPTH_KEY, Value::from(answering.depth + 1));
        // The answer is trusted later only as far as the text it was written from: it carries
        // its turn's least trusted author, read back from the echo (see `authority`).
        match answering.authority.least().map(serde_json::to_value) {
            Some(Ok(least)) => message.with_field(WRITTEN_WITH_KEY, least),
            _ => message,
        }
    };
    let token = match crew.gateway.consumer_token(agent.localpart()).await {
        Ok(token) => token,
        Err(error) => {
            return (
                reply(format!("I cannot get my gateway token: {error}"), true),
                false,
            );
        }
    };
    let llm = match LlmClient::new(base, token, crew.config.llm.clone()) {
        Ok(llm) => llm,
        Err(error) => return (reply(format!("My LLM is not usable: {error}"), true), false),
    };
    let services = crew.agents.clone();
    let room = answering.first.room.clone();
    let (system, toolbox, model): (String, Box<dyn Toolbox>, String) = if *agent == crew.manager {
        (
            crate::agent::manager::persona(
                &services.default_manager_name,
                services.manager_profile().as_ref(),
            ),
            Box::new(ManagerTools::new(
                services,
                answering.authority.clone(),
                room,
                answering.depth,
            )),
            crew.config.llm.model.clone(),
        )
    } else {
        match crew.team.registry.by_user(agent).ok().flatten() {
            Some(worker) => {
                let model = worker
                    .model
                    .clone()
                    .unwrap_or_else(|| crew.config.llm.model.clone());
                let tools = WorkerTools::new(services, worker, room, answering.depth);
                (tools.persona().await, Box::new(tools), model)
            }
            None => {
                return (
                    reply(format!("{agent} is not an agent of this crew."), true),
                    false,
                );
            }
        }
    };
    let limits = TurnLimits {
        max_steps: crew.config.llm.max_tool_steps,
        max_tokens: crew.config.llm.max_turn_tokens,
    };
    let journal = crew
        .journal
        .for_wake(agent, event_id(&answering.first.event));
    let conversation = llm_turn::conversation(&context);
    let turn = llm_turn::Turn {
        llm: &llm,
        model: &model,
        limits,
        toolbox: toolbox.as_ref(),
        supervisor,
        journal: &journal,
    };
    let (text, notice, answered) = match llm_turn::run(turn, system, conversation).await {
        Ok(TurnOutcome::Answer(text)) if text.chars().count() > LONG_ANSWER_CHARS => (
            keep_long_answer(crew, agent, answering, &text).await,
            false,
            true,
        ),
        Ok(TurnOutcome::Answer(text)) if !text.trim().is_empty() => (text, false, true),
        Ok(TurnOutcome::Answer(_)) => ("(I have nothing to add.)".into(), true, true),
        Ok(TurnOutcome::StepLimit { steps }) if *agent != crew.manager => {
            let going_on = match &answering.project_task {
                Some(tag) => {
                    crate::agent::project_flow::continue_after_step_limit(
                        &crew.agents,
                        agent,
                        &answering.first.room,
                        tag,
                        answering.depth,
                        steps,
                    )
                    .await
                }
                None => None,
            };
            let text = going_on.unwrap_or_else(|| {
                TurnOutcome::StepLimit { steps }
                    .notice()
                    .unwrap_or_default()
            });
            (text, true, false)
        }
        Ok(outcome) => (outcome.notice().unwrap_or_default(), true, false),
        Err(error) => (format!("I could not finish this: {error}"), true, false),
    };
    // What the code refused is said in the room, whatever the model made of it.
    (
        reply(
            authority::with_refusals(text, &answering.authority.refusals()),
            notice,
        ),
        answered,
    )
}

/// A long answer goes to a file; the room gets its start and a reference (a signed link when
/// crew has a public base URL, else the path).
async fn keep_long_answer(
    crew: &Service,
    agent: &UserId,
    answering: &Answering<'_>,
    text: &str,
) -> String {
    let preview: String = text.chars().take(ANSWER_PREVIEW_CHARS).collect();
    let total = text.chars().count();
    let kept = incoming_workspace(crew, agent)
        .keep_answer(event_id(&answering.first.event), text)
        .await;
    let reference = match kept {
        Ok(path) => match crew
            .links
            .reference(&crew.storage, &path, false, std::time::SystemTime::now())
            .await
        {
            Ok(FileReference::Link { text, .. } | FileReference::PathOnly { text, .. }) => text,
            Ok(FileReference::UploadAsFile { caption, .. }) => caption,
            Err(error) => {
                tracing::warn!(%error, "cannot reference a long answer");
                format!("`{path}`")
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot keep a long answer");
            return format!(
                "{preview}…\n\n(My answer has {total} characters, too long for one message, and I could not save it to a file: {error}.)"
            );
        }
    };
    format!("{preview}…\n\nThe whole answer ({total} characters) is in {reference}")
}

/// Says once per room that no LLM is configured, and what to configure.
async fn note_missing_llm(crew: &Service, agent: &UserId, room: &ruma::RoomId) {
    let Ok(noted) = crew.store.tree::<String, bool>("llm_missing_noted") else {
        return;
    };
    if !matches!(noted.insert_new(&room.to_string(), &true), Ok(true)) {
        return;
    }
    let notice = OutgoingMessage::notice(format!(
        "No LLM is configured yet, so I can only acknowledge messages. Add a `[[gateway.routes]]` named `{}` with your provider's base URL and key (see config/crew.example.toml), then restart crew. `!crew help` works meanwhile.",
        crew.config.llm.route
    ));
    if let Err(error) = crew
        .client
        .send(agent, room, &format!("llm-missing:{room}"), &notice)
        .await
    {
        crate::server::log_matrix_error("cannot say that no LLM is configured", &error);
    }
}
