//! Workers' sandboxes against the real Docker engine, a real `crew` and a real Synapse, with the
//! scripted LLM playing the provider: commands, limits, secrets, the network, the lifecycle.
//!
//! Every network check sends traffic only to loopback and to the containers crew made for the
//! test; the image is built once per machine from Debian's packages (`crew sandbox build`).

#[path = "support/crew.rs"]
mod crew;
#[path = "support/s3.rs"]
mod s3;
#[path = "support/sandbox.rs"]
mod sandbox;
#[path = "support/scripted_llm.rs"]
mod scripted_llm;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crew::CrewEnv;
use scripted_llm::{Reply, ScriptedLlm, waking_text};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const LLM_KEY: &str = "sk-real-provider-key-for-the-sandbox-tests";
/// The planted "real" API key of the github-style route: it must reach the stand-in API and
/// nothing else.
const GITHUB_KEY: &str = "ghp_planted_fake_key_0123456789abcdef";
const ALICE: &str = "@crew_alice:crew.test";

/// A crew with an `llm` route to the scripted provider, `routes` (TOML) and `extra` config;
/// returns it with the guard that removes its containers.
async fn crew_with(llm: &ScriptedLlm, routes: String, extra: &str) -> (CrewEnv, sandbox::Cleanup) {
    sandbox::ensure_image();
    let extra = extra.to_owned();
    let env = CrewEnv::start_with(move |config: &Path| {
        let keys = config.parent().unwrap().parent().unwrap();
        std::fs::write(keys.join("llm.key"), LLM_KEY).unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str(&format!(
            "\n[[gateway.routes]]\nname = \"llm\"\nprefix = \"/llm\"\nupstream = \"{}/v1\"\nkind = \"openai\"\ncredentials = [{{ file = \"{}\" }}]\n{routes}\n[llm]\nmodel = \"scripted-model\"\nmax_retries = 0\n{extra}",
            llm.url(),
            keys.join("llm.key").display()
        ));
        std::fs::write(config, text).unwrap();
    })
    .await;
    let cleanup = sandbox::Cleanup(env.config_path());
    (env, cleanup)
}

