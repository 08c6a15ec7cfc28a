//! Our agents and who may wake them: the inputs to [`super::decide`] that change rarely.
//!
//! Not the agents themselves (that is `crate::agent`): only their ids, names, keywords and the
//! wake policy between people and agents.

use std::collections::{HashMap, HashSet, VecDeque};

use ruma::{EventId, OwnedEventId, OwnedServerName, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::{DispatchConfig, DispatchError};

/// Up to this many agents, lookups scan the list instead of hashing (measured in the bench).
const LINEAR_LOOKUP_MAX: usize = 16;

/// Whether an agent is the Manager or a Worker: decides who may wake whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The appservice's main user; may always wake Workers and be woken by them.
    Manager,
    /// A Worker; may wake other Workers only where configured.
    Worker,
}

/// One of our agents as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub user_id: OwnedUserId,
    pub role: Role,
    /// Global display name; used (with the localpart) only for the mention hint, never to wake.
    pub display_name: String,
    /// Extra keywords for this agent (added to those in [`DispatchConfig::keywords`]).
    #[serde(default)]
    pub keywords: Vec<String>,
}

/// An agent with its matching data prepared once.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub agent: Agent,
    /// Lowercased, non-empty keywords.
    pub keywords: Vec<String>,
    /// Lowercased localpart and display name, for the hint.
    pub names: Vec<String>,
}

/// Our agents plus the wake policy: admins, the people they allow, and Worker pairs.
#[derive(Debug, Clone)]
pub struct Roster {
    pub(crate) agents: Vec<Prepared>,
    index: HashMap<OwnedUserId, usize>,
    admins: HashSet<OwnedUserId>,
    allowed: HashSet<OwnedUserId>,
    /// Every user of these servers is an allowed person (`invites.allow_servers`).
    allowed_servers: HashSet<OwnedServerName>,
    worker_to_worker: bool,
    /// Unordered pairs of agent indexes, stored both ways.
    worker_pairs: HashSet<(usize, usize)>,
    pub(crate) any_keywords: bool,
}

impl Roster {
    /// Builds the roster. Keywords and Worker pairs in `config` name agents by localpart or full
    /// user id; a name that matches no agent is an error (a typo would silently never wake).
    pub fn new(
        agents: Vec<Agent>,
        admins: impl IntoIterator<Item = OwnedUserId>,
        allowed: impl IntoIterator<Item = OwnedUserId>,
        config: &DispatchConfig,
    ) -> Result<Self, DispatchError> {
        Self::with_retired(agents, &[], admins, allowed, config)
    }

    /// Like [`Roster::new`], but names in `config` that match a `retired` agent (a stopped or
    /// removed Worker) are accepted and wake nobody: stopping a Worker that a keyword or a
    /// Worker pair names must not break every later roster reload, nor the next start.
    pub fn with_retired(
        agents: Vec<Agent>,
        retired: &[OwnedUserId],
        admins: impl IntoIterator<Item = OwnedUserId>,
        allowed: impl IntoIterator<Item = OwnedUserId>,
        config: &DispatchConfig,
    ) -> Result<Self, DispatchError> {
        let mut index = HashMap::new();
        for (i, agent) in agents.iter().enumerate() {
            if index.insert(agent.user_id.clone(), i).is_some() {
                return Err(DispatchError::DuplicateAgent(agent.user_id.to_string()));
            }
        }
        let names = |user: &UserId, name: &str| user.as_str() == name || user.localpart() == name;
        let find = |name: &str| -> Result<Option<usize>, DispatchError> {
            if let Some(i) = agents.iter().position(|a| names(&a.user_id, name)) {
                return Ok(Some(i));
            }
            if retired.iter().any(|user| names(user, name)) {
                return Ok(None);
            }
            Err(DispatchError::UnknownAgent(name.to_owned()))
        };
        let mut extra: Vec<Vec<String>> = vec![Vec::new(); agents.len()];
        for (name, words) in &config.keywords {
            if let Some(i) = find(name)? {
                extra[i].extend(words.iter().cloned());
            }
        }
        let mut worker_pairs = HashSet::new();
        for [a, b] in &config.worker_pairs {
            if let (Some(a), Some(b)) = (find(a)?, find(b)?) {
                worker_pairs.insert((a, b));
                worker_pairs.insert((b, a));
            }
        }
        let agents: Vec<Prepared> = agents
            .into_iter()
            .zip(extra)
            .map(|(agent, extra)| {
                let mut keywords: Vec<String> = agent
                    .keywords
                    .iter()
                    .chain(extra.iter())
                    .map(|k| k.trim().to_lowercase())
                    .filter(|k| !k.is_empty())
                    .collect();
                keywords.sort();
                keywords.dedup();
                let mut names = vec![agent.user_id.localpart().to_lowercase()];
                let display = agent.display_name.trim().to_lowercase();
                if !display.is_empty() && !names.contains(&display) {
                    names.push(display);
                }
                Prepared {
                    agent,
                    keywords,
                    names,
                }
            })
            .collect();
        let any_keywords = agents.iter().any(|a| !a.keywords.is_empty());
        Ok(Self {
            agents,
            index,
            admins: admins.into_iter().collect(),
            allowed: allowed.into_iter().collect(),
            allowed_servers: HashSet::new(),
            worker_to_worker: config.worker_to_worker,
            worker_pairs,
            any_keywords,
        })
    }

