//! Projects end to end: the real `crew` against a real Synapse, the scripted LLM playing the
//! Manager and three Workers. A person asks for work, the Manager proposes a plan, the person
//! confirms in chat, and the project runs to its summary through internal wakes alone.

#[path = "support/crew.rs"]
mod crew;
#[path = "support/scripted_llm.rs"]
mod scripted_llm;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::time::Duration;

use crew::CrewEnv;
use scripted_llm::{Gate, Reply, ScriptedLlm, waking_text};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const MANAGER: &str = "@crew:crew.test";

/// crew with an `llm` route to the scripted provider and `extra` config; Workers ada, bob and
/// cy created with the CLI.
async fn crew_with_team(llm: &ScriptedLlm, extra: &'static str) -> CrewEnv {
    let upstream = llm.url();
    let env = CrewEnv::start_with(move |config: &Path| {
        let key_file = config.parent().unwrap().parent().unwrap().join("llm.key");
        std::fs::write(&key_file, "sk-scripted-provider-key").unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str(&format!(
            "\n[[gateway.routes]]\nname = \"llm\"\nprefix = \"/llm\"\nupstream = \"{upstream}/v1\"\nkind = \"openai\"\ncredentials = [{{ file = \"{}\" }}]\n\n[llm]\nmodel = \"scripted-model\"\nmax_retries = 0\n",
            key_file.display()
        ));
        text.push_str(extra);
        std::fs::write(config, text).unwrap();
    })
    .await;
    for name in ["ada", "bob", "cy"] {
        let (ok, out) = env.cli(&["workers", "add", name]);
        assert!(ok, "{out}");
    }
    env
}

