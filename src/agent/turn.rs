//! The agent turn. Today it is the fixed acknowledgement (the LLM-driven turn replaces its body,
//! not its shape): one turn per agent at a time, every waking message answered in its thread,
//! the wake depth carried on what the agent says.

use ruma::{OwnedUserId, UserId};
use serde_json::Value;

use crate::dispatch::{DEPTH_KEY, RoomEvent};
use crate::matrix::OutgoingMessage;
use crate::matrix::message::ReplyTo;

/// What the turn needs to know about one waking message.
pub struct WakingMessage<'a> {
    pub event: &'a RoomEvent,
    pub sender: &'a UserId,
    pub sender_name: &'a str,
    /// Our other agents the message mentioned; the acknowledgement loops them in. (This is the
    /// "ack mirror" that makes agents ping-pong; the dispatcher's depth budget stops it.)
    pub also_mentioned: Vec<(OwnedUserId, String)>,
    pub depth: u32,
    /// Messages said in the room since this agent's last turn that did not wake it.
    pub said_since: usize,
}

/// The acknowledgement for one waking message.
pub fn acknowledge(message: &WakingMessage<'_>) -> OutgoingMessage {
    let mut text = format!("{}: got it, I heard you.", message.sender);
    if !message.also_mentioned.is_empty() {
        let names: Vec<&str> = message
            .also_mentioned
            .iter()
            .map(|(id, _)| id.as_str())
            .collect();
        text.push_str(&format!(" Looping in {}.", names.join(", ")));
    }
    if message.said_since > 0 {
        text.push_str(&format!(
            " ({} earlier messages here since my last turn.)",
            message.said_since
        ));
    }
    let mut reply = OutgoingMessage::text(text)
        .mention(message.sender.to_owned(), message.sender_name)
        .reply_to(ReplyTo::event(message.event))
        .with_field(DEPTH_KEY, Value::from(message.depth + 1));
    for (id, name) in &message.also_mentioned {
        reply = reply.mention(id.clone(), name.clone());
    }
    reply
}
