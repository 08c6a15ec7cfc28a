//! The Manager and Workers with an LLM: the scripted OpenAI-compatible server plays the
//! provider, behind crew's real gateway, against a real Synapse.

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
use scripted_llm::{Reply, ScriptedLlm, last_user_text, waking_text};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const REAL_KEY: &str = "sk-real-provider-key-never-leaves-the-gateway";

/// crew with an `llm` route to the scripted provider; the real key is in a file.
async fn crew_with_llm(llm: &ScriptedLlm) -> CrewEnv {
    crew_with_llm_and(llm, "").await
}

/// As [`crew_with_llm`], with more config appended.
async fn crew_with_llm_and(llm: &ScriptedLlm, extra: &'static str) -> CrewEnv {
    crew_with_upstream(llm.url(), extra).await
}

/// crew with an `llm` route to `upstream` (the real key in a file) and `extra` config.
async fn crew_with_upstream(upstream: String, extra: &'static str) -> CrewEnv {
    crew_with_upstream_and(upstream, "", extra).await
}

/// As [`crew_with_upstream`], with more lines in the `[llm]` section.
async fn crew_with_upstream_and_llm(upstream: String, llm_lines: &'static str) -> CrewEnv {
    crew_with_upstream_and(upstream, llm_lines, "").await
}

async fn crew_with_upstream_and(
    upstream: String,
    llm_lines: &'static str,
    extra: &'static str,
) -> CrewEnv {
    CrewEnv::start_with(move |config: &Path| {
        // Outside the data directory, so that a scan of what crew stored finds only crew's writing.
        let key_file = config.parent().unwrap().parent().unwrap().join("llm.key");
        std::fs::write(&key_file, REAL_KEY).unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str(&format!(
            "\n[[gateway.routes]]\nname = \"llm\"\nprefix = \"/llm\"\nupstream = \"{upstream}/v1\"\nkind = \"openai\"\ncredentials = [{{ file = \"{}\" }}]\n\n[llm]\nmodel = \"scripted-model\"\nmax_retries = 0\n{llm_lines}",
            key_file.display()
        ));
        text.push_str(extra);
        std::fs::write(config, text).unwrap();
    })
    .await
}

fn cli(env: &CrewEnv, args: &[&str]) -> String {
    let (ok, out) = env.cli(args);
    assert!(ok, "{out}");
    out
}

fn has_tool_result(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .is_some_and(|messages| messages.iter().any(|m| m["role"] == "tool"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_is_created_by_conversation() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        has_tool_result,
        Reply::text("Alice is ready. Mention her in her room."),
    );
    llm.on(
        |body| waking_text(body).contains("create a worker named alice"),
        Reply::tool_call(
            "call-1",
            "create_worker",
            json!({"name": "alice", "role": "frontend development"}),
        ),
    );
    let env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let bob = env.synapse.register_user("bob").await;
    let room = admin.create_room("hq", &[&manager, &bob.user_id]).await;
    bob.join(&room).await;
    admin.wait_joined(&room, &manager).await;

    admin
        .send_mention(
            &room,
            "create a worker named alice for frontend development",
            &[&manager],
        )
        .await;
    let answer = tools::wait_for("the Manager's answer", WAIT, || async {
        let said = admin.messages_from(&room, &manager).await;
        said.into_iter()
            .find(|e| e["content"]["msgtype"] == "m.text")
    })
    .await;
    assert!(
        answer["content"]["body"]
            .as_str()
            .unwrap()
            .contains("Alice is ready")
    );

    // The Worker exists: account, roster entry, gateway consumer, and its room with us invited.
    assert!(cli(&env, &["workers", "list"]).contains("@crew_alice:crew.test"));
    assert!(cli(&env, &["gateway", "consumers", "list"]).contains("crew_alice"));
    let invited = tools::wait_for("the invite to alice's room", WAIT, || async {
        admin
            .invites_named("Worker: Alice")
            .await
            .into_iter()
            .next()
    })
    .await;
    admin.join(&invited).await;
    let welcome = admin.wait_for_notice(&invited, &manager).await;
    assert!(
        welcome["content"]["body"]
            .as_str()
            .unwrap()
            .contains("Welcome, Alice! Your role: frontend development."),
        "{welcome}"
    );
    let (_, name) = admin
        .request(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.name/",
                synapse::enc(&invited)
            ),
            None,
        )
        .await;
    assert_eq!(name["name"], "Worker: Alice");
    let alice = admin
        .membership(&invited, "@crew_alice:crew.test")
        .await
        .unwrap();
    assert_eq!(alice["membership"], "join");
    let (_, power) = admin
        .request(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
                synapse::enc(&invited)
            ),
            None,
        )
        .await;
    assert!(
        power["users"]["@admin:crew.test"].as_i64()
            > power["users"]["@crew_alice:crew.test"].as_i64()
    );

    // The provider saw the real key and the Manager's tools; never a consumer token.
    let requests = llm.requests();
    assert!(requests.len() >= 2);
    for request in &requests {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {REAL_KEY}").as_str())
        );
    }
    assert!(
        requests[0].json()["tools"]
            .to_string()
            .contains("create_worker")
    );

    // Asking again does not make a second worker or a second room.
    admin
        .send_mention(
            &room,
            "create a worker named alice for frontend development",
            &[&manager],
        )
        .await;
    tools::wait_for("the second answer", WAIT, || async {
        let said = admin.messages_from(&room, &manager).await;
        (said
            .iter()
            .filter(|e| e["content"]["msgtype"] == "m.text")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    let workers = cli(&env, &["workers", "list"]);
    assert_eq!(workers.matches("crew_alice").count(), 1, "{workers}");
    assert!(
        admin.invites_named("Worker: Alice").await.is_empty(),
        "no second Worker room"
    );
    assert!(
        !env.all_logs().contains(REAL_KEY),
        "the real key is never logged"
    );
    let stored = files_containing(&env.data_dir, REAL_KEY.as_bytes());
    assert!(stored.is_empty(), "nor stored: {stored:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_mentioned_worker_calls_the_llm() {
    let llm = ScriptedLlm::start().await;
    let env = crew_with_llm(&llm).await;
    for name in ["alice", "bob"] {
        cli(&env, &["workers", "add", name]);
    }
    let admin = env.admin().await;
    let carol = env.synapse.register_user("carol").await;
    let room = admin
        .create_room(
            "team",
            &[
                "@crew_alice:crew.test",
                "@crew_bob:crew.test",
                &carol.user_id,
            ],
        )
        .await;
    carol.join(&room).await;
    for agent in ["@crew_alice:crew.test", "@crew_bob:crew.test"] {
        admin.wait_joined(&room, agent).await;
    }
    llm.set_default(Reply::text("on it"));
    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "morning all", "m.mentions": {}}),
        )
        .await;
    admin
        .send_mention(&room, "please review the API", &["@crew_bob:crew.test"])
        .await;
    tools::wait_for("bob's answer", WAIT, || async {
        let said = admin.messages_from(&room, "@crew_bob:crew.test").await;
        said.into_iter().find(|e| {
            e["content"]["body"]
                .as_str()
                .unwrap_or("")
                .contains("on it")
        })
    })
    .await;
    assert_eq!(llm.received(), 1, "one LLM call: bob's; alice cost nothing");
    let request = &llm.requests()[0];
    assert!(last_user_text(&request.json()).contains("please review the API"));
    assert!(
        last_user_text(&request.json()).contains("morning all"),
        "said since the last turn"
    );
    assert!(
        admin
            .messages_from(&room, "@crew_alice:crew.test")
            .await
            .is_empty()
    );
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
        {
            found.push(path.display().to_string());
        }
    }
    found
}

