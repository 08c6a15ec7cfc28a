//! Tasks: the records the Manager assigns to Workers, their states, their files, and the
//! heartbeat that notices quiet tasks.
//!
//! A task is a sled record (tree `tasks`, keyed by its short id `t-<n>`) plus a folder
//! `tasks/<id>/` in file storage holding `spec.md` (written here at creation), `progress.md`
//! (one line appended per progress note) and `result.md`. States move
//! `assigned → in_progress → blocked / done / cancelled` along the edges in
//! [`TaskState::allowed_next`]; anything else is refused with an error that lists what is allowed.
//! The heartbeat is a pure function ([`heartbeat::heartbeat`]) over the records.
//!
//! A task with a [`Schedule`] is a recurring *template*: it is not worked on itself, and the
//! heartbeat does not nudge it. When one of its runs falls due the heartbeat starts it
//! ([`HeartbeatAction::StartRecurrence`]): [`Tasks::start_recurrence`] creates a task *instance*
//! (same Worker, room and requester, the template's spec, [`Task::recurrence_of`] pointing back)
//! that is then nudged like any task. Creating the instance is idempotent per template and due
//! time, so a crash between creating, announcing and recording a run never makes two instances.
//! Cancelling the template stops its runs.
//!
//! Not for: talking to Matrix or the LLM (the agent tools and the heartbeat loop do that and call
//! in here), or the access rules for files (see [`crate::storage::access`], which takes
//! [`Tasks::task_ids_of`]).

pub mod heartbeat;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::storage::access::{TaskFile, task_file};
use crate::storage::{Storage, StorageError};
use crate::store::{Store, StoreError, Tree};

pub use heartbeat::{HeartbeatAction, heartbeat, render_report};
pub use schedule::Schedule;

/// Tree holding the task records, keyed by task id.
const TASKS_TREE: &str = "tasks";
/// Tree holding the id counter and the report watermark.
const META_TREE: &str = "tasks_meta";
const COUNTER_KEY: &str = "next_number";
const REPORTED_KEY: &str = "reported_until_ms";
/// Prefix of the keys (`run:<template>:<due_ms>`) that remember which task number the run of a
/// template due at a given time got, so that run is created once however often it is started.
const RUN_KEY_PREFIX: &str = "run:";
/// Prefix of the keys (`once:<caller's key>`) that remember which task number a caller's
/// idempotency key got (see [`Tasks::create_once`]).
const ONCE_KEY_PREFIX: &str = "once:";
/// Titles are one line in lists and reports; longer text belongs in the spec.
const MAX_TITLE_CHARS: usize = 200;

/// A task's title, trimmed, and its assignee's normalised name, or why they cannot be used
/// (shared by [`Tasks::create`] and [`Tasks::create_once`]).
fn checked_title_and_assignee<'a>(
    title: &'a str,
    assignee: &str,
) -> Result<(&'a str, String), TaskError> {
    let title = title.trim();
    if title.is_empty() || title.contains('\n') || title.chars().count() > MAX_TITLE_CHARS {
        return Err(TaskError::InvalidTitle);
    }
    if assignee.trim().is_empty() {
        return Err(TaskError::MissingAssignee);
    }
    let assignee = crate::agent::registry::Registry::normalise_name(assignee).map_err(|_| {
        TaskError::InvalidAssignee {
            name: assignee.to_owned(),
        }
    })?;
    Ok((title, assignee))
}
const MS_PER_DAY: u64 = 86_400_000;

/// Settings for tasks and the heartbeat (`[tasks]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// Minutes between heartbeats, when the Manager checks tasks for silence. The issue asks for
    /// 15 by default: often enough to notice a stuck Worker within the hour, rare enough to cost
    /// nothing.
    pub heartbeat_minutes: u64,
    /// Seconds between heartbeats; when set it replaces `heartbeat_minutes`. For tests and
    /// demonstrations that cannot wait minutes for a beat.
    pub heartbeat_secs: Option<u64>,
    /// Minutes a task may go without progress before its Worker is nudged, unless the task sets
    /// its own. After another such period without progress the human is told.
    pub default_quiet_minutes: u64,
    /// Seconds a new task may stay quiet; when set it replaces `default_quiet_minutes` (for
    /// tests and demonstrations). A Worker or admin who sets a task's quiet time in minutes
    /// replaces it for that task.
    pub default_quiet_secs: Option<u64>,
    /// Whether a project the Manager proposes starts at once, without the person's
    /// confirmation. Off by default: nothing starts before someone says yes. An admin who
    /// wants it automatic sets it in the config.
    pub projects_start_without_confirmation: bool,
    /// How many new turns a Worker gives itself, per start of a project task, after reaching
    /// its tool-step limit (`llm.max_tool_steps`) on it; beyond that it reports and waits.
    pub project_task_continuations: u32,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            heartbeat_minutes: 15,
            heartbeat_secs: None,
            default_quiet_minutes: 60,
            default_quiet_secs: None,
            projects_start_without_confirmation: false,
            project_task_continuations: 3,
        }
    }
}

