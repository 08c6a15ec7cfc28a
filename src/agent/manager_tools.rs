//! The Manager's tools: the team (create, list, change, stop, start, remove, invite Workers)
//! and the tasks (assign, list, cancel), plus the files, which the Manager may all read.
//!
//! The tools act with the turn's authority ([`TurnAuthority`]): that of the least trusted text
//! in the prompt, the waking senders, adopted messages, shown room lines and the tools' own
//! results alike. Changes to the team (create, stop, remove, re-role Workers; cancel tasks;
//! recurring tasks) are for turns with only admins' text in them, and the file tools reach only
//! what every author in the turn could. A file read or listed, and a listing of tasks or
//! Workers, adds its authors to the authority, so the step after it may have fewer tools. A
//! turn that is not all-admin is not offered the admin-only tools, and each is checked again
//! here in code, whatever the model decides.
//! Every tool answers the model in JSON or with an `error: …` line it can relay.

use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::authority::{Principal, TurnAuthority};
use super::llm_turn::{Toolbox, parse_arguments as parse};
use super::manager::ManagerProfile;
use super::registry::WorkerState;
use super::services::AgentServices;
use super::status;
use super::workspace::Workspace;
use crate::dispatch::DEPTH_KEY;
use crate::llm::Tool;
use crate::matrix::OutgoingMessage;
use crate::storage::access::Role;
use crate::tasks::{Schedule, Task, TaskFilter};

/// The Manager's tools for one turn.
pub struct ManagerTools {
    services: Arc<AgentServices>,
    /// Everyone whose words are in the turn; the tools act with the least of their rights.
    authority: TurnAuthority,
    /// The room the turn runs in ("invite alice here").
    room: OwnedRoomId,
    /// Depth of the wake this turn handles; what the Manager says wakes others one deeper.
    depth: u32,
    files: Workspace,
}

impl ManagerTools {
    pub fn new(
        services: Arc<AgentServices>,
        authority: TurnAuthority,
        room: OwnedRoomId,
        depth: u32,
    ) -> Self {
        let files = Workspace::new(
            services.storage.clone(),
            super::authority::MANAGER_FOLDER,
            Role::Manager,
            Vec::new(),
        )
        .on_behalf_of(Arc::new(authority.clone()));
        Self {
            services,
            authority,
            room,
            depth,
            files,
        }
    }

    fn admin_only(&self, what: &str) -> Option<String> {
        self.authority.require_admin(what).err()
    }

    /// Who the turn acts for (new tasks are theirs, new Workers' rooms invite them).
    fn requester(&self) -> Result<ruma::OwnedUserId, String> {
        self.authority
            .requester()
            .ok_or_else(|| "error: nobody asked for this turn".to_owned())
    }
}

#[derive(Deserialize)]
struct NameArgs {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    model: Option<String>,
    /// Gateway routes the new Worker may call (admins only).
    #[serde(default)]
    routes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct AssignArgs {
    worker: String,
    title: String,
    #[serde(default)]
    spec: String,
    /// A cron expression for a recurring task.
    #[serde(default)]
    every: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
}

#[derive(Deserialize)]
struct InviteArgs {
    worker: String,
    #[serde(default)]
    room: Option<String>,
}

#[derive(Deserialize)]
struct TaskArgs {
    task: String,
}

/// One task of a proposed plan, as the model writes it.
#[derive(Deserialize)]
struct PlanTaskArgs {
    key: String,
    title: String,
    /// A Worker's name; a name no Worker has yet is a Worker to create on confirmation.
    owner: String,
    /// For a Worker to create: its role.
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    acceptance: String,
}

#[derive(Deserialize)]
struct ProposeArgs {
    title: String,
    tasks: Vec<PlanTaskArgs>,
}

#[derive(Deserialize)]
struct ProjectArgs {
    #[serde(default)]
    project: Option<String>,
}

#[derive(Deserialize)]
struct EditArgs {
    project: String,
    /// reassign, add_dependency, remove_dependency, set_acceptance, add_task, remove_task.
    change: String,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    on: Option<String>,
    #[serde(default)]
    acceptance: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
}

#[derive(Deserialize)]
struct RevisionArgs {
    project: String,
    task: String,
    reason: String,
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required})
}

