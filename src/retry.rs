//! The one retry policy for calls that may fail for a while (the homeserver, the outbox, the
//! LLM): exponential backoff with jitter from `backon`, stretched to what the server asked for
//! (`Retry-After`, `retry_after_ms`) within a cap. Callers say what is worth retrying.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Waits of `first`, doubling, with jitter (so callers that failed together do not retry
/// together), at most `max`, for `retries` retries after the first attempt.
pub fn exponential(first: Duration, max: Duration, retries: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_max_times(retries)
        .with_jitter()
}

/// The wait before the next attempt: the backoff's `wait`, at least what the server `asked`
/// for, at most `cap`; `None` (the backoff is over) stays `None`.
pub fn at_least_asked(
    wait: Option<Duration>,
    asked: Option<Duration>,
    cap: Duration,
) -> Option<Duration> {
    let wait = wait?;
    Some(wait.max(asked.unwrap_or_default()).min(cap))
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;

    use super::*;

    #[test]
    fn waits_grow_stay_under_the_cap_and_end() {
        let cap = Duration::from_secs(1);
        let waits: Vec<Duration> = exponential(Duration::from_millis(100), cap, 6)
            .build()
            .collect();
        assert_eq!(waits.len(), 6);
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] < Duration::from_millis(200));
        let capped: Vec<_> = waits
            .iter()
            .map(|wait| at_least_asked(Some(*wait), None, cap).unwrap())
            .collect();
        assert!(capped.iter().all(|wait| *wait <= cap));
        assert_eq!(capped[5], cap);
    }

    #[test]
    fn the_servers_wait_is_honoured_within_the_cap() {
        let cap = Duration::from_secs(30);
        let short = Some(Duration::from_millis(200));
        assert_eq!(
            at_least_asked(short, Some(Duration::from_secs(5)), cap),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            at_least_asked(short, Some(Duration::from_secs(3600)), cap),
            Some(cap)
        );
        assert_eq!(
            at_least_asked(None, Some(Duration::from_secs(5)), cap),
            None
        );
    }
}
