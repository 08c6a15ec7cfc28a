//! Tasks against a real sled database and real local file storage in a temp dir: the state
//! machine, the files each step writes, the heartbeat end to end through `Tasks::beat`/`apply`,
//! recurring tasks (runs started on schedule, once each), unique ids, and persistence across
//! reopening the database.

use std::path::Path;

use matrix_crew::storage::access::{self, AgentScope, Operation, Role, TaskFile, task_file};
use matrix_crew::storage::{Backend, LocalBackend, Storage};
use matrix_crew::store::Store;
use matrix_crew::tasks::{
    HeartbeatAction, Schedule, Task, TaskConfig, TaskError, TaskFilter, TaskState, Tasks,
};
use ruma::{OwnedUserId, owned_room_id, owned_user_id};

const MIN: u64 = 60_000;
/// Some instant in 2026, so notes carry a realistic date.
const T0: u64 = 1_790_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    tasks: Tasks,
    storage: Storage,
}

async fn storage_in(dir: &Path) -> Storage {
    let backend = LocalBackend::open(&dir.join("files"))
        .await
        .expect("open local backend");
    Storage::new(Backend::Local(backend), 1 << 20)
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db")).expect("open store");
    let storage = storage_in(dir.path()).await;
    let tasks = Tasks::open(&store, storage.clone(), &TaskConfig::default()).expect("open tasks");
    Fixture {
        _dir: dir,
        tasks,
        storage,
    }
}

fn human() -> OwnedUserId {
    owned_user_id!("@ann:example.org")
}

async fn new_task(tasks: &Tasks, title: &str, worker: &str, now: u64) -> Task {
    tasks
        .create(title, worker, human(), None, "Do the thing.", now)
        .await
        .expect("create task")
}

