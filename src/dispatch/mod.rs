//! Who wakes for each event: mentions, DMs, replies, keywords; the policy; the loop guards.
//!
//! This module is the deterministic decision engine: [`decide`] reads one [`RoomEvent`] (parsed
//! once, at ingest) and answers
//! which agents wake and why (and why the others do not); [`Guards`] add the rate limits;
//! [`Rooms`] is the room model it reads; [`SaidSince`] keeps the "said since your last turn"
//! context; [`ReasonLog`] keeps decisions for `!crew why`. [`Dispatcher`] puts them together.
//!
//! It is not the wake queue, nor does it talk to the homeserver or run turns: the caller feeds
//! it events from the transaction stream and acts on its [`Decision`]s (queue the wakes, post the
//! [`Signal`]s, persist the state).

mod context;
mod context_store;
mod decide;
pub mod event;
mod guards;
mod history;
pub mod pump;
pub mod queue;
mod reasons;
mod room;
mod roster;
pub mod service;
pub mod text;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use context::{Missed, RoomLog, Said, SaidSince};
pub use decide::{Decision, Signal, Skip, SkipReason, Wake, WakeReason, decide, tag_depth};
pub use event::{DEPTH_KEY, RoomEvent, WRITTEN_WITH_KEY};
pub use guards::{Guards, RoomMessageCap, WINDOW_MS, WakeRateLimiter};
pub use history::SledHistory;
pub use reasons::{Kept, ReasonLog};
pub use room::{Member, Membership, PowerLevels, RoomState, Rooms};
pub use roster::{Agent, History, MemoryHistory, NoHistory, Remember, Role, Roster};
pub use service::DispatchService;

/// Errors building the dispatcher from config and agents; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// `dispatch.keywords` or `dispatch.worker_pairs` names no known agent.
    #[error(
        "dispatch config names `{0}`, which is not one of the agents (use its localpart or user id)"
    )]
    UnknownAgent(String),
    /// The same user id was given for two agents.
    #[error("agent {0} is listed twice")]
    DuplicateAgent(String),
    /// A limit is out of range.
    #[error("dispatch config is not valid: {0}")]
    Invalid(String),
}

/// Settings for waking agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Deepest wake allowed in a chain of agents waking agents (a person's message is depth 0).
    /// Past it nobody wakes and the humans get one notice.
    pub max_depth: u32,
    /// Most wakes one agent gets in any minute; more are skipped (reason `rate_limit`).
    pub agent_wakes_per_minute: u32,
    /// Most messages agents send in one room in any minute; over it, their messages wake nobody.
    pub room_agent_messages_per_minute: u32,
    /// Whether `@room` wakes every agent in the room (then only from senders whose power level
    /// allows notifying the room). Off by default: `@room` is meant for people.
    pub room_mentions: bool,
    /// Keywords per agent (key: localpart or user id) that wake it when they appear as whole
    /// words, case-insensitively.
    pub keywords: BTreeMap<String, Vec<String>>,
    /// Whether any Worker may wake any other Worker. The Manager and Workers may always wake
    /// each other.
    pub worker_to_worker: bool,
    /// Pairs of Workers (localparts or user ids) that may wake each other, both ways.
    pub worker_pairs: Vec<[String; 2]>,
    /// Messages kept per room as "said since your last turn" context.
    pub context_messages: usize,
    /// Most decisions kept for `!crew why`.
    pub reasons_kept: usize,
    /// How long decisions are kept for `!crew why`, in seconds.
    pub reasons_retention_secs: u64,
    /// Whether agents can read encrypted rooms (`encryption.enabled`, copied here by `crew
    /// serve`): then decrypted events are dispatched like clear ones and no "this room is
    /// encrypted" notice is given. Not a `dispatch` setting of its own.
    #[serde(skip)]
    pub read_encrypted: bool,
}

/// Default depth budget, from the issue: deep enough for Manager → Worker → Manager → Worker
/// hand-offs, shallow enough that a ping-pong stops within seconds.
const DEFAULT_MAX_DEPTH: u32 = 4;
/// An agent turn takes seconds; more than one wake every 3 s means a loop, not a conversation.
const DEFAULT_AGENT_WAKES_PER_MINUTE: u32 = 20;
/// Above one agent message every 2 s a room is unreadable for its people.
const DEFAULT_ROOM_AGENT_MESSAGES_PER_MINUTE: u32 = 30;
/// From the issue: the last 50 messages per room.
const DEFAULT_CONTEXT_MESSAGES: usize = 50;
const DEFAULT_REASONS_KEPT: usize = 10_000;
const DEFAULT_REASONS_RETENTION_SECS: u64 = 24 * 60 * 60;

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_depth: DEFAULT_MAX_DEPTH,
            agent_wakes_per_minute: DEFAULT_AGENT_WAKES_PER_MINUTE,
            room_agent_messages_per_minute: DEFAULT_ROOM_AGENT_MESSAGES_PER_MINUTE,
            room_mentions: false,
            keywords: BTreeMap::new(),
            worker_to_worker: false,
            worker_pairs: Vec::new(),
            context_messages: DEFAULT_CONTEXT_MESSAGES,
            reasons_kept: DEFAULT_REASONS_KEPT,
            reasons_retention_secs: DEFAULT_REASONS_RETENTION_SECS,
            read_encrypted: false,
        }
    }
}