#[async_trait::async_trait]
impl Toolbox for ManagerTools {
    fn tools(&self) -> Vec<Tool> {
        let name = json!({"type": "string", "description": "the Worker's name, e.g. alice"});
        let mut tools = vec![
            Tool::function(
                "create_worker",
                "Create a Worker agent (or return the existing one of that name) with its own room.",
                object(
                    json!({"name": {"type": "string", "description": "lowercase name, e.g. alice"},
                           "role": {"type": "string", "description": "what the worker is for"},
                           "routes": {"type": "array", "items": {"type": "string"},
                                      "description": "gateway routes it may call, e.g. [\"github\"] (admins only)"}}),
                    &["name"],
                ),
            ),
            Tool::function(
                "list_workers",
                "What everyone is doing: every Worker with its state (working, idle, stopped, removed), role, model, open tasks and last activity.",
                object(json!({}), &[]),
            ),
            Tool::function(
                "set_persona",
                "Save how the admin wants you to be: your name, your style, the language to answer in (admins only).",
                object(
                    json!({"name": {"type": "string"}, "style": {"type": "string"}, "language": {"type": "string"}}),
                    &[],
                ),
            ),
            Tool::function(
                "update_worker",
                "Change a Worker's role and/or model (admins only).",
                object(
                    json!({"name": name, "role": {"type": "string"}, "model": {"type": "string"}}),
                    &["name"],
                ),
            ),
            Tool::function(
                "stop_worker",
                "Stop a Worker: it wakes for nothing, its data stays (admins only).",
                object(json!({"name": name}), &["name"]),
            ),
            Tool::function(
                "start_worker",
                "Start a stopped Worker again (admins only).",
                object(json!({"name": name}), &["name"]),
            ),
            Tool::function(
                "remove_worker",
                "Remove a Worker: revokes its token and it leaves its rooms; files and history stay (admins only).",
                object(json!({"name": name}), &["name"]),
            ),
            Tool::function(
                "invite_worker",
                "Invite a Worker into a room: this room when no room is given, else a room id (!…) or alias (#…) where you are a member.",
                object(
                    json!({"worker": name, "room": {"type": "string", "description": "room id or alias; empty for this room"}}),
                    &["worker"],
                ),
            ),
            Tool::function(
                "assign_task",
                "Give a Worker a task: records it, writes tasks/<id>/spec.md, and mentions the Worker in its room.",
                object(
                    json!({
                        "worker": name,
                        "title": {"type": "string", "description": "one line"},
                        "spec": {"type": "string", "description": "what to do, in Markdown"},
                        "every": {"type": "string", "description": "optional cron expression (minute hour day month weekday) to repeat the task, e.g. `0 9 * * mon-fri`"},
                        "timezone": {"type": "string", "description": "IANA zone for `every`, default UTC"}
                    }),
                    &["worker", "title"],
                ),
            ),
            Tool::function(
                "list_tasks",
                "List the open tasks with their state and assignee.",
                object(json!({}), &[]),
            ),
            Tool::function(
                "cancel_task",
                "Cancel a task (admins only).",
                object(json!({"task": {"type": "string"}}), &["task"]),
            ),
        ];
        tools.extend(project_tools());
        tools.push(super::files::share_tool());
        tools.extend(self.files.tools());
        self.authority.offered(tools)
    }

    async fn call(&self, name: &str, arguments: &str) -> String {
        let outcome = match name {
            "create_worker" => self.create_worker(arguments).await,
            "list_workers" => match self.view().await {
                Ok(view) => status::team_status(
                    &self.services.team.registry,
                    &self.services.tasks,
                    &self.services.activity,
                    &self.services.busy,
                )
                .map(|workers| json!(view.workers(workers)).to_string())
                .map_err(|error| format!("error: {error}")),
                Err(error) => Err(error),
            },
            "set_persona" => self.set_persona(arguments).await,
            "update_worker" => self.update_worker(arguments),
            "stop_worker" | "start_worker" => self.set_state(name, arguments),
            "remove_worker" => self.remove_worker(arguments).await,
            "invite_worker" => self.invite_worker(arguments).await,
            "assign_task" => self.assign_task(arguments).await,
            "list_tasks" => match self.view().await {
                Ok(view) => self
                    .services
                    .tasks
                    .list(&TaskFilter::open())
                    .map(|tasks| {
                        let registry = &self.services.team.registry;
                        json!(view.tasks(tasks, |name| registry.user_id_for(name).ok())).to_string()
                    })
                    .map_err(|error| format!("error: {error}")),
                Err(error) => Err(error),
            },
            "cancel_task" => self.cancel_task(arguments),
            "propose_project" => self.propose_project(arguments).await,
            "confirm_project" => self.confirm_project(arguments).await,
            "edit_project" => self.edit_project(arguments).await,
            "reject_project" => self.reject_project(arguments),
            "request_revision" => self.request_revision(arguments).await,
            "project_status" => self.project_status(arguments),
            "share_file" => {
                let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
                Ok(super::files::share_tool_call(
                    &self.services,
                    &self.files,
                    &self.services.manager,
                    &self.room,
                    &arguments,
                )
                .await)
            }
            other => {
                let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
                match self.files.call(other, &arguments).await {
                    Some(answer) => Ok(answer),
                    None => Err(format!("error: there is no tool named {other}")),
                }
            }
        };
        let answer = outcome.unwrap_or_else(|error| error);
        self.admit_authors(name, arguments, &answer);
        answer
    }

