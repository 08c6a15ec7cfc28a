//! Messages we send: Markdown rendered to HTML, pills for mentions, `m.mentions` always set,
//! replies placed in the thread or reply chain the conversation came from.

use ruma::{OwnedEventId, OwnedUserId};
use serde_json::{Value, json};

/// Where a reply goes: after `event_id`, inside `thread_root`'s thread when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub event_id: OwnedEventId,
    pub thread_root: Option<OwnedEventId>,
}

impl ReplyTo {
    /// A reply to `event`, in the same thread as `event` if it was in a thread.
    pub fn event(event: &crate::dispatch::RoomEvent) -> Option<Self> {
        let relates = event.message().and_then(|m| m.relates_to.as_ref());
        let thread_root = relates
            .filter(|r| r.rel_type.as_deref() == Some("m.thread"))
            .and_then(|r| r.event_id.clone());
        Some(Self {
            event_id: event.event_id.clone(),
            thread_root,
        })
    }

    /// A reply to an event kept as JSON (`event_id`, `content.m.relates_to`): a `!crew`
    /// command held in an outbox effect.
    pub fn from_json(event: &Value) -> Option<Self> {
        let event_id = event.get("event_id")?.as_str()?.parse().ok()?;
        let relates = event.get("content").and_then(|c| c.get("m.relates_to"));
        let thread_root = relates
            .filter(|r| r.get("rel_type").and_then(Value::as_str) == Some("m.thread"))
            .and_then(|r| r.get("event_id")?.as_str()?.parse().ok());
        Some(Self {
            event_id,
            thread_root,
        })
    }
}

/// One text or notice message.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Markdown. A mentioned user's MXID in the text becomes a pill showing their name.
    pub markdown: String,
    /// Users mentioned (and so notified); always sent as `m.mentions`, empty when nobody.
    pub mentions: Vec<Mention>,
    /// `m.notice` (bots' informational messages; never wakes agents) instead of `m.text`.
    pub notice: bool,
    pub reply_to: Option<ReplyTo>,
    /// Further content fields (e.g. the wake depth the dispatcher reads back from our echoes).
    pub extra: serde_json::Map<String, Value>,
}

/// A mentioned user and the name the pill shows.
#[derive(Debug, Clone)]
pub struct Mention {
    pub user_id: OwnedUserId,
    pub display_name: String,
}

impl OutgoingMessage {
    pub fn text(markdown: impl Into<String>) -> Self {
        Self {
            markdown: markdown.into(),
            mentions: Vec::new(),
            notice: false,
            reply_to: None,
            extra: serde_json::Map::new(),
        }
    }

    pub fn notice(markdown: impl Into<String>) -> Self {
        Self {
            notice: true,
            ..Self::text(markdown)
        }
    }

    pub fn mention(mut self, user_id: OwnedUserId, display_name: impl Into<String>) -> Self {
        self.mentions.push(Mention {
            user_id,
            display_name: display_name.into(),
        });
        self
    }

    /// Adds a custom content field.
    pub fn with_field(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    pub fn reply_to(mut self, reply_to: Option<ReplyTo>) -> Self {
        self.reply_to = reply_to;
        self
    }

    /// The `m.room.message` content.
    pub fn to_content(&self) -> Value {
        let mut body = self.markdown.clone();
        let mut html = render_markdown(&self.markdown);
        for mention in &self.mentions {
            let id = mention.user_id.as_str();
            let name = if mention.display_name.is_empty() {
                id
            } else {
                &mention.display_name
            };
            body = body.replace(id, name);
            let pill = format!(
                "<a href=\"https://matrix.to/#/{}\">{}</a>",
                id,
                escape_html(name)
            );
            html = html.replace(&escape_html(id), &pill);
        }
        let user_ids: Vec<&str> = self.mentions.iter().map(|m| m.user_id.as_str()).collect();
        let mut content = json!({
            "msgtype": if self.notice { "m.notice" } else { "m.text" },
            "body": body,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
            "m.mentions": { "user_ids": user_ids },
        });
        for (key, value) in &self.extra {
            content[key] = value.clone();
        }
        if let Some(reply) = &self.reply_to {
            content["m.relates_to"] = match &reply.thread_root {
                Some(root) => json!({
                    "rel_type": "m.thread",
                    "event_id": root,
                    "is_falling_back": false,
                    "m.in_reply_to": { "event_id": reply.event_id },
                }),
                None => json!({ "m.in_reply_to": { "event_id": reply.event_id } }),
            };
        }
        content
    }
}

/// CommonMark (with tables and strikethrough) to HTML; raw HTML in the input is escaped so an
/// agent cannot inject markup.
pub fn render_markdown(markdown: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, html};
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    let parser = Parser::new_ext(markdown, options).map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, parser);
    let trimmed = out.trim_end();
    // A single paragraph renders without the <p> wrapper, as Element does.
    if let Some(inner) = trimmed
        .strip_prefix("<p>")
        .and_then(|rest| rest.strip_suffix("</p>"))
        .filter(|inner| !inner.contains("<p>"))
    {
        return inner.to_owned();
    }
    trimmed.to_owned()
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_become_pills_and_m_mentions() {
        let alice: OwnedUserId = "@alice:example.org".parse().unwrap();
        let content = OutgoingMessage::text("Hi @alice:example.org, **welcome**")
            .mention(alice, "Alice")
            .to_content();
        assert_eq!(content["body"], "Hi Alice, **welcome**");
        assert_eq!(
            content["formatted_body"],
            "Hi <a href=\"https://matrix.to/#/@alice:example.org\">Alice</a>, <strong>welcome</strong>"
        );
        assert_eq!(content["m.mentions"]["user_ids"][0], "@alice:example.org");
        assert_eq!(content["msgtype"], "m.text");
    }

    #[test]
    fn every_message_carries_m_mentions_even_when_empty() {
        let content = OutgoingMessage::notice("status").to_content();
        assert_eq!(content["m.mentions"], json!({"user_ids": []}));
        assert_eq!(content["msgtype"], "m.notice");
    }

    #[test]
    fn replies_stay_in_their_thread() {
        let event = json!({"event_id": "$reply", "content": {"m.relates_to":
            {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true,
             "m.in_reply_to": {"event_id": "$prev"}}}});
        let content = OutgoingMessage::text("ok")
            .reply_to(ReplyTo::from_json(&event))
            .to_content();
        assert_eq!(content["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(content["m.relates_to"]["event_id"], "$root");
        assert_eq!(
            content["m.relates_to"]["m.in_reply_to"]["event_id"],
            "$reply"
        );
    }

    #[test]
    fn raw_html_is_escaped() {
        assert_eq!(
            render_markdown("<script>x</script>"),
            "&lt;script&gt;x&lt;/script&gt;"
        );
    }
}