impl TaskConfig {
    /// Refuses values that would make the heartbeat spin or nudge constantly.
    pub fn check(&self) -> Result<(), TaskError> {
        if self.heartbeat_minutes == 0 {
            return Err(TaskError::Config(
                "tasks.heartbeat_minutes must be at least 1".to_owned(),
            ));
        }
        if self.default_quiet_minutes == 0 {
            return Err(TaskError::Config(
                "tasks.default_quiet_minutes must be at least 1".to_owned(),
            ));
        }
        if self.heartbeat_secs == Some(0) {
            return Err(TaskError::Config(
                "tasks.heartbeat_secs must be at least 1 (or left out to use heartbeat_minutes)"
                    .to_owned(),
            ));
        }
        if self.default_quiet_secs == Some(0) {
            return Err(TaskError::Config(
                "tasks.default_quiet_secs must be at least 1 (or left out to use default_quiet_minutes)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// The heartbeat period, for the timer in the server: `heartbeat_secs` when set, else
    /// `heartbeat_minutes`.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.heartbeat_secs
                .unwrap_or_else(|| self.heartbeat_minutes.saturating_mul(60)),
        )
    }

    /// The quiet time a new task gets: `default_quiet_secs` when set, else
    /// `default_quiet_minutes`.
    pub fn default_quiet(&self) -> QuietTime {
        match self.default_quiet_secs {
            Some(secs) => QuietTime::Seconds(secs),
            None => QuietTime::Minutes(self.default_quiet_minutes),
        }
    }
}

/// How long a task may go without progress before a nudge, as it was set: in minutes (the
/// unit people and agents use) or, from `tasks.default_quiet_secs`, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietTime {
    /// `tasks.default_quiet_minutes`, or what a Worker or admin set on the task.
    Minutes(u64),
    /// `tasks.default_quiet_secs`, for tests and demonstrations that cannot wait minutes.
    Seconds(u64),
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Created and given to a Worker, not started yet.
    Assigned,
    /// The Worker is on it.
    InProgress,
    /// The Worker waits for an answer to a question.
    Blocked,
    /// Finished, with a result.
    Done,
    /// Called off; kept for the record.
    Cancelled,
}

impl TaskState {
    /// Every state, for parsing and help texts.
    pub const ALL: [TaskState; 5] = [
        TaskState::Assigned,
        TaskState::InProgress,
        TaskState::Blocked,
        TaskState::Done,
        TaskState::Cancelled,
    ];

    /// The states this one may move to. A Worker may finish or ask a question without calling
    /// `start` first; a blocked task resumes by going back to in progress.
    pub fn allowed_next(self) -> &'static [TaskState] {
        use TaskState::*;
        match self {
            Assigned => &[InProgress, Blocked, Done, Cancelled],
            InProgress => &[Blocked, Done, Cancelled],
            Blocked => &[InProgress, Done, Cancelled],
            Done | Cancelled => &[],
        }
    }

    /// Done and cancelled tasks never change again.
    pub fn is_finished(self) -> bool {
        self.allowed_next().is_empty()
    }

    /// The name used in messages, the config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Assigned => "assigned",
            TaskState::InProgress => "in_progress",
            TaskState::Blocked => "blocked",
            TaskState::Done => "done",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = TaskError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let wanted = raw.trim().to_ascii_lowercase().replace([' ', '-'], "_");
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == wanted)
            .ok_or_else(|| TaskError::UnknownState {
                state: raw.to_owned(),
            })
    }
}

