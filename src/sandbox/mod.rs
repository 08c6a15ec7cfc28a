//! Workers' sandboxes: one Docker container per Worker, where its commands and skill scripts run.
//!
//! A container is created (through bollard) the first time its Worker runs a command, labelled
//! with this crew's instance and the Worker's name so that a restarted crew finds it again, and
//! stopped when idle (never while a command runs or its Worker has a task in progress). It holds
//! no real credential: its environment has the gateway URL and the Worker's own consumer token,
//! nothing else secret. It runs with limits (memory, CPUs, processes), no capabilities,
//! `no-new-privileges`, a read-only root and a writable workspace and `/tmp`.
//!
//! Network: the containers sit on an internal Docker network whose bridge has no address on the
//! host, so neither the internet nor the host's ports are reachable from it. The only other
//! member is a small relay container (the same image, running [`relay::RELAY_SCRIPT`]) that
//! answers as `gateway` and forwards each connection to crew's gateway through a Unix socket
//! mounted into it. The gateway then decides, by the consumer's allowlist, what the token may
//! call, and injects the real key.
//!
//! The workspace is a host folder mounted at `/workspace`, laid out like file storage
//! (`agents/<name>/`, `tasks/<id>/`) and kept in step with it before and after each command
//! ([`sync::Mirror`]), so results land in storage (local or S3) for the Manager and people.
//!
//! Not for: deciding what a Worker may run (the tools in [`crate::agent::worker_tools`]).

pub mod config;
mod exec;
pub mod image;
mod relay;
mod sync;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use config::SandboxConfig;

use crate::secret::Secret;
use crate::storage::StoragePrefix;
use crate::storage::{Storage, StorageError};

/// Label keys on everything crew creates in Docker.
const LABEL_INSTANCE: &str = "matrix-crew.instance";
const LABEL_WORKER: &str = "matrix-crew.worker";
const LABEL_ROLE: &str = "matrix-crew.role";
/// A digest of the consumer token the container was created with (never the token): a rotated
/// token makes crew recreate the container.
const LABEL_TOKEN: &str = "matrix-crew.token-digest";

/// Where the workspace is mounted inside a sandbox.
pub const WORKSPACE: &str = "/workspace";

