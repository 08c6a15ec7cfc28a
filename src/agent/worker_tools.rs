//! A Worker's tools: its tasks (progress, complete, block), its files under the access rules,
//! its memory and skills, and a way to bring in another Worker.
//!
//! A Worker acts only on tasks assigned to it and only on the files the access rules give it;
//! both are checked here in code, whatever its prompt says.

use std::sync::Arc;

use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::llm_turn::{Toolbox, parse_arguments};
use super::registry::{Worker, WorkerState};
use super::services::AgentServices;
use super::workspace::Workspace;
use crate::dispatch::DEPTH_KEY;
use crate::llm::Tool;
use crate::matrix::OutgoingMessage;
use crate::storage::access::Role;
use crate::tasks::{Task, TaskState};

/// A Worker's tools for one turn.
pub struct WorkerTools {
    services: Arc<AgentServices>,
    worker: Worker,
    /// The room the turn runs in (where `message_worker` posts).
    room: OwnedRoomId,
    depth: u32,
    files: Workspace,
    /// The tasks assigned to the Worker when the turn started (their folders are its).
    task_ids: Vec<String>,
}

impl WorkerTools {
    /// The Worker's tools; its task folders are those of the tasks assigned to it now.
    pub fn new(
        services: Arc<AgentServices>,
        worker: Worker,
        room: OwnedRoomId,
        depth: u32,
    ) -> Self {
        let task_ids = services.tasks.task_ids_of(&worker.name).unwrap_or_default();
        let files = Workspace::new(
            services.storage.clone(),
            &worker.name,
            Role::Worker,
            task_ids.clone(),
        );
        Self {
            services,
            worker,
            room,
            depth,
            files,
            task_ids,
        }
    }

    /// The Worker's view of its files (for the prompt's memory and skills).
    pub fn workspace(&self) -> &Workspace {
        &self.files
    }

    /// The Worker's system prompt: persona, role, skills index and memory summary.
    pub async fn persona(&self) -> String {
        let worker = &self.worker;
        let mut prompt = format!(
            "You are {}, a Worker agent in a Matrix team led by the Manager ({}). Your role: {}.\n\
             Work on your tasks with your task tools (task_progress, complete_task, block_task) and \
             answer briefly and concretely. Keep your working files in agents/{}/ or the task's folder, \
             and refer to files by path in chat; never paste a whole file. Run commands and your skills' \
             scripts with run_command (in your sandbox, in the task's folder when you name the task), \
             and call APIs with http_request.",
            worker.display_name,
            self.services.manager,
            if worker.role.is_empty() {
                "general help"
            } else {
                &worker.role
            },
            worker.name,
        );
        let skills = self.files.skills().await;
        if !skills.is_empty() {
            prompt.push_str("\n\nYour skills (load one with read_skill before using it):");
            for skill in skills {
                prompt.push_str(&format!("\n- {}: {}", skill.name, skill.description));
            }
        }
        let memory = self.files.memory_summary().await;
        if !memory.is_empty() {
            prompt.push_str("\n\nYour memory (notes you saved with remember):\n");
            prompt.push_str(&memory);
        }
        prompt
    }
}

#[derive(Deserialize)]
struct TaskNoteArgs {
    task: String,
    #[serde(alias = "note", alias = "result", alias = "question")]
    text: String,
}

#[derive(Deserialize)]
struct MessageArgs {
    worker: String,
    text: String,
}

#[async_trait::async_trait]
impl Toolbox for WorkerTools {
    fn tools(&self) -> Vec<Tool> {
        let task_text = |what: &str| {
            json!({
                "type": "object",
                "properties": {
                    "task": {"type": "string", "description": "the task id, e.g. t-1"},
                    "text": {"type": "string", "description": what}
                },
                "required": ["task", "text"]
            })
        };
        let mut tools = vec![
            Tool::function(
                "task_progress",
                "Record progress on one of your tasks (appended to progress.md).",
                task_text("what you did"),
            ),
            Tool::function(
                "complete_task",
                "Complete one of your tasks with its result (saved as result.md).",
                task_text("the result, in Markdown"),
            ),
            Tool::function(
                "block_task",
                "Mark one of your tasks blocked with a question for the Manager and the person.",
                task_text("your question"),
            ),
            Tool::function(
                "message_worker",
                "Mention another Worker in this room (it wakes if the team's policy lets Workers wake each other).",
                json!({
                    "type": "object",
                    "properties": {"worker": {"type": "string"}, "text": {"type": "string"}},
                    "required": ["worker", "text"]
                }),
            ),
        ];
        tools.extend(super::sandbox_tools::tools());
        tools.push(super::files::share_tool());
        tools.extend(self.files.tools());
        tools
    }

    fn interruptible(&self, name: &str) -> bool {
        matches!(name, "run_command" | "http_request")
    }