/// A task record as stored in sled. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Short id a human can type: `t-<n>`.
    pub id: String,
    /// One line saying what the task is.
    pub title: String,
    /// The Worker's name.
    pub assignee: String,
    /// The Worker's room, where the Manager mentions it about this task.
    pub room: Option<OwnedRoomId>,
    /// The human who asked for it; told when it finishes, blocks or goes quiet.
    pub requester: OwnedUserId,
    pub state: TaskState,
    pub created_ms: u64,
    /// Last change of state, progress or settings (not nudges); drives the heartbeat report.
    pub updated_ms: u64,
    /// Last sign of life from the Worker (creation, start, progress, completion).
    pub last_progress_ms: u64,
    /// Allowed quiet time before a nudge.
    pub quiet_minutes: u64,
    /// Allowed quiet time in seconds, when `tasks.default_quiet_secs` gave it; it replaces
    /// `quiet_minutes` until the quiet time is set again in minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_secs: Option<u64>,
    /// How many nudges were sent over the task's life.
    pub nudges: u32,
    pub last_nudge_ms: Option<u64>,
    /// When the human was last told that the task went quiet.
    pub told_human_ms: Option<u64>,
    /// Set for recurring templates: the heartbeat starts an instance of the task at each run.
    pub schedule: Option<Schedule>,
    /// When the schedule was last set; runs due before it are not started.
    #[serde(default)]
    pub schedule_set_ms: Option<u64>,
    /// Due time of the newest run started from this template.
    #[serde(default)]
    pub last_run_ms: Option<u64>,
    /// For an instance of a recurring task: the template's id.
    #[serde(default)]
    pub recurrence_of: Option<String>,
    /// `tasks/<id>/result.md` once done.
    pub result_path: Option<String>,
    /// The open question while blocked.
    pub blocked_question: Option<String>,
}

impl Task {
    /// How long the task may go without progress before a nudge, in milliseconds.
    pub fn quiet_ms(&self) -> u64 {
        match self.quiet_secs {
            Some(secs) => secs.saturating_mul(1000),
            None => self.quiet_minutes.saturating_mul(60_000),
        }
    }

