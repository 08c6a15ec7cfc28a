//! The Manager's heartbeat: every `tasks.heartbeat_minutes` (or `tasks.heartbeat_secs`) it looks at the open tasks, nudges a
//! Worker whose task went quiet, tells the person after a second silence, starts the due runs of
//! recurring tasks (a new task, announced to its Worker like an assignment), and posts a short
//! report in each admin's DM only when something changed. An action is recorded only after it
//! was posted, so a failed post is retried at the next beat and a posted one never repeats; the
//! run of a recurring task is created idempotently and sent under a key of its own, so a retry
//! neither makes a second task nor a second message.

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::clock::now_ms;
use crate::dispatch::DEPTH_KEY;
use crate::matrix::OutgoingMessage;
use crate::tasks::{HeartbeatAction, render_report};

pub(super) async fn run(crew: Arc<Service>, shutdown: CancellationToken) {
    let period = crew.config.tasks.heartbeat_interval();
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => return,
        }
        let now = now_ms();
        let actions = match crew.tasks.beat(now) {
            Ok(actions) => actions,
            Err(error) => {
                tracing::error!(%error, "heartbeat cannot read the tasks");
                continue;
            }
        };
        for action in actions {
            if post(&crew, &action, now).await
                && let Err(error) = crew.tasks.apply(&action, now).await
            {
                tracing::error!(%error, "heartbeat cannot record an action");
            }
        }
    }
}

/// Posts one action; true when it reached the homeserver.
async fn post(crew: &Service, action: &HeartbeatAction, now: u64) -> bool {
    match action {
        HeartbeatAction::Nudge { task, worker } => {
            let (Ok(task), Ok(Some(worker))) =
                (crew.tasks.get(task), crew.team.registry.get(worker))
            else {
                return false;
            };
            // A project task's Worker is woken directly, through the wake queue.
            if let Some(queued) =
                crate::agent::project_flow::nudge_overdue(&crew.agents, &task, task.nudges).await
            {
                return queued;
            }
            let Some(room) = task.room.clone() else {
                return false;
            };
            let message = OutgoingMessage::text(format!(
                "{}: task **{}** ({}) has been quiet for a while. How is it going? Record progress, complete it, or say what blocks you.",
                worker.user_id, task.id, task.title
            ))
            .mention(worker.user_id.clone(), worker.display_name.clone());
            send(
                crew,
                &room,
                &format!("nudge:{}:{}", task.id, task.nudges),
                &message,
            )
            .await
        }
        HeartbeatAction::TellHuman { task, requester } => {
            let Ok(task) = crew.tasks.get(task) else {
                return false;
            };
            let Some(room) = task.room.clone() else {
                return false;
            };
            let message = OutgoingMessage::text(format!(
                "{requester}: task **{}** ({}) assigned to {} stayed quiet after a nudge; you may want to look at it.",
                task.id, task.title, task.assignee
            ))
            .mention(requester.clone(), requester.localpart());
            send(
                crew,
                &room,
                &format!("told:{}:{}", task.id, task.nudges),
                &message,
            )
            .await
        }
        HeartbeatAction::StartRecurrence { template, due_ms } => {
            let task = match crew.tasks.start_recurrence(template, *due_ms, now).await {
                Ok(task) => task,
                Err(error) => {
                    tracing::warn!(%error, template, "heartbeat cannot start a recurring task's run");
                    return false;
                }
            };
            let Ok(Some(worker)) = crew.team.registry.get(&task.assignee) else {
                tracing::warn!(task = %task.id, worker = %task.assignee, "the Worker of a recurring task's run is gone");
                return false;
            };
            let Some(room) = task.room.clone() else {
                return false;
            };
            // Worded like an assignment by the Manager (see `assign_task` in turns.rs), so the
            // Worker treats the run like any task; the depth marks it as one hop from a person.
            let message = OutgoingMessage::text(format!(
                "{}: new task **{}**: {}. The spec is in `tasks/{}/spec.md`; report progress on it and complete it with your task tools.",
                worker.user_id, task.id, task.title, task.id
            ))
            .mention(worker.user_id.clone(), worker.display_name.clone())
            .with_field(DEPTH_KEY, Value::from(1));
            send(crew, &room, &format!("recur:{template}:{due_ms}"), &message).await
        }
        HeartbeatAction::Report { changed, until_ms } => {
            let Ok(greeted) = crew.store.tree::<String, String>("greeted_admins") else {
                return false;
            };
            let text = render_report(changed);
            let mut posted = false;
            for entry in greeted.iter().flatten() {
                let (_, room) = entry;
                if let Ok(room) = ruma::RoomId::parse(&room) {
                    posted |= send(
                        crew,
                        &room,
                        &format!("report:{until_ms}"),
                        &OutgoingMessage::notice(text.clone()),
                    )
                    .await;
                }
            }
            posted
        }
    }
}

async fn send(crew: &Service, room: &ruma::RoomId, key: &str, message: &OutgoingMessage) -> bool {
    match crew.client.send(&crew.manager, room, key, message).await {
        Ok(_) => true,
        Err(error) => {
            super::log_matrix_error("heartbeat cannot post", &error);
            false
        }
    }
}
