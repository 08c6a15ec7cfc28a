//! The plan of a project as a typed record: its tasks, who owns each, what each waits for, and
//! where each is. Everything here is pure (no storage, no clock), so the rules — no cycles, no
//! unknown dependencies, a task starts only when everything it depends on is done — are tested
//! without a server and hold the same wherever the plan is changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::ProjectError;

/// Plan keys are short handles the Manager and the person type ("api", "B"); longer text
/// belongs in the title.
const MAX_KEY_CHARS: usize = 32;
/// Titles are one line in lists and in `plan.md`, like task titles.
pub(super) const MAX_TITLE_CHARS: usize = 200;
/// A plan larger than this is more than one project; it also bounds the work of validation
/// and of the waves computation, which run on every edit.
pub const MAX_PLAN_TASKS: usize = 64;

/// Who does a task: a Worker that exists, or one the Manager proposes to create when the plan
/// is confirmed (the person sees the proposal before anything is created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Owner {
    /// An existing Worker, by name.
    Worker { name: String },
    /// A Worker to create on confirmation, with the role the Manager has in mind for it.
    Proposed { name: String, role: String },
}

impl Owner {
    /// The Worker's name, existing or proposed.
    pub fn name(&self) -> &str {
        match self {
            Owner::Worker { name } | Owner::Proposed { name, .. } => name,
        }
    }

    /// Checks and normalises the Worker name the way the roster does, so a plan never names a
    /// Worker that could not exist.
    fn normalised(&self) -> Result<Owner, ProjectError> {
        let name = crate::agent::registry::Registry::normalise_name(self.name()).map_err(|_| {
            ProjectError::InvalidOwner {
                name: self.name().to_owned(),
            }
        })?;
        Ok(match self {
            Owner::Worker { .. } => Owner::Worker { name },
            Owner::Proposed { role, .. } => Owner::Proposed {
                name,
                role: role.trim().to_owned(),
            },
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Worker { name } => write!(f, "{name}"),
            Owner::Proposed { name, role } if role.is_empty() => write!(f, "{name} (new)"),
            Owner::Proposed { name, role } => write!(f, "{name} (new: {role})"),
        }
    }
}

/// Where one task of a plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanTaskState {
    /// Not started; starts once every dependency is done.
    Pending,
    /// Handed to its Worker.
    InProgress,
    /// Finished and accepted as far as anyone has said.
    Done,
    /// Finished, judged not good enough, and going back to its Worker with the reason; tasks
    /// that depend on it wait.
    RevisionNeeded,
    /// Its Worker waits for an answer from the person.
    Blocked,
}

impl PlanTaskState {
    /// The name used in `plan.md`, `!crew project` and tool results.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanTaskState::Pending => "pending",
            PlanTaskState::InProgress => "in progress",
            PlanTaskState::Done => "done",
            PlanTaskState::RevisionNeeded => "revision needed",
            PlanTaskState::Blocked => "blocked",
        }
    }

    /// Whether the task waits to be (re)started: a pending task, or one sent back for revision.
    pub fn awaits_start(self) -> bool {
        matches!(self, PlanTaskState::Pending | PlanTaskState::RevisionNeeded)
    }
}

impl fmt::Display for PlanTaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens and requests spent on a task, from the gateway's metering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub requests: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Adds another count, saturating (a counter never wraps into a small number).
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.requests = self.requests.saturating_add(other.requests);
    }
}

/// A task as the Manager proposes it, before it has any state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDraft {
    /// The plan-local handle other tasks depend on (e.g. `api`).
    pub key: String,
    pub title: String,
    pub owner: Owner,
    /// Keys of the tasks whose results this one needs.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// What "done" means for this task; given to the Worker and used to judge the result.
    #[serde(default)]
    pub acceptance: String,
}

