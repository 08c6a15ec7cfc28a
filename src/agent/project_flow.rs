//! Projects as the crew runs them: what happens around the plan ([`crate::projects`]) when a
//! Worker completes or blocks a project task, when the Manager confirms, revises or reviews,
//! and the internal wakes that carry each step to the agent who acts next.
//!
//! Internal wakes go through the durable wake queue like chat wakes, with a reason that
//! `!crew why <id>` shows and the same depth budget (`dispatch.max_depth`): a task started by
//! the confirmed plan wakes its Worker at depth 1 (the person's confirmation authorised it), a
//! completion wakes the Manager one deeper than the Worker's turn, a revision wakes the Worker
//! one deeper than the Manager's turn. So a Worker and a Manager bouncing a task back and forth
//! stop at the budget, with one notice. Each wake is queued once per cause (tree
//! `internal_wakes`), so a re-run after a crash wakes nobody twice.
//!
//! Not for: the plan's rules (in [`crate::projects`]) or who may call which tool (in
//! [`super::manager_tools`]).

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::registry::Worker;
use super::services::AgentServices;
use crate::dispatch::queue::{PendingWake, WakeQueue};
use crate::dispatch::{Decision, RoomEvent, Skip, SkipReason, Wake, WakeReason};
use crate::matrix::OutgoingMessage;
use crate::projects::{Advance, Project, ProjectPhase};
use crate::store::{Store, StoreError, Tree};
use crate::tasks::Task;

pub use crate::dispatch::event::INTERNAL_KEY;

/// Depth of the wakes that start tasks of a confirmed plan: one below the person's message
/// that confirmed it, whichever Worker's completion made the task ready (the plan, not the
/// Worker, decided that it starts).
const PLAN_START_DEPTH: u32 = 1;

/// What an internal wake is about, as carried in its event's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalTag {
    pub reason: WakeReason,
    pub project: String,
    pub key: String,
}

/// The tag of an internal wake's event; `None` for a message someone sent.
pub fn internal_tag(event: &RoomEvent) -> Option<InternalTag> {
    InternalTag::deserialize(event.internal()?).ok()
}

/// The event an internal wake carries: a message from `wake.sender`, typed like the ones
/// people send, tagged with what it is about.
fn internal_event(
    id: &str,
    wake: &InternalWake<'_>,
) -> Result<RoomEvent, crate::dispatch::event::EventError> {
    let invalid = |field| crate::dispatch::event::EventError::InvalidId {
        field,
        value: id.to_owned(),
    };
    let tag = serde_json::to_value(InternalTag {
        reason: wake.reason,
        project: wake.project.to_owned(),
        key: wake.key.to_owned(),
    })
    .ok();
    Ok(RoomEvent {
        event_id: ruma::OwnedEventId::try_from(id).map_err(|_| invalid("event_id"))?,
        room_id: wake.room.to_owned(),
        sender: wake.sender.to_owned(),
        kind: ruma::events::TimelineEventType::RoomMessage,
        origin_server_ts: crate::clock::now_ms(),
        state_key: None,
        redacted: false,
        decrypted: false,
        content: crate::dispatch::event::Content::Message(Box::new(
            crate::dispatch::event::Message {
                msgtype: "m.text".to_owned(),
                body: wake.body.to_owned(),
                depth: Some(u64::from(wake.depth)),
                internal: tag,
                ..Default::default()
            },
        )),
    })
}

/// One internal wake queued (or stopped by the budget), for the server: it records the
/// decision for `!crew why` and starts the agent's turn loop.
#[derive(Debug, Clone)]
pub struct QueuedInternal {
    /// The agent to wake now; `None` when the budget stopped the wake.
    pub agent: Option<OwnedUserId>,
    pub decision: Decision,
}

/// Queues internal wakes. Cheap to share.
pub struct InternalWakes {
    queue: WakeQueue,
    /// Causes already queued, by wake id, so each is queued once.
    sent: Tree<String, u64>,
    max_depth: u32,
    /// New turns a Worker may give itself per start of a project task after reaching its
    /// tool-step limit (`tasks.project_task_continuations`).
    continuations: u32,
    notify: tokio::sync::mpsc::UnboundedSender<QueuedInternal>,
}

