//! Running agents' turns: one turn per agent at a time, fed from the durable wake queue.
//!
//! A turn takes every wake pending for its agent, so messages that arrive while it works are
//! coalesced into its next turn, never dropped. A wake leaves the queue only after the turn
//! that handled it has finished; after a crash the turn runs again and its sends, keyed by the
//! waking event, are deduplicated by the homeserver.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::Value;

use super::Crew;
use crate::agent::llm_turn::{self, Toolbox, TurnOutcome};
use crate::agent::turn::{WakingMessage, acknowledge};
use crate::dispatch::DEPTH_KEY;
use crate::dispatch::queue::{PendingWake, QueuedWake};
use crate::llm::{LlmClient, Tool};
use crate::matrix::OutgoingMessage;
use crate::matrix::message::ReplyTo;

/// The turn loop of one agent; ends when its queue is empty.
pub(super) async fn drive(crew: Arc<Crew>, agent: OwnedUserId) {
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
        run_turn(&crew, &agent, &pending).await;
        if let Err(error) = crew.queue.finish(&pending) {
            tracing::error!(%error, %agent, "cannot remove finished wakes");
        }
        if let Err(error) = crew.store.flush().await {
            tracing::error!(%error, "cannot flush after a turn");
        }
    }
}

fn release(crew: &Crew, agent: &UserId) {
    crew.running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(agent);
}

/// One turn: typing on in every room involved, one answer per waking message, typing off.
#[tracing::instrument(skip_all, fields(agent = %agent, wakes = wakes.len()))]
async fn run_turn(crew: &Arc<Crew>, agent: &UserId, wakes: &[QueuedWake]) {
    let rooms: BTreeSet<OwnedRoomId> = wakes.iter().map(|w| w.wake.room.clone()).collect();
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, true).await {
            tracing::debug!(%error, "cannot set typing");
        }
    }
    for queued in wakes {
        let wake = &queued.wake;
        let Some(sender) = wake
            .event
            .get("sender")
            .and_then(Value::as_str)
            .and_then(|id| UserId::parse(id).ok())
        else {
            continue;
        };
        let said_since = {
            let mut state = crew
                .dispatcher
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let missed = state.dispatcher.context.take(agent, &wake.room);
            let waking = wake.event.get("event_id").and_then(Value::as_str);
            let earlier: Vec<String> = missed
                .messages
                .iter()
                .filter(|said| Some(said.event_id.as_str()) != waking)
                .map(|said| format!("{}: {}", said.sender, said.body))
                .collect();
            // The waking message itself is in the buffer too; it is not "earlier".
            (earlier.len() + missed.dropped as usize, earlier)
        };
        let also_mentioned: Vec<(OwnedUserId, String)> = wake
            .event
            .pointer("/content/m.mentions/user_ids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|id| id.as_str().and_then(|id| UserId::parse(id).ok()))
            .filter(|id| id != agent && *id != sender && crew.is_ours(id))
            .map(|id| {
                let name = super::pump::display_name(crew, &wake.room, &id);
                (id, name)
            })
            .collect();
        let sender_name = super::pump::display_name(crew, &wake.room, &sender);
        let event_id = wake
            .event
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let message = match crew.llm_base_url() {
            Some(base) => {
                llm_answer(
                    crew,
                    agent,
                    &base,
                    wake,
                    &sender,
                    &sender_name,
                    said_since.1,
                )
                .await
            }
            None => {
                note_missing_llm(crew, agent, &wake.room).await;
                acknowledge(&WakingMessage {
                    event: &wake.event,
                    sender: &sender,
                    sender_name: &sender_name,
                    also_mentioned,
                    depth: wake.depth,
                    said_since: said_since.0,
                })
            }
        };
        if let Err(error) = crew
            .client
            .send(agent, &wake.room, &format!("turn:{event_id}"), &message)
            .await
        {
            super::log_matrix_error("cannot answer in a turn", &error);
        }
    }
    for room in &rooms {
        if let Err(error) = crew.client.typing(agent, room, false).await {
            tracing::debug!(%error, "cannot clear typing");
        }
    }
    *crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(agent.to_owned())
        .or_default() += 1;
}

