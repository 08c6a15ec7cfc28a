//! A scripted OpenAI-compatible upstream: the one stand-in our tests allow.
//!
//! It speaks the real chat-completions wire format on loopback: JSON answers and SSE streams
//! (role chunk, content chunks, tool-call chunks, a finish chunk, a usage chunk when the request
//! asked for `stream_options.include_usage`, then `data: [DONE]`). It records every request it
//! received (method, path, headers, body). Tests choose replies with rules (a matcher over the
//! request body, first match wins), a FIFO queue, or the default reply. A reply can be HELD until
//! the test releases it, before its headers or after some chunks of a stream, so tests can act
//! while the upstream is mid-answer without racing it.
//!
//! Use from any test binary: `#[path = "support/scripted_llm.rs"] mod scripted_llm;`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names lowercased, values as received (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Everything received, as text, for scans.
    pub fn everything(&self) -> String {
        let mut out = format!("{} {}\n", self.method, self.path);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\n"));
        }
        out.push_str(&String::from_utf8_lossy(&self.body));
        out
    }
}

/// A point where a reply waits until the test releases it.
#[derive(Clone)]
pub struct Gate {
    released: Arc<watch::Sender<bool>>,
    reached: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub fn new() -> Self {
        Self {
            released: Arc::new(watch::channel(false).0),
            reached: Arc::new(watch::channel(false).0),
        }
    }

    /// Lets every reply waiting at this gate go on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Waits until a reply has arrived at this gate (and is waiting, or was released).
    pub async fn reached(&self) {
        let mut rx = self.reached.subscribe();
        rx.wait_for(|reached| *reached)
            .await
            .expect("the gate's sender lives as long as the gate");
    }

    async fn pass(&self) {
        self.reached.send_replace(true);
        let mut rx = self.released.subscribe();
        rx.wait_for(|released| *released)
            .await
            .expect("the gate's sender lives as long as the gate");
    }
}

/// What the upstream answers.
#[derive(Clone, Debug)]
pub enum Content {
    /// An assistant text message (streamed word by word).
    Text(String),
    /// Tool calls: (id, function name, JSON arguments as text).
    ToolCalls(Vec<(String, String, String)>),
    /// An error answer with this status and body (and `Retry-After`, if given).
    Error {
        status: u16,
        body: Value,
        retry_after: Option<u64>,
    },
}

/// One scripted reply.
#[derive(Clone)]
pub struct Reply {
    pub content: Content,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Held before the answer starts.
    pub hold_before: Option<Gate>,
    /// For streams: held after this many SSE events were sent.
    pub hold_after_events: Option<(usize, Gate)>,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Content::Text(text.into()))
    }

    /// One tool call.
    pub fn tool_call(id: &str, name: &str, arguments: Value) -> Self {
        Self::new(Content::ToolCalls(vec![(
            id.to_owned(),
            name.to_owned(),
            arguments.to_string(),
        )]))
    }

    pub fn tool_calls(calls: Vec<(String, String, String)>) -> Self {
        Self::new(Content::ToolCalls(calls))
    }

    /// An OpenAI-style error answer.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self::new(Content::Error {
            status,
            body: json!({"error": {"message": message, "type": code, "code": code}}),
            retry_after: None,
        })
    }

    /// An error answer with any body (e.g. one that echoes what it received).
    pub fn error_body(status: u16, body: Value) -> Self {
        Self::new(Content::Error {
            status,
            body,
            retry_after: None,
        })
    }

    fn new(content: Content) -> Self {
        Self {
            content,
            prompt_tokens: 10,
            completion_tokens: 5,
            hold_before: None,
            hold_after_events: None,
        }
    }

    pub fn usage(mut self, prompt: u64, completion: u64) -> Self {
        self.prompt_tokens = prompt;
        self.completion_tokens = completion;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        if let Content::Error { retry_after, .. } = &mut self.content {
            *retry_after = Some(secs);
        }
        self
    }

    /// Waits at `gate` before answering at all.
    pub fn hold(mut self, gate: &Gate) -> Self {
        self.hold_before = Some(gate.clone());
        self
    }

    /// For streams: sends `events` SSE events, then waits at `gate` before the rest.
    pub fn hold_after(mut self, events: usize, gate: &Gate) -> Self {
        self.hold_after_events = Some((events, gate.clone()));
        self
    }
}

type Matcher = Box<dyn Fn(&Value) -> bool + Send + Sync>;

struct Rule {
    matcher: Matcher,
    reply: Reply,
    once: bool,
}

struct Script {
    rules: Vec<Rule>,
    queue: VecDeque<Reply>,
    default: Reply,
    recording: bool,
}

struct Shared {
    script: Mutex<Script>,
    requests: Mutex<Vec<Recorded>>,
    received: watch::Sender<usize>,
}

/// The running scripted upstream. Stops when dropped.
pub struct ScriptedLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedLlm {
    /// Starts on 127.0.0.1 on a free port. The default reply is the text "ok".
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(Script {
                rules: Vec::new(),
                queue: VecDeque::new(),
                default: Reply::text("ok"),
                recording: true,
            }),
            requests: Mutex::new(Vec::new()),
            received: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the scripted LLM");
        let addr = listener.local_addr().expect("scripted LLM address");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .await
                .expect("scripted LLM server");
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (append `/v1` or nothing; every path answers).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers requests whose JSON body satisfies `matcher` with `reply`, every time.
    pub fn on(&self, matcher: impl Fn(&Value) -> bool + Send + Sync + 'static, reply: Reply) {
        self.script().rules.push(Rule {
            matcher: Box::new(matcher),
            reply,
            once: false,
        });
    }