impl std::fmt::Debug for InternalWakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalWakes")
            .field("max_depth", &self.max_depth)
            .finish()
    }
}

/// A wake to queue.
pub struct InternalWake<'a> {
    pub agent: &'a UserId,
    pub room: &'a RoomId,
    /// Who the wake speaks for (its authority in the turn): the Worker whose report it carries,
    /// or the person whose confirmed plan it carries out.
    pub sender: &'a UserId,
    pub reason: WakeReason,
    pub project: &'a str,
    pub key: &'a str,
    /// Tells the causes of one reason apart (the start number, a count).
    pub round: u32,
    pub depth: u32,
    pub body: String,
}

/// What became of a wake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// In the queue; the agent's turn loop runs.
    Woken { id: String },
    /// Queued before (a re-run): nothing more.
    Already { id: String },
    /// Deeper than `dispatch.max_depth`: not queued; the caller says so once.
    OverBudget { id: String },
}

impl InternalWakes {
    pub fn open(
        store: &Store,
        max_depth: u32,
        continuations: u32,
        notify: tokio::sync::mpsc::UnboundedSender<QueuedInternal>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            queue: WakeQueue::open(store)?,
            sent: store.tree("internal_wakes")?,
            max_depth,
            continuations,
            notify,
        })
    }

    /// How many wakes were queued whose id starts with `prefix`.
    fn count_sent(&self, prefix: &str) -> usize {
        self.sent
            .raw()
            .scan_prefix(prefix.as_bytes())
            .filter(Result::is_ok)
            .count()
    }

    /// Queues `wake` once per cause, within the depth budget.
    pub async fn queue(&self, wake: InternalWake<'_>) -> Result<Queued, StoreError> {
        let round = wake.round.to_string();
        self.queue_with_round(wake, &round).await
    }

    /// As [`InternalWakes::queue`], with the round given as text.
    async fn queue_with_round(
        &self,
        wake: InternalWake<'_>,
        round: &str,
    ) -> Result<Queued, StoreError> {
        let id = format!("{}{round}", id_prefix(wake.reason, wake.project, wake.key));
        let event_id = ruma::EventId::parse(&id).ok();
        let mut decision = Decision {
            event_id,
            room_id: Some(wake.room.to_owned()),
            sender: Some(wake.sender.to_owned()),
            sender_is_agent: false,
            message: false,
            depth: wake.depth,
            ..Decision::default()
        };
        if wake.depth > self.max_depth {
            decision.skips.push(Skip {
                agent: wake.agent.to_owned(),
                reason: SkipReason::LoopBudget,
                wanted: vec![wake.reason],
            });
            if self.sent.insert_new(&id, &crate::clock::now_ms())? {
                let _ = self.notify.send(QueuedInternal {
                    agent: None,
                    decision,
                });
                return Ok(Queued::OverBudget { id });
            }
            return Ok(Queued::Already { id });
        }
        if !self.sent.insert_new(&id, &crate::clock::now_ms())? {
            return Ok(Queued::Already { id });
        }
        let event = internal_event(&id, &wake).map_err(|error| {
            StoreError::Sled(sled::Error::Unsupported(format!(
                "an internal wake's event is not valid: {error}"
            )))
        })?;
        self.queue
            .push(&[PendingWake {
                agent: wake.agent.to_owned(),
                room: wake.room.to_owned(),
                event,
                depth: wake.depth,
                reasons: vec![wake.reason],
                queued_ms: crate::clock::now_ms(),
            }])
            .await?;
        decision.wakes.push(Wake {
            agent: wake.agent.to_owned(),
            reasons: vec![wake.reason],
            depth: wake.depth,
        });
        let _ = self.notify.send(QueuedInternal {
            agent: Some(wake.agent.to_owned()),
            decision,
        });
        Ok(Queued::Woken { id })
    }

    pub fn max_depth(&self) -> u32 {
        self.max_depth
    }
}