    fn replayed(&self, name: &str, arguments: &str, answer: &str) {
        self.admit_authors(name, arguments, answer);
    }
}

impl ManagerTools {
    /// Adds the authors of a tool's answer to the turn's authority, which goes down to theirs
    /// from the next call on: a file read or listed, the tasks a listing shows (their titles
    /// are their requesters' words, their blocked questions their Workers'). Our own answers
    /// (errors, refusals, what a change did) add nobody.
    fn admit_authors(&self, tool: &str, arguments: &str, answer: &str) {
        let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
        match tool {
            "read_file" | "list_files" => {
                let path = ["path", "prefix"]
                    .iter()
                    .find_map(|key| arguments.get(key).and_then(Value::as_str))
                    .unwrap_or("");
                self.authority.admit_file_answer(tool, path, answer);
            }
            "list_tasks" => match serde_json::from_str::<Vec<Task>>(answer) {
                Ok(tasks) => self.authority.admit_tasks(&tasks),
                Err(_) if answer.starts_with("error:") => {}
                Err(_) => self.authority.admit_text(Principal::Untraced {
                    source: "a listing of tasks".to_owned(),
                }),
            },
            "list_workers" => {
                let Ok(workers) = serde_json::from_str::<Vec<Value>>(answer) else {
                    return;
                };
                let names: Vec<&str> = workers
                    .iter()
                    .filter_map(|worker| worker["name"].as_str())
                    .collect();
                match self.services.tasks.list(&TaskFilter::open()) {
                    Ok(open) => self.authority.admit_tasks(
                        open.iter()
                            .filter(|task| names.contains(&task.assignee.as_str())),
                    ),
                    Err(_) => self.authority.admit_text(Principal::Untraced {
                        source: "a listing of Workers and their tasks".to_owned(),
                    }),
                }
            }
            _ => {}
        }
    }

