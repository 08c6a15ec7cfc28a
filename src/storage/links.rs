//! Signed, expiring links to stored files, and the chat references that carry them.
//!
//! People open files from any Matrix client, a phone included, through a link served by `crew`:
//! `<public_base_url>/files/<path>?expires=<unix seconds>&sig=<HMAC>`. The HMAC-SHA256 covers the
//! path and the expiry, so a link opens one file until one moment and nothing else. Without a
//! public base URL (or when an agent asks for an upload and the file is small) the reference
//! says to upload the file to Matrix as `m.file` instead; the Matrix client does that upload.
//! Not an access-control system for agents (see `access`): a link is a bearer capability.

use std::path::Path;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{ObjectMeta, Storage, StorageConfig, StorageError, StoragePath};
use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation for the MAC, so a signature made for anything else never validates here.
const SIGNATURE_CONTEXT: &str = "matrix-crew file link v1";

/// Signs and checks file links.
#[derive(Clone)]
pub struct Links {
    secret: Secret,
    public_base_url: Option<url::Url>,
    ttl: Duration,
    upload_max_bytes: u64,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field(
                "public_base_url",
                &self.public_base_url.as_ref().map(url::Url::as_str),
            )
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Reads the signing secret from the variable `config.link_secret_env` names (or its `_FILE`
    /// twin) through `env`, or, when none is configured, from `<data_dir>/links.secret`,
    /// generating it (mode 0600) on first use so links survive restarts.
    pub fn open(
        config: &StorageConfig,
        data_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        let secret = match &config.link_secret_env {
            Some(name) => crate::config::secret_from_env(&env, name)
                .map_err(|error| StorageError::Config(error.to_string()))?
                .filter(|secret| !secret.is_empty())
                .ok_or_else(|| {
                    StorageError::Config(format!(
                        "storage.link_secret_env names ${name}, but neither ${name} nor ${name}_FILE is set"
                    ))
                })?,
            None => {
                let path = data_dir.join("links.secret");
                crate::admin::load_or_create_token(&path).map_err(|source| StorageError::Io {
                    action: "reading or creating the link secret",
                    path: path.display().to_string(),
                    source,
                })?
            }
        };
        Ok(Self::new(
            secret,
            config.public_base_url.clone(),
            Duration::from_secs(config.link_ttl_secs),
            config.upload_max_bytes,
        ))
    }

    /// Builds a signer from its parts.
    pub fn new(
        secret: Secret,
        public_base_url: Option<url::Url>,
        ttl: Duration,
        upload_max_bytes: u64,
    ) -> Self {
        Self {
            secret,
            public_base_url,
            ttl,
            upload_max_bytes,
        }
    }

    /// A link to `path` valid until `now + ttl`; `None` without a public base URL.
    pub fn link(&self, path: &StoragePath, now: SystemTime) -> Option<SignedLink> {
        let expires_unix = unix(now).saturating_add(self.ttl.as_secs());
        self.link_until(path, expires_unix)
    }

    /// A link to `path` valid until `expires_unix` (seconds since the epoch).
    pub fn link_until(&self, path: &StoragePath, expires_unix: u64) -> Option<SignedLink> {
        let base = self.public_base_url.as_ref()?;
        let encoded: Vec<String> = path
            .segments()
            .map(|segment| percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string())
            .collect();
        let url = format!(
            "{}/files/{}?expires={expires_unix}&sig={}",
            base.as_str().trim_end_matches('/'),
            encoded.join("/"),
            self.signature(path.as_str(), expires_unix)
        );
        Some(SignedLink { url, expires_unix })
    }

    /// Checks a presented link: the signature first (a changed link is refused whatever its
    /// expiry), then the expiry against `now`.
    pub fn verify(
        &self,
        path: &str,
        expires_unix: u64,
        signature: &str,
        now: SystemTime,
    ) -> Result<(), LinkError> {
        use base64::Engine;
        let presented = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| LinkError::BadSignature)?;
        self.mac(path, expires_unix)
            .verify_slice(&presented)
            .map_err(|_| LinkError::BadSignature)?;
        if unix(now) >= expires_unix {
            return Err(LinkError::Expired { expires_unix });
        }
        Ok(())
    }

