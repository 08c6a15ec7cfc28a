use proptest::prelude::*;
use ruma::{OwnedUserId, owned_room_id, owned_user_id};

use super::*;

const NOW: u64 = 1_000;

fn requester() -> OwnedUserId {
    owned_user_id!("@alice:example.org")
}

fn draft(key: &str, owner: &str, depends_on: &[&str]) -> TaskDraft {
    TaskDraft {
        key: key.to_owned(),
        title: format!("Part {key}"),
        owner: Owner::Worker {
            name: owner.to_owned(),
        },
        depends_on: depends_on.iter().map(|dep| (*dep).to_owned()).collect(),
        acceptance: format!("{key} works"),
    }
}

/// A → B, A → C, B + C → D, over three Workers.
fn diamond() -> Vec<TaskDraft> {
    vec![
        draft("A", "ada", &[]),
        draft("B", "bob", &["A"]),
        draft("C", "cy", &["A"]),
        draft("D", "ada", &["B", "C"]),
    ]
}

fn proposed(tasks: Vec<TaskDraft>) -> Result<Project, ProjectError> {
    Project::propose("p-1".to_owned(), "MVP", requester(), None, tasks, NOW)
}

fn running(tasks: Vec<TaskDraft>) -> Project {
    let mut project = proposed(tasks).unwrap();
    project.confirm(NOW).unwrap();
    project
}

/// Claims, records and completes one task, as the Manager's tools will.
fn run_task(project: &mut Project, key: &str) -> Vec<String> {
    let claim = project.claim_start(key, NOW).unwrap();
    project
        .record_dispatch(key, claim.start, &format!("t-{key}{}", claim.start), NOW)
        .unwrap();
    project
        .complete_task(key, &format!("tasks/t-{key}/result.md"), NOW)
        .unwrap()
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|key| (*key).to_owned()).collect()
}

#[test]
fn nothing_starts_before_confirmation() {
    let mut project = proposed(diamond()).unwrap();
    assert_eq!(project.phase, ProjectPhase::Proposed);
    assert!(project.ready_tasks().is_empty());
    assert!(matches!(
        project.claim_start("A", NOW),
        Err(ProjectError::WrongPhase { .. })
    ));
    project.confirm(NOW).unwrap();
    assert_eq!(project.ready_tasks(), keys(&["A"]));
}

#[test]
fn diamond_runs_in_waves() {
    let mut project = running(diamond());
    assert_eq!(
        project.waves(),
        vec![keys(&["A"]), keys(&["B", "C"]), keys(&["D"])]
    );
    assert_eq!(project.ready_tasks(), keys(&["A"]));
    assert!(matches!(
        project.claim_start("B", NOW),
        Err(ProjectError::DependenciesNotDone { ref waiting, .. }) if waiting == "A"
    ));

    let unlocked = run_task(&mut project, "A");
    assert_eq!(
        unlocked,
        keys(&["B", "C"]),
        "B and C start together after A"
    );

    let claim_b = project.claim_start("B", NOW).unwrap();
    assert_eq!(claim_b.inputs.len(), 1);
    assert_eq!(
        claim_b.inputs[0].result_path.as_deref(),
        Some("tasks/t-A/result.md"),
        "B is handed A's result by path"
    );
    assert_eq!(project.ready_tasks(), keys(&["C"]));
    let unlocked = project
        .complete_task("B", "tasks/t-B/result.md", NOW)
        .unwrap();
    assert_eq!(unlocked, keys(&["C"]), "D still waits for C");

    let unlocked = run_task(&mut project, "C");
    assert_eq!(unlocked, keys(&["D"]));
    let claim_d = project.claim_start("D", NOW).unwrap();
    let inputs: Vec<_> = claim_d
        .inputs
        .iter()
        .map(|input| input.result_path.clone().unwrap())
        .collect();
    assert_eq!(inputs, ["tasks/t-B/result.md", "tasks/t-C/result.md"]);
    assert_eq!(project.phase, ProjectPhase::Running);
    project
        .complete_task("D", "tasks/t-D/result.md", NOW)
        .unwrap();
    assert_eq!(project.phase, ProjectPhase::Completed);
    assert!(project.ready_tasks().is_empty());
}

