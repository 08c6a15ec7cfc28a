//! The credential gateway: agents hold consumer tokens; the gateway swaps them for real keys.
//!
//! A Worker never holds a real credential. It holds a consumer token that identifies it and grants
//! nothing by itself. Every call to an LLM provider, GitHub or any configured upstream goes through
//! this gateway, which checks the token and the consumer's policy, swaps the token for the real
//! key and forwards the request, streaming the answer back chunk by chunk.
//!
//! Layout: [`config`] (routes, defaults, where secrets come from), [`consumers`] (token derivation
//! and hashes), [`limits`] (rate and concurrency), [`listen`] (the HTTP server and the threads it
//! runs on), [`proxy`] (the forwarding handler), [`upstream`] (pooled upstream connections),
//! [`accounting`] (batched usage and audit writes),
//! [`admin`] (the operator's endpoint) and [`cli`] (`crew gateway …`).
//!
//! Not for: talking to LLMs itself (that is [`crate::llm`], which calls through this gateway).

mod accounting;
pub mod admin;
pub mod cli;
pub mod config;
pub mod consumers;
mod headers;
mod limits;
mod listen;
mod path;
mod proxy;
mod redact;
mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use admin::admin_router;
pub use config::{ConsumerPolicy, GatewayConfig, Injection, RouteConfig, RouteKind, SecretSource};
pub use consumers::{ConsumerRecord, TOKEN_PREFIX};

use crate::clock::Clock;
use crate::secret::Secret;
use crate::store::{Store, StoreError, Tree};
use consumers::{PreviousToken, TokenRef, derive_token, token_hash};

/// Errors of the gateway service (not the HTTP answers to consumers; see [`proxy`]).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway configuration is unusable; the message names the setting to fix.
    #[error("gateway config: {0}")]
    Config(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No consumer with this id exists.
    #[error("no gateway consumer `{0}` (list them with `crew gateway consumers list`)")]
    UnknownConsumer(String),
    /// The consumer was revoked; add it again to issue a fresh token.
    #[error("gateway consumer `{0}` is revoked (re-enable it with `crew gateway consumers add`)")]
    Revoked(String),
    /// A consumer id must be usable as a key and in logs.
    #[error(
        "consumer id `{0}` is not valid: use 1-255 characters without control characters or NUL"
    )]
    InvalidConsumerId(String),
    /// The HTTP client for upstreams could not be built (TLS setup).
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[source] rustls::Error),
}

/// Tokens used and requests made by one consumer on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// One audited request. Holds no header values, bodies or secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix ms when the request arrived.
    pub at_ms: u64,
    /// Consumer id, when the token was recognised.
    pub consumer: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    /// Status answered to the consumer.
    pub status: u16,
    /// Machine-readable code of a refusal (`rate_limited`, …), when the gateway refused.
    pub code: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// From arrival to the end of the response body.
    pub latency_ms: u64,
}

/// A consumer as listed by the admin endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    pub id: String,
    pub generation: u64,
    pub revoked: bool,
    /// Unix ms until which the previous token still works, if a rotation is in its grace period.
    pub previous_valid_until_ms: Option<u64>,
    pub policy: ConsumerPolicy,
    pub today: Usage,
}

/// Usage of one consumer on one day, as listed by `crew gateway usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub consumer: String,
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    pub usage: Usage,
}

const CONSUMERS_TREE: &str = "gateway_consumers";
const TOKEN_HASHES_TREE: &str = "gateway_token_hashes";
const USAGE_TREE: &str = "gateway_usage";
const AUDIT_TREE: &str = "gateway_audit";
const MS_PER_DAY: u64 = 86_400_000;

/// The gateway service: consumers, policy, accounting and the proxy. Share it as `Arc<Gateway>`.
pub struct Gateway {
    config: GatewayConfig,
    routes: Vec<Route>,
    secret: Secret,
    store: Store,
    consumers: Tree<String, ConsumerRecord>,
    token_hashes: Tree<String, TokenRef>,
    usage: Tree<String, Usage>,
    accounting: accounting::Accounting,
    known_tokens: KnownTokens,
    /// What budgets, rate buckets and grace periods read; tests move it (see [`Gateway::with_clock`]).
    clock: Clock,
    limits: limits::Limits,
    /// Upstream connections for requests served on crew's shared runtime (`threads = 0`, the
    /// sandboxes' Unix socket); each gateway thread has its own.
    shared_upstreams: Arc<upstream::Upstreams>,
}

