//! Shared file storage: local filesystem or S3, task folders, signed links.

use serde::{Deserialize, Serialize};

/// Settings for the file store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {}
