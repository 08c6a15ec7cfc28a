//! The heartbeat: what the Manager should do about quiet tasks, as a pure function of the task
//! records and the time.
//!
//! The caller (the heartbeat loop in the server) posts each action and then records it with
//! [`Tasks::apply`](super::Tasks::apply), so a beat that fails to post is simply repeated by the
//! next one and a beat that posted is never repeated. Not for: sending messages or timers.

use ruma::OwnedUserId;

use super::{Task, TaskState, schedule::format_utc};

/// One thing the Manager should do on this beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Remind the Worker of a task that has been quiet longer than its allowed quiet time.
    Nudge {
        /// The task id.
        task: String,
        /// The Worker's name.
        worker: String,
    },
    /// The Worker stayed quiet for another quiet period after the nudge: tell the human.
    TellHuman {
        /// The task id.
        task: String,
        /// Who asked for the task.
        requester: OwnedUserId,
    },
    /// Tasks changed since the last report; post a summary (see [`render_report`]) in the
    /// admin's DM.
    Report {
        /// The changed tasks, oldest change first.
        changed: Vec<Task>,
        /// The newest change included; recorded so the next report starts after it.
        until_ms: u64,
    },
}

const MS_PER_MINUTE: u64 = 60_000;

/// Decides this beat's actions. `reported_until_ms` is the watermark of the last posted report
/// ([`Tasks::reported_until_ms`](super::Tasks::reported_until_ms)).
///
/// Only tasks that are assigned or in progress are watched: a blocked task waits for a human,
/// and done or cancelled tasks are over. A task is nudged once per silence (no nudge since its
/// last progress) and the human is told once per nudge; new progress starts the cycle again.
pub fn heartbeat(tasks: &[Task], reported_until_ms: u64, now_ms: u64) -> Vec<HeartbeatAction> {
    let mut actions = Vec::new();
    for task in tasks {
        if !matches!(task.state, TaskState::Assigned | TaskState::InProgress) {
            continue;
        }
        let quiet_ms = task.quiet_minutes.saturating_mul(MS_PER_MINUTE);
        match task.last_nudge_ms {
            Some(nudged) if nudged >= task.last_progress_ms => {
                let told = task.told_human_ms.is_some_and(|told| told >= nudged);
                if !told && now_ms.saturating_sub(nudged) > quiet_ms {
                    actions.push(HeartbeatAction::TellHuman {
                        task: task.id.clone(),
                        requester: task.requester.clone(),
                    });
                }
            }
            _ => {
                if now_ms.saturating_sub(task.last_progress_ms) > quiet_ms {
                    actions.push(HeartbeatAction::Nudge {
                        task: task.id.clone(),
                        worker: task.assignee.clone(),
                    });
                }
            }
        }
    }
    let mut changed: Vec<Task> = tasks
        .iter()
        .filter(|task| task.updated_ms > reported_until_ms)
        .cloned()
        .collect();
    if let Some(until_ms) = changed.iter().map(|task| task.updated_ms).max() {
        changed.sort_by_key(|task| (task.updated_ms, task.number()));
        actions.push(HeartbeatAction::Report { changed, until_ms });
    }
    actions
}

/// A short Markdown summary of changed tasks, one line each, for the Manager's report.
pub fn render_report(changed: &[Task]) -> String {
    let mut out = String::from("Task updates:\n");
    for task in changed {
        out.push_str(&format!(
            "- {} \"{}\" ({}): {} since {}",
            task.id,
            task.title,
            task.assignee,
            task.state,
            format_utc(task.updated_ms)
        ));
        if let (TaskState::Blocked, Some(question)) = (task.state, &task.blocked_question) {
            out.push_str(&format!(", asks: {question}"));
        }
        if let (TaskState::Done, Some(result)) = (task.state, &task.result_path) {
            out.push_str(&format!(", result in {result}"));
        }
        out.push('\n');
    }
    out
}