async fn read(storage: &Storage, id: &str, file: TaskFile) -> String {
    let bytes = storage
        .get_bytes(&task_file(id, file).expect("valid path"), 1 << 20)
        .await
        .expect("file exists");
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn create_writes_the_record_and_the_spec() {
    let f = fixture().await;
    let room = owned_room_id!("!worker-alice:example.org");
    let task = f
        .tasks
        .create(
            "  Build the login page ",
            "alice",
            human(),
            Some(room.clone()),
            "Use the design in shared/login.png.\n",
            T0,
        )
        .await
        .expect("create");
    assert_eq!(task.id, "t-1");
    assert_eq!(task.title, "Build the login page");
    assert_eq!(task.state, TaskState::Assigned);
    assert_eq!(task.room, Some(room));
    assert_eq!(task.quiet_minutes, 60, "the configured default");
    assert_eq!(f.tasks.get("t-1").expect("stored"), task);
    // Humans may type the id loosely.
    assert_eq!(f.tasks.get("T-1").expect("upper case").id, "t-1");
    assert_eq!(f.tasks.get("#1").expect("bare number").id, "t-1");
    let spec = read(&f.storage, "t-1", TaskFile::Spec).await;
    assert_eq!(
        spec,
        "# t-1: Build the login page\n\nUse the design in shared/login.png.\n"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason() {
    let f = fixture().await;
    let errors = [
        f.tasks
            .create("", "alice", human(), None, "x", T0)
            .await
            .expect_err("empty title"),
        f.tasks
            .create("two\nlines", "alice", human(), None, "x", T0)
            .await
            .expect_err("multi-line title"),
        f.tasks
            .create("ok", " ", human(), None, "x", T0)
            .await
            .expect_err("no assignee"),
        f.tasks
            .create("ok", "../evil", human(), None, "x", T0)
            .await
            .expect_err("assignee is not a name"),
    ];
    assert!(matches!(errors[0], TaskError::InvalidTitle));
    assert!(matches!(errors[1], TaskError::InvalidTitle));
    assert!(matches!(errors[2], TaskError::MissingAssignee));
    assert!(matches!(errors[3], TaskError::InvalidAssignee { .. }));
    assert!(
        f.tasks.all().expect("list").is_empty(),
        "nothing was stored"
    );
    let missing = f.tasks.get("t-99").expect_err("no such task");
    assert!(missing.to_string().contains("t-99"), "{missing}");
    assert!(matches!(
        f.tasks.block("t-99", "why?", T0),
        Err(TaskError::NotFound { .. })
    ));
    let task = new_task(&f.tasks, "x", "alice", T0).await;
    assert!(matches!(
        f.tasks.progress(&task.id, "  ", T0).await,
        Err(TaskError::EmptyText { .. })
    ));
    assert!(matches!(
        f.tasks.set_quiet_minutes(&task.id, 0, T0),
        Err(TaskError::ZeroQuietTime)
    ));
}

#[tokio::test]
async fn legal_transitions_move_the_state_and_write_the_files() {
    let f = fixture().await;
    let task = new_task(&f.tasks, "API", "Bob", T0).await;
    assert_eq!(
        task.assignee, "bob",
        "names are normalised like the registry does"
    );
    let id = task.id;

    let started = f.tasks.start(&id, T0 + MIN).expect("start");
    assert_eq!(started.state, TaskState::InProgress);
    assert_eq!(started.last_progress_ms, T0 + MIN);

    f.tasks
        .progress(&id, "schema drafted", T0 + 2 * MIN)
        .await
        .expect("progress");
    let noted = f
        .tasks
        .progress(&id, "endpoints\nwritten", T0 + 3 * MIN)
        .await
        .expect("progress");
    assert_eq!(noted.last_progress_ms, T0 + 3 * MIN);
    let progress = read(&f.storage, &id, TaskFile::Progress).await;
    let lines: Vec<&str> = progress.lines().collect();
    assert_eq!(lines.len(), 2, "{progress}");
    assert!(lines[0].starts_with("- 2026-"), "{progress}");
    assert!(lines[0].ends_with(": schema drafted"), "{progress}");
    assert!(lines[1].ends_with(": endpoints written"), "{progress}");

    let blocked = f
        .tasks
        .block(&id, "Which auth scheme?", T0 + 4 * MIN)
        .expect("block");
    assert_eq!(blocked.state, TaskState::Blocked);
    assert_eq!(
        blocked.blocked_question.as_deref(),
        Some("Which auth scheme?")
    );

    // Progress on a blocked task resumes it and clears the question.
    let resumed = f
        .tasks
        .progress(&id, "going with OAuth", T0 + 5 * MIN)
        .await
        .expect("resume");
    assert_eq!(resumed.state, TaskState::InProgress);
    assert_eq!(resumed.blocked_question, None);

    let done = f
        .tasks
        .complete(&id, "# Result\nAll endpoints live.\n", T0 + 6 * MIN)
        .await
        .expect("complete");
    assert_eq!(done.state, TaskState::Done);
    assert_eq!(done.result_path.as_deref(), Some("tasks/t-1/result.md"));
    assert_eq!(
        read(&f.storage, &id, TaskFile::Result).await,
        "# Result\nAll endpoints live.\n"
    );
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_change_nothing() {
    let f = fixture().await;
    let done = new_task(&f.tasks, "one", "alice", T0).await.id;
    f.tasks
        .complete(&done, "finished", T0 + MIN)
        .await
        .expect("assigned → done is allowed");
    let cancelled = new_task(&f.tasks, "two", "alice", T0).await.id;
    f.tasks.cancel(&cancelled, T0 + MIN).expect("cancel");
    let working = new_task(&f.tasks, "three", "alice", T0).await.id;
    f.tasks.start(&working, T0).expect("start");

    for id in [&done, &cancelled] {
        let before = f.tasks.get(id).expect("stored");
        let error = f.tasks.start(id, T0 + 2 * MIN).expect_err("finished");
        assert!(
            error
                .to_string()
                .contains("is finished and does not change"),
            "{error}"
        );
        assert!(matches!(
            f.tasks.cancel(id, T0 + 2 * MIN),
            Err(TaskError::IllegalTransition { .. })
        ));
        assert!(matches!(
            f.tasks.block(id, "?", T0 + 2 * MIN),
            Err(TaskError::IllegalTransition { .. })
        ));
        assert!(matches!(
            f.tasks.progress(id, "late note", T0 + 2 * MIN).await,
            Err(TaskError::IllegalTransition { .. })
        ));
        assert!(matches!(
            f.tasks.complete(id, "again", T0 + 2 * MIN).await,
            Err(TaskError::IllegalTransition { .. })
        ));
        assert_eq!(f.tasks.get(id).expect("stored"), before, "nothing changed");
    }
    // A refused late note or result writes no file either.
    let late = task_file(&cancelled, TaskFile::Progress).expect("path");
    assert!(f.storage.head(&late).await.is_err(), "no progress.md");
    let late = task_file(&cancelled, TaskFile::Result).expect("path");
    assert!(f.storage.head(&late).await.is_err(), "no result.md");

    // Starting twice names the allowed next states.
    let error = f
        .tasks
        .start(&working, T0)
        .expect_err("already in progress");
    let message = error.to_string();
    assert!(
        message.contains("task t-3 is in_progress and cannot become in_progress")
            && message.contains("from in_progress it may become blocked, done, cancelled"),
        "{message}"
    );
}

#[tokio::test]
async fn ids_are_unique_short_and_listed_in_creation_order() {
    let f = fixture().await;
    let mut created = Vec::new();
    for n in 0..12 {
        let worker = if n % 2 == 0 { "alice" } else { "bob" };
        created.push(
            new_task(&f.tasks, &format!("task {n}"), worker, T0 + n)
                .await
                .id,
        );
    }
    let expected: Vec<String> = (1..=12).map(|n| format!("t-{n}")).collect();
    assert_eq!(created, expected);
    let listed: Vec<String> = f
        .tasks
        .all()
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, expected, "t-10 sorts after t-9");

    f.tasks.cancel("t-2", T0).expect("cancel");
    let bobs_open = f
        .tasks
        .list(&TaskFilter {
            assignee: Some("Bob".into()),
            ..TaskFilter::open()
        })
        .expect("list");
    let ids: Vec<&str> = bobs_open.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t-4", "t-6", "t-8", "t-10", "t-12"]);

    // The access check uses every task of the Worker, finished ones included.
    let bob_ids = f.tasks.task_ids_of("bob").expect("ids");
    assert_eq!(f.tasks.task_ids_of("@BOB").expect("ids"), bob_ids);
    assert!(f.tasks.task_ids_of("carol").expect("ids").is_empty());
    assert_eq!(bob_ids.len(), 6);
    let scope = AgentScope {
        name: "bob",
        role: Role::Worker,
        task_ids: &bob_ids,
    };
    let own = task_file("t-2", TaskFile::Progress).expect("path");
    let other = task_file("t-1", TaskFile::Progress).expect("path");
    assert!(access::check(scope, &own, Operation::Write).is_ok());
    assert!(access::check(scope, &other, Operation::Read).is_err());
    let spec = task_file("t-2", TaskFile::Spec).expect("path");
    assert!(
        access::check(scope, &spec, Operation::Write).is_err(),
        "spec is read-only"
    );
}

#[tokio::test]
async fn concurrent_progress_notes_are_all_kept() {
    let f = fixture().await;
    let id = new_task(&f.tasks, "busy", "alice", T0).await.id;
    let notes = (0..16).map(|n| {
        let tasks = f.tasks.clone();
        let id = id.clone();
        tokio::spawn(async move { tasks.progress(&id, &format!("note {n}"), T0 + n).await })
    });
    for joined in futures::future::join_all(notes).await {
        joined.expect("join").expect("progress");
    }
    let progress = read(&f.storage, &id, TaskFile::Progress).await;
    for n in 0..16 {
        assert!(
            progress.contains(&format!(": note {n}\n")),
            "note {n} lost: {progress}"
        );
    }
}

#[tokio::test]
async fn heartbeat_through_the_service_nudges_once_then_tells_the_human_once() {
    let f = fixture().await;
    let quiet = new_task(&f.tasks, "quiet one", "alice", T0).await.id;
    let busy = new_task(&f.tasks, "busy one", "bob", T0).await.id;
    f.tasks
        .set_quiet_minutes(&busy, 30, T0)
        .expect("quiet time");

    // First beat: both tasks are new, so a report; no alarms yet.
    let beat = f.tasks.beat(T0 + 15 * MIN).expect("beat");
    assert!(
        matches!(beat.as_slice(), [HeartbeatAction::Report { changed, .. }] if changed.len() == 2)
    );
    for action in &beat {
        f.tasks.apply(action, T0 + 15 * MIN).await.expect("apply");
    }
    assert!(
        f.tasks.beat(T0 + 30 * MIN).expect("beat").is_empty(),
        "nothing changed"
    );

    // bob keeps reporting progress (a change, so a report), alice stays silent.
    let mut now = T0 + 30 * MIN;
    let mut nudges = Vec::new();
    let mut told = Vec::new();
    let mut reports = 0;
    while now <= T0 + 200 * MIN {
        f.tasks
            .progress(&busy, "still going", now - MIN)
            .await
            .expect("progress");
        for action in f.tasks.beat(now).expect("beat") {
            match &action {
                HeartbeatAction::Nudge { task, worker } => {
                    nudges.push((task.clone(), worker.clone(), now))
                }
                HeartbeatAction::TellHuman { task, requester } => {
                    told.push((task.clone(), requester.clone(), now))
                }
                HeartbeatAction::Report { changed, .. } => {
                    reports += 1;
                    assert!(changed.iter().all(|t| t.id == busy), "{changed:?}");
                }
                HeartbeatAction::StartRecurrence { .. } => panic!("no task recurs: {action:?}"),
            }
            f.tasks.apply(&action, now).await.expect("apply");
        }
        now += 15 * MIN;
    }
    assert_eq!(
        nudges,
        vec![(quiet.clone(), "alice".to_owned(), T0 + 75 * MIN)]
    );
    assert_eq!(told, vec![(quiet.clone(), human(), T0 + 150 * MIN)]);
    assert!(
        reports >= 10,
        "one report per beat with progress, got {reports}"
    );
    assert_eq!(f.tasks.get(&quiet).expect("stored").nudges, 1);

    // alice finally speaks: the alarm stops, and a new silence starts a new cycle.
    f.tasks
        .progress(&quiet, "sorry, back", now)
        .await
        .expect("progress");
    let later = now + 61 * MIN;
    let beat = f.tasks.beat(later).expect("beat");
    assert!(
        beat.iter()
            .any(|a| matches!(a, HeartbeatAction::Nudge { task, .. } if *task == quiet))
    );
    assert!(
        !beat
            .iter()
            .any(|a| matches!(a, HeartbeatAction::TellHuman { .. }))
    );
}

#[tokio::test]
async fn create_once_makes_one_task_per_key_even_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = {
        let store = Store::open(&dir.path().join("db")).expect("open store");
        let tasks = Tasks::open(&store, storage_in(dir.path()).await, &TaskConfig::default())
            .expect("open tasks");
        let first = tasks
            .create_once("p-1:a:1", "Part A", "ada", human(), None, "Spec A.", T0)
            .await
            .expect("create once");
        let again = tasks
            .create_once(
                "p-1:a:1",
                "Part A",
                "ada",
                human(),
                None,
                "Spec A.",
                T0 + MIN,
            )
            .await
            .expect("same key again");
        assert_eq!(again, first, "the same key gives the same task");
        store.db().flush().expect("flush");
        first
    };
    let store = Store::open(&dir.path().join("db")).expect("reopen store");
    let storage = storage_in(dir.path()).await;
    let tasks = Tasks::open(&store, storage.clone(), &TaskConfig::default()).expect("open tasks");
    let after_restart = tasks
        .create_once(
            "p-1:a:1",
            "Part A",
            "ada",
            human(),
            None,
            "Spec A.",
            T0 + 2 * MIN,
        )
        .await
        .expect("same key after restart");
    assert_eq!(after_restart, first);
    let revision = tasks
        .create_once(
            "p-1:a:2",
            "Part A (revision 1)",
            "ada",
            human(),
            None,
            "Spec A2.",
            T0,
        )
        .await
        .expect("a new key is a new task");
    assert_ne!(revision.id, first.id);
    assert_eq!(tasks.list(&TaskFilter::default()).expect("list").len(), 2);
    assert!(
        read(&storage, &revision.id, TaskFile::Spec)
            .await
            .contains("Spec A2.")
    );
    assert!(matches!(
        tasks
            .create_once("p-1:b:1", " ", "ada", human(), None, "x", T0)
            .await,
        Err(TaskError::InvalidTitle)
    ));
}

#[tokio::test]
async fn tasks_survive_reopening_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("db");
    let schedule = Schedule::parse("0 9 * * mon-fri", "Europe/Berlin").expect("valid");
    {
        let store = Store::open(&db).expect("open");
        let tasks = Tasks::open(&store, storage_in(dir.path()).await, &TaskConfig::default())
            .expect("tasks");
        new_task(&tasks, "first", "alice", T0).await;
        let second = new_task(&tasks, "daily digest", "bob", T0).await.id;
        tasks
            .set_schedule(&second, Some(schedule.clone()), T0)
            .expect("schedule");
        tasks
            .block(&second, "Which sources?", T0 + MIN)
            .expect("block");
        tasks.record_report(T0 + MIN).expect("report");
        store.flush().await.expect("flush");
    }
    let store = Store::open(&db).expect("reopen");
    let config = TaskConfig {
        default_quiet_minutes: 5,
        ..TaskConfig::default()
    };
    let tasks = Tasks::open(&store, storage_in(dir.path()).await, &config).expect("tasks");
    let second = tasks.get("t-2").expect("survived");
    assert_eq!(second.state, TaskState::Blocked);
    assert_eq!(second.blocked_question.as_deref(), Some("Which sources?"));
    assert_eq!(second.schedule, Some(schedule));
    assert_eq!(
        second.quiet_minutes, 60,
        "set at creation, not by the new config"
    );
    assert_eq!(tasks.reported_until_ms().expect("watermark"), T0 + MIN);
    let third = new_task(&tasks, "after restart", "alice", T0).await;
    assert_eq!(third.id, "t-3", "the counter continues, no gaps");
    assert_eq!(third.quiet_minutes, 5);
}

/// Tuesday 2026-09-22 09:00 in Berlin (CEST, UTC+2): the first weekday 09:00 after T0, which
/// is Monday 2026-09-21 16:13 there.
const TUE_0900_BERLIN: u64 = 1_790_060_400_000;
/// Friday 2026-09-25 09:00 in Berlin.
const FRI_0900_BERLIN: u64 = 1_790_319_600_000;
const DAY: u64 = 24 * 60 * MIN;

/// A weekday-morning report for bob in his room, made recurring at T0.
async fn weekday_template(tasks: &Tasks) -> Task {
    let template = tasks
        .create(
            "Morning digest",
            "bob",
            human(),
            Some(owned_room_id!("!worker-bob:example.org")),
            "Summarise yesterday's commits.\n",
            T0,
        )
        .await
        .expect("create");
    let schedule = Schedule::parse("0 9 * * mon-fri", "Europe/Berlin").expect("valid");
    tasks
        .set_schedule(&template.id, Some(schedule), T0)
        .expect("schedule")
}

/// The StartRecurrence actions of a beat.
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

/// Every instance of `template`.
fn runs_of(tasks: &Tasks, template: &str) -> Vec<Task> {
    tasks
        .all()
        .expect("list")
        .into_iter()
        .filter(|task| task.recurrence_of.as_deref() == Some(template))
        .collect()
}

#[tokio::test]
async fn next_run_of_a_template_is_computed_in_its_time_zone() {
    let f = fixture().await;
    let template = weekday_template(&f.tasks).await;
    assert_eq!(template.next_run_ms(), Some(TUE_0900_BERLIN));
    let schedule = template.schedule.clone().expect("set");
    assert_eq!(
        schedule.next_after(TUE_0900_BERLIN),
        Some(TUE_0900_BERLIN + DAY)
    );
    // Friday's run is followed by Monday's: two days skipped, and still 07:00 UTC in summer.
    assert_eq!(
        schedule.next_after(FRI_0900_BERLIN),
        Some(FRI_0900_BERLIN + 3 * DAY)
    );
    let note = template.recurrence_note().expect("a template");
    assert_eq!(
        note,
        "repeats `0 9 * * mon-fri` (Europe/Berlin), next run 2026-09-22 07:00 UTC"
    );
}

#[tokio::test]
async fn a_due_template_starts_an_instance_that_is_watched_like_any_task() {
    let f = fixture().await;
    let template = weekday_template(&f.tasks).await;
    // Report the template's creation so only the runs matter below.
    for action in f.tasks.beat(T0).expect("beat") {
        f.tasks.apply(&action, T0).await.expect("apply");
    }
    assert!(f.tasks.beat(TUE_0900_BERLIN - 1).expect("beat").is_empty());

    // The template has been quiet far longer than its quiet time: no nudge, only the run.
    let beat = f.tasks.beat(TUE_0900_BERLIN).expect("beat");
    assert_eq!(beat.len(), 1, "{beat:?}");
    assert_eq!(starts(&beat), [(template.id.clone(), TUE_0900_BERLIN)]);
    let now = TUE_0900_BERLIN + MIN;
    f.tasks.apply(&beat[0], now).await.expect("apply");

    let runs = runs_of(&f.tasks, &template.id);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run.id, "t-2");
    assert_eq!(run.title, "Morning digest (2026-09-22)");
    assert_eq!(run.state, TaskState::Assigned);
    assert_eq!(run.assignee, "bob");
    assert_eq!(run.requester, human());
    assert_eq!(run.room, template.room);
    assert_eq!(run.schedule, None, "an instance does not recur itself");
    assert_eq!(
        run.recurrence_note().as_deref(),
        Some("run of recurring task t-1")
    );
    let spec = read(&f.storage, &run.id, TaskFile::Spec).await;
    assert_eq!(
        spec,
        "# t-2: Morning digest (2026-09-22)\n\nThis is the run due 2026-09-22 07:00 UTC of recurring task t-1, which repeats `0 9 * * mon-fri` (Europe/Berlin).\n\nSummarise yesterday's commits.\n"
    );
    // The Worker may read and write its run's files like any task's.
    assert!(f.tasks.task_ids_of("bob").expect("ids").contains(&run.id));
    let template_now = f.tasks.get(&template.id).expect("stored");
    assert_eq!(template_now.last_run_ms, Some(TUE_0900_BERLIN));
    assert_eq!(template_now.next_run_ms(), Some(TUE_0900_BERLIN + DAY));

    // The next beat reports the new task and starts nothing.
    let beat = f.tasks.beat(now + 15 * MIN).expect("beat");
    assert!(starts(&beat).is_empty(), "{beat:?}");
    assert!(matches!(
        beat.as_slice(),
        [HeartbeatAction::Report { changed, .. }] if changed.len() == 1 && changed[0].id == run.id
    ));
    for action in &beat {
        f.tasks.apply(action, now + 15 * MIN).await.expect("apply");
    }
    // An hour without progress: the instance is nudged, the template is not.
    let beat = f.tasks.beat(now + 61 * MIN).expect("beat");
    assert_eq!(
        beat,
        vec![HeartbeatAction::Nudge {
            task: run.id.clone(),
            worker: "bob".into()
        }]
    );
}