    /// The number in the id, for sorting in creation order (`t-10` after `t-9`).
    pub fn number(&self) -> u64 {
        self.id
            .strip_prefix("t-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    }

    /// Path of one of this task's well-known files.
    pub fn file_path(&self, file: TaskFile) -> String {
        format!("tasks/{}/{}", self.id, file.file_name())
    }

    /// Runs of a template due after this instant are still to start: its newest run, or else
    /// when the schedule was set (or the task created, for records older than that field).
    pub fn runs_pending_after_ms(&self) -> u64 {
        self.created_ms
            .max(self.schedule_set_ms.unwrap_or(0))
            .max(self.last_run_ms.unwrap_or(0))
    }

    /// The run of this template to start at `now_ms`, if one is due (see
    /// [`Schedule::due_run`]). Tasks without a schedule and cancelled templates have none.
    pub fn due_run(&self, now_ms: u64) -> Option<u64> {
        if self.state == TaskState::Cancelled {
            return None;
        }
        self.schedule
            .as_ref()?
            .due_run(self.runs_pending_after_ms(), now_ms)
    }

    /// The next run of this template not started yet (it may be overdue until the next beat).
    pub fn next_run_ms(&self) -> Option<u64> {
        if self.state == TaskState::Cancelled {
            return None;
        }
        self.schedule
            .as_ref()?
            .next_after(self.runs_pending_after_ms())
    }

    /// A few words on how the task recurs, for lists and reports: the schedule and next run of a
    /// template, or which template an instance is a run of. `None` for a plain task.
    pub fn recurrence_note(&self) -> Option<String> {
        if let Some(schedule) = &self.schedule {
            let next = match self.next_run_ms() {
                Some(next) => format!("next run {}", schedule::format_utc(next)),
                None if self.state == TaskState::Cancelled => "stopped".to_owned(),
                None => "no further run".to_owned(),
            };
            return Some(format!("repeats {schedule}, {next}"));
        }
        self.recurrence_of
            .as_ref()
            .map(|template| format!("run of recurring task {template}"))
    }
}

/// Everything that can go wrong with tasks; each message says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No task has this id.
    #[error("there is no task `{id}`; task ids look like t-12 (`!crew tasks` lists them)")]
    NotFound { id: String },
    /// The requested state change is not one of the allowed edges.
    #[error("task {id} is {from} and cannot become {to}; {}", allowed_text(*from))]
    IllegalTransition {
        id: String,
        from: TaskState,
        to: TaskState,
    },
    /// A task needs a title.
    #[error(
        "a task needs a one-line title (at most {MAX_TITLE_CHARS} characters); put details in the spec"
    )]
    InvalidTitle,
    /// A task needs a Worker to do it.
    #[error("a task needs the name of the Worker it is assigned to")]
    MissingAssignee,
    /// The assignee is not a valid Worker name.
    #[error(
        "`{name}` is not a Worker name; names are lower-case letters, digits, `.`, `_` and `-`, starting with a letter"
    )]
    InvalidAssignee { name: String },
    /// The text is empty where something must be said.
    #[error("the {what} is empty; say something")]
    EmptyText { what: &'static str },
    /// The state name is not one of the known ones.
    #[error(
        "unknown task state `{state}`; use one of assigned, in_progress, blocked, done, cancelled"
    )]
    UnknownState { state: String },
    /// The cron expression of a recurring task does not parse.
    #[error("invalid schedule `{cron}`: {reason}")]
    InvalidCron { cron: String, reason: String },
    /// The time zone of a recurring task is not a zone name.
    #[error("invalid time zone `{timezone}`; use an IANA name such as Europe/Berlin, or UTC")]
    InvalidTimezone { timezone: String },
    /// A run was asked of a task that has no schedule or was cancelled.
    #[error(
        "task {id} is not a recurring task (it has no schedule or was cancelled), so it starts no runs"
    )]
    NotRecurring { id: String },
    /// The allowed quiet time must be positive.
    #[error("a task's allowed quiet time must be at least 1 minute")]
    ZeroQuietTime,
    /// The `[tasks]` config cannot work.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a task file failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The task database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn allowed_text(from: TaskState) -> String {
    let allowed = from.allowed_next();
    if allowed.is_empty() {
        return format!("a {from} task is finished and does not change any more");
    }
    let names: Vec<&str> = allowed.iter().map(|state| state.as_str()).collect();
    format!("from {from} it may become {}", names.join(", "))
}

/// Which tasks [`Tasks::list`] returns. The default lists everything.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks in one of these states (all states when empty).
    pub states: Vec<TaskState>,
    /// Only tasks of this Worker (compared case-insensitively, a leading `@` ignored).
    pub assignee: Option<String>,
}

impl TaskFilter {
    /// Tasks still to be finished: assigned, in progress or blocked.
    pub fn open() -> Self {
        Self {
            states: vec![
                TaskState::Assigned,
                TaskState::InProgress,
                TaskState::Blocked,
            ],
            assignee: None,
        }
    }

    fn accepts(&self, task: &Task) -> bool {
        (self.states.is_empty() || self.states.contains(&task.state))
            && self.assignee.as_deref().is_none_or(|name| {
                name.trim()
                    .trim_start_matches('@')
                    .eq_ignore_ascii_case(&task.assignee)
            })
    }
}

/// Accepts what humans type for a task id: `t-12`, `T-12`, `12` or `#12`.
pub fn normalize_id(raw: &str) -> String {
    let trimmed = raw.trim().trim_start_matches('#');
    let lower = trimmed.to_ascii_lowercase();
    if !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_digit()) {
        return format!("t-{lower}");
    }
    lower
}

/// The task service: records in sled, files in storage. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    tasks: Tree<String, Task>,
    meta: Tree<String, u64>,
    storage: Storage,
    default_quiet: QuietTime,
    /// Serialises read-append-write of `progress.md` so concurrent notes are not lost. A tokio
    /// mutex because the storage calls await while it is held.
    append_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Tasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tasks")
            .field("storage", &self.storage.describe())
            .field("default_quiet", &self.default_quiet)
            .finish_non_exhaustive()
    }
}

impl Tasks {
    /// Opens the task trees in `store`; task files go to `storage`.
    pub fn open(store: &Store, storage: Storage, config: &TaskConfig) -> Result<Self, TaskError> {
        config.check()?;
        Ok(Self {
            tasks: store.tree(TASKS_TREE)?,
            meta: store.tree(META_TREE)?,
            storage,
            default_quiet: config.default_quiet(),
            append_lock: Default::default(),
        })
    }

