//! The appservice registration file: what the homeserver reads to know about `crew`.
//!
//! One file is both given to the homeserver and read by `crew` (for the tokens), so the two can
//! never disagree. `crew init` writes it with fresh random tokens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::secret::Secret;

/// Random bytes in each generated token (the issue asks for at least 32).
pub const TOKEN_BYTES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// Unique id of this appservice on the homeserver; used in the ping endpoint path.
    pub id: String,
    /// Where the homeserver reaches `crew`'s appservice API.
    pub url: Option<String>,
    /// Token `crew` presents to the homeserver.
    pub as_token: Secret,
    /// Token the homeserver presents to `crew`.
    pub hs_token: Secret,
    /// Localpart of the Manager user (the appservice's own user).
    pub sender_localpart: String,
    pub namespaces: Namespaces,
    #[serde(default)]
    pub rate_limited: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    /// Ephemeral events; on Synapse (with `msc2409_to_device_messages_enabled`) this is also
    /// what brings to-device events, the agents' room keys, into transactions (`crate::crypto`).
    #[serde(
        default,
        rename = "receive_ephemeral",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub receive_ephemeral: bool,
    /// MSC3202: device lists and one-time-key counts in transactions (Synapse, with
    /// `msc3202_transaction_extensions`), so encrypted agents need no `/sync`.
    #[serde(
        default,
        rename = "org.matrix.msc3202",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub device_lists_in_transactions: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Namespaces {
    #[serde(default)]
    pub users: Vec<Namespace>,
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Namespace {
    pub exclusive: bool,
    pub regex: String,
}

/// What `crew init` needs to make a registration.
pub struct NewRegistration<'a> {
    pub id: &'a str,
    pub url: &'a str,
    pub server_name: &'a str,
    pub user_prefix: &'a str,
    pub manager_localpart: &'a str,
}

impl Registration {
    /// A registration with fresh random tokens and an exclusive, anchored user namespace.
    pub fn generate(new: &NewRegistration<'_>) -> Self {
        Self {
            id: new.id.to_owned(),
            url: Some(new.url.to_owned()),
            as_token: Secret::random(TOKEN_BYTES),
            hs_token: Secret::random(TOKEN_BYTES),
            sender_localpart: new.manager_localpart.to_owned(),
            namespaces: Namespaces {
                users: vec![
                    Namespace {
                        exclusive: true,
                        regex: user_namespace_regex(new.user_prefix, new.server_name),
                    },
                    Namespace {
                        exclusive: true,
                        regex: manager_namespace_regex(new.manager_localpart, new.server_name),
                    },
                ],
                aliases: vec![],
                rooms: vec![],
            },
            rate_limited: false,
            protocols: vec![],
            // Encrypted rooms (`crate::crypto`): keys and device lists in transactions.
            receive_ephemeral: true,
            device_lists_in_transactions: true,
        }
    }

    /// Reads and checks the file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let registration = Self::read_unchecked(path)?;
        registration
            .check()
            .map_err(|message| ConfigError::Registration {
                path: path.display().to_string(),
                message,
            })?;
        Ok(registration)
    }

    /// Reads the file without [`Registration::check`], for callers that apply overrides first
    /// and check the result.
    pub fn read_unchecked(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let registration: Registration =
            serde_yaml::from_str(&text).map_err(|error| ConfigError::Registration {
                path: path.display().to_string(),
                message: error.to_string(),
            })?;
        Ok(registration)
    }

    /// Checks what homeservers would reject or what would make `crew` insecure.
    pub fn check(&self) -> Result<(), String> {
        for (name, token) in [("as_token", &self.as_token), ("hs_token", &self.hs_token)] {
            if token.expose().trim().is_empty() {
                return Err(format!("{name} is empty"));
            }
            if token.expose().chars().any(char::is_whitespace) {
                return Err(format!("{name} contains whitespace"));
            }
        }
        if self.as_token.expose().len() < 32 || self.hs_token.expose().len() < 32 {
            return Err("as_token and hs_token must each be at least 32 characters".into());
        }
        if self.as_token == self.hs_token {
            return Err("as_token and hs_token must differ".into());
        }
        if self.namespaces.users.is_empty() {
            return Err("namespaces.users must list the agents' user namespace".into());
        }
        for namespace in &self.namespaces.users {
            regex::Regex::new(&namespace.regex)
                .map_err(|error| format!("user namespace regex is invalid: {error}"))?;
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("registration always serialises");
        format!(
            "# matrix-crew appservice registration, generated by `crew init`.\n\
             # Give this file to your homeserver (see docs/homeservers.md). Keep it private:\n\
             # the tokens below let anyone act as every agent.\n{body}"
        )
    }

    /// What to add to a registration whose users namespace leaves the Manager out (written
    /// before crew listed it): without it Tuwunel never delivers the Manager's invites. `None`
    /// when the Manager is in the namespace.
    pub fn manager_namespace_advice(&self, server_name: &str) -> Option<String> {
        let manager = format!("@{}:{}", self.sender_localpart, server_name);
        let listed = self.namespaces.users.iter().any(|namespace| {
            regex::Regex::new(&namespace.regex).is_ok_and(|re| re.is_match(&manager))
        });
        (!listed).then(|| {
            format!(
                "the registration's users namespace leaves out the Manager {manager}; some homeservers (Tuwunel) then never deliver its invites. Add this entry under namespaces.users in the registration file, give it to the homeserver again and restart it:\n    - exclusive: true\n      regex: '{}'",
                manager_namespace_regex(&self.sender_localpart, server_name)
            )
        })
    }

    /// Which user ids are ours on `server_name`: the Manager and the users namespaces,
    /// compiled once. Build it at start-up and keep it: the pump asks for every member of a
    /// room on every event, and compiling a namespace regex costs more than deciding the event.
    pub fn our_users(&self, server_name: &str) -> OurUsers {
        OurUsers {
            manager: format!("@{}:{}", self.sender_localpart, server_name),
            // `validate` refused invalid patterns at load; one that still fails matches nobody.
            namespaces: regex::RegexSet::new(
                self.namespaces
                    .users
                    .iter()
                    .map(|namespace| namespace.regex.as_str()),
            )
            .unwrap_or_else(|_| regex::RegexSet::empty()),
        }
    }
}

