//! `crew serve`: opens the state, starts the listeners, checks the homeserver, and runs the
//! event pump until asked to stop.
//!
//! Not for: domain decisions. Who wakes lives in [`crate::dispatch`], what agents do in
//! [`crate::agent`]; this module only wires them together and owns the tasks' lifetimes.

mod admin_routes;
mod backlog;
mod heartbeat;
mod housekeeping;
mod outbox_runner;
pub(crate) mod pump;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;

use ruma::{OwnedUserId, UserId};
use tokio_util::sync::CancellationToken;

use crate::agent::registry::Registry;
use crate::agent::team::Team;
use crate::appservice::inbox::{BacklogLimit, Inbox};
use crate::appservice::{self, AppserviceState};
use crate::config::{Config, Loaded};
use crate::dispatch::DispatchService;
use crate::dispatch::queue::WakeQueue;
use crate::dispatch::service::DispatchServiceError;
use crate::matrix::{MatrixClient, MatrixError};
use crate::registration::Registration;
use crate::store::Tree;
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
    /// A listener stopped while crew was running.
    #[error("the {what} listener failed: {source}")]
    Listener {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("file storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("tasks: {0}")]
    Tasks(#[from] crate::tasks::TaskError),
    /// The encryption layer could not start (its store does not match the homeserver's device).
    #[error("encryption: {0}")]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What every part of the running service shares.
pub struct Service {
    pub config: Config,
    pub registration: Registration,
    /// The registration's users, compiled once (`Service::is_ours` is asked per event).
    our_users: crate::registration::OurUsers,
    pub client: MatrixClient,
    pub store: Store,
    pub inbox: Arc<Inbox>,
    /// The Manager: the registration's `sender_localpart` user.
    pub manager: OwnedUserId,
    pub team: Arc<Team>,
    /// The credential gateway; agents get their consumer tokens from it.
    pub gateway: Arc<crate::gateway::Gateway>,
    /// Shared files (local directory or S3) and the signed links to them.
    pub storage: crate::storage::Storage,
    pub links: crate::storage::links::Links,
    /// Task records, their folders, and the heartbeat's bookkeeping.
    pub tasks: crate::tasks::Tasks,
    /// What agents' tools act on (the same services, handed to the agent module).
    pub agents: Arc<crate::agent::services::AgentServices>,
    /// Turn steps, so a turn re-run after a crash replays instead of repeating.
    pub journal: crate::agent::journal::TurnJournal,
    /// Who wakes: the dispatcher's state (roster, rooms, conversations, history, kept
    /// decisions), read by the pump and the turns alike.
    pub dispatch: DispatchService,
    pub queue: WakeQueue,
    /// What the pump decided to do on the homeserver, performed by `outbox_runner`.
    pub outbox: crate::outbox::Outbox,
    draining: outbox_runner::Draining,
    /// Agents whose turn loop is running (one turn per agent at a time).
    pub(crate) running: crate::agent::status::Busy,
    /// Turns run per agent since start, for the admin API and tests.
    pub turns: std::sync::Mutex<std::collections::BTreeMap<OwnedUserId, u64>>,
    /// Who gets `!crew` answered, and how often per room.
    commands: crate::agent::commands::CommandGate,
    background: tokio_util::task::TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

impl Service {
    /// Whether `user` is one of our puppets (the Manager or a Worker).
    pub fn is_ours(&self, user: &UserId) -> bool {
        self.our_users.contains(user.as_str())
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        self.config.admins.iter().any(|admin| admin == user)
    }

    /// Starts `agent`'s turn loop unless it is already running; the loop takes every pending
    /// wake, so wakes that arrive during a turn are coalesced into the next one.
    pub fn wake_agent(self: &Arc<Self>, agent: OwnedUserId) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if running.insert(agent.clone()) {
            self.background
                .spawn(crate::agent::runner::drive(self.clone(), agent));
        }
    }

    /// Whether `agent`'s turn loop is running.
    pub fn is_busy(&self, agent: &UserId) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(agent)
    }

    /// The gateway URL of the configured LLM route, when there is one.
    pub fn llm_base_url(&self) -> Option<url::Url> {
        self.config.gateway.route_url(&self.config.llm.route)
    }
}

/// The dispatcher's view of our agents: the Manager and every active Worker.
pub(crate) fn dispatch_roster(
    config: &Config,
    manager: &UserId,
    manager_name: String,
    team: &Team,
) -> Result<crate::dispatch::Roster, String> {
    team.registry.dispatch_roster(
        manager,
        manager_name,
        &config.admins,
        &config.invites,
        &config.dispatch,
    )
}

/// What [`open`] gives `serve`: the service, and what the appservice API and the start-up
/// check share with it.
pub(crate) struct Opened {
    pub crew: Arc<Service>,
    state: Arc<AppserviceState>,
    ping_seen: tokio::sync::watch::Receiver<Option<String>>,
    /// The project flow's internal wakes, recorded for `!crew why` by a task of `serve`.
    internal_receiver:
        tokio::sync::mpsc::UnboundedReceiver<crate::agent::project_flow::QueuedInternal>,
}

/// Opens everything the running service shares (database, roster, dispatcher, gateway,
/// storage…) without binding a socket or calling the homeserver, so the pump and the outbox can
/// be driven over a temporary directory in tests.
pub(crate) async fn open(
    loaded: Loaded,
    shutdown: CancellationToken,
) -> Result<Opened, ServeError> {
    let Loaded {
        config,
        registration,
        ..
    } = loaded;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = Store::open_with(&config.database_dir(), &config.database)?;
    let inbox = Arc::new(Inbox::open(&store)?.with_backlog_limit(BacklogLimit {
        // 0 would hold every answer for the whole wait: one event is the least that means
        // "no backlog".
        events: config.appservice.backlog_events.max(1),
        ..BacklogLimit::default()
    }));
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
    let gateway =
        crate::gateway::Gateway::new(config.gateway.clone(), store.clone(), &config.data_dir)?;
    let env = |name: &str| std::env::var(name).ok();
    let storage = crate::storage::Storage::open(&config.storage, &config.data_dir, env).await?;
    let sandboxes = Arc::new(crate::sandbox::Sandboxes::new(
        config.sandbox.clone(),
        storage.clone(),
        &config.data_dir,
    ));
    let team = Arc::new(
        Team::new(registry, client.clone(), gateway.clone(), manager.clone())
            .with_sandboxes(sandboxes.clone())
            .with_max_workers(config.limits.max_workers)
            .with_rooms_created_once(crate::outbox::RoomsCreatedOnce::open(&store)?),
    );
    let manager_profile: Tree<String, crate::agent::manager::ManagerProfile> =
        store.tree("manager_profile")?;
    let manager_name = manager_profile
        .get(&crate::agent::manager::ManagerProfile::KEY.to_owned())?
        .and_then(|profile| profile.name)
        .unwrap_or_else(|| config.appservice.manager_display_name.clone());
    let roster =
        dispatch_roster(&config, &manager, manager_name, &team).map_err(StartupError::Config)?;
    let roster_generation = team.registry.generation();
    let mut dispatch_config = config.dispatch.clone();
    dispatch_config.read_encrypted = config.encryption.enabled;
    let our_users = registration.our_users(config.homeserver.server_name.as_str());
    let is_ours = {
        let our_users = our_users.clone();
        Box::new(move |user: &UserId| our_users.contains(user.as_str()))
    };
    let dispatch =
        DispatchService::open(&store, dispatch_config, roster, roster_generation, is_ours)
            .map_err(|error| match error {
                DispatchServiceError::Store(error) => ServeError::Store(error),
                DispatchServiceError::Config(error) => {
                    StartupError::Config(error.to_string()).into()
                }
            })?;
    let queue = WakeQueue::open(&store)?;
    let outbox = crate::outbox::Outbox::open(&store)?;

    let (pings, ping_seen) = tokio::sync::watch::channel(None);
    let state = Arc::new(AppserviceState {
        hs_token: registration.hs_token.clone(),
        inbox: inbox.clone(),
        registration: registration.clone(),
        server_name: config.homeserver.server_name.to_string(),
        pings,
        crypto: config.encryption.enabled.then(std::sync::OnceLock::new),
    });
    let links = crate::storage::links::Links::open(&config.storage, &config.data_dir, env)?;
    let tasks = crate::tasks::Tasks::open(&store, storage.clone(), &config.tasks)?;
    let busy = crate::agent::status::Busy::default();
    let projects = crate::projects::Projects::open(&store).map_err(|error| {
        StartupError::Config(format!("cannot open the project records: {error}"))
    })?;
    let (internal_sender, internal_receiver) = tokio::sync::mpsc::unbounded_channel();
    let internal = crate::agent::project_flow::InternalWakes::open(
        &store,
        config.dispatch.max_depth,
        config.tasks.project_task_continuations,
        internal_sender,
    )?;
    let agents = Arc::new(crate::agent::services::AgentServices {
        client: client.clone(),
        team: team.clone(),
        tasks: tasks.clone(),
        storage: storage.clone(),
        links: links.clone(),
        manager: manager.clone(),
        default_manager_name: config.appservice.manager_display_name.clone(),
        admins: config.admins.clone(),
        activity: crate::agent::status::Activity::open(&store)?,
        busy: busy.clone(),
        manager_profile,
        gateway: gateway.clone(),
        llm_route: config.llm.route.clone(),
        sandboxes: sandboxes.clone(),
        allowed: config.invites.clone(),
        limits: config.limits.clone(),
        projects: crate::projects::ProjectDriver::new(projects, tasks.clone(), storage.clone()),
        internal,
        projects_auto_start: config.tasks.projects_start_without_confirmation,
    });
    let journal = crate::agent::journal::TurnJournal::open(&store)?;
    let background = tokio_util::task::TaskTracker::new();
    let commands = crate::agent::commands::CommandGate::new(config.dispatch.agent_wakes_per_minute);
    let crew = Arc::new(Service {
        config,
        registration,
        our_users,
        client,
        store,
        inbox,
        manager,
        team: team.clone(),
        gateway: gateway.clone(),
        storage: storage.clone(),
        links: links.clone(),
        tasks,
        agents,
        journal,
        dispatch,
        queue,
        outbox,
        draining: Default::default(),
        running: busy,
        turns: Default::default(),
        commands,
        background: background.clone(),
        shutdown: shutdown.clone(),
    });

    Ok(Opened {
        crew,
        state,
        ping_seen,
        internal_receiver,
    })
}

/// Runs until `shutdown` is cancelled or a listener fails.
pub async fn serve(mut loaded: Loaded, shutdown: CancellationToken) -> Result<(), ServeError> {
    // Bound before the services open, and the config given the bound addresses: a configured
    // port may be 0 (any free one), and what the services hand out (the gateway's route URLs
    // for agents) must name the port actually bound.
    let (appservice_listener, appservice_addr) =
        bind("appservice API", loaded.config.appservice.bind).await?;
    let (gateway_listener, gateway_addr) =
        bind("credential gateway", loaded.config.gateway.bind).await?;
    let (admin_listener, admin_addr) = bind("admin API", loaded.config.admin_api.bind).await?;
    loaded.config.appservice.bind = appservice_addr;
    loaded.config.gateway.bind = gateway_addr;
    loaded.config.admin_api.bind = admin_addr;
    let Opened {
        crew,
        state,
        ping_seen,
        internal_receiver,
    } = open(loaded, shutdown.clone()).await?;
    let config = &crew.config;
    // The bound addresses, for the CLI, scripts and tests (`admin.addr`, `gateway.addr`,
    // `appservice.addr` in the data directory).
    for (path, addr) in [
        (config.admin_addr_path(), config.admin_api.bind),
        (config.gateway_addr_path(), config.gateway.bind),
        (config.appservice_addr_path(), config.appservice.bind),
    ] {
        std::fs::write(&path, addr.to_string()).map_err(|source| ServeError::DataDir {
            path: path.display().to_string(),
            source,
        })?;
    }
    let admin_token =
        crate::admin::load_or_create_token(&config.admin_token_path()).map_err(|source| {
            ServeError::DataDir {
                path: config.admin_token_path().display().to_string(),
                source,
            }
        })?;
    let background = crew.background.clone();
    let team = crew.team.clone();
    let gateway = crew.gateway.clone();
    let storage = crew.storage.clone();
    let links = crew.links.clone();
    let sandboxes = crew.agents.sandboxes.clone();

    // Signed file links are served next to the appservice API (under /files/), at the address
    // `storage.public_base_url` points to.
    let appservice_state = state.clone();
    let router = appservice::router(state, crew.config.appservice.max_transaction_bytes)
        .merge(crate::storage::links::links_router(storage.clone(), links));
    let failed = ListenerFailure::default();
    let http_shutdown = shutdown.clone();
    background.spawn(failed.watch(
        "appservice API",
        async move {
            axum::serve(appservice_listener, router)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await
        },
        shutdown.clone(),
    ));
    let status_sandboxes = sandboxes.clone();
    let admin_routes = axum::Router::new()
        .route(
            "/status",
            axum::routing::get(move || {
                let sandboxes = status_sandboxes.clone();
                async move {
                    axum::Json(
                        serde_json::json!({ "running": true, "sandbox": sandboxes.status().await }),
                    )
                }
            }),
        )
        .nest("/workers", crate::agent::team::admin_router(team.clone()))
        .nest("/gateway", crate::gateway::admin_router(gateway.clone()))
        .nest("/files", crate::storage::admin::admin_router(storage))
        .nest("/dispatch", admin_routes::dispatch_router(crew.clone()))
        .nest("/share", admin_routes::share_router(crew.clone()));
    background.spawn(failed.watch(
        "credential gateway",
        gateway.clone().serve(gateway_listener, shutdown.clone()),
        shutdown.clone(),
    ));
    if crew.config.sandbox.enabled {
        let socket = sandboxes.gateway_socket();
        match bind_unix(&socket) {
            Ok(listener) => {
                background.spawn(gateway.serve_unix(listener, shutdown.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, socket = %socket.display(), "sandboxes cannot reach the gateway")
            }
        }
        background.spawn(crate::sandbox::keep_tidy(
            sandboxes.clone(),
            team.clone(),
            crew.tasks.clone(),
            shutdown.clone(),
        ));
    }
    background.spawn(failed.watch(
        "admin API",
        crate::admin::serve(admin_listener, admin_token, admin_routes, shutdown.clone()),
        shutdown.clone(),
    ));

    let checked = tokio::select! {
        checked = startup::check_homeserver(&crew, ping_seen) => checked,
        () = shutdown.cancelled() => return failed.take().map_or(Ok(()), Err),
    };
    if let Err(error) = checked {
        shutdown.cancel();
        background.close();
        background.wait().await;
        return Err(error.into());
    }
    // crate::crypto hook: the agents' devices, checked against the homeserver before any
    // transaction is taken in (until then they are answered "unavailable" and sent again).
    if let Some(slot) = &appservice_state.crypto {
        let opened = crate::crypto::Crypto::open(
            crew.config.encryption.clone(),
            &crew.config.data_dir,
            crew.client.clone(),
            &crew.store,
            crew.inbox.clone(),
            crew.manager.clone(),
            crew.registration.clone(),
            shutdown.clone(),
        )
        .await;
        let crypto = match opened {
            Ok(crypto) => crypto,
            Err(error) => {
                shutdown.cancel();
                background.close();
                background.wait().await;
                return Err(ServeError::Crypto(error));
            }
        };
        crew.client
            .set_encryptor(Arc::new(crate::crypto::WeakEncryptor(Arc::downgrade(
                &crypto,
            ))));
        let _ = slot.set(crypto.clone());
        background.spawn(crypto.run());
    }

    if let Some(advice) = crew
        .registration
        .manager_namespace_advice(crew.config.homeserver.server_name.as_str())
    {
        tracing::warn!("{advice}");
    }
    tracing::info!(
        manager = %crew.manager,
        appservice = %crew.config.appservice.bind,
        admin_api = %crew.config.admin_api.bind,
        gateway = %crew.config.gateway.bind,
        "crew is ready"
    );

    // Events the homeserver held back while crew was down come with the next event for us.
    backlog::nudge(&crew, "start-up").await;
    background.spawn(startup::ping_periodically(crew.clone(), shutdown.clone()));
    background.spawn(startup::greet_admins(crew.clone()));
    background.spawn(startup::refresh_rooms(crew.clone()));
    background.spawn(pump::run(crew.clone(), shutdown.clone()));
    background.spawn(outbox_runner::run(crew.clone(), shutdown.clone()));
    background.spawn(heartbeat::run(crew.clone(), shutdown.clone()));
    background.spawn(housekeeping::run(crew.clone(), shutdown.clone()));
    background.spawn(internal_wakes(
        crew.clone(),
        internal_receiver,
        shutdown.clone(),
    ));
    // Projects a crash interrupted go on: starts claimed but not made are made, once.
    match crew
        .agents
        .projects
        .resume_all(crate::clock::now_ms())
        .await
    {
        Ok(advances) => {
            for advance in &advances {
                crate::agent::project_flow::announce_started(&crew.agents, advance, 1).await;
            }
        }
        Err(error) => tracing::error!(%error, "cannot resume the running projects"),
    }
    crate::agent::project_flow::reconcile(&crew.agents).await;
    // Wakes that a previous run acknowledged but did not finish run now.
    match crew.queue.agents_with_pending() {
        Ok(agents) => {
            for agent in agents {
                crew.wake_agent(agent);
            }
        }
        Err(error) => tracing::error!(%error, "cannot read pending wakes"),
    }

    shutdown.cancelled().await;
    background.close();
    background.wait().await;
    crew.store.flush().await?;
    failed.take().map_or(Ok(()), Err)
}

/// Records each internal wake's decision for `!crew why` and starts the woken agent's turns.
async fn internal_wakes(
    crew: Arc<Service>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<crate::agent::project_flow::QueuedInternal>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = queued.recv() => next,
            () = shutdown.cancelled() => return,
        };
        let Some(next) = next else { return };
        crew.dispatch
            .keep_decision(&next.decision, crate::clock::now_ms());
        if let Some(agent) = next.agent {
            crew.wake_agent(agent);
        }
    }
}

/// The first listener that failed: it stops the service, and `serve` returns its error.
#[derive(Clone, Default)]
struct ListenerFailure(Arc<std::sync::Mutex<Option<ServeError>>>);

impl ListenerFailure {
    /// Runs a listener; when it fails, records the error and shuts crew down.
    fn watch(
        &self,
        what: &'static str,
        listener: impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let failed = self.clone();
        async move {
            if let Err(source) = listener.await {
                tracing::error!(error = %source, "the {what} listener failed; stopping");
                failed
                    .0
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get_or_insert(ServeError::Listener { what, source });
                shutdown.cancel();
            }
        }
    }

    fn take(&self) -> Option<ServeError> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// Listens on `addr`; the listener and the address it is bound to (the port filled in when
/// `addr` asks for port 0).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let error = |source| ServeError::Bind { what, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// Listens on a Unix socket at `path`, replacing a stale one a previous run left.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    tokio::net::UnixListener::bind(path)
}

/// Logs a homeserver error from a background task without stopping the service.
pub(crate) fn log_matrix_error(what: &str, error: &MatrixError) {
    tracing::warn!(%error, "{what}");
}
