//! The forwarding handler: check the token and policy, swap in the real key, stream the answer.
//!
//! Request bodies are read whole (they are needed to check the model and are bounded by
//! `max_request_bytes`); response bodies are never buffered when they succeed: each chunk goes to
//! the consumer as it arrives, while a small meter watches for the usage figures (the final SSE
//! chunk or the JSON body's `usage`). Failed upstream answers are small; they are read whole so
//! that any echo of the real key can be cut out before the consumer sees them.
//!
//! Not for: consumer management (see [`super::Gateway`]) or the operator's endpoint.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyDataStream, BodyExt, Full, Limited};
use hyper::body::Body as _;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::limits::Refusal as LimitRefusal;
use super::listen::Serving;
use super::upstream::{Leased, Upstreams};
use super::{
    AuditRecord, Authenticated, Gateway, MS_PER_DAY, Route, RouteKind, UpstreamKey, Usage, path,
};

/// Failed upstream answers larger than this are cut (they are read whole to redact keys).
const MAX_ERROR_BODY_BYTES: usize = 1024 * 1024;
/// An SSE line longer than this is not inspected for usage (usage chunks are a few hundred bytes).
const MAX_METERED_LINE_BYTES: usize = 1024 * 1024;
/// A JSON body longer than this is not inspected for usage.
const MAX_METERED_JSON_BYTES: usize = 8 * 1024 * 1024;

/// The proxy as an axum router (for the sandboxes' Unix socket), with the gateway's shared
/// upstream client.
pub(super) fn router(gateway: Arc<Gateway>) -> Router {
    let serving = Arc::new(Serving {
        upstreams: Arc::clone(&gateway.shared_upstreams),
        gateway,
    });
    Router::new()
        .fallback(
            |State(serving): State<Arc<Serving>>, request: Request| async move {
                handle(&serving, request).await
            },
        )
        .with_state(serving)
}

/// A refusal answered to the consumer: `{"error": {"code": …, "message": …}}`, never a secret.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "gateway internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the gateway failed to handle the request; see the crew logs",
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Answers one consumer request: forwarded upstream, or refused with a machine code.
pub(super) async fn handle<B>(serving: &Serving, request: http::Request<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let gateway = &serving.gateway;
    let started = tokio::time::Instant::now();
    let mut audit = AuditRecord {
        at_ms: gateway.clock.now_ms(),
        consumer: None,
        route: None,
        model: None,
        status: 0,
        code: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        latency_ms: 0,
    };
    match forward(gateway, &serving.upstreams, request, started, &mut audit).await {
        Ok(response) => response,
        Err(refusal) => {
            audit.status = refusal.status.as_u16();
            audit.code = Some(refusal.code.to_owned());
            audit.latency_ms = started.elapsed().as_millis() as u64;
            gateway.record_audit(audit);
            refusal.into_response()
        }
    }
}