/// A configured route with its keys loaded.
struct Route {
    config: RouteConfig,
    /// Path prefix without a trailing slash.
    prefix: String,
    /// Position in the gateway's routes (its connection pool has the same position).
    index: usize,
    /// The upstream's scheme and authority (`https://api.example.com/`), to open connections.
    origin: http::Uri,
    /// The `Host` header for the upstream, built once.
    host: http::HeaderValue,
    /// The upstream's path without a trailing slash; the request's rest is appended to it.
    upstream_path: String,
    keys: Vec<UpstreamKey>,
    /// The header the credential goes in (checked by [`GatewayConfig::check`]).
    inject_header: http::HeaderName,
    /// The methods and paths consumers may call; `None` allows all.
    endpoints: Option<Vec<config::Endpoint>>,
    headers: headers::HeaderPolicy,
    /// Finds the keys (whole or masked) in upstream answers.
    redactor: redact::Redactor,
}

/// One real upstream key and its health, for failover.
struct UpstreamKey {
    secret: Secret,
    /// The injected header value, marked sensitive so hyper never logs it.
    header_value: http::HeaderValue,
    consecutive_failures: AtomicU32,
    rested_until_ms: AtomicU64,
}

/// Token hashes already looked up, with the consumer as it was then. Only known tokens are
/// remembered (random guesses are not, so they cannot grow it), and every change to any consumer
/// forgets everything; the epoch makes sure a lookup that raced a change is not remembered.
#[derive(Default)]
struct KnownTokens {
    entries: std::sync::RwLock<std::collections::HashMap<String, (u64, Arc<ConsumerRecord>)>>,
    epoch: AtomicU64,
}

/// More remembered tokens than this (consumers × live generations) means something is off; start
/// over rather than grow.
const MAX_KNOWN_TOKENS: usize = 10_000;

impl KnownTokens {
    fn get(&self, hash: &str) -> Option<(u64, Arc<ConsumerRecord>)> {
        self.entries
            .read()
            .expect("token cache lock is never poisoned")
            .get(hash)
            .cloned()
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn remember(&self, epoch: u64, hash: String, known: (u64, Arc<ConsumerRecord>)) {
        let mut entries = self
            .entries
            .write()
            .expect("token cache lock is never poisoned");
        if self.epoch() != epoch {
            return;
        }
        if entries.len() >= MAX_KNOWN_TOKENS {
            entries.clear();
        }
        entries.insert(hash, known);
    }

    fn forget_all(&self) {
        let mut entries = self
            .entries
            .write()
            .expect("token cache lock is never poisoned");
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.clear();
    }
}

/// The scheme and authority of a route's upstream, as `http` types built once.
fn upstream_origin(route: &RouteConfig) -> Result<(http::Uri, http::HeaderValue), GatewayError> {
    // `GatewayConfig::check` has refused upstreams without a host or with a user name.
    let invalid =
        |why: &str| GatewayError::Config(format!("gateway route `{}`: upstream {why}", route.name));
    let scheme = http::uri::Scheme::try_from(route.upstream.scheme())
        .map_err(|_| invalid("has a scheme the gateway cannot use"))?;
    let host = route
        .upstream
        .host_str()
        .ok_or_else(|| invalid("has no host"))?;
    let authority = match route.upstream.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let host = http::HeaderValue::from_str(&authority)
        .map_err(|_| invalid("has a host the gateway cannot use"))?;
    let authority = http::uri::Authority::try_from(authority)
        .map_err(|_| invalid("has a host the gateway cannot use"))?;
    let origin = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|_| invalid("has a host the gateway cannot use"))?;
    Ok((origin, host))
}

impl Gateway {
    /// Builds the gateway, reading keys and the gateway secret from the process environment and
    /// files. `data_dir` is where the generated `gateway.secret` lives when the config names none.
    pub fn new(
        config: GatewayConfig,
        store: Store,
        data_dir: &Path,
    ) -> Result<Arc<Self>, GatewayError> {
        Self::with_env(config, store, data_dir, &|name| std::env::var(name).ok())
    }

