//! The one owner of the dispatcher's state: the roster in force, the room model, the rooms'
//! conversation logs ("said since"), the decisions kept for `!crew why`, and the event history
//! (who sent what, for replies and edits), in memory and in their sled trees.
//!
//! The pump feeds it events ([`DispatchService::dispatch`]); the turns, the outbox runner and
//! the admin routes read through it (names, members, the conversation, kept decisions) and
//! never reach into the pump. A std mutex guards the in-memory state: every method is
//! synchronous, and nothing awaits under the lock.
//!
//! Not for: what a decision causes (wakes, homeserver effects): that is the pump's.

use std::sync::{Mutex, MutexGuard};

use ruma::{EventId, OwnedUserId, RoomId, UserId};

use super::context_store::SledContext;
use super::event::RoomEvent;
use super::{
    Decision, DispatchConfig, DispatchError, Dispatcher, Kept, Membership, Missed, RoomState,
    Roster, Said, SledHistory,
};
use crate::store::{Store, StoreError, Tree};

/// Tells the service which users are crew's own (the Manager and every Worker, active or not):
/// a room none of them is in any more is forgotten.
pub type IsOurs = Box<dyn Fn(&UserId) -> bool + Send + Sync>;

/// The dispatcher and the roster generation it was built from.
struct State {
    dispatcher: Dispatcher,
    roster_generation: u64,
}

/// See the module documentation.
pub struct DispatchService {
    state: Mutex<State>,
    history: SledHistory,
    /// Room state as the dispatcher sees it, persisted per room.
    room_states: Tree<String, RoomState>,
    /// The dispatcher's "said since" log per room (the turns' recent conversation), saved a
    /// message at a time.
    room_context: SledContext,
    is_ours: IsOurs,
}