#[test]
fn revision_of_d_reopens_d_only() {
    let mut project = running(diamond());
    for key in ["A", "B", "C", "D"] {
        run_task(&mut project, key);
    }
    assert_eq!(project.phase, ProjectPhase::Completed);

    assert!(matches!(
        project.request_revision("Z", "why", NOW),
        Err(ProjectError::UnknownTask { .. })
    ));
    assert!(matches!(
        project.request_revision("D", " ", NOW),
        Err(ProjectError::EmptyText { .. })
    ));
    assert_eq!(
        project.phase,
        ProjectPhase::Completed,
        "a refused revision changes nothing"
    );
    let outcome = project
        .request_revision("d", "the summary misses the API", NOW)
        .unwrap();
    assert!(outcome.started_dependents.is_empty());
    assert_eq!(project.phase, ProjectPhase::Running);
    let d = project.task("D").unwrap();
    assert_eq!(d.state, PlanTaskState::RevisionNeeded);
    for key in ["A", "B", "C"] {
        assert_eq!(project.task(key).unwrap().state, PlanTaskState::Done);
    }
    assert_eq!(project.ready_tasks(), keys(&["D"]));

    let claim = project.claim_start("D", NOW).unwrap();
    assert_eq!(claim.start, 2, "the revision is D's second start");
    assert_eq!(
        claim.revision_reason.as_deref(),
        Some("the summary misses the API")
    );
    assert_ne!(
        claim.idempotency_key(),
        "p-1:d:1",
        "a revision is a new start"
    );
    project.record_dispatch("D", 2, "t-D2", NOW).unwrap();
    project
        .complete_task("D", "tasks/t-D2/result.md", NOW)
        .unwrap();
    assert_eq!(project.phase, ProjectPhase::Completed);
    assert!(project.task("D").unwrap().revision_reason.is_none());
}

#[test]
fn revision_upstream_holds_pending_dependents_and_names_started_ones() {
    let mut project = running(diamond());
    run_task(&mut project, "A");
    project.claim_start("B", NOW).unwrap();
    let outcome = project.request_revision("A", "wrong schema", NOW).unwrap();
    assert_eq!(outcome.started_dependents, keys(&["B"]));
    assert_eq!(
        project.ready_tasks(),
        keys(&["A"]),
        "C waits again because A is no longer done"
    );
    assert!(matches!(
        project.request_revision("B", "x", NOW),
        Err(ProjectError::TaskNotEditable { .. })
    ));
}

#[test]
fn cycles_are_refused_with_the_cycle_named() {
    let error = proposed(vec![draft("A", "ada", &["B"]), draft("B", "bob", &["A"])]).unwrap_err();
    assert!(
        matches!(error, ProjectError::Cycle { ref cycle } if cycle == "A → B → A"),
        "{error}"
    );
    assert!(error.to_string().contains("A → B → A"), "{error}");

    let error = proposed(vec![
        draft("start", "ada", &[]),
        draft("x", "ada", &["start", "z"]),
        draft("y", "ada", &["x"]),
        draft("z", "ada", &["y"]),
    ])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the plan has a dependency cycle: x → z → y → x; remove one of these dependencies"
    );

    let error = proposed(vec![draft("solo", "ada", &["solo"])]).unwrap_err();
    assert!(matches!(error, ProjectError::Cycle { ref cycle } if cycle == "solo → solo"));
}

#[test]
fn malformed_plans_are_refused_with_what_to_fix() {
    let error = proposed(vec![draft("A", "ada", &["Q"])]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "task `A` depends on `Q`, which is not a task of this plan"
    );
    assert!(matches!(proposed(vec![]), Err(ProjectError::EmptyPlan)));
    assert!(matches!(
        proposed(vec![draft("A", "ada", &[]), draft("a", "bob", &[])]),
        Err(ProjectError::DuplicateKey { .. })
    ));
    assert!(matches!(
        proposed(vec![draft("A", "Not A Name!", &[])]),
        Err(ProjectError::InvalidOwner { .. })
    ));
    assert!(matches!(
        proposed(vec![draft("a b", "ada", &[])]),
        Err(ProjectError::InvalidKey { .. })
    ));
    let mut untitled = draft("A", "ada", &[]);
    untitled.title = "  ".to_owned();
    assert!(matches!(
        proposed(vec![untitled]),
        Err(ProjectError::InvalidTaskTitle { .. })
    ));
    let too_many = (0..=MAX_PLAN_TASKS)
        .map(|n| draft(&format!("t{n}"), "ada", &[]))
        .collect();
    assert!(matches!(
        proposed(too_many),
        Err(ProjectError::TooManyTasks { .. })
    ));
}

