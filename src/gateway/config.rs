//! Gateway settings: the listener, the upstream routes and the defaults for new consumers.
//!
//! Not for: secrets. Real keys and the gateway secret are named here by where they come from (an
//! environment variable or a file), never written inline, so a committed config file leaks nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::GatewayError;
use crate::secret::Secret;

/// Settings for the gateway listener, its routes and consumers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on. Workers reach it here; keep it off the public internet.
    pub bind: SocketAddr,
    /// The upstreams Workers may call, each under its own path prefix.
    pub routes: Vec<RouteConfig>,
    /// Policy given to each consumer when it is created (one consumer per agent).
    pub consumer_defaults: ConsumerPolicy,
    /// Where the gateway secret comes from. Consumer tokens are derived from it, so changing it
    /// invalidates every token. When unset, a random secret is generated into
    /// `<data_dir>/gateway.secret` (mode 0600) on first start.
    pub secret: Option<SecretSource>,
    /// Seconds an old token keeps working after a rotation, so in-flight agents can switch over.
    pub rotation_grace_secs: u64,
    /// Seconds to wait for an upstream's response headers before answering 504.
    pub upstream_timeout_secs: u64,
    /// Largest request body accepted, in bytes (LLM requests carry whole conversations).
    pub max_request_bytes: usize,
    /// Consecutive failures after which an upstream key is rested (when the route has others).
    pub key_failure_threshold: u32,
    /// Seconds a failing upstream key is rested before it is tried again.
    pub key_rest_secs: u64,
    /// Days audit records are kept in the database (older ones are pruned as new ones arrive).
    pub audit_retention_days: u64,
    /// LLM tokens all consumers together may use per UTC day; 0 means unlimited. A spending cap
    /// over every agent that no prompt can talk around.
    pub global_daily_token_budget: u64,
    /// Milliseconds between writes of usage charges and audit records to the database (they are
    /// batched so that no request waits for a write); a crash loses at most this much accounting.
    pub accounting_flush_ms: u64,
    /// Threads the gateway serves on, each with its own runtime and upstream connections, so
    /// that a request and its upstream call never hand over between threads; 0 serves on crew's
    /// shared runtime. One is enough for a team's traffic and leaves the other cores to the rest.
    pub threads: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9003".parse().expect("valid literal address"),
            routes: Vec::new(),
            consumer_defaults: ConsumerPolicy::default(),
            secret: None,
            rotation_grace_secs: 300,
            upstream_timeout_secs: 300,
            max_request_bytes: 16 * 1024 * 1024,
            key_failure_threshold: 3,
            key_rest_secs: 60,
            audit_retention_days: 30,
            global_daily_token_budget: 20_000_000,
            accounting_flush_ms: 1000,
            threads: 1,
        }
    }
}

impl GatewayConfig {
    /// The base URL a client uses for `route` through this gateway, e.g. `http://127.0.0.1:9003/llm`.
    pub fn route_url(&self, route: &str) -> Option<url::Url> {
        let route = self.routes.iter().find(|r| r.name == route)?;
        url::Url::parse(&format!(
            "http://{}{}",
            self.bind,
            route.prefix.trim_end_matches('/')
        ))
        .ok()
    }

