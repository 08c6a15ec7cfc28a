//! The decision: for one typed event, which agents wake and why, and why the others do not.
//!
//! Pure: the same event, room state, crew, config and history always give the same decision.
//! Stateful limits (rate limits, room caps) and one-time bookkeeping are applied afterwards by
//! [`super::Guards`] and [`super::RoomState::record`]; [`super::Dispatcher`] does all of it.

use ruma::events::TimelineEventType;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::DispatchConfig;
use super::event::{Content, DEPTH_KEY, Mentions, RoomEvent};
use super::room::RoomState;
use super::roster::{History, Remember, Roster};
use super::text;

/// Marks message content an agent is about to send while handling a wake of depth `depth`, so
/// that the wakes its echo causes get depth `depth + 1`.
pub fn tag_depth(content: &mut Map<String, Value>, depth: u32) {
    content.insert(DEPTH_KEY.to_owned(), Value::from(depth));
}

/// Why an agent wakes (or would have woken, in a [`Skip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WakeReason {
    /// Listed in `m.mentions`, or pilled / named by full user id by a client without it.
    Mentioned,
    /// The room has exactly one human and this agent.
    DirectMessage,
    /// The message replies to one of this agent's messages.
    Reply,
    /// One of the agent's keywords appears as a whole word.
    Keyword,
    /// `@room`, where enabled and the sender may notify the room.
    RoomMention,
    /// An edit newly added the agent to its `m.mentions`.
    EditMention,
    // Internal wakes: not read from a message but queued by crew itself (projects), so they are
    // never bit-packed by `decide` (they are not in `WakeReason::ALL`).
    /// One of the project tasks the Manager follows was completed by its Worker.
    TaskCompleted,
    /// A project task's Worker is blocked on a question.
    TaskBlocked,
    /// A project task's Worker has been quiet past its time.
    ProgressOverdue,
    /// Everything a project task depends on is done: its Worker starts it.
    DependencyDone,
    /// A project task's result was sent back: its Worker redoes it.
    RevisionNeeded,
    /// Every task of a project is done: the Manager looks at the results before the summary.
    ProjectReview,
    /// A Worker reached its tool-step limit while making progress and goes on in a new turn.
    StepsContinued,
}

/// Scratch flag: the agent is joined to the room.
const JOINED: u8 = 1 << 7;
/// Scratch flag: an edit re-mentions an agent the original already mentioned.
const ALREADY_MENTIONED: u8 = 1 << 6;
/// Scratch bits that are [`WakeReason`]s.
const REASON_BITS: u8 = (1 << 6) - 1;

impl WakeReason {
    const ALL: [WakeReason; 6] = [
        WakeReason::Mentioned,
        WakeReason::DirectMessage,
        WakeReason::Reply,
        WakeReason::Keyword,
        WakeReason::RoomMention,
        WakeReason::EditMention,
    ];

    fn bit(self) -> u8 {
        // Internal reasons (after `EditMention`) never reach the packed bits.
        1u8.checked_shl(self as u32).unwrap_or(0) & REASON_BITS
    }

    fn from_bits(bits: u8) -> Vec<WakeReason> {
        Self::ALL
            .iter()
            .copied()
            .filter(|r| bits & r.bit() != 0)
            .collect()
    }
}

/// Why an agent does not wake, or (in [`Decision::ignored`]) why the whole event wakes nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Nothing in the message is for this agent.
    NoMention,
    /// `@room` was used but room mentions are off in the config.
    RoomMentionOff,
    /// `@room` was used by someone below the room's `notifications.room` power level.
    RoomMentionNotPermitted,
    /// The sender may not wake this agent (not an admin or allowed person; or a Worker pair
    /// that is not configured).
    NotAllowed,
    /// The agent is addressed but not joined to the room.
    NotInRoom,
    /// The agent sent this event itself.
    OwnEcho,
    /// The wake would be deeper than `max_depth`: a loop is stopped here.
    LoopBudget,
    /// The agent was woken too often in the last minute.
    RateLimit,
    /// Agents sent too many messages in this room in the last minute.
    RoomCap,
    /// An edit re-mentions an agent the original (or an earlier edit) already mentioned.
    EditAlreadyMentioned,
    /// An edit by someone other than the original sender (clients ignore those too).
    EditNotBySender,
    /// An edit of an event the history does not know; nothing is woken rather than guess.
    EditUnknownOriginal,
    /// The event or room is end-to-end encrypted: agents cannot read it.
    Encrypted,
    /// `m.notice`: bots' messages, never answered (this is what stops bot loops in Matrix).
    Notice,
    /// The event was redacted.
    Redacted,
    /// State events (membership, names, power levels) only update the room model.
    StateEvent,
    /// Not a message (reactions, redactions, calls, …).
    NotAMessage,
    /// A message whose content is not an object or has no `msgtype`, or an edit naming no
    /// valid event (events without valid ids or type are rejected at ingest).
    Malformed,
}

