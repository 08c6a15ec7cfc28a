//! The team roster: which agents exist, under which Matrix user, with which role.
//!
//! The Manager always exists (it is the appservice's own user). Workers are created by the
//! Manager (or the operator's CLI) and keep their record when stopped or removed, so their files
//! and history stay attributable. Creating a name that exists returns the existing Worker:
//! creation is idempotent, never a duplicate.

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, Tree};

/// Longest Worker name accepted (the localpart gets the prefix in front).
const MAX_NAME_LEN: usize = 32;

/// Whether a Worker takes wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Active,
    /// Keeps its data; wakes nothing until started again.
    Stopped,
    /// Token revoked, rooms left; the record stays for history.
    Removed,
}

/// One Worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    /// Lowercase name, e.g. `alice`.
    pub name: String,
    pub user_id: OwnedUserId,
    pub display_name: String,
    pub role: String,
    pub state: WorkerState,
    /// Model override; `None` uses the configured default.
    #[serde(default)]
    pub model: Option<String>,
    /// Words that wake this Worker in rooms it is in, besides mentions.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Its own room, "Worker: <Name>", once provisioned.
    #[serde(default)]
    pub room: Option<ruma::OwnedRoomId>,
    pub created_ms: u64,
}

/// Errors about the roster; each is a sentence a human can act on.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "`{0}` is not a valid worker name: use 1-32 lowercase letters, digits, '.', '_' or '-', starting with a letter"
    )]
    InvalidName(String),
    #[error("there is no worker named `{0}`")]
    Unknown(String),
    /// The name is one of [`crate::storage::access::RESERVED_AGENT_NAMES`].
    #[error(
        "`{0}` is a reserved name (it is the Manager's own folder or one of ours); choose another worker name"
    )]
    Reserved(String),
    /// A new Worker would pass `limits.max_workers`; the message names the limit.
    #[error(
        "the crew already has {count} Workers, the most the limit limits.max_workers = {max} allows; remove one or ask the operator to raise the limit"
    )]
    WorkerCap { count: usize, max: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The roster in sled (`workers` tree, keyed by name).
#[derive(Clone)]
pub struct Registry {
    workers: Tree<String, Worker>,
    /// Bumped on every change, so the dispatcher knows when to reload the roster.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    prefix: String,
    server_name: String,
}

impl Registry {
    pub fn open(store: &Store, prefix: &str, server_name: &str) -> Result<Self, StoreError> {
        Ok(Self {
            workers: store.tree("workers")?,
            generation: Default::default(),
            prefix: prefix.to_owned(),
            server_name: server_name.to_owned(),
        })
    }

    /// Normalises and checks a name a human typed ("Alice" → "alice").
    pub fn normalise_name(name: &str) -> Result<String, RegistryError> {
        let name = name.trim().trim_start_matches('@').to_lowercase();
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if valid {
            Ok(name)
        } else {
            Err(RegistryError::InvalidName(name))
        }
    }

    /// The user id a Worker of this name has.
    pub fn user_id_for(&self, name: &str) -> Result<OwnedUserId, RegistryError> {
        let name = Self::normalise_name(name)?;
        UserId::parse(format!("@{}{}:{}", self.prefix, name, self.server_name))
            .map_err(|_| RegistryError::InvalidName(name))
    }

    /// Records a Worker, or returns the existing one of that name (reactivated if removed or
    /// stopped is *not* implied: its state is kept). The bool says whether it was created now.
    pub fn create(
        &self,
        name: &str,
        role: &str,
        now_ms: u64,
    ) -> Result<(Worker, bool), RegistryError> {
        let name = Self::new_worker_name(name)?;
        let user_id = self.user_id_for(&name)?;
        let worker = Worker {
            display_name: capitalise(&name),
            name: name.clone(),
            user_id,
            role: role.trim().to_owned(),
            state: WorkerState::Active,
            model: None,
            keywords: Vec::new(),
            room: None,
            created_ms: now_ms,
        };
        if self.workers.insert_new(&name, &worker)? {
            self.bump();
            return Ok((worker, true));
        }
        let existing = self
            .workers
            .get(&name)?
            .ok_or_else(|| RegistryError::Unknown(name.clone()))?;
        Ok((existing, false))
    }

    /// A name a new Worker may take: valid, and not one of the reserved names.
    fn new_worker_name(name: &str) -> Result<String, RegistryError> {
        let name = Self::normalise_name(name)?;
        if crate::storage::access::RESERVED_AGENT_NAMES.contains(&name.as_str()) {
            return Err(RegistryError::Reserved(name));
        }
        Ok(name)
    }

    /// Refuses a new Worker named `name` past `max` Workers (removed ones do not count, and an
    /// existing name is not a new Worker): the one check behind the Manager's `create_worker`,
    /// `crew workers add` and the admin API alike.
    pub fn check_cap(&self, name: &str, max: usize) -> Result<(), RegistryError> {
        let name = Self::new_worker_name(name)?;
        if self.workers.get(&name)?.is_some() {
            return Ok(());
        }
        let count = self
            .list()?
            .iter()
            .filter(|worker| worker.state != WorkerState::Removed)
            .count();
        if count >= max {
            return Err(RegistryError::WorkerCap { count, max });
        }
        Ok(())
    }

    /// Changes whenever the roster changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks the roster changed without changing a Worker (the Manager's name changed), so the
    /// dispatcher reloads it.
    pub fn mark_changed(&self) {
        self.bump();
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn get(&self, name: &str) -> Result<Option<Worker>, RegistryError> {
        let name = Self::normalise_name(name)?;
        Ok(self.workers.get(&name)?)
    }

    /// The Worker with this user id, if it is one of ours.
    pub fn by_user(&self, user: &UserId) -> Result<Option<Worker>, RegistryError> {
        let Some(name) = user
            .localpart()
            .strip_prefix(&self.prefix)
            .filter(|_| user.server_name().as_str() == self.server_name)
        else {
            return Ok(None);
        };
        Ok(self.workers.get(&name.to_owned())?)
    }

    pub fn list(&self) -> Result<Vec<Worker>, RegistryError> {
        Ok(self
            .workers
            .iter()
            .map(|entry| entry.map(|(_, worker)| worker))
            .collect::<Result<_, _>>()?)
    }

    /// Changes a Worker; unknown names are an error.
    pub fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut Worker),
    ) -> Result<Worker, RegistryError> {
        let name = Self::normalise_name(name)?;
        let updated = self
            .workers
            .update(&name, |worker| {
                worker.map(|mut worker| {
                    change(&mut worker);
                    worker
                })
            })?
            .ok_or(RegistryError::Unknown(name))?;
        // Only after the write: a reader that sees the new generation must read the new roster
        // (bumping first let the pump reload the old one and never look again).
        self.bump();
        Ok(updated)
    }
}

