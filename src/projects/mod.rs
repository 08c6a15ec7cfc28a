//! Projects: work larger than one task, planned by the Manager as tasks with owners,
//! dependencies and acceptance notes, and carried out in waves.
//!
//! A project is a typed record ([`Project`], tree `projects`, keyed by its short id `p-<n>`)
//! holding its plan: each [`PlanTask`] has a key, an [`Owner`] (an existing Worker or one the
//! Manager proposes to create), the keys it depends on, acceptance notes and a
//! [`PlanTaskState`]. A plan is checked as a whole whenever it is made or edited
//! ([`plan::validate`]): unknown dependencies and cycles are refused, a cycle named
//! ("A → B → A"). Once the person confirms, [`Project::ready_tasks`] says what may start now:
//! every task waiting to start whose dependencies are done. A result sent back for revision
//! re-opens that task only; what depends on it waits because it is no longer done.
//!
//! Starting a task is two steps so that a crash never starts it twice: [`Projects::claim_start`]
//! atomically moves the task to in progress with a new start number, then the caller creates the
//! Worker's task (idempotently, under [`StartClaim::idempotency_key`]) and records it with
//! [`Projects::record_dispatch`]. After a crash, [`Projects::unfinished_starts`] lists the claims
//! whose Worker task was never recorded, to be finished with the same start number.
//!
//! [`ProjectDriver`] does both steps for every ready task ([`ProjectDriver::advance`]), makes
//! each Worker task once per start ([`crate::tasks::Tasks::create_once`]), moves on when a Worker
//! task completes ([`ProjectDriver::worker_task_done`]) and, at start-up, finishes interrupted
//! starts ([`ProjectDriver::resume_all`]).
//!
//! The plan is rendered as `projects/<id>/plan.md` ([`render::plan_markdown`]); the cost of a
//! project is the sum of its tasks' metered tokens and requests ([`Project::cost`]).
//!
//! Not for: talking to Matrix or the LLM, or creating Workers (the Manager's tools and the
//! server do that and call in here: `agent::manager_tools` and `agent::project_flow`).

pub mod driver;
pub mod plan;
pub mod render;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, Tree};

pub use driver::{Advance, ProjectDriver, StartedTask};

pub use plan::{
    CostSummary, MAX_PLAN_TASKS, Owner, PlanEdit, PlanTask, PlanTaskState, Project, ProjectPhase,
    RevisionOutcome, StartClaim, TaskDraft, TaskInput, Usage, validate,
};
pub use render::{
    cost_summary_text, plan_markdown, plan_path, project_list_text, project_status_text,
    start_spec, write_plan,
};

/// Tree holding the project records, keyed by project id.
const PROJECTS_TREE: &str = "projects";
/// Tree holding the id counter.
const META_TREE: &str = "projects_meta";
const COUNTER_KEY: &str = "next_number";

