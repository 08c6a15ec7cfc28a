//! Who wakes for each event: mentions, DMs, replies, keywords; loop guards; the wake queue.

use serde::{Deserialize, Serialize};

/// Settings for waking agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {}
