//! matrix-crew: a Matrix application service that gives one person a team of AI agents.
//!
//! The modules follow the data flow (see `docs/architecture.md`):
//! - [`appservice`]: what the homeserver calls (transactions in, durable inbox).
//! - [`dispatch`]: who wakes for each event, loop guards, the wake queue.
//! - [`agent`]: the Manager and Workers and their turns.
//! - [`matrix`]: what we call on the homeserver, as any of our puppeted users.
//! - [`gateway`] and [`llm`]: the credential gateway and the LLM client that goes through it.
//! - [`storage`]: shared files (local filesystem or S3).
//! - [`store`]: durable state in sled.
//! - [`projects`]: plans of tasks with dependencies, carried out in waves.
//! - [`admin`]: the local endpoint the CLI uses while the server runs.

pub mod admin;
pub mod agent;
pub mod appservice;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dispatch;
pub mod gateway;
pub mod init;
pub mod llm;
pub mod matrix;
pub mod outbox;
pub mod projects;
pub mod registration;
pub mod retry;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod storage;
pub mod store;
pub mod tasks;