/// What `crew share` asks for.
#[derive(serde::Deserialize)]
pub(super) struct ShareRequest {
    path: String,
    room: ruma::OwnedRoomId,
    /// The agent that posts it (default: the Manager).
    #[serde(default)]
    agent: Option<OwnedUserId>,
    /// Upload small files as `m.file` even when links are available.
    #[serde(default)]
    upload: bool,
}

/// `POST /share`: an agent posts a file reference (link or `m.file`) in a room.
pub(super) fn share_router(crew: Arc<Crew>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::post(share))
        .with_state(crew)
}

async fn share(
    State(crew): State<Arc<Crew>>,
    axum::Json(request): axum::Json<ShareRequest>,
) -> Response {
    let agent = request.agent.unwrap_or_else(|| crew.manager.clone());
    if !crew.is_ours(&agent) {
        return crate::admin::error_response(
            StatusCode::BAD_REQUEST,
            format!("{agent} is not one of our agents"),
        );
    }
    match crate::agent::files::share(
        &crew.storage,
        &crew.links,
        &crew.client,
        &agent,
        &request.room,
        &request.path,
        request.upload,
    )
    .await
    {
        Ok(event_id) => axum::Json(serde_json::json!({ "event_id": event_id })).into_response(),
        Err(crate::agent::files::ShareError::Storage(error)) => {
            crate::storage::admin::storage_error(error)
        }
        Err(error) => crate::admin::error_response(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}

/// `/dispatch/why/{event_id}` (the dispatcher's reasons) and `/dispatch/turns` (turns per agent).
pub(super) fn admin_router(crew: Arc<Crew>) -> axum::Router {
    axum::Router::new()
        .route("/why/{event_id}", get(why))
        .route("/turns", get(turns))
        .with_state(crew)
}

async fn why(State(crew): State<Arc<Crew>>, Path(event_id): Path<String>) -> Response {
    let Ok(event_id) = ruma::EventId::parse(&event_id) else {
        return crate::admin::error_response(StatusCode::BAD_REQUEST, "not an event id");
    };
    let state = crew
        .dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match state.dispatcher.reasons.get(&event_id) {
        Some(kept) => axum::Json(kept.clone()).into_response(),
        None => crate::admin::error_response(
            StatusCode::NOT_FOUND,
            "no decision kept for that event (unknown, or older than the retention)",
        ),
    }
}

async fn turns(State(crew): State<Arc<Crew>>) -> Response {
    let turns = crew
        .turns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    axum::Json(turns).into_response()
}

/// The answer of an LLM-driven turn to one waking message (or, when the LLM fails, a notice
/// that says what went wrong).
async fn llm_answer(
    crew: &Arc<Crew>,
    agent: &UserId,
    base: &url::Url,
    wake: &PendingWake,
    sender: &UserId,
    sender_name: &str,
    earlier: Vec<String>,
) -> OutgoingMessage {
    let body = wake
        .event
        .pointer("/content/body")
        .and_then(Value::as_str)
        .unwrap_or("");
    let conversation = llm_turn::conversation(&earlier, &format!("{sender_name} ({sender})"), body);
    let reply = |text: String, notice: bool| {
        let message = if notice {
            OutgoingMessage::notice(text)
        } else {
            OutgoingMessage::text(text)
        };
        message
            .mention(sender.to_owned(), sender_name)
            .reply_to(ReplyTo::event(&wake.event))
            .with_field(DEPTH_KEY, Value::from(wake.depth + 1))
    };
    let token = match crew.gateway.consumer_token(agent.localpart()).await {
        Ok(token) => token,
        Err(error) => return reply(format!("I cannot get my gateway token: {error}"), true),
    };
    let llm = match LlmClient::new(base, token, crew.config.llm.clone()) {
        Ok(llm) => llm,
        Err(error) => return reply(format!("My LLM is not usable: {error}"), true),
    };
    let (system, toolbox): (String, Box<dyn Toolbox>) = if *agent == crew.manager {
        (
            manager_persona(crew),
            Box::new(ManagerTools {
                crew: crew.clone(),
                requester: sender.to_owned(),
                depth: wake.depth,
            }),
        )
    } else {
        match crew.team.registry.by_user(agent).ok().flatten() {
            Some(worker) => (
                format!(
                    "You are {}, a Worker agent in a Matrix team led by the Manager. Your role: {}. \
                     Work on your tasks with your task tools and answer briefly and concretely.",
                    worker.display_name, worker.role
                ),
                Box::new(WorkerTools {
                    crew: crew.clone(),
                    worker,
                }),
            ),
            None => (
                format!("You are {}, an agent in a Matrix team.", agent.localpart()),
                Box::new(NoTools),
            ),
        }
    };
    let model = crew.config.llm.model.clone();
    match llm_turn::run(&llm, &model, system, conversation, toolbox.as_ref()).await {
        Ok(TurnOutcome::Answer(text)) if !text.trim().is_empty() => reply(text, false),
        Ok(TurnOutcome::Answer(_)) => reply("(I have nothing to add.)".into(), true),
        Ok(TurnOutcome::StepLimit) => reply(
            format!(
                "I stopped after {} rounds of tool calls without an answer; tell me how to continue.",
                llm_turn::MAX_TOOL_STEPS
            ),
            true,
        ),
        Err(error) => reply(format!("I could not finish this: {error}"), true),
    }
}

fn manager_persona(crew: &Crew) -> String {
    format!(
        "You are {}, the Manager of a team of AI agents that live in Matrix rooms. \
         You create Workers when asked (tool create_worker), list them (tool list_workers), \
         and answer briefly. After creating a Worker, tell the person its name and remind them \
         to @-mention it in its room.",
        crew.config.appservice.manager_display_name
    )
}

/// The Manager's tools.
struct ManagerTools {
    crew: Arc<Crew>,
    /// The person whose message started the turn (invited into new Workers' rooms).
    requester: OwnedUserId,
    /// Depth of the wake this turn handles; what the Manager says wakes others one deeper.
    depth: u32,
}

#[derive(serde::Deserialize)]
struct AssignTaskArgs {
    worker: String,
    title: String,
    #[serde(default)]
    spec: String,
}

#[derive(serde::Deserialize)]
struct TaskNoteArgs {
    task: String,
    #[serde(alias = "note", alias = "result", alias = "question")]
    text: String,
}

#[derive(serde::Deserialize)]
struct CreateWorkerArgs {
    name: String,
    #[serde(default)]
    role: String,
}

#[async_trait::async_trait]
impl Toolbox for ManagerTools {
    fn tools(&self) -> Vec<Tool> {
        vec![
            Tool::function(
                "create_worker",
                "Create a Worker agent (or return the existing one of that name) with its own room.",
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "description": "lowercase name, e.g. alice"},
                        "role": {"type": "string", "description": "what the worker is for"}
                    },
                    "required": ["name"]
                }),
            ),
            Tool::function(
                "list_workers",
                "List every Worker with its state and role.",
                serde_json::json!({"type": "object", "properties": {}}),
            ),
            Tool::function(
                "assign_task",
                "Give a Worker a task: records it, writes tasks/<id>/spec.md, and mentions the Worker in its room.",
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "worker": {"type": "string", "description": "the Worker's name"},
                        "title": {"type": "string", "description": "one line"},
                        "spec": {"type": "string", "description": "what to do, in Markdown"}
                    },
                    "required": ["worker", "title"]
                }),
            ),
            Tool::function(
                "list_tasks",
                "List the open tasks with their state and assignee.",
                serde_json::json!({"type": "object", "properties": {}}),
            ),
        ]
    }

    async fn call(&self, name: &str, arguments: &str) -> String {
        match name {
            "create_worker" => {
                let args: CreateWorkerArgs = match serde_json::from_str(arguments) {
                    Ok(args) => args,
                    Err(error) => return format!("error: arguments are not valid: {error}"),
                };
                match self
                    .crew
                    .team
                    .provision(&args.name, &args.role, &self.requester)
                    .await
                {
                    Ok(created) => serde_json::json!({
                        "created": created.created,
                        "name": created.worker.name,
                        "user_id": created.worker.user_id,
                        "room": created.worker.room,
                    })
                    .to_string(),
                    Err(error) => {
                        tracing::warn!(%error, "create_worker failed");
                        format!("error: {error}")
                    }
                }
            }
            "list_workers" => match self.crew.team.registry.list() {
                Ok(workers) => serde_json::to_string(&workers).unwrap_or_default(),
                Err(error) => format!("error: {error}"),
            },
            "assign_task" => {
                let args: AssignTaskArgs = match serde_json::from_str(arguments) {
                    Ok(args) => args,
                    Err(error) => return format!("error: arguments are not valid: {error}"),
                };
                match assign_task(&self.crew, &self.requester, &args, self.depth).await {
                    Ok(task) => serde_json::json!({ "task": task.id, "spec": format!("tasks/{}/spec.md", task.id) }).to_string(),
                    Err(error) => {
                        tracing::warn!(%error, "assign_task failed");
                        format!("error: {error}")
                    }
                }
            }
            "list_tasks" => match self.crew.tasks.list(&crate::tasks::TaskFilter::open()) {
                Ok(tasks) => serde_json::to_string(&tasks).unwrap_or_default(),
                Err(error) => format!("error: {error}"),
            },
            other => format!("error: there is no tool named {other}"),
        }
    }
}