/// The id of an internal wake without its round: `$crew.<reason>.<project>.<key>.`.
fn id_prefix(reason: WakeReason, project: &str, key: &str) -> String {
    let reason = serde_json::to_value(reason)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!("$crew.{reason}.{project}.{}.", key.to_ascii_lowercase())
}

/// A Worker's turn on a project task reached its tool-step limit: it goes on in a new turn by
/// itself (an internal wake at the same depth: the task's own budget bounds it, not the chain),
/// up to `tasks.project_task_continuations` times per start; beyond, it reports and waits.
/// Returns what the Worker says in the room.
pub async fn continue_after_step_limit(
    services: &AgentServices,
    agent: &UserId,
    room: &RoomId,
    tag: &InternalTag,
    depth: u32,
    steps: usize,
) -> Option<String> {
    let project = services.projects.projects().get(&tag.project).ok()?;
    let task = project.task(&tag.key).ok()?;
    let worker = services.team.registry.by_user(agent).ok().flatten()?;
    if task.owner.name() != worker.name || task.state != crate::projects::PlanTaskState::InProgress
    {
        return None;
    }
    let task_id = task.task_id.clone().unwrap_or_default();
    let prefix = format!(
        "{}{}-",
        id_prefix(WakeReason::StepsContinued, &project.id, &task.key),
        task.starts
    );
    let used = services.internal.count_sent(&prefix) as u32;
    let budget = services.internal.continuations;
    if used >= budget {
        return Some(format!(
            "I reached my tool-step limit ({steps} rounds) on part `{}` of {} ({task_id}) and have used its step budget ({budget} more turns, tasks.project_task_continuations), so I stop here and wait: {} or the Manager, tell me how to go on.",
            task.key, project.id, project.requester
        ));
    }
    let round_key = format!("{}-{}", task.starts, used + 1);
    let body = format!(
        "Go on with part `{}` of project {} (your task **{task_id}**) where you stopped: your last turn reached the tool-step limit. Finish with complete_task when it is done.",
        task.key, project.id
    );
    // The round is text here (start and count), so the id is built by hand.
    let queued = services
        .internal
        .queue_with_round(
            InternalWake {
                agent,
                room,
                sender: &project.requester,
                reason: WakeReason::StepsContinued,
                project: &project.id,
                key: &task.key,
                round: 0,
                depth,
                body,
            },
            &round_key,
        )
        .await;
    match queued {
        Ok(Queued::Woken { .. } | Queued::Already { .. }) => Some(format!(
            "I reached my tool-step limit ({steps} rounds) on part `{}` of {} ({task_id}) while working on it, so I go on in a new turn by myself ({} of {budget}).",
            task.key,
            project.id,
            used + 1
        )),
        Ok(Queued::OverBudget { .. }) | Err(_) => None,
    }
}

/// The heartbeat found a project task quiet: its Worker is woken directly (reason
/// `progress_overdue`) in the project room, and the room is told. Returns `None` for a task
/// outside any project (the heartbeat nudges it in chat), else whether the wake was queued.
pub async fn nudge_overdue(services: &AgentServices, task: &Task, nudge: u32) -> Option<bool> {
    let (project, key) = services
        .projects
        .projects()
        .find_by_worker_task(&task.id)
        .ok()
        .flatten()?;
    let room = project_room(&project)?;
    let worker = services.team.registry.get(&task.assignee).ok().flatten()?;
    let body = format!(
        "Part `{key}` of project {} (your task **{}**, {}) has been quiet for a while. Record progress with task_progress, complete it, or say what blocks you with block_task.",
        project.id, task.id, task.title
    );
    let queued = services
        .internal
        .queue(InternalWake {
            agent: &worker.user_id,
            room: &room,
            sender: &services.manager,
            reason: WakeReason::ProgressOverdue,
            project: &project.id,
            key: &key,
            round: nudge,
            depth: PLAN_START_DEPTH,
            body,
        })
        .await;
    Some(match queued {
        Ok(Queued::Woken { id } | Queued::Already { id }) => {
            manager_notice(
                services,
                &room,
                &format!("overdue:{id}"),
                format!(
                    "Part `{key}` ({}, {}) has been quiet; I asked {} how it is going.",
                    task.id, task.title, worker.display_name
                ),
            )
            .await;
            true
        }
        Ok(Queued::OverBudget { .. }) => true,
        Err(error) => {
            tracing::error!(%error, "cannot queue a quiet project task's nudge");
            false
        }
    })
}