impl Registry {
    /// The dispatcher's view of our agents: the Manager and every active Worker. Stopped and
    /// removed Workers are known to it as retired, so a keyword or Worker pair naming one wakes
    /// nobody instead of making the roster invalid.
    pub fn dispatch_roster(
        &self,
        manager: &UserId,
        manager_name: String,
        admins: &[OwnedUserId],
        allowed: &crate::config::InvitePolicy,
        config: &crate::dispatch::DispatchConfig,
    ) -> Result<crate::dispatch::Roster, String> {
        use crate::dispatch::{Agent, Role};
        let mut agents = vec![Agent {
            user_id: manager.to_owned(),
            role: Role::Manager,
            display_name: manager_name,
            keywords: Vec::new(),
        }];
        let mut retired = Vec::new();
        for worker in self.list().map_err(|error| error.to_string())? {
            if worker.state == WorkerState::Active {
                agents.push(Agent {
                    user_id: worker.user_id,
                    role: Role::Worker,
                    display_name: worker.display_name,
                    keywords: worker.keywords,
                });
            } else {
                retired.push(worker.user_id);
            }
        }
        crate::dispatch::Roster::with_retired(
            agents,
            &retired,
            admins.iter().cloned(),
            allowed.allow_users.iter().cloned(),
            config,
        )
        .map(|roster| roster.allowing_servers(allowed.allow_servers.iter().cloned()))
        .map_err(|error| error.to_string())
    }
}