#[test]
fn owners_are_normalised_and_proposed_workers_kept() {
    let mut task = draft("A", "@Ada", &[]);
    task.owner = Owner::Proposed {
        name: "@Dev".to_owned(),
        role: " backend developer ".to_owned(),
    };
    let project = proposed(vec![task, draft("B", " Bob ", &["a"])]).unwrap();
    assert_eq!(
        project.task("A").unwrap().owner,
        Owner::Proposed {
            name: "dev".to_owned(),
            role: "backend developer".to_owned()
        }
    );
    assert_eq!(project.task("b").unwrap().owner.name(), "bob");
}

#[test]
fn edits_replan_and_refused_edits_change_nothing() {
    let mut project = running(diamond());
    let before = project.clone();

    let error = project
        .edit(
            PlanEdit::AddDependency {
                task: "A".to_owned(),
                on: "D".to_owned(),
            },
            NOW,
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the plan has a dependency cycle: A → D → B → A; remove one of these dependencies"
    );
    assert_eq!(project, before, "a refused edit leaves the plan as it was");

    // "give part B to dan"
    project
        .edit(
            PlanEdit::Reassign {
                task: "b".to_owned(),
                owner: Owner::Worker {
                    name: "Dan".to_owned(),
                },
            },
            NOW + 1,
        )
        .unwrap();
    assert_eq!(project.task("B").unwrap().owner.name(), "dan");
    assert_eq!(project.updated_ms, NOW + 1);

    // C no longer needs A: it is ready at once, next to A.
    let ready = project
        .edit(
            PlanEdit::RemoveDependency {
                task: "C".to_owned(),
                on: "a".to_owned(),
            },
            NOW,
        )
        .unwrap();
    assert_eq!(ready, keys(&["A", "C"]));
    assert_eq!(
        project.waves(),
        vec![keys(&["A", "C"]), keys(&["B"]), keys(&["D"])]
    );

    let ready = project
        .edit(
            PlanEdit::AddTask {
                task: draft("E", "eve", &["D"]),
            },
            NOW,
        )
        .unwrap();
    assert_eq!(ready, keys(&["A", "C"]));
    assert!(matches!(
        project.edit(PlanEdit::RemoveTask { task: "D".to_owned() }, NOW),
        Err(ProjectError::StillNeeded { ref dependents, .. }) if dependents == "E"
    ));
    project
        .edit(
            PlanEdit::RemoveTask {
                task: "E".to_owned(),
            },
            NOW,
        )
        .unwrap();
    assert!(matches!(
        project.edit(
            PlanEdit::RemoveDependency {
                task: "D".to_owned(),
                on: "A".to_owned()
            },
            NOW
        ),
        Err(ProjectError::NotADependency { .. })
    ));
    assert!(matches!(
        project.edit(
            PlanEdit::AddDependency {
                task: "D".to_owned(),
                on: "nope".to_owned()
            },
            NOW
        ),
        Err(ProjectError::UnknownTask { ref known, .. }) if known == "A, B, C, D"
    ));

    // A started task cannot be given away or held back by a new dependency.
    project.claim_start("A", NOW).unwrap();
    assert!(matches!(
        project.edit(
            PlanEdit::Reassign {
                task: "A".to_owned(),
                owner: Owner::Worker {
                    name: "bob".to_owned()
                }
            },
            NOW
        ),
        Err(ProjectError::TaskNotEditable { .. })
    ));
    assert!(matches!(
        project.edit(
            PlanEdit::AddDependency {
                task: "A".to_owned(),
                on: "C".to_owned()
            },
            NOW
        ),
        Err(ProjectError::TaskNotEditable { .. })
    ));
}

