//! An OpenAI-compatible chat-completions client that always goes through the gateway.
//!
//! Agents call their model with their consumer token; the gateway swaps it for the real key. The
//! client speaks the wire format that OpenAI, DashScope/Qwen, DeepSeek, Ollama and vLLM share
//! (base URL + a configurable path), with tools, JSON mode and SSE streaming. It retries with
//! exponential backoff on 429, 5xx and network errors, except when the gateway says the daily
//! budget is used up (`budget_exhausted`): retrying that only wastes time. Errors read well in a
//! room ("the LLM budget for today is used up …").
//!
//! Not for: holding real provider keys (never), or agent logic (see [`crate::agent`]).

pub mod types;

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
pub use types::{
    Assembler, ChatChunk, ChatRequest, ChatResponse, Choice, FunctionCall, Message, ResponseFormat,
    Role, TokenUsage, Tool, ToolCall,
};

/// Per-deployment LLM defaults; each agent may override route and model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// The gateway route agents' LLM calls go through (a route of kind `openai`).
    pub route: String,
    /// The model agents use unless they have their own.
    pub model: String,
    /// Path of the chat-completions endpoint under the route's base URL. OpenAI, DeepSeek,
    /// DashScope compatible mode, vLLM and Ollama's `/v1` all use `/chat/completions`.
    pub path: String,
    /// Attempts after the first one on 429 (other than `budget_exhausted`), 5xx or network errors.
    pub max_retries: u32,
    /// First backoff delay; it doubles per attempt (with jitter).
    pub initial_backoff_ms: u64,
    /// Longest wait between attempts, also the cap on a server's `Retry-After`.
    pub max_backoff_ms: u64,
    /// Longest time for one attempt, headers and whole body (streams included).
    pub request_timeout_secs: u64,
    /// Rounds of tool calls one agent turn may make before it stops and says so.
    pub max_tool_steps: usize,
    /// Tokens (prompt + completion, as the provider reports them) one turn may use before it
    /// stops and says so.
    pub max_turn_tokens: u64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            route: "llm".into(),
            model: "gpt-4o-mini".into(),
            path: "/chat/completions".into(),
            max_retries: 4,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            request_timeout_secs: 600,
            max_tool_steps: 8,
            max_turn_tokens: 200_000,
        }
    }
}

/// Why a call failed, phrased so an agent can say it in a room.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The consumer's daily token budget is used up; do not retry before it renews.
    #[error("the LLM token budget for today is used up ({message}); it renews at 00:00 UTC")]
    BudgetExhausted {
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// The gateway does not know or no longer accepts this agent's token.
    #[error("the gateway refused this agent's token ({code}: {message})")]
    Unauthorized { code: String, message: String },
    /// The route or model is not allowed for this agent.
    #[error("this agent may not do that ({code}: {message})")]
    Forbidden { code: String, message: String },
    /// The request was rejected (4xx) and retrying would not help.
    #[error("the LLM request was rejected with {status} ({code}: {message})")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// Still failing (429, 5xx or network) after every retry.
    #[error("the LLM is unavailable after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
    /// A streamed answer broke off in the middle.
    #[error("the LLM answer broke off: {0}")]
    Interrupted(String),
    /// The answer did not parse as chat completions.
    #[error("the LLM answered something that is not a chat completion: {0}")]
    InvalidResponse(String),
    /// The base URL and path do not make a URL.
    #[error("LLM endpoint is not a valid URL: {0}")]
    Config(String),
}

impl LlmError {
    /// Whether trying again later may work (used by agents to decide what to tell the room).
    pub fn is_transient(&self) -> bool {
        matches!(self, LlmError::GaveUp { .. } | LlmError::Interrupted(_))
    }
}