/// After a restart: a project task whose Worker task was completed while crew went down
/// (between the task's record and the plan's) moves the plan on now, as the completion would
/// have. Safe to repeat: the plan and the wakes are idempotent.
pub async fn reconcile(services: &AgentServices) {
    let Ok(projects) = services.projects.projects().unfinished() else {
        return;
    };
    for project in projects {
        for planned in &project.tasks {
            let Some(task_id) = &planned.task_id else {
                continue;
            };
            if !matches!(
                planned.state,
                crate::projects::PlanTaskState::InProgress
                    | crate::projects::PlanTaskState::Blocked
            ) {
                continue;
            }
            let Ok(task) = services.tasks.get(task_id) else {
                continue;
            };
            if task.state != crate::tasks::TaskState::Done {
                continue;
            }
            if let Ok(Some(worker)) = services.team.registry.get(&task.assignee) {
                worker_completed(services, &worker, &task, PLAN_START_DEPTH).await;
            }
        }
    }
}

/// Where a project's messages go: its room, else where it was asked for.
fn project_room(project: &Project) -> Option<OwnedRoomId> {
    project.room.clone().or_else(|| project.asked_in.clone())
}

/// Sends a notice from the Manager (wakes nobody); failures are logged.
async fn manager_notice(services: &AgentServices, room: &RoomId, key: &str, text: String) {
    let message = OutgoingMessage::notice(text);
    if let Err(error) = services
        .client
        .send(&services.manager, room, key, &message)
        .await
    {
        tracing::warn!(%error, "cannot post a project notice");
    }
}

/// Says once that the depth budget stopped an internal wake.
async fn say_over_budget(services: &AgentServices, room: &RoomId, id: &str, who: &str, max: u32) {
    manager_notice(
        services,
        room,
        &format!("loop:{id}"),
        format!(
            "I stopped here: {who} would be woken past the loop budget (dispatch.max_depth = {max}) without anyone writing in between. Mention {who} or me to go on (`!crew why {id}` says more)."
        ),
    )
    .await;
}

