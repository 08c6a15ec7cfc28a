//! Creating and listing Workers: the one place that provisions a Worker's Matrix user, used by
//! the Manager's tools and by the operator's `crew workers` command alike.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::registry::{Registry, RegistryError, Worker};
use crate::matrix::{MatrixClient, MatrixError};

/// Why a Worker could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum TeamError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The homeserver refused to create or name the Worker's user.
    #[error("the homeserver refused to set up the worker's account: {0}")]
    Matrix(#[from] MatrixError),
    /// The gateway could not issue the Worker's consumer token.
    #[error("the credential gateway could not issue the worker's token: {0}")]
    Gateway(#[from] crate::gateway::GatewayError),
}

/// The team service.
#[derive(Clone)]
pub struct Team {
    pub registry: Registry,
    client: MatrixClient,
    gateway: Arc<crate::gateway::Gateway>,
    manager: ruma::OwnedUserId,
    /// Removing a Worker removes its sandbox.
    sandboxes: Option<Arc<crate::sandbox::Sandboxes>>,
    /// `limits.max_workers`: no path (Manager, CLI, admin API) creates a Worker past it.
    max_workers: usize,
    /// A Worker's room is created once, even when the answer to createRoom is lost.
    rooms: Option<crate::outbox::RoomsCreatedOnce>,
}

impl Team {
    /// A room the Manager creates once under `key`: created by the outbox's record of created
    /// rooms where there is one, so a crash or a lost answer never makes a second room.
    pub async fn create_room_once(
        &self,
        create: crate::matrix::CreateRoom,
        key: &str,
    ) -> Result<ruma::OwnedRoomId, TeamError> {
        match &self.rooms {
            Some(rooms) => rooms
                .create(&self.client, &self.manager, create, key)
                .await
                .map_err(|error| match error {
                    crate::outbox::CreateOnceError::Matrix(error) => TeamError::Matrix(error),
                    crate::outbox::CreateOnceError::Store(error) => {
                        TeamError::Registry(error.into())
                    }
                }),
            None => Ok(self.client.create_room(&self.manager, &create).await?),
        }
    }
}

/// The answer to a create request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    pub worker: Worker,
    /// False when a Worker of that name already existed (it is returned unchanged).
    pub created: bool,
}

impl Team {
    pub fn new(
        registry: Registry,
        client: MatrixClient,
        gateway: Arc<crate::gateway::Gateway>,
        manager: ruma::OwnedUserId,
    ) -> Self {
        Self {
            registry,
            client,
            gateway,
            manager,
            sandboxes: None,
            max_workers: usize::MAX,
            rooms: None,
        }
    }

    /// The most Workers the crew may have (`limits.max_workers`).
    pub fn with_max_workers(mut self, max_workers: usize) -> Self {
        self.max_workers = max_workers;
        self
    }

    /// The sandboxes to remove a Worker's container from when it is removed.
    pub fn with_sandboxes(mut self, sandboxes: Arc<crate::sandbox::Sandboxes>) -> Self {
        self.sandboxes = Some(sandboxes);
        self
    }

    /// Creates Workers' rooms through `rooms`: never a second room for one Worker.
    pub fn with_rooms_created_once(mut self, rooms: crate::outbox::RoomsCreatedOnce) -> Self {
        self.rooms = Some(rooms);
        self
    }

    /// Removes a Worker: its gateway token stops working on the next request, it leaves every
    /// room, and it wakes for nothing. Its record, files and history stay.
    #[tracing::instrument(skip(self))]
    pub async fn remove(&self, name: &str) -> Result<Worker, TeamError> {
        let worker = self.registry.update(name, |worker| {
            worker.state = super::registry::WorkerState::Removed
        })?;
        match self.gateway.revoke(worker.user_id.localpart()).await {
            Ok(_) | Err(crate::gateway::GatewayError::UnknownConsumer(_)) => {}
            Err(error) => return Err(error.into()),
        }
        // Its container goes now; if Docker is down, the sandboxes' housekeeping removes it
        // once Docker is back.
        if let Some(sandboxes) = &self.sandboxes
            && let Err(error) = sandboxes.remove(name).await
        {
            tracing::warn!(%error, worker = name, "cannot remove the Worker's sandbox yet");
        }
        for room in self.client.joined_rooms(&worker.user_id).await? {
            self.client
                .leave(&worker.user_id, &room, Some("removed from the crew"))
                .await?;
        }
        Ok(worker)
    }