fn capitalise(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_cap_counts_live_workers_and_names_its_limit() {
        let store = Store::temporary().unwrap();
        let registry = Registry::open(&store, "crew_", "example.org").unwrap();
        registry.create("alice", "", 1).unwrap();
        registry.create("bob", "", 1).unwrap();
        let refused = registry.check_cap("carol", 2).unwrap_err();
        assert!(matches!(
            refused,
            RegistryError::WorkerCap { count: 2, max: 2 }
        ));
        assert!(refused.to_string().contains("limits.max_workers = 2"));
        registry
            .check_cap("alice", 2)
            .expect("an existing name is not a new Worker");
        registry
            .update("bob", |worker| worker.state = WorkerState::Removed)
            .unwrap();
        registry
            .check_cap("carol", 2)
            .expect("a removed Worker does not count");
        assert!(matches!(
            registry.check_cap("manager", 10),
            Err(RegistryError::Reserved(_))
        ));
    }

    #[test]
    fn creating_twice_returns_the_same_worker() {
        let store = Store::temporary().unwrap();
        let registry = Registry::open(&store, "crew_", "example.org").unwrap();
        let (alice, created) = registry.create("Alice", "frontend", 1).unwrap();
        assert!(created);
        assert_eq!(alice.user_id.as_str(), "@crew_alice:example.org");
        assert_eq!(alice.display_name, "Alice");
        let (again, created) = registry.create("alice", "something else", 2).unwrap();
        assert!(!created);
        assert_eq!(again.role, "frontend");
        assert_eq!(registry.list().unwrap().len(), 1);
        let found = registry.by_user(&alice.user_id).unwrap().unwrap();
        assert_eq!(found.name, "alice");
    }

    #[test]
    fn the_generation_moves_only_after_the_write() {
        let store = Store::temporary().unwrap();
        let registry = Registry::open(&store, "crew_", "example.org").unwrap();
        registry.create("coder", "code", 1).unwrap();
        let before = registry.generation();
        let mut seen_during_write = None;
        registry
            .update("coder", |worker| {
                seen_during_write = Some(registry.generation());
                worker.state = WorkerState::Stopped;
            })
            .unwrap();
        assert_eq!(
            seen_during_write,
            Some(before),
            "a reader must not see the new generation before the new roster"
        );
        assert!(registry.generation() > before);
    }

    #[test]
    fn a_stopped_or_removed_worker_named_in_keywords_or_pairs_keeps_the_roster_valid() {
        use crate::dispatch::DispatchConfig;
        let store = Store::temporary().unwrap();
        let registry = Registry::open(&store, "crew_", "example.org").unwrap();
        for name in ["coder", "writer", "tester"] {
            registry.create(name, "work", 1).unwrap();
        }
        let mut config = DispatchConfig::default();
        config
            .keywords
            .insert("crew_coder".into(), vec!["deploy".into()]);
        config
            .keywords
            .insert("@crew_tester:example.org".into(), vec!["qa".into()]);
        config.worker_pairs = vec![["crew_coder".into(), "crew_writer".into()]];
        let manager = UserId::parse("@crew:example.org").unwrap();
        let roster = |registry: &Registry| {
            registry.dispatch_roster(
                &manager,
                "Manager".into(),
                &[],
                &Default::default(),
                &config,
            )
        };
        roster(&registry).expect("every name is an active agent");
        registry
            .update("coder", |worker| worker.state = WorkerState::Stopped)
            .unwrap();
        registry
            .update("tester", |worker| worker.state = WorkerState::Removed)
            .unwrap();
        let roster = roster(&registry).expect("a retired name wakes nobody, it is not an error");
        let active: Vec<&str> = roster
            .agents()
            .map(|agent| agent.user_id.as_str())
            .collect();
        assert_eq!(active, ["@crew:example.org", "@crew_writer:example.org"]);
        // A name that was never an agent is still a typo worth refusing.
        config.keywords.insert("nobody".into(), vec!["x".into()]);
        let error = registry
            .dispatch_roster(
                &manager,
                "Manager".into(),
                &[],
                &Default::default(),
                &config,
            )
            .unwrap_err();
        assert!(error.contains("nobody"), "{error}");
    }

    /// Who is an allowed person is one rule: admins, listed users and users of listed servers.
    /// The dispatcher's roster (who may wake agents) agrees with the invite policy (who may
    /// invite them, who gets `!crew` answers) for every kind of person.
    #[test]
    fn the_roster_allows_exactly_whom_the_invite_policy_allows() {
        let store = Store::temporary().unwrap();
        let registry = Registry::open(&store, "crew_", "example.org").unwrap();
        let manager = UserId::parse("@crew:example.org").unwrap();
        let admins = [UserId::parse("@admin:example.org").unwrap()];
        let policy = crate::config::InvitePolicy {
            allow_users: vec![UserId::parse("@carol:elsewhere.org").unwrap()],
            allow_servers: vec!["friends.org".try_into().unwrap()],
        };
        let roster = registry
            .dispatch_roster(
                &manager,
                "Manager".into(),
                &admins,
                &policy,
                &crate::dispatch::DispatchConfig::default(),
            )
            .unwrap();
        for (who, allowed) in [
            ("@admin:example.org", true),
            ("@carol:elsewhere.org", true),
            ("@dave:friends.org", true),
            ("@mallory:elsewhere.org", false),
            ("@eve:example.org", false),
            ("@dave:notfriends.org", false),
        ] {
            let user = UserId::parse(who).unwrap();
            assert_eq!(policy.allows(&user, &admins), allowed, "{who} (invites)");
            assert_eq!(roster.is_allowed_person(&user), allowed, "{who} (dispatch)");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_rule() {
        for bad in ["", "1abc", "a b", "../x", "ÄÖ", &"x".repeat(40)] {
            let error = Registry::normalise_name(bad).unwrap_err().to_string();
            assert!(error.contains("lowercase letters"), "{error}");
        }
    }
}
