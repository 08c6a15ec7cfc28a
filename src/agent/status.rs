//! What everyone is doing: each Worker's state (working, idle, stopped, removed), its open tasks
//! and when it last finished a turn. `!crew workers` renders it; the Manager's `list_workers`
//! tool returns it as JSON, so "what is everyone doing?" has one answer either way.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::registry::{Registry, RegistryError, Worker, WorkerState};
use crate::store::{Store, StoreError, Tree};
use crate::tasks::{TaskFilter, Tasks};

/// When each agent last finished a turn (sled tree `agent_activity`, by user id). Kept apart
/// from the roster so a turn does not count as a roster change.
#[derive(Clone)]
pub struct Activity {
    last_turn: Tree<String, u64>,
}

impl Activity {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            last_turn: store.tree("agent_activity")?,
        })
    }

    /// Records that `agent` finished a turn at `now_ms`.
    pub fn touch(&self, agent: &UserId, now_ms: u64) {
        if let Err(error) = self.last_turn.insert(&agent.to_string(), &now_ms) {
            tracing::warn!(%error, "cannot record agent activity");
        }
    }

    pub fn last(&self, agent: &UserId) -> Option<u64> {
        self.last_turn.get(&agent.to_string()).ok().flatten()
    }
}

/// Agents whose turn is running right now, shared by the turn runner and the status.
pub type Busy = Arc<Mutex<HashSet<OwnedUserId>>>;

/// One open task, as the status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenTask {
    pub id: String,
    pub title: String,
    pub state: String,
}

/// One Worker's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub user_id: OwnedUserId,
    pub display_name: String,
    pub role: String,
    pub model: Option<String>,
    /// `working`, `idle`, `stopped` or `removed`.
    pub state: String,
    pub open_tasks: Vec<OpenTask>,
    pub last_active_ms: Option<u64>,
}

/// Every Worker's status, in roster order.
pub fn team_status(
    registry: &Registry,
    tasks: &Tasks,
    activity: &Activity,
    busy: &Busy,
) -> Result<Vec<WorkerStatus>, RegistryError> {
    let open = tasks.list(&TaskFilter::open()).unwrap_or_default();
    let busy = busy
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    Ok(registry
        .list()?
        .into_iter()
        .map(|worker: Worker| WorkerStatus {
            state: match worker.state {
                WorkerState::Active if busy.contains(&worker.user_id) => "working",
                WorkerState::Active => "idle",
                WorkerState::Stopped => "stopped",
                WorkerState::Removed => "removed",
            }
            .to_owned(),
            open_tasks: open
                .iter()
                .filter(|task| task.assignee == worker.name)
                .map(|task| OpenTask {
                    id: task.id.clone(),
                    title: task.title.clone(),
                    state: task.state.as_str().to_owned(),
                })
                .collect(),
            last_active_ms: activity.last(&worker.user_id),
            name: worker.name,
            user_id: worker.user_id,
            display_name: worker.display_name,
            role: worker.role,
            model: worker.model,
        })
        .collect())
}

/// `!crew workers`: one line per Worker.
pub fn render(statuses: &[WorkerStatus], now_ms: u64) -> String {
    if statuses.is_empty() {
        return "No workers yet. Ask me to create one: \"create a worker named alice for frontend\"."
            .to_owned();
    }
    let mut out = String::from("Workers:\n");
    for status in statuses {
        let role = if status.role.is_empty() {
            String::new()
        } else {
            format!(" ({})", status.role)
        };
        out.push_str(&format!(
            "- **{}** {}{}: {}",
            status.display_name, status.user_id, role, status.state
        ));
        if !status.open_tasks.is_empty() {
            let tasks: Vec<String> = status
                .open_tasks
                .iter()
                .map(|task| format!("{} {} ({})", task.id, task.title, task.state))
                .collect();
            out.push_str(&format!("; tasks: {}", tasks.join(", ")));
        }
        if let Some(last) = status.last_active_ms {
            out.push_str(&format!(
                "; last active {}",
                ago(now_ms.saturating_sub(last))
            ));
        }
        out.push('\n');
    }
    out
}

/// "just now", "5 min ago", "3 h ago", "2 days ago".
fn ago(elapsed_ms: u64) -> String {
    let minutes = elapsed_ms / 60_000;
    match minutes {
        0 => "just now".to_owned(),
        1..=59 => format!("{minutes} min ago"),
        60..=2879 => format!("{} h ago", minutes / 60),
        _ => format!("{} days ago", minutes / 1440),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_render_tasks_and_activity() {
        let status = WorkerStatus {
            name: "alice".into(),
            user_id: UserId::parse("@crew_alice:example.org").unwrap(),
            display_name: "Alice".into(),
            role: "frontend".into(),
            model: None,
            state: "working".into(),
            open_tasks: vec![OpenTask {
                id: "t-3".into(),
                title: "Login page".into(),
                state: "in_progress".into(),
            }],
            last_active_ms: Some(1_000),
        };
        assert_eq!(
            render(&[status], 1_000 + 5 * 60_000),
            "Workers:\n- **Alice** @crew_alice:example.org (frontend): working; tasks: t-3 Login page (in_progress); last active 5 min ago\n"
        );
        assert!(render(&[], 0).starts_with("No workers yet"));
        assert_eq!(ago(3 * 3_600_000), "3 h ago");
        assert_eq!(ago(3 * 86_400_000), "3 days ago");
    }
}
