//! The heartbeat: what the Manager should do about quiet tasks and due recurring tasks, as a
//! pure function of the task records and the time.
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
    /// A run of a recurring template is due: create the instance
    /// ([`Tasks::start_recurrence`](super::Tasks::start_recurrence)) and mention its Worker.
    StartRecurrence {
        /// The template's task id.
        template: String,
        /// The run's due time; with the template it names the run, so it is started once.
        due_ms: u64,
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

/// Decides this beat's actions. `reported_until_ms` is the watermark of the last posted report
/// ([`Tasks::reported_until_ms`](super::Tasks::reported_until_ms)).
///
/// Only tasks that are assigned or in progress are watched: a blocked task waits for a human,
/// and done or cancelled tasks are over. A task is nudged once per silence (no nudge since its
/// last progress) and the human is told once per nudge; new progress starts the cycle again.
///
/// A recurring template is never nudged (its instances are the work). When one of its runs is
/// due it yields one [`HeartbeatAction::StartRecurrence`] for the newest due run, however many
/// were missed while crew was down; a cancelled template yields none.
pub fn heartbeat(tasks: &[Task], reported_until_ms: u64, now_ms: u64) -> Vec<HeartbeatAction> {
    let mut actions = Vec::new();
    for task in tasks {
        if task.schedule.is_some() {
            if let Some(due_ms) = task.due_run(now_ms) {
                actions.push(HeartbeatAction::StartRecurrence {
                    template: task.id.clone(),
                    due_ms,
                });
            }
            continue;
        }
        if !matches!(task.state, TaskState::Assigned | TaskState::InProgress) {
            continue;
        }
        let quiet_ms = task.quiet_ms();
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
        if let Some(note) = task.recurrence_note() {
            out.push_str(&format!("; {note}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn task(id: &str, state: TaskState, last_progress_ms: u64) -> Task {
        Task {
            id: id.to_owned(),
            title: format!("title of {id}"),
            assignee: "alice".to_owned(),
            room: None,
            requester: ruma::owned_user_id!("@human:example.org"),
            state,
            created_ms: 0,
            updated_ms: last_progress_ms,
            last_progress_ms,
            quiet_minutes: 60,
            quiet_secs: None,
            nudges: 0,
            last_nudge_ms: None,
            told_human_ms: None,
            schedule: None,
            schedule_set_ms: None,
            last_run_ms: None,
            recurrence_of: None,
            result_path: None,
            blocked_question: None,
        }
    }

    /// The actions other than reports, which these tests look at separately.
    fn alerts(actions: Vec<HeartbeatAction>) -> Vec<HeartbeatAction> {
        actions
            .into_iter()
            .filter(|action| !matches!(action, HeartbeatAction::Report { .. }))
            .collect()
    }

    /// What `Tasks::apply` does to the record, done by hand so the pure function is tested alone.
    fn apply(tasks: &mut [Task], actions: &[HeartbeatAction], now: u64) {
        for action in actions {
            for task in tasks.iter_mut() {
                match action {
                    HeartbeatAction::Nudge { task: id, .. } if *id == task.id => {
                        task.nudges += 1;
                        task.last_nudge_ms = Some(now);
                    }
                    HeartbeatAction::TellHuman { task: id, .. } if *id == task.id => {
                        task.told_human_ms = Some(now);
                    }
                    HeartbeatAction::StartRecurrence { template, due_ms }
                        if *template == task.id =>
                    {
                        task.last_run_ms = Some(*due_ms);
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn quiet_task_is_nudged_once_then_the_human_is_told_once() {
        let mut tasks = vec![task("t-1", TaskState::InProgress, 0)];
        // Within the quiet time: nothing.
        assert!(alerts(heartbeat(&tasks, u64::MAX, 60 * MIN)).is_empty());
        // Past it: one nudge.
        let now = 61 * MIN;
        let actions = alerts(heartbeat(&tasks, u64::MAX, now));
        assert_eq!(
            actions,
            vec![HeartbeatAction::Nudge {
                task: "t-1".into(),
                worker: "alice".into()
            }]
        );
        apply(&mut tasks, &actions, now);
        // The next beats, still within a quiet period of the nudge: nothing again.
        assert!(alerts(heartbeat(&tasks, u64::MAX, 76 * MIN)).is_empty());
        assert!(alerts(heartbeat(&tasks, u64::MAX, 121 * MIN)).is_empty());
        // A quiet period after the nudge: tell the human, once.
        let now = 122 * MIN;
        let actions = alerts(heartbeat(&tasks, u64::MAX, now));
        assert_eq!(
            actions,
            vec![HeartbeatAction::TellHuman {
                task: "t-1".into(),
                requester: ruma::owned_user_id!("@human:example.org")
            }]
        );
        apply(&mut tasks, &actions, now);
        assert!(alerts(heartbeat(&tasks, u64::MAX, 500 * MIN)).is_empty());
        assert_eq!(tasks[0].nudges, 1);
    }

    #[test]
    fn progress_after_a_nudge_silences_the_alarm_and_restarts_the_cycle() {
        let mut tasks = vec![task("t-1", TaskState::Assigned, 0)];
        let actions = alerts(heartbeat(&tasks, u64::MAX, 61 * MIN));
        apply(&mut tasks, &actions, 61 * MIN);
        // The Worker answers the nudge.
        tasks[0].last_progress_ms = 70 * MIN;
        tasks[0].state = TaskState::InProgress;
        assert!(alerts(heartbeat(&tasks, u64::MAX, 125 * MIN)).is_empty());
        // Quiet again for a full period: a fresh nudge, not a message to the human.
        let actions = alerts(heartbeat(&tasks, u64::MAX, 131 * MIN));
        assert!(matches!(
            actions.as_slice(),
            [HeartbeatAction::Nudge { .. }]
        ));
    }

    #[test]
    fn blocked_and_finished_tasks_are_not_watched() {
        let tasks = vec![
            task("t-1", TaskState::Blocked, 0),
            task("t-2", TaskState::Done, 0),
            task("t-3", TaskState::Cancelled, 0),
        ];
        assert!(alerts(heartbeat(&tasks, u64::MAX, 1000 * MIN)).is_empty());
    }

    #[test]
    fn each_task_uses_its_own_quiet_time() {
        let mut short = task("t-1", TaskState::InProgress, 0);
        short.quiet_minutes = 5;
        let long = task("t-2", TaskState::InProgress, 0);
        let actions = alerts(heartbeat(&[short, long], u64::MAX, 6 * MIN));
        assert!(matches!(
            actions.as_slice(),
            [HeartbeatAction::Nudge { task, .. }] if task == "t-1"
        ));
    }

    #[test]
    fn a_quiet_time_in_seconds_replaces_the_minutes() {
        let mut quick = task("t-1", TaskState::InProgress, 0);
        quick.quiet_secs = Some(3);
        assert!(alerts(heartbeat(std::slice::from_ref(&quick), u64::MAX, 3_000)).is_empty());
        let actions = alerts(heartbeat(std::slice::from_ref(&quick), u64::MAX, 3_001));
        assert!(matches!(
            actions.as_slice(),
            [HeartbeatAction::Nudge { task, .. }] if task == "t-1"
        ));
    }

    #[test]
    fn report_only_when_something_changed_since_the_last_one() {
        let mut tasks = vec![
            task("t-2", TaskState::Done, 20),
            task("t-1", TaskState::InProgress, 10),
        ];
        tasks[0].result_path = Some("tasks/t-2/result.md".into());
        let actions = heartbeat(&tasks, 0, 30);
        let Some(HeartbeatAction::Report { changed, until_ms }) = actions.last() else {
            panic!("expected a report, got {actions:?}");
        };
        assert_eq!(*until_ms, 20);
        let ids: Vec<&str> = changed.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t-1", "t-2"], "oldest change first");
        let text = render_report(changed);
        assert!(
            text.contains("t-2 \"title of t-2\" (alice): done"),
            "{text}"
        );
        assert!(text.contains("result in tasks/t-2/result.md"), "{text}");
        // Nothing new since the watermark: no report.
        assert!(heartbeat(&tasks, 20, 40).is_empty());
        // One task changes: the report holds only it.
        tasks[1].updated_ms = 35;
        let actions = heartbeat(&tasks, 20, 40);
        assert!(matches!(
            actions.as_slice(),
            [HeartbeatAction::Report { changed, until_ms: 35 }] if changed.len() == 1 && changed[0].id == "t-1"
        ));
    }

    fn template(id: &str, cron: &str, created_ms: u64) -> Task {
        let mut template = task(id, TaskState::Assigned, created_ms);
        template.created_ms = created_ms;
        template.schedule = Some(super::super::Schedule::parse(cron, "UTC").expect("valid"));
        template.schedule_set_ms = Some(created_ms);
        template
    }

    fn starts(actions: &[HeartbeatAction]) -> Vec<(String, u64)> {
        actions
            .iter()
            .filter_map(|action| match action {
                HeartbeatAction::StartRecurrence { template, due_ms } => {
                    Some((template.clone(), *due_ms))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_due_template_starts_its_newest_run_once_and_is_never_nudged() {
        const HOUR: u64 = 60 * MIN;
        // Every day at 09:00 UTC; created on day 0 at 00:00.
        let mut tasks = vec![template("t-1", "0 9 * * *", 0)];
        assert!(alerts(heartbeat(&tasks, u64::MAX, 8 * HOUR)).is_empty());
        // Due at 09:00 on the dot, though the template has been "quiet" for hours.
        let actions = alerts(heartbeat(&tasks, u64::MAX, 9 * HOUR));
        assert_eq!(starts(&actions), [("t-1".to_owned(), 9 * HOUR)]);
        assert_eq!(actions.len(), 1, "no nudge for a template: {actions:?}");
        apply(&mut tasks, &actions, 9 * HOUR);
        assert!(alerts(heartbeat(&tasks, u64::MAX, 10 * HOUR)).is_empty());
        // Three days of outage: one start, for the newest missed run.
        let late = 3 * 24 * HOUR + 12 * HOUR;
        let actions = alerts(heartbeat(&tasks, u64::MAX, late));
        assert_eq!(
            starts(&actions),
            [("t-1".to_owned(), 3 * 24 * HOUR + 9 * HOUR)]
        );
        apply(&mut tasks, &actions, late);
        assert!(alerts(heartbeat(&tasks, u64::MAX, late + HOUR)).is_empty());
    }

    #[test]
    fn cancelled_templates_do_not_fire_and_instances_are_watched_like_tasks() {
        let mut cancelled = template("t-1", "* * * * *", 0);
        cancelled.state = TaskState::Cancelled;
        let mut instance = task("t-2", TaskState::Assigned, 0);
        instance.recurrence_of = Some("t-1".to_owned());
        let actions = alerts(heartbeat(&[cancelled, instance], u64::MAX, 61 * MIN));
        assert_eq!(
            actions,
            vec![HeartbeatAction::Nudge {
                task: "t-2".into(),
                worker: "alice".into()
            }]
        );
    }

    #[test]
    fn first_run_is_after_the_schedule_was_set_not_before() {
        // A task created at 00:00, made recurring at 10:00: the 09:00 run that day is not due.
        let mut late_schedule = template("t-1", "0 9 * * *", 0);
        late_schedule.schedule_set_ms = Some(600 * MIN);
        assert!(starts(&heartbeat(&[late_schedule.clone()], u64::MAX, 700 * MIN)).is_empty());
        // The next morning it is.
        let next_morning = (24 * 60 + 9 * 60) * MIN;
        assert_eq!(
            starts(&heartbeat(&[late_schedule], u64::MAX, next_morning)),
            [("t-1".to_owned(), next_morning)]
        );
    }

    #[test]
    fn the_report_says_how_tasks_recur() {
        let mut template = template("t-1", "0 9 * * *", 0);
        template.title = "daily digest".into();
        let mut instance = task("t-2", TaskState::Assigned, 0);
        instance.recurrence_of = Some("t-1".into());
        let text = render_report(&[template, instance]);
        assert!(
            text.contains("repeats `0 9 * * *` (UTC), next run 1970-01-01 09:00 UTC"),
            "{text}"
        );
        assert!(text.contains("run of recurring task t-1"), "{text}");
    }
}