/// One task of a plan, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTask {
    /// The plan-local handle, unique in the plan (compared case-insensitively).
    pub key: String,
    pub title: String,
    pub owner: Owner,
    /// Keys of the tasks that must be done before this one starts, in the order given.
    pub depends_on: Vec<String>,
    pub acceptance: String,
    pub state: PlanTaskState,
    /// How many times the task was handed to its Worker (1 after the first start, 2 after the
    /// first revision was started, ...). With the project id and key it names one start, so the
    /// code that creates the Worker's task can be idempotent per start.
    pub starts: u32,
    /// The Worker task (`t-<n>`) created for the latest start, once recorded.
    pub task_id: Option<String>,
    /// The start whose Worker task has been created. Equal to `starts` when nothing is left to
    /// do for the latest start; smaller after a crash between claiming a start and creating it.
    pub dispatched_start: u32,
    /// Where the latest result is (`tasks/<id>/result.md`), once done.
    pub result_path: Option<String>,
    /// Why the result was sent back, while revision is needed (kept for the next start's spec).
    pub revision_reason: Option<String>,
    /// The open question while blocked.
    pub blocked_question: Option<String>,
    /// Whether the blocked question was put to the person already (it is asked once).
    pub question_asked: bool,
    pub usage: Usage,
}

impl PlanTask {
    fn from_draft(draft: TaskDraft) -> Self {
        Self {
            key: draft.key,
            title: draft.title,
            owner: draft.owner,
            depends_on: draft.depends_on,
            acceptance: draft.acceptance,
            state: PlanTaskState::Pending,
            starts: 0,
            task_id: None,
            dispatched_start: 0,
            result_path: None,
            revision_reason: None,
            blocked_question: None,
            question_asked: false,
            usage: Usage::default(),
        }
    }

    /// Whether the latest start was claimed but its Worker task not recorded yet (a crash came
    /// in between); the resume step finishes it with the same start number.
    pub fn start_unfinished(&self) -> bool {
        self.state == PlanTaskState::InProgress && self.dispatched_start < self.starts
    }
}

/// Where the project as a whole is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectPhase {
    /// Shown to the person; nothing starts until it is confirmed.
    Proposed,
    /// Confirmed; tasks start as their dependencies are done.
    Running,
    /// Every task is done.
    Completed,
    /// The person said no; kept for the record.
    Rejected,
}

impl ProjectPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectPhase::Proposed => "proposed",
            ProjectPhase::Running => "running",
            ProjectPhase::Completed => "completed",
            ProjectPhase::Rejected => "rejected",
        }
    }

    /// Completed and rejected projects never change again.
    pub fn is_finished(self) -> bool {
        matches!(self, ProjectPhase::Completed | ProjectPhase::Rejected)
    }
}

impl fmt::Display for ProjectPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A project record as stored in sled. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Short id a human can type: `p-<n>`.
    pub id: String,
    pub title: String,
    /// The person who asked; confirms, edits, answers blocked questions, gets the summary.
    pub requester: OwnedUserId,
    /// Where the project was asked for (and proposed).
    pub asked_in: Option<OwnedRoomId>,
    /// The "Project: `<title>`" room, once opened on confirmation.
    pub room: Option<OwnedRoomId>,
    pub phase: ProjectPhase,
    /// The tasks in the order the Manager proposed them (the order of `plan.md`).
    pub tasks: Vec<PlanTask>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A change the person (or the Manager) asks of a plan. Every edit is checked like a new plan:
/// a refused edit leaves the plan as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "edit")]
pub enum PlanEdit {
    /// "give the API part to bob".
    Reassign { task: String, owner: Owner },
    /// `task` waits for `on` as well.
    AddDependency { task: String, on: String },
    /// `task` no longer waits for `on`.
    RemoveDependency { task: String, on: String },
    /// New acceptance notes for a task not done yet.
    SetAcceptance { task: String, acceptance: String },
    /// A task added to the plan.
    AddTask { task: TaskDraft },
    /// A task taken out of a plan; refused while others depend on it or once it has started.
    RemoveTask { task: String },
}

/// What a revision request changed, so the caller can tell the Worker and the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionOutcome {
    /// Tasks that depend on the revised one (directly or not) and had already started or
    /// finished on the old result; the Manager decides whether they need revision too.
    pub started_dependents: Vec<String>,
}