    async fn create_worker(&self, arguments: &str) -> Result<String, String> {
        if let Some(refusal) = self.admin_only("create Workers") {
            return Err(refusal);
        }
        let args: NameArgs = parse(arguments)?;
        if args.routes.is_some()
            && let Some(refusal) = self.admin_only("choose which APIs a Worker may call")
        {
            return Err(refusal);
        }
        let role = args.role.unwrap_or_default();
        self.check_worker_cap(&args.name)?;
        let requester = self.requester()?;
        let created = self
            .services
            .team
            .provision(&args.name, &role, &requester)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "create_worker failed");
                format!("error: {error}")
            })?;
        let routes = match &args.routes {
            Some(routes) => Some(
                super::sandbox_tools::grant_routes(&self.services, &created.worker, routes).await?,
            ),
            None => None,
        };
        Ok(json!({
            "created": created.created,
            "routes": routes,
            "name": created.worker.name,
            "user_id": created.worker.user_id,
            "room": created.worker.room,
        })
        .to_string())
    }

    async fn set_persona(&self, arguments: &str) -> Result<String, String> {
        if let Some(refusal) = self.admin_only("change who I am") {
            return Err(refusal);
        }
        let given: ManagerProfile = parse(arguments)?;
        let clean = |value: Option<String>| {
            value
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        let mut profile = self.services.manager_profile().unwrap_or_default();
        if let Some(name) = clean(given.name) {
            self.services
                .client
                .set_display_name(&self.services.manager, &name)
                .await
                .map_err(|error| format!("error: cannot change my display name: {error}"))?;
            profile.name = Some(name);
        }
        profile.style = clean(given.style).or(profile.style);
        profile.language = clean(given.language).or(profile.language);
        self.services
            .manager_profile
            .insert(&ManagerProfile::KEY.to_owned(), &profile)
            .map_err(|error| format!("error: {error}"))?;
        // The dispatcher knows agents by name too.
        self.services.team.registry.mark_changed();
        Ok(json!(profile).to_string())
    }

    fn update_worker(&self, arguments: &str) -> Result<String, String> {
        if let Some(refusal) = self.admin_only("change a Worker") {
            return Err(refusal);
        }
        let args: NameArgs = parse(arguments)?;
        let worker = self
            .services
            .team
            .registry
            .update(&args.name, |worker| {
                if let Some(role) = args.role.as_ref().filter(|role| !role.trim().is_empty()) {
                    worker.role = role.trim().to_owned();
                }
                if let Some(model) = args.model.as_ref() {
                    let model = model.trim();
                    worker.model = (!model.is_empty()).then(|| model.to_owned());
                }
            })
            .map_err(|error| format!("error: {error}"))?;
        Ok(json!({"name": worker.name, "role": worker.role, "model": worker.model}).to_string())
    }

    fn set_state(&self, tool: &str, arguments: &str) -> Result<String, String> {
        let (state, verb) = if tool == "stop_worker" {
            (WorkerState::Stopped, "stop")
        } else {
            (WorkerState::Active, "start")
        };
        if let Some(refusal) = self.admin_only(&format!("{verb} Workers")) {
            return Err(refusal);
        }
        let args: NameArgs = parse(arguments)?;
        Ok(super::commands::set_state(
            &self.services.team.registry,
            &args.name,
            state,
        ))
    }

    async fn remove_worker(&self, arguments: &str) -> Result<String, String> {
        if let Some(refusal) = self.admin_only("remove Workers") {
            return Err(refusal);
        }
        let args: NameArgs = parse(arguments)?;
        let worker = self
            .services
            .team
            .remove(&args.name)
            .await
            .map_err(|error| format!("error: {error}"))?;
        Ok(format!(
            "removed {}: token revoked, left its rooms; files and history stay",
            worker.name
        ))
    }

    async fn invite_worker(&self, arguments: &str) -> Result<String, String> {
        let args: InviteArgs = parse(arguments)?;
        let services = &self.services;
        let worker = services
            .team
            .registry
            .get(&args.worker)
            .map_err(|error| format!("error: {error}"))?
            .ok_or_else(|| format!("error: there is no worker named {}", args.worker))?;
        if worker.state == WorkerState::Removed {
            return Err(format!(
                "error: {} was removed; create it again first",
                worker.name
            ));
        }
        let room = match args
            .room
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            None => self.room.clone(),
            Some(alias) if alias.starts_with('#') => services
                .client
                .resolve_alias(alias)
                .await
                .map_err(|error| format!("error: cannot find the room {alias}: {error}"))?,
            Some(id) => RoomId::parse(id).map_err(|_| {
                format!("error: `{id}` is neither a room id (!…) nor an alias (#…)")
            })?,
        };
        let joined = services
            .client
            .joined_rooms(&services.manager)
            .await
            .map_err(|error| format!("error: {error}"))?;
        self.authority.check_invite_room(&room, &self.room)?;
        if !joined.contains(&room) {
            return Err(format!(
                "error: I am not in {room}, so I cannot invite anyone there. Ask the person to invite me, or to invite {} directly (it accepts invites from them).",
                worker.user_id
            ));
        }
        match services
            .client
            .invite(&services.manager, &room, &worker.user_id)
            .await
        {
            Ok(()) => Ok(json!({"invited": worker.user_id, "room": room}).to_string()),
            // Already in the room (or invited): nothing to do.
            Err(error)
                if error.errcode() == Some("M_FORBIDDEN")
                    && error.to_string().contains("already") =>
            {
                Ok(
                    json!({"invited": worker.user_id, "room": room, "already_member": true})
                        .to_string(),
                )
            }
            Err(error) => Err(format!("error: {error}")),
        }
    }

    async fn assign_task(&self, arguments: &str) -> Result<String, String> {
        let args: AssignArgs = parse(arguments)?;
        let schedule = match args
            .every
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            Some(cron) => {
                if let Some(refusal) = self.admin_only("set up recurring tasks") {
                    return Err(refusal);
                }
                let schedule = Schedule::parse(cron, args.timezone.as_deref().unwrap_or("UTC"))
                    .map_err(|error| format!("error: {error}"))?;
                super::authority::check_recurrence(
                    &schedule,
                    &self.services.limits,
                    crate::clock::now_ms(),
                )
                .map_err(|refusal| self.authority.refuse(refusal))?;
                Some(schedule)
            }
            None => None,
        };
        let requester = self.requester()?;
        let task = assign_task(
            &self.services,
            &requester,
            &args.worker,
            &args.title,
            &args.spec,
            self.depth,
        )
        .await
        .map_err(|error| {
            tracing::warn!(%error, "assign_task failed");
            format!("error: {error}")
        })?;
        if let Some(schedule) = schedule {
            self.services
                .tasks
                .set_schedule(&task.id, Some(schedule), crate::clock::now_ms())
                .map_err(|error| format!("error: {error}"))?;
        }
        Ok(json!({ "task": task.id, "spec": format!("tasks/{}/spec.md", task.id), "recurring": args.every }).to_string())
    }

    /// What the listing tools show this turn: everything to admins, else (as `!crew workers`)
    /// only the Workers in this room and their tasks, and the requester's own tasks.
    async fn view(&self) -> Result<super::commands::RoomView, String> {
        let asker = self.requester()?;
        if self.authority.is_admin() {
            return Ok(super::commands::RoomView {
                workers_here: None,
                asker,
            });
        }
        let members = self
            .services
            .client
            .joined_members(&self.services.manager, &self.room)
            .await
            .map_err(|error| format!("error: cannot see who is in this room: {error}"))?;
        Ok(super::commands::RoomView {
            workers_here: Some(members.into_keys().collect()),
            asker,
        })
    }

    /// Refuses a new Worker past `limits.max_workers` (an existing name is not a new Worker).
    fn check_worker_cap(&self, name: &str) -> Result<(), String> {
        match self
            .services
            .team
            .registry
            .check_cap(name, self.services.limits.max_workers)
        {
            Ok(()) => Ok(()),
            Err(error @ crate::agent::registry::RegistryError::WorkerCap { .. }) => {
                Err(self.authority.refuse(error.to_string()))
            }
            Err(error) => Err(format!("error: {error}")),
        }
    }

    fn cancel_task(&self, arguments: &str) -> Result<String, String> {
        if let Some(refusal) = self.admin_only("cancel tasks") {
            return Err(refusal);
        }
        let args: TaskArgs = parse(arguments)?;
        let task = self
            .services
            .tasks
            .cancel(&args.task, crate::clock::now_ms())
            .map_err(|error| format!("error: {error}"))?;
        Ok(json!({"task": task.id, "state": task.state}).to_string())
    }
}

