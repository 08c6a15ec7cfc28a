//! Shared file storage: the files agents and people exchange instead of pasting them into chat.
//!
//! Intermediate work (specs, plans, progress notes, results, any file) lives here under a fixed
//! layout (`tasks/<id>/`, `agents/<name>/`, `shared/`, see [`access`]), on one of two backends: a
//! directory under the data dir (the default) or an S3 bucket (AWS, MinIO, anything that speaks
//! S3). Bodies always travel as streams, so a 1 GB file never sits in memory. Agents mention a
//! file in chat with a signed, expiring link served by `crew` ([`links`]); operators use
//! `crew files …` ([`cli`]) through the admin endpoint ([`admin`]).
//!
//! Not for durable application state (that is `store`, sled), and not for Matrix media: the
//! Matrix client uploads `m.file` events itself when [`links::FileReference::UploadAsFile`] says so.

pub mod access;
pub mod admin;
pub mod cli;
pub mod links;
mod local;
mod path;
mod s3;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use local::LocalBackend;
pub use path::{MAX_PATH_BYTES, StoragePath, StoragePrefix};
pub use s3::S3Backend;

/// A file body in flight: chunks of bytes, never the whole file at once.
pub type BodyStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + 'static>>;

/// Settings for the file store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where files live: `local` (a directory under the data dir) or `s3`.
    pub backend: BackendKind,
    /// Settings for the `local` backend.
    pub local: LocalConfig,
    /// Settings for the `s3` backend.
    pub s3: S3Config,
    /// Largest file accepted, in bytes; larger uploads are refused and nothing is stored.
    pub max_file_bytes: u64,
    /// Base URL under which `crew` serves signed links (`<base>/files/<path>?expires=…&sig=…`),
    /// reachable by the people in the rooms, e.g. `https://crew.example.org`. Without it, files
    /// are shared as Matrix `m.file` uploads instead.
    pub public_base_url: Option<url::Url>,
    /// How long a signed link stays valid, in seconds.
    pub link_ttl_secs: u64,
    /// Environment variable holding the link signing secret (or `<NAME>_FILE` naming a file that
    /// holds it). Unset: a random secret is generated once into `<data_dir>/links.secret` (0600).
    pub link_secret_env: Option<String>,
    /// Files up to this size may be uploaded to Matrix as `m.file` when an agent asks for an
    /// upload rather than a link (Matrix servers commonly cap media at 50 MB).
    pub upload_max_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Local,
            local: LocalConfig::default(),
            s3: S3Config::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            public_base_url: None,
            link_ttl_secs: DEFAULT_LINK_TTL_SECS,
            link_secret_env: None,
            upload_max_bytes: DEFAULT_UPLOAD_MAX_BYTES,
        }
    }
}

/// 1 GiB: enough for datasets and builds agents produce, small enough to stop a runaway loop
/// from filling the disk.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1024 * 1024 * 1024;
/// Seven days: long enough to read a result after a weekend, short enough that leaked links die.
pub const DEFAULT_LINK_TTL_SECS: u64 = 7 * 24 * 3600;
/// 20 MiB: below the 50 MB media limit most homeservers ship with, small enough for phones.
pub const DEFAULT_UPLOAD_MAX_BYTES: u64 = 20 * 1024 * 1024;

/// Which backend holds the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A directory on this machine.
    #[default]
    Local,
    /// An S3 bucket.
    S3,
}

/// Settings for the local backend.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// The directory; relative paths are taken from the data dir. Default: `<data_dir>/files`.
    pub dir: Option<PathBuf>,
}