/// Everything that can go wrong with a project or its plan; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// No project has this id.
    #[error("there is no project `{id}`; project ids look like p-3 (`!crew projects` lists them)")]
    NotFound { id: String },
    /// A plan needs at least one task.
    #[error("a plan needs at least one task")]
    EmptyPlan,
    /// A plan this large is several projects.
    #[error(
        "a plan may have at most {MAX_PLAN_TASKS} tasks (this one has {count}); split it into several projects"
    )]
    TooManyTasks { count: usize },
    /// The project needs a one-line title.
    #[error(
        "a project needs a one-line title (at most {} characters)",
        plan::MAX_TITLE_CHARS
    )]
    InvalidTitle,
    /// A task of the plan needs a one-line title.
    #[error(
        "task `{key}` needs a one-line title (at most {} characters); put details in its acceptance notes",
        plan::MAX_TITLE_CHARS
    )]
    InvalidTaskTitle { key: String },
    /// A task key is empty, too long or has odd characters.
    #[error(
        "`{key}` is not a task key; use a short handle of letters, digits, `.`, `_` and `-` (like `api` or `B`)"
    )]
    InvalidKey { key: String },
    /// Two tasks share a key.
    #[error("two tasks of the plan are called `{key}`; give each task its own key")]
    DuplicateKey { key: String },
    /// The owner is not a valid Worker name.
    #[error(
        "`{name}` is not a Worker name; names are lower-case letters, digits, `.`, `_` and `-`, starting with a letter"
    )]
    InvalidOwner { name: String },
    /// A task depends on a key that is not in the plan.
    #[error("task `{key}` depends on `{dependency}`, which is not a task of this plan")]
    UnknownDependency { key: String, dependency: String },
    /// The dependencies go round in a circle, so none of those tasks could ever start.
    #[error("the plan has a dependency cycle: {cycle}; remove one of these dependencies")]
    Cycle { cycle: String },
    /// The key names no task of this project.
    #[error("project {project} has no task `{key}`; its tasks are {known}")]
    UnknownTask {
        project: String,
        key: String,
        known: String,
    },
    /// The dependency to remove is not there.
    #[error("task `{key}` does not depend on `{on}`")]
    NotADependency { key: String, on: String },
    /// A task is still needed by others.
    #[error("task `{key}` cannot be removed: {dependents} depend on it; change them first")]
    StillNeeded { key: String, dependents: String },
    /// The change does not fit the task's state.
    #[error("task `{key}` is {state} and cannot {change}")]
    TaskNotEditable {
        key: String,
        state: PlanTaskState,
        change: &'static str,
    },
    /// The change does not fit the project's phase.
    #[error("project {project} is {phase} and cannot {action}")]
    WrongPhase {
        project: String,
        phase: ProjectPhase,
        action: String,
    },
    /// The task is already running for this start.
    #[error("task `{key}` is already in progress (start {start}); it is not started twice")]
    AlreadyStarted { key: String, start: u32 },
    /// The task waits for others.
    #[error("task `{key}` waits for {waiting} to be done")]
    DependenciesNotDone { key: String, waiting: String },
    /// A dispatch was recorded for a start that is not the latest.
    #[error("start {start} of task `{key}` is not its latest start ({latest})")]
    StaleStart {
        key: String,
        start: u32,
        latest: u32,
    },
    /// A different Worker task was already recorded for this start.
    #[error("start {start} of task `{key}` already has Worker task `{task_id}`")]
    AlreadyDispatched {
        key: String,
        start: u32,
        task_id: String,
    },
    /// The task's owner is a proposed Worker that was not created yet.
    #[error(
        "task `{key}` is for the proposed Worker `{name}`, which does not exist yet; create it first"
    )]
    WorkerNotCreated { key: String, name: String },
    /// Something that must be said is empty.
    #[error("the {what} is empty; say something")]
    EmptyText { what: &'static str },
    /// The project database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Creating or reading a Worker task failed.
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),
    /// Writing `plan.md` failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// Accepts what humans type for a project id: `p-3`, `P-3`, `3` or `#3`.
pub fn normalize_id(raw: &str) -> String {
    let trimmed = raw.trim().trim_start_matches('#');
    let lower = trimmed.to_ascii_lowercase();
    if !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_digit()) {
        return format!("p-{lower}");
    }
    lower
}

/// A proposal as the Manager makes it (the input of [`Projects::propose`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectDraft {
    pub title: String,
    pub tasks: Vec<TaskDraft>,
}

/// The project service: records in sled, every change a read-change-write on one record, so
/// two turns changing one project never lose each other's change. Cheap to clone.
#[derive(Clone)]
pub struct Projects {
    projects: Tree<String, Project>,
    meta: Tree<String, u64>,
}

impl std::fmt::Debug for Projects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projects")
            .field("projects", &self.projects.len())
            .finish()
    }
}