impl Project {
    /// A new proposed project from the Manager's drafts, checked as a whole.
    pub fn propose(
        id: String,
        title: &str,
        requester: OwnedUserId,
        asked_in: Option<OwnedRoomId>,
        drafts: Vec<TaskDraft>,
        now_ms: u64,
    ) -> Result<Self, ProjectError> {
        let title = check_title(title)?;
        let tasks = drafts
            .into_iter()
            .map(|draft| normalise_draft(draft).map(PlanTask::from_draft))
            .collect::<Result<Vec<_>, _>>()?;
        let project = Self {
            id,
            title,
            requester,
            asked_in,
            room: None,
            phase: ProjectPhase::Proposed,
            tasks,
            created_ms: now_ms,
            updated_ms: now_ms,
        };
        validate(&project.tasks)?;
        Ok(project)
    }

    /// The task with this key (case-insensitive).
    pub fn task(&self, key: &str) -> Result<&PlanTask, ProjectError> {
        let index = self.index_of(key)?;
        Ok(&self.tasks[index])
    }

    fn task_mut(&mut self, key: &str) -> Result<&mut PlanTask, ProjectError> {
        let index = self.index_of(key)?;
        Ok(&mut self.tasks[index])
    }

    fn index_of(&self, key: &str) -> Result<usize, ProjectError> {
        let wanted = key.trim();
        self.tasks
            .iter()
            .position(|task| task.key.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| ProjectError::UnknownTask {
                project: self.id.clone(),
                key: wanted.to_owned(),
                known: self.keys().join(", "),
            })
    }

    fn keys(&self) -> Vec<String> {
        self.tasks.iter().map(|task| task.key.clone()).collect()
    }

    /// Keys of the tasks that may start now: waiting to (re)start, every dependency done. Empty
    /// unless the project is running. In plan order, so starts are deterministic.
    pub fn ready_tasks(&self) -> Vec<String> {
        if self.phase != ProjectPhase::Running {
            return Vec::new();
        }
        ready(&self.tasks)
    }

    /// The whole schedule if every task finishes: wave 1 is what starts first, each later wave
    /// what its predecessors unlock. Tasks already done form no wave. For `plan.md` and the
    /// proposal message.
    pub fn waves(&self) -> Vec<Vec<String>> {
        waves(&self.tasks)
    }

    /// The person confirmed; tasks may start. Only a proposed project can be confirmed.
    pub fn confirm(&mut self, now_ms: u64) -> Result<(), ProjectError> {
        self.require_phase(ProjectPhase::Proposed, "confirmed")?;
        self.phase = ProjectPhase::Running;
        self.updated_ms = now_ms;
        Ok(())
    }

    /// The person said no. Only a proposed project can be rejected (a running one is stopped
    /// task by task, which the Manager's tools will do).
    pub fn reject(&mut self, now_ms: u64) -> Result<(), ProjectError> {
        self.require_phase(ProjectPhase::Proposed, "rejected")?;
        self.phase = ProjectPhase::Rejected;
        self.updated_ms = now_ms;
        Ok(())
    }

    fn require_phase(&self, wanted: ProjectPhase, action: &str) -> Result<(), ProjectError> {
        if self.phase == wanted {
            Ok(())
        } else {
            Err(ProjectError::WrongPhase {
                project: self.id.clone(),
                phase: self.phase,
                action: format!("be {action}"),
            })
        }
    }

    fn require_unfinished(&self, action: &str) -> Result<(), ProjectError> {
        if self.phase.is_finished() {
            Err(ProjectError::WrongPhase {
                project: self.id.clone(),
                phase: self.phase,
                action: action.to_owned(),
            })
        } else {
            Ok(())
        }
    }

    /// Applies an edit and checks the result like a new plan; on any error the plan is as it
    /// was. Returns the keys now ready to start (for a running project), so the caller re-plans.
    pub fn edit(&mut self, edit: PlanEdit, now_ms: u64) -> Result<Vec<String>, ProjectError> {
        self.require_unfinished("be edited")?;
        let mut next = self.clone();
        next.apply(edit)?;
        validate(&next.tasks)?;
        next.updated_ms = now_ms;
        *self = next;
        Ok(self.ready_tasks())
    }