/// The project tools: plan, confirm, edit, reject, revise, look.
fn project_tools() -> Vec<Tool> {
    let project = json!({"type": "string", "description": "the project id, e.g. p-1"});
    let task = json!({"type": "object", "properties": {
        "key": {"type": "string", "description": "short handle other tasks depend on, e.g. api"},
        "title": {"type": "string", "description": "one line"},
        "owner": {"type": "string", "description": "an existing Worker's name, or the name of a Worker to create"},
        "role": {"type": "string", "description": "for a Worker to create: its role"},
        "depends_on": {"type": "array", "items": {"type": "string"}, "description": "keys of the tasks whose results this one needs"},
        "acceptance": {"type": "string", "description": "what done means for this task"}
    }, "required": ["key", "title", "owner"]});
    vec![
        Tool::function(
            "propose_project",
            "Plan work larger than one task: tasks with owners, dependencies and acceptance notes. Nothing starts until the person confirms; show them the plan and ask.",
            object(
                json!({"title": {"type": "string", "description": "one line"},
                       "tasks": {"type": "array", "items": task}}),
                &["title", "tasks"],
            ),
        ),
        Tool::function(
            "confirm_project",
            "The person confirmed a proposed project: opens its room, creates proposed Workers (admins only), starts every task that can start.",
            object(json!({"project": project}), &["project"]),
        ),
        Tool::function(
            "edit_project",
            "Change a project's plan as the person asks (e.g. give the API part to bob: change=reassign, task=api, owner=bob). change is one of reassign, add_dependency, remove_dependency, set_acceptance, add_task, remove_task.",
            object(
                json!({"project": project,
                       "change": {"type": "string"},
                       "task": {"type": "string", "description": "the task's key"},
                       "owner": {"type": "string"}, "role": {"type": "string"},
                       "on": {"type": "string", "description": "for dependencies: the other task's key"},
                       "acceptance": {"type": "string"}, "title": {"type": "string"},
                       "depends_on": {"type": "array", "items": {"type": "string"}}}),
                &["project", "change", "task"],
            ),
        ),
        Tool::function(
            "reject_project",
            "The person does not want a proposed project: nothing of it starts.",
            object(json!({"project": project}), &["project"]),
        ),
        Tool::function(
            "request_revision",
            "Send a done project task back to its Worker with the reason (revision needed); tasks depending on it wait.",
            object(
                json!({"project": project, "task": {"type": "string", "description": "the task's key"},
                       "reason": {"type": "string"}}),
                &["project", "task", "reason"],
            ),
        ),
        Tool::function(
            "project_status",
            "A project's plan and where each task is; without a project, every project.",
            object(json!({"project": project}), &[]),
        ),
    ]
}

