//! A sled tree with typed keys and JSON values.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// Keys that map to bytes whose order is the order that scans should see.
pub trait TreeKey {
    fn to_key(&self) -> Vec<u8>;
    fn from_key(raw: &[u8]) -> Option<Self>
    where
        Self: Sized;
}

impl TreeKey for String {
    fn to_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_key(raw: &[u8]) -> Option<Self> {
        String::from_utf8(raw.to_vec()).ok()
    }
}

/// Big-endian so that numeric order is byte order.
impl TreeKey for u64 {
    fn to_key(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn from_key(raw: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(raw.try_into().ok()?))
    }
}

/// A typed view over one sled tree. Cheap to clone.
pub struct Tree<K, V> {
    name: String,
    tree: sled::Tree,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V> Clone for Tree<K, V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            tree: self.tree.clone(),
            _types: PhantomData,
        }
    }
}

impl<K: TreeKey, V> Tree<K, V> {
    pub(super) fn new(name: &str, tree: sled::Tree) -> Self {
        Self {
            name: name.to_owned(),
            tree,
            _types: PhantomData,
        }
    }

    /// The underlying sled tree, for transactions and batches.
    pub fn raw(&self) -> &sled::Tree {
        &self.tree
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn contains(&self, key: &K) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(key.to_key())?)
    }

    pub fn remove(&self, key: &K) -> Result<bool, StoreError> {
        Ok(self.tree.remove(key.to_key())?.is_some())
    }

    /// The number of entries. O(n): sled walks the whole tree to count it, so keep it off hot
    /// paths.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

impl<K: TreeKey, V: Serialize + DeserializeOwned> Tree<K, V> {
    pub fn get(&self, key: &K) -> Result<Option<V>, StoreError> {
        match self.tree.get(key.to_key())? {
            Some(raw) => Ok(Some(self.decode(&raw)?)),
            None => Ok(None),
        }
    }

    pub fn insert(&self, key: &K, value: &V) -> Result<(), StoreError> {
        self.tree.insert(key.to_key(), self.encode(value)?)?;
        Ok(())
    }

    /// Inserts only if the key is absent; returns whether it inserted.
    pub fn insert_new(&self, key: &K, value: &V) -> Result<bool, StoreError> {
        let encoded = self.encode(value)?;
        Ok(self
            .tree
            .compare_and_swap(key.to_key(), None as Option<&[u8]>, Some(encoded))?
            .is_ok())
    }

    /// Reads, changes and writes one value atomically (retrying on concurrent change).
    pub fn update<F>(&self, key: &K, mut change: F) -> Result<Option<V>, StoreError>
    where
        F: FnMut(Option<V>) -> Option<V>,
    {
        let raw_key = key.to_key();
        loop {
            let current = self.tree.get(&raw_key)?;
            let decoded = match &current {
                Some(raw) => Some(self.decode(raw)?),
                None => None,
            };
            let next = change(decoded);
            let encoded = match &next {
                Some(value) => Some(self.encode(value)?),
                None => None,
            };
            if self
                .tree
                .compare_and_swap(&raw_key, current, encoded)?
                .is_ok()
            {
                return Ok(next);
            }
        }
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(K, V), StoreError>> + '_ {
        self.tree.iter().map(move |entry| self.decode_entry(entry))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        self.tree
            .scan_prefix(prefix)
            .map(move |entry| self.decode_entry(entry))
    }

    /// The first entry in key order.
    pub fn first(&self) -> Result<Option<(K, V)>, StoreError> {
        self.tree
            .first()
            .map_err(StoreError::from)?
            .map(|entry| self.decode_entry(Ok(entry)))
            .transpose()
    }

    pub fn encode(&self, value: &V) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            tree: self.name.clone(),
            source,
        })
    }

    pub fn decode(&self, raw: &[u8]) -> Result<V, StoreError> {
        serde_json::from_slice(raw).map_err(|source| StoreError::Decode {
            tree: self.name.clone(),
            source,
        })
    }

    fn decode_entry(
        &self,
        entry: Result<(sled::IVec, sled::IVec), sled::Error>,
    ) -> Result<(K, V), StoreError> {
        let (raw_key, raw_value) = entry?;
        let key = K::from_key(&raw_key).ok_or_else(|| StoreError::Decode {
            tree: self.name.clone(),
            source: serde::de::Error::custom("key has an unexpected shape"),
        })?;
        Ok((key, self.decode(&raw_value)?))
    }
}