async fn forward<B>(
    gateway: &Arc<Gateway>,
    upstreams: &Upstreams,
    request: http::Request<B>,
    started: tokio::time::Instant,
    audit: &mut AuditRecord,
) -> Result<Response, Refusal>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = request.into_parts();

    // Before anything looks at the path: a path a normaliser could change is never routed.
    let path = parts.uri.path();
    path::check(path).map_err(|refused| {
        Refusal::new(StatusCode::BAD_REQUEST, refused.code(), refused.message())
    })?;

    let token = presented_token(&parts.headers).ok_or_else(|| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send your consumer token as `Authorization: Bearer <token>`",
        )
    })?;
    let record = match gateway.authenticate(token).map_err(Refusal::internal)? {
        Authenticated::Consumer(record) => record,
        Authenticated::Unknown => {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "this consumer token is not known to the gateway",
            ));
        }
        Authenticated::Revoked => {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "token_revoked",
                "this consumer was revoked by the operator",
            ));
        }
        Authenticated::Expired => {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "this token was rotated and its grace period is over; use the new token",
            ));
        }
    };
    audit.consumer = Some(record.id.clone());

    let route = gateway
        .routes
        .iter()
        .find(|route| {
            path.strip_prefix(route.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!("no gateway route serves the path `{path}`"),
            )
        })?;
    audit.route = Some(route.config.name.clone());
    let policy = &record.policy;
    if !policy.allows_route(&route.config.name) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "route_not_allowed",
            format!(
                "consumer `{}` may not use the route `{}`",
                record.id, route.config.name
            ),
        ));
    }
    let rest = &path[route.prefix.len()..];
    if let Some(endpoints) = &route.endpoints
        && !endpoints
            .iter()
            .any(|endpoint| endpoint.allows(&parts.method, rest))
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "endpoint_not_allowed",
            format!(
                "the route `{}` does not allow {} {}; it allows only the endpoints in its `endpoints` setting",
                route.config.name,
                parts.method,
                if rest.is_empty() { "/" } else { rest }
            ),
        ));
    }

    let now_ms = gateway.clock.now_ms();
    let permit = gateway
        .limits
        .admit(&record.id, policy, now_ms)
        .map_err(|refusal| limit_refusal(refusal, policy))?;

    let mut body = Limited::new(body, gateway.config.max_request_bytes)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "the request body is over the gateway limit of {} bytes",
                    gateway.config.max_request_bytes
                ),
            )
        })?;

    let is_llm = route.config.kind == RouteKind::Openai;
    let mut max_tokens = 0;
    let mut forced_usage = false;
    if is_llm && !body.is_empty() {
        let checked = check_llm_body(body, policy, &record.id, audit)?;
        body = checked.body;
        max_tokens = checked.max_tokens;
        forced_usage = checked.forced_usage;
    } else if is_llm && !policy.any_model() && parts.method == http::Method::POST {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "model_required",
            "this consumer has a model allowlist, so the request body must name a `model`",
        ));
    }
    if is_llm {
        check_budgets(gateway, &record.id, policy, now_ms, max_tokens)?;
    }

    let uri = upstream_uri(route, rest, parts.uri.query())?;
    if !path::stays_under(uri.path(), route.config.upstream.path()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "path_outside_route",
            "the path would leave the route's upstream path",
        ));
    }
    let headers = route.headers.forwarded(&parts.headers);
    let request_bytes = body.len() as u64;
    let unanswered = Unanswered {
        gateway,
        audit: Some(&*audit),
        started,
        request_bytes,
        llm: is_llm,
    };
    let sent =
        send_with_failover(gateway, upstreams, route, parts.method, uri, headers, body).await;
    unanswered.answered();
    let response = sent?;

    let status = response.status();
    let mut response_headers = forwarded_response_headers(response.headers(), route);
    audit.status = status.as_u16();

    if !status.is_success() {
        // Errors and redirects: small, read whole so that any echo of a key can be cut out.
        // A redirect's `Location` goes back to the consumer as it is; the gateway never follows.
        let bytes = read_capped(response, MAX_ERROR_BODY_BYTES).await;
        let redacted = route.redactor.redact(&bytes);
        audit.latency_ms = started.elapsed().as_millis() as u64;
        gateway.charge(
            &record.id,
            &Usage {
                requests: 1,
                ..Usage::default()
            },
        );
        gateway.record_audit(std::mem::take(audit));
        response_headers.remove(header::CONTENT_LENGTH);
        let mut out = Response::new(Body::from(redacted));
        *out.status_mut() = status;
        *out.headers_mut() = response_headers;
        drop(permit);
        return Ok(out);
    }

    let is_sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let meter = if !is_llm {
        Meter::Off
    } else if is_sse {
        Meter::Sse {
            line: Vec::new(),
            skipping: false,
        }
    } else {
        Meter::Json {
            body: Vec::new(),
            overflow: false,
        }
    };
    // The body goes on byte for byte (the upstream is asked for identity encoding, since
    // `accept-encoding` is not forwarded, and the meter only watches), so the upstream's
    // `Content-Length` stays true: a fixed-length answer ends with its last byte, without the
    // extra terminating chunk (and wake-up) of chunked encoding.
    // Usage the gateway asked for on the consumer's behalf is metered, then left out.
    let strip_usage = (is_llm && is_sse && forced_usage).then(UsageChunkFilter::default);
    if strip_usage.is_some() {
        response_headers.remove(header::CONTENT_LENGTH);
    }
    let metered = Metered {
        inner: Some(response.into_body()),
        meter,
        strip_usage,
        ended: false,
        usage: None,
        seen_bytes: 0,
        draining: false,
        finish: Some(Finish {
            gateway: Arc::clone(gateway),
            audit: std::mem::take(audit),
            started,
            request_bytes,
            _permit: permit,
        }),
    };
    let mut out = Response::new(Body::from_stream(metered));
    *out.status_mut() = status;
    *out.headers_mut() = response_headers;
    Ok(out)
}