impl ManagerTools {
    /// The owner a plan names: an existing Worker, or one to create.
    fn owner_of(&self, name: &str, role: Option<&str>) -> crate::projects::Owner {
        let exists = self
            .services
            .team
            .registry
            .get(name)
            .ok()
            .flatten()
            .is_some_and(|worker| worker.state != WorkerState::Removed);
        if exists {
            crate::projects::Owner::Worker {
                name: name.to_owned(),
            }
        } else {
            crate::projects::Owner::Proposed {
                name: name.to_owned(),
                role: role.unwrap_or_default().to_owned(),
            }
        }
    }

    fn draft_of(&self, task: PlanTaskArgs) -> crate::projects::TaskDraft {
        crate::projects::TaskDraft {
            owner: self.owner_of(&task.owner, task.role.as_deref()),
            key: task.key,
            title: task.title,
            depends_on: task.depends_on,
            acceptance: task.acceptance,
        }
    }

    /// Only the person who asked for a project (or an admin) decides about it.
    fn require_decider(&self, project: &crate::projects::Project) -> Result<(), String> {
        let asker = self.requester()?;
        if asker == project.requester || self.authority.is_admin() {
            Ok(())
        } else {
            Err(self.authority.refuse(format!(
                "project {} was asked for by {}; only they or an admin decide about it",
                project.id, project.requester
            )))
        }
    }

    async fn propose_project(&self, arguments: &str) -> Result<String, String> {
        let args: ProposeArgs = parse(arguments)?;
        let requester = self.requester()?;
        let draft = crate::projects::ProjectDraft {
            title: args.title,
            tasks: args
                .tasks
                .into_iter()
                .map(|task| self.draft_of(task))
                .collect(),
        };
        let now = crate::clock::now_ms();
        let project = self
            .services
            .projects
            .projects()
            .propose(draft, requester, Some(self.room.clone()), now)
            .map_err(|error| format!("error: {error}"))?;
        let plan = crate::projects::write_plan(&self.services.storage, &project)
            .await
            .map_err(|error| format!("error: {error}"))?;
        if self.services.projects_auto_start && project.proposed_workers().is_empty() {
            return self.start_project(&project.id).await;
        }
        Ok(json!({
            "project": project.id,
            "plan": plan.as_str(),
            "waves": project.waves(),
            "workers_to_create": project.proposed_workers(),
            "status": crate::projects::project_status_text(&project),
            "next": "Show the person the plan (tasks, owners, order) and ask them to confirm, change or reject it. Nothing starts before they confirm.",
        })
        .to_string())
    }

    async fn confirm_project(&self, arguments: &str) -> Result<String, String> {
        let args: ProjectArgs = parse(arguments)?;
        let id = args
            .project
            .ok_or_else(|| "error: say which project (p-1)".to_owned())?;
        let project = self
            .services
            .projects
            .projects()
            .get(&id)
            .map_err(|error| format!("error: {error}"))?;
        self.require_decider(&project)?;
        if project.phase != crate::projects::ProjectPhase::Proposed {
            return Err(format!(
                "error: project {} is {}, not waiting for confirmation",
                project.id, project.phase
            ));
        }
        let to_create = project.proposed_workers();
        if !to_create.is_empty() {
            if let Some(refusal) = self.admin_only("create Workers") {
                return Err(refusal);
            }
            let requester = self.requester()?;
            for (name, role) in &to_create {
                self.check_worker_cap(name)?;
                self.services
                    .team
                    .provision(name, role, &requester)
                    .await
                    .map_err(|error| format!("error: cannot create {name}: {error}"))?;
                self.services
                    .projects
                    .projects()
                    .worker_created(&project.id, name, crate::clock::now_ms())
                    .map_err(|error| format!("error: {error}"))?;
            }
        }
        self.start_project(&project.id).await
    }