/// Settings for the S3 backend. Credentials never live in the config file: they are read from
/// the environment variables named here (or the files named by `<NAME>_FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for MinIO. Unset: AWS for `region`.
    pub endpoint: Option<url::Url>,
    /// Region, e.g. `us-east-1` (MinIO accepts any).
    pub region: String,
    /// The bucket; it must exist (`crew` does not create buckets).
    pub bucket: String,
    /// Path-style addressing (`<endpoint>/<bucket>/<key>`), which MinIO needs.
    pub path_style: bool,
    /// Environment variable with the access key id (or `<NAME>_FILE`).
    pub access_key_env: String,
    /// Environment variable with the secret access key (or `<NAME>_FILE`).
    pub secret_key_env: String,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: String::new(),
            path_style: false,
            access_key_env: "AWS_ACCESS_KEY_ID".into(),
            secret_key_env: "AWS_SECRET_ACCESS_KEY".into(),
        }
    }
}

/// Everything that can go wrong with files; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The path breaks the path rules (see [`StoragePath::parse`]).
    #[error("invalid path `{path}`: {reason}")]
    InvalidPath { path: String, reason: String },
    /// No file at this path.
    #[error("no file at `{path}`")]
    NotFound { path: String },
    /// The file is larger than the configured limit; nothing was stored.
    #[error(
        "`{path}` is larger than the {limit}-byte limit (storage.max_file_bytes); nothing was stored"
    )]
    TooLarge { path: String, limit: u64 },
    /// The access rules do not allow this agent this operation on this path.
    #[error("{agent} may not {action} `{path}`: {reason}")]
    Forbidden {
        agent: String,
        action: &'static str,
        path: String,
        reason: &'static str,
    },
    /// The configured bucket does not exist.
    #[error(
        "S3 bucket `{bucket}` does not exist at {endpoint} (create it, or fix storage.s3.bucket)"
    )]
    BucketMissing { bucket: String, endpoint: String },
    /// The S3 server refused the credentials.
    #[error(
        "S3 at {endpoint} refused the credentials ({code}: {message}); check the access key and secret in ${access_key_env} / ${secret_key_env}"
    )]
    Credentials {
        endpoint: String,
        code: String,
        message: String,
        access_key_env: String,
        secret_key_env: String,
    },
    /// The configuration cannot work (missing bucket name, missing credentials …).
    #[error("storage config: {0}")]
    Config(String),
    /// The S3 server could not be reached or answered something unexpected.
    #[error("S3 {operation} failed: {detail}")]
    S3 {
        operation: &'static str,
        detail: String,
    },
    /// A local file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the body being uploaded failed (the client went away, the source file broke).
    #[error("reading the upload for `{path}` failed: {source}")]
    Body {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What is known about a stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Where it is (a valid [`StoragePath`], as text so it serialises plainly).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// MIME type, derived from the file name (see [`content_type_for`]) so both backends agree.
    pub content_type: String,
    /// Last modification, in seconds since the Unix epoch.
    pub modified_unix: u64,
}

impl ObjectMeta {
    fn new(path: &str, size: u64, modified: Option<SystemTime>) -> Self {
        Self {
            path: path.to_owned(),
            size,
            content_type: content_type_for(path).to_owned(),
            modified_unix: modified
                .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |elapsed| elapsed.as_secs()),
        }
    }
}

/// A file being read: its metadata and its body.
pub struct Object {
    pub meta: ObjectMeta,
    pub body: BodyStream,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object").field("meta", &self.meta).finish()
    }
}

/// The MIME type for a file name, from its extension. Both backends report this, so metadata
/// is the same whichever holds the file.
pub fn content_type_for(path: &str) -> &'static str {
    let extension = path
        .rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        Some("md" | "markdown") => "text/markdown; charset=utf-8",
        Some(
            "txt" | "log" | "rs" | "py" | "toml" | "yaml" | "yml" | "sh" | "ts" | "go" | "c" | "h"
            | "cpp" | "java" | "sql" | "diff" | "patch",
        ) => "text/plain; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("json") => "application/json",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("gz" | "tgz") => "application/gzip",
        Some("tar") => "application/x-tar",
        Some("mp3") => "audio/mpeg",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// The two backends. An enum rather than a trait object: there are exactly two, and a `match`
/// keeps every operation's behaviour for both side by side.
#[derive(Debug)]
pub enum Backend {
    Local(LocalBackend),
    S3(S3Backend),
}