fn limit_refusal(refusal: LimitRefusal, policy: &super::ConsumerPolicy) -> Refusal {
    match refusal {
        LimitRefusal::Rate { retry_after_secs } => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "over the limit of {} requests per minute; retry after {retry_after_secs} s",
                policy.requests_per_minute
            ),
        )
        .retry_after(retry_after_secs),
        LimitRefusal::Concurrency { max } => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("already {max} requests in flight for this consumer; retry shortly"),
        )
        .retry_after(1),
    }
}

/// The consumer's daily budget and the gateway's global one, counting what this request may use
/// (`max_tokens`) so that one request cannot overshoot by much.
fn check_budgets(
    gateway: &Gateway,
    consumer: &str,
    policy: &super::ConsumerPolicy,
    now_ms: u64,
    max_tokens: u64,
) -> Result<(), Refusal> {
    let day = now_ms / MS_PER_DAY;
    let retry_after_secs = (MS_PER_DAY - now_ms % MS_PER_DAY).div_ceil(1000);
    let over = |used: u64, budget: u64| {
        budget > 0 && (used >= budget || used.saturating_add(max_tokens) > budget)
    };
    let asked = if max_tokens > 0 {
        format!("; this request may use up to {max_tokens} (its max_tokens)")
    } else {
        String::new()
    };
    let used = gateway
        .usage_on(consumer, day)
        .map_err(Refusal::internal)?
        .total_tokens;
    if over(used, policy.daily_token_budget) {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "budget_exhausted",
            format!(
                "the daily budget of {} tokens is used up ({used} used{asked}); it renews at 00:00 UTC. Do not retry before then",
                policy.daily_token_budget
            ),
        )
        .retry_after(retry_after_secs));
    }
    let global = gateway.config.global_daily_token_budget;
    let used = gateway
        .accounting
        .global_on(day)
        .map_err(Refusal::internal)?;
    if over(used, global) {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "global_budget_exhausted",
            format!(
                "the global daily token budget (gateway.global_daily_token_budget = {global} tokens, all agents together) is used up ({used} used{asked}); it renews at 00:00 UTC. Do not retry before then"
            ),
        )
        .retry_after(retry_after_secs));
    }
    Ok(())
}

/// Charges an estimate when the consumer goes away before the upstream answered: the upstream
/// may already be working (and billing) on the request.
struct Unanswered<'a> {
    gateway: &'a Gateway,
    /// `None` once answered.
    audit: Option<&'a AuditRecord>,
    started: tokio::time::Instant,
    request_bytes: u64,
    llm: bool,
}

impl Unanswered<'_> {
    fn answered(mut self) {
        self.audit = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(audit) = self.audit.take() else {
            return;
        };
        let mut audit = audit.clone();
        let usage = estimate(self.llm, self.request_bytes, 0);
        audit.code = Some("consumer_went_away".into());
        audit.prompt_tokens = usage.prompt_tokens;
        audit.total_tokens = usage.total_tokens;
        audit.latency_ms = self.started.elapsed().as_millis() as u64;
        if let Some(consumer) = &audit.consumer {
            self.gateway.charge(consumer, &usage);
        }
        self.gateway.record_audit(audit);
    }
}

