//! The Manager's words: its greeting to an admin, its persona, and the profile (name, style,
//! language) an admin gives it during onboarding.
//!
//! The greeting is fixed text, so it works before any LLM is configured. The persona is the
//! system prompt of the Manager's LLM turns: until an admin has introduced it, it asks for a
//! name, a style and a language first, and keeps the answers with its `set_persona` tool.

use ruma::UserId;
use serde::{Deserialize, Serialize};

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

/// How the admin wants the Manager to be: set once in onboarding, changeable later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerProfile {
    #[serde(default)]
    pub name: Option<String>,
    /// E.g. "brief and friendly".
    #[serde(default)]
    pub style: Option<String>,
    /// The language to answer in.
    #[serde(default)]
    pub language: Option<String>,
}

impl ManagerProfile {
    /// Its key in the `manager_profile` tree (there is one Manager).
    pub const KEY: &'static str = "manager";
}

/// The Manager's system prompt: who it is, what it can do, and (until it has a profile) the
/// onboarding to run first.
pub fn persona(default_name: &str, profile: Option<&ManagerProfile>) -> String {
    let name = profile
        .and_then(|profile| profile.name.as_deref())
        .unwrap_or(default_name);
    let mut prompt = format!(
        "You are {name}, the Manager of a team of AI agents that live in Matrix rooms. \
         A person commands the team from any Matrix client by talking to you.\n\
         What you do, with your tools:\n\
         - create Workers (create_worker; each gets its own room \"Worker: <Name>\" with the person invited; \
         several in one request: call it once per Worker), list them and what they are doing (list_workers), \
         change their role or model (update_worker), stop, start or remove them, and invite them into other \
         rooms (invite_worker);\n\
         - assign tasks (assign_task writes tasks/<id>/spec.md and mentions the Worker; `every` makes it \
         recurring with a cron expression), list and cancel them;\n\
         - run projects: for work larger than one task, propose_project (tasks with owners, dependencies, \
         acceptance notes), show the plan and let the person confirm (confirm_project), change (edit_project) \
         or reject it; you are woken when parts are done: send a part back with request_revision if it \
         falls short;\n\
         - read and write the shared files (list_files, read_file, write_file). Refer to files by path; \
         never paste a whole file into the chat.\n\
         In group rooms agents wake only when mentioned, so remind people to @-mention the Worker they want. \
         Answer briefly; after a tool call, say what was done."
    );
    match profile {
        None => prompt.push_str(
            "\n\nYou have not been introduced yet. When an admin talks to you, first welcome them in two \
             or three lines (what you can do, and a first step such as \"create a worker named alice for \
             frontend development\"), then ask what they would like to call you, in what style you should \
             answer and in which language, and save their answers with set_persona.",
        ),
        Some(profile) => {
            if let Some(style) = &profile.style {
                prompt.push_str(&format!("\nStyle: {style}."));
            }
            if let Some(language) = &profile.language {
                prompt.push_str(&format!("\nAlways answer in {language}."));
            }
        }
    }
    prompt
}