#[test]
fn a_start_is_claimed_once_and_recorded_idempotently() {
    let mut project = running(diamond());
    let claim = project.claim_start("A", NOW).unwrap();
    assert_eq!(claim.start, 1);
    assert_eq!(claim.idempotency_key(), "p-1:a:1");
    assert!(matches!(
        project.claim_start("A", NOW),
        Err(ProjectError::AlreadyStarted { start: 1, .. })
    ));
    assert_eq!(project.unfinished_starts(), vec![claim.clone()]);

    project.record_dispatch("A", 1, "t-7", NOW).unwrap();
    project.record_dispatch("A", 1, "t-7", NOW).unwrap();
    assert!(matches!(
        project.record_dispatch("A", 1, "t-8", NOW),
        Err(ProjectError::AlreadyDispatched { ref task_id, .. }) if task_id == "t-7"
    ));
    assert!(matches!(
        project.record_dispatch("A", 2, "t-8", NOW),
        Err(ProjectError::StaleStart { latest: 1, .. })
    ));
    assert!(project.unfinished_starts().is_empty());
    assert_eq!(project.task("A").unwrap().task_id.as_deref(), Some("t-7"));
}

#[test]
fn a_blocked_task_asks_once_and_resumes() {
    let mut project = running(diamond());
    project.claim_start("A", NOW).unwrap();
    project.block_task("A", "Which database?", NOW).unwrap();
    assert_eq!(project.task("A").unwrap().state, PlanTaskState::Blocked);
    assert!(project.mark_question_asked("A").unwrap());
    assert!(!project.mark_question_asked("A").unwrap(), "asked once");
    assert!(project.ready_tasks().is_empty());
    assert!(matches!(
        project.edit(
            PlanEdit::Reassign {
                task: "A".to_owned(),
                owner: Owner::Worker {
                    name: "bob".to_owned()
                }
            },
            NOW
        ),
        Err(ProjectError::TaskNotEditable { .. })
    ));
    project.unblock_task("A", NOW).unwrap();
    let task = project.task("A").unwrap();
    assert_eq!(task.state, PlanTaskState::InProgress);
    assert_eq!(task.starts, 1, "resuming is not a new start");
    assert!(task.blocked_question.is_none());
    assert!(matches!(
        project.unblock_task("A", NOW),
        Err(ProjectError::TaskNotEditable { .. })
    ));
}

#[test]
fn cost_adds_up_per_task_and_in_total() {
    let mut project = running(diamond());
    project
        .add_usage(
            "A",
            Usage {
                prompt_tokens: 100,
                completion_tokens: 20,
                requests: 2,
            },
        )
        .unwrap();
    project
        .add_usage(
            "A",
            Usage {
                prompt_tokens: 50,
                completion_tokens: 5,
                requests: 1,
            },
        )
        .unwrap();
    project
        .add_usage(
            "D",
            Usage {
                prompt_tokens: 10,
                completion_tokens: 1,
                requests: 1,
            },
        )
        .unwrap();
    let cost = project.cost();
    assert_eq!(cost.per_task[0].1.total_tokens(), 175);
    assert_eq!(
        cost.total,
        Usage {
            prompt_tokens: 160,
            completion_tokens: 26,
            requests: 4
        }
    );
    let text = cost_summary_text(&project);
    assert!(
        text.contains("- A: 175 tokens (150 in, 25 out) in 3 requests"),
        "{text}"
    );
    assert!(
        text.contains("- B: 0 tokens (0 in, 0 out) in 0 requests"),
        "{text}"
    );
    assert!(
        text.contains("- total: 186 tokens (160 in, 26 out) in 4 requests"),
        "{text}"
    );
}