    fn mac(&self, path: &str, expires_unix: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.secret.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(format!("{SIGNATURE_CONTEXT}\n{path}\n{expires_unix}").as_bytes());
        mac
    }

    fn signature(&self, path: &str, expires_unix: u64) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.mac(path, expires_unix).finalize().into_bytes())
    }

    /// What an agent posts when it mentions `path` in chat. `prefer_upload` is the agent asking
    /// for the file itself in the room (small files only).
    pub async fn reference(
        &self,
        storage: &Storage,
        path: &StoragePath,
        prefer_upload: bool,
        now: SystemTime,
    ) -> Result<FileReference, StorageError> {
        let meta = storage.head(path).await?;
        let caption = format!("`{}` ({})", meta.path, human_size(meta.size));
        let fits_upload = meta.size <= self.upload_max_bytes;
        let link = if prefer_upload && fits_upload {
            None
        } else {
            self.link(path, now)
        };
        Ok(match link {
            Some(link) => FileReference::Link {
                text: format!(
                    "{caption}: {} (link valid until {})",
                    link.url,
                    format_utc(link.expires_unix)
                ),
                link,
                meta,
            },
            None if fits_upload => FileReference::UploadAsFile {
                file_name: path.file_name().to_owned(),
                caption,
                meta,
            },
            None => FileReference::PathOnly {
                text: format!(
                    "{caption}: too large to upload to chat (limit {}); the operator can fetch it with `crew files get {}` or set storage.public_base_url for links",
                    human_size(self.upload_max_bytes),
                    meta.path
                ),
                meta,
            },
        })
    }
}

/// Characters escaped inside one path segment of a link (everything but unreserved ones).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A signed URL and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedLink {
    pub url: String,
    pub expires_unix: u64,
}

/// How to mention a file in chat.
#[derive(Debug, Clone)]
pub enum FileReference {
    /// Post `text` (path, size, signed link).
    Link {
        text: String,
        link: SignedLink,
        meta: ObjectMeta,
    },
    /// Upload the file to Matrix media and send it as `m.file` named `file_name` with `caption`
    /// (read it with [`Storage::get_bytes`]); there is no public base URL, or the agent asked.
    UploadAsFile {
        file_name: String,
        caption: String,
        meta: ObjectMeta,
    },
    /// Neither works (no public base URL and too large to upload): post `text`, which says so.
    PathOnly { text: String, meta: ObjectMeta },
}

/// Why a link was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The signature does not match: the link was changed, or made by another server.
    #[error(
        "this link is not valid: it was changed or made for another server; ask for a fresh link"
    )]
    BadSignature,
    /// The link was valid but its time is up.
    #[error("this link expired at {}; ask the agent for a fresh link", format_utc(*.expires_unix))]
    Expired { expires_unix: u64 },
    /// `expires` or `sig` is missing from the query.
    #[error("this link is incomplete (expires= and sig= are required); copy the whole link")]
    Incomplete,
}

impl LinkError {
    fn status(&self) -> StatusCode {
        match self {
            LinkError::Expired { .. } => StatusCode::GONE,
            LinkError::BadSignature | LinkError::Incomplete => StatusCode::FORBIDDEN,
        }
    }
}

#[derive(Clone)]
struct LinkState {
    storage: Storage,
    links: Links,
}

#[derive(Deserialize)]
struct LinkQuery {
    expires: Option<u64>,
    sig: Option<String>,
}

/// Serves `GET /files/<path>?expires=…&sig=…`, streaming the file. Mount it where
/// `storage.public_base_url` points (its path is `/files/…` below that URL). Expired links
/// answer 410, changed or incomplete ones 403, each with a sentence for the person clicking.
pub fn links_router(storage: Storage, links: Links) -> Router {
    Router::new()
        .route("/files/{*path}", axum::routing::get(serve_link))
        .with_state(LinkState { storage, links })
}