    /// As [`Gateway::new`], with environment lookups through `env` so tests need not touch the
    /// process environment.
    pub fn with_env(
        config: GatewayConfig,
        store: Store,
        data_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, GatewayError> {
        Self::with_clock(config, store, data_dir, env, Clock::system())
    }

    /// As [`Gateway::with_env`], reading time from `clock`: a test that keeps a clone of it
    /// moves days forward (budgets, grace periods, rate windows) over real sockets.
    pub fn with_clock(
        config: GatewayConfig,
        store: Store,
        data_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        clock: Clock,
    ) -> Result<Arc<Self>, GatewayError> {
        config.check()?;
        let secret = config::load_gateway_secret(config.secret.as_ref(), data_dir, env)?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let mut keys = Vec::with_capacity(route.credentials.len());
            for source in &route.credentials {
                let secret = source.load(env)?;
                let value = route.inject.format.replace("{key}", secret.expose());
                let mut header_value = http::HeaderValue::from_str(&value).map_err(|_| {
                    GatewayError::Config(format!(
                        "gateway route `{}`: a key contains characters not allowed in a header",
                        route.name
                    ))
                })?;
                header_value.set_sensitive(true);
                keys.push(UpstreamKey {
                    secret,
                    header_value,
                    consecutive_failures: AtomicU32::new(0),
                    rested_until_ms: AtomicU64::new(0),
                });
            }
            let redactor = redact::Redactor::new(keys.iter().map(|key| key.secret.expose()));
            let inject_header = http::HeaderName::from_bytes(route.inject.header.as_bytes())
                .map_err(|_| {
                    GatewayError::Config(format!(
                        "gateway route `{}`: inject.header is not a valid header name",
                        route.name
                    ))
                })?;
            let (origin, host) = upstream_origin(route)?;
            routes.push(Route {
                inject_header,
                prefix: route.prefix.trim_end_matches('/').to_owned(),
                index: 0,
                origin,
                host,
                upstream_path: route.upstream.path().trim_end_matches('/').to_owned(),
                endpoints: route.allowed_endpoints(),
                headers: headers::HeaderPolicy::new(route)?,
                redactor,
                config: route.clone(),
                keys,
            });
        }
        // Longest prefix first, so `/a/b` wins over `/a`.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        for (index, route) in routes.iter_mut().enumerate() {
            route.index = index;
        }
        // Redirects are never followed: the consumer gets the 3xx as it is, and the injected
        // credential never travels to wherever the upstream points.
        let shared_upstreams = Arc::new(upstream::Upstreams::new(routes.len())?);
        let usage = store.tree(USAGE_TREE)?;
        let accounting = accounting::Accounting::new(
            store.clone(),
            usage.clone(),
            store.tree(AUDIT_TREE)?,
            config.audit_retention_days,
            clock.now_ms(),
        )?;
        Ok(Arc::new(Self {
            consumers: store.tree(CONSUMERS_TREE)?,
            token_hashes: store.tree(TOKEN_HASHES_TREE)?,
            usage,
            accounting,
            known_tokens: KnownTokens::default(),
            store,
            config,
            routes,
            secret,
            clock,
            limits: limits::Limits::default(),
            shared_upstreams,
        }))
    }

    /// The settings this gateway runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Serves the proxy on `listener` until `shutdown` is cancelled, then waits for open requests.
    /// It runs on `gateway.threads` threads of its own (see [`listen`]), or on the caller's
    /// runtime when that is 0; usage and audit batches are written from the caller's runtime.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let writer = tokio::spawn(Arc::clone(&self).write_accounting(shutdown.clone()));
        let served =
            listen::serve(Arc::clone(&self), listener, self.config.threads, shutdown).await;
        // Open requests are done: the last charges and audit records go to disk now.
        writer.abort();
        if let Err(error) = self.accounting.flush().await {
            tracing::warn!(%error, "cannot write the last gateway usage and audit records");
        }
        served
    }

    /// Writes batched usage and audit records every `accounting_flush_ms` and makes them durable.
    async fn write_accounting(self: Arc<Self>, shutdown: CancellationToken) {
        let period = std::time::Duration::from_millis(self.config.accounting_flush_ms);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.write_accounting_batch().await {
                tracing::warn!(%error, "cannot write gateway usage and audit records");
            }
        }
    }

    /// One batch of accounting into sled, then to disk. The batch (a sled write per audit
    /// record, thousands a second under load) runs on the blocking pool: on a runtime worker it
    /// held up every request queued behind it for the length of the batch.
    async fn write_accounting_batch(self: &Arc<Self>) -> Result<(), StoreError> {
        let gateway = Arc::clone(self);
        let wrote = tokio::task::spawn_blocking(move || gateway.accounting.write_pending())
            .await
            .map_err(|error| StoreError::Sled(sled::Error::Io(std::io::Error::other(error))))??;
        if wrote {
            self.store.flush().await?;
        }
        Ok(())
    }

    /// Requests refused for a missing or unknown token since start (counted in memory only).
    pub fn unauthenticated_refusals(&self) -> u64 {
        self.accounting.unauthenticated()
    }

    /// Serves the proxy on a Unix socket (the sandboxes' relay reaches it there) until
    /// `shutdown` is cancelled.
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }

    /// The proxy as a router (every path goes to the proxy handler).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        proxy::router(Arc::clone(self))
    }

    /// The token of the consumer for `agent_id`, creating the consumer with the default policy
    /// when it does not exist. The Manager calls this when it creates a Worker, and again after a
    /// restart: the token is derived, never stored.
    pub async fn consumer_token(&self, agent_id: &str) -> Result<Secret, GatewayError> {
        let (record, _) = self.ensure_consumer(agent_id, None)?;
        if record.revoked {
            return Err(GatewayError::Revoked(agent_id.to_owned()));
        }
        self.store.flush().await?;
        Ok(derive_token(&self.secret, &record.id, record.generation))
    }

    /// Creates a consumer (or re-enables a revoked one with a fresh token), optionally with its
    /// own policy, and returns its record and current token.
    pub async fn add_consumer(
        &self,
        id: &str,
        policy: Option<ConsumerPolicy>,
    ) -> Result<(ConsumerRecord, Secret), GatewayError> {
        let (mut record, created) = self.ensure_consumer(id, policy.clone())?;
        if record.revoked || (!created && policy.is_some()) {
            let now = self.clock.now_ms();
            let updated = self.consumers.update(&id.to_owned(), |current| {
                current.map(|mut current| {
                    if current.revoked {
                        current.revoked = false;
                        current.generation += 1;
                        current.previous = None;
                    }
                    if let Some(policy) = &policy {
                        current.policy = policy.clone();
                    }
                    current
                })
            })?;
            record = updated.ok_or_else(|| GatewayError::UnknownConsumer(id.to_owned()))?;
            self.index_token(&record)?;
            self.limits.forget(id);
            tracing::info!(consumer = id, at_ms = now, "gateway consumer re-enabled");
        }
        self.store.flush().await?;
        let token = derive_token(&self.secret, &record.id, record.generation);
        Ok((record, token))
    }

    /// Issues a new token; the old one keeps working for `rotation_grace_secs`.
    pub async fn rotate(&self, id: &str) -> Result<(ConsumerRecord, Secret), GatewayError> {
        match self.consumers.get(&id.to_owned())? {
            None => return Err(GatewayError::UnknownConsumer(id.to_owned())),
            Some(record) if record.revoked => return Err(GatewayError::Revoked(id.to_owned())),
            Some(_) => {}
        }
        let valid_until_ms = self.clock.now_ms() + self.config.rotation_grace_secs * 1000;
        let record = self
            .consumers
            .update(&id.to_owned(), |current| {
                current.map(|mut current| {
                    current.previous = Some(PreviousToken {
                        generation: current.generation,
                        valid_until_ms,
                    });
                    current.generation += 1;
                    current
                })
            })?
            .ok_or_else(|| GatewayError::UnknownConsumer(id.to_owned()))?;
        if record.revoked {
            return Err(GatewayError::Revoked(id.to_owned()));
        }
        self.index_token(&record)?;
        self.store.flush().await?;
        tracing::info!(
            consumer = id,
            generation = record.generation,
            "gateway consumer token rotated"
        );
        let token = derive_token(&self.secret, &record.id, record.generation);
        Ok((record, token))
    }

    /// Refuses every token of this consumer from the next request on.
    pub async fn revoke(&self, id: &str) -> Result<ConsumerRecord, GatewayError> {
        let record = self
            .consumers
            .update(&id.to_owned(), |current| {
                current.map(|mut current| {
                    current.revoked = true;
                    current.previous = None;
                    current
                })
            })?
            .ok_or_else(|| GatewayError::UnknownConsumer(id.to_owned()))?;
        self.known_tokens.forget_all();
        self.limits.forget(id);
        self.store.flush().await?;
        tracing::info!(consumer = id, "gateway consumer revoked");
        Ok(record)
    }

    /// Every consumer with today's usage.
    pub fn consumers(&self) -> Result<Vec<ConsumerInfo>, GatewayError> {
        let today = self.clock.now_ms() / MS_PER_DAY;
        let mut out = Vec::new();
        for entry in self.consumers.iter() {
            let (_, record) = entry?;
            let today = self.usage_on(&record.id, today)?;
            out.push(ConsumerInfo {
                id: record.id.clone(),
                generation: record.generation,
                revoked: record.revoked,
                previous_valid_until_ms: record.previous.as_ref().map(|p| p.valid_until_ms),
                policy: record.policy,
                today,
            });
        }
        Ok(out)
    }

    /// Usage per consumer and day, oldest day first within each consumer.
    pub fn usage(&self) -> Result<Vec<UsageRow>, GatewayError> {
        self.accounting.write_pending()?;
        let mut out = Vec::new();
        for entry in self.usage.iter() {
            let (key, usage) = entry?;
            if let Some((consumer, day)) = split_usage_key(&key) {
                out.push(UsageRow {
                    consumer: consumer.to_owned(),
                    day,
                    usage,
                });
            }
        }
        Ok(out)
    }

    /// The most recent audit records, newest last.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, GatewayError> {
        self.accounting.write_pending()?;
        Ok(self.accounting.recent_audit(limit)?)
    }

    fn ensure_consumer(
        &self,
        id: &str,
        policy: Option<ConsumerPolicy>,
    ) -> Result<(ConsumerRecord, bool), GatewayError> {
        if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_control()) {
            return Err(GatewayError::InvalidConsumerId(id.to_owned()));
        }
        let key = id.to_owned();
        if let Some(record) = self.consumers.get(&key)? {
            return Ok((record, false));
        }
        let record = ConsumerRecord {
            id: key.clone(),
            generation: 0,
            previous: None,
            revoked: false,
            policy: policy.unwrap_or_else(|| self.config.consumer_defaults.clone()),
            created_ms: self.clock.now_ms(),
        };
        if self.consumers.insert_new(&key, &record)? {
            self.index_token(&record)?;
            tracing::info!(consumer = id, "gateway consumer created");
            Ok((record, true))
        } else {
            // Someone else created it at the same moment; theirs wins.
            let record = self
                .consumers
                .get(&key)?
                .ok_or_else(|| GatewayError::UnknownConsumer(id.to_owned()))?;
            Ok((record, false))
        }
    }

    /// Records the hash of the consumer's current token (and forgets the remembered ones, since
    /// the consumer changed).
    fn index_token(&self, record: &ConsumerRecord) -> Result<(), GatewayError> {
        let token = derive_token(&self.secret, &record.id, record.generation);
        self.token_hashes.insert(
            &token_hash(token.expose()),
            &TokenRef {
                consumer: record.id.clone(),
                generation: record.generation,
            },
        )?;
        self.known_tokens.forget_all();
        Ok(())
    }

    /// Finds the consumer a presented token belongs to, if the token is currently accepted.
    ///
    /// Known tokens are remembered in memory ([`KnownTokens`]), so the request path reads no
    /// database; any change to a consumer forgets them all before it returns.
    fn authenticate(&self, token: &str) -> Result<Authenticated, GatewayError> {
        let hash = token_hash(token);
        let (reference, record) = match self.known_tokens.get(&hash) {
            Some(known) => known,
            None => {
                let epoch = self.known_tokens.epoch();
                let Some(reference) = self.token_hashes.get(&hash)? else {
                    return Ok(Authenticated::Unknown);
                };
                let Some(record) = self.consumers.get(&reference.consumer)? else {
                    return Ok(Authenticated::Unknown);
                };
                let known = (reference.generation, Arc::new(record));
                self.known_tokens.remember(epoch, hash, known.clone());
                known
            }
        };
        if record.revoked {
            return Ok(Authenticated::Revoked);
        }
        if record.accepts(reference, self.clock.now_ms()) {
            Ok(Authenticated::Consumer(record))
        } else {
            Ok(Authenticated::Expired)
        }
    }

    fn usage_on(&self, consumer: &str, day: u64) -> Result<Usage, GatewayError> {
        Ok(self.accounting.usage_on(consumer, day)?)
    }

    /// Adds one request and its tokens to today's usage (written to sled in the next batch).
    fn charge(&self, consumer: &str, usage: &Usage) {
        let day = self.clock.now_ms() / MS_PER_DAY;
        self.accounting.charge(consumer, day, usage);
    }

    /// Audits one request: to sled in the next batch (the audit trail, `crew gateway usage`),
    /// and to tracing at debug level (`RUST_LOG=matrix_crew::gateway::audit=debug`): a log
    /// line per request at the default `info` cost a locked, unbuffered stderr write on every
    /// call, measured as the largest single item of the gateway's time. Refusals of requests
    /// without a valid token are only counted in memory (see [`accounting`]).
    fn record_audit(&self, record: AuditRecord) {
        tracing::debug!(
            target: "matrix_crew::gateway::audit",
            consumer = record.consumer.as_deref().unwrap_or("-"),
            route = record.route.as_deref().unwrap_or("-"),
            model = record.model.as_deref().unwrap_or("-"),
            status = record.status,
            code = record.code.as_deref().unwrap_or("-"),
            total_tokens = record.total_tokens,
            latency_ms = record.latency_ms,
            "gateway request"
        );
        if record.consumer.is_none() {
            self.accounting.count_unauthenticated();
        } else {
            self.accounting.audit(record);
        }
    }
}

