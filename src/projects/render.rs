//! How a project reads to a person: `projects/<id>/plan.md` and the cost summary. Plain
//! functions of the record, so what the person sees is tested without storage.

use std::fmt::Write as _;

use crate::storage::{Storage, StorageError, StoragePath};

use super::ProjectError;
use super::plan::{PlanTask, PlanTaskState, Project, StartClaim, Usage};

/// Where a project's plan is kept in file storage.
pub fn plan_path(project_id: &str) -> Result<StoragePath, StorageError> {
    if project_id.is_empty() || project_id.contains(['/', '\\']) || project_id.starts_with('.') {
        return Err(StorageError::InvalidPath {
            path: project_id.to_owned(),
            reason: "a project id is one path segment".to_owned(),
        });
    }
    StoragePath::parse(&format!("projects/{project_id}/plan.md"))
}

/// Writes the project's `plan.md` (replacing the previous one). Call after every change that
/// the person should see; the record in sled stays the source of truth.
pub async fn write_plan(storage: &Storage, project: &Project) -> Result<StoragePath, StorageError> {
    let path = plan_path(&project.id)?;
    storage
        .put_bytes(&path, plan_markdown(project).into_bytes())
        .await?;
    Ok(path)
}

/// The plan as Markdown: heading, who asked, phase, waves, then one section per task with
/// owner, dependencies, state, result and acceptance notes. Rewritten on every change.
pub fn plan_markdown(project: &Project) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}: {}\n", project.id, project.title);
    let _ = writeln!(out, "- Asked by: {}", project.requester);
    let _ = writeln!(out, "- Status: {}", project.phase);
    let waves = project.waves();
    if !waves.is_empty() {
        let _ = writeln!(out, "\n## Order of work\n");
        for (number, wave) in waves.iter().enumerate() {
            let _ = writeln!(out, "{}. {}", number + 1, wave.join(", "));
        }
    }
    let _ = writeln!(out, "\n## Tasks");
    for task in &project.tasks {
        write_task(&mut out, task);
    }
    if project
        .tasks
        .iter()
        .any(|task| task.usage != Usage::default())
    {
        let _ = writeln!(out, "\n## Cost\n");
        out.push_str(&cost_summary_text(project));
    }
    out
}

fn write_task(out: &mut String, task: &PlanTask) {
    let _ = writeln!(out, "\n### {}: {}\n", task.key, task.title);
    let _ = writeln!(out, "- Owner: {}", task.owner);
    let depends = if task.depends_on.is_empty() {
        "nothing".to_owned()
    } else {
        task.depends_on.join(", ")
    };
    let _ = writeln!(out, "- Depends on: {depends}");
    let _ = write!(out, "- State: {}", task.state);
    if let Some(task_id) = &task.task_id {
        let _ = write!(out, " (task {task_id})");
    }
    out.push('\n');
    if let Some(path) = &task.result_path {
        let _ = writeln!(out, "- Result: `{path}`");
    }
    if let Some(reason) = &task.revision_reason {
        let _ = writeln!(out, "- Revision asked: {}", one_line(reason));
    }
    if let Some(question) = &task.blocked_question {
        let _ = writeln!(out, "- Waiting for an answer: {}", one_line(question));
    }
    if !task.acceptance.is_empty() {
        let _ = writeln!(out, "\nDone when: {}", task.acceptance);
    }
}

/// Text that came from a person or a model kept on its line of the list.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Tokens and requests per task and in total, one line each, for the completion summary.
pub fn cost_summary_text(project: &Project) -> String {
    let cost = project.cost();
    let mut out = String::new();
    for (key, usage) in &cost.per_task {
        let _ = writeln!(out, "- {key}: {}", usage_text(usage));
    }
    let _ = writeln!(out, "- total: {}", usage_text(&cost.total));
    out
}

fn usage_text(usage: &Usage) -> String {
    format!(
        "{} tokens ({} in, {} out) in {} request{}",
        usage.total_tokens(),
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.requests,
        if usage.requests == 1 { "" } else { "s" }
    )
}

/// The spec of one start of a project task, for the Worker's task: what the project is, the
/// acceptance notes, the results it builds on (by path: the Worker reads them, nothing is
/// pasted) and, for a revision, why the last result went back. Returns the task title and body.
pub fn start_spec(project: &Project, claim: &StartClaim) -> Result<(String, String), ProjectError> {
    let task = project.task(&claim.key)?;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "Part `{}` of project {} \"{}\" (plan: `{}`).",
        task.key,
        project.id,
        project.title,
        plan_path(&project.id)
            .map(|path| path.as_str().to_owned())
            .unwrap_or_default()
    );
    if !task.acceptance.is_empty() {
        let _ = writeln!(body, "\nDone when: {}", task.acceptance);
    }
    if !claim.inputs.is_empty() {
        let _ = writeln!(body, "\nBuild on the results of:");
        for input in &claim.inputs {
            match &input.result_path {
                Some(path) => {
                    let _ = writeln!(body, "- {} ({}): `{path}`", input.key, input.title);
                }
                None => {
                    let _ = writeln!(body, "- {} ({}): no result file", input.key, input.title);
                }
            }
        }
    }
    if let Some(reason) = &claim.revision_reason {
        let _ = writeln!(
            body,
            "\nThis is revision {} of this part. The last result was sent back because: {}",
            claim.start.saturating_sub(1),
            one_line(reason)
        );
    }
    let suffix = if claim.start > 1 {
        format!(" (revision {})", claim.start - 1)
    } else {
        String::new()
    };
    let base: String = task
        .title
        .chars()
        .take(super::plan::MAX_TITLE_CHARS.saturating_sub(suffix.chars().count()))
        .collect();
    Ok((format!("{base}{suffix}"), body))
}

/// One line per project for `!crew projects`: id, phase, title and how many tasks are done.
pub fn project_list_text(projects: &[Project]) -> String {
    if projects.is_empty() {
        return "No projects yet.".to_owned();
    }
    let mut out = String::new();
    for project in projects {
        let done = project
            .tasks
            .iter()
            .filter(|task| task.state == PlanTaskState::Done)
            .count();
        let _ = writeln!(
            out,
            "- {} ({}): {} — {done}/{} tasks done",
            project.id,
            project.phase,
            project.title,
            project.tasks.len()
        );
    }
    out
}

/// One project for `!crew project <id>`: each task with owner, state and what it waits for.
pub fn project_status_text(project: &Project) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} ({}): {}", project.id, project.phase, project.title);
    for task in &project.tasks {
        let _ = write!(
            out,
            "- {} [{}] {}: {}",
            task.key, task.state, task.owner, task.title
        );
        let waiting: Vec<&str> = task
            .depends_on
            .iter()
            .filter(|dep| {
                project
                    .task(dep)
                    .map(|dep| dep.state != PlanTaskState::Done)
                    .unwrap_or(true)
            })
            .map(String::as_str)
            .collect();
        if task.state.awaits_start() && !waiting.is_empty() {
            let _ = write!(out, " — waits for {}", waiting.join(", "));
        }
        if let Some(task_id) = &task.task_id {
            let _ = write!(out, " ({task_id})");
        }
        out.push('\n');
    }
    out
}
