//! `!crew` commands: deterministic, answered by the Manager without an LLM, so they work when
//! the provider is down or not configured. Commands that change anything are for admins only;
//! only people allowed to talk to the agents get an answer at all ([`CommandGate`]), at most so
//! many per room and minute; the read-only ones show someone who is not an admin only the
//! Workers in the room they ask in and the tasks of those Workers or asked for by them
//! ([`RoomView`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::agent::registry::{Registry, WorkerState};
use crate::agent::status::WorkerStatus;
use crate::tasks::Task;

/// Who gets an answer to `!crew`, and how often per room.
pub struct CommandGate {
    per_minute: usize,
    rooms: Mutex<HashMap<OwnedRoomId, VecDeque<u64>>>,
}

/// Why a command gets no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The sender may not talk to the agents.
    NotAllowed,
    /// The room had its fill of commands in the last minute.
    RateLimited,
}

impl CommandGate {
    /// At most `per_minute` commands answered per room in any minute (at least one), like
    /// wakes (`dispatch.agent_wakes_per_minute`).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: (per_minute as usize).max(1),
            rooms: Mutex::default(),
        }
    }

    /// Whether to answer a command in `room` from a sender who `may_talk` to the agents; an
    /// answered command counts against the room's minute.
    pub fn admit(&self, room: &RoomId, may_talk: bool, now_ms: u64) -> Result<(), Unanswered> {
        if !may_talk {
            return Err(Unanswered::NotAllowed);
        }
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let times = rooms.entry(room.to_owned()).or_default();
        while times.front().is_some_and(|&at| at + 60_000 <= now_ms) {
            times.pop_front();
        }
        if times.len() >= self.per_minute {
            return Err(Unanswered::RateLimited);
        }
        times.push_back(now_ms);
        Ok(())
    }
}

/// What a read-only command shows: everything to an admin; to anyone else only the Workers
/// joined to the room they ask in, and the tasks of those Workers or that they asked for.
pub struct RoomView {
    /// `None` for an admin (no filter).
    pub workers_here: Option<Vec<OwnedUserId>>,
    pub asker: OwnedUserId,
}

impl RoomView {
    pub fn shows_worker(&self, worker: &UserId) -> bool {
        self.workers_here
            .as_ref()
            .is_none_or(|here| here.iter().any(|id| id == worker))
    }

    pub fn workers(&self, statuses: Vec<WorkerStatus>) -> Vec<WorkerStatus> {
        statuses
            .into_iter()
            .filter(|status| self.shows_worker(&status.user_id))
            .collect()
    }

    /// `user_id_of` maps a Worker's name to its user id.
    pub fn tasks(
        &self,
        tasks: Vec<Task>,
        user_id_of: impl Fn(&str) -> Option<OwnedUserId>,
    ) -> Vec<Task> {
        if self.workers_here.is_none() {
            return tasks;
        }
        tasks
            .into_iter()
            .filter(|task| {
                task.requester == self.asker
                    || user_id_of(&task.assignee).is_some_and(|id| self.shows_worker(&id))
            })
            .collect()
    }
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Workers,
    Tasks,
    Stop(String),
    Start(String),
    Remove(String),
    /// `!crew model <name> <model>`: the Worker's model (`default` goes back to the configured one).
    Model(String, String),
    Cancel(String),
    Why(String),
    /// `!crew projects`: the projects this person may see, one line each.
    Projects,
    /// `!crew project <id>`: one project's tasks and where each is.
    Project(String),
    /// Something after `!crew` that is not a command; the answer says what is.
    Unknown(String),
}

/// The prefix that marks a command.
pub const PREFIX: &str = "!crew";