/// One agent to wake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wake {
    pub agent: OwnedUserId,
    pub reasons: Vec<WakeReason>,
    /// Loop depth of this wake: 0 for people, `d + 1` for messages agents send in a wake of `d`.
    pub depth: u32,
}

/// One agent that does not wake, with the reason and what it would have woken for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    pub agent: OwnedUserId,
    pub reason: SkipReason,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wanted: Vec<WakeReason>,
}

/// Something the lead should post (once) as a result of the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Signal {
    /// `agent` is in an encrypted room: say once that it cannot read it and offer an
    /// unencrypted room.
    EncryptedRoom { agent: OwnedUserId },
    /// A person named `agent` by display name or localpart without mentioning it: post once
    /// how to mention it.
    MentionHint { agent: OwnedUserId },
    /// A chain of agents waking agents reached the depth budget: tell the humans once.
    LoopStopped { depth: u32, max_depth: u32 },
}

/// The outcome for one event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub event_id: Option<OwnedEventId>,
    pub room_id: Option<OwnedRoomId>,
    pub sender: Option<OwnedUserId>,
    /// True when the sender is one of our agents.
    pub sender_is_agent: bool,
    /// True for `m.room.message` events (counted by the room cap, kept as context).
    pub message: bool,
    /// Depth of the wakes this event causes.
    pub depth: u32,
    /// Set when the whole event wakes nobody, whatever it says.
    pub ignored: Option<SkipReason>,
    pub wakes: Vec<Wake>,
    pub skips: Vec<Skip>,
    pub signals: Vec<Signal>,
    /// What to add to the [`History`] (for later replies and edits).
    pub remember: Option<Remember>,
    /// The room model changed (a state event, or a one-time notice recorded): only then does
    /// the room need saving; a plain message leaves it as it was.
    #[serde(skip)]
    pub room_changed: bool,
}

impl Decision {
    /// The agents woken, in crew order.
    pub fn woken(&self) -> impl Iterator<Item = &UserId> {
        self.wakes.iter().map(|w| w.agent.as_ref())
    }

    /// The reason `agent` did not wake, if it was considered.
    pub fn skip_reason(&self, agent: &UserId) -> Option<SkipReason> {
        self.skips
            .iter()
            .find(|s| s.agent == agent)
            .map(|s| s.reason)
            .or(self.ignored)
    }

    /// Moves the wake of `agent` to the skips with `reason` (used by the guards).
    pub(crate) fn demote(&mut self, index: usize, reason: SkipReason) {
        let wake = self.wakes.remove(index);
        self.skips.push(Skip {
            agent: wake.agent,
            reason,
            wanted: wake.reasons,
        });
    }
}