/// Bytes per token for estimates (about four characters of English per token, rounded up so the
/// estimate errs on the side of charging).
const BYTES_PER_TOKEN: u64 = 4;

/// One request's charge when the upstream's own usage figures were not seen.
fn estimate(llm: bool, request_bytes: u64, response_bytes: u64) -> Usage {
    if !llm {
        return Usage {
            requests: 1,
            ..Usage::default()
        };
    }
    let prompt_tokens = request_bytes.div_ceil(BYTES_PER_TOKEN);
    let completion_tokens = response_bytes.div_ceil(BYTES_PER_TOKEN);
    Usage {
        requests: 1,
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// The consumer token from `Authorization: Bearer …` or `x-api-key`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .or_else(|| value.strip_prefix("token "))
            .unwrap_or(value)
            .trim();
        return (!token.is_empty()).then_some(token);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// An LLM request body after the gateway's checks.
struct CheckedLlmBody {
    /// The body to forward (changed only to force usage reporting on streams).
    body: Bytes,
    /// The most completion tokens the request asks for (`max_tokens` or
    /// `max_completion_tokens`), 0 when it does not say.
    max_tokens: u64,
    /// The gateway turned `include_usage` on for a stream whose consumer did not ask for it:
    /// the usage-only chunk is metered, then left out of what the consumer sees.
    forced_usage: bool,
}

/// Checks the model against the allowlist and makes streams report usage: metering cannot be
/// opted out of, so `stream_options.include_usage` is forced on whatever the consumer sent.
fn check_llm_body(
    body: Bytes,
    policy: &super::ConsumerPolicy,
    consumer: &str,
    audit: &mut AuditRecord,
) -> Result<CheckedLlmBody, Refusal> {
    // Fast path: read only the top-level fields that matter, skipping the conversation without
    // building it in memory. The full parse below is for bodies that must change.
    if let Ok(peek) = serde_json::from_slice::<Peek<'_>>(&body) {
        audit.model = peek.model.as_deref().map(str::to_owned);
        check_model(peek.model.as_deref(), policy, consumer)?;
        let needs_usage = peek.stream == Some(true)
            && peek
                .stream_options
                .as_ref()
                .and_then(|options| options.include_usage)
                != Some(true);
        if !needs_usage {
            let max_tokens = peek.max_tokens.or(peek.max_completion_tokens).unwrap_or(0);
            return Ok(CheckedLlmBody {
                body,
                max_tokens,
                forced_usage: false,
            });
        }
    }
    let unchanged = |body: Bytes| CheckedLlmBody {
        body,
        max_tokens: 0,
        forced_usage: false,
    };
    let mut json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(json) => json,
        Err(_) if policy.any_model() => return Ok(unchanged(body)),
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the request body is not JSON, so its model cannot be checked",
            ));
        }
    };
    let Some(object) = json.as_object_mut() else {
        return Ok(unchanged(body));
    };
    let model = object
        .get("model")
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    audit.model = model.clone();
    check_model(model.as_deref(), policy, consumer)?;
    let max_tokens = ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|field| object.get(*field).and_then(|v| v.as_u64()))
        .unwrap_or(0);
    let streaming = object.get("stream").and_then(|s| s.as_bool()) == Some(true);
    if !streaming {
        return Ok(CheckedLlmBody {
            body,
            max_tokens,
            forced_usage: false,
        });
    }
    let options = object
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !options.is_object() {
        *options = serde_json::json!({});
    }
    let mut forced_usage = false;
    if let Some(options) = options.as_object_mut() {
        forced_usage = options.get("include_usage").and_then(|v| v.as_bool()) != Some(true);
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    let body = serde_json::to_vec(&json)
        .map(Bytes::from)
        .map_err(Refusal::internal)?;
    Ok(CheckedLlmBody {
        body,
        max_tokens,
        forced_usage,
    })
}

/// The top-level request fields the gateway looks at.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<PeekStreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct PeekStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn check_model(
    model: Option<&str>,
    policy: &super::ConsumerPolicy,
    consumer: &str,
) -> Result<(), Refusal> {
    match model {
        Some(model) if !policy.allows_model(model) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("consumer `{consumer}` may not use the model `{model}`"),
        )),
        None if !policy.any_model() => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "model_required",
            "this consumer has a model allowlist, so the request body must name a `model`",
        )),
        _ => Ok(()),
    }
}