impl DispatchService {
    /// Builds the dispatcher from `config` and `roster` (made from registry generation
    /// `roster_generation`) and restores the rooms and conversations kept in `store`.
    pub fn open(
        store: &Store,
        config: DispatchConfig,
        roster: Roster,
        roster_generation: u64,
        is_ours: IsOurs,
    ) -> Result<Self, DispatchServiceError> {
        let mut dispatcher = Dispatcher::new(config, roster)?;
        let room_states: Tree<String, RoomState> = store.tree("room_states")?;
        for entry in room_states.iter() {
            let (room, state) = entry?;
            if let Ok(room) = RoomId::parse(&room) {
                *dispatcher.rooms.entry(&room) = state;
            }
        }
        let room_context = SledContext::open(store)?;
        for (room, log) in room_context.load(dispatcher.context.per_room())? {
            dispatcher.context.restore_room(&room, log);
        }
        Ok(Self {
            state: Mutex::new(State {
                dispatcher,
                roster_generation,
            }),
            history: SledHistory::open(store)?,
            room_states,
            room_context,
            is_ours,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides for one event: reloads the roster first when the registry moved past the
    /// generation it was built from (`roster` builds it; on failure the old one stays), then
    /// dispatches, remembers the event for later replies and edits, and saves what changed of
    /// the room (its model only when it changed, its conversation on a message), or forgets
    /// the room when none of our agents is in it any more.
    pub fn dispatch(
        &self,
        event: &RoomEvent,
        now_ms: u64,
        generation: u64,
        roster: impl FnOnce() -> Result<Roster, String>,
    ) -> Decision {
        let mut state = self.lock();
        if generation != state.roster_generation {
            match roster() {
                Ok(roster) => {
                    state.dispatcher.set_roster(roster);
                    state.roster_generation = generation;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot reload the roster; keeping the old one")
                }
            }
        }
        let room = &event.room_id;
        let next_seq_before = state.dispatcher.context.next_seq(room);
        let decision = state.dispatcher.dispatch(event, &self.history, now_ms);
        if let Some(Err(error)) = decision
            .remember
            .as_ref()
            .map(|fact| self.history.remember(fact, decision.sender_is_agent))
        {
            tracing::error!(%error, "cannot remember the event's sender");
        }
        if let Some(room_state) = state.dispatcher.rooms.get(room) {
            if room_state.joined_or_invited(|user| (self.is_ours)(user)) {
                // The member map is saved when it changes, not re-serialised for every message.
                if decision.room_changed {
                    self.persist_room(room, room_state);
                }
                if state.dispatcher.context.next_seq(room) != next_seq_before {
                    self.persist_kept_message(room, &state.dispatcher);
                }
            } else if event.kind == ruma::events::TimelineEventType::RoomMember {
                // None of our agents is in the room any more: its model and conversation go.
                self.forget_room(room, &mut state.dispatcher);
            }
        }
        decision
    }

    /// Decides as if `agent` had joined `room` (the join is staged in the outbox; the next
    /// event may already be for it).
    pub fn expect_joined(&self, room: &RoomId, agent: &UserId) {
        let mut state = self.lock();
        let room_state = state.dispatcher.rooms.entry(room);
        if !room_state.is_joined(agent) {
            room_state.set_member(agent.to_owned(), Membership::Join, None);
            let snapshot = room_state.clone();
            drop(state);
            self.persist_room(room, &snapshot);
        }
    }

    /// Applies a room's whole state (fetched after an agent joined: nothing from before the
    /// join reached crew) and saves it.
    pub fn seed_room(&self, room: &RoomId, events: &[RoomEvent]) {
        let mut state = self.lock();
        let room_state = state.dispatcher.rooms.entry(room);
        for event in events {
            room_state.apply_event(event);
        }
        let snapshot = room_state.clone();
        drop(state);
        self.persist_room(room, &snapshot);
    }

    /// An agent's or person's name in a room, falling back to the localpart.
    pub fn display_name(&self, room: &RoomId, user: &UserId) -> String {
        self.lock()
            .dispatcher
            .rooms
            .get(room)
            .and_then(|room| room.member(user))
            .and_then(|member| member.display_name.clone())
            .unwrap_or_else(|| user.localpart().to_owned())
    }

    /// Whether `user` is joined to `room`, as the room model knows it.
    pub fn is_joined(&self, room: &RoomId, user: &UserId) -> bool {
        self.lock()
            .dispatcher
            .rooms
            .get(room)
            .is_some_and(|room| room.is_joined(user))
    }

    /// The members joined to `room` that `keep` accepts.
    pub fn joined_members_where(
        &self,
        room: &RoomId,
        keep: impl Fn(&UserId) -> bool,
    ) -> Vec<OwnedUserId> {
        self.lock()
            .dispatcher
            .rooms
            .get(room)
            .map(|room| {
                room.joined_members()
                    .filter(|member| keep(member))
                    .map(|member| member.to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The decision kept for `event` (for `!crew why` and the admin API), if any.
    pub fn kept(&self, event: &EventId) -> Option<Kept> {
        self.lock().dispatcher.reasons.get(event).cloned()
    }

    /// Keeps a decision crew made itself (an internal wake) for `!crew why`.
    pub fn keep_decision(&self, decision: &Decision, now_ms: u64) {
        self.lock().dispatcher.reasons.insert(decision, now_ms);
    }

    /// What was said in `room` since `agent`'s last turn, and the room's recent messages
    /// (`window` says how many, from what was missed); moves the agent's "said since" cursor
    /// to now and saves it.
    pub fn take_said_since(
        &self,
        agent: &UserId,
        room: &RoomId,
        window: impl FnOnce(&Missed) -> usize,
    ) -> (Missed, Vec<Said>) {
        let mut state = self.lock();
        let missed = state.dispatcher.context.take(agent, room);
        let recent = state.dispatcher.context.recent(room, window(&missed));
        if let Some(log) = state.dispatcher.context.room_log(room)
            && let Err(error) = self.room_context.save_cursors(room, log)
        {
            tracing::error!(%error, %room, "cannot store the room's conversation cursors");
        }
        (missed, recent)
    }

    /// Everything still kept of `room`'s conversation.
    pub fn kept_log(&self, room: &RoomId) -> Vec<Said> {
        self.lock().dispatcher.context.recent(room, usize::MAX)
    }

    /// Forgets event history older than `before_ms`; returns how many events.
    pub fn prune_history(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.history.prune(before_ms)
    }

    fn persist_room(&self, room: &RoomId, state: &RoomState) {
        if let Err(error) = self.room_states.insert(&room.to_string(), state) {
            tracing::error!(%error, %room, "cannot store room state");
        }
    }

    /// Saves the message the dispatcher just kept in `room` (and drops the one it pushed out),
    /// not the whole log.
    fn persist_kept_message(&self, room: &RoomId, dispatcher: &Dispatcher) {
        if let Some(log) = dispatcher.context.room_log(room)
            && let Err(error) = self.room_context.append(room, log)
        {
            tracing::error!(%error, %room, "cannot store the room's conversation log");
        }
    }

    /// Forgets a room none of our agents is in any more: its model, its conversation log, in
    /// memory and in sled (it is fetched again if an agent is invited back).
    fn forget_room(&self, room: &RoomId, dispatcher: &mut Dispatcher) {
        dispatcher.rooms.remove(room);
        dispatcher.context.remove_room(room);
        let key = room.to_string();
        if let Err(error) = self
            .room_states
            .remove(&key)
            .and_then(|_| self.room_context.forget(room))
        {
            tracing::error!(%error, %room, "cannot forget a room crew left");
        }
    }
}

/// Why the dispatch service could not open.
#[derive(Debug, thiserror::Error)]
pub enum DispatchServiceError {
    #[error(transparent)]
    Config(#[from] DispatchError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ruma::{OwnedEventId, OwnedRoomId, user_id};

    use super::*;
    use crate::dispatch::{Agent, Role, SaidSince};

    const MANAGER: &str = "@crew:example.org";
    const ROOM: &str = "!busy:example.org";

    fn open(store: &Store, context_messages: usize) -> DispatchService {
        let config = DispatchConfig {
            context_messages,
            ..DispatchConfig::default()
        };
        let manager = Agent {
            user_id: OwnedUserId::try_from(MANAGER).unwrap(),
            role: Role::Manager,
            display_name: "Crew".to_owned(),
            keywords: Vec::new(),
        };
        let roster = Roster::new(vec![manager], [], [], &config).unwrap();
        DispatchService::open(
            store,
            config,
            roster,
            0,
            Box::new(|user| user.as_str() == MANAGER),
        )
        .unwrap()
    }

    fn event(json: serde_json::Value) -> RoomEvent {
        RoomEvent::from_json(&json).unwrap()
    }

    fn join(user: &str) -> RoomEvent {
        event(serde_json::json!({
            "type": "m.room.member", "state_key": user, "sender": user, "room_id": ROOM,
            "event_id": format!("$join-{user}"), "origin_server_ts": 1,
            "content": {"membership": "join"},
        }))
    }

    fn leave(user: &str) -> RoomEvent {
        event(serde_json::json!({
            "type": "m.room.member", "state_key": user, "sender": user, "room_id": ROOM,
            "event_id": format!("$leave-{user}"), "origin_server_ts": 1,
            "content": {"membership": "leave"},
        }))
    }

    fn message(n: usize) -> RoomEvent {
        event(serde_json::json!({
            "type": "m.room.message", "sender": format!("@human{}:example.org", n % 2),
            "room_id": ROOM, "event_id": format!("$message-{n}"), "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": format!("message {n}"), "m.mentions": {}},
        }))
    }

    /// The Manager and two people join; then `count` messages that mention nobody.
    fn busy_room(service: &DispatchService, messages: std::ops::Range<usize>) {
        for user in [MANAGER, "@human0:example.org", "@human1:example.org"] {
            service.dispatch(&join(user), 1, 0, || unreachable!("same generation"));
        }
        for n in messages {
            service.dispatch(&message(n), 1, 0, || unreachable!("same generation"));
        }
    }

    fn bodies(service: &DispatchService) -> Vec<String> {
        service
            .kept_log(&room())
            .into_iter()
            .map(|said| said.body)
            .collect()
    }

    fn room() -> OwnedRoomId {
        OwnedRoomId::try_from(ROOM).unwrap()
    }

    fn messages_on_disk(store: &Store) -> usize {
        store.db().open_tree("room_said").unwrap().len()
    }

    fn reopen(dir: &Path) -> Store {
        Store::open(dir).unwrap()
    }

    #[test]
    fn conversation_and_cursors_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let manager = user_id!("@crew:example.org");
        {
            let store = reopen(dir.path());
            let service = open(&store, 50);
            busy_room(&service, 0..5);
            let (missed, _) = service.take_said_since(manager, &room(), |_| 0);
            assert_eq!(missed.messages.len(), 5);
            service.dispatch(&message(5), 1, 0, || unreachable!());
        }
        let store = reopen(dir.path());
        let service = open(&store, 50);
        assert_eq!(
            bodies(&service),
            (0..6).map(|n| format!("message {n}")).collect::<Vec<_>>()
        );
        // The cursor moved before message 5, and only that one is new to the Manager.
        let (missed, _) = service.take_said_since(manager, &room(), |_| 0);
        let missed: Vec<_> = missed.messages.into_iter().map(|said| said.body).collect();
        assert_eq!(missed, ["message 5"]);
        // Seqs go on from where they were: the next message is the seventh.
        service.dispatch(&message(6), 1, 0, || unreachable!());
        assert_eq!(service.kept_log(&room()).last().unwrap().seq, 6);
    }

    #[test]
    fn the_bound_holds_on_disk_and_a_smaller_bound_trims_at_opening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            let service = open(&store, 5);
            busy_room(&service, 0..40);
            assert_eq!(messages_on_disk(&store), 5);
            assert_eq!(
                bodies(&service),
                (35..40).map(|n| format!("message {n}")).collect::<Vec<_>>()
            );
        }
        let store = reopen(dir.path());
        let service = open(&store, 2);
        assert_eq!(bodies(&service), ["message 38", "message 39"]);
        assert_eq!(messages_on_disk(&store), 2);
    }

    #[test]
    fn whole_logs_of_older_crews_are_migrated_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let manager = user_id!("@crew:example.org");
        {
            let store = reopen(dir.path());
            // What crew wrote before: the room's whole log under its id.
            let mut context = SaidSince::new(50);
            for n in 0..4 {
                context.push(
                    &room(),
                    OwnedEventId::try_from(format!("$old-{n}")).unwrap(),
                    OwnedUserId::try_from("@human0:example.org").unwrap(),
                    format!("old {n}"),
                    None,
                );
            }
            context.take(manager, &room());
            context.push(
                &room(),
                OwnedEventId::try_from("$old-4").unwrap(),
                OwnedUserId::try_from("@human1:example.org").unwrap(),
                "old 4".to_owned(),
                None,
            );
            let legacy: Tree<String, crate::dispatch::RoomLog> =
                store.tree("room_context").unwrap();
            legacy
                .insert(&ROOM.to_owned(), context.room_log(&room()).unwrap())
                .unwrap();
        }
        let store = reopen(dir.path());
        let service = open(&store, 50);
        assert_eq!(
            bodies(&service),
            (0..5).map(|n| format!("old {n}")).collect::<Vec<_>>()
        );
        assert_eq!(messages_on_disk(&store), 5);
        assert!(
            !store
                .db()
                .tree_names()
                .iter()
                .any(|name| name.as_ref() == b"room_context"),
            "the old tree is dropped once migrated"
        );
        let (missed, _) = service.take_said_since(manager, &room(), |_| 0);
        let missed: Vec<_> = missed.messages.into_iter().map(|said| said.body).collect();
        assert_eq!(missed, ["old 4"], "the cursor came along");
        drop(service);
        drop(store);
        // And it stays migrated: the next opening reads the new form only.
        let store = reopen(dir.path());
        let service = open(&store, 50);
        assert_eq!(bodies(&service).len(), 5);
    }

    #[test]
    fn a_room_crew_left_is_removed_from_disk() {
        let store = Store::temporary().unwrap();
        let service = open(&store, 50);
        busy_room(&service, 0..3);
        assert_eq!(messages_on_disk(&store), 3);
        service.dispatch(&leave(MANAGER), 1, 0, || unreachable!());
        assert_eq!(messages_on_disk(&store), 0);
        assert!(service.kept_log(&room()).is_empty());
    }
}
