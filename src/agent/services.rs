//! What agents' tools act on: the services of the running crew that a turn may use.
//!
//! The tools live in [`crate::agent`], the wiring in [`crate::server`]; this struct is the seam
//! between them, so a tool never reaches into the server's internals (the dispatcher, the wake
//! queue) and the server never knows what a tool does.

use std::sync::Arc;

use ruma::{OwnedUserId, UserId};

use super::manager::ManagerProfile;
use super::status::{Activity, Busy};
use super::team::Team;
use crate::matrix::MatrixClient;
use crate::storage::Storage;
use crate::storage::links::Links;
use crate::store::Tree;
use crate::tasks::Tasks;

/// The services a turn's tools use. Cheap to share: everything inside is a handle.
pub struct AgentServices {
    pub client: MatrixClient,
    pub team: Arc<Team>,
    pub tasks: Tasks,
    pub storage: Storage,
    pub links: Links,
    /// The Manager: the appservice's own user.
    pub manager: OwnedUserId,
    /// The Manager's configured display name (`appservice.manager_display_name`); onboarding
    /// may give it another (see [`AgentServices::manager_name`]).
    pub default_manager_name: String,
    /// People who may change the team (stop, remove, re-role Workers; cancel tasks).
    pub admins: Vec<OwnedUserId>,
    /// When each agent last finished a turn.
    pub activity: Activity,
    /// Agents whose turn is running.
    pub busy: Busy,
    /// The Manager's name, style and language, as the admin set them in onboarding.
    pub manager_profile: Tree<String, ManagerProfile>,
    /// The credential gateway: Workers' consumer tokens and routes (`http_request`).
    pub gateway: Arc<crate::gateway::Gateway>,
    /// The gateway route agents think with (`llm.route`): every Worker keeps it.
    pub llm_route: String,
    /// Workers' Docker sandboxes (`run_command`).
    pub sandboxes: Arc<crate::sandbox::Sandboxes>,
    /// Besides the admins, who may talk to the agents (and so whose turns act for them).
    pub allowed: crate::config::InvitePolicy,
    /// What agents may spend, whatever a prompt says.
    pub limits: super::authority::SpendingLimits,
    /// Projects: plans and the driver that starts their tasks.
    pub projects: crate::projects::ProjectDriver,
    /// Wakes crew queues itself (a project task done, blocked, ready).
    pub internal: super::project_flow::InternalWakes,
    /// Whether a proposed project starts without the person's confirmation
    /// (`tasks.projects_start_without_confirmation`, set by an admin).
    pub projects_auto_start: bool,
}

impl AgentServices {
    pub fn is_admin(&self, user: &UserId) -> bool {
        self.admins.iter().any(|admin| admin == user)
    }

    /// The Manager's display name: the one the admin gave it, else the configured one.
    pub fn manager_name(&self) -> String {
        self.manager_profile()
            .and_then(|profile| profile.name)
            .unwrap_or_else(|| self.default_manager_name.clone())
    }

    /// The Manager's profile, once onboarding set one.
    pub fn manager_profile(&self) -> Option<ManagerProfile> {
        self.manager_profile
            .get(&ManagerProfile::KEY.to_owned())
            .ok()
            .flatten()
    }
}
