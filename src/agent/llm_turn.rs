//! The LLM-driven turn: a bounded tool-calling loop through the gateway.
//!
//! The context is small and flat: a stable system prompt (persona, role, skills index, memory
//! summary, so providers can cache the prefix), the room's recent conversation and what was
//! said since the agent's last turn (both bounded, and screened by `authority`: an admin's turn
//! shows only admins' lines, with a note for the rest), and the message that woke it. Tools run in
//! the caller's [`Toolbox`]. Between steps a [`Supervisor`] delivers what people said to the
//! agent meanwhile, or stops the turn. Each step is written to a [`StepJournal`] before its
//! effects, so a turn run again after a crash replays finished steps instead of repeating them.
//! The loop stops at the step and token limits and says so rather than going silent.

use std::collections::HashSet;

use ruma::UserId;
use serde::{Deserialize, Serialize};

use crate::dispatch::{Missed, Said};
use crate::llm::{ChatRequest, LlmClient, LlmError, Message, Tool};
use crate::store::StoreError;

/// Rounds of tool calls and tokens one turn may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnLimits {
    pub max_steps: usize,
    pub max_tokens: u64,
}

/// Runs the tools an agent may call.
#[async_trait::async_trait]
pub trait Toolbox: Send + Sync {
    /// The tools offered to the model.
    fn tools(&self) -> Vec<Tool>;
    /// Runs one call; the answer (or the error, phrased for the model) goes back as the result.
    async fn call(&self, name: &str, arguments: &str) -> String;
    /// Whether a call of tool `name` may be dropped half-way when someone says stop (a command
    /// in a sandbox: its process group is killed). Other calls finish before a stop applies.
    fn interruptible(&self, _name: &str) -> bool {
        false
    }
    /// Told of a call's answer replayed from the journal instead of run again (a turn re-run
    /// after a crash), so whatever the answer changes about the turn (who wrote the text it
    /// brings in) is known again.
    fn replayed(&self, _name: &str, _arguments: &str, _answer: &str) {}
}

/// A tool call's JSON arguments, or the error line the model gets back when they do not fit.
pub fn parse_arguments<T: serde::de::DeserializeOwned>(arguments: &str) -> Result<T, String> {
    serde_json::from_str(arguments)
        .map_err(|error| format!("error: arguments are not valid: {error}"))
}

/// What the supervisor says between two steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Between {
    /// Carry on; these messages arrived for the agent meanwhile (delivered as user messages).
    Continue(Vec<String>),
    /// End the turn now; `by` says who asked.
    Stop { by: String },
}

/// Watches the world while a turn runs: people's messages for the agent and stop requests.
#[async_trait::async_trait]
pub trait Supervisor: Send + Sync {
    async fn between_steps(&self) -> Between;
    /// While a tool runs: whether someone asked to stop (who), without taking in anything
    /// else. The stop itself is taken by the next [`Supervisor::between_steps`].
    async fn peek_stop(&self) -> Option<String> {
        None
    }
}

/// A supervisor that never interjects (benchmarks, one-shot calls).
pub struct Unsupervised;

#[async_trait::async_trait]
impl Supervisor for Unsupervised {
    async fn between_steps(&self) -> Between {
        Between::Continue(Vec::new())
    }
}

/// One finished (or half-finished) step, as journalled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournaledStep {
    /// The model's message of this step (its tool calls, or the final answer).
    pub reply: Message,
    /// Results of the tool calls that finished, in call order.
    pub results: Vec<String>,
    /// Tokens the step used, as the provider reported.
    pub tokens: u64,
    /// Of those, the prompt's (the rest is the completion); 0 in journals of older crews.
    #[serde(default)]
    pub prompt_tokens: u64,
}

/// Where steps are recorded durably. `save` must not return `Ok` before the record is on disk:
/// a tool call runs only after its step is saved, and its result is saved before the next one.
/// An error ends the turn ([`TurnError::Journal`]): a step that could not be journalled could be
/// repeated after a crash, so it does not run.
#[async_trait::async_trait]
pub trait StepJournal: Send + Sync {
    async fn load(&self, step: usize) -> Result<Option<JournaledStep>, StoreError>;
    async fn save(&self, step: usize, entry: &JournaledStep) -> Result<(), StoreError>;
}

/// Why a turn ended without an outcome.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The journal could not be read or written; nothing more was done.
    #[error("my turn journal cannot be kept, so I stopped before doing more: {0}")]
    Journal(#[from] StoreError),
}