    /// Validates what serde cannot: unique names and prefixes, usable upstream URLs.
    pub fn check(&self) -> Result<(), GatewayError> {
        let mut names = std::collections::HashSet::new();
        let mut prefixes = std::collections::HashSet::new();
        for route in &self.routes {
            let invalid = |why: &str| {
                Err(GatewayError::Config(format!(
                    "gateway route `{}`: {why}",
                    route.name
                )))
            };
            if route.name.is_empty() || !names.insert(route.name.as_str()) {
                return invalid("route names must be non-empty and unique");
            }
            if !route.prefix.starts_with('/') || route.prefix.len() < 2 {
                return invalid("prefix must start with `/` and name something, e.g. `/openai`");
            }
            if !prefixes.insert(route.prefix.trim_end_matches('/')) {
                return invalid("another route uses the same prefix");
            }
            if !matches!(route.upstream.scheme(), "http" | "https") {
                return invalid("upstream must be an http(s) URL");
            }
            if route.upstream.host_str().is_none() {
                return invalid("upstream must name a host");
            }
            if !route.upstream.username().is_empty() || route.upstream.password().is_some() {
                return invalid(
                    "upstream must not carry a user name or password; put keys in `credentials`",
                );
            }
            if route.credentials.is_empty() {
                return invalid(
                    "needs at least one credential (`credentials = [{ env = \"…\" }]`)",
                );
            }
            if !route.inject.format.contains("{key}") {
                return invalid("inject.format must contain `{key}`, e.g. `Bearer {key}`");
            }
            if http::HeaderName::from_bytes(route.inject.header.as_bytes()).is_err() {
                return invalid("inject.header is not a valid header name");
            }
            for endpoint in route.endpoints.iter().flatten() {
                if Endpoint::parse(endpoint).is_none() {
                    return invalid(&format!(
                        "endpoints: `{endpoint}` must be a method and a path under the route, e.g. `POST /chat/completions` or `GET /models/*`"
                    ));
                }
            }
        }
        if self.accounting_flush_ms == 0 {
            return Err(GatewayError::Config(
                "gateway.accounting_flush_ms must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// One upstream reachable through the gateway under `prefix`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in policies and audit records, e.g. `openai`.
    pub name: String,
    /// Path prefix on the gateway, e.g. `/openai`; the rest of the path is appended to `upstream`.
    pub prefix: String,
    /// Upstream base URL, e.g. `https://api.openai.com/v1`.
    pub upstream: url::Url,
    /// What kind of API this is; `openai` enables the model allowlist and token accounting.
    #[serde(default)]
    pub kind: RouteKind,
    /// How the real credential is put on the forwarded request.
    #[serde(default)]
    pub inject: Injection,
    /// Where the real keys come from; the first is used, the others are failover keys.
    pub credentials: Vec<SecretSource>,
    /// The methods and paths (relative to the prefix) consumers may call, e.g.
    /// `["POST /chat/completions", "GET /models/*"]`; `*` as the last segment matches one segment.
    /// When unset: for `openai` routes chat completions, embeddings and models
    /// ([`DEFAULT_OPENAI_ENDPOINTS`]), for `http` routes everything.
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    /// Request headers forwarded besides the route kind's own short list (see
    /// [`super::headers`]). Billing selectors such as `OpenAI-Organization` belong in
    /// `set_headers`, not here.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Headers put on every forwarded request, replacing the consumer's, e.g.
    /// `{ "OpenAI-Organization" = "org-…" }`.
    #[serde(default)]
    pub set_headers: std::collections::BTreeMap<String, String>,
}

/// What an `openai` route allows when its `endpoints` are not set.
pub const DEFAULT_OPENAI_ENDPOINTS: &[&str] = &[
    "POST /chat/completions",
    "POST /embeddings",
    "GET /models",
    "GET /models/*",
];

/// One allowed method and path of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    method: http::Method,
    /// Path segments; a `*` matches any one segment.
    segments: Vec<String>,
}

impl Endpoint {
    /// Parses `METHOD /path`.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (method, path) = text.trim().split_once(' ')?;
        let method =
            http::Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes()).ok()?;
        let path = path.trim();
        if !path.starts_with('/') || path.contains("..") {
            return None;
        }
        let segments = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Some(Self { method, segments })
    }

    /// Whether `method` on `rest` (the path after the route prefix) is this endpoint.
    pub(super) fn allows(&self, method: &http::Method, rest: &str) -> bool {
        if *method != self.method {
            return false;
        }
        let mut given = rest.trim_matches('/').split('/').filter(|s| !s.is_empty());
        for segment in &self.segments {
            match given.next() {
                Some(part) if segment == "*" || segment == part => {}
                _ => return false,
            }
        }
        given.next().is_none()
    }
}

impl RouteConfig {
    /// The endpoints consumers may call, or `None` when every method and path is allowed.
    pub(super) fn allowed_endpoints(&self) -> Option<Vec<Endpoint>> {
        match (&self.endpoints, self.kind) {
            (Some(list), _) => Some(list.iter().filter_map(|e| Endpoint::parse(e)).collect()),
            (None, RouteKind::Openai) => Some(
                DEFAULT_OPENAI_ENDPOINTS
                    .iter()
                    .filter_map(|e| Endpoint::parse(e))
                    .collect(),
            ),
            (None, RouteKind::Http) => None,
        }
    }
}

/// The kind of upstream API behind a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// An OpenAI-compatible LLM API: models are checked, usage is read and charged.
    Openai,
    /// Any other HTTP API (GitHub, …): forwarded as is.
    #[default]
    Http,
}

