//! Reading message text for addressing: reply-fallback stripping, pills, full user ids, whole
//! words.
//!
//! This is the legacy half of mention detection (clients that send no `m.mentions`) plus the
//! keyword and hint matching. It is not the place for policy: it only answers "does this text
//! address that user id / contain that word".

use ruma::UserId;

/// The `matrix.to` prefix of a user pill.
const MATRIX_TO: &str = "https://matrix.to/#/";
/// The `matrix:` URI scheme prefix (MSC2312, spec'd in v1.2).
const MATRIX_SCHEME: &str = "matrix:";

/// Removes quoted lines (`>`), which include the rich-reply fallback that older clients put at the
/// top of `body`. Quoted text is someone else's words: quoting a message that mentioned an agent
/// must not wake it again. Returns the input unchanged (borrowed) when nothing is quoted.
pub fn strip_quotes(body: &str) -> std::borrow::Cow<'_, str> {
    if !body.starts_with('>') && !body.contains("\n>") {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = String::with_capacity(body.len());
    let mut after_fallback = body.starts_with('>');
    for line in body.split('\n') {
        if line.starts_with('>') {
            continue;
        }
        // The spec's fallback is followed by one empty line; drop it with the fallback.
        if after_fallback {
            after_fallback = false;
            if line.trim().is_empty() {
                continue;
            }
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    std::borrow::Cow::Owned(out)
}

/// Removes `<mx-reply>…</mx-reply>` (the HTML reply fallback) and `<blockquote>…</blockquote>`
/// (quotes) from `formatted_body`, for the same reason as [`strip_quotes`]. Tags are matched
/// case-insensitively and nesting is respected; an unclosed element is removed to the end.
pub fn strip_html_quotes(html: &str) -> std::borrow::Cow<'_, str> {
    let lower_has = |needle: &str| contains_ignore_ascii_case(html, needle);
    if !lower_has("<mx-reply") && !lower_has("<blockquote") {
        return std::borrow::Cow::Borrowed(html);
    }
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    let mut depth = 0usize;
    while let Some(pos) = rest.find('<') {
        let (before, tag_and_after) = rest.split_at(pos);
        if depth == 0 {
            out.push_str(before);
        }
        let tag_end = tag_and_after
            .find('>')
            .map_or(tag_and_after.len(), |end| end + 1);
        let tag = &tag_and_after[..tag_end];
        let name = tag_name(tag);
        let quoting =
            name.eq_ignore_ascii_case("mx-reply") || name.eq_ignore_ascii_case("blockquote");
        if quoting && !tag.ends_with("/>") {
            if tag.starts_with("</") {
                depth = depth.saturating_sub(1);
            } else {
                depth += 1;
            }
        } else if depth == 0 {
            out.push_str(tag);
        }
        rest = &tag_and_after[tag_end..];
    }
    if depth == 0 {
        out.push_str(rest);
    }
    std::borrow::Cow::Owned(out)
}

/// The element name of `<name …>` or `</name>`, empty for anything else.
fn tag_name(tag: &str) -> &str {
    let inner = tag.trim_start_matches('<').trim_start_matches('/');
    let end = inner
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(inner.len());
    &inner[..end]
}

fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

/// Calls `found` with every user id that a pill in `html` (already stripped of quotes) points to:
/// `https://matrix.to/#/@user:server` (plain or percent-encoded) and `matrix:u/user:server`.
/// Only link targets count, not link text: the text is usually a display name.
pub fn for_each_pill(html: &str, mut found: impl FnMut(&UserId)) {
    let mut rest = html;
    while let Some(pos) = find_ignore_ascii_case(rest, "href") {
        rest = &rest[pos + 4..];
        let Some(value) = attribute_value(rest) else {
            continue;
        };
        if let Some(user) = pill_target(value) {
            found(&user);
        }
    }
}

/// The value of an attribute whose name was just consumed: `="…"`, `='…'` or `=bare`.
fn attribute_value(after_name: &str) -> Option<&str> {
    let s = after_name.trim_start();
    let s = s.strip_prefix('=')?.trim_start();
    let (quote, s) = match s.chars().next()? {
        q @ ('"' | '\'') => (Some(q), &s[1..]),
        _ => (None, s),
    };
    let end = match quote {
        Some(q) => s.find(q)?,
        None => s
            .find(|c: char| c.is_whitespace() || c == '>')
            .unwrap_or(s.len()),
    };
    Some(&s[..end])
}

/// The user a link points to, if it is a user pill.
///
/// Parsed here rather than with `ruma::MatrixToUri` / `MatrixUri`: ruma-common 0.20 panics
/// (index out of bounds) on hostile links such as `https://matrix.to/#///a`, and a pill is
/// only ever one user id anyway.
pub fn pill_target(href: &str) -> Option<ruma::OwnedUserId> {
    let href = href.trim();
    // The query (`?via=…`, `?action=chat`) never changes the user and is often HTML-escaped
    // (`&amp;`); drop it.
    let href = href.split('?').next().unwrap_or(href);
    let strip = |prefix: &str| {
        href.get(..prefix.len())
            .filter(|start| start.eq_ignore_ascii_case(prefix))
            .map(|_| &href[prefix.len()..])
    };
    let encoded = if let Some(rest) = strip(MATRIX_TO) {
        // `@user:server`, percent-encoded or not; a trailing `/` is allowed.
        rest.strip_suffix('/').unwrap_or(rest)
    } else if let Some(rest) = strip(MATRIX_SCHEME) {
        // `u/user:server` or `user/user:server` (the sigil is implied by the type).
        let rest = rest.strip_prefix("//").map_or(rest, |authority_and_path| {
            // `matrix://authority/u/…` is not used for users; keep only what follows a `/`.
            authority_and_path
                .split_once('/')
                .map_or("", |(_, path)| path)
        });
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (kind, id) = rest.split_once('/')?;
        if kind != "u" && kind != "user" {
            return None;
        }
        let decoded = percent_encoding::percent_decode_str(id)
            .decode_utf8()
            .ok()?;
        return UserId::parse(format!("@{decoded}")).ok();
    } else {
        return None;
    };
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    if !decoded.starts_with('@') || decoded.contains('/') {
        return None;
    }
    UserId::parse(decoded.as_ref()).ok()
}

fn find_ignore_ascii_case(haystack: &str, needle: &str) -> Option<usize> {
    let needle = needle.as_bytes();
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|window| window.eq_ignore_ascii_case(needle))
}

