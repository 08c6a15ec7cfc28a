//! An agent's files as its tools see them: reading, writing and listing under the access rules
//! of [`crate::storage::access`], its long-term memory (`agents/<name>/memory.md`), its skills
//! (`agents/<name>/skills/<skill>/SKILL.md`) and the files people send it.
//!
//! Every path an agent names is checked here, in code, before storage is touched: a Worker's
//! prompt cannot talk it into another Worker's folder. Reads are bounded so a file never floods
//! a context; chat and prompts carry paths, the bodies stay in storage.

use futures::StreamExt;
use ruma::UserId;
use serde_json::Value;

use crate::agent::authority::{MANAGER_FOLDER, sender_folder};
use crate::dispatch::RoomEvent;
use crate::llm::Tool;
use crate::matrix::MatrixClient;
use crate::storage::access::{self, AgentScope, Operation, Role};
use crate::storage::{Storage, StorageError, StoragePath, StoragePrefix};

/// The most of a file one `read_file` returns (the rest is announced, not pasted).
pub const READ_LIMIT_BYTES: usize = 16 * 1024;
/// The most one `write_file` may write.
const WRITE_LIMIT_BYTES: usize = 1024 * 1024;
/// How much of the memory file goes into each prompt (its most recent part).
const MEMORY_IN_PROMPT_BYTES: usize = 2 * 1024;
/// Skills listed in the prompt at most (names and one line each).
const SKILLS_IN_INDEX: usize = 30;
/// Entries one `list_files` returns at most.
const LIST_LIMIT: usize = 200;
/// Answers longer than this are kept as a file and referenced: a Matrix event holds 64 KiB at
/// most (the HTML copy doubles the text), and chat carries references, not bodies.
pub const LONG_ANSWER_CHARS: usize = 12_000;
/// How much of a long answer is shown in the room.
pub const ANSWER_PREVIEW_CHARS: usize = 1_500;

/// A further check on every path a workspace's tools touch: the Manager's tools act on behalf
/// of whoever asked ([`crate::agent::authority::TurnAuthority`]), not with the Manager's reach.
pub trait PathGuard: Send + Sync {
    /// May the tools do `operation` on `path`? A refusal is the tool's answer.
    fn check(&self, path: &StoragePath, operation: Operation) -> Result<(), StorageError>;
    /// Whether a listing may show `path` (quietly: leaving a file out is not a refusal).
    fn may_list(&self, path: &StoragePath) -> bool;
}

/// One agent's view of storage.
pub struct Workspace {
    storage: Storage,
    /// The folder name: the Worker's name (`agents/<name>/`).
    name: String,
    role: Role,
    /// Tasks assigned to the agent, which open their folders to it.
    task_ids: Vec<String>,
    /// Who the tools act for, when not for the agent itself.
    on_behalf: Option<std::sync::Arc<dyn PathGuard>>,
}

impl Workspace {
    pub fn new(storage: Storage, name: &str, role: Role, task_ids: Vec<String>) -> Self {
        Self {
            storage,
            name: name.to_owned(),
            role,
            task_ids,
            on_behalf: None,
        }
    }

    /// The same workspace, every path also checked by `guard` (the requester's rights).
    pub fn on_behalf_of(mut self, guard: std::sync::Arc<dyn PathGuard>) -> Self {
        self.on_behalf = Some(guard);
        self
    }

    /// The access rules, then the requester's rights.
    fn permit(&self, path: &StoragePath, operation: Operation) -> Result<(), StorageError> {
        access::check(self.scope(), path, operation)?;
        match &self.on_behalf {
            Some(guard) => guard.check(path, operation),
            None => Ok(()),
        }
    }