/// A journal that keeps nothing (benchmarks, one-shot calls).
pub struct NoJournal;

#[async_trait::async_trait]
impl StepJournal for NoJournal {
    async fn load(&self, _step: usize) -> Result<Option<JournaledStep>, StoreError> {
        Ok(None)
    }
    async fn save(&self, _step: usize, _entry: &JournaledStep) -> Result<(), StoreError> {
        Ok(())
    }
}

/// How a turn ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnOutcome {
    /// The model's final answer.
    Answer(String),
    /// The tool-step limit was reached.
    StepLimit { steps: usize },
    /// The token limit was reached.
    TokenLimit { used: u64, limit: u64 },
    /// Someone stopped the turn; `steps` were done.
    Stopped { by: String, steps: usize },
}

impl TurnOutcome {
    /// What the agent says in the room about how its turn ended (`None` for an answer).
    pub fn notice(&self) -> Option<String> {
        match self {
            TurnOutcome::Answer(_) => None,
            TurnOutcome::StepLimit { steps } => Some(format!(
                "I stopped after {steps} rounds of tool calls without an answer (the limit is llm.max_tool_steps); tell me how to continue."
            )),
            TurnOutcome::TokenLimit { used, limit } => Some(format!(
                "I stopped this turn after using {used} tokens (the limit is {limit}, llm.max_turn_tokens); tell me how to continue."
            )),
            TurnOutcome::Stopped { by, steps: 0 } => Some(format!(
                "Stopped, as {by} asked, before doing anything more."
            )),
            TurnOutcome::Stopped { by, steps } => Some(format!(
                "Stopped, as {by} asked, after {steps} step(s). What was done so far stays done."
            )),
        }
    }
}

/// What goes into the user message of a turn. Every part is bounded by its producer, so the
/// message does not grow with the room's history.
#[derive(Debug, Default, Clone)]
pub struct TurnContext {
    /// The room's recent conversation before what is new to the agent ("Name: text", the
    /// agent's own replies as "you: text").
    pub recent: Vec<String>,
    /// Said in the room since the agent's last turn, that did not wake it.
    pub said_since: Vec<String>,
    /// The note standing in for earlier lines the turn may not see (an admin's turn does not
    /// show less trusted text; see `authority`).
    pub left_out: Option<String>,
    /// Who wrote the waking message.
    pub from: String,
    /// The waking message (with notes about files it carried).
    pub body: String,
    /// Further messages for the agent in the same room, answered in the same turn
    /// ("Name (id): text").
    pub more: Vec<String>,
}

/// Messages of the room's recent conversation shown in a turn.
pub const RECENT_MESSAGES: usize = 10;
/// "Said since your last turn" messages shown at most (the rest are counted).
pub const SAID_SINCE_SHOWN: usize = 20;
/// Characters of one message shown in a turn's context.
pub const LINE_CHARS: usize = 500;

impl TurnContext {
    /// How many of the room's last messages to fetch for [`TurnContext::assemble`]: the new
    /// ones (the waking ones among them) and [`RECENT_MESSAGES`] before them.
    pub fn recent_window(missed: &Missed) -> usize {
        RECENT_MESSAGES + 1 + missed.messages.len()
    }

    /// Assembles the context of the waking messages (`waking_events`, answered in this turn and
    /// so left out of the lists) from what the dispatcher kept: `missed` (said since the agent's
    /// last turn) and `recent` (the room's last messages, everyone's).
    /// Messages appear once (recent ones that are new to the agent are listed as new), each is
    /// cut to [`LINE_CHARS`], and both lists are bounded, so the size is flat in the history.
    /// Also returns how many messages were said since, shown or not.
    pub fn assemble(
        agent: &UserId,
        missed: &Missed,
        recent: &[Said],
        waking_events: &[&str],
        name_of: impl Fn(&UserId) -> String,
        from: String,
        body: String,
    ) -> (TurnContext, usize) {
        let new: HashSet<&str> = missed
            .messages
            .iter()
            .map(|said| said.event_id.as_str())
            .collect();
        let line = |said: &Said| {
            let name = if said.sender == agent {
                "you".to_owned()
            } else {
                name_of(&said.sender)
            };
            let body: String = said.body.chars().take(LINE_CHARS).collect();
            // One line per message: no body can open a section of the prompt.
            format!("{name}: {}", super::authority::one_line(&body))
        };
        let waking = |said: &Said| waking_events.contains(&said.event_id.as_str());
        let old: Vec<&Said> = recent
            .iter()
            .filter(|said| !waking(said) && !new.contains(said.event_id.as_str()))
            .collect();
        let earlier: Vec<&Said> = missed
            .messages
            .iter()
            .filter(|said| !waking(said))
            .collect();
        let count = missed.count_besides(waking_events);
        let hidden = earlier.len().saturating_sub(SAID_SINCE_SHOWN) + missed.dropped as usize;
        let mut said_since = Vec::new();
        if hidden > 0 {
            said_since.push(format!("({hidden} earlier messages not shown)"));
        }
        said_since.extend(
            earlier[earlier.len().saturating_sub(SAID_SINCE_SHOWN)..]
                .iter()
                .map(|said| line(said)),
        );
        let context = TurnContext {
            recent: old[old.len().saturating_sub(RECENT_MESSAGES)..]
                .iter()
                .map(|said| line(said))
                .collect(),
            said_since,
            left_out: None,
            from,
            body,
            more: Vec::new(),
        };
        (context, count)
    }
}