    /// Creates a task assigned to `assignee` and writes its `spec.md`. The spec is written
    /// before the record, so a record never points at a missing spec.
    #[tracing::instrument(skip(self, spec_text, requester, room))]
    pub async fn create(
        &self,
        title: &str,
        assignee: &str,
        requester: OwnedUserId,
        room: Option<OwnedRoomId>,
        spec_text: &str,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        let (title, assignee) = checked_title_and_assignee(title, assignee)?;
        let number = self.next_number()?;
        let task = self.new_record(number, title, assignee, requester, room, now_ms);
        self.write_spec(&task, spec_text).await?;
        self.tasks.insert(&task.id, &task)?;
        Ok(task)
    }

    /// Like [`Tasks::create`], but once per `idempotency_key`: a second call with the same key
    /// (a re-run after a crash, at any point of the first) returns the task the first made
    /// instead of making another. Projects use it with [`crate::projects::StartClaim`]'s key so
    /// each start of a project task creates exactly one Worker task.
    #[tracing::instrument(skip(self, spec_text, requester, room))]
    #[allow(clippy::too_many_arguments)] // the arguments of `create`, plus the key
    pub async fn create_once(
        &self,
        idempotency_key: &str,
        title: &str,
        assignee: &str,
        requester: OwnedUserId,
        room: Option<OwnedRoomId>,
        spec_text: &str,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        let once_key = format!("{ONCE_KEY_PREFIX}{idempotency_key}");
        if let Some(number) = self.meta.get(&once_key)?
            && let Some(existing) = self.tasks.get(&format!("t-{number}"))?
        {
            return Ok(existing);
        }
        let (title, assignee) = checked_title_and_assignee(title, assignee)?;
        let number = match self.meta.get(&once_key)? {
            Some(number) => number,
            None => {
                let number = self.next_number()?;
                // Whoever reserves the key first owns the task; a later attempt finds the
                // number here (a loser of the race leaves a harmless gap in the numbering).
                if self.meta.insert_new(&once_key, &number)? {
                    number
                } else {
                    self.meta.get(&once_key)?.expect(
                        "insert_new failed because the key exists, and keys are never removed",
                    )
                }
            }
        };
        let task = self.new_record(number, title, assignee, requester, room, now_ms);
        self.write_spec(&task, spec_text).await?;
        if !self.tasks.insert_new(&task.id, &task)? {
            // Another attempt with the same key stored it first.
            return self.get(&task.id);
        }
        Ok(task)
    }