/// Decides who wakes for `event` (one event of a transaction, parsed at ingest) in `room`.
///
/// Implements the rules: `m.mentions` is authoritative when present; otherwise pills
/// and full user ids outside quotes and reply fallbacks; replies to an agent's message (not a
/// thread's fallback reply); edits wake only newly mentioned agents, once, and only when the
/// editor sent the original; a DM (one person, one agent) wakes its agent; `@room` only when
/// enabled and permitted; whole-word keywords; then the policy and the depth budget.
pub fn decide(
    event: &RoomEvent,
    room: &RoomState,
    crew: &Roster,
    config: &DispatchConfig,
    history: &dyn History,
) -> Decision {
    let mut decision = Decision {
        event_id: Some(event.event_id.clone()),
        room_id: Some(event.room_id.clone()),
        sender: Some(event.sender.clone()),
        ..Decision::default()
    };
    let sender = event.sender.as_ref();
    let event_id: &EventId = &event.event_id;
    let sender_agent = crew.index_of(sender);
    decision.sender_is_agent = sender_agent.is_some();
    let is_state = event.is_state();
    let is_message = event.kind == TimelineEventType::RoomMessage;
    decision.message = is_message && !is_state;

    // Only the room's `m.room.encryption` state makes it encrypted (and worth the notice); an
    // encrypted event in a room without it is unreadable, not a reason to give up on the room.
    if room.encrypted && !config.read_encrypted {
        for prepared in &crew.agents {
            let agent = &prepared.agent.user_id;
            if room.is_joined(agent) && !room.encryption_notified.contains(agent) {
                decision.signals.push(Signal::EncryptedRoom {
                    agent: agent.clone(),
                });
            }
        }
    }
    if is_state {
        decision.ignored = Some(SkipReason::StateEvent);
        return decision;
    }
    if event.redacted {
        decision.ignored = Some(SkipReason::Redacted);
        return decision;
    }
    // With encryption on, what arrives here was decrypted already (`crate::crypto`); an
    // `m.room.encrypted` event is one that could not be.
    if (room.encrypted && !config.read_encrypted) || event.kind == TimelineEventType::RoomEncrypted
    {
        decision.ignored = Some(SkipReason::Encrypted);
        return decision;
    }
    if !is_message {
        decision.ignored = Some(SkipReason::NotAMessage);
        return decision;
    }
    let content = match &event.content {
        Content::Message(message) => message,
        // What a redacted message looks like when `unsigned` was stripped.
        Content::Empty => {
            decision.ignored = Some(SkipReason::Redacted);
            return decision;
        }
        _ => {
            decision.ignored = Some(SkipReason::Malformed);
            return decision;
        }
    };
    if content.msgtype == "m.notice" {
        decision.ignored = Some(SkipReason::Notice);
        return decision;
    }
    decision.depth = match sender_agent {
        None => 0,
        Some(_) => {
            let carried = content.depth.unwrap_or(0);
            u32::try_from(carried).unwrap_or(u32::MAX).saturating_add(1)
        }
    };

    // One byte of scratch per agent: the wake reasons' bits plus two flags.
    let mut wanted: Vec<u8> = crew
        .agents
        .iter()
        .map(|p| {
            if room.is_joined(&p.agent.user_id) {
                JOINED
            } else {
                0
            }
        })
        .collect();
    let relates = content.relates_to.as_ref();
    let rel_type = relates.and_then(|r| r.rel_type.as_deref());
    let stripped_body = text::strip_quotes(&content.body);
    let mut room_mention = false;
    let is_edit = rel_type == Some("m.replace");

    if is_edit {
        let Some(original) = relates.and_then(|r| r.event_id.clone()) else {
            decision.ignored = Some(SkipReason::Malformed);
            return decision;
        };
        let Some(original_sender) = history.sender_of(&original) else {
            decision.ignored = Some(SkipReason::EditUnknownOriginal);
            return decision;
        };
        if original_sender != *sender {
            decision.ignored = Some(SkipReason::EditNotBySender);
            return decision;
        }
        let before = history.mentioned_by(&original);
        let mut newly = Vec::new();
        if let Some(mentions) = &content.mentions {
            for_each_mentioned_agent(mentions, crew, |i| {
                let agent = &crew.agents[i].agent.user_id;
                if before.contains(agent) {
                    wanted[i] |= ALREADY_MENTIONED;
                } else {
                    wanted[i] |= WakeReason::EditMention.bit();
                    if !newly.contains(agent) {
                        newly.push(agent.clone());
                    }
                }
            });
        }
        decision.remember = Some(Remember {
            event_id: original,
            sender: original_sender,
            mentioned: newly,
        });
    } else {
        match &content.mentions {
            Some(mentions) => {
                // Present: the whole truth. `{}` (or anything not an object) mentions nobody.
                for_each_mentioned_agent(mentions, crew, |i| {
                    wanted[i] |= WakeReason::Mentioned.bit();
                });
                room_mention = mentions.room;
            }
            None => {
                if content.format.as_deref() == Some("org.matrix.custom.html")
                    && let Some(html) = content.formatted_body.as_deref()
                {
                    let html = text::strip_html_quotes(html);
                    text::for_each_pill(&html, |user| {
                        if let Some(i) = crew.index_of(user) {
                            wanted[i] |= WakeReason::Mentioned.bit();
                        }
                    });
                }
                if stripped_body.contains('@') {
                    for (i, prepared) in crew.agents.iter().enumerate() {
                        if text::mentions_user_id(&stripped_body, prepared.agent.user_id.as_str()) {
                            wanted[i] |= WakeReason::Mentioned.bit();
                        }
                    }
                    room_mention = text::mentions_room_legacy(&stripped_body);
                }
            }
        }

        // A thread's fallback `m.in_reply_to` points at the latest thread event, not at a
        // message being answered.
        let falling_back =
            rel_type == Some("m.thread") && relates.is_some_and(|r| r.is_falling_back);
        if !falling_back
            && let Some(target) = relates.and_then(|r| r.in_reply_to.as_deref())
            && let Some(replied_to) = history.sender_of(target)
            && let Some(i) = crew.index_of(&replied_to)
        {
            wanted[i] |= WakeReason::Reply.bit();
        }

        if room.joined_count() == 2 {
            let mut joined_agents = wanted.iter().enumerate().filter(|(_, b)| **b & JOINED != 0);
            if let (Some((i, _)), None) = (joined_agents.next(), joined_agents.next()) {
                wanted[i] |= WakeReason::DirectMessage.bit();
            }
        }

        if crew.any_keywords {
            let lower = stripped_body.to_lowercase();
            for (i, prepared) in crew.agents.iter().enumerate() {
                if prepared
                    .keywords
                    .iter()
                    .any(|k| text::contains_word(&lower, k))
                {
                    wanted[i] |= WakeReason::Keyword.bit();
                }
            }
        }

        let mentioned: Vec<OwnedUserId> = crew
            .agents
            .iter()
            .zip(&wanted)
            .filter(|(_, bits)| *bits & WakeReason::Mentioned.bit() != 0)
            .map(|(p, _)| p.agent.user_id.clone())
            .collect();
        decision.remember = Some(Remember {
            event_id: event_id.to_owned(),
            sender: sender.to_owned(),
            mentioned,
        });
    }

    let room_skip = if !room_mention {
        None
    } else if !config.room_mentions {
        Some(SkipReason::RoomMentionOff)
    } else if !room.can_notify_room(sender) {
        Some(SkipReason::RoomMentionNotPermitted)
    } else {
        for bits in wanted.iter_mut() {
            if *bits & JOINED != 0 {
                *bits |= WakeReason::RoomMention.bit();
            }
        }
        None
    };

    let mut over_budget = false;
    for (i, prepared) in crew.agents.iter().enumerate() {
        let agent = &prepared.agent.user_id;
        let joined = wanted[i] & JOINED != 0;
        let already_mentioned = wanted[i] & ALREADY_MENTIONED != 0;
        let bits = wanted[i] & REASON_BITS;
        let reason = if Some(i) == sender_agent {
            Some(SkipReason::OwnEcho)
        } else if bits == 0 {
            if already_mentioned {
                Some(SkipReason::EditAlreadyMentioned)
            } else if !joined {
                continue;
            } else {
                Some(room_skip.unwrap_or(SkipReason::NoMention))
            }
        } else if !joined {
            Some(SkipReason::NotInRoom)
        } else if !crew.may_wake(sender, sender_agent, i) {
            Some(SkipReason::NotAllowed)
        } else if decision.depth > config.max_depth {
            over_budget = true;
            Some(SkipReason::LoopBudget)
        } else {
            None
        };
        match reason {
            Some(reason) => decision.skips.push(Skip {
                agent: agent.clone(),
                reason,
                wanted: WakeReason::from_bits(bits),
            }),
            None => decision.wakes.push(Wake {
                agent: agent.clone(),
                reasons: WakeReason::from_bits(bits),
                depth: decision.depth,
            }),
        }
    }
    if over_budget && !room.loop_notified {
        decision.signals.push(Signal::LoopStopped {
            depth: decision.depth,
            max_depth: config.max_depth,
        });
    }

    let addressed_anyone = wanted.iter().any(|&bits| bits & REASON_BITS != 0) || room_mention;
    if sender_agent.is_none() && !is_edit && !addressed_anyone && crew.is_allowed_person(sender) {
        hint(&mut decision, &stripped_body, room, crew, &wanted);
    }
    decision
}

