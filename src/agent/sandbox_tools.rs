//! A Worker's hands: `run_command` in its sandbox and `http_request` through the gateway.
//!
//! Commands run only in the Worker's Docker container ([`crate::sandbox`]); skill scripts are
//! run the same way, never on crew's host. API calls go to the gateway with the Worker's own
//! consumer token: the gateway's allowlist for that consumer decides which routes it may call,
//! and the real key never reaches the Worker.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::llm_turn::parse_arguments;
use super::registry::Worker;
use super::services::AgentServices;
use crate::llm::Tool;
use crate::sandbox::{CommandRun, SandboxWorker, WORKSPACE};
use crate::storage::access::{agent_folder, agent_path, task_folder, task_path};

/// The tools' definitions offered to the model.
pub fn tools() -> Vec<Tool> {
    vec![
        Tool::function(
            "run_command",
            "Run a shell command in your own sandbox (a Linux container with sh, coreutils, git, curl and python3). \
             Its workspace holds your folder (agents/<you>/) and your tasks' folders (tasks/<id>/); files you write \
             there are saved to file storage after the command. Without network access except the gateway \
             ($CREW_GATEWAY_URL/<route>/..., with `Authorization: Bearer $CREW_GATEWAY_TOKEN`). Run your skills' \
             scripts with it. Returns the exit code and the output.",
            json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "a shell command line, e.g. `python3 fib.py`"},
                    "task": {"type": "string", "description": "run in this task's folder (e.g. t-1); otherwise in your own folder"},
                    "timeout_secs": {"type": "integer", "description": "time limit in seconds"}
                },
                "required": ["command"]
            }),
        ),
        Tool::function(
            "http_request",
            "Call an API through the crew's gateway, by route name (e.g. `github`, or any route the admin added); \
             the gateway adds the real credential. Only the routes you are allowed answer; others answer 403.",
            json!({
                "type": "object",
                "properties": {
                    "route": {"type": "string"},
                    "method": {"type": "string", "description": "GET (default), POST, PUT, PATCH, DELETE"},
                    "path": {"type": "string", "description": "path below the route, e.g. /repos/o/r/issues"},
                    "query": {"type": "object", "description": "query parameters"},
                    "headers": {"type": "object", "description": "extra request headers"},
                    "body": {"description": "request body: a string, or JSON"}
                },
                "required": ["route"]
            }),
        ),
    ]
}

#[derive(Deserialize)]
struct RunArgs {
    command: String,
    task: Option<String>,
    timeout_secs: Option<u64>,
}

/// `run_command` for `worker`, whose tasks are `task_ids`.
pub async fn run_command(
    services: &AgentServices,
    worker: &Worker,
    task_ids: &[String],
    arguments: &str,
) -> String {
    let args: RunArgs = match parse_arguments(arguments) {
        Ok(args) => args,
        Err(error) => return error,
    };
    let config = services.sandboxes.config();
    let task = match args
        .task
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(task) if task_ids.iter().any(|id| id == task) => Some(task.to_owned()),
        Some(task) => return format!("error: {task} is not one of your tasks"),
        None => None,
    };
    let cwd = match &task {
        Some(task) => format!("{WORKSPACE}/tasks/{task}"),
        None => format!("{WORKSPACE}/agents/{}", worker.name),
    };
    let token = match services
        .gateway
        .consumer_token(worker.user_id.localpart())
        .await
    {
        Ok(token) => token,
        Err(error) => return format!("error: cannot get your gateway token: {error}"),
    };
    let mut folders = Vec::new();
    match agent_folder(&worker.name) {
        Ok(folder) => folders.push(folder),
        Err(error) => return format!("error: {error}"),
    }
    folders.extend(task_ids.iter().filter_map(|id| task_folder(id).ok()));
    let sandbox = SandboxWorker {
        name: worker.name.clone(),
        token,
        folders,
    };
    let timeout = args
        .timeout_secs
        .unwrap_or(config.command_timeout_secs)
        .clamp(1, config.max_command_timeout_secs);
    let run = match services
        .sandboxes
        .run(&sandbox, &args.command, &cwd, Duration::from_secs(timeout))
        .await
    {
        Ok(run) => run,
        Err(error) => return format!("error: {error}"),
    };
    report(services, worker, task.as_deref(), timeout, &run).await
}

