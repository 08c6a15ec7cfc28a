//! The credential gateway: agents hold consumer tokens; the gateway swaps them for real keys.

use serde::{Deserialize, Serialize};

/// Settings for the gateway listener, its routes and consumers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {}
