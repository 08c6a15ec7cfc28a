//! Sandbox settings: which image, the limits every Worker's container gets, and how long
//! commands and idle containers may last.

use serde::{Deserialize, Serialize};

/// Settings for Workers' sandboxes (`[sandbox]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Off: `run_command` answers that sandboxes are disabled and crew never talks to Docker.
    pub enabled: bool,
    /// The Docker engine to use, e.g. `unix:///run/user/1000/docker.sock` for rootless Docker;
    /// unset: `DOCKER_HOST`, else the local socket.
    pub docker_host: Option<String>,
    /// The image each Worker's container runs (`crew sandbox build` makes the default one).
    pub image: String,
    /// Memory limit per container, in MiB (swap is not given on top).
    pub memory_mb: u64,
    /// CPUs per container (fractions allowed).
    pub cpus: f64,
    /// Processes (and threads) per container: a fork bomb stops here.
    pub pids: i64,
    /// Size of the container's `/tmp` (a tmpfs), in MiB.
    pub tmp_mb: u64,
    /// A container unused for this long is stopped (never while a command runs or its Worker
    /// has a task in progress); the next command starts it again.
    pub idle_stop_secs: u64,
    /// A command's time limit when the Worker does not ask for one.
    pub command_timeout_secs: u64,
    /// The longest time limit a Worker may ask for.
    pub max_command_timeout_secs: u64,
    /// Output (stdout and stderr together) returned to the model; more is cut, with a note, and
    /// kept whole as a file in the task folder.
    pub output_limit_bytes: usize,
    /// Debian mirror and suite that `crew sandbox build` bootstraps the image from.
    pub debian_mirror: String,
    pub debian_suite: String,
    /// Extra Debian packages for the image (an admin's way to extend it; or edit
    /// `docker/sandbox/Dockerfile` where a registry is reachable).
    pub extra_packages: Vec<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            docker_host: None,
            image: DEFAULT_IMAGE.to_owned(),
            memory_mb: 1024,
            cpus: 1.0,
            pids: 256,
            tmp_mb: 256,
            idle_stop_secs: 900,
            command_timeout_secs: 120,
            max_command_timeout_secs: 1800,
            output_limit_bytes: 8 * 1024,
            debian_mirror: "http://deb.debian.org/debian".to_owned(),
            debian_suite: "bookworm".to_owned(),
            extra_packages: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// A client for the configured engine, its API version negotiated (Docker 20.10 and newer).
    pub async fn connect(&self) -> Result<bollard::Docker, super::SandboxError> {
        let unavailable = |error: bollard::errors::Error| {
            super::SandboxError::DockerUnavailable(error.to_string())
        };
        let docker = match &self.docker_host {
            Some(host) => bollard::Docker::connect_with_host(host),
            None => bollard::Docker::connect_with_local_defaults(),
        }
        .map_err(unavailable)?;
        docker.negotiate_version().await.map_err(unavailable)
    }
}

/// The image `crew sandbox build` makes and sandboxes use by default.
pub const DEFAULT_IMAGE: &str = "matrix-crew-sandbox:latest";

/// Packages every sandbox image has: a shell and coreutils come with the base system.
pub const BASE_PACKAGES: &[&str] = &["git", "curl", "ca-certificates", "python3"];