    /// Opens the project room (once), confirms the project and starts what can start.
    async fn start_project(&self, id: &str) -> Result<String, String> {
        let services = &self.services;
        let projects = services.projects.projects();
        let project = projects
            .get(id)
            .map_err(|error| format!("error: {error}"))?;
        let room = match &project.room {
            Some(room) => room.clone(),
            None => {
                let mut workers = Vec::new();
                for task in &project.tasks {
                    if let Ok(Some(worker)) = services.team.registry.get(task.owner.name())
                        && !workers
                            .iter()
                            .any(|known: &super::registry::Worker| known.user_id == worker.user_id)
                    {
                        workers.push(worker);
                    }
                }
                let mut invite: Vec<ruma::OwnedUserId> = vec![project.requester.clone()];
                invite.extend(workers.iter().map(|worker| worker.user_id.clone()));
                // Created once: a crash before the room is recorded finds it again.
                let room = services
                    .team
                    .create_room_once(
                        crate::matrix::CreateRoom {
                            name: Some(format!("Project: {}", project.title)),
                            topic: Some(format!(
                                "Project {} for {}; the plan is projects/{}/plan.md",
                                project.id, project.requester, project.id
                            )),
                            invite,
                            ..Default::default()
                        },
                        &format!("project-room:{}:{}", project.id, project.created_ms),
                    )
                    .await
                    .map_err(|error| format!("error: cannot open the project room: {error}"))?;
                // The Workers join now, so their first answers there cannot come too early.
                for worker in &workers {
                    if let Err(error) = services.client.join(&worker.user_id, &room).await {
                        tracing::warn!(%error, worker = %worker.name, "cannot join the project room");
                    }
                }
                projects
                    .set_room(&project.id, room.clone(), crate::clock::now_ms())
                    .map_err(|error| format!("error: {error}"))?;
                room
            }
        };
        if project.phase == crate::projects::ProjectPhase::Proposed {
            projects
                .confirm(&project.id, crate::clock::now_ms())
                .map_err(|error| format!("error: {error}"))?;
        }
        let advance = services
            .projects
            .advance(&project.id, crate::clock::now_ms())
            .await
            .map_err(|error| format!("error: {error}"))?;
        super::project_flow::announce_started(services, &advance, self.depth + 1).await;
        Ok(json!({
            "project": project.id,
            "room": room,
            "started": advance.started.iter().map(|s| json!({"task": s.key, "worker_task": s.task.id, "worker": s.task.assignee})).collect::<Vec<_>>(),
            "waiting_for_workers": advance.waiting_for_workers,
            "next": "Tell the person in one or two lines that the project started and where (the project room). The Workers are told; you will be woken when parts are done.",
        })
        .to_string())
    }

    async fn edit_project(&self, arguments: &str) -> Result<String, String> {
        use crate::projects::PlanEdit;
        let args: EditArgs = parse(arguments)?;
        let projects = self.services.projects.projects();
        let project = projects
            .get(&args.project)
            .map_err(|error| format!("error: {error}"))?;
        self.require_decider(&project)?;
        let task = args.task.clone().unwrap_or_default();
        let need = |value: Option<String>, what: &str| {
            value
                .filter(|value| !value.trim().is_empty())
                .ok_or_else(|| format!("error: `{}` needs `{what}`", args.change))
        };
        let edit = match args.change.trim() {
            "reassign" => PlanEdit::Reassign {
                owner: self.owner_of(&need(args.owner.clone(), "owner")?, args.role.as_deref()),
                task,
            },
            "add_dependency" => PlanEdit::AddDependency {
                on: need(args.on.clone(), "on")?,
                task,
            },
            "remove_dependency" => PlanEdit::RemoveDependency {
                on: need(args.on.clone(), "on")?,
                task,
            },
            "set_acceptance" => PlanEdit::SetAcceptance {
                acceptance: args.acceptance.clone().unwrap_or_default(),
                task,
            },
            "add_task" => PlanEdit::AddTask {
                task: self.draft_of(PlanTaskArgs {
                    title: need(args.title.clone(), "title")?,
                    owner: need(args.owner.clone(), "owner")?,
                    role: args.role.clone(),
                    depends_on: args.depends_on.clone(),
                    acceptance: args.acceptance.clone().unwrap_or_default(),
                    key: task,
                }),
            },
            "remove_task" => PlanEdit::RemoveTask { task },
            other => {
                return Err(format!(
                    "error: `{other}` is not a change I know; use reassign, add_dependency, remove_dependency, set_acceptance, add_task or remove_task"
                ));
            }
        };
        let (project, _) = projects
            .edit(&project.id, edit, crate::clock::now_ms())
            .map_err(|error| format!("error: {error}"))?;
        if project.phase == crate::projects::ProjectPhase::Running {
            let advance = self
                .services
                .projects
                .advance(&project.id, crate::clock::now_ms())
                .await
                .map_err(|error| format!("error: {error}"))?;
            super::project_flow::announce_started(&self.services, &advance, self.depth + 1).await;
        } else {
            crate::projects::write_plan(&self.services.storage, &project)
                .await
                .map_err(|error| format!("error: {error}"))?;
        }
        Ok(json!({
            "project": project.id,
            "waves": project.waves(),
            "status": crate::projects::project_status_text(&project),
        })
        .to_string())
    }

