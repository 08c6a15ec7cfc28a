//! Request paths the gateway refuses before it looks for a route.
//!
//! A route is a promise: a consumer reaches the route's upstream under the route's path and nothing
//! else. URL libraries (the `url` crate included) resolve `.` and `..` segments, and treat `%2e`
//! as a dot and `\` as a slash, so a path like `/llm/%2e%2e/github/user` would be matched to the
//! `llm` route and then normalised into another upstream path. The gateway therefore refuses any
//! path that a normaliser could change, before route matching: dot segments (raw or
//! percent-encoded, in any case, also double-encoded), backslashes and encoded slashes, and
//! encoded control characters. After the upstream URL is built, [`stays_under`] checks that it
//! still starts with the route's upstream path, as a second line.
//!
//! Not for: deciding which route serves a path (see [`super::proxy`]).

use percent_encoding::percent_decode_str;

/// Why a path was refused; each has a machine code for the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PathRefusal {
    /// A `.` or `..` segment, raw or percent-encoded.
    DotSegment,
    /// A `\`, raw or percent-encoded.
    Backslash,
    /// A percent-encoded `/`.
    EncodedSlash,
    /// A percent-encoded control character (NUL, newline, …).
    ControlCharacter,
}

impl PathRefusal {
    /// The machine-readable code answered to the consumer.
    pub(super) fn code(self) -> &'static str {
        match self {
            Self::DotSegment => "path_dot_segment",
            Self::Backslash => "path_backslash",
            Self::EncodedSlash => "path_encoded_slash",
            Self::ControlCharacter => "path_control_character",
        }
    }

    pub(super) fn message(self) -> &'static str {
        match self {
            Self::DotSegment => "the path has a `.` or `..` segment (perhaps percent-encoded)",
            Self::Backslash => "the path has a backslash (perhaps percent-encoded)",
            Self::EncodedSlash => "the path has an encoded slash (`%2F`)",
            Self::ControlCharacter => "the path has an encoded control character",
        }
    }
}

/// How many rounds of percent-decoding are looked through (`%252e` is `%2e` is `.`).
const DECODE_ROUNDS: usize = 3;

/// Checks the raw request path (as received, still percent-encoded).
pub(super) fn check(raw_path: &str) -> Result<(), PathRefusal> {
    if raw_path.contains('\\') {
        return Err(PathRefusal::Backslash);
    }
    for segment in raw_path.split('/') {
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(raw: &str) -> Result<(), PathRefusal> {
    let mut current = std::borrow::Cow::Borrowed(raw);
    for _ in 0..DECODE_ROUNDS {
        if current == "." || current == ".." {
            return Err(PathRefusal::DotSegment);
        }
        if !current.contains('%') {
            return Ok(());
        }
        let bytes: Vec<u8> = percent_decode_str(&current).collect();
        if bytes.contains(&b'/') {
            return Err(PathRefusal::EncodedSlash);
        }
        if bytes.contains(&b'\\') {
            return Err(PathRefusal::Backslash);
        }
        if bytes.iter().any(|b| b.is_ascii_control()) {
            return Err(PathRefusal::ControlCharacter);
        }
        let decoded = String::from_utf8_lossy(&bytes).into_owned();
        if decoded == *current {
            return Ok(());
        }
        current = std::borrow::Cow::Owned(decoded);
    }
    if current == "." || current == ".." {
        return Err(PathRefusal::DotSegment);
    }
    Ok(())
}

/// Whether `upstream_path` (of the final URL) is `base` or lies under it.
pub(super) fn stays_under(upstream_path: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    upstream_path
        .strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/llm/chat/completions",
            "/github/repos/a/b/contents/src%20dir/x.rs",
            "/llm/models/gpt-4o-mini",
            "/github/repos/a/b/.github",
            "/github/repos/a/b/...",
            "/llm/",
            "/",
        ] {
            assert_eq!(check(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn dot_segments_in_any_encoding_are_refused() {
        for path in [
            "/llm/../github/user",
            "/llm/./x",
            "/llm/..",
            "/llm/%2e%2e/github",
            "/llm/%2E%2E/github",
            "/llm/.%2E/github",
            "/llm/%2e./github",
            "/llm/%2e/x",
            "/llm/%252e%252e/github",
        ] {
            assert_eq!(check(path), Err(PathRefusal::DotSegment), "{path}");
        }
    }

    #[test]
    fn slashes_and_backslashes_in_disguise_are_refused() {
        assert_eq!(check("/llm/..\\x"), Err(PathRefusal::Backslash));
        assert_eq!(check("/llm/a%5cb"), Err(PathRefusal::Backslash));
        assert_eq!(check("/llm/a%5Cb"), Err(PathRefusal::Backslash));
        assert_eq!(check("/llm/a%2fb"), Err(PathRefusal::EncodedSlash));
        assert_eq!(check("/llm/a%2Fb"), Err(PathRefusal::EncodedSlash));
        assert_eq!(check("/llm/a%252Fb"), Err(PathRefusal::EncodedSlash));
        assert_eq!(check("/llm/a%00b"), Err(PathRefusal::ControlCharacter));
    }

    #[test]
    fn the_final_url_must_stay_under_the_upstream_path() {
        assert!(stays_under("/v1/chat/completions", "/v1"));
        assert!(stays_under("/v1", "/v1/"));
        assert!(stays_under("/anything", "/"));
        assert!(!stays_under("/v10/x", "/v1"));
        assert!(!stays_under("/gh/user", "/v1"));
    }
}
