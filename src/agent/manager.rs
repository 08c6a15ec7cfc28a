//! The Manager's words: what it says when it greets an admin and when it is mentioned.
//!
//! The LLM-driven turn comes later; these fixed messages prove the whole path (homeserver →
//! transaction → inbox → pump → reply) and stay as the fallback when no LLM is configured.

use ruma::UserId;

use crate::matrix::OutgoingMessage;

/// The first message to an admin, in a fresh DM.
pub fn greeting(manager: &UserId, admin: &UserId) -> OutgoingMessage {
    OutgoingMessage::text(format!(
        "Hello {admin}! I am your crew's Manager ({manager}).\n\n\
         I will run a team of AI agents for you, right here in Matrix:\n\
         - ask me to create workers (\"create a worker named alice for frontend\"),\n\
         - invite me or any worker into a room and @-mention us there,\n\
         - in a group room we only wake when you mention us, so we cost nothing otherwise.\n\n\
         Type `!crew help` for the commands that work even without an LLM."
    ))
    .mention(admin.to_owned(), admin.localpart())
}