    fn scope(&self) -> AgentScope<'_> {
        AgentScope {
            name: &self.name,
            role: self.role,
            task_ids: &self.task_ids,
        }
    }

    /// The file tools' definitions.
    pub fn tools(&self) -> Vec<Tool> {
        let path = serde_json::json!({"type": "string", "description": "a path such as shared/notes.md, tasks/t-1/plan.md or agents/<your name>/draft.md"});
        let mut tools = vec![
            Tool::function(
                "list_files",
                "List the files you may read under a folder (e.g. `shared/`, `tasks/t-1/`).",
                serde_json::json!({
                    "type": "object",
                    "properties": {"prefix": {"type": "string", "description": "folder prefix; empty for everything you may see"}}
                }),
            ),
            Tool::function(
                "read_file",
                "Read a text file (at most 16 KiB are returned).",
                serde_json::json!({"type": "object", "properties": {"path": path}, "required": ["path"]}),
            ),
            Tool::function(
                "write_file",
                "Write a text file (replaces it). Task specs are read-only for Workers.",
                serde_json::json!({
                    "type": "object",
                    "properties": {"path": path, "content": {"type": "string"}},
                    "required": ["path", "content"]
                }),
            ),
        ];
        if self.role == Role::Worker {
            tools.push(Tool::function(
                "remember",
                "Save a note to your long-term memory (it is shown to you in every turn).",
                serde_json::json!({"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}),
            ));
            tools.push(Tool::function(
                "read_skill",
                "Load the instructions of one of your skills by name.",
                serde_json::json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
            ));
        }
        tools
    }

    /// Runs a file tool; `None` when `name` is not one of them.
    pub async fn call(&self, name: &str, arguments: &Value) -> Option<String> {
        let text = |key: &str| arguments.get(key).and_then(Value::as_str).unwrap_or("");
        let outcome = match name {
            "list_files" => self.list(text("prefix")).await,
            "read_file" => self.read(text("path")).await,
            "write_file" => self.write(text("path"), text("content")).await,
            "remember" if self.role == Role::Worker => self.remember(text("note")).await,
            "read_skill" if self.role == Role::Worker => self.read_skill(text("name")).await,
            _ => return None,
        };
        Some(outcome.unwrap_or_else(|error| format!("error: {error}")))
    }

    /// `path` as a storage path this agent may read, or why not.
    pub fn readable_path(&self, path: &str) -> Result<StoragePath, StorageError> {
        let path = StoragePath::parse(path.trim_start_matches('/'))?;
        self.permit(&path, Operation::Read)?;
        Ok(path)
    }

    async fn list(&self, prefix: &str) -> Result<String, StorageError> {
        let prefix = StoragePrefix::parse(prefix.trim_start_matches('/'))?;
        let mut listed = access::readable(self.scope(), self.storage.list(&prefix).await?);
        if let Some(guard) = &self.on_behalf {
            listed.retain(|meta| {
                StoragePath::parse(&meta.path).is_ok_and(|path| guard.may_list(&path))
            });
        }
        if listed.is_empty() {
            return Ok(format!("no files you may read under `{}`", prefix.as_str()));
        }
        let mut out = String::new();
        for meta in listed.iter().take(LIST_LIMIT) {
            out.push_str(&format!("{} ({} bytes)\n", meta.path, meta.size));
        }
        if listed.len() > LIST_LIMIT {
            out.push_str(&format!(
                "… and {} more; list a narrower prefix\n",
                listed.len() - LIST_LIMIT
            ));
        }
        Ok(out)
    }

    async fn read(&self, path: &str) -> Result<String, StorageError> {
        let path = self.readable_path(path)?;
        // Only the start is read, however large the file: the rest is announced, not loaded.
        let mut object = self.storage.get(&path).await?;
        let mut start = Vec::with_capacity(READ_LIMIT_BYTES + 4);
        while start.len() <= READ_LIMIT_BYTES {
            match object.body.next().await {
                Some(Ok(chunk)) => start.extend_from_slice(&chunk),
                Some(Err(source)) => {
                    return Err(StorageError::Io {
                        action: "reading",
                        path: path.to_string(),
                        source,
                    });
                }
                None => break,
            }
        }
        Ok(bounded_text(&start, object.meta.size))
    }

    async fn write(&self, path: &str, content: &str) -> Result<String, StorageError> {
        let path = StoragePath::parse(path.trim_start_matches('/'))?;
        self.permit(&path, Operation::Write)?;
        if content.len() > WRITE_LIMIT_BYTES {
            return Err(StorageError::TooLarge {
                path: path.to_string(),
                limit: WRITE_LIMIT_BYTES as u64,
            });
        }
        let size = content.len();
        self.storage
            .put_bytes(&path, content.as_bytes().to_vec())
            .await?;
        Ok(format!("wrote {path} ({size} bytes)"))
    }

    fn memory_path(&self) -> Result<StoragePath, StorageError> {
        access::agent_path(&self.name, "memory.md")
    }

    async fn remember(&self, note: &str) -> Result<String, StorageError> {
        let note = note.trim();
        if note.is_empty() {
            return Ok("error: the note is empty".to_owned());
        }
        let path = self.memory_path()?;
        let mut memory = match self
            .storage
            .get_bytes(&path, WRITE_LIMIT_BYTES as u64)
            .await
        {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(StorageError::NotFound { .. }) => String::from("# Memory\n\n"),
            Err(error) => return Err(error),
        };
        memory.push_str(&format!(
            "- {} {}\n",
            crate::clock::format_utc(crate::clock::now_ms() / 1000),
            note.replace('\n', " ")
        ));
        self.storage.put_bytes(&path, memory.into_bytes()).await?;
        Ok(format!("saved to {path}"))
    }

    /// The most recent part of the agent's memory, for the prompt; empty when it has none.
    pub async fn memory_summary(&self) -> String {
        let Ok(path) = self.memory_path() else {
            return String::new();
        };
        match self
            .storage
            .get_bytes(&path, WRITE_LIMIT_BYTES as u64)
            .await
        {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let start = text.len().saturating_sub(MEMORY_IN_PROMPT_BYTES);
                let start = (start..text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                text[start..].trim().to_owned()
            }
            Err(_) => String::new(),
        }
    }

    /// The agent's skills: the front matter (`name`, `description`) of each
    /// `agents/<name>/skills/<skill>/SKILL.md`, sorted by name.
    pub async fn skills(&self) -> Vec<Skill> {
        let Ok(prefix) = access::agent_folder(&self.name)
            .and_then(|folder| StoragePrefix::parse(&format!("{}skills/", folder.as_str())))
        else {
            return Vec::new();
        };
        let Ok(listed) = self.storage.list(&prefix).await else {
            return Vec::new();
        };
        let mut skills = Vec::new();
        for meta in listed
            .iter()
            .filter(|meta| meta.path.ends_with("/SKILL.md"))
        {
            let Ok(path) = StoragePath::parse(&meta.path) else {
                continue;
            };
            if let Ok(bytes) = self.storage.get_bytes(&path, 64 * 1024).await
                && let Some(mut skill) = Skill::from_front_matter(&String::from_utf8_lossy(&bytes))
            {
                skill.path = meta.path.clone();
                skills.push(skill);
            }
            if skills.len() == SKILLS_IN_INDEX {
                break;
            }
        }
        skills.sort_by(|a, b| a.name.cmp(&b.name));
        skills
    }

    async fn read_skill(&self, name: &str) -> Result<String, StorageError> {
        let skills = self.skills().await;
        match skills.iter().find(|skill| skill.name == name.trim()) {
            Some(skill) => self.read(&skill.path).await,
            None => Ok(format!(
                "error: no skill named `{name}`; you have: {}",
                skills
                    .iter()
                    .map(|skill| skill.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Keeps a long answer as `answers/<id>.md` in the agent's folder (`agents/manager/` for
    /// the Manager: no Worker reads it) and returns its path.
    pub async fn keep_answer(
        &self,
        event_id: &str,
        text: &str,
    ) -> Result<StoragePath, StorageError> {
        let relative = format!("answers/{}.md", short_id(event_id));
        let path = match self.role {
            Role::Worker => access::agent_path(&self.name, &relative)?,
            Role::Manager => access::agent_path(MANAGER_FOLDER, &relative)?,
        };
        self.storage
            .put_bytes(&path, text.as_bytes().to_vec())
            .await?;
        Ok(path)
    }

    /// Saves a file a person sent (an `m.file`, `m.image`, `m.audio` or `m.video` event) into
    /// the agent's inbox folder (`agents/<name>/inbox/` for a Worker,
    /// `agents/manager/inbox/<sender>/` for the Manager: no Worker reads it, and a person's turn
    /// reads only what that person sent) and returns a line for the agent's context naming its
    /// path.
    pub async fn save_incoming(
        &self,
        client: &MatrixClient,
        agent: &UserId,
        event: &RoomEvent,
    ) -> Option<String> {
        let content = event.message()?;
        if !matches!(
            content.msgtype.as_str(),
            "m.file" | "m.image" | "m.audio" | "m.video"
        ) {
            return None;
        }
        let sender = event.sender.as_str();
        // In an encrypted room the file is ciphertext and `file` carries its key and URL.
        let encrypted_file = content.file.as_ref();
        let Some(mxc) = content
            .url
            .as_deref()
            .or_else(|| encrypted_file.and_then(|file| file.get("url")?.as_str()))
        else {
            return Some(format!(
                "[{sender} sent an encrypted or malformed file that could not be saved]"
            ));
        };
        let file_name = content
            .filename
            .as_deref()
            .or((!content.body.is_empty()).then_some(content.body.as_str()))
            .unwrap_or("file");
        let event_id = event.event_id.as_str();
        let relative = format!("inbox/{}-{}", short_id(event_id), safe_file_name(file_name));
        let path = match self.role {
            Role::Worker => access::agent_path(&self.name, &relative),
            Role::Manager => match UserId::parse(sender) {
                Ok(sender) => access::agent_path(
                    MANAGER_FOLDER,
                    &format!(
                        "inbox/{}/{}",
                        sender_folder(&sender),
                        &relative["inbox/".len()..]
                    ),
                ),
                Err(_) => access::agent_path(MANAGER_FOLDER, &relative),
            },
        };
        let saved = async {
            let path = path.map_err(|error| error.to_string())?;
            // Streamed from the homeserver into storage, never whole in memory; the storage
            // size limit applies on the way.
            let (body, content_type) = client
                .download(agent, mxc, self.storage.max_file_bytes())
                .await
                .map_err(|error| {
                    let error = error.to_string();
                    if error.contains("larger than") {
                        // Say which setting the person's admin would raise.
                        format!("downloading it failed: {error} (storage.max_file_bytes)")
                    } else {
                        format!("downloading it failed: {error}")
                    }
                })?;
            let body = match encrypted_file {
                Some(file) => crate::crypto::attachments::decrypt(file, body)
                    .await
                    .map_err(|error| error.to_string())?,
                None => body,
            };
            let size = self
                .storage
                .put(&path, body)
                .await
                .map_err(|error| error.to_string())?
                .size;
            Ok::<_, String>((path, size, content_type))
        }
        .await;
        Some(match saved {
            Ok((path, size, content_type)) => format!(
                "[{sender} sent the file `{file_name}`; it is saved at `{path}` ({size} bytes, {content_type}); read it with read_file if it is text]"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot save a file a person sent");
                format!(
                    "[{sender} sent the file `{file_name}`, but it could not be saved: {error}]"
                )
            }
        })
    }
}

/// One skill in an agent's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    pub name: String,
    pub description: String,
    /// Where its SKILL.md is.
    pub path: String,
}

impl Skill {
    /// Reads the YAML front matter of a SKILL.md (`name:` and `description:` between `---`
    /// lines); `None` without a name.
    pub fn from_front_matter(text: &str) -> Option<Skill> {
        let mut lines = text.lines();
        if lines.next()?.trim() != "---" {
            return None;
        }
        let (mut name, mut description) = (None, String::new());
        for line in lines {
            if line.trim() == "---" {
                break;
            }
            let unquote =
                |value: &str| value.trim().trim_matches('"').trim_matches('\'').to_owned();
            if let Some(value) = line.strip_prefix("name:") {
                name = Some(unquote(value)).filter(|name| !name.is_empty());
            } else if let Some(value) = line.strip_prefix("description:") {
                description = unquote(value);
            }
        }
        Some(Skill {
            name: name?,
            description,
            path: String::new(),
        })
    }
}

/// The start of a file as text, with a note of how much was left out.
fn bounded_text(bytes: &[u8], total: u64) -> String {
    if bytes.contains(&0) {
        return format!("(binary file, {total} bytes; not shown)");
    }
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= READ_LIMIT_BYTES {
        return text.into_owned();
    }
    let mut end = READ_LIMIT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n… (truncated: showing {end} of {total} bytes)",
        &text[..end]
    )
}

/// A file name safe as one path segment: letters, digits, `.`, `-` and `_`, at most 80 chars.
fn safe_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        "file".to_owned()
    } else {
        cleaned.to_owned()
    }
}

/// Eight characters of an event id that are safe in a file name (files sent under the same
/// name do not overwrite each other).
fn short_id(event_id: &str) -> String {
    let id: String = event_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    if id.is_empty() { "file".into() } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_gives_name_and_description() {
        let skill = Skill::from_front_matter(
            "---\nname: code-review\ndescription: \"Review a diff for bugs\"\n---\n# Body\n",
        )
        .expect("a skill");
        assert_eq!(skill.name, "code-review");
        assert_eq!(skill.description, "Review a diff for bugs");
        assert!(Skill::from_front_matter("# no front matter").is_none());
        assert!(Skill::from_front_matter("---\ndescription: x\n---\n").is_none());
    }

    #[test]
    fn file_names_are_made_safe() {
        assert_eq!(safe_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_file_name("report 2026.pdf"), "report_2026.pdf");
        assert_eq!(safe_file_name(""), "file");
        assert_eq!(short_id("$AbC:def/gh"), "AbCdefgh");
    }

    #[test]
    fn long_text_is_cut_with_a_note_and_binary_is_not_shown() {
        let long = "é".repeat(READ_LIMIT_BYTES);
        let shown = bounded_text(long.as_bytes(), long.len() as u64);
        assert!(
            shown.contains("truncated"),
            "{}",
            &shown[shown.len() - 60..]
        );
        assert_eq!(
            bounded_text(b"a\0b", 3),
            "(binary file, 3 bytes; not shown)"
        );
    }
}