    /// Everything a new Worker needs, for the person who asked: its account, its consumer token
    /// in the gateway, and its room "Worker: <Name>" with the person invited and the Worker
    /// below the people and the Manager in power. Repeating it (a retry, or the same name asked
    /// twice) completes what is missing and returns the existing Worker: never a second room.
    #[tracing::instrument(skip(self))]
    pub async fn provision(
        &self,
        name: &str,
        role: &str,
        requester: &ruma::UserId,
    ) -> Result<Created, TeamError> {
        let mut created = self.create_worker(name, role).await?;
        self.gateway
            .consumer_token(created.worker.user_id.localpart())
            .await?;
        if created.worker.room.is_none() {
            let worker = created.worker.clone();
            let worker = &worker;
            let mut power_levels = std::collections::BTreeMap::new();
            power_levels.insert(requester.to_owned(), 100);
            power_levels.insert(worker.user_id.clone(), 10);
            let create = crate::matrix::CreateRoom {
                name: Some(format!("Worker: {}", worker.display_name)),
                topic: Some(if worker.role.is_empty() {
                    format!("{} works here", worker.display_name)
                } else {
                    worker.role.clone()
                }),
                invite: vec![requester.to_owned(), worker.user_id.clone()],
                is_direct: false,
                power_levels,
                ..Default::default()
            };
            // Keyed by the Worker's creation, so a Worker made again under the same name gets a
            // room of its own.
            let key = format!("worker-room:{}:{}", worker.name, worker.created_ms);
            let room = self.create_room_once(create, &key).await?;
            self.client.join(&worker.user_id, &room).await?;
            created.worker = self.registry.update(&worker.name, |worker| {
                worker.room = Some(room.clone());
            })?;
            // A notice: it introduces the Worker without waking it.
            let welcome = crate::matrix::OutgoingMessage::notice(format!(
                "Welcome, {}! {}\n{}: this is {}'s room. Mention {} here to give it work (it wakes only when mentioned), or ask me to assign it a task.",
                worker.display_name,
                if worker.role.is_empty() {
                    String::new()
                } else {
                    format!("Your role: {}.", worker.role)
                },
                requester,
                worker.display_name,
                worker.display_name,
            ))
            .mention(requester.to_owned(), requester.localpart());
            if let Err(error) = self
                .client
                .send(
                    &self.manager,
                    &room,
                    &format!("welcome:{}", worker.name),
                    &welcome,
                )
                .await
            {
                tracing::warn!(%error, "cannot welcome a new Worker");
            }
        }
        Ok(created)
    }

    /// Creates a Worker (or returns the existing one): record, Matrix user, display name. Safe
    /// to repeat after a failure half-way: every step is idempotent.
    #[tracing::instrument(skip(self))]
    pub async fn create_worker(&self, name: &str, role: &str) -> Result<Created, TeamError> {
        let now = crate::clock::now_ms();
        self.registry.check_cap(name, self.max_workers)?;
        let (worker, created) = self.registry.create(name, role, now)?;
        self.gateway
            .consumer_token(worker.user_id.localpart())
            .await?;
        self.client.register(worker.user_id.localpart()).await?;
        let current = self.client.display_name(&worker.user_id).await?;
        if current.as_deref() != Some(worker.display_name.as_str()) {
            self.client
                .set_display_name(&worker.user_id, &worker.display_name)
                .await?;
        }
        Ok(Created { worker, created })
    }
}

#[derive(Debug, Deserialize)]
struct CreateRequest {
    name: String,
    #[serde(default)]
    role: String,
    /// The person to invite: when given, the Worker is provisioned in full, as the Manager's
    /// create_worker tool does it (its room "Worker: <Name>" with this person invited).
    #[serde(default)]
    invite: Option<ruma::OwnedUserId>,
}

/// `/workers`: list (GET) and create (POST, with `invite` to also make the Worker's room) for
/// `crew workers`.
pub fn admin_router(team: Arc<Team>) -> axum::Router {
    axum::Router::new()
        .route("/", get(list).post(create))
        .with_state(team)
}

async fn list(State(team): State<Arc<Team>>) -> Response {
    match team.registry.list() {
        Ok(workers) => axum::Json(workers).into_response(),
        Err(error) => {
            crate::admin::error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
    }
}

async fn create(
    State(team): State<Arc<Team>>,
    axum::Json(request): axum::Json<CreateRequest>,
) -> Response {
    let created = match &request.invite {
        Some(requester) => {
            team.provision(&request.name, &request.role, requester)
                .await
        }
        None => team.create_worker(&request.name, &request.role).await,
    };
    match created {
        Ok(created) => axum::Json(created).into_response(),
        Err(TeamError::Registry(
            error @ (RegistryError::InvalidName(_) | RegistryError::Reserved(_)),
        )) => crate::admin::error_response(StatusCode::BAD_REQUEST, error.to_string()),
        Err(TeamError::Registry(error @ RegistryError::WorkerCap { .. })) => {
            crate::admin::error_response(StatusCode::CONFLICT, error.to_string())
        }
        Err(error) => crate::admin::error_response(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}
