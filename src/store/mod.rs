//! Durable state in sled: one database per data directory, typed trees on top.
//!
//! Every module keeps its state in its own named trees, opened through [`Store::tree`], so the
//! layout of the database reads like a list of domains. Values are JSON so that a human can inspect
//! them with a sled dump and later versions can add fields without a migration. The database carries
//! a schema version from the first release (see [`SCHEMA_VERSION`]) so upgrades can migrate it.
//!
//! Not for: file bodies (those go to [`crate::storage`]) or secrets in plaintext.

mod durability;
mod typed_tree;

use std::path::Path;
use std::sync::Arc;

pub use durability::{Durability, WriteGate};
pub use typed_tree::{Tree, TreeKey};

/// `[database]` in the config.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// sled's page cache, in MiB. sled's own default (1 GiB) lets a busy crew grow to hundreds
    /// of MB; crew's working set (inbox, queues, room models) is small, so 64 MiB keeps the
    /// resident size low while the hot pages stay cached. Raise it for very many rooms.
    pub cache_mb: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { cache_mb: 64 }
    }
}

/// How long [`Store::open_with`] waits for a database lock that is being released.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The schema version this build writes. Bump it together with a migration in [`Store::open`].
pub const SCHEMA_VERSION: u64 = 1;

const META_TREE: &str = "meta";
const SCHEMA_KEY: &[u8] = b"schema_version";

/// Errors from the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, or another process holds the database lock).
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    /// A value in a tree did not decode; the tree name says which domain it belongs to.
    #[error("stored value in tree `{tree}` is not valid: {source}")]
    Decode {
        tree: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded (a bug in the caller's type).
    #[error("value for tree `{tree}` cannot be encoded: {source}")]
    Encode {
        tree: String,
        #[source]
        source: serde_json::Error,
    },
    /// The database was written by a newer `crew`; running an older binary on it would lose data.
    #[error(
        "the database schema version is {found}, but this crew understands up to {SCHEMA_VERSION}; upgrade crew"
    )]
    SchemaTooNew { found: u64 },
    /// Another `crew` process holds the database.
    #[error(
        "the database at {path} is in use by another crew process; stop it, or use the admin commands that talk to the running server"
    )]
    Locked { path: String },
}

impl StoreError {
    /// What a sled transaction failed with. Crew's transactions never abort themselves; should
    /// one, `what` names it in the error.
    pub fn from_transaction(what: &str, error: sled::transaction::TransactionError<()>) -> Self {
        match error {
            sled::transaction::TransactionError::Storage(error) => Self::Sled(error),
            sled::transaction::TransactionError::Abort(()) => {
                Self::Sled(sled::Error::Unsupported(format!("{what} aborted")))
            }
        }
    }
}

/// The opened database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    durability: Arc<Durability>,
}

impl Store {
    /// Opens (or creates) the database in `dir`, checking and recording the schema version.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &DatabaseConfig::default())
    }

    /// Opens the database with `config`'s settings (the page cache size).
    ///
    /// A lock held by a database being closed is waited for, up to [`LOCK_WAIT`]: sled releases
    /// its file lock from background threads after the last handle is dropped, so a database
    /// reopened in the same process (or by a restart while the old process is still exiting)
    /// can find it held for a moment. Held longer than that, the error says another crew has it.
    pub fn open_with(dir: &Path, config: &DatabaseConfig) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match Self::open_sled(dir, config) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let meta = db.open_tree(META_TREE)?;
        match meta.get(SCHEMA_KEY)? {
            Some(raw) => {
                let found = u64::from_be_bytes(raw.as_ref().try_into().unwrap_or([0xff; 8]));
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew { found });
                }
                // Migrations from older versions go here, one step at a time.
            }
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            }
        }
        let durability = Arc::new(Durability::new(db.clone()));
        Ok(Self { db, durability })
    }

    fn open_sled(dir: &Path, config: &DatabaseConfig) -> Result<sled::Db, StoreError> {
        sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_mb.saturating_mul(1024 * 1024))
            .open()
            .map_err(|error| match error {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked {
                        path: dir.display().to_string(),
                    }
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked {
                    path: dir.display().to_string(),
                },
                other => StoreError::Sled(other),
            })
    }

    /// Opens a temporary database that disappears when dropped; for tests and benchmarks.
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        db.open_tree(META_TREE)?
            .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
        let durability = Arc::new(Durability::new(db.clone()));
        Ok(Self { db, durability })
    }

    /// A typed view of the tree `name`. Opening the same name twice gives the same data.
    pub fn tree<K: TreeKey, V>(&self, name: &str) -> Result<Tree<K, V>, StoreError> {
        Ok(Tree::new(name, self.db.open_tree(name)?))
    }

    /// The raw sled handle, for multi-tree transactions.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// A fresh monotonically increasing id, unique for the life of the database.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// Waits until everything written before this call is on disk. Concurrent callers share one
    /// fsync (group commit), so the cost is paid once per burst, not once per caller.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.durability.flush().await
    }

    /// Waits until no flush is running and keeps flushes out until the gate is dropped. Take it
    /// around a sled transaction or batch on a hot path (ingest, the pump's commit): see
    /// [`durability`](self::Durability) for why a transaction must not meet an fsync.
    pub async fn write_gate(&self) -> WriteGate<'_> {
        self.durability.write_gate().await
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let meta = self.db.open_tree(META_TREE)?;
        Ok(meta
            .get(SCHEMA_KEY)?
            .map(|raw| u64::from_be_bytes(raw.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_is_recorded_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
            store
                .db()
                .open_tree(META_TREE)
                .unwrap()
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.db().flush().unwrap();
        }
        match Store::open(dir.path()) {
            Err(StoreError::SchemaTooNew { found }) => assert_eq!(found, SCHEMA_VERSION + 1),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a newer schema must be refused"),
        }
    }

    #[tokio::test]
    async fn flushed_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let tree = store.tree::<String, u32>("numbers").unwrap();
            tree.insert(&"one".to_owned(), &1).unwrap();
            let concurrent = (0..8).map(|_| store.flush());
            for result in futures::future::join_all(concurrent).await {
                result.unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        let tree = store.tree::<String, u32>("numbers").unwrap();
        assert_eq!(tree.get(&"one".to_owned()).unwrap(), Some(1));
    }
}