/// A chat-completions client for one agent. Cheap to clone.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    endpoint: url::Url,
    token: Secret,
    config: LlmConfig,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Attempt<T> {
    Done(T),
    /// Worth another try after at least this long (from `Retry-After`, if any).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

impl LlmClient {
    /// A client calling `base_url` + `config.path` (e.g. the gateway's route URL, see
    /// [`crate::gateway::GatewayConfig::route_url`]) with `token` as the bearer.
    pub fn new(base_url: &url::Url, token: Secret, config: LlmConfig) -> Result<Self, LlmError> {
        let joined = format!(
            "{}/{}",
            base_url.as_str().trim_end_matches('/'),
            config.path.trim_start_matches('/')
        );
        let endpoint =
            url::Url::parse(&joined).map_err(|error| LlmError::Config(error.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .build()
            .map_err(|error| LlmError::Config(error.to_string()))?;
        Ok(Self {
            http,
            endpoint,
            token,
            config,
        })
    }

    /// The default model from the config.
    pub fn default_model(&self) -> &str {
        &self.config.model
    }

    /// Sends `request` and waits for the whole answer.
    #[tracing::instrument(skip_all, fields(model = %request.model))]
    pub async fn chat(&self, mut request: ChatRequest) -> Result<ChatResponse, LlmError> {
        request.stream = false;
        request.stream_options = None;
        self.with_retries(|| async {
            let response = match self.send(&request).await? {
                Attempt::Done(response) => response,
                Attempt::Retry { reason, after } => return Ok(Attempt::Retry { reason, after }),
            };
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(error) => {
                    return Ok(Attempt::Retry {
                        reason: format!("reading the answer failed: {}", error.without_url()),
                        after: None,
                    });
                }
            };
            serde_json::from_slice::<ChatResponse>(&bytes)
                .map(Attempt::Done)
                .map_err(|error| LlmError::InvalidResponse(error.to_string()))
        })
        .await
    }

    /// Sends `request` as a stream, calling `on_text` with each piece of text as it arrives, and
    /// returns the assembled answer (tool calls included). Retries happen only before the first
    /// chunk; a stream that breaks later is [`LlmError::Interrupted`] (text was already shown).
    #[tracing::instrument(skip_all, fields(model = %request.model))]
    pub async fn chat_stream(
        &self,
        mut request: ChatRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<ChatResponse, LlmError> {
        request.stream = true;
        if request.stream_options.is_none() {
            request.stream_options = Some(serde_json::json!({"include_usage": true}));
        }
        let response = self
            .with_retries(|| async { self.send(&request).await })
            .await?;
        let mut assembler = Assembler::default();
        let mut body = response.bytes_stream();
        let mut line = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|error| LlmError::Interrupted(error.without_url().to_string()))?;
            let mut rest: &[u8] = &chunk;
            while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&rest[..newline]);
                rest = &rest[newline + 1..];
                if handle_sse_line(&line, &mut assembler, &mut on_text)? {
                    return Ok(assembler.finish());
                }
                line.clear();
            }
            line.extend_from_slice(rest);
        }
        if !line.is_empty() && handle_sse_line(&line, &mut assembler, &mut on_text)? {
            return Ok(assembler.finish());
        }
        // Some servers close without `[DONE]`; what arrived is the answer if it finished.
        let response = assembler.finish();
        if response
            .choices
            .iter()
            .any(|choice| choice.finish_reason.is_some())
        {
            Ok(response)
        } else {
            Err(LlmError::Interrupted(
                "the stream ended before the answer finished".into(),
            ))
        }
    }

    /// One HTTP attempt: a successful response, a reason to retry, or a final error.
    async fn send(&self, request: &ChatRequest) -> Result<Attempt<reqwest::Response>, LlmError> {
        let sent = self
            .http
            .post(self.endpoint.clone())
            .bearer_auth(self.token.expose())
            .json(request)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                return Ok(Attempt::Retry {
                    reason: format!("network error: {}", error.without_url()),
                    after: None,
                });
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(Attempt::Done(response));
        }
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let text = response.text().await.unwrap_or_default();
        let (code, message) = error_fields(&text);
        match status.as_u16() {
            // The agent's own budget or the gateway's global one: both renew at 00:00 UTC.
            429 if code == "budget_exhausted" || code == "global_budget_exhausted" => {
                Err(LlmError::BudgetExhausted {
                    message,
                    retry_after_secs: retry_after,
                })
            }
            429 | 500..=599 => Ok(Attempt::Retry {
                reason: format!("{} ({code}: {message})", status.as_u16()),
                after: retry_after.map(Duration::from_secs),
            }),
            401 => Err(LlmError::Unauthorized { code, message }),
            403 => Err(LlmError::Forbidden { code, message }),
            other => Err(LlmError::Rejected {
                status: other,
                code,
                message,
            }),
        }
    }

    /// Runs `attempt` until it is done, fails for good, or `max_retries` retries have failed
    /// (then [`LlmError::GaveUp`]); waits per [`crate::retry`], at least the server's
    /// `Retry-After`, at most `max_backoff_ms`.
    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, LlmError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, LlmError>>,
    {
        use backon::Retryable;
        /// An attempt worth repeating, or the final error.
        enum Failure {
            Retry {
                reason: String,
                after: Option<Duration>,
            },
            Final(LlmError),
        }
        let cap = Duration::from_millis(self.config.max_backoff_ms);
        let policy = crate::retry::exponential(
            Duration::from_millis(self.config.initial_backoff_ms),
            cap,
            self.config.max_retries as usize,
        );
        let mut retries = 0u32;
        let result = (|| {
            let attempt = attempt();
            async move {
                match attempt.await {
                    Ok(Attempt::Done(value)) => Ok(value),
                    Ok(Attempt::Retry { reason, after }) => Err(Failure::Retry { reason, after }),
                    Err(error) => Err(Failure::Final(error)),
                }
            }
        })
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(|failure| matches!(failure, Failure::Retry { .. }))
        .adjust(|failure, wait| match failure {
            Failure::Retry { after, .. } => crate::retry::at_least_asked(wait, *after, cap),
            Failure::Final(_) => None,
        })
        .notify(|failure, delay| {
            retries += 1;
            if let Failure::Retry { reason, .. } = failure {
                tracing::warn!(
                    attempt = retries,
                    delay_ms = delay.as_millis() as u64,
                    %reason,
                    "LLM call failed; retrying"
                );
            }
        })
        .await;
        result.map_err(|failure| match failure {
            Failure::Retry { reason, .. } => LlmError::GaveUp {
                attempts: retries + 1,
                last: reason,
            },
            Failure::Final(error) => error,
        })
    }
}

