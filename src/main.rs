//! The `crew` binary: command-line parsing and wiring. `anyhow` lives here and nowhere else.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use matrix_crew::config::Config;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the server (the gateway above all) makes many small,
/// short-lived allocations per request, and glibc's `malloc`/`free` (with `malloc_consolidate`
/// spikes) was about 13 % of the gateway's profile under load (docs/benchmarks.md).
/// `--features system-allocator` leaves it out, for heap profilers that see only `malloc`
/// (heaptrack, massif): mimalloc's allocations are invisible to them.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same place in mimalloc 2 and 3;
/// libmimalloc-sys names no constant for it).
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc 3 keeps freed pages for a second (`purge_delay`, 1000 ms) before it gives them back
/// to the system. Under a steady stream of transactions that second of churn stays resident:
/// 16–19 MiB of a 108 MiB `crew serve` after a minute at 20,000 events/s (docs/benchmarks.md, "A
/// bounded backlog"). 10 ms is mimalloc 2's default. Set only while the option still has
/// mimalloc 3's default (so never over `MIMALLOC_PURGE_DELAY`, and never if the option moved).
#[cfg(not(feature = "system-allocator"))]
fn return_freed_memory_promptly() {
    // SAFETY: reads and sets one of mimalloc's integer options, which it keeps atomically.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 1000 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "crew",
    version,
    about = "A team of AI agents in any Matrix room"
)]
struct Cli {
    /// The config file (written by `crew init`).
    #[arg(
        long,
        short,
        env = "CREW_CONFIG",
        default_value = "data/config.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a config and a registration file with fresh tokens into a data directory.
    Init(Box<InitArgs>),
    /// Runs the appservice until stopped (Ctrl-C or SIGTERM).
    Serve,
    /// Asks the running server whether it is up.
    Status,
    /// The credential gateway: consumers and usage (through the running server).
    Gateway {
        #[command(subcommand)]
        command: matrix_crew::gateway::cli::GatewayCommand,
    },
    /// Shared files: ls, get, put (through the running server).
    Files {
        #[command(subcommand)]
        command: matrix_crew::storage::cli::FilesCommand,
    },
    /// Posts a stored file in a room: a signed link, or an `m.file` upload.
    Share {
        /// Path in the file store, e.g. tasks/t-1/result.md.
        path: String,
        /// Room id to post in.
        #[arg(long)]
        room: String,
        /// The agent that posts it (default: the Manager).
        #[arg(long)]
        agent: Option<String>,
        /// Upload as `m.file` (small files) instead of linking.
        #[arg(long)]
        upload: bool,
    },
    /// Lists or creates Workers (through the running server).
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Workers' Docker sandboxes: build the image, remove this crew's containers.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Builds the sandbox image from Debian's packages (debootstrap + docker import), without
    /// any image registry. Needs root (debootstrap) and Docker.
    Build,
    /// Removes every container and the network this crew made (Workers' containers are made
    /// again on their next command).
    Clean,
}

#[derive(Subcommand)]
enum WorkersCommand {
    /// Lists every Worker and its state.
    List,
    /// What everyone is doing: state, open tasks, last activity (as `!crew workers` says it).
    Status,
    /// Creates a Worker (or shows the existing one of that name).
    Add {
        name: String,
        /// What the Worker is for, e.g. "frontend development".
        #[arg(long, default_value = "")]
        role: String,
        /// Also make the Worker's room "Worker: <Name>" and invite this person, as the
        /// Manager does when asked in chat (e.g. `@alice:example.org`).
        #[arg(long)]
        invite: Option<ruma::OwnedUserId>,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Client-server URL of the homeserver.
    #[arg(long)]
    homeserver: url::Url,
    /// The homeserver's server name (the part after `:` in user ids).
    #[arg(long)]
    server_name: ruma::OwnedServerName,
    /// A person the agents obey; repeat for several.
    #[arg(long = "admin", required = true)]
    admins: Vec<ruma::OwnedUserId>,
    /// Where to write config.toml and registration.yaml (git ignores `data/`).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Localpart prefix of every agent user.
    #[arg(long, default_value = "crew_")]
    prefix: String,
    /// The appservice id on the homeserver.
    #[arg(long, default_value = "crew")]
    id: String,
    /// Localpart of the Manager user.
    #[arg(long, default_value = "crew")]
    manager: String,
    /// Address crew listens on for the homeserver.
    #[arg(long, default_value = "127.0.0.1:9000")]
    bind: std::net::SocketAddr,
    /// URL at which the homeserver reaches crew (defaults to http://<bind>).
    #[arg(long)]
    url: Option<url::Url>,
    /// Address of the local admin API used by the CLI.
    #[arg(long, default_value = "127.0.0.1:9002")]
    admin_bind: std::net::SocketAddr,
    /// Replace existing files (new tokens: register the new file with the homeserver).
    #[arg(long)]
    force: bool,
    /// An OpenAI-compatible base URL for the agents' LLM (OpenAI, DeepSeek, vLLM, Ollama's /v1…).
    #[arg(long)]
    llm_url: Option<url::Url>,
    /// The environment variable crew reads the LLM key from when it starts (the key is never
    /// written to a file).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    llm_key_env: String,
    /// The model agents use.
    #[arg(long)]
    llm_model: Option<String>,
}

fn main() -> anyhow::Result<()> {
    #[cfg(not(feature = "system-allocator"))]
    return_freed_memory_promptly();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Init(args) => init(*args),
            Command::Serve => serve(&cli.config).await,
            Command::Status => {
                let status: serde_json::Value = admin(&cli.config)?.get("/status").await?;
                println!("{status}");
                Ok(())
            }
            Command::Workers { command } => workers(&admin(&cli.config)?, command).await,
            Command::Share {
                path,
                room,
                agent,
                upload,
            } => {
                let body = serde_json::json!({ "path": path, "room": room, "agent": agent, "upload": upload });
                let answer: serde_json::Value = admin(&cli.config)?.post("/share", &body).await?;
                println!("posted {}", answer["event_id"].as_str().unwrap_or("?"));
                Ok(())
            }
            Command::Files { command } => {
                print!("{}", command.run(&admin(&cli.config)?).await?);
                Ok(())
            }
            Command::Gateway { command } => {
                print!("{}", command.run(&admin(&cli.config)?).await?);
                Ok(())
            }
            Command::Sandbox { command } => sandbox(&cli.config, command).await,
        }
    })
}

