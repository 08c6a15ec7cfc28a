//! An OpenAI-compatible chat-completions client that always goes through the gateway.