/// Calls `found` with the index of every agent listed in `m.mentions.user_ids`.
fn for_each_mentioned_agent(mentions: &Mentions, crew: &Roster, mut found: impl FnMut(usize)) {
    for user in &mentions.user_ids {
        if let Some(i) = crew.index_of(user) {
            found(i);
        }
    }
}
/// Adds a [`Signal::MentionHint`] for each agent in the room that the text names by display
/// name or localpart and that has not given the hint in this room yet.
fn hint(decision: &mut Decision, body: &str, room: &RoomState, crew: &Roster, scratch: &[u8]) {
    let mut lower: Option<String> = None;
    for (prepared, bits) in crew.agents.iter().zip(scratch) {
        let agent = &prepared.agent.user_id;
        if bits & JOINED == 0 || room.hinted.contains(agent) {
            continue;
        }
        let lower = lower.get_or_insert_with(|| body.to_lowercase());
        // The room-specific display name, when it differs from the global one.
        let room_name = room
            .member(agent)
            .and_then(|m| m.display_name.as_deref())
            .map(str::trim)
            .filter(|name| {
                !prepared
                    .names
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(name))
            })
            .map(str::to_lowercase);
        let named = prepared
            .names
            .iter()
            .chain(room_name.iter())
            .any(|name| text::contains_word(lower, name));
        if named {
            decision.signals.push(Signal::MentionHint {
                agent: agent.clone(),
            });
        }
    }
}