async fn sandbox(config_path: &std::path::Path, command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Build => {
            // Without a config (a fresh machine), the default image is built.
            let (settings, work_dir) = if config_path.exists() {
                let loaded = Config::load(config_path)
                    .with_context(|| format!("loading {}", config_path.display()))?;
                (
                    loaded.config.sandbox.clone(),
                    loaded.config.data_dir.clone(),
                )
            } else {
                (
                    Default::default(),
                    std::env::temp_dir().join("crew-sandbox-build"),
                )
            };
            matrix_crew::sandbox::image::build(&settings, &work_dir, |line| println!("{line}"))
                .await?;
        }
        SandboxCommand::Clean => {
            let loaded = Config::load(config_path)
                .with_context(|| format!("loading {}", config_path.display()))?;
            let config = loaded.config;
            let env = |name: &str| std::env::var(name).ok();
            let storage =
                matrix_crew::storage::Storage::open(&config.storage, &config.data_dir, env).await?;
            let sandboxes = matrix_crew::sandbox::Sandboxes::new(
                config.sandbox.clone(),
                storage,
                &config.data_dir,
            );
            let removed = sandboxes.remove_all().await?;
            println!("removed {removed} container(s) and the sandbox network");
        }
    }
    Ok(())
}

fn admin(config: &std::path::Path) -> anyhow::Result<matrix_crew::admin::AdminClient> {
    let loaded = Config::load(config).with_context(|| format!("loading {}", config.display()))?;
    Ok(matrix_crew::admin::AdminClient::from_config(
        &loaded.config,
    )?)
}

async fn workers(
    admin: &matrix_crew::admin::AdminClient,
    command: WorkersCommand,
) -> anyhow::Result<()> {
    use matrix_crew::agent::registry::Worker;
    use matrix_crew::agent::team::Created;
    match command {
        WorkersCommand::List => {
            let workers: Vec<Worker> = admin.get("/workers").await?;
            if workers.is_empty() {
                println!("no workers yet");
            }
            for worker in workers {
                println!(
                    "{:<16} {:<32} {:?}  {}",
                    worker.name, worker.user_id, worker.state, worker.role
                );
            }
        }
        WorkersCommand::Status => {
            use matrix_crew::agent::status::{WorkerStatus, render};
            let statuses: Vec<WorkerStatus> = admin.get("/dispatch/team").await?;
            print!("{}", render(&statuses, matrix_crew::clock::now_ms()));
        }
        WorkersCommand::Add { name, role, invite } => {
            let created: Created = admin
                .post(
                    "/workers",
                    &serde_json::json!({ "name": name, "role": role, "invite": invite }),
                )
                .await?;
            let verb = if created.created {
                "created"
            } else {
                "exists:"
            };
            let room = created
                .worker
                .room
                .map(|room| format!(", room {room}"))
                .unwrap_or_default();
            println!(
                "{verb} {} ({}{room})",
                created.worker.name, created.worker.user_id
            );
        }
    }
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(url) => url,
        None => format!("http://{}", args.bind).parse()?,
    };
    let written = matrix_crew::init::init(&matrix_crew::init::InitOptions {
        data_dir: args.data_dir,
        homeserver: args.homeserver,
        server_name: args.server_name,
        admins: args.admins,
        user_prefix: args.prefix,
        appservice_id: args.id,
        manager_localpart: args.manager,
        appservice_url: url,
        bind: args.bind,
        admin_bind: args.admin_bind,
        force: args.force,
        llm: args.llm_url.map(|base_url| matrix_crew::init::LlmProvider {
            base_url,
            key_env: args.llm_key_env,
            model: args.llm_model,
        }),
    })?;
    println!(
        "wrote {} and {}\nnext: register {} with your homeserver (docs/homeservers.md), then run `crew serve --config {}`",
        written.config.display(),
        written.registration.display(),
        written.registration.display(),
        written.config.display()
    );
    Ok(())
}

async fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    let loaded = Config::load(config).with_context(|| format!("loading {}", config.display()))?;
    init_logging(&loaded.config)?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        signal.cancel();
    });
    matrix_crew::server::serve(loaded, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Logs to stderr, and as JSON lines to `log.file` when configured.
fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let file_layer = match &config.log.file {
        Some(path) => {
            let path = config.data_dir.join(path);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::sync::Mutex::new(file))
                    .with_filter(filter()),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init()
        .context("initialising logging")?;
    Ok(())
}

#[cfg(all(test, not(feature = "system-allocator")))]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay: its default was 1000 ms, and it is now 10.
    #[test]
    fn freed_memory_is_returned_after_ten_milliseconds() {
        return_freed_memory_promptly();
        // SAFETY: reads one of mimalloc's integer options.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 10);
    }
}
