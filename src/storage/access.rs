//! The folder layout and who may touch what.
//!
//! `tasks/<task-id>/` holds a task's spec, plan, progress notes, result and any other files;
//! `agents/<name>/` an agent's memory and installed skills; `shared/` team knowledge. The access
//! check is a pure function of the agent (its name, its role, the ids of the tasks assigned to
//! it) and the path, so the agents module plugs its task records in and tests need no storage.
//! Not an authentication layer: callers decide who the agent is.

use super::{StorageError, StoragePath, StoragePrefix};

/// Top folder for task folders.
pub const TASKS: &str = "tasks";
/// Top folder for per-agent folders.
pub const AGENTS: &str = "agents";
/// Top folder for team knowledge every agent may read and write.
pub const SHARED: &str = "shared";

/// Names no Worker may have: `manager` is the Manager's own folder (`agents/manager/`, the
/// files people send it and its long answers), the others are our words for places and people.
pub const RESERVED_AGENT_NAMES: &[&str] = &[
    "manager", "admin", "admins", "crew", "shared", "tasks", "agents", "everyone", "room", "system",
];

/// The well-known files of a task folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFile {
    /// What to do, written by the Manager; read-only for Workers.
    Spec,
    /// How the Worker means to do it.
    Plan,
    /// Running notes while working.
    Progress,
    /// What came out.
    Result,
}

impl TaskFile {
    /// The file name inside the task folder.
    pub fn file_name(self) -> &'static str {
        match self {
            TaskFile::Spec => "spec.md",
            TaskFile::Plan => "plan.md",
            TaskFile::Progress => "progress.md",
            TaskFile::Result => "result.md",
        }
    }
}

/// `tasks/<task_id>/`, as a listing prefix.
pub fn task_folder(task_id: &str) -> Result<StoragePrefix, StorageError> {
    single_segment("task id", task_id)?;
    StoragePrefix::parse(&format!("{TASKS}/{task_id}/"))
}

/// `tasks/<task_id>/<file>` for a well-known task file.
pub fn task_file(task_id: &str, file: TaskFile) -> Result<StoragePath, StorageError> {
    task_path(task_id, file.file_name())
}

/// `tasks/<task_id>/<relative>`, for any file in a task folder.
pub fn task_path(task_id: &str, relative: &str) -> Result<StoragePath, StorageError> {
    single_segment("task id", task_id)?;
    StoragePath::parse(&format!("{TASKS}/{task_id}/{relative}"))
}

/// `agents/<name>/`, as a listing prefix.
pub fn agent_folder(name: &str) -> Result<StoragePrefix, StorageError> {
    single_segment("agent name", name)?;
    StoragePrefix::parse(&format!("{AGENTS}/{name}/"))
}

/// `agents/<name>/<relative>`.
pub fn agent_path(name: &str, relative: &str) -> Result<StoragePath, StorageError> {
    single_segment("agent name", name)?;
    StoragePath::parse(&format!("{AGENTS}/{name}/{relative}"))
}

/// `shared/`, as a listing prefix.
pub fn shared_folder() -> StoragePrefix {
    StoragePrefix::parse(&format!("{SHARED}/")).expect("a literal valid prefix")
}

/// `shared/<relative>`.
pub fn shared_path(relative: &str) -> Result<StoragePath, StorageError> {
    StoragePath::parse(&format!("{SHARED}/{relative}"))
}

fn single_segment(what: &str, value: &str) -> Result<(), StorageError> {
    let path = StoragePath::parse(value)?;
    if path.as_str().contains('/') {
        return Err(StorageError::InvalidPath {
            path: value.to_owned(),
            reason: format!("a {what} cannot contain `/`"),
        });
    }
    Ok(())
}

/// What an agent is, as far as files are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees and changes everything.
    Manager,
    /// Confined to its own folder, its tasks and `shared/`.
    Worker,
}

/// The agent asking, with the tasks assigned to it (from the task records).
#[derive(Debug, Clone, Copy)]
pub struct AgentScope<'a> {
    pub name: &'a str,
    pub role: Role,
    /// Ids of the tasks assigned to this agent.
    pub task_ids: &'a [String],
}

/// What an agent may do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Neither read nor write (nor see it in listings).
    None,
    /// Read only.
    Read,
    /// Read and write (including delete).
    ReadWrite,
}

impl Access {
    pub fn can_read(self) -> bool {
        self >= Access::Read
    }

    pub fn can_write(self) -> bool {
        self == Access::ReadWrite
    }
}

/// The access rules:
/// - the Manager may read and write everything;
/// - a Worker may read and write `agents/<its name>/…`, `shared/…` and `tasks/<id>/…` for the
///   tasks assigned to it, except `tasks/<id>/spec.md`, which it may only read (the Manager
///   owns the spec);
/// - nothing else.
pub fn access(agent: AgentScope<'_>, path: &StoragePath) -> Access {
    if agent.role == Role::Manager {
        return Access::ReadWrite;
    }
    let mut segments = path.segments();
    match (segments.next(), segments.next(), segments.next()) {
        (Some(SHARED), Some(_), _) => Access::ReadWrite,
        (Some(AGENTS), Some(name), Some(_))
            if name == agent.name && !RESERVED_AGENT_NAMES.contains(&name) =>
        {
            Access::ReadWrite
        }
        (Some(TASKS), Some(task), Some(file)) if agent.task_ids.iter().any(|id| id == task) => {
            if file == TaskFile::Spec.file_name() && segments.next().is_none() {
                Access::Read
            } else {
                Access::ReadWrite
            }
        }
        _ => Access::None,
    }
}

/// Keeps the listed files `agent` may read, so listings never reveal other agents' files.
pub fn readable(agent: AgentScope<'_>, listed: Vec<super::ObjectMeta>) -> Vec<super::ObjectMeta> {
    listed
        .into_iter()
        .filter(|meta| {
            StoragePath::parse(&meta.path).is_ok_and(|path| access(agent, &path).can_read())
        })
        .collect()
}

/// Which operation is being checked, for [`check`] and its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
}

/// [`access`] as a `Result`, with an error that tells the agent where it may write instead.
pub fn check(
    agent: AgentScope<'_>,
    path: &StoragePath,
    operation: Operation,
) -> Result<(), StorageError> {
    let granted = access(agent, path);
    let allowed = match operation {
        Operation::Read => granted.can_read(),
        Operation::Write => granted.can_write(),
    };
    if allowed {
        return Ok(());
    }
    let reason = if granted == Access::Read {
        "a task's spec.md is written by the Manager; put your notes in plan.md or progress.md"
    } else {
        "Workers may use only agents/<own name>/, shared/ and the folders of tasks assigned to them"
    };
    Err(StorageError::Forbidden {
        agent: agent.name.to_owned(),
        action: match operation {
            Operation::Read => "read",
            Operation::Write => "write",
        },
        path: path.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_helpers_build_paths_and_reject_bad_ids() {
        assert_eq!(
            task_file("42", TaskFile::Plan).expect("valid").as_str(),
            "tasks/42/plan.md"
        );
        assert_eq!(agent_folder("ann").expect("valid").as_str(), "agents/ann/");
        assert_eq!(shared_folder().as_str(), "shared/");
        assert!(task_folder("../x").is_err());
        assert!(task_folder("a/b").is_err());
        assert!(agent_path("ann", "../../etc").is_err());
    }
}