impl Projects {
    /// Opens the project trees in `store`.
    pub fn open(store: &Store) -> Result<Self, ProjectError> {
        Ok(Self {
            projects: store.tree(PROJECTS_TREE)?,
            meta: store.tree(META_TREE)?,
        })
    }

    /// Checks the draft and stores it as a proposed project; nothing starts until confirmed.
    pub fn propose(
        &self,
        draft: ProjectDraft,
        requester: ruma::OwnedUserId,
        asked_in: Option<ruma::OwnedRoomId>,
        now_ms: u64,
    ) -> Result<Project, ProjectError> {
        // Checked before taking a number, so refused drafts leave no gaps in the ids.
        Project::propose(
            String::new(),
            &draft.title,
            requester.clone(),
            asked_in.clone(),
            draft.tasks.clone(),
            now_ms,
        )?;
        let number = self.next_number()?;
        let project = Project::propose(
            format!("p-{number}"),
            &draft.title,
            requester,
            asked_in,
            draft.tasks,
            now_ms,
        )?;
        self.projects.insert(&project.id, &project)?;
        Ok(project)
    }

    fn next_number(&self) -> Result<u64, ProjectError> {
        let counter = COUNTER_KEY.to_owned();
        let next = self
            .meta
            .update(&counter, |current| Some(current.unwrap_or(0) + 1))?
            .expect("the counter update always writes a value");
        Ok(next)
    }

    /// The project with this id (typed leniently, see [`normalize_id`]).
    pub fn get(&self, id: &str) -> Result<Project, ProjectError> {
        let id = normalize_id(id);
        self.projects.get(&id)?.ok_or(ProjectError::NotFound { id })
    }

    /// Every project, in creation order.
    pub fn list(&self) -> Result<Vec<Project>, ProjectError> {
        let mut out = Vec::new();
        for entry in self.projects.iter() {
            out.push(entry?.1);
        }
        out.sort_by_key(|project| project_number(&project.id));
        Ok(out)
    }