/// Why a sandbox could not do what was asked. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandboxes are disabled on this crew (set `sandbox.enabled = true` to allow commands)")]
    Disabled,
    #[error(
        "Docker is not available ({0}). Start the Docker engine on the machine that runs crew and let crew's user use its socket (/var/run/docker.sock or DOCKER_HOST), then try again"
    )]
    DockerUnavailable(String),
    #[error(
        "the sandbox image `{0}` is missing. An admin can build it with `crew sandbox build` (no registry needed), or with `docker build -t {0} docker/sandbox` where a registry is reachable"
    )]
    ImageMissing(String),
    #[error("Docker refused: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("workspace: {0}")]
    Io(#[from] std::io::Error),
    #[error("file storage: {0}")]
    Storage(#[from] StorageError),
    #[error("building the sandbox image: {0}")]
    Build(String),
}

impl SandboxError {
    fn from_docker(error: bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        match error {
            E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::SocketNotFoundError(_)
            | E::RequestTimeoutError => SandboxError::DockerUnavailable(error.to_string()),
            other => SandboxError::Docker(other),
        }
    }
}

/// What a Worker's sandbox is given for one command.
pub struct SandboxWorker {
    /// The Worker's name (`alice`).
    pub name: String,
    /// Its own consumer token, the only secret its container holds.
    pub token: Secret,
    /// The storage folders its workspace mirrors (its own folder and its tasks' folders).
    pub folders: Vec<StoragePrefix>,
}

/// What a command did.
#[derive(Debug, Clone)]
pub struct CommandRun {
    /// The exit code (`None` if Docker did not report one).
    pub exit_code: Option<i64>,
    /// Killed at the time limit.
    pub timed_out: bool,
    /// stdout and stderr as they interleaved, whole (up to `max_kept` bytes).
    pub output: Vec<u8>,
    /// Bytes the command wrote in all (more than `output.len()` when the rest was dropped).
    pub total_bytes: u64,
    /// Files the workspace sync could not carry back to storage, and why.
    pub sync_notes: Vec<String>,
}

/// The sandbox state shown by `crew status`.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxStatus {
    pub enabled: bool,
    /// "ok", or why Docker cannot be used.
    pub docker: String,
    pub image: String,
    pub image_present: bool,
    /// Workers' containers and their Docker state.
    pub containers: Vec<ContainerState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerState {
    pub worker: String,
    pub state: String,
}

/// Every Worker's sandbox, and the network and relay they share.
pub struct Sandboxes {
    config: SandboxConfig,
    storage: Storage,
    /// Distinguishes this crew's containers from another crew's on the same engine.
    instance: String,
    /// `<data_dir>/sandbox`: workspaces, sync manifests, the gateway socket.
    root: PathBuf,
    docker: tokio::sync::Mutex<Option<Docker>>,
    /// One lock per Worker, so two calls never create its container twice.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Commands running per Worker, and when each Worker last used its sandbox.
    usage: Mutex<HashMap<String, Usage>>,
    /// Containers known to run, by Worker: (id, token digest). A warm command skips the
    /// look-ups; a container that went away (stopped, removed by hand) is found again.
    ready: Mutex<HashMap<String, (String, String)>>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    running: usize,
    last_used: Instant,
}

impl Sandboxes {
    /// The sandboxes of the crew whose data lives in `data_dir`. Talks to Docker only when used.
    pub fn new(config: SandboxConfig, storage: Storage, data_dir: &Path) -> Self {
        let absolute = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let digest = Sha256::digest(absolute.to_string_lossy().as_bytes());
        Self {
            config,
            storage,
            instance: hex::encode(&digest[..5]),
            root: absolute.join("sandbox"),
            docker: tokio::sync::Mutex::new(None),
            locks: Mutex::default(),
            usage: Mutex::default(),
            ready: Mutex::default(),
        }
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// This crew's label value on its containers and network (tests and `crew sandbox clean`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The Unix socket the gateway listens on for the relay.
    pub fn gateway_socket(&self) -> PathBuf {
        self.root.join("gateway").join("gateway.sock")
    }

    /// The URL of the gateway from inside a sandbox.
    pub fn gateway_url(&self) -> String {
        format!("http://{}:{}", relay::ALIAS, relay::PORT)
    }

    /// The Docker network Workers' containers sit on.
    pub fn network_name(&self) -> String {
        format!("crew-{}-sandbox", self.instance)
    }

    /// A Worker's container name.
    pub fn container_name(&self, worker: &str) -> String {
        format!("crew-{}-{worker}", self.instance)
    }

    fn workspace_dir(&self, worker: &str) -> PathBuf {
        self.root.join("workspaces").join(worker)
    }

    /// A connected Docker client, connecting (and negotiating the API version) on first use.
    async fn docker(&self) -> Result<Docker, SandboxError> {
        if !self.config.enabled {
            return Err(SandboxError::Disabled);
        }
        let mut docker = self.docker.lock().await;
        if let Some(docker) = docker.as_ref() {
            return Ok(docker.clone());
        }
        let connected = self.config.connect().await?;
        *docker = Some(connected.clone());
        Ok(connected)
    }

    /// Forgets the client after a connection failure, so the next call reconnects.
    async fn forget_docker_on(&self, error: &SandboxError) {
        if matches!(error, SandboxError::DockerUnavailable(_)) {
            *self.docker.lock().await = None;
        }
    }

    fn lock_of(&self, worker: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(worker.to_owned())
            .or_default()
            .clone()
    }

    fn note_use(&self, worker: &str, change: isize) {
        let mut usage = self
            .usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = usage.entry(worker.to_owned()).or_insert(Usage {
            running: 0,
            last_used: Instant::now(),
        });
        entry.running = entry.running.saturating_add_signed(change);
        entry.last_used = Instant::now();
    }

    /// Whether a command runs in `worker`'s sandbox now.
    pub fn is_running_command(&self, worker: &str) -> bool {
        self.usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(worker)
            .is_some_and(|usage| usage.running > 0)
    }

    /// Runs `command` (a shell command line) in `worker`'s sandbox, in `cwd` (a folder of the
    /// workspace, made if missing), for at most `timeout`. The workspace is brought up to date from storage
    /// before and carried back after. At the time limit, or when the returned future is dropped
    /// (a person said stop), the command's whole process group is killed.
    pub async fn run(
        &self,
        worker: &SandboxWorker,
        command: &str,
        cwd: &str,
        timeout: Duration,
    ) -> Result<CommandRun, SandboxError> {
        let result = self.run_inner(worker, command, cwd, timeout).await;
        if let Err(error) = &result {
            self.forget_docker_on(error).await;
        }
        result
    }

    async fn run_inner(
        &self,
        worker: &SandboxWorker,
        command: &str,
        cwd: &str,
        timeout: Duration,
    ) -> Result<CommandRun, SandboxError> {
        self.note_use(&worker.name, 1);
        let _in_use = InUse {
            sandboxes: self,
            worker: &worker.name,
        };
        let docker = self.docker().await?;
        let container = self.ensure_running(&docker, worker).await?;
        let mirror = sync::Mirror::new(
            self.storage.clone(),
            self.workspace_dir(&worker.name),
            self.root
                .join("manifests")
                .join(format!("{}.json", worker.name)),
        );
        mirror.pull(&worker.folders).await?;
        // The command's folder exists before it runs there.
        if let Some(relative) = cwd.strip_prefix(WORKSPACE)
            && !relative.split('/').any(|part| part == "..")
        {
            tokio::fs::create_dir_all(
                self.workspace_dir(&worker.name)
                    .join(relative.trim_start_matches('/')),
            )
            .await?;
        }
        let limit = self.storage.max_file_bytes().min(64 * 1024 * 1024) as usize;
        let mut run =
            match exec::exec_command(&docker, &container, command, cwd, timeout, limit).await {
                // The container went away since it was last used (stopped or removed by hand).
                Err(SandboxError::Docker(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                })) => {
                    self.forget_ready(&worker.name);
                    let container = self.ensure_running(&docker, worker).await?;
                    exec::exec_command(&docker, &container, command, cwd, timeout, limit).await?
                }
                other => other?,
            };
        run.sync_notes = mirror
            .push(&worker.folders, |path| worker_may_write(&worker.name, path))
            .await?;
        Ok(run)
    }

    /// The id of `worker`'s running container: found by its labels, started if stopped,
    /// created if missing (or if its token changed).
    async fn ensure_running(
        &self,
        docker: &Docker,
        worker: &SandboxWorker,
    ) -> Result<String, SandboxError> {
        let lock = self.lock_of(&worker.name);
        let _guard = lock.lock().await;
        let digest = token_digest(&worker.token);
        if let Some((id, known)) = self.ready_lock().get(&worker.name)
            && *known == digest
        {
            return Ok(id.clone());
        }
        let id = self.find_or_create(docker, worker, &digest).await?;
        self.ready_lock()
            .insert(worker.name.clone(), (id.clone(), digest));
        Ok(id)
    }

    fn ready_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets that `worker`'s container runs (it stopped, or is gone).
    fn forget_ready(&self, worker: &str) {
        self.ready_lock().remove(worker);
    }

    async fn find_or_create(
        &self,
        docker: &Docker,
        worker: &SandboxWorker,
        digest: &str,
    ) -> Result<String, SandboxError> {
        self.ensure_relay(docker).await?;
        let existing = self.find(docker, Some(&worker.name), "worker").await?;
        for summary in &existing {
            let labels = summary.labels.clone().unwrap_or_default();
            let id = summary.id.clone().unwrap_or_default();
            if labels.get(LABEL_TOKEN).map(String::as_str) != Some(digest) {
                tracing::info!(worker = %worker.name, "recreating a sandbox whose token changed");
                remove_container(docker, &id).await?;
                continue;
            }
            if summary.state != Some(ContainerSummaryStateEnum::RUNNING) {
                docker
                    .start_container(&id, None)
                    .await
                    .map_err(SandboxError::from_docker)?;
            }
            return Ok(id);
        }
        self.create_worker_container(docker, worker, digest).await
    }

    async fn create_worker_container(
        &self,
        docker: &Docker,
        worker: &SandboxWorker,
        digest: &str,
    ) -> Result<String, SandboxError> {
        self.check_image(docker).await?;
        let workspace = self.workspace_dir(&worker.name);
        tokio::fs::create_dir_all(&workspace).await?;
        let user = owner_of(&workspace)?;
        let mut labels = self.labels("worker");
        labels.insert(LABEL_WORKER.to_owned(), worker.name.clone());
        labels.insert(LABEL_TOKEN.to_owned(), digest.to_owned());
        let env = vec![
            format!("CREW_GATEWAY_URL={}", self.gateway_url()),
            format!("CREW_GATEWAY_TOKEN={}", worker.token.expose()),
            format!("CREW_WORKER={}", worker.name),
            format!("CREW_WORKSPACE={WORKSPACE}"),
            "HOME=/tmp".to_owned(),
            "LANG=C.UTF-8".to_owned(),
            "PYTHONDONTWRITEBYTECODE=1".to_owned(),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ];
        let memory = (self.config.memory_mb * 1024 * 1024) as i64;
        let body = ContainerCreateBody {
            image: Some(self.config.image.clone()),
            cmd: Some(vec!["sleep".into(), "infinity".into()]),
            env: Some(env),
            labels: Some(labels),
            user: Some(user),
            working_dir: Some(WORKSPACE.to_owned()),
            host_config: Some(HostConfig {
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some((self.config.cpus * 1e9) as i64),
                pids_limit: Some(self.config.pids),
                init: Some(true),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_owned(),
                    format!("rw,nosuid,nodev,size={}m", self.config.tmp_mb),
                )])),
                binds: Some(vec![format!("{}:{WORKSPACE}:rw", workspace.display())]),
                network_mode: Some(self.network_name()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&self.container_name(&worker.name))
            .build();
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(SandboxError::from_docker)?;
        docker
            .start_container(&created.id, None)
            .await
            .map_err(SandboxError::from_docker)?;
        tracing::info!(worker = %worker.name, container = %created.id, "sandbox created");
        Ok(created.id)
    }

    fn labels(&self, role: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_INSTANCE.to_owned(), self.instance.clone()),
            (LABEL_ROLE.to_owned(), role.to_owned()),
        ])
    }

    async fn check_image(&self, docker: &Docker) -> Result<(), SandboxError> {
        match docker.inspect_image(&self.config.image).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(SandboxError::ImageMissing(self.config.image.clone())),
            Err(error) => Err(SandboxError::from_docker(error)),
        }
    }

    /// This crew's containers with `role`, of `worker` when given, running or not.
    async fn find(
        &self,
        docker: &Docker,
        worker: Option<&str>,
        role: &str,
    ) -> Result<Vec<bollard::models::ContainerSummary>, SandboxError> {
        let mut labels = vec![
            format!("{LABEL_INSTANCE}={}", self.instance),
            format!("{LABEL_ROLE}={role}"),
        ];
        if let Some(worker) = worker {
            labels.push(format!("{LABEL_WORKER}={worker}"));
        }
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&HashMap::from([("label".to_owned(), labels)]))
            .build();
        docker
            .list_containers(Some(options))
            .await
            .map_err(SandboxError::from_docker)
    }

    /// Removes `worker`'s container and its workspace copy (its files stay in storage).
    pub async fn remove(&self, worker: &str) -> Result<bool, SandboxError> {
        if !self.config.enabled {
            return Ok(false);
        }
        let docker = self.docker().await?;
        let lock = self.lock_of(worker);
        let _guard = lock.lock().await;
        self.forget_ready(worker);
        let found = self.find(&docker, Some(worker), "worker").await?;
        for summary in &found {
            remove_container(&docker, summary.id.as_deref().unwrap_or_default()).await?;
        }
        let workspace = self.workspace_dir(worker);
        if workspace.exists() {
            tokio::fs::remove_dir_all(&workspace).await?;
        }
        let _ = tokio::fs::remove_file(self.root.join("manifests").join(format!("{worker}.json")))
            .await;
        Ok(!found.is_empty())
    }

    /// Removes every container and the network this crew made (`crew sandbox clean`).
    pub async fn remove_all(&self) -> Result<usize, SandboxError> {
        let docker = self.docker().await?;
        self.ready_lock().clear();
        let mut removed = 0;
        for role in ["worker", "relay"] {
            for summary in self.find(&docker, None, role).await? {
                remove_container(&docker, summary.id.as_deref().unwrap_or_default()).await?;
                removed += 1;
            }
        }
        match docker.remove_network(&self.network_name()).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => return Err(SandboxError::from_docker(error)),
        }
        Ok(removed)
    }

    /// Stops containers unused for `idle_stop_secs`, unless a command runs in them or
    /// `has_work(worker)` says its Worker has a task in progress; removes the containers of
    /// Workers that `exists(worker)` no longer knows. Returns the Workers whose container
    /// stopped.
    pub async fn housekeeping(
        &self,
        has_work: impl Fn(&str) -> bool,
        exists: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, SandboxError> {
        let docker = self.docker().await?;
        let idle = Duration::from_secs(self.config.idle_stop_secs);
        let mut stopped = Vec::new();
        for summary in self.find(&docker, None, "worker").await? {
            let Some(worker) = summary.labels.as_ref().and_then(|l| l.get(LABEL_WORKER)) else {
                continue;
            };
            let id = summary.id.clone().unwrap_or_default();
            if !exists(worker) {
                tracing::info!(%worker, "removing the sandbox of a removed Worker");
                self.remove(worker).await?;
                continue;
            }
            if summary.state != Some(ContainerSummaryStateEnum::RUNNING) {
                continue;
            }
            let usage = self
                .usage
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(worker)
                .copied();
            let busy = usage.is_some_and(|usage| usage.running > 0);
            // After a restart crew does not know when a container was last used: it counts
            // from now.
            let quiet = usage.is_none_or(|usage| usage.last_used.elapsed() >= idle);
            if usage.is_none() {
                self.note_use(worker, 0);
                if !idle.is_zero() {
                    continue;
                }
            }
            if busy || !quiet || has_work(worker) {
                continue;
            }
            let lock = self.lock_of(worker);
            let _guard = lock.lock().await;
            if self.is_running_command(worker) {
                continue;
            }
            self.forget_ready(worker);
            let options = StopContainerOptionsBuilder::default().t(2).build();
            docker
                .stop_container(&id, Some(options))
                .await
                .map_err(SandboxError::from_docker)?;
            tracing::info!(%worker, "idle sandbox stopped");
            stopped.push(worker.clone());
        }
        Ok(stopped)
    }

    /// Docker, the image and this crew's containers, for `crew status`.
    pub async fn status(&self) -> SandboxStatus {
        let mut status = SandboxStatus {
            enabled: self.config.enabled,
            docker: "ok".to_owned(),
            image: self.config.image.clone(),
            image_present: false,
            containers: Vec::new(),
        };
        let docker = match self.docker().await {
            Ok(docker) => docker,
            Err(error) => {
                status.docker = error.to_string();
                return status;
            }
        };
        if let Err(error) = docker.ping().await {
            status.docker = SandboxError::from_docker(error).to_string();
            *self.docker.lock().await = None;
            return status;
        }
        status.image_present = self.check_image(&docker).await.is_ok();
        if let Ok(found) = self.find(&docker, None, "worker").await {
            for summary in found {
                status.containers.push(ContainerState {
                    worker: summary
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(LABEL_WORKER))
                        .cloned()
                        .unwrap_or_default(),
                    state: summary
                        .state
                        .map(|state| state.to_string())
                        .unwrap_or_default(),
                });
            }
        }
        status
    }
}