    async fn call(&self, name: &str, arguments: &str) -> String {
        match name {
            "task_progress" | "complete_task" | "block_task" => {
                self.task_tool(name, arguments).await
            }
            "message_worker" => self.message_worker(arguments).await,
            "run_command" => {
                super::sandbox_tools::run_command(
                    &self.services,
                    &self.worker,
                    &self.task_ids,
                    arguments,
                )
                .await
            }
            "http_request" => {
                super::sandbox_tools::http_request(&self.services, &self.worker, arguments).await
            }
            "share_file" => {
                let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
                super::files::share_tool_call(
                    &self.services,
                    &self.files,
                    &self.worker.user_id,
                    &self.room,
                    &arguments,
                )
                .await
            }
            other => {
                let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
                match self.files.call(other, &arguments).await {
                    Some(answer) => answer,
                    None => format!("error: there is no tool named {other}"),
                }
            }
        }
    }
}

impl WorkerTools {
    async fn task_tool(&self, name: &str, arguments: &str) -> String {
        let args: TaskNoteArgs = match parse_arguments(arguments) {
            Ok(args) => args,
            Err(error) => return error,
        };
        let tasks = &self.services.tasks;
        let task = match tasks.get(&args.task) {
            Ok(task) if task.assignee == self.worker.name => task,
            Ok(task) => {
                return format!(
                    "error: {} is assigned to {}, not to you",
                    task.id, task.assignee
                );
            }
            Err(error) => return format!("error: {error}"),
        };
        let now = crate::clock::now_ms();
        let outcome = match name {
            "task_progress" => tasks.progress(&task.id, &args.text, now).await,
            "complete_task" => tasks.complete(&task.id, &args.text, now).await,
            _ => tasks.block(&task.id, &args.text, now),
        };
        match outcome {
            Ok(task) => {
                let services = &self.services;
                // A project task moves its project on (and the Manager is woken); a blocked one
                // is asked in the project room instead of reported.
                let in_project = match name {
                    "complete_task" => {
                        report_to_requester(services, &self.worker, &task).await;
                        super::project_flow::worker_completed(
                            services,
                            &self.worker,
                            &task,
                            self.depth,
                        )
                        .await
                    }
                    "block_task" => {
                        super::project_flow::worker_blocked(services, &self.worker, &task).await
                    }
                    _ => {
                        super::project_flow::worker_progressed(services, &task).await;
                        false
                    }
                };
                if name == "block_task" && !in_project {
                    report_to_requester(services, &self.worker, &task).await;
                }
                json!({ "task": task.id, "state": task.state }).to_string()
            }
            Err(error) => {
                // Re-run after a crash between the task's record and the project's: the task
                // is done already; the project still moves on (idempotently).
                if name == "complete_task"
                    && let Ok(done) = tasks.get(&task.id)
                    && done.state == TaskState::Done
                {
                    super::project_flow::worker_completed(
                        &self.services,
                        &self.worker,
                        &done,
                        self.depth,
                    )
                    .await;
                }
                format!("error: {error}")
            }
        }
    }

    async fn message_worker(&self, arguments: &str) -> String {
        let args: MessageArgs = match parse_arguments(arguments) {
            Ok(args) => args,
            Err(error) => return error,
        };
        let other = match self.services.team.registry.get(&args.worker) {
            Ok(Some(other)) if other.state == WorkerState::Active => other,
            Ok(Some(other)) => return format!("error: {} is not active", other.name),
            Ok(None) => return format!("error: there is no worker named {}", args.worker),
            Err(error) => return format!("error: {error}"),
        };
        let message = OutgoingMessage::text(format!("{}: {}", other.user_id, args.text))
            .mention(other.user_id.clone(), other.display_name.clone())
            .with_field(DEPTH_KEY, Value::from(self.depth + 1));
        let key = format!(
            "to-worker:{}:{}:{}",
            self.worker.name,
            other.name,
            crate::clock::now_ms()
        );
        match self
            .services
            .client
            .send(&self.worker.user_id, &self.room, &key, &message)
            .await
        {
            Ok(_) => format!(
                "posted; {} wakes if it is in this room and the policy allows",
                other.name
            ),
            Err(error) => format!("error: {error}"),
        }
    }
}

/// Tells the person who asked for a task (and the Manager) that it finished or blocked, and
/// shares the result file.
pub async fn report_to_requester(services: &AgentServices, worker: &Worker, task: &Task) {
    let Some(room) = &task.room else { return };
    let text = match &task.blocked_question {
        Some(question) if task.state == TaskState::Blocked => format!(
            "{} {}: task **{}** is blocked: {}",
            task.requester, services.manager, task.id, question
        ),
        _ => format!(
            "{} {}: task **{}** ({}) is done. The result is in `tasks/{}/result.md`.",
            task.requester, services.manager, task.id, task.title, task.id
        ),
    };
    let requester_name = task.requester.localpart().to_owned();
    let message = OutgoingMessage::notice(text)
        .mention(task.requester.clone(), requester_name)
        .mention(services.manager.clone(), services.manager_name());
    let key = format!("report:{}:{:?}", task.id, task.state);
    if let Err(error) = services
        .client
        .send(&worker.user_id, room, &key, &message)
        .await
    {
        tracing::warn!(%error, "cannot report a task");
        return;
    }
    if task.state == TaskState::Done {
        let result = format!("tasks/{}/result.md", task.id);
        if let Err(error) = super::files::share(
            &services.storage,
            &services.links,
            &services.client,
            &worker.user_id,
            room,
            &result,
            false,
        )
        .await
        {
            tracing::warn!(%error, "cannot share a task result");
        }
    }
}
