//! Carries a confirmed project forward: starts every ready task as a Worker task, finishes
//! starts a crash interrupted, and moves on when a Worker task completes. The one place that
//! joins the plan ([`super::Projects`]) to the task service ([`crate::tasks::Tasks`]) and
//! `plan.md`, so the Manager's tools, the internal wakes and the start-up resume all call the
//! same steps.
//!
//! Every step is safe to re-run: a start is claimed in the plan before its Worker task is made,
//! the Worker task is made once per start ([`crate::tasks::Tasks::create_once`] under
//! [`super::StartClaim::idempotency_key`]), and recording it is idempotent. So a crash at any
//! point, followed by [`ProjectDriver::resume_all`], starts each task exactly once.
//!
//! Not for: telling anyone (the caller announces [`Advance::started`] in the project room and
//! wakes the Workers), creating proposed Workers, or judging results.

use crate::storage::Storage;
use crate::tasks::{Task, Tasks};

use super::{Project, ProjectError, Projects, StartClaim, render};

/// One Worker task started for a project task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedTask {
    pub key: String,
    /// Which start of the project task this is (2 and up for revisions).
    pub start: u32,
    /// The Worker task, assigned to the task's owner, its spec naming its inputs by path.
    pub task: Task,
}

/// What one step did to a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// The project after the step.
    pub project: Project,
    /// Worker tasks started by this step (including starts a crash had interrupted).
    pub started: Vec<StartedTask>,
    /// Ready tasks that wait for a proposed Worker to be created.
    pub waiting_for_workers: Vec<String>,
}

impl Advance {
    /// Whether this step completed the project (the caller sends the summary).
    pub fn completed(&self) -> bool {
        self.project.phase == super::ProjectPhase::Completed
    }
}

/// Joins projects to Worker tasks and `plan.md`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProjectDriver {
    projects: Projects,
    tasks: Tasks,
    storage: Storage,
}

impl ProjectDriver {
    pub fn new(projects: Projects, tasks: Tasks, storage: Storage) -> Self {
        Self {
            projects,
            tasks,
            storage,
        }
    }

    pub fn projects(&self) -> &Projects {
        &self.projects
    }