/// Runs [`Sandboxes::housekeeping`] periodically until `shutdown`: idle containers stop, and
/// containers of removed Workers go.
pub async fn keep_tidy(
    sandboxes: Arc<Sandboxes>,
    team: Arc<crate::agent::team::Team>,
    tasks: crate::tasks::Tasks,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use crate::agent::registry::WorkerState;
    use crate::tasks::{TaskFilter, TaskState};
    if !sandboxes.config.enabled {
        return;
    }
    let every = Duration::from_secs((sandboxes.config.idle_stop_secs / 4).clamp(1, 60));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let has_work = |worker: &str| {
            tasks
                .list(&TaskFilter {
                    states: vec![TaskState::InProgress],
                    assignee: Some(worker.to_owned()),
                })
                .map(|found| !found.is_empty())
                .unwrap_or(true)
        };
        let exists = |worker: &str| match team.registry.get(worker) {
            Ok(Some(found)) => found.state != WorkerState::Removed,
            Ok(None) => false,
            // When in doubt, keep it.
            Err(_) => true,
        };
        if let Err(error) = sandboxes.housekeeping(has_work, exists).await {
            tracing::debug!(%error, "sandbox housekeeping");
        }
    }
}

/// Marks a Worker's command finished when dropped (also when the command is cancelled).
struct InUse<'a> {
    sandboxes: &'a Sandboxes,
    worker: &'a str,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.sandboxes.note_use(self.worker, -1);
    }
}