/// The upstream request target for `rest` (the request path after the route prefix, already
/// checked by [`path::check`]): the route's upstream path, `rest` and the query, in origin form
/// (the connection is already to the route's upstream).
fn upstream_uri(route: &Route, rest: &str, query: Option<&str>) -> Result<http::Uri, Refusal> {
    let mut path_and_query = String::with_capacity(
        route.upstream_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
    );
    path_and_query.push_str(&route.upstream_path);
    path_and_query.push_str(rest);
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let path_and_query = http::uri::PathAndQuery::try_from(path_and_query).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "the request path cannot be forwarded upstream",
        )
    })?;
    Ok(http::Uri::from(path_and_query))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones the gateway sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn forwarded_response_headers(incoming: &HeaderMap, route: &Route) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
            continue;
        }
        if !route.redactor.leaks(value.as_bytes()) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

async fn send_with_failover(
    gateway: &Gateway,
    upstreams: &Upstreams,
    route: &Route,
    method: http::Method,
    uri: http::Uri,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<http::Response<Leased>, Refusal> {
    let now_ms = gateway.clock.now_ms();
    let mut order: Vec<usize> = (0..route.keys.len())
        .filter(|&i| route.keys[i].rested_until_ms.load(Ordering::Relaxed) <= now_ms)
        .collect();
    if order.is_empty() {
        // Every key is resting: try them all anyway rather than refuse outright.
        order = (0..route.keys.len()).collect();
    }
    let header_name = &route.inject_header;
    let timeout = Duration::from_secs(gateway.config.upstream_timeout_secs);
    let last = order.len() - 1;
    let mut failure = None;
    for (attempt, &index) in order.iter().enumerate() {
        let key = &route.keys[index];
        // The last (usually the only) attempt takes the headers instead of copying them.
        let mut request_headers = if attempt == last {
            std::mem::take(&mut headers)
        } else {
            headers.clone()
        };
        request_headers.insert(header::HOST, route.host.clone());
        request_headers.insert(header_name.clone(), key.header_value.clone());
        let mut request = http::Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = request_headers;
        match tokio::time::timeout(timeout, upstreams.send(route.index, &route.origin, request))
            .await
        {
            Err(_) => {
                key.failed(gateway, now_ms);
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream of route `{}` did not answer within {} s",
                        route.config.name, gateway.config.upstream_timeout_secs
                    ),
                ));
            }
            Ok(Err(error)) => {
                key.failed(gateway, now_ms);
                tracing::warn!(
                    route = %route.config.name,
                    error = %ErrorChain(&error),
                    "gateway upstream unreachable"
                );
                failure = Some(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    format!(
                        "the upstream of route `{}` cannot be reached",
                        route.config.name
                    ),
                ));
            }
            Ok(Ok(response)) => {
                let status = response.status();
                let key_problem = status == StatusCode::UNAUTHORIZED
                    || status == StatusCode::FORBIDDEN
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error();
                if key_problem {
                    key.failed(gateway, now_ms);
                    if attempt < last {
                        tracing::warn!(
                            route = %route.config.name,
                            status = status.as_u16(),
                            "gateway upstream refused a key; trying the next one"
                        );
                        continue;
                    }
                } else {
                    key.consecutive_failures.store(0, Ordering::Relaxed);
                }
                return Ok(response);
            }
        }
    }
    Err(failure.unwrap_or_else(|| Refusal::internal("no upstream key was tried")))
}

