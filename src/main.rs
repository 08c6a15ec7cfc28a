//! The `crew` binary: command-line parsing and wiring. `anyhow` lives here and nowhere else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// Runs the appservice (and the gateway) until stopped.
    Serve,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                let _ = matrix_crew::config::Config::load(&cli.config)?;
                Ok(())
            }
        }
    })
}