/// Tells the Workers of newly started tasks (one internal wake each) and the room (one notice).
/// `depth` is the wakes' depth: [`PLAN_START_DEPTH`] for tasks the plan made ready, one
/// deeper than the revising turn for a revision.
pub async fn announce_started(services: &AgentServices, advance: &Advance, depth: u32) {
    let project = &advance.project;
    let Some(room) = project_room(project) else {
        return;
    };
    if advance.started.is_empty() {
        return;
    }
    let mut lines = Vec::new();
    for started in &advance.started {
        let worker = match services.team.registry.get(&started.task.assignee) {
            Ok(Some(worker)) => worker,
            _ => {
                tracing::warn!(worker = %started.task.assignee, "a project task's Worker is unknown");
                continue;
            }
        };
        let revision = started.start > 1;
        let body = format!(
            "Project {} \"{}\": please do part `{}`, your task **{}** ({}). Its spec{} is in `tasks/{}/spec.md`: read it first, record progress with task_progress and finish with complete_task (task {}). If you need an answer from {}, use block_task.",
            project.id,
            project.title,
            started.key,
            started.task.id,
            started.task.title,
            if revision {
                ", with why the last result went back,"
            } else {
                ", with the results it builds on,"
            },
            started.task.id,
            started.task.id,
            project.requester,
        );
        let queued = services
            .internal
            .queue(InternalWake {
                agent: &worker.user_id,
                room: &room,
                sender: &project.requester,
                reason: if revision {
                    WakeReason::RevisionNeeded
                } else {
                    WakeReason::DependencyDone
                },
                project: &project.id,
                key: &started.key,
                round: started.start,
                depth,
                body,
            })
            .await;
        match queued {
            Ok(Queued::OverBudget { id }) => {
                say_over_budget(
                    services,
                    &room,
                    &id,
                    &worker.display_name,
                    services.internal.max_depth(),
                )
                .await
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot queue a project task's start"),
        }
        lines.push(format!(
            "- `{}` {} → {} ({}){}",
            started.key,
            started.task.title,
            worker.display_name,
            started.task.id,
            if revision { ", revision" } else { "" }
        ));
    }
    let keys: Vec<String> = advance
        .started
        .iter()
        .map(|started| format!("{}.{}", started.key.to_ascii_lowercase(), started.start))
        .collect();
    manager_notice(
        services,
        &room,
        &format!("project-start:{}:{}", project.id, keys.join(",")),
        format!(
            "Project {} \"{}\": started\n{}",
            project.id,
            project.title,
            lines.join("\n")
        ),
    )
    .await;
}

/// A Worker completed `task`. For a project task: the plan moves on (what this unlocks starts),
/// and the Manager is woken to look at the result (the last one: to review the whole project
/// before the summary). Returns whether `task` belongs to a project.
pub async fn worker_completed(
    services: &AgentServices,
    worker: &Worker,
    task: &Task,
    depth: u32,
) -> bool {
    let advance = match services
        .projects
        .worker_task_done(&task.id, crate::clock::now_ms())
        .await
    {
        Ok(Some(advance)) => advance,
        Ok(None) => return false,
        Err(error) => {
            tracing::error!(%error, task = %task.id, "cannot move a project on");
            return true;
        }
    };
    announce_started(services, &advance, PLAN_START_DEPTH).await;
    let project = &advance.project;
    let Some(room) = project_room(project) else {
        return true;
    };
    let Some(key) = project
        .tasks
        .iter()
        .find(|planned| planned.task_id.as_deref() == Some(task.id.as_str()))
        .map(|planned| planned.key.clone())
    else {
        return true;
    };
    let planned = project.task(&key).ok();
    let acceptance = planned
        .map(|planned| planned.acceptance.clone())
        .filter(|acceptance| !acceptance.is_empty())
        .map(|acceptance| format!(" Done when: {acceptance}."))
        .unwrap_or_default();
    let result = task
        .result_path
        .clone()
        .unwrap_or_else(|| format!("tasks/{}/result.md", task.id));
    let (reason, body) = if advance.completed() {
        let results: Vec<String> = project
            .tasks
            .iter()
            .map(|planned| {
                format!(
                    "`{}` {}: `{}`",
                    planned.key,
                    planned.title,
                    planned.result_path.as_deref().unwrap_or("no result file")
                )
            })
            .collect();
        (
            WakeReason::ProjectReview,
            format!(
                "Every task of project {} \"{}\" is done; the last, `{key}` ({}), by {}.{acceptance} Results: {}. Check them against their acceptance notes: send a part back with request_revision and the reason, or answer with a short summary for {}.",
                project.id,
                project.title,
                task.id,
                worker.name,
                results.join("; "),
                project.requester
            ),
        )
    } else {
        (
            WakeReason::TaskCompleted,
            format!(
                "Part `{key}` of project {} \"{}\" ({}, by {}) is done: the result is `{result}`.{acceptance} If it does not meet that, send it back with request_revision and the reason; otherwise answer in one line.",
                project.id, project.title, task.id, worker.name
            ),
        )
    };
    let round = planned.map(|planned| planned.starts).unwrap_or(1);
    match services
        .internal
        .queue(InternalWake {
            agent: &services.manager,
            room: &room,
            sender: &worker.user_id,
            reason,
            project: &project.id,
            key: &key,
            round,
            depth: depth + 1,
            body,
        })
        .await
    {
        Ok(Queued::OverBudget { id }) => {
            say_over_budget(
                services,
                &room,
                &id,
                &services.manager_name(),
                services.internal.max_depth(),
            )
            .await;
            // Nobody will review it: the project ends here as it stands.
            if advance.completed() {
                summarize(services, &project.id).await;
            }
        }
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "cannot wake the Manager about a project task"),
    }
    true
}