fn system_prompt(body: &Value) -> String {
    body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn is_alice(body: &Value) -> bool {
    system_prompt(body).contains("You are Alice")
}

fn is_manager(body: &Value) -> bool {
    system_prompt(body).contains("the Manager of a team")
}

/// The content of the request's last message when it is a tool result.
fn last_tool_result(body: &Value) -> Option<String> {
    let last = body["messages"].as_array()?.last()?;
    (last["role"] == "tool").then(|| last["content"].as_str().unwrap_or_default().to_owned())
}

/// Every tool result the provider was shown, over all recorded requests.
fn tool_results(llm: &ScriptedLlm) -> Vec<String> {
    let mut results: Vec<String> = Vec::new();
    for request in llm.requests() {
        for message in request.json()["messages"].as_array().into_iter().flatten() {
            if message["role"] == "tool" {
                let text = message["content"].as_str().unwrap_or_default().to_owned();
                if !results.contains(&text) {
                    results.push(text);
                }
            }
        }
    }
    results
}

/// Waits for a tool result containing `needle`.
async fn tool_result_with(llm: &ScriptedLlm, needle: &str) -> String {
    tools::wait_for(&format!("a tool result with {needle:?}"), WAIT, || async {
        tool_results(llm).into_iter().find(|r| r.contains(needle))
    })
    .await
}

/// alice replies to a person's message containing `trigger` with `call` (a tool call), and
/// with "Finished." once a tool result is in.
fn alice_on(llm: &ScriptedLlm, trigger: &'static str, name: &str, arguments: Value) {
    llm.on(
        move |b| is_alice(b) && last_tool_result(b).is_none() && waking_text(b).contains(trigger),
        Reply::tool_call(
            &format!("call-{}", trigger.replace(' ', "-")),
            name,
            arguments,
        ),
    );
}

fn alice_finishes(llm: &ScriptedLlm) {
    llm.on(
        |b| is_alice(b) && last_tool_result(b).is_some(),
        Reply::text("Finished."),
    );
}

/// alice (made with the CLI) in a room "work" with the admin; returns the room.
async fn alice_at_work(env: &CrewEnv) -> String {
    let (ok, out) = env.cli(&["workers", "add", "alice"]);
    assert!(ok, "{out}");
    let admin = env.admin().await;
    let room = admin.create_room("work", &[ALICE]).await;
    admin.wait_joined(&room, ALICE).await;
    room
}

/// The command lines of the processes running in `container`.
fn processes(container: &str) -> String {
    sandbox::docker(&[
        "exec",
        container,
        "sh",
        "-c",
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
    ])
}

fn the_container(env: &CrewEnv) -> String {
    let found = sandbox::containers_of(&env.data_dir, "alice");
    assert_eq!(found.len(), 1, "alice has one container: {found:?}");
    found[0].clone()
}

fn inspect(what: &str) -> Value {
    let text = sandbox::docker(&["inspect", what]);
    serde_json::from_str::<Value>(&text).unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_computes_fibonacci_with_a_script_in_its_sandbox() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some(),
        Reply::text("Done."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("create a worker named alice"),
        Reply::tool_call("m1", "create_worker", json!({"name": "alice"})),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("Fibonacci"),
        Reply::tool_call(
            "m2",
            "assign_task",
            json!({"worker": "alice", "title": "Fibonacci",
                   "spec": "Compute the 20th Fibonacci number with a Python script."}),
        ),
    );
    // The script prints the number and a digest of it that only running it produces.
    let script = "import hashlib\na, b = 0, 1\nfor _ in range(20):\n    a, b = b, a + b\nprint(f\"fib(20) = {a}\")\nprint(\"proof\", hashlib.sha256(str(a).encode()).hexdigest()[:16])\n";
    llm.on(
        |b| last_tool_result(b).is_some_and(|r| r.contains("exit code: 0")),
        Reply::tool_call(
            "a3",
            "complete_task",
            json!({"task": "t-1", "text": "The 20th Fibonacci number is 6765 (output in fib.out)."}),
        ),
    );
    llm.on(
        |b| is_alice(b) && last_tool_result(b).is_some_and(|r| r.contains("\"state\"")),
        Reply::text("Done: 6765."),
    );
    llm.on(
        |b| is_alice(b) && last_tool_result(b).is_some(),
        Reply::tool_call(
            "a2",
            "run_command",
            json!({"command": "python3 fib.py | tee fib.out", "task": "t-1"}),
        ),
    );
    llm.on(
        is_alice,
        Reply::tool_call(
            "a1",
            "write_file",
            json!({"path": "tasks/t-1/fib.py", "content": script}),
        ),
    );
    let (env, _cleanup) = crew_with(&llm, String::new(), "").await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let hq = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&hq, &manager).await;
    admin
        .send_mention(&hq, "create a worker named alice", &[&manager])
        .await;
    admin.wait_for_message(&hq, &manager, "Done.").await;
    admin
        .send_mention(&hq, "alice: compute the 20th Fibonacci number", &[&manager])
        .await;

    let ran = tool_result_with(&llm, "fib(20) = 6765").await;
    let proof = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"6765"))[..16].to_owned()
    };
    assert!(ran.starts_with("exit code: 0"), "{ran}");
    assert!(ran.contains(&format!("proof {proof}")), "{ran}");
    assert!(
        !script.contains(&proof),
        "the proof comes from the run only"
    );

    let files = env.data_dir.join("files/tasks/t-1");
    tools::wait_for("the task's result", WAIT, || async {
        files.join("result.md").exists().then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(files.join("fib.py")).unwrap(),
        script
    );
    let out = std::fs::read_to_string(files.join("fib.out")).unwrap();
    assert!(out.contains(&format!("proof {proof}")), "{out}");
    assert!(
        std::fs::read_to_string(files.join("result.md"))
            .unwrap()
            .contains("6765")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_are_killed_at_their_time_limit_cut_when_long_and_stopped_on_request() {
    let llm = ScriptedLlm::start().await;
    alice_finishes(&llm);
    alice_on(
        &llm,
        "run the sleepers",
        "run_command",
        json!({"command": "sleep 1000 & sh -c 'sleep 1001' & sleep 1002; echo never", "timeout_secs": 2}),
    );
    alice_on(
        &llm,
        "print a lot",
        "run_command",
        json!({"command": "seq 1 200000"}),
    );
    alice_on(
        &llm,
        "run the long job",
        "run_command",
        json!({"command": "sleep 600; echo finished", "timeout_secs": 900}),
    );
    let (env, _cleanup) = crew_with(&llm, String::new(), "").await;
    let room = alice_at_work(&env).await;
    let admin = env.admin().await;

    // The time limit kills the command and every process it started.
    admin
        .send_mention(&room, "run the sleepers", &[ALICE])
        .await;
    let killed = tool_result_with(&llm, "killed at the time limit").await;
    assert!(!killed.contains("never"), "{killed}");
    admin.wait_for_message(&room, ALICE, "Finished.").await;
    let container = the_container(&env);
    let left = processes(&container);
    assert!(!left.contains("sleep 10"), "left running: {left}");

    // Long output is cut, with a note, and kept whole in a file.
    admin.send_mention(&room, "print a lot", &[ALICE]).await;
    let cut = tool_result_with(&llm, "[output cut:").await;
    assert!(cut.len() < 10_000, "{} bytes shown", cut.len());
    assert!(cut.starts_with("exit code: 0\noutput:\n1\n2\n3\n"), "{cut}");
    let kept = cut
        .split('`')
        .nth(1)
        .expect("the note names the file")
        .to_owned();
    let whole = std::fs::read_to_string(env.data_dir.join("files").join(&kept)).unwrap();
    assert_eq!(whole.lines().count(), 200_000);
    assert!(whole.ends_with("199999\n200000\n"));

    // A person's "stop" ends a running command.
    admin
        .send_mention(&room, "run the long job", &[ALICE])
        .await;
    tools::wait_for("the long job to run", WAIT, || async {
        processes(&container).contains("sleep 600").then_some(())
    })
    .await;
    admin.send_mention(&room, "@alice stop", &[ALICE]).await;
    tools::wait_for("the stop notice", WAIT, || async {
        admin
            .messages_from(&room, ALICE)
            .await
            .into_iter()
            .find(|e| {
                e["content"]["body"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Stopped")
            })
    })
    .await;
    tools::wait_for("the long job to end", WAIT, || async {
        (!processes(&container).contains("sleep 600")).then_some(())
    })
    .await;
    assert!(
        !tool_results(&llm).iter().any(|r| r.contains("finished")),
        "the stopped command never finished"
    );
}

/// A stand-in for an API on loopback: answers every request with its path, and records the
/// Authorization header it got.
async fn stand_in_api() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let recorded = recorded.clone();
        async move {
            let auth = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            recorded.lock().unwrap().push(auth);
            axum::Json(json!({"login": "stand-in", "path": request.uri().to_string()}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_holds_no_real_key_and_reaches_only_the_gateway() {
    let (api, seen) = stand_in_api().await;
    // A service on another host port, on every address: nothing from the sandbox may reach it.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let llm = ScriptedLlm::start().await;
    alice_finishes(&llm);
    alice_on(
        &llm,
        "call github",
        "http_request",
        json!({"route": "github", "path": "/user", "query": {"per_page": 5}}),
    );
    alice_on(
        &llm,
        "call the private api",
        "http_request",
        json!({"route": "private", "path": "/anything"}),
    );
    let probe = format!(
        "env; echo ENVIRON; cat /proc/[0-9]*/environ | tr '\\0' '\\n'; echo FILES; grep -r ghp_ /workspace /tmp 2>/dev/null; \
         echo GATEWAY; curl -s -H \"Authorization: Bearer $CREW_GATEWAY_TOKEN\" \"$CREW_GATEWAY_URL/github/from-sandbox\"; echo; \
         echo ROUTES; cat /proc/net/route; \
         python3 -c \"
import socket, struct
gateways = [l.split()[2] for l in open('/proc/net/route') if l.split()[1] == '00000000']
for ip in [socket.inet_ntoa(struct.pack('<L', int(g, 16))) for g in gateways]:
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((ip, {host_port})); print('REACHED', ip)
    except OSError as e:
        print('unreachable', ip, e)
\""
    );
    alice_on(
        &llm,
        "inspect yourself",
        "run_command",
        json!({"command": probe, "timeout_secs": 60}),
    );
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("github.key"), GITHUB_KEY).unwrap();
    let routes = format!(
        "[[gateway.routes]]\nname = \"github\"\nprefix = \"/github\"\nupstream = \"{api}/api\"\ncredentials = [{{ file = \"{0}\" }}]\n\
         [[gateway.routes]]\nname = \"private\"\nprefix = \"/private\"\nupstream = \"{api}/private\"\ncredentials = [{{ file = \"{0}\" }}]\n",
        keys.path().join("github.key").display()
    );
    // The admin asks the Manager for alice with access to github only.
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some(),
        Reply::text("Done."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("create alice"),
        Reply::tool_call(
            "m1",
            "create_worker",
            json!({"name": "alice", "routes": ["github"]}),
        ),
    );
    let (env, _cleanup) = crew_with(&llm, routes, "").await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    let hq = admin.create_room("hq", &[&manager]).await;
    admin.wait_joined(&hq, &manager).await;
    admin
        .send_mention(&hq, "create alice, she may use github", &[&manager])
        .await;
    let room = tools::wait_for("alice's room", WAIT, || async {
        admin
            .invites_named("Worker: Alice")
            .await
            .into_iter()
            .next()
    })
    .await;
    admin.join(&room).await;
    admin.wait_for_message(&hq, &manager, "Done.").await;
    let granted = tool_result_with(&llm, "\"routes\"").await;
    assert!(granted.contains("[\"github\",\"llm\"]"), "{granted}");
    let consumers = env.cli(&["gateway", "consumers", "list"]).1;
    assert!(consumers.contains("github,llm"), "{consumers}");

    // Through the tool: the gateway adds the real key; a route not allowed is refused.
    admin.send_mention(&room, "call github", &[ALICE]).await;
    let answer = tool_result_with(&llm, "stand-in").await;
    assert!(answer.starts_with("status: 200"), "{answer}");
    assert!(answer.contains("/api/user?per_page=5"), "{answer}");
    assert_eq!(
        seen.lock().unwrap().last().unwrap(),
        &format!("Bearer {GITHUB_KEY}")
    );
    admin.wait_for_message(&room, ALICE, "Finished.").await;
    admin
        .send_mention(&room, "call the private api", &[ALICE])
        .await;
    let refused = tool_result_with(&llm, "status: 403").await;
    assert!(!refused.contains("stand-in"), "{refused}");
    admin.wait_for_message(&room, ALICE, "Finished.").await;

    // Inside: no real key anywhere; the gateway answers; the host does not.
    admin
        .send_mention(&room, "inspect yourself", &[ALICE])
        .await;
    let probed = tool_result_with(&llm, "ENVIRON").await;
    assert!(probed.starts_with("exit code: 0"), "{probed}");
    assert!(probed.contains("CREW_GATEWAY_TOKEN=crewgw_"), "{probed}");
    assert!(
        probed.contains("\"login\":\"stand-in\"") && probed.contains("/api/from-sandbox"),
        "the gateway answers from inside: {probed}"
    );
    assert!(!probed.contains("REACHED"), "{probed}");
    assert!(
        matches!(host_service.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the host's port"
    );
    for result in tool_results(&llm) {
        assert!(!result.contains(GITHUB_KEY), "a tool result holds the key");
        assert!(!result.contains(LLM_KEY), "a tool result holds the key");
    }

    // The container: limits, no key in its configuration, only its workspace mounted.
    let container = inspect(&the_container(&env));
    let config = container["Config"].to_string();
    assert!(!config.contains(GITHUB_KEY) && !config.contains(LLM_KEY));
    let host = &container["HostConfig"];
    assert_eq!(host["Memory"], 1024 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 1_000_000_000);
    assert_eq!(host["PidsLimit"], 256);
    assert_eq!(host["Privileged"], false);
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(
        host["SecurityOpt"]
            .to_string()
            .contains("no-new-privileges")
    );
    assert!(host["Tmpfs"]["/tmp"].is_string());
    let binds = host["Binds"].as_array().unwrap();
    assert_eq!(binds.len(), 1);
    assert!(binds[0].as_str().unwrap().ends_with(":/workspace:rw"));
    assert!(!container["Mounts"].to_string().contains("docker.sock"));

    // The network: internal, and the host holds no address on its bridge, so the default
    // route Docker writes leads nowhere.
    let network_name = host["NetworkMode"].as_str().unwrap().to_owned();
    let network = inspect(&network_name);
    assert_eq!(network["Internal"], true);
    assert_eq!(
        network["Options"]["com.docker.network.bridge.inhibit_ipv4"],
        "true"
    );
    // Binding succeeds only on an address the host holds (nothing is sent).
    let subnet = network["IPAM"]["Config"][0]["Subnet"].as_str().unwrap();
    let gateway_ip = match network["IPAM"]["Config"][0]["Gateway"].as_str() {
        Some(ip) => ip.to_owned(),
        None => {
            let base = subnet.split('/').next().unwrap();
            let (head, _) = base.rsplit_once('.').unwrap();
            format!("{head}.1")
        }
    };
    // The only address the probe dialled is the default route Docker writes, inside this test's
    // own network (no traffic to any address outside what the test made), and it led nowhere.
    for line in probed
        .lines()
        .filter(|line| line.starts_with("unreachable "))
    {
        let dialled = line.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(
            dialled, gateway_ip,
            "the probe dialled only its own network's gateway"
        );
    }
    let held = std::net::TcpListener::bind((gateway_ip.as_str(), 0));
    assert!(
        matches!(&held, Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable),
        "the host holds {gateway_ip} on the sandbox network: {held:?}"
    );
    let members = network["Containers"].as_object().unwrap();
    assert_eq!(members.len(), 2, "alice and the relay: {members:?}");

    // What crew stored and logged holds no key either.
    let logs = env.all_logs();
    assert!(!logs.contains(GITHUB_KEY) && !logs.contains("crewgw_"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_stop_when_idle_survive_restarts_and_go_with_their_worker() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        |b| is_manager(b) && last_tool_result(b).is_some(),
        Reply::text("Done."),
    );
    llm.on(
        |b| is_manager(b) && waking_text(b).contains("remove alice"),
        Reply::tool_call("m1", "remove_worker", json!({"name": "alice"})),
    );
    alice_finishes(&llm);
    alice_on(
        &llm,
        "warm up",
        "run_command",
        json!({"command": "echo warm > warm.txt"}),
    );
    let (mut env, _cleanup) =
        crew_with(&llm, String::new(), "\n[sandbox]\nidle_stop_secs = 2\n").await;
    let room = alice_at_work(&env).await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    admin.invite(&room, &manager).await;
    admin.wait_joined(&room, &manager).await;

    admin.send_mention(&room, "warm up", &[ALICE]).await;
    admin.wait_for_message(&room, ALICE, "Finished.").await;
    let first = the_container(&env);
    assert_eq!(
        std::fs::read_to_string(env.data_dir.join("files/agents/alice/warm.txt")).unwrap(),
        "warm\n"
    );
    tools::wait_for("the idle container to stop", WAIT, || async {
        (inspect(&first)["State"]["Running"] == false).then_some(())
    })
    .await;
    let status = env.cli(&["status"]).1;
    assert!(status.contains("\"image_present\":true"), "{status}");
    assert!(status.contains("\"state\":\"exited\""), "{status}");

    // A restarted crew finds the same container again and starts it.
    env.kill_crew();
    env.start_crew().await;
    admin.send_mention(&room, "warm up again", &[ALICE]).await;
    tools::wait_for("the second run", WAIT, || async {
        (admin
            .messages_from(&room, ALICE)
            .await
            .iter()
            .filter(|e| e["content"]["body"] == "Finished.")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert_eq!(the_container(&env), first, "the same container");

    // Removing the Worker removes its container.
    admin.send_mention(&room, "remove alice", &[&manager]).await;
    admin.wait_for_message(&room, &manager, "Done.").await;
    tools::wait_for("alice's container to go", WAIT, || async {
        sandbox::containers_of(&env.data_dir, "alice")
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_docker_a_command_says_how_to_fix_it_and_the_rest_works() {
    let llm = ScriptedLlm::start().await;
    llm.on(
        |b| {
            is_alice(b)
                && last_tool_result(b).is_some_and(|r| r.contains("Docker is not available"))
        },
        Reply::text("I cannot run commands: Docker is not available on crew's machine."),
    );
    alice_on(
        &llm,
        "run something",
        "run_command",
        json!({"command": "true"}),
    );
    llm.on(is_alice, Reply::text("Hello, still here."));
    let (env, _cleanup) = crew_with(
        &llm,
        String::new(),
        "\n[sandbox]\ndocker_host = \"unix:///nonexistent/docker.sock\"\n",
    )
    .await;
    let room = alice_at_work(&env).await;
    let admin = env.admin().await;
    admin.send_mention(&room, "run something", &[ALICE]).await;
    let error = tool_result_with(&llm, "Docker is not available").await;
    assert!(error.contains("Start the Docker engine"), "{error}");
    admin
        .wait_for_message(&room, ALICE, "Docker is not available")
        .await;
    admin.send_mention(&room, "hello", &[ALICE]).await;
    admin.wait_for_message(&room, ALICE, "still here").await;
    let status = env.cli(&["status"]).1;
    assert!(status.contains("Docker is not available"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workspace_follows_s3_storage_before_and_after_each_command() {
    use matrix_crew::sandbox::{SandboxConfig, SandboxWorker, Sandboxes};
    use matrix_crew::storage::{Backend, S3Backend, Storage, StoragePath, StoragePrefix};
    sandbox::ensure_image();
    let server = s3::start_s3().await;
    let storage = Storage::new(
        Backend::S3(
            S3Backend::connect(
                &s3::s3_config(&server.endpoint, s3::BUCKET),
                s3::s3_env(s3::SECRET_KEY),
            )
            .unwrap(),
        ),
        1 << 30,
    );
    let path = |p: &str| StoragePath::parse(p).unwrap();
    storage
        .put_bytes(&path("agents/bob/input.txt"), "three words here")
        .await
        .unwrap();
    storage
        .put_bytes(&path("tasks/t-9/spec.md"), "count the words")
        .await
        .unwrap();
    storage
        .put_bytes(&path("agents/carol/secret.md"), "not bob's")
        .await
        .unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let sandboxes = Sandboxes::new(SandboxConfig::default(), storage.clone(), data_dir.path());
    let _cleanup = SandboxesCleanup(&sandboxes);
    let bob = SandboxWorker {
        name: "bob".into(),
        token: matrix_crew::secret::Secret::new("crewgw_test-token".to_owned()),
        folders: vec![
            StoragePrefix::parse("agents/bob/").unwrap(),
            StoragePrefix::parse("tasks/t-9/").unwrap(),
        ],
    };
    let limit = Duration::from_secs(60);
    let run = sandboxes
        .run(
            &bob,
            "cd /workspace && wc -w < agents/bob/input.txt > tasks/t-9/count.txt && cat tasks/t-9/spec.md \
             && ls /workspace/agents && rm agents/bob/input.txt && echo changed > tasks/t-9/spec.md",
            "/workspace",
            limit,
        )
        .await
        .unwrap();
    let output = String::from_utf8_lossy(&run.output).into_owned();
    assert_eq!(run.exit_code, Some(0), "{output}");
    assert!(output.contains("count the words"), "{output}");
    assert!(
        !output.contains("carol"),
        "only bob's folders are in his workspace: {output}"
    );
    // Results are stored; a deletion is carried; the task's spec is not the Worker's to change.
    let count = storage
        .get_bytes(&path("tasks/t-9/count.txt"), 1024)
        .await
        .unwrap();
    assert_eq!(&count[..], b"3\n");
    assert!(storage.head(&path("agents/bob/input.txt")).await.is_err());
    let spec = storage
        .get_bytes(&path("tasks/t-9/spec.md"), 1024)
        .await
        .unwrap();
    assert_eq!(&spec[..], b"count the words");
    assert!(
        run.sync_notes
            .iter()
            .any(|note| note.contains("tasks/t-9/spec.md")),
        "{:?}",
        run.sync_notes
    );

    // A file changed in storage between two commands is seen by the next one.
    storage
        .put_bytes(&path("agents/bob/input.txt"), "now four words here")
        .await
        .unwrap();
    let run = sandboxes
        .run(
            &bob,
            "wc -w < /workspace/agents/bob/input.txt",
            "/workspace",
            limit,
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.output).trim(), "4");
}

/// Removes what a library-level test's sandboxes made.
struct SandboxesCleanup<'a>(&'a matrix_crew::sandbox::Sandboxes);

impl Drop for SandboxesCleanup<'_> {
    fn drop(&mut self) {
        let sandboxes = self.0;
        let _ = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Runtime::new()
                        .unwrap()
                        .block_on(sandboxes.remove_all())
                })
                .join()
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_container_stops_unless_a_command_runs_or_its_worker_has_work() {
    use matrix_crew::sandbox::{SandboxConfig, SandboxWorker, Sandboxes};
    use matrix_crew::storage::{Backend, LocalBackend, Storage, StoragePrefix};
    sandbox::ensure_image();
    let data_dir = tempfile::tempdir().unwrap();
    let storage = Storage::new(
        Backend::Local(
            LocalBackend::open(&data_dir.path().join("files"))
                .await
                .unwrap(),
        ),
        1 << 20,
    );
    let config = SandboxConfig {
        idle_stop_secs: 0,
        ..SandboxConfig::default()
    };
    let sandboxes = Arc::new(Sandboxes::new(config, storage, data_dir.path()));
    let _cleanup = SandboxesCleanup(&sandboxes);
    let worker = || SandboxWorker {
        name: "dora".into(),
        token: matrix_crew::secret::Secret::new("crewgw_dora".to_owned()),
        folders: vec![StoragePrefix::parse("agents/dora/").unwrap()],
    };
    let limit = Duration::from_secs(60);
    sandboxes
        .run(&worker(), "true", "/workspace", limit)
        .await
        .unwrap();
    let running = || {
        let id = sandbox::containers_of(data_dir.path(), "dora");
        inspect(&id[0])["State"]["Running"] == true
    };
    assert!(running());

    // A task in progress keeps it.
    let stopped = sandboxes.housekeeping(|_| true, |_| true).await.unwrap();
    assert!(stopped.is_empty() && running());

    // So does a command that runs.
    let long = tokio::spawn({
        let sandboxes = sandboxes.clone();
        async move {
            sandboxes
                .run(&worker(), "sleep 3", "/workspace", limit)
                .await
        }
    });
    tools::wait_for("the command to run", WAIT, || async {
        sandboxes.is_running_command("dora").then_some(())
    })
    .await;
    let stopped = sandboxes.housekeeping(|_| false, |_| true).await.unwrap();
    assert!(stopped.is_empty() && running());
    assert_eq!(long.await.unwrap().unwrap().exit_code, Some(0));

    // Idle and without work, it stops; the next command starts it again.
    let stopped = sandboxes.housekeeping(|_| false, |_| true).await.unwrap();
    assert_eq!(stopped, vec!["dora".to_owned()]);
    assert!(!running());
    let run = sandboxes
        .run(&worker(), "echo again", "/workspace", limit)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.output), "again\n");
    assert!(running());

    // A Worker that no longer exists loses its container.
    sandboxes.housekeeping(|_| false, |_| false).await.unwrap();
    assert!(sandbox::containers_of(data_dir.path(), "dora").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_says_how_to_build_it() {
    use matrix_crew::sandbox::{SandboxConfig, SandboxWorker, Sandboxes};
    use matrix_crew::storage::{Backend, LocalBackend, Storage, StoragePrefix};
    let data_dir = tempfile::tempdir().unwrap();
    let storage = Storage::new(
        Backend::Local(
            LocalBackend::open(&data_dir.path().join("files"))
                .await
                .unwrap(),
        ),
        1 << 20,
    );
    let config = SandboxConfig {
        image: "matrix-crew-sandbox-never-built:none".into(),
        ..SandboxConfig::default()
    };
    let sandboxes = Sandboxes::new(config, storage, data_dir.path());
    let _cleanup = SandboxesCleanup(&sandboxes);
    let worker = SandboxWorker {
        name: "eve".into(),
        token: matrix_crew::secret::Secret::new("crewgw_eve".to_owned()),
        folders: vec![StoragePrefix::parse("agents/eve/").unwrap()],
    };
    let error = sandboxes
        .run(&worker, "true", "/workspace", Duration::from_secs(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("matrix-crew-sandbox-never-built:none` is missing")
            && error.contains("crew sandbox build"),
        "{error}"
    );
    let status = sandboxes.status().await;
    assert!(!status.image_present);
}
