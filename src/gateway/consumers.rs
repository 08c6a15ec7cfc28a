//! Consumers: who may call the gateway, stored as token hashes, with tokens derived on demand.
//!
//! A consumer token is `HMAC-SHA256(gateway secret, "crew-gateway-token/v1" ‖ agent id ‖
//! generation)`, so the running `crew` can hand an agent its token again after a restart without
//! storing the token anywhere. The database keeps only SHA-256 hashes of tokens, which grant
//! nothing. Rotation bumps the generation; the previous generation keeps working until its grace
//! period ends. Revocation is a flag read on every request.
//!
//! Not for: enforcing rates or budgets (see [`super::limits`]) or forwarding (see [`super::proxy`]).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::ConsumerPolicy;
use crate::secret::Secret;

/// Tokens start with this so that a leaked one is recognisable in a scan (and never mistaken for
/// a provider key).
pub const TOKEN_PREFIX: &str = "crewgw_";

/// Domain separation for the token derivation, versioned so the scheme can change.
const DERIVATION_CONTEXT: &[u8] = b"crew-gateway-token/v1";

/// One consumer as stored: no token, only what is needed to check one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// The agent id this consumer belongs to (also the key in the tree).
    pub id: String,
    /// Generation of the current token.
    pub generation: u64,
    /// The previous token's generation and until when (Unix ms) it is still accepted.
    pub previous: Option<PreviousToken>,
    /// A revoked consumer's tokens are refused on the next request.
    pub revoked: bool,
    pub policy: ConsumerPolicy,
    /// Unix ms.
    pub created_ms: u64,
}

/// The token that a rotation replaced, valid for the grace period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousToken {
    pub generation: u64,
    pub valid_until_ms: u64,
}

/// What a token hash points to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRef {
    pub consumer: String,
    pub generation: u64,
}

/// Derives the token of `consumer` at `generation`.
pub fn derive_token(secret: &Secret, consumer: &str, generation: u64) -> Secret {
    use base64::Engine;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(DERIVATION_CONTEXT);
    mac.update(&(consumer.len() as u64).to_be_bytes());
    mac.update(consumer.as_bytes());
    mac.update(&generation.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    Secret::new(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    ))
}

/// The key under which a token's hash is stored. Tokens carry 256 random-looking bits, so a plain
/// SHA-256 is enough (no salt or slow hash needed: there is nothing to brute-force).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl ConsumerRecord {
    /// Whether a token of `generation` is accepted at `now_ms`.
    pub fn accepts(&self, generation: u64, now_ms: u64) -> bool {
        if self.revoked {
            return false;
        }
        generation == self.generation
            || self
                .previous
                .as_ref()
                .is_some_and(|p| p.generation == generation && now_ms < p.valid_until_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_by_consumer_generation_and_secret() {
        let secret = Secret::new("s1");
        let a0 = derive_token(&secret, "a", 0);
        assert_eq!(a0, derive_token(&secret, "a", 0));
        assert_ne!(a0, derive_token(&secret, "a", 1));
        assert_ne!(a0, derive_token(&secret, "b", 0));
        assert_ne!(a0, derive_token(&Secret::new("s2"), "a", 0));
        assert!(a0.expose().starts_with(TOKEN_PREFIX));
        // Length-prefixing keeps ("ab", …) and ("a", "b…") apart.
        assert_ne!(
            derive_token(&secret, "ab", 0),
            derive_token(&secret, "a", 0x62)
        );
    }

    #[test]
    fn grace_and_revocation() {
        let mut record = ConsumerRecord {
            id: "a".into(),
            generation: 2,
            previous: Some(PreviousToken {
                generation: 1,
                valid_until_ms: 1000,
            }),
            revoked: false,
            policy: ConsumerPolicy::default(),
            created_ms: 0,
        };
        assert!(record.accepts(2, 5000));
        assert!(record.accepts(1, 999));
        assert!(!record.accepts(1, 1000));
        assert!(!record.accepts(0, 0));
        record.revoked = true;
        assert!(!record.accepts(2, 0));
    }
}