impl UpstreamKey {
    fn failed(&self, gateway: &Gateway, now_ms: u64) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= gateway.config.key_failure_threshold {
            self.rested_until_ms.store(
                now_ms + gateway.config.key_rest_secs * 1000,
                Ordering::Relaxed,
            );
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// An upstream client error with its causes (the client's own message is only "client error
/// (Connect)"); it names neither the URL nor any header, so no key can reach the logs through it.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

async fn read_capped(response: http::Response<Leased>, cap: usize) -> Vec<u8> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut stream = BodyDataStream::new(response.into_body());
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && find(haystack, needle).is_some()
}

/// Watches a response body for the usage figures without holding it back.
enum Meter {
    Off,
    Sse { line: Vec<u8>, skipping: bool },
    Json { body: Vec<u8>, overflow: bool },
}

impl Meter {
    fn observe(&mut self, chunk: &[u8], usage: &mut Option<Usage>) {
        match self {
            Meter::Off => {}
            Meter::Sse { line, skipping } => {
                let mut rest = chunk;
                while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
                    let (head, tail) = rest.split_at(newline);
                    if !*skipping {
                        if line.is_empty() {
                            sse_line(head, usage);
                        } else {
                            line.extend_from_slice(head);
                            sse_line(line, usage);
                        }
                    }
                    line.clear();
                    *skipping = false;
                    rest = &tail[1..];
                }
                if !*skipping {
                    if line.len() + rest.len() > MAX_METERED_LINE_BYTES {
                        line.clear();
                        *skipping = true;
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
            Meter::Json { body, overflow } => {
                if !*overflow {
                    if body.len() + chunk.len() > MAX_METERED_JSON_BYTES {
                        *overflow = true;
                        body.clear();
                    } else {
                        body.extend_from_slice(chunk);
                    }
                }
            }
        }
    }

    fn finish(&mut self, usage: &mut Option<Usage>) {
        match self {
            Meter::Off => {}
            Meter::Sse { line, skipping } => {
                if !*skipping && !line.is_empty() {
                    sse_line(line, usage);
                }
            }
            Meter::Json { body, overflow } => {
                if !*overflow && let Some(found) = usage_of(body) {
                    *usage = Some(found);
                }
            }
        }
    }
}

fn sse_line(line: &[u8], usage: &mut Option<Usage>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if !contains(data, b"\"usage\"") {
        return;
    }
    if let Some(found) = usage_of(data) {
        *usage = Some(found);
    }
}

/// The `usage` object of a body or chunk, read without building the rest of the document.
#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// OpenAI's `usage` (`prompt_tokens`, `completion_tokens`, `total_tokens`), or Anthropic-style
/// `input_tokens`/`output_tokens`.
#[derive(serde::Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

fn usage_of(raw: &[u8]) -> Option<Usage> {
    let usage = serde_json::from_slice::<WithUsage>(raw).ok()?.usage?;
    let prompt = usage.prompt_tokens.or(usage.input_tokens)?;
    let completion = usage.completion_tokens.or(usage.output_tokens).unwrap_or(0);
    Some(Usage {
        requests: 0,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: usage.total_tokens.unwrap_or(prompt + completion),
    })
}

/// Leaves out of an SSE stream the events that carry only usage (`"choices": []` and a
/// `usage` object), which the upstream sends because the gateway forced `include_usage`: the
/// consumer sees the stream it asked for. Other events pass unchanged, each as soon as it is
/// complete (an event ends with a blank line); an incomplete one is held until its end.
#[derive(Default)]
struct UsageChunkFilter {
    /// The start of an event whose end has not arrived yet.
    held: Vec<u8>,
}

impl UsageChunkFilter {
    /// What of `chunk` (after what was held) may go to the consumer now.
    fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.held.is_empty() && !contains(chunk, b"\"usage\"") {
            // The common case: no usage in sight. Pass every complete event, hold the rest.
            return match last_event_end(chunk) {
                Some(end) if end == chunk.len() => Bytes::copy_from_slice(chunk),
                Some(end) => {
                    self.held.extend_from_slice(&chunk[end..]);
                    Bytes::copy_from_slice(&chunk[..end])
                }
                None => {
                    self.held.extend_from_slice(chunk);
                    Bytes::new()
                }
            };
        }
        self.held.extend_from_slice(chunk);
        let Some(end) = last_event_end(&self.held) else {
            return Bytes::new();
        };
        let rest = self.held.split_off(end);
        let complete = std::mem::replace(&mut self.held, rest);
        let mut out = Vec::with_capacity(complete.len());
        let mut start = 0;
        while let Some(len) = next_event_len(&complete[start..]) {
            let event = &complete[start..start + len];
            if !is_usage_only_event(event) {
                out.extend_from_slice(event);
            }
            start += len;
        }
        Bytes::from(out)
    }

    /// What was held at the end of the stream (an event without its closing blank line).
    fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.held);
        if is_usage_only_event(&rest) {
            Bytes::new()
        } else {
            Bytes::from(rest)
        }
    }
}