/// Records a task, writes its spec and mentions the Worker about it in the Worker's room.
async fn assign_task(
    crew: &Crew,
    requester: &UserId,
    args: &AssignTaskArgs,
    depth: u32,
) -> Result<crate::tasks::Task, String> {
    let worker = crew
        .team
        .registry
        .get(&args.worker)
        .map_err(|error| error.to_string())?
        .ok_or_else(|| format!("there is no worker named {}; create it first", args.worker))?;
    let room = worker.room.clone().ok_or_else(|| {
        format!(
            "{} has no room yet; create the worker again to give it one",
            worker.name
        )
    })?;
    let task = crew
        .tasks
        .create(
            &args.title,
            &worker.name,
            requester.to_owned(),
            Some(room.clone()),
            &args.spec,
            crate::clock::now_ms(),
        )
        .await
        .map_err(|error| error.to_string())?;
    let message = OutgoingMessage::text(format!(
        "{}: new task **{}**: {}. The spec is in `tasks/{}/spec.md`; report progress on it and complete it with your task tools.",
        worker.user_id, task.id, task.title, task.id
    ))
    .mention(worker.user_id.clone(), worker.display_name.clone())
    .with_field(DEPTH_KEY, Value::from(depth + 1));
    crew.client
        .send(
            &crew.manager,
            &room,
            &format!("assign:{}", task.id),
            &message,
        )
        .await
        .map_err(|error| error.to_string())?;
    Ok(task)
}