    /// Projects that are proposed or running: what the resume step after a start looks at.
    pub fn unfinished(&self) -> Result<Vec<Project>, ProjectError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|project| !project.phase.is_finished())
            .collect())
    }

    /// Applies `change` to the stored project atomically; on error nothing is written.
    fn change<R>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Project) -> Result<R, ProjectError>,
    ) -> Result<(Project, R), ProjectError> {
        let id = normalize_id(id);
        let mut outcome: Option<Result<(Project, R), ProjectError>> = None;
        self.projects.update(&id, |current| {
            let Some(original) = current else {
                outcome = Some(Err(ProjectError::NotFound { id: id.clone() }));
                return None;
            };
            let mut project = original.clone();
            match change(&mut project) {
                Ok(result) => {
                    outcome = Some(Ok((project.clone(), result)));
                    Some(project)
                }
                Err(error) => {
                    outcome = Some(Err(error));
                    Some(original)
                }
            }
        })?;
        outcome.expect("the update closure runs at least once")
    }

    /// The person confirmed. Returns the project and the tasks that may start now.
    pub fn confirm(&self, id: &str, now_ms: u64) -> Result<(Project, Vec<String>), ProjectError> {
        self.change(id, |project| {
            project.confirm(now_ms)?;
            Ok(project.ready_tasks())
        })
    }

    /// The person said no to the proposal.
    pub fn reject(&self, id: &str, now_ms: u64) -> Result<Project, ProjectError> {
        Ok(self.change(id, |project| project.reject(now_ms))?.0)
    }

    /// Records the project room once it is opened.
    pub fn set_room(
        &self,
        id: &str,
        room: ruma::OwnedRoomId,
        now_ms: u64,
    ) -> Result<Project, ProjectError> {
        Ok(self
            .change(id, |project| {
                project.room = Some(room.clone());
                project.updated_ms = now_ms;
                Ok(())
            })?
            .0)
    }

    /// Edits the plan (re-validated as a whole). Returns the project and what may start now.
    pub fn edit(
        &self,
        id: &str,
        edit: PlanEdit,
        now_ms: u64,
    ) -> Result<(Project, Vec<String>), ProjectError> {
        self.change(id, |project| project.edit(edit.clone(), now_ms))
    }

    /// Claims the next start of a ready task (see the module doc). A second claim for a task
    /// already in progress is refused, so each start happens once.
    pub fn claim_start(
        &self,
        id: &str,
        key: &str,
        now_ms: u64,
    ) -> Result<StartClaim, ProjectError> {
        Ok(self
            .change(id, |project| project.claim_start(key, now_ms))?
            .1)
    }

    /// Records the Worker task created for a claimed start (idempotent for the same task).
    pub fn record_dispatch(
        &self,
        id: &str,
        key: &str,
        start: u32,
        task_id: &str,
        now_ms: u64,
    ) -> Result<Project, ProjectError> {
        Ok(self
            .change(id, |project| {
                project.record_dispatch(key, start, task_id, now_ms)
            })?
            .0)
    }

    /// Claimed starts of unfinished projects whose Worker task was never recorded.
    pub fn unfinished_starts(&self) -> Result<Vec<StartClaim>, ProjectError> {
        Ok(self
            .unfinished()?
            .iter()
            .flat_map(Project::unfinished_starts)
            .collect())
    }

    /// A task's Worker finished. Returns the project (completed if it was the last task) and
    /// the tasks this unlocks.
    pub fn complete_task(
        &self,
        id: &str,
        key: &str,
        result_path: &str,
        now_ms: u64,
    ) -> Result<(Project, Vec<String>), ProjectError> {
        self.change(id, |project| {
            project.complete_task(key, result_path, now_ms)
        })
    }

    /// Sends a done task back for revision with the reason.
    pub fn request_revision(
        &self,
        id: &str,
        key: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Project, RevisionOutcome), ProjectError> {
        self.change(id, |project| project.request_revision(key, reason, now_ms))
    }

    /// The task's Worker needs an answer.
    pub fn block_task(
        &self,
        id: &str,
        key: &str,
        question: &str,
        now_ms: u64,
    ) -> Result<Project, ProjectError> {
        Ok(self
            .change(id, |project| project.block_task(key, question, now_ms))?
            .0)
    }

    /// Marks a blocked question as asked; true only for the call that did it (ask once).
    pub fn mark_question_asked(&self, id: &str, key: &str) -> Result<bool, ProjectError> {
        Ok(self
            .change(id, |project| project.mark_question_asked(key))?
            .1)
    }

    /// The person answered; the blocked task resumes.
    pub fn unblock_task(&self, id: &str, key: &str, now_ms: u64) -> Result<Project, ProjectError> {
        Ok(self
            .change(id, |project| project.unblock_task(key, now_ms))?
            .0)
    }

    /// Records that a proposed Worker was created (see [`Project::worker_created`]).
    pub fn worker_created(
        &self,
        id: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Project, ProjectError> {
        Ok(self
            .change(id, |project| Ok(project.worker_created(name, now_ms)))?
            .0)
    }

    /// The project and key of the task whose latest start created Worker task `task_id`,
    /// among unfinished projects (a finished project's tasks no longer change).
    pub fn find_by_worker_task(
        &self,
        task_id: &str,
    ) -> Result<Option<(Project, String)>, ProjectError> {
        for project in self.unfinished()? {
            if let Some(key) = project.key_of_worker_task(task_id) {
                let key = key.to_owned();
                return Ok(Some((project, key)));
            }
        }
        Ok(None)
    }

    /// Adds metered usage to one task of a project.
    pub fn add_usage(&self, id: &str, key: &str, usage: Usage) -> Result<(), ProjectError> {
        self.change(id, |project| project.add_usage(key, usage))?;
        Ok(())
    }
}

/// The number in a project id, for sorting in creation order (`p-10` after `p-9`).
fn project_number(id: &str) -> u64 {
    id.strip_prefix("p-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