impl Command {
    /// Parses a message body; `None` when it is not a command at all.
    pub fn parse(body: &str) -> Option<Command> {
        let rest = body.trim().strip_prefix(PREFIX)?;
        if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
            return None; // "!crewmate" is not a command
        }
        let mut words = rest.split_whitespace();
        let verb = words.next().unwrap_or("help").to_lowercase();
        let argument = words.next().map(str::to_owned);
        let second = words.next().map(str::to_owned);
        Some(match (verb.as_str(), argument) {
            ("model", Some(name)) if second.is_some() => {
                Command::Model(name, second.unwrap_or_default())
            }
            ("help", _) => Command::Help,
            ("workers", _) => Command::Workers,
            ("tasks", _) => Command::Tasks,
            ("stop", Some(name)) => Command::Stop(name),
            ("start", Some(name)) => Command::Start(name),
            ("remove", Some(name)) => Command::Remove(name),
            ("cancel", Some(task)) => Command::Cancel(task),
            ("why", Some(event)) => Command::Why(event),
            ("projects", _) => Command::Projects,
            ("project", Some(id)) => Command::Project(id),
            ("project", None) => Command::Projects,
            (other, _) => Command::Unknown(other.to_owned()),
        })
    }

    /// Whether the command changes anything (and so is for admins only).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Command::Stop(_)
                | Command::Start(_)
                | Command::Remove(_)
                | Command::Model(..)
                | Command::Cancel(_)
        )
    }
}

/// The help text.
pub fn help() -> String {
    "Commands (they work even without an LLM):\n\
     - `!crew help`: this list\n\
     - `!crew workers`: every Worker and what it is doing\n\
     - `!crew tasks`: open tasks\n\
     - `!crew stop <name>` / `!crew start <name>`: stop a Worker (its data is kept) or start it again (admins)\n\
     - `!crew remove <name>`: remove a Worker: its token is revoked, it leaves its rooms (admins)\n\
     - `!crew model <name> <model>`: the model a Worker uses (`default` for the configured one; admins)\n\
     - `!crew cancel <task>`: cancel a task (admins)\n\
     - `!crew why <event id>`: why a message did or did not wake an agent\n\
     - `!crew projects` / `!crew project <id>`: projects, and where each task of one is"
        .to_owned()
}

/// `!crew tasks`: one line per open task, with its schedule when it recurs.
pub fn list_tasks(tasks: &[Task]) -> String {
    if tasks.is_empty() {
        return "No open tasks.".to_owned();
    }
    let mut out = String::from("Open tasks:\n");
    for task in tasks {
        out.push_str(&format!(
            "- **{}** {} ({}): {}",
            task.id,
            task.title,
            task.assignee,
            task.state.as_str()
        ));
        if let Some(note) = task.recurrence_note() {
            out.push_str(&format!(", {note}"));
        }
        out.push('\n');
    }
    out
}

/// `!crew model`: sets or clears a Worker's model.
pub fn set_model(registry: &Registry, name: &str, model: &str) -> String {
    let model = (model != "default").then(|| model.to_owned());
    match registry.update(name, |worker| worker.model = model.clone()) {
        Ok(worker) => match &worker.model {
            Some(model) => format!("{} now uses `{model}`.", worker.display_name),
            None => format!("{} now uses the configured model.", worker.display_name),
        },
        Err(error) => format!("{error}. `!crew workers` lists them."),
    }
}

/// `!crew stop` / `!crew start`.
pub fn set_state(registry: &Registry, name: &str, state: WorkerState) -> String {
    if let Ok(Some(worker)) = registry.get(name)
        && worker.state == WorkerState::Removed
    {
        return format!(
            "{} was removed; ask me to create a worker named {} to have it back.",
            worker.display_name, worker.name
        );
    }
    match registry.update(name, |worker| worker.state = state) {
        Ok(worker) if state == WorkerState::Stopped => format!(
            "Stopped {}. Its files and history are kept; it wakes for nothing until `!crew start {}`.",
            worker.display_name, worker.name
        ),
        Ok(worker) => format!(
            "Started {}; it wakes when mentioned again.",
            worker.display_name
        ),
        Err(error) => format!("{error}. `!crew workers` lists them."),
    }
}