/// The file store: a backend plus the rules every write obeys (path validation, size limit).
/// Cheap to clone; share one per process.
#[derive(Debug, Clone)]
pub struct Storage {
    backend: Arc<Backend>,
    max_file_bytes: u64,
}

impl Storage {
    /// Opens the backend the config names. `data_dir` anchors the local directory; `env` looks up
    /// environment variables (pass `|name| std::env::var(name).ok()`), so tests need not touch
    /// the process environment. For S3 this also checks that the bucket exists and the
    /// credentials work, so a bad config fails at start rather than at the first upload.
    pub async fn open(
        config: &StorageConfig,
        data_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        let backend = match config.backend {
            BackendKind::Local => {
                let dir = match &config.local.dir {
                    Some(dir) if dir.is_absolute() => dir.clone(),
                    Some(dir) => data_dir.join(dir),
                    None => data_dir.join("files"),
                };
                Backend::Local(LocalBackend::open(&dir).await?)
            }
            BackendKind::S3 => {
                let backend = S3Backend::connect(&config.s3, env)?;
                backend.check().await?;
                Backend::S3(backend)
            }
        };
        Ok(Self::new(backend, config.max_file_bytes))
    }

    /// Wraps an already built backend.
    pub fn new(backend: Backend, max_file_bytes: u64) -> Self {
        Self {
            backend: Arc::new(backend),
            max_file_bytes,
        }
    }

    /// The size limit for one file.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes
    }

    /// Which backend this is, for logs and status output.
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Local(local) => format!("local directory {}", local.root().display()),
            Backend::S3(s3) => s3.describe(),
        }
    }

    /// Checks that the backend is usable (the directory exists, the bucket answers).
    pub async fn check(&self) -> Result<(), StorageError> {
        match &*self.backend {
            Backend::Local(local) => local.check().await,
            Backend::S3(s3) => s3.check().await,
        }
    }

    /// Stores `body` at `path`, replacing any file there. The file appears whole or not at all:
    /// readers never see a partial write, and of concurrent writers one wins entirely. A body
    /// longer than the size limit is refused with [`StorageError::TooLarge`] and stores nothing.
    #[tracing::instrument(skip_all, fields(path = %path))]
    pub async fn put(
        &self,
        path: &StoragePath,
        body: BodyStream,
    ) -> Result<ObjectMeta, StorageError> {
        let body = limit_body(body, self.max_file_bytes);
        let result = match &*self.backend {
            Backend::Local(local) => local.put(path, body).await,
            Backend::S3(s3) => s3.put(path, body).await,
        };
        result.map_err(|error| match error {
            StorageError::Body { source, .. } if is_too_large(&source) => StorageError::TooLarge {
                path: path.to_string(),
                limit: self.max_file_bytes,
            },
            other => other,
        })
    }

    /// Stores a small in-memory body.
    pub async fn put_bytes(
        &self,
        path: &StoragePath,
        bytes: impl Into<Bytes>,
    ) -> Result<ObjectMeta, StorageError> {
        let bytes: Bytes = bytes.into();
        self.put(
            path,
            Box::pin(futures::stream::once(async move { Ok(bytes) })),
        )
        .await
    }

    /// Opens the file at `path` for streaming; [`StorageError::NotFound`] when absent.
    #[tracing::instrument(skip_all, fields(path = %path))]
    pub async fn get(&self, path: &StoragePath) -> Result<Object, StorageError> {
        match &*self.backend {
            Backend::Local(local) => local.get(path).await,
            Backend::S3(s3) => s3.get(path).await,
        }
    }

    /// Reads a whole file into memory, refusing files over `max_bytes` (for chat uploads and
    /// small text files; everything else should stream with [`Storage::get`]).
    pub async fn get_bytes(
        &self,
        path: &StoragePath,
        max_bytes: u64,
    ) -> Result<Bytes, StorageError> {
        let object = self.get(path).await?;
        if object.meta.size > max_bytes {
            return Err(StorageError::TooLarge {
                path: path.to_string(),
                limit: max_bytes,
            });
        }
        let mut body = limit_body(object.body, max_bytes);
        let mut out = bytes::BytesMut::with_capacity(object.meta.size as usize);
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(error) if is_too_large(&error) => {
                    return Err(StorageError::TooLarge {
                        path: path.to_string(),
                        limit: max_bytes,
                    });
                }
                Err(source) => {
                    return Err(StorageError::Io {
                        action: "reading",
                        path: path.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(out.freeze())
    }

    /// Metadata of the file at `path`; [`StorageError::NotFound`] when absent.
    pub async fn head(&self, path: &StoragePath) -> Result<ObjectMeta, StorageError> {
        match &*self.backend {
            Backend::Local(local) => local.head(path).await,
            Backend::S3(s3) => s3.head(path).await,
        }
    }

    /// Every file whose path starts with `prefix`, sorted by path.
    pub async fn list(&self, prefix: &StoragePrefix) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut listed = match &*self.backend {
            Backend::Local(local) => local.list(prefix).await?,
            Backend::S3(s3) => s3.list(prefix).await?,
        };
        listed.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(listed)
    }

    /// Removes the file at `path`. Removing a file that is not there succeeds (S3 cannot tell
    /// the difference without a race, so neither backend does).
    #[tracing::instrument(skip_all, fields(path = %path))]
    pub async fn delete(&self, path: &StoragePath) -> Result<(), StorageError> {
        match &*self.backend {
            Backend::Local(local) => local.delete(path).await,
            Backend::S3(s3) => s3.delete(path).await,
        }
    }
}

/// Marker carried inside an `io::Error` when a body passes the size limit.
#[derive(Debug)]
struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body exceeds the size limit")
    }
}

