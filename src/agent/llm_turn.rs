//! The LLM-driven turn: a bounded tool-calling loop through the gateway.
//!
//! The context is small and flat: a stable system prompt (persona and role, so providers can
//! cache the prefix), the messages said since the agent's last turn (bounded by the dispatcher's
//! buffer), and the message that woke it. Tools run in the caller's [`Toolbox`]; the loop stops
//! after [`MAX_TOOL_STEPS`] rounds and says so rather than going silent.

use crate::llm::{ChatRequest, LlmClient, LlmError, Message, Tool};

/// Rounds of tool calls in one turn before the agent stops and says so.
pub const MAX_TOOL_STEPS: usize = 8;

/// Runs the tools an agent may call.
#[async_trait::async_trait]
pub trait Toolbox: Send + Sync {
    /// The tools offered to the model.
    fn tools(&self) -> Vec<Tool>;
    /// Runs one call; the answer (or the error, phrased for the model) goes back as the result.
    async fn call(&self, name: &str, arguments: &str) -> String;
}

/// How a turn ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnOutcome {
    /// The model's final answer.
    Answer(String),
    /// The tool-step limit was reached.
    StepLimit,
}

/// The user message of a turn: what was said since the agent's last turn (already bounded by the
/// dispatcher's per-room buffer), then the message to answer. Its size does not grow with the
/// room's history.
pub fn conversation(earlier: &[String], from: &str, body: &str) -> String {
    let mut conversation = String::new();
    if !earlier.is_empty() {
        conversation.push_str("Said in this room since your last turn:\n");
        for line in earlier {
            conversation.push_str(line);
            conversation.push('\n');
        }
        conversation.push('\n');
    }
    conversation.push_str(&format!("Message for you from {from}:\n{body}"));
    conversation
}

/// Runs one turn.
pub async fn run(
    llm: &LlmClient,
    model: &str,
    system: String,
    conversation: String,
    toolbox: &dyn Toolbox,
) -> Result<TurnOutcome, LlmError> {
    let mut messages = vec![Message::system(system), Message::user(conversation)];
    let tools = toolbox.tools();
    for _ in 0..MAX_TOOL_STEPS {
        let mut request = ChatRequest::new(model, messages.clone());
        request.tools = tools.clone();
        let response = llm.chat(request).await?;
        let Some(message) = response.message().cloned() else {
            return Ok(TurnOutcome::Answer(String::new()));
        };
        if message.tool_calls.is_empty() {
            return Ok(TurnOutcome::Answer(message.content.unwrap_or_default()));
        }
        let calls = message.tool_calls.clone();
        messages.push(message);
        for call in calls {
            let result = toolbox
                .call(&call.function.name, &call.function.arguments)
                .await;
            messages.push(Message::tool_result(call.id, result));
        }
    }
    Ok(TurnOutcome::StepLimit)
}