fn system_prompt(body: &Value) -> String {
    body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn is_manager(body: &Value) -> bool {
    system_prompt(body).contains("the Manager of a team")
}

fn is_worker(body: &Value, display: &str) -> bool {
    system_prompt(body).contains(&format!("You are {display}"))
}

/// The content of the last tool result in the request, if the turn has run a tool.
fn last_tool_result(body: &Value) -> Option<String> {
    body["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "tool")
        .and_then(|m| m["content"].as_str())
        .map(str::to_owned)
}

fn diamond(owner_a: &str) -> Value {
    json!({
        "title": "MVP",
        "tasks": [
            {"key": "A", "title": "Data model", "owner": owner_a, "acceptance": "tables named"},
            {"key": "B", "title": "API", "owner": "bob", "depends_on": ["A"]},
            {"key": "C", "title": "UI", "owner": "cy", "depends_on": ["A"]},
            {"key": "D", "title": "Release notes", "owner": "ada", "depends_on": ["B", "C"]}
        ]
    })
}

/// The Manager's side: plan on "plan the MVP", confirm on "confirm", a line after each tool,
/// accept every part, and a line on the final review.
fn script_the_manager(llm: &ScriptedLlm) {
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some_and(|r| r.contains("Show the person")),
        Reply::text("Plan p-1 is ready: A, then B and C together, then D. Confirm?"),
    );
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some_and(|r| r.contains("\"started\"")),
        Reply::text("Project p-1 started; see its room."),
    );
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some(),
        Reply::text("Noted."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("plan the MVP"),
        Reply::tool_call("m1", "propose_project", diamond("ada")),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("confirm"),
        Reply::tool_call("m2", "confirm_project", json!({"project": "p-1"})),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("Every task of project"),
        Reply::text("Reviewed: every part meets its notes."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("is done: the result is"),
        Reply::text("Accepted."),
    );
}

/// Each Worker completes the task its wake names (task ids follow the plan's order: A is t-1,
/// B t-2, C t-3, D t-4) and says one line after.
fn script_the_workers(llm: &ScriptedLlm, hold_b: Option<&Gate>) {
    for display in ["Ada", "Bob", "Cy"] {
        llm.on(
            move |b| is_worker(b, display) && last_tool_result(b).is_some(),
            Reply::text("Done."),
        );
    }
    for (display, task) in [
        ("Ada", "t-1"),
        ("Bob", "t-2"),
        ("Cy", "t-3"),
        ("Ada", "t-4"),
    ] {
        let mut reply = Reply::tool_call(
            "w1",
            "complete_task",
            json!({"task": task, "text": format!("Result of {task}.")}),
        );
        if task == "t-2"
            && let Some(gate) = hold_b
        {
            reply = reply.hold(gate);
        }
        llm.on(
            move |b| {
                is_worker(b, display)
                    && last_tool_result(b).is_none()
                    && waking_text(b).contains(&format!("task **{task}**"))
            },
            reply,
        );
    }
}

/// In a room with the Manager, the admin asks for the MVP and confirms the plan; returns the
/// project room, which the admin joined.
async fn confirmed_mvp(env: &CrewEnv) -> (String, String) {
    let admin = env.admin().await;
    let hq = admin.create_room("hq", &[MANAGER]).await;
    admin.wait_joined(&hq, MANAGER).await;
    admin.send_mention(&hq, "plan the MVP", &[MANAGER]).await;
    admin.wait_for_message(&hq, MANAGER, "Confirm?").await;
    assert!(
        admin.invites_named("Project: MVP").await.is_empty(),
        "nothing opens before the person confirms"
    );
    assert!(
        !env.data_dir.join("files/tasks").exists(),
        "no task starts before the person confirms"
    );
    let plan = std::fs::read_to_string(env.data_dir.join("files/projects/p-1/plan.md")).unwrap();
    assert!(plan.contains("- Status: proposed"), "{plan}");
    admin.send_mention(&hq, "confirm", &[MANAGER]).await;
    let project_room = tools::wait_for("the project room", WAIT, || async {
        admin.invites_named("Project: MVP").await.into_iter().next()
    })
    .await;
    admin.join(&project_room).await;
    (hq, project_room)
}

/// The Manager's notices in `room` that announce started tasks, oldest first.
async fn start_notices(admin: &synapse::TestUser, room: &str) -> Vec<String> {
    admin
        .messages_from(room, MANAGER)
        .await
        .into_iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .filter(|body| body.contains("\": started"))
        .collect()
}

async fn wait_for_summary(admin: &synapse::TestUser, room: &str) -> String {
    tools::wait_for("the completion summary", WAIT, || async {
        admin
            .messages_from(room, MANAGER)
            .await
            .into_iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .find(|body| body.contains("is complete"))
    })
    .await
}

fn spec(env: &CrewEnv, task: &str) -> String {
    std::fs::read_to_string(env.data_dir.join(format!("files/tasks/{task}/spec.md"))).unwrap()
}

fn task_dirs(env: &CrewEnv) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(env.data_dir.join("files/tasks"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

#[tokio::test(flavor = "multi_thread")]
async fn a_diamond_project_runs_from_confirmation_to_summary_by_itself() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    let env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let (hq, project_room) = confirmed_mvp(&env).await;
    let confirmed_at = llm.received();

    let summary = wait_for_summary(&admin, &project_room).await;

    // The waves: A alone, then B and C in one step, then D.
    let starts = start_notices(&admin, &project_room).await;
    assert_eq!(starts.len(), 3, "{starts:#?}");
    assert!(starts[0].contains("`A`") && !starts[0].contains("`B`"));
    assert!(starts[1].contains("`B`") && starts[1].contains("`C`"));
    assert!(starts[2].contains("`D`") && !starts[2].contains("`B`"));
    // Each task is handed its inputs by path, never their content.
    for task in ["t-2", "t-3"] {
        let text = spec(&env, task);
        assert!(text.contains("`tasks/t-1/result.md`"), "{task}: {text}");
        assert!(!text.contains("Result of t-1"), "{task}: {text}");
    }
    let d = spec(&env, "t-4");
    assert!(
        d.contains("`tasks/t-2/result.md`") && d.contains("`tasks/t-3/result.md`"),
        "{d}"
    );
    assert_eq!(task_dirs(&env), ["t-1", "t-2", "t-3", "t-4"]);

    // The summary names every result and the cost from the gateway's metering.
    for task in ["t-1", "t-2", "t-3", "t-4"] {
        assert!(
            summary.contains(&format!("`tasks/{task}/result.md`")),
            "{summary}"
        );
    }
    let total = summary
        .lines()
        .find(|line| line.starts_with("- total: "))
        .unwrap_or_else(|| panic!("no total in {summary}"));
    // Each part: its Worker's two calls and the Manager's review, 10 + 5 scripted tokens each
    // (A and D are reviewed alone; B's and C's reviews may share one Manager run).
    for part in ["A", "D"] {
        assert!(
            summary.contains(&format!(
                "- {part}: 45 tokens (30 in, 15 out) in 3 requests"
            )),
            "{summary}"
        );
    }
    let plan = std::fs::read_to_string(env.data_dir.join("files/projects/p-1/plan.md")).unwrap();
    assert!(plan.contains("- Status: completed"), "{plan}");

    // Nobody wrote between the confirmation and the summary.
    let people: Vec<Value> = admin.messages_from(&project_room, "@admin:crew.test").await;
    assert!(people.is_empty(), "{people:#?}");
    let asked = admin.messages_from(&hq, "@admin:crew.test").await;
    assert_eq!(asked.len(), 2, "the request and the confirmation only");

    // `!crew project p-1` answers from the records, without the LLM.
    let before = llm.received();
    admin
        .send(
            &project_room,
            json!({"msgtype": "m.text", "body": "!crew project p-1"}),
        )
        .await;
    let status = admin
        .wait_for_message(&project_room, MANAGER, "p-1 (completed)")
        .await;
    let status = status["content"]["body"].as_str().unwrap().to_owned();
    assert!(status.contains("- D [done] ada"), "{status}");
    assert_eq!(llm.received(), before, "no LLM call for a command");

    // What the project cost in LLM calls (docs/benchmarks.md): one Manager call per part's
    // review after the confirmation turn, nothing else.
    let requests = llm.requests();
    let manager_total = requests.iter().filter(|r| is_manager(&r.json())).count();
    let manager_after = requests[confirmed_at..]
        .iter()
        .filter(|r| is_manager(&r.json()))
        .count();
    let reviews = requests
        .iter()
        .filter(|r| {
            let body = r.json();
            is_manager(&body)
                && last_tool_result(&body).is_none()
                && (waking_text(&body).contains("is done: the result is")
                    || waking_text(&body).contains("Every task of project"))
        })
        .count();
    assert!(
        (3..=4).contains(&reviews),
        "one review per part, B's and C's maybe together: {reviews}"
    );
    let charged = 8 + reviews;
    assert_eq!(
        total,
        format!(
            "- total: {} tokens ({} in, {} out) in {charged} requests",
            charged * 15,
            charged * 10,
            charged * 5
        ),
        "every Worker call and every review is charged to the project"
    );
    let tokens: u64 = requests.len() as u64 * 15;
    eprintln!(
        "diamond: {} LLM calls ({tokens} scripted tokens), Manager {manager_total} (after the confirmation turn started: {manager_after}, reviews {reviews}), Workers {}; project cost {total}",
        requests.len(),
        requests.len() - manager_total
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_the_second_wave_starts_nothing_twice_and_the_project_completes() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    let bob_working = Gate::new();
    script_the_workers(&llm, Some(&bob_working));
    let mut env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    // B is with bob (his model is answering) when crew is killed.
    tools::wait_for("bob at work on B", WAIT, || async {
        let started = llm
            .requests()
            .iter()
            .any(|r| is_worker(&r.json(), "Bob") && waking_text(&r.json()).contains("t-2"));
        started.then_some(())
    })
    .await;
    env.kill_crew();
    env.start_crew().await;
    bob_working.release();

    let summary = wait_for_summary(&admin, &project_room).await;
    assert!(summary.contains("`tasks/t-4/result.md`"), "{summary}");
    assert_eq!(
        task_dirs(&env),
        ["t-1", "t-2", "t-3", "t-4"],
        "one Worker task per project task"
    );
    let starts = start_notices(&admin, &project_room).await;
    assert_eq!(starts.len(), 3, "each wave announced once: {starts:#?}");
    let plan = std::fs::read_to_string(env.data_dir.join("files/projects/p-1/plan.md")).unwrap();
    for (key, task) in [("A", "t-1"), ("B", "t-2"), ("C", "t-3"), ("D", "t-4")] {
        assert!(
            plan.contains(&format!("- State: done (task {task})")),
            "{key}: {plan}"
        );
    }
    let b_wakes = llm
        .requests()
        .iter()
        .filter(|r| {
            let body = r.json();
            is_worker(&body, "Bob") && last_tool_result(&body).is_none()
        })
        .count();
    assert!(
        b_wakes <= 2,
        "bob's turn ran again after the crash, no more: {b_wakes}"
    );
}

/// The Manager's notices in `room` whose body contains `needle`.
async fn manager_said(admin: &synapse::TestUser, room: &str, needle: &str) -> Vec<String> {
    admin
        .messages_from(room, MANAGER)
        .await
        .into_iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .filter(|body| body.contains(needle))
        .collect()
}

fn is_final_review(body: &Value) -> bool {
    is_manager(body)
        && last_tool_result(body).is_none()
        && waking_text(body).contains("Every task of project")
}

/// The Manager's final review sending D (task t-5) back with `reason`.
fn send_d_back(reason: &str) -> Reply {
    Reply::tool_call(
        "r1",
        "request_revision",
        json!({"project": "p-1", "task": "D", "reason": reason}),
    )
}

/// ada redoes D (task t-5) each time it comes back, completing it with `text`.
fn script_ada_redoing_d(llm: &ScriptedLlm, text: &'static str) {
    llm.on(
        |b| {
            is_worker(b, "Ada")
                && last_tool_result(b).is_none()
                && waking_text(b).contains("task **t-5**")
        },
        Reply::tool_call("w2", "complete_task", json!({"task": "t-5", "text": text})),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_sent_back_is_redone_and_then_the_project_completes() {
    let llm = ScriptedLlm::start().await;
    // The first final review finds D lacking; the second accepts.
    llm.once(is_final_review, send_d_back("name the version"));
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    script_ada_redoing_d(&llm, "Release notes for v1.0.");
    let env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    let summary = wait_for_summary(&admin, &project_room).await;
    assert!(summary.contains("`tasks/t-5/result.md`"), "{summary}");
    assert_eq!(
        manager_said(&admin, &project_room, "is complete")
            .await
            .len(),
        1,
        "one summary, after the revision"
    );
    let redo = spec(&env, "t-5");
    assert!(
        redo.contains("sent back because: name the version"),
        "{redo}"
    );
    assert!(
        redo.contains("`tasks/t-2/result.md`") && redo.contains("`tasks/t-3/result.md`"),
        "{redo}"
    );
    let starts = start_notices(&admin, &project_room).await;
    assert!(
        starts
            .last()
            .is_some_and(|s| s.contains("`D`") && s.contains("revision")),
        "{starts:#?}"
    );
    assert_eq!(task_dirs(&env), ["t-1", "t-2", "t-3", "t-4", "t-5"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manager_and_worker_bouncing_a_task_stop_at_the_loop_budget_with_one_notice() {
    let llm = ScriptedLlm::start().await;
    // The Manager never accepts D; ada always redoes it.
    llm.on(is_final_review, send_d_back("not yet"));
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    script_ada_redoing_d(&llm, "Again.");
    let env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    // D at depth 1, its review 2, the redo 3, its review 4: the next redo would be 5.
    let stop = tools::wait_for("the loop-budget notice", WAIT, || async {
        manager_said(&admin, &project_room, "loop budget")
            .await
            .into_iter()
            .next()
    })
    .await;
    assert!(stop.contains("dispatch.max_depth = 4"), "{stop}");
    let stopped_id = "$crew.revision_needed.p-1.d.3";
    assert!(stop.contains(stopped_id), "{stop}");
    admin
        .send(
            &project_room,
            json!({"msgtype": "m.text", "body": format!("!crew why {stopped_id}")}),
        )
        .await;
    let why = admin
        .wait_for_message(&project_room, MANAGER, "did not wake")
        .await;
    assert!(
        why["content"]["body"]
            .as_str()
            .unwrap()
            .contains("loop_budget"),
        "{why}"
    );
    assert_eq!(
        manager_said(&admin, &project_room, "loop budget")
            .await
            .len(),
        1,
        "one notice"
    );
    assert!(
        !llm.requests()
            .iter()
            .any(|r| waking_text(&r.json()).contains("t-6")),
        "nobody was woken past the budget"
    );
    assert!(
        manager_said(&admin, &project_room, "is complete")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_task_asks_the_person_once_and_goes_on_with_the_answer() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    // bob needs an answer before B; with it, he completes B.
    llm.on(
        |b| {
            is_worker(b, "Bob")
                && last_tool_result(b).is_none()
                && waking_text(b).contains("use Postgres")
        },
        Reply::tool_call(
            "b2",
            "complete_task",
            json!({"task": "t-2", "text": "API on Postgres."}),
        ),
    );
    llm.on(
        |b| {
            is_worker(b, "Bob")
                && last_tool_result(b).is_none()
                && waking_text(b).contains("task **t-2**")
        },
        Reply::tool_call(
            "b1",
            "block_task",
            json!({"task": "t-2", "text": "Which database?"}),
        ),
    );
    script_the_workers(&llm, None);
    let env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    let ask = admin
        .wait_for_message(&project_room, MANAGER, "needs your answer")
        .await;
    let body = ask["content"]["body"].as_str().unwrap();
    assert!(body.contains("Which database?"), "{body}");
    assert!(
        ask["content"]["m.mentions"]["user_ids"]
            .to_string()
            .contains("@admin:crew.test"),
        "{ask}"
    );
    admin
        .send_mention(&project_room, "use Postgres", &["@crew_bob:crew.test"])
        .await;
    let summary = wait_for_summary(&admin, &project_room).await;
    assert!(summary.contains("`tasks/t-4/result.md`"), "{summary}");
    assert_eq!(
        manager_said(&admin, &project_room, "needs your answer")
            .await
            .len(),
        1,
        "asked once"
    );
    let result = std::fs::read_to_string(env.data_dir.join("files/tasks/t-2/result.md")).unwrap();
    assert!(result.contains("Postgres"), "{result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cycle_is_refused_with_the_cycle_named_and_an_edit_replans() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some_and(|r| r.contains("cycle")),
        Reply::text("That plan goes round in a circle."),
    );
    llm.on(
        |b| {
            is_manager(b)
                && last_tool_result(b)
                    .is_some_and(|r| r.contains("\"status\"") && !r.contains("Show the person"))
        },
        Reply::text("Plan updated."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("make A wait for D"),
        Reply::tool_call(
            "e1",
            "edit_project",
            json!({"project": "p-1", "change": "add_dependency", "task": "A", "on": "D"}),
        ),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("give the API part to cy"),
        Reply::tool_call(
            "e2",
            "edit_project",
            json!({"project": "p-1", "change": "reassign", "task": "B", "owner": "cy"}),
        ),
    );
    script_the_manager(&llm);
    let env = crew_with_team(&llm, "").await;
    let admin = env.admin().await;
    let hq = admin.create_room("hq", &[MANAGER]).await;
    admin.wait_joined(&hq, MANAGER).await;
    admin.send_mention(&hq, "plan the MVP", &[MANAGER]).await;
    admin.wait_for_message(&hq, MANAGER, "Confirm?").await;

    admin
        .send_mention(&hq, "make A wait for D", &[MANAGER])
        .await;
    admin.wait_for_message(&hq, MANAGER, "circle").await;
    let edit_result = llm
        .requests()
        .iter()
        .filter_map(|r| last_tool_result(&r.json()))
        .find(|r| r.contains("cycle"))
        .expect("the tool's refusal");
    assert!(
        edit_result.contains("A → D → B → A"),
        "the cycle is named: {edit_result}"
    );
    let plan = std::fs::read_to_string(env.data_dir.join("files/projects/p-1/plan.md")).unwrap();
    assert!(
        plan.contains("### A: Data model\n\n- Owner: ada\n- Depends on: nothing"),
        "{plan}"
    );

    admin
        .send_mention(&hq, "give the API part to cy", &[MANAGER])
        .await;
    admin.wait_for_message(&hq, MANAGER, "Plan updated.").await;
    let plan = std::fs::read_to_string(env.data_dir.join("files/projects/p-1/plan.md")).unwrap();
    assert!(plan.contains("### B: API\n\n- Owner: cy"), "{plan}");
    assert!(
        !env.data_dir.join("files/tasks").exists(),
        "editing starts nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_at_its_step_limit_goes_on_by_itself_and_says_so() {
    let llm = ScriptedLlm::start().await;
    let bob = |b: &Value| is_worker(b, "Bob");
    llm.on(
        move |b| {
            bob(b) && waking_text(b).contains("where you stopped") && last_tool_result(b).is_some()
        },
        Reply::text("B is finished."),
    );
    llm.on(
        move |b| bob(b) && waking_text(b).contains("where you stopped"),
        Reply::tool_call(
            "b9",
            "complete_task",
            json!({"task": "t-2", "text": "The API, finished in a second turn."}),
        ),
    );
    // The first turn on B only records progress, step after step, until its limit.
    llm.on(
        move |b| bob(b) && waking_text(b).contains("task **t-2**"),
        Reply::tool_call(
            "b1",
            "task_progress",
            json!({"task": "t-2", "text": "one more endpoint"}),
        ),
    );
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    let env = crew_with_team(&llm, "max_tool_steps = 2\n").await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    let summary = wait_for_summary(&admin, &project_room).await;
    assert!(summary.contains("`tasks/t-2/result.md`"), "{summary}");
    let said: Vec<String> = admin
        .messages_from(&project_room, "@crew_bob:crew.test")
        .await
        .into_iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .filter(|body| body.contains("go on in a new turn by myself"))
        .collect();
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].contains("(1 of 3)"), "{}", said[0]);
    let result = std::fs::read_to_string(env.data_dir.join("files/tasks/t-2/result.md")).unwrap();
    assert!(result.contains("second turn"), "{result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_an_admin_confirms_a_plan_that_creates_workers() {
    const CAROL: &str = "@carol:crew.test";
    let llm = ScriptedLlm::start().await;
    llm.on(
        |b| {
            is_manager(b)
                && last_tool_result(b).is_some_and(|r| r.contains("only the crew's admins"))
        },
        Reply::text("I cannot start that."),
    );
    llm.on(
        |b| {
            is_manager(b)
                && last_tool_result(b).is_none()
                && waking_text(b).contains("plan the site")
        },
        Reply::tool_call(
            "p1",
            "propose_project",
            json!({"title": "Site", "tasks": [
                {"key": "ui", "title": "Pages", "owner": "dee", "role": "frontend"},
                {"key": "api", "title": "API", "owner": "bob", "depends_on": ["ui"]}
            ]}),
        ),
    );
    script_the_manager(&llm);
    let env = crew_with_team(&llm, "\n[invites]\nallow_users = [\"@carol:crew.test\"]\n").await;
    let admin = env.admin().await;
    let carol = env.synapse.register_user("carol").await;
    let hq = admin.create_room("hq", &[MANAGER, CAROL]).await;
    carol.join(&hq).await;
    admin.wait_joined(&hq, MANAGER).await;
    carol.send_mention(&hq, "plan the site", &[MANAGER]).await;
    carol.wait_for_message(&hq, MANAGER, "Confirm?").await;

    carol.send_mention(&hq, "confirm", &[MANAGER]).await;
    let refused = carol
        .wait_for_message(&hq, MANAGER, "I cannot start that.")
        .await;
    assert!(
        refused["content"]["body"]
            .as_str()
            .unwrap()
            .contains("create Workers"),
        "{refused}"
    );
    let (ok, workers) = env.cli(&["workers", "list"]);
    assert!(ok && !workers.contains("dee"), "{workers}");
    assert!(carol.invites_named("Project: Site").await.is_empty());

    // The admin confirms: dee is created and the project starts.
    admin.send_mention(&hq, "confirm p-1", &[MANAGER]).await;
    tools::wait_for("the project room", WAIT, || async {
        carol
            .invites_named("Project: Site")
            .await
            .into_iter()
            .next()
    })
    .await;
    let spec = tools::wait_for("dee's task", WAIT, || async {
        std::fs::read_to_string(env.data_dir.join("files/tasks/t-1/spec.md")).ok()
    })
    .await;
    assert!(spec.contains("Part `ui` of project p-1"), "{spec}");
    let (_, workers) = env.cli(&["workers", "list"]);
    assert!(workers.contains("dee"), "{workers}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_may_have_plans_start_without_confirmation() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    let env = crew_with_team(
        &llm,
        "\n[tasks]\nprojects_start_without_confirmation = true\n",
    )
    .await;
    let admin = env.admin().await;
    let hq = admin.create_room("hq", &[MANAGER]).await;
    admin.wait_joined(&hq, MANAGER).await;
    admin.send_mention(&hq, "plan the MVP", &[MANAGER]).await;
    let project_room = tools::wait_for("the project room", WAIT, || async {
        admin.invites_named("Project: MVP").await.into_iter().next()
    })
    .await;
    admin.join(&project_room).await;
    wait_for_summary(&admin, &project_room).await;
    assert_eq!(
        admin.messages_from(&hq, "@admin:crew.test").await.len(),
        1,
        "asked once, never confirmed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_heartbeat_wakes_the_worker_of_a_quiet_project_task_directly() {
    let llm = ScriptedLlm::start().await;
    let bob = |b: &Value| is_worker(b, "Bob");
    llm.on(
        move |b| {
            bob(b) && waking_text(b).contains("has been quiet") && last_tool_result(b).is_none()
        },
        Reply::tool_call(
            "b2",
            "complete_task",
            json!({"task": "t-2", "text": "The API, after the nudge."}),
        ),
    );
    // On its start, bob only answers; he records no progress.
    llm.on(
        move |b| bob(b) && waking_text(b).contains("task **t-2**") && last_tool_result(b).is_none(),
        Reply::text("Looking into it."),
    );
    script_the_manager(&llm);
    script_the_workers(&llm, None);
    let env = crew_with_team(
        &llm,
        "\n[tasks]\nheartbeat_secs = 1\ndefault_quiet_secs = 5\n",
    )
    .await;
    let admin = env.admin().await;
    let (_, project_room) = confirmed_mvp(&env).await;

    // A quiet time (5 s) and a beat (1 s) for the nudge, with room for a loaded machine; then
    // the project completes by itself.
    let noted = tools::wait_for("the nudge", Duration::from_secs(30), || async {
        manager_said(&admin, &project_room, "has been quiet; I asked Bob")
            .await
            .into_iter()
            .next()
    })
    .await;
    assert!(noted.contains("t-2"), "{noted}");
    wait_for_summary(&admin, &project_room).await;
    assert!(
        manager_said(&admin, &project_room, "How is it going?")
            .await
            .is_empty(),
        "no chat nudge: the Worker was woken through the queue"
    );
    let result = std::fs::read_to_string(env.data_dir.join("files/tasks/t-2/result.md")).unwrap();
    assert!(result.contains("after the nudge"), "{result}");
}
