//! Storage paths: the one normalised, validated form every key takes before it reaches a backend.
//!
//! Agents and operators type paths; a path that could escape the store (`..`, an absolute path),
//! confuse a backend (empty segments, control characters, backslashes) or be ambiguous is refused
//! here with a sentence that says what is wrong. Not for access rules (see `access`).

use std::fmt;

use super::StorageError;

/// S3 keys are at most 1024 bytes of UTF-8 (AWS S3 user guide, "Naming objects").
pub const MAX_PATH_BYTES: usize = 1024;

/// A validated key such as `tasks/42/plan.md`: relative, `/`-separated, no empty, `.` or `..`
/// segments, no control characters or backslashes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoragePath(String);

impl StoragePath {
    /// Validates `raw` as a file path. A single leading `./` is not accepted: paths are written
    /// exactly as they are stored, so two spellings never name one file.
    pub fn parse(raw: &str) -> Result<Self, StorageError> {
        check(raw, false)?;
        Ok(Self(raw.to_owned()))
    }

    /// The path as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment (the file name).
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The `/`-separated segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// `self` followed by `/` and `child` (itself validated).
    pub fn join(&self, child: &str) -> Result<Self, StorageError> {
        Self::parse(&format!("{}/{child}", self.0))
    }
}

impl fmt::Display for StoragePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StoragePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A listing prefix: empty (everything), a folder such as `tasks/42/`, or any leading part of a
/// path (`tasks/4` matches `tasks/4/…` and `tasks/42/…`, as in S3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoragePrefix(String);

impl StoragePrefix {
    /// Validates `raw` with the path rules, except that it may be empty or end with `/`.
    pub fn parse(raw: &str) -> Result<Self, StorageError> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        check(raw, true)?;
        Ok(Self(raw.to_owned()))
    }

    /// The prefix as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` starts with this prefix.
    pub fn matches(&self, path: &str) -> bool {
        path.starts_with(&self.0)
    }
}

impl From<&StoragePath> for StoragePrefix {
    fn from(path: &StoragePath) -> Self {
        Self(format!("{}/", path.0))
    }
}

fn check(raw: &str, prefix: bool) -> Result<(), StorageError> {
    let invalid = |reason: String| StorageError::InvalidPath {
        path: printable(raw),
        reason,
    };
    if raw.is_empty() {
        return Err(invalid("the path is empty".into()));
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "the path is {} bytes long; the limit is {MAX_PATH_BYTES}",
            raw.len()
        )));
    }
    if raw.starts_with('/') {
        return Err(invalid(
            "absolute paths are not allowed; write it relative to the store, e.g. `shared/notes.md`"
                .into(),
        ));
    }
    if let Some(c) = raw.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "control character U+{:04X} is not allowed in paths",
            c as u32
        )));
    }
    if raw.contains('\\') {
        return Err(invalid(
            "backslashes are not allowed; separate folders with `/`".into(),
        ));
    }
    let body = if prefix {
        raw.strip_suffix('/').unwrap_or(raw)
    } else {
        raw
    };
    for segment in body.split('/') {
        match segment {
            "" => {
                return Err(invalid(
                    "empty path segment (`//` or a trailing `/`); name a file, e.g. `shared/a.md`"
                        .into(),
                ));
            }
            "." | ".." => {
                return Err(invalid(format!(
                    "`{segment}` segments are not allowed; paths cannot leave or re-enter folders"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The path for error messages, with control characters escaped so they cannot forge log lines.
fn printable(raw: &str) -> String {
    let mut out: String = raw.chars().take(200).flat_map(char::escape_debug).collect();
    if raw.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a",
            "tasks/42/plan.md",
            "shared/.gitignore",
            "agents/ann/notes …md",
            "x/..y/z",
        ] {
            assert_eq!(StoragePath::parse(ok).expect(ok).as_str(), ok);
        }
    }

    #[test]
    fn rejects_escapes_and_oddities_with_reasons() {
        for (bad, needle) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("a/../b", "`..`"),
            ("a/./b", "`.`"),
            ("a//b", "empty path segment"),
            ("a/", "empty path segment"),
            ("a\nb", "U+000A"),
            ("a\u{7f}b", "U+007F"),
            ("a\\b", "backslash"),
        ] {
            let error = StoragePath::parse(bad).expect_err(bad).to_string();
            assert!(error.contains(needle), "{bad:?}: {error}");
        }
        let long = "a".repeat(MAX_PATH_BYTES + 1);
        assert!(StoragePath::parse(&long).is_err());
    }

    #[test]
    fn prefixes_may_be_empty_or_end_with_a_slash() {
        assert_eq!(StoragePrefix::parse("").expect("empty").as_str(), "");
        assert!(StoragePrefix::parse("tasks/").is_ok());
        assert!(StoragePrefix::parse("tasks/4").is_ok());
        assert!(StoragePrefix::parse("tasks//").is_err());
        assert!(StoragePrefix::parse("../").is_err());
        let prefix = StoragePrefix::parse("tasks/4").expect("valid");
        assert!(prefix.matches("tasks/42/a"));
        assert!(!prefix.matches("shared/tasks/4"));
    }
}