impl std::error::Error for BodyTooLarge {}

fn is_too_large(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<BodyTooLarge>())
}

/// Ends `body` with an error as soon as more than `limit` bytes have passed.
fn limit_body(body: BodyStream, limit: u64) -> BodyStream {
    let mut seen: u64 = 0;
    Box::pin(body.and_then(move |chunk| {
        seen = seen.saturating_add(chunk.len() as u64);
        let result = if seen > limit {
            Err(std::io::Error::other(BodyTooLarge))
        } else {
            Ok(chunk)
        };
        futures::future::ready(result)
    }))
}

/// Converts any byte stream (an HTTP body, a file reader) into a [`BodyStream`].
pub fn body_from_stream<S, E>(stream: S) -> BodyStream
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    Box::pin(stream.map_err(std::io::Error::other))
}

/// A body that reads a local file in chunks.
pub async fn body_from_file(path: &Path) -> std::io::Result<BodyStream> {
    let file = tokio::fs::File::open(path).await?;
    Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
        file,
        CHUNK_BYTES,
    )))
}

/// Read buffer for streaming files: large enough for throughput, small enough that many
/// concurrent transfers stay cheap.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_come_from_the_extension() {
        assert_eq!(
            content_type_for("tasks/1/plan.md"),
            "text/markdown; charset=utf-8"
        );
        assert_eq!(content_type_for("a/b.PNG"), "image/png");
        assert_eq!(content_type_for("a.b/noext"), "application/octet-stream");
    }

    #[test]
    fn the_default_config_is_local_with_limits() {
        let config = StorageConfig::default();
        assert_eq!(config.backend, BackendKind::Local);
        assert_eq!(config.max_file_bytes, DEFAULT_MAX_FILE_BYTES);
        let parsed: StorageConfig = toml::from_str(
            "backend = \"s3\"\n[s3]\nbucket = \"b\"\npath_style = true\nendpoint = \"http://127.0.0.1:9000\"",
        )
        .expect("valid toml");
        assert_eq!(parsed.backend, BackendKind::S3);
        assert!(parsed.s3.path_style);
        assert!(toml::from_str::<StorageConfig>("secret_key = \"x\"").is_err());
    }
}