/// The users crew puppets: the Manager and everyone in the registration's users namespaces
/// ([`Registration::our_users`]).
#[derive(Debug, Clone)]
pub struct OurUsers {
    manager: String,
    namespaces: regex::RegexSet,
}

impl OurUsers {
    /// Whether `user_id` is the Manager or in one of the users namespaces.
    pub fn contains(&self, user_id: &str) -> bool {
        user_id == self.manager || self.namespaces.is_match(user_id)
    }
}

/// `^@crew:example\.org$`: the Manager alone.
pub fn manager_namespace_regex(localpart: &str, server_name: &str) -> String {
    format!(
        "^@{}:{}$",
        regex::escape(localpart),
        regex::escape(server_name)
    )
}

/// `^@crew_[a-z0-9._=/-]+:example\.org$`: anchored, so no other user can fall inside it.
pub fn user_namespace_regex(prefix: &str, server_name: &str) -> String {
    format!(
        "^@{}[a-z0-9._=/-]+:{}$",
        regex::escape(prefix),
        regex::escape(server_name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Registration {
        Registration::generate(&NewRegistration {
            id: "crew",
            url: "http://127.0.0.1:9000",
            server_name: "example.org",
            user_prefix: "crew_",
            manager_localpart: "crew",
        })
    }

    #[test]
    fn namespace_is_anchored_and_escaped() {
        let regex = user_namespace_regex("crew_", "example.org");
        assert_eq!(regex, r"^@crew_[a-z0-9._=/-]+:example\.org$");
        let re = regex::Regex::new(&regex).unwrap();
        assert!(re.is_match("@crew_alice:example.org"));
        assert!(!re.is_match("@crew_alice:exampleXorg"));
        assert!(!re.is_match("@crew_alice:example.org.evil"));
        assert!(!re.is_match("@x@crew_alice:example.org"));
    }

    #[test]
    fn generated_registration_round_trips_and_checks() {
        let registration = sample();
        let yaml = registration.to_yaml();
        let parsed: Registration = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed.as_token, registration.as_token);
        assert!(!parsed.rate_limited);
        assert!(parsed.namespaces.users[0].exclusive);
        parsed.check().unwrap();
        assert!(
            parsed
                .our_users("example.org")
                .contains("@crew_bob:example.org")
        );
        assert!(
            parsed
                .our_users("example.org")
                .contains("@crew:example.org")
        );
        assert!(!parsed.our_users("example.org").contains("@bob:example.org"));
    }

    #[test]
    fn the_registration_asks_for_keys_in_transactions() {
        // Synapse's names (synapse/config/appservice.py): to-device events come with ephemeral
        // events, device lists and key counts with `org.matrix.msc3202`.
        let yaml = sample().to_yaml();
        assert!(yaml.contains("receive_ephemeral: true"), "{yaml}");
        assert!(yaml.contains("org.matrix.msc3202: true"), "{yaml}");
        assert!(
            !yaml.contains("msc4190"),
            "device creation is by login: {yaml}"
        );
    }

    #[test]
    fn the_manager_is_in_the_users_namespace_and_old_registrations_are_told_what_to_add() {
        let registration = sample();
        let manager_listed = registration.namespaces.users.iter().any(|namespace| {
            regex::Regex::new(&namespace.regex)
                .unwrap()
                .is_match("@crew:example.org")
        });
        assert!(manager_listed, "{:?}", registration.namespaces.users);
        assert_eq!(registration.manager_namespace_advice("example.org"), None);
        let mut old = registration.clone();
        old.namespaces.users.truncate(1);
        let advice = old.manager_namespace_advice("example.org").unwrap();
        assert!(
            advice.contains("regex: '^@crew:example\\.org$'"),
            "{advice}"
        );
        assert!(!old.our_users("example.org").contains("@crewx:example.org"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_documented_example_registration_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("registration.yaml");
        let registration = Registration::read(&path).unwrap();
        assert!(!registration.rate_limited);
        assert!(registration.namespaces.users[0].exclusive);
    }
}
