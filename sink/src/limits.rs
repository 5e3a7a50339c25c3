//! Per-tenant request-rate limits (SPEC: HTTP API): a token bucket per caller — the tenant of a
//! tenant token, the subject of an operator token — refilled at `requests_per_s` up to
//! `burst`. An empty bucket answers 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many requests a caller may make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained requests per second.
    pub requests_per_s: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_s: 20.0,
            burst: 100.0,
        }
    }
}

/// The buckets of every caller seen.
#[derive(Debug, Default)]
pub struct RateLimiter {
    limits: Limits,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::default(),
        }
    }

    /// Takes one request from `caller`'s bucket at `now`; when it is empty, how long until
    /// one is there.
    pub fn take(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let Limits {
            requests_per_s,
            burst,
        } = self.limits;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, last) = buckets.entry(caller.to_string()).or_insert((burst, now));
        let refilled =
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * requests_per_s;
        *tokens = refilled.min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - *tokens) / requests_per_s.max(1e-9),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate_and_callers_do_not_share() {
        let limiter = RateLimiter::new(Limits {
            requests_per_s: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("acme", t0).is_ok());
        }
        let wait = limiter.take("acme", t0).expect_err("the burst is spent");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another tenant has its own bucket.
        assert!(limiter.take("globex", t0).is_ok());
        // Half a second later one request is back, and only one.
        let later = t0 + Duration::from_millis(500);
        assert!(limiter.take("acme", later).is_ok());
        assert!(limiter.take("acme", later).is_err());
    }
}