/// Header and format of the injected credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    /// Header name, e.g. `Authorization` or `x-api-key`.
    pub header: String,
    /// Value with `{key}` standing for the key, e.g. `Bearer {key}` or GitHub's `token {key}`.
    pub format: String,
}

impl Default for Injection {
    fn default() -> Self {
        Self {
            header: "authorization".into(),
            format: "Bearer {key}".into(),
        }
    }
}

/// Where a secret is read from. Never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable of the `crew` process.
    Env(String),
    /// A file whose content (trimmed) is the secret.
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret through `env` (a lookup, so tests need not touch the process environment).
    pub fn load(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, GatewayError> {
        let value = match self {
            Self::Env(name) => env(name).ok_or_else(|| {
                GatewayError::Config(format!(
                    "environment variable {name} (named in the gateway config) is not set"
                ))
            })?,
            Self::File(path) => std::fs::read_to_string(path).map_err(|error| {
                GatewayError::Config(format!(
                    "cannot read the secret file {} (named in the gateway config): {error}",
                    path.display()
                ))
            })?,
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(GatewayError::Config(format!(
                "the secret from {self:?} is empty"
            )));
        }
        Ok(Secret::new(value))
    }
}

/// What one consumer may do. `*` in a list allows everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerPolicy {
    /// Route names this consumer may call.
    pub allowed_routes: Vec<String>,
    /// Model names (the JSON body's `model`) allowed on `openai` routes.
    pub allowed_models: Vec<String>,
    /// Requests per minute (a token bucket with this burst); 0 means unlimited.
    pub requests_per_minute: u32,
    /// LLM tokens per UTC day; 0 means unlimited.
    pub daily_token_budget: u64,
    /// Requests in flight at once; 0 means unlimited.
    pub max_concurrent: u32,
}

impl Default for ConsumerPolicy {
    fn default() -> Self {
        Self {
            allowed_routes: vec!["*".into()],
            allowed_models: vec!["*".into()],
            requests_per_minute: 120,
            daily_token_budget: 2_000_000,
            max_concurrent: 8,
        }
    }
}

impl ConsumerPolicy {
    pub(super) fn allows_route(&self, route: &str) -> bool {
        allows(&self.allowed_routes, route)
    }

    pub(super) fn allows_model(&self, model: &str) -> bool {
        allows(&self.allowed_models, model)
    }

    pub(super) fn any_model(&self) -> bool {
        self.allowed_models.iter().any(|m| m == "*")
    }
}

fn allows(list: &[String], name: &str) -> bool {
    list.iter().any(|entry| entry == "*" || entry == name)
}