    /// As [`ScriptedLlm::on`], for the first matching request only.
    pub fn once(&self, matcher: impl Fn(&Value) -> bool + Send + Sync + 'static, reply: Reply) {
        self.script().rules.push(Rule {
            matcher: Box::new(matcher),
            reply,
            once: true,
        });
    }

    /// Queues a reply for the next request that no rule matches.
    pub fn push(&self, reply: Reply) {
        self.script().queue.push_back(reply);
    }

    /// The reply when no rule matches and the queue is empty.
    pub fn set_default(&self, reply: Reply) {
        self.script().default = reply;
    }

    /// Turns recording off (benchmarks) or on.
    pub fn set_recording(&self, on: bool) {
        self.script().recording = on;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// How many requests have arrived (recorded or not).
    pub fn received(&self) -> usize {
        *self.shared.received.borrow()
    }

    /// Waits until at least `count` requests have arrived.
    pub async fn wait_for_requests(&self, count: usize) {
        let mut rx = self.shared.received.subscribe();
        rx.wait_for(|n| *n >= count)
            .await
            .expect("the counter lives as long as the server");
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.shared.script.lock().expect("script lock")
    }
}

/// The text of the last user message in a request body, for matchers.
pub fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The message that woke the agent in a turn's request: what follows crew's
/// "Message for you from …:" line in the first user message (the rest of that message is the
/// room's context, which must not steer matchers).
pub fn waking_text(body: &Value) -> String {
    let first = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    match first.rfind("Message for you from ") {
        Some(at) => first[at..]
            .split_once('\n')
            .map(|(_, text)| text.to_owned())
            .unwrap_or_default(),
        None => first.to_owned(),
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = {
        let mut script = shared.script.lock().expect("script lock");
        if script.recording {
            shared
                .requests
                .lock()
                .expect("requests lock")
                .push(Recorded {
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default(),
                    headers: headers_of(&parts.headers),
                    body: body.clone(),
                });
        }
        let matched = script.rules.iter().position(|rule| (rule.matcher)(&json));
        match matched {
            Some(index) if script.rules[index].once => script.rules.remove(index).reply,
            Some(index) => script.rules[index].reply.clone(),
            None => match script.queue.pop_front() {
                Some(reply) => reply,
                None => script.default.clone(),
            },
        }
    };
    shared.received.send_modify(|n| *n += 1);
    if let Some(gate) = &reply.hold_before {
        gate.pass().await;
    }
    let model = json["model"].as_str().unwrap_or("scripted").to_owned();
    if let Content::Error {
        status,
        body,
        retry_after,
    } = &reply.content
    {
        let mut response = (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(body.clone()),
        )
            .into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("digits"));
        }
        return response;
    }
    if json["stream"] == true {
        let include_usage = json["stream_options"]["include_usage"] == true;
        stream_reply(reply, model, include_usage)
    } else {
        axum::Json(whole_reply(&reply, &model)).into_response()
    }
}

fn headers_of(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn usage_json(reply: &Reply) -> Value {
    json!({
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    })
}

fn whole_reply(reply: &Reply, model: &str) -> Value {
    let (message, finish) = match &reply.content {
        Content::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
        Content::ToolCalls(calls) => (
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": calls.iter().map(|(id, name, args)| json!({
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": args},
                })).collect::<Vec<_>>(),
            }),
            "tool_calls",
        ),
        Content::Error { .. } => unreachable!("errors are answered before"),
    };
    json!({
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage_json(reply),
    })
}

/// The SSE events of a streamed reply, each a `data: …` payload.
fn stream_events(reply: &Reply, model: &str, include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
        .to_string()
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let finish = match &reply.content {
        Content::Text(text) => {
            for piece in text.split_inclusive(' ') {
                events.push(chunk(json!({"content": piece}), Value::Null));
            }
            "stop"
        }
        Content::ToolCalls(calls) => {
            for (index, (id, name, args)) in calls.iter().enumerate() {
                events.push(chunk(
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                    Value::Null,
                ));
                let middle = args.len() / 2;
                let middle = (middle..=args.len())
                    .find(|&i| args.is_char_boundary(i))
                    .unwrap_or(args.len());
                for part in [&args[..middle], &args[middle..]] {
                    events.push(chunk(
                        json!({"tool_calls": [{"index": index, "function": {"arguments": part}}]}),
                        Value::Null,
                    ));
                }
            }
            "tool_calls"
        }
        Content::Error { .. } => unreachable!("errors are answered before"),
    };
    events.push(chunk(json!({}), json!(finish)));
    if include_usage {
        events.push(
            json!({
                "id": "chatcmpl-scripted",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [],
                "usage": usage_json(reply),
            })
            .to_string(),
        );
    }
    events.push("[DONE]".to_owned());
    events
}

fn stream_reply(reply: Reply, model: String, include_usage: bool) -> Response {
    let events = stream_events(&reply, &model, include_usage);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for (index, event) in events.into_iter().enumerate() {
            if let Some((after, gate)) = &reply.hold_after_events
                && index == *after
            {
                gate.pass().await;
            }
            if tx
                .send(Ok(Bytes::from(format!("data: {event}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response parts")
}