    /// A fresh assigned record with the configured defaults.
    fn new_record(
        &self,
        number: u64,
        title: &str,
        assignee: String,
        requester: OwnedUserId,
        room: Option<OwnedRoomId>,
        now_ms: u64,
    ) -> Task {
        Task {
            id: format!("t-{number}"),
            title: title.to_owned(),
            assignee,
            room,
            requester,
            state: TaskState::Assigned,
            created_ms: now_ms,
            updated_ms: now_ms,
            last_progress_ms: now_ms,
            quiet_minutes: match self.default_quiet {
                QuietTime::Minutes(minutes) => minutes,
                // Shown in minutes where a person reads it; the seconds rule.
                QuietTime::Seconds(secs) => secs.div_ceil(60),
            },
            quiet_secs: match self.default_quiet {
                QuietTime::Minutes(_) => None,
                QuietTime::Seconds(secs) => Some(secs),
            },
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

    /// Writes `spec.md` with the task's heading. Done before the record is stored, so a record
    /// never points at a missing spec.
    async fn write_spec(&self, task: &Task, body: &str) -> Result<(), TaskError> {
        let spec = format!("# {}: {}\n\n{}\n", task.id, task.title, body.trim_end());
        self.storage
            .put_bytes(&task_file(&task.id, TaskFile::Spec)?, spec.into_bytes())
            .await?;
        Ok(())
    }

    /// The task with this id (typed leniently, see [`normalize_id`]).
    pub fn get(&self, id: &str) -> Result<Task, TaskError> {
        let id = normalize_id(id);
        self.tasks
            .get(&id)?
            .ok_or_else(|| TaskError::NotFound { id: id.clone() })
    }

    /// Tasks matching `filter`, in creation order.
    pub fn list(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError> {
        let mut out = Vec::new();
        for entry in self.tasks.iter() {
            let (_, task) = entry?;
            if filter.accepts(&task) {
                out.push(task);
            }
        }
        out.sort_by_key(Task::number);
        Ok(out)
    }

    /// Ids of every task ever assigned to `worker` (finished ones too, so it can still read its
    /// own results), for [`crate::storage::access::AgentScope::task_ids`].
    pub fn task_ids_of(&self, worker: &str) -> Result<Vec<String>, TaskError> {
        Ok(self
            .list(&TaskFilter {
                states: Vec::new(),
                assignee: Some(worker.to_owned()),
            })?
            .into_iter()
            .map(|task| task.id)
            .collect())
    }

    /// The Worker starts the task, or resumes a blocked one (the question is then answered).
    pub fn start(&self, id: &str, now_ms: u64) -> Result<Task, TaskError> {
        self.change(id, |task| {
            transition(task, TaskState::InProgress)?;
            task.blocked_question = None;
            task.last_progress_ms = now_ms;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Appends a progress note to `progress.md` and counts as a sign of life. An assigned or
    /// blocked task moves to in progress; a finished one refuses the note.
    #[tracing::instrument(skip(self, note))]
    pub async fn progress(&self, id: &str, note: &str, now_ms: u64) -> Result<Task, TaskError> {
        let note = note.trim();
        if note.is_empty() {
            return Err(TaskError::EmptyText {
                what: "progress note",
            });
        }
        let current = self.get(id)?;
        if current.state != TaskState::InProgress {
            check_transition(&current, TaskState::InProgress)?;
        }
        let path = task_file(&current.id, TaskFile::Progress)?;
        {
            let _guard = self.append_lock.lock().await;
            let mut text = match self
                .storage
                .get_bytes(&path, self.storage.max_file_bytes())
                .await
            {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(StorageError::NotFound { .. }) => String::new(),
                Err(other) => return Err(other.into()),
            };
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            let one_line = note.replace('\n', " ");
            text.push_str(&format!("- {}: {one_line}\n", schedule::format_utc(now_ms)));
            self.storage.put_bytes(&path, text.into_bytes()).await?;
        }
        self.change(&current.id, |task| {
            if task.state != TaskState::InProgress {
                transition(task, TaskState::InProgress)?;
                task.blocked_question = None;
            }
            task.last_progress_ms = now_ms;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Writes `result.md` and marks the task done.
    #[tracing::instrument(skip(self, result_text))]
    pub async fn complete(
        &self,
        id: &str,
        result_text: &str,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        if result_text.trim().is_empty() {
            return Err(TaskError::EmptyText { what: "result" });
        }
        let current = self.get(id)?;
        check_transition(&current, TaskState::Done)?;
        let path = task_file(&current.id, TaskFile::Result)?;
        self.storage
            .put_bytes(&path, result_text.to_owned().into_bytes())
            .await?;
        self.change(&current.id, |task| {
            transition(task, TaskState::Done)?;
            task.result_path = Some(path.to_string());
            task.blocked_question = None;
            task.last_progress_ms = now_ms;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// The Worker needs an answer before it can go on. The caller mentions the Manager and the
    /// human with the question.
    pub fn block(&self, id: &str, question: &str, now_ms: u64) -> Result<Task, TaskError> {
        let question = question.trim();
        if question.is_empty() {
            return Err(TaskError::EmptyText { what: "question" });
        }
        self.change(id, |task| {
            transition(task, TaskState::Blocked)?;
            task.blocked_question = Some(question.to_owned());
            task.last_progress_ms = now_ms;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Calls the task off. Its files stay.
    pub fn cancel(&self, id: &str, now_ms: u64) -> Result<Task, TaskError> {
        self.change(id, |task| {
            transition(task, TaskState::Cancelled)?;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Sets how long the task may be quiet before a nudge.
    pub fn set_quiet_minutes(
        &self,
        id: &str,
        minutes: u64,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        if minutes == 0 {
            return Err(TaskError::ZeroQuietTime);
        }
        self.change(id, |task| {
            task.quiet_minutes = minutes;
            task.quiet_secs = None;
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Makes the task a recurring template (or a plain task again, with `None`). Its first run
    /// is the first time the schedule matches after `now_ms`; the heartbeat starts each run as a
    /// new task (see [`Tasks::start_recurrence`]).
    pub fn set_schedule(
        &self,
        id: &str,
        schedule: Option<Schedule>,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        self.change(id, |task| {
            task.schedule_set_ms = schedule.as_ref().map(|_| now_ms);
            task.schedule = schedule.clone();
            task.updated_ms = now_ms;
            Ok(())
        })
    }

    /// Creates the run of recurring task `template` due at `due_ms`: a new task for the same
    /// Worker, requester and room, titled with the run's UTC date, whose spec is the template's.
    /// Idempotent per (template, due time): called again, even after a crash half-way, it
    /// returns the same instance instead of making a second one. The heartbeat loop calls it to
    /// learn the instance's id before announcing it; [`Tasks::apply`] calls it again and then
    /// records the run on the template.
    #[tracing::instrument(skip(self))]
    pub async fn start_recurrence(
        &self,
        template: &str,
        due_ms: u64,
        now_ms: u64,
    ) -> Result<Task, TaskError> {
        let template = self.get(template)?;
        let run_key = format!("{RUN_KEY_PREFIX}{}:{due_ms}", template.id);
        let number = match self.meta.get(&run_key)? {
            Some(number) => number,
            None => {
                if template.schedule.is_none() || template.state == TaskState::Cancelled {
                    return Err(TaskError::NotRecurring { id: template.id });
                }
                let number = self.next_number()?;
                // Reserve the number for this run before anything is written: whoever gets the
                // key first owns the run, and a later attempt finds the number here. (A loser of
                // that race leaves a gap in the numbering, which is harmless.)
                if self.meta.insert_new(&run_key, &number)? {
                    number
                } else {
                    self.meta.get(&run_key)?.expect(
                        "insert_new failed because the key exists, and keys are never removed",
                    )
                }
            }
        };
        if let Some(existing) = self.tasks.get(&format!("t-{number}"))? {
            return Ok(existing);
        }
        let day = crate::clock::format_day((due_ms / MS_PER_DAY) as i64);
        let base_title: String = template
            .title
            .chars()
            .take(MAX_TITLE_CHARS - " (YYYY-MM-DD)".len())
            .collect();
        let mut instance = self.new_record(
            number,
            &format!("{base_title} ({day})"),
            template.assignee.clone(),
            template.requester.clone(),
            template.room.clone(),
            now_ms,
        );
        instance.quiet_minutes = template.quiet_minutes;
        instance.quiet_secs = template.quiet_secs;
        instance.recurrence_of = Some(template.id.clone());
        let template_spec = match self
            .storage
            .get_bytes(
                &task_file(&template.id, TaskFile::Spec)?,
                self.storage.max_file_bytes(),
            )
            .await
        {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(StorageError::NotFound { .. }) => String::new(),
            Err(other) => return Err(other.into()),
        };
        let schedule = template
            .schedule
            .as_ref()
            .map(|schedule| format!(", which repeats {schedule}"))
            .unwrap_or_default();
        let body = format!(
            "This is the run due {} of recurring task {}{schedule}.\n\n{}",
            schedule::format_utc(due_ms),
            template.id,
            spec_body(&template_spec, &template.id)
        );
        self.write_spec(&instance, &body).await?;
        if !self.tasks.insert_new(&instance.id, &instance)? {
            // Another attempt at the same run stored it first.
            return self.get(&instance.id);
        }
        Ok(instance)
    }

    /// The run of `template` due at `due_ms` was started and announced: the next beat looks
    /// for runs after it.
    pub fn record_run(&self, template: &str, due_ms: u64) -> Result<Task, TaskError> {
        self.change(template, |task| {
            task.last_run_ms = Some(task.last_run_ms.unwrap_or(0).max(due_ms));
            Ok(())
        })
    }

    /// Every task, for [`heartbeat`].
    pub fn all(&self) -> Result<Vec<Task>, TaskError> {
        self.list(&TaskFilter::default())
    }

    /// Runs [`heartbeat`] over the stored tasks. Post each action, then [`Tasks::apply`] it.
    pub fn beat(&self, now_ms: u64) -> Result<Vec<HeartbeatAction>, TaskError> {
        Ok(heartbeat(&self.all()?, self.reported_until_ms()?, now_ms))
    }

    /// Records that an action was carried out, so the next beat does not repeat it. For a run
    /// of a recurring task this also creates the instance if the caller did not already (see
    /// [`Tasks::start_recurrence`], which is idempotent).
    pub async fn apply(&self, action: &HeartbeatAction, now_ms: u64) -> Result<(), TaskError> {
        match action {
            HeartbeatAction::Nudge { task, .. } => self.record_nudge(task, now_ms).map(drop),
            HeartbeatAction::TellHuman { task, .. } => {
                self.record_told_human(task, now_ms).map(drop)
            }
            HeartbeatAction::Report { until_ms, .. } => self.record_report(*until_ms),
            HeartbeatAction::StartRecurrence { template, due_ms } => {
                self.start_recurrence(template, *due_ms, now_ms).await?;
                self.record_run(template, *due_ms).map(drop)
            }
        }
    }

    /// The Worker was nudged about this task.
    pub fn record_nudge(&self, id: &str, now_ms: u64) -> Result<Task, TaskError> {
        self.change(id, |task| {
            task.nudges = task.nudges.saturating_add(1);
            task.last_nudge_ms = Some(now_ms);
            Ok(())
        })
    }

    /// The human was told that this task went quiet.
    pub fn record_told_human(&self, id: &str, now_ms: u64) -> Result<Task, TaskError> {
        self.change(id, |task| {
            task.told_human_ms = Some(now_ms);
            Ok(())
        })
    }

    /// A report covering changes up to `until_ms` was posted.
    pub fn record_report(&self, until_ms: u64) -> Result<(), TaskError> {
        self.meta.update(&REPORTED_KEY.to_owned(), |current| {
            Some(current.unwrap_or(0).max(until_ms))
        })?;
        Ok(())
    }

    /// Changes up to this time were already reported.
    pub fn reported_until_ms(&self) -> Result<u64, TaskError> {
        Ok(self.meta.get(&REPORTED_KEY.to_owned())?.unwrap_or(0))
    }

    /// Task numbers count 1, 2, 3 … from a counter of our own: sled's `generate_id` jumps by
    /// large steps after a restart, which would make ids hard to type.
    fn next_number(&self) -> Result<u64, TaskError> {
        let next = self
            .meta
            .update(&COUNTER_KEY.to_owned(), |current| {
                Some(current.unwrap_or(0) + 1)
            })?
            .expect("the update closure always returns a value");
        Ok(next)
    }

    /// Reads, changes and writes one record atomically (compare-and-swap, retried when another
    /// writer got there first); the change may refuse, and then nothing is written.
    fn change(
        &self,
        id: &str,
        mut apply: impl FnMut(&mut Task) -> Result<(), TaskError>,
    ) -> Result<Task, TaskError> {
        let id = normalize_id(id);
        let raw = self.tasks.raw();
        loop {
            let current = raw
                .get(id.as_bytes())
                .map_err(StoreError::from)?
                .ok_or_else(|| TaskError::NotFound { id: id.clone() })?;
            let mut task = self.tasks.decode(&current)?;
            apply(&mut task)?;
            let encoded = self.tasks.encode(&task)?;
            let swapped = raw
                .compare_and_swap(id.as_bytes(), Some(current), Some(encoded))
                .map_err(StoreError::from)?;
            if swapped.is_ok() {
                return Ok(task);
            }
        }
    }
}

/// The template's spec without its `# t-N: title` heading, which the instance replaces by its own.
fn spec_body<'a>(spec: &'a str, template_id: &str) -> &'a str {
    let heading = format!("# {template_id}:");
    match spec.split_once('\n') {
        Some((first, rest)) if first.starts_with(&heading) => rest.trim_start_matches('\n'),
        None if spec.starts_with(&heading) => "",
        _ => spec,
    }
}

/// Moves `task` to `to` if that is an allowed edge.
fn transition(task: &mut Task, to: TaskState) -> Result<(), TaskError> {
    check_transition(task, to)?;
    task.state = to;
    Ok(())
}

fn check_transition(task: &Task, to: TaskState) -> Result<(), TaskError> {
    if task.state.allowed_next().contains(&to) {
        Ok(())
    } else {
        Err(TaskError::IllegalTransition {
            id: task.id.clone(),
            from: task.state,
            to,
        })
    }
}