    fn apply(&mut self, edit: PlanEdit) -> Result<(), ProjectError> {
        match edit {
            PlanEdit::Reassign { task, owner } => {
                let owner = owner.normalised()?;
                let task = self.task_mut(&task)?;
                // A task with a Worker on it (in progress or blocked) stays with that Worker;
                // one that is done is done. Reassigning takes effect at the next start.
                if !task.state.awaits_start() {
                    return Err(ProjectError::TaskNotEditable {
                        key: task.key.clone(),
                        state: task.state,
                        change: "be given to another Worker",
                    });
                }
                task.owner = owner;
            }
            PlanEdit::AddDependency { task, on } => {
                let on = self.task(&on)?.key.clone();
                let task = self.task_mut(&task)?;
                if task.state != PlanTaskState::Pending {
                    return Err(ProjectError::TaskNotEditable {
                        key: task.key.clone(),
                        state: task.state,
                        change: "wait for another task",
                    });
                }
                if !task
                    .depends_on
                    .iter()
                    .any(|dep| dep.eq_ignore_ascii_case(&on))
                {
                    task.depends_on.push(on);
                }
            }
            PlanEdit::RemoveDependency { task, on } => {
                let task = self.task_mut(&task)?;
                let before = task.depends_on.len();
                task.depends_on
                    .retain(|dep| !dep.eq_ignore_ascii_case(on.trim()));
                if task.depends_on.len() == before {
                    return Err(ProjectError::NotADependency {
                        key: task.key.clone(),
                        on: on.trim().to_owned(),
                    });
                }
            }
            PlanEdit::SetAcceptance { task, acceptance } => {
                let task = self.task_mut(&task)?;
                if task.state == PlanTaskState::Done {
                    return Err(ProjectError::TaskNotEditable {
                        key: task.key.clone(),
                        state: task.state,
                        change: "get new acceptance notes (ask for a revision instead)",
                    });
                }
                task.acceptance = acceptance.trim().to_owned();
            }
            PlanEdit::AddTask { task } => {
                let task = normalise_draft(task)?;
                self.tasks.push(PlanTask::from_draft(task));
            }
            PlanEdit::RemoveTask { task } => {
                let index = self.index_of(&task)?;
                let removed = &self.tasks[index];
                if removed.state != PlanTaskState::Pending || removed.starts > 0 {
                    return Err(ProjectError::TaskNotEditable {
                        key: removed.key.clone(),
                        state: removed.state,
                        change: "be removed (it has started)",
                    });
                }
                let dependents: Vec<String> = self
                    .tasks
                    .iter()
                    .filter(|other| depends_directly(other, &removed.key))
                    .map(|other| other.key.clone())
                    .collect();
                if !dependents.is_empty() {
                    return Err(ProjectError::StillNeeded {
                        key: removed.key.clone(),
                        dependents: dependents.join(", "),
                    });
                }
                self.tasks.remove(index);
            }
        }
        Ok(())
    }

    /// Claims the next start of a ready task: it becomes in progress with a new start number.
    /// Refused unless the project runs and the task is ready, so a second call for the same
    /// start (a re-run after a crash) cannot start it twice; see [`Project::start_unfinished`].
    pub fn claim_start(&mut self, key: &str, now_ms: u64) -> Result<StartClaim, ProjectError> {
        self.require_phase(ProjectPhase::Running, "start tasks (confirm it first)")?;
        let index = self.index_of(key)?;
        let task = &self.tasks[index];
        if task.state == PlanTaskState::InProgress {
            return Err(ProjectError::AlreadyStarted {
                key: task.key.clone(),
                start: task.starts,
            });
        }
        if !task.state.awaits_start() {
            return Err(ProjectError::TaskNotEditable {
                key: task.key.clone(),
                state: task.state,
                change: "start",
            });
        }
        if let Owner::Proposed { name, .. } = &task.owner {
            return Err(ProjectError::WorkerNotCreated {
                key: task.key.clone(),
                name: name.clone(),
            });
        }
        let waiting = self.unfinished_dependencies(task);
        if !waiting.is_empty() {
            return Err(ProjectError::DependenciesNotDone {
                key: task.key.clone(),
                waiting: waiting.join(", "),
            });
        }
        let inputs = self.inputs_of(task);
        let task = &mut self.tasks[index];
        task.state = PlanTaskState::InProgress;
        task.starts += 1;
        task.result_path = None;
        self.updated_ms = now_ms;
        let task = &self.tasks[index];
        Ok(StartClaim {
            project: self.id.clone(),
            key: task.key.clone(),
            start: task.starts,
            inputs,
            revision_reason: task.revision_reason.clone(),
        })
    }

