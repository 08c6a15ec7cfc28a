//! The Manager and the Workers: their turns, tools and tasks.

pub mod commands;
pub mod files;
pub mod llm_turn;
pub mod manager;
pub mod registry;
pub mod team;
pub mod turn;