/// Handles one SSE line; returns true at `[DONE]`.
fn handle_sse_line(
    line: &[u8],
    assembler: &mut Assembler,
    on_text: &mut impl FnMut(&str),
) -> Result<bool, LlmError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return Ok(false);
    };
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return Ok(true);
    }
    if data.is_empty() {
        return Ok(false);
    }
    let chunk: ChatChunk = serde_json::from_slice(data).map_err(|error| {
        LlmError::InvalidResponse(format!("a stream chunk did not parse: {error}"))
    })?;
    for choice in &chunk.choices {
        if let Some(text) = &choice.delta.content
            && !text.is_empty()
        {
            on_text(text);
        }
    }
    assembler.push(chunk);
    Ok(false)
}

/// `error.code` (or `error.type`) and `error.message` of an error body, whatever its shape.
fn error_fields(text: &str) -> (String, String) {
    let json: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let error = &json["error"];
    let code = error["code"]
        .as_str()
        .or_else(|| error["type"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    let message = error["message"]
        .as_str()
        .or_else(|| error.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| text.chars().take(200).collect());
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_read_gateway_and_openai_shapes() {
        assert_eq!(
            error_fields(r#"{"error":{"code":"budget_exhausted","message":"used up"}}"#),
            ("budget_exhausted".into(), "used up".into())
        );
        assert_eq!(
            error_fields(r#"{"error":{"type":"server_error","message":"boom","code":null}}"#),
            ("server_error".into(), "boom".into())
        );
        assert_eq!(error_fields("oops").0, "unknown");
    }

    #[test]
    fn the_endpoint_is_the_route_and_the_path() {
        let client = LlmClient::new(
            &url::Url::parse("http://127.0.0.1:1/llm").unwrap(),
            Secret::new("t"),
            LlmConfig::default(),
        )
        .unwrap();
        assert_eq!(
            client.endpoint.as_str(),
            "http://127.0.0.1:1/llm/chat/completions"
        );
    }

    fn quick_client(max_retries: u32) -> LlmClient {
        LlmClient::new(
            &url::Url::parse("http://127.0.0.1:1/llm").unwrap(),
            Secret::new("t"),
            LlmConfig {
                max_retries,
                initial_backoff_ms: 1,
                max_backoff_ms: 5,
                ..LlmConfig::default()
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn retries_until_done_gives_up_after_the_last_and_never_retries_a_final_error() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = AtomicU32::new(0);
        let flaky = || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Ok(Attempt::Retry {
                    reason: "503".into(),
                    after: Some(Duration::from_millis(1)),
                })
            } else {
                Ok(Attempt::Done("answer"))
            }
        };
        assert_eq!(quick_client(4).with_retries(flaky).await.unwrap(), "answer");
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let error = quick_client(1).with_retries(flaky).await.unwrap_err();
        assert!(
            matches!(&error, LlmError::GaveUp { attempts: 2, last } if last == "503"),
            "{error:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        calls.store(0, Ordering::SeqCst);
        let refused = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Attempt<()>, _>(LlmError::Forbidden {
                code: "route".into(),
                message: "no".into(),
            })
        };
        let error = quick_client(4).with_retries(refused).await.unwrap_err();
        assert!(matches!(error, LlmError::Forbidden { .. }), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