/// True when `body` contains the full user id `user` standing alone: not preceded by a
/// character that could belong to a localpart, and not continued into a longer server name or
/// a port (`@a:example.org.uk`, `@a:example.org:8448` are other users).
pub fn mentions_user_id(body: &str, user: &str) -> bool {
    let Some(first) = user.chars().next() else {
        return false;
    };
    let mut start = 0;
    while let Some(pos) = body[start..].find(user) {
        let at = start + pos;
        let end = at + user.len();
        start = at + first.len_utf8();
        let before_ok = body[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_localpart_char(c));
        let after = &body[end..];
        let mut next = after.chars();
        let after_ok = match next.next() {
            None => true,
            Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => false,
            // `.` or `:` continue the server name or add a port only when followed by more of it.
            Some('.') | Some(':') => next.next().is_none_or(|c| !c.is_ascii_alphanumeric()),
            Some(_) => true,
        };
        if before_ok && after_ok {
            return true;
        }
    }
    false
}

fn is_localpart_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._=-/+@".contains(c)
}

/// True when `needle` (already lowercase) occurs in `haystack_lower` (already lowercase) as a
/// whole word: the characters on each side are not letters, digits or `_`.
pub fn contains_word(haystack_lower: &str, needle_lower: &str) -> bool {
    if needle_lower.is_empty() {
        return false;
    }
    let mut start = 0;
    while let Some(pos) = haystack_lower[start..].find(needle_lower) {
        let at = start + pos;
        let end = at + needle_lower.len();
        let before_ok = haystack_lower[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word_char(c));
        let after_ok = haystack_lower[end..]
            .chars()
            .next()
            .is_none_or(|c| !is_word_char(c));
        if before_ok && after_ok {
            return true;
        }
        start = at
            + haystack_lower[at..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
    }
    false
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// True when the legacy `@room` keyword appears as a word (the `.m.rule.roomnotif` push rule).
pub fn mentions_room_legacy(body: &str) -> bool {
    let mut start = 0;
    while let Some(pos) = body[start..].find("@room") {
        let at = start + pos;
        let end = at + "@room".len();
        let before_ok = body[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word_char(c));
        let after_ok = body[end..].chars().next().is_none_or(|c| !is_word_char(c));
        if before_ok && after_ok {
            return true;
        }
        start = end;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_reply_fallback_and_quotes() {
        let body = "> <@alice:example.org> @crew_a:example.org do it\n> more\n\nthanks";
        assert_eq!(strip_quotes(body), "thanks");
        assert_eq!(strip_quotes("plain"), "plain");
        assert_eq!(strip_quotes("a\n> quoted\nb"), "a\nb");
    }

    #[test]
    fn strips_mx_reply_and_blockquote() {
        let html = "<mx-reply><blockquote><a href=\"https://matrix.to/#/@a:x\">A</a></blockquote></mx-reply>hi <b>there</b>";
        assert_eq!(strip_html_quotes(html), "hi <b>there</b>");
        let html = "<MX-REPLY>x<blockquote>y</blockquote>z</MX-REPLY>keep";
        assert_eq!(strip_html_quotes(html), "keep");
        assert_eq!(strip_html_quotes("<mx-reply>unclosed"), "");
    }

    #[test]
    fn pills_in_every_form() {
        for href in [
            "https://matrix.to/#/@crew_a:example.org",
            "https://matrix.to/#/%40crew_a%3Aexample.org",
            "https://matrix.to/#/@crew_a:example.org?via=example.org&amp;via=b.org",
            "matrix:u/crew_a:example.org",
            "matrix:u/crew_a:example.org?action=chat",
            "MATRIX:u/crew_a%3Aexample.org",
        ] {
            assert_eq!(
                pill_target(href).map(|u| u.to_string()).as_deref(),
                Some("@crew_a:example.org"),
                "{href}"
            );
        }
        assert!(pill_target("https://matrix.to/#/#room:example.org").is_none());
        assert!(pill_target("https://example.org/@crew_a:example.org").is_none());
        assert!(pill_target("matrix:r/room:example.org").is_none());
        assert!(pill_target("ééééééééééééééééééééééé").is_none());
        assert!(pill_target("matrix").is_none());
        // Links that make ruma-common 0.20's URI parsers panic.
        for hostile in [
            "https://matrix.to/#///a",
            "https://matrix.to/#/!a//",
            "https://matrix.to/#//",
            "matrix:u///a",
            "matrix:u/",
            "matrix:u/%FF",
        ] {
            assert!(pill_target(hostile).is_none(), "{hostile}");
        }
        let mut seen = Vec::new();
        for_each_pill(
            "<a href='https://matrix.to/#/@b:x.org'>B</a> and <a HREF=matrix:u/c:x.org>C</a>",
            |u| seen.push(u.to_string()),
        );
        assert_eq!(seen, ["@b:x.org", "@c:x.org"]);
    }

    #[test]
    fn full_user_ids_in_body() {
        let id = "@crew_a:example.org";
        assert!(mentions_user_id("hey @crew_a:example.org, please", id));
        assert!(mentions_user_id("@crew_a:example.org: do it", id));
        assert!(mentions_user_id("ask @crew_a:example.org.", id));
        assert!(mentions_user_id("(@crew_a:example.org)", id));
        assert!(!mentions_user_id("@crew_a:example.org.uk", id));
        assert!(!mentions_user_id("@crew_a:example.org:8448", id));
        assert!(!mentions_user_id("@x@crew_a:example.org", id));
        assert!(!mentions_user_id("crew_a", id));
        assert!(mentions_user_id("x @crew_a:example.org", id));
        assert!(!mentions_user_id("anything", ""));
        assert!(mentions_user_id("é @é:x.org", "@é:x.org"));
    }

    #[test]
    fn whole_words() {
        assert!(contains_word("please deploy now", "deploy"));
        assert!(!contains_word("redeploy now", "deploy"));
        assert!(!contains_word("deploy_now", "deploy"));
        assert!(contains_word("ship it: deploy!", "deploy"));
        assert!(contains_word("the release notes", "release notes"));
        assert!(!contains_word("anything", ""));
        assert!(contains_word("é deploy", "deploy"));
        assert!(mentions_room_legacy("@room hello"));
        assert!(!mentions_room_legacy("@roommate hello"));
    }
}