    fn reject_project(&self, arguments: &str) -> Result<String, String> {
        let args: ProjectArgs = parse(arguments)?;
        let id = args
            .project
            .ok_or_else(|| "error: say which project (p-1)".to_owned())?;
        let projects = self.services.projects.projects();
        let project = projects
            .get(&id)
            .map_err(|error| format!("error: {error}"))?;
        self.require_decider(&project)?;
        let project = projects
            .reject(&project.id, crate::clock::now_ms())
            .map_err(|error| format!("error: {error}"))?;
        Ok(json!({"project": project.id, "phase": project.phase}).to_string())
    }

    async fn request_revision(&self, arguments: &str) -> Result<String, String> {
        let args: RevisionArgs = parse(arguments)?;
        let project = self
            .services
            .projects
            .projects()
            .get(&args.project)
            .map_err(|error| format!("error: {error}"))?;
        // The person who asked, an admin, or the Manager reviewing a Worker's report.
        let asker = self.requester()?;
        let reviewing = matches!(self.services.team.registry.by_user(&asker), Ok(Some(_)));
        if !reviewing {
            self.require_decider(&project)?;
        }
        let (outcome, advance) = self
            .services
            .projects
            .request_revision(
                &args.project,
                &args.task,
                &args.reason,
                crate::clock::now_ms(),
            )
            .await
            .map_err(|error| format!("error: {error}"))?;
        super::project_flow::announce_started(&self.services, &advance, self.depth + 1).await;
        Ok(json!({
            "project": advance.project.id,
            "revision": args.task,
            "restarted": advance.started.iter().map(|s| &s.task.id).collect::<Vec<_>>(),
            "dependents_already_started": outcome.started_dependents,
        })
        .to_string())
    }

    fn project_status(&self, arguments: &str) -> Result<String, String> {
        let args: ProjectArgs = parse(arguments)?;
        let projects = self.services.projects.projects();
        match args.project.filter(|id| !id.trim().is_empty()) {
            Some(id) => projects
                .get(&id)
                .map(|project| crate::projects::project_status_text(&project))
                .map_err(|error| format!("error: {error}")),
            None => projects
                .list()
                .map(|list| crate::projects::project_list_text(&list))
                .map_err(|error| format!("error: {error}")),
        }
    }
}

/// Records a task, writes its spec and mentions the Worker about it in the Worker's room.
pub async fn assign_task(
    services: &AgentServices,
    requester: &ruma::UserId,
    worker: &str,
    title: &str,
    spec: &str,
    depth: u32,
) -> Result<Task, String> {
    let worker = services
        .team
        .registry
        .get(worker)
        .map_err(|error| error.to_string())?
        .ok_or_else(|| format!("there is no worker named {worker}; create it first"))?;
    let room = worker.room.clone().ok_or_else(|| {
        format!(
            "{} has no room yet; create the worker again to give it one",
            worker.name
        )
    })?;
    let task = services
        .tasks
        .create(
            title,
            &worker.name,
            requester.to_owned(),
            Some(room.clone()),
            spec,
            crate::clock::now_ms(),
        )
        .await
        .map_err(|error| error.to_string())?;
    let message = OutgoingMessage::text(format!(
        "{}: new task **{}**: {}. The spec is in `tasks/{}/spec.md`; report progress on it and complete it with your task tools.",
        worker.user_id, task.id, task.title, task.id
    ))
    .mention(worker.user_id.clone(), worker.display_name.clone())
    .with_field(DEPTH_KEY, Value::from(depth + 1));
    services
        .client
        .send(
            &services.manager,
            &room,
            &format!("assign:{}", task.id),
            &message,
        )
        .await
        .map_err(|error| error.to_string())?;
    Ok(task)
}
