//! What agents' tools act on: the services of the running crew that a turn may use.
//!
//! The tools live in [`crate::agent`], the wiring in [`crate::server`]; this struct is the seam
//! between them, so a tool never reaches into the server's internals (the dispatcher, the wake
//! queue) and the server never knows what a tool does.

use std::sync::Arc;

use ruma::{OwnedUserId, UserId};

use super::team::Team;
use crate::matrix::MatrixClient;
use crate::storage::Storage;
use crate::storage::links::Links;
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
    pub manager_name: String,
    /// People who may change the team (stop, remove, re-role Workers; cancel tasks).
    pub admins: Vec<OwnedUserId>,
}

impl AgentServices {
    pub fn is_admin(&self, user: &UserId) -> bool {
        self.admins.iter().any(|admin| admin == user)
    }
}