/// `!crew projects` and `!crew project <id>`, read from the project records without the LLM.
/// Someone who is not an admin sees the projects they asked for and those of this room (its
/// project room, or where it was asked for), like the other read-only commands.
pub fn projects_answer(
    projects: &crate::projects::Projects,
    view: &RoomView,
    room: &RoomId,
    id: Option<&str>,
) -> String {
    let visible = |project: &crate::projects::Project| {
        view.workers_here.is_none()
            || project.requester == view.asker
            || project.room.as_deref() == Some(room)
            || project.asked_in.as_deref() == Some(room)
    };
    match id {
        None => match projects.list() {
            Ok(list) => {
                let shown: Vec<_> = list.into_iter().filter(|p| visible(p)).collect();
                crate::projects::project_list_text(&shown)
            }
            Err(error) => format!("I cannot read the projects: {error}"),
        },
        Some(id) => match projects.get(id) {
            Ok(project) if visible(&project) => crate::projects::project_status_text(&project),
            Ok(_) => format!(
                "Project {} is not one you asked for or one of this room.",
                crate::projects::normalize_id(id)
            ),
            Err(error) => error.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_answers_allowed_people_a_few_times_a_minute_per_room() {
        let gate = CommandGate::new(2);
        let room = RoomId::parse("!a:x").unwrap();
        let other = RoomId::parse("!b:x").unwrap();
        assert_eq!(gate.admit(&room, false, 0), Err(Unanswered::NotAllowed));
        assert_eq!(gate.admit(&room, true, 0), Ok(()));
        assert_eq!(gate.admit(&room, true, 1_000), Ok(()));
        assert_eq!(gate.admit(&room, true, 2_000), Err(Unanswered::RateLimited));
        assert_eq!(gate.admit(&other, true, 2_000), Ok(()));
        assert_eq!(gate.admit(&room, true, 60_000), Ok(()));
    }

    #[test]
    fn commands_parse_and_near_misses_do_not() {
        assert_eq!(Command::parse("!crew"), Some(Command::Help));
        assert_eq!(Command::parse("  !crew workers "), Some(Command::Workers));
        assert_eq!(
            Command::parse("!crew stop Alice"),
            Some(Command::Stop("Alice".into()))
        );
        assert_eq!(
            Command::parse("!crew why $ev"),
            Some(Command::Why("$ev".into()))
        );
        assert_eq!(
            Command::parse("!crew stop"),
            Some(Command::Unknown("stop".into()))
        );
        assert_eq!(Command::parse("!crewmate hi"), None);
        assert_eq!(Command::parse("hello !crew"), None);
        assert!(Command::Stop("a".into()).changes_state());
        assert!(Command::Remove("a".into()).changes_state());
        assert_eq!(
            Command::parse("!crew model alice gpt-4o"),
            Some(Command::Model("alice".into(), "gpt-4o".into()))
        );
        assert_eq!(
            Command::parse("!crew model alice"),
            Some(Command::Unknown("model".into()))
        );
        assert!(!Command::Workers.changes_state());
    }

    #[test]
    fn project_commands_show_a_person_their_projects_and_this_rooms_only() {
        use crate::projects::{Owner, ProjectDraft, Projects, TaskDraft};
        assert_eq!(Command::parse("!crew projects"), Some(Command::Projects));
        assert_eq!(
            Command::parse("!crew project P-2"),
            Some(Command::Project("P-2".into()))
        );
        assert!(!Command::Projects.changes_state());
        let store = crate::store::Store::temporary().unwrap();
        let projects = Projects::open(&store).unwrap();
        let draft = |title: &str| ProjectDraft {
            title: title.to_owned(),
            tasks: vec![TaskDraft {
                key: "a".into(),
                title: "Part a".into(),
                owner: Owner::Worker { name: "ada".into() },
                depends_on: Vec::new(),
                acceptance: String::new(),
            }],
        };
        let here = RoomId::parse("!here:x").unwrap();
        let alice = UserId::parse("@alice:x").unwrap();
        let bob = UserId::parse("@bob:x").unwrap();
        projects
            .propose(draft("Alice's"), alice.clone(), None, 0)
            .unwrap();
        projects
            .propose(draft("Here"), bob.clone(), Some(here.clone()), 0)
            .unwrap();
        projects.propose(draft("Elsewhere"), bob, None, 0).unwrap();
        let view = RoomView {
            workers_here: Some(Vec::new()),
            asker: alice,
        };
        let list = projects_answer(&projects, &view, &here, None);
        assert!(list.contains("p-1") && list.contains("p-2"), "{list}");
        assert!(!list.contains("Elsewhere"), "{list}");
        let one = projects_answer(&projects, &view, &here, Some("2"));
        assert!(one.starts_with("p-2 (proposed): Here"), "{one}");
        assert!(one.contains("- a [pending] ada: Part a"), "{one}");
        let hidden = projects_answer(&projects, &view, &here, Some("p-3"));
        assert!(hidden.contains("is not one you asked for"), "{hidden}");
        let admin = RoomView {
            workers_here: None,
            asker: UserId::parse("@admin:x").unwrap(),
        };
        assert!(projects_answer(&projects, &admin, &here, None).contains("Elsewhere"));
    }
}