    /// The claim for a start that was claimed but never recorded as created (a crash came in
    /// between), so the caller can finish it with the same start number.
    pub fn start_unfinished(&self, key: &str) -> Result<Option<StartClaim>, ProjectError> {
        let task = self.task(key)?;
        if !task.start_unfinished() {
            return Ok(None);
        }
        Ok(Some(StartClaim {
            project: self.id.clone(),
            key: task.key.clone(),
            start: task.starts,
            inputs: self.inputs_of(task),
            revision_reason: task.revision_reason.clone(),
        }))
    }

    /// Every claimed start whose Worker task is not recorded, for the resume step after a crash.
    pub fn unfinished_starts(&self) -> Vec<StartClaim> {
        self.tasks
            .iter()
            .filter_map(|task| self.start_unfinished(&task.key).ok().flatten())
            .collect()
    }

    /// Records that the Worker task for `start` exists. Idempotent: recording the same start
    /// with the same task again changes nothing; a different task for a recorded start is
    /// refused (it would be the second start the bookkeeping exists to prevent).
    pub fn record_dispatch(
        &mut self,
        key: &str,
        start: u32,
        task_id: &str,
        now_ms: u64,
    ) -> Result<(), ProjectError> {
        let task = self.task_mut(key)?;
        if start != task.starts || start == 0 {
            return Err(ProjectError::StaleStart {
                key: task.key.clone(),
                start,
                latest: task.starts,
            });
        }
        if task.dispatched_start == start {
            return match task.task_id.as_deref() {
                Some(existing) if existing == task_id => Ok(()),
                existing => Err(ProjectError::AlreadyDispatched {
                    key: task.key.clone(),
                    start,
                    task_id: existing.unwrap_or_default().to_owned(),
                }),
            };
        }
        task.dispatched_start = start;
        task.task_id = Some(task_id.to_owned());
        self.updated_ms = now_ms;
        Ok(())
    }

    /// The task's Worker finished it. Returns the keys this unlocks (ready now), and completes
    /// the project when it was the last one.
    pub fn complete_task(
        &mut self,
        key: &str,
        result_path: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, ProjectError> {
        self.require_phase(ProjectPhase::Running, "have tasks completed")?;
        let task = self.task_mut(key)?;
        if !matches!(
            task.state,
            PlanTaskState::InProgress | PlanTaskState::Blocked
        ) {
            return Err(ProjectError::TaskNotEditable {
                key: task.key.clone(),
                state: task.state,
                change: "be completed",
            });
        }
        task.state = PlanTaskState::Done;
        task.result_path = Some(result_path.to_owned());
        task.revision_reason = None;
        task.blocked_question = None;
        task.question_asked = false;
        self.updated_ms = now_ms;
        if self
            .tasks
            .iter()
            .all(|task| task.state == PlanTaskState::Done)
        {
            self.phase = ProjectPhase::Completed;
        }
        Ok(self.ready_tasks())
    }

    /// A result judged not good enough goes back to its Worker with the reason. Only the task
    /// itself re-opens: its pending dependents keep waiting because it is no longer done, and
    /// nothing else changes. Dependents that already started on the old result are named.
    pub fn request_revision(
        &mut self,
        key: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<RevisionOutcome, ProjectError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(ProjectError::EmptyText {
                what: "reason for the revision",
            });
        }
        // The person may still find the final result of a completed project lacking: it then
        // runs again.
        if self.phase != ProjectPhase::Completed {
            self.require_phase(ProjectPhase::Running, "have revisions")?;
        }
        let index = self.index_of(key)?;
        let task = &self.tasks[index];
        if task.state != PlanTaskState::Done {
            return Err(ProjectError::TaskNotEditable {
                key: task.key.clone(),
                state: task.state,
                change: "be sent back for revision (only a done task can)",
            });
        }
        let revised = task.key.clone();
        let started_dependents = self
            .dependents_closure(&revised)
            .into_iter()
            .filter(|dependent| {
                self.task(dependent)
                    .map(|task| !task.state.awaits_start() || task.starts > 0)
                    .unwrap_or(false)
            })
            .collect();
        self.phase = ProjectPhase::Running;
        let task = &mut self.tasks[index];
        task.state = PlanTaskState::RevisionNeeded;
        task.revision_reason = Some(reason.to_owned());
        self.updated_ms = now_ms;
        Ok(RevisionOutcome { started_dependents })
    }