#[tokio::test]
async fn missed_runs_are_caught_up_once_not_one_by_one() {
    let f = fixture().await;
    let template = weekday_template(&f.tasks).await;
    // Crew was down from Monday to Saturday noon: four weekday runs missed.
    let saturday_noon = FRI_0900_BERLIN + 5 * 60 * MIN;
    let beat = f.tasks.beat(saturday_noon).expect("beat");
    assert_eq!(starts(&beat), [(template.id.clone(), FRI_0900_BERLIN)]);
    for action in &beat {
        f.tasks.apply(action, saturday_noon).await.expect("apply");
    }
    let runs = runs_of(&f.tasks, &template.id);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].title, "Morning digest (2026-09-25)");
    // Nothing more on the weekend; Monday's run on Monday.
    let sunday = saturday_noon + DAY;
    assert!(starts(&f.tasks.beat(sunday).expect("beat")).is_empty());
    let monday = FRI_0900_BERLIN + 3 * DAY;
    assert_eq!(
        starts(&f.tasks.beat(monday).expect("beat")),
        [(template.id.clone(), monday)]
    );
}

#[tokio::test]
async fn a_run_is_created_once_however_often_it_is_started() {
    let f = fixture().await;
    let template = weekday_template(&f.tasks).await;
    let action = HeartbeatAction::StartRecurrence {
        template: template.id.clone(),
        due_ms: TUE_0900_BERLIN,
    };
    // The server creates the instance to announce it, then crashes before recording the run:
    // the next beat yields the same run, and starting it again finds the same instance.
    let created = f
        .tasks
        .start_recurrence(&template.id, TUE_0900_BERLIN, TUE_0900_BERLIN)
        .await
        .expect("start");
    let beat = f.tasks.beat(TUE_0900_BERLIN + 15 * MIN).expect("beat");
    assert_eq!(starts(&beat), [(template.id.clone(), TUE_0900_BERLIN)]);
    let again = f
        .tasks
        .start_recurrence(&template.id, TUE_0900_BERLIN, TUE_0900_BERLIN + 15 * MIN)
        .await
        .expect("start again");
    assert_eq!(again, created);
    // Recording it (which starts it once more) and recording it twice change nothing either.
    f.tasks
        .apply(&action, TUE_0900_BERLIN + 15 * MIN)
        .await
        .expect("apply");
    f.tasks
        .apply(&action, TUE_0900_BERLIN + 30 * MIN)
        .await
        .expect("apply twice");
    assert_eq!(runs_of(&f.tasks, &template.id), vec![created.clone()]);

    // Many attempts at the same run at once still make one instance.
    let attempts = (0..8).map(|n| {
        let tasks = f.tasks.clone();
        let template = template.id.clone();
        tokio::spawn(async move {
            tasks
                .start_recurrence(&template, FRI_0900_BERLIN, FRI_0900_BERLIN + n)
                .await
        })
    });
    let mut ids = Vec::new();
    for joined in futures::future::join_all(attempts).await {
        ids.push(joined.expect("join").expect("start").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        runs_of(&f.tasks, &template.id).len(),
        2,
        "Tuesday's and Friday's"
    );
}

#[tokio::test]
async fn cancelled_or_unscheduled_templates_start_no_runs() {
    let f = fixture().await;
    let cancelled = weekday_template(&f.tasks).await;
    f.tasks.cancel(&cancelled.id, T0 + MIN).expect("cancel");
    let plain = new_task(&f.tasks, "one-off", "alice", T0).await;
    let unscheduled = weekday_template(&f.tasks).await;
    f.tasks
        .set_schedule(&unscheduled.id, None, T0 + MIN)
        .expect("unschedule");
    let beat = f.tasks.beat(FRI_0900_BERLIN).expect("beat");
    assert!(starts(&beat).is_empty(), "{beat:?}");
    assert_eq!(
        f.tasks.get(&cancelled.id).expect("stored").next_run_ms(),
        None
    );
    assert!(
        f.tasks
            .get(&cancelled.id)
            .expect("stored")
            .recurrence_note()
            .expect("still a template")
            .ends_with("stopped")
    );
    for id in [&cancelled.id, &plain.id, &unscheduled.id] {
        assert!(matches!(
            f.tasks
                .start_recurrence(id, FRI_0900_BERLIN, FRI_0900_BERLIN)
                .await,
            Err(TaskError::NotRecurring { .. })
        ));
    }
    assert_eq!(
        f.tasks.all().expect("list").len(),
        3,
        "no instance was made"
    );
}

#[tokio::test]
async fn records_from_before_recurrence_still_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db")).expect("open");
    let old_record = serde_json::json!({
        "id": "t-1", "title": "old", "assignee": "alice", "room": null,
        "requester": "@ann:example.org", "state": "assigned", "created_ms": T0,
        "updated_ms": T0, "last_progress_ms": T0, "quiet_minutes": 60, "nudges": 0,
        "last_nudge_ms": null, "told_human_ms": null,
        "schedule": {"cron": "0 9 * * mon-fri", "timezone": "Europe/Berlin"},
        "result_path": null, "blocked_question": null
    });
    store
        .tree::<String, serde_json::Value>("tasks")
        .expect("tree")
        .insert(&"t-1".to_owned(), &old_record)
        .expect("insert");
    let tasks =
        Tasks::open(&store, storage_in(dir.path()).await, &TaskConfig::default()).expect("tasks");
    let old = tasks.get("t-1").expect("loads");
    assert_eq!(old.recurrence_of, None);
    assert_eq!(old.last_run_ms, None);
    // Its first run counts from its creation.
    assert_eq!(old.next_run_ms(), Some(TUE_0900_BERLIN));
}