impl DispatchConfig {
    /// Validates what serde cannot (the agent names are checked by [`Crew::new`]).
    pub fn check(&self) -> Result<(), DispatchError> {
        let positive = [
            ("agent_wakes_per_minute", self.agent_wakes_per_minute as u64),
            (
                "room_agent_messages_per_minute",
                self.room_agent_messages_per_minute as u64,
            ),
            ("context_messages", self.context_messages as u64),
            ("reasons_kept", self.reasons_kept as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(DispatchError::Invalid(format!(
                    "dispatch.{name} must be at least 1"
                )));
            }
        }
        for (agent, words) in &self.keywords {
            if words.iter().any(|w| w.trim().is_empty()) {
                return Err(DispatchError::Invalid(format!(
                    "dispatch.keywords.{agent} has an empty keyword"
                )));
            }
        }
        Ok(())
    }
}

impl RoomState {
    /// Records the one-time notices a decision asked for, so they are not asked for again, and
    /// re-arms the loop notice when a person speaks. Returns whether anything changed.
    pub fn record(&mut self, decision: &Decision) -> bool {
        let mut changed = false;
        if decision.message
            && !decision.sender_is_agent
            && decision.ignored.is_none()
            && self.loop_notified
        {
            self.loop_notified = false;
            changed = true;
        }
        for signal in &decision.signals {
            changed |= match signal {
                Signal::EncryptedRoom { agent } => self.encryption_notified.insert(agent.clone()),
                Signal::MentionHint { agent } => self.hinted.insert(agent.clone()),
                Signal::LoopStopped { .. } => !std::mem::replace(&mut self.loop_notified, true),
            };
        }
        changed
    }
}

/// The whole dispatcher for one process: decide, guard, remember. Call [`Dispatcher::dispatch`]
/// for every event of every transaction, in order.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    config: DispatchConfig,
    roster: Roster,
    /// The room model; persist it (serde) to survive restarts.
    pub rooms: Rooms,
    /// The rate windows (in memory only).
    pub guards: Guards,
    /// "Said since your last turn"; persist it if the context should survive restarts.
    pub context: SaidSince,
    /// Decisions for `!crew why`.
    pub reasons: ReasonLog,
}

impl Dispatcher {
    /// A dispatcher with empty state.
    pub fn new(config: DispatchConfig, roster: Roster) -> Result<Self, DispatchError> {
        config.check()?;
        Ok(Self {
            guards: Guards::new(
                config.agent_wakes_per_minute,
                config.room_agent_messages_per_minute,
            ),
            context: SaidSince::new(config.context_messages),
            reasons: ReasonLog::new(
                config.reasons_kept,
                config.reasons_retention_secs.saturating_mul(1000),
            ),
            rooms: Rooms::new(),
            config,
            roster,
        })
    }

    /// The config in force.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// The agents and policy in force.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Replaces the agents and policy (an agent was added or removed, an admin allowed someone).
    pub fn set_roster(&mut self, roster: Roster) {
        self.roster = roster;
    }

    /// Handles one event at `now_ms`: updates the room model, decides, applies the rate guards,
    /// marks one-time notices, keeps the message as context and the decision for `!crew why`.
    /// The caller queues the wakes, posts the signals and stores `decision.remember` in its
    /// [`History`].
    pub fn dispatch(&mut self, event: &RoomEvent, history: &dyn History, now_ms: u64) -> Decision {
        self.rooms.apply_event(event);
        let empty = RoomState::default();
        let state = self.rooms.get(&event.room_id).unwrap_or(&empty);
        let mut decision = decide(event, state, &self.roster, &self.config, history);
        self.guards.apply(&mut decision, now_ms);
        let recorded = self.rooms.entry(&event.room_id).record(&decision);
        decision.room_changed = event.is_state() || recorded;
        self.keep_context(event, &decision);
        self.reasons.insert(&decision, now_ms);
        decision
    }

    fn keep_context(&mut self, event: &RoomEvent, decision: &Decision) {
        if !decision.message || !matches!(decision.ignored, None | Some(SkipReason::Notice)) {
            return;
        }
        let message = event.message();
        self.context.push(
            &event.room_id,
            event.event_id.clone(),
            event.sender.clone(),
            text::strip_quotes(event.body()).into_owned(),
            message.and_then(|message| message.written_with.clone()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_checks() {
        let config = DispatchConfig::default();
        assert_eq!(config.max_depth, 4);
        assert_eq!(config.context_messages, 50);
        assert!(!config.room_mentions);
        config.check().unwrap();
        let bad = DispatchConfig {
            agent_wakes_per_minute: 0,
            ..DispatchConfig::default()
        };
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("agent_wakes_per_minute")
        );
        let parsed: DispatchConfig =
            toml::from_str("max_depth = 2\n[keywords]\ncrew_ops = [\"deploy\"]").unwrap();
        assert_eq!(parsed.max_depth, 2);
        assert_eq!(parsed.keywords["crew_ops"], ["deploy"]);
        assert!(toml::from_str::<DispatchConfig>("max_dept = 2").is_err());
    }
}