#[test]
fn plan_markdown_shows_order_owners_and_state() {
    let mut project = running(diamond());
    let mut proposed_owner = draft("E", "eve", &["D"]);
    proposed_owner.owner = Owner::Proposed {
        name: "eve".to_owned(),
        role: "tester".to_owned(),
    };
    project
        .edit(
            PlanEdit::AddTask {
                task: proposed_owner,
            },
            NOW,
        )
        .unwrap();
    run_task(&mut project, "A");
    project.claim_start("B", NOW).unwrap();
    project.block_task("B", "REST\nor GraphQL?", NOW).unwrap();
    let text = plan_markdown(&project);
    assert!(text.starts_with("# p-1: MVP\n"), "{text}");
    assert!(text.contains("- Asked by: @alice:example.org"), "{text}");
    assert!(text.contains("- Status: running"), "{text}");
    assert!(text.contains("1. B, C\n2. D\n3. E\n"), "{text}");
    assert!(text.contains("### A: Part A\n"), "{text}");
    assert!(text.contains("- State: done (task t-A1)"), "{text}");
    assert!(text.contains("- Result: `tasks/t-A/result.md`"), "{text}");
    assert!(text.contains("- Depends on: B, C"), "{text}");
    assert!(text.contains("- Owner: eve (new: tester)"), "{text}");
    assert!(
        text.contains("- Waiting for an answer: REST or GraphQL?"),
        "{text}"
    );
    assert!(text.contains("Done when: D works"), "{text}");
    assert!(
        !text.contains("## Cost"),
        "no cost section before any usage"
    );
    assert_eq!(plan_path("p-1").unwrap().as_str(), "projects/p-1/plan.md");
    assert!(plan_path("../x").is_err());
}

#[test]
fn the_service_stores_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let room = owned_room_id!("!project:example.org");
    {
        let store = Store::open(dir.path()).unwrap();
        let projects = Projects::open(&store).unwrap();
        let refused = projects.propose(
            ProjectDraft {
                title: "Loop".to_owned(),
                tasks: vec![draft("A", "ada", &["A"])],
            },
            requester(),
            None,
            NOW,
        );
        assert!(matches!(refused, Err(ProjectError::Cycle { .. })));
        let project = projects
            .propose(
                ProjectDraft {
                    title: "MVP".to_owned(),
                    tasks: diamond(),
                },
                requester(),
                None,
                NOW,
            )
            .unwrap();
        assert_eq!(project.id, "p-1", "a refused draft takes no number");
        let (_, ready) = projects.confirm("1", NOW).unwrap();
        assert_eq!(ready, keys(&["A"]));
        projects.set_room("p-1", room.clone(), NOW).unwrap();
        let claim = projects.claim_start("p-1", "A", NOW).unwrap();
        projects
            .record_dispatch("p-1", "A", claim.start, "t-1", NOW)
            .unwrap();
        let (_, ready) = projects
            .complete_task("p-1", "A", "tasks/t-1/result.md", NOW)
            .unwrap();
        assert_eq!(ready, keys(&["B", "C"]));
        // Second wave: B is claimed and dispatched, C is claimed, then the process dies.
        let claim_b = projects.claim_start("p-1", "B", NOW).unwrap();
        projects
            .record_dispatch("p-1", "B", claim_b.start, "t-2", NOW)
            .unwrap();
        projects.claim_start("p-1", "C", NOW).unwrap();
        store.db().flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let projects = Projects::open(&store).unwrap();
    let project = projects.get("P-1").unwrap();
    assert_eq!(project.room, Some(room));
    assert_eq!(project.phase, ProjectPhase::Running);
    assert_eq!(project.task("A").unwrap().state, PlanTaskState::Done);
    assert_eq!(project.task("B").unwrap().task_id.as_deref(), Some("t-2"));

    let unfinished = projects.unfinished_starts().unwrap();
    assert_eq!(unfinished.len(), 1, "only C's start needs finishing");
    assert_eq!(unfinished[0].key, "C");
    assert_eq!(
        unfinished[0].start, 1,
        "finished with the same start number"
    );
    for key in ["B", "C"] {
        assert!(
            matches!(
                projects.claim_start("p-1", key, NOW),
                Err(ProjectError::AlreadyStarted { start: 1, .. })
            ),
            "{key} is not started twice"
        );
    }
    projects.record_dispatch("p-1", "C", 1, "t-3", NOW).unwrap();
    assert!(projects.unfinished_starts().unwrap().is_empty());

    projects
        .complete_task("p-1", "B", "tasks/t-2/result.md", NOW)
        .unwrap();
    let (_, ready) = projects
        .complete_task("p-1", "C", "tasks/t-3/result.md", NOW)
        .unwrap();
    assert_eq!(ready, keys(&["D"]));
    let claim = projects.claim_start("p-1", "D", NOW).unwrap();
    projects
        .record_dispatch("p-1", "D", claim.start, "t-4", NOW)
        .unwrap();
    projects
        .add_usage(
            "p-1",
            "D",
            Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                requests: 1,
            },
        )
        .unwrap();
    let (project, _) = projects
        .complete_task("p-1", "D", "tasks/t-4/result.md", NOW)
        .unwrap();
    assert_eq!(project.phase, ProjectPhase::Completed);
    assert_eq!(projects.get("p-1").unwrap(), project);
    assert!(projects.unfinished().unwrap().is_empty());
    assert_eq!(project.cost().total.requests, 1);
}