/// The length of the first complete event in `bytes` (up to and including its blank line).
fn next_event_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(newline) = bytes[i..].iter().position(|&b| b == b'\n') {
        let after = i + newline + 1;
        match bytes.get(after) {
            Some(b'\n') => return Some(after + 1),
            Some(b'\r') if bytes.get(after + 1) == Some(&b'\n') => return Some(after + 2),
            _ => i = after,
        }
    }
    None
}

/// Where the last complete event in `bytes` ends.
fn last_event_end(bytes: &[u8]) -> Option<usize> {
    let mut end = None;
    let mut start = 0;
    while let Some(len) = next_event_len(&bytes[start..]) {
        start += len;
        end = Some(start);
    }
    end
}

/// An event whose data is a chunk with no choices and a usage object.
fn is_usage_only_event(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct UsageChunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    if !contains(event, b"\"usage\"") {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            data.extend_from_slice(value);
        }
    }
    serde_json::from_slice::<UsageChunk>(&data).is_ok_and(|chunk| {
        chunk.usage.is_some() && chunk.choices.as_ref().is_none_or(Vec::is_empty)
    })
}

/// What happens once the response body is done (or the consumer went away).
struct Finish {
    gateway: Arc<Gateway>,
    audit: AuditRecord,
    started: tokio::time::Instant,
    /// Size of the forwarded request, for an estimate when no usage figures arrive.
    request_bytes: u64,
    /// Holds the consumer's concurrency slot until the body ends.
    _permit: Option<OwnedSemaphorePermit>,
}

/// The response body stream: passes chunks on unchanged and charges usage at the end.
///
/// Metering cannot be escaped by hanging up: when the consumer goes away before the end of an
/// LLM answer, the rest of the upstream's answer is read (and thrown away) in the background so
/// that its usage figures are charged; if they never come, an estimate from the bytes seen is.
struct Metered {
    /// The upstream's body; `None` once handed to the copy that drains it.
    inner: Option<Leased>,
    meter: Meter,
    /// Set when the usage-only chunk must not reach the consumer (it did not ask for it).
    strip_usage: Option<UsageChunkFilter>,
    /// The upstream's answer ended (what the filter held back has been sent).
    ended: bool,
    usage: Option<Usage>,
    /// Response bytes seen so far, for the estimate.
    seen_bytes: u64,
    /// Set on the copy that reads the rest after the consumer went away.
    draining: bool,
    finish: Option<Finish>,
}

impl Metered {
    fn complete(&mut self) {
        let Some(mut finish) = self.finish.take() else {
            return;
        };
        self.meter.finish(&mut self.usage);
        let metered = !matches!(self.meter, Meter::Off);
        let mut usage = match self.usage.take() {
            Some(usage) => usage,
            None if metered && finish.audit.code.is_some() => {
                estimate(true, finish.request_bytes, self.seen_bytes)
            }
            None => Usage::default(),
        };
        usage.requests = 1;
        finish.audit.prompt_tokens = usage.prompt_tokens;
        finish.audit.completion_tokens = usage.completion_tokens;
        finish.audit.total_tokens = usage.total_tokens;
        finish.audit.latency_ms = finish.started.elapsed().as_millis() as u64;
        if let Some(consumer) = &finish.audit.consumer {
            finish.gateway.charge(consumer, &usage);
        }
        finish.gateway.record_audit(finish.audit);
    }