enum Authenticated {
    Consumer(Arc<ConsumerRecord>),
    Unknown,
    Revoked,
    /// A rotated-out token after its grace period.
    Expired,
}

fn usage_key(consumer: &str, day: u64) -> String {
    // NUL cannot appear in consumer ids (control characters are refused), so the split is exact;
    // the zero-padded day keeps one consumer's days in order.
    format!("{consumer}\0{day:08}")
}

fn split_usage_key(key: &str) -> Option<(&str, u64)> {
    let (consumer, day) = key.rsplit_once('\0')?;
    Some((consumer, day.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit_at(at_ms: u64) -> AuditRecord {
        AuditRecord {
            at_ms,
            consumer: Some("a".into()),
            route: None,
            model: None,
            status: 200,
            code: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            latency_ms: 0,
        }
    }

    #[test]
    fn old_audit_records_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let config = GatewayConfig {
            audit_retention_days: 2,
            ..GatewayConfig::default()
        };
        let gateway =
            Gateway::with_env(config, Store::temporary().unwrap(), dir.path(), &|_| None).unwrap();
        for day in 0..5 {
            gateway.record_audit(audit_at(day * MS_PER_DAY));
        }
        gateway.accounting.write_pending().unwrap();
        gateway.accounting.prune_audit(5 * MS_PER_DAY).unwrap();
        let kept: Vec<u64> = gateway
            .audit_log(10)
            .unwrap()
            .iter()
            .map(|r| r.at_ms / MS_PER_DAY)
            .collect();
        assert_eq!(kept, vec![3, 4]);
    }

    #[test]
    fn audit_records_stored_one_per_value_and_in_batches_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::temporary().unwrap();
        // Written one record per value, as before batching.
        let legacy: Tree<u64, AuditRecord> = store.tree(AUDIT_TREE).unwrap();
        for day in 3..5 {
            legacy
                .insert(&store.next_id().unwrap(), &audit_at(day * MS_PER_DAY))
                .unwrap();
        }
        let config = GatewayConfig {
            audit_retention_days: 10,
            ..GatewayConfig::default()
        };
        let gateway = Gateway::with_env(config, store, dir.path(), &|_| None).unwrap();
        for day in 5..8 {
            gateway.record_audit(audit_at(day * MS_PER_DAY));
        }
        let days = |records: Vec<AuditRecord>| -> Vec<u64> {
            records.iter().map(|r| r.at_ms / MS_PER_DAY).collect()
        };
        assert_eq!(days(gateway.audit_log(10).unwrap()), vec![3, 4, 5, 6, 7]);
        assert_eq!(days(gateway.audit_log(4).unwrap()), vec![4, 5, 6, 7]);
        // A whole old value goes; a value that straddles the cutoff keeps its newer records.
        gateway.accounting.prune_audit(14 * MS_PER_DAY).unwrap();
        assert_eq!(days(gateway.audit_log(10).unwrap()), vec![4, 5, 6, 7]);
        gateway.accounting.prune_audit(16 * MS_PER_DAY).unwrap();
        assert_eq!(days(gateway.audit_log(10).unwrap()), vec![6, 7]);
    }

    #[test]
    fn usage_keys_round_trip() {
        assert_eq!(
            split_usage_key(&usage_key("@a:b.org", 20_416)),
            Some(("@a:b.org", 20_416))
        );
    }
}