#[test]
fn service_errors_leave_the_record_unchanged() {
    let store = Store::temporary().unwrap();
    let projects = Projects::open(&store).unwrap();
    assert!(matches!(
        projects.get("p-9"),
        Err(ProjectError::NotFound { .. })
    ));
    assert!(matches!(
        projects.confirm("p-9", NOW),
        Err(ProjectError::NotFound { .. })
    ));
    let project = projects
        .propose(
            ProjectDraft {
                title: "MVP".to_owned(),
                tasks: diamond(),
            },
            requester(),
            None,
            NOW,
        )
        .unwrap();
    let error = projects
        .edit(
            &project.id,
            PlanEdit::AddDependency {
                task: "A".to_owned(),
                on: "D".to_owned(),
            },
            NOW + 5,
        )
        .unwrap_err();
    assert!(error.to_string().contains("A → D → B → A"), "{error}");
    assert_eq!(projects.get(&project.id).unwrap(), project);
    projects.reject(&project.id, NOW).unwrap();
    assert!(matches!(
        projects.confirm(&project.id, NOW),
        Err(ProjectError::WrongPhase { .. })
    ));
    let second = projects
        .propose(
            ProjectDraft {
                title: "Second".to_owned(),
                tasks: diamond(),
            },
            requester(),
            None,
            NOW,
        )
        .unwrap();
    assert_eq!(second.id, "p-2");
    let listed: Vec<String> = projects.list().unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(listed, ["p-1", "p-2"]);
}

#[tokio::test]
async fn plan_md_is_written_to_storage() {
    let dir = tempfile::tempdir().unwrap();
    let backend = crate::storage::LocalBackend::open(dir.path())
        .await
        .unwrap();
    let storage = crate::storage::Storage::new(crate::storage::Backend::Local(backend), 1 << 20);
    let project = running(diamond());
    let path = write_plan(&storage, &project).await.unwrap();
    assert_eq!(path.as_str(), "projects/p-1/plan.md");
    let stored = storage.get_bytes(&path, 1 << 20).await.unwrap();
    assert_eq!(
        String::from_utf8(stored.to_vec()).unwrap(),
        plan_markdown(&project)
    );
}

#[test]
fn start_spec_hands_inputs_by_path_and_names_the_revision() {
    let mut project = running(diamond());
    run_task(&mut project, "A");
    let claim = project.claim_start("B", NOW).unwrap();
    let (title, body) = start_spec(&project, &claim).unwrap();
    assert_eq!(title, "Part B");
    assert!(
        body.contains("Part `B` of project p-1 \"MVP\" (plan: `projects/p-1/plan.md`)"),
        "{body}"
    );
    assert!(body.contains("Done when: B works"), "{body}");
    assert!(
        body.contains("- A (Part A): `tasks/t-A/result.md`"),
        "{body}"
    );
    assert!(!body.contains("revision"), "{body}");

    project
        .complete_task("B", "tasks/t-B/result.md", NOW)
        .unwrap();
    project
        .request_revision("B", "no tests\nat all", NOW)
        .unwrap();
    let claim = project.claim_start("B", NOW).unwrap();
    let (title, body) = start_spec(&project, &claim).unwrap();
    assert_eq!(title, "Part B (revision 1)");
    assert!(
        body.contains("This is revision 1 of this part. The last result was sent back because: no tests at all"),
        "{body}"
    );
}