    /// The agents, in the order given.
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.iter().map(|p| &p.agent)
    }

    /// The agent with this user id.
    pub fn agent(&self, user: &UserId) -> Option<&Agent> {
        self.index.get(user).map(|&i| &self.agents[i].agent)
    }

    pub(crate) fn index_of(&self, user: &UserId) -> Option<usize> {
        // A crew is a handful of agents: comparing a few strings beats hashing one.
        if self.agents.len() <= LINEAR_LOOKUP_MAX {
            return self
                .agents
                .iter()
                .position(|p| p.agent.user_id.as_str() == user.as_str());
        }
        self.index.get(user).copied()
    }

    /// Also allows every user of `servers` (`invites.allow_servers`), as
    /// `config::InvitePolicy::allows` does: a person the invite rule lets in may wake agents.
    pub fn allowing_servers(mut self, servers: impl IntoIterator<Item = OwnedServerName>) -> Self {
        self.allowed_servers = servers.into_iter().collect();
        self
    }

    /// True for admins and the people they allowed: listed users and users of listed servers
    /// (the same rule as `config::InvitePolicy::allows`, which decides invites and `!crew`).
    pub fn is_allowed_person(&self, user: &UserId) -> bool {
        self.admins.contains(user)
            || self.allowed.contains(user)
            || self.allowed_servers.contains(user.server_name())
    }

    /// Whether `sender` may wake agent number `target` (not the sender itself).
    pub(crate) fn may_wake(
        &self,
        sender: &UserId,
        sender_agent: Option<usize>,
        target: usize,
    ) -> bool {
        match sender_agent {
            None => self.is_allowed_person(sender),
            Some(from) if from == target => false,
            Some(from) => {
                let roles = (self.agents[from].agent.role, self.agents[target].agent.role);
                match roles {
                    (Role::Manager, _) | (_, Role::Manager) => true,
                    (Role::Worker, Role::Worker) => {
                        self.worker_to_worker || self.worker_pairs.contains(&(from, target))
                    }
                }
            }
        }
    }
}

/// What the dispatcher needs to remember about earlier messages: their senders (for replies and
/// edits) and which agents they already mentioned (so an edit wakes each agent at most once).
/// The lead backs it with sled; [`MemoryHistory`] is the in-memory version.
pub trait History {
    /// Who sent `event`, if known.
    fn sender_of(&self, event: &EventId) -> Option<OwnedUserId>;
    /// Agents that `event` or any earlier edit of it already mentioned.
    fn mentioned_by(&self, event: &EventId) -> Vec<OwnedUserId>;
}

/// A fact to add to [`History`] after a decision: `event` was sent by `sender` and (now) also
/// mentions `mentioned`. For an edit, `event` is the original event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remember {
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    /// Agents to add to the event's mentioned set (a union, never a replacement).
    pub mentioned: Vec<OwnedUserId>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Remembered {
    sender: Option<OwnedUserId>,
    mentioned: Vec<OwnedUserId>,
}

/// A bounded in-memory [`History`]: the most recent `capacity` events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryHistory {
    capacity: usize,
    events: HashMap<OwnedEventId, Remembered>,
    order: VecDeque<OwnedEventId>,
}

impl MemoryHistory {
    /// Keeps at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            events: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds what a decision asked to remember.
    pub fn remember(&mut self, fact: &Remember) {
        if let Some(entry) = self.events.get_mut(&fact.event_id) {
            for user in &fact.mentioned {
                if !entry.mentioned.contains(user) {
                    entry.mentioned.push(user.clone());
                }
            }
            if entry.sender.is_none() {
                entry.sender = Some(fact.sender.clone());
            }
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.events.remove(&old);
            }
        }
        self.order.push_back(fact.event_id.clone());
        self.events.insert(
            fact.event_id.clone(),
            Remembered {
                sender: Some(fact.sender.clone()),
                mentioned: fact.mentioned.clone(),
            },
        );
    }

    /// Number of events remembered.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl History for MemoryHistory {
    fn sender_of(&self, event: &EventId) -> Option<OwnedUserId> {
        self.events.get(event).and_then(|e| e.sender.clone())
    }

    fn mentioned_by(&self, event: &EventId) -> Vec<OwnedUserId> {
        self.events
            .get(event)
            .map(|e| e.mentioned.clone())
            .unwrap_or_default()
    }
}

/// A history that knows nothing (every reply target and edit original is unknown).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl History for NoHistory {
    fn sender_of(&self, _event: &EventId) -> Option<OwnedUserId> {
        None
    }

    fn mentioned_by(&self, _event: &EventId) -> Vec<OwnedUserId> {
        Vec::new()
    }
}
