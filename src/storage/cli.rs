//! `crew files ls|get|put`: the operator's view of the file store, through the admin endpoint.
//!
//! `crew serve` owns the store, so these commands call its admin endpoint ([`super::admin`])
//! rather than opening the backend themselves. Downloads with `--out` and all uploads stream;
//! nothing here holds a large file in memory. Not for agents (they use `Storage` directly).

use std::path::PathBuf;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::links::human_size;
use super::{ObjectMeta, StoragePath, StoragePrefix};
use crate::admin::{AdminClient, AdminError};

/// Largest file `get` prints to the terminal; bigger ones need `--out`.
const PRINT_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// Files in the shared store (specs, plans, results, agents' memory).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FilesCommand {
    /// List files, optionally only those under a prefix such as `tasks/42/`.
    Ls {
        /// Path prefix, e.g. `tasks/`, `agents/ann/` or `shared/`.
        prefix: Option<String>,
    },
    /// Print a text file, or save any file with --out.
    Get {
        /// Path in the store, e.g. `tasks/42/result.md`.
        path: String,
        /// Save to this local file instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Upload a local file to a path in the store (replacing what is there).
    Put {
        /// Path in the store, e.g. `shared/style-guide.md`.
        path: String,
        /// The local file to upload.
        local_file: PathBuf,
    },
}

impl FilesCommand {
    /// Runs the command against the server behind `admin`; the `String` is what to print.
    pub async fn run(self, admin: &AdminClient) -> Result<String, AdminError> {
        match self {
            FilesCommand::Ls { prefix } => ls(admin, prefix.unwrap_or_default()).await,
            FilesCommand::Get { path, out } => get(admin, &path, out).await,
            FilesCommand::Put { path, local_file } => put(admin, &path, local_file).await,
        }
    }
}

async fn ls(admin: &AdminClient, prefix: String) -> Result<String, AdminError> {
    StoragePrefix::parse(&prefix).map_err(local)?;
    let request = admin
        .request(reqwest::Method::GET, "/files/list")
        .query(&[("prefix", &prefix)]);
    let listed: Vec<ObjectMeta> = admin.execute(request).await?.json().await?;
    if listed.is_empty() {
        return Ok(if prefix.is_empty() {
            "no files yet".into()
        } else {
            format!("no files under `{prefix}`")
        });
    }
    let total: u64 = listed.iter().map(|meta| meta.size).sum();
    let mut out = String::new();
    for meta in &listed {
        out.push_str(&format!(
            "{:>9}  {}  {}\n",
            human_size(meta.size),
            super::links::format_utc(meta.modified_unix),
            meta.path
        ));
    }
    out.push_str(&format!("{} file(s), {}", listed.len(), human_size(total)));
    Ok(out)
}

async fn get(admin: &AdminClient, path: &str, out: Option<PathBuf>) -> Result<String, AdminError> {
    let path = StoragePath::parse(path).map_err(local)?;
    let response = admin
        .execute(admin.request(reqwest::Method::GET, &object_url(&path)))
        .await?;
    let Some(out) = out else {
        if response.content_length().unwrap_or(0) > PRINT_MAX_BYTES {
            return Err(local_message(format!(
                "`{path}` is {}; save it with --out FILE instead of printing it",
                human_size(response.content_length().unwrap_or(0))
            )));
        }
        let bytes = response.bytes().await?;
        return String::from_utf8(bytes.to_vec())
            .map_err(|_| local_message(format!("`{path}` is not text; save it with --out FILE")));
    };
    let mut file = tokio::fs::File::create(&out)
        .await
        .map_err(|error| local_message(format!("cannot create {}: {error}", out.display())))?;
    let mut body = response.bytes_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        written += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|error| local_message(format!("cannot write {}: {error}", out.display())))?;
    }
    file.flush()
        .await
        .map_err(|error| local_message(format!("cannot write {}: {error}", out.display())))?;
    Ok(format!(
        "saved `{path}` ({}) to {}",
        human_size(written),
        out.display()
    ))
}

async fn put(admin: &AdminClient, path: &str, local_file: PathBuf) -> Result<String, AdminError> {
    let path = StoragePath::parse(path).map_err(local)?;
    let file = tokio::fs::File::open(&local_file)
        .await
        .map_err(|error| local_message(format!("cannot open {}: {error}", local_file.display())))?;
    let length = file
        .metadata()
        .await
        .map_err(|error| local_message(format!("cannot read {}: {error}", local_file.display())))?
        .len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        super::CHUNK_BYTES,
    ));
    let request = admin
        .request(reqwest::Method::PUT, &object_url(&path))
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(body);
    let meta: ObjectMeta = admin.execute(request).await?.json().await?;
    Ok(format!(
        "stored `{}` ({})",
        meta.path,
        human_size(meta.size)
    ))
}

fn object_url(path: &StoragePath) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let encoded: Vec<String> = path
        .segments()
        .map(|segment| percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string())
        .collect();
    format!("/files/object/{}", encoded.join("/"))
}

/// `AdminError` has no variant for failures on the CLI's side (a bad path, an unreadable local
/// file); they are reported as status 0, which no server sends.
fn local_message(message: String) -> AdminError {
    AdminError::Server { status: 0, message }
}

fn local(error: super::StorageError) -> AdminError {
    local_message(error.to_string())
}