/// The user message of a turn.
pub fn conversation(context: &TurnContext) -> String {
    let mut conversation = String::new();
    let mut section = |title: &str, lines: &[String]| {
        if lines.is_empty() {
            return;
        }
        conversation.push_str(title);
        conversation.push('\n');
        for line in lines {
            conversation.push_str(line);
            conversation.push('\n');
        }
        conversation.push('\n');
    };
    section("Recent conversation in this room:", &context.recent);
    section(
        "Said in this room since your last turn:",
        &context.said_since,
    );
    if let Some(note) = &context.left_out {
        conversation.push_str(note);
        conversation.push_str("\n\n");
    }
    conversation.push_str(&format!(
        "Message for you from {}:\n{}",
        context.from, context.body
    ));
    if !context.more.is_empty() {
        conversation.push_str("\n\nMore messages for you, answer them together:");
        for message in &context.more {
            conversation.push('\n');
            conversation.push_str(message);
        }
    }
    conversation
}

/// Whether `body`, addressed to an agent, only asks it to stop ("stop", "@alice stop!",
/// "Alice: abort please"). Names of the agent are removed first; a longer sentence that merely
/// contains "stop" is not a stop request.
pub fn is_stop_request(body: &str, names: &[&str]) -> bool {
    let mut text = body.to_lowercase();
    for name in names {
        text = text.replace(&name.to_lowercase(), " ");
    }
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .collect();
    let is_stop = |word: &str| matches!(word, "stop" | "abort" | "halt");
    match words.as_slice() {
        [word] => is_stop(word),
        [first, rest @ ..] if rest.len() <= 2 => {
            is_stop(first)
                && rest
                    .iter()
                    .all(|word| matches!(*word, "now" | "please" | "it" | "that"))
        }
        _ => false,
    }
}

/// Everything one turn runs with.
pub struct Turn<'a> {
    pub llm: &'a LlmClient,
    pub model: &'a str,
    pub limits: TurnLimits,
    pub toolbox: &'a dyn Toolbox,
    pub supervisor: &'a dyn Supervisor,
    pub journal: &'a dyn StepJournal,
}