    /// The Worker needs an answer. The question is recorded, to be asked once.
    pub fn block_task(
        &mut self,
        key: &str,
        question: &str,
        now_ms: u64,
    ) -> Result<(), ProjectError> {
        let question = question.trim();
        if question.is_empty() {
            return Err(ProjectError::EmptyText { what: "question" });
        }
        self.require_phase(ProjectPhase::Running, "have blocked tasks")?;
        let task = self.task_mut(key)?;
        if task.state != PlanTaskState::InProgress {
            return Err(ProjectError::TaskNotEditable {
                key: task.key.clone(),
                state: task.state,
                change: "be blocked",
            });
        }
        task.state = PlanTaskState::Blocked;
        task.blocked_question = Some(question.to_owned());
        task.question_asked = false;
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Marks the blocked question as put to the person. Returns whether this call did it, so a
    /// re-run after a crash does not ask twice.
    pub fn mark_question_asked(&mut self, key: &str) -> Result<bool, ProjectError> {
        let task = self.task_mut(key)?;
        if task.state != PlanTaskState::Blocked || task.question_asked {
            return Ok(false);
        }
        task.question_asked = true;
        Ok(true)
    }

    /// The person answered: the blocked task is in progress again (same start).
    pub fn unblock_task(&mut self, key: &str, now_ms: u64) -> Result<(), ProjectError> {
        let task = self.task_mut(key)?;
        if task.state != PlanTaskState::Blocked {
            return Err(ProjectError::TaskNotEditable {
                key: task.key.clone(),
                state: task.state,
                change: "resume (it is not blocked)",
            });
        }
        task.state = PlanTaskState::InProgress;
        task.blocked_question = None;
        task.question_asked = false;
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Workers the plan proposes to create, each once with the first role given, in plan
    /// order. Tasks they own cannot start until [`Project::worker_created`] is recorded.
    pub fn proposed_workers(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for task in &self.tasks {
            if let Owner::Proposed { name, role } = &task.owner
                && !out.iter().any(|(known, _)| known == name)
            {
                out.push((name.clone(), role.clone()));
            }
        }
        out
    }

    /// The proposed Worker `name` now exists: every task it owns is owned by that Worker.
    /// Returns how many tasks changed (0 on a repeat, so it is safe to re-run).
    pub fn worker_created(&mut self, name: &str, now_ms: u64) -> usize {
        let name = name.trim().trim_start_matches('@').to_lowercase();
        let mut changed = 0;
        for task in &mut self.tasks {
            if matches!(&task.owner, Owner::Proposed { name: proposed, .. } if *proposed == name) {
                task.owner = Owner::Worker { name: name.clone() };
                changed += 1;
            }
        }
        if changed > 0 {
            self.updated_ms = now_ms;
        }
        changed
    }

    /// The key of the task whose latest start created Worker task `task_id`.
    pub fn key_of_worker_task(&self, task_id: &str) -> Option<&str> {
        self.tasks
            .iter()
            .find(|task| task.task_id.as_deref() == Some(task_id))
            .map(|task| task.key.as_str())
    }

    /// Adds metered usage to a task (any phase: late accounting still counts).
    pub fn add_usage(&mut self, key: &str, usage: Usage) -> Result<(), ProjectError> {
        self.task_mut(key)?.usage.add(usage);
        Ok(())
    }

    /// The project's tokens and requests, per task and in total.
    pub fn cost(&self) -> CostSummary {
        let mut total = Usage::default();
        let per_task = self
            .tasks
            .iter()
            .map(|task| {
                total.add(task.usage);
                (task.key.clone(), task.usage)
            })
            .collect();
        CostSummary { per_task, total }
    }

    /// Dependencies of `task` that are not done, in its listed order.
    fn unfinished_dependencies(&self, task: &PlanTask) -> Vec<String> {
        task.depends_on
            .iter()
            .filter(|dep| {
                self.task(dep)
                    .map(|dep| dep.state != PlanTaskState::Done)
                    .unwrap_or(true)
            })
            .cloned()
            .collect()
    }

    /// The results a task is handed: key and result path of each dependency, by path (the
    /// Worker reads them; nothing is pasted).
    fn inputs_of(&self, task: &PlanTask) -> Vec<TaskInput> {
        task.depends_on
            .iter()
            .filter_map(|dep| self.task(dep).ok())
            .map(|dep| TaskInput {
                key: dep.key.clone(),
                title: dep.title.clone(),
                result_path: dep.result_path.clone(),
            })
            .collect()
    }

    /// Every task that depends on `key` directly or through others, in plan order.
    fn dependents_closure(&self, key: &str) -> Vec<String> {
        let mut reached: BTreeSet<String> = BTreeSet::new();
        let mut frontier = vec![key.to_ascii_lowercase()];
        while let Some(current) = frontier.pop() {
            for task in &self.tasks {
                let lower = task.key.to_ascii_lowercase();
                if depends_directly(task, &current) && reached.insert(lower.clone()) {
                    frontier.push(lower);
                }
            }
        }
        self.tasks
            .iter()
            .filter(|task| reached.contains(&task.key.to_ascii_lowercase()))
            .map(|task| task.key.clone())
            .collect()
    }
}

fn depends_directly(task: &PlanTask, on: &str) -> bool {
    task.depends_on
        .iter()
        .any(|dep| dep.eq_ignore_ascii_case(on))
}

/// One start of one task, claimed: what the code that creates the Worker's task needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartClaim {
    pub project: String,
    pub key: String,
    /// The start number; with project and key, the idempotency key of the Worker task.
    pub start: u32,
    /// Results of the tasks this one depends on, by path.
    pub inputs: Vec<TaskInput>,
    /// Set when this start is a revision: why the previous result was sent back.
    pub revision_reason: Option<String>,
}

impl StartClaim {
    /// A key naming this one start, for idempotent creation of its Worker task (a re-run
    /// after a crash finds the task created under the same key instead of making another).
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.project,
            self.key.to_ascii_lowercase(),
            self.start
        )
    }
}

