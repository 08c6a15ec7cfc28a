//! The credential gateway and the LLM client, end to end over loopback HTTP.
//!
//! Every test starts a real gateway (with a real sled store on disk) in front of the scripted
//! OpenAI-compatible upstream, and talks to it with a real HTTP client. Time-dependent rules
//! (rates, budgets, grace periods, timeouts, retries) run with paused tokio time, never sleeps.

#[path = "support/scripted_llm.rs"]
mod scripted_llm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use matrix_crew::gateway::{
    ConsumerPolicy, Gateway, GatewayConfig, Injection, RouteConfig, RouteKind, SecretSource,
};
use matrix_crew::llm::{
    ChatRequest, LlmClient, LlmConfig, LlmError, Message, ResponseFormat, Tool,
};
use matrix_crew::store::Store;
use reqwest::StatusCode;
use scripted_llm::{Gate, Reply, ScriptedLlm};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const REAL_KEY: &str = "sk-REAL-llm-key-3f9a1c77d2e04b58";
const FAILOVER_KEY: &str = "sk-REAL-failover-key-a0b1c2d3e4f5";
const GITHUB_KEY: &str = "ghp_REALgithubKEY1234567890abcdef";
const LLM_KEY_VAR: &str = "CREW_TEST_LLM_KEY";
const FAILOVER_KEY_VAR: &str = "CREW_TEST_FAILOVER_KEY";

fn env(name: &str) -> Option<String> {
    match name {
        LLM_KEY_VAR => Some(REAL_KEY.into()),
        FAILOVER_KEY_VAR => Some(FAILOVER_KEY.into()),
        _ => None,
    }
}