    /// Finishes interrupted starts, then starts every ready task, then rewrites `plan.md`.
    /// Does nothing but the rewrite for a project that is not running.
    #[tracing::instrument(skip(self))]
    pub async fn advance(&self, project_id: &str, now_ms: u64) -> Result<Advance, ProjectError> {
        let mut started = Vec::new();
        let mut waiting_for_workers = Vec::new();
        let project = self.projects.get(project_id)?;
        for claim in project.unfinished_starts() {
            started.push(self.dispatch(&claim, now_ms).await?);
        }
        for key in self.projects.get(&project.id)?.ready_tasks() {
            match self.projects.claim_start(&project.id, &key, now_ms) {
                Ok(claim) => started.push(self.dispatch(&claim, now_ms).await?),
                Err(ProjectError::WorkerNotCreated { .. }) => waiting_for_workers.push(key),
                // Another caller claimed it between our read and our claim: it starts there.
                Err(ProjectError::AlreadyStarted { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        let project = self.projects.get(&project.id)?;
        render::write_plan(&self.storage, &project).await?;
        Ok(Advance {
            project,
            started,
            waiting_for_workers,
        })
    }

    /// Makes the Worker task of a claimed start (once) and records it in the plan.
    async fn dispatch(&self, claim: &StartClaim, now_ms: u64) -> Result<StartedTask, ProjectError> {
        let project = self.projects.get(&claim.project)?;
        let owner = project.task(&claim.key)?.owner.name().to_owned();
        let (title, spec) = render::start_spec(&project, claim)?;
        let task = self
            .tasks
            .create_once(
                &claim.idempotency_key(),
                &title,
                &owner,
                project.requester.clone(),
                project.room.clone(),
                &spec,
                now_ms,
            )
            .await?;
        self.projects
            .record_dispatch(&claim.project, &claim.key, claim.start, &task.id, now_ms)?;
        Ok(StartedTask {
            key: claim.key.clone(),
            start: claim.start,
            task,
        })
    }

    /// After a restart: advances every running project, so interrupted starts are finished and
    /// nothing ready is forgotten.
    pub async fn resume_all(&self, now_ms: u64) -> Result<Vec<Advance>, ProjectError> {
        let mut out = Vec::new();
        for project in self.projects.unfinished()? {
            if project.phase == super::ProjectPhase::Running {
                out.push(self.advance(&project.id, now_ms).await?);
            }
        }
        Ok(out)
    }

    /// A Worker task finished: if it belongs to a project, the project task is done (with the
    /// Worker task's result path) and what it unlocks starts. `None` for a task outside any
    /// project. Safe to call again for the same task.
    #[tracing::instrument(skip(self))]
    pub async fn worker_task_done(
        &self,
        task_id: &str,
        now_ms: u64,
    ) -> Result<Option<Advance>, ProjectError> {
        let Some((project, key)) = self.projects.find_by_worker_task(task_id)? else {
            return Ok(None);
        };
        let task = self.tasks.get(task_id)?;
        let result_path = task
            .result_path
            .unwrap_or_else(|| format!("tasks/{}/result.md", task.id));
        // Only a task its Worker is on can complete; a repeat (already done) or a stale report
        // (sent back for revision meanwhile) just advances.
        if matches!(
            project.task(&key)?.state,
            super::PlanTaskState::InProgress | super::PlanTaskState::Blocked
        ) {
            self.projects
                .complete_task(&project.id, &key, &result_path, now_ms)?;
        }
        Ok(Some(self.advance(&project.id, now_ms).await?))
    }
}

impl ProjectDriver {
    /// The result of a project task was judged not good enough: it goes back to its Worker as a
    /// new start (a new Worker task whose spec carries the reason); its dependents wait.
    #[tracing::instrument(skip(self, reason))]
    pub async fn request_revision(
        &self,
        project_id: &str,
        key: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(super::RevisionOutcome, Advance), ProjectError> {
        let (project, outcome) = self
            .projects
            .request_revision(project_id, key, reason, now_ms)?;
        Ok((outcome, self.advance(&project.id, now_ms).await?))
    }

    /// A Worker task of a project blocked on a question. Returns the project and key, and
    /// whether the question still has to be put to the person (true once per blocking, so a
    /// re-run asks nothing twice); `None` for a task outside any project.
    pub fn worker_task_blocked(
        &self,
        task_id: &str,
        question: &str,
        now_ms: u64,
    ) -> Result<Option<(Project, String, bool)>, ProjectError> {
        let Some((project, key)) = self.projects.find_by_worker_task(task_id)? else {
            return Ok(None);
        };
        if project.task(&key)?.state == super::PlanTaskState::InProgress {
            self.projects
                .block_task(&project.id, &key, question, now_ms)?;
        }
        let ask = self.projects.mark_question_asked(&project.id, &key)?;
        Ok(Some((self.projects.get(&project.id)?, key, ask)))
    }

    /// The person answered a blocked project task: it is in progress again (same start).
    pub fn worker_task_resumed(
        &self,
        task_id: &str,
        now_ms: u64,
    ) -> Result<Option<Project>, ProjectError> {
        let Some((project, key)) = self.projects.find_by_worker_task(task_id)? else {
            return Ok(None);
        };
        if project.task(&key)?.state != super::PlanTaskState::Blocked {
            return Ok(Some(project));
        }
        Ok(Some(self.projects.unblock_task(
            &project.id,
            &key,
            now_ms,
        )?))
    }

    /// Charges metered usage of a Worker task to its project task, if it has one.
    pub fn add_worker_task_usage(
        &self,
        task_id: &str,
        usage: super::Usage,
    ) -> Result<bool, ProjectError> {
        let Some((project, key)) = self.projects.find_by_worker_task(task_id)? else {
            return Ok(false);
        };
        self.projects.add_usage(&project.id, &key, usage)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use ruma::{owned_room_id, owned_user_id};

    use super::*;
    use crate::projects::{Owner, PlanTaskState, ProjectDraft, ProjectPhase, TaskDraft};
    use crate::storage::{Backend, LocalBackend};
    use crate::store::Store;
    use crate::tasks::{TaskConfig, TaskFilter};

    const NOW: u64 = 1_790_000_000_000;

    struct Fixture {
        /// Keeps the data directory alive; `None` when the test owns it (the restart case).
        _dir: Option<tempfile::TempDir>,
        store: Store,
        storage: Storage,
        driver: ProjectDriver,
    }

    async fn fixture_in(dir: tempfile::TempDir) -> Fixture {
        let mut fixture = fixture_at(dir.path()).await;
        fixture._dir = Some(dir);
        fixture
    }

    /// Opens the database and files under `path`, as `crew serve` does at start.
    async fn fixture_at(path: &std::path::Path) -> Fixture {
        let store = Store::open(&path.join("db")).unwrap();
        let backend = LocalBackend::open(&path.join("files")).await.unwrap();
        let storage = Storage::new(Backend::Local(backend), 1 << 20);
        let tasks = Tasks::open(&store, storage.clone(), &TaskConfig::default()).unwrap();
        let driver = ProjectDriver::new(Projects::open(&store).unwrap(), tasks, storage.clone());
        Fixture {
            _dir: None,
            store,
            storage,
            driver,
        }
    }

    fn draft(key: &str, owner: Owner, depends_on: &[&str]) -> TaskDraft {
        TaskDraft {
            key: key.to_owned(),
            title: format!("Part {key}"),
            owner,
            depends_on: depends_on.iter().map(|dep| (*dep).to_owned()).collect(),
            acceptance: String::new(),
        }
    }

    fn worker(name: &str) -> Owner {
        Owner::Worker {
            name: name.to_owned(),
        }
    }

    /// The diamond, confirmed, with its project room set.
    fn confirmed_diamond(fixture: &Fixture) -> String {
        let projects = fixture.driver.projects();
        let project = projects
            .propose(
                ProjectDraft {
                    title: "MVP".to_owned(),
                    tasks: vec![
                        draft("A", worker("ada"), &[]),
                        draft("B", worker("bob"), &["A"]),
                        draft("C", worker("cy"), &["A"]),
                        draft("D", worker("ada"), &["B", "C"]),
                    ],
                },
                owned_user_id!("@alice:example.org"),
                None,
                NOW,
            )
            .unwrap();
        projects
            .set_room(&project.id, owned_room_id!("!proj:example.org"), NOW)
            .unwrap();
        projects.confirm(&project.id, NOW).unwrap();
        project.id
    }

    fn started_keys(advance: &Advance) -> Vec<&str> {
        advance.started.iter().map(|s| s.key.as_str()).collect()
    }

    async fn finish(fixture: &Fixture, advance: &Advance, key: &str) -> Advance {
        let task_id = &advance
            .started
            .iter()
            .find(|started| started.key == key)
            .unwrap()
            .task
            .id;
        fixture
            .driver
            .tasks
            .complete(task_id, &format!("result of {key}"), NOW)
            .await
            .unwrap();
        fixture
            .driver
            .worker_task_done(task_id, NOW)
            .await
            .unwrap()
            .expect("a project task")
    }

    #[tokio::test]
    async fn the_diamond_runs_through_worker_tasks_in_waves() {
        let fixture = fixture_in(tempfile::tempdir().unwrap()).await;
        let id = confirmed_diamond(&fixture);
        let first = fixture.driver.advance(&id, NOW).await.unwrap();
        assert_eq!(started_keys(&first), ["A"]);
        let a = &first.started[0].task;
        assert_eq!(a.assignee, "ada");
        assert_eq!(a.room, Some(owned_room_id!("!proj:example.org")));
        assert!(
            fixture
                .driver
                .advance(&id, NOW)
                .await
                .unwrap()
                .started
                .is_empty(),
            "advancing again starts nothing twice"
        );

        let second = finish(&fixture, &first, "A").await;
        assert_eq!(started_keys(&second), ["B", "C"]);
        let b_spec = fixture
            .storage
            .get_bytes(
                &crate::storage::access::task_file(
                    &second.started[0].task.id,
                    crate::storage::access::TaskFile::Spec,
                )
                .unwrap(),
                1 << 20,
            )
            .await
            .unwrap();
        let b_spec = String::from_utf8(b_spec.to_vec()).unwrap();
        assert!(
            b_spec.contains(&format!("`tasks/{}/result.md`", a.id)),
            "B is handed A's result by path: {b_spec}"
        );

        let after_b = finish(&fixture, &second, "B").await;
        assert!(after_b.started.is_empty(), "D waits for C");
        let third = finish(&fixture, &second, "C").await;
        assert_eq!(started_keys(&third), ["D"]);
        let done = finish(&fixture, &third, "D").await;
        assert!(done.completed());
        let plan = fixture
            .storage
            .get_bytes(&crate::projects::plan_path(&id).unwrap(), 1 << 20)
            .await
            .unwrap();
        assert!(
            String::from_utf8(plan.to_vec())
                .unwrap()
                .contains("- Status: completed")
        );
        assert_eq!(
            fixture
                .driver
                .tasks
                .list(&TaskFilter::default())
                .unwrap()
                .len(),
            4,
            "one Worker task per project task"
        );
        let outside = fixture
            .driver
            .tasks
            .create(
                "Solo",
                "ada",
                owned_user_id!("@alice:example.org"),
                None,
                "x",
                NOW,
            )
            .await
            .unwrap();
        assert!(
            fixture
                .driver
                .worker_task_done(&outside.id, NOW)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_crash_mid_wave_resumes_starting_each_task_once() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = fixture_at(dir.path()).await;
        let id = confirmed_diamond(&fixture);
        let first = fixture.driver.advance(&id, NOW).await.unwrap();
        let a_id = first.started[0].task.id.clone();
        fixture
            .driver
            .tasks
            .complete(&a_id, "result of A", NOW)
            .await
            .unwrap();
        // The "task done" step crashes after completing A in the plan and claiming B and C;
        // B's Worker task was even created, but neither start was recorded.
        let projects = fixture.driver.projects();
        projects
            .complete_task(&id, "A", &format!("tasks/{a_id}/result.md"), NOW)
            .unwrap();
        let claim_b = projects.claim_start(&id, "B", NOW).unwrap();
        projects.claim_start(&id, "C", NOW).unwrap();
        let project = projects.get(&id).unwrap();
        let (title, spec) = render::start_spec(&project, &claim_b).unwrap();
        let b_task = fixture
            .driver
            .tasks
            .create_once(
                &claim_b.idempotency_key(),
                &title,
                "bob",
                project.requester.clone(),
                project.room.clone(),
                &spec,
                NOW,
            )
            .await
            .unwrap();
        fixture.store.db().flush().unwrap();
        let Fixture { store, driver, .. } = fixture;
        drop((store, driver));

        let restarted = fixture_at(dir.path()).await;
        let resumed = restarted.driver.resume_all(NOW).await.unwrap();
        assert_eq!(resumed.len(), 1);
        assert_eq!(started_keys(&resumed[0]), ["B", "C"]);
        assert_eq!(
            resumed[0].started[0].task.id, b_task.id,
            "B's Worker task is not made twice"
        );
        assert_eq!(
            restarted
                .driver
                .tasks
                .list(&TaskFilter::default())
                .unwrap()
                .len(),
            3,
            "A, B and C: one Worker task each"
        );
        let again = restarted.driver.resume_all(NOW).await.unwrap();
        assert!(
            again[0].started.is_empty(),
            "a second resume starts nothing"
        );
        let project = restarted.driver.projects().get(&id).unwrap();
        for key in ["B", "C"] {
            let task = project.task(key).unwrap();
            assert_eq!((task.state, task.starts), (PlanTaskState::InProgress, 1));
        }
    }

    #[tokio::test]
    async fn tasks_of_a_proposed_worker_wait_until_it_is_created() {
        let fixture = fixture_in(tempfile::tempdir().unwrap()).await;
        let projects = fixture.driver.projects();
        let project = projects
            .propose(
                ProjectDraft {
                    title: "Site".to_owned(),
                    tasks: vec![
                        draft("api", worker("ada"), &[]),
                        draft(
                            "ui",
                            Owner::Proposed {
                                name: "uma".to_owned(),
                                role: "frontend".to_owned(),
                            },
                            &[],
                        ),
                    ],
                },
                owned_user_id!("@alice:example.org"),
                None,
                NOW,
            )
            .unwrap();
        assert_eq!(
            project.proposed_workers(),
            [("uma".to_owned(), "frontend".to_owned())]
        );
        projects.confirm(&project.id, NOW).unwrap();
        let first = fixture.driver.advance(&project.id, NOW).await.unwrap();
        assert_eq!(started_keys(&first), ["api"]);
        assert_eq!(first.waiting_for_workers, ["ui"]);
        let project = projects.worker_created(&project.id, "@Uma", NOW).unwrap();
        assert!(project.proposed_workers().is_empty());
        let second = fixture.driver.advance(&project.id, NOW).await.unwrap();
        assert_eq!(started_keys(&second), ["ui"]);
        assert_eq!(second.started[0].task.assignee, "uma");
        assert_eq!(second.project.phase, ProjectPhase::Running);
    }

    #[tokio::test]
    async fn revision_blocking_and_usage_go_through_worker_tasks() {
        let fixture = fixture_in(tempfile::tempdir().unwrap()).await;
        let id = confirmed_diamond(&fixture);
        let first = fixture.driver.advance(&id, NOW).await.unwrap();
        let a_task = first.started[0].task.id.clone();

        let (project, key, ask) = fixture
            .driver
            .worker_task_blocked(&a_task, "Which database?", NOW)
            .unwrap()
            .unwrap();
        assert_eq!((key.as_str(), ask), ("A", true));
        assert_eq!(project.task("A").unwrap().state, PlanTaskState::Blocked);
        let (_, _, ask_again) = fixture
            .driver
            .worker_task_blocked(&a_task, "Which database?", NOW)
            .unwrap()
            .unwrap();
        assert!(!ask_again, "the question is asked once");
        let project = fixture
            .driver
            .worker_task_resumed(&a_task, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(project.task("A").unwrap().state, PlanTaskState::InProgress);

        assert!(
            fixture
                .driver
                .add_worker_task_usage(
                    &a_task,
                    crate::projects::Usage {
                        prompt_tokens: 30,
                        completion_tokens: 12,
                        requests: 2,
                    },
                )
                .unwrap()
        );

        let second = finish(&fixture, &first, "A").await;
        assert_eq!(started_keys(&second), ["B", "C"]);
        let (outcome, advance) = fixture
            .driver
            .request_revision(&id, "A", "use Postgres", NOW)
            .await
            .unwrap();
        assert_eq!(outcome.started_dependents, ["B", "C"]);
        assert_eq!(started_keys(&advance), ["A"]);
        let redo = &advance.started[0];
        assert_eq!(redo.start, 2);
        assert_ne!(redo.task.id, a_task, "a revision is a new Worker task");
        assert_eq!(redo.task.title, "Part A (revision 1)");
        // A stale "done" for the first Worker task changes nothing.
        let stale = fixture.driver.worker_task_done(&a_task, NOW).await.unwrap();
        assert!(
            stale.is_none(),
            "the old Worker task no longer stands for A"
        );
        let project = fixture.driver.projects().get(&id).unwrap();
        assert_eq!(project.task("A").unwrap().state, PlanTaskState::InProgress);
        assert_eq!(project.cost().total.total_tokens(), 42);
    }
}