/// A dependency's result, handed to the task that needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInput {
    pub key: String,
    pub title: String,
    pub result_path: Option<String>,
}

/// Tokens and requests per task (plan order) and in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostSummary {
    pub per_task: Vec<(String, Usage)>,
    pub total: Usage,
}

fn check_title(title: &str) -> Result<String, ProjectError> {
    let title = title.trim();
    if title.is_empty() || title.contains('\n') || title.chars().count() > MAX_TITLE_CHARS {
        return Err(ProjectError::InvalidTitle);
    }
    Ok(title.to_owned())
}

fn normalise_draft(draft: TaskDraft) -> Result<TaskDraft, ProjectError> {
    let key = draft.key.trim().to_owned();
    let key_ok = !key.is_empty()
        && key.chars().count() <= MAX_KEY_CHARS
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || "._-".contains(c));
    if !key_ok {
        return Err(ProjectError::InvalidKey { key });
    }
    let title = check_title(&draft.title)
        .map_err(|_| ProjectError::InvalidTaskTitle { key: key.clone() })?;
    Ok(TaskDraft {
        key,
        title,
        owner: draft.owner.normalised()?,
        depends_on: draft
            .depends_on
            .into_iter()
            .map(|dep| dep.trim().to_owned())
            .collect(),
        acceptance: draft.acceptance.trim().to_owned(),
    })
}

