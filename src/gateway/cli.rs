//! `crew gateway …`: the operator's commands, sent to the running server's admin endpoint.
//!
//! Not for: opening the database (the running server holds it; see [`crate::admin`]).

use clap::Subcommand;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::admin::{AddConsumer, IssuedToken};
use super::{ConsumerInfo, ConsumerPolicy, UsageRow};
use crate::admin::{AdminClient, AdminError};

/// `crew gateway …`
#[derive(Debug, Clone, Subcommand)]
pub enum GatewayCommand {
    /// Manage consumers (one per agent).
    #[command(subcommand)]
    Consumers(ConsumersCommand),
    /// Print tokens and requests per consumer and day.
    Usage,
}

/// `crew gateway consumers …`
#[derive(Debug, Clone, Subcommand)]
pub enum ConsumersCommand {
    /// List consumers with today's usage.
    List,
    /// Create a consumer (or re-enable a revoked one) and print its token.
    Add {
        /// Consumer id (the agent id for agents).
        id: String,
        /// Allowed route names (repeatable); the configured default when absent.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// Allowed models (repeatable); the configured default when absent.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Requests per minute (0 = unlimited).
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per UTC day (0 = unlimited).
        #[arg(long)]
        daily_tokens: Option<u64>,
        /// Requests in flight at once (0 = unlimited).
        #[arg(long)]
        max_concurrent: Option<u32>,
    },
    /// Issue a new token; the old one works for the configured grace period.
    Rotate { id: String },
    /// Refuse every token of this consumer from the next request on.
    Revoke { id: String },
}

impl GatewayCommand {
    /// Runs the command against the running server and returns the text to print.
    pub async fn run(self, admin: &AdminClient) -> Result<String, AdminError> {
        match self {
            GatewayCommand::Usage => {
                let rows: Vec<UsageRow> = admin.get("/gateway/usage").await?;
                Ok(format_usage(&rows))
            }
            GatewayCommand::Consumers(ConsumersCommand::List) => {
                let consumers: Vec<ConsumerInfo> = admin.get("/gateway/consumers").await?;
                Ok(format_consumers(&consumers))
            }
            GatewayCommand::Consumers(ConsumersCommand::Add {
                id,
                routes,
                models,
                rpm,
                daily_tokens,
                max_concurrent,
            }) => {
                let customised = !routes.is_empty()
                    || !models.is_empty()
                    || rpm.is_some()
                    || daily_tokens.is_some()
                    || max_concurrent.is_some();
                // Unset fields take the built-in defaults; the server's configured defaults apply
                // only when no option is given at all.
                let policy = customised.then(|| {
                    let base = ConsumerPolicy::default();
                    ConsumerPolicy {
                        allowed_routes: if routes.is_empty() {
                            base.allowed_routes
                        } else {
                            routes
                        },
                        allowed_models: if models.is_empty() {
                            base.allowed_models
                        } else {
                            models
                        },
                        requests_per_minute: rpm.unwrap_or(base.requests_per_minute),
                        daily_token_budget: daily_tokens.unwrap_or(base.daily_token_budget),
                        max_concurrent: max_concurrent.unwrap_or(base.max_concurrent),
                    }
                });
                let issued: IssuedToken = admin
                    .post("/gateway/consumers", &AddConsumer { id, policy })
                    .await?;
                Ok(format_issued("added", &issued))
            }
            GatewayCommand::Consumers(ConsumersCommand::Rotate { id }) => {
                let issued: IssuedToken = admin
                    .post(&format!("/gateway/consumers/{}/rotate", encode(&id)), &())
                    .await?;
                Ok(format_issued("rotated", &issued))
            }
            GatewayCommand::Consumers(ConsumersCommand::Revoke { id }) => {
                let consumer: ConsumerInfo = admin
                    .post(&format!("/gateway/consumers/{}/revoke", encode(&id)), &())
                    .await?;
                Ok(format!(
                    "revoked {}: its tokens are refused from the next request on\n",
                    consumer.id
                ))
            }
        }
    }
}

fn encode(id: &str) -> String {
    utf8_percent_encode(id, NON_ALPHANUMERIC).to_string()
}

fn format_issued(what: &str, issued: &IssuedToken) -> String {
    format!(
        "{what} {} (generation {})\ntoken: {}\n",
        issued.consumer.id, issued.consumer.generation, issued.token
    )
}

/// One line per consumer: id, state, today's tokens against the budget.
pub fn format_consumers(consumers: &[ConsumerInfo]) -> String {
    if consumers.is_empty() {
        return "no consumers\n".into();
    }
    let mut out = format!(
        "{:<32} {:<8} {:>4} {:>10} {:>14} {:>6}  routes / models\n",
        "consumer", "state", "gen", "requests", "tokens today", "rpm"
    );
    for c in consumers {
        let state = if c.revoked { "revoked" } else { "active" };
        let budget = if c.policy.daily_token_budget == 0 {
            "∞".to_owned()
        } else {
            c.policy.daily_token_budget.to_string()
        };
        out.push_str(&format!(
            "{:<32} {:<8} {:>4} {:>10} {:>14} {:>6}  {} / {}\n",
            c.id,
            state,
            c.generation,
            c.today.requests,
            format!("{}/{}", c.today.total_tokens, budget),
            c.policy.requests_per_minute,
            c.policy.allowed_routes.join(","),
            c.policy.allowed_models.join(","),
        ));
    }
    out
}

/// One line per consumer and day.
pub fn format_usage(rows: &[UsageRow]) -> String {
    if rows.is_empty() {
        return "no usage recorded\n".into();
    }
    let mut out = format!(
        "{:<32} {:<10} {:>9} {:>12} {:>12} {:>12}\n",
        "consumer", "day", "requests", "prompt", "completion", "total"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<32} {:<10} {:>9} {:>12} {:>12} {:>12}\n",
            row.consumer,
            crate::clock::format_day(row.day as i64),
            row.usage.requests,
            row.usage.prompt_tokens,
            row.usage.completion_tokens,
            row.usage.total_tokens
        ));
    }
    out
}