/// A Worker's tools: its tasks.
struct WorkerTools {
    crew: Arc<Crew>,
    worker: crate::agent::registry::Worker,
}

#[async_trait::async_trait]
impl Toolbox for WorkerTools {
    fn tools(&self) -> Vec<Tool> {
        let task_text = |what: &str| {
            serde_json::json!({
                "type": "object",
                "properties": {
                    "task": {"type": "string", "description": "the task id, e.g. t-1"},
                    "text": {"type": "string", "description": what}
                },
                "required": ["task", "text"]
            })
        };
        vec![
            Tool::function(
                "task_progress",
                "Record progress on one of your tasks.",
                task_text("what you did"),
            ),
            Tool::function(
                "complete_task",
                "Complete one of your tasks with its result (saved as result.md).",
                task_text("the result, in Markdown"),
            ),
            Tool::function(
                "block_task",
                "Mark one of your tasks blocked with a question for the Manager and the person.",
                task_text("your question"),
            ),
        ]
    }

    async fn call(&self, name: &str, arguments: &str) -> String {
        let args: TaskNoteArgs = match serde_json::from_str(arguments) {
            Ok(args) => args,
            Err(error) => return format!("error: arguments are not valid: {error}"),
        };
        let task = match self.crew.tasks.get(&args.task) {
            Ok(task) if task.assignee == self.worker.name => task,
            Ok(task) => {
                return format!(
                    "error: {} is assigned to {}, not to you",
                    task.id, task.assignee
                );
            }
            Err(error) => return format!("error: {error}"),
        };
        let now = crate::clock::now_ms();
        let outcome = match name {
            "task_progress" => self.crew.tasks.progress(&task.id, &args.text, now).await,
            "complete_task" => self.crew.tasks.complete(&task.id, &args.text, now).await,
            "block_task" => self.crew.tasks.block(&task.id, &args.text, now),
            other => return format!("error: there is no tool named {other}"),
        };
        match outcome {
            Ok(task) => {
                if matches!(name, "complete_task" | "block_task") {
                    report_to_requester(&self.crew, &self.worker, &task).await;
                }
                serde_json::json!({ "task": task.id, "state": task.state }).to_string()
            }
            Err(error) => format!("error: {error}"),
        }
    }
}

