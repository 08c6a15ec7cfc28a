//! Keeps a sandbox's workspace (a host folder) in step with file storage.
//!
//! Before a command, files that changed in storage are written into the workspace (and files
//! deleted in storage are deleted there); after it, files the command created or changed are
//! stored (and files it deleted are deleted), as far as the Worker may write them. A manifest
//! (outside the workspace, so the sandbox cannot touch it) remembers what was last in step.
//!
//! The workspace is writable by the sandbox, so it is treated as hostile: symlinks are never
//! followed (neither read nor written through) and only regular files are carried.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SandboxError;
use crate::storage::{Storage, StorageError};
use crate::storage::{StoragePath, StoragePrefix};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    modified_unix: u64,
    sha256: String,
}

/// One workspace and its manifest.
pub struct Mirror {
    storage: Storage,
    root: PathBuf,
    manifest_path: PathBuf,
}

impl Mirror {
    pub fn new(storage: Storage, root: PathBuf, manifest_path: PathBuf) -> Self {
        Self {
            storage,
            root,
            manifest_path,
        }
    }

    async fn load(&self) -> BTreeMap<String, Entry> {
        match tokio::fs::read(&self.manifest_path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        }
    }

    async fn save(&self, manifest: &BTreeMap<String, Entry>) -> Result<(), SandboxError> {
        if let Some(parent) = self.manifest_path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let bytes = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
        tokio::fs::write(&self.manifest_path, bytes).await?;
        Ok(())
    }

    /// Brings `folders` in the workspace up to date with storage.
    pub async fn pull(&self, folders: &[StoragePrefix]) -> Result<(), SandboxError> {
        let mut manifest = self.load().await;
        let before = manifest.clone();
        let limit = self.storage.max_file_bytes();
        for folder in folders {
            let listed = self.storage.list(folder).await?;
            for meta in &listed {
                let local = self.root.join(&meta.path);
                let known = manifest.get(&meta.path);
                let unchanged = known.is_some_and(|entry| {
                    entry.size == meta.size && entry.modified_unix == meta.modified_unix
                });
                if unchanged && is_regular_file(&local).await {
                    continue;
                }
                let path = StoragePath::parse(&meta.path)?;
                let bytes = match self.storage.get_bytes(&path, limit).await {
                    Ok(bytes) => bytes,
                    Err(StorageError::NotFound { .. }) => continue,
                    Err(error) => return Err(error.into()),
                };
                write_inside(&self.root, &meta.path, &bytes).await?;
                manifest.insert(
                    meta.path.clone(),
                    Entry {
                        size: meta.size,
                        modified_unix: meta.modified_unix,
                        sha256: hex::encode(Sha256::digest(&bytes)),
                    },
                );
            }
            let present: std::collections::HashSet<&str> =
                listed.iter().map(|meta| meta.path.as_str()).collect();
            let gone: Vec<String> = manifest
                .keys()
                .filter(|path| folder.matches(path) && !present.contains(path.as_str()))
                .cloned()
                .collect();
            for path in gone {
                manifest.remove(&path);
                remove_inside(&self.root, &path).await;
            }
        }
        if manifest != before {
            self.save(&manifest).await?;
        }
        Ok(())
    }

