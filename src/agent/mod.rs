//! The Manager and the Workers: their turns, tools, files and tasks.
//!
//! [`llm_turn`] is the turn engine (bounded tool loop, mid-turn delivery, journal replay);
//! [`manager_tools`] and [`worker_tools`] are what each kind of agent can do, over the
//! [`services::AgentServices`] the server hands them; [`workspace`] is an agent's files under
//! the access rules; [`project_flow`] carries projects from one step to the next (internal
//! wakes).

pub mod authority;
pub mod commands;
pub mod files;
pub mod journal;
pub mod llm_turn;
pub mod manager;
pub mod manager_tools;
pub mod project_flow;
pub mod registry;
pub(crate) mod runner;
pub mod sandbox_tools;
pub mod services;
pub mod status;
pub mod team;
pub mod turn;
pub mod worker_tools;
pub mod workspace;