#[test]
fn config_defaults_and_checks() {
    let config = TaskConfig::default();
    assert_eq!(config.heartbeat_minutes, 15);
    assert_eq!(config.default_quiet_minutes, 60);
    assert_eq!(config.heartbeat_interval().as_secs(), 900);
    let parsed: TaskConfig = toml::from_str("heartbeat_minutes = 5").expect("partial config");
    assert_eq!(parsed.default_quiet_minutes, 60);
    assert!(
        toml::from_str::<TaskConfig>("heartbeat = 5").is_err(),
        "unknown keys refused"
    );
    let zero = TaskConfig {
        heartbeat_minutes: 0,
        ..TaskConfig::default()
    };
    assert!(
        zero.check()
            .expect_err("zero")
            .to_string()
            .contains("heartbeat_minutes")
    );
    // Seconds replace minutes, for tests and demonstrations.
    let quick: TaskConfig =
        toml::from_str("heartbeat_secs = 2\ndefault_quiet_secs = 3").expect("seconds");
    assert_eq!(quick.heartbeat_interval().as_secs(), 2);
    let zero_secs = TaskConfig {
        heartbeat_secs: Some(0),
        ..TaskConfig::default()
    };
    assert!(
        zero_secs
            .check()
            .expect_err("zero")
            .to_string()
            .contains("heartbeat_secs")
    );
}

#[tokio::test]
async fn a_quiet_time_in_seconds_is_given_to_new_tasks_until_set_in_minutes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let config = TaskConfig {
        default_quiet_secs: Some(3),
        ..TaskConfig::default()
    };
    let tasks = Tasks::open(&store, storage_in(dir.path()).await, &config).expect("tasks");
    let task = new_task(&tasks, "quick", "alice", T0).await;
    assert_eq!(task.quiet_ms(), 3_000);
    assert_eq!(task.quiet_minutes, 1, "shown rounded up to whole minutes");
    let task = tasks.set_quiet_minutes(&task.id, 2, T0).expect("minutes");
    assert_eq!(
        task.quiet_ms(),
        120_000,
        "minutes set later replace the seconds"
    );
}