/// Runs one turn: `system` is the agent's prompt, `conversation` the first user message.
pub async fn run(
    turn: Turn<'_>,
    system: String,
    conversation: String,
) -> Result<TurnOutcome, TurnError> {
    let Turn {
        llm,
        model,
        limits,
        toolbox,
        supervisor,
        journal,
    } = turn;
    let mut messages = vec![Message::system(system), Message::user(conversation)];
    let mut tokens = 0;
    // Messages that arrived while tools ran: they follow the tool results.
    let mut arrived: Vec<String> = Vec::new();
    for step in 0..limits.max_steps {
        let recorded = journal.load(step).await?;
        if recorded.is_none() && step > 0 {
            match supervisor.between_steps().await {
                Between::Stop { by } => return Ok(TurnOutcome::Stopped { by, steps: step }),
                Between::Continue(said) => arrived.extend(said),
            }
        }
        messages.extend(arrived.drain(..).map(Message::user));
        if tokens >= limits.max_tokens {
            return Ok(TurnOutcome::TokenLimit {
                used: tokens,
                limit: limits.max_tokens,
            });
        }
        let mut entry = match recorded {
            Some(entry) => entry,
            None => {
                let mut request = ChatRequest::new(model, messages.clone());
                // Asked at every step: a message adopted mid-turn can lower the authority.
                request.tools = toolbox.tools();
                let response = llm.chat(request).await?;
                let Some(reply) = response.message().cloned() else {
                    return Ok(TurnOutcome::Answer(String::new()));
                };
                let entry = JournaledStep {
                    reply,
                    results: Vec::new(),
                    tokens: response.usage.map(|usage| usage.total_tokens).unwrap_or(0),
                    prompt_tokens: response.usage.map(|usage| usage.prompt_tokens).unwrap_or(0),
                };
                journal.save(step, &entry).await?;
                if !entry.reply.tool_calls.is_empty() {
                    // A stop that came while the model was thinking prevents its tool calls.
                    match supervisor.between_steps().await {
                        Between::Stop { by } => {
                            return Ok(TurnOutcome::Stopped { by, steps: step });
                        }
                        Between::Continue(said) => arrived.extend(said),
                    }
                }
                entry
            }
        };
        tokens += entry.tokens;
        if entry.reply.tool_calls.is_empty() {
            return Ok(TurnOutcome::Answer(
                entry.reply.content.clone().unwrap_or_default(),
            ));
        }
        let calls = entry.reply.tool_calls.clone();
        messages.push(entry.reply.clone());
        for (index, call) in calls.into_iter().enumerate() {
            let result = match entry.results.get(index) {
                Some(done) => {
                    toolbox.replayed(&call.function.name, &call.function.arguments, done);
                    done.clone()
                }
                None => {
                    let name = call.function.name.as_str();
                    let running = toolbox.call(name, &call.function.arguments);
                    let finished = if toolbox.interruptible(name) {
                        supervised(running, supervisor).await
                    } else {
                        Some(running.await)
                    };
                    let result = match finished {
                        Some(result) => result,
                        // Stopped while the tool ran: dropping its call ends it (a command's
                        // process group is killed).
                        None => {
                            let by = match supervisor.between_steps().await {
                                Between::Stop { by } => by,
                                Between::Continue(said) => {
                                    arrived.extend(said);
                                    "someone".to_owned()
                                }
                            };
                            return Ok(TurnOutcome::Stopped { by, steps: step });
                        }
                    };
                    entry.results.push(result.clone());
                    journal.save(step, &entry).await?;
                    result
                }
            };
            messages.push(Message::tool_result(call.id, result));
        }
    }
    Ok(TurnOutcome::StepLimit {
        steps: limits.max_steps,
    })
}

/// How often a long tool call (a command in a sandbox) looks for a stop.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(300);

/// Runs one tool call while watching for a stop; `None` when a stop came first (the call is
/// dropped). Other messages wait for the next step.
async fn supervised(
    call: impl std::future::Future<Output = String>,
    supervisor: &dyn Supervisor,
) -> Option<String> {
    let mut call = std::pin::pin!(call);
    loop {
        tokio::select! {
            result = &mut call => return Some(result),
            () = tokio::time::sleep(STOP_POLL) => {
                if supervisor.peek_stop().await.is_some() {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_requests_are_short_and_explicit() {
        let names = ["@crew_alice:example.org", "Alice"];
        for yes in [
            "stop",
            "STOP!",
            "@crew_alice:example.org stop",
            "Alice: stop now",
            "abort please",
            "halt",
        ] {
            assert!(is_stop_request(yes, &names), "{yes}");
        }
        for no in [
            "don't stop until it is done",
            "stop using tabs in the CSS",
            "Alice: please continue",
            "",
            "the bus stop",
        ] {
            assert!(!is_stop_request(no, &names), "{no}");
        }
    }

    #[test]
    fn the_conversation_leaves_out_empty_sections() {
        let context = TurnContext {
            from: "Ann (@ann:x)".into(),
            body: "hello".into(),
            ..TurnContext::default()
        };
        assert_eq!(
            conversation(&context),
            "Message for you from Ann (@ann:x):\nhello"
        );
        let context = TurnContext {
            recent: vec!["Bob: earlier".into(), "you: my answer".into()],
            said_since: vec!["Bob: new".into()],
            more: vec!["Bob (@bob:x): and this".into()],
            ..context
        };
        let text = conversation(&context);
        assert!(text.ends_with(
            "hello\n\nMore messages for you, answer them together:\nBob (@bob:x): and this"
        ));
        assert!(text.starts_with("Recent conversation in this room:\nBob: earlier\nyou: my answer\n\nSaid in this room since your last turn:\nBob: new\n\n"));
    }
}