    /// Reads the rest of the upstream answer for its usage, within the upstream timeout.
    async fn drain(mut self, timeout: Duration) {
        use futures::StreamExt;
        let read_all = async {
            while let Some(item) = self.next().await {
                if item.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(timeout, read_all).await.is_err() {
            tracing::debug!("gave up reading an abandoned upstream answer; charging an estimate");
        }
        self.complete();
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let Some(inner) = &mut this.inner else {
                return Poll::Ready(None);
            };
            return match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        // Trailers: not forwarded (the answer's headers were filtered already).
                        continue;
                    };
                    this.seen_bytes += chunk.len() as u64;
                    this.meter.observe(&chunk, &mut this.usage);
                    let at_end = inner.is_end_stream();
                    if at_end {
                        // The last bytes of a fixed-length answer: charge before the consumer
                        // has them, so that whoever holds the whole answer sees it charged.
                        this.complete();
                    }
                    let Some(filter) = &mut this.strip_usage else {
                        return Poll::Ready(Some(Ok(chunk)));
                    };
                    let passed = filter.push(&chunk);
                    if passed.is_empty() {
                        // All of it held back (an incomplete event) or left out: read on.
                        continue;
                    }
                    Poll::Ready(Some(Ok(passed)))
                }
                Poll::Ready(Some(Err(error))) => {
                    if let Some(finish) = &mut this.finish
                        && finish.audit.code.is_none()
                    {
                        finish.audit.code = Some("upstream_interrupted".into());
                    }
                    this.complete();
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    this.complete();
                    this.ended = true;
                    match this.strip_usage.as_mut().map(UsageChunkFilter::finish) {
                        Some(rest) if !rest.is_empty() => Poll::Ready(Some(Ok(rest))),
                        _ => Poll::Ready(None),
                    }
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let Some(finish) = &mut self.finish else {
            return;
        };
        if !self.draining {
            finish.audit.code = Some("consumer_went_away".into());
        }
        let metered = !matches!(self.meter, Meter::Off);
        if metered
            && !self.draining
            && self.usage.is_none()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let timeout = Duration::from_secs(finish.gateway.config.upstream_timeout_secs);
            let rest = Metered {
                inner: self.inner.take(),
                meter: std::mem::replace(&mut self.meter, Meter::Off),
                strip_usage: None,
                ended: false,
                usage: None,
                seen_bytes: self.seen_bytes,
                draining: true,
                finish: self.finish.take(),
            };
            runtime.spawn(rest.drain(timeout));
            return;
        }
        self.complete();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE_ONLY: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const CONTENT: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    /// Feeds `stream` to a filter cut at every `step` bytes; what the consumer would see.
    fn filtered(stream: &str, step: usize) -> String {
        let mut filter = UsageChunkFilter::default();
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(step) {
            out.extend_from_slice(&filter.push(piece));
        }
        out.extend_from_slice(&filter.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_only_event_is_left_out_wherever_the_chunks_are_cut() {
        let stream = format!("{CONTENT}{CONTENT}{USAGE_ONLY}{DONE}");
        for step in [1, 2, 7, 16, 64, stream.len()] {
            assert_eq!(filtered(&stream, step), format!("{CONTENT}{CONTENT}{DONE}"));
        }
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(
            filtered(&crlf, 5),
            format!("{CONTENT}{CONTENT}{DONE}").replace('\n', "\r\n")
        );
    }

    #[test]
    fn other_events_pass_unchanged_and_whole() {
        let stream = format!(": keep-alive\n\nevent: x\n{CONTENT}{DONE}");
        assert_eq!(filtered(&stream, 3), stream);
        // A stream cut short: what arrived still reaches the consumer.
        assert_eq!(
            filtered("data: {\"choices\":[{}]}", 4),
            "data: {\"choices\":[{}]}"
        );
        // A complete event is passed at once, not held for the next one.
        let mut filter = UsageChunkFilter::default();
        assert_eq!(&filter.push(CONTENT.as_bytes())[..], CONTENT.as_bytes());
        assert!(filter.push(b"data: {\"cho").is_empty());
    }
}