    /// Stores what changed in `folders` since the last sync, where `may_write` allows; returns
    /// notes about files that were not stored.
    pub async fn push(
        &self,
        folders: &[StoragePrefix],
        may_write: impl Fn(&StoragePath) -> bool,
    ) -> Result<Vec<String>, SandboxError> {
        let mut manifest = self.load().await;
        let before = manifest.clone();
        let mut notes = Vec::new();
        let limit = self.storage.max_file_bytes();
        for folder in folders {
            let root = self.root.clone();
            let prefix = folder.as_str().to_owned();
            let files = tokio::task::spawn_blocking(move || walk(&root, &prefix))
                .await
                .map_err(std::io::Error::other)?;
            let mut seen = std::collections::HashSet::new();
            for (relative, size) in files {
                seen.insert(relative.clone());
                let Ok(path) = StoragePath::parse(&relative) else {
                    notes.push(format!("{relative}: not a valid storage path, not stored"));
                    continue;
                };
                if size > limit {
                    notes.push(format!(
                        "{relative}: {size} bytes, over the {limit}-byte file limit, not stored"
                    ));
                    continue;
                }
                let Some(bytes) = read_regular(&self.root.join(&relative)).await else {
                    continue;
                };
                let sha256 = hex::encode(Sha256::digest(&bytes));
                if manifest
                    .get(&relative)
                    .is_some_and(|entry| entry.sha256 == sha256)
                {
                    continue;
                }
                if !may_write(&path) {
                    notes.push(format!("{relative}: you may not change it, not stored"));
                    continue;
                }
                let meta = self.storage.put_bytes(&path, bytes).await?;
                manifest.insert(
                    relative,
                    Entry {
                        size: meta.size,
                        modified_unix: meta.modified_unix,
                        sha256,
                    },
                );
            }
            let deleted: Vec<String> = manifest
                .keys()
                .filter(|path| folder.matches(path) && !seen.contains(*path))
                .cloned()
                .collect();
            for relative in deleted {
                let Ok(path) = StoragePath::parse(&relative) else {
                    continue;
                };
                if may_write(&path) {
                    self.storage.delete(&path).await?;
                    manifest.remove(&relative);
                }
            }
        }
        if manifest != before {
            self.save(&manifest).await?;
        }
        Ok(notes)
    }
}

async fn is_regular_file(path: &Path) -> bool {
    tokio::fs::symlink_metadata(path)
        .await
        .is_ok_and(|meta| meta.file_type().is_file())
}

/// Reads a regular file without following a symlink at its place.
async fn read_regular(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o400_000) // O_NOFOLLOW
            .open(&path)
            .ok()?;
        if !file.metadata().ok()?.file_type().is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        Some(bytes)
    })
    .await
    .ok()
    .flatten()
}

/// Writes `relative` under `root`, replacing whatever symlink or non-folder the sandbox may
/// have put on the way, so the write never lands outside the workspace.
async fn write_inside(root: &Path, relative: &str, bytes: &[u8]) -> Result<(), SandboxError> {
    let mut dir = root.to_owned();
    tokio::fs::create_dir_all(&dir).await?;
    let parts: Vec<&str> = Path::new(relative)
        .components()
        .filter_map(|component| match component {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect();
    let Some((file, folders)) = parts.split_last() else {
        return Ok(());
    };
    for folder in folders {
        dir.push(folder);
        match tokio::fs::symlink_metadata(&dir).await {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                tokio::fs::remove_file(&dir).await?;
                tokio::fs::create_dir(&dir).await?;
            }
            Err(_) => tokio::fs::create_dir(&dir).await?,
        }
    }
    let target = dir.join(file);
    if let Ok(meta) = tokio::fs::symlink_metadata(&target).await {
        if meta.is_dir() {
            tokio::fs::remove_dir_all(&target).await?;
        } else {
            tokio::fs::remove_file(&target).await?;
        }
    }
    tokio::fs::write(&target, bytes).await?;
    Ok(())
}

async fn remove_inside(root: &Path, relative: &str) {
    let path = root.join(relative);
    if is_regular_file(&path).await {
        let _ = tokio::fs::remove_file(&path).await;
    }
}

/// Regular files under `root/prefix` (not following symlinks), as storage paths with sizes.
fn walk(root: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let start = root.join(prefix.trim_end_matches('/'));
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(relative) = path.strip_prefix(root)
                && let Some(relative) = relative.to_str()
            {
                let size = entry.metadata().map(|meta| meta.len()).unwrap_or(0);
                out.push((relative.to_owned(), size));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_symlink_planted_in_the_workspace_is_replaced_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("tasks")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("tasks/t-1")).unwrap();
        write_inside(root.path(), "tasks/t-1/spec.md", b"spec")
            .await
            .unwrap();
        assert!(!outside.path().join("spec.md").exists());
        assert_eq!(
            std::fs::read(root.path().join("tasks/t-1/spec.md")).unwrap(),
            b"spec"
        );
        std::fs::write(outside.path().join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.path().join("tasks/t-1/leak"),
        )
        .unwrap();
        assert!(
            read_regular(&root.path().join("tasks/t-1/leak"))
                .await
                .is_none()
        );
        let walked = walk(root.path(), "tasks/t-1/");
        assert_eq!(walked, vec![("tasks/t-1/spec.md".to_owned(), 4)]);
    }
}