/// Checks a plan as a whole: not empty, not too large, keys unique, every dependency a task
/// of the plan, no cycles. The first cycle found is named in plan order ("A → B → A").
pub fn validate(tasks: &[PlanTask]) -> Result<(), ProjectError> {
    if tasks.is_empty() {
        return Err(ProjectError::EmptyPlan);
    }
    if tasks.len() > MAX_PLAN_TASKS {
        return Err(ProjectError::TooManyTasks { count: tasks.len() });
    }
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (position, task) in tasks.iter().enumerate() {
        if index
            .insert(task.key.to_ascii_lowercase(), position)
            .is_some()
        {
            return Err(ProjectError::DuplicateKey {
                key: task.key.clone(),
            });
        }
    }
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(tasks.len());
    for task in tasks {
        let mut targets = Vec::with_capacity(task.depends_on.len());
        for dep in &task.depends_on {
            let target = *index.get(&dep.to_ascii_lowercase()).ok_or_else(|| {
                ProjectError::UnknownDependency {
                    key: task.key.clone(),
                    dependency: dep.clone(),
                }
            })?;
            targets.push(target);
        }
        edges.push(targets);
    }
    if let Some(cycle) = find_cycle(&edges) {
        let names: Vec<&str> = cycle.iter().map(|&i| tasks[i].key.as_str()).collect();
        return Err(ProjectError::Cycle {
            cycle: names.join(" → "),
        });
    }
    Ok(())
}

/// A cycle in the "depends on" graph as node indices, the first repeated at the end, found by
/// an iterative depth-first search from each node in order (deterministic for one plan).
fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unseen,
        OnPath,
        Finished,
    }
    let mut marks = vec![Mark::Unseen; edges.len()];
    for root in 0..edges.len() {
        if marks[root] != Mark::Unseen {
            continue;
        }
        // The current path, each node with the index of its next edge to follow.
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        marks[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            if let Some(&target) = edges[node].get(*next) {
                *next += 1;
                match marks[target] {
                    Mark::OnPath => {
                        let start = path
                            .iter()
                            .position(|&(on_path, _)| on_path == target)
                            .expect("a node marked on the path is on the path");
                        let mut cycle: Vec<usize> =
                            path[start..].iter().map(|&(on_path, _)| on_path).collect();
                        cycle.push(target);
                        return Some(cycle);
                    }
                    Mark::Unseen => {
                        marks[target] = Mark::OnPath;
                        path.push((target, 0));
                    }
                    Mark::Finished => {}
                }
            } else {
                marks[node] = Mark::Finished;
                path.pop();
            }
        }
    }
    None
}

/// Keys of tasks waiting to (re)start whose dependencies are all done, in plan order.
fn ready(tasks: &[PlanTask]) -> Vec<String> {
    let done: BTreeSet<String> = tasks
        .iter()
        .filter(|task| task.state == PlanTaskState::Done)
        .map(|task| task.key.to_ascii_lowercase())
        .collect();
    tasks
        .iter()
        .filter(|task| task.state.awaits_start())
        .filter(|task| {
            task.depends_on
                .iter()
                .all(|dep| done.contains(&dep.to_ascii_lowercase()))
        })
        .map(|task| task.key.clone())
        .collect()
}

/// The schedule if every unfinished task finishes: layers of tasks, each depending only on
/// done tasks and earlier layers. Assumes a validated (acyclic) plan; on a cycle the tasks in
/// it are left out rather than looping.
fn waves(tasks: &[PlanTask]) -> Vec<Vec<String>> {
    let mut done: BTreeSet<String> = tasks
        .iter()
        .filter(|task| task.state == PlanTaskState::Done)
        .map(|task| task.key.to_ascii_lowercase())
        .collect();
    let mut remaining: Vec<&PlanTask> = tasks
        .iter()
        .filter(|task| task.state != PlanTaskState::Done)
        .collect();
    let mut out = Vec::new();
    while !remaining.is_empty() {
        let (wave, rest): (Vec<&PlanTask>, Vec<&PlanTask>) =
            remaining.into_iter().partition(|task| {
                task.depends_on
                    .iter()
                    .all(|dep| done.contains(&dep.to_ascii_lowercase()))
            });
        if wave.is_empty() {
            break;
        }
        for task in &wave {
            done.insert(task.key.to_ascii_lowercase());
        }
        out.push(wave.iter().map(|task| task.key.clone()).collect());
        remaining = rest;
    }
    out
}
