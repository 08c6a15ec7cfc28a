//! Which request headers go upstream: an allowlist per route kind, plus what the route sets.
//!
//! A consumer must not be able to choose whose bill it runs up or which upstream account it acts
//! as: headers such as `OpenAI-Organization` and `OpenAI-Project` select billing, and an
//! `X-Forwarded-Host` or a second credential header can steer some upstreams. So nothing is
//! forwarded unless it is on the route kind's short list (content negotiation, SDK identification,
//! idempotency) or on the route's own `forward_headers`; the route's `set_headers` (e.g. the
//! operator's own `OpenAI-Organization`) are put on every forwarded request, replacing whatever
//! the consumer sent.
//!
//! Not for: response headers (see [`super::proxy`]) or the injected credential.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::GatewayError;
use super::config::{RouteConfig, RouteKind};

/// Headers every route kind forwards.
const COMMON: &[&str] = &[
    "accept",
    "content-type",
    "user-agent",
    "x-request-id",
    "idempotency-key",
];

/// Headers LLM APIs use besides the common ones (OpenAI SDK options, Anthropic versioning).
const OPENAI_KIND: &[&str] = &["openai-beta", "anthropic-version", "anthropic-beta"];
/// Prefixes of headers the OpenAI SDKs send to identify themselves (`x-stainless-lang`, …).
const OPENAI_KIND_PREFIXES: &[&str] = &["x-stainless-"];

/// Headers plain HTTP APIs use for caching, ranges and versioning (GitHub's included).
const HTTP_KIND: &[&str] = &[
    "accept-language",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "range",
    "x-github-api-version",
];

/// The header policy of one route, prepared once at start-up.
pub(super) struct HeaderPolicy {
    kind: RouteKind,
    /// The route's `forward_headers`, lowercased.
    extra: Vec<HeaderName>,
    /// The route's `set_headers`, put on every forwarded request.
    set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderPolicy {
    pub(super) fn new(route: &RouteConfig) -> Result<Self, GatewayError> {
        let invalid =
            |what: &str| GatewayError::Config(format!("gateway route `{}`: {what}", route.name));
        let mut extra = Vec::with_capacity(route.forward_headers.len());
        for name in &route.forward_headers {
            extra.push(
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(&format!("forward_headers: `{name}` is not a header name"))
                })?,
            );
        }
        let mut set = Vec::with_capacity(route.set_headers.len());
        for (name, value) in &route.set_headers {
            let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid(&format!("set_headers: `{name}` is not a header name")))?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                invalid(&format!("set_headers: the value of `{name}` is not valid"))
            })?;
            value.set_sensitive(true);
            set.push((name, value));
        }
        Ok(Self {
            kind: route.kind,
            extra,
            set,
        })
    }

    fn allows(&self, name: &HeaderName) -> bool {
        let name_str = name.as_str();
        COMMON.contains(&name_str)
            || match self.kind {
                RouteKind::Openai => {
                    OPENAI_KIND.contains(&name_str)
                        || OPENAI_KIND_PREFIXES
                            .iter()
                            .any(|prefix| name_str.starts_with(prefix))
                }
                RouteKind::Http => HTTP_KIND.contains(&name_str),
            }
            || self.extra.contains(name)
    }

    /// The headers to send upstream for a consumer's `incoming` headers (the credential is added
    /// later, per key).
    pub(super) fn forwarded(&self, incoming: &HeaderMap) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(incoming.len().min(16) + self.set.len());
        for (name, value) in incoming {
            if self.allows(name) && !self.set.iter().any(|(set, _)| set == name) {
                headers.append(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteKind) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            prefix: "/r".into(),
            upstream: "http://127.0.0.1:1/v1".parse().unwrap(),
            kind,
            inject: Default::default(),
            credentials: vec![],
            endpoints: None,
            forward_headers: vec![],
            set_headers: Default::default(),
        }
    }

    fn incoming() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("openai-organization", "org-attacker"),
            ("openai-project", "proj-attacker"),
            ("x-stainless-lang", "python"),
            ("x-forwarded-host", "elsewhere"),
            ("cookie", "a=b"),
            ("if-none-match", "\"etag\""),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        headers
    }

    #[test]
    fn billing_selectors_and_unknown_headers_are_dropped() {
        let forwarded = HeaderPolicy::new(&route(RouteKind::Openai))
            .unwrap()
            .forwarded(&incoming());
        let mut names: Vec<&str> = forwarded.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-stainless-lang"]);
        let forwarded = HeaderPolicy::new(&route(RouteKind::Http))
            .unwrap()
            .forwarded(&incoming());
        let mut names: Vec<&str> = forwarded.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "if-none-match"]);
    }

    #[test]
    fn the_route_sets_its_own_billing_headers_and_may_forward_more() {
        let mut config = route(RouteKind::Openai);
        config
            .set_headers
            .insert("OpenAI-Organization".into(), "org-operator".into());
        config.forward_headers.push("Cookie".into());
        let forwarded = HeaderPolicy::new(&config).unwrap().forwarded(&incoming());
        assert_eq!(forwarded["openai-organization"], "org-operator");
        assert_eq!(forwarded.get_all("openai-organization").iter().count(), 1);
        assert_eq!(forwarded["cookie"], "a=b");
        assert!(forwarded.get("openai-project").is_none());
    }
}