fn system_prompt(body: &Value) -> String {
    body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_is_assigned_by_chat_completed_by_the_worker_and_reported() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    llm.on(
        move |b| has_tool_result(b) && is_alice(b),
        Reply::text("Finished the login page."),
    );
    llm.on(
        move |b| is_alice(b) && waking_text(b).contains("new task"),
        Reply::tool_call(
            "c3",
            "complete_task",
            json!({"task": "t-1", "text": "The login page is built."}),
        ),
    );
    let env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let alice_room = alice_with_the_login_task(&env).await;

    // The Manager mentions alice in her room; she completes the task; we are told.
    let report = admin
        .wait_for_message(&alice_room, "@crew_alice:crew.test", "is done")
        .await;
    assert!(
        report["content"]["m.mentions"]["user_ids"]
            .to_string()
            .contains("@admin:crew.test")
    );
    let assignment = admin
        .messages_from(&alice_room, &manager)
        .await
        .into_iter()
        .find(|e| e["content"]["body"].as_str().unwrap_or("").contains("t-1"))
        .expect("the Manager's assignment in alice's room");
    assert!(
        assignment["content"]["body"]
            .as_str()
            .unwrap()
            .contains("tasks/t-1/spec.md")
    );
    let files = env.data_dir.join("files/tasks/t-1");
    assert!(
        std::fs::read_to_string(files.join("spec.md"))
            .unwrap()
            .contains("Build the login page.")
    );
    assert!(
        std::fs::read_to_string(files.join("result.md"))
            .unwrap()
            .contains("login page is built")
    );
    // The result itself reaches the room as a file.
    tools::wait_for("the result file", WAIT, || async {
        admin
            .messages_from(&alice_room, "@crew_alice:crew.test")
            .await
            .into_iter()
            .find(|e| e["content"]["msgtype"] == "m.file")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_heartbeat_nudges_a_quiet_task_then_tells_the_human() {
    let llm = ScriptedLlm::start().await;
    script_the_manager(&llm);
    // alice answers but never records progress.
    llm.set_default(Reply::text("looking into it"));
    // A beat a second, three quiet seconds allowed (the settings in seconds exist for this).
    let env = crew_with_llm_and(
        &llm,
        "\n[tasks]\nheartbeat_secs = 1\ndefault_quiet_secs = 3\n",
    )
    .await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let alice_room = alice_with_the_login_task(&env).await;
    // The task exists once the Manager has mentioned alice about it (asked earlier, `!crew
    // workers` could be answered before the assignment).
    admin
        .wait_for_message(&alice_room, &manager, "new task **t-1**")
        .await;

    // "What is everyone doing?" without the LLM: alice, her open task.
    admin
        .send(
            &alice_room,
            json!({"msgtype": "m.text", "body": "!crew workers"}),
        )
        .await;
    admin
        .wait_for_message(&alice_room, &manager, "tasks: t-1 Login page")
        .await;

    let status = cli(&env, &["workers", "status"]);
    assert!(status.contains("tasks: t-1 Login page"), "{status}");

    let said_by_manager = |needle: &'static str| {
        let admin = admin.clone();
        let room = alice_room.clone();
        let manager = manager.clone();
        async move {
            admin
                .messages_from(&room, &manager)
                .await
                .into_iter()
                .filter(|e| e["content"]["body"].as_str().unwrap_or("").contains(needle))
                .count()
        }
    };
    // The nudge comes a quiet time (3 s) and at most a beat (1 s) after the assignment, telling
    // the human as long again after the nudge; the deadline leaves room for a loaded machine.
    let beats = Duration::from_secs(30);
    tools::wait_for("the nudge", beats, || async {
        (said_by_manager("has been quiet").await > 0).then_some(())
    })
    .await;
    let told = tools::wait_for("the human to be told", beats, || async {
        let said = admin.messages_from(&alice_room, &manager).await;
        said.into_iter().find(|e| {
            e["content"]["body"]
                .as_str()
                .unwrap_or("")
                .contains("stayed quiet after a nudge")
        })
    })
    .await;
    assert!(
        told["content"]["m.mentions"]["user_ids"]
            .to_string()
            .contains("@admin:crew.test")
    );
    assert_eq!(
        said_by_manager("has been quiet").await,
        1,
        "one nudge per silence"
    );
}

/// Scripts the Manager's side of [`alice_with_the_login_task`]: `create_worker` for "create a
/// worker named alice", `assign_task` for "give alice the login task", "Done." after a tool ran.
fn script_the_manager(llm: &ScriptedLlm) {
    llm.on(
        move |b| has_tool_result(b) && is_manager(b),
        Reply::text("Done."),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("create a worker named alice"),
        Reply::tool_call(
            "c1",
            "create_worker",
            json!({"name": "alice", "role": "frontend"}),
        ),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("give alice the login task"),
        Reply::tool_call(
            "c2",
            "assign_task",
            json!({"worker": "alice", "title": "Login page", "spec": "Build the login page."}),
        ),
    );
}

/// In a group room "hq", asks the Manager to create alice and give her the login task (the
/// scripted LLM must answer both with tool calls); returns alice's room, which the admin joined.
async fn alice_with_the_login_task(env: &CrewEnv) -> String {
    let admin = env.admin().await;
    let manager = env.manager_id();
    let bob = env.synapse.register_user("bob").await;
    let hq = admin.create_room("hq", &[&manager, &bob.user_id]).await;
    bob.join(&hq).await;
    admin.wait_joined(&hq, &manager).await;
    let alice_room = alice_created_by_chat(&admin, &hq, &manager).await;
    admin
        .send_mention(&hq, "give alice the login task", &[&manager])
        .await;
    alice_room
}

/// Asks the Manager in `hq` to create alice (scripted by [`script_the_manager`]), joins her
/// room and waits for the Manager's answer, as a person would: a message sent while the
/// Manager's turn runs would join that turn instead of starting its own. Returns alice's room.
async fn alice_created_by_chat(admin: &synapse::TestUser, hq: &str, manager: &str) -> String {
    admin
        .send_mention(hq, "create a worker named alice", &[manager])
        .await;
    let alice_room = tools::wait_for("alice's room", WAIT, || async {
        admin
            .invites_named("Worker: Alice")
            .await
            .into_iter()
            .next()
    })
    .await;
    admin.join(&alice_room).await;
    manager_done(admin, hq, manager).await;
    alice_room
}

/// Waits for the Manager's "Done." in `room` (the end of a scripted turn).
async fn manager_done(admin: &synapse::TestUser, room: &str, manager: &str) {
    admin.wait_for_message(room, manager, "Done.").await;
}

const ALICE: &str = "@crew_alice:crew.test";

fn is_alice(body: &Value) -> bool {
    system_prompt(body).contains("You are Alice")
}

fn is_manager(body: &Value) -> bool {
    system_prompt(body).contains("the Manager of a team")
}

/// alice (created with the CLI) in a group room "work" with the admin and carol; returns the
/// room.
async fn alice_in_a_group_room(env: &CrewEnv) -> String {
    cli(env, &["workers", "add", "alice"]);
    let admin = env.admin().await;
    let carol = env.synapse.register_user("carol").await;
    let room = admin.create_room("work", &[ALICE, &carol.user_id]).await;
    carol.join(&room).await;
    admin.wait_joined(&room, ALICE).await;
    room
}

/// Waits for alice's first message in `room` of msgtype `msgtype` whose body contains `needle`.
async fn alice_says(admin: &synapse::TestUser, room: &str, msgtype: &str, needle: &str) -> Value {
    tools::wait_for(
        &format!("alice's {msgtype} containing {needle:?}"),
        WAIT,
        || async {
            alice_said(admin, room, msgtype, needle)
                .await
                .into_iter()
                .next()
        },
    )
    .await
}

/// alice's messages in `room` of msgtype `msgtype` whose body contains `needle`.
async fn alice_said(
    admin: &synapse::TestUser,
    room: &str,
    msgtype: &str,
    needle: &str,
) -> Vec<Value> {
    admin
        .messages_from(room, ALICE)
        .await
        .into_iter()
        .filter(|e| {
            e["content"]["msgtype"] == msgtype
                && e["content"]["body"].as_str().unwrap_or("").contains(needle)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_for_a_busy_worker_reaches_its_running_turn() {
    let llm = ScriptedLlm::start().await;
    let thinking = scripted_llm::Gate::new();
    llm.on(
        |b| is_alice(b) && has_tool_result(b),
        Reply::text("Summary written, in British spelling."),
    );
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("write the summary"),
        Reply::tool_call(
            "w1",
            "write_file",
            json!({"path": "agents/alice/summary.md", "content": "Colour palette: draft"}),
        )
        .hold(&thinking),
    );
    let env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let room = alice_in_a_group_room(&env).await;

    admin
        .send_mention(&room, "please write the summary", &[ALICE])
        .await;
    thinking.reached().await;
    // While alice's model is thinking, the admin corrects her.
    let correction = admin
        .send_mention(&room, "use British spelling, please", &[ALICE])
        .await;
    env.wait_queued(ALICE, &correction).await;
    thinking.release();

    alice_says(&admin, &room, "m.text", "British spelling").await;
    // The correction went into the running turn, after the tool result, as a user message.
    let requests = llm.requests();
    assert_eq!(
        requests.len(),
        2,
        "one turn of two steps, no turn of its own for the correction"
    );
    let messages = requests[1].json()["messages"].as_array().unwrap().clone();
    let tool_at = messages.iter().position(|m| m["role"] == "tool").unwrap();
    assert!(
        messages[tool_at]["content"]
            .as_str()
            .unwrap()
            .contains("wrote agents/alice/summary.md"),
        "{}",
        messages[tool_at]
    );
    assert!(
        messages[tool_at + 1..].iter().any(|m| m["role"] == "user"
            && m["content"]
                .as_str()
                .unwrap_or("")
                .contains("use British spelling")),
        "the correction follows the tool result: {messages:?}"
    );
    assert_eq!(
        std::fs::read_to_string(env.data_dir.join("files/agents/alice/summary.md")).unwrap(),
        "Colour palette: draft"
    );
    // Handled, so it leaves the queue and is not answered again.
    tools::wait_for("an empty wake queue", WAIT, || async {
        let queue = env.admin_api("/dispatch/queue").await?;
        queue.as_object()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(alice_said(&admin, &room, "m.text", "").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_taken_into_a_turn_cut_by_its_step_limit_is_answered_by_the_next() {
    let llm = ScriptedLlm::start().await;
    let thinking = scripted_llm::Gate::new();
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("use British spelling"),
        Reply::text("Noted: British spelling from now on."),
    );
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("write the summary"),
        Reply::tool_call(
            "w1",
            "write_file",
            json!({"path": "agents/alice/summary.md", "content": "Color palette: draft"}),
        )
        .hold(&thinking),
    );
    let env = crew_with_upstream_and_llm(llm.url(), "max_tool_steps = 1\n").await;
    let admin = env.admin().await;
    let room = alice_in_a_group_room(&env).await;

    admin
        .send_mention(&room, "please write the summary", &[ALICE])
        .await;
    thinking.reached().await;
    // Taken into the running turn, which then ends at its step limit without an answer.
    let correction = admin
        .send_mention(&room, "use British spelling, please", &[ALICE])
        .await;
    env.wait_queued(ALICE, &correction).await;
    thinking.release();

    alice_says(&admin, &room, "m.notice", "llm.max_tool_steps").await;
    // The correction was not finished unanswered: the next turn answers it.
    let answer = alice_says(&admin, &room, "m.text", "British spelling from now on").await;
    assert_eq!(
        answer["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        correction.as_str(),
        "{answer}"
    );
    tools::wait_for("an empty wake queue", WAIT, || async {
        let queue = env.admin_api("/dispatch/queue").await?;
        queue.as_object()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(llm.received(), 2, "one step per turn");
    assert_eq!(alice_said(&admin, &room, "m.text", "").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_running_turn_and_the_turn_resumes_on_the_next_start() {
    let llm = ScriptedLlm::start().await;
    let thinking = scripted_llm::Gate::new();
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("long job") && !has_tool_result(b),
        Reply::text("Done with the long job.").hold(&thinking),
    );
    let mut env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let room = alice_in_a_group_room(&env).await;
    admin
        .send_mention(&room, "a long job, please", &[ALICE])
        .await;
    thinking.reached().await;
    // The model is still thinking (the reply is held): SIGTERM must not wait for it.
    let status = env
        .terminate_crew(Duration::from_secs(5))
        .await
        .expect("crew exits within seconds of SIGTERM while a turn runs");
    assert!(status.success(), "a clean exit: {status}");
    assert!(alice_said(&admin, &room, "m.text", "").await.is_empty());
    // The wake stayed queued: the next start runs the turn again and answers once.
    thinking.release();
    env.start_crew().await;
    alice_says(&admin, &room, "m.text", "Done with the long job").await;
    tools::wait_for("an empty wake queue", WAIT, || async {
        let queue = env.admin_api("/dispatch/queue").await?;
        queue.as_object()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(alice_said(&admin, &room, "m.text", "").await.len(), 1);
}

/// A journal whose disk went away: every write fails.
struct UnwritableJournal;

#[async_trait::async_trait]
impl matrix_crew::agent::llm_turn::StepJournal for UnwritableJournal {
    async fn load(
        &self,
        _step: usize,
    ) -> Result<Option<matrix_crew::agent::llm_turn::JournaledStep>, matrix_crew::store::StoreError>
    {
        Ok(None)
    }
    async fn save(
        &self,
        _step: usize,
        _entry: &matrix_crew::agent::llm_turn::JournaledStep,
    ) -> Result<(), matrix_crew::store::StoreError> {
        Err(matrix_crew::store::StoreError::Sled(
            sled::Error::Unsupported("no space left on device".into()),
        ))
    }
}

/// Counts the tool calls it is asked to run.
#[derive(Default)]
struct CountingTools(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl matrix_crew::agent::llm_turn::Toolbox for CountingTools {
    fn tools(&self) -> Vec<matrix_crew::llm::Tool> {
        vec![matrix_crew::llm::Tool::function(
            "write_file",
            "writes a file",
            json!({"type": "object"}),
        )]
    }
    async fn call(&self, _name: &str, _arguments: &str) -> String {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        "done".into()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_cannot_be_journalled_does_not_run() {
    use matrix_crew::agent::llm_turn::{self, TurnError, TurnLimits, Unsupervised};
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::tool_call(
        "w1",
        "write_file",
        json!({"path": "x", "content": "y"}),
    ));
    let client = matrix_crew::llm::LlmClient::new(
        &format!("{}/v1", llm.url()).parse().unwrap(),
        matrix_crew::secret::Secret::new("token"),
        matrix_crew::llm::LlmConfig {
            max_retries: 0,
            ..matrix_crew::llm::LlmConfig::default()
        },
    )
    .unwrap();
    let tools = CountingTools::default();
    let turn = llm_turn::Turn {
        llm: &client,
        model: "scripted-model",
        limits: TurnLimits {
            max_steps: 4,
            max_tokens: 100_000,
        },
        toolbox: &tools,
        supervisor: &Unsupervised,
        journal: &UnwritableJournal,
    };
    let outcome = llm_turn::run(turn, "system".into(), "write x".into()).await;
    assert!(
        matches!(outcome, Err(TurnError::Journal(_))),
        "the turn ends with the journal's error: {outcome:?}"
    );
    assert_eq!(
        tools.0.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the tool call of an unjournalled step never runs"
    );
    assert_eq!(llm.received(), 1, "no further step either");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_stop_ends_the_running_turn_before_its_tool_calls() {
    let llm = ScriptedLlm::start().await;
    let thinking = scripted_llm::Gate::new();
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("rewrite everything"),
        Reply::tool_call(
            "w1",
            "write_file",
            json!({"path": "agents/alice/rewrite.md", "content": "everything"}),
        )
        .hold(&thinking),
    );
    llm.set_default(Reply::text("continuing"));
    let env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let room = alice_in_a_group_room(&env).await;

    admin
        .send_mention(&room, "rewrite everything in Rust", &[ALICE])
        .await;
    thinking.reached().await;
    let stop = admin.send_mention(&room, "alice: stop", &[ALICE]).await;
    env.wait_queued(ALICE, &stop).await;
    thinking.release();

    let notice = alice_says(&admin, &room, "m.notice", "Stopped").await;
    assert!(
        notice["content"]["formatted_body"]
            .as_str()
            .unwrap()
            .contains("@admin:crew.test"),
        "says who stopped it: {notice}"
    );
    assert_eq!(llm.received(), 1, "no further step after the stop");
    assert!(
        !env.data_dir.join("files/agents/alice/rewrite.md").exists(),
        "the tool call that came with the stop did not run"
    );
    // The stop was consumed by the turn: no second answer.
    tools::wait_for("an empty wake queue", WAIT, || async {
        let queue = env.admin_api("/dispatch/queue").await?;
        queue.as_object()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(llm.received(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_cut_by_a_crash_replays_its_finished_steps() {
    let llm = ScriptedLlm::start().await;
    let answering = scripted_llm::Gate::new();
    llm.on(
        move |b| is_manager(b) && has_tool_result(b),
        Reply::text("Dave is ready.").hold(&answering),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("create a worker named dave"),
        Reply::tool_call(
            "c1",
            "create_worker",
            json!({"name": "dave", "role": "ops"}),
        ),
    );
    let mut env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let room = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    admin
        .send_mention(&room, "create a worker named dave", &[&manager])
        .await;
    // The tool ran and the model was asked for the next step: kill crew there.
    answering.reached().await;
    env.kill_crew();
    env.start_crew().await;
    answering.release();

    admin
        .wait_for_message(&room, &manager, "Dave is ready")
        .await;
    let first_steps = llm
        .requests()
        .iter()
        .filter(|r| !has_tool_result(&r.json()))
        .count();
    assert_eq!(
        first_steps, 1,
        "the finished first step (create_worker) was replayed from the journal, not asked again"
    );
    let answers = admin
        .messages_from(&room, &manager)
        .await
        .into_iter()
        .filter(|e| {
            e["content"]["body"]
                .as_str()
                .unwrap_or("")
                .contains("Dave is ready")
        })
        .count();
    assert_eq!(answers, 1, "answered once");
    assert_eq!(
        cli(&env, &["workers", "list"]).matches("crew_dave").count(),
        1
    );
    assert_eq!(
        admin.invites_named("Worker: Dave").await.len(),
        1,
        "one room"
    );

    // The room's conversation survived the restart: the next turn still sees it.
    llm.set_default(Reply::text("Nothing else."));
    admin
        .send_mention(&room, "anything else?", &[&manager])
        .await;
    admin
        .wait_for_message(&room, &manager, "Nothing else.")
        .await;
    let context = last_user_text(&llm.requests().last().unwrap().json());
    assert!(
        context.contains("create a worker named dave") && context.contains("you: Dave is ready."),
        "{context}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_sent_to_a_worker_is_saved_and_named_in_its_context() {
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("Got your file."));
    let env = crew_with_llm(&llm).await;
    cli(&env, &["workers", "add", "alice"]);
    let admin = env.admin().await;
    // A DM: alice wakes on every message, files included.
    let room = admin.create_room("alice dm", &[ALICE]).await;
    admin.wait_joined(&room, ALICE).await;
    let mxc = admin
        .upload(b"line one\nline two\n".to_vec(), "text/plain", "notes.txt")
        .await;
    admin
        .send(
            &room,
            json!({"msgtype": "m.file", "body": "notes.txt", "filename": "notes.txt", "url": mxc,
                   "info": {"size": 18, "mimetype": "text/plain"}}),
        )
        .await;
    alice_says(&admin, &room, "m.text", "Got your file").await;
    let inbox = env.data_dir.join("files/agents/alice/inbox");
    let saved: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap_or_else(|error| panic!("no inbox folder {}: {error}", inbox.display()))
        .flatten()
        .collect();
    assert_eq!(saved.len(), 1);
    let name = saved[0].file_name().to_string_lossy().to_string();
    assert!(name.ends_with("-notes.txt"), "{name}");
    assert_eq!(
        std::fs::read_to_string(saved[0].path()).unwrap(),
        "line one\nline two\n"
    );
    let said = waking_text(&llm.requests()[0].json());
    assert!(
        said.contains(&format!("saved at `agents/alice/inbox/{name}`")),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_remembers_uses_skills_and_stays_in_its_folders() {
    let llm = ScriptedLlm::start().await;
    llm.on(|b| is_alice(b) && has_tool_result(b), Reply::text("Noted."));
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("remember the staging host"),
        Reply::tool_calls(vec![
            (
                "m1".into(),
                "remember".into(),
                json!({"note": "staging is staging.example.org"}).to_string(),
            ),
            (
                "m2".into(),
                "read_file".into(),
                json!({"path": "agents/bob/secrets.md"}).to_string(),
            ),
            (
                "m3".into(),
                "read_skill".into(),
                json!({"name": "code-review"}).to_string(),
            ),
            (
                "m4".into(),
                "share_file".into(),
                json!({"path": "agents/bob/secrets.md", "upload": true}).to_string(),
            ),
            (
                "m5".into(),
                "share_file".into(),
                json!({"path": "agents/alice/memory.md", "upload": true}).to_string(),
            ),
        ]),
    );
    llm.set_default(Reply::text("Hello."));
    let env = crew_with_llm(&llm).await;
    let skill = env.root.path().join("SKILL.md");
    std::fs::write(
        &skill,
        "---\nname: code-review\ndescription: Review a diff for bugs\n---\nRead the diff twice.\n",
    )
    .unwrap();
    let secret = env.root.path().join("secrets.md");
    std::fs::write(&secret, "bob's secret").unwrap();
    cli(
        &env,
        &[
            "files",
            "put",
            "agents/alice/skills/code-review/SKILL.md",
            skill.to_str().unwrap(),
        ],
    );
    cli(
        &env,
        &[
            "files",
            "put",
            "agents/bob/secrets.md",
            secret.to_str().unwrap(),
        ],
    );
    let admin = env.admin().await;
    let room = alice_in_a_group_room(&env).await;

    admin
        .send_mention(&room, "remember the staging host", &[ALICE])
        .await;
    alice_says(&admin, &room, "m.text", "Noted").await;
    let results: Vec<String> = llm.requests()[1].json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert!(results[0].contains("agents/alice/memory.md"), "{results:?}");
    assert!(
        results[1].contains("may not read"),
        "another Worker's folder is refused: {results:?}"
    );
    assert!(!results.concat().contains("bob's secret"));
    assert!(results[2].contains("Read the diff twice"), "{results:?}");
    assert!(results[3].contains("may not read"), "{results:?}");
    assert!(results[4].contains("\"shared\""), "{results:?}");
    tools::wait_for("alice's memory file in the room", WAIT, || async {
        admin
            .messages_from(&room, ALICE)
            .await
            .into_iter()
            .find(|e| e["content"]["msgtype"] == "m.file" && e["content"]["body"] == "memory.md")
    })
    .await;

    // The next turn's prompt carries the skills index and the memory.
    admin.send_mention(&room, "hello again", &[ALICE]).await;
    alice_says(&admin, &room, "m.text", "Hello.").await;
    let system = system_prompt(&llm.requests()[2].json());
    assert!(
        system.contains("code-review: Review a diff for bugs"),
        "{system}"
    );
    assert!(
        system.contains("staging is staging.example.org"),
        "{system}"
    );
    // And its recent conversation, its own reply included.
    let context = last_user_text(&llm.requests()[2].json());
    assert!(context.contains("you: Noted."), "{context}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_invites_a_worker_and_only_admins_change_it() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        move |b| is_manager(b) && has_tool_result(b),
        Reply::text("Done."),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("invite alice here"),
        Reply::tool_call("i1", "invite_worker", json!({"worker": "alice"})),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("make alice a backend developer"),
        Reply::tool_call(
            "u1",
            "update_worker",
            json!({"name": "alice", "role": "backend development", "model": "big-model"}),
        ),
    );
    // carol may talk to the crew, but she is not an admin.
    let env = crew_with_llm_and(&llm, "\n[invites]\nallow_users = [\"@carol:crew.test\"]\n").await;
    cli(&env, &["workers", "add", "alice"]);
    let admin = env.admin().await;
    let manager = env.manager_id();
    let carol = env.synapse.register_user("carol").await;
    let room = admin
        .create_room("project", &[&manager, &carol.user_id])
        .await;
    carol.join(&room).await;
    admin.wait_joined(&room, &manager).await;

    admin
        .send_mention(&room, "invite alice here", &[&manager])
        .await;
    admin.wait_joined(&room, ALICE).await;

    // carol is not an admin: her change is refused in code.
    carol
        .send_mention(&room, "make alice a backend developer", &[&manager])
        .await;
    tools::wait_for("the refused tool call", WAIT, || async {
        llm.requests().into_iter().find_map(|r| {
            let body = r.json();
            body["messages"].as_array()?.iter().find_map(|m| {
                let text = m["content"].as_str()?;
                (m["role"] == "tool" && text.contains("only the crew's admins")).then_some(())
            })
        })
    })
    .await;
    assert!(!cli(&env, &["workers", "list"]).contains("backend development"));

    admin
        .send_mention(&room, "make alice a backend developer", &[&manager])
        .await;
    tools::wait_for("the new role", WAIT, || async {
        cli(&env, &["workers", "list"])
            .contains("backend development")
            .then_some(())
    })
    .await;
    // alice's next turn uses her new role and model.
    llm.set_default(Reply::text("on it"));
    admin.send_mention(&room, "status?", &[ALICE]).await;
    alice_says(&admin, &room, "m.text", "on it").await;
    let last = llm.requests().last().unwrap().json();
    assert_eq!(last["model"], "big-model");
    assert!(system_prompt(&last).contains("Your role: backend development"));
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_work_while_the_llm_provider_is_down() {
    // Nothing listens on the upstream: every LLM call fails.
    let dead = format!("http://127.0.0.1:{}", tools::free_port());
    let env = crew_with_upstream(dead, "").await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let room = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    admin.send_mention(&room, "hello?", &[&manager]).await;
    let notice = admin.wait_for_notice(&room, &manager).await;
    assert!(
        notice["content"]["body"]
            .as_str()
            .unwrap()
            .contains("I could not finish this"),
        "{notice}"
    );
    // Workers can still be made from the CLI, with their room and the person invited.
    let out = cli(
        &env,
        &["workers", "add", "bob", "--invite", "@admin:crew.test"],
    );
    assert!(out.contains('!'), "the room is printed: {out}");
    tools::wait_for("the invite to bob's room", WAIT, || async {
        admin.invites_named("Worker: Bob").await.into_iter().next()
    })
    .await;
    admin
        .send(&room, json!({"msgtype": "m.text", "body": "!crew workers"}))
        .await;
    admin.wait_for_message(&room, &manager, "Bob").await;
    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "!crew model bob big-model"}),
        )
        .await;
    admin
        .wait_for_message(&room, &manager, "Bob now uses `big-model`")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recurring_task_assigned_by_chat_is_started_by_the_heartbeat() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        move |b| is_manager(b) && !has_tool_result(b) && waking_text(b).contains("every minute"),
        Reply::tool_call(
            "r1",
            "assign_task",
            json!({"worker": "alice", "title": "Check the build", "spec": "Look at CI.", "every": "* * * * *"}),
        ),
    );
    script_the_manager(&llm);
    llm.set_default(Reply::text("checking"));
    // A minutely task is below the default minimum period (limits.min_recurring_minutes).
    let env = crew_with_llm_and(
        &llm,
        "\n[tasks]\nheartbeat_secs = 1\n\n[limits]\nmin_recurring_minutes = 1\n",
    )
    .await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let hq = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&hq, &manager).await;
    let alice_room = alice_created_by_chat(&admin, &hq, &manager).await;
    admin
        .send_mention(
            &hq,
            "alice should check the build every minute",
            &[&manager],
        )
        .await;
    // t-1 is the template; the heartbeat starts t-2, a run of it, and mentions alice. Cron runs
    // on whole minutes, so the run is due at the next minute's start (up to 60 s away: that is
    // the schedule, not the heartbeat), and a beat (every second) starts it.
    let beats = Duration::from_secs(60 + 30);
    let run = tools::wait_for("the first run of the recurring task", beats, || async {
        admin
            .messages_from(&alice_room, &manager)
            .await
            .into_iter()
            .find(|e| {
                e["content"]["body"]
                    .as_str()
                    .unwrap_or("")
                    .contains("new task **t-2**")
            })
    })
    .await;
    assert!(
        run["content"]["body"]
            .as_str()
            .unwrap()
            .contains("Check the build ("),
        "{run}"
    );
    assert!(
        run["content"]["m.mentions"]["user_ids"]
            .to_string()
            .contains(ALICE)
    );
    let spec = std::fs::read_to_string(env.data_dir.join("files/tasks/t-2/spec.md")).unwrap();
    assert!(spec.contains("Look at CI."), "{spec}");
    admin
        .send(&hq, json!({"msgtype": "m.text", "body": "!crew tasks"}))
        .await;
    admin.wait_for_message(&hq, &manager, "repeats").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_is_introduced_once_and_keeps_its_persona() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        move |b| is_manager(b) && has_tool_result(b),
        Reply::text("Gern, ich bin Max."),
    );
    llm.on(
        move |b| is_manager(b) && waking_text(b).contains("call yourself Max"),
        Reply::tool_call(
            "p1",
            "set_persona",
            json!({"name": "Max", "style": "brief and warm", "language": "German"}),
        ),
    );
    llm.set_default(Reply::text("Hallo!"));
    let mut env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let room = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    admin
        .send_mention(&room, "call yourself Max, answer in German", &[&manager])
        .await;
    admin.wait_for_message(&room, &manager, "ich bin Max").await;
    // Before: the onboarding instructions. After: the persona, and the new display name.
    assert!(system_prompt(&llm.requests()[0].json()).contains("You have not been introduced yet"));
    let (_, profile) = admin
        .request(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                synapse::enc(&manager)
            ),
            None,
        )
        .await;
    assert_eq!(profile["displayname"], "Max");
    // A restart keeps the name the admin gave (the configured one does not come back).
    env.kill_crew();
    env.start_crew().await;
    let (_, profile) = admin
        .request(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                synapse::enc(&manager)
            ),
            None,
        )
        .await;
    assert_eq!(profile["displayname"], "Max", "after a restart");
    admin.send_mention(&room, "hello", &[&manager]).await;
    tools::wait_for("the second answer", WAIT, || async {
        admin
            .messages_from(&room, &manager)
            .await
            .into_iter()
            .find(|e| e["content"]["body"].as_str().unwrap_or("") == "Hallo!")
    })
    .await;
    let system = system_prompt(&llm.requests().last().unwrap().json());
    assert!(system.starts_with("You are Max, the Manager"), "{system}");
    assert!(system.contains("Always answer in German"), "{system}");
    assert!(!system.contains("not been introduced"), "{system}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_over_its_token_budget_stops_and_says_so() {
    let llm = ScriptedLlm::start().await;
    // Each step reports 700 tokens; the turn may use 1,000.
    llm.set_default(
        Reply::tool_call("l1", "list_files", json!({"prefix": "shared/"})).usage(600, 100),
    );
    let env = crew_with_upstream_and_llm(llm.url(), "max_turn_tokens = 1000\n").await;
    cli(&env, &["workers", "add", "alice"]);
    let admin = env.admin().await;
    let room = admin.create_room("alice dm", &[ALICE]).await;
    admin.wait_joined(&room, ALICE).await;
    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "list everything, forever"}),
        )
        .await;
    let notice = alice_says(&admin, &room, "m.notice", "tokens").await;
    assert!(
        notice["content"]["body"]
            .as_str()
            .unwrap()
            .contains("after using 1400 tokens (the limit is 1000"),
        "{notice}"
    );
    assert_eq!(llm.received(), 2, "the third step was not asked for");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_with_an_llm_url_reads_the_key_from_the_environment_only() {
    let llm = ScriptedLlm::start().await;
    llm.set_default(Reply::text("Hello from the provider."));
    let url = format!("{}/v1", llm.url());
    let env = CrewEnv::start_with_init(
        &[
            "--llm-url",
            &url,
            "--llm-key-env",
            "TEST_PROVIDER_KEY",
            "--llm-model",
            "scripted-model",
        ],
        |_| {},
    )
    .await;
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    assert!(config.contains("env = \"TEST_PROVIDER_KEY\""), "{config}");
    let admin = env.admin().await;
    let manager = env.manager_id();
    let room = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&room, &manager).await;
    admin.send_mention(&room, "hello", &[&manager]).await;
    admin
        .wait_for_message(&room, &manager, "Hello from the provider")
        .await;
    let key = crew::TEST_PROVIDER_KEY;
    assert_eq!(
        llm.requests()[0].header("authorization"),
        Some(format!("Bearer {key}").as_str()),
        "the provider got the key from the environment"
    );
    assert!(!env.all_logs().contains(key), "never logged");
    let stored = files_containing(&env.data_dir, key.as_bytes());
    assert!(stored.is_empty(), "never written: {stored:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_waiting_for_a_busy_worker_are_answered_in_one_run() {
    let llm = ScriptedLlm::start().await;
    let busy = scripted_llm::Gate::new();
    llm.on(
        |b| is_alice(b) && waking_text(b).contains("the long job"),
        Reply::text("Long job done.").hold(&busy),
    );
    llm.set_default(Reply::text("Both answered."));
    let env = crew_with_llm(&llm).await;
    let admin = env.admin().await;
    let work = alice_in_a_group_room(&env).await;
    let dm = admin.create_room("alice dm", &[ALICE]).await;
    admin.wait_joined(&dm, ALICE).await;

    admin
        .send_mention(&work, "please do the long job", &[ALICE])
        .await;
    busy.reached().await;
    // While alice works in the other room, two messages wait for her in the DM.
    for text in ["first question", "second question"] {
        let event = admin
            .send(&dm, json!({"msgtype": "m.text", "body": text}))
            .await;
        env.wait_queued(ALICE, &event).await;
    }
    busy.release();

    let answer = admin.wait_for_message(&dm, ALICE, "Both answered.").await;
    let requests = llm.requests();
    assert_eq!(
        requests.len(),
        2,
        "one run for the job, one for both questions"
    );
    let asked = waking_text(&requests[1].json());
    assert!(
        asked.contains("first question") && asked.contains("second question"),
        "{asked}"
    );
    assert_eq!(alice_said(&admin, &dm, "m.text", "").await.len(), 1);
    let second = admin
        .messages_from(&dm, "@admin:crew.test")
        .await
        .into_iter()
        .find(|e| e["content"]["body"] == "second question")
        .unwrap();
    assert_eq!(
        answer["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], second["event_id"],
        "the answer replies to the newest message"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_answer_is_kept_as_a_file_and_referenced() {
    let llm = ScriptedLlm::start().await;
    let long = "All work and no play. ".repeat(2_000);
    llm.set_default(Reply::text(long.clone()));
    let env = crew_with_llm(&llm).await;
    cli(&env, &["workers", "add", "alice"]);
    let admin = env.admin().await;
    let room = admin.create_room("alice dm", &[ALICE]).await;
    admin.wait_joined(&room, ALICE).await;
    admin
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "write it all out"}),
        )
        .await;
    let answer = admin
        .wait_for_message(&room, ALICE, "The whole answer (44000 characters) is in")
        .await;
    let body = answer["content"]["body"].as_str().unwrap();
    assert!(body.starts_with("All work and no play."), "{body}");
    assert!(body.len() < 4_000, "only the start is posted");
    let folder = env.data_dir.join("files/agents/alice/answers");
    let kept: Vec<_> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("no answers folder {}: {error}", folder.display()))
        .flatten()
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read_to_string(kept[0].path()).unwrap(), long);
    let name = kept[0].file_name().to_string_lossy().to_string();
    assert!(
        body.contains(&format!("agents/alice/answers/{name}")),
        "{body}"
    );
}