/// The tool's answer: exit code, output (cut at the limit, kept whole in a file), notes.
async fn report(
    services: &AgentServices,
    worker: &Worker,
    task: Option<&str>,
    timeout: u64,
    run: &CommandRun,
) -> String {
    let limit = services.sandboxes.config().output_limit_bytes;
    let mut answer = match (run.timed_out, run.exit_code) {
        (true, _) => format!(
            "killed at the time limit ({timeout} s), with every process it started; exit code 137\n"
        ),
        (false, Some(code)) => format!("exit code: {code}\n"),
        (false, None) => "exit code: unknown\n".to_owned(),
    };
    let shown = cut_at_char(&run.output, limit);
    answer.push_str("output:\n");
    answer.push_str(&String::from_utf8_lossy(shown));
    if run.total_bytes as usize > shown.len() {
        let name = format!("output/run-{}.txt", crate::clock::now_ms());
        let path = match task {
            Some(task) => task_path(task, &name),
            None => agent_path(&worker.name, &name),
        };
        let kept = match path {
            Ok(path) => services
                .storage
                .put_bytes(&path, run.output.clone())
                .await
                .map(|_| path.to_string())
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let whole = if run.total_bytes > run.output.len() as u64 {
            format!(" (its first {} bytes)", run.output.len())
        } else {
            String::new()
        };
        answer.push_str(&match kept {
            Ok(path) => format!(
                "\n[output cut: {} bytes in all, the first {} shown; the whole output{whole} is in `{path}`]",
                run.total_bytes,
                shown.len()
            ),
            Err(error) => format!(
                "\n[output cut: {} bytes in all, the first {} shown; it could not be saved: {error}]",
                run.total_bytes,
                shown.len()
            ),
        });
    }
    for note in &run.sync_notes {
        answer.push_str(&format!("\n[workspace: {note}]"));
    }
    answer
}

/// At most `limit` bytes of `output`, not ending inside a UTF-8 character.
fn cut_at_char(output: &[u8], limit: usize) -> &[u8] {
    if output.len() <= limit {
        return output;
    }
    let mut end = limit;
    while end > 0 && (output[end] & 0b1100_0000) == 0b1000_0000 {
        end -= 1;
    }
    &output[..end]
}

#[derive(Deserialize)]
struct HttpArgs {
    route: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    query: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    headers: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    body: Option<Value>,
}

/// `http_request`: one call through the gateway with the Worker's token.
pub async fn http_request(services: &AgentServices, worker: &Worker, arguments: &str) -> String {
    let args: HttpArgs = match parse_arguments(arguments) {
        Ok(args) => args,
        Err(error) => return error,
    };
    let gateway = services.gateway.config();
    let Some(base) = gateway.route_url(&args.route) else {
        let names: Vec<&str> = gateway.routes.iter().map(|r| r.name.as_str()).collect();
        return format!(
            "error: the gateway has no route named `{}` (routes: {})",
            args.route,
            names.join(", ")
        );
    };
    let method = args.method.as_deref().unwrap_or("GET").to_uppercase();
    let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return format!("error: `{method}` is not an HTTP method");
    };
    let path = args.path.unwrap_or_default();
    if path.contains("..") {
        return "error: the path may not contain `..`".to_owned();
    }
    let url = format!(
        "{}/{}",
        base.as_str().trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    let token = match services
        .gateway
        .consumer_token(worker.user_id.localpart())
        .await
    {
        Ok(token) => token,
        Err(error) => return format!("error: cannot get your gateway token: {error}"),
    };
    let mut request = http_client()
        .request(method, url.trim_end_matches('/'))
        .bearer_auth(token.expose())
        .timeout(Duration::from_secs(120));
    if let Some(query) = &args.query {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(key, value)| (key.clone(), plain(value)))
            .collect();
        request = request.query(&pairs);
    }
    for (name, value) in args.headers.iter().flatten() {
        // The gateway authenticates the Worker by this header; the model does not set it.
        if name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("host") {
            continue;
        }
        request = request.header(name.as_str(), plain(value));
    }
    request = match args.body {
        None | Some(Value::Null) => request,
        Some(Value::String(text)) => request.body(text),
        Some(json) => request.json(&json),
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return format!("error: the gateway did not answer: {error}"),
    };
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return format!("error: reading the answer: {error}"),
    };
    let limit = services.sandboxes.config().output_limit_bytes;
    let shown = cut_at_char(&body, limit);
    let mut answer = format!(
        "status: {}\ncontent-type: {content_type}\n\n{}",
        status.as_u16(),
        String::from_utf8_lossy(shown)
    );
    if body.len() > shown.len() {
        answer.push_str(&format!(
            "\n[answer cut: {} bytes in all, the first {} shown; use run_command with curl to save a large answer]",
            body.len(),
            shown.len()
        ));
    }
    answer
}

/// Sets the gateway routes `worker` may call (the Manager does this for an admin when it
/// creates the Worker); the other limits stay the configured defaults. Returns the routes.
pub async fn grant_routes(
    services: &AgentServices,
    worker: &Worker,
    routes: &[String],
) -> Result<Vec<String>, String> {
    let gateway = services.gateway.config();
    let mut allowed: Vec<String> = Vec::new();
    for route in routes {
        let route = route.trim();
        if !gateway.routes.iter().any(|known| known.name == route) {
            let names: Vec<&str> = gateway.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(format!(
                "error: the gateway has no route named `{route}` (routes: {})",
                names.join(", ")
            ));
        }
        allowed.push(route.to_owned());
    }
    // Its own LLM stays reachable, or it could not think.
    let llm = services.llm_route.clone();
    if !allowed.contains(&llm) {
        allowed.push(llm);
    }
    let policy = crate::gateway::config::ConsumerPolicy {
        allowed_routes: allowed.clone(),
        ..gateway.consumer_defaults.clone()
    };
    services
        .gateway
        .add_consumer(worker.user_id.localpart(), Some(policy))
        .await
        .map_err(|error| format!("error: cannot set its routes: {error}"))?;
    Ok(allowed)
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn http_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_between_characters() {
        let text = "aé".as_bytes(); // a, then two bytes
        assert_eq!(cut_at_char(text, 2), b"a");
        assert_eq!(cut_at_char(text, 3), text);
    }
}
