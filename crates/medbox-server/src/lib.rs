//! `medboxd`: the appliance's gRPC server.
//!
//! The only crate that reads configuration files and the environment and the
//! only one that sees generated proto types (with `medboxctl`). It routes each
//! request by model name or alias to the runtime engine that holds it, and
//! writes every RPC to the store's request log. It holds no model math and no
//! SQL.

mod admin;
mod agents;
mod auth;
pub mod config;
mod datasets;
mod deadline;
mod error;
mod finetuning;
mod inference;
mod jobs;
mod knowledge;
mod limits;
mod metrics;
mod request_log;
mod router;
pub(crate) mod server;
mod state;

pub use server::{RunningServer, ServeError, StartError, start, start_with_agent_tools};

/// The per-run tool trait, for plugging shared context tools (such as a
/// knowledge-base `knowledge_search`) into `start_with_agent_tools`.
pub use medbox_agents::context::{ContextTool, ToolFuture};