/// Reads the gateway secret from `source`, or from `<data_dir>/gateway.secret`, creating it
/// (mode 0600) when absent.
pub(super) fn load_gateway_secret(
    source: Option<&SecretSource>,
    data_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, GatewayError> {
    if let Some(source) = source {
        return source.load(env);
    }
    let path = data_dir.join("gateway.secret");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(Secret::new(text.trim())),
        Ok(_) => Err(GatewayError::Config(format!(
            "{} is empty; delete it to generate a new one (this invalidates every consumer token)",
            path.display()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let secret = Secret::random(32);
            std::fs::create_dir_all(data_dir).map_err(|error| {
                GatewayError::Config(format!("cannot create {}: {error}", data_dir.display()))
            })?;
            crate::admin::write_private(&path, secret.expose().as_bytes()).map_err(|error| {
                GatewayError::Config(format!("cannot write {}: {error}", path.display()))
            })?;
            Ok(secret)
        }
        Err(error) => Err(GatewayError::Config(format!(
            "cannot read {}: {error}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
bind = "127.0.0.1:9100"
rotation_grace_secs = 60

[[routes]]
name = "llm"
prefix = "/llm"
upstream = "https://api.openai.com/v1"
kind = "openai"
credentials = [{ env = "OPENAI_API_KEY" }, { file = "/run/secrets/openai-2" }]

[[routes]]
name = "github"
prefix = "/github"
upstream = "https://api.github.com"
inject = { header = "Authorization", format = "token {key}" }
credentials = [{ env = "GITHUB_TOKEN" }]

[consumer_defaults]
allowed_models = ["gpt-4o-mini"]
daily_token_budget = 100000
"#;

    #[test]
    fn an_example_config_parses_and_checks() {
        let config: GatewayConfig = toml::from_str(EXAMPLE).unwrap();
        config.check().unwrap();
        assert_eq!(config.routes[0].kind, RouteKind::Openai);
        assert_eq!(config.routes[1].kind, RouteKind::Http);
        assert_eq!(config.routes[0].inject.format, "Bearer {key}");
        assert_eq!(
            config.routes[0].credentials[1],
            SecretSource::File("/run/secrets/openai-2".into())
        );
        assert_eq!(config.consumer_defaults.allowed_routes, vec!["*"]);
        assert_eq!(config.consumer_defaults.requests_per_minute, 120);
        assert_eq!(
            config.route_url("github").unwrap().as_str(),
            "http://127.0.0.1:9100/github"
        );
    }

    #[test]
    fn an_inline_key_is_not_a_setting() {
        let inline = EXAMPLE.replace(r#"{ env = "GITHUB_TOKEN" }"#, r#"{ key = "ghp_x" }"#);
        assert!(toml::from_str::<GatewayConfig>(&inline).is_err());
    }

    #[test]
    fn bad_routes_and_missing_secrets_say_what_to_fix() {
        let mut config: GatewayConfig = toml::from_str(EXAMPLE).unwrap();
        config.routes[1].prefix = "/llm/".into();
        let error = config.check().unwrap_err().to_string();
        assert!(
            error.contains("github") && error.contains("prefix"),
            "{error}"
        );

        let error = SecretSource::Env("NOT_SET_ANYWHERE".into())
            .load(&|_| None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("NOT_SET_ANYWHERE"), "{error}");

        let mut config: GatewayConfig = toml::from_str(EXAMPLE).unwrap();
        config.routes[1].upstream = "https://user:s3cr3t@api.github.com".parse().unwrap();
        let error = config.check().unwrap_err().to_string();
        assert!(
            error.contains("github") && error.contains("user name or password"),
            "{error}"
        );
        assert!(!error.contains("s3cr3t"), "{error}");
        let error = SecretSource::Env("EMPTY".into())
            .load(&|_| Some("  \n".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("empty"), "{error}");
    }

    #[test]
    fn the_generated_secret_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_gateway_secret(None, dir.path(), &|_| None).unwrap();
        let again = load_gateway_secret(None, dir.path(), &|_| None).unwrap();
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("gateway.secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let from_env =
            load_gateway_secret(Some(&SecretSource::Env("S".into())), dir.path(), &|_| {
                Some("configured".into())
            })
            .unwrap();
        assert_eq!(from_env.expose(), "configured");
    }
}