/// Whether a Worker may write `path` from its sandbox: its own folder and its tasks' folders
/// (the folders it mirrors), except the task records crew itself keeps.
fn worker_may_write(worker: &str, path: &crate::storage::StoragePath) -> bool {
    let mut segments = path.segments();
    match (segments.next(), segments.next()) {
        (Some("agents"), Some(name)) => name == worker,
        (Some("tasks"), Some(_)) => {
            let rest: Vec<&str> = segments.collect();
            !matches!(rest.as_slice(), ["spec.md" | "progress.md" | "result.md"])
        }
        _ => false,
    }
}

fn token_digest(token: &Secret) -> String {
    hex::encode(&Sha256::digest(token.expose().as_bytes())[..8])
}

/// `uid:gid` of the folder crew made, so files the sandbox writes belong to crew's user.
fn owner_of(path: &Path) -> Result<String, SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(format!("{}:{}", meta.uid(), meta.gid()))
}

async fn remove_container(docker: &Docker, id: &str) -> Result<(), SandboxError> {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(id, Some(options)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(error) => Err(SandboxError::from_docker(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoragePath;

    #[test]
    fn workers_write_their_folders_but_not_the_task_records() {
        let path = |p: &str| StoragePath::parse(p).unwrap();
        assert!(worker_may_write("alice", &path("agents/alice/notes.md")));
        assert!(!worker_may_write("alice", &path("agents/bob/notes.md")));
        assert!(worker_may_write("alice", &path("tasks/t-1/fib.py")));
        assert!(worker_may_write("alice", &path("tasks/t-1/out/log.txt")));
        assert!(!worker_may_write("alice", &path("tasks/t-1/result.md")));
        assert!(!worker_may_write("alice", &path("shared/x.md")));
    }
}
