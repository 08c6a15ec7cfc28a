//! The local backend: files in a directory under the data dir.
//!
//! Writes go to a temporary file in a sibling `<dir>.partial/` directory on the same filesystem
//! and are renamed into place, so readers never see half a file and concurrent writers never
//! interleave. Not a cache or a database: one file per path, nothing else.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{
    BodyStream, CHUNK_BYTES, Object, ObjectMeta, StorageError, StoragePath, StoragePrefix,
};

/// Files in a directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    partial: PathBuf,
}

impl LocalBackend {
    /// Uses `root` (created if missing) and `<root>.partial` for writes in progress. Leftovers of
    /// interrupted writes are removed.
    pub async fn open(root: &Path) -> Result<Self, StorageError> {
        let mut partial = root.as_os_str().to_owned();
        partial.push(".partial");
        let backend = Self {
            root: root.to_path_buf(),
            partial: PathBuf::from(partial),
        };
        for dir in [&backend.root, &backend.partial] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| io_error("creating", dir, source))?;
        }
        if let Ok(mut entries) = tokio::fs::read_dir(&backend.partial).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        Ok(backend)
    }

    /// The directory holding the files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) async fn check(&self) -> Result<(), StorageError> {
        tokio::fs::metadata(&self.root)
            .await
            .map(drop)
            .map_err(|source| io_error("checking", &self.root, source))
    }

    fn file(&self, path: &StoragePath) -> PathBuf {
        // StoragePath has no `..`, `.`, empty or absolute segments, so this stays under root.
        self.root.join(path.as_str())
    }

    pub(super) async fn put(
        &self,
        path: &StoragePath,
        mut body: BodyStream,
    ) -> Result<ObjectMeta, StorageError> {
        let target = self.file(path);
        let temp = self.partial.join(format!(
            "{}-{}",
            std::process::id(),
            crate::secret::Secret::random(12).expose()
        ));
        let result = async {
            let mut file = tokio::fs::File::create(&temp)
                .await
                .map_err(|source| io_error("creating", &temp, source))?;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|source| StorageError::Body {
                    path: path.to_string(),
                    source,
                })?;
                file.write_all(&chunk)
                    .await
                    .map_err(|source| io_error("writing", &temp, source))?;
            }
            file.flush()
                .await
                .map_err(|source| io_error("writing", &temp, source))?;
            file.sync_data()
                .await
                .map_err(|source| io_error("syncing", &temp, source))?;
            drop(file);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(|source| {
                    if source.kind() == std::io::ErrorKind::NotADirectory
                        || source.kind() == std::io::ErrorKind::AlreadyExists
                    {
                        folder_is_file(path)
                    } else {
                        io_error("creating", parent, source)
                    }
                })?;
            }
            tokio::fs::rename(&temp, &target).await.map_err(|source| {
                if target.is_dir() {
                    StorageError::InvalidPath {
                        path: path.to_string(),
                        reason: "a folder of that name exists; pick another file name".into(),
                    }
                } else {
                    io_error("storing", &target, source)
                }
            })?;
            self.head(path).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }

    pub(super) async fn get(&self, path: &StoragePath) -> Result<Object, StorageError> {
        let file = tokio::fs::File::open(self.file(path))
            .await
            .map_err(|source| self.not_found_or(path, "opening", source))?;
        let metadata = file
            .metadata()
            .await
            .map_err(|source| self.not_found_or(path, "reading", source))?;
        if !metadata.is_file() {
            return Err(StorageError::NotFound {
                path: path.to_string(),
            });
        }
        Ok(Object {
            meta: ObjectMeta::new(path.as_str(), metadata.len(), metadata.modified().ok()),
            body: Box::pin(tokio_util::io::ReaderStream::with_capacity(
                file,
                CHUNK_BYTES,
            )),
        })
    }

    pub(super) async fn head(&self, path: &StoragePath) -> Result<ObjectMeta, StorageError> {
        let metadata = tokio::fs::metadata(self.file(path))
            .await
            .map_err(|source| self.not_found_or(path, "reading", source))?;
        if !metadata.is_file() {
            return Err(StorageError::NotFound {
                path: path.to_string(),
            });
        }
        Ok(ObjectMeta::new(
            path.as_str(),
            metadata.len(),
            metadata.modified().ok(),
        ))
    }

    pub(super) async fn list(
        &self,
        prefix: &StoragePrefix,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        // Walk the deepest folder the prefix names completely, then filter by the whole prefix
        // (so `tasks/4` finds `tasks/4/…` and `tasks/42/…`, as S3 does).
        let folder = match prefix.as_str().rsplit_once('/') {
            Some((folder, _)) => folder,
            None => "",
        };
        let mut out = Vec::new();
        let mut pending = vec![(self.root.join(folder), folder.to_owned())];
        while let Some((dir, key_prefix)) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue;
                }
                Err(source) => return Err(io_error("listing", &dir, source)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|source| io_error("listing", &dir, source))?
            {
                let Ok(name) = entry.file_name().into_string() else {
                    continue; // Not UTF-8: cannot be a StoragePath, so not ours.
                };
                let key = if key_prefix.is_empty() {
                    name
                } else {
                    format!("{key_prefix}/{name}")
                };
                let Ok(metadata) = entry.metadata().await else {
                    continue; // Removed while listing.
                };
                if metadata.is_dir() {
                    if prefix.matches(&key) || prefix.as_str().starts_with(&format!("{key}/")) {
                        pending.push((entry.path(), key));
                    }
                } else if metadata.is_file() && prefix.matches(&key) {
                    out.push(ObjectMeta::new(
                        &key,
                        metadata.len(),
                        metadata.modified().ok(),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn delete(&self, path: &StoragePath) -> Result<(), StorageError> {
        let file = self.file(path);
        match tokio::fs::remove_file(&file).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_error("removing", &file, source)),
        }
        // Remove folders the file leaves empty, so listings and the disk stay tidy. Failing
        // here (a folder not empty, a concurrent write) is fine.
        let mut dir = file.parent();
        while let Some(current) = dir {
            if current == self.root || tokio::fs::remove_dir(current).await.is_err() {
                break;
            }
            dir = current.parent();
        }
        Ok(())
    }

    fn not_found_or(
        &self,
        path: &StoragePath,
        action: &'static str,
        source: std::io::Error,
    ) -> StorageError {
        if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        ) {
            StorageError::NotFound {
                path: path.to_string(),
            }
        } else {
            io_error(action, &self.file(path), source)
        }
    }
}

fn folder_is_file(path: &StoragePath) -> StorageError {
    StorageError::InvalidPath {
        path: path.to_string(),
        reason: "one of its folders is a file; pick another path".into(),
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}