#[test]
fn status_texts_show_progress_and_what_waits() {
    assert_eq!(project_list_text(&[]), "No projects yet.");
    let mut project = running(diamond());
    run_task(&mut project, "A");
    project.claim_start("B", NOW).unwrap();
    assert_eq!(
        project_list_text(std::slice::from_ref(&project)),
        "- p-1 (running): MVP — 1/4 tasks done\n"
    );
    let text = project_status_text(&project);
    assert_eq!(
        text,
        "p-1 (running): MVP\n\
         - A [done] ada: Part A (t-A1)\n\
         - B [in progress] bob: Part B\n\
         - C [pending] cy: Part C\n\
         - D [pending] ada: Part D — waits for B, C\n"
    );
}

/// A random plan: task `i` may depend only on earlier tasks when `acyclic`, on any when not.
fn arbitrary_plan(acyclic: bool) -> impl Strategy<Value = Vec<TaskDraft>> {
    (1usize..12).prop_flat_map(move |count| {
        proptest::collection::vec(proptest::collection::vec(0usize..count, 0..4), count).prop_map(
            move |edges| {
                edges
                    .into_iter()
                    .enumerate()
                    .map(|(index, targets)| {
                        let mut deps: Vec<String> = targets
                            .into_iter()
                            .filter(|&target| !acyclic || target < index)
                            .map(|target| format!("t{target}"))
                            .collect();
                        deps.sort();
                        deps.dedup();
                        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
                        draft(&format!("t{index}"), "ada", &deps)
                    })
                    .collect()
            },
        )
    })
}

proptest! {
    /// Starting whatever is ready, in any order, never starts a task before its dependencies
    /// are done, and finishes every task of an acyclic plan.
    #[test]
    fn waves_never_start_a_task_before_its_dependencies(
        tasks in arbitrary_plan(true),
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 64),
    ) {
        let mut project = running(tasks);
        let expected_waves = project.waves();
        prop_assert_eq!(expected_waves.iter().map(Vec::len).sum::<usize>(), project.tasks.len());
        let mut in_progress: Vec<String> = Vec::new();
        let mut pick = picks.into_iter().cycle();
        while project.phase != ProjectPhase::Completed {
            for key in project.ready_tasks() {
                let deps = project.task(&key).unwrap().depends_on.clone();
                for dep in deps {
                    prop_assert_eq!(project.task(&dep).unwrap().state, PlanTaskState::Done);
                }
                project.claim_start(&key, NOW).unwrap();
                in_progress.push(key);
            }
            prop_assert!(!in_progress.is_empty(), "an acyclic plan never stalls");
            let index = pick.next().unwrap().index(in_progress.len());
            let key = in_progress.swap_remove(index);
            project.complete_task(&key, "tasks/x/result.md", NOW).unwrap();
        }
        for task in &project.tasks {
            prop_assert_eq!(task.starts, 1);
        }
    }

    /// Any plan is either accepted, and then its waves order every task after its
    /// dependencies, or refused with a cycle whose every step is a real dependency.
    #[test]
    fn validation_accepts_exactly_the_acyclic_plans(tasks in arbitrary_plan(false)) {
        match proposed(tasks.clone()) {
            Ok(project) => {
                let waves = project.waves();
                let wave_of = |key: &str| waves.iter().position(|wave| wave.iter().any(|k| k == key));
                for task in &project.tasks {
                    let own = wave_of(&task.key).expect("every task is in a wave");
                    for dep in &task.depends_on {
                        prop_assert!(wave_of(dep).expect("dependency in a wave") < own);
                    }
                }
            }
            Err(ProjectError::Cycle { cycle }) => {
                let steps: Vec<&str> = cycle.split(" → ").collect();
                prop_assert!(steps.len() >= 2);
                prop_assert_eq!(steps.first(), steps.last());
                for pair in steps.windows(2) {
                    let from = tasks.iter().find(|task| task.key == pair[0]).unwrap();
                    prop_assert!(from.depends_on.iter().any(|dep| dep == pair[1]));
                }
            }
            Err(other) => prop_assert!(false, "unexpected error {}", other),
        }
    }
}