async fn serve_link(
    State(state): State<LinkState>,
    UrlPath(path): UrlPath<String>,
    Query(query): Query<LinkQuery>,
) -> Response {
    let (Some(expires), Some(sig)) = (query.expires, query.sig) else {
        return refuse(LinkError::Incomplete);
    };
    if let Err(error) = state.links.verify(&path, expires, &sig, SystemTime::now()) {
        return refuse(error);
    }
    let result = match StoragePath::parse(&path) {
        Ok(path) => state.storage.get(&path).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(object) => {
            let mut response = Body::from_stream(object.body).into_response();
            let headers = response.headers_mut();
            let mut insert = |name, value: String| {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            };
            insert(header::CONTENT_TYPE, object.meta.content_type.clone());
            insert(header::CONTENT_LENGTH, object.meta.size.to_string());
            let name = object.meta.path.rsplit('/').next().unwrap_or("file");
            insert(
                header::CONTENT_DISPOSITION,
                format!(
                    "inline; filename*=UTF-8''{}",
                    percent_encoding::utf8_percent_encode(name, SEGMENT)
                ),
            );
            // Stored files are untrusted: never let an HTML or SVG file run script on our origin.
            insert(header::CONTENT_SECURITY_POLICY, "sandbox".into());
            insert(header::X_CONTENT_TYPE_OPTIONS, "nosniff".into());
            insert(header::CACHE_CONTROL, "private, no-store".into());
            response
        }
        Err(StorageError::NotFound { .. } | StorageError::InvalidPath { .. }) => (
            StatusCode::NOT_FOUND,
            "this file is no longer there; ask the agent where it went",
        )
            .into_response(),
        Err(error) => {
            tracing::warn!(%error, "serving a file link failed");
            (
                StatusCode::BAD_GATEWAY,
                "the file store is not answering right now; try again later",
            )
                .into_response()
        }
    }
}

fn refuse(error: LinkError) -> Response {
    (error.status(), error.to_string()).into_response()
}

/// `1536` → `1.5 KB`: sizes people read at a glance (binary multiples, as file managers show).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

pub use crate::clock::format_utc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_file_manager() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KB");
        assert_eq!(human_size(50 * 1024 * 1024), "50 MB");
        assert_eq!(human_size(3 * 1024 * 1024 * 1024), "3.0 GB");
    }

    #[test]
    fn dates_format_in_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(1_709_210_096), "2024-02-29 12:34 UTC");
    }

    #[test]
    fn signatures_bind_path_and_expiry() {
        let links = Links::new(
            Secret::new("very-secret-key"),
            Some("https://crew.example.org/".parse().expect("valid url")),
            Duration::from_secs(60),
            1024,
        );
        let path = StoragePath::parse("tasks/1/a b.md").expect("valid");
        let link = links
            .link_until(&path, 2_000_000_000)
            .expect("base url set");
        assert!(
            link.url.starts_with(
                "https://crew.example.org/files/tasks/1/a%20b.md?expires=2000000000&sig="
            ),
            "{}",
            link.url
        );
        let sig = link.url.rsplit("sig=").next().expect("has sig");
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_999_999_999);
        assert_eq!(
            links.verify(path.as_str(), 2_000_000_000, sig, before),
            Ok(())
        );
        assert_eq!(
            links.verify("tasks/1/other.md", 2_000_000_000, sig, before),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            links.verify(path.as_str(), 2_000_000_001, sig, before),
            Err(LinkError::BadSignature)
        );
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        assert!(matches!(
            links.verify(path.as_str(), 2_000_000_000, sig, after),
            Err(LinkError::Expired { .. })
        ));
        assert!(!format!("{links:?}").contains("very-secret-key"));
    }
}