/// A Worker blocked `task` on a question. For a project task the person is asked in the
/// project room, once per blocking. Returns whether `task` belongs to a project.
pub async fn worker_blocked(services: &AgentServices, worker: &Worker, task: &Task) -> bool {
    let question = task.blocked_question.clone().unwrap_or_default();
    let (project, key, ask) =
        match services
            .projects
            .worker_task_blocked(&task.id, &question, crate::clock::now_ms())
        {
            Ok(Some(found)) => found,
            Ok(None) => return false,
            Err(error) => {
                tracing::error!(%error, task = %task.id, "cannot record a blocked project task");
                return true;
            }
        };
    refresh_plan(services, &project).await;
    if !ask {
        return true;
    }
    let Some(room) = project_room(&project) else {
        return true;
    };
    let requester_name = project.requester.localpart().to_owned();
    let message = OutgoingMessage::notice(format!(
        "{}: part `{key}` of project {} ({}, {}) needs your answer: {}\nAnswer here and mention {} ({}); the task goes on then.",
        project.requester,
        project.id,
        task.id,
        worker.display_name,
        crate::agent::authority::one_line(&question),
        worker.display_name,
        worker.user_id
    ))
    .mention(project.requester.clone(), requester_name);
    let starts = project
        .task(&key)
        .map(|planned| planned.starts)
        .unwrap_or(0);
    if let Err(error) = services
        .client
        .send(
            &services.manager,
            &room,
            &format!("project-ask:{}:{}:{starts}:{}", project.id, key, task.id),
            &message,
        )
        .await
    {
        tracing::warn!(%error, "cannot ask a blocked project task's question");
    }
    true
}

/// A Worker recorded progress on `task` (which resumes it if it was blocked).
pub async fn worker_progressed(services: &AgentServices, task: &Task) {
    match services
        .projects
        .worker_task_resumed(&task.id, crate::clock::now_ms())
    {
        Ok(Some(project)) => refresh_plan(services, &project).await,
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot resume a project task"),
    }
}

async fn refresh_plan(services: &AgentServices, project: &Project) {
    if let Err(error) = crate::projects::write_plan(&services.storage, project).await {
        tracing::warn!(%error, "cannot rewrite plan.md");
    }
}

/// After the Manager's review of a finished project: the summary to the person, with the cost,
/// unless the review sent something back (then the project is running again).
pub async fn after_review(services: &AgentServices, project_id: &str) {
    summarize(services, project_id).await;
}

/// Posts the completion summary of a completed project (once per completion) in its room and
/// where it was asked for.
pub async fn summarize(services: &AgentServices, project_id: &str) {
    let project = match services.projects.projects().get(project_id) {
        Ok(project) => project,
        Err(error) => {
            tracing::warn!(%error, "cannot read a project to summarise");
            return;
        }
    };
    if project.phase != ProjectPhase::Completed {
        return;
    }
    refresh_plan(services, &project).await;
    let starts: u32 = project.tasks.iter().map(|task| task.starts).sum();
    let mut text = format!(
        "{}: project {} \"{}\" is complete.\n\nResults:\n",
        project.requester, project.id, project.title
    );
    for task in &project.tasks {
        text.push_str(&format!(
            "- `{}` {} ({}): `{}`\n",
            task.key,
            task.title,
            task.owner.name(),
            task.result_path.as_deref().unwrap_or("no result file")
        ));
    }
    text.push_str("\nCost (tokens and requests through the gateway):\n");
    text.push_str(&crate::projects::cost_summary_text(&project));
    if let Ok(path) = crate::projects::plan_path(&project.id) {
        text.push_str(&format!("\nThe plan: `{path}`"));
    }
    let mut rooms: Vec<OwnedRoomId> = project.room.iter().cloned().collect();
    if let Some(asked_in) = &project.asked_in
        && !rooms.contains(asked_in)
    {
        rooms.push(asked_in.clone());
    }
    let requester_name = project.requester.localpart().to_owned();
    for room in rooms {
        let message = OutgoingMessage::notice(text.clone())
            .mention(project.requester.clone(), requester_name.clone());
        if let Err(error) = services
            .client
            .send(
                &services.manager,
                &room,
                &format!("project-summary:{}:{starts}", project.id),
                &message,
            )
            .await
        {
            tracing::warn!(%error, "cannot post a project summary");
        }
    }
}

