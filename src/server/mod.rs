//! `crew serve`: opens the state, starts the listeners, checks the homeserver, and runs the
//! event pump until asked to stop.
//!
//! Not for: domain decisions. Who wakes lives in [`crate::dispatch`], what agents do in
//! [`crate::agent`]; this module only wires them together and owns the tasks' lifetimes.

mod pump;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;

use ruma::{OwnedUserId, UserId};
use tokio_util::sync::CancellationToken;

use crate::agent::registry::Registry;
use crate::agent::team::Team;
use crate::appservice::inbox::Inbox;
use crate::appservice::{self, AppserviceState};
use crate::config::{Config, Loaded};
use crate::matrix::{MatrixClient, MatrixError};
use crate::registration::Registration;
use crate::rooms::Rooms;
use crate::store::{Store, StoreError};

pub use startup::StartupError;

/// Why `crew serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What every part of the running service shares.
pub struct Crew {
    pub config: Config,
    pub registration: Registration,
    pub client: MatrixClient,
    pub store: Store,
    pub inbox: Arc<Inbox>,
    pub rooms: Rooms,
    /// The Manager: the registration's `sender_localpart` user.
    pub manager: OwnedUserId,
    pub team: Arc<Team>,
}

impl Crew {
    /// Whether `user` is one of our puppets (the Manager or a Worker).
    pub fn is_ours(&self, user: &UserId) -> bool {
        self.registration
            .is_ours(user.as_str(), self.config.homeserver.server_name.as_str())
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        self.config.admins.iter().any(|admin| admin == user)
    }
}

/// Runs until `shutdown` is cancelled or a listener fails.
pub async fn serve(loaded: Loaded, shutdown: CancellationToken) -> Result<(), ServeError> {
    let Loaded {
        config,
        registration,
        ..
    } = loaded;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = Store::open(&config.database_dir())?;
    let inbox = Arc::new(Inbox::open(&store)?);
    let rooms = Rooms::open(&store)?;
    let manager = UserId::parse(format!(
        "@{}:{}",
        registration.sender_localpart, config.homeserver.server_name
    ))
    .map_err(|error| {
        StartupError::Config(format!(
            "sender_localpart makes an invalid user id: {error}"
        ))
    })?;
    let client = MatrixClient::new(config.homeserver.url.clone(), registration.as_token.clone());
    let registry = Registry::open(
        &store,
        &config.appservice.user_prefix,
        config.homeserver.server_name.as_str(),
    )?;
    let team = Arc::new(Team::new(registry, client.clone()));

    let (pings, ping_seen) = tokio::sync::watch::channel(None);
    let state = Arc::new(AppserviceState {
        hs_token: registration.hs_token.clone(),
        inbox: inbox.clone(),
        registration: registration.clone(),
        server_name: config.homeserver.server_name.to_string(),
        pings,
    });
    let appservice_listener = bind("appservice API", config.appservice.bind).await?;
    let admin_listener = bind("admin API", config.admin_api.bind).await?;
    let admin_token =
        crate::admin::load_or_create_token(&config.admin_token_path()).map_err(|source| {
            ServeError::DataDir {
                path: config.admin_token_path().display().to_string(),
                source,
            }
        })?;

    let crew = Arc::new(Crew {
        config,
        registration,
        client,
        store,
        inbox,
        rooms,
        manager,
        team: team.clone(),
    });

    let tasks = tokio_util::task::TaskTracker::new();
    let router = appservice::router(state, crew.config.appservice.max_transaction_bytes);
    let http_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(appservice_listener, router)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "appservice listener stopped");
        }
    });
    let admin_routes = axum::Router::new()
        .route(
            "/status",
            axum::routing::get(|| async { axum::Json(serde_json::json!({ "running": true })) }),
        )
        .nest("/workers", crate::agent::team::admin_router(team));
    tasks.spawn(crate::admin::serve(
        admin_listener,
        admin_token,
        admin_routes,
        shutdown.clone(),
    ));

    let checked = tokio::select! {
        checked = startup::check_homeserver(&crew, ping_seen) => checked,
        () = shutdown.cancelled() => return Ok(()),
    };
    if let Err(error) = checked {
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        return Err(error.into());
    }
    tracing::info!(
        manager = %crew.manager,
        appservice = %crew.config.appservice.bind,
        "crew is ready"
    );

    tasks.spawn(startup::ping_periodically(crew.clone(), shutdown.clone()));
    tasks.spawn(startup::greet_admins(crew.clone()));
    tasks.spawn(startup::refresh_rooms(crew.clone()));
    tasks.spawn(pump::run(crew.clone(), shutdown.clone()));

    shutdown.cancelled().await;
    tasks.close();
    tasks.wait().await;
    crew.store.flush().await?;
    Ok(())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Logs a homeserver error from a background task without stopping the service.
pub(crate) fn log_matrix_error(what: &str, error: &MatrixError) {
    tracing::warn!(%error, "{what}");
}
