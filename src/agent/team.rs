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
}

/// The team service.
#[derive(Clone)]
pub struct Team {
    pub registry: Registry,
    client: MatrixClient,
}

/// The answer to a create request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    pub worker: Worker,
    /// False when a Worker of that name already existed (it is returned unchanged).
    pub created: bool,
}

impl Team {
    pub fn new(registry: Registry, client: MatrixClient) -> Self {
        Self { registry, client }
    }

    /// Creates a Worker (or returns the existing one): record, Matrix user, display name. Safe
    /// to repeat after a failure half-way: every step is idempotent.
    #[tracing::instrument(skip(self))]
    pub async fn create_worker(&self, name: &str, role: &str) -> Result<Created, TeamError> {
        let now = crate::appservice::inbox::now_ms();
        let (worker, created) = self.registry.create(name, role, now)?;
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
}

/// `/workers`: list (GET) and create (POST) for `crew workers`.
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
    match team.create_worker(&request.name, &request.role).await {
        Ok(created) => axum::Json(created).into_response(),
        Err(TeamError::Registry(error @ RegistryError::InvalidName(_))) => {
            crate::admin::error_response(StatusCode::BAD_REQUEST, error.to_string())
        }
        Err(error) => crate::admin::error_response(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}
