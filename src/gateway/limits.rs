//! In-memory request-rate buckets and concurrency limits, one set per consumer.
//!
//! These reset on restart on purpose: they protect upstreams from bursts, not budgets over days.
//! The daily token budget is durable and lives in the usage tree (see [`super::Gateway`]).
//!
//! Not for: authentication or anything that must survive a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::ConsumerPolicy;

/// Per-consumer limiter state. A std `Mutex`: no `.await` happens while it is held.
#[derive(Default)]
pub(super) struct Limits {
    consumers: Mutex<HashMap<String, ConsumerLimits>>,
}

struct ConsumerLimits {
    bucket: Bucket,
    max_concurrent: u32,
    in_flight: Arc<Semaphore>,
}

/// A token bucket holding up to `rpm` requests, refilled at `rpm` per minute.
struct Bucket {
    rpm: u32,
    tokens: f64,
    last_ms: u64,
}

/// Why a request was refused by the limiter.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// Over the request rate; retry after this many seconds.
    Rate { retry_after_secs: u64 },
    /// Too many requests in flight.
    Concurrency { max: u32 },
}

impl Limits {
    /// Takes a concurrency slot and one request from the bucket, or says why not. The slot is
    /// held until the returned permit drops (when the response body is done).
    pub(super) fn admit(
        &self,
        consumer: &str,
        policy: &ConsumerPolicy,
        now_ms: u64,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let mut consumers = self
            .consumers
            .lock()
            .expect("limits lock is never poisoned");
        // Look up before inserting, so the common case allocates no key.
        if !consumers.contains_key(consumer) {
            consumers.insert(consumer.to_owned(), ConsumerLimits::new(policy, now_ms));
        }
        let entry = consumers.get_mut(consumer).expect("inserted just above");
        if entry.max_concurrent != policy.max_concurrent {
            entry.max_concurrent = policy.max_concurrent;
            entry.in_flight = Arc::new(Semaphore::new(policy.max_concurrent as usize));
        }
        if entry.bucket.rpm != policy.requests_per_minute {
            entry.bucket.rpm = policy.requests_per_minute;
            entry.bucket.tokens = entry.bucket.tokens.min(f64::from(entry.bucket.rpm));
        }
        let permit = if policy.max_concurrent == 0 {
            None
        } else {
            Some(
                Arc::clone(&entry.in_flight)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Concurrency {
                        max: policy.max_concurrent,
                    })?,
            )
        };
        if policy.requests_per_minute > 0 {
            entry.bucket.take(now_ms)?;
        }
        Ok(permit)
    }

    /// Forgets a consumer's state (after revocation), so a re-added consumer starts fresh.
    pub(super) fn forget(&self, consumer: &str) {
        self.consumers
            .lock()
            .expect("limits lock is never poisoned")
            .remove(consumer);
    }
}

impl ConsumerLimits {
    fn new(policy: &ConsumerPolicy, now_ms: u64) -> Self {
        Self {
            bucket: Bucket {
                rpm: policy.requests_per_minute,
                tokens: f64::from(policy.requests_per_minute),
                last_ms: now_ms,
            },
            max_concurrent: policy.max_concurrent,
            in_flight: Arc::new(Semaphore::new(policy.max_concurrent as usize)),
        }
    }
}

impl Bucket {
    fn take(&mut self, now_ms: u64) -> Result<(), Refusal> {
        let per_ms = f64::from(self.rpm) / 60_000.0;
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * per_ms).min(f64::from(self.rpm));
        self.last_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - self.tokens) / per_ms;
            Err(Refusal::Rate {
                retry_after_secs: (wait_ms / 1000.0).ceil().max(1.0) as u64,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rpm: u32, concurrent: u32) -> ConsumerPolicy {
        ConsumerPolicy {
            requests_per_minute: rpm,
            max_concurrent: concurrent,
            ..ConsumerPolicy::default()
        }
    }

    #[test]
    fn bucket_refills_at_the_configured_rate() {
        let limits = Limits::default();
        let p = policy(2, 0);
        assert!(limits.admit("a", &p, 0).is_ok());
        assert!(limits.admit("a", &p, 0).is_ok());
        assert_eq!(
            limits.admit("a", &p, 0).unwrap_err(),
            Refusal::Rate {
                retry_after_secs: 30
            }
        );
        assert!(limits.admit("b", &p, 0).is_ok(), "consumers are separate");
        assert!(limits.admit("a", &p, 29_999).is_err());
        assert!(limits.admit("a", &p, 30_000).is_ok());
    }

    #[test]
    fn concurrency_slots_return_when_dropped() {
        let limits = Limits::default();
        let p = policy(0, 1);
        let held = limits.admit("a", &p, 0).unwrap();
        assert_eq!(
            limits.admit("a", &p, 0).unwrap_err(),
            Refusal::Concurrency { max: 1 }
        );
        drop(held);
        assert!(limits.admit("a", &p, 0).is_ok());
    }
}