/// Tells the person who asked for a task (and the Manager) that it finished or blocked.
async fn report_to_requester(
    crew: &Crew,
    worker: &crate::agent::registry::Worker,
    task: &crate::tasks::Task,
) {
    let Some(room) = &task.room else { return };
    let text = match &task.blocked_question {
        Some(question) if task.state == crate::tasks::TaskState::Blocked => format!(
            "{} {}: task **{}** is blocked: {}",
            task.requester, crew.manager, task.id, question
        ),
        _ => format!(
            "{} {}: task **{}** ({}) is done. The result is in `tasks/{}/result.md`.",
            task.requester, crew.manager, task.id, task.title, task.id
        ),
    };
    let requester_name = task.requester.localpart().to_owned();
    let message = OutgoingMessage::notice(text)
        .mention(task.requester.clone(), requester_name)
        .mention(
            crew.manager.clone(),
            crew.config.appservice.manager_display_name.clone(),
        );
    let key = format!("report:{}:{:?}", task.id, task.state);
    if let Err(error) = crew
        .client
        .send(&worker.user_id, room, &key, &message)
        .await
    {
        super::log_matrix_error("cannot report a task", &error);
        return;
    }
    if task.state == crate::tasks::TaskState::Done {
        let result = format!("tasks/{}/result.md", task.id);
        if let Err(error) = crate::agent::files::share(
            &crew.storage,
            &crew.links,
            &crew.client,
            &worker.user_id,
            room,
            &result,
            false,
        )
        .await
        {
            tracing::warn!(%error, "cannot share a task result");
        }
    }
}

/// Workers have no tools yet.
struct NoTools;

#[async_trait::async_trait]
impl Toolbox for NoTools {
    fn tools(&self) -> Vec<Tool> {
        Vec::new()
    }

    async fn call(&self, name: &str, _arguments: &str) -> String {
        format!("error: there is no tool named {name}")
    }
}

/// Says once per room that no LLM is configured, and what to configure.
async fn note_missing_llm(crew: &Crew, agent: &UserId, room: &ruma::RoomId) {
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
        super::log_matrix_error("cannot say that no LLM is configured", &error);
    }
}