/// Charges a turn's metered usage to the project task it worked for.
pub fn charge(services: &AgentServices, tag: &InternalTag, usage: crate::projects::Usage) {
    if usage == crate::projects::Usage::default() {
        return;
    }
    if let Err(error) = services
        .projects
        .projects()
        .add_usage(&tag.project, &tag.key, usage)
    {
        tracing::warn!(%error, "cannot charge a turn to its project task");
    }
}

/// The project task a turn of `agent` in `room` works for when no internal wake says: the
/// agent's task in progress (or blocked) in the project whose room this is.
pub fn task_worked_on(
    services: &AgentServices,
    agent: &UserId,
    room: &RoomId,
) -> Option<InternalTag> {
    let worker = services.team.registry.by_user(agent).ok().flatten()?;
    let projects = services.projects.projects().unfinished().ok()?;
    projects
        .iter()
        .filter(|project| project.room.as_deref() == Some(room))
        .find_map(|project| {
            project
                .tasks
                .iter()
                .find(|task| {
                    task.owner.name() == worker.name
                        && matches!(
                            task.state,
                            crate::projects::PlanTaskState::InProgress
                                | crate::projects::PlanTaskState::Blocked
                        )
                })
                .map(|task| InternalTag {
                    reason: WakeReason::Mentioned,
                    project: project.id.clone(),
                    key: task.key.clone(),
                })
        })
}

#[cfg(test)]
mod tests {
    use ruma::{owned_room_id, owned_user_id};

    use super::*;

    fn wake<'a>(agent: &'a UserId, room: &'a RoomId, depth: u32, round: u32) -> InternalWake<'a> {
        InternalWake {
            agent,
            room,
            sender: agent,
            reason: WakeReason::TaskCompleted,
            project: "p-1",
            key: "B",
            round,
            depth,
            body: "Part `B` is done.".to_owned(),
        }
    }

    #[tokio::test]
    async fn each_cause_is_queued_once_and_the_budget_stops_deeper_wakes() {
        let store = Store::temporary().unwrap();
        let (sender, mut decisions) = tokio::sync::mpsc::unbounded_channel();
        let internal = InternalWakes::open(&store, 4, 3, sender).unwrap();
        let queue = WakeQueue::open(&store).unwrap();
        let manager = owned_user_id!("@crew:example.org");
        let room = owned_room_id!("!project:example.org");

        let first = internal.queue(wake(&manager, &room, 2, 1)).await.unwrap();
        assert_eq!(
            first,
            Queued::Woken {
                id: "$crew.task_completed.p-1.b.1".to_owned()
            }
        );
        assert!(matches!(
            internal.queue(wake(&manager, &room, 2, 1)).await.unwrap(),
            Queued::Already { .. }
        ));
        let pending = queue.pending_for(&manager).unwrap();
        assert_eq!(pending.len(), 1, "a re-run queues nothing twice");
        let tag = internal_tag(&pending[0].wake.event).expect("tagged as internal");
        assert_eq!((tag.project.as_str(), tag.key.as_str()), ("p-1", "B"));
        assert_eq!(pending[0].wake.depth, 2);
        let decision = decisions.recv().await.unwrap();
        assert_eq!(decision.agent.as_ref(), Some(&manager));
        assert_eq!(
            decision.decision.wakes[0].reasons,
            [WakeReason::TaskCompleted]
        );

        let deep = internal.queue(wake(&manager, &room, 5, 2)).await.unwrap();
        assert!(matches!(deep, Queued::OverBudget { .. }));
        assert_eq!(queue.pending_for(&manager).unwrap().len(), 1, "not queued");
        let stopped = decisions.recv().await.unwrap();
        assert_eq!(stopped.agent, None);
        assert_eq!(stopped.decision.skips[0].reason, SkipReason::LoopBudget);
        assert!(
            matches!(
                internal.queue(wake(&manager, &room, 5, 2)).await.unwrap(),
                Queued::Already { .. }
            ),
            "the stop is said once"
        );
    }
}
