//! Per-tenant limits (SPEC: HTTP API): token buckets per caller — the tenant of a tenant token,
//! the subject of an operator token — one for requests, one for series read
//! (series-cardinality). An empty bucket answers 429 with `Retry-After`; an answer of more
//! series than `max_series_per_query` is refused (400) whatever the bucket holds; a caller
//! with `max_open_feeds` feeds open gets 429 for another until one closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much a caller may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained requests per second.
    pub requests_per_s: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: f64,
    /// Sustained series per second, summed over answers (a usage answer grouped by lease has a
    /// series per lease; a lease's metrics, one per metric).
    pub series_per_s: f64,
    /// Series allowed at once after a quiet period; a larger answer waits for a full bucket.
    pub series_burst: f64,
    /// The most series one answer may hold (AEP-43: 5,000): a larger one is refused (400),
    /// whatever the bucket holds.
    pub max_series_per_query: usize,
    /// The most Server-Sent Events feeds one caller may hold open at once (AEP-43: 20
    /// concurrent queries per tenant; a feed is a query that stays open).
    pub max_open_feeds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_s: 20.0,
            burst: 100.0,
            series_per_s: 2_000.0,
            series_burst: 20_000.0,
            max_series_per_query: 5_000,
            max_open_feeds: 20,
        }
    }
}

/// The buckets of every caller seen, for one kind of limit.
#[derive(Debug)]
pub struct RateLimiter {
    per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limit of `per_s` refilled up to `burst`.
    pub fn new(per_s: f64, burst: f64) -> Self {
        Self {
            per_s,
            burst: burst.max(1.0),
            buckets: Mutex::default(),
        }
    }

    /// The request-rate limit of `limits`.
    pub fn requests(limits: &Limits) -> Self {
        Self::new(limits.requests_per_s, limits.burst)
    }

    /// The series-cardinality limit of `limits`.
    pub fn series(limits: &Limits) -> Self {
        Self::new(limits.series_per_s, limits.series_burst)
    }

    /// Takes `n` from `caller`'s bucket at `now` (at most a full bucket: a larger `n` passes
    /// when the bucket is full and empties it); when there is not enough, how long until there
    /// is.
    pub fn take(&self, caller: &str, n: u64, now: Instant) -> Result<(), Duration> {
        let need = (n as f64).min(self.burst);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, last) = buckets
            .entry(caller.to_string())
            .or_insert((self.burst, now));
        let refilled = *tokens + now.saturating_duration_since(*last).as_secs_f64() * self.per_s;
        *tokens = refilled.min(self.burst);
        *last = now;
        if *tokens >= need {
            *tokens -= need;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (need - *tokens) / self.per_s.max(1e-9),
            ))
        }
    }
}

/// The feeds each caller holds open, at most `max` each.
#[derive(Debug)]
pub struct OpenFeeds {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open feed of a caller: counted until dropped (the feed's stream ends or its client goes).
#[derive(Debug)]
pub struct FeedPermit {
    feeds: Arc<OpenFeeds>,
    caller: String,
}

impl OpenFeeds {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// The most feeds a caller may hold open.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for one more feed of `caller`; `None` when it holds `max` already.
    pub fn open(self: &Arc<Self>, caller: &str) -> Option<FeedPermit> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = open.entry(caller.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(FeedPermit {
            feeds: self.clone(),
            caller: caller.to_string(),
        })
    }

    /// How many feeds `caller` holds open.
    pub fn held(&self, caller: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(caller)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FeedPermit {
    fn drop(&mut self) {
        let mut open = self
            .feeds
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = open.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Callers come and go: the map keeps only those with a feed open.
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate_and_callers_do_not_share() {
        let limiter = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("acme", 1, t0).is_ok());
        }
        let wait = limiter.take("acme", 1, t0).expect_err("the burst is spent");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another tenant has its own bucket.
        assert!(limiter.take("globex", 1, t0).is_ok());
        // Half a second later one request is back, and only one.
        let later = t0 + Duration::from_millis(500);
        assert!(limiter.take("acme", 1, later).is_ok());
        assert!(limiter.take("acme", 1, later).is_err());
    }

    #[test]
    fn a_caller_holds_at_most_its_feeds_and_a_closed_one_frees_its_place() {
        let feeds = OpenFeeds::new(2);
        let first = feeds.open("acme").expect("first");
        let _second = feeds.open("acme").expect("second");
        assert!(feeds.open("acme").is_none(), "a third is refused");
        // Another caller has places of its own.
        let globex = feeds.open("globex").expect("globex's first");
        drop(first);
        assert_eq!(feeds.held("acme"), 1);
        let _third = feeds.open("acme").expect("a place came free");
        drop(globex);
        assert_eq!(feeds.held("globex"), 0);
        assert!(
            !feeds.open.lock().expect("lock").contains_key("globex"),
            "a caller with no feed open is forgotten"
        );
    }

    #[test]
    fn series_are_taken_by_the_answer_and_a_huge_answer_waits_for_a_full_bucket() {
        let limiter = RateLimiter::new(100.0, 1_000.0);
        let t0 = Instant::now();
        assert!(limiter.take("acme", 600, t0).is_ok());
        // 400 left: 500 more must wait a second for the missing 100.
        let wait = limiter.take("acme", 500, t0).expect_err("not enough left");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // An answer larger than the bucket costs the whole bucket: it passes when full.
        let full = t0 + Duration::from_secs(10);
        assert!(limiter.take("acme", 5_000, full).is_ok());
        let wait = limiter.take("acme", 1, full).expect_err("emptied");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
    }
}