/// Everything every test logged, at debug level, for the secret scan.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .init();
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Harness {
    upstream: ScriptedLlm,
    gateway: Arc<Gateway>,
    store: Store,
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn config_for(upstream: &ScriptedLlm, dir: &Path) -> GatewayConfig {
    let github_key = dir.join("github.key");
    std::fs::write(&github_key, format!("{GITHUB_KEY}\n")).unwrap();
    GatewayConfig {
        routes: vec![
            RouteConfig {
                name: "llm".into(),
                prefix: "/llm".into(),
                upstream: format!("{}/v1", upstream.url()).parse().unwrap(),
                kind: RouteKind::Openai,
                inject: Injection::default(),
                credentials: vec![SecretSource::Env(LLM_KEY_VAR.into())],
                endpoints: None,
                forward_headers: vec![],
                set_headers: Default::default(),
            },
            RouteConfig {
                name: "github".into(),
                prefix: "/github".into(),
                upstream: format!("{}/gh", upstream.url()).parse().unwrap(),
                kind: RouteKind::Http,
                inject: Injection {
                    header: "Authorization".into(),
                    format: "token {key}".into(),
                },
                credentials: vec![SecretSource::File(github_key)],
                endpoints: None,
                forward_headers: vec![],
                set_headers: Default::default(),
            },
        ],
        ..GatewayConfig::default()
    }
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        logs();
        let upstream = ScriptedLlm::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(&upstream, dir.path());
        tweak(&mut config);
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (gateway, base, cancel, server) = serve(config, store.clone(), dir.path()).await;
        Self {
            upstream,
            gateway,
            store,
            base,
            http: reqwest::Client::new(),
            dir,
            cancel,
            server,
        }
    }

    /// For tests with paused time: the gateway serves on the test's runtime (`threads = 0`), so
    /// that its clock (rates, budgets, grace periods, timeouts) is the one the test advances.
    async fn start_on_test_clock(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start(|config| {
            config.threads = 0;
            tweak(config);
        })
        .await
    }

    async fn stop(self) -> (ScriptedLlm, tempfile::TempDir) {
        self.cancel.cancel();
        self.server.await.unwrap().unwrap();
        (self.upstream, self.dir)
    }

    async fn token(&self, agent: &str) -> String {
        self.gateway
            .consumer_token(agent)
            .await
            .unwrap()
            .expose()
            .to_owned()
    }

    /// A consumer with its own policy.
    async fn consumer(&self, agent: &str, policy: ConsumerPolicy) -> String {
        let (_, token) = self
            .gateway
            .add_consumer(agent, Some(policy))
            .await
            .unwrap();
        token.expose().to_owned()
    }

    async fn chat(&self, token: Option<&str>, body: Value) -> Answer {
        self.post("/llm/chat/completions", token, body).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Answer {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    fn llm(&self, token: &str) -> LlmClient {
        LlmClient::new(
            &format!("{}/llm", self.base).parse().unwrap(),
            matrix_crew::secret::Secret::new(token),
            LlmConfig {
                initial_backoff_ms: 1000,
                max_backoff_ms: 10_000,
                max_retries: 3,
                ..LlmConfig::default()
            },
        )
        .unwrap()
    }
}

async fn serve(
    config: GatewayConfig,
    store: Store,
    data_dir: &Path,
) -> (
    Arc<Gateway>,
    String,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let gateway = Gateway::with_env(config, store, data_dir, &env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let server = tokio::spawn(Arc::clone(&gateway).serve(listener, cancel.clone()));
    (gateway, base, cancel, server)
}

/// A consumer's view of one answer.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        Self {
            status,
            headers,
            text,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// Asserts a gateway refusal: status, code, a message, and no secret anywhere.
    fn assert_refused(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "answer: {}", self.text);
        let json = self.json();
        assert_eq!(json["error"]["code"], code, "answer: {}", self.text);
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "a refusal says why: {}",
            self.text
        );
        self.assert_no_real_key();
    }

    fn assert_no_real_key(&self) {
        let mut everything = self.text.clone();
        for (name, value) in &self.headers {
            everything.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        for key in [REAL_KEY, FAILOVER_KEY, GITHUB_KEY] {
            assert!(!everything.contains(key), "the consumer saw a real key");
        }
    }

    fn retry_after(&self) -> u64 {
        self.headers
            .get("retry-after")
            .expect("a 429 carries Retry-After")
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

fn policy() -> ConsumerPolicy {
    ConsumerPolicy::default()
}

/// All files under `dir`, concatenated.
fn read_all_files(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend_from_slice(&bytes);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn upstream_sees_the_real_key_and_never_the_consumer_token() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;

    let response = h
        .http
        .post(format!("{}/llm/chat/completions?trace=1", h.base))
        .bearer_auth(&token)
        .header("x-api-key", &token)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    let answer = Answer::read(response).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "ok");
    answer.assert_no_real_key();

    let github = h
        .http
        .get(format!("{}/github/repos/x/y", h.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(github.status(), 200);

    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/v1/chat/completions?trace=1");
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {REAL_KEY}"))
    );
    assert_eq!(seen[0].json()["model"], "gpt-4o-mini");
    assert_eq!(seen[1].path, "/gh/repos/x/y");
    assert_eq!(seen[1].method, "GET");
    assert_eq!(
        seen[1].header("authorization"),
        Some(&*format!("token {GITHUB_KEY}"))
    );
    for request in &seen {
        assert!(
            !request.everything().contains(&token),
            "the upstream saw the consumer token"
        );
        assert!(request.header("x-api-key").is_none());
    }

    // An upstream that echoes the key in an error: the consumer gets it cut out.
    h.upstream.push(Reply::error_body(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {REAL_KEY}."), "code": "invalid_api_key"}}),
    ));
    let echoed = h.chat(Some(&token), chat_body("gpt-4o-mini")).await;
    assert_eq!(echoed.status, 401);
    assert!(
        echoed
            .text
            .contains("Incorrect API key provided: [redacted].")
    );
    echoed.assert_no_real_key();
    h.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_status_code_and_reason() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    let restricted = h
        .consumer(
            "agent-restricted",
            ConsumerPolicy {
                allowed_routes: vec!["llm".into()],
                allowed_models: vec!["small-model".into()],
                ..policy()
            },
        )
        .await;

    h.chat(None, chat_body("m"))
        .await
        .assert_refused(401, "missing_token");
    h.chat(Some("crewgw_not-a-real-token"), chat_body("m"))
        .await
        .assert_refused(401, "invalid_token");
    h.post("/nowhere/x", Some(&token), json!({}))
        .await
        .assert_refused(404, "unknown_route");
    h.post("/github/user", Some(&restricted), json!({}))
        .await
        .assert_refused(403, "route_not_allowed");
    h.chat(Some(&restricted), chat_body("big-model"))
        .await
        .assert_refused(403, "model_not_allowed");
    h.chat(Some(&restricted), json!({"messages": []}))
        .await
        .assert_refused(400, "model_required");
    let allowed = h.chat(Some(&restricted), chat_body("small-model")).await;
    assert_eq!(allowed.status, 200);

    // Upstream errors pass through as they are (minus any key), and are not gateway refusals.
    h.upstream
        .push(Reply::error(400, "invalid_request_error", "bad messages"));
    let passed = h.chat(Some(&token), chat_body("m")).await;
    assert_eq!(passed.status, 400);
    assert_eq!(passed.json()["error"]["code"], "invalid_request_error");

    // Only forwarded requests reached the upstream.
    assert_eq!(h.upstream.requests().len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h = Harness::start(|config| {
        config.routes[0].upstream = format!("http://127.0.0.1:{port}/v1").parse().unwrap();
    })
    .await;
    let token = h.token("agent-a").await;
    h.chat(Some(&token), chat_body("m"))
        .await
        .assert_refused(502, "upstream_unavailable");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_504() {
    let h = Harness::start_on_test_clock(|config| config.upstream_timeout_secs = 30).await;
    let token = h.token("agent-a").await;
    let gate = Gate::new();
    h.upstream.push(Reply::text("late").hold(&gate));
    let started = tokio::time::Instant::now();
    let answer = h.chat(Some(&token), chat_body("m")).await;
    answer.assert_refused(504, "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_secs(30));
    gate.release();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn request_rate_is_limited_per_consumer() {
    let h = Harness::start_on_test_clock(|_| {}).await;
    let limited = h
        .consumer(
            "agent-a",
            ConsumerPolicy {
                requests_per_minute: 2,
                ..policy()
            },
        )
        .await;
    let other = h.token("agent-b").await;

    assert_eq!(h.chat(Some(&limited), chat_body("m")).await.status, 200);
    assert_eq!(h.chat(Some(&limited), chat_body("m")).await.status, 200);
    let refused = h.chat(Some(&limited), chat_body("m")).await;
    refused.assert_refused(429, "rate_limited");
    let wait = refused.retry_after();
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    assert_eq!(h.chat(Some(&other), chat_body("m")).await.status, 200);

    tokio::time::advance(Duration::from_secs(wait)).await;
    assert_eq!(h.chat(Some(&limited), chat_body("m")).await.status, 200);
    assert_eq!(h.upstream.requests().len(), 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_daily_token_budget_is_charged_and_renews() {
    let h = Harness::start_on_test_clock(|_| {}).await;
    let token = h
        .consumer(
            "agent-a",
            ConsumerPolicy {
                daily_token_budget: 20,
                ..policy()
            },
        )
        .await;
    h.upstream.set_default(Reply::text("ok").usage(10, 5));

    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    // A streamed answer is charged too (the gateway asked for the usage chunk, and kept it
    // from this consumer, which did not ask for it).
    let streamed = h
        .chat(
            Some(&token),
            json!({"model": "m", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(streamed.status, 200);
    assert!(!streamed.text.contains("\"usage\""), "{}", streamed.text);
    let usage = h.gateway.usage().unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].usage.total_tokens, 30);
    assert_eq!(usage[0].usage.requests, 2);

    let refused = h.chat(Some(&token), chat_body("m")).await;
    refused.assert_refused(429, "budget_exhausted");
    let wait = refused.retry_after();
    assert!((1..=86_400).contains(&wait));
    assert_eq!(
        h.upstream.requests().len(),
        2,
        "a refused request is not forwarded"
    );

    tokio::time::advance(Duration::from_secs(wait)).await;
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    assert_eq!(
        h.gateway.usage().unwrap().len(),
        2,
        "a new day has its own row"
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_requests_are_limited() {
    let h = Harness::start(|_| {}).await;
    let token = h
        .consumer(
            "agent-a",
            ConsumerPolicy {
                max_concurrent: 1,
                ..policy()
            },
        )
        .await;
    let gate = Gate::new();
    h.upstream.push(Reply::text("slow").hold(&gate));
    let first = {
        let http = h.http.clone();
        let url = format!("{}/llm/chat/completions", h.base);
        let token = token.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&chat_body("m"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    gate.reached().await;
    h.chat(Some(&token), chat_body("m"))
        .await
        .assert_refused(429, "rate_limited");
    gate.release();
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rotation_keeps_the_old_token_for_the_grace_period_and_revocation_is_immediate() {
    // A long grace period: under paused time the clock may also jump ahead by a pending timer
    // (e.g. an idle-connection timer) while the store waits for its fsync thread.
    let h = Harness::start_on_test_clock(|config| config.rotation_grace_secs = 86_400).await;
    let old = h.token("agent-a").await;
    assert_eq!(h.chat(Some(&old), chat_body("m")).await.status, 200);

    let (_, new) = h.gateway.rotate("agent-a").await.unwrap();
    let new = new.expose().to_owned();
    assert_ne!(old, new);
    assert_eq!(
        h.token("agent-a").await,
        new,
        "the Manager gets the new token"
    );
    assert_eq!(h.chat(Some(&old), chat_body("m")).await.status, 200);
    assert_eq!(h.chat(Some(&new), chat_body("m")).await.status, 200);

    tokio::time::advance(Duration::from_secs(86_401)).await;
    h.chat(Some(&old), chat_body("m"))
        .await
        .assert_refused(401, "token_expired");
    assert_eq!(h.chat(Some(&new), chat_body("m")).await.status, 200);

    h.gateway.revoke("agent-a").await.unwrap();
    h.chat(Some(&new), chat_body("m"))
        .await
        .assert_refused(401, "token_revoked");
    assert!(h.gateway.consumer_token("agent-a").await.is_err());

    let (_, again) = h.gateway.add_consumer("agent-a", None).await.unwrap();
    let again = again.expose().to_owned();
    assert_ne!(again, new);
    assert_eq!(h.chat(Some(&again), chat_body("m")).await.status, 200);
    // Re-enabling issues a new generation: the tokens from before stay dead.
    h.chat(Some(&new), chat_body("m"))
        .await
        .assert_refused(401, "token_expired");
    h.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_every_agents_token_working() {
    let h = Harness::start(|_| {}).await;
    let agents = ["agent-a", "agent-b", "@worker:example.org"];
    let mut tokens = Vec::new();
    for agent in agents {
        tokens.push(h.token(agent).await);
    }
    let (_, rotated) = h.gateway.rotate("agent-b").await.unwrap();
    tokens[1] = rotated.expose().to_owned();
    for token in &tokens {
        assert_eq!(h.chat(Some(token), chat_body("m")).await.status, 200);
    }
    let secret_file = h.dir.path().join("gateway.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let upstream_url = h.upstream.url();
    let Harness {
        gateway,
        store,
        cancel,
        server,
        upstream,
        dir,
        ..
    } = h;
    cancel.cancel();
    server.await.unwrap().unwrap();
    store.flush().await.unwrap();
    drop(gateway);
    drop(store);

    // A new process: the store is re-opened, the secret re-read.
    let store = Store::open(&dir.path().join("db")).unwrap();
    let mut config = config_for(&upstream, dir.path());
    config.routes[0].upstream = format!("{upstream_url}/v1").parse().unwrap();
    let (gateway, base, cancel, server) = serve(config, store, dir.path()).await;
    let http = reqwest::Client::new();
    for (agent, token) in agents.iter().zip(&tokens) {
        assert_eq!(
            gateway.consumer_token(agent).await.unwrap().expose(),
            token,
            "{agent} gets the same token again"
        );
        let answer = Answer::read(
            http.post(format!("{base}/llm/chat/completions"))
                .bearer_auth(token)
                .json(&chat_body("m"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 200, "{agent}: {}", answer.text);
    }
    cancel.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn streamed_chunks_reach_the_consumer_before_the_upstream_finishes() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    let gate = Gate::new();
    // Events: role, "one ", "two ", then the upstream stops until released.
    h.upstream.push(
        Reply::text("one two three four")
            .usage(7, 4)
            .hold_after(3, &gate),
    );
    let response = h
        .http
        .post(format!("{}/llm/chat/completions", h.base))
        .bearer_auth(&token)
        .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "count"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("two ") {
        let chunk = body.next().await.expect("more chunks").unwrap();
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        !received.contains("three"),
        "the upstream has not sent it yet"
    );
    gate.release();
    while let Some(chunk) = body.next().await {
        received.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(received.contains("four"));
    assert!(received.trim_end().ends_with("data: [DONE]"));

    // The gateway asked for usage, and charged it.
    let seen = h.upstream.requests();
    assert_eq!(seen[0].json()["stream_options"]["include_usage"], true);
    let usage = h.gateway.usage().unwrap();
    assert_eq!(usage[0].usage.total_tokens, 11);
    let audit = h.gateway.audit_log(10).unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.consumer.as_deref(), Some("agent-a"));
    assert_eq!(last.route.as_deref(), Some("llm"));
    assert_eq!(last.model.as_deref(), Some("m"));
    assert_eq!(last.status, 200);
    assert_eq!(last.total_tokens, 11);
    h.stop().await;
}

#[tokio::test]
async fn a_stream_that_opts_out_of_usage_is_still_charged() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    h.upstream.push(Reply::text("a b c").usage(20, 7));
    let answer = h
        .chat(
            Some(&token),
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": false}, "messages": []}),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.text.contains("[DONE]"), "{}", answer.text);
    assert_eq!(
        h.upstream.requests()[0].json()["stream_options"]["include_usage"],
        true,
        "metering cannot be opted out of"
    );
    assert!(
        !answer.text.contains("\"usage\""),
        "the consumer did not ask for the usage chunk: {}",
        answer.text
    );
    let usage = h.gateway.usage().unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].usage.total_tokens, 27);

    // Nor when it did not mention usage at all; a consumer that asked for it gets it.
    h.upstream.push(Reply::text("d e").usage(5, 2));
    let answer = h
        .chat(
            Some(&token),
            json!({"model": "m", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.text.contains("\"e\""), "{}", answer.text);
    assert!(
        answer.text.trim_end().ends_with("data: [DONE]"),
        "{}",
        answer.text
    );
    assert!(!answer.text.contains("\"usage\""), "{}", answer.text);
    h.upstream.push(Reply::text("f g").usage(5, 2));
    let answer = h
        .chat(
            Some(&token),
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
        )
        .await;
    assert!(
        answer.text.contains("\"total_tokens\":7"),
        "{}",
        answer.text
    );
    let usage = h.gateway.usage().unwrap();
    assert_eq!(usage[0].usage.total_tokens, 27 + 7 + 7);
    h.stop().await;
}

#[tokio::test]
async fn a_consumer_that_hangs_up_before_the_answer_is_charged_an_estimate() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-impatient").await;
    let gate = Gate::new();
    h.upstream.push(Reply::text("late").hold(&gate));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4000)}]});
    let url = format!("{}/llm/chat/completions", h.base);
    let http = h.http.clone();
    let request =
        tokio::spawn(async move { http.post(url).bearer_auth(token).json(&body).send().await });
    // The upstream has the request (and is working on it) when the consumer hangs up.
    gate.reached().await;
    request.abort();
    let charged = wait_until("the abandoned request to be charged", || {
        let usage = h.gateway.usage().unwrap();
        usage
            .iter()
            .find(|row| row.consumer == "agent-impatient" && row.usage.requests == 1)
            .map(|row| row.usage.clone())
    })
    .await;
    assert!(
        charged.prompt_tokens >= 1000,
        "an estimate from the 4 kB prompt: {charged:?}"
    );
    let last = h.gateway.audit_log(10).unwrap().pop().unwrap();
    assert_eq!(last.code.as_deref(), Some("consumer_went_away"));
    gate.release();
    h.stop().await;
}

/// Polls `check` until it gives a value; fails after a deadline.
async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one request exactly as written (no client-side normalisation of the path) and returns
/// the status and body.
async fn raw_request(base: &str, method: &str, path: &str, token: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The refusals of unlisted endpoints are tried against the real binary (tests/authority.rs);
/// here: a route that lists DELETE allows it, and then only what it lists.
#[tokio::test]
async fn an_openai_route_allows_exactly_the_endpoints_it_lists() {
    let h = Harness::start(|config| {
        config.routes[0].endpoints = Some(vec!["DELETE /files/*".into()]);
    })
    .await;
    let token = h.token("agent-a").await;
    let (status, _) = raw_request(&h.base, "DELETE", "/llm/files/file-abc", &token).await;
    assert_eq!(status, 200);
    let (status, _) = raw_request(&h.base, "POST", "/llm/chat/completions", &token).await;
    assert_eq!(status, 403);
    h.stop().await;
}

#[tokio::test]
async fn a_masked_key_in_an_upstream_error_is_cut_out() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    let masked = format!(
        "{}****************{}",
        &REAL_KEY[..8],
        &REAL_KEY[REAL_KEY.len() - 4..]
    );
    h.upstream.push(Reply::error_body(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {masked}.")}}),
    ));
    let answer = h.chat(Some(&token), chat_body("m")).await;
    assert_eq!(answer.status, 401);
    assert!(!answer.text.contains(&REAL_KEY[..8]), "{}", answer.text);
    assert!(
        !answer.text.contains(&REAL_KEY[REAL_KEY.len() - 4..]),
        "{}",
        answer.text
    );
    assert!(answer.text.contains("[redacted]"), "{}", answer.text);
    h.stop().await;
}

#[tokio::test]
async fn unauthenticated_refusals_are_counted_but_never_stored() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    let audited = h.gateway.audit_log(1000).unwrap().len();
    for n in 0..50 {
        let token = format!("crewgw_guess-{n}");
        h.chat(Some(&token), chat_body("m"))
            .await
            .assert_refused(401, "invalid_token");
    }
    h.chat(None, chat_body("m"))
        .await
        .assert_refused(401, "missing_token");
    assert_eq!(h.gateway.unauthenticated_refusals(), 51);
    assert_eq!(
        h.gateway.audit_log(1000).unwrap().len(),
        audited,
        "nothing was written for them"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_global_budget_caps_all_consumers_and_says_so() {
    let h = Harness::start_on_test_clock(|config| config.global_daily_token_budget = 40).await;
    let a = h.token("agent-a").await;
    let b = h.token("agent-b").await;
    h.upstream.set_default(Reply::text("ok").usage(15, 10));
    assert_eq!(h.chat(Some(&a), chat_body("m")).await.status, 200);
    assert_eq!(h.chat(Some(&b), chat_body("m")).await.status, 200);
    for token in [&a, &b] {
        let refused = h.chat(Some(token), chat_body("m")).await;
        refused.assert_refused(429, "global_budget_exhausted");
        let message = refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("gateway.global_daily_token_budget") && message.contains("40"),
            "{message}"
        );
    }
    // Agents get it as a budget error (not retried) that names the limit.
    let error = h
        .llm(&a)
        .chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::BudgetExhausted { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("gateway.global_daily_token_budget"),
        "{error}"
    );
    assert_eq!(h.upstream.requests().len(), 2);
    // The next UTC day renews it.
    tokio::time::advance(Duration::from_secs(86_400)).await;
    assert_eq!(h.chat(Some(&a), chat_body("m")).await.status, 200);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_budget_check_counts_the_requests_max_tokens() {
    let h = Harness::start_on_test_clock(|_| {}).await;
    let token = h
        .consumer(
            "agent-small",
            ConsumerPolicy {
                daily_token_budget: 100,
                ..policy()
            },
        )
        .await;
    h.upstream.set_default(Reply::text("ok").usage(10, 5));
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    // 15 used: a request that may use 90 more would overshoot the 100.
    let mut asks_too_much = chat_body("m");
    asks_too_much["max_tokens"] = json!(90);
    let refused = h.chat(Some(&token), asks_too_much).await;
    refused.assert_refused(429, "budget_exhausted");
    assert!(refused.text.contains("max_tokens"), "{}", refused.text);
    let mut fits = chat_body("m");
    fits["max_completion_tokens"] = json!(80);
    assert_eq!(h.chat(Some(&token), fits).await.status, 200);
    h.stop().await;
}

#[tokio::test]
async fn a_refused_key_fails_over_to_the_next() {
    let h = Harness::start(|config| {
        config.routes[0]
            .credentials
            .push(SecretSource::Env(FAILOVER_KEY_VAR.into()));
        config.key_failure_threshold = 1;
    })
    .await;
    let token = h.token("agent-a").await;
    h.upstream
        .push(Reply::error(429, "insufficient_quota", "quota exceeded"));
    let answer = h.chat(Some(&token), chat_body("m")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {REAL_KEY}"))
    );
    assert_eq!(
        seen[1].header("authorization"),
        Some(&*format!("Bearer {FAILOVER_KEY}"))
    );
    // The failed key is resting: the next request goes straight to the failover key.
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    let seen = h.upstream.requests();
    assert_eq!(
        seen[2].header("authorization"),
        Some(&*format!("Bearer {FAILOVER_KEY}"))
    );
    h.stop().await;
}

#[tokio::test]
async fn the_llm_client_calls_tools_streams_and_uses_json_mode_through_the_gateway() {
    let h = Harness::start(|_| {}).await;
    let token = h.token("agent-a").await;
    let llm = h.llm(&token);
    let tool = Tool::function(
        "send_message",
        "Send a message to the room",
        json!({"type": "object", "properties": {"text": {"type": "string"}}}),
    );

    h.upstream.push(Reply::tool_call(
        "call_1",
        "send_message",
        json!({"text": "hi all"}),
    ));
    let mut request = ChatRequest::new("gpt-4o-mini", vec![Message::user("greet the room")]);
    request.tools = vec![tool.clone()];
    let answer = llm.chat(request.clone()).await.unwrap();
    let call = &answer.message().unwrap().tool_calls[0];
    assert_eq!(call.id, "call_1");
    assert_eq!(call.function.name, "send_message");
    assert_eq!(
        serde_json::from_str::<Value>(&call.function.arguments).unwrap(),
        json!({"text": "hi all"})
    );
    let sent = h.upstream.requests()[0].json();
    assert_eq!(sent["tools"][0]["function"]["name"], "send_message");
    assert!(sent.get("stream").is_none());

    // The same, streamed: the tool call arrives in pieces and is assembled.
    h.upstream.push(Reply::tool_call(
        "call_2",
        "send_message",
        json!({"text": "streamed"}),
    ));
    let streamed = llm.chat_stream(request.clone(), |_| {}).await.unwrap();
    let message = streamed.message().unwrap();
    assert_eq!(message.tool_calls[0].id, "call_2");
    assert_eq!(
        serde_json::from_str::<Value>(&message.tool_calls[0].function.arguments).unwrap(),
        json!({"text": "streamed"})
    );
    assert_eq!(
        streamed.choices[0].finish_reason.as_deref(),
        Some("tool_calls")
    );

    // The answer to the tool, then streamed text piece by piece.
    let mut follow_up = request.clone();
    follow_up.messages.push(message.clone());
    follow_up
        .messages
        .push(Message::tool_result("call_2", "sent"));
    h.upstream
        .push(Reply::text("Done, I greeted everyone.").usage(30, 6));
    let mut pieces = Vec::new();
    let text = llm
        .chat_stream(follow_up, |piece| pieces.push(piece.to_owned()))
        .await
        .unwrap();
    assert_eq!(
        text.message().unwrap().content.as_deref(),
        Some("Done, I greeted everyone.")
    );
    assert!(pieces.len() > 2, "text arrived in pieces: {pieces:?}");
    assert_eq!(text.usage.unwrap().total_tokens, 36);
    let sent = h.upstream.requests()[2].json();
    assert_eq!(sent["messages"][2]["role"], "tool");
    assert_eq!(sent["messages"][2]["tool_call_id"], "call_2");
    assert_eq!(sent["messages"][1]["tool_calls"][0]["id"], "call_2");

    // JSON mode.
    h.upstream.push(Reply::text(r#"{"ok": true}"#));
    let mut json_request = ChatRequest::new("gpt-4o-mini", vec![Message::user("as JSON")]);
    json_request.response_format = Some(ResponseFormat::JsonObject);
    let answer = llm.chat(json_request).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(answer.message().unwrap().content.as_deref().unwrap())
            .unwrap(),
        json!({"ok": true})
    );
    assert_eq!(
        h.upstream.requests()[3].json()["response_format"],
        json!({"type": "json_object"})
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_llm_client_retries_429_and_5xx_with_backoff() {
    let h = Harness::start_on_test_clock(|_| {}).await;
    let token = h.token("agent-a").await;
    let llm = h.llm(&token);
    h.upstream.push(Reply::error(500, "server_error", "boom"));
    h.upstream
        .push(Reply::error(429, "rate_limit_exceeded", "slow down").retry_after(5));
    h.upstream.push(Reply::error(503, "overloaded", "busy"));
    let started = tokio::time::Instant::now();
    let answer = llm
        .chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap();
    assert_eq!(answer.message().unwrap().content.as_deref(), Some("ok"));
    assert_eq!(h.upstream.requests().len(), 4);
    // 1 s (±20 %), then at least the 5 s Retry-After, then 4 s (±20 %).
    assert!(started.elapsed() >= Duration::from_millis(800 + 5000 + 3200));

    // Streams retry too, before the first chunk.
    h.upstream.push(Reply::error(502, "bad_gateway", "down"));
    let streamed = llm
        .chat_stream(ChatRequest::new("m", vec![Message::user("hi")]), |_| {})
        .await
        .unwrap();
    assert_eq!(streamed.message().unwrap().content.as_deref(), Some("ok"));

    // And give up with a reason after max_retries.
    for _ in 0..4 {
        h.upstream
            .push(Reply::error(500, "server_error", "still broken"));
    }
    let error = llm
        .chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::GaveUp { attempts: 4, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("still broken"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_llm_client_does_not_retry_budget_exhausted() {
    let h = Harness::start_on_test_clock(|_| {}).await;
    let token = h
        .consumer(
            "agent-a",
            ConsumerPolicy {
                daily_token_budget: 10,
                ..policy()
            },
        )
        .await;
    let llm = h.llm(&token);
    llm.chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap();
    let error = llm
        .chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap_err();
    match &error {
        LlmError::BudgetExhausted {
            retry_after_secs, ..
        } => assert!(retry_after_secs.is_some()),
        other => panic!("expected BudgetExhausted, got {other:?}"),
    }
    assert!(error.to_string().contains("budget"));
    assert_eq!(h.upstream.requests().len(), 1);

    // A revoked agent gets a clear, non-retried error as well.
    h.gateway.revoke("agent-a").await.unwrap();
    let error = llm
        .chat(ChatRequest::new("m", vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert!(matches!(error, LlmError::Unauthorized { ref code, .. } if code == "token_revoked"));
    h.stop().await;
}

#[tokio::test]
async fn the_operator_cli_manages_consumers_through_the_admin_endpoint() {
    use clap::Parser;
    use matrix_crew::gateway::cli::GatewayCommand;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: GatewayCommand,
    }

    let h = Harness::start(|_| {}).await;
    let admin_token = matrix_crew::secret::Secret::random(16);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap();
    let admin_cancel = CancellationToken::new();
    let admin_server = tokio::spawn(matrix_crew::admin::serve(
        listener,
        admin_token.clone(),
        axum::Router::new().nest(
            "/gateway",
            matrix_crew::gateway::admin_router(Arc::clone(&h.gateway)),
        ),
        admin_cancel.clone(),
    ));
    let data_dir = h.dir.path().join("admin-data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("admin.token"), admin_token.expose()).unwrap();
    let config: matrix_crew::config::Config = toml::from_str(&format!(
        "data_dir = {:?}\n[homeserver]\nurl = \"http://127.0.0.1:1\"\nserver_name = \"example.org\"\n[admin_api]\nbind = \"{admin_addr}\"\n",
        data_dir.display().to_string()
    ))
    .unwrap();
    let admin = matrix_crew::admin::AdminClient::from_config(&config).unwrap();
    let run = |args: &[&str]| {
        let mut argv = vec!["gateway"];
        argv.extend_from_slice(args);
        Cli::parse_from(argv).command.run(&admin)
    };

    let added = run(&[
        "consumers",
        "add",
        "ops-bot",
        "--route",
        "llm",
        "--rpm",
        "5",
    ])
    .await
    .unwrap();
    let token = added
        .lines()
        .find_map(|line| line.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    assert!(token.starts_with("crewgw_"));
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    h.post("/github/x", Some(&token), json!({}))
        .await
        .assert_refused(403, "route_not_allowed");

    let listed = run(&["consumers", "list"]).await.unwrap();
    assert!(listed.contains("ops-bot"));
    assert!(listed.contains("active"));
    assert!(!listed.contains(&token), "list never prints tokens");

    let rotated = run(&["consumers", "rotate", "ops-bot"]).await.unwrap();
    assert!(rotated.contains("generation 1"));
    let usage = run(&["usage"]).await.unwrap();
    assert!(usage.contains("ops-bot"), "{usage}");
    assert!(usage.contains("15"), "tokens are listed: {usage}");

    let revoked = run(&["consumers", "revoke", "ops-bot"]).await.unwrap();
    assert!(revoked.contains("revoked ops-bot"));
    h.chat(Some(&token), chat_body("m"))
        .await
        .assert_refused(401, "token_revoked");
    let unknown = run(&["consumers", "rotate", "nobody"]).await.unwrap_err();
    assert!(unknown.to_string().contains("no gateway consumer `nobody`"));

    admin_cancel.cancel();
    admin_server.await.unwrap().unwrap();
    h.stop().await;
}

#[tokio::test]
async fn no_real_key_or_consumer_token_is_logged_or_stored() {
    let h = Harness::start(|config| {
        config.routes[0]
            .credentials
            .push(SecretSource::Env(FAILOVER_KEY_VAR.into()));
    })
    .await;
    let token = h.token("agent-scan").await;
    let restricted = h
        .consumer(
            "agent-scan-restricted",
            ConsumerPolicy {
                allowed_models: vec!["x".into()],
                requests_per_minute: 1,
                ..policy()
            },
        )
        .await;
    // Successes, streams, refusals, upstream errors (one echoing the key), failover.
    assert_eq!(h.chat(Some(&token), chat_body("m")).await.status, 200);
    h.chat(
        Some(&token),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    h.upstream.push(Reply::error_body(
        401,
        json!({"error": {"message": format!("bad key {REAL_KEY}")}}),
    ));
    h.chat(Some(&token), chat_body("m"))
        .await
        .assert_no_real_key();
    h.chat(Some(&restricted), chat_body("y")).await;
    h.chat(Some(&restricted), chat_body("x")).await;
    h.chat(Some(&restricted), chat_body("x")).await;
    h.chat(Some("crewgw_wrong"), chat_body("m")).await;
    h.post("/github/u", Some(&token), json!({})).await;
    h.gateway.rotate("agent-scan").await.unwrap();
    h.gateway.revoke("agent-scan-restricted").await.unwrap();
    h.chat(Some(&restricted), chat_body("x")).await;
    h.store.flush().await.unwrap();
    let audit = h.gateway.audit_log(100).unwrap();
    // Every request with a valid token is audited; the unknown and revoked tokens only counted.
    assert!(audit.len() >= 7, "every request is audited: {audit:?}");
    assert_eq!(h.gateway.unauthenticated_refusals(), 2);
    assert!(
        audit
            .iter()
            .any(|r| r.code.as_deref() == Some("rate_limited"))
    );

    let (_upstream, dir) = h.stop().await;
    let stored = read_all_files(&dir.path().join("db"));
    assert!(!stored.is_empty());
    let logged = logs().lock().unwrap().clone();
    assert!(
        contains(&logged, "gateway request"),
        "the audit log reaches tracing"
    );
    for secret in [REAL_KEY, FAILOVER_KEY, GITHUB_KEY, &token, &restricted] {
        assert!(!contains(&stored, secret), "a secret is in the database");
        assert!(!contains(&logged, secret), "a secret is in the logs");
    }
}
