//! Cutting real keys out of what upstreams answer.
//!
//! Providers echo keys in error answers, whole or masked: OpenAI says "Incorrect API key
//! provided: sk-proj-****…abcd", others print the first and last characters. Such a body reaches
//! an agent and from there a room, so any recognisable part of a key is cut: every run of at least
//! [`MIN_RUN`] characters that also occurs in a key, the key's first [`PREFIX`] characters, and its
//! last [`SUFFIX`] characters where they follow a mask (`*`, `.`, `…`).
//!
//! Not for: request headers (see [`super::headers`]).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// A run this long shared with a key is cut wherever it appears.
const MIN_RUN: usize = 8;
/// A key's first characters, as masked forms keep them.
const PREFIX: usize = 6;
/// A key's last characters, as masked forms keep them after the mask.
const SUFFIX: usize = 4;
const REPLACEMENT: &[u8] = b"[redacted]";

/// The keys of one route, prepared for scanning.
pub(super) struct Redactor {
    keys: Vec<Vec<u8>>,
    /// Every `MIN_RUN`-byte window of every key (the whole key when it is shorter), packed by
    /// [`pack`]. Every response header of every answer is scanned window by window, so a lookup
    /// is a multiply rather than a SipHash of a byte vector (docs/benchmarks.md, "Gateway").
    runs: HashSet<u64, BuildHasherDefault<WindowHasher>>,
}

/// A window of at most 8 bytes as one integer (little-endian, zero-padded). A window of a key
/// shorter than `MIN_RUN` may equal a text window that ends in NUL bytes: that only cuts more.
fn pack(window: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..window.len()].copy_from_slice(window);
    u64::from_le_bytes(bytes)
}

/// Hashes a packed window: a folded 128-bit multiply, which spreads every input bit over the
/// high and low bits the table uses. The windows are the operator's keys, not attacker input.
#[derive(Default)]
struct WindowHasher(u64);

impl Hasher for WindowHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0 ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(value ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Redactor {
    pub(super) fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| !k.is_empty())
            .map(|k| k.as_bytes().to_vec())
            .collect();
        let mut runs = HashSet::default();
        for key in &keys {
            for window in key.windows(MIN_RUN.min(key.len())) {
                runs.insert(pack(window));
            }
        }
        Self { keys, runs }
    }

    fn is_run(&self, window: &[u8]) -> bool {
        self.runs.contains(&pack(window))
    }

    /// Which bytes of `text` belong to a recognisable part of a key.
    fn marks(&self, text: &[u8]) -> Vec<bool> {
        let mut marked = vec![false; text.len()];
        for key in &self.keys {
            let run = MIN_RUN.min(key.len());
            for start in 0..text.len().saturating_sub(run - 1) {
                if self.is_run(&text[start..start + run]) {
                    marked[start..start + run].fill(true);
                }
            }
            let prefix = &key[..PREFIX.min(key.len())];
            let suffix = &key[key.len() - SUFFIX.min(key.len())..];
            for start in 0..text.len() {
                let rest = &text[start..];
                if rest.starts_with(prefix) {
                    // As much of the key as the text keeps.
                    let kept = rest
                        .iter()
                        .zip(key.iter())
                        .take_while(|(a, b)| a == b)
                        .count();
                    marked[start..start + kept].fill(true);
                }
                if rest.starts_with(suffix) && follows_mask(&text[..start]) {
                    marked[start..start + suffix.len()].fill(true);
                }
            }
        }
        marked
    }

    /// Whether any part of a key is in `text`: whatever [`Self::marks`] would mark, found
    /// without building the marks (every response header is checked).
    pub(super) fn leaks(&self, text: &[u8]) -> bool {
        self.keys.iter().any(|key| {
            let run = MIN_RUN.min(key.len());
            let prefix = &key[..PREFIX.min(key.len())];
            let suffix = &key[key.len() - SUFFIX.min(key.len())..];
            text.windows(run).any(|window| self.is_run(window))
                || text
                    .windows(prefix.len())
                    .any(|window| window[0] == prefix[0] && window == prefix)
                || (0..text.len())
                    .any(|start| text[start..].starts_with(suffix) && follows_mask(&text[..start]))
        })
    }

    /// `text` with every recognisable part of a key replaced by `[redacted]`.
    pub(super) fn redact(&self, text: &[u8]) -> Vec<u8> {
        let marked = self.marks(text);
        if !marked.contains(&true) {
            return text.to_vec();
        }
        let mut out = Vec::with_capacity(text.len());
        let mut index = 0;
        while index < text.len() {
            if marked[index] {
                out.extend_from_slice(REPLACEMENT);
                while index < text.len() && marked[index] {
                    index += 1;
                }
            } else {
                out.push(text[index]);
                index += 1;
            }
        }
        out
    }
}

fn follows_mask(before: &[u8]) -> bool {
    before.ends_with(b"*") || before.ends_with(b".") || before.ends_with("…".as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-proj-Q7xW2mN9vB4kL8pR3tY6";

    fn redacted(text: &str) -> String {
        String::from_utf8(Redactor::new([KEY]).redact(text.as_bytes())).unwrap()
    }

    #[test]
    fn whole_and_partial_keys_are_cut() {
        assert_eq!(redacted(&format!("bad key {KEY}!")), "bad key [redacted]!");
        assert_eq!(
            redacted("Incorrect API key provided: sk-proj-****************3tY6."),
            "Incorrect API key provided: [redacted]****************[redacted]."
        );
        assert_eq!(redacted("key sk-proj…3tY6"), "key [redacted]…[redacted]");
        assert_eq!(redacted("part mN9vB4kL8p here"), "part [redacted] here");
    }

    #[test]
    fn text_without_a_key_is_untouched() {
        let text = "rate limited; 3tY6 requests over; try again";
        assert_eq!(redacted(text), text);
        assert!(!Redactor::new([KEY]).leaks(text.as_bytes()));
        assert!(Redactor::new([KEY]).leaks(b"x sk-proj-**** y"));
    }

    #[test]
    fn leaks_agrees_with_what_redact_would_cut() {
        let redactor = Redactor::new([KEY, "short"]);
        for text in [
            "nothing here at all",
            "Bearer sk-proj-Q7xW2mN9vB4kL8pR3tY6",
            "part mN9vB4kL8p here",
            "masked ****3tY6",
            "unmasked 3tY6",
            "sk-pro",
            "sk-proj",
            "a short one",
            "shor",
            "",
        ] {
            let cut = redactor.redact(text.as_bytes()) != text.as_bytes();
            assert_eq!(redactor.leaks(text.as_bytes()), cut, "{text:?}");
        }
    }
}
